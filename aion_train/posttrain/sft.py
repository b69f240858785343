"""Supervised fine-tuning (`aion-train sft`): loss only on the assistant's response tokens.

The base LM is `sft.init_from` (a pretrained checkpoint, any TP/EP layout; the embedding
grows rows for the role tokens) or, without one, a small LM trained here for
`sft.base_steps` full-weight steps on the task's text: chat-templated chatterbot dialogs and
the easy-vqa train questions as plain text ("scene: a blue circle. is there a red shape? no").
The few base steps leave it an imperfect answerer that does not know the chat format.
SFT then trains LoRA adapters (`lora.enabled`; QLoRA with `lora.quantize=nf4`) or full weights
on easy-vqa instructions (`sft.max_examples` of them: good but not perfect, leaving PPO room),
chatterbot dialogs and any `sft.data_files`. Held-out accuracy: greedy KV-cached answers to
the easy-vqa test prompts, checked exactly.

Writes {run_dir}/sft/: base/ (weights-only checkpoint), adapters.safetensors (full, unsharded)
or model/ (full fine-tuning), done.json (metrics + paths, last)."""

from __future__ import annotations

import random
import time

from aion_train.config import config_to_dict

from .chat_template import render_example
from .common import (
    build_parallel_model,
    build_phase_engine,
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
    save_tensors,
    save_weights,
    setup_distributed,
    to_model,
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


def sft_records(cfg, task) -> list:
    """(ids, response_mask) of the SFT mixture: easy-vqa instructions, chat, extra files."""
    rng = random.Random(cfg.seed + 1)
    tok = task.tokenizer
    vqa = task.prompts("train")
    if cfg.sft.max_examples:
        vqa = rng.sample(vqa, min(cfg.sft.max_examples, len(vqa)))
    chat = [
        r for r in (render_example(e.conversation(), tok) for e in task.prompts("chat")) if len(r[0]) <= MAX_CHAT_TOKENS
    ]
    chat = rng.sample(chat, min(cfg.sft.chat_examples, len(chat)))
    extra = [render_example(e.conversation(), tok) for e in task.prompts("extra")]
    too_long = [i for i, r in enumerate(extra) if len(r[0]) > cfg.model.max_seq_len + 1]
    if too_long:
        raise ValueError(
            f"sft.data_files: records {too_long[:5]} are longer than model.max_seq_len={cfg.model.max_seq_len} tokens"
        )
    return [render_example(e.conversation(), tok) for e in vqa] + chat + extra


def sampler(records, batch_size: int, seed: int, dp_rank: int, pad_id: int):
    """next_batch(step): `batch_size` records drawn for (seed, step, data-parallel rank)."""

    def next_batch(step):
        rng = random.Random((seed * 1_000_003 + step) * 64 + dp_rank)
        picks = [records[rng.randrange(len(records))] for _ in range(batch_size)]
        return lm_batch([p[0] for p in picks], [p[1] for p in picks], pad_id)

    return next_batch


def train_base_lm(model, cfg, groups, task, tracker) -> float:
    """sft.base_steps full-weight LM steps on the task text; returns the last loss."""
    pcfg = phase_config(cfg, lr=cfg.sft.base_lr, steps=cfg.sft.base_steps, batch_size=cfg.sft.batch_size)
    engine, opt = build_phase_engine(model, pcfg, groups)
    docs = base_documents(task)
    log = lambda m, s: tracker.log_metrics({f"base/{k}": v for k, v in m.items()}, step=s)  # noqa: E731
    losses = train_steps(
        engine,
        opt,
        pcfg.train,
        cfg.sft.base_steps,
        sampler(docs, cfg.sft.batch_size, cfg.seed + 7, groups.dp_rank, task.tokenizer.pad_id),
        lm_loss,
        log,
    )
    return mean_over_ranks(sum(losses[-10:]) / len(losses[-10:]))


def run_sft(cfg) -> dict:
    """SPMD: one call per rank. Returns the same metrics on every rank (see module doc)."""
    t0 = time.time()
    groups = setup_distributed(cfg)
    task = build_task_data(cfg)
    out = phase_dir(cfg, "sft")
    tracker = phase_tracker(cfg, "sft", groups)
    tracker.start(config_to_dict(cfg))
    try:
        model = build_parallel_model(cfg, groups)
        metrics: dict = {}
        if cfg.sft.init_from:
            load_weights(model, cfg.sft.init_from, groups, seed=cfg.seed)
        else:
            metrics["base_loss"] = train_base_lm(model, cfg, groups, task, tracker)
            model = _unwrap(model)
        base_ckpt = save_weights(model, cfg, groups, out / "base")
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
        records = sft_records(cfg, task)
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
        ev = evaluate_accuracy(model, task, test, cfg.sft.max_new_tokens, groups)
        metrics.update(
            sft_accuracy=ev["accuracy"],
            sft_accuracy_by_kind=ev["by_kind"],
            eval_examples=ev["n"],
            sft_loss=mean_over_ranks(sum(losses[-10:]) / len(losses[-10:])),
            sft_examples=len(records),
            base_checkpoint=str(base_ckpt),
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


__all__ = ["lm_batch", "load_policy", "run_sft", "sft_records"]
