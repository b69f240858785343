"""Reading a tree (see :mod:`.tree_format`) with only :mod:`json` and :mod:`safetensors`;
anything not produced by :func:`~.tree_save.save_tree` is refused."""

from __future__ import annotations

import base64
import json
import math
import os
from typing import Any, Union

import numpy as np
import torch
from safetensors import safe_open

from .errors import TreeFormatError
from .tree_format import (
    _DTYPE_BY_NAME,
    _NATIVE_DTYPES,
    _NUMPY_KINDS,
    _VIEW_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    PathLike,
    _fmt_path,
    _join,
    tree_paths,
)

__all__ = ["load_tree"]


# --------------------------------------------------------------------------- loading


def _reject_constant(name: str) -> Any:
    raise TreeFormatError(f"invalid JSON constant {name!r} (non-finite floats must be tagged)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise TreeFormatError(f"duplicate JSON object key {k!r}")
        out[k] = v
    return out


_NODE_FIELDS = {
    "none": {"t"},
    "bool": {"t", "v"},
    "int": {"t", "v"},
    "float": {"t", "v"},
    "str": {"t", "v"},
    "bytes": {"t", "v"},
    "dtype": {"t", "v"},
    "list": {"t", "v"},
    "tuple": {"t", "v"},
    "dict": {"t", "v"},
    "tensor": {"t", "v", "dtype", "shape"},
    "ndarray": {"t", "v", "dtype", "shape"},
    "npscalar": {"t", "v", "dtype"},
}
_KEY_TAGS = {"none", "bool", "int", "float", "str"}


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self.tensors = tensors
        self.used: set = set()
        self.where = where
        self._tensor_cache: dict[str, torch.Tensor] = {}

    def fail(self, path: str, msg: str) -> TreeFormatError:
        return TreeFormatError(f"{self.where}: at '{_fmt_path(path)}': {msg}")

    def decode(self, node: Any, path: str) -> Any:
        if not isinstance(node, dict) or not isinstance(node.get("t"), str):
            raise self.fail(path, f"expected a tagged node, got {type(node).__name__}")
        tag = node["t"]
        fields = _NODE_FIELDS.get(tag)
        if fields is None:
            raise self.fail(path, f"unknown tag {tag!r} (refusing to load)")
        if set(node) != fields:
            raise self.fail(path, f"node {tag!r} has fields {sorted(node)}, expected {sorted(fields)}")
        v = node.get("v")
        if tag == "none":
            return None
        if tag == "bool":
            if not isinstance(v, bool):
                raise self.fail(path, "bool node without a boolean value")
            return v
        if tag == "int":
            if type(v) is not int:
                raise self.fail(path, "int node without an integer value")
            return v
        if tag == "float":
            return self._float(v, path)
        if tag == "str":
            if not isinstance(v, str):
                raise self.fail(path, "str node without a string value")
            return v
        if tag == "bytes":
            if not isinstance(v, str):
                raise self.fail(path, "bytes node without base64 text")
            try:
                return base64.b64decode(v.encode("ascii"), validate=True)
            except (ValueError, UnicodeEncodeError) as e:
                raise self.fail(path, f"bad base64 data: {e}") from None
        if tag == "dtype":
            if not isinstance(v, str) or v not in _DTYPE_BY_NAME:
                raise self.fail(path, f"unknown torch dtype {v!r}")
            return _DTYPE_BY_NAME[v]
        if tag in ("list", "tuple"):
            if not isinstance(v, list):
                raise self.fail(path, f"{tag} node without an item array")
            items = [self.decode(x, _join(path, i)) for i, x in enumerate(v)]
            return items if tag == "list" else tuple(items)
        if tag == "dict":
            if not isinstance(v, list):
                raise self.fail(path, "dict node without an item array")
            out: dict[Any, Any] = {}
            for i, pair in enumerate(v):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise self.fail(path, f"dict item {i} is not a [key, value] pair")
                knode, vnode = pair
                if not isinstance(knode, dict) or knode.get("t") not in _KEY_TAGS:
                    raise self.fail(path, f"dict item {i} has an invalid key node")
                key = self.decode(knode, path)
                if key in out:
                    raise self.fail(path, f"duplicate dict key {key!r}")
                out[key] = self.decode(vnode, _join(path, key))
            return out
        if tag == "tensor":
            return self._tensor(node, path)
        if tag == "ndarray":
            return self._ndarray(node, path)
        if tag == "npscalar":
            return self._npscalar(node, path)
        raise self.fail(path, f"unhandled tag {tag!r}")  # pragma: no cover

    def _float(self, v: Any, path: str) -> float:
        if isinstance(v, str):
            table = {"nan": math.nan, "-nan": -math.nan, "inf": math.inf, "-inf": -math.inf}
            if v not in table:
                raise self.fail(path, f"bad float literal {v!r}")
            return table[v]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(path, "float node without a numeric value")
        return float(v)

    def _shape(self, node: dict[str, Any], path: str) -> tuple[int, ...]:
        shape = node["shape"]
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise self.fail(path, f"bad shape {shape!r}")
        return tuple(shape)

    def _raw(self, node: dict[str, Any], path: str) -> torch.Tensor:
        name = node["v"]
        if not isinstance(name, str) or name not in self.tensors:
            raise self.fail(path, f"tensor {name!r} is missing from the tensor file")
        self.used.add(name)
        return self.tensors[name]

    def _tensor(self, node: dict[str, Any], path: str) -> torch.Tensor:
        name = node["v"]
        dtype_name = node["dtype"]
        dtype = _DTYPE_BY_NAME.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None or (dtype not in _NATIVE_DTYPES and dtype not in _VIEW_DTYPES):
            raise self.fail(path, f"unsupported tensor dtype {dtype_name!r}")
        shape = self._shape(node, path)
        if isinstance(name, str) and name in self._tensor_cache:
            t = self._tensor_cache[name]
        else:
            t = self._raw(node, path)
            if dtype in _VIEW_DTYPES:
                if t.dim() == 0 or t.shape[-1] != 2:
                    raise self.fail(path, f"stored tensor {name!r} cannot be viewed as {dtype_name}")
                t = _VIEW_DTYPES[dtype][1](t.contiguous())
            self._tensor_cache[name] = t
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise self.fail(
                path,
                f"tensor {name!r} is {t.dtype}{list(t.shape)} in the tensor "
                f"file but {dtype_name}{list(shape)} in the structure",
            )
        return t

    def _ndarray(self, node: dict[str, Any], path: str) -> np.ndarray:
        dtype_name = node["dtype"]
        try:
            dtype = np.dtype(dtype_name) if isinstance(dtype_name, str) else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in _NUMPY_KINDS or dtype.fields is not None:
            raise self.fail(path, f"unsupported ndarray dtype {dtype_name!r}")
        shape = self._shape(node, path)
        t = self._raw(node, path).cpu()
        if dtype == np.complex128:
            if t.dim() == 0 or t.shape[-1] != 2:
                raise self.fail(path, "stored tensor cannot be viewed as complex128")
            t = torch.view_as_complex(t.contiguous())
        arr = t.numpy().copy()
        if arr.dtype != dtype or arr.shape != shape:
            raise self.fail(
                path,
                f"array is {arr.dtype}{list(arr.shape)} in the tensor file but {dtype}{list(shape)} in the structure",
            )
        return arr

    def _npscalar(self, node: dict[str, Any], path: str) -> np.generic:
        dtype_name = node["dtype"]
        try:
            dtype = np.dtype(dtype_name) if isinstance(dtype_name, str) else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in "biuf" or (dtype.kind == "f" and dtype.itemsize > 8):
            raise self.fail(path, f"unsupported numpy scalar dtype {dtype_name!r}")
        v = node["v"]
        if dtype.kind == "b":
            if not isinstance(v, bool):
                raise self.fail(path, "bool scalar without a boolean value")
            return np.bool_(v)
        if dtype.kind in "iu":
            if type(v) is not int:
                raise self.fail(path, "integer scalar without an integer value")
            return dtype.type(v)
        return dtype.type(self._float(v, path))


def load_tree(path_prefix: PathLike, *, device: Union[str, torch.device] = "cpu") -> Any:
    """Load a structure written by :func:`save_tree`.

    Tensors are placed on ``device``.  Uses only ``json`` and ``safetensors``.
    Raises :class:`TreeFormatError` for anything not produced by ``save_tree``
    (unknown tags, missing/extra tensors, mismatched file pair, ...) and
    ``FileNotFoundError`` if a file is missing.
    """
    json_path, st_path = tree_paths(path_prefix)
    where = os.fspath(json_path)
    with open(json_path, encoding="utf-8") as f:
        text = f.read()
    try:
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise TreeFormatError(f"{where}: invalid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise TreeFormatError(f"{where}: not an {FORMAT_NAME} file")
    if doc.get("version") != FORMAT_VERSION:
        raise TreeFormatError(f"{where}: unsupported format version {doc.get('version')!r}")
    expected = {"format", "version", "token", "tensor_file", "num_tensors", "root"}
    if set(doc) != expected:
        raise TreeFormatError(f"{where}: unexpected top-level fields {sorted(set(doc) ^ expected)}")
    if doc["tensor_file"] != st_path.name:
        raise TreeFormatError(f"{where}: refers to tensor file {doc['tensor_file']!r}, expected {st_path.name!r}")

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(os.fspath(st_path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("token") != doc["token"]:
                raise TreeFormatError(f"{where}: {st_path.name} belongs to a different save (token mismatch)")
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except TreeFormatError:
        raise
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers
        if not st_path.exists():
            raise FileNotFoundError(os.fspath(st_path)) from None
        raise TreeFormatError(f"{st_path}: unreadable safetensors file: {e}") from None
    if len(tensors) != doc["num_tensors"]:
        raise TreeFormatError(f"{where}: expected {doc['num_tensors']} tensors, {st_path.name} holds {len(tensors)}")

    dec = _Decoder(tensors, where)
    obj = dec.decode(doc["root"], "")
    unused = set(tensors) - dec.used
    if unused:
        raise TreeFormatError(f"{where}: tensors not referenced by the structure: {sorted(unused)[:5]}")
    return obj
