"""`train.compile=blocks`: every transformer block through torch.compile (inductor) changes speed,
not what is computed: the compiled model's loss and gradients equal the eager model's (fp32), and
a 50-step bf16 pretraining run with every speed option on follows the reference path's losses
within the bf16 tolerance of the kernel tests (tests/test_kernels.py)."""

from __future__ import annotations

import pytest
import torch
from test_train import history, ok, pretrain

from aion_train.config import ConfigError, load_config
from aion_train.model import build_model
from aion_train.model.execution import ExecutionPolicy, apply_execution_policy

BF16_TOL = dict(atol=3e-2, rtol=2e-2)  # test_kernels.TOL["bf16"]


def _tiny_cfg():
    return load_config(None, ["model.n_layers=2", "model.moe.every=2", "data.seq_len=32"])


def _compiled(model):
    return apply_execution_policy(model, ExecutionPolicy.for_device("cpu", compile="blocks"))


def test_compiled_blocks_keep_parameter_names_and_only_the_blocks_compile():
    cfg = _tiny_cfg()
    eager, model = build_model(cfg.model, seed=0), _compiled(build_model(cfg.model, seed=0))
    assert list(model.state_dict()) == list(eager.state_dict())  # checkpoints are unchanged
    compiled = [n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == [f"blocks.{i}" for i in range(cfg.model.n_layers)]
    _compiled(model)  # applying the policy again compiles nothing twice
    assert sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()) == cfg.model.n_layers


@pytest.mark.slow
def test_compiled_model_gives_the_eager_loss_and_gradients_fp32():
    """Dense and MoE blocks (the MoE's dispatch breaks the graph), over two batches of which
    the second routes differently (the expert groups change size: the graph after the break
    recompiles with a dynamic row count)."""
    cfg = _tiny_cfg()
    eager, model = build_model(cfg.model, seed=0), _compiled(build_model(cfg.model, seed=0))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=g)
        labels = torch.roll(ids, -1, dims=1)
        losses = []
        for m in (eager, model):
            m.zero_grad(set_to_none=True)
            out = m(ids, labels=labels, return_logits=False)
            out.loss.backward()
            losses.append(out.loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for (name, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_compile_is_refused_where_it_is_not_supported():
    with pytest.raises(ConfigError, match="train.compile='fast'"):
        load_config(None, ["train.compile=fast"])
    with pytest.raises(ConfigError, match=r"train.compile='blocks' with .*parallel.tp=2.*set train.compile=eager"):
        load_config(None, ["train.compile=blocks", "parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"train.compile='blocks' with train.activation_checkpointing=true"):
        load_config(None, ["train.compile=blocks", "train.activation_checkpointing=true"])
    assert load_config(None, ["train.compile=blocks"]).train.compile == "blocks"


@pytest.mark.slow
def test_fifty_steps_with_every_speed_option_follow_the_reference_losses(tmp_path):
    """bf16 pretraining, 50 steps: compiled blocks with the default kernels and grouped GEMM
    against the reference kernels, per-expert matmuls and eager blocks."""
    common = ["train.steps=50", "train.eval_every=0", "train.save_every=0", "train.precision=bf16"]
    ref = ["model.kernels=torch", "runtime.grouped_mm=per_expert", "train.compile=eager"]
    fast = ["train.compile=blocks"]
    runs = {}
    for name, extra in (("reference", ref), ("fast", fast)):
        ok(*pretrain(common + extra + [f"run_dir={tmp_path / name}"], timeout=900))
        runs[name] = [(s, v) for s, v, _ in history(tmp_path / name)]
    want, got = runs["reference"], runs["fast"]
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 51))
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]), **BF16_TOL)
    assert want[-1][1] < want[0][1] - 1.0  # it trained: the comparison is over a falling curve
