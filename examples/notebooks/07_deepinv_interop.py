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
# # 7 · Working with deepinv
#
# `recon` builds on deepinv's `Physics` contract, in both directions:
#
# - Every `recon` operator **is** a `deepinv.physics.LinearPhysics`, with an exactly matched adjoint, so deepinv's
#   own tools accept it as is: its adjointness test and norm, its noise models, its least-squares pseudo-inverse,
#   its optimisation algorithms and plug-and-play, and its diffusion samplers.
# - Every `recon` sampler accepts **any** deepinv physics. Here they run on deepinv's `Blur`, `Inpainting` and
#   `Tomography`.
#
# **How these results were obtained.** The image is the same held-out head CT slice as in notebook 1 (96², 30
# views, or a 2-pixel Gaussian blur, or 60 % missing pixels, with 1 % noise), with the built-in CT prior, 30–50
# steps and seed 0. The numbers show that the pieces fit together. They are not a comparison of the libraries.

# %%
import os
import time
import warnings

with warnings.catch_warnings():  # tqdm's notebook progress bars need ipywidgets, which this notebook does not use
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

import deepinv as dinv
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
from recon.samplers.baselines import PriorAsDeepinvDenoiser

torch.set_num_threads(int(os.environ.get("RECON_NOTEBOOK_THREADS", "2")))
plt.rcParams.update({"figure.dpi": 72, "image.cmap": "gray", "axes.titlesize": 10})
print(f"recon {recon.__version__}, deepinv {dinv.__version__}, torch {torch.__version__}, "
      f"CPU threads: {torch.get_num_threads()}")

N = 96
image = read_image(get_testdata_file("693_UNCR.dcm", download=False))
hu = resize(image.array[0, 64:448, 64:448].clip(-1000, None), (N, N), anti_aliasing=True, preserve_range=True)
prior = load_prior("default-ct")
x = prior.normalize(torch.from_numpy(hu).float()[None, None])  # recon's convention: the prior's [-1, 1] range
u = (x + 1) / 2  # deepinv's convention: images in [0, 1]


def score(img, unit_range=False):
    """PSNR/SSIM on the [-1000, 1000] HU window; ``unit_range``: ``img`` is in deepinv's [0, 1]."""
    xn = 2 * img - 1 if unit_range else img
    return metrics(prior.denormalize(xn)[0, 0].double().numpy()[None], hu[None], is_ct=True)


# %% [markdown]
# ## Part 1 · A `recon` operator inside deepinv
#
# ### It is a deepinv physics
#
# deepinv's own checks apply. `adjointness_test` returns ⟨A u, v⟩ − ⟨u, Aᵀ v⟩ for random `u`, `v` (0 up to
# rounding for an exact adjoint), and `compute_norm` returns ‖AᵀA‖ by power iteration. A deepinv noise model
# attached to the operator makes `physics(u)` a noisy measurement.

# %%
sigma_u = 0.01 * float(ParallelBeamCT((N, N), angles=30).A(u).pow(2).mean().sqrt())
ct = ParallelBeamCT((N, N), angles=30, noise_model=dinv.physics.GaussianNoise(sigma=sigma_u, rng=torch.Generator()))
print(f"is a deepinv LinearPhysics: {isinstance(ct, dinv.physics.LinearPhysics)}")
print(f"adjointness test ⟨Au, v⟩ − ⟨u, Aᵀv⟩ = {float(ct.adjointness_test(u)):.2e}")
norm = float(ct.compute_norm(torch.randn_like(u), verbose=False))
print(f"‖AᵀA‖ = {norm:.1f}")
y_u = ct(u, seed=0)  # deepinv's forward call: A u + noise
print(f"measurement {tuple(y_u.shape)}, noise σ = {sigma_u:.3f}")

# %% [markdown]
# ### deepinv's solvers on it
#
# - `A_dagger`: deepinv's least-squares pseudo-inverse, computed by conjugate gradients. With 30 views the
#   problem is underdetermined, so the least-squares solution is noisy.
# - `optim_builder("PGD", prior=TVPrior(...))`: proximal gradient descent with total variation, deepinv's classical
#   variational pipeline. By default deepinv starts at Aᵀy. For CT, where ‖AᵀA‖ is in the thousands, that
#   start is off in scale by as much, and 100 steps of size 1/‖AᵀA‖ do not recover from it. We start at the FBP
#   instead (`init=`).
# - `optim_builder("HQS", prior=PnP(denoiser))`: plug-and-play half-quadratic splitting, with `recon`'s *diffusion
#   prior* as the denoiser. `PriorAsDeepinvDenoiser` wraps a `recon` prior as a deepinv denoiser on [0, 1] images.
#   The data step is deepinv's `L2.prox`, which solves (AᵀA + ρI) x = … by conjugate gradients on the `recon`
#   operator.
# - `deepinv.sampling.DiffPIR` with the same wrapped prior: deepinv's diffusion sampler on the `recon` operator.

# %%
denoiser = PriorAsDeepinvDenoiser(prior)  # recon's [-1, 1] range mapped onto deepinv's [0, 1]
part1 = {}
t0 = time.perf_counter()
part1["deepinv A_dagger (least squares, CG)"] = (ct.A_dagger(y_u), time.perf_counter() - t0)

t0 = time.perf_counter()
pgd = dinv.optim.optim_builder(iteration="PGD", prior=dinv.optim.prior.TVPrior(n_it_max=20),
                               data_fidelity=dinv.optim.data_fidelity.L2(),
                               params_algo={"stepsize": 1.0 / norm, "lambda": 1.0}, max_iter=100, early_stop=False)
part1["deepinv PGD + TV (100 iterations)"] = (pgd(y_u, ct, init=ct.fbp(y_u)), time.perf_counter() - t0)

t0 = time.perf_counter()
sigmas = np.geomspace(0.2, 0.01, 12)  # denoiser strengths in [0, 1] units, decreasing
hqs = dinv.optim.optim_builder(iteration="HQS", prior=dinv.optim.prior.PnP(denoiser=denoiser),
                               data_fidelity=dinv.optim.data_fidelity.L2(),
                               params_algo={"stepsize": list(sigma_u**2 / sigmas**2 / norm**0.5),
                                            "g_param": list(sigmas), "lambda": 1.0},
                               max_iter=len(sigmas), early_stop=False)
with torch.no_grad():
    part1["deepinv PnP-HQS, recon prior (12 iterations)"] = (hqs(y_u, ct), time.perf_counter() - t0)

t0 = time.perf_counter()
diffpir = dinv.sampling.DiffPIR(model=denoiser, data_fidelity=dinv.optim.data_fidelity.L2(), sigma=sigma_u,
                                max_iter=50)
with torch.no_grad(), torch.random.fork_rng():
    torch.manual_seed(0)  # deepinv's DiffPIR draws from the global generator
    part1["deepinv DiffPIR, recon prior (50 steps)"] = (diffpir(y_u, ct), time.perf_counter() - t0)

part1["recon FBP (for reference)"] = (ct.fbp(y_u, filter="hann"), 0.0)
rows = ["| deepinv solver on recon's ParallelBeamCT | PSNR (dB) | SSIM | seconds |", "|---|---|---|---|"]
for label, (img, seconds) in part1.items():
    s = score(img, unit_range=True)
    rows.append(f"| {label} | {s['psnr']:.2f} | {s['ssim']:.3f} | {seconds:.1f} |")
display(Markdown("\n".join(rows)))

fig, ax = plt.subplots(1, len(part1) + 1, figsize=(1.7 * (len(part1) + 1), 2.4), layout="constrained")
ax[0].imshow(u[0, 0], vmin=0.336, vmax=0.496)  # the soft-tissue window 40 ± 200 HU in [0, 1] units
ax[0].set_title("reference")
for a, (label, (img, _)) in zip(ax[1:], part1.items(), strict=True):
    a.imshow(img[0, 0], vmin=0.336, vmax=0.496)
    a.set_title(label.replace("deepinv ", "").split(" (")[0].replace(", ", "\n"), fontsize=8)
for a in ax:
    a.set_xticks([])
    a.set_yticks([])
plt.show()

# %% [markdown]
# The parameters here are set once by hand: TV's λ, and HQS's noise levels and steps. Method by method,
# `recon.reconstruct(..., method="deepinv-diffpir" | "deepinv-dps" | "deepinv-ddrm")` runs deepinv's samplers
# with these unit conversions done for you, in `recon`'s [−1, 1] convention.
#
# ## Part 2 · deepinv physics inside `recon`'s samplers
#
# `recon.reconstruct` needs only `A` and `A_adjoint`, so any deepinv physics works. Here are three of deepinv's
# own operators, in `recon`'s convention: the image in the prior's range, and `y = A x + σ_y n`.

# %%
def measure(physics, x, rel=0.01, seed=0):
    clean = physics.A(x)
    sigma = rel * float(clean.pow(2).mean().sqrt())
    return clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)), sigma


blur = dinv.physics.Blur(filter=dinv.physics.functional.blur.gaussian_blur(sigma=(2.0, 2.0)), padding="circular")
mask = (torch.rand(1, N, N, generator=torch.Generator().manual_seed(1)) > 0.6).float()
inpaint = dinv.physics.Inpainting(img_size=(1, N, N), mask=mask)
tomo = dinv.physics.Tomography(angles=torch.linspace(0, 180, 31)[:-1], img_width=N, circle=False, normalize=True,
                               adjoint_via_backprop=True)  # deepinv's own Radon transform, exact adjoint
print(f"deepinv Tomography adjointness test: {float(tomo.adjointness_test(x)):.2e}")

problems = {"deepinv Blur (σ = 2 px)": blur, "deepinv Inpainting (60 % missing)": inpaint,
            "deepinv Tomography (30 views)": tomo}
methods = {"analytic": ("analytic", {}), "RED-diff (50 steps)": ("red-diff", {"steps": 50}),
           "DDS (30 steps)": ("dds", {"steps": 30})}
part2 = {}
for pname, physics in problems.items():
    y, sigma = measure(physics, x)
    for mname, (method, options) in methods.items():
        res = recon.reconstruct(physics, y, prior, method=method, sigma_y=sigma, seed=0, **options)
        part2[pname, mname] = res

rows = ["| deepinv physics | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
for pname in problems:
    cells = []
    for mname in methods:
        res = part2[pname, mname]
        s = score(res.x)
        cells.append(f"{s['psnr']:.2f} dB / {s['ssim']:.3f} ({res.seconds:.1f} s)")
    rows.append(f"| {pname} | " + " | ".join(cells) + " |")
display(Markdown("\n".join(rows)))

fig, ax = plt.subplots(len(problems), len(methods), figsize=(1.9 * len(methods), 1.9 * len(problems)),
                       layout="constrained")
for i, pname in enumerate(problems):
    for j, mname in enumerate(methods):
        ax[i, j].imshow(prior.denormalize(part2[pname, mname].x)[0, 0], vmin=-160, vmax=240)
        ax[i, j].set_xticks([])
        ax[i, j].set_yticks([])
        if i == 0:
            ax[i, j].set_title(mname.split(" (")[0])
    ax[i, 0].set_ylabel(pname.replace("deepinv ", "").split(" (")[0])
plt.show()

# %% [markdown]
# "analytic" is the physics' own fast inverse: `A_dagger` (deepinv's least squares) for the blur, the masked
# measurement for the inpainting (the missing pixels stay at 0, the middle of the prior's range), and deepinv's
# filtered back-projection (`A_dagger`) for `Tomography`.
#
# ### `recon`'s projector against deepinv's, inside the same sampler
#
# Same angles, same image, same sampler (DDS, 30 steps). The projector is the only difference. The two operators
# scale differently (pixel and detector units), and the samplers do not care about that. What differs is the time
# per application, because DDS applies AᵀA six times per step.

# %%
ours = ParallelBeamCT((N, N), angles=torch.linspace(0, 180, 31)[:-1].double())
y_ours, s_ours = measure(ours, x)
dds_ours = recon.reconstruct(ours, y_ours, prior, method="dds", sigma_y=s_ours, seed=0, steps=30)
dds_tomo = part2["deepinv Tomography (30 views)", "DDS (30 steps)"]


def per_call(physics, reps=5):
    """Milliseconds per A followed by Aᵀ (after one warm-up call, which builds recon's sparse matrix)."""
    physics.A_adjoint(physics.A(x))
    t0 = time.perf_counter()
    for _ in range(reps):
        physics.A_adjoint(physics.A(x))
    return (time.perf_counter() - t0) / reps * 1000


rows = ["| projector | A + Aᵀ (ms) | DDS PSNR (dB) | DDS seconds |", "|---|---|---|---|"]
for label, ph, res in (("recon ParallelBeamCT (sparse matrix)", ours, dds_ours),
                       ("deepinv Tomography (exact adjoint)", tomo, dds_tomo)):
    rows.append(f"| {label} | {per_call(ph):.1f} | {score(res.x)['psnr']:.2f} | {res.seconds:.1f} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# The CT benchmark (`benchmarks/README.md`) measures the projectors properly: at 256² with 180 views, one A + Aᵀ
# costs 18 ms with `recon` against 311 ms with deepinv's exact-adjoint `Tomography`.
#
# ## What this notebook does not show
#
# - **Tuned deepinv pipelines.** TV's λ and the PnP schedule were set once, by hand. deepinv's documentation shows
#   how to tune its solvers.
# - **deepinv's pretrained denoisers** (DRUNet, DiffUNet and others). They download weights, which this offline
#   notebook never does. Once you have the files locally, they plug into the same solvers.
# - **A library comparison.** One image and one seed. The sampler comparison with the same prior is in
#   `benchmarks/README.md` (deepinv DPS / DiffPIR rows).
