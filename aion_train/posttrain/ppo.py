"""PPO RLHF (`aion-train ppo`, `deepspeed launch/rlhf.py`): the SFT policy trained against the
reward model, with a KL penalty to the SFT model.

    actor      SFT model + its LoRA adapters (trainable; DeepSpeed engine)
    reference  the same SFT model, adapters merged, frozen
    critic     value head on a copy of the reward model's backbone (trainable; DeepSpeed engine)
    reward     the reward model, frozen

Each iteration samples ppo.samples_per_prompt responses per prompt (KV-cached, temperature
ppo.temperature), scores them (reward model at the last token, -beta (log pi - log pi_ref) at
every token), computes advantages (whitened over all data-parallel ranks): GAE with the
critic's values and returns, or with ppo.advantage=rloo / group_norm each response against the
other samples of its prompt and no critic (ppo_math.group_advantages); then runs
ppo.epochs passes of ppo.minibatches minibatches: clipped surrogate (eps ppo.clip_eps) for
the actor, clipped value loss for the critic. Reward, KL, clip fraction, entropy and value
loss go to MLflow every iteration; a checkpoint every ppo.save_every iterations lets a killed
run resume (aion_train/posttrain/ppo_checkpoint.py). At the end: held-out exact-answer
accuracy of the PPO policy and, on the same prompts, of the SFT reference (greedy), and the
sequence-level KL(pi || pi_ref) on sampled held-out responses.

The reward is the reward model (`ppo.reward=rm`) or a Python function of the decoded
completions (`ppo.reward=package.module:function`, aion_train/posttrain/rewards.py). On the
user's prompts (`ppo.prompt_files`) the held-out measure is the mean reward of greedy responses
to `ppo.eval_files` (`ppo_eval_reward` against the SFT model's `sft_eval_reward`; accuracies
too when every prompt record has an `answer`). Writes {run_dir}/ppo/done.json
last. SPMD: one call per rank, same result on every rank."""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aion_train.config import config_to_dict
from aion_train.parallel.collectives import all_reduce_
from aion_train.parallel.device import module_device

from . import ppo_math
from .common import (
    build_phase_engine,
    evaluate_accuracy,
    phase_config,
    phase_tracker,
    refuse_multimodal,
    setup_distributed,
    write_done,
)
from .critic import build_critic
from .ppo_checkpoint import load_ppo, ppo_checkpoints, save_ppo
from .reward import load_reward_model
from .rollout import (
    RolloutBatch,
    make_experience,
    response_logprobs,
    response_values,
    sample_responses,
    score_responses,
)
from .sft import load_policy

log = logging.getLogger("aion_train.ppo")


def _dp(groups):
    return groups.dp_group if groups.dp > 1 else None


def mean_over_dp(values: dict, groups) -> dict:
    """Average a dict of floats over the data-parallel ranks (one all-reduce)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if groups.dp > 1:
        all_reduce_(t, group=groups.dp_group)
        t /= groups.dp
    return dict(zip(keys, t.tolist()))


def replaying(actor, routes):
    """Route the actor's tokens to the recorded experts (ppo.router_replay), else nothing."""
    if routes is None:
        return contextlib.nullcontext()
    from aion_train.model.moe.router_replay import RouterReplay

    return RouterReplay(actor).replaying(routes)


def ppo_update(actor, critic, batch: RolloutBatch, pcfg, groups, generator: torch.Generator) -> dict:
    """ppo.epochs x ppo.minibatches optimizer steps of both engines (the actor's alone when
    `critic` is None) on one rollout batch; returns the means of the losses and diagnostics
    over all of them."""
    sums: dict = {}
    n = 0
    for _ in range(pcfg.epochs):
        perm = torch.randperm(batch.input_ids.shape[0], generator=generator)
        for idx in perm.chunk(pcfg.minibatches):
            mb = batch.rows(idx)
            with replaying(actor, mb.routes):
                logp, entropy = response_logprobs(
                    actor, mb.input_ids, mb.resp_pos, mb.resp_tokens, groups, with_entropy=True, context=mb.context
                )
            policy_loss, info = ppo_math.clipped_surrogate(
                logp, mb.logp_old, mb.advantages, mb.resp_mask, pcfg.clip_eps
            )
            ent = ppo_math.masked_mean(entropy, mb.resp_mask)
            actor.backward(policy_loss - pcfg.entropy_coef * ent)
            actor.step()
            terms = [
                ("policy_loss", policy_loss),
                ("entropy", ent),
                ("clipfrac", info["clipfrac"]),
                ("approx_kl", info["approx_kl"]),
            ]
            if critic is not None:
                values = response_values(critic, mb.input_ids, mb.resp_pos, mb.context)
                value_loss, vinfo = ppo_math.clipped_value_loss(
                    values, mb.values, mb.returns, mb.resp_mask, pcfg.value_clip
                )
                critic.backward(value_loss)
                critic.step()
                terms += [("value_loss", value_loss), ("vclipfrac", vinfo["vclipfrac"])]
            for k, v in terms:
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
    return {k: v / n for k, v in sums.items()}


def sample_sequences(model, task, examples, pcfg, generator, groups):
    """(responses, build_sequences' four tensors, context None): one sampled response per
    example of the text task (the multimodal one: posttrain/multimodal/ppo.py)."""
    from .rollout import build_sequences

    tok = task.tokenizer
    prompts = [e.prompt_ids for e in examples]
    responses = sample_responses(model, prompts, pcfg.max_new_tokens, tok.end_id, pcfg.temperature, generator, groups)
    return responses, build_sequences(prompts, responses, tok.pad_id), None


@torch.no_grad()
def heldout_kl(actor, reference, task, examples, pcfg, groups, seed: int, sample_fn=sample_sequences) -> dict:
    """Sequence-level KL(pi || pi_ref) on responses sampled from pi for held-out prompts:
    the mean over prompts of sum_t (log pi - log pi_ref) (k1, unbiased) and of sum_t k3 (>= 0)."""
    mine = examples[groups.dp_rank :: groups.dp]
    gen = torch.Generator().manual_seed(seed)
    _, (ids, pos, toks, mask), ctx = sample_fn(actor, task, mine, pcfg, gen, groups)
    mask = mask.to(module_device(actor))  # the log-probs below come back on the actor's device
    actor.eval()
    est = ppo_math.kl_estimators(
        response_logprobs(actor, ids, pos, toks, groups, context=ctx),
        response_logprobs(reference, ids, pos, toks, groups, context=ctx),
    )
    t = torch.tensor(
        [float((est["k1"] * mask).sum()), float((est["k3"] * mask).sum()), float(len(mine))], dtype=torch.float64
    )
    if groups.dp > 1:
        all_reduce_(t, group=groups.dp_group)
    return {"ppo_kl": float(t[0] / t[2]), "ppo_kl_k3": float(t[1] / t[2])}


@torch.no_grad()
def evaluate_reward(model, task, examples, scorer, max_new_tokens: int, groups) -> dict:
    """Greedy responses to `examples` (split over the data-parallel ranks) scored by `scorer`
    (the reward model or function): {"reward", "accuracy" (None unless every example has an
    answer), "n"}."""
    from .task import is_correct

    mine = examples[groups.dp_rank :: groups.dp]
    tok = task.tokenizer
    device = module_device(model)
    prompts = [e.prompt_ids for e in mine]
    responses = sample_responses(model, prompts, max_new_tokens, tok.end_id, 0.0, None, groups)  # greedy
    scores = score_responses(scorer, mine, prompts, responses, tok, device) if mine else torch.zeros(0)
    right = [float(is_correct(e, tok.decode(r))) for e, r in zip(mine, responses)]
    t = torch.tensor([float(scores.sum()), sum(right), float(len(mine))], dtype=torch.float64)
    if groups.dp > 1:
        all_reduce_(t, group=groups.dp_group)
    has_answers = all(e.answer for e in examples)
    return {"reward": float(t[0] / t[2]), "accuracy": float(t[1] / t[2]) if has_answers else None, "n": int(t[2])}


def _engine(model, cfg, groups, lr: float, batch: int):
    pcfg = phase_config(cfg, lr=lr, steps=cfg.ppo.steps, batch_size=batch)
    pcfg.train.precision = cfg.ppo.precision
    engine, optimizer = build_phase_engine(model, pcfg, groups)
    for g in optimizer.param_groups:
        g["lr"] = lr
    engine.eval()  # no dropout: the log-prob ratios compare like with like
    return engine


def rollout_rows(cfg, groups) -> int:
    """Responses per rank and iteration: its share of ppo.rollout_prompts x ppo.samples_per_prompt."""
    return cfg.ppo.rollout_prompts // groups.dp * cfg.ppo.samples_per_prompt


def engines(cfg, groups, actor_model, build_critic_fn) -> tuple:
    """(actor engine, critic engine or None): the critic is built only for ppo.advantage=gae."""
    mb = max(1, rollout_rows(cfg, groups) // cfg.ppo.minibatches)
    actor = _engine(actor_model, cfg, groups, cfg.ppo.actor_lr, mb)
    if cfg.ppo.advantage != "gae":
        return actor, None
    return actor, _engine(build_critic_fn(), cfg, groups, cfg.ppo.critic_lr, mb)


def build_models(cfg, groups):
    """(actor engine, critic engine, reference, reward model, task data)."""
    refuse_multimodal(cfg, "ppo")
    actor_model, task = load_policy(cfg, "sft", merge=False, groups=groups)
    reference, _ = load_policy(cfg, "sft", merge=True, groups=groups)
    for p in reference.parameters():
        p.requires_grad_(False)
    reference.eval()
    if cfg.ppo.reward == "rm":
        reward_model = load_reward_model(cfg, groups)
    else:
        from .rewards import FunctionReward

        reward_model = FunctionReward(cfg.ppo.reward)
    return engines(cfg, groups, actor_model, lambda: build_critic(cfg, groups)) + (reference, reward_model, task)


@dataclass(frozen=True)
class PPOOps:
    """What run_ppo drives, per kind of task: build(cfg, groups) -> (actor engine, critic
    engine, reference, reward, task); experience(examples, actor, reference, critic, reward,
    task, pcfg, generator, groups, dp_group) -> RolloutBatch; accuracy(model, task, examples,
    max_new_tokens, groups) -> {"accuracy", "n", "by_kind"}; sample(model, task, examples, pcfg,
    generator, groups) -> (responses, sequences, context); extra_metrics(cfg) -> dict."""

    build: Callable
    experience: Callable
    accuracy: Callable
    sample: Callable
    extra_metrics: Callable = lambda cfg: {}


def run_ppo(cfg, ops: PPOOps | None = None) -> dict:
    """SPMD: one call per rank; returns the same metrics on every rank (see module doc).
    `ops`: the text task's (TEXT_OPS) or a multimodal run's (posttrain/multimodal/ppo.py)."""
    t0 = time.time()
    cfg = copy.deepcopy(cfg)
    groups = setup_distributed(cfg)
    pc = cfg.ppo
    ops = ops or TEXT_OPS
    build, experience_fn, accuracy_fn, sample_fn = ops.build, ops.experience, ops.accuracy, ops.sample
    actor, critic, reference, reward_model, task = build(cfg, groups)
    if not task.prompts("train"):
        raise ValueError("ppo.prompt_files is empty but the run post-trains on your files: give a prompts JSONL")
    mgr = ppo_checkpoints(cfg)
    state = load_ppo(mgr, cfg, groups, actor, critic) or {"iteration": 0, "history": [], "mlflow_run_id": None}
    if state.get("checkpoint"):
        log.info("resuming PPO at iteration %d from %s", state["iteration"], state["checkpoint"])
    tracker = phase_tracker(cfg, "ppo", groups)
    state["mlflow_run_id"] = tracker.start(config_to_dict(cfg), run_id=state.get("mlflow_run_id"))
    try:
        train, test = task.prompts("train"), task.prompts("test")
        per_rank = pc.rollout_prompts // groups.dp
        while state["iteration"] < pc.steps:
            it = state["iteration"]
            t_it = time.time()
            rng = random.Random((cfg.seed * 1_000_003 + it) * 64 + groups.dp_rank)
            # ppo.samples_per_prompt consecutive rows per prompt (the groups of rloo / group_norm)
            prompts = [train[rng.randrange(len(train))] for _ in range(per_rank)]
            examples = [e for e in prompts for _ in range(pc.samples_per_prompt)]
            # TP ranks of one DP rank must sample the same tokens: seed from the DP rank only
            gen = torch.Generator().manual_seed((cfg.seed * 7919 + it) * 64 + groups.dp_rank)
            batch = experience_fn(
                examples,
                actor.module,
                reference,
                critic.module if critic is not None else None,
                reward_model,
                task,
                pc,
                gen,
                groups,
                dp_group=_dp(groups),
            )
            stats = ppo_update(actor, critic, batch, pc, groups, gen)
            seq_kl = (batch.kl * batch.resp_mask).sum(1)
            stats.update(
                reward=float(batch.scores.mean()),
                kl=float(seq_kl.mean()),
                sample_accuracy=float(batch.correct.mean()),
                response_tokens=float(batch.resp_mask.sum(1).mean()),
            )
            stats = mean_over_dp(stats, groups)
            stats["seconds"] = time.time() - t_it
            tracker.log_metrics({f"ppo/{k}": v for k, v in stats.items()}, step=it + 1)
            state["history"].append({"iteration": it + 1, **{k: round(v, 5) for k, v in stats.items()}})
            state["iteration"] = it + 1
            if groups.rank == 0:
                log.info(
                    "ppo %d/%d reward %.3f kl %.4f acc %.3f clipfrac %.3f vloss %.4f (%.1fs)",
                    it + 1,
                    pc.steps,
                    stats["reward"],
                    stats["kl"],
                    stats["sample_accuracy"],
                    stats["clipfrac"],
                    stats.get("value_loss", 0.0),
                    stats["seconds"],
                )
            if state["iteration"] % pc.save_every == 0 or state["iteration"] == pc.steps:
                save_ppo(
                    mgr,
                    state["iteration"],
                    cfg,
                    groups,
                    actor,
                    critic,
                    {k: v for k, v in state.items() if k != "checkpoint"},
                )
        if cfg.ppo.prompt_files:
            ppo_ev = evaluate_reward(actor.module, task, test, reward_model, pc.max_new_tokens, groups)
            sft_ev = evaluate_reward(reference, task, test, reward_model, pc.max_new_tokens, groups)
            metrics = {"ppo_eval_reward": ppo_ev["reward"], "sft_eval_reward": sft_ev["reward"]}
            if ppo_ev["accuracy"] is not None:
                metrics.update(ppo_accuracy=ppo_ev["accuracy"], sft_accuracy=sft_ev["accuracy"])
        else:
            n_tok = cfg.sft.max_new_tokens
            ppo_ev = accuracy_fn(actor.module, task, test, n_tok, groups)
            sft_ev = accuracy_fn(reference, task, test, n_tok, groups)
            metrics = {
                "ppo_accuracy": ppo_ev["accuracy"],
                "sft_accuracy": sft_ev["accuracy"],
                "ppo_accuracy_by_kind": ppo_ev["by_kind"],
                "sft_accuracy_by_kind": sft_ev["by_kind"],
            }
        metrics.update(eval_examples=ppo_ev["n"], iterations=state["iteration"], reward=cfg.ppo.reward)
        metrics.update(heldout_kl(actor.module, reference, task, test, pc, groups, cfg.seed + 99, sample_fn))
        metrics["router_replay"] = bool(pc.router_replay)
        metrics.update(ops.extra_metrics(cfg))
        hist = state["history"]
        if hist:
            metrics.update(
                reward_mean=hist[-1]["reward"],
                reward_first=hist[0]["reward"],
                sample_accuracy_first=hist[0]["sample_accuracy"],
                sample_accuracy_last=hist[-1]["sample_accuracy"],
                clipfrac_mean=sum(h["clipfrac"] for h in hist) / len(hist),
                approx_kl_mean=sum(h["approx_kl"] for h in hist) / len(hist),
            )
        metrics["seconds"] = round(time.time() - t0, 1)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=pc.steps)
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    write_done(cfg, "ppo", metrics)
    return metrics


TEXT_OPS = PPOOps(build_models, make_experience, evaluate_accuracy, sample_sequences)

__all__ = ["PPOOps", "TEXT_OPS", "evaluate_reward", "heldout_kl", "mean_over_dp", "ppo_update", "run_ppo"]
