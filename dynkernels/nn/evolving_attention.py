"""Evolving Attention modules (Wang et al., arXiv 2102.12895): a drop-in
ViT/timm-style attention whose pre-softmax logits evolve from layer to layer
through a head-mixing convolution, and an encoder that chains them."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..reference.evolving_attention import ACTIVATIONS, activate

__all__ = ["EvolvingAttention", "EvolvingTransformerEncoder", "EvolvingTransformerEncoderLayer"]


class EvolvingAttention(nn.Module):
    """Multi-head self-attention with evolving logits, timm's ``Attention``
    layout (``qkv``, ``proj``) plus ``conv`` (the H -> H head-mixing
    convolution over the N x N map).

    ``forward(x (B, N, C), prev_logits=None, mask=None) -> (y (B, N, C), logits (B, H, N, N))``:
    logits are this layer's evolved logits (unmasked), to pass to the next
    layer. mask: bool (True masks out) or additive, broadcastable to
    (B, H, N, N), added after the convolution.

    As in the official code, a layer without a previous map (``prev_logits``
    None: the first layer) or whose previous map has another N (a stage
    change) has no map step: it is plain attention, ``logits = S`` and
    ``softmax(S + mask) V``, and ``conv`` gets zero gradients. A prev_logits of
    another batch size or head count is an error.

    Args:
        w_prev, w_conv: the mix weights (the official code's beta and alpha;
            EA-AA-ResNet uses w_prev=0.5, w_conv=1.0, the defaults; the EA-DC
            README example w_prev=0.3, w_conv=0.5).
        activation: "relu" (EA-AA-ResNet), "leaky_relu" (EA-DC) or "identity".
        evolve: False makes the layer plain attention whatever it is given
            (EA-DC's ``with_att_conv=False``, which it sets on both attention
            layers of its first block).
        carry_activation, carry_dropout: applied to the logits this layer
            passes on (not to its own softmax). The default ("identity", 0)
            passes A_i as EA-AA-ResNet does; EA-DC passes
            ``dropout(leaky_relu(A_i))``: ``carry_activation="leaky_relu"``
            (negative_slope) and ``carry_dropout`` = its dropout. EA-DC's
            pooled attention (``att_downsample``) is hard-wired off in its
            code and not offered here.
        backend: passed to :func:`dynkernels.ops.evolving_attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 3,
        *,
        w_prev: float = 0.5,
        w_conv: float = 1.0,
        activation: str = "relu",
        negative_slope: float = 0.01,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        evolve: bool = True,
        carry_activation: str = "identity",
        carry_dropout: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        for name, value in (("activation", activation), ("carry_activation", carry_activation)):
            if value not in ACTIVATIONS:
                raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {value!r}")
        if not 0.0 <= carry_dropout < 1.0:
            raise ValueError(f"carry_dropout must be in [0, 1), got {carry_dropout!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.w_prev, self.w_conv, self.activation, self.negative_slope = w_prev, w_conv, activation, negative_slope
        self.evolve, self.carry_activation, self.carry_dropout = evolve, carry_activation, carry_dropout
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.conv = nn.Conv2d(num_heads, num_heads, kernel_size, padding=kernel_size // 2)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_attention(cls, attention: nn.Module, **kwargs) -> EvolvingAttention:
        """Convert a timm/ViT-style attention (``qkv`` and ``proj`` linears,
        ``num_heads``): copies its weights; the convolution starts as the
        identity (centre tap 1 on the diagonal, bias 0). As a first layer it
        computes the old module exactly (no map step there); with
        ``activation="identity"`` and ``w_prev=0`` it does so after another
        layer too."""
        dim = attention.qkv.in_features
        module = cls(dim, attention.num_heads, qkv_bias=attention.qkv.bias is not None, **kwargs)
        with torch.no_grad():
            module.qkv.load_state_dict(attention.qkv.state_dict())
            module.proj.load_state_dict(attention.proj.state_dict())
            module.init_identity()
        return module.to(attention.qkv.weight.device, attention.qkv.weight.dtype)

    @torch.no_grad()
    def init_identity(self) -> None:
        """Make the head-mixing convolution the identity map."""
        self.conv.weight.zero_()
        centre = self.conv.kernel_size[0] // 2
        for h in range(self.num_heads):
            self.conv.weight[h, h, centre, centre] = 1.0
        self.conv.bias.zero_()

    def _previous_map(self, prev_logits: torch.Tensor | None, b: int, n: int) -> torch.Tensor | None:
        """prev_logits if this layer evolves it; None for plain attention."""
        if prev_logits is None or not self.evolve:
            return None
        if not isinstance(prev_logits, torch.Tensor) or prev_logits.dim() != 4:
            raise ValueError(f"prev_logits must be a (B, H, N, N) tensor, got {_describe(prev_logits)}")
        pb, ph, pn, pm = prev_logits.shape
        if (pb, ph) != (b, self.num_heads) or pn != pm:
            raise ValueError(
                f"prev_logits must have shape (B, H, N', N') = ({b}, {self.num_heads}, N', N'), "
                f"got {tuple(prev_logits.shape)}; only N' may differ (a stage change)"
            )
        return prev_logits if pn == n else None  # N changed (a new stage): no map step, as in the official code

    def forward(self, x: torch.Tensor, prev_logits: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, C) with C = {self.dim}, got {_describe(x)}")
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        prev_logits = self._previous_map(prev_logits, b, n)
        out, evolved = ops.evolving_attention(
            q,
            k,
            v,
            prev_logits,
            self.conv.weight,
            self.conv.bias,
            w_prev=self.w_prev,
            w_conv=self.w_conv,
            activation=self.activation,
            negative_slope=self.negative_slope,
            mask=mask,
            scale=self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            backend=self.backend,
        )
        out = out.transpose(1, 2).reshape(b, n, c)
        carried = activate(evolved, self.carry_activation, self.negative_slope)
        if self.carry_dropout > 0.0 and self.training:
            carried = torch.nn.functional.dropout(carried, self.carry_dropout)
        return self.proj_drop(self.proj(out)), carried

    def extra_repr(self) -> str:
        extra = "" if self.evolve else ", evolve=False"
        if self.carry_activation != "identity" or self.carry_dropout:
            extra += f", carry=({self.carry_activation!r}, dropout={self.carry_dropout})"
        return (
            f"heads={self.num_heads}, w_prev={self.w_prev}, w_conv={self.w_conv}, activation={self.activation!r}"
            f"{extra}, backend={self.backend}"
        )


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class EvolvingTransformerEncoderLayer(nn.Module):
    """A Transformer encoder layer around :class:`EvolvingAttention`:
    pre-norm (ViT) or post-norm (BERT), GELU MLP. ``forward(x, prev_logits,
    mask) -> (x, logits)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        norm_first: bool = True,
        dropout: float = 0.0,
        **attention_kwargs,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EvolvingAttention(dim, num_heads, proj_drop=dropout, **attention_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x, prev_logits=None, mask=None):
        if self.norm_first:
            y, logits = self.attn(self.norm1(x), prev_logits, mask)
            x = x + y
            return x + self.mlp(self.norm2(x)), logits
        y, logits = self.attn(x, prev_logits, mask)
        x = self.norm1(x + y)
        return self.norm2(x + self.mlp(x)), logits


class EvolvingTransformerEncoder(nn.Module):
    """A stack of :class:`EvolvingTransformerEncoderLayer` s that chains the
    evolved logits from each layer to the next (the first layer is plain
    attention, as in the official code).
    ``forward(x (B, N, C), mask=None) -> x``; ``return_logits=True`` also gives
    the last layer's logits."""

    def __init__(self, dim: int, depth: int, num_heads: int, **layer_kwargs) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.layers = nn.ModuleList(
            [EvolvingTransformerEncoderLayer(dim, num_heads, **layer_kwargs) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, return_logits: bool = False):
        logits = None
        for layer in self.layers:
            x, logits = layer(x, logits, mask)
        return (x, logits) if return_logits else x
