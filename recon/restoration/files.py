"""File-to-file restoration: what ``recon restore`` runs, as one Python call.

``restore_file(input, output, model=..., steps=...)`` reads a DICOM series / file, NIfTI volume or image
(``recon.datasets.io.read_image``: ``(D, H, W)`` in physical units, HU for CT, with its RAS affine), restores it slice
by slice in chunks with a trained restorer, and writes the result with the input's geometry (and, for DICOM output,
a derived series next to the input's) plus the companions of ``recon reconstruct`` (``recon.pipeline.output_paths``):
``*.preview.png`` (reference, input, restoration, error), ``*.report.json`` (``psnr``/``ssim`` when there is a
reference, ``seconds``, ``nfe``, ``outputs``), ``*.provenance.json`` (versions, configuration, restorer and input
checksums, timings; no names or paths) and ``*.config.yaml`` when a configuration is given. Outputs are written
atomically and never overwritten without ``overwrite=True``; the input is never modified.

``degrade=True`` is a simulation study: the model's own degradation (``restorer.degradation``, the one it was trained
on) is applied to the input first, and the input is the reference.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from recon.datasets.io import MedicalImage, check_plausible, read_image
from recon.outputs import (
    OutputError,
    Written,
    check_outputs,
    input_files,
    metrics,
    output_paths,
    sha256_files,
    write_outputs,
)
from recon.settings import Settings
from recon.utils import resolve_device

__all__ = ["restore_file"]



class RestoreError(OutputError):
    """A user-facing problem with a restoration (missing input, unusable model, shape mismatch)."""


def _label(name: str) -> str:
    from recon.restoration.io import BUILTIN_RESTORERS

    return name if name in BUILTIN_RESTORERS else "local folder"


def restore_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    settings: Settings | None = None,
    *,
    overwrite: bool = False,
    callback: Callable[[dict], None] | None = None,
    config: dict | None = None,
    **overrides,
) -> dict:
    """Restore ``input`` into ``output`` and return the report (also written as ``*.report.json``).

    Args:
        input: a DICOM series folder or file, NIfTI, NumPy or PNG/TIFF image.
        output: ``.nii.gz``/``.nii``/``.npy``/``.png``, or a folder (no suffix, or ``format="dicom"``) for a
            derived DICOM series.
        settings: a ``recon.settings.Settings``; restoration reads ``model`` (``"default"``, the built-in
            low-dose CT restorer, or a restorer folder), ``steps`` (the model's default: ResShift all T, RDDM 10),
            ``reference`` (PSNR/SSIM, error panel), ``degrade`` (apply the model's degradation first, seeded by
            ``seed``, the input being the reference), ``seed`` (also the sampler's: slice ``d`` from
            ``seed * 100003 + d``), ``eta`` (RDDM's DDIM η, default 0), ``format``, ``series``, ``on_irregular``,
            ``anonymize``, ``device`` and ``chunk`` (slices per network call, default about 2²⁰ pixels).
        overwrite: replace existing outputs.
        callback: receives each sampler step's ``{"step", "steps", ...}``.
        config: written to ``*.config.yaml`` and, paths withheld, to the provenance.
        **overrides: ``Settings`` fields set for this call.
    """
    s = Settings.from_mapping(overrides, settings)
    input_, reference, degrade, seed = input, s.reference, s.degrade, s.seed
    t_start = time.perf_counter()
    paths = output_paths(output, s.format)
    check_outputs(paths, overwrite)
    in_path = Path(input_)
    if not in_path.exists():
        raise RestoreError(f"{in_path}: no such file or folder")
    if degrade and reference is not None:
        raise RestoreError("--degrade uses the input as the reference: do not give --reference as well")
    dev = resolve_device(s.device)
    timings: dict = {}
    t0 = time.perf_counter()
    restorer = _load(s.model, dev)
    timings["load_model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image, ref_image = _read(in_path, reference, restorer, s.series, s.on_irregular)
    timings["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = image.array if degrade else (ref_image.array if ref_image is not None else None)
    degraded = restorer.degrade_array(image.array, seed=seed) if degrade else image.array
    timings["degrade"] = time.perf_counter() - t0
    if not np.isfinite(degraded).all():
        raise RestoreError(f"{in_path}: the image holds NaN or infinite values")
    t0 = time.perf_counter()
    restored, nfe = restorer.restore_array(degraded, steps=s.steps, seed=seed, chunk=s.chunk, eta=s.eta,
                                            callback=callback)
    timings["restore"] = time.perf_counter() - t0
    written = _restoration_outputs(restorer, s.model, image, degraded, restored, ref, nfe, timings["restore"],
                                   steps=s.steps, eta=s.eta, seed=seed, degrade=degrade)
    written.provenance["inputs"] = {"input_sha256": sha256_files(input_files(in_path)), "reference_sha256":
                                    sha256_files(input_files(Path(reference))) if reference else None}
    written.provenance.update({"timings_s": timings, "device": str(dev)})
    timings["total"] = time.perf_counter() - t_start  # up to the writing of the outputs
    fmt = "dicom" if (s.format == "dicom" or not paths["image"].suffix) else None
    return write_outputs(written, paths, fmt=fmt, config=config, anonymize=s.anonymize, overwrite=overwrite)


def _load(model, dev):
    from recon.restoration.io import load_restorer

    try:
        return load_restorer(model, device=dev)
    except FileNotFoundError as err:
        raise RestoreError(str(err)) from err


def _read(in_path: Path, reference, restorer, series, on_irregular) -> tuple[MedicalImage, MedicalImage | None]:
    """The input image (checked against the restorer's modality) and the reference, of the same shape."""
    image = read_image(in_path, series=series, on_irregular=on_irregular)
    if restorer.is_ct:  # the restorer works on CT in HU: anything else is refused, naming the file
        check_plausible(image, "ct", in_path)
    if reference is None:
        return image, None
    ref_image = read_image(reference, on_irregular=on_irregular)
    if tuple(ref_image.shape) != tuple(image.shape):
        raise RestoreError(f"{reference}: reference of shape {tuple(ref_image.shape)} does not match the input's "
                           f"shape {tuple(image.shape)}")
    return image, ref_image


def _restoration_outputs(restorer, model, image: MedicalImage, degraded, restored, ref, nfe: int, seconds: float, *,
                         steps, eta, seed: int, degrade: bool) -> Written:
    """The restored image, the preview panels, the report and the provenance (without inputs and timings)."""
    modality = image.modality or ("CT" if restorer.is_ct else None)
    unit = "HU" if restorer.is_ct else image.unit
    base = MedicalImage(array=restored, affine=image.affine, modality=modality, unit=unit, source="recon restoration")
    if image.dicom_headers is not None:
        base.dicom_headers = image.dicom_headers
    panels = [("input (degraded)" if degrade else "input", degraded), ("restored", restored)]
    used_steps = steps if steps is not None else restorer.sampling_steps
    report: dict = {"model": restorer.kind, "task": restorer.degradation.task, "restorer": _label(str(model)),
                    "degrade": bool(degrade), "steps": used_steps if used_steps is not None else restorer.schedule.T,
                    "nfe": nfe, "slices": int(restored.shape[0]), "seconds": seconds, "seed": seed}
    if ref is not None:
        report.update(metrics(restored, ref, restorer.is_ct))
        report["input"] = metrics(degraded, ref, restorer.is_ct)
        panels = [("reference", ref), *panels, ("error", restored - ref)]
    weights = Path(restorer.card.get("path", "")) / "model.safetensors"
    provenance = {
        "restorer": {"name": _label(str(model)), "kind": restorer.kind, "schedule": restorer.schedule.config(),
                     "sampling": {"steps": report["steps"], "eta": restorer.eta if eta is None else eta},
                     "degradation": restorer.degradation.config(),
                     "training_steps": (restorer.card.get("training") or {}).get("steps"),
                     "sha256": sha256_files([weights]) if weights.is_file() else None},
        "degrade": bool(degrade), "seed": seed,
        "geometry": {"shape": list(image.shape), "spacing_mm": list(image.spacing), "modality": image.modality},
    }
    return Written(image=base, description=f"recon {restorer.kind} {restorer.degradation.task}", report=report,
                   provenance=provenance, panels=panels, headers_from=image, is_ct=restorer.is_ct)
