"""recon.datasets.io against independent references: pydicom's own pixel values and header geometry, nibabel's
affines, hand-built DICOM series (oblique, shuffled, irregular, mixed) written with pydicom, only offline files."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIB_DATA
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import generate_uid

from recon.datasets import io as rio
from recon.datasets.io import (
    ImageReadError,
    ImageWriteError,
    MedicalImage,
    anonymize_dataset,
    list_series,
    read_fastmri,
    read_image,
    write_dicom_series,
    write_image,
    write_nifti,
    write_png,
)

CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
MR_SMALL = get_testdata_file("MR_small.dcm", download=False)
CT5N = sorted(get_testdata_files("dicomdirtests/98892001/CT5N/*"))
CT2 = sorted(get_testdata_files("dicomdirtests/77654033/CT2/*"))  # 4 slices, one large gap
MR700 = sorted(get_testdata_files("dicomdirtests/98892003/MR700/*"))  # 7 radial slices, 7 orientations
ANATOMICAL = os.path.join(NIB_DATA, "anatomical.nii")
EXAMPLE4D = os.path.join(NIB_DATA, "example4d.nii.gz")


# ---------------------------------------------------------------------------------------------------------------
# Independent references and fixtures


def hu(ds) -> np.ndarray:
    """pydicom's stored values through the header's rescale: the truth for HU."""
    return ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def dicom_world_ras(ds) -> np.ndarray:
    """(H, W, 3) RAS world coordinates of every pixel centre of one DICOM slice, straight from its header:
    LPS = IPP + col · Δcol · r + row · Δrow · c (PS3.3 C.7.6.2.1.1), then RAS = (−x, −y, z)."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    d_row, d_col = (float(v) for v in ds.PixelSpacing)
    rows, cols = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
    lps = ipp + cols[..., None] * d_col * iop[:3] + rows[..., None] * d_row * iop[3:]
    return lps * np.array([-1.0, -1.0, 1.0])


def sha(paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_series(folder: Path, source=CT_SMALL, n=6, step=3.0, angles=(20.0, -30.0, 15.0), skip=(), seed=0,
                description="oblique test series") -> list[Path]:
    """Write ``n`` positioned copies of a pydicom test slice (distinct pixel values per slice) with an oblique
    orientation, slices ``step`` mm apart along the normal, shuffled InstanceNumbers and file names without
    extension. Positions listed in ``skip`` are left out (a gap)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rot = rotation(*angles)
    r, c, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    origin = np.array([-40.5, 20.25, 105.0])
    series_uid = generate_uid()
    keep = [k for k in range(n) if k not in skip]
    instance = rng.permutation(len(keep)) + 1
    names = rng.permutation(len(keep))
    paths = []
    for j, k in enumerate(keep):
        ds = pydicom.dcmread(source)
        arr = ds.pixel_array.astype(np.int32) + 7 * k
        ds.PixelData = arr.astype(ds.pixel_array.dtype).tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.InstanceNumber = int(instance[j])
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in np.concatenate([r, c])]
        ds.ImagePositionPatient = [f"{v:.8f}" for v in origin + k * step * normal]
        ds.SliceThickness = step
        path = folder / f"slice{names[j]:03d}"
        ds.save_as(path)
        paths.append(path)
    return paths


def copy_files(files, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        dst = folder / Path(f).name
        shutil.copyfile(f, dst)
        out.append(dst)
    return out


@pytest.fixture
def oblique(tmp_path):
    return make_series(tmp_path / "oblique")


def by_position(files) -> list:
    """The datasets sorted by their position along the normal (computed here, independently)."""
    dss = [pydicom.dcmread(f) for f in files]

    def key(ds):
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        return float(np.dot(np.cross(iop[:3], iop[3:]), [float(v) for v in ds.ImagePositionPatient]))

    return sorted(dss, key=key)


# ---------------------------------------------------------------------------------------------------------------
# 1. DICOM series: order, spacing, HU


def test_series_ordered_by_position_not_instance_number(tmp_path):
    """Truth: pydicom pixel_array · slope + intercept of each file, files sorted by IPP·normal computed here."""
    files = copy_files(CT5N, tmp_path / "ct5n")
    for f, number in zip(files, [3, 5, 1, 4, 2], strict=True):  # shuffle InstanceNumber
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = number
        ds.save_as(f)
    before = sha(files)
    img = read_image(tmp_path / "ct5n")
    assert sha(files) == before  # inputs untouched
    assert img.shape == (5, 16, 16) and img.modality == "CT" and img.unit == "HU"
    ordered = by_position(files)
    for d, ds in enumerate(ordered):
        np.testing.assert_array_equal(img.array[d], hu(ds))
    numbers = [int(ds.InstanceNumber) for ds in ordered]
    assert numbers != sorted(numbers)  # InstanceNumber order would have been wrong
    assert img.spacing == pytest.approx((2.5, 0.488281, 0.488281), abs=1e-6)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert img.meta["n_files"] == 5 and img.meta["rescale"] == {"slope": 1.0, "intercept": -1024.0}
    assert len(img.dicom_headers) == 5 and all("PixelData" not in h for h in img.dicom_headers)
    assert [float(h.ImagePositionPatient[2]) for h in img.dicom_headers] == sorted(
        float(ds.ImagePositionPatient[2]) for ds in ordered)


def test_oblique_series_shuffled_files_and_instance_numbers(oblique):
    img = read_image(oblique[0].parent)
    ordered = by_position(oblique)
    assert img.shape == (6, 128, 128)
    for d, ds in enumerate(ordered):
        np.testing.assert_array_equal(img.array[d], hu(ds))
    assert img.spacing == pytest.approx((3.0, 0.661468, 0.661468), abs=1e-5)
    assert "shear_deg" not in img.meta


def test_single_dicom_files_geometry_and_values():
    """CT_small and MR_small: D = 1, affine from the file's own IPP/IOP/PixelSpacing, third column SliceThickness."""
    for path, modality, unit in ((CT_SMALL, "CT", "HU"), (MR_SMALL, "MR", None)):
        ds = pydicom.dcmread(path)
        img = read_image(path)
        assert img.shape == (1, ds.Rows, ds.Columns) and img.modality == modality and img.unit == unit
        np.testing.assert_array_equal(img.array[0], hu(ds))
        w, h = np.meshgrid(np.arange(ds.Columns), np.arange(ds.Rows))
        world = np.einsum("ij,hwj->hwi", img.affine, np.stack([w, h, 0 * w, 1 + 0 * w], -1))[..., :3]
        np.testing.assert_allclose(world, dicom_world_ras(ds), atol=1e-4)
        assert img.spacing[0] == pytest.approx(float(ds.SliceThickness))


def test_enhanced_multiframe_ct_frames_by_position():
    """eCT_Supplemental (pydicom-data): frames ordered by PlanePositionSequence along the normal, geometry from
    the functional groups, rescale from PixelValueTransformationSequence."""
    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data not installed")
    ds = pydicom.dcmread(path)
    img = read_image(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipps = [np.array([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])
            for f in ds.PerFrameFunctionalGroupsSequence]
    order = np.argsort([np.dot(normal, p) for p in ipps])
    pvt = shared.PixelValueTransformationSequence[0]
    frames = ds.pixel_array.astype(np.float64) * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
    assert img.shape == (2, 512, 512)
    for d, k in enumerate(order):
        np.testing.assert_array_equal(img.array[d], frames[k])
        lps = img.affine @ [0, 0, d, 1]
        np.testing.assert_allclose(lps[:3] * [-1, -1, 1], ipps[k], atol=1e-4)
    d_row, d_col = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    assert img.spacing == pytest.approx((10.0, d_row, d_col))
    assert len(img.dicom_headers) == 2 and "PerFrameFunctionalGroupsSequence" not in img.dicom_headers[0]


def test_multiframe_without_geometry_is_stacked_and_flagged():
    path = get_testdata_file("emri_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data not installed")
    img = read_image(path)
    assert img.shape == (10, 64, 64) and "none in the file" in img.meta["geometry"]
    np.testing.assert_array_equal(img.array, pydicom.dcmread(path).pixel_array)


# ---------------------------------------------------------------------------------------------------------------
# 2. Geometry round trip DICOM → NIfTI, checked voxel by voxel with nibabel and the DICOM headers


@pytest.mark.parametrize("which", ["ct5n", "oblique"])
def test_dicom_to_nifti_world_coordinates_every_voxel(tmp_path, which):
    files = CT5N if which == "ct5n" else make_series(tmp_path / "obl", angles=(25.0, 35.0, -20.0), step=2.0)
    img = read_image(Path(files[0]).parent)
    out = write_nifti(img, tmp_path / "vol.nii.gz")
    nii = nib.load(out)
    data = np.asarray(nii.dataobj)
    assert data.shape == (img.shape[2], img.shape[1], img.shape[0])  # (i, j, k) = (W, H, D)
    assert int(nii.header["sform_code"]) > 0 and int(nii.header["qform_code"]) > 0
    assert nii.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(nii.get_qform(), nii.get_sform(), atol=1e-4)
    for f in files:
        ds = pydicom.dcmread(f)
        matches = [k for k in range(data.shape[2]) if np.array_equal(data[:, :, k].T, hu(ds))]
        assert len(matches) == 1  # this file's slice, found by its values
        rows, cols = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        ijk = np.stack([cols, rows, np.full_like(rows, matches[0]), np.ones_like(rows)], -1)
        world = np.einsum("ij,hwj->hwi", nii.affine, ijk)[..., :3]
        np.testing.assert_allclose(world, dicom_world_ras(ds), atol=1e-3)


def test_gantry_tilt_sheared_affine_exact(tmp_path):
    """Slices offset within their plane from one to the next (gantry tilt): the affine is sheared and still puts
    every voxel where the DICOM header says; the NIfTI sform keeps it, the qform is left unset."""
    files = make_series(tmp_path / "tilt", n=4, angles=(0, 0, 0), step=2.5)
    for f in files:
        ds = pydicom.dcmread(f)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        shift = np.array([0.0, (ipp[2] - 105.0) * np.tan(np.radians(12)), 0.0])  # along y, growing with z
        ds.ImagePositionPatient = [f"{v:.8f}" for v in ipp + shift]
        ds.save_as(f)
    img = read_image(tmp_path / "tilt")
    assert img.meta["shear_deg"] == pytest.approx(12.0, abs=1e-4)
    nii = nib.load(write_nifti(img, tmp_path / "tilt.nii"))
    assert int(nii.header["qform_code"]) == 0 and int(nii.header["sform_code"]) > 0
    for d, ds in enumerate(by_position(files)):
        w, h = np.meshgrid(np.arange(ds.Columns), np.arange(ds.Rows))
        ijk = np.stack([w, h, np.full_like(w, d), np.ones_like(w)], -1)
        for affine in (img.affine, nii.affine):
            np.testing.assert_allclose(np.einsum("ij,hwj->hwi", affine, ijk)[..., :3], dicom_world_ras(ds),
                                       atol=1e-3)
    write_dicom_series(img, tmp_path / "out", reference=img)
    back = read_image(tmp_path / "out")
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-5)


def test_dicom_without_preamble(tmp_path):
    """A raw DICOM data set (no 128-byte preamble, no file meta), as some old archives hold: read by content for
    a single file, by the .dcm suffix in a folder."""
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.dcmread(MR_SMALL)
    ds.preamble, ds.file_meta = None, FileMetaDataset()
    (tmp_path / "raw").mkdir()
    pydicom.dcmwrite(tmp_path / "raw" / "slice.dcm", ds, implicit_vr=True, little_endian=True)
    assert Path(tmp_path / "raw" / "slice.dcm").read_bytes()[128:132] != b"DICM"
    expected = hu(pydicom.dcmread(MR_SMALL))
    np.testing.assert_array_equal(read_image(tmp_path / "raw" / "slice.dcm").array[0], expected)
    np.testing.assert_array_equal(read_image(tmp_path / "raw").array[0], expected)


# ---------------------------------------------------------------------------------------------------------------
# 3. Derived DICOM series


def test_derived_dicom_series_values_positions_and_uids(tmp_path, oblique):
    src = read_image(oblique[0].parent)
    recon = src.with_array(src.array * 0.5 + 3.3)  # non-integer HU
    paths = write_dicom_series(recon, tmp_path / "derived", reference=src, description="DPS 4x test")
    assert len(paths) == 6 and all(Path(p).is_file() for p in paths)
    originals = {tuple(np.round([float(v) for v in ds.ImagePositionPatient], 4)): ds for ds in by_position(oblique)}
    written = [pydicom.dcmread(p) for p in paths]  # no force: a proper file meta header
    ref = pydicom.dcmread(oblique[0])
    for d, ds in enumerate(written):
        assert int(ds.InstanceNumber) == d + 1
        np.testing.assert_allclose(hu(ds), recon.array[d], atol=0.5 + 1e-6)  # int16, slope 1
        assert ds.pixel_array.dtype == np.int16 and float(ds.RescaleSlope) == 1.0
        orig = originals[tuple(np.round([float(v) for v in ds.ImagePositionPatient], 4))]  # same positions
        np.testing.assert_allclose(dicom_world_ras(ds), dicom_world_ras(orig), atol=1e-4)
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == "DPS 4x test" and ds.Modality == "CT"
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.StudyInstanceUID == ref.StudyInstanceUID and ds.FrameOfReferenceUID == ref.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != ref.SeriesInstanceUID and ds.PatientName == ref.PatientName
        assert int(ds.SeriesNumber) == int(ref.SeriesNumber) + 1000
    assert len({ds.SeriesInstanceUID for ds in written}) == 1
    sops = {ds.SOPInstanceUID for ds in written}
    assert len(sops) == 6 and not sops & {pydicom.dcmread(f).SOPInstanceUID for f in oblique}
    back = read_image(tmp_path / "derived")
    np.testing.assert_allclose(back.array, recon.array, atol=0.5 + 1e-6)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    assert back.unit == "HU"


def test_derived_mr_series_rescale_quantisation(tmp_path):
    files = make_series(tmp_path / "mr", source=MR_SMALL, n=3, step=1.5, angles=(0, 0, 0))
    src = read_image(tmp_path / "mr")
    values = src.array / 37.0 - 2.0  # float values, negative too
    paths = write_image(src.with_array(values), tmp_path / "out", reference=src)
    assert len(files) == 3 and len(paths) == 3
    step = (values.max() - values.min()) / 65535
    for d, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.pixel_array.dtype == np.uint16
        np.testing.assert_allclose(hu(ds), values[d], atol=step * 0.51 + 1e-9)
    back = read_image(tmp_path / "out")
    assert back.unit is None and back.modality == "MR"


def test_dicom_without_reference_is_a_new_secondary_series(tmp_path):
    img = MedicalImage(np.arange(2 * 4 * 5, dtype=float).reshape(2, 4, 5), np.diag([0.5, 0.7, 2.0, 1.0]))
    paths = write_image(img, tmp_path / "new", format="dicom")
    dss = [pydicom.dcmread(p) for p in paths]
    assert dss[0].SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and dss[0].Modality == "OT"
    assert dss[0].StudyInstanceUID == dss[1].StudyInstanceUID and dss[0].PatientName == ""
    back = read_image(tmp_path / "new")
    np.testing.assert_allclose(back.array, img.array, atol=1e-9)  # integers: stored exactly
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-6)


@pytest.mark.parametrize("lo, hi", [(-1024.0, 3071.0), (-40000.0, 20000.0), (-1e6, 1e6)])
def test_ct_int16_rescale_fits_any_range(tmp_path, lo, hi):
    """Truth: pydicom's stored int16 values through the written slope/intercept."""
    values = np.linspace(lo, hi, 2 * 8 * 8).reshape(2, 8, 8)
    img = MedicalImage(values, np.eye(4), modality="CT", unit="HU")
    paths = write_dicom_series(img, tmp_path / "ct")
    dss = [pydicom.dcmread(p) for p in paths]
    slope = float(dss[0].RescaleSlope)
    assert dss[0].pixel_array.dtype == np.int16 and dss[0].RescaleType == "HU"
    assert slope == 1.0 if hi - lo < 65000 else slope > 1.0
    for d, ds in enumerate(dss):
        np.testing.assert_allclose(hu(ds), values[d], atol=slope / 2 + 1e-6)


def test_anonymized_derived_series(tmp_path, oblique):
    src = read_image(oblique[0].parent)
    ref = pydicom.dcmread(oblique[0])
    assert str(ref.PatientName) and any(e.tag.is_private for e in ref)
    paths = write_dicom_series(src, tmp_path / "anon", reference=src, anonymize=True)
    secrets_ = [str(ref.PatientName).split("^")[0].encode(), str(ref.PatientID).encode(), ref.StudyInstanceUID.encode()]
    for p in paths:
        raw = Path(p).read_bytes()
        assert not any(s in raw for s in secrets_ if len(s) > 3), p  # not anywhere in the file
        ds = pydicom.dcmread(p)
        assert ds.PatientName == "" and ds.PatientID == "" and ds.PatientBirthDate == ""
        assert "PatientAge" not in ds and "InstitutionName" not in ds
        assert not any(e.tag.is_private for e in ds) and ds.PatientIdentityRemoved == "YES"
        assert ds.StudyDate == "" and "DeidentificationMethod" in ds  # PS3.15 Table E.1-1: Z
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    dss = [pydicom.dcmread(p) for p in paths]
    assert len({d.StudyInstanceUID for d in dss}) == 1 and len({d.SOPInstanceUID for d in dss}) == len(dss)
    np.testing.assert_allclose(read_image(tmp_path / "anon").array, src.array)


def test_anonymize_dataset_nested_names_dates_private():
    ds = pydicom.dcmread(CT_SMALL)
    item = pydicom.Dataset()
    item.PerformingPhysicianName = "House^Gregory"
    item.ScheduledProcedureStepStartDate = "20240229"
    ds.RequestedProcedureCodeSequence = [item]
    ds.InstitutionName = "Princeton-Plainsboro"
    ds.OtherPatientIDs = "X123"
    study = ds.StudyInstanceUID
    anonymize_dataset(ds)
    assert ds.PatientName == "" and ds.PatientID == "" and "OtherPatientIDs" not in ds
    assert "InstitutionName" not in ds and not any(e.tag.is_private for e in ds)
    assert "PerformingPhysicianName" not in ds.RequestedProcedureCodeSequence[0]  # X at any depth
    assert ds.RequestedProcedureCodeSequence[0].ScheduledProcedureStepStartDate == "20000101"
    assert ds.StudyInstanceUID != study and ds.StudyInstanceUID.startswith("2.25.")
    again = pydicom.dcmread(CT_SMALL)
    anonymize_dataset(again)
    assert again.StudyInstanceUID == ds.StudyInstanceUID  # consistent within a run
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage  # well-known UIDs kept


# ---------------------------------------------------------------------------------------------------------------
# 4. NIfTI


def test_nifti_read_write_round_trip(tmp_path):
    """Truth: nibabel's own array and affine of anatomical.nii (LAS, big-endian int16)."""
    ref = nib.load(ANATOMICAL)
    data = ref.get_fdata()
    img = read_image(ANATOMICAL)
    assert img.shape == (data.shape[2], data.shape[1], data.shape[0])
    np.testing.assert_array_equal(img.array, data.transpose(2, 1, 0))
    np.testing.assert_array_equal(img.affine, ref.affine)
    i, j, k = 7, 11, 13  # the same voxel, the same world point
    np.testing.assert_allclose(img.affine @ [i, j, k, 1], ref.affine @ [i, j, k, 1])
    assert img.array[k, j, i] == data[i, j, k]
    out = write_image(img, tmp_path / "anat.nii")
    back = nib.load(out[0])
    np.testing.assert_array_equal(back.get_fdata(), data)
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-5)
    assert nib.aff2axcodes(back.affine) == nib.aff2axcodes(ref.affine)
    again = read_image(out[0])
    np.testing.assert_array_equal(again.array, img.array)
    np.testing.assert_allclose(again.affine, img.affine, atol=1e-5)


def test_nifti_to_dicom_keeps_world_positions(tmp_path):
    """anatomical.nii is LAS (a left-handed index order in LPS): DICOM orders slices along r × c, so the D axis
    comes back reversed, and every voxel value still sits at the same world point (checked against nibabel)."""
    ref = nib.load(ANATOMICAL)
    img = read_image(ANATOMICAL)
    write_image(img, tmp_path / "anat")
    back = read_image(tmp_path / "anat")
    data = ref.get_fdata()
    w, h, d = np.meshgrid(*(np.arange(n) for n in back.shape[::-1]), indexing="ij")  # back's (W, H, D) grid
    world = np.einsum("ij,whdj->whdi", back.affine, np.stack([w, h, d, np.ones_like(w)], -1))
    ijk = np.rint(np.einsum("ij,whdj->whdi", np.linalg.inv(ref.affine), world)).astype(int)  # nibabel's voxel there
    np.testing.assert_allclose(np.einsum("ij,whdj->whdi", ref.affine, ijk), world, atol=1e-4)  # exactly on it
    np.testing.assert_array_equal(back.array.transpose(2, 1, 0), data[ijk[..., 0], ijk[..., 1], ijk[..., 2]])
    np.testing.assert_array_equal(back.array, img.array[::-1])


def test_nifti_4d_rejected_2d_accepted(tmp_path):
    with pytest.raises(ImageReadError, match=r"4D NIfTI.*2 volumes") as err:
        read_image(EXAMPLE4D)
    assert err.value.path == EXAMPLE4D and "\n" not in str(err.value)
    one = nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.diag([2.0, 3.0, 4.0, 1.0]))
    nib.save(one, tmp_path / "one.nii.gz")
    assert read_image(tmp_path / "one.nii.gz").shape == (6, 5, 4)
    flat = nib.Nifti1Image(np.arange(12, dtype=np.float32).reshape(3, 4), np.diag([2.0, 3.0, 4.0, 1.0]))
    nib.save(flat, tmp_path / "flat.nii")
    img = read_image(tmp_path / "flat.nii")
    assert img.shape == (1, 4, 3) and img.spacing == (4.0, 3.0, 2.0)


# ---------------------------------------------------------------------------------------------------------------
# 5. Irregular spacing, mixed series


def test_irregular_spacing_error_and_resample(tmp_path):
    """pydicom's CT2 series: slices at −99.48, 103.02, 104.27, 105.52 mm."""
    folder = tmp_path / "ct2"
    copy_files(CT2, folder)
    with pytest.raises(ImageReadError, match=r"gap of 202\.5 mm between slice positions -99\.48 and 103\.02") as err:
        read_image(folder)
    assert 'on_irregular="resample"' in str(err.value) and err.value.path == str(folder)
    img = read_image(folder, on_irregular="resample")
    assert img.shape == (165, 16, 16) and img.spacing[0] == pytest.approx(1.25, abs=1e-5)
    ordered = by_position(CT2)
    for d, ds in zip((0, 162, 163, 164), ordered, strict=True):  # original positions lie on the new grid
        np.testing.assert_allclose(img.array[d], hu(ds), atol=1e-6)
    np.testing.assert_allclose(img.array[81], (hu(ordered[0]) + hu(ordered[1])) / 2, atol=1e-6)  # linear
    assert img.meta["resampled"]["n_slices_in"] == 4 and len(img.dicom_headers) == 165


def test_missing_slice_in_oblique_series(tmp_path):
    full = read_image(make_series(tmp_path / "full", n=6)[0].parent)
    gap = make_series(tmp_path / "gap", n=6, skip=(3,))
    with pytest.raises(ImageReadError, match="gap of 6 mm"):
        read_image(gap[0].parent)
    img = read_image(gap[0].parent, on_irregular="resample")
    np.testing.assert_allclose(img.affine, full.affine, atol=1e-5)
    np.testing.assert_allclose(img.array[[0, 1, 2, 4, 5]], full.array[[0, 1, 2, 4, 5]], atol=1e-6)
    np.testing.assert_allclose(img.array[3], (full.array[2] + full.array[4]) / 2, atol=1e-6)


def test_duplicate_positions_rejected(tmp_path):
    files = make_series(tmp_path / "dup", n=3)
    extra = pydicom.dcmread(files[0])
    extra.SOPInstanceUID = generate_uid()
    extra.save_as(tmp_path / "dup" / "again")
    with pytest.raises(ImageReadError, match="duplicate slice position"):
        read_image(tmp_path / "dup")


def test_mixed_series_folder(tmp_path):
    folder = tmp_path / "mixed"
    copy_files(CT5N, folder / "a")
    copy_files([MR_SMALL], folder / "b")
    series = list_series(folder)
    assert [s.n_files for s in series] == [1, 5] or [s.n_files for s in series] == [5, 1]
    ct = next(s for s in series if s.modality == "CT")
    with pytest.raises(ImageReadError, match="2 DICOM series") as err:
        read_image(folder)
    msg = str(err.value)
    assert all(s.uid in msg for s in series) and "--series" in msg and "SmartScore - Gated 0.5 sec" in msg
    assert "(5 files" in msg and str(folder) in msg
    assert read_image(folder, series=ct.uid).shape == (5, 16, 16)
    index = series.index(ct)
    assert read_image(folder, series=index).shape == (5, 16, 16)
    assert read_image(folder, series=str(index)).shape == (5, 16, 16)
    assert read_image(folder, series="SmartScore - Gated 0.5 sec").shape == (5, 16, 16)
    with pytest.raises(ImageReadError, match="no series"):
        read_image(folder, series="nonsense")
    with pytest.raises(ImageReadError, match="index 7"):
        read_image(folder, series=7)


def test_mixed_orientations_and_sizes_rejected(tmp_path):
    with pytest.raises(ImageReadError, match="mixed slice orientations"):
        read_image(Path(MR700[0]).parent)
    files = make_series(tmp_path / "sizes", n=3)
    small = pydicom.dcmread(files[0])
    small.PixelData = small.pixel_array[:64, :64].copy().tobytes()
    small.Rows = small.Columns = 64
    small.save_as(files[0])
    with pytest.raises(ImageReadError, match="different sizes"):
        read_image(tmp_path / "sizes")


# ---------------------------------------------------------------------------------------------------------------
# 6. Bad inputs and outputs


def test_bad_inputs_name_the_path(tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "nope.nii"
    (tmp_path / "empty").mkdir()
    cases["empty folder"] = tmp_path / "empty"
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image")
    cases["non-DICOM file in a folder"] = tmp_path / "text"
    truncated = tmp_path / "trunc.dcm"
    truncated.write_bytes(Path(CT_SMALL).read_bytes()[:200])
    cases["truncated DICOM"] = truncated
    half = tmp_path / "half.dcm"
    half.write_bytes(Path(CT_SMALL).read_bytes()[:-5000])
    cases["truncated pixel data"] = half
    junk = tmp_path / "junk.nii"
    junk.write_bytes(os.urandom(400))
    cases["corrupt NIfTI"] = junk
    cut = tmp_path / "cut.nii"
    cut.write_bytes(Path(ANATOMICAL).read_bytes()[:5000])
    cases["truncated NIfTI"] = cut
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[1.0, np.nan], [0.0, 2.0]]))
    cases["NaN in .npy"] = nan
    cube = tmp_path / "4d.npy"
    np.save(cube, np.zeros((2, 2, 2, 2)))
    cases["4D array"] = cube
    mystery = tmp_path / "mystery.bin"
    mystery.write_bytes(b"\x01\x02 this is not an image at all" * 10)
    cases["unknown file"] = mystery
    hashes = sha(p for p in tmp_path.rglob("*") if p.is_file())
    for what, path in cases.items():
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and err.value.path == str(path), (what, msg)
        assert "\n" not in msg and "Traceback" not in msg, what
    assert sha(p for p in tmp_path.rglob("*") if p.is_file()) == hashes  # inputs unchanged
    with pytest.raises(ImageReadError, match="no such file or folder"):
        read_image(cases["missing"])
    with pytest.raises(ImageReadError, match="contains NaN"):
        read_image(nan)
    with pytest.raises(ImageReadError, match=r"no DICOM image files found .*notes\.txt"):
        read_image(cases["non-DICOM file in a folder"])


def test_truncated_file_in_series_named(tmp_path):
    folder = tmp_path / "ct5n"
    copy_files(CT5N, folder)
    (folder / "broken").write_bytes(Path(CT5N[0]).read_bytes()[:200])
    with pytest.raises(ImageReadError, match="corrupt or truncated") as err:
        read_image(folder)
    assert err.value.path == str(folder / "broken")
    (folder / "broken").unlink()
    (folder / "README.txt").write_text("a stray text file is skipped")
    img = read_image(folder)
    assert img.shape == (5, 16, 16) and img.meta["skipped_files"] == 1


def test_undecodable_transfer_syntax_named(tmp_path):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(CT_SMALL)
    ds.PixelData = encapsulate([ds.PixelData[:1000]])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.save_as(tmp_path / "video.dcm")
    with pytest.raises(ImageReadError, match=r"1\.2\.840\.10008\.1\.2\.4\.100 \(MPEG2") as err:
        read_image(tmp_path / "video.dcm")
    assert err.value.path == str(tmp_path / "video.dcm") and "convert" in str(err.value)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8 not really jpeg" * 4])
    ds.save_as(tmp_path / "jpeg.dcm")
    with pytest.raises(ImageReadError, match=r"corrupt.*JPEG Baseline") as err:  # a decoder is installed: no hint
        read_image(tmp_path / "jpeg.dcm")
    assert "pip install" not in str(err.value)


def test_existing_output_and_unwritable_folder(tmp_path):
    img = read_image(CT_SMALL)
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"precious")
    for path in (target, tmp_path / "x.png", tmp_path / "x.npy"):
        if not path.exists():
            path.write_bytes(b"precious")
        with pytest.raises(ImageWriteError, match="already exists") as err:
            write_image(img, path)
        assert err.value.path == str(path) and path.read_bytes() == b"precious"
    write_image(img, target, overwrite=True)
    assert nib.load(target).shape == (128, 128, 1)
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "keep.dcm").write_bytes(b"old")
    with pytest.raises(ImageWriteError, match="not empty"):
        write_dicom_series(img, tmp_path / "series")
    assert (tmp_path / "series" / "keep.dcm").read_bytes() == b"old"
    write_dicom_series(img, tmp_path / "series", overwrite=True)
    assert [p.name for p in (tmp_path / "series").iterdir()] == ["IM00001.dcm"]

    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    for writer in (lambda p: write_nifti(img, p / "x.nii"), lambda p: write_dicom_series(img, p / "dcm"),
                   lambda p: write_png(img.array[0], p / "x.png")):
        with pytest.raises(ImageWriteError) as err:
            writer(blocker)
        assert str(blocker) in str(err.value)
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ImageWriteError, match="not writable") as err:
            write_nifti(img, locked / "x.nii")
        assert err.value.path == str(locked)
    missing_parent = tmp_path / "new" / "deeper" / "x.nii.gz"
    write_nifti(img, missing_parent)  # missing folders are created
    assert missing_parent.is_file()
    with pytest.raises(ImageWriteError, match="output format"):
        write_image(img, tmp_path / "x.jpg")
    with pytest.raises(ImageWriteError, match="NaN"):
        write_image(img.with_array(np.full(img.shape, np.nan)), tmp_path / "nan.nii")
    assert not (tmp_path / "nan.nii").exists()


# ---------------------------------------------------------------------------------------------------------------
# 7. Atomic writes


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_failed_writes_leave_nothing(tmp_path, monkeypatch):
    img = read_image(CT_SMALL)
    out = tmp_path / "out"
    out.mkdir()

    def fail_replace(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(rio.os, "replace", fail_replace)
        for name in ("a.nii.gz", "b.png", "c.npy"):
            with pytest.raises(ImageWriteError, match="nothing written") as err:
                write_image(img, out / name)
            assert err.value.path == str(out / name)
    assert _listing(out) == []

    def partial_save(image, filename):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as m:
        m.setattr(nib, "save", partial_save)
        with pytest.raises(ImageWriteError, match="disk on fire"):
            write_nifti(img, out / "d.nii")
        (out / "old.nii").write_bytes(b"previous result")
        with pytest.raises(ImageWriteError):
            write_nifti(img, out / "old.nii", overwrite=True)
        assert (out / "old.nii").read_bytes() == b"previous result"  # the old file survives a failed overwrite
        with pytest.raises(ImageWriteError):
            write_nifti(img, out / "deep" / "er" / "e.nii")
    assert _listing(out) == ["old.nii"]  # no temporary files, no created folders

    volume = read_image(CT5N[0]).with_array(np.zeros((1, 16, 16)))
    calls = {"n": 0}
    real_save = pydicom.dataset.FileDataset.save_as

    def flaky_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(5, "Input/output error")
        return real_save(self, *args, **kwargs)

    five = read_image(Path(CT5N[0]).parent)
    with monkeypatch.context() as m:
        m.setattr(pydicom.dataset.FileDataset, "save_as", flaky_save)
        with pytest.raises(ImageWriteError, match="Input/output error") as err:
            write_dicom_series(five, out / "series", reference=five)
        assert err.value.path == str(out / "series")
    assert _listing(out) == ["old.nii"] and volume.shape == (1, 16, 16)


# ---------------------------------------------------------------------------------------------------------------
# Other formats and the data class


def test_numpy_png_tiff_inputs(tmp_path):
    from PIL import Image

    a = np.arange(6 * 7, dtype=np.float32).reshape(6, 7)
    np.save(tmp_path / "a.npy", a)
    img = read_image(tmp_path / "a.npy")
    assert img.shape == (1, 6, 7) and img.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(img.affine, np.eye(4))
    np.savez(tmp_path / "b.npz", image=np.stack([a, a + 1]), other=np.zeros(3))
    assert read_image(tmp_path / "b.npz").shape == (2, 6, 7)
    np.savez(tmp_path / "c.npz", x=np.zeros(3), y=np.zeros(3))
    with pytest.raises(ImageReadError, match="'image'"):
        read_image(tmp_path / "c.npz")
    rgb = np.zeros((5, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    lum = read_image(tmp_path / "rgb.png")
    assert lum.shape == (1, 5, 4)
    np.testing.assert_allclose(lum.array, 0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    g16 = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png").array[0], g16)
    import tifffile

    stack = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_allclose(read_image(tmp_path / "rgb.tif").array, lum.array)
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif").array, stack)


def test_png_output_window_and_middle_slice(tmp_path):
    from PIL import Image

    vol = np.stack([np.full((3, 4), v, dtype=float) for v in (-1000.0, 0.0, 1000.0)])
    vol[1, 0, 0] = 500.0
    img = MedicalImage(vol, np.eye(4))
    write_image(img, tmp_path / "mid.png")
    mid = np.asarray(Image.open(tmp_path / "mid.png"))
    assert mid.dtype == np.uint8 and mid.shape == (3, 4)
    write_png(vol[1], tmp_path / "win.png", window=(-1000, 1000))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "win.png"))[0, :2], [191, 128])
    with pytest.raises(ImageWriteError, match="2D"):
        write_png(vol, tmp_path / "v.png")


def test_fastmri_layout(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    ksp = (rng.standard_normal((2, 4, 8, 6)) + 1j * rng.standard_normal((2, 4, 8, 6))).astype(np.complex64)
    with h5py.File(tmp_path / "file.h5", "w") as f:
        f["kspace"] = ksp
        f["mask"] = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
        f["reconstruction_rss"] = np.ones((2, 4, 4), np.float32)
        f["ismrmrd_header"] = b"<ismrmrdHeader/>"
        f.attrs["acquisition"] = "CORPD_FBK"
        f.attrs["max"] = np.float64(0.5)
    out = read_fastmri(tmp_path / "file.h5")
    np.testing.assert_array_equal(out["kspace"], ksp)
    assert out["mask"].tolist() == [True, False, True, True, False, True]
    assert out["attrs"] == {"acquisition": "CORPD_FBK", "max": 0.5} and out["reconstruction"].shape == (2, 4, 4)
    assert out["ismrmrd_header"] == "<ismrmrdHeader/>"
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["image"] = np.zeros((2, 3, 3))
    with pytest.raises(ImageReadError, match="no 'kspace'"):
        read_fastmri(tmp_path / "bad.h5")
    (tmp_path / "not.h5").write_text("hello")
    with pytest.raises(ImageReadError, match="HDF5") as err:
        read_fastmri(tmp_path / "not.h5")
    assert err.value.path == str(tmp_path / "not.h5")
    with pytest.raises(ImageReadError, match="read_fastmri"):
        read_image(tmp_path / "file.h5")


def test_medical_image_basics():
    img = MedicalImage(np.zeros((4, 5)), np.diag([0.5, 0.7, 3.0, 1.0]), modality="MR")
    assert img.shape == (1, 4, 5) and img.spacing == (3.0, 0.7, 0.5) and img.array.dtype == np.float64
    new = img.with_array(np.ones((1, 4, 5)))
    assert new.modality == "MR" and new.meta is not img.meta and np.array_equal(new.affine, img.affine)
    with pytest.raises(ValueError, match="shape"):
        img.with_array(np.ones((2, 4, 5)))
    with pytest.raises(ValueError):
        MedicalImage(np.zeros((2, 2, 2, 2)), np.eye(4))
    with pytest.raises(ValueError):
        read_image(CT_SMALL, on_irregular="maybe")
    assert "shape=(1, 4, 5)" in repr(img)


def test_datasets_layer_imports_nothing_above_it():
    code = ("import sys, recon.datasets.io, recon.datasets; "
            "bad = [m for m in sys.modules if m.startswith(('recon.operators', 'recon.priors', 'recon.samplers', "
            "'recon.cli', 'torch'))]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
