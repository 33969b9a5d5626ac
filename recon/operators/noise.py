"""Noise models for CT measurements (deepinv ``NoiseModel`` subclasses).

Additive Gaussian noise is deepinv's own ``deepinv.physics.GaussianNoise(sigma=…)``; this module adds the
transmission (Beer–Lambert) Poisson model of X-ray CT, which returns post-log line integrals.
"""

from __future__ import annotations

import deepinv
import torch

__all__ = ["TransmissionPoissonNoise", "post_log_variance"]


class TransmissionPoissonNoise(deepinv.physics.NoiseModel):
    r"""Beer–Lambert photon counting noise with post-log output.

    For noiseless line integrals ``p`` (the output of a CT operator, in image units × mm):

    .. math::
        N \sim \mathrm{Poisson}\big(I_0\, e^{-\mu p}\big) + \mathcal{N}(0, \sigma_e^2), \qquad
        \hat p = -\frac{1}{\mu} \log\frac{\max(N, n_{\min})}{I_0}

    where ``μ = attenuation_per_unit`` converts the image's units into attenuation (mm⁻¹ per unit; 1
    when the image already holds attenuation coefficients in mm⁻¹), ``I_0`` is the number of photons per
    detector element of an unattenuated ray, and ``σ_e`` optional electronic (Gaussian) noise in photon
    counts. Counts below ``min_count`` (photon starvation) are clamped to it before the logarithm, so the
    output is always finite; the number of clamped readings of the last call is in
    ``last_clamped_fraction``.

    The noise is signal dependent: its variance on ``p̂`` is about ``e^{μp} / (μ² I_0)``, larger behind
    dense structures.

    Args:
        I0: photons per detector element (e.g. 1e4 for low dose, 1e6 for near noiseless). Positive.
        attenuation_per_unit: mm⁻¹ per image unit (default 1).
        electronic_noise: standard deviation of additive Gaussian noise in photon counts (default 0).
        min_count: floor on counts before the logarithm (default 1 photon).
        rng: an optional ``torch.Generator`` on the data's device; ``seed=`` in the call reseeds it.

    Shapes: any; the output has the shape and dtype of the input.
    """

    def __init__(
        self,
        I0: float = 1e5,
        attenuation_per_unit: float = 1.0,
        electronic_noise: float = 0.0,
        min_count: float = 1.0,
        rng: torch.Generator | None = None,
    ):
        super().__init__(rng=rng)
        for name, value, lower in (
            ("I0", I0, 0.0),
            ("attenuation_per_unit", attenuation_per_unit, 0.0),
            ("min_count", min_count, 0.0),
        ):
            if not (isinstance(value, (int, float)) and value > lower and value < float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not (isinstance(electronic_noise, (int, float)) and 0 <= electronic_noise < float("inf")):
            raise ValueError(f"electronic_noise must be >= 0 (photon counts), got {electronic_noise!r}")
        self.I0 = float(I0)
        self.attenuation_per_unit = float(attenuation_per_unit)
        self.electronic_noise = float(electronic_noise)
        self.min_count = float(min_count)
        self.last_clamped_fraction = 0.0

    def forward(self, x: torch.Tensor, seed: int | None = None, **kwargs) -> torch.Tensor:
        """Noisy post-log line integrals for noiseless line integrals ``x``."""
        if seed is not None:
            if self.rng is None:
                self.rng = torch.Generator(device=x.device)
            self.rng.manual_seed(seed)
        mu = self.attenuation_per_unit
        expected = self.I0 * torch.exp(-mu * x.detach())
        counts = torch.poisson(expected.double(), generator=self.rng)
        if self.electronic_noise > 0:
            noise = torch.randn(counts.shape, generator=self.rng, device=counts.device, dtype=counts.dtype)
            counts = counts + self.electronic_noise * noise
        clamped = counts < self.min_count
        self.last_clamped_fraction = float(clamped.double().mean())
        counts = counts.clamp(min=self.min_count)
        return (-torch.log(counts / self.I0) / mu).to(x.dtype)

    def variance(self, y: torch.Tensor) -> torch.Tensor:
        """The variance of each post-log reading ``y`` (this model's output), estimated from the data."""
        return post_log_variance(y, self.I0, self.attenuation_per_unit, self.electronic_noise, self.min_count)

    def __repr__(self) -> str:
        extra = f", electronic_noise={self.electronic_noise:g}" if self.electronic_noise else ""
        return (
            f"TransmissionPoissonNoise(I0={self.I0:g}, attenuation_per_unit={self.attenuation_per_unit:g}"
            f"{extra}, min_count={self.min_count:g})"
        )


def post_log_variance(y: torch.Tensor, I0: float, attenuation_per_unit: float = 1.0, electronic_noise: float = 0.0,
                      min_count: float = 1.0) -> torch.Tensor:
    """The variance of post-log readings ``y`` under Beer–Lambert noise, from the measured counts.

    The delta method on ``p̂ = -log(N / I_0) / μ`` gives ``Var p̂ ≈ (N + σ_e²) / (μ N)²`` with the measured counts
    ``N = I_0 e^{-μ p̂}`` in place of their mean (the plug-in of penalised weighted least squares).

    Args:
        y: post-log readings, as ``TransmissionPoissonNoise`` returns them.
        I0: photons per detector element of an unattenuated ray. Positive.
        attenuation_per_unit: mm⁻¹ per image unit (default 1).
        electronic_noise: standard deviation of additive Gaussian noise in photon counts (default 0).
        min_count: the floor on counts the model clamps to (default 1).

    Returns:
        A tensor shaped like ``y`` (float64), positive and finite.
    """
    if not (I0 > 0 and I0 < float("inf")):
        raise ValueError(f"photons (I0) must be a positive finite number, got {I0!r}")
    mu = float(attenuation_per_unit)
    counts = (float(I0) * torch.exp(-mu * y.detach().double())).clamp(min=float(min_count))
    return (counts + float(electronic_noise) ** 2) / (mu * counts) ** 2
