"""Supervised fine-tuning (`aion-train sft`): loss only on the assistant's response tokens.

The base LM is `sft.init_from` (a pretrained checkpoint, any TP/EP layout; the embedding
grows rows for the role tokens) or, without one, a small LM trained here for
`sft.base_steps` full-weight steps on the task's text: chat-templated chatterbot dialogs and
the easy-vqa train questions as plain text ("scene: a blue circle. is there a red shape? no");
`sft.base_response_fraction` of those steps train on the SFT mixture's responses only.
The few base steps leave it an imperfect answerer that does not know the chat format.
SFT then trains LoRA adapters (`lora.enabled`; QLoRA with `lora.quantize=nf4`) or full weights
on easy-vqa instructions (`sft.max_examples` of them: good but not perfect, leaving PPO room),
chatterbot dialogs and any `sft.data_files`. Held-out accuracy: greedy KV-cached answers to
the easy-vqa test prompts, checked exactly.

On the user's files (`sft.train_files`: chat JSONL) SFT trains on those conversations alone,
the loss on every assistant turn; the base LM (without `sft.init_from`) reads them in the chat
template, every token a target (file_base_documents); the held-out measure is the response
loss on `sft.eval_files` (`base_eval_loss`, `sft_eval_loss`).

Writes {run_dir}/sft/: base/ (weights-only checkpoint), adapters.safetensors (full, unsharded)
or model/ (full fine-tuning), done.json (metrics + paths, last)."""

from __future__ import annotations

import math
import random
import time

import torch

from aion_train.config import config_to_dict

from .chat_template import render_conversation, render_example
from .common import (
    build_parallel_model,
    build_phase_engine,
    check_tokenizer,
    evaluate_accuracy,
    load_tensors,
    load_weights,
    mean_over_ranks,
    pad_right,
    phase_config,
    phase_dir,
    phase_tracker,
    rank,
    read_done,
    refuse_multimodal,
    save_tensors,
    save_weights,
    setup_distributed,
    to_model,
    tokenizer_sha256,
    train_steps,
    write_done,
)
from .lora import _unwrap, apply_lora, gather_lora_state_dict, load_lora_state_dict
from .qlora import quantize_base_nf4
from .task import build_task_data

MAX_CHAT_TOKENS = 48  # chat dialogs longer than this are left out (short batches on a CPU)


def lm_batch(seqs, masks, pad_id: int):
    """input_ids [B, T-1] and labels [B, T-1] (next token, -100 where the mask of the target is 0)."""
    ids, _ = pad_right(seqs, pad_id)
    m, _ = pad_right(masks, 0)
    labels = ids[:, 1:].masked_fill(m[:, 1:] == 0, -100)
    return ids[:, :-1].contiguous(), labels.contiguous()


def lm_loss(engine, batch):
    """(loss, metrics) of one (input_ids, labels) batch, moved to the engine's device."""
    ids, labels = to_model(batch, engine)
    out = engine(ids, labels=labels)
    return out.loss, {"loss": float(out.lm_loss.detach()), "aux_loss": float(out.aux_loss.detach())}


def base_documents(task) -> list:
    """(ids, mask) of the base LM's text: every token is a target."""
    tok = task.tokenizer
    docs = []
    for e in task.prompts("chat"):
        ids, _ = render_example(e.conversation(), tok)
        if len(ids) <= MAX_CHAT_TOKENS:
            docs.append(ids)
    for e in task.prompts("train"):  # plain text, not the chat format SFT teaches
        text = " ".join(m["content"] for m in e.messages) + f" {e.answer}"
        docs.append([tok.bos_id, *tok.encode(text), tok.sp.eos_id])
    return [(d, [1] * len(d)) for d in docs]


def render_conversations(conversations, tok, max_seq_len: int) -> list:
    """(ids, mask) of user-file conversations (`render_conversation`: every assistant turn);
    a conversation longer than the model's context is an error naming its file and line."""
    out, too_long = [], []
    for c in conversations:
        ids, mask = render_conversation(c.messages, tok)
        if len(ids) > max_seq_len + 1:
            too_long.append(f"{c.where}: {len(ids)} tokens")
        out.append((ids, mask))
    if too_long:
        raise ValueError(
            f"conversations longer than model.max_seq_len={max_seq_len} tokens (+1): " + "; ".join(too_long[:5])
        )
    return out


def file_base_documents(task, max_seq_len: int) -> list:
    """(ids, mask) of the base LM's text on the user's files: every conversation rendered in the
    chat template (role headers and <|end|> included), every token a target, cut to the model's
    context. The base must know the template's tokens: their output-head rows stay frozen
    under LoRA, and a head row the base never trained leaves a LoRA-only SFT unable to end its
    answers (<|end|> at ~0.01 probability after a correct answer, measured on the open-book task)."""
    tok = task.tokenizer
    docs = []
    for c in task.records["sft_train"] + task.records["sft_extra"]:
        d = render_conversation(c.messages, tok)[0][: max_seq_len + 1]
        docs.append((d, [1] * len(d)))
    return docs


@torch.no_grad()
def response_loss(model, records, pad_id: int, groups, batch_size: int = 16) -> dict:
    """Token-weighted mean cross-entropy over the masked (assistant) tokens of `records`, split
    over the data-parallel ranks and summed over them: {"loss", "tokens"}."""
    import torch.nn.functional as F

    from .common import full_logits

    dp, dp_rank = (1, 0) if groups is None else (groups.dp, groups.dp_rank)
    mine = records[dp_rank::dp]
    was = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for s in range(0, len(mine), batch_size):
        chunk = mine[s : s + batch_size]
        ids, labels = to_model(lm_batch([r[0] for r in chunk], [r[1] for r in chunk], pad_id), model)
        logits = full_logits(model(ids).logits, groups).float()
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        total += torch.tensor([float(nll), float((labels != -100).sum())], dtype=torch.float64)
    model.train(was)
    if groups is not None and dp > 1:
        from aion_train.parallel.collectives import all_reduce_

        all_reduce_(total, group=groups.dp_group)
    return {"loss": float(total[0] / max(total[1], 1)), "tokens": int(total[1])}


def sft_records(cfg, task) -> list:
    """(ids, response_mask) of the SFT mixture: easy-vqa instructions, chat, extra files; or,
    on the user's files, their conversations (every assistant turn) and sft.data_files."""
    tok = task.tokenizer
    extra = render_conversations(task.records.get("sft_extra", []), tok, cfg.model.max_seq_len)
    if "sft_train" in task.records:
        return render_conversations(task.records["sft_train"], tok, cfg.model.max_seq_len) + extra
    rng = random.Random(cfg.seed + 1)
    vqa = task.prompts("train")
    if cfg.sft.max_examples:
        vqa = rng.sample(vqa, min(cfg.sft.max_examples, len(vqa)))
    chat = [
        r for r in (render_example(e.conversation(), tok) for e in task.prompts("chat")) if len(r[0]) <= MAX_CHAT_TOKENS
    ]
    chat = rng.sample(chat, min(cfg.sft.chat_examples, len(chat)))
    return [render_example(e.conversation(), tok) for e in vqa] + chat + extra


def sampler(records, batch_size: int, seed: int, dp_rank: int, pad_id: int):
    """next_batch(step): `batch_size` records drawn for (seed, step, data-parallel rank)."""

    def next_batch(step):
        rng = random.Random((seed * 1_000_003 + step) * 64 + dp_rank)
        picks = [records[rng.randrange(len(records))] for _ in range(batch_size)]
        return lm_batch([p[0] for p in picks], [p[1] for p in picks], pad_id)

    return next_batch


def interleaved(every_token, responses, fraction: float):
    """next_batch(step) from `responses` on a `fraction` of the steps, spread evenly (step s when
    floor((s + 1) f) > floor(s f)), from `every_token` on the others."""

    def next_batch(step):
        on_responses = math.floor((step + 1) * fraction) > math.floor(step * fraction)
        return (responses if on_responses else every_token)(step)

    return next_batch


def train_base_lm(model, cfg, groups, task, tracker, records) -> float:
    """sft.base_steps full-weight LM steps on the task text, sft.base_response_fraction of them
    on the responses of the SFT mixture `records` only; returns the mean of the last 10 losses."""
    pcfg = phase_config(cfg, lr=cfg.sft.base_lr, steps=cfg.sft.base_steps, batch_size=cfg.sft.batch_size)
    engine, opt = build_phase_engine(model, pcfg, groups)
    docs = file_base_documents(task, cfg.model.max_seq_len) if "sft_train" in task.records else base_documents(task)
    pad, bs = task.tokenizer.pad_id, cfg.sft.batch_size
    next_batch = sampler(docs, bs, cfg.seed + 7, groups.dp_rank, pad)
    if cfg.sft.base_response_fraction > 0:
        next_batch = interleaved(
            next_batch, sampler(records, bs, cfg.seed + 11, groups.dp_rank, pad), cfg.sft.base_response_fraction
        )
    log = lambda m, s: tracker.log_metrics({f"base/{k}": v for k, v in m.items()}, step=s)  # noqa: E731
    losses = train_steps(engine, opt, pcfg.train, cfg.sft.base_steps, next_batch, lm_loss, log)
    return mean_over_ranks(sum(losses[-10:]) / len(losses[-10:]))


def run_sft(cfg) -> dict:
    """SPMD: one call per rank. Returns the same metrics on every rank (see module doc)."""
    refuse_multimodal(cfg, "sft")
    t0 = time.time()
    groups = setup_distributed(cfg)
    task = build_task_data(cfg)
    records = sft_records(cfg, task)  # before any training: a too-long record fails now
    out = phase_dir(cfg, "sft")
    tracker = phase_tracker(cfg, "sft", groups)
    tracker.start(config_to_dict(cfg))
    try:
        model = build_parallel_model(cfg, groups)
        metrics: dict = {}
        if cfg.sft.init_from:
            load_weights(model, cfg.sft.init_from, groups, seed=cfg.seed)
        else:
            metrics["base_loss"] = train_base_lm(model, cfg, groups, task, tracker, records)
            model = _unwrap(model)
        base_ckpt = save_weights(model, cfg, groups, out / "base")
        on_files = "sft_train" in task.records
        if on_files:
            held = render_conversations(task.records["sft_eval"], task.tokenizer, cfg.model.max_seq_len)
            if held:
                metrics["base_eval_loss"] = response_loss(model, held, task.tokenizer.pad_id, groups)["loss"]
        else:
            test = task.prompts("test")
            metrics["base_accuracy"] = evaluate_accuracy(model, task, test, cfg.sft.max_new_tokens, groups)["accuracy"]
        if cfg.lora.enabled:
            metrics["lora_modules"] = len(apply_lora(model, cfg.lora, seed=cfg.seed))
            if cfg.lora.quantize == "nf4":
                mem = quantize_base_nf4(model, cfg.lora.nf4_block_size)
                metrics.update(
                    base_nf4_bytes=mem["nf4_bytes"], base_bf16_bytes=mem["bf16_bytes"], base_nf4_ratio=mem["ratio"]
                )
        metrics["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        pcfg = phase_config(cfg, lr=cfg.sft.lr, steps=cfg.sft.steps, batch_size=cfg.sft.batch_size)
        engine, opt = build_phase_engine(model, pcfg, groups)
        log = lambda m, s: tracker.log_metrics({f"sft/{k}": v for k, v in m.items()}, step=s)  # noqa: E731
        losses = train_steps(
            engine,
            opt,
            pcfg.train,
            cfg.sft.steps,
            sampler(records, cfg.sft.batch_size, cfg.seed, groups.dp_rank, task.tokenizer.pad_id),
            lm_loss,
            log,
        )
        model = engine.module
        if on_files:
            if held:
                ev = response_loss(model, held, task.tokenizer.pad_id, groups)
                metrics.update(sft_eval_loss=ev["loss"], eval_tokens=ev["tokens"], eval_examples=len(held))
        else:
            ev = evaluate_accuracy(model, task, test, cfg.sft.max_new_tokens, groups)
            metrics.update(sft_accuracy=ev["accuracy"], sft_accuracy_by_kind=ev["by_kind"], eval_examples=ev["n"])
        metrics.update(
            sft_loss=mean_over_ranks(sum(losses[-10:]) / len(losses[-10:])),
            sft_examples=len(records),
            base_checkpoint=str(base_ckpt),
            tokenizer=str(task.tokenizer.path),
            tokenizer_sha256=tokenizer_sha256(task.tokenizer.path),
        )
        if cfg.lora.enabled:
            adapters = gather_lora_state_dict(model)
            path = out / "adapters.safetensors"
            if rank() == 0:
                save_tensors(adapters, path, {"r": cfg.lora.r, "alpha": cfg.lora.alpha})
            metrics["adapters"] = str(path)
        else:
            metrics["model_checkpoint"] = str(save_weights(model, cfg, groups, out / "model"))
        metrics["seconds"] = round(time.time() - t0, 1)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=cfg.sft.steps)
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    write_done(cfg, "sft", metrics)
    return metrics


def load_policy(cfg, stage: str = "sft", merge: bool = False, groups=None):
    """(model, task_data): the model a finished phase (`stage`, default SFT) left, on this
    rank's shards. merge=False: its LoRA adapters loaded and trainable (base frozen; NF4 under
    QLoRA); merge=True: a plain model with W0 + (alpha/r) B A (apply_lora again for a fresh
    actor, or use it frozen as the reference)."""
    groups = groups or setup_distributed(cfg)
    done = read_done(cfg, stage)
    if done is None:
        raise FileNotFoundError(f"{phase_dir(cfg, stage)}/done.json is missing: run the {stage} phase first")
    task = build_task_data(cfg)
    check_tokenizer(done, task.tokenizer.path, f"the {stage} model of {phase_dir(cfg, stage)}")
    model = build_parallel_model(cfg, groups)
    adapters = load_tensors(done["adapters"]) if done.get("adapters") else None
    if adapters is not None and merge:
        load_weights(
            model, done["base_checkpoint"], groups, merge_adapters=adapters, scaling=cfg.lora.alpha / cfg.lora.r
        )
    elif adapters is not None:
        load_weights(model, done["base_checkpoint"], groups)
        apply_lora(model, cfg.lora, seed=cfg.seed)
        if cfg.lora.quantize == "nf4":
            quantize_base_nf4(model, cfg.lora.nf4_block_size)
        load_lora_state_dict(model, adapters)
    else:
        load_weights(model, done.get("model_checkpoint") or done["base_checkpoint"], groups)
    return model, task


__all__ = ["lm_batch", "load_policy", "render_conversations", "response_loss", "run_sft", "sft_records"]
