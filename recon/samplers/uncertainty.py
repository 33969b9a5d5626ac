r"""Uncertainty maps and their calibration: null space, intervals, coverage, z-scores, conformal factors.

Everything works on the prior's normalised images ``(B, C, ...)`` and on the particle stacks
``samples (P, B, C, ...)`` / ``weights (P, B)`` that the samplers return (``ReconstructionResult``).

- **Null space.** ``null_space_component(physics, x) = x − A⁺A x``: the part of ``x`` the measurements cannot see,
  i.e. what the prior supplied. Where ``physics.adjoint_is_inverse`` is True (masks, single-coil Cartesian MRI)
  ``B = AᵀA`` has eigenvalues in ``{0, ½, 1}`` (½: real images under a k-space mask that samples ``k`` but not
  ``−k``), and ``A⁺A = 3B − 2B²`` exactly (the quadratic through ``(0, 0), (½, 1), (1, 1)``; it is ``B`` itself
  when ``B`` is a projection). The closed form is checked (``P²x = Px`` to ``1e-4``) and, if the operator does not
  satisfy it (e.g. multi-coil MRI with overlapping coil maps), or for every other operator (CT, blur), ``A⁺A x``
  is the minimum-norm solution of ``AᵀA z = AᵀA x`` by conjugate gradients from ``z = 0`` (``cg_iters``
  iterations, default 30, stopping at relative residual ``cg_tol``, default ``1e-4``). CG resolves the large
  singular values first: after a few dozen iterations directions with tiny singular values (CT: the high angular
  frequencies between views) count as null space, which is also what a user should read from the map.
- **Intervals.** ``interval_bounds(samples, weights, level, method)``: central ``level`` intervals per pixel,
  ``"quantile"`` (weighted empirical quantiles, midpoint interpolation: with ``K`` equally weighted samples the
  95 % interval is close to ``[min, max]``, which covers only ``(K − 1)/(K + 1)`` of a calibrated posterior),
  ``"gaussian"`` (mean ± z·std) or ``"t"`` (default: the predictive interval of a new draw from ``K`` draws,
  mean ± t_{K−1}·s·sqrt(1 + 1/K) with the unbiased ``s``; ``K`` is the effective sample size of the weights, at
  least 2: degenerate weights give finite, meaningless maps, and the sampler flags them).
  ``"t"`` is the small-``K`` choice: exact for a calibrated Gaussian posterior at any ``K``.
- **Checks.** ``coverage``, ``calibration_curve`` (nominal against observed coverage), ``zscores``, ``spearman``
  (rank correlation of std and |error|), ``body_mask`` (threshold + largest component + filled holes).
- **Conformal calibration.** ``conformal_factor(std_maps, errors, masks, coverage)``: split conformal on the
  normalised residuals ``|err| / std`` of reference studies; the ``⌈(n + 1)·coverage⌉``-th smallest of the ``n``
  scores is the factor ``c`` for which ``mean ± c·std`` reaches ``coverage`` on exchangeable new pixels (a
  finite-sample guarantee over the pixels of studies like the reference ones, not per pixel).
  ``save_calibration`` / ``load_calibration`` store it as a small JSON document that a later run applies
  (``uncertainty_maps(..., calibration=...)``).
- **For the pipeline.** ``uncertainty_maps(physics, result, level, calibration)`` returns the ``std``, ``lower``,
  ``upper`` and ``null_space`` maps; ``summarise_maps(maps, mask)`` the numbers for the report.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BUILTIN_CALIBRATION",
    "BUILTIN_TASK_CALIBRATION",
    "BUILTIN_VOLUME_CALIBRATION",
    "CALIBRATION_KIND",
    "OFFSET_GRID",
    "balanced_offset",
    "body_mask",
    "builtin_calibration",
    "builtin_calibration_path",
    "calibration_curve",
    "conformal_factor",
    "coverage",
    "interval_bounds",
    "interval_multiplier",
    "load_calibration",
    "null_space_component",
    "range_component",
    "save_calibration",
    "spearman",
    "summarise_maps",
    "uncertainty_maps",
    "zscores",
]

CALIBRATION_KIND = "recon-conformal-calibration"
BUILTIN_CALIBRATION = "calibration.json"  # a ``recon calibrate`` file shipped in a prior's folder
# a calibration for one task only, shipped next to it (``calibration-limited-angle-ct.json``); it comes first
BUILTIN_TASK_CALIBRATION = "calibration-{task}.json"
# a calibration fitted on volumes (``recon calibrate`` on volume studies): volume runs of the task look for it first
BUILTIN_VOLUME_CALIBRATION = "calibration-{task}-volume.json"
# offsets tried by ``balanced_offset``, in units of the reference studies' median std
OFFSET_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
_F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------
# null space
# ---------------------------------------------------------------------------------------------------------
def _gram(physics, x: torch.Tensor) -> torch.Tensor:
    return physics.A_adjoint(physics.A(x))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def _cg_range(physics, x: torch.Tensor, iters: int, tol: float) -> tuple[torch.Tensor, dict]:
    """Minimum-norm ``z`` with ``AᵀA z = AᵀA x`` (CG from 0 stays in range(Aᵀ)): ``z = A⁺A x``."""
    b = _gram(physics, x)
    z = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = _dot(r, r)
    tiny = torch.finfo(b.dtype).tiny
    rs0 = rs.clamp_min(tiny)
    stop = (tol**2) * rs0
    it = 0
    for it in range(1, int(iters) + 1):
        if bool((rs <= stop).all()):
            it -= 1
            break
        ap = _gram(physics, p)
        alpha = torch.where(rs <= stop, torch.zeros_like(rs), rs / _dot(p, ap).clamp_min(tiny))
        z = z + _col(alpha, z) * p
        r = r - _col(alpha, z) * ap
        rs_new = _dot(r, r)
        p = r + _col(rs_new / rs.clamp_min(tiny), z) * p
        rs = rs_new
    rel = float((rs.clamp_min(0) / rs0).sqrt().max())
    return z, {"solver": "cg", "iterations": it, "relative_residual": rel}


def range_component(physics, x: torch.Tensor, *, cg_iters: int = 30, cg_tol: float = 1e-4,
                    closed_form: bool | None = None) -> tuple[torch.Tensor, dict]:
    """``A⁺A x`` (the part of ``x`` the measurements see) and how it was computed.

    Args:
        physics: a linear deepinv ``Physics``; ``physics.adjoint_is_inverse`` selects the closed form.
        x: images ``(B, C, ...)`` in the operator's input space.
        cg_iters: conjugate-gradient iterations on the normal equations (operators without a closed form).
        cg_tol: CG stops when ‖AᵀA(z − x)‖ ≤ cg_tol·‖AᵀA x‖ for every batch item.
        closed_form: force (True) or forbid (False) the closed form ``3B − 2B²``; None: from the operator.

    Returns:
        ``(A⁺A x, info)``; ``info``: ``solver`` (``"closed-form"`` or ``"cg"``), ``iterations``,
        ``relative_residual`` (CG) or ``idempotence_error`` (closed form).
    """
    use = bool(getattr(physics, "adjoint_is_inverse", False)) if closed_form is None else bool(closed_form)
    with torch.no_grad():
        if use:
            bx = _gram(physics, x)
            px = 3 * bx - 2 * _gram(physics, bx)
            ppx = 3 * _gram(physics, px) - 2 * _gram(physics, _gram(physics, px))
            err = float(((ppx - px).flatten(1).norm(dim=1) / px.flatten(1).norm(dim=1).clamp_min(1e-30)).max())
            if err <= 1e-4 or closed_form:
                return px, {"solver": "closed-form", "iterations": 0, "idempotence_error": err}
        return _cg_range(physics, x, cg_iters, cg_tol)


def null_space_component(physics, x: torch.Tensor, *, cg_iters: int = 30, cg_tol: float = 1e-4) -> torch.Tensor:
    """``x − A⁺A x``: the part of ``x`` invisible to the measurements (what the prior supplied).

    Args:
        physics: a linear deepinv ``Physics`` (closed form where ``physics.adjoint_is_inverse``, else CG).
        x: images ``(B, C, ...)``.
        cg_iters: CG iterations for operators without a closed form (a few dozen; see the module docstring).
        cg_tol: CG relative tolerance on the normal equations.
    """
    z, _ = range_component(physics, x, cg_iters=cg_iters, cg_tol=cg_tol)
    return x - z


# ---------------------------------------------------------------------------------------------------------
# intervals
# ---------------------------------------------------------------------------------------------------------
def _uniform(samples: torch.Tensor) -> torch.Tensor:
    p, b = samples.shape[:2]
    return torch.full((p, b), 1.0 / p, dtype=_F64, device=samples.device)


def _bcast(w: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    return w.reshape(*w.shape, *([1] * (samples.dim() - 2))).to(samples.dtype)


def _moments(samples: torch.Tensor, weights: torch.Tensor | None):
    w = _uniform(samples) if weights is None else weights.to(_F64) / weights.to(_F64).sum(0, keepdim=True)
    wb = _bcast(w, samples)
    mean = (wb * samples).sum(0)
    var = (wb * (samples - mean) ** 2).sum(0).clamp_min(0)
    ess = 1.0 / (w**2).sum(0)  # (B,)
    return mean, var.sqrt(), ess


def interval_multiplier(level: float, ess: float | None = None, method: str = "t") -> float:
    """Half-width of the central ``level`` interval in units of the (population) std of the samples.

    Args:
        level: nominal coverage in (0, 1).
        ess: number of (effective) samples; needed by ``"t"``.
        method: ``"gaussian"`` (z quantile) or ``"t"`` (predictive Student-t, see the module docstring).
    """
    from scipy import stats

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    q = 0.5 + level / 2
    if method == "gaussian":
        return float(stats.norm.ppf(q))
    if method != "t":
        raise ValueError(f"method must be 'gaussian' or 't', got {method!r}")
    k = float(ess or 0)
    if k <= 1.0 + 1e-9:
        return float("inf")
    return float(stats.t.ppf(q, k - 1) * math.sqrt(k / (k - 1)) * math.sqrt(1 + 1 / k))


def _weighted_quantile(samples: torch.Tensor, weights: torch.Tensor, q: float) -> torch.Tensor:
    """Per-pixel weighted quantile, midpoint interpolation (node ``i`` at cumulative weight minus half its own)."""
    order = samples.argsort(0)
    vs = samples.gather(0, order)
    w = _bcast(weights.to(_F64), samples).expand_as(samples).to(_F64).gather(0, order)
    cw = w.cumsum(0)
    nodes = (cw - 0.5 * w) / cw[-1:]
    idx = (nodes < q).sum(0, keepdim=True).clamp(1, samples.shape[0] - 1)
    lo_n, hi_n = nodes.gather(0, idx - 1), nodes.gather(0, idx)
    lo_v, hi_v = vs.gather(0, idx - 1), vs.gather(0, idx)
    t = ((q - lo_n) / (hi_n - lo_n).clamp_min(1e-300)).clamp(0, 1).to(samples.dtype)
    return (lo_v + t * (hi_v - lo_v))[0]


def interval_bounds(samples: torch.Tensor, weights: torch.Tensor | None = None, level: float = 0.9,
                    method: str = "t", factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel central ``level`` interval ``(lower, upper)``, each ``(B, C, ...)``.

    Args:
        samples: ``(P, B, C, ...)`` posterior samples or particles.
        weights: ``(P, B)`` normalised weights (None: uniform).
        level: nominal coverage in (0, 1).
        method: ``"t"`` (default), ``"gaussian"`` or ``"quantile"`` (see the module docstring).
        factor: a half-width in std units that replaces the method's (a conformal factor); mean ± factor·std.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    w = _uniform(samples) if weights is None else weights
    if method == "quantile" and factor is None:
        lo = _weighted_quantile(samples, w, 0.5 - level / 2)
        hi = _weighted_quantile(samples, w, 0.5 + level / 2)
        return lo, hi
    mean, std, ess = _moments(samples, w)
    if factor is None:
        mult = torch.tensor([interval_multiplier(level, max(float(e), 2.0), method) for e in ess], dtype=std.dtype,
                            device=std.device)  # ESS < 2 (degenerate weights) counts as 2: finite maps
        half = _col(mult, std) * std
    else:
        half = float(factor) * std
    return mean - half, mean + half


# ---------------------------------------------------------------------------------------------------------
# checks against the truth
# ---------------------------------------------------------------------------------------------------------
def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    t = torch.as_tensor(t)
    if mask is None:
        return t.flatten()
    return t[torch.as_tensor(mask, dtype=torch.bool, device=t.device).expand_as(t)]


def coverage(lower: torch.Tensor, upper: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of pixels (inside ``mask`` if given) whose ``truth`` lies in ``[lower, upper]``."""
    inside = (truth >= lower) & (truth <= upper)
    return float(_masked(inside, mask).to(_F64).mean())


def calibration_curve(samples: torch.Tensor, truth: torch.Tensor, weights: torch.Tensor | None = None,
                      levels: Sequence[float] | None = None, mask: torch.Tensor | None = None,
                      method: str = "t") -> tuple[np.ndarray, np.ndarray]:
    """Observed coverage of the central intervals at each nominal ``level`` (default 0.05, 0.10, …, 0.95, 0.99).

    Args:
        samples: ``(P, B, C, ...)`` samples; ``truth``: ``(B, C, ...)``.
        truth: the true image.
        weights: ``(P, B)`` weights (None: uniform).
        levels: nominal coverages.
        mask: pixels to count (None: all).
        method: interval construction (``interval_bounds``).

    Returns:
        ``(nominal, observed)`` arrays.
    """
    lv = np.asarray(levels if levels is not None else [*np.arange(0.05, 0.951, 0.05), 0.99], dtype=float)
    obs = [coverage(*interval_bounds(samples, weights, float(p), method), truth, mask) for p in lv]
    return lv, np.asarray(obs)


def zscores(mean: torch.Tensor, std: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None,
            std_floor: float = 1e-8) -> torch.Tensor:
    """``(truth − mean) / std`` per pixel (inside ``mask``, flattened); std below ``std_floor`` is floored."""
    return _masked((truth - mean) / std.clamp_min(std_floor), mask)


def spearman(std: torch.Tensor, abs_err: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Spearman rank correlation between the std map and |error| (inside ``mask``); ties get average ranks."""
    from scipy import stats

    a = _masked(std, mask).detach().double().cpu().numpy()
    b = _masked(abs_err, mask).detach().double().cpu().numpy()
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def body_mask(reference: torch.Tensor, threshold: float | None = None, fraction: float = 0.1) -> torch.Tensor:
    """The body (or head) inside an image: pixels above ``threshold``, largest connected component, holes filled.

    Args:
        reference: an image ``(H, W)`` or ``(..., H, W)`` (each 2D slice is processed on its own).
        threshold: absolute threshold; None: ``lo + fraction·(hi − lo)`` with ``lo``/``hi`` the 1st/99th
            percentiles of the image.
        fraction: see ``threshold``.

    Returns:
        A boolean tensor of ``reference``'s shape.
    """
    from scipy import ndimage

    arr = torch.as_tensor(reference).detach().double().cpu().numpy()
    if threshold is None:
        lo, hi = np.percentile(arr, [1, 99])
        threshold = lo + fraction * (hi - lo)
    flat = arr.reshape(-1, *arr.shape[-2:])
    out = np.zeros(flat.shape, dtype=bool)
    for i, im in enumerate(flat):
        fg = im > threshold
        lab, n = ndimage.label(fg)
        if n:
            sizes = ndimage.sum_labels(fg, lab, index=np.arange(1, n + 1))
            fg = lab == (1 + int(np.argmax(sizes)))
        out[i] = ndimage.binary_fill_holes(fg)
    return torch.from_numpy(out.reshape(arr.shape))


# ---------------------------------------------------------------------------------------------------------
# conformal calibration
# ---------------------------------------------------------------------------------------------------------
def _lists(std_maps, errors, masks) -> tuple[list, list, list]:
    std_maps = [std_maps] if isinstance(std_maps, torch.Tensor) else list(std_maps)
    errors = [errors] if isinstance(errors, torch.Tensor) else list(errors)
    if masks is None or isinstance(masks, torch.Tensor):
        masks = [masks] * len(std_maps)
    if not (len(std_maps) == len(errors) == len(masks)):
        raise ValueError("std_maps, errors and masks must have the same length")
    return std_maps, errors, list(masks)


def _study_scores(std_maps, errors, masks, std_floor: float, offset: float = 0.0) -> list[np.ndarray]:
    """Per study, the normalised residuals ``|err| / (std + offset)`` of the pixels in its mask."""
    return [(_masked(e.abs(), m) / (_masked(s, m) + float(offset)).clamp_min(std_floor)).double().cpu().numpy()
            for s, e, m in zip(*_lists(std_maps, errors, masks), strict=True)]


def _scores(std_maps, errors, masks, std_floor: float, offset: float = 0.0) -> np.ndarray:
    out = _study_scores(std_maps, errors, masks, std_floor, offset)
    return np.concatenate(out) if out else np.zeros(0)


def _quantile(scores: np.ndarray, coverage: float) -> float:
    s = np.sort(scores)
    k = math.ceil((s.size + 1) * coverage)
    return float("inf") if k > s.size or s.size == 0 else float(s[k - 1])


def conformal_factor(std_maps, errors, masks=None, coverage: float = 0.9, std_floor: float = 1e-6,
                     offset: float = 0.0) -> float:
    """Split-conformal half-width factor ``c``: ``mean ± c·(std + offset)`` covers ``coverage`` of new exchangeable
    pixels.

    Args:
        std_maps: a std map or a list of them (one per reference study), ``(B, C, ...)`` each.
        errors: the matching ``mean − truth`` maps.
        masks: None, one mask for all, or one per study (pixels that count, e.g. ``body_mask``).
        coverage: target coverage in (0, 1).
        std_floor: std below this counts as this (a zero-spread pixel with an error gets a huge score).
        offset: added to the std before normalising (the sensitivity term of normalised conformal scores, in the
            std's units; 0: ``|err|/std``).

    Returns:
        The ``⌈(n + 1)·coverage⌉``-th smallest normalised residual ``|err|/(std + offset)`` of the ``n`` pooled
        pixels (``inf`` when ``n`` is too small for the level).
    """
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    if not (math.isfinite(offset) and offset >= 0):
        raise ValueError(f"offset must be finite and >= 0, got {offset}")
    return _quantile(_scores(std_maps, errors, masks, std_floor, offset), coverage)


def balanced_offset(std_maps, errors, masks=None, coverage: float = 0.9, std_floor: float = 1e-6,
                    grid: tuple[float, ...] = OFFSET_GRID) -> tuple[float, float, list[float]]:
    """The offset that makes the pooled conformal intervals ``± c·(std + offset)`` cover the reference studies most
    evenly: of ``offset = g · median(std)`` for ``g`` in ``grid``, the one whose largest per-study deviation from
    ``coverage`` is smallest (the first on ties). A spread that shrinks faster than the error where the data say
    more (more views, wider arcs) needs the offset; where it does not, 0 wins.

    Returns:
        ``(offset, c, per-study coverage)``.
    """
    pooled = np.concatenate([_masked(s, m).double().cpu().numpy().ravel()
                             for s, _, m in zip(*_lists(std_maps, errors, masks), strict=True)])
    scale = float(np.median(pooled)) if pooled.size else 0.0
    best = None
    for g in grid:
        offset = float(g) * scale
        per_study = _study_scores(std_maps, errors, masks, std_floor, offset)
        c = _quantile(np.concatenate(per_study), coverage)
        covered = [float((sc <= c).mean()) if sc.size else float("nan") for sc in per_study]
        worst = max(abs(v - coverage) for v in covered if v == v)
        if best is None or worst < best[0] - 1e-12:
            best = (worst, offset, c, covered)
    return best[1], best[2], best[3]


def save_calibration(path: str | os.PathLike, factor: float, coverage: float, *, n_scores: int | None = None,
                     offset: float = 0.0, **meta) -> Path:
    """Write a conformal calibration as JSON (``kind``, ``version``, ``coverage``, ``factor``, ``offset`` (intervals
    ``x ± factor·(std + offset)``), the Gaussian z of the same level and their ratio ``inflation``, plus ``meta``:
    method, task, studies, ...). Returns the path."""
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be finite and > 0, got {factor}")
    if not (math.isfinite(offset) and offset >= 0):
        raise ValueError(f"offset must be finite and >= 0, got {offset}")
    z = interval_multiplier(coverage, method="gaussian")
    doc = {"kind": CALIBRATION_KIND, "version": 1, "coverage": float(coverage), "factor": float(factor),
           "offset": float(offset), "gaussian_z": z, "inflation": float(factor) / z, "n_scores": n_scores, **meta}
    from recon.datasets.io import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes((json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), path, overwrite=True)
    return path


def load_calibration(path: str | os.PathLike) -> dict:
    """Read and check a calibration written by ``save_calibration``; a bad file raises ``ValueError`` naming it."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable calibration file ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("kind") != CALIBRATION_KIND:
        raise ValueError(f"{path}: not a recon calibration file (kind {CALIBRATION_KIND!r} expected)")
    factor, cov = doc.get("factor"), doc.get("coverage")
    if not isinstance(factor, (int, float)) or not factor > 0 or not isinstance(cov, (int, float)) or not 0 < cov < 1:
        raise ValueError(f"{path}: calibration needs factor > 0 and coverage in (0, 1)")
    offset = doc.get("offset", 0.0)
    if not isinstance(offset, (int, float)) or not (math.isfinite(offset) and offset >= 0):
        raise ValueError(f"{path}: calibration offset must be a number >= 0, got {offset!r}")
    return doc


def builtin_calibration_path(folder: str | os.PathLike | None, task: str | None,
                             volume: bool = False) -> Path | None:
    """The calibration file a prior's ``folder`` ships for ``task``: for a ``volume`` run
    ``calibration-<task>-volume.json`` if there is one; then ``calibration-<task>.json``, then ``calibration.json``
    (fitted on slices); None if none exists."""
    if not folder:
        return None
    names = [BUILTIN_VOLUME_CALIBRATION.format(task=task)] if task and volume else []
    names += ([BUILTIN_TASK_CALIBRATION.format(task=task)] if task else []) + [BUILTIN_CALIBRATION]
    for name in names:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def builtin_calibration(prior, info: dict, task: str | None, volume: bool = False) -> tuple[dict | None, str]:
    """The calibration shipped in ``prior``'s folder for ``task`` (``builtin_calibration_path``, written by
    ``recon calibrate``) if it was fitted for this run, else None; and a one-line reason either way, for the report.

    It applies when it was fitted on these weights (``prior_sha256``) for the same method, base sampler, number
    of samples and steps (``info``: the sampler's ``method``, ``base``, ``particles``, ``steps``), with the same
    sampler options (``recon.samplers.registry.sampler_settings``) and lists ``task`` among its tasks. A file that
    exists but does not match is not used: intervals stay the uncalibrated ones. A file fitted on volumes applies
    to ``volume`` runs only; one fitted on slices applies to volumes only when the file says where it was checked on
    volumes (``holds_for_volumes``, written by whoever measured it), and the reason says so.
    """
    from recon.priors.io import weights_sha256
    from recon.samplers.registry import sampler_settings

    folder = (getattr(prior, "card", None) or {}).get("path") if prior is not None else None
    path = builtin_calibration_path(folder, task, volume)
    if path is None:
        return None, "the prior ships no calibration"
    doc = load_calibration(path)
    run = {"method": info.get("method"), "base": info.get("base"), "particles": info.get("particles"),
           "steps": info.get("steps")}
    fitted = {k: doc.get(k) for k in run}
    if run != fitted:
        return None, f"the prior's calibration was fitted for {_describe_run(fitted)}, not {_describe_run(run)}"
    if task not in (doc.get("tasks") or []):
        return None, f"the prior's calibration was fitted on {', '.join(doc.get('tasks') or [])}, not {task}"
    if doc.get("volume", False) and not volume:
        return None, "the prior's calibration was fitted on volumes, not slices"
    if volume and not doc.get("volume", False) and not doc.get("holds_for_volumes"):
        return None, (f"the prior's calibration was fitted on slices and has not been measured on {task} volumes "
                      "(recon calibrate on volumes like these fits one)")
    used = sampler_settings(info)
    if doc.get("sampler_options") != used:
        there = doc.get("sampler_options") or {}
        changed = sorted(k for k in set(there) | set(used) if there.get(k) != used.get(k))
        return None, ("the prior's calibration was fitted with other sampler options ("
                      + ", ".join(f"{k}: {there.get(k)!r} there, {used.get(k)!r} here" for k in changed) + ")")
    if doc.get("prior_sha256") != weights_sha256(prior):
        return None, "the prior's calibration was fitted on other weights"
    kind = "volumes" if doc.get("volume", False) else "slices, applied to this volume" if volume else "slices"
    return doc, (f"built into the prior: fitted on {doc.get('studies')} reference studies ({kind}; "
                 f"{doc.get('fitted_on', '')})")


def _describe_run(run: dict) -> str:
    base = f" of {run['base']}" if run.get("base") else ""
    return f"{run.get('method')}{base} with {run.get('particles')} samples of {run.get('steps')} steps"


def _calibrated_half_width(calibration, level: float) -> tuple[float, float]:
    """``(factor, offset)`` of the half-width ``factor·(std + offset)`` at ``level``: the stored factor at its own
    level, else ``z(level)·inflation``; the stored offset (0 if none)."""
    doc = load_calibration(calibration) if isinstance(calibration, (str, os.PathLike)) else dict(calibration)
    offset = float(doc.get("offset", 0.0))
    if abs(float(doc["coverage"]) - level) < 1e-9:
        return float(doc["factor"]), offset
    infl = float(doc.get("inflation", doc["factor"] / interval_multiplier(doc["coverage"], method="gaussian")))
    return interval_multiplier(level, method="gaussian") * infl, offset


# ---------------------------------------------------------------------------------------------------------
# for the pipeline
# ---------------------------------------------------------------------------------------------------------
def uncertainty_maps(physics, result, level: float = 0.9, calibration=None, *, method: str = "t",
                     cg_iters: int = 30) -> dict[str, torch.Tensor]:
    """The maps a user reads next to a reconstruction, all ``(B, C, ...)`` like ``result.x``.

    Args:
        physics: the (linear) operator the reconstruction used.
        result: a ``ReconstructionResult``.
        level: nominal coverage of the interval maps.
        calibration: None, a path to a ``save_calibration`` file or its dict: intervals become
            ``x ± c·(std + offset)`` with its conformal factor ``c`` and offset (0 unless fitted with one).
        method: interval construction without calibration (``interval_bounds``).
        cg_iters: CG iterations of the null-space map (operators without a closed form).

    Returns:
        ``null_space`` (``x − A⁺A x``, always) and, where the result has samples or a std: ``std``, ``lower``,
        ``upper``. Methods without spread (RED-diff, TV) get the null space only.
    """
    x = result.x
    maps = {"null_space": null_space_component(physics, x, cg_iters=cg_iters)}
    samples, std = result.samples, result.std
    if samples is None and std is None:
        return maps
    if samples is not None and samples.shape[0] > 1:
        _, std, _ = _moments(samples, result.weights)
    maps["std"] = std
    if calibration is not None:
        factor, offset = _calibrated_half_width(calibration, level)
        half = factor * (std + offset)
        maps["lower"], maps["upper"] = x - half, x + half
    elif samples is not None and samples.shape[0] > 1:
        lo, hi = interval_bounds(samples, result.weights, level, method)
        shift = x - _moments(samples, result.weights)[0]  # centre on result.x (the weighted mean for samplers)
        maps["lower"], maps["upper"] = lo + shift, hi + shift
    else:
        mult = interval_multiplier(level, method="gaussian")
        maps["lower"], maps["upper"] = x - mult * std, x + mult * std
    return maps


def summarise_maps(maps: dict[str, torch.Tensor], mask: torch.Tensor | None = None,
                   x: torch.Tensor | None = None) -> dict:
    """Numbers for the report: mean std, mean interval width and null-space RMS, over the image and inside
    ``mask`` (``*_body``); with ``x``, the null-space energy fraction ‖null‖²/‖x‖² too."""
    out: dict = {}
    regions = {"": None} if mask is None else {"": None, "_body": mask}
    for suffix, m in regions.items():
        if "std" in maps:
            out[f"mean_std{suffix}"] = float(_masked(maps["std"], m).double().mean())
        if "lower" in maps:
            out[f"mean_interval_width{suffix}"] = float(_masked(maps["upper"] - maps["lower"], m).double().mean())
        ns = _masked(maps["null_space"], m).double()
        out[f"null_space_rms{suffix}"] = float(ns.pow(2).mean().sqrt())
        if x is not None:
            xx = _masked(x, m).double()
            out[f"null_space_energy{suffix}"] = float(ns.pow(2).sum() / xx.pow(2).sum().clamp_min(1e-30))
    return out
