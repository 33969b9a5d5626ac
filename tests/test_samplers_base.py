"""The sampler interface: dispatch, argument checks, weighted moments, divergence detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.samplers import SamplerDivergence, check_bounded, check_finite, reconstruct
from recon.samplers.base import weighted_moments


def test_weighted_moments_match_numpy():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(50, 3, 1, 4, 4))
    w = rng.random((50, 3))
    w /= w.sum(0)
    mean, std = weighted_moments(torch.from_numpy(samples), torch.from_numpy(w))
    for b in range(3):
        m = np.average(samples[:, b], axis=0, weights=w[:, b])
        v = np.average((samples[:, b] - m) ** 2, axis=0, weights=w[:, b])
        np.testing.assert_allclose(mean[b].numpy(), m)
        np.testing.assert_allclose(std[b].numpy(), np.sqrt(v))


def test_bad_arguments_and_divergence():
    y = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        reconstruct(None, y, None, method="magic")
    with pytest.raises(ValueError, match="sigma_y"):
        reconstruct(None, y, None, method="dps", sigma_y=-1.0)
    check_finite(torch.ones(3), "dps", 4)
    with pytest.raises(SamplerDivergence, match=r"dps: the iterate diverged at step 7 .*reduce zeta"):
        check_finite(torch.tensor([1.0, float("nan")]), "dps", 7, "reduce zeta")


def test_finite_but_runaway_values_are_a_divergence():
    """A sampler can run off to huge finite values (an uncapped gradient step); those are reported too, both by
    ``check_bounded`` and by ``reconstruct`` on any diffusion sampler's output."""
    from recon.operators import Inpainting
    from recon.priors import GaussianPrior

    check_bounded(torch.full((4,), 99.0), "smc-tds", 3)
    check_bounded(torch.full((4,), 150.0), "smc-tds", 3, sigma=1.0)  # a noisy state may be larger
    with pytest.raises(SamplerDivergence, match=r"smc-tds: the iterate diverged at step 3 \(max \|x\| = 1e\+08"):
        check_bounded(torch.tensor([0.0, -1e8]), "smc-tds", 3)
    with pytest.raises(SamplerDivergence, match="non-finite"):
        check_bounded(torch.tensor([0.0, float("inf")]), "smc-tds", 3)

    class RunawayPrior:  # a denoiser that blows its input up: the output is finite and absurd
        def __init__(self, prior):
            self.prior = prior

        def __getattr__(self, name):
            return getattr(self.prior, name)

        def denoise(self, x, sigma):
            return 1e6 * self.prior.denoise(x, sigma) + 1e6

    prior = GaussianPrior(torch.zeros(1, 4, 4), torch.ones(1, 4, 4))
    physics = Inpainting((4, 4), mask=torch.ones(4, 4))
    y = physics.A(torch.zeros(1, 1, 4, 4))
    assert reconstruct(physics, y, prior, "dds", sigma_y=0.01, steps=5).x.abs().max() < 10
    with pytest.raises(SamplerDivergence, match=r"dds: .*max \|x\|"):
        reconstruct(physics, y, RunawayPrior(prior), "dds", sigma_y=0.01, steps=5, cg_iters=0)
