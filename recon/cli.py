"""The ``recon`` command line.

Subcommands:

- ``recon demo``: the main job on the built-in default: a real CT slice shipped with pydicom through a
  sparse-view, low-dose scan, reconstructed with FBP and with the default CT prior; outputs in a folder.
- ``recon info -i PATH``: what a file or folder holds (series, modality, shape, spacing, orientation, values).
- ``recon simulate -i IMAGE -o MEAS.npz --task TASK``: measurements with everything needed to rebuild the operator.
- ``recon reconstruct -i MEAS.npz -o OUT``: reconstruction, std map, preview, report and provenance; with
  ``--task`` an image is simulated and reconstructed in one go (the image is the reference).
- ``recon batch -i FOLDER|MANIFEST.csv -o OUTDIR``: every study reconstructed as ``reconstruct`` would, one
  subfolder each, with a results table, resume, ``--num-parts``/``--part-id`` sharding and ``--engine local|ray``
  (``recon.batch``); exit status 1 if a study failed.
- ``recon train-prior``: train a slice diffusion prior.
- ``recon train-restorer``: train a few-step restoration diffusion model (ResShift / RDDM) on one degradation.
- ``recon restore -i IMAGE -o OUT``: restore a DICOM / NIfTI image with a trained restorer (same companions as
  ``reconstruct``); ``--degrade`` simulates the model's degradation first (the input is the reference).

Common options: ``--device auto|cpu|cuda:N``, ``--seed``, ``--config FILE.yaml`` and repeated ``--set key=value``
(precedence: defaults < config file < flags < ``--set``; the resolved configuration is written next to the
outputs), ``--json`` (machine-readable summary on stdout), ``-q``/``-v``. Progress bars go to stderr, off when
stderr is not a terminal. User errors (bad arguments, unreadable inputs, unwritable outputs) print one line
``recon: error: ...`` and exit with status 2; ``-v`` shows the traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _task_options() -> dict[str, tuple[type, str]]:
    """CLI flag name -> (type, help) of every task parameter, from ``recon.operators.PARAMETERS`` and the tasks'
    defaults in ``recon.tasks.TASK_TABLE`` (passed to ``recon.tasks.make_task`` when given)."""
    from recon.operators.parameters import PARAMETERS
    from recon.tasks import TASK_TABLE

    out = {}
    for name, param in PARAMETERS.items():
        if name in ("photons", "noise"):  # noise models, not task parameters
            continue
        defaults: dict = {}
        for task in TASK_TABLE.values():
            if name in task.defaults and task.defaults[name] is not None:
                defaults.setdefault(task.defaults[name], []).append(task.name)
        where = "; ".join(f"{v:g} for {', '.join(ts)}" if isinstance(v, float) else f"{v} for {', '.join(ts)}"
                          for v, ts in defaults.items())
        unit = f", {param.unit}" if param.unit else ""
        out[name] = (param.kind, f"{param.help}{unit}" + (f" (default {where})" if where else ""))
    return out


def _flagged(message: str) -> str:
    """A library message names arguments (``views must be ...``); the command line's user sees its flags."""
    from recon.operators.parameters import PARAMETERS

    for name in (*PARAMETERS, "device", "max_memory", "memory_budget"):
        if message.startswith(f"{name} "):
            flag = "--max-memory" if name == "memory_budget" else "--" + name.replace("_", "-")
            return flag + message[len(name):]
    return message


class UserError(Exception):
    """An error the user can fix: printed as one line, no traceback (unless -v)."""


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _load_config(args) -> dict:
    """Config file, then the flags given on the command line, then --set (later wins)."""
    cfg: dict = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: a config file holds a mapping of option: value")
        cfg.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    for key, value in vars(args).items():
        if key in ("config", "set", "command", "func", "json", "quiet", "verbose") or value is None:
            continue
        if value is False and key in ("overwrite", "anonymize"):
            continue
        cfg[key] = value
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key.startswith("options."):
            cfg.setdefault("options", {})[key.split(".", 1)[1]] = _parse_value(value)
        else:
            cfg[key] = _parse_value(value)
    return cfg


def _progress(args, total_hint: str = "step"):
    """A callback drawing a tqdm bar on stderr (off when stderr is not a terminal, or with -q)."""
    from tqdm import tqdm

    state: dict = {}

    def callback(info: dict):
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=info.get("steps"), desc="reconstruct", unit=total_hint, file=sys.stderr,
                                      disable=args.quiet or not sys.stderr.isatty(), leave=False)
        bar.update(1)
        post = {"residual": f"{info.get('residual', float('nan')):.3g}"}
        if "ess" in info:
            post["ess"] = f"{info['ess']:.1f}"
        bar.set_postfix(post)

    def close():
        if state.get("bar") is not None:
            state["bar"].close()

    return callback, close


def _parse_bytes(text) -> float:
    """``"8GB"``, ``"512MB"``, ``"2e9"`` → bytes."""
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1.0}
    t = str(text).strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            t, scale = t[: -len(unit)], units[unit]
            break
    else:
        scale = 1.0
    try:
        value = float(t) * scale
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"--max-memory expects a size such as 8GB or 512MB, got {text!r}")
    return value


def _settings(cfg: dict, **extra):
    """The ``recon.settings.Settings`` of ``recon reconstruct`` / ``batch`` / ``restore`` from the resolved
    configuration (flags, config file, ``--set``); keys that are not settings (``input``, ``engine``, ...) are the
    commands' own."""
    from recon.settings import Settings

    known = set(Settings.__dataclass_fields__)
    values = {k: v for k, v in cfg.items() if k in known and k not in ("task_params", "options")}
    values.update({"task_params": _task_params(cfg), "options": dict(cfg.get("options") or {}), **extra})
    return Settings.from_mapping(values)


def _task_params(cfg: dict) -> dict:
    return {k: cfg[k] for k in _task_options() if cfg.get(k) is not None}


def _print(summary: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print("\n".join(lines))


# ------------------------------------------------------------------------------------------------ commands
def cmd_info(args) -> int:
    from recon.pipeline import describe

    info = describe(args.input, series=args.series, on_irregular=args.on_irregular or "error")
    lines = []
    for s in info.get("series", []):
        lines.append(f"series {s['index']}: {s['modality']} {s['description']!r} {s['files']} files, shape "
                     f"{tuple(s['shape'])}, uid {s['uid']}")
    if "kspace_shape" in info:
        lines += [f"fastMRI k-space {tuple(info['kspace_shape'])}, {info['coils']} coil(s), acceleration "
                  f"{info['acceleration']:.2f}, spacing (dz, dy, dx) mm: {tuple(info['spacing_mm'])}"]
    if "shape" in info:
        lines += [f"modality: {info['modality']}  unit: {info['unit']}",
                  f"shape (D, H, W): {tuple(info['shape'])}", f"spacing (dz, dy, dx) mm: {tuple(info['spacing_mm'])}",
                  f"origin (RAS mm): {tuple(info['origin_mm'])}",
                  *(f"direction {k}: {tuple(v)}" for k, v in info["orientation_ras"].items()),
                  f"value range: [{info['value_range'][0]:g}, {info['value_range'][1]:g}]"]
    elif info.get("series"):
        lines.append("several series: pick one with --series (index, UID or description)")
    _print(info, args.json, lines)
    return 0


def cmd_simulate(args) -> int:
    from recon.pipeline import simulate_file

    cfg = _load_config(args)
    if not cfg.get("task"):
        raise UserError("simulate needs --task (one of: " + ", ".join(_tasks()) + ")")
    summary = simulate_file(cfg["input"], cfg["output"], cfg["task"], series=cfg.get("series"),
                            photons=cfg.get("photons"), noise=cfg.get("noise"), seed=int(cfg.get("seed", 0)),
                            overwrite=bool(cfg.get("overwrite", False)),
                            on_irregular=cfg.get("on_irregular") or "error", **_task_params(cfg))
    line = (f"wrote {summary['output']}: {summary['task']} on {tuple(summary['img_size'])}, measurements "
            f"{tuple(summary['measurement_shape'])}, noise {summary['noise']['kind']}")
    _print(summary, args.json, [line])
    return 0


def cmd_reconstruct(args) -> int:
    from recon.pipeline import reconstruct_file

    cfg = _load_config(args)
    for key in ("input", "output"):
        if not cfg.get(key):
            raise UserError(f"reconstruct needs --{key}")
    options = dict(cfg.get("options") or {})
    for key in ("checkpoint", "checkpoint_every", "resume"):
        if cfg.get(key):
            method = _method_spec(cfg.get("method") or _recommended("ct"))
            if not method.long_running:
                resumable = ", ".join(m for m, s in _methods().items() if s.long_running)
                raise UserError(f"--{key.replace('_', '-')} applies to the long-running methods ({resumable}), "
                                f"not --method {method.name}")
            options[key] = cfg[key]
    memory = _parse_bytes(cfg["max_memory"]) if cfg.get("max_memory") else None
    callback, close = _progress(args)
    try:
        report = reconstruct_file(cfg["input"], cfg["output"], _settings(cfg, options=options, memory_budget=memory),
                                  overwrite=bool(cfg.get("overwrite", False)), config=cfg, callback=callback)
    finally:
        close()
    lines = [f"{report['method']} on {report['task']}: {report['nfe']} network evaluations, {report['seconds']:.1f} s, "
             f"data residual {report['data_residual']:.4g}"]
    if "psnr" in report:
        lines.append(f"PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.3f} (analytic: "
                     f"{report['analytic']['psnr']:.2f} dB, {report['analytic']['ssim']:.3f})")
    lines += [f"  {k}: {v}" for k, v in report["outputs"].items()]
    _print(report, args.json, lines)
    return 0


def _batch_progress(args):
    """Progress over studies on stderr: a tqdm bar on a terminal, else one line per study (off with -q)."""
    from tqdm import tqdm

    state: dict = {"failed": 0}
    tty = sys.stderr.isatty()

    def callback(record: dict, finished: int, total: int) -> None:
        if args.quiet:
            return
        state["failed"] += record["status"] == "failed"
        seconds = f" in {record['seconds']:.1f} s" if record.get("seconds") and record["status"] == "done" else ""
        line = f"recon batch: [{finished}/{total}] {record['study']}: {record['status']}{seconds}" + (
            f" ({record['error']})" if record.get("error") else "")
        if not tty:
            print(line, file=sys.stderr, flush=True)
            return
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc="batch", unit="study", file=sys.stderr, leave=False)
        if record["status"] == "failed":
            bar.write(line, file=sys.stderr)
        bar.update(1)
        bar.set_postfix({"failed": state["failed"]})

    def close() -> None:
        if state.get("bar") is not None:
            state["bar"].close()

    return callback, close


def cmd_batch(args) -> int:
    from recon.batch import run_batch

    cfg = _load_config(args)
    for key in ("input", "output"):
        if not cfg.get(key):
            raise UserError(f"batch needs --{key}")
    num_parts, part_id = cfg.get("num_parts"), cfg.get("part_id")
    if (part_id is None) != (num_parts is None) and not (num_parts == 1 and part_id is None):
        raise UserError("--num-parts and --part-id go together (--part-id from 0 to --num-parts - 1)")
    callback, close = _batch_progress(args)
    try:
        summary = run_batch(
            cfg["input"], cfg["output"], _settings(cfg), overwrite=bool(cfg.get("overwrite", False)), config=cfg,
            engine=cfg.get("engine", "local"), workers=cfg.get("workers", 1), threads=cfg.get("threads"),
            retries=cfg.get("retries", 1), num_parts=num_parts or 1, part_id=part_id or 0,
            ray_address=cfg.get("ray_address"), progress=callback, quiet=args.quiet)
    finally:
        close()
    part = f" part {summary.part[0]} of {summary.part[1]} (ids 0-{summary.part[1] - 1})" if summary.part[1] > 1 else ""
    rate = f", {summary.studies_per_minute:.2f} studies/min" if summary.studies_per_minute else ""
    lines = [f"batch{part}: {summary.total} studies: {summary.done} done, {summary.skipped} skipped, "
             f"{summary.failed} failed in {summary.seconds:.1f} s{rate} ({summary.engine}, {summary.workers} "
             f"worker(s) x {summary.threads} thread(s))"]
    lines += [f"  failed {r['study']}: {r['error']}" for r in summary.results if r["status"] == "failed"]
    lines.append(f"results: {summary.results_csv}, {summary.results_json}")
    _print(summary.to_json(), args.json, lines)
    return summary.exit_code


def _demo_input() -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        raise UserError("pydicom's test file CT_small.dcm is missing (reinstall pydicom)")
    return path


def cmd_demo(args) -> int:
    """CT_small.dcm (a real 128×128 CT slice) → sparse-view sinogram with Beer–Lambert noise → FBP and the
    default CT prior (the recommended CT method); every output in one folder; prints PSNR/SSIM."""
    from recon.pipeline import reconstruct_file

    if args.views < 1 or args.photons <= 0:
        raise UserError("--views must be >= 1 and --photons > 0")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    src = _demo_input()
    results = []
    methods = [("analytic", None), (args.method, args.steps)]
    for method, steps in methods:
        callback, close = _progress(args)
        try:
            # DPS step ζ′ = 2 (with the step divided by ‖A‖): measured better than the paper's 1 on sparse-view CT
            options = {"zeta": 2.0} if method == "dps" else {}
            report = reconstruct_file(src, out / f"{method}.nii.gz", method=method, steps=steps, seed=args.seed,
                                      device=args.device, task="sparse-view-ct", task_params={"views": args.views},
                                      photons=args.photons, overwrite=True, callback=callback, options=options,
                                      config={"demo": True, "method": method, "views": args.views,
                                              "photons": args.photons, "seed": args.seed, "steps": steps})
        finally:
            close()
        results.append({"method": method, "psnr_db": report["psnr"], "ssim": report["ssim"],
                        "seconds": report["seconds"], "nfe": report["nfe"], "outputs": report["outputs"]})
    summary = {"image": "pydicom CT_small.dcm (128×128 CT slice)", "task": "sparse-view-ct", "views": args.views,
               "photons": args.photons, "output": str(out), "results": results}
    lines = [f"Sparse-view CT of {summary['image']}: {args.views} views, {args.photons:g} photons per ray",
             f"{'method':12s} {'PSNR (dB)':>10s} {'SSIM':>6s} {'NFE':>5s} {'time':>8s}"]
    lines += [f"{r['method']:12s} {r['psnr_db']:10.2f} {r['ssim']:6.3f} {r['nfe']:5d} {r['seconds']:7.1f}s"
              for r in results]
    lines.append(f"PSNR/SSIM on the [-1000, 1000] HU window. Outputs (NIfTI, previews, reports) in {out}/")
    _print(summary, args.json, lines)
    return 0


def _tasks():
    from recon.tasks import TASKS

    return TASKS


def _recommended(modality: str | None, volume: bool = False) -> str:
    from recon.samplers import recommended_method

    return recommended_method(modality, volume=volume)


def _recommended_text() -> str:
    """The defaults by modality as help text: CT …, MRI … (and where volumes differ, theirs)."""
    parts = []
    for modality in ("ct", "mri"):
        image, volume = _recommended(modality), _recommended(modality, volume=True)
        parts.append(f"{modality.upper()} {image}" + (f", {modality.upper()} volumes {volume}" if volume != image
                                                       else ""))
    return ", ".join(parts)


def _methods() -> dict:
    from recon.samplers import METHODS

    return METHODS


def _method_spec(name: str):
    from recon.samplers import OptionError, get_method

    try:
        return get_method(name)
    except OptionError as err:
        raise UserError(str(err)) from err


def cmd_methods(args) -> int:
    """The method table, or one method's options (type, default, help), from the registry."""
    methods = _methods()
    if args.markdown:
        from recon.samplers.registry import markdown_table
        from recon.tasks import markdown_table as task_table

        print(markdown_table() + "\n\n" + task_table())
        return 0
    if args.name:
        from recon.samplers.registry import TUNED_OPTIONS

        spec = _method_spec(args.name)
        tuned = {m: t[spec.name] for m, t in TUNED_OPTIONS.items() if spec.name in t}
        rows = [{"option": o.name, "type": o.hint, "default": o.default, "help": o.help,
                 **({"by_modality": by} if (by := {m: t[o.name] for m, t in tuned.items() if o.name in t}) else {})}
                for o in spec.options.values()]
        summary = {"method": spec.name, "summary": spec.summary, "needs_prior": spec.needs_prior,
                   "long_running": spec.long_running, "complex_data": spec.complex_data, "options": rows}
        lines = [f"{spec.name}: {spec.summary}", f"  needs a prior: {spec.needs_prior}; checkpoint/resume: "
                 f"{spec.long_running}; complex images: {spec.complex_data}", "  options (--set options.NAME=VALUE):"]
        lines += [f"    {r['option']} ({r['type'] or 'any'}, default {r['default']!r}"
                  + "".join(f"; {m.upper()}: {v!r}" for m, v in r.get("by_modality", {}).items()) + f"): {r['help']}"
                  for r in rows]
        _print(summary, args.json, lines)
        return 0
    table = [{"method": n, "summary": s.summary, "needs_prior": s.needs_prior, "long_running": s.long_running}
             for n, s in methods.items()]
    lines = [f"{r['method']:16s} {r['summary']}" for r in table]
    lines.append("recon methods NAME lists a method's options")
    _print({"methods": table}, args.json, lines)
    return 0


# ------------------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages")
    p.add_argument("-v", "--verbose", action="store_true", help="more log messages; tracebacks on errors")
    if device:
        p.add_argument("--device", default=None, help="auto, cpu (default) or cuda[:N]")
        p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")


def _task_args(p: argparse.ArgumentParser) -> None:
    from recon.operators.parameters import PARAMETERS
    from recon.tasks import TASKS

    p.add_argument("--task", choices=TASKS, default=None, help="one of " + ", ".join(TASKS))
    for name, (typ, text) in _task_options().items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=text,
                       choices=PARAMETERS[name].choices)
    p.add_argument("--photons", type=float, default=None, help=PARAMETERS["photons"].help + " (CT default 1e5)")
    p.add_argument("--noise", type=float, default=None, help=PARAMETERS["noise"].help + " (default 0.01 for non-CT)")
    _series_args(p)


def _series_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--series", default=None, help="which DICOM series of a folder: index, UID or description")
    p.add_argument("--on-irregular", choices=["error", "resample"], default=None,
                   help="DICOM series with uneven slice spacing or a gap: refuse (default) or resample uniformly")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file of option: value (flags and --set override it)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override one option (repeatable); options.NAME=VALUE goes to the sampler")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def build_parser() -> argparse.ArgumentParser:
    from recon import __version__

    METHODS = _methods()

    parser = argparse.ArgumentParser(prog="recon", description="Medical image reconstruction with diffusion priors.")
    parser.add_argument("--version", action="version", version=f"recon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub, METHODS)
    _add_methods(sub)
    _add_info(sub)
    _add_simulate(sub)
    _add_reconstruct(sub, METHODS)
    _add_batch(sub, METHODS)
    _add_calibrate(sub, METHODS)
    _add_prepare_prior_data(sub)
    _add_train_prior(sub)
    _add_train_restorer(sub)
    _add_restore(sub)
    return parser


def _add_demo(sub, METHODS: dict) -> None:
    """The ``recon demo`` subcommand."""
    demo = sub.add_parser("demo", help="sparse-view low-dose CT of a real slice: FBP and the default prior")
    demo.add_argument("-o", "--output", default="recon-demo", help="output folder (default ./recon-demo)")
    demo.add_argument("--views", type=int, default=60, help="number of views over 180° (default 60)")
    demo.add_argument("--photons", type=float, default=1e5, help="photons per detector element (default 1e5)")
    demo.add_argument("--method", default=_recommended("ct"),
                      choices=[m for m, spec in METHODS.items() if spec.needs_prior and spec.conditional])
    demo.add_argument("--steps", type=int, default=None, help="sampler steps (method default)")
    _common(demo)
    demo.set_defaults(func=cmd_demo, device="cpu", seed=0)


def _add_methods(sub) -> None:
    """The ``recon methods`` subcommand."""
    mt = sub.add_parser("methods", help="the reconstruction methods, or one method's options")
    mt.add_argument("name", nargs="?", default=None, help="a method: list its options (type, default, help)")
    mt.add_argument("--markdown", action="store_true", help="the method and task tables of the README")
    _common(mt, device=False)
    mt.set_defaults(func=cmd_methods)


def _add_info(sub) -> None:
    """The ``recon info`` subcommand."""
    info = sub.add_parser("info", help="what a DICOM / NIfTI / image file or folder holds (reads only)")
    info.add_argument("-i", "--input", required=True)
    _series_args(info)
    _common(info, device=False)
    info.set_defaults(func=cmd_info)


def _add_simulate(sub) -> None:
    """The ``recon simulate`` subcommand."""
    sim = sub.add_parser("simulate", help="simulate measurements of a task on an image (writes MEAS.npz)")
    sim.add_argument("-i", "--input", default=None, help="DICOM series folder or file, NIfTI, NumPy, PNG/TIFF")
    sim.add_argument("-o", "--output", default=None, help="measurement file (.npz)")
    _task_args(sim)
    _config_args(sim)
    _common(sim)
    sim.set_defaults(func=cmd_simulate)


def _uncertainty_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uncertainty", nargs="?", type=float, const=0.9, default=None, metavar="LEVEL",
                   help="write the uncertainty maps: std, the LEVEL interval bounds (default 0.9) and the null-space "
                   "map (what the prior supplied), summarised in the report; without --method, 16 runs of the "
                   "recommended method (an ensemble; on MRI, whose TV has nothing to sample, of the hybrid), "
                   "calibrated by the prior's shipped factor where it was fitted for that run")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="a `recon calibrate` file: intervals x ± c·(std + offset) with its conformal factor c")


def _add_calibrate(sub, METHODS: dict) -> None:
    """The ``recon calibrate`` subcommand."""
    cal = sub.add_parser("calibrate", help="fit the interval factor on reference studies (known images)",
                         description="Each reference image is measured by simulation (--task, noise) and "
                         "reconstructed (--method, --particles); the conformal quantile of |error|/std inside the "
                         "body is the factor c that makes x ± c·std cover --coverage of pixels. Apply it with "
                         "`recon reconstruct --uncertainty --calibration FILE`. Calibrate 2D slices and 3D "
                         "volumes separately: the file records which it was fitted on.")
    cal.add_argument("-i", "--input", required=True, help="folder of reference studies, or a .csv manifest")
    cal.add_argument("-o", "--output", required=True, help="calibration file (.json)")
    cal.add_argument("--coverage", type=float, default=0.9, help="nominal coverage of the intervals (default 0.9)")
    cal.add_argument("--offset", default="0", help="added to the std: intervals x ± c·(std + offset), in the "
                     "reconstruction's domain units; 'balanced' picks the one that covers the studies most evenly "
                     "(default 0)")
    cal.add_argument("--method", choices=list(METHODS), default=None, metavar="METHOD",
                     help="a method with a spread (several particles or samples); default: 16 runs of the "
                     "recommended method, as `recon reconstruct --uncertainty` runs it")
    cal.add_argument("--prior", default=None, help="default (by modality), default-ct, default-mri or a prior folder")
    cal.add_argument("--steps", type=int, default=None)
    cal.add_argument("--particles", type=int, default=None)
    _task_args(cal)
    _config_args(cal)
    _common(cal)
    cal.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from recon.calibrate import calibrate_studies

    cfg = _load_config(args)
    if not cfg.get("task"):
        raise UserError("calibrate needs --task (the reference images are measured by simulation)")
    offset = str(cfg.get("offset", "0"))
    try:
        offset = offset if offset == "balanced" else float(offset)
    except ValueError:
        raise UserError(f"--offset: a number >= 0 or 'balanced' expected, got {offset!r}") from None
    summary = calibrate_studies(cfg["input"], cfg["output"], _settings(cfg), coverage=float(cfg.get("coverage", 0.9)),
                                overwrite=bool(cfg.get("overwrite", False)), offset=offset)
    _print(summary, args.json, [f"wrote {summary['output']}: factor {summary['factor']:.3f} for "
                                f"{summary['coverage']:.0%} coverage over {summary['studies']} studies "
                                f"({summary['coverage_on_references']:.1%} of their body pixels covered)"])
    return 0


def _add_reconstruct(sub, METHODS: dict) -> None:
    """The ``recon reconstruct`` subcommand."""
    rec = sub.add_parser("reconstruct", help="reconstruct a measurement file (or an image with --task)")
    rec.add_argument("-i", "--input", default=None, help="measurement file (.npz), or an image with --task")
    rec.add_argument("-o", "--output", default=None,
                     help="reconstruction: .nii.gz/.nii/.npy/.png, or a folder (no suffix) for a DICOM series")
    rec.add_argument("--method", choices=list(METHODS), default=None, metavar="METHOD",
                    help=f"one of {', '.join(METHODS)} (`recon methods` describes them); default: the recommended "
                    f"method of the task's modality ({_recommended_text()})")
    rec.add_argument("--prior", default=None, help="default (by modality), default-ct, default-mri or a prior folder")
    rec.add_argument("--steps", type=int, default=None)
    rec.add_argument("--particles", type=int, default=None)
    rec.add_argument("--reference", default=None, help="ground-truth image: PSNR/SSIM, error map, DICOM headers")
    rec.add_argument("--format", choices=["dicom"], default=None, help="write a derived DICOM series")
    rec.add_argument("--anonymize", action="store_true", help="DICOM basic de-identification of written DICOM")
    rec.add_argument("--checkpoint", default=None,
                     help="long-running methods (" + ", ".join(m for m, spec in METHODS.items() if spec.long_running)
                     + "): save the sampler state to this file every --checkpoint-every steps")
    rec.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 10)")
    rec.add_argument("--resume", action="store_true", help="continue from --checkpoint after an interruption")
    rec.add_argument("--max-memory", default=None,
                     help="activation memory per network call, e.g. 8GB or 512MB (slices go through in chunks)")
    _uncertainty_args(rec)
    _task_args(rec)
    _config_args(rec)
    _common(rec)
    rec.set_defaults(func=cmd_reconstruct)


def _add_batch(sub, METHODS: dict) -> None:
    """The ``recon batch`` subcommand."""
    bt = sub.add_parser("batch", help="reconstruct every study of a folder or CSV manifest (one subfolder each)",
                        description="Every study (a DICOM series folder, a NIfTI file, or a manifest row "
                        "input,output[,options...]) reconstructed as `recon reconstruct` would, into OUTDIR/<study>/; "
                        "results table OUTDIR/batch-results.{csv,json}; a rerun skips finished studies. Exit status "
                        "1 if a study failed.")
    bt.add_argument("-i", "--input", default=None, help="folder of studies, or a .csv manifest")
    bt.add_argument("-o", "--output", default=None, help="output folder (one subfolder per study)")
    bt.add_argument("--method", choices=list(METHODS), default=None, metavar="METHOD",
                    help=f"one of {', '.join(METHODS)} (`recon methods` describes them); default: the recommended "
                    f"method of the task's modality ({_recommended_text()})")
    bt.add_argument("--prior", default=None, help="default (by modality), default-ct, default-mri or a prior folder")
    bt.add_argument("--steps", type=int, default=None)
    bt.add_argument("--particles", type=int, default=None)
    bt.add_argument("--format", choices=["dicom"], default=None, help="write derived DICOM series")
    bt.add_argument("--anonymize", action="store_true", help="DICOM basic de-identification of written DICOM")
    bt.add_argument("--engine", choices=["local", "ray"], default=None,
                    help="local (this process or a process pool, default) or ray (pip install diffrecon[ray])")
    bt.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    bt.add_argument("--workers", type=int, default=None, help="parallel workers, each loading the prior once (1)")
    bt.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cores / workers)")
    bt.add_argument("--retries", type=int, default=None,
                    help="retries of a study after an unexpected error or a lost worker (default 1; user errors "
                    "and divergence are not retried)")
    bt.add_argument("--num-parts", type=int, default=None, help="split the studies into N parts (by name hash)")
    bt.add_argument("--part-id", type=int, default=None, help="run part K (0 .. N-1), e.g. $SLURM_ARRAY_TASK_ID")
    _uncertainty_args(bt)
    _task_args(bt)
    _config_args(bt)
    _common(bt)
    bt.set_defaults(func=cmd_batch)


def _add_prepare_prior_data(sub) -> None:
    """The ``recon prepare-prior-data`` subcommand (``recon.priors.recipe``)."""
    from recon.priors.recipe import add_arguments

    pp = sub.add_parser("prepare-prior-data", help="gather the offline training data of the built-in priors",
                        description="Fetch (with --fetch: apt-get download + dpkg -x, no install) and prepare the "
                        "offline real CT or MR images the built-in priors train on: deduplicated, derived maps "
                        "dropped, held-out files kept apart, a manifest with each file's source, licence and role. "
                        "`recon train-prior --preset default-ct` reads OUT (set RECON_PRIOR_DATA to its parent).")
    add_arguments(pp)
    pp.set_defaults(func=_prepare_prior_data, quiet=False, verbose=False, json=False)


def _prepare_prior_data(args) -> int:
    from recon.priors.recipe import run

    return run(args)


def _add_train_prior(sub) -> None:
    """The ``recon train-prior`` subcommand."""
    tp = sub.add_parser(
        "train-prior",
        help="train a 2D diffusion prior on DICOM / NIfTI / PNG / TIFF / NumPy files",
        description="Train a slice diffusion prior (EDM recipe, EMA, checkpoints, exact --resume). "
        "`--preset default-ct` / `default-mri` are the recipes of the built-in priors.",
    )
    tp.add_argument("-i", "--input", nargs="*", default=[], help="training files or folders (searched recursively)")
    tp.add_argument("-o", "--output", required=True, help="run folder: checkpoint.pt, prior/, sample grids")
    tp.add_argument("--preset", choices=["default-ct", "default-mri"], help="use a built-in recipe (data and settings)")
    tp.add_argument("--modality", choices=["ct", "mri"], default="ct")
    tp.add_argument("--steps", type=int, help="total training steps")
    tp.add_argument("--batch-size", type=int)
    tp.add_argument("--crop", type=int, help="square crop size in pixels")
    tp.add_argument("--lr", type=float)
    tp.add_argument("--lr-decay", choices=["constant", "cosine"],
                    help="after the warm-up: constant (default) or a cosine to 0 at --steps")
    tp.add_argument("--checkpoint-every", type=int)
    tp.add_argument("--sample-every", type=int, help="write a PNG grid of samples every N steps (0: never)")
    tp.add_argument("--seed", type=int)
    tp.add_argument("--on-error", choices=["skip", "stop"], help="an unreadable training file: skip it or stop")
    tp.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    tp.add_argument("--init-from", help="start from the weights of a recon prior folder (warm start)")
    tp.add_argument("--focus-hu", type=float, nargs=2, metavar=("LOW", "HIGH"),
                    help="CT: weigh the loss more where the noisy input lies in this HU range (e.g. -100 200)")
    tp.add_argument("--focus-weight", type=float, help="the extra loss weight inside --focus-hu (0: off)")
    tp.add_argument("--scale-range", type=float, nargs=2, metavar=("LO", "HI"),
                    help="random zoom of each crop, source pixels per output pixel (log-uniform; above 1 zooms out, "
                         "area-averaged: coarser, larger views)")
    tp.add_argument("--device", default="cpu")
    tp.add_argument("--threads", type=int, help="CPU threads for torch")
    tp.set_defaults(func=_train_prior_command, quiet=False, verbose=False)


def _add_train_restorer(sub) -> None:
    """The ``recon train-restorer`` subcommand."""
    from recon.restoration.degradations import DEGRADATIONS

    tr = sub.add_parser(
        "train-restorer",
        help="train a few-step restoration diffusion model (ResShift or RDDM) on clean images",
        description="Train a ResShift or RDDM restorer on clean DICOM / NIfTI / PNG / TIFF / NumPy images, degraded on "
        "the fly by recon's operators (EMA, checkpoints, exact --resume). `--preset default-lowdose-ct` is the "
        "recipe of the built-in restorer.",
    )
    tr.add_argument("-i", "--input", nargs="*", default=[], help="clean training files or folders (recursive)")
    tr.add_argument("-o", "--output", required=True, help="run folder: checkpoint.pt, restorer/, sample grids")
    tr.add_argument("--preset", choices=["default-lowdose-ct"], help="use the built-in restorer's recipe")
    tr.add_argument("--model", choices=["resshift", "rddm"], help="default resshift")
    tr.add_argument("--task", choices=list(DEGRADATIONS), help="degradation to undo (default lowdose-ct)")
    tr.add_argument("--photons", type=float, help="CT: photons per detector element (lowdose-ct default 5e4)")
    tr.add_argument("--views", type=int, help="CT: views over 180° (lowdose-ct 180, sparse-view-ct 60)")
    tr.add_argument("--factor", type=int, help="super-resolution factor (default 4)")
    tr.add_argument("--modality", choices=["ct", "mri"], help="intensity normalisation (default ct: HU window)")
    tr.add_argument("--steps", type=int, help="total training steps")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--crop", type=int, help="square crop size in pixels")
    tr.add_argument("--lr", type=float)
    tr.add_argument("--checkpoint-every", type=int)
    tr.add_argument("--sample-every", type=int, help="write a PNG grid (degraded/restored/clean) every N steps")
    tr.add_argument("--diffusion-steps", type=int, help="T: ResShift chain length (15) or RDDM training steps (1000)")
    tr.add_argument("--sampling-steps", type=int, help="default sampler steps (ResShift: T; RDDM: 10)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--on-error", choices=["skip", "stop"], help="an unreadable training file: skip it or stop")
    tr.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    tr.add_argument("--init-from", help="start from the weights of a recon restorer folder (warm start)")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--threads", type=int, help="CPU threads for torch")
    tr.set_defaults(func=cmd_train_restorer, quiet=False, verbose=False)


def _add_restore(sub) -> None:
    """The ``recon restore`` subcommand."""
    rs = sub.add_parser("restore", help="restore a DICOM / NIfTI image with a trained restorer (ResShift or RDDM)")
    rs.add_argument("-i", "--input", default=None, help="DICOM series folder or file, NIfTI, NumPy, PNG/TIFF")
    rs.add_argument("-o", "--output", default=None,
                    help="restored image: .nii.gz/.nii/.npy/.png, or a folder (no suffix) for a DICOM series")
    rs.add_argument("--model", default=None, help="default (built-in low-dose CT restorer) or a restorer folder")
    rs.add_argument("--steps", type=int, default=None, help="sampler steps (model default: ResShift T, RDDM 10)")
    rs.add_argument("--eta", type=float, default=None, help="RDDM DDIM eta (default 0: deterministic)")
    rs.add_argument("--reference", default=None, help="ground-truth image: PSNR/SSIM and error map")
    rs.add_argument("--degrade", action="store_true",
                    help="simulation study: apply the model's own degradation first; the input is the reference")
    rs.add_argument("--chunk", type=int, default=None, help="slices per network call (default about 2^20 pixels)")
    rs.add_argument("--format", choices=["dicom"], default=None, help="write a derived DICOM series")
    rs.add_argument("--anonymize", action="store_true", help="DICOM basic de-identification of written DICOM")
    _series_args(rs)
    _config_args(rs)
    _common(rs)
    rs.set_defaults(func=cmd_restore)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
    from recon.datasets.io import ImageReadError, ImageWriteError
    from recon.pipeline import PipelineError
    from recon.samplers import SamplerDivergence
    from recon.tasks import TaskError

    try:
        return args.func(args)
    except (UserError, ImageReadError, ImageWriteError, PipelineError, TaskError, SamplerDivergence,
            FileNotFoundError, ValueError) as err:
        if args.verbose:
            raise
        message = _flagged(str(err).splitlines()[0]) if str(err) else type(err).__name__
        print(f"recon: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recon: interrupted", file=sys.stderr)
        return 130


def _train_prior_command(args) -> int:
    import dataclasses

    import torch

    from recon.priors.train import TrainConfig, default_ct_config, default_mri_config, train_prior

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        k: v
        for k, v in {
            "steps": args.steps, "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr,
            "checkpoint_every": args.checkpoint_every, "sample_every": args.sample_every, "seed": args.seed,
            "on_error": args.on_error, "init_from": args.init_from,
            "focus_hu": tuple(args.focus_hu) if args.focus_hu else None, "focus_weight": args.focus_weight,
            "lr_decay": args.lr_decay, "scale_range": tuple(args.scale_range) if args.scale_range else None,
        }.items()
        if v is not None
    }
    if args.preset:
        recipe = default_ct_config if args.preset == "default-ct" else default_mri_config
        cfg = recipe(args.output, device=args.device, **overrides)
        if args.input:
            cfg = dataclasses.replace(cfg, data=cfg.data + list(args.input))
    else:
        if not args.input:
            raise UserError("train-prior needs -i/--input files or folders (or --preset)")
        cfg = TrainConfig(data=list(args.input), out=args.output, modality=args.modality, device=args.device,
                          **overrides)
    logging.getLogger().setLevel(logging.INFO)
    summary = train_prior(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 130 if summary["interrupted"] else 0


def cmd_train_restorer(args) -> int:
    import dataclasses

    import torch

    from recon.restoration.train import PRESETS, RestorerConfig, train_restorer

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        k: v
        for k, v in {
            "model": args.model, "task": args.task, "modality": args.modality, "steps": args.steps,
            "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr, "checkpoint_every": args.checkpoint_every,
            "sample_every": args.sample_every, "diffusion_steps": args.diffusion_steps,
            "sampling_steps": args.sampling_steps, "seed": args.seed, "on_error": args.on_error,
            "init_from": args.init_from,
        }.items()
        if v is not None
    }
    task_params = {k: v for k, v in {"photons": args.photons, "views": args.views, "factor": args.factor}.items()
                   if v is not None}
    if task_params:
        overrides["task_params"] = task_params
    if args.preset:
        cfg = PRESETS[args.preset](args.output, device=args.device, **overrides)
        if args.input:
            cfg = dataclasses.replace(cfg, data=cfg.data + list(args.input))
    else:
        if not args.input:
            raise UserError("train-restorer needs -i/--input files or folders (or --preset)")
        cfg = RestorerConfig(data=list(args.input), out=args.output, device=args.device, **overrides)
    logging.getLogger().setLevel(logging.INFO)
    summary = train_restorer(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 130 if summary["interrupted"] else 0


def cmd_restore(args) -> int:
    from tqdm import tqdm

    from recon.restoration.files import restore_file

    cfg = _load_config(args)
    for key in ("input", "output"):
        if not cfg.get(key):
            raise UserError(f"restore needs --{key}")
    bar = tqdm(desc="restore", unit="step", file=sys.stderr, disable=args.quiet or not sys.stderr.isatty(),
               leave=False)
    try:
        report = restore_file(cfg["input"], cfg["output"], _settings(cfg), overwrite=bool(cfg.get("overwrite", False)),
                              callback=lambda info: bar.update(1), config=cfg)
    finally:
        bar.close()
    lines = [f"{report['model']} {report['task']}: {report['nfe']} network evaluations per slice, {report['slices']} "
             f"slice(s), {report['seconds']:.1f} s"]
    if "psnr" in report:
        lines.append(f"PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.3f} (input: {report['input']['psnr']:.2f} "
                     f"dB, {report['input']['ssim']:.3f})")
    lines += [f"  {k}: {v}" for k, v in report["outputs"].items()]
    _print(report, args.json, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
