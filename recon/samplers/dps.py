r"""DPS — Diffusion Posterior Sampling (Chung, Kim, McCann, Klasky, Ye, ICLR 2023), in the σ (VE) view.

With ``x = x0 + σ n`` and the Tweedie estimate ``x̂0(x) = prior.denoise(x, σ)`` (autograd through the network),
one step from ``σ_i`` to ``σ_{i+1}`` is

1. the unconditional step, ``variant="ddpm"``: the exact VE posterior ``q(x_{i+1} | x_i, x̂0)``,
   mean ``x̂0 + (σ_{i+1}²/σ_i²)(x_i − x̂0)``, variance ``σ_{i+1}² (1 − σ_{i+1}²/σ_i²)`` (the DDPM ancestral step
   written in σ); ``variant="ddim"``: ``x̂0 + sqrt(σ_{i+1}² − c²) ε̂ + c z`` with ``ε̂ = (x_i − x̂0)/σ_i`` and
   ``c = η σ_{i+1} sqrt(1 − σ_{i+1}²/σ_i²)`` (``η = 0`` deterministic, ``η = 1`` is ``"ddpm"``);
2. the guidance step ``x_{i+1} ← x_{i+1} − ζ_i ∇_{x_i} ‖y − A x̂0(x_i)‖²`` with the paper's normalised step
   ``ζ_i = ζ′ / ‖y − A x̂0(x_i)‖`` (App. C.2/D.1), per batch item. Since ``∇‖r‖² = 2‖r‖∇‖r‖`` this is
   ``x ← x − 2ζ′ ∇‖r‖``: the official code's ``scale`` (``condition_methods.py``, which differentiates the
   *unsquared* norm) is ``scale = 2ζ′``. The option is ``zeta`` = the paper's ζ′ (default 1.0, the paper's FFHQ
   Gaussian-noise value, App. D.1; the released task configs use ``scale`` 0.3–0.5, i.e. ζ′ = 0.15–0.25).

VP scaling (``vp_scaling=True``, default). The paper and its ζ′ live in the VP variable ``x_vp = sqrt(ᾱ) x`` with
``ᾱ = 1/(1+σ²)``: its gradient is taken w.r.t. ``x_vp,i`` and the step is applied to ``x_vp,i+1``. Written in the
VE variable the same update is ``x_{i+1} ← x_{i+1} − 2ζ′ sqrt((1+σ_i²)(1+σ_{i+1}²)) ∇_{x_i}‖r‖``; at small σ the
factor is 1. ``vp_scaling=False`` drops it (the guidance then fades at large σ, where ``∂x̂0/∂x ≈ Σ/σ²``).

Operator scaling (``operator_scaling=True``, default). The normalised step is not invariant to the scale of
``A``: with ``A → cA``, ``y → cy`` the step grows by ``c``. The paper's ζ′ was set for operators with ``‖A‖ ≈ 1``
(masks, blurs, downsampling, orthonormal MRI); CT projectors have ``‖A‖`` of tens (40 at 128² with 30 views),
where ζ′ = 1 overshoots by that factor. The step is therefore divided by ``‖A‖₂`` (power iteration, once per
call), which changes nothing for ``‖A‖ = 1`` operators; ``operator_scaling=False`` gives the literal paper step.

Gaussian noise (``discrepancy=True``, opt-in): the step is multiplied by ``max(0, 1 − m σ_y²/‖r‖²)`` (``m`` the
nonzero entries of ``y``), the share of the residual that the noise cannot explain, so the guidance stops once the
estimate fits the data to the noise level (the discrepancy principle) and more noise never fits the noise; σ_y = 0
gives the paper's step, bit-identical. Off by default: much better on the exact posteriors, 0.4 dB worse on the
real head CT of ``benchmarks/README.md`` (``docs/methods/dps.md``).

Poisson noise (``likelihood="poisson"``, the paper's Alg. 2): the norm is ``‖r‖_Λ`` with ``Λ_ii = 1/(2 y_i)``
(``y_i`` clamped at ``poisson_eps``), used both in the gradient and the normalisation; default ζ′ = 0.3 (the
paper's Poisson FFHQ value).

The output is ``x̂0`` of the last step (as the paper's Algorithm 1). ``particles = P`` runs ``P`` independent
chains per measurement as one ``(P·B)`` batch (chain ``p`` of measurement ``b`` is row ``p·B + b``): ``samples`` are
``(P, B, ...)``, weights uniform, ``x`` is their mean (the posterior-mean estimate) when ``P > 1`` and the sample
itself when ``P = 1``; ``std`` is the per-pixel standard deviation of the samples (``P > 1``).

Cost: one network evaluation plus one backward pass per chain and step. The paper runs 1000 steps (1000 NFE); the
default here is 100 Karras-spaced levels (CPU-friendly; use ``steps=1000`` for the paper's setting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from recon.priors.schedules import karras_sigmas
from recon.samplers.base import ReconstructionResult, operator_norm, weighted_moments
from recon.samplers.loop import SamplerRun

__all__ = ["Chains", "ancestral_step", "chains_result", "noise_weight", "sample_dps", "sigma_schedule", "start_chains",
           "tweedie_std"]


# ---------------------------------------------------------------------------------------------------------
# shared helpers (also used by recon.samplers.baselines and recon.samplers.reddiff)
# ---------------------------------------------------------------------------------------------------------
def sigma_schedule(prior, steps: int, sigma_min=None, sigma_max=None, rho: float = 7.0, sigmas=None) -> torch.Tensor:
    """Decreasing float64 noise levels ``σ_0 > … > σ_{n-1}`` followed by ``0`` (``steps + 1`` values).

    ``sigmas`` (a 1D decreasing sequence) is used as given (a final 0 is appended when missing); otherwise
    ``karras_sigmas(steps, sigma_min, sigma_max, rho)`` with the range clipped to the prior's
    ``[sigma_min, sigma_max]`` (the prior's range by default).
    """
    if sigmas is not None:
        s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten()
        if s.numel() < 1 or not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError("sigmas must be a non-empty 1D sequence of finite values >= 0")
        if s[-1] != 0:
            s = torch.cat([s, s.new_zeros(1)])
        if s.numel() < 2 or (s[1:] >= s[:-1]).any():
            raise ValueError("sigmas must be strictly decreasing (high to low noise)")
        return s
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lo_p, hi_p = float(prior.sigma_min), float(prior.sigma_max)
    lo = lo_p if sigma_min is None else min(max(float(sigma_min), lo_p), hi_p)
    hi = hi_p if sigma_max is None else min(max(float(sigma_max), lo_p), hi_p)
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max (after clipping to the prior's range), got {lo}, {hi}")
    return karras_sigmas(int(steps), lo, hi, rho)


def randn(shape, generator: torch.Generator | None, dtype: torch.dtype, device) -> torch.Tensor:
    """Standard normal draws from ``generator`` (on its device), moved to ``device``."""
    gdev = generator.device if generator is not None else torch.device(device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=gdev).to(device)


def ancestral_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    sigma: float,
    sigma_next: float,
    generator: torch.Generator | None,
    eta: float = 1.0,
) -> torch.Tensor:
    """One unconditional step ``σ → σ_next`` given the Tweedie estimate ``x0``.

    ``eta = 1``: the exact VE ancestral (DDPM) step, mean ``x0 + (σ'²/σ²)(x − x0)``, variance
    ``σ'² (1 − σ'²/σ²)``; ``eta = 0``: deterministic DDIM ``x0 + σ' ε̂``; in between, DDIM with stochasticity ``η``.
    ``σ_next = 0`` returns ``x0``.
    """
    if sigma_next <= 0:
        return x0
    r = (sigma_next / sigma) ** 2
    c = float(eta) * sigma_next * max(0.0, 1.0 - r) ** 0.5
    eps = (x - x0) / sigma
    out = x0 + max(sigma_next**2 - c**2, 0.0) ** 0.5 * eps
    if c > 0:
        out = out + c * randn(x.shape, generator, x.dtype, x.device)
    return out


def image_template(physics, y: torch.Tensor) -> torch.Tensor:
    """A zero image of the reconstruction's shape/dtype/device (from ``physics.A_adjoint(y)``)."""
    with torch.no_grad():
        t = physics.A_adjoint(y)
    return torch.zeros_like(t)


def repeat_batch(t: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, ...)`` → ``(P·B, ...)`` with row ``p·B + b`` = item ``b``."""
    return t.repeat(p, *([1] * (t.dim() - 1)))


def per_item_norm(r: torch.Tensor) -> torch.Tensor:
    return r.flatten(1).norm(dim=1)


def finish_samples(samples: torch.Tensor):
    """``(P, B, ...)`` samples → ``x`` (mean for P > 1, the sample for P = 1), uniform weights, std (P > 1)."""
    p, b = samples.shape[:2]
    weights = torch.full((p, b), 1.0 / p, dtype=samples.dtype, device=samples.device)
    if p == 1:
        return samples[0], weights, None
    mean, std = weighted_moments(samples, weights)
    return mean, weights, std


def tweedie_std(sigma: float, data_var: float = 1.0) -> float:
    """Per-pixel error scale ``r`` of the Tweedie estimate at noise level ``σ`` for data of per-pixel variance
    ``data_var``: ``r² = data_var·σ²/(data_var + σ²)``, exact for a Gaussian prior of that variance and an upper
    bound of the Tweedie error for any prior of that variance (the linear estimator's error). The default
    ``data_var = 1`` is the prior's ``[-1, 1]`` range: ``r = σ/sqrt(1 + σ²)`` (ΠGDM's ``r_t``)."""
    s2 = float(sigma) ** 2
    return math.sqrt(float(data_var) * s2 / (float(data_var) + s2))


@dataclass
class Chains:
    """``P`` independent chains per measurement as one ``P·B`` batch (row ``p·B + b``): the noise levels, the image
    template, the repeated measurements and the starting state ``x = σ_max · n``."""

    p: int
    sig: torch.Tensor
    n: int
    template: torch.Tensor
    y_rep: torch.Tensor
    x: torch.Tensor


def start_chains(physics, y: torch.Tensor, prior, generator: torch.Generator | None, steps: int, particles: int,
                 sigma_min: float | None, sigma_max: float | None, rho: float, sigmas) -> Chains:
    """The set-up every diffusion posterior sampler shares (the first draw of ``generator`` is the start)."""
    p = int(particles)
    sig = sigma_schedule(prior, steps, sigma_min, sigma_max, rho, sigmas)
    template = repeat_batch(image_template(physics, y), p)
    x = float(sig[0]) * randn(template.shape, generator, template.dtype, template.device)
    return Chains(p, sig, sig.numel() - 1, template, repeat_batch(y, p).detach(), x)


def chains_result(run: SamplerRun, x0: torch.Tensor, **info) -> ReconstructionResult:
    """The result of ``run.particles`` independent chains: ``x0`` is the ``(P·B, ...)`` batch of final estimates
    (row ``p·B + b``); ``x`` their mean (``P > 1``) or the sample, uniform weights, ``std``."""
    samples = x0.reshape(run.particles, x0.shape[0] // run.particles, *x0.shape[1:])
    xm, weights, std = finish_samples(samples)
    return run.result(xm, samples=samples, weights=weights, std=std, **info)


# ---------------------------------------------------------------------------------------------------------
# DPS
# ---------------------------------------------------------------------------------------------------------
def sample_dps(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 100,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    zeta: float | None = None,
    variant: str = "ddpm",
    eta: float = 0.0,
    likelihood: str = "gaussian",
    vp_scaling: bool = True,
    operator_scaling: bool = True,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    sigmas=None,
    poisson_eps: float = 1e-3,
    discrepancy: bool = False,
) -> ReconstructionResult:
    """Diffusion Posterior Sampling (module docstring for the update and the ζ′ / ``scale`` relation).

    Args:
        physics: any differentiable deepinv ``Physics`` (linear or not).
        y: measurements ``(B, ...)``.
        prior: ``denoise(x, σ)`` (differentiable), ``sigma_min``, ``sigma_max``, ``nfe``.
        sigma_y: measurement noise std in the units of ``y``; used by ``discrepancy`` only (the paper's normalised
            step does not use it).
        steps: number of noise levels = network evaluations per chain (paper: 1000).
        particles: ``P`` independent DPS chains per measurement (one batch of ``P·B``).
        generator: the seeded ``torch.Generator`` all randomness comes from.
        callback: called after every step with ``step``, ``steps``, ``sigma``, ``residual``, ``nfe``, ``seconds``.
        zeta: the paper's ζ′ (default 1.0 Gaussian, 0.3 Poisson); official-code ``scale = 2 ζ′``.
        variant: ``"ddpm"`` (ancestral) or ``"ddim"`` (with ``eta``, default 0: deterministic).
        likelihood: ``"gaussian"`` (‖r‖) or ``"poisson"`` (‖r‖_Λ, Λ_ii = 1/(2 y_i)).
        vp_scaling: express the step in the VP variable as the paper does (see the module docstring).
        operator_scaling: divide the step by ``‖A‖₂`` so that ζ′ means the same for any operator scale.
        sigma_min, sigma_max, rho: Karras schedule (clipped to the prior's range); ``sigmas`` overrides it.
        poisson_eps: floor of ``y_i`` in the Poisson weights ``Λ_ii = 1/(2 y_i)``.
        discrepancy: scale the Gaussian step by ``max(0, 1 − m σ_y²/‖r‖²)`` (``m``: nonzero entries of ``y``): no step
            once the residual is at the noise level (the discrepancy principle; default off, ``docs/methods/dps.md``).

    Returns:
        ``ReconstructionResult``: ``x`` (mean of the samples, or the sample when ``P = 1``), ``samples
        (P, B, ...)``, uniform ``weights``, ``std`` (``P > 1``), per-step ``diagnostics``.
    """
    zeta, eta_step, p = _check_dps(variant, likelihood, zeta, eta, particles)
    sig = sigma_schedule(prior, steps, sigma_min, sigma_max, rho, sigmas)
    n = sig.numel() - 1
    template = repeat_batch(image_template(physics, y), p)
    norm_a = operator_norm(physics, template[:1]) if operator_scaling else 1.0
    if not norm_a > 0:
        raise ValueError("the physics maps everything to zero (‖A‖ = 0)")
    run = SamplerRun("dps", prior, generator, callback, steps=n, particles=p, options={
        "zeta": float(zeta), "scale": 2.0 * float(zeta), "variant": variant, "eta": eta_step,
        "likelihood": likelihood, "vp_scaling": bool(vp_scaling), "operator_norm": norm_a,
        "sigma_max": float(sig[0]), "sigma_min": float(sig[n - 1]), "sigma_y": float(sigma_y),
        "discrepancy": bool(discrepancy) and likelihood == "gaussian"})
    y_rep = repeat_batch(y, p).detach()
    lam = 1.0 / (2.0 * y_rep.clamp_min(poisson_eps)) if likelihood == "poisson" else None
    noise_energy = _noise_energy(y_rep, sigma_y, discrepancy and lam is None)
    x = float(sig[0]) * randn(template.shape, generator, template.dtype, template.device)
    x0 = x
    for i in range(n):
        s, s_next = float(sig[i]), float(sig[i + 1])
        x0, r, grad = _guidance(physics, prior, x, s, y_rep, lam)
        with torch.no_grad():
            x_next = ancestral_step(x.detach(), x0, s, s_next, generator, eta_step)
            if s_next > 0:
                factor = ((1 + s * s) * (1 + s_next * s_next)) ** 0.5 if vp_scaling else 1.0
                weight = noise_weight(r, noise_energy, grad.dim())
                x_next = x_next - 2.0 * float(zeta) * factor / norm_a * weight * grad
        x = x_next.detach()
        run.step(i, s, per_item_norm(r.detach()).mean(), x=x, hint="reduce zeta (the guidance step) or use more steps")
    return chains_result(run, x0)


def _noise_energy(y: torch.Tensor, sigma_y: float, on: bool) -> torch.Tensor | float:
    """``m σ_y²`` per batch row: the expected ``‖r‖²`` of pure noise, ``m`` the row's nonzero entries of ``y`` (the
    entries that carry noise: structural zeros, such as unsampled k-space, are exactly 0); 0 when off."""
    if not on or not float(sigma_y) > 0:
        return 0.0
    return (y != 0).flatten(1).sum(1).to(y.dtype) * float(sigma_y) ** 2


def noise_weight(r: torch.Tensor, noise_energy: torch.Tensor | float, ndim: int) -> torch.Tensor | float:
    """``max(0, 1 − noise_energy/‖r‖²)`` per batch row, shaped ``(B, 1, ...)`` with ``ndim`` axes; 1.0 when
    ``noise_energy`` is 0 (so the step is bit-identical to the paper's)."""
    if isinstance(noise_energy, float) and noise_energy == 0.0:
        return 1.0
    rn2 = r.detach().flatten(1).pow(2).sum(1).clamp_min(torch.finfo(r.dtype).tiny)
    return (1.0 - noise_energy / rn2).clamp_min(0.0).reshape(-1, *([1] * (ndim - 1)))


def _check_dps(variant: str, likelihood: str, zeta: float | None, eta: float, particles: int) -> tuple:
    """ζ′ (its default by likelihood), the re-noising η of the variant, and the particle count, checked."""
    if variant not in ("ddpm", "ddim"):
        raise ValueError(f"variant must be 'ddpm' or 'ddim', got {variant!r}")
    if likelihood not in ("gaussian", "poisson"):
        raise ValueError(f"likelihood must be 'gaussian' or 'poisson', got {likelihood!r}")
    if zeta is None:
        zeta = 1.0 if likelihood == "gaussian" else 0.3
    if not zeta >= 0:
        raise ValueError(f"zeta must be >= 0, got {zeta}")
    if int(particles) < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    return zeta, (1.0 if variant == "ddpm" else float(eta)), int(particles)


def _guidance(physics, prior, x: torch.Tensor, s: float, y: torch.Tensor, lam: torch.Tensor | None) -> tuple:
    """Tweedie's x̂0 at σ = ``s``, the residual ``y − A x̂0`` and ∇ₓ of its norm (``‖r‖``, or ``‖r‖_Λ`` for the
    Poisson likelihood)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        x0 = prior.denoise(x, s)
        r = y - physics.A(x0)
        norm = (lam * r**2).flatten(1).sum(1).clamp_min(0).sqrt() if lam is not None else per_item_norm(r)
        (grad,) = torch.autograd.grad(norm.sum(), x)
    return x0.detach(), r, grad
