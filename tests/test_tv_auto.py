"""TV's automatic weight (discrepancy principle), the oracle weight and the noise-level estimate."""

from __future__ import annotations

import pytest
import torch

from recon.datasets.phantoms import shepp_logan
from recon.operators import CartesianMRI, ParallelBeamCT
from recon.samplers import reconstruct
from recon.samplers.baselines import sample_tv, tv_oracle_weight
from recon.samplers.noise import estimate_noise_sigma
from recon.samplers.reddiff import measured_entries

SIZE = 48


def _ct_problem(sigma: float, views: int = 40, seed: int = 0):
    x = shepp_logan((SIZE, SIZE)).double()
    physics = ParallelBeamCT((SIZE, SIZE), angles=views)
    clean = physics.A(x)
    y = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed), dtype=clean.dtype)
    return x, physics, y


def test_discrepancy_is_met_at_the_chosen_weight():
    x, physics, y = _ct_problem(0.05)
    res = reconstruct(physics, y, None, "tv", sigma_y=0.05, steps=150)
    rec = res.info["tv_weight"]
    assert res.info["options"]["weight"] == "auto" and rec["rule"] == "discrepancy" and rec["bracketed"]
    m = measured_entries(physics, x)
    assert rec["measured_entries"] == m and rec["target"] == pytest.approx(m * 0.05**2)
    r2 = float((physics.A(res.x) - y).pow(2).sum())
    assert 0.75 < r2 / rec["target"] < 1.33
    assert rec["lam"] == res.info["options"]["lam"] and rec["sigma_y_source"] == "given"


def test_weight_grows_with_noise():
    lams = [sample_tv(*_ct_problem(s)[1:], sigma_y=s, steps=150).info["options"]["lam"] for s in (0.02, 0.05, 0.15)]
    assert lams[0] < lams[1] < lams[2]


def test_auto_weight_is_near_the_oracle_on_a_ct_slice():
    """pydicom's CT_small at 48², 40 views, Beer–Lambert noise (3000 photons), in μ as ``recon.tasks`` simulates:
    the discrepancy weight is within a factor 2 of the weight that is best against the truth. (On the
    piecewise-constant Shepp–Logan phantom the oracle wants about 4× more: TV's own model fits it too well.)"""
    import numpy as np
    from pydicom.data import get_testdata_file
    from skimage.transform import resize

    from recon.datasets.slices import read_slices
    from recon.tasks import make_task, simulate, to_domain

    hu = next(read_slices(get_testdata_file("CT_small.dcm", download=False))).astype(np.float64)
    img = torch.from_numpy(resize(hu, (SIZE, SIZE), anti_aliasing=True, preserve_range=True)).float()
    spec = make_task("sparse-view-ct", (1, SIZE, SIZE), (1.0, 2.0, 2.0), views=40)
    meas = simulate(spec, img, "HU", photons=3e3)
    physics, x = meas.physics(), to_domain(spec, img[None, None], "HU")
    auto = sample_tv(physics, meas.y, sigma_y=meas.sigma_y, steps=150)
    lam, x_oracle, record = tv_oracle_weight(physics, meas.y, x, sigma_y=meas.sigma_y, steps=150, span=2,
                                             golden_iters=4)
    assert record["rule"] == "oracle" and len(record["evals"]) == 5 + 2 + 4
    assert 0.5 < auto.info["options"]["lam"] / lam < 2.0
    mse = lambda z: float((z - x).pow(2).mean())  # noqa: E731
    assert mse(x_oracle) <= mse(auto.x) * 1.05


def test_sigma_zero_keeps_the_heuristic_and_given_lam_wins():
    _, physics, y = _ct_problem(0.05)
    res = sample_tv(physics, y, sigma_y=0.0, steps=5)
    assert res.info["options"]["weight"] == "heuristic" and "tv_weight" not in res.info
    assert sample_tv(physics, y, sigma_y=0.05, steps=5, lam=0.3).info["options"]["lam"] == 0.3
    with pytest.raises(ValueError, match="lam or weight"):
        sample_tv(physics, y, sigma_y=0.05, lam=0.3, weight="auto")
    with pytest.raises(ValueError, match="weight"):
        sample_tv(physics, y, sigma_y=0.05, weight="sure")


def _slice(name: str, size: int):
    import numpy as np
    from pydicom.data import get_testdata_file
    from skimage.transform import resize

    from recon.datasets.slices import read_slices

    img = np.abs(next(read_slices(get_testdata_file(name, download=False))).astype(np.float64))
    if name == "CT_small.dcm":
        img = next(read_slices(get_testdata_file(name, download=False))).astype(np.float64)
    return torch.from_numpy(resize(img, (size, size), anti_aliasing=True, preserve_range=True)).float()


def _simulated(task: str, name: str, size: int, **kw):
    from recon.tasks import make_task, simulate

    params = {"views": 60} if task == "sparse-view-ct" else {"acceleration": 4}
    spec = make_task(task, (1, size, size), (1.0, 2.0, 2.0), **params)
    meas = simulate(spec, _slice(name, size), "HU" if task != "mri" else None, **kw)
    return meas.physics(), meas.y, meas.sigma_y


def test_auto_weight_estimates_sigma_when_not_given():
    physics, y, sigma = _simulated("sparse-view-ct", "CT_small.dcm", 64, noise=0.02)
    rec = sample_tv(physics, y, sigma_y=0.0, weight="auto", steps=100).info["tv_weight"]
    assert rec["sigma_y_source"] == "estimated" and rec["sigma_y"] == pytest.approx(sigma, rel=0.25)


@pytest.mark.parametrize("rel", [0.01, 0.03])
def test_noise_estimate_ct_gaussian(rel):
    """Gaussian noise on CT_small's sinogram (μ, 64², 2 mm pixels) as ``recon.tasks.simulate`` adds it."""
    physics, y, sigma = _simulated("sparse-view-ct", "CT_small.dcm", 64, noise=rel)
    assert estimate_noise_sigma(physics, y) == pytest.approx(sigma, rel=0.2)


@pytest.mark.parametrize("photons", [1e3, 1e4])
def test_noise_estimate_ct_poisson(photons):
    """Beer–Lambert noise: the RMS level ``simulate`` reports, from the data alone."""
    physics, y, sigma = _simulated("sparse-view-ct", "CT_small.dcm", 64, photons=photons)
    assert estimate_noise_sigma(physics, y, kind="poisson") == pytest.approx(sigma, rel=0.2)
    with pytest.raises(ValueError, match="poisson"):
        estimate_noise_sigma(CartesianMRI((8, 8), acceleration=2, real_input=True), torch.zeros(1, 2, 8, 8),
                             kind="poisson")


@pytest.mark.parametrize("rel", [0.02, 0.04])
def test_noise_estimate_mri_outer_kspace(rel):
    """MR_small interpolated to 128² (its own acquisition noise, in the native 64² k-space corners, is smoothed
    away), 4× random mask, Gaussian noise on the sampled k-space only."""
    physics, y, sigma = _simulated("mri", "MR_small.dcm", 128, noise=rel)
    assert estimate_noise_sigma(physics, y) == pytest.approx(sigma, rel=0.2)
