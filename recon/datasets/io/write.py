"""Writing any supported output: :func:`write_image` dispatches on the format to one writer."""

from __future__ import annotations

import os
from pathlib import Path

from recon.datasets.io.atomic import check_image
from recon.datasets.io.dicom_write import write_dicom_series
from recon.datasets.io.errors import ImageWriteError
from recon.datasets.io.image import MedicalImage
from recon.datasets.io.nifti import is_nifti, write_nifti
from recon.datasets.io.simple import write_npy, write_png

__all__ = ["write_image"]


def write_image(image: MedicalImage, path: str | os.PathLike, *, format: str | None = None,
                reference: MedicalImage | None = None, description: str = "recon reconstruction",
                anonymize: bool = False, overwrite: bool = False, series_number: int | None = None) -> list[str]:
    """Write ``image`` in the format given by ``format`` or the path, and return the written paths.

    ``.nii``/``.nii.gz`` (or ``format="nifti"``): :func:`write_nifti`; ``.png``: :func:`write_png` of the middle
    slice ``D // 2`` (percentile window); ``.npy``: the ``(D, H, W)`` float64 array (no geometry); a path without
    suffix (or ``format="dicom"``): :func:`write_dicom_series` into that folder, with ``reference``,
    ``description`` and ``anonymize``. Raises ImageWriteError for an unknown format.

    Args:
        image: the image.
        path: the output file (or folder, for DICOM).
        format: ``"nifti"``, ``"dicom"``, ``"png"`` or ``"npy"``; None: from the path.
        reference: for DICOM, the image it was derived from.
        description: for DICOM, the series description.
        anonymize: for DICOM, de-identify every slice.
        overwrite: replace existing outputs.
        series_number: for DICOM, the SeriesNumber.

    Returns:
        The written paths.
    """
    p = Path(os.fspath(path))
    name = p.name.lower()
    if format is not None:
        fmt = {"nii": "nifti", "nii.gz": "nifti", "nifti": "nifti", "dicom": "dicom", "dcm": "dicom",
               "png": "png", "npy": "npy", "numpy": "npy"}.get(str(format).lower().lstrip("."))
        if fmt is None:
            raise ImageWriteError(p, f"unknown format {format!r} (expected 'nifti', 'dicom', 'png' or 'npy')")
    elif is_nifti(p):
        fmt = "nifti"
    elif name.endswith(".png"):
        fmt = "png"
    elif name.endswith(".npy"):
        fmt = "npy"
    elif p.suffix == "":
        fmt = "dicom"
    else:
        raise ImageWriteError(p, f"cannot tell the output format from {p.suffix!r} (expected .nii, .nii.gz, .png, "
                                 ".npy, or a folder name without suffix for a DICOM series; or pass format=)")
    if fmt == "nifti":
        return [write_nifti(image, p, overwrite=overwrite)]
    if fmt == "dicom":
        return write_dicom_series(image, p, reference=reference, description=description, anonymize=anonymize,
                                  overwrite=overwrite, series_number=series_number)
    check_image(image, p)
    if fmt == "png":
        return [write_png(image.array[image.array.shape[0] // 2], p, overwrite=overwrite)]
    return [write_npy(image, p, overwrite)]


# ---------------------------------------------------------------------------------------------------------------
# Writing: DICOM
