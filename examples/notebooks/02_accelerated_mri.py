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
# # 2 · Accelerated MRI: masks, coils, and the MRI prior
#
# An MRI scanner measures k-space (the image's Fourier transform) line by line. Skipping lines makes the scan
# faster and leaves an inverse problem. This notebook builds the Cartesian sampling masks that `recon` provides
# (the 1D ones of fastMRI and a 2D variable-density Poisson disc), simulates single-coil and 8-coil SENSE
# acquisitions with smooth coil maps, estimates those maps back from the data with ESPIRiT, and compares the
# zero-filled image with diffusion reconstructions that use the built-in MRI prior.
#
# **How these results were obtained.** The image is the central axial slice of nibabel's `anatomical.nii` (a T1
# brain volume the MRI prior never saw), resized to 64 × 56. The acceleration is 4× with one coil and 8× with 8
# coils, and the noise is σ = 0.01 in the prior's normalised units, on the acquired samples only. The samplers use
# 50 steps and seed 0.
#
# **Be warned: the built-in MRI prior is small.** It is a 1.3 M-parameter network trained for a few CPU hours on
# two template brains (Colin27, MNI152) and a dozen MR slices. One denoising step with it is close to BM3D on
# held-out brains, and below it on the coarse `anatomical.nii` (`benchmarks/README.md`). On the benchmark's 12 MRI
# cases the TV hybrid beats the best TV on 9 of them, but it loses one image at 8× by 2 dB, so TV stays MRI's
# default. The notebook is about the operators and the workflow. Notebook 5 shows how to train or load a better
# prior.

# %%
import os
import warnings
from pathlib import Path

with warnings.catch_warnings():  # tqdm's notebook progress bars need ipywidgets, which this notebook does not use
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from nibabel.testing import data_path
from skimage.transform import resize

import recon
from recon.datasets import read_image
from recon.operators import (
    CartesianMRI,
    MultiCoilMRI,
    equispaced_mask,
    estimate_coil_maps,
    poisson_disc_mask,
    random_mask,
    simulate_coil_maps,
)
from recon.pipeline import metrics
from recon.priors import load_prior

torch.set_num_threads(int(os.environ.get("RECON_NOTEBOOK_THREADS", "2")))
plt.rcParams.update({"figure.dpi": 72, "image.cmap": "gray", "axes.titlesize": 10})
print(f"recon {recon.__version__}, torch {torch.__version__}, CPU threads: {torch.get_num_threads()}")

# %% [markdown]
# ## The image
#
# `read_image` reads the NIfTI volume as a `(D, H, W)` array with its RAS affine (2 mm voxels). We take the
# central slice along `D` and resize it to 64 × 56, a multiple of 8 for the prior's UNet. The prior's intensity map
# for MRI magnitude is `IntensityScale`: it divides by the 99.5th percentile of the image it normalises and keeps
# that scale, so `denormalize` can return to the file's units. On real data the scale would come from the
# zero-filled image; `recon.tasks.normalised_problem` does that.

# %%
volume = read_image(Path(data_path) / "anatomical.nii")
print(f"anatomical.nii: shape {volume.shape} (D, H, W), spacing {volume.spacing} mm, "
      f"values {volume.array.min():.0f} … {volume.array.max():.0f}")
H, W = 64, 56
slice_ = np.abs(volume.array[volume.shape[0] // 2])
reference = resize(slice_, (H, W), anti_aliasing=True, preserve_range=True)

prior = load_prior("default-mri")
x_true = prior.normalize(torch.from_numpy(reference).float()[None, None])  # (1, 1, H, W), sets the scale
print(prior.intensity)
print(f"MRI prior: trained {prior.card['training']['steps']} steps on {prior.card['training']['files']}")

# %% [markdown]
# ## Sampling masks
#
# Columns along `W` are phase-encode lines. The 1D masks are fastMRI's: `random_mask` keeps a fully sampled
# centre (8 % of the columns at 4×) and random other columns with the probability that makes the *expected*
# acceleration 4. `equispaced_mask` keeps every 4th column plus the centre. `poisson_disc_mask` samples
# individual k-space points (a 2D mask, as in a 3D acquisition's phase-encode plane), denser near the centre, with
# a fully sampled calibration box.

# %%
masks = {
    "1D random": random_mask((H, W), acceleration=4, seed=0),
    "1D equispaced": equispaced_mask((H, W), acceleration=4, seed=0),
    "2D Poisson disc": poisson_disc_mask((H, W), acceleration=4, calib=(12, 12), seed=0),
}
fig, ax = plt.subplots(1, 3, figsize=(8, 3), layout="constrained")
for a, (name, m) in zip(ax, masks.items(), strict=True):
    a.imshow(m, cmap="gray", vmin=0, vmax=1)
    a.set_title(f"{name}\n{m.numel() / m.sum():.2f}× ({int(m.sum())} of {m.numel()} samples)")
    a.set_xticks([])
    a.set_yticks([])
plt.show()

# %% [markdown]
# ## Single coil: zero-filled images and their aliasing
#
# `CartesianMRI(..., real_input=True)` takes a real magnitude image `(B, 1, H, W)` and returns k-space as
# `(B, 2, H, W)` (real and imaginary parts), using fastMRI's centred orthonormal FFT. Because the mask is 0/1,
# `A_adjoint` is also the pseudo-inverse: the *zero-filled* image. 1D masks alias along `W`, while the 2D
# Poisson-disc mask spreads its aliasing as noise-like texture.

# %%
def simulate(physics, x, sigma, seed=0):
    """y = A x + σ n, with the noise on the acquired samples only (A Aᴴ is the mask projection)."""
    clean = physics.A(x)
    noise = sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return clean + physics.A(physics.A_adjoint(noise))


def to_phys(x):
    return prior.denormalize(x)[0, 0].double().numpy()


def score(x):
    return metrics(to_phys(x)[None], reference[None], is_ct=False)  # data range = the reference's max − min


sigma = 0.01
lo, hi = np.percentile(reference, [1, 99.5])
fig, ax = plt.subplots(2, 4, figsize=(8, 4.6), layout="constrained")
ax[0, 0].imshow(reference, vmin=lo, vmax=hi)
ax[0, 0].set_title("reference")
ax[1, 0].axis("off")
single = {}
for j, (name, m) in enumerate(masks.items(), start=1):
    physics = CartesianMRI((H, W), mask=m, real_input=True)
    y = simulate(physics, x_true, sigma)
    zf = recon.reconstruct(physics, y, method="analytic").x
    single[name] = (physics, y)
    s = score(zf)
    ax[0, j].imshow(to_phys(zf), vmin=lo, vmax=hi)
    ax[0, j].set_title(f"zero-filled: {name}\n{s['psnr']:.1f} dB / SSIM {s['ssim']:.3f}", fontsize=9)
    ax[1, j].imshow(np.log10(1e-4 + y[0].pow(2).sum(0).sqrt().numpy()), cmap="viridis")
    ax[1, j].set_title("acquired |k| (log)", fontsize=9)
for a in ax.flat:
    a.set_xticks([])
    a.set_yticks([])
plt.show()

# %% [markdown]
# ## Diffusion reconstructions, single coil, 1D random mask (fastMRI-style)
#
# Every method gets the same operator, measurements and prior through `recon.reconstruct`: zero-filled, TV,
# DPS (`zeta` is the paper's ζ′ = 1), RED-diff, DDS (conjugate-gradient data consistency on the Tweedie
# estimate), and the TV hybrid (TV inside the data step). On an MRI operator the hybrid uses its MRI anchor and
# TV factor (`recon methods hybrid`).

# %%
physics, y = single["1D random"]
runs = {
    "zero-filled": ("analytic", {}),
    "TV": ("tv", {}),
    "DPS (50 steps)": ("dps", {"steps": 50}),
    "RED-diff (50 steps)": ("red-diff", {"steps": 50}),
    "DDS (50 steps)": ("dds", {"steps": 50}),
    "TV hybrid (50 steps)": ("hybrid", {"steps": 50}),
}
out = {label: recon.reconstruct(physics, y, prior, method=m, sigma_y=sigma, seed=0, **kw)
       for label, (m, kw) in runs.items()}
rows = ["| method | PSNR (dB) | SSIM | network evaluations | seconds |", "|---|---|---|---|---|"]
for label, res in out.items():
    s = score(res.x)
    rows.append(f"| {label} | {s['psnr']:.2f} | {s['ssim']:.3f} | {res.nfe} | {res.seconds:.1f} |")
display(Markdown("\n".join(rows)))

fig, ax = plt.subplots(2, len(out) + 1, figsize=(1.5 * (len(out) + 1), 3.8), layout="constrained")
ax[0, 0].imshow(reference, vmin=lo, vmax=hi)
ax[0, 0].set_title("reference")
ax[1, 0].axis("off")
for j, (label, res) in enumerate(out.items(), start=1):
    ax[0, j].imshow(to_phys(res.x), vmin=lo, vmax=hi)
    ax[0, j].set_title(label.split(" (")[0])
    im = ax[1, j].imshow(np.abs(to_phys(res.x) - reference), cmap="magma", vmin=0, vmax=0.25 * (hi - lo))
for a in ax.flat:
    a.set_xticks([])
    a.set_yticks([])
fig.colorbar(im, ax=ax[1, -1], label="|error|")
plt.show()

# %% [markdown]
# PSNR and SSIM come from `recon.pipeline.metrics`, in the file's units, with the data range taken as the
# reference's max − min. The images share one window, and the error maps share one scale (¼ of the window). Of
# the diffusion methods only the TV hybrid is better than TV here (24.1 against 23.7 dB when this notebook was
# built); DPS, RED-diff and DDS stay below TV. With this small prior (see the top), the TV step inside the
# hybrid's data step matters as much as the sampler.
#
# ## Multi-coil SENSE and coil maps
#
# With several receive coils each coil sees the image weighted by its smooth sensitivity `S_c`.
# `simulate_coil_maps` draws birdcage-like maps normalised to Σ|S_c|² = 1. `MultiCoilMRI` returns k-space
# `(B, 2, coils, H, W)`, and its adjoint combines the coils as Σ conj(S_c) Fᴴ M y_c. We use 8 coils and
# push the acceleration to 8× with a 2D Poisson-disc mask; its fully sampled 12 × 12 centre is the calibration
# region.

# %%
mask8 = poisson_disc_mask((H, W), acceleration=8, calib=(12, 12), seed=0)
maps = simulate_coil_maps((H, W), 8)
sense = MultiCoilMRI((H, W), coil_maps=maps, mask=mask8, real_input=True)
y_mc = simulate(sense, x_true, sigma)
print(f"multi-coil k-space: {tuple(y_mc.shape)} (B, re/im, coils, H, W); {mask8.numel() / mask8.sum():.2f}× per coil")

mc_runs = {
    "zero-filled": ("analytic", {}),
    "TV": ("tv", {}),
    "DPS (50 steps)": ("dps", {"steps": 50}),
    "DDS (50 steps)": ("dds", {"steps": 50}),
    "TV hybrid (50 steps)": ("hybrid", {"steps": 50}),
}
mc = {label: recon.reconstruct(sense, y_mc, prior, method=m, sigma_y=sigma, seed=0, **kw)
      for label, (m, kw) in mc_runs.items()}
rows = ["| 8 coils, 2D Poisson disc 8× | PSNR (dB) | SSIM | seconds |", "|---|---|---|---|"]
for label, res in mc.items():
    s = score(res.x)
    rows.append(f"| {label} | {s['psnr']:.2f} | {s['ssim']:.3f} | {res.seconds:.1f} |")
display(Markdown("\n".join(rows)))

fig, ax = plt.subplots(1, len(mc) + 1, figsize=(1.6 * (len(mc) + 1), 2.3), layout="constrained")
ax[0].imshow(mask8, vmin=0, vmax=1)
ax[0].set_title("mask, 8×")
for a, (label, res) in zip(ax[1:], mc.items(), strict=True):
    a.imshow(to_phys(res.x), vmin=lo, vmax=hi)
    a.set_title(label.split(" (")[0])
for a in ax:
    a.set_xticks([])
    a.set_yticks([])
plt.show()

# %% [markdown]
# Even at 8×, the 8-coil problem is much better posed than single-coil 4×: the coils' different views of the
# image act as extra, partly redundant measurements (parallel imaging). Here the data term does most of the
# work, and every regulariser helps.
#
# ### Estimating the coil maps from the data (ESPIRiT)
#
# On real data nobody hands you the maps. `estimate_coil_maps` (ESPIRiT) estimates them from the fully
# sampled k-space centre of the same acquisition. The estimated maps match the true ones up to a phase per pixel
# (the ESPIRiT ambiguity: they carry coil 0's phase), so we compare magnitudes. Because of that phase, the image
# the estimated maps imply is complex. A real-valued magnitude prior therefore needs maps in which the image is
# real (the simulated ones here), while `recon reconstruct` on a multi-coil fastMRI file uses ESPIRiT maps with
# the complex-image `analytic` and `tv` methods.

# %%
kspace = torch.complex(y_mc[0, 0], y_mc[0, 1])  # (coils, H, W)
est = estimate_coil_maps(kspace, calib_size=12)
fig, ax = plt.subplots(2, 8, figsize=(10, 2.9), layout="constrained")
for c in range(8):
    ax[0, c].imshow(maps[c].abs(), cmap="viridis", vmin=0, vmax=1)
    ax[1, c].imshow(est[c].abs(), cmap="viridis", vmin=0, vmax=1)
    ax[0, c].set_title(f"coil {c}")
ax[0, 0].set_ylabel("true |S_c|")
ax[1, 0].set_ylabel("ESPIRiT |S_c|")
for a in ax.flat:
    a.set_xticks([])
    a.set_yticks([])
plt.show()
inside = est.abs().sum(0) > 0
rel = float((est.abs() - maps.abs())[:, inside].norm() / maps.abs()[:, inside].norm())
print(f"ESPIRiT kept the maps on {int(inside.sum())} of {H * W} pixels (eigenvalue threshold crop=0.95); "
      f"relative error of the magnitudes there: {rel:.3f}")

# %% [markdown]
# ## What this notebook does not show
#
# - **A good MRI prior.** The built-in one is a weak, 1.3 M-parameter network trained on one template brain. None
#   of the diffusion results above should be read as what diffusion priors can do for MRI. Train your own
#   (notebook 5) or load an external checkpoint.
# - **Measured k-space.** The k-space here is simulated from a magnitude image (real-valued, with no phase), so the
#   prior's real-valued assumption holds exactly. Measured fastMRI files are complex; `recon reconstruct` reads
#   them (`read_fastmri`), but only `analytic` and `tv` apply to them, since the priors are magnitude priors.
# - **Several images or seeds.** This is a single 64 × 56 slice. The benchmark measures 64² slices with 100 steps
#   (`benchmarks/README.md`).
