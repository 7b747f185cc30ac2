"""The neighbour ops of the pointops family (knn, three_nn,
three_interpolate) against their references on every backend usable here."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_close_to_float64, kernel_cases

from dynkernels import ops, reference
from dynkernels.testing import random_cloud, sample_centers

NEIGHBOUR_CASES = kernel_cases("knn")


# ---- knn --------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", NEIGHBOUR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "batch,n,m,k,kind",
    [
        (1, 1, 1, 1, "uniform"),
        (2, 37, 5, 7, "uniform"),
        (3, 1001, 65, 16, "scene"),
        (2, 777, 33, 64, "grid"),  # duplicates: ties go to the lower index
        (1, 5003, 129, 3, "scene"),
        (2, 300, 11, 300, "uniform"),  # k == N
    ],
)
def test_knn_matches_reference(device, backend, dtype, batch, n, m, k, kind):
    xyz = random_cloud(batch, n, kind=kind, dtype=dtype, device=device)
    centers = sample_centers(xyz, m) + 0.003
    dist, idx = ops.knn(xyz, centers, k, backend=backend)
    want_dist, want_idx = reference.knn(xyz, centers, k)
    assert idx.dtype == torch.int64 and idx.shape == (batch, m, k)
    assert dist.dtype == want_dist.dtype
    assert torch.equal(idx, want_idx)
    assert torch.equal(dist, want_dist)


@pytest.mark.parametrize("device,backend", NEIGHBOUR_CASES)
def test_knn_nan_half_and_non_contiguous(device, backend):
    xyz = torch.rand(2, 3, 901, device=device).transpose(1, 2)
    xyz[0, 5, 0] = float("nan")
    centers = xyz[:, :40].clone()
    dist, idx = ops.knn(xyz, centers, 9, backend=backend)
    want_dist, want_idx = reference.knn(xyz, centers, 9)
    assert torch.equal(idx, want_idx)
    assert torch.equal(dist.isnan(), want_dist.isnan())
    assert idx[0, 5, 0].item() == 0 or dist[0, 5].isnan().all()  # a NaN center ranks every point as NaN: lowest indices
    half = random_cloud(1, 500, dtype=torch.float16, device=device)
    d16, i16 = ops.knn(half, half[:, :20], 5, backend=backend)
    assert d16.dtype == torch.float32
    assert torch.equal(i16, reference.knn(half.float(), half[:, :20].float(), 5)[1])


def test_knn_matches_open3d():
    o3d = pytest.importorskip("open3d")
    xyz = random_cloud(1, 4000, kind="scene", dtype=torch.float64)
    centers = sample_centers(xyz, 50) + 0.01
    dist, idx = ops.knn(xyz, centers, 12)
    tree = o3d.geometry.KDTreeFlann(o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[0].numpy())))
    for m in range(50):
        _, found, d2 = tree.search_knn_vector_3d(centers[0, m].numpy(), 12)
        assert sorted(found) == sorted(idx[0, m].tolist())
        assert torch.allclose(dist[0, m], torch.tensor(sorted(d2), dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_knn_bad_inputs():
    xyz = torch.rand(2, 10, 3)
    with pytest.raises(ValueError, match="k must be in"):
        ops.knn(xyz, xyz, 11)
    with pytest.raises(ValueError, match="k must be in"):
        ops.knn(xyz, xyz, 0)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.knn(xyz, xyz.double(), 3)
    with pytest.raises(ValueError, match="batch sizes"):
        ops.knn(xyz, xyz[:1], 3)
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        ops.knn(torch.rand(2, 10, 2), xyz, 3)


# ---- three_nn / three_interpolate ------------------------------------------------


@pytest.mark.parametrize("device,backend", NEIGHBOUR_CASES)
@pytest.mark.parametrize("m", [1, 2, 3, 257])
def test_three_nn_matches_reference(device, backend, m):
    target = random_cloud(2, 301, device=device)
    source = random_cloud(2, m, device=device)
    dist, idx = ops.three_nn(target, source, backend=backend)
    want_dist, want_idx = reference.three_nn(target, source)
    assert torch.equal(idx, want_idx) and torch.equal(dist, want_dist)
    if m < 3:  # mmcv: missing neighbours are index 0 at distance inf
        assert torch.isinf(dist[..., m:]).all() and (idx[..., m:] == 0).all()
    with pytest.raises(ValueError, match="at least one source point"):
        ops.three_nn(target, source[:, :0], backend=backend)


def _interp_inputs(device, dtype, batch=2, channels=5, m=41, n=67, idx_dtype=torch.int64):
    features = torch.randn(batch, channels, m, dtype=dtype, device=device)
    idx = torch.randint(0, m, (batch, n, 3), device=device).to(idx_dtype)
    weight = torch.rand(batch, n, 3, dtype=dtype, device=device)
    return features, idx, weight / weight.sum(-1, keepdim=True)


@pytest.mark.parametrize("device,backend", NEIGHBOUR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_three_interpolate_matches_reference(device, backend, dtype, idx_dtype):
    features, idx, weight = _interp_inputs(device, dtype, idx_dtype=idx_dtype)
    got = ops.three_interpolate(features, idx, weight, backend=backend)
    torch.testing.assert_close(got, reference.three_interpolate(features, idx, weight), **TOLERANCES[dtype])


@pytest.mark.parametrize("device,backend", NEIGHBOUR_CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_three_interpolate_gradcheck(device, backend, deterministic):
    features, idx, weight = _interp_inputs(device, torch.float64, channels=3, m=9, n=11)
    features.requires_grad_(True)
    weight.requires_grad_(True)
    fn = lambda f, w: ops.three_interpolate(f, idx, w, deterministic=deterministic, backend=backend)
    assert torch.autograd.gradcheck(fn, (features, weight))


@pytest.mark.parametrize("device,backend", NEIGHBOUR_CASES)
def test_three_interpolate_half_within_twice_torch_error(device, backend):
    for dtype in (torch.float16, torch.bfloat16):
        features, idx, weight = _interp_inputs(device, dtype, channels=16, m=300, n=400)
        exact = reference.three_interpolate(features.double(), idx, weight.double())
        ours = ops.three_interpolate(features, idx, weight, backend=backend)
        assert_close_to_float64(ours, reference.three_interpolate(features, idx, weight), exact)


def test_three_interpolate_bad_inputs():
    features, idx, weight = _interp_inputs("cpu", torch.float32)
    with pytest.raises(IndexError, match=r"\[0, 41\)"):
        ops.three_interpolate(features, idx.clone().fill_(41), weight)
    with pytest.raises(IndexError):
        ops.three_interpolate(features, idx.clone().fill_(-1), weight)
    with pytest.raises(TypeError, match="weight must have"):
        ops.three_interpolate(features, idx, weight.double())
    with pytest.raises(ValueError, match=r"\(B, n, 3\)"):
        ops.three_interpolate(features, idx[..., :2], weight[..., :2])


# ---- coordinate_refinement ---------------------------------------------------------


def test_opcheck_neighbour_ops():
    xyz = random_cloud(2, 200)
    torch.library.opcheck(torch.ops.dynkernels.knn.default, (xyz, xyz[:, :9].contiguous(), 5))
    features, idx, weight = _interp_inputs("cpu", torch.float64, channels=3, m=9, n=11)
    torch.library.opcheck(
        torch.ops.dynkernels.three_interpolate.default, (features.requires_grad_(True), idx, weight, False)
    )
    # a weight that requires grad too (issue 12: test_aot_dispatch_dynamic used to fail on it)
    torch.library.opcheck(
        torch.ops.dynkernels.three_interpolate.default, (features, idx, weight.clone().requires_grad_(True), False)
    )
