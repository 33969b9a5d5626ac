"""Shared conventions and input checks for every `recon` operator.

Conventions (one place for all operators):

- Images are ``(B, C, H, W)`` and volumes ``(B, C, D, H, W)``; ``img_size`` is the spatial part,
  ``(H, W)`` or ``(D, H, W)``. Axis ``W`` is ``x``, ``H`` is ``y`` and ``D`` is ``z`` (the CT rotation
  axis / the slice axis).
- Physical coordinates are in millimetres with the origin at the centre of the grid: the centre of
  pixel ``j`` along an axis of ``n`` pixels with spacing ``s`` lies at ``(j - (n - 1) / 2) * s``.
- Operators accept float32 and float64 on any device; internal buffers follow the input's dtype and
  device. Bad shapes, dtypes or geometry raise ``ValueError`` naming what was expected and what was
  given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "as_size",
    "as_spacing",
    "check_image",
    "check_tensor",
]


def as_size(img_size: Sequence[int] | int, ndims: Sequence[int] = (2, 3), name: str = "img_size") -> tuple:
    """Validate an image/volume size, returning a tuple of positive ints with one of ``ndims`` entries."""
    if isinstance(img_size, int):
        raise ValueError(f"{name} must be a tuple of {' or '.join(map(str, ndims))} ints, got the int {img_size}")
    try:
        size = tuple(int(s) for s in img_size)
    except TypeError as err:
        raise ValueError(f"{name} must be a tuple of ints, got {img_size!r}") from err
    if any(int(s) != s for s in img_size):
        raise ValueError(f"{name} must contain integers, got {tuple(img_size)}")
    if len(size) not in ndims:
        raise ValueError(
            f"{name} must have {' or '.join(map(str, ndims))} entries (spatial size only, no batch or "
            f"channel), got {size}"
        )
    if any(s < 1 for s in size):
        raise ValueError(f"{name} entries must be positive, got {size}")
    return size


def as_spacing(spacing: float | Sequence[float], ndim: int, name: str) -> tuple:
    """Validate a spacing in mm: a positive scalar (isotropic) or one positive value per axis."""
    if isinstance(spacing, (int, float)):
        values = (float(spacing),) * ndim
    else:
        values = tuple(float(s) for s in spacing)
        if len(values) != ndim:
            raise ValueError(f"{name} must be a number or {ndim} numbers (mm), got {tuple(spacing)}")
    if any(not (v > 0) or v != v or v == float("inf") for v in values):
        raise ValueError(f"{name} must be positive and finite (mm), got {values}")
    return values


def check_tensor(x: torch.Tensor, name: str) -> None:
    """Require a real float32/float64 tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")


def check_image(x: torch.Tensor, spatial: tuple, name: str = "x", channels: int | None = None) -> None:
    """Require ``x`` of shape ``(B, C, *spatial)`` (``C == channels`` when given), float32/64."""
    check_tensor(x, name)
    expected = ("B", "C" if channels is None else channels, *spatial)
    ok = x.dim() == len(spatial) + 2 and tuple(x.shape[2:]) == tuple(spatial)
    if ok and channels is not None:
        ok = x.shape[1] == channels
    if not ok:
        exp = "(" + ", ".join(str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {exp}, got {tuple(x.shape)}")
