r"""``DiffusionPrior``: any denoising network and its schedule behind one interface.

Every sampler in ``recon`` talks to a prior through ``denoise(x, sigma)`` (the Tweedie estimate
:math:`\hat x_0 = E[x_0 \mid x]` for :math:`x = x_0 + \sigma n`, in the prior's normalised intensity range),
``score(x, sigma) = (\hat x_0 - x)/\sigma^2`` and ``eps(x, sigma) = (x - \hat x_0)/\sigma``. How the
network was trained (schedule and parameterization) is handled here, once:

================  ===========================================================================
parameterization  network output ``F`` → :math:`\hat x_0` (``c = schedule.input_scale(σ)``, input ``c x``)
================  ===========================================================================
``"eps"``         :math:`\hat x_0 = x - \sigma F`
``"x0"``          :math:`\hat x_0 = F`
``"v"``           :math:`\hat x_0 = \bar\alpha\, x - \sqrt{1-\bar\alpha}\, F` (VP only; ``c = \sqrt{\bar\alpha}``)
``"score"``       :math:`\hat x_0 = (c x + c^2\sigma^2 F)/c` (``F`` is the score of the network's input)
``"edm"``         :math:`\hat x_0 = c_{skip} x + c_{out} F` (Karras et al. 2022 preconditioning)
================  ===========================================================================

Volumes ``(B, C, D, H, W)`` go through a 2D network slice by slice along ``D`` in chunks whose size is set
by a memory budget, so a 256-slice volume never holds 256 slices of activations at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from recon.priors.schedules import EDMSchedule, NoiseSchedule
from recon.priors.symmetry import SYMMETRIES, d4_average

__all__ = ["PARAMETERIZATIONS", "DiffusionPrior", "IntensityScale", "IntensityWindow"]

PARAMETERIZATIONS = ("eps", "x0", "v", "score", "edm")


@dataclass
class IntensityWindow:
    """Linear map from physical units to the prior's range: ``[low, high]`` (e.g. HU) → ``[-1, 1]``.

    Values outside the window map outside ``[-1, 1]`` (no clipping, so the map is exactly invertible);
    the prior was trained on the window, so far-out values (metal, air outside the body) are out of
    distribution.
    """

    low: float = -1000.0
    high: float = 1000.0
    unit: str = "HU"

    def __post_init__(self):
        if not self.high > self.low:
            raise ValueError(f"intensity window needs high > low, got [{self.low}, {self.high}]")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * (x - self.low) / (self.high - self.low) - 1.0

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1.0) * 0.5 * (self.high - self.low) + self.low

    def config(self) -> dict:
        return {"kind": "window", "low": self.low, "high": self.high, "unit": self.unit}


@dataclass
class IntensityScale:
    """MRI magnitude: ``x / scale`` mapped to ``[-1, 1]`` as ``2 x / scale - 1``.

    ``scale`` is the ``percentile`` of the image's magnitude; ``normalize`` computes it from its input when
    ``scale`` is None and keeps it, so that ``denormalize`` returns to the same units. Set ``scale`` to
    normalise several images identically (e.g. from a zero-filled reconstruction).
    """

    percentile: float = 99.5
    scale: float | None = None
    unit: str = "a.u."

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            q = torch.quantile(x.detach().abs().flatten().double()[: 16_000_000], self.percentile / 100)
            self.scale = float(q) if float(q) > 0 else 1.0
        return 2.0 * x / self.scale - 1.0

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            raise ValueError("IntensityScale.denormalize needs a scale: call normalize first or set scale")
        return (x + 1.0) * 0.5 * self.scale

    def config(self) -> dict:
        return {"kind": "scale", "percentile": self.percentile, "unit": self.unit}


def intensity_from_config(config: dict | None):
    if config is None:
        return None
    config = dict(config)
    kind = config.pop("kind", None)
    if kind == "window":
        return IntensityWindow(**config)
    if kind == "scale":
        return IntensityScale(**config)
    raise ValueError(f"intensity kind must be 'window' or 'scale', got {kind!r}")


class DiffusionPrior(nn.Module):
    """A denoising network with its noise schedule, parameterization and intensity convention.

    Args:
        network: ``network(x_in, cond) -> F`` on ``(N, C, H, W)`` (or ``(N, C, D, H, W)`` when
            ``spatial_dims=3``) with ``cond`` of shape ``(N,)`` given by ``schedule.net_condition(σ)``.
        schedule: a ``recon.priors.schedules`` schedule (VP, VE or EDM).
        parameterization: one of ``PARAMETERIZATIONS`` (see the module docstring).
        intensity: ``IntensityWindow`` / ``IntensityScale`` between physical units and the prior's range, or
            None for data already normalised.
        channels: image channels the network expects (1 for CT and MRI magnitude).
        spatial_dims: 2 for slice priors (volumes are processed slice by slice along ``D``), 3 for volume
            priors.
        memory_budget: bytes of activations allowed per network call; with ``bytes_per_voxel`` it sets how
            many slices go through the network at once.
        bytes_per_voxel: activation memory per input voxel in a forward pass (a model-card estimate).
        card: the model card (a dict: training data, resolution, licence, measured quality...).
        symmetry: None, or ``"d4"``: each 2D denoising is the mean over the eight rotations and flips of the
            square (``recon.priors.symmetry``; eight network evaluations, counted in ``nfe``). Volumes under a 2D
            prior are averaged slice by slice in-plane; a 3D prior ignores it.

    ``sigma`` arguments are floats or tensors of shape ``(B,)`` (one level per batch element).
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: NoiseSchedule,
        parameterization: str = "eps",
        intensity: IntensityWindow | IntensityScale | None = None,
        channels: int = 1,
        spatial_dims: int = 2,
        memory_budget: float = 2e9,
        bytes_per_voxel: float = 4096.0,
        card: dict | None = None,
        symmetry: str | None = None,
    ):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if parameterization == "v" and schedule.kind != "vp":
            raise ValueError("the 'v' parameterization is defined for VP schedules only")
        if parameterization == "edm" and not isinstance(schedule, EDMSchedule):
            raise ValueError("the 'edm' parameterization needs an EDMSchedule (it uses sigma_data)")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if symmetry not in (None, *SYMMETRIES):
            raise ValueError(f"symmetry must be None or one of {SYMMETRIES}, got {symmetry!r}")
        self.network = network
        self.schedule = schedule
        self.parameterization = parameterization
        self.intensity = intensity
        self.channels = int(channels)
        self.spatial_dims = spatial_dims
        self.memory_budget = float(memory_budget)
        self.bytes_per_voxel = float(bytes_per_voxel)
        self.card = dict(card or {})
        self.symmetry = symmetry
        self.nfe = 0  # network evaluations (batched calls count once per image/slice)

    # -- range and units ------------------------------------------------------------------------
    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Physical units (HU for CT) → the prior's normalised range."""
        return x if self.intensity is None else self.intensity.normalize(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The prior's normalised range → physical units."""
        return x if self.intensity is None else self.intensity.denormalize(x)

    # -- the interface --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return self.denoise(x, sigma)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Tweedie estimate ``E[x0 | x]`` for ``x = x0 + sigma * n``; same shape and dtype as ``x``.

        ``x``: ``(B, C, H, W)``, or ``(B, C, D, H, W)`` (slice by slice for a 2D prior). Differentiable.
        """
        sig = self._sigma_per_item(x, sigma)
        if x.dim() == 5 and self.spatial_dims == 2:
            b, c, d, h, w = x.shape
            slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
            out = self._denoise_batched(slices, sig.repeat_interleave(d))
            return out.reshape(b, d, c, h, w).permute(0, 2, 1, 3, 4)
        if x.dim() != 2 + self.spatial_dims:
            raise ValueError(
                f"x must be (B, C, H, W) or (B, C, D, H, W) for a {self.spatial_dims}D prior, got {tuple(x.shape)}"
            )
        return self._denoise_batched(x, sig)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``∇ log p_σ(x) = (denoise(x, σ) - x) / σ²``."""
        sig = self._sigma_per_item(x, sigma)
        if (sig <= 0).any():
            raise ValueError("score needs sigma > 0")
        return (self.denoise(x, sig) - x) / _expand(sig, x) ** 2

    def eps(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The noise estimate ``(x - denoise(x, σ)) / σ``."""
        sig = self._sigma_per_item(x, sigma)
        if (sig <= 0).any():
            raise ValueError("eps needs sigma > 0")
        return (x - self.denoise(x, sig)) / _expand(sig, x)

    # -- internals ------------------------------------------------------------------------------
    def _sigma_per_item(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sig.dim() == 0:
            sig = sig.expand(x.shape[0])
        if sig.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a number or a tensor of shape ({x.shape[0]},), got {tuple(sig.shape)}")
        if (sig < 0).any() or not torch.isfinite(sig).all():
            raise ValueError("sigma must be finite and >= 0")
        return sig

    def slices_per_call(self, spatial_shape) -> int:
        """Network batch size allowed by ``memory_budget`` for images of ``spatial_shape``."""
        voxels = math.prod(spatial_shape) * self.channels
        return max(1, int(self.memory_budget // max(1.0, voxels * self.bytes_per_voxel)))

    def _denoise_batched(self, x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"the prior expects {self.channels} channel(s), got x with shape {tuple(x.shape)}")
        if self.symmetry == "d4" and x.dim() == 4:
            return d4_average(lambda t: self._denoise_chunks(t, sig), x)
        return self._denoise_chunks(x, sig)

    def _denoise_chunks(self, x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        step = self.slices_per_call(x.shape[2:])
        if x.shape[0] <= step:
            return self._denoise_once(x, sig)
        return torch.cat([self._denoise_once(x[i : i + step], sig[i : i + step]) for i in range(0, x.shape[0], step)])

    def _denoise_once(self, x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        zero = sig == 0
        s = torch.where(zero, torch.full_like(sig, self.sigma_min), sig)  # σ = 0 returns x below
        s64 = s.double()
        c = self.schedule.input_scale(s64).to(x.dtype)
        cond = self.schedule.net_condition(s64).to(torch.float32)
        net_dtype = next(self.network.parameters(), torch.empty(0)).dtype
        out = self.network((x * _expand(c, x)).to(net_dtype), cond.to(x.device)).to(x.dtype)
        self.nfe += x.shape[0]
        se, ce = _expand(s, x), _expand(c, x)
        p = self.parameterization
        if p == "eps":
            x0 = x - se * out
        elif p == "x0":
            x0 = out
        elif p == "v":
            abar = ce**2
            x0 = abar * x - torch.sqrt(1 - abar) * out
        elif p == "score":
            x0 = (ce * x + (ce * se) ** 2 * out) / ce
        else:  # edm
            sd = self.schedule.sigma_data
            c_skip = sd**2 / (se**2 + sd**2)
            c_out = se * sd / torch.sqrt(se**2 + sd**2)
            x0 = c_skip * x + c_out * out
        if zero.any():
            x0 = torch.where(_expand(zero, x), x, x0)
        return x0

    def __repr__(self) -> str:  # concise: the network's layers are in self.network
        params = sum(p.numel() for p in self.network.parameters())
        return (
            f"DiffusionPrior(network={type(self.network).__name__} ({params:,} parameters), "
            f"schedule={self.schedule!r}, parameterization={self.parameterization!r}, "
            f"intensity={self.intensity!r}, channels={self.channels}, spatial_dims={self.spatial_dims})"
        )


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))
