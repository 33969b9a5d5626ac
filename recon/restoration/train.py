r"""Training a restorer on paired data made on the fly: ``recon train-restorer`` and ``train_restorer()``.

Data. Clean slices come from ``recon.priors.train.load_training_slices`` (DICOM / NIfTI / PNG / TIFF / NumPy files
and folders, normalised to ``[-1, 1]``: the HU window for CT, per-file percentile scaling for MRI; unreadable files
reported by name and skipped, or ``on_error="stop"``), and batches from ``recon.priors.train.BatchMaker``'s
selection (random slices, a ``phantom_fraction`` of procedurally generated CT phantoms, crops with enough
foreground, 90° rotations and flips), with one change: every selected **full** image is degraded first
(``recon.restoration.degradations``) and the clean/degraded pair is cropped, rotated and flipped together, so that
the noise level and the streaks are those of whole-slice acquisitions, not of crops.

Cost. A CT degradation of a 512² slice (projection, noise, FBP) takes seconds on a CPU, so each training slice has
``realizations`` degraded versions (default 8), computed when first drawn and kept in a bounded cache
(``cache_mb``); version ``r`` of slice ``k`` is made with a generator seeded from ``(seed, k, r)`` and is therefore
the same whether cached, evicted and recomputed, or recomputed after a resume. Phantoms are new at every draw and
degraded at once (they are small). ``realizations=0`` degrades every draw afresh.

Training. ResShift: ``t`` uniform on ``0 … T-1``, ``x_t ~ q(x_t | x0, y0)``, MSE on the network's ``x0``; RDDM:
``t`` uniform on ``0 … T-1`` (T = 1000), ``I_t = x0 + ᾱ_t I_res + β̄_t ε``, L1 on the residual and on the noise
(``recon.restoration.model.Restorer.training_loss``). Adam with a linear warm-up, gradient-norm clipping at 1
(the RDDM trainer's), an exponential moving average (EMA) of the weights.

Checkpoints (``OUT/checkpoint.pt``, atomically every ``checkpoint_every`` steps, at the end and on Ctrl-C) hold the
weights, EMA, optimiser, step and the one data/noise generator's state; ``resume=True`` continues and, with the same
configuration, reproduces the uninterrupted run's weights exactly on CPU. The EMA weights are exported as a loadable
restorer (``OUT/restorer/``, model card with file *names* only) at every checkpoint; PNG grids (degraded / restored /
clean rows of a fixed batch) every ``sample_every`` steps; at the last step the restorer is measured on
``eval_files`` (held-out images: degraded with a fixed seed, restored, PSNR/SSIM against the clean image) and the
numbers go into the model card.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recon.priors.base import IntensityScale, IntensityWindow
from recon.priors.networks import count_parameters
from recon.priors.train import (
    BatchMaker,
    TrainConfig,
    load_training_slices,
    write_grid,
)
from recon.priors.trainer import Trainer
from recon.restoration.degradations import CT_DEGRADATIONS, DEGRADATIONS, Degradation
from recon.restoration.io import save_restorer
from recon.restoration.model import MODELS, Restorer, restorer_architecture
from recon.restoration.schedules import RDDMSchedule, ResShiftSchedule

__all__ = ["PRESETS", "RestorerConfig", "default_lowdose_ct_config", "evaluate_restorer", "train_restorer"]

log = logging.getLogger("recon.train")

DEFAULT_T = {"resshift": 15, "rddm": 1000}


@dataclass
class RestorerConfig:
    """Everything that defines a restorer training run (saved with every checkpoint).

    Data fields (``data`` … ``volume_axes``) mean what they mean in ``recon.priors.train.TrainConfig`` and are
    passed to its loader. ``task_params`` override ``recon.restoration.degradations.DEFAULT_PARAMS[task]``
    (``photons``, ``views``, ``filter``; ``factor``, ``upsample``). Schedule: ``diffusion_steps`` is T (default
    15 for ResShift, 1000 for RDDM); ``kappa``, ``p``, ``min_noise_level``, ``etas_end`` are ResShift's (defaults:
    the conference configuration), ``sum_scale`` is RDDM's (default 0.01, the official conditional default);
    ``sampling_steps`` the default sampler steps written into the card (ResShift: None = T; RDDM: 10).
    """

    data: list = field(default_factory=list)
    out: str = "restorer-run"
    model: str = "resshift"
    task: str = "lowdose-ct"
    task_params: dict = field(default_factory=dict)
    pixel_mm: float = 0.7
    modality: str = "ct"
    window: tuple = (-1000.0, 1500.0)
    percentile: float = 99.5
    exclude: tuple = ("693_",)
    crop: int = 64
    batch_size: int = 8
    steps: int = 5000
    lr: float = 2e-4
    lr_warmup: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    phantom_fraction: float = 0.25
    min_foreground: float = 0.05
    volume_axes: tuple = (2,)
    realizations: int = 8
    cache_mb: float = 1024.0
    channels: tuple = (32, 48, 64)
    num_res_blocks: int = 1
    diffusion_steps: int | None = None
    kappa: float = 2.0
    p: float = 0.3
    min_noise_level: float = 0.04
    etas_end: float = 0.99
    sum_scale: float = 0.01
    sampling_steps: int | None = None
    eval_files: list = field(default_factory=list)
    eval_seed: int = 0
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 1000
    log_every: int = 50
    on_error: str = "skip"
    device: str = "cpu"
    progress: bool = True
    preset: str | None = None
    init_from: str | None = None  # a restorer folder whose weights start the network and its EMA (warm start)

    def __post_init__(self):
        self.data = [str(p) for p in self.data]
        self.eval_files = [str(p) for p in self.eval_files]
        self.out = str(self.out)
        self.window = tuple(float(v) for v in self.window)
        self.channels = tuple(int(c) for c in self.channels)
        self.exclude = tuple(self.exclude)
        self.volume_axes = tuple(int(a) for a in self.volume_axes)
        self.task_params = {k: v for k, v in dict(self.task_params).items() if v is not None}
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.task not in DEGRADATIONS:
            raise ValueError(f"--task must be one of {', '.join(DEGRADATIONS)}, got {self.task!r}")
        if self.task in CT_DEGRADATIONS and self.modality != "ct":
            raise ValueError(f"task {self.task!r} simulates CT from HU: it needs modality 'ct'")
        if self.diffusion_steps is None:
            self.diffusion_steps = DEFAULT_T[self.model]
        for name in ("steps", "batch_size", "crop", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.realizations < 0:
            raise ValueError(f"realizations must be >= 0, got {self.realizations}")
        self.degradation()  # validates the task parameters
        self.schedule()
        self.prior_config()  # validates the data fields (crop vs. levels, on_error, ...)

    # the pieces this configuration defines
    def prior_config(self) -> TrainConfig:
        """The data part as a ``recon.priors.train.TrainConfig`` (what its loader and batch maker read)."""
        return TrainConfig(data=self.data, out=self.out, modality=self.modality, window=self.window,
                           percentile=self.percentile, exclude=self.exclude, crop=self.crop,
                           batch_size=self.batch_size, phantom_fraction=self.phantom_fraction,
                           min_foreground=self.min_foreground, volume_axes=self.volume_axes, channels=self.channels,
                           seed=self.seed, on_error=self.on_error)

    def degradation(self) -> Degradation:
        return Degradation(self.task, window=self.window, pixel_mm=self.pixel_mm, **self.task_params)

    def schedule(self):
        if self.model == "resshift":
            return ResShiftSchedule(int(self.diffusion_steps), self.p, self.kappa, self.min_noise_level, self.etas_end)
        return RDDMSchedule(int(self.diffusion_steps), self.sum_scale)

    def intensity(self):
        if self.modality == "ct":
            return IntensityWindow(self.window[0], self.window[1], "HU")
        if self.modality == "mri":
            return IntensityScale(self.percentile)
        raise ValueError(f"modality must be 'ct' or 'mri', got {self.modality!r}")

    def architecture(self) -> dict:
        return restorer_architecture(self.model, self.channels, self.num_res_blocks)

    def make_restorer(self, network: torch.nn.Module) -> Restorer:
        return Restorer(network, self.schedule(), self.degradation(), self.intensity(),
                        sampling_steps=self.sampling_steps, architecture=self.architecture())


def default_lowdose_ct_config(out: str, **overrides) -> RestorerConfig:
    """The built-in restorer's recipe (``--preset default-lowdose-ct``): the CT prior's data
    (``recon.priors.train.default_ct_config``'s files: pydicom's real CT slices, 693_* held out, plus random phantoms
    for 30 % of each batch), ``lowdose-ct`` at 5·10⁴ photons, ResShift with 15 steps and κ = 1 (the low end of the
    paper's realistic range κ ∈ [1, 2]: less injected noise, a more fidelity-oriented chain), channels (32, 48, 64),
    crops of 64, batches of 8, 6000 steps at lr 2·10⁻⁴ (about an hour on 2 free CPU cores), quality measured on the
    held-out 693_UNCR.dcm. The shipped restorers then ran 1000 more steps at a tenth of the rate, warm-started from
    this run (``--init-from RUN/restorer --lr 2e-5 --steps 1000 --seed 2``; the EMA of a constant-rate run still
    wanders: 33.47, 33.46, 33.36 dB on the benchmark's head crop at steps 4500, 5750, 6000, then 33.55 dB).
    """
    from pydicom.data import get_testdata_file

    from recon.priors.train import pydicom_ct_files

    held_out = get_testdata_file("693_UNCR.dcm", download=False)
    # the data the built-in restorers were trained on (the first CT prior's pydicom slices), whatever ./prior-data holds
    base = {"data": pydicom_ct_files(), "out": out, "model": "resshift", "task": "lowdose-ct",
            "phantom_fraction": 0.3, "channels": (32, 48, 64), "crop": 64, "batch_size": 8, "steps": 6000,
            "diffusion_steps": 15, "kappa": 1.0, "checkpoint_every": 250, "sample_every": 1000,
            "eval_files": [held_out] if held_out else [], "preset": "default-lowdose-ct"}
    if overrides.get("model", "resshift") != "resshift":
        base["diffusion_steps"] = None  # the other model's own default T
        base.pop("kappa")
    return RestorerConfig(**{**base, **overrides})


PRESETS = {"default-lowdose-ct": default_lowdose_ct_config}


# ------------------------------------------------------------------------------------------------------- data
class _PairBatchMaker(BatchMaker):
    """``BatchMaker``'s selection (slices, phantoms, crops, rotations, flips; one seeded generator) on
    clean/degraded pairs: ``next()`` returns ``(B, 2, crop, crop)``, channel 0 clean ``x0``, channel 1 degraded
    ``y0``, both in ``[-1, 1]``."""

    def __init__(self, slices, cfg: TrainConfig, generator: torch.Generator, degradation: Degradation,
                 realizations: int, seed: int, cache_mb: float):
        super().__init__(slices, cfg, generator)
        self.degradation = degradation
        self.realizations = int(realizations)
        self.seed = int(seed)
        self._index = {id(s): k for k, s in enumerate(slices)}
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, float(cache_mb) * 2**20

    def _slice_index(self, img: torch.Tensor) -> int | None:
        k = self._index.get(id(img))
        return k if k is not None and self.slices[k] is img else None

    def _degraded(self, img: torch.Tensor) -> torch.Tensor:
        k = self._slice_index(img)
        if k is None or self.realizations == 0:  # a phantom (new at each draw), or no caching
            if not self.degradation.stochastic:
                return self.degradation(img[None])[0]
            g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=self.g)))
            return self.degradation(img[None], g)[0]
        r = self._randint(self.realizations) if self.degradation.stochastic else 0
        key = (k, r)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + k) * 4099 + r) % 2**63)
        out = self.degradation(img[None], g)[0]
        self._cache[key] = out
        self._cache_bytes += out.numel() * out.element_size()
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()
        return out

    def _crop(self, img: torch.Tensor) -> torch.Tensor:
        """Degrade the full image, then crop/rotate/flip the pair as ``BatchMaker._crop`` does one image
        (same random draws; intensity jitter is not applied to pairs)."""
        pair = torch.stack([img, self._degraded(img)])
        c = self.cfg.crop
        if min(pair.shape[-2:]) < c:  # small image: replicate-pad up to the crop size
            ph, pw = max(0, c - pair.shape[-2]), max(0, c - pair.shape[-1])
            pair = torch.nn.functional.pad(pair[None], (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2),
                                           mode="replicate")[0]
        for _ in range(20):
            i, j = self._randint(pair.shape[-2] - c + 1), self._randint(pair.shape[-1] - c + 1)
            patch = pair[:, i : i + c, j : j + c]
            if float((patch[0] > -0.98).float().mean()) >= self.cfg.min_foreground:
                break
        patch = torch.rot90(patch, self._randint(4), dims=(-2, -1))
        if self._randint(2):
            patch = patch.flip(-1)
        return patch

    def next(self) -> torch.Tensor:
        return super().next()[:, 0]  # (B, 1, 2, c, c) -> (B, 2, c, c)


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate_restorer(restorer: Restorer, files, seed: int = 0, steps: int | None = None) -> dict:
    """Quality on held-out images: each file's slices (physical units, ``recon.datasets.slices.read_slices``) are
    degraded with the restorer's own degradation (``seed``), restored, and compared with the clean slices by
    ``recon.outputs.metrics`` (CT: the [-1000, 1000] HU window). Returns per-file and mean PSNR (dB) / SSIM of the
    degraded input and of the restoration, with the file *names*, seed, steps and seconds."""
    from recon.datasets.slices import read_slices
    from recon.outputs import metrics

    rows = []
    for f in files:
        ref = np.stack(list(read_slices(f)))
        t0 = time.perf_counter()
        degraded = restorer.degrade_array(ref, seed=seed)
        restored, nfe = restorer.restore_array(degraded, steps=steps, seed=seed)
        rows.append({"file": Path(f).name, "degraded": metrics(degraded, ref, restorer.is_ct),
                     "restored": metrics(restored, ref, restorer.is_ct), "nfe": nfe,
                     "seconds": time.perf_counter() - t0})
    if not rows:
        return {}

    def mean(kind, key):
        return float(np.mean([r[kind][key] for r in rows]))

    return {"files": rows, "seed": seed, "steps": rows[0]["nfe"],
            "degraded": {"psnr": mean("degraded", "psnr"), "ssim": mean("degraded", "ssim")},
            "restored": {"psnr": mean("restored", "psnr"), "ssim": mean("restored", "ssim")},
            "metric": "PSNR/SSIM on the [-1000, 1000] HU window (recon.outputs.metrics)"}


# --------------------------------------------------------------------------------------------------- training
def _names_only(cfg: RestorerConfig) -> dict:
    """The configuration as the model card keeps it: file names, not machine paths."""
    config = dataclasses.asdict(cfg)
    config["data"] = [Path(p).name for p in cfg.data]
    config["eval_files"] = [Path(p).name for p in cfg.eval_files]
    config["out"] = Path(cfg.out).name
    if cfg.init_from:
        config["init_from"] = Path(cfg.init_from).name
    return config


def _recipe(cfg: RestorerConfig) -> str:
    """The command line that trains ``cfg``: the preset plus the flags in which ``cfg`` differs from it (a warm
    start names its folder), or the plain command without a preset."""
    if not cfg.preset:
        return f"recon train-restorer --model {cfg.model} --task {cfg.task} -i DATA -o RUN --steps {cfg.steps}"
    flags = [f"--preset {cfg.preset}"]
    if cfg.model != "resshift":
        flags.append(f"--model {cfg.model}")
    base = PRESETS[cfg.preset](cfg.out, **({"model": cfg.model} if cfg.model != "resshift" else {}))
    for name, flag in (("steps", "--steps"), ("lr", "--lr"), ("seed", "--seed"), ("batch_size", "--batch-size"),
                       ("crop", "--crop")):
        if getattr(cfg, name) != getattr(base, name):
            flags.append(f"{flag} {getattr(cfg, name):g}" if isinstance(getattr(cfg, name), float)
                         else f"{flag} {getattr(cfg, name)}")
    if cfg.init_from:
        flags.append(f"--init-from {Path(cfg.init_from).name}")
    return "recon train-restorer " + " ".join(flags) + " -o RUN"


def _card(cfg: RestorerConfig, step: int, report: list, params: int, quality: dict | None) -> dict:
    from recon.priors.train import DATA_LICENCES, DEFAULT_CT_FILES

    skipped = [{"file": Path(s["file"]).name, "reason": s["reason"].replace(s["file"], Path(s["file"]).name)}
               for s in report[1:]]
    names = [Path(p).name for p in report[0]["used"]]
    pydicom_only = cfg.modality == "ct" and set(names) <= set(DEFAULT_CT_FILES)
    card = {
        "training": {"steps": step, "config": _names_only(cfg), "files": names,
                     "skipped": skipped, "parameters": params,
                     "phantoms": cfg.phantom_fraction if cfg.modality == "ct" else 0.0},
        "data_licence": (DATA_LICENCES["ct"] if pydicom_only else
                         "the training files listed in training.files (and recon's procedural CT phantoms, "
                         "BSD-3-Clause, for CT); check their own licences"),
        "intended_use": "Research and teaching only; NOT for clinical use. A small network trained for a short time "
                        f"to undo one simulated degradation ({cfg.task}); it may remove or invent structures, and "
                        "it knows nothing of other degradations, scanners or doses.",
        "recipe": _recipe(cfg),
    }
    if cfg.init_from:  # a warm start: the steps of the run it continued are recorded too
        try:
            before = json.loads((Path(cfg.init_from) / "model_card.json").read_text())["training"]["steps"]
        except (OSError, ValueError, KeyError, TypeError):
            before = None
        card["training"]["init_from"] = {"folder": Path(cfg.init_from).name, "steps": before}
        card["training"]["total_steps"] = step + before if isinstance(before, int) else None
    if quality:
        card["quality"] = quality
    return card


def train_restorer(cfg: RestorerConfig, resume: bool = False, max_steps_this_run: int | None = None) -> dict:
    """Train (or resume) a restorer; returns a summary (step, losses, paths, skipped files by path, quality).

    ``max_steps_this_run`` stops early (as an interruption would) after that many steps, with a checkpoint (used to
    test exact resumption)."""
    trainer, arch = Trainer.start(cfg, "restorer", resume, RestorerConfig(data=cfg.data), _FREE)
    net, ema, out, device = trainer.net, trainer.ema, Path(cfg.out), torch.device(cfg.device)
    tcfg = cfg.prior_config()
    slices, report = load_training_slices(tcfg)
    batches = _PairBatchMaker(slices, tcfg, trainer.gen, cfg.degradation(), cfg.realizations, cfg.seed, cfg.cache_mb)
    model = cfg.make_restorer(net).to(device)
    quality: dict = {}

    def exported() -> Restorer:
        r = cfg.make_restorer(ema).to(device)
        r.network.eval()
        return r

    def loss_of_step() -> torch.Tensor:
        pairs = batches.next().to(device)
        model.network.train()
        return model.training_loss(pairs[:, :1], pairs[:, 1:2], trainer.gen)

    def on_step(step: int) -> None:
        if step == cfg.steps and cfg.eval_files:
            quality["held_out"] = q = evaluate_restorer(exported(), cfg.eval_files, seed=cfg.eval_seed)
            log.info("held-out quality: degraded %.2f dB / %.3f, restored %.2f dB / %.3f", q["degraded"]["psnr"],
                     q["degraded"]["ssim"], q["restored"]["psnr"], q["restored"]["ssim"])

    def on_save() -> None:
        save_restorer(exported(), out / "restorer", arch,
                      card=_card(cfg, trainer.step, report, count_parameters(ema), quality.get("held_out")))

    end = cfg.steps if max_steps_this_run is None else min(cfg.steps, trainer.step + max_steps_this_run)
    summary = trainer.run(loss_of_step, end=end, total=cfg.steps, desc="train-restorer", progress=cfg.progress,
                          log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                          sample_every=cfg.sample_every, on_save=on_save, on_step=on_step,
                          on_samples=lambda: _write_samples(cfg, slices, tcfg, batches, exported(), out, trainer.step,
                                                            device))
    losses = trainer.losses
    return {"step": trainer.step, **summary, "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "checkpoint": str(trainer.ckpt_path), "restorer": str(out / "restorer"), "skipped": report[1:],
            "parameters": count_parameters(net), "quality": quality.get("held_out")}


# fields a resume may change: they do not change the weights
_FREE = ("steps", "progress", "device", "checkpoint_every", "sample_every", "log_every", "out", "eval_files",
         "eval_seed", "cache_mb")


def _write_samples(cfg, slices, tcfg, batches, restorer, out: Path, step: int, device) -> None:
    """A grid of degraded / restored / clean for a fixed batch drawn from its own generator (the training stream is
    untouched)."""
    small = dataclasses.replace(tcfg, batch_size=4)
    maker = _PairBatchMaker(slices, small, torch.Generator().manual_seed(cfg.seed + 1), batches.degradation,
                            cfg.realizations, cfg.seed, cfg.cache_mb)
    pairs = maker.next().to(device)
    restored, _ = restorer.restore(pairs[:, 1:2], generator=torch.Generator().manual_seed(0))
    write_grid(torch.cat([pairs[:, 1:2], restored, pairs[:, :1]]).cpu(), out / f"samples_{step:07d}.png")

