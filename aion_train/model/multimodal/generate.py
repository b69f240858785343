"""Generation and answer scoring for the multimodal model, on the existing KV cache.

Per-modality media caches: each kind's items are encoded once (encoder -> resampler -> gated
projection, `MultimodalModel.encode_media`) into a {kind: tokens} cache that any number of
prompts over the same media can reuse. At generation time those caches are merged into the
one fused prompt, the prompt is prefilled into a `KVCache`, and decoding continues token by
token through `aion_train.model.generate` (text tokens only; the media live in the cache).
"""

from __future__ import annotations

import torch

from ..generate import generate
from ..kv_cache import KVCache


def _cross_context(model):
    return model.cross_attn[0].context if len(model.cross_attn) else None


def _set_cross_context(model, ctx) -> None:
    for layer in model.cross_attn:
        layer.context = ctx


def _single_segment_prompt(batch: dict) -> dict:
    seg = batch.get("segment_ids")
    if seg is not None and not bool((seg == 1).all()):
        raise ValueError(
            "generate: every prompt row must be one unpadded segment (segment_ids all 1); "
            "generate rows of different lengths separately"
        )
    return {k: v for k, v in batch.items() if k not in ("segment_ids", "position_ids")}


class _PrefilledTrunk:
    """What `aion_train.model.generate` drives: the first call (empty cache) prefills the fused
    media prompt; later calls decode text tokens against the cache."""

    def __init__(self, model, prompt: dict, media: dict):
        self.model, self.prompt, self.media = model, prompt, media
        self.blocks = model.lm.blocks
        self.ctx = None

    def __call__(self, input_ids: torch.Tensor, kv_cache: KVCache):
        if kv_cache.length == 0:
            out = self.model.run_trunk(self.prompt, self.media, kv_cache)
            self.ctx = _cross_context(self.model)
            return out
        if self.ctx is not None:
            start = kv_cache.length
            q_pos = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            _set_cross_context(self.model, self.ctx.for_queries(torch.ones_like(input_ids), q_pos))
        return self.model.lm(input_ids, kv_cache=kv_cache)


@torch.no_grad()
def generate_multimodal(
    model,
    batch_prompt: dict,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    gather_logits=None,
    media: dict | None = None,
) -> torch.Tensor:
    """[B, T + new] tokens after equal-length media prompts (input_ids, modality, image/audio/video).
    `media`: a cache from `model.encode_media` to reuse; computed here when None."""
    prompt = _single_segment_prompt(batch_prompt)
    media = model.encode_media(prompt) if media is None else media
    return generate(
        _PrefilledTrunk(model, prompt, media),
        prompt["input_ids"],
        max_new_tokens,
        temperature,
        eos_id,
        generator,
        gather_logits,
    )


def _expand_cache(cache: KVCache, repeat: int) -> KVCache:
    return KVCache.from_tensors(
        [k.repeat_interleave(repeat, dim=0) for k in cache.keys],
        [v.repeat_interleave(repeat, dim=0) for v in cache.values],
    )


@torch.no_grad()
def score_candidates(
    model, batch_prompt: dict, candidates: list[list[int]], gather_logits=None, media: dict | None = None
) -> torch.Tensor:
    """[B, C]: sum_l log P(candidate_c[l] | prompt_b, candidate_c[:l]) for closed-set answers
    (e.g. easy-vqa's 13). Prompts may be right-padded (segment_ids 1 on real tokens, 0 on pad).
    The prompt is prefilled once; its KV cache is copied per candidate and the candidates run as
    one cached batch. `gather_logits` turns vocab-shard logits into full ones under TP."""
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("score_candidates: need at least one candidate, each with >= 1 token")
    ids = batch_prompt["input_ids"]
    b, dev = ids.shape[0], ids.device
    seg = batch_prompt.get("segment_ids")
    seg = torch.ones_like(ids) if seg is None else seg
    lengths = (seg > 0).sum(1)
    if (
        bool((lengths == 0).any())
        or not bool((seg[:, :1] > 0).all())
        or not bool(((seg > 0).long().diff(dim=1) <= 0).all())
    ):
        raise ValueError("score_candidates: each prompt row must be real tokens followed by padding")
    gather = gather_logits or (lambda x: x)
    media = model.encode_media(batch_prompt) if media is None else media
    cache = KVCache(len(model.lm.blocks))
    prompt = dict(batch_prompt, segment_ids=(seg > 0).long())
    prompt.pop("position_ids", None)
    out = model.run_trunk(prompt, media, cache)
    last = gather(out.logits[torch.arange(b, device=dev), lengths - 1]).float().log_softmax(-1)  # [B, V]
    n_c, width = len(candidates), max(len(c) for c in candidates)
    pad = model.mm.pad_id
    cand = torch.tensor([c + [pad] * (width - len(c)) for c in candidates], device=dev)
    cand_len = torch.tensor([len(c) for c in candidates], device=dev)
    total = last[:, cand[:, 0]]  # [B, C]
    if width == 1:
        return total
    steps = cand[:, :-1].repeat(b, 1)  # row b*C + c
    key_seg = torch.cat([prompt["segment_ids"].repeat_interleave(n_c, 0), torch.ones_like(steps)], dim=1)
    pos = lengths.repeat_interleave(n_c)[:, None] + torch.arange(width - 1, device=dev)
    ctx = _cross_context(model)
    if ctx is not None:
        _set_cross_context(model, ctx.for_queries(torch.ones_like(steps), pos, repeat=n_c))
    logits = gather(
        model.lm(steps, kv_cache=_expand_cache(cache, n_c), segment_ids=key_seg, position_ids=pos).logits
    ).float()
    logp = logits.log_softmax(-1).gather(-1, cand[:, 1:].repeat(b, 1).unsqueeze(-1)).squeeze(-1)
    keep = torch.arange(1, width, device=dev)[None, :] < cand_len.repeat(b)[:, None]
    return total + (logp * keep).sum(1).view(b, n_c)
