"""Diffusion priors: one interface (``denoise``, ``score``, ``normalize``) over analytic, pretrained and
self-trained priors.

``DiffusionPrior`` wraps any network with its schedule (``recon.priors.schedules``: VP, VE, EDM) and
parameterization (ε, x₀, v, score, EDM); ``GaussianMixturePrior`` is the analytic ground truth with exact
posteriors; ``load_prior``/``save_prior`` read and write ``recon``'s format (safetensors + JSON model card);
``train_prior`` / ``recon train-prior`` train your own.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "DiffusionPrior": "base",
    "IntensityWindow": "base",
    "IntensityScale": "base",
    "PARAMETERIZATIONS": "base",
    "VPSchedule": "schedules",
    "VESchedule": "schedules",
    "EDMSchedule": "schedules",
    "karras_sigmas": "schedules",
    "GaussianMixturePrior": "gaussian",
    "GaussianPrior": "gaussian",
    "GaussianMixturePosterior": "gaussian",
    "bimodal_inpainting_example": "gaussian",
    "PatchGMMPrior": "patch_gmm",
    "load_prior": "io",
    "save_prior": "io",
    "TrainConfig": "train",
    "train_prior": "train",
    "sample_unconditional": "train",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"recon.priors.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'recon.priors' has no attribute {name!r}")


def __dir__():
    return __all__
