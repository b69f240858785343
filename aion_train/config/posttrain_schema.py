"""Config of LoRA / QLoRA adapters (`lora`), supervised fine-tuning (`sft`) and the reward
model (`rm`). See aion_train/posttrain/ for what each key drives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# every linear of attention and of the dense FFNs (incl. an MoE layer's shared expert);
# the routed experts are fused [E, in, out] tensors and get no adapters
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w_gate", "w_up", "w_down"]
QUANTIZE = ("none", "nf4")
RM_INIT = ("sft", "base")
# the multimodal task's kinds of question (aion_train/posttrain/multimodal/task.py)
MM_KINDS = ("image", "spoken", "video")


@dataclass
class LoRAConfig:
    enabled: bool = False  # false: the phases train full weights
    r: int = 8  # rank
    alpha: float = 16.0  # W' = W0 + (alpha / r) B A
    dropout: float = 0.05  # on the adapter's input only
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))  # module-name suffixes
    quantize: str = "none"  # none | nf4 (QLoRA: frozen base weights in 4-bit NF4, torchao)
    nf4_block_size: int = 64  # values per NF4 absmax block
    # a multimodal model: false = the media encoders, resamplers and projections stay frozen
    # (their output is computed once per item and reused); true = they get adapters too
    encoders: bool = False


@dataclass
class SFTConfig:
    init_from: str = ""  # checkpoint / run folder of a pretrained base LM, or a Hugging Face model
    # folder (its architecture fills model.*, its tokenizer.json sft.tokenizer); "" = train one here
    tokenizer: str = ""  # SentencePiece model of that base LM; "" = train the task tokenizer
    base_steps: int = 300  # full-weight LM steps on the task text when init_from is ""
    base_lr: float = 3e-3
    # share of the base steps whose loss is on the responses only (the SFT mixture, full
    # weights), spread evenly; the others: every token of the task text. A skill that lives in a
    # few answer tokens (copying a name from a <CTX> block) gets a signal it lacks when every
    # context token counts as much (docs/notes.md, 2026-12-07 (b))
    base_response_fraction: float = 0.0
    steps: int = 150  # SFT optimizer steps (adapters, or full weights without lora)
    lr: float = 2e-3
    batch_size: int = 32
    max_examples: int = 2000  # easy-vqa training examples used by SFT (0 = all); keeps SFT imperfect
    chat_examples: int = 400  # chatterbot dialogs mixed in (0 = none)
    data_files: list = field(default_factory=list)  # extra chat JSONL mixed into the built-in task
    # your own chat JSONL ({"messages": [...]}, loss on every assistant turn): non-empty = SFT on
    # these files instead of the built-in task (so do rm.train_files / ppo.prompt_files)
    train_files: list = field(default_factory=list)
    eval_files: list = field(default_factory=list)  # held-out chat JSONL (eval loss); "" = none
    eval_examples: int = 300  # held-out easy-vqa test prompts scored by generation
    max_new_tokens: int = 4
    # a multimodal model (model.multimodal.enabled): the media task of posttrain/multimodal/task.py
    mm_kinds: list = field(default_factory=lambda: ["image", "spoken", "video"])
    mm_train_per_kind: int = 600  # training prompts per kind (easy-vqa train images)
    mm_eval_per_kind: int = 100  # held-out prompts per kind (easy-vqa test images)
    # PPO's prompts come from a share of the easy-vqa train images that SFT and the reward model
    # never see: where the SFT policy has memorised nothing, its samples carry a learning signal
    mm_ppo_fraction: float = 0.25
    mm_ppo_per_kind: int = 500


@dataclass
class RewardConfig:
    init: str = "sft"  # sft: backbone from the SFT model (adapters merged) | base
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 32  # preference pairs per step
    train_pairs: int = 4000  # pairs from the easy-vqa train split (0 = one per example)
    eval_pairs: int = 400  # held-out pairs from the easy-vqa test split
    use_lora: bool = False  # true: adapters (cfg.lora) + head; false: full backbone + head
    malformed_fraction: float = 0.4  # training pairs whose rejected side is a malformed response
    # (empty, two answers, cut off, random pieces): no reward hacking (built-in task only)
    train_files: list = field(default_factory=list)  # preference JSONL (prompt, chosen, rejected)
    eval_files: list = field(default_factory=list)  # held-out pairs; empty = accuracy on the train pairs


def check(cfg, errors: list[str]) -> None:
    """Cross-field rules of this section; append one message per problem, naming its key."""
    lo, s, rm = cfg.lora, cfg.sft, cfg.rm
    if not 0.0 <= rm.malformed_fraction <= 1.0:
        errors.append(f"rm.malformed_fraction={rm.malformed_fraction}: must be in [0, 1]")
    if lo.r < 1:
        errors.append(f"lora.r={lo.r}: must be >= 1")
    if lo.alpha <= 0:
        errors.append(f"lora.alpha={lo.alpha}: must be > 0")
    if not 0 <= lo.dropout < 1:
        errors.append(f"lora.dropout={lo.dropout}: must be in [0, 1)")
    if not isinstance(lo.targets, list) or not lo.targets or not all(isinstance(t, str) and t for t in lo.targets):
        errors.append(f"lora.targets={lo.targets!r}: must be a non-empty list of module-name suffixes")
    if lo.quantize not in QUANTIZE:
        errors.append(f"lora.quantize={lo.quantize!r}: must be one of {', '.join(QUANTIZE)}")
    if lo.nf4_block_size < 2 or lo.nf4_block_size % 2:
        errors.append(f"lora.nf4_block_size={lo.nf4_block_size}: must be an even number >= 2")
    if lo.quantize != "none" and not lo.enabled:
        errors.append(
            f"lora.quantize={lo.quantize!r} needs lora.enabled=true (QLoRA trains adapters "
            "on top of the frozen quantised base)"
        )
    for key, val in (
        ("sft.steps", s.steps),
        ("sft.batch_size", s.batch_size),
        ("sft.max_new_tokens", s.max_new_tokens),
        ("sft.eval_examples", s.eval_examples),
        ("rm.steps", rm.steps),
        ("rm.batch_size", rm.batch_size),
        ("rm.eval_pairs", rm.eval_pairs),
    ):
        if val < 1:
            errors.append(f"{key}={val}: must be >= 1")
    for key, val in (
        ("sft.base_steps", s.base_steps),
        ("sft.max_examples", s.max_examples),
        ("sft.chat_examples", s.chat_examples),
        ("rm.train_pairs", rm.train_pairs),
    ):
        if val < 0:
            errors.append(f"{key}={val}: must be >= 0")
    for key, val in (("sft.lr", s.lr), ("sft.base_lr", s.base_lr), ("rm.lr", rm.lr)):
        if val <= 0:
            errors.append(f"{key}={val}: must be > 0")
    if not 0 <= s.base_response_fraction <= 1:
        errors.append(f"sft.base_response_fraction={s.base_response_fraction}: must be in [0, 1]")
    multimodal = cfg.model.multimodal.enabled
    if multimodal:
        bad = [k for k in s.mm_kinds if k not in MM_KINDS]
        if bad or not s.mm_kinds:
            errors.append(f"sft.mm_kinds={s.mm_kinds!r}: a non-empty list of {', '.join(MM_KINDS)}")
        if not 0 < s.mm_ppo_fraction < 1:
            errors.append(f"sft.mm_ppo_fraction={s.mm_ppo_fraction}: must be in (0, 1)")
        for key in ("mm_train_per_kind", "mm_eval_per_kind", "mm_ppo_per_kind"):
            if getattr(s, key) < 1:
                errors.append(f"sft.{key}={getattr(s, key)}: must be >= 1")
        if s.train_files or rm.train_files or cfg.ppo.prompt_files:
            errors.append("a multimodal model post-trains on the media task; sft/rm/ppo files are for text models")
    if not s.init_from and s.base_steps < 1 and not multimodal:
        errors.append("sft.base_steps=0 with sft.init_from empty: there is no base LM to fine-tune")
    if s.init_from and not Path(s.init_from).exists():
        errors.append(f"sft.init_from={s.init_from!r}: no such folder (a checkpoint, run or Hugging Face model folder)")
    elif s.init_from and not multimodal and not s.tokenizer and not (Path(s.init_from) / "tokenizer.json").is_file():
        errors.append(
            f"sft.init_from={s.init_from!r} needs sft.tokenizer (the base LM's SentencePiece model or "
            "tokenizer.json; a Hugging Face folder's own tokenizer.json is used when it has one)"
        )
    for key, val in (
        ("sft.data_files", s.data_files),
        ("sft.train_files", s.train_files),
        ("sft.eval_files", s.eval_files),
        ("rm.train_files", rm.train_files),
        ("rm.eval_files", rm.eval_files),
    ):
        check_file_list(key, val, errors)
    if not s.train_files and (s.eval_files or rm.train_files or cfg.ppo.prompt_files):
        errors.append(
            "sft.train_files is empty: post-training on your files (sft.eval_files, rm.train_files or "
            "ppo.prompt_files set) starts with SFT on your chat JSONL; name it in sft.train_files"
        )
    if rm.eval_files and not rm.train_files:
        errors.append("rm.eval_files needs rm.train_files (held-out pairs of your own preference data)")
    if rm.init not in RM_INIT:
        errors.append(f"rm.init={rm.init!r}: must be one of {', '.join(RM_INIT)}")


def check_file_list(key: str, val, errors: list[str]) -> None:
    """A list of .jsonl/.json paths or globs (their contents are checked when a phase starts:
    aion_train.posttrain.user_data)."""
    if not isinstance(val, list) or not all(isinstance(f, str) and f for f in val):
        errors.append(f"{key}={val!r}: must be a list of .jsonl/.json paths or globs")
        return
    for f in val:
        if not f.endswith((".jsonl", ".json", "*")):
            errors.append(f"{key}: {f!r}: must name .jsonl or .json files")
