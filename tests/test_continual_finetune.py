"""Continual fine-tuning (posttrain/continual_finetune.py): a page's conversations are its three
questions open-book (its own chunk among distractors in the <CTX> block) and closed-book; the
fine-tuning draws round(f * B) replay rows per step and none without replay, moves only the
adapters, and learns the new records (their answer loss falls by 30% from the base's)."""

import random

import pytest
import torch

from aion_train.config import load_config
from aion_train.config.posttrain_schema import LoRAConfig
from aion_train.model import build_model
from aion_train.posttrain.adapter_training import adam_steps
from aion_train.posttrain.chat_template import ChatTokenizer
from aion_train.posttrain.continual_finetune import fine_tune, page_conversations, render
from aion_train.posttrain.sft import lm_batch
from aion_train.retrieval import open_book as ob

OVR = [
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=128",
    "model.moe.every=2",
    "model.moe.n_experts=4",
    "model.moe.d_ff_expert=64",
    "model.kernels=torch",
]


@pytest.fixture(scope="module")
def pages():
    return ob.read_man_pages()[:12]


@pytest.fixture(scope="module")
def tok(tmp_path_factory, pages):
    from aion_train.data.tokenizer import train_tokenizer

    texts = [p.document() for p in pages] * 5 + [e.question for p in pages for e in ob.examples_of(p)] * 5
    path = tmp_path_factory.mktemp("tok") / "t.model"
    train_tokenizer(texts, str(path), 400)
    return ChatTokenizer(str(path))


def _search(pages):
    def search(question):
        return [(p.doc_id, f"[distractor of {p.doc_id}]") for p in pages]

    return search


def test_a_page_gives_its_questions_open_book_with_its_chunk_and_closed_book(pages):
    page = pages[0]
    own = lambda p: f"first chunk of {p.name}"  # noqa: E731
    convs = page_conversations(page, _search(pages), noise=1, seed=0, own_text=own)
    examples = ob.examples_of(page)
    assert len(convs) == 2 * len(examples) == 6
    opened, closed = convs[:3], convs[3:]
    for conv, e in zip(opened, examples):
        prompt = conv[0]["content"]
        assert conv[1] == {"role": "assistant", "content": e.answer}
        assert prompt.startswith("<CTX>") and own(page) in prompt and e.question in prompt
        others = [p for p in pages if f"[distractor of {p.doc_id}]" in prompt]
        assert len(others) == 1 and others[0] is not page  # one distractor, never the page itself
    for conv, e in zip(closed, examples):
        assert conv == [
            {"role": "user", "content": ob.open_book_prompt(e.question)},
            {"role": "assistant", "content": e.answer},
        ]
        assert "<CTX>" not in conv[0]["content"]


def _model(tok, seed=0):
    cfg = load_config("configs/tiny_cpu.yaml", [*OVR, f"model.vocab_size={tok.vocab_size}"])
    return build_model(cfg.model, seed=seed).float()


def _pretrained(tok, records, steps=60):
    """The base of a continual fine-tuning: full weights trained on every token of `records`
    (a random model's frozen head leaves low-rank adapters nearly nothing to learn with)."""
    model, rng = _model(tok), random.Random(0)

    def loss_at(step):
        rows = [records[rng.randrange(len(records))] for _ in range(8)]
        ids, labels = lm_batch([r[0] for r in rows], [[1] * len(r[0]) for r in rows], tok.pad_id)
        return model(ids, labels=labels).loss

    adam_steps(model, steps, 1e-2, loss_at)
    return model


def _answer_loss(model, tok, records):
    ids, labels = lm_batch([r[0] for r in records], [r[1] for r in records], tok.pad_id)
    with torch.no_grad():
        return float(model.eval()(ids, labels=labels).loss)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_replay_rows_per_step_only_adapters_move_and_the_new_records_are_learnt(pages, tok, fraction):
    convs = [page_conversations(p, _search(pages), 1, 0, lambda p: f"{p.name}: {p.description}") for p in pages]
    new = render([c for cs in convs[:4] for c in cs], tok, 256)
    old = render([c for cs in convs[4:] for c in cs], tok, 256)
    lora = LoRAConfig(enabled=True, r=4, alpha=8.0, dropout=0.0)
    calls = []

    def replay(m):
        calls.append(m)
        return old[:m]

    model = _pretrained(tok, old)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = _answer_loss(model, tok, new)
    steps, batch = 60, 8
    losses = fine_tune(model, tok, new, replay, lora, steps, 1e-2, batch, fraction, seed=0)
    assert calls == [round(fraction * batch)] * steps
    assert len(losses) == steps
    after = model.state_dict()
    moved = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
    assert moved and all("lora" in k for k in moved), sorted(moved)[:5]
    assert _answer_loss(model, tok, new) < 0.7 * loss_before

    calls.clear()
    plain = _model(tok)
    fine_tune(plain, tok, new, None, lora, 3, 3e-3, batch, fraction, seed=0)
    assert calls == []


def test_bad_arguments_are_refused(pages, tok):
    with pytest.raises(ValueError, match="longer than max_seq_len=256"):
        render(page_conversations(pages[0], _search(pages), 1, 0, None), tok, 256)  # whole documents
    lora = LoRAConfig(enabled=True, r=4, alpha=8.0, dropout=0.0)
    with pytest.raises(ValueError, match="no new records"):
        fine_tune(_model(tok), tok, [], None, lora, 1, 1e-3)
    with pytest.raises(ValueError, match="replay_fraction"):
        fine_tune(_model(tok), tok, [([1, 2], [0, 1])], None, lora, 1, 1e-3, replay_fraction=1.0)
