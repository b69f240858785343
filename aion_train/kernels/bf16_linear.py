"""A bf16 linear for CPUs with AVX512-BF16 (the C source: kernels/cpu/bf16_linear.c), for
generation's packed weights (model/packed_weights.py).

The weight is laid out once as 16-output blocks of input pairs, so that one 64-byte load feeds
16 outputs of every row through VDPBF16PS; products are summed in fp32 and rounded to bf16
once, as oneDNN's bf16 GEMM does (the same numbers up to the order of the fp32 sums). At the
row counts of decoding, oneDNN's kernel reads the weights at well under the memory bandwidth
(docs/notes.md, bench serve); this one streams them.

The source is compiled with the system's C compiler (`$CC`, else cc) on first use into
~/.cache/aion-train/kernels (a name carrying the source's and flags' sha256, written under a
temporary name and renamed, so concurrent processes never load a partial file) and loaded
with ctypes. Loaded after torch, its OpenMP runtime is torch's own (the same soname), so it
runs on torch's thread pool with torch's thread count. Not used, with the reason logged, when:
the CPU lacks AVX512-BF16, the CPU has AMX (oneDNN's AMX kernels are kept there), no compiler
builds it, or a probe against the fp32 product disagrees."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("aion_train.kernels")

SOURCE = Path(__file__).parent / "cpu" / "bf16_linear.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")
BLOCK = 16  # outputs per block of the packed layout


@dataclass(frozen=True)
class PackedBf16:
    """A [out, in] bf16 weight in the kernel's layout: blocks [ceil(out/16), in/2, 32]."""

    blocks: torch.Tensor
    out_features: int
    in_features: int

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16


def cache_dir() -> Path:
    return Path.home() / ".cache" / "aion-train" / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _build() -> Path:
    """The compiled library (built now unless cached); raises RuntimeError saying why not."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set CC, or install gcc)")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join((cc, *FLAGS)).encode()).hexdigest()[:16]
    out = cache_dir() / f"bf16_linear-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bf16_linear-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"the kernel is x86-64 only (this is {platform.machine()})"
    flags = _cpu_flags()
    if "avx512_bf16" not in flags:
        return None, "the CPU has no AVX512-BF16"
    if "amx_bf16" in flags:
        return None, "the CPU has AMX (oneDNN's AMX kernels are kept)"
    try:
        lib = ctypes.CDLL(str(_build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return None, f"the kernel did not build or load: {e}"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.aion_bf16_pack.argtypes = [ptr, ptr, i64, i64]
    lib.aion_bf16_pack.restype = None
    lib.aion_bf16_linear.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64]
    lib.aion_bf16_linear.restype = None
    return lib, "built"


@functools.cache
def status() -> tuple[bool, str]:
    """(the kernel runs here, why / why not); decided once per process and logged."""
    lib, why = _library()
    if lib is None:
        log.info("bf16 linear kernel: not used (%s)", why)
        return False, why
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 34, generator=g).bfloat16()  # a partial last block, an odd pair count
    x = torch.randn(5, 34, generator=g).bfloat16()
    b = torch.randn(40, generator=g).bfloat16()
    got = linear(x, pack(w), b).float()
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    if not torch.allclose(got, want, rtol=2**-7, atol=1e-3):
        why = f"its probe differs from the fp32 product by {(got - want).abs().max().item():.3g}"
        log.warning("bf16 linear kernel: not used (%s)", why)
        return False, why
    log.info("bf16 linear kernel: AVX512-BF16, probe passed")
    return True, "AVX512-BF16, probe passed"


def available() -> bool:
    return status()[0]


def packable(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[1] % 2 == 0 and weight.shape[1] > 0 and weight.shape[0] > 0


def pack(weight: torch.Tensor) -> PackedBf16:
    """[out, in] weight (in even) -> the kernel's layout (a copy, in bf16)."""
    lib = _library()[0]
    if lib is None:
        raise RuntimeError(f"bf16 linear kernel unavailable: {_library()[1]}")
    if not packable(weight):
        raise ValueError(f"bf16 linear kernel: weight {tuple(weight.shape)} needs [out, in] with an even `in`")
    w = weight.detach().to(torch.bfloat16).contiguous()
    n, k = w.shape
    blocks = torch.empty(((n + BLOCK - 1) // BLOCK, k // 2, 2 * BLOCK), dtype=torch.bfloat16)
    lib.aion_bf16_pack(w.data_ptr(), blocks.data_ptr(), n, k)
    return PackedBf16(blocks, n, k)


def linear(x: torch.Tensor, packed: PackedBf16, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for the packed weight; x [..., in] on the CPU, any float dtype
    (computed in bf16, returned in x's dtype)."""
    lib = _library()[0]
    if x.device.type != "cpu":
        raise ValueError(f"bf16 linear: the kernel runs on the CPU; the input is on {x.device}")
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"bf16 linear: input has {x.shape[-1]} features, the weight {packed.in_features}")
    dtype = x.dtype
    flat = x.reshape(-1, packed.in_features).to(torch.bfloat16).contiguous()
    m = flat.shape[0]
    y = torch.empty((m, packed.out_features), dtype=torch.bfloat16)
    b = None if bias is None else bias.detach().float().contiguous()
    if m:
        lib.aion_bf16_linear(
            flat.data_ptr(),
            flat.stride(0),
            packed.blocks.data_ptr(),
            None if b is None else b.data_ptr(),
            y.data_ptr(),
            packed.out_features,
            m,
            packed.out_features,
            packed.in_features,
        )
    y = y.reshape(*x.shape[:-1], packed.out_features)
    return y if dtype == torch.bfloat16 else y.to(dtype)
