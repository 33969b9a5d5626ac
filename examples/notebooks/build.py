"""Build the tutorial notebooks: jupytext percent files (``NN_name.py``, the source of truth) → executed ``.ipynb``.

    python examples/notebooks/build.py                  # every notebook
    python examples/notebooks/build.py 01 04_volumes    # some (by number or name)
    python examples/notebooks/build.py --check          # execute without writing (as CI does with nbmake)

Each ``NN_name.py`` is converted with jupytext, executed top to bottom by nbclient (kernel ``python3``, working
folder = this folder, a timeout per cell) and written next to it as ``NN_name.ipynb`` with its outputs, atomically
(a temporary file renamed into place, so a failed or interrupted run leaves the previous notebook intact). A cell
that raises stops the build with a non-zero exit status. The wall time of each notebook is printed.

CI runs the stored notebooks with ``python -m pytest -q --nbmake examples/notebooks/*.ipynb`` (which executes them in
memory and never overwrites them); this script is how they are regenerated after an edit of a ``.py`` file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sources(names: list[str]) -> list[Path]:
    every = sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))
    if not names:
        return every
    chosen = []
    for name in names:
        stem = Path(name).stem
        hits = [p for p in every if p.stem == stem or p.stem.split("_", 1)[0] == stem]
        if not hits:
            sys.exit(f"build.py: no notebook source {name!r} in {HERE} (have: {', '.join(p.stem for p in every)})")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def build(src: Path, timeout: int, write: bool) -> float:
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    t0 = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    client.execute()
    seconds = time.perf_counter() - t0
    if write:
        target = src.with_suffix(".ipynb")
        fd, tmp = tempfile.mkstemp(dir=HERE, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            nbformat.write(nb, tmp)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebooks to build (number or name; default: all)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--check", action="store_true", help="execute only; do not write the .ipynb files")
    args = parser.parse_args()
    failed = []
    for src in sources(args.names):
        print(f"{src.stem}: running ...", flush=True)
        try:
            seconds = build(src, args.timeout, write=not args.check)
        except Exception as err:  # a cell raised (nbclient's CellExecutionError carries the traceback) or timed out
            print(f"{src.stem}: FAILED\n{err}", flush=True)
            failed.append(src.stem)
            continue
        size = src.with_suffix(".ipynb").stat().st_size if not args.check else 0
        print(f"{src.stem}: {seconds:.1f} s" + (f", {size / 1e6:.2f} MB" if size else ""), flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
