"""Analytic phantoms: the Shepp–Logan head in 2D and 3D, rasterised by area averaging, with exact line integrals.

An ellipse (2D) or ellipsoid (3D) phantom is a sum of constant-density shapes; its line integrals have a
closed form (the chord length through each shape times its density), which gives sinograms free of
any discretisation ("no inverse crime").

Conventions follow ``recon.operators``: ``x`` along ``W``, ``y`` along ``H`` (rows, increasing
downwards), ``z`` along ``D``; the origin is the grid centre; lengths in mm. The classic tables are
given in units of the half field of view with ``y`` pointing up, as published; they are flipped here so
that the phantom looks as usual (the small ellipses at the bottom of the image).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "SHEPP_LOGAN_2D",
    "SHEPP_LOGAN_3D",
    "ellipse_line_integrals",
    "ellipsoid_line_integrals",
    "shepp_logan",
    "shepp_logan_3d",
]

# Modified Shepp–Logan (Toft 1996): density, semi-axes (a, b), centre (x0, y0), rotation (degrees).
SHEPP_LOGAN_2D: tuple = (
    (1.00, 0.6900, 0.9200, 0.00, 0.0000, 0.0),
    (-0.80, 0.6624, 0.8740, 0.00, -0.0184, 0.0),
    (-0.20, 0.1100, 0.3100, 0.22, 0.0000, -18.0),
    (-0.20, 0.1600, 0.4100, -0.22, 0.0000, 18.0),
    (0.10, 0.2100, 0.2500, 0.00, 0.3500, 0.0),
    (0.10, 0.0460, 0.0460, 0.00, 0.1000, 0.0),
    (0.10, 0.0460, 0.0460, 0.00, -0.1000, 0.0),
    (0.10, 0.0460, 0.0230, -0.08, -0.6050, 0.0),
    (0.10, 0.0230, 0.0230, 0.00, -0.6060, 0.0),
    (0.10, 0.0230, 0.0460, 0.06, -0.6050, 0.0),
)

# 3D modified Shepp–Logan (Kak & Slaney's ellipsoids with Toft's densities): density, semi-axes
# (a, b, c), centre (x0, y0, z0), rotation about z (degrees).
SHEPP_LOGAN_3D: tuple = (
    (1.00, 0.6900, 0.9200, 0.8100, 0.00, 0.0000, 0.00, 0.0),
    (-0.80, 0.6624, 0.8740, 0.7800, 0.00, -0.0184, 0.00, 0.0),
    (-0.20, 0.1100, 0.3100, 0.2200, 0.22, 0.0000, 0.00, -18.0),
    (-0.20, 0.1600, 0.4100, 0.2800, -0.22, 0.0000, 0.00, 18.0),
    (0.10, 0.2100, 0.2500, 0.4100, 0.00, 0.3500, -0.15, 0.0),
    (0.10, 0.0460, 0.0460, 0.0500, 0.00, 0.1000, 0.25, 0.0),
    (0.10, 0.0460, 0.0460, 0.0500, 0.00, -0.1000, 0.25, 0.0),
    (0.10, 0.0460, 0.0230, 0.0500, -0.08, -0.6050, 0.00, 0.0),
    (0.10, 0.0230, 0.0230, 0.0200, 0.00, -0.6060, 0.00, 0.0),
    (0.10, 0.0230, 0.0460, 0.0200, 0.06, -0.6050, 0.00, 0.0),
)


def _ellipses_mm(table, half_fov: float, ndim: int) -> list:
    """Scale a normalised table to mm and flip y (tables have y up; images have rows going down)."""
    out = []
    for row in table:
        if ndim == 2:
            rho, a, b, x0, y0, phi = row
            out.append((rho, (a * half_fov, b * half_fov), (x0 * half_fov, -y0 * half_fov), -phi))
        else:
            rho, a, b, c, x0, y0, z0, phi = row
            out.append(
                (rho, (a * half_fov, b * half_fov, c * half_fov), (x0 * half_fov, -y0 * half_fov, z0 * half_fov), -phi)
            )
    return out


def _grid(n: int, spacing: float, supersample: int, dtype) -> torch.Tensor:
    """Sub-sample centres of ``n`` pixels of size ``spacing`` (mm), shape ``(n, supersample)``."""
    centres = (torch.arange(n, dtype=dtype) - (n - 1) / 2) * spacing
    offsets = ((torch.arange(supersample, dtype=dtype) + 0.5) / supersample - 0.5) * spacing
    return centres[:, None] + offsets[None, :]


def _rasterise(shapes, coords: list, supersample: int, dtype) -> torch.Tensor:
    """Average of the shapes' indicator over ``supersample**ndim`` points per pixel."""
    ndim = len(coords)
    mesh = torch.meshgrid(*[c.reshape(-1) for c in coords], indexing="ij")  # (.., n*s) per axis, order z?, y, x
    img = torch.zeros_like(mesh[0])
    if ndim == 2:
        yy, xx = mesh
        pts = (xx, yy)
    else:
        zz, yy, xx = mesh
        pts = (xx, yy, zz)
    for rho, axes, centre, phi in shapes:
        c, s = math.cos(math.radians(phi)), math.sin(math.radians(phi))
        dx, dy = pts[0] - centre[0], pts[1] - centre[1]
        u = c * dx + s * dy  # coordinates in the shape's rotated frame
        v = -s * dx + c * dy
        q = (u / axes[0]) ** 2 + (v / axes[1]) ** 2
        if ndim == 3:
            q = q + ((pts[2] - centre[2]) / axes[2]) ** 2
        img += rho * (q <= 1).to(dtype)
    shape = []
    for cgrid in coords:
        shape += [cgrid.shape[0], supersample]
    img = img.reshape(shape)
    return img.mean(dim=tuple(range(1, 2 * ndim, 2)))


def shepp_logan(
    img_size: Sequence[int] = (256, 256),
    spacing: float | Sequence[float] = 1.0,
    supersample: int = 4,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The modified Shepp–Logan phantom (values in [0, 1]) as a ``(1, 1, H, W)`` tensor.

    The outer ellipse's long axis spans 92% of the smaller side of the field of view. Each pixel is the
    average of ``supersample²`` point samples, a good approximation of the pixel's area average.
    """
    H, W = (int(s) for s in img_size)
    sy, sx = (float(spacing),) * 2 if isinstance(spacing, (int, float)) else tuple(map(float, spacing))
    shapes = _ellipses_mm(SHEPP_LOGAN_2D, 0.5 * min(H * sy, W * sx), 2)
    coords = [_grid(H, sy, supersample, torch.float64), _grid(W, sx, supersample, torch.float64)]
    return _rasterise(shapes, coords, supersample, torch.float64).to(dtype)[None, None]


def shepp_logan_3d(
    img_size: Sequence[int] = (64, 64, 64),
    spacing: float | Sequence[float] = 1.0,
    supersample: int = 2,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The 3D modified Shepp–Logan phantom as a ``(1, 1, D, H, W)`` tensor (values in [0, 1])."""
    D, H, W = (int(s) for s in img_size)
    sz, sy, sx = (float(spacing),) * 3 if isinstance(spacing, (int, float)) else tuple(map(float, spacing))
    shapes = _ellipses_mm(SHEPP_LOGAN_3D, 0.5 * min(D * sz, H * sy, W * sx), 3)
    coords = [_grid(n, s, supersample, torch.float64) for n, s in ((D, sz), (H, sy), (W, sx))]
    return _rasterise(shapes, coords, supersample, torch.float64).to(dtype)[None, None]


def _chord_lengths(shapes, p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Σ density × chord length of the lines ``p + t d`` (``d`` unit) through ellipses/ellipsoids."""
    ndim = p.shape[-1]
    total = torch.zeros(p.shape[:-1], dtype=torch.float64)
    for rho, axes, centre, phi in shapes:
        c, s = math.cos(math.radians(phi)), math.sin(math.radians(phi))
        rot = torch.eye(ndim, dtype=torch.float64)
        rot[0, 0], rot[0, 1], rot[1, 0], rot[1, 1] = c, s, -s, c  # world → shape frame
        scale = torch.tensor(axes, dtype=torch.float64)
        q = ((p - torch.tensor(centre, dtype=torch.float64)) @ rot.T) / scale
        e = (d @ rot.T) / scale
        qa = (e * e).sum(-1)
        qb = (q * e).sum(-1)
        qc = (q * q).sum(-1) - 1
        disc = (qb * qb - qa * qc).clamp(min=0)
        total += rho * 2 * torch.sqrt(disc) / qa  # chord length in t, and |d| = 1
    return total


def ellipse_line_integrals(
    p: torch.Tensor, d: torch.Tensor, img_size: Sequence[int], spacing: float | Sequence[float] = 1.0
) -> torch.Tensor:
    """Exact line integrals of ``shepp_logan(img_size, spacing)`` along lines ``p + t d``.

    Args:
        p, d: ``(..., 2)`` points and unit directions ``(x, y)`` in mm.

    Returns:
        ``(...)`` float64 integrals in phantom units × mm.
    """
    H, W = (int(s) for s in img_size)
    sy, sx = (float(spacing),) * 2 if isinstance(spacing, (int, float)) else tuple(map(float, spacing))
    shapes = _ellipses_mm(SHEPP_LOGAN_2D, 0.5 * min(H * sy, W * sx), 2)
    return _chord_lengths(shapes, p.to(torch.float64), d.to(torch.float64))


def ellipsoid_line_integrals(
    p: torch.Tensor, d: torch.Tensor, img_size: Sequence[int], spacing: float | Sequence[float] = 1.0
) -> torch.Tensor:
    """Exact line integrals of ``shepp_logan_3d(img_size, spacing)`` along lines ``p + t d`` (``(..., 3)``)."""
    D, H, W = (int(s) for s in img_size)
    sz, sy, sx = (float(spacing),) * 3 if isinstance(spacing, (int, float)) else tuple(map(float, spacing))
    shapes = _ellipses_mm(SHEPP_LOGAN_3D, 0.5 * min(D * sz, H * sy, W * sx), 3)
    return _chord_lengths(shapes, p.to(torch.float64), d.to(torch.float64))
