"""PPO experience for RLHF: sample responses with KV-cached generation, score them, and lay
everything out per response token.

A rollout row is prompt + response, right-padded (the causal model has no padding mask, and
right padding never changes the logits of earlier positions). Response token j of row b sits
at position P_b + j (P_b = its prompt's length) and is predicted by the logits at
P_b + j - 1, which is also where the critic's value of "the state before token j" is read.
So every per-token tensor is [B, R] over response tokens with a prefix mask, the layout
`ppo_math` works on. The response includes the closing <|end|> when the policy produced it:
stopping is an action too, and the reward model was trained on answers that end with it."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from aion_train.model.generate import generate
from aion_train.parallel.device import module_device, to_device

from . import ppo_math
from .common import full_logits


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, L] prompt + response, right-padded
    resp_pos: torch.Tensor  # [B, R] logits position that predicts each response token
    resp_tokens: torch.Tensor  # [B, R]
    resp_mask: torch.Tensor  # [B, R] float 0/1, a prefix per row
    logp_old: torch.Tensor  # [B, R] actor log-probs when sampled
    logp_ref: torch.Tensor  # [B, R] frozen reference log-probs
    values: torch.Tensor  # [B, R] critic values when sampled
    scores: torch.Tensor  # [B] reward model scores
    rewards: torch.Tensor  # [B, R] -beta * kl (+ score at the last token)
    kl: torch.Tensor  # [B, R] logp_old - logp_ref
    advantages: torch.Tensor  # [B, R] (whitened when ppo.whiten_advantages)
    returns: torch.Tensor  # [B, R] critic targets
    correct: torch.Tensor  # [B] 1.0 where the task checker accepts the response
    # what else the model reads besides input_ids (a multimodal row's modality and media;
    # posttrain/multimodal/models.py), None for text
    context: dict | None = None
    routes: dict | None = None  # {MoE layer: [B, L, k]} experts recorded when logp_old was scored

    def rows(self, idx: torch.Tensor) -> RolloutBatch:
        """The sub-batch of rows `idx` (a minibatch; the index may be on another device, e.g. a
        CPU permutation of a batch on the GPU)."""
        return RolloutBatch(**{f.name: take_rows(getattr(self, f.name), idx) for f in fields(self)})

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(
            **{f.name: _to(getattr(self, f.name), device) for f in fields(self)},
        )


def take_rows(x, idx: torch.Tensor):
    """Rows `idx` of a tensor, of a per-row list, or of every value of a dict of them."""
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: take_rows(v, idx) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)]
    return [x[i] for i in idx.tolist()]


def _to(x, device):
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x.to(device) if isinstance(x, torch.Tensor) else x


def model_call(model, input_ids: torch.Tensor, context: dict | None):
    """model(input_ids) for a text model, model(input_ids, context) for one that reads more."""
    return model(input_ids) if context is None else model(input_ids, context)


@torch.no_grad()
def sample_responses(
    model, prompts: list, max_new_tokens: int, end_id: int, temperature: float, generator: torch.Generator, groups=None
) -> list:
    """KV-cached sampling, prompts batched by equal length. Each response keeps its <|end|> if
    one was produced (and nothing after it). TP ranks draw the same tokens: they hold the same
    gathered logits and a generator in the same state."""
    tp = None if groups is None or groups.tp == 1 else groups.tp_group
    gather = None
    if tp is not None:
        from aion_train.parallel.collectives import gather_last

        gather = lambda lg: gather_last(lg, tp)  # noqa: E731
    was = model.training
    model.eval()
    by_len: dict = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list = [None] * len(prompts)
    device = module_device(model)
    for length in sorted(by_len):
        idx = by_len[length]
        ids = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)
        toks = generate(
            model,
            ids,
            max_new_tokens,
            temperature=temperature,
            eos_id=end_id,
            generator=generator,
            gather_logits=gather,
        )[:, length:].tolist()
        for i, row in zip(idx, toks):
            out[i] = row[: row.index(end_id) + 1] if end_id in row else row
    model.train(was)
    return out


def build_sequences(prompts: list, responses: list, pad_id: int):
    """(input_ids [B, L], resp_pos [B, R], resp_tokens [B, R], resp_mask [B, R])."""
    if len(prompts) != len(responses):
        raise ValueError(f"build_sequences: {len(prompts)} prompts but {len(responses)} responses")
    if any(len(r) == 0 for r in responses):
        raise ValueError("build_sequences: every response needs at least one token")
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    R = max(len(r) for r in responses)
    B = len(prompts)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    resp_pos = torch.zeros((B, R), dtype=torch.long)
    resp_tokens = torch.full((B, R), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((B, R))
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        input_ids[b, : len(seq)] = torch.as_tensor(seq)
        resp_pos[b] = len(p) - 1 + torch.arange(R).clamp(max=len(r) - 1)
        resp_tokens[b, : len(r)] = torch.as_tensor(list(r))
        resp_mask[b, : len(r)] = 1.0
    return input_ids, resp_pos, resp_tokens, resp_mask


def _at_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, L, ...] read at pos [B, R] -> [B, R, ...]."""
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), pos]


def response_logprobs(
    model, input_ids, resp_pos, resp_tokens, groups=None, with_entropy: bool = False, context: dict | None = None
):
    """log pi(response token | prefix) [B, R] (and the entropy of pi at those positions), on
    the model's device (the inputs are moved there)."""
    input_ids, resp_pos, resp_tokens = to_device((input_ids, resp_pos, resp_tokens), module_device(model))
    logits = _at_positions(full_logits(model_call(model, input_ids, context).logits, groups), resp_pos)
    logp = ppo_math.token_logprobs(logits, resp_tokens)
    return (logp, ppo_math.entropy_from_logits(logits)) if with_entropy else logp


def response_values(critic, input_ids, resp_pos, context: dict | None = None) -> torch.Tensor:
    input_ids, resp_pos = to_device((input_ids, resp_pos), module_device(critic))
    return _at_positions(model_call(critic, input_ids, context), resp_pos)


def scored_logprobs(actor, batch_ids, resp_pos, resp_tokens, groups, pcfg, context=None):
    """(logp_old, routes): the actor's log-probs of a fresh rollout and, with ppo.router_replay,
    the experts each token was routed to in that pass (None otherwise)."""
    if not getattr(pcfg, "router_replay", False):
        return response_logprobs(actor, batch_ids, resp_pos, resp_tokens, groups, context=context), None
    from aion_train.model.moe.router_replay import RouterReplay

    replay = RouterReplay(actor)
    if not replay.layers:
        raise ValueError("ppo.router_replay=true but the policy has no MoE layer")
    with replay.recording():
        logp = response_logprobs(actor, batch_ids, resp_pos, resp_tokens, groups, context=context)
    return logp, replay.take()


@torch.no_grad()
def score_responses(reward_model, examples, prompts, responses, tok, device) -> torch.Tensor:
    """[B] scores of prompt + response: a reward model at the last token, or (a
    `rewards.FunctionReward`) a function of the decoded completions."""
    from .common import pad_right

    if getattr(reward_model, "scores_text", False):
        return reward_model.score(examples, [tok.decode(r) for r in responses]).to(device)
    rm_ids, rm_mask = to_device(
        pad_right([list(p) + list(r) for p, r in zip(prompts, responses)], tok.pad_id), module_device(reward_model)
    )
    return reward_model(rm_ids, rm_mask).float().to(device)


@torch.no_grad()
def make_experience(
    examples: list, actor, reference, critic, reward_model, task, pcfg, generator, groups=None, dp_group=None
) -> RolloutBatch:
    """Sample one response per example, then log-probs (actor, reference), values, reward
    model scores, per-token KL-penalised rewards, GAE advantages (whitened over every
    data-parallel rank's batch when `dp_group` is given) and returns. `pcfg` = cfg.ppo."""
    from .task import is_correct

    tok = task.tokenizer
    prompts = [e.prompt_ids for e in examples]
    responses = sample_responses(actor, prompts, pcfg.max_new_tokens, tok.end_id, pcfg.temperature, generator, groups)
    # every tensor of the batch lives on the actor's device (the other models are put on the
    # same one: aion_train/posttrain/common.build_parallel_model)
    device = module_device(actor)
    seqs = to_device(build_sequences(prompts, responses, tok.pad_id), device)

    def outcome():
        scores = score_responses(reward_model, examples, prompts, responses, tok, device)
        return scores, [float(is_correct(e, tok.decode(r))) for e, r in zip(examples, responses)]

    return experience(seqs, outcome, actor, reference, critic, pcfg, groups, dp_group)


@torch.no_grad()
def experience(seqs, outcome, actor, reference, critic, pcfg, groups=None, dp_group=None, context=None):
    """The RolloutBatch of sampled sequences `seqs` (build_sequences' four tensors, on the
    actor's device) and `outcome()` -> (reward scores [B], checker verdicts [B]): log-probs of the actor
    (its routes recorded with ppo.router_replay) and the reference, values, KL-penalised
    per-token rewards, GAE advantages (whitened over every data-parallel rank's batch when
    `dp_group` is given) and returns. Without a critic (None: ppo.advantage rloo / group_norm)
    the rows come in groups of ppo.samples_per_prompt samples of one prompt, the advantages are
    ppo_math.group_advantages' and values / returns are 0. `context`: what a multimodal model reads besides ids."""
    input_ids, resp_pos, resp_tokens, resp_mask = seqs
    device = input_ids.device
    for m in (actor, reference, critic):
        if m is not None:
            m.eval()  # and left so: PPO trains without dropout
    logp_old, routes = scored_logprobs(actor, input_ids, resp_pos, resp_tokens, groups, pcfg, context)
    logp_ref = response_logprobs(reference, input_ids, resp_pos, resp_tokens, groups, context=context)
    scores, correct = outcome()
    scores = scores.float().to(device)
    rewards, kl = ppo_math.kl_penalty_rewards(scores, logp_old, logp_ref, resp_mask, pcfg.beta)
    if critic is None:  # ppo.advantage rloo / group_norm: the other samples of the prompt are the baseline
        values = torch.zeros_like(rewards)
        advantages = ppo_math.group_advantages(rewards, resp_mask, pcfg.samples_per_prompt, pcfg.advantage)
        returns = values
    else:
        values = response_values(critic, input_ids, resp_pos, context) * resp_mask
        advantages, returns = ppo_math.gae(rewards, values, resp_mask, pcfg.gamma, pcfg.lam)
    if pcfg.whiten_advantages:  # group baselines are kept: scaled, not shifted
        norm = ppo_math.whiten if critic is not None else ppo_math.unit_scale
        advantages = norm(advantages, resp_mask, group=dp_group)
    return RolloutBatch(
        input_ids,
        resp_pos,
        resp_tokens,
        resp_mask,
        logp_old * resp_mask,
        logp_ref * resp_mask,
        values,
        scores,
        rewards,
        kl,
        advantages,
        returns,
        torch.tensor(correct, device=device),
        context=context,
        routes=routes,
    )
