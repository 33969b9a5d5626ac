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
# # 6 · Few-step restoration: low-dose CT with ResShift and RDDM, against DPS
#
# A posterior sampler such as DPS needs an unconditional prior, the forward model and the raw measurements, and
# it costs tens to hundreds of network evaluations, each with a backward pass. A **restorer** is a different
# trade: a *supervised* conditional diffusion model, trained for one degradation on clean/degraded pairs. It
# maps the degraded image (here a low-dose FBP) to a restored one in 4–15 steps, starting its reverse chain at the
# degraded image itself. `recon.restoration` implements two of them:
#
# - **ResShift** (Yue et al., NeurIPS 2023): shifts the residual between the degraded and the clean image over 15
#   steps, with x₀-prediction. `recon` ships one trained for low-dose CT: `load_restorer("default")`.
# - **RDDM** (Liu et al., CVPR 2024): predicts the residual and the noise, with a deterministic DDIM sampler in 5–10
#   steps. `recon` ships one trained on the same task for comparison, `load_restorer("default-lowdose-ct-rddm")`;
#   this notebook also trains a *tiny* one on the spot to show the training API (it is not expected to be good).
#
# **How these results were obtained.** The test image is a 192² region (the frontal skull and brain) of
# pydicom-data's `693_UNCR.dcm`, on its native grid. It is a head CT held out from the training of every built-in
# model. It is scanned with the built-in restorer's own degradation (180 parallel-beam views, Beer–Lambert noise
# at the photon count on its model card, 0.7 mm pixels, Hann FBP), seed 0. ResShift runs with 15 and 4 steps. The
# built-in RDDM samples in 5 steps; the tiny RDDM trains for 800 steps on crops of pydicom's `CT_small.dcm` and
# random phantoms, and samples in 10 steps.
# DPS uses the built-in CT prior with 30 steps, and DDS with 20.
# `benchmarks/bench_restoration.py` compares the full-size models against BM3D and TV as well.

# %%
import os
import tempfile
import time
import warnings
from pathlib import Path

with warnings.catch_warnings():  # tqdm's notebook progress bars need ipywidgets, which this notebook does not use
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from pydicom.data import get_testdata_file

import recon
from recon.datasets import read_image
from recon.pipeline import metrics
from recon.priors import load_prior
from recon.restoration import RestorerConfig, load_restorer, train_restorer
from recon.tasks import from_domain, make_task, normalised_problem, simulate

torch.set_num_threads(int(os.environ.get("RECON_NOTEBOOK_THREADS", "2")))
plt.rcParams.update({"figure.dpi": 72, "image.cmap": "gray", "axes.titlesize": 10})
print(f"recon {recon.__version__}, torch {torch.__version__}, CPU threads: {torch.get_num_threads()}")

# %% [markdown]
# ## The built-in restorer and what it was trained for
#
# A restorer's model card records its model, schedule, the degradation it undoes (with its parameters) and its
# training data. We simulate exactly that degradation, because a restorer knows nothing about other ones.

# %%
resshift = load_restorer("default")
deg = resshift.degradation
training = resshift.card.get("training", {})
print(f"{resshift.kind}: T = {resshift.schedule.T}, default {resshift.sampling_steps} sampling steps; "
      f"trained {training.get('total_steps') or training.get('steps')} steps on {training.get('files')}")
print(f"degradation: {deg}")
quality = resshift.card.get("quality")
if quality:
    print(f"model card, held-out quality: degraded {quality['degraded']['psnr']:.2f} dB → restored "
          f"{quality['restored']['psnr']:.2f} dB ({', '.join(f['file'] for f in quality['files'])})")

# %% [markdown]
# ## A low-dose scan of a held-out slice
#
# `recon.tasks` simulates in physical units: HU → linear attenuation μ, parallel-beam line integrals, Poisson
# photon counts, and the post-log sinogram. Every method sees this same noisy sinogram. The restorers get its
# Hann FBP, exactly their training input, and DPS gets the sinogram itself.

# %%
image = read_image(get_testdata_file("693_UNCR.dcm", download=False))
hu = image.array[0, 96:288, 160:352].clip(-1000, None).astype(np.float64)  # 192² (frontal skull), native grid
p = deg.params
spec = make_task("sparse-view-ct", (1, *hu.shape), (deg.pixel_mm,) * 3, views=p["views"])
meas = simulate(spec, torch.from_numpy(hu), "HU", photons=p["photons"], seed=0)
physics = meas.physics()
with torch.no_grad():
    fbp = from_domain(spec, physics.fbp(meas.y, filter=p["filter"]).double())[0, 0].numpy()
print(f"{hu.shape} at a nominal {deg.pixel_mm} mm; {p['views']} views, {p['photons']:g} photons per detector "
      f"element; sinogram {tuple(meas.y.shape)}")

results = {"low-dose FBP (Hann)": (fbp, 0.0, 0)}
for steps in (resshift.sampling_steps, 4):
    t0 = time.perf_counter()
    out, nfe = resshift.restore_array(fbp[None], steps=steps, seed=0)
    results[f"ResShift, {steps} steps"] = (out[0], time.perf_counter() - t0, nfe)

# %% [markdown]
# ## Training a tiny RDDM: the API, not a result
#
# `RestorerConfig` + `train_restorer` is `recon train-restorer` as Python calls. Pairs are made on the fly: each
# clean slice (or random phantom) is degraded by the same `lowdose-ct` chain, and the pair is cropped, rotated and
# flipped together. This run is about 10⁴ times smaller than a real training run: a small 3-level UNet, 32² crops,
# batches of 4 and 800 steps. (Keep at least three levels: MONAI's UNet has self-attention in its middle block,
# and with only two levels that attention would run at half the image's resolution, which is slow.) Interrupting
# and resuming work as for priors (notebook 5).

# %%
rddm_dir = os.environ.get("RECON_RESTORER_RDDM")  # a trained RDDM restorer folder, if you have one
if rddm_dir:
    rddm = load_restorer(rddm_dir)
    print(f"loaded RDDM from {Path(rddm_dir).name}: trained {rddm.card.get('training', {}).get('steps')} steps")
else:
    run = Path(tempfile.mkdtemp(prefix="recon-rddm-"))
    cfg = RestorerConfig(data=[get_testdata_file("CT_small.dcm")], out=str(run), model="rddm", task="lowdose-ct",
                         task_params={"photons": p["photons"], "views": p["views"], "filter": p["filter"]},
                         pixel_mm=deg.pixel_mm, crop=32, batch_size=4, channels=(16, 32, 32), steps=800, lr=1e-3,
                         lr_warmup=20, realizations=2, checkpoint_every=800, sample_every=0, log_every=100, seed=0,
                         progress=False)
    t0 = time.perf_counter()
    summary = train_restorer(cfg)
    print(f"trained {summary['step']} steps in {time.perf_counter() - t0:.0f} s "
          f"({summary['parameters']:,} parameters), final loss {summary['final_loss']:.3f}")
    rddm = load_restorer(summary["restorer"])
t0 = time.perf_counter()
out, nfe = rddm.restore_array(fbp[None], steps=10, seed=0)
results["tiny RDDM, 10 steps"] = (out[0], time.perf_counter() - t0, nfe)
rddm_builtin = load_restorer("default-lowdose-ct-rddm")
t0 = time.perf_counter()
out, nfe = rddm_builtin.restore_array(fbp[None], steps=5, seed=0)
results["RDDM (built-in), 5 steps"] = (out[0], time.perf_counter() - t0, nfe)
trained = rddm_builtin.card["training"]
print(f"built-in RDDM: trained {trained.get('total_steps') or trained['steps']} steps")

# %% [markdown]
# ## DPS (and DDS) with the built-in CT prior, on the same sinogram
#
# The posterior samplers get the sinogram. Alongside DPS we run DDS, the sampler that measured best on CT in
# notebook 1 and in the benchmark, with 20 steps. `normalised_problem` maps the measurement into the prior's
# normalised range. The map is exact, because the
# operator is linear and the normalisation affine. σ_y is the Gaussian approximation of the post-log noise that
# `recon reconstruct` uses.

# %%
prior = load_prior("default-ct")
with torch.no_grad():
    analytic = physics.fbp(meas.y)
y_n, sigma_n, a, b = normalised_problem(meas, physics, prior, analytic)
for label, method, options in (("DPS, 30 steps (ζ′ = 2)", "dps", {"steps": 30, "zeta": 2.0}),
                               ("DDS, 20 steps", "dds", {"steps": 20})):
    res = recon.reconstruct(physics, y_n, prior, method=method, sigma_y=sigma_n, seed=0, **options)
    results[label] = (from_domain(spec, (res.x.double() - b) / a)[0, 0].numpy(), res.seconds, res.nfe)

# %% [markdown]
# ## Quality and time

# %%
rows = ["| method | PSNR (dB) | SSIM | network evaluations | seconds |", "|---|---|---|---|---|"]
scores = {}
for label, (im, seconds, nfe) in results.items():
    scores[label] = metrics(im[None], hu[None], is_ct=True)
    rows.append(f"| {label} | {scores[label]['psnr']:.2f} | {scores[label]['ssim']:.3f} | {nfe} | {seconds:.1f} |")
display(Markdown("\n".join(rows)))

labels = list(results)
fig, ax = plt.subplots(2, len(labels) + 1, figsize=(1.5 * (len(labels) + 1), 3.5), layout="constrained")
ax[0, 0].imshow(hu, vmin=-160, vmax=240)
ax[0, 0].set_title("reference")
ax[1, 0].axis("off")
for j, label in enumerate(labels, start=1):
    im = results[label][0]
    ax[0, j].imshow(im, vmin=-160, vmax=240)
    ax[0, j].set_title(label.replace(", ", "\n"), fontsize=8)
    err = ax[1, j].imshow(np.abs(im - hu), cmap="magma", vmin=0, vmax=150)
for a_ in ax.flat:
    a_.set_xticks([])
    a_.set_yticks([])
fig.colorbar(err, ax=ax[1, -1], label="|error| (HU)")
plt.show()

fig, ax = plt.subplots(figsize=(6.5, 3.2), layout="constrained")
for k, (label, (_, seconds, _)) in enumerate(results.items()):
    ax.scatter(max(seconds, 0.05), scores[label]["psnr"], s=40)
    ax.annotate(label, (max(seconds, 0.05), scores[label]["psnr"]), fontsize=8, xytext=(5, 4 if k % 2 else -11),
                textcoords="offset points")
ax.set_xlim(0.03, 300)
ax.set_xscale("log")
ax.set_xlabel("wall time (s, log scale; FBP drawn at 0.05 s)")
ax.set_ylabel("PSNR (dB)")
plt.show()

# %% [markdown]
# PSNR/SSIM from `recon.pipeline.metrics` on the [−1000, 1000] HU window, the numbers written in the model cards
# and `recon restore`'s reports. The images use a soft-tissue window (40 ± 200 HU), and the error maps share one
# scale. The seconds are wall time on the machine that built this notebook (threads printed at the top).
#
# How to read it. The restorer sees only the FBP and was trained for exactly this degradation: it costs a handful
# of network evaluations without gradients, and it needs neither the sinogram nor the geometry. DPS costs more per
# image (network evaluations *with* gradients, plus the projector at every step), but it uses the physics, so it
# works for any scan geometry and dose. It also needs its steps: on this region, which contains the skull, 30 DPS
# steps are far too few (`benchmarks/bench_restoration.py` runs 200), and DDS does better with 20. The built-in
# RDDM smooths more than ResShift: on this region, with the skull's edges, it has the highest SSIM of all rows
# but a PSNR below the FBP's, while on the benchmark's central head crop it gains 2.2 dB over the FBP. The tiny
# RDDM shows that the training API works end to end, and nothing about RDDM itself. In this run:

# %%
best = max(scores, key=lambda k: scores[k]["psnr"])
rs, dp = f"ResShift, {resshift.sampling_steps} steps", "DPS, 30 steps (ζ′ = 2)"
display(Markdown(
    f"- highest PSNR: **{best}** ({scores[best]['psnr']:.2f} dB; the low-dose FBP has "
    f"{scores['low-dose FBP (Hann)']['psnr']:.2f} dB);\n"
    f"- {rs}: {scores[rs]['psnr'] - scores['low-dose FBP (Hann)']['psnr']:+.2f} dB relative to the FBP, in "
    f"{results[rs][1]:.1f} s; DPS: {scores[dp]['psnr'] - scores['low-dose FBP (Hann)']['psnr']:+.2f} dB, in "
    f"{results[dp][1]:.1f} s ({results[dp][1] / max(results[rs][1], 1e-9):.0f}× the time);\n"
    f"- the built-in ResShift was trained for {training.get('total_steps') or training.get('steps')} steps."))

# %% [markdown]
# The same restoration as a command, reading and writing files with their geometry:
#
# ```bash
# recon restore -i ct_slice.dcm -o restored.nii.gz --model default                    # a low-dose scan
# recon restore -i ct_slice.dcm -o study.nii.gz --model default --degrade             # simulate, then restore
# recon train-restorer --model rddm --task lowdose-ct -i /data/ct_scans -o runs/my-rddm --steps 5000
# ```
#
# ## What this notebook does not show
#
# - **A large restorer.** The built-in models are small (0.9 M parameters) and trained for 7000 steps on five real
#   CT slices and random phantoms on a CPU; the tiny one above trained 800. Set `RECON_RESTORER_RDDM` to your own
#   trained RDDM folder to use it in place of the tiny one.
# - **Other doses or geometries.** A restorer is specific to its degradation; at another photon count or view
#   count it is out of distribution and can remove or invent structure. The posterior samplers adapt, because
#   the physics is an input.
# - **Many images.** This is one 192² slice; `benchmarks/bench_restoration.py` runs the held-out head CT and phantoms
#   against BM3D and TV with oracle parameters.
# - **Clinical validity.** The shipped restorer is a small research model trained on a handful of slices.
