"""fastMRI k-space files (HDF5, h5py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from recon.datasets.io.dicom_series import python_value
from recon.datasets.io.errors import ImageReadError, one_line

__all__ = ["read_fastmri"]


def read_fastmri(path: str | os.PathLike) -> dict:
    """Read an HDF5 file in the fastMRI layout.

    Returns a dict:
        ``"kspace"``: complex ndarray as stored, ``(slices, H, W)`` single-coil or ``(slices, coils, H, W)``
        multi-coil (H: readout, usually 2× oversampled; W: phase encode);
        ``"mask"``: the stored sampling mask (test/challenge files) or None;
        ``"attrs"``: the file's attributes as Python values (``acquisition``, ``max``, ``norm``, ``patient_id``,
        ``acceleration``, ...; ``patient_id`` is a hash in the public data set);
        ``"reconstruction"``: ``reconstruction_rss`` (multi-coil) or ``reconstruction_esc`` (single-coil) target
        magnitude images, or None;
        ``"ismrmrd_header"``: the ISMRMRD XML header as text, or None.

    Args:
        path: the ``.h5`` file.

    Returns:
        The dict above.

    Raises:
        ImageReadError: a missing file, a file that is not HDF5, no ``kspace`` dataset, k-space that is not
            complex or not 3D/4D, or NaN/infinite k-space values.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise ImageReadError(p, "no such file or folder")
    if p.is_dir():
        raise ImageReadError(p, "is a folder (expected a fastMRI .h5 file)")
    import h5py

    try:
        f = h5py.File(p, "r")
    except Exception as err:
        raise ImageReadError(p, f"not a readable HDF5 file ({one_line(err)}; expected a fastMRI .h5 file)") from err
    try:
        with f:
            if "kspace" not in f:
                raise ImageReadError(p, f"no 'kspace' dataset (found {sorted(f.keys())}; expected the fastMRI layout)")
            kspace = np.asarray(f["kspace"][()])
            mask = np.asarray(f["mask"][()]) if "mask" in f else None
            recon = None
            for key in ("reconstruction_rss", "reconstruction_esc", "reconstruction"):
                if key in f:
                    recon = np.asarray(f[key][()])
                    break
            header = None
            if "ismrmrd_header" in f:
                raw = f["ismrmrd_header"][()]
                header = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            attrs = {k: python_value(v) for k, v in f.attrs.items()}
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(p, f"unreadable HDF5 content ({type(err).__name__}: {one_line(err)})") from err
    if not np.iscomplexobj(kspace):
        raise ImageReadError(p, f"'kspace' has dtype {kspace.dtype} (expected complex values)")
    if kspace.ndim not in (3, 4):
        raise ImageReadError(p, f"'kspace' has shape {kspace.shape} (expected (slices, [coils,] H, W))")
    if not np.isfinite(kspace).all():
        raise ImageReadError(p, "'kspace' contains NaN or infinite values (expected finite values)")
    return {"kspace": kspace, "mask": mask, "attrs": attrs, "reconstruction": recon, "ismrmrd_header": header}
