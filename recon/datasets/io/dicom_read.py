"""Reading DICOM objects (pydicom): one file, classic or enhanced multi-frame, into rescaled 2D frames.

The rescale is taken per frame: the enhanced multi-frame functional groups first (per-frame, then shared), then the
top-level RescaleSlope/RescaleIntercept. A slope that is present must be a finite non-zero number and an intercept a
finite number (a slope of 0 or NaN is refused, not read as 1). Native pixel data shorter than Rows × Columns ×
frames is refused before anything is allocated; every frame must be present.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recon.datasets.io.errors import ImageReadError, one_line

__all__ = ["DICOM_SUFFIXES", "Frame", "dicom_frames", "ds_text", "floats", "has_dicom_preamble", "number",
           "read_dicom_dataset", "read_dicom_object"]

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_DICOMDIR_UID = "1.2.840.10008.1.3.10"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_COMPRESSION = 1000
_NOT_RECOGNISED = "not a recognised image file (expected DICOM, NIfTI .nii/.nii.gz, NumPy .npy/.npz, PNG or TIFF)"


@dataclass
class Frame:
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


def has_dicom_preamble(p: Path) -> bool:
    """Whether ``p`` starts with the DICOM Part 10 preamble (128 bytes, then ``DICM``).

    Args:
        p: a file.

    Returns:
        True if it does; False if not or unreadable.
    """
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def floats(p: Path, value, n: int, name: str) -> np.ndarray | None:
    """``n`` finite numbers from a DICOM multi-value, None when absent; ImageReadError naming ``name`` otherwise.

    Args:
        p: the file (for the message).
        value: the element's value.
        n: how many numbers are expected.
        name: the attribute's keyword.

    Returns:
        The values as float64, or None.
    """
    if value is None or value == "" or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        vals = np.array([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ImageReadError(p, f"malformed {name} {items!r} (expected {n} numbers)") from err
    if vals.size != n:
        raise ImageReadError(p, f"{name} has {vals.size} value(s) {[float(v) for v in vals]} (expected {n})")
    if not np.isfinite(vals).all():
        raise ImageReadError(p, f"malformed {name} {vals.tolist()} (expected {n} finite numbers)")
    return vals


def number(value) -> float | None:
    """``float(value)`` when it is a finite number, else None.

    Args:
        value: anything.

    Returns:
        The number or None.
    """
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def _rescale_value(p: Path, value, name: str) -> float | None:
    """A present numeric value (rescale, frame count) must be a finite number; None when absent or empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError) as err:
        raise ImageReadError(p, f"malformed {name} {value!r} (expected a number)") from err
    if not np.isfinite(x):
        raise ImageReadError(p, f"{name} is {x!r} (expected a finite number)")
    return x


def ds_text(value) -> str:
    """A number as a DICOM decimal string (at most 16 characters).

    Args:
        value: a number.

    Returns:
        The DS text.
    """
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _decode_hint(ts) -> str:
    """What to do about pixel data that pydicom cannot decode with the installed plug-ins."""
    name = str(getattr(ts, "name", ts))
    if "MPEG" in name or "HEVC" in name or "H.264" in name:
        return ("video transfer syntaxes are not decoded by pydicom: convert the file to an uncompressed "
                "transfer syntax first (e.g. gdcmconv --raw, or dcmdjpeg/dcmconv from DCMTK)")
    if "2000" in name or "HTJ2K" in name or "High-Throughput" in name:
        return "install a JPEG 2000 decoder: pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
    if "JPEG" in name:
        return "install a JPEG decoder: pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
    return ("install the pixel data decoders: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
            "(or python-gdcm)")


def _decoder_available(ts) -> bool:
    try:
        from pydicom.pixels.decoders.base import get_decoder

        return bool(get_decoder(ts).is_available)
    except Exception:
        return False


def _transfer_syntax(ds):
    """The dataset's transfer syntax; a raw dataset read with ``force`` gets the one it was read with."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None and getattr(ds, "original_encoding", (None, None))[0] is not None:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        if not hasattr(ds, "file_meta"):
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    return ts


def _check_native_length(ds, p: Path, n_frames: int, rows: int, cols: int) -> None:
    """Native pixel data must hold every frame: checked before pydicom allocates the array."""
    if "PixelData" not in ds:
        return
    bits = int(number(ds.get("BitsAllocated")) or 0)
    if bits <= 0:
        raise ImageReadError(p, f"BitsAllocated {ds.get('BitsAllocated')!r} (expected 1, 8, 16, 32 or 64)")
    expected = (n_frames * rows * cols * bits + 7) // 8
    have = len(ds.PixelData)
    if have < expected:
        raise ImageReadError(p, f"truncated pixel data: {have} bytes for {n_frames} frame(s) of {rows}×{cols} at "
                                f"{bits} bits (expected {expected} bytes)")


def _check_compressed_size(ds, p: Path, n_frames: int, rows: int, cols: int) -> None:
    """Compressed pixel data cannot expand beyond about 1000:1 (lossy JPEG 2000 reaches a few hundred): a header
    claiming more is refused before a decoder allocates the frames."""
    bits = int(number(ds.get("BitsAllocated")) or 16)
    claimed = n_frames * rows * cols * max(bits, 8) // 8
    have = len(ds.PixelData)
    if claimed > _MAX_COMPRESSION * have + (16 << 20):
        raise ImageReadError(p, f"the header claims {n_frames} frame(s) of {rows}×{cols} ({claimed} bytes) from "
                                f"{have} bytes of compressed pixel data (a damaged header?)")


def _dicom_pixels(ds, p: Path, n_frames: int) -> np.ndarray:
    """The stored pixel values as (frames, H, W); ImageReadError naming the transfer syntax when undecodable."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(p, "DICOM file without pixel data (truncated, or not an image object)")
    samples = int(number(ds.get("SamplesPerPixel", 1)) or 1)
    if samples != 1:
        raise ImageReadError(p, f"colour DICOM image (SamplesPerPixel = {samples}; expected grayscale, 1 sample)")
    rows, cols = int(number(ds.Rows) or 0), int(number(ds.Columns) or 0)
    if rows < 1 or cols < 1 or n_frames < 1:
        raise ImageReadError(p, f"image size {n_frames} frame(s) of {rows}×{cols} (expected positive sizes)")
    ts = _transfer_syntax(ds)
    compressed = ts is not None and getattr(ts, "is_compressed", False)
    if not compressed:
        _check_native_length(ds, p, n_frames, rows, cols)
    elif "PixelData" in ds:
        _check_compressed_size(ds, p, n_frames, rows, cols)
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as err:
        reason = f"[{type(err).__name__}: {one_line(err)}]"
        if compressed and not _decoder_available(ts):
            raise ImageReadError(p, f"cannot decode the pixel data with transfer syntax {ts} ({ts.name}): "
                                    f"{_decode_hint(ts)} {reason}") from err
        name = f"{ts} ({ts.name})" if ts is not None else "unknown"
        raise ImageReadError(p, f"corrupt or truncated pixel data (transfer syntax {name}) {reason}") from err
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


def _rescale(ds, p: Path, groups: tuple, enhanced: bool) -> tuple[float, float, str | None]:
    """(slope, intercept, RescaleType) of one frame: functional groups first, then the top level."""
    seq = "PixelValueTransformationSequence"
    slope = _rescale_value(p, _group_value(groups, seq, "RescaleSlope") if enhanced else None, "RescaleSlope")
    intercept = _rescale_value(p, _group_value(groups, seq, "RescaleIntercept") if enhanced else None,
                               "RescaleIntercept")
    rtype = _group_value(groups, seq, "RescaleType") if enhanced else None
    if slope is None:
        slope = _rescale_value(p, ds.get("RescaleSlope"), "RescaleSlope")
    if intercept is None:
        intercept = _rescale_value(p, ds.get("RescaleIntercept"), "RescaleIntercept")
    if rtype is None:
        rtype = ds.get("RescaleType")
    if str(ds.get("Modality", "")) == "RTDOSE":
        scaling = _rescale_value(p, ds.get("DoseGridScaling"), "DoseGridScaling")
        if scaling is not None:
            slope = (1.0 if slope is None else slope) * scaling  # stored dose → DoseUnits (Gy)
    if slope is not None and slope == 0:
        raise ImageReadError(p, "rescale slope is 0 (expected a non-zero RescaleSlope: every value would be the "
                                "intercept)")
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept), (
        str(rtype) if rtype else None)


def _geometry(ds, p: Path, groups: tuple, enhanced: bool, n_frames: int, k: int):
    """(ipp, iop, pixel spacing, thickness) of frame ``k``."""

    def get(seq, kw):
        v = _group_value(groups, seq, kw)
        return ds.get(kw) if v is None and (not enhanced or n_frames == 1) else v

    ipp = floats(p, get("PlanePositionSequence", "ImagePositionPatient"), 3, "ImagePositionPatient")
    iop = floats(p, get("PlaneOrientationSequence", "ImageOrientationPatient"), 6, "ImageOrientationPatient")
    if iop is None and enhanced:
        iop = floats(p, ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
    grid = ds.get("GridFrameOffsetVector")  # RT dose: frame positions as offsets along the normal
    if ipp is None and enhanced and grid is not None and len(grid) == n_frames and iop is not None:
        ipp0 = floats(p, ds.get("ImagePositionPatient"), 3, "ImagePositionPatient")
        if ipp0 is not None:
            normal = np.cross(iop[:3], iop[3:])
            ipp = ipp0 + float(grid[k]) * normal / np.linalg.norm(normal)
    ps = floats(p, get("PixelMeasuresSequence", "PixelSpacing") or ds.get("PixelSpacing"), 2, "PixelSpacing")
    if ps is not None and (ps <= 0).any():
        raise ImageReadError(p, f"PixelSpacing {ps.tolist()} (expected positive values)")
    thickness = number(get("PixelMeasuresSequence", "SliceThickness") or ds.get("SliceThickness"))
    if thickness is None or thickness <= 0:
        thickness = number(ds.get("SpacingBetweenSlices"))
    return ipp, iop, ps, thickness


def _frame_header(base, ipp, iop, ps, thickness, slope: float, intercept: float):
    """A per-frame header with this frame's geometry and rescale at the top level."""
    header = copy.deepcopy(base)
    if ipp is not None:
        header.ImagePositionPatient = [ds_text(v) for v in ipp]
    if iop is not None:
        header.ImageOrientationPatient = [ds_text(v) for v in iop]
    if ps is not None:
        header.PixelSpacing = [ds_text(v) for v in ps]
    if thickness is not None:
        header.SliceThickness = ds_text(thickness)
    header.RescaleSlope, header.RescaleIntercept = ds_text(slope), ds_text(intercept)
    header.NumberOfFrames = 1
    return header


def dicom_frames(ds, p: Path) -> list[Frame]:
    """Split one DICOM dataset (classic single frame or enhanced multi-frame) into rescaled frames.

    Args:
        ds: the dataset, with its pixel data.
        p: its file (for messages).

    Returns:
        One :class:`Frame` per frame, in file order.
    """
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(p, "DICOM object without Rows/Columns (truncated, or not an image)")
    frames_value = _rescale_value(p, ds.get("NumberOfFrames"), "NumberOfFrames")
    n_frames = int(frames_value) if frames_value else 1
    if frames_value is not None and frames_value != n_frames:
        raise ImageReadError(p, f"NumberOfFrames {frames_value!r} (expected a whole number)")
    pixels = _dicom_pixels(ds, p, n_frames)
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared0 = shared[0] if shared else None
    if per is not None and len(per) not in (0, n_frames):
        raise ImageReadError(p, f"{len(per)} per-frame functional groups for {n_frames} frames (expected one each)")
    enhanced = n_frames > 1 or bool(per) or shared0 is not None
    base = _header_without_pixels(ds)
    frames = []
    for k in range(n_frames):
        groups = ((per[k] if per else None), shared0) if enhanced else ()
        ipp, iop, ps, thickness = _geometry(ds, p, groups, enhanced, n_frames, k)
        slope, intercept, rtype = _rescale(ds, p, groups, enhanced)
        values = pixels[k].astype(np.float64) * slope + intercept
        if not np.isfinite(values).all() or float(np.abs(values).max()) > _FLOAT32_MAX:
            raise ImageReadError(p, f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g} give values beyond "
                                    "the float32 range (expected a plausible rescale)")
        header = _frame_header(base, ipp, iop, ps, thickness, slope, intercept) if enhanced else base
        frames.append(Frame(p, k if n_frames > 1 else None, values, ipp, iop,
                            (float(ps[0]), float(ps[1])) if ps is not None else None, thickness, slope, intercept,
                            rtype, header))
    return frames


def read_dicom_dataset(p: Path, *, header_only: bool, force: bool):
    """``pydicom.dcmread``.

    Args:
        p: the file.
        header_only: stop before the pixel data.
        force: read files without the Part 10 preamble.

    Returns:
        The pydicom Dataset.
    """
    import pydicom

    return pydicom.dcmread(str(p), stop_before_pixels=header_only, force=force)


def read_dicom_object(p: Path) -> list[Frame]:
    """Read one DICOM file (any extension) into its rescaled frames.

    Args:
        p: the file.

    Returns:
        Its frames (see :func:`dicom_frames`).

    Raises:
        ImageReadError: not DICOM, corrupt or truncated, a DICOMDIR, no image.
    """
    from pydicom.errors import InvalidDicomError

    preamble = has_dicom_preamble(p)
    try:
        ds = read_dicom_dataset(p, header_only=False, force=not preamble)
    except InvalidDicomError as err:
        raise ImageReadError(p, _NOT_RECOGNISED) from err
    except Exception as err:
        kind = "corrupt or truncated DICOM file" if preamble else "not a recognised image file"
        raise ImageReadError(p, f"{kind} ({type(err).__name__}: {one_line(err)})") from err
    if "SOPClassUID" not in ds and not ("Rows" in ds and "Columns" in ds):
        if preamble:
            raise ImageReadError(p, "corrupt or truncated DICOM file (no SOP Class UID or image size in its header)")
        raise ImageReadError(p, _NOT_RECOGNISED)
    if str(ds.get("SOPClassUID", "")) == _DICOMDIR_UID:
        raise ImageReadError(p, "a DICOMDIR index, not an image (pass the folder that holds the series)")
    return dicom_frames(ds, p)
