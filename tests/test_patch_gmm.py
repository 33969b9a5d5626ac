"""Patch Gaussian-mixture prior: exact against the whole-image mixture, limits, fit, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.priors.gaussian import GaussianMixturePrior
from recon.priors.patch_gmm import (
    PatchGMMPrior,
    fit_patch_gmm,
    load_patch_gmm,
    sample_patches,
    save_patch_gmm,
)

F64 = torch.float64


def _random_mixture(k: int, p: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = p * p
    a = torch.randn(k, d, d, generator=g, dtype=F64) * 0.1
    cov = a @ a.transpose(1, 2) / d + 1e-3 * torch.eye(d, dtype=F64)
    mu = torch.randn(k, d, generator=g, dtype=F64) * 0.3
    w = torch.rand(k, generator=g, dtype=F64) + 0.1
    return w, mu, cov


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.5])
def test_one_patch_image_is_the_exact_gmm_posterior_mean(sigma):
    w, mu, cov = _random_mixture(5, 4)
    prior = PatchGMMPrior(w, mu, cov, patch_size=4)
    exact = GaussianMixturePrior(w, mu, cov)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = prior.denoise(x, sigma)
    want = exact.denoise(x.reshape(3, 16), sigma).reshape(3, 1, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(prior.score(x, sigma), exact.score(x.reshape(3, 16), sigma).reshape(x.shape),
                               rtol=1e-7, atol=1e-8)


def test_overlapping_patches_average_their_exact_posterior_means():
    """5×4 image, 2×2 patches, stride 1: each pixel is the mean of the exact posterior means of the patches on it."""
    w, mu, cov = _random_mixture(3, 2, seed=2)
    prior, exact = PatchGMMPrior(w, mu, cov, patch_size=2), GaussianMixturePrior(w, mu, cov)
    x = torch.randn(1, 1, 5, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    num, den = torch.zeros(5, 4, dtype=F64), torch.zeros(5, 4, dtype=F64)
    for i in range(4):
        for j in range(3):
            est = exact.denoise(x[0, 0, i : i + 2, j : j + 2].reshape(1, 4), 0.2).reshape(2, 2)
            num[i : i + 2, j : j + 2] += est
            den[i : i + 2, j : j + 2] += 1
    torch.testing.assert_close(prior.denoise(x, 0.2)[0, 0], num / den, rtol=1e-10, atol=1e-12)


def test_sigma_to_zero_returns_the_input_and_float32_matches_float64():
    w, mu, cov = _random_mixture(4, 3, seed=4)
    prior = PatchGMMPrior(w, mu, cov, patch_size=3, stride=2)  # 10×9 image: padded so patches cover it
    x = torch.randn(2, 1, 10, 9, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert torch.equal(prior.denoise(x, 0.0), x)
    torch.testing.assert_close(prior.denoise(x, 1e-5), x, rtol=0, atol=1e-4)
    out32 = prior.denoise(x.float(), torch.tensor([0.1, 0.3]))
    assert out32.dtype == torch.float32 and out32.shape == x.shape
    torch.testing.assert_close(out32.double(), prior.denoise(x, torch.tensor([0.1, 0.3])), rtol=0, atol=1e-4)
    vol = x[:, :, None].expand(2, 1, 3, 10, 9)
    torch.testing.assert_close(prior.denoise(vol, 0.1)[:, :, 1], prior.denoise(x, 0.1))


def _textured_images(n: int, size: int, seed: int) -> list[torch.Tensor]:
    """Images with two kinds of texture (smooth blobs, sharp steps) and air: a patch mixture beats one Gaussian."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        smooth = torch.nn.functional.avg_pool2d(torch.randn(1, 1, size + 6, size + 6, generator=g), 7, 1)[0, 0]
        steps = torch.sign(torch.randn(size // 8, size // 8, generator=g)).repeat_interleave(8, 0)
        steps = steps.repeat_interleave(8, 1)
        img = torch.where(torch.arange(size)[None, :] < size // 2, 0.5 * smooth, 0.3 * steps)
        img[: size // 4] = -1.0  # air
        out.append(img + 0.01 * torch.randn(size, size, generator=g))
    return out


def test_fitted_mixture_beats_one_gaussian_on_held_out_patches(tmp_path):
    train = sample_patches(_textured_images(4, 64, 0), 3000, 4, seed=0, min_foreground=0.5)
    test = sample_patches(_textured_images(2, 64, 1), 1000, 4, seed=1, min_foreground=0.5)
    assert train.shape == (3000, 16) and np.isfinite(train).all()
    mix = fit_patch_gmm(train, 4, 6, seed=0, max_iter=50)
    one = fit_patch_gmm(train, 4, 1, seed=0, max_iter=50)
    t = torch.from_numpy(test)
    assert float(mix.patch_log_prob(t).mean()) > float(one.patch_log_prob(t).mean()) + 1.0
    assert mix.card["n_components"] == 6 and mix.card["n_patches"] == 3000


def test_save_load_round_trip_and_load_prior(tmp_path):
    from recon.priors import load_prior

    w, mu, cov = _random_mixture(3, 3, seed=6)
    prior = PatchGMMPrior(w, mu, cov, patch_size=3, remove_mean=True, card={"seed": 7})
    folder = save_patch_gmm(prior, tmp_path / "pg")
    x = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(8), dtype=F64)
    for back in (load_patch_gmm(folder), load_prior(folder)):
        assert isinstance(back, PatchGMMPrior) and back.remove_mean and back.card["seed"] == 7
        torch.testing.assert_close(back.denoise(x, 0.2), prior.denoise(x, 0.2), rtol=1e-12, atol=1e-12)
        assert back.normalize(torch.tensor([1500.0])).item() == pytest.approx(1.0)


def test_missing_file_is_a_one_line_error_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_patch_gmm(tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "nowhere" / "model_card.json") in msg


def test_builtin_ct_model_loads_and_denoises():
    from recon.priors import load_prior

    prior = load_prior("patch-gmm-ct")
    assert isinstance(prior, PatchGMMPrior) and prior.intensity.low == -1000 and prior.intensity.high == 1500
    x = torch.full((1, 1, 16, 16), -1.0)
    x[..., 8:] = prior.normalize(torch.tensor(40.0))  # air | brain
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    out = prior.denoise(noisy, 0.05)
    assert (out - x).pow(2).mean() < 0.5 * (noisy - x).pow(2).mean()
