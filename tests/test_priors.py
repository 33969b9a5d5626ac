"""DiffusionPrior, schedules, the recon prior format and training, against closed forms and round trips."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from recon.priors import DiffusionPrior, EDMSchedule, IntensityWindow, VESchedule, VPSchedule, load_prior, save_prior
from recon.priors.networks import ConditionedUNet
from recon.priors.schedules import alpha_bar_from_sigma, karras_sigmas, log_snr_from_sigma, sigma_from_log_snr
from recon.priors.train import TrainConfig, sample_unconditional, train_prior

# ---------------------------------------------------------------------------------------------
# Schedules against the published formulas
# ---------------------------------------------------------------------------------------------


def test_vp_linear_schedule_matches_ddpm():
    """ᾱ_t = Π(1 - β_s), β linear from 1e-4 to 0.02 over 1000 steps (Ho et al. 2020), computed with numpy."""
    sched = VPSchedule("linear", 1000)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    t = torch.arange(1000, dtype=torch.float64)
    np.testing.assert_allclose(sched.sigma(t).numpy(), np.sqrt((1 - abar) / abar), rtol=1e-10)
    np.testing.assert_allclose(alpha_bar_from_sigma(sched.sigma(t)).numpy(), abar, rtol=1e-10)


def test_vp_cosine_schedule_matches_nichol_dhariwal():
    """ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, away from the β clip at the end."""
    sched = VPSchedule("cosine", 1000)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(1, 900)
    np.testing.assert_allclose(sched.alphas_cumprod[t - 1].numpy(), f(t) / f(0), rtol=1e-8)


@pytest.mark.parametrize("sched", [VPSchedule("linear"), VPSchedule("cosine"), VESchedule(), EDMSchedule()])
def test_time_sigma_round_trip(sched):
    sig = torch.exp(torch.linspace(math.log(sched.sigma_min) + 1e-6, math.log(sched.sigma_max) - 1e-6, 97)).double()
    torch.testing.assert_close(sched.sigma(sched.t(sig)), sig, rtol=1e-9, atol=0)
    torch.testing.assert_close(sigma_from_log_snr(log_snr_from_sigma(sig)), sig)


def test_karras_sigmas():
    s = karras_sigmas(10, 0.002, 80.0)
    assert s.shape == (11,) and s[-1] == 0
    assert float(s[0]) == pytest.approx(80.0) and float(s[-2]) == pytest.approx(0.002)
    assert (torch.diff(s) < 0).all()


# ---------------------------------------------------------------------------------------------
# Every schedule × parameterization gives the same x̂0 for the same (exact) denoiser
# ---------------------------------------------------------------------------------------------
M0, S0 = 0.3, 0.7  # analytic prior: every pixel x0 ~ N(M0, S0²) independently


def exact_x0(x, sigma):
    return M0 + S0**2 / (S0**2 + sigma**2) * (x - M0)


class AnalyticNet(nn.Module):
    """Outputs what a perfectly trained network of the given schedule and parameterization would output,
    each written from the parameterization's definition (not from DiffusionPrior's inverse formulas)."""

    def __init__(self, schedule, parameterization):
        super().__init__()
        self.schedule, self.p = schedule, parameterization

    def sigma_from_condition(self, cond):
        cond = cond.double()
        if self.schedule.kind == "vp":
            return self.schedule.sigma(cond)  # fractional DDPM step
        if self.schedule.kind == "ve":
            return cond  # NCSN++ is conditioned on sigma
        return torch.exp(4 * cond)  # EDM c_noise = ln(sigma)/4

    def forward(self, x_in, cond):
        x_in = x_in.double()
        sigma = self.sigma_from_condition(cond).reshape(-1, 1, 1, 1)
        if self.schedule.kind == "vp":
            c = 1 / torch.sqrt(1 + sigma**2)
        elif self.schedule.kind == "edm":
            c = 1 / torch.sqrt(sigma**2 + self.schedule.sigma_data**2)
        else:
            c = torch.ones_like(sigma)
        x = x_in / c
        x0 = exact_x0(x, sigma)
        eps = (x - x0) / sigma  # E[n | x]
        if self.p == "eps":
            return eps
        if self.p == "x0":
            return x0
        if self.p == "v":  # Salimans & Ho: v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0
            abar = 1 / (1 + sigma**2)
            return torch.sqrt(abar) * eps - torch.sqrt(1 - abar) * x0
        if self.p == "score":  # score of the network's own input x_in = c (x0 + σ n)
            return (c * x0 - x_in) / (c * sigma) ** 2
        sd = self.schedule.sigma_data  # EDM: D = c_skip x + c_out F
        return (x0 - sd**2 / (sigma**2 + sd**2) * x) / (sigma * sd / torch.sqrt(sigma**2 + sd**2))


@pytest.mark.parametrize(
    "schedule, parameterization",
    [(VPSchedule(), "eps"), (VPSchedule("cosine"), "x0"), (VPSchedule(), "v"), (VPSchedule(), "score"),
     (VESchedule(), "eps"), (VESchedule(), "x0"), (VESchedule(), "score"), (EDMSchedule(), "edm"),
     (EDMSchedule(), "eps")],
)
def test_every_parameterization_returns_the_exact_tweedie_estimate(schedule, parameterization):
    prior = DiffusionPrior(AnalyticNet(schedule, parameterization), schedule, parameterization)
    x = torch.randn(5, 1, 6, 7, dtype=torch.float64) * 3
    sigma = torch.tensor([0.02, 0.1, 0.5, 2.0, 10.0], dtype=torch.float64)
    expected = exact_x0(x, sigma.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(prior.denoise(x, sigma), expected, rtol=1e-5, atol=1e-5)
    # the score is that of N(M0, S0² + σ²), checked by autograd of its log density
    xr = x.clone().requires_grad_(True)
    logp = (-0.5 * (xr - M0) ** 2 / (S0**2 + sigma.reshape(-1, 1, 1, 1) ** 2)).sum()
    (grad,) = torch.autograd.grad(logp, xr)
    torch.testing.assert_close(prior.score(x, sigma), grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prior.denoise(x, 0.0), x)  # sigma = 0 returns the input


def test_volumes_go_slice_by_slice_in_bounded_chunks():
    sched = EDMSchedule()
    prior = DiffusionPrior(AnalyticNet(sched, "edm"), sched, "edm")
    vol = torch.randn(2, 1, 9, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.3, 1.5], dtype=torch.float64)
    full = prior.denoise(vol, sigma)
    torch.testing.assert_close(full, exact_x0(vol, sigma.reshape(-1, 1, 1, 1, 1)), rtol=1e-5, atol=1e-5)
    prior.memory_budget = 4 * 64 * prior.bytes_per_voxel  # 4 slices per network call
    assert prior.slices_per_call((8, 8)) == 4
    prior.nfe = 0
    torch.testing.assert_close(prior.denoise(vol, sigma), full)
    assert prior.nfe == 18


def test_bad_prior_arguments():
    with pytest.raises(ValueError, match="parameterization"):
        DiffusionPrior(nn.Identity(), VPSchedule(), "noise")
    with pytest.raises(ValueError, match="VP schedules only"):
        DiffusionPrior(nn.Identity(), VESchedule(), "v")
    prior = DiffusionPrior(AnalyticNet(VESchedule(), "x0"), VESchedule(), "x0")
    with pytest.raises(ValueError, match="sigma"):
        prior.denoise(torch.zeros(2, 1, 4, 4), torch.ones(3))
    with pytest.raises(ValueError, match="sigma > 0"):
        prior.score(torch.zeros(1, 1, 4, 4), 0.0)
    with pytest.raises(ValueError, match="channel"):
        prior.denoise(torch.zeros(1, 3, 4, 4), 1.0)


def test_intensity_window_round_trip():
    w = IntensityWindow(-1000, 1500)
    hu = torch.tensor([-1000.0, 250.0, 1500.0, 3000.0])
    torch.testing.assert_close(w.normalize(hu)[:3], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(w.denormalize(w.normalize(hu)), hu)


def test_heun_sampler_reproduces_an_analytic_prior():
    """Unconditional EDM-Heun samples of the analytic Gaussian prior have its mean and standard deviation."""
    sched = EDMSchedule()
    prior = DiffusionPrior(AnalyticNet(sched, "edm"), sched, "edm")
    x = sample_unconditional(prior, (4000, 1, 2, 2), steps=100, generator=torch.Generator().manual_seed(0))
    assert abs(float(x.mean()) - M0) < 4 * S0 / math.sqrt(x.numel())
    assert abs(float(x.std()) / S0 - 1) < 0.015  # discretisation: 5% at 18 steps, 1% at 50, 0.5% at 200


# ---------------------------------------------------------------------------------------------
# The recon prior format
# ---------------------------------------------------------------------------------------------
ARCH = {"name": "recon.ConditionedUNet", "args": {"channels": [8, 16], "norm_num_groups": 8}}


def _small_prior():
    torch.manual_seed(0)
    net = ConditionedUNet(channels=(8, 16), norm_num_groups=8)
    return DiffusionPrior(net, EDMSchedule(), "edm", intensity=IntensityWindow(-1000, 1500), card={"license": "test"})


def test_save_load_round_trip_is_exact(tmp_path):
    prior = _small_prior()
    save_prior(prior, tmp_path / "p", ARCH, card={"training": {"steps": 0}})
    loaded = load_prior(tmp_path / "p")
    x = torch.randn(2, 1, 20, 24)
    torch.testing.assert_close(loaded.denoise(x, 0.7), prior.denoise(x, 0.7), rtol=0, atol=0)
    card = json.loads((tmp_path / "p" / "model_card.json").read_text())
    assert card["format"] == "recon-prior" and card["schedule"]["kind"] == "edm" and card["license"] == "test"
    assert loaded.intensity == IntensityWindow(-1000, 1500) and not any(p.requires_grad for p in loaded.parameters())
    assert load_prior(tmp_path / "p" / "model.safetensors").parameterization == "edm"  # a file inside works too


def test_the_2d_network_runs_in_nhwc_and_computes_what_the_packed_layout_does():
    """ConditionedUNet keeps 2D convolution weights channels_last (faster on CPU); the same weights packed give the
    same output up to float32 rounding, and a 3D network keeps the default layout."""
    torch.manual_seed(0)
    net = ConditionedUNet(channels=(8, 16), norm_num_groups=8).eval()
    convs = [p for p in net.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # single-channel / 1×1 kernels are the same in both layouts
    packed = ConditionedUNet(channels=(8, 16), norm_num_groups=8).eval().to(memory_format=torch.contiguous_format)
    packed.load_state_dict(net.state_dict())
    assert all(p.is_contiguous() for p in packed.parameters())
    x, cond = torch.randn(2, 1, 20, 24), torch.tensor([0.3, -1.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, cond), packed(x, cond), rtol=1e-5, atol=1e-5)
    net3d = ConditionedUNet(spatial_dims=3, channels=(8, 16), norm_num_groups=8)
    assert all(p.is_contiguous() for p in net3d.parameters())


def test_mismatched_or_missing_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    prior = _small_prior()
    save_prior(prior, tmp_path / "p", ARCH)
    state = {k: v.contiguous() for k, v in prior.network.state_dict().items()}  # NHWC weights: safetensors wants packed
    state["unet.conv_in.conv.weight"] = torch.zeros(3, 1, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "p" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unet\.conv_in\.conv\.weight.*\(3, 1, 3, 3\)"):
        load_prior(tmp_path / "p")
    with pytest.raises(ValueError, match=r"unexpected.*extra\.weight"):
        load_prior(tmp_path / "p")
    (tmp_path / "p" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable safetensors"):
        load_prior(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="built-in name"):
        load_prior(tmp_path / "nothing-here")
    (tmp_path / "q").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing model\.safetensors"):
        load_prior(tmp_path / "q")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _tiny_config(data, out, **kw):
    base = dict(data=data, out=str(out), crop=16, batch_size=4, steps=6, channels=(8, 16), checkpoint_every=3,
                sample_every=0, progress=False, phantom_fraction=0.25)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ct_file():
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm", download=False)


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, ct_file):
    """Weights after 6 steps equal those after 4 steps, a stop, and 2 resumed steps (CPU, same seed)."""
    full = train_prior(_tiny_config([ct_file], tmp_path / "a"))
    assert full["step"] == 6
    cfg = _tiny_config([ct_file], tmp_path / "b")
    assert train_prior(cfg, max_steps_this_run=4)["step"] == 4
    assert train_prior(cfg, resume=True)["step"] == 6
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert load_prior(tmp_path / "b" / "prior").card["training"]["steps"] == 6
    with pytest.raises(ValueError, match="different configuration"):
        train_prior(_tiny_config([ct_file], tmp_path / "b", lr=1e-3), resume=True)


def test_unreadable_training_files_are_reported_by_name(tmp_path, ct_file):
    bad = tmp_path / "data" / "broken.dcm"
    bad.parent.mkdir()
    bad.write_bytes(b"DICM" * 10)
    summary = train_prior(_tiny_config([ct_file, bad.parent], tmp_path / "run", steps=2))
    assert [s["file"] for s in summary["skipped"]] == [str(bad)]
    from recon.datasets.slices import SliceReadError

    with pytest.raises(SliceReadError, match=r"broken\.dcm"):
        train_prior(_tiny_config([ct_file, bad.parent], tmp_path / "run2", steps=2, on_error="stop"))


def test_train_prior_command_on_mixed_formats(tmp_path, ct_file):
    """The command trains on DICOM + NIfTI + PNG + NumPy files, writes a loadable prior and a sample grid."""
    import nibabel as nib
    from skimage.io import imsave

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(0, 100, (24, 24, 3)).astype(np.float32), np.eye(4)), data / "vol.nii.gz")
    imsave(data / "img.png", (rng.random((24, 24)) * 255).astype(np.uint8), check_contrast=False)
    np.save(data / "arr.npy", rng.normal(0, 100, (2, 20, 20)))
    (data / "CT.dcm").write_bytes(open(ct_file, "rb").read())
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "recon.cli", "train-prior", "-i", str(data), "-o", str(out), "--steps", "3",
           "--crop", "16", "--batch-size", "2", "--sample-every", "3", "--checkpoint-every", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["step"] == 3 and summary["skipped"] == []
    assert (out / "samples_0000003.png").is_file()
    prior = load_prior(out / "prior")
    assert prior.card["training"]["steps"] == 3 and len(prior.card["training"]["files"]) == 4
    card_text = (out / "prior" / "model_card.json").read_text()
    assert str(tmp_path) not in card_text  # the run's card names files, it does not keep machine paths
    from recon.priors.train import export_prior

    shipped = load_prior(export_prior(out, tmp_path / "shipped", extra={"quality": {"psnr": 1.0}}))
    assert shipped.card["quality"] == {"psnr": 1.0} and "NOT for clinical use" in shipped.card["intended_use"]
    assert shipped.card["training"]["config"]["data"] == ["data"] and shipped.card["training"]["steps"] == 3
    res = subprocess.run([sys.executable, "-m", "recon.cli", "train-prior", "-i", str(tmp_path / "missing"), "-o",
                          str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "missing" in res.stderr and "Traceback" not in res.stderr


def test_warm_start_from_a_prior_folder(tmp_path, ct_file):
    """init_from loads a prior's weights into the network and its EMA (lr=0 keeps them unchanged)."""
    from safetensors.torch import load_file

    train_prior(_tiny_config([ct_file], tmp_path / "a", steps=2))
    train_prior(_tiny_config([ct_file], tmp_path / "b", steps=1, lr=0.0, init_from=str(tmp_path / "a" / "prior")))
    a = load_file(str(tmp_path / "a" / "prior" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "prior" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="init_from"):
        train_prior(_tiny_config([ct_file], tmp_path / "c", init_from=str(tmp_path / "nothing")))


def test_augmentations_rotation_zoom_and_through_plane(tmp_path):
    """Warped crops keep the crop size and values in range (a zoom of 2 on a ramp doubles its slope); through-plane
    slices of an anisotropic volume are resampled to the finest spacing; tiny volumes and 2D files give none."""
    import nibabel as nib

    from recon.priors.train import BatchMaker, through_plane_slices

    ramp = torch.linspace(-1, 1, 64)[None, :].repeat(64, 1)
    cfg = TrainConfig(crop=16, batch_size=3, modality="mri", rotation_deg=0.0, scale_range=(2.0, 2.0),
                      min_foreground=0.0)
    maker = BatchMaker([ramp], cfg, torch.Generator().manual_seed(0))
    patch = maker._warped_crop(ramp)
    assert patch.shape == (16, 16)
    steps = patch[0].diff().abs()
    assert torch.allclose(steps, torch.full_like(steps, 2 * 2 / 63), atol=1e-4)
    cfg = TrainConfig(crop=16, batch_size=3, modality="mri", rotation_deg=10.0, scale_range=(0.5, 1.25))
    batch = BatchMaker([ramp], cfg, torch.Generator().manual_seed(0)).next()
    assert batch.shape == (3, 1, 16, 16) and batch.abs().max() <= 1
    vol = np.random.default_rng(0).random((40, 36, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(vol[:8], np.eye(4)), tmp_path / "small.nii.gz")
    slices = through_plane_slices(tmp_path / "v.nii.gz", TrainConfig(through_plane_stride=8))
    assert len(slices) == 5 + 4 and slices[0].shape == (36, 64) and slices[-1].shape == (40, 64)
    assert through_plane_slices(tmp_path / "small.nii.gz", TrainConfig(through_plane_stride=8)) == []
    assert through_plane_slices(tmp_path / "v.nii.gz", TrainConfig()) == []


def test_zooming_out_averages_instead_of_aliasing():
    """A one-pixel checkerboard seen at 2 source pixels per output pixel is its mean (0) everywhere, as a detector
    of twice the pixel size would see it, not a pattern picked by where the samples fall; at 3 it is the 3 × 3 block
    mean (±1/9); below 2 nothing is averaged; the zoom range is checked."""
    from recon.priors.train import BatchMaker, zoomed_out

    i, j = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    board = ((i + j) % 2 * 2 - 1).float()
    cfg = TrainConfig(crop=16, batch_size=1, modality="mri", rotation_deg=0.0, scale_range=(2.0, 2.0),
                      min_foreground=0.0)
    patch = BatchMaker([board], cfg, torch.Generator().manual_seed(0))._warped_crop(board)
    assert patch.shape == (16, 16) and patch.abs().max() < 1e-6
    assert torch.allclose(zoomed_out(board, 3.5).abs(), torch.full((21, 21), 1 / 9))
    assert zoomed_out(board, 1.9) is board
    with pytest.raises(ValueError, match="scale_range"):
        TrainConfig(scale_range=(2.0, 1.0))


def test_presets_read_the_recipe_folder(tmp_path, monkeypatch):
    from recon.priors.train import default_ct_config, default_mri_config, prior_data_dir, pydicom_ct_files

    monkeypatch.setenv("RECON_PRIOR_DATA", str(tmp_path / "prior-data"))
    with pytest.raises(FileNotFoundError, match=r"recon\.priors\.recipe --out"):
        prior_data_dir("ct")
    assert default_ct_config(str(tmp_path / "run")).data == pydicom_ct_files()  # no recipe run: the first data
    for m in ("ct", "mri"):
        (tmp_path / "prior-data" / m / "train").mkdir(parents=True)
    ct, mri = default_ct_config("run"), default_mri_config("run", steps=5)
    assert ct.data == [str(tmp_path / "prior-data" / "ct" / "train")] and ct.p_mean < -1 and ct.rotation_deg > 0
    assert ct.focus_hu == (-100.0, 200.0) and ct.focus_weight == 4.0 and mri.focus_hu is None
    assert mri.modality == "mri" and mri.steps == 5 and mri.through_plane_stride > 0


def test_focus_weights_follow_the_noisy_input_in_hu():
    """The factor is 1 + w on flat regions inside the HU range and 1 outside; off by default; CT only."""
    from recon.priors.base import IntensityWindow
    from recon.priors.train import focus_weights

    assert focus_weights(TrainConfig()) is None
    factor = focus_weights(TrainConfig(focus_hu=(-100, 200), focus_weight=4.0))
    window = IntensityWindow(-1000.0, 1500.0, "HU")
    for hu, expected in ((-1000.0, 1.0), (-150.0, 1.0), (-50.0, 5.0), (150.0, 5.0), (250.0, 1.0)):
        y = window.normalize(torch.full((1, 1, 5, 5), hu))
        assert torch.all(factor(y) == expected), hu
    with pytest.raises(ValueError, match="focus_hu"):
        TrainConfig(modality="mri", focus_hu=(-100, 200), focus_weight=1.0)
    with pytest.raises(ValueError, match="focus_hu"):
        TrainConfig(focus_hu=(200, -100))
    with pytest.raises(ValueError, match="focus_weight"):
        TrainConfig(focus_hu=(-100, 200), focus_weight=-1.0)
    with pytest.raises(ValueError, match="needs focus_hu"):
        TrainConfig(focus_weight=4.0)


def test_focus_weighting_keeps_the_posterior_mean_as_the_loss_minimiser():
    """Pixels x0 ~ N(m, s²), y = x0 + σn: E[x0 | y] = m + s²/(s²+σ²)(y − m). Weighted least squares of x0 on
    (y, 1) with the focus factor of y recovers these coefficients (the weight is a function of y); the same
    rule applied to the clean pixel x0 instead biases them — which is why the factor reads the noisy input."""
    from recon.priors.base import IntensityWindow
    from recon.priors.train import focus_weights

    g = torch.Generator().manual_seed(0)
    window = IntensityWindow(-1000.0, 1500.0, "HU")
    m, s, sigma = float(window.normalize(torch.tensor(150.0))), 0.06, 0.05
    x0 = m + s * torch.randn(64, 1, 64, 64, generator=g, dtype=torch.float64)
    y = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    factor = focus_weights(TrainConfig(focus_hu=(-100, 200), focus_weight=9.0))

    def wls(weight):
        design = torch.stack([y.flatten(), torch.ones(y.numel(), dtype=y.dtype)], 1)
        w = weight.flatten()
        return torch.linalg.solve(design.T @ (w[:, None] * design), design.T @ (w * x0.flatten()))

    slope = s**2 / (s**2 + sigma**2)
    exact = torch.tensor([slope, m * (1 - slope)], dtype=torch.float64)
    from_y = wls(factor(y))
    low, high = window.normalize(torch.tensor([-100.0, 200.0])).tolist()
    from_x0 = wls(1 + 9.0 * ((x0 >= low) & (x0 <= high)).double())
    assert factor(y).std() > 1  # the weight does vary
    assert torch.allclose(from_y, exact, atol=0.01), (from_y, exact)
    assert (from_x0 - exact).abs().max() > 0.05, (from_x0, exact)


def test_train_prior_command_takes_a_focus_range_and_a_zoom_range(tmp_path, ct_file):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "recon.cli", "train-prior", "-i", ct_file, "-o", str(out), "--steps", "2",
           "--crop", "16", "--batch-size", "2", "--sample-every", "0", "--focus-hu", "-100", "200",
           "--focus-weight", "4"]
    res = subprocess.run([*cmd, "--scale-range", "0.5", "3"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    config = load_prior(out / "prior").card["training"]["config"]
    assert config["focus_hu"] == [-100.0, 200.0] and config["focus_weight"] == 4.0
    assert config["scale_range"] == [0.5, 3.0]
    res = subprocess.run([*cmd, "--scale-range", "3", "0.5"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "scale_range" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([*cmd[:-5], "--modality", "mri", "--focus-hu", "-100", "200", "--focus-weight", "4"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "focus" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# Group averaging over the square's rotations and flips (symmetry="d4")
# ---------------------------------------------------------------------------------------------
def _d4(x, k, flip):
    x = torch.rot90(x, k, (-2, -1))
    return x.flip(-1) if flip else x


class SkewNet(nn.Module):
    """A fixed 3×3 convolution with a lopsided kernel, then a nonlinearity: no symmetry of the square."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[0.9, -0.4, 0.1], [0.3, 0.2, -0.7], [0.0, 0.5, -0.2]]]]))

    def forward(self, x, cond):
        return torch.tanh(self.conv(x))


def test_d4_averaging_makes_the_denoiser_equivariant_and_lowers_its_error_on_an_invariant_set():
    """An untrained network is not equivariant; its D4 average is, exactly, for all eight transforms. On a data set
    closed under the group (every image and its noise in all eight poses) the average's squared error is at most
    the network's (Jensen), and it costs eight network evaluations per image."""
    prior = DiffusionPrior(SkewNet(), EDMSchedule(), "edm").requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 12, 12, generator=g)
    plain = prior.denoise(x, 0.5)
    prior.symmetry = "d4"
    prior.nfe = 0
    sym = prior.denoise(x, 0.5)
    assert prior.nfe == 16
    poses = [(k, f) for k in range(4) for f in (False, True)]
    for k, f in poses:
        torch.testing.assert_close(prior.denoise(_d4(x, k, f), 0.5), _d4(sym, k, f), rtol=1e-5, atol=1e-5)
    prior.symmetry = None
    assert max(float((prior.denoise(_d4(x, k, f), 0.5) - _d4(plain, k, f)).abs().max()) for k, f in poses) > 1e-3
    clean = torch.rand(3, 1, 12, 12, generator=g) * 2 - 1
    noise = 0.3 * torch.randn(clean.shape, generator=g)
    orbit_x = torch.cat([_d4(clean, k, f) for k, f in poses])
    orbit_y = orbit_x + torch.cat([_d4(noise, k, f) for k, f in poses])
    mse_plain = float((prior.denoise(orbit_y, 0.3) - orbit_x).pow(2).mean())
    prior.symmetry = "d4"
    mse_sym = float((prior.denoise(orbit_y, 0.3) - orbit_x).pow(2).mean())
    assert mse_sym <= mse_plain * (1 + 1e-6)


def test_d4_averaging_leaves_an_equivariant_denoiser_alone_and_acts_in_plane_on_volumes(tmp_path):
    """The exact denoiser of i.i.d. pixels is already equivariant: averaging changes nothing. A volume under a 2D
    prior is averaged slice by slice in-plane. ``load_prior`` takes the option; unknown values are refused."""
    sched = EDMSchedule()
    exact = DiffusionPrior(AnalyticNet(sched, "edm"), sched, "edm", symmetry="d4")
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(exact.denoise(x, 0.4), exact_x0(x, 0.4), rtol=1e-5, atol=1e-5)
    prior = DiffusionPrior(SkewNet(), EDMSchedule(), "edm", symmetry="d4").requires_grad_(False)
    vol = torch.randn(1, 1, 3, 10, 10)
    per_slice = torch.stack([prior.denoise(vol[:, :, i], 0.6) for i in range(3)], dim=2)
    torch.testing.assert_close(prior.denoise(vol, 0.6), per_slice, rtol=1e-5, atol=1e-5)
    save_prior(_small_prior(), tmp_path / "p", ARCH, card={"training": {"steps": 0}})
    assert load_prior(tmp_path / "p", symmetry="d4").symmetry == "d4" and load_prior(tmp_path / "p").symmetry is None
    with pytest.raises(ValueError, match="symmetry"):
        DiffusionPrior(AnalyticNet(sched, "edm"), sched, "edm", symmetry="c4")


def test_learning_rate_warms_up_then_stays_or_follows_a_cosine_to_zero():
    """Linear warm-up to the peak; then constant, or half a cosine from the peak to 0 at the last step; a bad
    schedule name in the configuration is refused."""
    from recon.priors.trainer import learning_rate

    assert learning_rate(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert learning_rate(100, 1.0, 10, 110) == 1.0
    assert learning_rate(4, 1.0, 10, 110, "cosine") == pytest.approx(0.5)  # still warming up
    assert learning_rate(10, 1.0, 10, 110, "cosine") == pytest.approx(1.0)
    assert learning_rate(60, 1.0, 10, 110, "cosine") == pytest.approx(0.5)
    assert learning_rate(110, 1.0, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-12)
    rates = [learning_rate(s, 1.0, 10, 110, "cosine") for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(rates))
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="linear")
