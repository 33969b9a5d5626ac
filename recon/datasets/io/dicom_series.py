"""DICOM series: folders scanned and grouped by SeriesInstanceUID, frames checked and assembled into one volume.

Slices are ordered along the normal of ImageOrientationPatient (never by InstanceNumber); duplicate positions,
mixed orientations, sizes or spacings and irregular steps are refused (or, irregular steps, resampled on request).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from recon.datasets.io.dicom_read import (
    DICOM_SUFFIXES,
    Frame,
    dicom_frames,
    ds_text,
    floats,
    has_dicom_preamble,
    number,
    read_dicom_dataset,
    read_dicom_object,
)
from recon.datasets.io.errors import ImageReadError, one_line
from recon.datasets.io.image import LPS_TO_RAS, MedicalImage, SeriesInfo

__all__ = ["SPACING_RTOL", "list_series", "read_dicom_file", "read_dicom_folder", "scan_folder"]

SPACING_RTOL = 1e-2
"""Relative tolerance on slice steps: a step further than this fraction from the median step is irregular."""

_DUPLICATE_MM = 1e-3  # two slices closer than this along the normal are at the same position
_ORIENTATION_ATOL = 1e-4  # ImageOrientationPatient values closer than this are the same orientation
_DICOMDIR_UID = "1.2.840.10008.1.3.10"


def python_value(v):
    """A NumPy scalar/array or bytes as a plain Python value (for JSON-able metadata).

    Args:
        v: a value.

    Returns:
        The plain value.
    """
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _dicom_header_or_none(f: Path):
    """The header (no pixels) of a DICOM image file, None for other files; ImageReadError for corrupt DICOM."""
    if f.name.upper() == "DICOMDIR":
        return None
    preamble = has_dicom_preamble(f)
    if not preamble and f.suffix.lower() not in DICOM_SUFFIXES:
        return None
    try:
        ds = read_dicom_dataset(f, header_only=True, force=not preamble)
    except Exception as err:
        if not preamble:
            return None
        raise ImageReadError(f, f"corrupt or truncated DICOM file ({type(err).__name__}: {one_line(err)})") from err
    sop = ds.get("SOPClassUID")
    if sop is None:
        if "Rows" in ds and "Columns" in ds:
            return ds  # an image without SOP Class UID (older or converted files): read like any image
        if preamble:
            raise ImageReadError(f, "corrupt or truncated DICOM file (no SOP Class UID or image size in its header)")
        return None
    if str(sop) == _DICOMDIR_UID:  # Media Storage Directory (DICOMDIR)
        return None
    if "Rows" not in ds or "Columns" not in ds:
        if "Image" in str(getattr(sop, "name", "")) and "Storage" in str(getattr(sop, "name", "")):
            raise ImageReadError(f, "corrupt or truncated DICOM file (image header without Rows/Columns)")
        return None  # a non-image object (structured report, presentation state, ...)
    return ds


def scan_folder(folder: Path) -> tuple[list[SeriesInfo], list[Path]]:
    """The image series in a folder, and the files skipped (not DICOM, DICOMDIR, not images).

    Args:
        folder: the folder (searched recursively; hidden files skipped).

    Returns:
        ``(series, skipped)``: the series sorted by (SeriesNumber, SeriesInstanceUID), the skipped files.
    """
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
        n_frames = sum(int(number(ds.get("NumberOfFrames", 1)) or 1) for _, ds in members)
        series_number = number(ds0.get("SeriesNumber"))
        infos.append(SeriesInfo(uid=uid, description=str(ds0.get("SeriesDescription", "") or ""),
                                modality=str(ds0.get("Modality", "") or ""), n_files=len(members),
                                shape=(n_frames, int(ds0.Rows), int(ds0.Columns)),
                                files=[str(f) for f, _ in members],
                                number=int(series_number) if series_number is not None else None))
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


def read_dicom_folder(folder: Path, series, on_irregular: str) -> MedicalImage:
    """Read one series of a DICOM folder (see :func:`recon.datasets.io.read_image`).

    Args:
        folder: the folder (searched recursively).
        series: which series (UID, index or description), or None when there is one.
        on_irregular: ``"error"`` or ``"resample"``.

    Returns:
        The volume.
    """
    infos, skipped = scan_folder(folder)
    if not infos:
        what = (f"{len(skipped)} file(s) skipped as not DICOM images, e.g. {skipped[0].name}" if skipped
                else "the folder is empty")
        raise ImageReadError(folder, f"no DICOM image files found ({what}; expected a folder of DICOM files)")
    info = _choose_series(folder, infos, series)
    datasets, frames = [], []
    for name in info.files:
        f = Path(name)
        try:
            ds = read_dicom_dataset(f, header_only=False, force=not has_dicom_preamble(f))
        except Exception as err:
            raise ImageReadError(f, f"corrupt or truncated DICOM file ({type(err).__name__}: {one_line(err)})") \
                from err
        new = dicom_frames(ds, f)
        frames += new
        datasets.append(new[0].header)  # keep headers only: the pixel data is freed file by file
    image = _assemble(datasets, frames, folder, on_irregular,
                      f"DICOM series {info.uid} ({info.n_files} files) in {folder}")
    image.meta.update({"series_uid": info.uid, "n_files": info.n_files, "skipped_files": len(skipped)})
    return image


def read_dicom_file(p: Path, on_irregular: str) -> MedicalImage:
    """Read one DICOM file (classic, or enhanced multi-frame as a volume).

    Args:
        p: the file.
        on_irregular: ``"error"`` or ``"resample"`` (multi-frame files).

    Returns:
        The image.
    """
    frames = read_dicom_object(p)
    return _assemble([frames[0].header], frames, p, on_irregular, f"DICOM file {p}")


def list_series(folder: Path) -> list[SeriesInfo]:
    """The DICOM image series in a folder, in :func:`scan_folder`'s order.

    Args:
        folder: an existing folder.

    Returns:
        One :class:`SeriesInfo` per series.
    """
    return scan_folder(folder)[0]


def _series_meta(datasets: list, frames: list[Frame]) -> tuple[dict[str, Any], str | None, str | None]:
    """(meta, modality, unit) of a series."""
    ds0 = datasets[0]
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
        meta["pixel_padding_value"] = python_value(ds0.PixelPaddingValue)
    if rescale_types:
        meta["rescale_type"] = rescale_types[0] if len(rescale_types) == 1 else rescale_types
    unit = "HU" if modality == "CT" and all(t.upper() == "HU" for t in rescale_types) else None
    return meta, modality, unit


def _orientation(where: Path, frames: list[Frame]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row direction r, column direction c and normal r × c shared by every frame."""
    iops = np.stack([f.iop for f in frames])
    if np.abs(iops - iops[0]).max() > _ORIENTATION_ATOL:
        distinct = np.unique(np.round(iops / _ORIENTATION_ATOL) * _ORIENTATION_ATOL, axis=0)
        examples = ", ".join("[" + " ".join(f"{v:.4g}" for v in o) + "]" for o in distinct[:3])
        raise ImageReadError(where, f"mixed slice orientations in one series ({len(distinct)} different "
                                    f"ImageOrientationPatient values, e.g. {examples}; expected one orientation: "
                                    "localizer or radial images cannot form a volume)")
    r, c = iops[0][:3].copy(), iops[0][3:].copy()
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if nr < 1e-6 or nc < 1e-6 or abs(np.dot(r, c)) / (nr * nc) > 1e-3:
        raise ImageReadError(where, f"ImageOrientationPatient {iops[0].tolist()} has non-orthogonal or zero "
                                    "direction cosines (expected two orthogonal unit vectors)")
    r, c = r / nr, c / nc
    normal = np.cross(r, c)
    return r, c, normal / np.linalg.norm(normal)


def _in_plane_spacing(where: Path, frames: list[Frame], ds0, meta: dict) -> tuple[float, float]:
    """(row spacing dy, column spacing dx) shared by every frame."""
    spacings = [f.pixel_spacing for f in frames]
    if any(s is None for s in spacings):
        if not all(s is None for s in spacings):
            raise ImageReadError(where, "some slices lack PixelSpacing (expected every slice to have it)")
        fallback = floats(where, ds0.get("ImagerPixelSpacing"), 2, "ImagerPixelSpacing")
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
    return dy, dx


def _record_rescale(frames: list[Frame], meta: dict) -> None:
    thickness = frames[0].thickness
    if thickness is not None:
        meta["slice_thickness_mm"] = thickness
    slopes = sorted({f.slope for f in frames})
    intercepts = sorted({f.intercept for f in frames})
    meta["rescale"] = {"slope": slopes[0] if len(slopes) == 1 else [f.slope for f in frames],
                       "intercept": intercepts[0] if len(intercepts) == 1 else [f.intercept for f in frames]}


def _assemble(datasets: list, frames: list[Frame], where: Path, on_irregular: str, source: str) -> MedicalImage:
    """Check the frames form one regular volume, order them along the normal and build the MedicalImage."""
    ds0 = datasets[0]
    sizes = sorted({f.pixels.shape for f in frames})
    if len(sizes) > 1:
        raise ImageReadError(where, f"slices of different sizes {sizes} in one series (expected one rows×columns)")
    meta, modality, unit = _series_meta(datasets, frames)
    have = [f.ipp is not None and f.iop is not None for f in frames]
    if not all(have):
        if any(have):
            raise ImageReadError(where, "some slices lack ImagePositionPatient/ImageOrientationPatient "
                                        "(expected every slice to have them)")
        if len({f.file for f in frames}) > 1:
            raise ImageReadError(where, f"{len(frames)} files without ImagePositionPatient/ImageOrientationPatient: "
                                        "the order of the slices is unknown (expected positioned slices)")
        return _unpositioned(frames, ds0, modality, unit, source, meta)
    r, c, normal = _orientation(where, frames)
    dy, dx = _in_plane_spacing(where, frames, ds0, meta)
    positions = np.stack([f.ipp for f in frames])
    s = positions @ normal
    order = np.argsort(s, kind="stable")
    frames = [frames[i] for i in order]
    positions, s = positions[order], s[order]
    volume = np.stack([f.pixels for f in frames])
    headers = [f.header for f in frames]
    meta["slice_positions_mm"] = [float(v) for v in s]
    _record_rescale(frames, meta)
    thickness = frames[0].thickness
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
        h.ImagePositionPatient = [ds_text(v) for v in ipp]
        h.SliceLocation = ds_text(float(np.dot(ipp, normal)))
        h.InstanceNumber = k + 1
        new_headers.append(h)
    meta["resampled"]["n_slices_in"], meta["resampled"]["n_slices_out"] = len(s), n_out
    meta["slice_positions_mm"] = [float(v) for v in s_new]
    return out, new_headers


def _unpositioned(frames: list[Frame], ds0, modality, unit, source: str, meta: dict) -> MedicalImage:
    """Frames without patient geometry (CR, secondary capture, stripped multi-frame): stacked in file order on a
    grid with the known pixel spacing (else 1 mm), voxel [0, 0, 0] at the origin."""
    ps = frames[0].pixel_spacing
    if ps is None:
        alt = floats(frames[0].file, ds0.get("ImagerPixelSpacing"), 2, "ImagerPixelSpacing")
        ps = (float(alt[0]), float(alt[1])) if alt is not None and (alt > 0).all() else (1.0, 1.0)
    dz = number(ds0.get("SpacingBetweenSlices")) or frames[0].thickness or 1.0
    meta["geometry"] = ("none in the file (no ImagePositionPatient/ImageOrientationPatient): frames in file order "
                        f"on a {dz:.4g} × {ps[0]:.4g} × {ps[1]:.4g} mm grid at the origin")
    meta["rescale"] = {"slope": frames[0].slope, "intercept": frames[0].intercept}
    affine = np.diag([ps[1], ps[0], dz, 1.0])
    return MedicalImage(np.stack([f.pixels for f in frames]), affine, modality=modality, unit=unit, source=source,
                        meta=meta, dicom_headers=[f.header for f in frames])


# ---------------------------------------------------------------------------------------------------------------
# Writing: atomic files
