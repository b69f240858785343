"""KV-cached autoregressive generation (greedy or sampled)."""

from __future__ import annotations

from collections.abc import Collection

import torch

from .kv_cache import KVCache


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_id: int | Collection[int] | None = None,
    generator: torch.Generator | None = None,
    gather_logits=None,
) -> torch.Tensor:
    """Returns [B, T + new]. `gather_logits` turns a vocab shard into full logits under TP.
    `generator` may be a CPU generator for a model on the GPU (sampling then draws on the CPU).
    `eos_id`: one id or several; a row is finished at the first of them and padded after it
    with the smallest of them; generation stops when every row is finished."""
    cache = KVCache(len(model.blocks))
    tokens = input_ids
    step_input = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    stop = None
    if eos_id is not None:
        ids = sorted({int(eos_id)} if isinstance(eos_id, int) else {int(i) for i in eos_id})
        stop = torch.tensor(ids, dtype=torch.long, device=input_ids.device) if ids else None
    for _ in range(max_new_tokens):
        logits = model(step_input, kv_cache=cache).logits[:, -1]
        if gather_logits is not None:
            logits = gather_logits(logits)
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            if generator is not None and generator.device != probs.device:
                # a CPU generator (seeded alike on every TP rank) with logits on the GPU: draw
                # on the CPU so that the draws are the generator's whatever the device
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
            else:
                nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        if stop is not None:
            nxt = torch.where(done.unsqueeze(1), stop[0], nxt)
            done |= torch.isin(nxt.squeeze(1), stop)
        tokens = torch.cat([tokens, nxt], dim=1)
        step_input = nxt
        if stop is not None and bool(done.all()):
            break
    return tokens
