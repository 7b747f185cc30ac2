"""Benchmark cases of token routing (issue 15):

* ToMe's matching at N in {197, 577, 1025, 4096}, C = 64, against ToMe's own
  formulation (the materialised N/2 x N/2 scores, written from its
  algorithm), with peak memory. Floor: 2 N_a N_b C FLOPs over the GEMM rate.
* timm ViT-S/16 and ViT-B/16 (random weights, eval, float32) at batch 1 and
  8: ToMe r = 8 / 16 and EViT keep 0.7 (blocks 3, 6, 9) against the unpatched
  model. images/s = batch / time.
* DynamicViT's softmax_with_policy (DeiT-S: H = 6, N = 197, batch 8)
  forward and forward + backward against its own formulation (written from
  its code), with peak memory; floor: the logits read and the output written
  (and the gradient read and written) once.
* An MoE MLP layer (d -> 4d -> d, GELU, T = 4096, routing balanced or Zipf)
  forward and forward + backward: dispatch, two grouped GEMMs and the
  combine, against a per-expert Python loop, ``torch.nn.functional.grouped_mm``
  with a torch argsort dispatch (where torch has it), and the dense MLP over
  the same T k rows (the same active FLOPs: the floor the issue names).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import nn as dnn
from .. import ops
from ..reference import token_routing as ref
from .base import Case as _case
from .base import Impl as _impl
from .base import have

FAMILY = "token_routing"


def matching_setup(batch, n, c, r, device):
    g = torch.Generator().manual_seed(n)
    metric = torch.randn(batch, n, c, generator=g).to(device)
    ours = lambda: ops.bipartite_soft_matching(metric, r)  # noqa: E731
    tome = lambda: ref.bipartite_soft_matching(metric, r)  # noqa: E731
    if not all(torch.equal(a, b) for a, b in zip(ours(), tome(), strict=True)):
        raise AssertionError("bipartite_soft_matching disagrees with ToMe's formulation; refusing to time it")
    return [
        _impl("dynkernels", ours, "kernel", measure_memory=True),
        _impl("ToMe (materialised scores)", tome, "anchor", True, measure_memory=True),
    ]


def vit_setup(name, batch, image, device):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=image).to(device).eval()
    images = torch.randn(batch, 3, image, image, device=device)
    tome8, tome16 = (dnn.apply_tome(copy.deepcopy(model), r) for r in (8, 16))
    evit = dnn.apply_evit(copy.deepcopy(model), 0.7, (3, 6, 9))
    dyvit = dnn.apply_dynamicvit(copy.deepcopy(model), 0.7, (3, 6, 9)).eval()
    check = dnn.apply_tome(copy.deepcopy(model), 16, backend="reference")
    with torch.no_grad():
        if not torch.allclose(tome16(images), check(images), rtol=1e-4, atol=1e-4):
            raise AssertionError("apply_tome's kernels disagree with its reference matching; refusing to time it")

    def run(m):
        def call():
            with torch.no_grad():
                return m(images)

        return call

    return [
        _impl("ToMe r=16", run(tome16), "kernel", None),
        _impl("ToMe r=8", run(tome8), "variant", None),
        _impl("EViT 0.7", run(evit), "variant", None),
        _impl("DynamicViT 0.7", run(dyvit), "variant", None),
        _impl("unpatched", run(model), "anchor", None),
    ]


def moe_inputs(tokens, d, experts, k, routing, device, backward):
    g = torch.Generator().manual_seed(d * experts + k)
    layer = dnn.MoEMlp(d, 4 * d, num_experts=experts, k=k).to(device)
    x = torch.randn(tokens, d, generator=g).to(device).requires_grad_(backward)
    logits = torch.randn(tokens, experts, generator=g).to(device)
    if routing == "zipf":  # expert e chosen with odds ~ 1 / e^2
        logits = logits - 2.0 * torch.log(torch.arange(1, experts + 1, device=device, dtype=torch.float32))
    weights, chosen = ops.moe_route(logits, k)
    grad = torch.randn(tokens, d, generator=g).to(device)
    return layer, x, weights, chosen, grad


def moe_setup(tokens, d, experts, k, routing, backward, device):
    layer, x, weights, chosen, grad = moe_inputs(tokens, d, experts, k, routing, device, backward)
    w1, b1, w2, b2 = layer.fc1_weight, layer.fc1_bias, layer.fc2_weight, layer.fc2_bias

    def finish(out):
        if backward:  # as a training step after zero_grad(set_to_none=True): no accumulation into old grads
            for t in (x, w1, b1, w2, b2):
                t.grad = None
            out.backward(grad)
        return out.detach()

    def ours():
        rows, plan = ops.moe_dispatch(x, chosen, experts)
        hidden = F.gelu(ops.moe_grouped_mm(rows, w1, plan.offsets, b1))
        return finish(ops.moe_combine(ops.moe_grouped_mm(hidden, w2, plan.offsets, b2), plan, weights))

    def loop():  # the per-expert loop of the public MoE layers
        out = torch.zeros(tokens, d, device=x.device)
        for e in range(experts):
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            if token.numel():
                y = torch.addmm(b2[e], F.gelu(torch.addmm(b1[e], x[token], w1[e])), w2[e])
                out = out.index_add(0, token, y * weights[token, slot, None])
        return finish(out)

    def grouped():  # torch's grouped GEMM, torch's sort for the dispatch
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=experts)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        per_row = torch.repeat_interleave(torch.arange(experts, device=x.device), counts, output_size=flat.numel())
        hidden = F.gelu(F.grouped_mm(x[order // k], w1, offs=offs) + b1[per_row])
        y = (F.grouped_mm(hidden, w2, offs=offs) + b2[per_row]) * weights.reshape(-1)[order, None]
        return finish(torch.zeros(tokens, d, device=x.device).index_add(0, order // k, y))

    fc1, fc2 = torch.nn.Linear(d, 4 * d).to(device), torch.nn.Linear(4 * d, d).to(device)
    dense_x = torch.randn(tokens * k, d, device=x.device, requires_grad=backward)
    dense_grad = torch.randn(tokens * k, d, device=x.device)

    def dense():  # the same active FLOPs: T k rows through one MLP
        out = fc2(F.gelu(fc1(dense_x)))
        if backward:
            for t in (dense_x, *fc1.parameters(), *fc2.parameters()):
                t.grad = None
            out.backward(dense_grad)
        return out.detach()

    def wrap(fn):
        if backward:
            return fn

        def call():
            with torch.no_grad():
                return fn()

        return call

    mine, theirs = wrap(ours)(), wrap(loop)()
    if not torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4):
        raise AssertionError("the MoE layer disagrees with the per-expert loop; refusing to time it")
    impls = [_impl("dynkernels", wrap(ours), "kernel", measure_memory=True)]
    impls.append(_impl("per-expert loop", wrap(loop), "anchor", True, measure_memory=True))
    if hasattr(F, "grouped_mm"):
        agrees = torch.allclose(wrap(grouped)(), mine, rtol=1e-4, atol=1e-4)
        impls.append(_impl("F.grouped_mm", wrap(grouped), "anchor", agrees, measure_memory=True))
    impls.append(_impl("dense MLP (floor)", wrap(dense), "anchor", None, measure_memory=True))
    return impls


def policy_setup(b, h, n, backward, device):
    from ..reference import token_routing_pruning as pruning

    g = torch.Generator().manual_seed(n)
    attn = (torch.randn(b, h, n, n, generator=g) * 3).to(device).requires_grad_(backward)
    policy = (torch.rand(b, n, 1, generator=g) < 0.7).float().to(device).requires_grad_(backward)
    grad = torch.randn(b, h, n, n, generator=g).to(device)

    def run(fn):
        def call():
            if not backward:
                with torch.no_grad():
                    return fn(attn, policy)
            out = fn(attn, policy)
            out.backward(grad)
            return out.detach()

        return call

    ours, theirs = run(ops.softmax_with_policy), run(pruning.softmax_with_policy)
    if not torch.allclose(ours(), theirs(), rtol=1e-5, atol=1e-6):
        raise AssertionError("softmax_with_policy disagrees with DynamicViT's formulation; refusing to time it")
    return [
        _impl("dynkernels", ours, "kernel", measure_memory=True),
        _impl("DynamicViT's formulation", theirs, "anchor", True, measure_memory=True),
    ]


def _policy_cases(size, device):
    b, h, n = (2, 2, 17) if size == "quick" else (8, 6, 197)
    elements = b * h * n * n
    return [
        _case(
            FAMILY,
            "softmax_with_policy_fwd_bwd" if bwd else "softmax_with_policy_fwd",
            f"B={b} H={h} N={n}",
            lambda a=(b, h, n, bwd): policy_setup(*a, device),
            dict(B=b, H=h, N=n, backward=bwd),
            ("dynkernels", "DynamicViT's formulation"),
            floor_bytes=4 * elements * (5 if bwd else 2),
        )
        for bwd in (False, True)
    ]


def _vit_cases(size, device):
    if not have("timm"):
        return []
    if size == "quick":
        shapes = [("vit_tiny_patch16_224", 2, 64)]
    elif size == "full":
        shapes = [(m, b, 224) for m in ("vit_small_patch16_224", "vit_base_patch16_224") for b in (1, 8)]
    else:
        shapes = [("vit_small_patch16_224", 8, 224), ("vit_base_patch16_224", 8, 224)]
    return [
        _case(
            FAMILY,
            "vit_images",
            f"{name.split('_patch')[0]} B={b} {image}px",
            lambda a=(name, b, image): vit_setup(*a, device),
            dict(model=name, B=b, image=image),
            ("ToMe r=16", "ToMe r=8", "EViT 0.7", "DynamicViT 0.7", "unpatched"),
        )
        for name, b, image in shapes
    ]


def _moe_cases(size, device):
    if size == "quick":
        grid = [(64, 16, 4, 2, "balanced", False), (64, 16, 4, 2, "zipf", True)]
    elif size == "full":
        grid = [
            (4096, d, e, k, routing, bwd)
            for d in (384, 768)
            for e in (8, 64)
            for k in (1, 2)
            for routing in ("balanced", "zipf")
            for bwd in (False, True)
        ]
    else:
        grid = [
            (4096, 384, 8, 2, "balanced", False),
            (4096, 384, 8, 2, "balanced", True),
            (4096, 384, 64, 2, "zipf", False),
            (4096, 768, 8, 1, "balanced", True),
        ]
    names = ("dynkernels", "per-expert loop", "F.grouped_mm", "dense MLP (floor)")
    out = []
    for t, d, e, k, routing, bwd in grid:
        flops = 2 * 2 * t * k * d * 4 * d * (3 if bwd else 1)
        out.append(
            _case(
                FAMILY,
                "moe_mlp_fwd_bwd" if bwd else "moe_mlp_fwd",
                f"T={t} d={d} E={e} k={k} {routing}",
                lambda a=(t, d, e, k, routing, bwd): moe_setup(*a, device),
                dict(T=t, d=d, E=e, k=k, routing=routing, backward=bwd),
                names if hasattr(F, "grouped_mm") else tuple(n for n in names if n != "F.grouped_mm"),
                floor_flops=flops,
            )
        )
    return out


def cases(size: str, device: str) -> list:
    shapes = (
        [(2, 65, 16, 8)]
        if size == "quick"
        else [(8, 197, 64, 16), (8, 577, 64, 16), (8, 1025, 64, 16), (2, 4096, 64, 16)]
    )
    out = _vit_cases(size, device) + _policy_cases(size, device) + _moe_cases(size, device)
    for b, n, c, r in shapes:
        na, nb = (n + 1) // 2, n // 2
        out.append(
            _case(
                FAMILY,
                "bipartite_soft_matching",
                f"B={b} N={n} C={c} r={r}",
                lambda a=(b, n, c, r): matching_setup(*a, device),
                dict(B=b, N=n, C=c, r=r),
                ("dynkernels", "ToMe (materialised scores)"),
                floor_flops=2 * b * na * nb * c,
            )
        )
    return out
