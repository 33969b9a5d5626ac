"""Whitened measurements: ``W^{1/2} A`` for data whose noise variance differs between entries.

With per-entry variances ``v_i``, the weights ``w_i = σ̄ / sqrt(v_i)`` make the noise of ``w ⊙ y`` white with the
one standard deviation ``σ̄ = 1 / sqrt(mean(1 / v))``, so every sampler that takes a scalar ``σ_y`` solves the
weighted problem ``Σ_i (A x − y)_i² / v_i`` (penalised weighted least squares for CT) without knowing it.
"""

from __future__ import annotations

import torch
from deepinv.physics import LinearPhysics

__all__ = ["WeightedPhysics", "whitening_weights"]


def whitening_weights(variance: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The weights ``w = σ̄ / sqrt(v)`` and the whitened noise std ``σ̄`` for per-entry variances ``v``.

    Args:
        variance: positive, finite per-entry noise variances (the measurement's shape).

    Returns:
        ``(w, sigma)``: ``w`` shaped like ``variance`` (float32), ``sigma = 1 / sqrt(mean(1 / v))``.
    """
    v = torch.as_tensor(variance).double()
    if not (torch.isfinite(v).all() and (v > 0).all()):
        raise ValueError("variance must be positive and finite in every entry")
    sigma = float(v.reciprocal().mean().rsqrt())
    return (sigma / v.sqrt()).float(), sigma


class WeightedPhysics(LinearPhysics):
    """The operator ``x ↦ w ⊙ A(x)`` for a linear ``physics`` and fixed positive weights ``w``.

    ``A_adjoint(y) = Aᵀ(w ⊙ y)``. The inner operator's ``modality``, ``complex_data`` and ``img_size`` are kept;
    its analytic inverse ``fbp`` (where it has one) is applied to the unweighted data ``y / w``. ``Aᵀ`` is not an
    inverse of the weighted operator, so ``adjoint_is_inverse`` is False.

    Args:
        physics: a deepinv ``LinearPhysics`` (``recon``'s operators or any other).
        weights: positive weights of the measurement's shape (``physics.A`` output, batch axis of size 1 or B).
    """

    adjoint_is_inverse = False

    def __init__(self, physics: LinearPhysics, weights: torch.Tensor) -> None:
        super().__init__()
        w = torch.as_tensor(weights).detach()
        if not (torch.isfinite(w).all() and (w > 0).all()):
            raise ValueError("weights must be positive and finite")
        self.physics = physics
        self.register_buffer("weights", w)
        self.modality = getattr(physics, "modality", None)
        self.complex_data = bool(getattr(physics, "complex_data", False))
        if hasattr(physics, "img_size"):
            self.img_size = physics.img_size
        if hasattr(physics, "spacing"):  # the geometry is the wrapped operator's
            self.spacing = physics.spacing
        if hasattr(physics, "unsampled_energy"):  # and so is the sampling (the hybrid's TV follows it)
            self.unsampled_energy = physics.unsampled_energy

    def _w(self, y: torch.Tensor) -> torch.Tensor:
        return self.weights.to(device=y.device, dtype=y.dtype)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """``w ⊙ A(x)``."""
        y = self.physics.A(x, **kwargs)
        return self._w(y) * y

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """``Aᵀ(w ⊙ y)``."""
        return self.physics.A_adjoint(self._w(y) * y, **kwargs)

    def unweight(self, y: torch.Tensor) -> torch.Tensor:
        """The inner operator's data ``y / w`` for weighted data ``y``."""
        return y / self._w(y)

    @property
    def fbp(self):
        """The inner operator's analytic inverse applied to ``y / w`` (AttributeError where it has none)."""
        inner = self.physics.fbp
        return lambda y, **kwargs: inner(self.unweight(y), **kwargs)
