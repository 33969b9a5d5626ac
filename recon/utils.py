"""Small utilities every layer may use (it imports nothing from ``recon``): devices, JSON-safe values, seeding."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping

import torch

__all__ = ["jsonable", "resolve_device", "seeded_generator", "sha256_files"]


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 of the files' bytes, in sorted path order."""
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"`` as a ``torch.device``; ``ValueError`` naming
    the argument for anything else or for CUDA on a machine without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine (use cpu)")
    return dev


def jsonable(obj: object) -> object:
    """``obj`` with tensors, arrays and NumPy scalars as lists and numbers, mappings and sequences recursed, and
    anything else that JSON cannot hold as its ``str``."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if hasattr(obj, "tolist"):  # NumPy arrays and scalars
        return obj.tolist()
    return str(obj)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (all of a run's randomness comes from it)."""
    return torch.Generator(device=device).manual_seed(int(seed))
