"""References of DynamicViT's ops (issue 15; raoyongming/DynamicViT), in plain
PyTorch, as its code computes them.

* ``batch_index_select(x, idx)``: per sample, the rows of x (B, N, C) or
  entries of x (B, N) at idx (B, N'), by a flat index with a per-sample
  offset (``idx + arange(B)[:, None] * N``), as DynamicViT's helper.
* ``softmax_with_policy(attn, policy, eps=1e-6)``: the attention softmax of
  its training path. The keep decisions policy (B, N, 1) become an (N x N)
  mask ``policy_j + (1 - policy_j) [i == j]`` (a dropped token still attends
  to itself), the logits shifted by their row max, exponentiated in float32,
  masked, and normalised as ``(e + eps / N) / (sum e + eps)``; cast back to
  the logits' dtype. Differs in one point: a float64 input is computed in
  float64 here (DynamicViT's code computes in float32 whatever the input).
"""

from __future__ import annotations

import torch

__all__ = ["batch_index_select", "softmax_with_policy"]


def batch_index_select(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    b, n = x.shape[:2]
    offset = torch.arange(b, dtype=torch.long, device=x.device).view(b, 1) * n
    flat = (idx + offset).reshape(-1)
    if x.dim() == 3:
        return x.reshape(b * n, x.shape[2])[flat].reshape(b, idx.shape[1], x.shape[2])
    return x.reshape(b * n)[flat].reshape(b, idx.shape[1])


def softmax_with_policy(attn: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    b, n, _ = policy.shape
    attn_policy = policy.reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, n, n)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_att
    compute = torch.promote_types(attn.dtype, torch.float32)
    attn = attn.to(compute).exp_() * attn_policy.to(compute)
    attn = (attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)
