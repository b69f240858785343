"""What every post-training phase shares: distributed set-up, the parallel model, a DeepSpeed
engine over the trainable parameters, the training loop, KV-cached generation and held-out
accuracy, weights / adapters on disk, `done.json` and MLflow. Phase-agnostic on purpose
(SFT, the reward model and PPO all build on it)."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from aion_train.fsutil import AtomicOutput, atomic_write_text
from aion_train.model import build_model
from aion_train.model.generate import generate
from aion_train.parallel import build_groups, get_device, parallelize
from aion_train.parallel.collectives import all_reduce_, gather_last
from aion_train.parallel.device import module_device, to_device
from aion_train.train.optim import lr_at

progress = logging.getLogger("aion_train.train")

_GROUPS: dict = {}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def phase_device() -> torch.device:
    """Where this rank's post-training models and batches live: the GPU of LOCAL_RANK (made the
    current device, `parallel.device.get_device`) when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return get_device().torch_device
    return torch.device("cpu")


def refuse_multimodal(cfg, phase: str) -> None:
    """The text task's phases on a multimodal config: a clear error, not a weight mismatch."""
    if cfg.model.multimodal.enabled:
        raise ValueError(
            f"model.multimodal.enabled: the text {phase} phase does not take a multimodal model; "
            f"run aion_train.posttrain.phases.run_{phase} (what `aion-train {phase}` and the pipeline call)"
        )


def setup_distributed(cfg):
    """Initialise torch.distributed through DeepSpeed's comm (a one-rank group without a
    launcher: DeepSpeed's engine needs one), validate the config for this world size and
    return the TP/DP/EP groups (cached: created once)."""
    from aion_train.config import validate_config
    from aion_train.parallel.deepspeed_adapter import init_comm
    from aion_train.parallel.device import resolve_backend
    from aion_train.runtime import apply_runtime

    apply_runtime(cfg.runtime)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized():
        phase_device()  # NCCL binds to the current GPU: make it LOCAL_RANK's first
        init_comm(resolve_backend(cfg.parallel.backend), cfg.parallel.timeout_s, shm_op=cfg.runtime.deepspeed_shm_op)
    cfg.parallel.world_size = world
    from aion_train.interop.hf_init import apply_hf_init

    validate_config(apply_hf_init(cfg, "posttrain"))  # sft.init_from: an HF folder's architecture
    key = (cfg.parallel.tp, cfg.parallel.ep, dist.is_initialized() and id(dist.group.WORLD))
    if key not in _GROUPS:
        _GROUPS[key] = build_groups(cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.timeout_s)
    return _GROUPS[key]


def build_parallel_model(cfg, groups):
    """The model of `cfg.model` built with the run's seed (same weights on every rank), sharded,
    on `phase_device()` (weights drawn on the CPU, so the same on every device)."""
    from aion_train.runtime import apply_model_execution

    model = parallelize(build_model(cfg.model, seed=cfg.seed), groups, cfg.parallel.sequence_parallel)
    device = phase_device()
    return apply_model_execution(model.to(device), device, cfg.runtime)


def phase_config(cfg, *, lr: float, steps: int, batch_size: int):
    """A copy of cfg whose train/data sections describe one phase (what build_engine reads)."""
    c = copy.deepcopy(cfg)
    c.train.lr, c.train.steps, c.train.grad_accum = lr, steps, 1
    c.train.warmup_steps = min(c.train.warmup_steps, max(1, steps // 10))
    c.data.micro_batch_size = batch_size
    return c


def build_phase_engine(model, cfg, groups):
    """DeepSpeed engine (aion_train.train.engine.build_engine) over the trainable parameters
    only: frozen ones get no optimizer state (`param_groups` skips requires_grad=False)."""
    from aion_train.train.engine import build_engine

    engine, optimizer = build_engine(model, cfg, groups)
    return engine, optimizer


def train_steps(engine, optimizer, tcfg, steps: int, next_batch, loss_fn, log=None, log_every: int = 10) -> list:
    """`steps` optimizer steps: lr from the warmup+cosine schedule of `tcfg`, batch = next_batch(step),
    (loss, metrics) = loss_fn(engine, batch). Returns the losses; log(metrics, step) every log_every."""
    losses = []
    engine.train()
    t0 = time.perf_counter()
    for step in range(steps):
        lr = lr_at(step, tcfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss, metrics = loss_fn(engine, next_batch(step))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach().float()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            if log is not None:
                log({**metrics, "lr": lr}, step + 1)
            per_step = (time.perf_counter() - t0) / (step + 1)
            progress.info("step %d/%d loss %.4f lr %.3g %.2f s/step", step + 1, steps, losses[-1], lr, per_step)
    return losses


def mean_over_ranks(x: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    all_reduce_(t)
    return float(t.item()) / dist.get_world_size()


# -- batches -------------------------------------------------------------------------------------
def to_model(batch, model):
    """A batch (tensor, or tuple / dict of them; built on the CPU) on the device `model` (a
    module or a DeepSpeed engine) computes on."""
    return to_device(batch, module_device(model))


def pad_right(seqs, pad_id: int, value_dtype=torch.long):
    """(ids [B, T], mask [B, T]) of variable-length sequences, right-padded."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=value_dtype)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=value_dtype)
        mask[i, : len(s)] = 1
    return ids, mask


def full_logits(logits: torch.Tensor, groups) -> torch.Tensor:
    """Vocab-parallel logits -> full-vocabulary logits (identity without TP)."""
    tp = None if groups is None or groups.tp == 1 else groups.tp_group
    return logits if tp is None else gather_last(logits, tp)


def sequence_logprobs(model, input_ids: torch.Tensor, groups=None) -> torch.Tensor:
    """[B, T-1]: log p(input_ids[:, t+1] | input_ids[:, :t+1]) over the full vocabulary."""
    input_ids = input_ids.to(module_device(model))
    logits = full_logits(model(input_ids).logits, groups).float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


# -- generation and held-out accuracy ------------------------------------------------------------
@torch.no_grad()
def generate_answers(
    model,
    prompts,
    max_new_tokens: int,
    eos_id: int,
    groups=None,
    temperature: float = 0.0,
    generator=None,
    batch_size: int = 64,
) -> list:
    """KV-cached generation for prompts of any lengths (batched by equal length: the model
    has no padding mask). Returns the new ids of each prompt, cut before eos_id."""
    tp = None if groups is None or groups.tp == 1 else groups.tp_group
    gather = (lambda lg: gather_last(lg, tp)) if tp is not None else None
    was_training = model.training
    model.eval()
    by_len: dict = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list = [None] * len(prompts)
    device = module_device(model)
    for length in sorted(by_len):
        idx = by_len[length]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            ids = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
            toks = generate(
                model,
                ids,
                max_new_tokens,
                temperature=temperature,
                eos_id=eos_id,
                generator=generator,
                gather_logits=gather,
            )[:, length:].tolist()
            for i, row in zip(chunk, toks):
                out[i] = row[: row.index(eos_id)] if eos_id in row else row
    model.train(was_training)
    return out


def evaluate_accuracy(model, task_data, examples, max_new_tokens: int, groups=None) -> dict:
    """Greedy answers to `examples` checked by task.is_correct: {"accuracy", "n", "by_kind"}.
    Examples are split over the data-parallel ranks; the counts are summed over them."""
    from .task import is_correct

    dp, dp_rank = (1, 0) if groups is None else (groups.dp, groups.dp_rank)
    mine = examples[dp_rank::dp]
    tok = task_data.tokenizer
    gen = generate_answers(model, [e.prompt_ids for e in mine], max_new_tokens, tok.end_id, groups)
    return accuracy_by_kind(examples, mine, [is_correct(e, tok.decode(ids)) for e, ids in zip(mine, gen)], groups)


def accuracy_by_kind(examples, mine, verdicts, groups=None) -> dict:
    """{"accuracy", "n", "by_kind"} of this rank's verdicts on `mine` (its share of `examples`),
    the counts summed over the data-parallel ranks."""
    kinds = sorted({e.kind for e in examples})
    counts = torch.zeros(len(kinds), 2, dtype=torch.float64)
    for e, ok in zip(mine, verdicts):
        k = kinds.index(e.kind)
        counts[k, 0] += float(ok)
        counts[k, 1] += 1
    if groups is not None and groups.dp > 1:
        all_reduce_(counts, group=groups.dp_group)
    total = counts.sum(0)
    return {
        "accuracy": float(total[0] / max(total[1], 1)),
        "n": int(total[1]),
        "by_kind": {k: float(counts[i, 0] / max(counts[i, 1], 1)) for i, k in enumerate(kinds)},
    }


# -- files -----------------------------------------------------------------------------------------
def tokenizer_sha256(path) -> str:
    """sha256 of a tokenizer file (a phase's done.json records the one its weights were trained with)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_tokenizer(done: dict, path, what: str) -> None:
    """Refuse weights trained with another tokenizer than the one at `path` (a demo data folder
    rebuilt since, another data.tokenizer): their token ids would mean other pieces, and the
    model would answer garbage instead of failing. Weights recorded before tokenizers were
    recorded pass."""
    want = done.get("tokenizer_sha256")
    if want and want != tokenizer_sha256(path):
        raise ValueError(
            f"{what} was trained with a tokenizer of sha256 {want[:12]}..., but {path} is now another one "
            f"({tokenizer_sha256(path)[:12]}...): the data folder was rebuilt or data.tokenizer changed (the demo "
            "sets are rebuilt for another seed). Point data.dir / data.tokenizer at the data it was trained on, "
            "or rerun that phase"
        )


def phase_dir(cfg, phase: str) -> Path:
    return Path(cfg.run_dir) / phase


def read_done(cfg, phase: str) -> dict | None:
    p = phase_dir(cfg, phase) / "done.json"
    return json.loads(p.read_text()) if p.is_file() else None


def write_done(cfg, phase: str, metrics: dict) -> None:
    """{run_dir}/{phase}/done.json, atomically, by rank 0: the phase's very last act."""
    if rank() == 0:
        d = phase_dir(cfg, phase)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "done.json", json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    barrier()


def phase_tracker(cfg, phase: str, groups=None):
    """An MLflow Tracker for one phase: runs of every phase go to one store ({run_dir}/mlflow.db
    unless tracking.uri says otherwise), each named after its phase."""
    from aion_train.tracking import Tracker, resolve_tracking_uri

    t = copy.deepcopy(cfg.tracking)
    t.uri = resolve_tracking_uri(cfg.tracking.uri, cfg.run_dir)
    t.run_name = f"{cfg.tracking.run_name or Path(cfg.run_dir).name}-{phase}"
    d = phase_dir(cfg, phase)
    d.mkdir(parents=True, exist_ok=True)
    return Tracker(t, d, active=rank() == 0)


def save_weights(model, cfg, groups, folder) -> Path:
    """The model's base weights (adapters left out) as a weights-only checkpoint under
    folder/checkpoints, readable into any TP/EP layout by `load_weights`."""
    from aion_train.checkpoint import CheckpointManager, save_checkpoint, save_rank
    from aion_train.config import config_to_dict

    from .lora import _unwrap

    def write(tmp):
        if groups.edp_rank == 0:
            sd = {k: v for k, v in _unwrap(model).state_dict().items() if ".lora_" not in k}
            save_rank(tmp, groups.rank, "model", sd)

    mgr = CheckpointManager(Path(folder) / "checkpoints", keep_last=1)
    return save_checkpoint(
        mgr,
        0,
        write,
        lambda: {
            "model_config": config_to_dict(cfg)["model"],
            "optimizer_state": False,
            "layout": {"tp": groups.tp, "ep": groups.ep, "world": groups.world, "zero_stage": 0},
        },
        leader=rank() == 0,
        barrier=barrier,
    )


@torch.no_grad()
def load_weights(
    model, folder, groups, seed: int = 0, merge_adapters: dict | None = None, scaling: float = 1.0
) -> None:
    """Base weights from a checkpoint of any layout (or a Hugging Face model folder) into this rank's shards; with
    `merge_adapters` (full LoRA tensors) the weights are W0 + scaling * B A. A checkpoint with
    a smaller vocabulary (a pretrained LM before the role tokens were added) gets new rows
    drawn N(0, init_std) for the added ids."""
    from aion_train.checkpoint import shard_state_dict
    from aion_train.interop.hf_init import load_init_weights

    from .lora import _unwrap, merge_into_state_dict

    model = _unwrap(model)
    _, full = load_init_weights(folder, model.cfg)  # a checkpoint of ours or a Hugging Face folder
    if merge_adapters:
        full = merge_into_state_dict(full, merge_adapters, scaling)
    vocab, std = model.cfg.vocab_size, model.cfg.init_std
    gen = torch.Generator().manual_seed(seed)
    for name in ("embed.weight", "lm_head.weight"):
        w = full.get(name)
        if w is not None and w.shape[0] < vocab:
            extra = torch.randn(vocab - w.shape[0], w.shape[1], generator=gen, dtype=torch.float32) * std
            full[name] = torch.cat([w, extra.to(w.dtype)])
        elif w is not None and w.shape[0] > vocab:
            raise ValueError(f"{folder}: {name} has {w.shape[0]} rows but model.vocab_size={vocab}")
    own = {k for k in model.state_dict() if ".lora_" not in k}
    sd = {k: v for k, v in shard_state_dict(full, model, groups).items() if k in own}
    missing, unexpected = own - set(sd), set(sd) - own
    if missing or unexpected:
        raise ValueError(
            f"{folder}: weights do not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(sd, strict=False)


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """safetensors file written atomically (temp file, fsync, rename, fsync the folder)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicOutput(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata={k: str(v) for k, v in (metadata or {}).items()},
        )
    return path


def load_tensors(path) -> dict:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such tensor file")
    return load_file(str(path))
