"""Nothing private next to an anonymised output: a folder named after a patient, reconstructed with --anonymize
by ``recon reconstruct`` and by ``recon batch``, leaves neither its path nor the patient's name in any file written
(reconstruction, companions, logs, results tables)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from recon.cli import main

CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def named_study(tmp_path) -> Path:
    study = tmp_path / "studies" / "Doe_Jane_1957"
    study.mkdir(parents=True)
    shutil.copy(CT_SMALL, study / "slice.dcm")
    return study


def _leaks(folder: Path, secrets: list[str]) -> list[str]:
    found = []
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            found += [f"{f.relative_to(folder)}: {s}" for s in secrets if s.encode() in data]
    return found


def test_reconstruct_anonymize_leaves_no_path_or_name(tmp_path, named_study):
    name = str(pydicom.dcmread(CT_SMALL).PatientName)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["reconstruct", "-i", str(named_study), "-o", str(out / "rec"), "--task", "inpainting", "--method",
                 "analytic", "--format", "dicom", "--anonymize", "--uncertainty", "-q"]) == 0
    assert (out / "rec.config.yaml").is_file() and (out / "rec_null_space").is_dir()
    assert not _leaks(out, ["Doe_Jane_1957", name, str(named_study)])


def test_batch_anonymize_leaves_no_path_or_name(tmp_path, named_study):
    name = str(pydicom.dcmread(CT_SMALL).PatientName)
    out = tmp_path / "batch"
    assert main(["batch", "-i", str(named_study.parent), "-o", str(out), "--task", "inpainting", "--method",
                 "analytic", "--format", "dicom", "--anonymize", "-q"]) == 0
    assert (out / "batch-results.csv").is_file()
    leaks = _leaks(out, [str(named_study), name])
    assert not leaks, leaks
