r"""Baselines: analytic inverse, TV-regularised least squares, unconditional diffusion, and deepinv's own samplers.

- ``sample_analytic``: the physics' fast analytic inverse (``analytic_inverse``): FBP / FDK via ``physics.fbp(y)``
  for the ``recon`` CT operators; the zero-filled inverse ``A_adjoint`` for ``recon``'s MRI operators (and for
  ``recon``'s ``Inpainting``, where ``A^T = A^†``, and any physics with ``adjoint_is_inverse = True``); else
  deepinv's ``physics.A_dagger(y)`` (least squares).
- ``sample_tv``: ``argmin_x ½‖A x − y‖² + λ TV(x)`` (isotropic or anisotropic, 2D images or 3D volumes) by
  Chambolle–Pock.
- ``sample_unconditional_ddpm`` / ``sample_unconditional_ddim``: the prior alone (``y`` sets only the shape).
- ``sample_deepinv_dps`` / ``sample_deepinv_diffpir`` / ``sample_deepinv_ddrm``: deepinv 0.5.0's
  ``deepinv.sampling.DPS`` / ``DiffPIR`` / ``DDRM`` run with the ``recon`` prior wrapped as a deepinv denoiser,
  so that comparisons use the same network.

Units of the deepinv adapters. deepinv's diffusion samplers assume images in ``[0, 1]``: ``DPS`` (through
``PosteriorDiffusion(minus_one_one=True)``) carries its state in ``[-1, 1]``, calls the denoiser on
``(x + 1)/2`` with ``σ/2`` and evaluates its data fidelity on ``[0, 1]`` images; ``DiffPIR`` does the same by hand
(``x_aux = x/(2 sqrt(ᾱ)) + 1/2``, ``σ/2``), clamps the denoised state to ``[-1, 1]`` and takes its prox on ``[0, 1]``
images; ``DDRM`` works in the denoiser's units with ``sigmas`` from 1 to 0 (made for ``[0, 1]`` images). The
adapters therefore map the prior's range ``data_range = (lo, hi)`` (default ``(-1, 1)``, the range of every
``recon`` prior) affinely onto ``[0, 1]``: ``u = (x − lo)/(hi − lo)``; the wrapped denoiser is
``D_u(u, s) = (D(lo + (hi − lo) u, (hi − lo) s) − lo)/(hi − lo)``; the measurement becomes
``y_u = (y − lo A(1))/(hi − lo)`` (exact for linear ``A``) and the noise level ``σ_y/(hi − lo)``. With the
default range the deepinv state coincides with ``x``.

deepinv details checked in the 0.5.0 source: ``DPS`` builds ``DPSDataFidelity(clip=[-1, 1])``, but the clip is
applied to the data-fidelity denoiser output, which under ``minus_one_one`` lives in ``[0, 1]``: it clips ``x``
to ``[-3, 1]`` (only the top is active) — kept as deepinv does it (``clip`` option to change it); deepinv's
``weight`` multiplies ``∇‖A x̂0 − y‖`` inside the conditional score, so the ancestral step applies
``(σ_t² − σ_{t+1}²)·weight·∇‖r‖`` — ``weight`` is not the paper's ζ′ (recon's ``sample_dps`` has that). Its SDE
state is float64 (outputs are cast back to the input's dtype), its denoiser input float32. ``DiffPIR`` and ``DDRM``
draw from the global torch RNG: the adapters seed it from ``generator`` inside ``torch.random.fork_rng`` (the
caller's global RNG state is left untouched).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from recon.samplers.base import ReconstructionResult, check_finite, data_residual, operator_norm, record_step
from recon.samplers.dps import (
    ancestral_step,
    chains_result,
    finish_samples,
    image_template,
    per_item_norm,
    randn,
    repeat_batch,
    sigma_schedule,
)
from recon.samplers.loop import SamplerRun

__all__ = [
    "PriorAsDeepinvDenoiser",
    "analytic_inverse",
    "fill_unmeasured",
    "sample_analytic",
    "sample_deepinv_ddrm",
    "sample_deepinv_diffpir",
    "sample_deepinv_dps",
    "sample_tv",
    "sample_unconditional_ddim",
    "sample_unconditional_ddpm",
    "tv_oracle_weight",
]


# ---------------------------------------------------------------------------------------------------------
# analytic inverse
# ---------------------------------------------------------------------------------------------------------
def _adjoint_is_inverse(physics) -> bool:
    """Whether the analytic inverse is ``A_adjoint``: the operator's own flag ``adjoint_is_inverse`` (``Aᵀ = A⁺``:
    single-coil MRI, inpainting; any physics may set it), or ``recon``'s MRI operators, whose zero-filled
    reconstruction ``Aᵀy`` is the field's analytic baseline (multi-coil: the SENSE combination)."""
    return bool(getattr(physics, "adjoint_is_inverse", False)) or getattr(physics, "modality", None) == "mri"


def analytic_inverse(physics, y: torch.Tensor) -> torch.Tensor:
    """The physics' fast analytic inverse of ``y``: ``physics.fbp(y)`` (FBP/FDK of the ``recon`` CT operators) if
    it has one; ``physics.A_adjoint(y)`` (the zero-filled inverse) for ``recon``'s ``CartesianMRI`` /
    ``MultiCoilMRI`` and ``Inpainting`` (``A^T = A^†``) or a physics with the attribute ``adjoint_is_inverse =
    True``; else deepinv's ``physics.A_dagger(y)``."""
    with torch.no_grad():
        if callable(getattr(physics, "fbp", None)):
            return physics.fbp(y)
        if _adjoint_is_inverse(physics):
            return physics.A_adjoint(y)
        return physics.A_dagger(y)


def fill_unmeasured(physics, x: torch.Tensor, max_rounds: int = 256) -> torch.Tensor:
    """``x`` with the pixels the operator never sees (``AᵀA 1 = 0``: an inpainting mask's holes) replaced by the mean
    of their measured neighbours, the neighbourhood growing one pixel per round (normalised convolution). Other
    pixels, and ``x`` of an operator that sees every pixel, are returned unchanged. A start for iterative solvers:
    TV moves an unmeasured pixel by at most about λ per iteration, so from the zero-filled inverse it needs
    thousands of iterations to fill a hole (``docs/methods/tv.md``)."""
    with torch.no_grad():
        seen = physics.A_adjoint(physics.A(torch.ones_like(x))).abs() > 0
        if bool(seen.all()) or not bool(seen.any()):
            return x
        pool = torch.nn.functional.avg_pool3d if x.dim() == 5 else torch.nn.functional.avg_pool2d
        out, known = x.clone(), seen.to(x.dtype)
        num, den = x * known, known
        for _ in range(int(max_rounds)):
            num, den = pool(num, 3, 1, 1, count_include_pad=False), pool(den, 3, 1, 1, count_include_pad=False)
            new = (known == 0) & (den > 0)
            out = torch.where(new, num / den.clamp_min(1e-30), out)
            known = torch.where(new, torch.ones_like(known), known)
            if bool(known.all()):
                break
        return out


def _single_step_result(x, physics, y, method, t0, callback, options) -> ReconstructionResult:
    res = float(data_residual(physics, x, y).mean())
    info = {"step": 0, "steps": 1, "sigma": 0.0, "residual": res, "nfe": 0, "seconds": time.perf_counter() - t0}
    if callback is not None:
        callback(dict(info))
    return ReconstructionResult(
        x=x, diagnostics=[info], info={"method": method, "steps": 1, "particles": 1, "nfe": 0, "options": options}
    )


def sample_analytic(
    physics,
    y: torch.Tensor,
    prior=None,
    *,
    sigma_y: float = 0.0,
    steps: int = 1,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
) -> ReconstructionResult:
    """The fast analytic inverse (``analytic_inverse``: FBP/FDK, zero-filled MRI, else ``A_dagger``); ``prior``,
    ``steps``, ``particles`` and ``generator`` are ignored. One diagnostics entry (step 0)."""
    t0 = time.perf_counter()
    x = analytic_inverse(physics, y)
    check_finite(x, "analytic", 0, "check the measurements for NaN/inf")
    return _single_step_result(x, physics, y, "analytic", t0, callback, {})


# ---------------------------------------------------------------------------------------------------------
# TV
# ---------------------------------------------------------------------------------------------------------
def _tv_solve(physics, y_s: torch.Tensor, norm_a: float, state: tuple, mu: float, steps: int, tv: str,
              on_step: Callable[[int, torch.Tensor], None] | None = None) -> tuple:
    """``steps`` Chambolle–Pock iterations of ``sample_tv``'s rescaled problem from ``state = (x, p, q, x_bar)``
    (a warm start, or zeros duals and ``x_bar = x`` for a cold one); returns the new state. ``on_step(i, x)`` runs
    after every iteration."""
    from deepinv.models.tv import TVDenoiser

    nabla, nabla_t = TVDenoiser.nabla, TVDenoiser.nabla_adjoint
    x, p, q, x_bar = state
    step = 0.99 / math.sqrt(1.0 + 4.0 * (x.dim() - 2))
    for i in range(int(steps)):
        p = (p + step * (physics.A(x_bar) / norm_a - y_s)) / (1.0 + step)
        q = q + step * nabla(x_bar)
        if tv == "isotropic":
            q = q / (q.norm(dim=-1, keepdim=True) / max(mu, 1e-300)).clamp_min(1.0)
        else:
            q = q.clamp(-mu, mu)
        x_new = x - step * (physics.A_adjoint(p) / norm_a + nabla_t(q))
        x_bar = 2 * x_new - x
        x = x_new
        check_finite(x, "tv", i, "check lam and the measurements")
        if on_step is not None:
            on_step(i, x)
    return x, p, q, x_bar


def _cold_state(x: torch.Tensor, y_s: torch.Tensor) -> tuple:
    from deepinv.models.tv import TVDenoiser

    return x, torch.zeros_like(y_s), torch.zeros_like(TVDenoiser.nabla(x)), x.clone()


def _heuristic_lam(x: torch.Tensor, norm_a: float, sigma_y: float) -> float:
    scale = float(x.std()) if x.numel() > 1 and float(x.std()) > 0 else 1.0
    return norm_a**2 * max(0.3 * float(sigma_y) / norm_a, 0.01 * scale)


def _discrepancy_search(physics, y, y_s, norm_a, state0, lam0, target, tv, search_steps, max_evals):
    """Find ``λ`` with ``‖A x_λ − y‖² = target`` by bracketing (×4 steps) and Illinois regula falsi on
    ``log λ``, every solve warm-started from the previous one. Returns ``(lam, state, evals, reached)``: the root
    estimate, the state to warm-start the final solve from, the ``(λ, ‖A x_λ − y‖²)`` pairs tried, and whether
    the bracket was found (else the end of the range tried)."""
    state = state0
    evals: list[tuple[float, float]] = []

    def f(lam: float) -> float:
        nonlocal state
        state = _tv_solve(physics, y_s, norm_a, state, lam / norm_a**2, search_steps, tv)
        r2 = float((physics.A(state[0]) - y).pow(2).sum())
        evals.append((lam, r2))
        return math.log(max(r2, 1e-300) / target)

    a, fa = math.log(lam0), f(lam0)
    direction = -1.0 if fa > 0 else 1.0  # residual too large: less regularisation
    b, fb = a, fa
    while fa * fb > 0 and len(evals) < max_evals:
        a, fa = b, fb
        b = a + direction * math.log(4.0)
        fb = f(math.exp(b))
    if fa * fb > 0:  # not reached in the range tried
        if direction > 0:  # even the largest λ fits better than the noise: the end of the range
            return math.exp(b), state, evals, False
        # the residual stays above the target (the solver's floor): the largest λ within 10 % of the best fit
        floor = min(r for _, r in evals)
        return max(a_ for a_, r in evals if r <= 1.1 * floor), state, evals, False
    side = 0
    while len(evals) < max_evals and abs(fb) > math.log(1.05):
        c = b - fb * (b - a) / (fb - fa)
        fc = f(math.exp(c))
        if fc * fb < 0:
            a, fa = b, fb
            side = 0
        else:
            fa = fa / 2 if side == -1 else fa  # Illinois: halve the stale end's value
            side = -1
        b, fb = c, fc
    root = b if abs(fb) <= abs(fa) else a
    if abs(fb) > math.log(1.05) and fa != fb:
        root = b - fb * (b - a) / (fb - fa)
    return math.exp(root), state, evals, True


def sample_tv(
    physics,
    y: torch.Tensor,
    prior=None,
    *,
    sigma_y: float = 0.0,
    steps: int = 300,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    lam: float | None = None,
    weight: str | None = None,
    tv: str = "isotropic",
    init: str = "analytic",
    discrepancy_tau: float = 1.0,
    search_steps: int | None = None,
    max_evals: int = 8,
) -> ReconstructionResult:
    r"""TV-regularised least squares ``argmin_x ½‖A x − y‖² + λ TV(x)`` on any linear physics, 2D or 3D, by
    Chambolle–Pock; ``λ`` by the discrepancy principle when ``sigma_y > 0`` (``docs/methods/tv.md``: the solver,
    the weight rules and why deepinv's own TV route is not used). The choice is recorded in ``info["tv_weight"]``.

    Args:
        lam: ``λ`` in the units of ``½‖Ax − y‖²``; given, it is used as is (``weight`` must then be None).
        weight: ``"auto"`` (discrepancy principle) or ``"heuristic"``; None picks ``"auto"`` when
            ``sigma_y > 0`` and ``"heuristic"`` otherwise.
        tv: ``"isotropic"`` (ℓ2 norm of the gradient per pixel) or ``"anisotropic"`` (ℓ1 of every difference).
        init: ``"analytic"`` (``analytic_inverse``) or ``"zeros"``.
        steps: Chambolle–Pock iterations (of the final solve with ``weight="auto"``).
        discrepancy_tau: the discrepancy principle's factor ``τ`` (1: the expected noise energy).
        search_steps: iterations per solve of the ``λ`` search (default ``steps``).
        max_evals: at most this many solves per round of the ``λ`` search.
    """
    t0 = time.perf_counter()
    _check_tv(tv, init, steps, weight, lam)
    template = image_template(physics, y)
    if template.dim() not in (4, 5):
        raise ValueError(f"sample_tv needs images (B, C, H, W) or volumes (B, C, D, H, W), got {tuple(template.shape)}")
    x = fill_unmeasured(physics, analytic_inverse(physics, y).to(template.dtype)) if init == "analytic" \
        else template.clone()
    norm_a = operator_norm(physics, template)
    if norm_a == 0:
        raise ValueError("the physics maps everything to zero (‖A‖ = 0)")
    rule = weight or ("auto" if lam is None and float(sigma_y) > 0 else "heuristic")
    if lam is not None:
        rule = "given"
    y_s = y / norm_a
    options = {"tv": tv, "init": init, "operator_norm": norm_a, "weight": rule}
    chosen: dict | None = None
    state = None
    with torch.no_grad():
        if rule == "heuristic":
            lam = _heuristic_lam(x, norm_a, sigma_y)
        elif rule == "auto":
            lam, state, chosen = _auto_lam(physics, y, y_s, norm_a, x, template, float(sigma_y), tv,
                                           float(discrepancy_tau), search_steps or int(steps),
                                           int(max_evals))
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        mu = float(lam) / norm_a**2
        diagnostics: list[dict] = []

        def on_step(i: int, x_i: torch.Tensor) -> None:
            record_step(diagnostics, callback, t0, None, 0, i, int(steps), 0.0, data_residual(physics, x_i, y).mean())

        state = _tv_solve(physics, y_s, norm_a, state or _cold_state(x, y_s), mu, int(steps), tv, on_step)
        x = state[0]
    info = {"method": "tv", "steps": int(steps), "particles": 1, "nfe": 0, "options": {"lam": float(lam), **options}}
    if chosen is not None:
        r2 = float((physics.A(x) - y).pow(2).sum())
        chosen.update(lam=float(lam), residual_sq=r2, ratio=r2 / chosen["target"])
        info["tv_weight"] = chosen
    return ReconstructionResult(x=x, diagnostics=diagnostics, info=info)


def _check_tv(tv: str, init: str, steps: int, weight: str | None, lam: float | None) -> None:
    if tv not in ("isotropic", "anisotropic"):
        raise ValueError(f"tv must be 'isotropic' or 'anisotropic', got {tv!r}")
    if init not in ("analytic", "zeros"):
        raise ValueError(f"init must be 'analytic' or 'zeros', got {init!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if weight not in (None, "auto", "heuristic"):
        raise ValueError(f"weight must be 'auto' or 'heuristic', got {weight!r}")
    if lam is not None and weight is not None:
        raise ValueError(f"give lam or weight, not both (lam={lam}, weight={weight!r})")


def _auto_lam(physics, y, y_s, norm_a, x0, template, sigma_y, tv, tau, search_steps, max_evals):
    """The discrepancy-principle ``λ`` of ``sample_tv`` (``weight="auto"``): ``(lam, warm state, record)``."""
    from recon.samplers.noise import estimate_noise_sigma
    from recon.samplers.reddiff import measured_entries

    source = "given"
    if sigma_y <= 0:
        sigma_y, source = estimate_noise_sigma(physics, y), "estimated"
    if not sigma_y > 0:
        raise ValueError("weight='auto' needs sigma_y > 0 (the estimate from the data was 0)")
    if not tau > 0:
        raise ValueError(f"discrepancy_tau must be > 0, got {tau}")
    m = measured_entries(physics, template) * int(y.shape[0])
    target = tau * m * sigma_y**2
    lam, state, evals, reached = _heuristic_lam(x0, norm_a, sigma_y), _cold_state(x0, y_s), [], False
    for _ in range(3):  # a search, then up to two more from the better converged state if the check is off
        lam, state, new, reached = _discrepancy_search(physics, y, y_s, norm_a, state, lam, target, tv,
                                                       search_steps, max(max_evals, 2))
        evals += new
        state = _tv_solve(physics, y_s, norm_a, state, lam / norm_a**2, search_steps, tv)
        r2 = float((physics.A(state[0]) - y).pow(2).sum())
        evals.append((lam, r2))
        if not reached or abs(math.log(r2 / target)) <= math.log(1.25):
            break
    record = {"rule": "discrepancy", "sigma_y": sigma_y, "sigma_y_source": source, "measured_entries": m,
              "tau": tau, "target": target, "bracketed": reached, "search_steps": search_steps,
              "evals": [{"lam": a, "residual_sq": r} for a, r in evals]}
    return lam, state, record


def tv_oracle_weight(
    physics,
    y: torch.Tensor,
    truth: torch.Tensor,
    *,
    score: Callable[[torch.Tensor], float] | None = None,
    lam0: float | None = None,
    sigma_y: float = 0.0,
    steps: int = 300,
    tv: str = "isotropic",
    span: int = 3,
    golden_iters: int = 6,
) -> tuple[float, torch.Tensor, dict]:
    """The oracle TV weight, chosen against the truth: for benchmarks only (an upper bound for TV's automatic
    weight, never available on real data).

    A grid ``λ₀ · 4^k`` (``k = −span … span``) then golden-section search on ``log λ`` between the best grid
    point's neighbours; every solve is ``steps`` Chambolle–Pock iterations of ``sample_tv`` warm-started from the
    previous one (cold start from the analytic inverse for the grid's first point).

    Args:
        physics: the operator.
        y: measurements.
        truth: the true image, in the units ``sample_tv`` reconstructs (to score against).
        score: higher is better, of a reconstruction ``x``; default ``−‖x − truth‖²`` (best PSNR).
        lam0: the grid's centre; default ``sample_tv``'s heuristic weight for ``sigma_y``.
        sigma_y: noise level for the default ``lam0``.
        steps: iterations per solve.
        tv: ``"isotropic"`` or ``"anisotropic"``.
        span: grid half-width in factors of 4.
        golden_iters: golden-section iterations.

    Returns:
        ``(lam, x, record)``: the best weight, its reconstruction and the ``(λ, score)`` pairs tried.
    """
    if score is None:
        def score(x_: torch.Tensor) -> float:
            return -float((x_ - truth).pow(2).sum())
    template = image_template(physics, y)
    x0 = fill_unmeasured(physics, analytic_inverse(physics, y).to(template.dtype))
    norm_a = operator_norm(physics, template)
    y_s = y / norm_a
    lam0 = _heuristic_lam(x0, norm_a, sigma_y) if lam0 is None else float(lam0)
    tried: dict[float, tuple[float, torch.Tensor]] = {}
    state = _cold_state(x0, y_s)

    def evaluate(log_lam: float) -> float:
        nonlocal state
        state = _tv_solve(physics, y_s, norm_a, state, math.exp(log_lam) / norm_a**2, steps, tv)
        tried[log_lam] = (score(state[0]), state[0])
        return tried[log_lam][0]

    with torch.no_grad():
        grid = [math.log(lam0) + k * math.log(4.0) for k in range(span, -span - 1, -1)]  # large to small λ
        values = [evaluate(g) for g in grid]
        k = max(range(len(grid)), key=values.__getitem__)
        lo, hi = grid[min(k + 1, len(grid) - 1)], grid[max(k - 1, 0)]
        ratio = (math.sqrt(5.0) - 1) / 2
        c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fc, fd = evaluate(c), evaluate(d)
        for _ in range(int(golden_iters)):
            if fc > fd:
                hi, d, fd = d, c, fc
                c = hi - ratio * (hi - lo)
                fc = evaluate(c)
            else:
                lo, c, fc = c, d, fd
                d = lo + ratio * (hi - lo)
                fd = evaluate(d)
    best = max(tried, key=lambda key: tried[key][0])
    record = {"rule": "oracle", "evals": [{"lam": math.exp(a), "score": v[0]} for a, v in tried.items()]}
    return math.exp(best), tried[best][1], record


# ---------------------------------------------------------------------------------------------------------
# unconditional diffusion
# ---------------------------------------------------------------------------------------------------------
def _unconditional(
    physics, y, prior, steps, particles, generator, callback, eta, method, sigma_min, sigma_max, rho, sigmas
) -> ReconstructionResult:
    t0 = time.perf_counter()
    p = int(particles)
    if p < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    sig = sigma_schedule(prior, steps, sigma_min, sigma_max, rho, sigmas)
    n = sig.numel() - 1
    nfe0 = getattr(prior, "nfe", 0)
    template = repeat_batch(image_template(physics, y), p)
    y_rep = repeat_batch(y, p)
    b = y.shape[0]
    diagnostics: list[dict] = []
    with torch.no_grad():
        x = float(sig[0]) * randn(template.shape, generator, template.dtype, template.device)
        x0 = x
        for i in range(n):
            s, s_next = float(sig[i]), float(sig[i + 1])
            x0 = prior.denoise(x, s)
            x = ancestral_step(x, x0, s, s_next, generator, eta)
            check_finite(x, method, i, "check the prior (non-finite denoiser output)")
            record_step(diagnostics, callback, t0, prior, nfe0, i, n, s, per_item_norm(y_rep - physics.A(x0)).mean())
    samples = x0.reshape(p, b, *x0.shape[1:])
    xm, weights, std = finish_samples(samples)
    return ReconstructionResult(
        x=xm,
        samples=samples,
        weights=weights,
        std=std,
        diagnostics=diagnostics,
        info={
            "method": method,
            "steps": n,
            "particles": p,
            "nfe": getattr(prior, "nfe", 0) - nfe0,
            "options": {"eta": float(eta), "sigma_max": float(sig[0]), "sigma_min": float(sig[n - 1])},
        },
    )


def sample_unconditional_ddpm(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 100,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    sigmas=None,
) -> ReconstructionResult:
    """Unconditional ancestral (DDPM) sampling in σ: ``x_{i+1} ~ q(x_{i+1} | x_i, x̂0)`` (the exact VE posterior
    step, see ``recon.samplers.dps``), output ``x̂0`` of the last step. ``y`` only sets the output shape (through
    ``physics.A_adjoint(y)``) and the reported residual; ``particles`` samples per measurement (``x`` their mean
    when ``P > 1``)."""
    return _unconditional(
        physics, y, prior, steps, particles, generator, callback, 1.0, "ddpm", sigma_min, sigma_max, rho, sigmas
    )


def sample_unconditional_ddim(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 100,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    eta: float = 0.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    sigmas=None,
) -> ReconstructionResult:
    """Unconditional DDIM sampling in σ (``eta = 0``: deterministic given the initial noise), output ``x̂0`` of
    the last step; otherwise as ``sample_unconditional_ddpm``."""
    return _unconditional(
        physics, y, prior, steps, particles, generator, callback, float(eta), "ddim", sigma_min, sigma_max, rho, sigmas
    )


# ---------------------------------------------------------------------------------------------------------
# deepinv adapters
# ---------------------------------------------------------------------------------------------------------
class PriorAsDeepinvDenoiser(nn.Module):
    """A ``recon`` prior as a deepinv denoiser on ``[0, 1]`` images: ``D_u(u, s) = (D(lo + (hi − lo) u,
    (hi − lo) s) − lo)/(hi − lo)`` (module docstring). ``sigma`` may be a number or a tensor with one value per
    batch item (any shape with ``B`` or 1 elements). Keeps the last output (``last_u``) and counts calls;
    ``hook(u_in, u_out)`` is called after every call when set. ``dtype``: compute dtype of the prior call
    (default: the input's)."""

    def __init__(self, prior, data_range=(-1.0, 1.0), dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(prior, nn.Module):
            self.prior = prior
        else:
            object.__setattr__(self, "prior", prior)
        self.lo, self.hi = float(data_range[0]), float(data_range[1])
        if not self.hi > self.lo:
            raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range}")
        self.compute_dtype = dtype
        self.last_u: torch.Tensor | None = None
        self.calls = 0
        self.hook: Callable | None = None

    def forward(self, u: torch.Tensor, sigma, *args, **kwargs) -> torch.Tensor:
        w = self.hi - self.lo
        dtype = self.compute_dtype or u.dtype
        s = torch.as_tensor(sigma, dtype=torch.float64).to(u.device).flatten()
        s = float(s[0]) if s.numel() == 1 else s.reshape(u.shape[0])
        s = s * w
        x = self.lo + w * u.to(dtype)
        out = (self.prior.denoise(x, s if isinstance(s, float) else s.to(dtype)) - self.lo) / w
        out = out.to(u.dtype)
        self.last_u = out.detach()
        self.calls += 1
        if self.hook is not None:
            self.hook(u, out)
        return out


def _seed_from(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _to_unit(physics, y, template, lo, hi):
    """``y_u = (y − lo A(1))/(hi − lo)`` (linear ``A``)."""
    with torch.no_grad():
        offset = physics.A(torch.ones_like(template)) if lo != 0 else 0.0
    return (y - lo * offset) / (hi - lo)


@dataclass
class _Adapter:
    """What the deepinv adapters share: the run's bookkeeping, the particle batch (row ``p·B + b``) and the affine
    map of the prior's range ``(lo, hi)`` onto deepinv's ``[0, 1]``."""

    run: SamplerRun
    physics: object
    p: int
    b: int
    lo: float
    hi: float
    template: torch.Tensor
    y_u: torch.Tensor
    y_rep: torch.Tensor
    den: PriorAsDeepinvDenoiser

    def x_of(self, u: torch.Tensor) -> torch.Tensor:
        """deepinv's ``[0, 1]`` units → the prior's range."""
        return (self.lo + (self.hi - self.lo) * u).to(self.template.dtype)

    def record(self, u0: torch.Tensor, sigma: float, n: int) -> None:
        """One step's record from deepinv's denoised estimate ``u0`` (residual of ``x̂0`` in ``y``'s units)."""
        x0 = self.x_of(u0.detach())
        self.run.steps = n
        self.run.step(len(self.run.diagnostics), sigma, per_item_norm(self.y_rep - self.physics.A(x0)).mean())

    def result(self, x: torch.Tensor, options: dict) -> ReconstructionResult:
        return chains_result(self.run, x, steps=len(self.run.diagnostics), options=options)


def _adapter(method: str, physics, y: torch.Tensor, prior, particles: int, data_range, generator, callback,
             steps: int) -> _Adapter:
    p, b = int(particles), y.shape[0]
    if p < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    run = SamplerRun(method, prior, generator, callback, steps=steps, particles=p)
    lo, hi = float(data_range[0]), float(data_range[1])
    template = repeat_batch(image_template(physics, y), p)
    y_u = repeat_batch(_to_unit(physics, y, template[:b], lo, hi), p)
    return _Adapter(run, physics, p, b, lo, hi, template, y_u, repeat_batch(y, p),
                    PriorAsDeepinvDenoiser(prior, (lo, hi)))


def sample_deepinv_dps(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 100,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    weight: float = 1.0,
    schedule: str = "vp",
    solver: str = "ddpm",
    guidance: str = "norm",
    clip="deepinv",
    data_range=(-1.0, 1.0),
) -> ReconstructionResult:
    """deepinv 0.5.0's ``deepinv.sampling.DPS`` with the ``recon`` prior (module docstring for units and caveats).

    Args:
        steps: deepinv's ``num_steps`` (its default is 1000).
        particles: independent chains per measurement, one batch (row ``p·B + b``); ``x`` is their mean if ``P > 1``.
        weight, schedule (``"vp"``/``"ve"``), solver (``"ddpm"``/``"ddim"``/``"ancestral"``/``"euler"``), guidance
            (``"norm"``/``"annealed"``): passed to deepinv's ``DPS``.
        clip: ``"deepinv"`` keeps deepinv's ``[-1, 1]`` clip of the data-fidelity denoiser output (in deepinv's
            ``[0, 1]`` units), ``None`` removes it, or a ``(low, high)`` pair in those units.
        data_range: the prior's range mapped onto deepinv's ``[0, 1]``.

    The callback / diagnostics run once per deepinv solver step (two network calls per step: deepinv evaluates
    the unconditional score and the data-fidelity gradient with separate denoiser calls).
    """
    from deepinv.sampling import DPS

    n = int(steps) - 1  # solver steps between num_steps time points
    ad = _adapter("deepinv-dps", physics, y, prior, particles, data_range, generator, callback, n)
    lo, hi, den = ad.lo, ad.hi, ad.den
    rng = torch.Generator(device=y.device).manual_seed(_seed_from(generator))
    model = DPS(
        den,
        schedule=schedule,
        solver=solver,
        num_steps=int(steps),
        weight=float(weight),
        guidance=guidance,
        device=y.device,
        rng=rng,
    )
    if clip != "deepinv":
        model.data_fidelity.clip = None if clip is None else sorted(float(c) for c in clip)
    orig_step = model.solver.step

    def step(sde, t_cur, t_next, x, *args, **kwargs):
        out = orig_step(sde, t_cur, t_next, x, *args, **kwargs)
        check_finite(out[0], "deepinv-dps", len(ad.run.diagnostics), "reduce weight")
        ad.record(den.last_u.to(y.dtype), float(model.sde.sigma_t(t_cur)) * (hi - lo) / 2, n)
        return out

    model.solver.step = step
    u = model(ad.y_u, physics, x_init=tuple(ad.template.shape))
    x = ad.x_of(u)
    check_finite(x, "deepinv-dps", n, "reduce weight")
    options = {
        "weight": float(weight),
        "schedule": schedule,
        "solver": solver,
        "guidance": guidance,
        "clip": model.data_fidelity.clip,
        "data_range": (lo, hi),
    }
    return ad.result(x, options)


def sample_deepinv_diffpir(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 100,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    zeta: float = 0.1,
    lambda_: float = 7.0,
    init: str = "analytic",
    min_sigma_y: float = 1e-3,
    data_range=(-1.0, 1.0),
) -> ReconstructionResult:
    """deepinv 0.5.0's ``deepinv.sampling.DiffPIR`` (``L2`` data fidelity, its prox by deepinv) with the ``recon``
    prior (module docstring for units).

    Args:
        steps: deepinv's ``max_iter`` (its default 100; the DiffPIR paper uses 100 NFE for deblur/SR, 20 for
            inpainting).
        zeta, lambda_: deepinv's ``zeta`` (default 0.1) and ``lambda_`` (default 7.0).
        sigma_y: the noise level DiffPIR uses (``ρ_t = λ σ_n²/σ̄_t²``), in ``y``'s units; deepinv would read
            ``physics.noise_model.sigma`` — the adapter always uses ``max(sigma_y, min_sigma_y)`` (σ_n = 0 makes
            ρ_t = 0 and the prox step infinite) divided by ``hi − lo``.
        init: ``"analytic"`` (``x_init`` from ``analytic_inverse``) or ``"adjoint"`` (deepinv's default
            ``2 A^T y − 1`` in its units).
    """
    from deepinv.optim.data_fidelity import L2
    from deepinv.sampling import DiffPIR

    if init not in ("analytic", "adjoint"):
        raise ValueError(f"init must be 'analytic' or 'adjoint', got {init!r}")
    n = int(steps)
    ad = _adapter("deepinv-diffpir", physics, y, prior, particles, data_range, generator, callback, n)
    lo, hi, p, den = ad.lo, ad.hi, ad.p, ad.den
    sigma_u = max(float(sigma_y), float(min_sigma_y)) / (hi - lo)

    class _FixedNoiseDiffPIR(DiffPIR):  # deepinv re-reads physics.noise_model.sigma in forward: use ours
        def get_noise_schedule(self, sigma):
            return super().get_noise_schedule(sigma_u)

    model = _FixedNoiseDiffPIR(
        den, L2(), sigma=sigma_u, max_iter=int(steps), zeta=float(zeta), lambda_=float(lambda_), device=y.device
    )
    x_init = None
    if init == "analytic":
        x_init = repeat_batch((analytic_inverse(physics, y).to(ad.template.dtype) - lo) / (hi - lo), p)

    def hook(u_in, u_out):
        i = len(ad.run.diagnostics)
        check_finite(u_in, "deepinv-diffpir", i, "reduce lambda_ or check sigma_y")
        ad.record(u_out, float(model.sigmas[model.seq[min(i, n - 1)]]) * (hi - lo) / 2, n)

    den.hook = hook
    devices = [y.device] if y.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_seed_from(generator))
        u = model(ad.y_u, physics, x_init=x_init)
    x = ad.x_of(u)
    check_finite(x, "deepinv-diffpir", n, "reduce lambda_ or check sigma_y")
    options = {
        "zeta": float(zeta),
        "lambda_": float(lambda_),
        "sigma_n": sigma_u * (hi - lo),
        "init": init,
        "data_range": (lo, hi),
    }
    return ad.result(x, options)


def sample_deepinv_ddrm(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 100,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    eta: float = 0.85,
    etab: float = 1.0,
    sigmas=None,
    data_range=(-1.0, 1.0),
) -> ReconstructionResult:
    """deepinv 0.5.0's ``deepinv.sampling.DDRM`` with the ``recon`` prior; needs a deepinv ``DecomposablePhysics``
    (``ValueError`` otherwise; ``recon``'s operators are plain ``LinearPhysics``).

    Args:
        steps: number of noise levels; ``sigmas`` default ``linspace(1, 0, steps)`` in deepinv's ``[0, 1]`` units
            (deepinv's default with ``steps = 100``).
        eta, etab: deepinv's DDRM hyperparameters (defaults 0.85, 1.0).
        sigma_y: the measurement noise level DDRM uses, in ``y``'s units (deepinv reads it from
            ``physics.noise_model.sigma``: the adapter runs on a clone of ``physics`` with
            ``GaussianNoise(sigma_y/(hi − lo))``).
    """
    import numpy as np
    from deepinv.physics import DecomposablePhysics, GaussianNoise
    from deepinv.sampling import DDRM

    if not isinstance(physics, DecomposablePhysics):
        raise ValueError(
            f"deepinv-ddrm needs a deepinv DecomposablePhysics (SVD structure), got {type(physics).__name__}"
        )
    if sigmas is None:
        sigmas = np.linspace(1, 0, int(steps))
    sigmas = np.asarray(sigmas, dtype=np.float64)
    n = len(sigmas)
    ad = _adapter("deepinv-ddrm", physics, y, prior, particles, data_range, generator, callback, n)
    lo, hi, y_u, den = ad.lo, ad.hi, ad.y_u, ad.den
    phys = physics.clone()
    phys.noise_model = GaussianNoise(sigma=float(sigma_y) / (hi - lo))
    mask = getattr(phys, "mask", None)
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        y_u = y_u.to(mask.dtype)  # deepinv's DDRM mixes y and mask in index assignments: dtypes must agree
    model = DDRM(den, sigmas=sigmas, eta=float(eta), etab=float(etab))

    def hook(u_in, u_out):
        i = len(ad.run.diagnostics)
        check_finite(u_in, "deepinv-ddrm", i, "check sigma_y and the sigmas")
        ad.record(u_out, float(sigmas[min(i, n - 1)]) * (hi - lo), n)

    den.hook = hook
    devices = [y.device] if y.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_seed_from(generator))
        u = model(y_u, phys)
    x = ad.x_of(u)
    check_finite(x, "deepinv-ddrm", n, "check sigma_y and the sigmas")
    options = {"eta": float(eta), "etab": float(etab), "data_range": (lo, hi)}
    return ad.result(x, options)
