"""MoE router / dispatcher / experts / layer checked against hand-computed references."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from aion_train.model.execution import ExecutionPolicy, apply_execution_policy
from aion_train.model.ffn import DenseFFN
from aion_train.model.moe import (
    LocalDispatcher,
    MoELayer,
    TopKRouter,
    balance_loss,
    combine,
    expert_capacity,
    grouped_linear,
    sort_by_expert,
    z_loss,
)
from aion_train.model.moe import experts as experts_mod
from aion_train.model.moe.token_dispatcher import pad_to_equal_groups

NO_PADDING = replace(ExecutionPolicy.for_device("cpu"), pad_expert_groups=False)


# ----------------------------------------------------------------------------------------------
# hand helpers (plain Python / float64, no package code)
# ----------------------------------------------------------------------------------------------


def softmax_rows(logits):
    """List of rows -> list of softmax rows, with math.exp."""
    out = []
    for row in logits:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        out.append([v / s for v in ex])
    return out


def topk_rows(probs, k):
    """Per row: the k expert ids of largest probability, largest first."""
    return [sorted(range(len(row)), key=lambda i: -row[i])[:k] for row in probs]


def silu(z):
    return z * torch.sigmoid(z)


def gelu_erf(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def make_router(logit_matrix_weight, k, **kw):
    """A router whose weight is given; with x = rows of an identity the logits are the weight^T."""
    e, d = logit_matrix_weight.shape
    r = TopKRouter(d, e, k, **kw)
    with torch.no_grad():
        r.weight.copy_(logit_matrix_weight)
    return r


# ----------------------------------------------------------------------------------------------
# router
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
@torch.no_grad()
def test_router_renormalised_topk_gates(k):
    g = torch.Generator().manual_seed(0)
    n, d, e = 10, 6, 5
    x = torch.randn(n, d, generator=g)
    w = torch.randn(e, d, generator=g)
    router = make_router(w, k, normalize_gates=True)
    out = router(x)
    logits = (x.double() @ w.double().T).tolist()
    probs = softmax_rows(logits)
    idx = topk_rows(probs, k)
    assert out.indices.tolist() == idx
    for r in range(n):
        top = [probs[r][i] for i in idx[r]]
        expected = [p / sum(top) for p in top]
        assert out.gates[r].tolist() == pytest.approx(expected, abs=1e-6)
        assert float(out.gates[r].sum()) == pytest.approx(1.0, abs=1e-6)
        assert out.probs[r].tolist() == pytest.approx(probs[r], abs=1e-6)


@torch.no_grad()
def test_router_unnormalised_gates_are_raw_probs():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 4, generator=g), torch.randn(6, 4, generator=g)
    out = make_router(w, 2, normalize_gates=False)(x)
    probs = softmax_rows((x.double() @ w.double().T).tolist())
    idx = topk_rows(probs, 2)
    for r in range(8):
        assert out.gates[r].tolist() == pytest.approx([probs[r][i] for i in idx[r]], abs=1e-6)
        assert float(out.gates[r].sum()) < 1.0


@pytest.mark.parametrize("normalize", [True, False])
@torch.no_grad()
def test_switch_k1_gate_is_top_prob_not_one(normalize):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(7, 4, generator=g), torch.randn(4, 4, generator=g)
    out = make_router(w, 1, normalize_gates=normalize)(x)
    probs = softmax_rows((x.double() @ w.double().T).tolist())
    for r in range(7):
        best = max(range(4), key=lambda i: probs[r][i])
        assert out.indices[r].tolist() == [best]
        assert float(out.gates[r, 0]) == pytest.approx(probs[r][best], abs=1e-6)
        assert float(out.gates[r, 0]) < 0.999


FIXED_LOGITS = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.5, 0.0, -1.0]]


@torch.no_grad()
def test_balance_loss_fixed_example_by_hand():
    """N=4 tokens, E=3, k=2. Top-2 by hand: t0 {0,1}, t1 {1,2}, t2 {2,0}, t3 {0,1}
    -> assignment counts e0=3, e1=3, e2=2 over N*k=8 -> f = (3/8, 3/8, 2/8)."""
    alpha = 0.01
    x = torch.tensor(FIXED_LOGITS)
    router = make_router(torch.eye(3), 2, balance_coef=alpha, z_loss_coef=0.0)  # logits = x
    out = router(x)
    assert [sorted(r) for r in out.indices.tolist()] == [[0, 1], [1, 2], [0, 2], [0, 1]]
    probs = softmax_rows(FIXED_LOGITS)
    p_mean = [sum(probs[t][i] for t in range(4)) / 4 for i in range(3)]
    f = [3 / 8, 3 / 8, 2 / 8]
    expected = alpha * 3 * sum(fi * pi for fi, pi in zip(f, p_mean))
    assert float(out.balance_loss) == pytest.approx(expected, rel=1e-6)
    assert float(out.z_loss) == 0.0
    assert float(out.aux_loss) == pytest.approx(expected, rel=1e-6)
    # the free function, fed the same probs and indices
    fn = balance_loss(torch.tensor(probs), out.indices, 3, alpha)
    assert float(fn) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("e, k", [(4, 1), (4, 2), (8, 2), (5, 3)])
@torch.no_grad()
def test_uniform_router_balance_loss_is_alpha(e, k):
    alpha = 0.037
    router = make_router(torch.zeros(e, 6), k, balance_coef=alpha)
    out = router(torch.randn(11, 6))
    assert float(out.balance_loss) == pytest.approx(alpha, rel=1e-6)


@torch.no_grad()
def test_z_loss_by_hand():
    coef = 0.02
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(9, 5, generator=g) * 2, torch.randn(4, 5, generator=g)
    out = make_router(w, 2, balance_coef=0.0, z_loss_coef=coef)(x)
    logits = (x.double() @ w.double().T).tolist()
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits]
    expected = coef * sum(v * v for v in lse) / len(lse)
    assert float(out.z_loss) == pytest.approx(expected, rel=1e-5)
    assert float(out.balance_loss) == 0.0
    assert float(out.aux_loss) == pytest.approx(expected, rel=1e-5)
    assert float(z_loss(torch.tensor(logits), coef)) == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_aux_loss_is_balance_plus_z():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(9, 5, generator=g), torch.randn(4, 5, generator=g)
    out = make_router(w, 2, balance_coef=0.01, z_loss_coef=0.001)(x)
    assert float(out.balance_loss) > 0 and float(out.z_loss) > 0
    assert float(out.aux_loss) == pytest.approx(float(out.balance_loss) + float(out.z_loss), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# capacity and sorting
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, k, e, factor, expected",
    [
        (10, 2, 4, 1.25, 7),  # 6.25 -> 7
        (8, 1, 4, 1.0, 2),  # exactly 2
        (7, 1, 4, 1.0, 2),  # 1.75 -> 2
        (6, 2, 3, 0.5, 2),  # 2
        (6, 2, 3, 0.75, 3),  # 3
        (100, 2, 8, 1.1, 28),  # 27.5 -> 28
        (3, 1, 8, 0.1, 1),  # 0.0375 -> 1
        (10, 2, 4, None, None),  # dropless
    ],
)
def test_expert_capacity(tokens, k, e, factor, expected):
    assert expert_capacity(tokens, k, e, factor) == expected


# six tokens, top-2, three experts. Copies per expert in token order:
#   e0: t0 t1 t2 t3 t4     e1: t0 t2 t3 t5     e2: t1 t4 t5
HAND_INDICES = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [0, 2], [2, 1]])
HAND_GATES = torch.tensor([[0.01 * (10 * t + s + 1) for s in range(2)] for t in range(6)])


def gate(t, s):
    return float(HAND_GATES[t, s])


def test_sort_by_expert_dropless():
    tok, gates, counts, dropped = sort_by_expert(HAND_INDICES, HAND_GATES, 3, None)
    assert tok.tolist() == [0, 1, 2, 3, 4, 0, 2, 3, 5, 1, 4, 5]
    assert counts.tolist() == [5, 4, 3]
    assert dropped == 0
    pairs = [(0, 0), (1, 0), (2, 0), (3, 1), (4, 0), (0, 1), (2, 1), (3, 0), (5, 1), (1, 1), (4, 1), (5, 0)]
    assert gates.tolist() == pytest.approx([gate(t, s) for t, s in pairs])


@pytest.mark.parametrize(
    "cap, kept_pairs, counts",
    [
        # capacity 3: e0 keeps t0 t1 t2 (drops t3, t4), e1 keeps t0 t2 t3 (drops t5), e2 keeps all
        (3, [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (3, 0), (1, 1), (4, 1), (5, 0)], [3, 3, 3]),
        # capacity 2: e0 keeps t0 t1, e1 keeps t0 t2, e2 keeps t1 t4
        (2, [(0, 0), (1, 0), (0, 1), (2, 1), (1, 1), (4, 1)], [2, 2, 2]),
        # capacity 1: the first token of each expert
        (1, [(0, 0), (0, 1), (1, 1)], [1, 1, 1]),
    ],
)
def test_sort_by_expert_drops_latest_tokens(cap, kept_pairs, counts):
    tok, gates, got_counts, dropped = sort_by_expert(HAND_INDICES, HAND_GATES, 3, cap)
    assert tok.tolist() == [t for t, _ in kept_pairs]
    assert gates.tolist() == pytest.approx([gate(t, s) for t, s in kept_pairs])
    assert got_counts.tolist() == counts
    # hand count: per expert, max(0, copies - capacity)
    per_expert = [5, 4, 3]
    assert dropped == sum(max(0, c - cap) for c in per_expert) == 12 - len(kept_pairs)


def test_sort_by_expert_with_an_empty_expert():
    idx = torch.tensor([[3, 0], [0, 3], [3, 0]])
    tok, gates, counts, dropped = sort_by_expert(idx, torch.ones(3, 2), 4, 2)
    assert counts.tolist() == [2, 0, 0, 2]
    assert tok.tolist() == [0, 1, 0, 1]
    assert dropped == 2


# ----------------------------------------------------------------------------------------------
# dispatch / combine
# ----------------------------------------------------------------------------------------------


def test_dispatch_combine_round_trip_identity_experts_dropless():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g)
    disp = LocalDispatcher(3, None)
    disp.execution = NO_PADDING
    tokens, counts, state = disp.dispatch(x, HAND_INDICES, HAND_GATES)
    assert counts.tolist() == [5, 4, 3] and state.dropped == 0 and state.n_tokens == 6
    # grouped by expert: the rows are copies of the routed tokens, in expert order
    expected_rows = [0, 1, 2, 3, 4, 0, 2, 3, 5, 1, 4, 5]
    assert torch.equal(tokens, x[expected_rows])
    out = disp.combine(tokens, state)
    expected = torch.stack([(gate(t, 0) + gate(t, 1)) * x[t] for t in range(6)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_dispatch_combine_with_drops_gives_zeros_for_fully_dropped_tokens():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 4, generator=g)
    disp = LocalDispatcher(3, 0.5)  # capacity ceil(0.5 * 6 * 2 / 3) = 2
    disp.execution = NO_PADDING
    tokens, counts, state = disp.dispatch(x, HAND_INDICES, HAND_GATES)
    assert counts.tolist() == [2, 2, 2]
    assert state.dropped == 6  # e0: 3 over, e1: 2 over, e2: 1 over
    out = disp.combine(tokens, state)
    expected = torch.stack(
        [
            (gate(0, 0) + gate(0, 1)) * x[0],  # both copies kept
            (gate(1, 0) + gate(1, 1)) * x[1],  # both copies kept
            gate(2, 1) * x[2],  # e0 copy dropped, e1 kept
            torch.zeros(4),  # e1 and e0 copies both dropped
            gate(4, 1) * x[4],  # e0 dropped, e2 kept
            torch.zeros(4),  # e2 and e1 copies both dropped
        ]
    )
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[3], torch.zeros(4)) and torch.equal(out[5], torch.zeros(4))


def test_pad_to_equal_groups_by_hand():
    tok, gates, counts, _ = sort_by_expert(HAND_INDICES, HAND_GATES, 3, None)  # counts 5, 4, 3
    padded = pad_to_equal_groups(tok, gates, counts, max_waste=0.25, max_rows=5)
    p_tok, p_gates, p_counts = padded
    assert p_counts.tolist() == [5, 5, 5]
    # expert 0's five rows, expert 1's four + one pad, expert 2's three + two pads (token 0, gate 0)
    assert p_tok.tolist() == [0, 1, 2, 3, 4, 0, 2, 3, 5, 0, 1, 4, 5, 0, 0]
    want_gates = [
        gate(0, 0),
        gate(1, 0),
        gate(2, 0),
        gate(3, 1),
        gate(4, 0),
        gate(0, 1),
        gate(2, 1),
        gate(3, 0),
        gate(5, 1),
        0.0,
        gate(1, 1),
        gate(4, 1),
        gate(5, 0),
        0.0,
        0.0,
    ]
    torch.testing.assert_close(p_gates, torch.tensor(want_gates))
    # 3 padding rows on 12 real ones is 25%: refused above that, or past max_rows
    assert pad_to_equal_groups(tok, gates, counts, max_waste=0.2, max_rows=5) is None
    assert pad_to_equal_groups(tok, gates, counts, max_waste=0.25, max_rows=4) is None


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_padded_equal_groups_give_the_ragged_layers_outputs_and_gradients(activation, monkeypatch):
    """The CPU layout (equal groups, one batched GEMM) against the ragged grouped GEMMs: same
    output, same gradients for the input, the router and every expert."""
    x = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(13))
    results = []
    for pad in (True, False):
        layer = scaled_layer(14, 8, 4, 2, 12, activation, None, 0.01, 0.0, 0, True)
        apply_execution_policy(
            layer, replace(ExecutionPolicy.for_device("cpu"), pad_expert_groups=pad, pad_max_waste=1.0)
        )
        routing = layer.router(x.reshape(-1, 8))
        _, layout_counts, _ = layer.dispatcher.dispatch(x.reshape(-1, 8), routing.indices, routing.gates)
        assert (len(set(layout_counts.tolist())) == 1) == pad
        xi = x.clone().requires_grad_()
        y, aux = layer(xi)
        (y.pow(2).sum() + aux).backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters()])
        counts = layer.last_stats["tokens_per_expert"].tolist()
    assert len(set(counts)) > 1  # ragged: padding was needed
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_equal_groups_run_as_one_batched_gemm():
    torch.manual_seed(0)
    experts = experts_mod.GroupedExperts(3, 8, 12)
    x = torch.randn(15, 8, requires_grad=True)
    y = experts(x, torch.tensor([5, 5, 5]))
    assert "Bmm" in type(y.grad_fn.next_functions[0][0]).__name__ or "Bmm" in type(y.grad_fn).__name__
    want = torch.cat(
        [(F.silu(xe @ experts.w1[e]) * (xe @ experts.w3[e])) @ experts.w2[e] for e, xe in enumerate(x.split(5))]
    )
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)


def test_combine_scales_expert_outputs_by_gates():
    expert_out = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = combine(expert_out, torch.tensor([2, 0, 2]), torch.tensor([0.5, 2.0, 0.25]), 4)
    expected = torch.tensor([[6.0, 8.0], [0.0, 0.0], [0.5 + 1.25, 1.0 + 1.5], [0.0, 0.0]])
    torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------------------------------------
# grouped_linear
# ----------------------------------------------------------------------------------------------


def grouped_path_available():
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a, b = torch.randn(4, 8), torch.randn(2, 8, 4)
        F.grouped_mm(a, b, offs=torch.tensor([2, 4], dtype=torch.int32))
        return True
    except Exception:
        return False


@pytest.mark.parametrize("counts_values", [[3, 0, 2, 4], [0, 5, 4, 0], [9, 0, 0, 0]])
@pytest.mark.parametrize("path", ["loop", "grouped_mm"])
def test_grouped_linear_matches_per_expert_loop(path, counts_values, monkeypatch):
    if path == "grouped_mm":
        if not grouped_path_available():
            pytest.skip("torch grouped_mm not usable here")
        monkeypatch.setattr(experts_mod, "_grouped_mm_works", lambda *args: True)
    else:
        monkeypatch.setattr(experts_mod, "_grouped_mm_works", lambda *args: False)
    g = torch.Generator().manual_seed(sum(counts_values) + len(path))
    e, d_in, d_out = 4, 8, 4  # multiples of 4 floats: grouped_mm needs 16-byte strides
    m = sum(counts_values)
    x = torch.randn(m, d_in, generator=g, requires_grad=True)
    w = torch.randn(e, d_in, d_out, generator=g, requires_grad=True)
    upstream = torch.randn(m, d_out, generator=g)
    counts = torch.tensor(counts_values)

    y = grouped_linear(x, w, counts)
    (y * upstream).sum().backward()

    # reference: explicit per-expert matmuls on separate leaves
    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    rows, start = [], 0
    for ei, c in enumerate(counts_values):
        for r in range(start, start + c):
            rows.append(xr[r] @ wr[ei])
        start += c
    yr = torch.stack(rows)
    (yr * upstream).sum().backward()

    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-5, rtol=1e-5)
    for ei, c in enumerate(counts_values):
        if c == 0:
            assert torch.equal(w.grad[ei], torch.zeros(d_in, d_out))  # idle expert: no gradient


# ----------------------------------------------------------------------------------------------
# MoE layer
# ----------------------------------------------------------------------------------------------


def scaled_layer(seed, *args, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(*args, **kw)
    with torch.no_grad():  # O(1) weights so the comparisons are meaningful
        for p in layer.experts.parameters():
            p.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)
        if layer.shared_expert is not None:
            for p in layer.shared_expert.parameters():
                p.normal_(std=0.3)
    return layer


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_single_expert_k1_equals_dense_ffn(activation):
    d, ff = 8, 12
    layer = scaled_layer(0, d, 1, 1, ff, activation, balance_coef=0.01)
    dense = DenseFFN(d, ff, activation)
    ex = layer.experts
    assert ex.w1.shape == (1, d, ff) and ex.w2.shape == (1, ff, d)
    with torch.no_grad():  # nn.Linear weights are [out, in]
        if activation == "swiglu":
            dense.w_gate.weight.copy_(ex.w1[0].T)
            dense.w_up.weight.copy_(ex.w3[0].T)
        else:
            dense.w_up.weight.copy_(ex.w1[0].T)
        dense.w_down.weight.copy_(ex.w2[0].T)
    x = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(1))
    y, aux = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(y, dense(x), atol=1e-5, rtol=1e-5)
    # and the textbook formula, with explicit activations
    xd = x.double().reshape(-1, d)
    w1, w2 = ex.w1[0].detach().double(), ex.w2[0].detach().double()
    if activation == "swiglu":
        h = silu(xd @ w1) * (xd @ ex.w3[0].detach().double())
    elif activation == "gelu":
        h = gelu_erf(xd @ w1)
    else:
        h = torch.clamp(xd @ w1, min=0.0)
    torch.testing.assert_close(y.double().reshape(-1, d), h @ w2, atol=1e-5, rtol=1e-5)
    # one expert takes everything with probability 1: f = P = 1 -> balance = alpha
    assert float(aux.detach()) == pytest.approx(0.01, rel=1e-6)


def naive_moe(layer, x, capacity=None):
    """sum over the top-k experts of gate * expert_e(x), token by token in Python, plus the
    shared expert. With `capacity`, an expert takes copies in token order until it is full."""
    d = x.shape[-1]
    flat = x.reshape(-1, d).double()
    e, k = layer.n_experts, layer.top_k
    w_r = layer.router.weight.detach().double()
    probs = softmax_rows((flat @ w_r.T).tolist())
    chosen = topk_rows(probs, k)
    ex = layer.experts
    w1, w2 = ex.w1.detach().double(), ex.w2.detach().double()
    w3 = None if ex.w3 is None else ex.w3.detach().double()
    filled = [0] * e
    out = torch.zeros_like(flat)
    dropped = 0
    for t in range(flat.shape[0]):
        top = [probs[t][i] for i in chosen[t]]
        norm = sum(top) if (layer.router.normalize_gates and k > 1) else 1.0
        for i, expert in enumerate(chosen[t]):
            if capacity is not None and filled[expert] >= capacity:
                dropped += 1
                continue
            filled[expert] += 1
            xt = flat[t]
            if w3 is not None:
                h = silu(xt @ w1[expert]) * (xt @ w3[expert])
            elif ex.activation == "gelu":
                h = gelu_erf(xt @ w1[expert])
            else:
                h = torch.clamp(xt @ w1[expert], min=0.0)
            out[t] += (top[i] / norm) * (h @ w2[expert])
    if layer.shared_expert is not None:
        s = layer.shared_expert
        up = flat @ s.w_up.weight.detach().double().T
        if s.w_gate is not None:
            h = silu(flat @ s.w_gate.weight.detach().double().T) * up
        else:
            h = gelu_erf(up) if s.activation == "gelu" else torch.clamp(up, min=0.0)
        out = out + h @ s.w_down.weight.detach().double().T
    counts = [0] * e
    for row in chosen:
        for expert in row:
            counts[expert] += 1
    return out.reshape(x.shape), counts, dropped


@pytest.mark.parametrize(
    "e, k, activation, shared, normalize",
    [
        (4, 2, "swiglu", 16, True),
        (4, 2, "swiglu", 0, False),
        (6, 1, "swiglu", 0, True),
        (5, 3, "gelu", 8, True),
    ],
)
def test_moe_layer_equals_naive_loop_dropless(e, k, activation, shared, normalize):
    d, ff = 8, 12
    layer = scaled_layer(7, d, e, k, ff, activation, None, 0.01, 0.0, shared, normalize)
    x = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(8))
    y, _ = layer(x)
    expected, counts, dropped = naive_moe(layer, x)
    assert dropped == 0
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    assert layer.last_stats["tokens_per_expert"].tolist() == counts
    assert layer.last_stats["dropped"] == 0
    assert layer.last_stats["assignments"] == 15 * k


def test_moe_layer_stats_and_output_with_capacity():
    d, ff, e, k, n = 8, 12, 4, 2, 12
    factor = 0.5
    layer = scaled_layer(9, d, e, k, ff, "swiglu", factor, 0.01, 0.001, 0, True)
    with torch.no_grad():  # skew the router so some experts overflow
        layer.router.weight[0] += 2.0
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(10)).abs()
    cap = math.ceil(factor * n * k / e)
    assert cap == 3
    y, aux = layer(x)
    expected, counts, dropped = naive_moe(layer, x, capacity=cap)
    assert dropped > 0  # the case actually exercises dropping
    stats = layer.last_stats
    assert stats["tokens_per_expert"].tolist() == counts
    assert sum(counts) == n * k
    assert stats["dropped"] == dropped == sum(max(0, c - cap) for c in counts)
    assert stats["assignments"] == n * k
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    # aux loss of the layer = balance + z computed from the hand routing
    flat = x.reshape(-1, d).double()
    logits = (flat @ layer.router.weight.detach().double().T).tolist()
    probs = softmax_rows(logits)
    p_mean = [sum(p[i] for p in probs) / n for i in range(e)]
    bal = 0.01 * e * sum(c / (n * k) * p for c, p in zip(counts, p_mean))
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits]
    zl = 0.001 * sum(v * v for v in lse) / n
    assert float(stats["balance_loss"]) == pytest.approx(bal, rel=1e-5)
    assert float(stats["z_loss"]) == pytest.approx(zl, rel=1e-5)
    assert float(aux.detach()) == pytest.approx(bal + zl, rel=1e-5)


def test_moe_layer_gradients_reach_experts_and_router():
    layer = scaled_layer(11, 8, 4, 2, 12, "swiglu", None, 0.01, 0.0, 0, True)
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(12))
    y, aux = layer(x)
    (y.pow(2).sum() + aux).backward()
    counts = layer.last_stats["tokens_per_expert"].tolist()
    for ei, c in enumerate(counts):
        nonzero = bool(layer.experts.w1.grad[ei].abs().sum() > 0)
        assert nonzero == (c > 0)
    assert layer.router.weight.grad is not None and float(layer.router.weight.grad.abs().sum()) > 0


def test_grouped_linear_bf16_uses_grouped_gemm_and_matches_fp32():
    """bf16 expert weights (DeepSpeed's bf16 mode) take the grouped GEMM too; the result equals
    the fp32 per-expert products to bf16 rounding."""
    if not experts_mod._grouped_mm_works("cpu", torch.bfloat16):
        pytest.skip("torch grouped_mm has no bf16 CPU kernel here")
    g = torch.Generator().manual_seed(7)
    counts = torch.tensor([5, 0, 11, 16])
    x32 = torch.randn(int(counts.sum()), 64, generator=g)
    w32 = torch.randn(4, 64, 32, generator=g) / 8
    x, w = x32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    y = grouped_linear(x, w, counts)
    assert y.grad_fn is not None and "GroupedMm" in type(y.grad_fn).__name__
    up = torch.randn(y.shape, generator=g)
    (y.float() * up).sum().backward()
    xr, wr = x.detach().float(), w.detach().float()
    ref = torch.cat([c @ wr[e] for e, c in enumerate(torch.split(xr, counts.tolist()))])
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    gx = torch.cat([u @ wr[e].t() for e, u in enumerate(torch.split(up, counts.tolist()))])
    torch.testing.assert_close(x.grad.float(), gx, atol=3e-2, rtol=2e-2)
    gw = torch.stack([c.t() @ u for c, u in zip(torch.split(xr, counts.tolist()), torch.split(up, counts.tolist()))])
    torch.testing.assert_close(w.grad.float(), gw, atol=6e-2, rtol=2e-2)
