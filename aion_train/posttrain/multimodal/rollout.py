"""Generation over media prompts, rollout sequences and held-out accuracy for the multimodal
phases. Prompts are batched by equal length (the trunk has no padding mask at prefill); each
batch's media are encoded once (`models.media_tokens`, cached per item when the media path is
frozen) and the KV-cached decode continues on text tokens only (`MultimodalModel.generate`)."""

from __future__ import annotations

import torch

from aion_train.parallel.collectives import gather_last
from aion_train.parallel.device import module_device

from ..common import accuracy_by_kind
from ..rollout import build_sequences
from .models import _mm, media_tokens
from .task import is_correct


def row_context(examples, width: int) -> dict:
    """The context of rows whose prompts are `examples`' (sequence width `width`)."""
    modality = torch.zeros(len(examples), width, dtype=torch.long)
    for b, e in enumerate(examples):
        modality[b, : len(e.prompt.modality)] = torch.tensor(e.prompt.modality)
    return {"modality": modality, "media": [e.prompt.media for e in examples]}


@torch.no_grad()
def generate_responses(
    model, examples, max_new_tokens: int, end_id: int, groups=None, temperature: float = 0.0, generator=None
) -> list:
    """New ids after each example's media prompt; each keeps its end id if produced (nothing after)."""
    mm = _mm(model)
    tp = None if groups is None or groups.tp == 1 else groups.tp_group
    gather = (lambda lg: gather_last(lg, tp)) if tp is not None else None
    was = mm.training
    mm.eval()
    by_len: dict = {}
    for i, e in enumerate(examples):
        by_len.setdefault(len(e.prompt_ids), []).append(i)
    out: list = [None] * len(examples)
    dev = module_device(mm)
    for length in sorted(by_len):
        idx = by_len[length]
        for s in range(0, len(idx), 64):
            chunk = idx[s : s + 64]
            rows = [examples[i] for i in chunk]
            ctx = row_context(rows, length)
            prompt = {
                "input_ids": torch.tensor([e.prompt_ids for e in rows], device=dev),
                "modality": ctx["modality"].to(dev),
            }
            toks = mm.generate(
                prompt,
                max_new_tokens,
                temperature=temperature,
                eos_id=end_id,
                generator=generator,
                gather_logits=gather,
                media=media_tokens(mm, ctx["media"]),
            )[:, length:].tolist()
            for i, row in zip(chunk, toks):
                out[i] = row[: row.index(end_id) + 1] if end_id in row else row
    mm.train(was)
    return out


def sequences(task, examples, responses):
    """(input_ids, resp_pos, resp_tokens, resp_mask) of prompt + response rows and their context
    (modality, media, lengths: real tokens per row)."""
    prompts = [e.prompt_ids for e in examples]
    seqs = build_sequences(prompts, responses, task.pad_id)
    ctx = row_context(examples, seqs[0].shape[1])
    ctx["lengths"] = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)])
    return seqs, ctx


@torch.no_grad()
def evaluate_accuracy(model, task, examples, max_new_tokens: int, groups=None) -> dict:
    """Greedy answers checked exactly: {"accuracy", "n", "by_kind"}; examples split over the
    data-parallel ranks, counts summed over them."""
    dp, dp_rank = (1, 0) if groups is None else (groups.dp, groups.dp_rank)
    mine = examples[dp_rank::dp]
    gen = generate_responses(model, mine, max_new_tokens, task.end_id, groups)
    return accuracy_by_kind(examples, mine, [is_correct(e, task.decode(ids)) for e, ids in zip(mine, gen)], groups)
