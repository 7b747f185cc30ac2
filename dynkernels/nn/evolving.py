"""Evolving Attention modules (Wang et al., arXiv 2102.12895): a drop-in
ViT/timm-style attention whose pre-softmax logits evolve from layer to layer
through a head-mixing convolution, and an encoder that chains them."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


class EvolvingAttention(nn.Module):
    """Multi-head self-attention with evolving logits, timm's ``Attention``
    layout (``qkv``, ``proj``) plus ``conv`` (the H -> H head-mixing
    convolution over the N x N map).

    ``forward(x (B, N, C), prev_logits=None, mask=None) -> (y (B, N, C), logits (B, H, N, N))``:
    logits are this layer's evolved logits (unmasked), to pass to the next
    layer. A prev_logits of another N (a stage change) is not mixed, as in the
    official code. mask: bool (True masks out) or additive, broadcastable to
    (B, H, N, N), added after the convolution.

    Args:
        w_prev, w_conv: the mix weights (the official code's beta and alpha;
            EA-AA-ResNet uses w_prev=0.5, w_conv=1.0, the defaults).
        activation: "relu" (EA-AA-ResNet), "leaky_relu" (EA-DC) or "identity".
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
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.w_prev, self.w_conv, self.activation, self.negative_slope = w_prev, w_conv, activation, negative_slope
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
        identity (centre tap 1 on the diagonal, bias 0), so with
        ``activation="identity"`` and ``w_prev=0`` the new module computes the
        old one exactly."""
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

    def forward(self, x: torch.Tensor, prev_logits: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if prev_logits is not None and prev_logits.shape != (b, self.num_heads, n, n):
            prev_logits = None  # N changed (a new stage): no mixing, as in the official code
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
        return self.proj_drop(self.proj(out)), evolved

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, w_prev={self.w_prev}, w_conv={self.w_conv}, activation={self.activation!r}, "
            f"backend={self.backend}"
        )


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
    evolved logits from each layer to the next (the first layer mixes none).
    ``forward(x (B, N, C), mask=None) -> x``; ``return_logits=True`` also gives
    the last layer's logits."""

    def __init__(self, dim: int, depth: int, num_heads: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [EvolvingTransformerEncoderLayer(dim, num_heads, **layer_kwargs) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, return_logits: bool = False):
        logits = None
        for layer in self.layers:
            x, logits = layer(x, logits, mask)
        return (x, logits) if return_logits else x
