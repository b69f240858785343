"""Continual fine-tuning on newly ingested documents, with or without reservoir replay.

New documents arrive in the continual memory; LoRA adapters on the trained model learn them
(their questions closed-book, so the knowledge goes into the weights, and open-book). With
replay, a fraction of every batch is drawn from the memory's reservoir (Vitter's algorithm R over
the whole stream of stored documents: `ContinualIndex.replay_sample`), one question of each
drawn document; without it, every row is a new document's. What is measured on top is
forgetting: the old documents' open-book accuracy before and after.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from .adapter_training import adam_steps
from .chat_template import render_conversation
from .lora import apply_lora
from .sft import lm_batch

Record = tuple[list[int], list[int]]  # (ids, loss mask) of one rendered conversation


def page_conversations(page, search, noise: int, seed: int, own_text) -> list[list[dict]]:
    """The page's questions twice: open-book (its chunk and `noise` retrieved distractors in the
    <CTX> block, as in SFT) and closed-book (the question alone)."""
    from aion_train.retrieval.open_book import examples_of, open_book_prompt, sft_records

    opened = [r["messages"] for r in sft_records([page], search, noise, seed, own_text=own_text)]
    closed = [
        [{"role": "user", "content": open_book_prompt(e.question)}, {"role": "assistant", "content": e.answer}]
        for e in examples_of(page)
    ]
    return opened + closed


def fine_tune(
    model,
    tokenizer,
    new: Sequence[Record],
    replay: Callable[[int], list[Record]] | None,
    lora_cfg,
    steps: int,
    lr: float,
    batch_size: int = 16,
    replay_fraction: float = 0.5,
    seed: int = 0,
) -> list[float]:
    """LoRA adapters on `model` (base frozen) trained on the answer tokens of `new`; with
    `replay`, round(replay_fraction * batch_size) rows of every batch are replay(m)'s."""
    if not new:
        raise ValueError("fine_tune: no new records")
    if not 0.0 <= replay_fraction < 1.0:
        raise ValueError(f"replay_fraction {replay_fraction}: must be in [0, 1)")
    apply_lora(model, lora_cfg, seed=seed)
    model.eval()  # routed as at inference (dropless MoE); LoRA dropout is lora_cfg's, off here
    rng = random.Random(seed)
    n_replay = round(replay_fraction * batch_size) if replay is not None else 0

    def loss_at(step: int) -> torch.Tensor:
        rows = [new[rng.randrange(len(new))] for _ in range(batch_size - n_replay)]
        if n_replay:
            rows += replay(n_replay)
        ids, labels = lm_batch([r[0] for r in rows], [r[1] for r in rows], tokenizer.pad_id)
        return model(ids, labels=labels).loss

    return adam_steps(model, steps, lr, loss_at)


def render(conversations: Sequence[list[dict]], tokenizer, max_seq_len: int) -> list[Record]:
    """(ids, mask) of each conversation; one longer than the model's context is an error."""
    out = [render_conversation(c, tokenizer) for c in conversations]
    long = [len(ids) for ids, _ in out if len(ids) > max_seq_len + 1]
    if long:
        raise ValueError(f"{len(long)} conversations longer than max_seq_len={max_seq_len} (+1): {long[:5]} tokens")
    return out


__all__ = ["fine_tune", "page_conversations", "render"]
