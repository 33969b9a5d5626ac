"""The acquisition parameters of the named tasks and degradations, declared once: type, range, unit and help.

``recon.tasks`` (simulation and measurement files), ``recon.restoration.degradations`` (training pairs) and the
command line (``--views``, ``--acceleration``, ...) all check values and write help from ``PARAMETERS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MU_WATER_PER_MM", "PARAMETERS", "Parameter"]


MU_WATER_PER_MM = 0.0192  # linear attenuation of water at ~70 keV effective energy, mm⁻¹ (HU ↔ μ of the CT tasks)


@dataclass(frozen=True)
class Parameter:
    """One acquisition parameter.

    Attributes:
        name: the argument name (the command line's flag is ``--name`` with dashes).
        kind: ``int``, ``float`` or ``str``.
        help: one line for ``--help``.
        low: lower bound (None: none); inclusive when ``low_inclusive``.
        high: upper bound (None: none); inclusive when ``high_inclusive``.
        low_inclusive: whether ``low`` itself is allowed.
        high_inclusive: whether ``high`` itself is allowed.
        choices: the allowed strings of a ``str`` parameter.
        unit: printed after the value in messages and help.
    """

    name: str
    kind: type
    help: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = False
    high_inclusive: bool = True
    choices: tuple[str, ...] | None = None
    unit: str = ""

    def check(self, value: object) -> int | float | str:
        """``value`` as ``kind`` if it is valid, else ``ValueError`` naming the argument and what was expected."""
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise ValueError(f"{self.name} must be one of {', '.join(self.choices or ())}, got {value!r}")
            return value
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if number and self.kind is int:
            number = float(value).is_integer()
        if not (number and self._in_range(float(value))):
            raise ValueError(f"{self.name} must be {self.expected()}, got {value!r}")
        return int(value) if self.kind is int else float(value)

    def _in_range(self, v: float) -> bool:
        above = self.low is None or (v >= self.low if self.low_inclusive else v > self.low)
        below = self.high is None or (v <= self.high if self.high_inclusive else v < self.high)
        return above and below

    def expected(self) -> str:
        """What a valid value is, in words (``"an integer >= 1"``, ``"a number in (0, 180] degrees"``)."""
        what = "an integer" if self.kind is int else "a number"
        unit = f" {self.unit}" if self.unit else ""
        if self.low is not None and self.high is not None:
            lo, hi = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
            return f"{what} in {lo}{self.low:g}, {self.high:g}{hi}{unit}"
        if self.low is not None:
            return f"{what} {'>=' if self.low_inclusive else '>'} {self.low:g}{unit}"
        return what + unit


_MASKS = ("random", "equispaced", "equispaced_fraction", "poisson", "gaussian")

PARAMETERS: dict[str, Parameter] = {p.name: p for p in (
    Parameter("views", int, "number of projection views", low=1, low_inclusive=True),
    Parameter("arc", float, "angular range of a limited-angle scan", low=0, high=180, unit="degrees"),
    Parameter("acceleration", float, "MRI undersampling factor R", low=1, low_inclusive=True),
    Parameter("mask_type", str, "MRI sampling mask (random: fastMRI 1D columns)", choices=_MASKS),
    Parameter("center_fraction", float, "MRI fully sampled centre fraction (default: fastMRI's for R)", low=0,
              high=1),
    Parameter("coils", int, "MRI receive coils (1: single coil; N > 1: SENSE with simulated maps)", low=1,
              low_inclusive=True),
    Parameter("fwhm", float, "Gaussian blur FWHM", low=0, unit="mm"),
    Parameter("fwhm_z", float, "blur FWHM along z for volumes (0: in-plane only)", low=0, low_inclusive=True,
              unit="mm"),
    Parameter("missing", float, "inpainting: fraction of missing pixels", low=0, high=1, low_inclusive=True,
              high_inclusive=False),
    Parameter("keep_every", int, "inpainting: keep every k-th slice (rows in 2D) instead of random pixels", low=1,
              low_inclusive=True),
    Parameter("factor", int, "super-resolution factor (in-plane for images, through-plane for volumes)", low=1,
              low_inclusive=True),
    Parameter("photons", float, "CT: photons per detector element (Beer–Lambert noise)", low=0),
    Parameter("noise", float, "additive Gaussian noise, std relative to the measurement RMS", low=0),
)}
