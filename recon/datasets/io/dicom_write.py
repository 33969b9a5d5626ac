"""Writing DICOM: a derived series (one file per slice) that opens next to its reference in a viewer.

Geometry comes from the image's affine (RAS → LPS); patient and study modules from the reference series, else an
empty patient module and a new study. A series derived from a NIfTI (no reference) still carries what viewers
expect of CT/MR image storage: PatientPosition (``HFS`` unless the image says otherwise), FrameOfReferenceUID,
position/orientation/spacing per slice, window centre/width.
"""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recon.datasets.io.atomic import check_image, make_folder, remove_folders
from recon.datasets.io.deidentify import anonymize_dataset
from recon.datasets.io.dicom_read import ds_text, number
from recon.datasets.io.errors import ImageWriteError, one_line
from recon.datasets.io.image import LPS_TO_RAS, MedicalImage

__all__ = ["write_dicom_series"]

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

@dataclass
class _Plan:
    """Everything shared by the slices of one derived series."""

    modality: str
    sop_class: str
    refs: list | None
    lps: np.ndarray
    r: np.ndarray
    c: np.ndarray
    normal: np.ndarray
    dx: float
    dy: float
    along: float
    thickness: float
    stored: np.ndarray
    slope: float
    intercept: float
    window: tuple[float, float]
    uids: tuple[str, str, str]  # study, series, frame of reference
    series_number: int
    image_type: list[str]
    date: str
    time: str
    description: str
    patient_position: str


def _geometry(image: MedicalImage, folder: Path) -> dict[str, Any]:
    lps = LPS_TO_RAS @ image.affine
    col, row = lps[:3, 0], lps[:3, 1]
    dx, dy = float(np.linalg.norm(col)), float(np.linalg.norm(row))
    r, c = col / dx, row / dy
    if abs(float(np.dot(r, c))) > 1e-4:
        raise ImageWriteError(folder, "the affine's row and column axes are not orthogonal (DICOM needs orthogonal "
                                      "in-plane axes)")
    normal = np.cross(r, c)
    along = float(abs(np.dot(lps[:3, 2], normal)))
    thickness = along if image.array.shape[0] > 1 else float(np.linalg.norm(lps[:3, 2]))
    return {"lps": lps, "r": r, "c": c, "normal": normal, "dx": dx, "dy": dy, "along": along, "thickness": thickness}


def _plan(image: MedicalImage, folder: Path, reference: MedicalImage | None, description: str,
          series_number: int | None) -> _Plan:
    from pydicom.uid import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, generate_uid

    refs = reference.dicom_headers if reference is not None and reference.dicom_headers else None
    ref0 = refs[0] if refs else None
    modality = image.modality or (str(ref0.get("Modality", "")) if ref0 is not None else "") or (
        reference.modality if reference is not None else None) or ("CT" if image.unit == "HU" else "OT")
    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage}.get(modality, SecondaryCaptureImageStorage)
    stored, slope, intercept = _fit_rescale(image.array, ct=modality == "CT")
    lo_w, hi_w = np.percentile(image.array, [1.0, 99.0])
    study_uid = str(ref0.get("StudyInstanceUID", "") or "") if ref0 is not None else ""
    for_uid = str(ref0.get("FrameOfReferenceUID", "") or "") if ref0 is not None else ""
    ref_number = number(ref0.get("SeriesNumber")) if ref0 is not None else None
    if series_number is None:
        series_number = int(ref_number) + 1000 if ref_number is not None else 1
    image_type = ["DERIVED", "SECONDARY"]
    if ref0 is not None and "ImageType" in ref0 and len(ref0.ImageType) > 2:
        image_type += [str(v) for v in list(ref0.ImageType)[2:3]]
    position = str(ref0.get("PatientPosition", "") or "") if ref0 is not None else ""
    position = position or str(image.meta.get("patient_position", "") or "") or "HFS"
    date, time = _now()
    return _Plan(modality=modality, sop_class=sop_class, refs=refs, **_geometry(image, folder), stored=stored,
                 slope=slope, intercept=intercept, window=(float(lo_w), float(hi_w)),
                 uids=(study_uid or generate_uid(), generate_uid(), for_uid or generate_uid()),
                 series_number=series_number, image_type=image_type, date=date, time=time, description=description,
                 patient_position=position)


def _base_dataset(plan: _Plan):
    """A new slice dataset with file meta, and the reference's patient/study attributes copied."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = plan.sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    if plan.refs is not None:
        ref0 = plan.refs[0]
        for kw in _PATIENT_STUDY_KEYWORDS + (_CT_KEYWORDS if plan.modality == "CT" else ()) + (
                _MR_KEYWORDS if plan.modality == "MR" else ()):
            if kw in ref0:
                ds[kw] = copy.deepcopy(ref0[kw])
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the copied values are re-encoded
    ds.SOPClassUID, ds.SOPInstanceUID = plan.sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def _identify(ds, plan: _Plan, d: int) -> None:
    """Type, dates, UIDs, numbers, descriptions of slice ``d``."""
    ds.ImageType = plan.image_type
    ds.InstanceCreationDate, ds.InstanceCreationTime = plan.date, plan.time
    ds.ContentDate, ds.ContentTime = plan.date, plan.time
    ds.SeriesDate, ds.SeriesTime = plan.date, plan.time
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID",
               "AccessionNumber", "PositionReferenceIndicator"):
        if kw not in ds:
            setattr(ds, kw, "")
    if "StudyDate" not in ds:
        ds.StudyDate, ds.StudyTime = plan.date, plan.time
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = plan.uids
    ds.Modality = plan.modality
    ds.SeriesNumber = plan.series_number
    ds.SeriesDescription = plan.description[:64]
    ds.DerivationDescription = plan.description[:1024]
    ds.Manufacturer = "recon"
    ds.SoftwareVersions = _software_version()
    ds.ImageComments = "Research reconstruction (recon); not for clinical use"
    ds.InstanceNumber = d + 1
    ds.BurnedInAnnotation = "NO"
    if "PatientPosition" not in ds or not ds.PatientPosition:
        ds.PatientPosition = plan.patient_position


def _place(ds, plan: _Plan, d: int) -> None:
    """Geometry and pixels of slice ``d``."""
    ipp = plan.lps[:3, 3] + d * plan.lps[:3, 2]
    ds.ImagePositionPatient = [ds_text(v) for v in ipp]
    ds.ImageOrientationPatient = [ds_text(v) for v in np.concatenate([plan.r, plan.c])]
    ds.PixelSpacing = [ds_text(plan.dy), ds_text(plan.dx)]
    ds.SliceThickness = ds_text(plan.thickness)
    if plan.stored.shape[0] > 1:
        ds.SpacingBetweenSlices = ds_text(plan.along)
    ds.SliceLocation = ds_text(float(np.dot(ipp, plan.normal)))
    ds.set_pixel_data(plan.stored[d], "MONOCHROME2", 16, generate_instance_uid=False)
    ds.RescaleSlope, ds.RescaleIntercept = ds_text(plan.slope), ds_text(plan.intercept)
    if plan.modality == "CT":
        ds.RescaleType = "HU"
        ds.KVP = ds.get("KVP", None)
        ds.AcquisitionNumber = None
    elif plan.modality == "MR":
        ds.ScanningSequence = ds.get("ScanningSequence", "RM")
        ds.SequenceVariant = ds.get("SequenceVariant", "NONE")
        for kw in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
            if kw not in ds:
                setattr(ds, kw, None)
    else:
        ds.ConversionType = "WSD"
    lo_w, hi_w = plan.window
    ds.WindowCenter = ds_text(round((lo_w + hi_w) / 2.0, 3))
    ds.WindowWidth = ds_text(round(max(hi_w - lo_w, 1e-3), 3))


def _slice_dataset(plan: _Plan, d: int, anonymize: bool):
    import pydicom

    ds = _base_dataset(plan)
    _identify(ds, plan, d)
    _place(ds, plan, d)
    refs = plan.refs
    if refs is not None and len(refs) == plan.stored.shape[0] and "SOPInstanceUID" in refs[d] \
            and "SOPClassUID" in refs[d]:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = refs[d].SOPClassUID
        item.ReferencedSOPInstanceUID = refs[d].SOPInstanceUID
        ds.SourceImageSequence = [item]
    if anonymize:
        anonymize_dataset(ds)
    return ds


def _move_into_place(tmp: Path, folder: Path, overwrite: bool) -> Path | None:
    """Rename ``tmp`` to ``folder``; an existing folder is renamed aside first (returned, to delete later)."""
    backup = None
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
        raise
    return backup


def _save_series(slices: list, folder: Path, overwrite: bool) -> list[str]:
    """Everything into a temporary folder next to the target, then moved into place."""
    created = make_folder(folder.parent)
    try:
        tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:12]}.tmp"
        tmp.mkdir()  # permissions from the umask, as for any new folder
    except OSError as err:
        remove_folders(created)
        raise ImageWriteError(folder.parent, f"cannot write into this folder ({err.strerror or err})") from err
    width = max(5, len(str(len(slices))))
    names = [f"IM{d + 1:0{width}d}.dcm" for d in range(len(slices))]
    try:
        for ds, name in zip(slices, names, strict=True):
            ds.save_as(tmp / name, enforce_file_format=True)
        backup = _move_into_place(tmp, folder, overwrite)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_folders(created)
        if isinstance(err, ImageWriteError):
            raise
        if isinstance(err, Exception):
            reason = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)
            raise ImageWriteError(folder, f"writing failed, nothing written ({type(err).__name__}: {reason})") \
                from err
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return [str(folder / name) for name in names]


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

    PatientPosition is copied from the reference, else ``image.meta["patient_position"]``, else ``HFS``.

    The series is written into a temporary folder next to ``folder`` and moved into place at the end; an existing
    non-empty ``folder`` raises ImageWriteError unless ``overwrite=True`` (then it is replaced as a whole).

    Args:
        image: the image.
        folder: the series folder.
        reference: the image it was derived from (its DICOM headers), or None.
        description: SeriesDescription and DerivationDescription.
        anonymize: de-identify every slice (:func:`recon.datasets.io.deidentify.anonymize_dataset`).
        overwrite: replace an existing non-empty folder.
        series_number: SeriesNumber (default: the reference's + 1000, else 1).

    Returns:
        The written file paths, in slice order.
    """
    folder = Path(os.fspath(folder))
    check_image(image, folder)
    if folder.exists() and not folder.is_dir():
        raise ImageWriteError(folder, "is a file (expected a folder for the DICOM series)")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ImageWriteError(folder, "already exists and is not empty (pass overwrite=True, --overwrite on the "
                                      "command line, to replace it)")
    plan = _plan(image, folder, reference, description, series_number)
    slices = [_slice_dataset(plan, d, anonymize) for d in range(image.array.shape[0])]
    return _save_series(slices, folder, overwrite)
