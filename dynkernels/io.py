"""Point clouds between Open3D and torch.

Open3D is optional (``pip install dynkernels[pointcloud]``; on Linux it also
needs the system library libusb-1.0-0). It is imported on first use, so the
rest of dynkernels works without it.

    xyz = read_points("scan.ply")                 # (N, 3) float32 tensor
    write_points("samples.ply", xyz[idx], colors=torch.tensor([1.0, 0, 0]))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["from_open3d", "read_points", "to_open3d", "write_points"]


def _open3d():
    try:
        import open3d
    except ImportError as exc:  # also OSError-derived failures surface as ImportError here
        raise ImportError(
            f"dynkernels.io needs open3d (`pip install open3d`; on Linux also `apt install libusb-1.0-0`): {exc}"
        ) from exc
    return open3d


def from_open3d(cloud, *, dtype: torch.dtype = torch.float32, with_colors: bool = False):
    """An ``open3d.geometry.PointCloud`` -> ``(N, 3)`` tensor (and ``(N, 3)``
    colors in [0, 1] with ``with_colors``; zeros if the cloud has none)."""
    xyz = torch.from_numpy(np.asarray(cloud.points, dtype=np.float64)).to(dtype)
    if not with_colors:
        return xyz
    colors = np.asarray(cloud.colors, dtype=np.float64)
    rgb = torch.from_numpy(colors).to(dtype) if len(colors) == len(xyz) else torch.zeros_like(xyz)
    return xyz, rgb


def to_open3d(xyz: torch.Tensor, colors: torch.Tensor | None = None):
    """``(N, 3)`` points (any float dtype or device) -> ``open3d.geometry.PointCloud``.
    colors: ``(N, 3)`` or one ``(3,)`` color, values in [0, 1]."""
    o3d = _open3d()
    if xyz.dim() != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape (N, 3), got {tuple(xyz.shape)}")
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz.detach().double().cpu().numpy()))
    if colors is not None:
        rgb = colors.detach().double().cpu()
        if rgb.dim() == 1:
            rgb = rgb.expand(xyz.shape[0], 3)
        if rgb.shape != xyz.shape:
            raise ValueError(f"colors must be (N, 3) or (3,), got {tuple(colors.shape)}")
        cloud.colors = o3d.utility.Vector3dVector(rgb.numpy())
    return cloud


def read_points(path: str | Path, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Read a .ply/.pcd/.xyz/... file with Open3D -> ``(N, 3)`` tensor. Raises
    FileNotFoundError for a missing file and ValueError for one Open3D reads as
    empty (it does not raise on unreadable files itself)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no point-cloud file at {path}")
    cloud = _open3d().io.read_point_cloud(str(path))
    if len(cloud.points) == 0:
        raise ValueError(f"{path} holds no points (or Open3D cannot read its format)")
    return from_open3d(cloud, dtype=dtype)


def write_points(path: str | Path, xyz: torch.Tensor, colors: torch.Tensor | None = None) -> None:
    """Write ``(N, 3)`` points (optionally colored) with Open3D; the suffix picks the format."""
    if not _open3d().io.write_point_cloud(str(path), to_open3d(xyz, colors)):
        raise OSError(f"Open3D could not write {path}")
