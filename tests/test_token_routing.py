"""Token routing, part 1: ToMe's matching and merging against a float64
transcription of facebookresearch/ToMe's tome/merge.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_clear_error, bad_input_params, kernel_cases

from dynkernels import ops
from dynkernels.reference import token_routing as ref

MATCH_CASES = kernel_cases("bipartite_soft_matching")


def _tome_official(metric, r, class_token, distill_token):
    """ToMe's bipartite_soft_matching, transcribed: its index tensors (with the trailing 1)."""
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]
    return src_idx, dst_idx, unm_idx, r


def _tome_merge_official(x, match, r, mode, distill_token):
    src_idx, dst_idx, unm_idx = match
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
    if distill_token:
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


SHAPES = [(2, 197, 16), (1, 16, 8), (3, 25, 5), (2, 1100, 12)]  # ViT-Ti, tiny, odd N, several score tiles


@pytest.mark.parametrize("device,backend", MATCH_CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-N{s[1]}")
@pytest.mark.parametrize("tokens", [(True, False), (False, False), (True, True)], ids=["cls", "none", "cls+dist"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matching_equals_tome(device, backend, shape, tokens, dtype):
    class_token, distill_token = tokens
    b, n, c = shape
    if backend == "triton" and device == "cpu" and n > 512:
        pytest.skip("12 s under the interpreter; N = 197 already spans several row blocks and column tiles")
    metric = torch.randn(b, n, c, dtype=dtype, generator=torch.Generator().manual_seed(n)).to(device)
    for r in (0, 1, n // 4, (n - sum(tokens)) // 2):
        want = _tome_official(metric.double(), r, class_token, distill_token)
        got = ops.bipartite_soft_matching(
            metric, r, class_token=class_token, distill_token=distill_token, backend=backend
        )
        for g, w in zip(got, want[:3], strict=True):
            assert g.dtype == torch.int64
            assert torch.equal(g.cpu(), w[..., 0]), f"r={r}"


@pytest.mark.parametrize("device,backend", MATCH_CASES)
def test_r_above_the_limit_is_clamped_as_tome_does(device, backend):
    metric = torch.randn(2, 11, 4, dtype=torch.float64).to(device)
    src, dst, unm = ops.bipartite_soft_matching(metric, 100, backend=backend)  # (11 - 1) // 2 = 5
    assert src.shape == dst.shape == (2, 5) and unm.shape == (2, 1)
    src, dst, unm = ops.bipartite_soft_matching(metric[:, :2], 3, backend=backend)  # nothing to merge
    assert src.shape == (2, 0) and unm.shape == (2, 1)


@pytest.mark.parametrize("device,backend", MATCH_CASES)
def test_exact_ties_go_to_the_lower_index(device, backend):
    """Repeated tokens (exactly representable dot products): the best match is the
    lowest tied B token and tied A tokens keep their order."""
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    metric = base[torch.tensor([2, 0, 2, 0, 1, 2, 2, 1, 0, 0, 1, 2, 0, 1, 2, 2, 2, 0, 1, 0, 2])][None].to(device)
    want = ref.bipartite_soft_matching(metric.cpu(), 7, class_token=False)
    got = ops.bipartite_soft_matching(metric, 7, class_token=False, backend=backend)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.cpu(), w)
    scores = ref.tome_scores(metric.cpu(), False, False)[0]
    best = scores.max(-1).values
    for a, d in zip(want[0][0].tolist(), want[1][0].tolist(), strict=True):
        assert d == int(torch.nonzero(scores[a] == best[a])[0])  # the first tied B token
    order = torch.cat([want[0][0], want[2][0]])
    for i, j in zip(order[:-1].tolist(), order[1:].tolist(), strict=True):  # descending, ties by index
        assert best[i] > best[j] or (best[i] == best[j] and i < j)


@pytest.mark.parametrize("device,backend", MATCH_CASES)
def test_a_zero_token_gives_nan_scores_ranked_as_torch_does(device, backend):
    metric = torch.randn(1, 12, 3, dtype=torch.float64)
    metric[0, 4] = 0.0  # A token 2: a NaN row, ranked first
    metric[0, 7] = 0.0  # B token 3: NaN in every row
    want = ref.bipartite_soft_matching(metric, 3, class_token=True)
    got = ops.bipartite_soft_matching(metric.to(device), 3, class_token=True, backend=backend)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("mode", ["mean", "sum", "wavg"])
@pytest.mark.parametrize("distill_token", [False, True])
def test_merge_and_unmerge_equal_tome(mode, distill_token):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 25, 6, dtype=torch.float64, generator=g)
    metric = torch.randn(2, 25, 4, dtype=torch.float64, generator=g)
    src, dst, unm, r = _tome_official(metric, 8, True, distill_token)
    match = ops.bipartite_soft_matching(metric, 8, distill_token=distill_token)
    merged, sizes = ops.merge_tokens(x, match, mode=mode, distill_token=distill_token)
    if mode == "wavg":  # ToMe's merge_wavg with unit sizes
        size = torch.ones_like(x[..., :1])
        want_sizes = _tome_merge_official(size, (src, dst, unm), r, "sum", distill_token)
        want = _tome_merge_official(x * size, (src, dst, unm), r, "sum", distill_token) / want_sizes
        torch.testing.assert_close(sizes, want_sizes, rtol=0, atol=0)
        again, sizes2 = ops.merge_tokens(merged[:, :], ops.bipartite_soft_matching(merged, 4), sizes, mode="wavg")
        assert sizes2.sum() == 2 * 25  # sizes add up to the original token count
    else:
        want = _tome_merge_official(x, (src, dst, unm), r, mode, distill_token)
        assert sizes is None
    torch.testing.assert_close(merged, want, rtol=1e-14, atol=1e-14)
    if not distill_token:
        back = ops.unmerge_tokens(merged, match, 25)
        assert back.shape == x.shape
        kept, dsts = merged[:, : unm.shape[1]], merged[:, unm.shape[1] :]
        torch.testing.assert_close(back[:, 1::2], dsts)  # B tokens in place
        for s in range(2):
            torch.testing.assert_close(back[s, 2 * match[2][s]], kept[s])  # kept A tokens in place
            torch.testing.assert_close(back[s, 2 * match[0][s]], dsts[s, match[1][s]])  # merged: their destination
    assert torch.autograd.gradcheck(
        lambda v: ops.merge_tokens(v, match, mode="mean" if mode == "wavg" else mode, distill_token=distill_token)[0],
        (x.clone().requires_grad_(),),
    )


def test_proportional_attention_bias_is_log_size():
    sizes = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = ops.proportional_attention_bias(sizes)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias[0, 0, 0], torch.log(torch.tensor([1.0, 2.0, 4.0])))


def test_cpp_matching_passes_opcheck_and_compiles():
    if not any(c.values[1] == "cpp" for c in MATCH_CASES):
        pytest.skip("the C++ extension is not built")
    metric = torch.randn(2, 30, 8)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    torch.library.opcheck(torch.ops.dynkernels.tome_match.default, (unit[:, ::2], unit[:, 1::2], 5, True, False))

    def step(x, m):
        match = ops.bipartite_soft_matching(m, 5)
        return ops.merge_tokens(x, match)[0]

    x = torch.randn(2, 30, 6)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x, metric), step(x, metric))


BAD_INPUTS = [
    ("r-negative", lambda: ops.bipartite_soft_matching(torch.zeros(1, 4, 2), -1), ValueError, "r"),
    ("metric-rank", lambda: ops.bipartite_soft_matching(torch.zeros(4, 2), 1), ValueError, r"metric must be"),
    (
        "metric-int",
        lambda: ops.bipartite_soft_matching(torch.zeros(1, 4, 2, dtype=torch.int64), 1),
        ValueError,
        "floating",
    ),
    ("mode", lambda: ops.merge_tokens(torch.zeros(1, 4, 2), _match(4, 1), mode="max"), ValueError, "mode must be"),
    ("match-shape", lambda: ops.merge_tokens(torch.zeros(1, 6, 2), _match(4, 1)), ValueError, "match does not fit"),
    (
        "size-without-wavg",
        lambda: ops.merge_tokens(torch.zeros(1, 4, 2), _match(4, 1), torch.ones(1, 4, 1)),
        ValueError,
        "wavg",
    ),
    ("unmerge-shape", lambda: ops.unmerge_tokens(torch.zeros(1, 4, 2), _match(4, 1), 4), ValueError, "n_tokens - r"),
]


def _match(n, r):
    return ops.bipartite_soft_matching(torch.randn(1, n, 3), r, class_token=False)


@pytest.mark.parametrize("call,error,match", bad_input_params(BAD_INPUTS))
def test_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)


# ---- EViT ---------------------------------------------------------------------


def _evit_official(x_tokens, q, k, keep_rate, fuse_token):
    """EViT's Attention (keep_rate path) + Block selection on given q, k (B, H, N, d), transcribed."""
    b, n, c = x_tokens.shape
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    attn = attn.softmax(dim=-1)
    left_tokens = math.ceil(keep_rate * (n - 1))
    if left_tokens == n - 1:
        return x_tokens
    cls_attn = attn[:, :, 0, 1:].mean(dim=1)
    _, idx = torch.topk(cls_attn, left_tokens, dim=1, largest=True, sorted=True)
    index = idx.unsqueeze(-1).expand(-1, -1, c)
    non_cls = x_tokens[:, 1:]
    x_others = torch.gather(non_cls, dim=1, index=index)
    if not fuse_token:
        return torch.cat([x_tokens[:, 0:1], x_others], dim=1)
    a = torch.arange(n - 1)[None].expand(b, -1)  # EViT's complement_idx: scatter zeros, sort, drop k
    compl = torch.sort(torch.scatter(a, -1, idx, 0), dim=-1).values[:, left_tokens:]
    non_topk = torch.gather(non_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, c))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
    extra_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    return torch.cat([x_tokens[:, 0:1], x_others, extra_token], dim=1)


@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 0.05, 1.0])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 4, 197, 16)], ids=["b2-n17", "b1-n197"])
def test_evit_selection_equals_the_official_block(keep_rate, fuse, shape):
    b, h, n, d = shape
    g = torch.Generator().manual_seed(n)
    q, k = (torch.randn(b, h, n, d, dtype=torch.float64, generator=g) for _ in range(2))
    x = torch.randn(b, n, 10, dtype=torch.float64, generator=g)
    want = _evit_official(x, q, k, keep_rate, fuse)
    scores = ops.cls_attention_scores(q[:, :, 0], k)
    torch.testing.assert_close(scores, ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(-1)[:, :, 0, 1:].mean(1))
    got, idx = ops.prune_tokens(x, scores, ops.evit_keep_count(n, keep_rate), fuse_complement=fuse)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if keep_rate == 1.0:
        assert got is x and idx is None
    else:
        assert idx.shape == (b, math.ceil(keep_rate * (n - 1)))
    if fuse and keep_rate < 1:
        assert torch.autograd.gradcheck(
            lambda v, s: ops.prune_tokens(v, s, 3)[0],
            (x[:, :9].clone().requires_grad_(), scores[:, :8].clone().requires_grad_()),
        )


EVIT_BAD = [
    ("keep-zero", lambda: ops.prune_tokens(torch.zeros(1, 5, 2), torch.zeros(1, 4), 0), ValueError, "keep"),
    (
        "keep-too-many",
        lambda: ops.prune_tokens(torch.zeros(1, 5, 2), torch.zeros(1, 4), 5),
        ValueError,
        r"keep must be in \[1, N - 1 = 4\]",
    ),
    (
        "scores-shape",
        lambda: ops.prune_tokens(torch.zeros(1, 5, 2), torch.zeros(1, 5), 2),
        ValueError,
        r"scores \(B, N - 1\)",
    ),
    ("keep-rate", lambda: ops.evit_keep_count(10, 0.0), ValueError, "keep_rate"),
    (
        "qk-shapes",
        lambda: ops.cls_attention_scores(torch.zeros(1, 2, 4), torch.zeros(1, 3, 5, 4)),
        ValueError,
        "q_cls must be",
    ),
]


@pytest.mark.parametrize("call,error,match", bad_input_params(EVIT_BAD))
def test_evit_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)
