"""k-space sampling masks: fastMRI selection rules, acceleration, centre, seeding, Poisson-disc geometry, the share
of an image's energy a mask leaves out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.operators import CartesianMRI, equispaced_mask, gaussian_mask, poisson_disc_mask, random_mask
from recon.operators.masks import default_center_fraction, unsampled_energy

F64 = torch.float64


def _centre(n: int, cf: float) -> tuple[int, int]:
    num_low = round(n * cf)
    return (n - num_low + 1) // 2, num_low


def _accel(mask: torch.Tensor) -> float:
    return mask.numel() / float(mask.sum())


# ------------------------------------------------------------------------------------------ fastMRI 1D
def test_random_mask_matches_fastmri_rule_exactly():
    """Independent re-statement of fastMRI RandomMaskFunc with the same generator stream."""
    n, acc, cf, seed = 320, 4, 0.08, 7
    mask = random_mask((10, n), acc, cf, seed)
    pad, num_low = _centre(n, cf)
    rng = np.random.default_rng(seed)
    prob = (n / acc - num_low) / (n - num_low)
    ref = rng.uniform(size=n) < prob
    ref[pad : pad + num_low] = True
    assert mask.dtype == torch.float32 and mask.shape == (10, n)
    np.testing.assert_array_equal(mask[0].numpy(), ref.astype(np.float32))
    assert torch.equal(mask, mask[:1].expand(10, n)), "columns must be broadcast over rows"


@pytest.mark.parametrize("acc", [4, 8])
def test_random_mask_statistics_over_seeds(acc):
    n, seeds = 368, range(300)
    cf = default_center_fraction(acc)
    pad, num_low = _centre(n, cf)
    masks = np.stack([random_mask((n,), acc, seed=s).numpy() for s in seeds])
    assert masks[:, pad : pad + num_low].all(), "centre must always be fully sampled"
    # expected number of lines is exactly N / R; mean over 300 seeds within 5 % (and within 4 std errors)
    counts = masks.sum(1)
    assert abs(counts.mean() - n / acc) / (n / acc) < 0.05
    assert abs(np.mean(n / counts) - acc) / acc < 0.05
    # empirical keep probability of the non-centre columns ~ p (binomial standard error)
    p = (n / acc - num_low) / (n - num_low)
    outer = np.delete(masks, np.arange(pad, pad + num_low), axis=1)
    se = np.sqrt(p * (1 - p) / outer.size)
    assert abs(outer.mean() - p) < 4 * se


def test_random_mask_seeding():
    a, b, c = (
        random_mask((16, 64), 4, seed=1),
        random_mask((16, 64), 4, seed=1),
        random_mask((16, 64), 4, seed=2),
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert set(torch.unique(a).tolist()) <= {0.0, 1.0}


def test_default_center_fraction():
    assert default_center_fraction(4) == 0.08 and default_center_fraction(8) == 0.04


@pytest.mark.parametrize("n,acc", [(320, 4), (368, 4), (320, 8), (30, 3)])
def test_equispaced_mask_fastmri_rule(n, acc):
    """EquiSpacedMaskFunc: centre block plus mask[offset::R] with offset in [0, R)."""
    cf = default_center_fraction(acc)
    pad, num_low = _centre(n, cf)
    mask = equispaced_mask((4, n), acc, seed=3)[0].numpy().astype(bool)
    matches = []
    for offset in range(acc):
        ref = np.zeros(n, dtype=bool)
        ref[offset::acc] = True
        ref[pad : pad + num_low] = True
        matches.append(np.array_equal(ref, mask))
    assert sum(matches) == 1


def test_equispaced_offsets_cover_range_and_are_seeded():
    n, acc = 64, 4
    # the first 10 columns lie before the centre block, so they show the offset alone
    seen = {
        tuple(np.flatnonzero(equispaced_mask((n,), acc, center_fraction=0.04, seed=s).numpy()[:10]))
        for s in range(40)
    }
    assert len(seen) == acc
    assert torch.equal(equispaced_mask((n,), acc, seed=5), equispaced_mask((n,), acc, seed=5))


@pytest.mark.parametrize("n", [256, 320, 368])
@pytest.mark.parametrize("acc", [4, 8])
def test_equispaced_fraction_acceleration_within_5_percent(n, acc):
    for seed in range(5):
        mask = equispaced_mask((n,), acc, seed=seed, fraction=True)
        assert abs(_accel(mask) - acc) / acc < 0.05
        pad, num_low = _centre(n, default_center_fraction(acc))
        assert mask[pad : pad + num_low].all()


def test_equispaced_plain_acceleration_is_documented_lower():
    # fastMRI EquiSpacedMaskFunc: centre on top of N/R lines, so R_achieved < R (N=320, R=4 -> ~3.2)
    assert 3.0 < _accel(equispaced_mask((320,), 4, seed=0)) < 3.5


# ------------------------------------------------------------------------------------------ 2D masks
@pytest.mark.parametrize("shape,acc", [((64, 64), 4), ((64, 64), 8), ((48, 80), 6), ((3, 64, 64), 5)])
def test_poisson_disc_acceleration_calib_and_3d(shape, acc):
    mask = poisson_disc_mask(shape, acc, calib=(8, 8), seed=0)
    assert mask.shape == shape and mask.dtype == torch.float32
    assert abs(_accel(mask) - acc) / acc < 0.05
    h, w = shape[-2:]
    assert mask[..., h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].all()
    if len(shape) == 3:
        assert torch.equal(mask[0], mask[-1])


def test_poisson_disc_is_a_variable_density_poisson_disc():
    h = w = 96
    mask = poisson_disc_mask((h, w), 5, calib=(12, 12), seed=1).numpy().astype(bool)
    yy, xx = np.mgrid[:h, :w]
    # sigpy's normalised radius, > 0 outside the calibration box
    rx = np.maximum(np.abs(xx - w / 2) - 6, 0)
    ry = np.maximum(np.abs(yy - h / 2) - 6, 0)
    r = np.hypot(rx / rx.max(), ry / ry.max())
    # Poisson-disc property: every exclusion radius outside the calibration box exceeds one pixel, so no
    # two such samples are 4-neighbours
    pts = mask & (r > 0)
    assert not (pts[1:] & pts[:-1]).any() and not (pts[:, 1:] & pts[:, :-1]).any()
    # variable density: sampling density falls with the distance from the centre
    inner = mask[(r > 0) & (r < 0.3)].mean()
    outer = mask[(r > 0.6) & (r < 1)].mean()
    assert inner > 1.5 * outer
    assert not mask[r >= 1].any(), "corners are cropped"


def test_poisson_disc_seeding_and_large_grids():
    a = poisson_disc_mask((64, 64), 4, calib=(8, 8), seed=3)
    assert torch.equal(a, poisson_disc_mask((64, 64), 4, calib=(8, 8), seed=3))
    assert not torch.equal(a, poisson_disc_mask((64, 64), 4, calib=(8, 8), seed=4))
    big = poisson_disc_mask((256, 256), 6, seed=0)  # tests assert no wall-clock times
    assert abs(_accel(big) - 6) / 6 < 0.05


@pytest.mark.parametrize("shape,acc", [((64, 64), 4), ((48, 80), 7.5), ((2, 32, 32), 3)])
def test_gaussian_mask_acceleration_exact_count(shape, acc):
    mask = gaussian_mask(shape, acc, calib=(6, 6), seed=0)
    h, w = shape[-2:]
    assert int(mask.reshape(-1, h, w)[0].sum()) == round(h * w / acc)
    assert abs(_accel(mask) - acc) / acc < 0.05
    assert mask[..., h // 2 - 3 : h // 2 + 3, w // 2 - 3 : w // 2 + 3].all()


def test_gaussian_mask_variable_density_and_seeding():
    n = 128
    masks = np.stack([gaussian_mask((n, n), 6, calib=(8, 8), seed=s).numpy() for s in range(5)])
    yy, xx = np.mgrid[:n, :n]
    rad = np.hypot(yy - n // 2, xx - n // 2)
    assert masks[:, (rad > 8) & (rad < 20)].mean() > 3 * masks[:, rad > 45].mean()
    assert not np.array_equal(masks[0], masks[1])
    assert torch.equal(gaussian_mask((n, n), 6, seed=9), gaussian_mask((n, n), 6, seed=9))


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("fn", [random_mask, equispaced_mask, poisson_disc_mask, gaussian_mask])
def test_bad_acceleration(fn):
    with pytest.raises(ValueError, match="acceleration"):
        fn((32, 32), 0.5)
    with pytest.raises(ValueError, match="acceleration"):
        fn((32, 32), float("nan"))


@pytest.mark.parametrize("fn", [random_mask, equispaced_mask, poisson_disc_mask, gaussian_mask])
def test_bad_shape_and_seed(fn):
    with pytest.raises(ValueError, match="shape"):
        fn((32, 0), 4)
    with pytest.raises(ValueError, match="shape"):
        fn(32, 4)
    with pytest.raises(ValueError, match="seed"):
        fn((32, 32), 4, seed=-1)


def test_centre_over_budget_and_calib_over_budget():
    with pytest.raises(ValueError, match="centre"):
        random_mask((64,), 8, center_fraction=0.5)
    with pytest.raises(ValueError, match="center_fraction"):
        random_mask((64,), 4, center_fraction=1.5)
    with pytest.raises(ValueError, match="calibration box"):
        poisson_disc_mask((32, 32), 8, calib=(24, 24))
    with pytest.raises(ValueError, match="calibration box"):
        gaussian_mask((32, 32), 8, calib=(24, 24))


def test_poisson_disc_unreachable_acceleration():
    with pytest.raises(ValueError, match="within 5%"):
        poisson_disc_mask((32, 32), 1.5, calib=(4, 4))


# ------------------------------------------------------------------------------------------ unsampled energy
@pytest.mark.parametrize("shape", [(16, 16), (6, 8, 10)])
def test_unsampled_energy_is_the_energy_an_operator_loses_on_an_image_of_that_spectrum(shape):
    """An image whose k-space has amplitude sqrt(1/(1 + |k|²)) with random phases: by Parseval, the share of its
    energy the operator's mask drops is ``unsampled_energy`` (ties the function to the operator's centred layout)."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(shape, generator=g) < 0.4).float()
    mask[tuple(n // 2 for n in shape)] = 1.0
    fft_dims = "3d" if len(shape) == 3 else "2d"
    full = CartesianMRI(shape, mask=torch.ones(shape), fft_dims=fft_dims)
    part = CartesianMRI(shape, mask=mask, fft_dims=fft_dims)
    k2 = sum(((torch.arange(n) - n // 2) ** 2).reshape([-1 if i == a else 1 for i in range(len(shape))]).double()
             for a, n in enumerate(shape))
    amplitude = (1.0 / (1.0 + k2)).sqrt() * torch.exp(2j * torch.pi * torch.rand(shape, generator=g, dtype=F64))
    kspace = torch.stack([amplitude.real, amplitude.imag])[None].to(torch.float64)
    x = full.A_adjoint(kspace)
    kept = float(part.A(x).pow(2).sum() / x.pow(2).sum())
    assert unsampled_energy(mask) == pytest.approx(1.0 - kept, rel=1e-9)
    assert part.unsampled_energy == pytest.approx(1.0 - kept, rel=1e-9)


def test_unsampled_energy_bounds_and_fastmri_centre():
    """0 for a full mask, 1 for an empty one; fastMRI's centre halving at 8× leaves more of the image out than
    6× does, though both sample the same share of the high frequencies' lines."""
    assert unsampled_energy(torch.ones(8, 8)) == 0.0
    assert unsampled_energy(torch.zeros(8, 8)) == 1.0
    u6 = [unsampled_energy(random_mask((128, 128), 6, seed=s)) for s in range(3)]
    u8 = [unsampled_energy(random_mask((128, 128), 8, seed=s)) for s in range(3)]
    assert max(u6) + 0.05 < min(u8)
