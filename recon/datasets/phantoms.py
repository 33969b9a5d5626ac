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
    "random_ct_phantom",
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


def random_ct_phantom(
    img_size: Sequence[int] = (128, 128), generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A random CT-like slice in HU, ``(H, W)``: air, a body outline with a fat layer, soft-tissue organs,
    bones of varying density, optional lungs and contrast-filled vessels, and smooth tissue texture.

    Used to augment the training data of the built-in CT prior; every random draw comes from ``generator``,
    so a phantom is reproducible from its seed.
    """
    H, W = (int(s) for s in img_size)
    g = generator if generator is not None else torch.Generator().manual_seed(0)

    def u(lo, hi, n=()):
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    ys = torch.linspace(-1, 1, H, dtype=torch.float64)[:, None] * (H / max(H, W))
    xs = torch.linspace(-1, 1, W, dtype=torch.float64)[None, :] * (W / max(H, W))

    def ellipse(cx, cy, a, b, phi):
        c, s = math.cos(phi), math.sin(phi)
        dx, dy = xs - cx, ys - cy
        return ((c * dx + s * dy) / a) ** 2 + ((-s * dx + c * dy) / b) ** 2 <= 1

    img = torch.full((H, W), -1000.0, dtype=torch.float64)
    a, b = float(u(0.55, 0.95)), float(u(0.45, 0.85))
    cx, cy, phi = float(u(-0.08, 0.08)), float(u(-0.08, 0.08)), float(u(-0.3, 0.3))
    body = ellipse(cx, cy, a, b, phi)
    img[body] = float(u(-120, -80))  # subcutaneous fat
    t = float(u(0.04, 0.12))
    inner = ellipse(cx, cy, a - t, b - t, phi)
    img[inner] = float(u(20, 50))  # muscle / soft tissue
    if float(u(0, 1)) < 0.5:  # lungs (thorax) or not (abdomen, head)
        for side in (-1, 1):
            img[ellipse(cx + side * a * 0.45, cy - 0.05, a * 0.32, b * 0.6, side * float(u(0, 0.3))) & inner] = float(
                u(-900, -750)
            )
    for _ in range(int(u(2, 7))):  # organs
        oa, ob = float(u(0.05, 0.3)), float(u(0.05, 0.3))
        ox, oy = float(u(-0.6, 0.6)) * (a - oa), float(u(-0.6, 0.6)) * (b - ob)
        img[ellipse(cx + ox, cy + oy, oa, ob, float(u(0, math.pi))) & inner] = float(u(-50, 90))
    for _ in range(int(u(1, 6))):  # bones: dense cortex around a less dense core
        ba, bb = float(u(0.03, 0.12)), float(u(0.03, 0.12))
        bx, by, bphi = float(u(-0.8, 0.8)) * (a - ba), float(u(-0.8, 0.8)) * (b - bb), float(u(0, math.pi))
        img[ellipse(cx + bx, cy + by, ba, bb, bphi) & inner] = float(u(600, 1500))
        img[ellipse(cx + bx, cy + by, 0.6 * ba, 0.6 * bb, bphi) & inner] = float(u(150, 400))
    for _ in range(int(u(0, 5))):  # contrast-filled vessels
        r = float(u(0.01, 0.04))
        img[ellipse(cx + float(u(-0.5, 0.5)) * a, cy + float(u(-0.5, 0.5)) * b, r, r, 0.0) & inner] = float(u(150, 300))
    # smooth texture inside the body: low-pass filtered noise of a few HU to tens of HU
    noise = torch.randn((1, 1, H, W), generator=g, dtype=torch.float64)
    k = max(3, int(0.04 * max(H, W)) | 1)
    kernel = torch.ones(1, 1, k, k, dtype=torch.float64) / k**2
    texture = torch.nn.functional.conv2d(noise, kernel, padding=k // 2)[0, 0] * k * float(u(2, 12))
    img = torch.where(body, img + texture, img)
    return img.to(dtype)
