"""Every sampler against the exact posterior of a Gaussian-mixture prior: bias table for the docs.

    python benchmarks/bench_samplers_exact.py --json benchmarks/samplers_exact.json

Problems (the same as ``tests/test_samplers_smc.py``, whose metric helpers this script reuses so the numbers
in the docs and the pinned test values are measured the same way): ``GaussianMixturePrior.random((1, 4, 4), 3,
seed=0)`` (d = 16, full covariances), σ_y = 0.1, (a) ``Inpainting`` with 50 % random missing pixels, (b) a dense
8 × 16 Gaussian projection. Each run carries 4 replicas of the same ``y`` in one batched call; metrics are
averaged over them: ``err`` = ‖x̄ − m‖/‖s‖ (posterior-mean error in units of the exact posterior std ``s``),
``std ratio`` = mean over pixels of std/s, ``SW`` = sliced 2-Wasserstein distance (coordinates divided by ``s``)
to 8192 exact posterior samples; the ``floor`` rows are ``P`` exact posterior samples measured the same way.
Bimodal: ``bimodal_inpainting_example((1, 6, 6), sigma_y=0.1)`` (exact mode weights 0.3 / 0.7), TV error of the
mode weights (each particle labelled by the nearer component mean on the unobserved pixels), 4 replicas.
RED-diff is a mode seeker with one estimate per run: its ``err`` is that of the estimate; its bimodal row
labels 64 independent runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_samplers_smc import (  # the tests' metric helpers: one definition of each metric
    REPLICAS,
    SIGMA_Y,
    make_problem,
    noise_floor,
    smc_metrics,
)

from recon.priors.gaussian import bimodal_inpainting_example
from recon.samplers import reconstruct

# (label, method, steps, options); particles are set per row
METHODS = [
    ("SMC (AFDPS weights, exact scheme)", "smc", 50, {"weighting": "afdps"}),
    ("SMC (TDS twisted proposal)", "smc", 100, {"weighting": "tds"}),
    ("DPS ζ′ = 1 (paper)", "dps", 100, {"zeta": 1.0}),
    ("DPS ζ′ = 0.3", "dps", 100, {"zeta": 0.3}),
    ("deepinv DPS (same prior)", "deepinv-dps", 100, {}),
    ("deepinv DiffPIR (same prior)", "deepinv-diffpir", 100, {}),
    ("RED-diff (official defaults)", "red-diff", 100, {}),
]


def _mode_weight_tv(res, prior, post, hole, items) -> float:
    tvs = []
    for b in items:
        x = res.samples[:, b][:, hole] if res.samples is not None else res.x[b : b + 1][:, hole]
        w = res.weights[:, b] if res.weights is not None else torch.ones(1, dtype=x.dtype)
        dist = torch.stack([((x - mu[hole]) ** 2).sum(1) for mu in prior.means], 1)
        tvs.append(abs(float(w[dist.argmin(1) == 0].sum()) - float(post.weights[0])))
    return sum(tvs) / len(tvs)


def bimodal(method: str, steps: int, options: dict, particles: int) -> float:
    prior, physics, y, sy = bimodal_inpainting_example((1, 6, 6), sigma_y=0.1)
    post = prior.posterior(physics, y, sy)
    hole = physics.mask[0].expand(1, 6, 6) == 0
    if method == "red-diff":  # one estimate per run: 64 independent runs as 64 batch items
        res = reconstruct(physics, y.repeat(64, 1, 1, 1), prior, method, sigma_y=sy, seed=3, steps=steps, **options)
        x = res.x[:, hole]
        dist = torch.stack([((x - mu[hole]) ** 2).sum(1) for mu in prior.means], 1)
        return abs(float((dist.argmin(1) == 0).double().mean()) - float(post.weights[0]))
    res = reconstruct(physics, y.repeat(REPLICAS, 1, 1, 1), prior, method, sigma_y=sy, seed=3, steps=steps,
                      particles=particles, **options)
    return _mode_weight_tv(res, prior, post, hole, range(REPLICAS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--particles", type=int, nargs="+", default=[16, 128, 1024])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for kind in ("inpaint", "proj"):
        prior, physics, y = make_problem(kind)
        post = prior.posterior(physics, y, SIGMA_Y)
        ref = post.sample(8192, generator=torch.Generator().manual_seed(1)).flatten(1)
        yb = y.repeat(REPLICAS, *([1] * (y.dim() - 1)))
        for p in args.particles:
            err_floor, sw_floor = noise_floor(post, ref, p)
            rows.append({"problem": kind, "method": f"{p} exact posterior samples (floor)", "P": p, "steps": 0,
                         "err": err_floor, "ratio": 1.0, "sw": sw_floor, "seconds": 0.0})
        for label, method, steps, options in METHODS:
            counts = [1] if method == "red-diff" else (args.particles if method == "smc" else args.particles[-1:])
            for p in counts:
                t0 = time.perf_counter()
                res = reconstruct(physics, yb, prior, method, sigma_y=SIGMA_Y, seed=3, steps=steps, particles=p,
                                  **options)
                seconds = time.perf_counter() - t0
                if res.samples is None:
                    m, s = post.mean.flatten(), post.std.flatten()
                    err = sum(float((res.x[b].flatten() - m).norm() / s.norm()) for b in range(REPLICAS)) / REPLICAS
                    ratio = sw = float("nan")
                else:
                    err, ratio, sw = smc_metrics(res, post, ref)
                rows.append({"problem": kind, "method": label, "P": p, "steps": steps, "err": err, "ratio": ratio,
                             "sw": sw, "seconds": seconds, "nfe": res.nfe})
                print(f"{kind:8s} {label:36s} P={p:5d} err {err:.3f} std ratio {ratio:.3f} SW {sw:.3f} "
                      f"({seconds:.1f} s)", flush=True)
    modes = []
    p_big = args.particles[-1]
    for label, method, steps, options in METHODS:
        tv = bimodal(method, steps, options, p_big)
        modes.append({"method": label, "tv": tv, "particles": 64 if method == "red-diff" else p_big})
        print(f"bimodal {label:36s} TV {tv:.3f}", flush=True)
    prior, physics, y, sy = bimodal_inpainting_example((1, 6, 6), sigma_y=0.1)
    post = prior.posterior(physics, y, sy)
    hole = physics.mask[0].expand(1, 6, 6) == 0
    exact = post.sample(p_big * REPLICAS, generator=torch.Generator().manual_seed(5)).reshape(REPLICAS, p_big, -1)
    dist = torch.stack([((exact[..., hole.flatten()] - mu[hole]) ** 2).sum(-1) for mu in prior.means], -1)
    tv_floor = float(((dist.argmin(-1) == 0).double().mean(1) - float(post.weights[0])).abs().mean())
    modes.append({"method": f"{p_big} exact posterior samples (floor)", "tv": tv_floor, "particles": p_big})
    print(f"bimodal exact samples floor TV {tv_floor:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bimodal": modes}, indent=1))


if __name__ == "__main__":
    main()
