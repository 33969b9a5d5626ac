"""Seconds per 256² slice of the default CT method, as `recon reconstruct` runs it (whitened data, the shipped
prior): ``hybrid`` on 60-view sparse-view CT and on 90° limited angle (60 views), and ``pigdm`` (the limited-angle
default until 2026-12-06) on the same limited-angle case, the 693 head CT at its full field of view averaged to
256²; ``hybrid-mri`` times the hybrid with its MRI options on 4× single-coil MRI (1 % noise) of nibabel's
``anatomical.nii`` central axial slice at 256² (what switching MRI's default to the hybrid would cost);
``hybrid-blur`` / ``hybrid-inpainting`` / ``hybrid-sr`` the image-domain default on the head CT (2.5-pixel blur, 50 %
missing, 2× super-resolution, 1 % noise). Images and problems are ``bench_matrix.py``'s (``ct-head-full`` /
``mr-anat``; tasks ``sv60``, ``la90``, ``mri4``, ``blur2.5``, ``inp50``, ``sr2``).

    python benchmarks/bench_default_time.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matrix import load_image, problem_context

import recon
from recon.priors import load_prior

# name -> (method, bench_matrix image, bench_matrix task)
CASES = {"hybrid": ("hybrid", "ct-head-full", "sv60"), "hybrid-la": ("hybrid", "ct-head-full", "la90"),
         "pigdm": ("pigdm", "ct-head-full", "la90"), "hybrid-mri": ("hybrid", "mr-anat", "mri4"),
         "hybrid-blur": ("hybrid", "ct-head-full", "blur2.5"), "hybrid-inpainting": ("hybrid", "ct-head-full", "inp50"),
         "hybrid-sr": ("hybrid", "ct-head-full", "sr2")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--particles", type=int, nargs="+", default=[1],
                        help="chains averaged per run (the hybrid's and ΠGDM's particles), one timing each")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    priors = {"ct": load_prior("default-ct"), "mri": load_prior("default-mri")}
    for case in args.methods:
        method, image, task = CASES[case]
        ctx = problem_context(*load_image(image, 256), task, 0, priors)
        y_n, sigma_n, _, _ = ctx["normalised"]
        for p in args.particles:
            t0 = time.perf_counter()
            res = recon.reconstruct(ctx["physics_w"], y_n, ctx["prior"], method=method, sigma_y=sigma_n, seed=0,
                                    particles=p)
            print(f"{method} {case} ({image}, {task}) 256², {p} chain(s): {time.perf_counter() - t0:.1f} s, "
                  f"{res.nfe} NFE, {args.threads} thread(s)", flush=True)


if __name__ == "__main__":
    main()
