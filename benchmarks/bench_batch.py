"""``recon batch`` throughput: studies per minute for the ``local`` and ``ray`` engines with 1 and 2 workers, the
fixed overhead per study, and an extrapolation to 10,000 studies on N GPUs.

    python benchmarks/bench_batch.py --studies 8 --json benchmarks/batch.json

Studies: ``--studies`` single-slice CT DICOM studies made from pydicom's ``CT_small.dcm`` (128×128; each one
flipped/rolled differently, new UIDs), each simulated and reconstructed as ``recon batch --task sparse-view-ct
--views 30 --method dps --steps 10`` does. Every configuration runs into a fresh OUTDIR, so its wall time
includes starting the engine (a process pool or a local Ray cluster and its actors) and loading the prior once
per worker. Workers × threads = the machine's cores (1 worker × 2 threads, 2 workers × 1 thread on 2 cores), or
``--threads`` per worker (``--threads 1`` on a machine shared with other jobs, where two torch threads fight for
the cores and run several times slower than one).

Reported per configuration: wall seconds, studies per minute (studies / wall), the mean per-study seconds in
its worker, the sampler's share of it (``report["seconds"]``) and the rest, the fixed overhead per study
(reading, simulation, operator, metrics, preview, writing, done marker), and the engine start-up (wall minus the
studies' seconds divided by the workers). A ``--method analytic`` run (no sampler) measures the overhead alone.

Extrapolation (on paper, not measured): with one worker per GPU, 10,000 studies take about
``T(N) = start-up + ceil(10000 / N) × (o + s / g)``: ``o`` the fixed overhead per study, ``s`` the sampler seconds
per study measured here, ``g`` the GPU's speed-up of the sampler (not measured on this machine). The table gives
the two bounds: ``g = 1`` (every second measured here stays) and ``g = ∞`` (the sampler is free: overhead only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_studies(root: Path, n: int) -> Path:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = get_testdata_file("CT_small.dcm", download=False)
    base = pydicom.dcmread(src)
    pixels = base.pixel_array
    for i in range(n):
        ds = pydicom.dcmread(src)
        a = np.roll(pixels[::-1] if i % 2 else pixels, 7 * i, axis=1)
        ds.PixelData = np.ascontiguousarray(a.astype(pixels.dtype)).tobytes()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        folder = root / f"study{i:03d}"
        folder.mkdir(parents=True)
        ds.save_as(folder / "slice.dcm", enforce_file_format=True)
    return root


def digest(out: Path) -> dict:
    import nibabel as nib

    return {p.parent.name: hashlib.sha256(np.asarray(nib.load(p).dataobj).tobytes()).hexdigest()
            for p in sorted(out.glob("*/rec.nii.gz"))}


def measure(studies: Path, work: Path, engine: str, workers: int, threads: int, settings: dict) -> dict:
    from recon.batch import run_batch

    out = work / f"{engine}-{workers}-{settings['method']}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_batch(studies, out, engine=engine, workers=workers, threads=threads, quiet=True, **settings)
    wall = time.perf_counter() - t0
    done = [r for r in summary.results if r["status"] == "done"]
    if summary.failed:
        raise RuntimeError(f"{engine}/{workers}: {[r['error'] for r in summary.results if r['status'] == 'failed']}")
    per_study = float(np.mean([r["seconds"] for r in done]))
    sampler = float(np.mean([r["reconstruct_seconds"] for r in done]))
    startup = wall - sum(r["seconds"] for r in done) / workers
    return {"engine": engine, "workers": workers, "threads": threads, "method": settings["method"],
            "studies": len(done), "wall_s": wall, "studies_per_minute": len(done) / wall * 60,
            "per_study_s": per_study, "sampler_s": sampler, "overhead_per_study_s": per_study - sampler,
            "engine_startup_s": startup, "prior_loads": [w["prior_loads"] for w in summary.worker_stats],
            "digest": digest(out)}


def extrapolate(rows: list[dict], gpus=(1, 8, 64, 256), n: int = 10_000) -> list[dict]:
    best = min((r for r in rows if r["method"] != "analytic"), key=lambda r: r["per_study_s"])
    o, s = best["overhead_per_study_s"], best["sampler_s"]
    start = max([r["engine_startup_s"] for r in rows if r["engine"] == "ray"] or [0.0])  # a cluster's start-up
    out = []
    for g in gpus:
        per_gpu = math.ceil(n / g)
        out.append({"gpus": g, "studies_per_gpu": per_gpu, "hours_if_sampler_as_measured": (start + per_gpu * (o + s))
                    / 3600, "hours_if_sampler_free": (start + per_gpu * o) / 3600})
    return [{"from": f"{best['engine']} {best['workers']} worker(s): o = {o:.2f} s, s = {s:.2f} s, start-up "
             f"{start:.1f} s", "formula": "T(N) = start-up + ceil(10000 / N) * (o + s / g)"}, *out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--views", type=int, default=30)
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cores / workers)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    studies = make_studies(work / "studies", args.studies)
    common = {"task": "sparse-view-ct", "task_params": {"views": args.views}}
    rows = []
    # warm the imports and the file cache (not timed), then the configurations
    from recon.batch import run_batch

    run_batch(studies, work / "warm", method="analytic", quiet=True, **common)
    for engine in args.engines.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            threads = args.threads or max(1, cores // workers)
            row = measure(studies, work, engine, workers, threads, {**common, "method": "dps", "steps": args.steps})
            rows.append(row)
            print(f"{engine:5s} {workers} worker(s) x {threads} thread(s): {row['studies_per_minute']:.2f} "
                  f"studies/min, {row['per_study_s']:.2f} s per study ({row['sampler_s']:.2f} s sampler, "
                  f"{row['overhead_per_study_s']:.2f} s overhead), start-up {row['engine_startup_s']:.1f} s",
                  flush=True)
    analytic = measure(studies, work, "local", 1, args.threads or cores, {**common, "method": "analytic"})
    rows.append(analytic)
    print(f"analytic (overhead only): {analytic['per_study_s']:.2f} s per study, "
          f"{analytic['studies_per_minute']:.1f} studies/min", flush=True)
    same = {}
    for workers in (int(w) for w in args.workers.split(",")):
        pair = [r for r in rows if r["workers"] == workers and r["method"] == "dps"]
        if len(pair) == 2:
            same[f"{workers} worker(s)"] = pair[0]["digest"] == pair[1]["digest"]
    result = {"command": "python benchmarks/bench_batch.py " + " ".join(sys.argv[1:]),
              "machine": {"cores": cores, "python": platform.python_version(), "platform": platform.platform(),
                          "load_average_before": load_before, "load_average_after": os.getloadavg()},
              "settings": {"studies": args.studies, "image": "CT_small.dcm variants, 128x128", "task":
                           f"sparse-view-ct, {args.views} views, 1e5 photons", "method": f"dps, {args.steps} steps",
                           "threads_per_worker": args.threads or "cores / workers"},
              "rows": [{k: v for k, v in r.items() if k != "digest"} for r in rows],
              "identical_outputs_local_vs_ray": same,
              "extrapolation_10000_studies": extrapolate(rows)}
    print(json.dumps(result["extrapolation_10000_studies"], indent=1))
    print("identical outputs local vs ray:", same)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
