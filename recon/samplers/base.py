r"""One interface for every posterior sampler: ``reconstruct(physics, y, prior, method=...)``.

Conventions (shared by all methods):

- The measurement model is ``y = physics.A(x0) + σ_y n`` with ``x0`` in the prior's normalised range (so a
  caller gives ``physics.A(prior.normalize(image))`` plus noise) and any deepinv ``Physics``.
- The prior is anything with ``denoise(x, sigma)`` (Tweedie ``E[x0 | x0 + σ n]``), ``score(x, sigma)``,
  ``sigma_min``, ``sigma_max`` and an ``nfe`` counter: a ``recon.priors.DiffusionPrior`` or an analytic
  ``GaussianMixturePrior``. Samplers speak σ (the variance-exploding view); schedules are the prior's business.
- A sampler is a function ``sample_<name>(physics, y, prior, *, sigma_y, steps, particles, generator,
  callback, **options) -> ReconstructionResult``; ``generator`` is a seeded ``torch.Generator`` (all
  randomness comes from it), ``callback(info: dict)`` is called after every step with at least ``step``,
  ``steps``, ``sigma`` and ``residual`` (the command line draws its progress bar from it).
- A NaN or infinite iterate stops the run with ``SamplerDivergence`` naming the step (``check_finite``); no
  partial result is returned as if it were one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from recon.samplers.registry import METHODS, OptionError, get_method, modality_options, recommended_method

__all__ = [
    "METHODS",
    "ReconstructionResult",
    "SamplerDivergence",
    "check_bounded",
    "check_finite",
    "check_noise_level",
    "data_residual",
    "operator_norm",
    "reconstruct",
    "record_step",
]


class SamplerDivergence(FloatingPointError):
    """An iterate became NaN or infinite: the message names the method, the step and what to change."""


@dataclass
class ReconstructionResult:
    """What every sampler returns.

    Attributes:
        x: the reconstruction ``(B, C, ...)`` in the prior's normalised range: a posterior sample (DPS with one
            particle), the weighted posterior mean (SMC, several DPS samples), or the MAP-like estimate
            (RED-diff, TV), as ``method`` defines it.
        samples: ``(P, B, C, ...)`` particles or independent samples, or None.
        weights: ``(P, B)`` normalised weights of ``samples`` (uniform for independent samples), or None.
        std: ``(B, C, ...)`` per-pixel posterior standard deviation from the weighted samples, or None.
        diagnostics: one dict per step: ``step``, ``sigma``, ``residual`` (‖y − A x̂0‖ per batch item, mean),
            ``ess`` (effective sample size, where there are weights), ``nfe`` (network evaluations so far),
            ``seconds``.
        info: summary: ``method``, ``nfe``, ``seconds``, ``steps``, ``particles``, ``options`` and any
            method-specific numbers.
    """

    x: torch.Tensor
    samples: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    std: torch.Tensor | None = None
    diagnostics: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        return int(self.info.get("nfe", 0))

    @property
    def seconds(self) -> float:
        return float(self.info.get("seconds", 0.0))


def check_finite(x: torch.Tensor, method: str, step: int, hint: str = "reduce the step size") -> None:
    """Raise ``SamplerDivergence`` if ``x`` holds NaN or infinite values."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise SamplerDivergence(f"{method}: the iterate diverged at step {step} ({bad} non-finite values); {hint}")


DIVERGENCE_BOUND = 100.0  # |x| beyond 100·(1 + σ) is no image of the prior's [-1, 1] range plus noise σ


def check_bounded(x: torch.Tensor, method: str, step: int, sigma: float = 0.0,
                  hint: str = "reduce the step size") -> None:
    """Raise ``SamplerDivergence`` if ``x`` is finite but far outside the prior's range: ``max |x| >
    DIVERGENCE_BOUND · (1 + sigma)`` (``sigma``: the noise level of the state, 0 for clean estimates). A sampler
    can diverge to huge finite values (a gradient step without a cap) that ``check_finite`` alone would pass."""
    check_finite(x, method, step, hint)
    peak = float(x.detach().abs().max()) if x.numel() else 0.0
    limit = DIVERGENCE_BOUND * (1.0 + float(sigma))
    if peak > limit:
        raise SamplerDivergence(f"{method}: the iterate diverged at step {step} (max |x| = {peak:.3g} > {limit:.3g}, "
                                f"the prior's range is [-1, 1]); {hint}")


def data_residual(physics, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖y − A x0‖₂ per batch item, shape ``(B,)``."""
    r = y - physics.A(x0)
    return r.flatten(1).norm(dim=1)


def operator_norm(physics, template: torch.Tensor, iters: int = 30, seed: int = 0) -> float:
    """‖A‖₂ (largest singular value) by power iteration on ``AᵀA`` from a start drawn with its own seeded
    generator (so callers' random streams are untouched). ``template``: an image of the operator's input shape
    (its first batch item is used)."""
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(tuple(template[:1].shape), generator=g, dtype=torch.float64).to(template.device, template.dtype)
    v = v / v.norm().clamp_min(1e-30)
    s = 0.0
    with torch.no_grad():
        for _ in range(int(iters)):
            w = physics.A_adjoint(physics.A(v))
            s = float(w.norm())
            if s == 0 or not math.isfinite(s):
                break
            v = w / s
    return math.sqrt(max(s, 0.0))


def record_step(diagnostics: list, callback, t0: float, prior, nfe0: int, step: int, steps: int, sigma: float,
                residual: float, **extra) -> dict:
    """Append one step's diagnostics (``step``, ``steps``, ``sigma``, ``residual``, ``nfe`` so far, ``seconds``
    since ``t0``, and ``extra``) and pass a copy to ``callback``; the one place that defines a step record."""
    info = {
        "step": step,
        "steps": steps,
        "sigma": float(sigma),
        "residual": float(residual),
        "nfe": getattr(prior, "nfe", 0) - nfe0,
        "seconds": time.perf_counter() - t0,
        **extra,
    }
    diagnostics.append(info)
    if callback is not None:
        callback(dict(info))
    return info


def weighted_moments(samples: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and standard deviation over the particle axis (``samples (P, B, ...)``, ``weights (P, B)``)."""
    w = weights.reshape(*weights.shape, *([1] * (samples.dim() - 2))).to(samples.dtype)
    mean = (w * samples).sum(0)
    var = (w * (samples - mean) ** 2).sum(0)
    return mean, var.clamp(min=0).sqrt()


# the method table lives in recon.samplers.registry; the options each method name implies, as a plain mapping
METHOD_DEFAULTS: dict[str, dict] = {name: dict(spec.implies) for name, spec in METHODS.items() if spec.implies}


def check_noise_level(sigma_y: float, y: torch.Tensor) -> None:
    """``sigma_y`` must be a finite number ``>= 0`` and consistent with the data: noise of std ``σ_y`` on every
    measured entry makes their RMS at least about ``σ_y``, so a ``σ_y`` above 3 × the RMS of the measured (non-zero)
    entries is another unit's (``ValueError`` naming it)."""
    if not (isinstance(sigma_y, (int, float)) and math.isfinite(sigma_y) and sigma_y >= 0):
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    measured = y.detach()[y.detach() != 0]
    rms = float(measured.double().pow(2).mean().sqrt()) if measured.numel() else 0.0
    if sigma_y > 0 and measured.numel() and sigma_y > 3 * rms:
        raise ValueError(f"sigma_y = {sigma_y:.4g} is inconsistent with the data: the measurements' RMS is only "
                         f"{rms:.4g} (is sigma_y in the units of y?)")


def _is_volume(physics, y: torch.Tensor) -> bool:
    """Whether the reconstruction is a volume ``(B, C, D, H, W)``: the adjoint's output, or the data's shape for a
    physics without one."""
    adjoint = getattr(physics, "A_adjoint", None)
    if adjoint is None:
        return y.dim() == 5
    with torch.no_grad():
        return adjoint(y[:1]).dim() == 5


def reconstruct(
    physics,
    y: torch.Tensor,
    prior=None,
    method: str | None = None,
    sigma_y: float = 0.0,
    seed: int = 0,
    steps: int | None = None,
    particles: int | None = None,
    callback: Callable[[dict], None] | None = None,
    **options,
) -> ReconstructionResult:
    """Reconstruct ``x0`` from ``y = physics.A(x0) + sigma_y * noise`` with ``method``.

    Args:
        physics: any deepinv ``Physics`` (``recon.operators`` or deepinv's own).
        y: measurements, as ``physics.A`` returns them.
        prior: a diffusion prior (not needed by ``analytic`` and ``tv``).
        method: a name of ``recon.samplers.registry.METHODS`` (``"dps"``, ``"red-diff"``, ``"smc"``,
            ``"analytic"``, ``"tv"``, ``"dds3d"``, ...); an unknown name raises ``OptionError``. None: the
            recommended method for ``physics.modality`` on images or volumes
            (``recon.samplers.registry.recommended_method``).
        sigma_y: measurement noise standard deviation (in the units of ``y``).
        seed: seeds every random draw (same seed, same result on the same device).
        steps: number of sampler steps (method default if None).
        particles: number of particles / independent samples (method default if None).
        callback: called with a dict after every step.
        **options: method-specific options (the sampler function's keyword arguments; an unknown or ill-typed
            one raises ``OptionError``, a ``ValueError``, naming the valid ones). Options not given take the
            modality's tuned values where it has them (``recon.samplers.registry.TUNED_OPTIONS``), else the
            sampler's defaults.
    """
    modality = getattr(physics, "modality", None)
    if method is None:  # the operator's adjoint tells a volume, asked only where volumes have their own default
        method = recommended_method(modality)
        if recommended_method(modality, volume=True) != method and _is_volume(physics, y):
            method = recommended_method(modality, volume=True)
    spec = get_method(method)
    check_noise_level(sigma_y, y)
    if spec.needs_prior and prior is None:
        raise OptionError(f"method {method!r} needs a prior (methods without one: "
                          f"{', '.join(m for m, s in METHODS.items() if not s.needs_prior)})")
    options = modality_options(method, modality, spec.check_options(options))  # the registry's values are valid
    fn = spec.sampler
    generator = torch.Generator(device=y.device).manual_seed(int(seed))
    kwargs = {"sigma_y": float(sigma_y), "generator": generator, "callback": callback, **options}
    if steps is not None:
        kwargs["steps"] = int(steps)
    if particles is not None:
        kwargs["particles"] = int(particles)
    nfe0 = getattr(prior, "nfe", 0) if prior is not None else 0
    t0 = time.perf_counter()
    result = fn(physics, y, prior, **kwargs)
    if result.info.get("method", method) != method:  # an alias (mbir3d, dds3d): keep both names
        result.info["algorithm"] = result.info["method"]
    result.info["method"] = method
    if prior is not None:  # a diffusion sampler's output lives in the prior's normalised range
        check_bounded(result.x, method, int(result.info.get("steps", steps or 0) or 0))
    result.info["seconds"] = time.perf_counter() - t0
    result.info["nfe"] = (getattr(prior, "nfe", 0) - nfe0) if prior is not None else 0
    result.info["seed"] = int(seed)
    return result
