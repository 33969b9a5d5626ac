"""Seconds per 256² slice of the default CT method, as `recon reconstruct` runs it (whitened data, the shipped
prior): ``hybrid`` on 60-view sparse-view CT and on 90° limited angle (60 views), and ``pigdm`` (the limited-angle
default until 2026-12-06) on the same limited-angle case, the 693 head CT resized to 256²; ``hybrid-mri`` times the
hybrid with its MRI options on 4× single-coil MRI (1 % noise) of nibabel's ``anatomical.nii`` central axial slice
resized to 256² (what switching MRI's default to the hybrid would cost).

    python benchmarks/bench_default_time.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from pydicom.data import get_testdata_file
from skimage.transform import resize

import recon
from recon.datasets.slices import read_slices
from recon.priors import load_prior
from recon.samplers.baselines import analytic_inverse
from recon.tasks import make_task, normalised_problem, simulate, weighted_problem

LIMITED_ANGLE = ("limited-angle-ct", {"views": 60, "arc": 90.0})
CASES = {"hybrid": ("hybrid", ("sparse-view-ct", {"views": 60})), "hybrid-la": ("hybrid", LIMITED_ANGLE),
         "pigdm": ("pigdm", LIMITED_ANGLE), "hybrid-mri": ("hybrid", ("mri", {"acceleration": 4}))}


def case_image(task: str) -> tuple[np.ndarray, str | None, str, dict]:
    """``(256² image, unit, prior, noise settings)`` of a case: the 693 head CT or anatomical.nii's axial slice."""
    if task == "mri":
        import nibabel as nib
        from nibabel.testing import data_path

        vol = np.abs(nib.load(f"{data_path}/anatomical.nii").get_fdata())
        img = resize(vol[:, :, vol.shape[2] // 2], (256, 256), anti_aliasing=True, preserve_range=True)
        return img, None, "default-mri", {"noise": 0.01}
    path = get_testdata_file("693_UNCR.dcm", download=False)
    if path is None:
        raise SystemExit("693_UNCR.dcm not found: pip install pydicom-data")
    hu = resize(next(read_slices(path)).astype(np.float64), (256, 256), anti_aliasing=True, preserve_range=True)
    return hu, "HU", "default-ct", {"photons": 1e5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--particles", type=int, nargs="+", default=[1],
                        help="chains averaged per run (the hybrid's and ΠGDM's particles), one timing each")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for case in args.methods:
        method, (task, params) = CASES[case]
        img, unit, prior_name, noise = case_image(task)
        prior = load_prior(prior_name)
        spec = make_task(task, (1, 256, 256), (1.0, 0.96, 0.96), **params)
        meas = simulate(spec, torch.from_numpy(img).float(), unit, seed=0, **noise)
        physics, meas_w = weighted_problem(meas, meas.physics())
        analytic = analytic_inverse(physics, meas_w.y) if task == "mri" else None
        y_n, sigma_n, _, _ = normalised_problem(meas_w, physics, prior, analytic)
        for p in args.particles:
            t0 = time.perf_counter()
            res = recon.reconstruct(physics, y_n, prior, method=method, sigma_y=sigma_n, seed=0, particles=p)
            print(f"{method} {task} 256², {p} chain(s): {time.perf_counter() - t0:.1f} s, {res.nfe} NFE, "
                  f"{args.threads} thread(s)", flush=True)


if __name__ == "__main__":
    main()
