"""Fuzzing the readers (issue 19): every corrupted input ends in a correct read or one project error.

A fixed sample of corrupted variants (``recon.datasets.fuzz``: truncations, byte flips in headers, pixel data and
compressed streams, header edits, inconsistent series folders) over small offline files, each read with a time
limit: no crash (foreign exception), no hang, no read that returns different data where the corruption did not
touch the data. Plus property-based tests (Hypothesis) of the header parsers, checked against nibabel, pydicom and
NumPy reading the same bytes. The full corpus runs in ``benchmarks/bench_io_fuzz.py``.
"""

from __future__ import annotations

import collections
import io
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from nibabel.testing import data_path as NIB_DATA
from pydicom.data import get_testdata_file, get_testdata_files

from recon.datasets import ImageReadError, read_image
from recon.datasets.fuzz import cases_for, run_case, write_own_files

SAMPLE = ["CT_small.dcm", "MR_small_RLE.dcm", "anatomical.nii", "standard.nii.gz", "CT5N", "own.nii.gz", "own.nii",
          "own.tif", "own.npy", "own.png"]
DEFECTS = ("silent", "crash", "hang")
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def own_files(tmp_path_factory) -> dict[str, Path]:
    return {p.name: p for p in write_own_files(tmp_path_factory.mktemp("own"))}


def _base(name: str, own: dict[str, Path]) -> Path:
    if name in own:
        return own[name]
    if name == "CT5N":
        return Path(sorted(get_testdata_files("dicomdirtests/98892001/CT5N/*"))[0]).parent
    if name.endswith((".nii", ".nii.gz")):
        return Path(NIB_DATA) / name
    return Path(get_testdata_file(name, download=False))


@pytest.mark.parametrize("name", SAMPLE)
def test_corrupted_variants_end_in_a_correct_read_or_one_project_error(name, own_files, tmp_path):
    base = _base(name, own_files)
    reference = read_image(base)
    counts: collections.Counter = collections.Counter()
    defects = []
    logging.disable(logging.CRITICAL)  # pydicom/tifffile log every damaged file they meet
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, case in enumerate(cases_for(base, seed=0)):
                work = tmp_path / str(i)
                work.mkdir()
                outcome, detail = run_case(case, work, reference, seconds=10.0)
                counts[outcome] += 1
                if outcome in DEFECTS:
                    defects.append(f"{outcome}: {case.name}: {detail}")
    finally:
        logging.disable(logging.NOTSET)
    print(f"{name}: {dict(counts)}")
    assert not defects, defects
    assert counts["refused"] > 0


# ---------------------------------------------------------------------------------------------------------------
# property-based tests of the header parsers


_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -1.0, 1e30]))


def _nifti_bytes(dim, pixdim, datatype, slope, inter, offset) -> bytes:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    raw = img.to_bytes()
    hdr = img.header.copy()
    hdr["vox_offset"] = 352
    for key, value in (("dim", dim), ("pixdim", pixdim), ("datatype", datatype), ("scl_slope", slope),
                       ("scl_inter", inter), ("vox_offset", offset)):
        if value is not None:
            hdr[key] = value
    return hdr.binaryblock + raw[348:]


@PROPERTY
@given(dim=st.one_of(st.none(), st.lists(st.integers(-2, 3000), min_size=8, max_size=8)),
       pixdim=st.one_of(st.none(), st.lists(_FLOATS, min_size=8, max_size=8)),
       datatype=st.one_of(st.none(), st.sampled_from([2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1792, 2304, 7, 999])),
       slope=st.one_of(st.none(), _FLOATS), inter=st.one_of(st.none(), _FLOATS),
       offset=st.one_of(st.none(), st.sampled_from([0.0, 100.0, 352.0, 356.0, 1e9, float("nan")])))
def test_nifti_header_parser_agrees_with_nibabel_or_refuses(tmp_path, dim, pixdim, datatype, slope, inter, offset):
    if dim is not None:
        dim[0] = min(max(dim[0], -1), 8)
    path = tmp_path / "h.nii"
    path.write_bytes(_nifti_bytes(dim, pixdim, datatype, slope, inter, offset))
    try:
        ours = read_image(path)
    except ImageReadError as err:
        assert "\n" not in str(err) and str(err).startswith(str(path))
        return
    theirs = nib.load(str(path))  # the reference: only reached once our checks bounded the size by the file's
    data = np.asarray(theirs.get_fdata(dtype=np.float64))
    if data.ndim > 3:
        data = data.reshape(*data.shape[:3], -1)[..., 0]
    data = data.reshape(data.shape + (1,) * (3 - data.ndim))
    np.testing.assert_array_equal(ours.array, data.transpose(2, 1, 0))


_DS_TEXT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(lambda v: f"{v:.6g}"),
                     st.sampled_from(["", "abc", "1e300", "-0", "2", "0.5"]))


@PROPERTY
@given(slope=st.one_of(st.none(), _DS_TEXT), intercept=st.one_of(st.none(), _DS_TEXT),
       spacing=st.one_of(st.none(), st.lists(_DS_TEXT, min_size=0, max_size=3)),
       frames=st.one_of(st.none(), st.sampled_from(["0", "1", "2", "-1", "1e9", "x"])))
def test_dicom_header_parser_agrees_with_pydicom_or_refuses(tmp_path, slope, intercept, spacing, frames):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept), ("PixelSpacing", spacing),
                               ("NumberOfFrames", frames)):
            if value is not None:
                try:
                    ds[keyword] = pydicom.DataElement(pydicom.datadict.tag_for_keyword(keyword),
                                                      "DS" if keyword != "NumberOfFrames" else "IS", value)
                except ValueError:
                    assume(False)  # pydicom will not even hold this value (invalid text is in the fuzz corpus)
        path = tmp_path / "h.dcm"
        ds.save_as(path, enforce_file_format=True)
        try:
            ours = read_image(path)
        except ImageReadError as err:
            assert "\n" not in str(err) and str(err).startswith(str(path))
            return
        ref = pydicom.dcmread(path)
        slope_read = float(ref.get("RescaleSlope") or 1)  # absent or empty: identity
        expected = ref.pixel_array * slope_read + float(ref.get("RescaleIntercept") or 0)
    np.testing.assert_array_equal(ours.array[0], expected)
    assert slope_read != 0 and np.isfinite(slope_read)


@PROPERTY
@given(shape=st.lists(st.integers(-1, 40), min_size=0, max_size=4),
       dtype=st.sampled_from(["<f4", ">i2", "<u1", "<c8", "|O", "<f8", "<i8", "|b1"]))
def test_numpy_header_parser_agrees_with_numpy_or_refuses(tmp_path, shape, dtype):
    payload = np.arange(2000, dtype=np.float64).tobytes()
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    path = tmp_path / "h.npy"
    path.write_bytes(buf.getvalue() + payload)
    try:
        ours = read_image(path)
    except ImageReadError as err:
        assert "\n" not in str(err) and str(err).startswith(str(path))
        return
    theirs = np.load(path, allow_pickle=False)
    np.testing.assert_array_equal(ours.array, np.asarray(theirs, np.float64).reshape(ours.array.shape))


def test_the_oracle_tells_silent_from_altered_reads(tmp_path, own_files):
    """A read that differs from the reference is a defect unless the corruption touched the data."""
    from recon.datasets.fuzz import Case

    base = own_files["own.nii"]
    reference = read_image(base)
    wrong = reference.with_array(reference.array + 1)
    same = Case("unchanged copy", base, lambda work: base, touches_data=False)
    assert run_case(same, tmp_path, reference)[0] == "correct"
    assert run_case(same, tmp_path, wrong)[0] == "silent"
    assert run_case(Case("pixels edited", base, lambda work: base, True), tmp_path, wrong)[0] == "altered"
