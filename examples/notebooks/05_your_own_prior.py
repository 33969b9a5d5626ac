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
# # 5 · Your own prior: load a checkpoint, or train one
#
# The built-in priors are small. For real work you bring your own, in one of two ways:
#
# 1. **Load a checkpoint from a local file**, from one of the four diffusion families that medical imaging
#    projects release: guided-diffusion / ADM (as in DPS), MONAI's `DiffusionModelUNet`, diffusers'
#    `UNet2DModel`, and score-SDE NCSN++ (as in DiffusionMBIR). `recon.priors.loaders` wraps each one in a
#    `DiffusionPrior` with the family's own schedule and parameterisation, so the samplers need no change.
#    Nothing is downloaded, and nothing arbitrary is unpickled.
# 2. **Train a prior on a folder of DICOM / NIfTI files** with `recon.priors.train_prior` (or `recon
#    train-prior`), interrupt it and resume it. On the CPU, a resumed run reproduces the uninterrupted run's
#    weights exactly.
#
# **How these results were obtained.** No real checkpoint ships offline, so we first *make* tiny checkpoint
# files of each family, with random weights, saved the way each project saves them (as
# `tests/test_prior_loaders.py` does). Then we load them. A random network denoises nothing, so the point of
# part 1 is the plumbing (files, conventions, checks), not image quality. The training in part 2 is deliberately
# tiny (a 2-level UNet, 32² crops, batches of 4, 120 steps, run twice, seed 0). A usable prior needs thousands
# of steps; the built-in ones had about 4,900.

# %%
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

with warnings.catch_warnings():  # tqdm's notebook progress bars need ipywidgets, which this notebook does not use
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

import diffusers
import matplotlib.pyplot as plt
import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet
from nibabel.testing import data_path
from pydicom.data import get_testdata_file
from safetensors.torch import save_file

import recon
from recon.priors import TrainConfig, load_prior, sample_unconditional, train_prior
from recon.priors.loaders import (
    _adm_config,  # private: used only to fabricate a tiny stand-in ADM file (see below)
    _configurable_diffunet,  # private: idem
    detect_family,
    load_adm_checkpoint,
    load_diffusers_unet,
    load_external_prior,
    load_monai_checkpoint,
    load_ncsnpp_checkpoint,
)

torch.set_num_threads(int(os.environ.get("RECON_NOTEBOOK_THREADS", "2")))
plt.rcParams.update({"figure.dpi": 72, "image.cmap": "gray", "axes.titlesize": 10})
print(f"recon {recon.__version__}, torch {torch.__version__}, CPU threads: {torch.get_num_threads()}")
work = Path(tempfile.mkdtemp(prefix="recon-nb5-"))


def randomize(net, seed=0, scale=0.1):
    """Random weights everywhere: these families zero-initialise their last convolution, so a freshly built
    network would output exactly 0 and hide any mistake in the plumbing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def describe(prior):
    s = prior.schedule
    return (f"{prior.card['family']:9s} parameterization {prior.parameterization!r:7s} "
            f"schedule {type(s).__name__} (σ {s.sigma_min:.3g} … {s.sigma_max:.3g}), "
            f"{sum(p.numel() for p in prior.network.parameters()):,} parameters, {prior.spatial_dims}D")


# %% [markdown]
# ## Part 1 · Four checkpoint families, from local files
#
# ### MONAI `DiffusionModelUNet`
#
# A MONAI state dict (`.pt`, `.pth` or `.safetensors`) plus the network's constructor arguments, given as a dict or
# a JSON file. The scheduler options may travel in the same JSON (MONAI bundle style); the defaults are
# `DDPMScheduler`'s (linear β, 1000 steps, ε-prediction).

# %%
monai_args = dict(spatial_dims=2, in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 16),
                  attention_levels=(False, True), norm_num_groups=8, num_head_channels=8)
monai_dir = work / "monai"
monai_dir.mkdir()
save_file({k: v.contiguous() for k, v in randomize(DiffusionModelUNet(**monai_args)).state_dict().items()},
          str(monai_dir / "model.safetensors"))
(monai_dir / "config.json").write_text(json.dumps({"network": monai_args, "scheduler": {
    "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195, "prediction_type": "v_prediction"}}))

monai_prior = load_monai_checkpoint(monai_dir / "model.safetensors", monai_dir / "config.json")
print(describe(monai_prior))

# %% [markdown]
# ### diffusers `UNet2DModel`
#
# A diffusers folder: a pipeline folder (`unet/` and `scheduler/`, as `save_pretrained` writes it) or a bare UNet
# folder. The schedule and the prediction type come from `scheduler_config.json`. The model is built from its
# local `config.json`, and no hub is contacted.

# %%
unet = randomize(diffusers.UNet2DModel(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=8), seed=1)
scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=False)
diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(work / "ddpm-tiny")
print(sorted(str(p.relative_to(work)) for p in (work / "ddpm-tiny").rglob("*.json")))

diffusers_prior = load_diffusers_unet(work / "ddpm-tiny")
print(describe(diffusers_prior))

# %% [markdown]
# **Are the conventions right?** `prior.denoise(x, σ)` must be the family's own Tweedie estimate. For diffusers, that
# is the `pred_original_sample` of its scheduler's `step` at the timestep whose noise level is σ (VP: a state
# `x_t = √ᾱ (x₀ + σ n)` with `σ = √((1 − ᾱ)/ᾱ)`).

# %%
t = 420
abar = float(scheduler.alphas_cumprod[t])
sigma = ((1 - abar) / abar) ** 0.5
g = torch.Generator().manual_seed(5)
x0, n = torch.rand(1, 1, 16, 16, generator=g) * 2 - 1, torch.randn(1, 1, 16, 16, generator=g)
x_sigma = x0 + sigma * n
with torch.no_grad():
    x_t = abar**0.5 * x_sigma
    theirs = scheduler.step(unet(x_t, t).sample, t, x_t).pred_original_sample
    ours = diffusers_prior.denoise(x_sigma, sigma)
print(f"t = {t}: σ = {sigma:.3f}; max |recon − diffusers| = {float((ours - theirs).abs().max()):.1e}")

# %% [markdown]
# ### guided-diffusion / ADM
#
# A `UNetModel` state dict, as released by guided-diffusion and DPS (`ffhq_10m.pt`, `256x256_diffusion_uncond.pt`).
# `load_adm_checkpoint` builds the architecture from guided-diffusion's `create_model` keywords, using deepinv's
# port of its blocks (the same parameter names), and it defaults to DPS's FFHQ configuration. A real FFHQ file has
# 93 M parameters. To *make* a tiny stand-in file we borrow the loader's own builder: a private helper, used
# here only to write the file, because the guided-diffusion package itself is not on the package index.

# %%
adm_kw = dict(image_size=32, in_channels=3, num_channels=32, num_res_blocks=1, channel_mult="1,2",
              attention_resolutions="16", num_head_channels=16)
cfg = _adm_config(32, 3, False, True, 32, 1, "1,2", "16", 4, 16, -1, True, True, False, 0.0)
torch.save(randomize(_configurable_diffunet(**cfg), seed=2).state_dict(), work / "adm_tiny.pt")

adm_prior = load_adm_checkpoint(work / "adm_tiny.pt", **adm_kw)
print(describe(adm_prior))

# %% [markdown]
# ### score-SDE NCSN++ (DiffusionMBIR)
#
# score_sde saves `{"model": ..., "ema": {"shadow_params": [...]}, "step": ...}` with DataParallel's `module.`
# prefixes. No installable package reproduces NCSN++'s parameter names, so you build the network with
# score_sde's (or DiffusionMBIR's) `models/ncsnpp.py` and pass it as `network=`. `recon` then unwraps the
# checkpoint, copies the EMA weights in, and wraps the model as a variance-exploding score network. Below, a
# 5-layer stand-in with score_sde's conventions (a flat `all_modules` list, a Fourier embedding of log σ, and an
# output divided by σ) plays the part of NCSN++.

# %%
class TinyScoreNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        fourier = torch.nn.Linear(1, 8, bias=False)
        fourier.weight.requires_grad_(False)  # score_sde's Gaussian Fourier projection is not trained
        self.all_modules = torch.nn.ModuleList([fourier, torch.nn.Linear(16, 8), torch.nn.Conv2d(1, 8, 3, padding=1),
                                                torch.nn.GroupNorm(4, 8), torch.nn.Conv2d(8, 1, 3, padding=1)])

    def forward(self, x, sigma):
        m = self.all_modules
        proj = 2 * np.pi * m[0](torch.log(sigma)[:, None])
        temb = m[1](torch.cat([proj.sin(), proj.cos()], 1))
        h = m[2](x) + temb[:, :, None, None]
        return m[4](torch.nn.functional.silu(m[3](h))) / sigma[:, None, None, None]


net = randomize(TinyScoreNet(), seed=3)
shadow = [p.detach() + 0.01 for p in net.parameters() if p.requires_grad]  # the EMA differs from the raw weights
torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()},
            "ema": {"decay": 0.999, "num_updates": 1, "shadow_params": shadow}, "step": 1234},
           work / "checkpoint.pth")

ncsn_prior = load_ncsnpp_checkpoint(work / "checkpoint.pth", network=TinyScoreNet(), sigma_max=50.0)
print(describe(ncsn_prior), f"| step {ncsn_prior.card['step']}, EMA weights: {ncsn_prior.card['ema']}")

# %% [markdown]
# ### One entry point, and the checks
#
# `detect_family` tells the families apart by their files and parameter names, and `load_external_prior` dispatches
# to the right loader. Whatever the family, a prior with wrong names or shapes is refused, naming the key:
# nothing is ever half-loaded.

# %%
for path, options in [(monai_dir / "model.safetensors", {"config": str(monai_dir / "config.json")}),
                      (work / "ddpm-tiny", {}), (work / "adm_tiny.pt", adm_kw),
                      (work / "checkpoint.pth", {"network": TinyScoreNet()})]:
    prior = load_external_prior(path, **options)
    print(f"{path.name:18s} → detected {detect_family(path):9s} → {type(prior).__name__}, "
          f"denoise(16×16 noise, σ = 1) → {tuple(prior.denoise(torch.randn(1, prior.channels, 16, 16), 1.0).shape)}")

bad = torch.load(work / "adm_tiny.pt", weights_only=True)
bad["out.2.weight"] = bad["out.2.weight"][:, :8]  # a checkpoint of a different architecture
torch.save(bad, work / "adm_wrong.pt")
try:
    load_adm_checkpoint(work / "adm_wrong.pt", **adm_kw)
except ValueError as err:
    print("refused:", str(err).replace(str(work), "…"))

# %% [markdown]
# Any of these priors now goes into `recon.reconstruct(physics, y, prior, method=...)` like the built-in ones. The
# intensity convention is yours to set: external checkpoints work in `[-1, 1]` (`intensity=None`), and you can pass
# `intensity=IntensityWindow(low, high)` (CT) or `IntensityScale()` (MRI) to the loader.
#
# ## Part 2 · Train a prior on a folder of DICOM and NIfTI files
#
# The training data is a folder holding a DICOM file (pydicom's `MR_small.dcm`) and a NIfTI volume (nibabel's
# `anatomical.nii`, sliced along its third axis), plus a file that is not an image, to show what happens to it.
# `TrainConfig` holds everything that defines a run, and `modality="mri"` scales each file by its 99.5th percentile
# into [−1, 1]. The recipe is EDM's (Karras et al. 2022): log-normal noise levels, the EDM loss weighting, Adam,
# an EMA of the weights, and random crops, flips and 90° rotations.

# %%
data = work / "scans"
data.mkdir()
shutil.copy(get_testdata_file("MR_small.dcm"), data / "MR_small.dcm")
shutil.copy(Path(data_path) / "anatomical.nii", data / "anatomical.nii")
(data / "notes.txt").write_text("not an image")


def config(out, steps):
    return TrainConfig(data=[str(data)], out=str(out), modality="mri", crop=32, batch_size=4, channels=(16, 32),
                       steps=steps, lr=1e-3, lr_warmup=10, checkpoint_every=30, sample_every=0, log_every=30,
                       seed=0, progress=False)


# %% [markdown]
# Three runs of the same configuration:
#
# - **A**: 120 steps in one go.
# - **B**: the same run, stopped after 60 steps. `max_steps_this_run` stops it exactly as Ctrl-C would (train_prior
#   catches `KeyboardInterrupt` and writes the checkpoint), which leaves `RUN/checkpoint.pt` and an exported
#   prior in `RUN/prior/`.
# - **B, resumed**: continued with `resume=True` up to 120 steps.

# %%
full = train_prior(config(work / "run-A", 120))
first = train_prior(config(work / "run-B", 120), max_steps_this_run=60)
print(f"run B stopped at step {first['step']}; files: {sorted(p.name for p in (work / 'run-B').iterdir())}")
print("skipped:", [f"{Path(s['file']).name}: {s['reason'].split(': ', 1)[-1]}" for s in first["skipped"]])
resumed = train_prior(config(work / "run-B", 120), resume=True)
print(f"run A: step {full['step']}, final loss {full['final_loss']:.4f}; "
      f"run B resumed: step {resumed['step']}, final loss {resumed['final_loss']:.4f}; "
      f"{full['parameters']:,} parameters")

# %% [markdown]
# **Is the resume exact?** The checkpoint holds the weights, the EMA, the optimiser state, the step and the state of
# the single random generator that draws the data, the noise levels and the noise. So the resumed run must
# reproduce run A bit for bit.

# %%
a = torch.load(work / "run-A" / "checkpoint.pt", weights_only=True)
b = torch.load(work / "run-B" / "checkpoint.pt", weights_only=True)
diffs = {part: max(float((a[part][k] - b[part][k]).abs().max()) for k in a[part]) for part in ("model", "ema")}
print(f"max |A − B| over all weights: model {diffs['model']:.1e}, EMA {diffs['ema']:.1e}; "
      f"identical losses: {a['losses'] == b['losses']}")

fig, ax = plt.subplots(figsize=(5, 2.8), layout="constrained")
ax.semilogy(a["losses"], label="A: uninterrupted", lw=3, alpha=0.5)
ax.semilogy(range(60, 120), b["losses"][60:], "k--", label="B: resumed at step 60")
ax.axvline(60, color="gray", ls=":")
ax.set_xlabel("step")
ax.set_ylabel("EDM training loss")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Use the trained prior, and see why it needs more training
#
# `RUN/prior/` is a prior folder in `recon`'s own format (`model.safetensors` + `model_card.json`), loaded with
# `load_prior(path)` exactly like the built-in ones. Unconditional samples show what a prior has learned. Here
# are 8 samples each from our 120-step prior and from the built-in MRI prior (5,850 steps: 4,850 on the MNI152
# template, then 1,000 on the recipe's MR data), with the EDM Heun sampler at 18 steps and seed 0.

# %%
mine = load_prior(work / "run-B" / "prior")
print(f"loaded {Path(mine.card['path']).name}/: trained {mine.card['training']['steps']} steps on "
      f"{[Path(f).name for f in mine.card['training']['files']]}")
builtin = load_prior("default-mri")
fig, ax = plt.subplots(2, 8, figsize=(10, 2.9), layout="constrained")
for row, (name, prior) in enumerate((("this notebook's prior (120 steps)", mine),
                                     ("built-in MRI prior (5,850 steps)", builtin))):
    samples = sample_unconditional(prior, (8, 1, 48, 48), steps=18, generator=torch.Generator().manual_seed(0))
    for k in range(8):
        ax[row, k].imshow(samples[k, 0].clamp(-1, 1), vmin=-1, vmax=1)
        ax[row, k].set_xticks([])
        ax[row, k].set_yticks([])
    ax[row, 0].set_ylabel(name.split(" (")[0].replace("this notebook's", "ours:"), fontsize=8)
fig.suptitle("top: this notebook's prior (120 steps) · bottom: built-in MRI prior (5,850 steps)", fontsize=9)
plt.show()

# %% [markdown]
# After 120 steps the network makes noise-like texture: it has learned little beyond the intensity statistics.
# After 5,850 steps the built-in prior makes cortex-like folds and tissue texture, but no recognisable
# anatomy. That is one more sign of how weak it is (notebook 2). The same run from the command line:
#
# ```bash
# recon train-prior -i scans/ -o runs/my-mri --modality mri --steps 20000
# recon train-prior -i scans/ -o runs/my-mri --modality mri --steps 20000 --resume    # after Ctrl-C or a crash
# recon reconstruct -i meas.npz -o rec.nii.gz --method dps --prior runs/my-mri/prior
# ```
#
# `--init-from recon/priors/weights/default-mri` starts from the built-in weights instead of from scratch.
#
# ## What this notebook does not show
#
# - **Real external checkpoints.** The four files above are tiny and random, made here. Released checkpoints
#   load the same way, but you fetch them yourself: `recon` never downloads. Class-conditional ADM checkpoints are
#   refused.
# - **A useful trained prior.** 120 steps on two small files is a demonstration of the mechanics. The built-in
#   priors' recipes (`recon train-prior --preset default-ct` / `default-mri`) take hours on a CPU.
# - **Exact resumption on a GPU.** It is guaranteed on the CPU. GPU kernels are not bitwise deterministic.
