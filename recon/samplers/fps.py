r"""FPS — Filtering Posterior Sampling (Dou & Song, ICLR 2024), in the σ (VE) view, for linear Gaussian problems.

The idea: noise the measurement along with the image. If ``x_σ = x_0 + σ n`` then ``y_σ = y + σ A n`` satisfies
``y_σ = A x_σ + σ_y ε`` with the *same* likelihood ``N(y_σ; A x_σ, σ_y² I)`` at every level. FPS draws one
sequence ``y_{σ_0}, …, y_{σ_n} = y`` matched to the reverse diffusion and runs a particle filter on the reverse
chain with ``y_σ`` as the observation of ``x_σ``: no Tweedie approximation of ``p(y | x_σ)``, and every step
conditions only on the *increment* of information, which is what keeps the weights from collapsing in high
dimension (a particle is never asked to explain all of ``y`` at once with a far-off state).

One step ``σ_i → σ_{i+1}`` (``r = σ_{i+1}²/σ_i²``, ``c = η σ_{i+1} sqrt(1 − r)``, ``a = sqrt(σ_{i+1}² − c²)/σ_i``):

1. measurement bridge, shared by the particles of one measurement: ``y_{i+1} = y + a (y_i − y) + c A ε``
   (``ε ~ N(0, I)`` image-shaped; the DDIM(η) step applied to ``y`` with "clean" value ``y``), started at
   ``y_0 = y + σ_0 A ε``. Its marginals are ``y + σ_i A n``, as the forward process needs.
2. prior transition: ``p(x' | x) = N(m, c² I)``, ``m = x̂0 + a (x − x̂0)`` (the same DDIM(η) step; ``η = 1``: the
   VE ancestral/DDPM step); ``x̂0 = prior.denoise(x, σ_i)``, no gradient through the network.
3. weights (fully adapted): ``log w ← log w + log N(y_{i+1}; A m, σ_y² I + c² AAᵀ)`` (the marginal likelihood of the
   proposal), computed before the move; resampling (systematic by default) when ``ESS/P < ess_threshold``
   (default 1: every step but when all weights are equal, as the official code resamples every step).
4. move: ``x' ~ N(m, c²I) · N(y_{i+1}; A x', σ_y²I)``, the exact Gaussian product, sampled by perturb-and-solve
   with batched CG on ``I/c² + AᵀA/σ_y²`` (``cg_iters``, ``cg_tol``; a dense SVD of ``A`` for ``d ≤ dense_limit``).

Initial particles: ``N(m_0, ρ²I) · N(y_0; A x, σ_y²I)`` with ``ρ² = σ_0² + Var(x_0)`` (the prior's moments where it
has them, as ``sample_smc``'s Stage I), zero log-weights. The last level ``σ_n = 0`` has ``c = 0``: the particles
become their Tweedie estimates and are weighted by the exact likelihood ``N(y; A x̂0, σ_y²)``. The result is the
final weighted ensemble (no last resampling): ``x`` the weighted mean, ``std`` the weighted std.

Differences from the official code (``ZehaoDou-official/FPS-SMC-2023``; InverseBench ``algo/fps.py``): VE σ-levels
(Karras spacing) instead of VP steps; the measurement bridge is written in measurement space (``A ε``) instead of
the SVD basis, and the Gaussian product is sampled with CG, so any linear operator works (CT, MRI, masks), at the
price of an inexact proposal when CG is capped on ill-conditioned operators (CT at small σ_y); ESS-triggered
systematic instead of every-step multinomial resampling. ``σ_y = 0`` is replaced by ``min_sigma_y``.

Cost: one network evaluation per particle and step (``steps · P`` NFE), no backward pass; plus ``2·cg_iters``
operator applications per particle and step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from recon.samplers.base import ReconstructionResult, check_bounded, check_finite, record_step, weighted_moments
from recon.samplers.dps import randn, sigma_schedule
from recon.samplers.smc import (
    RESAMPLERS,
    _CGTilt,
    _DenseTilt,
    _init_moments,
    degeneracy_report,
    normalise_log_weights,
    resample_particles,
)

__all__ = ["sample_fps"]

_F64 = torch.float64


class _Bridge:
    """The noised measurement sequence ``y_i`` (one per measurement, repeated over the particles)."""

    def __init__(self, physics, y: torch.Tensor, sigma0: float, n_p: int, generator):
        self.physics, self.y, self.n_p, self.gen = physics, y, n_p, generator
        self.cur = y + sigma0 * self._noise()

    def _noise(self) -> torch.Tensor:
        with torch.no_grad():
            tmpl = self.physics.A_adjoint(self.y)
            return self.physics.A(randn(tmpl.shape, self.gen, tmpl.dtype, tmpl.device))

    def step(self, a: float, c: float) -> torch.Tensor:
        nxt = self.y + a * (self.cur - self.y)
        self.cur = nxt + c * self._noise() if c > 0 else nxt
        return self.rep()

    def rep(self) -> torch.Tensor:
        return self.cur.repeat(self.n_p, *([1] * (self.cur.dim() - 1)))


def _ddim_coefficients(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """``(a, c)``: the DDIM(η) step ``σ → σ'`` is ``x̂0 + a (x − x̂0) + c z``."""
    if s_next <= 0:
        return 0.0, 0.0
    r = (s_next / s) ** 2
    c = eta * s_next * math.sqrt(max(0.0, 1.0 - r))
    return math.sqrt(max(s_next**2 - c**2, 0.0)) / s, c


def _pinv(physics, r: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """``A⁺ r`` per batch row: conjugate gradients on ``AᵀA z = Aᵀ r`` from ``z = 0`` (the minimum-norm solution;
    consistent for any ``r``, also outside the range of ``A``)."""
    def dot(u, v):
        return (u * v).flatten(1).sum(1)

    b = physics.A_adjoint(r)
    tiny = torch.finfo(b.dtype).tiny
    z, res, rs = torch.zeros_like(b), b.clone(), dot(b, b)
    p, stop = res.clone(), tol**2 * rs.clamp_min(tiny)
    for _ in range(int(iters)):
        if bool((rs <= stop).all()):
            break
        ap = physics.A_adjoint(physics.A(p))
        alpha = torch.where(rs <= stop, torch.zeros_like(rs), rs / dot(p, ap).clamp_min(tiny))
        alpha = alpha.reshape(-1, *([1] * (b.dim() - 1)))
        z = z + alpha * p
        res = res - alpha * ap
        rs_new = dot(res, res)
        p = res + (rs_new / rs.clamp_min(tiny)).reshape(-1, *([1] * (b.dim() - 1))) * p
        rs = rs_new
    return z


def _check(sigma_y: float, steps: int, particles: int, eta: float, ess_threshold: float, resample: str,
           linear_solver: str, y: torch.Tensor) -> None:
    if not (sigma_y >= 0 and math.isfinite(sigma_y)):
        raise ValueError(f"fps: sigma_y must be finite and >= 0, got {sigma_y}")
    if int(steps) < 1 or int(particles) < 1:
        raise ValueError(f"fps: steps and particles must be >= 1, got {steps} and {particles}")
    if not 0 < eta <= 1:
        raise ValueError(f"fps: eta must be in (0, 1] (eta = 0 leaves nothing to filter), got {eta}")
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"fps: ess_threshold must be in [0, 1], got {ess_threshold}")
    if resample not in RESAMPLERS:
        raise ValueError(f"fps: resample must be one of {', '.join(RESAMPLERS)}, got {resample!r}")
    if linear_solver not in ("auto", "dense", "cg"):
        raise ValueError(f"fps: linear_solver must be 'auto', 'dense' or 'cg', got {linear_solver!r}")
    if y.dim() < 2 or not y.dtype.is_floating_point:
        raise ValueError(f"fps: y must be a real floating tensor with a batch axis, got {tuple(y.shape)} {y.dtype}")


@dataclass
class _Filter:
    """The particle system: problem, layout, noise levels, bridge, weights and records."""

    physics: object
    y: torch.Tensor
    prior: object
    generator: torch.Generator | None
    callback: Callable[[dict], None] | None
    n_p: int
    image_shape: tuple
    sig: list
    eta: float
    s2y: float
    ess_threshold: float
    resampler: Callable
    cg_iters: int
    cg_tol: float
    t0: float
    nfe0: int
    data_var: float = 0.0
    resamplings: int = 0
    diagnostics: list = field(default_factory=list)

    @property
    def n_b(self) -> int:
        return int(self.y.shape[0])

    def pb(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.n_p, self.n_b, *t.shape[1:])

    def reweight(self, logw: torch.Tensor, state: dict, step: int):
        check_finite(logw, "fps", step, "the log-weights overflowed; check sigma_y")
        logw, weights, ess, events = resample_particles(logw, state, self.ess_threshold, self.resampler,
                                                        self.generator)
        self.resamplings += events
        return logw, weights, ess, events

    def record(self, step: int, weights: torch.Tensor, x0: torch.Tensor, ess: torch.Tensor, events: int) -> None:
        w = weights.to(x0.dtype).reshape(self.n_p, self.n_b, *([1] * len(self.image_shape)))
        mean = (w * self.pb(x0)).sum(0)
        resid = float((self.y - self.physics.A(mean)).flatten(1).norm(dim=1).mean())
        record_step(self.diagnostics, self.callback, self.t0, self.prior, self.nfe0, step, len(self.sig) - 1,
                    self.sig[step], resid, ess=float(ess.mean()), ess_per_item=ess.tolist(), resampled=events > 0)


def _initial(f: _Filter, bridge: _Bridge, m0: torch.Tensor, var0: float, use_dense: bool):
    """Particles from ``N(m_0, ρ²I)·N(y_0; A x, σ_y²I)`` and the Gaussian-product solver."""
    y0 = bridge.rep()
    tilt = (_DenseTilt(f.physics, y0, f.image_shape) if use_dense
            else _CGTilt(f.physics, y0, f.cg_tol, f.cg_iters))
    x = tilt.sample(m0.expand(f.n_p * f.n_b, *f.image_shape), f.sig[0] ** 2 + var0, f.s2y, f.generator)
    check_finite(x, "fps", 0, "check sigma_y and the operator")
    return x, tilt


def _run_carried(f: _Filter, bridge: _Bridge, m0: torch.Tensor, var0: float):
    """Exact filtering: each particle carries its measurement error ``e = y_σ − A x_σ`` (the same at every level)
    and moves under the constraint ``A x' = y' − e`` (``x' = q + A⁺(y' − e − A q)``, ``q ~ N(m, c²I)``); weight
    ``N(y' − e; A m, c² AAᵀ)``, i.e. ``−‖A⁺(y' − e − A m)‖²/(2c²)``. Start: ``e ~ N(0, σ_y²I)``, ``x`` from
    ``N(m_0, ρ²I)`` under the constraint, weighted by ``N(y_0 − e; A m_0, ρ² AAᵀ)``."""
    phys, n = f.physics, f.n_p * f.n_b
    y0 = bridge.rep()
    e = f.s2y**0.5 * randn(y0.shape, f.generator, y0.dtype, y0.device)
    m0 = m0.expand(n, *f.image_shape)
    q = m0 + math.sqrt(f.sig[0] ** 2 + var0) * randn(m0.shape, f.generator, m0.dtype, m0.device)
    x = q + _pinv(phys, y0 - e - phys.A(q), f.cg_iters, f.cg_tol)
    quad = _pinv(phys, y0 - e - phys.A(m0), f.cg_iters, f.cg_tol).pow(2).flatten(1).sum(1).to(_F64)
    logw = -f.pb(quad) / (2 * (f.sig[0] ** 2 + var0))
    check_finite(x, "fps", 0, "check sigma_y and the operator")
    weights, x0 = torch.full_like(logw, 1.0 / f.n_p), x
    for i in range(len(f.sig) - 1):
        with torch.no_grad():
            x0 = f.prior.denoise(x, f.sig[i])
        a, c = _ddim_coefficients(f.sig[i], f.sig[i + 1], f.eta)
        m = x0 + a * (x - x0)
        y_next = bridge.step(a, c)
        post_var = f.sig[i] ** 2 * f.data_var / (f.sig[i] ** 2 + f.data_var)  # Var(x0 | x_σ), isotropic Gaussian
        c = math.sqrt(c**2 + (1 - a) ** 2 * post_var)  # the reverse kernel's variance, x̂0's uncertainty included
        r = y_next - e - phys.A(m)
        quad = _pinv(phys, r, f.cg_iters, f.cg_tol).pow(2).flatten(1).sum(1).to(_F64)  # rᵀ(AAᵀ)⁺r = ‖A⁺r‖²
        logw = logw - f.pb(quad) / (2 * c**2)
        state = {"m": m, "e": e, "x0": x0}
        logw, weights, ess, events = f.reweight(logw, state, i + 1)
        m, e, x0 = state["m"], state["e"], state["x0"]
        q = m + c * randn(m.shape, f.generator, m.dtype, m.device)
        x = q + _pinv(phys, y_next - e - phys.A(q), f.cg_iters, f.cg_tol)
        check_bounded(x, "fps", i + 1, f.sig[i + 1], "use more steps or more cg_iters")
        f.record(i + 1, weights, x0, ess, events)
    return x, logw


def _run_fresh(f: _Filter, bridge: _Bridge, x: torch.Tensor, tilt):
    """The published FPS: every level's ``y_σ`` is an observation of ``x_σ`` with fresh noise ``σ_y`` (counts the
    measurement noise once per level: the posterior comes out too narrow for noisy data)."""
    logw = torch.zeros(f.n_p, f.n_b, dtype=_F64, device=x.device)
    for i in range(len(f.sig) - 1):
        with torch.no_grad():
            x0 = f.prior.denoise(x, f.sig[i])
        a, c = _ddim_coefficients(f.sig[i], f.sig[i + 1], f.eta)
        m = x0 + a * (x - x0)
        tilt.retarget(bridge.step(a, c))
        logw = logw + f.pb(tilt.log_norm(m, c**2, f.s2y))
        state = {"m": m, "x0": x0}
        logw, weights, ess, events = f.reweight(logw, state, i + 1)
        x = tilt.sample(state["m"], c**2, f.s2y, f.generator) if c > 0 else state["m"]
        check_bounded(x, "fps", i + 1, f.sig[i + 1], "use more steps or a larger sigma_y")
        f.record(i + 1, weights, state["x0"], ess, events)
    return x, logw


def sample_fps(
    physics, y: torch.Tensor, prior, *, sigma_y: float = 0.0, steps: int = 50, particles: int = 16,
    generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
    noise: str = "carried", eta: float = 1.0, ess_threshold: float = 0.5, resample: str = "systematic",
    min_sigma_y: float = 1e-3, sigma_max: float | None = None, sigma_min: float | None = None, rho: float = 7.0,
    linear_solver: str = "auto", dense_limit: int = 1024, cg_tol: float = 1e-6, cg_iters: int = 50,
    data_var: float | None = None, degenerate_below: float = 0.1,
) -> ReconstructionResult:
    """Filtering posterior sampling: a particle filter on the reverse diffusion with noised measurements.

    Args:
        physics: a linear deepinv ``Physics`` (``A``, ``A_adjoint``; real-valued measurements).
        y: measurements ``(B, ...)``; each item gets its own particle system and measurement bridge.
        prior: ``denoise``/``sigma_min``/``sigma_max`` (and ``mean``/``variance`` where known).
        sigma_y: measurement noise standard deviation (``0``: noiseless).
        steps: network evaluations per particle: ``steps + 1`` Karras levels from ``sigma_max`` to ``sigma_min``
            (``noise="fresh"``: ``steps`` levels, then ``σ = 0``).
        particles: ``P`` particles per measurement.
        generator: the seeded ``torch.Generator`` every random draw comes from.
        callback: called after every step with ``step``, ``steps``, ``sigma``, ``residual``, ``ess``, ``resampled``.
        noise: ``"carried"`` (default; exact: each particle carries its measurement error, see the module
            docstring) or ``"fresh"`` (the published FPS: fresh noise ``σ_y`` at every level; too narrow for noisy
            data).
        eta: DDIM stochasticity of the chain and the bridge (1: the ancestral step; official code η² = 0.95).
        ess_threshold: resample when ``ESS/P`` is below it (1: whenever the weights are not all equal, as the
            official code's every-step resampling).
        resample: ``"systematic"`` or ``"multinomial"`` (the official code's).
        min_sigma_y: ``"fresh"``: the likelihood's noise level when ``sigma_y`` is 0 (noiseless data).
        sigma_max: top noise level (default: the prior's).
        sigma_min: lowest non-zero noise level (default: the prior's).
        rho: Karras spacing exponent.
        linear_solver: ``"fresh"``: ``"dense"`` (SVD of the formed matrix), ``"cg"`` or ``"auto"`` (dense when
            ``d <= dense_limit``) for the Gaussian products (``"carried"`` uses CG for ``A⁺``).
        dense_limit: largest image size (pixels) for the dense SVD.
        cg_tol: conjugate-gradient relative tolerance.
        cg_iters: conjugate-gradient iteration cap (``(AAᵀ)⁺`` and the Gaussian products; inexact when reached).
        data_var: per-pixel data variance ``v`` of the isotropic ``Var(x0 | x_σ) ≈ σ²v/(σ² + v)`` added to the
            reverse kernel's variance (``"carried"``; default: the prior's mean ``variance`` if it has one, else
            0.25); 0: the plain DDIM variance.
        degenerate_below: the final ``ESS/P`` below which (or an ESS below 2) the result is flagged
            ``degenerate`` with a warning.

    Returns:
        ``ReconstructionResult``: ``samples (P, B, ...)``, ``weights (P, B)``, ``x`` the weighted mean, ``std`` the
        weighted std; ``diagnostics`` per step with ``ess`` (mean over items, before resampling) and
        ``ess_per_item``; ``info``: ``ess_final`` (per item: the last step's ESS before resampling, or the final
        weights' if lower), ``resamplings``, ``degenerate``, ``warnings``, ``nfe``.
    """
    t0, nfe0 = time.perf_counter(), getattr(prior, "nfe", 0)
    _check(sigma_y, steps, particles, eta, ess_threshold, resample, linear_solver, y)
    if noise not in ("carried", "fresh"):
        raise ValueError(f"fps: noise must be 'carried' or 'fresh', got {noise!r}")
    n_p, steps = int(particles), int(steps)
    sig = sigma_schedule(prior, steps + (noise == "carried"), sigma_min, sigma_max, rho).tolist()
    sig = sig[:-1] if noise == "carried" else sig  # carried: stop at sigma_min (the constraint needs c > 0)
    with torch.no_grad():
        image_shape = tuple(physics.A_adjoint(y[:1]).shape[1:])
    m0, var0 = _init_moments(prior, image_shape, y.dtype, y.device, None, None)
    if data_var is None:
        data_var = var0 if isinstance(getattr(prior, "variance", None), torch.Tensor) else 0.25
    s2y = max(float(sigma_y), 0.0 if noise == "carried" else float(min_sigma_y)) ** 2
    f = _Filter(physics, y, prior, generator, callback, n_p, image_shape, sig, float(eta), s2y,
                float(ess_threshold), RESAMPLERS[resample],
                int(cg_iters), float(cg_tol), t0, nfe0, float(data_var))
    bridge = _Bridge(physics, y, sig[0], n_p, generator)
    use_dense = linear_solver == "dense" or (linear_solver == "auto" and math.prod(image_shape) <= dense_limit)
    if noise == "carried":
        x, logw = _run_carried(f, bridge, m0, var0)
    else:
        x, tilt = _initial(f, bridge, m0, var0, use_dense)
        x, logw = _run_fresh(f, bridge, x, tilt)
    logw, weights, ess = normalise_log_weights(logw)
    last = torch.as_tensor(f.diagnostics[-1]["ess_per_item"], dtype=_F64) if f.diagnostics else ess
    ess_final = torch.minimum(ess.cpu(), last)
    samples = x.detach().reshape(n_p, f.n_b, *image_shape)
    mean, std = weighted_moments(samples, weights)
    degenerate, warnings = degeneracy_report(ess_final, n_p, degenerate_below, "fps")
    info = {"method": "fps", "steps": steps, "particles": n_p, "resamplings": f.resamplings,
            "ess_final": ess_final.tolist(), "degenerate": degenerate, "warnings": warnings,
            "nfe": getattr(prior, "nfe", 0) - nfe0, "seconds": time.perf_counter() - t0,
            "options": {"noise": noise, "eta": eta, "data_var": float(data_var), "ess_threshold": ess_threshold,
                        "resample": resample,
                        "sigma_y_used": float(sigma_y) if noise == "carried" else f.s2y**0.5, "sigma_max": sig[0],
                        "sigma_min": sig[-1] if noise == "carried" else sig[-2],
                        "linear_solver": "dense" if use_dense else "cg"}}
    return ReconstructionResult(x=mean, samples=samples, weights=weights.to(y.dtype), std=std,
                                diagnostics=f.diagnostics, info=info)
