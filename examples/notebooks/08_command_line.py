# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 8 · From the command line: `recon info`, `simulate`, `reconstruct`
#
# Notebook 1 as shell commands, working on files: inspect a DICOM file, simulate a sparse-view low-dose scan into a
# self-describing measurement file, reconstruct it with several methods, and read the JSON reports back in
# Python. Each command here runs in a subprocess, exactly as you would type it in a terminal (the `$ …` lines
# below are the commands as run).
#
# **How these results were obtained.** The input is pydicom's `CT_small.dcm`, a real 128² CT slice and the one
# `recon demo` uses. **It is in the built-in CT prior's training data**, so the diffusion numbers here are
# optimistic. Notebook 1 uses a held-out slice. The scan has 30 views and Beer–Lambert noise at 10⁵ photons per
# detector element, seed 0, and the samplers use 20–50 steps.

# %%
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

with warnings.catch_warnings():  # tqdm's notebook progress bars need ipywidgets, which this notebook does not use
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

import matplotlib.pyplot as plt
import numpy as np
import torch
import yaml
from IPython.display import Markdown, display
from pydicom.data import get_testdata_file

import recon
from recon.datasets import read_image

torch.set_num_threads(int(os.environ.get("RECON_NOTEBOOK_THREADS", "2")))
plt.rcParams.update({"figure.dpi": 72, "image.cmap": "gray", "axes.titlesize": 10})
print(f"recon {recon.__version__}, torch {torch.__version__}, CPU threads: {torch.get_num_threads()}")

# %% [markdown]
# `pip install -e .` puts a `recon` command on the PATH, next to the Python that installed it. (`python -m recon`
# does not work: the package has no `__main__` module.) A small helper runs a command in a scratch folder, with
# the same number of CPU threads as this notebook, and returns what it printed.

# %%
RECON = shutil.which("recon") or str(Path(sys.executable).with_name("recon"))
work = Path(tempfile.mkdtemp(prefix="recon-cli-"))
shutil.copy(get_testdata_file("CT_small.dcm"), work / "CT_small.dcm")
env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def run(command: str, check: bool = True) -> subprocess.CompletedProcess:
    print(f"$ recon {command}")
    out = subprocess.run([RECON, *shlex.split(command)], cwd=work, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"exit status {out.returncode}: {out.stderr.strip()}")
    return out


print(run("--version").stdout.strip())

# %% [markdown]
# ## `recon info`: what a file holds
#
# It reads the file and reports the modality, shape `(D, H, W)`, spacing in mm, orientation and value range. With
# `--json` the summary is machine-readable. It never writes anything, and it prints no patient data.

# %%
info = json.loads(run("info -i CT_small.dcm --json").stdout)
print(json.dumps({k: info[k] for k in ("modality", "unit", "shape", "spacing_mm", "value_range")}, indent=1))

# %% [markdown]
# ## `recon simulate`: a sparse-view, low-dose scan
#
# The image in HU becomes linear attenuation, then 30 parallel-beam views with Beer–Lambert (Poisson) noise at
# 10⁵ photons per detector element. The `.npz` file holds the post-log sinogram, the geometry, the noise model
# and everything else needed to rebuild the operator exactly, and nothing identifying.

# %%
summary = json.loads(run("simulate -i CT_small.dcm -o meas.npz --task sparse-view-ct --views 30 --photons 1e5 "
                         "--seed 0 --json").stdout)
print(json.dumps({k: summary[k] for k in ("task", "img_size", "spacing_mm", "measurement_shape", "noise")},
                 indent=1))

# %% [markdown]
# ## `recon reconstruct`: one command per method
#
# Each run writes the reconstruction (here NIfTI), a preview PNG, a `*.report.json`, a `*.provenance.json` and
# the resolved `*.config.yaml`, plus a standard-deviation map where the method has one. `--reference` gives the
# ground truth for PSNR/SSIM and the error panel. Sampler options go through `--set options.NAME=VALUE`. As in
# notebook 1: DPS with ζ′ = 2, and SMC with AFDPS weights (its default TDS weights collapse on CT).

# %%
commands = {
    "FBP": "--method analytic",
    "TV": "--method tv",
    "DPS (50 steps)": "--method dps --steps 50 --set options.zeta=2",
    "SMC (4 particles, 20 steps)": "--method smc --particles 4 --steps 20 --set options.weighting=afdps",
    "DDS (30 steps)": "--method dds --steps 30",
}
reports = {}
for label, options in commands.items():
    name = label.split(" (")[0].lower()
    out = run(f"reconstruct -i meas.npz -o {name}.nii.gz {options} --reference CT_small.dcm --seed 0 --json")
    reports[label] = json.loads(out.stdout)

# %% [markdown]
# ## Reading the reports in Python
#
# The report is the same dictionary that `--json` prints on stdout. It holds `psnr` and `ssim` on the
# [−1000, 1000] HU window (with `--reference`), the same for the analytic inverse (`analytic`), `data_residual`,
# `nfe`, `seconds`, `steps`, `particles`, and the paths of every output.

# %%
rows = ["| method | PSNR (dB) | SSIM | data residual | NFE | seconds |", "|---|---|---|---|---|---|"]
for label, r in reports.items():
    rows.append(f"| {label} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['data_residual']:.2f} | {r['nfe']} | "
                f"{r['seconds']:.1f} |")
display(Markdown("\n".join(rows)))
r = reports["SMC (4 particles, 20 steps)"]
print("outputs of the SMC run:", {k: Path(v).name for k, v in r["outputs"].items()})
print("last diagnostics:", r["diagnostics_last"])

# %% [markdown]
# Every run writes `*.preview.png` with the reference, the analytic inverse, the reconstruction and the error
# (the error on its own scale). Here is the DPS one:

# %%
preview = plt.imread(work / reports["DPS (50 steps)"]["outputs"]["preview"])  # paths as given, relative to the cwd
fig, ax = plt.subplots(figsize=(9, 2.6), layout="constrained")
ax.imshow(preview, cmap="gray")
ax.set_title("dps.preview.png: reference · analytic · reconstruction · |error|")
ax.axis("off")
plt.show()

# %% [markdown]
# The outputs keep the input's geometry. `read_image` reads the NIfTI files back in HU with their affine, which is
# how we compare the SMC reconstruction, its standard-deviation map (`smc.std.nii.gz`) and its error:

# %%
ref = read_image(work / "CT_small.dcm")
smc = read_image(work / reports["SMC (4 particles, 20 steps)"]["outputs"]["image"])
std = read_image(work / reports["SMC (4 particles, 20 steps)"]["outputs"]["std"])
print(f"reconstruction {smc.shape}, spacing {tuple(round(s, 3) for s in smc.spacing)} mm (input "
      f"{tuple(round(s, 3) for s in ref.spacing)} mm); affines equal: {np.allclose(smc.affine, ref.affine)}")
fig, ax = plt.subplots(1, 3, figsize=(7.5, 2.4), layout="constrained")
ax[0].imshow(smc.array[0], vmin=-160, vmax=240)
ax[0].set_title("SMC (HU, 40 ± 200)")
im = ax[1].imshow(np.abs(smc.array[0] - ref.array[0].clip(-1000, None)), cmap="magma", vmin=0, vmax=200)
ax[1].set_title("|error| (HU)")
fig.colorbar(im, ax=ax[1])
im = ax[2].imshow(std.array[0], cmap="magma")
ax[2].set_title("std map (HU)")
fig.colorbar(im, ax=ax[2])
for a in ax:
    a.set_xticks([])
    a.set_yticks([])
plt.show()

# %% [markdown]
# The error is taken against the reference clipped at −1000 HU: outside the scan circle the file stores lower
# values, which no scan measures. As in notebook 1, the std map is far smaller than the error: a few particles
# measure the sampler's spread under the model, not the prior's own error.
#
# ## Uncertainty maps: `--uncertainty`
#
# `--uncertainty 0.9` writes, next to the reconstruction, the standard-deviation map of the samples, the bounds of
# the central 90 % interval and the null-space map `x − A⁺A x`: the part of the image the 30 views cannot see,
# i.e. what the prior supplied. Without `--method` it runs 16 independent runs of the recommended method (the TV
# hybrid on CT; the report says `method: ensemble`, `base: hybrid`): the reconstruction is their mean, the maps
# their spread. `default-ct` ships a calibration fitted for exactly that run on sparse-view CT (on tuning slices no
# benchmark reports): the intervals are `mean ± c·std` with its factor, and the report's `calibration` says whether
# it applied and why.

# %%
out = run("reconstruct -i meas.npz -o ens.nii.gz --uncertainty 0.9 --reference CT_small.dcm --seed 0 --json")
ens = json.loads(out.stdout)
u = ens["uncertainty"]
print(f"{ens['method']} of {ens['base']}, {ens['particles']} runs, {ens['nfe']} network evaluations")
print({k: ens["outputs"][k] for k in ("std", "lower", "upper", "null_space")})
print(f"calibration: {u['calibration']} (factor {u['calibration_factor']})")
print(f"PSNR {ens['psnr']:.2f} dB; mean std in the body {u['mean_std_body']:.1f} HU, mean 90 % interval width "
      f"{u['mean_interval_width_body']:.1f} HU, null-space energy {u['null_space_energy']:.1%} of the image")
maps = {k: read_image(work / ens["outputs"][k]).array[0] for k in ("image", "std", "lower", "upper", "null_space")}
truth = ref.array[0].clip(-1000, None)
inside = (maps["lower"] <= truth) & (truth <= maps["upper"])
print(f"pixels inside their 90 % interval: {inside.mean():.1%} (16 runs, the prior's calibration)")
fig, ax = plt.subplots(1, 4, figsize=(10, 2.6), layout="constrained")
panels = [("ensemble mean (40 ± 200 HU)", maps["image"], dict(vmin=-160, vmax=240, cmap="gray")),
          ("|error| (HU)", np.abs(maps["image"] - truth), dict(vmin=0, vmax=150, cmap="magma")),
          ("std (HU)", maps["std"], dict(vmin=0, vmax=25, cmap="magma")),
          ("null space: what the prior supplied (HU)", maps["null_space"], dict(vmin=-150, vmax=150, cmap="RdBu_r"))]
for a, (title, img, kw) in zip(ax, panels, strict=True):
    im = a.imshow(img, **kw)
    a.set_title(title, fontsize=8)
    a.set_xticks([])
    a.set_yticks([])
    fig.colorbar(im, ax=a, shrink=0.8)
plt.show()

# %% [markdown]
# **How far to trust these maps** (`benchmarks/README.md`, "Calibration" and "The calibration `default-ct` ships":
# held-out head CT and MRI, 16 samples):
#
# - *The std map ranks the error on sparse-view CT* (Spearman 0.64–0.70 inside the head): where it is bright, the
#   error tends to be large (limited angle: 0.63–0.78). On undersampled MRI it ranks the error only weakly (0.18–0.41
#   for the hybrid's runs, which `--uncertainty` runs on MRI since TV has nothing to sample): the MRI std varies so
#   little across the head that even perfectly calibrated errors would rank at only 0.34–0.50.
# - *Its raw scale is far too small*: the 16 runs agree with each other more than with the truth (uncalibrated 90 %
#   intervals cover 30–35 % of the head's pixels). The shipped factor (c = 8.93 sample stds) brings the held-out
#   head CT to 88.6–91.5 % inside the head. It holds for the run it was fitted for (ensemble of 16 hybrid runs of 50
#   steps, sparse-view CT, these weights) *and for images like the head CT it was fitted on*: this slice is a spine,
#   and the printed coverage above is below nominal. Limited-angle CT, MRI slices, MRI volumes and the image tasks
#   (blur, inpainting, super-resolution) have their own shipped factors (held-out coverage 85–91 %, 82–96 %, 84–96 %
#   and 75–99.7 %: mostly in the 85–95 % band, not always). For other anatomy, tasks or settings fit your own on
#   reference studies like yours: `recon calibrate -i REFERENCES -o calib.json --task …`, then
#   `--calibration calib.json`.
# - *The null-space map is exact for the operator* (no sampling involved): it shows which structures the
#   measurements could not have produced. It is not an error estimate: a prior can supply the right structure.
# - A particle method whose weights collapse (FPS and SMC on CT end with 1–5 effective particles of 16) is reported
#   as `degenerate` with a warning in the report; its spread is then not an uncertainty.

# %% [markdown]
# ## Provenance and configuration
#
# `*.provenance.json` records the software versions, the configuration, the task, the noise, the sampler's
# settings, the checksums of the prior and the inputs, and the timings. It records no paths and no names.
# `*.config.yaml` is the resolved configuration; `recon reconstruct --config` reads it back.

# %%
prov = json.loads((work / reports["DPS (50 steps)"]["outputs"]["provenance"]).read_text())
print("provenance keys:", list(prov))
print("versions:", prov["versions"])
print("sampler:", {k: prov["sampler_info"][k] for k in ("method", "steps", "nfe", "options")})
config = yaml.safe_load((work / reports["DPS (50 steps)"]["outputs"]["config"]).read_text())
print("config.yaml:", config)

# %% [markdown]
# ## When something is wrong
#
# A bad input gives a one-line error that names the file, and exit status 2. Outputs are never overwritten
# without `--overwrite`.

# %%
for command in ("reconstruct -i missing.npz -o x.nii.gz", "reconstruct -i meas.npz -o dps.nii.gz --method dps"):
    out = run(command, check=False)
    print(f"  exit status {out.returncode}: {out.stderr.strip()}")

# %% [markdown]
# ## The same in Python
#
# Each command is one function call: `recon.pipeline.describe(path)`, `recon.pipeline.simulate_file(input, output,
# task, ...)` and `recon.pipeline.reconstruct_file(input, output, method=..., ...)`. They return the dictionaries
# printed above. `recon demo` runs FBP and the recommended CT method (the TV hybrid) on this scan in one command.
#
# ## What this notebook does not show
#
# - **A held-out image.** `CT_small.dcm` is in the CT prior's training data (notebook 1 uses a held-out head CT).
# - **DICOM output and series folders.** `-o FOLDER --format dicom` writes a derived series next to the input's,
#   `--anonymize` de-identifies it, and `recon info` on a folder lists its series.
# - **Volumes, checkpoints and memory budgets** (`--method dds --checkpoint … --resume`, `--max-memory`): see
#   notebook 4 and the README.
