"""Reward model (`aion-train rm`): a scalar head on the transformer backbone, trained on
preference pairs with the Bradley-Terry loss  -log sigmoid(r_w - r_l).

Default pairs come from the checkable task: an easy-vqa prompt with the right answer is
preferred over the same prompt with a wrong answer from its closed set. The backbone starts
from the SFT model (adapters merged; `rm.init=sft`) or its base (`rm.init=base`) and is
trained in full (`rm.use_lora=false`) or through LoRA adapters. Held-out pair accuracy is
measured on pairs from the easy-vqa test split. On the user's files (`rm.train_files`:
preference JSONL, `user_data.read_preferences`) the pairs are theirs, rendered in the chat
template as prompt + response + <|end|> (the layout PPO scores), held out on `rm.eval_files`
(else measured on the training pairs: `rm_eval_split` says which).

Writes {run_dir}/rm/: backbone/ (weights-only checkpoint, adapters merged), head.safetensors,
done.json (last)."""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from aion_train.config import config_to_dict
from aion_train.parallel.device import module_device

from .common import (
    barrier,
    build_parallel_model,
    build_phase_engine,
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
    train_steps,
    write_done,
)
from .lora import _unwrap, apply_lora, merge_lora


class RewardModel(nn.Module):
    """r(x) = w^T h_last + b: h_last is the backbone's final normed hidden state at the last
    real token of each right-padded row (where attention_mask is 1)."""

    def __init__(self, backbone: nn.Module, d_model: int):
        super().__init__()
        self.backbone = backbone
        with torch.random.fork_rng(devices=[]):  # the same head on every rank
            torch.manual_seed(0)
            self.head = nn.Linear(d_model, 1)
        nn.init.zeros_(self.head.bias)
        self.head.to(module_device(backbone))  # drawn on the CPU (same everywhere), kept by the backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()) or bool((attention_mask[:, 0] == 0).any()):
            raise ValueError(
                "RewardModel: attention_mask must be right-padded (1...1 0...0, at least one 1); "
                "the causal backbone has no padding mask, so left padding would change the scores"
            )
        hidden = self.backbone(input_ids, return_hidden=True).hidden
        last = attention_mask.sum(dim=1) - 1
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()


def malformed_response(e, tokenizer, rng: random.Random, max_new_tokens: int = 4) -> list[int]:
    """A response the policy can sample but no one should prefer: an answer of another kind of
    question ("circle" to a yes/no question), empty, two answers, the answer without its end
    marker (cut off), or random vocabulary pieces. The reward model sees these as rejected so
    that PPO cannot climb its score with them (reward hacking)."""
    from .task import COLORS, SHAPES, YES_NO

    other = rng.choice([c for c in e.candidates if c != e.answer])
    kind = rng.randrange(6)
    if kind <= 1:
        return tokenizer.encode(rng.choice([a for a in (*COLORS, *SHAPES, *YES_NO) if a not in e.candidates])) + [
            tokenizer.end_id
        ]
    if kind == 2:
        return [tokenizer.end_id]
    if kind == 3:
        return (tokenizer.encode(e.answer) + tokenizer.encode(other))[: max_new_tokens - 1] + [tokenizer.end_id]
    if kind == 4:
        return tokenizer.encode(e.answer)[:max_new_tokens]
    n = rng.randint(1, max_new_tokens - 1)
    return [rng.randrange(3, tokenizer.sp.vocab_size) for _ in range(n)] + [tokenizer.end_id]


def response_pairs(
    examples, tokenizer, n: int, seed: int, malformed_fraction: float = 0.0, max_new_tokens: int = 4
) -> list:
    """[(example, chosen response ids, rejected response ids)]: n examples drawn (without
    replacement while possible), each with its answer vs one wrong answer of its closed set,
    or (a `malformed_fraction` of them) vs a malformed response (:func:`malformed_response`)."""
    rng = random.Random(seed)
    pool = [e for e in examples if len(e.candidates) > 1]
    picks = rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
    pairs = []
    for e in picks:
        chosen = tokenizer.encode(e.answer) + [tokenizer.end_id]
        if rng.random() < malformed_fraction:
            rejected = malformed_response(e, tokenizer, rng, max_new_tokens)
        else:
            wrong = rng.choice([c for c in e.candidates if c != e.answer])
            rejected = tokenizer.encode(wrong) + [tokenizer.end_id]
        pairs.append((e, chosen, rejected))
    return pairs


def preference_pairs(
    examples, tokenizer, n: int, seed: int, malformed_fraction: float = 0.0, max_new_tokens: int = 4
) -> list:
    """[(chosen ids, rejected ids)]: prompt + response of :func:`response_pairs`."""
    return [
        (e.prompt_ids + c, e.prompt_ids + r)
        for e, c, r in response_pairs(examples, tokenizer, n, seed, malformed_fraction, max_new_tokens)
    ]


def file_pairs(preferences, tokenizer) -> list:
    """[(chosen ids, rejected ids)] of user preference records (`user_data.Preference`)."""
    from .chat_template import render_response

    return [
        (render_response(p.prompt, p.chosen, tokenizer), render_response(p.prompt, p.rejected, tokenizer))
        for p in preferences
    ]


def task_pairs(cfg, task) -> tuple[list, list, str]:
    """(train pairs, held-out pairs, the held-out split's name) of the built-in task or the user's files."""
    tok = task.tokenizer
    if cfg.rm.train_files:
        train = file_pairs(task.records["rm_train"], tok)
        held = file_pairs(task.records["rm_eval"], tok)
        too_long = [
            p.where
            for p, (c, r) in zip(task.records["rm_train"] + task.records["rm_eval"], train + held)
            if max(len(c), len(r)) > cfg.model.max_seq_len
        ]
        if too_long:
            raise ValueError(f"preference pairs longer than model.max_seq_len={cfg.model.max_seq_len}: {too_long[:5]}")
        return train, held or train, "eval_files" if held else "train_files"
    if task.records.get("sft_train") is not None:
        raise ValueError(
            "rm.train_files is empty but the run post-trains on your files: give preference JSONL "
            "(prompt, chosen, rejected), or leave the rm phase out (ppo.reward=module:function)"
        )
    n_train = cfg.rm.train_pairs or len(task.prompts("train"))
    train = preference_pairs(
        task.prompts("train"), tok, n_train, cfg.seed + 11, cfg.rm.malformed_fraction, cfg.ppo.max_new_tokens
    )
    return train, preference_pairs(task.prompts("test_all"), tok, cfg.rm.eval_pairs, cfg.seed + 12), "easy-vqa test"


def pair_batch(pairs, pad_id: int):
    """(ids [2B, T], mask [2B, T]): the B chosen rows, then the B rejected rows."""
    return pad_right([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)


def pair_loss(model, batch):
    """Bradley-Terry loss of a batch of make_batch: (ids, mask) of a text model, (ids, context)
    of a multimodal one; the B chosen rows first, then the B rejected."""
    r = model(*to_model(batch, model))
    r_w, r_l = r.chunk(2)
    loss = -F.logsigmoid(r_w - r_l).mean()
    return loss, {
        "loss": float(loss.detach()),
        "pair_accuracy": float((r_w > r_l).float().mean()),
        "margin": float((r_w - r_l).mean().detach()),
    }


@torch.no_grad()
def pair_accuracy(model, pairs, make_batch, batch_size: int = 64) -> dict:
    """Held-out pair accuracy (ties count as wrong) and the reward statistics; `make_batch`
    turns a list of pairs into the model's inputs (pair_batch for a text model)."""
    was = model.training
    model.eval()
    wins, chosen, rejected = 0, [], []
    for s in range(0, len(pairs), batch_size):
        r = model(*to_model(make_batch(pairs[s : s + batch_size]), model))
        r_w, r_l = r.chunk(2)
        wins += int((r_w > r_l).sum())
        chosen += r_w.tolist()
        rejected += r_l.tolist()
    model.train(was)
    allr = torch.tensor(chosen + rejected)
    return {
        "rm_pair_accuracy": wins / max(len(pairs), 1),
        "rm_reward_mean": float(allr.mean()),
        "rm_reward_std": float(allr.std()),
        "rm_chosen_mean": float(torch.tensor(chosen).mean()),
        "rm_rejected_mean": float(torch.tensor(rejected).mean()),
    }


def _backbone(cfg, groups):
    """The RM's starting backbone: the SFT model with adapters merged, or the SFT base."""
    if cfg.rm.init == "sft":
        from .sft import load_policy

        model, task = load_policy(cfg, "sft", merge=True, groups=groups)
        return model, task
    from .task import build_task_data

    done = read_done(cfg, "sft")
    if done is None:
        raise FileNotFoundError(f"{phase_dir(cfg, 'sft')}/done.json is missing: run the sft phase first")
    model = build_parallel_model(cfg, groups)
    load_weights(model, done["base_checkpoint"], groups)
    return model, build_task_data(cfg)


def text_reward_setup(cfg, groups):
    """(reward model, train pairs, held-out pairs, held-out split name, make_batch) of a text model."""
    refuse_multimodal(cfg, "rm")
    backbone, task = _backbone(cfg, groups)
    if cfg.rm.use_lora:
        apply_lora(backbone, cfg.lora, seed=cfg.seed)
    train_pairs, eval_pairs, eval_split = task_pairs(cfg, task)
    pad = task.tokenizer.pad_id
    return RewardModel(backbone, cfg.model.d_model), train_pairs, eval_pairs, eval_split, lambda p: pair_batch(p, pad)


def run_rm(cfg, setup=text_reward_setup) -> dict:
    """SPMD: one call per rank; returns the same metrics on every rank (see module doc).
    `setup(cfg, groups)` gives the model, the pairs and their batching (`text_reward_setup`;
    a multimodal model's: posttrain/multimodal/reward.py)."""
    t0 = time.time()
    groups = setup_distributed(cfg)
    if cfg.parallel.sequence_parallel:
        raise ValueError("parallel.sequence_parallel: the reward head reads whole sequences; turn it off for rm")
    out = phase_dir(cfg, "rm")
    tracker = phase_tracker(cfg, "rm", groups)
    tracker.start(config_to_dict(cfg))
    try:
        model, train_pairs, eval_pairs, eval_split, make_batch = setup(cfg, groups)
        before = pair_accuracy(model, eval_pairs, make_batch)["rm_pair_accuracy"]
        pcfg = phase_config(cfg, lr=cfg.rm.lr, steps=cfg.rm.steps, batch_size=cfg.rm.batch_size)
        engine, opt = build_phase_engine(model, pcfg, groups)

        def next_batch(step):
            rng = random.Random((cfg.seed * 7919 + step) * 64 + groups.dp_rank)
            return make_batch([train_pairs[rng.randrange(len(train_pairs))] for _ in range(cfg.rm.batch_size)])

        log = lambda m, s: tracker.log_metrics({f"rm/{k}": v for k, v in m.items()}, step=s)  # noqa: E731
        losses = train_steps(engine, opt, pcfg.train, cfg.rm.steps, next_batch, pair_loss, log)
        model = _unwrap(engine)
        metrics = pair_accuracy(model, eval_pairs, make_batch)
        metrics.update(
            rm_pair_accuracy_before=before,
            rm_loss=mean_over_ranks(sum(losses[-10:]) / len(losses[-10:])),
            rm_train_pairs=len(train_pairs),
            rm_eval_pairs=len(eval_pairs),
            rm_eval_split=eval_split,
        )
        if cfg.rm.use_lora:
            merge_lora(model.backbone)  # saved weights = W0 + (alpha/r) B A
        metrics["backbone_checkpoint"] = str(save_weights(model.backbone, cfg, groups, out / "backbone"))
        if rank() == 0:
            save_tensors({"weight": model.head.weight, "bias": model.head.bias}, out / "head.safetensors")
        barrier()
        metrics["head"] = str(out / "head.safetensors")
        metrics["seconds"] = round(time.time() - t0, 1)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=cfg.rm.steps)
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    write_done(cfg, "rm", metrics)
    return metrics


def reward_model_done(cfg) -> tuple[dict | None, str]:
    """(done.json, its folder) of the reward model PPO uses: `ppo.reward_model` (a run folder of
    ours or its rm/ folder: a reward model trained elsewhere with the same tokenizer and model
    config) or this run's rm phase."""
    import json
    from pathlib import Path

    if not cfg.ppo.reward_model:
        return read_done(cfg, "rm"), str(phase_dir(cfg, "rm"))
    root = Path(cfg.ppo.reward_model)
    folder = root / "rm" if (root / "rm" / "done.json").is_file() else root
    p = folder / "done.json"
    return (json.loads(p.read_text()) if p.is_file() else None), str(folder)


def load_reward_model(cfg, groups=None, build_backbone=build_parallel_model, cls=None) -> RewardModel:
    """The trained reward model on this rank's shards: frozen, in eval mode. A multimodal run
    passes its backbone builder and head class (posttrain/multimodal/ppo.py)."""
    groups = groups or setup_distributed(cfg)
    done, where = reward_model_done(cfg)
    if done is None:
        raise FileNotFoundError(f"{where}/done.json is missing: run the rm phase first")
    backbone, cls = build_backbone(cfg, groups), cls or RewardModel
    load_weights(backbone, done["backbone_checkpoint"], groups)
    model = cls(backbone, cfg.model.d_model)
    head = load_tensors(done["head"])
    with torch.no_grad():
        model.head.weight.copy_(head["weight"])
        model.head.bias.copy_(head["bias"])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


__all__ = [
    "RewardModel",
    "reward_model_done",
    "file_pairs",
    "load_reward_model",
    "pair_accuracy",
    "preference_pairs",
    "run_rm",
    "task_pairs",
]
