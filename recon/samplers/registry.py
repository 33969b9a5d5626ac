"""The method registry: every reconstruction method declared once, with what it needs and offers.

The command line (choices, help, option checks, ``--checkpoint``), ``recon demo``, the pipeline (does the method
need a prior?), ``recon batch`` (an option error is never retried) and the README's method table all read
``METHODS``. A method's options are its sampler function's keyword arguments: their types come from the type
hints, their defaults from the signature and their one-line help from the docstring's ``Args:`` section, so they
are declared once, where they are used. Adding a sampler: one file ``recon/samplers/<name>.py`` with a function
``sample_<name>`` and one ``MethodSpec`` line below (``docs/developer-guide.md``).
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

__all__ = ["COMMON_ARGUMENTS", "METHODS", "RECOMMENDED", "RECOMMENDED_BY_TASK", "RECOMMENDED_FOR_VOLUMES",
           "TUNED_OPTIONS", "UNCERTAINTY_SAMPLES", "MethodSpec", "OptionError", "OptionSpec", "get_method",
           "markdown_table", "modality_options", "recommended_method", "sampler_settings", "spread_method"]

# every sampler takes these; they are ``reconstruct``'s own arguments, not method options
COMMON_ARGUMENTS = ("physics", "y", "prior", "sigma_y", "steps", "particles", "generator", "callback")


class OptionError(ValueError):
    """An unknown method, or an unknown or ill-typed option: the message names the valid choices."""


@dataclass(frozen=True)
class OptionSpec:
    """One keyword option of a method: name, type hint (as written), default and a one-line description."""

    name: str
    hint: str
    default: object
    help: str

    def accepts(self, value: object, resolved: object) -> bool:
        """Whether ``value`` fits the option's resolved type hint (unknown or untyped hints accept anything)."""
        return _fits(value, resolved)


@dataclass(frozen=True)
class MethodSpec:
    """A reconstruction method and its capabilities.

    Attributes:
        name: the name users type (``--method NAME``, ``reconstruct(..., method=NAME)``).
        module: the module of ``recon.samplers`` that holds the sampler (a dotted path: any importable module).
        function: the sampler function, ``sample_<name>(physics, y, prior, *, sigma_y, steps, particles,
            generator, callback, **options)``.
        summary: what it is, in one line (the README's method table and ``--help`` show it).
        needs_prior: whether it needs a diffusion prior (``analytic`` and ``tv`` do not).
        dims: spatial dimensions it accepts (2: images, 3: volumes).
        complex_data: whether it accepts complex images (two channels, e.g. measured k-space).
        long_running: supports ``checkpoint`` / ``checkpoint_every`` / ``resume`` (``--checkpoint``).
        implies: options the name sets (given options override them), e.g. ``dds3d``'s coupling.
        conditional: whether it uses the measurements (the unconditional baselines only borrow their shape).
        family: ``classical``, ``diffusion``, ``particles`` or ``deepinv`` (the README groups the table by it).
        weighted_data: whether the pipeline whitens the data by its noise model where it has per-entry variances
            (Beer–Lambert CT: each ray by its inverse post-log variance, ``recon.tasks.weighted_problem``).
    """

    name: str
    module: str
    function: str
    summary: str
    needs_prior: bool = True
    dims: tuple[int, ...] = (2, 3)
    complex_data: bool = False
    long_running: bool = False
    implies: Mapping[str, object] = field(default_factory=dict)
    conditional: bool = True
    family: str = "diffusion"
    weighted_data: bool = True

    @cached_property
    def sampler(self) -> Callable:
        """The sampler function (imported on first use)."""
        module = self.module if "." in self.module else f"recon.samplers.{self.module}"  # dotted: outside recon
        return getattr(importlib.import_module(module), self.function)

    @cached_property
    def options(self) -> dict[str, OptionSpec]:
        """The method's options, from the sampler's signature and docstring."""
        helps = _docstring_args(self.sampler.__doc__ or "")
        out = {}
        for p in inspect.signature(self.sampler).parameters.values():
            if p.name in COMMON_ARGUMENTS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            hint = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            default = None if p.default is inspect.Parameter.empty else p.default
            out[p.name] = OptionSpec(p.name, "" if p.annotation is inspect.Parameter.empty else hint,
                                     self.implies.get(p.name, default), _resolve_help(self.sampler, p.name, helps))
        return out

    @cached_property
    def open_options(self) -> bool:
        """The sampler takes ``**options`` it passes on (an ensemble's base method checks them)."""
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(self.sampler).parameters.values())

    @cached_property
    def _hints(self) -> dict:
        try:
            return typing.get_type_hints(self.sampler)
        except Exception:  # an unresolvable annotation: accept anything for it
            return {}

    def defaults(self) -> dict:
        """Default ``steps`` and ``particles`` of the sampler (``None`` where it has none)."""
        params = inspect.signature(self.sampler).parameters
        return {k: (params[k].default if k in params else None) for k in ("steps", "particles")}

    def check_options(self, options: Mapping[str, object]) -> dict:
        """``options`` checked against the method's: an unknown name or a value of the wrong type raises
        ``OptionError`` naming the valid options; returns the options with the name's implied ones filled in."""
        valid = self.options
        for key, value in options.items():
            if key not in valid and not self.open_options:
                names = ", ".join(valid) or "none"
                raise OptionError(f"method {self.name!r} has no option {key!r} (its options: {names})")
            if key in valid and not valid[key].accepts(value, self._hints.get(key)):
                raise OptionError(f"method {self.name!r}: option {key!r} expects {valid[key].hint or 'a value'}, "
                                  f"got {value!r}")
        return {**self.implies, **options}


_ENTRY = re.compile(r"^(\s+)((?:\w+(?:\s*\([^)]*\))?\s*,\s*)*\w+(?:\s*\([^)]*\))?):\s*(.*)$")


def _docstring_args(doc: str) -> dict[str, str]:
    """Each entry of a Google-style ``Args:`` section (``name: text`` or ``a, b, c: text`` for a group), its
    continuation lines joined."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return {}
    entries: list[tuple[list[str], list[str]]] = []
    indent = None
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith(" "):
            break
        m = _ENTRY.match(line)
        if m and (indent is None or len(m.group(1)) == indent):
            indent = len(m.group(1))
            names = [re.sub(r"\s*\(.*", "", n).strip() for n in m.group(2).split(",")]
            entries.append((names, [m.group(3).strip()]))
        elif entries and line.strip():
            entries[-1][1].append(line.strip())
    return {name: " ".join(text) for names, text in entries for name in names}


def _resolve_help(sampler: Callable, name: str, helps: dict[str, str]) -> str:
    """An option's help; ``as ``sample_other`` `` (an option shared with another sampler of the same module) is
    looked up there."""
    text = helps.get(name, "")
    m = re.match(r"^as ``(sample_\w+)``", text)
    other = getattr(importlib.import_module(sampler.__module__), m.group(1), None) if m else None
    if other is not None and other is not sampler:
        return _docstring_args(other.__doc__ or "").get(name, text)
    return text


def _fits(value: object, hint: object) -> bool:
    """A small runtime check of ``value`` against a type hint: builtins, unions/optionals, literals, tuples and
    lists; anything else (tensors, callables, unresolved hints) is accepted."""
    if hint is None or hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, (tuple, list))
    return True


def _spec(name: str, module: str, function: str, summary: str, **kw) -> tuple[str, MethodSpec]:
    return name, MethodSpec(name, module, function, summary, **kw)


# dds3d: DDS with the anchored TV-z coupling (docs/methods/dds.md): each step solves
# min ½‖Ax − y‖² + ρ/2‖x − x̂0‖² + λ‖D_z x‖₁ afresh (5 ADMM iterations from z = u = 0), λ = 0.024 ρ
_DDS3D = {"tv_weight": None, "tv_threshold": 0.024, "gamma": "rho", "admm_persistent": False, "admm_iters": 5}

METHODS: dict[str, MethodSpec] = dict([
    _spec("dps", "dps", "sample_dps", "Diffusion Posterior Sampling: a gradient step on ‖y − A x̂0‖ per level"),
    _spec("red-diff", "reddiff", "sample_reddiff", "RED-diff: variational, denoiser residuals as a regulariser"),
    _spec("smc", "smc", "sample_smc", "weighted particles (TDS twisting or AFDPS weights), ESS-triggered resampling",
          family="particles"),
    _spec("analytic", "baselines", "sample_analytic", "FBP / FDK for CT, zero-filled for MRI, else the pseudo-inverse",
          needs_prior=False, complex_data=True, family="classical", weighted_data=False),
    # tv stays unweighted: on whitened low-dose CT its discrepancy rule picks λ 4× below the oracle (docs/methods/tv.md)
    _spec("tv", "baselines", "sample_tv", "least squares with a total-variation penalty (Chambolle–Pock)",
          needs_prior=False, complex_data=True, family="classical", weighted_data=False),
    _spec("ddpm", "baselines", "sample_unconditional_ddpm", "the prior alone, ancestral sampling (a baseline)",
          conditional=False),
    _spec("ddim", "baselines", "sample_unconditional_ddim", "the prior alone, DDIM (a baseline)", conditional=False),
    _spec("deepinv-dps", "baselines", "sample_deepinv_dps", "deepinv's DPS run with the same prior", family="deepinv"),
    _spec("deepinv-diffpir", "baselines", "sample_deepinv_diffpir", "deepinv's DiffPIR run with the same prior",
          family="deepinv"),
    _spec("deepinv-ddrm", "baselines", "sample_deepinv_ddrm", "deepinv's DDRM run with the same prior (SVD operators)",
          family="deepinv"),
    _spec("diffusion-mbir", "volume", "sample_diffusion_mbir",
          "DiffusionMBIR: slice-wise predictor–corrector with a persistent ADMM TV-z coupling", long_running=True),
    _spec("dds", "volume", "sample_dds", "Decomposed Diffusion Sampling: DDIM with CG data consistency on x̂0",
          long_running=True),
    _spec("mbir3d", "volume", "sample_diffusion_mbir", "diffusion-mbir under its 3D name", long_running=True),
    _spec("dds3d", "volume", "sample_dds", "DDS with the anchored TV-z coupling (volumes)", long_running=True,
          implies=_DDS3D),
    _spec("diffpir", "diffpir", "sample_diffpir", "DiffPIR: a proximal data step weighted by σ_y, then re-noising"),
    _spec("daps", "daps", "sample_daps", "DAPS: Langevin on x0 given the ODE estimate and y, independent re-noising"),
    _spec("pigdm", "pigdm", "sample_pigdm", "ΠGDM: pseudo-inverse guidance, (r² AAᵀ + σ_y² I)⁻¹ by CG (linear A)"),
    _spec("hybrid", "hybrid", "sample_hybrid", "diffusion whose σ_y-weighted data step adds TV (in-plane, and z)"),
    _spec("ensemble", "ensemble", "sample_ensemble",
          "K independent runs of a base sampler (default the hybrid): mean and std", family="particles"),
    _spec("fps", "fps", "sample_fps", "Filtering Posterior Sampling: particle filter on noised measurements (linear A)",
          family="particles"),
    _spec("tempered-smc", "tsmc", "sample_tsmc", "tempered SMC: prior samples, adaptive likelihood tempering, MALA",
          family="particles"),
])


def get_method(name: str) -> MethodSpec:
    """The registry entry of ``name``; an unknown name raises ``OptionError`` listing the methods."""
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


# the method used when none is named, by what the operator measures (``physics.modality``), chosen from the
# evaluation matrix (benchmarks/README.md, "Evaluation matrix" and "Noise-aware samplers"): on held-out head CT the
# TV hybrid is the only diffusion method level with or above oracle-weighted TV (full range); on MRI slices the
# hybrid (with its MRI options) beats the best TV on 9 of 12 matrix cases, 8 of 10 unseen ones and all 9 cases of
# a real whole-head tuning slice, and loses one image at 8× by about 2 dB ("MRI: a real tuning slice"); the
# image-domain tasks (blur, inpainting, super-resolution): the hybrid, whose shipped options won on their tuning cases
# too (benchmarks/README.md, "Image-domain tasks"; DPS, their default before, ranked fourth of eight there)
RECOMMENDED: dict[str, str] = {"ct": "hybrid", "mri": "hybrid", "image": "hybrid"}
# modalities whose volumes ``(B, C, D, H, W)`` rank another method first: a whole MRI volume (anatomical.nii, 4×) is
# below TV with the hybrid (27.6 against 28.1 dB; benchmarks/README.md, "MRI: unseen accelerations and other masks")
RECOMMENDED_FOR_VOLUMES: dict[str, str] = {"mri": "tv"}
RECOMMENDED_BY_TASK: dict[str, str] = {}


def recommended_method(modality: str | None = None, task: str | None = None, volume: bool = False) -> str:
    """The default method for ``task`` (a ``recon.tasks`` name) or, without a task-specific choice, for an operator
    measuring ``modality`` (``"ct"``, ``"mri"``, ``"image"``; None or an unknown modality: the CT choice) on images,
    or on volumes with ``volume`` (``RECOMMENDED_FOR_VOLUMES``)."""
    if task in RECOMMENDED_BY_TASK:
        return RECOMMENDED_BY_TASK[task]
    key = str(modality).lower()
    if volume and key in RECOMMENDED_FOR_VOLUMES:
        return RECOMMENDED_FOR_VOLUMES[key]
    return RECOMMENDED.get(key, RECOMMENDED["ct"])


# a method's option defaults where a modality's own tuning cases chose other values than the function's defaults
# (which were chosen on CT slices): the TV hybrid on MRI, by the fixed rule of benchmarks/bench_hybrid_tuning_mri.py
# on frames of the held-out emri_small that no reported benchmark uses (docs/methods/hybrid.md, "MRI")
TUNED_OPTIONS: dict[str, dict[str, dict[str, object]]] = {"mri": {"hybrid": {"anchor": 1.0, "tv_factor": 0.1}}}


def modality_options(method: str, modality: str | None, options: Mapping[str, object] | None = None) -> dict:
    """``TUNED_OPTIONS`` of ``method`` for an operator measuring ``modality`` under ``options`` (the caller's,
    which win), as one dict; for an ``ensemble`` those of its ``base``."""
    options = dict(options or {})
    name = str(options.get("base", get_method("ensemble").options["base"].default)) if method == "ensemble" \
        else method
    tuned = TUNED_OPTIONS.get(str(modality).lower(), {}).get(name, {})
    return {**tuned, **options}


# samples per case when uncertainty maps are asked for and no method is named: the recommended method's ensemble
# of this size (the calibration benchmark's budget, benchmarks/README.md "Calibration")
UNCERTAINTY_SAMPLES = 16


# the method whose ensemble gives uncertainty maps where the recommended method has no prior to sample from (MRI
# volumes, whose default is TV): the hybrid's, the MRI slices' default, whose 16-run mean beats the best TV on 3 of
# 4 cases at 1 % noise (benchmarks/README.md, "MRI: the calibration `default-mri` ships")
SPREAD_BY_MODALITY: dict[str, str] = {"mri": "hybrid"}


def spread_method(name: str, modality: str | None = None) -> tuple[str, dict]:
    """The method to run for uncertainty maps instead of ``name``, and its options: ``name`` itself if it returns a
    spread (a particle method) or has no prior to sample from (TV, analytic: no spread at all), else an
    ``ensemble`` of independent runs of ``name``. ``name`` being the recommended method of ``modality`` without a
    prior (on images or volumes), the ensemble of ``SPREAD_BY_MODALITY[modality]`` instead (MRI volumes: the
    hybrid's, not TV)."""
    key = str(modality).lower()
    defaults = (RECOMMENDED.get(key), RECOMMENDED_FOR_VOLUMES.get(key))
    if key in SPREAD_BY_MODALITY and name in defaults and not get_method(name).needs_prior:
        name = SPREAD_BY_MODALITY[key]
    spec = get_method(name)
    if spec.family == "particles" or not spec.needs_prior:
        return name, {}
    return "ensemble", {"base": name}


def sampler_settings(info: Mapping[str, object]) -> dict[str, object]:
    """What decides a run's output besides the data: the sampler's scalar options with a default, at the values the
    run used (``info["options"]``, else the default), for the base method of an ensemble. A calibration records
    them and is applied only to runs with the same (``recon.samplers.uncertainty.builtin_calibration``), so that a
    changed default (say, the hybrid's ADMM penalty) does not inherit intervals fitted for the old one."""
    used = dict(info.get("options") or {})
    name = str(info.get("base") or info.get("method"))
    if name not in METHODS:
        return {}
    return {k: used.get(k, o.default) for k, o in get_method(name).options.items()
            if k != "base" and isinstance(o.default, (bool, int, float, str))}


def _modality_label(modality: str) -> str:
    return "blur, inpainting, super-resolution" if modality == "image" else modality.upper()


def markdown_table() -> str:
    """The README's method table, made from the registry (a test keeps the README equal to it)."""
    rows = ["| method | what it is | prior | checkpoint / resume | default for |", "|---|---|---|---|---|"]
    for name, spec in METHODS.items():
        default_for = ", ".join([_modality_label(m) + (" images" if RECOMMENDED_FOR_VOLUMES.get(m) else "")
                                 for m, v in RECOMMENDED.items() if v == name]
                                + [f"{_modality_label(m)} volumes" for m, v in RECOMMENDED_FOR_VOLUMES.items()
                                   if v == name]
                                + [f"`{t}`" for t, v in RECOMMENDED_BY_TASK.items() if v == name])
        rows.append(f"| `{name}` | {spec.summary} | {'yes' if spec.needs_prior else 'no'} | "
                    f"{'yes' if spec.long_running else ''} | {default_for} |")
    return "\n".join(rows)
