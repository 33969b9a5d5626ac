"""2D slices in physical units from a mix of medical and plain image files, for training priors.

This reads pixels only (HU for CT after the DICOM rescale); geometry-preserving I/O for reconstruction lives
with the command line's readers. Supported: DICOM (single and multi-frame; CT rescale applied), NIfTI
(``.nii``, ``.nii.gz``; slices along the third axis), PNG/TIFF (grayscale), NumPy (``.npy``; ``.npz``: every
2D/3D array; 3D arrays are slices along the first axis). Folders are searched recursively.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = ["SliceReadError", "find_files", "read_slices"]

_IMAGE_EXT = (".png", ".tif", ".tiff")
_NUMPY_EXT = (".npy", ".npz")


class SliceReadError(ValueError):
    """A training file could not be read; ``path`` names it and the message says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        super().__init__(f"{path}: {reason}")


def find_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, hidden files skipped) into a sorted list of files."""
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


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_slices(path: str | os.PathLike, axes: Sequence[int] = (2,)) -> Iterator[np.ndarray]:
    """Yield the 2D float64 slices of one file in physical units. Raises ``SliceReadError``.

    ``axes``: for NIfTI volumes, the array axes to slice along (``(2,)``: the third axis, usually axial;
    ``(0, 1, 2)``: all three orientations, an augmentation for 2D priors used on volumes).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if _is_nifti(path):
            import nibabel as nib

            data = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))
            if data.ndim == 2:
                data = data[:, :, None]
            if data.ndim == 4:
                data = data.reshape(*data.shape[:3], -1).transpose(3, 0, 1, 2).reshape(-1, *data.shape[1:3])
                slices = list(data)
            elif data.ndim == 3:
                slices = [np.take(data, k, axis=ax) for ax in axes for k in range(data.shape[ax])]
            else:
                raise SliceReadError(path, f"NIfTI with {data.ndim} dimensions is not supported")
        elif suffix in _IMAGE_EXT:
            from skimage.io import imread

            img = np.asarray(imread(str(path)), dtype=np.float64)
            if img.ndim == 3:  # RGB(A) → luminance
                img = img[..., :3].mean(-1)
            slices = [img]
        elif suffix in _NUMPY_EXT:
            arrays = [np.load(path)] if suffix == ".npy" else list(np.load(path).values())
            slices = []
            for a in arrays:
                a = np.asarray(a, dtype=np.float64)
                if a.ndim == 2:
                    slices.append(a)
                elif a.ndim == 3:
                    slices += list(a)
            if not slices:
                raise SliceReadError(path, "no 2D or 3D array inside")
        else:
            slices = _dicom_slices(path)
    except SliceReadError:
        raise
    except Exception as err:  # any library error becomes one line naming the file
        reason = " ".join(str(err).split())  # one line, whatever the library printed
        raise SliceReadError(path, f"unreadable ({type(err).__name__}: {reason})") from err
    for s in slices:
        if s.ndim != 2 or min(s.shape) < 8:
            raise SliceReadError(path, f"slice of shape {s.shape} is not a 2D image")
        if not np.isfinite(s).all():
            raise SliceReadError(path, "contains NaN or infinite values")
        yield s


def _dicom_slices(path: Path) -> list[np.ndarray]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError as err:
        raise SliceReadError(path, "not a DICOM file (and not NIfTI, PNG/TIFF or NumPy)") from err
    if "PixelData" not in ds:
        raise SliceReadError(path, "DICOM file without pixel data")
    arr = np.asarray(ds.pixel_array, dtype=np.float64)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if arr.ndim == 3 and frames > 1:
        return [arr[k] * _rescale(ds, k)[0] + _rescale(ds, k)[1] for k in range(frames)]
    if arr.ndim != 2:
        raise SliceReadError(path, f"unsupported DICOM pixel array of shape {arr.shape}")
    slope, intercept = _rescale(ds, 0)
    return [arr * slope + intercept]


def _rescale(ds, frame: int) -> tuple[float, float]:
    """Rescale slope and intercept: top level, else the enhanced multi-frame functional groups (per-frame
    values override shared ones), else identity."""
    def from_group(group):
        if group is not None and "PixelValueTransformationSequence" in group:
            item = group.PixelValueTransformationSequence[0]
            return float(item.get("RescaleSlope", 1) or 1), float(item.get("RescaleIntercept", 0) or 0)
        return None

    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for group in ((per_frame[frame] if per_frame and frame < len(per_frame) else None), shared[0] if shared else None):
        found = from_group(group)
        if found is not None:
            return found
    return 1.0, 0.0
