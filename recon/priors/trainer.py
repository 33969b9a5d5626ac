"""The one training loop of ``recon train-prior`` and ``recon train-restorer``: Adam with a linear warm-up, an EMA of
the weights, one seeded generator for every random draw, checkpoints every N steps and on Ctrl-C, exact resume.

What differs between the two (the loss of a batch, what is exported, what a sample grid shows) comes in as
callables; everything else is here once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["LR_DECAYS", "Trainer", "learning_rate"]

log = logging.getLogger("recon.train")


LR_DECAYS = ("constant", "cosine")


def learning_rate(step: int, peak: float, warmup: int, total: int, decay: str = "constant") -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up to ``peak`` over ``warmup`` steps, then
    ``peak`` (``"constant"``) or a cosine from ``peak`` down to 0 at ``total`` (``"cosine"``)."""
    rate = peak * min(1.0, (step + 1) / max(1, warmup))
    if decay == "cosine" and step >= warmup:
        rate *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return rate


@dataclass
class Trainer:
    """A training run's state and loop.

    Attributes:
        net: the network being trained.
        ema: its exponential moving average (what is exported).
        opt: the optimiser of ``net``.
        gen: the one seeded generator of the data stream, noise levels and noise (checkpointed).
        ckpt_path: ``RUN/checkpoint.pt``.
        config: the run's configuration (a dataclass; saved with every checkpoint, compared on resume).
        lr: peak learning rate (reached after ``lr_warmup`` steps).
        lr_warmup: steps of the linear warm-up.
        lr_decay: ``LR_DECAYS``: after the warm-up, constant or a cosine to 0 at ``total_steps``.
        total_steps: the run's planned steps (the cosine's end).
        ema_decay: EMA decay (``min(ema_decay, (1 + step)/(10 + step))`` early on).
        grad_clip: gradient-norm clip (0: none).
        step: completed steps.
        losses: the loss of every completed step.
    """

    net: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    ckpt_path: Path
    config: object
    lr: float
    lr_warmup: int
    ema_decay: float
    grad_clip: float = 0.0
    lr_decay: str = "constant"
    total_steps: int = 0
    step: int = 0
    losses: list = field(default_factory=list)

    @classmethod
    def start(cls, cfg, kind: str, resume: bool, defaults: object, free: tuple[str, ...]) -> tuple[Trainer, dict]:
        """A run of ``cfg`` (a prior's or a restorer's configuration: ``out``, ``device``, ``seed``, ``lr``,
        ``lr_warmup``, ``ema_decay``, optional ``grad_clip``, ``init_from`` and ``architecture()``): the network
        seeded from ``seed`` (or warm-started from ``init_from``), then its checkpoint loaded when ``resume``.
        Returns the trainer and the architecture."""
        from recon.priors.train import network_and_ema

        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)  # network initialisation
        arch = cfg.architecture()
        # a warm start (e.g. continuing a built-in model in a new session); a resume loads its checkpoint instead
        net, ema = network_and_ema(arch, device, None if resume else cfg.init_from, kind)
        trainer = cls(net, ema, torch.optim.Adam(net.parameters(), lr=cfg.lr), torch.Generator().manual_seed(cfg.seed),
                      out / "checkpoint.pt", cfg, cfg.lr, cfg.lr_warmup, cfg.ema_decay, getattr(cfg, "grad_clip", 0.0),
                      getattr(cfg, "lr_decay", "constant"), int(cfg.steps))
        if resume:
            trainer.resume(device, defaults, free)
        return trainer, arch

    def resume(self, device: torch.device, defaults: object, free: tuple[str, ...]) -> None:
        """Load ``ckpt_path`` (FileNotFoundError if absent); ``ValueError`` if the configuration differs in a
        field outside ``free`` (a field an older checkpoint lacks counts as its value in ``defaults``)."""
        if not self.ckpt_path.is_file():
            raise FileNotFoundError(f"{self.ckpt_path}: no checkpoint to resume from (run without --resume first)")
        state = torch.load(self.ckpt_path, map_location=device, weights_only=True)
        saved = json.loads(state["config"])
        before = json.loads(json.dumps(dataclasses.asdict(defaults)))
        current = json.loads(json.dumps(dataclasses.asdict(self.config)))
        mismatched = [k for k, v in current.items() if k not in free and v != saved.get(k, before[k])]
        if mismatched:
            raise ValueError(f"{self.ckpt_path}: resuming with a different configuration ({', '.join(mismatched)})")
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self.step, self.losses = int(state["step"]), list(state["losses"])

    def save(self) -> None:
        """Write the checkpoint (atomically)."""
        from recon.priors.train import atomic_torch_save

        atomic_torch_save({"model": self.net.state_dict(), "ema": self.ema.state_dict(),
                           "optimizer": self.opt.state_dict(), "generator": self.gen.get_state(), "step": self.step,
                           "losses": self.losses, "config": json.dumps(dataclasses.asdict(self.config))},
                          self.ckpt_path)

    def _update(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at step {self.step}; lower --lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip and self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.opt.step()
        with torch.no_grad():
            decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
            for pe, pn in zip(self.ema.parameters(), self.net.parameters(), strict=True):
                pe.lerp_(pn, 1 - decay)
        self.step += 1
        self.losses.append(loss.item())

    def run(self, loss_of_step: Callable[[], torch.Tensor], *, end: int, total: int, desc: str, progress: bool,
            log_every: int, checkpoint_every: int, sample_every: int, on_save: Callable[[], None],
            on_samples: Callable[[], None], on_step: Callable[[int], None] | None = None) -> dict:
        """Train until ``end`` steps: ``loss_of_step()`` draws a batch and returns its loss; ``on_save`` exports
        after every checkpoint; ``on_samples`` writes a sample grid every ``sample_every`` steps; ``on_step(step)``
        runs after each step. Returns ``interrupted`` and ``seconds_per_step``."""
        from tqdm import tqdm

        bar = tqdm(total=total, initial=self.step, disable=not progress or not sys.stderr.isatty(), file=sys.stderr,
                   desc=desc, unit="step")
        t0, start, interrupted = time.perf_counter(), self.step, False
        try:
            while self.step < end:
                for group in self.opt.param_groups:
                    group["lr"] = learning_rate(self.step, self.lr, self.lr_warmup, self.total_steps, self.lr_decay)
                self._update(loss_of_step())
                bar.update(1)
                if self.step % log_every == 0:
                    recent = float(np.mean(self.losses[-log_every:]))
                    bar.set_postfix(loss=f"{recent:.4f}")
                    log.info("step %d loss %.5f (%.2f s/step)", self.step, recent,
                             (time.perf_counter() - t0) / max(1, self.step - start))
                if on_step is not None:
                    on_step(self.step)
                if self.step % checkpoint_every == 0 or self.step == end:
                    self.save()
                    on_save()
                if sample_every and self.step % sample_every == 0:
                    on_samples()
        except KeyboardInterrupt:
            interrupted = True
            self.save()
            on_save()
            log.warning("interrupted at step %d; checkpoint saved, continue with --resume", self.step)
        finally:
            bar.close()
        return {"interrupted": interrupted, "seconds_per_step": (time.perf_counter() - t0) / max(1, self.step - start)}
