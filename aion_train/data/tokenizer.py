"""SentencePiece BPE tokenizer with the platform's reserved special tokens.

Ids 0..3 are fixed: ``<pad>``=0, ``<unk>``=1, ``<s>`` (bos)=2, ``</s>`` (eos)=3, followed by
the multimodal/context markers in :data:`SPECIAL_TOKENS` as user-defined symbols (each
always a single id, also inside running text), then the 256 byte-fallback pieces and the
learned merges. Normalisation is the identity and whitespace is kept, so
``decode(encode(text)) == text`` for any text (bytes the vocabulary lacks fall back to byte
pieces; nothing becomes ``<unk>``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from aion_train.fsutil import atomic_write

from .tokenizer_file import PathBackedTokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS: tuple[str, ...] = (
    "<I>",
    "</I>",
    "<A>",
    "</A>",
    "<V>",
    "</V>",
    "<T>",
    "</T>",
    "<CTX>",
    "</CTX>",
)
TRAIN_SEED = 1234


MODEL_TYPES = ("bpe", "unigram")


def train_tokenizer(
    texts: Iterable[str],
    out_path: str,
    vocab_size: int,
    seed: int = TRAIN_SEED,
    max_sentence_length: int = 1 << 16,
    model_type: str = "bpe",
    control_symbols: Sequence[str] = (),
) -> str:
    """Train a SentencePiece model (``model_type`` bpe, the default, or unigram) on ``texts``
    and write it to ``out_path``. ``control_symbols`` (e.g. the chat role tokens) get reserved
    ids right after the delimiter tokens that no text ever encodes to.

    Every text is written to a temporary file (one line per text line, empty lines
    dropped) and all of it is used (no sentence sampling, no shuffling, one thread), so the
    same texts give the same model file byte for byte. The vocabulary has exactly
    ``vocab_size`` pieces (SentencePiece fails rather than return fewer). The model is
    written atomically (temp name in the same directory, then rename). Returns out_path.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: must be one of {', '.join(MODEL_TYPES)}")
    n_reserved = 4 + len(SPECIAL_TOKENS) + len(control_symbols) + 256
    if vocab_size <= n_reserved:
        raise ValueError(f"vocab_size must exceed the {n_reserved} reserved/byte pieces, got {vocab_size}")
    out_path = os.fspath(out_path)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    spm.set_random_generator_seed(seed)
    with tempfile.TemporaryDirectory(prefix=".spm-", dir=out_dir) as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        n_lines = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for text in texts:
                for line in text.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
                        n_lines += 1
        if n_lines == 0:
            raise ValueError("train_tokenizer: no text to train on")
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=prefix,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=list(SPECIAL_TOKENS),
            control_symbols=list(control_symbols),
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=max_sentence_length,
            hard_vocab_limit=True,
            minloglevel=2,
        )
        with open(prefix + ".model", "rb") as f:
            blob = _strip_paths(f.read())
    with atomic_write(out_path, "wb") as f:
        f.write(blob)
    return out_path


def _strip_paths(blob: bytes) -> bytes:
    """The model records its training input and prefix paths (here random temp names);
    replace them by fixed names so that the same texts give the same file bytes."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except Exception:  # protobuf missing: the model is still fine, only not byte-stable
        return blob
    proto = pb.ModelProto()
    proto.ParseFromString(blob)
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.append("corpus.txt")
    proto.trainer_spec.model_prefix = "tokenizer"
    return proto.SerializeToString()


class Tokenizer(PathBackedTokenizer):
    """A trained SentencePiece model (see :func:`train_tokenizer`). Picklable (by path)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos; add them with :meth:`encode_document`)."""
        return self._sp.encode(text, out_type=int)

    def encode_document(self, text: str) -> list[int]:
        return [self.bos_id, *self._sp.encode(text, out_type=int), self.eos_id]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; pad/bos/eos ids are dropped."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_text(self, i: int) -> str:
        """One token as text for display (logprobs): its piece, the word-start mark a space."""
        return self.id_to_piece(i).replace("\u2581", " ")

    def special_id(self, name: str) -> int:
        """Id of a reserved token: one of SPECIAL_TOKENS or <pad>/<unk>/<s>/</s>."""
        i = self._sp.piece_to_id(name)
        if (i == self.unk_id and name != "<unk>") or self._sp.id_to_piece(i) != name:
            raise KeyError(f"{name!r} is not a piece of {self.path}")
        return i


def is_hf_tokenizer(path: str) -> bool:
    path = os.fspath(path)
    return path.endswith(".json") or (os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")))


def load_tokenizer(path: str):
    """Our SentencePiece model (a ``.model`` file), or a Hugging Face ``tokenizer.json`` (the
    file or its folder) as :class:`aion_train.data.hf_tokenizer.HFTokenizer`; same interface."""
    path = os.fspath(path)
    if is_hf_tokenizer(path):
        from .hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path}: no such file (a SentencePiece .model or a tokenizer.json)")
    return Tokenizer(path)


def run_tokenizer_path(cfg) -> str:
    """The tokenizer a run trains with: data.tokenizer, else data.dir/tokenizer.model."""
    return cfg.data.tokenizer or os.path.join(cfg.data.dir, "tokenizer.model")
