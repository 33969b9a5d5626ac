"""The calibration a prior ships with: fitted by ``recon calibrate`` on tuning slices, measured on held-out scans.

``recon reconstruct --uncertainty`` without ``--method`` runs an ensemble of 16 runs of the recommended method
(``recon.samplers.registry.spread_method``) and, when the prior's folder holds a ``calibration.json`` fitted for
that run (same weights, method, base sampler, its options, number of samples, steps and task), scales its intervals
by the shipped conformal factor (``recon.samplers.uncertainty.builtin_calibration``). This script makes that file
and checks it. ``--fit`` writes the file through ``recon calibrate``, which records the sampler's options.

Fit (``--fit``): slices of the held-out InVesalius slab (``recon prepare-prior-data``; no reported benchmark uses
them), averaged to 128² (1.91 mm pixels), written as NIfTI with a CSV manifest of tasks, and ``recon calibrate``
(``recon.calibrate.calibrate_studies``, no method, coverage 0.9) on them, one noise draw each (seed 0). ``--task
sparse-view-ct`` (``calibration.json``): sparse view at 30 and 60 views (1e5 photons) and low dose (180 views, 1e4
photons), slices 6 and 18. ``--task limited-angle-ct`` (``calibration-limited-angle-ct.json``): 60 views over 90°
and 80 views over 120° (1e5 photons), slices 6, 12 and 18.

Report: the held-out head CT ``693_UNCR.dcm`` (full field of view averaged to 128², as ``bench_matrix.py``'s
``ct-head-full``; its −3024 HU padding outside the scan circle set to air, −1024) through the same three
configurations and those the fit never saw (sparse view: 45 and 120 views at 1e5 photons, 180 views at 1e5;
limited angle: 70 views over 105°, 100 views over 150°), noise draws
``--seeds`` (default 1), each reconstructed exactly as ``recon reconstruct --uncertainty`` does
(``recon.pipeline.reconstruct_in_memory``). Per case: coverage of the nominal 90 % intervals over the image and
inside the body (``body_mask``), uncalibrated (Student-t intervals of the 16 samples) and with the shipped factor;
Spearman(std, |error|) inside the body; RMSE and mean std inside the body in HU; network evaluations and seconds.

    python benchmarks/bench_builtin_calibration.py --fit --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz
    python benchmarks/bench_builtin_calibration.py --json benchmarks/calibration_builtin_ct.json
    python benchmarks/bench_builtin_calibration.py --task limited-angle-ct --fit --slab …   # then --json …_la.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hybrid_tuning import slice_128
from bench_matrix import load_image

from recon.calibrate import calibrate_studies
from recon.datasets import read_image
from recon.priors import load_prior
from recon.priors.io import BUILTIN_PRIORS
from recon.samplers.uncertainty import (
    BUILTIN_CALIBRATION,
    BUILTIN_TASK_CALIBRATION,
    body_mask,
    builtin_calibration,
    coverage,
    spearman,
    uncertainty_maps,
)
from recon.settings import Settings
from recon.tasks import domain_scale, make_task

# per task: the fitted and the unseen configurations, name → (task parameters, photons); the slab slices fitted on;
# the file in the prior's folder; how the fit is described in it
TASKS = {
    "sparse-view-ct": {
        "fit": {"sv30": ({"views": 30}, 1e5), "sv60": ({"views": 60}, 1e5), "ld1e4": ({"views": 180}, 1e4)},
        "unseen": {"sv45": ({"views": 45}, 1e5), "sv120": ({"views": 120}, 1e5), "ld1e5": ({"views": 180}, 1e5)},
        "slices": [6, 18], "file": BUILTIN_CALIBRATION,
        "describe": "sparse view 30/60 views at 1e5 photons, 180 views at 1e4"},
    "limited-angle-ct": {
        "fit": {"la90": ({"views": 60, "arc": 90.0}, 1e5), "la120": ({"views": 80, "arc": 120.0}, 1e5)},
        "unseen": {"la105": ({"views": 70, "arc": 105.0}, 1e5), "la150": ({"views": 100, "arc": 150.0}, 1e5)},
        "slices": [6, 12, 18], "file": BUILTIN_TASK_CALIBRATION.format(task="limited-angle-ct"),
        "describe": "limited angle, 60 views over 90° and 80 over 120°, at 1e5 photons"},
}
SLAB_SPACING = 0.957 * 2  # mm: the slab's 0.957 mm pixels averaged 2 × 2
LEVEL = 0.9


def write_slice(path: Path, hu: np.ndarray, spacing: float) -> None:
    """One axial slice ``(H, W)`` in HU as NIfTI with square ``spacing`` mm pixels."""
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.T[:, :, None]).astype(np.float32), affine), path)


def fit(slab: str, task: str, slices: list[int], out: Path) -> dict:
    """``recon calibrate`` on slab slices × the task's fitted configurations; writes ``out``."""
    volume = read_image(slab).array
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for i in slices:
            write_slice(Path(tmp) / f"slab{i}.nii.gz", slice_128(volume, i), SLAB_SPACING)
            for name, (params, photons) in TASKS[task]["fit"].items():
                rows.append({"input": f"slab{i}.nii.gz", "output": f"slab{i}-{name}", "task": task, **params,
                             "photons": photons, "seed": 0})
        manifest = Path(tmp) / "studies.csv"
        with open(manifest, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
        summary = calibrate_studies(manifest, out, Settings(task=task, prior="default-ct"), coverage=LEVEL,
                                    overwrite=True)
    doc = json.loads(out.read_text())
    doc["fitted_on"] = (f"InVesalius slab slices {', '.join(map(str, slices))} at 128²; {TASKS[task]['describe']}; "
                        f"seed 0; benchmarks/bench_builtin_calibration.py --fit --task {task}")
    out.write_text(json.dumps(doc, indent=1, sort_keys=True))
    return summary


def report_case(path: Path, task: str, name: str, params: dict, photons: float, seed: int, prior) -> dict:
    """One held-out case through ``reconstruct_in_memory``, scored uncalibrated and with the shipped factor."""
    from recon.pipeline import reconstruct_in_memory

    s = Settings(task=task, task_params=params, photons=photons, seed=seed, uncertainty=LEVEL, prior="default-ct")
    t0 = time.perf_counter()
    truth, result, physics = reconstruct_in_memory(path, s)
    seconds = time.perf_counter() - t0
    doc, why = builtin_calibration(prior, result.info, task)
    hu = domain_scale(make_task(task, (1, *truth.shape[-2:]), (1.0, 1.0, 1.0), **params))
    truth = truth.reshape(result.x.shape).double()
    mask = body_mask(truth.cpu()).reshape(truth.shape)
    err = (result.x.double() - truth).abs()
    row = {"case": name, "task": task, **params, "photons": photons, "seed": seed,
           "method": result.info.get("method"), "base": result.info.get("base"),
           "particles": result.info.get("particles"), "nfe": result.nfe,
           "seconds": seconds, "calibration": why, "factor": doc["factor"] if doc else None,
           "spearman_body": spearman(result.std, err, mask),
           "rmse_body_hu": float(err[mask].pow(2).mean().sqrt()) * hu,
           "mean_std_body_hu": float(result.std.double()[mask].mean()) * hu}
    for label, cal in (("uncalibrated", None), ("calibrated", doc)):
        if label == "calibrated" and doc is None:
            continue
        maps = uncertainty_maps(physics, result, level=LEVEL, calibration=cal)
        row[f"coverage_90_image_{label}"] = coverage(maps["lower"], maps["upper"], truth)
        row[f"coverage_90_body_{label}"] = coverage(maps["lower"], maps["upper"], truth, mask)
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| case | seed | coverage 90 % image / body, uncalibrated | with the shipped factor | Spearman (body) | "
             "RMSE / mean std, body (HU) | NFE | s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cal = (f"{r['coverage_90_image_calibrated']:.1%} / {r['coverage_90_body_calibrated']:.1%}"
               if "coverage_90_body_calibrated" in r else "not applied")
        lines.append(f"| {r['case']} | {r['seed']} | {r['coverage_90_image_uncalibrated']:.1%} / "
                     f"{r['coverage_90_body_uncalibrated']:.1%} | {cal} | {r['spearman_body']:.2f} | "
                     f"{r['rmse_body_hu']:.1f} / {r['mean_std_body_hu']:.1f} | {r['nfe']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit", action="store_true", help="fit and write the prior's calibration.json")
    parser.add_argument("--slab", help="the held-out InVesalius slab (NIfTI), for --fit")
    parser.add_argument("--task", default="sparse-view-ct", choices=list(TASKS))
    parser.add_argument("--slices", type=int, nargs="+", help="slab slices to fit on (default: the task's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--cases", nargs="+", help="configurations to report (default: the task's, fitted and unseen)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--markdown", metavar="JSON", help="print the README table of saved results")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["rows"]))
        return
    torch.set_num_threads(args.threads)
    prior = load_prior("default-ct")
    spec = TASKS[args.task]
    if args.fit:
        if not args.slab:
            parser.error("--fit needs --slab")
        out = Path(__file__).resolve().parents[1] / "recon" / "priors" / "weights" / BUILTIN_PRIORS["default-ct"]
        print(fit(args.slab, args.task, args.slices or spec["slices"], out / spec["file"]), flush=True)
        return
    configs = {**spec["fit"], **spec["unseen"]}
    unknown = sorted(set(args.cases or []) - set(configs))
    if unknown:
        parser.error(f"--cases: {', '.join(unknown)} not among {', '.join(configs)} for {args.task}")
    hu, spacing, _ = load_image("ct-head-full", 128)
    hu = np.maximum(hu, -1024.0)  # the scanner's padding outside its field of view (−3024) is air
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct-head-full.nii.gz"
        write_slice(path, hu, spacing[0])
        for seed in args.seeds:
            for name in args.cases or configs:
                params, photons = configs[name]
                rows.append(report_case(path, args.task, name, params, photons, seed, prior))
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"level": LEVEL, "task": args.task, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
