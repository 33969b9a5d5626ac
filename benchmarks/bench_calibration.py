"""Is the posterior spread calibrated? Coverage, calibration curves, z-scores and conformal factors.

    python benchmarks/bench_calibration.py --modality mri --json benchmarks/calibration_mri.json
    python benchmarks/bench_calibration.py --modality ct --json benchmarks/calibration_ct.json
    python benchmarks/bench_calibration.py --gmm --json benchmarks/calibration_gmm.json
    python benchmarks/bench_calibration.py --cost --json benchmarks/calibration_cost_256.json
    python benchmarks/bench_calibration.py --modality mri --steps 25 --cases 4x --draws 0 1 --tsmc 80 \
        --only tempered --json benchmarks/calibration_mri_tsmc.json
    python benchmarks/bench_calibration.py --modality ct --steps 10 --cases "30 views" --draws 1 --tsmc 15 \
        --only tempered --json benchmarks/calibration_ct_tsmc.json

Real images (held out from the priors' training): the head CT ``693_UNCR.dcm`` (central 384² resized to 128²,
0.478 mm × 3 pixels) through ``sparse-view-ct`` with 30 and 60 views (1e5 photons) and a low-dose scan (90 views,
1e4 photons); ``MR_small.dcm`` (64², native) through single-coil ``mri`` at 4× and 8× (random 1D mask, Gaussian
noise 2 % of the k-space RMS). Measurements come from ``recon.tasks`` (``make_task``, ``simulate``,
``normalised_problem``) as ``recon simulate``/``recon reconstruct`` make them; everything is measured in the
prior's normalised units. Each case has noise draws (``--draws``, default 0 1 2; the CT run used 0 1 to fit the
CPU budget): the first is the *tuning* case (conformal factors are fitted on it), the others are reported.

Methods (K = 16 samples per case): ``ensemble`` of independent DDS runs (``recon.samplers.ensemble``,
``base="dds"``, one batched run of 16 chains), FPS (``recon.samplers.fps``, 16 particles; on CT only the 30-view
case: it collapses), and on MRI also the ensemble of DPS runs; ``--tsmc STAGES`` adds tempered SMC
(``recon.samplers.tsmc``, 16 particles, at most STAGES tempering stages, ``--tsmc-cess`` / ``--tsmc-moves``, one
NFE per move; ``--cases`` and ``--only`` select its rows; one draw alone is reported without a conformal fit).
Per case: PSNR of the mean; coverage of the
central 50/90/95 % intervals (predictive Student-t intervals ``mean ± t·s·sqrt(1 + 1/K)``, and empirical
quantiles at 90 %) over the image and inside the body (``body_mask``: threshold + largest component + filled
holes); calibration curve (nominal vs observed); z-score histogram; mean 90 % interval width; Spearman(std,
|err|) inside the body; ESS; NFE and seconds. Conformal: the factor ``c`` (``conformal_factor``, body pixels of
the tuning draw) applied to the reported draws.

Exact posteriors (``--gmm``): ``GaussianMixturePrior`` problems with closed-form posteriors: *isotropic Gaussian*
(N(0.3, 0.2 I), where the reverse kernel is exactly Gaussian), *unimodal* (one full-covariance Gaussian, 4×4, 50 %
pixel mask, σ_y = 0.1), *mixture* (3 components, as
``tests/test_samplers_smc.py``) and *bimodal* (``bimodal_inpainting_example`` 6×6, σ_y = 0.1, mode weights
0.3/0.7); P = 1024 particles/samples, 4 replicas (16 for tempered SMC on the bimodal problem; worst replica too):
posterior-mean error in units of the posterior std against the
floor of 1024 exact samples (target ≤ 1.5×), std ratio, mode-weight TV distance (target ≤ 0.05), network
evaluations per particle. Methods: FPS, SMC (TDS), tempered SMC (``recon.samplers.tsmc``), an ensemble of DPS.

One torch thread; the figures go to ``benchmarks/figures/calibration-<modality>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from recon.samplers import uncertainty as U

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
LEVELS = (0.5, 0.9, 0.95)
CURVE = [*np.round(np.arange(0.05, 0.951, 0.05), 2).tolist(), 0.99]
ZBINS = np.linspace(-6, 6, 49)
K = 16
DRAWS = (0, 1, 2)  # 0: tuning, 1-2: reported

CASES = {
    "ct": {
        "sparse-view 30 views": {"task": "sparse-view-ct", "views": 30, "photons": 1e5},
        "sparse-view 60 views": {"task": "sparse-view-ct", "views": 60, "photons": 1e5},
        "low dose (90 views, 1e4 photons)": {"task": "sparse-view-ct", "views": 90, "photons": 1e4},
    },
    "mri": {
        "4x": {"task": "mri", "acceleration": 4.0, "noise": 0.02},
        "8x": {"task": "mri", "acceleration": 8.0, "noise": 0.02},
    },
}


def methods_for(modality: str, steps: int, tsmc: dict | None = None) -> dict:
    """The methods of a real-image run; ``tsmc`` (``--tsmc``) adds tempered SMC with these options."""
    out = {
        f"ensemble of DDS (K={K}, {steps} steps)": ("ensemble", {"base": "dds", "steps": steps, "particles": K,
                                                               "per_run": K}),
        f"FPS ({K} particles, {steps} steps)": ("fps", {"steps": steps, "particles": K, "cg_iters": 20}),
    }
    if modality == "ct":  # the recommended CT method (recon.samplers.RECOMMENDED), at its default 50 steps
        out[f"ensemble of hybrid (K={K}, 50 steps)"] = ("ensemble", {"base": "hybrid", "steps": 50, "particles": K,
                                                                    "per_run": K})
    if modality == "mri":
        out[f"ensemble of DPS (K={K}, {2 * steps} steps)"] = ("ensemble", {"base": "dps", "steps": 2 * steps,
                                                                          "particles": K, "per_run": K})
    if tsmc is not None:
        label = (f"tempered SMC ({K} particles, {steps} prior steps, cess {tsmc['cess']:g}, "
                 f"≤ {tsmc['max_temperatures']} stages, σ {tsmc['sigma_target']:g})")
        out[label] = ("tempered-smc", {"steps": steps, "particles": K, **tsmc})
    return out


def load_image(modality: str):
    """(image in physical units (H, W), spacing (mm), unit)."""
    from pydicom.data import get_testdata_file

    from recon.datasets.slices import read_slices

    if modality == "ct":
        from skimage.transform import resize

        hu = next(read_slices(get_testdata_file("693_UNCR.dcm", download=False)))[64:448, 64:448]
        return resize(hu, (128, 128), anti_aliasing=True, preserve_range=True), (0.478516 * 3,) * 2, "HU"
    mr = np.abs(next(read_slices(get_testdata_file("MR_small.dcm", download=False))))
    return mr.astype(np.float64), (0.3125, 0.3125), None


def make_problem(modality: str, params: dict, image, spacing, unit, prior, draw: int):
    from recon.samplers.baselines import analytic_inverse
    from recon.tasks import make_task, normalised_problem, simulate, to_domain

    params = dict(params)
    task = params.pop("task")
    photons, noise = params.pop("photons", None), params.pop("noise", None)
    spec = make_task(task, image.shape, spacing, seed=0, **params)
    meas = simulate(spec, torch.from_numpy(image), unit, photons=photons, noise=noise, seed=1000 + draw)
    physics = meas.physics()
    with torch.no_grad():
        analytic = analytic_inverse(physics, meas.y)
    y_n, sigma_n, a, b = normalised_problem(meas, physics, prior, analytic)
    truth = a * to_domain(spec, torch.from_numpy(image).float()[None, None], unit) + b
    return physics, y_n.float(), float(sigma_n), truth.float()


def run_method(name: str, options: dict, physics, y, prior, sigma_y: float, seed: int):
    from recon.samplers.ensemble import sample_ensemble
    from recon.samplers.fps import sample_fps
    from recon.samplers.tsmc import sample_tsmc

    fn = {"ensemble": sample_ensemble, "fps": sample_fps, "tempered-smc": sample_tsmc}[name]
    g = torch.Generator().manual_seed(seed)
    nfe0, t0 = prior.nfe, time.perf_counter()
    res = fn(physics, y, prior, sigma_y=sigma_y, generator=g, **options)
    return res, prior.nfe - nfe0, time.perf_counter() - t0


def psnr(x, ref) -> float:
    mse = float((x - ref).pow(2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def case_metrics(res, truth, mask) -> dict:
    s, w = res.samples.float(), res.weights
    mean, std = res.x.float(), res.std.float()
    err = mean - truth
    row = {"psnr": psnr(mean, truth), "ess_final": res.info.get("ess_final"),
           "degenerate": bool(res.info.get("degenerate", False)), "warnings": res.info.get("warnings", [])}
    for region, m in (("image", None), ("body", mask)):
        for lv in LEVELS:
            row[f"coverage_{int(lv * 100)}_{region}"] = U.coverage(*U.interval_bounds(s, w, lv, "t"), truth, m)
        row[f"coverage_90_quantile_{region}"] = U.coverage(*U.interval_bounds(s, w, 0.9, "quantile"), truth, m)
        lo, hi = U.interval_bounds(s, w, 0.9, "t")
        row[f"width_90_{region}"] = float(U._masked(hi - lo, m).mean())
        row[f"curve_{region}"] = U.calibration_curve(s, truth, w, CURVE, m)[1].tolist()
        row[f"mean_std_{region}"] = float(U._masked(std, m).mean())
        row[f"rmse_{region}"] = float(U._masked(err, m).pow(2).mean().sqrt())
    z = U.zscores(mean, std, truth, mask).double().numpy()
    row["zscore_hist_body"] = np.histogram(np.clip(z, -6, 6), ZBINS)[0].tolist()
    row["zscore_std_body"] = float(np.std(z))
    row["spearman_body"] = U.spearman(std, err.abs(), mask)
    row["spearman_image"] = U.spearman(std, err.abs())
    return row, std, err


def conformal_rows(rows: list[dict], maps: dict) -> None:
    """Fit c on the tuning draw (body pixels) per (case, method, level); apply to the reported draws."""
    for r in rows:
        if r["tuning"]:
            continue
        tuning = next(d for (c, m, d), _ in maps.items() if c == r["case"] and m == r["method"])
        std_t, err_t, mask_t = maps[(r["case"], r["method"], tuning)]
        std, err, mask = maps[(r["case"], r["method"], r["draw"])]
        for lv in LEVELS:
            c = U.conformal_factor(std_t, err_t, mask_t, coverage=lv)
            r[f"conformal_factor_{int(lv * 100)}"] = c
            for region, m in (("image", None), ("body", mask)):
                inside = (err.abs() <= c * std)
                r[f"conformal_coverage_{int(lv * 100)}_{region}"] = float(U._masked(inside, m).double().mean())


def run_real(modality: str, steps: int, only: list[str] | None, draws: tuple[int, ...] = DRAWS,
             partial: Path | None = None, cases: list[str] | None = None, tsmc: dict | None = None) -> dict:
    from recon.priors import load_prior

    prior = load_prior("default-ct" if modality == "ct" else "default-mri")
    image, spacing, unit = load_image(modality)
    rows, maps = [], {}
    for case, params in CASES[modality].items():
        if cases and not any(c in case for c in cases):
            continue
        for draw in draws:
            physics, y, sigma_y, truth = make_problem(modality, params, image, spacing, unit, prior, draw)
            mask = U.body_mask(truth)
            for label, (name, options) in methods_for(modality, steps, tsmc).items():
                if only and not any(o in label for o in only):
                    continue
                if modality == "ct" and name == "fps" and "30" not in case:  # it collapses; one case shows it
                    continue
                res, nfe, sec = run_method(name, options, physics, y, prior, sigma_y, seed=draw)
                row, std, err = case_metrics(res, truth, mask)
                maps[(case, label, draw)] = (std, err, mask)
                row = {"case": case, "method": label, "draw": draw, "tuning": draw == draws[0], "nfe": nfe,
                       "seconds": sec, "sigma_y": sigma_y, "body_fraction": float(mask.float().mean()), **row}
                rows.append(row)
                print(f"{case:34s} {label:34s} draw {draw} PSNR {row['psnr']:5.2f} cov90 "
                      f"{row['coverage_90_image']:.3f}/{row['coverage_90_body']:.3f} rho {row['spearman_body']:.2f}"
                      f" ess {min(row['ess_final']):.1f} {sec:6.1f} s NFE {nfe}", flush=True)
                if partial is not None:  # a long run keeps what it has
                    partial.write_text(json.dumps({"partial": True, "rows": rows}, indent=1))
    conformal_rows(rows, maps)
    return {"modality": modality, "K": K, "steps": steps, "levels": LEVELS, "curve_levels": CURVE,
            "zbins": ZBINS.tolist(), "draws": {"tuning": draws[0], "reported": list(draws[1:])},
            "summary": summarise(rows), "rows": rows}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over the reported draws per (case, method)."""
    prefixes = ("coverage_", "conformal_", "width_", "spearman_", "psnr", "mean_std", "rmse", "zscore_std")
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith(prefixes)]
    out = []
    for case, method in dict.fromkeys((r["case"], r["method"]) for r in rows):
        rep = [r for r in rows if r["case"] == case and r["method"] == method and not r["tuning"]] or [
            r for r in rows if r["case"] == case and r["method"] == method]  # one draw: no conformal fit
        agg = {k: float(np.mean([r[k] for r in rep if k in r])) for k in keys if any(k in r for r in rep)}
        agg.update(nfe=float(np.mean([r["nfe"] for r in rep])), seconds=float(np.mean([r["seconds"] for r in rep])),
                   min_ess=float(min(min(r["ess_final"]) for r in rep)), degenerate=any(r["degenerate"] for r in rep))
        out.append({"case": case, "method": method, **agg})
    return out


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r["tuning"]]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(2, len(cases), figsize=(4.2 * len(cases), 7.5), squeeze=False)
    centres = 0.5 * (ZBINS[1:] + ZBINS[:-1])
    for j, case in enumerate(cases):
        ax, axz = axes[0, j], axes[1, j]
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for mi, method in enumerate(methods):
            rr = [r for r in rows if r["case"] == case and r["method"] == method]
            if not rr:
                continue
            col = f"C{mi}"
            ax.plot(CURVE, np.mean([r["curve_body"] for r in rr], 0), "-o", ms=3, color=col, label=method)
            ax.plot(CURVE, np.mean([r["curve_image"] for r in rr], 0), "--", color=col, lw=1)
            hist = np.sum([r["zscore_hist_body"] for r in rr], 0).astype(float)
            axz.step(centres, hist / hist.sum() / np.diff(ZBINS)[0], where="mid", color=col, label=method)
        grid = np.linspace(-6, 6, 200)
        axz.plot(grid, np.exp(-grid**2 / 2) / math.sqrt(2 * math.pi), "k:", lw=1, label="N(0, 1)")
        ax.set(title=f"{result['modality'].upper()} {case}", xlabel="nominal coverage", ylabel="observed coverage",
               xlim=(0, 1), ylim=(0, 1))
        axz.set(xlabel="z = (truth − mean) / std (body)", ylabel="density", yscale="log", ylim=(1e-4, 1))
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[1, 0].legend(fontsize=7, loc="lower center")
    fig.suptitle("solid: inside the body, dashed: whole image (reported draws)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# exact Gaussian-mixture posteriors
# ---------------------------------------------------------------------------------------------------------
def gmm_problems():
    from recon.operators.inpainting import Inpainting, random_pixel_mask
    from recon.priors.gaussian import GaussianMixturePrior, bimodal_inpainting_example

    out = {}
    iso = GaussianMixturePrior(torch.ones(1, dtype=torch.float64), torch.full((1, 1, 4, 4), 0.3, dtype=torch.float64),
                               0.2 * torch.ones(1, 16, dtype=torch.float64))
    for name, comps in (("isotropic Gaussian", iso), ("unimodal", 1), ("mixture (3 components)", 3)):
        prior = comps if isinstance(comps, GaussianMixturePrior) else GaussianMixturePrior.random((1, 4, 4), comps,
                                                                                                 seed=0)
        physics = Inpainting((4, 4), random_pixel_mask((4, 4), 0.5, seed=0))
        gen = torch.Generator().manual_seed(100)
        y = physics.A(prior.sample(1, generator=gen))
        y = y + 0.1 * torch.randn(y.shape, generator=gen, dtype=y.dtype)
        out[name] = (prior, physics, y, 0.1)
    prior, physics, y, sy = bimodal_inpainting_example((1, 6, 6), sigma_y=0.1)
    out["bimodal"] = (prior, physics, y, sy)
    return out


def gmm_metrics(res, prior, physics, post, replicas: int) -> dict:
    m, s = post.mean.flatten(), post.std.flatten()
    errs, ratios, tvs = [], [], []
    for b in range(replicas):
        x, w = res.samples[:, b].flatten(1).double(), res.weights[:, b].double()
        mean = (w[:, None] * x).sum(0)
        std = (w[:, None] * (x - mean) ** 2).sum(0).sqrt()
        errs.append(float((mean - m).norm() / s.norm()))
        ratios.append(float((std / s).mean()))
        if post.weights.numel() == 2:
            hole = (physics.mask[0].expand(res.samples.shape[2:]) == 0).flatten()
            dist = torch.stack([((x[:, hole] - mu.flatten()[hole]) ** 2).sum(1) for mu in prior.means], 1)
            tvs.append(abs(float(w[dist.argmin(1) == 0].sum()) - float(post.weights[0])))
    out = {"err": float(np.mean(errs)), "err_worst": float(max(errs)), "std_ratio": float(np.mean(ratios))}
    if tvs:
        out.update(mode_tv=float(np.mean(tvs)), mode_tv_worst=float(max(tvs)))
    return out


def gmm_floor(post, particles: int, replicas: int) -> float:
    """Mean posterior-mean error of ``particles`` exact posterior samples over ``replicas`` draws."""
    return float(np.mean([float((post.sample(particles, generator=torch.Generator().manual_seed(7 + r)).flatten(1)
                                 .mean(0) - post.mean.flatten()).norm() / post.std.flatten().norm())
                          for r in range(replicas)]))


def run_gmm(particles: int = 1024, replicas: int = 4, bimodal_replicas: int = 16) -> dict:
    from recon.samplers.ensemble import sample_ensemble
    from recon.samplers.fps import sample_fps
    from recon.samplers.smc import sample_smc
    from recon.samplers.tsmc import sample_tsmc

    methods = {
        "FPS (50 steps)": (sample_fps, {"steps": 50}),
        "FPS (200 steps)": (sample_fps, {"steps": 200}),
        "SMC TDS (100 steps)": (sample_smc, {"steps": 100, "weighting": "tds"}),
        "tempered SMC (100 prior steps)": (sample_tsmc, {"steps": 100}),
        "tempered SMC (100 prior steps, cess 0.998)": (sample_tsmc, {"steps": 100, "cess": 0.998}),
        "ensemble of DPS (50 steps)": (sample_ensemble, {"base": "dps", "steps": 50, "per_run": particles}),
    }
    rows = []
    for name, (prior, physics, y, sy) in gmm_problems().items():
        post = prior.posterior(physics, y, sy)
        for label, (fn, kw) in methods.items():
            if "cess" in label and name != "bimodal":
                continue
            # the bimodal tempered-SMC rows: 16 replicas (4 are too few to read its mode-weight noise)
            reps = bimodal_replicas if name == "bimodal" and label.startswith("tempered") else replicas
            floor = gmm_floor(post, particles, reps)
            yb = y.repeat(reps, *([1] * (y.dim() - 1)))
            t0, nfe0 = time.perf_counter(), prior.nfe
            res = fn(physics, yb, prior, sigma_y=sy, particles=particles, generator=torch.Generator().manual_seed(3),
                     **kw)
            row = {"problem": name, "method": label, "particles": particles, "replicas": reps, "err_floor": floor,
                   **gmm_metrics(res, prior, physics, post, reps), "seconds": time.perf_counter() - t0,
                   "nfe_per_particle": (prior.nfe - nfe0) / (particles * reps),
                   "ess_final": res.info.get("ess_final", res.info.get("final_ess"))}
            row["err_over_floor"] = row["err"] / row["err_floor"]
            rows.append(row)
            row["err_worst_over_floor"] = row["err_worst"] / row["err_floor"]
            print(f"{name:24s} {label:28s} err {row['err']:.3f} ({row['err_over_floor']:.2f}x floor) std ratio "
                  f"{row['std_ratio']:.3f} TV {row.get('mode_tv', float('nan')):.3f} {row['seconds']:.1f} s",
                  flush=True)
    return {"particles": particles, "replicas": replicas, "bimodal_tsmc_replicas": bimodal_replicas, "rows": rows}


def run_cost(size: int = 256, k: int = 4, steps: int = 2) -> dict:
    """Seconds per network evaluation of each method at ``size``² (60-view CT, ``k`` samples, ``steps`` steps)."""
    from recon.operators import ParallelBeamCT
    from recon.priors import load_prior
    from recon.samplers.ensemble import sample_ensemble
    from recon.samplers.fps import sample_fps

    prior = load_prior("default-ct")
    ct = ParallelBeamCT((size, size), angles=60)
    x = torch.zeros(1, 1, size, size)
    x[..., size // 4:3 * size // 4, size // 4:3 * size // 4] = 0.5
    y = ct.A(x)
    sy = 0.01 * float(y.pow(2).mean().sqrt())
    y = y + sy * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    out = {}
    for label, fn, kw in (("ensemble of DDS", sample_ensemble, {"base": "dds", "per_run": k}),
                          ("ensemble of DPS", sample_ensemble, {"base": "dps", "per_run": k}),
                          ("FPS (cg_iters 20)", sample_fps, {"cg_iters": 20})):
        n0, t0 = prior.nfe, time.perf_counter()
        fn(ct, y, prior, sigma_y=sy, steps=steps, particles=k, generator=torch.Generator().manual_seed(0), **kw)
        sec, nfe = time.perf_counter() - t0, prior.nfe - n0
        out[label] = {"seconds": sec, "nfe": nfe, "seconds_per_nfe": sec / nfe}
        print(label, out[label], flush=True)
    return {"note": f"{size}x{size} parallel-beam CT, 60 views, default-ct prior, {steps} steps x {k} samples per "
                    "method, 1 torch thread", "methods": out}


def markdown(result: dict) -> str:
    """The README tables of a result (real images: per case and method, mean over the reported draws)."""
    if "summary" not in result:
        lines = ["| problem | method | replicas | err / floor (mean) | worst err / floor | std ratio | mode TV (mean / "
                 "worst) | seconds | NFE / particle |", "|" + "---|" * 9]
        for r in result["rows"]:
            tv = f"{r['mode_tv']:.3f} / {r.get('mode_tv_worst', float('nan')):.3f}" if "mode_tv" in r else ""
            worst = r.get("err_worst", float("nan")) / r["err_floor"]
            lines.append(f"| {r['problem']} | {r['method']} | {r.get('replicas', result['replicas'])} | "
                         f"{r['err']:.3f} / {r['err_floor']:.3f} = {r['err_over_floor']:.2f}× | {worst:.2f}× | "
                         f"{r['std_ratio']:.2f} | {tv} | {r['seconds']:.1f} | "
                         f"{r.get('nfe_per_particle', float('nan')):.0f} |")
        return "\n".join(lines)
    result["summary"] = summarise(result["rows"])
    lines = ["| case | method | PSNR | cov. 50 / 90 / 95 % (image) | cov. 50 / 90 / 95 % (body) | 90 % quantile "
             "(body) | width 90 % (body) | Spearman (body) | min ESS | conformal c₉₀ | cov. 90 % calibrated "
             "(image / body) | NFE | s |", "|" + "---|" * 13]
    for r in result["summary"]:
        cov = " / ".join(f"{r[f'coverage_{lv}_image']:.3f}" for lv in (50, 90, 95))
        covb = " / ".join(f"{r[f'coverage_{lv}_body']:.3f}" for lv in (50, 90, 95))
        cal = (f"{r['conformal_coverage_90_image']:.3f} / {r['conformal_coverage_90_body']:.3f}"
               if "conformal_coverage_90_body" in r else "")
        c = f"{r['conformal_factor_90']:.2f}" if "conformal_factor_90" in r else ""
        lines.append(f"| {r['case']} | {r['method']} | {r['psnr']:.2f} | {cov} | {covb} | "
                     f"{r['coverage_90_quantile_body']:.3f} | {r['width_90_body']:.3f} | {r['spearman_body']:.2f} | "
                     f"{r['min_ess']:.1f} | {c} | {cal} | {r['nfe']:.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", choices=["ct", "mri"], default="mri")
    parser.add_argument("--gmm", action="store_true", help="the exact Gaussian-mixture posteriors instead")
    parser.add_argument("--cost", action="store_true", help="seconds per network evaluation at 256² instead")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--only", nargs="+", help="only methods whose label contains one of these")
    parser.add_argument("--draws", type=int, nargs="+", default=list(DRAWS),
                        help="noise draws; the first is the tuning draw (conformal fit), the others are reported")
    parser.add_argument("--cases", nargs="+", help="only cases whose name contains one of these")
    parser.add_argument("--tsmc", type=int, metavar="STAGES",
                        help="add tempered SMC (16 particles, at most STAGES tempering stages; use --only tempered)")
    parser.add_argument("--tsmc-cess", type=float, default=0.5, help="tempered SMC's conditional-ESS fraction")
    parser.add_argument("--tsmc-moves", type=int, default=1, help="tempered SMC's MALA moves per stage")
    parser.add_argument("--tsmc-sigma", type=float, default=0.01, help="tempered SMC's sigma_target")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--markdown", nargs="+", metavar="JSON", help="print the README tables of saved results")
    args = parser.parse_args()
    if args.markdown:
        for path in args.markdown:
            print(markdown(json.loads(Path(path).read_text())) + "\n")
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.cost:
        result = run_cost()
    elif args.gmm:
        result = run_gmm()
    else:
        partial = Path(args.json).with_suffix(".partial.json") if args.json else None
        tsmc = None if args.tsmc is None else {"max_temperatures": args.tsmc, "cess": args.tsmc_cess,
                                               "moves": args.tsmc_moves, "final_moves": 5, "quadrature": 0,
                                               "sigma_target": args.tsmc_sigma}
        result = run_real(args.modality, args.steps, args.only, tuple(args.draws), partial, args.cases, tsmc)
        if tsmc is None:  # the shipped figure shows the shipped rows
            figure(result, HERE / "figures" / f"calibration-{args.modality}.png")
    result["total_seconds"] = time.perf_counter() - t0
    result["threads"] = args.threads
    print(f"total {result['total_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
