"""The readers against a corpus of real and corrupted files: crashes, hangs, silent wrong reads, refusals, correct
reads (issue 19's targets: 0 crashes, 0 hangs, 0 silent wrong reads).

    python benchmarks/bench_io_fuzz.py --json benchmarks/io_fuzz.json

Real files: every offline medical file the installed packages carry (pydicom's test files and pydicom-data's,
nibabel's NIfTI and DICOM test data, nilearn's MNI152 templates), every DICOM series folder among them, and small
files written by ``recon`` and the format libraries; each is read once with ``read_image`` and must be read or
refused with one project error. Corrupted variants (``recon.datasets.fuzz.cases_for``: truncations, byte flips in
headers, pixel data and compressed streams, header edits to invalid values, inconsistent series folders) are made
from every real file that reads and is at most ``--max-mb`` large, and classified by ``run_case`` against the
original read: ``correct``, ``refused``, ``altered`` (different, where the corruption touched the data or a
field that defines it: expected), ``silent`` (different where it did not: a defect), ``crash``, ``hang``
(``--seconds`` per case). Prints the counts, the slowest case and every defect.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from recon.datasets import read_image
from recon.datasets.fuzz import OUTCOMES, Case, cases_for, offline_files, run_case, write_own_files

DEFECTS = ("silent", "crash", "hang")


def _series_folders(files: list[Path]) -> list[Path]:
    """Folders under pydicom's ``dicomdirtests`` that hold one series of at least 3 slices."""
    folders = sorted({f.parent for f in files if "dicomdirtests" in f.parts and f.name != "DICOMDIR"})
    return [d for d in folders if len([f for f in d.iterdir() if f.is_file()]) >= 3]


def _read_originals(paths: list[Path], seconds: float) -> tuple[dict, dict]:
    """Read every real input once: outcome counts and the images that were read."""
    counts: collections.Counter = collections.Counter()
    images, defects = {}, []
    work = Path(tempfile.mkdtemp())
    for path in paths:
        identity = Case(f"{path.name} (as shipped)", path, lambda w, path=path: path, False)
        outcome, detail = run_case(identity, work, None, seconds)
        counts[outcome] += 1
        if outcome == "correct":
            images[path] = read_image(path)
        elif outcome in DEFECTS:
            defects.append(f"{outcome}: {path}: {detail}")
    shutil.rmtree(work, ignore_errors=True)
    return {"counts": dict(counts), "defects": defects}, images


def _run_variants(bases: dict, seconds: float, seed: int) -> dict:
    counts: collections.Counter = collections.Counter()
    by_format: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    defects, slowest = [], (0.0, "")
    root = Path(tempfile.mkdtemp())
    for base, reference in bases.items():
        fmt = "DICOM folder" if base.is_dir() else "".join(base.suffixes[-2:]).lower() or "DICOM"
        for case in cases_for(base, seed=seed):
            work = Path(tempfile.mkdtemp(dir=root))
            t0 = time.perf_counter()
            outcome, detail = run_case(case, work, reference, seconds)
            elapsed = time.perf_counter() - t0
            slowest = max(slowest, (elapsed, case.name))
            counts[outcome] += 1
            by_format[fmt][outcome] += 1
            if outcome in DEFECTS:
                defects.append(f"{outcome}: {case.name}: {detail}")
            shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    return {"counts": dict(counts), "by_format": {k: dict(v) for k, v in by_format.items()},
            "defects": defects, "slowest_case": {"seconds": round(slowest[0], 3), "case": slowest[1]}}


def _table(title: str, counts: dict) -> str:
    cells = " | ".join(str(counts.get(o, 0)) for o in OUTCOMES)
    return f"| {title} | {sum(counts.values())} | {cells} |"


def main(argv: list[str] | None = None) -> int:
    """Run the corpus and print the counts.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        1 if there is any crash, hang or silent wrong read, else 0.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="time limit per case")
    parser.add_argument("--max-mb", type=float, default=2.0, help="largest real file to corrupt (MB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    files = offline_files()
    own = write_own_files(Path(tempfile.mkdtemp()))
    real = files + _series_folders(files) + own
    originals, images = _read_originals(real, args.seconds)
    bases = {p: img for p, img in images.items()
             if p.is_dir() or p.stat().st_size <= args.max_mb * 1e6}
    variants = _run_variants(bases, args.seconds, args.seed)
    result = {"command": "python benchmarks/bench_io_fuzz.py " + " ".join(argv or sys.argv[1:]),
              "real_inputs": len(real), "corrupted_bases": len(bases), "originals": originals,
              "variants": variants, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"| inputs | n | {' | '.join(OUTCOMES)} |\n|---|---|{'---|' * len(OUTCOMES)}")
    print(_table(f"real files and folders ({len(real)})", originals["counts"]))
    print(_table(f"corrupted variants of {len(bases)} of them", variants["counts"]))
    for fmt, counts in sorted(variants["by_format"].items()):
        print(_table(f"  {fmt}", counts))
    print(f"slowest case: {variants['slowest_case']}; total {result['seconds']} s")
    for line in originals["defects"] + variants["defects"]:
        print(line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return int(bool(originals["defects"] or variants["defects"]))


if __name__ == "__main__":
    sys.exit(main())
