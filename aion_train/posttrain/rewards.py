"""PPO rewards from a Python function (`ppo.reward: "package.module:function"`), for checkable
tasks, instead of a trained reward model.

The function is called once per rollout batch as TRL's reward functions are:

    fn(prompts: list, completions: list[str], **columns) -> list[float]

`prompts` are the records' prompts as written (text, or a list of messages), `completions` the
decoded generated texts (without the closing <|end|>), and every other field of the prompt
records arrives as a list under its own name (e.g. `answer=[...]`). It must return one finite
number per completion. Two checkable rewards ship here:

* `aion_train.posttrain.rewards:exact_match`: 1.0 when the completion equals the record's
  `answer` (case, surrounding space and punctuation ignored), else 0.0;
* `aion_train.posttrain.rewards:regex_match`: 1.0 when the whole completion (stripped) matches
  the record's `pattern` (Python `re.fullmatch`), else 0.0;
* `aion_train.posttrain.rewards:token_f1`: SQuAD's token F1 of the completion against the
  record's `answer` (lower case, punctuation and the articles a / an / the removed, bags of
  words; Rajpurkar et al. 2016), in [0, 1]: partial credit for a long answer half right, where
  exact match pays nothing until the whole answer is.
"""

from __future__ import annotations

import math
import os
import re
import string
import sys
from collections import Counter

import torch


def _normalise(text: str) -> str:
    return text.strip().lower().strip(" .!?,;:'\"")


def exact_match(prompts, completions, answer=None, **_) -> list[float]:
    if answer is None:
        raise ValueError("exact_match: the prompt records need an 'answer' field")
    return [float(_normalise(c) == _normalise(str(a))) for c, a in zip(completions, answer)]


def regex_match(prompts, completions, pattern=None, **_) -> list[float]:
    if pattern is None:
        raise ValueError("regex_match: the prompt records need a 'pattern' field")
    return [float(re.fullmatch(str(p), c.strip()) is not None) for c, p in zip(completions, pattern)]


def _squad_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


_PUNCTUATION = frozenset(string.punctuation)


def token_f1(prompts, completions, answer=None, **_) -> list[float]:
    if answer is None:
        raise ValueError("token_f1: the prompt records need an 'answer' field")
    scores = []
    for c, a in zip(completions, answer):
        pred, gold = _squad_tokens(c), _squad_tokens(str(a))
        if not pred or not gold:  # SQuAD: two empty answers agree, one empty scores 0
            scores.append(float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / len(pred), common / len(gold)
        scores.append(2 * precision * recall / (precision + recall))
    return scores


def resolve_reward(spec: str):
    """'package.module:function' -> the function; the working directory is importable (as in
    the pipeline's workers). Errors name `ppo.reward`."""
    from aion_train.pipeline.phases import resolve_callable

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return resolve_callable(spec)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"ppo.reward={spec!r}: cannot load it ({type(e).__name__}: {e})") from None


class FunctionReward:
    """The reward of `ppo.reward` = a function: scores decoded completions (`scores_text`)."""

    scores_text = True

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = resolve_reward(spec)

    def score(self, examples, completions: list[str]) -> torch.Tensor:
        prompts = [e.prompt if e.prompt is not None else e.messages for e in examples]
        names = sorted({k for e in examples for k in e.columns})
        if not names and any(e.answer for e in examples):  # the built-in task: its answers
            names = ["answer"]
            columns = {"answer": [e.answer for e in examples]}
        else:
            columns = {k: [e.columns.get(k) for e in examples] for k in names}
        out = self.fn(prompts, completions, **columns)
        try:
            values = [float(v) for v in out]
        except TypeError:
            raise ValueError(f"ppo.reward={self.spec!r} returned {type(out).__name__}, not a list of numbers") from None
        if len(values) != len(completions):
            raise ValueError(
                f"ppo.reward={self.spec!r} returned {len(values)} values for {len(completions)} completions"
            )
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"ppo.reward={self.spec!r} returned non-finite values {bad[:3]}")
        return torch.tensor(values, dtype=torch.float32)


__all__ = ["FunctionReward", "exact_match", "regex_match", "resolve_reward", "token_f1"]
