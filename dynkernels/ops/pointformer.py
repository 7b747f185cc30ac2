"""Pointformer ops: coordinate refinement and fused per-group local attention.

Pointformer (Pan et al., CVPR 2021, arXiv 2012.11409) refines each sampled
centroid to the attention-weighted mean of its group: the last Local
Transformer layer's attention, averaged over heads, read at the centroid's
row, weights the grouped coordinates. The official release lacks this module;
see ../shared/papers/pointformer_pointops.md for what it does compute.
"""

from __future__ import annotations

import torch

from .. import reference
from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ..reference.pointops import squared_distance
from ._registration import register_kernel_pairs
from ._validation import (
    check_floating,
    check_index,
    check_index_range,
    check_int,
    check_same_device,
    check_tensor,
)

__all__ = ["centroid_row_index", "coordinate_refinement", "local_attention", "local_attention_packed"]

ROW_MODES = ("centroid", "first", "mean")

FAMILY = "pointformer"
_ATTENTION = ("reference", "cpp", "triton")
register_op(
    "coordinate_refinement",
    FAMILY,
    ("reference", "cpp", "cuda"),
    reference=reference.coordinate_refinement,
    differentiable=("reference", "cpp", "cuda"),
)
register_op("local_attention", FAMILY, _ATTENTION, reference=reference.local_attention, differentiable=_ATTENTION)


def centroid_row_index(grouped_xyz: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The position of each center within its group: ``(B, M)`` int64, the
    first s with ``d2(grouped_xyz[b, :, m, s], centers[b, m]) == 0``, or -1 when
    no grouped point coincides with the center. mmcv's ball query keeps the
    first ns neighbours in index order, so in a crowded ball the center itself
    may be missing."""
    d2 = squared_distance(grouped_xyz.permute(0, 2, 3, 1), centers.unsqueeze(2))  # (B, M, S)
    hit = d2 == 0
    first = hit.to(torch.uint8).argmax(dim=-1)
    return torch.where(hit.any(dim=-1), first, torch.full_like(first, -1))


def _row_index(row, attn_rows: int, grouped_xyz: torch.Tensor, centers: torch.Tensor | None) -> torch.Tensor:
    batch, _, m, s = grouped_xyz.shape
    if isinstance(row, torch.Tensor):
        check_index("row", row, 2, "(B, M)")
        if tuple(row.shape) != (batch, m):
            raise ValueError(f"row must have shape (B, M) = {(batch, m)}, got {tuple(row.shape)}")
        check_index_range("row", row, attn_rows)
        return row.to(torch.int64)
    if row == "first":
        return torch.zeros((batch, m), dtype=torch.int64, device=grouped_xyz.device)
    if row == "mean":
        return torch.full((batch, m), -1, dtype=torch.int64, device=grouped_xyz.device)
    if row == "centroid":
        if centers is None:
            raise ValueError("row='centroid' needs centers (B, M, 3) to find each centroid in its group")
        if tuple(centers.shape) != (batch, m, 3):
            raise ValueError(f"centers must have shape (B, M, 3) = {(batch, m, 3)}, got {tuple(centers.shape)}")
        if attn_rows != s:
            raise ValueError(f"row='centroid' needs one attention row per grouped point, got R={attn_rows}, S={s}")
        return centroid_row_index(grouped_xyz, centers.to(grouped_xyz.dtype))
    raise ValueError(f"row must be one of {ROW_MODES} or a (B, M) index tensor, got {row!r}")


def coordinate_refinement(
    attn: torch.Tensor,
    grouped_xyz: torch.Tensor,
    *,
    row: str | torch.Tensor = "centroid",
    centers: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Pointformer's coordinate refinement, fused: head average, row pick and
    weighted sum in one pass.

    Args:
        attn: ``(B, M, H, R, S)`` attention probabilities of each group's
            last Local Transformer layer (H heads, R query rows, S keys), in
            grouped_xyz's dtype. nn.MultiheadAttention's head-averaged maps
            fit as ``H = 1``; the fused local attention's centroid row as
            ``H = R = 1`` with ``row="first"``.
        grouped_xyz: ``(B, 3, M, S)`` absolute coordinates of the grouped points
            (``grouping_operation(xyz.transpose(1, 2), idx)``).
        row: which attention row weights the points: "centroid" (the row of
            the grouped point that coincides with the center, see
            :func:`centroid_row_index`; the mean of rows where none does),
            "first" (row 0, the paper's wording), "mean" (the mean of all R
            rows), or an explicit ``(B, M)`` int tensor in ``[-1, R)``, -1
            meaning the mean.
        centers: ``(B, M, 3)``, needed for ``row="centroid"``.
        backend: None (auto), "reference", "cpp" or "cuda".

    Returns:
        ``(B, M, 3)`` refined centers ``sum_s w[s] * grouped_xyz[:, :, m, s]``
        with ``w = mean_h attn[b, m, h, row, :]``. Since softmax rows sum to 1
        the result is a convex combination: it stays inside the ball.
        Differentiable in attn and grouped_xyz.
    """
    check_tensor("attn", attn)
    check_tensor("grouped_xyz", grouped_xyz)
    check_floating("attn", attn)
    check_floating("grouped_xyz", grouped_xyz)
    if grouped_xyz.dim() != 4 or grouped_xyz.shape[1] != 3:
        raise ValueError(f"grouped_xyz must have shape (B, 3, M, S), got {tuple(grouped_xyz.shape)}")
    batch, _, m, s = grouped_xyz.shape
    if attn.dim() != 5 or attn.shape[:2] != (batch, m) or attn.shape[-1] != s or attn.shape[2] < 1:
        raise ValueError(
            f"attn must have shape (B, M, H, R, S) with (B, M, S) = {(batch, m, s)}, got {tuple(attn.shape)}"
        )
    if attn.dtype != grouped_xyz.dtype:
        raise TypeError(f"attn and grouped_xyz must share a dtype, got {attn.dtype} and {grouped_xyz.dtype}")
    check_same_device(attn=attn, grouped_xyz=grouped_xyz)
    row_index = _row_index(row, attn.shape[3], grouped_xyz, centers)
    chosen = resolve("coordinate_refinement", attn.device, backend)
    if chosen == "reference":
        return reference.coordinate_refinement(attn, grouped_xyz, row_index)
    return torch.ops.dynkernels.coordinate_refinement(attn, grouped_xyz, row_index)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_index: torch.Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        check_floating(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (G, H, S, D), got {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] == 0 or q.shape[3] == 0:
        # H = 0 leaves the head-averaged weights undefined; D = 0 has no scores to scale
        raise ValueError(f"q, k and v need H >= 1 heads and D >= 1 channels, got (G, H, S, D) = {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if row_index is not None:
        check_index("row_index", row_index, 1, "(G,)")
        if row_index.shape[0] != q.shape[0]:
            raise ValueError(f"row_index must have shape (G,) = ({q.shape[0]},), got {tuple(row_index.shape)}")
        check_same_device(q=q, row_index=row_index)
        check_index_range("row_index", row_index, q.shape[2])


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    row_index: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention within many small groups at once (Pointformer's Local
    Transformer), optionally emitting the head-averaged attention row that
    :func:`coordinate_refinement` needs.

    Args:
        q, k, v: ``(G, H, S, D)``: G groups (B * npoint), H heads, S tokens
            per group (nsample), D = head dim; one float dtype, any strides.
        row_index: optional ``(G,)`` int in ``[-1, S)``: which query row's
            probabilities to return per group, -1 for the mean over rows.
        backend: None (auto), "reference" (materialised probabilities, as
            nn.MultiheadAttention), "cpp" (CPU: one fused C++ kernel per
            group, forward and backward; half inputs computed in fp32) or
            "triton" (one fused kernel per group, forward and backward,
            S <= 64 and D <= 128). Neither kernel stores an S x S map.

    Returns:
        ``(out, weights)``: out ``(G, H, S, D)`` = ``softmax(q k^T / sqrt(D)) v``,
        softmax in fp32 for half types, with no mask (ball-query padding
        duplicates are ordinary tokens, as in the official code); weights
        ``(G, S)`` = the requested row averaged over heads, or None without
        row_index. Differentiable in q, k, v through both outputs.
    """
    _check_qkv(q, k, v, row_index)
    chosen = resolve("local_attention", q.device, backend)
    if chosen == "reference":
        return reference.local_attention(q, k, v, row_index)
    rows = row_index.to(torch.int64) if row_index is not None else q.new_empty((0,), dtype=torch.int64)
    if chosen == "triton":
        if q.shape[2] > 64 or q.shape[3] > 128:
            raise ValueError(f"local_attention(backend='triton') needs S <= 64 and D <= 128, got {tuple(q.shape)}")
        out, weights, _ = torch.ops.dynkernels.local_attention_triton(q, k, v, rows)
    else:
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
        out, weights, _ = torch.ops.dynkernels.local_attention(qc, kc, vc, rows)
        out, weights = out.to(q.dtype), weights.to(q.dtype)
    return out, (weights if row_index is not None else None)


def local_attention_packed(
    qkv: torch.Tensor, heads: int, *, row_index: torch.Tensor | None = None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`local_attention` on a packed input projection, as attention
    layers hold it: ``qkv`` ``(G, S, 3 * C)`` = ``[q | k | v]``, each split into
    ``heads`` heads of ``C / heads`` channels; returns ``out`` ``(G, S, C)``
    with the heads merged, and the weights as :func:`local_attention`. The C++
    kernel reads the heads in place and writes the merged output and the
    packed gradient directly, so no head split or merge is copied."""
    check_tensor("qkv", qkv)
    check_floating("qkv", qkv)
    heads = check_int("heads", heads, 1)
    if qkv.dim() != 3 or qkv.shape[2] % (3 * heads) != 0:
        raise ValueError(f"qkv must have shape (G, S, 3 * heads * D) with heads={heads}, got {tuple(qkv.shape)}")
    g, s, c3 = qkv.shape
    q, k, v = qkv.view(g, s, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    chosen = resolve("local_attention", qkv.device, backend)
    if chosen != "cpp" or qkv.dtype not in (torch.float32, torch.float64):
        out, weights = local_attention(q, k, v, row_index=row_index, backend=chosen)
        return out.transpose(1, 2).reshape(g, s, c3 // 3), weights
    _check_qkv(q, k, v, row_index)
    rows = row_index.to(torch.int64) if row_index is not None else qkv.new_empty((0,), dtype=torch.int64)
    out, weights, _ = torch.ops.dynkernels.local_attention_packed(qkv, heads, rows)
    return out, (weights if row_index is not None else None)


# ---- torch.library registrations -------------------------------------------


def _refine_setup_context(ctx, inputs, output):
    attn, grouped_xyz, row_index = inputs
    ctx.save_for_backward(attn, grouped_xyz, row_index)


def _refine_backward(ctx, grad):
    attn, grouped_xyz, row_index = ctx.saved_tensors
    grad_attn, grad_xyz = torch.ops.dynkernels.coordinate_refinement_backward(
        grad.contiguous(), attn, grouped_xyz, row_index
    )
    return grad_attn, grad_xyz, None


if has_extension():

    @torch.library.register_fake("dynkernels::coordinate_refinement")
    def _(attn, grouped_xyz, row_index):
        return grouped_xyz.new_empty((grouped_xyz.shape[0], grouped_xyz.shape[2], 3))

    @torch.library.register_fake("dynkernels::coordinate_refinement_backward")
    def _(grad_out, attn, grouped_xyz, row_index):
        return torch.empty_like(attn), torch.empty_like(grouped_xyz)

    torch.library.register_autograd(
        "dynkernels::coordinate_refinement", _refine_backward, setup_context=_refine_setup_context
    )


def _attention_fakes(heads_last: bool):
    """Fake kernels of one local-attention op pair. heads_last: outputs (and
    q/k/v gradients) live in (G, S, H, D) memory, as the C++ kernel writes
    them; otherwise they are contiguous (G, H, S, D), as the Triton launcher's."""

    def like(q):
        g, h, s, d = q.shape
        return q.new_empty((g, s, h, d)).transpose(1, 2) if heads_last else q.new_empty((g, h, s, d))

    def forward(q, k, v, row_index):
        g, h, s, _ = q.shape
        lse = q.new_empty((g, h, s), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        return like(q), q.new_empty((g, s)), lse

    def backward(grad_out, grad_weights, q, k, v, lse, row_index):
        return like(q), like(q), like(q)

    return forward, backward


def _attention_setup_context(ctx, inputs, output):
    q, k, v, row_index = inputs
    ctx.save_for_backward(q, k, v, output[2], row_index)


def _attention_backward(ctx, backward_op, grad_out, grad_weights, _grad_lse):
    q, k, v, lse, row_index = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    if grad_weights is None:
        grad_weights = q.new_zeros((q.shape[0], q.shape[2]))
    dq, dk, dv = backward_op(grad_out, grad_weights, q, k, v, lse, row_index)
    return dq, dk, dv, None


def _packed_setup_context(ctx, inputs, output):
    qkv, heads, row_index = inputs
    ctx.save_for_backward(qkv, output[2], row_index)
    ctx.heads = heads


def _packed_backward(ctx, backward_op, grad_out, grad_weights, _grad_lse):
    qkv, lse, row_index = ctx.saved_tensors
    g, s, c3 = qkv.shape
    if grad_out is None:
        grad_out = qkv.new_zeros((g, s, c3 // 3))
    if grad_weights is None:
        grad_weights = qkv.new_zeros((g, s))
    return backward_op(grad_out, grad_weights, qkv, ctx.heads, lse, row_index), None, None


def _fake_packed(qkv, heads, row_index):
    g, s, c3 = qkv.shape
    lse = qkv.new_empty((g, heads, s), dtype=torch.float64 if qkv.dtype == torch.float64 else torch.float32)
    return qkv.new_empty((g, s, c3 // 3)), qkv.new_empty((g, s)), lse


def _fake_packed_backward(grad_out, grad_weights, qkv, heads, lse, row_index):
    return torch.empty_like(qkv)


if has_extension():
    register_kernel_pairs(
        [("dynkernels::local_attention_packed", "dynkernels::local_attention_packed_backward")],
        fake=_fake_packed,
        fake_backward=_fake_packed_backward,
        setup_context=_packed_setup_context,
        backward=_packed_backward,
    )


# Opaque custom ops rather than torch.library.triton_op: see ops/pointops.py.
@torch.library.custom_op("dynkernels::local_attention_triton", mutates_args=())
def _local_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return family_kernels(FAMILY).local_attention_fwd(q, k, v, row_index)


@torch.library.custom_op("dynkernels::local_attention_backward_triton", mutates_args=())
def _local_attention_backward_triton(
    grad_out: torch.Tensor,
    grad_weights: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    row_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return family_kernels(FAMILY).local_attention_bwd(grad_out, grad_weights, q, k, v, lse, row_index)


# The C++ op writes (G, S, H, D) memory (heads last), the Triton one contiguous (G, H, S, D).
_ATTENTION_PAIRS = [(("dynkernels::local_attention_triton", "dynkernels::local_attention_backward_triton"), False)]
if has_extension():
    _ATTENTION_PAIRS.append((("dynkernels::local_attention", "dynkernels::local_attention_backward"), True))
for _pair, _heads_last in _ATTENTION_PAIRS:
    _fake, _fake_backward = _attention_fakes(_heads_last)
    register_kernel_pairs(
        [_pair],
        fake=_fake,
        fake_backward=_fake_backward,
        setup_context=_attention_setup_context,
        backward=_attention_backward,
    )
