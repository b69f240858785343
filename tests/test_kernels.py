"""Fused kernels (aion_train.kernels): every Triton kernel against its torch reference, forward
and backward, fp32 and bf16, odd sizes.

On CPU the Triton kernels run in the Triton interpreter. TRITON_INTERPRET is read when the
kernels are decorated (first import), and setting it in this pytest process would also flip
`model.kernels: auto` to Triton for every other test, so the comparisons run in one worker
subprocess started with TRITON_INTERPRET=1 (this file, run as `python tests/test_kernels.py
--worker`); each test sends it one case and reports its verdict. The `gpu` variants run the
same cases in-process on CUDA, compiled.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

try:
    importlib.import_module("triton")  # import only: no kernel is decorated in this process
    TRITON_ERROR = None
except Exception as e:  # pragma: no cover - depends on the environment
    TRITON_ERROR = f"{type(e).__name__}: {e}"

needs_triton = pytest.mark.skipif(
    TRITON_ERROR is not None,
    reason=f"triton cannot be imported ({TRITON_ERROR}); install the gpu extra or "
    "`pip install -c .ci/constraints.txt triton`",
)

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": dict(atol=1e-5, rtol=1e-5), "bf16": dict(atol=3e-2, rtol=2e-2)}


# --------------------------------------------------------------------------------------------
# cases: each builds inputs, runs the Triton kernel and the torch reference, compares fwd + bwd
# --------------------------------------------------------------------------------------------


def _close(name, got, want, dt):
    torch.testing.assert_close(got.float(), want.float(), **TOL[dt], msg=lambda m: f"{name}: {m}")


def _leaf(t, device, dtype=None):
    return t.to(device=device, dtype=dtype or t.dtype).detach().requires_grad_()


def _check_fn(kernel, inputs, grad_of, dt, fwd_kwargs=None, seed=1):
    """Run select(kernel, 'triton') and the reference on clones of `inputs`; compare the output
    and the grads of the inputs at positions `grad_of` for the same random upstream grad."""
    from aion_train.kernels import backend_of, reference, select

    impl = select(kernel, "triton")
    assert backend_of(impl) == "triton"
    ref = getattr(reference, kernel)
    kw = fwd_kwargs or {}
    a = [_leaf(x, x.device) if i in grad_of else x for i, x in enumerate(inputs)]
    b = [_leaf(x, x.device) if i in grad_of else x for i, x in enumerate(inputs)]
    out, out_ref = impl(*a, **kw), ref(*b, **kw)
    assert out.dtype == out_ref.dtype and out.shape == out_ref.shape, (out.dtype, out.shape, out_ref.shape)
    _close(f"{kernel} forward", out, out_ref, dt)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    ga = torch.autograd.grad(out, [a[i] for i in grad_of], g)
    gb = torch.autograd.grad(out_ref, [b[i] for i in grad_of], g)
    for i, x, y in zip(grad_of, ga, gb):
        assert x.dtype == y.dtype and x.shape == y.shape, (i, x.dtype, y.dtype)
        _close(f"{kernel} grad of input {i}", x, y, dt)
    return out, out_ref


def case_rms_norm(dt, device):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 37, dtype=DTYPES[dt], device=device)  # 21 rows, D=37
    w = (1 + 0.3 * torch.randn(37)).to(device)  # fp32 weight as in the model
    _check_fn("rms_norm", [x, w], (0, 1), dt, {"eps": 1e-5})
    # weight in the activation dtype too (pure-bf16 training)
    _check_fn("rms_norm", [x, w.to(x.dtype)], (0, 1), dt, {"eps": 1e-6})


def case_rope(dt, device):
    from aion_train.model.rope import RotaryEmbedding

    torch.manual_seed(0)
    B, T, H, D = 2, 5, 3, 10  # D/2 = 5 pairs
    rot = RotaryEmbedding(D, 16)
    pos = torch.arange(3, 3 + T)  # offset positions (KV cache)
    cos, sin = rot.cos[pos].to(device), rot.sin[pos].to(device)
    x = torch.randn(B, T, H, D, dtype=DTYPES[dt], device=device)
    _check_fn("rope", [x, cos, sin], (0,), dt)
    # inverse rotation: backward of rope applied to rope(x) gives x back (orthogonal map)
    from aion_train.kernels import select

    xf = torch.randn(B, T, H, D, device=device, requires_grad=True)
    y = select("rope", "triton")(xf, cos, sin)
    back = torch.autograd.grad(y, xf, y.detach())[0]  # R^T (R x) = x
    _close("rope inverse", back, xf, "fp32")


def case_swiglu(dt, device):
    torch.manual_seed(0)
    a = torch.randn(5, 2, 33, dtype=DTYPES[dt], device=device) * 3
    b = torch.randn(5, 33, 2, dtype=DTYPES[dt], device=device).transpose(1, 2)  # non-contiguous
    _check_fn("swiglu", [a, b], (0, 1), dt)


def _routing(device, n_tokens=13, k=2, n_experts=4, capacity_factor=0.75):
    """token_index/gates from the model's own sort_by_expert, with drops (factor < 1)."""
    from aion_train.model.moe.token_dispatcher import expert_capacity, sort_by_expert

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n_tokens, n_experts, generator=g)
    probs, idx = logits.softmax(-1).topk(k, dim=-1)
    cap = expert_capacity(n_tokens, k, n_experts, capacity_factor)
    token_index, gates, counts, dropped = sort_by_expert(idx, probs, n_experts, cap)
    assert dropped > 0 and int(counts.sum()) == token_index.numel()
    return token_index.to(device), gates.to(device)


def case_moe_permute(dt, device):
    torch.manual_seed(0)
    token_index, _ = _routing(device)
    x = torch.randn(13, 45, dtype=DTYPES[dt], device=device)  # d=45
    _check_fn("moe_permute", [x, token_index], (0,), dt)


def case_moe_unpermute(dt, device):
    torch.manual_seed(0)
    token_index, gates = _routing(device)
    M, d = token_index.numel(), 45
    e = torch.randn(M, d, dtype=DTYPES[dt], device=device)
    out, _ = _check_fn("moe_unpermute", [e, token_index, gates, 13], (0, 2), dt)
    missing = torch.ones(13, dtype=torch.bool, device=device)
    missing[token_index] = False
    assert missing.any(), "the routing should leave a token with every copy dropped"
    assert (out[missing] == 0).all()
    # gates=None: plain un-permute (sum of copies)
    _check_fn("moe_unpermute", [e, token_index, None, 13], (0,), dt)
    # permute then unpermute with unit gates: each token times its number of kept copies
    from aion_train.kernels import select

    x = torch.randn(13, d, device=device)
    y = select("moe_unpermute", "triton")(select("moe_permute", "triton")(x, token_index), token_index, None, 13)
    copies = torch.bincount(token_index, minlength=13).to(x.dtype)
    _close("permute-unpermute roundtrip", y, x * copies[:, None], "fp32")


def _labels(shape, V, device):
    g = torch.Generator().manual_seed(3)
    lab = torch.randint(0, V, shape, generator=g)
    flat = lab.view(-1)
    flat[0], flat[1], flat[2], flat[-1] = -100, 0, V - 1, -100  # ignored rows, edge columns
    return lab.to(device)


def case_cross_entropy(dt, device):
    torch.manual_seed(0)
    V = 1001  # several blocks of V, odd tail
    logits = (torch.randn(2, 7, V) * 4).to(device, DTYPES[dt])
    labels = _labels((2, 7), V, device)
    loss, _ = _check_fn("cross_entropy", [logits, labels], (0,), dt)
    assert loss.dtype == torch.float32 and (loss.view(-1)[[0, -1]] == 0).all()
    # the mean over valid rows equals F.cross_entropy(reduction="mean")
    from aion_train.kernels import reference

    want = torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1))
    _close("cross_entropy mean", reference.mean_loss(loss, labels), want, dt)


def case_linear_cross_entropy(dt, device):
    torch.manual_seed(0)
    N, H, V = 14, 24, 1001
    hidden = torch.randn(N, H).to(device, DTYPES[dt])
    weight = (torch.randn(V, H) * 0.3).to(device, DTYPES[dt])
    labels = _labels((N,), V, device)
    for chunk in (300, 1024):  # 4 uneven chunks; 1 chunk
        _check_fn("linear_cross_entropy", [hidden, weight, labels], (0, 1), dt, {"chunk_size": chunk})
    # default chunking, 3-D hidden
    _check_fn("linear_cross_entropy", [hidden.view(2, 7, H), weight, labels.view(2, 7)], (0, 1), dt)


def case_registry_auto(dt, device):
    """Inside the interpreter worker, `auto` resolves to Triton."""
    from aion_train.kernels import KERNELS, backend_of, select, triton_status

    ok, why = triton_status()
    assert ok, why
    for name in KERNELS:
        assert backend_of(select(name, "auto")) == "triton", name
        assert backend_of(select(name, "torch")) == "torch", name


CASES = {name[len("case_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}
KERNEL_CASES = [c for c in CASES if c != "registry_auto"]


# --------------------------------------------------------------------------------------------
# interpreter worker (subprocess with TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------


def _worker_main() -> None:  # pragma: no cover - runs in the subprocess
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed goes to stderr
    torch.set_num_threads(1)
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import traceback

    for line in sys.stdin:
        req = json.loads(line)
        try:
            CASES[req["case"]](req["dtype"], "cpu")
            res = {"status": "ok"}
        except Exception:
            res = {"status": "fail", "msg": traceback.format_exc()}
        reply.write(json.dumps(res) + "\n")
    reply.flush()
    os._exit(0)  # skip the slow interpreter/triton teardown


class _Worker:
    def __init__(self):
        env = dict(
            os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            cwd=REPO,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
        )

    def run(self, case: str, dtype: str) -> dict:
        if self.proc.poll() is not None:
            return {"status": "fail", "msg": f"worker exited ({self.proc.returncode}):\n{self._stderr()}"}
        self.proc.stdin.write(json.dumps({"case": case, "dtype": dtype}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            return {"status": "fail", "msg": f"worker died:\n{self._stderr()}"}
        return json.loads(line)

    def _stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()[-4000:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.err.close()


@pytest.fixture(scope="module")
def interp():
    w = _Worker()
    yield w
    w.close()


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_interpreter(interp, case, dtype):
    res = interp.run(case, dtype)
    if res["status"] != "ok":
        pytest.fail(f"{case}[{dtype}] under TRITON_INTERPRET=1:\n{res['msg']}", pytrace=False)


@needs_triton
def test_registry_auto_picks_triton_in_interpreter(interp):
    res = interp.run("registry_auto", "fp32")
    assert res["status"] == "ok", res.get("msg")


# --------------------------------------------------------------------------------------------
# the same comparisons compiled on CUDA
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_cuda(case, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    CASES[case](dtype, "cuda")


@pytest.mark.gpu
@needs_triton
def test_cuda_large_shapes():
    """Shapes closer to training: multi-block V, wide rows, many tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from aion_train.kernels import reference, select

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, device=dev)
    _close("rms_norm large", select("rms_norm", "triton")(x, w), reference.rms_norm(x, w), "bf16")
    logits = torch.randn(512, 50257, device=dev, dtype=torch.bfloat16)
    lab = torch.randint(0, 50257, (512,), device=dev)
    _close("ce large", select("cross_entropy", "triton")(logits, lab), reference.cross_entropy(logits, lab), "bf16")


# --------------------------------------------------------------------------------------------
# registry and references (in-process, no Triton needed)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_log(monkeypatch):
    import aion_train.kernels as K

    monkeypatch.setattr(K, "_logged", set())
    return K


def test_select_torch_is_reference(fresh_log):
    K = fresh_log
    for name in K.KERNELS:
        fn = K.select(name, "torch")
        assert fn is getattr(K.reference, name) and K.backend_of(fn) == "torch"
    assert K.get_kernel("swiglu", "torch") is K.reference.swiglu


def test_auto_falls_back_and_logs_once(fresh_log, monkeypatch, caplog):
    K = fresh_log
    if torch.cuda.is_available():
        pytest.skip("CUDA present: auto picks Triton")
    if "aion_train.kernels.triton_ops" in sys.modules:
        pytest.skip("triton_ops already imported in this process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.INFO, logger="aion_train.kernels"):
        fns = [K.select("rms_norm", "auto") for _ in range(3)] + [K.select("rms_norm", None)]
    assert all(f is K.reference.rms_norm for f in fns)
    msgs = [r.getMessage() for r in caplog.records if r.name == "aion_train.kernels"]
    assert len(msgs) == 1 and "torch reference" in msgs[0], msgs
    ok, why = K.triton_status()
    assert not ok and why
    with pytest.raises(RuntimeError, match="model.kernels=triton"):
        K.select("rms_norm", "triton")


def test_select_rejects_unknown(fresh_log):
    K = fresh_log
    with pytest.raises(KeyError):
        K.select("flash_attention", "auto")
    with pytest.raises(ValueError, match="model.kernels"):
        K.select("rms_norm", "cuda")


def test_references_and_model_code_match_the_textbook_formulas():
    """The references (and the model modules that call them) against the formulas written out
    here in float64, element by element: RMSNorm, RoPE from theta, SiLU via exp, the MoE
    combine as a loop, cross-entropy as log-sum-exp, and the fused head's gradients."""
    import math

    from aion_train.kernels import reference as R
    from aion_train.model.moe.token_dispatcher import combine
    from aion_train.model.norms import RMSNorm
    from aion_train.model.rope import RotaryEmbedding

    torch.manual_seed(0)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    norm = RMSNorm(37, eps=1e-5, kernels="torch")
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 37)
    x64, w64 = x.double(), norm.weight.detach().double()
    want = torch.empty_like(x64)
    for i in range(3):
        for t in range(5):
            rms = math.sqrt(sum(v * v for v in x64[i, t].tolist()) / 37 + 1e-5)
            want[i, t] = x64[i, t] / rms * w64
    torch.testing.assert_close(R.rms_norm(x, norm.weight, 1e-5).double(), want, **tol)
    torch.testing.assert_close(norm(x).double(), want, **tol)

    d, theta = 10, 10000.0
    rot = RotaryEmbedding(d, 16, theta=theta, kernels="torch")
    q, pos = torch.randn(2, 5, 3, d), torch.arange(2, 7)
    want = torch.empty(2, 5, 3, d, dtype=torch.float64)
    for t, m in enumerate(pos.tolist()):
        for i in range(d // 2):
            a = m * theta ** (-2 * i / d)
            x0, x1 = q[:, t, :, 2 * i].double(), q[:, t, :, 2 * i + 1].double()
            want[:, t, :, 2 * i] = x0 * math.cos(a) - x1 * math.sin(a)
            want[:, t, :, 2 * i + 1] = x0 * math.sin(a) + x1 * math.cos(a)
    torch.testing.assert_close(rot(q, pos).double(), want, **tol)
    torch.testing.assert_close(R.rope(q, rot.cos[pos], rot.sin[pos]).double(), want, **tol)

    a, b = torch.randn(4, 9), torch.randn(4, 9)
    want = a.double() / (1 + torch.exp(-a.double())) * b.double()
    torch.testing.assert_close(R.swiglu(a, b).double(), want, **tol)

    idx, gates, e = torch.tensor([3, 0, 3, 1]), torch.rand(4), torch.randn(4, 6)
    want = torch.zeros(5, 6, dtype=torch.float64)
    for m, t in enumerate(idx.tolist()):
        want[t] += gates[m].double() * e[m].double()
    torch.testing.assert_close(R.moe_unpermute(e, idx, gates, 5).double(), want, **tol)
    torch.testing.assert_close(combine(e, idx, gates, 5, kernels="torch").double(), want, **tol)

    def textbook_ce(logits, labels):
        rows = []
        for z, y in zip(logits.double().tolist(), labels.tolist()):
            top = max(z)
            rows.append(0.0 if y == -100 else top + math.log(sum(math.exp(v - top) for v in z)) - z[y])
        return torch.tensor(rows, dtype=torch.float64)

    logits, lab = torch.randn(6, 11), torch.tensor([1, -100, 3, 10, 0, -100])
    per_row = textbook_ce(logits, lab)
    torch.testing.assert_close(R.cross_entropy(logits, lab).double(), per_row, **tol)
    torch.testing.assert_close(R.mean_loss(R.cross_entropy(logits, lab), lab).double(), per_row.sum() / 4, **tol)

    for up in (torch.randn(6), torch.full((6,), 0.25)):  # per-row weights; a mean's
        h, w = torch.randn(6, 4, requires_grad=True), torch.randn(11, 4, requires_grad=True)
        loss = R.linear_cross_entropy(h, w, lab)
        z = h.detach().double() @ w.detach().double().t()
        torch.testing.assert_close(loss.double(), textbook_ce(z, lab), **tol)
        loss.backward(up)
        # d loss_i / d z_i = softmax(z_i) - onehot(y_i) (0 for ignored rows), times the upstream grad
        dz = torch.softmax(z, -1)
        dz[torch.arange(6), lab.clamp(min=0)] -= 1
        dz *= (up.double() * (lab != -100))[:, None]
        torch.testing.assert_close(h.grad.double(), dz @ w.detach().double(), **tol)
        torch.testing.assert_close(w.grad.double(), dz.t() @ h.detach().double(), **tol)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
