r"""3D reconstruction with 2D diffusion priors: DiffusionMBIR and DDS, in the σ (variance-exploding) view.

Both alternate a slice-wise diffusion step of a 2D prior with a data-consistency step on the whole volume, where
the slices are coupled by a total variation along ``z`` solved by ADMM (``admm_tv``). The update rules, the official
settings, the anchored coupling of ``dds3d``, checkpointing and the measured comparisons are in
``docs/methods/volume.md`` and ``docs/methods/dds.md``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import torch

from recon.samplers.base import ReconstructionResult, check_finite, operator_norm
from recon.samplers.dps import (
    ancestral_step,
    finish_samples,
    image_template,
    per_item_norm,
    randn,
    repeat_batch,
    sigma_schedule,
    tweedie_std,
)
from recon.samplers.loop import SamplerRun

__all__ = [
    "MBIR_OFFICIAL",
    "RHO_PER_OPERATOR_NORM2",
    "TV_THRESHOLD",
    "admm_tv",
    "ddim_renoise",
    "forward_difference",
    "forward_difference_adjoint",
    "normal_cg",
    "physics_modality",
    "sample_dds",
    "sample_diffusion_mbir",
]

log = logging.getLogger(__name__)

RHO_PER_OPERATOR_NORM2 = 0.025  # official CT ρ = 10 (AAPM 256², 8 views) relative to ‖A‖₂² (module docstring)
TV_THRESHOLD = 0.008  # official CT λ/ρ = 0.004 for images in [0, 1], ×2 for the prior's [-1, 1] range
# DiffusionMBIR's official (ρ/‖A‖₂², λ/ρ) per modality in recon's units (module docstring): the CT script's
# rho = 10, lamb = 0.04 (AAPM, 8 views) and the MRI script's rho = 0.01, lamb = 0.005 (unit-norm mask ⊙ FFT,
# images in [0, 1]: λ = 2·lamb in the prior's [-1, 1] units, ρ unchanged)
MBIR_OFFICIAL = {"ct": (RHO_PER_OPERATOR_NORM2, TV_THRESHOLD), "mri": (0.01, 1.0)}


# ---------------------------------------------------------------------------------------------------------
# finite differences, CG on the normal equations, ADMM-TV
# ---------------------------------------------------------------------------------------------------------
def forward_difference(x: torch.Tensor, axis: int, boundary: str = "neumann") -> torch.Tensor:
    """``D_a x``: forward difference along spatial ``axis`` (0 = ``D`` for volumes; tensor dim ``2 + axis``).

    ``"neumann"``: ``x[k+1] − x[k]``, and 0 for the last index; ``"circular"``: ``x[(k+1) mod n] − x[k]``.
    """
    dim = 2 + int(axis)
    if boundary == "circular":
        return torch.roll(x, -1, dim) - x
    n = x.shape[dim]
    out = torch.zeros_like(x)
    if n > 1:
        out.narrow(dim, 0, n - 1).copy_(x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1))
    return out


def forward_difference_adjoint(g: torch.Tensor, axis: int, boundary: str = "neumann") -> torch.Tensor:
    """``D_aᵀ g``, the exact adjoint of ``forward_difference``."""
    dim = 2 + int(axis)
    if boundary == "circular":
        return torch.roll(g, 1, dim) - g
    n = g.shape[dim]
    out = torch.zeros_like(g)
    if n > 1:
        h = g.narrow(dim, 0, n - 1)
        out.narrow(dim, 1, n - 1).add_(h)
        out.narrow(dim, 0, n - 1).sub_(h)
    return out


def _ata(physics, v: torch.Tensor) -> torch.Tensor:
    f = getattr(physics, "A_adjoint_A", None)  # deepinv LinearPhysics (closed form for recon's Inpainting)
    return f(v) if callable(f) else physics.A_adjoint(physics.A(v))


def normal_cg(
    physics,
    b: torch.Tensor,
    init: torch.Tensor,
    iters: int,
    gamma: float = 0.0,
    rho: float = 0.0,
    axes: Sequence[int] = (),
    boundary: str = "neumann",
) -> torch.Tensor:
    """``iters`` conjugate-gradient iterations on ``(AᵀA + γ I + ρ Σ_a D_aᵀD_a) x = b`` from ``init``, each batch
    row its own problem (deepinv's ``conjugate_gradient``, ``parallel_dim=0``): ``iters`` iterations (``iters + 1``
    operator applications), fewer only once every row is solved to rounding (``100 ε`` relative). ``iters = 0`` returns
    ``init``."""
    from deepinv.optim.utils import conjugate_gradient

    if int(iters) <= 0:
        return init
    axes = tuple(axes) if rho else ()

    def op(v: torch.Tensor) -> torch.Tensor:
        out = _ata(physics, v)
        if gamma:
            out = out + gamma * v
        for a in axes:
            out = out + rho * forward_difference_adjoint(forward_difference(v, a, boundary), a, boundary)
        return out

    # deepinv adds an absolute eps (default 1e-8) to the CG denominators; the dtype's smallest normal number only
    # guards 0/0 (an already exact row) and never biases a step, whatever the scale of A. tol = the dtype's machine
    # epsilon (relative to ‖b‖, all rows) stops only once every row is solved to rounding: past that point more
    # CG iterations amplify rounding errors (with tol = 0 they diverge after ~50 extra iterations on a 144-unknown
    # test problem), so "exactly `iters` iterations" holds whenever it means anything.
    # The tolerance is 100 ε rather than ε: in float32 a converged row's residual sits at rounding level (~1e-6
    # relative for a masked-Fourier AᵀA, a projection that CG solves in two iterations), above ε, and the next
    # iterations divide by that noise (DDS on 4× MRI: 4.7 dB with tol = ε, see tests/test_samplers_volume.py).
    fin = torch.finfo(b.dtype)
    return conjugate_gradient(op, b, max_iter=int(iters), tol=100 * fin.eps, eps=fin.tiny, parallel_dim=0, init=init)


def _shrink(v: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(v) * (v.abs() - t).clamp_min(0)


def admm_tv(
    physics,
    x: torch.Tensor,
    aty: torch.Tensor,
    z: list,
    u: list,
    *,
    axes: Sequence[int],
    lam: float,
    rho: float,
    cg_iters: int,
    admm_iters: int = 1,
    gamma: float = 0.0,
    anchor: torch.Tensor | None = None,
    boundary: str = "neumann",
) -> tuple[torch.Tensor, list, list, float]:
    r"""``admm_iters`` scaled-ADMM iterations for :math:`\min_x \tfrac12\|Ax-y\|^2 + \tfrac{\gamma}{2}\|x-\bar x\|^2
    + \lambda \sum_a \|D_a x\|_1` (module docstring), warm-started at ``x`` and at the auxiliaries ``z``, ``u``
    (lists with one tensor per axis; empty lists or None entries start at 0).

    Args:
        x: ``(R, C, ...)`` start (and CG warm start); ``aty``: ``Aᵀy`` of the same shape; ``anchor``: ``x̄`` (needed
            when ``gamma > 0``).
        axes: spatial axes of the TV (0 = ``D``); empty: no TV, plain CG on ``(AᵀA + γI) x = Aᵀy + γ x̄``.
        lam, rho: ``λ`` and the ADMM penalty ``ρ > 0``; cg_iters: CG iterations per ADMM iteration.

    Returns:
        ``(x, z, u, primal)``: new tensors (the inputs are not modified) and the ADMM primal residual
        ``‖D x − z‖`` (per batch row, mean; 0 without axes).
    """
    axes = tuple(int(a) for a in axes)
    b0 = aty if not gamma else aty + gamma * anchor
    if not axes:
        return normal_cg(physics, b0, x, cg_iters, gamma), [], [], 0.0
    z = [torch.zeros_like(x) if zi is None else zi for zi in (z or [None] * len(axes))]
    u = [torch.zeros_like(x) if ui is None else ui for ui in (u or [None] * len(axes))]
    thr = float(lam) / float(rho)
    primal = 0.0
    for _ in range(max(1, int(admm_iters))):
        b = b0
        for a, za, ua in zip(axes, z, u, strict=True):
            b = b + rho * forward_difference_adjoint(za - ua, a, boundary)
        x = normal_cg(physics, b, x, cg_iters, gamma, rho, axes, boundary)
        z_new, u_new, sq = [], [], 0.0
        for a, ua in zip(axes, u, strict=True):
            dx = forward_difference(x, a, boundary)
            za = _shrink(dx + ua, thr)
            u_new.append(ua + dx - za)
            sq = sq + ((dx - za) ** 2).flatten(1).sum(1)
            z_new.append(za)
        z, u = z_new, u_new
        primal = float(torch.as_tensor(sq).sqrt().mean())
    return x, z, u, primal


# ---------------------------------------------------------------------------------------------------------
# shared machinery: options, memory budget, checkpoints, diagnostics
# ---------------------------------------------------------------------------------------------------------
def physics_modality(physics) -> str:
    """``"mri"`` for Fourier-sampling operators (``recon``'s ``CartesianMRI``/``MultiCoilMRI``, deepinv's MRI
    classes), else ``"ct"``: which of DiffusionMBIR's official settings ``sample_diffusion_mbir`` defaults to."""
    from deepinv.physics import MRI
    from deepinv.physics import MultiCoilMRI as DeepinvMultiCoilMRI

    if getattr(physics, "modality", None) is not None:  # recon's operators say what they measure
        return "mri" if physics.modality == "mri" else "ct"
    return "mri" if isinstance(physics, (MRI, DeepinvMultiCoilMRI)) else "ct"


def _tv_axes(tv_axes, spatial: int) -> tuple:
    if tv_axes is None:
        return (0,) if spatial == 3 else ()
    if isinstance(tv_axes, int):
        tv_axes = (tv_axes,)
    axes = tuple(int(a) for a in tv_axes)
    if any(not -spatial <= a < spatial for a in axes):
        raise ValueError(
            f"tv_axes must be spatial axes in [{-spatial}, {spatial - 1}] (0 = D for volumes), got {tuple(tv_axes)}"
        )
    axes = tuple(a % spatial for a in axes)
    if len(set(axes)) != len(axes):
        raise ValueError(f"tv_axes must not repeat, got {tuple(tv_axes)}")
    return axes


class _Run(SamplerRun):
    """``SamplerRun`` that also counts denoiser passes over the volume (``calls``: NFE per slice for a 2D slice
    prior) and checkpoints the ADMM auxiliaries ``z``, ``u`` with the volume."""

    def __init__(self, method, prior, generator, callback, checkpoint, checkpoint_every, resume, options, y, steps):
        super().__init__(method, prior, generator, callback, steps=steps, options=options, y=y,
                         checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)
        self.calls = 0

    def load(self, device) -> dict | None:
        state = super().load(device)
        if state is not None:
            self.calls = int(state["calls"])
        return state

    def commit(self, steps_done: int, tensors: dict) -> None:
        super().commit(steps_done, {**tensors, "calls": self.calls})


class _MemoryBudget:
    """Set ``prior.memory_budget`` (``DiffusionPrior``'s slice chunking) for the duration of a call."""

    def __init__(self, prior, budget):
        self.prior, self.budget, self.old = prior, budget, None
        self.applied = budget is not None and hasattr(prior, "memory_budget")
        if budget is not None and not float(budget) > 0:
            raise ValueError(f"memory_budget must be > 0 (bytes), got {budget}")

    def __enter__(self):
        if self.applied:
            self.old = self.prior.memory_budget
            self.prior.memory_budget = float(self.budget)
        return self

    def __exit__(self, *exc):
        if self.applied:
            self.prior.memory_budget = self.old
        return False


def _check_common(particles, cg_iters, admm_iters, tv_boundary):
    if int(particles) < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    if int(cg_iters) < 0:
        raise ValueError(f"cg_iters must be >= 0, got {cg_iters}")
    if int(admm_iters) < 1:
        raise ValueError(f"admm_iters must be >= 1, got {admm_iters}")
    if tv_boundary not in ("neumann", "circular"):
        raise ValueError(f"tv_boundary must be 'neumann' or 'circular', got {tv_boundary!r}")


def _finish(method, x, p, b, run, n, options, info_extra) -> ReconstructionResult:
    samples = x.reshape(p, b, *x.shape[1:])
    xm, weights, std = finish_samples(samples)
    info = {
        "method": method,
        "steps": n,
        "particles": p,
        "nfe": run.nfe(),
        "seconds": run.seconds(),
        "denoiser_calls": run.calls,
        "resumed_from": run.resumed_from,
        "options": options,
        **info_extra,
    }
    return ReconstructionResult(x=xm, samples=samples, weights=weights, std=std, diagnostics=run.diagnostics, info=info)


# ---------------------------------------------------------------------------------------------------------
# DiffusionMBIR
# ---------------------------------------------------------------------------------------------------------
def _check_mbir(settings, predictor: str, corrector_steps: int, corrector_snr: float) -> None:
    if settings not in (None, *MBIR_OFFICIAL):
        raise ValueError(f"settings must be one of {', '.join(MBIR_OFFICIAL)} (or None: from the physics), "
                         f"got {settings!r}")
    if predictor not in ("reverse-diffusion", "ancestral"):
        raise ValueError(f"predictor must be 'reverse-diffusion' or 'ancestral', got {predictor!r}")
    if int(corrector_steps) < 0:
        raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
    if int(corrector_steps) > 0 and not corrector_snr > 0:
        raise ValueError(f"corrector_snr must be > 0, got {corrector_snr}")


def _mbir_weights(physics, template: torch.Tensor, axes: tuple, rho, lam, settings) -> tuple:
    """``(‖A‖ or None, ρ, λ)``: the official weights of the operator's modality unless given; both 0 without TV
    axes (they play no part)."""
    if not axes:
        return None, 0.0, 0.0
    norm_a = None
    if rho is None or lam is None:
        norm_a = operator_norm(physics, template[:1])
        if not norm_a > 0:
            raise ValueError("the physics maps everything to zero (‖A‖ = 0)")
    rho_per_norm2, threshold = MBIR_OFFICIAL[settings or physics_modality(physics)]
    rho_v = rho_per_norm2 * norm_a**2 if rho is None else float(rho)
    lam_v = threshold * rho_v if lam is None else float(lam)
    if not rho_v > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if not lam_v >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return norm_a, rho_v, lam_v


def _predict_correct(run: _Run, physics, y: torch.Tensor, x: torch.Tensor, s: float, s_next: float, i: int,
                     predictor: str, corrector_steps: int, corrector_snr: float) -> tuple[torch.Tensor, float]:
    """One DiffusionMBIR level: the predictor from σ = ``s`` to ``s_next`` and the Langevin corrector steps;
    returns the new state and ‖y − A x̂0‖ of the predictor's Tweedie estimate."""
    prior, generator = run.prior, run.generator
    x0 = prior.denoise(x, s)
    run.calls += 1
    check_finite(x0, run.method, i, "the prior's denoiser returned non-finite values")
    residual = float(per_item_norm(y - physics.A(x0)).mean())
    if s_next <= 0:
        return x0, residual
    if predictor == "ancestral":
        xn = ancestral_step(x, x0, s, s_next, generator, 1.0)
    else:
        g2 = s * s - s_next * s_next
        xn = x + (g2 / (s * s)) * (x0 - x) + math.sqrt(g2) * randn(x.shape, generator, x.dtype, x.device)
    del x0
    for _ in range(int(corrector_steps)):
        score = (prior.denoise(xn, s_next) - xn) / (s_next * s_next)
        run.calls += 1
        noise = randn(xn.shape, generator, xn.dtype, xn.device)
        ratio = per_item_norm(noise) / per_item_norm(score).clamp_min(torch.finfo(xn.dtype).tiny)
        eps = (2.0 * (float(corrector_snr) * ratio) ** 2).reshape(-1, *([1] * (xn.dim() - 1)))
        xn = xn + eps * score + (2.0 * eps).sqrt() * noise
        del score, noise
    return xn, residual


def _final_consistency(physics, x: torch.Tensor, y: torch.Tensor, method: str, n: int) -> torch.Tensor:
    """The final SIRT-like step ``x + Aᵀ(y − Ax) / AᵀA1`` (where ``AᵀA1 > 0``)."""
    norm_const = _ata(physics, torch.ones_like(x[:1]))
    safe = torch.where(norm_const > 0, norm_const, torch.ones_like(norm_const))
    step = torch.where(norm_const > 0, physics.A_adjoint(y - physics.A(x)) / safe, torch.zeros_like(x))
    x = x + step
    check_finite(x, method, n, "set final_consistency=False")
    return x


def sample_diffusion_mbir(
    physics, y: torch.Tensor, prior, *, sigma_y: float = 0.0, steps: int = 2000, particles: int = 1,
    generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
    lam: float | None = None, rho: float | None = None, settings: str | None = None, cg_iters: int = 1,
    admm_iters: int = 1, tv_axes: Sequence[int] | int | None = None, tv_boundary: str = "neumann",
    predictor: str = "reverse-diffusion", corrector_steps: int = 1, corrector_snr: float = 0.16,
    final_consistency: bool | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
    schedule_rho: float = 7.0, sigmas=None, memory_budget: float | None = None,
    checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 10, resume: bool = False,
) -> ReconstructionResult:
    """DiffusionMBIR: slice-wise predictor–corrector with a 2D prior + ADMM-TV along ``z`` on the whole volume
    (``docs/methods/volume.md``: update rules, the defaults' provenance, checkpointing).

    Args:
        physics: any linear deepinv ``Physics`` on ``(B, C, D, H, W)`` volumes (or ``(B, C, H, W)`` images).
        y: measurements ``(B, ...)``.
        prior: ``denoise(x, σ)``, ``sigma_min``, ``sigma_max``, ``nfe`` (a 2D ``DiffusionPrior`` runs slice-wise).
        sigma_y: recorded only (the data-consistency step is the unweighted least squares of the paper).
        steps: noise levels (paper: 2000; NFE per slice ``steps·(1 + corrector_steps) − corrector_steps``).
        particles: independent chains per measurement, one ``P·B`` batch.
        generator: the seeded ``torch.Generator`` all randomness comes from.
        callback: called after every step with its record (``residual``: of the predictor's Tweedie estimate).
        lam: TV weight ``λ`` in the units of ``½‖Ax − y‖²`` (default: the official value for the modality,
            ``0.008 ρ`` for CT and other operators, ``1.0 ρ`` for MRI).
        rho: ADMM penalty ``ρ`` (default ``0.025 ‖A‖₂²`` for CT and other operators, ``0.01 ‖A‖₂²`` for MRI: the
            official scripts'). Both unused (reported as 0) without TV axes.
        settings: ``"ct"`` or ``"mri"``: whose official ``λ``, ``ρ`` the defaults take (default: by the operator).
        cg_iters: CG iterations per ADMM iteration (official: 1; more hurt with TV-z on).
        admm_iters: ADMM iterations per step (official: 1).
        tv_axes: spatial axes of the TV: default ``(0,)`` (``z``) for volumes, ``()`` (off) for 2D images.
        tv_boundary: ``"neumann"`` (default) or ``"circular"`` (official) differences.
        predictor: ``"reverse-diffusion"`` (official) or ``"ancestral"``.
        corrector_steps: Langevin corrector steps per level (official 1; 0 disables).
        corrector_snr: the corrector's signal-to-noise ratio ``snr`` (official 0.16).
        final_consistency: the final SIRT-like step; default: on for CT (the physics has ``fbp``).
        sigma_min, sigma_max, schedule_rho: Karras schedule in the prior's range; ``sigmas`` overrides it.
        memory_budget: bytes per network call, set on the prior for this call (``DiffusionPrior.memory_budget``).
        checkpoint: a file the run's state is written to every ``checkpoint_every`` steps and on Ctrl-C.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint`` (same options and measurements) instead of starting afresh.

    Returns:
        ``ReconstructionResult``; ``info`` has ``denoiser_calls`` (NFE per slice) and the resolved ``lam``/``rho``.
    """
    method = "diffusion-mbir"
    _check_mbir(settings, predictor, corrector_steps, corrector_snr)
    _check_common(particles, cg_iters, admm_iters, tv_boundary)
    p, b = int(particles), y.shape[0]
    sig = sigma_schedule(prior, steps, sigma_min, sigma_max, schedule_rho, sigmas)
    n = sig.numel() - 1
    template = repeat_batch(image_template(physics, y), p)
    spatial = template.dim() - 2
    axes = _tv_axes(tv_axes, spatial)
    norm_a, rho_v, lam_v = _mbir_weights(physics, template, axes, rho, lam, settings)
    if final_consistency is None:
        final_consistency = callable(getattr(physics, "fbp", None))
    options = {"lam": lam_v, "rho": rho_v, "settings": (settings or physics_modality(physics)) if axes else None,
               "cg_iters": int(cg_iters), "admm_iters": int(admm_iters), "tv_axes": list(axes),
               "tv_boundary": tv_boundary, "predictor": predictor, "corrector_steps": int(corrector_steps),
               "corrector_snr": float(corrector_snr), "final_consistency": bool(final_consistency),
               "sigmas": sig.tolist(), "sigma_y": float(sigma_y)}
    run = _volume_run(method, prior, generator, callback, (checkpoint, checkpoint_every, resume), options, p,
                      template, y, physics, n)
    hint = "reduce corrector_snr or rho/lam (the ADMM-TV step), or use more steps"
    with torch.no_grad(), _MemoryBudget(prior, memory_budget):
        y_rep = repeat_batch(y, p).detach()
        aty = physics.A_adjoint(y_rep)
        x, z, u = _start(run, float(sig[0]), template)
        try:
            for i in range(run.start, n):
                s, s_next = float(sig[i]), float(sig[i + 1])
                xn, residual = _predict_correct(run, physics, y_rep, x, s, s_next, i, predictor, corrector_steps,
                                                corrector_snr)
                check_finite(xn, method, i, hint)
                xn, zn, un, primal = admm_tv(physics, xn, aty, z, u, axes=axes, lam=lam_v, rho=rho_v,
                                             cg_iters=cg_iters, admm_iters=admm_iters, boundary=tv_boundary)
                check_finite(xn, method, i, hint)
                x, z, u = xn, zn, un
                run.step(i, s, residual, state={"x": x, "z": z, "u": u}, admm_residual=primal)
        except KeyboardInterrupt:
            run.interrupted()
            raise
        if final_consistency:
            x = _final_consistency(physics, x, y_rep, method, n)
    info_extra = {"operator_norm": norm_a, "memory_budget": memory_budget}
    return _finish(method, x, p, b, run, n, {**options, "sigma_max": float(sig[0]), "sigma_min": float(sig[n - 1])},
                   info_extra)


def _volume_run(method: str, prior, generator, callback, checkpointing: tuple, options: dict, p: int,
                template: torch.Tensor, y: torch.Tensor, physics, n: int) -> _Run:
    """The run of a volume sampler; a checkpoint must match its options, seed, shapes, dtype and operator."""
    checkpoint, every, resume = checkpointing
    identity = {"particles": p, "seed": _seed_of(generator), "x_shape": list(template.shape), "y_shape": list(y.shape),
                "dtype": str(template.dtype), "physics": type(physics).__name__}
    return _Run(method, prior, generator, callback, checkpoint, every, resume, {**options, **identity}, y, n)


def _start(run: _Run, sigma_max: float, template: torch.Tensor) -> tuple:
    """``(x, z, u)``: a checkpoint's state, or pure noise at ``sigma_max`` with no ADMM auxiliaries yet."""
    state = run.load(template.device)
    if state is None:
        x = sigma_max * randn(template.shape, run.generator, template.dtype, template.device)
        z, u = [], []
    else:
        x, z, u = state["x"], list(state["z"]), list(state["u"])
    run.commit(run.start, {"x": x, "z": z, "u": u})
    return x, z, u


def _seed_of(generator: torch.Generator | None):
    return None if generator is None else int(generator.initial_seed())


# ---------------------------------------------------------------------------------------------------------
# DDS
# ---------------------------------------------------------------------------------------------------------
def _check_dds(eta: float, tv_weight: float | None) -> None:
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if tv_weight is not None and not float(tv_weight) >= 0:
        raise ValueError(f"tv_weight must be >= 0 (0: no TV coupling), got {tv_weight}")


def _dds_weights(physics, template: torch.Tensor, axes: tuple, rho, tv_weight, tv_threshold, gamma) -> tuple:
    """``(‖A‖ or None, ρ, λ, γ)`` of DDS's data step: ρ = 0.025‖A‖² and λ = tv_threshold·ρ unless given (both 0
    without TV axes); γ a number, or ``"rho"`` for γ = ρ (None: 0 here, the noise-aware rule applies per level)."""
    need_norm = bool(axes) and (rho is None or tv_weight is None)
    norm_a = operator_norm(physics, template[:1]) if need_norm else None
    if need_norm and not norm_a > 0:
        raise ValueError("the physics maps everything to zero (‖A‖ = 0)")
    if not float(tv_threshold) >= 0:
        raise ValueError(f"tv_threshold must be >= 0, got {tv_threshold}")
    rho_v = lam_v = 0.0
    if axes:
        rho_v = RHO_PER_OPERATOR_NORM2 * norm_a**2 if rho is None else float(rho)
        if not rho_v > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        lam_v = float(tv_threshold) * rho_v if tv_weight is None else float(tv_weight)
    if isinstance(gamma, str):
        if gamma != "rho":
            raise ValueError(f"gamma must be a number >= 0 or 'rho', got {gamma!r}")
        gamma_v = rho_v  # 0 without the coupling (a 2D image, or tv_weight = 0): plain DDS
    else:
        gamma_v = 0.0 if gamma is None else float(gamma)
    if not gamma_v >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return norm_a, rho_v, lam_v, gamma_v


def ddim_renoise(x: torch.Tensor, x0: torch.Tensor, x0dc: torch.Tensor, s: float, s_next: float, eta: float,
             generator) -> torch.Tensor:
    """DDIM re-noising of the data-consistent estimate to σ = ``s_next``: a share ``eta`` of fresh noise."""
    if s_next <= 0:
        return x0dc
    c_keep = math.sqrt(max(0.0, 1.0 - eta**2))
    noise = randn(x.shape, generator, x.dtype, x.device)
    return x0dc + (s_next * c_keep / s) * (x - x0) + (s_next * eta) * noise


def sample_dds(
    physics, y: torch.Tensor, prior, *, sigma_y: float = 0.0, steps: int = 50, particles: int = 1,
    generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None, eta: float = 0.85,
    cg_iters: int = 5, gamma: float | str | None = None, tv_weight: float | None = 0.0,
    tv_threshold: float = TV_THRESHOLD, rho: float | None = None, admm_iters: int = 1,
    tv_axes: Sequence[int] | int | None = None, tv_boundary: str = "neumann", admm_persistent: bool = True,
    sigma_min: float | None = None, sigma_max: float | None = None, schedule_rho: float = 7.0, sigmas=None,
    memory_budget: float | None = None, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 10,
    resume: bool = False,
) -> ReconstructionResult:
    """DDS: DDIM steps whose Tweedie estimate is made data-consistent by a few CG iterations on the whole volume
    (``docs/methods/volume.md`` and ``docs/methods/dds.md``: update rules, defaults, checkpointing).

    Args:
        physics, y, prior, particles, generator: as ``sample_diffusion_mbir``.
        sigma_y: measurement noise std in the units of ``y``; with the default ``gamma`` it sets
            ``γ_i = σ_y²(1 + σ_i²)/σ_i²`` per level (0: ``γ = 0``).
        steps: noise levels = NFE per slice (default 50, the official scripts' ``T_sampling``).
        callback: called after every step with ``step``, ``steps``, ``sigma``, ``residual`` (‖y − A x̂0‖ of the
            data-consistent estimate), ``nfe``, ``seconds``, ``admm_residual``.
        eta: fraction of fresh noise in the re-noising (official DDS convention; default 0.85, official code).
        cg_iters: CG iterations per step (default 5, the paper's ablation); 0: no data consistency.
        gamma: weight of ``‖x − x̂0‖²`` in ``(AᵀA + γI) x = Aᵀy + γ x̂0``: None (noise-aware ``σ_y²/r_i²`` per
            level, 0 when ``σ_y = 0``), a number (0: plain CG from ``x̂0``), or ``"rho"`` (γ = ρ, ``dds3d``).
        tv_weight: ``λ`` of the optional TV coupling (default 0: off; None: ``tv_threshold · ρ``).
        tv_threshold: ``λ/ρ`` when ``tv_weight`` is None (default 0.008, the official 3D CT value; in the prior's
            units, the shrinkage threshold on slice-to-slice differences).
        rho, admm_iters, tv_axes, tv_boundary: as ``sample_diffusion_mbir`` (used when ``tv_weight > 0``).
        admm_persistent: keep ``z``, ``u`` across diffusion steps (the official code); False: each step afresh.
        sigma_min, sigma_max, schedule_rho, sigmas, memory_budget, checkpoint, checkpoint_every, resume: as
            ``sample_diffusion_mbir``.

    Returns:
        ``ReconstructionResult``: ``x`` the final data-consistent ``x̂0`` (mean over particles when ``P > 1``).
    """
    method = "dds"
    _check_dds(eta, tv_weight)
    _check_common(particles, cg_iters, admm_iters, tv_boundary)
    p, b = int(particles), y.shape[0]
    sig = sigma_schedule(prior, steps, sigma_min, sigma_max, schedule_rho, sigmas)
    n = sig.numel() - 1
    template = repeat_batch(image_template(physics, y), p)
    spatial = template.dim() - 2
    coupled = tv_weight is None or float(tv_weight) > 0
    axes = _tv_axes(tv_axes, spatial) if coupled else ()
    norm_a, rho_v, lam_v, gamma_v = _dds_weights(physics, template, axes, rho, tv_weight, tv_threshold, gamma)
    noise_aware = gamma is None and float(sigma_y) > 0  # γ_i = σ_y²/r_i² per level (module docstring)
    options = {"eta": float(eta), "cg_iters": int(cg_iters), "gamma": "noise-aware" if noise_aware else gamma_v,
               "tv_weight": lam_v, "rho": rho_v, "admm_iters": int(admm_iters), "tv_axes": list(axes),
               "tv_boundary": tv_boundary, "admm_persistent": bool(admm_persistent), "sigmas": sig.tolist(),
               "sigma_y": float(sigma_y)}
    run = _volume_run(method, prior, generator, callback, (checkpoint, checkpoint_every, resume), options, p,
                      template, y, physics, n)
    hint = "reduce cg_iters or raise gamma (the data-consistency step)"
    with torch.no_grad(), _MemoryBudget(prior, memory_budget):
        y_rep = repeat_batch(y, p).detach()
        aty = physics.A_adjoint(y_rep)
        x, z, u = _start(run, float(sig[0]), template)
        try:
            for i in range(run.start, n):
                s, s_next = float(sig[i]), float(sig[i + 1])
                x0 = prior.denoise(x, s)
                run.calls += 1
                check_finite(x0, method, i, "the prior's denoiser returned non-finite values")
                z, u = (z, u) if admm_persistent else ([], [])
                gamma_i = float(sigma_y) ** 2 / tweedie_std(s) ** 2 if noise_aware else gamma_v
                x0dc, zn, un, primal = admm_tv(physics, x0, aty, z, u, axes=axes, lam=lam_v, rho=rho_v,
                                               cg_iters=cg_iters, admm_iters=admm_iters, gamma=gamma_i, anchor=x0,
                                               boundary=tv_boundary)
                check_finite(x0dc, method, i, hint)
                residual = float(per_item_norm(y_rep - physics.A(x0dc)).mean())
                xn = ddim_renoise(x, x0, x0dc, s, s_next, float(eta), generator)
                del x0, x0dc
                check_finite(xn, method, i, hint)
                x, z, u = xn, zn, un
                run.step(i, s, residual, state={"x": x, "z": z, "u": u}, admm_residual=primal, gamma=gamma_i)
        except KeyboardInterrupt:
            run.interrupted()
            raise
    info_extra = {"operator_norm": norm_a, "memory_budget": memory_budget}
    return _finish(method, x, p, b, run, n, {**options, "sigma_max": float(sig[0]), "sigma_min": float(sig[n - 1])},
                   info_extra)
