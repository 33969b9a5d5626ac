"""The evaluation matrix: every method on held-out real images × tasks, scored on the full range and in the
clinical window, with the flat-region noise, time and network evaluations; one figure per case.

    python benchmarks/bench_matrix.py --images ct-head-full ct-head-crop --tasks sv30 sv60 ld1e4 la90 \\
        --sizes 128 --json benchmarks/matrix_ct_128.json
    python benchmarks/bench_matrix.py --images mr-small mr-anat --tasks mri4 mri8 --sizes 128 \\
        --json benchmarks/matrix_mri_128.json
    python benchmarks/bench_matrix.py --report benchmarks/matrix_ct_128.json      # markdown tables

Images (none is in the recipe's training data; ``ct-body`` was in the first 4,940 steps of ``default-ct``'s
lineage): ``ct-head-full``, pydicom-data's ``693_UNCR.dcm`` head CT at its full 512² field of view (0.48 mm pixels)
area-averaged to the size; ``ct-head-crop``, its central 256² (the brain) resized; ``ct-body``, pydicom's
``CT_small.dcm`` (128², 0.66 mm: paraspinal muscle, spine and aorta of the trunk, scored in the body window);
``ct-slab``, a volume: the held-out 24-slice slab of the InVesalius head CT (1.5 mm slices; ``recon
prepare-prior-data`` writes it, ``--slab`` names it), each slice area-averaged to the size (its slices 6, 12 and 18
were the hybrid's 2D tuning and calibration cases, so this row is held out from training, not from tuning);
``ct-slab-t2`` / ``ct-slab-t3``, the same slab as thick slices (2 or 3 neighbouring slices averaged: 12 of 3 mm,
8 of 4.5 mm, as a scanner reconstructs thick slices; scored against the averaged slab);
``mr-small``, pydicom's ``MR_small.dcm`` (64², interpolated); ``mr-anat``, the central axial slice of nibabel's
``anatomical.nii`` (33 × 41, 2 mm, interpolated); ``mr-sagittal``, matplotlib's ``s1045`` (a real 256² sagittal
T1 slice, area-averaged; the MRI tuning slice, so a row held out from training, not from tuning); ``ct-phantom``,
a random CT phantom (seed 10000; a secondary row).
Pixel spacing follows the field of view (CT geometry in mm).

Tasks, simulated exactly as the command line does (``recon.tasks.make_task`` / ``simulate`` /
``normalised_problem``; CT in μ with Beer–Lambert noise, classical methods in the operator's domain units,
diffusion methods in the prior's normalised range with ``σ_y`` from the noise model): ``sv30/sv60/sv120``
sparse view (10⁵ photons, the command line's default dose), ``la90/la120`` limited angle (60/80 views over
90°/120°, 10⁵ photons), ``ld1e4/ld1e5`` low dose (180 views, 10⁴/10⁵ photons), ``g0.2/g1/g2`` Gaussian noise
of 0.2/1/2 % of the sinogram's peak (60 views), ``mri4/mri8`` (random 1D mask, noise 1 % of the k-space RMS,
the command line's default) and ``mri4-n0.5/mri4-n2/mri8-n0.5/mri8-n2`` (0.5/2 %); the image-domain tasks on CT
and MR images alike, with the prior of the image's modality: ``blur2.5/blur4`` (Gaussian blur of 2.5/4 pixels
FWHM), ``inp50/inp80`` (50/80 % of the pixels missing), ``sr2/sr4`` (super-resolution), noise 1 % of the
measurement RMS (``-n0.2``: 0.2 %).

Methods: ``analytic`` (FBP, Hann / zero-filled), ``tv-auto`` (``sample_tv``'s default: the discrepancy
principle, ``σ_y`` from the noise model), ``tv-oracle`` (``tv_oracle_weight``: grid + golden section on the
full-range MSE against the truth; an upper bound for TV), ``tv-oracle-w`` (the same on the MSE in the clinical
window: TV's upper bound there; for MRI the same as ``tv-oracle``), ``tv-oracle-pwls`` / ``tv-oracle-w-pwls`` (the
same on the whitened problem of ``recon.tasks.weighted_problem``: penalised weighted least squares), recon's
``dps``, ``red-diff``, ``dds``, ``hybrid-mean16`` (the mean of 16 hybrid runs: the image ``recon reconstruct
--uncertainty`` writes; only when named), ``hybrid-pK`` (the hybrid with ``particles=K``: the mean of K chains run
as one batch; only when named), ``hybrid-tvfF`` (the hybrid with ``tv_factor=F``: a candidate default; only when
named), ``hybrid-axial`` / ``hybrid-cycle`` (volumes: the hybrid with ``planes`` forced to ``"axial"``, its volume
default before 2026-12-07, or ``"cycle"``; only when named) and whichever
of ``diffpir``, ``daps``, ``pigdm``, ``hybrid`` the method table has, and deepinv's ``deepinv-diffpir`` /
``deepinv-dps`` with the same prior; every diffusion method at its defaults (no tuning on these images), on the
whitened problem as ``recon reconstruct`` runs it (Beer–Lambert CT: each ray by its inverse variance).

Metrics: PSNR/SSIM on the full range (CT: [−1000, 1000] HU as ``recon reconstruct`` reports; MRI: the reference's
range) and in the clinical window (head CT: brain window [0, 80] HU; body CT: [−160, 240] HU; both images clipped;
MRI: the full range), for a volume the mean over its axial slices; ``noise``: the standard deviation of the
reconstruction in a flat region picked automatically, the window of lowest variance of the reference inside soft
tissue (CT: reference in [−15, 95] HU; MRI: above 25 % of its 99th percentile; a volume: one per axial slice,
averaged), in HU for CT; wall time and NFE. The JSON file is resumable: rows already in it (same image,
task, size, method) are skipped. A volume's figures show its middle axial slice and its middle coronal plane.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

__all__ = ["IMAGES", "METHODS", "TASKS", "flat_region", "load_image", "main", "peak_noise", "run_case", "score"]

BRAIN_WINDOW = (0.0, 80.0)  # HU
BODY_WINDOW = (-160.0, 240.0)  # HU, soft tissue of the trunk
CT_FULL = (-1000.0, 1000.0)  # HU, the full-range metric window of `recon reconstruct`
IMAGES = ("ct-head-full", "ct-head-crop", "ct-body", "ct-slab", "ct-slab-t2", "ct-slab-t3", "mr-small", "mr-anat",
          "mr-sagittal", "mr-anat-volume", "mr-emri-volume", "ct-phantom")
# `recon prepare-prior-data --modality ct` writes the held-out InVesalius slab here (``--slab`` overrides)
SLAB = Path("prior-data/ct/held-out/invesalius_cranium_slab.nii.gz")
# name -> (task, task parameters, noise: photons / noise (relative to the RMS) / peak (relative to the peak))
TASKS: dict[str, tuple[str, dict, dict]] = {
    "sv30": ("sparse-view-ct", {"views": 30}, {"photons": 1e5}),
    "sv60": ("sparse-view-ct", {"views": 60}, {"photons": 1e5}),
    "sv120": ("sparse-view-ct", {"views": 120}, {"photons": 1e5}),
    "la90": ("limited-angle-ct", {"views": 60, "arc": 90.0}, {"photons": 1e5}),
    "la120": ("limited-angle-ct", {"views": 80, "arc": 120.0}, {"photons": 1e5}),
    "ld1e4": ("sparse-view-ct", {"views": 180}, {"photons": 1e4}),
    "ld1e5": ("sparse-view-ct", {"views": 180}, {"photons": 1e5}),
    "g0.2": ("sparse-view-ct", {"views": 60}, {"peak": 0.002}),
    "g1": ("sparse-view-ct", {"views": 60}, {"peak": 0.01}),
    "g2": ("sparse-view-ct", {"views": 60}, {"peak": 0.02}),
    # configurations no default was chosen on (robustness rows: benchmarks/README.md, "Unseen configurations" and
    # "MRI: unseen accelerations and other masks")
    "sv20": ("sparse-view-ct", {"views": 20}, {"photons": 1e5}),
    "sv45": ("sparse-view-ct", {"views": 45}, {"photons": 1e5}),
    "sv90": ("sparse-view-ct", {"views": 90}, {"photons": 1e5}),
    "ld3e4": ("sparse-view-ct", {"views": 180}, {"photons": 3e4}),
    "g0.5": ("sparse-view-ct", {"views": 60}, {"peak": 0.005}),
    "la105": ("limited-angle-ct", {"views": 70, "arc": 105.0}, {"photons": 1e5}),
    "la150": ("limited-angle-ct", {"views": 100, "arc": 150.0}, {"photons": 1e5}),
    "mri3": ("mri", {"acceleration": 3}, {"noise": 0.01}),
    "mri6": ("mri", {"acceleration": 6}, {"noise": 0.01}),
    "mri6-n2": ("mri", {"acceleration": 6}, {"noise": 0.02}),
    "mri4": ("mri", {"acceleration": 4}, {"noise": 0.01}),
    "mri8": ("mri", {"acceleration": 8}, {"noise": 0.01}),
    "mri4-n0.5": ("mri", {"acceleration": 4}, {"noise": 0.005}),
    "mri4-n2": ("mri", {"acceleration": 4}, {"noise": 0.02}),
    "mri8-n0.5": ("mri", {"acceleration": 8}, {"noise": 0.005}),
    "mri8-n2": ("mri", {"acceleration": 8}, {"noise": 0.02}),
    # image-domain tasks (the prior of the image's modality; noise relative to the measurement RMS, as the CLI)
    # (blur FWHM in pixels of the image at its benchmark size: `fwhm_px`, turned into mm by `_simulate`)
    "blur2.5": ("blur", {"fwhm_px": 2.5}, {"noise": 0.01}),
    "blur2.5-n0.2": ("blur", {"fwhm_px": 2.5}, {"noise": 0.002}),
    "inp50": ("inpainting", {"missing": 0.5}, {"noise": 0.01}),
    "sr2": ("super-resolution", {"factor": 2}, {"noise": 0.01}),
    # image-domain configurations no default was chosen on
    "blur4": ("blur", {"fwhm_px": 4.0}, {"noise": 0.01}),
    "inp80": ("inpainting", {"missing": 0.8}, {"noise": 0.01}),
    "sr4": ("super-resolution", {"factor": 4}, {"noise": 0.01}),
    "sr2-n0.2": ("super-resolution", {"factor": 2}, {"noise": 0.002}),
}
METHODS = ("analytic", "tv-auto", "tv-oracle", "dps", "red-diff", "dds", "diffpir", "daps", "pigdm", "hybrid",
           "deepinv-diffpir", "deepinv-dps", "tv-oracle-w")
ORACLES = ("tv-oracle", "tv-oracle-w", "tv-oracle-pwls", "tv-oracle-w-pwls")
CLASSICAL = ("analytic", "tv-auto", *ORACLES)
VARIANTS = ("hybrid-mean16", "hybrid-axial", "hybrid-cycle")  # named variants of recon's methods (_run_method)


# ------------------------------------------------------------------------------------------------ images
def load_image(name: str, size: int, slab: Path = SLAB) -> tuple[np.ndarray, tuple[float, ...], str]:
    """``(image (size, size) in physical units, spacing (dy, dx) mm, modality)`` of a held-out image; for
    ``ct-slab`` a volume ``(24, size, size)`` with spacing ``(dz, dy, dx)``, read from ``slab``."""
    from skimage.transform import resize

    from recon.tasks import AIR_HU

    def fit(img: np.ndarray) -> np.ndarray:
        return resize(img.astype(np.float64), (size, size), anti_aliasing=True, preserve_range=True)

    if name.startswith("ct-head") or name == "ct-body":
        hu, ps = _dicom_slice("CT_small.dcm" if name == "ct-body" else "693_UNCR.dcm")
        # the scanner's padding outside its field of view (−3024 HU) is air: the CT tasks see it so already (μ is
        # clamped at 0), the image-domain tasks would otherwise be asked to reproduce a value no prior knows
        hu = np.maximum(hu, AIR_HU)  # before the area-averaging: the edge pixels mix air, not −3024
        if name == "ct-head-crop":
            hu = hu[128:384, 128:384]
        return fit(hu), (ps * hu.shape[0] / size,) * 2, "CT-body" if name == "ct-body" else "CT"
    thick = {"ct-slab": 1, "ct-slab-t2": 2, "ct-slab-t3": 3}.get(name)  # slices averaged into one
    if thick:
        return _slab(slab, size, fit, thick)
    if name == "ct-phantom":
        from recon.datasets.phantoms import random_ct_phantom

        img = random_ct_phantom((size, size), torch.Generator().manual_seed(10_000)).double().numpy()
        return img, (256.0 / size,) * 2, "CT"
    if name == "mr-small":
        mr, ps = _dicom_slice("MR_small.dcm")
        mr = np.abs(mr)
        return fit(mr), (ps * mr.shape[0] / size,) * 2, "MR"
    if name == "mr-anat":
        import nibabel as nib
        from nibabel.testing import data_path

        vol = np.abs(nib.load(f"{data_path}/anatomical.nii").get_fdata())
        axial = vol[:, :, vol.shape[2] // 2]
        return fit(axial), (2.0 * axial.shape[0] / size, 2.0 * axial.shape[1] / size), "MR"
    if name in ("mr-anat-volume", "mr-emri-volume"):  # whole MRI volumes as `recon reconstruct` reads them
        return _mri_volume(name, slab)
    if name == "mr-sagittal":  # the MRI tuning slice (recon.priors.recipe holds it out): not a reported case
        from matplotlib.cbook import get_sample_data

        from recon.priors.recipe import read_s1045

        return fit(read_s1045(get_sample_data("s1045.ima.gz", asfileobj=False)).array[0]), (256.0 / size,) * 2, "MR"
    raise ValueError(f"unknown image {name!r}; choose from {', '.join(IMAGES)}")


def _mri_volume(name: str, slab: Path) -> tuple[np.ndarray, tuple[float, float, float], str]:
    """``mr-anat-volume``: the whole of nibabel's anatomical.nii (held out, reported); ``mr-emri-volume``: the MRI
    tuning volume, the recipe's held-out emri_small (10 × 64², not reported), found next to the slab (the recipe's
    folder layout). ``(D, H, W)`` magnitude, ``(dz, dy, dx)`` mm."""
    from nibabel.testing import data_path

    from recon.datasets.io import read_image

    path = (Path(data_path) / "anatomical.nii" if name == "mr-anat-volume"
            else Path(slab).parents[2] / "mri" / "held-out" / "emri_small.nii.gz")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {name} needs recon prepare-prior-data --modality mri")
    image = read_image(path)
    return np.abs(image.array).astype(np.float64), image.spacing, "MR"


def _dicom_slice(filename: str) -> tuple[np.ndarray, float]:
    """``(pixels in physical units, pixel spacing mm)`` of one of pydicom's (or pydicom-data's) test slices."""
    import pydicom
    from pydicom.data import get_testdata_file

    from recon.datasets.slices import read_slices

    path = get_testdata_file(filename, download=False)
    if path is None:
        raise FileNotFoundError(f"{filename} not found: pip install pydicom-data")
    spacing = float(pydicom.dcmread(path, stop_before_pixels=True).PixelSpacing[0])
    return next(read_slices(path)).astype(np.float64), spacing


def _slab(path: Path, size: int, fit, thick: int = 1) -> tuple[np.ndarray, tuple[float, float, float], str]:
    """The held-out InVesalius head CT slab (24 contiguous axial slices, 1.5 mm apart), each slice area-averaged
    in-plane to ``size²`` by ``fit`` (``load_image``'s resize); ``thick > 1``: every ``thick`` neighbouring slices
    averaged into one of ``thick × 1.5`` mm."""
    from recon.datasets.io import read_image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file; write it with `recon prepare-prior-data -o prior-data/ct "
                                "--modality ct --fetch`, or name it with --slab")
    image = read_image(path)
    hu = image.array.astype(np.float64)
    n = hu.shape[0] // thick * thick
    hu = hu[:n].reshape(n // thick, thick, *hu.shape[1:]).mean(1)
    vol = np.stack([fit(s) for s in hu])
    dz, dy, dx = image.spacing
    return vol, (dz * thick, dy * hu.shape[1] / size, dx * hu.shape[2] / size), "CT"


def is_ct(modality: str) -> bool:
    """``load_image``'s modality is ``"CT"`` (head), ``"CT-body"`` or ``"MR"``."""
    return modality.startswith("CT")


def flat_region(ref: np.ndarray, modality: str, win: int | None = None) -> tuple[slice, slice] | list:
    """The ``win × win`` window of lowest reference variance lying wholly inside the brain (module docstring); for a
    volume, one per axial slice."""
    from scipy.ndimage import binary_erosion, binary_opening, uniform_filter

    if ref.ndim == 3:
        return [flat_region(s, modality, win) for s in ref]

    win = win or max(5, ref.shape[0] // 16)
    if is_ct(modality):
        mask = binary_opening((ref > -15) & (ref < 95), np.ones((3, 3), bool), iterations=2)
    else:
        mask = binary_opening(ref > 0.25 * np.percentile(ref, 99), np.ones((3, 3), bool), iterations=2)
    inside = binary_erosion(mask, np.ones((win, win), bool), border_value=0)
    if not inside.any():
        inside = mask
    mean = uniform_filter(ref, win)
    var = uniform_filter(ref**2, win) - mean**2
    var[~inside] = np.inf
    cy, cx = np.unravel_index(int(np.argmin(var)), var.shape)
    y0, x0 = max(cy - win // 2, 0), max(cx - win // 2, 0)
    return slice(y0, y0 + win), slice(x0, x0 + win)


# ------------------------------------------------------------------------------------------------ metrics
def _psnr_ssim(rec: np.ndarray, ref: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    r, x = np.clip(ref, lo, hi), np.clip(rec, lo, hi)
    return (float(peak_signal_noise_ratio(r, x, data_range=hi - lo)),
            float(structural_similarity(r, x, data_range=hi - lo, win_size=7)))


def windows(ref: np.ndarray, modality: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(full range, clinical window)`` of a reference."""
    if is_ct(modality):
        return CT_FULL, BODY_WINDOW if modality == "CT-body" else BRAIN_WINDOW
    full = (float(ref.min()), float(ref.max()))
    return full, full


def score(rec: np.ndarray, ref: np.ndarray, modality: str, roi: tuple[slice, slice]) -> dict:
    """PSNR/SSIM on the full range and in the clinical window, and the flat-region noise (module docstring); for a
    volume, each the mean over its axial slices (the planes a reader scrolls through)."""
    if ref.ndim == 3:
        per_slice = [score(r, s, modality, q) for r, s, q in zip(rec, ref, roi, strict=True)]
        return {k: float(np.mean([p[k] for p in per_slice])) for k in per_slice[0]}
    full, window = windows(ref, modality)
    p, s = _psnr_ssim(rec, ref, *full)
    pw, sw = _psnr_ssim(rec, ref, *window)
    return {"psnr": p, "ssim": s, "psnr_w": pw, "ssim_w": sw, "noise": float(rec[roi].std()),
            "noise_err": float((rec - ref)[roi].std())}


# ------------------------------------------------------------------------------------------------ methods
def peak_noise(spec, image: torch.Tensor, unit: str | None, peak: float, seed: int = 0) -> float:
    """``simulate``'s Gaussian ``noise`` (relative to the noiseless measurement's RMS) for a std of ``peak`` times
    the noiseless measurement's peak (the ``g*`` tasks)."""
    from recon.tasks import simulate

    clean = simulate(spec, image, unit, seed=seed).y
    return peak * float(clean.abs().max()) / float(clean.pow(2).mean().sqrt())


def _simulate(task: str, image: np.ndarray, spacing: tuple, modality: str, seed: int):
    from recon.tasks import make_task, simulate

    name, params, noise = TASKS[task]
    shape, spacing = ((1, *image.shape), (1.0, *spacing)) if image.ndim == 2 else (image.shape, spacing)
    if "fwhm_px" in params:
        params = {**params, "fwhm": params["fwhm_px"] * float(spacing[-1])}
        del params["fwhm_px"]
    spec = make_task(name, shape, spacing, seed=seed, **params)
    unit = "HU" if is_ct(modality) else None
    img = torch.from_numpy(image).float()
    kw = dict(noise)
    if "peak" in kw:  # Gaussian noise relative to the measurement peak → simulate's RMS-relative level
        kw = {"noise": peak_noise(spec, img, unit, kw.pop("peak"), seed)}
    return spec, simulate(spec, img, unit, seed=seed, **kw)


def _run_method(method: str, ctx: dict) -> tuple[np.ndarray, dict]:
    """One method on one case; returns the reconstruction in physical units and what to record."""
    from recon import reconstruct
    from recon.samplers.baselines import tv_oracle_weight
    from recon.tasks import from_domain, to_domain

    spec, meas, physics = ctx["spec"], ctx["meas"], ctx["physics"]
    t0 = time.perf_counter()
    extra: dict = {}
    if method in ("analytic", "tv-auto"):
        res = reconstruct(physics, meas.y, None, "analytic" if method == "analytic" else "tv", sigma_y=meas.sigma_y,
                          seed=ctx["seed"])
        x_d, nfe, seconds = res.x, 0, res.seconds
        if method == "tv-auto":
            w = res.info.get("tv_weight", {})
            extra = {"lam": res.info["options"]["lam"], "rule": w.get("rule", res.info["options"].get("weight")),
                     "discrepancy_ratio": w.get("ratio"), "bracketed": w.get("bracketed")}
    elif method in ("tv-oracle", "tv-oracle-w", "tv-oracle-pwls", "tv-oracle-w-pwls"):
        if method.endswith("-pwls"):  # penalised weighted least squares: TV on the whitened problem
            physics, meas = ctx["physics_w"], ctx["meas_w"]
        ref_t = torch.from_numpy(ctx["ref"]).float()[None, None]
        truth = to_domain(spec, ref_t, "HU" if spec.is_ct else None)
        scorer = None
        if method.startswith("tv-oracle-w"):  # the MSE in the clinical window (both images clipped)
            _, (lo, hi) = windows(ctx["ref"], ctx["modality"])

            def scorer(x: torch.Tensor) -> float:
                return -float((from_domain(spec, x).clamp(lo, hi) - ref_t.clamp(lo, hi)).pow(2).sum())
        lam, x_d, record = tv_oracle_weight(physics, meas.y, truth, sigma_y=meas.sigma_y, score=scorer)
        nfe, seconds = 0, time.perf_counter() - t0
        extra = {"lam": lam, "rule": "oracle (window MSE)" if scorer else "oracle (full-range MSE)",
                 "solves": len(record["evals"])}
    else:
        prior, (y_n, sigma_n, a, b) = ctx["prior"], ctx["normalised"]
        name, kw = method, {}
        if method == "hybrid-mean16":  # what `recon reconstruct --uncertainty` returns: the mean of 16 hybrid runs
            name, kw = "ensemble", {"base": "hybrid", "particles": 16}
        elif _chains(method):  # hybrid-pK: K chains in one batch, their mean
            name, kw = "hybrid", {"particles": _chains(method)}
        elif _tv_factor(method) is not None:  # hybrid-tvfF: the hybrid with tv_factor=F (a candidate default)
            name, kw = "hybrid", {"tv_factor": _tv_factor(method)}
        elif method in ("hybrid-axial", "hybrid-cycle"):  # volumes: the prior's planes forced (see sample_hybrid)
            name, kw = "hybrid", {"planes": method.removeprefix("hybrid-")}
        res = reconstruct(ctx["physics_w"], y_n, prior, name, sigma_y=sigma_n, seed=ctx["seed"], **kw)
        x_d, nfe, seconds = (res.x - b) / a, res.nfe, res.seconds
        extra = {"steps": res.info.get("steps"), "sigma_y_normalised": sigma_n}
    rec = from_domain(spec, x_d.detach().double().cpu())[0, 0].numpy()
    return rec, {"seconds": seconds, "nfe": nfe, **extra}


def _applies(task: str, ct_image: bool) -> bool:
    """Whether a ``recon.tasks`` task runs on a CT image (``ct_image``) or an MR one: CT acquisitions on CT, MRI on
    MR, the image-domain tasks (blur, inpainting, super-resolution) on both."""
    return ct_image if task.endswith("-ct") else (not ct_image if task == "mri" else True)


def _tv_factor(method: str) -> float | None:
    """F of a ``hybrid-tvfF`` method name, else None."""
    head, _, f = method.partition("-tvf")
    try:
        factor = float(f)
    except ValueError:
        return None
    return factor if head == "hybrid" and factor >= 0 else None


def _chains(method: str) -> int:
    """K of a ``hybrid-pK`` method name, else 0."""
    head, _, k = method.rpartition("-p")
    return int(k) if head == "hybrid" and k.isdigit() and int(k) > 0 else 0


def _context(image_name: str, task: str, size: int, seed: int, priors: dict, slab: Path = SLAB) -> dict:
    ref, spacing, modality = load_image(image_name, size, slab)
    return problem_context(ref, spacing, modality, task, seed, priors)


def problem_context(ref: np.ndarray, spacing: tuple, modality: str, task: str, seed: int, priors: dict) -> dict:
    """One case of an image given as an array: what ``_run_method`` needs (measurements, operators, the whitened and
    normalised problem of the diffusion methods)."""
    from recon.samplers.baselines import analytic_inverse
    from recon.tasks import normalised_problem, weighted_problem

    spec, meas = _simulate(task, ref, spacing, modality, seed)
    physics = meas.physics()
    ctx = {"ref": ref, "modality": modality, "spec": spec, "meas": meas, "physics": physics, "seed": seed,
           "roi": flat_region(ref, modality)}
    # the prior `recon reconstruct --prior default` picks: by the task (CT, MRI), else by the image's modality
    prior = priors["ct" if spec.is_ct or (spec.task != "mri" and is_ct(modality)) else "mri"]
    with torch.no_grad():
        analytic_d = analytic_inverse(physics, meas.y)
    # the diffusion methods run on the whitened problem, as `recon reconstruct` runs them (PWLS for Beer–Lambert CT)
    ctx["physics_w"], meas_w = weighted_problem(meas, physics)
    ctx["prior"], ctx["normalised"] = prior, normalised_problem(meas_w, ctx["physics_w"], prior, analytic_d)
    ctx["meas_w"] = meas_w
    return ctx


def run_case(image_name: str, task: str, size: int, methods: list[str], priors: dict, done: dict, seed: int,
             write_row, cache_dir: Path, slab: Path = SLAB) -> list[tuple[str, np.ndarray, dict]]:
    """All ``methods`` on one case (skipping those whose rows are in ``done``, method → row); returns
    ``(method, reconstruction, row)`` for the figure, reconstructions of earlier runs coming from ``cache_dir``."""
    from recon.samplers import METHODS as AVAILABLE
    from recon.samplers import SamplerDivergence

    ctx = _context(image_name, task, size, seed, priors, slab)
    case = f"{image_name}-{task}-{size}"
    cache = cache_dir / f"{case}.npz"
    stored = dict(np.load(cache)) if cache.exists() else {}
    out = []
    for method in methods:
        if method not in (*CLASSICAL, *AVAILABLE, *VARIANTS) and not _chains(method) and _tv_factor(method) is None:
            print(f"{case}: method {method!r} not in recon's method table, skipped", flush=True)
            continue
        if method.endswith("-pwls") and "weighting" not in ctx["meas_w"].noise:
            continue  # Gaussian noise: the whitened problem is the problem
        if method in done:
            if method in stored and "error" not in done[method]:
                out.append((method, stored[method], done[method]))
            continue
        try:
            rec, info = _run_method(method, ctx)
        except SamplerDivergence as err:
            row = {"case": case, "image": image_name, "task": task, "size": size, "method": method,
                   "error": str(err)}
            write_row(row)
            print(f"{case:32s} {method:16s} diverged: {err}", flush=True)
            continue
        row = {"case": case, "image": image_name, "task": task, "size": size, "method": method,
               "sigma_y": ctx["meas"].sigma_y, "noise_model": ctx["meas"].noise,
               **score(rec, ctx["ref"], ctx["modality"], ctx["roi"]), **info}
        write_row(row)
        stored[method] = rec.astype(np.float32)
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, **stored)
        out.append((method, rec, row))
        print(f"{case:32s} {method:16s} PSNR {row['psnr']:6.2f}/{row['psnr_w']:6.2f} SSIM {row['ssim']:.3f}/"
              f"{row['ssim_w']:.3f} noise {row['noise']:7.2f} {row['seconds']:7.1f} s NFE {row['nfe']}", flush=True)
    spacing = ctx["spec"].spacing
    out.insert(0, ("reference", ctx["ref"], {"roi": ctx["roi"], "modality": ctx["modality"],
                                             "aspect": spacing[0] / spacing[-1] if len(spacing) == 3 else 1.0}))
    return out


# ------------------------------------------------------------------------------------------------ figure
def figure(case: str, panels: list[tuple[str, np.ndarray, dict]], path: Path) -> None:
    """Reference and every method in the clinical window (top) and ``|error|`` on ``[0, width/4]`` (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ref, meta = panels[0][1], panels[0][2]
    _, (lo, hi) = windows(ref, meta["modality"])
    if not is_ct(meta["modality"]):
        lo, hi = float(np.percentile(ref, 1)), float(np.percentile(ref, 99.5))
    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.2), squeeze=False)
    aspect = meta.get("aspect", 1.0)
    for k, (name, img, row) in enumerate(panels):
        axes[0, k].imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        title = name if k == 0 else f"{name}\n{row['psnr_w']:.1f} dB / {row['ssim_w']:.2f}"
        axes[0, k].set_title(title, fontsize=7)
        if k == 0 and meta.get("roi") is not None:
            ys, xs = meta["roi"]
            axes[0, 0].add_patch(Rectangle((xs.start, ys.start), xs.stop - xs.start, ys.stop - ys.start,
                                           fill=False, edgecolor="yellow", linewidth=0.8))
        if k == 0:
            axes[1, 0].axis("off")
        else:
            axes[1, k].imshow(np.abs(np.clip(img, lo, hi) - np.clip(ref, lo, hi)), cmap="magma", vmin=0,
                              vmax=(hi - lo) / 4, aspect=aspect)
            axes[1, k].set_xlabel(f"|error|; flat-region std {row['noise']:.1f}", fontsize=7)
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    unit = "HU" if is_ct(meta["modality"]) else "a.u."
    fig.suptitle(f"{case}: window [{lo:.0f}, {hi:.0f}] {unit}; PSNR/SSIM in the window; "
                 f"error on [0, {(hi - lo) / 4:.0f}]", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def planes(case: str, panels: list[tuple[str, np.ndarray, dict]]) -> list[tuple[str, list]]:
    """``(figure name, panels)`` to draw: the case itself for an image; for a volume its middle axial slice (with
    that slice's flat region) and its middle coronal plane (drawn at the voxels' aspect ratio)."""
    ref, meta = panels[0][1], panels[0][2]
    if ref.ndim == 2:
        return [(case, panels)]
    mid_z, mid_y = ref.shape[0] // 2, ref.shape[1] // 2
    axial = [(n, v[mid_z], {**r, "roi": meta["roi"][mid_z], "aspect": 1.0} if k == 0 else r)
             for k, (n, v, r) in enumerate(panels)]
    coronal = [(n, v[:, mid_y], {**r, "roi": None, "aspect": meta["aspect"]} if k == 0 else r)
               for k, (n, v, r) in enumerate(panels)]
    return [(f"{case}-axial{mid_z}", axial), (f"{case}-coronal{mid_y}", coronal)]


# ------------------------------------------------------------------------------------------------ report
def _fmt(row: dict | None, key: str, digits: int) -> str:
    if row is None or "error" in row:
        return "div." if row is not None else "–"
    v = row.get(key)
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report(rows: list[dict]) -> str:
    """Markdown tables, one per image group (CT, MRI): per case, each method's PSNR/SSIM full and in the
    window, flat-region noise, time and NFE; the best diffusion method and oracle TV side by side."""
    lines = []
    groups = {"CT": [r for r in rows if r["task"] in TASKS and TASKS[r["task"]][0] != "mri"],
              "MRI": [r for r in rows if r["task"] in TASKS and TASKS[r["task"]][0] == "mri"]}
    for group, grows in groups.items():
        if not grows:
            continue
        lines += [f"#### {group}", "", "| case | method | PSNR full | SSIM full | PSNR window | SSIM window | noise | "
                  "s | NFE |", "|---|---|---|---|---|---|---|---|---|"]
        cases = list(dict.fromkeys(r["case"] for r in grows))
        for case in cases:
            order = {m: k for k, m in enumerate(METHODS)}
            for r in sorted((r for r in grows if r["case"] == case), key=lambda r: order.get(r["method"], 99)):
                lines.append(f"| {case} | {r['method']} | {_fmt(r, 'psnr', 2)} | {_fmt(r, 'ssim', 3)} | "
                             f"{_fmt(r, 'psnr_w', 2)} | {_fmt(r, 'ssim_w', 3)} | {_fmt(r, 'noise', 1)} | "
                             f"{_fmt(r, 'seconds', 1)} | {r.get('nfe', '–')} |")
        lines.append("")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per case: TV (automatic, and the better oracle on each range, LS or PWLS) against the default
    diffusion method of the task (else the best by PSNR in the window): PSNR / SSIM on the full range and in the
    window, and the flat-region noise."""
    from recon.samplers import recommended_method

    def cell(r: dict, k: str) -> str:
        return f"{r['psnr' + k]:.2f} / {r['ssim' + k]:.3f}"

    lines = ["| case | TV auto: full, window, noise | best TV: full, window, noise | default | full | "
             "window | noise | Δ PSNR full / window vs oracle TV |", "|---|---|---|---|---|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        cr = {r["method"]: r for r in rows if r["case"] == case and "error" not in r}
        diff = [r for m, r in cr.items() if m not in CLASSICAL]
        # TV's best: the oracles' warm-started searches do not always converge further than the automatic rule's
        # solves (e.g. at 0.2 % Gaussian noise), so the best TV result on each range is the baseline
        oracles = [cr[m] for m in (*ORACLES, "tv-auto") if m in cr]
        if not oracles or not diff or "tv-auto" not in cr:
            continue
        first = next(iter(cr.values()))
        task = TASKS[first["task"]][0]
        default = recommended_method("mri" if task == "mri" else "ct", task)  # what `recon reconstruct` runs
        best = cr.get(default) or max(diff, key=lambda r: r["psnr_w"])
        of = max(oracles, key=lambda r: r["psnr"])
        ow = max(oracles, key=lambda r: r["psnr_w"])
        auto = cr["tv-auto"]
        lines.append(f"| {case} | {cell(auto, '')}, {cell(auto, '_w')}, {auto['noise']:.1f} | {cell(of, '')}, "
                     f"{cell(ow, '_w')}, {ow['noise']:.1f} | {best['method']} | {cell(best, '')} | "
                     f"{cell(best, '_w')} | {best['noise']:.1f} | {best['psnr'] - of['psnr']:+.2f} / "
                     f"{best['psnr_w'] - ow['psnr_w']:+.2f} |")
    return "\n".join(lines)


def ranking(rows: list[dict]) -> str:
    """Mean rank of every method over the complete cases of each modality (1 = best), by PSNR and SSIM in the
    window (the full range for MRI, where both coincide) and on the full range; oracle TV rows ranked with the
    rest; only the methods every complete case has."""
    lines = ["| modality | method | cases | mean rank PSNR window | mean rank SSIM window | mean rank PSNR full |",
             "|---|---|---|---|---|---|"]
    for modality, is_mri in (("CT", False), ("MRI", True)):
        ranks: dict[str, list[list[int]]] = {}
        cases = {c: {r["method"] for r in rows if r["case"] == c and "error" not in r}
                 for c in dict.fromkeys(r["case"] for r in rows if (TASKS[r["task"]][0] == "mri") == is_mri)}
        cases = {c: m for c, m in cases.items() if "deepinv-dps" in m}  # complete cases only
        common = set.intersection(*cases.values()) if cases else set()
        for case in cases:
            cr = [r for r in rows if r["case"] == case and r["method"] in common and "error" not in r]
            for k, key in enumerate(("psnr_w", "ssim_w", "psnr")):
                for pos, r in enumerate(sorted(cr, key=lambda r: -r[key])):
                    ranks.setdefault(r["method"], [[], [], []])[k].append(pos + 1)
        for method, (a, b, c) in sorted(ranks.items(), key=lambda kv: np.mean(kv[1][0])):
            lines.append(f"| {modality} | {method} | {len(a)} | {np.mean(a):.1f} | {np.mean(b):.1f} | "
                         f"{np.mean(c):.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def _load_rows(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return json.loads(path.read_text())["rows"]


def _writer(path: Path | None, rows: list[dict], meta: dict):
    def write_row(row: dict) -> None:
        rows[:] = [r for r in rows if (r["case"], r["method"]) != (row["case"], row["method"])] + [row]
        if path is not None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
            os.replace(tmp, path)
    return write_row


def _prior_sha(args: argparse.Namespace) -> dict:
    """First 16 hex digits of each prior's weights file (the built-in ones, or a folder's)."""
    import hashlib

    import recon.priors

    out = {}
    for key, name in (("ct", args.prior_ct), ("mri", args.prior_mri)):
        folder = Path(name) if Path(name).is_dir() else Path(recon.priors.__file__).parent / "weights" / name
        files = sorted(folder.glob("*.safetensors"))
        out[key] = hashlib.sha256(files[0].read_bytes()).hexdigest()[:16] if files else None
    return out


def main(argv: list[str] | None = None) -> None:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", default=["ct-head-full", "ct-head-crop", "mr-small", "mr-anat"],
                        choices=IMAGES)
    parser.add_argument("--tasks", nargs="+", default=["sv30", "sv60", "ld1e4", "la90", "mri4", "mri8"],
                        choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--slab", type=Path, default=SLAB, help="the held-out InVesalius slab (image ct-slab)")
    parser.add_argument("--prior-ct", default="default-ct")
    parser.add_argument("--prior-mri", default="default-mri")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="results (resumable: rows already there are skipped)")
    parser.add_argument("--figures", type=Path, default=Path(__file__).resolve().parent / "figures")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/recon-matrix-cache"),
                        help="reconstructions kept for the figures of resumed runs")
    parser.add_argument("--no-figures", action="store_true", help="write no figures (e.g. a pass of one method)")
    parser.add_argument("--report", nargs="+", type=Path, help="print the markdown tables of these JSON files")
    args = parser.parse_args(argv)
    if args.report:
        rows = [r for p in args.report for r in _load_rows(p)]
        print(report(rows))
        print(summary(rows))
        print()
        print(ranking(rows))
        return
    torch.set_num_threads(args.threads)
    from recon.priors import load_prior

    priors = {"ct": load_prior(args.prior_ct), "mri": load_prior(args.prior_mri)}
    rows = _load_rows(args.json)
    meta = {"priors": {"ct": args.prior_ct, "mri": args.prior_mri}, "prior_sha256": _prior_sha(args),
            "threads": args.threads, "seed": args.seed,
            "command": "python benchmarks/bench_matrix.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_row = _writer(args.json, rows, meta)
    t0 = time.perf_counter()
    for size in args.sizes:
        for image in args.images:
            ct_image = image.startswith("ct-")
            for task in args.tasks:
                if not _applies(TASKS[task][0], ct_image):
                    continue
                case = f"{image}-{task}-{size}"
                done = {r["method"]: r for r in rows if r["case"] == case}
                panels = run_case(image, task, size, args.methods, priors, done, args.seed, write_row, args.cache,
                                  args.slab)
                if len(panels) > 1 and not args.no_figures:
                    for name, drawn in planes(case, panels):
                        figure(name, drawn, args.figures / f"matrix-{name}.png")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
