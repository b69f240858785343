"""A Hugging Face ``tokenizer.json`` (the `tokenizers` library) behind the interface of our
SentencePiece :class:`~aion_train.data.tokenizer.Tokenizer`, so an imported model keeps its own
tokenizer wherever a SentencePiece model is accepted (``data.tokenizer``, ``--tokenizer``).

The special ids come from ``tokenizer_config.json`` / ``special_tokens_map.json`` next to the
file when present (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``), else from the
usual names (<s> </s>, <|begin_of_text|> <|end_of_text|>, <|endoftext|>); a missing pad is the
eos. ``encode`` adds no special tokens (as ours); ``decode`` drops them."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from .tokenizer_file import PathBackedTokenizer

_BOS = ("<s>", "<|begin_of_text|>", "<|im_start|>", "<|endoftext|>", "<bos>")
_EOS = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<eos>")


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class HFTokenizer(PathBackedTokenizer):
    """`tokenizer.json` (a file, or the folder holding it). Picklable (by path)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Fast

        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        self.path = path
        self.file = file
        self._tk = _Fast.from_file(file)
        self.vocab_size: int = self._tk.get_vocab_size(with_added_tokens=True)
        names = self._special_names(os.path.dirname(os.path.abspath(file)))

        def pick(key: str, fallbacks: Sequence[str]) -> int | None:
            for name in ([names[key]] if names.get(key) else []) + list(fallbacks):
                i = self._tk.token_to_id(name)
                if i is not None:
                    return int(i)
            return None

        self.bos_id = pick("bos_token", _BOS)
        self.eos_id = pick("eos_token", _EOS)
        if self.eos_id is None:
            raise ValueError(f"{file}: no end-of-sequence token found (set eos_token in tokenizer_config.json)")
        if self.bos_id is None:
            self.bos_id = self.eos_id  # e.g. Qwen2: documents are separated by <|endoftext|> alone
        unk = pick("unk_token", ("<unk>",))
        self.unk_id = -1 if unk is None else unk
        pad = pick("pad_token", ("<pad>",))
        self.pad_id = self.eos_id if pad is None else pad
        self._special = {
            int(t.id if hasattr(t, "id") else k) for k, t in self._tk.get_added_tokens_decoder().items() if t.special
        }

    @staticmethod
    def _special_names(folder: str) -> dict:
        out: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as f:
                    doc = json.load(f)
                for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                    if _token_text(doc.get(key)):
                        out[key] = _token_text(doc.get(key))
        return out

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_document(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text), self.eos_id]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tk.id_to_token(int(i)) or ""

    def piece_text(self, i: int) -> str:
        """One token as text for display (logprobs): decoded on its own (a byte-level piece
        such as `Ġthe` is " the"; a partial UTF-8 sequence shows as U+FFFD)."""
        return self._tk.decode([int(i)], skip_special_tokens=False)

    def special_id(self, name: str) -> int:
        i = self._tk.token_to_id(name)
        if i is None:
            raise KeyError(f"{name!r} is not a token of {self.file}")
        return int(i)
