"""Geometry-preserving medical image I/O: DICOM series and files, NIfTI, NumPy, PNG/TIFF, fastMRI k-space.

Every reader returns a :class:`MedicalImage`: the voxel values, always as a float64 array of shape ``(D, H, W)``
(D slices, H rows, W columns; a 2D image has ``D = 1``), and a 4×4 ``affine`` that maps voxel indices to
world coordinates in millimetres (RAS+, the NIfTI/nibabel convention). Writers turn it into NIfTI, a DICOM
series (derived from the original series, so that it opens next to it in a viewer), PNG or NumPy.

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
Inputs are never modified. Writes are atomic (a temporary file in the target folder, then ``os.replace``), an
existing output is never replaced unless ``overwrite=True``, and a failed write leaves nothing behind.

Only numpy is imported with this module; pydicom, nibabel, Pillow/tifffile and h5py are imported when needed.
"""

from __future__ import annotations

import copy
import datetime
import os
import secrets
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

__all__ = [
    "ImageReadError",
    "ImageWriteError",
    "MedicalImage",
    "SeriesInfo",
    "anonymize_dataset",
    "atomic_write_bytes",
    "list_series",
    "read_fastmri",
    "read_image",
    "write_dicom_series",
    "write_image",
    "write_nifti",
    "write_png",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""4×4 flip between DICOM patient coordinates (LPS+) and NIfTI world coordinates (RAS+); its own inverse."""

SPACING_RTOL = 1e-2
"""Relative tolerance on slice steps: a step further than this fraction from the median step is irregular."""

_DUPLICATE_MM = 1e-3  # two slices closer than this along the normal are at the same position
_ORIENTATION_ATOL = 1e-4  # ImageOrientationPatient values closer than this are the same orientation
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_PICTURE_SUFFIXES = (".png", ".tif", ".tiff")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights for RGB → grayscale


# ---------------------------------------------------------------------------------------------------------------
# Errors and data classes


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class ImageReadError(ValueError):
    """An input could not be read as an image. ``path`` names it; the message is one line,
    ``"PATH: what is wrong (what was expected)"``, without patient data."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = _one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


class ImageWriteError(ValueError):
    """An output could not be written. ``path`` names the file or folder; the message is one line,
    ``"PATH: what is wrong (what was expected)"``. Nothing is left behind by a failed write."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = _one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


@dataclass(eq=False)
class MedicalImage:
    """A 2D image or 3D volume with its position in the patient.

    Attributes:
        array: float64 voxel values, shape ``(D, H, W)``: D slices, H rows, W columns (a 2D image has D = 1).
            A 2D array given to the constructor becomes ``(1, H, W)``.
        affine: 4×4 float64; ``affine @ [w, h, d, 1]`` is the world position (RAS+, mm; the NIfTI/nibabel
            convention) of the centre of voxel ``array[d, h, w]``. Column 0 ↔ W, column 1 ↔ H, column 2 ↔ D.
        modality: DICOM Modality (``"CT"``, ``"MR"``, ...) or None when unknown.
        unit: ``"HU"`` for CT values after the DICOM rescale, else None.
        source: what was read (path and kind); no patient data.
        meta: non-identifying facts about the input (format, series description, number of files, rescale,
            slice positions, resampling, ...).
        dicom_headers: for DICOM inputs, one pydicom Dataset per slice *without* pixel data, ordered like the D
            axis (reference for writing a derived series); None otherwise. They carry patient data: do not log
            them.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None
    unit: str | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)
    dicom_headers: list | None = None

    def __post_init__(self):
        array = np.asarray(self.array, dtype=np.float64)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise ValueError(f"MedicalImage.array must be (D, H, W) (or (H, W)), got shape {array.shape}")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"MedicalImage.affine must be 4×4, got shape {affine.shape}")
        self.array, self.affine = array, affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(dz, dy, dx)`` in mm: the lengths of affine columns 2, 1, 0 (slice, row, column steps)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[2]), float(norms[1]), float(norms[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    def with_array(self, array) -> MedicalImage:
        """The same geometry and metadata with new voxel values of the same ``(D, H, W)`` shape (a NumPy array
        or anything ``np.asarray`` takes, e.g. a CPU tensor). Raises ``ValueError`` for another shape."""
        new = np.asarray(array, dtype=np.float64)
        if new.shape != self.array.shape:
            raise ValueError(f"with_array: shape {new.shape} does not match the image's {self.array.shape} (D, H, W)")
        headers = list(self.dicom_headers) if self.dicom_headers is not None else None
        return replace(self, array=new, meta=copy.deepcopy(self.meta), dicom_headers=headers)

    def __repr__(self) -> str:
        dz, dy, dx = self.spacing
        return (
            f"MedicalImage(shape={self.shape}, spacing=({dz:.4g}, {dy:.4g}, {dx:.4g}) mm, "
            f"modality={self.modality!r}, unit={self.unit!r}, source={self.source!r})"
        )


@dataclass
class SeriesInfo:
    """One DICOM series found in a folder.

    Attributes:
        uid: SeriesInstanceUID ("" when the files have none).
        description: SeriesDescription ("" when absent).
        modality: Modality ("" when absent).
        n_files: number of image files in the series.
        shape: ``(D, H, W)`` expected from the headers (D = total number of frames).
        files: the files, sorted by path.
        number: SeriesNumber, or None.
    """

    uid: str
    description: str
    modality: str
    n_files: int
    shape: tuple
    files: list[str]
    number: int | None = None

    def label(self) -> str:
        """A one-line description (UID, description, number of files, shape) without patient data."""
        shape = "×".join(str(n) for n in self.shape)
        files = "1 file" if self.n_files == 1 else f"{self.n_files} files"
        return f"{self.uid or '(no SeriesInstanceUID)'} {self.description!r} ({files}, {shape})"


# ---------------------------------------------------------------------------------------------------------------
# Reading: entry points


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
            image = _read_dicom_folder(p, series, on_irregular)
        else:
            if series is not None:
                raise ImageReadError(p, "series= selects a series in a DICOM folder, but this is a file "
                                        "(pass the folder, or leave the series out)")
            image = _read_file(p, on_irregular)
    except ImageReadError:
        raise
    except Exception as err:  # a library error deep inside becomes one line naming the input
        raise ImageReadError(p, f"unreadable ({type(err).__name__}: {_one_line(err)})") from err
    if not np.isfinite(image.array).all():
        bad = int((~np.isfinite(image.array)).sum())
        raise ImageReadError(p, f"contains NaN or infinite values ({bad} voxels; expected finite values)")
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise ImageReadError(p, "the geometry (affine) is degenerate or not finite (expected an invertible affine)")
    return image


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The DICOM image series in a folder (searched recursively; hidden files, DICOMDIR and non-image objects
    skipped), grouped by SeriesInstanceUID and sorted by (SeriesNumber, SeriesInstanceUID); this order gives
    the indices that ``read_image(folder, series=INDEX)`` accepts.

    Raises ImageReadError for a missing path, a path that is not a folder, or a corrupt DICOM file (a file with
    the DICOM preamble that cannot be parsed).
    """
    p = Path(os.fspath(folder))
    if not p.exists():
        raise ImageReadError(p, "no such file or folder")
    if not p.is_dir():
        raise ImageReadError(p, "not a folder (expected a folder of DICOM files)")
    return _scan_folder(p)[0]


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

    Raises ImageReadError for a missing file, a file that is not HDF5, no ``kspace`` dataset, k-space that is not
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
        raise ImageReadError(p, f"not a readable HDF5 file ({_one_line(err)}; expected a fastMRI .h5 file)") from err
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
            attrs = {k: _python_value(v) for k, v in f.attrs.items()}
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(p, f"unreadable HDF5 content ({type(err).__name__}: {_one_line(err)})") from err
    if not np.iscomplexobj(kspace):
        raise ImageReadError(p, f"'kspace' has dtype {kspace.dtype} (expected complex values)")
    if kspace.ndim not in (3, 4):
        raise ImageReadError(p, f"'kspace' has shape {kspace.shape} (expected (slices, [coils,] H, W))")
    if not np.isfinite(kspace).all():
        raise ImageReadError(p, "'kspace' contains NaN or infinite values (expected finite values)")
    return {"kspace": kspace, "mask": mask, "attrs": attrs, "reconstruction": recon, "ismrmrd_header": header}


def _python_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


# ---------------------------------------------------------------------------------------------------------------
# Reading: single files


def _is_nifti(p: Path) -> bool:
    name = p.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def has_dicom_preamble(p: Path) -> bool:
    """True if ``p`` starts with the DICOM Part 10 preamble (128 bytes, then ``DICM``); False if not or unreadable."""
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_file(p: Path, on_irregular: str) -> MedicalImage:
    suffix = p.suffix.lower()
    if _is_nifti(p):
        return _read_nifti(p)
    if suffix in (".npy", ".npz"):
        return _read_numpy(p)
    if suffix in _PICTURE_SUFFIXES:
        return _read_picture(p)
    if suffix in (".h5", ".hdf5"):
        raise ImageReadError(p, "an HDF5 file (fastMRI k-space?) is not an image: read it with read_fastmri")
    return _read_dicom_file(p, on_irregular)


def _identity_image(p: Path, array: np.ndarray, kind: str, meta: dict) -> MedicalImage:
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ImageReadError(p, f"array of shape {array.shape} (expected a 2D (H, W) or 3D (D, H, W) array)")
    if min(array.shape[1:]) < 1 or array.shape[0] < 1:
        raise ImageReadError(p, f"empty array of shape {array.shape} (expected a 2D or 3D image)")
    meta = {"format": kind, "geometry": "none in the file: 1 mm voxels, voxel [0, 0, 0] at the origin", **meta}
    return MedicalImage(array, np.eye(4), source=f"{kind} file {p}", meta=meta)


def _real_array(p: Path, a: np.ndarray) -> np.ndarray:
    if a.dtype == object or a.dtype.names is not None:
        raise ImageReadError(p, f"array of dtype {a.dtype} (expected a numeric array)")
    if np.iscomplexobj(a):
        raise ImageReadError(p, "complex array (expected real values: pass its magnitude, or k-space to read_fastmri)")
    return np.asarray(a, dtype=np.float64)


def _read_numpy(p: Path) -> MedicalImage:
    try:
        loaded = np.load(p, allow_pickle=False)
    except Exception as err:
        raise ImageReadError(p, f"not a readable NumPy file ({type(err).__name__}: {_one_line(err)})") from err
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if len(keys) == 1:
                key = keys[0]
            elif "image" in keys:
                key = "image"
            else:
                raise ImageReadError(p, f"npz with arrays {keys} (expected a single array, or one named 'image')")
            a = loaded[key]
        return _identity_image(p, _real_array(p, a), "NumPy", {"npz_key": key})
    return _identity_image(p, _real_array(p, loaded), "NumPy", {})


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb[..., :3], dtype=np.float64) @ _LUMA


def _read_picture(p: Path) -> MedicalImage:
    meta: dict[str, Any] = {}
    if p.suffix.lower() == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                im.load()
                mode = im.mode
                if mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                    a = np.asarray(im, dtype=np.float64)
                elif mode in ("1", "LA"):
                    a = np.asarray(im.convert("L"), dtype=np.float64)
                else:  # RGB, RGBA, palette, ... → luminance
                    a = _luminance(np.asarray(im.convert("RGB")))
                    meta["converted"] = f"{mode} → luminance (BT.601)"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ImageReadError(p, f"not a readable PNG image ({_one_line(err)})") from err
        meta["png_mode"] = mode
        return _identity_image(p, a, "PNG", meta)
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            s = tf.series[0]
            a, axes = np.asarray(s.asarray()), s.axes
    except Exception as err:
        raise ImageReadError(p, f"not a readable TIFF image ({type(err).__name__}: {_one_line(err)})") from err
    if "S" in axes:  # samples per pixel (RGB/RGBA) → luminance
        a = np.moveaxis(a, axes.index("S"), -1)
        if a.shape[-1] < 3:
            a = a[..., 0]
        else:
            a = _luminance(a)
        meta["converted"] = "RGB → luminance (BT.601)"
    a = np.squeeze(a) if a.ndim > 3 else a
    meta["tiff_axes"] = axes
    return _identity_image(p, _real_array(p, a), "TIFF", meta)


def _read_nifti(p: Path) -> MedicalImage:
    import nibabel as nib

    try:
        img = nib.load(str(p))
        shape = tuple(int(n) for n in img.shape)
    except Exception as err:
        raise ImageReadError(p, f"not a readable NIfTI file ({type(err).__name__}: {_one_line(err)})") from err
    if len(shape) == 4:
        if shape[3] != 1:
            raise ImageReadError(
                p, f"4D NIfTI of shape {shape} ({shape[3]} volumes, e.g. fMRI or diffusion); expected one 3D volume "
                   "(extract one first, e.g. nibabel's img.slicer[..., 0]; a 4th dimension of 1 is accepted)")
    elif len(shape) not in (2, 3):
        raise ImageReadError(p, f"NIfTI of shape {shape} (expected a 2D or 3D image)")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float64))
    except Exception as err:
        raise ImageReadError(p, f"corrupt or truncated NIfTI data ({type(err).__name__}: {_one_line(err)})") from err
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    affine = np.array(img.affine, dtype=np.float64)
    header = img.header
    meta: dict[str, Any] = {"format": "NIfTI", "nifti_shape": shape}
    try:
        xyz_unit = header.get_xyzt_units()[0]
    except Exception:  # pragma: no cover - Analyze-like headers
        xyz_unit = "unknown"
    scale = {"meter": 1000.0, "micron": 1e-3}.get(xyz_unit, 1.0)
    if scale != 1.0:  # nibabel leaves the affine in the header's units; we promise mm
        affine[:3, :] *= scale
        meta["converted"] = f"affine from {xyz_unit} to mm"
    for code in ("sform_code", "qform_code"):
        if code in header:
            meta[f"nifti_{code}"] = int(header[code])
    array = np.ascontiguousarray(data.transpose(2, 1, 0))  # (i, j, k) → (D, H, W) = (k, j, i)
    return MedicalImage(array, affine, source=f"NIfTI file {p}", meta=meta)


# ---------------------------------------------------------------------------------------------------------------
# Reading: DICOM


@dataclass
class _Frame:
    """One 2D frame of a DICOM object, rescaled, with its geometry (LPS, mm) or None where the file has none."""

    file: Path
    index: int | None  # frame number in a multi-frame file, None for a single-frame file
    pixels: np.ndarray  # (H, W) float64 after rescale
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None  # (row spacing = Δ along a column, column spacing = Δ along a row)
    thickness: float | None
    slope: float
    intercept: float
    rescale_type: str | None
    header: Any  # pydicom Dataset without pixel data, with this frame's geometry at the top level


def _floats(p: Path, value, n: int, name: str) -> np.ndarray | None:
    if value is None or value == "" or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    try:
        vals = np.array([float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str)
                                             else [value])], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ImageReadError(p, f"malformed {name} {value!r} (expected {n} numbers)") from err
    if vals.size != n or not np.isfinite(vals).all():
        raise ImageReadError(p, f"malformed {name} {list(value)!r} (expected {n} finite numbers)")
    return vals


def _number(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def _decode_hint(ts) -> str:
    name = str(getattr(ts, "name", ts))
    if "MPEG" in name or "HEVC" in name or "H.264" in name:
        return ("video transfer syntaxes are not decoded by pydicom: convert the file to an uncompressed "
                "transfer syntax first (e.g. gdcmconv --raw, or dcmdjpeg/dcmconv from DCMTK)")
    if "2000" in name or "HTJ2K" in name or "High-Throughput" in name:
        return "install a JPEG 2000 decoder: pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
    if "JPEG" in name:
        return "install a JPEG decoder: pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
    if "RLE" in name:
        return "install an RLE decoder: pip install pylibjpeg pylibjpeg-rle (or python-gdcm)"
    return ("install the pixel data decoders: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
            "(or python-gdcm)")


def _dicom_pixels(ds, p: Path, n_frames: int) -> np.ndarray:
    """The stored pixel values as (frames, H, W); ImageReadError naming the transfer syntax when undecodable."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(p, "DICOM file without pixel data (truncated, or not an image object)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ImageReadError(p, f"colour DICOM image (SamplesPerPixel = {samples}; expected grayscale, 1 sample)")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None and getattr(ds, "original_encoding", (None, None))[0] is not None:
        # a raw dataset without file meta (read with force): its pixel data is in the encoding it was read with
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        if not hasattr(ds, "file_meta"):
            from pydicom.dataset import FileMetaDataset

            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as err:
        reason = _one_line(err)
        if ts is not None and getattr(ts, "is_compressed", False):
            raise ImageReadError(
                p, f"cannot decode the pixel data with transfer syntax {ts} ({ts.name}): {_decode_hint(ts)} "
                   f"[{type(err).__name__}: {reason}]") from err
        name = f"{ts} ({ts.name})" if ts is not None else "unknown"
        raise ImageReadError(p, f"corrupt or truncated pixel data (transfer syntax {name}) "
                                f"[{type(err).__name__}: {reason}]") from err
    rows, cols = int(ds.Rows), int(ds.Columns)
    if arr.size != n_frames * rows * cols:
        raise ImageReadError(p, f"pixel array of shape {arr.shape} (expected {n_frames} frame(s) of {rows}×{cols})")
    return arr.reshape(n_frames, rows, cols)


def _group_value(groups, seq: str, keyword: str):
    """The first value of ``keyword`` inside functional-group sequence ``seq`` across ``groups`` (in order)."""
    for g in groups:
        if g is not None and seq in g and len(g[seq].value) > 0 and keyword in g[seq][0]:
            return g[seq][0][keyword].value
    return None


_FRAME_EXCLUDE = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "PerFrameFunctionalGroupsSequence",
                  "SharedFunctionalGroupsSequence")


def _header_without_pixels(ds):
    """A deep copy of ``ds`` without pixel data and without the functional group sequences."""
    from pydicom.dataset import Dataset

    base = Dataset()
    for elem in ds:
        if elem.keyword not in _FRAME_EXCLUDE:
            base.add(copy.deepcopy(elem))
    if hasattr(ds, "file_meta"):
        base.file_meta = copy.deepcopy(ds.file_meta)
    return base


def _ds_text(value) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _frames_from_dataset(ds, p: Path) -> list[_Frame]:
    """Split one DICOM dataset (classic single frame or enhanced multi-frame) into rescaled frames."""
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(p, "DICOM object without Rows/Columns (truncated, or not an image)")
    n_frames = int(_number(ds.get("NumberOfFrames", 1)) or 1)
    pixels = _dicom_pixels(ds, p, n_frames)
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared0 = shared[0] if shared else None
    if per is not None and len(per) not in (0, n_frames):
        raise ImageReadError(p, f"{len(per)} per-frame functional groups for {n_frames} frames (expected one each)")
    enhanced = n_frames > 1 or bool(per) or shared0 is not None
    base = _header_without_pixels(ds)
    frames = []
    grid = ds.get("GridFrameOffsetVector")  # RT dose: frame positions as offsets along the normal
    for k in range(n_frames):
        groups = ((per[k] if per else None), shared0) if enhanced else ()

        def get(seq, kw, groups=groups):
            v = _group_value(groups, seq, kw)
            return ds.get(kw) if v is None and (not enhanced or n_frames == 1) else v

        ipp = _floats(p, get("PlanePositionSequence", "ImagePositionPatient"), 3, "ImagePositionPatient")
        iop = _floats(p, get("PlaneOrientationSequence", "ImageOrientationPatient"), 6, "ImageOrientationPatient")
        if iop is None and enhanced:
            iop = _floats(p, ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
        if ipp is None and enhanced and grid is not None and len(grid) == n_frames and iop is not None:
            ipp0 = _floats(p, ds.get("ImagePositionPatient"), 3, "ImagePositionPatient")
            if ipp0 is not None:
                normal = np.cross(iop[:3], iop[3:])
                ipp = ipp0 + float(grid[k]) * normal / np.linalg.norm(normal)
        ps = _floats(p, get("PixelMeasuresSequence", "PixelSpacing") or ds.get("PixelSpacing"), 2, "PixelSpacing")
        thickness = _number(get("PixelMeasuresSequence", "SliceThickness") or ds.get("SliceThickness"))
        if thickness is None or thickness <= 0:
            thickness = _number(ds.get("SpacingBetweenSlices"))
        slope = _number(_group_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
                        if enhanced else None)
        intercept = _number(_group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept")
                            if enhanced else None)
        rtype = _group_value(groups, "PixelValueTransformationSequence", "RescaleType") if enhanced else None
        if slope is None:
            slope = _number(ds.get("RescaleSlope"))
        if intercept is None:
            intercept = _number(ds.get("RescaleIntercept"))
        if rtype is None:
            rtype = ds.get("RescaleType")
        if str(ds.get("Modality", "")) == "RTDOSE" and _number(ds.get("DoseGridScaling")):
            slope = (slope or 1.0) * _number(ds.DoseGridScaling)  # stored dose → DoseUnits (Gy)
        slope = 1.0 if slope is None or slope == 0 else slope
        intercept = 0.0 if intercept is None else intercept
        values = pixels[k].astype(np.float64) * slope + intercept
        if enhanced:  # a per-frame header with this frame's geometry and rescale at the top level
            header = copy.deepcopy(base)
            if ipp is not None:
                header.ImagePositionPatient = [_ds_text(v) for v in ipp]
            if iop is not None:
                header.ImageOrientationPatient = [_ds_text(v) for v in iop]
            if ps is not None:
                header.PixelSpacing = [_ds_text(v) for v in ps]
            if thickness is not None:
                header.SliceThickness = _ds_text(thickness)
            header.RescaleSlope, header.RescaleIntercept = _ds_text(slope), _ds_text(intercept)
            header.NumberOfFrames = 1
        else:
            header = base
        frames.append(_Frame(p, k if n_frames > 1 else None, values, ipp, iop,
                             (float(ps[0]), float(ps[1])) if ps is not None else None, thickness, slope, intercept,
                             str(rtype) if rtype else None, header))
    return frames


def _read_dicom_dataset(p: Path, *, header_only: bool, force: bool):
    import pydicom

    return pydicom.dcmread(str(p), stop_before_pixels=header_only, force=force)


def _read_dicom_file(p: Path, on_irregular: str) -> MedicalImage:
    from pydicom.errors import InvalidDicomError

    preamble = has_dicom_preamble(p)
    try:
        ds = _read_dicom_dataset(p, header_only=False, force=not preamble)
    except InvalidDicomError as err:
        raise ImageReadError(p, "not a recognised image file (expected DICOM, NIfTI .nii/.nii.gz, NumPy .npy/.npz, "
                                "PNG or TIFF)") from err
    except Exception as err:
        kind = "corrupt or truncated DICOM file" if preamble else "not a recognised image file"
        raise ImageReadError(p, f"{kind} ({type(err).__name__}: {_one_line(err)})") from err
    if "SOPClassUID" not in ds and not ("Rows" in ds and "Columns" in ds):
        if preamble:
            raise ImageReadError(p, "corrupt or truncated DICOM file (no SOP Class UID or image size in its header)")
        raise ImageReadError(p, "not a recognised image file (expected DICOM, NIfTI .nii/.nii.gz, NumPy .npy/.npz, "
                                "PNG or TIFF)")
    if str(ds.get("SOPClassUID", "")) == "1.2.840.10008.1.3.10":
        raise ImageReadError(p, "a DICOMDIR index, not an image (pass the folder that holds the series)")
    frames = _frames_from_dataset(ds, p)
    return _assemble([frames[0].header], frames, p, on_irregular, f"DICOM file {p}")


def _dicom_header_or_none(f: Path):
    """The header (no pixels) of a DICOM image file, None for other files; ImageReadError for corrupt DICOM."""
    if f.name.upper() == "DICOMDIR":
        return None
    preamble = has_dicom_preamble(f)
    if not preamble and f.suffix.lower() not in _DICOM_SUFFIXES:
        return None
    try:
        ds = _read_dicom_dataset(f, header_only=True, force=not preamble)
    except Exception as err:
        if not preamble:
            return None
        raise ImageReadError(f, f"corrupt or truncated DICOM file ({type(err).__name__}: {_one_line(err)})") from err
    sop = ds.get("SOPClassUID")
    if sop is None:
        if preamble:
            raise ImageReadError(f, "corrupt or truncated DICOM file (no SOP Class UID in its header)")
        return None
    if str(sop) == "1.2.840.10008.1.3.10":  # Media Storage Directory (DICOMDIR)
        return None
    if "Rows" not in ds or "Columns" not in ds:
        if "Image" in str(getattr(sop, "name", "")) and "Storage" in str(getattr(sop, "name", "")):
            raise ImageReadError(f, "corrupt or truncated DICOM file (image header without Rows/Columns)")
        return None  # a non-image object (structured report, presentation state, ...)
    return ds


def _scan_folder(folder: Path) -> tuple[list[SeriesInfo], list[Path]]:
    """The image series in ``folder`` (sorted) and the files skipped (not DICOM, DICOMDIR, not images)."""
    files = sorted(
        f for f in folder.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )
    groups: dict[str, list] = {}
    skipped: list[Path] = []
    for f in files:
        ds = _dicom_header_or_none(f)
        if ds is None:
            skipped.append(f)
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((f, ds))
    infos = []
    for uid, members in groups.items():
        ds0 = members[0][1]
        n_frames = sum(int(_number(ds.get("NumberOfFrames", 1)) or 1) for _, ds in members)
        number = _number(ds0.get("SeriesNumber"))
        infos.append(SeriesInfo(uid=uid, description=str(ds0.get("SeriesDescription", "") or ""),
                                modality=str(ds0.get("Modality", "") or ""), n_files=len(members),
                                shape=(n_frames, int(ds0.Rows), int(ds0.Columns)),
                                files=[str(f) for f, _ in members],
                                number=int(number) if number is not None else None))
    infos.sort(key=lambda s: (s.number if s.number is not None else 2**62, s.uid))
    return infos, skipped


def _choose_series(folder: Path, infos: list[SeriesInfo], series) -> SeriesInfo:
    listing = "; ".join(f"[{i}] {s.label()}" for i, s in enumerate(infos))
    how = ("pass series= (--series on the command line): a SeriesInstanceUID, a 0-based index or an exact "
           "SeriesDescription")
    if series is None:
        if len(infos) == 1:
            return infos[0]
        raise ImageReadError(folder, f"{len(infos)} DICOM series in this folder; {how}: {listing}")
    is_int = isinstance(series, (int, np.integer)) and not isinstance(series, bool)
    if is_int or (isinstance(series, str) and series.strip().isdigit()):
        i = int(series)
        if 0 <= i < len(infos):
            return infos[i]
        raise ImageReadError(folder, f"no series with index {i} (expected 0 to {len(infos) - 1}): {listing}")
    if not isinstance(series, str):
        raise ImageReadError(folder, f"series={series!r} (expected a UID, an index or a description)")
    by_uid = [s for s in infos if s.uid == series.strip()]
    if by_uid:
        return by_uid[0]
    by_desc = [s for s in infos if s.description == series]
    if len(by_desc) == 1:
        return by_desc[0]
    if len(by_desc) > 1:
        listing = "; ".join(f"[{infos.index(s)}] {s.label()}" for s in by_desc)
        raise ImageReadError(folder, f"{len(by_desc)} series are described {series!r}; pass a UID or index: {listing}")
    raise ImageReadError(folder, f"no series {series!r} (expected a UID, an index or a description): {listing}")


def _read_dicom_folder(folder: Path, series, on_irregular: str) -> MedicalImage:
    infos, skipped = _scan_folder(folder)
    if not infos:
        what = (f"{len(skipped)} file(s) skipped as not DICOM images, e.g. {skipped[0].name}" if skipped
                else "the folder is empty")
        raise ImageReadError(folder, f"no DICOM image files found ({what}; expected a folder of DICOM files)")
    info = _choose_series(folder, infos, series)
    datasets, frames = [], []
    for name in info.files:
        f = Path(name)
        try:
            ds = _read_dicom_dataset(f, header_only=False, force=not has_dicom_preamble(f))
        except Exception as err:
            raise ImageReadError(f, f"corrupt or truncated DICOM file ({type(err).__name__}: {_one_line(err)})") \
                from err
        new = _frames_from_dataset(ds, f)
        frames += new
        datasets.append(new[0].header)  # keep headers only: the pixel data is freed file by file
    image = _assemble(datasets, frames, folder, on_irregular,
                      f"DICOM series {info.uid} ({info.n_files} files) in {folder}")
    image.meta.update({"series_uid": info.uid, "n_files": info.n_files, "skipped_files": len(skipped)})
    return image


def _assemble(datasets: list, frames: list[_Frame], where: Path, on_irregular: str, source: str) -> MedicalImage:
    """Check the frames form one regular volume, order them along the normal and build the MedicalImage."""
    ds0 = datasets[0]
    sizes = sorted({f.pixels.shape for f in frames})
    if len(sizes) > 1:
        raise ImageReadError(where, f"slices of different sizes {sizes} in one series (expected one rows×columns)")
    modality = str(ds0.get("Modality", "") or "") or None
    rescale_types = sorted({f.rescale_type for f in frames if f.rescale_type})
    meta: dict[str, Any] = {
        "format": "DICOM",
        "modality": modality,
        "series_description": str(ds0.get("SeriesDescription", "") or ""),
        "sop_class": str(getattr(ds0.get("SOPClassUID"), "name", ds0.get("SOPClassUID", ""))),
        "transfer_syntax": sorted({str(d.file_meta.TransferSyntaxUID.name) for d in datasets
                                   if hasattr(d, "file_meta") and "TransferSyntaxUID" in d.file_meta}),
        "n_frames": len(frames),
        "photometric_interpretation": str(ds0.get("PhotometricInterpretation", "")),
    }
    if "PixelPaddingValue" in ds0:
        meta["pixel_padding_value"] = _python_value(ds0.PixelPaddingValue)
    if rescale_types:
        meta["rescale_type"] = rescale_types[0] if len(rescale_types) == 1 else rescale_types
    unit = "HU" if modality == "CT" and all(t.upper() == "HU" for t in rescale_types) else None

    have = [f.ipp is not None and f.iop is not None for f in frames]
    if not all(have):
        if any(have):
            raise ImageReadError(where, "some slices lack ImagePositionPatient/ImageOrientationPatient "
                                        "(expected every slice to have them)")
        if len({f.file for f in frames}) > 1:
            raise ImageReadError(where, f"{len(frames)} files without ImagePositionPatient/ImageOrientationPatient: "
                                        "the order of the slices is unknown (expected positioned slices)")
        return _unpositioned(frames, ds0, modality, unit, source, meta)

    iops = np.stack([f.iop for f in frames])
    distinct = np.unique(np.round(iops / _ORIENTATION_ATOL) * _ORIENTATION_ATOL, axis=0)
    if np.abs(iops - iops[0]).max() > _ORIENTATION_ATOL:
        examples = ", ".join("[" + " ".join(f"{v:.4g}" for v in o) + "]" for o in distinct[:3])
        raise ImageReadError(where, f"mixed slice orientations in one series ({len(distinct)} different "
                                    f"ImageOrientationPatient values, e.g. {examples}; expected one orientation: "
                                    "localizer or radial images cannot form a volume)")
    spacings = [f.pixel_spacing for f in frames]
    if any(s is None for s in spacings):
        if not all(s is None for s in spacings):
            raise ImageReadError(where, "some slices lack PixelSpacing (expected every slice to have it)")
        fallback = _floats(where, ds0.get("ImagerPixelSpacing"), 2, "ImagerPixelSpacing")
        dy, dx = (float(fallback[0]), float(fallback[1])) if fallback is not None else (1.0, 1.0)
        meta["pixel_spacing"] = "no PixelSpacing: " + ("ImagerPixelSpacing used" if fallback is not None
                                                      else "1 mm assumed")
    else:
        sp = np.array(spacings)
        if np.abs(sp - sp[0]).max() > 1e-4 * max(1.0, float(np.abs(sp[0]).max())):
            raise ImageReadError(where, f"mixed PixelSpacing values in one series, e.g. {sp[0].tolist()} and "
                                        f"{sp[np.abs(sp - sp[0]).max(1).argmax()].tolist()} (expected one)")
        dy, dx = float(sp[0][0]), float(sp[0][1])
    if dy <= 0 or dx <= 0:
        raise ImageReadError(where, f"PixelSpacing {[dy, dx]} (expected positive values)")
    r, c = iops[0][:3].copy(), iops[0][3:].copy()
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if nr < 1e-6 or nc < 1e-6 or abs(np.dot(r, c)) / (nr * nc) > 1e-3:
        raise ImageReadError(where, f"ImageOrientationPatient {iops[0].tolist()} has non-orthogonal or zero "
                                    "direction cosines (expected two orthogonal unit vectors)")
    r, c = r / nr, c / nc
    normal = np.cross(r, c)
    normal /= np.linalg.norm(normal)

    positions = np.stack([f.ipp for f in frames])
    s = positions @ normal
    order = np.argsort(s, kind="stable")
    frames = [frames[i] for i in order]
    positions, s = positions[order], s[order]
    volume = np.stack([f.pixels for f in frames])
    headers = [f.header for f in frames]
    meta["slice_positions_mm"] = [float(v) for v in s]
    thickness = frames[0].thickness
    if thickness is not None:
        meta["slice_thickness_mm"] = thickness
    slopes = sorted({f.slope for f in frames})
    intercepts = sorted({f.intercept for f in frames})
    meta["rescale"] = {"slope": slopes[0] if len(slopes) == 1 else [f.slope for f in frames],
                       "intercept": intercepts[0] if len(intercepts) == 1 else [f.intercept for f in frames]}

    if len(frames) == 1:
        step = normal * (thickness if thickness and thickness > 0 else 1.0)
        if not thickness:
            meta["slice_spacing"] = "single slice without SliceThickness: 1 mm assumed"
    else:
        step = _slice_step(where, positions, s, meta, on_irregular)
        if "resampled" in meta:
            volume, headers = _resample(volume, headers, s, meta, positions[0], step, normal)
        sheared = step - np.dot(step, normal) * normal
        tilt = float(np.degrees(np.arctan2(np.linalg.norm(sheared), abs(np.dot(step, normal)))))
        if tilt > 1e-3:
            meta["shear_deg"] = tilt
            meta["shear"] = ("slice positions are offset within the slice plane (gantry tilt?): the affine is "
                             "sheared, world coordinates stay exact")
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = r * dx, c * dy, step, positions[0]
    return MedicalImage(volume, LPS_TO_RAS @ lps, modality=modality, unit=unit, source=source, meta=meta,
                        dicom_headers=headers)


def _slice_step(where: Path, positions: np.ndarray, s: np.ndarray, meta: dict, on_irregular: str) -> np.ndarray:
    """The world step (LPS mm) between consecutive slices; checks duplicates, gaps and collinearity. Marks
    ``meta["resampled"]`` when the positions are irregular and resampling was asked for."""
    steps = np.diff(s)
    dup = np.flatnonzero(steps < _DUPLICATE_MM)
    if dup.size:
        where_dup = ", ".join(f"{s[i]:.6g}" for i in dup[:5])
        raise ImageReadError(where, f"{dup.size} duplicate slice position(s) along the slice normal (at {where_dup} "
                                    "mm): several volumes (echoes, time points, acquisitions) in one series? "
                                    "(expected one slice per position)")
    median = float(np.median(steps))
    direction = (positions[-1] - positions[0]) / (s[-1] - s[0])  # world displacement per mm along the normal
    line = positions[0] + (s - s[0])[:, None] * direction[None]
    off_line = float(np.linalg.norm(positions - line, axis=1).max())
    if off_line > SPACING_RTOL * median + 1e-3:
        raise ImageReadError(where, f"slice positions do not lie on a straight line (up to {off_line:.3g} mm off; "
                                    "expected a stack of parallel slices)")
    bad = np.flatnonzero(np.abs(steps - median) > SPACING_RTOL * median)
    if bad.size == 0:
        meta["slice_spacing_mm"] = float((s[-1] - s[0]) / (len(s) - 1))
        return (positions[-1] - positions[0]) / (len(s) - 1)
    described = "; ".join(
        f"{'gap' if steps[i] > median else 'step'} of {steps[i]:.6g} mm between slice positions {s[i]:.6g} and "
        f"{s[i + 1]:.6g} mm" for i in bad[:5]) + ("; ..." if bad.size > 5 else "")
    if on_irregular == "error":
        raise ImageReadError(where, f"irregular slice spacing: {described} (expected uniform steps of {median:.6g} mm "
                                    f"within {SPACING_RTOL:.0%}; on_irregular=\"resample\" interpolates onto a "
                                    f"uniform {median:.6g} mm grid)")
    meta["resampled"] = {"method": "linear along the slice normal", "spacing_mm": median,
                         "irregular_steps": described, "positions_in_mm": [float(v) for v in s]}
    meta["slice_spacing_mm"] = median
    return direction * median


def _resample(volume: np.ndarray, headers: list, s: np.ndarray, meta: dict, origin: np.ndarray,
              step: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, list]:
    """Linear interpolation of the slices at positions ``s`` onto ``s[0] + k · median`` (k = 0, 1, ...)."""
    median = meta["resampled"]["spacing_mm"]
    n_out = int(np.floor((s[-1] - s[0]) / median + 1e-6)) + 1
    s_new = s[0] + np.arange(n_out) * median
    lo = np.clip(np.searchsorted(s, s_new, side="right") - 1, 0, len(s) - 2)
    t = np.clip((s_new - s[lo]) / (s[lo + 1] - s[lo]), 0.0, 1.0)
    t[t < 1e-6], t[t > 1 - 1e-6] = 0.0, 1.0  # grid points on an original slice take it exactly
    t = t[:, None, None]
    out = (1.0 - t) * volume[lo] + t * volume[lo + 1]
    nearest = np.where(t[:, 0, 0] < 0.5, lo, lo + 1)
    new_headers = []
    for k, i in enumerate(nearest):  # nearest original header, with the new position
        h = copy.deepcopy(headers[i])
        ipp = origin + k * step
        h.ImagePositionPatient = [_ds_text(v) for v in ipp]
        h.SliceLocation = _ds_text(float(np.dot(ipp, normal)))
        h.InstanceNumber = k + 1
        new_headers.append(h)
    meta["resampled"]["n_slices_in"], meta["resampled"]["n_slices_out"] = len(s), n_out
    meta["slice_positions_mm"] = [float(v) for v in s_new]
    return out, new_headers


def _unpositioned(frames: list[_Frame], ds0, modality, unit, source: str, meta: dict) -> MedicalImage:
    """Frames without patient geometry (CR, secondary capture, stripped multi-frame): stacked in file order on a
    grid with the known pixel spacing (else 1 mm), voxel [0, 0, 0] at the origin."""
    ps = frames[0].pixel_spacing
    if ps is None:
        alt = ds0.get("ImagerPixelSpacing")
        ps = (float(alt[0]), float(alt[1])) if alt is not None and len(alt) == 2 else (1.0, 1.0)
    dz = _number(ds0.get("SpacingBetweenSlices")) or frames[0].thickness or 1.0
    meta["geometry"] = ("none in the file (no ImagePositionPatient/ImageOrientationPatient): frames in file order "
                        f"on a {dz:.4g} × {ps[0]:.4g} × {ps[1]:.4g} mm grid at the origin")
    meta["rescale"] = {"slope": frames[0].slope, "intercept": frames[0].intercept}
    affine = np.diag([ps[1], ps[0], dz, 1.0])
    return MedicalImage(np.stack([f.pixels for f in frames]), affine, modality=modality, unit=unit, source=source,
                        meta=meta, dicom_headers=[f.header for f in frames])


# ---------------------------------------------------------------------------------------------------------------
# Writing: atomic files


def _check_image(image, path: Path) -> None:
    if not isinstance(image, MedicalImage):
        raise ImageWriteError(path, f"expected a MedicalImage, got {type(image).__name__}")
    if image.array.ndim != 3 or min(image.array.shape) < 1:
        raise ImageWriteError(path, f"image of shape {image.array.shape} (expected a non-empty (D, H, W) array)")
    if not np.isfinite(image.array).all():
        raise ImageWriteError(path, "image contains NaN or infinite values (expected finite values)")
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise ImageWriteError(path, "the image's affine is degenerate or not finite (expected an invertible affine)")


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created (deepest last). ImageWriteError naming
    the folder when it cannot be created or written to."""
    missing = []
    f = folder
    while not f.exists() and f != f.parent:
        missing.append(f)
        f = f.parent
    if f.exists() and not f.is_dir():
        raise ImageWriteError(f, "is a file, not a folder (cannot write into it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_folders([m for m in reversed(missing) if m.exists()])
        raise ImageWriteError(folder, f"cannot create the output folder ({err.strerror or err})") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        _remove_folders(list(reversed(missing)))
        raise ImageWriteError(folder, "the output folder is not writable (expected write permission)")
    return list(reversed(missing))


def _remove_folders(created: list[Path]) -> None:
    for f in reversed(created):
        try:
            f.rmdir()
        except OSError:
            pass


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise ImageWriteError(path, "is a folder (expected a file name)")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ImageWriteError(path, "already exists (pass overwrite=True, --overwrite on the command line, to replace)")


def _atomic_write(path: Path, write: Callable[[Path], None], overwrite: bool) -> str:
    """Write ``path`` through ``write(tmp)`` on a temporary name in the same folder, then ``os.replace``."""
    path = Path(os.fspath(path))
    _check_target(path, overwrite)
    created = _make_folder(path.parent)
    name = path.name
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else path.suffix
    tmp = path.parent / f".{name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        write(tmp)
        if not overwrite and path.exists():
            raise ImageWriteError(path, "appeared while writing (not replaced; pass overwrite=True to replace)")
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        _remove_folders(created)
        if isinstance(err, ImageWriteError):
            raise
        if isinstance(err, Exception):
            reason = err.strerror if isinstance(err, OSError) and err.strerror else _one_line(err)
            raise ImageWriteError(path, f"writing failed, nothing written ({type(err).__name__}: {reason})") from err
        raise
    return str(path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write ``data`` to ``path`` atomically (temporary name in the same folder, then rename): an interrupted
    or failed write leaves nothing behind. ImageWriteError if ``path`` exists and not ``overwrite``, or on
    failure. The one atomic-write helper of ``recon`` (reports, provenance, measurement files, priors)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return _atomic_write(Path(os.fspath(path)), write, overwrite)


# ---------------------------------------------------------------------------------------------------------------
# Writing: NIfTI, PNG, NumPy


def _orthogonal(m: np.ndarray, tol: float = 1e-4) -> bool:
    norms = np.linalg.norm(m, axis=0)
    u = m / norms
    return bool(np.abs(u.T @ u - np.eye(3)).max() < tol)


def write_nifti(image: MedicalImage, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write ``image`` as NIfTI-1 (``.nii`` or ``.nii.gz``, float32 data) and return the path.

    The NIfTI data is ``image.array.transpose(2, 1, 0)`` (index order ``(i, j, k) = (W, H, D)``) with
    ``image.affine`` as its affine, so every voxel keeps its world position. sform and qform are both set
    (the codes read from a NIfTI input are kept, else 1 = scanner; the qform is left unset, code 0, when the
    affine is sheared, which a qform cannot represent); units mm; descrip ``"recon"`` (no patient data).
    """
    import nibabel as nib

    path = Path(os.fspath(path))
    if not _is_nifti(path):
        raise ImageWriteError(path, "not a NIfTI file name (expected .nii or .nii.gz)")
    _check_image(image, path)
    data = np.asarray(image.array.transpose(2, 1, 0), dtype=np.float32)
    if not np.isfinite(data).all():
        raise ImageWriteError(path, "values overflow float32 (expected |values| < 3.4e38)")
    affine = image.affine
    img = nib.Nifti1Image(data, affine)
    sform_code = int(image.meta.get("nifti_sform_code", 0) or 0) or 1
    qform_code = int(image.meta.get("nifti_qform_code", 0) or 0) or sform_code
    img.set_sform(affine, code=sform_code)
    if _orthogonal(affine[:3, :3]):
        img.set_qform(affine, code=qform_code)
    else:
        img.set_qform(None, code=0)
    img.header.set_xyzt_units(xyz="mm")
    img.header["descrip"] = b"recon"
    return _atomic_write(path, lambda tmp: nib.save(img, str(tmp)), overwrite)


def write_png(array2d: np.ndarray, path: str | os.PathLike, window: tuple[float, float] | None = None,
              overwrite: bool = False) -> str:
    """Write a 2D array ``(H, W)`` (or ``(1, H, W)``) as an 8-bit grayscale PNG (row 0 at the top) and return the
    path. Values are mapped linearly from ``window = (lo, hi)`` (e.g. ``(-1000, 1000)`` HU) to 0…255 and clipped;
    without a window, the 1st–99th percentile of the values."""
    from PIL import Image

    path = Path(os.fspath(path))
    a = np.asarray(array2d, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.size == 0:
        raise ImageWriteError(path, f"array of shape {a.shape} (expected a 2D image (H, W))")
    if not np.isfinite(a).all():
        raise ImageWriteError(path, "array contains NaN or infinite values (expected finite values)")
    if window is None:
        lo, hi = (float(v) for v in np.percentile(a, [1.0, 99.0]))
        if hi <= lo:
            lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            hi = lo + 1.0
    else:
        lo, hi = (float(v) for v in window)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ImageWriteError(path, f"window {window!r} (expected (lo, hi) with lo < hi)")
    u8 = np.round(np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    return _atomic_write(path, lambda tmp: Image.fromarray(u8).save(tmp, format="PNG"), overwrite)


def _write_npy(image: MedicalImage, path: Path, overwrite: bool) -> str:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, image.array)

    return _atomic_write(path, write, overwrite)


def write_image(image: MedicalImage, path: str | os.PathLike, *, format: str | None = None,
                reference: MedicalImage | None = None, description: str = "recon reconstruction",
                anonymize: bool = False, overwrite: bool = False, series_number: int | None = None) -> list[str]:
    """Write ``image`` in the format given by ``format`` or the path, and return the written paths.

    ``.nii``/``.nii.gz`` (or ``format="nifti"``): :func:`write_nifti`; ``.png``: :func:`write_png` of the middle
    slice ``D // 2`` (percentile window); ``.npy``: the ``(D, H, W)`` float64 array (no geometry); a path without
    suffix (or ``format="dicom"``): :func:`write_dicom_series` into that folder, with ``reference``,
    ``description`` and ``anonymize``. Raises ImageWriteError for an unknown format.
    """
    p = Path(os.fspath(path))
    name = p.name.lower()
    if format is not None:
        fmt = {"nii": "nifti", "nii.gz": "nifti", "nifti": "nifti", "dicom": "dicom", "dcm": "dicom",
               "png": "png", "npy": "npy", "numpy": "npy"}.get(str(format).lower().lstrip("."))
        if fmt is None:
            raise ImageWriteError(p, f"unknown format {format!r} (expected 'nifti', 'dicom', 'png' or 'npy')")
    elif _is_nifti(p):
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
    _check_image(image, p)
    if fmt == "png":
        return [write_png(image.array[image.array.shape[0] // 2], p, overwrite=overwrite)]
    return [_write_npy(image, p, overwrite)]


# ---------------------------------------------------------------------------------------------------------------
# Writing: DICOM


_PATIENT_STUDY_KEYWORDS = (
    # Patient module
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientIDsSequence", "OtherPatientNames", "EthnicGroup", "PatientComments", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence", "PatientSpeciesDescription",
    "PatientBreedDescription", "ResponsiblePerson", "ResponsibleOrganization",
    # General Study and Patient Study modules
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "ProcedureCodeSequence", "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight",
    "Occupation", "AdditionalPatientHistory",
    # Frame of Reference, and series attributes that describe the same patient set-up
    "FrameOfReferenceUID", "PositionReferenceIndicator", "PatientPosition", "BodyPartExamined", "Laterality",
)
_CT_KEYWORDS = ("KVP", "ConvolutionKernel")
_MR_KEYWORDS = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
                "EchoTime", "EchoTrainLength", "InversionTime", "MagneticFieldStrength", "ImagedNucleus")


def _fit_rescale(values: np.ndarray, ct: bool) -> tuple[np.ndarray, float, float]:
    """Stored integers, slope and intercept with ``stored * slope + intercept ≈ values``.

    CT: int16, slope 1 with intercept −1024 when the values fit (HU rounded to integers), else slope 1 with
    another intercept, else a slope that fits the range. Other modalities: uint16, exact (slope 1) for
    integer values spanning at most 65535, else the range mapped onto 0…65535."""
    from pydicom.valuerep import format_number_as_ds

    vmin, vmax = float(values.min()), float(values.max())
    integral = bool(np.all(np.abs(values - np.round(values)) < 1e-6))
    if ct:
        lo, hi = -32768, 32767
        if vmin + 1024 >= lo + 0.5 and vmax + 1024 <= hi - 0.5:
            slope, intercept = 1.0, -1024.0
        elif vmax - vmin <= hi - lo - 2:
            slope, intercept = 1.0, float(np.floor(vmin)) + 32767.0
        else:
            slope = (vmax - vmin) / (hi - lo - 1)
            intercept = (vmin + vmax) / 2.0
        dtype = np.int16
    else:
        lo, hi = 0, 65535
        if integral and vmin >= 0 and vmax <= hi:
            slope, intercept = 1.0, 0.0
        elif integral and vmax - vmin <= hi:
            slope, intercept = 1.0, float(np.round(vmin))
        else:
            slope = (vmax - vmin) / hi if vmax > vmin else 1.0
            intercept = vmin
        dtype = np.uint16
    slope, intercept = float(format_number_as_ds(slope)), float(format_number_as_ds(intercept))  # as stored
    stored = np.clip(np.round((values - intercept) / slope), lo, hi).astype(dtype)
    return stored, slope, intercept


def _now() -> tuple[str, str]:
    t = datetime.datetime.now()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S.%f")[:13]


def _software_version() -> str:
    try:
        from recon import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def write_dicom_series(image: MedicalImage, folder: str | os.PathLike, reference: MedicalImage | None = None,
                       description: str = "recon reconstruction", anonymize: bool = False,
                       overwrite: bool = False, series_number: int | None = None) -> list[str]:
    """Write ``image`` as a DICOM series, one file per slice (``IM00001.dcm``, ... in slice order), into
    ``folder``; returns the file paths.

    Geometry per slice from ``image.affine`` (RAS → LPS): ImagePositionPatient (centre of the first voxel of
    slice d), ImageOrientationPatient, PixelSpacing ``[row spacing, column spacing]``, SliceThickness and
    SpacingBetweenSlices (the slice step along the normal), InstanceNumber 1..D in array order.

    With ``reference.dicom_headers`` (the image it was reconstructed from), the series is a derived series of the
    same study that opens next to the original in a viewer: the patient and study modules, StudyInstanceUID and
    FrameOfReferenceUID are copied, with a new SeriesInstanceUID and SOPInstanceUIDs (pydicom ``generate_uid``),
    ImageType ``DERIVED\\SECONDARY``, SeriesDescription = ``description``, SeriesNumber = ``series_number`` or the
    reference's + 1000,
    and SourceImageSequence pointing to the reference slices when the slice counts match. Without a reference:
    a new study (new Study/FrameOfReference UIDs, empty patient module).

    SOP class: CT Image Storage for CT (int16, RescaleSlope 1 and RescaleIntercept −1024 when the values fit,
    RescaleType HU), MR Image Storage for MR, Secondary Capture otherwise (modality ``image.modality``, else the
    reference's, else ``"OT"``; uint16 with the slope/intercept that fit the value range). Explicit VR Little
    Endian with a proper file meta header. ``anonymize=True`` applies :func:`anonymize_dataset` to every slice
    (the Study/FrameOfReference UIDs are then replaced too, consistently across the series).

    Readers (this one included) order DICOM slices along the normal ``r × c`` of ImageOrientationPatient. When the
    image's slice axis points the other way (a left-handed index order in LPS, ``det(affine[:3, :3]) < 0``, e.g. a
    LAS NIfTI), reading the series back gives the D axis reversed, with an affine that keeps every voxel at the
    same world position.

    The series is written into a temporary folder next to ``folder`` and moved into place at the end; an existing
    non-empty ``folder`` raises ImageWriteError unless ``overwrite=True`` (then it is replaced as a whole).
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        CTImageStorage,
        ExplicitVRLittleEndian,
        MRImageStorage,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    folder = Path(os.fspath(folder))
    _check_image(image, folder)
    if folder.exists() and not folder.is_dir():
        raise ImageWriteError(folder, "is a file (expected a folder for the DICOM series)")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ImageWriteError(folder, "already exists and is not empty (pass overwrite=True, --overwrite on the "
                                      "command line, to replace it)")
    refs = reference.dicom_headers if reference is not None and reference.dicom_headers else None
    ref0 = refs[0] if refs else None
    modality = image.modality or (str(ref0.get("Modality", "")) if ref0 is not None else "") or (
        reference.modality if reference is not None else None) or ("CT" if image.unit == "HU" else "OT")
    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage}.get(modality, SecondaryCaptureImageStorage)

    # geometry, LPS
    lps = LPS_TO_RAS @ image.affine
    col, row = lps[:3, 0], lps[:3, 1]
    dx, dy = float(np.linalg.norm(col)), float(np.linalg.norm(row))
    r, c = col / dx, row / dy
    if abs(float(np.dot(r, c))) > 1e-4:
        raise ImageWriteError(folder, "the affine's row and column axes are not orthogonal (DICOM needs orthogonal "
                                      "in-plane axes)")
    normal = np.cross(r, c)
    depth = image.array.shape[0]
    along = float(abs(np.dot(lps[:3, 2], normal)))
    thickness = along if depth > 1 else float(np.linalg.norm(lps[:3, 2]))

    stored, slope, intercept = _fit_rescale(image.array, ct=modality == "CT")
    lo_w, hi_w = np.percentile(image.array, [1.0, 99.0])
    series_uid, study_uid, for_uid = generate_uid(), None, None
    if ref0 is not None:
        study_uid = str(ref0.get("StudyInstanceUID", "") or "") or None
        for_uid = str(ref0.get("FrameOfReferenceUID", "") or "") or None
    study_uid, for_uid = study_uid or generate_uid(), for_uid or generate_uid()
    ref_number = _number(ref0.get("SeriesNumber")) if ref0 is not None else None
    if series_number is None:
        series_number = int(ref_number) + 1000 if ref_number is not None else 1
    date, time = _now()
    image_type = ["DERIVED", "SECONDARY"]
    if ref0 is not None and "ImageType" in ref0 and len(ref0.ImageType) > 2:
        image_type += [str(v) for v in list(ref0.ImageType)[2:3]]
    software = _software_version()

    slices = []
    for d in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        if ref0 is not None:
            for kw in _PATIENT_STUDY_KEYWORDS + (_CT_KEYWORDS if modality == "CT" else ()) + (
                    _MR_KEYWORDS if modality == "MR" else ()):
                if kw in ref0:
                    ds[kw] = copy.deepcopy(ref0[kw])
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the copied values are re-encoded
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.ImageType = image_type
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        ds.ContentDate, ds.ContentTime = date, time
        ds.SeriesDate, ds.SeriesTime = date, time
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID",
                   "AccessionNumber", "PositionReferenceIndicator"):
            if kw not in ds:
                setattr(ds, kw, "")
        if "StudyDate" not in ds:
            ds.StudyDate, ds.StudyTime = date, time
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality = modality
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description[:64]
        ds.DerivationDescription = description[:1024]
        ds.Manufacturer = "recon"
        ds.SoftwareVersions = software
        ds.ImageComments = "Research reconstruction (recon); not for clinical use"
        ds.InstanceNumber = d + 1
        ds.BurnedInAnnotation = "NO"
        ipp = lps[:3, 3] + d * lps[:3, 2]
        ds.ImagePositionPatient = [_ds_text(v) for v in ipp]
        ds.ImageOrientationPatient = [_ds_text(v) for v in np.concatenate([r, c])]
        ds.PixelSpacing = [_ds_text(dy), _ds_text(dx)]
        ds.SliceThickness = _ds_text(thickness)
        if depth > 1:
            ds.SpacingBetweenSlices = _ds_text(along)
        ds.SliceLocation = _ds_text(float(np.dot(ipp, normal)))
        ds.set_pixel_data(stored[d], "MONOCHROME2", 16, generate_instance_uid=False)
        ds.RescaleSlope, ds.RescaleIntercept = _ds_text(slope), _ds_text(intercept)
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = ds.get("KVP", None)
            ds.AcquisitionNumber = None
        elif modality == "MR":
            ds.ScanningSequence = ds.get("ScanningSequence", "RM")
            ds.SequenceVariant = ds.get("SequenceVariant", "NONE")
            for kw in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
                if kw not in ds:
                    setattr(ds, kw, None)
        else:
            ds.ConversionType = "WSD"
        ds.WindowCenter = _ds_text(round(float(lo_w + hi_w) / 2.0, 3))
        ds.WindowWidth = _ds_text(round(max(float(hi_w - lo_w), 1e-3), 3))
        if refs is not None and len(refs) == depth and "SOPInstanceUID" in refs[d] and "SOPClassUID" in refs[d]:
            item = pydicom.Dataset()
            item.ReferencedSOPClassUID = refs[d].SOPClassUID
            item.ReferencedSOPInstanceUID = refs[d].SOPInstanceUID
            ds.SourceImageSequence = [item]
        if anonymize:
            anonymize_dataset(ds)
        slices.append(ds)

    # everything into a temporary folder next to the target, then moved into place
    created = _make_folder(folder.parent)
    try:
        tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:12]}.tmp"
        tmp.mkdir()  # permissions from the umask, as for any new folder
    except OSError as err:
        _remove_folders(created)
        raise ImageWriteError(folder.parent, f"cannot write into this folder ({err.strerror or err})") from err
    width = max(5, len(str(depth)))
    names = [f"IM{d + 1:0{width}d}.dcm" for d in range(depth)]
    backup = None
    try:
        for ds, name in zip(slices, names, strict=True):
            ds.save_as(tmp / name, enforce_file_format=True)
        if folder.exists():
            if any(folder.iterdir()):
                if not overwrite:
                    raise ImageWriteError(folder, "appeared while writing (not replaced; pass overwrite=True)")
                backup = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:12]}.old"
                os.rename(folder, backup)
            else:
                folder.rmdir()
        try:
            os.rename(tmp, folder)
        except BaseException:
            if backup is not None:
                os.rename(backup, folder)
                backup = None
            raise
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_folders(created)
        if isinstance(err, ImageWriteError):
            raise
        if isinstance(err, Exception):
            reason = err.strerror if isinstance(err, OSError) and err.strerror else _one_line(err)
            raise ImageWriteError(folder, f"writing failed, nothing written ({type(err).__name__}: {reason})") \
                from err
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return [str(folder / name) for name in names]


# ---------------------------------------------------------------------------------------------------------------
# De-identification

_ANON_SALT = secrets.token_hex(16)  # per process: replaced UIDs are consistent within a run, irreversible after it

_ANON_REMOVE = (
    "PatientAge", "PatientAddress", "PatientTelephoneNumbers", "PatientTelecomInformation", "OtherPatientIDs",
    "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientBirthTime",
    "MilitaryRank", "BranchOfService", "MedicalRecordLocator", "EthnicGroup", "Occupation",
    "AdditionalPatientHistory", "PatientComments", "PatientInsurancePlanCodeSequence", "CountryOfResidence",
    "RegionOfResidence", "PatientReligiousPreference", "InsurancePlanIdentification", "PatientSize", "PatientWeight",
    "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate", "PatientState",
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "ResponsiblePerson", "ResponsibleOrganization",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence", "OperatorIdentificationSequence", "RequestingPhysician",
    "RequestingService", "StationName", "DeviceSerialNumber", "PlateID", "DetectorID", "GantryID",
    "IssuerOfAccessionNumberSequence", "RequestAttributesSequence", "PerformedProcedureStepID",
    "ScheduledProcedureStepID", "RequestedProcedureID", "StudyComments", "ImageComments", "FrameComments",
    "RequestedProcedureComments", "InterpretationText", "OriginalAttributesSequence", "ModifiedAttributesSequence",
    "ReferencedPatientSequence", "ReferencedStudySequence", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "DischargeDiagnosisDescription", "ProtocolName", "PatientTransportArrangements",
    "DigitalSignaturesSequence",
)
_ANON_BLANK = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
               "ReferringPhysicianName")
_UID_KEEP = ("TransferSyntaxUID", "ImplementationClassUID", "CodingSchemeUID", "PrivateInformationCreatorUID",
             "ContextGroupExtensionCreatorUID", "MappingResourceUID")


def _anon_uid(uid: str) -> str:
    """A name-based UUID (RFC 4122 version 5) of the salted UID, as a ``2.25.`` UID (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, _ANON_SALT + uid.strip()).int}"


def _is_instance_uid(elem) -> bool:
    from pydicom.uid import UID_dictionary

    kw = elem.keyword or ""
    if kw.endswith("ClassUID") or kw in _UID_KEEP:
        return False
    values = [elem.value] if isinstance(elem.value, str) else list(elem.value)
    return not any(str(v) in UID_dictionary for v in values)  # well-known UIDs (SOP classes, syntaxes) are kept


def _anonymize_level(ds) -> None:
    for kw in _ANON_REMOVE:
        if kw in ds:
            del ds[kw]
    for tag in list(ds.keys()):
        if tag not in ds:
            continue
        elem = ds[tag]
        group = tag >> 16
        if (0x5000 <= group <= 0x50FF) or ((0x6000 <= group <= 0x60FF) and (tag & 0xFFFF) == 0x4000):
            del ds[tag]  # curves and overlay comments
            continue
        vr = elem.VR
        if vr == "SQ":
            for item in elem.value:
                _anonymize_level(item)
        elif elem.keyword in _ANON_BLANK or vr == "PN":
            elem.value = ""
        elif vr == "DA":
            elem.value = "20000101" if elem.value else elem.value
        elif vr == "TM":
            elem.value = "120000" if elem.value else elem.value
        elif vr == "DT":
            elem.value = "20000101120000" if elem.value else elem.value
        elif vr == "UI" and elem.value and _is_instance_uid(elem):
            if isinstance(elem.value, str):
                elem.value = _anon_uid(elem.value)
            else:
                elem.value = [_anon_uid(str(v)) for v in elem.value]


def anonymize_dataset(ds: Dataset) -> None:
    """De-identify a pydicom Dataset in place: the commonly used subset of the DICOM PS3.15 Annex E Basic
    Application Level Confidentiality Profile.

    - blanked (kept, empty): PatientName, PatientID, PatientBirthDate, PatientSex, AccessionNumber, StudyID,
      ReferringPhysicianName, and every other person name (PN) at any depth (physicians, operators, ...);
    - removed: patient age, size, weight, addresses, telephone numbers, other patient IDs/names, ethnic group,
      comments and histories, institution name/address/department, station name, device serial numbers,
      request/procedure-step IDs, original/modified attribute sequences, curves and overlay comments;
    - all private tags removed;
    - dates, times and date-times at any depth replaced by 20000101 / 120000 / 20000101120000 (patient birth date
      blanked);
    - instance UIDs (Study, Series, SOP Instance, Frame of Reference, referenced instances, file meta) replaced by
      ``2.25.…`` UIDs derived from the original and a random per-process salt: consistent within one run (slices
      of a series stay together), not reversible after it;
    - PatientIdentityRemoved = YES, DeidentificationMethod and DeidentificationMethodCodeSequence (DCM 113100).

    Kept: descriptions (study/series), modality, geometry, pixel data. Burned-in text in pixels is not checked.
    """
    from pydicom.dataset import Dataset as _Dataset

    ds.remove_private_tags()
    _anonymize_level(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        else:
            meta.MediaStorageSOPInstanceUID = _anon_uid(str(meta.MediaStorageSOPInstanceUID))
    if meta is not None and "SourceApplicationEntityTitle" in meta:
        del meta.SourceApplicationEntityTitle
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "recon: DICOM PS3.15 basic profile (subset)"
    code = _Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
