"""The examples run end to end on files they write themselves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pointcloud_sampling_example(tmp_path):
    o3d = pytest.importorskip("open3d")
    source = tmp_path / "scan.pcd"
    rng = np.random.default_rng(0)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(rng.random((3000, 3))))
    o3d.io.write_point_cloud(str(source), cloud)
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "pointcloud_sampling.py"),
        str(source),
        "--out",
        str(tmp_path),
        "--samples",
        "128",
        "--radius",
        "0.15",
        "--neighbours",
        "16",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    written = o3d.io.read_point_cloud(str(tmp_path / "scan_fps128.ply"))
    assert len(written.points) == 128
    # the sampled centers are points of the input cloud
    src = np.asarray(cloud.points, dtype=np.float32).astype(np.float64)
    got = np.asarray(written.points)
    assert all(np.any(np.all(np.isclose(src, p, atol=1e-6), axis=1)) for p in got[:10])


def test_pointformer_scene_example(tmp_path):
    o3d = pytest.importorskip("open3d")
    source = tmp_path / "room.ply"
    rng = np.random.default_rng(1)
    floor = np.c_[rng.random((2500, 2)) * 4.0, np.zeros(2500)]
    box = rng.random((700, 3)) * [1.0, 0.8, 0.9] + [1.5, 1.5, 0.0]
    o3d.io.write_point_cloud(str(source), o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.r_[floor, box])))
    cmd = [sys.executable, str(ROOT / "examples" / "pointformer_scene.py"), str(source), "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    sampled = np.asarray(o3d.io.read_point_cloud(str(tmp_path / "room_sampled.ply")).points)
    refined = np.asarray(o3d.io.read_point_cloud(str(tmp_path / "room_refined.ply")).points)
    assert sampled.shape == refined.shape == (2048, 3)
    # refinement keeps every centroid within its 0.2 ball
    assert np.linalg.norm(refined - sampled, axis=1).max() < 0.2 + 1e-5
    assert (tmp_path / "room_refinement.png").stat().st_size > 10_000


def test_io_roundtrip(tmp_path):
    pytest.importorskip("open3d")
    import torch

    from dynkernels import io

    xyz = torch.rand(100, 3, dtype=torch.float64)
    io.write_points(tmp_path / "a.pcd", xyz, colors=torch.tensor([0.0, 1.0, 0.0]))
    back = io.read_points(tmp_path / "a.pcd", dtype=torch.float64)
    assert torch.allclose(back, xyz, atol=1e-6)
    cloud = io.to_open3d(xyz)
    points, colors = io.from_open3d(cloud, with_colors=True)
    assert torch.equal(points.double(), xyz.float().double()) and colors.abs().sum() == 0
    with pytest.raises(FileNotFoundError):
        io.read_points(tmp_path / "missing.ply")
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        io.to_open3d(torch.rand(4, 2))


def test_isda_synthetic_example():
    cmd = [sys.executable, str(ROOT / "examples" / "isda_synthetic.py"), "--epochs", "3", "--classes", "5"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "test accuracy" in line]
    assert [line.split()[0] for line in lines] == ["cross-entropy", "ISDA"]
    for line in lines:
        assert 0.0 <= float(line.split("accuracy")[1].split()[0]) <= 1.0


@pytest.mark.parametrize("kind", ["condconv", "odconv"])
def test_dynamic_conv_mobilenet_example_trains_the_same_through_kernel_and_reference(kind):
    pytest.importorskip("torchvision")
    cmd = [sys.executable, str(ROOT / "examples" / "dynamic_conv_mobilenet.py"), "--steps", "3", "--kind", kind]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"converted 52 convs to {kind}")
    losses = {line.split(":")[0].strip(): line.split("losses")[1].split() for line in lines[1:3]}
    assert set(losses) == {"kernel", "reference"} and len(losses["kernel"]) == 3
    for a, b in zip(losses["kernel"], losses["reference"], strict=True):
        assert abs(float(a) - float(b)) <= 1e-6 * abs(float(b))  # six printed decimals of a loss near 2.3


def test_sparse_mobilenet_example_trains_and_times_the_sparse_blocks():
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "sparse_mobilenet.py"),
        "--steps",
        "2",
        "--batch",
        "2",
        "--size",
        "32",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step")]
    assert len(steps) == 2
    for line in steps:
        assert np.isfinite(float(line.split("task loss")[1].split(",")[0]))
    timings = [line for line in lines if line.startswith("density")]
    assert len(timings) == 4 and all(line.endswith("same output: True") for line in timings)


def test_vit_token_routing_example_trains_both_paths_alike():
    pytest.importorskip("timm")
    cmd = [sys.executable, str(ROOT / "examples" / "vit_token_routing.py"), "--image", "64", "--batch", "2"]
    cmd += ["--steps", "2", "--r", "0", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step")]
    assert len(steps) == 2 and all(line.endswith("same: True") for line in steps)
    for line in steps:
        assert np.isfinite(float(line.split("loss kernel ")[1].split(",")[0]))
    rates = [line for line in lines if line.startswith("r ")]
    assert len(rates) == 2 and all(float(line.split(": ")[1].split(" ")[0]) > 0 for line in rates)


def test_gfnet_toy_example_trains_three_stages_and_plots_the_budget_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "gfnet.png"
    cmd = [sys.executable, str(ROOT / "examples" / "gfnet_toy.py"), "--steps", "3", "2", "2", "--batch", "8"]
    cmd += ["--test", "48", "--budgets", "3", "--glimpses", "3", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert {line.split(" step")[0] for line in lines if line.startswith("stage")} == {"stage 1", "stage 2", "stage 3"}
    budgets = [line for line in lines if line.startswith("budget q=")]
    assert len(budgets) == 3
    for line in budgets:
        accuracy = float(line.split("accuracy ")[1].split("%")[0])
        exits = [int(v) for v in line.split("exits [")[1].rstrip("]").split(",")]
        assert 0 <= accuracy <= 100 and sum(exits) == 48
    assert out.stat().st_size > 10_000


def test_auto_seg_loss_example_searches_and_trains():
    cmd = [sys.executable, str(ROOT / "examples" / "auto_seg_loss.py"), "--size", "24", "--train", "32", "--test", "16"]
    cmd += ["--steps", "4", "--proxy-steps", "2", "--search-rounds", "1", "--search-samples", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("search round") for line in lines) == 1
    finals = [line for line in lines if ": test mIoU " in line]
    assert [line.split(":")[0] for line in finals] == ["cross-entropy", "searched mIoU surrogate", "official mIoU preset"]
    for line in finals:
        assert 0.0 <= float(line.split("test mIoU ")[1].split("%")[0]) <= 100.0
