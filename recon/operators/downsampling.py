r"""Downsampling by integer factors with a physical anti-alias filter (super-resolution forward model).

Along each downsampled axis (factor ``f``, input length ``n``, output length ``n / f``) the operator is a
filter followed by decimation, written as one banded matrix ``D`` of shape ``(n / f, n)``:

.. math::

    y[i] = \sum_m w[m]\, x[\rho(i f + m)]

and ``A = D_0 \otimes D_1 (\otimes D_2)`` acts separably (axes with factor 1 are left untouched). The
adjoint ``A^T = \prod D_a^T`` (zero-upsampling followed by the transposed filter: ``x[j]`` collects
``w[m] y[i]`` over all ``(i, m)`` with ``\rho(i f + m) = j``) is exact and written by hand; it is evaluated
as a gather with precomputed transposed tables, as cheap as the forward pass.

Geometry. Output pixel ``i`` covers input pixels ``i f, ..., i f + f - 1`` and is centred on their centre
``i f + (f - 1) / 2``: with the grid convention of :mod:`recon.operators._base` (origin at the grid
centre) the low-resolution grid has spacing ``f * spacing`` and the same origin. Every input length must
be divisible by its factor (otherwise ``ValueError``: crop or pad first), so no remainder is lost.

Filters (weights ``w`` sum to 1, so constant images map to the same constant):

- ``"box"``: slice-profile / thick-slice model, ``w = 1/f`` on the ``f`` pixels of the block, i.e. each
  output pixel is the mean of its block. This is the standard model of a clinical thick-slice
  acquisition (through-plane), and of pixel binning.
- ``"gaussian"``: Gaussian point-spread function centred on the block centre whose FWHM equals the output
  pixel size, ``FWHM = f`` input pixels, i.e. ``sigma = f / (2 sqrt(2 ln 2)) ≈ 0.425 f`` input pixels (the
  usual PSF model of in-plane resolution loss; its response at the new Nyquist frequency is ≈ 0.41),
  point-sampled, truncated at ``truncate * sigma`` and normalised. Near the borders the image is extended
  by half-sample symmetric reflection (``scipy.ndimage`` mode ``"reflect"``): ``x[-1] = x[0]``.
- ``"none"``: no anti-alias filter, sampling at pixel ``i f + (f - 1) // 2`` (the block centre for odd
  ``f``, half a pixel before it for even ``f``).
- ``"auto"`` (default): ``"box"`` along the slice axis ``D`` of volumes (thick slices from thin ones) and
  ``"gaussian"`` along in-plane axes ``H``, ``W``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from deepinv.physics import LinearPhysics

from ._base import as_size, as_spacing, check_image
from .blur import _KeepFloat64Buffers

__all__ = ["Downsampling"]

_FILTERS = ("auto", "gaussian", "box", "none")
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _reflect(j: torch.Tensor, n: int) -> torch.Tensor:
    """Half-sample symmetric index map onto ``[0, n)`` (``-1 -> 0``, ``n -> n - 1``), for any ``j``."""
    j = j % (2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def _taps(kind: str, f: int, truncate: float) -> tuple:
    """Offsets ``m`` (relative to ``i f``) and weights ``w`` (float64, sum 1) of one output pixel."""
    if kind == "box":
        m = torch.arange(f)
        w = torch.full((f,), 1.0 / f, dtype=torch.float64)
    elif kind == "gaussian":
        sigma = f / _FWHM_PER_SIGMA
        c = (f - 1) / 2
        m = torch.arange(math.floor(c - truncate * sigma), math.ceil(c + truncate * sigma) + 1)
        w = torch.exp(-0.5 * ((m.double() - c) / sigma) ** 2)
        w = w / w.sum()
    else:  # "none"
        m = torch.tensor([(f - 1) // 2])
        w = torch.ones(1, dtype=torch.float64)
    return m, w


def _transpose_taps(idx: torch.Tensor, w: torch.Tensor, n: int) -> tuple:
    """Gather tables of ``D^T`` from those of ``D`` (``D[i, idx[i, l]] += w[l]``).

    Returns ``idx_t`` (``(n, L_t)``, long) and ``w_t`` (``(n, L_t)``, float64) with ``(D^T y)[j] =
    sum_l w_t[j, l] y[idx_t[j, l]]``; rows shorter than ``L_t`` are padded with weight 0. The adjoint is
    then a gather like the forward pass, rather than a scatter-add.
    """
    n_out, L = idx.shape
    dense = torch.zeros(n_out, n, dtype=torch.float64)
    rows = torch.arange(n_out)[:, None].expand(n_out, L)
    dense.index_put_((rows, idx), w.expand(n_out, L), accumulate=True)
    nz = dense.T != 0  # (n, n_out)
    L_t = max(int(nz.sum(1).max()), 1)
    order = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :L_t]  # non-zeros first, in order
    w_t = torch.gather(dense.T, 1, order)
    idx_t = torch.where(w_t != 0, order, torch.zeros_like(order))
    return idx_t, w_t


def _as_int_factor(value, name: str) -> int:
    try:
        f = int(value)
        ok = f == value and not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok or f < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return f


def _axes(axes: int | Sequence[int] | None, ndim: int, size: tuple) -> tuple[int, ...]:
    """The downsampled axes, non-negative and distinct (all axes for None)."""
    if axes is None:
        return tuple(range(ndim))
    raw = (axes,) if isinstance(axes, int) else tuple(axes)
    if any(not isinstance(a, int) or not -ndim <= a < ndim for a in raw) or not raw:
        raise ValueError(f"axes must be in [{-ndim}, {ndim - 1}] for img_size {size}, got {axes}")
    sel = tuple(a % ndim for a in raw)
    if len(set(sel)) != len(sel):
        raise ValueError(f"axes must not repeat, got {axes}")
    return sel


class Downsampling(_KeepFloat64Buffers, LinearPhysics):
    r"""Anti-aliased integer downsampling of images ``(B, C, H, W)`` or volumes ``(B, C, D, H, W)``.

    ``y`` has shape ``(B, C, *out_size)`` with ``out_size[a] = img_size[a] // factor[a]``; see the module
    docstring for the maths, the filters and the geometry. Differentiable, float32/float64, any device
    (indices and weights are buffers that follow ``.to(device)``; the weights stay float64 under
    ``.to(dtype)`` and are cast to the input dtype at call time, so no precision is lost).

    Examples::

        Downsampling((64, 64), factor=2)                        # in-plane, Gaussian PSF (FWHM 2 px)
        Downsampling((32, 64, 64), factor=(4, 1, 1))           # thick slices: mean of 4 thin slices
        Downsampling((32, 64, 64), factor=2, axes=(1, 2))      # in-plane only, in a volume

    Args:
        img_size: spatial size ``(H, W)`` or ``(D, H, W)``.
        factor: integer factor ``>= 1``: one for all selected ``axes``, or one per selected axis (per
            spatial axis when ``axes`` is ``None``).
        axes: spatial axes to downsample (0 = ``D`` for volumes); default all axes.
        filter: ``"auto"``, ``"gaussian"``, ``"box"`` or ``"none"``, or one of those per spatial axis
            (or per selected axis).
        spacing: input voxel size in mm, a number or one per axis; the output spacing is
            ``spacing * factor``.
        noise_model: a deepinv noise model (default: no noise).
        truncate: half-width of the Gaussian filter in sigmas (default 4).
    """

    modality = "image"  #: what the operator measures (samplers read this, never the class)
    adjoint_is_inverse = False
    complex_data = False

    def __init__(
        self,
        img_size: Sequence[int],
        factor: int | Sequence[int],
        axes: int | Sequence[int] | None = None,
        filter: str | Sequence[str] = "auto",
        spacing: float | Sequence[float] = 1.0,
        noise_model=None,
        truncate: float = 4.0,
    ) -> None:
        size = as_size(img_size)
        ndim = len(size)
        spacing_mm = as_spacing(spacing, ndim, "spacing")
        sel = _axes(axes, ndim, size)
        if isinstance(factor, (int, float)):
            fac_sel = (_as_int_factor(factor, "factor"),) * len(sel)
        else:
            fac_sel = tuple(_as_int_factor(f, "factor") for f in factor)
            if len(fac_sel) != len(sel):
                what = f"axes {sel}" if axes is not None else f"img_size {size}"
                raise ValueError(
                    f"factor must be one integer or {len(sel)} (one per axis of {what}), got {tuple(factor)}"
                )
        factors = [1] * ndim
        for a, f in zip(sel, fac_sel, strict=True):
            factors[a] = f
        if isinstance(filter, str):
            filt_sel = (filter,) * len(sel)
        else:
            filt = tuple(filter)
            if len(filt) == ndim:
                filt_sel = tuple(filt[a] for a in sel)
            elif len(filt) == len(sel):
                filt_sel = filt
            else:
                raise ValueError(f"filter must be a string or one string per axis ({ndim}), got {filt}")
        bad = [f for f in filt_sel if f not in _FILTERS]
        if bad:
            raise ValueError(f"filter must be one of {_FILTERS}, got {bad[0]!r}")
        if not (truncate > 0) or truncate == float("inf"):
            raise ValueError(f"truncate must be positive and finite (in sigmas), got {truncate}")
        filters = ["-"] * ndim
        for a, kind in zip(sel, filt_sel, strict=True):
            if kind == "auto":
                kind = "box" if (ndim == 3 and a == 0) else "gaussian"
            filters[a] = kind if factors[a] > 1 else "-"
        rest = [(n, f) for n, f in zip(size, factors, strict=True) if n % f]
        if rest:
            raise ValueError(
                f"img_size {size} must be divisible by factor {tuple(factors)} along every axis "
                f"(got remainders {[n % f for n, f in zip(size, factors, strict=True)]}); crop or pad first"
            )

        super().__init__(noise_model=noise_model)
        self.img_size = size
        self.factor = tuple(factors)
        self.filters = tuple(filters)
        self.spacing = spacing_mm
        self.truncate = float(truncate)
        self.out_size = tuple(n // f for n, f in zip(size, factors, strict=True))
        self.out_spacing = tuple(s * f for s, f in zip(spacing_mm, factors, strict=True))
        self._active = tuple(a for a in range(ndim) if factors[a] > 1)
        for a in self._active:
            f, n = factors[a], size[a]
            m, w = _taps(filters[a], f, self.truncate)
            idx = _reflect(torch.arange(n // f)[:, None] * f + m[None, :], n)  # (n_out, L)
            self.register_buffer(f"_index{a}", idx)
            self.register_buffer(f"_weight{a}", w)
            idx_t, w_t = _transpose_taps(idx, w, n)
            self.register_buffer(f"_index_t{a}", idx_t)
            self.register_buffer(f"_weight_t{a}", w_t)
        self._float64_buffers = tuple(f"_weight{a}" for a in self._active) + tuple(
            f"_weight_t{a}" for a in self._active
        )

    def _check(self, t: torch.Tensor, spatial: tuple, name: str) -> None:
        check_image(t, spatial, name)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Filter and decimate ``x`` of shape ``(B, C, *img_size)``; returns ``(B, C, *out_size)``."""
        self._check(x, self.img_size, "x")
        for a in self._active:
            idx = getattr(self, f"_index{a}").to(x.device)
            w = getattr(self, f"_weight{a}").to(device=x.device, dtype=x.dtype)
            xm = x.movedim(a + 2, -1)
            x = (xm[..., idx] @ w).movedim(-1, a + 2)  # (..., n_out, L) @ (L,) -> (..., n_out)
        return x

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact adjoint: zero-upsampling then the transposed filter (scatter-add), ``(B, C, *img_size)``."""
        self._check(y, self.out_size, "y")
        for a in reversed(self._active):
            idx_t = getattr(self, f"_index_t{a}").to(y.device)
            w_t = getattr(self, f"_weight_t{a}").to(device=y.device, dtype=y.dtype)
            ym = y.movedim(a + 2, -1)
            y = (ym[..., idx_t] * w_t).sum(-1).movedim(-1, a + 2)  # (..., n_in, L_t) -> (..., n_in)
        return y

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Pseudo-inverse. Closed form ``prod(factor) * A^T y`` when every active filter is ``"box"`` or
        ``"none"`` (then ``A A^T`` is a multiple of the identity); otherwise deepinv's least squares."""
        if all(self.filters[a] in ("box", "none") for a in self._active):
            scale = math.prod(self.factor[a] for a in self._active if self.filters[a] == "box")
            return scale * self.A_adjoint(y)
        return super().A_dagger(y, **kwargs)

    def __repr__(self) -> str:
        def fmt(v):
            return "(" + ", ".join(f"{e:g}" if isinstance(e, float) else str(e) for e in v) + ")"

        noise = type(self.noise_model).__name__
        return (
            f"Downsampling(img_size={self.img_size} -> {self.out_size}, factor={self.factor}, "
            f"filter={fmt(self.filters)}, spacing={fmt(self.spacing)} -> {fmt(self.out_spacing)} mm, "
            f"noise={noise})"
        )
