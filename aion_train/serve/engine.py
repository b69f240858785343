"""KV-cached generation for a batch of rows (choices), each with its own prompt, sampling
parameters, random stream and length limit.

Rows of different prompt lengths share one forward pass: prompts are left-padded, padding
gets segment id 0 and every real token segment 1 (`segment_ids`, which the model turns into
a block-diagonal causal mask over the KV cache), and each row's RoPE positions start at 0
(`position_ids`), so a row attends exactly to its own tokens at its own positions. When all
rows have the same length no mask is passed at all: that is the plain causal path of
`aion_train.model.generate`, and greedy output equals it token for token. A finished row is
dropped from the batch (its cache rows are cut out); padding columns that no remaining row
needs are cut too, so a batch that becomes even goes back to the plain path.

Each row reports every generated token to its `sink(token_id, info)`, which returns True to
stop the row (a stop string, a cancelled request), and its end to `on_finish(row)` as soon as
it ends (not when the whole batch does). End-of-sequence ids end a row without being
reported. The engine holds no lock: one thread runs it (see scheduler.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aion_train.model.kv_cache import KVCache

from .sampling import SamplingParams, sample_next, top_logprobs


@dataclass
class TokenInfo:
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Row:
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    generator: torch.Generator | None = None
    sink: Callable[[int, TokenInfo | None], bool] | None = None
    on_finish: Callable[[Row], None] | None = None  # called once, when the row ends
    prompt_logprobs: bool = False  # echo with logprobs: score the prompt tokens too
    # results
    tokens: list[int] = field(default_factory=list)
    infos: list[TokenInfo | None] = field(default_factory=list)
    prompt_infos: list[TokenInfo | None] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    first_token_at: float | None = None


class Engine:
    def __init__(self, model, eos_ids, vocab_size: int | None = None):
        self.model = model
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.model_vocab = int(model.cfg.vocab_size)
        # ids the tokenizer cannot decode are never chosen
        self.vocab_size = self.model_vocab if vocab_size is None else min(int(vocab_size), self.model_vocab)
        self.device = next(model.parameters()).device
        self.max_seq_len = int(model.cfg.max_seq_len)

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.vocab_size < self.model_vocab:
            logits[..., self.vocab_size :] = float("-inf")
        return logits

    @torch.no_grad()
    def run(self, rows: list[Row]) -> list[Row]:
        """Generate for every row (in place); returns the rows."""
        active = [r for r in rows if r.finish_reason is None]
        for r in active:
            if not r.prompt_ids:
                raise ValueError("a row needs at least one prompt token")
        if not active:
            return rows
        b = len(active)
        lengths = [len(r.prompt_ids) for r in active]
        t = max(lengths)
        ragged = len(set(lengths)) > 1
        ids = torch.zeros((b, t), dtype=torch.long, device=self.device)
        seg = torch.zeros((b, t), dtype=torch.long, device=self.device)
        pos = torch.zeros((b, t), dtype=torch.long, device=self.device)
        for i, r in enumerate(active):
            n = lengths[i]
            ids[i, t - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            seg[i, t - n :] = 1
            pos[i, t - n :] = torch.arange(n)
        cache = KVCache(len(self.model.blocks))
        out = self.model(ids, kv_cache=cache, segment_ids=seg if ragged else None, position_ids=pos if ragged else None)
        logits = out.logits
        for i, r in enumerate(active):
            if r.prompt_logprobs:
                self._score_prompt(r, logits[i, t - lengths[i] :])
        last = self._mask(logits[:, -1])
        next_pos = torch.tensor(lengths, dtype=torch.long, device=self.device)
        rows_idx = list(range(b))  # position in the batch -> index into `active`
        while True:
            keep: list[int] = []
            nxt = torch.zeros((len(rows_idx), 1), dtype=torch.long, device=self.device)
            for j, ai in enumerate(rows_idx):
                r = active[ai]
                if len(r.tokens) >= r.max_new:
                    _finish(r, "length")
                    continue
                tok = sample_next(last[j], r.params, r.generator)
                if r.first_token_at is None:
                    r.first_token_at = time.monotonic()
                if tok in self.eos_ids:
                    _finish(r, "stop")
                    continue
                info = None
                if r.params.logprobs is not None:
                    lp, top = top_logprobs(last[j], r.params.logprobs)
                    info = TokenInfo(float(lp[tok]), top)
                r.tokens.append(tok)
                r.infos.append(info)
                stop = r.sink(tok, info) if r.sink is not None else False
                if stop:
                    _finish(r, "stop")
                    continue
                # the token just chosen sits at position next_pos[j]; feeding it needs room
                if len(r.tokens) >= r.max_new or int(next_pos[j]) >= self.max_seq_len:
                    _finish(r, "length")
                    continue
                nxt[j, 0] = tok
                keep.append(j)
            if not keep:
                break
            if len(keep) < len(rows_idx):
                sel = torch.tensor(keep, dtype=torch.long, device=self.device)
                for layer in range(len(cache.keys)):
                    cache.keys[layer] = cache.keys[layer].index_select(0, sel)
                    cache.values[layer] = cache.values[layer].index_select(0, sel)
                seg, nxt, next_pos = seg.index_select(0, sel), nxt.index_select(0, sel), next_pos.index_select(0, sel)
                rows_idx = [rows_idx[j] for j in keep]
                # drop padding columns that no remaining row needs
                real = (seg != 0).any(0)
                first = int(real.nonzero()[0]) if bool(real.any()) else 0
                if first > 0:
                    seg = seg[:, first:]
                    for layer in range(len(cache.keys)):
                        cache.keys[layer] = cache.keys[layer][:, first:]
                        cache.values[layer] = cache.values[layer][:, first:]
                ragged = bool((seg == 0).any())
            seg = torch.cat([seg, torch.ones((len(rows_idx), 1), dtype=torch.long, device=self.device)], dim=1)
            out = self.model(
                nxt,
                kv_cache=cache,
                segment_ids=seg if ragged else None,
                position_ids=next_pos.unsqueeze(1) if ragged else None,
            )
            next_pos = next_pos + 1
            last = self._mask(out.logits[:, -1])
        return rows

    def run_guarded(self, rows: list[Row]) -> list[Row]:
        """`run`, and every row that has not ended when it raises ends as "error"."""
        try:
            return self.run(rows)
        except BaseException:
            for r in rows:
                if r.finish_reason is None:
                    r.finish_reason = "error"
            raise

    def _score_prompt(self, r: Row, logits: torch.Tensor) -> None:
        """log p(prompt[t] | prompt[:t]) for t >= 1 (None for the first token)."""
        k = r.params.logprobs or 0
        lp_all = torch.log_softmax(self._mask(logits), dim=-1)
        infos: list[TokenInfo | None] = [None]
        for i in range(1, len(r.prompt_ids)):
            row = lp_all[i - 1]
            top = []
            if k > 0:
                vals, ids = torch.topk(row, min(k, row.shape[-1]))
                top = [(int(a), float(v)) for a, v in zip(ids, vals)]
            infos.append(TokenInfo(float(row[r.prompt_ids[i]]), top))
        r.prompt_infos = infos


def _finish(r: Row, reason: str) -> None:
    r.finish_reason = reason
    if r.on_finish is not None:
        r.on_finish(r)
