"""Atomic writes: a temporary name in the target folder, then ``os.replace``; a failed write leaves nothing behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from recon.datasets.io.errors import ImageWriteError, one_line
from recon.datasets.io.image import MedicalImage

__all__ = ["atomic_write", "atomic_write_bytes", "check_image", "check_target", "make_folder", "remove_folders"]


def check_image(image: MedicalImage, path: Path) -> None:
    """Refuse (ImageWriteError naming ``path``) anything but a non-empty, finite image with an invertible affine.

    Args:
        image: what is to be written.
        path: the output (for the message).
    """
    if not isinstance(image, MedicalImage):
        raise ImageWriteError(path, f"expected a MedicalImage, got {type(image).__name__}")
    if image.array.ndim != 3 or min(image.array.shape) < 1:
        raise ImageWriteError(path, f"image of shape {image.array.shape} (expected a non-empty (D, H, W) array)")
    if not np.isfinite(image.array).all():
        raise ImageWriteError(path, "image contains NaN or infinite values (expected finite values)")
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise ImageWriteError(path, "the image's affine is degenerate or not finite (expected an invertible affine)")


def make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; ImageWriteError naming the folder when it cannot be created or
    written to.

    Args:
        folder: the folder.

    Returns:
        The folders created (deepest last), for :func:`remove_folders` after a failure.
    """
    missing = []
    f = folder
    while not f.exists() and f != f.parent:
        missing.append(f)
        f = f.parent
    if f.exists() and not f.is_dir():
        raise ImageWriteError(f, "is a file, not a folder (cannot write into it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        remove_folders([m for m in reversed(missing) if m.exists()])
        raise ImageWriteError(folder, f"cannot create the output folder ({err.strerror or err})") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        remove_folders(list(reversed(missing)))
        raise ImageWriteError(folder, "the output folder is not writable (expected write permission)")
    return list(reversed(missing))


def remove_folders(created: list[Path]) -> None:
    """Remove the (empty) folders :func:`make_folder` created, deepest first; errors are ignored.

    Args:
        created: :func:`make_folder`'s result.
    """
    for f in reversed(created):
        try:
            f.rmdir()
        except OSError:
            pass


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse a target that is a folder, or that exists when not ``overwrite``.

    Args:
        path: the output file.
        overwrite: whether an existing file may be replaced.
    """
    if path.is_dir():
        raise ImageWriteError(path, "is a folder (expected a file name)")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ImageWriteError(path, "already exists (pass overwrite=True, --overwrite on the command line, to replace)")


def atomic_write(path: Path, write: Callable[[Path], None], overwrite: bool) -> str:
    """Write ``path`` through ``write(tmp)`` on a temporary name in the same folder, then ``os.replace``.

    Args:
        path: the output file.
        write: writes the content into the temporary file it is given.
        overwrite: whether an existing file may be replaced.

    Returns:
        ``str(path)``.
    """
    path = Path(os.fspath(path))
    check_target(path, overwrite)
    created = make_folder(path.parent)
    name = path.name
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else path.suffix
    tmp = path.parent / f".{name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        write(tmp)
        if not overwrite and path.exists():
            raise ImageWriteError(path, "appeared while writing (not replaced; pass overwrite=True to replace)")
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        remove_folders(created)
        if isinstance(err, ImageWriteError):
            raise
        if isinstance(err, Exception):
            reason = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)
            raise ImageWriteError(path, f"writing failed, nothing written ({type(err).__name__}: {reason})") from err
        raise
    return str(path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write ``data`` to ``path`` atomically (temporary name in the same folder, then rename): an interrupted
    or failed write leaves nothing behind. ImageWriteError if ``path`` exists and not ``overwrite``, or on
    failure. The one atomic-write helper of ``recon`` (reports, provenance, measurement files, priors).

    Args:
        data: the bytes.
        path: the output file.
        overwrite: whether an existing file may be replaced.

    Returns:
        ``str(path)``.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(Path(os.fspath(path)), write, overwrite)
