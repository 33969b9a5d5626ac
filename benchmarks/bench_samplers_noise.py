"""Noise-aware samplers (DiffPIR, DAPS, ΠGDM, the TV hybrid, noise-aware DDS): exact posteriors and a real CT.

    python benchmarks/bench_samplers_noise.py exact --json benchmarks/samplers_noise_exact.json
    python benchmarks/bench_samplers_noise.py ct --views 30 60 --json benchmarks/samplers_noise_ct.json

``exact``: the problems of ``tests/test_samplers_dps_reddiff.py`` (``GaussianMixturePrior.random((1, 8, 8), 2,
seed=3)``, σ_y = 0.05, 50 % random inpainting and a 24 × 64 Gaussian projection) and a large-noise version
(σ_y = 2); posterior-mean error ‖x̄ − m‖/‖m‖ of 256 samples against the exact posterior mean ``m``, next to the
error of the mean of 256 exact posterior samples (the Monte-Carlo floor) and of the prior mean.

``ct``: the held-out head CT ``693_UNCR.dcm`` (pydicom-data; excluded from the prior's training), whole field of
view block-averaged 512² → 128², parallel beam (1 mm pixels), Gaussian noise of 1 % of the sinogram's peak on the
line integrals of the normalised image (issue 16's setting), built-in CT prior. PSNR / SSIM on the prior's range
[-1, 1] and in the brain window [0, 80] HU (both images clipped to the window, data range 80 HU); TV with the
oracle weight (best of a grid of multiples of ``0.3 σ_y ‖A‖``, by full-range PSNR against the truth).
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

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# label -> (method, options)
CT_METHODS = {
    "DDS (γ = 0, before)": ("dds", {"steps": 50, "gamma": 0.0}),
    "DDS (noise-aware γ)": ("dds", {"steps": 50}),
    "DiffPIR (100 steps)": ("diffpir", {"steps": 100}),
    "DAPS (50 levels)": ("daps", {"steps": 50}),
    "ΠGDM (100 steps)": ("pigdm", {"steps": 100}),
    "hybrid (50 steps)": ("hybrid", {"steps": 50}),
    "DPS (100 steps, paper step: default)": ("dps", {"steps": 100}),
    "DPS (100 steps, discrepancy=True)": ("dps", {"steps": 100, "discrepancy": True}),
}
TV_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)  # multiples of λ0 = 0.3 σ_y ‖A‖ (sample_tv's noise rule)
BRAIN = (0.0, 80.0)


def head_ct(size: int = 128) -> np.ndarray:
    """The 693 head CT in HU, whole field of view block-averaged to ``size``²."""
    from pydicom.data import get_testdata_file

    from recon.datasets.slices import read_slices

    path = get_testdata_file("693_UNCR.dcm", download=False)
    if path is None:
        raise FileNotFoundError("693_UNCR.dcm not found: pip install pydicom-data")
    hu = next(read_slices(path))
    k = hu.shape[0] // size
    return hu[: k * size, : k * size].reshape(size, k, size, k).mean((1, 3))


def metrics(rec: torch.Tensor, ref: torch.Tensor, prior) -> dict:
    """PSNR / SSIM on [-1, 1] and in the brain window (HU)."""
    from skimage.metrics import peak_signal_noise_ratio as psnr
    from skimage.metrics import structural_similarity as ssim

    r, t = rec.clamp(-1, 1)[0, 0].double().numpy(), ref[0, 0].double().numpy()
    out = {"psnr": psnr(t, r, data_range=2.0), "ssim": ssim(t, r, data_range=2.0)}
    lo, hi = BRAIN
    rw = np.clip(prior.denormalize(rec.clamp(-1, 1))[0, 0].double().numpy(), lo, hi)
    tw = np.clip(prior.denormalize(ref)[0, 0].double().numpy(), lo, hi)
    out.update(psnr_brain=psnr(tw, rw, data_range=hi - lo), ssim_brain=ssim(tw, rw, data_range=hi - lo))
    return out


def ct_case(prior, views: int, seed: int = 0):
    from recon.operators import ParallelBeamCT

    ref = prior.normalize(torch.from_numpy(head_ct())).clamp(-1, 1).float()[None, None]
    physics = ParallelBeamCT((128, 128), angles=views)
    ax = physics.A(ref)
    sigma_y = 0.01 * float(ax.abs().max())
    y = ax + sigma_y * torch.randn(ax.shape, generator=torch.Generator().manual_seed(seed))
    return ref, physics, y, sigma_y


def run_ct(views_list, only, seed: int) -> list[dict]:
    from recon import reconstruct
    from recon.priors import load_prior
    from recon.samplers.base import operator_norm

    prior = load_prior("default-ct")
    rows = []
    for views in views_list:
        ref, physics, y, sigma_y = ct_case(prior, views, seed)
        chosen = {k: v for k, v in CT_METHODS.items() if not only or any(s in k for s in only)}
        runs = {"FBP": ("analytic", {}), **chosen}
        lam0 = 0.3 * sigma_y * operator_norm(physics, physics.A_adjoint(y))  # the ROF rule of sample_tv (0.3 σ_y ‖A‖)
        best = max(((f, metrics(reconstruct(physics, y, None, "tv", sigma_y=sigma_y, lam=f * lam0).x, ref, prior))
                    for f in TV_GRID), key=lambda fm: fm[1]["psnr"])
        rows.append({"views": views, "method": f"TV (oracle λ = {best[0]} × 0.3 σ_y‖A‖)", **best[1], "seconds": 0.0})
        for label, (method, opts) in runs.items():
            t0 = time.perf_counter()
            res = reconstruct(physics, y, prior if method != "analytic" else None, method, sigma_y=sigma_y, seed=seed,
                              **opts)
            rows.append({"views": views, "method": label, **metrics(res.x, ref, prior),
                         "seconds": time.perf_counter() - t0, "nfe": res.nfe})
        for r in rows[-len(runs) - 1:]:
            print(f"{views:3d} views {r['method']:34s} PSNR {r['psnr']:6.2f} SSIM {r['ssim']:.3f} | brain PSNR "
                  f"{r['psnr_brain']:6.2f} SSIM {r['ssim_brain']:.3f} | {r['seconds']:6.1f} s", flush=True)
    return rows


def exact_rows() -> list[dict]:
    from test_samplers_noise_aware import EXACT_RUNS, exact_errors

    rows = []
    for sigma_y in (0.05, 2.0):
        for kind in ("inpainting", "projection"):
            for label, (method, opts) in EXACT_RUNS.items():
                t0 = time.perf_counter()
                err, floor, prior_err = exact_errors(kind, method, opts, sigma_y)
                rows.append({"sigma_y": sigma_y, "problem": kind, "method": label, "err": err, "floor": floor,
                             "prior_mean_err": prior_err, "seconds": time.perf_counter() - t0})
                print(f"σ_y={sigma_y:<5} {kind:10s} {label:28s} err {err:.4f} (floor {floor:.4f}, prior mean "
                      f"{prior_err:.4f})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["exact", "ct"])
    parser.add_argument("--views", type=int, nargs="+", default=[30, 60])
    parser.add_argument("--only", nargs="+", help="CT: run only these method labels (substring match)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = exact_rows() if args.what == "exact" else run_ct(args.views, args.only, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
