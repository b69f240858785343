"""`import-hf` / `export-hf` for every family we map: Mixtral (:mod:`.hf_mixtral`), Llama,
Mistral, Qwen2 and Qwen2-MoE (:mod:`.hf_families`), with their tokenizers.

Import writes the checkpoint (any TP/EP layout) and keeps the source's config.json, tokenizer
and generation files in ``RUN/hf_source/``; ``RUN/hf_source/tokenizer.json`` (or its
``tokenizer.model``) is then the run's tokenizer (``data.tokenizer``, ``--tokenizer``).
Export writes the family the run came from (``hf_source/config.json``), or ``--family``, or
the one the model's shape implies (dense: llama; MoE: mixtral), plus tokenizer files (the source's, or the run's SentencePiece
model as a Llama tokenizer) and a ``generation_config.json``."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from aion_train.checkpoint import find_checkpoint, load_full_state_dict, model_config_from_dict
from aion_train.config import ModelConfig
from aion_train.ownership import check_writable, looks_like_run_dir, publish_dir

from . import hf_families, hf_mixtral
from .hf_mixtral import _DTYPE_NAMES, NotExpressibleError

SOURCE_DIR = "hf_source"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
KEEP = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def _family(hc: dict) -> str:
    fam = hc.get("model_type")
    if fam not in hf_families.FAMILIES:
        raise NotExpressibleError(
            f"cannot import this Hugging Face checkpoint: model_type={fam!r} "
            f"(import-hf reads {', '.join(hf_families.FAMILIES)})"
        )
    return fam


def import_any(hf_dir, run_dir, tp: int = 1, ep: int = 1, **kw) -> dict:
    """Import a local HF folder of any family we map into `run_dir` (see hf_mixtral.import_hf
    for the keyword arguments); the source's tokenizer/config files go to RUN/hf_source."""
    check_writable(run_dir, "import-hf", kw.get("overwrite", False), recognise=looks_like_run_dir)  # before reading
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (a Hugging Face model folder)")
    hc = json.loads((hf_dir / "config.json").read_text())
    family = _family(hc)
    if family == "mixtral":
        summary = hf_mixtral.import_hf(hf_dir, run_dir, tp, ep, **kw)
    else:
        overwrite = kw.get("overwrite", False)
        cfg, notes = hf_families.config_from_hf(hc, kw.get("base"))
        if kw.get("max_seq_len") is not None:
            cfg = replace(cfg, max_seq_len=kw["max_seq_len"])
        sd = hf_families.state_from_hf(family, cfg, hf_mixtral.load_hf_tensors(hf_dir))
        summary = hf_mixtral.save_imported(
            hf_dir, run_dir, cfg, sd, notes, f"hf-{family}", tp, ep,
            world=kw.get("world"), zero_stage=kw.get("zero_stage", 1), dtype=kw.get("dtype"), overwrite=overwrite,
        )  # fmt: skip
    src = Path(run_dir) / SOURCE_DIR
    src.mkdir(exist_ok=True)
    for name in KEEP:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, src / name)
    tok = src / "tokenizer.json" if (src / "tokenizer.json").is_file() else src / "tokenizer.model"
    summary.update(family=family, tokenizer=str(tok) if tok.is_file() else None)
    if summary["tokenizer"] is None:
        summary["notes"] = [
            *summary["notes"],
            f"{hf_dir} has no tokenizer.json/tokenizer.model: pass a tokenizer when training",
        ]
    return summary


def _source_of(checkpoint) -> tuple[Path | None, Path]:
    """(RUN/hf_source or None, the run folder) of a checkpoint."""
    folder = find_checkpoint(checkpoint)
    for run in (folder.parent.parent, folder.parent, Path(checkpoint)):
        if (run / SOURCE_DIR / "config.json").is_file():
            return run / SOURCE_DIR, run
    return None, folder.parent.parent


def default_family(cfg: ModelConfig) -> str:
    """A run of ours (not imported): dense -> llama, MoE -> mixtral (qwen2_moe: --family)."""
    m = cfg.moe
    return "llama" if m.every == 0 or m.n_experts <= 1 else "mixtral"


def _run_sentencepiece(run: Path) -> Path | None:
    """The SentencePiece model a run of ours trained with (its config.yaml), if any."""
    from aion_train.config import load_config
    from aion_train.data.tokenizer import is_hf_tokenizer, run_tokenizer_path

    if not (run / "config.yaml").is_file():
        return None
    try:
        path = Path(run_tokenizer_path(load_config(str(run / "config.yaml"))))
    except Exception:
        return None
    return path if path.is_file() and not is_hf_tokenizer(str(path)) else None


def _write_extras(folder: Path, source: Path | None, run: Path, source_hc: dict) -> list[str]:
    """Tokenizer files and generation_config.json into `folder`; returns their names."""
    from aion_train.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

    names = []
    if source is not None:
        for name in TOKENIZER_FILES + ("generation_config.json",):
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
                names.append(name)
    elif (sp := _run_sentencepiece(run)) is not None:
        shutil.copyfile(sp, folder / "tokenizer.model")
        cfg = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
            "model_max_length": 1 << 30,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        names += ["tokenizer.model", "tokenizer_config.json"]
    if "generation_config.json" not in names:
        ids = {
            k: source_hc[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if source_hc.get(k) is not None
        }
        if source is None:
            ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
        (folder / "generation_config.json").write_text(json.dumps({**ids, "do_sample": False}, indent=2) + "\n")
        names.append("generation_config.json")
    return names


def export_any(checkpoint, out_dir, *, family: str | None = None, dtype: torch.dtype | None = None, **kw) -> dict:
    """Export `checkpoint` as `family` (default: the family it was imported from, else the one
    its shape implies) with tokenizer files and a generation config."""
    check_writable(out_dir, "export-hf", kw.get("overwrite", False))  # before anything is read
    source, run = _source_of(checkpoint)
    source_hc = json.loads((source / "config.json").read_text()) if source is not None else {}
    if family is None:
        family = source_hc.get("model_type")
        if family is None:
            cfg_dict, _ = load_full_state_dict(checkpoint)
            family = default_family(model_config_from_dict(cfg_dict))
    if family not in hf_families.FAMILIES:
        raise NotExpressibleError(f"--family {family!r}: must be one of {', '.join(hf_families.FAMILIES)}")

    def extras(folder: Path) -> list[str]:
        return _write_extras(folder, source, run, source_hc)

    if family == "mixtral":
        return {**hf_mixtral.export_hf(checkpoint, out_dir, dtype=dtype, extra_files=extras, **kw), "family": family}
    overwrite = kw.get("overwrite", False)
    check_writable(out_dir, "export-hf", overwrite)
    cfg_dict, sd = load_full_state_dict(checkpoint)
    cfg = model_config_from_dict(cfg_dict)
    hc = hf_families.config_to_hf(cfg, family, source_hc)
    dtype = dtype or sd["embed.weight"].dtype
    hf = hf_families.state_to_hf(family, cfg, sd, dtype)
    hc["dtype"] = _DTYPE_NAMES.get(dtype, "float32")
    final = Path(out_dir).absolute()
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        files = hf_mixtral.save_safetensors_sharded(hf, tmp, hf_mixtral.parse_size(kw.get("max_shard_size", "5GB")))
        files += extras(tmp)
        (tmp / "config.json").write_text(json.dumps(hc, indent=2, sort_keys=True) + "\n")
        publish_dir(tmp, final, "export-hf", overwrite=overwrite, last=("config.json",))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(out_dir),
        "family": family,
        "files": files + ["config.json"],
        "dtype": hc["dtype"],
        "parameters": sum(t.numel() for t in hf.values()),
        "notes": [],
    }
