"""Unit tests of aion_train/serve: sampling, the batched engine, streaming enforcement,
detokenizing, the audit log and checkpoint loading (synthetic checkpoints in TP/EP layouts,
SFT adapters, PPO actors). Fast: tiny random models, no server (tests/test_serve.py has the
end-to-end tests on trained checkpoints)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aion_train.config import load_config
from aion_train.model import build_model, generate
from aion_train.policy import Policy, enforce
from aion_train.policy.schema import default_policy
from aion_train.serve.audit import GENESIS, AuditError, AuditLog, verify
from aion_train.serve.engine import Engine, Row
from aion_train.serve.policy_runtime import StreamEnforcer, pattern_width, rule_actions
from aion_train.serve.sampling import SamplingParams, choice_generator, sample_next
from aion_train.serve.scheduler import Job, Scheduler
from aion_train.serve.text import Detokenizer, StopStrings, stable_prefix

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model_cfg(**over):
    cfg = load_config(
        str(REPO / "configs" / "tiny_cpu.yaml"),
        [
            "model.vocab_size=400",
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.d_ff=128",
            "model.max_seq_len=96",
            "model.moe.n_experts=4",
            "model.moe.d_ff_expert=64",
            "model.kernels=torch",
            "data.seq_len=64",
            *[f"{k}={v}" for k, v in over.items()],
        ],
    )
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(tiny_model_cfg().model, seed=3).eval()
    return m


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from pydoc_data.topics import topics

    from aion_train.data import Tokenizer
    from aion_train.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(list(topics.values())[:80], str(path), 400)
    return Tokenizer(str(path))


# ------------------------------------------------------------------------- sampling
def test_sampling_is_seeded_per_choice_and_respects_top_k_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = SamplingParams(temperature=1.0)
    a = [sample_next(logits, p, choice_generator(7, 0)) for _ in range(3)]
    gen = choice_generator(7, 0)
    b = [sample_next(logits, p, gen) for _ in range(200)]
    gen2 = choice_generator(7, 0)
    assert [sample_next(logits, p, gen2) for _ in range(200)] == b  # same seed, same draws
    assert a == [b[0]] * 3
    assert len(set(b)) > 3  # it does sample
    k2 = [sample_next(logits, SamplingParams(top_k=2), choice_generator(1, i)) for i in range(200)]
    assert set(k2) == {0, 1}
    tp = [sample_next(logits, SamplingParams(top_p=0.5), choice_generator(1, i)) for i in range(200)]
    assert set(tp) == {0}  # p(0) = 0.55 >= 0.5
    assert sample_next(logits, SamplingParams(temperature=0.0), None) == 0
    # choices of one request have different streams
    assert choice_generator(7, 0).initial_seed() != choice_generator(7, 1).initial_seed()


# ------------------------------------------------------------------------- engine
def _run(engine, prompts, params, max_new):
    rows = [
        Row(
            prompt_ids=p,
            params=params,
            max_new=max_new,
            generator=None if params.greedy else choice_generator(params.seed, i),
        )
        for i, p in enumerate(prompts)
    ]
    engine.run(rows)
    return [r.tokens for r in rows]


def test_greedy_equals_model_generate_and_batching_changes_nothing(model, one_thread):
    engine = Engine(model, eos_ids=())
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 400) for _ in range(n)] for n in (3, 11, 7, 11, 1)]
    greedy = SamplingParams(temperature=0.0)
    alone = [_run(engine, [p], greedy, 12)[0] for p in prompts]
    for p, toks in zip(prompts, alone):  # the project's own KV-cached generate
        ref = generate(model, torch.tensor([p]), 12)[0, len(p) :].tolist()
        assert toks == ref
    assert _run(engine, prompts, greedy, 12) == alone  # ragged batch, fp32: identical
    sampled = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=11)
    one_by_one = [_run(engine, [p], sampled, 10)[0] for p in prompts[:1]]
    assert _run(engine, prompts[:1], sampled, 10) == one_by_one


def test_rows_end_independently_eos_stop_and_length(model, one_thread):
    greedy = SamplingParams(temperature=0.0)
    base = Engine(model, eos_ids=())
    prompt = [5, 6, 7, 8]
    ref = _run(base, [prompt], greedy, 10)[0]
    eos_engine = Engine(model, eos_ids=(ref[3],))
    r = Row(prompt_ids=prompt, params=greedy, max_new=10)
    eos_engine.run([r])
    first = ref.index(ref[3])
    assert r.tokens == ref[:first] and r.finish_reason == "stop"
    seen, finished = [], []
    rows = [
        Row(
            prompt_ids=prompt,
            params=greedy,
            max_new=10,
            sink=lambda t, i: (seen.append(t), len(seen) >= 2)[1],
            on_finish=lambda row: finished.append("a"),
        ),
        Row(prompt_ids=[9, 10], params=greedy, max_new=5, on_finish=lambda row: finished.append("b")),
    ]
    base.run(rows)
    assert rows[0].tokens == ref[:2] and rows[0].finish_reason == "stop"
    assert len(rows[1].tokens) == 5 and rows[1].finish_reason == "length"
    assert finished == ["a", "b"]
    assert rows[1].tokens == _run(base, [[9, 10]], greedy, 5)[0]
    # max_new 0 with prompt scoring (echo): log p(prompt[t] | prompt[:t]) equals a full forward
    r = Row(prompt_ids=prompt, params=SamplingParams(temperature=0, logprobs=2), max_new=0, prompt_logprobs=True)
    base.run([r])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    assert r.tokens == [] and r.finish_reason == "length" and r.prompt_infos[0] is None
    for t in range(1, 4):
        assert abs(r.prompt_infos[t].logprob - float(lp[t - 1, prompt[t]])) < 1e-5


def test_scheduler_batches_queued_jobs_and_each_gets_its_own_result(model, one_thread):
    engine = Engine(model, eos_ids=())
    greedy = SamplingParams(temperature=0.0)
    prompts = [[4, 5, 6], [7, 8, 9, 10, 11], [12], [13, 14]]
    alone = [_run(engine, [p], greedy, 6)[0] for p in prompts]
    sched = Scheduler(engine, max_batch=3)
    jobs = [Job(rows=[Row(prompt_ids=p, params=greedy, max_new=6)]) for p in prompts]
    for j in jobs:  # queued before the worker starts: it takes 3, then 1
        sched._q.put(j)
    sched.start()
    for j in jobs:
        assert j.done.wait(60)
    sched.stop()
    assert [j.rows[0].tokens for j in jobs] == alone
    assert sched.batches == 2


def test_jobs_join_a_running_batch_between_steps_and_each_equals_its_solo_run(model, one_thread):
    """Continuous batching: B arrives while A decodes (A's third token submits it), C while
    both do; all three then decode in one batch (ragged widths merged by left padding), B
    leaves first; each equals its run alone (fp32, greedy)."""
    engine = Engine(model, eos_ids=())
    greedy = SamplingParams(temperature=0.0)
    pa, pb, pc = [4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [17, 18]
    alone = {k: _run(engine, [p], greedy, n)[0] for k, p, n in (("a", pa, 14), ("b", pb, 4), ("c", pc, 9))}
    sched = Scheduler(engine, max_batch=4)
    seen_rows: list[int] = []

    def sink_b(tok, info):
        seen_rows.append(sched.last_batch_rows)
        if len(jobs["b"].rows[0].tokens) == 2:
            jobs["c"] = sched.submit(Job(rows=[Row(prompt_ids=pc, params=greedy, max_new=9)]))
        return False

    def sink_a(tok, info):
        if len(jobs["a"].rows[0].tokens) == 3:
            jobs["b"] = sched.submit(Job(rows=[Row(prompt_ids=pb, params=greedy, max_new=4, sink=sink_b)]))
        return False

    jobs: dict[str, Job] = {}
    sched.start()
    jobs["a"] = sched.submit(Job(rows=[Row(prompt_ids=pa, params=greedy, max_new=14, sink=sink_a)]))
    assert jobs["a"].done.wait(60)
    for k in "bc":
        assert jobs[k].done.wait(60)
    sched.stop()
    assert {k: j.rows[0].tokens for k, j in jobs.items()} == alone
    assert 3 in seen_rows  # a, b and c decoded in one step
    assert sched.batches == 3  # three prefills, one running batch
    assert all(j.error is None for j in jobs.values())


def test_kv_cache_edits_keep_each_rows_keys():
    from aion_train.model import KVCache

    g = torch.Generator().manual_seed(0)
    k = [torch.randn(2, 5, 1, 3, generator=g) for _ in range(2)]
    cache = KVCache.from_tensors(k, [x + 1 for x in k])
    step = torch.randn(2, 1, 1, 3, generator=g)
    full_k, _ = cache.update(0, step, step)
    cache.update(1, step, step)
    assert torch.equal(full_k, torch.cat([k[0], step], 1)) and cache.length == 6
    cache.left_pad(2)
    assert cache.length == 8 and torch.equal(cache.keys[0][:, 2:], full_k) and not cache.keys[0][:, :2].any()
    cache.drop_leading(3)
    assert torch.equal(cache.keys[0], full_k[:, 1:])
    cache.select_rows(torch.tensor([1]))
    other = KVCache.from_tensors([x[:1] * 2 for x in cache.keys], [x[:1] for x in cache.values])
    cache.cat_rows(other)
    assert torch.equal(cache.keys[0], torch.cat([full_k[1:, 1:], full_k[1:, 1:] * 2]))


# ------------------------------------------------------------------------- streaming enforcement
def pol(rules=(), **kw) -> Policy:
    doc = default_policy()
    doc.update(jurisdiction="xx-test", version="1.0.0", rules=list(rules), **kw)
    return Policy.from_document(doc)


VOWELS = pol([{"id": "vowels", "action": "redact", "patterns": ["[aeiouAEIOU]"], "replacement": "*"}])
POLICIES = {
    "default": Policy.from_document(default_policy()),
    "vowels": VOWELS,
    "chain": pol(
        [
            {"id": "a2bb", "action": "redact", "patterns": ["a"], "replacement": "bb"},
            {"id": "bbb", "action": "redact", "patterns": ["bbb"], "replacement": "X"},
            {"id": "terms", "action": "redact", "terms": ["foo", "Bär"], "replacement": "<t>"},
            {"id": "fl", "action": "flag", "terms": ["ok"]},
        ]
    ),
    "bounded": pol(
        [
            {"id": "sec", "action": "redact", "patterns": [r"secret[0-9]{2,3}\b", r"(?i)\bab\b"]},
            {"id": "e", "action": "redact", "patterns": ["é"], "replacement": "ë"},
        ],
        max_output_chars=40,
        required_notices=["AI generated."],
    ),
    "unbounded": pol([{"id": "num", "action": "redact", "patterns": ["[0-9]+"], "replacement": "#"}]),
    "multiword": pol([{"id": "mw", "action": "redact", "terms": ["foo bar"]}]),
    "block": pol(
        [{"id": "bad", "action": "block", "terms": ["bomb"]}, {"id": "v", "action": "redact", "patterns": ["o"]}]
    ),
}
ALPHABET = "aeiouAbcdfX B012345 secretfoobarokbomb\n.,éÄ漢🙂\ufffd"


def stream_through(policy: Policy, text: str, cuts: list[int]) -> tuple[str, list[str]]:
    se = StreamEnforcer(policy)
    deltas = []
    for c in sorted(set(cuts)):
        d = se.feed(text[:c])
        deltas.append(d)
        assert enforce(text, policy).text.startswith(se.emitted)  # never shows what enforce changes
    tail, res = se.finish(text)
    deltas.append(tail)
    return "".join(deltas), deltas


def test_stream_modes():
    assert StreamEnforcer(POLICIES["default"]).mode == "passthrough"
    assert StreamEnforcer(VOWELS).mode == "window"
    assert StreamEnforcer(POLICIES["chain"]).mode == "window"
    assert StreamEnforcer(POLICIES["bounded"]).mode == "window"
    for name in ("unbounded", "multiword", "block"):
        assert StreamEnforcer(POLICIES[name]).mode == "hold"
    assert pattern_width("[aeiou]") == 1 and pattern_width("secret[0-9]{2,3}") == 9
    assert pattern_width("a+") is None


def test_vowel_redaction_streams_progressively_and_equals_enforce():
    text = "Hello, this is a fairly long answer about everything under the sun. " * 3
    out, deltas = stream_through(VOWELS, text, list(range(0, len(text), 3)))
    assert out == enforce(text, VOWELS).text == re.sub("[aeiouAEIOU]", "*", text)
    shown = [d for d in deltas[:-1] if d]
    assert len(shown) > 20 and not any(re.search("[aeiouAEIOU]", d) for d in deltas)
    out, deltas = stream_through(POLICIES["block"], "a bomb here " + text, list(range(0, 80, 5)))
    assert out == enforce("a bomb here " + text, POLICIES["block"]).text and all(d == "" for d in deltas[:-1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(POLICIES)),
    text=st.text(alphabet=ALPHABET, max_size=120),
    cuts=st.lists(st.integers(0, 120), max_size=12),
)
def test_stream_equals_non_streamed_for_every_policy(name, text, cuts):
    policy = POLICIES[name]
    out, _ = stream_through(policy, text, [c for c in cuts if c <= len(text)])
    assert out == enforce(text, policy).text


def test_rule_actions_count_what_enforce_did():
    p = POLICIES["chain"]
    text = "aaa foo ok bbb Bär"
    res = enforce(text, p)
    acts = rule_actions(p, text, res)
    assert sum(a["matches"] for a in acts.values() if a["action"] == "redact") == res.redactions
    assert acts["fl"] == {"action": "flag", "matches": 1} and acts["terms"]["matches"] == 2
    res = enforce("a bomb", POLICIES["block"])
    assert rule_actions(POLICIES["block"], "a bomb", res) == {"bad": {"action": "block", "matches": 1}}


# ------------------------------------------------------------------------- text
def test_stop_strings_and_holdback():
    s = StopStrings(["END", "\n\n"])
    assert s.find("abc END x\n\n") == 4 and s.find("abc") is None
    assert s.holdback("abc EN") == 2 and s.holdback("abc\n") == 1 and s.holdback("abc") == 0
    assert stable_prefix("abc E", s) == "abc " and stable_prefix("ab\ufffd\ufffd", s) == "ab"


def test_detokenizer_is_prefix_stable(tokenizer):
    rng = random.Random(0)
    words = tokenizer.encode("The quick brown fox jumps over the lazy dog, then naïve café 漢字 🙂.")
    for trial in range(300):
        n = rng.randint(1, 30)
        ids = [rng.choice(words) if rng.random() < 0.6 else rng.randrange(4, tokenizer.vocab_size) for _ in range(n)]
        ctx = tokenizer.encode("Hello there") if trial % 2 else []
        d = Detokenizer(tokenizer, ctx)
        final = d.text(ids)
        for k in range(n + 1):
            assert final.startswith(stable_prefix(d.text(ids[:k]), StopStrings([]))), (ids, k)
        assert "".join(d.token_texts(ids)) == final
    hello, both = tokenizer.encode("Hello"), tokenizer.encode("Hello world")
    assert both[: len(hello)] == hello  # a completion continues the prompt's text:
    assert Detokenizer(tokenizer, [2, *hello]).text(both[len(hello) :]) == " world"  # its space kept
    assert Detokenizer(tokenizer, []).text(both[len(hello) :]) == "world"  # chat: no context


# ------------------------------------------------------------------------- audit
def test_audit_chain_verify_and_tamper(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync_every=2)
    recs = [log.append({"request_id": f"r{i}", "prompt_tokens": i, "actions": {}}) for i in range(5)]
    log.close()
    assert recs[0]["prev_sha256"] == GENESIS and recs[1]["prev_sha256"] == recs[0]["sha256"]
    res = verify(path)
    assert res.ok and res.records == 5 and res.head == recs[-1]["sha256"]
    # reopening continues the chain
    log = AuditLog(path)
    assert log.append({"request_id": "r5"})["prev_sha256"] == recs[-1]["sha256"]
    log.close()
    assert verify(path).records == 6
    lines = path.read_bytes().splitlines(keepends=True)
    # an edited record is caught on its own line
    edited = lines.copy()
    edited[2] = edited[2].replace(b'"prompt_tokens":2', b'"prompt_tokens":3')
    (tmp_path / "e.jsonl").write_bytes(b"".join(edited))
    r = verify(tmp_path / "e.jsonl")
    assert not r.ok and r.bad_line == 3 and "edited" in r.reason
    # a removed record breaks the chain on the next line
    (tmp_path / "d.jsonl").write_bytes(b"".join(lines[:1] + lines[2:]))
    assert verify(tmp_path / "d.jsonl").bad_line == 2
    # a torn last line: verify names it, a writer refuses to append after it
    (tmp_path / "t.jsonl").write_bytes(b"".join(lines) + lines[0][:20])
    assert verify(tmp_path / "t.jsonl").bad_line == 7
    with pytest.raises(AuditError, match="damaged"):
        AuditLog(tmp_path / "t.jsonl")
    assert not any(k in json.loads(lines[0]) for k in ("prompt", "text", "messages"))


# ------------------------------------------------------------------------- loading
def _save_pretrain(tmp_path: Path, cfg, tokenizer, tp: int, ep: int):
    from aion_train.checkpoint import save_sharded_checkpoint
    from aion_train.config import dump_yaml

    m = build_model(cfg.model, seed=5).eval()
    run = tmp_path / f"pt_tp{tp}_ep{ep}"
    save_sharded_checkpoint(run, cfg.model, m.state_dict(), tp=tp, ep=ep)
    cfg.data.tokenizer = tokenizer.path
    (run / "config.yaml").write_text(dump_yaml(cfg))
    return m, run


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 2)])
def test_pretrain_checkpoint_in_any_layout_loads_exactly(tmp_path, tokenizer, tp, ep, one_thread):
    from aion_train.serve.loading import load_for_serving

    cfg = tiny_model_cfg()
    ref, run = _save_pretrain(tmp_path, cfg, tokenizer, tp, ep)
    lm = load_for_serving(str(run))
    assert lm.kind == "pretrain" and not lm.chat and lm.eos_ids == (tokenizer.eos_id,)
    assert lm.model_id == f"aion-{run.name}"
    for k, v in ref.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v), k
    ids = torch.tensor([lm.encode_prompt("Hello world")])
    assert torch.equal(lm.model(ids).logits, ref(ids).logits)
    bf = load_for_serving(str(run / "checkpoints"), dtype="bf16")
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    rows = [
        Row(prompt_ids=p, params=SamplingParams(temperature=0.7, seed=1), max_new=6, generator=choice_generator(1, i))
        for i, p in enumerate([[5, 6, 7], [8]])
    ]
    Engine(bf.model, bf.eos_ids, bf.vocab_size).run(rows)
    assert all(r.finish_reason in ("length", "stop") for r in rows)


def _lora_model(cfg, seed=5):
    from aion_train.config.posttrain_schema import LoRAConfig
    from aion_train.posttrain.lora import apply_lora, lora_modules

    m = build_model(cfg.model, seed=seed).eval()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, LoRAConfig(enabled=True, r=4, alpha=8.0, dropout=0.0), seed=1)
    g = torch.Generator().manual_seed(2)
    for mod in lora_modules(m).values():  # B = 0 at init: make it matter
        mod.lora_B.data = torch.randn(mod.lora_B.shape, generator=g) * 0.05
    return m.eval(), base


def _chat_tokenizer_dir(run: Path, tokenizer):
    (run / "task").mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copy(tokenizer.path, run / "task" / "tokenizer.model")


def _save_sft(tmp_path, tokenizer, tp=2):
    from aion_train.checkpoint import save_sharded_checkpoint
    from aion_train.posttrain.common import save_tensors
    from aion_train.posttrain.lora import lora_state_dict

    cfg = tiny_model_cfg(**{"model.vocab_size": tokenizer.vocab_size + 4})
    m, base = _lora_model(cfg)
    run = tmp_path / "sftrun"
    step = save_sharded_checkpoint(run / "sft" / "base", cfg.model, base, tp=tp)
    save_tensors(lora_state_dict(m), run / "sft" / "adapters.safetensors", {"r": 4, "alpha": 8.0})
    (run / "sft" / "done.json").write_text(
        json.dumps({"base_checkpoint": str(step), "adapters": "sft/adapters.safetensors", "sft_accuracy": 0.5})
    )
    _chat_tokenizer_dir(run, tokenizer)
    return cfg, m, run


def test_sft_run_merges_adapters_and_has_the_chat_template(tmp_path, tokenizer, one_thread):
    from aion_train.posttrain.chat_template import render_chat
    from aion_train.serve.loading import load_for_serving

    cfg, lora_model, run = _save_sft(tmp_path, tokenizer)
    lm = load_for_serving(str(run))
    assert lm.kind == "sft" and lm.chat and lm.info["lora_r"] == 4
    assert lm.eos_ids == (lm.tokenizer.end_id, tokenizer.eos_id)
    msgs = [{"role": "user", "content": "Is the sky blue?"}]
    ids = lm.render_chat(msgs)
    assert ids == render_chat(msgs, lm.tokenizer)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(lm.model(x).logits, lora_model(x).logits, atol=1e-5)
    assert load_for_serving(str(run / "sft")).kind == "sft"


@pytest.mark.parametrize("tp", [1, 2])
def test_ppo_run_serves_the_trained_actor(tmp_path, tokenizer, tp, one_thread):
    from aion_train.checkpoint import CheckpointManager, save_rank
    from aion_train.posttrain.lora import lora_modules, lora_state_dict
    from aion_train.serve.loading import load_for_serving

    cfg, sft_model, run = _save_sft(tmp_path, tokenizer)
    g = torch.Generator().manual_seed(9)
    for mod in lora_modules(sft_model).values():  # "PPO" moved the adapters on
        mod.lora_A.data += torch.randn(mod.lora_A.shape, generator=g) * 0.05
    actor = lora_state_dict(sft_model)
    mgr = CheckpointManager(run / "ppo" / "checkpoints", keep_last=None)
    mgr.prepare(3)
    folder = mgr.begin(3)
    column = ("q_proj", "k_proj", "v_proj", "w_gate", "w_up")
    for rank in range(tp):
        shard = {}
        for k, v in actor.items():
            mod = k.split(".")[-2]
            if tp > 1 and k.endswith("lora_B") and mod in column:
                v = v.chunk(tp, dim=0)[rank]
            elif tp > 1 and k.endswith("lora_A") and mod in ("o_proj", "w_down"):
                v = v.chunk(tp, dim=1)[rank]
            shard[k] = v.clone()
        save_rank(folder, rank, "actor", shard)
    from aion_train.config import config_to_dict

    mgr.commit(
        3,
        {
            "model_config": config_to_dict(cfg)["model"],
            "layout": {"tp": tp, "ep": 1, "world": tp, "zero_stage": 1, "lora": True},
        },
    )
    (run / "ppo" / "done.json").write_text(json.dumps({"ppo_accuracy": 0.6}))
    lm = load_for_serving(str(run))
    assert lm.kind == "ppo" and lm.chat and lm.model_id.endswith("-ppo")
    x = torch.tensor([lm.render_chat([{"role": "user", "content": "What colour is it?"}])])
    with torch.no_grad():
        assert torch.allclose(lm.model(x).logits, sft_model(x).logits, atol=1e-5)


def test_policy_runtime_resolves_from_one_snapshot_and_fails_closed(tmp_path):
    from aion_train.policy import ModerationUnavailable, PolicySet, UnknownJurisdiction, build_bundle
    from aion_train.serve.policy_runtime import PolicyRuntime

    files = []
    for j, extra in {"eu": {}, "xx-mod": {"output_moderation": {"enabled": True}}}.items():
        f = tmp_path / f"{j}.json"
        f.write_text(json.dumps({"jurisdiction": j, "version": "1.0.0", **extra}))
        files.append(f)
    rt = PolicyRuntime(PolicySet(build_bundle(files)))
    assert rt.resolve(None).jurisdiction == "default" and rt.resolve(None).is_identity
    assert rt.resolve("eu").describe()["jurisdiction"] == "eu"
    with pytest.raises(UnknownJurisdiction, match="known: default, eu, xx-mod"):
        rt.resolve("eu-fr")
    with pytest.raises(ModerationUnavailable, match="no moderator"):
        rt.resolve("xx-mod")
    fb = PolicyRuntime(PolicySet(build_bundle(files[:1], fallback="eu")))
    got = fb.resolve("eu-fr")
    assert got.jurisdiction == "eu" and got.describe()["fallback"] is True
    assert got.describe()["requested_jurisdiction"] == "eu-fr"


def test_generate_with_an_index_puts_the_best_whole_chunks_first(tmp_path, tokenizer, capsys, one_thread):
    pytest.importorskip("faiss")
    pytest.importorskip("bm25s")
    from aion_train.cli import main
    from aion_train.retrieval.hybrid import build_context
    from aion_train.retrieval.store import Retriever
    from aion_train.serve.loading import load_for_serving
    from aion_train.serve.retrieval_context import fit_chunks

    ref, run = _save_pretrain(tmp_path, tiny_model_cfg(), tokenizer, 1, 1)
    docs = tmp_path / "docs"
    docs.mkdir()
    facts = {
        "rivers": "The Danube flows through Vienna and Budapest into the Black Sea.",
        "loops": "A for loop iterates over the items of a sequence in order.",
        "tea": "Green tea is steeped at a lower temperature than black tea.",
        "moons": "Jupiter has many moons; Ganymede is the largest of them.",
    }
    for name, text in facts.items():
        (docs / f"{name}.txt").write_text(text)
    idx = tmp_path / "idx"
    assert (
        main(
            [
                "build-index",
                "--corpus",
                str(docs / "*.txt"),
                "--out",
                str(idx),
                "--embedder",
                "hash-256",
                "--factory",
                "Flat",
                "--no-cache",
            ]
        )
        == 0
    )
    capsys.readouterr()
    prompt = "How does a for loop iterate over a sequence?"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(run),
                prompt,
                "--index",
                str(idx),
                "--k",
                "2",
                "--temperature",
                "0",
                "--max-tokens",
                "4",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    lm = load_for_serving(str(run))
    hits = Retriever(str(idx)).search(prompt, k=2)
    texts = fit_chunks(
        [h.text.strip() for h in hits], lambda cs: len(lm.encode_prompt(build_context(cs, prompt))), lm.max_seq_len - 4
    )
    assert texts and texts[0], "the test's best chunk must fit the tiny model's context"
    got = out["aion"]["retrieval"]
    assert [h["id"] for h in got["hits"]] == [h.id for h, t in zip(hits, texts) if t]  # best first
    assert got["hits"][0]["source"].endswith("loops.txt")
    # the tokens are the model's greedy continuation of exactly that augmented prompt
    ids = torch.tensor([lm.encode_prompt(build_context([t for t in texts if t], prompt))])
    expect = generate(ref, ids, 4, temperature=0.0)[0, ids.shape[1] :].tolist()
    assert out["token_ids"][: len(expect)] == expect[: len(out["token_ids"])] and out["token_ids"]
    # no room left for any chunk: the prompt alone, and the answer says so
    room = lm.max_seq_len - len(lm.encode_prompt(prompt))
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(run),
                prompt,
                "--index",
                str(idx),
                "--temperature",
                "0",
                "--max-tokens",
                str(room),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["aion"]["retrieval"]["hits"] == []
    # a folder that is not an index is refused, naming it
    assert main(["generate", "--checkpoint", str(run), prompt, "--index", str(docs)]) == 1
    assert str(docs) in capsys.readouterr().err


def test_coalesced_stream_items_keep_each_choices_text_and_the_order_of_ends():
    import random

    from aion_train.serve.openai_api import coalesce_deltas

    rng = random.Random(0)
    for _ in range(200):
        items = [
            ("delta", rng.randrange(3), rng.choice(["a", "bc", "", "é", " "])) if rng.random() < 0.8
            else ("choice", rng.randrange(3), None)
            for _ in range(rng.randrange(1, 30))
        ]  # fmt: skip
        out = coalesce_deltas(items)
        for c in range(3):  # each choice's text between its ends is unchanged

            def segments(xs, c=c):
                segs, cur = [], ""
                for kind, i, item in xs:
                    if i != c:
                        continue
                    if kind == "delta":
                        cur += item
                    else:
                        segs.append(cur)
                        cur = ""
                return segs + [cur]

            assert segments(out) == segments(items)
        assert [x for x in out if x[0] != "delta"] == [x for x in items if x[0] != "delta"]
        # no two consecutive deltas of one choice are left
        assert not any(a[0] == b[0] == "delta" and a[1] == b[1] for a, b in zip(out, out[1:]))


def test_fit_chunks_cuts_the_longest_first_to_the_largest_cap_that_fits():
    from aion_train.serve.retrieval_context import _cut, fit_chunks

    chunks = ["a" * 50, "b b b b b b b b b b", "c" * 200]

    def cost(cs):
        return 10 + sum(len(c) + 2 for c in cs)  # the markers and the question: 10

    assert fit_chunks(chunks, cost, 10_000) == chunks  # everything fits: unchanged
    for budget in (10, 11, 40, 75, 120, 200, 280):
        got = fit_chunks(chunks, cost, budget)
        kept = [c for c in got if c]
        assert cost(kept) <= budget
        cap = max(len(c) for c in got)
        # the cap is the largest that fits: one more character is over budget (or changes nothing)
        bigger = [c for c in (_cut(x, cap + 1) for x in chunks) if c]
        assert cost(bigger) > budget or bigger == kept
        for orig, c in zip(chunks, got):  # each chunk is a prefix of itself, short ones untouched
            assert orig.startswith(c) and (len(orig) <= cap) <= (c == orig)
    assert fit_chunks(chunks, cost, 9) is None  # not even the question with empty markers


def test_scheduler_tells_its_listeners_where_each_iteration_starts_and_ends(model, one_thread):
    """Every sink call and every job end happens between a listener's hold() and release() on
    the worker thread; one release per iteration (prefill and/or decode step)."""
    import threading

    engine = Engine(model, eos_ids=())
    greedy = SamplingParams(temperature=0.0)
    sched = Scheduler(engine, max_batch=4)
    events: list[tuple[str, str]] = []

    class Listener:
        def hold(self):
            events.append(("hold", threading.current_thread().name))

        def release(self):
            events.append(("release", threading.current_thread().name))

    sched.listeners.append(Listener())

    def sink(tok, info):
        events.append(("sink", threading.current_thread().name))
        return False

    jobs = [Job(rows=[Row(prompt_ids=p, params=greedy, max_new=5, sink=sink)]) for p in ([4, 5], [6, 7, 8])]
    for j in jobs:
        j.on_done = lambda: events.append(("done", threading.current_thread().name))
        sched._q.put(j)
    sched.start()
    for j in jobs:
        assert j.done.wait(60)
    sched.stop()
    inside = False
    for kind, thread in events:
        assert thread == "aion-serve-engine"
        if kind == "hold":
            assert not inside
            inside = True
        elif kind == "release":
            assert inside
            inside = False
        else:
            assert inside, kind
    assert events.count(("sink", "aion-serve-engine")) == 10
    assert sum(k == "release" for k, _ in events) == sched.steps  # one prefill with its first step


def test_the_engine_thread_computes_on_one_core_fewer_and_the_caller_keeps_its_threads(model):
    """torch's intra-op thread count is per thread: the server's worker sets its own (by default
    the execution policy's serving_threads, one fewer than the process's on the CPU; CUDA
    leaves it alone), and the thread that built the scheduler keeps its count."""
    from aion_train.model.execution import ExecutionPolicy

    n0 = torch.get_num_threads()
    greedy = SamplingParams(temperature=0.0)
    try:
        torch.set_num_threads(3)
        engine = Engine(model, eos_ids=())
        assert engine.execution.serving_threads(in_process=False) == 2
        assert engine.execution.serving_threads(in_process=True) == 3  # the engine's own process
        assert engine.execution.serving_process
        cuda = ExecutionPolicy.for_device("cuda").for_generation()
        assert cuda.serving_threads(in_process=False) == 0 and not cuda.serving_process
        for threads, expected in ((None, 2), (1, 1)):
            seen: list[int] = []
            sched = Scheduler(engine, max_batch=2, threads=threads).start()

            def sink(tok, info, seen=seen):
                seen.append(torch.get_num_threads())
                return False

            job = sched.submit(Job(rows=[Row(prompt_ids=[4, 5, 6], params=greedy, max_new=3, sink=sink)]))
            assert job.done.wait(60) and job.error is None
            sched.stop()
            assert seen == [expected] * 3
            assert torch.get_num_threads() == 3
        with pytest.raises(ValueError, match="threads must be >= 1"):
            Scheduler(engine, threads=0)
    finally:
        torch.set_num_threads(n0)
