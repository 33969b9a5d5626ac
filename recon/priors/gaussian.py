r"""Analytic Gaussian and Gaussian-mixture diffusion priors with exact noisy marginals and exact posteriors.

These priors are the ground truth for testing posterior samplers: everything a diffusion sampler asks of a
prior (``denoise``, ``score``) is exact, and so is the posterior for a linear-Gaussian measurement.

Convention (the one of :mod:`recon.priors.schedules`, k-diffusion / EDM "variance exploding"): a noisy image
is :math:`x = x_0 + \sigma n`, :math:`n \sim \mathcal N(0, I)`. For the mixture prior

.. math::

    p(x_0) = \sum_k w_k\, \mathcal N(x_0;\ \mu_k, \Sigma_k), \qquad
    p_\sigma(x) = \sum_k w_k\, \mathcal N(x;\ \mu_k, \Sigma_k + \sigma^2 I),

and the exact Tweedie denoiser and score are

.. math::

    E[x_0 \mid x] = \sum_k r_k(x)\,\big(\mu_k + \Sigma_k (\Sigma_k + \sigma^2 I)^{-1} (x - \mu_k)\big),
    \qquad
    \nabla_x \log p_\sigma(x) = -\sum_k r_k(x)\, (\Sigma_k + \sigma^2 I)^{-1} (x - \mu_k)
    = \frac{E[x_0 \mid x] - x}{\sigma^2},

with responsibilities :math:`r_k(x) \propto w_k \mathcal N(x; \mu_k, \Sigma_k + \sigma^2 I)` computed by
log-sum-exp.

Shapes: images are ``(B, *image_shape)`` (e.g. ``image_shape = (C, H, W)``; any shape works), with
``d = prod(image_shape)``; ``sigma`` is a number or a tensor of shape ``(B,)`` (one level per batch element).
Component covariances come in three forms, each with its own exact linear algebra:

- **full** ``(K, d, d)``: symmetric PSD (checked); one eigendecomposition :math:`\Sigma_k = V \Lambda V^T`
  per component, computed once, serves every ``sigma`` (:math:`\Sigma_k + \sigma^2 I = V(\Lambda+\sigma^2)V^T`);
- **diagonal** ``(K, d)`` (or ``(K, *image_shape)``): everything elementwise;
- **low rank plus diagonal** ``(U, D)`` with ``U (K, d, r)`` and ``D (K, d)``, :math:`\Sigma_k = U_k U_k^T +
  \mathrm{diag}(D_k)`: the Woodbury identity and the matrix determinant lemma, with an ``r x r`` Cholesky
  factor per distinct ``sigma`` in the batch; nothing ``d x d`` is formed (``d = 4096``, ``r = 20`` is cheap).

Linear-Gaussian posterior (:meth:`GaussianMixturePrior.posterior`): for :math:`y = A x_0 + \sigma_y \epsilon`,

.. math::

    p(x_0 \mid y) = \sum_k \tilde w_k\, \mathcal N(x_0;\ \tilde\mu_k, \tilde\Sigma_k), \quad
    \tilde w_k \propto w_k\, \mathcal N(y;\ A\mu_k,\ S_k),\quad S_k = A\Sigma_k A^T + \sigma_y^2 I,

    \tilde\mu_k = \mu_k + \Sigma_k A^T S_k^{-1}(y - A\mu_k), \qquad
    \tilde\Sigma_k = \Sigma_k - \Sigma_k A^T S_k^{-1} A \Sigma_k,

returned as a :class:`GaussianMixturePosterior`, itself a (full-covariance) mixture prior, so its noisy
marginal has ``denoise``/``score`` too. Computations run in float64; results come back in the input's dtype
(for ``sample``/``mean``/...: the dtype of the ``means`` given) and on the input's device (parameters are
copied once per device and cached).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "GaussianMixturePosterior",
    "GaussianMixturePrior",
    "GaussianPrior",
    "bimodal_inpainting_example",
]

_F64 = torch.float64
_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def _as_float_tensor(v, name: str) -> torch.Tensor:
    """``v`` as a real floating tensor (tensors keep dtype/device; arrays and lists become float64)."""
    if isinstance(v, torch.Tensor):
        if v.is_complex() or not v.is_floating_point():
            if v.is_complex():
                raise ValueError(f"{name} must be real, got dtype {v.dtype}")
            v = v.to(_F64)
        return v
    try:
        return torch.as_tensor(v, dtype=_F64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a tensor (or array) of real numbers, got {type(v).__name__}") from err


def _rel_tol(dtype: torch.dtype) -> float:
    """Relative tolerance for symmetry / PSD checks of matrices given in ``dtype``."""
    return max(1e-10, 100.0 * torch.finfo(dtype).eps)


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


# ---------------------------------------------------------------------------------------------------------
# component covariance back-ends (internal; float64, one device). Layout of per-point tensors: (K, B, d).
# ---------------------------------------------------------------------------------------------------------
class _Full:
    """Full covariances ``(K, d, d)`` through one eigendecomposition each."""

    kind = "full"

    def __init__(self, cov: torch.Tensor, lam: torch.Tensor | None = None, vec: torch.Tensor | None = None):
        self.cov = cov  # (K, d, d), exactly symmetric
        if lam is None:
            lam, vec = torch.linalg.eigh(cov)
            lam_max = lam.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(_F64).tiny)
            zero_tol = 10.0 * cov.shape[-1] * torch.finfo(_F64).eps * lam_max
            lam = torch.where(lam <= zero_tol, torch.zeros_like(lam), lam)  # roundoff negatives → 0
        self.lam, self.vec = lam, vec  # (K, d), (K, d, d)
        self.singular = (self.lam <= 0).any(dim=-1)  # (K,)

    def to(self, device) -> _Full:
        return _Full(self.cov.to(device), self.lam.to(device), self.vec.to(device))

    def terms(self, v: torch.Tensor, s2: torch.Tensor):
        """For ``v (K, B, d)``, ``s2 (B,)``: ``P v``, ``Σ P v``, ``v^T P v``, ``log det(Σ + s2 I)`` with
        ``P = (Σ + s2 I)^{-1}``."""
        z = torch.bmm(v, self.vec)  # V^T v, (K, B, d)
        var = self.lam[:, None, :] + s2[None, :, None]
        vt = self.vec.transpose(-1, -2)
        pv = torch.bmm(z / var, vt)
        spv = torch.bmm(z * (self.lam[:, None, :] / var), vt)
        quad = (z * z / var).sum(-1)
        logdet = torch.log(var).sum(-1)
        return pv, spv, quad, logdet

    def variances(self) -> torch.Tensor:
        return torch.diagonal(self.cov, dim1=-2, dim2=-1)

    def dense(self) -> torch.Tensor:
        return self.cov

    def cov_matmul(self, m: torch.Tensor) -> torch.Tensor:
        """``Σ_k M`` for ``M (d, n)`` → ``(K, d, n)``."""
        return self.cov @ m

    def correlate(self, k: int, z: torch.Tensor) -> torch.Tensor:
        """Rows of ``Σ_k^{1/2} z`` for standard normal rows ``z (n, d)`` (extra columns ignored)."""
        d = self.lam.shape[-1]
        return (z[:, :d] * self.lam[k].sqrt()) @ self.vec[k].T

    n_noise = property(lambda self: self.lam.shape[-1])


class _Diag:
    """Diagonal covariances ``(K, d)``."""

    kind = "diagonal"

    def __init__(self, var: torch.Tensor):
        self.var = var  # (K, d)
        self.singular = (var <= 0).any(dim=-1)

    def to(self, device) -> _Diag:
        return _Diag(self.var.to(device))

    def terms(self, v, s2):
        var = self.var[:, None, :] + s2[None, :, None]
        pv = v / var
        spv = v * (self.var[:, None, :] / var)
        quad = (v * pv).sum(-1)
        logdet = torch.log(var).sum(-1)
        return pv, spv, quad, logdet

    def variances(self):
        return self.var

    def dense(self):
        return torch.diag_embed(self.var)

    def cov_matmul(self, m):
        return self.var[:, :, None] * m[None]

    def correlate(self, k, z):
        return z[:, : self.var.shape[-1]] * self.var[k].sqrt()

    n_noise = property(lambda self: self.var.shape[-1])


class _LowRank:
    """``Σ_k = U_k U_k^T + diag(D_k)`` with ``U (K, d, r)``, ``D (K, d)``: Woodbury + determinant lemma."""

    kind = "lowrank"

    def __init__(self, u: torch.Tensor, diag: torch.Tensor):
        self.u, self.diag = u, diag
        self.singular = (diag <= 0).any(dim=-1)  # conservative: D_k > 0 makes Σ_k non-singular

    def to(self, device) -> _LowRank:
        return _LowRank(self.u.to(device), self.diag.to(device))

    def terms(self, v, s2):
        r = self.u.shape[-1]
        s2u, inv = torch.unique(s2, return_inverse=True)  # one r x r factorisation per distinct sigma
        e_u = self.diag[:, None, :] + s2u[None, :, None]  # (K, S, d)
        ut = self.u.transpose(-1, -2)[:, None]  # (K, 1, r, d)
        cap = torch.eye(r, dtype=v.dtype, device=v.device) + (ut / e_u[:, :, None, :]) @ self.u[:, None]
        chol = torch.linalg.cholesky(cap)  # (K, S, r, r), cap = I + U^T E^{-1} U is SPD
        logdet_u = torch.log(e_u).sum(-1) + 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        e = e_u[:, inv]  # (K, B, d)
        a = v / e
        t = torch.bmm(a, self.u)  # (K, B, r)
        c = torch.cholesky_solve(t[..., None], chol[:, inv])[..., 0]
        pv = a - torch.bmm(c, self.u.transpose(-1, -2)) / e
        spv = torch.bmm(torch.bmm(pv, self.u), self.u.transpose(-1, -2)) + self.diag[:, None, :] * pv
        quad = (v * pv).sum(-1)
        logdet = logdet_u[:, inv]
        return pv, spv, quad, logdet

    def variances(self):
        return (self.u**2).sum(-1) + self.diag

    def dense(self):
        return self.u @ self.u.transpose(-1, -2) + torch.diag_embed(self.diag)

    def cov_matmul(self, m):
        return self.u @ (self.u.transpose(-1, -2) @ m) + self.diag[:, :, None] * m[None]

    def correlate(self, k, z):
        d, r = self.u.shape[1], self.u.shape[2]
        return z[:, :r] @ self.u[k].T + z[:, r : r + d] * self.diag[k].sqrt()

    n_noise = property(lambda self: self.u.shape[1] + self.u.shape[2])


# ---------------------------------------------------------------------------------------------------------
# the mixture prior
# ---------------------------------------------------------------------------------------------------------
class GaussianMixturePrior:
    r"""Gaussian mixture prior :math:`p(x_0) = \sum_k w_k \mathcal N(\mu_k, \Sigma_k)` with exact
    noisy marginals, Tweedie denoiser, score, samples and linear-Gaussian posteriors.

    Args:
        weights: ``(K,)`` positive mixture weights (normalised internally).
        means: ``(K, *image_shape)`` component means; ``image_shape`` is taken from here.
        covariances: one of

            - ``(K, d, d)`` full covariances, symmetric positive semi-definite (checked);
            - ``(K, d)`` or ``(K, *image_shape)`` diagonals (variances, ``>= 0``);
            - a tuple ``(U, D)`` with ``U (K, d, r)`` and ``D (K, d)`` (``>= 0``):
              :math:`\Sigma_k = U_k U_k^T + \mathrm{diag}(D_k)`.

    Methods take images ``x`` of shape ``(B, *image_shape)`` and ``sigma`` a number or a ``(B,)`` tensor.
    ``normalize``/``denormalize`` are the identity (the prior lives directly in its intensity range).
    ``sigma_min``/``sigma_max`` (attributes, EDM defaults ``0.002``/``80``) are hints for samplers; ``nfe``
    counts denoiser evaluations (batch elements), like :class:`recon.priors.base.DiffusionPrior`.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __init__(self, weights, means, covariances) -> None:
        means_t = _as_float_tensor(means, "means")
        if means_t.dim() < 2:
            raise ValueError(
                f"means must have shape (K, *image_shape) with at least one image axis, got {tuple(means_t.shape)}"
            )
        k = int(means_t.shape[0])
        image_shape = tuple(int(s) for s in means_t.shape[1:])
        d = math.prod(image_shape)
        if k < 1 or d < 1:
            raise ValueError(f"means must have K >= 1 components and d >= 1 pixels, got shape {tuple(means_t.shape)}")
        device = means_t.device
        w = _as_float_tensor(weights, "weights").to(device=device, dtype=_F64)
        if tuple(w.shape) != (k,):
            raise ValueError(f"weights must have shape ({k},) (K from means), got {tuple(w.shape)}")
        if not torch.isfinite(w).all() or not (w > 0).all():
            raise ValueError(f"weights must be positive and finite, got {w.tolist()}")
        if not torch.isfinite(means_t).all():
            raise ValueError("means must be finite")
        comp = self._build_components(covariances, k, d, image_shape, device)
        self._setup(
            torch.log(w) - torch.logsumexp(torch.log(w), 0),
            means_t.to(_F64).reshape(k, d),
            comp,
            image_shape,
            means_t.dtype,
        )

    # -- construction --------------------------------------------------------------------------------
    @staticmethod
    def _build_components(covariances, k: int, d: int, image_shape: tuple, device):
        if isinstance(covariances, (tuple, list)):
            if len(covariances) != 2:
                raise ValueError(
                    f"covariances given as a tuple must be (U, D) with U (K, d, r) and D (K, d), "
                    f"got a {type(covariances).__name__} of length {len(covariances)}"
                )
            u = _as_float_tensor(covariances[0], "covariances U").to(device=device, dtype=_F64)
            dd = _as_float_tensor(covariances[1], "covariances D").to(device=device, dtype=_F64)
            if u.dim() != 3 or u.shape[0] != k or u.shape[1] != d or u.shape[2] < 1:
                raise ValueError(f"covariances U must have shape ({k}, {d}, r) with r >= 1, got {tuple(u.shape)}")
            if tuple(dd.shape) == (k, *image_shape):
                dd = dd.reshape(k, d)
            if tuple(dd.shape) != (k, d):
                raise ValueError(f"covariances D must have shape ({k}, {d}), got {tuple(dd.shape)}")
            if not (torch.isfinite(u).all() and torch.isfinite(dd).all()):
                raise ValueError("covariances (U, D) must be finite")
            if (dd < 0).any():
                raise ValueError(f"covariances D must be >= 0 (variances), got min {float(dd.min()):.3g}")
            return _LowRank(u, dd)
        cov_in = _as_float_tensor(covariances, "covariances")
        cov = cov_in.to(device=device, dtype=_F64)
        if tuple(cov.shape) == (k, d, d):
            if not torch.isfinite(cov).all():
                raise ValueError("covariances must be finite")
            scale = cov.abs().amax(dim=(-1, -2)).clamp_min(torch.finfo(_F64).tiny)
            asym = (cov - cov.transpose(-1, -2)).abs().amax(dim=(-1, -2))
            tol = _rel_tol(cov_in.dtype)
            bad = (asym > tol * scale).nonzero().flatten().tolist()
            if bad:
                raise ValueError(
                    f"covariances must be symmetric; component(s) {bad} have max |S - S^T| = "
                    f"{float(asym[bad[0]]):.3g} (relative tolerance {tol:.1g})"
                )
            cov = 0.5 * (cov + cov.transpose(-1, -2))
            lam = torch.linalg.eigvalsh(cov)
            lam_min, lam_max = lam[:, 0], lam[:, -1].abs().clamp_min(torch.finfo(_F64).tiny)
            bad = (lam_min < -tol * d * lam_max).nonzero().flatten().tolist()
            if bad:
                raise ValueError(
                    f"covariances must be positive semi-definite; component(s) {bad} have smallest eigenvalue "
                    f"{float(lam_min[bad[0]]):.3g} (largest {float(lam_max[bad[0]]):.3g})"
                )
            return _Full(cov)
        if tuple(cov.shape) in ((k, d), (k, *image_shape)):
            cov = cov.reshape(k, d)
            if not torch.isfinite(cov).all():
                raise ValueError("covariances must be finite")
            if (cov < 0).any():
                raise ValueError(f"diagonal covariances must be >= 0 (variances), got min {float(cov.min()):.3g}")
            return _Diag(cov)
        raise ValueError(
            f"covariances must have shape ({k}, {d}, {d}) (full), ({k}, {d}) or {_shape_str((k, *image_shape))} "
            f"(diagonal), or be a tuple (U ({k}, {d}, r), D ({k}, {d})), got {tuple(cov.shape)}"
        )

    def _setup(self, log_weights, means_flat, comp, image_shape, dtype) -> None:
        self._log_weights = log_weights  # (K,) float64, normalised
        self._means = means_flat  # (K, d) float64
        self._comp = comp
        self.image_shape = tuple(image_shape)
        self.dim = math.prod(self.image_shape)
        self.n_components = int(means_flat.shape[0])
        self.dtype = dtype
        self.device = means_flat.device
        self._cache = {self.device: (log_weights, means_flat, comp)}
        self.nfe = 0

    @classmethod
    def _create(cls, log_weights, means_flat, comp, image_shape, dtype, **attrs):
        obj = cls.__new__(cls)
        obj._setup(log_weights, means_flat, comp, image_shape, dtype)
        for name, value in attrs.items():
            setattr(obj, name, value)
        return obj

    def _on(self, device):
        """``(log_weights, means (K, d), components)`` on ``device`` (copied once, then cached)."""
        device = torch.device(device)
        hit = self._cache.get(device)
        if hit is None:
            hit = (self._log_weights.to(device), self._means.to(device), self._comp.to(device))
            self._cache[device] = hit
        return hit

    # -- properties ----------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """Covariance form of the components: ``"full"``, ``"diagonal"`` or ``"lowrank"``."""
        return self._comp.kind

    @property
    def weights(self) -> torch.Tensor:
        """``(K,)`` normalised mixture weights."""
        return torch.exp(self._log_weights).to(self.dtype)

    @property
    def log_weights(self) -> torch.Tensor:
        """``(K,)`` log of the normalised weights (float64; exact even where a weight underflows)."""
        return self._log_weights.clone()

    @property
    def means(self) -> torch.Tensor:
        """``(K, *image_shape)`` component means."""
        return self._means.reshape(self.n_components, *self.image_shape).to(self.dtype)

    @property
    def component_covariances(self) -> torch.Tensor:
        """``(K, d, d)`` dense component covariances (formed on demand: ``K d^2`` numbers)."""
        return self._comp.dense().to(self.dtype)

    @property
    def mean(self) -> torch.Tensor:
        r"""Mixture mean :math:`\sum_k w_k \mu_k`, shape ``image_shape``."""
        return self._mean64().reshape(self.image_shape).to(self.dtype)

    @property
    def covariance(self) -> torch.Tensor:
        r"""Mixture covariance :math:`\sum_k w_k (\Sigma_k + (\mu_k - m)(\mu_k - m)^T)`, shape ``(d, d)``."""
        w = torch.exp(self._log_weights)
        dev = self._means - self._mean64()
        cov = (w[:, None, None] * self._comp.dense()).sum(0) + (w[:, None] * dev).T @ dev
        return (0.5 * (cov + cov.T)).to(self.dtype)

    @property
    def variance(self) -> torch.Tensor:
        """Per-pixel variance of the mixture (the diagonal of ``covariance``, without forming it), ``image_shape``."""
        w = torch.exp(self._log_weights)
        dev = self._means - self._mean64()
        var = (w[:, None] * (self._comp.variances() + dev**2)).sum(0)
        return var.reshape(self.image_shape).to(self.dtype)

    @property
    def std(self) -> torch.Tensor:
        """Per-pixel standard deviation map of the mixture, shape ``image_shape``."""
        return self.variance.clamp_min(0).sqrt()

    def _mean64(self) -> torch.Tensor:
        return (torch.exp(self._log_weights)[:, None] * self._means).sum(0)

    # -- input checks --------------------------------------------------------------------------------
    def _check_x(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
        if x.dim() != len(self.image_shape) + 1 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"{name} must have shape {_shape_str(('B', *self.image_shape))}, got {tuple(x.shape)}")

    @staticmethod
    def _sigma(sigma, b: int, device) -> torch.Tensor:
        """``sigma`` as a float64 ``(B,)`` tensor on ``device`` (number, 0-d, ``(B,)`` or ``(B, 1, ..., 1)``)."""
        if isinstance(sigma, torch.Tensor):
            s = sigma.detach().to(device=device, dtype=_F64)
        else:
            try:
                s = torch.as_tensor(float(sigma), dtype=_F64, device=device)
            except (TypeError, ValueError) as err:
                raise ValueError(f"sigma must be a number or a tensor of shape ({b},), got {sigma!r}") from err
        if s.numel() == 1:
            s = s.reshape(()).expand(b)
        elif s.shape[0] == b and s.numel() == b:
            s = s.reshape(b)
        else:
            raise ValueError(f"sigma must be a number or a tensor of shape ({b},), got shape {tuple(s.shape)}")
        if not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"sigma must be finite and >= 0, got {s.tolist() if b <= 8 else s}")
        return s

    def _terms(self, x: torch.Tensor, s2: torch.Tensor):
        """Per-component terms for flattened float64 ``x (B, d)`` and ``s2 (B,)`` (all > 0 or handled)."""
        logw, mu, comp = self._on(x.device)
        v = x[None] - mu[:, None, :]  # (K, B, d)
        pv, spv, quad, logdet = comp.terms(v, s2)
        log_comp = -0.5 * (quad + logdet + self.dim * _LOG_2PI)  # (K, B)
        return logw, mu, comp, pv, spv, log_comp

    # -- the prior interface -------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Identity (the analytic prior is defined directly in its normalised range)."""
        return x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return x

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        r"""Exact :math:`\log p_\sigma(x) = \log \sum_k w_k \mathcal N(x; \mu_k, \Sigma_k + \sigma^2 I)`.

        Args:
            x: ``(B, *image_shape)``.
            sigma: noise level, a number or ``(B,)``; ``0`` gives the prior density itself (needs
                non-singular component covariances).

        Returns:
            ``(B,)`` in the dtype of ``x``; differentiable in ``x``.
        """
        self._check_x(x)
        b = x.shape[0]
        s = self._sigma(sigma, b, x.device)
        if (s == 0).any():
            _, _, comp = self._on(x.device)
            if comp.singular.any():
                bad = comp.singular.nonzero().flatten().tolist()
                raise ValueError(
                    f"log_prob at sigma = 0 needs non-singular covariances; component(s) {bad} are singular "
                    f"(the density does not exist): use sigma > 0"
                )
        x64 = x.reshape(b, self.dim).to(_F64)
        logw, _, _, _, _, log_comp = self._terms(x64, s**2)
        return torch.logsumexp(logw[:, None] + log_comp, dim=0).to(x.dtype)

    def responsibilities(self, x: torch.Tensor, sigma) -> torch.Tensor:
        r"""Posterior component probabilities :math:`r_k(x) = P(k \mid x)` under :math:`p_\sigma`, ``(B, K)``."""
        self._check_x(x)
        b = x.shape[0]
        s = self._sigma(sigma, b, x.device)
        if (s == 0).any() and self._on(x.device)[2].singular.any():
            raise ValueError("responsibilities at sigma = 0 need non-singular covariances; use sigma > 0")
        logw, _, _, _, _, log_comp = self._terms(x.reshape(b, self.dim).to(_F64), s**2)
        return torch.softmax(logw[:, None] + log_comp, dim=0).T.to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        r"""Exact Tweedie denoiser :math:`E[x_0 \mid x]` for :math:`x = x_0 + \sigma n`.

        Args:
            x: ``(B, *image_shape)``.
            sigma: a number or ``(B,)``, ``>= 0``; where ``sigma == 0`` the output is ``x`` itself.

        Returns:
            same shape, dtype and device as ``x``; differentiable in ``x``.
        """
        self._check_x(x)
        b = x.shape[0]
        s = self._sigma(sigma, b, x.device)
        self.nfe += b
        zero = s == 0
        s2 = torch.where(zero, torch.ones_like(s), s**2)  # σ = 0 returns x below
        x64 = x.reshape(b, self.dim).to(_F64)
        logw, mu, _, _, spv, log_comp = self._terms(x64, s2)
        r = torch.softmax(logw[:, None] + log_comp, dim=0)  # (K, B)
        out = (r[..., None] * (mu[:, None, :] + spv)).sum(0)
        if zero.any():
            out = torch.where(zero[:, None], x64, out)
        return out.reshape(x.shape).to(x.dtype)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        r"""Exact score :math:`\nabla_x \log p_\sigma(x) = -\sum_k r_k (\Sigma_k + \sigma^2 I)^{-1}(x - \mu_k)`
        (equal to ``(denoise(x, sigma) - x) / sigma**2``, computed without the cancellation).

        Args:
            x: ``(B, *image_shape)``.
            sigma: a number or ``(B,)``, ``> 0`` (``ValueError`` otherwise: the score of the prior itself
                is not part of the diffusion interface).

        Returns:
            same shape, dtype and device as ``x``.
        """
        self._check_x(x)
        b = x.shape[0]
        s = self._sigma(sigma, b, x.device)
        if (s <= 0).any():
            raise ValueError(f"score needs sigma > 0, got {s.tolist() if b <= 8 else 'a zero entry'}")
        self.nfe += b
        logw, _, _, pv, _, log_comp = self._terms(x.reshape(b, self.dim).to(_F64), s**2)
        r = torch.softmax(logw[:, None] + log_comp, dim=0)
        return (-(r[..., None] * pv).sum(0)).reshape(x.shape).to(x.dtype)

    def eps(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Noise estimate ``(x - denoise(x, sigma)) / sigma = -sigma * score(x, sigma)``; ``sigma > 0``."""
        self._check_x(x)
        s = self._sigma(sigma, x.shape[0], x.device)
        return -s.reshape(-1, *([1] * len(self.image_shape))).to(x.dtype) * self.score(x, s)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return self.denoise(x, sigma)

    def sample(
        self, n: int, generator: torch.Generator | None = None, return_components: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Exact samples of the prior: a component ``k ~ w``, then ``mu_k + Σ_k^{1/2} z``.

        Args:
            n: number of samples.
            generator: a ``torch.Generator`` for reproducibility; random numbers are drawn on its device
                (the default generator of the prior's device when ``None``) and moved to the prior's device.
            return_components: also return the ``(n,)`` int64 component labels.

        Returns:
            ``(n, *image_shape)`` in the dtype of ``means``, on the prior's device.
        """
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        n = int(n)
        gdev = generator.device if generator is not None else self.device
        logw, mu, comp = self._cache[self.device]
        probs = torch.exp(logw).to(gdev)
        labels = (
            torch.multinomial(probs, n, replacement=True, generator=generator)
            if n
            else probs.new_zeros(0, dtype=torch.long)
        )
        z = torch.randn(n, comp.n_noise, generator=generator, device=gdev, dtype=_F64).to(self.device)
        labels = labels.to(self.device)
        out = mu[labels].clone()
        for k in range(self.n_components):  # loop over components, not samples
            idx = (labels == k).nonzero().flatten()
            if idx.numel():
                out[idx] += comp.correlate(k, z[idx])
        out = out.reshape(n, *self.image_shape).to(self.dtype)
        return (out, labels) if return_components else out

    # -- posterior -----------------------------------------------------------------------------------
    def _dense_operator(self, physics, chunk: int = 256):
        """Dense ``A (m, d)`` float64 on the prior's device and the measurement shape."""
        d = self.dim
        if isinstance(physics, torch.Tensor):
            a = _as_float_tensor(physics, "physics").to(device=self.device, dtype=_F64)
            if a.dim() != 2 or a.shape[1] != d:
                raise ValueError(
                    f"physics given as a matrix must have shape (m, {d}) (d = prod(image_shape) = "
                    f"prod{self.image_shape}), got {tuple(a.shape)}"
                )
            return a, (int(a.shape[0]),)
        if not callable(getattr(physics, "A", None)):
            raise ValueError(
                f"physics must be a deepinv LinearPhysics (with .A) or a dense (m, {d}) tensor, "
                f"got {type(physics).__name__}"
            )
        cols, meas_shape, dtypes = [], None, [_F64, torch.float32]  # float32 if the physics only takes that
        for start, stop in _chunks(d, chunk):
            basis = torch.zeros(stop - start, d, dtype=_F64, device=self.device)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            basis = basis.reshape(stop - start, *self.image_shape)
            errors = []
            for dt in list(dtypes):
                try:
                    with torch.no_grad():
                        out = physics.A(basis.to(dt))
                    dtypes = [dt]
                    break
                except Exception as err:  # any failure: wrong image shape (or dtype; float32 is tried next)
                    errors.append(err)
            else:
                raise ValueError(
                    f"physics.A failed on inputs of shape {_shape_str(('B', *self.image_shape))} (the prior's "
                    f"image_shape {self.image_shape}, float64 and float32); the physics must act on the prior's "
                    f"images: {errors[0]}"
                ) from errors[0]
            if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != stop - start:
                raise ValueError("physics.A must return a tensor with the batch dimension first")
            if out.is_complex():
                raise ValueError("complex-valued physics are not supported (use real/imaginary channels)")
            shape = tuple(int(s) for s in out.shape[1:])
            if meas_shape is not None and shape != meas_shape:
                raise ValueError(f"physics.A returned inconsistent measurement shapes {meas_shape} and {shape}")
            meas_shape = shape
            cols.append(out.reshape(stop - start, -1).to(device=self.device, dtype=_F64))
        return torch.cat(cols).T.contiguous(), meas_shape

    def posterior(self, physics, y, sigma_y) -> GaussianMixturePosterior:
        r"""Exact posterior :math:`p(x_0 \mid y)` for :math:`y = A x_0 + \sigma_y \epsilon`, a Gaussian mixture.

        Args:
            physics: any deepinv ``LinearPhysics`` acting on ``(B, *image_shape)`` (its matrix is formed
                by applying ``physics.A`` to basis vectors in batches: small ``d`` only; its noise model is
                ignored, ``sigma_y`` is used), or a dense ``(m, d)`` tensor.
            y: the measurement, ``(1, *measurement_shape)``, ``measurement_shape`` or ``(m,)``.
            sigma_y: Gaussian noise standard deviation ``>= 0``. With ``sigma_y = 0``,
                ``A Σ_k A^T`` must be non-singular (``ValueError`` otherwise).

        Returns:
            a :class:`GaussianMixturePosterior` (a full-covariance :class:`GaussianMixturePrior`).

        Rows of ``A`` that are exactly zero (e.g. the missing pixels of ``Inpainting``, whose ``y`` keeps the
        image shape) carry no information about ``x_0`` and are dropped; this changes neither the posterior
        nor the weights (only ``log_evidence``, which is that of the kept rows).
        """
        a_full, meas_shape = self._dense_operator(physics)
        m_full = a_full.shape[0]
        yt = _as_float_tensor(y, "y").to(device=self.device, dtype=_F64)
        if tuple(yt.shape) not in ((m_full,), meas_shape, (1, *meas_shape)):
            raise ValueError(
                f"y must have shape {_shape_str((1, *meas_shape))} or ({m_full},) to match the physics, "
                f"got {tuple(yt.shape)}"
            )
        yv = yt.reshape(m_full)
        if not torch.isfinite(yv).all():
            raise ValueError("y must be finite")
        if isinstance(sigma_y, torch.Tensor):
            if sigma_y.numel() != 1:
                raise ValueError(f"sigma_y must be a number, got a tensor of shape {tuple(sigma_y.shape)}")
            sigma_y = float(sigma_y)
        try:
            sy = float(sigma_y)
        except (TypeError, ValueError) as err:
            raise ValueError(f"sigma_y must be a number >= 0, got {sigma_y!r}") from err
        if not (sy >= 0) or not math.isfinite(sy):
            raise ValueError(f"sigma_y must be finite and >= 0, got {sigma_y}")
        if not torch.isfinite(a_full).all():
            raise ValueError("the physics matrix has non-finite entries")
        kept = (a_full != 0).any(dim=1)
        if sy == 0 and not kept.all():
            off = yv[~kept].abs().max()
            if off > 1e-6 * max(1.0, float(yv.abs().max())):
                raise ValueError(f"y is non-zero ({float(off):.3g}) where A has zero rows: impossible with sigma_y = 0")
        a, yk = a_full[kept], yv[kept]
        m = a.shape[0]

        logw, mu, comp = self._cache[self.device]
        sat = comp.cov_matmul(a.T)  # Σ_k A^T, (K, d, m)
        s = a @ sat  # (K, m, m)
        s = 0.5 * (s + s.transpose(-1, -2)) + sy**2 * torch.eye(m, dtype=_F64, device=self.device)
        if m:
            ev = torch.linalg.eigvalsh(s)
            bad = (ev[:, 0] <= 1e-12 * ev[:, -1].abs().clamp_min(torch.finfo(_F64).tiny)).nonzero().flatten()
            if bad.numel():
                k0 = int(bad[0])
                raise ValueError(
                    f"A Σ_k A^T + sigma_y^2 I is singular for component(s) {bad.tolist()} (eigenvalues from "
                    f"{float(ev[k0, 0]):.3g} to {float(ev[k0, -1]):.3g}) with sigma_y = {sy}: give sigma_y > 0 or "
                    f"a physics whose rows are linearly independent under the prior"
                )
        chol = torch.linalg.cholesky(s)
        w_mat = torch.linalg.solve_triangular(chol, sat.transpose(-1, -2), upper=False)  # L^{-1} A Σ, (K, m, d)
        resid = yk[None, :] - mu @ a.T  # (K, m)
        u = torch.linalg.solve_triangular(chol, resid[..., None], upper=False)  # (K, m, 1)
        post_means = mu + (w_mat.transpose(-1, -2) @ u)[..., 0]
        post_cov = comp.dense() - w_mat.transpose(-1, -2) @ w_mat
        post_cov = 0.5 * (post_cov + post_cov.transpose(-1, -2))
        log_lik = (
            -0.5 * (u[..., 0] ** 2).sum(-1)
            - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            - 0.5 * m * _LOG_2PI
        )
        joint = logw + log_lik
        log_evidence = torch.logsumexp(joint, 0)
        return GaussianMixturePosterior._create(
            joint - log_evidence,
            post_means,
            _Full(post_cov),
            self.image_shape,
            self.dtype,
            matrix=a,
            y=yk,
            sigma_y=sy,
            log_evidence=float(log_evidence),
            kept_rows=kept.nonzero().flatten(),
            measurement_shape=meas_shape,
        )

    # -- constructors --------------------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        image_shape: Sequence[int],
        n_components: int,
        rank: int | None = None,
        seed: int = 0,
        scale: float = 0.3,
        length_scale: float = 2.0,
        noise_std: float = 0.05,
        mean_scale: float = 0.5,
        weights: Sequence[float] | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> GaussianMixturePrior:
        r"""A reproducible random mixture of smooth Gaussian fields on the pixel grid.

        Component ``k`` has covariance :math:`a_k^2\, K_{SE} + \text{noise\_std}^2 I`, where :math:`K_{SE}` is
        the squared-exponential kernel :math:`\exp(-|i - j|^2 / (2\ell^2))` on the pixel grid (``ℓ =
        length_scale`` pixels; channels, the first axis of a 3+ axis ``image_shape``, are independent) and
        :math:`a_k = \text{scale} \cdot u_k`, :math:`u_k \in [0.75, 1.25)` random. The kernel is a Kronecker
        product, so its eigendecomposition comes from the small per-axis factors. Means are independent smooth
        fields (SE kernel, standard deviation ``mean_scale``).

        Args:
            rank: ``None``: full ``(K, d, d)`` covariances (``d^2`` numbers per component: small images);
                ``r >= 1``: low-rank-plus-diagonal, the top ``r`` eigenpairs of :math:`a_k^2 K_{SE}` plus
                ``noise_std^2 I`` (cheap for 64 x 64 images); ``0``: diagonal ``(a_k^2 + noise_std^2) I``.
            weights: ``(K,)`` mixture weights; default random in ``[0.5, 1.5)`` (then normalised).
        """
        shape = tuple(int(s) for s in image_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"image_shape must be a non-empty tuple of positive ints, got {image_shape!r}")
        if int(n_components) != n_components or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
        k = int(n_components)
        d = math.prod(shape)
        if rank is not None and (int(rank) != rank or not 0 <= rank <= d):
            raise ValueError(f"rank must be None or an integer in [0, {d}], got {rank!r}")
        for name, val in (("scale", scale), ("length_scale", length_scale), ("noise_std", noise_std)):
            if not val > 0:
                raise ValueError(f"{name} must be positive, got {val}")
        gen = torch.Generator().manual_seed(int(seed))
        # per-axis factors: channels independent (identity), spatial axes SE kernels
        factors = []
        for i, n_ax in enumerate(shape):
            if len(shape) >= 3 and i == 0:
                factors.append((torch.ones(n_ax, dtype=_F64), torch.eye(n_ax, dtype=_F64)))
            else:
                t = torch.arange(n_ax, dtype=_F64)
                kern = torch.exp(-((t[:, None] - t[None, :]) ** 2) / (2.0 * float(length_scale) ** 2))
                lam, vec = torch.linalg.eigh(kern)
                factors.append((lam.clamp_min(0), vec))
        amp = float(scale) * (0.75 + 0.5 * torch.rand(k, generator=gen, dtype=_F64))
        if weights is None:
            w = 0.5 + torch.rand(k, generator=gen, dtype=_F64)
        else:
            w = _as_float_tensor(weights, "weights").to(_F64)
        # means: smooth fields, x = (⊗ V_a Λ_a^{1/2}) z applied axis by axis
        means = torch.randn(k, *shape, generator=gen, dtype=_F64)
        for ax, (lam, vec) in enumerate(factors):
            root = vec * lam.sqrt()
            means = torch.movedim(torch.tensordot(root, means, dims=([1], [ax + 1])), 0, ax + 1)
        means = float(mean_scale) * means
        nug = float(noise_std) ** 2
        if rank is None:
            kern = torch.ones(1, 1, dtype=_F64)
            for lam, vec in factors:
                kern = torch.kron(kern, (vec * lam) @ vec.T)
            cov = amp[:, None, None] ** 2 * kern + nug * torch.eye(d, dtype=_F64)
        elif rank == 0:
            cov = (amp[:, None] ** 2 + nug) * torch.ones(k, d, dtype=_F64)
        else:
            lam_all = torch.ones((), dtype=_F64)
            for lam, _ in factors:
                lam_all = (lam_all[..., None] * lam).reshape(-1)
            top = torch.topk(lam_all, int(rank)).indices
            idx = torch.unravel_index(top, shape)
            basis = factors[0][1][:, idx[0]]
            for (_, vec), ix in zip(factors[1:], idx[1:], strict=True):
                basis = (basis[:, None, :] * vec[:, ix][None, :, :]).reshape(-1, basis.shape[-1])
            u0 = basis * lam_all[top].sqrt()  # (d, r)
            cov = (amp[:, None, None] * u0[None], nug * torch.ones(k, d, dtype=_F64))
        if device is not None:
            means = means.to(device)
            cov = tuple(c.to(device) for c in cov) if isinstance(cov, tuple) else cov.to(device)
        return cls(w, means.to(dtype), cov)

    def to(self, device) -> GaussianMixturePrior:
        """Make ``device`` the home device (where ``sample``/``mean``/... are returned); returns ``self``."""
        hit = self._on(device)
        self._log_weights, self._means, self._comp = hit
        self.device = torch.device(device)
        return self

    def __repr__(self) -> str:
        w = ", ".join(f"{float(v):.3g}" for v in torch.exp(self._log_weights)[:6])
        more = ", ..." if self.n_components > 6 else ""
        rank = f", rank={self._comp.u.shape[-1]}" if self.kind == "lowrank" else ""
        return (
            f"{type(self).__name__}(K={self.n_components}, image_shape={self.image_shape}, "
            f"covariance={self.kind!r}{rank}, weights=[{w}{more}])"
        )


class GaussianPrior(GaussianMixturePrior):
    """A single Gaussian ``N(mean, covariance)``: the mixture with ``K = 1``.

    Args:
        mean: ``image_shape``.
        covariance: ``(d, d)`` full (symmetric PSD), ``(d,)`` or ``image_shape`` diagonal, or
            ``(U (d, r), D (d,))`` low rank plus diagonal.
    """

    def __init__(self, mean, covariance) -> None:
        mean_t = _as_float_tensor(mean, "mean")
        if mean_t.dim() < 1:
            raise ValueError(f"mean must have shape image_shape (at least one axis), got {tuple(mean_t.shape)}")
        if isinstance(covariance, (tuple, list)):
            if len(covariance) != 2:
                raise ValueError(f"covariance given as a tuple must be (U, D), got length {len(covariance)}")
            cov = (
                _as_float_tensor(covariance[0], "covariance U")[None],
                _as_float_tensor(covariance[1], "covariance D")[None],
            )
        else:
            cov = _as_float_tensor(covariance, "covariance")[None]
        super().__init__(torch.ones(1, dtype=_F64, device=mean_t.device), mean_t[None], cov)


class GaussianMixturePosterior(GaussianMixturePrior):
    """The exact posterior of a :class:`GaussianMixturePrior` under ``y = A x0 + sigma_y * noise``.

    A full-covariance :class:`GaussianMixturePrior` (so ``denoise``/``score``/``log_prob``/``sample``/
    ``mean``/``covariance``/``std``/``weights`` all apply, and it can be conditioned again), plus:

    - ``matrix``: the dense ``(m, d)`` operator (float64; zero rows of the physics dropped);
    - ``y``: ``(m,)`` the matching measurements; ``sigma_y``: the noise level;
    - ``kept_rows``: indices of the kept rows in the flattened measurement; ``measurement_shape``;
    - ``log_evidence``: ``log p(y)`` of the kept rows.

    Built by :meth:`GaussianMixturePrior.posterior`. With ``sigma_y = 0`` the component covariances are
    singular (the data fix ``A x0``): ``log_prob`` then needs ``sigma > 0``.
    """

    matrix: torch.Tensor
    y: torch.Tensor
    sigma_y: float
    log_evidence: float
    kept_rows: torch.Tensor
    measurement_shape: tuple

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("GaussianMixturePosterior is built by GaussianMixturePrior.posterior(physics, y, sigma_y)")


# ---------------------------------------------------------------------------------------------------------
# test problem
# ---------------------------------------------------------------------------------------------------------
def bimodal_inpainting_example(
    image_shape: Sequence[int] = (1, 8, 8),
    seed: int = 0,
    sigma_y: float = 0.01,
    weights: Sequence[float] = (0.3, 0.7),
    separation: float = 1.5,
):
    """An inpainting problem whose posterior has two well-separated modes with unequal weights.

    The prior has two components with the same smooth covariance (``GaussianMixturePrior.random`` kernel,
    full, ``scale=0.3``, ``length_scale=2``, ``noise_std=0.1``) and means ``base ± separation/2`` inside a
    centred box (half the size along every spatial axis) and equal to ``base`` outside it. The box is the
    missing region of an ``Inpainting`` mask, so the observed pixels cannot tell the components apart: the
    posterior weights equal the prior ``weights`` (0.3/0.7) exactly, and the two posterior means differ by
    exactly ``separation`` on every missing pixel (many posterior standard deviations).

    Args:
        image_shape: ``(C, H, W)`` or ``(C, D, H, W)``.
        seed: seeds the base image and the ground truth / noise of ``y``.

    Returns:
        ``(prior, physics, y, sigma_y)``: a :class:`GaussianMixturePrior` (full covariances), a
        ``recon.operators.Inpainting`` with a deepinv ``GaussianNoise(sigma_y)`` noise model, ``y`` of shape
        ``(1, *image_shape)`` (``A x_true + sigma_y * noise``, noise on every entry as the physics would
        add it, with ``x_true`` drawn from the prior) and ``sigma_y``.
    """
    from deepinv.physics import GaussianNoise

    from recon.operators.inpainting import Inpainting, box_mask

    shape = tuple(int(s) for s in image_shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"image_shape must be (C, H, W) or (C, D, H, W), got {tuple(image_shape)}")
    spatial = shape[1:]
    if any(n < 2 for n in spatial):
        raise ValueError(f"image_shape needs spatial sizes >= 2, got {shape}")
    w = _as_float_tensor(weights, "weights").to(_F64)
    if tuple(w.shape) != (2,):
        raise ValueError(f"weights must have 2 entries, got shape {tuple(w.shape)}")
    if not sigma_y >= 0:
        raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
    mask = box_mask(spatial, [(n // 4, n - n // 4) for n in spatial])
    base = GaussianMixturePrior.random(shape, 1, seed=seed, scale=0.3, length_scale=2.0, noise_std=0.1)
    hole = (1.0 - mask.to(_F64)).expand(shape)
    mu0 = base.means[0]
    means = torch.stack([mu0 + 0.5 * separation * hole, mu0 - 0.5 * separation * hole])
    cov = base.component_covariances.expand(2, -1, -1)
    prior = GaussianMixturePrior(w, means, cov)
    physics = Inpainting(spatial, mask, noise_model=GaussianNoise(sigma=float(sigma_y)))
    gen = torch.Generator().manual_seed(int(seed) + 1)
    x_true = prior.sample(1, generator=gen)
    y = physics.A(x_true) + float(sigma_y) * torch.randn(x_true.shape, generator=gen, dtype=x_true.dtype)
    return prior, physics, y, float(sigma_y)
