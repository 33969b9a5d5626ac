r"""DAPS — Decoupled Annealing Posterior Sampling (Zhang et al., CVPR 2025), in the σ (VE) view.

Per annealing level ``σ_i → σ_{i+1}`` (derivation and tuning: ``docs/methods/daps.md``)::

    x̂0 = ODE(x, σ_i → 0)                         # PF-ODE, ``ode_steps`` Euler steps (1: the Tweedie estimate)
    x0 ← x̂0; repeat langevin_steps times:        # Langevin on p(x0 | x_i, y) ∝ N(x0; x̂0, r_i²) p(y | x0)
        x0 ← x0 + η ∇[−‖x0 − x̂0‖²/(2 r_i²) − ‖A x0 − y‖²/(2 τ²)] + sqrt(2η) ξ
    x  = x0 + σ_{i+1} ξ'                          # decoupled re-noising

with ``τ = σ_y`` (``tau`` when ``σ_y = 0``), ``r_i = σ_i`` (the paper's choice) and the step ``η = lr / L_i``,
``L_i = ‖A‖²/τ² + 1/r_i²`` (the target's largest curvature, so ``lr`` is scale-free). The output is ``x0`` of the
last level.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from recon.priors.schedules import karras_sigmas
from recon.samplers.base import ReconstructionResult, check_bounded, check_finite, operator_norm
from recon.samplers.dps import (
    chains_result,
    per_item_norm,
    randn,
    start_chains,
)
from recon.samplers.loop import SamplerRun

__all__ = ["langevin_x0", "ode_x0", "sample_daps"]


def ode_x0(prior, x: torch.Tensor, sigma: float, ode_steps: int) -> torch.Tensor:
    """``x̂0`` from ``x`` at noise ``σ``: ``ode_steps − 1`` Euler steps of the probability-flow ODE on a Karras grid
    of ``ode_steps`` levels from ``σ`` down to the prior's ``sigma_min``, then the Tweedie estimate there
    (``ode_steps`` network evaluations; 1: the Tweedie estimate at ``σ``)."""
    lo = min(float(prior.sigma_min), sigma)
    grid = karras_sigmas(int(ode_steps), lo, sigma).tolist()[:-1] if ode_steps > 1 and lo < sigma else [sigma]
    for s, s_next in itertools.pairwise(grid):
        x = x + (s_next - s) * (x - prior.denoise(x, s)) / s
    return prior.denoise(x, grid[-1])


def langevin_x0(physics, x0hat: torch.Tensor, y: torch.Tensor, r: float, tau: float, eta: float, steps: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """``steps`` unadjusted Langevin steps of size ``eta`` on ``N(x0; x0hat, r²I)·exp(−‖A x0 − y‖²/(2τ²))`` from
    ``x0hat`` (the data gradient through ``physics.A_vjp``: the adjoint for linear physics)."""
    x = x0hat
    for _ in range(int(steps)):
        grad = (x0hat - x) / r**2 - physics.A_vjp(x, physics.A(x) - y) / tau**2
        x = x + eta * grad + (2.0 * eta) ** 0.5 * randn(x.shape, generator, x.dtype, x.device)
    return x


def sample_daps(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 50,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    ode_steps: int = 5,
    langevin_steps: int = 50,
    lr: float = 0.5,
    lr_min_ratio: float = 1.0,
    tau: float = 0.01,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    sigmas: Sequence[float] | None = None,
) -> ReconstructionResult:
    """DAPS: x̂0 by the PF-ODE, Langevin on ``x0`` given ``x̂0`` and ``y``, independent re-noising (module docstring).

    Args:
        physics: any deepinv ``Physics`` with ``A`` and ``A_vjp`` (linear: ``A_adjoint``); ``‖A‖`` by power iteration.
        y: measurements ``(B, ...)``.
        prior: ``denoise(x, σ)``, ``sigma_min``, ``sigma_max``, ``nfe``.
        sigma_y: measurement noise std in the units of ``y``: the likelihood's ``τ`` (``tau`` when 0).
        steps: annealing levels (official 200; NFE per chain ``steps · ode_steps``).
        particles: independent chains per measurement (one ``P·B`` batch).
        generator: the seeded ``torch.Generator`` all randomness comes from.
        callback: called after every step with ``step``, ``steps``, ``sigma``, ``residual``, ``nfe``, ``seconds``.
        ode_steps: Euler steps of the PF-ODE for ``x̂0`` (official 5; 1: the Tweedie estimate).
        langevin_steps: Langevin steps per level (official 100).
        lr: Langevin step in units of ``1/L_i`` (``L_i``: the target's largest curvature); below 2 for stability.
        lr_min_ratio: the step decays linearly to ``lr · lr_min_ratio`` over the levels (official 0.01; 1: constant).
        tau: the likelihood's ``τ`` for noiseless data (``σ_y = 0``), in the units of ``y`` (official 0.01).
        sigma_min: lowest annealing level of the Karras schedule (clipped to the prior's range).
        sigma_max: highest annealing level.
        rho: Karras schedule exponent (official 7).
        sigmas: explicit decreasing annealing levels (override the schedule).

    Returns:
        ``ReconstructionResult``: ``x`` (mean of the samples, or the sample), ``samples (P, B, ...)``, ``weights``,
        ``std`` (``P > 1``), ``diagnostics``, ``info``.
    """
    _check(sigma_y, particles, ode_steps, langevin_steps, lr, lr_min_ratio, tau)
    c = start_chains(physics, y, prior, generator, steps, particles, sigma_min, sigma_max, rho, sigmas)
    sig, n, x, y_rep = c.sig, c.n, c.x, c.y_rep
    t = float(sigma_y) if sigma_y > 0 else float(tau)
    norm2 = operator_norm(physics, c.template[:1]) ** 2
    run = SamplerRun("daps", prior, generator, callback, steps=n, particles=c.p, options={
        "ode_steps": int(ode_steps), "langevin_steps": int(langevin_steps), "lr": float(lr),
        "lr_min_ratio": float(lr_min_ratio), "tau": t, "operator_norm": norm2**0.5, "sigma_max": float(sig[0]),
        "sigma_min": float(sig[n - 1]), "sigma_y": float(sigma_y)})
    with torch.no_grad():
        for i in range(n):
            s, s_next = float(sig[i]), float(sig[i + 1])
            x0hat = ode_x0(prior, x, s, ode_steps)
            check_finite(x0hat, "daps", i, "the prior's denoiser returned non-finite values")
            decay = 1.0 - (1.0 - float(lr_min_ratio)) * i / max(n - 1, 1)
            eta = float(lr) * decay / (norm2 / t**2 + 1.0 / s**2)
            x0 = langevin_x0(physics, x0hat, y_rep, s, t, eta, langevin_steps, generator)
            check_bounded(x0, "daps", i, 0.0, "reduce lr (the Langevin step, below 2)")
            x = x0 + s_next * randn(x0.shape, generator, x0.dtype, x0.device) if s_next > 0 else x0
            run.step(i, s, per_item_norm(y_rep - physics.A(x0)).mean())
    return chains_result(run, x0)


def _check(sigma_y, particles, ode_steps, langevin_steps, lr, lr_min_ratio, tau) -> None:
    if not (float(sigma_y) >= 0 and math.isfinite(float(sigma_y))):
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y}")
    for name, v in (("particles", particles), ("ode_steps", ode_steps)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if int(langevin_steps) < 0:
        raise ValueError(f"langevin_steps must be >= 0, got {langevin_steps}")
    if not float(lr) > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0.0 <= float(lr_min_ratio) <= 1.0:
        raise ValueError(f"lr_min_ratio must be in [0, 1], got {lr_min_ratio}")
    if not float(tau) > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
