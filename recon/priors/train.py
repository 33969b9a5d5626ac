r"""Training a 2D (slice) diffusion prior on a folder of images: ``recon train-prior`` and ``train_prior()``.

Recipe (EDM, Karras et al. 2022): noise levels :math:`\ln\sigma \sim \mathcal N(P_{mean}, P_{std}^2)`, loss
:math:`\lambda(\sigma)\,\|D(x_0 + \sigma n, \sigma) - x_0\|^2` with
:math:`\lambda = (\sigma^2+\sigma_d^2)/(\sigma\sigma_d)^2`,
Adam, an exponential moving average (EMA) of the weights, random crops, flips and 90° rotations, optional
procedurally generated CT phantoms, mixed precision (bfloat16 autocast) on GPU.

Checkpoints (``OUT/checkpoint.pt``, written atomically every ``checkpoint_every`` steps and on Ctrl-C) hold the
weights, EMA, optimizer, step and random-generator state; ``resume=True`` continues from one and, with the
same configuration, reproduces the uninterrupted run's weights exactly on CPU (the data stream is drawn from
one seeded generator whose state is checkpointed). The EMA weights are exported as a prior in ``recon``'s
format (``OUT/prior/``) at every checkpoint, and sample grids as PNG every ``sample_every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recon.datasets.io import atomic_write_bytes
from recon.datasets.phantoms import random_ct_phantom
from recon.datasets.slices import SliceReadError, find_files, read_slices
from recon.priors.base import DiffusionPrior, IntensityScale, IntensityWindow
from recon.priors.io import save_prior
from recon.priors.networks import build_network, count_parameters
from recon.priors.schedules import EDMSchedule, karras_sigmas
from recon.priors.trainer import LR_DECAYS

__all__ = [
    "DEFAULT_CT_FILES",
    "BatchMaker",
    "TrainConfig",
    "atomic_torch_save",
    "default_ct_config",
    "default_mri_config",
    "export_prior",
    "focus_weights",
    "mni152_template_path",
    "network_and_ema",
    "prior_data_dir",
    "pydicom_ct_files",
    "sample_unconditional",
    "through_plane_slices",
    "train_prior",
    "write_grid",
    "zoomed_out",
]

log = logging.getLogger("recon.train")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with every checkpoint)."""

    data: list = field(default_factory=list)  # files / folders
    out: str = "prior-run"
    modality: str = "ct"  # "ct": HU window; "mri": per-slice percentile scaling
    window: tuple = (-1000.0, 1500.0)  # HU window mapped to [-1, 1] (CT)
    percentile: float = 99.5  # MRI magnitude scaling
    exclude: tuple = ("693_",)  # file-name prefixes never used for training (held-out images)
    crop: int = 64
    batch_size: int = 16
    steps: int = 10_000
    lr: float = 2e-4
    lr_warmup: int = 200
    lr_decay: str = "constant"  # after the warm-up: "constant", or "cosine" to 0 at `steps`
    ema_decay: float = 0.999
    phantom_fraction: float = 0.25  # share of each batch drawn from random CT phantoms (CT only)
    min_foreground: float = 0.05  # reject crops with less than this share of non-background pixels
    volume_axes: tuple = (2,)  # NIfTI volumes: axes to slice along ((0, 1, 2): all three orientations)
    intensity_jitter: float = 0.0  # random intensity scale in [1 - j, 1 + j] (MRI: robustness to normalisation)
    rotation_deg: float = 0.0  # small random rotations in [-r, r] degrees (bilinear resampling of the crop)
    scale_range: tuple = (1.0, 1.0)  # random zoom: source pixels per output pixel, log-uniform in [lo, hi]; from
    # 2 up, the source is first area-averaged by the zoom's integer part (no aliasing in coarse, larger views)
    through_plane_stride: int = 0  # NIfTI volumes (≥ 32 voxels each way): also every k-th slice along the other
    # two axes, resampled to the in-plane spacing (0: off)
    p_mean: float = -1.0
    p_std: float = 1.4
    focus_hu: tuple | None = None  # CT: pixels whose noisy, 3×3-averaged value lies in this HU range weigh more
    focus_weight: float = 0.0  # their extra loss weight (0: off); a function of the noisy input only
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    channels: tuple = (32, 48, 64, 64)
    num_res_blocks: int = 1
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 2000
    log_every: int = 50
    on_error: str = "skip"  # unreadable training file: "skip" (reported) or "stop"
    device: str = "cpu"
    progress: bool = True
    init_from: str | None = None  # a recon prior folder whose weights start the network and its EMA

    def __post_init__(self):
        self.data = [str(p) for p in self.data]
        self.out = str(self.out)
        self.window = tuple(float(v) for v in self.window)
        self.channels = tuple(int(c) for c in self.channels)
        self.exclude = tuple(self.exclude)
        self.volume_axes = tuple(int(a) for a in self.volume_axes)
        self.scale_range = tuple(float(v) for v in self.scale_range)
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi, got {self.scale_range!r}")
        if self.focus_hu is not None:
            self.focus_hu = tuple(float(v) for v in self.focus_hu)
            if self.modality != "ct" or len(self.focus_hu) != 2 or self.focus_hu[0] >= self.focus_hu[1]:
                raise ValueError(f"focus_hu must be an increasing (low, high) HU pair on CT, got {self.focus_hu!r} "
                                 f"for modality {self.modality!r}")
        if self.focus_weight < 0:
            raise ValueError(f"focus_weight must be >= 0, got {self.focus_weight}")
        if self.focus_weight > 0 and self.focus_hu is None:
            raise ValueError("focus_weight needs focus_hu (the HU range it applies to)")
        if self.on_error not in ("skip", "stop"):
            raise ValueError(f"on_error must be 'skip' or 'stop', got {self.on_error!r}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if self.crop % 2 ** (len(self.channels) - 1):
            raise ValueError(f"crop ({self.crop}) must be a multiple of {2 ** (len(self.channels) - 1)} for "
                             f"{len(self.channels)} resolution levels")

    def architecture(self) -> dict:
        return {
            "name": "recon.ConditionedUNet",
            "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": list(self.channels),
                     "num_res_blocks": self.num_res_blocks,
                     "norm_num_groups": min(16, math.gcd(*self.channels))},
        }


# Real CT slices that ship with pydicom (test files) and pydicom-data, used by the first built-in prior's recipe
# (kept for reference; the current recipe is recon.priors.recipe). The head CT "693_*" is held out.
DEFAULT_CT_FILES = (
    "CT_small.dcm",  # 128², pydicom test file
    "J2K_pixelrep_mismatch.dcm",  # 512² head, pydicom test file
    "explicit_VR-UN.dcm",  # 512² abdomen (pancreas), pydicom-data
    "eCT_Supplemental.dcm",  # 2 × 512² head perfusion frames, pydicom-data
    "bad_sequence.dcm",  # 512² neck (JPEG lossless: needs pylibjpeg-libjpeg), pydicom-data
)

PRIOR_DATA_ENV = "RECON_PRIOR_DATA"


def prior_data_dir(modality: str) -> Path:
    """The recipe's training folder for ``modality``: ``$RECON_PRIOR_DATA/<modality>/train`` (default root
    ``prior-data``), written by ``python -m recon.priors.recipe --out prior-data/<modality> --modality
    <modality>``. Raises FileNotFoundError (one line, with that command) when it is missing."""
    root = Path(os.environ.get(PRIOR_DATA_ENV, "prior-data"))
    folder = root / modality / "train"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no prepared {modality} training data; run `python -m recon.priors.recipe "
                                f"--out {root / modality} --modality {modality}` (or set {PRIOR_DATA_ENV})")
    return folder


def pydicom_ct_files() -> list[str]:
    """The first built-in CT prior's files (:data:`DEFAULT_CT_FILES`) that are installed, located offline."""
    from pydicom.data import get_testdata_file

    return [f for f in (get_testdata_file(n, download=False) for n in DEFAULT_CT_FILES) if f]


def _preset_data(modality: str) -> list[str]:
    """The recipe folder, or (with a warning) the first built-in prior's data when the recipe has not been run."""
    try:
        return [str(prior_data_dir(modality))]
    except FileNotFoundError as err:
        log.warning("%s; using the first built-in prior's data instead", err)
        return pydicom_ct_files() if modality == "ct" else [mni152_template_path()]


def default_ct_config(out: str, **overrides) -> TrainConfig:
    """The recipe of the built-in CT prior: the recipe's CT training folder (:func:`prior_data_dir`: the InVesalius
    head CT minus its held-out slab, pydicom's real CT slices minus 693_* and CT_small) plus 15 % random phantoms;
    small rotations and zooms (0.5–1.25 source pixels per pixel), through-plane slices, noise levels weighted
    towards low σ (P_mean = −1.8), soft tissue ([−100, 200] HU) weighted 5× in the loss (``focus_hu``,
    ``docs/training.md``). The shipped weights continued the previous built-in prior (``init_from``).
    Without the recipe folder the data falls back, with a warning, to :func:`pydicom_ct_files` (what
    ``recon.restoration``'s preset uses).
    """
    base = {"data": _preset_data("ct"), "out": out, "modality": "ct", "phantom_fraction": 0.15,
            "rotation_deg": 10.0, "scale_range": (0.5, 1.25), "through_plane_stride": 8, "intensity_jitter": 0.03,
            "p_mean": -1.8, "p_std": 1.5, "min_foreground": 0.2, "focus_hu": (-100.0, 200.0), "focus_weight": 4.0,
            "steps": 20_000, "checkpoint_every": 250,
            "sample_every": 1000}
    return TrainConfig(**{**base, **overrides})


def mni152_template_path() -> str:
    """The MNI152 (ICBM 2009a symmetric) 1 mm T1 template that nilearn ships inside its package."""
    try:
        import nilearn
    except ImportError as err:
        raise ImportError("the default MRI prior's recipe needs nilearn: pip install diffrecon[train]") from err
    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nilearn's MNI152 template is missing from this nilearn installation")
    return str(path)


def default_mri_config(out: str, **overrides) -> TrainConfig:
    """The recipe of the built-in brain MRI prior: the recipe's MR training folder (:func:`prior_data_dir`: Colin27,
    MNI152, pydicom's and dipy's MR slices, nibabel's EPI; held out: MR_small and its study, anatomical.nii and
    its derivatives, emri_small), slices along the third axis plus every 4th through-plane slice, each file scaled
    by its 99.5th percentile, intensity jitter, small rotations and zooms, low-σ weighted noise levels."""
    base = {"data": _preset_data("mri"), "out": out, "modality": "mri", "phantom_fraction": 0.0,
            "volume_axes": (2,), "through_plane_stride": 4, "intensity_jitter": 0.15, "rotation_deg": 10.0,
            "scale_range": (0.5, 1.25), "p_mean": -1.8, "p_std": 1.5, "min_foreground": 0.2, "steps": 20_000,
            "checkpoint_every": 250, "sample_every": 1000}
    return TrainConfig(**{**base, **overrides})


def _normalizer(cfg: TrainConfig):
    if cfg.modality == "ct":
        return IntensityWindow(cfg.window[0], cfg.window[1], "HU")
    if cfg.modality == "mri":
        return IntensityScale(cfg.percentile)
    raise ValueError(f"modality must be 'ct' or 'mri', got {cfg.modality!r}")


def load_training_slices(cfg: TrainConfig) -> tuple[list[torch.Tensor], list[dict]]:
    """Read every slice of the configured files, normalised to [-1, 1] (clipped). Returns slices and a
    report of skipped files (``on_error="skip"``) — or raises ``SliceReadError`` (``on_error="stop"``)."""
    slices, skipped, used = [], [], []
    for path in find_files(cfg.data):
        if any(path.name.startswith(prefix) for prefix in cfg.exclude):
            continue
        try:
            file_slices = list(read_slices(path, cfg.volume_axes)) + through_plane_slices(path, cfg)
        except SliceReadError as err:
            if cfg.on_error == "stop":
                raise
            skipped.append({"file": str(path), "reason": str(err)})
            log.warning("skipping %s", err)
            continue
        if cfg.modality == "mri":  # one scale per file (volume), as at inference
            magnitudes = np.concatenate([np.abs(s).ravel() for s in file_slices])
            q = float(np.percentile(magnitudes, cfg.percentile))
            scale = q if q > 0 else 1.0
        for s in file_slices:
            t = torch.from_numpy(s)
            t = 2 * t.abs() / scale - 1 if cfg.modality == "mri" else _normalizer(cfg).normalize(t)
            if float((t > -0.98).double().mean()) < cfg.min_foreground:
                continue  # (nearly) empty slice: nothing to learn
            slices.append(t.clamp(-1, 1).float())
        used.append(str(path))
    return slices, [{"used": used}, *skipped]


def through_plane_slices(path: Path, cfg: TrainConfig) -> list[np.ndarray]:
    """Every ``cfg.through_plane_stride``-th slice of a NIfTI volume along the two axes not in ``cfg.volume_axes``,
    resampled (linear) to the finest voxel spacing so anatomy keeps its proportions; [] for other files, for
    volumes under 32 voxels along an axis, or when the stride is 0."""
    stride = cfg.through_plane_stride
    name = path.name.lower()
    if stride <= 0 or not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return []
    import nibabel as nib
    from scipy.ndimage import zoom

    img = nib.load(str(path))
    if len(img.shape) != 3 or min(img.shape) < 32:
        return []
    data = np.asarray(img.get_fdata(dtype=np.float64))
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    factors = zooms / zooms.min()
    out = []
    for ax in (a for a in range(3) if a not in cfg.volume_axes):
        keep = [a for a in range(3) if a != ax]
        for k in range(stride // 2, data.shape[ax], stride):
            sl = np.take(data, k, axis=ax)
            f = factors[keep]
            out.append(zoom(sl, f, order=1) if np.any(np.abs(f - 1) > 1e-3) else sl)
    return out


def zoomed_out(img: torch.Tensor, s: float) -> torch.Tensor:
    """``img`` area-averaged over ``k × k`` blocks, ``k = ⌊s⌋`` (trailing rows and columns that do not fill a block
    dropped), for sampling at ``s`` source pixels per output pixel without aliasing; ``img`` itself when ``s < 2`` or
    the image is smaller than a block. ``grid_sample``'s normalised coordinates span the image whatever its size, so
    the same sampling grid applies to the averaged image."""
    k = int(s)
    if k < 2 or min(img.shape[-2:]) < k:
        return img
    return torch.nn.functional.avg_pool2d(img[None, None].float(), k)[0, 0]


class BatchMaker:
    """Draws training batches (crops, flips, rotations, phantoms) from one seeded generator."""

    def __init__(self, slices, cfg: TrainConfig, generator: torch.Generator):
        self.slices = slices
        self.cfg = cfg
        self.g = generator
        if not slices and not (cfg.modality == "ct" and cfg.phantom_fraction > 0):
            raise ValueError("no training images: every file was skipped or the data list is empty")
        self.window = _normalizer(cfg) if cfg.modality == "ct" else None

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.g))

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.g))

    def _warped_crop(self, img: torch.Tensor) -> torch.Tensor:
        """A crop seen through a random small rotation and zoom (one bilinear ``grid_sample`` of the crop's
        c × c output grid, border padding), centred on a random pixel of the image. Zooming out by ``s ≥ 2`` samples
        the image area-averaged over ``⌊s⌋ × ⌊s⌋`` blocks (``zoomed_out``), as a coarser acquisition would see it."""
        c = self.cfg.crop
        lo, hi = self.cfg.scale_range
        h, w = img.shape
        for _ in range(20):
            s = math.exp(self._uniform(math.log(lo), math.log(hi)))
            t = math.radians(self._uniform(-self.cfg.rotation_deg, self.cfg.rotation_deg))
            half = 0.5 * c * s * (abs(math.cos(t)) + abs(math.sin(t)))  # half the source window's extent
            ci = self._uniform(min(half, h / 2), max(h - half, h / 2))
            cj = self._uniform(min(half, w / 2), max(w - half, w / 2))
            theta = torch.tensor([[s * c / w * math.cos(t), -s * c / w * math.sin(t), 2 * cj / w - 1],
                                  [s * c / h * math.sin(t), s * c / h * math.cos(t), 2 * ci / h - 1]],
                                 dtype=torch.float32)[None]
            grid = torch.nn.functional.affine_grid(theta, [1, 1, c, c], align_corners=False)
            patch = torch.nn.functional.grid_sample(zoomed_out(img, s)[None, None].float(), grid, mode="bilinear",
                                                    padding_mode="border", align_corners=False)[0, 0]
            if float((patch > -0.98).float().mean()) >= self.cfg.min_foreground:
                break
        return patch

    def _crop(self, img: torch.Tensor) -> torch.Tensor:
        c = self.cfg.crop
        if self.cfg.rotation_deg > 0 or self.cfg.scale_range != (1.0, 1.0):
            return self._augment(self._warped_crop(img))
        if min(img.shape) < c:  # small image: reflect-pad up to the crop size
            ph, pw = max(0, c - img.shape[0]), max(0, c - img.shape[1])
            img = torch.nn.functional.pad(img[None, None], (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2),
                                          mode="replicate")[0, 0]
        for _ in range(20):
            i, j = self._randint(img.shape[0] - c + 1), self._randint(img.shape[1] - c + 1)
            patch = img[i : i + c, j : j + c]
            if float((patch > -0.98).float().mean()) >= self.cfg.min_foreground:
                break
        return self._augment(patch)

    def _augment(self, patch: torch.Tensor) -> torch.Tensor:
        """Random 90° rotation, flip and intensity jitter of one crop."""
        k = self._randint(4)
        patch = torch.rot90(patch, k)
        if self._randint(2):
            patch = patch.flip(-1)
        if self.cfg.intensity_jitter > 0:
            j = self.cfg.intensity_jitter
            scale = 1 - j + 2 * j * float(torch.rand((), generator=self.g))
            patch = ((patch + 1) * scale - 1).clamp(-1, 1)
        return patch

    def next(self) -> torch.Tensor:
        batch = []
        for _ in range(self.cfg.batch_size):
            use_phantom = self.window is not None and (
                not self.slices or float(torch.rand((), generator=self.g)) < self.cfg.phantom_fraction
            )
            if use_phantom:
                size = self.cfg.crop * (1 + self._randint(3))
                img = self.window.normalize(random_ct_phantom((size, size), self.g)).clamp(-1, 1).float()
            else:
                img = self.slices[self._randint(len(self.slices))]
            batch.append(self._crop(img))
        return torch.stack(batch)[:, None]


@torch.no_grad()
def sample_unconditional(prior: DiffusionPrior, shape: tuple, steps: int = 18, generator=None) -> torch.Tensor:
    """Unconditional samples with Heun's 2nd-order EDM sampler (Karras et al. 2022, Alg. 1), ``2 steps - 1``
    network evaluations per image, in the prior's normalised range."""
    param = next(prior.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    sigmas = karras_sigmas(steps, max(prior.sigma_min, 0.002), min(prior.sigma_max, 80.0)).to(dev)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(dev) * sigmas[0]
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - prior.denoise(x, float(s))) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - prior.denoise(x_next, float(s_next))) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x


def atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_grid(images: torch.Tensor, path: Path) -> None:
    from skimage.io import imsave

    imgs = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    n = imgs.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = imgs.shape[1:]
    grid = np.zeros((rows * h, cols * w), dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = imgs[k]
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    imsave(tmp, grid, check_contrast=False)
    os.replace(tmp, path)


def _make_prior(network, cfg: TrainConfig) -> DiffusionPrior:
    schedule = EDMSchedule(cfg.sigma_min, cfg.sigma_max, cfg.sigma_data)
    return DiffusionPrior(network, schedule, "edm", intensity=_normalizer(cfg), channels=1, spatial_dims=2)


def network_and_ema(arch: dict, device: torch.device, init_from: str | os.PathLike | None = None,
                    kind: str = "prior") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The network of ``arch`` (seeded by the caller) and its frozen EMA copy, on ``device``; with ``init_from`` both
    start from the weights of that saved recon ``kind`` folder (prior or restorer), refused with the file named
    when missing or of another architecture."""
    net = build_network(arch).to(device)
    ema = build_network(arch).to(device)
    ema.load_state_dict(net.state_dict())
    for p in ema.parameters():
        p.requires_grad_(False)
    if init_from:
        _warm_start(net, ema, init_from, kind)
    return net, ema


def _warm_start(net: torch.nn.Module, ema: torch.nn.Module, folder: str | os.PathLike, kind: str) -> None:
    from safetensors.torch import load_file

    from recon.priors.io import WEIGHTS, check_state_dict

    weights = Path(folder) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: init_from (--init-from) needs a recon {kind} folder holding {WEIGHTS}")
    state = load_file(str(weights))
    check_state_dict(net, state, str(weights))
    net.load_state_dict(state)
    ema.load_state_dict(state)


def train_prior(cfg: TrainConfig, resume: bool = False, max_steps_this_run: int | None = None) -> dict:
    """Train (or resume) a prior; returns a summary. ``max_steps_this_run`` stops early (as an interruption
    would) after that many steps, writing a checkpoint — used to test exact resumption."""
    from recon.priors.trainer import Trainer

    trainer, arch = Trainer.start(cfg, "prior", resume, TrainConfig(), _FREE)
    net, ema, out, device = trainer.net, trainer.ema, Path(cfg.out), torch.device(cfg.device)
    slices, report = load_training_slices(cfg)
    batches = BatchMaker(slices, cfg, trainer.gen)
    loss_of_step = _edm_loss(cfg, batches, _make_prior(net, cfg), trainer.gen, device)

    def on_save() -> None:
        save_prior(_make_prior(ema, cfg), out / "prior", arch, card={
            "training": {"steps": trainer.step, "config": _config_names_only(dataclasses.asdict(cfg)),
                         "files": [Path(f).name for f in report[0]["used"]],
                         "skipped": report[1:], "parameters": count_parameters(ema)},
        })

    def on_samples() -> None:
        grid = sample_unconditional(_make_prior(ema, cfg), (16, 1, 2 * cfg.crop, 2 * cfg.crop), 12,
                                    torch.Generator().manual_seed(0))
        write_grid(grid, out / f"samples_{trainer.step:07d}.png")

    end = cfg.steps if max_steps_this_run is None else min(cfg.steps, trainer.step + max_steps_this_run)
    summary = trainer.run(loss_of_step, end=end, total=cfg.steps, desc="train-prior", progress=cfg.progress,
                          log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                          sample_every=cfg.sample_every, on_save=on_save, on_samples=on_samples)
    losses = trainer.losses
    return {"step": trainer.step, "interrupted": summary["interrupted"],
            "final_loss": float(np.mean(losses[-50:])) if losses else None, "checkpoint": str(trainer.ckpt_path),
            "prior": str(out / "prior"), "skipped": report[1:], "parameters": count_parameters(net)}


# fields a resume may change: they do not change the weights
_FREE = ("steps", "progress", "device", "checkpoint_every", "sample_every", "log_every", "out")


def focus_weights(cfg: TrainConfig):
    """The per-pixel loss factor ``1 + focus_weight · [avg3×3(y) ∈ focus_hu]`` of a noisy batch ``y``, or None.

    It depends on the noisy input only, so the loss's minimiser is still the posterior mean ``E[x0 | y]``
    at every pixel: the weighting moves the network's capacity towards soft tissue, not its target."""
    if cfg.focus_hu is None or cfg.focus_weight == 0:
        return None
    low, high = (float(v) for v in _normalizer(cfg).normalize(torch.tensor(cfg.focus_hu)))

    def factor(y: torch.Tensor) -> torch.Tensor:
        local = torch.nn.functional.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=False)
        return 1 + cfg.focus_weight * ((local >= low) & (local <= high)).to(y.dtype)

    return factor


def _edm_loss(cfg: TrainConfig, batches, prior: DiffusionPrior, gen: torch.Generator, device):
    """The EDM loss of the next batch: ``ln σ ~ N(P_mean, P_std²)``, weight ``(σ² + σ_d²)/(σ σ_d)²`` (one generator
    for data, noise levels and noise, so a checkpoint reproduces the stream); bfloat16 autocast on GPU."""
    use_amp = device.type == "cuda"
    focus = focus_weights(cfg)

    def loss_of_step() -> torch.Tensor:
        x0 = batches.next().to(device)
        sigma = (cfg.p_mean + cfg.p_std * torch.randn(x0.shape[0], generator=gen)).exp().to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        xn = x0 + sigma[:, None, None, None] * noise
        weight = ((sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2)[:, None, None, None]
        if focus is not None:
            weight = weight * focus(xn)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            denoised = prior.denoise(xn, sigma)
        return (weight * (denoised.float() - x0) ** 2).mean()

    return loss_of_step


DATA_LICENCES = {
    "ct": "Real CT slices: pydicom's test files and the pydicom-data package (MIT-licensed packages; the images are "
          "public test data of the DICOM community, de-identified), plus procedurally generated phantoms "
          "(recon, BSD-3-Clause). The held-out head CT (files 693_*) was not used.",
    "mri": "MNI152 ICBM 2009a symmetric T1 template as shipped by nilearn (Copyright (C) 1993-2009 Louis Collins, "
           "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University; use, copy, modify "
           "and distribute permitted with this notice). Held out: nibabel's anatomical.nii, pydicom's MR files.",
}


def _config_names_only(config: dict) -> dict:
    """A training configuration as model cards keep it: file names, not machine paths."""
    config = dict(config)
    config["data"] = [Path(p).name for p in config.get("data", [])]
    config["out"] = Path(config.get("out") or "").name
    if config.get("init_from"):
        config["init_from"] = Path(config["init_from"]).name
    return config


def export_prior(run: str | os.PathLike, dest: str | os.PathLike, extra: dict | None = None) -> Path:
    """Copy a training run's EMA prior (``RUN/prior``) to ``dest`` with a shippable model card: training files by
    name (no machine paths), data licence, intended use, and ``extra`` (e.g. measured quality)."""
    from recon.priors.io import CARD, WEIGHTS

    src = Path(run) / "prior"
    card = json.loads((src / CARD).read_text())
    training = dict(card.get("training", {}))
    training["config"] = _config_names_only(training.get("config", {}))
    training["files"] = [Path(p).name for p in training.get("files", [])]
    modality = training["config"].get("modality", "ct")
    card.update({
        "training": training,
        "data_licence": DATA_LICENCES.get(modality, "see training.files"),
        "intended_use": "Research and teaching only; NOT for clinical use. A small network trained for a few "
                        "CPU hours on a handful of images: it knows the look of "
                        + ("CT slices in the [-1000, 1500] HU window" if modality == "ct" else
                           "T1-weighted brain MRI magnitude slices") + ", not anatomy in general.",
        "recipe": f"recon train-prior --preset default-{modality} -o runs/default-{modality}",
        **(extra or {}),
    })
    card.pop("path", None)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes((src / WEIGHTS).read_bytes(), dest / WEIGHTS, overwrite=True)
    atomic_write_bytes((json.dumps(card, indent=2) + "\n").encode(), dest / CARD, overwrite=True)
    return dest
