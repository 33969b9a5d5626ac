r"""DiffPIR (Zhu et al., CVPR-W NTIRE 2023), in the σ (VE) view: a proximal data step per diffusion level.

Per level ``σ_i → σ_{i+1}`` (derivation and tuning: ``docs/methods/diffpir.md``)::

    x̂0 = denoise(x, σ_i)
    x̂0 ← argmin_x ‖y − A x‖²/σ_y² + (λ/σ_i²) ‖x − x̂0‖²      (ρ_i = λ σ_y²/σ_i², CG on (AᵀA + ρ_i I))
    ε̂  = (x − x̂0)/σ_i
    x  = x̂0 + σ_{i+1} (sqrt(1 − ζ) ε̂ + sqrt(ζ) ξ)

The output is the data-consistent ``x̂0`` of the last level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from recon.samplers.base import ReconstructionResult, check_bounded, check_finite
from recon.samplers.dps import (
    chains_result,
    per_item_norm,
    randn,
    start_chains,
)
from recon.samplers.loop import SamplerRun
from recon.samplers.volume import normal_cg

__all__ = ["proximal_data_step", "renoise", "sample_diffpir"]


def proximal_data_step(physics, x0: torch.Tensor, aty: torch.Tensor, rho: float, cg_iters: int) -> torch.Tensor:
    """``argmin_x ½‖Ax − y‖² + ρ/2 ‖x − x0‖²`` by ``cg_iters`` CG iterations on ``(AᵀA + ρI) x = Aᵀy + ρ x0`` from
    ``x0`` (``aty = Aᵀy``). ``ρ = 0``: CG on the normal equations from ``x0`` (towards the projection of ``x0`` onto
    ``{Ax = y}``)."""
    return normal_cg(physics, aty + rho * x0 if rho else aty, x0, cg_iters, gamma=rho)


def renoise(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, zeta: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """DiffPIR's re-noising ``x0 + σ' (sqrt(1 − ζ) ε̂ + sqrt(ζ) ξ)`` with ``ε̂ = (x − x0)/σ``; ``σ' = 0`` returns
    ``x0``."""
    if sigma_next <= 0:
        return x0
    out = x0 + (sigma_next * math.sqrt(1.0 - zeta) / sigma) * (x - x0)
    if zeta > 0:
        out = out + (sigma_next * math.sqrt(zeta)) * randn(x.shape, generator, x.dtype, x.device)
    return out


def sample_diffpir(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 100,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    lam: float = 7.0,
    zeta: float = 0.3,
    cg_iters: int = 20,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    sigmas: Sequence[float] | None = None,
) -> ReconstructionResult:
    """DiffPIR: denoise, proximal data step weighted by σ_y, re-noise (module docstring).

    Args:
        physics: any linear deepinv ``Physics`` on ``(B, C, H, W)`` images or ``(B, C, D, H, W)`` volumes.
        y: measurements ``(B, ...)``.
        prior: ``denoise(x, σ)``, ``sigma_min``, ``sigma_max``, ``nfe``.
        sigma_y: measurement noise std in the units of ``y``; sets the data weight ``ρ_i = λ σ_y²/σ_i²`` (0: the
            data step is CG on the normal equations from ``x̂0``, as DDS).
        steps: noise levels = network evaluations per chain (paper: 100).
        particles: independent chains per measurement (one ``P·B`` batch).
        generator: the seeded ``torch.Generator`` all randomness comes from.
        callback: called after every step with ``step``, ``steps``, ``sigma``, ``residual``, ``nfe``, ``seconds``,
            ``rho``.
        lam: λ in ``ρ_i = λ σ_y²/σ_i²`` (official deblurring 7; larger trusts the denoiser more).
        zeta: fraction of fresh noise in the re-noising, in [0, 1] (official deblurring 0.3; 1: ancestral-like).
        cg_iters: CG iterations of the proximal step (exact for masks in 1–2; more for CT).
        sigma_min: lowest noise level of the Karras schedule (clipped to the prior's range).
        sigma_max: highest noise level of the Karras schedule.
        rho: Karras schedule exponent.
        sigmas: explicit decreasing noise levels (override the schedule).

    Returns:
        ``ReconstructionResult``: ``x`` (mean of the samples, or the sample), ``samples (P, B, ...)``, ``weights``,
        ``std`` (``P > 1``), ``diagnostics``, ``info``.
    """
    _check(sigma_y, particles, lam, zeta, cg_iters)
    c = start_chains(physics, y, prior, generator, steps, particles, sigma_min, sigma_max, rho, sigmas)
    sig, n, x, y_rep = c.sig, c.n, c.x, c.y_rep
    run = SamplerRun("diffpir", prior, generator, callback, steps=n, particles=c.p, options={
        "lam": float(lam), "zeta": float(zeta), "cg_iters": int(cg_iters), "sigma_max": float(sig[0]),
        "sigma_min": float(sig[n - 1]), "sigma_y": float(sigma_y)})
    with torch.no_grad():
        aty = physics.A_adjoint(y_rep)
        for i in range(n):
            s, s_next = float(sig[i]), float(sig[i + 1])
            x0 = prior.denoise(x, s)
            check_finite(x0, "diffpir", i, "the prior's denoiser returned non-finite values")
            rho_i = float(lam) * float(sigma_y) ** 2 / s**2
            x0 = proximal_data_step(physics, x0, aty, rho_i, cg_iters)
            x = renoise(x, x0, s, s_next, float(zeta), generator)
            check_bounded(x, "diffpir", i, s_next, "raise lam or sigma_y, or lower cg_iters")
            residual = per_item_norm(y_rep - physics.A(x0)).mean()
            run.step(i, s, residual, rho=rho_i)
    return chains_result(run, x0)


def _check(sigma_y, particles, lam, zeta, cg_iters) -> None:
    if not (float(sigma_y) >= 0 and math.isfinite(float(sigma_y))):
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y}")
    if int(particles) < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    if not float(lam) > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if not 0.0 <= float(zeta) <= 1.0:
        raise ValueError(f"zeta must be in [0, 1], got {zeta}")
    if int(cg_iters) < 0:
        raise ValueError(f"cg_iters must be >= 0, got {cg_iters}")
