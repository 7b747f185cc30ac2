"""Token routing, DynamicViT: softmax_with_policy (fused forward and
backward) and batch_index_select against float64 transcriptions of
DynamicViT's code (models/dyvit.py), and apply_dynamicvit against its
VisionTransformerDiffPruning forward in training (Gumbel decisions, the
masked attention in every block) and in eval (top-scored tokens kept)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_clear_error, assert_close_to_float64, bad_input_params, kernel_cases

from dynkernels import nn as dnn
from dynkernels import ops

CASES = kernel_cases("softmax_with_policy")


def _softmax_with_policy_official(attn, policy, eps=1e-6, compute=torch.float32):
    """DynamicViT's Attention.softmax_with_policy, transcribed; ``compute`` is
    its float32 cast (float64 here for the float64 comparisons)."""
    b, n, _ = policy.size()
    attn_policy = policy.reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, n, n)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_att
    attn = attn.to(compute).exp_() * attn_policy.to(compute)
    attn = (attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


def _batch_index_select_official(x, idx):
    b, n = x.shape[:2]
    offset = torch.arange(b, dtype=torch.long, device=x.device).view(b, 1) * n
    idx = idx + offset
    if x.dim() == 3:
        return x.reshape(b * n, x.shape[2])[idx.reshape(-1)].reshape(b, idx.shape[1], x.shape[2])
    return x.reshape(b * n)[idx.reshape(-1)].reshape(b, idx.shape[1])


def _inputs(b, h, n, policy_kind, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(b, h, n, n, generator=g, dtype=torch.float64) * 3
    if policy_kind == "hard":
        policy = (torch.rand(b, n, 1, generator=g) < 0.6).double()
        policy[:, 0] = 1  # the class token
    elif policy_kind == "soft":
        policy = torch.rand(b, n, 1, generator=g, dtype=torch.float64)
    else:  # "ties": tied row maxima, so the max's gradient must go to the first one
        policy = (torch.rand(b, n, 1, generator=g) < 0.5).double()
        attn = torch.round(attn)
    return attn.to(dtype), policy.to(dtype)


SHAPES = [(2, 3, 17), (1, 2, 1), (1, 1, 197), (2, 2, 40)]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-H{s[1]}-N{s[2]}")
@pytest.mark.parametrize("policy_kind", ["hard", "soft", "ties"])
def test_softmax_with_policy_and_its_gradients_equal_dynamicvit(device, backend, shape, policy_kind):
    attn, policy = _inputs(*shape, policy_kind)
    attn.requires_grad_()
    policy.requires_grad_()
    out = ops.softmax_with_policy(attn, policy, backend=backend)
    expected = _softmax_with_policy_official(attn, policy, compute=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    grad = torch.randn(out.shape, dtype=torch.float64)
    ga, gp = torch.autograd.grad(out, (attn, policy), grad)
    ea, ep = torch.autograd.grad(expected, (attn, policy), grad)
    torch.testing.assert_close(ga, ea, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gp, ep, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", CASES)
def test_float32_is_within_the_two_times_rule_of_dynamicvits_own_float32(device, backend):
    attn, policy = _inputs(2, 3, 50, "hard", torch.float32)
    ours = ops.softmax_with_policy(attn, policy, backend=backend)
    theirs = _softmax_with_policy_official(attn, policy)
    truth = _softmax_with_policy_official(attn.double(), policy.double(), compute=torch.float64)
    assert_close_to_float64(ours, theirs, truth)


@pytest.mark.parametrize("device,backend", CASES)
def test_softmax_with_policy_gradcheck(device, backend):
    attn, policy = _inputs(2, 2, 7, "soft")
    attn.requires_grad_()
    policy.requires_grad_()
    fn = lambda a, p: ops.softmax_with_policy(a, p, eps=1e-3, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (attn, policy), fast_mode=backend == "triton")


def test_cpp_softmax_with_policy_passes_opcheck_and_compiles():
    if not any(c.values[1] == "cpp" for c in CASES):
        pytest.skip("the C++ extension is not built")
    attn, policy = _inputs(2, 2, 9, "soft", torch.float32)
    attn.requires_grad_()
    policy.requires_grad_()
    torch.library.opcheck(torch.ops.dynkernels.softmax_with_policy.default, (attn, policy, 1e-6))
    fn = lambda a, p: ops.softmax_with_policy(a, p) @ a  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(attn, policy), fn(attn, policy))


@pytest.mark.triton
def test_triton_softmax_with_policy_passes_opcheck():
    if not any(c.values[1] == "triton" for c in CASES):
        pytest.skip("no Triton backend here")
    attn, policy = _inputs(1, 2, 9, "soft", torch.float32)
    attn.requires_grad_()
    policy.requires_grad_()
    torch.library.opcheck(torch.ops.dynkernels.softmax_with_policy_triton.default, (attn, policy, 1e-6))


@pytest.mark.parametrize("rank", [2, 3])
def test_batch_index_select_equals_dynamicvit(rank):
    x = torch.randn(3, 11, 4, dtype=torch.float64, requires_grad=True)
    src = x if rank == 3 else x[..., 0]
    idx = torch.stack([torch.randperm(11)[:6] for _ in range(3)])
    out = ops.batch_index_select(src, idx)
    expected = _batch_index_select_official(src, idx)
    assert torch.equal(out, expected)
    g = torch.randn(out.shape, dtype=torch.float64)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(expected, x, g)[0])


# ---- apply_dynamicvit --------------------------------------------------------


timm = pytest.importorskip("timm")


def _vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8).double()
    return dnn.apply_dynamicvit(model, 0.7, (3, 6, 9))


def _dynamicvit_official(model, images, training):
    """VisionTransformerDiffPruning.forward, transcribed on the patched model's modules."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    b, init_n = x.shape[0], x.shape[1] - 1
    prev_decision = torch.ones(b, init_n, 1, dtype=x.dtype)
    policy = torch.ones(b, init_n + 1, 1, dtype=x.dtype)
    out_pred_prob, p_count = [], 0

    def policy_block(blk, x, policy):
        attn = blk.attn
        h = blk.norm1(x)
        bb, n, c = h.shape
        qkv = attn.qkv(h).reshape(bb, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = _softmax_with_policy_official((q * attn.scale) @ k.transpose(-2, -1), policy, compute=torch.float64)
        x = x + attn.proj((probs @ v).transpose(1, 2).reshape(bb, n, c))
        return x + blk.mlp(blk.norm2(x))

    for i, blk in enumerate(model.blocks):
        if i in (3, 6, 9):
            pred_score = model.score_predictor[p_count](x[:, 1:], prev_decision).reshape(b, -1, 2)
            if training:
                hard_keep_decision = F.gumbel_softmax(pred_score, hard=True)[:, :, 0:1] * prev_decision
                out_pred_prob.append(hard_keep_decision.reshape(b, init_n))
                policy = torch.cat([torch.ones(b, 1, 1, dtype=x.dtype), hard_keep_decision], dim=1)
                x = policy_block(blk, x, policy)
                prev_decision = hard_keep_decision
            else:
                score = pred_score[:, :, 0]
                num_keep_node = int(init_n * 0.7 ** (p_count + 1))
                keep_policy = torch.argsort(score, dim=1, descending=True)[:, :num_keep_node]
                now_policy = torch.cat([torch.zeros(b, 1, dtype=keep_policy.dtype), keep_policy + 1], dim=1)
                x = _plain_block(blk, _batch_index_select_official(x, now_policy))
                prev_decision = _batch_index_select_official(prev_decision, keep_policy)
            p_count += 1
        else:
            x = policy_block(blk, x, policy) if training else _plain_block(blk, x)
    return model.forward_head(model.norm(x)), out_pred_prob


def _plain_block(blk, x):
    attn = blk.attn
    h = blk.norm1(x)
    b, n, c = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    x = x + attn.proj((((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("training", [False, True])
def test_apply_dynamicvit_equals_dynamicvits_forward(training):
    model = _vit().train(training)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.manual_seed(5)
    out = model(images)
    decisions = dnn.dynamicvit_decisions(model)
    torch.manual_seed(5)
    expected, expected_decisions = _dynamicvit_official(model, images, training)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert len(decisions) == len(expected_decisions) == (3 if training else 0)
    for a, b in zip(decisions, expected_decisions, strict=True):
        assert torch.equal(a, b)
    if training:  # DynamicViT's ratio loss reaches the predictors through the hard decisions
        sum((d.mean(1) - 0.7) ** 2 for d in decisions).mean().backward()
        assert model.score_predictor[0].out_conv[0].weight.grad is not None
        assert copy.deepcopy(model) is not None


def test_dynamicvit_eval_keeps_int_n0_rho_tokens():
    model = _vit().eval()
    seen = []
    for i in (3, 6, 9):
        model.blocks[i].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert seen == [1 + int(64 * 0.7), 1 + int(64 * 0.49), 1 + int(64 * 0.7**3)]


BAD = [
    (
        "policy-shape",
        lambda: ops.softmax_with_policy(torch.randn(1, 2, 4, 4), torch.ones(1, 3, 1)),
        ValueError,
        "policy must be",
    ),
    ("attn-square", lambda: ops.softmax_with_policy(torch.randn(1, 2, 4, 5), torch.ones(1, 4, 1)), ValueError, "attn"),
    ("eps", lambda: ops.softmax_with_policy(torch.randn(1, 1, 2, 2), torch.ones(1, 2, 1), eps=-1), ValueError, "eps"),
    ("idx-range", lambda: ops.batch_index_select(torch.randn(2, 3, 4), torch.full((2, 1), 3)), IndexError, "idx"),
    ("idx-dtype", lambda: ops.batch_index_select(torch.randn(2, 3), torch.zeros(2, 1)), ValueError, "int64"),
    ("locations", lambda: dnn.apply_dynamicvit(_vit_plain(), 0.7, (9, 3)), ValueError, "locations"),
    ("ratio", lambda: dnn.apply_dynamicvit(_vit_plain(), 1.5), ValueError, "keep_ratio"),
]


def _vit_plain():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)


@pytest.mark.parametrize("call,error,match", bad_input_params(BAD))
def test_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)
