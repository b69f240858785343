"""PPO maths against textbook formulas and torch.distributions, the rollout layout against
unpadded per-row computation and uncached sampling, a PPO loop with real DeepSpeed engines
learning a rule reward, and (slow) run_ppo end to end with an exact resume."""

import numpy as np
import pytest
import torch

from aion_train.posttrain import ppo_math


def prefix_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]).float()


def gae_reference(r, v, n, gamma, lam, bootstrap):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_k = r_k + gamma V_{k+1} - V_k, V_n = bootstrap."""
    vals = list(v[:n]) + [bootstrap]
    deltas = [r[k] + gamma * vals[k + 1] - vals[k] for k in range(n)]
    return [sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t)) for t in range(n)]


@pytest.mark.parametrize("use_bootstrap", [False, True])
def test_gae_equals_direct_sum_of_discounted_td_residuals(use_bootstrap):
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 5, 7, 0.9, 0.8
    r, v = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [7, 1, 4, 6, 3]
    mask = prefix_mask(lengths, T).double()
    boot = torch.randn(B, generator=g, dtype=torch.float64) if use_bootstrap else None
    adv, ret = ppo_math.gae(r, v, mask, gamma, lam, bootstrap=boot)
    for b, n in enumerate(lengths):
        ref = gae_reference(r[b].tolist(), v[b].tolist(), n, gamma, lam, float(boot[b]) if use_bootstrap else 0.0)
        np.testing.assert_allclose(adv[b, :n].numpy(), ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ret[b, :n].numpy(), np.array(ref) + v[b, :n].numpy(), rtol=1e-12, atol=1e-12)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


def test_gae_limits_lambda_one_is_reward_to_go_and_zero_is_td():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.float64)
    _, ret = ppo_math.gae(r, v, mask, 0.95, 1.0)
    for t in range(6):
        expected = sum(0.95 ** (k - t) * r[:, k] for k in range(t, 6))
        torch.testing.assert_close(ret[:, t], expected)
    adv0, _ = ppo_math.gae(r, v, mask, 0.95, 0.0)
    v_next = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(adv0, r + 0.95 * v_next - v)
    with pytest.raises(ValueError, match="prefix"):
        ppo_math.gae(r, v, torch.tensor([[1.0, 0, 1, 1, 1, 1]] * 3, dtype=torch.float64), 1.0, 1.0)


def test_whiten_uses_masked_statistics():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3 + 2
    mask = prefix_mask([9, 2, 5, 7], 9).double()
    w = ppo_math.whiten(x, mask)
    sel = x[mask.bool()].numpy()
    np.testing.assert_allclose(w[mask.bool()].numpy(), (sel - sel.mean()) / np.sqrt(sel.var() + 1e-8), rtol=1e-10)
    assert torch.all(w[~mask.bool()] == 0)
    kept = ppo_math.whiten(x, mask, shift_mean=False)
    assert float(ppo_math.masked_mean(kept, mask)) == pytest.approx(sel.mean(), rel=1e-9)
    scaled = ppo_math.unit_scale(x, mask)  # group-baselined advantages: scaled, not shifted
    np.testing.assert_allclose(scaled[mask.bool()].numpy(), sel / np.sqrt(sel.var() + 1e-8), rtol=1e-10)
    assert torch.all(scaled[~mask.bool()] == 0)


def _whiten_on_ranks(rows):
    import torch.distributed as dist

    r = dist.get_rank()
    x = torch.tensor(rows[r][0], dtype=torch.float64)
    m = torch.tensor(rows[r][1], dtype=torch.float64)
    return ppo_math.whiten(x, m, group=dist.group.WORLD).tolist()


def test_whitening_over_data_parallel_ranks_equals_whitening_the_whole_batch():
    from aion_train.parallel.spawn import run_ranks

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    m = prefix_mask([5, 3, 1, 4], 5).double()
    full = ppo_math.whiten(x, m)
    rows = [(x[:2].tolist(), m[:2].tolist()), (x[2:].tolist(), m[2:].tolist())]
    rank0 = run_ranks(_whiten_on_ranks, 2, rows, timeout_s=60)
    np.testing.assert_allclose(np.array(rank0), full[:2].numpy(), rtol=1e-12)


def test_clipped_surrogate_value_gradient_and_clipfrac():
    g = torch.Generator().manual_seed(4)
    logp_old = torch.randn(3, 8, generator=g, dtype=torch.float64)
    logp = (logp_old + 0.4 * torch.randn(3, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(3, 8, generator=g, dtype=torch.float64)
    mask = prefix_mask([8, 5, 2], 8).double()
    eps = 0.2
    loss, info = ppo_math.clipped_surrogate(logp, logp_old, adv, mask, eps)
    loss.backward()
    ratio = torch.exp(logp.detach() - logp_old)
    terms, grads, clipped = [], torch.zeros_like(ratio), 0
    n = int(mask.sum())
    for i, j in mask.nonzero().tolist():
        rho, a = float(ratio[i, j]), float(adv[i, j])
        unc, clp = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
        terms.append(-min(unc, clp))
        if clp < unc:  # the clipped (constant) term is active: no gradient
            clipped += 1
        else:
            grads[i, j] = -a * rho / n
    assert float(loss.detach()) == pytest.approx(np.mean(terms), rel=1e-12)
    torch.testing.assert_close(logp.grad, grads)
    assert float(info["clipfrac"]) == pytest.approx(clipped / n)
    assert 0 < clipped < n
    lr = logp.detach() - logp_old
    expected_kl = ((torch.expm1(lr) - lr) * mask).sum() / mask.sum()
    assert float(info["approx_kl"]) == pytest.approx(float(expected_kl), rel=1e-12)


def test_clipped_value_loss_against_elementwise_formula():
    g = torch.Generator().manual_seed(5)
    v_old, ret = (
        torch.randn(2, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 6, generator=g, dtype=torch.float64),
    )
    v = v_old + 0.5 * torch.randn(2, 6, generator=g, dtype=torch.float64)
    mask = prefix_mask([6, 4], 6).double()
    loss, info = ppo_math.clipped_value_loss(v, v_old, ret, mask, clip=0.2)
    vals, n_clip = [], 0
    for i, j in mask.nonzero().tolist():
        vc = float(v_old[i, j]) + min(max(float(v[i, j] - v_old[i, j]), -0.2), 0.2)
        a, b = (float(v[i, j]) - float(ret[i, j])) ** 2, (vc - float(ret[i, j])) ** 2
        vals.append(0.5 * max(a, b))
        n_clip += b > a
    assert float(loss) == pytest.approx(np.mean(vals), rel=1e-12)
    assert float(info["vclipfrac"]) == pytest.approx(n_clip / len(vals))


def test_entropy_logprobs_and_kl_estimators_against_torch_distributions():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 3, 11, generator=g)
    dist = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(ppo_math.entropy_from_logits(logits), dist.entropy(), rtol=1e-5, atol=1e-5)
    tokens = torch.randint(0, 11, (4, 3), generator=g)
    torch.testing.assert_close(ppo_math.token_logprobs(logits, tokens), dist.log_prob(tokens))
    p = torch.distributions.Categorical(logits=torch.tensor([2.0, 0.5, -1.0, 0.0]))
    q = torch.distributions.Categorical(logits=torch.tensor([1.0, 1.0, 0.0, -0.5]))
    torch.manual_seed(0)
    x = p.sample((200_000,))
    est = ppo_math.kl_estimators(p.log_prob(x), q.log_prob(x))
    exact = float(torch.distributions.kl_divergence(p, q))
    assert float(est["k1"].mean()) == pytest.approx(exact, rel=0.03)
    assert float(est["k3"].mean()) == pytest.approx(exact, rel=0.03)
    assert float(est["k3"].min()) >= 0.0


def test_kl_penalty_rewards_put_the_score_on_the_last_valid_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -9.0]])
    logp_ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, kl = ppo_math.kl_penalty_rewards(torch.tensor([2.0, -1.0]), logp, logp_ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.1, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.01 - 1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least one valid token"):
        ppo_math.kl_penalty_rewards(torch.zeros(2), logp, logp_ref, mask * 0, 0.1)


def test_group_advantages_against_rloo_and_grpo_formulas():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 3, generator=g)
    mask = prefix_mask([3, 1, 2, 3, 2, 1, 3, 3, 1, 2, 2, 3], 3)
    ret = (rewards * mask).sum(1).tolist()
    G = 4
    rloo, grpo = (
        ppo_math.group_advantages(rewards, mask, G, "rloo"),
        ppo_math.group_advantages(rewards, mask, G, "group_norm"),
    )
    for i in range(12):
        group = ret[i // G * G : i // G * G + G]
        others = [r for j, r in enumerate(group) if j != i % G]
        want_rloo = ret[i] - sum(others) / (G - 1)
        want_grpo = (ret[i] - np.mean(group)) / (np.std(group, ddof=1) + 1e-6)
        n = int(mask[i].sum())
        torch.testing.assert_close(rloo[i, :n], torch.full((n,), want_rloo), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grpo[i, :n], torch.full((n,), float(want_grpo)), rtol=1e-5, atol=1e-6)
        assert float(rloo[i, n:].abs().sum()) == 0.0 and float(grpo[i, n:].abs().sum()) == 0.0
    # RLOO's (and GRPO's) advantages of a group sum to 0 (read at each row's first token)
    torch.testing.assert_close(rloo[:, 0].view(3, G).sum(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(grpo[:, 0].view(3, G).sum(1), torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="groups of 5"):
        ppo_math.group_advantages(rewards, mask, 5, "rloo")
    with pytest.raises(ValueError, match="unknown kind"):
        ppo_math.group_advantages(rewards, mask, 4, "vtrace")


def test_config_refuses_group_advantages_without_groups():
    from aion_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="samples_per_prompt=1 must be >= 2"):
        load_config("configs/rlhf_tiny.yaml", ["ppo.advantage=rloo"])
    with pytest.raises(ConfigError, match="ppo.advantage='ac'"):
        load_config("configs/rlhf_tiny.yaml", ["ppo.advantage=ac", "ppo.samples_per_prompt=2"])
    cfg = load_config("configs/rlhf_tiny.yaml", ["ppo.advantage=group_norm", "ppo.samples_per_prompt=4"])
    assert cfg.ppo.samples_per_prompt == 4


# -- rollouts on a tiny random transformer ---------------------------------------------------------
def tiny_model_cfg(vocab=32):
    from aion_train.config.schema import ModelConfig, MoEConfig

    return ModelConfig(
        vocab_size=vocab,
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_ff=64,
        max_seq_len=64,
        kernels="torch",
        moe=MoEConfig(every=0),
    )


def test_response_logprobs_of_a_padded_batch_equal_each_row_alone():
    from aion_train.model import build_model
    from aion_train.posttrain.rollout import build_sequences, response_logprobs

    model = build_model(tiny_model_cfg(), seed=0).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    responses = [[10, 31], [11], [12, 13, 14]]
    ids, pos, toks, mask = build_sequences(prompts, responses, pad_id=0)
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    with torch.no_grad():
        logp = response_logprobs(model, ids, pos, toks)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            seq = torch.tensor([p + r])
            lp = torch.log_softmax(model(seq).logits[0].float(), -1)
            expected = [lp[len(p) - 1 + j, tok] for j, tok in enumerate(r)]
            torch.testing.assert_close(logp[b, : len(r)], torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_kv_cached_sampling_matches_uncached_sampling_and_stops_at_end():
    from aion_train.model import build_model
    from aion_train.posttrain.rollout import sample_responses

    model = build_model(tiny_model_cfg(), seed=1).eval()
    end = 5  # a frequent token, so some rows stop early
    prompts = [[1, 2, 3, 4], [7, 8, 9, 10], [3, 3, 3, 3], [11, 12, 13, 14]]
    got = sample_responses(model, prompts, 6, end, 1.5, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    seqs = torch.tensor(prompts)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(6):  # full recompute every step, same draws
            probs = torch.softmax(model(seqs).logits[:, -1].float() / 1.5, -1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            nxt = torch.where(done[:, None], torch.full_like(nxt, end), nxt)
            done |= nxt[:, 0] == end
            seqs = torch.cat([seqs, nxt], 1)
            if bool(done.all()):
                break
    for row, prompt_len, out in zip(seqs.tolist(), [4] * 4, got):
        new = row[prompt_len:]
        assert out == (new[: new.index(end) + 1] if end in new else new)
    assert any(o[-1] == end for o in got) or all(len(o) == 6 for o in got)


class RuleReward(torch.nn.Module):
    """Score 1 when the first response token (position 4: prompts have 4 tokens) is 7."""

    def forward(self, input_ids, attention_mask):
        return (input_ids[:, 4] == 7).float()


class RuleTask:
    """The parts of TaskData that rollouts use: a tokenizer with end/pad ids and decode."""

    class tokenizer:
        end_id, pad_id = 31, 0

        @staticmethod
        def decode(ids):
            return " ".join(str(i) for i in ids if i != 31)


def _ppo_on_rule_reward(iterations, advantage="gae"):
    """2 ranks: LoRA actor + critic as DeepSpeed engines, frozen reference, rule reward; with
    advantage rloo: no critic, 8 prompts x 4 samples per rank."""
    import copy
    import random

    import torch.distributed as dist

    from aion_train.config.schema import Config
    from aion_train.model import build_model
    from aion_train.posttrain.common import setup_distributed
    from aion_train.posttrain.critic import Critic
    from aion_train.posttrain.lora import apply_lora
    from aion_train.posttrain.ppo import _engine, ppo_update
    from aion_train.posttrain.rollout import make_experience
    from aion_train.posttrain.task import Example

    cfg = Config()
    cfg.model = tiny_model_cfg()
    cfg.train.precision, cfg.train.zero_stage, cfg.parallel.timeout_s, cfg.data.seq_len = "fp32", 1, 60, 32
    cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = True, 4, 8.0, 0.0
    cfg.lora.targets = ["q_proj", "v_proj", "w_up", "lm_head"]  # a random tiny LM needs the head adapted
    cfg.ppo.rollout_prompts, cfg.ppo.max_new_tokens, cfg.ppo.beta = 64, 2, 0.02
    G = 1 if advantage == "gae" else 4
    cfg.ppo.advantage, cfg.ppo.samples_per_prompt = advantage, G
    groups = setup_distributed(cfg)
    base = build_model(cfg.model, seed=0)
    reference = copy.deepcopy(base).eval().requires_grad_(False)
    apply_lora(base, cfg.lora, seed=0)
    critic = Critic(build_model(cfg.model, seed=1), cfg.model.d_model)
    actor = _engine(base, cfg, groups, 1e-2, 16)
    critic_engine = _engine(critic, cfg, groups, 1e-3, 16) if advantage == "gae" else None
    scores = []
    for it in range(iterations):
        rng = random.Random(it * 2 + groups.dp_rank)
        prompts = [Example([], [rng.randrange(1, 31) for _ in range(4)], "7") for _ in range(32 // G)]
        examples = [e for e in prompts for _ in range(G)]
        gen = torch.Generator().manual_seed(it * 2 + groups.dp_rank)
        batch = make_experience(
            examples,
            actor.module,
            reference,
            critic_engine.module if critic_engine else None,
            RuleReward(),
            RuleTask,
            cfg.ppo,
            gen,
            groups,
            dp_group=groups.dp_group,
        )
        assert torch.all(batch.correct <= batch.scores)  # exactly "7" implies a first token 7
        if critic_engine is None:  # the samples of one prompt: advantages centred within the group
            group_sum = (batch.advantages[:, 0] * batch.resp_mask[:, 0]).view(-1, G).sum(1)
            assert batch.values.abs().sum() == 0 and float(group_sum.abs().max()) < 5e-4 * G
        stats = ppo_update(actor, critic_engine, batch, cfg.ppo, groups, gen)
        scores.append(float(batch.scores.mean()))
    flat = torch.cat([p.detach().flatten() for p in actor.module.parameters() if p.requires_grad])
    both = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    return {
        "scores": scores,
        "rank_diff": float((both[0] - both[1]).abs().max()),
        "stats": stats,
        "n_trainable": int(flat.numel()),
        "n_total": sum(p.numel() for p in actor.module.parameters()),
    }


@pytest.mark.parametrize("advantage", ["gae", "rloo"])
def test_ppo_with_deepspeed_engines_learns_a_rule_reward_on_two_ranks(advantage):
    from aion_train.parallel.spawn import run_ranks

    out = run_ranks(_ppo_on_rule_reward, 2, 20, advantage, timeout_s=300)
    first, last = np.mean(out["scores"][:3]), np.mean(out["scores"][-3:])
    assert first < 0.15  # random init: ~1/32 of first tokens are 7
    assert last > 0.6, out["scores"]
    assert out["rank_diff"] == 0.0  # data-parallel ranks hold the same adapters
    assert out["n_trainable"] < out["n_total"] / 4  # only the adapters train
    for k in ("policy_loss", "entropy", "clipfrac", "approx_kl") + (("value_loss",) if advantage == "gae" else ()):
        assert np.isfinite(out["stats"][k])
    assert ("value_loss" in out["stats"]) == (advantage == "gae")  # rloo trains no critic


# -- run_ppo end to end (SFT and RM shrunk to seconds) --------------------------------------------
TINY_PHASES = [
    "sft.base_steps=40",
    "sft.steps=10",
    "sft.eval_examples=24",
    "sft.chat_examples=20",
    "sft.max_examples=200",
    "sft.batch_size=16",
    "rm.steps=10",
    "rm.train_pairs=100",
    "rm.eval_pairs=20",
    "rm.batch_size=16",
    "ppo.rollout_prompts=8",
    "ppo.minibatches=2",
    "ppo.save_every=2",
]


def _phases(run_dir, overrides, with_prereqs):
    from aion_train.commands.ppo import rlhf
    from aion_train.config import load_config
    from aion_train.posttrain.ppo import run_ppo

    cfg = load_config("configs/rlhf_tiny.yaml", [f"run_dir={run_dir}"] + TINY_PHASES + overrides)
    return rlhf(cfg) if with_prereqs else run_ppo(cfg)


def _actor_at(run_dir, step):
    from safetensors.torch import load_file

    return load_file(f"{run_dir}/ppo/checkpoints/step_{step:08d}/actor.rank00000.safetensors")


@pytest.mark.slow
def test_run_ppo_end_to_end_logs_metrics_and_resumes_exactly(tmp_path):
    import json
    import shutil

    from aion_train.parallel.spawn import run_ranks

    a, b = tmp_path / "straight", tmp_path / "resumed"
    straight = run_ranks(_phases, 1, str(a), ["ppo.steps=4"], True, timeout_s=900)
    for key in ("ppo_accuracy", "sft_accuracy", "ppo_kl", "ppo_kl_k3", "reward_mean"):
        assert np.isfinite(straight[key]), key
    assert straight["iterations"] == 4 and straight["ppo_kl_k3"] >= 0
    assert json.loads((a / "ppo" / "done.json").read_text())["ppo_accuracy"] == straight["ppo_accuracy"]
    # the same SFT / RM, PPO stopped after 2 iterations, then continued to 4
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("ppo", "mlflow.db"))
    run_ranks(_phases, 1, str(b), ["ppo.steps=2"], False, timeout_s=600)
    assert (b / "ppo" / "checkpoints" / "step_00000002").is_dir()
    resumed = run_ranks(_phases, 1, str(b), ["ppo.steps=4"], False, timeout_s=600)
    assert resumed["iterations"] == 4
    sa, sb = _actor_at(a, 4), _actor_at(b, 4)
    assert sa.keys() == sb.keys() and all(".lora_" in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6)
    assert resumed["ppo_accuracy"] == pytest.approx(straight["ppo_accuracy"])
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{a}/mlflow.db")
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id])
        if r.info.run_name.endswith("-ppo")
    ]
    assert len(runs) == 1
    history = {
        k: client.get_metric_history(runs[0].info.run_id, f"ppo/{k}")
        for k in ("reward", "kl", "clipfrac", "entropy", "value_loss")
    }
    assert all(len(h) == 4 for h in history.values()), {k: len(h) for k, h in history.items()}
