r"""Cartesian MRI forward operators: single-coil :class:`CartesianMRI` and SENSE :class:`MultiCoilMRI`.

Conventions (shared with deepinv 0.5.0 ``deepinv.physics.MRI`` / ``MultiCoilMRI`` and fastMRI):

* Complex images are stored as two real channels (real, imaginary): ``x`` is ``(B, 2, H, W)`` or
  ``(B, 2, D, H, W)``, float32 or float64.
* The Fourier transform is the *centred orthonormal* DFT of fastMRI's ``fft2c``:
  ``F = fftshift . fftn(norm="ortho") . ifftshift`` over the spatial axes, so the DC sample of an
  axis of length ``n`` sits at index ``n // 2`` and ``F`` is unitary (``F^H F = I``).
* 3D data (``img_size = (D, H, W)``) use either ``fft_dims="2d"`` -- a 2D FFT over ``(H, W)`` of each of
  the ``D`` slices, as deepinv's ``three_d=False`` -- or ``fft_dims="3d"`` -- a full 3D FFT over
  ``(D, H, W)``, as deepinv's ``three_d=True``.
* A sampling mask ``M`` (real, usually 0/1) multiplies k-space; its shape is ``(H, W)``, or for 3D data
  ``(H, W)`` (the same mask on every slice, or a 2D phase-encode mask of a 3D acquisition whose readout
  is ``D``) or ``(D, H, W)``.

Single coil: :math:`y = M F x + M n`, with ``y`` the same shape as ``x``. Multi-coil:
:math:`y_c = M F (S_c x) + M n_c`, ``y`` of shape ``(B, 2, N, H, W)`` / ``(B, 2, N, D, H, W)`` (coil axis
after the real/imaginary axis, exactly deepinv 0.5.0's ``MultiCoilMRI`` layout), and
:math:`A^H y = \sum_c \bar S_c F^H M y_c`.

``A`` and ``A_adjoint`` are hand-written (no autograd adjoint), batched, device- and dtype-agnostic: the
mask and coil maps are registered buffers (``.to(device)`` moves them) and are cast to the input's
dtype at call time. Coil maps are stored as a real ``(..., 2)`` buffer so that ``module.to(float32)``
cannot drop their imaginary part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from deepinv.physics import LinearPhysics
from deepinv.physics.noise import NoiseModel, ZeroNoise

from recon.operators._base import as_size, as_spacing, check_image, check_tensor
from recon.operators.masks import (
    _check_acceleration,
    default_center_fraction,
    equispaced_mask,
    gaussian_mask,
    poisson_disc_mask,
    random_mask,
    unsampled_energy,
)

__all__ = ["CartesianMRI", "MultiCoilMRI"]

MASK_TYPES = ("random", "equispaced", "equispaced_fraction", "poisson", "gaussian")


def fft_c(z: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Centred orthonormal FFT of a complex tensor over ``dims`` (fastMRI ``fft2c``)."""
    z = torch.fft.ifftshift(z, dim=dims)
    z = torch.fft.fftn(z, dim=dims, norm="ortho")
    return torch.fft.fftshift(z, dim=dims)


def ifft_c(z: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Centred orthonormal inverse FFT of a complex tensor over ``dims`` (fastMRI ``ifft2c``)."""
    z = torch.fft.ifftshift(z, dim=dims)
    z = torch.fft.ifftn(z, dim=dims, norm="ortho")
    return torch.fft.fftshift(z, dim=dims)


def _to_complex(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2, ...)`` real -> ``(B, ...)`` complex."""
    return torch.complex(x[:, 0], x[:, 1])


def _to_real(z: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` complex -> ``(B, 2, ...)`` real."""
    return torch.stack((z.real, z.imag), dim=1)


def _fmt_size(size: tuple) -> str:
    return "(" + ", ".join(str(s) for s in size) + ")"


class _CartesianBase(LinearPhysics):
    """Shared mask, FFT and input handling of the Cartesian MRI operators (not public)."""

    modality = "mri"  #: what the operator measures (samplers read this, never the class)
    adjoint_is_inverse = True  #: orthonormal FFT rows: ``A^T`` is the zero-filled inverse ``A^†``
    complex_data = True  #: k-space as real/imaginary channels

    def __init__(
        self,
        img_size: Sequence[int],
        mask: torch.Tensor | np.ndarray | None,
        acceleration: float | None,
        mask_type: str,
        center_fraction: float | None,
        seed: int,
        noise_model: NoiseModel | None,
        fft_dims: str,
        real_input: bool = False,
        spacing: float | Sequence[float] = 1.0,
    ):
        size = as_size(img_size)
        if fft_dims not in ("2d", "3d"):
            raise ValueError(f"fft_dims must be '2d' or '3d', got {fft_dims!r}")
        if len(size) == 2 and fft_dims != "2d":
            raise ValueError(f"fft_dims='3d' needs a 3D img_size (D, H, W), got {size}")
        super().__init__(noise_model=ZeroNoise() if noise_model is None else noise_model, img_size=size)
        self.img_size = size
        self.spacing = as_spacing(spacing, len(size), "spacing")  # geometry only: k-space does not depend on it
        self.fft_dims = fft_dims
        self.real_input = bool(real_input)
        self._dims = (-3, -2, -1) if fft_dims == "3d" else (-2, -1)
        if (mask is None) == (acceleration is None):
            raise ValueError(
                "give exactly one of mask or acceleration, got " + ("both" if mask is not None else "neither")
            )
        if acceleration is not None:
            acceleration = _check_acceleration(acceleration)
        self.requested_acceleration = acceleration
        self.center_fraction = center_fraction
        self.seed = seed
        if mask is None:
            if mask_type not in MASK_TYPES:
                raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
            self.mask_type = mask_type
            mask = self._default_mask(size, float(acceleration), mask_type, center_fraction, seed)
        else:
            self.mask_type = "custom"
        self.register_buffer("mask", self._check_mask(mask))

    # ----------------------------------------------------------------------------------------- masks
    @staticmethod
    def _default_mask(size, acceleration, mask_type, center_fraction, seed) -> torch.Tensor:
        shape2d = size[-2:]
        if mask_type == "random":
            return random_mask(shape2d, acceleration, center_fraction, seed)
        if mask_type in ("equispaced", "equispaced_fraction"):
            frac = mask_type == "equispaced_fraction"
            return equispaced_mask(shape2d, acceleration, center_fraction, seed, fraction=frac)
        cf = default_center_fraction(acceleration) if center_fraction is None else center_fraction
        calib = (max(round(cf * shape2d[0]), 1), max(round(cf * shape2d[1]), 1))
        if mask_type == "poisson":
            return poisson_disc_mask(shape2d, acceleration, calib=calib, seed=seed)
        return gaussian_mask(shape2d, acceleration, calib=calib, seed=seed)

    def _check_mask(self, mask) -> torch.Tensor:
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a torch.Tensor or numpy array, got {type(mask).__name__}")
        if mask.is_complex():
            raise ValueError(f"mask must be real (it multiplies k-space), got {mask.dtype}")
        allowed = [self.img_size[-2:]] + ([self.img_size] if len(self.img_size) == 3 else [])
        if tuple(mask.shape) not in [tuple(a) for a in allowed]:
            exp = " or ".join(_fmt_size(a) for a in allowed)
            raise ValueError(
                f"mask must have shape {exp} for img_size {self.img_size}, got {tuple(mask.shape)}"
            )
        mask = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
        if not torch.isfinite(mask).all() or (mask < 0).any():
            raise ValueError("mask must be finite and non-negative")
        if not (mask != 0).any():
            raise ValueError("mask samples nothing (all zeros)")
        return mask

    @property
    def image_channels(self) -> int:
        """Channels of the image side: 2 (real, imaginary), or 1 with ``real_input=True``."""
        return 1 if self.real_input else 2

    def _image_in(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """Check an image-side tensor and return it complex ``(B, *img_size)``."""
        check_image(x, self.img_size, name, channels=self.image_channels)
        if self.real_input:
            return torch.complex(x[:, 0], torch.zeros_like(x[:, 0]))
        return _to_complex(x)

    def _image_out(self, z: torch.Tensor) -> torch.Tensor:
        """Complex ``(B, *img_size)`` → the image side: ``(B, 2, ...)``, or its real part ``(B, 1, ...)``."""
        return z.real[:, None].contiguous() if self.real_input else _to_real(z)

    @property
    def acceleration(self) -> float:
        """Achieved acceleration: number of k-space points / number of sampled (non-zero) points."""
        m = self.mask
        return m.numel() / int(torch.count_nonzero(m))

    @property
    def unsampled_energy(self) -> float:
        """Share of a natural image's k-space energy the mask leaves unsampled (``masks.unsampled_energy``)."""
        return unsampled_energy(self.mask)

    def _mask_for(self, like: torch.Tensor) -> torch.Tensor:
        return self.mask.to(device=like.device, dtype=like.dtype)

    def update_parameters(self, mask: torch.Tensor | np.ndarray | None = None, **kwargs) -> None:
        """Replace the sampling mask (validated like the constructor's ``mask``); other kwargs are ignored."""
        if mask is not None:
            self.mask = self._check_mask(mask).to(self.mask.device)
            self.mask_type = "custom"

    def noise(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Noise on acquired samples only: ``y + M (N(y) - y)``, i.e. ``M F x + M n`` for additive noise."""
        m = self._mask_for(y)  # (H, W) or (D, H, W): broadcasts over the trailing axes of y
        return y + m * (self.noise_model(y, **kwargs) - y)

    def _repr_fields(self) -> list[str]:
        fields = [f"img_size={self.img_size}"]
        if self.real_input:
            fields.append("real_input=True")
        if len(self.img_size) == 3:
            fields.append(f"fft_dims={self.fft_dims!r}")
        fields.append(f"mask={self.mask_type!r} {_fmt_size(tuple(self.mask.shape))}")
        acc = f"acceleration={self.acceleration:.2f}"
        if self.requested_acceleration is not None:
            acc += f" (requested {self.requested_acceleration:g})"
        fields.append(acc)
        if self.mask_type in ("random", "equispaced", "equispaced_fraction", "poisson", "gaussian"):
            r = self.requested_acceleration
            cf = default_center_fraction(r) if self.center_fraction is None else self.center_fraction
            fields.append(f"center_fraction={cf:g}, seed={self.seed}")
        return fields

    def _noise_repr(self) -> str:
        return type(self.noise_model).__name__


class CartesianMRI(_CartesianBase):
    r"""Single-coil Cartesian MRI, :math:`y = M F x + M n`, for 2D images and 3D volumes.

    ``F`` is the centred orthonormal DFT (``ifftshift -> fftn(norm="ortho") -> fftshift``, fastMRI
    ``fft2c``; k-space centre at index ``n // 2``), over ``(H, W)`` -- slice-wise for 3D with
    ``fft_dims="2d"`` -- or over ``(D, H, W)`` with ``fft_dims="3d"``. ``M`` is a real diagonal
    sampling mask, so :math:`A^H = F^H M`; with a 0/1 mask :math:`A A^H = M` is a projection,
    :math:`A^\dagger = A^H`, and with a full mask ``A`` is unitary. The layout is deepinv 0.5.0's
    ``deepinv.physics.MRI`` (``three_d = fft_dims == "3d"``), and both give the same ``A`` on the same mask.

    Args:
        img_size: ``(H, W)`` or ``(D, H, W)``.
        mask: real sampling mask of shape ``(H, W)``, or ``(H, W)`` / ``(D, H, W)`` for 3D
            (a ``(H, W)`` mask applies to every slice / the whole ``D`` readout line).
        acceleration: instead of ``mask``: build a seeded default mask with this nominal acceleration
            ``R >= 1`` over the ``(H, W)`` plane, of type ``mask_type``.
        mask_type: ``"random"`` (default; fastMRI ``RandomMaskFunc`` 1D columns along ``W``),
            ``"equispaced"`` (fastMRI ``EquiSpacedMaskFunc``), ``"equispaced_fraction"``
            (``EquispacedMaskFractionFunc``), ``"poisson"`` (2D variable-density Poisson disc) or
            ``"gaussian"`` (2D variable-density Gaussian). See :mod:`recon.operators.masks`.
        center_fraction: fully sampled centre fraction; default 0.08 if ``R < 8`` else 0.04. For the
            2D masks the calibration box is ``round(center_fraction * n)`` along each of ``H`` and ``W``.
        seed: integer seed of the default mask.
        noise_model: deepinv noise model applied on the acquired samples (default: no noise).
        fft_dims: ``"2d"`` (slice-wise) or ``"3d"`` (full 3D FFT); only ``"2d"`` for 2D images.
        real_input: the image is real, ``(B, 1, *img_size)`` (e.g. a magnitude image for a real-valued
            prior): ``A`` embeds it as ``x + 0i`` and ``A_adjoint`` returns the real part of ``F^H M y``, so the pair
            stays exactly adjoint on real images. k-space keeps its ``(B, 2, ...)`` layout.
        spacing: voxel size in mm, a number or one per axis (geometry only, ``A`` does not depend on it; volume
            samplers read it, e.g. the hybrid's ``planes``).

    Raises:
        ValueError: on a bad ``img_size``, both or neither of ``mask``/``acceleration``,
            ``acceleration < 1``, an unknown ``mask_type`` or a mask of the wrong shape or dtype.

    Example::

        >>> import torch
        >>> op = CartesianMRI((16, 16), acceleration=4, mask_type="equispaced_fraction")
        >>> op.A(torch.randn(3, 2, 16, 16)).shape
        torch.Size([3, 2, 16, 16])
    """

    def __init__(
        self,
        img_size: Sequence[int],
        mask: torch.Tensor | np.ndarray | None = None,
        acceleration: float | None = None,
        mask_type: str = "random",
        center_fraction: float | None = None,
        seed: int = 0,
        noise_model: NoiseModel | None = None,
        fft_dims: str = "2d",
        real_input: bool = False,
        spacing: float | Sequence[float] = 1.0,
    ):
        super().__init__(
            img_size, mask, acceleration, mask_type, center_fraction, seed, noise_model, fft_dims, real_input,
            spacing,
        )

    def A(self, x: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """k-space ``M F x``: ``x`` is ``(B, 2, *img_size)`` (real, imaginary; ``(B, 1, ...)`` with
        ``real_input``), the result ``(B, 2, *img_size)``.

        Args:
            mask: optional new mask, stored (as deepinv's ``physics.A(x, mask=...)``).
        """
        self.update_parameters(mask=mask)
        return _to_real(fft_c(self._image_in(x), self._dims) * self._mask_for(x))

    def A_adjoint(self, y: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Zero-filled image ``F^H M y``: ``y`` is ``(B, 2, *img_size)``, the result too (its real part
        ``(B, 1, ...)`` with ``real_input``)."""
        self.update_parameters(mask=mask)
        check_image(y, self.img_size, "y", channels=2)
        return self._image_out(ifft_c(_to_complex(y) * self._mask_for(y), self._dims))

    def A_dagger(self, y: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Closed-form pseudo-inverse ``F^H M^+ y`` (``M^+ = 1/m`` where ``m != 0``, else 0); with
        ``real_input`` the least-squares solution over real images (deepinv's iterative solver)."""
        self.update_parameters(mask=mask)
        if self.real_input:
            return super().A_dagger(y, **kwargs)
        check_image(y, self.img_size, "y", channels=2)
        m = self._mask_for(y)
        minv = torch.where(m != 0, 1 / torch.where(m != 0, m, torch.ones_like(m)), torch.zeros_like(m))
        return _to_real(ifft_c(_to_complex(y) * minv, self._dims))

    def prox_l2(
        self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor, **kwargs
    ) -> torch.Tensor:
        r"""Closed-form :math:`\arg\min_x \tfrac12\|A x - y\|^2 + \tfrac{1}{2\gamma}\|x - z\|^2`.

        Solved in k-space: :math:`x = F^H \frac{M y + F z / \gamma}{M^2 + 1/\gamma}`. ``gamma`` is a float
        or a tensor broadcastable to ``(B, 1, 1, ...)``. With ``real_input``: deepinv's conjugate gradients.
        """
        if self.real_input:
            return super().prox_l2(z, y, gamma, **kwargs)
        check_image(z, self.img_size, "z", channels=2)
        check_image(y, self.img_size, "y", channels=2)
        m = self._mask_for(y)
        if isinstance(gamma, torch.Tensor):
            g = gamma.to(device=y.device, dtype=y.dtype).reshape(-1, *([1] * len(self.img_size)))
        else:
            g = float(gamma)
        num = _to_complex(y) * m + fft_c(_to_complex(z), self._dims) / g
        return _to_real(ifft_c(num / (m * m + 1 / g), self._dims))

    def __repr__(self) -> str:
        return f"CartesianMRI({', '.join(self._repr_fields())}, noise={self._noise_repr()})"


class MultiCoilMRI(_CartesianBase):
    r"""Multi-coil (SENSE) Cartesian MRI, :math:`y_c = M F (S_c x) + M n_c`, :math:`c = 1..N`.

    Same FFT, mask and 3D conventions as :class:`CartesianMRI`. The measurements are
    ``(B, 2, N, H, W)`` for 2D and ``(B, 2, N, D, H, W)`` for 3D -- real/imaginary axis first, then the
    coil axis, as deepinv 0.5.0's ``deepinv.physics.MultiCoilMRI``. The adjoint is
    :math:`A^H y = \sum_c \bar S_c F^H M y_c`; with maps normalised to :math:`\sum_c |S_c|^2 = 1` and a
    full mask, :math:`A^H A = I`.

    Args:
        img_size: ``(H, W)`` or ``(D, H, W)``.
        coil_maps: complex sensitivities, ``(N, *img_size)``; for 3D also ``(N, H, W)`` (the same
            maps on every slice). Tensor or numpy array of complex dtype, e.g. from
            :func:`recon.operators.simulate_coil_maps` or :func:`recon.operators.estimate_coil_maps`.
        mask, acceleration, mask_type, center_fraction, seed, noise_model, fft_dims, real_input, spacing: as in
            :class:`CartesianMRI`.

    Raises:
        ValueError: as :class:`CartesianMRI`, and on coil maps that are not complex or whose shape
            does not match ``img_size``.
    """

    adjoint_is_inverse = False  #: coil maps make AAᵀ ≠ I: Aᵀ (the zero-filled SENSE combination) is not A⁺

    def __init__(
        self,
        img_size: Sequence[int],
        coil_maps: torch.Tensor | np.ndarray,
        mask: torch.Tensor | np.ndarray | None = None,
        acceleration: float | None = None,
        mask_type: str = "random",
        center_fraction: float | None = None,
        seed: int = 0,
        noise_model: NoiseModel | None = None,
        fft_dims: str = "2d",
        real_input: bool = False,
        spacing: float | Sequence[float] = 1.0,
    ):
        super().__init__(
            img_size, mask, acceleration, mask_type, center_fraction, seed, noise_model, fft_dims, real_input,
            spacing,
        )
        self.register_buffer("coil_maps_ri", self._check_coil_maps(coil_maps))

    def _check_coil_maps(self, coil_maps) -> torch.Tensor:
        if isinstance(coil_maps, np.ndarray):
            coil_maps = torch.from_numpy(coil_maps)
        if not isinstance(coil_maps, torch.Tensor) or not coil_maps.is_complex():
            got = coil_maps.dtype if isinstance(coil_maps, torch.Tensor) else type(coil_maps).__name__
            raise ValueError(f"coil_maps must be a complex tensor (N, *img_size), got {got}")
        allowed = [self.img_size] + ([self.img_size[-2:]] if len(self.img_size) == 3 else [])
        shape = tuple(coil_maps.shape)
        if not (len(shape) >= 3 and shape[0] >= 1 and shape[1:] in [tuple(a) for a in allowed]):
            exp = " or ".join("(N, " + _fmt_size(a)[1:] for a in allowed)
            raise ValueError(f"coil_maps must have shape {exp} for img_size {self.img_size}, got {shape}")
        if not torch.isfinite(torch.view_as_real(coil_maps)).all():
            raise ValueError("coil_maps must be finite")
        return torch.view_as_real(coil_maps.resolve_conj()).clone()

    @property
    def n_coils(self) -> int:
        """Number of coils ``N``."""
        return int(self.coil_maps_ri.shape[0])

    @property
    def coil_maps(self) -> torch.Tensor:
        """Complex coil sensitivities ``(N, ...)`` (a view of the real ``coil_maps_ri`` buffer)."""
        return torch.complex(self.coil_maps_ri[..., 0], self.coil_maps_ri[..., 1])

    def _maps_for(self, like: torch.Tensor) -> torch.Tensor:
        ri = self.coil_maps_ri.to(device=like.device, dtype=like.dtype)
        maps = torch.complex(ri[..., 0], ri[..., 1])
        if maps.dim() < len(self.img_size) + 1:  # (N, H, W) maps of a volume: same maps on every slice
            maps = maps.unsqueeze(1)
        return maps

    def update_parameters(
        self,
        mask: torch.Tensor | np.ndarray | None = None,
        coil_maps: torch.Tensor | np.ndarray | None = None,
        **kwargs,
    ) -> None:
        """Replace the mask and/or the coil maps (validated like the constructor's arguments)."""
        super().update_parameters(mask=mask)
        if coil_maps is not None:
            self.coil_maps_ri = self._check_coil_maps(coil_maps).to(self.coil_maps_ri.device)

    def _check_kspace(self, y: torch.Tensor) -> None:
        check_tensor(y, "y")
        expected = (2, self.n_coils, *self.img_size)
        if y.dim() != len(expected) + 1 or tuple(y.shape[1:]) != expected:
            exp = "(B, " + ", ".join(str(e) for e in expected) + ")"
            raise ValueError(f"y must have shape {exp} (B, re/im, coils, ...), got {tuple(y.shape)}")

    def A(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        coil_maps: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Multi-coil k-space ``y_c = M F (S_c x)``: ``(B, 2, *img_size)`` (``(B, 1, ...)`` with ``real_input``)
        -> ``(B, 2, N, *img_size)``."""
        self.update_parameters(mask=mask, coil_maps=coil_maps)
        sx = self._maps_for(x) * self._image_in(x)[:, None]
        return _to_real(fft_c(sx, self._dims) * self._mask_for(x))

    def A_adjoint(
        self,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        coil_maps: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Coil-combined image ``sum_c conj(S_c) F^H M y_c``: ``(B, 2, N, *img_size)`` -> ``(B, 2, *img)``."""
        self.update_parameters(mask=mask, coil_maps=coil_maps)
        self._check_kspace(y)
        imgs = ifft_c(_to_complex(y) * self._mask_for(y), self._dims)
        return self._image_out((self._maps_for(y).conj() * imgs).sum(dim=1))

    def __repr__(self) -> str:
        fields = self._repr_fields()
        fields.insert(1, f"coils={self.n_coils}")
        return f"MultiCoilMRI({', '.join(fields)}, noise={self._noise_repr()})"
