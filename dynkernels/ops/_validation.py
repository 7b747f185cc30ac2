"""Argument checks shared by the public ops: TypeError for a wrong type or
dtype, ValueError for a wrong shape, value or device, each naming the argument,
what was expected and what came."""

from __future__ import annotations

import numbers

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_points(name: str, t: object) -> torch.Tensor:
    """A (B, N, 3) floating tensor."""
    t = check_tensor(name, t)
    if t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (B, N, 3), got {tuple(t.shape)}")
    check_floating(name, t)
    return t


def check_index(name: str, t: object, ndim: int, shape_doc: str) -> torch.Tensor:
    t = check_tensor(name, t)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(t.shape)}")
    return t


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return value


def check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_finite_real(name: str, value: object) -> float:
    """A real number (not bool, not a tensor), finite: NaN or inf here would
    silently give a NaN result."""
    out = check_real(name, value)
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def check_same_batch(**tensors: torch.Tensor) -> None:
    """Equal leading sizes, compared pairwise (a set of sizes would hash them,
    which specialises a symbolic batch size under torch.compile(dynamic=True))."""
    items = list(tensors.items())
    first = items[0][1]
    for _, t in items[1:]:
        if t.shape[0] != first.shape[0]:
            listing = ", ".join(f"{n}: {v.shape[0]}" for n, v in items)
            raise ValueError(f"batch sizes must match, got {listing}")


def check_index_range(name: str, idx: torch.Tensor, size: int, lowest: int = -1) -> None:
    """Eager CPU check that idx lies in [lowest, size). Skipped on CUDA (it
    would sync; the kernels assert on the device instead) and while compiling."""
    if idx.device.type != "cpu" or idx.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = int(idx.min()), int(idx.max())
    if low < lowest or high >= size:
        raise IndexError(f"{name} must hold indices in [{lowest}, {size}), got values in [{low}, {high}]")


def check_no_self_overlap(name: str, t: torch.Tensor) -> None:
    """Refuse an in-place output whose elements share memory (an expand()ed
    or as_strided view): writes to one element would land in others. The test
    is sufficient for non-overlap: with the dims of size > 1 sorted by
    stride, each stride exceeds the span of the smaller ones (every view
    made by slicing, transposing, permuting or viewing a dense tensor
    passes)."""
    span = 0
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s > 1))
    for stride, size in dims:
        if stride <= span:
            raise ValueError(f"{name} is written in place and must not overlap itself (e.g. an expand()ed view)")
        span += (size - 1) * stride
