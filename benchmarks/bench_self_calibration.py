"""Can a reconstruction calibrate its own intervals? A parametric bootstrap against the factor each case needs.

The factor a prior ships (``bench_builtin_calibration.py``) is one number for every image of a task; the factor a
single held-out case needs varies from case to case (MRI: 4.0 to 7.0 in ``mri_spread.json``; the trunk needs more
than the head). This experiment asks whether the measurement itself can tell that factor, with no reference images:

1. reconstruct the case as ``recon reconstruct --uncertainty`` does (16 hybrid runs): mean ``x̄``, std ``s``;
2. take one of its samples ``x*`` as a stand-in for the truth (under a calibrated posterior the truth is distributed
   like a sample), simulate the same acquisition on it (same operator and mask, the same noise model, a fresh noise
   draw) and reconstruct that the same way: ``x̄*``, ``s*``;
3. the bootstrap factor ``c*`` is the 90 % conformal quantile of ``|x̄* − x*| / s*`` inside ``body_mask(x*)``.

Per case it records ``c*`` (also from the first 8 of the bootstrap's samples), the factor the case needs against
the truth (``c``, the same quantile of ``|x̄ − truth| / s`` inside the body), and the coverage of the truth by
``x̄ ± c*·s``. No tuning: nothing here is chosen from the results.

    python benchmarks/bench_self_calibration.py --task mri --json a.json
    python benchmarks/bench_self_calibration.py --task sparse-view-ct --images ct-body --json b.json   # not run yet
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_builtin_calibration import LEVEL, TASKS, _is_ct, write_slice
from bench_matrix import load_image

import recon.pipeline as pipeline
from recon.datasets import read_image
from recon.samplers.uncertainty import body_mask, conformal_factor, coverage
from recon.settings import Settings
from recon.tasks import from_domain, make_task, simulate


def _ensemble(meas, settings: Settings, path: Path):
    """The sampler's result (domain units) on ``meas`` exactly as ``reconstruct_in_memory`` runs it. That function
    simulates from one seed, which draws the MRI mask and the noise together; the bootstrap needs the same mask
    with fresh noise, hence the pipeline's steps here on a measurement made by ``simulate``."""
    dev = pipeline.resolve_device(settings.device)
    physics = pipeline._physics(meas, dev, None)
    meas.y = meas.y.to(dev)
    method = pipeline._resolve_method(settings.method, settings.options, physics, False, path, meas.spec.task)
    method, settings = pipeline._with_spread(method, settings, getattr(physics, "modality", None))
    return pipeline._domain_result(pipeline._run_method(meas, physics, method, settings, dev, None, None))


def _factor(mean: torch.Tensor, std: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    return conformal_factor(std, mean - truth, mask, coverage=LEVEL)


def run_case(path: Path, task: str, name: str, params: dict, noise: dict, seed: int) -> dict:
    s = Settings(task=task, task_params=params, seed=seed, uncertainty=LEVEL, prior=TASKS[task]["prior"], **noise)
    t0 = time.perf_counter()
    truth, result, _ = pipeline.reconstruct_in_memory(path, s)
    truth = truth.reshape(result.x.shape).double()
    mask = body_mask(truth.cpu()).reshape(truth.shape)
    x, std = result.x.double(), result.std.double()
    needed = _factor(x, std, truth, mask)

    image = read_image(path)
    spec = make_task(task, image.shape, image.spacing, seed=seed, **params)
    star = result.samples[0].double()  # one posterior sample stands in for the truth
    unit = "HU" if spec.is_ct else image.unit
    star_phys = from_domain(spec, star).reshape(image.shape)
    meas = simulate(spec, star_phys.float(), unit, seed=seed + 1000, geometry=None,
                    **{k: v for k, v in noise.items() if k in ("photons", "noise")})
    boot = _ensemble(meas, s, path)
    star = star.reshape(boot.x.shape)
    star_mask = body_mask(star.cpu()).reshape(star.shape)
    c_boot = _factor(boot.x.double(), boot.std.double(), star, star_mask)
    half = boot.samples[:8].double()
    c_boot8 = _factor(half.mean(0), half.std(0), star, star_mask)
    row = {"case": name, "image": path.name.split(".")[0], "task": task, **params, **noise, "seed": seed,
           "factor_needed": needed, "factor_bootstrap": c_boot, "factor_bootstrap_8": c_boot8,
           "seconds": time.perf_counter() - t0, "nfe": result.nfe + boot.nfe}
    for label, c in (("needed", needed), ("bootstrap", c_boot), ("bootstrap_8", c_boot8)):
        lo, hi = x - c * std, x + c * std
        row[f"coverage_body_{label}"] = coverage(lo, hi, truth, mask)
        row[f"coverage_image_{label}"] = coverage(lo, hi, truth)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="mri", choices=list(TASKS))
    parser.add_argument("--images", nargs="+")
    parser.add_argument("--cases", nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = TASKS[args.task]
    configs = {**spec["fit"], **spec["unseen"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for image in args.images or spec["report"]:
            values, spacing, _ = load_image(image, 128)
            path = Path(tmp) / f"{image}.nii.gz"
            write_slice(path, values, spacing[0])
            for seed in args.seeds:
                for name in args.cases or configs:
                    params, noise = configs[name]
                    rows.append(run_case(path, args.task, name, params, noise, seed))
                    if args.json:
                        Path(args.json).write_text(json.dumps({"level": LEVEL, "task": args.task, "ct": _is_ct(
                            args.task), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
