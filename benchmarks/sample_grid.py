"""Unconditional samples of a prior as a grid (EDM Heun, 18 steps, seed 0): ``figures/default-{ct,mri}-samples.png``.

    python benchmarks/sample_grid.py --prior default-ct --out benchmarks/figures/default-ct-samples.png
    python benchmarks/sample_grid.py --prior default-mri --out benchmarks/figures/default-mri-samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from recon.priors import load_prior
from recon.priors.train import sample_unconditional, write_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prior", default="default-ct", help="a built-in name or a prior folder")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--n", type=int, default=16, help="number of samples")
    parser.add_argument("--size", type=int, default=96, help="side of each sample in pixels")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prior = load_prior(args.prior)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        x = sample_unconditional(prior, (args.n, 1, args.size, args.size), steps=args.steps, generator=generator)
    write_grid(x, Path(args.out))
    print(f"{args.out}: {args.n} samples of {args.size}² from {args.prior} ({args.steps} Heun steps, seed {args.seed})")


if __name__ == "__main__":
    main()
