"""The pretraining loop: DeepSpeed engine over our TP/EP model, packed WebDataset text,
held-out perplexity, MLflow, crash-safe exact-resume checkpoints, non-finite step guard."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from aion_train.checkpoint import CheckpointError, CheckpointManager
from aion_train.checkpoint.training_job import load_job, load_weights_only, save_job
from aion_train.config import Config, config_to_dict, dump_yaml, validate_config
from aion_train.parallel import build_groups, get_device
from aion_train.parallel.collectives import all_reduce_
from aion_train.parallel.deepspeed_adapter import init_comm
from aion_train.parallel.device import module_device, resolve_backend
from aion_train.parallel.grad_sync import global_grad_norm
from aion_train.parallel.plan import ParallelPlan
from aion_train.runtime import apply_model_execution, apply_runtime, show_progress_bar

from .engine import build_engine
from .metrics import expert_load, flops_per_token, peak_flops
from .optim import lr_at
from .tasks import make_task

log = logging.getLogger("aion_train.train")


class TrainingError(RuntimeError):
    """The run cannot go on; the message (one line) says why and what was kept.
    `aion-train pretrain` reports it as an error line and exits non-zero."""


class NonFiniteLossError(TrainingError):
    """train.max_bad_steps non-finite losses / gradients in a row."""


class ResumeError(TrainingError, CheckpointError):
    """The run folder's checkpoint cannot be resumed (another model config or layout,
    missing or corrupt files). Nothing was loaded and the checkpoint was not modified."""


def _one_line(text) -> str:
    """A multi-line message ('header:' + one line per item) as one line."""
    lines = [part.strip() for part in str(text).splitlines() if part.strip()]
    if len(lines) > 1:
        return lines[0].rstrip(":") + ": " + "; ".join(lines[1:])
    return lines[0] if lines else ""


def _all_reduce(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place over `group`, on the group's communication device (CPU tensors work under NCCL)."""
    return all_reduce_(t, op=op, group=group)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        apply_runtime(cfg.runtime)
        # the GPU of LOCAL_RANK is made current before NCCL starts (its communicator binds to it)
        self.device = get_device()
        init_comm(resolve_backend(cfg.parallel.backend), cfg.parallel.timeout_s, shm_op=cfg.runtime.deepspeed_shm_op)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        cfg.parallel.world_size = self.world
        from aion_train.interop.hf_init import apply_hf_init, load_start_weights

        validate_config(apply_hf_init(cfg, "pretrain"))  # train.init_from: an HF folder's architecture
        if cfg.train.precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("train.precision=fp16 needs a GPU (dynamic loss scaling); use bf16 or fp32 on CPU")
        self.groups = build_groups(cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.timeout_s)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.task = make_task(cfg, self.rank, self.groups)
        model = apply_model_execution(
            self.task.build_model().to(self.device.torch_device),
            self.device.torch_device,
            cfg.runtime,
            cfg.train.compile,
        )
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.train.keep_last)
        try:
            self.initialised_from = load_weights_only(self.ckpt, cfg, model, self.groups)
            if self.initialised_from is None and cfg.train.init_from and self.ckpt.latest() is None:
                self.initialised_from = load_start_weights(cfg.train.init_from, cfg, model, self.groups)
        except CheckpointError as e:
            raise ResumeError(f"cannot start from {cfg.train.init_from or self.ckpt.latest()}: {_one_line(e)}") from e
        self.plan = ParallelPlan.for_model(
            model, cfg.model, cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.sequence_parallel
        )
        self.engine, self.optimizer = build_engine(model, cfg, self.groups)
        self.model = self.engine.module
        self.batch_device = module_device(self.engine)  # where DeepSpeed put the model
        self.loader = self.task.train_loader()
        self.state = {
            "step": 0,
            "skipped_steps": 0,
            "history": {"loss": [], "val": []},
            "mlflow_run_id": None,
            "tokens_seen": 0,
        }
        from aion_train.tracking import Tracker

        self.tracker = Tracker(cfg.tracking, str(self.run_dir), active=self.rank == 0)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.peak = peak_flops(self.device.type, dtype) * self.world

    # -- checkpoints ---------------------------------------------------------------------
    def resume(self) -> bool:
        if self.initialised_from is not None:  # imported weights: fresh optimizer, step 0
            log.info("starting from the weights of %s with a fresh optimizer", self.initialised_from)
            return False
        try:
            saved = load_job(self.ckpt, self.cfg, self.groups, self.engine, self.loader)
        except CheckpointError as e:
            raise ResumeError(
                f"cannot resume from {self.ckpt.latest()}: {_one_line(e)}. The checkpoint was not modified; "
                f"run with its config, or choose another run_dir for a new run"
            ) from e
        if saved is None:
            return False
        saved.pop("checkpoint", None)
        self.state.update(saved)
        self.state["history"].setdefault("val", [])
        return True

    def save(self) -> None:
        save_job(self.ckpt, self.state["step"], self.cfg, self.groups, self.engine, self.loader, self.state)

    # -- one optimizer step ---------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _bad_step(self, what: str) -> None:
        """Count one skipped micro-batch / optimizer step; stop after train.max_bad_steps in a row."""
        cfg = self.cfg
        self.state["skipped_steps"] += 1
        self.state["consecutive_bad"] = self.state.get("consecutive_bad", 0) + 1
        n, step = self.state["consecutive_bad"], self.state["step"] + 1
        log.warning("step %d: %s skipped (%d in a row, %d skipped in all)", step, what, n, self.state["skipped_steps"])
        if n >= cfg.train.max_bad_steps:
            self.tracker.log_metrics({"train/skipped_steps": float(self.state["skipped_steps"])}, step=step)
            raise NonFiniteLossError(
                f"stopping at step {step}: {n} non-finite losses/gradients in a row "
                f"(train.max_bad_steps={cfg.train.max_bad_steps}); last checkpoint: {self.ckpt.latest()}"
            )

    def train_step(self, it) -> dict:
        """Micro-batches until DeepSpeed has taken one optimizer step. A micro-batch whose loss
        is non-finite on any rank is skipped on every rank (no backward, no update); an optimizer
        step that DeepSpeed skips for non-finite gradients counts as skipped too. Either stops
        the run after train.max_bad_steps in a row."""
        start = self.engine.global_steps
        sums, n, bad, tokens = {}, 0, 0, 0
        while self.engine.global_steps == start:
            batch = next(it)
            out = self.task.forward(self.engine, batch, self.batch_device)
            finite = torch.isfinite(out.loss.detach()).all().reshape(1).to(torch.float32)
            if _all_reduce(finite, op=dist.ReduceOp.MIN).item() < 1:
                bad += 1
                self._bad_step("non-finite loss: micro-batch")
                continue
            self.engine.backward(out.loss)
            skipped_before = self.engine.skipped_steps
            self.engine.step()
            for k, v in self.task.metrics(out).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            tokens += self.task.tokens(batch)
            if self.engine.global_steps != start:  # an optimizer step boundary
                if self.engine.skipped_steps != skipped_before:  # overflow: DeepSpeed did not update
                    bad += 1
                    self._bad_step("non-finite gradients: optimizer step")
                else:
                    self.state["consecutive_bad"] = 0
        result = {k: v / max(n, 1) for k, v in sums.items()}
        result.update(skipped=bad, tokens=tokens)
        return result

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # ZeRO-0 keeps full grads on the params until zero_grad
            norm = global_grad_norm(self.model, self.groups, self.plan)
        return float(norm)

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict:
        try:
            return self._fit()
        except TrainingError as e:
            if self.rank == 0:
                log.error("%s", e)
            raise

    def _fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        resumed = self.resume()
        params = config_to_dict(cfg)
        run_id = self.tracker.start(params, run_id=self.state.get("mlflow_run_id"))
        self.state["mlflow_run_id"] = run_id
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        if not resumed:
            self._evaluate(0)
        it = iter(self.loader)
        bar = None
        if self.rank == 0 and show_progress_bar(self.cfg.runtime):
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.state["step"], desc="pretrain", unit="step", dynamic_ncols=True)
        try:
            end = t.steps if t.stop_at_step is None else min(t.steps, t.stop_at_step)
            first_step = True  # this process's: compiled blocks compile on it
            while self.state["step"] < end:
                step = self.state["step"]
                lr = lr_at(step, t)
                self._set_lr(lr)
                t0 = time.perf_counter()
                result = self.train_step(it)
                self.device.synchronize()
                dt = time.perf_counter() - t0
                self.state["step"] = step = step + 1
                tokens = int(
                    _all_reduce(
                        torch.tensor([result.pop("tokens")], dtype=torch.float64),
                        self.groups.dp_group if self.groups.dp > 1 else None,
                    ).item()
                )
                self.state["tokens_seen"] += tokens
                tok_s = tokens / dt
                if t.compile != "eager" and first_step:
                    log.info("train.compile=%s: first step %.1f s (compilation included)", t.compile, dt)
                    self.tracker.log_metrics({"perf/compile_first_step_s": dt}, step=step)
                first_step = False
                result.pop("skipped")
                metrics = {f"train/{k}": v for k, v in result.items()}
                metrics.update(
                    {
                        "train/perplexity": math.exp(min(result["loss"], 50)),
                        "train/lr": lr,
                        "train/grad_norm": self.grad_norm(),
                        "perf/tokens_per_s": tok_s,
                        "perf/mfu": self.flops_per_token * tok_s / self.peak,
                        "perf/memory_bytes": float(self.device.memory_allocated()),
                        "train/skipped_steps": float(self.state["skipped_steps"]),
                        "data/skipped_samples": float(self.loader.skipped),
                    }
                )
                metrics.update(expert_load(self.model))
                self.state["history"]["loss"].append([step, result["loss"]])
                self.state["history"].setdefault("train", []).append(
                    [step, {k: v for k, v in result.items() if "loss" in k}]
                )
                if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                    metrics.update(self._evaluate(step, log=False))
                if step % t.log_every == 0 or self.task.headline in metrics:
                    self.tracker.log_metrics(metrics, step=step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                if (t.save_every and step % t.save_every == 0) or step == end:
                    self.save()
        except BaseException as e:
            self.tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if bar is not None:
                bar.close()
        return self.finish()

    def _evaluate(self, step: int, log: bool = True) -> dict:
        metrics = self.task.evaluate(self.engine)
        self.state["history"]["val"].append([step, metrics])
        if log:
            self.tracker.log_metrics(metrics, step=step)
        return metrics

    def finish(self) -> dict:
        hist = self.state["history"]
        latest = self.ckpt.latest()
        if self.rank == 0:
            self.tracker.log_artifact(str(self.run_dir / "config.yaml"))
            if latest is not None:
                self.tracker.log_artifact(str(latest / "manifest.json"), subdir="checkpoint")
            curves = {"train/loss": [tuple(x) for x in hist["loss"]]}
            for key in hist["val"][0][1] if hist["val"] else ():
                curves[key] = [(st, m[key]) for st, m in hist["val"] if key in m]
            self.tracker.log_loss_curve(curves)
        self.tracker.end("FINISHED")
        head = self.task.headline
        vals = [m[head] for _, m in hist["val"] if head in m]
        out = {
            "final_step": self.state["step"],
            "checkpoint": str(latest) if latest else None,
            "skipped_steps": self.state["skipped_steps"],
            "mlflow_run_id": self.state["mlflow_run_id"],
            "tracking_uri": self.tracker.tracking_uri,
            "losses": [x[1] for x in hist["loss"]],
            "run_dir": str(self.run_dir),
            "skipped_samples": int(self.loader.skipped),
            "final_val": hist["val"][-1][1] if hist["val"] else {},
        }
        if head == "val/perplexity":
            out["initial_val_ppl"] = vals[0] if vals else None
            out["final_val_ppl"] = vals[-1] if vals else None
        return out


def pretrain(cfg: Config) -> dict:
    return Trainer(cfg).fit()
