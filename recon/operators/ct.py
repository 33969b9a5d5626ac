"""X-ray CT forward operators: 2D/3D parallel beam, 2D fan beam (flat detector), 3D circular cone beam.

Geometry (all lengths in mm, angles in degrees at the interface):

- The image grid is centred on the rotation axis; ``x`` runs along ``W`` (columns), ``y`` along ``H``
  (rows), ``z`` along ``D`` (slices, the rotation axis). See ``recon.operators._base``.
- Parallel beam at angle ``θ``: rays run along ``(-sin θ, cos θ)``; the detector coordinate of a point
  is ``s = x cos θ + y sin θ``. At ``θ = 0`` the rays run along ``+y``, so a view is the sum over rows.
- Fan and cone beam at angle ``β``: the source sits at ``R_s (sin β, -cos β)`` (``R_s`` =
  ``source_to_center``), the central ray runs along ``(-sin β, cos β)`` through the rotation axis to a
  flat detector at ``source_to_detector`` from the source, whose columns run along ``(cos β, sin β)``
  and rows along ``+z``.
- Detector element ``k`` of ``n`` with spacing ``ds`` is centred at ``(k - (n - 1) / 2) ds``.

Measurements are line integrals of the image along each ray, in image units times mm (attenuation in
mm⁻¹ gives dimensionless post-log data). Sinogram layouts (views first, as ASTRA):

====================  ===================  ===================
operator              image                sinogram
====================  ===================  ===================
``ParallelBeamCT``    ``(B, C, H, W)``     ``(B, C, V, N)``
``ParallelBeamCT``    ``(B, C, D, H, W)``  ``(B, C, V, D, N)``
``FanBeamCT``         ``(B, C, H, W)``     ``(B, C, V, N)``
``ConeBeamCT``        ``(B, C, D, H, W)``  ``(B, C, V, R, N)``
====================  ===================  ===================

``V`` views, ``N`` detector columns, ``R`` detector rows (3D parallel beam: one row per slice).
"""

from __future__ import annotations

import math

import deepinv
import torch
import torch.nn.functional as F

from recon.operators._base import as_size, as_spacing, check_image
from recon.operators._projectors import (
    RayTable,
    angle_weights,
    backproject,
    filter_rows,
    joseph_table_2d,
    joseph_table_3d,
    project,
    ramp_filter,
)

__all__ = ["ConeBeamCT", "FanBeamCT", "ParallelBeamCT"]

_DEFAULT_MATRIX_MEMORY = 1.5e9  # bytes for the cached CSR pair; larger geometries run matrix-free
_FBP_CHUNK_ELEMENTS = 2**24  # grid entries per back-projection chunk (bounded memory)


def _as_angles(angles, span: float, name: str = "angles") -> torch.Tensor:
    """Equally spaced views over ``span`` degrees for an int, else a 1D tensor of degrees (float64)."""
    if isinstance(angles, bool):
        raise ValueError(f"{name} must be a number of views or a 1D tensor of degrees, got {angles!r}")
    if isinstance(angles, int):
        if angles < 1:
            raise ValueError(f"{name} must be a positive number of views, got {angles}")
        return torch.arange(angles, dtype=torch.float64) * (span / angles)
    a = torch.as_tensor(angles, dtype=torch.float64).detach().cpu()
    if a.dim() != 1 or a.numel() == 0:
        raise ValueError(f"{name} must be an int or a non-empty 1D tensor of degrees, got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} must be finite, got non-finite values")
    return a.clone()


def _describe_angles(deg: torch.Tensor) -> str:
    if deg.numel() == 1:
        return f"1 view at {float(deg[0]):g}°"
    return f"{deg.numel()} views in [{float(deg.min()):g}°, {float(deg.max()):g}°]"


class _CTBase(deepinv.physics.LinearPhysics):
    """Shared plumbing: ray table, reshaping between images and sinograms, checks, autograd."""

    modality = "ct"  #: what the operator measures (samplers read this, never the class)
    adjoint_is_inverse = False  #: ``A_adjoint`` is not ``A^†``: use ``fbp`` for the analytic inverse
    complex_data = False  #: real sinograms

    def __init__(self, noise_model=None, matrix_memory: float = _DEFAULT_MATRIX_MEMORY, **kwargs):
        if noise_model is None:
            noise_model = deepinv.physics.ZeroNoise()
        super().__init__(noise_model=noise_model, **kwargs)
        if not matrix_memory >= 0:
            raise ValueError(f"matrix_memory must be >= 0 bytes, got {matrix_memory}")
        self.matrix_memory = float(matrix_memory)
        self._table: RayTable | None = None

    # subclasses define: img_size, sino_shape (spatial sinogram shape), _make_table(), _ndim
    @property
    def table(self) -> RayTable:
        """The system matrix (built on first use, not at construction)."""
        if self._table is None:
            self._table = self._make_table()
        return self._table

    @property
    def angles(self) -> torch.Tensor:
        """View angles in degrees, shape ``(V,)``, float64."""
        return self._angles_deg.clone()

    def _check_x(self, x):
        check_image(x, self.img_size, "x")

    def _check_y(self, y):
        check_image(y, self.sino_shape, "y (sinogram)")

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Project: ``(B, C, *img_size)`` image → ``(B, C, *sino_shape)`` line integrals (image units × mm)."""
        self._check_x(x)
        cols = self._image_to_columns(x)
        y = project(cols, self.table)
        return self._columns_to_sino(y, x.shape[:2])

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact adjoint (back-projection): ``(B, C, *sino_shape)`` → ``(B, C, *img_size)``."""
        self._check_y(y)
        cols = self._sino_to_columns(y)
        x = backproject(cols, self.table)
        return self._columns_to_image(x, y.shape[:2])

    # 2D-table layout (also 3D parallel beam, slice by slice): columns are (B*C[*D]) images
    def _image_to_columns(self, x):
        b, c = x.shape[:2]
        return x.reshape(b * c, -1).t().contiguous()

    def _columns_to_image(self, cols, bc):
        return cols.t().reshape(*bc, *self.img_size)

    def _sino_to_columns(self, y):
        b, c = y.shape[:2]
        return y.reshape(b * c, -1).t().contiguous()

    def _columns_to_sino(self, cols, bc):
        return cols.t().reshape(*bc, *self.sino_shape)

    def extra_repr(self) -> str:  # used by nn.Module.__repr__
        return self._geometry_repr()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._geometry_repr()})"


class ParallelBeamCT(_CTBase):
    r"""Parallel-beam CT: 2D images, or 3D volumes slice by slice (one batched call).

    :math:`y = A x + \epsilon`, where row ``(v, k)`` of ``A`` integrates the image along the line
    ``{s_k (cos θ_v, sin θ_v) + t (-sin θ_v, cos θ_v)}`` (Joseph's method, exact matched adjoint).

    Args:
        img_size: ``(H, W)`` for images ``(B, C, H, W)``, or ``(D, H, W)`` for volumes
            ``(B, C, D, H, W)`` projected slice by slice along ``z``.
        angles: number of equally spaced views over 180° (``angles=180`` → 0°, 1°, …, 179°), or a 1D
            tensor of view angles in degrees (sparse-view, limited-angle, any set).
        n_detectors: detector columns ``N``; default: enough to cover the image diagonal.
        detector_spacing: detector column spacing in mm (default 1).
        spacing: pixel spacing in mm, a number or one per axis (``(sy, sx)`` or ``(sz, sy, sx)``).
        noise_model: a deepinv noise model (default none), e.g. ``deepinv.physics.GaussianNoise`` or
            ``recon.operators.TransmissionPoissonNoise``.
        matrix_memory: bytes allowed for the cached sparse system matrix and its transpose (default
            1.5e9); larger geometries use the bounded-memory matrix-free path.

    Shapes: ``(B, C, H, W) → (B, C, V, N)`` and ``(B, C, D, H, W) → (B, C, V, D, N)``.

    Example:
        >>> import torch
        >>> from recon.operators import ParallelBeamCT
        >>> op = ParallelBeamCT((64, 64), angles=60)
        >>> op.A(torch.ones(1, 1, 64, 64)).shape
        torch.Size([1, 1, 60, 93])
    """

    def __init__(
        self,
        img_size: tuple,
        angles: int | torch.Tensor = 180,
        n_detectors: int | None = None,
        detector_spacing: float = 1.0,
        spacing: float | tuple = 1.0,
        noise_model=None,
        matrix_memory: float = _DEFAULT_MATRIX_MEMORY,
    ):
        super().__init__(noise_model=noise_model, matrix_memory=matrix_memory)
        self.img_size = as_size(img_size, (2, 3))
        nd = len(self.img_size)
        self.spacing = as_spacing(spacing, nd, "spacing")
        self._angles_deg = _as_angles(angles, 180.0)
        (self.detector_spacing,) = as_spacing(detector_spacing, 1, "detector_spacing")
        sy, sx = self.spacing[-2:]
        H, W = self.img_size[-2:]
        if n_detectors is None:
            diag = math.hypot(H * sy, W * sx)
            n_detectors = 2 * math.ceil(diag / (2 * self.detector_spacing)) + 1
        if not isinstance(n_detectors, int) or isinstance(n_detectors, bool) or n_detectors < 2:
            raise ValueError(f"n_detectors must be an int >= 2, got {n_detectors!r}")
        fov = min(H * sy, W * sx)
        width = n_detectors * self.detector_spacing
        if width < fov - 1e-9:
            raise ValueError(
                f"detector too small: n_detectors * detector_spacing = {width:g} mm must cover the "
                f"field of view (the circle inscribed in the image, {fov:g} mm)"
            )
        self.n_detectors = n_detectors
        V = self._angles_deg.numel()
        self.sino_shape = (V, n_detectors) if nd == 2 else (V, self.img_size[0], n_detectors)

    def _geometry_repr(self) -> str:
        size = "×".join(map(str, self.img_size))
        sp = "×".join(f"{s:g}" for s in self.spacing)
        return (
            f"img_size={size} @ {sp} mm, {_describe_angles(self._angles_deg)}, "
            f"{self.n_detectors} detectors @ {self.detector_spacing:g} mm"
        )

    def _rays(self, v0: int, v1: int):
        th = torch.deg2rad(self._angles_deg[v0:v1])
        n = self.n_detectors
        s = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * self.detector_spacing
        cos, sin = torch.cos(th)[:, None], torch.sin(th)[:, None]
        p = torch.stack([(s * cos).reshape(-1), (s * sin).reshape(-1)], 1)
        d = torch.stack([(-sin).expand(-1, n).reshape(-1), cos.expand(-1, n).reshape(-1)], 1)
        return joseph_table_2d(p, d, self.img_size[-2:], self.spacing[-2:])

    def _make_table(self) -> RayTable:
        H, W = self.img_size[-2:]
        return RayTable(
            self._rays, self._angles_deg.numel(), self.n_detectors, H * W, 2 * max(H, W), self.matrix_memory
        )

    # 3D volumes: columns are the B*C*D slices; sinogram (B, C, V, D, N)
    def _image_to_columns(self, x):
        if len(self.img_size) == 2:
            return super()._image_to_columns(x)
        b, c, d = x.shape[:3]
        return x.reshape(b * c * d, -1).t().contiguous()

    def _columns_to_image(self, cols, bc):
        if len(self.img_size) == 2:
            return super()._columns_to_image(cols, bc)
        return cols.t().reshape(*bc, *self.img_size)

    def _sino_to_columns(self, y):
        if len(self.img_size) == 2:
            return super()._sino_to_columns(y)
        b, c, v, d, n = y.shape
        return y.permute(2, 4, 0, 1, 3).reshape(v * n, b * c * d).contiguous()

    def _columns_to_sino(self, cols, bc):
        if len(self.img_size) == 2:
            return super()._columns_to_sino(cols, bc)
        v, d, n = self.sino_shape
        return cols.reshape(v, n, *bc, d).permute(2, 3, 0, 4, 1)

    def fbp(self, y: torch.Tensor, filter: str = "ramp") -> torch.Tensor:
        """Filtered back-projection of a sinogram ``(B, C, V, N)`` (or ``(B, C, V, D, N)``, slice-wise).

        Ramp filtering (``filter`` = ``"ramp"``, ``"shepp-logan"``, ``"hann"`` or ``"cosine"``) along the
        detector, then pixel-driven back-projection with linear interpolation, each view weighted by
        its angular share (``angle_weights``), so sparse and irregular angle sets stay quantitative.
        Returns the image in the units of the original (line integrals / mm).
        """
        self._check_y(y)
        if len(self.img_size) == 3:
            b, c, v, d, n = y.shape
            y2 = y.permute(0, 1, 3, 2, 4).reshape(b, c * d, v, n)
        else:
            b, c, v, n = y.shape
            y2 = y
        response, size = ramp_filter(n, self.detector_spacing, filter, y.dtype, y.device)
        q = filter_rows(y2, response, size)
        th = torch.deg2rad(self._angles_deg).to(device=y.device, dtype=y.dtype)
        wts = angle_weights(torch.deg2rad(self._angles_deg), math.pi).to(device=y.device, dtype=y.dtype)
        H, W = self.img_size[-2:]
        sy, sx = self.spacing[-2:]
        xs = (torch.arange(W, device=y.device, dtype=y.dtype) - (W - 1) / 2) * sx
        ys = (torch.arange(H, device=y.device, dtype=y.dtype) - (H - 1) / 2) * sy

        def detector_coordinate(views):  # (Vc, H*W) normalised detector positions in [-1, 1]
            s = xs[None, None, :] * torch.cos(th[views])[:, None, None] + ys[None, :, None] * torch.sin(
                th[views]
            )[:, None, None]
            return (s / self.detector_spacing) / ((n - 1) / 2)

        img = _backproject_1d(q, detector_coordinate, wts, H * W)
        img = img.reshape(b, -1, H, W)
        if len(self.img_size) == 3:
            img = img.reshape(b, c, self.img_size[0], H, W)
        return img


def _backproject_1d(q, detector_coordinate, wts, n_pix):
    """Σ_v w_v q_v(t_v(pixel)) with linear interpolation; ``q`` is ``(B, C, V, N)``, returns ``(B, C, P)``."""
    b, c, v, n = q.shape
    qv = q.permute(2, 0, 1, 3).reshape(v, b * c, 1, n)  # views as the grid_sample batch
    out = q.new_zeros(b * c, n_pix)
    step = max(1, _FBP_CHUNK_ELEMENTS // max(1, n_pix * max(1, b * c) // 4 + n_pix))
    for v0 in range(0, v, step):
        views = torch.arange(v0, min(v, v0 + step), device=q.device)
        t = detector_coordinate(views).reshape(len(views), 1, n_pix)
        grid = torch.stack([t, torch.zeros_like(t)], -1)  # (Vc, 1, P, 2)
        vals = F.grid_sample(qv[views], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out += (vals[:, :, 0, :] * wts[views, None, None]).sum(0)
    return out.reshape(b, c, n_pix)


def _fan_defaults(radius: float, source_to_center, source_to_detector):
    dso = 4.0 * radius if source_to_center is None else float(source_to_center)
    dsd = 1.5 * dso if source_to_detector is None else float(source_to_detector)
    if not dso > radius:
        raise ValueError(
            f"source_to_center must exceed the radius of the image ({radius:g} mm) so that the source is "
            f"outside it, got {dso:g} mm"
        )
    if not dsd > dso:
        raise ValueError(
            f"source_to_detector ({dsd:g} mm) must be larger than source_to_center ({dso:g} mm)"
        )
    return dso, dsd


class FanBeamCT(_CTBase):
    r"""2D fan-beam CT with a flat detector and a circular source orbit.

    Row ``(v, k)`` of ``A`` integrates the image along the ray from the source at angle ``β_v`` to the
    centre of detector column ``k`` (Joseph's method, exact matched adjoint). See the module docstring
    for the geometry.

    Args:
        img_size: ``(H, W)``.
        angles: number of equally spaced source positions over 360°, or a 1D tensor of degrees.
        n_detectors: detector columns ``N``; default: enough to see the whole image.
        detector_spacing: column spacing on the detector in mm (default 1).
        spacing: pixel spacing in mm, a number or ``(sy, sx)``.
        source_to_center: source to rotation axis distance in mm (default: twice the image diagonal).
        source_to_detector: source to detector distance in mm (default: 1.5 × ``source_to_center``, a
            magnification of 1.5, as on clinical C-arms).
        noise_model, matrix_memory: as in ``ParallelBeamCT``.

    Shapes: ``(B, C, H, W) → (B, C, V, N)``.
    """

    def __init__(
        self,
        img_size: tuple,
        angles: int | torch.Tensor = 360,
        n_detectors: int | None = None,
        detector_spacing: float = 1.0,
        spacing: float | tuple = 1.0,
        source_to_center: float | None = None,
        source_to_detector: float | None = None,
        noise_model=None,
        matrix_memory: float = _DEFAULT_MATRIX_MEMORY,
    ):
        super().__init__(noise_model=noise_model, matrix_memory=matrix_memory)
        self.img_size = as_size(img_size, (2,))
        self.spacing = as_spacing(spacing, 2, "spacing")
        self._angles_deg = _as_angles(angles, 360.0)
        (self.detector_spacing,) = as_spacing(detector_spacing, 1, "detector_spacing")
        H, W = self.img_size
        sy, sx = self.spacing
        radius = 0.5 * math.hypot(H * sy, W * sx)
        self.source_to_center, self.source_to_detector = _fan_defaults(
            radius, source_to_center, source_to_detector
        )
        mag = self.source_to_detector / self.source_to_center
        if n_detectors is None:
            half = self.source_to_detector * math.tan(math.asin(radius / self.source_to_center))
            n_detectors = 2 * math.ceil(half / self.detector_spacing) + 1
        if not isinstance(n_detectors, int) or isinstance(n_detectors, bool) or n_detectors < 2:
            raise ValueError(f"n_detectors must be an int >= 2, got {n_detectors!r}")
        r_in = 0.5 * min(H * sy, W * sx)
        need = 2 * self.source_to_detector * math.tan(math.asin(r_in / self.source_to_center))
        width = n_detectors * self.detector_spacing
        if width < need - 1e-9:
            raise ValueError(
                f"detector too small: n_detectors * detector_spacing = {width:g} mm must cover the "
                f"magnified field of view ({need:g} mm at magnification {mag:.3g})"
            )
        self.n_detectors = n_detectors
        self.sino_shape = (self._angles_deg.numel(), n_detectors)

    def _geometry_repr(self) -> str:
        size = "×".join(map(str, self.img_size))
        sp = "×".join(f"{s:g}" for s in self.spacing)
        return (
            f"img_size={size} @ {sp} mm, {_describe_angles(self._angles_deg)}, "
            f"{self.n_detectors} detectors @ {self.detector_spacing:g} mm, "
            f"source_to_center={self.source_to_center:g} mm, source_to_detector={self.source_to_detector:g} mm"
        )

    def _source_frame(self, v0, v1):
        b = torch.deg2rad(self._angles_deg[v0:v1])
        src = self.source_to_center * torch.stack([torch.sin(b), -torch.cos(b)], 1)
        central = torch.stack([-torch.sin(b), torch.cos(b)], 1)
        e_u = torch.stack([torch.cos(b), torch.sin(b)], 1)
        return src, central, e_u

    def _rays(self, v0: int, v1: int):
        n = self.n_detectors
        src, central, e_u = self._source_frame(v0, v1)
        u = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * self.detector_spacing
        det = src[:, None] + self.source_to_detector * central[:, None] + u[None, :, None] * e_u[:, None]
        d = det - src[:, None]
        d = d / d.norm(dim=-1, keepdim=True)
        p = src[:, None].expand_as(d)
        return joseph_table_2d(p.reshape(-1, 2), d.reshape(-1, 2), self.img_size, self.spacing)

    def _make_table(self) -> RayTable:
        H, W = self.img_size
        return RayTable(
            self._rays, self._angles_deg.numel(), self.n_detectors, H * W, 2 * max(H, W), self.matrix_memory
        )

    def fbp(self, y: torch.Tensor, filter: str = "ramp") -> torch.Tensor:
        """Fan-beam FBP for a flat detector (Kak & Slaney §3.4.2): cosine pre-weighting, ramp filter on the
        detector rescaled to the rotation axis, distance-weighted (1/U²) back-projection.

        Exact for a full 360° orbit; for other angle sets each view is weighted by its angular share
        (no Parker short-scan weights), which is an approximation.
        """
        self._check_y(y)
        b, c, v, n = y.shape
        dso, dsd = self.source_to_center, self.source_to_detector
        da = self.detector_spacing * dso / dsd  # detector spacing rescaled to the rotation axis
        a = (torch.arange(n, device=y.device, dtype=y.dtype) - (n - 1) / 2) * da
        pre = dso / torch.sqrt(dso**2 + a**2)
        response, size = ramp_filter(n, da, filter, y.dtype, y.device)
        q = 0.5 * filter_rows(y * pre, response, size)
        beta = torch.deg2rad(self._angles_deg)
        wts = angle_weights(beta, 2 * math.pi).to(device=y.device, dtype=y.dtype)
        beta = beta.to(device=y.device, dtype=y.dtype)
        H, W = self.img_size
        sy, sx = self.spacing
        xs = (torch.arange(W, device=y.device, dtype=y.dtype) - (W - 1) / 2) * sx
        ys = (torch.arange(H, device=y.device, dtype=y.dtype) - (H - 1) / 2) * sy
        X, Y = xs[None, :].expand(H, W).reshape(-1), ys[:, None].expand(H, W).reshape(-1)

        # 1/U^2 cannot ride along inside grid_sample, so the views are weighted pixel-wise here.
        out = y.new_zeros(b * c, H * W)
        qv = q.permute(2, 0, 1, 3).reshape(v, b * c, 1, n)
        step = max(1, _FBP_CHUNK_ELEMENTS // (H * W * max(1, b * c // 4 + 1)))
        for v0 in range(0, v, step):
            views = torch.arange(v0, min(v, v0 + step), device=y.device)
            sb, cb = torch.sin(beta[views])[:, None], torch.cos(beta[views])[:, None]
            L = dso + (-sb * X + cb * Y)  # distance from the source along the central ray
            a_p = dso * (cb * X + sb * Y) / L
            t = (a_p / da / ((n - 1) / 2)).reshape(len(views), 1, -1)
            grid = torch.stack([t, torch.zeros_like(t)], -1)
            vals = F.grid_sample(qv[views], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            weight = wts[views, None] * (dso / L) ** 2  # (Vc, P)
            out += (vals[:, :, 0, :] * weight[:, None, :]).sum(0)
        return out.reshape(b, c, H, W)


class ConeBeamCT(_CTBase):
    r"""3D circular-orbit cone-beam CT with a flat panel detector.

    Row ``(v, r, k)`` of ``A`` integrates the volume along the ray from the source at angle ``β_v`` (in the
    ``z = 0`` plane) to the centre of detector pixel ``(r, k)`` (Joseph's method with bilinear
    interpolation across the ray, exact matched adjoint, matrix-free for large geometries).

    Args:
        img_size: ``(D, H, W)`` for volumes ``(B, C, D, H, W)``.
        angles: number of equally spaced source positions over 360°, or a 1D tensor of degrees.
        detector_shape: ``(rows, columns)``; default: enough to see the whole volume.
        detector_spacing: ``(row, column)`` pixel pitch on the detector in mm, or one number (default 1).
        spacing: voxel spacing in mm, a number or ``(sz, sy, sx)``.
        source_to_center, source_to_detector: distances in mm (defaults as in ``FanBeamCT``).
        noise_model, matrix_memory: as in ``ParallelBeamCT``.

    Shapes: ``(B, C, D, H, W) → (B, C, V, rows, columns)``.
    """

    def __init__(
        self,
        img_size: tuple,
        angles: int | torch.Tensor = 360,
        detector_shape: tuple | None = None,
        detector_spacing: float | tuple = 1.0,
        spacing: float | tuple = 1.0,
        source_to_center: float | None = None,
        source_to_detector: float | None = None,
        noise_model=None,
        matrix_memory: float = _DEFAULT_MATRIX_MEMORY,
    ):
        super().__init__(noise_model=noise_model, matrix_memory=matrix_memory)
        self.img_size = as_size(img_size, (3,))
        self.spacing = as_spacing(spacing, 3, "spacing")
        self._angles_deg = _as_angles(angles, 360.0)
        self.detector_spacing = as_spacing(detector_spacing, 2, "detector_spacing")
        D, H, W = self.img_size
        sz, sy, sx = self.spacing
        r_xy = 0.5 * math.hypot(H * sy, W * sx)
        half_z = 0.5 * D * sz
        self.source_to_center, self.source_to_detector = _fan_defaults(
            r_xy, source_to_center, source_to_detector
        )
        dso, dsd = self.source_to_center, self.source_to_detector
        if detector_shape is None:
            half_u = dsd * math.tan(math.asin(r_xy / dso))
            half_v = dsd * half_z / (dso - r_xy)
            detector_shape = (
                2 * math.ceil(half_v / self.detector_spacing[0]) + 1,
                2 * math.ceil(half_u / self.detector_spacing[1]) + 1,
            )
        try:
            rows, cols = (int(s) for s in detector_shape)
        except (TypeError, ValueError) as err:
            raise ValueError(f"detector_shape must be (rows, columns), got {detector_shape!r}") from err
        if rows < 2 or cols < 2:
            raise ValueError(f"detector_shape must have at least 2 rows and 2 columns, got {(rows, cols)}")
        r_in = 0.5 * min(H * sy, W * sx)
        need_u = 2 * dsd * math.tan(math.asin(r_in / dso))
        need_v = 2 * half_z * dsd / dso
        if cols * self.detector_spacing[1] < need_u - 1e-9 or rows * self.detector_spacing[0] < need_v - 1e-9:
            raise ValueError(
                f"detector too small: {rows}×{cols} pixels of {self.detector_spacing[0]:g}×"
                f"{self.detector_spacing[1]:g} mm must cover the magnified field of view "
                f"({need_v:g}×{need_u:g} mm)"
            )
        cone = (rows * self.detector_spacing[0] / 2) / dsd
        if cone >= 1.0:
            raise ValueError(
                f"cone angle too wide: detector half-height / source_to_detector = {cone:.3g} must be < 1 "
                f"(rays must stay closer to the orbit plane than to the rotation axis)"
            )
        self.detector_shape = (rows, cols)
        self.sino_shape = (self._angles_deg.numel(), rows, cols)

    def _geometry_repr(self) -> str:
        size = "×".join(map(str, self.img_size))
        sp = "×".join(f"{s:g}" for s in self.spacing)
        ds = "×".join(f"{s:g}" for s in self.detector_spacing)
        return (
            f"img_size={size} @ {sp} mm, {_describe_angles(self._angles_deg)}, detector "
            f"{self.detector_shape[0]}×{self.detector_shape[1]} @ {ds} mm, "
            f"source_to_center={self.source_to_center:g} mm, source_to_detector={self.source_to_detector:g} mm"
        )

    def _rays(self, v0: int, v1: int):
        rows, cols = self.detector_shape
        dv, du = self.detector_spacing
        b = torch.deg2rad(self._angles_deg[v0:v1])
        zeros = torch.zeros_like(b)
        src = self.source_to_center * torch.stack([torch.sin(b), -torch.cos(b), zeros], 1)
        central = torch.stack([-torch.sin(b), torch.cos(b), zeros], 1)
        e_u = torch.stack([torch.cos(b), torch.sin(b), zeros], 1)
        e_v = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        u = (torch.arange(cols, dtype=torch.float64) - (cols - 1) / 2) * du
        vv = (torch.arange(rows, dtype=torch.float64) - (rows - 1) / 2) * dv
        det = (
            src[:, None, None] + self.source_to_detector * central[:, None, None]
            + u[None, None, :, None] * e_u[:, None, None] + vv[None, :, None, None] * e_v
        )
        d = det - src[:, None, None]
        d = d / d.norm(dim=-1, keepdim=True)
        p = src[:, None, None].expand_as(d)
        return joseph_table_3d(p.reshape(-1, 3), d.reshape(-1, 3), self.img_size, self.spacing)

    def _make_table(self) -> RayTable:
        D, H, W = self.img_size
        rows, cols = self.detector_shape
        return RayTable(
            self._rays, self._angles_deg.numel(), rows * cols, D * H * W, 4 * max(H, W), self.matrix_memory
        )

    def fbp(self, y: torch.Tensor, filter: str = "ramp") -> torch.Tensor:
        """FDK reconstruction (Feldkamp, Davis & Kress 1984) for the circular orbit.

        Cosine pre-weighting, row-wise ramp filtering on the detector rescaled to the rotation axis,
        and 1/U²-weighted voxel-driven back-projection with bilinear detector interpolation. Exact in
        the orbit plane for a full 360° orbit; cone-beam artefacts grow away from it, as for any FDK.
        """
        self._check_y(y)
        b, c, v, rows, cols = y.shape
        dso, dsd = self.source_to_center, self.source_to_detector
        dv, du = self.detector_spacing
        da, db = du * dso / dsd, dv * dso / dsd
        a = (torch.arange(cols, device=y.device, dtype=y.dtype) - (cols - 1) / 2) * da
        bb = (torch.arange(rows, device=y.device, dtype=y.dtype) - (rows - 1) / 2) * db
        pre = dso / torch.sqrt(dso**2 + a[None, :] ** 2 + bb[:, None] ** 2)
        response, size = ramp_filter(cols, da, filter, y.dtype, y.device)
        q = 0.5 * filter_rows(y * pre, response, size)
        beta = torch.deg2rad(self._angles_deg)
        wts = angle_weights(beta, 2 * math.pi).to(device=y.device, dtype=y.dtype)
        beta = beta.to(device=y.device, dtype=y.dtype)
        D, H, W = self.img_size
        sz, sy, sx = self.spacing
        xs = (torch.arange(W, device=y.device, dtype=y.dtype) - (W - 1) / 2) * sx
        ys = (torch.arange(H, device=y.device, dtype=y.dtype) - (H - 1) / 2) * sy
        zs = (torch.arange(D, device=y.device, dtype=y.dtype) - (D - 1) / 2) * sz
        X = xs[None, None, :].expand(D, H, W).reshape(-1)
        Y = ys[None, :, None].expand(D, H, W).reshape(-1)
        Z = zs[:, None, None].expand(D, H, W).reshape(-1)
        P = D * H * W
        out = y.new_zeros(b * c, P)
        qv = q.permute(2, 0, 1, 3, 4).reshape(v, b * c, rows, cols)
        step = max(1, _FBP_CHUNK_ELEMENTS // (P * max(1, b * c // 4 + 1)))
        for v0 in range(0, v, step):
            views = torch.arange(v0, min(v, v0 + step), device=y.device)
            sb, cb = torch.sin(beta[views])[:, None], torch.cos(beta[views])[:, None]
            L = dso + (-sb * X + cb * Y)
            a_p = dso * (cb * X + sb * Y) / L
            b_p = dso * Z / L
            gx = (a_p / da / ((cols - 1) / 2)).reshape(len(views), 1, P)
            gy = (b_p / db / ((rows - 1) / 2)).reshape(len(views), 1, P)
            grid = torch.stack([gx, gy], -1)
            vals = F.grid_sample(qv[views], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            weight = wts[views, None] * (dso / L) ** 2
            out += (vals[:, :, 0, :] * weight[:, None, :]).sum(0)
        return out.reshape(b, c, D, H, W)
