"""Post-training on the user's files: chat JSONL for SFT (loss on every assistant turn),
preference JSONL for the reward model, prompts JSONL for PPO with a reward model or a Python
reward function; every bad record named by file, line and field; and (slow) the three phases
end to end from files the test writes."""

import json

import pytest
import torch

from aion_train.config import ConfigError, load_config
from aion_train.posttrain.chat_template import ChatTokenizer, render_chat, render_conversation
from aion_train.posttrain.user_data import (
    UserDataError,
    check_phase_files,
    read_conversations,
    read_preferences,
    read_prompts,
)

COLOURS = ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "mouse", "lion", "bear"]


NAMES = ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"]


def question(i: int) -> tuple[str, str, str]:
    """(question, colour, animal) of record i: 64 distinct questions, each with one answer."""
    a, c = ANIMALS[i % 8], COLOURS[(i + i // 8) % 8]
    return f"what colour is {NAMES[(i // 8) % 8]}'s {a}?", c, a


def conversation(i: int) -> dict:
    q, c, a = question(i)
    return {
        "messages": [
            {"role": "system", "content": "you answer in one word."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": c},
            {"role": "user", "content": "and which animal was it?"},
            {"role": "assistant", "content": a},
        ]
    }


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_files(d) -> dict:
    """chat.jsonl (64 two-turn conversations), pairs.jsonl (64 preference pairs), prompts.jsonl (32)."""
    pairs = [{"prompt": question(i)[0], "chosen": question(i)[1], "rejected": "no idea at all"} for i in range(64)]
    prompts = [{"prompt": question(i)[0], "answer": question(i)[1]} for i in range(32)]
    return {
        "chat": write_jsonl(d / "chat.jsonl", [conversation(i) for i in range(64)]),
        "pairs": write_jsonl(d / "pairs.jsonl", pairs),
        "prompts": write_jsonl(d / "prompts.jsonl", prompts),
    }


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from aion_train.data.tokenizer import train_tokenizer

    texts = [m["content"] for i in range(64) for m in conversation(i)["messages"]] * 5
    path = tmp_path_factory.mktemp("tok") / "t.model"
    train_tokenizer(texts + ["hello there how are you today"], str(path), 300)
    return ChatTokenizer(str(path))


def test_sft_mask_covers_exactly_every_assistant_turn(tmp_path, tok):
    from aion_train.model.transformer import cross_entropy_loss
    from aion_train.posttrain.sft import lm_batch, render_conversations

    recs = [conversation(3), {"messages": conversation(9)["messages"][1:3]}]  # two turns; one turn, no system
    convs = read_conversations("sft.train_files", [write_jsonl(tmp_path / "c.jsonl", recs)])
    assert [c.where for c in convs] == [f"{tmp_path}/c.jsonl:1", f"{tmp_path}/c.jsonl:2"]
    rendered = render_conversations(convs, tok, 128)
    # by hand, from the template: <s> (<|role|> content <|end|>)*, 1 on assistant content + its <|end|>
    for rec, (ids, mask) in zip(recs, rendered):
        want_ids, want_mask = [tok.bos_id], [0]
        for m in rec["messages"]:
            body = tok.encode(m["content"]) + [tok.end_id]
            want_ids += [tok.header_id(m["role"])] + body
            want_mask += [0] + [1 if m["role"] == "assistant" else 0] * len(body)
        assert (ids, mask) == (want_ids, want_mask) == render_conversation(rec["messages"], tok)
        trained = [i for i, k in zip(ids, mask) if k]
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        assert trained == [t for a in answers for t in tok.encode(a) + [tok.end_id]]
    # the first turn's prefix is exactly the prompt a one-turn render would give
    first = recs[0]["messages"]
    assert rendered[0][0][: len(render_chat(first[:2], tok))] == render_chat(first[:2], tok)
    # the loss is the mean cross-entropy over exactly those tokens
    inputs, labels = lm_batch([r[0] for r in rendered], [r[1] for r in rendered], tok.pad_id)
    logits = torch.randn(*inputs.shape, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    terms = [
        -torch.log_softmax(logits[b, t - 1], -1)[ids[t]]
        for b, (ids, mask) in enumerate(rendered)
        for t in range(1, len(ids))
        if mask[t]
    ]
    assert len(terms) == sum(sum(m) for _, m in rendered)
    torch.testing.assert_close(cross_entropy_loss(logits, labels), torch.stack(terms).mean())
    n0, n1 = len(rendered[0][0]), len(rendered[1][0])
    with pytest.raises(ValueError, match=rf"max_seq_len=40 .*c\.jsonl:1: {n0} tokens$"):
        render_conversations(convs, tok, 40)
    assert n1 <= 41 < n0


def test_bad_records_are_named_by_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join(
            [
                json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
                "{not json",
                json.dumps({"text": "a"}),
                json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
                json.dumps({"messages": [{"role": "user", "content": 3}]}),
            ]
        )
    )
    with pytest.raises(UserDataError) as e:
        read_conversations("sft.train_files", [str(bad)])
    assert e.value.errors == [
        f"{bad}:1: messages[0].role='bot': must be one of system, user, assistant",
        f"{bad}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{bad}:3: no 'messages' field (have: text)",
        f"{bad}:4: messages: no assistant turn (nothing to train on)",
        f"{bad}:5: messages[0].content: must be text, got int",
    ]
    pairs = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q", "chosen": "a"},
            {"prompt": "q", "chosen": "", "rejected": "b"},
            {"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"},
            {"chosen": "a", "rejected": "b"},
        ],
    )
    with pytest.raises(UserDataError) as e:
        read_preferences("rm.train_files", [pairs])
    assert e.value.errors == [
        f"{pairs}:1: no 'rejected' field (have: chosen, prompt)",
        f"{pairs}:2: chosen: must be non-empty text",
        f"{pairs}:3: prompt: must end with a user message (got 'assistant')",
        f"{pairs}:4: prompt: missing (text chosen/rejected need a 'prompt' field)",
    ]
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"question": "x"}])
    with pytest.raises(UserDataError, match=r"q\.jsonl:1: no 'prompt' \(or 'messages'\) field \(have: question\)"):
        read_prompts("ppo.prompt_files", [prompts])
    with pytest.raises(UserDataError, match=r"sft.train_files: '.*none\*\.jsonl' matches no file"):
        read_conversations("sft.train_files", [str(tmp_path / "none*.jsonl")])
    # the phase check: every file of the phases, errors prefixed by their key, before any model
    cfg = load_config("configs/rlhf_tiny.yaml", [f"sft.train_files=[{bad}]", f"ppo.prompt_files=[{prompts}]"])
    with pytest.raises(UserDataError) as e:
        check_phase_files(cfg)
    text = str(e.value)
    assert f"sft.train_files: {bad}:4: messages: no assistant turn" in text
    assert f"ppo.prompt_files: {prompts}:1: no 'prompt'" in text
    assert "rm.train_files is empty but the run post-trains on your files" in text


def test_base_response_steps_are_spread_evenly_over_the_base_steps():
    from aion_train.posttrain.sft import interleaved

    def picks(fraction, steps):
        nb = interleaved(lambda s: ("all", s), lambda s: ("responses", s), fraction)
        return [s for s in range(steps) if nb(s) == ("responses", s)]

    assert picks(0.0, 50) == []
    assert picks(1.0, 7) == list(range(7))
    assert picks(0.5, 8) == [1, 3, 5, 7]
    assert picks(0.25, 12) == [3, 7, 11]
    got = picks(0.3, 2000)
    assert len(got) == 600 and max(b - a for a, b in zip(got, got[1:])) <= 4  # 1 in 3.33, no long runs
    with pytest.raises(ConfigError, match=r"sft.base_response_fraction=1.5: must be in \[0, 1\]"):
        load_config("configs/rlhf_tiny.yaml", ["sft.base_response_fraction=1.5"])


def test_config_keys_are_checked_up_front(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(
            "configs/rlhf_tiny.yaml",
            ["rm.train_files=[p.txt]", "ppo.reward=not a function", "ppo.eval_files=[e.jsonl]", "ppo.eval_prompts=0"],
        )
    text = str(e.value)
    for msg in (
        "rm.train_files: 'p.txt': must name .jsonl or .json files",
        "sft.train_files is empty: post-training on your files",
        "ppo.reward='not a function': must be 'rm' or 'package.module:function'",
        "ppo.eval_files needs ppo.prompt_files",
        "ppo.eval_prompts=0: must be >= 1",
    ):
        assert msg in text, text
    with pytest.raises(ConfigError, match=r"ppo.reward_model='/no/run': no done.json of a finished rm phase"):
        load_config("configs/rlhf_tiny.yaml", ["ppo.reward_model=/no/run"])
    with pytest.raises(ConfigError, match="ppo.critic_init=rm needs a reward model"):
        load_config("configs/rlhf_tiny.yaml", ["ppo.reward=aion_train.posttrain.rewards:exact_match"])
    cfg = load_config(
        "configs/rlhf_tiny.yaml", ["ppo.reward=aion_train.no_such_module:f", "ppo.critic_init=sft"]
    )  # the format is right; the import is checked with the files
    with pytest.raises(UserDataError, match="cannot load it \\(ModuleNotFoundError"):
        check_phase_files(cfg, ("ppo",))


def test_preference_formats_standard_and_conversational_agree(tmp_path, tok):
    from aion_train.posttrain.reward import file_pairs

    user = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what colour is the cat?"}]
    recs = [
        {"prompt": "what colour is the cat?", "chosen": "red", "rejected": "blue"},
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "red"}],
            "rejected": [{"role": "assistant", "content": "blue"}],
        },
        {
            "chosen": user + [{"role": "assistant", "content": "red"}],
            "rejected": user + [{"role": "assistant", "content": "blue"}],
        },
    ]
    prefs = read_preferences("rm.train_files", [write_jsonl(tmp_path / "p.jsonl", recs)])
    assert prefs[0].prompt == user[1:] and prefs[1].prompt == user and prefs[2].prompt == user
    pairs = file_pairs(prefs, tok)
    head = render_chat(user, tok, True)
    assert pairs[1] == pairs[2] == (head + tok.encode("red") + [tok.end_id], head + tok.encode("blue") + [tok.end_id])
    assert pairs[0][0] == render_chat(user[1:], tok, True) + tok.encode("red") + [tok.end_id]


def test_reward_functions_get_completions_and_columns(tmp_path):
    from aion_train.posttrain.rewards import FunctionReward, exact_match, regex_match, token_f1
    from aion_train.posttrain.task import Example

    assert exact_match(["q"] * 3, [" Red.", "blue", "red green"], answer=["red", "red", "red"]) == [1.0, 0.0, 0.0]
    assert regex_match(["q"] * 2, [" 42 ", "4 2"], pattern=[r"\d+", r"\d+"]) == [1.0, 0.0]
    # SQuAD F1 by hand: "copy the files" vs "copy files and directories": articles dropped,
    # 2 words in common, precision 2/2, recall 2/4 -> 2 * 1 * 0.5 / 1.5 = 2/3
    got = token_f1(
        ["q"] * 5,
        ["copy the files", "The Copy, files and directories!", "list", "", "ls ls"],
        answer=["copy files and directories"] * 3 + ["the", "ls"],
    )
    torch.testing.assert_close(torch.tensor(got), torch.tensor([2 / 3, 1.0, 0.0, 1.0, 2 / 3]))
    ex = [
        Example([], [1], "red", (), "file", "q1", {"answer": "red", "id": 7}),
        Example([], [1], "", (), "file", "q2", {}),
    ]
    fr = FunctionReward("aion_train.posttrain.rewards:exact_match")
    torch.testing.assert_close(fr.score(ex, ["red", "red"]), torch.tensor([1.0, 0.0]))
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, **columns)
        return [len(c) for c in completions]

    fr.fn = spy
    torch.testing.assert_close(fr.score(ex, ["ab", "abc"]), torch.tensor([2.0, 3.0]))
    assert seen == {"prompts": ["q1", "q2"], "completions": ["ab", "abc"], "answer": ["red", None], "id": [7, None]}
    fr.fn = lambda p, c, **k: [1.0]
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        fr.score(ex, ["a", "b"])


REWARD_MODULE = '''
import json, os

def colour_reward(prompts, completions, answer, **columns):
    """1 for the right colour, 0.5 for any colour word, else 0; every call logged."""
    colours = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
    values = [1.0 if c.strip() == a else 0.5 if c.strip() in colours else 0.0 for c, a in zip(completions, answer)]
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "answer": answer, "values": values}) + "\\n")
    return values
'''


@pytest.mark.slow
def test_sft_rm_ppo_from_user_files_end_to_end(tmp_path, capsys, monkeypatch):
    """SFT, RM and PPO (reward model, then a reward function) a few steps each on files the test
    writes; what each phase reports is recomputed from its saved weights or from the reward
    function's own log."""
    import numpy as np

    from aion_train.cli import main
    from aion_train.posttrain.common import read_done
    from aion_train.posttrain.reward import file_pairs, load_reward_model, pair_accuracy, pair_batch
    from aion_train.posttrain.sft import load_policy, render_conversations, response_loss

    files = write_files(tmp_path)
    run = tmp_path / "run"
    over = [
        f"run_dir={run}",
        "model.vocab_size=300",
        f"sft.train_files=[{files['chat']}]",
        f"sft.eval_files=[{files['chat']}]",
        "sft.base_steps=30",
        "sft.steps=30",
        "sft.batch_size=8",
        f"rm.train_files=[{files['pairs']}]",
        "rm.steps=30",
        "rm.batch_size=8",
        f"ppo.prompt_files=[{files['prompts']}]",
        "ppo.rollout_prompts=8",
        "ppo.max_new_tokens=3",
        "tracking.enabled=false",
    ]
    last = lambda: json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # noqa: E731
    assert main(["sft", "--config", "configs/rlhf_tiny.yaml", "--json", *over]) == 0
    sft = last()
    assert sft["sft_examples"] == 64 and sft["eval_examples"] == 64
    assert sft["eval_tokens"] == sum(
        sum(m)
        for _, m in render_conversations(read_conversations("k", [files["chat"]]), ChatTokenizer(sft["tokenizer"]), 128)
    )
    assert sft["sft_eval_loss"] < sft["base_eval_loss"] - 0.5, sft  # the assistant turns were learnt
    cfg = load_config("configs/rlhf_tiny.yaml", over)
    model, task = load_policy(cfg, merge=True)
    held = render_conversations(task.records["sft_eval"], task.tokenizer, 128)
    assert response_loss(model, held, task.tokenizer.pad_id, None)["loss"] == pytest.approx(
        sft["sft_eval_loss"], rel=1e-4
    )

    assert main(["rm", "--config", "configs/rlhf_tiny.yaml", "--json", *over]) == 0
    rm = last()
    assert rm["rm_train_pairs"] == 64 and rm["rm_eval_split"] == "train_files"
    reward = load_reward_model(cfg)
    pairs = file_pairs(read_preferences("k", [files["pairs"]]), task.tokenizer)
    assert pair_accuracy(reward, pairs, lambda p: pair_batch(p, task.tokenizer.pad_id))[
        "rm_pair_accuracy"
    ] == pytest.approx(rm["rm_pair_accuracy"])
    with torch.no_grad():  # by hand: one pair at a time, the score at the last token
        r_w = torch.stack([reward(torch.tensor([c])).squeeze() for c, _ in pairs])
        r_l = torch.stack([reward(torch.tensor([r])).squeeze() for _, r in pairs])
    assert float((r_w > r_l).float().mean()) == pytest.approx(rm["rm_pair_accuracy"])
    assert rm["rm_pair_accuracy"] > rm["rm_pair_accuracy_before"] and rm["rm_pair_accuracy"] >= 0.9, rm

    assert main(["ppo", "--config", "configs/rlhf_tiny.yaml", "--json", *over, "ppo.steps=2"]) == 0
    ppo = last()
    assert ppo["reward"] == "rm" and ppo["iterations"] == 2 and ppo["eval_examples"] == 32
    for k in ("ppo_eval_reward", "sft_eval_reward", "ppo_kl", "reward_first", "ppo_accuracy"):
        assert np.isfinite(ppo[k]), k

    # the reward-model checkpoint of another run (here: the first one), in a run without an rm phase
    import shutil

    other = tmp_path / "run_other_rm"
    shutil.copytree(run / "sft", other / "sft")
    shutil.copytree(run / "task", other / "task")
    assert main(["ppo", "--config", "configs/rlhf_tiny.yaml", "--json", *over, f"run_dir={other}",
                 f"ppo.reward_model={run}", "ppo.steps=1"]) == 0  # fmt: skip
    borrowed = last()
    assert not (other / "rm").exists() and borrowed["iterations"] == 1
    assert borrowed["sft_eval_reward"] == pytest.approx(ppo["sft_eval_reward"], abs=1e-6)  # same SFT, same RM

    # PPO again, rewards from a function named module:function (the critic from the SFT model)
    (tmp_path / "my_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("REWARD_LOG", str(tmp_path / "calls.jsonl"))
    fn_over = [
        *over,
        f"run_dir={tmp_path / 'run_fn'}",
        "ppo.reward=my_reward:colour_reward",
        "ppo.critic_init=sft",
        "tracking.enabled=true",
    ]
    shutil.copytree(run / "sft", tmp_path / "run_fn" / "sft")
    shutil.copytree(run / "task", tmp_path / "run_fn" / "task")
    assert main(["ppo", "--config", "configs/rlhf_tiny.yaml", "--json", *fn_over, "ppo.steps=3"]) == 0
    fn = last()
    calls = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 3 + 2  # one per iteration, then the greedy held-out answers of PPO and of SFT
    records = {r["prompt"]: r["answer"] for r in map(json.loads, open(files["prompts"]))}
    for c in calls:
        assert all(isinstance(t, str) for t in c["completions"])
        assert c["answer"] == [records[p] for p in c["prompts"]]  # the record's own column, per prompt
    assert fn == read_done(load_config("configs/rlhf_tiny.yaml", fn_over), "ppo")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run_fn'}/mlflow.db")
    (ppo_run,) = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id])
        if r.info.run_name.endswith("-ppo")
    ]
    logged = [
        m.value for m in sorted(client.get_metric_history(ppo_run.info.run_id, "ppo/reward"), key=lambda m: m.step)
    ]
    np.testing.assert_allclose(logged, [np.mean(c["values"]) for c in calls[:3]], rtol=0, atol=1e-6)
    assert fn["reward_first"] == pytest.approx(np.mean(calls[0]["values"]), abs=1e-5)
    assert fn["reward_mean"] == pytest.approx(np.mean(calls[2]["values"]), abs=1e-5)
    assert fn["ppo_eval_reward"] == pytest.approx(np.mean(calls[3]["values"]), abs=1e-6)
    assert fn["sft_eval_reward"] == pytest.approx(np.mean(calls[4]["values"]), abs=1e-6)
    assert len(calls[3]["completions"]) == 32 and fn["reward"] == "my_reward:colour_reward"
    from aion_train.posttrain.task import normalise_answer

    exact = np.mean(
        [normalise_answer(c) == normalise_answer(a) for c, a in zip(calls[3]["completions"], calls[3]["answer"])]
    )
    assert fn["ppo_accuracy"] == pytest.approx(exact)  # every prompt has an answer: accuracy too


def test_pipeline_and_phase_commands_refuse_bad_files_before_starting(tmp_path, capsys):
    from aion_train.cli import main

    files = write_files(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(conversation(0)) + "\n" + json.dumps({"messages": []}) + "\n")
    run = tmp_path / "run"
    base = [f"run_dir={run}", f"ppo.prompt_files=[{files['prompts']}]", "tracking.enabled=false"]
    code = main(["pipeline", "--config", "configs/pipeline_tiny.yaml", *base, f"sft.train_files=[{bad}]"])
    err = capsys.readouterr().err
    assert code == 2 and not run.exists()  # no cluster, no run folder
    assert f"sft.train_files: {bad}:2: messages: must be a non-empty list of {{role, content}} messages" in err
    assert "rm.train_files is empty but the run post-trains on your files" in err  # rm is a phase of it
    # the same files are fine for a pipeline without rm whose reward is a function
    ok = [
        *base,
        f"sft.train_files=[{files['chat']}]",
        "ppo.reward=aion_train.posttrain.rewards:exact_match",
        "ppo.critic_init=sft",
    ]
    cfg = load_config("configs/pipeline_tiny.yaml", [*ok, "pipeline.phases=[sft,ppo]"])
    check_phase_files(cfg, ("sft", "ppo"))
    assert main(["rm", "--config", "configs/sft_tiny.yaml", *ok]) == 2
    assert "rm.train_files is empty" in capsys.readouterr().err and not run.exists()
    assert main(["check-config", "--config", "configs/sft_tiny.yaml", f"sft.train_files=[{bad}]"]) == 2
    assert f"{bad}:2: messages" in capsys.readouterr().err
    # chat files mixed into the built-in task are checked before it starts too
    assert main(["sft", "--config", "configs/sft_tiny.yaml", f"run_dir={run}", f"sft.data_files=[{bad}]"]) == 2
    assert f"sft.data_files: {bad}:2: messages" in capsys.readouterr().err and not run.exists()


@pytest.mark.slow
def test_pipeline_runs_sft_rm_ppo_on_user_files(tmp_path, capsys):
    """`aion-train pipeline` on a private Ray cluster: the three phases from the user's files,
    SFT and PPO as 2-rank actor groups."""
    from aion_train.cli import main

    pytest.importorskip("ray")
    files = write_files(tmp_path)
    run = tmp_path / "run"
    code = main(
        [
            "pipeline",
            "--config",
            "configs/pipeline_tiny.yaml",
            "--json",
            f"run_dir={run}",
            "model.vocab_size=300",
            f"sft.train_files=[{files['chat']}]",
            f"sft.eval_files=[{files['chat']}]",
            "sft.base_steps=30",
            "sft.steps=30",
            "sft.batch_size=8",
            f"rm.train_files=[{files['pairs']}]",
            "rm.steps=30",
            "rm.batch_size=8",
            f"ppo.prompt_files=[{files['prompts']}]",
            "ppo.rollout_prompts=8",
            "ppo.steps=2",
            "ppo.max_new_tokens=3",
            "pipeline.phases=[sft,rm,ppo]",
            "pipeline.resources={sft: {world_size: 2}, rm: {world_size: 1}, ppo: {world_size: 2}}",
            "tracking.enabled=false",
        ]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert code == 0, lines
    final = lines[-1]
    assert final["status"] == "ok" and final["phases"] == {"sft": "done", "rm": "done", "ppo": "done"}
    sft, rm, ppo = (x["metrics"] for x in lines[:3])
    assert sft["sft_examples"] == 64 and sft["sft_eval_loss"] < sft["base_eval_loss"] - 0.5
    assert rm["rm_train_pairs"] == 64 and rm["rm_pair_accuracy"] >= 0.9
    assert ppo["reward"] == "rm" and ppo["iterations"] == 2 and ppo["eval_examples"] == 32
    assert json.loads((run / "ppo" / "done.json").read_text()) == ppo


def test_weights_of_another_tokenizer_are_refused(tmp_path):
    """A phase's done.json records the tokenizer its weights were trained with; loading them
    against a rebuilt tokenizer (another seed's demo set) fails with both hashes, not garbage."""
    import hashlib

    from aion_train.data.tokenizer import train_tokenizer
    from aion_train.posttrain.common import check_tokenizer, tokenizer_sha256

    texts = [f"the {w} sat on the mat number {i}" for i, w in enumerate(["cat", "dog", "emu"] * 40)]
    a = train_tokenizer(texts, str(tmp_path / "a.model"), 300)
    b = train_tokenizer(texts[::-1][:60] + ["zebra quagga okapi"] * 30, str(tmp_path / "b.model"), 300)
    assert tokenizer_sha256(a) == hashlib.sha256(open(a, "rb").read()).hexdigest()
    done = {"tokenizer_sha256": tokenizer_sha256(a)}
    check_tokenizer(done, a, "the SFT model")  # same file: accepted
    check_tokenizer({}, b, "an older SFT model")  # nothing recorded: accepted
    with pytest.raises(
        ValueError, match=r"the SFT model was trained with a tokenizer of sha256 .*b\.model is now another"
    ):
        check_tokenizer(done, b, "the SFT model")


def test_a_ppo_prompt_without_room_for_its_response_is_refused_before_training(tmp_path):
    """Prompt tokens + ppo.max_new_tokens over model.max_seq_len: refused, naming the record, when
    the task is built (the SFT phase's start), not by an index error in a rollout."""
    import random

    from aion_train.posttrain.task import build_file_task

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(3000)]
    convs = [
        {"messages": [{"role": "user", "content": " ".join(words[i : i + 10])}, {"role": "assistant", "content": w}]}
        for i, w in enumerate(words)
    ]
    train = write_jsonl(tmp_path / "t.jsonl", convs)
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "say it"}, {"prompt": " ".join(words[:60])}])
    over = [f"run_dir={tmp_path / 'run'}", f"sft.train_files=[{train}]", f"ppo.prompt_files=[{prompts}]"]
    cfg = load_config("configs/rlhf_tiny.yaml", [*over, "model.max_seq_len=64", "ppo.max_new_tokens=16"])
    with pytest.raises(UserDataError) as e:
        build_file_task(cfg)
    assert len(e.value.errors) == 1 and e.value.errors[0].startswith(f"{prompts}:2: the prompt is ")
    assert "model.max_seq_len - ppo.max_new_tokens = 48" in e.value.errors[0]
    n = int(e.value.errors[0].split("the prompt is ")[1].split()[0])
    assert n > 48
    cfg = load_config("configs/rlhf_tiny.yaml", [*over, f"model.max_seq_len={n + 16}", "ppo.max_new_tokens=16"])
    task = build_file_task(cfg)
    assert [len(e.prompt_ids) for e in task.prompts("train")][1] == n
