"""Transformer layers of Pointformer, with the official code's layout and two
execution paths.

Parameters are named as in ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` (``self_attn``, ``linear1``, ``norm1``, ...).
``path="reference"`` runs them as the official code does: sequence-first
``nn.MultiheadAttention``, with ``need_weights=True`` in the custom "prenorm"
layers (the head-averaged maps are materialised, then thrown away) and
``need_weights=False`` in the stock post-LN layers. The kernel path runs the
same parameters batch-first through :func:`dynkernels.ops.local_attention`
(groups of ns tokens) or ``scaled_dot_product_attention`` (global), and never
forms an attention map unless one is asked for.

"prenorm" is the official ``TransformerEncoderLayerPreNorm``:
``x = LN1(x); x = x + Drop(MHA(x)); x = LN2(x); x = x + Drop(FFN(x))``, the
residual taken after the LayerNorm, with no final norm. It is neither pre-LN
nor post-LN; parity needs it as is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._backends import op_backend

__all__ = ["PointformerDecoderLayer", "PointformerEncoderLayer", "PositionEncoding"]


def _attend_heads(attn, query, key, value, in_bias, *, local, row_index, key_padding_mask, backend):
    """Kernel-path multi-head attention with attn's projection weights and the
    given input-projection bias, up to the merged heads (before out_proj).
    query (G, Sq, C), key/value (G, Sk, C) batch-first -> ((G, Sq, C), weights (G, Sk) or None)."""
    g, sq, c = query.shape
    heads = attn.num_heads
    d = c // heads
    dropout = attn.dropout if attn.training else 0.0
    self_attention = query is key and key is value
    if self_attention and local and dropout == 0.0 and key_padding_mask is None:
        qkv = F.linear(query, attn.in_proj_weight, in_bias)
        return ops.local_attention_packed(
            qkv, heads, row_index=row_index, backend=op_backend(backend, "local_attention")
        )
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_bias.chunk(3) if in_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q).view(g, sq, heads, d).transpose(1, 2)
    k = F.linear(key, w_k, b_k).view(g, -1, heads, d).transpose(1, 2)
    v = F.linear(value, w_v, b_v).view(g, -1, heads, d).transpose(1, 2)
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=math.sqrt(1.0 / d))
    weights = None
    if row_index is not None:  # attention dropout is on: the refinement reads the probabilities before it
        _, weights = ops.local_attention(q, k, v, row_index=row_index)
    return out.transpose(1, 2).reshape(g, sq, c), weights


def _attend(attn: nn.MultiheadAttention, query, key, value, *, local, row_index, key_padding_mask, backend):
    """_attend_heads with attn's own bias, then out_proj."""
    out, weights = _attend_heads(
        attn,
        query,
        key,
        value,
        attn.in_proj_bias,
        local=local,
        row_index=row_index,
        key_padding_mask=key_padding_mask,
        backend=backend,
    )
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias), weights


def _plus_matmul(base: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """base + x @ weight^T in one GEMM (beta = 1): no bias copy, no separate add.
    Without autograd it accumulates into base in place (the caller gives base
    up), which also saves addmm's copy of base into a fresh output."""
    flat_base, flat_x = base.reshape(-1, base.shape[-1]), x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (base.requires_grad or x.requires_grad or weight.requires_grad):
        return torch.addmm(flat_base, flat_x, weight.t()).view(base.shape)
    return flat_base.addmm_(flat_x, weight.t()).view(base.shape)


def _mha_reference(attn: nn.MultiheadAttention, query, key, value, *, need_weights, key_padding_mask=None):
    """nn.MultiheadAttention called as the official code calls it: sequence-first."""
    out, maps = attn(
        query.transpose(0, 1),
        key.transpose(0, 1),
        value.transpose(0, 1),
        need_weights=need_weights,
        key_padding_mask=key_padding_mask,
    )
    return out.transpose(0, 1), maps


class _FeedForward(nn.Module):
    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class PointformerEncoderLayer(_FeedForward):
    """One self-attention layer, batch-first ``(G, S, C)`` in and out.

    ``forward(x, path=..., local=..., row_index=None)`` returns ``(x, attn)``:
    attn is None unless row_index is given; then, on the reference path, the
    head-averaged maps ``(G, S, S)`` of nn.MultiheadAttention, on the kernel
    path the requested head-averaged rows ``(G, S)``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, prenorm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.prenorm = prenorm

    def _sa(self, x, path, local, row_index, key_padding_mask, backend):
        if path == "reference":
            need = self.prenorm or row_index is not None
            return _mha_reference(self.self_attn, x, x, x, need_weights=need, key_padding_mask=key_padding_mask)
        return _attend(
            self.self_attn,
            x,
            x,
            x,
            local=local,
            row_index=row_index,
            key_padding_mask=key_padding_mask,
            backend=backend,
        )

    def _fused_prenorm(self, x, local, row_index, key_padding_mask, backend):
        """The prenorm layer with each residual add and output bias folded into
        GEMMs. With z = LN1(x) + b_out (b_out folded into LN1's shift):
        x + MHA(x) = z + o W_out^T, where o attends over
        z W_in^T + (b_in - W_in b_out) = LN1(x) W_in^T + b_in; the FFN alike
        with b2 folded into LN2. The same function, one pass less per residual;
        valid when the residual dropouts are identities."""
        attn, c = self.self_attn, x.shape[-1]
        b_out, b2 = attn.out_proj.bias, self.linear2.bias
        z = F.layer_norm(x, (c,), self.norm1.weight, self.norm1.bias + b_out, self.norm1.eps)
        in_bias = attn.in_proj_bias - attn.in_proj_weight @ b_out
        o, weights = _attend_heads(
            attn,
            z,
            z,
            z,
            in_bias,
            local=local,
            row_index=row_index,
            key_padding_mask=key_padding_mask,
            backend=backend,
        )
        x = _plus_matmul(z, o, attn.out_proj.weight)
        z = F.layer_norm(x, (c,), self.norm2.weight, self.norm2.bias + b2, self.norm2.eps)
        h = self.dropout(F.relu(F.linear(z, self.linear1.weight, self.linear1.bias - self.linear1.weight @ b2)))
        return _plus_matmul(z, h, self.linear2.weight), weights

    def forward(self, x, *, path="kernel", local=True, row_index=None, key_padding_mask=None, backend=None):
        foldable = (
            path != "reference"
            and self.self_attn.in_proj_bias is not None
            and self.self_attn.out_proj.bias is not None
            and self.norm1.bias is not None
            and (not self.training or self.dropout1.p == self.dropout2.p == 0.0)
        )
        if self.prenorm and foldable:
            x, attn = self._fused_prenorm(x, local, row_index, key_padding_mask, backend)
        elif self.prenorm:
            x = self.norm1(x)
            sa, attn = self._sa(x, path, local, row_index, key_padding_mask, backend)
            x = x + self.dropout1(sa)
            x = self.norm2(x)
            x = x + self.dropout2(self._ff(x))
        else:
            sa, attn = self._sa(x, path, local, row_index, key_padding_mask, backend)
            x = self.norm1(x + self.dropout1(sa))
            x = self.norm2(x + self.dropout2(self._ff(x)))
        return x, (attn if row_index is not None else None)

    def extra_repr(self) -> str:
        return f"prenorm={self.prenorm}"


class PointformerDecoderLayer(_FeedForward):
    """The Local-Global Transformer's layer: self-attention over the queries,
    cross-attention to the memory, FFN. prenorm=True is the official
    ``TransformerDecoderLayerPreNorm`` (the same post-LN-residual quirk, and a
    LayerNorm ``norm_mem`` on the memory); prenorm=False is the stock post-LN
    decoder layer. Batch-first: tgt (B, M, C), memory (B, N, C)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, prenorm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.norm_mem = nn.LayerNorm(d_model) if prenorm else None
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.prenorm = prenorm

    def _attn(self, module, q, kv, path, mask, backend):
        if path == "reference":
            return _mha_reference(module, q, kv, kv, need_weights=self.prenorm, key_padding_mask=mask)[0]
        return _attend(module, q, kv, kv, local=False, row_index=None, key_padding_mask=mask, backend=backend)[0]

    def forward(self, tgt, memory, *, path="kernel", memory_padding_mask=None, backend=None):
        if self.prenorm:
            tgt = self.norm1(tgt)
            tgt = tgt + self.dropout1(self._attn(self.self_attn, tgt, tgt, path, None, backend))
            tgt = self.norm2(tgt)
            memory = self.norm_mem(memory)
            tgt = tgt + self.dropout2(self._attn(self.multihead_attn, tgt, memory, path, memory_padding_mask, backend))
            tgt = self.norm3(tgt)
            return tgt + self.dropout3(self._ff(tgt))
        tgt = self.norm1(tgt + self.dropout1(self._attn(self.self_attn, tgt, tgt, path, None, backend)))
        tgt = self.norm2(
            tgt + self.dropout2(self._attn(self.multihead_attn, tgt, memory, path, memory_padding_mask, backend))
        )
        return self.norm3(tgt + self.dropout3(self._ff(tgt)))

    def extra_repr(self) -> str:
        return f"prenorm={self.prenorm}"


class PositionEncoding(nn.Module):
    """Pointformer's position encoding: 1x1 conv (3 -> C/2, no bias), BN, ReLU,
    1x1 conv (C/2 -> C). ``forward(xyz (..., 3))`` is channel-last on the
    kernel path; ``reference(xyz (B, 3, ...))`` runs the official Conv2d/BN2d
    stack on channel-first input. ``valid`` (a bool mask over xyz's leading
    dims) keeps padded points out of the batch statistics."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        hidden = d_model // 2
        self.layers = nn.Sequential(
            nn.Conv2d(3, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, d_model, 1),
        )

    def reference(self, xyz: torch.Tensor) -> torch.Tensor:
        if xyz.dim() == 3:
            return self.layers(xyz.unsqueeze(-1)).squeeze(-1)
        return self.layers(xyz)

    @staticmethod
    def _momentum(bn: nn.BatchNorm2d) -> float:
        """BatchNorm's update factor for this call, as BatchNorm2d.forward computes it."""
        if not (bn.training and bn.track_running_stats):
            return 0.0
        bn.num_batches_tracked.add_(1)
        return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum

    def forward(self, xyz: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        conv1, bn, _, conv2 = self.layers
        if valid is not None:
            out = xyz.new_zeros((*xyz.shape[:-1], conv2.out_channels))
            out[valid] = self.forward(xyz[valid])
            return out
        h = F.linear(xyz, conv1.weight.flatten(1))
        shape = h.shape
        h = F.batch_norm(
            h.reshape(-1, shape[-1]),
            bn.running_mean,
            bn.running_var,
            bn.weight,
            bn.bias,
            training=bn.training or bn.running_mean is None,
            momentum=self._momentum(bn),
            eps=bn.eps,
        ).view(shape)
        return F.linear(F.relu(h), conv2.weight.flatten(1), conv2.bias)
