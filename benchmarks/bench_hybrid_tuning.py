"""The TV hybrid's defaults (``anchor``, ``tv_weight = factor · ‖A‖/σ_y``) chosen on tuning images that no reported
benchmark uses: slices of the held-out InVesalius head-CT slab (``recon prepare-prior-data``), averaged to 128²,
sparse-view CT (30 and 60 views, 1e5 photons) and low dose (180 views, 1e4 photons), on the whitened problem as
``recon reconstruct`` runs it, against TV with its automatic (discrepancy) weight.

Rule, fixed before the run: the setting with the highest mean of (full-range PSNR + brain-window PSNR) / 2 over all
tuning cases; ``anchor`` ≥ 0.3 only (0.1 fits the noise on the exact σ_y = 2 check of ``docs/methods/hybrid.md``).
``--grid penalty`` holds ``anchor`` and the TV factor at the shipped values and varies the ADMM penalty as a fixed
share of ``‖A‖²`` instead (the rule before 2026-12-06), ``--grid penalty-rule`` as a multiple of ``σ_y‖A‖`` (the
hybrid's ``admm_penalty`` now), on the same rule; ``--tasks`` adds the well-measured cases (120 views at 1e5 photons,
180 views at 1e5) and Gaussian noise (``g0.2``, ``g2``: 0.2 / 2 % of the sinogram's peak, 60 views); ``--fields
crop`` adds the central 128² of each slice at its own 0.957 mm pixels (the brain filling the field, like
``bench_matrix.py``'s cropped head); ``--grid anchor-factor-2`` is the smaller grid re-run after the penalty
changed. ``--grid eta`` varies the re-noising η; ``--grid budget`` spends 50 network evaluations as 1 × 50, 2 × 25
or 4 × 12 averaged chains at η = 1, ``--grid chains`` averages 2 or 3 chains of 50 steps. ``--grid factor`` varies
the TV factor alone at the shipped anchor over the wider task set (the factor was chosen on 30/60 views and 1e4
photons only, before the well-measured cases joined the tuning set); on that grid a setting within ``TIE_DB``
(0.05 dB) of the shipped one loses to it (fixed before the run, as ``bench_hybrid_tuning_mri.py``'s rule).
``--grid symmetry`` runs the hybrid with the prior's own D4 average (``symmetry="d4"``, 8 network evaluations per
image), on the same rule and tie margin. (``--grid pose``, the hybrid's ``random_pose`` option, was measured at git
``93110b5`` and removed with the option: a tie.)

    python benchmarks/bench_hybrid_tuning.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \
        --json benchmarks/hybrid_tuning.json
    python benchmarks/bench_hybrid_tuning.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \
        --grid penalty --tasks sv30 sv60 ld1e4 sv120 ld1e5 --json benchmarks/hybrid_tuning_penalty.json
    python benchmarks/bench_hybrid_tuning.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \
        --grid anchor-factor-2 --fields full crop --json benchmarks/hybrid_tuning_2.json
    python benchmarks/bench_hybrid_tuning.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \
        --grid penalty-rule --tasks sv30 sv60 ld1e4 sv120 ld1e5 g0.2 g2 --fields full crop \
        --json benchmarks/hybrid_tuning_penalty_rule.json
    python benchmarks/bench_hybrid_tuning.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \
        --grid eta --tasks sv30 sv60 ld1e4 sv120 ld1e5 g0.2 g2 --fields full crop \
        --json benchmarks/hybrid_tuning_eta.json
    python benchmarks/bench_hybrid_tuning.py --slab prior-data/ct/held-out/invesalius_cranium_slab.nii.gz \
        --grid factor --tasks sv30 sv60 ld1e4 sv120 ld1e5 g0.2 g2 --fields full crop \
        --json benchmarks/hybrid_tuning_factor.json

``--slices`` splits a run over processes, ``--settings`` runs only some of the grid's entries (by index; e.g. to
add an entry to an earlier run); ``--merge A.json B.json --grid G --json OUT`` pools them and applies the rule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matrix import peak_noise

import recon
from recon.datasets import read_image
from recon.outputs import metrics
from recon.priors import load_prior
from recon.samplers.base import operator_norm
from recon.tasks import from_domain, make_task, normalised_problem, simulate, weighted_problem

# name -> (views, photons) for Beer–Lambert noise, or (views, Gaussian noise std relative to the sinogram's peak)
TASKS = {"sv30": (30, 1e5), "sv60": (60, 1e5), "ld1e4": (180, 1e4), "sv120": (120, 1e5), "ld1e5": (180, 1e5),
         "g0.2": (60, 0.002), "g2": (60, 0.02)}
GRIDS = {"anchor-factor": [{"anchor": a, "tv_factor": f} for a in (0.3, 1.0) for f in (0.025, 0.05, 0.1, 0.2)],
         "anchor-factor-2": [{"anchor": a, "tv_factor": f} for a in (0.3, 1.0) for f in (0.05, 0.1, 0.2)],
         "penalty": [{"penalty_share": p} for p in (0.0025, 0.005, 0.01, 0.025)],
         "penalty-rule": [{"admm_penalty": c} for c in (1.5, 3.0, 6.0)],
         "eta": [{"eta": e} for e in (0.0, 0.5, 0.85, 1.0)],
         "budget": [{"steps": s, "particles": p, "eta": 1.0} for s, p in ((50, 1), (25, 2), (12, 4))],
         "chains": [{"steps": 50, "particles": p, "eta": 1.0} for p in (2, 3)],
         "sigma-min": [{"sigma_min": s} for s in (0.002, 0.01, 0.03, 0.1)],
         "factor": [{"tv_factor": f} for f in (0.0125, 0.025, 0.05)],
         "symmetry": [{"prior_symmetry": p} for p in (None, "d4")]}
# the grids whose rule keeps the shipped value on a tie
SHIPPED = {"factor": {"tv_factor": 0.05}, "symmetry": {"prior_symmetry": None}}
TIE_DB = 0.05


def slice_128(volume: np.ndarray, index: int) -> np.ndarray:
    t = torch.from_numpy(volume[index].astype(np.float64))[None, None]
    return torch.nn.functional.avg_pool2d(t, 2)[0, 0].numpy() if t.shape[-1] >= 256 else t[0, 0].numpy()


def crop_128(volume: np.ndarray, index: int) -> np.ndarray:
    """The central 128² of a slice at its own pixel size (the brain, as ``bench_matrix.py``'s ``ct-head-crop``)."""
    sl = volume[index].astype(np.float64)
    h, w = sl.shape
    return sl[(h - 128) // 2:(h + 128) // 2, (w - 128) // 2:(w + 128) // 2]


FIELDS = {"full": slice_128, "crop": crop_128}


def tuning_problem(hu: np.ndarray, prior, task: str = "sparse-view-ct", photons: float | None = 1e5,
                   peak: float | None = None, **params):
    """``hu`` measured by ``task`` (seed 0) as ``recon reconstruct`` sees it: ``(spec, meas, physics_w, y_n,
    sigma_n, a, b)``, the whitened problem in the prior's normalised range. ``peak``: Gaussian noise of that
    fraction of the noiseless sinogram's peak instead of ``photons`` (as ``bench_matrix.py``'s ``g*`` tasks)."""
    spec = make_task(task, (1, *hu.shape), (1.0, 1.0, 1.0), **params)
    image = torch.from_numpy(hu).float()
    noise = None
    if peak is not None:
        noise, photons = peak_noise(spec, image, "HU", peak), None
    meas = simulate(spec, image, "HU", photons=photons, noise=noise, seed=0)
    physics, meas_w = weighted_problem(meas, meas.physics())
    return spec, meas, physics, *normalised_problem(meas_w, physics, prior)


def tuning_mean(rows: list[dict]) -> float:
    """The tuning rule's score: mean (full + brain-window PSNR) / 2 over ``rows``."""
    return float(np.mean([(r["psnr"] + r["brain_psnr"]) / 2 for r in rows]))


def tuning_scores(spec, x_n: torch.Tensor, a: float, b: float, hu: np.ndarray) -> dict:
    """PSNR / SSIM of a normalised reconstruction on the full range and in the brain window."""
    rec = from_domain(spec, (x_n.double() - b) / a)[0, 0].numpy()[None]
    m = metrics(rec, hu[None], True)
    return {"psnr": m["psnr"], "ssim": m["ssim"], "brain_psnr": m["brain"]["psnr"], "brain_ssim": m["brain"]["ssim"]}


def run_case(hu: np.ndarray, task: str, prior, label: dict, grid: list[dict]) -> list[dict]:
    views, level = TASKS[task]
    noise = {"peak": level} if task.startswith("g") else {"photons": level}
    spec, meas, physics, y_n, sigma_n, a, b = tuning_problem(hu, prior, views=views, **noise)
    norm = float(operator_norm(physics, torch.zeros(1, 1, *hu.shape)))
    rows = []

    def score(method: str, x_n: torch.Tensor, seconds: float, **extra) -> None:
        rows.append({**label, "task": task, "method": method, **tuning_scores(spec, x_n, a, b, hu),
                     "seconds": seconds, **extra})
        print(rows[-1], flush=True)

    t0 = time.perf_counter()
    raw = meas.physics()
    res = recon.reconstruct(raw, meas.y, None, method="tv", sigma_y=meas.sigma_y)  # tv's default: unweighted
    score("tv-auto", res.x * a + b, time.perf_counter() - t0)
    for setting in grid:
        options = dict(setting)
        if "tv_factor" in options:
            options["tv_weight"] = options.pop("tv_factor") * norm / sigma_n
        if "penalty_share" in options:  # γ + share·‖A‖² = γ + (share·‖A‖/σ_y)·σ_y‖A‖
            options["admm_penalty"] = options.pop("penalty_share") * norm / sigma_n
        prior.symmetry = options.pop("prior_symmetry", None)  # the prior's own averaging (8 NFE per image)
        t0 = time.perf_counter()
        res = recon.reconstruct(physics, y_n, prior, method="hybrid", sigma_y=sigma_n, seed=0, **options)
        prior.symmetry = None
        score("hybrid", res.x, time.perf_counter() - t0, nfe=res.nfe, **setting)
    return rows


def choose(rows: list[dict], grid: list[dict], shipped: dict | None = None) -> dict:
    """The rule of the module docstring: the best mean (full + window) / 2 PSNR over the tuning cases (settings
    without rows, e.g. left out by ``--settings``, are skipped); with ``shipped``, a best within ``TIE_DB`` of it
    keeps ``shipped``."""
    scored = []
    for setting in grid:
        rr = [r for r in rows if r["method"] == "hybrid" and all(r.get(k) == v for k, v in setting.items())]
        if rr:
            scored.append((setting, tuning_mean(rr)))
    best, best_mean = max(scored, key=lambda sm: sm[1])
    kept = [m for st, m in scored if st == shipped]
    if kept and best_mean - kept[0] < TIE_DB:
        best = shipped
    return {**best, "means": {"/".join(f"{k}={v}" for k, v in st.items()): m for st, m in scored}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slab", help="the held-out slab of `recon prepare-prior-data` (not with --merge)")
    parser.add_argument("--slices", type=int, nargs="+", default=[6, 18])
    parser.add_argument("--tasks", nargs="+", default=["sv30", "sv60", "ld1e4"], choices=list(TASKS))
    parser.add_argument("--grid", choices=list(GRIDS), default="anchor-factor")
    parser.add_argument("--fields", nargs="+", choices=list(FIELDS), default=["full"],
                        help="whole slices averaged to 128² (full) and/or their central 128² (crop)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--merge", nargs="+", help="pool the rows of these JSON files, apply the rule; no runs")
    parser.add_argument("--settings", type=int, nargs="+", help="run only these entries of the grid (0-based)")
    args = parser.parse_args()
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())["rows"]]
        return write(args.json, args.grid, rows)
    torch.set_num_threads(1)
    prior = load_prior("default-ct")
    if not args.slab or not Path(args.slab).is_file():
        parser.error(f"--slab: {args.slab!r} is not a file (the held-out slab of recon prepare-prior-data)")
    volume = read_image(args.slab).array
    grid = GRIDS[args.grid] if args.settings is None else [GRIDS[args.grid][i] for i in args.settings]
    rows = [r for f in args.fields for i in args.slices for t in args.tasks
            for r in run_case(FIELDS[f](volume, i), t, prior, {"slice": i, "field": f}, grid)]
    write(args.json, args.grid, rows)


def write(path: str | None, grid: str, rows: list[dict]) -> None:
    chosen = choose(rows, GRIDS[grid], SHIPPED.get(grid))
    print(chosen, flush=True)
    if path:
        with open(path, "w") as f:
            json.dump({"rule": "max mean (full + brain-window PSNR) / 2", "grid": grid, "chosen": chosen,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
