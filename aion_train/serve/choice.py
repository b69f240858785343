"""One choice of a request: its generated ids -> raw text (stop strings cut) -> enforced text,
for the streamed and the non-streamed case through the same code, so that both see the same
raw text and the stream shows prefixes of the same enforced string (policy_runtime.py).

    c = ChoiceState(index, tokenizer, context_ids, stops, request_policy, on_delta=send)
    engine row: sink=c.push, on_finish=lambda row: c.finish(row.finish_reason)
    c.result -> ChoiceResult (text, token ids, finish_reason, enforcement, actions)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aion_train.policy import EnforcementResult

from .policy_runtime import RequestPolicy, rule_actions
from .text import Detokenizer, StopStrings, stable_prefix


@dataclass
class ChoiceResult:
    index: int
    text: str  # the enforced output (what the client gets)
    token_ids: list[int]  # every generated id (the stop string's too; no eos)
    finish_reason: str  # stop | length | content_filter | cancelled | error
    enforcement: EnforcementResult
    actions: dict = field(default_factory=dict)
    raw_chars: int = 0

    def aion(self) -> dict:
        e = self.enforcement
        return {
            "index": self.index,
            "blocked": e.blocked,
            "blocked_by": e.blocked_by,
            "flags": [{"rule": f.rule_id, "category": f.category, "matches": f.matches} for f in e.flags],
            "redactions": e.redactions,
            "truncated": e.truncated,
        }


class ChoiceState:
    def __init__(
        self,
        index: int,
        tokenizer,
        context_ids: Sequence[int],
        stops: Sequence[str],
        policy: RequestPolicy,
        on_delta: Callable[[int, str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ):
        self.index = index
        self.detok = Detokenizer(tokenizer, context_ids)
        self.stops = StopStrings(stops)
        self.policy = policy
        self.enforcer = policy.stream()
        self.on_delta = on_delta
        self.cancelled = cancelled
        self.ids: list[int] = []
        self.raw_final: str | None = None
        self._fed = ""
        self.result: ChoiceResult | None = None

    def push(self, token_id: int, info=None) -> bool:
        """A new id; True when the choice is done (a stop string appeared, or cancelled)."""
        self.ids.append(int(token_id))
        if self.cancelled is not None and self.cancelled():
            return True
        if not self.stops.stops and self.on_delta is None:
            return False
        text = self.detok.text(self.ids)
        i = self.stops.find(text)
        if i is not None:
            self.raw_final = text[:i]
            return True
        if self.on_delta is not None:
            stable = stable_prefix(text, self.stops)
            if len(stable) > len(self._fed) and stable.startswith(self._fed):
                self._fed = stable
                delta = self.enforcer.feed(stable)
                if delta:
                    self.on_delta(self.index, delta)
        return False

    def finish(self, reason: str) -> ChoiceResult:
        if self.result is not None:
            return self.result
        raw = self.raw_final if self.raw_final is not None else self.detok.text(self.ids)
        if self.raw_final is not None:
            reason = "stop"
        elif self.cancelled is not None and self.cancelled():
            reason = "cancelled"
        delta, res = self.enforcer.finish(raw)
        if self.on_delta is not None and delta:
            self.on_delta(self.index, delta)
        if res.blocked:
            reason = "content_filter"
        self.result = ChoiceResult(
            index=self.index,
            text=res.text,
            token_ids=list(self.ids),
            finish_reason=reason,
            enforcement=res,
            actions=rule_actions(self.policy.policy, raw, res),
            raw_chars=len(raw),
        )
        return self.result
