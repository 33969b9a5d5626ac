r"""RED-diff (Mardani, Song, Kautz, Vahdat, ICLR 2024): variational posterior mode by Adam, in the σ (VE) view.

The variational posterior ``q(x0|y) = N(μ, σ_q² I)`` with ``σ_q → 0`` reduces to optimising ``μ``. At each noise
level ``σ_i`` (swept high → low, one Adam step per level):

.. code-block:: text

    ε ~ N(0, I);  x_i = μ + σ_i ε                      (VE; the VP x_t = sqrt(ᾱ) μ + sqrt(1−ᾱ) ε divided by sqrt(ᾱ))
    ε̂ = (x_i − D(x_i, σ_i)) / σ_i                      under torch.no_grad: NO backpropagation through the network
    loss = obs_weight · ‖y − A μ‖² / 2  +  lam · ω(σ_i) · mean_pixels(sg(ε̂ − ε) · μ)
    Adam(μ, lr, betas=(0.9, 0.99)) step on loss

``ω`` (``weighting``): ``"linear"`` ``ω = σ`` (= sqrt(1−ᾱ)/sqrt(ᾱ) = 1/sqrt(SNR), the paper's / official
default), ``"sqrt"`` ``sqrt(σ)``, ``"square"`` ``σ²``, ``"const"`` 1. ``‖·‖²`` is the sum over the measurement
entries of each batch item, ``mean_pixels`` the mean over its pixels; batch items add up (independent problems).

Normalisation vs. the official code (``NVlabs/RED-diff``, ``algos/reddiff.py``): it minimises
``obs_weight_o · mean_meas((y − Aμ)²)/2 + lam_o · ω · mean_pixels((ε̂ − ε) μ)`` and never uses σ_y. That is *this*
loss with ``obs_weight = obs_weight_o / m`` (``m`` = number of measurement entries per item) and ``lam = lam_o``.
The official operators (DDRM's ``H_funcs``) return only the measured entries; ``recon``'s return full-size arrays
with structural zeros (the unsampled k-space of ``CartesianMRI``, the masked pixels of ``Inpainting``), so ``m``
counts the entries ``A`` can make nonzero (``measured_entries``: one application of ``A`` to a random image), not
the zeros: otherwise the data weight would shrink with the undersampling factor.
Here ``obs_weight=None`` (default) means exactly that, ``obs_weight = 1/m`` (the official ``obs_weight 1.0``), so
the official hyper-parameters (``lam 0.25``, ``lr 0.1``; README: 100 steps, ``lr 0.5``) carry over unchanged.
The paper's Gaussian likelihood ``‖y − Aμ‖²/(2σ_y²)`` is ``obs_weight = 1/σ_y²`` (then ``lam`` must grow by
the same order to keep the balance). Adam is invariant to a global rescaling of the loss, so only the ratio
``lam · ω / (obs_weight · m)`` matters.

Noise levels: ``timesteps="ddpm"`` (default for a prior with a VP schedule) uses the official grid: DDPM steps
``t = T−1−k·(T//steps)`` down to 0 converted to σ by the prior's schedule; ``"karras"`` (default otherwise, e.g. the
analytic ``GaussianMixturePrior``) Karras-spaced levels in the prior's range; ``sigmas=`` overrides both.

Initialisation: ``init="analytic"`` (default, as the official ``H⁺ y``): the physics' fast analytic inverse, the
same helper as ``sample_analytic``; ``"zeros"`` (InverseBench). Returns ``μ`` as ``x`` (no samples, no std):
RED-diff is a mode-seeking optimiser, not a sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from recon.samplers.base import ReconstructionResult
from recon.samplers.dps import image_template, per_item_norm, randn, sigma_schedule
from recon.samplers.loop import SamplerRun

__all__ = ["sample_reddiff"]

_WEIGHTINGS = {
    "linear": lambda s: s,
    "sqrt": lambda s: s**0.5,
    "square": lambda s: s * s,
    "const": lambda s: 1.0,
}


def _reddiff_sigmas(prior, steps, sigma_min, sigma_max, rho, sigmas, timesteps) -> torch.Tensor:
    schedule = getattr(prior, "schedule", None)
    if timesteps is None:
        timesteps = "ddpm" if getattr(schedule, "kind", None) == "vp" else "karras"
    if timesteps not in ("ddpm", "karras"):
        raise ValueError(f"timesteps must be 'ddpm' or 'karras', got {timesteps!r}")
    if sigmas is not None or timesteps == "karras":
        return sigma_schedule(prior, steps, sigma_min, sigma_max, rho, sigmas)[:-1]
    if getattr(schedule, "kind", None) != "vp":
        raise ValueError("timesteps='ddpm' needs a prior with a VP schedule (use 'karras')")
    big_t = schedule.num_train_timesteps
    skip = max(big_t // int(steps), 1)
    ts = torch.arange(0, big_t, skip, dtype=torch.float64).flip(0)
    return schedule.sigma(ts).to(torch.float64)


def measured_entries(physics, template: torch.Tensor) -> int:
    """Entries of one measurement that ``physics.A`` can make nonzero: the count of nonzeros of ``A`` applied to a
    random image of ``template``'s shape (its first item; a fixed seed, the caller's generator untouched). A
    structural zero (masked k-space, a masked pixel) is exactly 0 for every input; a measured entry is 0 for a
    random input with probability 0."""
    g = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(tuple(template[:1].shape), generator=g, dtype=torch.float64).to(template.device,
                                                                                        template.dtype)
    with torch.no_grad():
        count = int(torch.count_nonzero(physics.A(probe)[0]))
    return count if count > 0 else int(physics.A(probe)[0].numel())


def sample_reddiff(
    physics,
    y: torch.Tensor,
    prior,
    *,
    sigma_y: float = 0.0,
    steps: int = 100,
    particles: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    lr: float = 0.1,
    lam: float = 0.25,
    obs_weight: float | None = None,
    weighting: str = "linear",
    init: str = "analytic",
    timesteps: str | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    sigmas=None,
) -> ReconstructionResult:
    """RED-diff (module docstring for the loss, its normalisation and the official code's).

    Args:
        physics: any differentiable deepinv ``Physics`` (the data term is differentiated by autograd).
        y: measurements ``(B, ...)``; the ``B`` problems are optimised together (independent terms).
        prior: ``denoise(x, σ)``, ``sigma_min``/``sigma_max`` (and ``schedule`` for ``timesteps="ddpm"``).
        sigma_y: recorded only (the official code ignores it; see ``obs_weight``).
        steps: number of noise levels = Adam steps = network evaluations per item (official default 50,
            README 100; the benchmark runs 1000).
        particles: ignored (RED-diff returns one estimate per measurement).
        lr: Adam learning rate (official 0.1), betas (0.9, 0.99).
        lam: regulariser weight λ (official ``grad_term_weight`` 0.25).
        obs_weight: data-term weight; ``None`` = ``1/m`` (the official mean over the measured entries).
        weighting: ``"linear"`` (ω = σ), ``"sqrt"``, ``"square"`` or ``"const"``.
        init: ``"analytic"`` (the physics' fast analytic inverse) or ``"zeros"``.
        timesteps, sigma_min, sigma_max, rho, sigmas: the noise levels (module docstring).

    Returns:
        ``ReconstructionResult`` with ``x = μ``; ``diagnostics`` per step with ``residual`` ‖y − Aμ‖, ``loss``.
    """
    from recon.samplers.baselines import analytic_inverse

    _check_reddiff(weighting, init, lr)
    sig = _reddiff_sigmas(prior, steps, sigma_min, sigma_max, rho, sigmas, timesteps)
    n = sig.numel()
    template = image_template(physics, y)
    mu0 = analytic_inverse(physics, y).to(template.dtype) if init == "analytic" else template
    mu = mu0.detach().clone().requires_grad_(True)
    y = y.detach()
    m = measured_entries(physics, template) if obs_weight is None else y[0].numel()
    w_obs = 1.0 / m if obs_weight is None else float(obs_weight)
    run = SamplerRun("red-diff", prior, generator, callback, steps=n, options={
        "lr": float(lr), "lam": float(lam), "obs_weight": w_obs, "weighting": weighting, "init": init,
        "sigma_max": float(sig[0]), "sigma_min": float(sig[-1]), "sigma_y": float(sigma_y)})
    opt = torch.optim.Adam([mu], lr=float(lr), betas=(0.9, 0.99))
    for i in range(n):
        s = float(sig[i])
        loss, r = _reddiff_step(physics, prior, y, mu, opt, s, generator, w_obs, float(lam) * _WEIGHTINGS[weighting](s))
        run.step(i, s, per_item_norm(r.detach()).mean(), x=mu.detach(), hint="reduce lr (or lam)",
                 loss=float(loss.detach()))
    return run.result(mu.detach())


def _check_reddiff(weighting: str, init: str, lr: float) -> None:
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(_WEIGHTINGS)}, got {weighting!r}")
    if init not in ("analytic", "zeros"):
        raise ValueError(f"init must be 'analytic' or 'zeros', got {init!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")


def _reddiff_step(physics, prior, y: torch.Tensor, mu: torch.Tensor, opt, s: float, generator, w_obs: float,
                  reg_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam step on ``w_obs ‖y − Aμ‖²/2 + reg_weight · mean_pixels(sg(ε̂ − ε) · μ)`` at noise level ``s``;
    returns the loss and the residual."""
    eps = randn(mu.shape, generator, mu.dtype, mu.device)
    with torch.no_grad():
        x_t = mu + s * eps
        eps_hat = (x_t - prior.denoise(x_t, s)) / s
        g = (eps_hat - eps) / mu[0].numel()  # d/dμ of mean_pixels(sg(ε̂ − ε)·μ)
    opt.zero_grad(set_to_none=True)
    with torch.enable_grad():
        r = y - physics.A(mu)
        loss = 0.5 * w_obs * (r**2).sum() + reg_weight * (g * mu).sum()
        loss.backward()
    opt.step()
    return loss, r
