"""The run loop every iterative sampler shares: clock, network-call count, per-step diagnostics and callback,
divergence checks, checkpoint and exact resume, and a uniform result.

A sampler reads like this (``docs/developer-guide.md`` has a whole one)::

    run = SamplerRun("my-method", prior, generator, callback, steps=len(sigmas) - 1, options=locals_options, y=y,
                     checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)
    x = (run.load(y.device) or {"x": x_init})["x"]              # resume where a checkpoint left off
    for i in range(run.start, run.steps):
        x = update(x, sigmas[i], sigmas[i + 1])                   # the algorithm
        run.step(i, sigmas[i + 1], residual, x=x, state={"x": x})  # check, record, commit, callback
    return run.result(x)

Checkpoints (``checkpoint=PATH``) are written atomically every ``checkpoint_every`` steps, at the end, and on
Ctrl-C (``run.interrupted()`` in an ``except KeyboardInterrupt``); they hold the committed tensors, the generator
state, the diagnostics so far, the NFE and seconds, the options and a fingerprint of ``y``, so that ``resume=True``
with the same options and measurements continues exactly (a mismatch is a one-line ``ValueError``).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections.abc import Callable

import torch

from recon.samplers.base import ReconstructionResult, check_bounded, check_finite
from recon.utils import jsonable

__all__ = ["CHECKPOINT_FORMAT", "SamplerRun"]

CHECKPOINT_FORMAT = "recon-sampler-checkpoint"
# a checkpoint's own entries; the sampler's committed state is stored beside them under its own names
_RESERVED = ("format", "version", "method", "options", "fingerprint", "step", "generator", "diagnostics", "nfe",
             "seconds")
log = logging.getLogger("recon.samplers")


def _fingerprint(y: torch.Tensor) -> list[float]:
    yd = y.detach().double()
    return [float(yd.sum()), float(yd.norm())]


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class SamplerRun:
    """Bookkeeping of one sampler run.

    Args:
        method: the method's name (messages, checkpoints, ``info``).
        prior: the prior (its ``nfe`` counter is read), or None.
        generator: the seeded generator (its state is checkpointed).
        callback: called with a copy of every step's record.
        steps: number of steps of the loop.
        options: the method's options (recorded in ``info``; a checkpoint must match them).
        y: the measurements (a checkpoint must match them).
        particles: particles / independent samples (``info``).
        checkpoint: a file to write the state to, or None.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint`` if it exists.
    """

    def __init__(self, method: str, prior, generator: torch.Generator | None, callback: Callable | None, *,
                 steps: int, options: dict | None = None, y: torch.Tensor | None = None, particles: int = 1,
                 checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 10, resume: bool = False):
        self.t0 = time.perf_counter()
        self.method, self.prior, self.generator, self.callback = method, prior, generator, callback
        self.steps, self.particles = int(steps), int(particles)
        self.options = json.loads(json.dumps(jsonable(options or {})))
        self.fingerprint = _fingerprint(y) if y is not None else []
        self.path = None if checkpoint is None else os.fspath(checkpoint)
        self.every = int(checkpoint_every)
        if self.every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if resume and self.path is None:
            raise ValueError("resume=True needs checkpoint=PATH")
        if self.path is not None and generator is None:
            raise ValueError("checkpointing needs a seeded torch.Generator (generator=...) to resume exactly")
        self.resume = bool(resume)
        self.nfe0 = getattr(prior, "nfe", 0)
        self.nfe_offset, self.seconds_offset = 0, 0.0
        self.diagnostics: list[dict] = []
        self.start, self.resumed_from = 0, None
        self.committed: tuple | None = None

    # -- bookkeeping -----------------------------------------------------------------------------------
    def nfe(self) -> int:
        """Network evaluations since the run began (including those before a resume)."""
        return getattr(self.prior, "nfe", 0) - self.nfe0 + self.nfe_offset

    def seconds(self) -> float:
        """Seconds since the run began (including those before a resume)."""
        return time.perf_counter() - self.t0 + self.seconds_offset

    def step(self, i: int, sigma: float, residual: float, x: torch.Tensor | None = None,
             x_sigma: float | None = None, hint: str = "reduce the step size", state: dict | None = None,
             **extra) -> dict:
        """Finish step ``i``: raise ``SamplerDivergence`` if ``x`` is non-finite or, given its noise level
        ``x_sigma``, runs away (beyond ``DIVERGENCE_BOUND · (1 + x_sigma)``; ``reconstruct`` checks every diffusion
        method's output so); record ``sigma``, ``residual`` and ``extra``; commit ``state`` (what a resume after
        this step starts from; saved when due); then pass the record to the callback."""
        if x is not None and x_sigma is None:
            check_finite(x.detach(), self.method, i, hint)
        elif x is not None:
            check_bounded(x.detach(), self.method, i, x_sigma, hint)
        record = {"step": int(i), "steps": self.steps, "sigma": float(sigma), "residual": float(residual),
                  "nfe": int(self.nfe()), "seconds": self.seconds(), **extra}
        self.diagnostics.append(record)
        if state is not None:
            self.commit(i + 1, state)
        if self.callback is not None:
            self.callback(dict(record))
        return record

    def result(self, x: torch.Tensor, *, samples: torch.Tensor | None = None, weights: torch.Tensor | None = None,
               std: torch.Tensor | None = None, **info) -> ReconstructionResult:
        """The ``ReconstructionResult`` with the uniform ``info`` (method, steps, particles, nfe, seconds, options,
        resumed_from) and ``info``'s extra entries."""
        summary = {"method": self.method, "steps": self.steps, "particles": self.particles, "nfe": self.nfe(),
                   "seconds": self.seconds(), "options": self.options, **info}
        if self.resumed_from is not None:
            summary["resumed_from"] = self.resumed_from
        return ReconstructionResult(x=x, samples=samples, weights=weights, std=std, diagnostics=self.diagnostics,
                                    info=summary)

    # -- checkpoint and resume -------------------------------------------------------------------------
    def load(self, device: torch.device | str) -> dict | None:
        """The committed state of a checkpoint to resume from (tensors on ``device``), or None to start afresh."""
        if not self.resume or not os.path.isfile(self.path):
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)  # the generator state stays on CPU
        self._check(state)
        self.generator.set_state(state["generator"])
        self.start = self.resumed_from = int(state["step"])
        self.diagnostics = json.loads(state["diagnostics"])
        self.nfe_offset, self.seconds_offset = int(state["nfe"]), float(state["seconds"])
        return _to({k: v for k, v in state.items() if k not in _RESERVED}, device)

    def _check(self, state) -> None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.path}: not a recon sampler checkpoint")
        if state.get("method") != self.method:
            raise ValueError(f"{self.path}: a checkpoint of {state.get('method')!r}, not of {self.method!r}")
        saved = json.loads(state["options"])
        mismatched = [k for k in sorted(set(saved) | set(self.options)) if saved.get(k) != self.options.get(k)]
        if mismatched:
            detail = ", ".join(f"{k}: {saved.get(k)!r} there, {self.options.get(k)!r} now" for k in mismatched[:4])
            raise ValueError(f"{self.path}: the checkpoint was written with different options ({detail}); run with "
                             "the same options, or remove the file / use resume=False to start afresh")
        fp = [float(v) for v in state["fingerprint"]]
        if len(fp) != len(self.fingerprint) or not all(
                math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(fp, self.fingerprint, strict=True)):
            raise ValueError(f"{self.path}: the checkpoint was written for different measurements y")

    def commit(self, steps_done: int, tensors: dict) -> None:
        """The state after ``steps_done`` completed steps (what a checkpoint resumes from); written every
        ``checkpoint_every`` steps and after the last."""
        if self.path is None:
            return
        if clash := sorted(set(tensors) & set(_RESERVED)):
            raise ValueError(f"a sampler state may not use the checkpoint's own names {clash}")
        self.committed = (steps_done, tensors, self.generator.get_state(), self.nfe(), self.seconds())
        if steps_done > self.start and (steps_done % self.every == 0 or steps_done == self.steps):
            self.save()

    def save(self) -> None:
        """Write the committed state (atomically)."""
        if self.path is None or self.committed is None:
            return
        from recon.datasets.io import atomic_write_bytes

        steps_done, tensors, gen_state, nfe, seconds = self.committed
        state = {"format": CHECKPOINT_FORMAT, "version": 1, "method": self.method,
                 "options": json.dumps(self.options), "fingerprint": self.fingerprint, "step": int(steps_done),
                 "generator": gen_state, "diagnostics": json.dumps(jsonable(self.diagnostics[:steps_done])),
                 "nfe": int(nfe), "seconds": float(seconds), **tensors}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(buf.getvalue(), self.path, overwrite=True)

    def interrupted(self) -> None:
        """Ctrl-C (or a callback raising ``KeyboardInterrupt``): write the last committed state."""
        if self.path is not None and self.committed is not None:
            self.save()
            log.warning("%s interrupted after %d steps; checkpoint written to %s (continue with resume=True)",
                        self.method, self.committed[0], self.path)
