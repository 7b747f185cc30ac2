"""Token routing (issue 15), part 1: ToMe's bipartite soft matching and token
merging.

* ``bipartite_soft_matching(metric, r, *, class_token=True, distill_token=False)
  -> (src_idx, dst_idx, unm_idx)``: ToMe's matching (see
  :mod:`dynkernels.reference.token_routing` for the rules) without the
  ``N_a x N_b`` score matrix: the C++ kernel computes the scores in 64 x 512
  tiles and keeps only each A token's best match. ``r`` above ToMe's limit,
  ``(N - protected) // 2``, is clamped to it, as ToMe does (the outputs' shapes
  say the r used); a negative ``r`` raises. Ties go to the lower index (ToMe's
  argsort is not stable: on exactly tied scores its order may differ);
  indices are int64, and the matching is not differentiable (ToMe runs it
  under no_grad).
* ``merge_tokens(x, match, size=None, *, mode="mean"|"sum"|"wavg",
  distill_token=False) -> (merged, sizes)`` and ``unmerge_tokens(x, match,
  n_tokens)``: ToMe's ``merge`` / ``merge_wavg`` / ``unmerge``, as PyTorch
  compositions (gathers and one scatter_reduce; differentiable).
* ``proportional_attention_bias(sizes) -> (B, 1, 1, N)``: ToMe's ``log(size)``
  added to the attention logits (an additive mask for SDPA).

* ``cls_attention_scores(q_cls, k, *, scale=None) -> (B, N - 1)``: EViT's
  CLS attention row averaged over heads, from the CLS query alone (one
  ``q_cls K^T`` row per head: the block's own attention can stay SDPA).
* ``prune_tokens(x, scores, keep, *, fuse_complement=True) -> (tokens, idx)``
  and ``evit_keep_count(n_tokens, keep_rate)``: EViT's top-k selection and
  complement fusion (compositions; ties in torch.topk's order, as EViT).

Backends of the matching: "cpp" (auto on CPU), "triton" (auto on CUDA: the
best matches without the score matrix, then a device-side stable sort; no
host sync), "reference" (the full scores, as ToMe)."""

from __future__ import annotations

import math

import torch

from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ..reference import token_routing as ref
from ._validation import check_int, check_tensor

__all__ = [
    "bipartite_soft_matching",
    "cls_attention_scores",
    "evit_keep_count",
    "merge_tokens",
    "proportional_attention_bias",
    "prune_tokens",
    "unmerge_tokens",
]

FAMILY = "token_routing"
register_op(
    "bipartite_soft_matching",
    FAMILY,
    ("reference", "cpp", "triton"),
    reference=ref.bipartite_soft_matching,
    auto={"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")},
)
_MODES = ("mean", "sum", "wavg")


def _fake_tome_match(a, b, r, class_token, distill_token):
    batch, n_a = a.shape[:2]
    return tuple(a.new_empty((batch, size), dtype=torch.int64) for size in (r, r, n_a - r))


if has_extension():
    torch.library.register_fake("dynkernels::tome_match")(_fake_tome_match)


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, *, class_token: bool = True, distill_token: bool = False, backend=None
):
    """See the module docstring. metric (B, N, C) floating."""
    metric = check_tensor("metric", metric)
    if metric.dim() != 3 or not metric.is_floating_point():
        raise ValueError(f"metric must be a floating (B, N, C) tensor, got {metric.dtype} {tuple(metric.shape)}")
    r = check_int("r", r, 0)
    b, n, _ = metric.shape
    r = ref.clamp_r(n, r, class_token, distill_token)
    chosen = resolve("bipartite_soft_matching", metric.device, backend)
    if chosen == "reference":
        return ref.bipartite_soft_matching(metric, r, class_token=class_token, distill_token=distill_token)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)  # as ToMe normalises
        if chosen == "triton":
            return torch.ops.dynkernels.tome_match_triton(unit[:, ::2], unit[:, 1::2], r, class_token, distill_token)
        return torch.ops.dynkernels.tome_match(unit[:, ::2], unit[:, 1::2], r, class_token, distill_token)


@torch.library.custom_op("dynkernels::tome_match_triton", mutates_args=())
def _tome_match_triton(
    a: torch.Tensor, b: torch.Tensor, r: int, class_token: bool, distill_token: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton best matches, then the ranking as the C++ kernel's: a stable
    descending sort (NaN first, ties to the lower index), device-side."""
    node_max, node_idx = family_kernels(FAMILY).tome_best(a, b, class_token, distill_token)
    order = torch.sort(node_max, dim=1, descending=True, stable=True).indices
    src, unm = order[:, :r], order[:, r:]
    if class_token:
        unm = unm.sort(dim=1).values
    return src.clone(), node_idx.gather(1, src), unm.clone()  # fresh outputs: a custom op's may not alias


torch.library.register_fake("dynkernels::tome_match_triton")(_fake_tome_match)


def _check_match(match, x, n_a):
    if not isinstance(match, (tuple, list)) or len(match) != 3:
        raise ValueError("match must be the (src_idx, dst_idx, unm_idx) of bipartite_soft_matching")
    src, dst, unm = (check_tensor(name, t) for name, t in zip(("src_idx", "dst_idx", "unm_idx"), match, strict=True))
    b = x.shape[0]
    if src.shape != dst.shape or src.dim() != 2 or src.shape[0] != b or unm.shape != (b, n_a - src.shape[1]):
        raise ValueError(
            f"match does not fit x (B = {b}, N_a = {n_a}): src_idx {tuple(src.shape)}, dst_idx {tuple(dst.shape)}, "
            f"unm_idx {tuple(unm.shape)}"
        )
    return src, dst, unm


def merge_tokens(x: torch.Tensor, match, size: torch.Tensor | None = None, *, mode: str = "mean", distill_token=False):
    """ToMe's merge (see the module docstring): (B, N, C) -> ((B, N - r, C), sizes or None)."""
    x = check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got {tuple(x.shape)}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    match = _check_match(match, x, (x.shape[1] + 1) // 2)
    if size is not None and check_tensor("size", size).shape != (*x.shape[:2], 1):
        raise ValueError(f"size must be (B, N, 1) = {(*x.shape[:2], 1)}, got {tuple(size.shape)}")
    if size is not None and mode != "wavg":
        raise ValueError("size is only used with mode='wavg'")
    return ref.merge_tokens(x, match, size, mode=mode, distill_token=distill_token)


def unmerge_tokens(x: torch.Tensor, match, n_tokens: int) -> torch.Tensor:
    """ToMe's unmerge: (B, N - r, C) -> (B, n_tokens, C)."""
    x = check_tensor("x", x)
    n_tokens = check_int("n_tokens", n_tokens, 1)
    match = _check_match(match, x, (n_tokens + 1) // 2)
    if x.dim() != 3 or x.shape[1] != n_tokens - match[0].shape[1]:
        raise ValueError(
            f"x must be (B, n_tokens - r, C) = (B, {n_tokens - match[0].shape[1]}, C), got {tuple(x.shape)}"
        )
    return ref.unmerge_tokens(x, match, n_tokens)


def proportional_attention_bias(sizes: torch.Tensor) -> torch.Tensor:
    """ToMe's proportional attention: log(size) per key token, (B, N, 1) -> (B, 1, 1, N)."""
    sizes = check_tensor("sizes", sizes)
    if sizes.dim() != 3 or sizes.shape[-1] != 1:
        raise ValueError(f"sizes must be (B, N, 1), got {tuple(sizes.shape)}")
    return sizes.log()[:, None, None, :, 0]


def cls_attention_scores(q_cls: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """EViT's CLS scores (see the module docstring): q_cls (B, H, d), k (B, H, N, d); scale
    defaults to d ** -0.5, as the block's attention."""
    q_cls, k = check_tensor("q_cls", q_cls), check_tensor("k", k)
    if q_cls.dim() != 3 or k.dim() != 4 or k.shape[:2] != q_cls.shape[:2] or k.shape[3] != q_cls.shape[2]:
        raise ValueError(f"q_cls must be (B, H, d) and k (B, H, N, d), got {tuple(q_cls.shape)} and {tuple(k.shape)}")
    if k.shape[2] < 2:
        raise ValueError(f"k needs the CLS token and at least one other, got N = {k.shape[2]}")
    scale = q_cls.shape[-1] ** -0.5 if scale is None else float(scale)
    return ref.cls_attention_scores(q_cls, k, scale=scale)


def evit_keep_count(n_tokens: int, keep_rate: float) -> int:
    """EViT's number of kept tokens: ceil(keep_rate * (N - 1)), keep_rate in (0, 1]."""
    if not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    return math.ceil(keep_rate * (check_int("n_tokens", n_tokens, 2) - 1))


def prune_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, *, fuse_complement: bool = True):
    """EViT's selection (see the module docstring): x (B, N, C), scores (B, N - 1)."""
    x, scores = check_tensor("x", x), check_tensor("scores", scores)
    if x.dim() != 3 or scores.shape != (x.shape[0], x.shape[1] - 1):
        raise ValueError(f"x must be (B, N, C) and scores (B, N - 1), got {tuple(x.shape)} and {tuple(scores.shape)}")
    keep = check_int("keep", keep, 1)
    if keep > x.shape[1] - 1:
        raise ValueError(f"keep must be in [1, N - 1 = {x.shape[1] - 1}], got {keep}")
    return ref.prune_tokens(x, scores, keep, fuse_complement=fuse_complement)
