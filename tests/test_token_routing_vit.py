"""Token routing, timm patches: apply_tome against a float64 transcription of
ToMe's timm patch (tome/patch/timm.py: ToMeAttention with the log-size bias,
ToMeBlock's merge_wavg after the attention, the per-forward r schedule), with
a class token and with DeiT's distillation token; apply_evit against EViT's
block; r = 0 and keep_rate = 1 leave the model exactly as it was."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_token_routing import _evit_official, _tome_merge_official, _tome_official

from dynkernels import nn as dnn

timm = pytest.importorskip("timm")


def _vit(name="vit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=64, patch_size=8, **kw).double().eval()


def _tome_forward_official(model, images, r, prop_attn, distill_token):
    """ToMe's patched VisionTransformer forward, transcribed (materialised attention)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size = None
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(x)
        b, n, c = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn and size is not None:
            scores = scores + size.log()[:, None, None, :, 0]
        x_attn = attn.proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))
        x = x + x_attn
        if r > 0:
            src, dst, unm, used = _tome_official(k.mean(1), r, True, distill_token)
            if size is None:
                size = torch.ones_like(x[..., 0, None])
            x = _tome_merge_official(x * size, (src, dst, unm), used, "sum", distill_token)
            size = _tome_merge_official(size, (src, dst, unm), used, "sum", distill_token)
            x = x / size
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("r", [0, 3, 8, 100])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_apply_tome_equals_tomes_timm_patch(r, prop_attn):
    model = _vit()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        base = model(images)
        patched = dnn.apply_tome(copy.deepcopy(model), r, prop_attn=prop_attn)
        out = patched(images)
        expected = _tome_forward_official(model, images, r, prop_attn, False)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if r == 0:
        assert torch.equal(out, base)
    patched.r = 0  # the schedule is read at every forward
    with torch.no_grad():
        torch.testing.assert_close(patched(images), base, rtol=1e-12, atol=1e-12)


def test_apply_tome_protects_deits_distillation_token():
    model = _vit("deit_tiny_distilled_patch16_224")
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out = dnn.apply_tome(copy.deepcopy(model), 4)(images)
        expected = _tome_forward_official(model, images, 4, True, True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_apply_tome_takes_a_schedule_and_trains():
    model = _vit()
    patched = dnn.apply_tome(copy.deepcopy(model), [4, 0] * 6).train()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    patched(images).sum().backward()
    assert all(p.grad is not None for p in patched.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="one value per block"):
        dnn.apply_tome(copy.deepcopy(model), [1, 2])


def _evit_forward_official(model, images, keep_rate, locations, fuse):
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for i, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        b, n, c = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        x = x + attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
        if i in locations:
            x = _evit_official(x, q, k, keep_rate, fuse)
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 1.0])
@pytest.mark.parametrize("fuse", [True, False])
def test_apply_evit_equals_evits_blocks(keep_rate, fuse):
    model = _vit()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    patched = dnn.apply_evit(copy.deepcopy(model), keep_rate, (3, 6, 9), fuse_token=fuse)
    seen = []
    patched.blocks[10].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        base = model(images)
        out = patched(images)
        expected = _evit_forward_official(model, images, keep_rate, (3, 6, 9), fuse)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if keep_rate == 1.0:
        assert torch.equal(out, base)
    tokens = 65  # 8 x 8 patches and the class token; three selections
    for _ in range(3):
        tokens = 1 + math.ceil(keep_rate * (tokens - 1)) + int(fuse and keep_rate < 1)
    assert seen == [tokens]


def test_patches_refuse_what_they_cannot_do():
    with pytest.raises(TypeError, match="VisionTransformer"):
        dnn.apply_tome(torch.nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="locations"):
        dnn.apply_evit(_vit(), 0.7, (12,))
    with pytest.raises(ValueError, match="keep_rate"):
        dnn.apply_evit(_vit(), 0.0)
    patched = dnn.apply_tome(_vit(), 2)
    with pytest.raises(ValueError, match="attention mask"):
        patched.blocks[0](torch.randn(1, 5, 192, dtype=torch.float64), attn_mask=torch.zeros(5, 5))
