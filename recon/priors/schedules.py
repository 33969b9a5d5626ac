r"""Noise schedules: one convention for every diffusion prior in ``recon``.

The convention (k-diffusion / EDM's "variance exploding" view, used by every sampler): a noisy image is

.. math::  x = x_0 + \sigma\, n, \qquad n \sim \mathcal N(0, I),

with ``x_0`` in the prior's normalised intensity range. A network trained in another convention is wrapped
once, by its schedule, into this view:

- **VP / DDPM** (discrete, ``ᾱ_t``): the network sees ``x_vp = \sqrt{ᾱ} x_0 + \sqrt{1-ᾱ} n`` at integer
  time ``t``. Since ``x_vp = \sqrt{ᾱ}(x_0 + σ n)`` with ``σ = \sqrt{(1-ᾱ)/ᾱ}``, the network input is
  ``x / \sqrt{1 + σ^2}`` and ``ᾱ = 1 / (1 + σ^2)``. Fractional times interpolate ``\log σ`` linearly
  between the discrete steps, so any ``σ`` in range can be queried.
- **VE** (score-SDE, NCSN++): ``σ(t) = σ_{min} (σ_{max}/σ_{min})^t``, ``t ∈ [0, 1]``; the network sees
  ``x`` and is conditioned on ``σ``.
- **EDM** (Karras et al. 2022): ``σ(t) = t``; the network sees ``c_in(σ) x`` and ``c_noise = \ln(σ)/4``.

Conversions, for every schedule: ``ᾱ = 1/(1+σ^2)``, ``\mathrm{logSNR} = -2 \ln σ``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "EDMSchedule",
    "NoiseSchedule",
    "VESchedule",
    "VPSchedule",
    "alpha_bar_from_sigma",
    "karras_sigmas",
    "log_snr_from_sigma",
    "sigma_from_alpha_bar",
    "sigma_from_log_snr",
]


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """``ᾱ = 1 / (1 + σ²)``: the VP signal fraction of the VE noise level ``σ``."""
    return 1.0 / (1.0 + sigma**2)


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """``σ = sqrt((1 - ᾱ) / ᾱ)``."""
    return torch.sqrt((1.0 - alpha_bar) / alpha_bar)


def log_snr_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """``log SNR = log(ᾱ / (1 - ᾱ)) = -2 log σ``."""
    return -2.0 * torch.log(sigma)


def sigma_from_log_snr(log_snr: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * log_snr)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """``n`` noise levels from ``sigma_max`` down to ``sigma_min`` spaced as in Karras et al. (2022) eq. 5,
    followed by a final 0 (``n + 1`` values, float64)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class NoiseSchedule:
    """Maps the VE noise level ``σ`` to what a network expects, and back.

    Subclasses define ``kind``, ``sigma_min``, ``sigma_max``, ``sigma(t)``, ``t(sigma)``, and how the network
    input and conditioning are formed: ``input_scale(sigma)`` (multiplies ``x``) and ``net_condition(sigma)``
    (the value passed to the network as its time/noise argument).
    """

    kind: str = "base"
    sigma_min: float
    sigma_max: float

    def sigma(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def t(self, sigma: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)

    def net_condition(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.t(sigma)

    def alpha_bar(self, sigma: torch.Tensor) -> torch.Tensor:
        return alpha_bar_from_sigma(sigma)

    def log_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        return log_snr_from_sigma(sigma)

    def sample_sigmas(self, n: int, rho: float = 7.0) -> torch.Tensor:
        """Default decreasing sampling levels (Karras spacing within this schedule's range), ending in 0."""
        return karras_sigmas(n, self.sigma_min, self.sigma_max, rho)

    def config(self) -> dict:
        """Constructor arguments, so a saved prior can rebuild its schedule exactly."""
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving (DDPM) schedule with ``num_train_timesteps`` steps.

    Args:
        beta_schedule: ``"linear"`` (Ho et al. 2020: β from ``beta_start`` to ``beta_end``) or ``"cosine"``
            (Nichol & Dhariwal 2021, with ``s = 0.008`` and β clipped at 0.999).
        num_train_timesteps: ``T`` (1000 for the DDPM/ADM/DPS checkpoints).
        beta_start, beta_end: linear schedule end points (1e-4 and 0.02 as in DDPM).

    The network is called with the (fractional) step index ``t ∈ [0, T-1]`` and ``x_vp = x / sqrt(1 + σ²)``.
    """

    kind = "vp"

    def __init__(
        self,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        if beta_schedule not in ("linear", "cosine"):
            raise ValueError(f"beta_schedule must be 'linear' or 'cosine', got {beta_schedule!r}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        T = self.num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:
            s = 0.008
            steps = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self._log_sigmas = torch.log(sigma_from_alpha_bar(self.alphas_cumprod))
        self.sigma_min = float(self._log_sigmas[0].exp())
        self.sigma_max = float(self._log_sigmas[-1].exp())

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at fractional step ``t`` (log-linear interpolation between the discrete steps)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = t - lo
        ls = self._log_sigmas.to(t.device)
        return torch.exp((1 - frac) * ls[lo] + frac * ls[lo + 1])

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional step of ``σ`` (inverse of ``sigma``; clamped to the trained range)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        ls = self._log_sigmas.to(sigma.device)
        log_s = torch.log(sigma.clamp(min=self.sigma_min, max=self.sigma_max))
        hi = torch.searchsorted(ls, log_s.contiguous()).clamp(1, len(ls) - 1)
        lo = hi - 1
        frac = (log_s - ls[lo]) / (ls[hi] - ls[lo])
        return lo.to(torch.float64) + frac

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / torch.sqrt(1.0 + sigma**2)

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "beta_schedule": self.beta_schedule,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }


class VESchedule(NoiseSchedule):
    """Score-SDE variance-exploding schedule ``σ(t) = σ_min (σ_max/σ_min)^t``, ``t ∈ [0, 1]``.

    The network (e.g. NCSN++) is conditioned on ``σ`` itself (score-SDE's continuous VE models), so
    ``net_condition(σ) = σ``. Defaults are DiffusionMBIR's AAPM CT / fastMRI models (σ_min 0.01, σ_max 378).
    """

    kind = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 378.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def net_condition(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def config(self) -> dict:
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class EDMSchedule(NoiseSchedule):
    """EDM (Karras et al. 2022): ``σ(t) = t``, input scaling ``c_in = 1/sqrt(σ² + σ_data²)``, conditioning
    ``c_noise = ln(σ)/4``. The matching parameterization is ``"edm"`` (see ``DiffusionPrior``)."""

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        if not 0 < sigma_min < sigma_max or sigma_data <= 0:
            raise ValueError(f"need 0 < sigma_min < sigma_max and sigma_data > 0, got {sigma_min}, {sigma_max}, "
                             f"{sigma_data}")
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float64)

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / torch.sqrt(sigma**2 + self.sigma_data**2)

    def net_condition(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(sigma) / 4

    def config(self) -> dict:
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data}


def schedule_from_config(config: dict) -> NoiseSchedule:
    """Rebuild a schedule saved with ``schedule.config()``."""
    config = dict(config)
    kind = config.pop("kind", None)
    classes = {"vp": VPSchedule, "ve": VESchedule, "edm": EDMSchedule}
    if kind not in classes:
        raise ValueError(f"schedule kind must be one of {sorted(classes)}, got {kind!r}")
    return classes[kind](**config)
