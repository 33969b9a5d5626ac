"""Why the CT default loses the ventricles on the real CT volume: one denoising step of ``default-ct`` against BM3D.

    python benchmarks/figure_slab_denoiser.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz

Slice 12 of the held-out InVesalius slab at 128² (``--size``; as the evaluation matrix's ``ct-slab`` row), in the
prior's normalised range plus Gaussian noise of std σ (seeded), then ``prior.denoise(·, σ)``, the same averaged over
the square's rotations and flips (``symmetry="d4"``) and BM3D given the true σ; brain window [0, 80] HU, PSNR / SSIM
in the window on the slice. Writes ``benchmarks/figures/slab-denoiser-ventricles.png`` and prints the numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from bench_matrix import SLAB, flat_region, load_image, score
from bench_priors import bm3d_denoise

SIGMAS = (0.02, 0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slab", type=Path, default=SLAB)
    parser.add_argument("--size", type=int, default=128, help="in-plane size the slice is area-averaged to")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "figures" / "slab-denoiser-ventricles.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recon.priors import load_prior

    torch.set_num_threads(1)
    prior = load_prior("default-ct")
    ref, _, modality = load_image("ct-slab", args.size, args.slab)
    ref = ref[12]
    roi = flat_region(ref, modality)
    x = prior.normalize(torch.from_numpy(ref).float()[None, None])
    gen = torch.Generator().manual_seed(0)
    panels = [("reference", ref)]
    for sigma in SIGMAS:
        noisy = x + sigma * torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            ours = prior.denoise(noisy, sigma)
            prior.symmetry = "d4"
            ours_d4 = prior.denoise(noisy, sigma)
            prior.symmetry = None
        classical = torch.from_numpy(np.asarray(bm3d_denoise(noisy[0, 0].double().numpy(), sigma)))[None, None]
        for name, d in (("default-ct", ours), ("default-ct, d4", ours_d4), ("BM3D", classical)):
            hu = prior.denormalize(d.float())[0, 0].double().numpy()
            s = score(hu, ref, modality, roi)
            print(f"σ = {sigma}: {name:10s} window {s['psnr_w']:.2f} dB / {s['ssim_w']:.3f}, "
                  f"full {s['psnr']:.2f} dB / {s['ssim']:.3f}")
            panels.append((f"{name}, σ = {sigma}\n{s['psnr_w']:.1f} dB / {s['ssim_w']:.3f} (window)", hu))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    k = args.size / 128  # the crop around the brain, in 128² pixels
    for ax, (name, img) in zip(axes, panels, strict=True):
        ax.imshow(img[round(20 * k):round(110 * k), round(15 * k):round(115 * k)], cmap="gray", vmin=0, vmax=80)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"InVesalius slab, slice 12, {args.size}²: one denoising step, brain window [0, 80] HU", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
