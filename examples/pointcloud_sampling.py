"""Sample and group a real point-cloud file, PointNet++ / Pointformer style.

    python examples/pointcloud_sampling.py [cloud.ply|cloud.pcd] [--out examples/out]

Without a file it writes one first: points sampled from the surface of an
Open3D torus mesh (no download). Reads the file with Open3D, runs farthest
point sampling, ball query and grouping with dynkernels, checks them against
the reference, and writes the sampled centers as a .ply beside a short report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import open3d as o3d
import torch

import dynkernels
from dynkernels import ops


def make_demo_cloud(path: Path, n: int = 60000) -> None:
    mesh = o3d.geometry.TriangleMesh.create_torus(torus_radius=1.0, tube_radius=0.35, radial_resolution=60)
    o3d.utility.random.seed(0)
    cloud = mesh.sample_points_uniformly(number_of_points=n)
    o3d.io.write_point_cloud(str(path), cloud)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cloud", nargs="?", help=".ply or .pcd file (default: a generated torus scan)")
    parser.add_argument("--out", default="examples/out")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--radius", type=float, default=0.2)
    parser.add_argument("--neighbours", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.cloud) if args.cloud else out / "torus_scan.ply"
    if not args.cloud:
        make_demo_cloud(path)
    cloud = o3d.io.read_point_cloud(str(path))
    xyz = torch.from_numpy(np.asarray(cloud.points, dtype=np.float32)).unsqueeze(0)  # (1, N, 3)
    n = xyz.shape[1]
    m = min(args.samples, n)
    t0 = time.perf_counter()
    idx = ops.furthest_point_sample(xyz, m)
    t1 = time.perf_counter()
    centers = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
    nbr = ops.ball_query(xyz, centers, args.radius, args.neighbours)
    t2 = time.perf_counter()
    grouped = ops.grouping_operation(xyz.transpose(1, 2).contiguous(), nbr)  # (1, 3, M, ns)
    t3 = time.perf_counter()
    assert torch.equal(idx, dynkernels.reference.furthest_point_sample(xyz, m)), "FPS disagrees with the reference"
    assert torch.equal(nbr, dynkernels.reference.ball_query(xyz, centers, args.radius, args.neighbours))
    sampled = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(centers[0].double().numpy()))
    target = out / f"{path.stem}_fps{m}.ply"
    o3d.io.write_point_cloud(str(target), sampled)
    empty = int((nbr[..., 0] < 0).sum())
    spread = (grouped - centers.transpose(1, 2).unsqueeze(-1)).norm(dim=1).amax().item()
    print(
        f"{path.name}: {n} points -> {m} FPS samples in {1e3 * (t1 - t0):.1f} ms; ball query (r={args.radius}, "
        f"ns={args.neighbours}) {1e3 * (t2 - t1):.1f} ms; grouping {1e3 * (t3 - t2):.1f} ms"
    )
    print(f"empty balls: {empty}; farthest grouped neighbour: {spread:.4f} (< radius {args.radius})")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
