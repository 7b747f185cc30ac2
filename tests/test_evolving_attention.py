"""Evolving Attention's reference (dynkernels.reference.evolve_attention_logits,
evolving_attention) against a direct, loop-level reading of the paper's
official formula. The kernels of issue 4 will be held to this reference."""

from __future__ import annotations

import pytest
import torch

from dynkernels import reference


def _direct(logits, prev, weight, bias, w_prev, w_conv, activation):
    """M, the 3x3 head-mixing convolution with zero padding over the
    (query, key) plane, act, residual: one output pixel at a time."""
    b, h, n, _ = logits.shape
    mixed = logits if prev is None else (1 - w_prev) * logits + w_prev * prev
    k = weight.shape[-1]
    r = k // 2
    padded = torch.zeros(b, h, n + 2 * r, n + 2 * r, dtype=logits.dtype)
    padded[:, :, r : r + n, r : r + n] = mixed
    conv = torch.zeros_like(mixed)
    for ho in range(h):
        acc = torch.zeros(b, n, n, dtype=logits.dtype) + (bias[ho] if bias is not None else 0.0)
        for hi in range(h):
            for di in range(k):
                for dj in range(k):
                    acc += weight[ho, hi, di, dj] * padded[:, hi, di : di + n, dj : dj + n]
        conv[:, ho] = acc
    act = {"identity": lambda t: t, "relu": torch.relu, "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.01)}
    return w_conv * act[activation](conv) + (1 - w_conv) * mixed


@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu"])
@pytest.mark.parametrize("with_prev", [False, True])
def test_reference_matches_the_formula(activation, with_prev):
    torch.manual_seed(0)
    b, h, n = 2, 3, 7
    logits = torch.randn(b, h, n, n, dtype=torch.float64)
    prev = torch.randn(b, h, n, n, dtype=torch.float64) if with_prev else None
    weight = torch.randn(h, h, 3, 3, dtype=torch.float64)
    bias = torch.randn(h, dtype=torch.float64)
    evolved, probs = reference.evolve_attention_logits(
        logits, prev, weight, bias, w_prev=0.3, w_conv=0.5, activation=activation, convolve_without_prev=True
    )
    want = _direct(logits, prev, weight, bias, 0.3, 0.5, activation)
    torch.testing.assert_close(evolved, want)
    torch.testing.assert_close(probs, want.softmax(-1))


def test_no_mix_equals_zero_prev_weight():
    torch.manual_seed(1)
    logits, prev = torch.randn(2, 2, 2, 9, 9, dtype=torch.float64)
    weight, bias = torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    alone, _ = reference.evolve_attention_logits(
        logits, None, weight, bias, w_prev=0.7, w_conv=1.0, convolve_without_prev=True
    )
    ignored, _ = reference.evolve_attention_logits(logits, prev, weight, bias, w_prev=0.0, w_conv=1.0)
    torch.testing.assert_close(alone, ignored)


def test_mask_is_added_after_the_convolution():
    torch.manual_seed(2)
    b, h, n = 1, 2, 6
    logits = torch.randn(b, h, n, n, dtype=torch.float64)
    weight, bias = torch.randn(h, h, 3, 3, dtype=torch.float64), torch.zeros(h, dtype=torch.float64)
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    kw = dict(w_prev=0.0, w_conv=0.5, convolve_without_prev=True)
    plain, _ = reference.evolve_attention_logits(logits, None, weight, bias, **kw)
    evolved, probs = reference.evolve_attention_logits(logits, None, weight, bias, mask=causal, **kw)
    torch.testing.assert_close(evolved, plain)  # the stored logits never see the mask
    assert (probs[..., causal] == 0).all()
    additive = torch.zeros(n, n, dtype=torch.float64).masked_fill(causal, float("-inf"))
    _, probs_add = reference.evolve_attention_logits(logits, None, weight, bias, mask=additive, **kw)
    torch.testing.assert_close(probs, probs_add)


def test_attention_step_is_probs_times_values():
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 2, 4, 11, 8, dtype=torch.float64)
    weight, bias = torch.randn(4, 4, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    prev = torch.randn(2, 4, 11, 11, dtype=torch.float64)
    out, evolved = reference.evolving_attention(q, k, v, prev, weight, bias, w_prev=0.5, w_conv=1.0)
    logits = q @ k.transpose(-1, -2) / 8**0.5
    want_evolved, probs = reference.evolve_attention_logits(logits, prev, weight, bias, w_prev=0.5, w_conv=1.0)
    torch.testing.assert_close(evolved, want_evolved)
    torch.testing.assert_close(out, probs @ v)


def test_unknown_activation_raises():
    x = torch.randn(1, 1, 3, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.evolve_attention_logits(x, None, torch.randn(1, 1, 3, 3), None, w_prev=0, w_conv=1, activation="gelu")


# ---- the fused map step (dynkernels.ops.evolve_attention_logits) ----------------

from conftest import TOLERANCES, assert_close_to_float64, kernel_cases  # noqa: E402

from dynkernels import ops  # noqa: E402
from dynkernels._backends import usable_backends  # noqa: E402

MAP_CASES = kernel_cases("evolve_attention_logits")


def _skip_large_under_interpreter(device, backend, n):
    # The Triton interpreter takes ~40 s per N = 197 map: those sizes run on
    # GPUs; on CPU the Triton kernels see N = 7 .. 50 (50 is no multiple of
    # its key block either).
    if backend == "triton" and device == "cpu" and n > 64:
        pytest.skip("large N under the Triton interpreter: run on a GPU")


def _map_inputs(dtype, b=2, h=3, n=13, prev=True, k=3, device="cpu"):
    g = torch.Generator().manual_seed(n + h)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).to(device)
    return make(b, h, n, n), (make(b, h, n, n) if prev else None), make(h, h, k, k) * 0.3, make(h)


@pytest.mark.parametrize("device,backend", MAP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu"])
@pytest.mark.parametrize(
    "n,prev,mask_kind", [(13, True, None), (50, False, "causal"), (197, True, "padding"), (7, True, "float")]
)
def test_map_step_matches_reference(device, backend, dtype, activation, n, prev, mask_kind):
    _skip_large_under_interpreter(device, backend, n)
    logits, prev_logits, weight, bias = _map_inputs(dtype, n=n, prev=prev, device=device)
    mask = None
    if mask_kind == "causal":
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    elif mask_kind == "padding":  # (B, 1, 1, N): the last keys of the second sample are padding
        mask = torch.zeros(2, 1, 1, n, dtype=torch.bool)
        mask[1, ..., n - 20 :] = True
    elif mask_kind == "float":
        mask = torch.randn(n, n, dtype=dtype)
    mask = mask.to(device) if mask is not None else None
    leaves = [t.requires_grad_() for t in (logits, prev_logits, weight, bias) if t is not None]
    kwargs = dict(
        w_prev=0.3, w_conv=0.6, activation=activation, negative_slope=0.2, mask=mask, convolve_without_prev=True
    )
    got = ops.evolve_attention_logits(logits, prev_logits, weight, bias, backend=backend, **kwargs)
    want = reference.evolve_attention_logits(logits, prev_logits, weight, bias, **kwargs)
    tol = TOLERANCES[dtype]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)
    if mask is not None and mask.dtype == torch.bool:
        assert (got[1][mask.expand_as(got[1])] == 0).all()  # masked keys get exactly no weight
    g_e, g_p = torch.randn_like(want[0]), torch.randn_like(want[1])
    grads = torch.autograd.grad((got[0] * g_e).sum() + (got[1] * g_p).sum(), leaves)
    ref_grads = torch.autograd.grad((want[0] * g_e).sum() + (want[1] * g_p).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(leaves64)
    s64 = next(it)
    p64 = next(it) if prev else None
    w64, b64 = next(it), next(it)
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    exact = reference.evolve_attention_logits(s64, p64, w64, b64, **dict(kwargs, mask=mask64))
    exact_grads = torch.autograd.grad((exact[0] * g_e.double()).sum() + (exact[1] * g_p.double()).sum(), leaves64)
    _assert_grads_close(grads, ref_grads, exact_grads, dtype)


@pytest.mark.parametrize("device,backend", MAP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("h,k,n", [(1, 3, 9), (5, 3, 31), (8, 3, 196), (12, 1, 20), (3, 5, 17), (6, 7, 40)])
def test_map_step_head_counts_and_kernel_sizes(device, backend, dtype, h, k, n):
    _skip_large_under_interpreter(device, backend, n)
    # K = 3 takes the Winograd path, other K the direct one; head counts that
    # do not fill the kernels' head groups (2 and 4) exercise their padding.
    logits, prev_logits, weight, bias = _map_inputs(dtype, b=2, h=h, n=n, k=k, device=device)
    kwargs = dict(w_prev=0.4, w_conv=0.7, activation="relu")
    leaves = [t.requires_grad_() for t in (logits, prev_logits, weight, bias)]
    got = ops.evolve_attention_logits(logits, prev_logits, weight, bias, backend=backend, **kwargs)
    want = reference.evolve_attention_logits(logits, prev_logits, weight, bias, **kwargs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])
    g_p = torch.randn_like(want[1])
    loss = lambda out, g=g_p: (out[1] * g.to(out[1].dtype)).sum() + out[0].sum()
    grads = torch.autograd.grad(loss(got), leaves)
    ref_grads = torch.autograd.grad(loss(want), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    exact_grads = torch.autograd.grad(loss(reference.evolve_attention_logits(*leaves64, **kwargs)), leaves64)
    _assert_grads_close(grads, ref_grads, exact_grads, dtype)


def _assert_grads_close(grads, ref_grads, exact_grads, dtype):
    """float64: within the tolerance table of the float64 truth. float32: at most
    twice the float32 reference's own error against that truth (the weight
    gradient sums B*N*N products, so a fixed tolerance would not be honest)."""
    for ours, torchs, truth in zip(grads, ref_grads, exact_grads, strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(ours, truth, **TOLERANCES[dtype])
        else:
            assert_close_to_float64(ours, torchs, truth)


@pytest.mark.parametrize("device,backend", MAP_CASES)
def test_map_step_gradcheck(device, backend):
    # w_conv = 1 with ReLU / LeakyReLU, and identity: the C++ backward reads act'(Z) off A;
    # otherwise it recomputes Z.
    cases = (
        (True, True, 3, 2, 0.7, "leaky_relu"),
        (False, False, 5, 2, 0.7, "leaky_relu"),
        (True, False, 3, 3, 0.7, "leaky_relu"),
        (True, True, 3, 2, 1.0, "relu"),
        (True, True, 3, 2, 1.0, "leaky_relu"),
        (False, True, 3, 2, 0.6, "identity"),
    )
    for prev, with_bias, k, h, w_conv, activation in cases:
        logits, prev_logits, weight, bias = _map_inputs(torch.float64, b=1, h=h, n=5, prev=prev, k=k, device=device)
        bias = bias if with_bias else None
        inputs = [t.requires_grad_() for t in (logits, prev_logits, weight, bias) if t is not None]

        def fn(*xs, prev=prev, with_bias=with_bias, w_conv=w_conv, activation=activation):
            it = iter(xs)
            s, p = next(it), next(it) if prev else None
            w, b = next(it), next(it) if with_bias else None
            return ops.evolve_attention_logits(
                s,
                p,
                w,
                b,
                w_prev=0.4,
                w_conv=w_conv,
                activation=activation,
                negative_slope=0.1,
                convolve_without_prev=True,
                backend=backend,
            )

        # Under the Triton interpreter every launch costs ~0.1 s: the fast mode
        # (random projections of the Jacobian) keeps it to seconds.
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton" and device == "cpu")


def test_map_step_opcheck_and_compile():
    logits, prev_logits, weight, bias = _map_inputs(torch.float64, b=1, h=2, n=6)
    args = (logits.requires_grad_(), prev_logits, weight.requires_grad_(), bias, 0.5, 1.0, 1, 0.01, None)
    torch.library.opcheck(torch.ops.dynkernels.evolve_attention_logits.default, args)
    if "triton" in usable_backends("evolve_attention_logits", "cpu"):
        mask = torch.zeros(1, 2, 6, 6, dtype=torch.float64).masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
        args = (logits, None, weight, bias, 0.5, 1.0, 2, 0.01, mask)
        torch.library.opcheck(torch.ops.dynkernels.evolve_attention_logits_triton.default, args)
    fn = lambda s, p, w, b: ops.evolve_attention_logits(
        s, p, w, b, w_prev=0.5, w_conv=1.0, mask=torch.ones(6, 6, dtype=torch.bool).triu(1)
    )
    eager = fn(logits, prev_logits, weight, bias)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(logits, prev_logits, weight, bias)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)


def test_map_step_bad_inputs():
    logits, prev_logits, weight, bias = _map_inputs(torch.float32)
    kw = dict(w_prev=0.5, w_conv=1.0)
    with pytest.raises(ValueError, match="H = 3"):
        ops.evolve_attention_logits(logits, prev_logits, weight[:2, :2], bias, **kw)
    with pytest.raises(ValueError, match="must match logits"):
        ops.evolve_attention_logits(logits, prev_logits[..., :5, :5], weight, bias, **kw)
    with pytest.raises(ValueError, match="odd"):
        ops.evolve_attention_logits(logits, prev_logits, torch.randn(3, 3, 4, 4), bias, **kw)
    with pytest.raises(ValueError, match="activation"):
        ops.evolve_attention_logits(logits, prev_logits, weight, bias, activation="gelu", **kw)
    with pytest.raises(TypeError, match="dtype"):
        ops.evolve_attention_logits(logits, prev_logits.double(), weight, bias, **kw)
    with pytest.raises(ValueError, match="broadcast"):
        ops.evolve_attention_logits(logits, prev_logits, weight, bias, mask=torch.zeros(5, 5), **kw)
    with pytest.raises(ValueError, match=r"\(B, H, N, N\)"):
        ops.evolve_attention_logits(logits[..., :4], None, weight, bias, **kw)


# ---- modules -----------------------------------------------------------------------

import copy  # noqa: E402

from dynkernels import nn as dnn  # noqa: E402


def _set_backend(module, backend):
    for sub in module.modules():
        if isinstance(sub, dnn.EvolvingAttention):
            sub.backend = backend
    return module


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_trains_alike_on_kernel_and_reference_paths(norm_first):
    torch.manual_seed(5)
    encoder = dnn.EvolvingTransformerEncoder(
        32, depth=3, num_heads=4, norm_first=norm_first, w_prev=0.3, w_conv=0.7, activation="leaky_relu"
    ).double()
    paths = {"kernel": encoder, "reference": _set_backend(copy.deepcopy(encoder), "reference")}
    optims = {k: torch.optim.SGD(m.parameters(), lr=0.05) for k, m in paths.items()}
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    target = torch.randn(2, 19, 32, dtype=torch.float64)
    causal = torch.triu(torch.ones(19, 19, dtype=torch.bool), diagonal=1)
    losses = {k: [] for k in paths}
    for _ in range(3):
        for name, model in paths.items():
            optims[name].zero_grad()
            loss = (model(x, causal) - target).square().mean()
            loss.backward()
            optims[name].step()
            losses[name].append(loss.item())
    assert losses["kernel"] == pytest.approx(losses["reference"], rel=1e-10, abs=1e-12)
    assert losses["kernel"][-1] < losses["kernel"][0]


def test_from_attention_reproduces_plain_attention():
    torch.manual_seed(6)

    class Attention(torch.nn.Module):  # timm's layout
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads = num_heads
            self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
            attn = ((q * (c // self.num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    plain = Attention(48, 6).double()
    converted = dnn.EvolvingAttention.from_attention(plain, w_prev=0.0, activation="identity")
    x = torch.randn(3, 50, 48, dtype=torch.float64)
    y, logits = converted(x)
    torch.testing.assert_close(y, plain(x))
    assert logits.shape == (3, 6, 50, 50)


def test_attention_does_not_mix_across_a_change_of_n():
    torch.manual_seed(7)
    attn = dnn.EvolvingAttention(16, 2).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    alone, _ = attn(x)
    other_stage, _ = attn(x, prev_logits=torch.randn(1, 2, 12, 12, dtype=torch.float64))
    torch.testing.assert_close(alone, other_stage)
    with pytest.raises(ValueError, match="divisible"):
        dnn.EvolvingAttention(10, 3)


# ---- the whole attention step (dynkernels.ops.evolving_attention) ------------

STEP_CASES = kernel_cases("evolving_attention")


def _step_inputs(dtype, b=2, h=3, n=11, d=4, prev=True, device="cpu"):
    g = torch.Generator().manual_seed(n * h + d)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).to(device)
    q, k, v = make(b, h, n, d), make(b, h, n, d), make(b, h, n, d + 1)
    return q, k, v, (make(b, h, n, n) if prev else None), make(h, h, 3, 3) * 0.3, make(h)


@pytest.mark.parametrize("device,backend", STEP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,prev,mask_kind", [(11, True, None), (50, False, "causal"), (20, True, "padding")])
def test_attention_step_matches_reference(device, backend, dtype, n, prev, mask_kind):
    q, k, v, prev_logits, weight, bias = _step_inputs(dtype, n=n, prev=prev, device=device)
    mask = None
    if mask_kind == "causal":
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    elif mask_kind == "padding":
        mask = torch.zeros(2, 1, 1, n, dtype=torch.bool)
        mask[0, ..., n - 5 :] = True
    mask = mask.to(device) if mask is not None else None
    leaves = [t.requires_grad_() for t in (q, k, v, prev_logits, weight, bias) if t is not None]
    kwargs = dict(w_prev=0.5, w_conv=1.0, activation="relu", mask=mask, scale=0.7)
    got = ops.evolving_attention(q, k, v, prev_logits, weight, bias, backend=backend, **kwargs)
    want = reference.evolving_attention(q, k, v, prev_logits, weight, bias, **kwargs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])
    g_out, g_a = torch.randn_like(want[0]), torch.randn_like(want[1])
    loss = lambda out: (out[0] * g_out.to(out[0].dtype)).sum() + (out[1] * g_a.to(out[1].dtype)).sum()
    grads = torch.autograd.grad(loss(got), leaves)
    ref_grads = torch.autograd.grad(loss(want), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(leaves64)
    q64, k64, v64 = next(it), next(it), next(it)
    p64 = next(it) if prev else None
    exact = reference.evolving_attention(q64, k64, v64, p64, next(it), next(it), **kwargs)
    _assert_grads_close(grads, ref_grads, torch.autograd.grad(loss(exact), leaves64), dtype)


@pytest.mark.parametrize("device,backend", STEP_CASES)
def test_attention_step_gradcheck(device, backend):
    q, k, v, prev_logits, weight, bias = _step_inputs(torch.float64, b=1, h=2, n=5, d=2, device=device)
    inputs = [t.requires_grad_() for t in (q, k, v, prev_logits, weight, bias)]
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1).to(device)

    def fn(*xs):
        return ops.evolving_attention(
            *xs, w_prev=0.3, w_conv=0.8, activation="leaky_relu", negative_slope=0.1, mask=mask, backend=backend
        )

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton" and device == "cpu")


def test_attention_step_compiles_and_first_layer_does_not_mix():
    q, k, v, _, weight, bias = _step_inputs(torch.float32, prev=False)
    fn = lambda q, k, v, prev: ops.evolving_attention(q, k, v, prev, weight, bias, w_prev=0.5, w_conv=1.0)
    eager = fn(q, k, v, None)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, None)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)
    # No prev: plain attention (the logits are S), whatever w_prev says.
    again = ops.evolving_attention(q, k, v, None, weight, bias, w_prev=0.9, w_conv=1.0)
    torch.testing.assert_close(again[0], eager[0])
    torch.testing.assert_close(again[1], q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5)
    # Mixing with zeros at w_prev = 0.5 halves S instead: a different map.
    mixed = ops.evolving_attention(q, k, v, torch.zeros_like(eager[1]), weight, bias, w_prev=0.5, w_conv=1.0)
    assert not torch.allclose(mixed[1], eager[1])


def test_attention_step_bad_inputs():
    q, k, v, prev_logits, weight, bias = _step_inputs(torch.float32)
    kw = dict(w_prev=0.5, w_conv=1.0)
    with pytest.raises(ValueError, match="share"):
        ops.evolving_attention(q, k[:, :, :5], v, prev_logits, weight, bias, **kw)
    with pytest.raises(ValueError, match=r"\(H, H, K, K\)"):
        ops.evolving_attention(q, k, v, prev_logits, weight[:2, :2], bias, **kw)
    with pytest.raises(ValueError, match="prev_logits"):
        ops.evolving_attention(q, k, v, prev_logits[:, :, :4, :4], weight, bias, **kw)
    with pytest.raises(ValueError, match="odd"):
        ops.evolving_attention(q, k, v, prev_logits, torch.randn(3, 3, 2, 2), bias, **kw)
    with pytest.raises(TypeError, match="dtype"):
        ops.evolving_attention(q, k, v.double(), prev_logits, weight, bias, **kw)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.evolving_attention(q, k, v, prev_logits, weight, bias, dropout_p=1.0, **kw)


@pytest.mark.parametrize(
    "device,backend",
    [c for c in STEP_CASES if c.values[0] == "cuda"]
    or [pytest.param("cuda", "triton", marks=pytest.mark.skip(reason="needs a CUDA GPU"))],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_step_half_precision_on_gpu(device, backend, dtype):
    # Half inputs, float32 arithmetic: within twice the error of the reference
    # run in that half dtype, both against the float64 reference.
    q, k, v, prev_logits, weight, bias = _step_inputs(torch.float64, b=2, h=12, n=197, d=64, device=device)
    kw = dict(w_prev=0.5, w_conv=1.0, activation="relu", scale=0.125)
    exact = reference.evolving_attention(q, k, v, prev_logits, weight, bias, **kw)
    half = [t.to(dtype) for t in (q, k, v, prev_logits, weight, bias)]
    got = ops.evolving_attention(*half, backend=backend, **kw)
    theirs = reference.evolving_attention(*half, **kw)
    for ours, ref_half, truth in zip(got, theirs, exact, strict=True):
        assert ours.dtype == dtype
        assert_close_to_float64(ours, ref_half, truth)
