"""Evolving Attention against the official code's control flow (issue 10).

A float64 transcription of the official layer, written from its formula and
its branches (EA-AA-ResNet's TensorFlow ``asconv2d_fixed_padding``, EA-DC's
``EAAugmentedConv1d`` and ``EACausalConvolutionBlock``): without a previous
map of the same N there is no map step; EA-DC passes ``dropout(leaky_relu(A))``
on. The modules are held to it over a chain of layers with a stage change, on
every backend, forward and backward; then the NaN / Inf, fully masked row and
bad-input cases of the issue.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, kernel_cases

from dynkernels import nn as dnn
from dynkernels import ops, reference

BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference")] + kernel_cases("evolve_attention_logits")

EA_AA_RESNET = dict(w_prev=0.5, w_conv=1.0, activation="relu")
EA_DC = dict(w_prev=0.3, w_conv=0.5, activation="leaky_relu", carry_activation="leaky_relu")


def _official_layer(attn: dnn.EvolvingAttention, x, prev, mask=None):
    """One official attention layer in float64, from its formula: returns
    (y, the map passed to the next layer)."""
    b, n, c = x.shape
    h, d = attn.num_heads, c // attn.num_heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    s = (q * d**-0.5) @ k.transpose(-1, -2)
    if attn.evolve and prev is not None and prev.shape[-1] == n:
        mixed = (1 - attn.w_prev) * s + attn.w_prev * prev
        z = F.conv2d(mixed, attn.conv.weight, attn.conv.bias, padding=attn.conv.kernel_size[0] // 2)
        z = torch.relu(z) if attn.activation == "relu" else F.leaky_relu(z, attn.negative_slope)
        a = attn.w_conv * z + (1 - attn.w_conv) * mixed
    else:
        a = s  # the first layer, a stage change, or with_att_conv=False
    scores = a if mask is None else a.masked_fill(mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    y = out @ attn.proj.weight.T + attn.proj.bias
    carried = F.leaky_relu(a, attn.negative_slope) if attn.carry_activation == "leaky_relu" else a
    return y, carried


def _chain(layers, x16, tokens_9x16, run):
    """Layers 0, 1 at N = 16, a token reduction to N = 9 (a stage change), then
    layers 2, 3: the first layer, a middle layer, a stage change, a layer after it."""
    y, prev = run(layers[0], x16, None)
    y, prev = run(layers[1], y, prev)
    y9 = tokens_9x16 @ y
    y, prev = run(layers[2], y9, prev)
    y, prev = run(layers[3], y, prev)
    return y, prev


def _layers(config, backend, dim=24, heads=4):
    torch.manual_seed(11)
    layers = []
    for _ in range(4):
        layer = dnn.EvolvingAttention(dim, heads, backend=backend, **config).double()
        with torch.no_grad():  # ordinary random scales, as a trained layer has
            layer.conv.weight.normal_(0.0, 0.3)
            layer.conv.bias.normal_(0.0, 0.5)
        layers.append(layer)
    return layers


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("config", [EA_AA_RESNET, EA_DC], ids=["ea-aa-resnet", "ea-dc"])
def test_layer_chain_matches_the_official_layer(device, backend, config):
    layers = [m.to(device) for m in _layers(config, backend)]
    g = torch.Generator().manual_seed(3)
    x16 = torch.randn(2, 16, 24, generator=g, dtype=torch.float64).to(device).requires_grad_()
    tokens = torch.randn(9, 16, generator=g, dtype=torch.float64).to(device) / 4
    y, carried = _chain(layers, x16, tokens, lambda m, x, p: m(x, p))
    y_off, carried_off = _chain(layers, x16, tokens, _official_layer)
    torch.testing.assert_close(y, y_off, **TOLERANCES[torch.float64])
    torch.testing.assert_close(carried, carried_off, **TOLERANCES[torch.float64])
    g_y, g_c = torch.randn_like(y), torch.randn_like(carried)
    params = [p for m in layers for p in m.parameters()] + [x16]
    loss = lambda out: (out[0] * g_y).sum() + (out[1] * g_c).sum()
    grads = torch.autograd.grad(loss((y, carried)), params, allow_unused=True)
    want = torch.autograd.grad(loss((y_off, carried_off)), params, allow_unused=True)
    for ours, truth in zip(grads, want, strict=True):
        assert ours is not None  # every parameter gets a gradient, unused ones zeros
        torch.testing.assert_close(ours, torch.zeros_like(ours) if truth is None else truth, rtol=1e-10, atol=1e-10)
    # The first layer and the stage change have no map step: their conv gets zeros.
    by_param = dict(zip(map(id, params), grads, strict=True))
    for layer in (layers[0], layers[2]):
        assert (by_param[id(layer.conv.weight)] == 0).all() and (by_param[id(layer.conv.bias)] == 0).all()
    assert (by_param[id(layers[1].conv.weight)] != 0).any()


def test_ea_dc_first_block_and_carried_dropout():
    # EA-DC builds both attention layers of its first block with with_att_conv=False:
    # evolve=False is plain attention even when given a previous map.
    torch.manual_seed(12)
    attn = dnn.EvolvingAttention(16, 2, evolve=False, **EA_DC).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    prev = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    y, carried = attn(x, prev)
    y_off, carried_off = _official_layer(attn, x, prev)
    torch.testing.assert_close(y, y_off)
    torch.testing.assert_close(carried, carried_off)
    # The carried map's dropout acts in training only, on what is passed on.
    attn = dnn.EvolvingAttention(16, 2, carry_dropout=0.5, **EA_DC).double()
    attn.eval()
    torch.testing.assert_close(attn(x, prev)[1], _official_layer(attn, x, prev)[1])
    attn.train()
    y_train, dropped = attn(x, prev)
    torch.testing.assert_close(y_train, attn.eval()(x, prev)[0])  # the layer's own output does not see it
    kept = dropped != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(dropped[kept], 2 * _official_layer(attn, x, prev)[1][kept])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_first_layer_equals_sdpa(device, backend):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 13, 8, generator=g, dtype=torch.float64).to(device) for _ in range(3))
    weight = torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    causal = torch.ones(13, 13, dtype=torch.bool, device=device).triu(1)
    for mask in (None, causal):
        out, logits = ops.evolving_attention(
            q, k, v, None, weight, bias, w_prev=0.5, w_conv=1.0, mask=mask, backend=backend
        )
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else ~mask)
        torch.testing.assert_close(out, want, **TOLERANCES[torch.float64])
        torch.testing.assert_close(logits, q @ k.transpose(-1, -2) / 8**0.5, **TOLERANCES[torch.float64])
        d_weight, d_bias = torch.autograd.grad(out.sum() + logits.sum(), (weight, bias))
        assert (d_weight == 0).all() and (d_bias == 0).all()


def test_convolve_without_prev_keeps_the_map_step():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 2, 6, 6, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    kw = dict(w_prev=0.5, w_conv=1.0, activation="identity")
    plain, _ = ops.evolve_attention_logits(logits, None, weight, bias, **kw)
    assert torch.equal(plain, logits)
    conv, _ = ops.evolve_attention_logits(logits, None, weight, bias, convolve_without_prev=True, **kw)
    torch.testing.assert_close(conv, F.conv2d(logits, weight, bias, padding=1))


def test_from_attention_reproduces_the_source_with_the_default_activation():
    torch.manual_seed(6)
    source = dnn.EvolvingAttention(48, 6).double()  # as a stand-in for timm's layout: qkv, proj, num_heads
    converted = dnn.EvolvingAttention.from_attention(source)
    assert converted.activation == "relu"
    x = torch.randn(3, 20, 48, dtype=torch.float64)
    y, logits = converted(x)
    q, k, v = converted.qkv(x).reshape(3, 20, 3, 6, 8).permute(2, 0, 3, 1, 4)
    want = converted.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 20, 48))
    torch.testing.assert_close(y, want)


# ---- NaN and Inf ----------------------------------------------------------------------


def _map_inputs(device, seed=1, b=1, h=3, n=7):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(device)
    return make(b, h, n, n), make(b, h, n, n), make(h, h, 3, 3), make(h)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize(
    "value,activation", [(float("nan"), "relu"), (float("inf"), "identity"), (float("-inf"), "leaky_relu")]
)
def test_nan_and_inf_propagate_as_in_the_reference(device, backend, value, activation):
    logits, prev, weight, bias = _map_inputs(device)
    logits[0, 1, 3, 3] = value
    kw = dict(w_prev=0.5, w_conv=1.0, activation=activation)
    got = ops.evolve_attention_logits(logits, prev, weight, bias, backend=backend, **kw)
    want = reference.evolve_attention_logits(logits, prev, weight, bias, **kw)
    for ours, theirs in zip(got, want, strict=True):
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.isinf(), theirs.isinf())
        finite = theirs.isfinite()
        torch.testing.assert_close(ours[finite], theirs[finite], **TOLERANCES[torch.float32])
        # the same signs on the infinities
        assert torch.equal(ours[theirs.isinf()], theirs[theirs.isinf()])


# ---- fully masked rows ---------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_fully_masked_row_passes_no_gradient(device, backend, kind):
    logits, prev, weight, bias = (t.double() for t in _map_inputs(device))
    mask = torch.zeros(1, 1, 7, 7, dtype=torch.bool, device=device)
    mask[..., 2, :] = True  # query row 2: every key masked
    mask[..., 4, 5:] = True  # row 4: partly
    if kind == "float":
        mask = torch.zeros(mask.shape, dtype=torch.float64, device=device).masked_fill(mask, float("-inf"))
    weights_of_probs = torch.arange(49.0, dtype=torch.float64, device=device).view(7, 7)
    leaves = [t.requires_grad_() for t in (logits, prev, weight, bias)]
    kw = dict(w_prev=0.5, w_conv=0.7, activation="leaky_relu", mask=mask)

    def grads(backend_):
        evolved, probs = ops.evolve_attention_logits(*leaves, backend=backend_, **kw)
        assert probs[0, :, 2].isnan().all()  # as torch.softmax gives
        loss = (probs.nan_to_num() * weights_of_probs).sum() + evolved.sum()
        return torch.autograd.grad(loss, leaves)

    want = grads("reference")
    for ours, truth in zip(grads(backend), want, strict=True):
        assert truth.isfinite().all()
        torch.testing.assert_close(ours, truth, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_encoder_with_a_fully_padded_sequence_matches_the_reference(device, backend):
    torch.manual_seed(3)
    encoder = dnn.EvolvingTransformerEncoder(16, depth=2, num_heads=2, backend=backend).double().to(device)
    ref = copy.deepcopy(encoder)
    for m in ref.modules():
        if isinstance(m, dnn.EvolvingAttention):
            m.backend = "reference"
    x = torch.randn(2, 6, 16, dtype=torch.float64, device=device)
    pad = torch.zeros(2, 1, 1, 6, dtype=torch.bool, device=device)
    pad[1] = True  # the second sequence is all padding
    for model in (encoder, ref):
        model(x, pad)[0].sum().backward()
    for (name, ours), theirs in zip(encoder.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(ours.grad.isfinite(), theirs.grad.isfinite()), name
        finite = theirs.grad.isfinite()
        torch.testing.assert_close(ours.grad[finite], theirs.grad[finite], **TOLERANCES[torch.float64])
    # The first layer has no map step: its conv gets zeros, not the padded sequence's NaN.
    first = encoder.layers[0].attn.conv
    assert (first.weight.grad == 0).all() and (first.bias.grad == 0).all()


# ---- bad inputs -------------------------------------------------------------------------------


def test_bad_module_inputs_raise_clear_errors():
    attn = dnn.EvolvingAttention(16, 2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for prev in (torch.zeros(3, 2, 5, 5), torch.zeros(2, 4, 5, 5), torch.zeros(2, 2, 5, 4)):
        with pytest.raises(ValueError, match="prev_logits must have shape"):
            attn(x, prev.double())
    with pytest.raises(ValueError, match=r"prev_logits must be a \(B, H, N, N\) tensor"):
        attn(x, torch.zeros(2, 2, 5))
    for bad in (torch.randn(5, 16), torch.randn(1, 2, 5, 16), torch.randn(2, 5, 12)):
        with pytest.raises(ValueError, match=r"x must have shape \(B, N, C\) with C = 16"):
            attn(bad.double())
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        dnn.EvolvingAttention(12, 0)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        dnn.EvolvingAttention(0, 2)
    with pytest.raises(ValueError, match="carry_activation"):
        dnn.EvolvingAttention(16, 2, carry_activation="gelu")
    with pytest.raises(ValueError, match="carry_dropout"):
        dnn.EvolvingAttention(16, 2, carry_dropout=1.0)
    for depth in (-1, 0, 2.0):
        with pytest.raises(ValueError, match="depth must be a positive int"):
            dnn.EvolvingTransformerEncoder(16, depth=depth, num_heads=2)
    s = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="unknown backend"):  # also without a previous map (plain attention)
        ops.evolve_attention_logits(s, None, torch.randn(2, 2, 3, 3), None, w_prev=0, w_conv=1, backend="bogus")
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.evolve_attention_logits(s, None, torch.randn(2, 2, 3, 3), None, w_prev=0, w_conv=1, mask=torch.zeros(4, 4))
    q = torch.randn(1, 2, 5, 0)
    with pytest.raises(ValueError, match="head dimension d >= 1"):
        ops.evolving_attention(q, q, torch.randn(1, 2, 5, 3), None, torch.randn(2, 2, 3, 3), None, w_prev=0, w_conv=1)


# ---- torch.compile and opcheck on non-contiguous logits --------------------------------------------


@pytest.mark.parametrize("device,backend", kernel_cases("evolve_attention_logits"))
def test_non_contiguous_logits_compile_and_pass_opcheck(device, backend):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(1, 2, 7, 7, generator=g, dtype=torch.float64).to(device)
    logits = base.transpose(-1, -2)  # non-contiguous
    prev = torch.randn(1, 2, 7, 7, generator=g, dtype=torch.float64).to(device).transpose(-1, -2)
    weight = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64).to(device)
    bias = torch.randn(2, generator=g, dtype=torch.float64).to(device)
    fn = lambda s, p: ops.evolve_attention_logits(s, p, weight, bias, w_prev=0.5, w_conv=1.0, backend=backend)
    eager = fn(logits, prev)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(logits, prev)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)
    op = (
        torch.ops.dynkernels.evolve_attention_logits_triton
        if backend == "triton"
        else torch.ops.dynkernels.evolve_attention_logits
    )
    mask = torch.zeros(7, 7, dtype=torch.float64, device=device).masked_fill(
        torch.ones(7, 7, dtype=torch.bool, device=device).triu(1), float("-inf")
    )
    samples = [
        (logits.requires_grad_(), prev, weight, bias, 0.5, 1.0, 1, 0.01, None),
        (logits, None, weight.requires_grad_(), bias, 0.5, 0.7, 2, 0.1, mask.T.expand(1, 2, 7, 7)),
    ]
    for args in samples:
        torch.library.opcheck(op.default, args)


def test_first_layer_compiles_with_zero_conv_gradients():
    q, k, v = (torch.randn(2, 3, 9, 4, requires_grad=True) for _ in range(3))
    weight, bias = torch.randn(3, 3, 3, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    fn = lambda q, k, v: ops.evolving_attention(q, k, v, None, weight, bias, w_prev=0.5, w_conv=1.0)
    out, logits = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    (out.sum() + logits.sum()).backward()
    assert (weight.grad == 0).all() and (bias.grad == 0).all()
