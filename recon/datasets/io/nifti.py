"""NIfTI-1/NIfTI-2 (``.nii``, ``.nii.gz``): verified reading and geometry-preserving writing.

Reading verifies before it trusts: the header is parsed alone first (nibabel), its dimensions, spacings, data
type and scaling are checked, and the size it implies is compared with the file's size *before* any voxel is
allocated; a gzip stream is read to its end with Python's :mod:`gzip`, which checks its CRC-32 and length, so a
damaged ``.nii.gz`` is refused instead of read with altered voxels.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from recon.datasets.io.atomic import atomic_write, check_image
from recon.datasets.io.errors import ImageReadError, ImageWriteError, one_line
from recon.datasets.io.image import MedicalImage

__all__ = ["is_nifti", "load_nifti_data", "read_nifti", "write_nifti"]

_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data by more than about 1032:1
_COMPLEX_CODES = (32, 1792, 2048)  # complex64, complex128, complex256
_RGB_CODES = (128, 2304)  # RGB24, RGBA32
_CIFTI_INTENTS = range(3000, 3100)
_CHUNK = 1 << 22


def is_nifti(p: Path) -> bool:
    """Whether ``p`` has a NIfTI file name.

    Args:
        p: a path.

    Returns:
        True for ``.nii`` and ``.nii.gz`` (any case).
    """
    name = p.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _image_class(p: Path, head: bytes):
    """The nibabel image class for a header starting with ``head`` (sizeof_hdr 348: NIfTI-1, 540: NIfTI-2)."""
    import nibabel as nib

    if len(head) < 4:
        raise ImageReadError(p, f"truncated NIfTI file ({len(head)} bytes; expected a 348- or 540-byte header)")
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    if 348 in sizes:
        return nib.Nifti1Image
    if 540 in sizes:
        return nib.Nifti2Image
    raise ImageReadError(p, "not a NIfTI file (the header size field is neither 348 nor 540)")


def _parse_header(p: Path, head: bytes):
    klass = _image_class(p, head)
    need = klass.header_class.template_dtype.itemsize
    if len(head) < need:
        raise ImageReadError(p, f"truncated NIfTI header ({len(head)} of {need} bytes)")
    try:
        return klass, klass.header_class.from_fileobj(io.BytesIO(head[:need]), check=False)
    except Exception as err:
        raise ImageReadError(p, f"malformed NIfTI header ({type(err).__name__}: {one_line(err)})") from err


def _check_dims(p: Path, hdr) -> tuple[int, ...]:
    """The data shape from ``dim``, with every dimension and spatial spacing checked."""
    dim = [int(v) for v in hdr["dim"]]
    if not 1 <= dim[0] <= 7:
        raise ImageReadError(p, f"NIfTI dim[0] = {dim[0]} (expected 1 to 7 dimensions)")
    shape = tuple(dim[1:1 + dim[0]])
    if min(shape) < 1:
        raise ImageReadError(p, f"NIfTI of shape {shape} has a zero or negative dimension (expected sizes ≥ 1)")
    pixdim = np.asarray(hdr["pixdim"], dtype=np.float64)[1:1 + min(3, dim[0])]
    for axis, (n, d) in enumerate(zip(shape, pixdim, strict=False)):
        if not np.isfinite(d) or (n > 1 and d <= 0):
            raise ImageReadError(p, f"NIfTI voxel size pixdim[{axis + 1}] = {d!r} (expected a positive finite "
                                    "spacing)")
    return shape


def _check_type(p: Path, hdr) -> None:
    code = int(hdr["datatype"])
    intent = int(hdr["intent_code"])
    if intent in _CIFTI_INTENTS:
        raise ImageReadError(p, f"a CIFTI file (NIfTI intent code {intent}: surface/grayordinate data, not an image "
                                "on a voxel grid; expected a NIfTI volume)")
    if code in _COMPLEX_CODES:
        raise ImageReadError(p, "complex-valued NIfTI (expected real values: pass its magnitude, e.g. "
                                "np.abs(img.get_fdata(dtype=np.complex128)), or k-space to read_fastmri)")
    if code in _RGB_CODES:
        raise ImageReadError(p, "RGB colour NIfTI (expected one grayscale value per voxel)")
    try:
        hdr.get_data_dtype()
    except Exception as err:
        raise ImageReadError(p, f"unknown NIfTI datatype code {code} (expected a numeric type)") from err
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if np.isinf(slope) or (np.isfinite(slope) and slope != 0 and not np.isfinite(inter)):
        raise ImageReadError(p, f"NIfTI scaling scl_slope = {slope!r}, scl_inter = {inter!r} (expected finite "
                                "values)")


def _data_bytes(p: Path, hdr, shape: tuple[int, ...]) -> tuple[int, int]:
    """(voxel offset, number of voxel bytes) implied by the header."""
    offset = float(hdr["vox_offset"])
    size_hdr = int(hdr.template_dtype.itemsize)
    if not np.isfinite(offset) or offset < size_hdr:
        raise ImageReadError(p, f"NIfTI vox_offset {offset!r} (expected at least the {size_hdr}-byte header)")
    itemsize = hdr.get_data_dtype().itemsize
    return int(offset), int(np.prod(shape, dtype=object)) * itemsize


def _read_gzip(p: Path, needed: int, compressed: int) -> bytes:
    """The first ``needed`` bytes of the gzip stream, after reading all of it (CRC-32 and length verified)."""
    if needed > compressed * _MAX_DEFLATE_RATIO + 4096:
        raise ImageReadError(p, f"the NIfTI header claims {needed} bytes of image, more than a {compressed}-byte "
                                "gzip file can hold (a damaged header, or a truncated file)")
    try:
        with gzip.open(p, "rb") as f:
            data = f.read(needed)
            while f.read(_CHUNK):  # the rest is read (and dropped) so that gzip checks the CRC and length
                pass
    except (OSError, EOFError, zlib.error) as err:
        raise ImageReadError(p, f"damaged gzip stream (CRC, length or deflate data invalid, or truncated: "
                                f"{one_line(err)}); the file is corrupt") from err
    if len(data) < needed:
        raise ImageReadError(p, f"truncated NIfTI data ({len(data)} of {needed} bytes)")
    return data


def _read_plain(p: Path, needed: int) -> bytes:
    size = p.stat().st_size
    if size < needed:
        raise ImageReadError(p, f"truncated NIfTI file: the header implies {needed} bytes, the file has {size}")
    with open(p, "rb") as f:
        return f.read(needed)


def _head(p: Path, gz: bool) -> bytes:
    try:
        if gz:
            with gzip.open(p, "rb") as f:
                return f.read(540)
        with open(p, "rb") as f:
            return f.read(540)
    except (OSError, EOFError, zlib.error) as err:
        raise ImageReadError(p, f"damaged gzip stream (deflate data invalid or truncated: {one_line(err)}); "
                                "the file is corrupt") from err


def load_nifti_data(p: Path, allow_4d: bool = False) -> tuple[np.ndarray, Any]:
    """The verified voxel values of a NIfTI file, in NIfTI index order, and its nibabel image.

    Args:
        p: a ``.nii`` or ``.nii.gz`` file (a gzip stream is recognised by its magic bytes, whatever the suffix).
        allow_4d: accept more than one volume (4th dimension > 1); else such a file is refused.

    Returns:
        ``(data, img)``: float64 data of shape ``(i, j, k)`` (``(i, j, k, t)`` with ``allow_4d``; a 2D image gets
        ``k = 1``) after the NIfTI scaling, and the nibabel image (header and affine).

    Raises:
        ImageReadError: a damaged gzip stream, a truncated file, a header with zero, negative or non-finite
            dimensions or spacings, non-finite scaling, complex, RGB or CIFTI data, more than 4 dimensions.
    """
    with open(p, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    klass, hdr = _parse_header(p, _head(p, gz))
    shape = _check_dims(p, hdr)
    _check_type(p, hdr)
    if len(shape) > 4:
        raise ImageReadError(p, f"NIfTI of shape {shape} (expected a 2D or 3D image)")
    if len(shape) == 4 and shape[3] != 1 and not allow_4d:
        raise ImageReadError(p, f"4D NIfTI of shape {shape} ({shape[3]} volumes, e.g. fMRI or diffusion); expected "
                                "one 3D volume (extract one first, e.g. nibabel's img.slicer[..., 0]; a 4th "
                                "dimension of 1 is accepted)")
    offset, nbytes = _data_bytes(p, hdr, shape)
    needed = offset + nbytes
    raw = _read_gzip(p, needed, p.stat().st_size) if gz else _read_plain(p, needed)
    try:
        img = klass.from_bytes(raw)
        data = np.asarray(img.get_fdata(dtype=np.float64))
    except Exception as err:
        raise ImageReadError(p, f"corrupt NIfTI data ({type(err).__name__}: {one_line(err)})") from err
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 4 and not allow_4d:
        data = data[..., 0]
    return data, img


def _nifti_meta(p: Path, img, shape: tuple[int, ...], affine: np.ndarray) -> dict[str, Any]:
    """Format facts, kept for writing: the sform/qform codes and the xyz/t units (``affine`` is rescaled to mm)."""
    header = img.header
    meta: dict[str, Any] = {"format": "NIfTI", "nifti_shape": shape}
    xyz_unit, t_unit = header.get_xyzt_units()
    scale = {"meter": 1000.0, "micron": 1e-3}.get(xyz_unit, 1.0)
    if scale != 1.0:  # nibabel leaves the affine in the header's units; we promise mm
        affine[:3, :] *= scale
        meta["converted"] = f"affine from {xyz_unit} to mm"
    meta["nifti_xyz_unit"], meta["nifti_t_unit"] = xyz_unit, t_unit
    for code in ("sform_code", "qform_code"):
        meta[f"nifti_{code}"] = int(header[code])
    return meta


def read_nifti(p: Path) -> MedicalImage:
    """Read a NIfTI file as a :class:`MedicalImage` (see :func:`load_nifti_data` for what is verified).

    Args:
        p: the file.

    Returns:
        The image: ``array = data.transpose(2, 1, 0)`` with nibabel's affine (in mm); ``meta`` carries the sform
        and qform codes and the xyz/t units, which :func:`write_nifti` writes back.
    """
    data, img = load_nifti_data(p)
    shape = tuple(int(n) for n in img.shape)
    affine = np.array(img.affine, dtype=np.float64)
    meta = _nifti_meta(p, img, shape, affine)
    array = np.ascontiguousarray(data.transpose(2, 1, 0))  # (i, j, k) → (D, H, W) = (k, j, i)
    return MedicalImage(array, affine, source=f"NIfTI file {p}", meta=meta)


def _orthogonal(m: np.ndarray, tol: float = 1e-4) -> bool:
    norms = np.linalg.norm(m, axis=0)
    u = m / norms
    return bool(np.abs(u.T @ u - np.eye(3)).max() < tol)


def write_nifti(image: MedicalImage, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write ``image`` as NIfTI-1 (``.nii`` or ``.nii.gz``, float32 data) and return the path.

    The NIfTI data is ``image.array.transpose(2, 1, 0)`` (index order ``(i, j, k) = (W, H, D)``) with
    ``image.affine`` as its affine, so every voxel keeps its world position. sform and qform are both set
    (the codes read from a NIfTI input are kept, else 1 = scanner; the qform is left unset, code 0, when the
    affine is sheared, which a qform cannot represent); spatial unit mm (the affine is in mm), time unit kept
    from a NIfTI input; descrip ``"recon"`` (no patient data).

    Args:
        image: the image.
        path: ``.nii`` or ``.nii.gz`` file name.
        overwrite: replace an existing file.

    Returns:
        The path written.
    """
    import nibabel as nib

    path = Path(os.fspath(path))
    if not is_nifti(path):
        raise ImageWriteError(path, "not a NIfTI file name (expected .nii or .nii.gz)")
    check_image(image, path)
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
    t_unit = str(image.meta.get("nifti_t_unit", "unknown") or "unknown")
    img.header.set_xyzt_units(xyz="mm", t=t_unit if t_unit in ("sec", "msec", "usec", "hz", "ppm", "rads")
                              else None)
    img.header["descrip"] = b"recon"
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)), overwrite)
