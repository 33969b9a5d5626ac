"""De-identification: the DICOM basic application-level confidentiality profile, and configurations without paths.

:func:`anonymize_dataset` applies PS3.15 Annex E, Table E.1-1 (basic profile column, no options) to every attribute
in :data:`PROFILE_ACTIONS`, which holds every attribute of the table that a ``recon`` output can carry (the patient,
study, series, equipment and image attributes copied from a reference series or written by ``recon``), and a few
more. Compound actions are resolved for CT/MR/secondary-capture image storage: ``Z/D`` → Z (the attribute is Type 2
there), ``X/Z``, ``X/D``, ``X/Z/D`` and ``X/Z/U*`` → X (Type 3). Attributes the table lists that cannot occur in
our outputs are named in ``docs/deidentification.md``. Beyond the table, more is removed than it asks: every
private tag, every other person name (Z), curves and overlay comments (X), every other date/time (dummy value)
and every other instance UID (U).

:func:`redact_config` removes input/output paths (which often carry patient names) from a configuration before
it is written next to an anonymised output.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

__all__ = ["PROFILE_ACTIONS", "WITHHELD", "anonymize_dataset", "anonymize_uid", "redact_config"]

_SALT = secrets.token_hex(16)  # per process: replaced UIDs are consistent within a run, irreversible after it

_X = (  # removed (X, and X/Z, X/D, X/Z/D, X/Z/U* resolved to X: Type 3 in our outputs)
    # patient
    "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers",
    "PatientTelecomInformation", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientBirthTime", "MilitaryRank", "BranchOfService",
    "MedicalRecordLocator", "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments",
    "PatientInsurancePlanCodeSequence", "CountryOfResidence", "RegionOfResidence", "PatientReligiousPreference",
    "InsurancePlanIdentification", "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus",
    "LastMenstrualDate", "PatientState", "IssuerOfPatientID", "ResponsiblePerson", "ResponsibleOrganization",
    "PatientTransportArrangements", "ReferencedPatientSequence", "ReferencedPatientPhotoSequence",
    "PatientSexNeutered",
    # study
    "StudyDescription", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "StudyComments", "ReasonForStudy", "RequestingPhysician", "RequestingService",
    "RequestedProcedureDescription", "RequestedProcedureID", "RequestedProcedureComments", "ReferencedStudySequence",
    "RequestAttributesSequence", "IssuerOfAccessionNumberSequence", "StudyIDIssuer", "DischargeDiagnosisDescription",
    "ReasonForVisit", "ReasonForVisitCodeSequence", "RequestedContrastAgent",
    # series, procedure steps, equipment
    "SeriesDescription", "SeriesDate", "SeriesTime", "ProtocolName", "OperatorsName", "OperatorIdentificationSequence",
    "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence", "PerformedProcedureStepID",
    "PerformedProcedureStepDescription", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime", "PerformedLocation", "PerformedStationName",
    "PerformedStationAETitle", "ScheduledProcedureStepID", "ReferencedPerformedProcedureStepSequence",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "StationName", "StationAETitle", "RetrieveAETitle", "DeviceSerialNumber", "DeviceUID", "DetectorID", "GantryID",
    "GeneratorID", "PlateID", "CassetteID", "DateOfLastCalibration", "TimeOfLastCalibration",
    "DateOfSecondaryCapture", "TimeOfSecondaryCapture", "UniqueDeviceIdentifier", "UDISequence",
    # image
    "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "InstanceCreationDate", "InstanceCreationTime",
    "DerivationDescription", "ImageComments", "FrameComments", "AcquisitionComments", "IdentifyingComments",
    "ImagePresentationComments", "SourceImageSequence", "ReferencedImageSequence", "ContrastBolusStartTime",
    "ContrastBolusStopTime", "TimezoneOffsetFromUTC", "IconImageSequence", "AcquisitionDeviceProcessingDescription",
    "InterpretationText", "OriginalAttributesSequence", "ModifiedAttributesSequence", "DigitalSignaturesSequence",
    "TextComments", "TextString", "OverlayDate", "OverlayTime", "CurveDate", "CurveTime",
)
_Z = (  # emptied (Z, and Z/D resolved to Z: Type 2 in our outputs)
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "ReferringPhysicianName", "ConsultingPhysicianName", "ContentDate", "ContentTime",
    "ContrastBolusAgent", "ContentCreatorName",
)
_D = (  # replaced by a dummy value of the same VR
    "PersonName", "VerifyingObserverName", "VerifyingOrganization", "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "Date", "Time", "DateTime",
    "VerificationDateTime", "DeviceLabel", "SpecimenIdentifier", "ContainerIdentifier",
)
_U = (  # replaced by a salted name-based UID, consistent within one run
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "MediaStorageSOPInstanceUID",
    "ReferencedSOPInstanceUID", "InstanceCreatorUID", "IrradiationEventUID", "ConcatenationUID",
    "DimensionOrganizationUID", "SynchronizationFrameOfReferenceUID", "ReferencedFrameOfReferenceUID",
    "RelatedFrameOfReferenceUID", "StorageMediaFileSetUID", "TargetUID", "AcquisitionUID", "UID",
)

PROFILE_ACTIONS: dict[str, str] = {**{k: "X" for k in _X}, **{k: "Z" for k in _Z}, **{k: "D" for k in _D},
                                   **{k: "U" for k in _U}}
"""Keyword → action of PS3.15 Table E.1-1 (basic profile, resolved for our image storage classes): ``"X"`` remove,
``"Z"`` empty, ``"D"`` dummy value, ``"U"`` consistent new UID. Attributes not listed are kept (K) unless a rule
of :func:`anonymize_dataset` beyond the table applies."""

_DUMMY = {"DA": "20000101", "TM": "000000", "DT": "20000101000000", "PN": "ANONYMIZED", "AS": "000Y",
          "DS": "0", "IS": "0"}
_UID_KEEP = ("TransferSyntaxUID", "ImplementationClassUID", "CodingSchemeUID", "PrivateInformationCreatorUID",
             "ContextGroupExtensionCreatorUID", "MappingResourceUID")


def anonymize_uid(uid: str) -> str:
    """A replacement UID: a name-based UUID (RFC 4122 version 5) of the salted UID, as ``2.25.…`` (PS3.5 B.2).

    Args:
        uid: the original UID.

    Returns:
        The same new UID for the same ``uid`` within this process; irreversible after it.
    """
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, _SALT + str(uid).strip()).int}"


def _is_instance_uid(elem) -> bool:
    from pydicom.uid import UID_dictionary

    kw = elem.keyword or ""
    if kw.endswith("ClassUID") or kw in _UID_KEEP:
        return False
    values = [elem.value] if isinstance(elem.value, str) else list(elem.value)
    return not any(str(v) in UID_dictionary for v in values)  # well-known UIDs (SOP classes, syntaxes) are kept


def _replace_uids(elem) -> None:
    if isinstance(elem.value, str):
        elem.value = anonymize_uid(elem.value)
    else:
        elem.value = [anonymize_uid(str(v)) for v in elem.value]


def _dummy(elem) -> None:
    if elem.VR == "SQ":
        elem.value = []
    elif elem.VR == "UI":
        _replace_uids(elem)
    else:
        elem.value = _DUMMY.get(elem.VR, "ANONYMIZED")


def _apply_table(ds, elem) -> bool:
    """Apply the table's action to ``elem``; False when the table does not list it."""
    action = PROFILE_ACTIONS.get(elem.keyword or "")
    if action is None:
        return False
    if action == "X":
        del ds[elem.tag]
    elif action == "Z":
        elem.value = [] if elem.VR == "SQ" else ""
    elif action == "D":
        _dummy(elem)
    elif elem.value:  # U
        _replace_uids(elem)
    return True


def _beyond_table(ds, elem) -> None:
    """Rules beyond the table for attributes it does not list: curves/overlay comments, names, dates, UIDs."""
    group, vr = elem.tag >> 16, elem.VR
    if (0x5000 <= group <= 0x50FF) or ((0x6000 <= group <= 0x60FF) and (elem.tag & 0xFFFF) == 0x4000):
        del ds[elem.tag]
    elif vr == "SQ":
        for item in elem.value:
            _anonymize_level(item)
    elif vr == "PN":
        elem.value = ""
    elif vr in ("DA", "TM", "DT") and elem.value:
        elem.value = _DUMMY[vr]
    elif vr == "UI" and elem.value and _is_instance_uid(elem):
        _replace_uids(elem)


def _anonymize_level(ds) -> None:
    for tag in list(ds.keys()):
        if tag not in ds:
            continue
        elem = ds[tag]
        if not _apply_table(ds, elem):
            _beyond_table(ds, elem)


def anonymize_dataset(ds: Dataset) -> None:
    """De-identify a pydicom Dataset in place: the DICOM PS3.15 basic application-level confidentiality profile.

    Every attribute in :data:`PROFILE_ACTIONS` gets its action at any depth (X removed, Z emptied, D a dummy
    value, U a new UID from :func:`anonymize_uid`, consistent within one run so that the slices of a series and
    the series of a study stay together); private tags are removed; attributes the table does not list are kept
    (K: modality, geometry, pixel data, acquisition parameters, ...), except that any other person name is
    emptied, any other date/time replaced by a dummy, any other instance UID replaced, curves and overlay comments
    removed. PatientIdentityRemoved = YES, DeidentificationMethod and DeidentificationMethodCodeSequence (DCM
    113100) are added. Burned-in text in the pixels is not checked (``recon`` writes BurnedInAnnotation = NO for
    its own images).

    Args:
        ds: the dataset (with ``file_meta`` if it has one); modified in place.
    """
    from pydicom.dataset import Dataset as _Dataset

    ds.remove_private_tags()
    _anonymize_level(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        else:
            meta.MediaStorageSOPInstanceUID = anonymize_uid(str(meta.MediaStorageSOPInstanceUID))
    if meta is not None and "SourceApplicationEntityTitle" in meta:
        del meta.SourceApplicationEntityTitle
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "recon: PS3.15 basic application confidentiality profile"
    code = _Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]
    ds.LongitudinalTemporalInformationModified = "REMOVED"


_PATH_KEYS = ("input", "output", "reference", "config", "prior", "checkpoint", "data", "out")
WITHHELD = "<withheld: anonymised run>"


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.lower().endswith(
        (".nii", ".nii.gz", ".dcm", ".npy", ".npz", ".png", ".tif", ".tiff", ".h5", ".yaml", ".json", ".csv"))


def _redact(value: Any, key: str) -> Any:
    if isinstance(value, Mapping):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, key) for v in value]
    if value is None:
        return None
    if key.lower() == "prior" and isinstance(value, str) and not _looks_like_path(value):
        return value  # a built-in prior's name
    if key.lower() in _PATH_KEYS or key.lower().endswith(("path", "file", "dir", "folder")):
        return WITHHELD
    if isinstance(value, str) and _looks_like_path(value):
        return WITHHELD
    return value


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a configuration without paths or file names, to write next to an anonymised output.

    Values of path keys (``input``, ``output``, ``reference``, ``config``, ``prior``, ``checkpoint``, ``data``,
    ``out``, and any key ending in ``path``, ``file``, ``dir`` or ``folder``), at any depth, and any string that
    looks like a path (holds a ``/`` or ``\\``, or ends in a medical/image/config file suffix) become
    :data:`WITHHELD`; None stays None, a built-in prior's name (``prior: default-ct``) is kept; everything
    else (method, steps, seed, options, ...) is kept.

    Args:
        config: the resolved configuration (nested dicts/lists of plain values).

    Returns:
        The redacted copy; ``config`` is not modified.
    """
    return {str(k): _redact(v, str(k)) for k, v in config.items()}
