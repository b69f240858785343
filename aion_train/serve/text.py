"""Generated ids -> text, incrementally, and stop strings.

The text of a completion is what the generated ids add to the prompt's text:
`decode(context + ids)[len(decode(context)):]` over the last few prompt ids (SentencePiece
drops the leading space of the first piece it decodes, so " world" after "Hello" needs the
context). A chat response has no context (its first piece's space is dropped, as it should).
While streaming, trailing U+FFFD (an incomplete UTF-8 sequence of byte pieces that the next
piece may complete) and the end of the text that could be the start of a stop string are
held back; `stable_prefix` is what can be shown.
"""

from __future__ import annotations

from collections.abc import Sequence

CONTEXT_IDS = 8


class Detokenizer:
    def __init__(self, tokenizer, context_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.context = [int(i) for i in context_ids][-CONTEXT_IDS:]
        self.base = tokenizer.decode(self.context) if self.context else ""

    def text(self, ids: Sequence[int]) -> str:
        if not self.context:
            return self.tok.decode(list(ids))
        full = self.tok.decode(self.context + list(ids))
        if full.startswith(self.base):
            return full[len(self.base) :]
        return self.tok.decode(list(ids))

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """The text each id adds, so that "".join(result) == text(ids) (offsets for logprobs):
        token k covers the final text from where the first k-1 ids' text stops agreeing with it."""
        final = self.text(ids)
        bounds = [0]
        for k in range(1, len(ids)):
            cur = self.text(ids[:k])
            n = 0
            for a, b in zip(cur, final):
                if a != b:
                    break
                n += 1
            bounds.append(max(bounds[-1], n))
        bounds.append(len(final))
        return [final[bounds[i] : bounds[i + 1]] for i in range(len(ids))] if ids else []


class StopStrings:
    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)

    def find(self, text: str) -> int | None:
        """Index of the earliest stop string in `text` (None: none)."""
        best = None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def holdback(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of a stop string."""
        n = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), n, -1):
                if text.endswith(s[:k]):
                    n = k
                    break
        return n


def stable_prefix(text: str, stops: StopStrings) -> str:
    """The part of a growing generated text that later tokens cannot change."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    text = text[:end]
    hold = stops.holdback(text)
    return text[: len(text) - hold] if hold else text
