r"""File-to-file reconstruction: what the ``recon`` command runs, as Python calls.

- ``simulate_file(input, output, task, ...)``: read a DICOM series / NIfTI / image, simulate the task's
  measurements in physical units and write a self-describing measurement file (``recon.tasks``).
- ``reconstruct_file(input, output, ...)``: reconstruct a measurement file (or, with ``task=``, simulate and
  reconstruct an image in one go, the image serving as reference) and write the reconstruction with the input's
  geometry, the standard-deviation map where the method gives one, a PNG preview (reference, analytic inverse,
  reconstruction, error), a JSON report and a provenance JSON.
- ``describe(path)``: what a path holds (series, modality, shape, spacing, orientation, value range).

Units: files hold physical intensities (HU for CT); the samplers run in the prior's normalised range, and the
conversion (``recon.tasks.normalised_problem``) is exact for the linear operators. Nothing identifying (names,
IDs, paths) goes into the report, the provenance file or the progress output; inputs are never modified; every
output is written under a temporary name and renamed when complete, and an existing output is kept unless
``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from recon.datasets.io import MedicalImage, check_plausible, read_image
from recon.outputs import (
    OutputError,
    Written,
    check_outputs,
    input_files,
    metrics,
    output_paths,
    sha256_files,
    software_versions,
    write_outputs,
    write_preview,
)
from recon.settings import Settings
from recon.tasks import (
    domain_scale,
    from_domain,
    load_measurement,
    make_task,
    normalised_problem,
    save_measurement,
    simulate,
    to_domain,
    weighted_problem,
)
from recon.utils import jsonable as _jsonable
from recon.utils import resolve_device as _resolve_device

__all__ = [
    "PipelineError",
    "check_outputs",
    "describe",
    "input_files",
    "metrics",
    "output_paths",
    "reconstruct_file",
    "reconstruct_in_memory",
    "resolve_device",
    "sha256_files",
    "simulate_file",
    "software_versions",
    "write_preview",
]



class PipelineError(OutputError):
    """A user-facing problem (bad option combination, unusable file); the message names what is wrong."""


# ------------------------------------------------------------------------------------------------ helpers
def _geometry(image: MedicalImage) -> dict:
    return {"affine": np.asarray(image.affine).tolist(), "shape": list(image.shape), "modality": image.modality,
            "unit": image.unit}


def _image_tensor(image: MedicalImage) -> torch.Tensor:
    a = image.array
    return torch.from_numpy(np.ascontiguousarray(a[0] if a.shape[0] == 1 else a)).float()


def resolve_device(device: str) -> torch.device:
    """``recon.utils.resolve_device`` with the command line's wording (``PipelineError``)."""
    try:
        return _resolve_device(device)
    except ValueError as err:
        raise PipelineError(str(err)) from err


def _prior_checksum(prior) -> str | None:
    from recon.priors.io import weights_sha256

    return weights_sha256(prior)


def describe(path: str | os.PathLike, series: str | int | None = None, on_irregular: str = "error") -> dict:
    """What ``path`` holds, without running anything: the series in a folder, and for the image (the only
    series, or ``series``) its modality, shape ``(D, H, W)``, spacing (mm), orientation and value range."""
    from recon.datasets.io import list_series

    path = Path(path)
    out: dict = {"path_kind": "folder" if path.is_dir() else "file"}
    if path.suffix in (".h5", ".hdf5") and path.is_file():
        from recon.datasets.io import read_fastmri

        data = read_fastmri(path)
        ks = data["kspace"]
        sampled = (np.abs(ks.reshape(-1, ks.shape[-1])) > 0).any(0)
        attrs = {k: v for k, v in data["attrs"].items() if "patient" not in k.lower()}  # nothing identifying
        out.update({"kind": "fastMRI k-space", "kspace_shape": list(ks.shape), "coils": ks.shape[1] if ks.ndim == 4
                    else 1, "acceleration": float(ks.shape[-1] / max(int(sampled.sum()), 1)), "attrs": attrs,
                    "spacing_mm": list(_fastmri_spacing(data["ismrmrd_header"], ks.shape[-2:]))})
        return out
    if path.is_dir():
        found = list_series(path)
        out["series"] = [{"index": i, "uid": s.uid, "description": s.description, "modality": s.modality,
                          "files": s.n_files, "shape": list(s.shape)} for i, s in enumerate(found)]
        if len(found) > 1 and series is None:
            return out
    image = read_image(path, series=series, on_irregular=on_irregular)
    a = image.affine
    cosines = [(a[:3, k] / np.linalg.norm(a[:3, k])).round(6).tolist() for k in range(3)]
    out.update({"modality": image.modality, "unit": image.unit, "shape": list(image.shape),
                "spacing_mm": [round(s, 6) for s in image.spacing],
                "origin_mm": a[:3, 3].round(4).tolist(),
                "orientation_ras": {"w (columns)": cosines[0], "h (rows)": cosines[1], "d (slices)": cosines[2]},
                "value_range": [float(image.array.min()), float(image.array.max())],
                "source": image.source})
    return out


# ----------------------------------------------------------------------------------------------- simulate
def simulate_file(input: str | os.PathLike, output: str | os.PathLike, task: str, *, series=None,
                  photons: float | None = None, noise: float | None = None, seed: int = 0, overwrite: bool = False,
                  on_irregular: str = "error", **params) -> dict:
    """Simulate ``task`` on an image file and write the measurement file ``output`` (``.npz``).

    CT tasks default to ``photons=1e5`` Beer–Lambert noise when neither ``photons`` nor ``noise`` is given;
    other tasks to Gaussian ``noise=0.01`` (1 % of the measurement RMS). A DICOM series with uneven slice spacing
    is refused (``on_irregular="error"``) or resampled to uniform spacing (``"resample"``). Returns a summary (no
    patient data).
    """
    image = read_image(input, series=series, on_irregular=on_irregular)
    meas = _simulate_image(image, task, photons, noise, seed, params)
    path = save_measurement(meas, output, overwrite=overwrite)
    return {"output": path, "task": task, "img_size": list(meas.spec.img_size), "spacing_mm": list(meas.spec.spacing),
            "measurement_shape": list(meas.y.shape), "noise": meas.noise, "params": meas.spec.params}


def _simulate_image(image: MedicalImage, task: str, photons, noise, seed, params):
    spec = make_task(task, image.shape, image.spacing, seed=seed, **params)
    if spec.is_ct:  # CT is simulated from HU: an MR image (or any other values) is refused, naming the file
        check_plausible(image, "ct")
    if photons is None and noise is None:
        photons, noise = (1e5, None) if spec.is_ct else (None, 0.01)
    return simulate(spec, _image_tensor(image), "HU" if spec.is_ct else image.unit, photons=photons, noise=noise,
                    seed=seed, geometry=_geometry(image))


# ------------------------------------------------------------------------------------------ fastMRI files
def _fastmri_spacing(header: str | None, shape_hw: tuple) -> tuple[float, float, float]:
    """(dz, dy, dx) mm from the ISMRMRD header's encoded field of view and matrix (1 mm when absent)."""
    if not header:
        return (1.0, 1.0, 1.0)
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(header)
        ns = {"m": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
        q = "m:" if ns else ""
        enc = root.find(f".//{q}encoding/{q}encodedSpace", ns)
        fov = [float(enc.find(f"{q}fieldOfView_mm/{q}{k}", ns).text) for k in ("x", "y", "z")]
        mat = [float(enc.find(f"{q}matrixSize/{q}{k}", ns).text) for k in ("x", "y", "z")]
    except (ET.ParseError, AttributeError, TypeError, ValueError):
        return (1.0, 1.0, 1.0)
    h, w = shape_hw  # fastMRI: H = readout (x), W = phase encode (y)
    return (fov[2] / max(mat[2], 1.0), fov[0] / h, fov[1] / w)


def _fastmri_measurement(path: Path):
    """A measured fastMRI file as a ``Measurement`` of the (complex-image) ``mri`` task: the stored mask (or the
    sampled columns), coil maps by ESPIRiT for multi-coil data, ``σ_y`` from the outermost sampled k-space."""
    from recon.datasets.io import read_fastmri
    from recon.operators import estimate_coil_maps
    from recon.tasks import Measurement, TaskSpec

    data = read_fastmri(path)
    ks = torch.from_numpy(np.ascontiguousarray(data["kspace"])).to(torch.complex64)
    multi = ks.dim() == 4
    s, h, w = ks.shape[0], ks.shape[-2], ks.shape[-1]
    if data["mask"] is not None and np.asarray(data["mask"]).size == w:
        cols = torch.from_numpy(np.asarray(data["mask"], dtype=np.float32).reshape(w) != 0)
    else:
        cols = (ks.abs().flatten(0, -2) > 0).any(0)  # sampled phase-encode columns
    mask = cols.float().expand(h, w).contiguous()
    coils = ks.shape[1] if multi else 1
    arrays = {"mask": mask.numpy()}
    if multi:
        by_coil = ks.permute(1, 0, 2, 3)  # (C, S, H, W)
        arrays["coil_maps"] = estimate_coil_maps(by_coil, fft_dims="2d").numpy()
        y = torch.stack((by_coil.real, by_coil.imag))[None]  # (1, 2, C, S, H, W)
    else:
        y = torch.stack((ks.real, ks.imag))[None]  # (1, 2, S, H, W)
    y = y * mask
    edge = max(1, w // 20)
    outer = torch.cat([y[..., :edge][..., cols[:edge]], y[..., -edge:][..., cols[-edge:]]], dim=-1)
    sigma = float(outer.std()) if outer.numel() > 1 else 0.0
    spacing = _fastmri_spacing(data["ismrmrd_header"], (h, w))
    spec = TaskSpec("mri", (s, h, w), spacing, {"acceleration": w / max(int(cols.sum()), 1), "mask_type": "stored",
                                                "center_fraction": None, "coils": coils, "complex": True})
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    geometry = {"affine": affine.tolist(), "shape": [s, h, w], "modality": "MR", "unit": None}
    return Measurement(spec, y, sigma, {"kind": "measured", "sigma_y": sigma}, geometry, arrays)


# -------------------------------------------------------------------------------------------- reconstruct
def _pick_prior(name: str, meas, device, cache: dict | None = None):
    from recon.priors import load_prior

    if name in ("default", "auto"):
        modality = (meas.geometry.get("modality") or "").upper()
        if meas.spec.task == "mri" or (not meas.spec.is_ct and modality in ("MR", "MRI")):
            name = "default-mri"
        else:
            name = "default-ct"
    key = ("prior", str(name), str(device))
    if cache is not None and key in cache:
        return cache[key], name
    try:
        prior = load_prior(name, device=device)
    except FileNotFoundError as err:
        raise PipelineError(str(err)) from err
    if cache is not None:
        cache[key] = prior
    return prior, name


_CACHED_OPERATORS = 4  # operators a ``cache`` keeps (the oldest is dropped first)


def _physics(meas, device, cache: dict | None):
    """``meas``'s operator on ``device``; with a ``cache``, the one built for the same task, geometry and arrays
    (masks, coil maps) is reused, so a CT system matrix is built once per worker, not once per study."""
    if cache is None:
        return meas.physics().to(device)
    h = hashlib.sha256(json.dumps(meas.spec.to_json(), sort_keys=True, default=str).encode())
    for name in sorted(meas.arrays):
        a = np.ascontiguousarray(meas.arrays[name])
        h.update(f"{name}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    key = ("physics", h.hexdigest(), str(device))
    if key not in cache:
        kept = [k for k in cache if k[0] == "physics"]
        for old in kept[: max(0, len(kept) - _CACHED_OPERATORS + 1)]:
            del cache[old]
        cache[key] = meas.physics().to(device)
    return cache[key]


def reconstruct_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    settings: Settings | None = None,
    *,
    overwrite: bool = False,
    callback: Callable[[dict], None] | None = None,
    config: dict | None = None,
    cache: dict | None = None,
    **overrides,
) -> dict:
    """Reconstruct ``input`` into ``output`` and return the report (also written as ``*.report.json``).

    Args:
        input: a measurement file from ``simulate_file``, a fastMRI ``.h5`` file, or an image when ``task`` is set
            (simulated with ``task_params``, ``photons``/``noise`` and ``seed``; the image is then the reference).
        output: ``.nii.gz``/``.nii``/``.npy``/``.png``, or a folder (no suffix, or ``format="dicom"``) for a
            derived DICOM series next to the reference's (or the input image's) series when that is DICOM.
        settings: a ``recon.settings.Settings`` (method, prior, steps, seed, device, task, options, ...).
        overwrite: replace existing outputs (else an existing output is an error).
        callback: receives the sampler's per-step dicts (the command line draws its progress bar).
        config: the resolved configuration, written to ``*.config.yaml`` (redacted with ``anonymize``) and, paths
            withheld, to the provenance.
        cache: a dict the caller keeps between calls (``recon batch``'s workers): a prior is loaded once per
            (name, device), and the operator of the same task, geometry and arrays is reused (at most 4 kept); the
            outputs are those of fresh objects.
        **overrides: ``Settings`` fields set for this call (``method="tv"``, ``steps=50``, ...).

    The method is checked first (an unknown method or option raises ``OptionError``, a ``ValueError``); None
    means the recommended one for the operator's modality.
    """
    from recon.samplers import get_method

    s = Settings.from_mapping(overrides, settings)
    t_start = time.perf_counter()
    if s.method is not None:
        get_method(s.method).check_options(s.options)  # a bad name or option fails before anything is read
    if s.uncertainty is not None and not 0 < s.uncertainty < 1:
        raise PipelineError(f"uncertainty must be a coverage level in (0, 1), e.g. 0.9, got {s.uncertainty!r}")
    calibration = _calibration(s)
    paths = output_paths(output, s.format, maps=_MAPS)
    check_outputs(paths, overwrite)
    dev = resolve_device(s.device)
    in_path = Path(input)
    if not in_path.exists():
        raise PipelineError(f"{in_path}: no such file or folder")
    timings: dict = {}
    t0 = time.perf_counter()
    problem = _read_problem(in_path, s)
    timings["read_and_simulate"] = time.perf_counter() - t0
    physics = _physics(problem.meas, dev, cache)
    problem.meas.y = problem.meas.y.to(dev)
    method = _resolve_method(s.method, s.options, physics, problem.complex_input, in_path, problem.meas.spec.task,
                             problem.meas.spec.is_volume)
    method, s = _with_spread(method, s, getattr(physics, "modality", None))
    t0 = time.perf_counter()
    run = _run_method(problem.meas, physics, method, s, dev, cache, callback)
    timings["reconstruct"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    written = _reconstruction_outputs(problem, run, physics, method, s.seed, s.reference, in_path, dev,
                                      spread=_spread_asked(method, s))
    if s.uncertainty is not None:
        _add_uncertainty(written, problem, run, physics, s.uncertainty, calibration)
    fmt = "dicom" if (s.format == "dicom" or not paths["image"].suffix) else None
    timings["assemble"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start  # up to the writing of the outputs
    written.provenance["timings_s"] = timings
    return write_outputs(written, paths, fmt=fmt, config=config, anonymize=s.anonymize, overwrite=overwrite)


_MAPS = ("std", "lower", "upper", "null_space")  # the maps a reconstruction may write next to the image


def _with_spread(method: str, s: Settings, modality: str | None = None) -> tuple[str, Settings]:
    """Uncertainty maps asked for without a method: the ensemble of ``UNCERTAINTY_SAMPLES`` runs of the recommended
    method, or of the modality's spread method where that has no prior (``recon.samplers.registry.spread_method``),
    so that the maps have a spread."""
    from recon.samplers.registry import UNCERTAINTY_SAMPLES, spread_method

    if s.uncertainty is None or s.method is not None:
        return method, s
    name, options = spread_method(method, modality)
    if name == method:
        return method, s
    return name, replace(s, method=name, options={**options, **s.options},
                         particles=s.particles or UNCERTAINTY_SAMPLES)


def _spread_asked(method: str, s: Settings) -> bool:
    """Whether the run's std map is wanted: uncertainty maps asked for, a particle method, or ``particles`` set. A
    method that averages a few chains by default (the hybrid's two) returns a std that is not written."""
    from recon.samplers import get_method

    return s.uncertainty is not None or s.particles is not None or get_method(method).family == "particles"


def _calibration(s: Settings) -> dict | None:
    """The conformal calibration file of ``s`` (read and checked), or None."""
    if s.calibration is None:
        return None
    from recon.samplers.uncertainty import load_calibration

    if s.uncertainty is None:
        raise PipelineError("calibration scales the uncertainty maps: give uncertainty (e.g. 0.9) too")
    return load_calibration(s.calibration)


@dataclass
class _Problem:
    """A measurement to reconstruct, its reference image (or None) and the headers a DICOM output copies."""

    meas: object
    ref_image: MedicalImage | None
    headers_from: MedicalImage | None
    complex_input: bool = False


def _read_problem(in_path: Path, s: Settings) -> _Problem:
    """Simulate ``s.task`` on an image, or read a measurement file / fastMRI k-space (and the reference)."""
    if s.task is not None:
        image = read_image(in_path, series=s.series, on_irregular=s.on_irregular)
        meas = _simulate_image(image, s.task, s.photons, s.noise, s.seed, s.task_params)
        return _Problem(meas, image, image)
    ref_image = read_image(s.reference, on_irregular=s.on_irregular) if s.reference is not None else None
    if in_path.suffix in (".h5", ".hdf5"):
        return _Problem(_fastmri_measurement(in_path), ref_image, ref_image, complex_input=True)
    if in_path.suffix != ".npz":
        raise PipelineError(f"{in_path}: give a measurement file (.npz from `recon simulate`), a fastMRI .h5 "
                            "file, or an image together with --task to simulate and reconstruct in one go")
    meas = load_measurement(in_path)
    shape = tuple(meas.geometry.get("shape") or (1, *meas.spec.img_size))
    if ref_image is not None and tuple(ref_image.shape) != shape:
        raise PipelineError(f"{s.reference}: reference of shape {tuple(ref_image.shape)} does not match the "
                            f"measurement's image shape {shape}")
    return _Problem(meas, ref_image, ref_image)


def _resolve_method(method: str | None, options: dict | None, physics, complex_input: bool, in_path: Path,
                    task: str | None = None, volume: bool = False) -> str:
    """The method to run (None: the recommended one for the operator, on an image or a ``volume``; ``analytic`` for
    measured k-space), checked against the data: measured complex k-space needs a method that takes complex
    images."""
    from recon.samplers import METHODS, get_method, recommended_method

    if method is None:
        modality = getattr(physics, "modality", None)
        method = "analytic" if complex_input else recommended_method(modality, task, volume)
    spec = get_method(method)
    spec.check_options(options or {})
    if complex_input and not spec.complex_data:
        usable = " or ".join(m for m, s in METHODS.items() if s.complex_data)
        raise PipelineError(f"{in_path}: measured complex k-space; recon's diffusion priors are real-valued "
                            f"(magnitude) priors, so use --method {usable} for fastMRI files")
    return method


@dataclass
class _Run:
    """A sampler's result and the affine map ``x_n = a d + b`` between its range and the operator's domain."""

    result: object
    analytic_d: torch.Tensor
    a: float
    b: float
    prior: object
    prior_name: str | None
    weighting: dict | None = None


def _run_method(meas, physics, method: str, s: Settings, dev, cache, callback) -> _Run:
    """Load the prior the method needs, map the problem to its range, and run the sampler."""
    from recon import reconstruct
    from recon.samplers import get_method
    from recon.samplers.baselines import analytic_inverse

    with torch.no_grad():
        analytic_d = analytic_inverse(physics, meas.y)
    if get_method(method).weighted_data:  # Beer–Lambert CT: each ray by its inverse variance (PWLS)
        physics, meas = weighted_problem(meas, physics)
    prior_obj, prior_name = None, None
    if get_method(method).needs_prior:
        prior_obj, prior_name = _pick_prior(s.prior, meas, dev, cache)
        if s.memory_budget is not None and hasattr(prior_obj, "memory_budget"):
            if not s.memory_budget > 0:
                raise PipelineError(f"memory_budget must be positive, got {s.memory_budget}")
            prior_obj.memory_budget = float(s.memory_budget)
        y_n, sigma_n, a, b = normalised_problem(meas, physics, prior_obj, analytic_d)
    else:  # classical methods run in domain units
        y_n, sigma_n, a, b = meas.y, meas.sigma_y, 1.0, 0.0
    result = reconstruct(physics, y_n, prior_obj, method=method, sigma_y=sigma_n, seed=s.seed, steps=s.steps,
                         particles=s.particles, callback=callback, **s.options)
    return _Run(result, analytic_d, a, b, prior_obj, prior_name, meas.noise.get("weighting"))


def _to_physical(spec, x_n: torch.Tensor, a: float, b: float) -> np.ndarray:
    """Normalised → physical ``(D, H, W)``; complex images (two channels) → magnitude."""
    d = from_domain(spec, (x_n.detach().double().cpu() - b) / a)[0]
    arr = (d[0] if d.shape[0] == 1 else d.pow(2).sum(0).sqrt()).numpy()
    return arr[None] if arr.ndim == 2 else arr


def _reconstruction_outputs(problem: _Problem, run: _Run, physics, method: str, seed: int, reference,
                            in_path: Path, dev, spread: bool = True) -> Written:
    """The image, the std map (when ``spread``), the preview panels, the report and the provenance of a
    reconstruction."""
    meas, spec, result = problem.meas, problem.meas.spec, run.result
    rec = _to_physical(spec, result.x, run.a, run.b)
    analytic = _to_physical(spec, run.analytic_d * run.a + run.b, run.a, run.b)
    x_d = ((result.x - run.b) / run.a).to(meas.y.dtype)
    residual = float((meas.y - physics.A(x_d)).flatten(1).norm(dim=1).mean())
    affine = np.asarray(meas.geometry.get("affine", np.eye(4)), dtype=np.float64)
    modality = meas.geometry.get("modality") or ("CT" if spec.is_ct else None)
    unit = "HU" if spec.is_ct else meas.geometry.get("unit")
    image = MedicalImage(array=rec, affine=affine, modality=modality, unit=unit, source="recon reconstruction")
    if problem.headers_from is not None and problem.headers_from.dicom_headers is not None:
        image.dicom_headers = problem.headers_from.dicom_headers
    maps = {}
    if result.std is not None and spread:
        std = result.std.detach().double().cpu()[0, 0].numpy() / abs(run.a) * domain_scale(spec)
        maps["std"] = std[None] if std.ndim == 2 else std
    panels = [("analytic", analytic), ("reconstruction", rec)]
    report: dict = {"method": method, "task": spec.task, "prior": _prior_label(run.prior_name),
                    "data_residual": residual, "nfe": result.nfe, "seconds": result.seconds,
                    "steps": result.info.get("steps"), "particles": result.info.get("particles"), "seed": seed}
    if result.info.get("base"):  # an ensemble: the sampler it repeats
        report["base"] = result.info["base"]
    if result.std is not None and not spread:
        report["std_map"] = (f"not written: the image is the mean of {result.info.get('particles')} chains, too few "
                             f"for a spread; --uncertainty 0.9 writes calibrated maps")
    if problem.ref_image is not None:
        ref = problem.ref_image.array
        report.update(metrics(rec, ref, spec.is_ct))
        report["analytic"] = metrics(analytic, ref, spec.is_ct)
        panels = [("reference", ref), *panels, ("error", rec - ref)]
    report["diagnostics_last"] = {k: v for k, v in (result.diagnostics[-1] if result.diagnostics else {}).items()
                                  if isinstance(v, (int, float, bool))}
    # the values the method chose from the noise model or a rule (σ_y used, TV's discrepancy weight, ...)
    report["noise"] = _jsonable({**meas.noise, **({"weighting": run.weighting} if run.weighting else {})})
    report["method_options"] = _jsonable(result.info.get("options", {}))
    if "tv_weight" in result.info:
        report["tv_weight"] = _jsonable(result.info["tv_weight"])
    provenance = {"task": spec.to_json(), "noise": meas.noise, "method": method,
                  "sampler_info": _jsonable(result.info),
                  "prior": {"name": _prior_label(run.prior_name),
                            "sha256": _prior_checksum(run.prior) if run.prior else None},
                  "inputs": {"input_sha256": sha256_files(input_files(in_path)),
                             "reference_sha256": sha256_files(input_files(Path(reference))) if reference else None},
                  "device": str(dev)}
    return Written(image=image, description=f"recon {method} {spec.task}", report=report, provenance=provenance,
                   panels=panels, maps=maps, headers_from=problem.headers_from, is_ct=spec.is_ct)


def reconstruct_in_memory(input: str | os.PathLike, settings: Settings, cache: dict | None = None) -> tuple:
    """Simulate ``settings.task`` on the image ``input`` and reconstruct it, writing nothing (``recon calibrate``).

    Returns:
        ``(truth, result, physics)``: the image and the sampler's result in the operator's domain units (μ in
        mm⁻¹ for CT), and the operator.
    """
    if settings.task is None:
        raise PipelineError("reconstructing in memory simulates a task on a known image: give task")
    dev = resolve_device(settings.device)
    problem = _read_problem(Path(input), settings)
    physics = _physics(problem.meas, dev, cache)
    problem.meas.y = problem.meas.y.to(dev)
    method = _resolve_method(settings.method, settings.options, physics, problem.complex_input, Path(input),
                             problem.meas.spec.task, problem.meas.spec.is_volume)
    method, settings = _with_spread(method, settings, getattr(physics, "modality", None))
    run = _run_method(problem.meas, physics, method, settings, dev, cache, None)
    run.result.info["prior_sha256"] = _prior_checksum(run.prior) if run.prior else None
    spec = problem.meas.spec
    truth = to_domain(spec, _image_tensor(problem.ref_image).reshape(run.result.x.shape[2:]),
                      "HU" if spec.is_ct else problem.ref_image.unit)
    return truth, _domain_result(run), physics


def _domain_result(run: _Run):
    """The sampler's result in the operator's domain units (``d = (x_n − b)/a``), for maps in physical units."""
    from recon.samplers import ReconstructionResult

    r, a, b = run.result, run.a, run.b
    samples = None if r.samples is None else (r.samples - b) / a
    std = None if r.std is None else r.std / abs(a)
    return ReconstructionResult(x=(r.x - b) / a, samples=samples, weights=r.weights, std=std, info=r.info)


def _difference_map(spec, m: torch.Tensor) -> np.ndarray:
    """A map of differences (std, null space) in physical units ``(D, H, W)``; two channels → magnitude."""
    d = m.detach().double().cpu()[0] * domain_scale(spec)
    arr = (d[0] if d.shape[0] == 1 else d.pow(2).sum(0).sqrt()).numpy()
    return arr[None] if arr.ndim == 2 else arr


def _add_uncertainty(written: Written, problem: _Problem, run: _Run, physics, level: float,
                     calibration: dict | None) -> None:
    """Std, interval bounds and null-space maps in physical units, their preview panels and their summary in the
    report (over the image and inside the body), with the sampler's ESS warnings."""
    from recon.samplers.uncertainty import body_mask, builtin_calibration, summarise_maps, uncertainty_maps

    spec = problem.meas.spec
    if calibration is not None:
        fitted_on_volumes = calibration.get("volume")  # absent in files written before it was recorded
        calibration_source = "the calibration file given" + (
            "" if fitted_on_volumes is None or bool(fitted_on_volumes) == spec.is_volume else
            f" (fitted on {'volumes' if fitted_on_volumes else 'slices'}, applied to a "
            f"{'volume' if spec.is_volume else 'slice'})")
    elif run.result.std is None and run.result.samples is None:
        calibration_source = None  # one estimate: no intervals to calibrate
    else:
        calibration, calibration_source = builtin_calibration(run.prior, run.result.info, spec.task,
                                                              volume=spec.is_volume)
    maps = uncertainty_maps(physics, _domain_result(run), level=level, calibration=calibration)
    phys = {"null_space": _difference_map(spec, maps["null_space"])}
    if "std" in maps:
        phys["std"] = _difference_map(spec, maps["std"])
        phys["lower"] = _to_physical(spec, maps["lower"], 1.0, 0.0)
        phys["upper"] = _to_physical(spec, maps["upper"], 1.0, 0.0)
    written.maps.update(phys)
    rec = written.image.array
    mask = body_mask(torch.from_numpy(problem.ref_image.array if problem.ref_image is not None else rec))
    summary = summarise_maps({k: torch.from_numpy(v) for k, v in phys.items()}, mask, torch.from_numpy(rec))
    info = run.result.info
    if "std" not in maps:
        intervals = None
    elif calibration and calibration.get("offset"):
        intervals = "x ± c·(std + offset), c and offset from the calibration"
    elif calibration:
        intervals = "x ± c·std, c from the calibration"
    else:
        intervals = "weighted sample quantiles" if run.result.samples is not None else "x ± z·std"
    written.report["uncertainty"] = {
        "level": level, "unit": written.image.unit, "intervals": intervals,
        "calibration_factor": calibration["factor"] if calibration else None, "calibration": calibration_source,
        "calibration_offset": float(calibration.get("offset", 0.0)) * domain_scale(spec) if calibration else None,
        "body_pixels": int(mask.sum()), **summary,
        "ess_final": info.get("ess_final"), "degenerate": info.get("degenerate"), "warnings": info.get("warnings")}
    if "std" not in maps:
        written.report["uncertainty"]["note"] = f"{info.get('method')} returns one estimate: no spread, no intervals"
    written.panels += [(name, phys[key]) for name, key in (("std", "std"), ("null space", "null_space"))
                       if key in phys]


def _prior_label(name: str | None) -> str | None:
    """A built-in prior's name, or ``"local folder"`` (a path is not recorded)."""
    from recon.priors.io import BUILTIN_PRIORS

    return name if name is None or name in BUILTIN_PRIORS else "local folder"
