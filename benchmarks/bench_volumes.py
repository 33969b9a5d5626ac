"""Whole volumes with 2D priors: analytic, 3D TV, slice-independent DDS, DiffusionMBIR-style and DDS-style (TV-z).

    python benchmarks/bench_volumes.py --task ct --size 64 --json benchmarks/volumes_ct_64.json
    python benchmarks/bench_volumes.py --task mri --size 64 --json benchmarks/volumes_mri_64.json

CT: the 3D modified Shepp–Logan phantom (``recon.datasets.phantoms.shepp_logan_3d``, HU = 1000·value − 1000), never
seen by the CT prior, through slice-by-slice parallel-beam sparse-view CT (``--views``, default 30) with 1 %
Gaussian noise. MRI: nilearn's MNI152 T1 template resampled to ``size³`` (NOTE: the built-in MRI prior was
trained on 2D slices of this template, so this MRI row measures the coupling, not generalisation), 4× Cartesian
sampling with one random 1D mask per slice (``fft_dims="2d"``), σ_y = 0.01. ``--task mri-anatomical``: the same
MRI task on nibabel's ``anatomical.nii`` (a T1 brain the MRI prior never saw, 25 × 41 × 33 at 2 mm, resized to
24 × 48 × 40 as in notebook 4; ``--size`` is ignored):

    python benchmarks/bench_volumes.py --task mri-anatomical --json benchmarks/volumes_mri_anatomical.json

Memory and time growth at large sizes (``--steps N`` overrides every method's step count, so a 256³ run that
would take hours measures its peak memory and its time per step in minutes; such rows carry ``"steps_override"``
and their PSNR is not a quality result):

    python benchmarks/bench_volumes.py --task ct --size 256 --steps 2 --only "DDS-style + TV-z (50" --json …

Every method runs in its own process (``--method`` internally) so that the peak resident memory is its own.
Metrics: PSNR/SSIM on the normalised range (data range 2) averaged over the slices of each orientation (axial =
along D, coronal = along H, sagittal = along W); NFE = network evaluations per slice; wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

METHODS = {
    "analytic": ("analytic", {}),
    "3D TV": ("tv", {"steps": 300}),
    "slice-independent DDS (no coupling)": ("dds", {"steps": 50, "tv_weight": 0.0}),
    # the official CT weights (the default on CT; on MRI the CT weights transferred, the default before the MRI one)
    "DiffusionMBIR-style (200 levels)": ("diffusion-mbir", {"steps": 200, "settings": "ct"}),
    # the official MRI script's lamb = 0.005, rho = 0.01 for [0, 1] images and a unit-norm A: λ = 0.01, ρ = 0.01 in
    # the prior's [-1, 1] units (threshold λ/ρ = 1), the default for MRI operators; MRI tasks only
    "DiffusionMBIR-style, official MRI λ, ρ (200 levels)": ("diffusion-mbir", {"steps": 200, "lam": 0.01,
                                                                               "rho": 0.01}),
    "DDS-style + TV-z (50 steps)": ("dds", {"steps": 50, "tv_weight": None}),
    "DDS-style + TV-z (20 steps)": ("dds", {"steps": 20, "tv_weight": None}),
    # the TV-z shrinkage threshold λ/ρ at 3× the official 0.008: DDS applies it once per step (20 times) where
    # MBIR applies the official one at each of its 400 evaluations; chosen on the 64³ CT phantom between 1× and 3×
    # (so an oracle choice among two), then run unchanged at the other sizes and on MRI
    "DDS-style + TV-z, 3× threshold (20 steps)": ("dds", {"steps": 20, "tv_weight": None, "tv_threshold": 0.024}),
    # the ADMM state restarted at each step (z = u = 0) with 3 ADMM iterations: chosen on the 32³ MRI volume, where
    # the persistent state (official, kept by every other row) made the coupled result worse than the uncoupled one
    "DDS-style + TV-z, ADMM restarted per step (20 steps)": ("dds", {"steps": 20, "tv_weight": None,
                                                                     "admm_persistent": False, "admm_iters": 3}),
    # each step's TV-z problem solved afresh around the Tweedie estimate: ADMM restarted (z = u = 0), 5 ADMM
    # iterations, anchor γ = ρ on x̂0, threshold 3× the official: chosen on 32³ tuning cases (CT and MRI, seed 1,
    # ~15 settings; γ = ρ rather than the grid's 0.2 dB better γ = 0.3 ρ, for one constant fewer), then run
    # unchanged on the seed-0 64³ volumes of both tasks
    "DDS-style + anchored TV-z (20 steps)": ("dds3d", {"steps": 20}),  # the shipped dds3d defaults
}


ANATOMICAL_SHAPE = (24, 48, 40)  # nibabel's anatomical.nii (25 × 41 × 33 at 2 mm) resized as in notebook 4


def volume(task: str, size: int, prior) -> np.ndarray:
    if task == "mri-anatomical":  # a T1 brain the MRI prior never saw
        import os

        from nibabel.testing import data_path
        from skimage.transform import resize

        from recon.datasets.io import read_image

        vol = np.abs(read_image(os.path.join(data_path, "anatomical.nii")).array)
        vol = resize(vol, ANATOMICAL_SHAPE, anti_aliasing=True, preserve_range=True)
        return prior.normalize(torch.from_numpy(vol)).clamp(-1, 1).numpy()
    if task == "ct":
        from recon.datasets.phantoms import shepp_logan_3d

        hu = shepp_logan_3d((size, size, size), dtype=torch.float64)[0, 0].numpy() * 1000.0 - 1000.0
        return prior.normalize(torch.from_numpy(hu)).clamp(-1, 1).numpy()
    import nibabel as nib
    from skimage.transform import resize

    from recon.priors.train import mni152_template_path

    vol = np.asarray(nib.load(mni152_template_path()).get_fdata()).transpose(2, 1, 0)  # (z, y, x)
    vol = resize(vol, (size, size, size), anti_aliasing=True, preserve_range=True)
    return np.clip(2 * vol / np.percentile(vol, 99.5) - 1, -1, 1)


def plane_metrics(rec: np.ndarray, ref: np.ndarray) -> dict:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    out = {}
    for name, axis in (("axial", 0), ("coronal", 1), ("sagittal", 2)):
        r, x = np.moveaxis(ref, axis, 0), np.moveaxis(np.clip(rec, -1, 1), axis, 0)
        keep = [k for k in range(r.shape[0]) if r[k].max() > r[k].min()]
        out[name] = {"psnr": float(np.mean([peak_signal_noise_ratio(r[k], x[k], data_range=2.0) for k in keep])),
                     "ssim": float(np.mean([structural_similarity(r[k], x[k], data_range=2.0) for k in keep]))}
    return out


def _rss_mib(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak since start or the last reset) of this process, in MiB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux ≥ 4.0: ``5`` to ``clear_refs``), so
    that the peak of the reconstruction alone can be read, not the benchmark set-up's (the 3D phantom's supersampled
    float64 rasterisation dominates at 256³)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _rss_mib("VmHWM") is not None


def run_one(task: str, size: int, views: int, label: str, seed: int, steps: int | None = None,
            max_memory: float | None = None) -> dict:
    import resource

    from recon import reconstruct
    from recon.operators import CartesianMRI, ParallelBeamCT
    from recon.priors import load_prior
    from recon.samplers import SamplerDivergence

    prior = load_prior("default-ct" if task == "ct" else "default-mri")
    ref = volume(task, size, prior)
    x = torch.from_numpy(ref).float()[None, None]
    shape = ref.shape
    if task == "ct":
        physics = ParallelBeamCT(shape, angles=views)
    else:
        g = torch.Generator().manual_seed(seed)
        from recon.operators import random_mask

        masks = torch.stack([random_mask(shape[1:], 4.0, seed=int(torch.randint(1 << 30, (1,), generator=g)))
                             for _ in range(shape[0])])
        physics = CartesianMRI(shape, mask=masks, fft_dims="2d", real_input=True)
    ax = physics.A(x)
    g = torch.Generator().manual_seed(seed)
    sigma_y = 0.01 * float(ax.pow(2).mean().sqrt()) if task == "ct" else 0.01
    noise = sigma_y * torch.randn(ax.shape, generator=g)
    y = ax + (noise if task == "ct" else physics.A(physics.A_adjoint(noise)))
    method, options = METHODS[label]
    options = dict(options)
    if steps is not None and "steps" in options:
        options["steps"] = steps
    if max_memory is not None and method in ("dds", "dds3d", "diffusion-mbir"):
        options["memory_budget"] = max_memory
    del x, ax, noise
    gc.collect()
    setup_mib, setup_peak = _rss_mib("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reset = _reset_peak_rss()  # from here VmHWM is the peak while reconstructing (set-up data still resident)
    t0 = time.perf_counter()
    try:
        res = reconstruct(physics, y, prior, method, sigma_y=sigma_y, seed=seed, **options)
    except SamplerDivergence as err:
        if steps is None:
            raise
        # a memory/time run with a few steps only (DiffusionMBIR at 2 levels returns values of ~±300 and raises):
        # its peak memory and time are still what it is run for
        return {"method": label, "size": size, "seconds": time.perf_counter() - t0, "steps_override": steps,
                "diverged": str(err),
                "peak_rss_MiB": max(setup_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "threads": torch.get_num_threads(),
                **({"rss_after_setup_MiB": setup_mib, "peak_rss_reconstructing_MiB": _rss_mib("VmHWM")}
                   if reset else {})}
    seconds = time.perf_counter() - t0
    rec = res.x[0, 0].double().numpy()
    # the reset also clears ru_maxrss: the whole process's peak is the larger of the set-up's and the run's
    peak = max(setup_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"method": label, "size": size if task != "mri-anatomical" else list(shape), "seconds": seconds,
            "nfe_per_slice": res.info.get("denoiser_calls",
            res.nfe), "peak_rss_MiB": peak, "threads": torch.get_num_threads(),
            **({"rss_after_setup_MiB": setup_mib, "peak_rss_reconstructing_MiB": _rss_mib("VmHWM")} if reset else {}),
            **({"steps_override": steps} if steps is not None else {}),
            **({"memory_budget": max_memory} if max_memory is not None else {}), **plane_metrics(rec, ref)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["ct", "mri", "mri-anatomical"], default="ct",
                        help="mri: MNI152 at --size³; mri-anatomical: nibabel's anatomical.nii at 24 × 48 × 40 "
                             "(--size ignored), a brain the MRI prior never saw")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--views", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", help="method labels (substring match)")
    parser.add_argument("--steps", type=int, help="override every method's steps (memory / time-growth runs)")
    parser.add_argument("--max-memory", type=float, help="memory budget per network call in bytes (volume methods)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.method:
        print(json.dumps(run_one(args.task, args.size, args.views, args.method, args.seed, args.steps,
                                 args.max_memory)))
        return
    rows = []
    for label in METHODS:
        if args.only and not any(s in label for s in args.only):
            continue
        if args.task == "ct" and "MRI" in label:
            continue
        cmd = [sys.executable, __file__, "--task", args.task, "--size", str(args.size), "--views", str(args.views),
               "--seed", str(args.seed), "--threads", str(args.threads), "--method", label]
        cmd += ["--steps", str(args.steps)] if args.steps is not None else []
        cmd += ["--max-memory", str(args.max_memory)] if args.max_memory is not None else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        rows.append(row)
        if "diverged" in row:
            print(f"{label:38s} {row['diverged']}; {row['seconds']:.0f} s, peak {row['peak_rss_MiB']:.0f} MiB "
                  f"(reconstructing: {row.get('peak_rss_reconstructing_MiB')} MiB)", flush=True)
            continue
        print(f"{label:38s} axial {row['axial']['psnr']:.2f} coronal {row['coronal']['psnr']:.2f} sagittal "
              f"{row['sagittal']['psnr']:.2f} dB, {row['seconds']:.0f} s, NFE/slice {row['nfe_per_slice']}, "
              f"peak {row['peak_rss_MiB']:.0f} MiB (reconstructing: {row.get('peak_rss_reconstructing_MiB')} MiB)",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"task": args.task, "size": args.size, "views": args.views,
                                               "threads": args.threads, "steps_override": args.steps,
                                               "command": shlex.join(["python", "benchmarks/bench_volumes.py",
                                                                      *sys.argv[1:]]),
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
