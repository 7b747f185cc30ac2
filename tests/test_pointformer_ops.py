"""Pointformer's ops (coordinate_refinement, local attention) against their
references on every backend usable here."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOLERANCES, assert_close_to_float64, kernel_cases

from dynkernels import ops, reference
from dynkernels.testing import random_cloud, sample_centers

REFINE_CASES = kernel_cases("coordinate_refinement")
ATTENTION_CASES = kernel_cases("local_attention")


def _refine_inputs(device, dtype, batch=2, m=7, heads=3, s=11, rows=None):
    attn = torch.rand(batch, m, heads, rows or s, s, dtype=dtype, device=device).softmax(-1)
    xyz = random_cloud(batch, 400, dtype=dtype, device=device)
    centers = sample_centers(xyz, m)
    idx = ops.ball_query(xyz, centers, 0.3, s, backend="reference")
    grouped = reference.grouping_operation(xyz.transpose(1, 2).contiguous(), idx)
    return attn, grouped, centers


@pytest.mark.parametrize("device,backend", REFINE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("row", ["centroid", "first", "mean", "tensor"])
def test_coordinate_refinement_matches_reference(device, backend, dtype, row):
    attn, grouped, centers = _refine_inputs(device, dtype)
    if row == "tensor":
        row = torch.randint(-1, attn.shape[3], attn.shape[:2], device=device)
    got = ops.coordinate_refinement(attn, grouped, row=row, centers=centers, backend=backend)
    want = ops.coordinate_refinement(attn, grouped, row=row, centers=centers, backend="reference")
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    # a convex combination of the group: inside its bounding box
    lo, hi = grouped.amin(-1).transpose(1, 2), grouped.amax(-1).transpose(1, 2)
    assert (got >= lo - 1e-5).all() and (got <= hi + 1e-5).all()


def test_centroid_row_finds_the_center():
    attn, grouped, centers = _refine_inputs("cpu", torch.float32, s=64)
    rows = ops.centroid_row_index(grouped, centers)
    for b, m in [(0, 0), (1, 3)]:
        r = int(rows[b, m])
        if r >= 0:
            assert torch.equal(grouped[b, :, m, r], centers[b, m])
            assert not (grouped[b, :, m, :r] == centers[b, m][:, None]).all(0).any()


@pytest.mark.parametrize("device,backend", REFINE_CASES)
def test_coordinate_refinement_gradcheck(device, backend):
    attn, grouped, centers = _refine_inputs(device, torch.float64, m=3, heads=2, s=5)
    attn.requires_grad_(True)
    grouped.requires_grad_(True)
    # the row is fixed beforehand: "centroid" matching is a step function of grouped_xyz
    centroid = ops.centroid_row_index(grouped.detach(), centers)
    for row in (centroid, "mean", "first"):
        fn = lambda a, g, row=row: ops.coordinate_refinement(a, g, row=row, backend=backend)
        assert torch.autograd.gradcheck(fn, (attn, grouped))


def test_coordinate_refinement_bad_inputs():
    attn, grouped, centers = _refine_inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match="needs centers"):
        ops.coordinate_refinement(attn, grouped, row="centroid")
    with pytest.raises(ValueError, match="row must be one of"):
        ops.coordinate_refinement(attn, grouped, row="last")
    with pytest.raises(TypeError, match="share a dtype"):
        ops.coordinate_refinement(attn.double(), grouped, row="first")
    with pytest.raises(ValueError, match=r"\(B, M, H, R, S\)"):
        ops.coordinate_refinement(attn[..., :3], grouped, row="first")
    with pytest.raises(IndexError):
        ops.coordinate_refinement(attn, grouped, row=torch.full(attn.shape[:2], 99))
    with pytest.raises(ValueError, match="one attention row per grouped point"):
        ops.coordinate_refinement(attn[:, :, :, :1], grouped, row="centroid", centers=centers)


# ---- local attention -------------------------------------------------------------


def _qkv(device, dtype, g=6, h=3, s=37, d=8, requires_grad=False):
    return [torch.randn(g, h, s, d, dtype=dtype, device=device, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("device,backend", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("s,d", [(37, 8), (64, 16), (16, 32), (9, 5), (1, 8)])
def test_local_attention_matches_reference(device, backend, dtype, s, d):
    q, k, v = _qkv(device, dtype, s=s, d=d, requires_grad=True)
    rows = torch.tensor([0, s - 1, -1, s // 2, -1, 0], device=device)
    out, w = ops.local_attention(q, k, v, row_index=rows, backend=backend)
    ref_out, ref_w = reference.local_attention(q, k, v, rows)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(w, ref_w, **tol)
    g_out, g_w = torch.randn_like(out), torch.randn_like(w)
    grads = torch.autograd.grad((out * g_out).sum() + (w * g_w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * g_out).sum() + (ref_w * g_w).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


@pytest.mark.parametrize("device,backend", ATTENTION_CASES)
def test_local_attention_gradcheck(device, backend):
    q, k, v = _qkv(device, torch.float64, g=3, h=2, s=5, d=4, requires_grad=True)
    rows = torch.tensor([1, -1, 4], device=device)
    fast = backend == "triton" and device == "cpu"  # the interpreter runs each launch slowly
    fn = lambda a, b, c: ops.local_attention(a, b, c, row_index=rows, backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=fast)
    no_rows = lambda a, b, c: ops.local_attention(a, b, c, backend=backend)[0]
    assert torch.autograd.gradcheck(no_rows, (q, k, v), fast_mode=fast)


@pytest.mark.parametrize("device,backend", ATTENTION_CASES)
def test_local_attention_packed_matches_split(device, backend):
    g, s, heads, d = 3, 7, 2, 4
    qkv = torch.randn(g, s, 3 * heads * d, dtype=torch.float64, device=device, requires_grad=True)
    rows = torch.randint(-1, s, (g,), device=device)
    out, w = ops.local_attention_packed(qkv, heads, row_index=rows, backend=backend)
    q, k, v = qkv.view(g, s, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    ref_out, ref_w = reference.local_attention(q, k, v, rows)
    torch.testing.assert_close(out, ref_out.transpose(1, 2).reshape(g, s, heads * d))
    torch.testing.assert_close(w, ref_w)
    fn = lambda t: ops.local_attention_packed(t, heads, row_index=rows, backend=backend)
    assert torch.autograd.gradcheck(fn, (qkv,), fast_mode=backend == "triton" and device == "cpu")


def test_local_attention_half_computes_in_fp32():
    q, k, v = _qkv("cpu", torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
        exact, _ = reference.local_attention(qh.double(), kh.double(), vh.double())
        ours = ops.local_attention(qh, kh, vh, backend="cpp")[0]
        assert_close_to_float64(ours, reference.local_attention(qh, kh, vh)[0], exact)


def test_local_attention_bad_inputs():
    q, k, v = _qkv("cpu", torch.float32)
    with pytest.raises(ValueError, match="share one shape"):
        ops.local_attention(q, k[:, :, :5], v)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.local_attention(q, k.double(), v)
    with pytest.raises(IndexError):
        ops.local_attention(q, k, v, row_index=torch.full((6,), 37))
    with pytest.raises(ValueError, match=r"\(G,\)"):
        ops.local_attention(q, k, v, row_index=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="3 \\* heads"):
        ops.local_attention_packed(torch.rand(2, 3, 10), 4)
    if "triton" in [c.values[1] for c in ATTENTION_CASES]:
        big = torch.rand(1, 1, 65, 8)
        with pytest.raises(ValueError, match="S <= 64"):
            ops.local_attention(big, big, big, backend="triton")


# ---- opcheck and torch.compile ------------------------------------------------------


def test_opcheck_pointformer_ops():
    attn, grouped, _ = _refine_inputs("cpu", torch.float64, m=3, heads=2, s=5)
    rows = torch.tensor([[0, -1, 4], [2, 2, -1]])
    torch.library.opcheck(
        torch.ops.dynkernels.coordinate_refinement.default,
        (attn.requires_grad_(True), grouped.requires_grad_(True), rows),
    )
    q, k, v = _qkv("cpu", torch.float64, g=3, h=2, s=5, d=4, requires_grad=True)
    torch.library.opcheck(torch.ops.dynkernels.local_attention.default, (q, k, v, torch.tensor([0, -1, 3])))
    qkv = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.dynkernels.local_attention_packed.default, (qkv, 2, torch.tensor([0, -1, 3])))


def test_compile_fullgraph():
    # The Pointformer pipeline's op mix: the pointops family's knn and three_interpolate, then local attention.
    xyz = random_cloud(2, 500)
    features = torch.randn(2, 5, 500)
    weight = torch.rand(2, 60, 3)

    def pipeline(xyz, features, weight, qkv):
        d2, nn_idx = ops.knn(xyz, xyz[:, :60], 3)
        out = ops.three_interpolate(features, nn_idx, weight)
        attn_out, w = ops.local_attention_packed(qkv, 2, row_index=torch.zeros(qkv.shape[0], dtype=torch.int64))
        return out, d2, attn_out, w

    qkv = torch.randn(4, 9, 48)
    eager = pipeline(xyz, features, weight, qkv)
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")(xyz, features, weight, qkv)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.triton
def test_compile_triton_attention():
    if "triton" not in [c.values[1] for c in ATTENTION_CASES]:
        pytest.skip("triton unavailable")
    q, k, v = _qkv(ATTENTION_CASES[0].values[0], torch.float32, s=16)
    rows = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    fn = lambda a, b, c: ops.local_attention(a, b, c, row_index=rows, backend="triton")
    eager = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(eager, compiled)


def test_local_attention_scale_is_mha_scale():
    q, k, v = _qkv("cpu", torch.float64, s=4, d=9)
    out, _ = ops.local_attention(q, k, v)
    probs = (q * math.sqrt(1.0 / 9) @ k.transpose(-1, -2)).softmax(-1)
    torch.testing.assert_close(out, probs @ v)
