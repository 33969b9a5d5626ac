"""Whitened (PWLS) data for Beer–Lambert CT: the variance model against Monte Carlo, the weighted operator's
adjoint, and the problem ``recon.tasks.weighted_problem`` hands to the samplers."""

from __future__ import annotations

import json

import pytest
import torch

from recon.operators import ParallelBeamCT, TransmissionPoissonNoise, WeightedPhysics, post_log_variance
from recon.operators.weighted import whitening_weights
from recon.tasks import make_task, simulate, weighted_problem


def test_post_log_variance_matches_monte_carlo():
    p = torch.tensor([0.0, 1.0, 3.0, 5.0], dtype=torch.float64)
    model = TransmissionPoissonNoise(I0=1e4, rng=torch.Generator().manual_seed(0))
    draws = torch.stack([model(p) for _ in range(20_000)])
    predicted = post_log_variance(p, 1e4)  # at the noiseless line integrals: e^p / I0
    torch.testing.assert_close(draws.var(0), predicted, rtol=0.05, atol=0)
    plug_in = post_log_variance(draws, 1e4).mean(0)  # from the measured counts, as PWLS uses them
    torch.testing.assert_close(plug_in, predicted, rtol=0.05, atol=0)


def test_post_log_variance_refuses_bad_photons():
    with pytest.raises(ValueError, match="photons"):
        post_log_variance(torch.zeros(3), 0.0)


def test_whitening_makes_the_noise_white():
    v = torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=torch.float64)
    w, sigma = whitening_weights(v)
    assert sigma == pytest.approx(float(1 / (1 / v).mean().sqrt()))
    torch.testing.assert_close(w.double() ** 2 * v, torch.full_like(v, sigma**2), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="positive"):
        whitening_weights(torch.tensor([1.0, 0.0]))


def test_weighted_physics_is_adjoint_and_keeps_the_analytic_inverse():
    op = ParallelBeamCT((32, 32), angles=12)
    w = torch.rand(op.A(torch.zeros(1, 1, 32, 32)).shape, generator=torch.Generator().manual_seed(1)) + 0.5
    wp = WeightedPhysics(op, w)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1, 1, 32, 32, generator=g), torch.randn(w.shape, generator=g)
    lhs, rhs = float((wp.A(x) * y).sum()), float((x * wp.A_adjoint(y)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-4)
    torch.testing.assert_close(wp.A(x), w * op.A(x))
    torch.testing.assert_close(wp.fbp(wp.A(x)), op.fbp(op.A(x)), rtol=1e-4, atol=1e-5)
    assert wp.modality == op.modality and wp.adjoint_is_inverse is False
    with pytest.raises(ValueError, match="positive"):
        WeightedPhysics(op, torch.zeros_like(w))


def test_weighted_problem_whitens_beer_lambert_and_leaves_gaussian_alone():
    spec = make_task("sparse-view-ct", (1, 32, 32), (1.0, 1.0, 1.0), views=16)
    image = torch.zeros(32, 32)
    image[8:24, 8:24] = 40.0
    meas = simulate(spec, image, "HU", photons=1e4, seed=0)
    physics = meas.physics()
    wp, mw = weighted_problem(meas, physics)
    assert isinstance(wp, WeightedPhysics)
    torch.testing.assert_close(mw.y, wp.weights * meas.y)
    assert mw.sigma_y <= meas.sigma_y  # the harmonic mean of the variances is below their mean
    assert mw.noise["weighting"]["sigma_y_white"] == pytest.approx(mw.sigma_y)
    assert "weighting" not in meas.noise  # the input is never modified
    gauss = simulate(spec, image, "HU", noise=0.01, seed=0)
    assert weighted_problem(gauss, physics) == (physics, gauss)


def test_the_pipeline_whitens_for_the_diffusion_methods_and_reports_it(tmp_path, capsys, one_thread):
    from pydicom.data import get_testdata_file

    from recon.cli import main

    ct_small = get_testdata_file("CT_small.dcm", download=False)
    reports = {}
    for method, extra in (("dds", ["--steps", "2"]), ("tv", ["--set", "options.lam=0.001"])):
        out = tmp_path / f"{method}.nii.gz"
        assert main(["reconstruct", "-i", ct_small, "-o", str(out), "--task", "sparse-view-ct", "--views", "30",
                     "--photons", "1e4", "--method", method, *extra, "--json", "-q"]) == 0
        reports[method] = json.loads(capsys.readouterr().out)
    weighting = reports["dds"]["noise"]["weighting"]
    assert weighting["rule"].startswith("inverse post-log variance")
    assert 0 < weighting["sigma_y_white"] <= reports["dds"]["noise"]["sigma_y"]
    assert "weighting" not in reports["tv"]["noise"]  # tv's registry entry keeps the raw data
