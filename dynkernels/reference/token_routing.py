"""References of the token routing family (issue 15): ToMe's bipartite soft
matching and token merging (facebookresearch/ToMe, ``tome/merge.py``), in
plain PyTorch, with the full ``N_a x N_b`` score matrix as ToMe builds it.

ToMe's matching, for metric (B, N, C) and r tokens to merge:

* ``r = min(r, (N - protected) // 2)`` with ``protected`` the class and
  distillation tokens; ``r <= 0`` merges nothing.
* The metric is divided by its row norms; the even tokens form set A
  (``N_a = ceil(N / 2)``), the odd ones set B; ``scores = A @ B^T`` with the
  class token's row (A's token 0) and the distillation token's column (B's
  token 0, token 1 of the sequence) set to -inf.
* Each A token's best B token (``node_max``, ``node_idx``); A sorted by
  ``node_max`` descending: the first r are merged (``src_idx``) into their
  best B token (``dst_idx``), the rest kept (``unm_idx``, sorted ascending
  when there is a class token, otherwise in that descending order).

Ties: ToMe's ``max`` returns the first maximal index, but its ``argsort`` is
not stable beyond 16 tokens, so ToMe's order among exactly tied A tokens is
unspecified. Here ties go to the lower index everywhere (a stable sort):
where no scores tie, this is ToMe's output exactly."""

from __future__ import annotations

import math

import torch

__all__ = [
    "bipartite_soft_matching",
    "cls_attention_scores",
    "merge_tokens",
    "prune_tokens",
    "tome_scores",
    "unmerge_tokens",
]


def clamp_r(n: int, r: int, class_token: bool, distill_token: bool) -> int:
    """ToMe's clamp: at most half of the unprotected tokens."""
    return max(0, min(r, (n - int(class_token) - int(distill_token)) // 2))


def tome_scores(metric: torch.Tensor, class_token: bool, distill_token: bool) -> torch.Tensor:
    """The (B, N_a, N_b) cosine similarities of ToMe's A/B split, with its -inf rows and columns."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    return scores


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, *, class_token: bool = True, distill_token: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src_idx (B, r), dst_idx (B, r), unm_idx (B, N_a - r)) int64: A-set
    positions merged, the B-set positions they merge into, A positions kept."""
    b, n, _ = metric.shape
    r = clamp_r(n, r, class_token, distill_token)
    with torch.no_grad():
        scores = tome_scores(metric, class_token, distill_token)
        node_max, node_idx = scores.max(dim=-1)  # the first maximal index
        order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
        src_idx, unm_idx = order[..., :r], order[..., r:]
        dst_idx = node_idx.gather(-1, src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=-1).values
    return src_idx, dst_idx, unm_idx


def merge_tokens(x: torch.Tensor, match, size: torch.Tensor | None = None, *, mode: str = "mean", distill_token=False):
    """ToMe's ``merge`` (``mode`` "mean" / "sum": scatter_reduce including the
    destination itself) and ``merge_wavg`` (``mode="wavg"``: the size-weighted
    mean; sizes default to ones). Returns (merged (B, N - r, C), sizes (B, N - r, 1)
    for "wavg", else None). Order: kept A tokens, then B tokens (with a
    distillation token: A's first, B's first, the other A's, the other B's)."""
    src_idx, dst_idx, unm_idx = match
    if mode == "wavg":
        if size is None:
            size = torch.ones_like(x[..., :1])
        merged = _merge(x * size, src_idx, dst_idx, unm_idx, "sum", distill_token)
        sizes = _merge(size, src_idx, dst_idx, unm_idx, "sum", distill_token)
        return merged / sizes, sizes
    return _merge(x, src_idx, dst_idx, unm_idx, mode, distill_token), None


def _merge(x, src_idx, dst_idx, unm_idx, mode, distill_token):
    a, dst = x[..., ::2, :], x[..., 1::2, :]
    b, _, c = a.shape
    r = src_idx.shape[-1]
    unm = a.gather(-2, unm_idx[..., None].expand(b, unm_idx.shape[-1], c))
    src = a.gather(-2, src_idx[..., None].expand(b, r, c))
    dst = dst.scatter_reduce(-2, dst_idx[..., None].expand(b, r, c), src, reduce=mode)
    if distill_token:
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


def unmerge_tokens(x: torch.Tensor, match, n_tokens: int) -> torch.Tensor:
    """ToMe's ``unmerge`` (no distillation token): (B, N - r, C) -> (B, N, C),
    each merged A token getting its destination's value."""
    src_idx, dst_idx, unm_idx = match
    kept = unm_idx.shape[-1]
    unm, dst = x[..., :kept, :], x[..., kept:, :]
    b, _, c = unm.shape
    src = dst.gather(-2, dst_idx[..., None].expand(b, src_idx.shape[-1], c))
    out = torch.zeros(b, n_tokens, c, device=x.device, dtype=x.dtype)
    out[..., 1::2, :] = dst
    out.scatter_(-2, (2 * unm_idx)[..., None].expand(b, kept, c), unm)
    out.scatter_(-2, (2 * src_idx)[..., None].expand(b, src_idx.shape[-1], c), src)
    return out


def cls_attention_scores(q_cls: torch.Tensor, k: torch.Tensor, *, scale: float) -> torch.Tensor:
    """EViT's CLS attention ``attn[:, :, 0, 1:].mean(heads)`` from the CLS query
    alone: q_cls (B, H, d), k (B, H, N, d) -> (B, N - 1), the softmax over all N
    keys of ``(q_cls . k) * scale`` (as EViT scales after the product), its
    non-CLS entries averaged over the heads."""
    logits = (q_cls[:, :, None, :] @ k.transpose(-2, -1))[:, :, 0, :] * scale
    return logits.softmax(dim=-1)[:, :, 1:].mean(dim=1)


def prune_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, *, fuse_complement: bool = True):
    """EViT's token selection (its Block.forward): the CLS token, then the
    ``keep`` non-CLS tokens of highest score in torch.topk's sorted order, then
    (``fuse_complement``) one token: the score-weighted sum of the others, in
    ascending index order. Returns (tokens, idx (B, keep)); ``keep == N - 1``
    returns x itself (EViT does not add the fused token then)."""
    b, n, c = x.shape
    if keep == n - 1:
        return x, None
    _, idx = torch.topk(scores, keep, dim=1, largest=True, sorted=True)
    others = x[:, 1:]
    kept = others.gather(1, idx[..., None].expand(-1, -1, c))
    if not fuse_complement:
        return torch.cat([x[:, :1], kept], dim=1), idx
    marked = torch.ones(b, n - 1, dtype=torch.bool, device=x.device).scatter(1, idx, False)
    compl = torch.sort(torch.where(marked, torch.arange(n - 1, device=x.device), n - 1), dim=1).values[
        :, : n - 1 - keep
    ]
    rest = others.gather(1, compl[..., None].expand(-1, -1, c))
    weights = scores.gather(1, compl)
    extra = torch.sum(rest * weights[..., None], dim=1, keepdim=True)
    return torch.cat([x[:, :1], kept, extra], dim=1), idx
