"""Does the spread of an ensemble of hybrid runs mean anything on MRI? Raw coverage, Spearman and the factor needed.

MRI's default reconstruction is TV, which has no spread, so ``recon reconstruct --uncertainty`` on MRI writes the
null-space map only and no calibration ships for ``default-mri``. This probe measures what the best diffusion method
on MRI (the hybrid, ``benchmarks/README.md`` "MRI rows (fifth pass)") would give as an ensemble of 16 runs
(``method="ensemble"``, ``base="hybrid"``), run as ``recon reconstruct`` runs it (``reconstruct_in_memory``): the
held-out MR_small and anatomical.nii at 128² (``bench_matrix.py``'s ``mr-small``, ``mr-anat``), single-coil MRI at
4× and 8× with 1 % noise, noise draw 1. Per case: uncalibrated (Student-t) coverage of the nominal 90 % intervals
over the image and inside the body, Spearman(std, |error|) inside the body, and the 90 % quantile of
``|error| / std`` inside the body (the conformal factor that case alone would need).

    python benchmarks/bench_mri_spread.py --json benchmarks/mri_spread.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_builtin_calibration import write_slice
from bench_matrix import load_image

from recon.pipeline import reconstruct_in_memory
from recon.samplers.uncertainty import body_mask, coverage, spearman, uncertainty_maps
from recon.settings import Settings

CASES = [("mr-small", 4), ("mr-small", 8), ("mr-anat", 4), ("mr-anat", 8)]


def run_case(name: str, acceleration: int, seed: int) -> dict:
    image, spacing, _ = load_image(name, 128)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.nii.gz"
        write_slice(path, image, spacing[0])  # load_image's pixels are square
        s = Settings(task="mri", task_params={"acceleration": acceleration}, noise=0.01, seed=seed, uncertainty=0.9,
                     prior="default-mri", method="ensemble", options={"base": "hybrid"}, particles=16)
        t0 = time.perf_counter()
        truth, result, physics = reconstruct_in_memory(path, s)
        seconds = time.perf_counter() - t0
    truth = truth.reshape(result.x.shape).double()
    mask = body_mask(truth.cpu()).reshape(truth.shape)
    err = (result.x.double() - truth).abs()
    maps = uncertainty_maps(physics, result, level=0.9)
    ratio = err[mask] / result.std.double()[mask].clamp_min(1e-6)
    row = {"case": f"{name}-mri{acceleration}", "seed": seed, "nfe": result.nfe, "seconds": seconds,
           "spearman_body": spearman(result.std, err, mask), "body_fraction": float(mask.double().mean()),
           "coverage_90_image_uncalibrated": coverage(maps["lower"], maps["upper"], truth),
           "coverage_90_body_uncalibrated": coverage(maps["lower"], maps["upper"], truth, mask),
           "factor_90_needed": float(ratio.quantile(0.9))}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=[f"{n}-mri{a}" for n, a in CASES])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run_case(n, a, args.seed) for n, a in CASES if f"{n}-mri{a}" in args.cases]
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python benchmarks/bench_mri_spread.py " +
                                               " ".join(sys.argv[1:]), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
