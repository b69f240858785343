"""Pickle-free serialisation of nested training state.

``save_tree(obj, prefix)`` writes two files:

* ``prefix.safetensors`` - every tensor / numpy array of the structure,
* ``prefix.json``        - the structure itself as explicitly tagged JSON nodes.

``load_tree(prefix)`` reads them back using only :mod:`json` and
:mod:`safetensors`; nothing is ever unpickled, so a checkpoint file can never
execute code.  Every JSON node carries a tag from a closed set and the loader
rejects anything else (unknown tags, unexpected fields, wrongly typed values,
tensors missing from / extra in the tensor file, a JSON file paired with a
tensor file from another save).

Supported values
----------------
``dict`` (and subclasses such as ``OrderedDict``; loaded as ``dict``) with keys
of type ``str``, ``int``, ``bool``, ``float`` or ``None`` (key types preserved,
so ``torch.optim`` state dicts keep their integer parameter ids), ``list``,
``tuple`` (``torch.Size`` loads as ``tuple``), ``torch.Tensor`` (any dtype
safetensors knows plus ``complex128``, any shape including 0-d and empty,
non-contiguous views, tensors on any device; loaded on ``device``),
``numpy.ndarray`` (numeric/bool dtypes), numpy scalars, ``int``, ``float``
(including ``inf``/``-inf``/``nan``/``-0.0``, bit-exact), ``bool``, ``str``,
``bytes``, ``None`` and ``torch.dtype``.

Tensors that share storage are handled: two views with exactly the same
storage location, shape, strides and dtype (e.g. tied weights returned as
separate objects by ``state_dict()``) are stored once and load back as one
tensor object referenced from both places; other partial/overlapping views are
copied out so each stored tensor is dense and independent.

Anything else raises :class:`TypeError` naming the path inside the structure,
e.g. ``optimizer.state.3.step``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np
import torch

from aion_train.fsutil import fsync_dir, fsync_path  # noqa: F401  (re-exported)
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "CheckpointError",
    "TreeFormatError",
    "save_tree",
    "load_tree",
    "tree_paths",
    "fsync_path",
    "fsync_dir",
]

FORMAT_NAME = "aion_train.tree"
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, incomplete or incompatible."""


class TreeFormatError(CheckpointError, ValueError):
    """A ``.json``/``.safetensors`` pair does not follow the tree format."""


# dtypes the safetensors torch backend can store natively.
_NATIVE_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.complex64,
}
for _name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
              "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _NATIVE_DTYPES.add(getattr(torch, _name))
# dtypes stored through a lossless reinterpretation: name -> (to_storage, from_storage)
_VIEW_DTYPES = {
    torch.complex128: (torch.view_as_real, torch.view_as_complex),
}

_DTYPE_BY_NAME: Dict[str, torch.dtype] = {}
for _name in dir(torch):
    _val = getattr(torch, _name, None)
    if isinstance(_val, torch.dtype):
        _DTYPE_BY_NAME.setdefault(str(_val).split(".", 1)[1], _val)

_NUMPY_KINDS = "biufc"  # bool, signed, unsigned, float, complex


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".", 1)[1]


def _fmt_path(path: str) -> str:
    return path if path else "<root>"


def _join(path: str, key: Any) -> str:
    key = str(key)
    return f"{path}.{key}" if path else key


def tree_paths(prefix: PathLike) -> Tuple[Path, Path]:
    """Return ``(json_path, safetensors_path)`` for a path prefix."""
    prefix = os.fspath(prefix)
    return Path(prefix + ".json"), Path(prefix + ".safetensors")



# --------------------------------------------------------------------------- encoding

class _Encoder:
    def __init__(self) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}
        # alias key -> tensor name; keeps identical views stored once
        self._alias: Dict[tuple, str] = {}
        # storages already used by a stored tensor
        self._storages: set = set()
        self._keep_alive: List[Any] = []
        self._active: set = set()  # ids of containers on the current path (cycle check)

    # unique tensor names: the structure path, made unique if it collides.
    def _new_name(self, path: str) -> str:
        base = path or "<root>"
        name, i = base, 1
        while name in self.tensors:
            name = f"{base}#{i}"
            i += 1
        return name

    def encode(self, obj: Any, path: str) -> Dict[str, Any]:
        # order matters: bool before int, numpy scalars before float.
        if obj is None:
            return {"t": "none"}
        if isinstance(obj, bool):
            return {"t": "bool", "v": obj}
        if isinstance(obj, torch.Tensor):
            return self._encode_tensor(obj, path)
        if isinstance(obj, np.ndarray):
            return self._encode_ndarray(obj, path)
        if isinstance(obj, np.generic):
            return self._encode_npscalar(obj, path)
        if isinstance(obj, int):
            if type(obj) is not int:
                raise TypeError(
                    f"cannot serialise {type(obj).__qualname__} at '{_fmt_path(path)}': "
                    "int subclasses (e.g. enums) are not supported; convert to int")
            return {"t": "int", "v": obj}
        if isinstance(obj, float):
            return {"t": "float", "v": _encode_float(float(obj))}
        if isinstance(obj, str):
            return {"t": "str", "v": str.__str__(obj)}
        if isinstance(obj, (bytes, bytearray)):
            return {"t": "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, torch.dtype):
            return {"t": "dtype", "v": _dtype_name(obj)}
        if isinstance(obj, (dict, list, tuple)):
            if id(obj) in self._active:
                raise TypeError(f"cannot serialise '{_fmt_path(path)}': the structure "
                                "contains a reference cycle")
            self._active.add(id(obj))
            try:
                return self._encode_container(obj, path)
            finally:
                self._active.discard(id(obj))
        raise TypeError(
            f"cannot serialise object of type {type(obj).__module__}.{type(obj).__qualname__} "
            f"at '{_fmt_path(path)}': only dict/list/tuple/tensor/ndarray/int/float/bool/"
            "str/bytes/None/torch.dtype are supported")

    def _encode_container(self, obj: Any, path: str) -> Dict[str, Any]:
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                items.append([self._encode_key(k, path), self.encode(v, _join(path, k))])
            return {"t": "dict", "v": items}
        if isinstance(obj, list):
            return {"t": "list", "v": [self.encode(v, _join(path, i)) for i, v in enumerate(obj)]}
        if hasattr(obj, "_fields"):
            raise TypeError(
                f"cannot serialise namedtuple {type(obj).__qualname__} at "
                f"'{_fmt_path(path)}': convert it to a dict or tuple first")
        return {"t": "tuple", "v": [self.encode(v, _join(path, i)) for i, v in enumerate(obj)]}

    def _encode_key(self, key: Any, path: str) -> Dict[str, Any]:
        if key is None or isinstance(key, (bool, str)) or type(key) is int or type(key) is float:
            return self.encode(key, path)
        raise TypeError(
            f"cannot serialise dict key {key!r} of type {type(key).__qualname__} under "
            f"'{_fmt_path(path)}': keys must be str, int, bool, float or None")

    def _store(self, t: torch.Tensor, path: str) -> str:
        """Register a dense, independent CPU tensor and return its name."""
        name = self._new_name(path)
        self.tensors[name] = t
        return name

    def _encode_tensor(self, t: torch.Tensor, path: str) -> Dict[str, Any]:
        where = _fmt_path(path)
        if t.layout != torch.strided:
            raise TypeError(f"cannot serialise tensor at '{where}': layout {t.layout} "
                            "is not supported (convert with .to_dense())")
        if t.is_quantized:
            raise TypeError(f"cannot serialise quantized tensor at '{where}'")
        if t.device.type == "meta":
            raise TypeError(f"cannot serialise meta tensor at '{where}': it has no data")
        dtype = t.dtype
        if dtype not in _NATIVE_DTYPES and dtype not in _VIEW_DTYPES:
            raise TypeError(f"cannot serialise tensor at '{where}': dtype {dtype} "
                            "is not supported by safetensors")
        node = {"t": "tensor", "v": None, "dtype": _dtype_name(dtype), "shape": list(t.shape)}

        alias_key = None
        if t.numel() > 0:
            alias_key = (t.device.type, t.device.index, t.data_ptr(), dtype,
                         tuple(t.shape), tuple(t.stride()))
            if alias_key in self._alias:
                node["v"] = self._alias[alias_key]
                return node

        data = t.detach()
        if data.is_conj():
            data = data.resolve_conj()
        if data.is_neg():
            data = data.resolve_neg()
        if dtype in _VIEW_DTYPES:
            data = _VIEW_DTYPES[dtype][0](data)
        data = data.to("cpu").contiguous()
        # safetensors refuses tensors that share memory: copy out partial views
        # and any view of a storage that an earlier stored tensor already uses.
        if not _owns_storage(data) or data.untyped_storage().data_ptr() in self._storages:
            data = data.clone()
        if data.numel() > 0:
            self._storages.add(data.untyped_storage().data_ptr())
        name = self._store(data, path)
        node["v"] = name
        if alias_key is not None:
            self._alias[alias_key] = name
            self._keep_alive.append(t)  # keep data_ptr unique while encoding
        return node

    def _encode_ndarray(self, a: np.ndarray, path: str) -> Dict[str, Any]:
        where = _fmt_path(path)
        if a.dtype.kind not in _NUMPY_KINDS or a.dtype.fields is not None:
            raise TypeError(f"cannot serialise numpy array at '{where}': dtype {a.dtype} "
                            "is not supported (numeric or bool dtypes only)")
        # np.array (not ascontiguousarray, which turns 0-d into 1-d): a private,
        # C-contiguous, native-byte-order copy
        native = np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)
        try:
            t = torch.from_numpy(native)
        except TypeError as e:
            raise TypeError(f"cannot serialise numpy array at '{where}': {e}") from None
        if t.dtype not in _NATIVE_DTYPES and t.dtype not in _VIEW_DTYPES:
            raise TypeError(f"cannot serialise numpy array at '{where}': dtype {a.dtype} "
                            "is not supported by safetensors")
        if t.dtype in _VIEW_DTYPES:
            t = _VIEW_DTYPES[t.dtype][0](t).contiguous()
        self._storages.add(t.untyped_storage().data_ptr())
        name = self._store(t, path)
        return {"t": "ndarray", "v": name, "dtype": native.dtype.name, "shape": list(a.shape)}

    def _encode_npscalar(self, x: np.generic, path: str) -> Dict[str, Any]:
        kind = x.dtype.kind
        if kind == "b":
            v: Any = bool(x)
        elif kind in "iu":
            v = int(x)
        elif kind == "f" and x.dtype.itemsize <= 8:
            v = _encode_float(float(x))
        else:
            raise TypeError(f"cannot serialise numpy scalar of dtype {x.dtype} at "
                            f"'{_fmt_path(path)}'")
        return {"t": "npscalar", "dtype": x.dtype.name, "v": v}


def _owns_storage(t: torch.Tensor) -> bool:
    """True if ``t`` is a dense view covering its whole storage."""
    st = t.untyped_storage()
    return t.data_ptr() == st.data_ptr() and t.numel() * t.element_size() == st.nbytes()


def _encode_float(x: float) -> Union[float, str]:
    if math.isnan(x):
        # keep the sign bit of nan too (bit-exactness is not guaranteed for payloads)
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x  # json writes repr(), which round-trips exactly (incl. -0.0)


# --------------------------------------------------------------------------- saving

def save_tree(obj: Any, path_prefix: PathLike, *, fsync: bool = False) -> Tuple[Path, Path]:
    """Write ``obj`` to ``path_prefix.safetensors`` + ``path_prefix.json``.

    Both files are written to temporary names and moved into place with
    ``os.replace``; the JSON file is written last.  With ``fsync=True`` both
    files (and their folder) are flushed to stable storage.  Returns
    ``(json_path, safetensors_path)``.  Raises ``TypeError`` (naming the path in
    the structure) for unsupported values, before anything is written.
    """
    json_path, st_path = tree_paths(path_prefix)
    enc = _Encoder()
    root = enc.encode(obj, "")
    token = uuid.uuid4().hex
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "token": token,
        "tensor_file": st_path.name,
        "num_tensors": len(enc.tensors),
        "root": root,
    }
    text = json.dumps(doc, allow_nan=False, ensure_ascii=False, separators=(",", ":"))

    json_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}-{token[:8]}"
    st_tmp = st_path.with_name(st_path.name + suffix)
    json_tmp = json_path.with_name(json_path.name + suffix)
    try:
        save_file(enc.tensors, os.fspath(st_tmp),
                  metadata={"format": "pt", FORMAT_NAME: str(FORMAT_VERSION), "token": token})
        with open(json_tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if fsync:
            fsync_path(st_tmp)
        os.replace(st_tmp, st_path)
        os.replace(json_tmp, json_path)
    finally:
        for p in (st_tmp, json_tmp):
            if p.exists():
                p.unlink()
    if fsync:
        fsync_dir(json_path.parent)
    return json_path, st_path


# --------------------------------------------------------------------------- loading

def _reject_constant(name: str) -> Any:
    raise TreeFormatError(f"invalid JSON constant {name!r} (non-finite floats must be tagged)")


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
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
    def __init__(self, tensors: Dict[str, torch.Tensor], where: str) -> None:
        self.tensors = tensors
        self.used: set = set()
        self.where = where
        self._tensor_cache: Dict[str, torch.Tensor] = {}

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
            out: Dict[Any, Any] = {}
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

    def _shape(self, node: Dict[str, Any], path: str) -> Tuple[int, ...]:
        shape = node["shape"]
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise self.fail(path, f"bad shape {shape!r}")
        return tuple(shape)

    def _raw(self, node: Dict[str, Any], path: str) -> torch.Tensor:
        name = node["v"]
        if not isinstance(name, str) or name not in self.tensors:
            raise self.fail(path, f"tensor {name!r} is missing from the tensor file")
        self.used.add(name)
        return self.tensors[name]

    def _tensor(self, node: Dict[str, Any], path: str) -> torch.Tensor:
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
            raise self.fail(path, f"tensor {name!r} is {t.dtype}{list(t.shape)} in the tensor "
                                  f"file but {dtype_name}{list(shape)} in the structure")
        return t

    def _ndarray(self, node: Dict[str, Any], path: str) -> np.ndarray:
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
            raise self.fail(path, f"array is {arr.dtype}{list(arr.shape)} in the tensor file "
                                  f"but {dtype}{list(shape)} in the structure")
        return arr

    def _npscalar(self, node: Dict[str, Any], path: str) -> np.generic:
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
    with open(json_path, "r", encoding="utf-8") as f:
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
        raise TreeFormatError(f"{where}: refers to tensor file {doc['tensor_file']!r}, "
                              f"expected {st_path.name!r}")

    tensors: Dict[str, torch.Tensor] = {}
    try:
        with safe_open(os.fspath(st_path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("token") != doc["token"]:
                raise TreeFormatError(
                    f"{where}: {st_path.name} belongs to a different save (token mismatch)")
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
        raise TreeFormatError(f"{where}: expected {doc['num_tensors']} tensors, "
                              f"{st_path.name} holds {len(tensors)}")

    dec = _Decoder(tensors, where)
    obj = dec.decode(doc["root"], "")
    unused = set(tensors) - dec.used
    if unused:
        raise TreeFormatError(f"{where}: tensors not referenced by the structure: {sorted(unused)[:5]}")
    return obj
