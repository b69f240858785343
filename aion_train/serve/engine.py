"""KV-cached generation for a changing batch of rows (choices), each with its own prompt,
sampling parameters, random stream and length limit (continuous batching: scheduler.py).

`prefill(rows)` runs new prompts as one forward pass: they are left-padded, padding gets
segment id 0 and every real token segment 1 (`segment_ids`, which the model turns into a
causal mask per row over the KV cache), and each row's RoPE positions start at 0
(`position_ids`), so a row attends exactly to its own tokens at its own positions; only the
last position's logits are computed (all of them for a row that scores its prompt). `merge`
joins two batches between steps (the narrower cache is left-padded, masked the same way), and
`step` picks one token per row from its last logits and runs one decode forward for the rows
that go on. A finished row leaves the batch at once (its cache rows are cut out), and padding
columns no remaining row needs are cut too; when all rows have the same length no mask is
passed at all: the plain causal path of `aion_train.model.generate`, and greedy output equals
it token for token. `run(rows)` is prefill then steps until every row has ended.

Each row reports every generated token to its `sink(token_id, info)`, which returns True to
stop the row (a stop string, a cancelled request), and its end to `on_finish(row)` as soon as
it ends. End-of-sequence ids end a row without being reported.

A multimodal model: a row may carry `modality` and `media`; the prefill then runs the text
trunk on embeddings with each row's media tokens at its placeholders (media_rows.py; encoded
once per content hash, media.py), next to text rows, with the same masking; decode steps are
text tokens (cross-attention layers, if any, get each row's media at every step). The engine holds no lock: one
thread runs it (see scheduler.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aion_train.model.execution import ExecutionPolicy, apply_execution_policy
from aion_train.model.kv_cache import KVCache
from aion_train.model.packed_weights import pack_weights

from .media_rows import MediaRows
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
    # a multimodal prompt: per prompt token 0 (text) or 1/2/3 (a placeholder of image/audio/
    # video), and its media (serve.media.MediaInput) in placeholder order
    modality: list[int] | None = None
    media: list | None = None


@dataclass
class Batch:
    """Rows decoding together: their KV cache (left-padded to one width), segment ids over
    the cached columns (0 = padding), each row's next position and last logits."""

    rows: list[Row]
    cache: KVCache
    seg: torch.Tensor  # [B, L]
    next_pos: torch.Tensor  # [B]
    last: torch.Tensor  # [B, V] fp32, masked
    # cross-attention: (kv [B, K, D], kv_pos [B, K], then each layer's projected K/V [B, K, 2D])
    media_ctx: tuple[torch.Tensor, ...] | None = None

    @property
    def ragged(self) -> bool:
        return bool((self.seg == 0).any())


class Engine:
    def __init__(self, model, eos_ids, vocab_size: int | None = None, execution: ExecutionPolicy | None = None):
        """`execution`: how the model computes (default: its device's policy for generation,
        `ExecutionPolicy.for_generation`); given to the model's modules here."""
        self.model = model
        # a multimodal model: its text trunk runs the batch, media tokens enter at the prefill
        self.trunk = getattr(model, "lm", model)
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.model_vocab = int(model.cfg.vocab_size)
        # ids the tokenizer cannot decode are never chosen
        self.vocab_size = self.model_vocab if vocab_size is None else min(int(vocab_size), self.model_vocab)
        p = next(model.parameters())
        self.device = p.device
        self.media = MediaRows(model, p.device)
        self.media_cache = self.media.cache  # None: a text-only model
        self.max_seq_len = int(model.cfg.max_seq_len)
        # keys/values kept in the precision the attention computes in (cast once, when written)
        self.execution = execution or ExecutionPolicy.for_device(p.device.type).for_generation()
        apply_execution_policy(model, self.execution)
        if self.execution.packed_weights:
            pack_weights(model)
        half = p.dtype in (torch.bfloat16, torch.float16)
        self.cache_dtype = torch.float32 if half and self.execution.attention_fp32 else None

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.vocab_size < self.model_vocab:
            logits[..., self.vocab_size :] = float("-inf")
        return logits

    @torch.no_grad()
    def run(self, rows: list[Row]) -> list[Row]:
        """Generate for every row (in place); returns the rows."""
        batch = self.prefill(rows)
        while batch is not None:
            batch = self.step(batch)
        return rows

    def run_guarded(self, rows: list[Row]) -> list[Row]:
        """`run`, and every row that has not ended when it raises ends as "error"."""
        try:
            return self.run(rows)
        except BaseException:
            fail_rows(rows)
            raise

    @torch.no_grad()
    def prefill(self, rows: list[Row]) -> Batch | None:
        """The prompts of `rows` through the model: a batch ready for `step` (None: no row)."""
        active = [r for r in rows if r.finish_reason is None]
        for r in active:
            if not r.prompt_ids:
                raise ValueError("a row needs at least one prompt token")
        if not active:
            return None
        b = len(active)
        lengths = [len(r.prompt_ids) for r in active]
        t = max(lengths)
        ragged = len(set(lengths)) > 1
        ids = torch.zeros((b, t), dtype=torch.long)
        seg = torch.zeros((b, t), dtype=torch.long)
        pos = torch.zeros((b, t), dtype=torch.long)
        for i, r in enumerate(active):
            n = lengths[i]
            ids[i, t - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            seg[i, t - n :] = 1
            pos[i, t - n :] = torch.arange(n)
        ids, seg, pos = (x.to(self.device) for x in (ids, seg, pos))
        scoring = any(r.prompt_logprobs for r in active)
        cache = KVCache(len(self.trunk.blocks), self.cache_dtype)
        embeds, modality, media_ctx = self.media.inputs(active, ids, self.trunk.embed_tokens)
        self.media.set_context(media_ctx, seg, pos)
        out = self.trunk(
            None if embeds is not None else ids,
            inputs_embeds=embeds,
            modality=modality,
            kv_cache=cache,
            segment_ids=seg if ragged else None,
            position_ids=pos if ragged else None,
            logits_to_keep=None if scoring else 1,
        )
        logits = out.logits
        for i, r in enumerate(active):
            if r.prompt_logprobs:
                self._score_prompt(r, logits[i, t - lengths[i] :])
        next_pos = torch.tensor(lengths, dtype=torch.long, device=self.device)
        return Batch(active, cache, seg, next_pos, self._mask(logits[:, -1]), media_ctx)

    def merge(self, a: Batch | None, b: Batch | None) -> Batch | None:
        """One batch of the rows of both (a's first)."""
        if a is None or b is None:
            return a if b is None else b
        wa, wb = a.seg.shape[1], b.seg.shape[1]
        for x, extra in ((a, wb - wa), (b, wa - wb)):
            if extra > 0:
                x.cache.left_pad(extra)
                x.seg = torch.cat([x.seg.new_zeros((x.seg.shape[0], extra)), x.seg], dim=1)
        a.cache.cat_rows(b.cache)
        ctx = MediaRows.merge(a.media_ctx, b.media_ctx)
        return Batch(
            a.rows + b.rows,
            a.cache,
            torch.cat([a.seg, b.seg]),
            torch.cat([a.next_pos, b.next_pos]),
            torch.cat([a.last, b.last]),
            ctx,
        )

    @torch.no_grad()
    def step(self, batch: Batch) -> Batch | None:
        """One token for every row of `batch`; the batch of the rows that go on (None: none)."""
        rows, last = batch.rows, batch.last
        greedy = [r.params.greedy for r in rows]
        picks = last.argmax(-1).tolist() if any(greedy) else None
        now = time.monotonic()
        keep: list[int] = []
        nxt: list[int] = []
        for j, r in enumerate(rows):
            if len(r.tokens) >= r.max_new:
                _finish(r, "length")
                continue
            tok = picks[j] if greedy[j] else sample_next(last[j], r.params, r.generator)
            if r.first_token_at is None:
                r.first_token_at = now
            if tok in self.eos_ids:
                _finish(r, "stop")
                continue
            info = None
            if r.params.logprobs is not None:
                lp, top = top_logprobs(last[j], r.params.logprobs)
                info = TokenInfo(float(lp[tok]), top)
            r.tokens.append(tok)
            r.infos.append(info)
            if r.sink is not None and r.sink(tok, info):
                _finish(r, "stop")
                continue
            # the token just chosen sits at position next_pos[j]; feeding it needs room
            if len(r.tokens) >= r.max_new or int(batch.next_pos[j]) >= self.max_seq_len:
                _finish(r, "length")
                continue
            keep.append(j)
            nxt.append(tok)
        if not keep:
            return None
        cache, seg, next_pos, media_ctx = batch.cache, batch.seg, batch.next_pos, batch.media_ctx
        if len(keep) < len(rows):
            sel = torch.tensor(keep, dtype=torch.long, device=self.device)
            cache.select_rows(sel)
            media_ctx = MediaRows.select(media_ctx, sel)
            seg, next_pos = seg.index_select(0, sel), next_pos.index_select(0, sel)
            # drop padding columns that no remaining row needs
            real = (seg != 0).any(0)
            first = int(real.nonzero()[0]) if bool(real.any()) else 0
            if first > 0:
                seg = seg[:, first:]
                cache.drop_leading(first)
        seg = torch.cat([seg, seg.new_ones((len(keep), 1))], dim=1)
        ragged = bool((seg == 0).any())
        self.media.set_context(media_ctx, seg.new_ones((len(keep), 1)), next_pos.unsqueeze(1))
        out = self.trunk(
            torch.tensor(nxt, dtype=torch.long, device=self.device).unsqueeze(1),
            kv_cache=cache,
            segment_ids=seg if ragged else None,
            position_ids=next_pos.unsqueeze(1) if ragged else None,
        )
        return Batch([rows[j] for j in keep], cache, seg, next_pos + 1, self._mask(out.logits[:, -1]), media_ctx)

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


def fail_rows(rows: list[Row]) -> None:
    """Every row that has not ended ends as "error" (its request gets the exception)."""
    for r in rows:
        if r.finish_reason is None:
            r.finish_reason = "error"


def _finish(r: Row, reason: str) -> None:
    r.finish_reason = reason
    if r.on_finish is not None:
        r.on_finish(r)
