"""Group averaging of a denoiser over the symmetries of the square (the dihedral group D4).

A denoiser trained with random flips and 90° rotations (``recon.priors.train``) learns a distribution that these
eight transforms leave unchanged, but the network itself is only approximately equivariant. Averaging
``T⁻¹ D(T x)`` over the group projects it onto the equivariant denoisers: for an invariant distribution the MMSE
denoiser is equivariant, so the projection can only lower the mean squared error (Jensen), at eight network
evaluations instead of one (``benchmarks/README.md``, "Built-in priors").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SYMMETRIES", "d4_average", "d4_transforms"]

SYMMETRIES = ("d4",)


def d4_transforms() -> list[tuple[int, bool]]:
    """The eight elements of D4 as ``(quarter turns, flip)``: ``T x = rot90(x, k)`` then a flip along the last axis."""
    return [(k, flip) for k in range(4) for flip in (False, True)]


def _apply(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """``T x`` for ``T = (k, flip)`` on the last two axes."""
    x = torch.rot90(x, k, (-2, -1))
    return x.flip(-1) if flip else x


def _invert(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """``T⁻¹ x`` for ``T = (k, flip)`` on the last two axes."""
    x = x.flip(-1) if flip else x
    return torch.rot90(x, -k, (-2, -1))


def d4_average(denoise: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(1/8) Σ_T T⁻¹ denoise(T x)`` over D4 acting on the last two axes of ``x`` (``(B, C, H, W)``)."""
    out = torch.zeros_like(x)
    for k, flip in d4_transforms():
        out = out + _invert(denoise(_apply(x, k, flip)), k, flip)
    return out / 8.0
