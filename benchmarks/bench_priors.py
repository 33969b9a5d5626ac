"""Default priors: denoising quality on held-out images against classical denoisers, and throughput.

    python benchmarks/bench_priors.py --prior default-ct --json benchmarks/prior_ct.json
    python benchmarks/bench_priors.py --prior default-mri --json benchmarks/prior_mri.json

    python benchmarks/bench_priors.py --prior /path/to/prior-folder --label old --skip-throughput
    python benchmarks/bench_priors.py --prior default-ct --patch-gmm patch-gmm-ct --json /tmp/prior_ct_gmm.json
    python benchmarks/bench_priors.py --prior RUN/prior --validation prior-data/ct/held-out --skip-throughput
    python benchmarks/bench_priors.py --prior default-mri --training prior-data/mri/train --skip-throughput
    python benchmarks/bench_priors.py --prior default-ct --symmetry d4 --json benchmarks/prior_ct_d4.json
    python benchmarks/bench_priors.py --prior default-ct --pixel-sizes --skip-throughput --json /tmp/prior_ct_scale.json

Quality: one Tweedie step ``prior.denoise(x + σ n, σ)`` on images the prior never saw, against
Gaussian filtering and TV (Chambolle) with their parameter tuned per image and noise level on a grid (an
oracle choice that favours the baselines) and BM3D given the true noise level. PSNR uses the prior's
normalised range [-1, 1] (data range 2); σ is in that range too (the table also gives it in HU for CT).
CT also gets the brain window: both images clipped to [0, 80] HU, PSNR (data range 80 HU) and the mean SSIM
map over the brain-tissue mask (reference in [-15, 95] HU, opened twice with a 3×3 square: parenchyma and CSF,
not air, bone or the clipped edges), so the score is not inflated by the large clipped regions.

Held-out CT: the central 256×256 of pydicom-data's ``693_UNCR.dcm`` head slice (excluded from training by
name) and 4 random CT phantoms with seeds the training never draws (its stream is one generator seeded 0;
these use seeds 10_000+). Held-out MRI: three axial slices of nibabel's ``anatomical.nii`` and pydicom's
``MR_small.dcm``.

``--validation FOLDER`` (the recipe's ``held-out`` folder) scores the images that decide between training runs
instead, so the reported images above never choose a prior: CT, slices 3, 11 and 19 of the held-out InVesalius
slab and ``CT_small`` (another patient, which the CT prior's first 4,940 steps saw); MRI, frames 2 and 7 of
``emri_small`` (the hybrid's MRI tuning frames).

Throughput: slices per second for batches of 256×256 slices and a 256×256×256 volume pushed slice by
slice, with the peak resident memory of a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.4)
BRAIN_WINDOW = (0.0, 80.0)  # HU


def held_out_ct(prior) -> list[tuple[str, np.ndarray]]:
    from pydicom.data import get_testdata_file

    from recon.datasets.phantoms import random_ct_phantom
    from recon.datasets.slices import read_slices

    path = get_testdata_file("693_UNCR.dcm", download=False)
    if path is None:
        raise FileNotFoundError("693_UNCR.dcm not found: pip install pydicom-data")
    hu = next(read_slices(path))
    hu = hu[128:384, 128:384]
    images = [("693_UNCR head CT (central 256²)", hu)]
    for seed in range(10_000, 10_004):
        images.append((f"phantom seed {seed} (128²)", random_ct_phantom((128, 128), torch.Generator().manual_seed(seed))
                       .double().numpy()))
    return [(name, prior.normalize(torch.from_numpy(img)).clamp(-1, 1).numpy()) for name, img in images]


def ct_pixel_sizes(prior) -> list[tuple[str, np.ndarray]]:
    """The 693 head at three pixel sizes: its central 256² at 0.48 mm, and the whole 512² slice area-averaged 2× and
    4× (0.96 mm, 1.9 mm: the evaluation matrix's 128² rows)."""
    from pydicom.data import get_testdata_file
    from skimage.transform import downscale_local_mean

    from recon.datasets.slices import read_slices

    path = get_testdata_file("693_UNCR.dcm", download=False)
    if path is None:
        raise FileNotFoundError("693_UNCR.dcm not found: pip install pydicom-data")
    hu = next(read_slices(path)).astype(np.float64)
    images = [("693 head at 0.48 mm (central 256²)", hu[128:384, 128:384]),
              ("693 head at 0.96 mm (whole slice, 256²)", downscale_local_mean(hu, (2, 2))),
              ("693 head at 1.9 mm (whole slice, 128²)", downscale_local_mean(hu, (4, 4)))]
    return [(name, prior.normalize(torch.from_numpy(img)).clamp(-1, 1).numpy()) for name, img in images]


def validation_images(prior, folder: str, modality: str) -> list[tuple[str, np.ndarray]]:
    """The images that choose between training runs (module docstring), normalised like the prior's input."""
    import nibabel as nib

    root = Path(folder)

    def read(name: str) -> np.ndarray:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: --validation needs the recipe's held-out folder "
                                    "(recon prepare-prior-data)")
        return np.asarray(nib.load(path).dataobj, dtype=np.float64)

    if modality == "ct":
        slab = read("invesalius_cranium_slab.nii.gz")
        images = [(f"validation: slab slice {k}", slab[..., k]) for k in (3, 11, 19)]
        images.append(("validation: CT_small", read("CT_small.nii.gz")[..., 0]))
        return [(n, prior.normalize(torch.from_numpy(i)).clamp(-1, 1).numpy()) for n, i in images]
    frames = np.abs(read("emri_small.nii.gz"))
    images = [(f"validation: emri_small frame {k}", mri_unit(frames[..., k], frames[..., k])) for k in (2, 7)]
    if (root / "matplotlib_s1045.nii.gz").is_file():  # the MRI tuning slice (a real 256² T1; recipe since 2026-12-07)
        s1045 = np.abs(read("matplotlib_s1045.nii.gz")[..., 0])
        images.append(("validation: s1045 (256²)", mri_unit(s1045, s1045)))
    return images


def training_images(prior, folder: str, modality: str) -> list[tuple[str, np.ndarray]]:
    """The middle slice (third axis) of each 3D NIfTI file of the recipe's training folder (at least 128² and 5
    slices), normalised like the prior's input: how well the network fits what it was trained on."""
    import nibabel as nib

    paths = sorted(Path(folder).glob("*.nii*"))
    if not paths:
        raise FileNotFoundError(f"{folder}: --training needs the recipe's training folder (recon prepare-prior-data)")
    images = []
    for path in paths:
        vol = np.asarray(nib.load(path).dataobj, dtype=np.float64)
        if vol.ndim != 3 or min(vol.shape[:2]) < 128 or vol.shape[2] < 5:
            continue
        name = f"training: {path.name.split('.')[0]} slice {vol.shape[2] // 2}"
        sl = vol[:, :, vol.shape[2] // 2]
        images.append((name, mri_unit(np.abs(sl), np.abs(vol)) if modality == "mri" else
                       prior.normalize(torch.from_numpy(sl)).clamp(-1, 1).numpy()))
    return images


def mri_unit(magnitude: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """MRI magnitude on the priors' [-1, 1] range: 99.5th percentile of ``reference`` (its volume) at +1."""
    return np.clip(2 * magnitude / np.percentile(reference, 99.5) - 1, -1, 1)


def held_out_mri() -> list[tuple[str, np.ndarray]]:
    import nibabel as nib
    from nibabel.testing import data_path
    from pydicom.data import get_testdata_file

    from recon.datasets.slices import read_slices

    vol = np.abs(nib.load(f"{data_path}/anatomical.nii").get_fdata())
    out = [(f"nibabel anatomical.nii axial {k}", mri_unit(vol[:, :, k], vol))
           for k in (vol.shape[2] // 2 - 6, vol.shape[2] // 2, vol.shape[2] // 2 + 6)]
    mr = np.abs(next(read_slices(get_testdata_file("MR_small.dcm", download=False))))
    return [*out, ("pydicom MR_small.dcm", mri_unit(mr, mr))]


def psnr(x, ref):
    from skimage.metrics import peak_signal_noise_ratio

    return peak_signal_noise_ratio(ref, np.clip(x, -1, 1), data_range=2.0)


def ssim(x, ref):
    from skimage.metrics import structural_similarity

    return structural_similarity(ref, np.clip(x, -1, 1), data_range=2.0)


def brain_mask(ref_hu: np.ndarray) -> np.ndarray:
    """Brain tissue of a head CT: reference within [-15, 95] HU, opened twice (3×3) to drop edges and specks."""
    from scipy.ndimage import binary_opening

    return binary_opening((ref_hu > -15) & (ref_hu < 95), np.ones((3, 3), bool), iterations=2)


def brain_window_metrics(x, ref, to_hu) -> tuple[float, float]:
    """PSNR (data range 80 HU) and mean SSIM over the brain mask, both images clipped to [0, 80] HU; NaN without
    brain tissue (< 1 % of the image)."""
    from skimage.metrics import structural_similarity

    ref_hu = to_hu(ref)
    mask = brain_mask(ref_hu)
    if mask.mean() < 0.01:
        return float("nan"), float("nan")
    lo, hi = BRAIN_WINDOW
    a, b = np.clip(to_hu(np.clip(x, -1, 1)), lo, hi), np.clip(ref_hu, lo, hi)
    mse = float(np.mean((a - b)[mask] ** 2))
    _, smap = structural_similarity(b, a, data_range=hi - lo, full=True)
    return 10 * np.log10((hi - lo) ** 2 / max(mse, 1e-12)), float(smap[mask].mean())


def classical(noisy, ref, sigma):
    """Best Gaussian filter and TV weight on a grid (oracle), and BM3D with the true sigma."""
    from scipy.ndimage import gaussian_filter
    from skimage.restoration import denoise_tv_chambolle

    best_g = max((gaussian_filter(noisy, s) for s in (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)), key=lambda im: psnr(im, ref))
    best_tv = max((denoise_tv_chambolle(noisy, weight=w * sigma) for w in (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)),
                  key=lambda im: psnr(im, ref))
    return {"gaussian (oracle)": best_g, "TV (oracle)": best_tv, "BM3D": bm3d_denoise(noisy, sigma)}


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D given the true ``sigma``, on an image in the prior's range [-1, 1] (BM3D works on [0, 1]: the image is
    mapped there and back, its noise sigma halving)."""
    import bm3d

    return bm3d.bm3d((noisy + 1) / 2, sigma / 2) * 2 - 1


def quality(prior, images, hu_per_unit=None, seed=0, extra=None, timing=None):
    """Mean PSNR/SSIM per method and σ (and, for CT, the brain-window PSNR/SSIM); ``extra`` maps a column name to
    another prior (one ``denoise`` step, after the others, so their noise draws do not change); ``timing``
    collects its seconds per megapixel."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    to_hu = None
    if hu_per_unit:
        def to_hu(v):
            return prior.denormalize(torch.from_numpy(np.asarray(v, dtype=np.float64))).numpy()
    for sigma in SIGMAS:
        per_method: dict = {}
        for _, ref in images:
            noisy = ref + sigma * torch.randn(ref.shape, generator=g, dtype=torch.float64).numpy()
            with torch.no_grad():
                den = prior.denoise(torch.from_numpy(noisy).float()[None, None], sigma)[0, 0].double().numpy()
            results = {"noisy": noisy, **classical(noisy, ref, sigma), "recon prior (1 step)": den}
            for name, other in (extra or {}).items():
                t = time.perf_counter()
                with torch.no_grad():
                    out = other.denoise(torch.from_numpy(noisy).float()[None, None], sigma)
                results[name] = out[0, 0].double().numpy()
                if timing is not None:
                    timing.setdefault(name, []).append((time.perf_counter() - t) / noisy.size * 1e6)
            for name, im in results.items():
                brain = brain_window_metrics(im, ref, to_hu) if to_hu else (float("nan"), float("nan"))
                per_method.setdefault(name, []).append((psnr(im, ref), ssim(im, ref), *brain))
        row = {"sigma": sigma}
        if hu_per_unit:
            row["sigma_hu"] = sigma * hu_per_unit
        for name, vals in per_method.items():
            v = np.asarray(vals)
            row[name] = {"psnr": float(v[:, 0].mean()), "ssim": float(v[:, 1].mean())}
            if to_hu and np.isfinite(v[:, 2]).any():
                row[name].update(psnr_brain=float(np.nanmean(v[:, 2])), ssim_brain=float(np.nanmean(v[:, 3])))
        rows.append(row)
    return rows


def print_table(rows, keys=("psnr", "ssim")) -> None:
    """One markdown table: σ (and HU), then PSNR / SSIM of every method."""
    methods = [k for k in rows[0] if k not in ("sigma", "sigma_hu")]
    print("| σ | " + " | ".join(methods) + " |\n|" + "---|" * (len(methods) + 1))
    for r in rows:
        sig = f"{r['sigma']:g}" + (f" ({r['sigma_hu']:.0f} HU)" if "sigma_hu" in r else "")
        print(f"| {sig} | " + " | ".join(f"{r[m][keys[0]]:.2f} / {r[m][keys[1]]:.3f}" for m in methods) + " |")


_THROUGHPUT_CHILD = """
import sys, time, torch, warnings
warnings.filterwarnings("ignore")
torch.set_num_threads(int(sys.argv[2]))
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from recon.priors import load_prior
prior = load_prior(sys.argv[1], symmetry=sys.argv[3] if len(sys.argv) > 3 else None)
base = hwm()
x = torch.randn(8, 1, 256, 256)
with torch.no_grad():
    prior.denoise(x[:1], 0.5)
    t = time.perf_counter(); prior.denoise(x, 0.5); t8 = time.perf_counter() - t
    mid = hwm()
    vol = torch.randn(1, 1, 256, 256, 256)
    t = time.perf_counter(); prior.denoise(vol, 0.5); tv = time.perf_counter() - t
print(8 / t8, mid - base, 256 / tv, hwm() - base, prior.slices_per_call((256, 256)), base)
"""


def throughput(prior_name, threads, symmetry=None):
    argv = [sys.executable, "-c", _THROUGHPUT_CHILD, prior_name, str(threads)] + ([symmetry] if symmetry else [])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    keys = ["slices_per_s_batch8", "peak_extra_MiB_batch8", "slices_per_s_volume", "peak_extra_MiB_volume",
            "slices_per_call", "baseline_MiB"]
    return dict(zip(keys, map(float, out), strict=True))


def scored_images(prior, modality: str, training: str | None, validation: str | None, pixel_sizes: bool = False):
    """``(images, HU per normalised unit or None)``: the training folder's, the validation folder's, the 693 head
    at three pixel sizes or the reported held-out images."""
    hu_per_unit = (prior.intensity.high - prior.intensity.low) / 2 if modality == "ct" else None
    if pixel_sizes:
        if modality != "ct":
            raise SystemExit("--pixel-sizes: a CT prior is needed (the 693 head CT)")
        return ct_pixel_sizes(prior), hu_per_unit
    if training:
        return training_images(prior, training, modality), hu_per_unit
    if validation:
        return validation_images(prior, validation, modality), hu_per_unit
    return (held_out_ct(prior) if modality == "ct" else held_out_mri()), hu_per_unit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", default="default-ct", help="a built-in name or a prior folder")
    parser.add_argument("--label", help="the prior's name in the tables (default: --prior)")
    parser.add_argument("--modality", choices=["ct", "mri"], help="default: from the prior's intensity unit")
    parser.add_argument("--json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-throughput", action="store_true")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--validation", metavar="FOLDER", help="score the validation images of the recipe's held-out "
                        "folder instead of the reported ones (choosing between training runs)")
    which.add_argument("--training", metavar="FOLDER", help="score the middle slice of each volume of the recipe's "
                        "training folder instead (does the network fit what it was trained on?)")
    which.add_argument("--pixel-sizes", action="store_true", help="CT: score the 693 head at 0.48, 0.96 and 1.9 mm "
                       "pixels instead (does the prior hold at the evaluation matrix's coarser scale?)")
    parser.add_argument("--symmetry", choices=["d4"], help="the prior's denoiser averaged over the square's rotations "
                        "and flips (8 network evaluations per image; `load_prior(..., symmetry=...)`)")
    parser.add_argument("--patch-gmm", metavar="PRIOR", help="also the patch-GMM prior (e.g. patch-gmm-ct) as a column")
    args = parser.parse_args()

    from recon.priors import load_prior

    prior = load_prior(args.prior, symmetry=args.symmetry)
    modality = args.modality or ("ct" if getattr(prior.intensity, "unit", "") == "HU" else "mri")
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    images, hu_per_unit = scored_images(prior, modality, args.training, args.validation, args.pixel_sizes)
    steps = prior.card.get("training", {}).get("steps")
    label = args.label or (f"{args.prior} ({args.symmetry} mean)" if args.symmetry else args.prior)
    groups: dict = {}
    for name, img in images:
        group = ("phantoms (unseen seeds)" if name.startswith("phantom") else
                 "validation" if name.startswith("validation") else
                 "training" if name.startswith("training") else name.split(" axial")[0])
        groups.setdefault(group, []).append((name, img))
    result = {"prior": label, "modality": modality, "steps": steps, "symmetry": args.symmetry, "quality": {}}
    extra, timing = {}, {}
    if args.patch_gmm:
        gmm = load_prior(args.patch_gmm)
        extra = {"patch GMM (1 step)": gmm}
        result["patch_gmm"] = {k: gmm.card.get(k) for k in ("n_components", "patch_size", "stride", "remove_mean",
                                                              "n_patches", "fit_seconds")}
    for group, members in groups.items():
        rows = quality(prior, members, hu_per_unit, extra=extra, timing=timing)
        result["quality"][group] = rows
        print(f"## Denoising: {group} ({len(members)} image(s)), prior `{label}` ({steps} training steps)\n")
        print_table(rows)
        print("\nPSNR (dB) / SSIM, mean over the images; range [-1, 1].\n")
        if "psnr_brain" in rows[0]["noisy"]:
            print(f"### Brain window [0, 80] HU: {group}\n")
            print_table(rows, ("psnr_brain", "ssim_brain"))
            print("\nPSNR (dB, data range 80 HU) / SSIM over the brain mask, both images clipped to [0, 80] HU.\n")
    for name, per_mpix in timing.items():
        result.setdefault("patch_gmm", {})["seconds_per_256x256"] = float(np.median(per_mpix)) * 256**2 / 1e6
        print(f"{name}: {result['patch_gmm']['seconds_per_256x256']:.2f} s per 256² slice (median, "
              f"{args.threads} thread(s))\n")
    result["images"] = [n for n, _ in images]
    result["seconds"] = time.perf_counter() - t0
    if not args.skip_throughput:
        tp = throughput(args.prior, args.threads, args.symmetry)
        result["throughput"] = tp
        print(f"\n## Throughput ({args.threads} threads)\n")
        print("| input | slices/s | peak memory above the loaded model |\n|---|---|---|")
        print(f"| batch of 8 × 256² | {tp['slices_per_s_batch8']:.1f} | {tp['peak_extra_MiB_batch8']:.0f} MiB |")
        print(f"| 256×256×256 volume, slice-wise ({tp['slices_per_call']:.0f} slices per call) | "
              f"{tp['slices_per_s_volume']:.1f} | {tp['peak_extra_MiB_volume']:.0f} MiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
