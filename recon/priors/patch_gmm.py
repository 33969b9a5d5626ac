"""Patch Gaussian-mixture prior (EPLL-style, one step): exact GMM posterior means of every overlapping patch,
averaged back into the image. Derivation and measurements: ``docs/methods/patch-gmm.md``.

Refit the shipped CT model (reads the CT prior's recipe data, ``RECON_PRIOR_DATA``)::

    python -m recon.priors.patch_gmm --fit --out recon/priors/weights/patch-gmm-ct
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recon.priors.base import IntensityWindow, intensity_from_config
from recon.priors.gaussian import GaussianMixturePrior

__all__ = ["PatchGMMPrior", "fit_patch_gmm", "load_patch_gmm", "sample_patches", "save_patch_gmm"]

FORMAT = "recon-patch-gmm"
WEIGHTS = "model.safetensors"
CARD = "model_card.json"
_F64 = torch.float64


class PatchGMMPrior:
    r"""Patch Gaussian-mixture prior: ``p(patch) = Σ_k w_k N(μ_k, Σ_k)`` on ``p × p`` patches.

    ``denoise(x, σ)`` takes every patch of ``x`` (stride ``stride``), computes its exact posterior mean under
    the mixture for ``x = x_0 + σ n`` (covariances ``Σ_k + σ² I``, responsibilities from that noised mixture),
    and averages the overlapping estimates (``unfold``/``fold``). With ``remove_mean`` the mixture models the
    zero-mean part of each patch and the noisy patch mean is kept (EPLL). ``score = (denoise - x) / σ²``.
    The samplers' prior contract of :class:`recon.priors.base.DiffusionPrior` (``denoise``, ``score``, ``eps``,
    ``normalize``/``denormalize``, ``sigma_min``/``sigma_max``, ``nfe``, ``card``) holds.

    Args:
        weights: ``(K,)`` mixture weights.
        means: ``(K, p*p)`` component means.
        covariances: ``(K, p*p, p*p)`` full covariances (symmetric PSD).
        patch_size: ``p``.
        stride: patch step (the image is reflect-padded at the bottom/right so patches cover it).
        remove_mean: the mixture models mean-free patches (EPLL); the noisy patch mean is added back.
        intensity: physical units ↔ ``[-1, 1]`` (default the CT prior's window [-1000, 1500] HU).
        card: model card (data, K, patch size, fit time, seed...).
        chunk: patches per vectorised block (memory ``~ 5 · chunk · K · p² · 8`` bytes).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    channels: int = 1
    spatial_dims: int = 2

    def __init__(self, weights, means, covariances, patch_size: int, stride: int = 1, remove_mean: bool = False,
                 intensity=None, card: dict | None = None, chunk: int = 2048) -> None:
        p = int(patch_size)
        if p < 1 or int(stride) < 1 or int(stride) > p:
            raise ValueError(f"need patch_size >= 1 and 1 <= stride <= patch_size, got {patch_size}, {stride}")
        means = torch.as_tensor(means, dtype=_F64)
        if means.dim() != 2 or means.shape[1] != p * p:
            raise ValueError(f"means must have shape (K, {p * p}) for {p}×{p} patches, got {tuple(means.shape)}")
        self.gmm = GaussianMixturePrior(weights, means, torch.as_tensor(covariances, dtype=_F64))
        self.patch_size, self.stride, self.remove_mean = p, int(stride), bool(remove_mean)
        self.intensity = IntensityWindow(-1000.0, 1500.0, "HU") if intensity is None else intensity
        self.card = dict(card or {})
        self.chunk = int(chunk)
        self.nfe = 0
        self._cache: dict = {}

    # -- parameters ---------------------------------------------------------------------------------------
    @property
    def n_components(self) -> int:
        """Number of mixture components ``K``."""
        return self.gmm.n_components

    def _params(self, device):
        """``log w (K,)``, ``μ (K, d)``, eigenvalues ``λ (K, d)``, eigenvectors stacked ``W (d, K d)`` and the
        projected means ``c_k = V_kᵀ μ_k (K, d)``, float64 on ``device`` (from the mixture's own eigensystem)."""
        key = str(device)
        if key not in self._cache:
            logw, mu, comp = self.gmm._on(device)
            k, d = mu.shape
            w = comp.vec.permute(1, 0, 2).reshape(d, k * d).contiguous()
            c = torch.einsum("kd,kde->ke", mu, comp.vec)
            self._cache[key] = (logw, mu, comp.lam, w, c)
        return self._cache[key]

    # -- patch posterior means ----------------------------------------------------------------------------
    def patch_posterior_mean(self, patches: torch.Tensor, sigma: float) -> torch.Tensor:
        r"""Exact :math:`E[x_0 \mid y]` for patches ``y = x_0 + σ n`` under the mixture, ``(N, p²)`` → ``(N, p²)``.

        With :math:`\Sigma_k = V_k \Lambda_k V_k^T`, :math:`z_k = (\Lambda_k + σ^2)^{-1/2} V_k^T (y - μ_k)`:
        :math:`\log r_k = \log w_k - (|z_k|^2 + \log\det(\Lambda_k + σ^2)) / 2` (softmax over k) and
        :math:`E[x_0 \mid y] = \sum_k r_k (μ_k + V_k \Lambda_k (\Lambda_k + σ^2)^{-1/2} z_k)`: two GEMMs
        against the stacked ``(p², K p²)`` bases per block of patches.

        Args:
            patches: ``(N, p*p)`` float32 or float64, the compute dtype (mean-free when ``remove_mean``: the
                caller removes it).
            sigma: noise level ``> 0``.

        Returns:
            ``(N, p*p)`` in the dtype of ``patches``.
        """
        logw, mu, lam, w, c = self._params(patches.device)
        k, d = mu.shape
        var = lam + sigma**2  # (K, d): Σ_k + σ² I is diagonal in V_k's basis
        isd = var.rsqrt()
        dt = patches.dtype
        w_in = (w * isd.reshape(1, k * d)).to(dt)  # columns V_k Λ^{-1/2}
        c_in = (c * isd).reshape(1, k * d).to(dt)
        w_out = (w * (lam * isd).reshape(1, k * d)).T.contiguous().to(dt)  # rows Λ (Λ+σ²)^{-1/2} V_kᵀ
        bias = (logw - 0.5 * torch.log(var).sum(-1)).to(dt)
        mu_d = mu.to(dt)
        out = []
        for start in range(0, patches.shape[0], self.chunk):
            y = patches[start : start + self.chunk]
            z = torch.addmm(c_in, y, w_in, beta=-1).view(-1, k, d)
            r = torch.softmax(bias - 0.5 * torch.linalg.vector_norm(z, dim=-1) ** 2, dim=-1)  # (n, K)
            out.append(torch.addmm(r @ mu_d, (z * r[..., None]).view(-1, k * d), w_out))
        return torch.cat(out)

    def _denoise_image(self, img: torch.Tensor, sigma: float) -> torch.Tensor:
        """One ``(H, W)`` image (``H, W >= p``) at one ``σ > 0``."""
        p, s = self.patch_size, self.stride
        h, w = img.shape
        if h < p or w < p:
            raise ValueError(f"images must be at least {p}×{p} (the patch size), got {h}×{w}")
        ph, pw = (-(h - p)) % s, (-(w - p)) % s
        x = img[None, None]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        size = x.shape[-2:]
        cols = F.unfold(x, p, stride=s)[0].T  # (N, p²), in the compute dtype
        if self.remove_mean:
            dc = cols.mean(-1, keepdim=True)
            est = self.patch_posterior_mean(cols - dc, sigma) + dc
        else:
            est = self.patch_posterior_mean(cols, sigma)
        num = F.fold(est.T[None], size, p, stride=s)
        den = F.fold(torch.ones_like(est).T[None], size, p, stride=s)
        return (num / den)[0, 0, :h, :w]

    # -- the prior interface ------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Physical units (HU) → the prior's range [-1, 1]."""
        return self.intensity.normalize(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The prior's range → physical units."""
        return self.intensity.denormalize(x)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Patch-averaged posterior mean for ``x = x_0 + σ n``; ``σ = 0`` returns ``x``.

        Args:
            x: ``(B, 1, H, W)`` or a volume ``(B, 1, D, H, W)`` (slice by slice), ``H, W >= patch_size``.
            sigma: a number or a ``(B,)`` tensor, ``>= 0``.

        Returns:
            same shape, dtype and device as ``x`` (computed in ``x``'s dtype: float32 is about 3× faster than
            float64); differentiable in ``x``.
        """
        if x.dim() not in (4, 5) or x.shape[1] != 1:
            raise ValueError(f"x must be (B, 1, H, W) or (B, 1, D, H, W), got {tuple(x.shape)}")
        sig = _sigma_list(sigma, x.shape[0])
        self.nfe += x.shape[0]
        out = []
        for b, s in enumerate(sig):
            slices = x[b, 0].reshape(-1, *x.shape[-2:])
            if s == 0:
                out.append(x[b])
                continue
            out.append(torch.stack([self._denoise_image(sl, s) for sl in slices]).reshape(x.shape[1:]))
        return torch.stack(out)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``(denoise(x, σ) - x) / σ²`` (``σ > 0``).

        Args:
            x: as for :meth:`denoise`.
            sigma: a number or a ``(B,)`` tensor, ``> 0``.

        Returns:
            same shape as ``x``.
        """
        s = torch.tensor(_sigma_list(sigma, x.shape[0]), dtype=x.dtype, device=x.device)
        if (s <= 0).any():
            raise ValueError("score needs sigma > 0")
        return (self.denoise(x, s) - x) / s.reshape(-1, *([1] * (x.dim() - 1))) ** 2

    def eps(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The noise estimate ``(x - denoise(x, σ)) / σ`` (``σ > 0``).

        Args:
            x: as for :meth:`denoise`.
            sigma: a number or a ``(B,)`` tensor, ``> 0``.

        Returns:
            same shape as ``x``.
        """
        s = torch.tensor(_sigma_list(sigma, x.shape[0]), dtype=x.dtype, device=x.device)
        return -s.reshape(-1, *([1] * (x.dim() - 1))) * self.score(x, s)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return self.denoise(x, sigma)

    def patch_log_prob(self, patches: torch.Tensor) -> torch.Tensor:
        """Log-density of ``(N, p*p)`` patches under the mixture (mean-free patches when ``remove_mean``).

        Args:
            patches: ``(N, p*p)``.

        Returns:
            ``(N,)`` float64.
        """
        return self.gmm.log_prob(torch.as_tensor(patches, dtype=_F64))


def _sigma_list(sigma, b: int) -> list[float]:
    """``sigma`` (number, 0-d or ``(B,)`` tensor) as ``B`` floats, checked finite and ``>= 0``."""
    if isinstance(sigma, torch.Tensor):
        vals = sigma.detach().double().flatten().tolist()
    else:
        vals = [float(sigma)]
    if len(vals) == 1:
        vals = vals * b
    if len(vals) != b:
        raise ValueError(f"sigma must be a number or a tensor of shape ({b},), got {len(vals)} values")
    if not all(math.isfinite(v) and v >= 0 for v in vals):
        raise ValueError("sigma must be finite and >= 0")
    return vals


# -------------------------------------------------------------------------------------------------------------
# data, fit, save/load
# -------------------------------------------------------------------------------------------------------------
def sample_patches(slices: list[torch.Tensor], n: int, patch_size: int, seed: int = 0, min_foreground: float = 0.25,
                   unrestricted: float = 0.05) -> np.ndarray:
    """Random ``p × p`` patches of ``slices`` (images in [-1, 1]), most with some tissue in them.

    Args:
        slices: 2D tensors at least ``patch_size`` each way.
        n: number of patches.
        patch_size: ``p``.
        seed: the generator's seed.
        min_foreground: share of a patch's pixels above -0.98 (air is -1) a patch needs to be kept ...
        unrestricted: ... except for this share of the patches, drawn without the threshold (so air and its
            edges are in the model too).

    Returns:
        ``(n, p*p)`` float64.
    """
    rng = np.random.default_rng(seed)
    arrays = [s.double().numpy() for s in slices if min(s.shape) >= patch_size]
    sizes = np.array([a.size for a in arrays], dtype=np.float64)
    out, have, n_free = [], 0, round(unrestricted * n)
    while have < n:
        m = 4 * (n - have) + 1024
        which = rng.choice(len(arrays), size=m, p=sizes / sizes.sum())
        batch = []
        for i in np.unique(which):
            a = arrays[i]
            cnt = int((which == i).sum())
            r = rng.integers(0, a.shape[0] - patch_size + 1, cnt)
            c = rng.integers(0, a.shape[1] - patch_size + 1, cnt)
            idx = (r[:, None, None] + np.arange(patch_size)[:, None], c[:, None, None] + np.arange(patch_size))
            batch.append(a[idx].reshape(cnt, -1))
        batch = np.concatenate(batch)[rng.permutation(m)]
        fg = (batch > -0.98).mean(-1)
        free = max(0, n_free - have)
        keep = np.concatenate([batch[:free], batch[free:][fg[free:] >= min_foreground]])
        out.append(keep[: n - have])
        have += len(out[-1])
    return np.concatenate(out)


def fit_patch_gmm(patches: np.ndarray, patch_size: int, n_components: int, seed: int = 0,
                  remove_mean: bool = False, max_iter: int = 100, card: dict | None = None) -> PatchGMMPrior:
    """Fit a full-covariance mixture (scikit-learn ``GaussianMixture``, k-means start) to ``patches``.

    Args:
        patches: ``(N, p*p)`` in [-1, 1].
        patch_size: ``p``.
        n_components: ``K``.
        seed: scikit-learn's ``random_state``.
        remove_mean: fit the mean-free patches (EPLL).
        max_iter: EM iterations at most.
        card: extra model-card fields.

    Returns:
        the fitted :class:`PatchGMMPrior` (its card records K, p, the fit time, iterations and convergence).
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(patches, dtype=np.float64)
    if remove_mean:
        x = x - x.mean(1, keepdims=True)
    t0 = time.perf_counter()
    gm = GaussianMixture(n_components, covariance_type="full", reg_covar=1e-6, max_iter=max_iter, tol=1e-3,
                         random_state=seed, init_params="kmeans").fit(x)
    info = {"format": FORMAT, "patch_size": patch_size, "n_components": n_components, "remove_mean": remove_mean,
            "n_patches": len(x), "seed": seed, "reg_covar": 1e-6, "em_iterations": int(gm.n_iter_),
            "converged": bool(gm.converged_), "fit_seconds": round(time.perf_counter() - t0, 1),
            "mean_train_loglik_per_patch": float(gm.score(x))}
    return PatchGMMPrior(gm.weights_, gm.means_, gm.covariances_, patch_size, remove_mean=remove_mean,
                         card={**info, **(card or {})})


def save_patch_gmm(prior: PatchGMMPrior, folder: str | os.PathLike) -> Path:
    """Write ``folder/model.safetensors`` (float64 weights, means, covariances) and ``folder/model_card.json``.

    Args:
        prior: the fitted prior.
        folder: output folder (created).

    Returns:
        the folder.
    """
    from safetensors.torch import save

    from recon.datasets.io import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gmm = prior.gmm
    state = {name: t.to(_F64).cpu().contiguous() for name, t in
             (("weights", gmm.weights), ("means", gmm.means), ("covariances", gmm.component_covariances))}
    card = {**{k: v for k, v in prior.card.items() if k != "path"}, "format": FORMAT, "format_version": 1,
            "patch_size": prior.patch_size, "stride": prior.stride, "remove_mean": prior.remove_mean,
            "n_components": prior.n_components, "intensity": prior.intensity.config()}
    atomic_write_bytes(save(state, metadata={"format": FORMAT}), folder / WEIGHTS, overwrite=True)
    atomic_write_bytes((json.dumps(card, indent=2) + "\n").encode(), folder / CARD, overwrite=True)
    return folder


def load_patch_gmm(folder: str | os.PathLike, stride: int | None = None) -> PatchGMMPrior:
    """Read a folder written by :func:`save_patch_gmm`; a missing or unreadable file is a one-line error.

    Args:
        folder: the folder (``model.safetensors`` + ``model_card.json``).
        stride: override the card's patch stride.

    Returns:
        the :class:`PatchGMMPrior`.

    Raises:
        FileNotFoundError: a file is missing (the message names its path).
        ValueError: the card is not a patch-GMM card, or the weights are unreadable.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CARD, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing (a patch-GMM prior folder holds {WEIGHTS} and {CARD})")
    try:
        card = json.loads((folder / CARD).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CARD}: not valid JSON ({err})") from err
    if card.get("format") != FORMAT:
        raise ValueError(f"{folder / CARD}: not a patch-GMM card (format {card.get('format')!r}, expected {FORMAT!r})")
    try:
        st = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{folder / WEIGHTS}: unreadable safetensors file ({err})") from err
    return PatchGMMPrior(st["weights"], st["means"], st["covariances"], card["patch_size"],
                         stride=card.get("stride", 1) if stride is None else stride,
                         remove_mean=card.get("remove_mean", False),
                         intensity=intensity_from_config(card.get("intensity")),
                         card=card | {"path": str(folder)})


# -------------------------------------------------------------------------------------------------------------
# the recipe
# -------------------------------------------------------------------------------------------------------------
def recipe_patches(n: int, patch_size: int, seed: int = 0, exclude_files: tuple = ()) -> tuple[np.ndarray, dict]:
    """Patches from the CT prior's training slices, read as its trainer reads them.

    Args:
        n: number of patches.
        patch_size: ``p``.
        seed: sampling seed.
        exclude_files: training file names left out (for a validation split).

    Returns:
        ``(n, p*p)`` patches and a description of the data for the card.
    """
    from recon.priors.train import default_ct_config, load_training_slices

    cfg = default_ct_config(out=os.devnull)
    cfg.exclude = (*cfg.exclude, *exclude_files)
    slices, report = load_training_slices(cfg)
    used = [Path(u).name for u in report[0]["used"]]
    patches = sample_patches(slices, n, patch_size, seed)
    return patches, {"data": {"recipe": "recon.priors.train.default_ct_config (real slices; no phantoms or "
                                        "augmentation)", "files": used, "slices": len(slices),
                              "excluded_prefixes": list(cfg.exclude)}}


def main(argv: list[str] | None = None) -> None:
    """``python -m recon.priors.patch_gmm --fit --out FOLDER [--k K] [--patch P] [--n N] [--seed S]``.

    Args:
        argv: command-line arguments (default ``sys.argv``).
    """
    ap = argparse.ArgumentParser(description="Fit the CT patch-GMM prior on the CT prior's recipe data.")
    ap.add_argument("--fit", action="store_true", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--remove-mean", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    patches, data = recipe_patches(args.n, args.patch, args.seed)
    prior = fit_patch_gmm(patches, args.patch, args.k, args.seed, args.remove_mean,
                          card={**data, "refit": f"python -m recon.priors.patch_gmm --fit --out OUT --k {args.k} "
                                                 f"--patch {args.patch} --n {args.n} --seed {args.seed}"
                                                 + (" --remove-mean" if args.remove_mean else "")})
    save_patch_gmm(prior, args.out)
    print(json.dumps({k: v for k, v in prior.card.items() if k != "data"}))


if __name__ == "__main__":
    main()
