"""Token routing, MoE: route, dispatch, grouped GEMM and combine against a
float64 transcription of the public formulations (GShard's one-hot cumsum
positions and capacity, a per-expert Python loop, Switch / Mixtral's
auxiliary loss), every kernel backend, gradients, opcheck, compile, and
MoEMlp against the dense MLP it was upcycled from."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_clear_error, bad_input_params, kernel_cases

from dynkernels import nn as dnn
from dynkernels import ops

CASES = kernel_cases("moe_dispatch")


def _gshard_official(experts, num_experts, capacity):
    """GShard's top-k dispatch, transcribed loop by loop: slot j's assignments
    placed after every earlier slot's, tokens in order; over capacity: dropped.
    Returns {(t, j): (expert, position)} of the kept assignments."""
    tokens, k = experts.shape
    filled = [0] * num_experts
    where = {}
    for j in range(k):
        for t in range(tokens):
            e = int(experts[t, j])
            if capacity is None or filled[e] < capacity:
                where[(t, j)] = (e, filled[e])
            filled[e] += 1
    return where


def _moe_layer_official(x, experts, weights, w1, b1, w2, b2, capacity):
    """An MoE MLP as a per-expert loop: each kept assignment's token through its
    expert (fc1, GELU, fc2), weighted into the token's output."""
    out = torch.zeros(x.shape[0], w2.shape[2], dtype=x.dtype)
    for (t, j), (e, _) in _gshard_official(experts, w1.shape[0], capacity).items():
        h = torch.nn.functional.gelu(x[t] @ w1[e] + b1[e])
        out[t] += weights[t, j] * (h @ w2[e] + b2[e])
    return out


def _routing(tokens, num_experts, k, skew, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=g, dtype=torch.float64)
    if skew == "one":  # every token's first choice on expert 0
        logits[:, 0] += 100
    elif skew == "zipf":
        logits += -2.0 * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float64))
    elif skew == "empty":  # expert E-1 gets nothing
        logits[:, -1] -= 100
    return logits


ROUTINGS = [
    pytest.param(13, 4, 2, "balanced", None, id="T13-E4-k2"),
    pytest.param(1, 3, 1, "balanced", None, id="T1"),
    pytest.param(20, 5, 2, "empty", None, id="empty-expert"),
    pytest.param(16, 4, 2, "one", None, id="all-on-one"),
    pytest.param(30, 6, 2, "zipf", 4, id="capacity-overflow"),
    pytest.param(16, 4, 1, "one", 3, id="capacity-k1"),
    pytest.param(9, 3, 3, "balanced", 0, id="capacity-0"),
]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("tokens,num_experts,k,skew,capacity", ROUTINGS)
def test_dispatch_equals_gshard_and_the_layer_equals_the_expert_loop(
    device, backend, tokens, num_experts, k, skew, capacity
):
    d, h = 6, 10
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, d, dtype=torch.float64, generator=g)
    weights, experts = ops.moe_route(_routing(tokens, num_experts, k, skew), k)
    rows, plan = ops.moe_dispatch(x, experts, num_experts, capacity=capacity, backend=backend)
    where = _gshard_official(experts, num_experts, capacity)
    n_rows = tokens * k if capacity is None else num_experts * capacity
    assert rows.shape == (n_rows, d) and plan.source.shape == (n_rows,)
    for t in range(tokens):
        for j in range(k):
            row = int(plan.slot_row[t, j])
            if (t, j) not in where:
                assert row == -1
                continue
            e, pos = where[(t, j)]
            assert row == int(plan.offsets[e]) + pos and int(plan.source[row]) == t
            assert torch.equal(rows[row], x[t])
    kept = torch.zeros(num_experts, dtype=torch.int64)
    for e, _ in where.values():
        kept[e] += 1
    assert torch.equal(plan.counts, kept)
    padding = plan.source < 0
    assert int(padding.sum()) == n_rows - len(where) and not rows[padding].any()
    w1, w2 = torch.randn(num_experts, d, h, dtype=torch.float64), torch.randn(num_experts, h, d, dtype=torch.float64)
    b1, b2 = torch.randn(num_experts, h, dtype=torch.float64), torch.randn(num_experts, d, dtype=torch.float64)
    hid = torch.nn.functional.gelu(ops.moe_grouped_mm(rows, w1, plan.offsets, b1, backend=backend))
    y = ops.moe_grouped_mm(hid, w2, plan.offsets, b2, backend=backend)
    out = ops.moe_combine(y, plan, weights, backend=backend)
    expected = _moe_layer_official(x, experts, weights, w1, b1, w2, b2, capacity)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("capacity", [None, 3])
def test_every_backend_gives_the_reference_plan_and_values_within_the_two_times_rule(device, backend, capacity):
    from conftest import assert_close_to_float64

    tokens, d, e, k = 40, 24, 5, 2
    x = torch.randn(tokens, d)
    weights, experts = ops.moe_route(torch.randn(tokens, e), k)
    ref_rows, ref_plan = ops.moe_dispatch(x.double(), experts, e, capacity=capacity, backend="reference")
    rows, plan = ops.moe_dispatch(x, experts, e, capacity=capacity, backend=backend)
    for a, b in zip(plan, ref_plan, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rows, ref_rows.float())
    w = torch.randn(e, d, 20)
    bias = torch.randn(e, 20)
    y = ops.moe_grouped_mm(rows, w, plan.offsets, bias, backend=backend)
    y32 = ops.moe_grouped_mm(rows, w, plan.offsets, bias, backend="reference")
    y64 = ops.moe_grouped_mm(rows.double(), w.double(), plan.offsets, bias.double(), backend="reference")
    assert_close_to_float64(y, y32, y64)
    out = ops.moe_combine(y64.float(), plan, weights, backend=backend)
    out32 = ops.moe_combine(y64.float(), plan, weights, backend="reference")
    out64 = ops.moe_combine(y64, plan, weights.double(), backend="reference")
    assert_close_to_float64(out, out32, out64)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("capacity", [None, 2])
def test_gradients_by_gradcheck(device, backend, capacity):
    tokens, d, h, e, k = 7, 3, 4, 3, 2
    x = torch.randn(tokens, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(e, d, h, dtype=torch.float64, requires_grad=True)
    b = torch.randn(e, h, dtype=torch.float64, requires_grad=True)
    weights, experts = ops.moe_route(_routing(tokens, e, k, "empty"), k)
    weights = weights.detach().requires_grad_()

    def layer(x, w, b, weights):
        rows, plan = ops.moe_dispatch(x, experts, e, capacity=capacity, backend=backend)
        y = ops.moe_grouped_mm(rows, w, plan.offsets, b, backend=backend)
        return ops.moe_combine(y, plan, weights, backend=backend)

    assert torch.autograd.gradcheck(layer, (x, w, b, weights), fast_mode=backend == "triton")


def test_cpp_ops_pass_opcheck_and_the_layer_compiles():
    if not any(c.values[1] == "cpp" for c in CASES):
        pytest.skip("the C++ extension is not built")
    tokens, d, e, k = 12, 8, 4, 2
    x = torch.randn(tokens, d, requires_grad=True)
    weights, experts = ops.moe_route(torch.randn(tokens, e), k)
    lib = torch.ops.dynkernels
    torch.library.opcheck(lib.moe_plan.default, (experts, e, -1))
    torch.library.opcheck(lib.moe_plan.default, (experts, e, 3))
    source, slot_row, offsets, _ = lib.moe_plan(experts, e, -1)
    torch.library.opcheck(lib.moe_gather.default, (x, source, slot_row))
    w = torch.randn(e, d, 5, requires_grad=True)
    bias = torch.randn(e, 5, requires_grad=True)
    rows = x.detach()[source].requires_grad_()
    torch.library.opcheck(lib.moe_grouped_mm.default, (rows, w, offsets, bias))
    torch.library.opcheck(lib.moe_grouped_mm.default, (rows, w, offsets, None))
    y = torch.randn(tokens * k, 5, requires_grad=True)
    torch.library.opcheck(lib.moe_combine.default, (y, slot_row, weights.detach().requires_grad_()))

    def layer(x, w, weights):
        rows, plan = ops.moe_dispatch(x, experts, e)
        return ops.moe_combine(ops.moe_grouped_mm(rows, w, plan.offsets), plan, weights)

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x, w, weights), layer(x, w, weights))


@pytest.mark.triton
def test_triton_ops_pass_opcheck():
    if not any(c.values[1] == "triton" for c in CASES):
        pytest.skip("no Triton backend here")
    tokens, d, e, k = 10, 16, 3, 2
    x = torch.randn(tokens, d, requires_grad=True)
    weights, experts = ops.moe_route(torch.randn(tokens, e), k)
    _, plan = ops.moe_dispatch(x, experts, e, backend="triton")
    lib = torch.ops.dynkernels
    torch.library.opcheck(lib.moe_gather_triton.default, (x, plan.source, plan.slot_row))
    rows = x.detach()[plan.source].requires_grad_()
    w = torch.randn(e, d, 16, requires_grad=True)
    torch.library.opcheck(lib.moe_grouped_mm_triton.default, (rows, w, plan.offsets, torch.randn(e, 16)))
    y = torch.randn(tokens * k, 16, requires_grad=True)
    torch.library.opcheck(lib.moe_combine_triton.default, (y, plan.slot_row, weights.detach().requires_grad_()))


def test_route_is_softmax_top_k_and_the_loss_is_switch_and_mixtral():
    logits = torch.randn(50, 6, dtype=torch.float64)
    weights, experts = ops.moe_route(logits, 2)
    probs = logits.softmax(-1)
    top, idx = probs.topk(2, dim=-1)
    assert torch.equal(experts, idx)
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True))
    w1, e1 = ops.moe_route(logits, 1, normalize=False)  # Switch: the raw probability
    torch.testing.assert_close(w1, top[:, :1])
    # Mixtral (transformers' load_balancing_loss_func): E * sum(mean one-hot over tokens * mean probs)
    one_hot = torch.nn.functional.one_hot(experts, 6).double()  # (T, k, E)
    mixtral = 6 * (one_hot.mean(dim=0) * probs.mean(dim=0)).sum()
    torch.testing.assert_close(ops.load_balancing_loss(probs, experts, 6), mixtral)
    f = torch.bincount(e1[:, 0], minlength=6).double() / 50  # Switch: fraction of tokens per expert
    torch.testing.assert_close(ops.load_balancing_loss(probs, e1, 6), 6 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(
        ops.load_balancing_loss(probs, experts, 6, first_choice_only=True), ops.load_balancing_loss(probs, e1, 6)
    )
    uniform = torch.full((60, 6), 1 / 6, dtype=torch.float64)
    balanced = torch.arange(120).reshape(60, 2) % 6
    torch.testing.assert_close(ops.load_balancing_loss(uniform, balanced, 6), torch.tensor(2.0, dtype=torch.float64))


def test_capacity_factor_is_ceil_of_cf_t_k_over_e():
    assert ops.moe_capacity(100, 2, 8, 1.25) == math.ceil(1.25 * 200 / 8)
    experts = torch.zeros(10, 1, dtype=torch.int64)
    rows, plan = ops.moe_dispatch(torch.randn(10, 4), experts, 4, capacity_factor=1.0)
    assert rows.shape == (4 * 3, 4) and plan.counts.tolist() == [3, 0, 0, 0]
    assert (plan.slot_row[:3, 0] == torch.arange(3)).all() and (plan.slot_row[3:] == -1).all()


# ---- MoEMlp -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_upcycled_moe_mlp_equals_the_dense_mlp(backend):
    timm_layers = pytest.importorskip("timm.layers")
    if backend == "cpp" and not any(c.values[1] == "cpp" for c in CASES):
        pytest.skip("the C++ extension is not built")
    mlp = timm_layers.Mlp(16, 40).double()
    moe = dnn.MoEMlp.from_mlp(mlp, num_experts=4, k=2, backend=backend)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), mlp(x), rtol=1e-12, atol=1e-12)
    assert moe.aux_loss is not None and moe.aux_loss.shape == ()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_moe_mlp_equals_the_expert_loop_in_training(device, backend, capacity_factor):
    torch.manual_seed(3)
    moe = dnn.MoEMlp(8, 12, num_experts=4, k=2, capacity_factor=capacity_factor, backend=backend).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    out = moe(x)
    tokens = x.reshape(-1, 8)
    probs = moe.router(tokens).softmax(-1)
    top, experts = probs.topk(2, dim=-1)
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * 18 * 2 / 4)
    expected = _moe_layer_official(
        tokens,
        experts,
        top / top.sum(-1, keepdim=True),
        moe.fc1_weight,
        moe.fc1_bias,
        moe.fc2_weight,
        moe.fc2_bias,
        capacity,
    )
    torch.testing.assert_close(out.reshape(-1, 8), expected, rtol=1e-12, atol=1e-12)
    (out.square().sum() + moe.aux_loss).backward()
    assert all(p.grad is not None for p in moe.parameters())
    assert copy.deepcopy(moe).aux_loss is None  # the last loss (a graph node) is not copied


def test_apply_moe_patches_every_second_block_and_keeps_the_output():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        patched = dnn.apply_moe(copy.deepcopy(model), 2, num_experts=4, k=2)
        out = patched(x)
    kinds = [type(b.mlp).__name__ for b in patched.blocks]
    assert kinds == ["Mlp", "MoEMlp"] * (len(kinds) // 2)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    assert dnn.moe_aux_loss(patched).shape == ()


BAD = [
    ("k-above-E", lambda: ops.moe_route(torch.randn(4, 3), 4), ValueError, "k must be in"),
    ("k-zero", lambda: ops.moe_route(torch.randn(4, 3), 0), ValueError, "k"),
    (
        "expert-range",
        lambda: ops.moe_dispatch(torch.randn(3, 2), torch.tensor([[0], [5], [1]]), 4),
        IndexError,
        "experts must lie",
    ),
    (
        "experts-dtype",
        lambda: ops.moe_dispatch(torch.randn(3, 2), torch.zeros(3, 1, dtype=torch.int32), 4),
        ValueError,
        "int64",
    ),
    (
        "both-capacities",
        lambda: ops.moe_dispatch(
            torch.randn(3, 2), torch.zeros(3, 1, dtype=torch.int64), 2, capacity=1, capacity_factor=1
        ),
        ValueError,
        "not both",
    ),
    (
        "offsets-sum",
        lambda: ops.moe_grouped_mm(torch.randn(5, 2), torch.randn(2, 2, 3), torch.tensor([0, 2, 4])),
        ValueError,
        "end at the row count 5",
    ),
    (
        "offsets-decrease",
        lambda: ops.moe_grouped_mm(torch.randn(5, 2), torch.randn(2, 2, 3), torch.tensor([0, 6, 5])),
        ValueError,
        "not decrease",
    ),
    (
        "w-shape",
        lambda: ops.moe_grouped_mm(torch.randn(5, 2), torch.randn(2, 3, 3), torch.tensor([0, 2, 5])),
        ValueError,
        "w",
    ),
    (
        "combine-weights",
        lambda: ops.moe_combine(torch.randn(4, 2), torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 3)),
        ValueError,
        "weights must be",
    ),
    (
        "slot-range",
        lambda: ops.moe_combine(torch.randn(4, 2), torch.full((2, 2), 4), torch.ones(2, 2)),
        IndexError,
        "slot_row must lie",
    ),
    ("capacity-factor", lambda: ops.moe_capacity(4, 1, 2, 0.0), ValueError, "capacity_factor"),
    ("mlp-k", lambda: dnn.MoEMlp(4, num_experts=2, k=3), ValueError, "k"),
]


@pytest.mark.parametrize("call,error,match", bad_input_params(BAD))
def test_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)
