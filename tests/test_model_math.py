"""Numerical checks of the dense model maths against independent references.

Every expected value is computed here, in the test, from explicit formulas (loops, matmuls,
textbook definitions) -- never from the package's own output."""

import math

import pytest
import torch

from aion_train.config import ModelConfig, MoEConfig
from aion_train.model import KVCache, Transformer, generate
from aion_train.model.attention_backend import attention
from aion_train.model.moe import MoELayer
from aion_train.model.norms import RMSNorm, make_norm
from aion_train.model.rope import RotaryEmbedding

# ----------------------------------------------------------------------------------------------
# attention: softmax(Q K^T / sqrt(d) + causal mask) V, by hand
# ----------------------------------------------------------------------------------------------


def reference_attention(q, k, v, causal=True):
    """q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]; kv head j serves q heads j*g .. j*g+g-1.
    The causal mask is aligned to the end of the keys: query i sits at absolute position
    Tk - Tq + i and sees keys 0 .. Tk - Tq + i. Computed in float64 with explicit loops."""
    q, k, v = q.double(), k.double(), v.double()
    b_, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    out = torch.zeros(b_, tq, hq, d, dtype=torch.float64)
    for b in range(b_):
        for h in range(hq):
            j = h // group
            scores = q[b, :, h, :] @ k[b, :, j, :].T / math.sqrt(d)  # [Tq, Tk]
            if causal:
                for i in range(tq):
                    for key in range(tk):
                        if key > tk - tq + i:
                            scores[i, key] = float("-inf")
            w = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            w = w / w.sum(dim=-1, keepdim=True)
            out[b, :, h, :] = w @ v[b, :, j, :]
    return out


@pytest.mark.parametrize(
    "hq, hkv, tq, tk",
    [
        (4, 4, 6, 6),  # MHA, square causal
        (4, 2, 6, 6),  # GQA: kv head j serves q heads 2j, 2j+1
        (4, 1, 5, 5),  # MQA
        (4, 2, 3, 7),  # KV-cache chunk: Tq < Tk, mask aligned to the end
        (4, 4, 1, 7),  # single-token decode: sees every cached key
    ],
)
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_attention_matches_explicit_softmax(hq, hkv, tq, tk, backend):
    g = torch.Generator().manual_seed(hq * 100 + hkv * 10 + tq + tk)
    d = 8
    q = torch.randn(2, tq, hq, d, generator=g)
    k = torch.randn(2, tk, hkv, d, generator=g)
    v = torch.randn(2, tk, hkv, d, generator=g)
    out = attention(q, k, v, causal=True, backend=backend)
    assert out.shape == (2, tq, hq, d)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_gqa_mapping_is_interleaved_not_tiled():
    """With Hq=4, Hkv=2, q heads 0,1 must use kv head 0 and q heads 2,3 kv head 1. Make the
    kv heads wildly different so a wrong mapping (j = h % Hkv) cannot pass by accident."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 4, 8, generator=g)
    k = torch.randn(1, 4, 2, 8, generator=g)
    v = torch.zeros(1, 4, 2, 8)
    v[:, :, 0] = 1.0  # kv head 0 -> all ones
    v[:, :, 1] = -3.0  # kv head 1 -> all -3
    out = attention(q, k, v, causal=True, backend="sdpa")
    torch.testing.assert_close(out[:, :, 0:2], torch.ones(1, 4, 2, 8))
    torch.testing.assert_close(out[:, :, 2:4], torch.full((1, 4, 2, 8), -3.0))


def test_attention_non_causal_is_unmasked():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 5, 2, 4, generator=g) for _ in range(3))
    out = attention(q, k, v, causal=False, backend="sdpa")
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal=False), atol=1e-5, rtol=1e-5)


def test_first_query_attends_only_to_first_key():
    """Row 0 of a square causal attention is exactly v[0] (only one unmasked key)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=g) for _ in range(3))
    out = attention(q, k, v, causal=True, backend="sdpa")
    torch.testing.assert_close(out[:, 0], v[:, 0], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------


def rotation_matrix(pos: int, d: int, base: float) -> torch.Tensor:
    """Block-diagonal RoFormer rotation: pair (x_2i, x_2i+1) rotated by pos * base^(-2i/d)."""
    r = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d // 2):
        theta = base ** (-2.0 * i / d)
        c, s = math.cos(pos * theta), math.sin(pos * theta)
        r[2 * i, 2 * i], r[2 * i, 2 * i + 1] = c, -s
        r[2 * i + 1, 2 * i], r[2 * i + 1, 2 * i + 1] = s, c
    return r


def rope_at(rope, vec: torch.Tensor, pos: int) -> torch.Tensor:
    """Apply `rope` to one [D] vector at absolute position `pos`."""
    return rope(vec.view(1, 1, 1, -1), torch.tensor([pos]))[0, 0, 0]


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rope_matches_explicit_rotation_matrices(base):
    d, t = 16, 40
    rope = RotaryEmbedding(d, max_seq_len=64, theta=base)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, t, 3, d, generator=g)
    positions = torch.arange(5, 5 + t)
    out = rope(x, positions)
    expected = torch.empty(2, t, 3, d, dtype=torch.float64)
    for ti in range(t):
        r = rotation_matrix(int(positions[ti]), d, base)
        for b in range(2):
            for h in range(3):
                expected[b, ti, h] = r @ x[b, ti, h].double()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_rope_relative_position_property():
    d = 16
    rope = RotaryEmbedding(d, max_seq_len=128)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)

    def dot(m, n):
        return float(rope_at(rope, q, m).double() @ rope_at(rope, k, n).double())

    same_diff = [dot(m, n) for m, n in [(3, 0), (5, 2), (10, 7), (50, 47), (100, 97)]]
    for val in same_diff[1:]:
        assert val == pytest.approx(same_diff[0], abs=1e-4)
    # the textbook value: q^T R(m)^T R(n) k = q^T R(n - m) k
    explicit = float(q.double() @ rotation_matrix(0 - 3, d, 10000.0) @ k.double())
    assert same_diff[0] == pytest.approx(explicit, abs=1e-4)
    # different offsets give different dot products
    others = [dot(4, 0), dot(0, 3), dot(7, 5), dot(20, 0)]
    for val in others:
        assert abs(val - same_diff[0]) > 1e-3
    assert abs(dot(4, 0) - dot(0, 4)) > 1e-3  # sign of m - n matters too


def test_rope_preserves_norm_and_position_zero_is_identity():
    d = 32
    rope = RotaryEmbedding(d, max_seq_len=256)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 200, 4, d, generator=g)
    out = rope(x, torch.arange(200))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)
    assert torch.equal(out[:, 0], x[:, 0])  # cos 0 = 1, sin 0 = 0 exactly
    assert not torch.allclose(out[:, 1], x[:, 1])  # and it does rotate elsewhere


def test_rope_tables_stay_fp32_when_the_model_is_cast_to_bf16():
    """DeepSpeed's bf16 mode calls module.bfloat16(): the rotation tables must stay fp32, so a
    bf16 input is rotated as exactly as its own rounding allows."""
    d = 32
    rope = RotaryEmbedding(d, max_seq_len=256)
    ref_cos = rope.cos.clone()
    rope = torch.nn.Sequential(rope).bfloat16()[0]
    assert rope.cos.dtype == rope.sin.dtype == torch.float32 and torch.equal(rope.cos, ref_cos)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 256, 2, d, generator=g).bfloat16()
    out = rope(x, torch.arange(256))
    assert out.dtype == torch.bfloat16
    exact = RotaryEmbedding(d, max_seq_len=256)(x.float(), torch.arange(256))
    assert torch.equal(out, exact.bfloat16())  # one rounding, at the end


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_attention_matches_explicit_softmax(dtype):
    """bf16/fp16 inputs (attended in fp32 on CPU) give the fp32 result rounded once."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 9, h, 16, generator=g).to(dtype) for h in (4, 2, 2))
    out = attention(q, k, v, causal=True)
    assert out.dtype == dtype
    ref = reference_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), atol=1e-2, rtol=1e-2)
    assert (out.double() - ref).abs().max() <= (ref.to(dtype).double() - ref).abs().max() * 1.01 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_segment_mask_matches_per_segment_attention(dtype):
    """A packed row [a a a b b] with the block-diagonal causal mask attends like two separate
    rows; through the same backend (fp32 on CPU for bf16)."""
    from aion_train.model.attention import segment_causal_mask

    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 5, h, 8, generator=g).to(dtype) for h in (4, 2, 2))
    mask = segment_causal_mask(torch.tensor([[1, 1, 1, 2, 2]]))
    out = attention(q, k, v, causal=True, attn_mask=mask)
    assert out.dtype == dtype
    ref = torch.cat(
        [
            reference_attention(q[:, :3].float(), k[:, :3].float(), v[:, :3].float()),
            reference_attention(q[:, 3:].float(), k[:, 3:].float(), v[:, 3:].float()),
        ],
        dim=1,
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# norms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_rmsnorm_formula(eps):
    d = 12
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, d, generator=g) * 0.3
    norm = make_norm("rmsnorm", d, eps)
    assert isinstance(norm, RMSNorm)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
    xd, w = x.double(), norm.weight.detach().double()
    expected = torch.empty_like(xd)
    for idx in range(xd.shape[0] * xd.shape[1]):
        row = xd.reshape(-1, d)[idx]
        ms = sum(float(v) ** 2 for v in row) / d
        expected.reshape(-1, d)[idx] = row / math.sqrt(ms + eps) * w
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-6, rtol=1e-5)


def test_rmsnorm_keeps_low_precision_dtype():
    norm = RMSNorm(8)
    x = torch.randn(4, 8).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


def test_layernorm_option_is_textbook_with_eps_1e5():
    cfg = ModelConfig(
        vocab_size=16,
        d_model=8,
        n_layers=1,
        n_heads=2,
        d_ff=16,
        norm="layernorm",
        max_seq_len=8,
        moe=MoEConfig(every=0),
    )
    model = Transformer(cfg)
    norm = model.norm
    d = 8
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
        norm.bias.copy_(torch.randn(d, generator=g))
    # tiny activations: the variance (~1e-6) is comparable to eps, so eps must be exactly 1e-5
    x = torch.randn(6, d, generator=g) * 1e-3
    w, b = norm.weight.detach().double(), norm.bias.detach().double()
    expected = torch.empty(6, d, dtype=torch.float64)
    for r in range(6):
        row = x[r].double()
        mu = sum(float(v) for v in row) / d
        var = sum((float(v) - mu) ** 2 for v in row) / d  # biased variance
        expected[r] = (row - mu) / math.sqrt(var + 1e-5) * w + b
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-5, rtol=1e-4)
    # the block norms are layernorms too
    assert all(isinstance(m, torch.nn.LayerNorm) for blk in model.blocks for m in (blk.attn_norm, blk.ffn_norm))


def test_make_norm_rejects_unknown_kind():
    with pytest.raises(ValueError, match="rmsnorm or layernorm"):
        make_norm("batchnorm", 8, 1e-5)


# ----------------------------------------------------------------------------------------------
# the full transformer
# ----------------------------------------------------------------------------------------------


def tiny_cfg(**kw):
    moe = MoEConfig(
        n_experts=4,
        top_k=2,
        d_ff_expert=32,
        every=2,
        capacity_factor=None,
        balance_coef=0.01,
        z_loss_coef=1e-3,
        shared_expert_d_ff=16,
    )
    base = dict(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=32,
        attention_backend="sdpa",
        init_std=0.1,
        moe=moe,
    )
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(tiny_cfg(**kw)).eval()
    # MoE experts are built with their own 0.02 init; bring them up so they matter numerically
    with torch.no_grad():
        for moe in model.moe_layers():
            for p in moe.experts.parameters():
                p.normal_(std=0.2)
    return model


def test_tiny_model_has_dense_and_moe_layers():
    model = tiny_model()
    assert not isinstance(model.blocks[0].ffn, MoELayer)
    assert isinstance(model.blocks[1].ffn, MoELayer)


@torch.no_grad()
def test_kv_cached_incremental_forward_equals_full_forward():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    full = model(ids).logits
    cache = KVCache(len(model.blocks))
    pieces = []
    for lo, hi in [(0, 5), (5, 6), (6, 7), (7, 10), (10, 12)]:  # prefill, 1-token steps, chunks
        pieces.append(model(ids[:, lo:hi], kv_cache=cache).logits)
        assert cache.length == hi
    incremental = torch.cat(pieces, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    ids2 = ids.clone()
    ids2[:, 6] = (ids[:, 6] + 17) % 64
    a, b = model(ids).logits, model(ids2).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().amax(dim=-1).min() > 1e-4  # every later position moved


def test_tied_embeddings_share_the_tensor():
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    untied = sum(p.numel() for p in tiny_model(tie_embeddings=False).parameters())
    assert untied - n_params == 64 * 32
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    out = model(ids, return_hidden=True)
    torch.testing.assert_close(out.logits, out.hidden @ model.embed.weight.T, atol=1e-6, rtol=1e-5)
    # gradient reaches the one tensor from both uses: the embedding rows of the input tokens
    # and every row through the head
    out.logits.sum().backward()
    grad = model.embed.weight.grad
    assert grad is not None and bool((grad.abs().sum(-1) > 0).all())


def hand_aux(model, captured):
    """Balance + z loss of every MoE layer, from the captured router inputs, by hand."""
    total = 0.0
    for moe, h in zip(model.moe_layers(), captured):
        x = h.reshape(-1, h.shape[-1]).double()
        logits = x @ moe.router.weight.detach().double().T
        n, e = logits.shape
        probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
        counts = [0] * e
        for row in probs.tolist():
            for expert in sorted(range(e), key=lambda i: -row[i])[: moe.top_k]:
                counts[expert] += 1
        f = [c / (n * moe.top_k) for c in counts]
        p = probs.mean(0).tolist()
        bal = moe.router.balance_coef * e * sum(fi * pi for fi, pi in zip(f, p))
        lse = torch.log(torch.exp(logits).sum(-1))
        zl = moe.router.z_loss_coef * float((lse**2).mean())
        total += bal + zl
    return total


@torch.no_grad()
def test_loss_is_cross_entropy_ignoring_minus_100_plus_aux():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    labels = torch.randint(0, 64, (2, 9), generator=g)
    labels[0, :3] = -100
    labels[1, -2:] = -100
    captured = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: captured.append(args[0].clone())) for m in model.moe_layers()
    ]
    out = model(ids, labels=labels)
    for hk in hooks:
        hk.remove()
    # cross-entropy by hand: mean over the non-ignored positions of -log softmax[label]
    logits = out.logits.double()
    total, n = 0.0, 0
    for b in range(2):
        for t in range(9):
            y = int(labels[b, t])
            if y == -100:
                continue
            row = logits[b, t]
            total += float(torch.log(torch.exp(row - row.max()).sum()) + row.max() - row[y])
            n += 1
    assert n == 18 - 5
    ce = total / n
    aux = hand_aux(model, captured)
    assert aux > 0.01  # one MoE layer: balance >= alpha, plus a z term
    assert float(out.lm_loss) == pytest.approx(ce, rel=1e-5)
    assert float(out.aux_loss) == pytest.approx(aux, rel=1e-5)
    assert float(out.loss) == pytest.approx(ce + aux, rel=1e-5)


@torch.no_grad()
def test_dense_model_has_zero_aux_loss():
    model = tiny_model(moe=MoEConfig(every=0))
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    out = model(ids, labels=ids)
    assert model.moe_layers() == []
    assert float(out.aux_loss) == 0.0
    assert float(out.loss) == float(out.lm_loss)


@torch.no_grad()
def test_greedy_generate_equals_argmax_loop_without_cache():
    model = tiny_model(seed=5)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 64, (2, 4), generator=g)
    out = generate(model, prompt, max_new_tokens=7)
    tokens = prompt.clone()
    for _ in range(7):
        logits = model(tokens).logits[:, -1]  # full recompute, no cache
        nxt = torch.tensor([[max(range(64), key=lambda i: float(logits[b, i]))] for b in range(2)])
        tokens = torch.cat([tokens, nxt], dim=1)
    assert out.shape == (2, 11)
    assert torch.equal(out, tokens)


@torch.no_grad()
def test_generate_stops_at_any_of_several_eos_ids():
    model = tiny_model(seed=5)
    prompt = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(5))
    free = generate(model, prompt, max_new_tokens=12)[:, 4:]
    a, b = int(free[0, 2]), int(free[1, 5])  # row 0's third token, row 1's sixth: two stop ids
    stops = {a, b}
    out = generate(model, prompt, max_new_tokens=12, eos_id=stops)[:, 4:]
    for row, got in zip(free.tolist(), out.tolist()):
        first = next(i for i, t in enumerate(row) if t in stops)
        assert got[: first + 1] == row[: first + 1]  # the same tokens up to the first stop id
        assert all(t == min(stops) for t in got[first + 1 :])  # then padding
    ends = [next(i for i, t in enumerate(r) if t in stops) for r in free.tolist()]
    assert out.shape[1] == max(ends) + 1  # stopped when both rows were finished
    one = generate(model, prompt, max_new_tokens=12, eos_id=a)[:, 4:]
    assert torch.equal(one, generate(model, prompt, max_new_tokens=12, eos_id=[a])[:, 4:])
