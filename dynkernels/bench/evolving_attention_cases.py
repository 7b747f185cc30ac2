"""Benchmark cases of Evolving Attention: the fused map step and the whole
attention step against the reference (plain PyTorch: Conv2d, add, softmax,
matmul, as the official code runs it), forward and forward+backward, time and
peak memory, at the issue's sizes: ViT-B/16 at 224 (N=197, H=12, d=64),
BERT-base (N=512, H=12, d=64) and the attention-augmented ResNet stage
(N=196, H=8, d=8); batch 4 on CPU, 32 on a GPU."""

from __future__ import annotations

import torch

from .. import ops, reference
from .base import Case as _case
from .base import Impl as _impl

FAMILY = "evolving_attention"

# (name, N, H, d)
SIZES = (("ViT-B/16", 197, 12, 64), ("BERT-base", 512, 12, 64), ("AA-ResNet", 196, 8, 8))
PARAMS = dict(w_prev=0.5, w_conv=1.0, activation="relu")  # EA-AA-ResNet's settings


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def _tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)


def _impls(fns, inputs, grads, backward: bool) -> list:
    """Timed callables: the forward under no_grad, or forward + backward to
    every input (the same output gradients for each implementation). fns:
    (name, fn, kind) or (name, fn, kind, agrees)."""
    impls = []
    for name, fn, kind, *agrees in fns:
        if backward:

            def run(fn=fn):
                outs = fn()
                return torch.autograd.grad(outs, inputs, grads)

        else:

            def run(fn=fn):
                with torch.no_grad():
                    return fn()

        impls.append(_impl(name, run, kind, agrees[0] if agrees else True, measure_memory=True))
    return impls


def _check(got, want, dtype) -> None:
    """Outputs must agree before anything is timed."""
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **_tolerance(dtype))


def map_setup(batch: int, n: int, heads: int, device: str, backward: bool):
    g = torch.Generator().manual_seed(n + heads)
    dtype = _dtype(device)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(device, dtype).requires_grad_(backward)
    logits, prev = make(batch, heads, n, n), make(batch, heads, n, n)
    weight, bias = make(heads, heads, 3, 3, s=0.2), make(heads, s=0.1)
    inputs = (logits, prev, weight, bias)
    ours = lambda: ops.evolve_attention_logits(*inputs, **PARAMS)
    ref = lambda: reference.evolve_attention_logits(*inputs, **PARAMS)
    with torch.no_grad():
        _check(ours(), ref(), dtype)
    grads = (torch.randn(logits.shape, generator=g).to(device, dtype),) * 2
    return _impls([("dynkernels", ours, "kernel"), ("reference", ref, "reference")], inputs, grads, backward)


def step_setup(batch: int, n: int, heads: int, d: int, device: str, backward: bool):
    g = torch.Generator().manual_seed(n * heads + d)
    dtype = _dtype(device)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(device, dtype).requires_grad_(backward)
    q, k, v = make(batch, heads, n, d), make(batch, heads, n, d), make(batch, heads, n, d)
    prev = make(batch, heads, n, n)
    weight, bias = make(heads, heads, 3, 3, s=0.2), make(heads, s=0.1)
    inputs = (q, k, v, prev, weight, bias)
    ours = lambda: ops.evolving_attention(*inputs, **PARAMS)
    ref = lambda: reference.evolving_attention(*inputs, **PARAMS)
    with torch.no_grad():
        _check(ours(), ref(), dtype)
    grads = (
        torch.randn(batch, heads, n, d, generator=g).to(device, dtype),
        torch.randn(batch, heads, n, n, generator=g).to(device, dtype),
    )
    return _impls([("dynkernels", ours, "kernel"), ("reference", ref, "reference")], inputs, grads, backward)


def first_layer_setup(batch: int, n: int, heads: int, d: int, device: str, backward: bool):
    """The first layer (no previous map): plain attention in both the official
    code and dynkernels. Also timed: the map step run on S alone (what
    dynkernels computed there before it followed the official code), and
    torch's SDPA plus the S the next layer needs, as the floor's anchor."""
    g = torch.Generator().manual_seed(n * heads + d + 1)
    dtype = _dtype(device)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(device, dtype).requires_grad_(backward)
    q, k, v = make(batch, heads, n, d), make(batch, heads, n, d), make(batch, heads, n, d)
    weight, bias = make(heads, heads, 3, 3, s=0.2), make(heads, s=0.1)
    inputs = (q, k, v)
    ours = lambda: ops.evolving_attention(q, k, v, None, weight, bias, **PARAMS)
    ref = lambda: reference.evolving_attention(q, k, v, None, weight, bias, **PARAMS)
    convolved = lambda: ops.evolving_attention(q, k, v, None, weight, bias, convolve_without_prev=True, **PARAMS)
    sdpa = lambda: (torch.nn.functional.scaled_dot_product_attention(q, k, v), q @ k.transpose(-1, -2) * d**-0.5)
    with torch.no_grad():
        _check(ours(), ref(), dtype)
        _check(ours(), sdpa(), dtype)
    grads = (
        torch.randn(batch, heads, n, d, generator=g).to(device, dtype),
        torch.randn(batch, heads, n, n, generator=g).to(device, dtype),
    )
    fns = [
        ("dynkernels", ours, "kernel"),
        ("reference", ref, "reference"),
        ("map step on S (before)", convolved, "anchor", False),
        ("torch SDPA + S", sdpa, "anchor", True),
    ]
    return _impls(fns, inputs, grads, backward)


def _floors(batch: int, n: int, heads: int, d: int, op: str, backward: bool, elem: int) -> dict:
    """Bytes and FLOPs the step must at least move and do, in float32 (bf16 on
    GPU): the map step reads S and A_prev and writes A and P (its backward
    reads those and the two output gradients, and writes dS and dA_prev); the
    3x3 head-mixing convolution is 9H multiply-adds per map element; Q K^T and
    P V are 2 N^2 d each per head (the backward doubles the products)."""
    maps = batch * heads * n * n
    if op == "first layer":
        map_bytes, conv_flops = (1 + 1) * maps * elem, 0.0  # S written, P written (read back by P V)
    else:
        map_bytes, conv_flops = (
            (4 + (8 if backward else 0)) * maps * elem,
            2 * 9 * heads * maps * (3 if backward else 1),
        )
    matmul_flops = 0.0 if op == "map step" else 4 * maps * d * (3 if backward else 1)
    return dict(floor_bytes=map_bytes, floor_flops=conv_flops + matmul_flops)


def cases(size: str, device: str) -> list:
    elem = _dtype(device).itemsize
    batch = 32 if device == "cuda" else 4
    sizes = [("ViT-B/16", 197, 12, 64)] if size == "quick" else list(SIZES)
    if size == "quick":
        batch = 1
    out = []
    for name, n, heads, d in sizes:
        for backward in (False, True):
            suffix = " fwd+bwd" if backward else " fwd"
            params = dict(B=batch, N=n, H=heads, d=d, model=name)
            out.append(
                _case(
                    "evolving_attention",
                    "evolve_attention_logits" + suffix,
                    f"{name} B={batch} N={n} H={heads}",
                    lambda n=n, h=heads, bw=backward: map_setup(batch, n, h, device, bw),
                    params,
                    ("dynkernels", "reference"),
                    **_floors(batch, n, heads, d, "map step", backward, elem),
                )
            )
            out.append(
                _case(
                    "evolving_attention",
                    "evolving_attention" + suffix,
                    f"{name} B={batch} N={n} H={heads} d={d}",
                    lambda n=n, h=heads, d=d, bw=backward: step_setup(batch, n, h, d, device, bw),
                    params,
                    ("dynkernels", "reference"),
                    **_floors(batch, n, heads, d, "step", backward, elem),
                )
            )
            out.append(
                _case(
                    "evolving_attention",
                    "evolving_attention first layer" + suffix,
                    f"{name} B={batch} N={n} H={heads} d={d}",
                    lambda n=n, h=heads, d=d, bw=backward: first_layer_setup(batch, n, h, d, device, bw),
                    params,
                    ("dynkernels", "reference", "map step on S (before)", "torch SDPA + S"),
                    **_floors(batch, n, heads, d, "first layer", backward, elem),
                )
            )
    return out
