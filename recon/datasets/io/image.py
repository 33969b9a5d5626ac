"""The in-memory image: :class:`MedicalImage` (voxels in physical units + RAS affine in mm) and :class:`SeriesInfo`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = ["LPS_TO_RAS", "MedicalImage", "SeriesInfo"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""4×4 flip between DICOM patient coordinates (LPS+) and NIfTI world coordinates (RAS+); its own inverse."""


@dataclass(eq=False)
class MedicalImage:
    """A 2D image or 3D volume with its position in the patient.

    Attributes:
        array: float64 voxel values, shape ``(D, H, W)``: D slices, H rows, W columns (a 2D image has D = 1).
            A 2D array given to the constructor becomes ``(1, H, W)``.
        affine: 4×4 float64; ``affine @ [w, h, d, 1]`` is the world position (RAS+, mm; the NIfTI/nibabel
            convention) of the centre of voxel ``array[d, h, w]``. Column 0 ↔ W, column 1 ↔ H, column 2 ↔ D.
        modality: DICOM Modality (``"CT"``, ``"MR"``, ...) or None when unknown.
        unit: ``"HU"`` for CT values after the DICOM rescale, else None.
        source: what was read (path and kind); no patient data.
        meta: non-identifying facts about the input (format, series description, number of files, rescale,
            slice positions, resampling, ...).
        dicom_headers: for DICOM inputs, one pydicom Dataset per slice *without* pixel data, ordered like the D
            axis (reference for writing a derived series); None otherwise. They carry patient data: do not log
            them.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None
    unit: str | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)
    dicom_headers: list | None = None

    def __post_init__(self):
        array = np.asarray(self.array, dtype=np.float64)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise ValueError(f"MedicalImage.array must be (D, H, W) (or (H, W)), got shape {array.shape}")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"MedicalImage.affine must be 4×4, got shape {affine.shape}")
        self.array, self.affine = array, affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(dz, dy, dx)`` in mm: the lengths of affine columns 2, 1, 0 (slice, row, column steps)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[2]), float(norms[1]), float(norms[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    def with_array(self, array) -> MedicalImage:
        """The same geometry and metadata with new voxel values of the same ``(D, H, W)`` shape (a NumPy array
        or anything ``np.asarray`` takes, e.g. a CPU tensor). Raises ``ValueError`` for another shape."""
        new = np.asarray(array, dtype=np.float64)
        if new.shape != self.array.shape:
            raise ValueError(f"with_array: shape {new.shape} does not match the image's {self.array.shape} (D, H, W)")
        headers = list(self.dicom_headers) if self.dicom_headers is not None else None
        return replace(self, array=new, meta=copy.deepcopy(self.meta), dicom_headers=headers)

    def __repr__(self) -> str:
        dz, dy, dx = self.spacing
        return (
            f"MedicalImage(shape={self.shape}, spacing=({dz:.4g}, {dy:.4g}, {dx:.4g}) mm, "
            f"modality={self.modality!r}, unit={self.unit!r}, source={self.source!r})"
        )


@dataclass
class SeriesInfo:
    """One DICOM series found in a folder.

    Attributes:
        uid: SeriesInstanceUID ("" when the files have none).
        description: SeriesDescription ("" when absent).
        modality: Modality ("" when absent).
        n_files: number of image files in the series.
        shape: ``(D, H, W)`` expected from the headers (D = total number of frames).
        files: the files, sorted by path.
        number: SeriesNumber, or None.
    """

    uid: str
    description: str
    modality: str
    n_files: int
    shape: tuple
    files: list[str]
    number: int | None = None

    def label(self) -> str:
        """A one-line description (UID, description, number of files, shape) without patient data."""
        shape = "×".join(str(n) for n in self.shape)
        files = "1 file" if self.n_files == 1 else f"{self.n_files} files"
        return f"{self.uid or '(no SeriesInstanceUID)'} {self.description!r} ({files}, {shape})"
