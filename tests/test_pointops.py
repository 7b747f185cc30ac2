"""Point ops against their references on every backend usable here."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, TOLERANCES, assert_clear_error, bad_input_params, kernel_cases, requires_cuda

import dynkernels
from dynkernels import ops, reference
from dynkernels.testing import random_cloud, sample_centers

SAMPLE_CASES = kernel_cases("furthest_point_sample")
GATHER_CASES = kernel_cases("grouping_operation")
POINT_DTYPES = [torch.float32, torch.float64]


HALF_TYPES = [torch.float16, torch.bfloat16]


# ---- furthest_point_sample ---------------------------------------------------


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
@pytest.mark.parametrize("dtype", POINT_DTYPES)
@pytest.mark.parametrize(
    "batch,n,m,kind",
    [
        (1, 1, 1, "uniform"),
        (3, 37, 5, "uniform"),
        (2, 1000, 129, "scene"),
        (1, 20011, 301, "uniform"),
        (3, 9001, 257, "scene"),
        (2, 517, 517, "grid"),
    ],
)
def test_fps_matches_reference(device, backend, dtype, batch, n, m, kind):
    xyz = random_cloud(batch, n, kind=kind, dtype=dtype, device=device)
    start = n // 3
    got = ops.furthest_point_sample(xyz, m, start_index=start, backend=backend)
    want = reference.furthest_point_sample(xyz, m, start)
    assert got.dtype == torch.int64 and got.shape == (batch, m)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
def test_fps_duplicates_give_a_permutation(device, backend):
    xyz = random_cloud(2, 300, kind="grid", device=device)  # 216 distinct positions at most
    got = ops.furthest_point_sample(xyz, 300, backend=backend)
    assert torch.equal(got, reference.furthest_point_sample(xyz, 300))
    for row in got:
        assert torch.equal(row.sort().values, torch.arange(300, device=device))


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
def test_fps_half_inputs_use_fp32_distances(device, backend):
    for dtype in HALF_TYPES:
        xyz = random_cloud(2, 700, dtype=dtype, device=device)
        got = ops.furthest_point_sample(xyz, 50, backend=backend)
        assert torch.equal(got, reference.furthest_point_sample(xyz.float(), 50))


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
def test_fps_non_contiguous_nan_and_huge(device, backend):
    xyz = torch.rand(2, 3, 4001, device=device).transpose(1, 2)  # non-contiguous
    assert not xyz.is_contiguous()
    assert torch.equal(ops.furthest_point_sample(xyz, 99, backend=backend), reference.furthest_point_sample(xyz, 99))
    nan = xyz.clone()
    nan[0, 17, 1] = float("nan")
    nan[1, 5] = float("nan")
    got = ops.furthest_point_sample(nan, 60, backend=backend)
    assert torch.equal(got, reference.furthest_point_sample(nan, 60))
    assert 17 in got[0].tolist() and 5 in got[1].tolist()
    huge = xyz * 1e20  # squared distances overflow to +inf
    assert torch.equal(ops.furthest_point_sample(huge, 40, backend=backend), reference.furthest_point_sample(huge, 40))


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
def test_fps_empty_batch_and_zero_samples(device, backend):
    assert ops.furthest_point_sample(torch.rand(0, 10, 3, device=device), 4, backend=backend).shape == (0, 4)
    assert ops.furthest_point_sample(torch.rand(2, 10, 3, device=device), 0, backend=backend).shape == (2, 0)
    one = ops.furthest_point_sample(torch.rand(2, 1, 3, device=device), 1, backend=backend)
    assert torch.equal(one, torch.zeros(2, 1, dtype=torch.int64, device=device))


def test_fps_matches_open3d_and_fpsample():
    o3d = pytest.importorskip("open3d")
    fpsample = pytest.importorskip("fpsample")
    xyz = random_cloud(1, 5000, kind="scene")
    idx = ops.furthest_point_sample(xyz, 300)[0]
    exact = fpsample.fps_sampling(xyz[0].numpy(), 300, start_idx=0)
    assert idx.tolist() == exact.tolist()
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[0].double().numpy()))
    down = torch.from_numpy(__import__("numpy").asarray(pcd.farthest_point_down_sample(300).points)).float()
    assert torch.equal(down.sort(0).values, xyz[0, idx].sort(0).values)


# ---- ball_query -------------------------------------------------------------


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
@pytest.mark.parametrize("dtype", POINT_DTYPES)
@pytest.mark.parametrize(
    "batch,n,m,ns,radius,min_radius",
    [
        (1, 1, 1, 1, 0.1, 0.0),
        (2, 333, 17, 5, 0.2, 0.0),
        (3, 1001, 65, 32, 0.15, 0.05),
        (2, 50, 7, 64, 0.5, 0.0),
        (1, 4099, 129, 17, 0.02, 0.0),
    ],
)
def test_ball_query_matches_reference(device, backend, dtype, batch, n, m, ns, radius, min_radius):
    xyz = random_cloud(batch, n, dtype=dtype, device=device)
    centers = sample_centers(xyz, m) + 0.01
    got = ops.ball_query(xyz, centers, radius, ns, min_radius=min_radius, backend=backend)
    want = reference.ball_query(xyz, centers, radius, ns, min_radius)
    assert got.dtype == torch.int64 and got.shape == (batch, m, ns)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
@pytest.mark.parametrize(
    "kind,radius,min_radius",
    [
        ("scene", 0.3, 0.0),
        ("scene", 0.1, 0.02),
        ("grid", 0.2, 0.1),
        ("uniform", 0.004, 0.0),
        ("scene", 40.0, 0.0),
        ("scene", 1e-30, 0.0),
    ],
)
def test_ball_query_sparse_and_outside_centers(device, backend, kind, radius, min_radius):
    """Clouds of >= 4096 points take the CPU cell grid where balls are sparse;
    centers outside the cloud, far away, or on duplicates must agree too."""
    xyz = random_cloud(2, 6007, kind=kind, device=device)
    centers = torch.cat(
        [sample_centers(xyz, 40), sample_centers(xyz, 9) * 1.5 - 0.4, torch.full((2, 2, 3), 1e6, device=device)], dim=1
    )
    got = ops.ball_query(xyz, centers, radius, 24, min_radius=min_radius, backend=backend)
    assert torch.equal(got, reference.ball_query(xyz, centers, radius, 24, min_radius))
    assert (got[:, -2:] == -1).all()
    nan = xyz.clone()
    nan[1, 100] = float("nan")  # a non-finite cloud never builds a grid
    got = ops.ball_query(nan, centers, radius, 24, min_radius=min_radius, backend=backend)
    assert torch.equal(got, reference.ball_query(nan, centers, radius, 24, min_radius))


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
def test_ball_query_semantics(device, backend):
    xyz = torch.tensor([[[0.0, 0, 0], [0.3, 0, 0], [0.05, 0, 0], [0.0, 0, 0], [5.0, 5, 5]]], device=device)
    centers = torch.tensor([[[0.0, 0, 0], [9.0, 9, 9], [0.3, 0, 0]]], device=device)
    got = ops.ball_query(xyz, centers, 0.3, 4, min_radius=0.1, backend=backend)
    # center 0: points 0 and 3 by d2 == 0 (inside min_radius), point 1 at exactly
    # the radius is out (strict <), point 2 is inside min_radius: [0, 3] padded.
    assert got[0, 0].tolist() == [0, 3, 0, 0]
    assert got[0, 1].tolist() == [-1, -1, -1, -1]  # empty ball: -1, never point 0
    assert got[0, 2].tolist() == [1, 2, 1, 1]  # d2 == 0 and 0.25^2 in [0.01, 0.09)
    assert torch.equal(got, reference.ball_query(xyz, centers, 0.3, 4, 0.1))


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
def test_ball_query_half_and_non_contiguous(device, backend):
    xyz = torch.rand(2, 3, 800, device=device).transpose(1, 2)
    centers = xyz[:, ::16]
    got = ops.ball_query(xyz, centers, 0.2, 16, backend=backend)
    assert torch.equal(got, reference.ball_query(xyz, centers, 0.2, 16))
    for dtype in HALF_TYPES:
        h, c = xyz.to(dtype), centers.to(dtype)
        got = ops.ball_query(h, c, 0.2, 16, backend=backend)
        assert torch.equal(got, reference.ball_query(h.float(), c.float(), 0.2, 16))


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
def test_ball_query_empty(device, backend):
    assert ops.ball_query(
        torch.rand(0, 5, 3, device=device), torch.rand(0, 2, 3, device=device), 0.1, 3, backend=backend
    ).shape == (0, 2, 3)
    none = ops.ball_query(
        torch.rand(2, 0, 3, device=device), torch.rand(2, 4, 3, device=device), 0.1, 3, backend=backend
    )
    assert torch.equal(none, torch.full((2, 4, 3), -1, device=device))


# ---- grouping_operation / gather_points --------------------------------------


def _group_inputs(device, dtype, index_dtype, batch=2, c=7, n=53, m=19, ns=5):
    features = torch.randn(batch, c, n, device=device, dtype=dtype)
    idx = torch.randint(-1, n, (batch, m, ns), device=device, dtype=index_dtype)
    idx[0, 0, :] = 3  # one point used many times
    return features, idx


@pytest.mark.parametrize("device,backend", GATHER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("deterministic", [False, True])
def test_grouping_matches_reference(device, backend, dtype, index_dtype, deterministic):
    features, idx = _group_inputs(device, dtype, index_dtype)
    f_kernel = features.clone().requires_grad_()
    f_ref = features.clone().requires_grad_()
    out = ops.grouping_operation(f_kernel, idx, backend=backend, deterministic=deterministic)
    want = reference.grouping_operation(f_ref, idx)
    assert out.shape == (2, 7, 19, 5) and out.dtype == dtype
    assert torch.equal(out, want)  # a gather is exact
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    # Sums of the same terms; half types accumulate in fp32 in the kernels.
    torch.testing.assert_close(
        f_kernel.grad.double(), _scatter_sum(grad.double(), idx, features.shape[2]), **TOLERANCES[dtype]
    )
    if dtype in (torch.float32, torch.float64) and (deterministic or device == "cpu"):
        assert torch.equal(f_kernel.grad, _scatter_sum(grad, idx, features.shape[2]))


def _scatter_sum(grad: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Gradient of a gather: ascending-k sum per point (the order every
    deterministic backward uses)."""
    batch, c = grad.shape[:2]
    flat_idx = idx.reshape(batch, -1).long()
    flat = grad.reshape(batch, c, -1)
    out = torch.zeros(batch, c, n, dtype=grad.dtype, device=grad.device)
    for k in range(flat_idx.shape[1]):
        rows = flat_idx[:, k]
        ok = rows >= 0
        for b in range(batch):
            if ok[b]:
                out[b, :, rows[b]] += flat[b, :, k]
    return out


@pytest.mark.parametrize("device,backend", GATHER_CASES)
def test_gather_points_matches_reference(device, backend):
    features = torch.randn(3, 41, 5, device=device).transpose(1, 2)  # non-contiguous
    idx = torch.randint(-1, 41, (3, 11), device=device)
    got = ops.gather_points(features, idx, backend=backend)
    assert got.shape == (3, 5, 11)
    assert torch.equal(got, reference.gather_points(features, idx))
    assert torch.equal(got[idx.unsqueeze(1).expand_as(got) < 0], torch.zeros(int((idx < 0).sum()) * 5, device=device))


@pytest.mark.parametrize("device,backend", GATHER_CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_grouping_gradcheck(device, backend, deterministic):
    features, idx = _group_inputs(device, torch.float64, torch.int64, batch=2, c=3, n=11, m=4, ns=3)
    features.requires_grad_()
    fn = lambda f: ops.grouping_operation(f, idx, backend=backend, deterministic=deterministic)
    # Under the Triton interpreter every launch costs ~0.1 s: the fast mode
    # (random projections of the Jacobian) keeps it to seconds.
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(fn, (features,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (features,), fast_mode=fast)
    g = lambda f: ops.gather_points(f, idx[:, :, 0], backend=backend, deterministic=deterministic)
    assert torch.autograd.gradcheck(g, (features,), fast_mode=fast)


def test_grouping_empty_and_all_padding():
    features = torch.randn(2, 4, 0, requires_grad=True)
    idx = torch.full((2, 3, 2), -1)
    for backend in ("cpp", "reference"):
        out = ops.grouping_operation(features, idx, backend=backend)
        assert torch.equal(out, torch.zeros(2, 4, 3, 2))
    assert ops.grouping_operation(torch.randn(0, 4, 5), torch.zeros(0, 3, 2, dtype=torch.long)).shape == (0, 4, 3, 2)


# ---- opcheck and torch.compile ----------------------------------------------


@pytest.mark.parametrize("device,backend", SAMPLE_CASES)
def test_opcheck_sampling_ops(device, backend):
    xyz = random_cloud(2, 301, device=device)
    torch.library.opcheck(torch.ops.dynkernels.furthest_point_sample.default, (xyz, 37, 5))
    torch.library.opcheck(torch.ops.dynkernels.ball_query.default, (xyz, xyz[:, :29].contiguous(), 0.0, 0.2, 8))


@pytest.mark.parametrize("device,backend", GATHER_CASES)
def test_opcheck_gather_ops(device, backend):
    suffix = "_triton" if backend == "triton" else ""
    forward = getattr(torch.ops.dynkernels, "gather_features" + suffix).default
    backward = getattr(torch.ops.dynkernels, "gather_features_backward" + suffix).default
    features = torch.randn(2, 5, 23, device=device, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(-1, 23, (2, 13), device=device)
    for det in (False, True):
        torch.library.opcheck(forward, (features, idx, det))
        torch.library.opcheck(backward, (torch.randn(2, 5, 13, device=device, dtype=torch.float64), idx, 23, det))


@pytest.mark.parametrize("device,backend", GATHER_CASES)
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    sampling = "reference" if backend == "triton" else backend

    def pipeline(xyz, features):
        idx = ops.furthest_point_sample(xyz, 16, backend=sampling)
        centers = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
        nbr = ops.ball_query(xyz, centers, 0.3, 8, backend=sampling)
        grouped = ops.grouping_operation(features, nbr, backend=backend)
        return grouped.amax(-1) + ops.gather_points(features, idx, backend=backend)

    xyz = random_cloud(2, 97, device=device)
    features = torch.randn(2, 6, 97, device=device, requires_grad=True)
    pipeline_eager = pipeline
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    got = compiled(xyz, features)
    want = pipeline_eager(xyz, features)
    assert torch.equal(got, want)
    (g_compiled,) = torch.autograd.grad(got.sum(), features)
    (g_eager,) = torch.autograd.grad(want.sum(), features)
    torch.testing.assert_close(g_compiled, g_eager)


def test_compile_dynamic_batch_compiles_once():
    """Shape-generic fakes and checks: torch.compile(dynamic=True) over three
    batch sizes builds one graph, and mark_dynamic on the batch holds (the
    batch check used to hash the sizes, which specialised them)."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def pipeline(xyz, features):
        idx = ops.furthest_point_sample(xyz, 16)
        centers = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
        nbr = ops.ball_query(xyz, centers, 0.3, 8)
        dist, near = ops.knn(xyz, centers, 4)
        return ops.grouping_operation(features, nbr).sum() + dist.sum() + near.sum()

    compiled = torch.compile(pipeline, backend=counting, dynamic=True)
    for batch in (2, 3, 5):
        xyz, features = random_cloud(batch, 64), torch.randn(batch, 4, 64)
        assert torch.equal(compiled(xyz, features), pipeline(xyz, features))
    assert len(graphs) == 1
    torch._dynamo.reset()
    graphs.clear()
    xyz, features = random_cloud(2, 64), torch.randn(2, 4, 64)
    torch._dynamo.mark_dynamic(xyz, 0)
    torch._dynamo.mark_dynamic(features, 0)
    torch.compile(pipeline, backend=counting)(xyz, features)  # raised ConstraintViolationError before
    assert len(graphs) == 1


# ---- bad inputs ------------------------------------------------------------


def _bad_module_and_io_cases():
    from dynkernels import io
    from dynkernels import nn as dnn

    xyz = random_cloud(2, 64)
    centers = xyz[:, :16].contiguous()
    group = dnn.QueryAndGroup(0.3, 8)
    return [
        (
            "features with N + 1 points",
            lambda: group(xyz, centers, torch.randn(2, 5, 65)),
            ValueError,
            r"features must be \(B, C, N\)",
        ),
        (
            "features with N - 10 points",
            lambda: group(xyz, centers, torch.randn(2, 5, 54)),
            ValueError,
            r"features must be \(B, C, N\)",
        ),
        (
            "features (B, N, C)",
            lambda: group(xyz, centers, torch.randn(2, 64, 5)),
            ValueError,
            r"features must be \(B, C, N\)",
        ),
        ("module backend unknown", lambda: dnn.QueryAndGroup(0.3, 8, backend="gpu"), ValueError, "backend must be"),
        ("module radius", lambda: dnn.QueryAndGroup(-0.3, 8), ValueError, "min_radius < radius"),
        (
            "colors outside [0, 1]",
            lambda: io.to_open3d(torch.rand(4, 3), torch.full((4, 3), 7.0)),
            ValueError,
            r"colors must lie in \[0, 1\]",
        ),
        ("numpy points", lambda: io.to_open3d(torch.rand(4, 3).numpy()), TypeError, "xyz must be a torch.Tensor"),
        (
            "write an empty cloud",
            lambda: io.write_points("/tmp/dk-empty.ply", torch.zeros(0, 3)),
            ValueError,
            "no points",
        ),
        (
            "write into no folder",
            lambda: io.write_points("/nonexistent-dk/a.ply", torch.zeros(2, 3)),
            OSError,
            "does not exist",
        ),
        ("module num_samples", lambda: dnn.QueryAndGroup(0.3, 0), ValueError, "num_samples"),
    ]


@pytest.mark.parametrize("call,error,match", bad_input_params(_bad_module_and_io_cases()))
def test_module_and_io_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)


def test_query_and_group_with_backend_triton_queries_on_auto():
    """ball query has no Triton kernel: the module's backend goes to the ops that have it."""
    from dynkernels import nn as dnn

    if "triton" not in [c.values[1] for c in kernel_cases("grouping_operation")]:
        pytest.skip("triton is not usable here")
    xyz = random_cloud(2, 64)
    centers, features = xyz[:, :16].contiguous(), torch.randn(2, 5, 64)
    want = dnn.QueryAndGroup(0.3, 8, backend="reference")(xyz, centers, features)
    assert torch.equal(dnn.QueryAndGroup(0.3, 8, backend="triton")(xyz, centers, features), want)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: ops.furthest_point_sample(torch.rand(10, 3), 2), ValueError, r"\(B, N, 3\)"),
        (lambda: ops.furthest_point_sample(torch.rand(1, 10, 2), 2), ValueError, r"\(B, N, 3\)"),
        (lambda: ops.furthest_point_sample(torch.ones(1, 10, 3, dtype=torch.int32), 2), TypeError, "floating"),
        (lambda: ops.furthest_point_sample(torch.rand(1, 10, 3), 11), ValueError, "num_points"),
        (lambda: ops.furthest_point_sample(torch.rand(1, 10, 3), -1), ValueError, "num_points"),
        (lambda: ops.furthest_point_sample(torch.rand(1, 10, 3), 2.0), TypeError, "num_points"),
        (lambda: ops.furthest_point_sample(torch.rand(1, 10, 3), 2, start_index=10), ValueError, "start_index"),
        (lambda: ops.furthest_point_sample([[0.0, 0.0, 0.0]], 1), TypeError, "torch.Tensor"),
        (lambda: ops.furthest_point_sample(torch.rand(1, 10, 3), 2, backend="fast"), ValueError, "unknown backend"),
        (lambda: ops.furthest_point_sample(torch.rand(1, 10, 3), 2, backend="cuda"), ValueError, "CUDA tensors"),
        (lambda: ops.furthest_point_sample(torch.rand(1, 10, 3), 2, backend="triton"), ValueError, "not implemented"),
        (lambda: ops.ball_query(torch.rand(2, 10, 3), torch.rand(3, 4, 3), 0.1, 4), ValueError, "batch sizes"),
        (lambda: ops.ball_query(torch.rand(2, 10, 3), torch.rand(2, 4, 3), 0.0, 4), ValueError, "radius"),
        (lambda: ops.ball_query(torch.rand(2, 10, 3), torch.rand(2, 4, 3), -1.0, 4), ValueError, "radius"),
        (
            lambda: ops.ball_query(torch.rand(2, 10, 3), torch.rand(2, 4, 3), 0.1, 4, min_radius=0.2),
            ValueError,
            "min_radius",
        ),
        (lambda: ops.ball_query(torch.rand(2, 10, 3), torch.rand(2, 4, 3), 0.1, 0), ValueError, "num_samples"),
        (lambda: ops.ball_query(torch.rand(2, 10, 3), torch.rand(2, 4, 3).double(), 0.1, 2), TypeError, "dtype"),
        (
            lambda: ops.ball_query(torch.rand(2, 10, 3), torch.rand(2, 4, 3, device="meta"), 0.1, 2),
            ValueError,
            "one device",
        ),
        (
            lambda: ops.grouping_operation(torch.rand(2, 3, 10), torch.zeros(2, 4, dtype=torch.long)),
            ValueError,
            r"\(B, M, ns\)",
        ),
        (lambda: ops.grouping_operation(torch.rand(2, 3, 10), torch.zeros(2, 4, 2)), TypeError, "int32 or int64"),
        (lambda: ops.grouping_operation(torch.rand(2, 3, 10), torch.full((2, 4, 2), 10)), IndexError, r"\[-1, 10\)"),
        (lambda: ops.grouping_operation(torch.rand(2, 3, 10), torch.full((2, 4, 2), -2)), IndexError, r"\[-1, 10\)"),
        (
            lambda: ops.grouping_operation(
                torch.ones(2, 3, 10, dtype=torch.long), torch.zeros(2, 4, 2, dtype=torch.long)
            ),
            TypeError,
            "floating",
        ),
        (lambda: ops.gather_points(torch.rand(2, 3, 10), torch.zeros(3, 4, dtype=torch.long)), ValueError, "batch"),
        (
            lambda: ops.gather_points(torch.rand(2, 3, 10, device="meta"), torch.zeros(2, 4, dtype=torch.long)),
            ValueError,
            "one device",
        ),
    ],
)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_kernel_index_check_without_python_validation():
    """The C++ kernel checks ranges itself when called through torch.ops."""
    with pytest.raises(IndexError, match=r"must hold indices in \[-1, 5\), got 5"):
        torch.ops.dynkernels.gather_features(torch.rand(1, 2, 5), torch.tensor([[0, 5]]), False)
    with pytest.raises(RuntimeError, match="num_points"):
        torch.ops.dynkernels.furthest_point_sample(torch.rand(1, 5, 3), 6, 0)


@requires_cuda
def test_cpu_cuda_mix_raises():
    with pytest.raises(ValueError, match="one device"):
        ops.ball_query(torch.rand(1, 5, 3), torch.rand(1, 2, 3, device="cuda"), 0.1, 2)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dynkernels.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.gather_points(torch.rand(1, 2, 5), torch.zeros(1, 3, dtype=torch.long), backend="triton")


# ---- module ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_query_and_group_module(device):
    xyz = random_cloud(2, 300, device=device)
    centers = sample_centers(xyz, 20)
    features = torch.randn(2, 4, 300, device=device)
    module = dynkernels.nn.QueryAndGroup(0.2, 8)
    out = module(xyz, centers, features)
    ref = dynkernels.nn.QueryAndGroup(0.2, 8, backend="reference")(xyz, centers, features)
    assert out.shape == (2, 7, 20, 8)
    assert torch.equal(out, ref)
    idx = reference.ball_query(xyz, centers, 0.2, 8)
    want_xyz = reference.grouping_operation(xyz.transpose(1, 2), idx) - centers.transpose(1, 2).unsqueeze(-1)
    assert torch.equal(out[:, :3], torch.where(idx.unsqueeze(1) >= 0, want_xyz, 0.0))
    assert "radius=0.2" in repr(module)
