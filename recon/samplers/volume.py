r"""3D reconstruction with 2D diffusion priors: DiffusionMBIR and DDS, in the σ (variance-exploding) view.

Shapes: volumes ``(B, C, D, H, W)`` (``z`` along ``D``), or 2D images ``(B, C, H, W)``; the measurement model is
``y = physics.A(x0) + σ_y n`` with ``x0`` in the prior's normalised range and any linear deepinv ``Physics``. The
prior is called on the whole ``(B, C, D, H, W)`` volume; a 2D ``recon.priors.DiffusionPrior`` then runs its network
slice by slice along ``D``, in chunks set by its ``memory_budget`` (the ``memory_budget`` option sets it for the
duration of the call). With ``x = x0 + σ n``, ``x̂0 = prior.denoise(x, σ)`` is the Tweedie estimate and
``s = (x̂0 − x)/σ²`` the score. One "denoiser pass" evaluates every slice once: for a 2D slice prior it costs
one network evaluation (NFE) per slice, which is what the papers count.

Both methods alternate a slice-wise diffusion step with a data-consistency step on the *whole* volume, where the
slices are coupled by an anisotropic total variation along ``z`` (``D_z``: forward differences across slices):

.. math::

    \min_x\ \tfrac12\|A x - y\|^2 + \tfrac{\gamma}{2}\|x - \bar x\|^2 + \lambda \textstyle\sum_a \|D_a x\|_1,

by scaled ADMM with the splitting ``z_a = D_a x`` (``a`` over ``tv_axes``, ``z`` only by default):

.. code-block:: text

    b   = Aᵀy + γ x̄ + ρ Σ_a D_aᵀ(z_a − u_a)
    x   = CG(AᵀA + γ I + ρ Σ_a D_aᵀD_a, b), warm-started at the current x, ``cg_iters`` iterations
    z_a = shrink(D_a x + u_a, λ/ρ)
    u_a = u_a + D_a x − z_a

The auxiliaries ``z_a``, ``u_a`` *persist across diffusion steps* (as in both official codes: one ADMM iteration
per diffusion step continues the previous one). The conjugate gradients are deepinv's
``deepinv.optim.utils.conjugate_gradient`` with ``parallel_dim=0``: every batch row (particle × measurement) is
its own problem with its own step sizes (the official code's CG is the same on its single volume), run for
``cg_iters`` iterations unless every row is already solved to machine precision (``tol`` = the dtype's epsilon;
its absolute denominator guard ``eps`` is set to the dtype's smallest normal number so that it never biases a
step, whatever the scale of ``A``). Without TV axes (2D images by default, or
``tv_axes=()``) the ADMM reduces to plain CG on the normal equations. Differences are non-circular (the last
difference along an axis is 0, as deepinv's ``TVDenoiser.nabla`` and ``recon``'s ``sample_tv``);
``tv_boundary="circular"`` gives the official code's circular ``D_z`` (which couples the first and last slice).

DiffusionMBIR (Chung, Ryu, McCann, Klasky, Ye, CVPR 2023; HJ-harry/DiffusionMBIR, ``controllable_generation_TV.py``
``get_pc_radon_ADMM_TV_vol``): for each noise level ``σ_i → σ_{i+1}``

1. predictor, slice-wise (``predictor="reverse-diffusion"``, the official VE ``ReverseDiffusionPredictor``):
   ``x ← x + (σ_i² − σ_{i+1}²) s(x, σ_i) + sqrt(σ_i² − σ_{i+1}²) ξ``; ``"ancestral"``: the exact VE posterior
   step of ``recon.samplers.dps.ancestral_step`` (same mean, variance ``σ_{i+1}²(1 − σ_{i+1}²/σ_i²)``). The last
   step (``σ_{i+1} = 0``) returns the mean, i.e. the Tweedie estimate;
2. corrector, slice-wise, ``corrector_steps`` Langevin steps (official ``LangevinCorrector``, ``snr`` 0.16, 1 step):
   ``ε = 2 (snr ‖ξ‖/‖s‖)²``, ``x ← x + ε s(x, σ_{i+1}) + sqrt(2ε) ξ`` with the norms over each batch row (the whole
   volume); ``corrector_steps=0`` disables it;
3. data consistency: one ADMM-TV iteration (``admm_iters``) with ``cg_iters = 1`` CG iteration (official), ``γ = 0``.

After the last level, for CT (``final_consistency=None``: the physics has ``fbp``) one SIRT-like step
``x ← x + Aᵀ(y − A x)/(AᵀA 1)`` (official ``kaczmarz`` with ``final_consistency=True``). Output: ``x``. Cost: per
slice ``steps · (1 + corrector_steps) − corrector_steps`` NFE (no corrector after the last level): the paper's
``N = 2000`` levels give 3999 ≈ 4000 NFE per slice, plus ``steps · (cg_iters + 1)`` applications of ``AᵀA`` on the
volume.

DDS — Decomposed Diffusion Sampling (Chung, Lee, Ye, ICLR 2024; HJ-harry/DDS ``solver_2d.py``, ``solver_3d.py``):
for each level

1. ``x̂0 = denoise(x, σ_i)`` (slice-wise), ``ε̂ = (x − x̂0)/σ_i``;
2. data consistency: ``cg_iters`` CG iterations (default 5, the paper's choice; its ablation found more
   iterations worse) on ``(AᵀA + γ I) x = Aᵀy + γ x̂0`` *initialised at* ``x̂0``, the result replacing ``x̂0`` (the
   iterates stay in ``x̂0 + span{(AᵀA + γI)^k r_0}``, the paper's tangent-space argument; with ``γ = 0`` and enough
   iterations this is the projection of ``x̂0`` onto ``{A x = y}``). With ``tv_weight = λ > 0``: the ADMM-TV
   iteration above instead (``admm_iters = 1``, ``ρ``), as the official 3D CT script (``solver_3d.py``, ``γ = 0``);
3. DDIM re-noising as the official code does it, in σ: ``x ← x̂0 + σ_{i+1} (sqrt(1 − η²) ε̂ + η ξ)`` with the
   *network's* ``ε̂`` (not recomputed from the corrected ``x̂0``) and ``η`` the fraction of fresh noise (official
   ``c1 = sqrt(1 − ᾱ_next) η``, ``c2 = sqrt(1 − ᾱ_next) sqrt(1 − η²)``: not the DDIM paper's η);
   the last step returns the data-consistent ``x̂0``.

Output: the final data-consistent ``x̂0``. Cost: ``steps`` NFE per slice (default 50), plus
``steps · (cg_iters + 1)`` applications of ``AᵀA``.

Defaults and how the official ``lamb``/``rho`` map to ``lam``/``rho`` (``tv_weight``/``rho`` for DDS). The
official CT scripts (AAPM 256², 8 views; ``inverse_problem_solver_AAPM_3d_total.py``, DDS ``eval_SVCT_3d.sh``)
use ``lamb = 0.04``, ``rho = 10`` for images in ``[0, 1]`` and a back-projection ``AT = π/(2V)·Aᵀ`` (``V`` views;
``physics/ct.py``, ``IRadon(use_filter=None)``), which is not the adjoint of their ``A``. Written for the true
adjoint and the prior's ``[-1, 1]`` range (intensities ×2) this is the same minimiser with ``ρ = rho · 2V/π``
and ``λ = 2 · lamb · 2V/π`` (50.9 and 0.41 at 8 views, with ``A`` in pixel units, as ``recon``'s
``ParallelBeamCT`` with 1 mm pixels). Relative to ``‖A‖₂²`` that is ``ρ = 0.0256 ‖A‖²`` and
``λ/ρ = 0.008`` at 2, 4, 8 and 16 views alike, so the defaults are ``rho = 0.025 ‖A‖₂²`` and
``lam = 0.008 rho`` (``‖A‖₂`` by power iteration, once per call): the official CT setting, transferable to
other operators and scales. For MRI operators (``physics_modality``) DiffusionMBIR defaults instead to the
official MRI script's ``lamb = 0.005``, ``rho = 0.01`` (unit-norm ``mask ⊙ FFT``, images in ``[0, 1]``), i.e.
``ρ = 0.01 ‖A‖₂²`` and ``λ = 1.0 ρ`` in the prior's units: a large threshold, so ``z`` is mostly 0 and the step
is close to a quadratic smoothing of the slice differences with weight ``ρ``. Measured on 4× MRI of the unseen
``anatomical.nii`` (``benchmarks/README.md``): the CT transfer gives no gain over uncoupled slices, the MRI
setting +4.1 to +4.9 dB. λ/ρ is the shrinkage threshold on slice-to-slice differences, in the prior's units
(0.008 ≈ 8 HU for a ±1000 HU window). These are hand-tuned values (a known weakness of the
method); tune ``lam`` for real data. DDS's ``eta`` default 0.85 is the official code's (``main.py``,
``eval_SVCT_3d.sh``, 50 steps); the paper's MRI table uses 0.15 at 19 NFE, 0.5 at 49, 0.8 at 99. The official
DDS ``gamma`` (noisy data: ``(I + γ′ AᵀA) x = x̂0 + γ′ Aᵀy``, ``γ′ = 1`` on unit-norm MRI) is ``γ = 1/γ′`` here;
the default (``gamma=None``) follows the noise: ``γ = 0`` for noiseless data (the official noiseless setting; the
few CG iterations from ``x̂0`` are the regulariser, the paper's tangent-space argument) and, for ``σ_y > 0``,
``γ_i = σ_y²/r_i²`` with ``r_i = σ_i/sqrt(1 + σ_i²)`` (the Tweedie error scale in the prior's [-1, 1] range), so the
data step is ``min ‖Ax − y‖²/(2σ_y²) + ‖x − x̂0‖²/(2r_i²)`` and more noise never fits the noise (derivation and
measurements: ``docs/methods/dds.md``). ``gamma=0.0`` gives the earlier default (γ = 0 whatever the noise), which
fits the noise: on the 3D exact-posterior tests the noise-aware γ is better on every operator
(``tests/test_samplers_volume.py``), and on the head CT of ``benchmarks/README.md`` (128², 1 % noise) it gains
2.5 dB at 30 views and 4.7 dB at 60.

Deviations from the official codes: the σ schedule is the prior's (Karras by default; the official VE code uses
the geometric ``σ_min (σ_max/σ_min)^t``, pass ``sigmas=`` for it); the corrector is evaluated at ``σ_{i+1}``,
the level the predictor has just reached (the official code re-uses ``σ_i``), with its step size per batch row
(the official code averages the norms over its GPU chunk of 12 slices, which makes the step depend on the
chunking); differences are non-circular by default (see above).

Pitfall of the persistent ADMM state in DiffusionMBIR: ``z`` holds ``D_z x`` of the previous, noisier iterate, so
each data step pulls the slice differences toward the previous level's noise. One CG iteration per level (the
official setting) keeps that pull small; more iterations enforce it. Measured with ``recon``'s default CT prior,
4 slices of 64² Shepp–Logan, 30 views, 50 levels, no corrector: 28.0 dB with ``cg_iters=1``, 12.0 dB with 2 and
−8.4 dB with 5 (TV-z on, default λ, ρ), but 43.1 dB with 5 and ``tv_axes=()``. DDS does not suffer from it (its
ADMM acts on the clean estimates ``x̂0``): 8 views, 20 levels, 40.0 dB without TV, 42.0 dB with the official TV-z
(``tv_weight=None``), 43.1 dB with ``cg_iters=10`` as well; FBP 17.3 dB, DiffusionMBIR 38.7 dB at 100 levels.

The anchored coupling (``method="dds3d"``, ``recon reconstruct --method dds3d``). DDS's data step is meant to
stay near the Tweedie estimate ``x̂0`` (the tangent-space argument above). With the TV-z coupling and the
official persistent ADMM it does not: for an operator with a large null space (Cartesian MRI: ``AᵀA`` is a
projection) the CG solve of ``(AᵀA + ρ D_zᵀD_z) x = …`` hands the unmeasured components to the TV term and the
auxiliaries ``z``, ``u`` carried over from earlier, noisier estimates, and nothing pulls them back to ``x̂0``
(measured on 4× MRI of the MNI152 volume: 1.8–3.2 dB *below* uncoupled DDS, ``benchmarks/README.md``). The
anchored coupling makes each step's data consistency a well-posed problem of its own,

    x̂0 ← argmin_x ½‖A x − y‖² + ρ/2 ‖x − x̂0‖² + λ ‖D_z x‖₁,

the proximal map of data fidelity plus TV-z around the denoiser's estimate, solved by ``admm_iters = 5`` ADMM
iterations from ``z = u = 0`` (``admm_persistent=False``, ``gamma="rho"``: the anchor weighs like the ADMM
penalty ``ρ = 0.025 ‖A‖₂²``), with the threshold ``λ/ρ = 0.024`` (``tv_threshold``). These values were chosen on
32³ tuning cases (CT phantom and MRI, seed 1; about 15 settings; ``γ = ρ`` rather than the 0.2 dB better
``γ = 0.3 ρ`` of that grid, for one constant fewer) and then run unchanged
on the 64³ benchmark volumes (seed 0), where DDS-20 with them beats both uncoupled DDS (CT +3.1/+3.3/+2.4 dB,
MRI +2.1/+3.6/+2.8 dB axial/coronal/sagittal) and 200-level DiffusionMBIR on CT (+0.0/+0.4/+0.4 dB at 20 instead
of 399 NFE per slice), and come within 0.6 dB of it on MRI (0.8 dB on the unseen ``anatomical.nii``).
``method="dds"`` keeps the official defaults (no coupling unless ``tv_weight`` is given).

``particles = P`` runs ``P`` independent chains per measurement as one ``P·B`` batch (row ``p·B + b``), as
``recon.samplers.dps``: ``samples (P, B, ...)``, uniform weights, ``x`` their mean (``P > 1``) or the sample.

Checkpoint and resume (long runs). With ``checkpoint=PATH`` the state after every ``checkpoint_every`` completed
steps, after the last step, and when a ``KeyboardInterrupt`` (Ctrl-C, or raised by ``callback``) stops the loop,
is written atomically (``recon.datasets.io.atomic_write_bytes`` of a ``torch.save``): the iterate ``x`` (which is
also the CG warm start: MBIR warm-starts at ``x``, DDS at ``x̂0`` computed from it), the ADMM variables ``z``,
``u``, the generator state (``generator.get_state()``), the number of completed steps, the diagnostics so far, and
the sampler's options as JSON text (with the seed, the shapes and a fingerprint of ``y``). The interrupt is
re-raised after the write. ``resume=True`` continues from ``PATH`` if it exists (else starts afresh) and refuses,
with a ``ValueError`` naming the file, a checkpoint whose method, options, shapes or measurements differ. With the
same seed a resumed run gives exactly the volume of an uninterrupted one (same device and dtype). A checkpoint of
a finished run returns the result without sampling again. The write costs one serialised copy of the state in
memory; options that do not change the result (``checkpoint``, ``checkpoint_every``, ``resume``,
``memory_budget``) are not compared.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
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

__all__ = [
    "MBIR_OFFICIAL",
    "RHO_PER_OPERATOR_NORM2",
    "TV_THRESHOLD",
    "admm_tv",
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
_CHECKPOINT_FORMAT = "recon-volume-sampler-checkpoint"


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
def _json_ready(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, (tuple, list)):
        return [_json_ready(e) for e in v]
    if isinstance(v, dict):
        return {str(k): _json_ready(e) for k, e in v.items()}
    if hasattr(v, "tolist"):  # numpy arrays and scalars
        return v.tolist()
    return v


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


def _fingerprint(y: torch.Tensor) -> list:
    yd = y.detach().double()
    return [float(yd.sum()), float(yd.norm())]


class _Run:
    """Bookkeeping shared by both samplers: timing, NFE, diagnostics, callback, checkpoint and resume."""

    def __init__(self, method, prior, generator, callback, checkpoint, checkpoint_every, resume, options, y):
        self.t0 = time.perf_counter()
        self.method = method
        self.prior = prior
        self.generator = generator
        self.callback = callback
        self.path = None if checkpoint is None else os.fspath(checkpoint)
        self.every = int(checkpoint_every)
        if self.every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if resume and self.path is None:
            raise ValueError("resume=True needs checkpoint=PATH")
        if self.path is not None and generator is None:
            raise ValueError("checkpointing needs a seeded torch.Generator (generator=...) to resume exactly")
        self.options = json.loads(json.dumps(_json_ready(options)))
        self.fingerprint = _fingerprint(y)
        self.resume = bool(resume)
        self.nfe0 = getattr(prior, "nfe", 0)
        self.nfe_offset = 0
        self.seconds_offset = 0.0
        self.calls = 0  # denoiser passes over the volume (= NFE per slice for a 2D slice prior)
        self.diagnostics: list[dict] = []
        self.start = 0
        self.resumed_from = None

    # -- resume -------------------------------------------------------------------------------------
    def load(self, device) -> dict | None:
        if not self.resume or not os.path.isfile(self.path):
            return None
        # on the CPU first: the generator state must stay a CPU ByteTensor (also for a CUDA generator)
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{self.path}: not a recon volume-sampler checkpoint")
        if state.get("method") != self.method:
            raise ValueError(f"{self.path}: a checkpoint of {state.get('method')!r}, not of {self.method!r}")
        saved = json.loads(state["options"])
        keys = sorted(set(saved) | set(self.options))
        mismatched = [k for k in keys if saved.get(k) != self.options.get(k)]
        if mismatched:
            detail = ", ".join(f"{k}: {saved.get(k)!r} there, {self.options.get(k)!r} now" for k in mismatched[:4])
            raise ValueError(
                f"{self.path}: the checkpoint was written with different options or shapes ({detail}); "
                "run with the same options, or remove the file / use resume=False to start afresh"
            )
        fp = [float(v) for v in state["fingerprint"]]
        if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(fp, self.fingerprint, strict=True)):
            raise ValueError(f"{self.path}: the checkpoint was written for different measurements y")
        self.generator.set_state(state["generator"])
        self.start = int(state["step"])
        self.resumed_from = self.start
        self.diagnostics = json.loads(state["diagnostics"])
        self.nfe_offset = int(state["nfe"])
        self.calls = int(state["denoiser_calls"])
        self.seconds_offset = float(state["seconds"])
        state["x"] = state["x"].to(device)
        state["z"] = [t.to(device) for t in state["z"]]
        state["u"] = [t.to(device) for t in state["u"]]
        return state

    # -- checkpoint ----------------------------------------------------------------------------------
    def commit(self, step_done: int, tensors: dict) -> None:
        """Record the state after ``step_done`` completed steps (the point a checkpoint resumes from)."""
        gen_state = self.generator.get_state() if self.path else None
        self.committed = (step_done, tensors, gen_state, self.nfe(), self.calls, self.seconds())

    def save(self) -> None:
        if self.path is None or not hasattr(self, "committed"):
            return
        from recon.datasets.io import atomic_write_bytes

        step_done, tensors, gen_state, nfe, calls, seconds = self.committed
        state = {
            "format": _CHECKPOINT_FORMAT,
            "version": 1,
            "method": self.method,
            "options": json.dumps(self.options),
            "fingerprint": self.fingerprint,
            "step": int(step_done),
            "generator": gen_state,
            "diagnostics": json.dumps(self.diagnostics[:step_done]),
            "nfe": int(nfe),
            "denoiser_calls": int(calls),
            "seconds": float(seconds),
            **tensors,
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(buf.getvalue(), self.path, overwrite=True)

    def interrupted(self) -> None:
        """Ctrl-C (or a callback raising ``KeyboardInterrupt``): write the last completed step's state."""
        if self.path is None or not hasattr(self, "committed"):
            return
        self.save()
        log.warning("%s interrupted after %d steps; checkpoint written to %s (continue with resume=True)",
                    self.method, self.committed[0], self.path)

    def maybe_save(self, step_done: int, n: int) -> None:
        if self.path is not None and (step_done % self.every == 0 or step_done == n):
            self.save()

    # -- diagnostics ---------------------------------------------------------------------------------
    def nfe(self) -> int:
        return getattr(self.prior, "nfe", 0) - self.nfe0 + self.nfe_offset

    def seconds(self) -> float:
        return time.perf_counter() - self.t0 + self.seconds_offset

    def record(self, step, steps, sigma, residual, **extra) -> None:
        info = {
            "step": int(step),
            "steps": int(steps),
            "sigma": float(sigma),
            "residual": float(residual),
            "nfe": int(self.nfe()),
            "seconds": self.seconds(),
            **extra,
        }
        self.diagnostics.append(info)

    def notify(self) -> None:
        if self.callback is not None:
            self.callback(dict(self.diagnostics[-1]))


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
def sample_diffusion_mbir(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 2000,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    lam: float | None = None,
    rho: float | None = None,
    settings: str | None = None,
    cg_iters: int = 1,
    admm_iters: int = 1,
    tv_axes: Sequence[int] | int | None = None,
    tv_boundary: str = "neumann",
    predictor: str = "reverse-diffusion",
    corrector_steps: int = 1,
    corrector_snr: float = 0.16,
    final_consistency: bool | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    schedule_rho: float = 7.0,
    sigmas=None,
    memory_budget: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
) -> ReconstructionResult:
    """DiffusionMBIR: slice-wise predictor–corrector with a 2D prior + ADMM-TV along ``z`` on the whole volume.

    See the module docstring for the update rules, the defaults' provenance and checkpointing.

    Args:
        physics: any linear deepinv ``Physics`` on ``(B, C, D, H, W)`` volumes (or ``(B, C, H, W)`` images).
        y: measurements ``(B, ...)``.
        prior: ``denoise(x, σ)``, ``sigma_min``, ``sigma_max``, ``nfe`` (a 2D ``DiffusionPrior`` runs slice-wise).
        sigma_y: recorded only (the data-consistency step is the unweighted least squares of the paper).
        steps: noise levels (paper: 2000; NFE per slice ``steps·(1 + corrector_steps) − corrector_steps``).
        particles: independent chains per measurement, one ``P·B`` batch.
        generator: the seeded ``torch.Generator`` all randomness comes from.
        callback: called after every step with ``step``, ``steps``, ``sigma``, ``residual`` (‖y − A x̂0‖ of the
            predictor's Tweedie estimate), ``nfe``, ``seconds``, ``admm_residual``.
        lam: TV weight ``λ`` in the units of ``½‖Ax − y‖²`` (default: the official value for the modality,
            ``0.008 ρ`` for CT and other operators, ``1.0 ρ`` for MRI).
        rho: ADMM penalty ``ρ`` (default ``0.025 ‖A‖₂²`` for CT and other operators, ``0.01 ‖A‖₂²`` for MRI: the
            official scripts'); see the module docstring. Both unused (reported as 0) without TV axes.
        settings: ``"ct"`` or ``"mri"``: whose official ``λ``, ``ρ`` the defaults take (default: ``"mri"`` for
            Fourier-sampling operators, see ``physics_modality``, else ``"ct"``).
        cg_iters: CG iterations per ADMM iteration (official: 1; more hurt with TV-z on, see the module docstring);
            admm_iters: ADMM iterations per step (official: 1).
        tv_axes: spatial axes of the TV: default ``(0,)`` (``z``) for volumes, ``()`` (off) for 2D images;
            ``(0, 1, 2)`` for full anisotropic 3D TV; ``()`` turns the coupling off (CG on ``AᵀA x = Aᵀy``).
        tv_boundary: ``"neumann"`` (default) or ``"circular"`` (official) differences.
        predictor: ``"reverse-diffusion"`` (official) or ``"ancestral"``.
        corrector_steps: Langevin corrector steps per level (official 1; 0 disables); corrector_snr: its ``snr``.
        final_consistency: the final SIRT-like step; default: on for CT (the physics has ``fbp``).
        sigma_min, sigma_max, schedule_rho: Karras schedule in the prior's range; ``sigmas`` overrides it.
        memory_budget: bytes per network call, set on the prior for this call (``DiffusionPrior.memory_budget``).
        checkpoint, checkpoint_every, resume: see the module docstring.

    Returns:
        ``ReconstructionResult`` with ``x`` (mean of the samples, or the sample), ``samples (P, B, ...)``,
        uniform ``weights``, ``std`` (``P > 1``), per-step ``diagnostics``, ``info`` (``denoiser_calls`` = NFE per
        slice, resolved ``lam``/``rho``).
    """
    method = "diffusion-mbir"
    if settings not in (None, *MBIR_OFFICIAL):
        raise ValueError(f"settings must be one of {', '.join(MBIR_OFFICIAL)} (or None: from the physics), "
                         f"got {settings!r}")
    if predictor not in ("reverse-diffusion", "ancestral"):
        raise ValueError(f"predictor must be 'reverse-diffusion' or 'ancestral', got {predictor!r}")
    if int(corrector_steps) < 0:
        raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
    if int(corrector_steps) > 0 and not corrector_snr > 0:
        raise ValueError(f"corrector_snr must be > 0, got {corrector_snr}")
    _check_common(particles, cg_iters, admm_iters, tv_boundary)
    p, b = int(particles), y.shape[0]
    sig = sigma_schedule(prior, steps, sigma_min, sigma_max, schedule_rho, sigmas)
    n = sig.numel() - 1
    template = repeat_batch(image_template(physics, y), p)
    spatial = template.dim() - 2
    axes = _tv_axes(tv_axes, spatial)
    norm_a, rho_v, lam_v = None, 0.0, 0.0  # without TV axes λ and ρ play no part (reported as 0)
    if axes:
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
    if final_consistency is None:
        final_consistency = callable(getattr(physics, "fbp", None))
    options = {
        "lam": lam_v,
        "rho": rho_v,
        "settings": (settings or physics_modality(physics)) if axes else None,
        "cg_iters": int(cg_iters),
        "admm_iters": int(admm_iters),
        "tv_axes": list(axes),
        "tv_boundary": tv_boundary,
        "predictor": predictor,
        "corrector_steps": int(corrector_steps),
        "corrector_snr": float(corrector_snr),
        "final_consistency": bool(final_consistency),
        "sigmas": sig.tolist(),
        "sigma_y": float(sigma_y),
    }
    run = _Run(
        method, prior, generator, callback, checkpoint, checkpoint_every, resume,
        {**options, "particles": p, "seed": _seed_of(generator), "x_shape": list(template.shape),
         "y_shape": list(y.shape), "dtype": str(template.dtype), "physics": type(physics).__name__},
        y,
    )
    hint = "reduce corrector_snr or rho/lam (the ADMM-TV step), or use more steps"
    with torch.no_grad(), _MemoryBudget(prior, memory_budget):
        y_rep = repeat_batch(y, p).detach()
        aty = physics.A_adjoint(y_rep)
        state = run.load(template.device)
        if state is None:
            x = float(sig[0]) * randn(template.shape, generator, template.dtype, template.device)
            z, u = [], []
        else:
            x, z, u = state["x"], list(state["z"]), list(state["u"])
        run.commit(run.start, {"x": x, "z": z, "u": u})
        try:
            for i in range(run.start, n):
                s, s_next = float(sig[i]), float(sig[i + 1])
                x0 = prior.denoise(x, s)
                run.calls += 1
                check_finite(x0, method, i, "the prior's denoiser returned non-finite values")
                residual = float(per_item_norm(y_rep - physics.A(x0)).mean())
                if s_next <= 0:
                    xn = x0
                elif predictor == "ancestral":
                    xn = ancestral_step(x, x0, s, s_next, generator, 1.0)
                else:
                    g2 = s * s - s_next * s_next
                    xn = x + (g2 / (s * s)) * (x0 - x) + math.sqrt(g2) * randn(x.shape, generator, x.dtype, x.device)
                del x0
                if s_next > 0:
                    for _ in range(int(corrector_steps)):
                        score = (prior.denoise(xn, s_next) - xn) / (s_next * s_next)
                        run.calls += 1
                        noise = randn(xn.shape, generator, xn.dtype, xn.device)
                        ratio = per_item_norm(noise) / per_item_norm(score).clamp_min(torch.finfo(xn.dtype).tiny)
                        eps = (2.0 * (float(corrector_snr) * ratio) ** 2).reshape(-1, *([1] * (xn.dim() - 1)))
                        xn = xn + eps * score + (2.0 * eps).sqrt() * noise
                        del score, noise
                check_finite(xn, method, i, hint)
                xn, zn, un, primal = admm_tv(
                    physics, xn, aty, z, u, axes=axes, lam=lam_v, rho=rho_v, cg_iters=cg_iters,
                    admm_iters=admm_iters, boundary=tv_boundary,
                )
                check_finite(xn, method, i, hint)
                x, z, u = xn, zn, un
                run.record(i, n, s, residual, admm_residual=primal)
                run.commit(i + 1, {"x": x, "z": z, "u": u})
                run.maybe_save(i + 1, n)
                run.notify()
        except KeyboardInterrupt:
            run.interrupted()
            raise
        if final_consistency:
            ones = torch.ones_like(x[:1])
            norm_const = _ata(physics, ones)
            safe = torch.where(norm_const > 0, norm_const, torch.ones_like(norm_const))
            step = torch.where(norm_const > 0, physics.A_adjoint(y_rep - physics.A(x)) / safe, torch.zeros_like(x))
            x = x + step
            check_finite(x, method, n, "set final_consistency=False")
    info_extra = {"operator_norm": norm_a, "memory_budget": memory_budget}
    return _finish(method, x, p, b, run, n, {**options, "sigma_max": float(sig[0]), "sigma_min": float(sig[n - 1])},
                   info_extra)


def _seed_of(generator: torch.Generator | None):
    return None if generator is None else int(generator.initial_seed())


# ---------------------------------------------------------------------------------------------------------
# DDS
# ---------------------------------------------------------------------------------------------------------
def sample_dds(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 50,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    eta: float = 0.85,
    cg_iters: int = 5,
    gamma: float | str | None = None,
    tv_weight: float | None = 0.0,
    tv_threshold: float = TV_THRESHOLD,
    rho: float | None = None,
    admm_iters: int = 1,
    tv_axes: Sequence[int] | int | None = None,
    tv_boundary: str = "neumann",
    admm_persistent: bool = True,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    schedule_rho: float = 7.0,
    sigmas=None,
    memory_budget: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
) -> ReconstructionResult:
    """DDS: DDIM steps whose Tweedie estimate is made data-consistent by a few CG iterations on the whole volume.

    See the module docstring for the update rules, the defaults' provenance and checkpointing.

    Args:
        physics, y, prior, particles, generator: as ``sample_diffusion_mbir``.
        sigma_y: measurement noise std in the units of ``y``; with the default ``gamma`` it sets
            ``γ_i = σ_y²(1 + σ_i²)/σ_i²`` per level (0: ``γ = 0``).
        steps: noise levels = NFE per slice (default 50, the official scripts' ``T_sampling``).
        callback: called after every step with ``step``, ``steps``, ``sigma``, ``residual`` (‖y − A x̂0‖ of the
            data-consistent estimate), ``nfe``, ``seconds``, ``admm_residual``.
        eta: fraction of fresh noise in the re-noising (official DDS convention; default 0.85, official code).
        cg_iters: CG iterations per step (default 5, the paper's ablation); 0: no data consistency.
        gamma: weight of ``‖x − x̂0‖²`` in ``(AᵀA + γI) x = Aᵀy + γ x̂0`` (default None: noise-aware, ``σ_y²/r_i²``
            per level, 0 when ``σ_y = 0``; 0: plain CG from ``x̂0``, the iteration count regularises; ``‖A‖₂²`` is
            the official noisy ``γ′ = 1`` relative to the operator's scale);
            ``"rho"``: ``γ = ρ`` of the TV coupling, 0 without it (the anchored coupling of ``dds3d``, module
            docstring).
        tv_weight: ``λ`` of the optional TV coupling (default 0: off; None: ``tv_threshold · ρ``).
        tv_threshold: ``λ/ρ`` when ``tv_weight`` is None (default 0.008, the official 3D CT value; in the prior's
            units, the shrinkage threshold on slice-to-slice differences).
        rho, admm_iters, tv_axes, tv_boundary: as ``sample_diffusion_mbir`` (used when ``tv_weight > 0``).
        admm_persistent: keep ``z``, ``u`` across diffusion steps (default, the official code); False starts each
            step's ADMM afresh from ``z = u = 0``, as the first step (no memory of the earlier, noisier estimates).
        sigma_min, sigma_max, schedule_rho, sigmas, memory_budget, checkpoint, checkpoint_every, resume: as
            ``sample_diffusion_mbir``.

    Returns:
        ``ReconstructionResult``: ``x`` the final data-consistent ``x̂0`` (mean over particles when ``P > 1``),
        ``samples``, ``weights``, ``std``, ``diagnostics``, ``info``.
    """
    method = "dds"
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if tv_weight is not None and not float(tv_weight) >= 0:
        raise ValueError(f"tv_weight must be >= 0 (0: no TV coupling), got {tv_weight}")
    _check_common(particles, cg_iters, admm_iters, tv_boundary)
    p, b = int(particles), y.shape[0]
    sig = sigma_schedule(prior, steps, sigma_min, sigma_max, schedule_rho, sigmas)
    n = sig.numel() - 1
    template = repeat_batch(image_template(physics, y), p)
    spatial = template.dim() - 2
    coupled = tv_weight is None or float(tv_weight) > 0
    axes = _tv_axes(tv_axes, spatial) if coupled else ()
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
    noise_aware = gamma is None and float(sigma_y) > 0  # γ_i = σ_y²/r_i² per level (module docstring)
    options = {
        "eta": float(eta),
        "cg_iters": int(cg_iters),
        "gamma": "noise-aware" if noise_aware else gamma_v,
        "tv_weight": lam_v,
        "rho": rho_v,
        "admm_iters": int(admm_iters),
        "tv_axes": list(axes),
        "tv_boundary": tv_boundary,
        "admm_persistent": bool(admm_persistent),
        "sigmas": sig.tolist(),
        "sigma_y": float(sigma_y),
    }
    run = _Run(
        method, prior, generator, callback, checkpoint, checkpoint_every, resume,
        {**options, "particles": p, "seed": _seed_of(generator), "x_shape": list(template.shape),
         "y_shape": list(y.shape), "dtype": str(template.dtype), "physics": type(physics).__name__},
        y,
    )
    hint = "reduce cg_iters or raise gamma (the data-consistency step)"
    c_keep, c_fresh = math.sqrt(max(0.0, 1.0 - float(eta) ** 2)), float(eta)
    with torch.no_grad(), _MemoryBudget(prior, memory_budget):
        y_rep = repeat_batch(y, p).detach()
        aty = physics.A_adjoint(y_rep)
        state = run.load(template.device)
        if state is None:
            x = float(sig[0]) * randn(template.shape, generator, template.dtype, template.device)
            z, u = [], []
        else:
            x, z, u = state["x"], list(state["z"]), list(state["u"])
        run.commit(run.start, {"x": x, "z": z, "u": u})
        try:
            for i in range(run.start, n):
                s, s_next = float(sig[i]), float(sig[i + 1])
                x0 = prior.denoise(x, s)
                run.calls += 1
                check_finite(x0, method, i, "the prior's denoiser returned non-finite values")
                if not admm_persistent:
                    z, u = [], []
                gamma_i = float(sigma_y) ** 2 / tweedie_std(s) ** 2 if noise_aware else gamma_v
                x0dc, zn, un, primal = admm_tv(
                    physics, x0, aty, z, u, axes=axes, lam=lam_v, rho=rho_v, cg_iters=cg_iters,
                    admm_iters=admm_iters, gamma=gamma_i, anchor=x0, boundary=tv_boundary,
                )
                check_finite(x0dc, method, i, hint)
                residual = float(per_item_norm(y_rep - physics.A(x0dc)).mean())
                if s_next > 0:
                    noise = randn(x.shape, generator, x.dtype, x.device)
                    xn = x0dc + (s_next * c_keep / s) * (x - x0) + (s_next * c_fresh) * noise
                    del noise
                else:
                    xn = x0dc
                del x0, x0dc
                check_finite(xn, method, i, hint)
                x, z, u = xn, zn, un
                run.record(i, n, s, residual, admm_residual=primal, gamma=gamma_i)
                run.commit(i + 1, {"x": x, "z": z, "u": u})
                run.maybe_save(i + 1, n)
                run.notify()
        except KeyboardInterrupt:
            run.interrupted()
            raise
    info_extra = {"operator_norm": norm_a, "memory_budget": memory_budget}
    return _finish(method, x, p, b, run, n, {**options, "sigma_max": float(sig[0]), "sigma_min": float(sig[n - 1])},
                   info_extra)
