"""Calibration from the user's own data: ``recon calibrate``.

Each reference study (a known image) is measured by simulation with the run's task and noise, reconstructed with
the run's method, and its normalised errors ``|x − truth| / std`` inside the body are pooled; the split-conformal
quantile of those scores (``recon.samplers.uncertainty.conformal_factor``) is the factor ``c`` that makes
``x ± c·std`` reach the stated coverage on studies like these. The factor is stored as JSON with the method, task
and settings it holds for, and ``recon reconstruct --uncertainty --calibration FILE`` applies it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from recon.batch import discover_studies
from recon.pipeline import PipelineError, reconstruct_in_memory
from recon.settings import Settings

__all__ = ["calibrate_studies"]

log = logging.getLogger("recon.calibrate")
_STD_FLOOR = 1e-6  # as conformal_factor's default


def calibrate_studies(input: str | os.PathLike, output: str | os.PathLike, settings: Settings | None = None, *,
                      coverage: float = 0.9, overwrite: bool = False, offset: str | float = 0.0,
                      **overrides) -> dict:
    """Fit a conformal interval factor on reference studies and write it to ``output`` (JSON).

    Args:
        input: a folder of reference studies (NIfTI files, DICOM series folders) or a CSV manifest.
        output: the calibration file to write.
        settings: how to simulate and reconstruct (``task`` is required; the method must give a spread: several
            particles or samples).
        coverage: the nominal coverage the intervals should reach, in (0, 1).
        overwrite: replace an existing ``output``.
        offset: added to the std in the intervals ``x ± c·(std + offset)``, in the reconstruction's domain units
            (0: ``x ± c·std``), or ``"balanced"``: the offset that covers the studies most evenly
            (``recon.samplers.uncertainty.balanced_offset``), for studies whose spread shrinks faster than their
            error (e.g. limited angle over several arcs).
        **overrides: ``Settings`` fields.

    Returns:
        The calibration written (factor, coverage, studies, scores, method, task).
    """
    from recon.samplers.registry import sampler_settings
    from recon.samplers.uncertainty import balanced_offset, body_mask, conformal_factor, save_calibration

    s = Settings.from_mapping(overrides, settings)
    out = Path(output)
    if out.exists() and not overwrite:
        raise PipelineError(f"{out}: exists (use --overwrite to replace it)")
    if not 0 < coverage < 1:
        raise PipelineError(f"coverage must be in (0, 1), got {coverage!r}")
    if offset != "balanced" and not (isinstance(offset, (int, float)) and 0 <= float(offset) < float("inf")):
        raise PipelineError(f"offset must be a number >= 0 or 'balanced', got {offset!r}")
    if s.uncertainty is None:  # as `recon reconstruct --uncertainty`: no method named runs the recommended ensemble
        s = replace(s, uncertainty=coverage)
    stds, errors, masks, names, tasks, t0 = [], [], [], [], set(), time.perf_counter()
    cache: dict = {}
    truths_dims: set[int] = set()
    for study in discover_studies(input):
        study_settings = Settings.from_mapping(study.options, s)
        truth, result, _ = reconstruct_in_memory(study.input, study_settings, cache)
        if result.std is None:
            raise PipelineError(f"method {result.info.get('method')!r} gives no spread to calibrate: use a sampler "
                                "with several particles (e.g. --particles 8)")
        if truths_dims and truth.dim() not in truths_dims:
            raise PipelineError(f"{study.name}: the reference studies mix 2D slices and 3D volumes; calibrate "
                                "them separately (a factor fitted on one does not hold for the other)")
        truths_dims.add(truth.dim())
        stds.append(result.std.detach().double().cpu())
        errors.append((result.x - truth).detach().double().cpu().abs())
        masks.append(body_mask(truth.detach().cpu()).reshape(truth.shape))
        names.append(study.name)
        tasks.add(study_settings.task)
        log.info("calibration study %s: done", study.name)
    if offset == "balanced":
        offset, factor, _ = balanced_offset(stds, errors, masks, coverage=coverage)
    else:
        offset = float(offset)
        factor = conformal_factor(stds, errors, masks, coverage=coverage, offset=offset)
    n_scores = int(sum(int(m.sum()) for m in masks))
    covered = [_covered(sd + offset, e, m, factor) for sd, e, m in zip(stds, errors, masks, strict=True)]
    meta = {"coverage_on_references": sum(c for c, _ in covered) / max(1, sum(n for _, n in covered)),
            "method": result.info.get("method"), "base": result.info.get("base"),
            "particles": result.info.get("particles"), "prior_sha256": result.info.get("prior_sha256"),
            "task": s.task, "tasks": sorted(tasks), "task_params": s.task_params, "photons": s.photons,
            "noise": s.noise, "steps": result.info.get("steps"), "sampler_options": sampler_settings(result.info),
            "studies": len(names), "volume": truths_dims == {3},
            "seconds": time.perf_counter() - t0}
    save_calibration(out, factor, coverage, n_scores=n_scores, offset=offset, **meta)
    return {"output": str(out), "factor": factor, "offset": offset, "coverage": coverage, "n_scores": n_scores,
            **meta}


def _covered(std: torch.Tensor, err: torch.Tensor, mask: torch.Tensor, factor: float) -> tuple[int, int]:
    """Body pixels whose error lies inside ``± factor · std`` (with the conformal scores' std floor), and the
    body's pixel count."""
    mask = mask.reshape(err.shape)
    inside = err[mask] <= factor * std[mask].clamp_min(_STD_FLOOR)
    return int(inside.sum()), int(mask.sum())
