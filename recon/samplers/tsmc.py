"""Tempered SMC over a diffusion prior: prior samples, adaptive likelihood tempering, preconditioned MALA moves.

Derivation, choices and measured numbers: ``docs/methods/tempered-smc.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from recon.samplers.base import ReconstructionResult, check_finite
from recon.samplers.dps import ancestral_step, image_template, randn, repeat_batch, sigma_schedule
from recon.samplers.loop import SamplerRun
from recon.samplers.smc import degeneracy_report, normalise_log_weights, resample_particles, systematic_resample

__all__ = ["sample_tsmc"]

_F64 = torch.float64
_ACCEPT = 0.574  # MALA's optimal acceptance rate


# ---------------------------------------------------------------------------------------------------------
# the tempered target p_σ(x) · N(y; A x, σ_y²)^β and its MALA kernel
# ---------------------------------------------------------------------------------------------------------
class _Target:
    """``(P, B, d)`` float64 particles; the prior's score at ``sigma`` and the Gaussian log-likelihood."""

    def __init__(self, physics, prior, y: torch.Tensor, sigma_y: float, sigma: float, p: int, template):
        self.physics, self.prior, self.sigma, self.s2y = physics, prior, float(sigma), float(sigma_y) ** 2
        self.y_rep, self.template, self.p, self.b = repeat_batch(y, p), template, p, y.shape[0]

    def image(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.template.shape).to(self.template.dtype)

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.p, self.b, -1).to(_F64)

    def evaluate(self, x: torch.Tensor) -> dict:
        """Score, log-likelihood and its gradient at ``x`` (one network evaluation per particle)."""
        img = self.image(x)
        with torch.no_grad():
            score = self.prior.score(img, self.sigma)
            res = self.physics.A(img) - self.y_rep
            grad = -self.physics.A_adjoint(res) / self.s2y
        ll = -(res.reshape(self.p, self.b, -1).to(_F64) ** 2).sum(-1) / (2 * self.s2y)
        return {"x": x, "score": self.flat(score), "ll": ll, "gll": self.flat(grad)}


class _Precond:
    """``M`` from the weighted particle cloud per item: full covariance (small ``d``), its diagonal, or a scalar.

    When the cloud splits in two along its principal direction ``key`` (the best two-class split explains more
    than ``split`` of the variance along it: well-separated modes), ``M`` is the pooled *within*-mode covariance:
    MALA never crosses between modes, and the between-mode spread in ``M`` would only force a smaller step."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, kind: str, key: torch.Tensor, split: float = 0.8):
        groups = _two_modes(key, w, split)  # (P, B) 0/1
        xc = torch.zeros_like(x)
        for g in (0, 1):
            wg = w * (groups == g)
            mass = wg.sum(0).clamp_min(1e-300)
            xc = torch.where((groups == g)[..., None], x - (wg[..., None] * x).sum(0) / mass[:, None], xc)
        var = (w[..., None] * xc**2).sum(0)
        floor = 1e-6 * var.mean(-1, keepdim=True).clamp_min(1e-30)
        self.kind = kind
        if kind == "full":
            cov = torch.einsum("pb,pbi,pbj->bij", w, xc, xc)
            self.cov = cov + torch.diag_embed(floor.expand_as(var))
            self.chol = torch.linalg.cholesky(self.cov)
        elif kind == "diag":
            self.var = var + floor
        else:
            self.var = (var.mean(-1, keepdim=True) + floor).expand_as(var)

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """``M g`` for ``g (P, B, d)``."""
        return torch.einsum("bij,pbj->pbi", self.cov, g) if self.kind == "full" else self.var * g

    def sqrt_apply(self, z: torch.Tensor) -> torch.Tensor:
        """``L z`` with ``L Lᵀ = M``."""
        return torch.einsum("bij,pbj->pbi", self.chol, z) if self.kind == "full" else self.var.sqrt() * z

    def sq_norm(self, v: torch.Tensor) -> torch.Tensor:
        """``vᵀ M⁻¹ v`` per particle ``(P, B)``."""
        if self.kind == "full":
            u = torch.linalg.solve_triangular(self.chol, v.permute(1, 2, 0), upper=False)  # (B, d, P)
            return (u**2).sum(1).T
        return (v**2 / self.var).sum(-1)


# Gauss–Lobatto rules on [0, 1] (interior nodes, then the weights of the two ends and of the interior nodes)
_LOBATTO = {
    0: ((), 1 / 2, ()),
    1: ((1 / 2,), 1 / 6, (2 / 3,)),
    2: (((1 - 5**-0.5) / 2, (1 + 5**-0.5) / 2), 1 / 12, (5 / 12, 5 / 12)),
    3: (((1 - (3 / 7) ** 0.5) / 2, 1 / 2, (1 + (3 / 7) ** 0.5) / 2), 1 / 20, (49 / 180, 16 / 45, 49 / 180)),
}


def _log_ratio(target: _Target, x, xn, s0, s1, quadrature: int) -> torch.Tensor:
    """``log p_σ(x') − log p_σ(x)`` ``(P, B)`` from scores only: ``∫₀¹ s(x + t(x' − x))·(x' − x) dt`` by the
    Gauss–Lobatto rule with ``quadrature`` interior nodes (0: trapezoid, exact for a Gaussian; 1: Simpson), the
    ends' scores given; each interior node costs one network evaluation per particle."""
    nodes, w_end, w_in = _LOBATTO[quadrature]
    dx = xn - x
    total = w_end * ((s0 + s1) * dx).sum(-1)
    for t, w in zip(nodes, w_in, strict=True):
        with torch.no_grad():
            s = target.flat(target.prior.score(target.image(x + t * dx), target.sigma))
        total = total + w * (s * dx).sum(-1)
    return total


def _mala_move(target: _Target, st: dict, beta: float, h: torch.Tensor, m: _Precond, generator,
               quadrature: int) -> torch.Tensor:
    """One preconditioned MALA move of every particle (in place in ``st``); returns the acceptance rate per item.

    The prior's log-density ratio comes from its score by quadrature along the move (``_log_ratio``): no
    log-density is needed; ``s(x')`` is the proposal's own evaluation."""
    x = st["x"]
    hh = h[None, :, None]
    drift = 0.5 * hh * m.apply(st["score"] + beta * st["gll"])
    z = randn(x.shape, generator, x.dtype, x.device)
    xn = x + drift + hh.sqrt() * m.sqrt_apply(z)
    new = target.evaluate(xn)
    back = x - xn - 0.5 * hh * m.apply(new["score"] + beta * new["gll"])
    log_prior = _log_ratio(target, x, xn, st["score"], new["score"], quadrature)
    log_a = log_prior + beta * (new["ll"] - st["ll"]) - m.sq_norm(back) / (2 * h) + 0.5 * (z**2).sum(-1)
    log_a = torch.nan_to_num(log_a, nan=-math.inf)
    gdev = generator.device if generator is not None else x.device
    u = torch.rand(log_a.shape, generator=generator, dtype=_F64, device=gdev).to(x.device)
    take = u.log() < log_a
    for key in st:
        st[key] = torch.where(take.reshape(*take.shape, *([1] * (st[key].dim() - 2))), new[key], st[key])
    return log_a.clamp(max=0).exp().mean(0)


# ---------------------------------------------------------------------------------------------------------
# tempering: adaptive β, sorted systematic resampling
# ---------------------------------------------------------------------------------------------------------
def _next_beta(logw: torch.Tensor, ll: torch.Tensor, beta: float, cess: float, iters: int = 50) -> float:
    """The largest ``β' ≤ 1`` whose conditional ESS ``(Σ W G)² / Σ W G²`` (``G = e^{(β'−β)ℓ}``) is at least ``cess``
    for every item (bisection)."""
    w = normalise_log_weights(logw)[1]

    def cond_ess(b: float) -> float:
        lg = (b - beta) * ll
        lg = lg - lg.max(0, keepdim=True).values
        g = lg.exp()
        return float(((w * g).sum(0) ** 2 / (w * g**2).sum(0)).min())

    if cond_ess(1.0) >= cess:
        return 1.0
    lo, hi = beta, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cond_ess(mid) >= cess else (lo, mid)
    return max(lo, beta + 1e-12)


def _principal_projection(x: torch.Tensor, w: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Projection ``(P, B)`` of the particles on their weighted principal direction (power iteration)."""
    xc = x - (w[..., None] * x).sum(0)
    v = xc[(w * (xc**2).sum(-1)).argmax(0), torch.arange(x.shape[1])]  # (B, d)
    for _ in range(iters):
        v = torch.einsum("pb,pbd->bd", w * torch.einsum("pbd,bd->pb", xc, v), xc)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("pbd,bd->pb", xc, v)


def _two_modes(key: torch.Tensor, w: torch.Tensor, split: float) -> torch.Tensor:
    """Labels ``(P, B)``: the best weighted two-class split of ``key`` per item (Otsu) where it explains more than
    ``split`` of ``key``'s variance (a Gaussian's best split explains 2/π), else one class."""
    order = key.argsort(0)
    t, ws = key.gather(0, order), w.gather(0, order)
    c0, s0 = ws.cumsum(0), (ws * t).cumsum(0)
    tot, mean = c0[-1], s0[-1]
    var = (ws * (t - mean) ** 2).sum(0).clamp_min(1e-300)
    c1 = (tot - c0).clamp_min(1e-300)
    between = c0 * c1 * (s0 / c0.clamp_min(1e-300) - (mean - s0) / c1) ** 2
    best, at = between[:-1].max(0)
    cut = t.gather(0, at[None])[0]
    labels = (key > cut).long()
    return torch.where((best / var > split)[None, :], labels, torch.zeros_like(labels))


def _sorted_systematic(key: torch.Tensor) -> Callable:
    """Systematic resampling along the order of ``key (P, B)``: particles close in ``key`` are resampled together,
    so the weight of a mode (a range of the principal projection) is kept to within one particle."""

    def resample(w: torch.Tensor, generator) -> torch.Tensor:
        order = key.argsort(0)
        idx = systematic_resample(w.gather(0, order), generator)
        return order.gather(0, idx)

    return resample


def _distinct_ess(x: torch.Tensor, w: torch.Tensor, tol: float) -> torch.Tensor:
    """ESS ``(B,)`` with (nearly) identical particles merged: duplicates left by resampling, and copies that moves
    only nudged (closer than ``tol`` in L2; a collapsed cloud gives a collapsed preconditioner), count once."""
    out = []
    for b in range(x.shape[1]):
        close = torch.cdist(x[:, b], x[:, b]) <= tol  # (P, P)
        first = close.to(torch.int8).argmax(1)  # each particle joins the first one close to it
        merged = torch.zeros(x.shape[0], dtype=_F64, device=x.device).index_add_(0, first, w[:, b])
        out.append(1.0 / float((merged**2).sum()))
    return torch.tensor(out, dtype=_F64)


# ---------------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------------
def sample_tsmc(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 100,
    particles: int = 64,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    moves: int = 3,
    final_moves: int = 20,
    cess: float = 0.99,
    ess_threshold: float = 0.5,
    precondition: str = "auto",
    sigma_target: float = 0.01,
    sigma_max: float | None = None,
    rho: float = 7.0,
    max_temperatures: int = 500,
    degenerate_below: float = 0.1,
    quadrature: int = 2,
) -> ReconstructionResult:
    """Tempered SMC: diffusion prior samples, then ``p(y|x)^β`` annealed from β = 0 to 1 with adaptive steps.

    ``P`` prior samples per measurement come from ``steps`` ancestral (DDPM) steps of the prior down to
    ``sigma_target``; the target ``p_σ(x) N(y; Ax, σ_y²)^β`` (``σ = sigma_target``) is then tempered: each stage
    picks the next β by bisection so that the conditional ESS is ``cess · P``, reweights, resamples (systematic,
    along the particles' principal direction) when ``ESS < ess_threshold · P``, and moves every particle with
    ``moves`` preconditioned MALA steps (step size adapted to 57 % acceptance).

    Args:
        physics: any linear deepinv ``Physics``.
        y: measurements ``(B, ...)``.
        prior: a prior with ``score(x, sigma)`` and ``denoise(x, sigma)``.
        sigma_y: measurement noise level (must be > 0: the likelihood is tempered).
        steps: ancestral steps of the initial prior samples.
        particles: particles per measurement.
        generator: seeds every draw.
        callback: called after every step (prior steps, then tempering stages) with its record.
        moves: MALA moves per tempering stage.
        final_moves: extra MALA moves at β = 1.
        cess: conditional-ESS fraction each tempering stage keeps (larger: more, smaller stages).
        ess_threshold: resample when ``ESS / P`` falls below this.
        precondition: MALA preconditioner from the weighted particle cloud: ``"full"`` covariance, ``"diag"``,
            ``"scalar"``, or ``"auto"`` (full when the image has at most ``P / 4`` and 1024 pixels, else diag).
        sigma_target: noise level of the prior score in the target (the prior samples stop there).
        sigma_max: noise level of the first prior step (default: the prior's).
        rho: Karras spacing of the prior steps.
        max_temperatures: at most this many tempering stages (the last jumps to β = 1; flagged if it degenerates).
        quadrature: interior Gauss–Lobatto nodes of the score integral that gives the prior's log-density ratio
            in the MALA test (0: trapezoid, exact for Gaussians; 1: Simpson; up to 3); each costs one network
            evaluation per particle and move.
        degenerate_below: flag ``info["degenerate"]`` when the final ESS of distinct particles is below this
            fraction of ``P`` (or below 2).

    Returns:
        ``ReconstructionResult``: ``samples (P, B, ...)``, normalised ``weights (P, B)``, ``x`` the weighted mean,
        ``std`` the weighted std; ``diagnostics`` per prior step and per tempering stage (``beta``, ``ess``,
        ``ess_per_item``, ``acceptance``, ``step_size``, ``resampled``); ``info``: ``ess_final`` (per item, particles
        closer than 10⁻³ σ·√d merged), ``ess_weights``, ``degenerate``, ``warnings``, ``temperatures``, ``resamplings``,
        ``acceptance``, ``ancestors`` (distinct prior samples behind the final particles), ``nfe``.
    """
    _check(sigma_y, steps, particles, moves, final_moves, cess, ess_threshold, precondition, sigma_target,
           max_temperatures, quadrature)
    p, b = int(particles), int(y.shape[0])
    options = {"moves": moves, "final_moves": final_moves, "cess": cess, "ess_threshold": ess_threshold,
               "precondition": precondition, "sigma_target": sigma_target, "sigma_max": sigma_max, "rho": rho,
               "max_temperatures": max_temperatures, "quadrature": quadrature}
    run = SamplerRun("tempered-smc", prior, generator, callback, steps=steps, options=options, y=y, particles=p)
    template = repeat_batch(image_template(physics, y), p)
    sig = sigma_schedule(prior, steps, sigma_target, sigma_max, rho)[:-1].tolist()  # ends at sigma_target
    x = _prior_samples(run, prior, template, sig, generator)
    d = x[0].numel()
    kind = precondition if precondition != "auto" else ("full" if d <= min(p // 4, 1024) else "diag")
    target = _Target(physics, prior, y, sigma_y, sig[-1], p, template)
    st = target.evaluate(target.flat(x))
    st, tempering = _temper(run, target, st, kind, moves, final_moves, cess, ess_threshold, max_temperatures,
                            generator, len(sig) - 1, quadrature)
    w = tempering.pop("weights")
    samples = target.image(st["x"]).reshape(p, b, *template.shape[1:])
    check_finite(samples, "tempered-smc", run.steps, "reduce the MALA step (more moves) or raise cess")
    wt = w.to(samples.dtype).reshape(p, b, *([1] * (samples.dim() - 2)))
    mean = (wt * samples).sum(0)
    std = (wt * (samples - mean) ** 2).sum(0).clamp_min(0).sqrt()
    ess = _distinct_ess(st["x"], w, 1e-3 * target.sigma * math.sqrt(d))  # a thousandth of the noise level
    degenerate, warnings = degeneracy_report(ess, p, degenerate_below, "tempered-smc")
    if p > 1 and min(tempering["ancestors"]) < 2:  # moves that do not mix can hide this from the ESS
        degenerate = True
        warnings.append("tempered-smc: every particle descends from one prior sample (the weights collapsed while "
                        "tempering); the spread is the moves' jitter around it, not the posterior's")
    if min(tempering["acceptance"]) < 0.05:
        warnings.append(f"tempered-smc: the final MALA acceptance rate is {min(tempering['acceptance']):.3f}: the "
                        "moves barely mix (use more moves or final_moves)")
    return run.result(mean, samples=samples, weights=w.to(samples.dtype), std=std, ess_final=ess.tolist(),
                      degenerate=degenerate, warnings=warnings, **tempering)


def _check(sigma_y, steps, particles, moves, final_moves, cess, ess_threshold, precondition, sigma_target,
           max_temperatures, quadrature) -> None:
    if not (sigma_y > 0 and math.isfinite(sigma_y)):
        raise ValueError(f"tempered-smc needs a finite sigma_y > 0 (the likelihood is tempered), got {sigma_y}")
    if int(steps) < 2 or int(particles) < 1:
        raise ValueError(f"steps must be >= 2 and particles >= 1, got {steps} and {particles}")
    if int(moves) < 0 or int(final_moves) < 0:
        raise ValueError(f"moves and final_moves must be >= 0, got {moves} and {final_moves}")
    if not 0.0 < cess < 1.0:
        raise ValueError(f"cess must be in (0, 1), got {cess}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    if precondition not in ("auto", "full", "diag", "scalar"):
        raise ValueError(f"precondition must be 'auto', 'full', 'diag' or 'scalar', got {precondition!r}")
    if not sigma_target > 0:
        raise ValueError(f"sigma_target must be > 0, got {sigma_target}")
    if quadrature not in _LOBATTO:
        raise ValueError(f"quadrature must be 0, 1, 2 or 3, got {quadrature}")
    if int(max_temperatures) < 1:
        raise ValueError(f"max_temperatures must be >= 1, got {max_temperatures}")


def _prior_samples(run: SamplerRun, prior, template: torch.Tensor, sig: list, generator) -> torch.Tensor:
    """``P·B`` samples of ``p_σ`` at ``σ = sig[-1]``: ancestral (DDPM) steps from ``sig[0]``."""
    x = sig[0] * randn(template.shape, generator, template.dtype, template.device)
    for i in range(len(sig) - 1):
        with torch.no_grad():
            x = ancestral_step(x, prior.denoise(x, sig[i]), sig[i], sig[i + 1], generator)
        run.step(i, sig[i + 1], float("nan"), x=x, x_sigma=sig[i + 1], ess=float(run.particles))
    return x


def _residual(target: _Target, xm: torch.Tensor) -> float:
    """``‖y − A x̄‖`` of the weighted mean ``xm (B, d)``, mean over the items."""
    b = xm.shape[0]
    with torch.no_grad():
        res = target.physics.A(xm.reshape(b, *target.template.shape[1:]).to(target.template.dtype))
    return float((res - target.y_rep[:b]).flatten(1).norm(dim=1).mean())


def _temper(run: SamplerRun, target: _Target, st: dict, kind: str, moves: int, final_moves: int, cess: float,
            ess_threshold: float, max_temperatures: int, generator, first: int, quadrature: int) -> tuple[dict, dict]:
    """The tempering stages (β from 0 to 1); returns the final state and the weights and diagnostics for ``info``."""
    p, b, d = st["x"].shape
    logw = torch.zeros(p, b, dtype=_F64, device=st["x"].device)
    ids = torch.arange(p, device=st["x"].device)[:, None].expand(p, b)
    h = torch.full((b,), 1.0 / d ** (1 / 3), dtype=_F64, device=st["x"].device)
    beta, betas, resamplings, ess_w = 0.0, [], 0, None
    for stage in range(max_temperatures):
        last = stage == max_temperatures - 1
        new = 1.0 if last else _next_beta(logw, st["ll"], beta, cess)
        logw, beta = logw + (new - beta) * st["ll"], new
        logw, w, ess_w = normalise_log_weights(logw)
        key = _principal_projection(st["x"], w)
        m = _Precond(st["x"], w, kind, key)
        flat = {k: v.reshape(p * b, *v.shape[2:]) for k, v in st.items()} | {"ids": ids.reshape(p * b)}
        logw, w, _, events = resample_particles(logw, flat, ess_threshold, _sorted_systematic(key), generator)
        st = {k: flat[k].reshape(p, b, *flat[k].shape[1:]) for k in st}
        ids, resamplings = flat["ids"].reshape(p, b), resamplings + events
        acc = torch.ones(b, dtype=_F64)
        for _ in range(moves + (final_moves if beta >= 1.0 else 0)):
            acc = _mala_move(target, st, beta, h, m, generator, quadrature)
            h = h * torch.exp(2.0 * (acc - _ACCEPT))
        betas.append(beta)
        xm = (w[..., None] * st["x"]).sum(0)
        residual = _residual(target, xm)
        run.step(first + stage, target.sigma, residual, x=target.image(st["x"]), beta=beta,
                 ess=float(ess_w.mean()), ess_per_item=ess_w.tolist(), acceptance=acc.tolist(),
                 step_size=h.tolist(), resampled=events > 0)
        if beta >= 1.0:
            break
    anc = [int(torch.unique(ids[:, j]).numel()) for j in range(b)]
    return st, {"weights": w, "temperatures": betas, "resamplings": resamplings, "acceptance": acc.tolist(),
                "ess_weights": ess_w.tolist(), "ancestors": anc}
