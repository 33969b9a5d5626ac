"""Seeded Cartesian k-space sampling masks for :mod:`recon.operators.mri`.

Every function returns a ``float32`` torch tensor of zeros and ones with the requested ``shape``, in the
*centred* k-space convention of :class:`recon.operators.CartesianMRI`: index ``n // 2`` along an axis of
length ``n`` is the zero frequency (DC). A value of 1 means "this k-space sample is acquired".

The acceleration of a mask is ``R = (number of points) / (number of sampled points)``.

* :func:`random_mask` and :func:`equispaced_mask` are the fastMRI 1D phase-encode masks
  (``fastmri.data.subsample.RandomMaskFunc`` / ``EquiSpacedMaskFunc`` / ``EquispacedMaskFractionFunc``),
  re-implemented from their selection rules: they select columns along the **last** axis and broadcast
  them over all other axes.
* :func:`poisson_disc_mask` (variable-density Poisson disc, as BART ``poisson`` / sigpy ``mri.poisson``)
  and :func:`gaussian_mask` (variable-density Gaussian random) select points on the 2D ``(H, W)`` grid
  of the last two axes.

All randomness comes from ``numpy.random.default_rng(seed)``: the same seed gives the same mask on every
platform, and masks are built with numpy (they are not part of any differentiable operator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from recon.operators._base import as_size

__all__ = [
    "equispaced_mask",
    "gaussian_mask",
    "poisson_disc_mask",
    "random_mask",
    "unsampled_energy",
]


def default_center_fraction(acceleration: float) -> float:
    """fastMRI's standard fully sampled centre fraction: 0.08 for ``acceleration < 8``, else 0.04."""
    return 0.08 if acceleration < 8 else 0.04


def _check_acceleration(acceleration: float) -> float:
    try:
        acc = float(acceleration)
    except (TypeError, ValueError) as err:
        raise ValueError(f"acceleration must be a number >= 1, got {acceleration!r}") from err
    if not math.isfinite(acc) or acc < 1:
        raise ValueError(f"acceleration must be a finite number >= 1, got {acceleration!r}")
    return acc


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _center_lines(num_cols: int, acceleration: float, center_fraction: float | None) -> tuple[int, int]:
    """fastMRI centre block ``(pad, num_low)``: ``num_low = round(N cf)``, ``pad = (N - num_low + 1)//2``."""
    cf = default_center_fraction(acceleration) if center_fraction is None else float(center_fraction)
    if not 0 <= cf <= 1:
        raise ValueError(f"center_fraction must be in [0, 1], got {center_fraction!r}")
    num_low = round(num_cols * cf)
    pad = (num_cols - num_low + 1) // 2
    return pad, num_low


def _broadcast_columns(cols: np.ndarray, shape: tuple) -> torch.Tensor:
    return torch.from_numpy(np.broadcast_to(cols, shape).astype(np.float32))  # astype copies: writable


def random_mask(
    shape: Sequence[int],
    acceleration: float,
    center_fraction: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """fastMRI ``RandomMaskFunc``: random phase-encode columns plus a fully sampled centre.

    Along the last axis (``N`` columns): ``num_low = round(N * center_fraction)`` contiguous centre
    columns ``[pad, pad + num_low)`` with ``pad = (N - num_low + 1) // 2`` are always kept, and every
    column (centre included, as in fastMRI) is also kept independently with probability

    .. math:: p = \\frac{N / R - n_{low}}{N - n_{low}},

    so the *expected* number of sampled columns is exactly ``N / R``. The achieved acceleration of one
    mask is random; its mean over seeds is ``R`` (to within the discreteness of ``N``).

    Args:
        shape: mask shape, 1 to 3 ints; columns are along the last axis and repeated over the others.
        acceleration: nominal acceleration ``R >= 1``.
        center_fraction: fraction of columns in the fully sampled centre; default 0.08 for ``R < 8``,
            else 0.04 (fastMRI's standard settings).
        seed: seed of the ``numpy.random.default_rng`` that draws the columns.

    Returns:
        float32 tensor of 0/1 with the given shape.

    Raises:
        ValueError: on a bad shape, ``R < 1``, a centre fraction outside [0, 1], or a centre larger than
            the ``N / R`` column budget (then ``p < 0``).
    """
    shape = as_size(shape, ndims=(1, 2, 3), name="shape")
    acc = _check_acceleration(acceleration)
    rng = np.random.default_rng(_check_seed(seed))
    n = shape[-1]
    pad, num_low = _center_lines(n, acc, center_fraction)
    cols = np.zeros(n, dtype=bool)
    cols[pad : pad + num_low] = True
    if num_low < n:
        prob = (n / acc - num_low) / (n - num_low)
        if prob < 0:
            raise ValueError(
                f"the fully sampled centre ({num_low} of {n} columns) exceeds the budget of N/R = "
                f"{n / acc:.1f} columns for acceleration {acc:g}; lower center_fraction"
            )
        cols |= rng.uniform(size=n) < prob
    return _broadcast_columns(cols, shape)


def equispaced_mask(
    shape: Sequence[int],
    acceleration: float,
    center_fraction: float | None = None,
    seed: int = 0,
    fraction: bool = False,
) -> torch.Tensor:
    """fastMRI equispaced phase-encode mask plus a fully sampled centre (centre rule of :func:`random_mask`).

    * ``fraction=False`` (``EquiSpacedMaskFunc``): columns ``offset, offset + R, offset + 2R, ...`` with
      ``offset`` drawn uniformly in ``[0, round(R))`` from ``seed``, plus the centre. The centre lines come
      *on top of* the ``N / R`` equispaced lines, so the achieved acceleration is below ``R`` (for
      ``N = 320, R = 4``: about 3.2). This is fastMRI's published setting.
    * ``fraction=True`` (``EquispacedMaskFractionFunc``): the spacing is widened to
      ``R_adj = R (n_low - N) / (n_low R - N)`` so that the total, centre included, is about ``N / R``
      lines; columns are ``round(offset + k R_adj)``, ``offset`` uniform in ``[0, round(R_adj))``.

    A non-integer ``R`` (or ``R_adj``) places the columns at ``round(offset + k R)``; for an integer ``R``
    this is exactly ``mask[offset::R] = 1``.

    Args:
        shape: mask shape, 1 to 3 ints; columns along the last axis, repeated over the others.
        acceleration: nominal acceleration ``R >= 1``.
        center_fraction: centre fraction, default 0.08 for ``R < 8`` else 0.04.
        seed: seed of the ``numpy.random.default_rng`` that draws the offset.
        fraction: use the ``EquispacedMaskFractionFunc`` rule (achieved acceleration close to ``R``).

    Returns:
        float32 tensor of 0/1 with the given shape.

    Raises:
        ValueError: on a bad shape, ``R < 1``, or a centre that alone exceeds the ``N / R`` budget
            when ``fraction=True``.
    """
    shape = as_size(shape, ndims=(1, 2, 3), name="shape")
    acc = _check_acceleration(acceleration)
    rng = np.random.default_rng(_check_seed(seed))
    n = shape[-1]
    pad, num_low = _center_lines(n, acc, center_fraction)
    cols = np.zeros(n, dtype=bool)
    cols[pad : pad + num_low] = True
    step = acc
    if fraction and acc > 1:
        if num_low * acc >= n:
            raise ValueError(
                f"the fully sampled centre ({num_low} of {n} columns) leaves no room for equispaced lines at "
                f"acceleration {acc:g}; lower center_fraction"
            )
        step = acc * (num_low - n) / (num_low * acc - n)
    offset = int(rng.integers(0, max(round(step), 1)))
    if float(step).is_integer():
        cols[offset :: int(step)] = True
    else:
        idx = np.round(np.arange(offset, n, step)).astype(np.int64)
        cols[idx[idx < n]] = True
    return _broadcast_columns(cols, shape)


def _calib_box(shape2d: tuple, calib: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(calib, (int, np.integer)):
        calib = (int(calib), int(calib))
    calib = tuple(int(c) for c in calib)
    if len(calib) != 2 or any(c < 0 for c in calib):
        raise ValueError(f"calib must be two non-negative ints (rows, columns), got {calib}")
    return min(calib[0], shape2d[0]), min(calib[1], shape2d[1])


def _calib_slices(shape2d: tuple, calib: tuple[int, int]) -> tuple[slice, slice]:
    """Centred calibration box; contains index ``n // 2`` (DC) for every non-empty box."""
    out = []
    for n, c in zip(shape2d, calib, strict=True):
        start = n // 2 - c // 2
        out.append(slice(start, start + c))
    return tuple(out)


def _normalised_radius(shape2d: tuple, calib: tuple[int, int]) -> np.ndarray:
    """sigpy's variable-density radius: 0 inside the calibration box, 1 at the k-space edge."""
    ny, nx = shape2d
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    x = np.maximum(np.abs(x - nx / 2) - calib[1] / 2, 0)
    y = np.maximum(np.abs(y - ny / 2) - calib[0] / 2, 0)
    x /= max(x.max(), 1e-12)
    y /= max(y.max(), 1e-12)
    return np.sqrt(x**2 + y**2)


def _bridson(
    radius_y: np.ndarray, radius_x: np.ndarray, rng: np.random.Generator, max_attempts: int
) -> np.ndarray:
    """Bridson dart throwing on the pixel grid with a spatially varying elliptical exclusion radius.

    A new sample ``q`` is rejected if it lies inside the exclusion ellipse of any accepted sample ``p``
    (radii ``radius_y[p], radius_x[p]``), the rule of sigpy's ``_poisson``. Each accepted sample marks
    its ellipse in a ``blocked`` map once, so testing a candidate is a single lookup. Candidates are
    drawn ``max_attempts`` at a time in the annulus ``[r, 2r)`` around a random active sample
    (vectorised); an active sample with no valid candidate is retired. The blocked map has a blocked
    border wide enough that out-of-grid candidates are rejected by the same lookup.
    """
    ny, nx = radius_y.shape
    cap = 2.0 * max(ny, nx)  # an ellipse this large already covers the whole grid
    radius_y = np.minimum(radius_y, cap)
    radius_x = np.minimum(radius_x, cap)
    pad = int(2 * max(radius_y.max(), radius_x.max())) + 2
    blocked = np.ones((ny + 2 * pad, nx + 2 * pad), dtype=bool)
    blocked[pad:-pad, pad:-pad] = False
    mask = np.zeros((ny, nx), dtype=bool)
    chunk = 2048

    def accept(py: int, px: int) -> None:
        ry, rx = radius_y[py, px], radius_x[py, px]
        y0, y1 = max(int(py - ry), 0), min(int(py + ry) + 1, ny)
        x0, x1 = max(int(px - rx), 0), min(int(px + rx) + 1, nx)
        dy = ((np.arange(y0, y1) - py) / ry)[:, None]
        dx = ((np.arange(x0, x1) - px) / rx)[None, :]
        blocked[y0 + pad : y1 + pad, x0 + pad : x1 + pad] |= dy * dy + dx * dx < 1
        mask[py, px] = True

    py, px = int(rng.integers(ny)), int(rng.integers(nx))
    accept(py, px)
    active = [(py, px)]
    j = chunk
    while active:
        if j == chunk:  # draw random numbers in bulk: pick index, then radius in [r, 2r) and angle
            pick = rng.random(chunk)
            v = np.sqrt(rng.random((chunk, max_attempts)) * 3 + 1)  # area-uniform in the annulus
            t = 2 * np.pi * rng.random((chunk, max_attempts))
            vy, vx = v * np.sin(t), v * np.cos(t)
            j = 0
        i = int(pick[j] * len(active))
        py, px = active[i]
        qy = (py + pad + radius_y[py, px] * vy[j]).astype(np.intp)  # py + pad + ... > 0: trunc == floor
        qx = (px + pad + radius_x[py, px] * vx[j]).astype(np.intp)
        j += 1
        free = np.flatnonzero(~blocked[qy, qx])
        if free.size:
            k = free[0]
            qyk, qxk = int(qy[k]) - pad, int(qx[k]) - pad
            accept(qyk, qxk)
            active.append((qyk, qxk))
        else:
            active[i] = active[-1]
            active.pop()
    return mask


class _PoissonDensity:
    """The variable-density Poisson-disc model of ``poisson_disc_mask``: exclusion radii ``(1 + s r)`` scaled per
    axis, the expected sample count as a density sum, and masks drawn by Bridson dart throwing."""

    def __init__(self, shape2d: tuple[int, int], cal: tuple[int, int], crop_corner: bool, seed: int,
                 max_attempts: int):
        ny, nx = shape2d
        self.r = _normalised_radius(shape2d, cal)
        self.cal_sl = _calib_slices(shape2d, cal)
        self.keep = self.r < 1 if crop_corner else np.ones(shape2d, dtype=bool)
        self.scale = np.array([ny, nx], dtype=np.float64) / max(ny, nx)
        region = self.keep.copy()
        region[self.cal_sl] = False
        self.n_cal = cal[0] * cal[1]
        self.r_reg = self.r[region]
        self.seed, self.max_attempts = seed, max_attempts
        self.total = ny * nx
        self.bracket = (0.0, 4.0 * max(ny, nx))

    def radii(self, rr: np.ndarray, slope: float) -> tuple[np.ndarray, np.ndarray]:
        base = 1 + rr * slope
        return np.clip(base * self.scale[0], 1, None), np.clip(base * self.scale[1], 1, None)

    def density_sum(self, slope: float) -> float:
        ry, rx = self.radii(self.r_reg, slope)
        return float(np.sum(1.0 / (ry * rx)))

    def model_slope(self, target: float, packing: float, lo: float, hi: float) -> float:
        """count(s) ~ n_cal + packing * sum 1 / (ry rx): solved on the model (cheap), then refined on masks."""
        a, b = lo, hi
        for _ in range(50):
            mid = 0.5 * (a + b)
            if self.n_cal + packing * self.density_sum(mid) > target:
                a = mid
            else:
                b = mid
        return 0.5 * (a + b)

    def make(self, slope: float) -> np.ndarray:
        ry, rx = self.radii(self.r, slope)
        m = _bridson(ry, rx, np.random.default_rng(self.seed), self.max_attempts) & self.keep
        m[self.cal_sl] = True
        return m


def _fit_density(model: _PoissonDensity, target: float, acc: float, tol: float, max_iter: int):
    """Safeguarded bisection on the density slope: the model proposes the slope, the bracket of measured masks
    keeps it honest (the midpoint when the proposal leaves the bracket). Returns the best mask and its relative
    acceleration error."""
    lo, hi = model.bracket
    packing = 0.65  # samples per unit exclusion area of a maximal Poisson-disc set, refined below
    best, best_err = None, np.inf
    use_model = True
    for it in range(max_iter):
        slope = model.model_slope(target, packing, lo, hi) if use_model else 0.5 * (lo + hi)
        if not lo < slope < hi:
            slope = 0.5 * (lo + hi)
        width = hi - lo
        m = model.make(slope)
        count = int(m.sum())
        achieved = model.total / max(count, 1)
        err = abs(achieved - acc) / acc
        if err < best_err:
            best, best_err = m, err
        # stop at tol; or when the slope bracket is below 1e-3 (radii move by < 1e-3 px); or, after 6
        # steps, with a mask already within the 5 % guarantee (steep, grainy end near R ~ 3)
        if err < tol or hi - lo < 1e-3 or (it >= 5 and best_err < 0.05):
            break
        if achieved < acc:
            lo = slope
        else:
            hi = slope
        # a model step that did not halve the bracket is followed by a plain bisection step
        use_model = not (use_model and hi - lo > 0.5 * width)
        dens = model.density_sum(slope)
        if dens > 0 and count > model.n_cal:
            packing = (count - model.n_cal) / dens
    return best, best_err


def poisson_disc_mask(
    shape: Sequence[int],
    acceleration: float,
    calib: Sequence[int] | int = (24, 24),
    seed: int = 0,
    crop_corner: bool = True,
    max_attempts: int = 30,
    tol: float = 0.02,
    max_iter: int = 30,
) -> torch.Tensor:
    """2D variable-density Poisson-disc mask (BART ``poisson``, sigpy ``mri.poisson``) on the last two axes.

    Samples keep a minimum distance that grows linearly with the normalised k-space radius ``r`` (0 at
    the calibration box, 1 at the edge): ``radius = max(1, (1 + s r) n_axis / max(H, W))`` pixels along
    each axis (elliptical for non-square grids), drawn by Bridson dart throwing. The density scale ``s``
    is found by a safeguarded bisection until the achieved acceleration ``H W / #samples`` is within
    ``tol`` (relative) of ``acceleration``; a centred ``calib`` box is fully sampled and, with
    ``crop_corner``, the corners outside the inscribed ellipse are left empty (as sigpy). For 3D shapes
    the same 2D mask is repeated over the leading axis (a 2D phase-encode mask for a 3D acquisition).

    Note: On a pixel grid any exclusion radius above one pixel already removes the 4-neighbours,
    so the lowest reachable acceleration is about 2.6 (about 3.2 with ``crop_corner``, which drops
    21 % of k-space); lower requests raise ``ValueError``, as do requests a tiny grid cannot meet.

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``.
        acceleration: requested acceleration ``R >= 1``.
        calib: size ``(rows, columns)`` (or one int) of the fully sampled centre; clipped to the shape.
        seed: seed of the ``numpy.random.default_rng`` driving the dart throwing (same for each
            bisection step, so the result is reproducible).
        crop_corner: leave the k-space corners (``r >= 1`` outside the calibration box) unsampled.
        max_attempts: Bridson candidates per active sample.
        tol: relative acceleration tolerance of the bisection.
        max_iter: maximum number of bisection steps.

    Returns:
        float32 tensor of 0/1 with the given shape.

    Raises:
        ValueError: on a bad shape or ``R < 1``, if the calibration box alone exceeds the sample
            budget, or if no density reaches ``R`` within 5 %.
    """
    size = as_size(shape, ndims=(2, 3), name="shape")
    acc = _check_acceleration(acceleration)
    seed = _check_seed(seed)
    shape2d = size[-2:]
    ny, nx = shape2d
    cal = _calib_box(shape2d, calib)
    total = ny * nx
    if cal[0] * cal[1] > total / acc:
        raise ValueError(
            f"the calibration box {cal} ({cal[0] * cal[1]} points) exceeds the budget of {total / acc:.0f} "
            f"points for acceleration {acc:g} on a {shape2d} grid; use a smaller calib"
        )
    model = _PoissonDensity(shape2d, cal, crop_corner, seed, max_attempts)
    best, best_err = _fit_density(model, total / acc, acc, tol, max_iter)
    if best_err > 0.05:
        raise ValueError(
            f"could not reach acceleration {acc:g} within 5% on a {shape2d} grid with calib {cal} "
            f"(closest: {total / best.sum():.3g}); change the acceleration, calib or grid size"
        )
    return torch.from_numpy(np.broadcast_to(best, size).astype(np.float32))


def gaussian_mask(
    shape: Sequence[int],
    acceleration: float,
    calib: Sequence[int] | int = (24, 24),
    sigma: float = 0.25,
    seed: int = 0,
) -> torch.Tensor:
    """2D variable-density Gaussian random mask with a fully sampled centre, on the last two axes.

    Outside the centred ``calib`` box, exactly ``round(H W / R) - #calib`` points are drawn *without
    replacement* with probability proportional to
    ``exp(-((ky / (sigma H))^2 + (kx / (sigma W))^2) / 2)`` (``ky, kx`` in pixels from the DC sample),
    using Efraimidis-Spirakis weighted sampling. The achieved acceleration is therefore
    ``H W / round(H W / R)``, within one sample of ``R``. For 3D shapes the 2D mask is repeated over the
    leading axis.

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``.
        acceleration: requested acceleration ``R >= 1``.
        calib: size ``(rows, columns)`` (or one int) of the fully sampled centre; clipped to the shape.
        sigma: standard deviation of the sampling density as a fraction of the axis length.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        float32 tensor of 0/1 with the given shape.

    Raises:
        ValueError: on a bad shape, ``R < 1``, ``sigma <= 0`` or a calibration box over the budget.
    """
    size = as_size(shape, ndims=(2, 3), name="shape")
    acc = _check_acceleration(acceleration)
    rng = np.random.default_rng(_check_seed(seed))
    if not (float(sigma) > 0 and math.isfinite(float(sigma))):
        raise ValueError(f"sigma must be a positive fraction of the axis length, got {sigma!r}")
    ny, nx = size[-2:]
    cal = _calib_box((ny, nx), calib)
    budget = round(ny * nx / acc)
    if cal[0] * cal[1] > budget:
        raise ValueError(
            f"the calibration box {cal} ({cal[0] * cal[1]} points) exceeds the budget of {budget} points "
            f"for acceleration {acc:g} on a {(ny, nx)} grid; use a smaller calib"
        )
    mask = np.zeros((ny, nx), dtype=bool)
    mask[_calib_slices((ny, nx), cal)] = True
    ky = (np.arange(ny) - ny // 2)[:, None] / (sigma * ny)
    kx = (np.arange(nx) - nx // 2)[None, :] / (sigma * nx)
    logw = -0.5 * (ky**2 + kx**2)
    cand = np.flatnonzero(~mask.ravel())
    n_draw = budget - int(mask.sum())
    if n_draw > 0:
        # Efraimidis-Spirakis: the n largest keys log(u) / w are a weighted sample without replacement;
        # computed as log(-log u) - log w (smallest) to stay finite for tiny weights.
        keys = np.log(-np.log(rng.random(cand.size))) - logw.ravel()[cand]
        chosen = cand[np.argpartition(keys, n_draw - 1)[:n_draw]]
        mask.ravel()[chosen] = True
    return torch.from_numpy(np.broadcast_to(mask, size).astype(np.float32))


def unsampled_energy(mask: torch.Tensor | np.ndarray) -> float:
    """The share of a natural image's k-space energy that ``mask`` leaves unsampled: with the power spectrum modelled
    as ``1 / (1 + |k|²)`` (``k`` in cycles per field of view, DC at index ``n // 2`` of each of the mask's axes),
    ``Σ_unsampled S(k) / Σ S(k)``, in [0, 1]. Unlike the acceleration it sees where the gaps are: a mask that
    leaves low frequencies out (fastMRI's centre halves at ``R = 8``) loses far more of the image than one that
    leaves out as many high-frequency lines.
    """
    m = torch.as_tensor(mask).detach().cpu().double()
    k2 = sum(((torch.arange(n, dtype=torch.float64) - n // 2) ** 2).reshape([-1 if i == a else 1
                                                                              for i in range(m.dim())])
             for a, n in enumerate(m.shape))
    spectrum = 1.0 / (1.0 + k2)
    return float((spectrum * (m == 0)).sum() / spectrum.expand(m.shape).sum())
