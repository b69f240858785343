"""The chat task, the SFT response-only loss, the reward model, and (slow) the sft / rm phases
end to end through the CLI."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from aion_train.config import ConfigError, load_config
from aion_train.posttrain.chat_template import ChatTokenizer, render_chat, render_example
from aion_train.posttrain.task import COLORS, SHAPES, easy_vqa_records, is_correct, load_chat_files


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from aion_train.data.tokenizer import train_tokenizer

    texts = [f"scene: a {c} {s}. is there a {c} shape? {c} {s} yes no" for c in COLORS for s in SHAPES] * 20
    path = tmp_path_factory.mktemp("tok") / "t.model"
    train_tokenizer(texts + ["hello there how are you"], str(path), 300)
    return ChatTokenizer(str(path))


def _answer(scene: str, question: str) -> str:
    """Brute force: the answer to an easy-vqa question given the textual scene."""
    colour, shape = re.match(r"scene: a (\w+) (\w+)\.", scene).groups()
    words = re.findall(r"[a-z]+", question)
    if question.startswith("what") and ("color" in words):
        return colour
    if question.startswith("what"):
        return shape
    mentioned = [w for w in words if w in COLORS + SHAPES]
    holds = all(w in (colour, shape) for w in mentioned)
    negated = "not" in words or " no " in f" {question} "
    return "yes" if holds != negated else "no"


def test_scenes_agree_with_every_easy_vqa_answer():
    for split in ("train", "test"):
        recs = easy_vqa_records(split)
        assert len(recs) > (30000 if split == "train" else 8000)
        wrong = [r for r in recs if _answer(r["system"], r["user"]) != r["answer"]]
        assert not wrong, wrong[:3]
        assert all(r["answer"] in r["candidates"] for r in recs)


def test_chat_template_and_response_mask(tok):
    msgs = [
        {"role": "system", "content": "scene: a red circle."},
        {"role": "user", "content": "is there a red shape?"},
        {"role": "assistant", "content": "yes"},
    ]
    ids, mask = render_example(msgs, tok)
    prompt = render_chat(msgs[:2], tok, add_generation_prompt=True)
    assert prompt[-1] == tok.assistant_id and ids[: len(prompt)] == prompt
    assert prompt.count(tok.end_id) == 2 and tok.system_id in prompt and tok.user_id in prompt
    response = [i for i, m in zip(ids, mask) if m]
    assert response == tok.encode("yes") + [tok.end_id]
    assert mask == [0] * len(prompt) + [1] * len(response)
    assert tok.decode(response) == "yes"
    with pytest.raises(ValueError, match="role 'bot'"):
        render_chat([{"role": "bot", "content": "x"}], tok)
    with pytest.raises(ValueError, match="end with an assistant"):
        render_example(msgs[:2], tok)


def test_sft_loss_counts_only_response_tokens(tok):
    from aion_train.model.transformer import cross_entropy_loss
    from aion_train.posttrain.sft import lm_batch

    convs = [
        [{"role": "user", "content": "is there a red shape?"}, {"role": "assistant", "content": "no"}],
        [
            {"role": "system", "content": "scene: a blue circle."},
            {"role": "user", "content": "what shape?"},
            {"role": "assistant", "content": "circle"},
        ],
    ]
    rendered = [render_example(c, tok) for c in convs]
    inputs, labels = lm_batch([r[0] for r in rendered], [r[1] for r in rendered], tok.pad_id)
    torch.manual_seed(0)
    logits = torch.randn(*inputs.shape, tok.vocab_size)
    # reference: cross-entropy over exactly the response tokens (and their <|end|>), by hand
    terms = []
    for b, (ids, mask) in enumerate(rendered):
        for t in range(1, len(ids)):
            if mask[t]:
                terms.append(-torch.log_softmax(logits[b, t - 1], -1)[ids[t]])
    assert len(terms) == (len(tok.encode("no")) + 1) + (len(tok.encode("circle")) + 1)
    torch.testing.assert_close(cross_entropy_loss(logits, labels), torch.stack(terms).mean())


def test_is_correct_and_chat_files(tmp_path, tok):
    from aion_train.posttrain.task import Example

    ex = Example([], [], "yes", ("yes", "no"), "yes_no")
    assert is_correct(ex, " Yes.") and not is_correct(ex, "yes no") and not is_correct(ex, "no")
    f = tmp_path / "chat.jsonl"
    f.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
        + "\n"
        + json.dumps({"system": "be brief", "prompt": "how are you", "response": "fine"})
        + "\n"
    )
    convs = load_chat_files([str(f)])
    assert convs[0][-1] == {"role": "assistant", "content": "hello"}
    assert [m["role"] for m in convs[1]] == ["system", "user", "assistant"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_chat_files([str(tmp_path / "none*.json")])


def test_config_errors_name_keys():
    with pytest.raises(ConfigError) as e:
        load_config("configs/sft_tiny.yaml", ["lora.r=0", "lora.quantize=int3", "rm.init=x", "sft.lr=0"])
    text = str(e.value)
    for key in ("lora.r=0", "lora.quantize='int3'", "rm.init='x'", "sft.lr=0"):
        assert key in text, text


def test_reward_model_reads_the_last_real_token():
    from aion_train.model import build_model
    from aion_train.posttrain.common import pad_right
    from aion_train.posttrain.reward import RewardModel, pair_loss

    cfg = load_config("configs/sft_tiny.yaml", ["model.vocab_size=128"])
    rm = RewardModel(build_model(cfg.model, seed=1), cfg.model.d_model).eval()
    seqs = [[5, 6, 7, 8, 9], [5, 6, 7]]
    ids, mask = pad_right(seqs, 0)
    batched = rm(ids, mask)
    alone = torch.cat([rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    hidden = rm.backbone(torch.tensor([seqs[1]]), return_hidden=True).hidden[0, -1]
    torch.testing.assert_close(alone[1], (hidden @ rm.head.weight[0] + rm.head.bias[0]).float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="right-padded"):
        rm(ids, mask.flip(1))
    loss, m = pair_loss(rm, (ids, mask))  # row 0 chosen, row 1 rejected
    torch.testing.assert_close(loss, -F.logsigmoid(batched[0] - batched[1]), rtol=0, atol=1e-6)
    assert m["pair_accuracy"] == float(batched[0] > batched[1])


@pytest.mark.slow
def test_sft_and_rm_phases_end_to_end(tmp_path, capsys):
    """Small budgets: the phases run, write done.json last, save only adapters, and the
    reloaded policy / reward model reproduce what the phases measured."""
    from aion_train.cli import main
    from aion_train.posttrain.common import evaluate_accuracy, read_done
    from aion_train.posttrain.lora import lora_modules
    from aion_train.posttrain.reward import load_reward_model, pair_accuracy, pair_batch, preference_pairs
    from aion_train.posttrain.sft import load_policy

    over = [
        f"run_dir={tmp_path}",
        "sft.base_steps=60",
        "sft.steps=40",
        "sft.eval_examples=48",
        "rm.steps=30",
        "rm.eval_pairs=64",
        "rm.train_pairs=512",
        "tracking.enabled=false",
    ]
    assert main(["sft", "--config", "configs/sft_tiny.yaml", "--json", *over]) == 0
    sft = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= sft["sft_accuracy"] <= 1.0 and sft["eval_examples"] == 48
    assert sft["sft_loss"] < 2.0, sft  # the response loss fell from ~ln(512)
    from safetensors.torch import load_file

    saved = load_file(sft["adapters"])
    assert saved and all(k.endswith((".lora_A", ".lora_B")) for k in saved)
    cfg = load_config("configs/sft_tiny.yaml", over)
    model, task = load_policy(cfg)
    merged, _ = load_policy(cfg, merge=True)
    assert lora_modules(model) and not lora_modules(merged)
    ids = torch.tensor([task.prompts("test")[0].prompt_ids])
    torch.testing.assert_close(merged.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=1e-5)
    again = evaluate_accuracy(model, task, task.prompts("test"), cfg.sft.max_new_tokens)
    assert again["accuracy"] == pytest.approx(sft["sft_accuracy"])

    assert main(["rm", "--config", "configs/sft_tiny.yaml", "--json", *over]) == 0
    rm = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rm == read_done(cfg, "rm")
    assert 0.0 <= rm["rm_pair_accuracy"] <= 1.0 and rm["rm_eval_pairs"] == 64
    reward = load_reward_model(cfg)
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.training
    pairs = preference_pairs(task.prompts("test_all"), task.tokenizer, 64, cfg.seed + 12)
    assert pair_accuracy(reward, pairs, lambda p: pair_batch(p, task.tokenizer.pad_id))[
        "rm_pair_accuracy"
    ] == pytest.approx(rm["rm_pair_accuracy"])
