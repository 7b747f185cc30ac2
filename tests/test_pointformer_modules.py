"""Pointformer modules: the kernel path equals the reference path (the
official formulation), ragged batches have no padding artefacts, and the
backbone trains on CPU at a small size."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_clear_error, bad_input_params

from dynkernels import nn as dnn
from dynkernels.testing import random_cloud

SMALL = dict(
    dnn.CONFIGS["scannet"],
    cloud_points=1500,
    npoint=(256, 128, 64, 32),
    radius=(0.3, 0.6, 1.2, 2.4),
    nsample=(32, 16, 8, 8),
    d_model=(16, 32, 32, 64),
    out_channels=(32, 32, 64, 64),
    nhead=4,
    fp_channels=((32, 32), (24, 24)),
)


def _pair(module: torch.nn.Module):
    """(kernel path, reference path) copies of one module with equal parameters."""
    reference = copy.deepcopy(module)
    for sub in reference.modules():
        if hasattr(sub, "backend"):
            sub.backend = "reference"
    return module, reference


def _points(batch, n, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    xyz = random_cloud(batch, n, kind="scene", dtype=dtype)
    return torch.cat([xyz, xyz[..., 2:] - xyz[..., 2:].amin(1, keepdim=True)], dim=-1)


def _assert_outputs_equal(got: dict, want: dict, tol: dict | None = None):
    tol = tol or dict(rtol=1e-9, atol=1e-9)
    for key in ("fp_indices", "sa_indices"):
        for a, b in zip(got[key], want[key], strict=True):
            assert torch.equal(a, b), key
    for key in ("fp_xyz", "fp_features", "sa_xyz", "sa_features"):
        for a, b in zip(got[key], want[key], strict=True):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("refine", [None, "centroid", "first", "mean"])
def test_backbone_kernel_path_equals_reference(prenorm, refine):
    torch.manual_seed(0)
    config = dict(SMALL, prenorm=prenorm)
    model = dnn.PointformerBackbone(config, refine=refine, use_decoder=(True, False, True, False)).double().eval()
    kernel, ref = _pair(model)
    points = _points(2, 1500)
    with torch.no_grad():
        _assert_outputs_equal(kernel(points), ref(points))


def test_backbone_float32_matches_within_tolerance():
    torch.manual_seed(0)
    kernel, ref = _pair(dnn.PointformerBackbone(SMALL).eval())
    points = _points(2, 1500, dtype=torch.float32)
    with torch.no_grad():
        got, want = kernel(points), ref(points)
    _assert_outputs_equal(got, want, tol=dict(rtol=1e-4, atol=1e-5))
    assert got["fp_features"][-1].shape == (2, 24, 128) and got["fp_xyz"][-1].shape == (2, 128, 3)


def test_backbone_forward_backward_gradients_match():
    torch.manual_seed(1)
    kernel, ref = _pair(dnn.PointformerBackbone(SMALL, refine="centroid").double().eval())
    points = _points(2, 1500, seed=1)
    for model in (kernel, ref):
        out = model(points)
        (out["fp_features"][-1].square().mean() + out["fp_xyz"][-1].square().sum()).backward()
    for (name, p), q in zip(kernel.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-9, msg=name)


def test_backbone_trains_in_train_mode():
    torch.manual_seed(2)
    model = dnn.PointformerBackbone(SMALL, refine="centroid").train()
    points = _points(2, 1500, dtype=torch.float32)
    optim = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = model(points)
    loss = out["fp_features"][-1].square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optim.step()


@pytest.mark.parametrize("backend", [None, "reference"])
def test_ragged_batch_equals_clouds_alone(backend):
    torch.manual_seed(3)
    model = dnn.PointformerBackbone(SMALL, refine="centroid", use_decoder=True, backend=backend).double().eval()
    a, b = _points(1, 1500, seed=4), _points(1, 1100, seed=5)
    padded = torch.cat([a, torch.cat([b, torch.full((1, 400, 4), 1e6, dtype=b.dtype)], dim=1)])
    with torch.no_grad():
        batch = model(padded, lengths=torch.tensor([1500, 1100]))
        alone = [model(a), model(b)]
    for i, single in enumerate(alone):
        for key in ("fp_indices", "sa_indices"):
            for x, y in zip(batch[key][1:], single[key][1:], strict=True):
                assert torch.equal(x[i], y[0])
        for key in ("fp_xyz", "fp_features"):
            for x, y in zip(batch[key], single[key], strict=True):
                torch.testing.assert_close(x[i], y[0], rtol=1e-9, atol=1e-9)


def test_lengths_are_validated():
    model = dnn.PointformerBackbone(SMALL).eval()
    points = _points(2, 1500, dtype=torch.float32)
    with pytest.raises(ValueError, match="lengths must lie in"):
        model(points, lengths=torch.tensor([1500, 100]))  # fewer points than npoint
    with pytest.raises(ValueError, match=r"\(B,\)"):
        model(points, lengths=torch.tensor([1500]))
    with pytest.raises(TypeError, match="integer"):
        model(points, lengths=torch.tensor([1500.0, 1500.0]))
    with pytest.raises(ValueError, match="points must be"):
        model(points[..., :3])


def test_local_transformer_relative_and_absolute_xyz_differ():
    torch.manual_seed(4)
    xyz = random_cloud(2, 600, kind="scene")
    features = torch.randn(2, 16, 600)
    rel = dnn.LocalTransformer(64, 0.4, 16, 16, 4).eval()
    absolute = copy.deepcopy(rel)
    absolute.relative_xyz = False
    with torch.no_grad():
        centers, out_rel, idx = rel(xyz, features)
        _, out_abs, _ = absolute(xyz, features)
    assert out_rel.shape == (2, 16, 64) and centers.shape == (2, 64, 3) and idx.shape == (2, 64)
    assert not torch.allclose(out_rel, out_abs)


def test_global_and_local_global_transformers_match_reference():
    torch.manual_seed(5)
    for prenorm in (True, False):
        gt_kernel, gt_ref = _pair(dnn.GlobalTransformer(16, 24, 4, prenorm=prenorm).double().eval())
        lgt_kernel, lgt_ref = _pair(dnn.LocalGlobalTransformer(16, 4, prenorm=prenorm).double().eval())
        xyz = random_cloud(2, 300, dtype=torch.float64)
        centers, local, feats = (
            xyz[:, :50],
            torch.randn(2, 16, 50, dtype=torch.float64),
            torch.randn(2, 16, 300, dtype=torch.float64),
        )
        with torch.no_grad():
            torch.testing.assert_close(gt_kernel(centers, local), gt_ref(centers, local))
            torch.testing.assert_close(lgt_kernel(centers, local, xyz, feats), lgt_ref(centers, local, xyz, feats))


def test_official_configs_and_parameter_names():
    for name in ("scannet", "sunrgbd"):
        model = dnn.PointformerBackbone(name)
        cfg = dnn.CONFIGS[name]
        assert [b.local.nsample for b in model.blocks] == list(cfg["nsample"])
        assert model.blocks[0].local.layers[0].self_attn.num_heads == cfg["nhead"]
        assert model.blocks[0].local.layers[0].prenorm == cfg["prenorm"]
    keys = dnn.PointformerBackbone("sunrgbd").state_dict().keys()
    assert "blocks.0.local.layers.0.self_attn.in_proj_weight" in keys
    assert "blocks.3.glob.layers.1.linear1.weight" in keys


def test_sunrgbd_backbone_shapes():
    torch.manual_seed(6)
    model = dnn.PointformerBackbone("sunrgbd").eval()
    points = _points(1, 2500, dtype=torch.float32)
    with torch.no_grad():
        out = model(points)
    assert out["fp_features"][-1].shape == (1, 256, 1024)
    assert out["fp_xyz"][-1].shape == (1, 1024, 3)
    assert out["fp_indices"][-1].shape == (1, 1024) and int(out["fp_indices"][-1].max()) < 2500


@pytest.mark.parametrize("momentum", [0.1, None])
def test_position_encoding_paths_train_batchnorm_alike(momentum):
    torch.manual_seed(7)
    kernel = dnn.PositionEncoding(16).double().train()
    kernel.layers[1].momentum = momentum
    ref = copy.deepcopy(kernel)
    xyz = torch.randn(2, 30, 8, 3, dtype=torch.float64)
    for _ in range(2):
        got = kernel(xyz)
        want = ref.reference(xyz.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(got, want)
    bn_k, bn_r = kernel.layers[1], ref.layers[1]
    torch.testing.assert_close(bn_k.running_mean, bn_r.running_mean)
    torch.testing.assert_close(bn_k.running_var, bn_r.running_var)
    assert int(bn_k.num_batches_tracked) == int(bn_r.num_batches_tracked) == 2


# ---- issue 12: bad inputs are clear errors, at construction or the first call ----


def _bad_pointformer_cases():
    from dynkernels import ops

    q = torch.randn(4, 2, 8, 5)
    backbone = dnn.PointformerBackbone(SMALL)
    glob = dnn.GlobalTransformer(16, 32, 2)
    local_global = dnn.LocalGlobalTransformer(16, 2)
    few = SMALL["npoint"][0] - 1
    return [
        ("local_attention D=0", lambda: ops.local_attention(q[..., :0], q[..., :0], q[..., :0]), ValueError, "D >= 1"),
        ("local_attention H=0", lambda: ops.local_attention(q[:, :0], q[:, :0], q[:, :0]), ValueError, "H >= 1"),
        (
            "packed heads=True",
            lambda: ops.local_attention_packed(torch.randn(4, 8, 30), True),
            TypeError,
            "heads must be an int",
        ),
        (
            "packed heads=2.0",
            lambda: ops.local_attention_packed(torch.randn(4, 8, 30), 2.0),
            TypeError,
            "heads must be an int",
        ),
        (
            "config of unequal tuples",
            lambda: dnn.PointformerBackbone(dict(SMALL, radius=(0.2,))),
            ValueError,
            "one length",
        ),
        ("config name", lambda: dnn.PointformerBackbone("kitti"), ValueError, "config must be one of"),
        (
            "use_decoder per block",
            lambda: dnn.PointformerBackbone(SMALL, use_decoder=(True,)),
            ValueError,
            "use_decoder",
        ),
        ("fewer points than npoint", lambda: backbone(torch.rand(1, few, 4)), ValueError, r"npoint\[0\]"),
        ("numpy points", lambda: backbone(torch.rand(1, 300, 4).numpy()), TypeError, "points must be a torch.Tensor"),
        (
            "global channels",
            lambda: glob(torch.rand(2, 10, 3), torch.rand(2, 15, 10)),
            ValueError,
            "GlobalTransformer: features",
        ),
        (
            "global points",
            lambda: glob(torch.rand(2, 9, 3), torch.rand(2, 16, 10)),
            ValueError,
            "GlobalTransformer: features",
        ),
        (
            "local-global channels",
            lambda: local_global(
                torch.rand(2, 5, 3), torch.rand(2, 16, 5), torch.rand(2, 10, 3), torch.rand(2, 12, 10)
            ),
            ValueError,
            r"LocalGlobalTransformer \(xyz, features\)",
        ),
    ]


@pytest.mark.parametrize("call,error,match", bad_input_params(_bad_pointformer_cases()))
def test_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)


def test_backbone_on_an_empty_batch_returns_empty_outputs_of_every_shape():
    backbone = dnn.PointformerBackbone(SMALL).eval()
    points = torch.rand(2, SMALL["npoint"][0] * 2, 4)
    full, empty = backbone(points), backbone(points[:0])
    assert full.keys() == empty.keys()
    for key in full:
        assert len(full[key]) == len(empty[key])
        for a, b in zip(full[key], empty[key], strict=True):
            assert b.shape == (0, *a.shape[1:]) and b.dtype == a.dtype, key
