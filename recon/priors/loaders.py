r"""Loaders for checkpoints of the standard external diffusion families, from local files only.

Each loader turns a checkpoint into a :class:`recon.priors.DiffusionPrior` whose ``network(x_in, cond)`` calls the
original architecture exactly as its project does (same parameter names, same time argument), so that
``prior.denoise`` is the family's own Tweedie estimate:

==============  ===================================================  ==========================================
family          files                                                schedule / parameterization
==============  ===================================================  ==========================================
``"adm"``       guided-diffusion ``UNetModel`` state dict (``.pt``:   ``VPSchedule("linear", 1000)``, ``"eps"``
                DPS ``ffhq_10m.pt``, ``256x256_diffusion_uncond.pt``)  (the ε half of the learned-σ output)
``"monai"``     ``DiffusionModelUNet`` (2D/3D) ``.pt``/``.pth``/          MONAI ``DDPMScheduler`` conventions
                ``.safetensors`` + its constructor arguments
``"diffusers"`` ``UNet2DModel`` folder (``config.json`` + weights) or    the folder's ``scheduler_config.json``
                a pipeline folder (``unet/`` + ``scheduler/``)
``"ncsnpp"``    score-SDE / DiffusionMBIR ``{"model", "ema", "step"}``  ``VESchedule``, ``"score"``; needs the
                dict                                                    architecture passed in (see below)
==============  ===================================================  ==========================================

Nothing is downloaded and nothing arbitrary is unpickled: ``.pt`` files go through ``torch.load(...,
weights_only=True)``, the rest through safetensors and JSON. Weights whose names or shapes do not fit the
architecture are refused (:func:`recon.priors.io.check_state_dict`), never partially loaded.

Score-SDE NCSN++: no installable package (deepinv's ``NCSNpp`` is EDM's ``SongUNet``, with other parameter
names) reproduces score_sde's ``all_modules.<i>`` names, so :func:`load_ncsnpp_checkpoint` needs the network
built from score_sde's / DiffusionMBIR's own ``models/ncsnpp.py`` (``network=``); it then does the unwrapping
(``module.`` prefixes, EMA shadow parameters) and the VE wrapping.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from recon.priors.base import DiffusionPrior
from recon.priors.io import check_state_dict
from recon.priors.schedules import VESchedule, VPSchedule

__all__ = [
    "FAMILIES",
    "detect_family",
    "load_adm_checkpoint",
    "load_diffusers_unet",
    "load_external_prior",
    "load_monai_checkpoint",
    "load_ncsnpp_checkpoint",
    "read_checkpoint",
    "score_sde_state_dict",
]

FAMILIES = ("adm", "monai", "diffusers", "ncsnpp")

_WHERE = (
    "recon never downloads weights: fetch the file yourself (from the project that released it) and put it at "
    "this path, or pass the path where it is"
)
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# ---------------------------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------------------------
def _require(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}. {_WHERE}")
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a ``.safetensors`` file or a ``torch.save`` file without unpickling arbitrary objects.

    ``.pt``/``.pth``/``.ckpt``/``.bin`` go through ``torch.load(map_location="cpu", weights_only=True)`` (memory
    mapped when the file allows it); a file holding anything but tensors and plain containers is refused.
    """
    path = _require(path, "checkpoint")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors has its own error types for truncated/corrupt files
            raise ValueError(f"{path}: unreadable safetensors file ({err})") from err
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) torch.save format cannot be memory mapped
            if "mmap" not in str(err).lower() and "zip" not in str(err).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); recon refuses to unpickle arbitrary objects"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    return obj


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(state: dict) -> dict:
    """Drop the ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes shared by every key."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _unwrap_state(obj: dict, source: str, entries=("state_dict", "model", "ema_model", "net")) -> dict:
    """The state dict inside a checkpoint: the dict itself, or its first ``entries`` entry that is one."""
    if not _is_state_dict(obj):
        for key in entries:
            if key in obj and _is_state_dict(obj[key]):
                obj = obj[key]
                break
        else:
            raise ValueError(
                f"{source}: no state dict found (top-level keys: {', '.join(map(str, list(obj)[:8]))}; expected "
                f"tensors, or a {' / '.join(entries)} entry holding them)"
            )
    return _strip_prefixes(dict(obj))


def _float32(state: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load_checked(module: nn.Module, state: dict, source: str) -> None:
    """``check_state_dict`` then a strict load; parameters built on the meta device are replaced (assign)."""
    check_state_dict(module, state, source)
    on_meta = any(t.is_meta for t in module.state_dict().values())
    module.load_state_dict(state, strict=True, assign=on_meta)


def _finish(prior: DiffusionPrior, device) -> DiffusionPrior:
    prior.network.eval()
    for p in prior.parameters():
        p.requires_grad_(False)
    return prior.to(device)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


# ---------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------
class _BetasVPSchedule(VPSchedule):
    """A ``VPSchedule`` with explicitly given β (for the schedules ``VPSchedule`` does not build itself).

    ``config()`` names the schedule (e.g. ``"scaled_linear"``) with its end points; ``schedule_from_config`` can
    rebuild it only if ``VPSchedule`` knows that name.
    """

    def __init__(self, betas: torch.Tensor, beta_schedule: str, beta_start: float = float("nan"),
                 beta_end: float = float("nan")):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError(f"{beta_schedule}: betas must lie in (0, 1) with at least 2 steps")
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = int(betas.numel())
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self._log_sigmas = 0.5 * torch.log((1 - self.alphas_cumprod) / self.alphas_cumprod)
        self.sigma_min = float(self._log_sigmas[0].exp())
        self.sigma_max = float(self._log_sigmas[-1].exp())


def _vp_schedule(name: str, num_train_timesteps: int, beta_start: float, beta_end: float,
                 trained_betas=None, sig_range: float = 6.0) -> VPSchedule:
    """MONAI / diffusers β schedule names → a recon VP schedule (same ᾱ_t at every integer step)."""
    T = int(num_train_timesteps)
    if trained_betas is not None:
        return _BetasVPSchedule(torch.as_tensor(trained_betas), "trained_betas")
    if name in ("linear", "linear_beta"):
        return VPSchedule("linear", T, beta_start, beta_end)
    if name in ("cosine", "squaredcos_cap_v2"):
        # MONAI's "cosine" and diffusers' "squaredcos_cap_v2": Nichol & Dhariwal, s = 0.008, β clipped at 0.999
        return VPSchedule("cosine", T)
    if name in ("scaled_linear", "scaled_linear_beta"):
        try:
            return VPSchedule("scaled_linear", T, beta_start, beta_end)
        except ValueError:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
            return _BetasVPSchedule(betas, "scaled_linear", beta_start, beta_end)
    if name in ("sigmoid_beta", "sigmoid"):
        ramp = torch.linspace(-sig_range, sig_range, T, dtype=torch.float64)
        return _BetasVPSchedule(torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start, name, beta_start,
                                beta_end)
    raise ValueError(
        f"unsupported beta schedule {name!r} (supported: linear/linear_beta, scaled_linear/scaled_linear_beta, "
        "cosine/squaredcos_cap_v2, sigmoid/sigmoid_beta, or explicit trained_betas)"
    )


_PREDICTION = {"epsilon": "eps", "eps": "eps", "sample": "x0", "x0": "x0", "v_prediction": "v", "v": "v"}


def _parameterization(prediction_type: str, source: str) -> str:
    if prediction_type not in _PREDICTION:
        raise ValueError(f"{source}: prediction_type must be 'epsilon', 'sample' or 'v_prediction', "
                         f"got {prediction_type!r}")
    return _PREDICTION[prediction_type]


# ---------------------------------------------------------------------------------------------------------------
# 1. ADM / guided-diffusion
# ---------------------------------------------------------------------------------------------------------------
_ADM_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def _adm_config(image_size, in_channels, large_model, learn_sigma, num_channels, num_res_blocks, channel_mult,
                attention_resolutions, num_heads, num_head_channels, num_heads_upsample, use_scale_shift_norm,
                resblock_updown, use_new_attention_order, dropout) -> dict:
    """guided_diffusion ``create_model`` arguments → the resolved ``UNetModel`` configuration."""
    if num_channels is None:
        num_channels = 256 if large_model else 128
    if num_res_blocks is None:
        num_res_blocks = 2 if large_model else 1
    if attention_resolutions is None:
        attention_resolutions = "32,16,8" if large_model else "16"
    if channel_mult in (None, ""):
        if image_size not in _ADM_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size={image_size}; pass channel_mult")
        channel_mult = _ADM_CHANNEL_MULT[image_size]
    elif isinstance(channel_mult, str):
        channel_mult = tuple(int(c) for c in channel_mult.split(","))
    if isinstance(attention_resolutions, str):
        attention_resolutions = [int(r) for r in attention_resolutions.split(",")]
    return {
        "image_size": int(image_size),
        "in_channels": int(in_channels),
        "model_channels": int(num_channels),
        "out_channels": int(in_channels) * (2 if learn_sigma else 1),
        "num_res_blocks": int(num_res_blocks),
        "attention_resolutions": tuple(int(image_size) // int(r) for r in attention_resolutions),
        "dropout": float(dropout),
        "channel_mult": tuple(channel_mult),
        "num_heads": int(num_heads),
        "num_head_channels": int(num_head_channels),
        "num_heads_upsample": int(num_heads if num_heads_upsample == -1 else num_heads_upsample),
        "use_scale_shift_norm": bool(use_scale_shift_norm),
        "resblock_updown": bool(resblock_updown),
        "use_new_attention_order": bool(use_new_attention_order),
    }


def _diffunet_matches(cfg: dict, large_model: bool) -> bool:
    """Whether deepinv's fixed ``DiffUNet`` configuration is exactly ``cfg``."""
    fixed = {
        "image_size": 256,
        "model_channels": 256 if large_model else 128,
        "num_res_blocks": 2 if large_model else 1,
        "attention_resolutions": (8, 16, 32) if large_model else (16,),
        "channel_mult": (1, 1, 2, 2, 4, 4),
        "num_heads": 4,
        "num_head_channels": 64,
        "num_heads_upsample": 4,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
        "use_new_attention_order": False,
    }
    same = all(
        sorted(cfg[k]) == sorted(v) if k == "attention_resolutions" else cfg[k] == v for k, v in fixed.items()
    )
    out_ok = cfg["out_channels"] == (6 if cfg["in_channels"] == 3 else cfg["out_channels"])
    return same and out_ok


def _build_adm_unet(cfg: dict, large_model: bool) -> nn.Module:
    """deepinv's ``DiffUNet`` when the configuration is one of its two, else the same class with ``cfg``.

    Built on the meta device (no memory, no random init); the checkpoint's tensors are assigned on load.
    """
    from deepinv.models import DiffUNet

    with torch.device("meta"):
        if _diffunet_matches(cfg, large_model):
            net = DiffUNet(cfg["in_channels"], cfg["out_channels"], large_model=large_model, pretrained=None)
        else:
            net = _configurable_diffunet(**cfg)
    # deepinv's DiffUNet keeps ᾱ tables (for its noise-level mode) as buffers: not in guided_diffusion's
    # checkpoints, so they are made non-persistent (and recomputed on the CPU, not on the meta device).
    sqrt_1m, sqrt_a = net.get_alpha_prod()[-2:]
    for name, value in (("sqrt_1m_alphas_cumprod", sqrt_1m), ("sqrt_alphas_cumprod", sqrt_a)):
        if name in net._buffers:
            net.register_buffer(name, value, persistent=False)
    return net


@functools.lru_cache(maxsize=1)
def _configurable_diffunet_class():
    from deepinv.models.diffunet import (
        AttentionBlock,
        DiffUNet,
        Downsample,
        ResBlock,
        TimestepEmbedSequential,
        Upsample,
        conv_nd,
        normalization,
        zero_module,
    )

    class ConfigurableDiffUNet(DiffUNet):
        """guided_diffusion's ``UNetModel`` for any configuration, from deepinv's port of its blocks (same
        parameter names); ``DiffUNet``'s forward methods apply unchanged."""

        def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                     attention_resolutions, dropout, channel_mult, num_heads, num_head_channels, num_heads_upsample,
                     use_scale_shift_norm, resblock_updown, use_new_attention_order):
            nn.Module.__init__(self)
            dims = 2
            self.img_size = image_size
            self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
            self.num_res_blocks, self.attention_resolutions = num_res_blocks, attention_resolutions
            self.dropout, self.channel_mult, self.conv_resample = dropout, channel_mult, True
            self.num_classes, self.use_checkpoint, self.dtype = None, False, torch.float32
            self.num_heads, self.num_head_channels = num_heads, num_head_channels
            self.num_heads_upsample = num_heads_upsample

            def res(ch, out, **kw):
                return ResBlock(ch, model_channels * 4, dropout, out_channels=out, dims=dims,
                                use_scale_shift_norm=use_scale_shift_norm, **kw)

            def attn(ch, heads):
                return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                      use_new_attention_order=use_new_attention_order)

            time_embed_dim = model_channels * 4
            self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                            nn.Linear(time_embed_dim, time_embed_dim))
            ch = input_ch = int(channel_mult[0] * model_channels)
            self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims)(in_channels, ch, 3, padding=1))])
            chans, ds = [ch], 1
            for level, mult in enumerate(channel_mult):
                for _ in range(num_res_blocks):
                    layers = [res(ch, int(mult * model_channels))]
                    ch = int(mult * model_channels)
                    if ds in attention_resolutions:
                        layers.append(attn(ch, num_heads))
                    self.input_blocks.append(TimestepEmbedSequential(*layers))
                    chans.append(ch)
                if level != len(channel_mult) - 1:
                    down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, True, dims, out_channels=ch)
                    self.input_blocks.append(TimestepEmbedSequential(down))
                    chans.append(ch)
                    ds *= 2
            self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))
            self.output_blocks = nn.ModuleList([])
            for level, mult in list(enumerate(channel_mult))[::-1]:
                for i in range(num_res_blocks + 1):
                    layers = [res(ch + chans.pop(), int(model_channels * mult))]
                    ch = int(model_channels * mult)
                    if ds in attention_resolutions:
                        layers.append(attn(ch, num_heads_upsample))
                    if level and i == num_res_blocks:
                        layers.append(res(ch, ch, up=True) if resblock_updown
                                      else Upsample(ch, True, dims=dims, out_channels=ch))
                        ds //= 2
                    self.output_blocks.append(TimestepEmbedSequential(*layers))
            self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                     zero_module(conv_nd(dims)(input_ch, out_channels, 3, padding=1)))
            sqrt_1m, sqrt_a = self.get_alpha_prod()[-2:]  # for DiffUNet's noise-level mode; not in checkpoints
            self.register_buffer("sqrt_1m_alphas_cumprod", sqrt_1m, persistent=False)
            self.register_buffer("sqrt_alphas_cumprod", sqrt_a, persistent=False)

    return ConfigurableDiffUNet


def _configurable_diffunet(**cfg) -> nn.Module:
    return _configurable_diffunet_class()(**cfg)


class ADMNetwork(nn.Module):
    """``network(x_in, t)`` for a guided-diffusion UNet: the ε channels of ``UNetModel.forward(x_in, t)``.

    ``t`` is the (fractional) DDPM step. ``DiffUNet.forward`` is *not* used: its default ``type_t="noise_level"``
    treats ``t`` as a noise level on ``[0, 1]`` images; ``forward_diffusion`` is guided_diffusion's forward.
    Inputs whose sides are not multiples of ``2**(levels-1)`` are padded circularly (as deepinv does) and cropped.
    """

    def __init__(self, unet: nn.Module, in_channels: int, learn_sigma: bool):
        super().__init__()
        self.unet = unet
        self.in_channels = int(in_channels)
        self.learn_sigma = bool(learn_sigma)
        self.multiple = 2 ** (len(unet.channel_mult) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % self.multiple, -w % self.multiple
        if ph or pw:
            x = F.pad(x, (pw, 0, ph, 0), mode="circular")
        out = self.unet.forward_diffusion(x, t)[..., ph:, pw:]
        return out[:, : self.in_channels] if self.learn_sigma else out


def load_adm_checkpoint(
    path: str | os.PathLike,
    image_size: int = 256,
    in_channels: int = 3,
    large_model: bool = False,
    learn_sigma: bool = True,
    *,
    num_channels: int | None = None,
    num_res_blocks: int | None = None,
    channel_mult: str | tuple | None = None,
    attention_resolutions: str | tuple | None = None,
    num_heads: int = 4,
    num_head_channels: int = 64,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = True,
    resblock_updown: bool = True,
    use_new_attention_order: bool = False,
    dropout: float = 0.0,
    intensity=None,
    card: dict | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionPrior:
    """A guided-diffusion / ADM ``UNetModel`` state dict (``torch.save(model.state_dict())``) as a prior.

    The defaults are DPS's FFHQ ``ffhq_10m.pt`` (128 channels, 1 res block, attention at 16);
    ``large_model=True`` gives ImageNet's ``256x256_diffusion_uncond.pt`` (256 channels, 2 res blocks, attention
    at 32, 16, 8). Both are built with deepinv's ``DiffUNet(pretrained=None)``; other configurations (another
    ``image_size``, 1-channel medical ADMs, ...) take guided_diffusion's ``create_model`` keywords
    (``num_channels``, ``channel_mult``, ``attention_resolutions`` as ``"16,8"``, ...), with the same parameter
    names. Images are in ``[-1, 1]`` (``intensity=None``); ``VPSchedule("linear", 1000)``, ε-prediction.
    Class-conditional checkpoints (``label_emb``) are not supported.
    """
    path = _require(path, "ADM checkpoint")
    cfg = _adm_config(image_size, in_channels, large_model, learn_sigma, num_channels, num_res_blocks, channel_mult,
                      attention_resolutions, num_heads, num_head_channels, num_heads_upsample, use_scale_shift_norm,
                      resblock_updown, use_new_attention_order, dropout)
    state = _float32(_unwrap_state(read_checkpoint(path), str(path)))
    for derived in ("sqrt_1m_alphas_cumprod", "sqrt_alphas_cumprod"):  # in state dicts saved from deepinv's DiffUNet
        state.pop(derived, None)
    if "label_emb.weight" in state:
        raise ValueError(f"{path}: class-conditional ADM checkpoints (label_emb) are not supported")
    unet = _build_adm_unet(cfg, large_model)
    _load_checked(unet, state, str(path))
    network = ADMNetwork(unet, in_channels, learn_sigma)
    prior = DiffusionPrior(
        network,
        VPSchedule("linear", 1000),
        parameterization="eps",
        intensity=intensity,
        channels=in_channels,
        spatial_dims=2,
        card={"family": "adm", "source": str(path), "architecture": {"name": "guided_diffusion.UNetModel",
                                                                       "args": cfg}, **(card or {})},
    )
    return _finish(prior, device)


# ---------------------------------------------------------------------------------------------------------------
# 2. MONAI DiffusionModelUNet
# ---------------------------------------------------------------------------------------------------------------
class MonaiNetwork(nn.Module):
    """``network(x_in, t)`` = ``DiffusionModelUNet(x_in, timesteps=t)`` (``t`` the fractional DDPM step)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps=t)


_SCHEDULER_KEYS = ("schedule", "num_train_timesteps", "beta_start", "beta_end", "prediction_type", "schedule_args")


def _monai_config(config, source: str) -> tuple[dict, dict]:
    """Constructor arguments and scheduler options from a dict or a JSON file.

    Accepts the arguments themselves, or ``{"network"|"network_def": {...}, "scheduler"|"noise_scheduler": {...}}``
    (MONAI bundle style; ``_target_`` entries are dropped).
    """
    if isinstance(config, (str, os.PathLike)):
        config = _read_json(_require(config, "MONAI network config"))
    if not isinstance(config, dict):
        raise ValueError(f"{source}: config must be a dict or a JSON file of DiffusionModelUNet arguments")
    config = dict(config)
    scheduler = {}
    for key in ("scheduler", "noise_scheduler"):
        if isinstance(config.get(key), dict):
            scheduler = dict(config.pop(key))
    for key in ("network", "network_def"):
        if isinstance(config.get(key), dict):
            config = dict(config[key])
    for key in _SCHEDULER_KEYS:
        if key in config:
            scheduler[key] = config.pop(key)
    config.pop("_target_", None)
    scheduler.pop("_target_", None)
    if "schedule_beta" in scheduler:  # older MONAI name
        scheduler.setdefault("schedule", scheduler.pop("schedule_beta"))
    return config, scheduler


def load_monai_checkpoint(
    path: str | os.PathLike,
    config: dict | str | os.PathLike,
    *,
    schedule: str | None = None,
    num_train_timesteps: int | None = None,
    beta_start: float | None = None,
    beta_end: float | None = None,
    prediction_type: str | None = None,
    intensity=None,
    card: dict | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionPrior:
    """MONAI ``DiffusionModelUNet`` (2D or 3D) weights as a prior.

    ``path``: a state dict saved with ``torch.save`` (or a dict with a ``"state_dict"``/``"model"`` entry) or a
    ``.safetensors`` file. ``config``: ``DiffusionModelUNet`` constructor arguments (a dict or a JSON file); it may
    also carry the scheduler options. Schedule as MONAI's ``DDPMScheduler``: ``schedule`` ``"linear_beta"``
    (default), ``"scaled_linear_beta"``, ``"cosine"`` or ``"sigmoid_beta"``, ``num_train_timesteps`` (1000),
    ``beta_start``/``beta_end`` (1e-4, 2e-2); ``prediction_type`` ``"epsilon"`` (default) / ``"sample"`` /
    ``"v_prediction"``. Keyword arguments override the config. ``spatial_dims=3`` gives a 3D prior.
    """
    path = _require(path, "MONAI checkpoint")
    try:
        from monai.networks.nets import DiffusionModelUNet
    except ImportError as err:  # pragma: no cover - monai is a core dependency
        raise ImportError("load_monai_checkpoint needs MONAI: pip install monai") from err
    args, sched = _monai_config(config, str(path))
    overrides = {"schedule": schedule, "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                 "beta_end": beta_end, "prediction_type": prediction_type}
    sched.update({k: v for k, v in overrides.items() if v is not None})
    state = _float32(_unwrap_state(read_checkpoint(path), str(path)))
    try:
        unet = DiffusionModelUNet(**args)
    except TypeError as err:
        raise ValueError(f"{path}: bad DiffusionModelUNet config ({err})") from err
    _load_checked(unet, state, str(path))
    sched_args = dict(sched.get("schedule_args") or {})
    vp = _vp_schedule(sched.get("schedule", "linear_beta"), sched.get("num_train_timesteps", 1000),
                      sched_args.pop("beta_start", sched.get("beta_start", 1e-4)),
                      sched_args.pop("beta_end", sched.get("beta_end", 2e-2)), sig_range=sched_args.pop("sig_range", 6))
    spatial_dims = int(args.get("spatial_dims", 2))
    prior = DiffusionPrior(
        MonaiNetwork(unet),
        vp,
        parameterization=_parameterization(sched.get("prediction_type", "epsilon"), str(path)),
        intensity=intensity,
        channels=int(args.get("in_channels", 1)),
        spatial_dims=spatial_dims,
        card={"family": "monai", "source": str(path),
              "architecture": {"name": "monai.networks.nets.DiffusionModelUNet", "args": args},
              "scheduler": sched, **(card or {})},
    )
    return _finish(prior, device)


# ---------------------------------------------------------------------------------------------------------------
# 3. diffusers UNet2DModel
# ---------------------------------------------------------------------------------------------------------------
class DiffusersNetwork(nn.Module):
    """``network(x_in, t)`` = ``UNet2DModel(x_in, t).sample`` (``t`` the fractional DDPM step)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, return_dict=False)[0]


def _diffusers_folders(folder: Path, subfolder: str | None) -> tuple[Path, Path | None]:
    """(the UNet folder, the scheduler config file or None) of a model or pipeline folder."""
    if subfolder:
        unet_dir = folder / subfolder
    elif (folder / "unet" / "config.json").is_file():
        unet_dir = folder / "unet"
    else:
        unet_dir = folder
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{unet_dir}: no config.json (a diffusers UNet folder holds config.json and "
            f"{' or '.join(_DIFFUSERS_WEIGHTS)}; a pipeline folder holds unet/ and scheduler/). {_WHERE}"
        )
    for candidate in (unet_dir / "scheduler_config.json", unet_dir.parent / "scheduler" / "scheduler_config.json",
                      folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if candidate.is_file():
            return unet_dir, candidate
    return unet_dir, None


def load_diffusers_unet(
    folder: str | os.PathLike,
    *,
    subfolder: str | None = None,
    scheduler_config: dict | str | os.PathLike | None = None,
    prediction_type: str | None = None,
    intensity=None,
    card: dict | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionPrior:
    """A diffusers ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``/``.bin``) or a
    pipeline folder (``unet/`` + ``scheduler/scheduler_config.json``) as a prior. Needs ``diffusers``.

    The schedule comes from the scheduler config (``DDPMScheduler``/``DDIMScheduler``: ``beta_schedule`` linear /
    scaled_linear / squaredcos_cap_v2 / sigmoid or ``trained_betas``, ``prediction_type``); ``scheduler_config``
    (a dict or a JSON file) replaces it, and without any, DDPM's defaults are assumed with a warning. The model is
    built from its local ``config.json`` and its weights read locally (safetensors, or ``.bin`` weights-only);
    nothing is fetched from a hub.
    """
    folder = _require(folder, "diffusers model folder")
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise ImportError("load_diffusers_unet needs diffusers: pip install diffrecon[diffusers]") from err
    unet_dir, sched_file = _diffusers_folders(folder, subfolder)
    model_config = _read_json(unet_dir / "config.json")
    cls = model_config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"{unet_dir / 'config.json'}: only unconditional UNet2DModel is supported, got {cls}")
    weights = next((unet_dir / w for w in _DIFFUSERS_WEIGHTS if (unet_dir / w).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{unet_dir}: no {' or '.join(_DIFFUSERS_WEIGHTS)} next to config.json. {_WHERE}")
    unet = UNet2DModel.from_config(model_config)
    state = _float32(_unwrap_state(read_checkpoint(weights), str(weights)))
    if hasattr(unet, "_fix_state_dict_keys_on_load"):  # old attention names (query/key/value/proj_attn), as diffusers
        unet._fix_state_dict_keys_on_load(state)
    _load_checked(unet, state, str(weights))

    if isinstance(scheduler_config, (str, os.PathLike)):
        sched = _read_json(_require(scheduler_config, "scheduler config"))
    elif scheduler_config is not None:
        sched = dict(scheduler_config)
    elif sched_file is not None:
        sched = _read_json(sched_file)
    else:
        warnings.warn(f"{folder}: no scheduler_config.json found; assuming DDPM defaults (linear β 1e-4..0.02, "
                      "1000 steps, epsilon prediction)", stacklevel=2)
        sched = {}
    if sched.get("rescale_betas_zero_snr"):
        raise ValueError(f"{folder}: rescale_betas_zero_snr schedules (ᾱ_T = 0, σ_max = ∞) are not supported")
    vp = _vp_schedule(sched.get("beta_schedule", "linear"), sched.get("num_train_timesteps", 1000),
                      sched.get("beta_start", 1e-4), sched.get("beta_end", 0.02), sched.get("trained_betas"))
    param = _parameterization(prediction_type or sched.get("prediction_type", "epsilon"), str(folder))
    prior = DiffusionPrior(
        DiffusersNetwork(unet),
        vp,
        parameterization=param,
        intensity=intensity,
        channels=int(model_config.get("in_channels", 3)),
        spatial_dims=2,
        card={"family": "diffusers", "source": str(folder),
              "architecture": {"name": "diffusers.UNet2DModel", "args": dict(unet.config)},
              "scheduler": {k: v for k, v in sched.items() if k != "trained_betas"}, **(card or {})},
    )
    return _finish(prior, device)


# ---------------------------------------------------------------------------------------------------------------
# 4. score-SDE NCSN++ (DiffusionMBIR)
# ---------------------------------------------------------------------------------------------------------------
class ScoreSDENetwork(nn.Module):
    """``network(x, σ)`` = score_sde's ``model(x, σ)``: for continuous VE models the label is σ itself and, with
    ``scale_by_sigma``, the output is the score ``∇ log p_σ(x)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.model(x, sigma)


def score_sde_state_dict(checkpoint: dict, network: nn.Module, source: str, use_ema: bool = True) -> dict:
    """The state dict to load into ``network`` from a score_sde checkpoint ``{"model", "ema", "step", ...}``.

    ``"model"`` keys lose their ``module.`` prefix; with ``use_ema`` the EMA shadow parameters replace, in order,
    the parameters of ``network`` that require grad (score_sde's ``ExponentialMovingAverage.copy_to``), so
    ``network`` must be built exactly as in training (e.g. the Fourier embedding's ``W`` with
    ``requires_grad=False``).
    """
    if "model" not in checkpoint or not _is_state_dict(checkpoint["model"]):
        raise ValueError(f"{source}: not a score_sde checkpoint (no 'model' state dict; keys: "
                         f"{', '.join(map(str, list(checkpoint)[:8]))})")
    state = _strip_prefixes(dict(checkpoint["model"]))
    if not use_ema:
        return state
    ema = checkpoint.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)):
        raise ValueError(f"{source}: no EMA shadow_params in the 'ema' entry (pass use_ema=False for raw weights)")
    names = [n for n, p in network.named_parameters() if p.requires_grad]
    if len(names) != len(shadow):
        raise ValueError(f"{source}: the EMA holds {len(shadow)} tensors but the network has {len(names)} trainable "
                         "parameters: the architecture does not match the checkpoint")
    state = dict(state)
    for name, value in zip(names, shadow, strict=True):
        if name in state and tuple(state[name].shape) != tuple(value.shape):
            raise ValueError(f"{source}: EMA tensor for {name} has shape {tuple(value.shape)}, the model entry "
                             f"{tuple(state[name].shape)}: the architecture's parameter order does not match")
        state[name] = value
    return state


def load_ncsnpp_checkpoint(
    path: str | os.PathLike,
    config=None,
    *,
    network: nn.Module | None = None,
    sigma_min: float = 0.01,
    sigma_max: float = 378.0,
    use_ema: bool = True,
    channels: int | None = None,
    intensity=None,
    card: dict | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionPrior:
    """A score-SDE NCSN++ VE checkpoint (DiffusionMBIR's ``checkpoint.pth``: ``{"model", "ema", "step", ...}``).

    ``network`` must be the NCSN++ built by score_sde's (or DiffusionMBIR's) ``models/ncsnpp.py`` from the run's
    config, with ``scale_by_sigma=True`` and a continuous VE conditioning (called as ``model(x, σ)``, returning the
    score). No installable package reproduces that architecture's parameter names (``all_modules.<i>...``), and
    recon does not re-implement it, so without ``network`` this raises ``NotImplementedError``. The weights are
    checked and loaded (EMA by default); ``VESchedule(sigma_min, sigma_max)``, parameterization ``"score"``.
    """
    path = _require(path, "NCSN++ checkpoint")
    if network is None:
        raise NotImplementedError(
            f"{path}: score-SDE NCSN++ needs its architecture: no installed package reproduces score_sde's "
            "NCSNpp parameter names (deepinv's NCSNpp is EDM's SongUNet). Build the model with score_sde's / "
            "DiffusionMBIR's models/ncsnpp.py from its config and pass it as network=..."
        )
    del config  # the architecture comes with ``network``; kept for the signature's symmetry with the other loaders
    checkpoint = read_checkpoint(path)
    state = score_sde_state_dict(checkpoint, network, str(path), use_ema=use_ema)
    _load_checked(network, _float32(state), str(path))
    step = checkpoint.get("step")
    step = int(step) if isinstance(step, (int, torch.Tensor)) and torch.as_tensor(step).numel() == 1 else None
    if channels is None:
        first = next((p for p in network.parameters() if p.dim() == 4), None)
        channels = int(first.shape[1]) if first is not None else 1
    prior = DiffusionPrior(
        ScoreSDENetwork(network),
        VESchedule(sigma_min, sigma_max),
        parameterization="score",
        intensity=intensity,
        channels=channels,
        spatial_dims=2,
        card={"family": "ncsnpp", "source": str(path), "step": step, "ema": bool(use_ema), **(card or {})},
    )
    return _finish(prior, device)


# ---------------------------------------------------------------------------------------------------------------
# 5. dispatch
# ---------------------------------------------------------------------------------------------------------------
def _family_of_keys(keys) -> str | None:
    keys = set(keys)
    if "input_blocks.0.0.weight" in keys and "time_embed.0.weight" in keys:
        return "adm"
    if "conv_in.conv.weight" in keys and "time_embed.0.weight" in keys:
        return "monai"
    if "conv_in.weight" in keys and "time_embedding.linear_1.weight" in keys:
        return "diffusers"
    return None


def detect_family(path: str | os.PathLike, config=None) -> str:
    """The checkpoint family of ``path`` (one of ``FAMILIES``), from its layout and parameter names."""
    path = _require(path, "checkpoint")
    unknown = ValueError(f"{path}: cannot tell the checkpoint family (one of {', '.join(FAMILIES)}); pass family=")
    if path.is_dir():
        if any((path / p).is_file() for p in ("config.json", "unet/config.json", "model_index.json")):
            return "diffusers"
        raise unknown
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            family = _family_of_keys(_strip_prefixes(dict.fromkeys(f.keys())))
        if family == "diffusers":  # a bare weights file: the loader needs its folder
            raise ValueError(f"{path}: diffusers weights; pass the folder holding it and its config.json")
        if family == "monai" or (family is None and config is not None):
            return "monai"
        if family is not None:
            return family
        raise unknown
    obj = read_checkpoint(path)
    if "model" in obj and "ema" in obj and isinstance(obj["model"], dict):
        if any(str(k).startswith("module.") for k in obj["model"]) or "step" in obj:
            return "ncsnpp"
    try:
        state = _unwrap_state(obj, str(path))
    except ValueError:
        raise unknown from None
    family = _family_of_keys(state)
    if family == "diffusers":
        raise ValueError(f"{path}: diffusers weights; pass the folder holding it and its config.json")
    if family is None:
        raise unknown
    return family


def load_external_prior(path: str | os.PathLike, family: str | None = None, **options) -> DiffusionPrior:
    """Load an external checkpoint as a prior: ``family`` one of ``"adm"``, ``"monai"``, ``"diffusers"``,
    ``"ncsnpp"``, or detected from ``path`` (:func:`detect_family`); ``options`` go to the family's loader."""
    if family is None:
        family = detect_family(path, options.get("config"))
    if family == "adm":
        return load_adm_checkpoint(path, **options)
    if family == "monai":
        if "config" not in options:
            raise ValueError(f"{path}: a MONAI checkpoint needs config= (the DiffusionModelUNet arguments)")
        return load_monai_checkpoint(path, **options)
    if family == "diffusers":
        return load_diffusers_unet(path, **options)
    if family == "ncsnpp":
        if options.get("network") is None:
            raise NotImplementedError(
                f"{path}: a score-SDE NCSN++ checkpoint; recon cannot build that architecture (no installable "
                "package reproduces its parameter names). Build it with score_sde's models/ncsnpp.py and call "
                "load_ncsnpp_checkpoint(path, network=model)"
            )
        return load_ncsnpp_checkpoint(path, **options)
    raise ValueError(f"unknown family {family!r}: expected one of {', '.join(FAMILIES)}")

