"""External checkpoint loaders: tiny random networks of each family, saved as their projects save them, reloaded.

For each family: (a) the wrapped network reproduces the original network's output exactly, (b) ``prior.denoise``
equals the Tweedie estimate computed with the family's own convention (its scheduler's ``step`` where it has
one), (c) renamed keys / wrong shapes are refused naming the key, (d) missing files raise FileNotFoundError,
(e) ``detect_family`` / ``load_external_prior`` pick the family.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from recon.priors import DiffusionPrior
from recon.priors.loaders import (
    _adm_config,
    _build_adm_unet,
    _configurable_diffunet,
    _load_checked,
    detect_family,
    load_adm_checkpoint,
    load_diffusers_unet,
    load_external_prior,
    load_monai_checkpoint,
    load_ncsnpp_checkpoint,
    read_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _randomize(net: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Random weights everywhere (the families zero-initialise their output convolutions: outputs would be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def _tweak_and_save(save, state: dict, tmp_path, name: str, key: str, mode: str):
    state = dict(state)
    if mode == "rename":
        state[key + "_renamed"] = state.pop(key)
    else:
        state[key] = torch.zeros((*state[key].shape[:-1], state[key].shape[-1] + 1))
    path = tmp_path / name
    save(state, path)
    return path


def _sigma_of_abar(abar: float) -> float:
    return math.sqrt((1 - abar) / abar)


# ---------------------------------------------------------------------------------------------
# 1. ADM / guided-diffusion
# ---------------------------------------------------------------------------------------------
ADM_KW = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
              num_heads=4, num_head_channels=16, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True)
ADM_LOAD = dict(image_size=32, in_channels=3, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                attention_resolutions="16", num_head_channels=16)


def _reference_adm():
    """deepinv's port of guided_diffusion's ``UNetModel`` (same module tree and parameter names; the original
    package is not on the package index); returns the network and ``f(x, t)`` = its forward pass."""
    cfg = _adm_config(32, 3, False, True, 32, 1, "1,2", "16", 4, 16, -1, True, True, False, 0.0)
    net = _randomize(_configurable_diffunet(**cfg))
    return net, net.forward_diffusion


@pytest.fixture(scope="module")
def adm(tmp_path_factory):
    net, f = _reference_adm()
    path = tmp_path_factory.mktemp("adm") / "ffhq_tiny.pt"
    torch.save(net.state_dict(), path)  # as guided_diffusion / DPS release them
    return net, f, path


def test_adm_roundtrip_exact(adm):
    _, f, path = adm
    prior = load_adm_checkpoint(path, **ADM_LOAD)
    assert isinstance(prior, DiffusionPrior) and prior.parameterization == "eps" and prior.intensity is None
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([3.0, 731.5])
    with torch.no_grad():
        ref = f(x, t)
        out = prior.network(x, t)
    assert ref.shape == (2, 6, 32, 32)
    torch.testing.assert_close(out, ref[:, :3], rtol=0, atol=0)


def test_adm_denoise_matches_ddpm_tweedie(adm):
    """x̂0 = (x_t - sqrt(1-ᾱ) ε)/sqrt(ᾱ) with x_t = sqrt(ᾱ)(x0 + σ n), ᾱ from numpy's DDPM linear β."""
    _, f, path = adm
    prior = load_adm_checkpoint(path, **ADM_LOAD)
    abar_all = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    n = torch.randn(1, 3, 32, 32, generator=g)
    for t in (10, 500):
        abar = float(abar_all[t])
        sigma = _sigma_of_abar(abar)
        x = x0 + sigma * n
        x_t = math.sqrt(abar) * x
        with torch.no_grad():
            eps = f(x_t, torch.tensor([float(t)]))[:, :3]
            expected = (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
            got = prior.denoise(x, sigma)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_adm_pads_sizes_that_are_not_multiples():
    net, _ = _reference_adm()
    from recon.priors.loaders import ADMNetwork

    wrapped = ADMNetwork(net, 3, True)
    with torch.no_grad():
        out = wrapped(torch.randn(1, 3, 30, 27), torch.tensor([5.0]))
    assert out.shape == (1, 3, 30, 27) and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["rename", "shape"])
def test_adm_refuses_mismatched_checkpoint(adm, tmp_path, mode):
    net, _, _ = adm
    key = "input_blocks.0.0.bias" if mode == "shape" else "out.2.weight"
    path = _tweak_and_save(torch.save, net.state_dict(), tmp_path, "bad.pt", key, mode)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_adm_checkpoint(path, **ADM_LOAD)


def test_adm_missing_file_and_detection(adm, tmp_path):
    _, _, path = adm
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt.*put it at this path"):
        load_adm_checkpoint(tmp_path / "nowhere.pt")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt"):
        load_external_prior(tmp_path / "nowhere.pt")
    assert detect_family(path) == "adm"
    prior = load_external_prior(path, **ADM_LOAD)
    assert prior.card["family"] == "adm"


@pytest.mark.parametrize("large_model", [False, True])
def test_adm_released_configs_build_deepinv_diffunet_with_guided_diffusion_names(large_model):
    """FFHQ (ffhq_10m.pt) and ImageNet (256x256_diffusion_uncond.pt) configurations: deepinv's DiffUNet, with the
    parameter names and shapes of guided_diffusion's create_model (built on the meta device: no memory)."""
    from deepinv.models import DiffUNet

    cfg = _adm_config(256, 3, large_model, True, None, None, None, None, 4, 64, -1, True, True, False, 0.0)
    net = _build_adm_unet(cfg, large_model)
    assert type(net) is DiffUNet
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert "sqrt_alphas_cumprod" not in shapes and not net.sqrt_alphas_cumprod.is_meta
    # Shapes that follow from guided_diffusion's UNetModel for these configurations (independent of deepinv):
    # channel_mult (1, 1, 2, 2, 4, 4) at 256², 1 (FFHQ) or 2 (ImageNet) res blocks per level, learn_sigma (6 out).
    ch, blocks = (256, 2) if large_model else (128, 1)
    expected = {
        "input_blocks.0.0.weight": (ch, 3, 3, 3),
        "time_embed.0.weight": (4 * ch, ch),
        "out.2.weight": (6, ch, 3, 3),
        "middle_block.1.qkv.weight": (3 * 4 * ch, 4 * ch, 1),  # attention on 4·ch channels at 8²
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, (key, shapes[key], shape)
    n_blocks = 6 * (blocks + 1)  # 1 stem + blocks per level + 5 downsamplers = output blocks = 6 (blocks + 1)
    assert {int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.")} == set(range(n_blocks))
    assert {int(k.split(".")[1]) for k in shapes if k.startswith("output_blocks.")} == set(range(n_blocks))


def test_adm_diffunet_path_loads_and_runs():
    """The DiffUNet path end to end (meta build, assigned weights, non-persistent ᾱ buffers), 1-channel model."""
    cfg = _adm_config(256, 1, False, True, None, None, None, None, 4, 64, -1, True, True, False, 0.0)
    net = _build_adm_unet(cfg, False)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in net.state_dict().items()}
    _load_checked(net, state, "in-memory")
    assert not any(t.is_meta for t in list(net.parameters()) + list(net.buffers()))
    with torch.no_grad():
        out = net.eval().forward_diffusion(torch.randn(1, 1, 32, 32), torch.tensor([10.0]))
    assert out.shape == (1, 2, 32, 32) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# 2. MONAI DiffusionModelUNet
# ---------------------------------------------------------------------------------------------
MONAI_2D = dict(spatial_dims=2, in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 16),
                attention_levels=(False, True), norm_num_groups=8, num_head_channels=8)
MONAI_3D = dict(MONAI_2D, spatial_dims=3, attention_levels=(False, False))


def _monai_net(args, seed=0):
    from monai.networks.nets import DiffusionModelUNet

    return _randomize(DiffusionModelUNet(**args), seed)


def _save_safetensors(state, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.fixture(scope="module")
def monai2d(tmp_path_factory):
    net = _monai_net(MONAI_2D)
    folder = tmp_path_factory.mktemp("monai")
    _save_safetensors(net.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(MONAI_2D))
    return net, folder


def test_monai_2d_safetensors_roundtrip_and_tweedie(monai2d):
    from monai.networks.schedulers import DDPMScheduler

    net, folder = monai2d
    prior = load_monai_checkpoint(folder / "model.safetensors", folder / "config.json")
    assert prior.spatial_dims == 2 and prior.parameterization == "eps" and prior.channels == 1
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([0.0, 412.25])
    with torch.no_grad():
        torch.testing.assert_close(prior.network(x, t), net(x, timesteps=t), rtol=0, atol=0)
    sched = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    _check_monai_tweedie(prior, net, sched, (1, 1, 16, 16), t=300)


def _check_monai_tweedie(prior, net, sched, shape, t):
    """prior.denoise vs MONAI's own DDPMScheduler.step(...) pred_original_sample at integer step t."""
    abar = float(sched.alphas_cumprod[t])
    sigma = _sigma_of_abar(abar)
    g = torch.Generator().manual_seed(2)
    x0, n = torch.rand(shape, generator=g) * 2 - 1, torch.randn(shape, generator=g)
    x = x0 + sigma * n
    x_t = math.sqrt(abar) * x
    with torch.no_grad():
        out = net(x_t, timesteps=torch.tensor([t]))
        _, expected = sched.step(out, t, x_t)
        got = prior.denoise(x, sigma)
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


def test_monai_3d_state_dict_entry_v_prediction_scaled_linear(tmp_path):
    from monai.networks.schedulers import DDPMScheduler

    net = _monai_net(MONAI_3D, seed=3)
    path = tmp_path / "brain.pth"
    torch.save({"state_dict": net.state_dict(), "epoch": 7}, path)
    config = {"network": MONAI_3D, "scheduler": {"schedule": "scaled_linear_beta", "num_train_timesteps": 1000,
                                                 "beta_start": 0.0015, "beta_end": 0.0195,
                                                 "prediction_type": "v_prediction"}}
    prior = load_monai_checkpoint(path, config)
    assert prior.spatial_dims == 3 and prior.parameterization == "v"
    sched = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015,
                          beta_end=0.0195, prediction_type="v_prediction", clip_sample=False)
    np.testing.assert_allclose(prior.schedule.alphas_cumprod.numpy(), sched.alphas_cumprod.numpy(), rtol=1e-5)
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(prior.network(x, torch.tensor([77.0])), net(x, timesteps=torch.tensor([77.0])),
                                   rtol=0, atol=0)
    _check_monai_tweedie(prior, net, sched, (1, 1, 8, 8, 8), t=650)
    assert load_external_prior(path, family="monai", config=config).card["family"] == "monai"


@pytest.mark.parametrize("mode", ["rename", "shape"])
def test_monai_refuses_mismatched_checkpoint(monai2d, tmp_path, mode):
    net, _ = monai2d
    key = "out.2.conv.bias" if mode == "shape" else "time_embed.0.weight"
    path = _tweak_and_save(_save_safetensors, net.state_dict(), tmp_path, "bad.safetensors", key, mode)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_monai_checkpoint(path, MONAI_2D)


def test_monai_missing_file_and_detection(monai2d, tmp_path):
    net, folder = monai2d
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        load_monai_checkpoint(tmp_path / "absent.safetensors", MONAI_2D)
    assert detect_family(folder / "model.safetensors") == "monai"
    torch.save(net.state_dict(), tmp_path / "m.pt")
    assert detect_family(tmp_path / "m.pt") == "monai"
    prior = load_external_prior(folder / "model.safetensors", config=str(folder / "config.json"))
    assert prior.card["family"] == "monai"
    with pytest.raises(ValueError, match="config="):
        load_external_prior(tmp_path / "m.pt")


# ---------------------------------------------------------------------------------------------
# 3. diffusers UNet2DModel
# ---------------------------------------------------------------------------------------------
DIFFUSERS_UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


@pytest.fixture(scope="module")
def diffusers_pipeline(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    unet = _randomize(diffusers.UNet2DModel(**DIFFUSERS_UNET), seed=4)
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False)
    folder = tmp_path_factory.mktemp("ddpm-tiny")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return unet, sched, folder


def _check_diffusers(prior, unet, sched, t):
    x = torch.randn(2, 1, 16, 16)
    tt = torch.tensor([1.0, 333.75])
    with torch.no_grad():
        torch.testing.assert_close(prior.network(x, tt), unet(x, tt).sample, rtol=0, atol=0)
    abar = float(sched.alphas_cumprod[t])
    sigma = _sigma_of_abar(abar)
    g = torch.Generator().manual_seed(5)
    x0, n = torch.rand(1, 1, 16, 16, generator=g) * 2 - 1, torch.randn(1, 1, 16, 16, generator=g)
    x = x0 + sigma * n
    x_t = math.sqrt(abar) * x
    with torch.no_grad():
        out = unet(x_t, t).sample
        expected = sched.step(out, t, x_t).pred_original_sample
        got = prior.denoise(x, sigma)
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


def test_diffusers_pipeline_folder(diffusers_pipeline):
    unet, sched, folder = diffusers_pipeline
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    prior = load_diffusers_unet(folder)
    assert prior.parameterization == "x0" and prior.schedule.beta_schedule == "cosine"
    _check_diffusers(prior, unet, sched, t=420)


def test_diffusers_unet_folder_bin_epsilon_scaled_linear(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = _randomize(diffusers.UNet2DModel(**DIFFUSERS_UNET), seed=6)
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type="epsilon", clip_sample=False)
    unet.save_pretrained(tmp_path, safe_serialization=False)
    sched.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    prior = load_diffusers_unet(tmp_path)
    assert prior.parameterization == "eps"
    _check_diffusers(prior, unet, sched, t=700)
    prior_v = load_diffusers_unet(tmp_path, scheduler_config={"beta_schedule": "linear",
                                                              "prediction_type": "v_prediction"})
    assert prior_v.parameterization == "v" and prior_v.schedule.beta_schedule == "linear"


@pytest.mark.parametrize("mode", ["rename", "shape"])
def test_diffusers_refuses_mismatched_checkpoint(diffusers_pipeline, tmp_path, mode):
    import shutil

    unet, _, folder = diffusers_pipeline
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    key = "conv_out.bias" if mode == "shape" else "conv_in.weight"
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    _tweak_and_save(_save_safetensors, unet.state_dict(), bad / "unet", weights.name, key, mode)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_diffusers_unet(bad)


def test_diffusers_missing_and_detection(diffusers_pipeline, tmp_path):
    _, _, folder = diffusers_pipeline
    with pytest.raises(FileNotFoundError, match="no-such-pipeline"):
        load_diffusers_unet(tmp_path / "no-such-pipeline")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_diffusers_unet(tmp_path / "empty")
    assert detect_family(folder) == "diffusers"
    assert detect_family(folder / "unet") == "diffusers"
    assert load_external_prior(folder).card["family"] == "diffusers"
    with pytest.raises(ValueError, match="pass the folder"):
        detect_family(folder / "unet" / "diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------------------------------------
# 4. score-SDE NCSN++ (plumbing, with a stand-in architecture in score_sde's layout)
# ---------------------------------------------------------------------------------------------
class _FourierProjection(nn.Module):
    def __init__(self, size=8, scale=16.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(size) * scale, requires_grad=False)  # as score_sde's layerspp

    def forward(self, x):
        x_proj = x[:, None] * self.W[None, :] * 2 * np.pi
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class _TinyScoreNet(nn.Module):
    """score_sde's conventions: flat ``all_modules``, Fourier embedding of log σ, ``scale_by_sigma`` output."""

    def __init__(self, ch=1):
        super().__init__()
        self.all_modules = nn.ModuleList([_FourierProjection(), nn.Linear(16, 8), nn.Conv2d(ch, 8, 3, padding=1),
                                          nn.GroupNorm(4, 8), nn.Conv2d(8, ch, 3, padding=1)])
        self.register_buffer("sigmas", torch.tensor([378.0, 1.0, 0.01]))

    def forward(self, x, sigma):
        m = self.all_modules
        temb = m[1](m[0](torch.log(sigma)))
        h = m[2](x) + temb[:, :, None, None]
        h = m[4](torch.nn.functional.silu(m[3](h)))
        return h / sigma[:, None, None, None]


@pytest.fixture(scope="module")
def ncsnpp_ckpt(tmp_path_factory):
    torch.manual_seed(7)
    net = _TinyScoreNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])).square().mean().backward()
    opt.step()
    shadow = [p.detach().clone() + 0.05 for p in net.parameters() if p.requires_grad]
    ckpt = {"optimizer": opt.state_dict(), "model": {"module." + k: v for k, v in net.state_dict().items()},
            "ema": {"decay": 0.999, "num_updates": 1, "shadow_params": shadow}, "step": 1}
    path = tmp_path_factory.mktemp("ncsnpp") / "checkpoint.pth"
    torch.save(ckpt, path)  # as score_sde's utils.save_checkpoint (DataParallel model: "module." keys)
    return net, shadow, path


def test_ncsnpp_ema_plumbing_and_score_tweedie(ncsnpp_ckpt):
    net, shadow, path = ncsnpp_ckpt
    prior = load_ncsnpp_checkpoint(path, network=_TinyScoreNet())
    loaded = prior.network.model
    assert prior.parameterization == "score" and prior.card["step"] == 1
    for p, s in zip([p for n, p in loaded.named_parameters() if n != "all_modules.0.W"], shadow, strict=True):
        torch.testing.assert_close(p, s, rtol=0, atol=0)
    torch.testing.assert_close(loaded.all_modules[0].W, net.all_modules[0].W, rtol=0, atol=0)
    ema_net = _TinyScoreNet()
    ema_net.load_state_dict(loaded.state_dict())
    x, sigma = torch.randn(1, 1, 8, 8), 3.5
    with torch.no_grad():
        score = ema_net(x, torch.tensor([sigma]))  # score_sde: model output = ∇ log p_σ(x)
        torch.testing.assert_close(prior.network(x, torch.tensor([sigma])), score, rtol=0, atol=0)
        torch.testing.assert_close(prior.denoise(x, sigma), x + sigma**2 * score, rtol=1e-5, atol=1e-5)
    raw = load_ncsnpp_checkpoint(path, network=_TinyScoreNet(), use_ema=False)
    torch.testing.assert_close(raw.network.model.all_modules[2].weight, net.all_modules[2].weight, rtol=0, atol=0)


def test_ncsnpp_refusals_and_detection(ncsnpp_ckpt, tmp_path):
    _, _, path = ncsnpp_ckpt
    assert detect_family(path) == "ncsnpp"
    with pytest.raises(NotImplementedError, match="network="):
        load_external_prior(path)
    with pytest.raises(NotImplementedError, match=r"ncsnpp\.py"):
        load_ncsnpp_checkpoint(path)
    assert load_external_prior(path, network=_TinyScoreNet()).card["family"] == "ncsnpp"
    with pytest.raises(FileNotFoundError, match=r"gone\.pth"):
        load_ncsnpp_checkpoint(tmp_path / "gone.pth", network=_TinyScoreNet())
    ckpt = read_checkpoint(path)
    ckpt["model"]["module.all_modules.1.bias_renamed"] = ckpt["model"].pop("module.all_modules.1.bias")
    torch.save(ckpt, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"all_modules\.1\.bias"):
        load_ncsnpp_checkpoint(tmp_path / "renamed.pth", network=_TinyScoreNet(), use_ema=False)
    extra = _TinyScoreNet()
    extra.all_modules.append(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="EMA holds 8 tensors but the network has 10"):
        load_ncsnpp_checkpoint(path, network=extra)


# ---------------------------------------------------------------------------------------------
# 5. dispatch and safety
# ---------------------------------------------------------------------------------------------
def test_unknown_checkpoint_is_refused_naming_file_and_families(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "mystery.pt")
    with pytest.raises(ValueError, match=r"mystery\.pt.*adm, monai, diffusers, ncsnpp"):
        load_external_prior(tmp_path / "mystery.pt")
    with pytest.raises(ValueError, match="unknown family"):
        load_external_prior(tmp_path / "mystery.pt", family="sd3")


class _Evil:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refuses to unpickle"):
        read_checkpoint(tmp_path / "evil.pt")


def test_diffusers_missing_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"diffrecon\[diffusers\]"):
        load_diffusers_unet(tmp_path)
