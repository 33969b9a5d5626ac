"""Penalised weighted least squares on Beer–Lambert CT: each method on the raw and on the whitened problem
(``recon.tasks.weighted_problem``), on tuning slices of the held-out InVesalius slab that no reported case uses.

    python benchmarks/bench_pwls.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \
        --methods tv hybrid pigdm --json benchmarks/pwls.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_hybrid_tuning import slice_128

import recon
from recon.datasets import read_image
from recon.outputs import metrics
from recon.priors import load_prior
from recon.tasks import from_domain, make_task, normalised_problem, simulate, weighted_problem

TASKS = {"sv30": (30, 1e5), "sv60": (60, 1e5), "ld1e4": (180, 1e4)}


def run(physics, meas, method: str, prior) -> torch.Tensor:
    """One method on ``(physics, meas)``; the reconstruction in the operator's domain units."""
    if method == "tv":
        return recon.reconstruct(physics, meas.y, None, method="tv", sigma_y=meas.sigma_y).x.double()
    y_n, s_n, a, b = normalised_problem(meas, physics, prior)
    res = recon.reconstruct(physics, y_n, prior, method=method, sigma_y=s_n, seed=0)
    return (res.x.double() - b) / a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slab", required=True)
    parser.add_argument("--slices", type=int, nargs="+", default=[6, 18])
    parser.add_argument("--tasks", nargs="+", default=["sv60", "ld1e4"], choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=["tv", "hybrid", "pigdm"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prior = load_prior("default-ct")
    volume = read_image(args.slab).array
    rows = []
    for index in args.slices:
        hu = torch.from_numpy(slice_128(volume, index))
        for task in args.tasks:
            views, photons = TASKS[task]
            spec = make_task("sparse-view-ct", (1, *hu.shape), (1.0, 1.0, 1.0), views=views)
            meas = simulate(spec, hu.float(), "HU", photons=photons, seed=0)
            physics = meas.physics()
            for weighted in (False, True):
                problem = weighted_problem(meas, physics) if weighted else (physics, meas)
                for method in args.methods:
                    t0 = time.perf_counter()
                    rec = from_domain(spec, run(*problem, method, prior))[0, 0].numpy()[None]
                    m = metrics(rec, hu.numpy()[None], True)
                    rows.append({"slice": index, "task": task, "weighted": weighted, "method": method,
                                 "psnr": m["psnr"], "ssim": m["ssim"], "brain_psnr": m["brain"]["psnr"],
                                 "brain_ssim": m["brain"]["ssim"], "seconds": time.perf_counter() - t0})
                    print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
