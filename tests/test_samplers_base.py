"""The sampler interface: dispatch, argument checks, weighted moments, divergence detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.samplers import SamplerDivergence, check_finite, reconstruct
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
