"""Token routing modules (issue 15): a mixture-of-experts MLP and in-place
patches of timm ``VisionTransformer``s (ToMe merging, EViT pruning, MoE MLPs),
over :mod:`dynkernels.ops.token_routing` and :mod:`dynkernels.ops.token_routing_moe`.

* :class:`MoEMlp` -- a drop-in for timm's ``Mlp`` with a router (softmax
  top-k), E experts (fc1, activation, fc2 each), dispatch, two grouped GEMMs
  and the weighted combine; the load-balancing loss of the last forward is
  ``aux_loss``. :func:`apply_moe` swaps a ViT's MLPs every ``every`` blocks
  (``upcycle=True``: every expert starts as a copy of the dense MLP, so the
  patched model computes what it did before), :func:`moe_aux_loss` sums the
  auxiliary losses.
* :func:`apply_tome` -- ToMe's timm patch (``tome/patch/timm.py``): each block
  takes the key mean over heads as the metric, merges r tokens after its
  attention by size-weighted averages, and with ``prop_attn`` adds
  ``log(size)`` to the attention logits. The attention runs through SDPA with
  that bias (ToMe materialises the attention).
* :class:`DynamicViTPredictor` and :func:`apply_dynamicvit` -- DynamicViT
  (``models/dyvit.py``): at the pruning locations a predictor scores the
  tokens from a local and a policy-pooled global feature; training keeps a
  Gumbel hard decision per token (straight-through) and runs every block with
  the masked attention ``softmax_with_policy`` (the fused op); eval keeps the
  ``int(N0 keep_ratio)`` best-scored tokens by ``batch_index_select`` and runs
  the blocks unmasked (SDPA). :func:`dynamicvit_decisions` returns the last
  training forward's decisions (for DynamicViT's ratio loss).
* :func:`apply_evit` -- EViT: at the given blocks, the CLS attention row
  (from the CLS query alone; SDPA stays) selects ``ceil(keep_rate (N - 1))``
  tokens after the attention and fuses the rest into one token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._backends import check_module_backend, op_backend
from ..ops._validation import check_int

__all__ = [
    "DynamicViTPredictor",
    "MoEMlp",
    "apply_dynamicvit",
    "apply_evit",
    "apply_moe",
    "apply_tome",
    "dynamicvit_decisions",
    "moe_aux_loss",
]

_MOE_OPS = ("moe_dispatch", "moe_grouped_mm", "moe_combine")


class MoEMlp(nn.Module):
    """timm ``Mlp``'s signature plus the experts: x (..., in) -> (..., out).

    Expert weights are (E, in, hidden) / (E, hidden, out), initialised as
    ``nn.Linear``'s. ``capacity_factor=None``: dropless; otherwise each expert
    takes at most ceil(cf T k / E) assignments (GShard's priority; dropped ones
    add nothing, so a token whose every choice is dropped outputs 0 -- the
    block's residual carries it). ``normalize``: the k weights sum to 1."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer=nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
        *,
        num_experts: int = 8,
        k: int = 2,
        capacity_factor: float | None = None,
        normalize: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        check_module_backend(backend, *_MOE_OPS)
        self.in_features = check_int("in_features", in_features, 1)
        self.hidden_features = check_int("hidden_features", hidden_features or in_features, 1)
        self.out_features = check_int("out_features", out_features or in_features, 1)
        self.num_experts = check_int("num_experts", num_experts, 1)
        self.k = check_int("k", k, 1, num_experts)
        self.capacity_factor, self.normalize, self.backend = capacity_factor, normalize, backend
        e, d, h, o = self.num_experts, self.in_features, self.hidden_features, self.out_features
        self.router = nn.Linear(d, e, bias=False)
        self.fc1_weight = nn.Parameter(torch.empty(e, d, h))
        self.fc1_bias = nn.Parameter(torch.empty(e, h)) if bias else None
        self.fc2_weight = nn.Parameter(torch.empty(e, h, o))
        self.fc2_bias = nn.Parameter(torch.empty(e, o)) if bias else None
        self.act = act_layer()
        self.drop1, self.drop2 = nn.Dropout(drop), nn.Dropout(drop)
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1 / math.sqrt(weight.shape[1])  # nn.Linear's default, per expert
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def __getstate__(self):  # copies and pickles drop the last forward's loss (a graph node)
        state = self.__dict__.copy()
        state["aux_loss"] = None
        return state

    @classmethod
    def from_mlp(cls, mlp: nn.Module, **kwargs) -> MoEMlp:
        """Upcycling: every expert a copy of a timm ``Mlp`` (fc1, act, fc2)."""
        fc1, fc2 = mlp.fc1, mlp.fc2
        if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
            raise TypeError(f"mlp must have nn.Linear fc1 and fc2, got {type(fc1).__name__} and {type(fc2).__name__}")
        has_bias = fc1.bias is not None and fc2.bias is not None
        kwargs.setdefault("act_layer", type(mlp.act) if hasattr(mlp, "act") else nn.GELU)
        moe = cls(fc1.in_features, fc1.out_features, fc2.out_features, bias=has_bias, **kwargs)
        moe.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        with torch.no_grad():
            moe.fc1_weight.copy_(fc1.weight.t().expand_as(moe.fc1_weight))
            moe.fc2_weight.copy_(fc2.weight.t().expand_as(moe.fc2_weight))
            if has_bias:
                moe.fc1_bias.copy_(fc1.bias.expand_as(moe.fc1_bias))
                moe.fc2_bias.copy_(fc2.bias.expand_as(moe.fc2_bias))
        return moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must be (..., {self.in_features}), got {tuple(x.shape)}")
        tokens = x.reshape(-1, self.in_features)
        logits = self.router(tokens)
        weights, experts = ops.moe_route(logits, self.k, normalize=self.normalize)
        self.aux_loss = ops.load_balancing_loss(logits.softmax(dim=-1), experts, self.num_experts)
        be = self.backend
        rows, plan = ops.moe_dispatch(
            tokens,
            experts,
            self.num_experts,
            capacity_factor=self.capacity_factor,
            backend=op_backend(be, "moe_dispatch"),
        )
        h = ops.moe_grouped_mm(
            rows, self.fc1_weight, plan.offsets, self.fc1_bias, backend=op_backend(be, "moe_grouped_mm")
        )
        h = self.drop1(self.act(h))
        y = ops.moe_grouped_mm(
            h, self.fc2_weight, plan.offsets, self.fc2_bias, backend=op_backend(be, "moe_grouped_mm")
        )
        out = ops.moe_combine(y, plan, weights.to(y.dtype), backend=op_backend(be, "moe_combine"))
        return self.drop2(out).reshape(*x.shape[:-1], self.out_features)


def _blocks(model: nn.Module):
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"model must be a timm VisionTransformer (with .blocks), got {type(model).__name__}")
    return list(blocks)


def apply_moe(model: nn.Module, every: int = 2, *, upcycle: bool = True, **moe_kwargs) -> nn.Module:
    """Replace the MLP of blocks every-1, 2 every-1, ... by a :class:`MoEMlp`
    (``moe_kwargs``: num_experts, k, capacity_factor, normalize, backend).
    ``upcycle``: experts copied from the dense MLP; else freshly initialised."""
    every = check_int("every", every, 1)
    for i, block in enumerate(_blocks(model)):
        if i % every != every - 1:
            continue
        mlp = block.mlp
        if upcycle:
            block.mlp = MoEMlp.from_mlp(mlp, **moe_kwargs)
        else:
            moe = MoEMlp(mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features, **moe_kwargs)
            block.mlp = moe.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
    return model


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of every MoEMlp's load-balancing loss from the last forward."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoEMlp) and m.aux_loss is not None]
    if not losses:
        raise ValueError("the model has no MoEMlp that ran a forward")
    return torch.stack(losses).sum()


# ---- ToMe ---------------------------------------------------------------------


def _heads(attn: nn.Module, x: torch.Tensor):
    """timm Attention's q, k, v (B, H, N, d), normalised as it does."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attend(attn: nn.Module, q, k, v, bias, x_shape):
    b, n, _ = x_shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
    return attn.proj_drop(attn.proj(out))


def _check_vit_attention(block: nn.Module) -> None:
    attn = block.attn
    for name in ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "proj"):
        if not hasattr(attn, name):
            raise TypeError(f"block.attn must be timm's Attention (no {name!r} on {type(attn).__name__})")
    if getattr(attn, "gate", None) is not None:
        raise TypeError("gated timm attention is not supported by the token routing patches")


def _no_mask(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("the token routing patches do not take an attention mask or causal attention")


def _tome_block_forward(self, x: torch.Tensor, attn_mask=None, is_causal=False) -> torch.Tensor:
    _no_mask(attn_mask, is_causal)
    info = self._tome_info
    h = self.norm1(x)
    q, k, v = _heads(self.attn, h)
    bias = None
    if info["prop_attn"] and info["size"] is not None:
        bias = ops.proportional_attention_bias(info["size"]).to(q.dtype)
    x = x + self.drop_path1(self.ls1(_attend(self.attn, q, k, v, bias, h.shape)))
    r = info["r"].pop(0)
    if r > 0:
        metric = k.mean(dim=1)  # ToMe's metric: the keys averaged over heads
        match = ops.bipartite_soft_matching(
            metric, r, class_token=info["class_token"], distill_token=info["distill_token"], backend=info["backend"]
        )
        size = info["size"] if info["size"] is not None else x.new_ones(x.shape[0], x.shape[1], 1)
        x, info["size"] = ops.merge_tokens(x, match, size, mode="wavg", distill_token=info["distill_token"])
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _schedule(r, depth: int) -> list[int]:
    if isinstance(r, int):
        return [check_int("r", r, 0)] * depth
    r = [check_int("r", v, 0) for v in r]
    if len(r) != depth:
        raise ValueError(f"r must be an int or one value per block ({depth}), got {len(r)}")
    return r


def _patch_class(module: nn.Module, name: str, forward, **extra) -> None:
    base = type(module)
    if getattr(base, "_dk_patched", None) == name:
        return
    module.__class__ = type(f"{name}{base.__name__}", (base,), {"forward": forward, "_dk_patched": name, **extra})


def apply_tome(model: nn.Module, r, *, prop_attn: bool = True, backend: str | None = None) -> nn.Module:
    """Patch a timm VisionTransformer in place so every block merges r tokens
    (an int, or one value per block) after its attention, as ToMe's timm patch.
    ``model.r`` may be changed later. The class and distillation tokens are
    protected when the model has them (``cls_token``, ``dist_token``).
    Differs from ToMe's patch on purpose: timm's LayerScale (``ls1``, ``ls2``;
    identity without it) is applied, the attention is SDPA with the log-size
    bias as an additive mask (ToMe materialises it), and source tracing is
    not implemented."""
    blocks = _blocks(model)
    _schedule(r, len(blocks))
    for block in blocks:
        _check_vit_attention(block)
    model.r = r
    info = {"prop_attn": prop_attn, "backend": backend, "size": None, "r": []}
    info["class_token"] = getattr(model, "cls_token", None) is not None
    info["distill_token"] = getattr(model, "dist_token", None) is not None
    model._tome_info = info
    for block in blocks:
        block._tome_info = info
        _patch_class(block, "ToMe", _tome_block_forward)

    def forward(self, *args, **kwargs):
        self._tome_info["r"] = _schedule(self.r, len(self.blocks))
        self._tome_info["size"] = None
        try:
            return type(self).__mro__[1].forward(self, *args, **kwargs)
        finally:
            self._tome_info["size"] = None  # no graph kept alive (or copied) past the forward

    _patch_class(model, "ToMe", forward)
    return model


# ---- EViT ---------------------------------------------------------------------


def _evit_block_forward(self, x: torch.Tensor, attn_mask=None, is_causal=False) -> torch.Tensor:
    _no_mask(attn_mask, is_causal)
    h = self.norm1(x)
    q, k, v = _heads(self.attn, h)
    x = x + self.drop_path1(self.ls1(_attend(self.attn, q, k, v, None, h.shape)))
    keep = ops.evit_keep_count(x.shape[1], self._evit_keep_rate)
    if keep < x.shape[1] - 1:
        scores = ops.cls_attention_scores(q[:, :, 0], k, scale=self.attn.scale)
        x, _ = ops.prune_tokens(x, scores, keep, fuse_complement=self._evit_fuse)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def apply_evit(model: nn.Module, keep_rate: float, locations=(3, 6, 9), *, fuse_token: bool = True) -> nn.Module:
    """Patch the blocks at ``locations`` (DeiT: 3, 6, 9) to keep
    ``ceil(keep_rate (N - 1))`` tokens after their attention, by the CLS
    attention averaged over heads, and fuse the others into one
    (``fuse_token``), as EViT. Needs a class token."""
    blocks = _blocks(model)
    if getattr(model, "cls_token", None) is None:
        raise ValueError("EViT needs a class token (model.cls_token)")
    ops.evit_keep_count(2, keep_rate)  # validates keep_rate
    for i in locations:
        if not 0 <= check_int("location", i) < len(blocks):
            raise ValueError(f"locations must lie in [0, {len(blocks)}), got {i}")
        block = blocks[i]
        _check_vit_attention(block)
        block._evit_keep_rate, block._evit_fuse = keep_rate, fuse_token
        _patch_class(block, "EViT", _evit_block_forward)
    return model


# ---- DynamicViT ---------------------------------------------------------------


class DynamicViTPredictor(nn.Module):
    """DynamicViT's PredictorLG: x (B, N, C), policy (B, N, 1) -> log-probabilities
    (B, N, 2) of (keep, drop). A LayerNorm + Linear + GELU, half the features
    kept per token and half averaged over the kept tokens, then a 3-layer MLP
    (C -> C/2 -> C/4 -> 2) and a log-softmax."""

    def __init__(self, embed_dim: int = 384):
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim, 4)
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2),
            nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4),
            nn.GELU(),
            nn.Linear(embed_dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        b, n, c = x.shape
        local_x = x[:, :, : c // 2]
        global_x = (x[:, :, c // 2 :] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local_x, global_x.expand(b, n, c // 2)], dim=-1))


def _policy_attention(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor, backend) -> torch.Tensor:
    """DynamicViT's Attention with a policy: materialised logits, the fused masked softmax."""
    b, n, _ = x.shape
    q, k, v = _heads(attn, x)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    probs = attn.attn_drop(ops.softmax_with_policy(logits, policy, backend=backend))
    out = attn.norm((probs @ v).transpose(1, 2).reshape(b, n, -1))
    return attn.proj_drop(attn.proj(out))


def _dynamicvit_block_forward(self, x, policy=None, attn_mask=None, is_causal=False):
    if policy is None:
        return type(self).__mro__[1].forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    _no_mask(attn_mask, is_causal)
    x = x + self.drop_path1(self.ls1(_policy_attention(self.attn, self.norm1(x), policy, self._dynamicvit_backend)))
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _dynamicvit_forward(self, images: torch.Tensor) -> torch.Tensor:
    x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))
    b, n0 = x.shape[0], x.shape[1] - 1
    prev = x.new_ones(b, n0, 1)
    policy = x.new_ones(b, n0 + 1, 1)
    decisions = []
    stage = 0
    for i, block in enumerate(self.blocks):
        if i in self._dynamicvit_locations:
            score = self.score_predictor[stage](x[:, 1:], prev).reshape(b, -1, 2)
            if self.training:
                keep = F.gumbel_softmax(score, hard=True)[:, :, 0:1] * prev
                decisions.append(keep.reshape(b, n0))
                policy = torch.cat([x.new_ones(b, 1, 1), keep], dim=1)
                x = block(x, policy=policy)
                prev = keep
            else:
                n_keep = int(n0 * self._dynamicvit_ratios[stage])
                order = torch.argsort(score[:, :, 0], dim=1, descending=True)[:, :n_keep]
                now = torch.cat([order.new_zeros(b, 1), order + 1], dim=1)
                x = block(ops.batch_index_select(x, now))
                prev = ops.batch_index_select(prev, order)
            stage += 1
        else:
            x = block(x, policy=policy) if self.training else block(x)
    self._dynamicvit_decisions = decisions
    return self.forward_head(self.norm(x))


def apply_dynamicvit(model: nn.Module, keep_ratio=0.7, locations=(3, 6, 9), *, backend=None) -> nn.Module:
    """Patch a timm VisionTransformer in place into DynamicViT: a
    :class:`DynamicViTPredictor` before each block in ``locations`` (DeiT: 3,
    6, 9), keep ratios ``keep_ratio ** (s + 1)`` at stage s (or one ratio per
    location), relative to the initial token count as DynamicViT's. Needs a
    class token and no other prefix token."""
    blocks = _blocks(model)
    if getattr(model, "cls_token", None) is None or getattr(model, "num_prefix_tokens", 1) != 1:
        raise ValueError("DynamicViT needs exactly one prefix token, the class token")
    locations = tuple(check_int("location", i) for i in locations)
    if sorted(set(locations)) != list(locations) or not all(0 <= i < len(blocks) for i in locations):
        raise ValueError(f"locations must be increasing block indices in [0, {len(blocks)}), got {locations}")
    if isinstance(keep_ratio, (int, float)):
        ratios = [float(keep_ratio) ** (s + 1) for s in range(len(locations))]
    else:
        ratios = [float(r) for r in keep_ratio]
    if len(ratios) != len(locations) or not all(0 < r <= 1 for r in ratios):
        raise ValueError(f"keep_ratio must be in (0, 1] (or one such per location), got {keep_ratio}")
    dim = blocks[0].norm1.normalized_shape[0]
    predictors = [DynamicViTPredictor(dim) for _ in locations]
    weight = model.cls_token
    model.score_predictor = nn.ModuleList(predictors).to(device=weight.device, dtype=weight.dtype)
    model._dynamicvit_locations, model._dynamicvit_ratios = locations, ratios
    model._dynamicvit_decisions = []
    for block in blocks:
        _check_vit_attention(block)
        block._dynamicvit_backend = backend
        _patch_class(block, "DynamicViT", _dynamicvit_block_forward)
    _patch_class(model, "DynamicViT", _dynamicvit_forward, __getstate__=_without_decisions)
    return model


def _without_decisions(self):  # copies and pickles drop the last forward's decisions (graph nodes)
    state = self.__dict__.copy()
    state["_dynamicvit_decisions"] = []
    return state


def dynamicvit_decisions(model: nn.Module) -> list[torch.Tensor]:
    """The hard keep decisions (B, N0) of each stage from the last training forward."""
    if not hasattr(model, "_dynamicvit_decisions"):
        raise ValueError("the model is not patched by apply_dynamicvit")
    return list(model._dynamicvit_decisions)
