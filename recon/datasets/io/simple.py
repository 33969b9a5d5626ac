"""Formats without patient geometry: NumPy (``.npy``/``.npz``), PNG and TIFF; reading, and writing PNG/NumPy.

These images get the identity geometry (1 mm voxels, voxel ``[0, 0, 0]`` at the origin). Every damaged file is
refused: a TIFF whose page chain is broken (tifffile only logs a warning and returns the pages it found) or whose
page count disagrees with its own shape metadata, a PNG whose chunk CRCs or stream are damaged (Pillow's
``verify``), a NumPy file
whose header claims more data than it holds (NumPy).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from recon.datasets.io.atomic import atomic_write
from recon.datasets.io.errors import ImageReadError, ImageWriteError, one_line
from recon.datasets.io.image import MedicalImage

__all__ = ["load_numpy_arrays", "read_numpy", "read_picture", "real_array", "write_npy", "write_png"]

PICTURE_SUFFIXES = (".png", ".tif", ".tiff")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights for RGB → grayscale


def identity_image(p: Path, array: np.ndarray, kind: str, meta: dict) -> MedicalImage:
    """A :class:`MedicalImage` on the identity grid; ImageReadError for shapes that are not 2D/3D or are empty.

    Args:
        p: the file (for messages and the source).
        array: ``(H, W)`` or ``(D, H, W)`` values.
        kind: the format's name.
        meta: facts about the file.

    Returns:
        The image.
    """
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ImageReadError(p, f"array of shape {array.shape} (expected a 2D (H, W) or 3D (D, H, W) array)")
    if min(array.shape) < 1:
        raise ImageReadError(p, f"empty array of shape {array.shape} (expected a 2D or 3D image)")
    meta = {"format": kind, "geometry": "none in the file: 1 mm voxels, voxel [0, 0, 0] at the origin", **meta}
    return MedicalImage(array, np.eye(4), source=f"{kind} file {p}", meta=meta)


def real_array(p: Path, a: np.ndarray) -> np.ndarray:
    """``a`` as float64; ImageReadError for object, structured or complex arrays.

    Args:
        p: the file it came from (for the message).
        a: the array.

    Returns:
        The float64 array.
    """
    if a.dtype == object or a.dtype.names is not None:
        raise ImageReadError(p, f"array of dtype {a.dtype} (expected a numeric array)")
    if np.iscomplexobj(a):
        raise ImageReadError(p, "complex array (expected real values: pass its magnitude, or k-space to read_fastmri)")
    return np.asarray(a, dtype=np.float64)


def load_numpy_arrays(p: Path) -> dict[str, np.ndarray]:
    """Every array of a ``.npy`` (key ``""``) or ``.npz`` file, checked and as float64.

    Args:
        p: the file.

    Returns:
        ``{key: array}`` in the file's order.
    """
    try:
        loaded = np.load(p, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return {"": real_array(p, loaded)}
        with loaded:
            return {key: real_array(p, loaded[key]) for key in loaded.keys()}
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(p, f"not a readable NumPy file ({type(err).__name__}: {one_line(err)})") from err


def read_numpy(p: Path) -> MedicalImage:
    """Read ``.npy`` (2D or 3D) or ``.npz`` (a single array, or the one named ``"image"``).

    Args:
        p: the file.

    Returns:
        The image on the identity grid.
    """
    arrays = load_numpy_arrays(p)
    if "" in arrays:
        return identity_image(p, arrays[""], "NumPy", {})
    keys = list(arrays)
    if len(keys) == 1:
        key = keys[0]
    elif "image" in keys:
        key = "image"
    else:
        raise ImageReadError(p, f"npz with arrays {keys} (expected a single array, or one named 'image')")
    return identity_image(p, arrays[key], "NumPy", {"npz_key": key})


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb[..., :3], dtype=np.float64) @ _LUMA


def _read_png(p: Path) -> MedicalImage:
    from PIL import Image, UnidentifiedImageError

    meta: dict[str, Any] = {}
    try:
        with Image.open(p) as im:
            im.verify()  # every chunk's CRC-32 (decoding alone skips the image data's CRCs)
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(im, dtype=np.float64)
            elif mode in ("1", "LA"):
                a = np.asarray(im.convert("L"), dtype=np.float64)
            else:  # RGB, RGBA, palette, ... → luminance
                a = _luminance(np.asarray(im.convert("RGB")))
                meta["converted"] = f"{mode} → luminance (BT.601)"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageReadError(p, f"not a readable PNG image ({one_line(err)})") from err
    meta["png_mode"] = mode
    return identity_image(p, a, "PNG", meta)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(one_line(record.getMessage()))


def _tiff_array(p: Path) -> tuple[np.ndarray, str]:
    import tifffile

    seen = _Warnings()
    logger = logging.getLogger("tifffile")
    logger.addHandler(seen)
    try:
        with tifffile.TiffFile(p) as tf:
            s = tf.series[0]
            a, axes, shaped = np.asarray(s.asarray()), s.axes, tf.shaped_metadata
            n_pages = len(tf.pages)
    except Exception as err:
        raise ImageReadError(p, f"not a readable TIFF image ({type(err).__name__}: {one_line(err)})") from err
    finally:
        logger.removeHandler(seen)
    if seen.messages:
        raise ImageReadError(p, f"damaged TIFF file ({seen.messages[0]}; pages may be missing)")
    if shaped and "shape" in shaped[0] and int(np.prod(shaped[0]["shape"])) != a.size:
        raise ImageReadError(p, f"TIFF holds {n_pages} page(s), {a.shape}, but its metadata says shape "
                                f"{tuple(shaped[0]['shape'])} (truncated?)")
    return a, axes


def _read_tiff(p: Path) -> MedicalImage:
    meta: dict[str, Any] = {}
    a, axes = _tiff_array(p)
    if "S" in axes:  # samples per pixel (RGB/RGBA) → luminance
        a = np.moveaxis(a, axes.index("S"), -1)
        a = a[..., 0] if a.shape[-1] < 3 else _luminance(a)
        meta["converted"] = "RGB → luminance (BT.601)"
    a = np.squeeze(a) if a.ndim > 3 else a
    meta["tiff_axes"] = axes
    return identity_image(p, real_array(p, a), "TIFF", meta)


def read_picture(p: Path) -> MedicalImage:
    """Read a PNG or TIFF (grayscale; RGB becomes luminance, BT.601; a multi-page TIFF is a stack).

    Args:
        p: the file (``.png``, ``.tif``, ``.tiff``).

    Returns:
        The image on the identity grid.
    """
    return _read_png(p) if p.suffix.lower() == ".png" else _read_tiff(p)


def write_png(array2d: np.ndarray, path: str | os.PathLike, window: tuple[float, float] | None = None,
              overwrite: bool = False) -> str:
    """Write a 2D array as an 8-bit grayscale PNG (row 0 at the top).

    Args:
        array2d: ``(H, W)`` or ``(1, H, W)`` values.
        path: the PNG file.
        window: ``(lo, hi)`` mapped linearly to 0…255 and clipped (e.g. ``(-1000, 1000)`` HU); None: the
            1st–99th percentile of the values.
        overwrite: replace an existing file.

    Returns:
        The path written.
    """
    from PIL import Image

    path = Path(os.fspath(path))
    a = np.asarray(array2d, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.size == 0:
        raise ImageWriteError(path, f"array of shape {a.shape} (expected a 2D image (H, W))")
    if not np.isfinite(a).all():
        raise ImageWriteError(path, "array contains NaN or infinite values (expected finite values)")
    if window is None:
        lo, hi = (float(v) for v in np.percentile(a, [1.0, 99.0]))
        if hi <= lo:
            lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            hi = lo + 1.0
    else:
        lo, hi = (float(v) for v in window)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ImageWriteError(path, f"window {window!r} (expected (lo, hi) with lo < hi)")
    u8 = np.round(np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    return atomic_write(path, lambda tmp: Image.fromarray(u8).save(tmp, format="PNG"), overwrite)


def write_npy(image: MedicalImage, path: Path, overwrite: bool = False) -> str:
    """Write ``image.array`` (``(D, H, W)`` float64, no geometry) as ``.npy``.

    Args:
        image: the image.
        path: the file.
        overwrite: replace an existing file.

    Returns:
        The path written.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, image.array)

    return atomic_write(path, write, overwrite)
