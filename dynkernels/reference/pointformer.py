"""Reference Pointformer ops in plain PyTorch: the coordinate refinement of
the paper (absent from the official code) and per-group local attention as
nn.MultiheadAttention computes it, materialised probabilities included."""

from __future__ import annotations

import math

import torch

__all__ = ["coordinate_refinement", "head_averaged_row", "local_attention"]


def head_averaged_row(attn: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """attn (B, M, H, R, S) probabilities, row_index (B, M) in [-1, R) ->
    (B, M, S): the head average of row ``row_index``, or of every row's mean
    where row_index is -1."""
    avg = attn.mean(dim=2)  # (B, M, R, S)
    picked = avg.gather(2, row_index.clamp(min=0).to(torch.int64)[..., None, None].expand(-1, -1, 1, avg.shape[-1]))
    return torch.where((row_index >= 0)[..., None], picked.squeeze(2), avg.mean(dim=2))


def coordinate_refinement(attn: torch.Tensor, grouped_xyz: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Refined centers (B, M, 3) = sum_s w[b, m, s] * grouped_xyz[b, :, m, s],
    w = head_averaged_row(attn, row_index); grouped_xyz is (B, 3, M, S)."""
    weights = head_averaged_row(attn, row_index).to(grouped_xyz.dtype)
    return torch.einsum("bms,bcms->bmc", weights, grouped_xyz)


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention within each group, as nn.MultiheadAttention does it:
    q, k, v (G, H, S, D) -> out (G, H, S, D); scores ``(q / sqrt(D)) @ k^T``
    softmaxed over keys (in fp32 for half types). With row_index (G,) in
    [-1, S), also the head-averaged probabilities of that query row, or of
    the mean over rows where -1: (G, S) in q's dtype."""
    scale = math.sqrt(1.0 / q.shape[-1])  # as nn.MultiheadAttention
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.matmul(q.to(compute) * scale, k.to(compute).transpose(-1, -2))
    probs = scores.softmax(dim=-1)
    out = torch.matmul(probs, v.to(compute)).to(q.dtype)
    if row_index is None:
        return out, None
    weights = head_averaged_row(probs.unsqueeze(0), row_index.unsqueeze(0)).squeeze(0)
    return out, weights.to(q.dtype)
