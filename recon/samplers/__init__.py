"""Posterior samplers behind one interface: ``reconstruct(physics, y, prior, method=...)``.

See ``recon.samplers.base`` for the conventions every sampler follows.
"""

from __future__ import annotations

from recon.samplers.base import (
    METHODS,
    ReconstructionResult,
    SamplerDivergence,
    check_bounded,
    check_finite,
    data_residual,
    reconstruct,
)
from recon.samplers.registry import MethodSpec, OptionError, get_method, recommended_method
from recon.samplers.tsmc import sample_tsmc

__all__ = [
    "METHODS",
    "MethodSpec",
    "OptionError",
    "ReconstructionResult",
    "SamplerDivergence",
    "check_bounded",
    "check_finite",
    "data_residual",
    "get_method",
    "recommended_method",
    "reconstruct",
    "sample_tsmc",
]
