"""Regression tests for issue 19: inputs are verified before they are trusted, one reading path for training and
reconstruction, de-identification by PS3.15 Table E.1-1, NIfTI space codes and units kept. Each test checks
against something independent of our readers: Python's gzip, nibabel, pydicom, tifffile, SimpleITK."""

from __future__ import annotations

import gzip
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from recon.datasets import (
    ImageReadError,
    MedicalImage,
    anonymize_dataset,
    check_plausible,
    read_image,
    redact_config,
    write_dicom_series,
    write_nifti,
)
from recon.datasets.io.deidentify import PROFILE_ACTIONS, WITHHELD
from recon.datasets.slices import SliceReadError, read_slices

CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
MR_SMALL = get_testdata_file("MR_small.dcm", download=False)
MR_RLE = get_testdata_file("MR_small_RLE.dcm", download=False)
NIB_DICOM = Path(nib.__file__).parent / "nicom" / "tests" / "data"


def _one_line_naming(err: pytest.ExceptionInfo, path: Path | str) -> None:
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert isinstance(err.value, ImageReadError)


def _nifti(tmp_path: Path, data: np.ndarray, name: str = "x.nii", **header) -> Path:
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    for key, value in header.items():
        img.header[key] = value
    path = tmp_path / name
    nib.save(img, str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
# NIfTI


def test_damaged_gzip_stream_is_refused_as_python_gzip_does(tmp_path):
    data = np.arange(40 * 40 * 20, dtype=np.int16).reshape(40, 40, 20)
    good = _nifti(tmp_path, data, "good.nii.gz")
    raw = bytearray(good.read_bytes())
    raw[-6] ^= 0xFF  # the stored CRC-32: the deflate stream still decodes, the data no longer matches it
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(OSError):  # the independent reference: Python's gzip refuses it
        gzip.decompress(bytes(raw))
    with pytest.raises(ImageReadError, match="gzip") as err:
        read_image(bad)
    _one_line_naming(err, bad)
    np.testing.assert_array_equal(read_image(good).array, data.transpose(2, 1, 0))


def test_header_claiming_a_huge_image_is_refused_fast_and_small(tmp_path):
    path = _nifti(tmp_path, np.zeros((30, 30, 30), np.int16), "huge.nii")
    hdr = nib.load(str(path)).header.copy()
    hdr.set_data_shape((1500, 1500, 1500))
    hdr["vox_offset"] = 352
    raw = path.read_bytes()
    path.write_bytes(hdr.binaryblock + raw[348:])  # a 54 KB file whose header claims 1500³ int16
    gz = tmp_path / "huge.nii.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    for p in (path, gz):
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(ImageReadError, match=r"claims|truncated") as err:
            read_image(p)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seconds < 1.0 and peak < 100e6, (seconds, peak)
        _one_line_naming(err, p)


@pytest.mark.parametrize("edit, match", [
    ({"dim": [3, 4, 0, 5, 1, 1, 1, 1]}, "zero or negative dimension"),
    ({"pixdim": [1, 2, float("nan"), 3, 1, 1, 1, 1]}, "pixdim"),
    ({"pixdim": [1, 2, -1, 3, 1, 1, 1, 1]}, "pixdim"),
    ({"scl_slope": float("inf")}, "scl_slope"),
    ({"scl_slope": 2.0, "scl_inter": float("inf")}, "scl_inter"),
    ({"dim": [9, 4, 4, 5, 1, 1, 1, 1]}, "dim\\[0\\]"),
])
def test_implausible_nifti_headers_are_refused(tmp_path, edit, match):
    path = _nifti(tmp_path, np.ones((4, 4, 5), np.float32), "h.nii")
    hdr = nib.load(str(path)).header.copy()
    raw = path.read_bytes()
    hdr["vox_offset"] = 352
    for key, value in edit.items():
        hdr[key] = value
    path.write_bytes(hdr.binaryblock + raw[348:])
    with pytest.raises(ImageReadError, match=match) as err:
        read_image(path)
    _one_line_naming(err, path)


def test_complex_rgb_and_cifti_nifti_get_clear_messages(tmp_path):
    cplx = _nifti(tmp_path, (np.ones((4, 4, 3)) + 1j).astype(np.complex64), "c.nii")
    with pytest.raises(ImageReadError, match="complex-valued NIfTI") as err:
        read_image(cplx)
    _one_line_naming(err, cplx)
    rgb = np.zeros((4, 4, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = _nifti(tmp_path, rgb, "rgb.nii")
    assert nib.load(str(path)).header["datatype"] == 128
    with pytest.raises(ImageReadError, match="RGB") as err:
        read_image(path)
    _one_line_naming(err, path)
    from nibabel import cifti2

    axis = cifti2.ScalarAxis(["a"])
    brain = cifti2.BrainModelAxis.from_mask(np.ones((2, 2, 2), bool), affine=np.eye(4))
    cifti = tmp_path / "x.dscalar.nii"
    cifti2.Cifti2Image(np.ones((1, 8), np.float32), header=(axis, brain)).to_filename(str(cifti))
    with pytest.raises(ImageReadError, match="CIFTI") as err:
        read_image(cifti)
    _one_line_naming(err, cifti)


def test_nifti_space_codes_and_units_survive_round_trips(tmp_path):
    img = nib.Nifti1Image(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32), np.diag([2, 2, 3, 1.0]))
    img.set_sform(img.affine, code=2)
    img.set_qform(img.affine, code=4)
    img.header.set_xyzt_units("mm", "msec")
    src = tmp_path / "in.nii.gz"
    nib.save(img, str(src))
    out = tmp_path / "out.nii.gz"
    write_nifti(read_image(src).with_array(read_image(src).array * 2), out)
    back = nib.load(str(out))
    assert int(back.header["sform_code"]) == 2 and int(back.header["qform_code"]) == 4
    assert back.header.get_xyzt_units() == ("mm", "msec")
    np.testing.assert_allclose(back.affine, img.affine)


# ---------------------------------------------------------------------------------------------------------------
# TIFF, NumPy


def test_truncated_multipage_tiff_is_refused(tmp_path):
    from PIL import Image

    pages = np.arange(2 * 64 * 64, dtype=np.uint16).reshape(2, 64, 64)
    frames = [Image.fromarray(p) for p in pages]
    full = tmp_path / "two.tif"
    frames[0].save(full, save_all=True, append_images=frames[1:])
    import tifffile

    with tifffile.TiffFile(full) as tf:
        assert len(tf.pages) == 2
        second_ifd = tf.pages[1].offset
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[:second_ifd - 4])  # page 1 complete, page 2 gone
    with pytest.raises(ImageReadError, match="TIFF") as err:
        read_image(cut)
    _one_line_naming(err, cut)
    np.testing.assert_array_equal(read_image(full).array, pages)


# ---------------------------------------------------------------------------------------------------------------
# DICOM


@pytest.mark.parametrize("slope, match", [("0", "slope is 0"), ("NaN", "finite"), ("1e300", "float32 range")])
def test_bad_rescale_slope_is_refused_naming_the_file(tmp_path, slope, match):
    ds = pydicom.dcmread(CT_SMALL)
    ds["RescaleSlope"].value = slope
    path = tmp_path / "slope.dcm"
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=match) as err:
        read_image(path)
    _one_line_naming(err, path)
    with pytest.raises(SliceReadError, match=match):
        list(read_slices(path))


def test_one_value_pixel_spacing_gets_a_clear_message(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds.PixelSpacing = "0.5"
    path = tmp_path / "ps.dcm"
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"PixelSpacing has 1 value\(s\)") as err:
        read_image(path)
    _one_line_naming(err, path)


def test_rle_reads_with_pydicoms_own_decoder_and_corrupt_rle_gets_no_install_hint(tmp_path):
    np.testing.assert_array_equal(read_image(MR_RLE).array[0], pydicom.dcmread(MR_SMALL).pixel_array)
    ds = pydicom.dcmread(MR_RLE)
    ds.PixelData = ds.PixelData[:200]
    path = tmp_path / "rle.dcm"
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="RLE") as err:
        read_image(path)
    _one_line_naming(err, path)
    assert "pip install" not in str(err.value)


def test_truncated_native_pixel_data_refused_before_allocation(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds.NumberOfFrames = 100000  # claims 100000 frames of 128² in 32 KB
    path = tmp_path / "frames.dcm"
    ds.save_as(path)
    tracemalloc.start()
    with pytest.raises(ImageReadError, match="truncated pixel data") as err:
        read_image(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100e6
    _one_line_naming(err, path)


def test_compressed_pixel_data_claiming_a_huge_image_refused_before_decoding(tmp_path):
    ds = pydicom.dcmread(MR_RLE)
    ds.Rows, ds.Columns = 60000, 60000  # 7.2 GB claimed from 6 KB of RLE data
    path = tmp_path / "huge_rle.dcm"
    ds.save_as(path)
    tracemalloc.start()
    with pytest.raises(ImageReadError, match="claims") as err:
        read_image(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100e6
    _one_line_naming(err, path)


def test_decimal_rescale_file_does_not_make_its_folder_refused(tmp_path):
    src = NIB_DICOM / "decimal_rescale.dcm"
    alone = read_image(src)
    ds = pydicom.dcmread(src)
    assert "SOPClassUID" not in ds  # why the folder used to be refused
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(alone.array[0], expected)
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(src, folder / "decimal_rescale.dcm")
    np.testing.assert_allclose(read_image(folder).array, alone.array)


def test_training_and_reconstruction_read_an_enhanced_rescale_alike(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    group = pydicom.Dataset()
    item = pydicom.Dataset()
    item.RescaleSlope, item.RescaleIntercept, item.RescaleType = "2", "-2000", "HU"
    group.PixelValueTransformationSequence = [item]
    ds.SharedFunctionalGroupsSequence = [group]  # functional groups disagree with the top-level rescale
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    expected = ds.pixel_array.astype(np.float64) * 2 - 2000  # the functional group wins (PS3.3 C.7.6.16)
    (training,) = list(read_slices(path))
    np.testing.assert_array_equal(training, expected)
    np.testing.assert_array_equal(read_image(path).array[0], expected)


def test_derived_series_from_nifti_carries_patient_position(tmp_path):
    img = MedicalImage(np.random.default_rng(1).normal(0, 100, (3, 8, 9)), np.diag([-1.0, -1.5, 2.0, 1.0]),
                       modality="CT", unit="HU")
    paths = write_dicom_series(img, tmp_path / "series")
    for p in paths:
        ds = pydicom.dcmread(p)
        assert ds.PatientPosition == "HFS" and ds.FrameOfReferenceUID and ds.SOPClassUID == pydicom.uid.CTImageStorage
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    volume = reader.Execute()
    assert volume.GetSize() == (9, 8, 3)
    np.testing.assert_allclose(volume.GetSpacing(), (1.0, 1.5, 2.0), atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(volume), np.round(img.array), atol=0.51)


# ---------------------------------------------------------------------------------------------------------------
# plausibility


def test_mr_values_given_to_a_ct_task_are_refused(tmp_path):
    mr = tmp_path / "brain.nii.gz"
    _nifti(tmp_path, np.random.default_rng(2).uniform(1000, 30000, (10, 10, 10)).astype(np.float32), mr.name)
    image = read_image(mr)
    with pytest.raises(ImageReadError, match="not plausible CT") as err:
        check_plausible(image, "ct", mr)
    _one_line_naming(err, mr)
    check_plausible(image, "mri", mr)  # fine for MRI
    ct = read_image(CT_SMALL)
    lo, hi = check_plausible(ct, "ct")
    assert -1100 <= lo < hi <= 4000
    with pytest.raises(ImageReadError, match="modality is CT"):
        check_plausible(ct, "mri", CT_SMALL)
    uncr = get_testdata_file("693_UNCR.dcm", download=False)
    if uncr:  # a real head CT with −3024 HU out-of-field padding
        check_plausible(read_image(uncr), "ct")


# ---------------------------------------------------------------------------------------------------------------
# de-identification (PS3.15 Table E.1-1, one test per action class)


def _dataset() -> pydicom.Dataset:
    ds = pydicom.dcmread(CT_SMALL)
    ds.StudyDescription = "Head CT for John Smith"
    ds.SeriesDescription = "Smith follow-up"
    ds.InstitutionName = "General Hospital"
    ds.PersonName = "Doe^Jane"  # (0040,A123), D in the table
    ds.ClinicalTrialSubjectID = "SUBJ-17"
    ds.ContentDate, ds.ContentTime = "20240101", "101010"
    ds.BodyPartExamined, ds.PatientPosition = "HEAD", "HFS"
    return ds


def test_profile_x_removes():
    ds = _dataset()
    anonymize_dataset(ds)
    for kw in ("StudyDescription", "SeriesDescription", "InstitutionName", "PatientAge", "OtherPatientIDs",
               "SeriesDate", "AcquisitionDate", "InstanceCreationDate"):
        assert PROFILE_ACTIONS[kw] == "X" and kw not in ds, kw


def test_profile_z_empties():
    ds = _dataset()
    anonymize_dataset(ds)
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber",
               "ContentDate", "ReferringPhysicianName"):
        if kw in pydicom.dcmread(CT_SMALL) or kw.startswith("Content"):
            assert PROFILE_ACTIONS[kw] == "Z" and kw in ds and str(ds[kw].value) == "", kw


def test_profile_d_dummies():
    ds = _dataset()
    anonymize_dataset(ds)
    assert PROFILE_ACTIONS["PersonName"] == "D" and str(ds.PersonName) == "ANONYMIZED"
    assert ds.ClinicalTrialSubjectID == "ANONYMIZED"


def test_profile_u_consistent_within_series_and_study():
    a, b = _dataset(), _dataset()
    b.SOPInstanceUID = pydicom.uid.generate_uid()  # another slice of the same series
    originals = (a.StudyInstanceUID, a.SeriesInstanceUID, a.FrameOfReferenceUID, a.SOPInstanceUID)
    anonymize_dataset(a)
    anonymize_dataset(b)
    assert (a.StudyInstanceUID, a.SeriesInstanceUID, a.FrameOfReferenceUID) == (
        b.StudyInstanceUID, b.SeriesInstanceUID, b.FrameOfReferenceUID)
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert not set(originals) & {a.StudyInstanceUID, a.SeriesInstanceUID, a.FrameOfReferenceUID, a.SOPInstanceUID}
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert a.SOPClassUID == pydicom.uid.CTImageStorage


def test_profile_k_keeps():
    ds = _dataset()
    kept = {kw: ds[kw].value for kw in ("Modality", "BodyPartExamined", "PatientPosition", "PixelSpacing",
                                        "ImagePositionPatient", "RescaleIntercept", "KVP")}
    anonymize_dataset(ds)
    for kw, value in kept.items():
        assert kw not in PROFILE_ACTIONS and ds[kw].value == value, kw
    assert ds.PixelData == pydicom.dcmread(CT_SMALL).PixelData and ds.PatientIdentityRemoved == "YES"


def test_study_description_does_not_survive_an_anonymized_series(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    _dataset().save_as(src_dir / "a.dcm")
    src = read_image(src_dir)
    paths = write_dicom_series(src, tmp_path / "anon", reference=src, anonymize=True)
    raw = Path(paths[0]).read_bytes()
    assert b"Smith" not in raw and b"General Hospital" not in raw
    assert "StudyDescription" not in pydicom.dcmread(paths[0])


def test_redact_config_withholds_paths_and_keeps_the_rest():
    config = {"input": "/data/SMITH_JOHN/ct", "output": "out/rec.nii.gz", "reference": None, "method": "dps",
              "prior": "default-ct", "steps": 50, "options": {"zeta": 0.3, "checkpoint": "/tmp/run.ckpt"},
              "note": "/home/jsmith/notes.txt", "extra": ["a.nii.gz", 3]}
    out = redact_config(config)
    assert out["input"] == out["output"] == out["options"]["checkpoint"] == out["note"] == WITHHELD
    assert out["reference"] is None and out["method"] == "dps" and out["prior"] == "default-ct"
    assert out["steps"] == 50 and out["options"]["zeta"] == 0.3 and out["extra"] == [WITHHELD, 3]
    assert "SMITH" not in repr(out) and config["input"] == "/data/SMITH_JOHN/ct"
    assert redact_config({"prior": os.path.join("priors", "mine")})["prior"] == WITHHELD


def test_training_slices_are_the_reconstruction_readers_slices(tmp_path):
    anat = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    volume = read_image(anat).array
    np.testing.assert_array_equal(np.stack(list(read_slices(anat))), volume)  # NIfTI axis 2 = D
    both = list(read_slices(anat, axes=(0, 1, 2)))
    assert len(both) == sum(volume.shape)
    np.testing.assert_array_equal(both[0], volume[:, :, 0])  # NIfTI axis 0 = W
    np.testing.assert_array_equal(np.stack(list(read_slices(CT_SMALL))), read_image(CT_SMALL).array)
