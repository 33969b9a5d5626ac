"""Corrupted-input corpus for the readers of :mod:`recon.datasets.io` (used by ``tests/test_io_fuzz.py`` and
``benchmarks/bench_io_fuzz.py``).

A :class:`Case` writes one corrupted variant of an offline file or DICOM folder: truncation, byte flips (in
headers, pixel data or compressed streams), header edits to invalid values, inconsistent series folders. Each case
says whether the corruption *touches the data*: a flip in uncompressed pixel data, or in a header field that
defines values or geometry (dimensions, data type, rescale, positions), changes what a correct reader returns,
and nothing in the file can tell. Everything else (a damaged gzip or PNG stream, whose checksums catch it; a
truncation; a flip in a name, date or description; an invalid header value) must end in the original data, or in
one :class:`~recon.datasets.io.ImageReadError`.

:func:`run_case` reads the variant with a time limit and classifies the outcome:

- ``correct``: read, with the original's voxels and affine;
- ``refused``: one-line ImageReadError naming the file;
- ``altered``: read, different, and the corruption touched the data (expected);
- ``silent``: read, different, and the corruption did not touch the data (a defect);
- ``crash``: any other exception, or a refusal that is not one line (a defect);
- ``hang``: over the time limit (a defect);
- ``skipped``: the variant could not be written (e.g. pydicom refuses to save an edit).
"""

from __future__ import annotations

import gzip
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recon.datasets.io.errors import ImageReadError, one_line
from recon.datasets.io.image import MedicalImage
from recon.datasets.io.read import read_image

__all__ = ["OUTCOMES", "Case", "cases_for", "offline_files", "run_case", "write_own_files"]

OUTCOMES = ("correct", "refused", "altered", "silent", "crash", "hang", "skipped")

# NIfTI-1 header bytes that define values or geometry (sizeof_hdr, dim, datatype, bitpix, pixdim, vox_offset,
# scl_slope/inter, xyzt_units, qform/sform codes and parameters, magic)
_NIFTI_DATA_FIELDS = [(0, 4), (40, 56), (70, 74), (76, 124), (252, 328), (344, 348)]
_DICOM_DATA_KEYWORDS = frozenset((
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "PlanarConfiguration", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "NumberOfFrames", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "Modality", "SOPClassUID", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    "DoseGridScaling", "GridFrameOffsetVector", "PixelPaddingValue", "SeriesInstanceUID", "FrameIncrementPointer",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "SmallestImagePixelValue", "LargestImagePixelValue",
))


class _Timeout(BaseException):  # not an Exception: the readers' ``except Exception`` must not swallow it
    pass


@dataclass(frozen=True)
class Case:
    """One corrupted variant: ``make(workdir)`` writes it and returns the path to read."""

    name: str
    base: Path
    make: Callable[[Path], Path]
    touches_data: bool


# ---------------------------------------------------------------------------------------------------------------
# mutations


def _write(work: Path, base: Path, data: bytes) -> Path:
    out = work / base.name
    out.write_bytes(data)
    return out


def _truncate(base: Path, keep: int) -> Callable[[Path], Path]:
    return lambda work: _write(work, base, base.read_bytes()[:keep])


def _flip(base: Path, offset: int) -> Callable[[Path], Path]:
    def make(work: Path) -> Path:
        raw = bytearray(base.read_bytes())
        raw[offset] ^= 0xFF
        return _write(work, base, bytes(raw))

    return make


def _nifti_edit(base: Path, field: str, value) -> Callable[[Path], Path]:
    def make(work: Path) -> Path:
        import nibabel as nib

        raw = gzip.decompress(base.read_bytes()) if base.name.endswith(".gz") else base.read_bytes()
        hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(raw[:348]), check=False)
        hdr[field] = value
        data = hdr.binaryblock + raw[348:]
        return _write(work, base, gzip.compress(data, mtime=0) if base.name.endswith(".gz") else data)

    return make


def _dicom_edit(base: Path, keyword: str, value) -> Callable[[Path], Path]:
    def make(work: Path) -> Path:
        import pydicom

        ds = pydicom.dcmread(base, force=True)
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
        out = work / base.name
        ds.save_as(out, enforce_file_format=False)
        return out

    return make


def _in(offset: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a <= offset < b for a, b in ranges)


# ---------------------------------------------------------------------------------------------------------------
# regions of a file: which bytes define the data


def _dicom_ranges(path: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """(data-defining element ranges, other element value ranges, pixel data start) of a DICOM file."""
    import pydicom

    ds = pydicom.dcmread(path, force=True)
    size = path.stat().st_size
    data, other, pixel_start = [], [], size
    for tag, elem in ds._dict.items():
        tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
        if tell is None or length is None or length > size:
            continue
        keyword = pydicom.datadict.keyword_for_tag(tag)
        if keyword in _DICOM_DATA_KEYWORDS or (tag.is_private and length > 64):
            data.append((max(0, tell - 12), tell + length))
            if keyword == "PixelData":
                pixel_start = tell
        else:
            other.append((tell, tell + length))
    return data, other, pixel_start


def _flip_offsets(rng: random.Random, ranges: list[tuple[int, int]], n: int) -> list[int]:
    ranges = [(a, b) for a, b in ranges if b > a]
    return [rng.randrange(*rng.choice(ranges)) for _ in range(n)] if ranges else []


# ---------------------------------------------------------------------------------------------------------------
# cases per format


def _truncations(base: Path, fractions: tuple[float, ...]) -> list[Case]:
    size = base.stat().st_size
    keeps = sorted({max(1, min(size - 1, int(size * f))) for f in fractions} | {size - 1})
    return [Case(f"{base.name}: truncated to {k} of {size} bytes", base, _truncate(base, k), False) for k in keeps]


def _dicom_cases(base: Path, rng: random.Random, n_flips: int) -> list[Case]:
    data, other, pixel_start = _dicom_ranges(base)
    cases = _truncations(base, (0.05, 0.3, 0.6, 0.9, 0.99))
    flips = [(o, False) for o in _flip_offsets(rng, other, n_flips)]
    flips += [(o, True) for o in _flip_offsets(rng, data, n_flips)]
    flips += [(rng.randrange(0, 128), False)]  # the preamble means nothing
    for offset, touches in flips:
        touches = touches or _in(offset, data) or offset >= pixel_start
        cases.append(Case(f"{base.name}: byte {offset} flipped", base, _flip(base, offset), touches))
    edits = [("RescaleSlope", "0"), ("RescaleSlope", "NaN"), ("RescaleSlope", "1e300"), ("RescaleIntercept", "inf"),
             ("PixelSpacing", "0.5"), ("PixelSpacing", ["0", "1"]), ("PixelSpacing", ["nan", "1"]),
             ("Rows", 0), ("Columns", 60000), ("NumberOfFrames", "100000"), ("BitsAllocated", 7),
             ("SamplesPerPixel", 3), ("ImageOrientationPatient", ["0"] * 6), ("ImageOrientationPatient", ["1"] * 5),
             ("ImagePositionPatient", ["nan", "0", "0"]), ("PixelData", None), ("Rows", None)]
    cases += [Case(f"{base.name}: {kw} = {value!r}", base, _dicom_edit(base, kw, value), False)
              for kw, value in edits]
    return cases


def _nifti_cases(base: Path, rng: random.Random, n_flips: int) -> list[Case]:
    cases = _truncations(base, (0.001, 0.05, 0.3, 0.6, 0.9, 0.999))
    size = base.stat().st_size
    if base.name.endswith(".gz"):  # every byte of a gzip stream is checked (CRC-32, length) or meaningless
        offsets = [rng.randrange(0, size) for _ in range(3 * n_flips)] + [size - 5, size - 2]
        cases += [Case(f"{base.name}: byte {o} flipped", base, _flip(base, o), False) for o in offsets]
    else:
        other = [(4, 40), (56, 70), (74, 76), (124, 252), (328, 344)]
        cases += [Case(f"{base.name}: header byte {o} flipped", base, _flip(base, o), False)
                  for o in _flip_offsets(rng, other, n_flips)]
        cases += [Case(f"{base.name}: header byte {o} flipped", base, _flip(base, o), True)
                  for o in _flip_offsets(rng, _NIFTI_DATA_FIELDS, n_flips)]
        cases += [Case(f"{base.name}: data byte {o} flipped", base, _flip(base, o), True)
                  for o in _flip_offsets(rng, [(352, size)], 2)]
    edits = [("dim", [3, 0, 4, 4, 1, 1, 1, 1]), ("dim", [3, 1500, 1500, 1500, 1, 1, 1, 1]),
             ("dim", [0, 1, 1, 1, 1, 1, 1, 1]), ("dim", [9, 2, 2, 2, 2, 2, 2, 2]), ("dim", [3, -4, 4, 4, 1, 1, 1, 1]),
             ("pixdim", [1, 0, 1, 1, 1, 1, 1, 1]), ("pixdim", [1, float("nan"), 1, 1, 1, 1, 1, 1]),
             ("datatype", 32), ("datatype", 128), ("datatype", 1234), ("scl_slope", float("inf")),
             ("vox_offset", 1e12), ("vox_offset", 10), ("intent_code", 3001), ("sizeof_hdr", 0)]
    cases += [Case(f"{base.name}: {field} = {value!r}", base, _nifti_edit(base, field, value), False)
              for field, value in edits]
    return cases


def _plain_cases(base: Path, rng: random.Random, n_flips: int, strict_flips: bool) -> list[Case]:
    """Truncations and flips of PNG (CRC-protected: flips are strict), TIFF and NumPy (flips touch the data)."""
    cases = _truncations(base, (0.01, 0.2, 0.5, 0.8, 0.99))
    size = base.stat().st_size
    offsets = [rng.randrange(0, size) for _ in range(2 * n_flips)]
    cases += [Case(f"{base.name}: byte {o} flipped", base, _flip(base, o), not strict_flips) for o in offsets]
    return cases


def _folder_cases(base: Path, rng: random.Random) -> list[Case]:
    """Inconsistent series folders: a missing, duplicated, truncated, re-oriented or foreign slice."""
    import pydicom

    files = sorted(p for p in base.iterdir() if p.is_file())
    mid = files[len(files) // 2]

    def variant(change: Callable[[Path], None]) -> Callable[[Path], Path]:
        def make(work: Path) -> Path:
            out = work / base.name
            shutil.copytree(base, out)
            change(out)
            return out

        return make

    def edit(name: str, keyword: str, value) -> Callable[[Path], None]:
        def change(out: Path) -> None:
            ds = pydicom.dcmread(out / name)
            setattr(ds, keyword, value)
            ds.save_as(out / name)

        return change

    def truncate(out: Path) -> None:
        raw = (out / mid.name).read_bytes()
        (out / mid.name).write_bytes(raw[:len(raw) * 2 // 3])

    return [
        Case(f"{base.name}/: middle slice missing", base, variant(lambda o: (o / mid.name).unlink()), False),
        Case(f"{base.name}/: a slice duplicated", base,
             variant(lambda o: shutil.copy(o / mid.name, o / f"copy_{mid.name}")), False),
        Case(f"{base.name}/: a slice truncated", base, variant(truncate), False),
        Case(f"{base.name}/: a slice re-oriented", base,
             variant(edit(mid.name, "ImageOrientationPatient", [0, 1, 0, 0, 0, 1])), False),
        Case(f"{base.name}/: a slice with another PixelSpacing", base,
             variant(edit(mid.name, "PixelSpacing", [9, 9])), False),
        Case(f"{base.name}/: a slice of another series", base,
             variant(edit(mid.name, "SeriesInstanceUID", pydicom.uid.generate_uid())), False),
        Case(f"{base.name}/: a slice with RescaleSlope 0", base, variant(edit(mid.name, "RescaleSlope", "0")), False),
        Case(f"{base.name}/: a junk file added", base,
             variant(lambda o: (o / "notes.txt").write_bytes(bytes(rng.randrange(256) for _ in range(300)))),
             False),
        Case(f"{base.name}/: last slice missing", base, variant(lambda o: files and (o / files[-1].name).unlink()),
             True),
    ]


def cases_for(base: Path, seed: int = 0, n_flips: int = 3) -> list[Case]:
    """The corrupted variants of one file or DICOM folder.

    Args:
        base: an offline file (DICOM, NIfTI, PNG, TIFF, NumPy) or a folder holding one DICOM series.
        seed: fixes the flipped bytes.
        n_flips: flips per region.

    Returns:
        The cases (a few dozen per file).
    """
    rng = random.Random(f"{seed}:{base.name}")
    name = base.name.lower()
    if base.is_dir():
        cases = _folder_cases(base, rng)
    elif name.endswith((".nii", ".nii.gz")):
        cases = _nifti_cases(base, rng, n_flips)
    elif name.endswith(".png"):
        cases = _plain_cases(base, rng, n_flips, strict_flips=True)
    elif name.endswith((".tif", ".tiff", ".npy")):
        cases = _plain_cases(base, rng, n_flips, strict_flips=False)
    else:
        cases = _dicom_cases(base, rng, n_flips)
    return list({c.name: c for c in cases}.values())  # one case per distinct corruption


# ---------------------------------------------------------------------------------------------------------------
# running


def _alarm(signum, frame):
    raise _Timeout()


def _same(a: MedicalImage, b: MedicalImage) -> bool:
    return a.array.shape == b.array.shape and np.array_equal(a.array, b.array) and np.array_equal(a.affine, b.affine)


def run_case(case: Case, work: Path, reference: MedicalImage | None, seconds: float = 10.0) -> tuple[str, str]:
    """Write the variant into ``work`` and read it with a time limit.

    Args:
        case: the case.
        work: an empty folder.
        reference: the original, as read (None: any read counts as correct).
        seconds: the time limit.

    Returns:
        ``(outcome, detail)``: one of :data:`OUTCOMES` and the error message or a note.
    """
    try:
        path = case.make(work)
    except Exception as err:
        return "skipped", f"variant not written ({type(err).__name__}: {one_line(err)})"
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.perf_counter()
    try:
        image = read_image(path)
    except _Timeout:
        return "hang", f"over {seconds:g} s"
    except ImageReadError as err:
        text = str(err)
        ok = "\n" not in text and text.startswith((str(path), str(work)))
        return ("refused" if ok else "crash"), text
    except Exception as err:  # a foreign exception: a defect
        return "crash", f"{type(err).__name__}: {one_line(err)}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if reference is None or _same(image, reference):
        return "correct", f"{time.perf_counter() - t0:.3f} s"
    return ("altered" if case.touches_data else "silent"), "read with different data or geometry"


# ---------------------------------------------------------------------------------------------------------------
# files


def write_own_files(folder: Path) -> list[Path]:
    """Small files written by our own writers and by the format libraries: NIfTI (.nii, .nii.gz), TIFF (2 pages),
    NumPy, PNG.

    Args:
        folder: where to write them.

    Returns:
        Their paths.
    """
    import tifffile
    from PIL import Image

    from recon.datasets.io.nifti import write_nifti

    rng = np.random.default_rng(0)
    volume = rng.normal(0, 300, (6, 20, 24)).round()
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.9, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    paths = [Path(write_nifti(MedicalImage(volume, affine), folder / "own.nii.gz", overwrite=True)),
             Path(write_nifti(MedicalImage(volume, affine), folder / "own.nii", overwrite=True))]
    tifffile.imwrite(folder / "own.tif", rng.integers(0, 4000, (2, 32, 40), dtype=np.uint16))
    np.save(folder / "own.npy", volume)
    Image.fromarray(rng.integers(0, 255, (30, 34), dtype=np.uint8)).save(folder / "own.png")
    return [*paths, folder / "own.tif", folder / "own.npy", folder / "own.png"]


def offline_files() -> list[Path]:
    """Every offline medical file the installed packages carry: pydicom's test files (and pydicom-data's),
    nibabel's NIfTI and DICOM test data, nilearn's MNI152 template when installed.

    Returns:
        Their paths, sorted.
    """
    import warnings

    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = {Path(p) for p in get_testdata_files("**/*") if Path(p).is_file()}
    import nibabel

    root = Path(nibabel.__file__).parent
    found |= set((root / "tests" / "data").glob("*.nii*")) | set((root / "nicom" / "tests" / "data").glob("*.dcm"))
    try:
        import nilearn

        found |= set((Path(nilearn.__file__).parent / "datasets" / "data").glob("*.nii.gz"))
    except ImportError:
        pass
    return sorted(p for p in found if not p.name.endswith((".py", ".pyc", ".json", ".txt")))
