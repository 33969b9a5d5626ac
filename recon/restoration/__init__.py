"""Few-step restoration diffusion: ResShift and RDDM, trained on ``recon``'s own degradations.

Unlike the posterior samplers of ``recon.samplers`` (an unconditional prior plus a measurement model), a restorer is
a *supervised, task-specific* conditional model: trained on clean/degraded pairs of one degradation, it maps a
degraded image (e.g. a low-dose FBP) to a restored one in 4–15 network evaluations, starting its reverse chain at
the degraded image itself.

- ``recon.restoration.schedules``: ``ResShiftSchedule`` (η schedule, forward process, closed-form posterior, prior)
  and ``resshift_sample``; ``RDDMSchedule`` (α/β² schedules, forward process, DDIM step) and ``rddm_sample``.
- ``recon.restoration.degradations``: ``Degradation`` (``lowdose-ct``, ``sparse-view-ct``, ``super-resolution``)
  built from ``ParallelBeamCT``, ``TransmissionPoissonNoise`` and ``Downsampling``.
- ``recon.restoration.model``: ``Restorer`` (network + schedule + degradation + intensity window).
- ``recon.restoration.train``: ``RestorerConfig``, ``train_restorer`` (``recon train-restorer``), presets.
- ``recon.restoration.io``: ``save_restorer`` / ``load_restorer`` (safetensors + JSON model card).
- ``recon.restoration.files``: ``restore_file`` (``recon restore``).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ResShiftSchedule": "schedules",
    "RDDMSchedule": "schedules",
    "resshift_sample": "schedules",
    "rddm_sample": "schedules",
    "Degradation": "degradations",
    "DEGRADATIONS": "degradations",
    "Restorer": "model",
    "RestorerConfig": "train",
    "train_restorer": "train",
    "default_lowdose_ct_config": "train",
    "evaluate_restorer": "train",
    "load_restorer": "io",
    "save_restorer": "io",
    "restore_file": "files",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"recon.restoration.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'recon.restoration' has no attribute {name!r}")


def __dir__():
    return __all__
