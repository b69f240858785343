"""Perplexity of a text checkpoint on held-out documents: exp(mean next-token NLL).

Each document is ``<s> tokens </s>``, cut into windows of ``seq_len + 1`` tokens that overlap by
one (every token after the first is predicted exactly once, from at most ``seq_len`` tokens of
its own document); windows are right-padded into batches, and padded targets are not counted."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F


def windows(ids: list[int], seq_len: int) -> Iterator[list[int]]:
    for start in range(0, max(len(ids) - 1, 0), seq_len):
        yield ids[start : start + seq_len + 1]


@torch.no_grad()
def perplexity(
    model, tokenizer, texts: Iterable[str], seq_len: int, batch_size: int = 8, limit: int | None = None
) -> dict:
    device = next(model.parameters()).device
    nll, n_tokens, n_docs = 0.0, 0, 0
    batch: list[list[int]] = []

    def run(rows: list[list[int]]) -> tuple[float, int]:
        width = max(len(r) for r in rows) - 1
        inp = torch.full((len(rows), width), int(tokenizer.pad_id), dtype=torch.long)
        tgt = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            inp[i, : len(r) - 1] = torch.tensor(r[:-1])
            tgt[i, : len(r) - 1] = torch.tensor(r[1:])
        logits = model(input_ids=inp.to(device)).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.to(device).flatten(), ignore_index=-100, reduction="sum")
        return float(loss), int((tgt != -100).sum())

    for text in texts:
        if limit is not None and n_docs >= limit:
            break
        n_docs += 1
        ids = [int(tokenizer.bos_id), *tokenizer.encode(text), int(tokenizer.eos_id)]
        for w in windows(ids, seq_len):
            batch.append(w)
            if len(batch) == batch_size:
                s, n = run(batch)
                nll, n_tokens, batch = nll + s, n_tokens + n, []
    if batch:
        s, n = run(batch)
        nll, n_tokens = nll + s, n_tokens + n
    if n_tokens == 0:
        raise ValueError("perplexity: the data holds no text")
    loss = nll / n_tokens
    return {"perplexity": math.exp(loss), "tokens": n_tokens, "loss": loss, "documents": n_docs}
