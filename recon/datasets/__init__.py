"""recon.datasets: files ↔ arrays with geometry (the lowest layer; it imports no other part of recon).

- :mod:`recon.datasets.io`: geometry-preserving medical I/O (DICOM series and files, NIfTI, NumPy, PNG/TIFF,
  fastMRI k-space): :func:`read_image` → :class:`MedicalImage` (``(D, H, W)`` float64 + RAS affine in mm),
  :func:`write_image` / :func:`write_nifti` / :func:`write_dicom_series` / :func:`write_png`.
- :mod:`recon.datasets.phantoms`: Shepp–Logan phantoms and their exact line integrals.
- :mod:`recon.datasets.slices`: pixel-only 2D slices from many files, for training priors.
"""

from recon.datasets import io as _io
from recon.datasets.io import *  # noqa: F403  (the public names of recon.datasets.io, listed in its __all__)

__all__ = list(_io.__all__)
