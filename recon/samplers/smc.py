r"""SMC ensemble sampler: weighted particles with AFDPS or TDS weights, ESS-triggered resampling.

``sample_smc(physics, y, prior, *, sigma_y, ...)`` runs ``P`` particles for each of the ``B`` measurements as
one ``(P·B)`` batch (particle ``p`` of measurement ``b`` is row ``p·B + b``), keeps log-weights normalised by
log-sum-exp per measurement, records the effective sample size ``ESS = 1 / Σ_p w_p²`` after every step and
resamples the measurements whose ``ESS / P < ess_threshold`` (systematic by default, multinomial optional;
``ess_threshold = 0`` never resamples, as in the AFDPS paper's experiments; ``1`` resamples every step).
Log-weights are reset to zero after resampling. The result is the final *weighted* ensemble: ``x`` is the
weighted posterior mean, ``std`` the weighted per-pixel standard deviation.

The default weighting is TDS: on a two-mode posterior it gives each mode the right weight at P = 1024
(TV error 0.03, the exact-sample floor is 0.014), while AFDPS's state-space tilt has a log-weight variance that
makes its mode weights drift (TV 0.34); both converge on unimodal posteriors (``benchmarks/README.md``,
``benchmarks/bench_samplers_exact.py``). AFDPS stays available (``weighting="afdps"``): it needs no backward
pass through the network.

Conventions: VE noise levels ``x_σ = x_0 + σ n`` (``recon.priors.schedules``), the prior gives
``score(x, σ) = ∇ log p_σ(x)`` and ``denoise(x, σ)``; levels ``σ_0 = σ_max > … > σ_{n-1} = σ_min`` are Karras
spaced (``rho = 7``); the measurement is ``y = A x_0 + σ_y ε`` with linear ``A`` (a deepinv ``LinearPhysics``;
``A_adjoint`` is used, no autograd through ``A``) and ``σ_y > 0``.

AFDPS (``weighting="afdps"``; Chen, Ren, Min, Ying, Izzo, "Solving inverse problems via diffusion-based priors:
an approximation-free ensemble sampling approach")
-----------------------------------------------------------------------------------------------------------------
Target path :math:`\hat q_y(x, σ) ∝ p_σ(x)\, e^{-μ_y(x)}`, :math:`μ_y(x) = \|Ax - y\|^2 / (2σ_y^2)` on the
*state* ``x`` (no Tweedie estimate); at ``σ = 0`` it is the posterior.

*VE reverse process in σ-time.* Forward: :math:`dx = \sqrt{d(σ^2)/dt}\, dW`, so with reverse time τ
(σ decreasing, :math:`\dot σ = -dσ/dτ > 0`) :math:`g^2 dτ = 2σ\dot σ\, dτ = -d(σ^2)`, and every reverse process
with marginals :math:`p_σ` is :math:`dx = H dτ + v dW`, :math:`H = \tfrac12 (g^2 + v^2) ∇\log p_σ` (VE: no
``f x`` term). The probability-flow ODE (``v = 0``) is :math:`H = σ\dot σ\, s` (i.e. :math:`dx/dσ = -σ s`, the
"−σ̇σ score" of forward time); the reverse SDE (``v = g``) is :math:`H = g^2 s = 2σ\dot σ s`. Over one step
:math:`σ_i → σ_{i+1}`, :math:`\int v^2 dτ = h_i := σ_i^2 - σ_{i+1}^2` (SDE), :math:`\int H dτ ≈ h_i\, s` (SDE) or
:math:`\tfrac12 h_i s` (ODE).

*Weights (eq. 3.6).* With :math:`\tilde q = p_σ e^{-μ}` and the proposal :math:`dx = (H - v^2∇μ)dτ + v dW`,
the Fokker–Planck equations give :math:`∂_τ \tilde q - \mathcal L^*_{prop}\tilde q = \tilde q\,[\tfrac{v^2}{2}
(\|∇μ\|^2 - Δμ) - H·∇μ]`, hence :math:`d\log w = [\tfrac{v^2}{2}(\|∇μ\|^2 - Δμ) - H·∇μ]\, dτ` (Feynman–Kac).
For linear ``A``, :math:`Δμ = \|A\|_F^2/σ_y^2` is the same for every particle and cancels in the normalised
weights: it is dropped. By Itô's formula (:math:`dμ = ∇μ·dx + \tfrac{v^2}{2}Δμ\,dτ`) the same weight is
:math:`d\log w = -dμ(x) + v∇μ·dW - \tfrac{v^2}{2}\|∇μ\|^2 dτ`: the twist :math:`e^{-μ}` ratio times the
Girsanov density of the prior reverse process w.r.t. the proposal. Its exact time-discrete counterpart is the
Feynman–Kac weight :math:`w_{i} = p(x_{i+1}|x_i)\, e^{-μ(x_{i+1})} / [K(x_{i+1}|x_i)\, e^{-μ(x_i)}]`.

*Annealed tilt (``anneal = κ``).* With :math:`α ≡ 1` (``anneal=0``, the paper's main path) the proposal pins the
observed directions to within :math:`σ_y` while the prior process diffuses them by :math:`σ`; the Girsanov
term then has log-weight variance :math:`≈ m\,σ_{max}^2/σ_y^2` (``m`` measurements): measured ESS ≈ 1–5 of
1024 at every step. The default uses the paper's annealed family :math:`e^{-α_σ μ_y}` with
:math:`α_σ = σ_y^2/(σ_y^2 + κσ^2)`, i.e. the Gaussian likelihood of the *state* with variance
:math:`σ_y^2 + κσ^2` (for ``A`` with orthonormal rows and ``κ = 1`` this is exactly :math:`p(y | x_σ)` under a
flat prior on :math:`x_0`, since :math:`y = A x_σ - σ A n + σ_y ε`). :math:`α_0 = 1` at :math:`σ = 0`, so the path
still ends at the exact posterior; the time dependence adds :math:`-(\partial_τ α)\, μ_y\, dτ` to
:math:`d\log w` (discrete: :math:`-(α_{i+1} - α_i)μ_y(x_i)`). The log-weight variance stays large (tens of
resampling events on a 36-pixel problem, independent of the number of steps): see the tests for numbers.

Three ``scheme`` options discretise Stage II:

- ``"exact"`` (default): the discrete Feynman–Kac form above, :math:`w_i = p(x_{i+1}|x_i)\,
  e^{-α_{i+1}μ(x_{i+1})} / [K(x_{i+1}|x_i)\, e^{-α_i μ(x_i)}]`, with a Gaussian prior transition
  :math:`p(x'|x) = N(m_i, v_i I)`, :math:`m_i = x + h s(x, σ_i)` (the exact conditional mean
  :math:`E[x_{σ_{i+1}} | x_{σ_i}]` by Tweedie) and :math:`v_i = h` (``kernel="euler"``: Euler–Maruyama of the
  paper's SDE, ``v = g``) or :math:`v_i = hσ_{i+1}^2/σ_i^2` (``kernel="ancestral"``, default: the VE/DDPM
  ancestral variance; the true conditional variance lies between the two), and the locally optimal (fully
  adapted) proposal :math:`K ∝ N(x'; m_i, v_i I)\, e^{-α_{i+1}μ(x')}`, a Gaussian for linear ``A``. Then
  :math:`\log w_i = \log N(y; A m_i, (σ_y^2/α_{i+1}) I + v_i AA^T) + α_i μ(x_i)` + const depends on ``x_i``
  only, so the particles are reweighted and resampled *before* they move. No stiffness: the step may be as
  large as the prior's own discretisation allows (the explicit scheme needs ``h‖A‖²α/σ_y² < 2``). Its
  continuous-time limit is the AFDPS SDE with the weight above; the remaining errors are the prior's
  discretisation and the Stage-I Gaussian approximation of :math:`p_{σ_{max}}`.
- ``"euler"``: the literal Euler–Maruyama discretisation of eq. 3.6 (SDE, ``v = g``):
  :math:`x' = x + h(s - ∇μ_i) + \sqrt h z`, :math:`\log w \mathrel{+}= \tfrac h2 \|∇μ_i\|^2 - h\, s·∇μ_i` at the
  left point (Δμ dropped), :math:`μ_i = α_i μ_y`. Stable only for ``h ‖A‖² α_i/σ_y² < 2`` (checked up front,
  ``ValueError``); with ``anneal=0`` and ``σ_max ≫ σ_y`` that needs :math:`σ_{max}^2 ‖A‖^2/(2σ_y^2)` steps.
- ``"ode"``: ``v = 0``: Euler probability-flow steps :math:`x' = x + \tfrac h2 s`, :math:`\log w \mathrel{+}=
  -\tfrac h2 s·∇μ_i` (plus the annealing term). Importance sampling of the whole flow: weights degenerate
  quickly (no Langevin corrector is implemented).

*Stage I.* Particles start as exact samples of :math:`\hat q_y(x, σ_{max}) ≈ N(x; m_0, ρ^2 I)\, e^{-μ(x)}`,
with zero log-weights. :math:`p_{σ_{max}} = p_0 * N(0, σ_{max}^2 I)` has mean :math:`m_0 = E[x_0]` and
covariance :math:`\mathrm{Cov}(x_0) + σ_{max}^2 I`; the isotropic moment match is
:math:`ρ^2 = σ_{max}^2 + \mathrm{tr\,Cov}(x_0)/d`. ``m_0`` and the variance come from ``prior.mean`` /
``prior.variance`` when the prior has them (``GaussianMixturePrior``), else ``0`` (options ``init_mean``,
``init_var``). The Gaussian :math:`N(m, hI)\, e^{-μ}` has precision :math:`I/h + A^TA/σ_y^2` and mean
:math:`(I/h + A^TA/σ_y^2)^{-1}(m/h + A^Ty/σ_y^2)`; it is sampled exactly through the SVD of a dense ``A``
(``d ≤ dense_limit``: ``A`` is formed by applying ``physics.A`` to basis images) or by perturb-and-solve
with batched conjugate gradients on :math:`I/h + A^TA/σ_y^2` (``linear_solver="cg"``; masks converge in two
iterations, ill-conditioned operators need ``cg_iters``).

TDS (``weighting="tds"``; Wu, Trippe, Naesseth, Blei, Cunningham 2023)
----------------------------------------------------------------------
Twisting :math:`\log \tilde p_i(y|x) = -\|y - A\hat x_0(x, σ_i)\|^2 / (2(σ_y^2 + τ_i^2))`, :math:`τ_i^2 = σ_i^2`
(the VE form of TDS's :math:`(1-\bar α)/\bar α`). Prior transition: the VE ancestral step
:math:`p(x'|x) = N(\hat x_0 + r(x - \hat x_0),\, σ_{i+1}^2 (1 - r))`, :math:`r = σ_{i+1}^2/σ_i^2`; proposal
from the twisted :math:`\hat x_0 + σ_i^2 ∇_x \log\tilde p_i` (gradient through the denoiser by autograd), i.e.
the prior mean plus :math:`(σ_i^2 - σ_{i+1}^2)∇\log \tilde p_i`, same variance. Incremental weight
:math:`p(x_{i+1}|x_i)\,\tilde p_{i+1}(y|x_{i+1}) / [\tilde p_i(y|x_i)\, q(x_{i+1}|x_i, y)]`, initial weight
:math:`\tilde p_0(y|x_0)` for :math:`x_0 \sim N(m_0, ρ^2 I)`. The product telescopes to
:math:`p_{chain}(x_{0:n})\,\tilde p_{n-1}(y|x_{n-1})/q(\cdot)`, so the final weight is exact iff the last twist
is the true likelihood :math:`N(y; A x, σ_y^2)`. With :math:`σ_{min} > 0`, :math:`\tilde p_{n-1}` is not (it has
:math:`τ^2 = σ_{min}^2` and :math:`\hat x_0 ≠ x`), so at the last level it is replaced by the exact likelihood
of the final state (which carries noise :math:`σ_{min}`, a negligible :math:`σ_{min}^2` variance inflation).

Code layout: ``sample_smc`` checks its arguments and builds a ``_Run`` (problem, particle layout, weights, step
records); ``_tds_weighting`` and ``_afdps_weighting`` are the two weightings; both resample through
``resample_particles`` (shared with ``recon.samplers.fps``).

Degeneracy is reported, never silent: every step records ``ess`` and ``ess_per_item``; ``info["ess_final"]``
holds the final ESS per measurement, and ``info["degenerate"]`` is True, with a message in ``info["warnings"]``,
when a measurement's final ``ESS / P < degenerate_below`` (default 0.1) or its ESS is below 2: its std map then
comes from a handful of particles.

Cost: one prior evaluation per particle and step (TDS: plus a backward pass; ``steps + 1`` evaluations).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from recon.priors.schedules import karras_sigmas
from recon.samplers.base import (
    ReconstructionResult,
    check_bounded,
    check_finite,
    operator_norm,
    record_step,
    weighted_moments,
)

__all__ = [
    "RESAMPLERS",
    "degeneracy_report",
    "multinomial_resample",
    "normalise_log_weights",
    "resample_particles",
    "sample_smc",
    "systematic_resample",
]

_F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------------------------------------
def _rand(shape, generator, dtype=_F64, device=None):
    gdev = generator.device if generator is not None else torch.device("cpu")
    out = torch.rand(shape, generator=generator, dtype=dtype, device=gdev)
    return out if device is None else out.to(device)


def _randn(shape, generator, dtype, device):
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, dtype=dtype, device=gdev).to(device)


def systematic_resample(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Systematic resampling: ancestor indices ``(P, B)`` for normalised weights ``(P, B)`` (columns sum to 1).

    One uniform ``U_b`` per column; particle ``p`` is drawn ``#{k : c_{p-1} ≤ (k + U_b)/P < c_p}`` times
    (``c`` the cumulative weights), so its expected count is exactly ``P w_p`` (unbiased), with variance
    below that of multinomial resampling.
    """
    p, b = weights.shape
    w = weights.detach().to(_F64)
    cum = w.cumsum(0)
    cum = cum / cum[-1:].clamp_min(torch.finfo(_F64).tiny)
    u = (_rand((b,), generator, device=w.device)[None, :] + torch.arange(p, dtype=_F64, device=w.device)[:, None]) / p
    idx = torch.searchsorted(cum.T.contiguous(), u.T.contiguous(), right=True).T
    return idx.clamp(max=p - 1)


def multinomial_resample(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multinomial resampling: ``P`` i.i.d. ancestors per column of ``weights (P, B)``."""
    p, _ = weights.shape
    w = weights.detach().to(_F64).T
    gdev = generator.device if generator is not None else w.device
    return torch.multinomial(w.to(gdev), p, replacement=True, generator=generator).T.to(weights.device)


RESAMPLERS = {"systematic": systematic_resample, "multinomial": multinomial_resample}


def normalise_log_weights(logw: torch.Tensor):
    """``logw (P, B)`` → normalised log-weights, weights and ESS ``(B,)`` (log-sum-exp per column)."""
    logw = logw - torch.logsumexp(logw, 0, keepdim=True)
    w = logw.exp()
    return logw, w, 1.0 / (w**2).sum(0)


def resample_particles(logw: torch.Tensor, state: dict, ess_threshold: float, resampler: Callable,
                       generator: torch.Generator | None):
    """Normalise ``logw (P, B)``, compute the ESS and resample the measurements whose ``ESS/P < ess_threshold``.

    ``state`` maps names to ``(P·B, ...)`` tensors (row ``p·B + b``; None values are skipped); the rows of resampled
    items are replaced in place by their ancestors' and their log-weights reset to ``−log P``. Returns the new
    log-weights, weights, ESS ``(B,)`` and the number of items resampled (shared by SMC's weightings and FPS).
    """
    n_p, n_b = logw.shape
    device = logw.device
    logw, w, ess = normalise_log_weights(logw)
    low = ess < ess_threshold * n_p
    events = int(low.sum())
    if events:
        idx = resampler(w, generator)  # (P, B)
        keep = torch.arange(n_p, device=device)[:, None].expand(n_p, n_b)
        idx = torch.where(low[None, :], idx.to(device), keep)
        rows = (idx * n_b + torch.arange(n_b, device=device)[None, :]).reshape(-1)
        for key, val in state.items():
            if val is not None:
                state[key] = val[rows]
        logw = torch.where(low[None, :], torch.full_like(logw, -math.log(n_p)), logw)
        w = logw.exp()
    return logw, w, ess, events


def degeneracy_report(ess: torch.Tensor, particles: int, below: float, method: str) -> tuple[bool, list[str]]:
    """``(degenerate, warnings)``: degenerate when some item's final ``ESS/P < below`` or ``ESS < 2`` (fewer than
    two effective particles: no spread, whatever ``P``); the warning says what the spread then means (a silent zero
    spread is a defect)."""
    ess = torch.as_tensor(ess, dtype=_F64).flatten()
    bad = [i for i, e in enumerate(ess.tolist()) if e / float(particles) < below or e < 2.0]
    if not bad or particles <= 1:
        return False, []
    worst = float(ess[bad].min())
    return True, [f"{method}: the particle weights degenerated (final effective sample size {worst:.2f} of "
                  f"{particles}, below {below:g}·P or 2, for {len(bad)} of {ess.numel()} item(s)); the std map and "
                  f"intervals come from about {max(1, round(worst))} distinct particle(s) and understate the "
                  f"uncertainty"]


# ---------------------------------------------------------------------------------------------------------
# the Gaussian N(m, h I) e^{-μ(x)} for linear A: dense SVD or conjugate gradients
# ---------------------------------------------------------------------------------------------------------
def _dense_matrix(physics, image_shape, dtype, device, chunk: int = 256) -> torch.Tensor:
    d = math.prod(image_shape)
    cols = []
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        basis = torch.zeros(stop - start, d, dtype=dtype, device=device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        with torch.no_grad():
            out = physics.A(basis.reshape(stop - start, *image_shape))
        if out.is_complex():
            raise ValueError("smc: complex-valued physics are not supported (use real/imaginary channels)")
        cols.append(out.reshape(stop - start, -1).to(_F64))
    return torch.cat(cols).T.contiguous()  # (m, d)


class _DenseTilt:
    """Exact algebra in the right-singular basis of a dense ``A = U S V^T`` (float64): ``‖Ax − y‖²/2``, the log
    normaliser of ``N(m, hI) exp(−‖Ax − y‖²/(2 s2))`` and exact samples of it, all diagonal in ``ξ = V^T x``."""

    def __init__(self, physics, y_rep, image_shape):
        self.dtype = y_rep.dtype
        a = _dense_matrix(physics, image_shape, y_rep.dtype, y_rep.device)
        d = a.shape[1]
        u, s, vh = torch.linalg.svd(a, full_matrices=True)
        k = s.numel()
        self.s = torch.zeros(d, dtype=_F64, device=a.device)
        self.s[:k] = s
        self.v = vh.T.contiguous()  # (d, d)
        self.u = u[:, :k]
        self.retarget(y_rep)

    def retarget(self, y_rep):
        """Use the measurements ``y_rep`` from now on (FPS: a new noised measurement every step)."""
        yt = y_rep.reshape(y_rep.shape[0], -1).to(_F64) @ self.u  # U^T y (the rest is particle-independent)
        self.yt = torch.zeros(y_rep.shape[0], self.s.numel(), dtype=_F64, device=self.u.device)
        self.yt[:, : self.u.shape[1]] = yt

    def _xi(self, x):
        return x.reshape(x.shape[0], -1).to(_F64) @ self.v

    def half_sq_residual(self, x):
        return 0.5 * ((self.s * self._xi(x) - self.yt) ** 2).sum(1)

    def log_norm(self, m, h, s2):
        mx = self._xi(m)
        return -0.5 * ((self.yt - self.s * mx) ** 2 / (s2 + h * self.s**2)).sum(1)

    def sample(self, m, h, s2, generator):
        mx = self._xi(m)
        prec = 1.0 / h + self.s**2 / s2
        mean = (mx / h + self.s * self.yt / s2) / prec
        z = _randn(mx.shape, generator, _F64, mx.device)
        xi = mean + z / prec.sqrt()
        return (xi @ self.v.T).reshape(m.shape).to(self.dtype)


class _CGTilt:
    """Matrix-free version: conjugate gradients on ``K = I/h + A^T A / s2`` (batched, per-item scalars)."""

    def __init__(self, physics, y_rep, tol=1e-10, max_iter=200):
        self.physics, self.y = physics, y_rep
        self.tol, self.max_iter = float(tol), int(max_iter)

    def _solve(self, b, h, s2):
        def op(v):
            return v / h + self.physics.A_adjoint(self.physics.A(v)) / s2

        def dot(a, c):
            return (a * c).flatten(1).sum(1)

        def col(t):
            return t.reshape(-1, *([1] * (b.dim() - 1)))

        tiny = torch.finfo(b.dtype).tiny
        x = b * h  # K = I/h where A vanishes: a good start
        r = b - op(x)
        p = r.clone()
        rs = dot(r, r)
        stop = self.tol**2 * dot(b, b).clamp_min(tiny)
        for _ in range(self.max_iter):
            if bool((rs <= stop).all()):
                break
            kp = op(p)
            alpha = torch.where(rs <= stop, torch.zeros_like(rs), rs / dot(p, kp).clamp_min(tiny))
            x = x + col(alpha) * p
            r = r - col(alpha) * kp
            rs_new = dot(r, r)
            p = r + col(rs_new / rs.clamp_min(tiny)) * p
            rs = rs_new
        return x

    def retarget(self, y_rep):
        """Use the measurements ``y_rep`` from now on (FPS: a new noised measurement every step)."""
        self.y = y_rep

    def half_sq_residual(self, x):
        return 0.5 * ((self.physics.A(x) - self.y) ** 2).flatten(1).sum(1).to(_F64)

    def log_norm(self, m, h, s2):
        r = self.y - self.physics.A(m)
        if h == 0:
            return -0.5 * (r * r).flatten(1).sum(1).to(_F64) / s2
        g = self.physics.A_adjoint(r)
        kg = self._solve(g, h, s2)
        quad = (r * r).flatten(1).sum(1) / s2 - (g * kg).flatten(1).sum(1) / s2**2
        return -0.5 * quad.to(_F64)

    def sample(self, m, h, s2, generator):
        z1 = _randn(m.shape, generator, m.dtype, m.device)
        z2 = _randn(self.y.shape, generator, m.dtype, m.device)
        rhs = m / h + self.physics.A_adjoint(self.y + math.sqrt(s2) * z2) / s2 + z1 / math.sqrt(h)
        return self._solve(rhs, h, s2)


# ---------------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------------
def _init_moments(prior, image_shape, dtype, device, init_mean, init_var):
    if init_mean is None:
        init_mean = getattr(prior, "mean", None)
        if not isinstance(init_mean, torch.Tensor):
            init_mean = 0.0
    mean = torch.as_tensor(init_mean, dtype=dtype, device=device)
    mean = torch.broadcast_to(mean, image_shape) if mean.dim() else torch.full(image_shape, float(mean), dtype=dtype,
                                                                                 device=device)
    if init_var is None:
        var = getattr(prior, "variance", None)
        init_var = float(var.to(_F64).mean()) if isinstance(var, torch.Tensor) else 0.0
    return mean, float(init_var)


def sample_smc(
    physics, y: torch.Tensor, prior, *, sigma_y: float, steps: int = 100, particles: int = 16,
    generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
    weighting: str = "tds", ess_threshold: float = 0.5, resample: str = "systematic", scheme: str = "exact",
    kernel: str = "ancestral", anneal: float = 1.0, sigma_max: float | None = None, sigma_min: float | None = None,
    rho: float = 7.0, init_mean=None, init_var: float | None = None, linear_solver: str = "auto",
    dense_limit: int = 4096, cg_tol: float = 1e-10, cg_iters: int = 200, max_shift: float = 1.0,
    degenerate_below: float = 0.1,
) -> ReconstructionResult:
    """Sequential Monte Carlo posterior sampling with ``particles`` weighted particles per measurement.

    Args:
        physics: a linear deepinv ``Physics`` (``A`` and ``A_adjoint``).
        y: measurements ``(B, ...)``; each of the ``B`` items gets its own particle system.
        prior: ``score``/``denoise``/``sigma_min``/``sigma_max`` (a ``DiffusionPrior`` or ``GaussianMixturePrior``).
        sigma_y: measurement noise standard deviation, ``> 0`` (the likelihood is part of every weight).
        steps: number of noise-level transitions (Karras spacing from ``sigma_max`` to ``sigma_min``; AFDPS
            then steps to ``σ = 0``, TDS ends at ``sigma_min``).
        particles: ``P`` particles per measurement.
        generator: the seeded ``torch.Generator`` every random draw comes from.
        callback: called after every step with ``step``, ``steps``, ``sigma``, ``residual``, ``ess``, ``resampled``.
        weighting: ``"tds"`` (default: Tweedie-twisted proposal) or ``"afdps"`` (state-space likelihood tilt,
            approximation-free in the limit). Default TDS because it is the one measured to be right on a
            bimodal posterior at affordable particle counts (mode-weight TV 0.03 against AFDPS's 0.34 at
            P = 1024; ``benchmarks/README.md``); AFDPS needs no backward pass through the network.
        ess_threshold: resample a measurement's particles when ``ESS / P < ess_threshold``; ``0`` never (the
            AFDPS paper's setting: the output is then a weighted ensemble), ``1`` every step.
        resample: ``"systematic"`` or ``"multinomial"``.
        scheme: AFDPS discretisation: ``"exact"`` (default; fully adapted, discrete Feynman–Kac weights),
            ``"euler"`` (literal Euler–Maruyama of eq. 3.6; needs ``h‖A‖²α/σ_y² < 2``) or ``"ode"`` (``v = 0``).
        kernel: prior transition variance of the ``"exact"`` scheme: ``"ancestral"`` (default) or ``"euler"``.
        anneal: ``κ`` of the tilt ``exp(−‖Ax − y‖²/(2(σ_y² + κσ²)))`` (AFDPS); ``0`` is the paper's un-annealed
            ``exp(−μ_y)`` at every level (weights degenerate, see the module docstring).
        sigma_max, sigma_min: noise range (default: the prior's).
        rho: Karras spacing exponent.
        init_mean, init_var: Stage-I / initial Gaussian ``N(init_mean, (sigma_max² + init_var) I)`` approximating
            ``p_{σ_max}`` (default: the prior's ``mean`` and mean per-pixel ``variance`` if it has them, else 0).
        linear_solver: ``"dense"`` (SVD of the formed matrix), ``"cg"`` or ``"auto"`` (dense when
            ``d <= dense_limit``); used by AFDPS (Stage I, and every step of the ``"exact"`` scheme).
        cg_tol, cg_iters: conjugate-gradient relative tolerance and iteration cap.
        max_shift: TDS only: the twisted proposal's shift ``(σ_i² − σ_{i+1}²)∇log p̃`` is capped per particle at
            ``max_shift · σ_i · sqrt(d)`` (the size of the state's own noise). An explicit gradient step is unstable
            when ``h‖A‖²/(σ_y² + σ²) ≫ 1`` (e.g. CT, where ``‖A‖²`` is in the thousands); the weights use the
            capped proposal, so they stay exact (any proposal is valid for importance weights). ``inf`` disables it.
        dense_limit: largest image size (pixels) for which ``linear_solver="auto"`` forms ``A`` densely.
        degenerate_below: the final ``ESS/P`` below which (or an ESS below 2) the result is flagged
            ``info["degenerate"]`` with a message in ``info["warnings"]`` (the std map then comes from a handful of
            particles).

    Returns:
        ``ReconstructionResult`` with ``samples (P, B, ...)`` (final particles), normalised ``weights (P, B)``,
        ``x`` the weighted mean, ``std`` the weighted standard deviation; ``diagnostics`` per step: ``step``,
        ``sigma``, ``ess`` (mean over ``B``), ``ess_per_item``, ``residual`` (‖y − A x̄‖ of the weighted mean of
        the Tweedie estimates, mean over ``B``), ``nfe``, ``seconds``, ``resampled``; ``info``: ``method``,
        ``weighting``, ``scheme``, ``resamplings`` (events, summed over ``B``), ``ess_final`` (per item; also under
        its old name ``final_ess``), ``degenerate``, ``warnings``, ``nfe``.
    """
    t0 = time.perf_counter()
    nfe0 = getattr(prior, "nfe", 0)
    _check_options(weighting, resample, scheme, kernel, anneal, linear_solver, sigma_y, steps, particles, max_shift,
                   ess_threshold, y)
    n_p, n_b, steps = int(particles), int(y.shape[0]), int(steps)
    smax = float(prior.sigma_max if sigma_max is None else sigma_max)
    smin = float(prior.sigma_min if sigma_min is None else sigma_min)
    if not 0 < smin < smax:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {smin}, {smax}")
    dtype, device = y.dtype, y.device
    if not dtype.is_floating_point:
        raise ValueError(f"y must be a real floating tensor, got {y.dtype}")
    with torch.no_grad():
        image_shape = tuple(physics.A_adjoint(y[:1]).shape[1:])
    m0, var0 = _init_moments(prior, image_shape, dtype, device, init_mean, init_var)
    run = _Run(physics=physics, y=y, y_rep=y.repeat(n_p, *([1] * (y.dim() - 1))), prior=prior, generator=generator,
               callback=callback, n_p=n_p, n_b=n_b, steps=steps, image_shape=image_shape, dtype=dtype, device=device,
               s2y=float(sigma_y) ** 2, m0=m0, rho2=smax**2 + var0, resampler=RESAMPLERS[resample],
               ess_threshold=ess_threshold, t0=t0, nfe0=nfe0, method=f"smc-{weighting}")
    tilt = None
    if weighting == "afdps":
        use_dense = linear_solver == "dense" or (linear_solver == "auto" and math.prod(image_shape) <= dense_limit)
        tilt = (_DenseTilt(physics, run.y_rep, image_shape) if use_dense
                else _CGTilt(physics, run.y_rep, cg_tol, cg_iters))
        x, ess = _afdps_weighting(run, tilt, smin, smax, rho, scheme, kernel, anneal)
    else:
        x, ess = _tds_weighting(run, smin, smax, rho, max_shift)
    samples = run.as_pb(x.detach())
    check_finite(samples, run.method, steps)
    mean, std = weighted_moments(samples, run.weights)
    degenerate, warnings = degeneracy_report(ess, n_p, degenerate_below, run.method)
    solver = None if tilt is None else type(tilt).__name__.strip("_").replace("Tilt", "").lower()
    info = {"method": "smc", "weighting": weighting, "scheme": scheme if weighting == "afdps" else "ancestral-twisted",
            "steps": steps, "particles": n_p, "resamplings": run.resamplings, "final_ess": ess.tolist(),
            "ess_final": ess.tolist(), "degenerate": degenerate, "warnings": warnings,
            "nfe": getattr(prior, "nfe", 0) - nfe0, "seconds": time.perf_counter() - t0,
            "options": {"ess_threshold": ess_threshold, "resample": resample, "sigma_max": smax, "sigma_min": smin,
                        "rho": rho, "rho2_init": run.rho2, "linear_solver": solver}}
    return ReconstructionResult(
        x=mean, samples=samples, weights=run.weights.to(dtype), std=std, diagnostics=run.diagnostics, info=info
    )


def _check_options(weighting, resample, scheme, kernel, anneal, linear_solver, sigma_y, steps, particles, max_shift,
                   ess_threshold, y) -> None:
    """``sample_smc``'s argument checks (one ``ValueError`` naming the argument)."""
    if weighting not in ("afdps", "tds"):
        raise ValueError(f"weighting must be 'afdps' or 'tds', got {weighting!r}")
    if resample not in RESAMPLERS:
        raise ValueError(f"resample must be 'systematic' or 'multinomial', got {resample!r}")
    if scheme not in ("exact", "euler", "ode"):
        raise ValueError(f"scheme must be 'exact', 'euler' or 'ode', got {scheme!r}")
    if kernel not in ("ancestral", "euler"):
        raise ValueError(f"kernel must be 'ancestral' or 'euler', got {kernel!r}")
    if not anneal >= 0:
        raise ValueError(f"anneal must be >= 0, got {anneal}")
    if linear_solver not in ("auto", "dense", "cg"):
        raise ValueError(f"linear_solver must be 'auto', 'dense' or 'cg', got {linear_solver!r}")
    if not (sigma_y > 0) or not math.isfinite(sigma_y):
        raise ValueError(f"smc needs a finite sigma_y > 0 (the likelihood weights the particles), got {sigma_y}")
    if int(steps) < 1 or int(particles) < 1:
        raise ValueError(f"steps and particles must be >= 1, got {steps} and {particles}")
    if not max_shift > 0:
        raise ValueError(f"max_shift must be > 0 (inf disables the cap), got {max_shift}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    if y.dim() < 2:
        raise ValueError(f"y must have a batch dimension first, got shape {tuple(y.shape)}")


@dataclass
class _Run:
    """What both weightings share: the problem, the particle layout, the weights, resampling and the records."""

    physics: object
    y: torch.Tensor
    y_rep: torch.Tensor
    prior: object
    generator: torch.Generator | None
    callback: Callable[[dict], None] | None
    n_p: int
    n_b: int
    steps: int
    image_shape: tuple
    dtype: torch.dtype
    device: torch.device
    s2y: float
    m0: torch.Tensor
    rho2: float
    resampler: Callable
    ess_threshold: float
    t0: float
    nfe0: int
    method: str
    weights: torch.Tensor | None = None
    resamplings: int = 0
    diagnostics: list = field(default_factory=list)

    def __post_init__(self):
        self.weights = torch.full((self.n_p, self.n_b), 1.0 / self.n_p, dtype=_F64, device=self.device)

    def new_logw(self) -> torch.Tensor:
        return torch.zeros(self.n_p, self.n_b, dtype=_F64, device=self.device)

    def as_pb(self, t):
        return t.reshape(self.n_p, self.n_b, *t.shape[1:])

    def flat(self, t):
        n = self.n_p * self.n_b
        return (t.reshape(n, -1) if t.dim() > 1 else t.reshape(n, 1)).to(_F64)

    def randn(self, shape):
        return _randn(shape, self.generator, self.dtype, self.device)

    def residual_of(self, x0) -> float:
        w = self.weights.to(self.dtype).reshape(self.n_p, self.n_b, *([1] * len(self.image_shape)))
        mean = (w * self.as_pb(x0)).sum(0)
        return float((self.y - self.physics.A(mean)).flatten(1).norm(dim=1).mean())

    def reweight_and_resample(self, logw, state: dict):
        """Normalise, compute the ESS, resample the items below threshold; returns new logw, ess, flag."""
        check_finite(logw, self.method, len(self.diagnostics), "the log-weights overflowed; use more steps")
        logw, self.weights, ess, events = resample_particles(logw, state, self.ess_threshold, self.resampler,
                                                             self.generator)
        self.resamplings += events
        return logw, ess, events > 0

    def normalise(self, logw):
        logw, self.weights, ess = normalise_log_weights(logw)
        return logw, ess

    def record(self, step, sigma, ess, resampled, x0) -> None:
        record_step(self.diagnostics, self.callback, self.t0, self.prior, self.nfe0, step, self.steps, sigma,
                    self.residual_of(x0), ess=float(ess.mean()), ess_per_item=ess.tolist(), resampled=resampled)


def _afdps_check_euler(run: _Run, sig, s2) -> None:
    lip = 1.01 * operator_norm(run.physics, torch.zeros((1, *run.image_shape), dtype=run.dtype,
                                                        device=run.device)) ** 2
    worst = max((sig[i] ** 2 - sig[i + 1] ** 2) * lip / s2[i] for i in range(run.steps))
    if worst >= 2.0:
        raise ValueError(
            f"smc afdps scheme='euler' is unstable: max step h ‖A‖²/(σ_y² + anneal σ²) = {worst:.3g} must be "
            f"< 2; use scheme='exact', more steps, anneal > 0 or a smaller sigma_max"
        )


def _afdps_weighting(run: _Run, tilt, smin, smax, rho, scheme, kernel, anneal):
    """AFDPS: state-space likelihood tilt (module docstring); returns the final particles and ESS."""
    steps, method, physics = run.steps, run.method, run.physics
    sig = karras_sigmas(steps, smin, smax, rho).tolist()  # steps levels, then 0
    s2 = [run.s2y + anneal * s**2 for s in sig]  # tilt variance: exp(-α_σ μ_y), α_σ = σ_y² / s2(σ)
    if scheme == "euler":
        _afdps_check_euler(run, sig, s2)
    x = tilt.sample(run.m0.expand(run.n_p * run.n_b, *run.image_shape), run.rho2, s2[0], run.generator)  # Stage I
    check_finite(x, method, 0, "check sigma_y and the operator")
    logw = run.new_logw()
    for i in range(steps):
        s_i, s_next = sig[i], sig[i + 1]
        h = s_i**2 - s_next**2
        with torch.no_grad():
            score = run.prior.score(x, s_i)
        x0 = x + s_i**2 * score
        if scheme == "exact":
            m = x + h * score
            v = h if kernel == "euler" else h * s_next**2 / s_i**2
            logw = logw + run.as_pb(tilt.log_norm(m, v, s2[i + 1]) + tilt.half_sq_residual(x) / s2[i])
            state = {"m": m, "x0": x0}
            logw, ess, flag = run.reweight_and_resample(logw, state)
            x0 = state["x0"]
            x = tilt.sample(state["m"], v, s2[i + 1], run.generator) if v > 0 else state["m"]
        else:
            gm = physics.A_adjoint(physics.A(x) - run.y_rep) / s2[i]
            gm_f, sc_f = run.flat(gm), run.flat(score)
            if scheme == "euler":
                inc = 0.5 * h * (gm_f**2).sum(1) - h * (sc_f * gm_f).sum(1)  # Δμ dropped (constant)
            else:
                inc = -0.5 * h * (sc_f * gm_f).sum(1)
            if anneal:  # -(α_{i+1} - α_i) μ_y(x_i): the explicit time dependence of the tilt
                inc = inc - tilt.half_sq_residual(x) * (1.0 / s2[i + 1] - 1.0 / s2[i])
            logw = logw + run.as_pb(inc)
            state = {"x": x, "score": score, "gm": gm, "x0": x0}
            logw, ess, flag = run.reweight_and_resample(logw, state)
            x, score, gm, x0 = state["x"], state["score"], state["gm"], state["x0"]
            if scheme == "euler":
                x = x + h * (score - gm) + math.sqrt(h) * run.randn(x.shape)
            else:
                x = x + 0.5 * h * score
        check_finite(x, method, i + 1, "use more steps (or scheme='exact')")
        run.record(i + 1, s_next, ess, flag, x0)
    _, ess = run.normalise(logw)
    return x, ess


def _tds_twist(run: _Run, x, s, last):
    """Tweedie estimate, log twist and its gradient at noise level ``s`` (the exact likelihood at the last)."""
    physics, y_rep = run.physics, run.y_rep
    if last:
        with torch.no_grad():
            x0 = run.prior.denoise(x, s)
            lt = -((physics.A(x) - y_rep) ** 2).flatten(1).sum(1).to(_F64) / (2 * run.s2y)
        return x0, lt, None
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0 = run.prior.denoise(xg, s)
        lt = -((physics.A(x0) - y_rep) ** 2).flatten(1).sum(1) / (2 * (run.s2y + s**2))
        (grad,) = torch.autograd.grad(lt.sum(), xg)
    return x0.detach(), lt.detach().to(_F64), grad.detach()


def _tds_proposal(grad, s_i, s_next, mp, max_shift):
    """The twisted proposal mean: ``mp`` plus the (capped) shift ``(σ_i² − σ_{i+1}²)∇log p̃``."""
    shift = (s_i**2 - s_next**2) * grad
    if math.isfinite(max_shift):  # cap the explicit gradient step (the weights below use the capped mean)
        norm = shift.flatten(1).norm(dim=1).clamp_min(1e-30)
        cap = max_shift * s_i * math.sqrt(shift[0].numel())
        shift = shift * (cap / norm).clamp(max=1.0).reshape(-1, *([1] * (shift.dim() - 1)))
    return mp + shift


def _tds_weighting(run: _Run, smin, smax, rho, max_shift):
    """TDS: Tweedie-twisted proposal and weights (module docstring); returns the final particles and ESS."""
    steps, method = run.steps, run.method
    sig = karras_sigmas(steps + 1, smin, smax, rho)[:-1].tolist()  # steps + 1 levels, no 0
    x = run.m0 + math.sqrt(run.rho2) * run.randn((run.n_p * run.n_b, *run.image_shape))
    x0, lt, grad = _tds_twist(run, x, sig[0], steps == 0)
    logw = run.new_logw() + run.as_pb(lt)
    for i in range(steps):
        s_i, s_next = sig[i], sig[i + 1]
        r = s_next**2 / s_i**2
        var = s_next**2 * (1.0 - r)
        mp = x0 + r * (x - x0)
        mt = _tds_proposal(grad, s_i, s_next, mp, max_shift)
        x_new = mt + math.sqrt(var) * run.randn(x.shape)
        check_bounded(x_new, method, i + 1, s_next, "the twist gradient exploded; use more steps or a finite "
                      "max_shift")
        log_ratio = (run.flat(x_new - mt) ** 2 - run.flat(x_new - mp) ** 2).sum(1) / (2 * var)
        x0_new, lt_new, grad = _tds_twist(run, x_new, s_next, i == steps - 1)
        logw = logw + run.as_pb(log_ratio + lt_new - lt)
        x, x0, lt = x_new, x0_new, lt_new
        if i < steps - 1:  # the final weighted ensemble is returned as is
            state = {"x": x, "x0": x0, "lt": lt, "grad": grad}
            logw, ess, flag = run.reweight_and_resample(logw, state)
            x, x0, lt, grad = state["x"], state["x0"], state["lt"], state["grad"]
        else:
            check_finite(logw, method, i + 1, "the log-weights overflowed; use more steps")
            logw, ess = run.normalise(logw)
            flag = False
        run.record(i + 1, s_next, ess, flag, x0)
    _, ess = run.normalise(logw)
    return x, ess
