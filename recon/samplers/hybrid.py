r"""A diffusion sampler whose data step adds total variation: the denoiser's estimate, the data and TV together.

Per level ``σ_i → σ_{i+1}`` (derivation and tuning: ``docs/methods/hybrid.md``)::

    x̂0 = denoise(x, σ_i);  ε̂ = (x − x̂0)/σ_i
    x̂0 ← argmin_x ½‖Ax − y‖²/σ_y² + ρ_i/2 ‖x − x̂0‖² + λ TV(x)        ρ_i = anchor / r_i²,  r_i = σ_i/sqrt(1 + σ_i²)
    x  = x̂0 + σ_{i+1} (sqrt(1 − η²) ε̂ + η ξ)                           (DDS's re-noising)

TV is anisotropic, in-plane (plus along ``z`` for volumes). On a volume a 2D prior denoises axial, coronal and
sagittal slices in turn, one plane per level (``planes``, ``default_planes``). Multiplied by ``σ_y²`` the data step is
``recon.samplers.volume.admm_tv``'s problem ``½‖Ax − y‖² + γ/2‖x − x̂0‖² + λ′ Σ_a ‖D_a x‖₁`` with ``γ = σ_y² ρ_i``
and ``λ′ = σ_y² λ``, solved by ``admm_iters`` ADMM iterations from ``x̂0`` (``z = D x̂0``, ``u = 0``; penalty
``γ + admm_penalty·σ_y‖A‖``, the anchor's curvature plus a multiple of the data's noise scale). The output is
the data step's result at the last level, averaged over the chains (two on images by default). With ``σ_y = 0``
the anchor and TV vanish and the step is DDS's CG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from recon.samplers.base import ReconstructionResult, check_bounded, check_finite, operator_norm
from recon.samplers.dps import (
    chains_result,
    image_template,
    per_item_norm,
    start_chains,
    tweedie_std,
)
from recon.samplers.loop import SamplerRun
from recon.samplers.volume import admm_tv, ddim_renoise, forward_difference

__all__ = ["IMAGE_CHAINS", "MAX_PLANE_ASPECT", "PLANES", "REFERENCE_UNSAMPLED", "default_chains", "default_planes",
           "default_tv_weight", "denoise_in_plane", "sample_hybrid", "sampling_factor", "tv_data_step",
           "voxel_spacing"]

# the slice axes of a (B, C, D, H, W) volume a 2D prior denoises along: axial (slices along D) only, or one plane
# per level in turn, axial, coronal, sagittal (the prior sees z; docs/methods/hybrid.md, "Volumes: the prior in
# three planes")
PLANES: dict[str, tuple[int, ...]] = {"axial": (2,), "cycle": (2, 3, 4)}


# the most anisotropic voxels (slice spacing over pixel spacing, or its inverse) on which the planes turn by default:
# coronal and sagittal images of thicker slices are stretched beyond the isotropic zooms the priors were trained on
# (docs/methods/hybrid.md, "Volumes: the prior in three planes")
MAX_PLANE_ASPECT = 1.6


def voxel_spacing(physics) -> tuple[float, float, float] | None:
    """``(dz, dy, dx)`` of a volume operator's ``spacing``, None when it does not say."""
    spacing = getattr(physics, "spacing", None)
    return tuple(float(v) for v in spacing) if spacing is not None and len(spacing) == 3 else None


def default_planes(prior, template: torch.Tensor, spacing: Sequence[float] | None = None) -> str:
    """``"cycle"`` for a volume under a 2D slice prior whose voxels ``spacing`` (``(dz, dy, dx)``, None: unknown)
    are within ``MAX_PLANE_ASPECT`` of isotropic, else ``"axial"`` (an image, or a prior over whole volumes, has
    no other plane)."""
    if template.dim() != 5 or getattr(prior, "spatial_dims", None) != 2:
        return "axial"
    if spacing is not None:
        dz, dy, dx = (float(v) for v in spacing)
        if max(dz / dy, dy / dz, dz / dx, dx / dz) > MAX_PLANE_ASPECT:
            return "axial"
    return "cycle"

# chains averaged by default on a 2D image: the most whose time stays within the 60 s budget per 256² slice on two
# CPU cores with margin (36 s; 3 chains 49 s); averaging lowers the chains' texture (docs/methods/hybrid.md,
# "Averaged chains")
IMAGE_CHAINS = 2


def default_chains(physics, y: torch.Tensor) -> int:
    """The hybrid's default ``particles``: ``IMAGE_CHAINS`` for ``(B, C, H, W)`` images, 1 for volumes (whose time and
    memory already scale with the slices, and whose TV along z couples them)."""
    return IMAGE_CHAINS if image_template(physics, y[:1]).dim() == 4 else 1


# the unsampled energy (``recon.operators.masks.unsampled_energy``) at which ``tv_factor`` applies as it is when it
# follows the sampling (``tv_gap``): about that of fastMRI's random 4× masks at 128² (0.39–0.41)
REFERENCE_UNSAMPLED = 0.4


def sampling_factor(physics, tv_gap: float) -> float:
    """``exp(tv_gap·(u − REFERENCE_UNSAMPLED))`` for an undersampling operator that leaves the share ``u`` of an
    image's k-space energy unsampled (its ``unsampled_energy``); 1 for other operators or ``tv_gap = 0``."""
    u = getattr(physics, "unsampled_energy", None)
    if not tv_gap or u is None:
        return 1.0
    return math.exp(float(tv_gap) * (float(u) - REFERENCE_UNSAMPLED))


def default_tv_weight(tv_factor: float, norm_a: float, sigma_y: float, n_axes: int) -> float:
    """``λ = tv_factor·‖A‖/σ_y·2/n_axes``: the factor was tuned on images (two axes); a volume's three axes share
    the same budget, so that adding TV along z does not add a half more smoothing (0 when ``σ_y = 0``)."""
    return float(tv_factor) * norm_a / float(sigma_y) * 2.0 / n_axes if sigma_y > 0 else 0.0


def denoise_in_plane(prior, x: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """``prior.denoise`` of a volume ``(B, C, D, H, W)`` slice by slice along ``axis`` (2: axial, 3: coronal,
    4: sagittal); an image ``(B, C, H, W)`` is denoised as it is."""
    if x.dim() != 5 or axis == 2:
        return prior.denoise(x, sigma)
    return prior.denoise(x.movedim(axis, 2), sigma).movedim(2, axis)


def tv_data_step(physics, x0: torch.Tensor, aty: torch.Tensor, *, gamma: float, tv_weight: float, admm_rho: float,
                 axes: Sequence[int], admm_iters: int, cg_iters: int) -> tuple[torch.Tensor, float]:
    """``argmin_x ½‖Ax − y‖² + γ/2‖x − x0‖² + λ Σ_a ‖D_a x‖₁`` by ``admm_iters`` ADMM iterations (penalty
    ``admm_rho``) warm-started at ``x0``, ``z_a = D_a x0``, ``u_a = 0``; returns ``(x, primal residual)``."""
    if not tv_weight or not axes:
        x, _, _, primal = admm_tv(physics, x0, aty, [], [], axes=(), lam=0.0, rho=1.0, cg_iters=cg_iters,
                                  gamma=gamma, anchor=x0)
        return x, primal
    z = [forward_difference(x0, a) for a in axes]
    x, _, _, primal = admm_tv(physics, x0, aty, z, None, axes=axes, lam=tv_weight, rho=admm_rho, cg_iters=cg_iters,
                              admm_iters=admm_iters, gamma=gamma, anchor=x0)
    return x, primal


def sample_hybrid(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 50,
    particles: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    anchor: float = 0.3,
    tv_weight: float | None = None,
    tv_factor: float = 0.05,
    tv_gap: float = 0.0,
    eta: float = 1.0,
    admm_iters: int = 5,
    cg_iters: int = 5,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    sigmas: Sequence[float] | None = None,
    admm_penalty: float = 3.0,
    planes: str | None = None,
) -> ReconstructionResult:
    """Diffusion with a TV-regularised, σ_y-weighted data step around the Tweedie estimate (module docstring).

    Args:
        physics: any linear deepinv ``Physics`` on ``(B, C, H, W)`` images or ``(B, C, D, H, W)`` volumes.
        y: measurements ``(B, ...)``.
        prior: ``denoise(x, σ)``, ``sigma_min``, ``sigma_max``, ``nfe``.
        sigma_y: measurement noise std in the units of ``y``: weighs the data against the anchor and TV (0: DDS).
        steps: noise levels = network evaluations per chain.
        particles: independent chains per measurement (one ``P·B`` batch), averaged into ``x``; default
            ``IMAGE_CHAINS`` (2) for images, 1 for volumes (``default_chains``).
        generator: the seeded ``torch.Generator`` all randomness comes from.
        callback: called after every step with ``step``, ``steps``, ``sigma``, ``residual``, ``nfe``, ``seconds``,
            ``gamma``, ``admm_residual``.
        anchor: multiplies the anchor's weight ``1/r_i²`` (larger trusts the denoiser more; default 0.3,
            ``docs/methods/hybrid.md``).
        tv_weight: ``λ`` of ``λ TV(x)`` next to ``½‖Ax − y‖²/σ_y²``; default ``tv_factor · ‖A‖/σ_y`` on images,
            two thirds of it on volumes (``default_tv_weight``); 0: no TV.
        tv_factor: the default ``tv_weight`` in units of ``‖A‖/σ_y`` (0.05, chosen on CT tuning slices,
            ``docs/methods/hybrid.md``; MRI's own value in ``recon.samplers.registry.TUNED_OPTIONS``).
        tv_gap: the factor becomes ``tv_factor·exp(tv_gap·(u − 0.4))``, ``u`` the operator's ``unsampled_energy``
            (``sampling_factor``); 0 (default) or an operator without one: the factor as it is.
        eta: fraction of fresh noise in the re-noising (DDS's convention; default 1: each level re-noises the
            data-consistent estimate afresh, chosen on tuning slices over DDS's 0.85, ``docs/methods/hybrid.md``).
        admm_iters: ADMM iterations per data step.
        cg_iters: CG iterations per ADMM iteration.
        sigma_min, sigma_max, rho: the Karras schedule's lowest and highest level (clipped to the prior's range)
            and exponent.
        sigmas: explicit decreasing noise levels (override the schedule).
        admm_penalty: the ADMM penalty ``γ + admm_penalty·σ_y‖A‖``: with a few iterations it decides how far the
            data step gets, not where it converges (default 3, ``docs/methods/hybrid.md``).
        planes: on volumes, the planes a 2D prior denoises in (``PLANES``): ``"axial"`` (slice by slice along
            ``D``) or ``"cycle"`` (axial, coronal, sagittal in turn, one per level); default ``default_planes``
            (``"cycle"`` under a 2D prior on voxels within ``MAX_PLANE_ASPECT`` of isotropic); ignored on images.
    Returns:
        ``ReconstructionResult``: ``x`` (mean of the samples, or the sample), ``samples (P, B, ...)``, ``weights``,
        ``std`` (``P > 1``), ``diagnostics``, ``info`` (``options``: the resolved ``tv_weight``).
    """
    particles = default_chains(physics, y) if particles is None else particles
    _check(sigma_y, particles, anchor, tv_weight, tv_factor, eta, admm_iters, cg_iters, admm_penalty, tv_gap, planes)
    sy2 = float(sigma_y) ** 2
    c = start_chains(physics, y, prior, generator, steps, particles, sigma_min, sigma_max, rho, sigmas)
    sig, n, x, y_rep, template = c.sig, c.n, c.x, c.y_rep, c.template
    planes = default_planes(prior, template, voxel_spacing(physics)) if planes is None else planes
    if template.dim() == 5 and planes != "axial" and getattr(prior, "spatial_dims", None) != 2:
        raise ValueError(f"planes={planes!r} needs a 2D slice prior (spatial_dims 2) on a volume")
    norm_a = operator_norm(physics, template[:1])
    axes = tuple(range(template.dim() - 2))
    factor = float(tv_factor) * sampling_factor(physics, tv_gap)
    lam = default_tv_weight(factor, norm_a, sigma_y, len(axes)) if tv_weight is None else float(tv_weight)
    step = {"tv_weight": sy2 * lam, "axes": axes, "admm_iters": int(admm_iters), "cg_iters": int(cg_iters)}
    run = SamplerRun("hybrid", prior, generator, callback, steps=n, particles=c.p, options={
        "anchor": float(anchor), "tv_weight": lam, "tv_factor": float(tv_factor), "tv_gap": float(tv_gap),
        "eta": float(eta), "admm_iters": int(admm_iters), "cg_iters": int(cg_iters), "planes": planes,
        "admm_penalty": float(admm_penalty), "tv_axes": list(axes), "operator_norm": norm_a, "sigma_y": float(sigma_y),
        "sigma_max": float(sig[0]), "sigma_min": float(sig[n - 1])})
    with torch.no_grad():
        aty = physics.A_adjoint(y_rep)
        for i in range(n):
            s, s_next = float(sig[i]), float(sig[i + 1])
            x0 = denoise_in_plane(prior, x, s, PLANES[planes][i % len(PLANES[planes])])
            check_finite(x0, "hybrid", i, "the prior's denoiser returned non-finite values")
            gamma = sy2 * float(anchor) / tweedie_std(s) ** 2
            admm_rho = gamma + float(admm_penalty) * float(sigma_y) * norm_a  # follows the anchor and the noise
            x0dc, primal = tv_data_step(physics, x0, aty, gamma=gamma, admm_rho=admm_rho, **step)
            x = ddim_renoise(x, x0, x0dc, s, s_next, float(eta), generator)
            check_bounded(x0dc, "hybrid", i, 0.0, "raise anchor or lower cg_iters")
            residual = per_item_norm(y_rep - physics.A(x0dc)).mean()
            run.step(i, s, residual, gamma=gamma, admm_residual=primal)
    return chains_result(run, x0dc)


def _check(sigma_y, particles, anchor, tv_weight, tv_factor, eta, admm_iters, cg_iters, admm_penalty, tv_gap,
           planes) -> None:
    if not math.isfinite(float(tv_gap)):
        raise ValueError(f"tv_gap must be a finite number, got {tv_gap}")
    if planes is not None and planes not in PLANES:
        raise ValueError(f"planes must be one of {sorted(PLANES)}, got {planes!r}")
    if not (float(sigma_y) >= 0 and math.isfinite(float(sigma_y))):
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y}")
    if int(particles) < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    if not float(anchor) > 0:
        raise ValueError(f"anchor must be > 0, got {anchor}")
    if tv_weight is not None and not float(tv_weight) >= 0:
        raise ValueError(f"tv_weight must be >= 0, got {tv_weight}")
    if not (float(tv_factor) >= 0 and math.isfinite(float(tv_factor))):
        raise ValueError(f"tv_factor must be a finite number >= 0, got {tv_factor}")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if not float(admm_penalty) > 0:
        raise ValueError(f"admm_penalty must be > 0, got {admm_penalty}")
    if int(admm_iters) < 1 or int(cg_iters) < 0:
        raise ValueError(f"admm_iters must be >= 1 and cg_iters >= 0, got {admm_iters}, {cg_iters}")
