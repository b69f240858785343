"""One interface for the attention kernel: flash-attn on CUDA when installed, else torch SDPA
(which itself runs a FlashAttention-2 kernel on CUDA). Inputs are [B, T, H, D].

Backends (`model.attention_backend`):
  sdpa   torch's scaled_dot_product_attention, always.
  flash  flash-attn's kernels; an error naming the reason when they cannot run here
         (package missing, tensors not on CUDA, dtype not fp16/bf16). Never a silent fallback.
  auto   flash-attn when it can run, else SDPA; the choice is logged once.

Packed rows (several documents in one row, `segment_ids` 1..k, 0 = pad) come as a
:class:`PackedSegments`: SDPA gets its block-diagonal causal mask (`segment_causal_mask`),
flash-attn its variable-length kernel (`flash_attn_varlen_func`) with `cu_seqlens` from
:func:`varlen_from_segments`, the rows' pieces laid end to end."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .execution import ExecutionPolicy, policy_for

log = logging.getLogger("aion_train.model")

BACKENDS = ("auto", "sdpa", "flash")
FLASH_DTYPES = (torch.float16, torch.bfloat16)


class AttentionBackendError(RuntimeError):
    """model.attention_backend=flash cannot run here; the message says why."""


@functools.cache
def _flash_attn():
    """(flash_attn_func, flash_attn_varlen_func, None) or (None, None, why not)."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # optional GPU extra

        return flash_attn_func, flash_attn_varlen_func, None
    except Exception as e:  # ImportError, or a build that does not match this torch / GPU
        return None, None, f"flash-attn is not importable ({type(e).__name__}: {e}); pip install flash-attn"


def _flash_attn_func():
    return _flash_attn()[0]


@torch.compiler.assume_constant_result  # compiled blocks: a constant of the trace, not traced
def flash_unavailable_reason(device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
    """None when flash-attn can run on tensors of `device` / `dtype` (either may be left out),
    else the reason it cannot."""
    why = _flash_attn()[2]
    if why is not None:
        return why
    if device is not None and torch.device(device).type != "cuda":
        return f"flash-attn runs on CUDA only; the attention inputs are on {torch.device(device).type}"
    if dtype is not None and dtype not in FLASH_DTYPES:
        return (
            f"flash-attn needs fp16 or bf16 inputs, not {str(dtype).replace('torch.', '')} "
            f"(train.precision=bf16 or fp16)"
        )
    return None


_logged: set = set()


def _log_once(key, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """'flash' or 'sdpa' for `model.attention_backend=name` on inputs of this device / dtype.
    'flash' that cannot run raises AttentionBackendError naming the reason."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r}: must be one of {', '.join(BACKENDS)}")
    if name == "sdpa":
        _log_once(("sdpa", "requested"), "attention: torch SDPA (model.attention_backend=sdpa)")
        return "sdpa"
    why = flash_unavailable_reason(device, dtype)
    if name == "flash":
        if why is not None:
            raise AttentionBackendError(
                f"model.attention_backend=flash cannot run: {why}. "
                f"Use model.attention_backend=auto (or sdpa) to run torch SDPA"
            )
        _log_once(("flash", "requested"), "attention: flash-attn (model.attention_backend=flash)")
        return "flash"
    dev = torch.device(device).type
    if why is None:
        _log_once(("auto", "flash", dev, dtype), "attention: flash-attn (auto, %s %s)", dev, dtype)
        return "flash"
    _log_once(("auto", "sdpa", dev, dtype), "attention: torch SDPA (auto on %s %s: %s)", dev, dtype, why)
    return "sdpa"


def check_backend_installed(name: str) -> None:
    """At model build: `flash` without an importable flash-attn fails here, before any data or
    engine is set up (device and dtype are checked at the first forward)."""
    if name == "flash" and _flash_attn()[2] is not None:
        raise AttentionBackendError(
            f"model.attention_backend=flash cannot run: {_flash_attn()[2]}. "
            f"Use model.attention_backend=auto (or sdpa) to run torch SDPA"
        )


# -- packed rows ---------------------------------------------------------------------------------
def segment_causal_mask(segment_ids: torch.Tensor, q_len: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk] mask (True = may attend): key j is visible to query i when both
    carry the same segment id and j <= i. segment_ids: [B, Tk] for all keys (cached + new); the
    queries are the last `q_len` positions. Padding (id 0) forms its own segment, so no row is
    fully masked (SDPA would return NaN for it)."""
    tk = segment_ids.shape[1]
    tq = tk if q_len is None else q_len
    q_seg = segment_ids[:, tk - tq :]
    same = q_seg.unsqueeze(2) == segment_ids.unsqueeze(1)
    causal = torch.ones(tq, tk, dtype=torch.bool, device=segment_ids.device).tril(diagonal=tk - tq)
    return (same & causal).unsqueeze(1)


def varlen_from_segments(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [N + 1], max_seqlen) of flash-attn's variable-length kernels for rows
    [B, T] of segment ids: the B*T tokens laid end to end, one sequence per run of equal ids in
    a row (a row's first column always starts one, so no sequence spans two rows; padding runs
    are sequences of their own). Segments must be contiguous runs, as the loaders make them."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], not {tuple(segment_ids.shape)}")
    b, t = segment_ids.shape
    starts = torch.ones((b, t), dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = starts.reshape(-1).nonzero().squeeze(1)
    end = torch.full((1,), b * t, dtype=first.dtype, device=first.device)
    cu = torch.cat([first, end]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if b * t else 0


class PackedSegments:
    """The segments of packed rows, handed from the model to every attention layer: the SDPA
    mask and flash-attn's cu_seqlens are each built once per forward, on first use."""

    def __init__(self, segment_ids: torch.Tensor, q_len: int | None = None):
        self.segment_ids = segment_ids
        self.q_len = segment_ids.shape[1] if q_len is None else q_len
        self._mask = self._varlen = self._single = None

    @property
    def cached_keys(self) -> bool:
        return self.q_len != self.segment_ids.shape[1]

    def single_segment(self) -> bool:
        """Every row is one segment: the plain causal mask is the same mask."""
        if self._single is None:
            s = self.segment_ids
            self._single = bool((s == s[:, :1]).all())
        return self._single

    def mask(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = segment_causal_mask(self.segment_ids, self.q_len)
        return self._mask

    def varlen(self) -> tuple[torch.Tensor, int]:
        if self._varlen is None:
            self._varlen = varlen_from_segments(self.segment_ids)
        return self._varlen


def _flash_varlen(q, k, v, packed: PackedSegments) -> torch.Tensor:
    b, t = q.shape[:2]
    cu, max_len = packed.varlen()
    fn = _flash_attn()[1]
    out = fn(
        q.reshape(b * t, *q.shape[2:]),
        k.reshape(b * t, *k.shape[2:]),
        v.reshape(b * t, *v.shape[2:]),
        cu,
        cu,
        max_len,
        max_len,
        causal=True,
    )
    return out.reshape(b, t, *out.shape[1:])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    backend: str = "auto",
    attn_mask=None,
    execution: ExecutionPolicy | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with grouped KV heads. Returns [B, T, Hq, D].

    `causal` with Tq < Tk (decoding with a KV cache) aligns the mask to the end of the keys.
    `attn_mask`: None; a boolean tensor broadcastable to [B, Hq, Tq, Tk] (True = may attend)
    that replaces the causal mask and runs through SDPA; or a :class:`PackedSegments` (packed
    rows, causal within each segment): flash-attn's varlen kernel when the flash backend runs
    and there is no KV cache, else SDPA with the block-diagonal mask (the plain causal kernel
    when every row is a single segment: the same mask)."""
    packed = attn_mask if isinstance(attn_mask, PackedSegments) else None
    if packed is not None:
        which = resolve_backend(backend, q.device, q.dtype)
        if which == "flash" and not packed.cached_keys:
            return _flash_varlen(q, k, v, packed)
        if which == "flash":
            _log_once(
                ("packed-cache-sdpa",),
                "attention: packed rows with a KV cache run through SDPA "
                "(flash-attn's varlen kernel takes no cache here)",
            )
        attn_mask = None if packed.single_segment() else packed.mask()
    elif attn_mask is None:
        which = resolve_backend(backend, q.device, q.dtype)
        if which == "flash":
            return _flash_attn_func()(q, k, v, causal=causal)
    out_dtype = q.dtype
    # ExecutionPolicy.attention_fp32 (the CPU: torch's CPU kernel is slower in bf16 than in fp32,
    # and fp32 is the more exact result; autograd then keeps fp32 q, k, v and output)
    if policy_for(execution, q.device).attention_fp32 and q.dtype in (torch.bfloat16, torch.float16):
        q, k, v = q.float(), k.float(), v.float()
    gqa = q.shape[2] != k.shape[2]  # grouped KV heads: SDPA maps q head i to kv head i // group
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    tq, tk = q.shape[2], k.shape[2]
    if attn_mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    elif causal and tq == tk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif causal and tq > 1:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return out.transpose(1, 2).to(out_dtype)
