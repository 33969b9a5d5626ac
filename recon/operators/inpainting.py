r"""Inpainting (missing pixels, boxes or slices) of 2D images and 3D volumes.

The forward model multiplies by a binary mask ``M`` (1 = observed, 0 = missing):

.. math::

    y = M \odot x, \qquad A^T = A, \qquad A^\dagger = A

``y`` keeps the shape of ``x`` with zeros where data are missing. ``A`` is an orthogonal projection, so the
adjoint and the pseudo-inverse are ``A`` itself, and the proximal operator of the data term is closed form.

Mask builders (float32 0/1 tensors of shape ``img_size``; random ones are seeded and reproducible):
:func:`random_pixel_mask`, :func:`box_mask`, :func:`missing_slice_mask`. Masks combine by multiplication.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from deepinv.physics import LinearPhysics

from ._base import as_size, check_image

__all__ = ["Inpainting", "box_mask", "missing_slice_mask", "random_pixel_mask"]


def random_pixel_mask(img_size: Sequence[int], missing_fraction: float, seed: int = 0) -> torch.Tensor:
    """Mask with exactly ``round(missing_fraction * N)`` missing pixels out of ``N``, chosen at random.

    The missing pixels are a uniformly random subset drawn with a ``torch.Generator`` seeded by ``seed``
    (on the CPU, so the same seed gives the same mask on every machine). The fraction is exact up to
    rounding to whole pixels (``round`` half up).

    Args:
        img_size: spatial size ``(H, W)`` or ``(D, H, W)``.
        missing_fraction: fraction of pixels to remove, in ``[0, 1]``.
        seed: random seed.

    Returns:
        float32 tensor of shape ``img_size``; 1 = observed, 0 = missing.
    """
    size = as_size(img_size)
    f = float(missing_fraction)
    if not (0.0 <= f <= 1.0):
        raise ValueError(f"missing_fraction must be in [0, 1], got {missing_fraction}")
    n = math.prod(size)
    n_missing = math.floor(f * n + 0.5)
    gen = torch.Generator().manual_seed(int(seed))
    mask = torch.ones(n, dtype=torch.float32)
    mask[torch.randperm(n, generator=gen)[:n_missing]] = 0.0
    return mask.reshape(size)


def box_mask(img_size: Sequence[int], box: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """Mask that removes one axis-aligned box (zeros inside, ones outside).

    Args:
        img_size: spatial size ``(H, W)`` or ``(D, H, W)``.
        box: one ``(start, stop)`` pair of pixel indices per axis, half-open like a slice
            (``0 <= start < stop <= n``), or ``None`` for the whole axis. E.g. ``((4, 12), (2, 6))`` removes
            rows 4..11 and columns 2..5.

    Returns:
        float32 tensor of shape ``img_size``; 1 = observed, 0 = missing.
    """
    size = as_size(img_size)
    if isinstance(box, (str, bytes)) or len(box) != len(size):
        raise ValueError(f"box must have one (start, stop) pair or None per axis ({len(size)}), got {box!r}")
    slices = []
    for axis, (b, n) in enumerate(zip(box, size, strict=True)):
        if b is None:
            slices.append(slice(None))
            continue
        try:
            start, stop = (int(v) for v in b)
        except (TypeError, ValueError) as err:
            raise ValueError(f"box[{axis}] must be a (start, stop) pair of ints or None, got {b!r}") from err
        if not (0 <= start < stop <= n):
            raise ValueError(f"box[{axis}] must satisfy 0 <= start < stop <= {n}, got ({start}, {stop})")
        slices.append(slice(start, stop))
    mask = torch.ones(size, dtype=torch.float32)
    mask[tuple(slices)] = 0.0
    return mask


def missing_slice_mask(
    img_size: Sequence[int],
    missing: Sequence[int] | None = None,
    keep_every: int | None = None,
    axis: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """Mask that removes whole slices along ``axis`` (for 2D images with ``axis=0``: whole rows).

    Give exactly one of:

    - ``missing``: the indices of the missing slices (negative indices count from the end);
    - ``keep_every=k``: sparse acquisition, only slices ``offset, offset + k, offset + 2k, ...`` are kept
      and all others are missing (``k = 1`` keeps everything).

    Args:
        img_size: spatial size ``(H, W)`` or ``(D, H, W)``.
        axis: spatial axis of the slices (0 = ``D`` for volumes, ``H`` for images; negative allowed).
        offset: first kept slice for ``keep_every``, ``0 <= offset < k``.

    Returns:
        float32 tensor of shape ``img_size``; 1 = observed, 0 = missing.
    """
    size = as_size(img_size)
    if not -len(size) <= axis < len(size):
        raise ValueError(f"axis must be in [{-len(size)}, {len(size) - 1}] for img_size {size}, got {axis}")
    axis = axis % len(size)
    n = size[axis]
    if (missing is None) == (keep_every is None):
        given = f"missing={missing}, keep_every={keep_every}"
        raise ValueError(f"give exactly one of missing and keep_every, got {given}")
    keep = torch.ones(n, dtype=torch.float32)
    if missing is not None:
        idx = [int(i) for i in missing]
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise ValueError(f"missing slice indices must be in [{-n}, {n - 1}] along axis {axis}, got {bad}")
        keep[[i % n for i in idx]] = 0.0
    else:
        k = int(keep_every)
        if k != keep_every or k < 1:
            raise ValueError(f"keep_every must be a positive integer, got {keep_every}")
        if not 0 <= offset < k:
            raise ValueError(f"offset must be in [0, {k - 1}] for keep_every={k}, got {offset}")
        keep.zero_()
        keep[offset::k] = 1.0
    shape = [1] * len(size)
    shape[axis] = n
    return keep.view(shape).expand(size).contiguous()


class Inpainting(LinearPhysics):
    r"""Masking operator ``y = M ⊙ x`` for images ``(B, C, H, W)`` or volumes ``(B, C, D, H, W)``.

    ``y`` has the shape of ``x``, with zeros at the missing pixels. ``A_adjoint = A`` (a diagonal 0/1
    operator is symmetric), ``A_dagger = A`` and ``prox_l2`` are closed form. Differentiable, float32 /
    float64, any device (the mask is a buffer and follows ``.to(device)``; at call time it is cast to the
    input's dtype and device).

    Args:
        img_size: spatial size ``(H, W)`` or ``(D, H, W)``.
        mask: binary mask (tensor or array of 0/1 or bool), shape ``img_size`` (one mask for all
            channels) or ``(C, *img_size)`` (one per channel; inputs must then have ``C`` channels).
        noise_model: a deepinv noise model (default: no noise).
    """

    modality = "image"  #: what the operator measures (samplers read this, never the class)
    adjoint_is_inverse = True  #: a 0/1 diagonal: ``A^T = A^†``
    complex_data = False

    def __init__(self, img_size: Sequence[int], mask: torch.Tensor, noise_model=None) -> None:
        size = as_size(img_size)
        if isinstance(mask, torch.Tensor) and mask.is_complex():
            raise ValueError(f"mask must be real (0/1), got dtype {mask.dtype}")
        try:
            m = torch.as_tensor(mask).detach().to(device="cpu", dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"mask must be a 0/1 array, got {type(mask).__name__}") from err
        if tuple(m.shape) == size:
            m = m[None]
        elif not (m.dim() == len(size) + 1 and tuple(m.shape[1:]) == size):
            raise ValueError(
                f"mask must have shape {size} or (C, {', '.join(map(str, size))}) to match img_size, "
                f"got {tuple(m.shape)}"
            )
        if not ((m == 0) | (m == 1)).all():
            raise ValueError("mask must be binary (0 = missing, 1 = observed); got other values")
        super().__init__(noise_model=noise_model)
        self.img_size = size
        self.register_buffer("mask", m[None])  # (1, C or 1, *img_size)

    @property
    def channels(self) -> int | None:
        """Channels of a per-channel mask, or ``None`` for one mask shared by all channels."""
        return None if self.mask.shape[1] == 1 else int(self.mask.shape[1])

    @property
    def kept_fraction(self) -> float:
        """Fraction of observed entries in the mask."""
        return float(self.mask.float().mean())

    def _masked(self, x: torch.Tensor, name: str) -> torch.Tensor:
        check_image(x, self.img_size, name, channels=self.channels)
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """``M ⊙ x`` for ``x`` of shape ``(B, C, *img_size)``."""
        return self._masked(x, "x")

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """``M ⊙ y`` (the operator is self-adjoint)."""
        return self._masked(y, "y")

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Pseudo-inverse ``M ⊙ y`` (missing pixels set to 0)."""
        return self._masked(y, "y")

    def A_adjoint_A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """``M ⊙ x`` (``M`` is idempotent)."""
        return self._masked(x, "x")

    def A_A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """``M ⊙ y`` (``M`` is idempotent)."""
        return self._masked(y, "y")

    def prox_l2(self, z, y: torch.Tensor, gamma: float, **kwargs) -> torch.Tensor:
        r"""``argmin_x gamma/2 ||M x - y||^2 + 1/2 ||x - z||^2 = (z + gamma M y) / (1 + gamma M)``."""
        check_image(y, self.img_size, "y", channels=self.channels)
        m = self.mask.to(device=y.device, dtype=y.dtype)
        if z is None:
            z = 0.0
        return (z + gamma * m * y) / (1 + gamma * m)

    def __repr__(self) -> str:
        per = f", channels={self.channels}" if self.channels else ""
        noise = type(self.noise_model).__name__
        return (
            f"Inpainting(img_size={self.img_size}, kept={100 * self.kept_fraction:.1f}%{per}, noise={noise})"
        )
