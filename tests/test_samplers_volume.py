"""DiffusionMBIR and DDS (``recon.samplers.volume``): 3D reconstruction with slice-wise priors and TV-z coupling.

Exact-posterior check. Prior ``GaussianMixturePrior.random((1, 4, 6, 6), n_components=2, seed=3)`` (full
covariances, volume ``C=1, D=4, H=W=6``, correlated across slices too), ``σ_y = 0.05``, one ground truth drawn from
the prior (seed 7); 16 independent samples per method (``x`` = their mean), seed 0; error = ‖x − m‖/‖m‖ against
the exact posterior mean ``m``. DiffusionMBIR: 200 levels, defaults otherwise (reverse-diffusion predictor, one
Langevin corrector step, one ADMM-TV iteration with one CG iteration per level, TV along z with the default λ, ρ;
the final SIRT step for CT). DDS: 50 levels, defaults (η = 0.85, 5 CG iterations, no TV, the noise-aware
``γ_i = σ_y²(1 + σ_i²)/σ_i²``). Measured:

===================================================  ========  =====  =====  ==============  =============
operator                                             analytic  MBIR   DDS    16 exact draws  analytic is
===================================================  ========  =====  =====  ==============  =============
``ParallelBeamCT((4, 6, 6), angles=4)``              0.245     0.022  0.026  0.020           FBP
``CartesianMRI``, 2D mask per slice, real input      0.263     0.057  0.036  0.022           zero-filled
``Downsampling((4, 6, 6), factor=2, axes=0)``        0.230     0.073  0.042  0.031           least squares
``Inpainting``, ``missing_slice_mask`` (z = 1, 2)    0.692     0.075  0.048  0.037           zero-filled
72 × 144 Gaussian matrix, deepinv ``LinearPhysics``  0.659     0.118  0.082  0.031           ``A_dagger``
===================================================  ========  =====  =====  ==============  =============

("16 exact draws": the error of the mean of 16 exact posterior samples, mean over 20 draws: the Monte-Carlo floor.)
The pins are 1.5× the measured errors (and at most half the analytic inverse's error). Beyond the Monte-Carlo floor,
neither method is an exact posterior sampler (MBIR's data step is unweighted least squares with one CG iteration;
DDS's is a few CG iterations from x̂0 and it re-noises with a fixed η). DDS's error depends on its ``γ``: with the
noise-aware default (above) it is lower on every row than with ``γ = 0`` (the default before: 0.083 / 0.055 / 0.071 /
0.061 / 0.102), with ``γ = ‖A‖²`` 0.053 / 0.057 / 0.071 / 0.104 / 0.248, with ``γ = 0.3‖A‖²`` 0.025 / 0.055 / 0.071 /
0.071 / 0.148 (same rows).

TV-z coupling (``test_tv_z_coupling_beats_slice_wise``), see its docstring for the problem; error of single
samples in the central coronal / sagittal planes (mean over 4 independent samples), independent slices → coupled
(``lam = tv_weight = 0.01‖A‖²``; over 4 noise draws × 2 seeds the ratios were 0.66–0.77 coronal and 0.73–0.82
sagittal; pinned below 0.85 and 0.9):

==========  ==================  ==================
method      coronal             sagittal
==========  ==================  ==================
MBIR        0.370 → 0.283       0.455 → 0.350
DDS         0.306 → 0.208       0.447 → 0.348
==========  ==================  ==================

Run ``pytest -s`` to see the numbers printed.
"""

from __future__ import annotations

import json
import math
import os

import deepinv
import pytest
import torch
from torch import nn

import recon
from recon.datasets.phantoms import shepp_logan_3d
from recon.operators import CartesianMRI, Downsampling, Inpainting, ParallelBeamCT, missing_slice_mask
from recon.priors.base import DiffusionPrior
from recon.priors.gaussian import GaussianMixturePrior
from recon.priors.schedules import VPSchedule
from recon.samplers import SamplerDivergence, reconstruct
from recon.samplers.base import operator_norm
from recon.samplers.baselines import analytic_inverse
from recon.samplers.volume import (
    admm_tv,
    forward_difference,
    forward_difference_adjoint,
    normal_cg,
    sample_dds,
    sample_diffusion_mbir,
)

F64 = torch.float64
SIGMA_Y = 0.05
D, H, W = 4, 6, 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny problems


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.reshape(b.shape) - b).norm() / b.norm())


def make_physics(kind: str):
    if kind == "ct":
        return ParallelBeamCT((D, H, W), angles=4)
    if kind == "mri":
        mask = torch.zeros(H, W)
        mask[:, ::2] = 1
        mask[:, 2:4] = 1
        return CartesianMRI((D, H, W), mask=mask, real_input=True)
    if kind == "sr":
        return Downsampling((D, H, W), factor=2, axes=0)
    if kind == "matrix":  # a plain deepinv LinearPhysics: a dense 72 × 144 Gaussian matrix on the volume
        m = torch.randn(72, D * H * W, generator=gen(11), dtype=F64) / 12
        return deepinv.physics.LinearPhysics(
            A=lambda v: v.reshape(v.shape[0], -1) @ m.T,
            A_adjoint=lambda r: (r @ m).reshape(r.shape[0], 1, D, H, W),
        )
    return Inpainting((D, H, W), missing_slice_mask((D, H, W), missing=[1, 2]))


def make_problem(kind: str, seed: int = 7):
    prior = GaussianMixturePrior.random((1, D, H, W), n_components=2, seed=3)
    physics = make_physics(kind)
    g = gen(seed)
    x = prior.sample(1, g)
    ax = physics.A(x)
    y = ax + SIGMA_Y * torch.randn(ax.shape, generator=g, dtype=F64)
    return prior, physics, y


def dense(fn, shape) -> torch.Tensor:
    """The matrix of a linear map on tensors of ``shape = (1, C, ...)``, column by column."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=F64).reshape(d, *shape[1:])
    return fn(basis).reshape(d, -1).T


# ---------------------------------------------------------------------------------------------------------
# against the exact posterior
# ---------------------------------------------------------------------------------------------------------
MEASURED = {  # kind: (analytic, MBIR, DDS) relative errors to the exact posterior mean
    "ct": (0.245, 0.022, 0.026),  # DDS with its noise-aware γ (γ = 0: 0.083, 0.055, 0.071, 0.061, 0.102)
    "mri": (0.263, 0.057, 0.036),
    "sr": (0.230, 0.073, 0.042),
    "inpaint": (0.692, 0.075, 0.048),
    "matrix": (0.659, 0.118, 0.082),
}


@pytest.mark.parametrize("kind", list(MEASURED))
def test_against_exact_posterior_mean(kind):
    prior, physics, y = make_problem(kind)
    mean = prior.posterior(physics, y, SIGMA_Y).mean
    err_ai = rel_err(analytic_inverse(physics, y), mean)
    # the CT weights everywhere: the MRI default (threshold λ/ρ = 1) is a strong z-smoothing prior of its own, which
    # this random mixture does not share (measured 0.136 on "mri" with it), while the CT one is nearly neutral
    mbir = sample_diffusion_mbir(physics, y, prior, sigma_y=SIGMA_Y, steps=200, particles=16, generator=gen(0),
                                 settings="ct")
    dds = sample_dds(physics, y, prior, sigma_y=SIGMA_Y, steps=50, particles=16, generator=gen(0))
    err_mbir, err_dds = rel_err(mbir.x, mean), rel_err(dds.x, mean)
    print(f"\n{kind}: analytic {err_ai:.3f}, diffusion-mbir {err_mbir:.3f}, dds {err_dds:.3f}")
    ai, m_mbir, m_dds = MEASURED[kind]
    assert err_ai == pytest.approx(ai, abs=2e-3)
    assert err_mbir < min(1.5 * m_mbir, 0.5 * err_ai)
    assert err_dds < min(1.5 * m_dds, 0.5 * err_ai)
    for res in (mbir, dds):
        assert res.x.shape == (1, 1, D, H, W) and res.samples.shape == (16, 1, 1, D, H, W)
        assert res.std is not None and res.weights.shape == (16, 1)
    assert mbir.info["denoiser_calls"] == 200 * 2 - 1  # predictor + one corrector step, none after the last level
    assert dds.info["denoiser_calls"] == 50 and dds.nfe == 50 * 16


# ---------------------------------------------------------------------------------------------------------
# the data-consistency machinery
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("boundary", ["neumann", "circular"])
def test_differences_are_adjoint(boundary):
    g = gen(0)
    x = torch.randn(2, 1, 5, 4, 3, generator=g, dtype=F64)
    v = torch.randn(2, 1, 5, 4, 3, generator=g, dtype=F64)
    for axis in (0, 1, 2):
        lhs = (forward_difference(x, axis, boundary) * v).sum()
        rhs = (x * forward_difference_adjoint(v, axis, boundary)).sum()
        assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)
    const = torch.ones(1, 1, 5, 4, 3, dtype=F64)
    assert forward_difference(const, 0, boundary).abs().max() == 0
    if boundary == "neumann":
        assert forward_difference(x, 0)[:, :, -1].abs().max() == 0


def test_cg_solves_its_normal_equations():
    """``normal_cg`` against a dense solve of ``(AᵀA + γI + ρ D_zᵀD_z) x = b``; one iteration is the exact line
    search along the residual (the official one-CG-iteration step); rows are independent problems; DDS's
    ``γ = 0`` CG from ``x̂0`` converges to the projection of ``x̂0`` onto ``{A x = y}``."""
    physics = make_physics("ct")
    shape = (1, 1, D, H, W)
    a = dense(physics.A, shape)
    dz = dense(lambda v: forward_difference(v, 0), shape)
    gamma, rho = 0.3, 2.0
    m = a.T @ a + gamma * torch.eye(a.shape[1], dtype=F64) + rho * dz.T @ dz
    g = gen(1)
    b = torch.randn(2, *shape[1:], generator=g, dtype=F64)
    x0 = torch.randn(2, *shape[1:], generator=g, dtype=F64)
    x = normal_cg(physics, b, x0, 400, gamma=gamma, rho=rho, axes=(0,))
    ref = torch.linalg.solve(m, b.reshape(2, -1).T).T
    assert rel_err(x, ref) < 1e-9
    one = normal_cg(physics, b, x0, 1, gamma=gamma, rho=rho, axes=(0,)).reshape(2, -1)
    r = b.reshape(2, -1) - x0.reshape(2, -1) @ m
    alpha = (r * r).sum(1, keepdim=True) / ((r @ m) * r).sum(1, keepdim=True)
    assert rel_err(one, x0.reshape(2, -1) + alpha * r) < 1e-12
    assert torch.equal(normal_cg(physics, b, x0, 0), x0)
    # DDS with γ = 0: CG on AᵀA x = Aᵀy from x̂0 → x̂0 + A⁺(y − A x̂0), the nearest data-consistent volume
    # (through-plane downsampling: rank D/2 · H · W, well conditioned on its range)
    sr = make_physics("sr")
    a_sr = dense(sr.A, shape)
    y = sr.A(torch.randn(1, *shape[1:], generator=g, dtype=F64))
    xh = torch.randn(1, *shape[1:], generator=g, dtype=F64)
    proj = xh.reshape(-1) + torch.linalg.pinv(a_sr) @ (y.reshape(-1) - a_sr @ xh.reshape(-1))
    x_dc, _, _, _ = admm_tv(sr, xh, sr.A_adjoint(y), [], [], axes=(), lam=0, rho=1, cg_iters=20)
    assert rel_err(x_dc, proj) < 1e-12


def test_admm_tv_limits():
    """λ → 0: the ADMM fixed point is least squares; λ → ∞ along z: every slice equals the closed-form best
    z-constant volume ``argmin_c ½‖A(1_D ⊗ c) − y‖²``."""
    physics = ParallelBeamCT((D, H, W), angles=12)
    shape = (1, 1, D, H, W)
    a = dense(physics.A, shape)
    assert int(torch.linalg.matrix_rank(a)) == a.shape[1]  # full column rank: unique least squares
    g = gen(2)
    y = physics.A(torch.randn(*shape, generator=g, dtype=F64)) + 0.1 * torch.randn(1, 12, D, 11, generator=g).to(F64)
    aty = physics.A_adjoint(y)
    x0 = torch.zeros(shape, dtype=F64)
    ls = torch.linalg.lstsq(a, y.reshape(-1, 1)).solution.reshape(shape)
    # (λ = 0: u stays 0 and each iteration is a proximal step in the ρ D_zᵀD_z metric, contracting by
    # 4ρ/(λ_min(AᵀA) + 4ρ) ≈ 0.3 per iteration at ρ = 0.005, λ_min(AᵀA) = 0.046)
    x, z, u, _ = admm_tv(physics, x0, aty, [], [], axes=(0,), lam=0.0, rho=0.005, cg_iters=100, admm_iters=40)
    assert rel_err(x, ls) < 1e-6
    assert len(z) == len(u) == 1 and u[0].abs().max() < 1e-12  # λ = 0: the scaled dual stays 0
    rep = torch.zeros(D * H * W, H * W, dtype=F64)  # 1_D ⊗ I: one z-constant volume per in-plane image c
    for k in range(D):
        rep[k * H * W : (k + 1) * H * W] = torch.eye(H * W, dtype=F64)
    c = torch.linalg.lstsq(a @ rep, y.reshape(-1, 1)).solution
    flat = (rep @ c).reshape(shape)
    x, z, u, primal = admm_tv(physics, x0, aty, [], [], axes=(0,), lam=1e6, rho=200.0, cg_iters=30, admm_iters=60)
    assert rel_err(x, flat) < 1e-5 and primal < 1e-5 * float(flat.norm())
    assert (x - x[:, :, :1]).abs().max() < 1e-5  # the slices are equal
    assert z[0].abs().max() == 0


def test_anchored_admm_tv_meets_the_optimality_conditions():
    """With an anchor (γ > 0) and enough iterations, ``admm_tv`` returns the minimiser of
    ``½‖Ax − y‖² + γ/2‖x − x̄‖² + λ‖D_z x‖₁`` (the anchored coupling of ``dds3d``). Checked by the subgradient
    conditions, independently of ADMM: ``g = Aᵀ(Ax − y) + γ(x − x̄) = −λ D_zᵀ s`` has one solution ``s`` along each
    z-column (``s_k = Σ_{j≤k} g_j / λ``, Neumann differences), and it must satisfy ``|s| ≤ 1`` with
    ``s = sign(D_z x)`` wherever ``D_z x ≠ 0``."""
    physics = ParallelBeamCT((D, H, W), angles=5)
    shape = (1, 1, D, H, W)
    g_ = gen(4)
    xbar = torch.randn(shape, generator=g_, dtype=F64)
    y = physics.A(torch.randn(shape, generator=g_, dtype=F64))
    norm2 = operator_norm(physics, xbar) ** 2
    gamma, lam = 0.05 * norm2, 0.3 * norm2 * 0.05
    x, _, _, primal = admm_tv(physics, xbar, physics.A_adjoint(y), [], [], axes=(0,), lam=lam, rho=gamma,
                              cg_iters=60, admm_iters=3000, gamma=gamma, anchor=xbar)
    grad = physics.A_adjoint(physics.A(x) - y) + gamma * (x - xbar)
    s = torch.cumsum(grad, dim=2) / lam  # s_k for k = 0..D−1; the last entry must vanish (Σ_k g_k = 0)
    dx = forward_difference(x, 0)
    assert s[:, :, -1].abs().max() < 1e-4
    s = s[:, :, :-1]
    dx = dx[:, :, :-1]
    active = dx.abs() > 1e-6
    assert 0.05 < float(active.double().mean()) < 0.95  # both branches of the subgradient are exercised
    assert s.abs().max() < 1 + 1e-4
    assert (s[active] - torch.sign(dx[active])).abs().max() < 1e-4
    assert primal < 1e-6


def test_tv_z_coupling_beats_slice_wise():
    """A piecewise-constant-in-z volume (8 slices: slice 8 of a 24-slice 3D Shepp–Logan repeated 4 times, then
    slice 14 repeated 4 times; 12 × 12, values in [-1, 1]) from 3-view CT with noise σ_y = 0.5.

    The prior is a 2D slice prior applied to every slice independently: a Gaussian fitted to the interior slices
    4–19 of the same 3D phantom (their empirical mean and rank-9 covariance) plus white noise of std 0.3, as one
    ``GaussianMixturePrior`` on the volume with a block-diagonal (slice-independent) low-rank covariance. It knows
    what a slice looks like but nothing about neighbouring slices, so independent slice-wise sampling puts
    independent errors in every slice, visible as slice-to-slice jitter in the coronal and sagittal planes. The TV-z
    coupling knows that the volume is piecewise constant along z: it pools the four identical slices of each block
    and keeps the one jump, so each sample's coronal and sagittal planes are closer to the truth. (The exact
    posterior mean of the slice-wise prior is better still: single samples carry the posterior spread; the test
    compares like with like, samples with and without coupling, same seeds.)"""
    d, h, w = 8, 12, 12
    vol = shepp_logan_3d((24, h, w), dtype=F64)[0, 0] * 2 - 1
    train = vol[4:20].reshape(16, -1)
    mu = train.mean(0)
    uu, s, _ = torch.linalg.svd((train - mu).T, full_matrices=False)
    r = int((s > 1e-6 * s[0]).sum())
    u2 = uu[:, :r] * (s[:r] / math.sqrt(train.shape[0] - 1))
    hw = h * w
    u_full = torch.zeros(d * hw, d * r, dtype=F64)
    for k in range(d):
        u_full[k * hw : (k + 1) * hw, k * r : (k + 1) * r] = u2
    prior = GaussianMixturePrior(
        torch.ones(1, dtype=F64), mu.repeat(d).reshape(1, 1, d, h, w), (u_full[None], torch.full((1, d * hw), 0.09))
    )
    truth = torch.stack([vol[8]] * 4 + [vol[14]] * 4)[None, None]
    physics = ParallelBeamCT((d, h, w), angles=3)
    ax = physics.A(truth)
    sigma_y = 0.5
    y = ax + sigma_y * torch.randn(ax.shape, generator=gen(1), dtype=F64)
    lam = 0.01 * operator_norm(physics, truth) ** 2

    def plane_errors(res):
        cor = [rel_err(smp[:, :, :, h // 2], truth[:, :, :, h // 2]) for smp in res.samples]
        sag = [rel_err(smp[..., w // 2], truth[..., w // 2]) for smp in res.samples]
        return sum(cor) / len(cor), sum(sag) / len(sag)

    def run(fn, **kw):
        return fn(physics, y, prior, sigma_y=sigma_y, particles=4, generator=gen(0), **kw)

    runs = {
        "mbir": (run(sample_diffusion_mbir, steps=200, tv_axes=()), run(sample_diffusion_mbir, steps=200, lam=lam)),
        "dds": (run(sample_dds, steps=50), run(sample_dds, steps=50, tv_weight=lam)),
    }
    for name, (independent, coupled) in runs.items():
        (ci, si), (cc, sc) = plane_errors(independent), plane_errors(coupled)
        print(f"\n{name}: coronal {ci:.3f} -> {cc:.3f}, sagittal {si:.3f} -> {sc:.3f} (independent -> TV-z)")
        assert coupled.info["options"]["tv_axes"] == [0] and independent.info["options"]["tv_axes"] == []
        assert cc < 0.85 * ci and sc < 0.9 * si


# ---------------------------------------------------------------------------------------------------------
# checkpoint and resume
# ---------------------------------------------------------------------------------------------------------
def _stop_after(k: int):
    def callback(info):
        if info["step"] == k - 1:
            raise KeyboardInterrupt

    return callback


class _InterruptAt:
    """Wraps a prior; its ``calls``-th denoiser call raises ``KeyboardInterrupt`` (as Ctrl-C would)."""

    def __init__(self, prior, calls: int):
        self.prior, self.left = prior, calls
        self.sigma_min, self.sigma_max, self.nfe = prior.sigma_min, prior.sigma_max, 0

    def denoise(self, x, sigma):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        self.nfe += x.shape[0]
        return self.prior.denoise(x, sigma)


RESUME_CASES = {
    "mbir": (sample_diffusion_mbir, {"steps": 12, "particles": 2, "corrector_steps": 1, "lam": 0.05}),
    "dds": (sample_dds, {"steps": 12, "particles": 2, "tv_weight": 0.05, "eta": 0.85}),
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_interrupted_and_resumed_equals_uninterrupted(name, tmp_path):
    fn, opts = RESUME_CASES[name]
    prior, physics, y = make_problem("ct")
    full = fn(physics, y, prior, sigma_y=SIGMA_Y, generator=gen(4), **opts)
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fn(physics, y, prior, sigma_y=SIGMA_Y, generator=gen(4), checkpoint=path, checkpoint_every=2,
           callback=_stop_after(5), **opts)
    state = torch.load(path, weights_only=True)
    assert state["step"] == 5 and len(json.loads(state["diagnostics"])) == 5
    assert len(state["z"]) == 1 and state["x"].shape == (2, 1, D, H, W)  # ADMM state is part of it
    assert json.loads(state["options"])["seed"] == 4
    calls = []
    resumed = fn(physics, y, prior, sigma_y=SIGMA_Y, generator=gen(4), checkpoint=path, resume=True,
                 callback=calls.append, **opts)
    assert torch.equal(resumed.x, full.x) and torch.equal(resumed.samples, full.samples)
    assert [c["step"] for c in calls] == list(range(5, 12))
    assert [d["step"] for d in resumed.diagnostics] == list(range(12))
    assert [d["residual"] for d in resumed.diagnostics] == [d["residual"] for d in full.diagnostics]
    assert resumed.info["resumed_from"] == 5 and full.info["resumed_from"] is None
    # a finished checkpoint gives the result again without sampling
    nfe = prior.nfe
    again = fn(physics, y, prior, sigma_y=SIGMA_Y, generator=gen(4), checkpoint=path, resume=True, **opts)
    assert torch.equal(again.x, full.x) and prior.nfe == nfe
    # a Ctrl-C in the middle of a step (here: inside the prior, after the step's first random draws) keeps the
    # last completed step's state, generator included
    mid = tmp_path / "mid.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fn(physics, y, _InterruptAt(prior, 8), sigma_y=SIGMA_Y, generator=gen(4), checkpoint=mid, **opts)
    done = torch.load(mid, weights_only=True)["step"]
    assert 0 < done < 12
    resumed = fn(physics, y, prior, sigma_y=SIGMA_Y, generator=gen(4), checkpoint=mid, resume=True, **opts)
    assert torch.equal(resumed.x, full.x) and resumed.info["resumed_from"] == done
    # resume=True with no file yet: a fresh run
    fresh = fn(physics, y, prior, sigma_y=SIGMA_Y, generator=gen(4), checkpoint=tmp_path / "new.ckpt", resume=True,
               **opts)
    assert torch.equal(fresh.x, full.x) and (tmp_path / "new.ckpt").is_file()


def test_resume_refuses_a_different_run_and_writes_atomically(tmp_path, monkeypatch):
    import recon.datasets.io as rio

    writes = []
    real = rio.atomic_write_bytes

    def spy(data, path, overwrite=False):
        writes.append((os.fspath(path), overwrite))
        return real(data, path, overwrite=overwrite)

    monkeypatch.setattr(rio, "atomic_write_bytes", spy)
    prior, physics, y = make_problem("ct")
    path = tmp_path / "mbir.ckpt"
    kw = {"sigma_y": SIGMA_Y, "steps": 6, "checkpoint": path, "checkpoint_every": 2}
    with pytest.raises(KeyboardInterrupt):
        sample_diffusion_mbir(physics, y, prior, generator=gen(0), callback=_stop_after(3), **kw)
    assert writes == [(os.fspath(path), True)] * 2  # after step 2, then on the interrupt (step 3)
    assert sorted(os.listdir(tmp_path)) == ["mbir.ckpt"]  # no temporary files left behind
    with pytest.raises(ValueError, match=r"mbir\.ckpt.*different options.*lam"):
        sample_diffusion_mbir(physics, y, prior, generator=gen(0), resume=True, lam=1.0, **kw)
    with pytest.raises(ValueError, match=r"mbir\.ckpt.*seed"):
        sample_diffusion_mbir(physics, y, prior, generator=gen(1), resume=True, **kw)
    with pytest.raises(ValueError, match=r"mbir\.ckpt.*different measurements"):
        sample_diffusion_mbir(physics, 2 * y, prior, generator=gen(0), resume=True, **kw)
    with pytest.raises(ValueError, match=r"mbir\.ckpt.*x_shape"):
        sample_diffusion_mbir(physics, y, prior, generator=gen(0), resume=True, particles=2, **kw)
    with pytest.raises(ValueError, match=r"mbir\.ckpt.*'diffusion-mbir', not of 'dds'"):
        sample_dds(physics, y, prior, generator=gen(0), resume=True, **kw)
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        sample_dds(physics, y, prior, steps=3, generator=gen(0), resume=True)
    with pytest.raises(ValueError, match=r"seeded torch\.Generator"):
        sample_dds(physics, y, prior, steps=3, checkpoint=path)
    # a changed checkpoint_every or memory_budget does not matter
    res = sample_diffusion_mbir(physics, y, prior, generator=gen(0), resume=True,
                                **{**kw, "checkpoint_every": 5}, memory_budget=1e6)
    assert res.info["resumed_from"] == 3


# ---------------------------------------------------------------------------------------------------------
# interface: divergence, seeding, callback, dispatch, 2D images, network priors
# ---------------------------------------------------------------------------------------------------------
class _NaNBelow:
    """Wraps a prior; its denoiser returns NaN below ``sigma_nan``."""

    def __init__(self, prior, sigma_nan: float):
        self.prior, self.sigma_nan = prior, sigma_nan
        self.sigma_min, self.sigma_max, self.nfe = prior.sigma_min, prior.sigma_max, 0

    def denoise(self, x, sigma):
        self.nfe += x.shape[0]
        out = self.prior.denoise(x, sigma)
        return out * float("nan") if float(sigma) < self.sigma_nan else out


def test_nan_prior_raises_naming_the_step():
    prior, physics, y = make_problem("inpaint")
    sigmas = [10.0, 3.0, 1.0, 0.3, 0.1]
    for fn, method in ((sample_diffusion_mbir, "diffusion-mbir"), (sample_dds, "dds")):
        with pytest.raises(SamplerDivergence, match=rf"{method}: the iterate diverged at step 0 .*denoiser"):
            fn(physics, y, _NaNBelow(prior, 100.0), sigmas=sigmas, generator=gen(0))
        # σ = 0.3 is reached at step 3; MBIR's corrector evaluates it already at the end of step 2
        step = 2 if fn is sample_diffusion_mbir else 3
        with pytest.raises(SamplerDivergence, match=rf"{method}: the iterate diverged at step {step} "):
            fn(physics, y, _NaNBelow(prior, 0.5), sigmas=sigmas, generator=gen(0))
    with pytest.raises(SamplerDivergence, match=r"diffusion-mbir: .*step 0 .*corrector_snr"):
        sample_diffusion_mbir(physics, y, prior, sigmas=sigmas, generator=gen(0), corrector_snr=1e200)


@pytest.mark.parametrize(("method", "options"), [("diffusion-mbir", {"particles": 2}), ("dds", {"tv_weight": 0.1})])
def test_seeding_callback_diagnostics_and_dispatch(method, options):
    prior, physics, y = make_problem("sr")
    y2 = torch.cat([y, 0.5 * y])
    calls = []
    a = recon.reconstruct(physics, y2, prior, method=method, seed=5, steps=8, callback=calls.append, **options)
    b = reconstruct(physics, y2, prior, method=method, seed=5, steps=8, **options)
    c = reconstruct(physics, y2, prior, method=method, seed=6, steps=8, **options)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.x.shape == (2, 1, D, H, W) and a.info["method"] == method
    assert len(calls) == len(a.diagnostics) == 8 and [d["step"] for d in a.diagnostics] == list(range(8))
    for d in a.diagnostics:
        assert {"step", "steps", "sigma", "residual", "nfe", "seconds", "admm_residual"} <= set(d)
    assert a.diagnostics[-1]["nfe"] == a.nfe > 0
    assert all(s1["sigma"] > s2["sigma"] for s1, s2 in zip(a.diagnostics, a.diagnostics[1:], strict=False))
    alias = {"diffusion-mbir": "mbir3d", "dds": "dds3d"}[method]  # the command line's 3D names
    aliased = reconstruct(physics, y2, prior, method=alias, seed=5, steps=8, **options)
    from recon.samplers.base import METHOD_DEFAULTS

    same = reconstruct(physics, y2, prior, method=method, seed=5, steps=8,
                       **{**METHOD_DEFAULTS.get(alias, {}), **options})  # the alias = the method + its defaults
    assert torch.equal(aliased.x, same.x) and aliased.info["method"] == alias and aliased.info["algorithm"] == method
    assert torch.equal(same.x, a.x) == (alias == "mbir3d")  # mbir3d has no defaults of its own
    if method == "dds":  # dds3d without options: DDS with the anchored TV-z coupling on
        coupled = reconstruct(physics, y2, prior, method="dds3d", seed=5, steps=8)
        rho = coupled.info["options"]["rho"]
        by_hand = reconstruct(physics, y2, prior, method="dds", seed=5, steps=8, tv_weight=0.024 * rho, rho=rho,
                              gamma=rho, admm_persistent=False, admm_iters=5)
        assert torch.equal(coupled.x, by_hand.x)
        opts = coupled.info["options"]
        assert opts["gamma"] == rho > 0 and opts["admm_persistent"] is False and opts["admm_iters"] == 5
        assert abs(opts["tv_weight"] - 0.024 * rho) < 1e-12 * rho
        assert not torch.equal(coupled.x, reconstruct(physics, y2, prior, method="dds", seed=5, steps=8).x)
        with pytest.raises(ValueError, match="gamma must be a number >= 0 or 'rho'"):
            reconstruct(physics, y2, prior, method="dds3d", seed=5, steps=8, gamma="sigma")
        with pytest.raises(ValueError, match="tv_threshold"):
            reconstruct(physics, y2, prior, method="dds3d", seed=5, steps=8, tv_threshold=-1.0)


def test_images_2d_and_options():
    """On 2D images TV-z makes no sense: the coupling is off by default (predictor–corrector / DDIM + CG);
    explicit in-plane TV axes still work; bad options are refused."""
    prior = GaussianMixturePrior.random((1, 8, 8), n_components=2, seed=1)
    physics = Inpainting((8, 8), missing_slice_mask((8, 8), keep_every=2))
    y = physics.A(prior.sample(1, gen(0)))
    for fn in (sample_diffusion_mbir, sample_dds):
        res = fn(physics, y, prior, steps=10, generator=gen(0), **({"tv_weight": None} if fn is sample_dds else {}))
        assert res.x.shape == (1, 1, 8, 8) and res.info["options"]["tv_axes"] == []
        assert all(d["admm_residual"] == 0 for d in res.diagnostics)
    tv2d = sample_diffusion_mbir(physics, y, prior, steps=10, generator=gen(0), tv_axes=(0, 1), lam=0.01)
    assert tv2d.info["options"]["tv_axes"] == [0, 1] and tv2d.diagnostics[-1]["admm_residual"] > 0
    with pytest.raises(ValueError, match="tv_axes"):
        sample_diffusion_mbir(physics, y, prior, steps=2, tv_axes=(2,))
    with pytest.raises(ValueError, match="predictor"):
        sample_diffusion_mbir(physics, y, prior, steps=2, predictor="euler")
    with pytest.raises(ValueError, match="eta"):
        sample_dds(physics, y, prior, steps=2, eta=1.5)
    with pytest.raises(ValueError, match="cg_iters"):
        sample_dds(physics, y, prior, steps=2, cg_iters=-1)
    # defaults: λ, ρ relative to ‖A‖² (the official CT setting; ‖A‖ = 1 for inpainting), γ = 0
    vol_prior, vol_physics, vol_y = make_problem("inpaint")
    res = sample_diffusion_mbir(vol_physics, vol_y, vol_prior, steps=2, generator=gen(0))
    assert res.info["options"]["rho"] == pytest.approx(0.025) and res.info["options"]["lam"] == pytest.approx(2e-4)
    assert res.info["options"]["final_consistency"] is False and res.info["options"]["corrector_snr"] == 0.16
    ct = make_physics("ct")
    res = sample_diffusion_mbir(ct, ct.A(vol_prior.sample(1, gen(0))), vol_prior, steps=2, generator=gen(0))
    norm2 = operator_norm(ct, torch.zeros(1, 1, D, H, W, dtype=F64)) ** 2
    assert res.info["options"]["rho"] == pytest.approx(0.025 * norm2) and res.info["options"]["final_consistency"]
    dds = sample_dds(physics, y, prior, steps=2, generator=gen(0), sigma_y=0.1)
    assert dds.info["options"]["gamma"] == "noise-aware" and dds.info["options"]["eta"] == 0.85  # γ_i = σ_y²/r_i²
    assert dds.info["options"]["rho"] == 0 and res.info["options"]["tv_axes"] == [0]


class _TinyEps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.batches = []

    def forward(self, x, cond):
        self.batches.append(x.shape[0])
        return 0.1 * torch.tanh(self.conv(x) + 1e-3 * cond.reshape(-1, 1, 1, 1))


def test_network_prior_slice_wise_with_memory_budget():
    """A 2D ``DiffusionPrior`` on a (B, C, D, H, W) volume: slices go through the network in chunks set by the
    ``memory_budget`` option (restored afterwards); the chunking does not change the result; NFE = slices × calls."""
    torch.manual_seed(0)
    net = _TinyEps().double()
    prior = DiffusionPrior(net, VPSchedule(), "eps", bytes_per_voxel=1000.0)
    physics = ParallelBeamCT((6, 8, 8), angles=3)
    y = physics.A(torch.rand(1, 1, 6, 8, 8, generator=gen(0), dtype=F64) * 2 - 1)
    budget = prior.memory_budget
    small = sample_dds(physics, y, prior, steps=4, particles=2, generator=gen(0), memory_budget=4 * 64 * 1000.0)
    assert prior.memory_budget == budget and max(net.batches) == 4
    net.batches.clear()
    big = sample_dds(physics, y, prior, steps=4, particles=2, generator=gen(0))
    assert net.batches == [12] * 4  # 2 particles × 6 slices in one call per step
    assert torch.allclose(small.x, big.x, rtol=1e-12, atol=1e-12)
    assert big.nfe == 4 * 12 and big.info["denoiser_calls"] == 4
    mbir = sample_diffusion_mbir(physics, y, prior, steps=4, generator=gen(0), memory_budget=2 * 64 * 1000.0)
    assert mbir.nfe == (4 * 2 - 1) * 6 and torch.isfinite(mbir.x).all()


def test_cg_stops_at_rounding_in_float32_on_a_projection():
    """Masked-Fourier AᵀA (4× fastMRI-style mask, real images) is close to a projection: CG solves it in a couple
    of iterations and, in float32, the residual then sits at rounding level. Further iterations must not divide
    by that noise (with a tolerance of ε they did: |x| ~ 2e7, residual ~1, and DDS on 4× MRI fell to 4.7 dB)."""
    from recon.operators import CartesianMRI

    physics = CartesianMRI((16, 16), acceleration=4, seed=0, real_input=True)
    g = gen(5)
    x0 = torch.randn(2, 1, 16, 16, generator=g)
    y = physics.A(torch.randn(2, 1, 16, 16, generator=g))
    x = normal_cg(physics, physics.A_adjoint(y), x0, 5)
    assert torch.isfinite(x).all() and float(x.abs().max()) < 10 * float(x0.abs().max())
    assert float((physics.A(x) - y).norm() / y.norm()) < 1e-5  # consistent with the data, to rounding


def test_dds_admm_restarted_per_step_equals_admm_from_scratch_at_every_step():
    """``admm_persistent=False``: each step's data consistency is ``admm_tv`` from ``z = u = 0``: the run equals a
    hand-made loop (η = 0: noise only at the start) that calls ``admm_tv`` with empty auxiliaries at every step, and
    differs from the persistent (official) run."""
    from recon.samplers.volume import admm_tv, sample_dds, sigma_schedule

    prior, physics, y = make_problem("mri")
    kw = dict(steps=4, tv_weight=0.05, rho=0.5, admm_iters=2, eta=0.0)
    fresh = sample_dds(physics, y, prior, generator=gen(1), admm_persistent=False, **kw)
    kept = sample_dds(physics, y, prior, generator=gen(1), **kw)
    assert fresh.info["options"]["admm_persistent"] is False
    assert not torch.allclose(fresh.x, kept.x)
    # the same loop by hand
    sig = sigma_schedule(prior, 4, None, None, 7.0, None)
    x = float(sig[0]) * torch.randn(fresh.x.shape, generator=gen(1), dtype=fresh.x.dtype)
    aty = physics.A_adjoint(y)
    for i in range(4):
        s, s_next = float(sig[i]), float(sig[i + 1])
        x0 = prior.denoise(x, s)
        x0dc, *_ = admm_tv(physics, x0, aty, [], [], axes=(0,), lam=0.05, rho=0.5, cg_iters=5, admm_iters=2,
                           gamma=0.0, anchor=x0, boundary="neumann")
        x = x0dc + (s_next / s) * (x - x0) if s_next > 0 else x0dc
    assert rel_err(fresh.x, x) < 1e-10


def test_mbir_defaults_follow_the_modality():
    """DiffusionMBIR defaults to the official script of the physics' modality: ρ = 0.01‖A‖², λ = ρ for MRI
    (recon's and deepinv's MRI operators), ρ = 0.025‖A‖², λ = 0.008ρ otherwise; ``settings=`` overrides."""
    from recon.operators import MultiCoilMRI, simulate_coil_maps
    from recon.samplers.volume import physics_modality

    assert physics_modality(make_physics("mri")) == "mri"
    multi = MultiCoilMRI((H, W), coil_maps=simulate_coil_maps((H, W), 2), mask=torch.ones(H, W))
    assert physics_modality(multi) == "mri"
    assert physics_modality(deepinv.physics.MRI(mask=torch.ones(H, W), img_size=(1, 2, H, W))) == "mri"
    assert physics_modality(make_physics("ct")) == physics_modality(make_physics("sr")) == "ct"
    for kind, (rho_rel, thr) in {"mri": (0.01, 1.0), "ct": (0.025, 0.008)}.items():
        prior, physics, y = make_problem(kind)
        res = sample_diffusion_mbir(physics, y, prior, steps=3, generator=gen(0))
        norm2 = operator_norm(physics, res.x) ** 2
        opts = res.info["options"]
        assert opts["settings"] == kind
        assert opts["rho"] == pytest.approx(rho_rel * norm2, rel=1e-3)
        assert opts["lam"] == pytest.approx(thr * opts["rho"], rel=1e-9)
    prior, physics, y = make_problem("mri")
    forced = sample_diffusion_mbir(physics, y, prior, steps=3, generator=gen(0), settings="ct")
    assert forced.info["options"]["settings"] == "ct"
    assert forced.info["options"]["lam"] == pytest.approx(0.008 * forced.info["options"]["rho"])
    with pytest.raises(ValueError, match="settings must be one of ct, mri"):
        sample_diffusion_mbir(physics, y, prior, steps=3, settings="pet")
