r"""Inverse-problem tasks: build the operator of a named task, simulate measurements in physical units, and
store them in a self-describing measurement file from which the operator is rebuilt exactly.

Tasks (``TASKS``) and their forward models; a 2D image ``(H, W)`` gets the 2D form, a volume ``(D, H, W)`` the
3D form:

=====================  ==========================================================================================
``sparse-view-ct``     ``ParallelBeamCT``, ``views`` equally spaced over 180° (3D: slice by slice)
``limited-angle-ct``   ``ParallelBeamCT``, ``views`` equally spaced over ``arc`` degrees (default 120°)
``cone-beam-ct``       ``ConeBeamCT`` (volumes only), ``views`` over 360°; for a 2D image ``FanBeamCT``
``mri``                ``CartesianMRI`` (``coils = 1``) or ``MultiCoilMRI`` with simulated coil maps; a mask of
                       ``mask_type`` at ``acceleration`` (1D fastMRI-style columns by default; volumes get the
                       same 2D mask on every slice); real-valued (magnitude) images
``blur``               ``Blur.gaussian`` of ``fwhm`` mm (isotropic, in-plane for volumes unless ``fwhm_z``)
``inpainting``         ``Inpainting``: ``missing`` fraction of random pixels, or ``keep_every`` k-th slice (rows
                       in 2D)
``super-resolution``   ``Downsampling`` by ``factor``: in-plane for 2D, through-plane (thick slices) for volumes
=====================  ==========================================================================================

Units. The measurement ``y`` is kept in physical units: CT tasks project the linear attenuation
``μ = μ_water (1 + HU/1000)`` in mm⁻¹ (``μ_water = 0.0192`` mm⁻¹, ~70 keV; air and below clipped at 0), so the
sinogram holds dimensionless line integrals and Beer–Lambert noise with ``photons`` per detector element is
physical; the other tasks act on the file's intensities. The operator's input ("domain") is therefore μ for CT
and the image itself otherwise; ``to_domain`` / ``from_domain`` convert. Samplers work in a prior's normalised
range: for a linear ``A`` and an affine normalisation ``x_n = a d + b`` of domain values ``d``,
``A x_n = a y + b A(1)``, so ``normalised_problem`` maps ``y`` and ``σ_y`` exactly, without touching ``A``.

Noise: ``photons`` (CT; Poisson counts, post-log) or ``noise`` (additive Gaussian, std relative to the RMS of
the noiseless measurement); MRI noise is added to the acquired k-space samples only. Beer–Lambert noise is
heteroscedastic (rays through dense tissue are noisier): ``weighted_problem`` whitens it, so a method run on it weighs
each ray by its inverse variance (penalised weighted least squares).

Measurement files (``save_measurement`` / ``load_measurement``): one ``.npz`` holding ``y``, the masks or coil maps
the operator needs, the image geometry (affine, modality, unit) and a JSON ``header`` (format, task spec, noise,
units, recon version): everything needed to rebuild the operator, nothing identifying.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from recon.datasets.io import atomic_write_bytes
from recon.operators.parameters import MU_WATER_PER_MM

__all__ = [
    "AIR_HU",
    "MU_WATER_PER_MM",
    "TASKS",
    "TASK_TABLE",
    "Measurement",
    "TaskInfo",
    "TaskSpec",
    "build_physics",
    "check_parameter",
    "from_domain",
    "load_measurement",
    "make_task",
    "markdown_table",
    "normalised_problem",
    "save_measurement",
    "simulate",
    "to_domain",
    "weighted_problem",
]

# the lowest CT value an image-domain task keeps: a scanner's air; its out-of-field padding (−2000, −3024 HU) is air
# too (the CT tasks see it so already: μ is clamped at 0)
AIR_HU = -1024.0

MEASUREMENT_FORMAT = "recon-measurement"
MEASUREMENT_VERSION = 1

@dataclass(frozen=True)
class TaskInfo:
    """A named task: what it simulates, its parameters with their defaults, and whether it is CT."""

    name: str
    summary: str
    defaults: dict
    is_ct: bool = False


# the task table, declared once: the command line's --task choices and flags, recon simulate, the measurement
# file and recon batch's manifest columns read it; the parameters' types and ranges are recon.operators.PARAMETERS
TASK_TABLE: dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("sparse-view-ct", "parallel-beam CT, views equally spaced over 180°", {"views": 60}, True),
    TaskInfo("limited-angle-ct", "parallel-beam CT, views over an arc < 180°", {"views": 90, "arc": 120.0}, True),
    TaskInfo("cone-beam-ct", "cone-beam CT (fan beam for a 2D image), views over 360°", {"views": 90}, True),
    TaskInfo("mri", "Cartesian MRI, single coil or SENSE, undersampled k-space",
             {"acceleration": 4.0, "mask_type": "random", "center_fraction": None, "coils": 1, "complex": False}),
    TaskInfo("blur", "Gaussian blur of a FWHM in mm", {"fwhm": 3.0, "fwhm_z": 0.0}),
    TaskInfo("inpainting", "missing pixels, or missing slices of a volume", {"missing": 0.5, "keep_every": None}),
    TaskInfo("super-resolution", "anti-aliased downsampling (through-plane thick slices for volumes)",
             {"factor": None}),
)}
TASKS = tuple(TASK_TABLE)
CT_TASKS = tuple(name for name, t in TASK_TABLE.items() if t.is_ct)
DEFAULTS: dict[str, dict] = {name: dict(t.defaults) for name, t in TASK_TABLE.items()}
_INTERNAL = ("complex",)  # set by readers of measured data (fastMRI), not by users


class TaskError(ValueError):
    """A task or measurement file is not usable; the message names the argument or file."""


@dataclass
class TaskSpec:
    """Everything that defines a task's operator (JSON-serialisable; masks and coil maps travel as arrays).

    ``img_size`` is ``(H, W)`` or ``(D, H, W)``; ``spacing`` in mm in the same axis order; ``params`` the task
    parameters (``DEFAULTS`` filled in); ``seed`` seeds random masks.
    """

    task: str
    img_size: tuple
    spacing: tuple
    params: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        self.img_size = tuple(int(v) for v in self.img_size)
        self.spacing = tuple(float(v) for v in self.spacing)
        if self.task not in TASKS:
            raise TaskError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if len(self.img_size) not in (2, 3) or len(self.spacing) != len(self.img_size):
            raise TaskError(f"img_size and spacing must both have 2 or 3 entries, got {self.img_size}, {self.spacing}")
        if min(self.spacing) <= 0:
            raise TaskError(f"spacing must be positive (mm), got {self.spacing}")

    @property
    def is_ct(self) -> bool:
        return self.task in CT_TASKS

    @property
    def is_volume(self) -> bool:
        return len(self.img_size) == 3

    def to_json(self) -> dict:
        return asdict(self)


def make_task(task: str, image_shape: tuple, spacing: tuple, seed: int = 0, **params) -> TaskSpec:
    """A ``TaskSpec`` for an image of ``image_shape`` ``(D, H, W)`` (``D = 1``: a 2D image) with ``spacing``
    ``(dz, dy, dx)`` mm; ``params`` override ``DEFAULTS[task]`` (``None`` values keep the default)."""
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    given = {k: v for k, v in params.items() if v is not None}
    if unknown := set(given) - set(DEFAULTS[task]):
        takes = [k for k in DEFAULTS[task] if k not in _INTERNAL]
        raise TaskError(f"task {task!r} takes no {', '.join(sorted(unknown))} (it takes: "
                        f"{', '.join(takes) or 'nothing'})")
    given = {k: check_parameter(k, v) for k, v in given.items()}
    shape = tuple(int(v) for v in image_shape)
    if len(shape) == 3 and shape[0] == 1:
        shape, spacing = shape[1:], tuple(spacing)[1:]
    p = {**DEFAULTS[task], **given}
    if task == "super-resolution" and p["factor"] is None:
        p["factor"] = 2 if len(shape) == 3 else 4
    return TaskSpec(task, shape, tuple(spacing), p, int(seed))


def markdown_table() -> str:
    """The README's task table, made from ``TASK_TABLE`` (a test keeps the README equal to it)."""
    rows = ["| task | what it simulates | parameters (defaults) |", "|---|---|---|"]
    for t in TASK_TABLE.values():
        params = ", ".join(f"`--{k.replace('_', '-')}` ({v})" if v is not None else f"`--{k.replace('_', '-')}`"
                           for k, v in t.defaults.items() if k not in _INTERNAL)
        rows.append(f"| `{t.name}` | {t.summary} | {params} |")
    return "\n".join(rows)


def check_parameter(name: str, value):
    """``value`` checked against ``recon.operators.PARAMETERS[name]`` (``TaskError`` naming the argument)."""
    from recon.operators.parameters import PARAMETERS

    if name not in PARAMETERS:
        return value
    try:
        return PARAMETERS[name].check(value)
    except ValueError as err:
        raise TaskError(str(err)) from err


def _positive(value, name: str, integer: bool = False, minimum: float = 0.0):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > minimum
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "an integer" if integer else "a number"
        raise TaskError(f"{name} must be {kind} > {minimum:g}, got {value!r}")
    return int(value) if integer else float(value)


def build_physics(spec: TaskSpec, arrays: dict | None = None):
    """The noise-free ``recon`` operator of ``spec`` (a deepinv ``LinearPhysics``, float32).

    ``arrays`` may hold a stored ``mask`` or ``coil_maps`` (from a measurement file), used instead of drawing
    them again. Input/output shapes are those of the operator (``(B, 1, *img_size)`` images).
    """
    from recon import operators as ops

    arrays = arrays or {}
    p, size, sp = spec.params, spec.img_size, spec.spacing
    if spec.task in ("sparse-view-ct", "limited-angle-ct"):
        views = _positive(p["views"], "views", integer=True, minimum=1)
        if spec.task == "sparse-view-ct":
            angles = views
        else:
            arc = _positive(p["arc"], "arc")
            if arc > 180:
                raise TaskError(f"arc must be at most 180 degrees for parallel beam, got {arc:g}")
            angles = torch.arange(views, dtype=torch.float64) * (arc / views)
        px = min(sp[-2:])
        return ops.ParallelBeamCT(size, angles=angles, spacing=sp, detector_spacing=px)
    if spec.task == "cone-beam-ct":
        views = _positive(p["views"], "views", integer=True, minimum=1)
        if len(size) == 2:
            return ops.FanBeamCT(size, angles=views, spacing=sp, detector_spacing=min(sp))
        return ops.ConeBeamCT(size, angles=views, spacing=sp, detector_spacing=min(sp[-2:]))
    if spec.task == "mri":
        coils = _positive(p["coils"], "coils", integer=True, minimum=0)
        mask = arrays.get("mask")
        kw = {"real_input": not p.get("complex", False), "spacing": sp}  # complex: measured k-space (fastMRI)
        if mask is not None:
            kw["mask"] = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        else:
            acc = p["acceleration"]
            if not isinstance(acc, (int, float)) or not acc >= 1:
                raise TaskError(f"acceleration must be a number >= 1, got {acc!r}")
            kw.update(acceleration=float(acc), mask_type=p["mask_type"], center_fraction=p["center_fraction"],
                      seed=spec.seed)
        if coils == 1:
            return ops.CartesianMRI(size, **kw)
        maps = arrays.get("coil_maps")
        maps = torch.as_tensor(maps) if maps is not None else ops.simulate_coil_maps(size, coils)
        return ops.MultiCoilMRI(size, maps, **kw)
    if spec.task == "blur":
        fwhm = _positive(p["fwhm"], "fwhm")
        if len(size) == 3:  # in-plane unless fwhm_z > 0
            fz = float(p.get("fwhm_z") or 0.0)
            if fz < 0:
                raise TaskError(f"fwhm_z must be >= 0 mm, got {fz:g}")
            return ops.Blur.gaussian(size, (fz, fwhm, fwhm), spacing=sp, boundary="zero")
        return ops.Blur.gaussian(size, fwhm, spacing=sp, boundary="zero")
    if spec.task == "inpainting":
        mask = arrays.get("mask")
        if mask is None:
            if p.get("keep_every"):
                k = _positive(p["keep_every"], "keep_every", integer=True)
                mask = ops.missing_slice_mask(size, keep_every=k, axis=0)
            else:
                frac = p["missing"]
                if not isinstance(frac, (int, float)) or not 0 <= frac < 1:
                    raise TaskError(f"missing must be a fraction in [0, 1), got {frac!r}")
                mask = ops.random_pixel_mask(size, float(frac), seed=spec.seed)
        return ops.Inpainting(size, torch.as_tensor(np.asarray(mask, dtype=np.float32)))
    # super-resolution
    factor = _positive(p["factor"], "factor", integer=True)
    if len(size) == 3:
        return ops.Downsampling(size, factor=factor, axes=0, spacing=sp)
    return ops.Downsampling(size, factor=factor, spacing=sp)


def stored_arrays(spec: TaskSpec, physics) -> dict:
    """Arrays the measurement file keeps so the operator is rebuilt bit for bit (masks, coil maps)."""
    out = {}
    if spec.task == "mri":
        out["mask"] = physics.mask.detach().cpu().numpy()
    if spec.task == "inpainting":
        out["mask"] = physics.mask[0, 0].detach().cpu().numpy()  # the operator keeps it as (1, 1, *img_size)
    if spec.task == "mri" and hasattr(physics, "coil_maps"):
        out["coil_maps"] = physics.coil_maps.detach().cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------------- units
def to_domain(spec: TaskSpec, image: torch.Tensor, unit: str | None) -> torch.Tensor:
    """Physical image → the operator's input: HU → μ (mm⁻¹, at least 0) for CT tasks; an image in HU under another
    task floored at ``AIR_HU`` (a scanner's out-of-field padding is air, not an object of −3024 HU that the noise
    level and the prior would have to account for); unchanged otherwise."""
    if spec.is_ct:
        if unit not in ("HU", None):
            raise TaskError(f"CT tasks need an image in HU, got unit {unit!r}")
        return (MU_WATER_PER_MM * (1.0 + image / 1000.0)).clamp_min(0.0)
    return image.clamp_min(AIR_HU) if unit == "HU" else image


def from_domain(spec: TaskSpec, d: torch.Tensor) -> torch.Tensor:
    """The operator's input domain → physical image units (μ → HU for CT tasks; a linear map, also for stds)."""
    return 1000.0 * (d / MU_WATER_PER_MM - 1.0) if spec.is_ct else d


def domain_scale(spec: TaskSpec) -> float:
    """Physical units per domain unit (HU per mm⁻¹ for CT, 1 otherwise): converts standard deviations."""
    return 1000.0 / MU_WATER_PER_MM if spec.is_ct else 1.0


# -------------------------------------------------------------------------------------------- simulate
@dataclass
class Measurement:
    """Measurements and what produced them.

    ``y``: ``physics.A`` output ``(1, C, ...)`` in the domain units (see the module docstring); ``sigma_y``: the
    noise std in those units (an average for Poisson noise); ``noise``: how the noise was made; ``geometry``:
    ``affine`` (4×4, RAS mm of voxel centres, ``recon.datasets.io`` convention), ``shape`` ``(D, H, W)``,
    ``modality``, ``unit`` of the image the measurement was simulated from.
    """

    spec: TaskSpec
    y: torch.Tensor
    sigma_y: float
    noise: dict
    geometry: dict
    arrays: dict = field(default_factory=dict)

    def physics(self):
        return build_physics(self.spec, self.arrays)


def simulate(spec: TaskSpec, image: torch.Tensor, unit: str | None = None, *, photons: float | None = None,
             noise: float | None = None, seed: int = 0, geometry: dict | None = None) -> Measurement:
    """Simulate measurements of ``image`` (``(H, W)`` / ``(D, H, W)`` or with batch and channel axes, physical
    units: HU for CT) for ``spec``.

    CT tasks: Beer–Lambert noise with ``photons`` per detector element (post-log), or Gaussian ``noise``; other
    tasks: additive Gaussian ``noise`` (std relative to the RMS of the noiseless measurement). ``None``/0: none.
    """
    from recon.operators import TransmissionPoissonNoise

    x = torch.as_tensor(image, dtype=torch.float32)
    while x.dim() < len(spec.img_size) + 2:
        x = x[None]
    if tuple(x.shape[2:]) != spec.img_size:
        raise TaskError(f"image of shape {tuple(x.shape[2:])} does not fit the task's img_size {spec.img_size}")
    if not torch.isfinite(x).all():
        raise TaskError("the image holds NaN or infinite values")
    physics = build_physics(spec)
    clean = physics.A(to_domain(spec, x, unit))
    g = torch.Generator().manual_seed(int(seed))
    if photons and noise:
        raise TaskError("give photons (Beer–Lambert) or noise (Gaussian), not both")
    if photons:
        if not spec.is_ct:
            raise TaskError(f"photons applies to CT tasks only, not {spec.task!r}; use noise")
        photons = _positive(photons, "photons")
        model = TransmissionPoissonNoise(I0=photons, rng=g)
        y = model(clean.double()).float()
        sigma = float(torch.exp(clean.double()).mean().div(photons).sqrt())  # post-log var ≈ e^p / I0
        info = {"kind": "poisson", "photons": photons, "clamped_fraction": model.last_clamped_fraction}
    elif noise:
        rel = _positive(noise, "noise")
        sigma = rel * float(clean.pow(2).mean().sqrt())
        n = sigma * torch.randn(clean.shape, generator=g)
        if spec.task == "mri":  # noise on the acquired k-space samples only
            n = n * physics.mask
        y = clean + n
        info = {"kind": "gaussian", "relative": rel}
    else:
        y, sigma, info = clean, 0.0, {"kind": "none"}
    info["sigma_y"] = sigma
    return Measurement(spec, y, sigma, info, dict(geometry or {}), stored_arrays(spec, physics))


def normalised_problem(meas: Measurement, physics, prior, analytic: torch.Tensor | None = None):
    """The problem in the prior's normalised range: returns ``(y_n, sigma_n, a, b)`` with ``x_n = a d + b`` for
    domain values ``d`` (exact for linear ``A``: ``y_n = a y + b A(1)``).

    For a prior whose normalisation depends on the data (MRI percentile scaling), the scale is taken from the
    analytic reconstruction ``analytic`` (domain units), as it would be at inference on real data.
    """
    from recon.priors.base import IntensityScale

    intensity = getattr(prior, "intensity", None)
    if intensity is None:
        a, b = 1.0, 0.0
    else:
        if isinstance(intensity, IntensityScale):
            if analytic is None:
                raise TaskError("a data-scaled prior needs the analytic reconstruction to set its scale")
            intensity.scale = None
            intensity.normalize(from_domain(meas.spec, analytic).abs())
        d = torch.tensor([0.0, 1.0], dtype=torch.float64)
        n = prior.normalize(from_domain(meas.spec, d))
        b = float(n[0])
        a = float(n[1] - n[0])
    ones = torch.ones_like(physics.A_adjoint(meas.y))
    y_n = a * meas.y + b * physics.A(ones) if b else a * meas.y
    return y_n, abs(a) * meas.sigma_y, a, b


def weighted_problem(meas: Measurement, physics):
    """The measurement whitened by its noise model: ``(physics_w, meas_w)``, or the inputs unchanged.

    Beer–Lambert CT data with a known photon count get per-ray weights ``w = σ̄ / sqrt(v)`` from the post-log
    variance ``v`` of each reading (``recon.operators.post_log_variance``, from the measured counts), so that
    ``w ⊙ y`` has white noise of std ``σ̄``: ``physics_w = WeightedPhysics(physics, w)``, ``meas_w.y = w ⊙ y``,
    ``meas_w.sigma_y = σ̄``, and ``meas_w.noise["weighting"]`` records it. Any other noise is returned as is.
    """
    from dataclasses import replace

    from recon.operators import WeightedPhysics, post_log_variance
    from recon.operators.weighted import whitening_weights

    photons = meas.noise.get("photons") if meas.noise.get("kind") == "poisson" else None
    if not photons:
        return physics, meas
    w, sigma = whitening_weights(post_log_variance(meas.y, float(photons)))
    record = {"rule": "inverse post-log variance (PWLS)", "sigma_y_white": sigma,
              "weight_range": [float(w.min()), float(w.max())]}
    meas_w = replace(meas, y=(w * meas.y).to(meas.y.dtype), sigma_y=sigma,
                     noise={**meas.noise, "weighting": record})
    return WeightedPhysics(physics, w), meas_w


# --------------------------------------------------------------------------------------- measurement file
def save_measurement(meas: Measurement, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write ``meas`` to one ``.npz`` file (atomically); returns the path."""
    from recon import __version__

    path = Path(path)
    if path.suffix != ".npz":
        raise TaskError(f"{path}: measurement files end in .npz")
    if path.exists() and not overwrite:
        raise TaskError(f"{path}: exists (use --overwrite to replace it)")
    if not path.parent.is_dir():
        raise TaskError(f"{path.parent}: no such folder for the measurement file")
    geometry = {k: (np.asarray(v).tolist() if k == "affine" else v) for k, v in meas.geometry.items()}
    header = {"format": MEASUREMENT_FORMAT, "version": MEASUREMENT_VERSION, "recon": __version__,
              "spec": meas.spec.to_json(), "noise": meas.noise, "sigma_y": meas.sigma_y, "geometry": geometry,
              "units": {"y": "line integrals of μ (dimensionless)" if meas.spec.is_ct else "image units",
                        "domain": "μ, mm⁻¹" if meas.spec.is_ct else "image units", "spacing": "mm"}}
    buf = io.BytesIO()
    np.savez_compressed(buf, y=meas.y.detach().cpu().numpy(), header=np.array(json.dumps(header)),
                        **{k: np.asarray(v) for k, v in meas.arrays.items()})
    return atomic_write_bytes(buf.getvalue(), path, overwrite=overwrite)


def load_measurement(path: str | os.PathLike) -> Measurement:
    """Read a measurement file written by ``save_measurement`` and check that ``y`` fits its operator."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such measurement file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "header" not in data or "y" not in data:
                raise TaskError(f"{path}: not a recon measurement file (no header / y arrays)")
            header = json.loads(str(data["header"]))
            y = torch.from_numpy(np.array(data["y"]))
            arrays = {k: np.array(data[k]) for k in data.files if k not in ("header", "y")}
    except TaskError:
        raise
    except Exception as err:  # corrupt zip, bad JSON, ...
        raise TaskError(f"{path}: not a readable recon measurement file ({type(err).__name__})") from err
    if header.get("format") != MEASUREMENT_FORMAT:
        raise TaskError(f"{path}: not a recon measurement file (format {header.get('format')!r})")
    if int(header.get("version", 0)) > MEASUREMENT_VERSION:
        raise TaskError(f"{path}: written by a newer recon (format version {header['version']})")
    spec = TaskSpec(**header["spec"])
    meas = Measurement(spec, y, float(header["sigma_y"]), header["noise"], header.get("geometry", {}), arrays)
    physics = meas.physics()
    expected = tuple(physics.A(torch.zeros(1, getattr(physics, "image_channels", 1), *spec.img_size)).shape)
    if tuple(y.shape) != expected:
        raise TaskError(f"{path}: measurements of shape {tuple(y.shape)} do not fit the operator "
                        f"(expected {expected})")
    if not torch.isfinite(y).all():
        raise TaskError(f"{path}: the measurements hold NaN or infinite values")
    return meas
