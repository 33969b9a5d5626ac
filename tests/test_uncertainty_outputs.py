"""Uncertainty maps next to a reconstruction (``--uncertainty``) and calibration from the user's own reference
studies (``recon calibrate``), checked against closed forms: the null-space map of an inpainting operator is the
reconstruction at the missing pixels and zero at the measured ones; calibrated intervals are ``x ± c·std``."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib.resources import files
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from recon.cli import main
from recon.datasets import read_image
from recon.samplers import recommended_method
from recon.samplers.registry import sampler_settings
from recon.samplers.uncertainty import (
    BUILTIN_CALIBRATION,
    BUILTIN_TASK_CALIBRATION,
    BUILTIN_VOLUME_CALIBRATION,
    builtin_calibration,
    builtin_calibration_path,
    save_calibration,
)
from recon.tasks import build_physics, make_task

CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
pytestmark = pytest.mark.usefixtures("one_thread")


def _load(path) -> np.ndarray:
    return read_image(path).array.astype(np.float64)  # (D, H, W), as written


def _inpainting_mask(shape=(1, 128, 128)) -> np.ndarray:
    physics = build_physics(make_task("inpainting", shape, (1.0, 1.0, 1.0), seed=0))
    return physics.mask[0, 0].numpy()


def test_maps_are_written_and_the_null_space_is_what_the_mask_hides(tmp_path, capsys):
    out = tmp_path / "rec.nii.gz"
    assert main(["reconstruct", "-i", CT_SMALL, "-o", str(out), "--task", "inpainting", "--method", "dps", "--steps",
                 "3", "--particles", "3", "--uncertainty", "0.9", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    rec = _load(out)
    maps = {k: _load(tmp_path / f"rec.{k}.nii.gz") for k in ("std", "lower", "upper", "null_space")}
    assert set(maps) <= set(report["outputs"])
    mask = _inpainting_mask(rec.shape)
    # x − A⁺A x for a 0/1 mask acting on the image itself: the reconstruction where unmeasured, 0 where measured
    np.testing.assert_allclose(maps["null_space"][0] * mask, 0, atol=1e-3)
    np.testing.assert_allclose(maps["null_space"][0] * (1 - mask), rec[0] * (1 - mask), rtol=1e-4, atol=0.05)
    assert (maps["lower"] <= maps["upper"] + 1e-6).all() and (maps["std"] >= 0).all()
    u = report["uncertainty"]
    assert u["level"] == 0.9 and u["intervals"] == "weighted sample quantiles" and u["body_pixels"] > 1000
    assert u["mean_std_body"] > 0 and 0 < u["null_space_energy"] < 1


def test_a_method_without_spread_gets_the_null_space_and_says_so(tmp_path, capsys):
    out = tmp_path / "tv.nii.gz"
    assert main(["reconstruct", "-i", CT_SMALL, "-o", str(out), "--task", "inpainting", "--method", "tv", "--steps",
                 "20", "--uncertainty", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "tv.null_space.nii.gz").is_file() and not (tmp_path / "tv.std.nii.gz").exists()
    assert report["uncertainty"]["intervals"] is None and "no spread" in report["uncertainty"]["note"]
    assert report["uncertainty"]["calibration"] is None


def test_maps_as_derived_dicom_series(tmp_path, capsys):
    ref = tmp_path / "in"
    ref.mkdir()
    shutil.copy(CT_SMALL, ref / "ct.dcm")
    out = tmp_path / "rec"
    assert main(["reconstruct", "-i", str(ref), "-o", str(out), "--task", "inpainting", "--method", "dps", "--steps",
                 "2", "--particles", "2", "--uncertainty", "0.9", "--format", "dicom", "-q"]) == 0
    series = {}
    for name in ("rec", "rec_std", "rec_lower", "rec_upper", "rec_null_space"):
        files = sorted((tmp_path / name).iterdir())
        assert len(files) == 1, name
        series[name] = pydicom.dcmread(files[0])
    assert len({d.SeriesInstanceUID for d in series.values()}) == 5
    assert len({d.SeriesNumber for d in series.values()}) == 5
    assert len({d.StudyInstanceUID for d in series.values()}) == 1


def _refs(tmp_path):
    """Two 64² reference studies (NIfTI) cut from CT_small, in HU."""
    refs = tmp_path / "refs"
    refs.mkdir()
    image = pydicom.dcmread(CT_SMALL)
    hu = image.pixel_array * float(image.RescaleSlope) + float(image.RescaleIntercept)
    for k, arr in enumerate((hu[:64, :64], hu[64:, 64:])):
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.T[:, :, None]).astype(np.float32), np.eye(4)),
                 refs / f"ref{k}.nii.gz")
    return refs


def test_calibration_from_reference_studies_is_applied_to_later_runs(tmp_path, capsys):
    refs = _refs(tmp_path)
    calib = tmp_path / "calib.json"
    common = ["--task", "inpainting", "--method", "dps", "--steps", "2", "--particles", "3", "-q"]
    assert main(["calibrate", "-i", str(refs), "-o", str(calib), "--coverage", "0.8", *common, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    doc = json.loads(calib.read_text())
    assert doc["factor"] == summary["factor"] > 0 and doc["coverage"] == 0.8 and doc["studies"] == 2
    assert summary["coverage_on_references"] >= 0.8 - 1e-9  # conformal: at least nominal on its own scores
    out = tmp_path / "r.nii.gz"
    assert main(["reconstruct", "-i", str(refs / "ref0.nii.gz"), "-o", str(out), *common, "--uncertainty", "0.8",
                 "--calibration", str(calib), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["uncertainty"]["calibration_factor"] == doc["factor"]
    rec, std, lower = _load(out), _load(tmp_path / "r.std.nii.gz"), _load(tmp_path / "r.lower.nii.gz")
    np.testing.assert_allclose(lower, rec - doc["factor"] * std, atol=1e-2)
    assert main(["calibrate", "-i", str(refs), "-o", str(calib), *common]) == 2  # exists: one line, no overwrite
    capsys.readouterr()
    assert main(["calibrate", "-i", str(refs), "-o", str(calib), *common, "--offset", "wide", "--overwrite"]) == 2
    assert "--offset" in capsys.readouterr().err
    assert main(["calibrate", "-i", str(refs), "-o", str(calib), *common, "--offset", "balanced", "--overwrite",
                 "--json"]) == 0
    summary, doc = json.loads(capsys.readouterr().out), json.loads(calib.read_text())
    assert doc["offset"] == summary["offset"] >= 0 and doc["factor"] == summary["factor"] > 0
    # an offset is applied in the reconstruction's domain and reported in the image's units: x ± c·(std + offset)
    save_calibration(calib, 2.0, 0.8, offset=0.05, tasks=["inpainting"])
    assert main(["reconstruct", "-i", str(refs / "ref0.nii.gz"), "-o", str(out), *common, "--uncertainty", "0.8",
                 "--calibration", str(calib), "--json", "--overwrite"]) == 0
    u = json.loads(capsys.readouterr().out)["uncertainty"]
    assert u["intervals"].startswith("x ± c·(std + offset)") and u["calibration_offset"] > 0
    rec, std, lower = _load(out), _load(tmp_path / "r.std.nii.gz"), _load(tmp_path / "r.lower.nii.gz")
    np.testing.assert_allclose(lower, rec - 2.0 * (std + u["calibration_offset"]), atol=1e-2)


def test_the_report_records_the_noise_model_and_the_chosen_weights(tmp_path, capsys):
    assert main(["reconstruct", "-i", CT_SMALL, "-o", str(tmp_path / "tv.nii.gz"), "--task", "sparse-view-ct",
                 "--views", "30", "--method", "tv", "--steps", "30", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["noise"]["kind"] == "poisson" and report["noise"]["sigma_y"] > 0
    assert report["tv_weight"]["lam"] > 0 and report["method_options"]["weight"] == "auto"


def test_uncertainty_without_a_method_runs_an_ensemble_of_the_recommended_one(tmp_path, capsys):
    out = tmp_path / "rec.nii.gz"
    assert main(["reconstruct", "-i", CT_SMALL, "-o", str(out), "--task", "inpainting", "--steps", "2",
                 "--particles", "3", "--uncertainty", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "ensemble" and report["base"] == recommended_method("image", "inpainting")
    assert report["particles"] == 3 and report["uncertainty"]["intervals"] == "weighted sample quantiles"
    assert _load(tmp_path / "rec.std.nii.gz").max() > 0
    u = report["uncertainty"]  # default-ct's shipped calibration is for 16 hybrid runs, not these: not applied
    base = recommended_method("image", "inpainting")
    assert u["calibration_factor"] is None and f"not ensemble of {base} with 3 samples" in u["calibration"]


def test_a_prior_ships_its_calibration_and_it_applies_only_to_the_runs_it_was_fitted_for(tmp_path, capsys):
    prior = tmp_path / "prior"
    shutil.copytree(files("recon.priors") / "weights" / "default-ct", prior,
                    ignore=shutil.ignore_patterns("calibration*.json"))  # the shipped ones, task files included
    refs = _refs(tmp_path)
    common = ["--task", "inpainting", "--prior", str(prior), "--steps", "2", "-q"]
    assert main(["calibrate", "-i", str(refs), "-o", str(prior / BUILTIN_CALIBRATION), "--particles", "3",
                 *common]) == 0
    capsys.readouterr()
    doc = json.loads((prior / BUILTIN_CALIBRATION).read_text())
    base = recommended_method("image", "inpainting")
    assert (doc["method"], doc["base"], doc["particles"], doc["tasks"]) == ("ensemble", base, 3, ["inpainting"])
    assert doc["prior_sha256"] == hashlib.sha256((prior / "model.safetensors").read_bytes()).hexdigest()
    out = tmp_path / "r.nii.gz"
    assert main(["reconstruct", "-i", str(refs / "ref0.nii.gz"), "-o", str(out), "--particles", "3", *common,
                 "--uncertainty", "--json"]) == 0
    u = json.loads(capsys.readouterr().out)["uncertainty"]
    assert u["calibration_factor"] == doc["factor"] and u["calibration"].startswith("built into the prior")
    rec, std, lower = _load(out), _load(tmp_path / "r.std.nii.gz"), _load(tmp_path / "r.lower.nii.gz")
    np.testing.assert_allclose(lower, rec - doc["factor"] * std, atol=1e-2)
    # another number of samples: the factor does not hold, the intervals stay uncalibrated and the report says why
    assert main(["reconstruct", "-i", str(refs / "ref0.nii.gz"), "-o", str(out), "--particles", "2", *common,
                 "--uncertainty", "--json", "--overwrite"]) == 0
    u = json.loads(capsys.readouterr().out)["uncertainty"]
    assert u["calibration_factor"] is None
    assert f"with 3 samples of 2 steps, not ensemble of {base} with 2 samples" in u["calibration"]


def test_a_shipped_calibration_is_not_used_for_other_weights_or_tasks(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    prior = SimpleNamespace(card={"path": str(tmp_path)})
    info = {"method": "ensemble", "base": "hybrid", "particles": 16, "steps": 50, "options": {"base": "hybrid"}}
    save_calibration(tmp_path / BUILTIN_CALIBRATION, 5.0, 0.9, **info, tasks=["sparse-view-ct"],
                     prior_sha256=hashlib.sha256(b"weights").hexdigest(), studies=6,
                     sampler_options=sampler_settings(info))
    doc, why = builtin_calibration(prior, info, "sparse-view-ct")
    assert doc["factor"] == 5.0 and why.startswith("built into the prior: fitted on 6")
    assert builtin_calibration(prior, info, "limited-angle-ct")[0] is None
    assert builtin_calibration(prior, {**info, "base": "dps"}, "sparse-view-ct")[0] is None
    assert builtin_calibration(prior, {**info, "steps": 20}, "sparse-view-ct")[0] is None
    # the same sampler with another option (or default) than the one it was fitted for: not applied, and why
    fitted = sampler_settings(info)["admm_penalty"]
    doc, why = builtin_calibration(prior, {**info, "options": {"base": "hybrid", "admm_penalty": 2 * fitted}},
                                   "sparse-view-ct")
    assert doc is None and f"admm_penalty: {fitted!r} there, {2 * fitted!r} here" in why
    weights.write_bytes(b"retrained")
    doc, why = builtin_calibration(prior, info, "sparse-view-ct")
    assert doc is None and why == "the prior's calibration was fitted on other weights"
    assert builtin_calibration(None, info, "sparse-view-ct") == (None, "the prior ships no calibration")


def test_a_task_calibration_file_comes_before_the_general_one(tmp_path):
    """``calibration-<task>.json`` holds the factor for that task; other tasks fall back to ``calibration.json``."""
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    prior = SimpleNamespace(card={"path": str(tmp_path)})
    info = {"method": "ensemble", "base": "hybrid", "particles": 16, "steps": 50, "options": {"base": "hybrid"}}
    meta = dict(**info, prior_sha256=hashlib.sha256(b"weights").hexdigest(), studies=4,
                sampler_options=sampler_settings(info))
    save_calibration(tmp_path / BUILTIN_CALIBRATION, 5.0, 0.9, **meta, tasks=["sparse-view-ct"])
    save_calibration(tmp_path / BUILTIN_TASK_CALIBRATION.format(task="limited-angle-ct"), 3.0, 0.9, **meta,
                     tasks=["limited-angle-ct"])
    assert builtin_calibration(prior, info, "limited-angle-ct")[0]["factor"] == 3.0
    assert builtin_calibration(prior, info, "sparse-view-ct")[0]["factor"] == 5.0
    assert builtin_calibration_path(tmp_path, "mri") == tmp_path / BUILTIN_CALIBRATION
    assert builtin_calibration(prior, info, "mri")[0] is None  # the general file does not list MRI
    assert builtin_calibration_path(tmp_path / "nowhere", "mri") is None


def test_volumes_look_for_a_volume_calibration_first_and_slices_never_use_one(tmp_path):
    """``calibration-<task>-volume.json`` (fitted on volumes) holds for volume runs of its task; slices keep the slice
    files, and a volume without a file of its own falls back to them, saying so in the reason."""
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    prior = SimpleNamespace(card={"path": str(tmp_path)})
    info = {"method": "ensemble", "base": "hybrid", "particles": 16, "steps": 50, "options": {"base": "hybrid"}}
    meta = dict(**info, prior_sha256=hashlib.sha256(b"weights").hexdigest(), studies=6,
                sampler_options=sampler_settings(info), tasks=["mri", "sparse-view-ct"])
    # a slice file holds for volumes only where the file says it was measured to (holds_for_volumes)
    save_calibration(tmp_path / BUILTIN_CALIBRATION, 8.0, 0.9, **meta, volume=False)
    doc, why = builtin_calibration(prior, info, "mri", volume=True)
    assert doc is None and "has not been measured on mri volumes" in why
    save_calibration(tmp_path / BUILTIN_CALIBRATION, 8.0, 0.9, **meta, volume=False,
                     holds_for_volumes="checked on one CT volume")
    doc, why = builtin_calibration(prior, info, "sparse-view-ct", volume=True)
    assert doc["factor"] == 8.0 and "slices, applied to this volume" in why
    volume_file = tmp_path / BUILTIN_VOLUME_CALIBRATION.format(task="mri")
    save_calibration(volume_file, 12.0, 0.9, **meta, volume=True)
    assert builtin_calibration_path(tmp_path, "mri", volume=True) == volume_file
    assert builtin_calibration_path(tmp_path, "mri") == tmp_path / BUILTIN_CALIBRATION
    doc, why = builtin_calibration(prior, info, "mri", volume=True)
    assert doc["factor"] == 12.0 and "(volumes;" in why
    assert builtin_calibration(prior, info, "mri")[0]["factor"] == 8.0
    # a volume-fitted file under a slice name is refused for slices
    save_calibration(tmp_path / BUILTIN_CALIBRATION, 12.0, 0.9, **meta, volume=True)
    refused = (None, "the prior's calibration was fitted on volumes, not slices")
    assert builtin_calibration(prior, info, "mri") == refused


def test_a_volume_calibration_applies_to_volumes_and_calibrate_refuses_to_pool_them_with_slices(tmp_path, capsys):
    prior = tmp_path / "prior"
    shutil.copytree(files("recon.priors") / "weights" / "default-ct", prior,
                    ignore=shutil.ignore_patterns("calibration*.json"))
    refs = _refs(tmp_path)
    vol = tmp_path / "vols"
    vol.mkdir()
    slices = np.stack([_load(refs / "ref0.nii.gz")[0]] * 4)  # (4, 64, 64) in HU
    nib.save(nib.Nifti1Image(np.ascontiguousarray(slices.T).astype(np.float32), np.eye(4)), vol / "v.nii.gz")
    common = ["--task", "inpainting", "--prior", str(prior), "--steps", "2", "--particles", "3", "-q"]
    target = prior / BUILTIN_VOLUME_CALIBRATION.format(task="inpainting")
    assert main(["calibrate", "-i", str(vol), "-o", str(target), *common]) == 0
    doc = json.loads(target.read_text())
    assert doc["volume"] is True
    capsys.readouterr()
    assert main(["reconstruct", "-i", str(vol / "v.nii.gz"), "-o", str(tmp_path / "v.nii.gz"), *common,
                 "--uncertainty", "--json"]) == 0
    u = json.loads(capsys.readouterr().out)["uncertainty"]
    assert u["calibration_factor"] == doc["factor"] and "(volumes;" in u["calibration"]
    assert main(["reconstruct", "-i", str(refs / "ref0.nii.gz"), "-o", str(tmp_path / "s.nii.gz"), *common,
                 "--uncertainty", "--json"]) == 0  # a slice: the volume file is not for it
    u = json.loads(capsys.readouterr().out)["uncertainty"]
    assert u["calibration_factor"] is None and u["calibration"] == "the prior ships no calibration"
    assert main(["reconstruct", "-i", str(refs / "ref0.nii.gz"), "-o", str(tmp_path / "s.nii.gz"), *common,
                 "--uncertainty", "--json", "--overwrite", "--calibration", str(target)]) == 0
    u = json.loads(capsys.readouterr().out)["uncertainty"]  # the user's own file is applied, and the report warns
    assert u["calibration_factor"] == doc["factor"]
    assert u["calibration"] == "the calibration file given (fitted on volumes, applied to a slice)"
    save_calibration(tmp_path / "old.json", 2.0, 0.9)  # a file from before `volume` was recorded: no note
    assert main(["reconstruct", "-i", str(vol / "v.nii.gz"), "-o", str(tmp_path / "v.nii.gz"), *common,
                 "--uncertainty", "--json", "--overwrite", "--calibration", str(tmp_path / "old.json")]) == 0
    assert json.loads(capsys.readouterr().out)["uncertainty"]["calibration"] == "the calibration file given"
    assert main(["calibrate", "-i", str(refs), "-o", str(tmp_path / "s.json"), *common]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["volume"] is False
    shutil.copy(vol / "v.nii.gz", refs / "v.nii.gz")
    capsys.readouterr()
    assert main(["calibrate", "-i", str(refs), "-o", str(tmp_path / "m.json"), *common]) != 0
    assert "mix 2D slices and 3D volumes" in capsys.readouterr().err and not (tmp_path / "m.json").exists()


def test_the_hybrids_averaged_chains_give_no_std_map_unless_a_spread_is_asked_for(tmp_path, capsys):
    """The default CT method averages two chains: the image is their mean, and two samples are too few for a std
    map, so none is written (the report says why); setting ``--particles`` asks for the spread and writes it."""
    base = ["reconstruct", "-i", CT_SMALL, "--task", "sparse-view-ct", "--views", "30", "--steps", "3", "--json", "-q"]
    assert main([*base, "-o", str(tmp_path / "d.nii.gz")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == recommended_method("ct") == "hybrid" and report["particles"] == 2
    assert report["nfe"] == 2 * 3 and "std" not in report["outputs"] and not (tmp_path / "d.std.nii.gz").exists()
    assert "mean of 2 chains" in report["std_map"]
    assert main([*base, "-o", str(tmp_path / "p.nii.gz"), "--particles", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "std_map" not in report and _load(tmp_path / "p.std.nii.gz").max() > 0


@pytest.mark.parametrize("prior_name, task, modality, offset, volume",
                         [("default-ct", "sparse-view-ct", "ct", False, False),
                          ("default-ct", "limited-angle-ct", "ct", True, False),
                          ("default-ct", "blur", "image", True, False),
                          ("default-ct", "inpainting", "image", False, False),
                          ("default-ct", "super-resolution", "image", False, False),
                          ("default-mri", "mri", "mri", False, False),
                          ("default-mri", "mri", "mri", False, True),
                          ("default-mri", "inpainting", "image", False, False),
                          ("default-mri", "super-resolution", "image", False, False)])
def test_the_shipped_calibrations_apply_to_what_uncertainty_runs_by_default(prior_name, task, modality, offset, volume):
    """Each calibration a built-in prior ships matches its weights and the default ensemble of 16 hybrid runs with the
    hybrid's current defaults for the modality (``TUNED_OPTIONS``): a changed default or retrained weights fail here
    until the file is refitted (``benchmarks/bench_builtin_calibration.py --fit``). MRI volumes have their own."""
    from recon.priors import load_prior
    from recon.samplers.registry import UNCERTAINTY_SAMPLES, modality_options

    info = {"method": "ensemble", "base": "hybrid", "particles": UNCERTAINTY_SAMPLES, "steps": 50,
            "options": modality_options("ensemble", modality, {"base": "hybrid"})}
    doc, why = builtin_calibration(load_prior(prior_name), info, task, volume=volume)
    assert doc is not None, why
    assert task in doc["tasks"] and (doc.get("offset", 0.0) > 0) == offset and doc["factor"] > 1.645
    assert doc.get("volume", False) == volume
    if task == "sparse-view-ct":  # CT volumes have no file of their own: the slices' factor holds for them
        doc_volume, why = builtin_calibration(load_prior(prior_name), info, task, volume=True)
        assert doc_volume == doc and "slices, applied to this volume" in why
