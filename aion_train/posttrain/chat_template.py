"""The chat template and a tokenizer with reserved role tokens.

    <|system|> text <|end|> <|user|> text <|end|> <|assistant|> response <|end|>

The role tokens are ids appended after the SentencePiece vocabulary (`ChatTokenizer`), so
each is always one id and no text can produce it. A prompt ends with the assistant header;
generation stops at <|end|>. Only the response tokens and its closing <|end|> are trained
on in SFT (`render_example` returns the 0/1 response mask; `render_conversation` the mask of
every assistant turn of a multi-turn conversation). The base tokenizer is a SentencePiece
`.model` or a Hugging Face `tokenizer.json` (`data.tokenizer.load_tokenizer`)."""

from __future__ import annotations

from collections.abc import Sequence

from aion_train.data.tokenizer import load_tokenizer

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLES = ("system", "user", "assistant")


class ChatTokenizer:
    """A base tokenizer (SentencePiece or tokenizer.json) plus the role tokens as ids
    vocab..vocab+3. Picklable."""

    def __init__(self, path: str):
        self.sp = load_tokenizer(path)
        self.path = self.sp.path
        base = self.sp.vocab_size
        self.role_ids = {tok: base + i for i, tok in enumerate(ROLE_TOKENS)}
        self.system_id, self.user_id, self.assistant_id, self.end_id = (self.role_ids[t] for t in ROLE_TOKENS)
        self.vocab_size = base + len(ROLE_TOKENS)
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id, self.sp.bos_id, self.end_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; role tokens and pad/bos/eos are dropped."""
        return self.sp.decode([int(i) for i in ids if int(i) < self.sp.vocab_size])

    def header_id(self, role: str) -> int:
        if role not in ROLES:
            raise ValueError(f"chat role {role!r}: must be one of {', '.join(ROLES)}")
        return self.role_ids[f"<|{role}|>"]

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _check_messages(messages) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: must be a mapping with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be text, got {type(m['content']).__name__}")


def render_chat(messages, tokenizer: ChatTokenizer, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` ([{role, content}, ...]) in the template; with
    add_generation_prompt the ids end with the assistant header."""
    _check_messages(messages)
    ids: list[int] = [tokenizer.bos_id]
    for m in messages:
        ids += [tokenizer.header_id(m["role"]), *tokenizer.encode(m["content"]), tokenizer.end_id]
    if add_generation_prompt:
        ids.append(tokenizer.assistant_id)
    return ids


def render_example(messages, tokenizer: ChatTokenizer) -> tuple[list[int], list[int]]:
    """(ids, response_mask) of a conversation whose last message is the assistant's: the mask
    is 1 on that response's tokens and its <|end|>, 0 on everything before."""
    _check_messages(messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an SFT example must end with an assistant message")
    prompt = render_chat(messages[:-1], tokenizer, add_generation_prompt=True)
    response = tokenizer.encode(messages[-1]["content"]) + [tokenizer.end_id]
    return prompt + response, [0] * len(prompt) + [1] * len(response)


def render_conversation(messages, tokenizer: ChatTokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask) of a whole conversation in the template: the mask is 1 on the content tokens
    of every assistant turn and on its closing <|end|> (what the model must produce), 0 on the
    bos, every role header and every system / user turn. Needs at least one assistant turn."""
    _check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("an SFT conversation needs at least one assistant message")
    ids, mask = [tokenizer.bos_id], [0]
    for m in messages:
        body = [*tokenizer.encode(m["content"]), tokenizer.end_id]
        ids += [tokenizer.header_id(m["role"]), *body]
        mask += [0] + [int(m["role"] == "assistant")] * len(body)
    return ids, mask


def render_response(prompt_messages, response: str, tokenizer: ChatTokenizer) -> list[int]:
    """The ids of a prompt (ending with the assistant header) followed by one response and its
    <|end|>: what the reward model scores (a PPO rollout has the same layout)."""
    return render_chat(prompt_messages, tokenizer, True) + tokenizer.encode(response) + [tokenizer.end_id]
