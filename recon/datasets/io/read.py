"""Reading any supported input: :func:`read_image` dispatches on the path to one reader per format."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from recon.datasets.io.dicom_series import read_dicom_file, read_dicom_folder, scan_folder
from recon.datasets.io.errors import ImageReadError, one_line
from recon.datasets.io.image import MedicalImage, SeriesInfo
from recon.datasets.io.nifti import is_nifti, read_nifti
from recon.datasets.io.simple import PICTURE_SUFFIXES, read_numpy, read_picture

__all__ = ["list_series", "read_file", "read_image"]


def read_file(p: Path, on_irregular: str = "error") -> MedicalImage:
    """Read one file with the reader its name (else its content, DICOM) calls for.

    Args:
        p: the file.
        on_irregular: for multi-frame DICOM, ``"error"`` or ``"resample"``.

    Returns:
        The image, not yet checked for finite values and geometry (:func:`read_image` does that).
    """
    suffix = p.suffix.lower()
    if is_nifti(p):
        return read_nifti(p)
    if suffix in (".npy", ".npz"):
        return read_numpy(p)
    if suffix in PICTURE_SUFFIXES:
        return read_picture(p)
    if suffix in (".h5", ".hdf5"):
        raise ImageReadError(p, "an HDF5 file (fastMRI k-space?) is not an image: read it with read_fastmri")
    return read_dicom_file(p, on_irregular)


def check_read(p: Path, image: MedicalImage) -> MedicalImage:
    """The checks every reader's result passes: a non-empty array of finite values, a finite invertible affine.

    Args:
        p: the input (for the message).
        image: what was read.

    Returns:
        ``image``.
    """
    if image.array.size == 0:
        raise ImageReadError(p, f"empty image of shape {image.array.shape} (expected at least one voxel)")
    if not np.isfinite(image.array).all():
        bad = int((~np.isfinite(image.array)).sum())
        raise ImageReadError(p, f"contains NaN or infinite values ({bad} voxels; expected finite values)")
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise ImageReadError(p, "the geometry (affine) is degenerate or not finite (expected an invertible affine)")
    return image


def read_image(path: str | os.PathLike, series: str | int | None = None, on_irregular: str = "error") -> MedicalImage:
    """Read an image or volume with its geometry.

    Args:
        path: a folder of DICOM files (searched recursively, files without extension too), a single DICOM file
            (any extension; classic or enhanced multi-frame), a NIfTI file (``.nii``, ``.nii.gz``), a NumPy file
            (``.npy``; ``.npz`` with a single array or the key ``"image"``; 2D or 3D), or a PNG/TIFF image
            (grayscale; RGB becomes luminance, ITU-R BT.601 weights; a multi-page TIFF is a stack).
        series: for a folder holding several DICOM series, which one: its SeriesInstanceUID, a 0-based index
            (int or digit string) into :func:`list_series`'s order, or an exact SeriesDescription.
        on_irregular: what to do when DICOM slice positions are not uniformly spaced (a gap, or steps differing
            by more than 1 % from the median step): ``"error"`` (default) raises ImageReadError naming the
            positions; ``"resample"`` interpolates linearly along the slice normal onto a uniform grid with the
            median step (recorded in ``meta["resampled"]``).

    Returns:
        A :class:`MedicalImage`: float64 array ``(D, H, W)``, RAS+ affine in mm. NIfTI: the nibabel affine, the
        array is the NIfTI data transposed ``(i, j, k) → (k, j, i)``. DICOM: affine from ImagePositionPatient,
        ImageOrientationPatient and PixelSpacing (LPS → RAS), slices ascending along the normal; ``unit`` is
        ``"HU"`` for CT unless the file's RescaleType says otherwise (e.g. ``"US"`` for a CT perfusion map);
        DICOM without patient geometry (CR, secondary capture) gets its pixel spacing at the origin and
        ``meta["geometry"]`` says so. NumPy/PNG/TIFF: the identity (1 mm voxels, voxel ``[0, 0, 0]`` at the
        origin).

    Raises:
        ImageReadError: missing path, no or several DICOM series, mixed orientations or sizes, irregular
            spacing, undecodable pixel data (names the transfer syntax and what to install), corrupt or
            truncated files, 4D NIfTI, NaN or infinite values, unsupported shapes or formats.
        ValueError: ``on_irregular`` is neither ``"error"`` nor ``"resample"``.
    """
    if on_irregular not in ("error", "resample"):
        raise ValueError(f"on_irregular must be 'error' or 'resample', got {on_irregular!r}")
    p = Path(os.fspath(path))
    if not p.exists():
        raise ImageReadError(p, "no such file or folder")
    try:
        if p.is_dir():
            image = read_dicom_folder(p, series, on_irregular)
        else:
            if series is not None:
                raise ImageReadError(p, "series= selects a series in a DICOM folder, but this is a file "
                                        "(pass the folder, or leave the series out)")
            image = read_file(p, on_irregular)
    except ImageReadError:
        raise
    except MemoryError as err:
        raise ImageReadError(p, "not enough memory to read it (a damaged header claiming a huge image?)") from err
    except Exception as err:  # a library error deep inside becomes one line naming the input
        raise ImageReadError(p, f"unreadable ({type(err).__name__}: {one_line(err)})") from err
    return check_read(p, image)


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The DICOM image series in a folder (searched recursively; hidden files, DICOMDIR and non-image objects
    skipped), grouped by SeriesInstanceUID and sorted by (SeriesNumber, SeriesInstanceUID); this order gives
    the indices that ``read_image(folder, series=INDEX)`` accepts.

    Args:
        folder: the folder.

    Returns:
        One :class:`SeriesInfo` per series.

    Raises:
        ImageReadError: for a missing path, a path that is not a folder, or a corrupt DICOM file (a file with
            the DICOM preamble that cannot be parsed).
    """
    p = Path(os.fspath(folder))
    if not p.exists():
        raise ImageReadError(p, "no such file or folder")
    if not p.is_dir():
        raise ImageReadError(p, "not a folder (expected a folder of DICOM files)")
    try:
        return scan_folder(p)[0]
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(p, f"unreadable ({type(err).__name__}: {one_line(err)})") from err
