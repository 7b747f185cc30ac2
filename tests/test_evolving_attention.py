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
        logits, prev, weight, bias, w_prev=0.3, w_conv=0.5, activation=activation
    )
    want = _direct(logits, prev, weight, bias, 0.3, 0.5, activation)
    torch.testing.assert_close(evolved, want)
    torch.testing.assert_close(probs, want.softmax(-1))


def test_no_mix_equals_zero_prev_weight():
    torch.manual_seed(1)
    logits, prev = torch.randn(2, 2, 2, 9, 9, dtype=torch.float64)
    weight, bias = torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    alone, _ = reference.evolve_attention_logits(logits, None, weight, bias, w_prev=0.7, w_conv=1.0)
    ignored, _ = reference.evolve_attention_logits(logits, prev, weight, bias, w_prev=0.0, w_conv=1.0)
    torch.testing.assert_close(alone, ignored)


def test_mask_is_added_after_the_convolution():
    torch.manual_seed(2)
    b, h, n = 1, 2, 6
    logits = torch.randn(b, h, n, n, dtype=torch.float64)
    weight, bias = torch.randn(h, h, 3, 3, dtype=torch.float64), torch.zeros(h, dtype=torch.float64)
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    plain, _ = reference.evolve_attention_logits(logits, None, weight, bias, w_prev=0.0, w_conv=0.5)
    evolved, probs = reference.evolve_attention_logits(logits, None, weight, bias, w_prev=0.0, w_conv=0.5, mask=causal)
    torch.testing.assert_close(evolved, plain)  # the stored logits never see the mask
    assert (probs[..., causal] == 0).all()
    additive = torch.zeros(n, n, dtype=torch.float64).masked_fill(causal, float("-inf"))
    _, probs_add = reference.evolve_attention_logits(logits, None, weight, bias, w_prev=0.0, w_conv=0.5, mask=additive)
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
