"""Reconstruction quality and cost of every method with the built-in priors, on images the priors never saw.

    python benchmarks/bench_samplers_quality.py --task ct --json benchmarks/samplers_ct.json
    python benchmarks/bench_samplers_quality.py --task mri --json benchmarks/samplers_mri.json

CT: sparse-view parallel-beam CT at 128×128 (1 mm pixels, 30 and 60 views over 180°) of the held-out head CT
(``693_UNCR.dcm``, excluded from the prior's training by name; central 384² resized to 128²) and a random CT
phantom drawn with a seed the training never uses; Gaussian noise of 1 % of the sinogram's RMS added to the
line integrals of the normalised image (the samplers' convention: ``y = A(prior.normalize(hu)) + σ_y n``).
MRI: 4× accelerated single-coil Cartesian MRI (fastMRI-style random 1D mask with a fully sampled centre) of
held-out brain images (``MR_small.dcm`` 64², and the central axial slice of nibabel's ``anatomical.nii``
resized to 64²) in the MRI prior's normalised magnitude range, real-valued image, noise σ_y = 0.01.

Every method runs through ``recon.reconstruct`` with the same prior network: FBP / zero-filled, TV (its λ picked
per image from a grid by PSNR against the truth: an oracle choice that favours the baseline), deepinv's DPS and
DiffPIR (adapters), and recon's DPS, RED-diff, SMC (TDS weights) and DDS (CG data consistency on the Tweedie
estimate, the volume method, here on single images). PSNR/SSIM on the normalised range [-1, 1]
(data range 2), wall time and network evaluations (NFE) per image, all in one process with the same threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_priors import psnr, ssim  # the same metrics as the prior benchmark

warnings.filterwarnings("ignore")

# label -> (method, options); steps and particles are part of the options
METHODS = {
    "analytic": ("analytic", {}),
    "TV (oracle λ)": ("tv", {"steps": 300}),
    "deepinv DPS (1000 steps)": ("deepinv-dps", {"steps": 1000}),
    "deepinv DiffPIR (100 steps)": ("deepinv-diffpir", {"steps": 100}),
    "DPS (100 steps)": ("dps", {"steps": 100}),
    "DPS (100 steps, ζ′ = 2)": ("dps", {"steps": 100, "zeta": 2.0}),  # ζ′ tuned on CT_small (not benchmarked)
    "RED-diff (100 steps)": ("red-diff", {"steps": 100}),
    "SMC TDS (8 particles, 50 steps)": ("smc", {"steps": 50, "particles": 8}),
    "DDS (50 steps, 5 CG)": ("dds", {"steps": 50}),
}
TV_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)  # multiples of sample_tv's default λ


def ct_images(prior, size: int) -> list[tuple[str, np.ndarray]]:
    from pydicom.data import get_testdata_file
    from skimage.transform import resize

    from recon.datasets.phantoms import random_ct_phantom
    from recon.datasets.slices import read_slices

    path = get_testdata_file("693_UNCR.dcm", download=False)
    if path is None:
        raise FileNotFoundError("693_UNCR.dcm not found: pip install pydicom-data")
    hu = next(read_slices(path))[64:448, 64:448]
    images = [("693_UNCR head CT", resize(hu, (size, size), anti_aliasing=True, preserve_range=True))]
    phantom = random_ct_phantom((size, size), torch.Generator().manual_seed(10_000)).double().numpy()
    images.append(("CT phantom, seed 10000", phantom))
    return [(n, prior.normalize(torch.from_numpy(im)).clamp(-1, 1).numpy()) for n, im in images]


def mri_images(size: int) -> list[tuple[str, np.ndarray]]:
    import nibabel as nib
    from nibabel.testing import data_path
    from pydicom.data import get_testdata_file
    from skimage.transform import resize

    from recon.datasets.slices import read_slices

    mr = np.abs(next(read_slices(get_testdata_file("MR_small.dcm", download=False))))
    vol = np.abs(nib.load(f"{data_path}/anatomical.nii").get_fdata())
    axial = vol[:, :, vol.shape[2] // 2]
    out = []
    for name, img in (("pydicom MR_small.dcm", mr), ("nibabel anatomical.nii, central axial", axial)):
        img = resize(img, (size, size), anti_aliasing=True, preserve_range=True)
        out.append((name, np.clip(2 * img / np.percentile(img, 99.5) - 1, -1, 1)))
    return out


def physics_for(task: str, size: int, views: int | None):
    from recon.operators import CartesianMRI, ParallelBeamCT

    if task == "ct":
        return ParallelBeamCT((size, size), angles=views)
    return CartesianMRI((size, size), acceleration=4, mask_type="random", seed=0, real_input=True)


def run(task: str, prior, images, size: int, views, seed: int) -> list[dict]:
    from recon import reconstruct

    rows = []
    for name, ref in images:
        physics = physics_for(task, size, views)
        x = torch.from_numpy(ref).float()[None, None]
        ax = physics.A(x)
        g = torch.Generator().manual_seed(seed)
        sigma_y = 0.01 * float(ax.pow(2).mean().sqrt()) if task == "ct" else 0.01
        noise = sigma_y * torch.randn(ax.shape, generator=g)
        y = physics.A(x) + (physics.A(physics.A_adjoint(noise)) if task == "mri" else noise)  # MRI: sampled k only
        for label, (method, options) in METHODS.items():
            options = dict(options)
            if method == "tv":
                best = None
                lam0 = reconstruct(physics, y, prior, "tv", sigma_y=sigma_y, seed=seed, steps=1).info["options"]["lam"]
                for factor in TV_GRID:
                    res = reconstruct(physics, y, prior, "tv", sigma_y=sigma_y, seed=seed,
                                      lam=factor * lam0, **options)
                    score = psnr(res.x[0, 0].double().numpy(), ref)
                    if best is None or score > best[0]:
                        best = (score, res, factor)
                res = best[1]
                extra = {"lam_factor": best[2]}
            else:
                res = reconstruct(physics, y, prior, method, sigma_y=sigma_y, seed=seed, **options)
                extra = {}
            rec = res.x[0, 0].double().numpy()
            row = {"image": name, "views": views, "method": label, "psnr": psnr(rec, ref), "ssim": ssim(rec, ref),
                   "seconds": res.seconds, "nfe": res.nfe, **extra}
            rows.append(row)
            print(f"{name[:28]:28s} {label:34s} PSNR {row['psnr']:6.2f} SSIM {row['ssim']:.3f} "
                  f"{row['seconds']:7.1f} s  NFE {row['nfe']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["ct", "mri"], default="ct")
    parser.add_argument("--prior", help="default: default-ct / default-mri")
    parser.add_argument("--size", type=int, help="image size (default 128 for CT, 64 for MRI)")
    parser.add_argument("--views", type=int, nargs="+", default=[30, 60])
    parser.add_argument("--only", nargs="+", help="run only these method labels (substring match)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from recon.priors import load_prior

    if args.only:
        for key in list(METHODS):
            if not any(s in key for s in args.only):
                del METHODS[key]
    prior = load_prior(args.prior or ("default-ct" if args.task == "ct" else "default-mri"))
    size = args.size or (128 if args.task == "ct" else 64)
    t0 = time.perf_counter()
    rows = []
    if args.task == "ct":
        images = ct_images(prior, size)
        for views in args.views:
            rows += run("ct", prior, images, size, views, args.seed)
    else:
        rows += run("mri", prior, mri_images(size), size, None, args.seed)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"task": args.task, "size": size, "threads": args.threads,
                                               "prior": args.prior, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
