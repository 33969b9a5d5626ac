"""Matched ray-driven projectors (Joseph's method) shared by the CT operators.

This is the product, so it is written here rather than taken from a peer: deepinv's ``Tomography``
rotates the image with ``grid_sample`` (slow, and its exact adjoint needs autograd) and ASTRA's CPU
projectors are GPL and 2D only.

Joseph's method (Joseph 1982): a ray is sampled once per pixel row (or column, whichever axis the ray is
closer to), the image is linearly interpolated across the ray at that sample, and the sample is
weighted by the path length per step, ``spacing_along / |cos|``. The weights therefore define a
sparse system matrix ``A`` with ``2`` (2D) or ``4`` (3D, bilinear across the ray) entries per step.

Both ``A`` and ``A^T`` are applied from the same table of (pixel index, weight) pairs, so the pair is
matched to floating-point summation order. Two execution paths share that table:

- *matrix*: the table is assembled once into CSR matrices for ``A`` and ``A^T`` (int32 indices, which
  the MKL/cuSPARSE kernels need for speed) and applied with ``torch.sparse.mm``; used when both fit in
  the operator's ``matrix_memory`` budget.
- *matrix-free*: the table is recomputed for chunks of views on every call; ``A`` gathers and ``A^T``
  scatters (``index_add_``) with the same entries. Memory stays bounded by the chunk size.

Coordinates: see ``recon.operators._base``. A ray is a point ``p`` and a unit direction ``d`` in mm,
``(x, y)`` in 2D and ``(x, y, z)`` in 3D.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse
import torch

RayFn = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def _across_coordinates(p_al, p_ac, d_al, d_ac, n_al, n_ac, s_al, s_ac, k_steps):
    """Continuous across-axis indices of each ray at each grid plane of the 'along' axis.

    A ray ``p + t d`` crosses the plane ``along = (a - (n_al - 1) / 2) s_al`` at across coordinate
    ``p_ac + t d_ac``, an affine function of the step ``a``. Per-ray coefficients are computed in float64;
    the ``(R, K)`` arrays in float32 (relative accuracy ~1e-7 of a pixel index, plenty for weights).

    Returns ``(u_list, length)``: for each across axis a ``(R, K)`` float32 tensor of fractional
    indices, and the per-step path length ``(R,)`` in mm (float64).
    """
    a = torch.arange(k_steps, device=p_al.device, dtype=torch.float32)
    slope_t = s_al / d_al  # dt per step
    t0 = (-(n_al - 1) / 2 * s_al - p_al) / d_al  # t at step 0
    us = []
    for p, d, n, s in zip(p_ac, d_ac, n_ac, s_ac, strict=True):
        offset = ((p + t0 * d) / s + (n - 1) / 2).to(torch.float32)
        slope = (slope_t * d / s).to(torch.float32)
        us.append(torch.addcmul(offset[:, None], slope[:, None], a[None, :]))
    return us, (s_al / d_al.abs())


def _group_by_dominant_axis(d: torch.Tensor):
    """Rays closer to the y axis step over rows; the others step over columns."""
    ydom = d[:, 1].abs() >= d[:, 0].abs()
    groups = []
    for dominant, sel in ((True, ydom), (False, ~ydom)):
        rows = torch.nonzero(sel).squeeze(1)
        if rows.numel():
            groups.append((dominant, rows, rows.numel() == d.shape[0]))
    return groups


def joseph_table_2d(p: torch.Tensor, d: torch.Tensor, img_hw: tuple, spacing_yx: tuple):
    """Joseph weights for 2D rays.

    Args:
        p, d: ``(R, 2)`` float64 ray points and unit directions ``(x, y)`` in mm.
        img_hw: ``(H, W)``; spacing_yx: ``(sy, sx)`` in mm.

    Returns:
        ``idx`` ``(R, 2K)`` int32 flat pixel indices (``i * W + j``) and ``w`` ``(R, 2K)`` float32
        weights in mm, with ``K = max(H, W)``; entries outside the image have weight 0 and a valid index.
    """
    H, W = img_hw
    sy, sx = spacing_yx
    K = max(H, W)
    R = p.shape[0]
    groups = _group_by_dominant_axis(d)
    if len(groups) == 1 and groups[0][2]:
        idx = w = None
    else:
        idx = torch.empty((R, 2, K), dtype=torch.int32, device=p.device)
        w = torch.empty((R, 2, K), dtype=torch.float32, device=p.device)
    steps = torch.arange(K, device=p.device, dtype=torch.int32)
    for dominant, rows, everything in groups:
        pp, dd = (p, d) if everything else (p[rows], d[rows])
        if dominant:  # step over image rows (y), interpolate across columns (x)
            n_al, n_ac, s_al, s_ac, al, ac, stride_al, stride_ac = H, W, sy, sx, 1, 0, W, 1
        else:  # step over columns (x), interpolate across rows (y)
            n_al, n_ac, s_al, s_ac, al, ac, stride_al, stride_ac = W, H, sx, sy, 0, 1, 1, W
        (u,), length = _across_coordinates(
            pp[:, al], (pp[:, ac],), dd[:, al], (dd[:, ac],), n_al, (n_ac,), s_al, (s_ac,), K
        )
        c0 = torch.floor(u)
        f = u - c0
        c0i = c0.to(torch.int32)
        in_along = (steps < n_al)[None, :]
        base = steps.clamp(max=n_al - 1)[None, :] * stride_al
        length = length.to(torch.float32)[:, None]
        ww = torch.empty((pp.shape[0], 2, K), dtype=torch.float32, device=p.device)
        ii = torch.empty((pp.shape[0], 2, K), dtype=torch.int32, device=p.device)
        for k, (cc, wk) in enumerate(((c0i, 1 - f), (c0i + 1, f))):
            valid = in_along & (cc >= 0) & (cc <= n_ac - 1)
            torch.mul(wk, length, out=ww[:, k])
            ww[:, k].masked_fill_(~valid, 0.0)
            torch.add(base, cc.clamp(0, n_ac - 1) * stride_ac, out=ii[:, k])
        if everything:
            idx, w = ii, ww
        else:
            idx[rows], w[rows] = ii, ww
    return idx.reshape(R, 2 * K), w.reshape(R, 2 * K)


def joseph_table_3d(p: torch.Tensor, d: torch.Tensor, vol_dhw: tuple, spacing_zyx: tuple):
    """Joseph weights for 3D rays that are closer to the ``xy`` plane than to the ``z`` axis.

    Steps over the in-plane axis the ray is closest to and interpolates bilinearly across the other
    in-plane axis and ``z``.

    Args:
        p, d: ``(R, 3)`` float64 points and unit directions ``(x, y, z)`` in mm.
        vol_dhw: ``(D, H, W)``; spacing_zyx: ``(sz, sy, sx)`` in mm.

    Returns:
        ``idx`` ``(R, 4K)`` int32 flat voxel indices (``k * H * W + i * W + j``) and float32 weights
        ``w`` ``(R, 4K)`` in mm, ``K = max(H, W)``.
    """
    D, H, W = vol_dhw
    sz, sy, sx = spacing_zyx
    K = max(H, W)
    R = p.shape[0]
    idx = torch.empty((R, 4, K), dtype=torch.int32, device=p.device)
    w = torch.empty((R, 4, K), dtype=torch.float32, device=p.device)
    steps = torch.arange(K, device=p.device, dtype=torch.int32)
    for dominant, rows, everything in _group_by_dominant_axis(d):
        pp, dd = (p, d) if everything else (p[rows], d[rows])
        if dominant:
            n_al, n_ac, s_al, s_ac, al, ac, stride_al, stride_ac = H, W, sy, sx, 1, 0, W, 1
        else:
            n_al, n_ac, s_al, s_ac, al, ac, stride_al, stride_ac = W, H, sx, sy, 0, 1, 1, W
        (u, v), length = _across_coordinates(
            pp[:, al], (pp[:, ac], pp[:, 2]), dd[:, al], (dd[:, ac], dd[:, 2]),
            n_al, (n_ac, D), s_al, (s_ac, sz), K,
        )
        c0, z0 = torch.floor(u), torch.floor(v)
        f, g = u - c0, v - z0
        c0i, z0i = c0.to(torch.int32), z0.to(torch.int32)
        in_along = (steps < n_al)[None, :]
        base = steps.clamp(max=n_al - 1)[None, :] * stride_al
        length = length.to(torch.float32)[:, None]
        ww = torch.empty((pp.shape[0], 4, K), dtype=torch.float32, device=p.device)
        ii = torch.empty((pp.shape[0], 4, K), dtype=torch.int32, device=p.device)
        k = 0
        for cc, wc in ((c0i, 1 - f), (c0i + 1, f)):
            for zz, wz in ((z0i, 1 - g), (z0i + 1, g)):
                valid = in_along & (cc >= 0) & (cc <= n_ac - 1) & (zz >= 0) & (zz <= D - 1)
                ww[:, k] = wc * wz * length
                ww[:, k].masked_fill_(~valid, 0.0)
                ii[:, k] = base + cc.clamp(0, n_ac - 1) * stride_ac + zz.clamp(0, D - 1) * (H * W)
                k += 1
        if everything:
            idx, w = ii, ww
        else:
            idx[rows], w[rows] = ii, ww
    return idx.reshape(R, 4 * K), w.reshape(R, 4 * K)


class RayTable:
    """The system matrix of a ray geometry, applied as ``A`` or ``A^T`` on flattened images.

    The views are split into blocks of about ``block_entries`` table entries. A block's CSR pair
    (``A_b`` and ``A_b^T``, float32 values, int32 indices, zeros dropped) is built on first use and kept
    while the kept blocks fit in ``matrix_memory`` bytes; blocks beyond the budget are applied
    matrix-free from a freshly computed table on every call (gather for ``A``, ``index_add_`` for
    ``A^T``), so memory stays bounded whatever the geometry, and speed degrades gracefully.
    ``A x = [A_1 x; A_2 x; …]`` and ``A^T y = Σ_b A_b^T y_b``.

    Args:
        rays: ``rays(v0, v1) -> (idx, w)`` returns the Joseph table of views ``v0 .. v1 - 1`` (int32
            indices, float32 weights) on CPU, rows ordered view-major (all detector elements of view
            ``v0`` first).
        n_views, rays_per_view: number of views and of rays (detector elements) per view.
        n_pixels: number of image pixels / voxels (columns of ``A``).
        entries_per_ray: table width (``2K`` or ``4K``).
        matrix_memory: bytes allowed for the kept CSR blocks.
        block_entries: table entries per block (bounds the temporary memory of building or applying one).
    """

    def __init__(
        self,
        rays: RayFn,
        n_views: int,
        rays_per_view: int,
        n_pixels: int,
        entries_per_ray: int,
        matrix_memory: float,
        block_entries: int = 1 << 23,
    ):
        self.rays = rays
        self.n_views = n_views
        self.rays_per_view = rays_per_view
        self.n_rays = n_views * rays_per_view
        self.n_pixels = n_pixels
        self.entries_per_ray = entries_per_ray
        self.matrix_memory = float(matrix_memory)
        step = max(1, block_entries // (rays_per_view * entries_per_ray))
        self.blocks = [(v0, min(n_views, v0 + step)) for v0 in range(0, n_views, step)]
        self._csr: dict = {}  # block index -> (A_b, A_b^T) on self._device/self._dtype
        self._kept_bytes = 0
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._full = False  # budget exhausted: no further block is kept

    @property
    def kept_bytes(self) -> int:
        """Bytes of the CSR blocks currently kept."""
        return self._kept_bytes

    @property
    def fully_cached(self) -> bool:
        return len(self._csr) == len(self.blocks)

    def _rows(self, b: int) -> slice:
        v0, v1 = self.blocks[b]
        return slice(v0 * self.rays_per_view, v1 * self.rays_per_view)

    # -- matrix path ------------------------------------------------------------------------------
    def _build_block(self, b: int):
        """``A_b`` and ``A_b^T`` as float32 CSR with int32 indices (zeros dropped), on CPU.

        The table is generated in torch; compaction and transposition use scipy's O(nnz) C++ routines
        (``eliminate_zeros``, CSR→CSC), several times faster than a torch sort.
        """
        v0, v1 = self.blocks[b]
        n_rows = (v1 - v0) * self.rays_per_view
        E = self.entries_per_ray
        idx_all = torch.empty((n_rows, E), dtype=torch.int32)
        w_all = torch.empty((n_rows, E), dtype=torch.float32)
        step = max(1, (1 << 20) // (self.rays_per_view * E))  # ~1M entries per call stays in cache
        for u0 in range(v0, v1, step):
            u1 = min(v1, u0 + step)
            r0, r1 = (u0 - v0) * self.rays_per_view, (u1 - v0) * self.rays_per_view
            idx_all[r0:r1], w_all[r0:r1] = self.rays(u0, u1)
        index_dtype = np.int32 if n_rows * E < 2**31 - 1 else np.int64
        indptr = np.arange(0, n_rows * E + 1, E, dtype=index_dtype)
        m = scipy.sparse.csr_matrix(
            (w_all.numpy().reshape(-1), idx_all.numpy().reshape(-1), indptr), shape=(n_rows, self.n_pixels)
        )
        del idx_all, w_all
        m.eliminate_zeros()
        mt = m.T.tocsr()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely on SpMM only
            warnings.simplefilter("ignore", UserWarning)
            return tuple(
                torch.sparse_csr_tensor(
                    torch.from_numpy(mm.indptr), torch.from_numpy(mm.indices), torch.from_numpy(mm.data),
                    size=mm.shape, check_invariants=False,
                )
                for mm in (m, mt)
            )

    def _block_matrices(self, b: int, dtype: torch.dtype, device: torch.device):
        """The kept CSR pair of block ``b`` in ``dtype`` on ``device``, or None if over budget."""
        if self._device != device or self._dtype != dtype:  # one copy only, in the dtype in use
            self._convert(dtype, device)
        pair = self._csr.get(b)
        if pair is None and not self._full:
            a, at = self._build_block(b)
            nbytes = self._pair_bytes((a, at), dtype)
            if self._kept_bytes + nbytes > self.matrix_memory:
                self._full = True
                return None
            pair = tuple(_csr_to(m, dtype, device) for m in (a, at))
            self._csr[b] = pair
            self._kept_bytes += nbytes
        return pair

    @staticmethod
    def _pair_bytes(pair, dtype) -> int:
        return sum(m.values().numel() * (dtype.itemsize + 4) + 4 * m.crow_indices().numel() for m in pair)

    def _convert(self, dtype, device):
        """Move the kept blocks to a new dtype/device (values cast, structure reused, budget kept)."""
        kept, self._csr, self._kept_bytes, self._full = self._csr, {}, 0, False
        self._device, self._dtype = device, dtype
        for b, pair in kept.items():
            nbytes = self._pair_bytes(pair, dtype)
            if self._kept_bytes + nbytes > self.matrix_memory:
                self._full = True
                break
            self._csr[b] = tuple(_csr_to(m, dtype, device) for m in pair)
            self._kept_bytes += nbytes

    def _block_table(self, b: int, dtype, device):
        idx, w = self.rays(*self.blocks[b])
        # int64 indices: torch's take/index_add_ kernels are 10-40x slower with int32 on CPU
        return idx.to(device=device, dtype=torch.int64), w.to(device=device, dtype=dtype)

    # -- application ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for ``x`` of shape ``(n_pixels, M)``: returns ``(n_rays, M)``."""
        out = x.new_empty((self.n_rays, x.shape[1]))
        xt = None
        for b in range(len(self.blocks)):
            pair = self._block_matrices(b, x.dtype, x.device)
            if pair is not None:
                out[self._rows(b)] = torch.sparse.mm(pair[0], x)
                continue
            if xt is None:
                xt = x.t().contiguous()  # (M, n_pixels): one flat image per column
            idx, w = self._block_table(b, x.dtype, x.device)
            rows = self._rows(b)
            for m in range(xt.shape[0]):  # torch.take per image beats a batched gather several-fold
                out[rows, m] = torch.take(xt[m], idx).mul_(w).sum(-1)
        return out

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` for ``y`` of shape ``(n_rays, M)``: returns ``(n_pixels, M)``."""
        out = y.new_zeros((self.n_pixels, y.shape[1]))
        out_t = None
        for b in range(len(self.blocks)):
            pair = self._block_matrices(b, y.dtype, y.device)
            yb = y[self._rows(b)]
            if pair is not None:
                out += torch.sparse.mm(pair[1], yb)
                continue
            if out_t is None:
                out_t = y.new_zeros((y.shape[1], self.n_pixels))
            idx, w = self._block_table(b, y.dtype, y.device)
            contrib = yb.t()[:, :, None] * w  # (M, R, E)
            out_t.index_add_(1, idx.reshape(-1), contrib.reshape(y.shape[1], -1))
        return out if out_t is None else out + out_t.t()


def _csr_to(m: torch.Tensor, dtype, device) -> torch.Tensor:
    if m.dtype == dtype and m.device == torch.device(device):
        return m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            m.crow_indices().to(device), m.col_indices().to(device), m.values().to(device=device, dtype=dtype),
            size=m.shape, check_invariants=False,
        )


class _Project(torch.autograd.Function):
    """``A`` with ``A^T`` as its exact backward (and vice versa), so gradients of any order are exact."""

    @staticmethod
    def forward(ctx, x, table):
        ctx.table = table
        return table.forward(x)

    @staticmethod
    def backward(ctx, grad):
        return _BackProject.apply(grad.contiguous(), ctx.table), None


class _BackProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, table):
        ctx.table = table
        return table.adjoint(y)

    @staticmethod
    def backward(ctx, grad):
        return _Project.apply(grad.contiguous(), ctx.table), None


def project(x: torch.Tensor, table: RayTable) -> torch.Tensor:
    """Differentiable ``A x`` for ``x`` of shape ``(n_pixels, M)``."""
    return _Project.apply(x, table)


def backproject(y: torch.Tensor, table: RayTable) -> torch.Tensor:
    """Differentiable ``A^T y`` for ``y`` of shape ``(n_rays, M)``."""
    return _BackProject.apply(y, table)


def angle_weights(angles: torch.Tensor, period: float) -> torch.Tensor:
    """Quadrature weights (radians) for back-projection over views at ``angles`` (radians).

    Each view gets half the angular gap to its two neighbours on the circle of length ``period``
    (``pi`` for parallel beam, ``2 pi`` for fan and cone beam), so irregular and sparse angle sets keep
    their total weight ``period``. A gap wider than ten times the mean gap is a missing wedge (limited
    angle CT), not a sampling gap: it counts as the median of the other gaps, so the views at its border
    are not over-weighted.
    """
    n = angles.numel()
    if n == 1:
        return torch.full((1,), period / 2, dtype=angles.dtype)
    a = torch.remainder(angles, period)
    order = torch.argsort(a)
    s = a[order]
    gaps = torch.diff(torch.cat([s, s[:1] + period]))
    wedge = gaps > 10 * period / n
    if wedge.any() and not wedge.all():
        gaps = torch.where(wedge, gaps[~wedge].median(), gaps)
    w_sorted = 0.5 * (gaps + torch.roll(gaps, 1))
    w = torch.empty_like(w_sorted)
    w[order] = w_sorted
    return w


def ramp_filter(n_det: int, spacing: float, window: str, dtype, device) -> tuple[torch.Tensor, int]:
    """Frequency response of the discrete ramp filter (Kak & Slaney eq. 3.61) times a window.

    The filter is built in the spatial domain (``h[0] = 1/(4 s^2)``, ``h[n] = -1/(pi n s)^2`` for odd
    ``n``, 0 for even ``n``), which gets the DC term right, and padded to a power of two at least
    ``2 n_det`` to avoid wrap-around. The returned response already includes the sample spacing ``s`` of
    the convolution integral. Windows: ``ramp`` (Ram-Lak), ``shepp-logan`` (sinc), ``hann``, ``cosine``.
    """
    size = max(64, 2 ** math.ceil(math.log2(2 * n_det)))
    n = torch.cat([torch.arange(0, size // 2 + 1), torch.arange(-(size // 2) + 1, 0)]).to(torch.float64)
    h = torch.zeros(size, dtype=torch.float64)
    h[0] = 1 / (4 * spacing**2)
    odd = (n.long() % 2) == 1
    h[odd] = -1 / (math.pi * n[odd] * spacing) ** 2
    response = torch.fft.rfft(h).real * spacing
    f = torch.fft.rfftfreq(size, dtype=torch.float64)  # cycles per sample, 0 .. 0.5
    if window == "shepp-logan":
        response = response * torch.sinc(f)
    elif window == "hann":
        response = response * 0.5 * (1 + torch.cos(2 * math.pi * f))
    elif window == "cosine":
        response = response * torch.cos(math.pi * f)
    elif window != "ramp":
        raise ValueError(f"filter must be one of 'ramp', 'shepp-logan', 'hann', 'cosine', got {window!r}")
    return response.to(dtype=dtype, device=device), size


def filter_rows(q: torch.Tensor, response: torch.Tensor, size: int) -> torch.Tensor:
    """Convolve the last axis of ``q`` with the filter whose rfft is ``response`` (zero padded)."""
    n = q.shape[-1]
    spec = torch.fft.rfft(q, n=size, dim=-1) * response
    return torch.fft.irfft(spec, n=size, dim=-1)[..., :n]
