"""The TV hybrid's ``anchor`` and TV factor on the image-domain tasks, chosen on tuning images no reported case uses.

The hybrid's defaults (``anchor = 0.3``, ``tv_weight = 0.05 ‖A‖/σ_y``) were chosen on CT sinograms
(``bench_hybrid_tuning.py``), whose ``‖A‖`` is large; blur, inpainting and super-resolution operators have
``‖A‖ = 1``, so the same factor is a far weaker TV term there. This script asks which setting the image-domain
tasks (``bench_matrix``'s ``blur2.5``, ``blur2.5-n0.2``, ``inp50``, ``sr2``) want, on images that no reported case
uses: slices 6 and 18 of the held-out InVesalius slab averaged to 128² (CT, the CT tuning slices) and frames 2 and
7 of the held-out ``emri_small`` interpolated to 128² (MR, the MRI tuning frames), each with the prior of its
modality, built and scored exactly as ``bench_matrix`` does (TV with its automatic weight as a reference).

Rule, fixed before the run: the setting with the highest mean of (full-range PSNR + clinical-window PSNR) / 2 over
all tuning cases (MR: full range = window), ties within 0.05 dB to the shipped default. One setting for every
image-domain task, as ``recon.samplers.registry.TUNED_OPTIONS`` keys options by what the operator measures.

    python benchmarks/bench_hybrid_tuning_image.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \\
        --json ct.json
    python benchmarks/bench_hybrid_tuning_image.py --emri prior-data/mri/held-out/emri_small.nii.gz --json mr.json
    python benchmarks/bench_hybrid_tuning_image.py --slab …slab.nii.gz --factors 0.0125 0.025 --json ct2.json
    python benchmarks/bench_hybrid_tuning_image.py --emri …emri_small.nii.gz --factors 0.0125 0.025 --json mr2.json
    python benchmarks/bench_hybrid_tuning_image.py --merge ct.json mr.json ct2.json mr2.json \
        --json benchmarks/hybrid_tuning_image.json
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

from bench_builtin_calibration import SLAB_SPACING, tuning_slices
from bench_matrix import _run_method, problem_context, score

import recon
from recon.datasets import read_image
from recon.priors import load_prior
from recon.tasks import from_domain

# 0.0125 and 0.025 added after the first run picked 0.05, the grid's smallest, then 0.003 after 0.0125 won (the edge
# of a grid is no optimum)
GRID = [{"anchor": a, "tv_factor": f} for a in (0.3, 1.0) for f in (0.003, 0.0125, 0.025, 0.05, 0.2, 0.8)]
DEFAULT = {"anchor": 0.3, "tv_factor": 0.05}
TASKS = ("blur2.5", "blur2.5-n0.2", "inp50", "sr2")
TIE_DB = 0.05


def run_case(ref: np.ndarray, spacing: float, modality: str, task: str, prior, label: dict,
             grid: list[dict] = GRID, references: bool = True) -> list[dict]:
    """TV (automatic weight, with ``references``) and the hybrid at each setting of ``grid`` on one case, as
    ``bench_matrix`` runs them."""
    key = "ct" if modality == "CT" else "mri"
    ctx = problem_context(ref, (spacing, spacing), modality, task, 0, {key: prior})
    y_n, sigma_n, a, b = ctx["normalised"]
    rows = []

    def record(method: str, rec: np.ndarray, seconds: float, **extra) -> None:
        rows.append({**label, "task": task, "method": method, **score(rec, ref, modality, ctx["roi"]),
                     "seconds": seconds, **extra})
        r = rows[-1]
        print(f"{label} {task:13s} {method:8s} {extra} PSNR {r['psnr']:.2f} / {r['psnr_w']:.2f}", flush=True)

    if references:
        rec, info = _run_method("tv-auto", ctx)
        record("tv-auto", rec, info["seconds"])
    for setting in grid:
        t0 = time.perf_counter()
        res = recon.reconstruct(ctx["physics_w"], y_n, prior, "hybrid", sigma_y=sigma_n, seed=0, **setting)
        rec = from_domain(ctx["spec"], ((res.x - b) / a).detach().double().cpu())[0, 0].numpy()
        record("hybrid", rec, time.perf_counter() - t0, **setting)
    return rows


def choose(rows: list[dict]) -> dict:
    """The module docstring's rule over the settings that have rows."""
    def mean(rr: list[dict]) -> float:
        return float(np.mean([(r["psnr"] + r["psnr_w"]) / 2 for r in rr]))

    means = {}
    for setting in GRID:
        rr = [r for r in rows if r["method"] == "hybrid" and all(r.get(k) == v for k, v in setting.items())]
        if rr:
            means[f"anchor={setting['anchor']}/tv_factor={setting['tv_factor']}"] = (setting, mean(rr), len(rr))
    best = max(means.values(), key=lambda m: m[1])
    default = means.get(f"anchor={DEFAULT['anchor']}/tv_factor={DEFAULT['tv_factor']}")
    chosen = default if default and best[1] - default[1] < TIE_DB else best
    tv = [r for r in rows if r["method"] == "tv-auto"]
    return {**chosen[0], "means": {k: {"psnr_full_window": m[1], "cases": m[2]} for k, m in means.items()},
            "tv_auto": mean(tv) if tv else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slab", help="the held-out slab of `recon prepare-prior-data --modality ct`")
    parser.add_argument("--emri", help="emri_small.nii.gz of `recon prepare-prior-data --modality mri`")
    parser.add_argument("--slices", type=int, nargs="+", default=[6, 18], help="slab slices (CT)")
    parser.add_argument("--frames", type=int, nargs="+", default=[2, 7], help="emri_small frames (MR)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--factors", type=float, nargs="+",
                        help="run only the grid's settings with these TV factors, without the TV reference")
    parser.add_argument("--json", default=None)
    parser.add_argument("--merge", nargs="+", help="pool the rows of these JSON files, apply the rule; no runs")
    args = parser.parse_args()
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())["rows"]]
    else:
        for flag, path in (("--slab", args.slab), ("--emri", args.emri)):
            if path is not None and not Path(path).is_file():
                parser.error(f"{flag}: {path!r} is not a file (recon prepare-prior-data writes it)")
        if not args.slab and not args.emri:
            parser.error("give --slab (CT tuning slices) and/or --emri (MR tuning frames), or --merge")
        torch.set_num_threads(1)
        images = []
        if args.slab:
            from bench_hybrid_tuning import slice_128

            volume = read_image(args.slab).array
            images += [({"image": f"slab{i}"}, slice_128(volume, i), SLAB_SPACING, "CT") for i in args.slices]
        if args.emri:
            images += [({"image": f"emri{i}"}, tuning_slices(args.emri, "mri", [i])[0][1], 0.5, "MR")
                       for i in args.frames]
        priors = {m: load_prior("default-ct" if m == "CT" else "default-mri") for m in {im[3] for im in images}}
        grid = [g for g in GRID if args.factors is None or g["tv_factor"] in args.factors]
        rows = [r for label, ref, spacing, modality in images for t in args.tasks
                for r in run_case(ref, spacing, modality, t, priors[modality], label, grid, args.factors is None)]
    doc = {"rule": "max mean (full + window PSNR) / 2; ties within 0.05 dB keep the default", "chosen": choose(rows),
           "rows": rows}
    print(json.dumps(doc["chosen"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
