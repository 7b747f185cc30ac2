"""Run the Pointformer backbone on a real point-cloud file and look at what
coordinate refinement does to the sampled centroids.

    python examples/pointformer_scene.py [scene.ply|scene.pcd] [--out examples/out]

Without a file it first writes a small synthetic room (floor, walls, a table
and a ball sampled from Open3D meshes; no download). Reads the file with
Open3D, adds the height feature VoteNet uses (z above the 1st-percentile
floor), runs :class:`dynkernels.nn.PointformerBackbone` with coordinate
refinement, and writes:

* ``<name>_sampled.ply``: the block-1 farthest-point samples (red),
* ``<name>_refined.ply``: the same centroids after refinement (green),
* ``<name>_refinement.png``: both, seen from above, with the shifts drawn.

The weights are random unless ``--checkpoint`` gives a state dict, so the
shifts show the mechanism (each centroid moves to an attention-weighted mean
of its ball), not a trained model's choice.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dynkernels import io
from dynkernels.nn import CONFIGS, PointformerBackbone


def make_demo_room(path: Path, n: int = 30000) -> None:
    import open3d as o3d

    o3d.utility.random.seed(0)
    parts = []
    floor = o3d.geometry.TriangleMesh.create_box(6.0, 5.0, 0.02)
    wall_a = o3d.geometry.TriangleMesh.create_box(6.0, 0.02, 2.6)
    wall_b = o3d.geometry.TriangleMesh.create_box(0.02, 5.0, 2.6)
    table = o3d.geometry.TriangleMesh.create_box(1.6, 0.9, 0.05).translate((2.0, 2.0, 0.75))
    ball = o3d.geometry.TriangleMesh.create_sphere(0.3).translate((4.5, 1.2, 0.3))
    for mesh, share in ((floor, 0.45), (wall_a, 0.2), (wall_b, 0.15), (table, 0.1), (ball, 0.1)):
        parts.append(np.asarray(mesh.sample_points_uniformly(int(n * share)).points))
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.concatenate(parts)))
    o3d.io.write_point_cloud(str(path), cloud)


def save_picture(path: Path, cloud: torch.Tensor, sampled: torch.Tensor, refined: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharex=True, sharey=True)
    for ax, title in zip(axes, ("farthest point samples", "after coordinate refinement"), strict=True):
        ax.scatter(cloud[:, 0], cloud[:, 1], s=0.2, c="0.75")
        ax.set_title(title)
        ax.set_aspect("equal")
    axes[0].scatter(sampled[:, 0], sampled[:, 1], s=3, c="tab:red")
    axes[1].scatter(refined[:, 0], refined[:, 1], s=3, c="tab:green")
    for (x0, y0), (x1, y1) in zip(sampled[:, :2].tolist(), refined[:, :2].tolist(), strict=True):
        axes[1].plot((x0, x1), (y0, y1), lw=0.4, c="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cloud", nargs="?", help=".ply or .pcd file (default: a generated room)")
    parser.add_argument("--out", default="examples/out")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sunrgbd")
    parser.add_argument("--refine", choices=("centroid", "first", "mean"), default="centroid")
    parser.add_argument("--checkpoint", help="state dict of a PointformerBackbone (optional)")
    parser.add_argument("--backend", choices=("kernel", "reference"), default="kernel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.cloud) if args.cloud else out / "demo_room.ply"
    if not args.cloud:
        make_demo_room(path)
    xyz = io.read_points(path)
    config = CONFIGS[args.config]
    if len(xyz) > config["cloud_points"]:  # the config's input size, as VoteNet's loader subsamples
        xyz = xyz[torch.randperm(len(xyz))[: config["cloud_points"]]]
    if len(xyz) < config["npoint"][0]:
        raise SystemExit(f"{path} has {len(xyz)} points; the {args.config} backbone samples {config['npoint'][0]}")
    height = xyz[:, 2:] - torch.quantile(xyz[:, 2], 0.01)
    points = torch.cat([xyz, height], dim=1).unsqueeze(0)
    backend = "reference" if args.backend == "reference" else None
    model = PointformerBackbone(args.config, refine=args.refine, backend=backend).eval()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    t0 = time.perf_counter()
    with torch.no_grad():
        result = model(points)
    elapsed = time.perf_counter() - t0
    sampled = xyz[result["sa_indices"][1][0]]  # the block's FPS centroids
    refined = result["sa_xyz"][1][0]  # what refinement made of them
    shift = (refined - sampled).norm(dim=1)
    stem = path.stem
    io.write_points(out / f"{stem}_sampled.ply", sampled, colors=torch.tensor([1.0, 0.0, 0.0]))
    io.write_points(out / f"{stem}_refined.ply", refined, colors=torch.tensor([0.0, 0.8, 0.0]))
    save_picture(out / f"{stem}_refinement.png", xyz, sampled, refined)
    seeds = result["fp_features"][-1]
    print(f"{path}: {len(xyz)} points, {args.config} backbone ({args.backend} path) in {elapsed:.2f} s")
    print(f"seeds: {tuple(result['fp_xyz'][-1].shape[1:])} xyz, {tuple(seeds.shape[1:])} features")
    print(
        f"refinement ({args.refine} row): mean shift {shift.mean():.4f}, max {shift.max():.4f} "
        f"(ball radius {config['radius'][0]})"
    )
    print(f"wrote {out / (stem + '_sampled.ply')}, {out / (stem + '_refined.ply')}, {out / (stem + '_refinement.png')}")


if __name__ == "__main__":
    main()
