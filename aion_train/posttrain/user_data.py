"""Post-training on the user's files: chat JSONL for SFT, preference JSONL for the reward model,
prompts JSONL for PPO. Read with the standard library (one record per line; a `.json` file may
hold a list of records) and checked record by record: every error names the file, the line (or
record) and the field, and all errors of all files are reported at once.

Formats (as TRL has them):

* SFT (`sft.train_files`, `sft.eval_files`): ``{"messages": [{"role", "content"}, ...]}`` with
  roles system / user / assistant and at least one assistant turn; the loss covers the tokens
  of every assistant turn (and its closing ``<|end|>``). ``{"prompt", "response"[, "system"]}``
  is read as a one-turn conversation.
* Reward model (`rm.train_files`, `rm.eval_files`): ``{"prompt": str, "chosen": str,
  "rejected": str}``; or conversational: ``"prompt"`` a list of messages and ``"chosen"`` /
  ``"rejected"`` lists holding the assistant message, or, without ``"prompt"``, the two whole
  conversations (their shared leading messages are the prompt).
* PPO (`ppo.prompt_files`, `ppo.eval_files`): ``{"prompt": str}`` or ``{"prompt": [messages]}``
  (or ``"messages"``) ending with a user turn; every other field of the record (e.g.
  ``"answer"``) is passed to a reward function by name (TRL's ``reward_func(prompts,
  completions, **columns)``).

`check_phase_files` validates every file a phase names before any model is built; the commands
call it before they launch ranks or a cluster."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json")
PHASE_KEYS = {
    "sft": ("sft.train_files", "sft.eval_files", "sft.data_files"),
    "rm": ("rm.train_files", "rm.eval_files"),
    "ppo": ("ppo.prompt_files", "ppo.eval_files"),
}


class UserDataError(ValueError):
    """One or more bad records; the message lists each as FILE:LINE: field: problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        super().__init__("bad post-training data:\n  " + "\n  ".join(shown))


@dataclass
class Conversation:
    messages: list  # [{role, content}], at least one assistant turn
    where: str  # FILE:LINE


@dataclass
class Preference:
    prompt: list  # messages ending with a user turn
    chosen: str  # assistant responses
    rejected: str
    where: str


@dataclass
class Prompt:
    messages: list  # ending with a user turn
    prompt: object  # the record's prompt as written (str or messages): what a reward function gets
    columns: dict = field(default_factory=dict)  # the record's other fields
    where: str = ""


def expand_files(key: str, patterns) -> list[str]:
    """The files of a config key's paths/globs, in order; raises naming the key."""
    files, errors = [], []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else ([pat] if Path(pat).is_file() else [])
        if not hits:
            errors.append(f"{key}: {pat!r} matches no file")
        for h in hits:
            if not h.endswith(SUFFIXES):
                errors.append(f"{key}: {h}: not a .jsonl or .json file")
        files += hits
    if errors:
        raise UserDataError(errors)
    return files


def _records(path: str, errors: list[str]):
    """(where, record) of every record of one file; bad JSON is an error, not fatal to the others."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{e.lineno}: not valid JSON ({e.msg})")
            return
        for i, rec in enumerate(data):
            yield f"{path}: record {i}", rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")


def _messages(value, where: str, name: str, errors: list[str]) -> list | None:
    if not isinstance(value, list) or not value:
        errors.append(f"{where}: {name}: must be a non-empty list of {{role, content}} messages")
        return None
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            errors.append(f"{where}: {name}[{i}]: must be a mapping with 'role' and 'content'")
            return None
        if m["role"] not in ROLES:
            errors.append(f"{where}: {name}[{i}].role={m['role']!r}: must be one of {', '.join(ROLES)}")
            return None
        if not isinstance(m["content"], str):
            errors.append(f"{where}: {name}[{i}].content: must be text, got {type(m['content']).__name__}")
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _mapping(rec, where: str, errors: list[str]) -> bool:
    if not isinstance(rec, dict):
        errors.append(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
        return False
    return True


def _text(rec: dict, key: str, where: str, errors: list[str]) -> str | None:
    v = rec[key]
    if not isinstance(v, str) or not v.strip():
        errors.append(f"{where}: {key}: must be non-empty text")
        return None
    return v


def read_conversations(key: str, patterns) -> list[Conversation]:
    errors: list[str] = []
    out = []
    for path in expand_files(key, patterns):
        for where, rec in _records(path, errors):
            if not _mapping(rec, where, errors):
                continue
            if "messages" in rec:
                msgs = _messages(rec["messages"], where, "messages", errors)
                if msgs is None:
                    continue
                if not any(m["role"] == "assistant" for m in msgs):
                    errors.append(f"{where}: messages: no assistant turn (nothing to train on)")
                    continue
                out.append(Conversation(msgs, where))
            elif "prompt" in rec and "response" in rec:
                p, r = _text(rec, "prompt", where, errors), _text(rec, "response", where, errors)
                if p is None or r is None:
                    continue
                sys_ = [{"role": "system", "content": str(rec["system"])}] if rec.get("system") else []
                out.append(Conversation(sys_ + [_turn("user", p), _turn("assistant", r)], where))
            else:
                errors.append(f"{where}: no 'messages' field (have: {', '.join(sorted(rec)) or 'none'})")
    if errors:
        raise UserDataError(errors)
    return out


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _response(value, where: str, name: str, errors: list[str]) -> str | None:
    """A chosen/rejected side: text, or a list holding one assistant message."""
    if isinstance(value, str):
        if not value.strip():
            errors.append(f"{where}: {name}: must be non-empty text")
            return None
        return value
    msgs = _messages(value, where, name, errors)
    if msgs is None:
        return None
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        errors.append(
            f"{where}: {name}: must hold exactly one assistant message (got roles {[m['role'] for m in msgs]})"
        )
        return None
    return msgs[0]["content"]


def _prompt_messages(value, where: str, name: str, errors: list[str]) -> list | None:
    if isinstance(value, str):
        if not value.strip():
            errors.append(f"{where}: {name}: must be non-empty text")
            return None
        return [_turn("user", value)]
    msgs = _messages(value, where, name, errors)
    if msgs is not None and msgs[-1]["role"] != "user":
        errors.append(f"{where}: {name}: must end with a user message (got {msgs[-1]['role']!r})")
        return None
    return msgs


def read_preferences(key: str, patterns) -> list[Preference]:
    errors: list[str] = []
    out = []
    for path in expand_files(key, patterns):
        for where, rec in _records(path, errors):
            if not _mapping(rec, where, errors):
                continue
            missing = [k for k in ("chosen", "rejected") if k not in rec]
            if missing:
                errors.append(
                    f"{where}: no {' / '.join(repr(k) for k in missing)} field (have: {', '.join(sorted(rec))})"
                )
                continue
            if "prompt" in rec:
                prompt = _prompt_messages(rec["prompt"], where, "prompt", errors)
                chosen = _response(rec["chosen"], where, "chosen", errors)
                rejected = _response(rec["rejected"], where, "rejected", errors)
            else:  # implicit prompt: two whole conversations sharing their leading messages
                prompt, chosen, rejected = _split_implicit(rec, where, errors)
            if prompt is not None and chosen is not None and rejected is not None:
                out.append(Preference(prompt, chosen, rejected, where))
    if errors:
        raise UserDataError(errors)
    return out


def _split_implicit(rec, where, errors):
    if isinstance(rec["chosen"], str):
        errors.append(f"{where}: prompt: missing (text chosen/rejected need a 'prompt' field)")
        return None, None, None
    c = _messages(rec["chosen"], where, "chosen", errors)
    r = _messages(rec["rejected"], where, "rejected", errors)
    if c is None or r is None:
        return None, None, None
    if c[:-1] != r[:-1] or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant" or len(c) < 2:
        errors.append(
            f"{where}: chosen/rejected: without a 'prompt' field both must be the same conversation "
            "up to a different final assistant message"
        )
        return None, None, None
    if c[-2]["role"] != "user":
        errors.append(f"{where}: chosen: the message before the final assistant turn must be the user's")
        return None, None, None
    return c[:-1], c[-1]["content"], r[-1]["content"]


def read_prompts(key: str, patterns) -> list[Prompt]:
    errors: list[str] = []
    out = []
    for path in expand_files(key, patterns):
        for where, rec in _records(path, errors):
            if not _mapping(rec, where, errors):
                continue
            name = "prompt" if "prompt" in rec else "messages" if "messages" in rec else None
            if name is None:
                errors.append(f"{where}: no 'prompt' (or 'messages') field (have: {', '.join(sorted(rec)) or 'none'})")
                continue
            msgs = _prompt_messages(rec[name], where, name, errors)
            if msgs is not None:
                cols = {k: v for k, v in rec.items() if k != name}
                out.append(Prompt(msgs, rec[name], cols, where))
    if errors:
        raise UserDataError(errors)
    return out


def texts_of(cfg) -> list[str]:
    """Every message text of the run's post-training files (for the task tokenizer)."""
    s, r, p = cfg.sft, cfg.rm, cfg.ppo
    texts = []
    for c in read_conversations("sft.train_files", list(s.train_files) + list(s.data_files)):
        texts += [m["content"] for m in c.messages]
    if r.train_files:
        for pr in read_preferences("rm.train_files", r.train_files):
            texts += [m["content"] for m in pr.prompt] + [pr.chosen, pr.rejected]
    if p.prompt_files:
        for q in read_prompts("ppo.prompt_files", p.prompt_files):
            texts += [m["content"] for m in q.messages]
    return texts


def uses_files(cfg) -> bool:
    """True when the run post-trains on the user's files instead of the built-in task."""
    return bool(cfg.sft.train_files or cfg.rm.train_files or cfg.ppo.prompt_files)


def check_phase_files(cfg, phases=("sft", "rm", "ppo")) -> None:
    """Read and check every file the given phases name (raises UserDataError listing every bad
    record, or ValueError naming the missing key). For the built-in task: `sft.data_files` and a
    reward function only."""
    errors: list[str] = []
    if "ppo" in phases and cfg.ppo.reward != "rm" and not cfg.ppo.env:
        from .rewards import resolve_reward

        try:
            resolve_reward(cfg.ppo.reward)
        except ValueError as e:
            errors.append(str(e))
    if not uses_files(cfg):  # the built-in task: only the chat files mixed into it
        if "sft" in phases and cfg.sft.data_files:
            try:
                read_conversations("sft.data_files", cfg.sft.data_files)
            except UserDataError as e:
                errors += [m if m.startswith("sft.data_files") else f"sft.data_files: {m}" for m in e.errors]
        if errors:
            raise UserDataError(errors)
        return
    readers = {
        "sft.train_files": read_conversations,
        "sft.data_files": read_conversations,
        "sft.eval_files": read_conversations,
        "rm.train_files": read_preferences,
        "rm.eval_files": read_preferences,
        "ppo.prompt_files": read_prompts,
        "ppo.eval_files": read_prompts,
    }
    for phase in phases:
        need = {"sft": "sft.train_files", "rm": "rm.train_files", "ppo": "ppo.prompt_files"}.get(phase)
        if need is None:
            continue
        if phase == "rm" and not cfg.rm.train_files:
            errors.append(
                "rm.train_files is empty but the run post-trains on your files: give preference JSONL "
                "(prompt, chosen, rejected), or leave the rm phase out (ppo.reward=module:function)"
            )
        elif phase == "ppo" and not cfg.ppo.prompt_files:
            errors.append("ppo.prompt_files is empty but the run post-trains on your files: give a prompts JSONL")
        for key in PHASE_KEYS[phase]:
            section, name = key.split(".")
            pats = getattr(getattr(cfg, section), name)
            if pats:
                try:
                    readers[key](key, pats)
                except UserDataError as e:
                    errors += [m if m.startswith(key) else f"{key}: {m}" for m in e.errors]
    if errors:
        raise UserDataError(errors)


def named_phases(cfg) -> tuple:
    """The post-training phases whose files (or reward function) the config names."""
    out = [ph for ph, keys in PHASE_KEYS.items() if any(getattr(cfg, ph).__dict__[k.split(".")[1]] for k in keys)]
    if cfg.ppo.reward != "rm" and "ppo" not in out:
        out.append("ppo")
    return tuple(out)


# phases of the pipeline that write the files the post-training phases read
FILE_WRITING_PHASES = {"open-book-data": ("sft", "ppo")}


def checkable_now(cfg, phases) -> tuple:
    """`phases` less those whose files a phase of `pipeline.phases` writes first (they are read
    and checked when they start)."""
    later = {ph for writer, readers in FILE_WRITING_PHASES.items() if writer in cfg.pipeline.phases for ph in readers}
    return tuple(ph for ph in phases if ph not in later)


__all__ = [
    "Conversation",
    "Preference",
    "Prompt",
    "UserDataError",
    "check_phase_files",
    "expand_files",
    "checkable_now",
    "named_phases",
    "read_conversations",
    "read_preferences",
    "read_prompts",
    "texts_of",
    "uses_files",
]
