"""The shared segment / scatter substrate (dynkernels.ops.segment): every
kernel held to torch's index_add_ / scatter_reduce and to a sorted
reference written here, gradients by gradcheck in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import HALF_DTYPES, assert_close_to_float64, kernel_cases

from dynkernels import ops, reference

REDUCTIONS = ("sum", "mean", "max")


def _index(m: int, segments: int, g: torch.Generator, device: str) -> torch.Tensor:
    """Indices with empty segments, -1 and an out-of-range entry mixed in."""
    index = torch.randint(0, max(segments - 2, 1), (m,), generator=g)  # the last two segments stay empty
    if m > 3:
        index[1], index[3] = -1, segments + 5
    return index.to(device)


def _sorted_reference(src: torch.Tensor, offsets: torch.Tensor, reduce: str) -> torch.Tensor:
    """Segment by segment, as the definition reads: rows offsets[s] .. offsets[s + 1] - 1."""
    out = []
    for s in range(offsets.numel() - 1):
        rows = src[int(offsets[s]) : int(offsets[s + 1])]
        if rows.shape[0] == 0:
            out.append(torch.zeros_like(src[0]))
        elif reduce == "sum":
            out.append(rows.sum(0))
        elif reduce == "mean":
            out.append(rows.mean(0))
        else:
            out.append(rows.amax(0))
    return torch.stack(out)


@pytest.mark.parametrize("device,backend", kernel_cases("scatter_add"))
@pytest.mark.parametrize("deterministic", [True, False])
def test_scatter_add_matches_index_add(device, backend, deterministic):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64) + (HALF_DTYPES if backend == "cpp" or device == "cuda" else ()):
        src = torch.randn(300, 3, 5, generator=g, dtype=torch.float64)
        index = _index(300, 9, g, device)
        truth = reference.scatter_add(src.to(device), index, 9)
        same = reference.scatter_add(src.to(device, dtype), index, 9)  # torch.index_add_ in dtype
        out = ops.scatter_add(src.to(device, dtype), index, 9, deterministic=deterministic, backend=backend)
        assert out.dtype == dtype and out.shape == (9, 3, 5)
        assert_close_to_float64(out, same, truth)
        assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))  # empty segments


@pytest.mark.parametrize("device,backend", kernel_cases("scatter_reduce"))
def test_scatter_reduce_matches_torch(device, backend):
    g = torch.Generator().manual_seed(2)
    src = torch.randn(257, 7, generator=g, dtype=torch.float64)
    src[10:20] = src[0]  # ties for max
    index = _index(257, 12, g, "cpu")
    index[10:20] = index[0]
    src[5, 2] = float("nan")  # NaN propagates through max
    for dtype in (torch.float32, torch.float64):
        for reduce in REDUCTIONS:
            x = src.to(device, dtype)
            truth = reference.scatter_reduce(src.to(device), index.to(device), 12, reduce)
            same = reference.scatter_reduce(x, index.to(device), 12, reduce)
            out = ops.scatter_reduce(x, index.to(device), 12, reduce, backend=backend)
            nan = truth.isnan()
            assert torch.equal(out.isnan(), nan), reduce
            if reduce == "max":  # a maximum is one of the inputs: exact
                assert torch.equal(torch.where(nan, 0, out), torch.where(nan, 0, same))
            else:
                assert_close_to_float64(torch.where(nan, 0, out), torch.where(nan, 0, same), torch.where(nan, 0, truth))


@pytest.mark.parametrize("device,backend", kernel_cases("segment_reduce"))
def test_segment_reduce_matches_the_sorted_reference(device, backend):
    g = torch.Generator().manual_seed(3)
    src = torch.randn(90, 130, generator=g, dtype=torch.float64)  # 130 columns: more than one column block
    # rows 0-4 before the first segment, 80-89 after the last; empty segments between
    offsets = torch.tensor([5, 5, 17, 17, 18, 60, 80, 80])
    perm = torch.randperm(90, generator=g)
    for reduce in REDUCTIONS:
        want = _sorted_reference(src, offsets, reduce)
        out = ops.segment_reduce(src.to(device), offsets.to(device), reduce, backend=backend)
        torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(reference.segment_reduce(src, offsets, reduce), want, rtol=1e-12, atol=1e-12)
        # through a permutation: the rows read in place, in perm's order
        want = _sorted_reference(src[perm], offsets, reduce)
        out = ops.segment_reduce(src.to(device), offsets.to(device), reduce, perm=perm.to(device), backend=backend)
        torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)


def test_sort_segments_is_a_stable_sort_with_counts():
    g = torch.Generator().manual_seed(4)
    keys = _index(200, 10, g, "cpu").int()
    segments = ops.sort_segments(keys, 10)
    kept = (keys >= 0) & (keys < 10)
    bounded = torch.where(kept, keys.long(), 10)
    assert torch.equal(segments.perm, torch.sort(bounded, stable=True).indices)
    assert torch.equal(segments.counts, torch.bincount(keys[kept].long(), minlength=10))
    assert int(segments.offsets[0]) == 0 and int(segments.offsets[-1]) == int(kept.sum())
    # the sorted keys read back segment by segment
    ids = ops.segment_ids(segments.offsets, keys.shape[0])
    assert torch.equal(ids, bounded[segments.perm])


def test_gather_rows_reads_zero_rows_for_dropped_entries():
    src = torch.arange(12.0).view(4, 3)
    out = ops.gather_rows(src, torch.tensor([2, -1, 0, 4, 3]))
    assert torch.equal(out, torch.stack([src[2], torch.zeros(3), src[0], torch.zeros(3), src[3]]))


@pytest.mark.parametrize("device,backend", kernel_cases("scatter_reduce"))
def test_gradients_by_gradcheck(device, backend):
    g = torch.Generator().manual_seed(5)
    src = torch.randn(23, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    index = _index(23, 6, g, device)
    offsets = torch.tensor([1, 4, 4, 11, 20], device=device)
    fast = dict(fast_mode=backend == "triton")
    perm = torch.randperm(23, generator=g).to(device)
    for reduce in REDUCTIONS:  # distinct values: max is differentiable
        torch.autograd.gradcheck(
            lambda x, r=reduce: ops.scatter_reduce(x, index, 6, r, backend=backend), (src,), **fast
        )
        torch.autograd.gradcheck(lambda x, r=reduce: ops.segment_reduce(x, offsets, r, backend=backend), (src,), **fast)
        torch.autograd.gradcheck(
            lambda x, r=reduce: ops.segment_reduce(x, offsets, r, perm=perm, backend=backend), (src,), **fast
        )
    for deterministic in (True, False):
        torch.autograd.gradcheck(
            lambda x, d=deterministic: ops.scatter_add(x, index, 6, deterministic=d, backend=backend), (src,), **fast
        )
    torch.autograd.gradgradcheck(lambda x: ops.scatter_add(x, index, 6, backend=backend), (src,), **fast)


@pytest.mark.parametrize("device,backend", kernel_cases("scatter_reduce"))
def test_max_gradient_is_shared_among_ties_as_torch_shares_it(device, backend):
    src = torch.tensor([[1.0], [3.0], [3.0], [2.0], [3.0], [5.0]], dtype=torch.float64, device=device)
    index = torch.tensor([0, 0, 0, 1, 0, 1], device=device)
    grads = []
    for b in ("reference", backend):
        x = src.clone().requires_grad_()
        ops.scatter_reduce(x, index, 2, "max", backend=b).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[1], grads[0])
    assert torch.equal(grads[0].flatten().cpu(), torch.tensor([0, 1 / 3, 1 / 3, 0, 1 / 3, 1], dtype=torch.float64))


def test_cpp_scatter_is_row_order_whatever_the_threads():
    if not any(c.values[1] == "cpp" for c in kernel_cases("scatter_add")):
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(6)
    src = torch.randn(4000, 200, generator=g)
    index = torch.randint(0, 30, (4000,), generator=g)
    runs, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runs.append(ops.scatter_add(src, index, 30, backend="cpp"))
            runs.append(ops.segment_reduce(src, torch.arange(0, 4001, 100), "sum", backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[2]) and torch.equal(runs[1], runs[3])
    # the row-order scatter gives the sorted form's bits, for every reduction
    segments = ops.sort_segments(index, 30)
    for reduce in REDUCTIONS:
        direct = ops.scatter_reduce(src, index, 30, reduce, backend="cpp")
        assert torch.equal(direct, ops.segment_reduce(src, segments.offsets, reduce, perm=segments.perm, backend="cpp"))
    # row order exactly: the float64 sum of the float32 rows rounded per step in row order
    want = torch.zeros(30, 200)
    for i in range(0, 4000, 500):
        want.index_add_(0, index[i : i + 500], src[i : i + 500])  # CPU index_add_ adds in row order
    assert torch.equal(runs[0], want)


def test_ops_pass_opcheck_and_compile():
    g = torch.Generator().manual_seed(7)
    src = torch.randn(40, 6, generator=g, requires_grad=True)
    index = _index(40, 5, g, "cpu")
    offsets = torch.tensor([0, 10, 10, 33])
    names = [b.values[1] for b in kernel_cases("segment_reduce") if b.values[0] == "cpu"]
    if "cpp" in names:
        perm = torch.randperm(40)
        torch.library.opcheck(torch.ops.dynkernels.segment_reduce.default, (src, offsets, None, "max"))
        torch.library.opcheck(torch.ops.dynkernels.segment_reduce.default, (src, offsets, perm, "mean"))
        for reduce in REDUCTIONS:
            torch.library.opcheck(torch.ops.dynkernels.scatter_reduce.default, (src, index, 5, reduce))
    if "triton" in names:
        torch.library.opcheck(torch.ops.dynkernels.segment_reduce_triton.default, (src, offsets, None, "mean"))
        torch.library.opcheck(
            torch.ops.dynkernels.segment_reduce_triton.default, (src, offsets, torch.randperm(40), "max")
        )
        torch.library.opcheck(torch.ops.dynkernels.scatter_add_triton.default, (src, index, 5))

    def fn(x):
        return ops.scatter_reduce(x, index, 5, "mean").sum() + ops.scatter_add(x, index, 5).square().sum()

    eager = fn(src)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(src)
    torch.testing.assert_close(compiled, eager)


def test_bad_inputs():
    src, index = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="int32 or int64"):
        ops.scatter_add(src, index.float(), 2)
    with pytest.raises(ValueError, match="one entry per row"):
        ops.scatter_add(src, index[:3], 2)
    with pytest.raises(ValueError, match="num_segments"):
        ops.scatter_add(src, index, -1)
    with pytest.raises(ValueError, match="reduce must be"):
        ops.scatter_reduce(src, index, 2, "min")
    with pytest.raises(TypeError, match="floating-point"):
        ops.scatter_add(src.long(), index, 2)
    with pytest.raises(ValueError, match="int64"):
        ops.segment_reduce(src, torch.tensor([0, 2], dtype=torch.int32))
    if any(c.values[1] == "cpp" for c in kernel_cases("segment_reduce")):
        with pytest.raises(IndexError, match="perm must hold rows"):
            ops.segment_reduce(src, torch.tensor([0, 2]), perm=torch.tensor([0, 4]), backend="cpp")
        with pytest.raises(RuntimeError, match="non-decreasing"):
            ops.segment_reduce(src, torch.tensor([0, 3, 1]), backend="cpp")
        with pytest.raises(RuntimeError, match=r"\[0, M\]"):
            ops.segment_reduce(src, torch.tensor([0, 5]), backend="cpp")
    # empty inputs
    assert ops.scatter_add(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 4).shape == (4, 3)
    assert ops.scatter_reduce(src, index, 0, "max").shape == (0, 2)
