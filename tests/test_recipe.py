"""The prior data recipe (recon.priors.recipe) on small synthetic sources: no network, no apt."""

from __future__ import annotations

import gzip
import io
import json
import plistlib
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from recon.priors.recipe import (
    GUARD,
    INV3,
    SLAB,
    RecipeError,
    is_crop,
    main,
    pixel_hash,
    prepare_prior_data,
    read_inv3,
)

SPACING = (0.9, 0.9, 1.5)


def _write_inv3(root: Path, depth: int = 80, size: int = 8) -> np.ndarray:
    """A tiny InVesalius project (main.plist + raw int16 matrix.dat in a tar.gz) at the Debian path."""
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1500, (depth, size, size)).astype(np.int16)
    plist = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [depth, size, size]},
             "modality": "CT", "spacing": list(SPACING)}
    path = root / INV3
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("tmp/main.plist", plistlib.dumps(plist)), ("tmp/matrix.dat", vol.tobytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return vol


def _write_dicom(path: Path, pixels: np.ndarray, study: str, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                 implicit: bool = False) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
    ds.ImageType = list(image_type)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture()
def sources(tmp_path):
    """Debian root with Cranium.inv3, and a pydicom folder: the held-out head CT (two encodings), a training slice
    in two encodings (one must be dropped as a duplicate), a perfusion map, CT_small and a file of 693's study."""
    debian, dcm = tmp_path / "debian", tmp_path / "dicom"
    dcm.mkdir()
    vol = _write_inv3(debian)
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(0, 2000, (128, 128)) for _ in range(3))
    study693, other = generate_uid(), generate_uid()
    _write_dicom(dcm / "693_UNCR.dcm", a, study693)
    _write_dicom(dcm / "693_J2KR.dcm", a, study693, implicit=True)
    _write_dicom(dcm / "bad_sequence.dcm", c, study693)  # same study as the held-out head CT
    _write_dicom(dcm / "J2K_pixelrep_mismatch.dcm", b, other)
    _write_dicom(dcm / "explicit_VR-UN.dcm", b, other, implicit=True)  # the same pixels in another encoding
    _write_dicom(dcm / "eCT_Supplemental.dcm", b[::-1], other, ("DERIVED", "PRIMARY", "PERFUSION", "RCBF"))
    _write_dicom(dcm / "CT_small.dcm", c[::-1], generate_uid())
    return {"debian": str(debian), "pydicom": str(dcm)}, vol


def test_ct_recipe_roles_dedup_and_manifest(tmp_path, sources):
    roots, _ = sources
    m = prepare_prior_data(tmp_path / "out", "ct", roots, report=lambda line: None)
    assert m == json.loads((tmp_path / "out" / "manifest.json").read_text())
    by_origin = {f["origin"]: f for f in m["files"]}
    train = {o for o, f in by_origin.items() if f["role"] == "train"}
    held = {o for o, f in by_origin.items() if f["role"] == "held-out"}
    # one of the two encodings of the training slice, the two InVesalius volumes around the held-out slab
    assert train == {"explicit_VR-UN.dcm", f"Cranium.inv3[0:{SLAB[0] - GUARD}]", f"Cranium.inv3[{SLAB[1] + GUARD}:]"}
    assert held == {"693_UNCR.dcm", "CT_small.dcm", "bad_sequence.dcm", f"Cranium.inv3[{SLAB[0]}:{SLAB[1]}]"}
    reasons = {d["origin"]: d["reason"] for d in m["dropped"]}
    assert "duplicate of 693_UNCR.dcm" in reasons["693_J2KR.dcm"]
    assert "duplicate of explicit_VR-UN.dcm" in reasons["J2K_pixelrep_mismatch.dcm"]
    assert "derived map" in reasons["eCT_Supplemental.dcm"]
    on_disk = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.nii.gz")}
    assert on_disk == {f["file"] for f in m["files"]}
    assert not any(Path(f).name.startswith(("693_", "CT_small")) for f in on_disk if f.startswith("train/"))
    assert all(f["licence"] and f["source"] for f in m["files"] + m["dropped"])
    assert by_origin[f"Cranium.inv3[{SLAB[0]}:{SLAB[1]}]"]["licence"].startswith("GPL-2")
    assert m["missing_sources"] == []
    free = prepare_prior_data(tmp_path / "free", "ct", roots, skip=("invesalius",), report=lambda line: None)
    assert not any("Cranium" in f["origin"] for f in free["files"]) and free["skipped_sources"] == ["invesalius"]


def test_the_held_out_slab_keeps_its_world_position(tmp_path, sources):
    roots, vol = sources
    prepare_prior_data(tmp_path / "out", "ct", roots, report=lambda line: None)
    whole = read_inv3(Path(roots["debian"]) / INV3)
    slab = nib.load(tmp_path / "out" / "held-out" / "invesalius_cranium_slab.nii.gz")
    assert slab.shape == (8, 8, SLAB[1] - SLAB[0]) and SLAB[1] - SLAB[0] >= 24
    np.testing.assert_array_equal(np.asarray(slab.dataobj).transpose(2, 1, 0), vol[SLAB[0]:SLAB[1]])
    np.testing.assert_allclose(slab.affine, whole.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, SLAB[0]],
                                                                     [0, 0, 0, 1]]), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(slab.affine[:3, :3], axis=0), SPACING, rtol=1e-6)


def test_a_missing_source_is_one_line_and_the_others_still_work(tmp_path, sources, capsys):
    roots, _ = sources
    roots = {**roots, "debian": str(tmp_path / "nowhere")}
    lines: list[str] = []
    m = prepare_prior_data(tmp_path / "out", "ct", roots, report=lines.append)
    assert len(lines) == 1 and "\n" not in lines[0] and "invesalius" in lines[0]
    assert m["missing_sources"] and not any("Cranium" in f["origin"] for f in m["files"])
    with pytest.raises(RecipeError, match=r"Cranium\.inv3: missing") as err:
        prepare_prior_data(tmp_path / "strict", "ct", roots, strict=True)
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="no ct source found"):
        prepare_prior_data(tmp_path / "none", "ct", {"debian": None, "pydicom": None}, report=lambda line: None)
    assert main(["--out", str(tmp_path / "cli"), "--debian-root", str(tmp_path / "nowhere"), "--strict"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error:")


def test_mri_recipe_holds_out_anatomical_and_reads_4d_files(tmp_path):
    nib_dir = tmp_path / "nibabel"
    nib_dir.mkdir()
    rng = np.random.default_rng(2)
    nib.save(nib.Nifti1Image(rng.random((10, 12, 8)).astype(np.float32), np.eye(4)), nib_dir / "anatomical.nii")
    nib.save(nib.Nifti1Image(rng.random((10, 12, 8, 3)).astype(np.float32), np.diag([2, 2, 3, 1])),
             nib_dir / "example4d.nii.gz")
    mpl_dir = tmp_path / "matplotlib"
    mpl_dir.mkdir()
    slice_ = rng.integers(0, 60000, (256, 256)).astype("<u2")  # matplotlib's raw s1045.ima.gz: no header
    (mpl_dir / "s1045.ima.gz").write_bytes(gzip.compress(slice_.tobytes()))
    m = prepare_prior_data(tmp_path / "out", "mri", {"nibabel": str(nib_dir), "matplotlib": str(mpl_dir)},
                           report=lambda line: None)
    roles = {f["origin"]: f["role"] for f in m["files"]}
    assert roles == {"anatomical.nii": "held-out", "example4d.nii.gz": "train", "s1045.ima.gz": "held-out"}
    assert len(m["missing_sources"]) == 4  # pydicom, mricron, nilearn, dipy: not given
    tuning = nib.load(tmp_path / "out" / "held-out" / "matplotlib_s1045.nii.gz").get_fdata()
    assert np.array_equal(tuning[:, :, 0].T, slice_)  # row-major (H, W) stored as NIfTI (x, y, z)
    epi = nib.load(tmp_path / "out" / "train" / "nibabel_example4d.nii.gz")
    assert epi.shape == (10, 12, 8) and np.allclose(epi.affine, np.diag([2, 2, 3, 1]))


def test_pixel_hash_and_crop_detection():
    rng = np.random.default_rng(3)
    a = rng.integers(-1000, 2000, (1, 20, 30)).astype(np.float64)  # decoded DICOM values
    assert pixel_hash(a) == pixel_hash(a.astype(np.int16)) == pixel_hash(a + 1e-4) != pixel_hash(a + 0.1)
    assert pixel_hash(a) != pixel_hash(a.reshape(1, 30, 20))
    assert is_crop(a[:, 3:15, 5:], a) and not is_crop(a, a[:, 3:15, 5:]) and not is_crop(a[:, 3:15, 5:] + 1, a)


def test_truncated_raw_tuning_slice_is_dropped_not_trained_on(tmp_path):
    mpl_dir = tmp_path / "matplotlib"
    mpl_dir.mkdir()
    (mpl_dir / "s1045.ima.gz").write_bytes(gzip.compress(np.zeros(1000, "<u2").tobytes()))
    nib_dir = tmp_path / "nibabel"
    nib_dir.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(4).random((6, 6, 4)).astype(np.float32), np.eye(4)),
             nib_dir / "example4d.nii.gz")
    m = prepare_prior_data(tmp_path / "out", "mri", {"nibabel": str(nib_dir), "matplotlib": str(mpl_dir)},
                           report=lambda line: None)
    assert [f["origin"] for f in m["files"]] == ["example4d.nii.gz"]
    (dropped,) = [d for d in m["dropped"] if d["origin"] == "s1045.ima.gz"]
    assert "expected a raw (256, 256) uint16 image" in dropped["reason"]
