"""Differentiable forward operators, all ``deepinv.physics.LinearPhysics`` subclasses.

Shapes are ``(B, C, H, W)`` for images and ``(B, C, D, H, W)`` for volumes; geometry is in mm. See
``recon.operators._base`` for the conventions every operator shares. Names are imported lazily so that
``import recon.operators`` stays fast.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ParallelBeamCT": "ct",
    "FanBeamCT": "ct",
    "ConeBeamCT": "ct",
    "TransmissionPoissonNoise": "noise",
    "post_log_variance": "noise",
    "WeightedPhysics": "weighted",
    "CartesianMRI": "mri",
    "MultiCoilMRI": "mri",
    "random_mask": "masks",
    "equispaced_mask": "masks",
    "poisson_disc_mask": "masks",
    "gaussian_mask": "masks",
    "simulate_coil_maps": "coils",
    "estimate_coil_maps": "coils",
    "Blur": "blur",
    "gaussian_kernel": "blur",
    "motion_kernel": "blur",
    "Inpainting": "inpainting",
    "random_pixel_mask": "inpainting",
    "box_mask": "inpainting",
    "missing_slice_mask": "inpainting",
    "Downsampling": "downsampling",
    "PARAMETERS": "parameters",
    "Parameter": "parameters",
    "MU_WATER_PER_MM": "parameters",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"recon.operators.{_LAZY[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'recon.operators' has no attribute {name!r}")


def __dir__():
    return __all__
