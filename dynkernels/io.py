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

from .ops._validation import check_tensor

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
    colors: ``(N, 3)`` or one ``(3,)`` color, values in [0, 1] (others are
    refused: Open3D would store them as they are, and every viewer clips)."""
    o3d = _open3d()
    check_tensor("xyz", xyz)
    if xyz.dim() != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape (N, 3), got {tuple(xyz.shape)}")
    if not (xyz.is_floating_point() or xyz.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"xyz must be a real tensor, got dtype {xyz.dtype}")
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz.detach().double().cpu().numpy()))
    if colors is not None:
        check_tensor("colors", colors)
        if colors.is_complex() or colors.dtype == torch.bool:
            raise TypeError(f"colors must be a real tensor with values in [0, 1], got dtype {colors.dtype}")
        rgb = colors.detach().double().cpu()
        if rgb.numel() and not bool(((rgb >= 0) & (rgb <= 1)).all()):  # NaN fails too
            raise ValueError(
                f"colors must lie in [0, 1], got values in [{float(rgb.min())}, {float(rgb.max())}] (scale 0-255 colors by 1/255)"
            )
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
    """Write ``(N, 3)`` points (optionally colored) with Open3D; the suffix
    picks the format. Raises ValueError for an empty cloud (no format Open3D
    writes holds zero points) and OSError naming the likely cause when Open3D
    refuses (a missing folder, an unknown suffix)."""
    cloud = to_open3d(xyz, colors)
    path = Path(path)
    if xyz.shape[0] == 0:
        raise ValueError(f"cannot write {path}: the cloud has no points (Open3D writes no empty clouds)")
    if not path.parent.is_dir():
        raise OSError(f"cannot write {path}: the folder {path.parent} does not exist")
    if not _open3d().io.write_point_cloud(str(path), cloud):
        raise OSError(
            f"Open3D could not write {path} (is {path.suffix!r} a point-cloud format it writes: .ply, .pcd, .xyz, .pts?)"
        )
