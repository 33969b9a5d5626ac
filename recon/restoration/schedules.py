r"""Residual-shifting diffusion schedules and their few-step samplers: ResShift and RDDM, in image space.

Both models start the reverse chain at the degraded image ``y0`` (plus a little noise) rather than at pure noise,
so that 4–15 network evaluations restore an image. Tensors are ``(B, C, H, W)`` (any trailing shape works) in the
model's normalised range (``[-1, 1]``); time indices are **0-based** as in the official code: index ``t`` in
``0 … T-1`` is the paper's step ``t + 1``, and index ``-1`` stands for the clean end of the chain (η = 0, ᾱ = 0,
β̄ = 0).

ResShift (Yue, Wang & Loy, NeurIPS 2023; ``zsyOAOA/ResShift``, ``models/gaussian_diffusion.py``)
------------------------------------------------------------------------------------------------
With the residual ``e0 = y0 - x0``:

.. math::
    q(x_t \mid x_0, y_0) = \mathcal N\big(x_0 + \eta_t e_0,\ \kappa^2 \eta_t I\big), \qquad
    q(x_{t-1} \mid x_t, x_0, y_0) = \mathcal N\Big(\tfrac{\eta_{t-1}}{\eta_t} x_t + \tfrac{\alpha_t}{\eta_t} x_0,\
    \kappa^2 \tfrac{\eta_{t-1}}{\eta_t} \alpha_t I\Big), \quad \alpha_t = \eta_t - \eta_{t-1},

and the prior ``x_T = y0 + κ sqrt(η_T) n``. The schedule is the official ``get_named_eta_schedule("exponential")``:
``sqrt(η_1) = min(min_noise_level / κ, min_noise_level)``, ``sqrt(η_T) = etas_end``, and
``sqrt(η_t) = sqrt(η_1) · b0^{β_t}`` with ``β_t = ((t-1)/(T-1))^p (T-1)``, ``b0 = (etas_end / sqrt(η_1))^{1/(T-1)}``.

*Paper/code mismatch* (reference notes, pitfall 3): the paper states ``η_1 = min((0.04/κ)², 0.001)`` and
``η_T = 0.999``; the code, and the released checkpoints, use ``etas_end = 0.99`` **as sqrt(η_T)**, i.e.
``η_T = 0.9801``, and ``η_1 = (min_noise_level/κ)² = 4e-4`` for the conference setting (κ = 2, 0.04). We follow
the code. Defaults are the conference configuration ``realsr_swinunet_realesrgan256.yaml``: T = 15, p = 0.3,
κ = 2, min_noise_level = 0.04, etas_end = 0.99 (the journal v3 uses T = 4, min_noise_level = 0.2).

The network predicts ``x0`` (``predict_type: xstart``) from ``(x_t, y0, t)``; the code's image-space input
scaling ``x_t / (3 κ sqrt(η_t) + 1)`` (``_scale_input`` with ``latent_flag=False``) is :meth:`scale_input`.
Sampling with fewer steps than ``T`` uses a subsequence of the training indices; the posterior between any two
indices ``s < t`` is the same closed form with ``η_{t-1} → η_s`` (the chain is Gaussian-Markov in ``η``).

RDDM (Liu et al., CVPR 2024; ``nachifur/RDDM``, ``residual_denoising_diffusion_pytorch.py``)
---------------------------------------------------------------------------------------------
With the residual ``I_res = y0 - x0`` (degraded minus clean):

.. math::
    I_t = I_0 + \bar\alpha_t I_{res} + \bar\beta_t \epsilon, \qquad
    \bar\alpha_t = \sum_{i \le t} \alpha_i,\ \ \bar\beta_t^2 = \sum_{i \le t} \beta_i^2,

``α_t = (T + 1 - t) / (T(T+1)/2)`` ("decreased", ``Σ α = 1``), ``β_t² = sum_scale · t / (T(T+1)/2)``
("increased", ``β̄_T² = sum_scale``), both cumulative sums clipped to ``[0, 1]`` as in ``gen_coefficients`` and
``ResidualDiffusion.__init__``. The network predicts the residual and the noise (objective ``pred_res_noise``);
``I_0 = I_t - ᾱ_t I_res - β̄_t ε``. The generalised DDIM sampler (``ddim_sample``, ``use_pred_noise`` branch)
starts at ``I_T = y0 + sqrt(sum_scale) ε`` and steps

.. math::
    \sigma^2 = \eta\, \beta^2 \bar\beta_s^2 / \bar\beta_t^2, \qquad
    I_s = I_t - (\bar\alpha_t - \bar\alpha_s) I_{res}^\theta
          - \big(\bar\beta_t - \sqrt{\bar\beta_s^2 - \sigma^2}\big) \epsilon^\theta + \sigma z

(``β² = β̄_t² - β̄_s²``), the last step returning the ``I_0`` prediction. Conditional restoration runs it
deterministically: the code forces ``ddim_sampling_eta = 0`` (pitfall 4), our default too. Defaults: T = 1000
training steps, ``sum_scale = 0.01`` (the code's default for conditional models; the raindrop experiment uses 1),
10 sampling steps (deraining; 5 for LOL), times ``linspace(-1, T-1, steps+1)`` truncated to integers as the code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["RDDMSchedule", "ResShiftSchedule", "rddm_sample", "resshift_sample", "schedule_from_config"]


def _gather(values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` (index ``-1`` → 0) broadcast against ``like`` ``(B, ...)``, in ``like``'s dtype/device."""
    t = torch.as_tensor(t, dtype=torch.long)
    padded = torch.cat([values.new_zeros(1), values])  # padded[0] is the clean end (index -1)
    out = padded.to(like.device)[(t + 1).to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1))) if out.dim() else out


def _randn(like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like``; ``generator`` is one ``torch.Generator`` (CPU), or a list
    of them, one per batch element (results independent of how a volume is chunked)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
        return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=torch.float32)
                            for g in generator]).to(like)
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like)


class ResShiftSchedule:
    """The ResShift η schedule, forward process, posterior and prior (see the module docstring).

    Args:
        T: length of the Markov chain (training steps; default 15, conference setting).
        p: power of the schedule's time warping (default 0.3).
        kappa: κ, the noise scale (default 2.0).
        min_noise_level: sets ``sqrt(η_1) = min(min_noise_level / κ, min_noise_level)`` (default 0.04).
        etas_end: ``sqrt(η_T)`` (default 0.99, so ``η_T = 0.9801``).

    Attributes: ``sqrt_etas`` and ``etas``, float64 tensors of shape ``(T,)`` (index 0 = the paper's η_1).
    """

    kind = "resshift"

    def __init__(self, T: int = 15, p: float = 0.3, kappa: float = 2.0, min_noise_level: float = 0.04,
                 etas_end: float = 0.99):
        if not (isinstance(T, int) and T >= 2):
            raise ValueError(f"ResShift needs T >= 2 steps, got {T!r}")
        if not (kappa > 0 and min_noise_level > 0 and 0 < etas_end <= 1 and p > 0):
            raise ValueError(f"ResShift needs kappa, min_noise_level, p > 0 and 0 < etas_end <= 1, got "
                             f"kappa={kappa}, min_noise_level={min_noise_level}, p={p}, etas_end={etas_end}")
        self.T, self.p, self.kappa = int(T), float(p), float(kappa)
        self.min_noise_level, self.etas_end = float(min_noise_level), float(etas_end)
        start = min(self.min_noise_level / self.kappa, self.min_noise_level)  # sqrt(η_1), as the code
        if not start < self.etas_end:
            raise ValueError(f"sqrt(eta_1) = {start:g} must be below etas_end = {self.etas_end:g}")
        increaser = math.exp(math.log(self.etas_end / start) / (self.T - 1))
        power_timestep = torch.linspace(0, 1, self.T, dtype=torch.float64) ** self.p * (self.T - 1)
        self.sqrt_etas = increaser**power_timestep * start
        self.etas = self.sqrt_etas**2

    def config(self) -> dict:
        return {"kind": self.kind, "T": self.T, "p": self.p, "kappa": self.kappa,
                "min_noise_level": self.min_noise_level, "etas_end": self.etas_end}

    def eta(self, t) -> torch.Tensor:
        """η at 0-based index ``t`` (``-1`` → 0), float64."""
        return _gather(self.etas, t, torch.zeros(1, dtype=torch.float64)).reshape(torch.as_tensor(t).shape)

    def marginal(self, x0: torch.Tensor, y0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(x_t | x0, y0)``: ``x0 + η_t (y0 - x0)`` and ``κ² η_t`` (broadcast)."""
        eta = _gather(self.etas, t, x0)
        return x0 + eta * (y0 - x0), self.kappa**2 * eta * torch.ones_like(x0)

    def q_sample(self, x0: torch.Tensor, y0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """A draw of ``x_t`` given ``x0``, ``y0`` and standard normal ``noise`` (official ``q_sample``)."""
        eta = _gather(self.etas, t, x0)
        return x0 + eta * (y0 - x0) + self.kappa * eta.sqrt() * noise

    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t, s=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(x_s | x_t, x0, y0)`` for ``s < t`` (default ``s = t - 1``; ``s = -1``: the
        clean end, mean ``x0``, variance 0): ``(η_s/η_t) x_t + (1 - η_s/η_t) x0`` and ``κ² η_s (η_t - η_s)/η_t``
        (official ``q_posterior_mean_variance`` for ``s = t - 1``; ``y0`` cancels)."""
        t = torch.as_tensor(t, dtype=torch.long)
        s = t - 1 if s is None else torch.as_tensor(s, dtype=torch.long)
        eta_t, eta_s = _gather(self.etas, t, x_t), _gather(self.etas, s, x_t)
        ratio = eta_s / eta_t
        return ratio * x_t + (1 - ratio) * x0, self.kappa**2 * eta_s * (eta_t - eta_s) / eta_t * torch.ones_like(x_t)

    def prior_sample(self, y0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_T = y0 + κ sqrt(η_T) n`` (official ``prior_sample``)."""
        return y0 + self.kappa * float(self.sqrt_etas[-1]) * noise

    def scale_input(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The network's input normalisation in image space: ``x_t / (3 κ sqrt(η_t) + 1)`` (official
        ``_scale_input``, ``latent_flag=False``)."""
        return x_t / (3 * self.kappa * _gather(self.sqrt_etas, t, x_t) + 1)

    def timesteps(self, steps: int | None = None) -> list[int]:
        """Indices visited by an ``steps``-step sampler, from ``T-1`` down to 0 (default all ``T``: the official
        sampler); fewer steps use evenly spaced indices (rounded), always including ``T-1`` and 0."""
        steps = self.T if steps is None else int(steps)
        if not 1 <= steps <= self.T:
            raise ValueError(f"ResShift samples with 1 to T = {self.T} steps, got {steps}")
        if steps == 1:
            return [self.T - 1]
        idx = torch.linspace(self.T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        return list(dict.fromkeys(idx))


class RDDMSchedule:
    """The RDDM coefficient schedules (α decreasing, β² increasing), forward process and DDIM step.

    Args:
        T: training steps (default 1000, as the official code).
        sum_scale: ``β̄_T²``, the total noise variance (default 0.01, the code's default for conditional models).

    Attributes (float64, shape ``(T,)``, 0-based index): ``alphas``, ``alphas_cumsum`` (ᾱ), ``betas2`` (β²),
    ``betas2_cumsum`` (β̄²), ``betas_cumsum`` (β̄).
    """

    kind = "rddm"

    def __init__(self, T: int = 1000, sum_scale: float = 0.01):
        if not (isinstance(T, int) and T >= 1):
            raise ValueError(f"RDDM needs T >= 1 steps, got {T!r}")
        if not 0 < sum_scale <= 1:
            raise ValueError(f"RDDM's sum_scale (total noise variance) must be in (0, 1], got {sum_scale}")
        self.T, self.sum_scale = int(T), float(sum_scale)
        x = torch.linspace(1, self.T, self.T, dtype=torch.float64)
        scale = 0.5 * self.T * (self.T + 1)
        self.alphas = torch.flip(x, dims=[0]) / scale  # "decreased": (T + 1 - t) / (T (T + 1) / 2)
        self.betas2 = self.sum_scale * x / scale  # "increased": sum_scale · t / (T (T + 1) / 2)
        self.alphas_cumsum = self.alphas.cumsum(0).clip(0, 1)
        self.betas2_cumsum = self.betas2.cumsum(0).clip(0, 1)
        self.betas_cumsum = self.betas2_cumsum.sqrt()

    def config(self) -> dict:
        return {"kind": self.kind, "T": self.T, "sum_scale": self.sum_scale}

    def marginal(self, x0: torch.Tensor, y0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``I_t`` given ``I_0 = x0`` and ``I_in = y0``: ``x0 + ᾱ_t (y0 - x0)``, ``β̄_t²``."""
        a = _gather(self.alphas_cumsum, t, x0)
        return x0 + a * (y0 - x0), _gather(self.betas2_cumsum, t, x0) * torch.ones_like(x0)

    def q_sample(self, x0: torch.Tensor, y0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """``I_t = x0 + ᾱ_t (y0 - x0) + β̄_t ε`` (official ``q_sample``)."""
        return x0 + _gather(self.alphas_cumsum, t, x0) * (y0 - x0) + _gather(self.betas_cumsum, t, x0) * noise

    def x0_from(self, i_t: torch.Tensor, t, res: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``I_0 = I_t - ᾱ_t I_res - β̄_t ε`` (official ``predict_start_from_res_noise``)."""
        return i_t - _gather(self.alphas_cumsum, t, i_t) * res - _gather(self.betas_cumsum, t, i_t) * noise

    def ddim_step(self, i_t: torch.Tensor, t: int, s: int, res: torch.Tensor, noise: torch.Tensor, eta: float = 0.0,
                  z: torch.Tensor | None = None) -> torch.Tensor:
        """One generalised DDIM step from index ``t`` to ``s < t`` (``s >= 0``) with predicted residual and noise;
        ``z`` is the fresh standard normal noise (needed when ``eta > 0``)."""
        a_t, a_s = float(self.alphas_cumsum[t]), float(self.alphas_cumsum[s])
        b2_t, b2_s = float(self.betas2_cumsum[t]), float(self.betas2_cumsum[s])
        sigma2 = eta * (b2_t - b2_s) * b2_s / b2_t
        out = i_t - (a_t - a_s) * res - (math.sqrt(b2_t) - math.sqrt(max(b2_s - sigma2, 0.0))) * noise
        if sigma2 > 0:
            if z is None:
                raise ValueError("eta > 0 needs the fresh noise z")
            out = out + math.sqrt(sigma2) * z
        return out

    def timesteps(self, steps: int = 10) -> list[int]:
        """Indices of a ``steps``-step sampler, ``T-1`` first, then the official ``linspace(-1, T-1, steps+1)``
        truncated to integers (``-1``, the end, not included)."""
        steps = int(steps)
        if not 1 <= steps <= self.T:
            raise ValueError(f"RDDM samples with 1 to T = {self.T} steps, got {steps}")
        times = torch.linspace(-1, self.T - 1, steps=steps + 1).int().tolist()
        return [t for t in dict.fromkeys(reversed(times)) if t >= 0]


def schedule_from_config(config: dict):
    config = dict(config)
    kind = config.pop("kind", None)
    if kind == "resshift":
        return ResShiftSchedule(**config)
    if kind == "rddm":
        return RDDMSchedule(**config)
    raise ValueError(f"restoration schedule kind must be 'resshift' or 'rddm', got {kind!r}")


@torch.no_grad()
def resshift_sample(predict_x0: Callable, y0: torch.Tensor, schedule: ResShiftSchedule, steps: int | None = None,
                    generator=None, clip: float | None = 1.0, callback: Callable | None = None,
                    noise: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """ResShift's reverse chain (official ``p_sample_loop``) on ``y0`` ``(B, C, H, W)``.

    ``predict_x0(x_t, y0, t)`` returns the ``x0`` prediction (``t``: a ``(B,)`` long tensor of 0-based indices);
    it is clipped to ``[-clip, clip]`` (official ``clip_denoised``; ``None``: no clipping). Starts at
    ``x_T = y0 + κ sqrt(η_T) n`` (``noise``: that ``n``, else drawn from ``generator``) and steps through
    ``schedule.timesteps(steps)`` with the closed-form posterior; the last step (to η = 0) is noiseless and returns
    the final ``x0`` prediction. ``callback`` gets ``{"step", "t", "x_t", "x0"}`` after each step.
    Returns ``(x0_hat, nfe)`` with ``nfe = len(timesteps)``.
    """
    ts = schedule.timesteps(steps)
    x = schedule.prior_sample(y0, _randn(y0, generator) if noise is None else noise)
    x0_hat = y0
    for k, t in enumerate(ts):
        tt = torch.full((y0.shape[0],), t, dtype=torch.long, device=y0.device)
        x0_hat = predict_x0(x, y0, tt)
        if clip is not None:
            x0_hat = x0_hat.clamp(-clip, clip)
        s = ts[k + 1] if k + 1 < len(ts) else -1
        if s < 0:
            x = x0_hat
        else:
            mean, var = schedule.posterior(x, x0_hat, t, s)
            x = mean + var.sqrt() * _randn(x, generator)
        if callback is not None:
            callback({"step": k + 1, "steps": len(ts), "t": t, "x_t": x, "x0": x0_hat})
    return x, len(ts)


@torch.no_grad()
def rddm_sample(predict: Callable, y0: torch.Tensor, schedule: RDDMSchedule, steps: int = 10, eta: float = 0.0,
                generator=None, clip: float | None = 1.0, res_clip: float | None = 2.0,
                callback: Callable | None = None, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """RDDM's generalised DDIM sampler (official ``ddim_sample``, ``use_pred_noise``) on ``y0`` ``(B, C, H, W)``.

    ``predict(I_t, y0, t)`` returns ``(I_res, ε)`` predictions. ``I_res`` is clipped to ``[-res_clip, res_clip]``
    and the ``I_0`` prediction to ``[-clip, clip]`` (the code clips both to [-1, 1]; a residual of two images in
    [-1, 1] lies in [-2, 2], hence our default 2). Starts at ``I_T = y0 + sqrt(sum_scale) ε`` (``noise``: that ε),
    ``eta = 0`` (default) is deterministic after the start. Returns ``(x0_hat, nfe)``, ``nfe = len(timesteps)``.
    """
    ts = schedule.timesteps(steps)
    img = y0 + math.sqrt(schedule.sum_scale) * (_randn(y0, generator) if noise is None else noise)
    for k, t in enumerate(ts):
        tt = torch.full((y0.shape[0],), t, dtype=torch.long, device=y0.device)
        res, eps = predict(img, y0, tt)
        if res_clip is not None:
            res = res.clamp(-res_clip, res_clip)
        x0_hat = schedule.x0_from(img, t, res, eps)
        if clip is not None:
            x0_hat = x0_hat.clamp(-clip, clip)
        s = ts[k + 1] if k + 1 < len(ts) else -1
        if s < 0:
            img = x0_hat
        else:
            z = _randn(img, generator) if eta > 0 else None
            img = schedule.ddim_step(img, t, s, res, eps, eta, z)
        if callback is not None:
            callback({"step": k + 1, "steps": len(ts), "t": t, "x_t": img, "x0": x0_hat})
    return img, len(ts)

