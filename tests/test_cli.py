"""The ``recon`` command as a user runs it: subprocesses on the DICOM and NIfTI files pydicom and nibabel ship.

End-to-end runs go through ``python -m recon.cli`` (a fresh process each); the many bad-input cases call
``recon.cli.main`` in-process (the same code path, without paying the interpreter start-up each time).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from pydicom.data import get_testdata_file, get_testdata_files

from recon.cli import main
from recon.samplers import recommended_method

CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
MR_SMALL = get_testdata_file("MR_small.dcm", download=False)
CT5N = sorted(get_testdata_files("dicomdirtests/98892001/CT5N/*"))
ANATOMICAL = os.path.join(data_path, "anatomical.nii")


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "recon.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def digest(paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def ct5n(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct5n")
    for f in CT5N:
        shutil.copy(f, folder / Path(f).name)
    return folder


# ------------------------------------------------------------------------------------------------- demo
def test_demo_runs_on_the_builtin_default_and_writes_outputs(tmp_path):
    out = run("demo", "-o", tmp_path / "demo", "--json", "--steps", "20")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    methods = [r["method"] for r in summary["results"]]
    assert methods == ["analytic", recommended_method("ct")] and summary["views"] == 60
    fbp, default = summary["results"]
    assert fbp["psnr_db"] > 20 and fbp["nfe"] == 0 and default["nfe"] == 20 * 2  # the hybrid's mean of 2 chains
    for r in summary["results"]:
        for key in ("image", "preview", "report", "provenance"):
            assert Path(r["outputs"][key]).is_file(), (key, r["outputs"])
    assert Path(default["outputs"]["image"]).name == f"{recommended_method('ct')}.nii.gz"
    assert nib.load(default["outputs"]["image"]).shape == (128, 128, 1)


# ------------------------------------------------------------------------------------------------- info
def test_info_describes_a_series_folder_and_a_nifti(ct5n):
    out = run("info", "-i", ct5n, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["modality"] == "CT" and info["unit"] == "HU" and info["shape"][0] == 5
    assert len(info["series"]) == 1 and info["series"][0]["files"] == 5
    assert info["spacing_mm"][0] > 0
    text = run("info", "-i", ANATOMICAL)
    assert text.returncode == 0 and "shape (D, H, W): (25, 41, 33)" in text.stdout, text.stdout


# ------------------------------------------------------------------------------------- simulate + reconstruct
def test_simulate_then_reconstruct_keeps_geometry_and_reports(tmp_path):
    before = digest([CT_SMALL])
    meas = tmp_path / "meas.npz"
    out = run("simulate", "-i", CT_SMALL, "-o", meas, "--task", "sparse-view-ct", "--views", "90", "--photons", "1e6",
              "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["measurement_shape"][2] == 90
    rec = tmp_path / "rec.nii.gz"
    out = run("reconstruct", "-i", meas, "-o", rec, "--method", "tv", "--reference", CT_SMALL, "--json",
              "--set", "options.lam=0.001")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {"psnr", "ssim", "data_residual", "seconds", "nfe", "outputs"} <= set(report)
    assert report["psnr"] > 30 and report["psnr"] >= report["analytic"]["psnr"] - 1.0
    assert json.loads((tmp_path / "rec.report.json").read_text()) == report
    # geometry: the NIfTI places the slice where pydicom says it is (LPS -> RAS)
    ds = pydicom.dcmread(CT_SMALL)
    img = nib.load(rec)
    ras = np.diag([-1, -1, 1]) @ np.asarray(ds.ImagePositionPatient, dtype=float)
    np.testing.assert_allclose(img.affine[:3, 3], ras, atol=1e-3)
    values = np.asarray(img.dataobj)[:, :, 0].T  # NIfTI (i, j) = (column, row)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.abs(np.clip(values, -1000, 1000) - np.clip(hu, -1000, 1000)).mean() < 60  # HU, not normalised units
    prov = (tmp_path / "rec.provenance.json").read_text()
    assert str(ds.PatientName) not in prov and "CT_small" not in prov
    assert json.loads(prov)["inputs"]["input_sha256"]
    cfg = (tmp_path / "rec.config.yaml").read_text()
    assert "method: tv" in cfg and "lam: 0.001" in cfg
    assert (tmp_path / "rec.preview.png").is_file()
    assert digest([CT_SMALL]) == before  # inputs are never modified
    # the same output again needs --overwrite
    again = run("reconstruct", "-i", meas, "-o", rec, "--method", "analytic")
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_one_go_mri_with_config_file_and_set_precedence(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: tv\nacceleration: 8\nseed: 3\n")
    out = run("reconstruct", "-i", MR_SMALL, "-o", tmp_path / "mr.npy", "--task", "mri", "--config", config,
              "--acceleration", "4", "--set", "method=analytic", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["method"] == "analytic" and report["task"] == "mri"  # --set beats the config file
    cfg = (tmp_path / "mr.config.yaml").read_text()
    assert "acceleration: 4" in cfg and "seed: 3" in cfg  # the flag beats the file; the file fills the rest
    assert np.load(tmp_path / "mr.npy").shape == (1, 64, 64)
    assert report["psnr"] > 20


def test_dicom_series_in_dicom_series_out_next_to_the_original(tmp_path, ct5n):
    out = run("reconstruct", "-i", ct5n, "-o", tmp_path / "rec_series", "--task", "sparse-view-ct", "--views", "60",
              "--method", "smc", "--steps", "3", "--particles", "2", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    written = sorted((tmp_path / "rec_series").iterdir())
    assert len(written) == 5 and report["outputs"]["std"] == str(tmp_path / "rec_series_std")
    originals = sorted((pydicom.dcmread(f) for f in CT5N), key=lambda d: float(d.ImagePositionPatient[2]))
    derived = sorted((pydicom.dcmread(f) for f in written), key=lambda d: float(d.ImagePositionPatient[2]))
    for o, d in zip(originals, derived, strict=True):
        assert d.StudyInstanceUID == o.StudyInstanceUID and d.SeriesInstanceUID != o.SeriesInstanceUID
        assert d.SOPInstanceUID != o.SOPInstanceUID and list(d.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        np.testing.assert_allclose([float(v) for v in d.ImagePositionPatient],
                                   [float(v) for v in o.ImagePositionPatient], atol=1e-3)
    std_numbers = {pydicom.dcmread(f).SeriesNumber for f in (tmp_path / "rec_series_std").iterdir()}
    assert std_numbers.isdisjoint({d.SeriesNumber for d in derived})
    anon = run("reconstruct", "-i", ct5n, "-o", tmp_path / "anon", "--task", "sparse-view-ct", "--method",
               "analytic", "--anonymize")
    assert anon.returncode == 0, anon.stderr
    name = str(originals[0].PatientName)
    for f in (tmp_path / "anon").iterdir():
        assert name.encode() not in f.read_bytes()


# ----------------------------------------------------------------------------------------------- bad input
def _fails(capsys, *argv, match: str):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("recon: error:"), err
    assert match in lines[0], (match, lines[0])
    return lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    meas = tmp_path / "m.npz"
    assert main(["simulate", "-i", CT_SMALL, "-o", str(meas), "--task", "sparse-view-ct", "--views", "10", "-q"]) == 0
    capsys.readouterr()
    missing = tmp_path / "nowhere.dcm"
    _fails(capsys, "info", "-i", missing, match=str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, "simulate", "-i", empty, "-o", tmp_path / "x.npz", "--task", "blur", match=str(empty))
    notdicom = tmp_path / "notdicom"
    notdicom.mkdir()
    (notdicom / "a.dcm").write_text("this is not DICOM")
    _fails(capsys, "info", "-i", notdicom, match="a.dcm")
    truncated = tmp_path / "trunc.dcm"
    truncated.write_bytes(Path(CT_SMALL).read_bytes()[:2000])
    _fails(capsys, "info", "-i", truncated, match=str(truncated))
    corrupt = tmp_path / "bad.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    _fails(capsys, "info", "-i", corrupt, match=str(corrupt))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((8, 8), np.nan))
    _fails(capsys, "simulate", "-i", nan, "-o", tmp_path / "n.npz", "--task", "blur", match="NaN")
    # measurements that do not fit the operator
    with np.load(meas) as data:
        arrays = dict(data)
    arrays["y"] = arrays["y"][..., :-1]
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **arrays)
    _fails(capsys, "reconstruct", "-i", tampered, "-o", tmp_path / "t.nii.gz", "--method", "analytic",
           match="do not fit the operator")
    _fails(capsys, "reconstruct", "-i", meas, "-o", tmp_path / "p.nii.gz", "--prior", tmp_path / "no_prior",
           match="no_prior")
    _fails(capsys, "reconstruct", "-i", meas, "-o", tmp_path / "no" / "such" / "x.nii.gz", "--method", "analytic",
           match="does not exist")
    _fails(capsys, "reconstruct", "-i", meas, "-o", tmp_path / "x.jpg", match=".jpg")
    _fails(capsys, "simulate", "-i", CT_SMALL, "-o", tmp_path / "v.npz", "--task", "mri", "--views", "3",
           match="views")
    _fails(capsys, "simulate", "-i", CT_SMALL, "-o", tmp_path / "v.npz", "--task", "mri", "--acceleration", "0.5",
           match="acceleration")
    _fails(capsys, "reconstruct", "-i", CT_SMALL, "-o", tmp_path / "r.nii.gz", match="--task")
    with pytest.raises(SystemExit) as exc:  # argparse: unknown method is a usage error
        main(["reconstruct", "-i", str(meas), "-o", str(tmp_path / "u.nii.gz"), "--method", "magic"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_mixed_series_need_series_and_irregular_spacing_is_reported(tmp_path, capsys, ct5n):
    mixed = tmp_path / "mixed"
    shutil.copytree(ct5n, mixed)
    shutil.copy(MR_SMALL, mixed / "mr.dcm")
    _fails(capsys, "simulate", "-i", mixed, "-o", tmp_path / "m.npz", "--task", "blur", match="--series")
    assert main(["info", "-i", str(mixed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["series"]) == 2 and "shape" not in info
    ct_index = next(s["index"] for s in info["series"] if s["modality"] == "CT")
    assert main(["simulate", "-i", str(mixed), "--series", str(ct_index), "-o", str(tmp_path / "ok.npz"), "--task",
                 "blur", "-q"]) == 0
    gap = tmp_path / "gap"  # CT5N is uniform (z = 8.76 ... -1.24 mm, 2.5 mm apart): drop the middle slice
    gap.mkdir()
    for f in CT5N[:2] + CT5N[3:]:
        shutil.copy(f, gap / Path(f).name)
    _fails(capsys, "info", "-i", gap, match="gap")
    assert main(["info", "-i", str(gap), "--on-irregular", "resample", "--json"]) == 0
    resampled = json.loads(capsys.readouterr().out)
    assert resampled["shape"][0] == 5 and abs(resampled["spacing_mm"][0] - 2.5) < 1e-3  # 4 slices -> 5 at 2.5 mm


def _fastmri_file(path: Path, coils: int) -> np.ndarray:
    """A fastMRI-layout file from MR_small (2 slices): centred orthonormal k-space (numpy), 4x column mask."""
    import h5py

    img = pydicom.dcmread(MR_SMALL).pixel_array.astype(np.float64)
    vol = np.stack([img, img[::-1]])  # (S, H, W)
    rng = np.random.default_rng(0)
    if coils > 1:
        yy, xx = np.mgrid[-1:1:64j, -1:1:64j]
        maps = np.stack([np.exp(-((yy - np.cos(a)) ** 2 + (xx - np.sin(a)) ** 2)) * np.exp(1j * a)
                         for a in np.linspace(0, 2 * np.pi, coils, endpoint=False)])
        maps /= np.sqrt((np.abs(maps) ** 2).sum(0))
        vol = vol[:, None] * maps[None]  # (S, C, H, W)
    ks = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(vol, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    mask = np.zeros(64, dtype=bool)
    mask[28:36] = True
    mask[rng.choice(64, 10, replace=False)] = True
    ks = (ks * mask).astype(np.complex64)
    header = ("<ismrmrdHeader xmlns='http://www.ismrm.org/ISMRMRD'><encoding><encodedSpace><matrixSize><x>64</x>"
              "<y>64</y><z>1</z></matrixSize><fieldOfView_mm><x>192</x><y>128</y><z>5</z></fieldOfView_mm>"
              "</encodedSpace></encoding></ismrmrdHeader>")
    with h5py.File(path, "w") as f:
        f["kspace"] = ks
        f["mask"] = mask
        f["ismrmrd_header"] = header
        f.attrs["acquisition"] = "CORPD_FBK"
        f.attrs["patient_id"] = "hash-of-someone"
    zero_filled = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(ks, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return np.abs(zero_filled) if coils == 1 else np.sqrt((np.abs(zero_filled) ** 2).sum(1))


@pytest.mark.parametrize("coils", [1, 4])
def test_fastmri_kspace_file_zero_filled_and_tv(tmp_path, capsys, coils):
    path = tmp_path / "file_brain.h5"
    expected = _fastmri_file(path, coils)  # numpy zero-filled magnitude (root-sum-of-squares for coils)
    assert main(["info", "-i", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["coils"] == coils and info["kspace_shape"][0] == 2 and "patient_id" not in info["attrs"]
    assert info["spacing_mm"] == [5.0, 3.0, 2.0]
    assert main(["reconstruct", "-i", str(path), "-o", str(tmp_path / "zf.nii.gz"), "--method", "analytic",
                 "-q"]) == 0
    capsys.readouterr()
    zf = np.asarray(nib.load(tmp_path / "zf.nii.gz").dataobj).transpose(2, 1, 0)  # NIfTI (w, h, d) -> (d, h, w)
    if coils == 1:
        np.testing.assert_allclose(zf, expected, rtol=1e-4, atol=1e-3 * expected.max())
    else:  # SENSE combination with ESPIRiT maps vs root-sum-of-squares: equal up to the maps' support
        inside = expected > 0.2 * expected.max()
        assert np.median(np.abs(zf[inside] - expected[inside]) / expected[inside]) < 0.05
    assert main(["reconstruct", "-i", str(path), "-o", str(tmp_path / "tv.nii.gz"), "--method", "tv", "-q"]) == 0
    capsys.readouterr()
    _fails(capsys, "reconstruct", "-i", path, "-o", tmp_path / "dps.nii.gz", "--method", "dps", match="analytic or tv")


def test_volume_method_checkpoint_and_resume_from_the_command_line(tmp_path, ct5n, capsys, monkeypatch):
    """dds3d (the README's command) on a 5-slice CT series: a run interrupted (Ctrl-C at step 4) and continued with
    --resume gives exactly the volume of an uninterrupted run."""
    import recon.cli as cli

    meas = tmp_path / "vol.npz"
    assert main(["simulate", "-i", str(ct5n), "-o", str(meas), "--task", "sparse-view-ct", "--views", "20", "-q"]) == 0
    common = ["reconstruct", "-i", str(meas), "--method", "dds3d", "--steps", "6", "--max-memory", "64MB", "-q"]
    assert main([*common, "-o", str(tmp_path / "full.npy")]) == 0
    ckpt = tmp_path / "state.pt"
    real_progress = cli._progress

    def interrupting(args):
        callback, close = real_progress(args)

        def cb(info):
            callback(info)
            if info["step"] >= 3:
                raise KeyboardInterrupt

        return cb, close

    monkeypatch.setattr(cli, "_progress", interrupting)
    ckpt_args = ["--checkpoint", str(ckpt), "--checkpoint-every", "2"]
    assert main([*common, "-o", str(tmp_path / "part.npy"), *ckpt_args]) == 130
    assert ckpt.is_file() and not (tmp_path / "part.npy").exists()  # nothing half-written
    monkeypatch.setattr(cli, "_progress", real_progress)
    capsys.readouterr()
    # in-process like the runs above: bit-for-bit equality needs the same torch thread count
    assert main([*common, "-o", str(tmp_path / "resumed.npy"), *ckpt_args, "--resume"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), np.load(tmp_path / "full.npy"))
    _fails(capsys, "reconstruct", "-i", meas, "-o", tmp_path / "x.npy", "--method", "dps", "--checkpoint", ckpt,
           match="long-running methods (diffusion-mbir, dds, mbir3d, dds3d), not --method dps")
    _fails(capsys, *common, "-o", tmp_path / "y.npy", "--max-memory", "lots", match="--max-memory")
