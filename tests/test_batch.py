"""``recon batch`` on a folder of small studies made from the DICOM and NIfTI files pydicom and nibabel ship, plus
one corrupt study: discovery, manifests, sharding, the ``local`` engine (in process and a process pool), a local
Ray cluster, failures, retries and resume.

Runs that must agree bit for bit use one torch thread per worker (``threads=1``) everywhere.
"""

from __future__ import annotations

import csv
import json
import logging
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
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import recon.pipeline
import recon.priors
from recon.batch import BatchError, Study, discover_studies, is_done, read_manifest, run_batch, shard
from recon.cli import main

CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
MR_SMALL = get_testdata_file("MR_small.dcm", download=False)
ANATOMICAL = os.path.join(data_path, "anatomical.nii")
NAMES = ["anat", "broken", "ct_a", "ct_b", "mr"]
GOOD = [n for n in NAMES if n != "broken"]
DPS = {"task": "inpainting", "method": "dps", "steps": 3, "threads": 1}  # every method's code path through the prior


def _make_studies(root: Path) -> Path:
    (root / "ct_a").mkdir(parents=True)
    shutil.copy(CT_SMALL, root / "ct_a" / "CT_small.dcm")
    ds = pydicom.dcmread(CT_SMALL)  # a second CT study: the slice flipped, new UIDs
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    (root / "ct_b").mkdir()
    ds.save_as(root / "ct_b" / "slice", enforce_file_format=True)  # no suffix: found by its DICM preamble
    (root / "mr").mkdir()
    shutil.copy(MR_SMALL, root / "mr" / "MR_small.dcm")
    img = nib.load(ANATOMICAL)  # (33, 41, 25) voxels: one 32 x 32 slice keeps it fast
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:32, :32, 12:13].astype(np.float32), img.affine),
             root / "anat.nii.gz")
    (root / "broken").mkdir()
    (root / "broken" / "x.dcm").write_bytes(b"not DICOM at all " * 20)
    (root / "notes.txt").write_text("not a study")
    return root


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    return _make_studies(tmp_path_factory.mktemp("batch") / "studies")


@pytest.fixture(scope="module")
def local_dps(studies, tmp_path_factory):
    """dps on every study in this process, counting the real ``load_prior`` calls."""
    out = tmp_path_factory.mktemp("local_dps") / "out"
    calls = []
    real = recon.priors.load_prior

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recon.priors, "load_prior", counting)
        summary = run_batch(studies, out, **DPS)
    return summary, out, calls


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


def _image(out: Path, name: str) -> np.ndarray:
    return np.asarray(nib.load(out / name / "rec.nii.gz").dataobj)


def _status(summary) -> dict:
    return {r["study"]: r["status"] for r in summary.results}


# -------------------------------------------------------------------------------------------------- studies
def test_discovery_finds_dicom_folders_and_nifti_files_with_safe_unique_names(studies, tmp_path):
    found = discover_studies(studies)
    assert [s.name for s in found] == NAMES  # sorted; notes.txt is no study
    assert {s.name: s.input for s in found}["ct_b"] == studies / "ct_b"
    root = tmp_path / "nested"
    (root / "p 1" / "ct" / "sub").mkdir(parents=True)
    shutil.copy(CT_SMALL, root / "p 1" / "ct" / "a.dcm")
    shutil.copy(CT_SMALL, root / "p 1" / "ct" / "sub" / "b.dcm")  # below a study folder: part of it
    shutil.copy(studies / "anat.nii.gz", root / "x.nii.gz")
    shutil.copy(studies / "anat.nii.gz", root / "X.nii")  # same name case-insensitively
    (root / ".hidden").mkdir()
    shutil.copy(CT_SMALL, root / ".hidden" / "c.dcm")
    (root / "out" / "old").mkdir(parents=True)
    shutil.copy(CT_SMALL, root / "out" / "old" / "c.dcm")
    names = [s.name for s in discover_studies(root, exclude=root / "out")]
    assert len(names) == 3 and names[1] == "p_1__ct"  # "/" -> "__", " " -> "_"; .hidden and OUTDIR skipped
    assert names[0].startswith("X-") and names[2].startswith("x-") and len(names[0]) == len("X-") + 8
    single = tmp_path / "series"
    single.mkdir()
    shutil.copy(CT_SMALL, single / "a.dcm")
    assert [s.name for s in discover_studies(single)] == ["series"]  # the input folder itself is the study
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchError, match="no studies found"):
        discover_studies(tmp_path / "empty")
    with pytest.raises(BatchError, match="manifest"):
        discover_studies(studies / "anat.nii.gz")


def test_shards_cover_every_study_exactly_once(studies, tmp_path, capsys):
    many = [Study(f"s{i:03d}", Path(f"s{i}")) for i in range(60)]
    parts = [shard(many, 3, k) for k in range(3)]
    names = [s.name for p in parts for s in p]
    assert sorted(names) == [s.name for s in many] and all(parts)
    assert [s.name for s in shard(many[::-1], 3, 1)] == [s.name for s in parts[1]][::-1]  # by name, not position
    assert [s.name for s in shard(many[:30], 3, 2)] == [s.name for s in parts[2] if s.name < "s030"]
    for bad in ((0, 0), (3, 3), (3, -1)):
        with pytest.raises(BatchError, match=r"--num-parts|--part-id"):
            shard(many, *bad)
    out = tmp_path / "parts"
    seen = []
    for k in range(3):
        code = main(["batch", "-i", str(studies), "-o", str(out), "--task", "inpainting", "--method", "analytic",
                     "--num-parts", "3", "--part-id", str(k), "-q"])
        capsys.readouterr()
        rows = list(csv.DictReader((out / f"batch-results.part-{k}-of-3.csv").open()))
        assert code == (1 if "broken" in [r["study"] for r in rows] else 0)
        seen += [r["study"] for r in rows]
    assert sorted(seen) == NAMES
    assert all((out / n / "done.json").is_file() for n in GOOD)


def test_manifest_rows_options_and_errors(studies, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    rel = os.path.relpath(studies, tmp_path)
    manifest.write_text(f"input,output,method,steps,seed,missing,options.lam\n"
                        f"{rel}/mr,mr-tv,tv,5,3,0.25,0.01\n"
                        f"{studies}/anat.nii.gz,anat-fbp,analytic,,,,\n")
    found = read_manifest(manifest)
    assert [s.name for s in found] == ["anat-fbp", "mr-tv"]
    assert found[1].input == tmp_path / rel / "mr"  # relative to the manifest's folder
    assert found[1].options == {"method": "tv", "steps": 5, "seed": 3, "task_params": {"missing": 0.25},
                                "options": {"lam": 0.01}}
    assert found[0].options == {"method": "analytic"}
    summary = run_batch(manifest, tmp_path / "out", task="inpainting", method="dps", threads=1)
    assert _status(summary) == {"anat-fbp": "done", "mr-tv": "done"}
    reports = {n: json.loads((tmp_path / "out" / n / "rec.report.json").read_text()) for n in _status(summary)}
    assert reports["mr-tv"]["method"] == "tv" and reports["mr-tv"]["seed"] == 3 and reports["anat-fbp"]["nfe"] == 0
    config = (tmp_path / "out" / "mr-tv" / "rec.config.yaml").read_text()
    assert "missing: 0.25" in config and "lam: 0.01" in config
    for header, row, match in [("input,output,colour", "a,b,red", "unknown column 'colour'"),
                               ("input,output", "a,../up", "'output'"), ("input", "a", "'output' column"),
                               ("input,output,steps", "a,b,many", "column 'steps': expected an integer"),
                               ("input,output,method", "a,b,magic", "'magic'")]:
        manifest.write_text(f"{header}\n{row}\n")
        code = main(["batch", "-i", str(manifest), "-o", str(tmp_path / "x"), "--task", "inpainting"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("recon: error:") and str(manifest) in err[0]
        assert match in err[0], (match, err[0])
    manifest.write_text("input,output\na,same\nb,Same\n")
    with pytest.raises(BatchError, match=r"row 3.*also row 2"):
        read_manifest(manifest)


# ------------------------------------------------------------------------------------------- local and ray
def test_corrupt_study_is_reported_others_succeed_and_each_prior_loads_once(local_dps):
    summary, out, calls = local_dps
    assert _status(summary) == {**dict.fromkeys(GOOD, "done"), "broken": "failed"}
    assert summary.exit_code == 1 and (summary.done, summary.failed, summary.skipped) == (4, 1, 0)
    broken = next(r for r in summary.results if r["study"] == "broken")
    assert broken["error"].startswith("ImageReadError:") and "x.dcm" in broken["error"] and "\n" not in broken["error"]
    assert broken["attempts"] == 1  # an unreadable study is not retried
    assert "Traceback" in (out / "broken" / "log.txt").read_text() and not (out / "broken" / "done.json").exists()
    # one worker (this process): 4 studies, two priors (default-ct for CT and NIfTI, default-mri for MR)
    assert sorted(calls) == ["default-ct", "default-mri"]
    assert len(summary.worker_stats) == 1 and summary.worker_stats[0]["prior_loads"] == 2
    rows = list(csv.DictReader(open(summary.results_csv)))
    assert [r["study"] for r in rows] == NAMES and rows[2]["status"] == "done" and float(rows[2]["psnr"]) > 10
    table = json.loads(Path(summary.results_json).read_text())
    assert table["failed"] == 1 and [r["study"] for r in table["results"]] == NAMES
    for name in GOOD:
        state, marker = is_done(out / name)
        assert state == "done" and marker["report"]["nfe"] == 3
        assert {"image", "preview", "report", "provenance", "config"} <= set(marker["outputs"])
        assert "INFO recon.batch: done" in (out / name / "log.txt").read_text()


def test_batch_output_equals_recon_reconstruct(local_dps, studies, tmp_path):
    import torch

    _, out, _ = local_dps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = recon.pipeline.reconstruct_file(studies / "ct_a", tmp_path / "single.nii.gz", method="dps", steps=3,
                                                 task="inpainting")
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "single.nii.gz").dataobj), _image(out, "ct_a"))
    assert report["prior"] == json.loads((out / "ct_a" / "rec.report.json").read_text())["prior"] == "default-ct"


def test_ray_engine_gives_identical_outputs_with_each_prior_loaded_once_per_worker(ray_cluster, local_dps,
                                                                                   studies, tmp_path):
    reference, ref_out, _ = local_dps
    summary = run_batch(studies, tmp_path / "ray", engine="ray", workers=2, **DPS)
    assert _status(summary) == _status(reference) and summary.exit_code == 1
    for name in GOOD:
        np.testing.assert_array_equal(_image(tmp_path / "ray", name), _image(ref_out, name))
    stats = summary.worker_stats  # two actors, each loading a prior at most once (two priors, five studies)
    assert sum(w["studies"] for w in stats) == len(NAMES) and os.getpid() not in {w["pid"] for w in stats}
    assert len(stats) <= 2 and all(w["prior_loads"] <= min(2, w["studies"]) for w in stats)
    assert ray_cluster.is_initialized()  # a cluster run_batch did not start is left running


CRASHING = """
import os
from pathlib import Path

from recon import batch


def run(task):  # the worker process dies during mr's first attempt
    flag = Path(task["folder"] + ".crashed")
    if task["study"] == "mr" and not flag.exists():
        flag.write_text("crashed")
        os._exit(3)
    return batch._pool_run(task)
"""


def test_local_process_pool_matches_the_in_process_run_and_survives_a_crashed_worker(studies, tmp_path,
                                                                                     monkeypatch):
    import recon.batch

    common = {"task": "inpainting", "method": "analytic", "threads": 1}
    one = run_batch(studies, tmp_path / "one", **common)
    (tmp_path / "crashing_worker.py").write_text(CRASHING)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get this sys.path
    import crashing_worker

    monkeypatch.setattr(recon.batch, "_pool_run", crashing_worker.run)
    two = run_batch(studies, tmp_path / "two", workers=2, **common)
    assert _status(one) == _status(two) and (tmp_path / "two" / "mr.crashed").is_file()
    for name in GOOD:
        np.testing.assert_array_equal(_image(tmp_path / "two", name), _image(tmp_path / "one", name))
    assert {r["study"]: r["attempts"] for r in two.results}["mr"] == 2  # the lost attempt was retried
    assert all(w["pid"] != os.getpid() for w in two.worker_stats)


# --------------------------------------------------------------------------------------- failures, resume
def test_unexpected_errors_are_retried_a_bounded_number_of_times(studies, tmp_path, monkeypatch):
    real = recon.pipeline.reconstruct_file
    failures: dict = {}

    def flaky(input, output, **kwargs):
        failures[output] = failures.get(output, 0) + 1
        if failures[output] == 1:
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return real(input, output, **kwargs)

    monkeypatch.setattr(recon.pipeline, "reconstruct_file", flaky)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"input,output\n{studies / 'mr'},mr\n")
    summary = run_batch(manifest, tmp_path / "retry", task="inpainting", method="analytic", threads=1)
    assert _status(summary) == {"mr": "done"} and summary.results[0]["attempts"] == 2
    assert "CUDA out of memory" in (tmp_path / "retry" / "mr" / "log.txt").read_text()  # the log keeps attempt 1
    failures.clear()
    summary = run_batch(manifest, tmp_path / "no-retry", task="inpainting", method="analytic", threads=1, retries=0)
    assert summary.results[0]["error"] == "RuntimeError: CUDA out of memory (simulated)" and summary.exit_code == 1


def test_interrupted_run_resumes_only_the_missing_studies(studies, tmp_path, monkeypatch):
    out = tmp_path / "out"
    common = {"task": "inpainting", "method": "analytic", "threads": 1}
    real = recon.pipeline.reconstruct_file
    ran: list[str] = []

    def interrupted(input, output, **kwargs):  # the 3rd study writes all its outputs, then the run is killed
        ran.append(Path(output).parent.name)
        report = real(input, output, **kwargs)
        if len(ran) == 3:
            raise KeyboardInterrupt
        return report

    monkeypatch.setattr(recon.pipeline, "reconstruct_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_batch(studies, out, **common)
    assert ran == ["anat", "broken", "ct_a"]
    assert (out / "ct_a" / "rec.nii.gz").is_file() and not (out / "ct_a" / "done.json").exists()
    (out / "ct_a" / ".rec.nii.gz.0123456789ab.tmp.nii.gz").write_bytes(b"half")  # a write cut short
    first = _image(out, "anat")
    ran.clear()
    monkeypatch.setattr(recon.pipeline, "reconstruct_file", lambda i, o, **kw: ran.append(Path(o).parent.name)
                        or real(i, o, **kw))
    summary = run_batch(studies, out, **common)
    assert _status(summary) == {"anat": "skipped", "broken": "failed", "ct_a": "done", "ct_b": "done", "mr": "done"}
    assert sorted(ran) == ["broken", "ct_a", "ct_b", "mr"]
    assert not list((out / "ct_a").glob(".rec*")) and np.array_equal(_image(out, "anat"), first)
    skipped = summary.results[0]
    assert skipped["psnr"] == json.loads((out / "anat" / "rec.report.json").read_text())["psnr"]  # from done.json
    assert skipped["outputs"]["image"].endswith("rec.nii.gz")
    # a damaged output is not taken as done; another configuration is not silently replaced
    with open(out / "ct_b" / "rec.nii.gz", "ab") as f:
        f.write(b"\0")
    ran.clear()
    again = run_batch(studies, out, **common)
    assert sorted(ran) == ["broken", "ct_b"] and _status(again)["ct_b"] == "done"
    other = run_batch(studies, out, **{**common, "seed": 1})
    assert {r["study"]: r["error"] for r in other.results if r["status"] == "failed"}["mr"].endswith(
        "(use --overwrite to redo it)")
    ran.clear()
    redo = run_batch(studies, out, **{**common, "seed": 1}, overwrite=True)
    assert sorted(ran) == NAMES and redo.done == 4


# ----------------------------------------------------------------------------------------------- command
def test_command_line_end_to_end(studies, tmp_path, capsys):
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "recon.cli", "batch", "-i", str(studies), "-o", str(out), "--task",
                          "inpainting", "--method", "analytic", "--threads", "1", "--json"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 1, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["done"], summary["failed"]) == (4, 1) and summary["results_csv"] == str(out / "batch-results.csv")
    progress = [line for line in run.stderr.splitlines() if line.startswith("recon batch: [")]
    assert len(progress) == 5 and progress[-1].startswith("recon batch: [5/5]"), run.stderr
    assert main(["batch", "-i", str(studies), "-o", str(out), "--task", "inpainting", "--method", "analytic",
                 "--threads", "1"]) == 1
    text = capsys.readouterr().out
    assert "0 done, 4 skipped, 1 failed" in text and "failed broken: ImageReadError" in text
    for argv, match in [(["--part-id", "1"], "--num-parts"), (["--num-parts", "2", "--part-id", "2"], "--part-id"),
                        (["--ray-address", "auto"], "--engine ray"), (["--workers", "0"], "--workers"),
                        (["--device", "tpu"], "--device")]:
        code = main(["batch", "-i", str(studies), "-o", str(out), "--task", "inpainting", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and match in err[0], (argv, err)
    code = main(["batch", "-i", str(tmp_path / "nowhere"), "-o", str(out)])
    assert code == 2 and str(tmp_path / "nowhere") in capsys.readouterr().err


def test_ray_engine_without_ray_is_a_one_line_error(studies, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main(["batch", "-i", str(studies), "-o", str(tmp_path / "o"), "--task", "inpainting", "--engine", "ray"])
    assert code == 2 and "pip install diffrecon[ray]" in capsys.readouterr().err
