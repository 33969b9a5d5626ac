"""Out-of-sample check of the TV hybrid's defaults (``anchor``, ``tv_weight``) on a tuning image that no reported
benchmark uses: the middle slice of the held-out InVesalius head-CT slab (``recon prepare-prior-data``), at 128²,
sparse-view CT at 30 and 60 views with 1e5 photons, against TV with its automatic (discrepancy) weight.

    python benchmarks/bench_hybrid_tuning.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \
        --json benchmarks/hybrid_tuning.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import recon
from recon.datasets import read_image
from recon.outputs import metrics
from recon.priors import load_prior
from recon.samplers.base import operator_norm
from recon.tasks import from_domain, make_task, normalised_problem, simulate


def slice_128(path: str) -> np.ndarray:
    image = read_image(path)
    mid = image.array[image.shape[0] // 2].astype(np.float64)
    t = torch.from_numpy(mid)[None, None]
    return torch.nn.functional.avg_pool2d(t, 2)[0, 0].numpy() if mid.shape[0] >= 256 else mid


def run_case(hu: np.ndarray, views: int, prior, settings: list[tuple[float, float]]) -> list[dict]:
    spec = make_task("sparse-view-ct", (1, *hu.shape), (1.0, 1.0, 1.0), views=views)
    meas = simulate(spec, torch.from_numpy(hu).float(), "HU", photons=1e5, seed=0)
    physics = meas.physics()
    y_n, sigma_n, a, b = normalised_problem(meas, physics, prior)
    norm = float(operator_norm(physics, torch.zeros(1, 1, *hu.shape)))
    rows = []

    def score(label, x_n, seconds, **extra):
        rec = from_domain(spec, (x_n.double() - b) / a)[0, 0].numpy()[None]
        m = metrics(rec, hu[None], True)
        rows.append({"views": views, "method": label, "psnr": m["psnr"], "ssim": m["ssim"],
                     "brain_psnr": m["brain"]["psnr"], "seconds": seconds, **extra})
        print(rows[-1], flush=True)

    t0 = time.perf_counter()
    res = recon.reconstruct(physics, meas.y, None, method="tv", sigma_y=meas.sigma_y)
    score("tv-auto", res.x * a + b, time.perf_counter() - t0)
    for anchor, tv_factor in settings:
        t0 = time.perf_counter()
        res = recon.reconstruct(physics, y_n, prior, method="hybrid", sigma_y=sigma_n, seed=0, anchor=anchor,
                                tv_weight=tv_factor * norm / sigma_n)
        score("hybrid", res.x, time.perf_counter() - t0, anchor=anchor, tv_factor=tv_factor)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slab", required=True)
    parser.add_argument("--views", type=int, nargs="*", default=[30, 60])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prior = load_prior("default-ct")
    hu = slice_128(args.slab)
    grid = [(a, f) for a in (0.1, 0.3, 1.0) for f in (0.025, 0.05, 0.1)]
    rows = [r for v in args.views for r in run_case(hu, v, prior, grid)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
