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
