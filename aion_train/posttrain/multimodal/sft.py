"""Multimodal SFT (`aion-train sft` on a multimodal config): the answer after the media prompt.

The base is a multimodal pretraining checkpoint: `sft.init_from`, else the `pretrain` phase of
this run ({run_dir}/pretrain/done.json). LoRA adapters on the trunk (`lora.targets`; with
`lora.encoders` on the media path too, else it stays frozen and each item is encoded once), or
full weights without `lora.enabled`. Loss: cross-entropy on the answer tokens and the closing
`</T>` only, prompts from `task.build_mm_task` (`sft.mm_kinds`). Held-out: greedy answers to the
test prompts of every kind, checked exactly, before (`base_accuracy`) and after.

Writes {run_dir}/sft/: adapters.safetensors (full, unsharded) or model/ (full fine-tuning),
done.json (metrics + paths; `base_checkpoint` names the base) last."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from aion_train.config import config_to_dict

from ..common import (
    build_phase_engine,
    check_tokenizer,
    load_tensors,
    load_weights,
    mean_over_ranks,
    phase_config,
    phase_dir,
    phase_tracker,
    rank,
    read_done,
    save_tensors,
    save_weights,
    setup_distributed,
    to_model,
    tokenizer_sha256,
    train_steps,
    write_done,
)
from ..lora import gather_lora_state_dict, load_lora_state_dict
from .models import MEDIA_PATH, FusedLM, apply_mm_lora, build_mm_model
from .rollout import evaluate_accuracy, sequences
from .task import build_mm_task, modalities_of


def base_checkpoint(cfg, tokenizer_path=None) -> str:
    """The multimodal base: sft.init_from, else the checkpoint this run's pretrain phase wrote
    (refused when `tokenizer_path` is not the tokenizer that phase trained with)."""
    if cfg.sft.init_from:
        return cfg.sft.init_from
    done = Path(cfg.run_dir) / "pretrain" / "done.json"
    if not done.is_file():
        raise FileNotFoundError(
            f"sft.init_from is empty and {done} is missing: name a multimodal pretraining checkpoint "
            "in sft.init_from, or run the pretrain phase first"
        )
    record = json.loads(done.read_text())
    if tokenizer_path is not None:
        check_tokenizer(record, tokenizer_path, f"the pretrained base of {done.parent}")
    return record["checkpoint"]


def answer_batch(task, examples):
    """(input_ids [B, L], labels [B, L], context): prompt + answer + </T>, labels on the answer."""
    answers = [task.answer_ids(e.answer) for e in examples]
    (ids, resp_pos, resp_tokens, resp_mask), ctx = sequences(task, examples, answers)
    labels = torch.full_like(ids, -100)
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(resp_pos)
    keep = resp_mask > 0
    labels[rows[keep], resp_pos[keep]] = resp_tokens[keep]
    return ids, labels, ctx


def answer_loss(engine, batch):
    ids, labels, ctx = batch
    ids, labels = to_model((ids, labels), engine)
    out = engine(ids, ctx)
    lm = engine.module.mm.lm
    loss = lm.loss_fn(out.logits, labels)
    return loss + out.aux_loss, {"loss": float(loss.detach()), "aux_loss": float(out.aux_loss.detach())}


def freeze_media_path(model) -> None:
    for n, p in model.named_parameters():
        if n.startswith(MEDIA_PATH):
            p.requires_grad_(False)


def run_mm_sft(cfg) -> dict:
    """SPMD: one call per rank; the same metrics on every rank."""
    t0 = time.time()
    groups = setup_distributed(cfg)
    task = build_mm_task(cfg)
    base = base_checkpoint(cfg, task.tokenizer.path)
    tracker = phase_tracker(cfg, "sft", groups)
    tracker.start(config_to_dict(cfg))
    try:
        model = build_mm_model(cfg, groups)
        load_weights(model, base, groups)
        test, train = task.prompts("test"), task.prompts("sft")
        n_tok = cfg.sft.max_new_tokens
        ev = evaluate_accuracy(model, task, test, n_tok, groups)
        metrics: dict = {"base_accuracy": ev["accuracy"], "base_accuracy_by_kind": ev["by_kind"]}
        if cfg.lora.enabled:
            metrics["lora_modules"] = len(apply_mm_lora(model, cfg))
        elif not cfg.lora.encoders:
            freeze_media_path(model)
        metrics["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        pcfg = phase_config(cfg, lr=cfg.sft.lr, steps=cfg.sft.steps, batch_size=cfg.sft.batch_size)
        engine, opt = build_phase_engine(FusedLM(model), pcfg, groups)

        def next_batch(step):
            rng = random.Random((cfg.seed * 1_000_003 + step) * 64 + groups.dp_rank)
            return answer_batch(task, [train[rng.randrange(len(train))] for _ in range(cfg.sft.batch_size)])

        log = lambda m, s: tracker.log_metrics({f"sft/{k}": v for k, v in m.items()}, step=s)  # noqa: E731
        losses = train_steps(engine, opt, pcfg.train, cfg.sft.steps, next_batch, answer_loss, log)
        ev = evaluate_accuracy(model, task, test, n_tok, groups)
        metrics.update(
            sft_accuracy=ev["accuracy"],
            sft_accuracy_by_kind=ev["by_kind"],
            eval_examples=ev["n"],
            sft_loss=mean_over_ranks(sum(losses[-10:]) / len(losses[-10:])),
            sft_examples=len(train),
            base_checkpoint=str(base),
            modalities=modalities_of(cfg.sft.mm_kinds),
            tokenizer_sha256=tokenizer_sha256(task.tokenizer.path),
        )
        if cfg.lora.enabled:
            adapters = gather_lora_state_dict(model)
            path = phase_dir(cfg, "sft") / "adapters.safetensors"
            if rank() == 0:
                save_tensors(adapters, path, {"r": cfg.lora.r, "alpha": cfg.lora.alpha})
            metrics["adapters"] = str(path)
        else:
            metrics["model_checkpoint"] = str(save_weights(model, cfg, groups, phase_dir(cfg, "sft") / "model"))
        metrics["seconds"] = round(time.time() - t0, 1)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=cfg.sft.steps)
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    write_done(cfg, "sft", metrics)
    return metrics


def load_mm_policy(cfg, merge: bool = False, groups=None):
    """(multimodal model, task) the SFT phase left on this rank's shards: adapters loaded and
    trainable (merge=False; media path frozen unless lora.encoders), or merged into a plain
    model (merge=True: the PPO reference, the reward model's start)."""
    groups = groups or setup_distributed(cfg)
    done = read_done(cfg, "sft")
    if done is None:
        raise FileNotFoundError(f"{phase_dir(cfg, 'sft')}/done.json is missing: run the sft phase first")
    task = build_mm_task(cfg)
    check_tokenizer(done, task.tokenizer.path, f"the SFT model of {phase_dir(cfg, 'sft')}")
    model = build_mm_model(cfg, groups)
    adapters = load_tensors(done["adapters"]) if done.get("adapters") else None
    if adapters is not None and merge:
        scaling = cfg.lora.alpha / cfg.lora.r
        load_weights(model, done["base_checkpoint"], groups, merge_adapters=adapters, scaling=scaling)
    elif adapters is not None:
        load_weights(model, done["base_checkpoint"], groups)
        apply_mm_lora(model, cfg)
        load_lora_state_dict(model, adapters)
    else:
        load_weights(model, done.get("model_checkpoint") or done["base_checkpoint"], groups)
        if not cfg.lora.encoders:
            freeze_media_path(model)
    return model, task
