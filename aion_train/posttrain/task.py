"""The checkable post-training task: easy-vqa questions as text instructions.

easy-vqa (PyPI) has 4000 train / 1000 test images, each one shape (circle, rectangle,
triangle) in one colour, with ~10 questions per image and 13 one-word answers. The image's
facts are rebuilt from the answers of its own questions (a colour question gives the colour,
"is there not a red shape?" -> "no" says it is red, ...) and given as a textual scene in the
system turn; the question is the user turn; the answer is one word from a closed set:

    <|system|> scene: a blue circle. <|end|> <|user|> is there not a red shape? <|end|>
    <|assistant|> no <|end|>

`is_correct` checks a generated answer exactly (case and trailing punctuation ignored). The
held-out set is a fixed seeded sample of the easy-vqa *test* split (other images). Chatterbot
corpus dialogs (PyPI chatterbot-corpus, YAML inside the package) add chat variety to SFT, and
extra chat JSONL records can be mixed in (`sft.data_files`).

With `sft.train_files` (and `rm.train_files`, `ppo.prompt_files`) the run post-trains on the
user's files instead (`user_data.py`): the task tokenizer is trained on their text, the splits
"train" / "test" are the PPO prompts and `TaskData.records` holds the SFT conversations and the
preference pairs."""

from __future__ import annotations

import glob
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from .chat_template import ChatTokenizer, render_chat, render_example

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
SYSTEM_CHAT = "you are a friendly chat bot."
_NEGATED = re.compile(r"\bnot\b|\bis no\b")


@dataclass
class Example:
    messages: list  # system/user turns (no assistant turn)
    prompt_ids: list  # chat-templated ids ending with the assistant header
    answer: str  # reference answer text
    candidates: tuple = ()  # the closed answer set (empty for free chat)
    kind: str = "chat"  # yes_no | color | shape | chat | file
    prompt: object = None  # a user file's prompt as written (text or messages): for reward functions
    columns: dict = field(default_factory=dict)  # a user file's other fields (e.g. answer)

    def conversation(self, response: str | None = None) -> list:
        return self.messages + [{"role": "assistant", "content": self.answer if response is None else response}]


@dataclass
class TaskData:
    tokenizer: ChatTokenizer
    splits: dict = field(default_factory=dict)  # name -> list[Example]: train, test, chat
    # user files / sft.data_files: sft_train, sft_eval, sft_extra (user_data.Conversation),
    # rm_train, rm_eval (user_data.Preference)
    records: dict = field(default_factory=dict)

    def prompts(self, split: str) -> list:
        if split not in self.splits:
            raise KeyError(f"task split {split!r}: have {sorted(self.splits)}")
        return self.splits[split]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def scene_facts(questions, answers, image_ids) -> dict:
    """{image id: (colour, shape)} from the answers of each image's questions; images whose
    facts cannot both be derived are left out."""
    facts: dict = {}
    for q, a, img in zip(questions, answers, image_ids):
        f = facts.setdefault(img, {})
        words = _words(q)
        colour = next((w for w in words if w in COLORS), None)
        shape = next((w for w in words if w in SHAPES), None)
        if a in COLORS:
            f["colour"] = a
            if shape:
                f["shape"] = shape
        elif a in SHAPES:
            f["shape"] = a
            if colour:
                f["colour"] = colour
        elif a in YES_NO and (a == "yes") != bool(_NEGATED.search(q)):  # the mentioned fact holds
            if colour:
                f["colour"] = colour
            if shape:
                f["shape"] = shape
    return {img: (f["colour"], f["shape"]) for img, f in facts.items() if "colour" in f and "shape" in f}


def kind_of(answer: str) -> tuple[str, tuple]:
    if answer in YES_NO:
        return "yes_no", YES_NO
    if answer in COLORS:
        return "color", COLORS
    if answer in SHAPES:
        return "shape", SHAPES
    raise ValueError(f"easy-vqa answer {answer!r} is not a known answer")


def easy_vqa_records(split: str) -> list[dict]:
    """[{system, user, answer, kind, candidates}] of one easy-vqa split ("train" / "test")."""
    import easy_vqa

    getter = {"train": easy_vqa.get_train_questions, "test": easy_vqa.get_test_questions}
    if split not in getter:
        raise ValueError(f"easy-vqa split {split!r}: must be train or test")
    qs, ans, imgs = getter[split]()
    facts = scene_facts(qs, ans, imgs)
    out = []
    for q, a, img in zip(qs, ans, imgs):
        if img in facts:
            colour, shape = facts[img]
            kind, cands = kind_of(a)
            out.append(
                {"system": f"scene: a {colour} {shape}.", "user": q, "answer": a, "kind": kind, "candidates": cands}
            )
    return out


def chatterbot_pairs() -> list[tuple[str, str]]:
    """(message, reply) pairs of the English chatterbot corpus."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    pairs = []
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations", []):
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float)) and str(t).strip()]
            pairs += [(turns[i], turns[i + 1]) for i in range(len(turns) - 1)]
    return pairs


def load_chat_files(patterns) -> list[list[dict]]:
    """Conversations from JSON/JSONL files through HF `datasets` (offline). A record is
    {"messages": [{role, content}, ...]} ending with the assistant, or {"prompt", "response"
    [, "system"]}."""
    files = []
    for pat in patterns:
        hits = sorted(glob.glob(pat))
        if not hits:
            raise FileNotFoundError(f"sft.data_files: {pat!r} matches no file")
        files += hits
    if not files:
        return []
    import datasets

    ds = datasets.load_dataset("json", data_files=files, split="train")
    convs = []
    for i, rec in enumerate(ds):
        if rec.get("messages"):
            convs.append([{"role": m["role"], "content": m["content"]} for m in rec["messages"]])
        elif rec.get("prompt") is not None and rec.get("response") is not None:
            msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
            convs.append(
                msgs + [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
            )
        else:
            raise ValueError(f"{files}: record {i} has neither 'messages' nor 'prompt'/'response'")
    return convs


def _example(tok: ChatTokenizer, system: str, user: str, answer: str, kind: str, cands) -> Example:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return Example(msgs, render_chat(msgs, tok, True), answer, tuple(cands), kind)


def corpus_texts(vqa: list[dict], chat: list[tuple[str, str]]) -> list[str]:
    """Plain text for the tokenizer and the base LM: scenes, questions and chat lines, but
    no question paired with its answer (answering is what SFT teaches)."""
    texts = [f"{r['system']} {r['user']}" for r in vqa]  # every occurrence: BPE merges follow frequency
    texts += [f"{q} {a}" for q, a in chat]
    return texts + list(COLORS + SHAPES + YES_NO)


def ensure_tokenizer(cfg, texts) -> str:
    """sft.tokenizer, or the task tokenizer trained (rank 0, deterministic) into
    {run_dir}/task/tokenizer.model with model.vocab_size minus the role tokens."""
    from aion_train.data.tokenizer import train_tokenizer

    from .chat_template import ROLE_TOKENS

    if cfg.sft.tokenizer:
        return cfg.sft.tokenizer
    path = Path(cfg.run_dir) / "task" / "tokenizer.model"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        n = cfg.model.vocab_size - len(ROLE_TOKENS)
        try:
            train_tokenizer(texts() if callable(texts) else texts, str(path), n, seed=cfg.seed)
        except RuntimeError as e:  # SentencePiece: too few distinct pieces in the text
            raise ValueError(
                f"cannot train a {n}-piece task tokenizer (model.vocab_size={cfg.model.vocab_size} minus "
                f"{len(ROLE_TOKENS)} role tokens) on this text: {str(e).strip().splitlines()[-1]}; "
                "lower model.vocab_size, give more text, or name a tokenizer in sft.tokenizer"
            ) from None
    if dist.is_initialized():
        dist.barrier()
    return str(path)


def build_task_data(cfg) -> TaskData:
    """Tokenizer + splits: train (easy-vqa train), test (held-out: `sft.eval_examples` seeded
    easy-vqa test prompts), test_all (every easy-vqa test prompt), chat (chatterbot), extra
    (`sft.data_files`). With the user's files: see `build_file_task`."""
    from .user_data import uses_files

    if uses_files(cfg):
        return build_file_task(cfg)
    vqa_train, vqa_test = easy_vqa_records("train"), easy_vqa_records("test")
    chat = chatterbot_pairs()
    tok_path = ensure_tokenizer(cfg, corpus_texts(vqa_train, chat))
    key = (
        os.path.abspath(tok_path),
        os.path.getmtime(tok_path),
        cfg.seed,
        cfg.sft.eval_examples,
        cfg.model.vocab_size,
        tuple(cfg.sft.data_files),
    )
    if key not in _CACHE:  # the phases of one process (PPO loads policy, reference, RM) share it
        _CACHE.clear()
        _CACHE[key] = _build(cfg, ChatTokenizer(tok_path), vqa_train, vqa_test, chat)
    return _CACHE[key]


_CACHE: dict = {}


def _build(cfg, tok, vqa_train, vqa_test, chat) -> TaskData:
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the task tokenizer has {tok.vocab_size} ids (with {len(tok.role_ids)} role tokens) "
            f"but model.vocab_size={cfg.model.vocab_size}"
        )
    rng = random.Random(cfg.seed)
    test = rng.sample(vqa_test, min(cfg.sft.eval_examples, len(vqa_test)))
    splits = {
        "train": [_example(tok, r["system"], r["user"], r["answer"], r["kind"], r["candidates"]) for r in vqa_train],
        "test": [_example(tok, r["system"], r["user"], r["answer"], r["kind"], r["candidates"]) for r in test],
        "test_all": [_example(tok, r["system"], r["user"], r["answer"], r["kind"], r["candidates"]) for r in vqa_test],
        "chat": [_example(tok, SYSTEM_CHAT, q, a, "chat", ()) for q, a in chat],
    }
    from .user_data import read_conversations

    extra = read_conversations("sft.data_files", cfg.sft.data_files) if cfg.sft.data_files else []
    return TaskData(tok, splits, {"sft_extra": extra})


def _file_key(cfg) -> tuple:
    stamp = []
    for pats in (cfg.sft.train_files, cfg.sft.eval_files, cfg.sft.data_files, cfg.rm.train_files):
        stamp.append(tuple(pats))
    stamp += [tuple(cfg.rm.eval_files), tuple(cfg.ppo.prompt_files), tuple(cfg.ppo.eval_files), cfg.ppo.eval_prompts]
    return tuple(stamp)


def _prompt_example(tok: ChatTokenizer, p) -> Example:
    answer = p.columns.get("answer")
    return Example(
        p.messages,
        render_chat(p.messages, tok, True),
        "" if answer is None else str(answer),
        (),
        "file",
        p.prompt,
        p.columns,
    )


def _prompt_examples(tok, prompts, room: int) -> list[Example]:
    """The prompts as examples; refused, each named, when one leaves fewer than ppo.max_new_tokens
    of model.max_seq_len for its response (found before SFT starts, not at a rollout)."""
    from .user_data import UserDataError

    out = [_prompt_example(tok, q) for q in prompts]
    long = [
        f"{q.where}: the prompt is {len(e.prompt_ids)} tokens, more than model.max_seq_len - ppo.max_new_tokens = {room}"
        for q, e in zip(prompts, out)
        if len(e.prompt_ids) > room
    ]
    if long:
        raise UserDataError(long)
    return out


def build_file_task(cfg) -> TaskData:
    """The user's files (`user_data`): the task tokenizer (sft.tokenizer, or trained on every
    message text of the files), the PPO prompts as splits "train" / "test" (ppo.eval_files, or
    the first ppo.eval_prompts train prompts), SFT conversations and preference pairs in
    `records`. Each file is read and checked once per process."""
    from . import user_data as ud

    tok_path = ensure_tokenizer(cfg, lambda: ud.texts_of(cfg))
    key = ("files", os.path.abspath(tok_path), os.path.getmtime(tok_path), cfg.model.vocab_size, _file_key(cfg))
    if key in _CACHE:
        return _CACHE[key]
    tok = ChatTokenizer(tok_path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the task tokenizer has {tok.vocab_size} ids (with {len(tok.role_ids)} role tokens) "
            f"but model.vocab_size={cfg.model.vocab_size}"
        )
    s, r, p = cfg.sft, cfg.rm, cfg.ppo
    records = {
        "sft_train": ud.read_conversations("sft.train_files", s.train_files),
        "sft_extra": ud.read_conversations("sft.data_files", s.data_files) if s.data_files else [],
        "sft_eval": ud.read_conversations("sft.eval_files", s.eval_files) if s.eval_files else [],
        "rm_train": ud.read_preferences("rm.train_files", r.train_files) if r.train_files else [],
        "rm_eval": ud.read_preferences("rm.eval_files", r.eval_files) if r.eval_files else [],
    }
    room = cfg.model.max_seq_len - p.max_new_tokens
    train = _prompt_examples(tok, ud.read_prompts("ppo.prompt_files", p.prompt_files), room) if p.prompt_files else []
    test = (
        _prompt_examples(tok, ud.read_prompts("ppo.eval_files", p.eval_files), room)
        if p.eval_files
        else train[: p.eval_prompts]
    )
    _CACHE.clear()
    _CACHE[key] = TaskData(tok, {"train": train, "test": test}, records)
    return _CACHE[key]


def normalise_answer(text: str) -> str:
    return text.strip().lower().strip(" .!?,;:'\"")


def is_correct(example: Example, generated_text: str) -> bool:
    """Exact-answer check (case, surrounding space and punctuation ignored)."""
    return normalise_answer(generated_text) == normalise_answer(example.answer)


__all__ = [
    "COLORS",
    "SHAPES",
    "YES_NO",
    "Example",
    "TaskData",
    "build_file_task",
    "build_task_data",
    "chatterbot_pairs",
    "corpus_texts",
    "easy_vqa_records",
    "is_correct",
    "kind_of",
    "load_chat_files",
    "normalise_answer",
    "render_chat",
    "render_example",
    "scene_facts",
]
