"""The data recipe of the built-in priors: offline sources → deduplicated NIfTI files + ``manifest.json``.

``python -m recon.priors.recipe --out DIR [--modality ct|mri]`` (or :func:`prepare_prior_data`) gathers the real
CT or MR images that ship inside packages (nothing is downloaded; the Debian packages are fetched beforehand with
``apt-get download NAME`` and unpacked with ``dpkg -x NAME_*.deb ROOT``, no system install), and writes

- ``DIR/train/*.nii.gz``: the training images (the trainer's ``--data DIR/train``; presets take ``DIR``),
- ``DIR/held-out/*.nii.gz``: images kept for evaluation and never trained on (every ``693_*`` file, ``MR_small.dcm``
  and its study, nibabel's ``anatomical.nii`` and the files derived from it, ``CT_small.dcm``, pydicom's
  ``emri_small`` study, matplotlib's ``s1045`` slice, and a 24-slice slab of the InVesalius head CT for the volume
  benchmark),
- ``DIR/manifest.json``: every file's source, licence, role (``train`` / ``held-out``), shape, spacing and checksum,
  and every candidate that was dropped (duplicate, derived map, lossy copy, ...) with the reason.

Sources (each optional; a missing one is reported in one line and skipped, or is an error with ``strict``):

- ``invesalius`` (CT): Debian ``invesalius-examples``, ``Cranium.inv3`` (a tar.gz whose ``main.plist`` gives the
  shape, dtype and spacing of the raw ``matrix.dat``): one head CT, GPL-2.
- ``pydicom`` (CT, MR): pydicom's test files and the ``pydicom-data`` package (MIT packages; public test images).
- ``mricron`` (MR): Debian ``mricron-data``, ``ch2.nii.gz`` (Colin27 T1).
- ``nilearn`` (MR): the MNI152 2009a T1 template inside nilearn.
- ``nibabel`` (MR): nibabel's test data (``anatomical.nii`` held out; ``example4d.nii.gz`` EPI).
- ``dipy`` (MR): ``dipy/data/files`` (``t1_coronal_slice.npy``, ``S0_10slices.nii.gz``, ``aniso_vox.nii.gz``).
- ``matplotlib`` (MR): ``mpl-data/sample_data/s1045.ima.gz``, a raw 256² sagittal T1 head slice (held out: the MRI
  tuning slice; its pixel spacing is not recorded, 1 mm is assumed).

Deduplication: one image in several encodings counts once (SHA-256 of the decoded pixel array rounded to two
decimals; held-out files are taken first, so a re-encoded copy of a held-out image is dropped, never trained on),
and an exact crop of another image of the same DICOM study is dropped too. Held-out status spreads to every file of
the same DICOM study. Derived maps (perfusion, diffusion maps, subtractions) and lossy-compressed copies are
dropped. ``--skip invesalius`` leaves the GPL-2 volume out (for weights free of GPL training data).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import plistlib
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recon.datasets import MedicalImage, read_image, write_nifti

__all__ = [
    "DEBIAN_PACKAGES",
    "DEFAULT_ROOTS",
    "HELD_OUT_NAMES",
    "LICENCES",
    "Candidate",
    "RecipeError",
    "add_arguments",
    "default_roots",
    "fetch_debian_sources",
    "find_candidates",
    "is_crop",
    "main",
    "pixel_hash",
    "prepare_prior_data",
    "read_inv3",
    "read_s1045",
    "run",
]

DEFAULT_ROOTS = {"debian": "debian-root"}  # relative to the working folder; RECON_DEBIAN_ROOT overrides

# Files never trained on (matched on the file name; spreads to duplicates and to the same DICOM study).
HELD_OUT_NAMES = {
    "ct": ("693_", "CT_small.dcm"),
    "mri": ("MR_small", "MR2_", "anatomical.nii", "functional.nii", "reoriented_anat_moved.nii",
            "resampled_anat_moved.nii", "emri_small", "s1045"),
}
HELD_OUT_REASONS = {
    "693_": "the benchmark's head CT (all four encodings)",
    "CT_small.dcm": "second held-out CT (chosen: another patient, 128²)",
    "MR_small": "the benchmark's MR slice (all encodings)",
    "MR2_": "same DICOM study as MR_small",
    "anatomical.nii": "the benchmark's MR volume",
    "functional.nii": "same subject as anatomical.nii",
    "reoriented_anat_moved.nii": "derived from anatomical.nii",
    "resampled_anat_moved.nii": "derived from anatomical.nii",
    "emri_small": "second held-out MR (chosen: 10-frame T1, all encodings)",
    "s1045": "MRI tuning slice (chosen: a real 256² T1 slice, not interpolated, that no benchmark reports)",
}

LICENCES = {
    "invesalius": "GPL-2 (Debian invesalius-examples, copyright Centro de Tecnologia da Informação Renato Archer)",
    "pydicom": "MIT (pydicom test files / pydicom-data; public, de-identified test images)",
    "mricron": "BSD-style (Debian mricron-data; Colin27 template, Holmes et al. 1998, redistributable)",
    "nilearn": "MNI152 ICBM 2009a: copyright McConnell Brain Imaging Centre, use/copy/modify/distribute permitted "
               "with the notice (shipped in nilearn, BSD-3-Clause)",
    "nibabel": "MIT (nibabel test data)",
    "dipy": "BSD-3-Clause (dipy data files)",
    "matplotlib": "matplotlib licence (PSF-based; matplotlib's sample data)",
}

CT_DICOM = ("693_UNCR.dcm", "693_UNCI.dcm", "693_J2KR.dcm", "693_J2KI.dcm", "CT_small.dcm",
            "J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm", "bad_sequence.dcm", "eCT_Supplemental.dcm")
MR_DICOM = ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
            "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_padded.dcm", "MR2_UNCR.dcm", "MR2_UNCI.dcm", "MR2_J2KR.dcm", "MR2_J2KI.dcm",
            "emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_ls_lossless.dcm",
            "MR-SIEMENS-DICOM-WithOverlays.dcm", "examples_overlay.dcm")
DERIVED_TYPES = {"PERFUSION", "RCBF", "RCBV", "MTT", "TTP", "ADC", "FA", "TRACEW", "SUBTRACTION", "MAP"}
INV3 = "usr/share/doc/invesalius-examples/examples/Cranium.inv3"
SLAB = (46, 70)  # held-out InVesalius slices [46, 70): 24 contiguous axial slices through the brain
GUARD = 4  # slices on each side of the slab used neither for training nor evaluation (they would leak)


class RecipeError(RuntimeError):
    """A source is missing or unreadable; the message is one line naming it."""


@dataclass
class Candidate:
    """One input image of a source, before roles and deduplication."""

    name: str  # output file stem
    origin: str  # file name inside its source (no machine path)
    source: str
    load: Callable[[], MedicalImage]
    study: str | None = None
    drop: str | None = None  # reason to drop before reading (derived map, lossy copy)
    role: str = "train"
    note: str = ""
    extra: dict = field(default_factory=dict)


def default_roots() -> dict[str, str | None]:
    """Where each source lives on this machine (None: not installed)."""
    roots: dict[str, str | None] = {"debian": os.environ.get("RECON_DEBIAN_ROOT", DEFAULT_ROOTS["debian"])}
    roots["pydicom"] = _pydicom_dirs()
    for name, sub in (("nilearn", "datasets/data"), ("nibabel", "tests/data"), ("dipy", "data/files"),
                      ("matplotlib", "mpl-data/sample_data")):
        try:
            module = __import__(name)
            roots[name] = str(Path(module.__file__).parent / sub)
        except ImportError:
            roots[name] = None
    return roots


def _pydicom_dirs() -> str | None:
    dirs = []
    try:
        import pydicom.data

        dirs.append(str(Path(pydicom.data.__file__).parent / "test_files"))
    except ImportError:
        return None
    try:
        import data_store  # the pydicom-data package installs as ``data_store``

        dirs.append(str(Path(data_store.__file__).parent / "data"))
    except ImportError:
        pass
    return os.pathsep.join(dirs)


def read_inv3(path: str | os.PathLike) -> MedicalImage:
    """Read an InVesalius project (``.inv3``: tar.gz of ``main.plist`` + raw ``matrix.dat``) as a CT volume in HU.

    Shape, dtype and spacing come from ``main.plist``; the affine maps column → −x (towards patient left, as DICOM),
    row → +y (InVesalius stores rows bottom-up, posterior first: the head rest is in row 0) and slice → +z
    (slice 0 is the skull base) in RAS, with the grid centre at the origin.
    """
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        if "main.plist" not in members:
            raise RecipeError(f"{path}: not an InVesalius project (no main.plist)")
        plist = plistlib.load(io.BytesIO(tar.extractfile(members["main.plist"]).read()))
        matrix = plist["matrix"]
        raw = tar.extractfile(members[matrix["filename"]]).read()
    shape = tuple(int(n) for n in matrix["shape"])
    array = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<"))
    if array.size != int(np.prod(shape)):
        raise RecipeError(f"{path}: matrix.dat holds {array.size} values, main.plist says {shape}")
    dx, dy, dz = (float(s) for s in plist["spacing"])
    affine = np.diag([-dx, dy, dz, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape[::-1]) - 1) / 2)  # grid centre at the origin
    return MedicalImage(array.reshape(shape).astype(np.float64), affine, modality=plist.get("modality", "CT"),
                        unit="HU", source="InVesalius project",
                        meta={"format": "inv3", "spacing_xyz": [dx, dy, dz], "dtype": matrix["dtype"]})


def _inv3_candidates(root: str) -> list[Candidate]:
    path = Path(root) / INV3
    if not path.is_file():
        raise RecipeError(f"{path}: missing (apt-get download invesalius-examples && dpkg -x *.deb {root})")
    a, b = SLAB
    parts = [("invesalius_cranium_inferior", 0, a - GUARD, "train", ""),
             ("invesalius_cranium_slab", a, b, "held-out", f"slices {a}-{b - 1} of 108 (volume benchmark)"),
             ("invesalius_cranium_superior", b + GUARD, None, "train", "")]
    out = []
    for name, lo, hi, role, note in parts:
        out.append(Candidate(name, f"Cranium.inv3[{lo}:{hi if hi is not None else ''}]", "invesalius",
                             _slab_loader(path, lo, hi), study="invesalius-cranium", role=role, note=note,
                             extra={"whole_volume_hash_group": "Cranium.inv3"}))
    return out


def _slab_loader(path: Path, lo: int, hi: int | None) -> Callable[[], MedicalImage]:
    def load() -> MedicalImage:
        vol = read_inv3(path)
        stop = vol.shape[0] if hi is None else hi
        affine = vol.affine.copy()
        affine[:3, 3] += affine[:3, 2] * lo  # the slab's first slice keeps its world position
        return MedicalImage(vol.array[lo:stop], affine, modality="CT", unit="HU", source=vol.source,
                            meta={**vol.meta, "slices": [lo, stop]})

    return load


def _dicom_candidates(root: str, names: Sequence[str]) -> list[Candidate]:
    import pydicom

    dirs = [Path(d) for d in root.split(os.pathsep) if d]
    found = {}
    for d in dirs:
        for n in names:
            if n not in found and (d / n).is_file():
                found[n] = d / n
    if not found:
        raise RecipeError(f"{root}: none of pydicom's test images found (pip install pydicom pydicom-data)")
    out = []
    for n, p in sorted(found.items()):
        ds = pydicom.dcmread(str(p), stop_before_pixels=True, force=True)
        image_type = {str(v).strip().upper() for v in (ds.get("ImageType") or [])}
        drop = None
        if image_type & DERIVED_TYPES:
            drop = f"derived map (ImageType {'/'.join(sorted(image_type & DERIVED_TYPES))}), not an anatomical image"
        elif str(ds.get("LossyImageCompression", "00")) == "01" or n.endswith(("J2KI.dcm",)):
            drop = "lossy-compressed copy"
        out.append(Candidate(Path(n).stem, n, "pydicom", _reader(p), study=str(ds.get("StudyInstanceUID", "")) or None,
                             drop=drop))
    return out


def _reader(path: Path) -> Callable[[], MedicalImage]:
    return lambda: _read(path)


def _read(path: Path) -> MedicalImage:
    """``read_image``, except for 4D NIfTI (fMRI/diffusion series, which it refuses): their first volume."""
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(path))
        if len(img.shape) == 4 and img.shape[3] > 1:
            first = np.asarray(img.dataobj[..., 0], dtype=np.float64)
            return MedicalImage(first.transpose(2, 1, 0), img.affine, modality="MR", source="4D NIfTI, volume 0",
                                meta={"format": "nifti", "volumes": int(img.shape[3])})
    return read_image(path)


def _file_candidates(source: str, root: str, names: Sequence[str], hint: str) -> list[Candidate]:
    base = Path(root)
    found = [n for n in names if (base / n).is_file()]
    if not found:
        raise RecipeError(f"{base}: none of {', '.join(names)} found ({hint})")
    return [Candidate(f"{source}_{n.split('.')[0]}", n, source, _reader(base / n), study=f"{source}:{n}")
            for n in found]


def _mni_candidates(root: str) -> list[Candidate]:
    return _file_candidates("nilearn", root, ["mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"],
                            "pip install nilearn")


S1045_SHAPE = (256, 256)  # matplotlib's s1045.ima.gz: raw little-endian uint16, no header


def read_s1045(path: str | os.PathLike) -> MedicalImage:
    """matplotlib's ``s1045.ima.gz`` (a gzipped raw 256² uint16 sagittal T1 slice, no header) as an MR image with
    1 mm pixels (its spacing is not recorded); a file of another size raises ``RecipeError`` naming it."""
    import gzip

    raw = gzip.decompress(Path(path).read_bytes())
    if len(raw) != 2 * S1045_SHAPE[0] * S1045_SHAPE[1]:
        raise RecipeError(f"{path}: {len(raw)} bytes, expected a raw {S1045_SHAPE} uint16 image")
    array = np.frombuffer(raw, dtype="<u2").reshape(S1045_SHAPE).astype(np.float64)
    return MedicalImage(array[None], np.eye(4), modality="MR", source="raw uint16 slice",
                        meta={"format": "raw", "spacing": "unknown; 1 mm assumed"})


def _s1045_candidates(root: str) -> list[Candidate]:
    path = Path(root) / "s1045.ima.gz"
    if not path.is_file():
        raise RecipeError(f"{path}: missing (pip install matplotlib)")
    return [Candidate("matplotlib_s1045", path.name, "matplotlib", functools.partial(read_s1045, path),
                      study="matplotlib:s1045.ima.gz")]


SOURCES: dict[str, list[tuple[str, Callable[[str], list[Candidate]]]]] = {
    "ct": [("invesalius", lambda r: _inv3_candidates(r)),
           ("pydicom", lambda r: [c for c in _dicom_candidates(r, CT_DICOM)])],
    "mri": [("pydicom", lambda r: _dicom_candidates(r, MR_DICOM)),
            ("mricron", lambda r: _file_candidates("mricron", str(Path(r) / "usr/share/mricron/templates"),
                                                   ["ch2.nii.gz"], "apt-get download mricron-data; dpkg -x")),
            ("nilearn", _mni_candidates),
            ("nibabel", lambda r: _file_candidates("nibabel", r, ["anatomical.nii", "functional.nii",
                                                                  "reoriented_anat_moved.nii",
                                                                  "resampled_anat_moved.nii", "example4d.nii.gz"],
                                                   "pip install nibabel")),
            ("dipy", lambda r: _file_candidates("dipy", r, ["t1_coronal_slice.npy", "S0_10slices.nii.gz",
                                                            "aniso_vox.nii.gz"], "pip install dipy")),
            ("matplotlib", _s1045_candidates)],
}
ROOT_OF = {"invesalius": "debian", "mricron": "debian"}


def find_candidates(modality: str, roots: dict[str, str | None], strict: bool = False,
                    report: Callable[[str], None] = print,
                    skip: Sequence[str] = ()) -> tuple[list[Candidate], list[str]]:
    """Every candidate image of ``modality``'s sources (less those named in ``skip``), and the one-line reasons of
    missing sources.

    Raises:
        RecipeError: a source is missing and ``strict``, or no source at all is available.
    """
    if modality not in SOURCES:
        raise RecipeError(f"modality must be 'ct' or 'mri', got {modality!r}")
    out: list[Candidate] = []
    missing: list[str] = []
    for source, find in SOURCES[modality]:
        if source in skip:
            continue
        root = roots.get(ROOT_OF.get(source, source))
        try:
            if not root:
                raise RecipeError(f"source {source!r}: not installed")
            out += find(root)
        except RecipeError as err:
            if strict:
                raise
            missing.append(str(err))
            report(f"skipping source {source}: {err}")
    if not out:
        raise RecipeError(f"no {modality} source found: {'; '.join(missing)}")
    return out, missing


def pixel_hash(array: np.ndarray) -> str:
    """SHA-256 of the decoded pixel array rounded to two decimals (shape included): the same image in another
    encoding (implicit/explicit VR, big endian, RLE, lossless JPEG) hashes the same."""
    a = np.ascontiguousarray(np.round(np.asarray(array, dtype=np.float64), 2)) + 0.0  # -0.0 → 0.0
    h = hashlib.sha256(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _held_out_reason(c: Candidate, modality: str) -> str | None:
    for prefix in HELD_OUT_NAMES[modality]:
        if c.origin.startswith(prefix):
            return HELD_OUT_REASONS[prefix]
    return None


def _assign_roles(cands: list[Candidate], modality: str) -> None:
    """Held out by name, then by study (every file of a held-out DICOM study)."""
    for c in cands:
        reason = _held_out_reason(c, modality)
        if reason:
            c.role, c.note = "held-out", reason
    held_studies = {c.study for c in cands if c.role == "held-out" and c.study and c.source == "pydicom"}
    for c in cands:
        if c.role == "train" and c.study in held_studies:
            c.role, c.note = "held-out", "same DICOM study as a held-out file"


def _usable(image: MedicalImage, modality: str) -> str | None:
    if modality == "ct" and image.unit != "HU" and image.modality not in (None, "CT"):
        return f"not CT ({image.modality})"
    if not np.isfinite(image.array).all():
        return "non-finite values"
    if float(np.ptp(image.array)) == 0:
        return "constant image"
    return None


def prepare_prior_data(out_dir: str | os.PathLike, modality: str = "ct", roots: dict[str, str | None] | None = None,
                       strict: bool = False, report: Callable[[str], None] = print, skip: Sequence[str] = ()) -> dict:
    """Gather, deduplicate and write ``modality``'s training and held-out images with ``manifest.json``.

    Args:
        out_dir: output folder (``train/``, ``held-out/``, ``manifest.json``); existing recipe files are replaced.
        modality: ``"ct"`` or ``"mri"``.
        roots: source name → folder (``debian``: the ``dpkg -x`` root; ``pydicom``: folders joined with
            ``os.pathsep``; ``nilearn``/``nibabel``/``dipy``: their data folders); default :func:`default_roots`.
        strict: a missing source is an error instead of a reported skip.
        report: receives one line per skipped source.
        skip: source names to leave out (e.g. ``("invesalius",)`` for weights free of GPL-2 training data).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        RecipeError: a missing source with ``strict``, no source at all, or an unreadable file (one line).
    """
    roots = default_roots() if roots is None else roots
    cands, missing = find_candidates(modality, roots, strict, report, skip)
    _assign_roles(cands, modality)
    out = Path(out_dir)
    for sub in ("train", "held-out"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob("*.nii.gz"):
            old.unlink()
    order = sorted(cands, key=lambda c: (c.role != "held-out", c.drop is not None, c.source, _encoded(c.origin),
                                         c.origin))
    seen: dict[str, str] = {}
    kept: list[tuple[str | None, str, np.ndarray]] = []
    files, dropped = [], []
    for c in order:
        entry = {"origin": c.origin, "source": c.source, "licence": LICENCES[c.source]}
        if c.drop:
            dropped.append({**entry, "reason": c.drop})
            continue
        try:
            image = _load(c)
        except RecipeError as err:
            dropped.append({**entry, "reason": f"unreadable: {err}"})
            report(f"dropping {err}")
            continue
        reason = _usable(image, modality)
        digest = pixel_hash(image.array)
        if not reason and digest in seen:
            reason = f"duplicate of {seen[digest]} (same decoded pixels)"
        reason = reason or _crop_of(image.array, c.study, kept)
        if reason:
            dropped.append({**entry, "reason": reason})
            continue
        seen[digest] = c.origin
        kept.append((c.study, c.origin, image.array))
        rel = f"{c.role}/{c.name}.nii.gz"
        write_nifti(_as_float32(image), out / rel, overwrite=True)
        files.append({"file": rel, **entry, "role": c.role, "note": c.note, "shape_dhw": list(image.shape),
                      "spacing_dhw_mm": [round(s, 4) for s in image.spacing], "pixel_sha256": digest})
    manifest = {"modality": modality, "recipe": f"python -m recon.priors.recipe --out DIR --modality {modality}",
                "files": files, "dropped": dropped, "missing_sources": missing, "skipped_sources": list(skip),
                "held_out": [f["file"] for f in files if f["role"] == "held-out"]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def is_crop(small: np.ndarray, big: np.ndarray) -> bool:
    """Whether ``small`` (D, H, W) equals a sub-array of ``big`` (same D, e.g. a cropped copy of a slice)."""
    if small.shape == big.shape or small.shape[0] != big.shape[0] or any(
            s > b for s, b in zip(small.shape, big.shape, strict=True)):
        return False
    h, w = small.shape[1:]
    pi, pj = np.unravel_index(int(np.argmax(small[0])), (h, w))  # anchor on the brightest (rarest) pixel
    for bi, bj in np.argwhere(big[0] == small[0, pi, pj])[:10_000]:
        i, j = bi - pi, bj - pj
        if 0 <= i <= big.shape[1] - h and 0 <= j <= big.shape[2] - w and np.array_equal(
                big[:, i:i + h, j:j + w], small):
            return True
    return False


def _crop_of(array: np.ndarray, study: str | None, kept: list[tuple[str | None, str, np.ndarray]]) -> str | None:
    for other_study, origin, other in kept:
        if study and other_study == study and (is_crop(array, other) or is_crop(other, array)):
            return f"crop of (or containing) {origin}, same study: the same pixels"
    return None


def _encoded(origin: str) -> bool:
    """Whether a file name marks a re-encoded copy (kept second when deduplicating: the plain file wins)."""
    return any(tag in origin.lower() for tag in ("j2k", "rle", "jpeg", "jp2k", "big", "expb", "implicit", "padded"))


def _load(c: Candidate) -> MedicalImage:
    try:
        return c.load()
    except RecipeError:
        raise
    except Exception as err:  # any reader failure becomes a one-line recipe error
        first = str(err).splitlines()[0] if str(err) else repr(err)
        raise RecipeError(f"{c.source}:{c.origin}: unreadable ({first})") from err


def _as_float32(image: MedicalImage) -> MedicalImage:
    return MedicalImage(image.array.astype(np.float32), image.affine, modality=image.modality, unit=image.unit,
                        source=image.source, meta={})


DEBIAN_PACKAGES = {"ct": ("invesalius-examples",), "mri": ("mricron-data",)}


def fetch_debian_sources(root: str | os.PathLike, modality: str) -> list[str]:
    """``apt-get download`` the modality's Debian packages into a temporary folder and unpack them under ``root``
    with ``dpkg -x`` (no system install, no root needed beyond apt's package lists); returns the packages.

    Raises:
        RecipeError: apt-get or dpkg missing or failing (one line naming the package).
    """
    import subprocess
    import tempfile

    Path(root).mkdir(parents=True, exist_ok=True)
    packages = DEBIAN_PACKAGES[modality]
    with tempfile.TemporaryDirectory() as tmp:
        for name in packages:
            for command in (["apt-get", "download", name], None):
                if command is None:
                    debs = sorted(Path(tmp).glob(f"{name}_*.deb"))
                    if not debs:
                        raise RecipeError(f"{name}: apt-get download wrote no .deb")
                    command = ["dpkg", "-x", str(debs[-1]), str(root)]
                try:
                    subprocess.run(command, cwd=tmp, check=True, capture_output=True, text=True)
                except (OSError, subprocess.CalledProcessError) as err:
                    detail = getattr(err, "stderr", "") or str(err)
                    raise RecipeError(f"{name}: `{' '.join(command)}` failed ({detail.strip().splitlines()[-1:]})"
                                      ) from err
    return list(packages)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's options (``python -m recon.priors.recipe`` and ``recon prepare-prior-data``)."""
    parser.add_argument("-o", "--out", required=True, help="output folder (train/, held-out/, manifest.json)")
    parser.add_argument("--modality", choices=["ct", "mri"], default="ct")
    parser.add_argument("--debian-root", help="the dpkg -x root of the Debian packages (default ./debian-root)")
    parser.add_argument("--strict", action="store_true", help="a missing source is an error")
    parser.add_argument("--fetch", action="store_true",
                        help="first apt-get download + dpkg -x the Debian packages into --debian-root")
    parser.add_argument("--skip", nargs="*", default=[], metavar="SOURCE",
                        help="sources to leave out, e.g. invesalius (GPL-2) for weights free of GPL training data")


def run(args: argparse.Namespace) -> int:
    """Run the recipe for parsed ``args``; exit status 2 on a recipe error (one line on stderr)."""
    roots = default_roots()
    if args.debian_root:
        roots["debian"] = args.debian_root
    try:
        if args.fetch:
            fetch_debian_sources(roots["debian"], args.modality)
        m = prepare_prior_data(args.out, args.modality, roots, args.strict,
                               report=lambda line: print(line, file=sys.stderr), skip=args.skip)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_train = sum(f["role"] == "train" for f in m["files"])
    print(f"{args.out}: {n_train} training and {len(m['held_out'])} held-out files, {len(m['dropped'])} dropped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recon.priors.recipe --out DIR [--modality ct|mri] [--fetch] [--strict]`` (= ``recon
    prepare-prior-data``)."""
    parser = argparse.ArgumentParser(prog="python -m recon.priors.recipe", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
