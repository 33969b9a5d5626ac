"""Tests of the analytic Gaussian / Gaussian-mixture priors and their exact posteriors (recon.priors.gaussian).

Each test's first line (its docstring) names the independent truth it is checked against.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from deepinv.physics import LinearPhysics
from scipy.stats import multivariate_normal

from recon.operators import Inpainting, box_mask, random_pixel_mask
from recon.priors.gaussian import (
    GaussianMixturePosterior,
    GaussianMixturePrior,
    GaussianPrior,
    bimodal_inpainting_example,
)

F64 = torch.float64
SHAPE = (1, 3, 3)  # d = 9


def _lowrank_parts(k=3, d=9, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = 0.5 * torch.randn(k, d, r, generator=g, dtype=F64)
    dd = 0.05 + 0.2 * torch.rand(k, d, generator=g, dtype=F64)
    return u, dd


def _means(k=3, shape=SHAPE, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, *shape, generator=g, dtype=F64)


def make_prior(kind: str) -> GaussianMixturePrior:
    """Small 3-component priors with each covariance form (and a posterior, itself a prior)."""
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    if kind == "full":
        return GaussianMixturePrior.random(SHAPE, 3, seed=3, length_scale=1.5)
    if kind == "diagonal":
        g = torch.Generator().manual_seed(4)
        return GaussianMixturePrior(w, _means(), 0.05 + 0.3 * torch.rand(3, 9, generator=g, dtype=F64))
    if kind == "lowrank":
        return GaussianMixturePrior(w, _means(), _lowrank_parts())
    if kind == "posterior":
        prior = GaussianMixturePrior.random(SHAPE, 3, seed=5, length_scale=1.5)
        a = torch.randn(4, 9, generator=torch.Generator().manual_seed(6), dtype=F64)
        return prior.posterior(a, torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(7)), 0.3)
    raise AssertionError(kind)


KINDS = ["full", "diagonal", "lowrank", "posterior"]


def _autograd_score(prior, x, sigma):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(prior.log_prob(x, sigma).sum(), x)
    return g


def _dense_params(prior):
    w = prior.weights.double().numpy()
    mus = prior.means.double().reshape(prior.n_components, -1).numpy()
    covs = prior.component_covariances.double().numpy()
    return w, mus, covs


# ------------------------------------------------------------------------------------------------------
# noisy marginal, score, denoiser
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_matches_scipy(kind):
    """Truth: scipy.stats.multivariate_normal densities of the mixture of N(mu_k, Sigma_k + sigma^2 I)."""
    prior = make_prior(kind)
    w, mus, covs = _dense_params(prior)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(8), dtype=F64)
    for sigma in [0.0, 0.1, 2.0] if kind != "posterior" else [0.1, 2.0]:
        ref = np.log(
            sum(
                w[k] * multivariate_normal(mus[k], covs[k] + sigma**2 * np.eye(9)).pdf(x.reshape(4, 9).numpy())
                for k in range(3)
            )
        )
        np.testing.assert_allclose(prior.log_prob(x, sigma).numpy(), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_score_is_autograd_of_log_prob(kind):
    """Truth: torch.autograd.grad of the exact noisy log-density log p_sigma (several sigma, tiny to large)."""
    prior = make_prior(kind)
    g = torch.Generator().manual_seed(9)
    for sigma in [1e-3, 0.05, 0.5, 3.0, 1e3]:
        x = prior.sample(5, generator=g) + sigma * torch.randn(5, *SHAPE, generator=g, dtype=F64)
        ref = _autograd_score(prior, x, sigma)
        got = prior.score(x, sigma)
        assert got.shape == x.shape
        torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9 * ref.abs().max().item())
    # one sigma per batch element
    sig = torch.tensor([1e-2, 0.3, 0.3, 5.0, 50.0], dtype=F64)
    x = prior.sample(5, generator=g) + sig.reshape(-1, 1, 1, 1) * torch.randn(5, *SHAPE, generator=g, dtype=F64)
    ref = _autograd_score(prior, x, sig)
    torch.testing.assert_close(prior.score(x, sig), ref, rtol=1e-7, atol=1e-9 * ref.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_denoise_is_tweedie(kind):
    """Truth: Tweedie's formula x + sigma^2 * (autograd score of log p_sigma), per-batch sigma included."""
    prior = make_prior(kind)
    g = torch.Generator().manual_seed(10)
    sig = torch.tensor([2e-3, 0.1, 0.7, 4.0, 100.0], dtype=F64)
    x = prior.sample(5, generator=g) + sig.reshape(-1, 1, 1, 1) * torch.randn(5, *SHAPE, generator=g, dtype=F64)
    ref = x + sig.reshape(-1, 1, 1, 1) ** 2 * _autograd_score(prior, x, sig)
    torch.testing.assert_close(prior.denoise(x, sig), ref, rtol=1e-6, atol=1e-8)
    for s in [0.05, 1.0]:
        ref = x + s**2 * _autograd_score(prior, x, s)
        torch.testing.assert_close(prior.denoise(x, s), ref, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(prior.eps(x, s), (x - prior.denoise(x, s)) / s)


@pytest.mark.parametrize("kind", ["full", "diagonal", "lowrank"])
def test_denoise_limits(kind):
    """Truth: the limits E[x0|x] -> x as sigma -> 0 (exactly x at 0) and -> the prior mean as sigma -> inf."""
    prior = make_prior(kind)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(11), dtype=F64)
    assert torch.equal(prior.denoise(x, 0.0), x)
    torch.testing.assert_close(prior.denoise(x, 1e-7), x, rtol=0, atol=1e-10)
    far = prior.denoise(x, 1e7)
    torch.testing.assert_close(far, prior.mean.expand_as(x), rtol=0, atol=1e-9)
    mixed = prior.denoise(x, torch.tensor([0.0, 1e-7, 1e7], dtype=F64))
    assert torch.equal(mixed[0], x[0])
    torch.testing.assert_close(mixed[2], prior.mean, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="sigma > 0"):
        prior.score(x, 0.0)


def test_float32_in_float32_out_and_nfe():
    """Truth: the float64 computation (float32 inputs give float32 outputs of the same values)."""
    prior = make_prior("lowrank")
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(12))
    out = prior.denoise(x, 0.3)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, prior.denoise(x.double(), 0.3).float())
    assert prior.score(x, 0.3).dtype == torch.float32 and prior.log_prob(x, 0.3).dtype == torch.float32
    assert prior.nfe == 2 + 2 + 2
    assert prior.normalize(x) is x and prior.denormalize(x) is x


def test_lowrank_large_image_without_dense_matrices():
    """Truth: autograd of log p_sigma for a 64x64 rank-20 prior (d = 4096; nothing d x d is formed)."""
    prior = GaussianMixturePrior.random((1, 64, 64), 2, rank=20, seed=0)
    assert prior.kind == "lowrank"
    g = torch.Generator().manual_seed(13)
    x = prior.sample(2, generator=g) + 0.2 * torch.randn(2, 1, 64, 64, generator=g, dtype=F64)
    ref = _autograd_score(prior, x, 0.2)
    torch.testing.assert_close(prior.score(x, 0.2), ref, rtol=1e-7, atol=1e-9 * ref.abs().max().item())
    assert prior.std.shape == (1, 64, 64)


# ------------------------------------------------------------------------------------------------------
# the three covariance forms agree
# ------------------------------------------------------------------------------------------------------
def _assert_same_prior(p, q, physics):
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(14), dtype=F64)
    for s in [0.0, 0.02, 0.5, 10.0]:
        torch.testing.assert_close(p.log_prob(x, s), q.log_prob(x, s), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(p.denoise(x, s), q.denoise(x, s), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.score(x, 0.3), q.score(x, 0.3), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.mean, q.mean)
    torch.testing.assert_close(p.covariance, q.covariance)
    torch.testing.assert_close(p.std, q.std)
    torch.testing.assert_close(p.std.reshape(-1), p.covariance.diagonal().sqrt())
    y = torch.randn(physics.shape[0], generator=torch.Generator().manual_seed(15), dtype=F64)
    pp, qq = p.posterior(physics, y, 0.2), q.posterior(physics, y, 0.2)
    torch.testing.assert_close(pp.weights, qq.weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pp.means, qq.means, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pp.component_covariances, qq.component_covariances, rtol=1e-10, atol=1e-10)
    assert pp.log_evidence == pytest.approx(qq.log_evidence, rel=1e-10)


def test_lowrank_and_diagonal_forms_match_full_form():
    """Truth: the same covariances given as dense (K, d, d) matrices (full-form linear algebra)."""
    w, mu = torch.tensor([1.0, 2.0, 3.0], dtype=F64), _means()
    a = torch.randn(5, 9, generator=torch.Generator().manual_seed(16), dtype=F64)
    u, dd = _lowrank_parts()
    full = u @ u.transpose(-1, -2) + torch.diag_embed(dd)
    low, ful = GaussianMixturePrior(w, mu, (u, dd)), GaussianMixturePrior(w, mu, full)
    assert low.kind == "lowrank" and ful.kind == "full"
    _assert_same_prior(low, ful, a)
    diag, dful = GaussianMixturePrior(w, mu, dd.reshape(3, *SHAPE)), GaussianMixturePrior(w, mu, torch.diag_embed(dd))
    assert diag.kind == "diagonal"
    _assert_same_prior(diag, dful, a)
    # GaussianPrior is the K = 1 mixture
    single = GaussianPrior(mu[0], (u[0], dd[0]))
    assert single.n_components == 1
    _assert_same_prior(single, GaussianMixturePrior(torch.ones(1), mu[:1], full[:1]), a)


def test_random_lowrank_is_truncated_full_kernel():
    """Truth: the full squared-exponential covariance (rank = d reproduces it; rank = 0 keeps its diagonal)."""
    shape = (2, 3, 4)
    full = GaussianMixturePrior.random(shape, 2, seed=7)
    low = GaussianMixturePrior.random(shape, 2, rank=24, seed=7)
    diag = GaussianMixturePrior.random(shape, 2, rank=0, seed=7)
    torch.testing.assert_close(low.component_covariances, full.component_covariances, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        diag.component_covariances.diagonal(dim1=-2, dim2=-1), full.component_covariances.diagonal(dim1=-2, dim2=-1)
    )
    torch.testing.assert_close(low.means, full.means)
    cov = full.component_covariances[0]
    assert cov[0, 12].abs() < 1e-12  # channels independent
    assert cov[0, 1] > 0.5 * cov[0, 0]  # neighbouring pixels correlated (smooth)


# ------------------------------------------------------------------------------------------------------
# exact posterior against brute force
# ------------------------------------------------------------------------------------------------------
def _grid_posterior(w, mus, covs, a, y, sigma_y, lim=8.0, n=801):
    """Posterior moments and mode weights by quadrature of prior x likelihood on a 1D or 2D grid."""
    d = mus.shape[1]
    t = np.linspace(-lim, lim, n)
    pts = np.stack(np.meshgrid(*([t] * d), indexing="ij"), -1).reshape(-1, d)
    resid = y[None, :] - pts @ a.T
    lik = np.exp(-0.5 * (resid**2).sum(1) / sigma_y**2)
    parts = np.stack([w[k] * multivariate_normal(mus[k], covs[k]).pdf(pts).reshape(-1) * lik for k in range(len(w))])
    z = parts.sum()
    dens = parts.sum(0) / z
    mean = dens @ pts
    cov = (dens[:, None] * (pts - mean)).T @ (pts - mean)
    return parts.sum(1) / z, mean, cov


@pytest.mark.parametrize(
    ("mus", "covs", "a", "y", "sigma_y"),
    [
        (  # d = 2, one measurement of a combination: modes separated along the unobserved direction
            [[-1.5, 1.0], [1.0, -1.0], [0.5, 2.0]],
            [[[0.6, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.5]], [[0.8, 0.0], [0.0, 0.2]]],
            [[1.0, -0.5]],
            [0.8],
            0.5,
        ),
        ([[-1.0], [1.5]], [[[0.5]], [[0.3]]], [[2.0]], [0.9], 0.7),  # d = 1
    ],
)
def test_posterior_matches_grid_quadrature(mus, covs, a, y, sigma_y):
    """Truth: numerical integration of prior density x Gaussian likelihood on a fine grid (d = 1 and 2)."""
    mus, covs, a, y = (np.array(v, dtype=np.float64) for v in (mus, covs, a, y))
    w = np.array([0.2, 0.5, 0.3][: len(mus)])
    prior = GaussianMixturePrior(torch.tensor(w), torch.tensor(mus), torch.tensor(covs))
    post = prior.posterior(torch.tensor(a), torch.tensor(y), sigma_y)
    assert isinstance(post, GaussianMixturePosterior)
    weights, mean, cov = _grid_posterior(w, mus, covs, a, y, sigma_y, n=801 if len(mus[0]) == 2 else 20001)
    np.testing.assert_allclose(post.weights.numpy(), weights, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(post.mean.numpy(), mean, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(post.covariance.numpy(), cov, rtol=1e-7, atol=1e-9)
    assert post.mean.shape == (len(mus[0]),) and post.std.shape == (len(mus[0]),)


def test_posterior_matches_importance_sampling():
    """Truth: self-normalised importance sampling (numpy prior draws x likelihood), d = 16, 5-SE tolerance."""
    prior = GaussianMixturePrior.random((1, 4, 4), 3, seed=17, length_scale=1.5, mean_scale=1.0)
    rng = np.random.default_rng(18)
    a = rng.standard_normal((3, 16)) / 4.0
    sigma_y = 0.3
    x_true = prior.sample(1, generator=torch.Generator().manual_seed(19)).reshape(16).numpy()
    y = a @ x_true + sigma_y * rng.standard_normal(3)
    post = prior.posterior(torch.tensor(a), torch.tensor(y), sigma_y)

    w, mus, covs = _dense_params(prior)
    n = 200_000
    labels = rng.choice(3, size=n, p=w)
    xs = np.empty((n, 16))
    for k in range(3):
        idx = labels == k
        xs[idx] = rng.multivariate_normal(mus[k], covs[k], size=idx.sum())
    logl = -0.5 * ((y[None] - xs @ a.T) ** 2).sum(1) / sigma_y**2
    wt = np.exp(logl - logl.max())
    wt /= wt.sum()
    ess = 1.0 / (wt**2).sum()
    assert ess > 2000  # effective sample size

    def check(f, exact, floor=1e-12):
        est = wt @ f
        se = np.sqrt((wt[:, None] ** 2 * (f - est) ** 2).sum(0))
        assert np.all(np.abs(est - exact) <= 5 * se + floor), (est, exact, se)

    check(xs, post.mean.reshape(16).numpy())
    # a mode weight far below 1/ESS is not resolved by the sample (its standard error is estimated from a
    # handful of draws, or none): below that resolution the check is on the absolute error only
    check(np.eye(3)[labels], post.weights.numpy(), floor=1.0 / ess)
    check((xs - post.mean.reshape(16).numpy()) ** 2, post.variance.reshape(16).numpy())


def _check_moments(samples, mean, cov, z=5.0):
    n = samples.shape[0]
    s = samples.reshape(n, -1).double()
    m = mean.reshape(-1).double()
    se_mean = cov.diagonal().sqrt() / math.sqrt(n)
    assert ((s.mean(0) - m).abs() <= z * se_mean).all()
    c = s - m
    prods = c[:, :, None] * c[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    assert ((prods.mean(0) - cov).abs() <= z * se_cov + 1e-12).all()


@pytest.mark.parametrize("kind", ["full", "diagonal", "lowrank"])
def test_prior_samples_match_moments(kind):
    """Truth: the closed-form mixture mean/covariance (standard-error tolerances) and component weights."""
    prior = make_prior(kind)
    x, labels = prior.sample(20_000, generator=torch.Generator().manual_seed(20), return_components=True)
    assert x.shape == (20_000, *SHAPE)
    _check_moments(x, prior.mean, prior.covariance)
    freq = torch.bincount(labels, minlength=3).double() / 20_000
    w = prior.weights
    assert ((freq - w).abs() <= 5 * (w * (1 - w) / 20_000).sqrt()).all()


def test_posterior_samples_match_moments_and_are_reproducible():
    """Truth: the closed-form posterior mean/covariance (standard-error tolerances); seeded generators."""
    post = make_prior("posterior")
    x = post.sample(20_000, generator=torch.Generator().manual_seed(21))
    _check_moments(x, post.mean, post.covariance)
    a = post.sample(5, generator=torch.Generator().manual_seed(3))
    b = post.sample(5, generator=torch.Generator().manual_seed(3))
    c = post.sample(5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------------
# physics, noiseless data, the bimodal example
# ------------------------------------------------------------------------------------------------------
def test_physics_forms_give_same_posterior():
    """Truth: the posterior from the explicit dense matrix (Inpainting, and a deepinv LinearPhysics)."""
    prior = GaussianMixturePrior.random((1, 4, 4), 2, seed=22, length_scale=1.5)
    mask = random_pixel_mask((4, 4), 0.5, seed=1)
    phys = Inpainting((4, 4), mask)
    y = phys.A(prior.sample(1, generator=torch.Generator().manual_seed(23)))
    p_phys = prior.posterior(phys, y, 0.1)
    p_diag = prior.posterior(torch.diag(mask.reshape(-1).double()), y.reshape(-1), 0.1)
    keep = mask.reshape(-1) > 0
    p_rows = prior.posterior(torch.eye(16, dtype=F64)[keep], y.reshape(-1)[keep], 0.1)
    for q in (p_diag, p_rows):
        torch.testing.assert_close(p_phys.weights, q.weights)
        torch.testing.assert_close(p_phys.means, q.means)
        torch.testing.assert_close(p_phys.component_covariances, q.component_covariances)
        assert p_phys.log_evidence == pytest.approx(q.log_evidence)

    m = torch.randn(6, 16, generator=torch.Generator().manual_seed(24), dtype=F64)
    lin = LinearPhysics(
        A=lambda x: (x.reshape(x.shape[0], -1) @ m.T).reshape(x.shape[0], 2, 3),
        A_adjoint=lambda v: (v.reshape(v.shape[0], -1) @ m).reshape(v.shape[0], 1, 4, 4),
    )
    yl = lin.A(prior.sample(1, generator=torch.Generator().manual_seed(25)))
    p_lin, p_mat = prior.posterior(lin, yl, 0.2), prior.posterior(m, yl.reshape(-1), 0.2)
    assert p_lin.measurement_shape == (2, 3)
    torch.testing.assert_close(p_lin.weights, p_mat.weights)
    torch.testing.assert_close(p_lin.means, p_mat.means)
    torch.testing.assert_close(p_lin.component_covariances, p_mat.component_covariances)
    # a physics that only accepts float32 (float32 buffers) is read in float32
    m32 = m.float()
    lin32 = LinearPhysics(A=lambda x: x.reshape(x.shape[0], -1) @ m32.T, A_adjoint=lambda v: v @ m32)
    p32 = prior.posterior(lin32, yl.reshape(1, 6), 0.2)
    torch.testing.assert_close(p32.matrix, m32.double())
    torch.testing.assert_close(p32.means, p_mat.means, rtol=1e-5, atol=1e-5)


def test_noiseless_posterior_is_the_small_noise_limit():
    """Truth: the sigma_y -> 0 limit of the noisy posterior, and the data themselves (A mean == y exactly)."""
    prior = GaussianMixturePrior.random((1, 4, 4), 2, seed=26, length_scale=1.5)
    mask = box_mask((4, 4), ((1, 3), (1, 4)))
    phys = Inpainting((4, 4), mask)
    y = phys.A(prior.sample(1, generator=torch.Generator().manual_seed(27)))
    exact = prior.posterior(phys, y, 0.0)
    near = prior.posterior(phys, y, 1e-6)
    torch.testing.assert_close(exact.weights, near.weights, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(exact.means, near.means, rtol=0, atol=1e-6)
    obs = mask.bool().expand(2, 1, 4, 4)
    torch.testing.assert_close(exact.means[obs], y.expand(2, 1, 4, 4)[obs], rtol=0, atol=1e-12)
    assert exact.std[mask.bool()[None]].max() < 1e-6
    # the posterior is a prior too: its noisy marginal has an exact denoiser (Tweedie through autograd)
    x = exact.sample(3, generator=torch.Generator().manual_seed(28)) + 0.1 * torch.randn(3, 1, 4, 4, dtype=F64)
    torch.testing.assert_close(exact.denoise(x, 0.1), x + 0.01 * _autograd_score(exact, x, 0.1), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="singular"):
        exact.log_prob(x, 0.0)


def test_bimodal_inpainting_example():
    """Truth: the construction (means agree where observed, differ by `separation` in the box) and y itself."""
    prior, phys, y, sigma_y = bimodal_inpainting_example()
    assert isinstance(phys, Inpainting) and y.shape == (1, 1, 8, 8) and sigma_y == 0.01
    torch.testing.assert_close(prior.weights, torch.tensor([0.3, 0.7], dtype=F64))
    post = prior.posterior(phys, y, sigma_y)
    w = post.weights
    assert ((w > 0.1) & (w < 0.9)).all()
    torch.testing.assert_close(w, torch.tensor([0.3, 0.7], dtype=F64))  # the data cannot tell the modes apart
    hole = ~phys.mask[0].bool().expand(2, 1, 8, 8)
    gap = (post.means[0] - post.means[1])[hole[0]]
    comp_std = post.component_covariances.diagonal(dim1=-2, dim2=-1).sqrt().reshape(2, 1, 8, 8)
    assert gap.abs().min() > 1.4 and gap.abs().min() > 5 * comp_std[hole].max()
    obs = ~hole
    assert (post.means[obs] - y.expand(2, 1, 8, 8)[obs]).abs().max() < 3 * sigma_y
    # samples from the posterior split between the modes with the right frequencies
    x, labels = post.sample(4000, generator=torch.Generator().manual_seed(29), return_components=True)
    frac = (labels == 1).double().mean()
    assert abs(frac - 0.7) < 5 * math.sqrt(0.21 / 4000)
    assert (x[labels == 0][:, hole[0]].mean() - x[labels == 1][:, hole[0]].mean()).abs() > 1.0


# ------------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------------
def _errors():
    w, mu = torch.tensor([0.4, 0.6], dtype=F64), _means(2)
    eye = torch.eye(9, dtype=F64).expand(2, 9, 9)
    nonsym = eye.clone()
    nonsym[0, 0, 1] = 0.5
    nonpsd = eye.clone()
    nonpsd[1, 0, 0] = -1.0
    good = GaussianMixturePrior(w, mu, eye)
    x = torch.zeros(2, *SHAPE, dtype=F64)
    a_dup = torch.ones(2, 9, dtype=F64)
    return [
        (lambda: GaussianMixturePrior(torch.tensor([0.4, -0.6]), mu, eye), "weights must be positive"),
        (lambda: GaussianMixturePrior(torch.tensor([0.4, 0.0]), mu, eye), "weights must be positive"),
        (lambda: GaussianMixturePrior(torch.ones(3), mu, eye), r"weights must have shape \(2,\)"),
        (lambda: GaussianMixturePrior(w, torch.zeros(2), eye), "means must have shape"),
        (lambda: GaussianMixturePrior(w, mu, torch.eye(8).expand(2, 8, 8)), r"covariances must have shape \(2, 9, 9\)"),
        (lambda: GaussianMixturePrior(w, mu, nonsym), "symmetric"),
        (lambda: GaussianMixturePrior(w, mu, nonpsd), "positive semi-definite"),
        (lambda: GaussianMixturePrior(w, mu, -torch.ones(2, 9)), ">= 0"),
        (
            lambda: GaussianMixturePrior(w, mu, (torch.ones(2, 8, 2), torch.ones(2, 9))),
            r"U must have shape \(2, 9, r\)",
        ),
        (lambda: GaussianMixturePrior(w, mu, (torch.ones(2, 9, 2), torch.ones(2, 8))), r"D must have shape \(2, 9\)"),
        (lambda: GaussianMixturePrior(w, mu, (torch.ones(2, 9, 2),)), r"\(U, D\)"),
        (lambda: good.denoise(x, -0.1), "sigma must be finite and >= 0"),
        (lambda: good.log_prob(x, torch.tensor([0.1, -1.0])), "sigma must be finite and >= 0"),
        (lambda: good.denoise(x, torch.ones(3)), r"sigma must be a number or a tensor of shape \(2,\)"),
        (lambda: good.score(x, 0.0), "sigma > 0"),
        (lambda: good.denoise(torch.zeros(2, 9, dtype=F64), 0.1), r"x must have shape \(B, 1, 3, 3\), got \(2, 9\)"),
        (lambda: good.denoise(torch.zeros(2, *SHAPE, dtype=torch.int64), 0.1), "float32 or float64"),
        (lambda: good.posterior(Inpainting((4, 4), torch.ones(4, 4)), torch.zeros(1, 1, 4, 4), 0.1), "image_shape"),
        (lambda: good.posterior(torch.ones(3, 8), torch.zeros(3), 0.1), r"shape \(m, 9\)"),
        (lambda: good.posterior(torch.ones(3, 9), torch.zeros(4), 0.1), r"y must have shape \(1, 3\) or \(3,\)"),
        (lambda: good.posterior(torch.ones(3, 9), torch.zeros(3), -0.1), "sigma_y must be finite and >= 0"),
        (lambda: good.posterior(a_dup, torch.ones(2), 0.0), "singular"),
        (lambda: good.posterior("blur", torch.ones(2), 0.1), "LinearPhysics"),
        (lambda: GaussianMixturePrior.random(SHAPE, 0), "n_components"),
        (lambda: GaussianMixturePrior.random(SHAPE, 2, rank=10), "rank"),
    ]


@pytest.mark.parametrize("case", range(25))
def test_input_errors(case):
    """Truth: the documented contract (ValueError naming the argument, the expected and the given)."""
    cases = _errors()
    assert len(cases) == 25
    fn, match = cases[case]
    with pytest.raises(ValueError, match=match):
        fn()


def test_posterior_class_is_not_built_directly():
    """Truth: the documented construction path (GaussianMixturePrior.posterior only)."""
    with pytest.raises(TypeError):
        GaussianMixturePosterior()
