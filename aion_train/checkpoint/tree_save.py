"""Writing a tree (see :mod:`.tree_format`): encode the structure, write the tensor file and
then the JSON file through :class:`aion_train.fsutil.AtomicOutput`."""

from __future__ import annotations

import base64
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from safetensors.torch import save_file

from aion_train.fsutil import AtomicOutput

from .tree_format import (
    _NATIVE_DTYPES,
    _NUMPY_KINDS,
    _VIEW_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    PathLike,
    _dtype_name,
    _fmt_path,
    _join,
    tree_paths,
)

__all__ = ["save_tree"]


# --------------------------------------------------------------------------- encoding


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        # alias key -> tensor name; keeps identical views stored once
        self._alias: dict[tuple, str] = {}
        # storages already used by a stored tensor
        self._storages: set = set()
        self._keep_alive: list[Any] = []
        self._active: set = set()  # ids of containers on the current path (cycle check)

    # unique tensor names: the structure path, made unique if it collides.
    def _new_name(self, path: str) -> str:
        base = path or "<root>"
        name, i = base, 1
        while name in self.tensors:
            name = f"{base}#{i}"
            i += 1
        return name

    def encode(self, obj: Any, path: str) -> dict[str, Any]:
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
                    "int subclasses (e.g. enums) are not supported; convert to int"
                )
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
                raise TypeError(f"cannot serialise '{_fmt_path(path)}': the structure contains a reference cycle")
            self._active.add(id(obj))
            try:
                return self._encode_container(obj, path)
            finally:
                self._active.discard(id(obj))
        raise TypeError(
            f"cannot serialise object of type {type(obj).__module__}.{type(obj).__qualname__} "
            f"at '{_fmt_path(path)}': only dict/list/tuple/tensor/ndarray/int/float/bool/"
            "str/bytes/None/torch.dtype are supported"
        )

    def _encode_container(self, obj: Any, path: str) -> dict[str, Any]:
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
                f"'{_fmt_path(path)}': convert it to a dict or tuple first"
            )
        return {"t": "tuple", "v": [self.encode(v, _join(path, i)) for i, v in enumerate(obj)]}

    def _encode_key(self, key: Any, path: str) -> dict[str, Any]:
        if key is None or isinstance(key, (bool, str)) or type(key) is int or type(key) is float:
            return self.encode(key, path)
        raise TypeError(
            f"cannot serialise dict key {key!r} of type {type(key).__qualname__} under "
            f"'{_fmt_path(path)}': keys must be str, int, bool, float or None"
        )

    def _store(self, t: torch.Tensor, path: str) -> str:
        """Register a dense, independent CPU tensor and return its name."""
        name = self._new_name(path)
        self.tensors[name] = t
        return name

    def _encode_tensor(self, t: torch.Tensor, path: str) -> dict[str, Any]:
        where = _fmt_path(path)
        if t.layout != torch.strided:
            raise TypeError(
                f"cannot serialise tensor at '{where}': layout {t.layout} is not supported (convert with .to_dense())"
            )
        if t.is_quantized:
            raise TypeError(f"cannot serialise quantized tensor at '{where}'")
        if t.device.type == "meta":
            raise TypeError(f"cannot serialise meta tensor at '{where}': it has no data")
        dtype = t.dtype
        if dtype not in _NATIVE_DTYPES and dtype not in _VIEW_DTYPES:
            raise TypeError(f"cannot serialise tensor at '{where}': dtype {dtype} is not supported by safetensors")
        node = {"t": "tensor", "v": None, "dtype": _dtype_name(dtype), "shape": list(t.shape)}

        alias_key = None
        if t.numel() > 0:
            alias_key = (t.device.type, t.device.index, t.data_ptr(), dtype, tuple(t.shape), tuple(t.stride()))
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

    def _encode_ndarray(self, a: np.ndarray, path: str) -> dict[str, Any]:
        where = _fmt_path(path)
        if a.dtype.kind not in _NUMPY_KINDS or a.dtype.fields is not None:
            raise TypeError(
                f"cannot serialise numpy array at '{where}': dtype {a.dtype} "
                "is not supported (numeric or bool dtypes only)"
            )
        # np.array (not ascontiguousarray, which turns 0-d into 1-d): a private,
        # C-contiguous, native-byte-order copy
        native = np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)
        try:
            t = torch.from_numpy(native)
        except TypeError as e:
            raise TypeError(f"cannot serialise numpy array at '{where}': {e}") from None
        if t.dtype not in _NATIVE_DTYPES and t.dtype not in _VIEW_DTYPES:
            raise TypeError(
                f"cannot serialise numpy array at '{where}': dtype {a.dtype} is not supported by safetensors"
            )
        if t.dtype in _VIEW_DTYPES:
            t = _VIEW_DTYPES[t.dtype][0](t).contiguous()
        self._storages.add(t.untyped_storage().data_ptr())
        name = self._store(t, path)
        return {"t": "ndarray", "v": name, "dtype": native.dtype.name, "shape": list(a.shape)}

    def _encode_npscalar(self, x: np.generic, path: str) -> dict[str, Any]:
        kind = x.dtype.kind
        if kind == "b":
            v: Any = bool(x)
        elif kind in "iu":
            v = int(x)
        elif kind == "f" and x.dtype.itemsize <= 8:
            v = _encode_float(float(x))
        else:
            raise TypeError(f"cannot serialise numpy scalar of dtype {x.dtype} at '{_fmt_path(path)}'")
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


def save_tree(obj: Any, path_prefix: PathLike, *, fsync: bool = False) -> tuple[Path, Path]:
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
    # the JSON file (which names the tensor file's token) goes into place last
    with AtomicOutput(json_path, fsync=fsync) as json_tmp:
        with AtomicOutput(st_path, fsync=fsync) as st_tmp:
            save_file(
                enc.tensors,
                os.fspath(st_tmp),
                metadata={"format": "pt", FORMAT_NAME: str(FORMAT_VERSION), "token": token},
            )
            with open(json_tmp, "w", encoding="utf-8") as f:
                f.write(text)
    return json_path, st_path
