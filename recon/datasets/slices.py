"""2D slices in physical units from a mix of medical and plain image files, for training priors.

Every file is read through the readers of :mod:`recon.datasets.io` (the ones reconstruction uses), so training and
reconstruction read the same file the same way: the same rescale order for DICOM (enhanced multi-frame functional
groups first, then the top level), the same checks (gzip checksums, header sizes, rescale parameters, every
page/frame present), the same refusals. Supported: DICOM (single and multi-frame; rescale applied, HU for CT),
NIfTI (``.nii``, ``.nii.gz``; 3D or 4D), PNG/TIFF (grayscale; RGB becomes luminance), NumPy (``.npy``; ``.npz``:
every 2D/3D array; 3D arrays are slices along the first axis). Folders are searched recursively.

Slices are taken from the ``(D, H, W)`` arrays the readers return, so a slice is oriented exactly as
reconstruction sees it (``H`` rows, ``W`` columns).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from recon.datasets.io.dicom_read import read_dicom_object
from recon.datasets.io.errors import ImageReadError, one_line
from recon.datasets.io.nifti import is_nifti, load_nifti_data
from recon.datasets.io.simple import PICTURE_SUFFIXES, load_numpy_arrays, read_picture

__all__ = ["SliceReadError", "find_files", "read_slices"]

_NUMPY_EXT = (".npy", ".npz")


class SliceReadError(ImageReadError):
    """A training file could not be read; ``path`` names it and the one-line message says why (an
    :class:`~recon.datasets.io.ImageReadError`, so one ``except`` catches both)."""


def find_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, hidden files skipped) into a sorted list of files.

    Args:
        paths: files and folders.

    Returns:
        The files, folders expanded in sorted order.
    """
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.parts))
        else:
            out.append(p)
    return out


def _nifti_slices(path: Path, axes: Sequence[int]) -> list[np.ndarray]:
    data, _ = load_nifti_data(path, allow_4d=True)
    volumes = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
    slices = []
    for vol in volumes:
        dhw = vol.transpose(2, 1, 0)  # NIfTI (i, j, k) → (D, H, W), as read_image returns it
        if len(volumes) > 1:  # a time series: axial slices of every volume
            slices += list(dhw)
            continue
        slices += [np.take(dhw, k, axis=2 - ax) for ax in axes for k in range(dhw.shape[2 - ax])]
    return slices


def _numpy_slices(path: Path) -> list[np.ndarray]:
    slices: list[np.ndarray] = []
    for a in load_numpy_arrays(path).values():
        if a.ndim == 2:
            slices.append(a)
        elif a.ndim == 3:
            slices += list(a)
    if not slices:
        raise ImageReadError(path, "no 2D or 3D array inside")
    return slices


def _file_slices(path: Path, axes: Sequence[int]) -> list[np.ndarray]:
    suffix = path.suffix.lower()
    if is_nifti(path):
        return _nifti_slices(path, axes)
    if suffix in PICTURE_SUFFIXES:
        return list(read_picture(path).array)
    if suffix in _NUMPY_EXT:
        return _numpy_slices(path)
    return [frame.pixels for frame in read_dicom_object(path)]


def read_slices(path: str | os.PathLike, axes: Sequence[int] = (2,)) -> Iterator[np.ndarray]:
    """Yield the 2D float64 slices of one file in physical units.

    Args:
        path: the file.
        axes: for NIfTI volumes, the NIfTI axes to slice along (``(2,)``: the third axis, usually axial;
            ``(0, 1, 2)``: all three orientations, an augmentation for 2D priors used on volumes).

    Returns:
        An iterator over ``(H, W)`` slices.

    Raises:
        SliceReadError: the file cannot be read (its one-line reason), a slice smaller than 8 pixels, NaN or
            infinite values.
    """
    path = Path(path)
    try:
        slices = _file_slices(path, axes)
    except ImageReadError as err:
        raise SliceReadError(err.path, err.reason) from err
    except Exception as err:  # any library error becomes one line naming the file
        raise SliceReadError(path, f"unreadable ({type(err).__name__}: {one_line(err)})") from err
    for s in slices:
        if s.ndim != 2 or min(s.shape) < 8:
            raise SliceReadError(path, f"slice of shape {s.shape} is not a 2D image")
        if not np.isfinite(s).all():
            raise SliceReadError(path, "contains NaN or infinite values")
        yield s
