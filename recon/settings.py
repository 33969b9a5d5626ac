"""The one settings object of a file-to-file run: ``recon reconstruct`` / ``batch`` / ``restore`` and their Python
calls (``reconstruct_file``, ``run_batch``, ``restore_file``) all take a ``Settings``, plus keyword overrides.

It imports nothing from ``recon``: every layer may use it. Values are checked where they are used (the method and
its options by the registry, task parameters by ``recon.operators.PARAMETERS``, the device by
``recon.utils.resolve_device``); here only the names are, so a misspelt setting is one error naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["RECONSTRUCTION_FIELDS", "RESTORATION_FIELDS", "Settings", "SettingsError"]


class SettingsError(ValueError):
    """A setting that does not exist, named with the valid ones."""


@dataclass(frozen=True)
class Settings:
    """How to read, run and write one study.

    Attributes:
        method: reconstruction method (``recon.samplers.registry.METHODS``; None: the recommended one).
        prior: ``default`` (by modality), a built-in prior's name or a prior folder.
        steps: sampler (or restorer) steps; None: the method's default.
        particles: particles / independent samples; None: the method's default.
        seed: seeds every random draw (simulated noise, masks, sampler noise).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        format: ``dicom`` for a derived DICOM series (also chosen by an output path without suffix), else None.
        series: which DICOM series of a folder (index, UID or description).
        on_irregular: DICOM series with uneven spacing: ``error`` or ``resample``.
        reference: a ground-truth image (metrics, error map, DICOM headers).
        task: simulate this task on an image input (``recon.tasks.TASK_TABLE``); None: the input is a measurement.
        task_params: the task's parameters (``views``, ``acceleration``, ...).
        photons: CT Beer–Lambert noise (photons per detector element).
        noise: Gaussian noise, std relative to the measurement RMS.
        options: the method's own options (``recon methods NAME``).
        anonymize: DICOM basic de-identification of written DICOM, and redacted companions.
        memory_budget: bytes of network activations per call (slices go through in chunks).
        uncertainty: write the uncertainty maps (std, interval bounds at this nominal coverage, e.g. 0.9, and the
            null-space map: what the prior supplied); None: the std map only, where the method has one.
        calibration: a conformal calibration file (``recon calibrate``) that scales the intervals.
        model: restorer (``recon restore``): ``default`` or a restorer folder.
        eta: RDDM's DDIM η (``recon restore``).
        degrade: apply the restorer's own degradation first (a simulation study; the input is the reference).
        chunk: slices per restorer call.
    """

    method: str | None = None
    prior: str = "default"
    steps: int | None = None
    particles: int | None = None
    seed: int = 0
    device: str = "cpu"
    format: str | None = None
    series: str | int | None = None
    on_irregular: str = "error"
    reference: str | None = None
    task: str | None = None
    task_params: dict = field(default_factory=dict)
    photons: float | None = None
    noise: float | None = None
    options: dict = field(default_factory=dict)
    anonymize: bool = False
    memory_budget: float | None = None
    uncertainty: float | None = None
    calibration: str | None = None
    model: str = "default"
    eta: float | None = None
    degrade: bool = False
    chunk: int | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], base: Settings | None = None) -> Settings:
        """``base`` (default: the defaults) with ``values`` set; None values keep ``base``'s (an unset flag)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - names):
            raise SettingsError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                                f"(settings: {', '.join(sorted(names))})")
        given = {k: v for k, v in values.items() if v is not None}
        for key in ("task_params", "options"):
            if key in given:
                given[key] = dict(given[key])
        return dataclasses.replace(base or cls(), **given)

    def to_dict(self, fields: tuple[str, ...] | None = None) -> dict:
        """The settings as a plain dict (``fields``: only those)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: out[k] for k in fields} if fields is not None else out


RESTORATION_FIELDS = ("model", "eta", "degrade", "chunk")
RECONSTRUCTION_FIELDS = tuple(f.name for f in dataclasses.fields(Settings) if f.name not in RESTORATION_FIELDS)
