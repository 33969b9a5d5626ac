"""The one output writer of ``recon reconstruct`` and ``recon restore``: the image, its maps, the preview, the report,
the provenance and the configuration, each written atomically next to the others.

It sits at the level of ``recon.datasets`` (it imports nothing above it), so the pipeline and restoration share it.
Nothing identifying goes into the companions: paths in the configuration are withheld from the provenance, and
next to an anonymised output the written configuration is redacted too (``recon.datasets.io.redact_config``).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recon.datasets.io import MedicalImage, atomic_write_bytes, redact_config, write_image, write_png
from recon.utils import sha256_files

__all__ = [
    "CLINICAL_WINDOWS",
    "CT_WINDOW",
    "OutputError",
    "Written",
    "check_outputs",
    "input_files",
    "metrics",
    "output_paths",
    "sha256_files",
    "software_versions",
    "write_outputs",
    "write_preview",
]

CT_WINDOW = (-1000.0, 1000.0)  # HU window of the full-range CT metrics and previews
CLINICAL_WINDOWS = {"brain": (0.0, 80.0)}  # HU windows the reports add for CT (head: the brain window)
PATH_KEYS = ("input", "output", "reference", "config", "prior", "model", "checkpoint", "calibration")
_WITHHELD = "<path withheld: see the sha256 entries>"
_SUFFIXES = (".nii.gz", ".nii", ".npy", ".png")


class OutputError(ValueError):
    """An output that cannot be written (unknown format, missing or unwritable folder, exists)."""


def input_files(path: Path) -> list[Path]:
    """A file, or every non-hidden file below a folder."""
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [path]


def output_paths(output: str | os.PathLike, fmt: str | None = None, maps: Iterable[str] = ("std",)) -> dict[str, Path]:
    """Where an output and its companions go.

    ``rec.nii.gz`` → ``rec.<map>.nii.gz`` for each map (``std``, ``lower90``, ...), ``rec.preview.png``,
    ``rec.report.json``, ``rec.provenance.json``, ``rec.config.yaml``; a DICOM output (``fmt="dicom"`` or a path
    without suffix) → the folder ``FOLDER``, one series folder ``FOLDER_<map>`` per map, and the companions next to
    the folder.
    """
    out = Path(output)
    name = out.name
    if fmt == "dicom" or not out.suffix:
        stem, ext = name, None
    else:
        ext = next((e for e in _SUFFIXES if name.endswith(e)), None)
        if ext is None:
            raise OutputError(f"{out}: unknown output format (use .nii.gz, .nii, .npy, .png, or a folder for DICOM)")
        stem = name[: -len(ext)]
    paths = {"image": out}
    for m in maps:
        paths[m] = out.with_name(f"{stem}_{m}" if ext is None else f"{stem}.{m}{ext}")
    paths.update({k: out.with_name(f"{stem}.{k}.{e}") for k, e in
                  (("preview", "png"), ("report", "json"), ("provenance", "json"), ("config", "yaml"))})
    return paths


def check_outputs(paths: dict[str, Path], overwrite: bool) -> None:
    """The output folder exists and is writable, and (unless ``overwrite``) no output exists yet."""
    parent = paths["image"].parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: output folder is not writable")
    if not overwrite:
        for p in paths.values():
            if p.exists():
                raise OutputError(f"{p}: exists (use --overwrite to replace it)")


def _psnr_ssim(rec: np.ndarray, ref: np.ndarray, rng: float) -> dict:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = float(peak_signal_noise_ratio(ref, rec, data_range=rng))
    win = min(7, *(s if s % 2 else s - 1 for s in ref.shape[1:]))
    ssim = float(np.mean([structural_similarity(r, x, data_range=rng, win_size=max(win, 3))
                          for r, x in zip(ref, rec, strict=True)]))
    return {"psnr": psnr, "ssim": ssim}


def metrics(rec: np.ndarray, ref: np.ndarray, is_ct: bool) -> dict:
    """PSNR (dB) and SSIM of ``rec`` against ``ref`` (``(D, H, W)``, physical units), with the window they used.

    CT: on the [-1000, 1000] HU window (``window``), plus each clinical window of ``CLINICAL_WINDOWS``
    (``brain``: [0, 80] HU) as ``{"brain": {"psnr", "ssim", "window"}}``; otherwise the reference's own range.
    SSIM is the mean over slices (skimage's 7×7 window).
    """
    if rec.shape != ref.shape:
        raise OutputError(f"the reference has shape {ref.shape}, the reconstruction {rec.shape}")
    if not is_ct:
        rng = float(ref.max() - ref.min()) or 1.0
        return {**_psnr_ssim(rec, ref, rng), "window": [float(ref.min()), float(ref.max())]}
    out = {}
    for name, (lo, hi) in {"full": CT_WINDOW, **CLINICAL_WINDOWS}.items():
        m = {**_psnr_ssim(np.clip(rec, lo, hi), np.clip(ref, lo, hi), hi - lo), "window": [lo, hi]}
        out.update(m) if name == "full" else out.__setitem__(name, m)
    return out


def write_preview(panels: list[tuple[str, np.ndarray]], is_ct: bool, path: Path, overwrite: bool) -> str:
    """Middle slices side by side on one window (the error panel on its own, [0, window width / 4]; a panel whose
    name ends in ``std`` or ``null space`` on [0, window width / 4] too)."""
    mids = [(name, a[a.shape[0] // 2]) for name, a in panels]
    if is_ct:
        lo, hi = CT_WINDOW
    else:
        base = mids[0][1]
        lo, hi = float(np.percentile(base, 1)), float(np.percentile(base, 99.5))
        hi = hi if hi > lo else lo + 1.0
    tiles = []
    for name, m in mids:
        if name == "error" or name.endswith(("std", "null space")):
            t = np.clip(np.abs(m) / ((hi - lo) / 4), 0, 1)
        else:
            t = np.clip((m - lo) / (hi - lo), 0, 1)
        tiles.append(np.pad(t, 2, constant_values=1.0))
    return write_png(np.concatenate(tiles, axis=1), path, window=(0.0, 1.0), overwrite=overwrite)


def software_versions() -> dict:
    """Versions of recon, Python and the libraries that decide the numbers."""
    import deepinv
    import nibabel
    import pydicom
    import torch

    from recon import __version__

    return {"recon": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "deepinv": deepinv.__version__, "numpy": np.__version__, "pydicom": pydicom.__version__,
            "nibabel": nibabel.__version__}


@dataclass
class Written:
    """What one run writes: the image, its maps (``std``, interval bounds, null space ...), the preview panels,
    the report and provenance (completed here with the output paths and the redacted configuration)."""

    image: MedicalImage
    description: str
    report: dict
    provenance: dict
    panels: list = field(default_factory=list)
    maps: dict = field(default_factory=dict)
    headers_from: MedicalImage | None = None
    is_ct: bool = False


def _written(paths_list: list[str], target: Path) -> str:
    """A DICOM series is reported by its folder."""
    return str(target) if len(paths_list) != 1 else paths_list[0]


def _series_number(headers_from: MedicalImage | None, fmt: str | None, k: int) -> int | None:
    """Series number of the ``k``-th map series (after the image's own): the reference's number + 1001 + k."""
    ref = headers_from.dicom_headers[0].get("SeriesNumber") if headers_from and headers_from.dicom_headers else None
    if ref is not None:
        return int(ref) + 1001 + k
    return 2 + k if fmt == "dicom" else None


def _write_images(w: Written, paths: dict, fmt: str | None, anonymize: bool, overwrite: bool) -> dict:
    kw = {"format": fmt, "reference": w.headers_from, "anonymize": anonymize, "overwrite": overwrite}
    outputs = {"image": _written(write_image(w.image, paths["image"], description=w.description, **kw),
                                 paths["image"])}
    for k, (name, array) in enumerate(w.maps.items()):
        img = w.image.with_array(array)
        outputs[name] = _written(write_image(img, paths[name], description=f"{w.description} {name}",
                                             series_number=_series_number(w.headers_from, fmt, k), **kw), paths[name])
    return outputs


def write_outputs(w: Written, paths: dict[str, Path], *, fmt: str | None, config: dict | None,
                  anonymize: bool = False, overwrite: bool = False) -> dict:
    """Write the image and its maps, the preview, the provenance, the configuration and the report (last); returns
    the report with its ``outputs``. ``config`` goes to ``*.config.yaml`` (redacted next to an anonymised output)
    and, paths withheld, to the provenance."""
    outputs = _write_images(w, paths, fmt, anonymize, overwrite)
    outputs["preview"] = write_preview(w.panels, w.is_ct, paths["preview"], overwrite)
    report = w.report
    report["outputs"] = {**outputs, "report": str(paths["report"]), "provenance": str(paths["provenance"])}
    if any(not math.isfinite(v) for v in (report.get("psnr", 0.0), report.get("data_residual", 0.0))):
        report["warning"] = "non-finite metrics"
    configuration = {k: (_WITHHELD if k in PATH_KEYS and v is not None else v) for k, v in (config or {}).items()}
    if anonymize:
        configuration = redact_config(configuration)
    provenance = {"versions": software_versions(), "configuration": configuration, **w.provenance}
    atomic_write_bytes(json.dumps(provenance, indent=1, default=str).encode(), paths["provenance"], overwrite)
    if config is not None:
        import yaml

        written = redact_config(config) if anonymize else config
        report["outputs"]["config"] = atomic_write_bytes(yaml.safe_dump(written, sort_keys=False).encode(),
                                                         paths["config"], overwrite)
    atomic_write_bytes(json.dumps(report, indent=1, default=str).encode(), paths["report"], overwrite)
    return report
