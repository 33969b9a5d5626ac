r"""Ensembles of independent reconstructions: ``K`` runs of a base sampler with independent seeds.

``sample_ensemble(physics, y, prior, base="dps", particles=K)`` runs the base sampler (any registered method:
``dps``, ``dds``, ``red-diff``, ...) ``ceil(K / per_run)`` times, each run with its own seed drawn from
``generator`` and ``per_run`` chains (the base sampler's ``particles``; chains of one run are independent too,
they only share a batch), and stacks the ``K`` outputs: ``samples (K, B, ...)``, uniform ``weights``, ``x`` their
mean and ``std`` their per-pixel standard deviation. This is deepinv's "mean and variance of repeated runs"; for
a sampler that draws from the posterior, the ``K`` outputs are i.i.d. posterior samples and nothing can
degenerate (the effective sample size is ``K``). Their spread is as good as the base sampler's posterior: a
mode-seeking or deterministic base (RED-diff, DDIM with ``eta = 0``) gives little or no spread, and that is
reported (``info["warnings"]``, ``info["degenerate"]``) rather than returned silently.

Cost: the sum of the runs' network evaluations (``info["nfe"]``, per run in ``info["nfe_per_run"]``).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

import torch

from recon.samplers.base import ReconstructionResult, check_finite, record_step, weighted_moments

__all__ = ["base_sampler", "sample_ensemble"]


def base_sampler(name: str | Callable) -> Callable:
    """The sampler function registered under ``name`` (``recon.samplers.registry`` or ``base.METHODS``); a callable
    is returned as is."""
    if callable(name):
        return name
    try:
        from recon.samplers.registry import get_method
    except ImportError:  # older layout: base.METHODS maps name -> (module, function)
        from recon.samplers.base import METHODS

        if name not in METHODS:
            raise ValueError(f"unknown base method {name!r}; choose one of {', '.join(METHODS)}") from None
        module, function = METHODS[name]
        return getattr(importlib.import_module(f"recon.samplers.{module}"), function)
    try:
        return get_method(name).sampler
    except ValueError as exc:
        raise ValueError(f"ensemble: unknown base method {name!r} ({exc})") from None


def _one_run(fn, physics, y, prior, kw: dict, seed: int, run: int, runs: int, callback):
    """One base run with its own seeded generator; forwards its step callbacks rescaled to the whole ensemble."""
    gen = torch.Generator(device=y.device).manual_seed(int(seed))

    def forward(info: dict) -> None:
        steps = int(info.get("steps", 1) or 1)
        callback({**info, "step": run * steps + int(info.get("step", 0)), "steps": runs * steps, "run": run + 1})

    result = fn(physics, y, prior, generator=gen, callback=None if callback is None else forward, **kw)
    samples = result.samples if result.samples is not None else result.x[None]
    if result.weights is not None and result.samples is not None:
        weights = result.weights.to(torch.float64)
    else:
        weights = torch.full(samples.shape[:2], 1.0 / samples.shape[0], dtype=torch.float64, device=samples.device)
    return result, samples, weights


def sample_ensemble(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int | None = None,
    particles: int = 16,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    base: str = "hybrid",
    per_run: int = 1,
    min_spread: float = 1e-6,
    **base_options,
) -> ReconstructionResult:
    """``particles`` independent runs of the ``base`` sampler; their mean, spread and summed cost.

    Args:
        physics: the forward operator (whatever the base sampler accepts).
        y: measurements ``(B, ...)``.
        prior: the diffusion prior, passed to the base sampler.
        sigma_y: measurement noise standard deviation, passed to the base sampler.
        steps: steps of every base run (None: the base sampler's default).
        particles: ``K``, the number of samples in the ensemble (default 16: the size the built-in priors'
            calibrations are fitted for, ``recon.samplers.registry.UNCERTAINTY_SAMPLES``).
        generator: the seeded ``torch.Generator`` the runs' seeds are drawn from.
        callback: called with the base sampler's step records, ``step``/``steps`` counted over the whole ensemble
            and ``run`` (1-based).
        base: the registered method run ``K`` times (default ``"hybrid"``, the recommended method of every
            modality that samples from a prior; ``"dps"``, ``"dds"``, ...; from Python also a sampler function). A
            weighted base (``smc``, ``fps``) keeps its weights, each run counting equally.
        per_run: chains per base run (the base's ``particles``; 1: one seed per sample, larger: fewer, batched
            runs, faster on CPU).
        min_spread: a mean std below this (in the prior's normalised units) is reported as a degenerate
            (zero-spread) ensemble.
        **base_options: passed unchanged to the base sampler (e.g. ``zeta`` for DPS, ``eta`` for DDS).

    Returns:
        ``ReconstructionResult``: ``samples (K, B, ...)``, ``weights (K, B)`` (uniform unless the base weights),
        ``x`` the weighted mean, ``std`` the per-pixel standard deviation; ``diagnostics`` one record per run;
        ``info``: ``base``, ``runs``, ``per_run``, ``nfe`` (sum over runs), ``nfe_per_run``, ``ess_final``
        (``K`` for unweighted bases), ``degenerate``, ``warnings``.
    """
    t0 = time.perf_counter()
    nfe0 = getattr(prior, "nfe", 0)
    k, per_run = int(particles), int(per_run)
    if k < 1 or per_run < 1:
        raise ValueError(f"particles and per_run must be >= 1, got {particles} and {per_run}")
    if base == "ensemble":
        raise ValueError("ensemble: the base method cannot be the ensemble itself")
    fn = base_sampler(base)
    runs = -(-k // per_run)
    seeds = torch.randint(0, 2**62, (runs,), generator=generator, device=generator.device if generator else None)
    kw = {"sigma_y": float(sigma_y), **base_options}
    if steps is not None:
        kw["steps"] = int(steps)
    parts, wparts, diagnostics, nfe_runs, infos = [], [], [], [], []
    name = getattr(base, "__name__", base)
    for r in range(runs):
        n = min(per_run, k - r * per_run)
        nfe_r = getattr(prior, "nfe", 0)
        res, samples, w = _one_run(fn, physics, y, prior, {**kw, "particles": n}, int(seeds[r]), r, runs, callback)
        check_finite(samples, f"ensemble({name})", r + 1, "the base sampler diverged; see its own options")
        parts.append(samples.detach())
        wparts.append(w * samples.shape[0])  # each sample counts once; a weighted run shares its count
        nfe_runs.append(getattr(prior, "nfe", 0) - nfe_r)
        infos.append(res.info)
        resid = float((y - physics.A(samples.mean(0))).flatten(1).norm(dim=1).mean())
        record_step(diagnostics, None, t0, prior, nfe0, r + 1, runs, 0.0, resid, run_nfe=nfe_runs[-1],
                    ess=float(sum(p.shape[0] for p in parts)))
    samples = torch.cat(parts)
    weights = torch.cat(wparts)
    weights = (weights / weights.sum(0, keepdim=True)).to(samples.dtype)
    mean, std = weighted_moments(samples, weights)
    ess = (1.0 / (weights**2).sum(0)).tolist()
    warnings, degenerate = [], False
    if samples.shape[0] > 1 and min(ess) < max(0.1 * samples.shape[0], 2.0):
        degenerate = True
        warnings.append(f"ensemble of {name}: the weights of its runs degenerated (effective sample size "
                        f"{min(ess):.2f} of {samples.shape[0]})")
    if k > 1 and float(std.mean()) < min_spread:
        degenerate = True
        warnings.append(f"ensemble of {name}: the {k} samples are (nearly) identical (mean std {float(std.mean()):.2g}"
                        f" < {min_spread:g}); the base sampler is deterministic or mode-seeking, the std map is not "
                        f"an uncertainty")
    info = {
        "method": "ensemble", "base": name, "steps": infos[0].get("steps", steps), "particles": k, "runs": runs,
        "per_run": per_run, "nfe": getattr(prior, "nfe", 0) - nfe0, "nfe_per_run": nfe_runs,
        "seconds": time.perf_counter() - t0, "ess_final": ess, "degenerate": degenerate,
        "warnings": warnings, "seeds": [int(s) for s in seeds], "options": {"base": name, **base_options},
    }
    return ReconstructionResult(x=mean, samples=samples, weights=weights, std=std, diagnostics=diagnostics, info=info)
