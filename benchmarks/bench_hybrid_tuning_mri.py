"""The TV hybrid's ``anchor`` and TV factor on MRI, chosen on tuning frames that no reported benchmark uses.

The hybrid's defaults (``anchor = 0.3``, ``tv_weight = 0.05 ‖A‖/σ_y``) were chosen on CT slices
(``bench_hybrid_tuning.py``). This script asks the same question on MRI: frames of the held-out ``emri_small``
(64², interpolated to 128² as ``bench_matrix``'s MR images are; ``recon prepare-prior-data --modality mri``),
single-coil MRI with ``bench_matrix``'s random 1D masks and noise (``--tasks``, default 4× and 8× at 0.5 / 2 %
noise), the hybrid run as ``bench_matrix`` runs it (whitened problem, prior's normalised range, two chains), TV with
its automatic weight and with the oracle weight as references.

Rule, fixed before the run: the setting with the highest mean PSNR over all tuning cases (MRI has no clinical
window; full range = window); ties within 0.05 dB go to the current default.

    python benchmarks/bench_hybrid_tuning_mri.py --data prior-data/mri/held-out/emri_small.nii.gz \
        --json benchmarks/hybrid_tuning_mri.json        # --settings / --frames split it; --merge pools

``--factors`` asks a second question, how the best TV factor moves with the mask: the hybrid at ``anchor = 1.0``
and each factor on each task and mask draw (``--seeds``); per mask, its unsampled energy ``u``
(``recon.operators.masks.unsampled_energy``) and the factor with the highest mean PSNR over the frames (refined
by a parabola in log factor); then ``log factor = log tv_factor + tv_gap·(u − 0.4)`` by least squares over the
masks (``by_mask`` in the JSON; ``--merge … --by-mask`` pools runs):

    python benchmarks/bench_hybrid_tuning_mri.py --data …/emri_small.nii.gz --frames 1 5 --seeds 1 2 \\
        --tasks mri4 mri6 mri8 --factors 0.003 0.0125 0.05 0.2 0.8 --no-references --json a.json
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

from bench_builtin_calibration import tuning_slices
from bench_matrix import _run_method, problem_context, score

import recon
from recon.priors import load_prior
from recon.samplers.base import operator_norm
from recon.tasks import from_domain

GRID = [{"anchor": a, "tv_factor": f} for a in (0.3, 1.0) for f in (0.05, 0.1, 0.2, 0.4, 0.8)]
DEFAULT = {"anchor": 0.3, "tv_factor": 0.05}
TIE_DB = 0.05


def run_case(ref: np.ndarray, task: str, prior, label: dict, grid: list[dict], references: bool,
             seed: int = 0) -> list[dict]:
    """TV (automatic and oracle weight, with ``references``) and the hybrid at each setting of ``grid`` on one case,
    built and scored exactly as ``bench_matrix`` does."""
    ctx = problem_context(ref, (64 / 128, 64 / 128), "MR", task, seed, {"mri": prior})
    y_n, sigma_n, a, b = ctx["normalised"]
    norm = float(operator_norm(ctx["physics_w"], torch.zeros(1, 1, *ref.shape)))
    rows = []

    def record(method: str, rec: np.ndarray, seconds: float, **extra) -> None:
        rows.append({**label, "task": task, "method": method, **score(rec, ref, "MR", ctx["roi"]),
                     "seconds": seconds, **extra})
        r = rows[-1]
        print(f"{label} {task:10s} {method:10s} {extra} PSNR {r['psnr']:.2f} SSIM {r['ssim']:.3f}", flush=True)

    for method in ("tv-auto", "tv-oracle") if references else ():
        rec, info = _run_method(method, ctx)
        record(method, rec, info["seconds"])
    for setting in grid:
        options = dict(setting)
        options["tv_weight"] = options.pop("tv_factor") * norm / sigma_n
        t0 = time.perf_counter()
        res = recon.reconstruct(ctx["physics_w"], y_n, prior, "hybrid", sigma_y=sigma_n, seed=0, **options)
        rec = from_domain(ctx["spec"], ((res.x - b) / a).detach().double().cpu())[0, 0].numpy()
        record("hybrid", rec, time.perf_counter() - t0, **setting)
    return rows


def choose(rows: list[dict]) -> dict:
    """The module docstring's rule over the settings that have rows."""
    means = {}
    for setting in GRID:
        rr = [r for r in rows if r["method"] == "hybrid" and all(r.get(k) == v for k, v in setting.items())]
        if rr:
            means[f"anchor={setting['anchor']}/tv_factor={setting['tv_factor']}"] = (
                setting, float(np.mean([r["psnr"] for r in rr])), float(np.mean([r["ssim"] for r in rr])), len(rr))
    best = max(means.values(), key=lambda m: m[1])
    default = means.get(f"anchor={DEFAULT['anchor']}/tv_factor={DEFAULT['tv_factor']}")
    chosen = default if default and best[1] - default[1] < TIE_DB else best
    refs = {m: float(np.mean([r["psnr"] for r in rows if r["method"] == m]))
            for m in ("tv-auto", "tv-oracle") if any(r["method"] == m for r in rows)}
    return {**chosen[0], "means": {k: {"psnr": m[1], "ssim": m[2], "cases": m[3]} for k, m in means.items()},
            "references_psnr": refs}


def mask_unsampled(task: str, seed: int, size: int = 128) -> float:
    """``unsampled_energy`` of the mask ``bench_matrix`` draws for ``task`` with ``seed`` at ``size``²."""
    from bench_matrix import TASKS as MATRIX_TASKS

    from recon.tasks import build_physics, make_task

    params = MATRIX_TASKS[task][1]
    spec = make_task("mri", (1, size, size), (1.0, 0.5, 0.5), seed=seed, **params)
    return float(build_physics(spec).unsampled_energy)


def best_factor(means: dict[float, float]) -> float:
    """The factor of the highest mean PSNR, refined by a parabola in log(factor) through it and its two neighbours
    (the grid's end when the best is there)."""
    fs = sorted(means)
    i = int(np.argmax([means[f] for f in fs]))
    if i in (0, len(fs) - 1):
        return fs[i]
    a, b, _ = np.polyfit(np.log(fs[i - 1:i + 2]), [means[f] for f in fs[i - 1:i + 2]], 2)
    return float(np.clip(np.exp(-b / (2 * a)), fs[i - 1], fs[i + 1])) if a < 0 else fs[i]


def by_mask(rows: list[dict]) -> dict:
    """Per mask (task and seed), its unsampled energy ``u`` and the best factor over the frames' mean PSNR; then
    ``log factor = log tv_factor + tv_gap·(u − REFERENCE_UNSAMPLED)`` by least squares over the masks."""
    from recon.samplers.hybrid import REFERENCE_UNSAMPLED

    hybrid = [r for r in rows if r["method"] == "hybrid"]
    masks = {}
    for task, seed in sorted({(r["task"], r.get("seed", 0)) for r in hybrid}):
        these = [r for r in hybrid if r["task"] == task and r.get("seed", 0) == seed]
        means = {f: float(np.mean([r["psnr"] for r in these if r["tv_factor"] == f]))
                 for f in sorted({r["tv_factor"] for r in these})}
        masks[f"{task}/seed{seed}"] = {"unsampled_energy": mask_unsampled(task, seed), "best": best_factor(means),
                                       "frames": sorted({r["frame"] for r in these}), "means": means}
    u = np.array([m["unsampled_energy"] for m in masks.values()]) - REFERENCE_UNSAMPLED
    gap, log_f = np.polyfit(u, np.log([m["best"] for m in masks.values()]), 1)
    return {"masks": masks, "tv_factor": float(np.exp(log_f)), "tv_gap": float(gap)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="emri_small.nii.gz of `recon prepare-prior-data --modality mri`")
    parser.add_argument("--frames", type=int, nargs="+", default=[2, 7])
    parser.add_argument("--tasks", nargs="+", default=["mri4-n0.5", "mri4-n2", "mri8-n0.5", "mri8-n2"])
    parser.add_argument("--settings", type=int, nargs="+", help="run only these entries of the grid (0-based)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="noise and mask draws (the matrix uses 0)")
    parser.add_argument("--factors", type=float, nargs="+",
                        help="the mask study: anchor 1.0 and these TV factors instead of the grid")
    parser.add_argument("--native", type=int, help="resize each frame to this size first, then up to 128² (64: "
                        "the resolution of MR_small, the matrix's MR slice)")
    parser.add_argument("--no-references", action="store_true", help="skip the TV rows")
    parser.add_argument("--json", default=None)
    parser.add_argument("--merge", nargs="+", help="pool the rows of these JSON files, apply the rule; no runs")
    parser.add_argument("--by-mask", action="store_true", help="with --merge: the mask study's rule (--factors runs)")
    args = parser.parse_args()
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())["rows"]]
    else:
        if not args.data or not Path(args.data).is_file():
            parser.error(f"--data: {args.data!r} is not a file (emri_small.nii.gz of recon prepare-prior-data)")
        torch.set_num_threads(1)
        prior = load_prior("default-mri")
        grid = GRID if args.settings is None else [GRID[i] for i in args.settings]
        if args.factors:
            grid = [{"anchor": 1.0, "tv_factor": f} for f in args.factors]
        frames = {i: tuning_slices(args.data, "mri", [i], args.native)[0][1] for i in args.frames}
        label = {"native": args.native} if args.native else {}
        rows = [r for i in args.frames for t in args.tasks for seed in args.seeds
                for r in run_case(frames[i], t, prior, {"frame": i, "seed": seed, **label}, grid,
                                  not args.no_references, seed)]
    if args.factors or args.by_mask:
        doc = {"rule": "per mask the factor of highest mean PSNR over the frames (parabola in log factor); "
                       "log factor linear in the mask's unsampled energy, least squares",
               "by_mask": by_mask(rows), "rows": rows}
        print(json.dumps(doc["by_mask"], indent=1), flush=True)
    else:
        doc = {"rule": "max mean PSNR; ties within 0.05 dB keep the default", "chosen": choose(rows), "rows": rows}
        print(json.dumps(doc["chosen"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
