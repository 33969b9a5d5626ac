r"""Degradations made with ``recon``'s own operators: the paired data a restorer learns from, and ``--degrade``.

A :class:`Degradation` maps clean images in the model's normalised range ``[-1, 1]`` to degraded images of the
**same shape**, in the same range (clipped to ``[-1, 1]``, as the clean training images are), deterministically
given a seeded ``torch.Generator``. Images are ``(N, H, W)`` or ``(N, 1, H, W)`` float tensors on the CPU.

Tasks (``DEGRADATIONS``; defaults in ``DEFAULT_PARAMS``):

``lowdose-ct``
    HU → linear attenuation ``μ = 0.0192 (1 + HU/1000)`` mm⁻¹ (``recon.operators.MU_WATER_PER_MM``, ~70 keV; clipped at
    0), parallel-beam projection (``ParallelBeamCT``, ``views`` equally spaced over 180°, default 180 = the
    operator's own default of 1° steps), Beer–Lambert noise with ``photons`` per detector element
    (``TransmissionPoissonNoise``, default 5·10⁴, post-log), filtered back-projection with the ``filter`` window
    (default ``"hann"``), back to HU.
``sparse-view-ct``
    The same chain with ``views`` (default 60, as ``recon simulate``'s ``sparse-view-ct``) and ``photons``
    (default 1e5, as ``recon simulate``'s CT default; 0: noiseless).
``super-resolution``
    ``Downsampling`` by ``factor`` (default 4) in-plane with its Gaussian anti-alias filter (FWHM = one low-res
    pixel), then ``upsample`` interpolation (``"bicubic"``, default, or ``"bilinear"``; ``align_corners=False``,
    which puts low-res pixel ``i`` at high-res position ``i f + (f-1)/2``, the operator's own geometry) back to
    the input grid. Sizes not divisible by ``factor`` are reflect-padded and cropped back.

Geometry: the CT chains use square pixels of ``pixel_mm`` (default 0.7 mm, a typical adult-body CT pixel; the
training loader ``recon.priors.train.load_training_slices`` passes pixels without their spacing) and detector
elements of the same size; the noise level depends on it (longer paths, fewer photons). ``--degrade`` at inference
uses the model's recorded ``pixel_mm`` too, so that a simulation study sees the degradation the model was trained
on, whatever the file's own spacing.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F

from recon.operators.parameters import MU_WATER_PER_MM, PARAMETERS
from recon.priors.base import IntensityWindow

__all__ = ["DEFAULT_PARAMS", "DEGRADATIONS", "Degradation"]

DEGRADATIONS = ("lowdose-ct", "sparse-view-ct", "super-resolution")
DEFAULT_PARAMS: dict[str, dict] = {
    "lowdose-ct": {"photons": 5e4, "views": 180, "filter": "hann"},
    "sparse-view-ct": {"views": 60, "photons": 1e5, "filter": "hann"},
    "super-resolution": {"factor": 4, "upsample": "bicubic"},
}
CT_DEGRADATIONS = ("lowdose-ct", "sparse-view-ct")


class Degradation:
    """A named degradation with its parameters (see the module docstring).

    Args:
        task: one of ``DEGRADATIONS``.
        window: ``(low, high)`` physical window mapped to ``[-1, 1]`` (HU for the CT tasks; default
            ``(-1000, 1500)``, the built-in CT prior's window).
        pixel_mm: pixel size in mm for the CT tasks (default 0.7).
        **params: task parameters overriding ``DEFAULT_PARAMS[task]`` (``None`` keeps the default).
    """

    def __init__(self, task: str, window: tuple = (-1000.0, 1500.0), pixel_mm: float = 0.7, **params):
        if task not in DEGRADATIONS:
            raise ValueError(f"unknown degradation {task!r}; choose one of {', '.join(DEGRADATIONS)}")
        given = {k: v for k, v in params.items() if v is not None}
        if unknown := set(given) - set(DEFAULT_PARAMS[task]):
            raise ValueError(f"degradation {task!r} takes no {', '.join(sorted(unknown))} (it takes: "
                             f"{', '.join(DEFAULT_PARAMS[task])})")
        self.task = task
        self.params = {**DEFAULT_PARAMS[task], **given}
        self.window = IntensityWindow(float(window[0]), float(window[1]), "HU")
        self.pixel_mm = float(pixel_mm)
        if not (self.pixel_mm > 0 and math.isfinite(self.pixel_mm)):
            raise ValueError(f"pixel_mm must be a positive length in mm, got {pixel_mm!r}")
        p = self.params
        if task in CT_DEGRADATIONS:
            p["views"] = PARAMETERS["views"].check(p["views"])
            if task == "lowdose-ct" and not p["photons"]:
                raise ValueError("lowdose-ct needs photons > 0")
            p["photons"] = PARAMETERS["photons"].check(p["photons"]) if p["photons"] else None  # 0: noiseless
        else:
            p["factor"] = PARAMETERS["factor"].check(p["factor"])
            if p["upsample"] not in ("bicubic", "bilinear"):
                raise ValueError(f"upsample must be 'bicubic' or 'bilinear', got {p['upsample']!r}")
        self._operators: OrderedDict = OrderedDict()  # (H, W) -> operator, a few kept (system matrices are large)

    @property
    def is_ct(self) -> bool:
        return self.task in CT_DEGRADATIONS

    @property
    def stochastic(self) -> bool:
        """Whether two calls with different generators differ (noise)."""
        return self.is_ct and bool(self.params.get("photons"))

    def config(self) -> dict:
        """JSON description (model cards): task, parameters, pixel size, window, and the operators used."""
        ops = {"lowdose-ct": "ParallelBeamCT + TransmissionPoissonNoise + fbp", "sparse-view-ct":
               "ParallelBeamCT" + (" + TransmissionPoissonNoise" if self.params.get("photons") else "") + " + fbp",
               "super-resolution": "Downsampling (gaussian anti-alias) + interpolation"}[self.task]
        out = {"task": self.task, "params": dict(self.params), "operators": ops}
        if self.is_ct:  # super-resolution is linear with unit gain: it acts on normalised values directly
            out.update({"pixel_mm": self.pixel_mm, "window": [self.window.low, self.window.high], "unit": "HU"})
        return out

    @classmethod
    def from_config(cls, config: dict) -> Degradation:
        return cls(config["task"], window=tuple(config.get("window", (-1000.0, 1500.0))),
                   pixel_mm=config.get("pixel_mm", 0.7), **config.get("params", {}))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"Degradation({self.task}: {params}, pixel {self.pixel_mm:g} mm)"

    # ------------------------------------------------------------------------------------------- operators
    def _operator(self, size: tuple[int, int]):
        if size in self._operators:
            self._operators.move_to_end(size)
            return self._operators[size]
        from recon.operators import Downsampling, ParallelBeamCT

        if self.is_ct:
            op = ParallelBeamCT(size, angles=int(self.params["views"]), spacing=self.pixel_mm,
                                detector_spacing=self.pixel_mm)
        else:
            op = Downsampling(size, factor=int(self.params["factor"]), filter="gaussian")
        self._operators[size] = op
        while len(self._operators) > 4:
            self._operators.popitem(last=False)
        return op

    # -------------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Degrade normalised clean images ``x`` (``(N, H, W)`` or ``(N, 1, H, W)``, values in ``[-1, 1]``);
        returns the same shape, float32, clipped to ``[-1, 1]``. The noise comes from ``generator`` only."""
        squeeze = x.dim() == 3
        x4 = (x[:, None] if squeeze else x).float().cpu()
        if x4.dim() != 4 or x4.shape[1] != 1:
            raise ValueError(f"degradations take (N, H, W) or (N, 1, H, W) images, got shape {tuple(x.shape)}")
        if self.is_ct:
            y = self.window.normalize(self._ct(self.window.denormalize(x4.double()), generator)).float()
        else:
            y = self._super_resolution(x4)
        y = y.clamp(-1, 1)
        return y[:, 0] if squeeze else y

    def _ct(self, hu: torch.Tensor, generator) -> torch.Tensor:
        from recon.operators import TransmissionPoissonNoise

        op = self._operator(tuple(hu.shape[-2:]))
        mu = (MU_WATER_PER_MM * (1.0 + hu / 1000.0)).clamp_min(0.0).float()
        sino = op.A(mu)
        photons = self.params.get("photons")
        if photons:
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            sino = TransmissionPoissonNoise(I0=photons, rng=g)(sino.double()).float()
        fbp = op.fbp(sino, filter=self.params["filter"]).double()
        return 1000.0 * (fbp / MU_WATER_PER_MM - 1.0)

    def _super_resolution(self, x: torch.Tensor) -> torch.Tensor:
        f = int(self.params["factor"])
        if f == 1:
            return x.clone()
        h, w = x.shape[-2:]
        ph, pw = (-h) % f, (-w) % f
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode=mode)
        low = self._operator(tuple(x.shape[-2:])).A(x)
        up = F.interpolate(low, scale_factor=f, mode=self.params["upsample"], align_corners=False)
        return up[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
