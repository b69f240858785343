"""A checkpoint -> one single-process model in eval mode, its tokenizer and its chat template.

Accepted `--checkpoint` paths:

* a text **pretraining** run: the run folder, its `checkpoints/` or one `step_XXXXXXXX`
  folder, saved in any TP/EP layout (`checkpoint.reshard.load_full_state_dict` gathers it). The
  model is built from the manifest's `model_config`; the tokenizer (a SentencePiece `.model` or a
  Hugging Face `tokenizer.json`) is `--tokenizer`, else the run's `config.yaml` (`data.tokenizer`,
  or `data.dir`/tokenizer.model). No chat template:
  such a model serves completions only.
* an **SFT** run (the run folder or its `sft/` folder, which holds `done.json`): the base
  weights (`done["base_checkpoint"]`, any layout) with the LoRA adapters of
  `done["adapters"]` merged in (W0 + alpha/r B A, alpha and r from the adapter file's
  metadata), or the full fine-tuned `done["model_checkpoint"]`. Tokenizer: `--tokenizer`,
  else the task tokenizer `{run}/task/tokenizer.model` (or the one done.json names), wrapped in the post-training
  `ChatTokenizer` (role tokens), so chat requests use `posttrain.chat_template.render_chat`.
* a **PPO** run (the run folder or its `ppo/` folder): the SFT model above, then the PPO
  actor's trained tensors from the latest `ppo/checkpoints/` step (its LoRA adapters, merged
  on top of the SFT base, or every weight without LoRA), reassembled from any TP/EP layout.

Weights are loaded as saved and cast to `dtype` (fp32 or bf16); nothing else about the model
changes, except that MoE layers run dropless at inference (`capacity_factor` is a training
device: with it, a token's output would depend on the other tokens of the batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class LoadError(Exception):
    """The checkpoint cannot be served (message says why and what to pass)."""


@dataclass
class LoadedModel:
    model: Any  # aion_train.model.Transformer, eval mode
    tokenizer: Any  # Tokenizer or ChatTokenizer
    kind: str  # "pretrain" | "sft" | "ppo"
    checkpoint: str  # the weights folder that was read
    model_id: str
    max_seq_len: int
    dtype: str
    chat: bool  # has the post-training chat template (role tokens)
    eos_ids: tuple[int, ...]  # generation stops at any of them
    info: dict = field(default_factory=dict)
    multimodal: bool = False  # a MultimodalModel: chat takes image/audio/video parts (mm_prompt.py)

    @property
    def media_config(self):
        """The model's multimodal settings (None: a text-only model)."""
        return self.model.mm if self.multimodal else None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def render_chat(self, messages) -> list[int]:
        if not self.chat:
            raise LoadError(
                f"model {self.model_id!r} is a {self.kind} checkpoint without the "
                "post-training chat template; use completions"
            )
        from aion_train.posttrain.chat_template import render_chat

        return render_chat(messages, self.tokenizer, add_generation_prompt=True)

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt: bos + the text's ids (documents were trained as bos ... eos);
        a multimodal model's: `<T>` + the text's ids (its text was trained as <T> ... </T>)."""
        if self.multimodal:
            return [int(self.tokenizer.special_id("<T>")), *self.tokenizer.encode(text)]
        return [int(self.tokenizer.bos_id), *self.tokenizer.encode(text)]

    def render_media_chat(self, messages: list[dict]):
        """Chat messages (content strings or parts) -> an MMPrompt (mm_prompt.py); a text-only
        model refuses media parts (MediaError, code media_unsupported)."""
        from .mm_prompt import parse_messages, render

        return render(self.tokenizer, self.model.mm, parse_messages(messages, self.model.mm))


def load_for_serving(
    checkpoint: str, *, tokenizer: str | None = None, dtype: str = "fp32", model_id: str | None = None
) -> LoadedModel:
    if dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r}: must be one of fp32, bf16")
    path = Path(checkpoint)
    if not path.exists():
        raise LoadError(f"{checkpoint}: no such file or folder")
    phase, run_dir = _phase_of(path)
    if phase == "ppo":
        out = _load_ppo(run_dir, tokenizer)
    elif phase == "sft":
        out = _load_sft(run_dir, tokenizer)
    else:
        out = _load_pretrain(path, tokenizer)
    model, tok, kind, weights, chat, info = out
    _make_dropless(model)
    model = model.eval().to(DTYPES[dtype])
    for p in model.parameters():
        p.requires_grad_(False)
    if tok.vocab_size > model.cfg.vocab_size:
        raise LoadError(
            f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary is "
            f"{model.cfg.vocab_size}: not this model's tokenizer"
        )
    multimodal = hasattr(model, "encode_media")
    if chat:
        eos = (int(tok.end_id), int(tok.sp.eos_id))
    elif multimodal:
        from .mm_prompt import end_ids

        eos = end_ids(tok)
    else:
        eos = (int(tok.eos_id),)
    name = model_id or _default_model_id(path, run_dir, kind)
    return LoadedModel(
        model=model,
        tokenizer=tok,
        kind=kind,
        checkpoint=str(weights),
        model_id=name,
        max_seq_len=int(model.cfg.max_seq_len),
        dtype="bf16" if DTYPES[dtype] is torch.bfloat16 else "fp32",
        chat=chat,
        eos_ids=eos,
        info=info,
        multimodal=multimodal,
    )


# ----------------------------------------------------------------------------- detection
def _phase_of(path: Path) -> tuple[str, Path | None]:
    """("ppo"|"sft", run folder) for a post-training run, else ("pretrain", None)."""
    if path.is_dir():
        if path.name in ("ppo", "sft") and (path / "done.json").is_file():
            return path.name, path.parent
        if (path / "ppo" / "done.json").is_file():
            return "ppo", path
        if (path / "sft" / "done.json").is_file() and not (path / "checkpoints").is_dir():
            return "sft", path
    return "pretrain", None


def _default_model_id(path: Path, run_dir: Path | None, kind: str) -> str:
    root = run_dir if run_dir is not None else path.resolve()
    while root.name.startswith("step_") or root.name == "checkpoints":
        root = root.parent
    return f"aion-{root.name or 'model'}" + ("" if kind == "pretrain" else f"-{kind}")


def _resolve(p: str, run_dir: Path) -> Path:
    """A path written into done.json (maybe relative to the trainer's cwd) -> an existing path,
    also after the run folder was moved: the longest tail of it that exists under run_dir."""
    cand = Path(p)
    if cand.exists():
        return cand
    parts = cand.parts
    for k in range(len(parts)):
        tail = run_dir.joinpath(*parts[k:])
        if tail.exists():
            return tail
    raise LoadError(f"{p}: named in {run_dir}'s done.json but not found (also not under {run_dir})")


# ----------------------------------------------------------------------------- pretrain
def _build_text_model(model_cfg_dict: dict, full: dict, where: str, allow_multimodal: bool = False):
    from aion_train.checkpoint import model_config_from_dict
    from aion_train.model import build_model

    mcfg = model_config_from_dict(model_cfg_dict)
    if mcfg.multimodal.enabled:
        if not allow_multimodal:
            raise LoadError(f"{where}: a multimodal checkpoint; post-training runs of one are not served")
        from aion_train.model.multimodal import build_multimodal_model

        model = build_multimodal_model(mcfg, seed=0)
    else:
        model = build_model(mcfg, seed=0)
    missing, unexpected = model.load_state_dict(full, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise LoadError(
            f"{where}: weights do not match the model (missing {missing[:4]}, unexpected {list(unexpected)[:4]})"
        )
    return model


def _load_pretrain(path: Path, tokenizer: str | None):
    from aion_train.checkpoint import CheckpointError, find_checkpoint, load_full_state_dict, read_manifest

    try:
        folder = find_checkpoint(path)
        cfg_dict, full = load_full_state_dict(folder)
    except CheckpointError as e:
        raise LoadError(str(e)) from None
    manifest = read_manifest(folder)
    model = _build_text_model(cfg_dict, full, str(folder), allow_multimodal=True)
    tok = _pretrain_tokenizer(folder, path, tokenizer)
    if hasattr(model, "encode_media"):
        _check_media_tokens(tok, str(folder))
    info = {"step": folder.name, "layout": manifest.get("layout", {})}
    return model, tok, "pretrain", folder, False, info


def _check_media_tokens(tok, where: str) -> None:
    for name in ("<I>", "</I>", "<A>", "</A>", "<V>", "</V>", "<T>", "</T>"):
        try:
            tok.special_id(name)
        except (KeyError, ValueError, AttributeError):
            raise LoadError(f"{where}: a multimodal model, but the tokenizer has no {name} token") from None


def _pretrain_tokenizer(folder: Path, path: Path, tokenizer: str | None):
    from aion_train.data.tokenizer import load_tokenizer as Tokenizer  # SentencePiece or tokenizer.json

    if tokenizer:
        return Tokenizer(tokenizer)
    for parent in (folder.parent.parent, folder.parent, path):
        cfg_file = parent / "config.yaml"
        if cfg_file.is_file():
            import yaml

            data = yaml.safe_load(cfg_file.read_text()) or {}
            d = data.get("data") or {}
            cands = [d.get("tokenizer")] if d.get("tokenizer") else []
            cands.append(str(Path(d.get("dir") or "data/demo") / "tokenizer.model"))
            for c in cands:
                for base in (Path("."), parent.parent, parent):
                    p = (base / c) if not Path(c).is_absolute() else Path(c)
                    if p.is_file() or (p / "tokenizer.json").is_file():
                        return Tokenizer(str(p))
            raise LoadError(f"{cfg_file} names the tokenizer {cands[0]!r}, which was not found; pass --tokenizer")
    raise LoadError(f"{folder}: no config.yaml in its run folder to find the tokenizer; pass --tokenizer")


# ----------------------------------------------------------------------------- SFT / PPO
def _read_done(run_dir: Path, phase: str) -> dict:
    p = run_dir / phase / "done.json"
    if not p.is_file():
        raise LoadError(f"{p} is missing: the {phase} phase of {run_dir} did not finish")
    return json.loads(p.read_text())


def _chat_tokenizer(run_dir: Path, tokenizer: str | None):
    from aion_train.posttrain.chat_template import ChatTokenizer

    p = Path(tokenizer) if tokenizer else run_dir / "task" / "tokenizer.model"
    named = _read_done(run_dir, "sft").get("tokenizer")  # sft.tokenizer, e.g. an imported tokenizer.json
    if not tokenizer and not p.is_file() and named:
        p = _resolve(named, run_dir)
    if not p.exists():
        raise LoadError(f"{p}: no task tokenizer (a run with sft.tokenizer set: pass --tokenizer)")
    return ChatTokenizer(str(p))


def _sft_state(run_dir: Path) -> tuple[dict, dict, dict, Path]:
    """(model_config dict, full state dict with adapters merged, lora info, weights folder)."""
    from aion_train.checkpoint import load_full_state_dict
    from aion_train.posttrain.common import load_tensors
    from aion_train.posttrain.lora import merge_into_state_dict

    done = _read_done(run_dir, "sft")
    info: dict = {}
    if done.get("adapters"):
        base = _resolve(done["base_checkpoint"], run_dir)
        cfg_dict, full = load_full_state_dict(base)
        apath = _resolve(done["adapters"], run_dir)
        adapters = load_tensors(apath)
        r, alpha = _adapter_meta(apath)
        full = merge_into_state_dict(full, adapters, alpha / r)
        info = {"lora_r": r, "lora_alpha": alpha, "adapters": str(apath)}
        return cfg_dict, full, info, base
    ckpt = _resolve(done.get("model_checkpoint") or done["base_checkpoint"], run_dir)
    cfg_dict, full = load_full_state_dict(ckpt)
    return cfg_dict, full, info, ckpt


def _adapter_meta(path: Path) -> tuple[int, float]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        return int(meta["r"]), float(meta["alpha"])
    except (KeyError, ValueError):
        raise LoadError(f"{path}: adapter file without r/alpha metadata") from None


def _load_sft(run_dir: Path, tokenizer: str | None):
    cfg_dict, full, info, weights = _sft_state(run_dir)
    model = _build_text_model(cfg_dict, full, str(weights))
    return model, _chat_tokenizer(run_dir, tokenizer), "sft", weights, True, info


def _load_ppo(run_dir: Path, tokenizer: str | None):
    from aion_train.checkpoint import CheckpointManager, model_config_from_dict
    from aion_train.posttrain.lora import merge_into_state_dict

    _read_done(run_dir, "ppo")
    cfg_dict, full, info, _ = _sft_state(run_dir)
    root = run_dir / "ppo" / "checkpoints"
    latest = CheckpointManager(root, keep_last=None).latest() if root.is_dir() else None
    if latest is None:
        raise LoadError(f"{root}: no PPO checkpoint holding the trained actor")
    manifest = CheckpointManager(root, keep_last=None).read_manifest(latest)
    layout = manifest.get("layout", {})
    mcfg = model_config_from_dict(manifest.get("model_config", cfg_dict))
    actor = _gather_actor(latest, mcfg, int(layout.get("tp", 1)), int(layout.get("ep", 1)))
    lora = {k: v for k, v in actor.items() if ".lora_" in k}
    weights = {k: v for k, v in actor.items() if ".lora_" not in k}
    if lora:
        # the actor continued training the SFT adapters: W = W0 + alpha/r B_ppo A_ppo
        if "lora_r" not in info:
            raise LoadError(f"{latest}: the PPO actor has LoRA adapters but the SFT run has none")
        full = merge_into_state_dict(_sft_base_only(run_dir), lora, info["lora_alpha"] / info["lora_r"])
        info = {**info, "ppo_lora_tensors": len(lora)}
    for k, v in weights.items():  # full-weight PPO: the actor's weights replace SFT's
        if k not in full:
            raise LoadError(f"{latest}: actor tensor {k!r} is not a weight of the model")
        full[k] = v
    model = _build_text_model(cfg_dict, full, str(latest))
    info = {**info, "ppo_checkpoint": str(latest)}
    return model, _chat_tokenizer(run_dir, tokenizer), "ppo", latest, True, info


def _sft_base_only(run_dir: Path) -> dict:
    from aion_train.checkpoint import load_full_state_dict

    done = _read_done(run_dir, "sft")
    _, full = load_full_state_dict(_resolve(done["base_checkpoint"], run_dir))
    return full


def _gather_actor(folder: Path, mcfg, tp: int, ep: int) -> dict:
    """The actor's trainable tensors of every (tp_rank, ep_rank) -> full tensors."""
    from aion_train.checkpoint import load_rank, saver_rank, shard_spec_for
    from aion_train.parallel.parallelize import full_slice

    shards = {(t, e): load_rank(folder, saver_rank(tp, t, e), "actor") for e in range(ep) for t in range(tp)}
    specs = {k: _with_lora_specs(shard_spec_for(mcfg, tp, ep, *k)) for k in shards}
    first = shards[(0, 0)]
    out: dict = {}
    for name, piece in first.items():
        spec0 = specs[(0, 0)].get(name)
        if spec0 is None:
            out[name] = piece
            continue
        shape = list(piece.shape)
        for dim, _, n in spec0:
            shape[dim] *= n
        full = torch.empty(shape, dtype=piece.dtype)
        for key, sd in shards.items():
            full_slice(full, specs[key][name]).copy_(sd[name])
        out[name] = full
    return out


def _with_lora_specs(spec: dict) -> dict:
    """LoRA on a column-parallel linear (weight cut on dim 0) has lora_B cut on dim 0; on a
    row-parallel one (weight cut on dim 1) lora_A is cut on dim 1; the other factor is whole."""
    out = dict(spec)
    for name, s in spec.items():
        if not name.endswith(".weight") or len(s) != 1:
            continue
        module = name[: -len(".weight")]
        dim, r, n = s[0]
        if dim == 0:
            out[f"{module}.lora_B"] = [(0, r, n)]
        elif dim == 1:
            out[f"{module}.lora_A"] = [(1, r, n)]
    return out


def _make_dropless(model) -> None:
    for moe in model.moe_layers():
        moe.dispatcher.capacity_factor = None
