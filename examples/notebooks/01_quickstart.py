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
# # 1 · Quickstart: sparse-view CT of a real head slice
#
# A real CT slice read from a DICOM file goes through a simulated 30-view scan and comes back with six methods:
# filtered back-projection (FBP), total variation (TV), and four diffusion-prior samplers that all use the
# built-in CT prior: DPS, RED-diff, SMC and DDS. We compare them in a PSNR/SSIM table and in pictures, and we put
# SMC's standard-deviation map next to its error map.
#
# **How these results were obtained.** The slice is 96 × 96 (the central 384² of a 512² head CT, resized), with 30
# views and Gaussian noise of 1 % of the sinogram RMS. The samplers use 20–100 steps and seed 0 (the settings are
# in the table). Everything runs on the CPU in about a minute. This is one image at one noise level, so it is an
# example, not a benchmark. The measured numbers at 128² with 100 steps are in `benchmarks/README.md`.

# %%
import os
import time
import warnings

with warnings.catch_warnings():  # tqdm's notebook progress bars need ipywidgets, which this notebook does not use
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from pydicom.data import get_testdata_file
from skimage.transform import resize

import recon
from recon.datasets import read_image
from recon.operators import ParallelBeamCT
from recon.pipeline import metrics
from recon.priors import load_prior

torch.set_num_threads(int(os.environ.get("RECON_NOTEBOOK_THREADS", "2")))
plt.rcParams.update({"figure.dpi": 72, "image.cmap": "gray", "axes.titlesize": 10})
print(f"recon {recon.__version__}, torch {torch.__version__}, CPU threads: {torch.get_num_threads()}")

# %% [markdown]
# ## The data: a real CT slice from a DICOM file
#
# `693_UNCR.dcm` is a 512² head CT from the `pydicom-data` package. The built-in CT prior never saw it during
# training: its recipe leaves out every file whose name starts with `693_`. `recon.datasets.read_image` returns the
# pixels in physical units (HU) as a `(D, H, W)` array, with the geometry as an affine in mm.
#
# Outside its reconstruction circle the scanner stores −3024 HU. Air is −1000 HU, so we clip at −1000: a real
# scan would not have measured anything lower.

# %%
image = read_image(get_testdata_file("693_UNCR.dcm", download=False))
print(f"{image.modality}, shape {image.shape} (D, H, W), spacing {tuple(round(s, 3) for s in image.spacing)} mm, "
      f"unit {image.unit}, values {image.array.min():.0f} … {image.array.max():.0f}")

N = 96
crop = image.array[0, 64:448, 64:448].clip(-1000, None)  # central 384² (the skull), air floor
pixel_mm = 384 * image.spacing[-1] / N
hu = torch.from_numpy(resize(crop, (N, N), anti_aliasing=True, preserve_range=True)).float()[None, None]
print(f"working image: {tuple(hu.shape)} (B, C, H, W), {pixel_mm:.2f} mm pixels")

# %% [markdown]
# ## The prior and its intensity range
#
# `load_prior("default-ct")` loads a 1.3 M-parameter UNet that ships inside the package (nothing is downloaded).
# Its model card records how it was trained. The samplers work in the prior's normalised range:
# `prior.normalize` maps the HU window [−1000, 1500] to [−1, 1], and `prior.denormalize` maps back.

# %%
prior = load_prior("default-ct")
card = prior.card
print(prior)
print(f"trained for {card['training']['steps']} steps on {', '.join(card['training']['files'])} (+ random phantoms)")
x_true = prior.normalize(hu)

# %% [markdown]
# ## A sparse-view scan
#
# `ParallelBeamCT` is a `deepinv.physics.LinearPhysics` whose adjoint is matched exactly. It uses 30 views
# equally spaced over 180°, and lengths in mm. As in the README's script, the measurement is
# `y = A(prior.normalize(image)) + σ_y n`: line integrals of the normalised image plus Gaussian noise. Notebook 8
# simulates physical Beer–Lambert noise with `recon simulate` instead.

# %%
op = ParallelBeamCT((N, N), angles=30, spacing=pixel_mm, detector_spacing=pixel_mm)
clean = op.A(x_true)
sigma_y = 0.01 * float(clean.pow(2).mean().sqrt())
y = clean + sigma_y * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
print(op)
print(f"sinogram {tuple(y.shape)} (B, C, views, detectors), σ_y = {sigma_y:.3f}")

fig, ax = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [1, 1.6]})
ax[0].imshow(hu[0, 0], vmin=-160, vmax=240)
ax[0].set_title("reference (HU, window 40 ± 200)")
ax[1].imshow(y[0, 0], aspect="auto")
ax[1].set_title("noisy sinogram: 30 views × detectors")
ax[1].set_xlabel("detector")
ax[1].set_ylabel("view")
for a in ax:
    a.set_xticks([])
    a.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Six reconstructions, one call each
#
# `recon.reconstruct(physics, y, prior, method=...)` is the single entry point to every method, and each call
# returns a `ReconstructionResult` (`x`, `samples`, `weights`, `std`, per-step `diagnostics`). Options that are
# specific to one method are passed through as keyword arguments:
#
# - `analytic`: FBP (Hann filter).
# - `tv`: total variation by Chambolle–Pock (default λ).
# - `dps` with ζ′ = 2: on CT this setting measured better than the paper's ζ′ = 1.
# - `red-diff`: RED-diff with the official defaults.
# - `smc` with 8 weighted particles. With the default TDS weights the particles collapse on this problem (see the
#   last section), so here we use `weighting="afdps"`.
# - `dds`: the volume method, here on a single slice.

# %%
runs = {
    "FBP": ("analytic", {}),
    "TV": ("tv", {}),
    "DPS (100 steps, ζ′ = 2)": ("dps", {"steps": 100, "zeta": 2.0}),
    "RED-diff (100 steps)": ("red-diff", {"steps": 100}),
    "SMC (8 particles, 20 steps, AFDPS weights)": ("smc", {"particles": 8, "steps": 20, "weighting": "afdps"}),
    "DDS (50 steps)": ("dds", {"steps": 50}),
}
results = {}
for label, (method, options) in runs.items():
    t0 = time.perf_counter()
    results[label] = recon.reconstruct(op, y, prior, method=method, sigma_y=sigma_y, seed=0, **options)
    print(f"{label:45s} {time.perf_counter() - t0:6.1f} s")


def to_hu(x):
    return prior.denormalize(x)[0, 0].double().numpy()


ref = hu[0, 0].double().numpy()
rows = ["| method | PSNR (dB) | SSIM | network evaluations | seconds |", "|---|---|---|---|---|"]
for label, res in results.items():
    m = metrics(to_hu(res.x)[None], ref[None], is_ct=True)
    rows.append(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.3f} | {res.nfe} | {res.seconds:.1f} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# PSNR and SSIM are computed by `recon.pipeline.metrics` on the [−1000, 1000] HU window, the same numbers that
# `recon reconstruct` writes to its report. Network evaluations count one per image and step (SMC: one per
# particle). The seconds are wall time on whatever machine built this notebook, with the thread count printed at
# the top, so read them as relative costs.
#
# ## Side by side, same window
#
# All images use the same soft-tissue window (40 ± 200 HU). The error maps, |reconstruction − reference|, share one
# scale from 0 to 200 HU.

# %%
labels = list(results)
fig, ax = plt.subplots(2, len(labels) + 1, figsize=(1.45 * (len(labels) + 1), 3.2), layout="constrained")
ax[0, 0].imshow(ref, vmin=-160, vmax=240)
ax[0, 0].set_title("reference")
ax[1, 0].axis("off")
for j, label in enumerate(labels, start=1):
    rec = to_hu(results[label].x)
    ax[0, j].imshow(rec, vmin=-160, vmax=240)
    ax[0, j].set_title(label.split(" (")[0])
    im = ax[1, j].imshow(np.abs(rec - ref), cmap="magma", vmin=0, vmax=200)
for a in ax.flat:
    a.set_xticks([])
    a.set_yticks([])
fig.colorbar(im, ax=ax[1, -1], label="|error| (HU)")
plt.show()

# %% [markdown]
# What the pictures and the table show. FBP's 30-view streaks are the baseline error. TV removes them but flattens
# the brain and makes the largest errors at the skull's edges; SSIM, which rewards smoothness, scores it highest.
# DPS and RED-diff, at these settings, end close to FBP in PSNR, with their own texture. DDS has the lowest error
# here, as in the benchmark at 128², and SMC with AFDPS weights comes next.
#
# ## SMC: standard deviation next to the error
#
# SMC returns its final weighted particles, and `res.std` is their weighted per-pixel standard deviation (in the
# prior's units; multiply by 1250 HU per unit, half the width of the [−1000, 1500] window). The std map and the
# error map below have their own colour scales.

# %%
smc = results["SMC (8 particles, 20 steps, AFDPS weights)"]
hu_per_unit = float(prior.denormalize(torch.ones(1)) - prior.denormalize(torch.zeros(1)))
std_hu = smc.std[0, 0].double().numpy() * hu_per_unit
err_hu = np.abs(to_hu(smc.x) - ref)
fig, ax = plt.subplots(1, 3, figsize=(7.2, 2.3), layout="constrained")
ax[0].imshow(to_hu(smc.x), vmin=-160, vmax=240)
ax[0].set_title("SMC weighted mean")
im1 = ax[1].imshow(err_hu, cmap="magma", vmin=0, vmax=200)
ax[1].set_title(f"|error|, mean {err_hu.mean():.0f} HU")
im2 = ax[2].imshow(std_hu, cmap="magma")
ax[2].set_title(f"posterior std (8 particles), mean {std_hu.mean():.1f} HU")
for a in ax:
    a.set_xticks([])
    a.set_yticks([])
fig.colorbar(im1, ax=ax[1], shrink=0.8)
fig.colorbar(im2, ax=ax[2], shrink=0.8)
plt.show()
print(f"final effective sample size: {smc.diagnostics[-1]['ess']:.1f} of {smc.info['particles']} particles, "
      f"{smc.info['resamplings']} resampling events in {smc.info['steps']} steps")

# %% [markdown]
# **Read this with care.** The standard deviation is more than ten times smaller than the error, and it is not large
# where the error is large (the skull's edges). Eight particles in 96² dimensions give a very rough spread, and
# for almost every step the weights sit on a single particle (effective sample size ≈ 1, plotted below). The
# std is also only the spread *under the model*: most of the error here is the small prior's own bias, and a
# posterior spread cannot show that. Notebook 3 checks the samplers' spread against exact posteriors, where it can
# be trusted or found wanting.
#
# ## How the runs converged
#
# Each step's record in `res.diagnostics` holds the data residual ‖y − A x̂₀‖ and, for SMC, the effective sample
# size. For comparison, the residual of the true image is ‖noise‖ ≈ σ_y √m.

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
for label in ("DPS (100 steps, ζ′ = 2)", "RED-diff (100 steps)", "SMC (8 particles, 20 steps, AFDPS weights)",
              "DDS (50 steps)"):
    d = results[label].diagnostics
    ax[0].semilogy(np.linspace(0, 1, len(d)), [r["residual"] for r in d], label=label.split(" (")[0])
ax[0].axhline(sigma_y * y.numel() ** 0.5, color="k", ls=":", label="noise level σ_y √m")
ax[0].set_xlabel("fraction of the run")
ax[0].set_ylabel("‖y − A x̂₀‖")
ax[0].legend(fontsize=8)
ax[1].plot([r["ess"] for r in smc.diagnostics], "o-", ms=3)
ax[1].set_ylim(0, 8.5)
ax[1].set_xlabel("SMC step")
ax[1].set_ylabel("effective sample size (of 8)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The default SMC weighting on this problem
#
# `method="smc"` uses TDS weights by default. On the small exact problems of notebook 3 they are the ones that
# get a two-mode posterior right, but on this CT problem, with the same 8 particles and 20 steps, they collapse:

# %%
tds = recon.reconstruct(op, y, prior, method="smc", sigma_y=sigma_y, seed=0, particles=8, steps=20)
m = metrics(to_hu(tds.x)[None], ref[None], is_ct=True)
ess = [round(r["ess"], 1) for r in tds.diagnostics]
print(f"SMC (TDS weights): PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}; ESS per step {ess}")

# %% [markdown]
# The effective sample size is 1 at every step, and the result is worse than FBP. The shift of the twisted
# proposal has to be capped when ‖A‖² is in the thousands, as it is for CT, and the importance weights then pay
# for that cap. The benchmark shows the same weakness at 128² (`benchmarks/README.md`: SMC with 8 particles is
# not a good point estimator on sparse-view CT). Pass `weighting="afdps"` on CT.
#
# ## What this notebook does not show
#
# - **Only one image, one noise level and one seed.** The differences between methods of a dB or so are within
#   what a different slice or seed would change. The benchmark (`benchmarks/README.md`) measures 128² images
#   with 30 and 60 views and 100 steps on a head CT and a phantom.
# - **The noise is Gaussian in the prior's normalised units, not physical photon noise** (see notebook 8, or
#   `recon.tasks.simulate` with `photons=`).
# - **TV runs with its default λ.** The benchmark picks λ against the truth, an oracle that favours TV.
# - **No clinical claim.** The prior was trained for about 4,900 steps on a handful of slices; it is a research
#   and teaching tool.
