"""Held-out multimodal evaluations.

- easy-vqa: each held-out (image, question) is rendered as in training
  (``<I> pad*R </I> <T> question``) and the 13 closed answers are scored by their summed
  log-probability including the closing ``</T>`` (so an answer must be complete); accuracy
  against the majority baseline (always answering the held-out set's most frequent answer).
- retrieval: image -> caption over the distinct held-out captions, by the cosine of the
  contrastive embeddings; recall@1 / @5 next to chance (k / number of distinct captions).
"""

from __future__ import annotations

from collections import Counter

import torch

from aion_train.parallel.device import module_device, to_device


def _vqa_prompt(model, tok, items: list[dict]) -> dict:
    mm = model.mm
    o_i, c_i, o_t = tok.special_id("<I>"), tok.special_id("</I>"), tok.special_id("<T>")
    rows = [[o_i] + [mm.pad_id] * mm.resampler_queries + [c_i, o_t] + tok.encode(it["question"]) for it in items]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), mm.pad_id, dtype=torch.long)
    seg = torch.zeros_like(ids)
    modality = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        seg[b, : len(r)] = 1
        modality[b, 1 : 1 + mm.resampler_queries] = 1
    return {
        "input_ids": ids,
        "segment_ids": seg,
        "modality": modality,
        "image": torch.stack([it["image"] for it in items]).float(),
    }


@torch.no_grad()
def vqa_accuracy(model, tok, items: list[dict], answers: list[str], batch_size: int = 64) -> dict:
    close_t = tok.special_id("</T>")
    cands = [tok.encode(a) + [close_t] for a in answers]
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompt = to_device(_vqa_prompt(model, tok, chunk), module_device(model))
        scores = model.answer_logprobs(prompt, cands)
        pred = scores.argmax(1).tolist()
        correct += sum(answers[p] == it["answer"] for p, it in zip(pred, chunk))
    counts = Counter(it["answer"] for it in items)
    majority, freq = counts.most_common(1)[0]
    n = len(items)
    return {"accuracy": correct / n, "majority_baseline": freq / n, "majority_answer": majority, "n": n}


def true_ranks(sims: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Rank of the true column in each row of `sims` [N, C], 0 = best. Ties count against
    it (every other column scoring >= the true one is ahead), so only a strictly higher
    score is a hit: collapsed embeddings (all scores equal) rank last, not first."""
    true_sim = sims.gather(1, truth[:, None])
    return (sims >= true_sim).sum(1) - 1


@torch.no_grad()
def caption_retrieval(model, tok, pairs: list[dict], batch_size: int = 128) -> dict:
    captions = sorted({p["caption"] for p in pairs})
    index = {c: i for i, c in enumerate(captions)}
    pad = model.mm.pad_id
    enc = [tok.encode(c) for c in captions]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
    device = module_device(model)
    text = torch.nn.functional.normalize(model.encode_text(ids.to(device)).float(), dim=-1)
    ranks = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        img = torch.stack([p["image"] for p in chunk]).float().to(device)
        img = torch.nn.functional.normalize(model.encode_image(img), dim=-1)
        sims = img @ text.T
        truth = torch.tensor([index[p["caption"]] for p in chunk], device=device)
        ranks += true_ranks(sims, truth).tolist()
    ranks_t = torch.tensor(ranks)
    n_c = len(captions)
    return {
        "recall_at_1": float((ranks_t < 1).float().mean()),
        "recall_at_5": float((ranks_t < 5).float().mean()),
        "chance_at_1": 1.0 / n_c,
        "chance_at_5": min(5, n_c) / n_c,
        "n": len(pairs),
        "n_captions": n_c,
    }
