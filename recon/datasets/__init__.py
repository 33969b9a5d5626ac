"""recon.datasets: files ↔ arrays with geometry (the lowest layer; it imports no other part of recon).

- :mod:`recon.datasets.io`: geometry-preserving medical I/O (DICOM series and files, NIfTI, NumPy, PNG/TIFF,
  fastMRI k-space), one module per format or direction: :func:`read_image` → :class:`MedicalImage`
  (``(D, H, W)`` float64 + RAS affine in mm), verified before it is trusted; :func:`write_image` /
  :func:`write_nifti` / :func:`write_dicom_series` / :func:`write_png`; :func:`check_plausible` (values fit the
  modality a task expects); :func:`anonymize_dataset` (PS3.15 basic profile) and :func:`redact_config` (no paths
  next to anonymised outputs).
- :mod:`recon.datasets.phantoms`: Shepp–Logan phantoms and their exact line integrals.
- :mod:`recon.datasets.slices`: 2D slices from many files for training priors, read through the same readers.
- :mod:`recon.datasets.fuzz`: the corrupted-input corpus of the reader tests and benchmark.
"""

from recon.datasets import io as _io
from recon.datasets.io import *  # noqa: F403  (the public names of recon.datasets.io, listed in its __all__)

__all__ = list(_io.__all__)
