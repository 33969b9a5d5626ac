"""Plausibility of values for a modality: a CT task needs Hounsfield units, not an MR volume or a photograph."""

from __future__ import annotations

import os

import numpy as np

from recon.datasets.io.errors import ImageReadError
from recon.datasets.io.image import MedicalImage

__all__ = ["CT_HU_RANGE", "check_plausible"]

CT_HU_RANGE = (-1100.0, 4000.0)
"""The 1st–99th percentiles of a CT image in HU lie in this range (air −1000, dense bone and contrast < 3000;
a little margin for noise and metal)."""

_PADDING_BELOW = -1100.0  # out-of-field padding (−2000, −3024, −32768 HU) is left out of the percentiles
_MODALITIES = {"ct": "CT", "mr": "MR", "mri": "MR"}


def _ct_values(image: MedicalImage) -> np.ndarray:
    """The voxel values, without the out-of-field padding of CT scanners (a constant at the image's minimum)."""
    a = image.array.ravel()
    lowest = float(a.min())
    if lowest < _PADDING_BELOW:
        inside = a[a > lowest]
        if inside.size >= a.size // 4:
            return inside
    return a


def check_plausible(image: MedicalImage, modality: str | None, path: str | os.PathLike | None = None
                    ) -> tuple[float, float]:
    """Check an image's values are plausible for the modality a task expects.

    CT: the file's own modality (DICOM) must not be another one, and the 1st and 99th percentiles of the values
    (out-of-field padding, a constant below −1100 HU, left out) must lie within :data:`CT_HU_RANGE`: an MR volume
    (values up to thousands), or anything not in Hounsfield units, is refused. MR: the file's own modality must
    not be CT. Other modalities (or None): nothing is checked.

    Args:
        image: the image as read.
        modality: what the task expects: ``"ct"``, ``"mr"``/``"mri"``, or None.
        path: the file named in the error (default: ``image.source``).

    Returns:
        The 1st and 99th percentiles of the values checked.

    Raises:
        ImageReadError: one line naming the file, the values or modality found and what was expected.
    """
    where = str(path) if path is not None else (image.source or "image")
    want = _MODALITIES.get(str(modality).lower()) if modality else None
    own = str(image.modality or "").upper() or None
    if want is not None and own in ("CT", "MR") and own != want:
        raise ImageReadError(where, f"the file's modality is {own} but the task expects {want}")
    values = _ct_values(image) if want == "CT" else image.array.ravel()
    p1, p99 = (float(v) for v in np.percentile(values, [1.0, 99.0]))
    lo, hi = CT_HU_RANGE
    if want == "CT" and (p1 < lo or p99 > hi):
        raise ImageReadError(where, f"values of {p1:.6g} to {p99:.6g} (1st–99th percentile) are not plausible CT "
                                    f"Hounsfield units (expected within {lo:g} to {hi:g} HU): not a CT image in HU?")
    return p1, p99
