"""A restorer: a conditional network with its ResShift or RDDM schedule, degradation and intensity window.

The network is ``recon.ConditionedUNet`` (``recon.priors.networks``) with two input channels, the diffusion
state and the degraded image ``y0`` (concatenated, as both official codes do), conditioned on the 0-based time
index (``cond_scale = 1``: integer steps into MONAI's sinusoidal embedding, as DDPM-style U-Nets). ResShift: one
output channel, the ``x0`` prediction. RDDM: two output channels, the residual ``I_res = y0 - x0`` and the noise
ε (the official ``UnetRes`` has two decoders or two U-Nets; here one U-Net with two output channels shares
everything but the last convolution).

Images: ``(B, 1, H, W)`` in the normalised range ``[-1, 1]`` (``normalize``/``denormalize`` convert from/to HU
for CT, the intensity window recorded in the model card); volumes ``(D, H, W)`` go slice by slice in chunks
(:meth:`Restorer.restore_array`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recon.restoration.degradations import Degradation
from recon.restoration.schedules import RDDMSchedule, ResShiftSchedule, rddm_sample, resshift_sample

__all__ = ["MODELS", "Restorer", "restorer_architecture"]

MODELS = ("resshift", "rddm")
DEFAULT_SAMPLING_STEPS = {"resshift": None, "rddm": 10}  # None: all T steps (ResShift's official sampler)


def restorer_architecture(model: str, channels=(32, 48, 64), num_res_blocks: int = 1) -> dict:
    """The ``{"name", "args"}`` network description for ``model`` (``recon.priors.networks.build_network``)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    channels = [int(c) for c in channels]
    return {"name": "recon.ConditionedUNet",
            "args": {"spatial_dims": 2, "in_channels": 2, "out_channels": 1 if model == "resshift" else 2,
                     "channels": channels, "num_res_blocks": int(num_res_blocks),
                     "norm_num_groups": min(16, math.gcd(*channels)), "cond_scale": 1.0}}


class Restorer(nn.Module):
    """A trained (or untrained) restoration diffusion model.

    Args:
        network: ``net(torch.cat([state, y0], 1), t.float())`` → ``(B, 1 or 2, H, W)``.
        schedule: ``ResShiftSchedule`` or ``RDDMSchedule`` (its ``kind`` names the model).
        degradation: the ``Degradation`` it was trained to undo (used by ``--degrade``).
        intensity: a ``recon.priors.base`` intensity map (``IntensityWindow`` for CT, ``IntensityScale`` for MRI
            magnitude), physical units ↔ ``[-1, 1]``.
        sampling_steps: default sampler steps (ResShift: None = all T; RDDM: 10).
        eta: RDDM's DDIM η (default 0, deterministic as the official conditional sampler).
        card: the model card (free-form dict; ``path`` is where it was loaded from).
    """

    def __init__(self, network: nn.Module, schedule, degradation: Degradation, intensity, sampling_steps=None,
                 eta: float = 0.0, card: dict | None = None, architecture: dict | None = None):
        super().__init__()
        if not isinstance(schedule, (ResShiftSchedule, RDDMSchedule)):
            raise TypeError(f"schedule must be a ResShiftSchedule or RDDMSchedule, got {type(schedule).__name__}")
        self.network = network
        self.schedule = schedule
        self.kind = schedule.kind
        self.degradation = degradation
        self.intensity = intensity
        if sampling_steps is None:
            sampling_steps = DEFAULT_SAMPLING_STEPS[self.kind] or schedule.T
        self.sampling_steps = int(sampling_steps)
        self.eta = float(eta)
        self.card = dict(card or {})
        self.architecture = architecture

    # ------------------------------------------------------------------------------------------ network calls
    def predict_x0(self, x_t: torch.Tensor, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ResShift: the ``x0`` prediction from ``x_t`` (input-scaled as the official code), ``y0`` and ``t``."""
        x_in = torch.cat([self.schedule.scale_input(x_t, t), y0], dim=1)
        return self.network(x_in, t.to(x_t.dtype))

    def predict_res_noise(self, i_t: torch.Tensor, y0: torch.Tensor, t: torch.Tensor):
        """RDDM: the residual and noise predictions ``(I_res, ε)`` from ``I_t``, ``y0`` and ``t``."""
        out = self.network(torch.cat([i_t, y0], dim=1), t.to(i_t.dtype))
        return out[:, :1], out[:, 1:2]

    def training_loss(self, x0: torch.Tensor, y0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The official training loss on a batch of clean ``x0`` and degraded ``y0`` ``(B, 1, H, W)``: ``t``
        uniform on ``0 … T-1`` and the noise drawn from ``generator`` (CPU). ResShift: MSE on ``x0`` (the
        conference setting, ``weighted_mse`` off). RDDM: L1 on the residual plus L1 on the noise."""
        b = x0.shape[0]
        t = torch.randint(self.schedule.T, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        state = self.schedule.q_sample(x0, y0, t, noise)
        if self.kind == "resshift":
            return F.mse_loss(self.predict_x0(state, y0, t).float(), x0)
        res, eps = self.predict_res_noise(state, y0, t)
        return F.l1_loss(res.float(), y0 - x0) + F.l1_loss(eps.float(), noise)

    @torch.no_grad()
    def restore(self, y0: torch.Tensor, steps: int | None = None, generator=None, eta: float | None = None,
                callback: Callable | None = None) -> tuple[torch.Tensor, int]:
        """Restore normalised degraded images ``y0`` ``(B, 1, H, W)``; returns ``(x0_hat, nfe)`` (normalised).

        ``steps``: sampler steps (default ``sampling_steps``); ``generator``: one CPU generator or one per batch
        element; ``eta``: RDDM's DDIM η (default the restorer's, 0)."""
        steps = self.sampling_steps if steps is None else steps
        if self.kind == "resshift":
            return resshift_sample(self.predict_x0, y0, self.schedule, steps, generator, callback=callback)
        eta = self.eta if eta is None else float(eta)
        return rddm_sample(self.predict_res_noise, y0, self.schedule, steps, eta, generator, callback=callback)

    # -------------------------------------------------------------------------------------- physical units
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Physical units → ``[-1, 1]`` (clipped, as the training images)."""
        return self.intensity.normalize(x).clamp(-1, 1)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.intensity.denormalize(x)

    @property
    def is_ct(self) -> bool:
        return getattr(self.intensity, "unit", None) == "HU"

    def _device(self) -> torch.device:
        p = next(self.network.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _chunks(self, depth: int, hw: int, chunk: int | None) -> list[range]:
        n = chunk or max(1, int(self.card.get("max_batch_pixels", 2**20)) // max(hw, 1))
        return [range(i, min(depth, i + n)) for i in range(0, depth, n)]

    def _set_scale(self, array: np.ndarray) -> None:
        """Data-scaled (MRI) intensity: one scale for the whole volume, from the input (as at training)."""
        from recon.priors.base import IntensityScale

        if isinstance(self.intensity, IntensityScale):
            self.intensity.scale = None
            self.intensity.normalize(torch.from_numpy(np.abs(array)))

    def degrade_array(self, array: np.ndarray, seed: int = 0) -> np.ndarray:
        """Apply the model's own degradation to a ``(D, H, W)`` physical-unit array slice by slice (slice ``d``
        with a generator seeded ``seed * 100003 + d``); returns ``(D, H, W)`` float64 in the same units."""
        self._set_scale(array)
        out = np.empty(array.shape, dtype=np.float64)
        for d in range(array.shape[0]):
            x = self.normalize(torch.from_numpy(np.ascontiguousarray(array[d])).double()).float()
            g = torch.Generator().manual_seed(int(seed) * 100003 + d)
            out[d] = self.denormalize(self.degradation(x[None], g)[0].double()).numpy()
        return out

    @torch.no_grad()
    def restore_array(self, array: np.ndarray, steps: int | None = None, seed: int = 0, chunk: int | None = None,
                      eta: float | None = None, callback: Callable | None = None) -> tuple[np.ndarray, int]:
        """Restore a ``(D, H, W)`` physical-unit array slice by slice, in chunks of ``chunk`` slices (default:
        about ``max_batch_pixels`` = 2²⁰ pixels per network call). Slice ``d``'s noise comes from a generator
        seeded ``seed * 100003 + d``, so the noise does not depend on the chunking (results agree up to the
        float32 rounding of batched convolutions). Returns ``(restored, nfe)``
        with ``nfe`` the network evaluations per slice (the sampler's steps; as ``recon reconstruct`` counts a
        volume's denoiser calls)."""
        if array.ndim != 3:
            raise ValueError(f"restore_array takes a (D, H, W) array, got shape {array.shape}")
        self._set_scale(array)
        dev = self._device()
        out = np.empty(array.shape, dtype=np.float64)
        nfe = 0
        for rows in self._chunks(array.shape[0], array.shape[1] * array.shape[2], chunk):
            y = torch.from_numpy(np.ascontiguousarray(array[rows.start : rows.stop])).double()
            y0 = self.normalize(y).float()[:, None].to(dev)
            gens = [torch.Generator().manual_seed(int(seed) * 100003 + d) for d in rows]
            x, n = self.restore(y0, steps, gens, eta, callback)
            out[rows.start : rows.stop] = self.denormalize(x[:, 0].double().cpu()).numpy()
            nfe = n
        return out, nfe
