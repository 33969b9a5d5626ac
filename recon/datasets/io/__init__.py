"""Geometry-preserving medical image I/O: DICOM series and files, NIfTI, NumPy, PNG/TIFF, fastMRI k-space.

Every reader returns a :class:`MedicalImage`: the voxel values, always as a float64 array of shape ``(D, H, W)``
(D slices, H rows, W columns; a 2D image has ``D = 1``), and a 4×4 ``affine`` that maps voxel indices to
world coordinates in millimetres (RAS+, the NIfTI/nibabel convention). Writers turn it into NIfTI, a DICOM
series (derived from the original series, so that it opens next to it in a viewer), PNG or NumPy.

One module per format or direction:

- :mod:`.read` (:func:`read_image`, :func:`list_series`) dispatches to :mod:`.dicom_read` (one DICOM object into
  rescaled frames), :mod:`.dicom_series` (folders, series, volume assembly), :mod:`.nifti` (NIfTI, verified) and
  :mod:`.simple` (NumPy, PNG, TIFF); :mod:`.fastmri` reads fastMRI k-space.
- :mod:`.write` (:func:`write_image`) dispatches to :mod:`.nifti`, :mod:`.dicom_write` and :mod:`.simple`, all
  through :mod:`.atomic`; :mod:`.deidentify` holds the DICOM de-identification and :func:`redact_config`.
- :mod:`.image` holds :class:`MedicalImage`; :mod:`.errors` the two error types; :mod:`.checks`
  :func:`check_plausible`.

Conventions
-----------
- World frame: RAS+ scanner coordinates in mm, the NIfTI/nibabel convention: +x towards the patient's
  **R**ight, +y **A**nterior, +z **S**uperior. DICOM stores positions in LPS+ (+x Left, +y Posterior,
  +z Superior), so ``ras = diag(-1, -1, 1) @ lps`` (:data:`LPS_TO_RAS`).
- Voxel centres: the world position of the *centre* of the voxel ``array[d, h, w]`` is
  ``affine @ [w, h, d, 1]``. Column 0 of the affine is the step along W (one column), column 1 the step along
  H (one row), column 2 the step along D (one slice), column 3 the centre of voxel ``[0, 0, 0]``.
  This is exactly nibabel's convention with NIfTI indices ``(i, j, k) = (w, h, d)``: a NIfTI volume ``data``
  becomes ``array = data.transpose(2, 1, 0)`` with the *same* affine.
- DICOM slices are ordered by their position along the slice normal ``n = r × c`` (``r``, ``c``: the row and
  column direction cosines of ImageOrientationPatient), ascending, never by InstanceNumber. Column 2 of the
  affine is the step between consecutive slice positions (for a gantry-tilted CT it is not perpendicular to the
  slices; the affine is then sheared and still exact).
- Values: CT in Hounsfield units after RescaleSlope/RescaleIntercept (``unit == "HU"``); other modalities with
  their rescale applied where present (``unit is None``).

Errors
------
Every problem with an input becomes :class:`ImageReadError` (a ``ValueError``) whose one-line message is
``"PATH: what is wrong (what was expected)"``; problems with an output become :class:`ImageWriteError`.
Inputs are verified before they are trusted (checksums of gzip streams, sizes implied by headers against the
file size before anything is allocated, dimensions, spacings and rescale parameters, every page and frame
present). Inputs are never modified. Writes are atomic (a temporary file in the target folder, then
``os.replace``), an existing output is never replaced unless ``overwrite=True``, and a failed write leaves nothing
behind.

Only numpy is imported with this package; pydicom, nibabel, Pillow/tifffile and h5py are imported when needed.
"""

from __future__ import annotations

import os  # noqa: F401  (tests patch os.replace through this module, as before the split)

from recon.datasets.io.atomic import atomic_write_bytes
from recon.datasets.io.checks import CT_HU_RANGE, check_plausible
from recon.datasets.io.deidentify import anonymize_dataset, redact_config
from recon.datasets.io.dicom_read import has_dicom_preamble
from recon.datasets.io.dicom_series import SPACING_RTOL
from recon.datasets.io.errors import ImageReadError, ImageWriteError
from recon.datasets.io.fastmri import read_fastmri
from recon.datasets.io.image import LPS_TO_RAS, MedicalImage, SeriesInfo
from recon.datasets.io.nifti import write_nifti
from recon.datasets.io.read import list_series, read_image
from recon.datasets.io.simple import write_png
from recon.datasets.io.write import write_dicom_series, write_image

__all__ = [
    "CT_HU_RANGE",
    "LPS_TO_RAS",
    "SPACING_RTOL",
    "ImageReadError",
    "ImageWriteError",
    "MedicalImage",
    "SeriesInfo",
    "anonymize_dataset",
    "atomic_write_bytes",
    "check_plausible",
    "has_dicom_preamble",
    "list_series",
    "read_fastmri",
    "read_image",
    "redact_config",
    "write_dicom_series",
    "write_image",
    "write_nifti",
    "write_png",
]
