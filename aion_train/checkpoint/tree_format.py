"""The tree format: pickle-free serialisation of nested training state.

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

import os
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_NAME = "aion_train.tree"
FORMAT_VERSION = 1

# dtypes the safetensors torch backend can store natively.
_NATIVE_DTYPES = {
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
}
for _name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _NATIVE_DTYPES.add(getattr(torch, _name))
# dtypes stored through a lossless reinterpretation: name -> (to_storage, from_storage)
_VIEW_DTYPES = {
    torch.complex128: (torch.view_as_real, torch.view_as_complex),
}

_DTYPE_BY_NAME: dict[str, torch.dtype] = {}
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


def tree_paths(prefix: PathLike) -> tuple[Path, Path]:
    """Return ``(json_path, safetensors_path)`` for a path prefix."""
    prefix = os.fspath(prefix)
    return Path(prefix + ".json"), Path(prefix + ".safetensors")
