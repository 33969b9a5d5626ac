r"""``recon batch``: many studies, each reconstructed exactly as ``recon reconstruct`` would, one subfolder each.

Studies (``discover_studies``), sorted by name:

- A folder: every NIfTI file (``.nii``, ``.nii.gz``) is a study, and every folder holding DICOM files (named
  ``*.dcm``, ``*.dicom``, ``*.ima``, or with the ``DICM`` preamble; ``DICOMDIR`` does not count) is one study
  together with everything below it, as ``recon reconstruct -i FOLDER`` reads it. A folder holding several series
  is one study that fails with the reader's message naming ``--series`` unless a series is chosen (``series``, or
  a manifest's ``series`` column): discovery reads no DICOM header, so it stays cheap for 10,000 studies. Hidden
  files and folders, and OUTDIR when it lies inside the input folder, are skipped. A study's name is its path
  relative to the input folder, ``/`` written ``__``, characters other than ``A-Za-z0-9._-`` written ``_``, the
  NIfTI suffix dropped; names that collide (``a.nii`` and ``a.nii.gz``, case-insensitively) get ``-`` and 8 hex
  digits of the SHA-256 of their relative path.
- A ``.csv`` manifest: a header with ``input`` and ``output`` and optional per-study options (``MANIFEST_COLUMNS``:
  ``method``, ``prior``, ``steps``, ``seed``, ``task``, the task parameters such as ``views``, ``options.NAME`` for
  the sampler, ...); one row per study. Paths (``input``, ``reference``, a prior folder) are relative to the
  manifest's folder; ``output`` is the study's name (its subfolder of OUTDIR), unique and made of
  ``A-Za-z0-9._-``. An empty cell keeps the command's value; a value is read as YAML (``10`` an integer, ``1e5`` a
  number). An unknown column is a one-line error naming it.

Sharding (``shard``): study ``s`` belongs to part ``int(sha256(s.name)[:16], 16) % num_parts``. Parts are disjoint
and together cover every study exactly once, and a study's part depends on its name only, so independent jobs (a
Slurm array: ``--num-parts N --part-id $SLURM_ARRAY_TASK_ID`` with ``--array=0-(N-1)``) agree without talking to
each other even if they list the input at slightly different times. Part ids run from 0 to N - 1.

Outputs, per study ``OUTDIR/<study>/``: ``rec.nii.gz`` (``rec/``, a DICOM series, with ``format="dicom"``) and
``recon reconstruct``'s companions (``rec.std.nii.gz``, ``rec.preview.png``, ``rec.report.json``,
``rec.provenance.json``, ``rec.config.yaml``), ``log.txt`` (the study's log: settings, warnings, recon's log
messages, the outcome, a traceback on failure) and, written last and atomically, ``done.json`` (the report,
every output with its size and SHA-256, the configuration fingerprint). Per run: ``OUTDIR/batch-results.csv`` and
``batch-results.json`` (``batch-results.part-K-of-N.*`` for a part), written atomically: study, status
(``done``, ``skipped``, ``failed``), attempts, seconds (the study's wall time in its worker; for a skipped
study, that of the run that made it), ``reconstruct_seconds`` (the sampler's), metrics (``psnr``, ``ssim``,
``data_residual``, ``nfe``), error, input and output paths; the JSON adds the counts and per-worker stats.

Resume: a study is done when its ``done.json`` is readable, was written for the same configuration (input path,
method, prior, steps, seed, task and its parameters, options, format; not the device nor the engine) and every
output it lists exists with the recorded size; such a study is ``skipped``. Any other study is (re)done, after
what an earlier, interrupted attempt left in its subfolder (``rec*``, ``done.json``, temporary files) is removed:
outputs are renamed into place when complete and the marker comes last, so nothing half-written is taken as done.
A study done with a different configuration is ``failed`` ("use --overwrite"); ``overwrite=True`` redoes every
study.

Failures and retries: an exception in a study is recorded with its one-line reason (``Type: first line``) and the
other studies go on; the run's exit status (``BatchSummary.exit_code``) is 1 if any study failed. Errors that
would recur on a retry are not retried: user errors (unreadable or corrupt input, bad geometry or options; the
``ValueError`` family: ``PipelineError``, ``ImageReadError``, ``TaskError``) and ``SamplerDivergence`` (the same
seed diverges again). Any other error (``RuntimeError`` such as out of memory, ``OSError``, a crashed worker
process, a lost Ray actor) is retried up to ``retries`` times (default 1). A worker process that crashes costs
each study it was running an attempt.

Engines: ``local`` runs the studies in this process (``workers=1``) or in a pool of ``workers`` spawned processes;
``ray`` (``pip install diffrecon[ray]``) runs a pool of ``workers`` Ray actors, on a cluster given by
``ray_address`` or on a local one (``num_cpus = workers × threads``). Every worker (this process, a pool process,
an actor) is a ``StudyWorker``: it keeps loaded priors and operators between studies (``reconstruct_file``'s
``cache``), so a prior is loaded once per worker, not once per study. Each worker runs torch with ``threads``
threads (default: this machine's cores / ``workers``); the same threads give bit-identical outputs in every
engine. An actor asks Ray for ``threads`` CPUs and, when the device is ``auto`` or ``cuda`` and the cluster has
GPUs (or this machine has CUDA), for one GPU (``cuda:N`` becomes the actor's own GPU); the device defaults to
``cpu``, as for ``recon reconstruct``. A cluster without room for every actor runs fewer (with a warning). On a
cluster, the inputs and OUTDIR must be at the same paths on every node, and recon installed there. One run per
OUTDIR (or per part) at a time.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recon.datasets.io import has_dicom_preamble, redact_config
from recon.pipeline import PipelineError
from recon.settings import RECONSTRUCTION_FIELDS, Settings
from recon.utils import jsonable

__all__ = [
    "ENGINES",
    "MANIFEST_COLUMNS",
    "NON_RETRIED",
    "BatchError",
    "BatchSummary",
    "Study",
    "StudyWorker",
    "discover_studies",
    "is_done",
    "read_manifest",
    "run_batch",
    "shard",
    "study_outputs",
]

ENGINES = ("local", "ray")
WITHHELD = "<withheld: anonymised run>"
DONE = "done.json"
LOG = "log.txt"
DONE_FORMAT = "recon-batch-done/1"
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_RESERVED = re.compile(r"^batch-results", re.IGNORECASE)
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_OWN = re.compile(r"^\.?(rec([._].*)?|done\.json.*)$")  # what recon batch writes in a study folder (besides log.txt)

# the settings every done.json fingerprint holds (settings added since count only when set)
_ALWAYS_FINGERPRINTED = ("method", "prior", "steps", "particles", "seed", "device", "format", "series", "on_irregular",
                         "task", "task_params", "photons", "noise", "options", "anonymize")

# per-study settings a manifest may set: column -> type ("path": relative to the manifest's folder)
_SETTING_TYPES = {"method": str, "prior": str, "steps": int, "particles": int, "seed": int, "task": str,
                  "photons": float, "noise": float, "series": str, "on_irregular": str, "reference": "path"}


def _task_parameters() -> tuple[str, ...]:
    from recon.tasks import DEFAULTS

    return tuple(sorted({k for params in DEFAULTS.values() for k in params if k != "complex"}))


MANIFEST_COLUMNS = ("input", "output", *_SETTING_TYPES, *_task_parameters(), "options.NAME")


class BatchError(PipelineError):
    """A user-facing problem with the batch itself (input folder, manifest, options); the message names it."""


def _non_retried() -> tuple[type[BaseException], ...]:
    from recon.samplers import SamplerDivergence

    return (ValueError, FileNotFoundError, SamplerDivergence)


NON_RETRIED = ("ValueError (PipelineError, ImageReadError, ImageWriteError, TaskError)", "FileNotFoundError",
               "SamplerDivergence")


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


# ------------------------------------------------------------------------------------------------ studies
@dataclass
class Study:
    """One study: its ``name`` (its subfolder of OUTDIR), its ``input`` (a DICOM folder, a NIfTI file, or what a
    manifest names) and its per-study ``options`` (manifest columns: settings, task parameters, ``options``)."""

    name: str
    input: Path
    options: dict = field(default_factory=dict)


def _is_nifti(name: str) -> bool:
    low = name.lower()
    return low.endswith(".nii") or low.endswith(".nii.gz")


def _looks_dicom(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return False
    return path.suffix.lower() in _DICOM_SUFFIXES or has_dicom_preamble(path)


def _safe_name(parts: tuple[str, ...]) -> str:
    name = "__".join(re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in parts)
    return name if _SAFE.match(name) else "_" + name


def _unique(entries: list[tuple[str, str, Path]]) -> list[Study]:
    """``(name, relative path, input)`` → studies with names unique (case-insensitively) and not reserved."""
    groups: dict[str, list] = {}
    for e in entries:
        groups.setdefault(e[0].lower(), []).append(e)
    studies = []
    for members in groups.values():
        clash = len(members) > 1 or bool(_RESERVED.match(members[0][0]))
        for name, rel, path in members:
            if clash:
                name = f"{name}-{hashlib.sha256(rel.encode()).hexdigest()[:8]}"
            studies.append(Study(name, path))
    names = [s.name.lower() for s in studies]
    if len(set(names)) != len(names):  # pragma: no cover - a hash suffix colliding with another study's name
        raise BatchError("two studies have the same name even after disambiguation; use a manifest")
    return sorted(studies, key=lambda s: s.name)


def _discover_folder(root: Path, exclude: Path | None) -> list[Study]:
    entries: list[tuple[str, str, Path]] = []
    claimed: list[Path] = []  # DICOM study folders (everything below belongs to them)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")
                             and (exclude is None or (d / n).resolve() != exclude))
        files = sorted(f for f in filenames if not f.startswith("."))
        rel = d.relative_to(root)
        inside = any(d == c or c in d.parents for c in claimed)
        if not inside and any(_looks_dicom(d / f) for f in files if not _is_nifti(f)):
            claimed.append(d)
            parts = rel.parts or (root.name or "study",)
            entries.append((_safe_name(parts), str(rel) if rel.parts else ".", d))
        for f in files:
            if _is_nifti(f):
                stem = f[: -len(".nii.gz")] if f.lower().endswith(".nii.gz") else f[: -len(".nii")]
                entries.append((_safe_name((*rel.parts, stem)), str(rel / f), d / f))
    return _unique(entries)


def _cell(value: str, column: str, where: str):
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    kind = _SETTING_TYPES.get(column)
    if kind in (str, "path"):
        return value
    if kind is int:
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)) or not float(parsed).is_integer():
            raise BatchError(f"{where}, column {column!r}: expected an integer, got {value!r}")
        return int(parsed)
    if kind is float:
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
            raise BatchError(f"{where}, column {column!r}: expected a number, got {value!r}")
        return float(parsed)
    return parsed


def read_manifest(path: str | os.PathLike) -> list[Study]:
    """The studies of a CSV manifest (see the module docstring): header ``input,output[,options...]``, one row
    per study; BatchError (one line naming the file, row and column) for anything unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BatchError(f"{path}: cannot read the manifest ({_one_line(err)})") from err
    reader = csv.reader(io.StringIO(text))
    rows = [r for r in reader if any(c.strip() for c in r)]
    if not rows:
        raise BatchError(f"{path}: empty manifest (expected a header input,output[,options...])")
    header = [c.strip() for c in rows[0]]
    allowed = {"input", "output", *_SETTING_TYPES, *_task_parameters()}
    for col in header:
        if col not in allowed and not (col.startswith("options.") and len(col) > len("options.")):
            raise BatchError(f"{path}: unknown column {col!r} (columns: {', '.join(MANIFEST_COLUMNS)})")
    if len(set(header)) != len(header):
        raise BatchError(f"{path}: a column appears twice in the header")
    for needed in ("input", "output"):
        if needed not in header:
            raise BatchError(f"{path}: the header needs an {needed!r} column (input,output[,options...])")
    studies, seen = [], {}
    for n, row in enumerate(rows[1:], start=2):
        studies.append(_manifest_row(path, header, row, n, seen))
    if not studies:
        raise BatchError(f"{path}: the manifest has a header but no study rows")
    return sorted(studies, key=lambda s: s.name)


def _manifest_row(path: Path, header: list[str], row: list[str], n: int, seen: dict) -> Study:
    """Row ``n`` of a manifest as a ``Study`` (``seen``: lower-cased names → row, for the uniqueness check)."""
    from recon.priors.io import BUILTIN_PRIORS
    from recon.samplers import METHODS
    from recon.tasks import TASKS

    where = f"{path}: row {n}"
    if len(row) > len(header):
        raise BatchError(f"{where}: {len(row)} cells for {len(header)} columns")
    cells = {c: v.strip() for c, v in zip(header, row, strict=False)}
    name, given = cells.get("output", ""), cells.get("input", "")
    if not given:
        raise BatchError(f"{where}: empty 'input'")
    if not _SAFE.match(name) or _RESERVED.match(name):
        raise BatchError(f"{where}, column 'output': {name!r} is not a usable study name (letters, digits, "
                         "'.', '_', '-'; not starting with '.', '-' or 'batch-results')")
    if name.lower() in seen:
        raise BatchError(f"{where}, column 'output': {name!r} is also row {seen[name.lower()]}'s (names are "
                         "unique, case-insensitively)")
    seen[name.lower()] = n
    opts: dict = {}
    for col, value in cells.items():
        if col in ("input", "output") or value == "":
            continue
        parsed = _cell(value, col, where)
        if col.startswith("options."):
            opts.setdefault("options", {})[col.split(".", 1)[1]] = parsed
        elif col in _SETTING_TYPES:
            if _SETTING_TYPES[col] == "path" or (col == "prior" and parsed not in BUILTIN_PRIORS):
                parsed = str(_relative_to(Path(parsed), path.parent))
            opts[col] = parsed
        else:
            opts.setdefault("task_params", {})[col] = parsed
    if opts.get("method") is not None and opts["method"] not in METHODS:
        raise BatchError(f"{where}, column 'method': {opts['method']!r} is not one of {', '.join(METHODS)}")
    if opts.get("method") is not None and opts.get("options"):
        try:
            METHODS[opts["method"]].check_options(opts["options"])
        except ValueError as err:
            raise BatchError(f"{where}: {err}") from err
    if opts.get("task") is not None and opts["task"] not in TASKS:
        raise BatchError(f"{where}, column 'task': {opts['task']!r} is not one of {', '.join(TASKS)}")
    return Study(name, _relative_to(Path(given), path.parent), opts)


def _relative_to(p: Path, base: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else base / p


def discover_studies(input: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Study]:
    """The studies of ``input``, a folder or a ``.csv`` manifest (module docstring), sorted by name. ``exclude``
    (OUTDIR) is skipped when it lies inside the folder. BatchError when there is none or ``input`` is unusable."""
    p = Path(input)
    if not p.exists():
        raise BatchError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise BatchError(f"{p}: give a folder of studies or a .csv manifest (input,output[,options...])")
        return read_manifest(p)
    studies = _discover_folder(p, Path(exclude).resolve() if exclude is not None else None)
    if not studies:
        raise BatchError(f"{p}: no studies found (NIfTI files, or folders of DICOM files)")
    return studies


def shard(studies: list[Study], num_parts: int = 1, part_id: int = 0) -> list[Study]:
    """The studies of part ``part_id`` (0 ≤ part_id < num_parts): those whose name hashes to it
    (``int(sha256(name)[:16], 16) % num_parts``), in the given order. Over all part ids every study comes exactly
    once, whatever the other studies are."""
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise BatchError(f"--num-parts must be an integer >= 1, got {num_parts!r}")
    if isinstance(part_id, bool) or not isinstance(part_id, int) or not 0 <= part_id < num_parts:
        raise BatchError(f"--part-id must be an integer from 0 to {num_parts - 1} (--num-parts {num_parts}), "
                         f"got {part_id!r}")
    if num_parts == 1:
        return list(studies)
    return [s for s in studies if int(hashlib.sha256(s.name.encode()).hexdigest()[:16], 16) % num_parts == part_id]


# -------------------------------------------------------------------------------------------- done marker
def study_outputs(folder: Path, fmt: str | None) -> Path:
    """The reconstruction's path in a study folder: ``rec.nii.gz``, or ``rec`` (a DICOM series folder)."""
    return folder / ("rec" if fmt == "dicom" else "rec.nii.gz")


def _fingerprint(study_input: Path, settings: dict) -> str:
    keep = {k: v for k, v in settings.items() if k not in ("device", "overwrite")}
    text = json.dumps({"input": str(Path(study_input).absolute()), "settings": keep}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _describe_output(path: Path, folder: Path) -> dict:
    from recon.pipeline import sha256_files

    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        return {"path": str(path.relative_to(folder)), "files": len(files), "bytes": sum(f.stat().st_size
                for f in files), "sha256": sha256_files(files)}
    return {"path": str(path.relative_to(folder)), "bytes": path.stat().st_size, "sha256": sha256_files([path])}


def _output_ok(entry: dict, folder: Path) -> bool:
    p = folder / entry.get("path", "\0")
    if "files" in entry:
        if not p.is_dir():
            return False
        files = [f for f in p.rglob("*") if f.is_file()]
        return len(files) == entry["files"] and sum(f.stat().st_size for f in files) == entry["bytes"]
    return p.is_file() and p.stat().st_size == entry.get("bytes")


def is_done(folder: str | os.PathLike, fingerprint: str | None = None) -> tuple[str, dict | None]:
    """``("done", marker)`` when ``folder/done.json`` is complete (readable, every listed output present with its
    recorded size) and, if given, written for ``fingerprint``; ``("other-config", marker)`` when complete but for
    another configuration; ``("missing", None)`` otherwise (never run, interrupted, or damaged)."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / DONE).read_text())
    except (OSError, ValueError):
        return "missing", None
    if not isinstance(marker, dict) or marker.get("format") != DONE_FORMAT or not isinstance(
            marker.get("outputs"), dict) or "report" not in marker:
        return "missing", None
    if not all(isinstance(e, dict) and _output_ok(e, folder) for e in marker["outputs"].values()):
        return "missing", None
    if fingerprint is not None and marker.get("fingerprint") != fingerprint:
        return "other-config", marker
    return "done", marker


def _clear_study_folder(folder: Path, keep_log: bool) -> None:
    """Remove what an earlier attempt left (``rec*`` files and series, temporary files, ``done.json``)."""
    for entry in folder.iterdir():
        if entry.name == LOG and keep_log:
            continue
        if _OWN.match(entry.name) or entry.name == LOG:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


# ------------------------------------------------------------------------------------------------ workers
class StudyWorker:
    """Runs studies one at a time (``run(task)``), keeping loaded priors and operators between them
    (``recon.pipeline.reconstruct_file``'s ``cache``): the ``local`` engine's process(es) and each Ray actor hold
    one. ``threads``: torch's intra-op threads for this process (None: leave as is)."""

    def __init__(self, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.cache: dict = {}
        self.studies = 0

    def stats(self) -> dict:
        """``pid``, ``host``, ``studies`` run and ``prior_loads`` (``load_prior`` calls: one per prior and device
        this worker used, however many studies)."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "studies": self.studies,
                "prior_loads": sum(1 for k in self.cache if k[0] == "prior")}

    def run(self, task: dict) -> dict:
        """Reconstruct one study (a task built by ``run_batch``) into its folder and write its ``done.json``; every
        exception except KeyboardInterrupt is caught and returned as a ``failed`` record."""
        from recon import pipeline
        from recon.datasets.io import atomic_write_bytes

        self.studies += 1
        t0 = time.perf_counter()
        folder = Path(task["folder"])
        record = {"study": task["study"], "input": task["input"], "attempts": task["attempt"]}
        handler = None
        logger = logging.getLogger("recon")
        level, propagate = logger.level, logger.propagate
        log = logging.getLogger("recon.batch")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _clear_study_folder(folder, keep_log=task["attempt"] > 1)
            handler = logging.FileHandler(folder / LOG, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False  # the study's messages go to its log.txt; the console shows progress
            private = bool(task["settings"].get("anonymize"))  # no paths next to an anonymised output
            log.info("study %s, attempt %d, input %s", task["study"], task["attempt"],
                     WITHHELD if private else task["input"])
            settings = redact_config(task["settings"]) if private else task["settings"]
            log.info("settings %s", json.dumps(settings, sort_keys=True, default=str))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                report = pipeline.reconstruct_file(task["input"], study_outputs(folder, task["settings"].get("format")),
                                                   **task["settings"], overwrite=True, config=task["config"],
                                                   cache=self.cache)
            for w in caught:
                log.warning("%s: %s", w.category.__name__, w.message)
            outputs = {k: Path(v) for k, v in report["outputs"].items()}
            marker = {"format": DONE_FORMAT, "study": task["study"], "fingerprint": task["fingerprint"],
                      "seconds": time.perf_counter() - t0, "report": report,
                      "outputs": {k: _describe_output(p, folder) for k, p in outputs.items()}}
            atomic_write_bytes(json.dumps(marker, indent=1, default=str).encode(), folder / DONE, overwrite=True)
            record.update(_from_report(report), status="done", error=None, retryable=False,
                          seconds=marker["seconds"])
            log.info("done in %.2f s: %s", marker["seconds"], ", ".join(f"{k} {v}" for k, v in _metrics(report)
                                                                          .items()))
        except KeyboardInterrupt:
            raise
        except Exception as err:  # recorded, the other studies go on
            record.update(status="failed", error=_one_line(err), retryable=not isinstance(err, _non_retried()),
                          seconds=time.perf_counter() - t0, outputs={})
            if handler is not None:
                log.error("failed (%s): %s\n%s", "will be retried if attempts remain" if record["retryable"]
                          else "not retried", record["error"], traceback.format_exc())
        finally:
            if handler is not None:
                logger.removeHandler(handler)
                handler.close()
            logger.setLevel(level)
            logger.propagate = propagate
        record["log"] = str(folder / LOG)
        record["worker"] = self.stats()
        return record


def _metrics(report: dict) -> dict:
    return {k: report[k] for k in ("psnr", "ssim", "data_residual", "nfe") if k in report}


def _from_report(report: dict) -> dict:
    return {**_metrics(report), "reconstruct_seconds": report.get("seconds"),
            "outputs": dict(report.get("outputs") or {})}


_POOL_WORKER: StudyWorker | None = None


def _pool_init(threads: int | None) -> None:
    global _POOL_WORKER
    _POOL_WORKER = StudyWorker(threads)


def _pool_run(task: dict) -> dict:
    assert _POOL_WORKER is not None
    return _POOL_WORKER.run(task)


class _InProcess:
    """``local`` with one worker: this process (its torch thread count is restored at the end)."""

    def __init__(self, threads: int | None):
        import torch

        self._threads = torch.get_num_threads()
        self.worker = StudyWorker(threads)
        self.slots = 1
        self._ready: list = []

    def submit(self, task: dict):
        handle = object()
        self._ready.append((handle, self.worker.run(task)))
        return handle

    def wait(self, handles: list) -> list:
        ready, self._ready = self._ready, []
        return ready

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._threads)


class _ProcessPool:
    """``local`` with several workers: spawned processes, each one ``StudyWorker`` kept for the whole run."""

    def __init__(self, workers: int, threads: int | None):
        import multiprocessing

        self.slots, self.threads = workers, threads
        self._owner: dict = {}  # future -> the executor that runs it (a broken one is replaced once)
        self._context = multiprocessing.get_context("spawn")
        self._make()

    def _make(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.executor = ProcessPoolExecutor(self.slots, mp_context=self._context, initializer=_pool_init,
                                            initargs=(self.threads,))

    def submit(self, task: dict):
        future = self.executor.submit(_pool_run, task)
        self._owner[future] = self.executor
        return future

    def wait(self, handles: list) -> list:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures
        from concurrent.futures.process import BrokenProcessPool

        done, _ = wait_futures(handles, return_when=FIRST_COMPLETED)
        out, broken = [], False
        for f in done:
            owner = self._owner.pop(f, None)
            try:
                out.append((f, f.result()))
            except BrokenProcessPool as err:
                broken = broken or owner is self.executor
                out.append((f, err))
            except Exception as err:
                out.append((f, err))
        if broken:  # a worker died: the studies in flight in this pool fail too; a fresh pool runs the retries
            self.executor.shutdown(wait=False, cancel_futures=True)
            self._make()
        return out

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise BatchError("--engine ray needs Ray: pip install diffrecon[ray]") from err
    return ray


class _RayPool:
    """``ray``: ``workers`` actors (``StudyWorker``), one study at a time each; a lost actor is restarted by Ray
    and its study retried by ``run_batch`` (attempts bounded by ``retries``)."""

    def __init__(self, workers: int, threads: int, address: str | None, device: str, quiet: bool):
        ray = _import_ray()
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kwargs = {"include_dashboard": False, "logging_level": logging.ERROR if quiet else logging.WARNING,
                      "log_to_driver": False}
            try:
                if address:
                    ray.init(address=address, **kwargs)
                else:
                    ray.init(num_cpus=workers * threads, **kwargs)
            except Exception as err:  # connection refused, bad address, ...
                raise BatchError(f"--ray-address {address}: cannot start or reach Ray ({_one_line(err)})"
                                 if address else f"cannot start a local Ray cluster ({_one_line(err)})") from err
            self.started = True
        gpus = 1 if _wants_gpu(device, ray) else 0
        resources = ray.cluster_resources()
        room = min(workers, int(resources.get("CPU", 0) // threads),
                   int(resources.get("GPU", 0)) if gpus else workers)
        if room < 1:
            raise BatchError(f"the Ray cluster has no room for one worker ({threads} CPU(s){', 1 GPU' if gpus else ''}"
                             f"; it has {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s)); "
                             "lower --threads")
        if room < workers:  # actors that cannot be placed would hold their study forever
            logging.getLogger("recon.batch").warning("the Ray cluster has room for %d of %d workers; using %d", room,
                                                     workers, room)
            workers = room
        actor = ray.remote(num_cpus=threads, num_gpus=gpus, max_restarts=-1, max_task_retries=0)(StudyWorker)
        self.actors = [actor.remote(threads) for _ in range(workers)]
        self.free = list(self.actors)
        self.owner: dict = {}
        self.slots = workers
        self.gpus = gpus

    def submit(self, task: dict):
        actor = self.free.pop()
        ref = actor.run.remote(task)
        self.owner[ref] = actor
        return ref

    def wait(self, handles: list) -> list:
        ready, _ = self.ray.wait(handles, num_returns=1)
        out = []
        for ref in ready:
            self.free.append(self.owner.pop(ref))
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as err:  # the actor died (RayActorError) or Ray lost the task
                out.append((ref, err))
        return out

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # pragma: no cover - already gone
                pass
        if self.started:
            self.ray.shutdown()


def _wants_gpu(device: str, ray=None) -> bool:
    if device == "cpu":
        return False
    import torch

    if torch.cuda.is_available():
        return True
    return bool(ray is not None and ray.cluster_resources().get("GPU", 0) > 0)


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class BatchSummary:
    """The outcome of ``run_batch``: counts, wall ``seconds``, ``studies_per_minute`` (studies done per minute of
    wall time), the per-study ``results`` (the rows of the results table) and per-worker ``workers`` stats."""

    total: int
    done: int
    skipped: int
    failed: int
    seconds: float
    studies_per_minute: float | None
    engine: str
    workers: int
    threads: int
    part: list[int]
    results: list[dict]
    worker_stats: list[dict]
    results_csv: str
    results_json: str

    @property
    def exit_code(self) -> int:
        """0 if no study failed, else 1."""
        return 1 if self.failed else 0

    def to_json(self) -> dict:
        return asdict(self)


_CSV_COLUMNS = ("study", "status", "attempts", "seconds", "reconstruct_seconds", "psnr", "ssim", "data_residual",
                "nfe", "error", "input", "image", "std", "preview", "report", "provenance", "config", "log")


def _write_tables(summary: BatchSummary) -> None:
    from recon.datasets.io import atomic_write_bytes

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in summary.results:
        row = {**r, **{k: v for k, v in (r.get("outputs") or {}).items() if k in _CSV_COLUMNS}}
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in _CSV_COLUMNS})
    atomic_write_bytes(buf.getvalue().encode(), summary.results_csv, overwrite=True)
    atomic_write_bytes(json.dumps(summary.to_json(), indent=1, default=str).encode(), summary.results_json,
                       overwrite=True)


def _skipped(study: Study, folder: Path, marker: dict) -> dict:
    report = marker["report"]
    return {"study": study.name, "input": str(study.input), "status": "skipped", "attempts": 0, "error": None,
            "seconds": marker.get("seconds"), **_from_report(report), "log": str(folder / LOG)}


def _prepare_outdir(outdir: Path) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise BatchError(f"{outdir}: is a file, not an output folder")
    if not outdir.exists():
        if not outdir.parent.is_dir():
            raise BatchError(f"{outdir.parent}: output folder's parent does not exist")
        outdir.mkdir()
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise BatchError(f"{outdir}: output folder is not writable")


def run_batch(
    input: str | os.PathLike,
    outdir: str | os.PathLike,
    settings: Settings | None = None,
    *,
    engine: str = "local",
    workers: int = 1,
    threads: int | None = None,
    retries: int = 1,
    num_parts: int = 1,
    part_id: int = 0,
    ray_address: str | None = None,
    overwrite: bool = False,
    config: dict | None = None,
    progress: Callable[[dict, int, int], None] | None = None,
    quiet: bool = False,
    **overrides,
) -> BatchSummary:
    """Reconstruct every study of ``input`` (a folder or a ``.csv`` manifest) into ``outdir/<study>/`` and write
    the results table; returns the summary (``exit_code`` 1 if a study failed).

    Args:
        input: a folder of studies or a CSV manifest (see the module docstring).
        outdir: the output folder (one subfolder per study, the results table).
        settings: ``recon.settings.Settings``, as ``recon.pipeline.reconstruct_file`` takes them; a manifest's
            columns override them per study.
        engine, workers, threads, retries, num_parts, part_id, ray_address: see the module docstring.
        overwrite: redo finished studies too.
        config: the command line's resolved options, merged into each study's ``rec.config.yaml``.
        progress: ``progress(record, finished, total)`` is called as each study ends (skipped ones too).
        quiet: no messages from the engines.
        **overrides: ``Settings`` fields set for this batch.

    Raises:
        BatchError: an unusable batch (input, manifest, options, Ray unavailable).
    """
    settings = Settings.from_mapping(overrides, settings)
    t_start = time.perf_counter()
    _check_batch(settings, engine, workers, retries, threads, ray_address)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
    outdir = Path(outdir)
    studies = shard(discover_studies(input, exclude=outdir), num_parts, part_id)
    _prepare_outdir(outdir)
    suffix = "" if num_parts == 1 else f".part-{part_id}-of-{num_parts}"
    base = {k: v for k, v in settings.to_dict(RECONSTRUCTION_FIELDS).items()  # unset later additions left out:
            if v is not None or k in _ALWAYS_FINGERPRINTED}  # the fingerprints of earlier runs still hold
    results: dict[str, dict] = {}

    def finish(record: dict) -> None:
        results[record["study"]] = record
        if progress is not None:
            progress(record, len(results), len(studies))

    queue = _plan(studies, base, outdir, overwrite, config, finish)
    slots, stats = _run_queue(queue, engine, workers, threads, ray_address, settings.device, quiet, retries, finish)
    ordered = [results[s.name] for s in studies]
    if settings.anonymize:  # the results table sits next to anonymised outputs: no input paths in it
        for r in ordered:
            r["input"] = WITHHELD
    counts = {k: sum(1 for r in ordered if r["status"] == k) for k in ("done", "skipped", "failed")}
    seconds = time.perf_counter() - t_start
    summary = BatchSummary(
        total=len(studies), **counts, seconds=seconds,
        studies_per_minute=counts["done"] / seconds * 60 if counts["done"] and seconds > 0 else None,
        engine=engine, workers=slots or workers, threads=threads, part=[part_id, num_parts], results=ordered,
        worker_stats=sorted(stats.values(), key=lambda w: (str(w.get("host")), w.get("pid") or 0)),
        results_csv=str(outdir / f"batch-results{suffix}.csv"),
        results_json=str(outdir / f"batch-results{suffix}.json"))
    _write_tables(summary)
    return summary


def _check_batch(settings: Settings, engine: str, workers, retries, threads, ray_address) -> None:
    """One ``BatchError`` for an unusable engine, count, method, option or device, before any study runs."""
    import torch

    from recon.pipeline import resolve_device
    from recon.samplers import METHODS

    if engine not in ENGINES:
        raise BatchError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    for name, value, low in (("--workers", workers, 1), ("--retries", retries, 0), ("--threads", threads, 1)):
        if value is None and name == "--threads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BatchError(f"{name} must be an integer >= {low}, got {value!r}")
    if ray_address and engine != "ray":
        raise BatchError("--ray-address applies to --engine ray")
    method, device = settings.method, settings.device
    if method is not None and method not in METHODS:
        raise BatchError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method is not None:
        try:  # a bad option is one error for the batch, not one failed study each (and never retried)
            METHODS[method].check_options(settings.options)
        except ValueError as err:
            raise BatchError(str(err)) from err
    if engine == "local":
        resolve_device(device)  # a bad --device is one error, not one per study
    elif device != "auto":  # the workers may have GPUs this machine lacks: check the spelling only
        try:
            kind = torch.device(device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise BatchError(f"--device must be auto, cpu or cuda[:N], got {device!r}")


def _plan(studies: list, base: dict, outdir: Path, overwrite: bool, config: dict | None, finish) -> deque:
    """The studies to run (each a task for a worker); finished ones are reported as skipped (or, done with other
    settings, as failed) through ``finish``."""
    queue: deque = deque()
    for s in studies:
        study = _study_settings(base, s.options)
        fingerprint = _fingerprint(s.input, study)
        folder = outdir / s.name
        if not overwrite:
            state, marker = is_done(folder, fingerprint)
            if state == "done":
                finish(_skipped(s, folder, marker))
                continue
            if state == "other-config":
                finish({"study": s.name, "input": str(s.input), "status": "failed", "attempts": 0, "seconds": 0.0,
                        "error": f"{folder}: done with a different configuration (use --overwrite to redo it)",
                        "outputs": {}, "log": str(folder / LOG)})
                continue
        study_config = {**(config or {}), **{k: v for k, v in study.items() if v not in (None, {})},
                        "input": str(s.input), "output": str(study_outputs(folder, study.get("format")))}
        study_config.pop("overwrite", None)
        if s.options.get("task_params"):
            study_config.update(s.options["task_params"])
        queue.append({"study": s.name, "input": str(s.input), "folder": str(folder), "settings": study,
                      "config": jsonable(study_config), "fingerprint": fingerprint, "attempt": 1})
    return queue


def _pool(queue: deque, engine: str, workers: int, threads: int, ray_address, device: str, quiet: bool):
    if engine == "ray":
        pool = _RayPool(workers, threads, ray_address, device, quiet)
        for t in queue:
            if pool.gpus and str(t["settings"]["device"]).startswith("cuda"):
                t["settings"]["device"] = "cuda"  # the actor's own GPU
        return pool
    return _InProcess(threads) if workers == 1 else _ProcessPool(workers, threads)


def _run_queue(queue: deque, engine: str, workers: int, threads: int, ray_address, device: str, quiet: bool,
               retries: int, finish) -> tuple[int | None, dict]:
    """Run the queued studies on the engine, retrying a retryable failure up to ``retries`` times; returns the
    pool's slots (None when nothing ran) and the workers' statistics."""
    if not queue:
        return None, {}
    pool = _pool(queue, engine, workers, threads, ray_address, device, quiet)
    stats: dict = {}
    try:
        inflight: dict = {}
        while queue or inflight:
            while queue and len(inflight) < pool.slots:
                t = queue.popleft()
                inflight[pool.submit(t)] = t
            for handle, outcome in pool.wait(list(inflight)):
                t = inflight.pop(handle)
                if isinstance(outcome, BaseException):
                    record = {"study": t["study"], "input": t["input"], "status": "failed", "attempts": t["attempt"],
                              "error": f"worker lost: {_one_line(outcome)}", "retryable": True, "seconds": None,
                              "outputs": {}, "log": str(Path(t["folder"]) / LOG)}
                else:
                    record = outcome
                    w = record.get("worker") or {}
                    stats[(w.get("host"), w.get("pid"))] = w
                if record["status"] == "failed" and record.get("retryable") and t["attempt"] <= retries:
                    queue.append({**t, "attempt": t["attempt"] + 1})
                    continue
                finish(record)
    finally:
        pool.close()
    return pool.slots, stats


def _study_settings(base: dict, options: dict) -> dict:
    settings = {**base, "task_params": dict(base["task_params"]), "options": dict(base["options"])}
    for key, value in options.items():
        if key in ("task_params", "options"):
            settings[key].update(value)
        else:
            settings[key] = value
    if settings.get("reference") is None:
        settings.pop("reference", None)
    return settings
