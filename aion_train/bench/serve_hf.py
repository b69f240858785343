"""The `transformers` side of `bench serve`, in its own process: torch's thread pools are
per thread and libgomp throttles its spin-wait when a process holds more pool threads than
cores, so `generate` beside another pool would run slower than it does alone (docs/notes.md). Each model is read from its HF folder; jobs time `generate` on batches of
the clients' prompts."""

from __future__ import annotations

import time

import torch


def hf_generate(hf, prompts: list[list[int]], clients: int, per_client: int, new_tokens: int) -> float:
    """tokens/s of `generate` on per_client batches of `clients` prompts (the clients' prompts),
    exactly `new_tokens` new tokens each."""
    n = clients * per_client
    ids = torch.tensor([prompts[i % len(prompts)] for i in range(n)])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(per_client):
            batch = ids[b * clients : (b + 1) * clients]
            out = hf.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
            if out.shape[1] != batch.shape[1] + new_tokens:
                raise RuntimeError(f"generate returned {out.shape[1] - batch.shape[1]} new tokens, not {new_tokens}")
    return n * new_tokens / (time.perf_counter() - t0)


def hf_worker(conn, folders: dict[str, tuple[str, str]], threads: int) -> None:
    """Load {name: (folder, "bf16" | "fp32")}, then answer hf_generate jobs
    ({"model": name, **hf_generate's arguments}) sent over a Pipe until None arrives."""
    from transformers import MixtralForCausalLM

    torch.set_num_threads(threads)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    models = {
        name: MixtralForCausalLM.from_pretrained(path, dtype=dtypes[dt], attn_implementation="sdpa").eval()
        for name, (path, dt) in folders.items()
    }
    conn.send(("ok", sorted(models)))
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(("ok", hf_generate(models[job.pop("model")], **job)))
        except Exception as e:  # noqa: BLE001  (reported to the bench, which raises it)
            conn.send(("error", f"{type(e).__name__}: {e}"))
