"""ΠGDM's step count and CG iterations for limited-angle CT (its default task until 2026-12-06), on tuning slices.

The 60 s budget per 256² slice on the 2-core CPU (issue 16) set an upper bound on the steps (one network
evaluation and one backward pass each; ``bench_default_time.py`` measures the seconds). This script measures what
fewer steps cost in quality on images no reported benchmark uses: slices of the held-out InVesalius slab averaged
to 128², limited angle 90° (60 views) and 120° (80 views) at 1e5 photons, on the whitened problem as ``recon
reconstruct`` runs it. Scores: PSNR on the full range and in the brain window, as ``bench_hybrid_tuning.py``.

    python benchmarks/bench_pigdm_steps.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \\
        --json benchmarks/pigdm_steps.json
    python benchmarks/bench_pigdm_steps.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \
        --steps 100 --cg-iters 20 30 --warm-start 1 --json benchmarks/pigdm_warm.json   # CG from the last level
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hybrid_tuning import slice_128, tuning_mean, tuning_problem, tuning_scores

import recon
from recon.datasets import read_image
from recon.priors import load_prior

TASKS = {"la90": (60, 90.0), "la120": (80, 120.0)}


def run_case(hu: np.ndarray, task: str, prior, label: dict, settings: list[tuple[int, int, bool]]) -> list[dict]:
    views, arc = TASKS[task]
    spec, _, physics, y_n, sigma_n, a, b = tuning_problem(hu, prior, "limited-angle-ct", views=views, arc=arc)
    rows = []
    for n, cg, warm in settings:
        t0 = time.perf_counter()
        res = recon.reconstruct(physics, y_n, prior, method="pigdm", sigma_y=sigma_n, seed=0, steps=n, cg_iters=cg,
                                cg_warm_start=warm)
        rows.append({**label, "task": task, "steps": n, "cg_iters": cg, "cg_warm_start": warm,
                     **tuning_scores(spec, res.x, a, b, hu), "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slab", required=True)
    parser.add_argument("--slices", type=int, nargs="+", default=[6, 18])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 60, 100])
    parser.add_argument("--cg-iters", type=int, nargs="+", default=[50])
    parser.add_argument("--warm-start", type=int, nargs="+", default=[0], choices=[0, 1],
                        help="CG from the previous level's solution (1) or from 0 (0)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prior = load_prior("default-ct")
    volume = read_image(args.slab).array
    settings = [(n, cg, bool(w)) for n in args.steps for cg in args.cg_iters for w in args.warm_start]
    rows = [r for i in args.slices for t in TASKS
            for r in run_case(slice_128(volume, i), t, prior, {"slice": i}, settings)]
    means = {f"steps={n}/cg_iters={cg}" + ("/warm" if w else ""):
             tuning_mean([r for r in rows if (r["steps"], r["cg_iters"], r["cg_warm_start"]) == (n, cg, w)])
             for n, cg, w in settings}
    print({"mean (full + window) / 2 PSNR": means}, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"means": means, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
