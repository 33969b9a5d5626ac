r"""Coil sensitivity maps for :class:`recon.operators.MultiCoilMRI`: simulation and ESPIRiT estimation.

Maps are complex tensors ``(N, H, W)`` or ``(N, D, H, W)`` (``N`` coils), on the image grid of the
operator, normalised so that :math:`\sum_c |S_c(r)|^2 = 1` wherever they are defined (then the fully
sampled SENSE operator satisfies :math:`A^H A = I`).

deepinv 0.5.0 has no native ESPIRiT: ``deepinv.physics.MultiCoilMRI.estimate_coil_maps`` calls
``sigpy.mri.app.EspiritCalib`` (sigpy is not a dependency of ``recon``), and its birdcage simulation also
needs sigpy. Both are implemented here from the published methods, with numpy (they are not inside a
differentiable operator).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recon.operators._base import as_size

__all__ = ["estimate_coil_maps", "simulate_coil_maps"]


def simulate_coil_maps(
    img_size: Sequence[int],
    n_coils: int,
    radius: float = 1.5,
    coils_per_ring: int = 8,
    falloff: float = 1.0,
    dtype: torch.dtype = torch.complex64,
) -> torch.Tensor:
    r"""Smooth birdcage-like coil sensitivities, normalised to :math:`\sum_c |S_c|^2 = 1`.

    Coordinates are normalised so the field of view spans ``[-1, 1]`` along each axis (pixel centres at
    ``(j - (n - 1) / 2) / (n / 2)``). Coil ``c`` is a wire element on a circle of radius ``radius`` around
    the FOV centre in the ``(y, x)`` plane at angle :math:`\theta_c = 2 \pi c / n_{ring}`; for 3D volumes
    ``ceil(N / coils_per_ring)`` rings are stacked along ``z`` (one unit apart, centred). Its sensitivity is

    .. math:: S_c(r) \propto d_c(r)^{-\text{falloff}} \exp\big(i(\varphi_c(r) - \theta_c')\big),

    with :math:`d_c` the distance to the element (Biot-Savart-like :math:`1/d` decay for ``falloff=1``),
    :math:`\varphi_c` the angle of ``r`` seen from the element (the circular field around a wire) and
    :math:`\theta_c'` a per-coil phase offset (the birdcage mode phase, shifted per ring in 3D).

    Args:
        img_size: ``(H, W)`` or ``(D, H, W)``.
        n_coils: number of coils ``N >= 1``.
        radius: radius of the coil circle, in half-FOV units; must exceed ``sqrt(2)`` so that the
            elements lie outside the FOV and the maps are smooth.
        coils_per_ring: elements per ring for 3D volumes (2D images use one ring of all ``N``).
        falloff: exponent of the distance decay of the magnitude.
        dtype: ``torch.complex64`` or ``torch.complex128``.

    Returns:
        complex tensor ``(N, *img_size)``.

    Raises:
        ValueError: on a bad size, ``n_coils < 1``, ``radius <= sqrt(2)`` or a non-complex dtype.
    """
    size = as_size(img_size)
    if isinstance(n_coils, bool) or not isinstance(n_coils, (int, np.integer)) or n_coils < 1:
        raise ValueError(f"n_coils must be a positive int, got {n_coils!r}")
    if not radius > np.sqrt(2):
        raise ValueError(f"radius must exceed sqrt(2) (coils outside the FOV), got {radius!r}")
    if dtype not in (torch.complex64, torch.complex128):
        raise ValueError(f"dtype must be torch.complex64 or torch.complex128, got {dtype}")
    if int(coils_per_ring) < 1:
        raise ValueError(f"coils_per_ring must be a positive int, got {coils_per_ring!r}")

    def axis(n: int) -> np.ndarray:
        return (np.arange(n) - (n - 1) / 2) / (n / 2)

    c = np.arange(int(n_coils))
    if len(size) == 2:
        per_ring = int(n_coils)
        ring = np.zeros_like(c)
    else:
        per_ring = min(int(coils_per_ring), int(n_coils))
        ring = c // per_ring
    theta = 2 * np.pi * (c % per_ring) / per_ring
    cy, cx = radius * np.sin(theta), radius * np.cos(theta)
    phase_offset = -(c + ring) * 2 * np.pi / per_ring
    y, x = axis(size[-2])[:, None], axis(size[-1])[None, :]
    shape = (-1,) + (1,) * len(size)
    if len(size) == 2:
        dy = y[None] - cy.reshape(-1, 1, 1)
        dx = x[None] - cx.reshape(-1, 1, 1)
        dist2 = dy**2 + dx**2
    else:
        n_rings = int(np.ceil(n_coils / per_ring))
        cz = ring - 0.5 * (n_rings - 1)
        z = axis(size[0])[:, None, None]
        dy = (y[None, None] - cy.reshape(shape)) * np.ones((1, size[0], 1, 1))
        dx = (x[None, None] - cx.reshape(shape)) * np.ones((1, size[0], 1, 1))
        dz = z[None] - cz.reshape(shape)
        dist2 = dy**2 + dx**2 + dz**2
    phi = np.arctan2(dx, -dy) + phase_offset.reshape(shape)
    maps = dist2 ** (-falloff / 2) * np.exp(1j * phi)
    maps /= np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    return torch.from_numpy(maps).to(dtype)


def _centred_crop(a: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Crop the last axes of ``a`` to ``size`` keeping index ``n // 2`` (DC) at ``s // 2``."""
    sl = [slice(None)] * (a.ndim - len(size))
    for n, s in zip(a.shape[-len(size) :], size, strict=True):
        start = n // 2 - s // 2
        sl.append(slice(start, start + s))
    return a[tuple(sl)]


def _espirit_2d(ksp: np.ndarray, calib: int, kernel: int, threshold: float, crop: float) -> np.ndarray:
    """ESPIRiT on one centred 2D multi-coil k-space ``(N, H, W)`` (DC at ``n // 2``) -> maps ``(N, H, W)``."""
    n_coils, h, w = ksp.shape
    cal = _centred_crop(ksp, (min(calib, h), min(calib, w)))
    if min(cal.shape[1:]) < kernel:
        raise ValueError(f"calibration region {cal.shape[1:]} is smaller than kernel_size {kernel}")
    # calibration matrix: one row per kernel-sized patch of the ACS region, columns (coil, ky, kx)
    patches = np.lib.stride_tricks.sliding_window_view(cal, (kernel, kernel), axis=(1, 2))
    mat = patches.transpose(1, 2, 0, 3, 4).reshape(-1, n_coils * kernel * kernel)
    _, sv, vh = np.linalg.svd(mat, full_matrices=False)
    if sv.max() == 0:
        raise ValueError("the calibration region of kspace is all zeros")
    vh = vh[sv > threshold * sv.max()]
    kernels = vh.reshape(-1, n_coils, kernel, kernel)
    # image-domain kernel operator G(r) = sum_k a_k(r) a_k(r)^H with a_k = IFFT(zero-padded kernel_k);
    # scaled so that G has eigenvalue 1 at every pixel where the maps are consistent with the data
    gram = np.zeros((h * w, n_coils, n_coils), dtype=np.complex128)
    padded = np.zeros((n_coils, h, w), dtype=np.complex128)
    y0, x0 = h // 2 - kernel // 2, w // 2 - kernel // 2
    scale = h * w / kernel**2
    chunk = max(1, int(2e7 // (n_coils * h * w)))
    for start in range(0, len(kernels), chunk):
        block = np.zeros((min(chunk, len(kernels) - start), *padded.shape), dtype=np.complex128)
        block[:, :, y0 : y0 + kernel, x0 : x0 + kernel] = kernels[start : start + chunk]
        img = np.fft.fftshift(
            np.fft.ifft2(np.fft.ifftshift(block, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
        ).reshape(len(block), n_coils, h * w)
        gram += scale * np.einsum("kcr,kdr->rcd", img, img.conj())
    evals, evecs = np.linalg.eigh(gram)  # ascending eigenvalues per pixel
    maps = evecs[:, :, -1].T.reshape(n_coils, h, w)
    top = evals[:, -1].reshape(h, w)
    # fix the per-pixel phase ambiguity relative to coil 0 (as sigpy / BART), then crop by eigenvalue
    ref = maps[0]
    maps = maps * np.where(np.abs(ref) > 0, np.conj(ref) / np.maximum(np.abs(ref), 1e-30), 1)
    return maps * (top > crop)


def estimate_coil_maps(
    kspace: torch.Tensor | np.ndarray,
    calib_size: int = 24,
    kernel_size: int = 6,
    threshold: float = 0.02,
    crop: float = 0.95,
    fft_dims: str = "2d",
) -> torch.Tensor:
    r"""ESPIRiT coil sensitivity estimation (Uecker et al., MRM 2014) from the fully sampled k-space centre.

    1. Take the centred ``calib_size x calib_size`` auto-calibration (ACS) region of each coil.
    2. Build the calibration matrix of all ``kernel_size x kernel_size`` multi-coil patches and keep the
       right singular vectors whose singular value exceeds ``threshold * max`` (the signal subspace
       kernels).
    3. Transform the kernels to the image domain and form, per pixel, the ``N x N`` operator
       :math:`G(r) = \frac{HW}{k^2} \sum_k a_k(r) a_k(r)^H`; its eigenvector with eigenvalue ~1 is the
       coil sensitivity vector :math:`S(r)` (unit norm, so :math:`\sum_c |S_c|^2 = 1`).
    4. Fix the per-pixel phase relative to coil 0 and zero the maps where the top eigenvalue is
       ``<= crop`` (outside the object support).

    The maps equal the true sensitivities up to a per-pixel phase (the ESPIRiT ambiguity); the SENSE
    operator built with them reproduces the data. k-space must be centred (DC at index ``n // 2``, as
    produced by :class:`recon.operators.MultiCoilMRI`). The per-pixel eigen-decomposition is exact
    (``numpy.linalg.eigh``) rather than a power iteration.

    Args:
        kspace: either the operator's layout, real ``(B, 2, N, H, W)`` / ``(B, 2, N, D, H, W)``, or a
            complex ``(N, H, W)`` / ``(N, D, H, W)`` tensor or array. Only the centre must be sampled.
        calib_size: side of the square ACS region (clipped to the image).
        kernel_size: side of the ESPIRiT kernel.
        threshold: relative singular-value threshold selecting the kernels.
        crop: eigenvalue threshold below which maps are set to zero.
        fft_dims: for 3D data, ``"2d"`` if k-space is slice-wise (the maps are estimated per slice)
            or ``"3d"`` if it was made with a full 3D FFT (a centred inverse FFT along ``D`` first turns it
            into slice-wise k-space).

    Returns:
        complex128 maps, ``(B, N, *spatial)`` for the operator layout or ``(N, *spatial)`` for
        complex input.

    Raises:
        ValueError: on other shapes or dtypes, ``fft_dims`` not in ``{"2d", "3d"}``, or an ACS region
            smaller than the kernel.
    """
    if fft_dims not in ("2d", "3d"):
        raise ValueError(f"fft_dims must be '2d' or '3d', got {fft_dims!r}")
    if isinstance(kspace, torch.Tensor):
        arr = kspace.detach().cpu().numpy()
    elif isinstance(kspace, np.ndarray):
        arr = kspace
    else:
        raise ValueError(f"kspace must be a torch.Tensor or numpy array, got {type(kspace).__name__}")
    if np.iscomplexobj(arr):
        if arr.ndim not in (3, 4):
            raise ValueError(f"complex kspace must be (N, H, W) or (N, D, H, W), got {arr.shape}")
        batch, squeeze = arr[None].astype(np.complex128), True
    else:
        if arr.ndim not in (5, 6) or arr.shape[1] != 2:
            raise ValueError(
                f"real kspace must be (B, 2, N, H, W) or (B, 2, N, D, H, W) (re/im, coils), got {arr.shape}"
            )
        batch, squeeze = (arr[:, 0] + 1j * arr[:, 1]).astype(np.complex128), False
    if int(calib_size) < 1 or int(kernel_size) < 1:
        raise ValueError(f"calib_size and kernel_size must be positive, got {calib_size}, {kernel_size}")
    out = np.zeros_like(batch)
    for b, ksp in enumerate(batch):
        if ksp.ndim == 3:
            out[b] = _espirit_2d(ksp, int(calib_size), int(kernel_size), threshold, crop)
            continue
        if fft_dims == "3d":  # centred inverse FFT along D: (N, D, H, W) slice-wise k-space
            ksp = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(ksp, axes=1), axis=1, norm="ortho"), axes=1)
        for d in range(ksp.shape[1]):
            out[b, :, d] = _espirit_2d(ksp[:, d], int(calib_size), int(kernel_size), threshold, crop)
    result = torch.from_numpy(out)
    return result[0] if squeeze else result
