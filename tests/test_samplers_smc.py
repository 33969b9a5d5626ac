"""SMC ensemble sampler (``recon.samplers.smc``) against the exact posterior of a Gaussian-mixture prior.

Problems: ``GaussianMixturePrior.random((1, 4, 4), 3, seed=0)`` (d = 16, full covariances), ``sigma_y = 0.1``,
(a) ``Inpainting`` with a 50 % random pixel mask, (b) a dense 8 x 16 Gaussian projection as a deepinv
``LinearPhysics``. Each run carries B = 4 independent replicas of the same ``y`` (one batched call), metrics are
averaged over them. ``err`` = ‖x̄ − m‖ / ‖s‖ (weighted mean vs exact posterior mean, in units of the exact
posterior std ``s``); ``ratio`` = mean over pixels of std_smc / s; ``SW`` = sliced 2-Wasserstein distance (64
random directions, coordinates scaled by ``s``, weighted quantiles) to 8192 exact posterior samples; ``floor`` =
the same metric for P exact samples (mean of 4 draws). Time, one thread on a shared loaded CPU: one P = 1024 call
(4 replicas) takes 0.7 s (AFDPS, 50 steps) / 1.0 s (TDS, 100 steps); each 3-row block below ~2-3 s.

Measured (seed 3; AFDPS scheme "exact", ancestral kernel, anneal 1, 50 steps; TDS 100 steps):

| problem | weighting | steps | P    | err   | err floor | std ratio | SW    | SW floor |
|---------|-----------|-------|------|-------|-----------|-----------|-------|----------|
| inpaint | afdps     | 50    | 16   | 0.691 | 0.236     | 0.608     | 0.825 | 0.430    |
| inpaint | afdps     | 50    | 128  | 0.343 | 0.061     | 0.870     | 0.445 | 0.142    |
| inpaint | afdps     | 50    | 1024 | 0.273 | 0.036     | 0.892     | 0.289 | 0.062    |
| inpaint | tds       | 100   | 16   | 0.411 | 0.236     | 0.805     | 0.589 | 0.430    |
| inpaint | tds       | 100   | 128  | 0.252 | 0.061     | 0.929     | 0.305 | 0.142    |
| inpaint | tds       | 100   | 1024 | 0.103 | 0.036     | 0.960     | 0.118 | 0.062    |
| proj    | afdps     | 50    | 16   | 1.089 | 0.230     | 0.771     | 1.148 | 0.417    |
| proj    | afdps     | 50    | 128  | 0.548 | 0.063     | 0.793     | 0.610 | 0.141    |
| proj    | afdps     | 50    | 1024 | 0.257 | 0.026     | 1.017     | 0.324 | 0.056    |
| proj    | tds       | 100   | 16   | 0.657 | 0.230     | 0.765     | 0.856 | 0.417    |
| proj    | tds       | 100   | 128  | 0.248 | 0.063     | 0.918     | 0.320 | 0.141    |
| proj    | tds       | 100   | 1024 | 0.107 | 0.026     | 0.943     | 0.141 | 0.056    |

At P = 1024: TDS err ≈ 3-4x and SW ≈ 2-2.5x the exact-sample floor (pinned below 6x / 4x); AFDPS err ≈ 8-10x
and SW ≈ 5-6x (pinned below 14x / 8x). Averaging 8 replicas of P = 2048 shows the excess is mostly Monte Carlo
variance (weight variance -> resampling -> path degeneracy), plus a discretisation bias of ~0.05 (TDS, 100 steps)
to ~0.1 (AFDPS, 50 steps) posterior stds in the mean and a std deficit of 3-7 % from the ancestral kernel
(``kernel="euler"`` gives std ratio ≈ 1.0 but more weight variance). More AFDPS steps do not help: its log-weight
variance is a property of the state-space tilt path (38-46 resampling events on the 6x6 bimodal problem with
sigma_y = 0.01 at 200 and 800 steps).

Bimodal (``bimodal_inpainting_example``, weights 0.3/0.7, mode-weight TV error, 4 replicas, P = 1024):
(1, 6, 6) with sigma_y = 0.1: TDS 100 steps 0.033 (pinned < 0.05; 1.7 s for 4 replicas), AFDPS 50 steps 0.34
(P = 8192: 0.085) — AFDPS does NOT get the mode weights right at affordable P (xfail below). With the example's
default sigma_y = 0.01 both collapse to one mode at P = 1024 (TDS 0.17, AFDPS 0.14-0.5 on 6x6 / 8x8).
"""

from __future__ import annotations

import math

import pytest
import torch
from deepinv.physics import LinearPhysics

from recon.operators.inpainting import Inpainting, random_pixel_mask
from recon.priors.gaussian import GaussianMixturePrior, bimodal_inpainting_example
from recon.samplers import SamplerDivergence, reconstruct
from recon.samplers.smc import _CGTilt, _DenseTilt, multinomial_resample, sample_smc, systematic_resample

F64 = torch.float64
SHAPE = (1, 4, 4)
SIGMA_Y = 0.1
REPLICAS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny problems


def matrix_physics(matrix: torch.Tensor, shape) -> LinearPhysics:
    return LinearPhysics(
        A=lambda x: x.reshape(x.shape[0], -1) @ matrix.T.to(x.dtype),
        A_adjoint=lambda y: (y @ matrix.to(y.dtype)).reshape(y.shape[0], *shape),
    )


def make_problem(kind: str, sigma_y: float = SIGMA_Y, seed: int = 0):
    prior = GaussianMixturePrior.random(SHAPE, 3, seed=seed)
    d = math.prod(SHAPE)
    gen = torch.Generator().manual_seed(seed + 100)
    if kind == "inpaint":
        physics = Inpainting(SHAPE[1:], random_pixel_mask(SHAPE[1:], 0.5, seed=seed))
    else:
        physics = matrix_physics(torch.randn(d // 2, d, generator=gen, dtype=F64) / math.sqrt(d), SHAPE)
    x = prior.sample(1, generator=gen)
    y = physics.A(x)
    y = y + sigma_y * torch.randn(y.shape, generator=gen, dtype=y.dtype)
    return prior, physics, y


def _quantiles(v: torch.Tensor, w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Weighted quantile functions of the columns of ``v (N, L)`` (weights ``w (N,)``) at ``levels``."""
    order = v.argsort(0)
    vs = v.gather(0, order)
    cw = w[order].cumsum(0)
    cw = cw / cw[-1:]
    idx = torch.searchsorted(cw.T.contiguous(), levels.expand(v.shape[1], -1).contiguous()).T
    return vs.gather(0, idx.clamp(max=v.shape[0] - 1))


def sliced_wasserstein(xa, wa, xb, wb, scale, n_proj: int = 64, n_levels: int = 512, seed: int = 0) -> float:
    """SW2 between weighted point clouds ``(N, d)``, coordinates divided by ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(xa.shape[1], n_proj, generator=gen, dtype=F64)
    theta = theta / theta.norm(dim=0)
    levels = (torch.arange(n_levels, dtype=F64) + 0.5) / n_levels
    qa = _quantiles((xa / scale) @ theta, wa, levels)
    qb = _quantiles((xb / scale) @ theta, wb, levels)
    return float(((qa - qb) ** 2).mean().sqrt())


def uniform(n: int) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=F64)


def smc_metrics(res, post, ref):
    """(err, std ratio, SW) averaged over the batch items of ``res``."""
    m, s = post.mean.flatten(), post.std.flatten()
    out = []
    for b in range(res.samples.shape[1]):
        x, w = res.samples[:, b].flatten(1), res.weights[:, b]
        mean = (w[:, None] * x).sum(0)
        std = (w[:, None] * (x - mean) ** 2).sum(0).sqrt()
        out.append(
            (
                float((mean - m).norm() / s.norm()),
                float((std / s).mean()),
                sliced_wasserstein(x, w, ref, uniform(ref.shape[0]), s),
            )
        )
    return [sum(o[i] for o in out) / len(out) for i in range(3)]


def noise_floor(post, ref, n: int, reps: int = REPLICAS):
    m, s = post.mean.flatten(), post.std.flatten()
    errs, sws = [], []
    for r in range(reps):
        x = post.sample(n, generator=torch.Generator().manual_seed(7 + r)).flatten(1)
        errs.append(float((x.mean(0) - m).norm() / s.norm()))
        sws.append(sliced_wasserstein(x, uniform(n), ref, uniform(ref.shape[0]), s))
    return sum(errs) / reps, sum(sws) / reps


def convergence_table(kind: str, weighting: str, steps: int, counts=(16, 128, 1024)):
    prior, physics, y = make_problem(kind)
    post = prior.posterior(physics, y, SIGMA_Y)
    ref = post.sample(8192, generator=torch.Generator().manual_seed(1)).flatten(1)
    yb = y.repeat(REPLICAS, *([1] * (y.dim() - 1)))
    rows = []
    for p in counts:
        res = sample_smc(
            physics, yb, prior, sigma_y=SIGMA_Y, steps=steps, particles=p, weighting=weighting,
            generator=torch.Generator().manual_seed(3),
        )
        err, ratio, sw = smc_metrics(res, post, ref)
        err_floor, sw_floor = noise_floor(post, ref, p)
        rows.append({"P": p, "err": err, "err_floor": err_floor, "ratio": ratio, "sw": sw, "sw_floor": sw_floor})
    return rows


# ---------------------------------------------------------------------------------------------------------
# convergence to the exact posterior
# ---------------------------------------------------------------------------------------------------------
# (weighting, steps, max err / floor, max SW / floor) at P = 1024; measured multiples in the module docstring
CASES = {"afdps": (50, 14.0, 8.0), "tds": (100, 6.0, 4.0)}


@pytest.mark.parametrize("kind", ["inpaint", "proj"])
@pytest.mark.parametrize("weighting", ["afdps", "tds"])
def test_converges_to_exact_posterior(kind, weighting):
    steps, err_mult, sw_mult = CASES[weighting]
    rows = convergence_table(kind, weighting, steps)
    errs, sws = [r["err"] for r in rows], [r["sw"] for r in rows]
    assert errs[0] > errs[1] > errs[2], rows
    assert sws[0] > sws[1] > sws[2], rows
    last = rows[-1]
    assert last["err"] < err_mult * last["err_floor"], last
    assert last["sw"] < sw_mult * last["sw_floor"], last
    assert 0.8 < last["ratio"] < 1.2, last


def _bimodal_tv(weighting: str, steps: int, particles: int, shape=(1, 6, 6), sigma_y=0.1):
    prior, physics, y, sy = bimodal_inpainting_example(shape, sigma_y=sigma_y)
    post = prior.posterior(physics, y, sy)
    hole = physics.mask[0].expand(shape) == 0
    res = sample_smc(
        physics, y.repeat(REPLICAS, 1, 1, 1), prior, sigma_y=sy, steps=steps, particles=particles,
        weighting=weighting, generator=torch.Generator().manual_seed(3),
    )
    tvs = []
    for b in range(REPLICAS):
        x = res.samples[:, b][:, hole]
        dist = torch.stack([((x - mu[hole]) ** 2).sum(1) for mu in prior.means], 1)
        w0 = float(res.weights[:, b][dist.argmin(1) == 0].sum())
        tvs.append(abs(w0 - float(post.weights[0])))
    return sum(tvs) / len(tvs)


def test_bimodal_mode_weights_tds():
    assert _bimodal_tv("tds", 100, 1024) < 0.05


@pytest.mark.xfail(strict=True, reason="AFDPS state-space tilt: ~45 resampling events, mode weights drift (TV ~0.3)")
def test_bimodal_mode_weights_afdps():
    assert _bimodal_tv("afdps", 50, 1024) < 0.05


# ---------------------------------------------------------------------------------------------------------
# resampling, ESS, interface
# ---------------------------------------------------------------------------------------------------------
def test_systematic_resampling_is_unbiased():
    w = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=F64)
    p, n = w.numel(), 20000
    weights = w[:, None].expand(p, n).contiguous()
    for fn, tol in ((systematic_resample, 0.01), (multinomial_resample, 0.03)):
        idx = fn(weights, torch.Generator().manual_seed(0))
        assert idx.shape == (p, n) and int(idx.min()) >= 0 and int(idx.max()) < p
        counts = torch.stack([(idx == k).sum(0) for k in range(p)]).to(F64)  # (p, n)
        torch.testing.assert_close(counts.mean(1), p * w, atol=tol * p, rtol=0)
        if fn is systematic_resample:  # each count is floor or ceil of P w
            assert bool(((counts >= torch.floor(p * w)[:, None]) & (counts <= torch.ceil(p * w)[:, None])).all())


def test_ess_resampling_seeding_callback():
    prior, physics, y = make_problem("inpaint")
    seen = []
    kw = {"sigma_y": SIGMA_Y, "steps": 12, "particles": 32, "weighting": "afdps"}
    res = sample_smc(physics, y, prior, generator=torch.Generator().manual_seed(1), callback=seen.append, **kw)
    assert res.samples.shape == (32, 1, *SHAPE) and res.weights.shape == (32, 1) and res.x.shape == (1, *SHAPE)
    torch.testing.assert_close(res.weights.sum(0), torch.ones(1, dtype=F64))
    assert len(seen) == 12 and [c["step"] for c in seen] == list(range(1, 13))
    assert {"step", "steps", "sigma", "residual", "ess", "nfe", "seconds", "resampled"} <= set(seen[0])
    for diag in res.diagnostics:
        assert 1.0 <= diag["ess"] <= 32.0 + 1e-9
        assert diag["resampled"] == (diag["ess"] < 0.5 * 32)
    assert res.info["resamplings"] == sum(d["resampled"] for d in res.diagnostics) > 0
    assert res.info["method"] == "smc" and res.info["weighting"] == "afdps"
    again = sample_smc(physics, y, prior, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(again.samples, res.samples) and torch.equal(again.weights, res.weights)
    other = sample_smc(physics, y, prior, generator=torch.Generator().manual_seed(2), **kw)
    assert not torch.equal(other.samples, res.samples)
    never = sample_smc(physics, y, prior, generator=torch.Generator().manual_seed(1), ess_threshold=0.0, **kw)
    assert never.info["resamplings"] == 0
    always = sample_smc(physics, y, prior, generator=torch.Generator().manual_seed(1), ess_threshold=1.0,
                        resample="multinomial", **{**kw, "weighting": "tds"})
    assert always.info["resamplings"] == 11  # every step but the last (TDS returns the final weighted ensemble)


def test_batch_of_measurements():
    """B = 2 different measurements in one call: each item follows its own exact posterior."""
    prior, physics, y1 = make_problem("proj", seed=0)
    gen = torch.Generator().manual_seed(9)
    y2 = physics.A(prior.sample(1, generator=gen)) + SIGMA_Y * torch.randn(y1.shape, generator=gen, dtype=F64)
    y = torch.cat([y1, y2])
    res = sample_smc(physics, y, prior, sigma_y=SIGMA_Y, steps=50, particles=512, weighting="tds",
                     generator=torch.Generator().manual_seed(0))
    assert res.samples.shape == (512, 2, *SHAPE) and res.std.shape == (2, *SHAPE)
    assert len(res.diagnostics[-1]["ess_per_item"]) == 2
    for b, yb in enumerate((y1, y2)):
        post = prior.posterior(physics, yb, SIGMA_Y)
        err = float((res.x[b].flatten() - post.mean.flatten()).norm() / post.std.flatten().norm())
        assert err < 0.5, (b, err)


def test_reconstruct_dispatch_and_cg_solver():
    prior, physics, y = make_problem("inpaint")
    res = reconstruct(physics, y, prior, method="smc", sigma_y=SIGMA_Y, seed=0, steps=20, particles=256,
                      weighting="afdps", linear_solver="cg")
    assert res.info["method"] == "smc" and res.info["options"]["linear_solver"] == "cg" and res.nfe == 20 * 256
    post = prior.posterior(physics, y, SIGMA_Y)
    assert float((res.x.flatten() - post.mean.flatten()).norm() / post.std.flatten().norm()) < 1.0
    # the CG and dense tilts agree (log-normaliser up to a particle-independent constant)
    _, proj, yp = make_problem("proj")
    m = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    for phys, yy in ((physics, y), (proj, yp)):
        y_rep = yy.repeat(6, *([1] * (yy.dim() - 1)))
        dense, cg = _DenseTilt(phys, y_rep, SHAPE), _CGTilt(phys, y_rep)
        for h in (0.01, 100.0):
            a, b = dense.log_norm(m, h, 0.02), cg.log_norm(m, h, 0.02)
            torch.testing.assert_close(a - a[0], b - b[0], atol=1e-6, rtol=1e-8)
            ra, rb = dense.half_sq_residual(m), cg.half_sq_residual(m)
            torch.testing.assert_close(ra - ra[0], rb - rb[0])


def test_schemes_and_argument_checks():
    prior, physics, y = make_problem("inpaint")
    post = prior.posterior(physics, y, SIGMA_Y)
    res = sample_smc(physics, y, prior, sigma_y=SIGMA_Y, steps=100, particles=256, weighting="afdps",
                     scheme="euler", generator=torch.Generator().manual_seed(0))
    default = reconstruct(physics, y, prior, method="smc", sigma_y=SIGMA_Y, steps=5, particles=4)
    assert default.info["weighting"] == "tds"  # the default: the weighting that gets mode weights right
    assert float((res.x.flatten() - post.mean.flatten()).norm() / post.std.flatten().norm()) < 1.0
    ode = sample_smc(physics, y, prior, sigma_y=SIGMA_Y, steps=20, particles=16, weighting="afdps", scheme="ode",
                     generator=torch.Generator().manual_seed(0))
    assert ode.info["scheme"] == "ode"
    with pytest.raises(ValueError, match="unstable"):
        sample_smc(physics, y, prior, sigma_y=SIGMA_Y, steps=10, particles=4, weighting="afdps", scheme="euler",
                   anneal=0.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="sigma_y"):
        sample_smc(physics, y, prior, sigma_y=0.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="weighting"):
        sample_smc(physics, y, prior, sigma_y=SIGMA_Y, weighting="magic")


class _NaNPrior:
    """Exact prior until ``sigma`` drops below ``at``, then NaN scores / denoisings."""

    def __init__(self, prior, at):
        self.prior, self.at, self.nfe = prior, at, 0
        self.sigma_min, self.sigma_max = prior.sigma_min, prior.sigma_max

    def _bad(self, sigma):
        return float(torch.as_tensor(sigma).max()) < self.at

    def score(self, x, sigma):
        out = self.prior.score(x, sigma)
        return out * float("nan") if self._bad(sigma) else out

    def denoise(self, x, sigma):
        out = self.prior.denoise(x, sigma)
        return out * float("nan") if self._bad(sigma) else out


@pytest.mark.parametrize("weighting", ["afdps", "tds"])
def test_divergence_raises(weighting):
    prior, physics, y = make_problem("inpaint")
    with pytest.raises(SamplerDivergence, match=r"smc-.*diverged at step"):
        sample_smc(physics, y, _NaNPrior(prior, 1.0), sigma_y=SIGMA_Y, steps=20, particles=8, weighting=weighting,
                   generator=torch.Generator().manual_seed(0))


def test_tds_proposal_cap_keeps_strong_likelihoods_stable():
    """CT has ‖A‖² in the hundreds: the explicit twisted-proposal step overshoots without the cap (the uncapped
    run is reported here for contrast); with the default cap the posterior mean is closer than FBP's."""
    from recon.operators import ParallelBeamCT
    from recon.samplers.baselines import analytic_inverse

    prior = GaussianMixturePrior.random((1, 8, 8), 2, seed=1)
    ct = ParallelBeamCT((8, 8), angles=20).to(F64)
    gen = torch.Generator().manual_seed(0)
    y = ct.A(prior.sample(1, generator=gen))
    y = y + 0.05 * torch.randn(y.shape, generator=gen, dtype=F64)
    post = prior.posterior(ct, y, 0.05)
    scale = prior.std.flatten().norm()

    def err(x):
        return float((x.flatten() - post.mean.flatten()).norm() / scale)

    kw = {"sigma_y": 0.05, "steps": 30, "particles": 64, "weighting": "tds"}
    capped = sample_smc(ct, y, prior, generator=torch.Generator().manual_seed(0), **kw)
    assert err(capped.x) < 0.5 * err(analytic_inverse(ct, y))  # measured 0.097 vs FBP 0.317
    # uncapped, the particles run off to ~1e14 (why the cap is on by default): a divergence, reported as one
    # even though every value is finite
    with pytest.raises(SamplerDivergence, match=r"max \|x\|"):
        sample_smc(ct, y, prior, generator=torch.Generator().manual_seed(0), max_shift=float("inf"), **kw)
    with pytest.raises(ValueError, match="max_shift"):
        sample_smc(ct, y, prior, max_shift=0.0, **kw)
