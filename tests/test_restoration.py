"""Few-step restoration diffusion (``recon.restoration``): ResShift and RDDM schedules, samplers, degradations,
training with exact resume, the restorer format, and ``recon restore`` / ``recon train-restorer`` end to end.

The reference values are computed here from the published formulas (ResShift's ``get_named_eta_schedule`` and
Gaussian process; RDDM's ``gen_coefficients``), independently of the code under test; the samplers are checked with
oracle networks that return the true ``x0`` (ResShift) or the true residual and noise (RDDM).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from recon.cli import main
from recon.datasets.io import read_image
from recon.restoration.degradations import Degradation
from recon.restoration.io import load_restorer, save_restorer
from recon.restoration.schedules import RDDMSchedule, ResShiftSchedule, rddm_sample, resshift_sample
from recon.restoration.train import RestorerConfig, train_restorer

CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the CPU is shared: one thread per test process


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "recon.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


# ------------------------------------------------------------------------------------------- reference formulas
def official_sqrt_etas(T, p, kappa, min_noise_level, etas_end):
    """ResShift ``get_named_eta_schedule('exponential', ...)``, written out with NumPy."""
    start = min(min_noise_level / kappa, min_noise_level)
    increaser = math.exp(1 / (T - 1) * math.log(etas_end / start))
    power_timestep = np.linspace(0, 1, T, endpoint=True) ** p * (T - 1)
    return np.power(np.full(T, increaser), power_timestep) * start


def official_rddm(T, sum_scale):
    """RDDM ``gen_coefficients``: alphas 'decreased' (sum 1), betas2 'increased' (sum sum_scale)."""
    x = np.arange(1, T + 1, dtype=np.float64)
    scale = 0.5 * T * (T + 1)
    alphas = x[::-1] / scale
    betas2 = sum_scale * x / scale
    return alphas, np.clip(np.cumsum(alphas), 0, 1), betas2, np.clip(np.cumsum(betas2), 0, 1)


def stats_close(draws, mean, var, what):
    """Sample mean/variance over axis 0 against the closed form: 5 standard errors."""
    n = draws.shape[0]
    m, v = draws.mean(0), draws.var(0)
    assert torch.all((m - mean).abs() <= 5 * (var / n).sqrt() + 1e-7), (what, "mean", (m - mean).abs().max())
    assert torch.all((v - var).abs() <= 5 * var * math.sqrt(2 / n) + 1e-9), (what, "variance", (v / var).max())


# --------------------------------------------------------------------------------------------------- schedules
def test_resshift_schedule_matches_the_official_parameterisation():
    s = ResShiftSchedule()  # conference: T 15, p 0.3, kappa 2, min_noise_level 0.04, etas_end 0.99
    ref = official_sqrt_etas(15, 0.3, 2.0, 0.04, 0.99)
    assert s.T == 15 and np.allclose(s.sqrt_etas.numpy(), ref, rtol=1e-12, atol=0)
    assert s.etas[0].item() == pytest.approx((0.04 / 2.0) ** 2, rel=1e-12)  # eta_1 = 4e-4
    assert s.sqrt_etas[-1].item() == pytest.approx(0.99, rel=1e-12)  # etas_end is sqrt(eta_T) ...
    assert s.etas[-1].item() == pytest.approx(0.9801, rel=1e-12)  # ... not eta_T (paper: 0.999)
    # the power-law shape: log(sqrt(eta_t)/sqrt(eta_1)) / log(etas_end/sqrt(eta_1)) = ((t-1)/(T-1))^p
    frac = np.log(s.sqrt_etas.numpy() / 0.02) / np.log(0.99 / 0.02)
    assert np.allclose(frac, np.linspace(0, 1, 15) ** 0.3, atol=1e-12)
    assert torch.all(s.etas[1:] > s.etas[:-1])
    journal = ResShiftSchedule(T=4, min_noise_level=0.2)  # v3: eta_1 = (0.2 / 2)^2 = 0.01
    assert journal.etas[0].item() == pytest.approx(0.01, rel=1e-12)
    assert np.allclose(journal.sqrt_etas.numpy(), official_sqrt_etas(4, 0.3, 2.0, 0.2, 0.99), rtol=1e-12)
    small_kappa = ResShiftSchedule(kappa=0.5)  # sqrt(eta_1) = min(mnl / kappa, mnl) = mnl
    assert small_kappa.sqrt_etas[0].item() == pytest.approx(0.04)
    assert s.timesteps() == list(range(14, -1, -1)) and s.timesteps(4) == [14, 9, 5, 0]
    for bad in (dict(T=1), dict(kappa=0.0), dict(etas_end=1.5)):
        with pytest.raises(ValueError):
            ResShiftSchedule(**bad)


def test_rddm_schedules_sum_and_monotonicity():
    for T, sum_scale in ((1000, 0.01), (10, 1.0)):
        s = RDDMSchedule(T, sum_scale)
        alphas, acum, betas2, bcum = official_rddm(T, sum_scale)
        assert np.allclose(s.alphas.numpy(), alphas, rtol=1e-12) and np.allclose(s.betas2.numpy(), betas2, rtol=1e-12)
        assert np.allclose(s.alphas_cumsum.numpy(), acum) and np.allclose(s.betas2_cumsum.numpy(), bcum)
        assert s.alphas.sum().item() == pytest.approx(1.0, abs=1e-12)  # sum alpha = 1: I_T = I_in + noise
        assert s.alphas_cumsum[-1].item() == pytest.approx(1.0, abs=1e-12)
        assert s.betas2_cumsum[-1].item() == pytest.approx(sum_scale, rel=1e-12)  # sum beta^2 = sum_scale
        assert torch.all(s.alphas[1:] < s.alphas[:-1]) and torch.all(s.betas2[1:] > s.betas2[:-1])
    s = RDDMSchedule()
    assert s.T == 1000 and s.sum_scale == 0.01
    assert s.timesteps(10) == list(range(999, 0, -100)) and s.timesteps(5) == [999, 799, 599, 399, 199]
    with pytest.raises(ValueError):
        s.timesteps(1001)


# --------------------------------------------------------------------------------------------- forward process
def test_resshift_forward_process_reproduces_the_closed_form_marginal():
    """Running the Markov chain q(x_t | x_{t-1}, y0) = N(x_{t-1} + alpha_t e0, kappa^2 alpha_t) from x0, and drawing
    q_sample directly, both match N(x0 + eta_t e0, kappa^2 eta_t) at every step."""
    s = ResShiftSchedule()
    etas = official_sqrt_etas(15, 0.3, 2.0, 0.04, 0.99) ** 2
    g = torch.Generator().manual_seed(0)
    n = 40_000
    x0 = torch.tensor([[-0.8, 0.1], [0.5, 0.9]], dtype=torch.float64).expand(n, 1, 2, 2)
    y0 = torch.tensor([[0.2, -0.6], [0.5, 0.0]], dtype=torch.float64).expand(n, 1, 2, 2)
    x, prev = x0.clone(), 0.0
    for t in range(15):
        alpha = etas[t] - prev
        x = x + alpha * (y0 - x0) + 2.0 * math.sqrt(alpha) * torch.randn(x.shape, generator=g, dtype=torch.float64)
        prev = etas[t]
        mean, var = x0[0] + etas[t] * (y0[0] - x0[0]), torch.full_like(x0[0], 4.0 * etas[t])
        stats_close(x, mean, var, f"chain t={t}")
        m_code, v_code = s.marginal(x0[:1], y0[:1], t)
        assert torch.allclose(m_code[0], mean, atol=1e-12) and torch.allclose(v_code[0], var, rtol=1e-12)
        direct = s.q_sample(x0, y0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        stats_close(direct, mean, var, f"q_sample t={t}")


def test_rddm_forward_process_reproduces_the_closed_form_marginal():
    """I_t = I_{t-1} + alpha_t I_res + beta_t eps from I_0 = x0 matches I_0 + abar_t I_res + bbar_t eps."""
    T = 20
    s = RDDMSchedule(T, sum_scale=0.5)
    alphas, acum, betas2, bcum = official_rddm(T, 0.5)
    g = torch.Generator().manual_seed(1)
    n = 40_000
    x0 = torch.tensor([[-0.8, 0.1], [0.5, 0.9]], dtype=torch.float64).expand(n, 1, 2, 2)
    y0 = torch.tensor([[0.2, -0.6], [0.5, 0.0]], dtype=torch.float64).expand(n, 1, 2, 2)
    x = x0.clone()
    for t in range(T):
        x = x + alphas[t] * (y0 - x0) + math.sqrt(betas2[t]) * torch.randn(x.shape, generator=g, dtype=torch.float64)
        mean, var = x0[0] + acum[t] * (y0[0] - x0[0]), torch.full_like(x0[0], bcum[t])
        stats_close(x, mean, var, f"chain t={t}")
        direct = s.q_sample(x0, y0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        stats_close(direct, mean, var, f"q_sample t={t}")
        m_code, v_code = s.marginal(x0[:1], y0[:1], t)
        assert torch.allclose(m_code[0], mean, atol=1e-12) and torch.allclose(v_code[0], var, rtol=1e-12)


def test_resshift_posterior_is_the_gaussian_conditional_of_the_joint():
    """q(x_s | x_t, x0, y0) by brute force: the chain as x_i = x0 + eta_i e0 + kappa sum_{k<=i} sqrt(alpha_k) n_k,
    its joint covariance L L^T, and Gaussian conditioning; for s = t - 1 (the official posterior) and s < t - 1
    (respaced sampling); y0 must cancel."""
    T, kappa = 15, 2.0
    s = ResShiftSchedule()
    etas = official_sqrt_etas(T, 0.3, kappa, 0.04, 0.99) ** 2
    alphas = np.diff(np.concatenate([[0.0], etas]))
    L = np.tril(np.ones((T, T))) * (kappa * np.sqrt(alphas))[None, :]
    cov = L @ L.T
    x0, y0 = -0.3, 0.7
    mean = x0 + etas * (y0 - x0)
    rng = np.random.default_rng(0)
    for t, s_idx in [(14, 13), (7, 6), (1, 0), (14, 9), (9, 5), (5, 0), (0, -1), (9, -1)]:
        x_t = rng.normal(mean[t], 1.0)
        if s_idx >= 0:
            m_ref = mean[s_idx] + cov[s_idx, t] / cov[t, t] * (x_t - mean[t])
            v_ref = cov[s_idx, s_idx] - cov[s_idx, t] ** 2 / cov[t, t]
        else:
            m_ref, v_ref = x0, 0.0  # the clean end of the chain
        m, v = s.posterior(torch.tensor([[x_t]], dtype=torch.float64), torch.tensor([[x0]], dtype=torch.float64),
                           t, None if s_idx == t - 1 and s_idx >= 0 else s_idx)
        assert m.item() == pytest.approx(m_ref, abs=1e-12), (t, s_idx)
        assert v.item() == pytest.approx(v_ref, abs=1e-12), (t, s_idx)
        if s_idx == t - 1 and s_idx >= 0:  # the official closed form
            a_t = etas[t] - etas[s_idx]
            assert m.item() == pytest.approx(etas[s_idx] / etas[t] * x_t + a_t / etas[t] * x0, abs=1e-12)
            assert v.item() == pytest.approx(kappa**2 * etas[s_idx] / etas[t] * a_t, abs=1e-12)


# ------------------------------------------------------------------------------------------- oracle samplers
def _pair(n):
    x0 = torch.tensor([[-0.8, 0.1], [0.5, 0.9]]).expand(n, 1, 2, 2).contiguous()
    y0 = torch.tensor([[0.2, -0.6], [0.5, 0.0]]).expand(n, 1, 2, 2).contiguous()
    return x0, y0


@pytest.mark.parametrize("steps", [15, 4])
def test_resshift_sampler_with_an_oracle_recovers_x0_with_the_stated_marginals(steps):
    """With f(x_t, y0, t) = x0 the final (noiseless) step returns x0 exactly; every visited x_s is distributed as
    N(x0 + (eta_s / eta_T) e0, kappa^2 eta_s) (prior start y0 + kappa sqrt(eta_T) n, then exact posteriors)."""
    s = ResShiftSchedule()
    etas = official_sqrt_etas(15, 0.3, 2.0, 0.04, 0.99) ** 2
    n = 20_000
    x0, y0 = _pair(n)
    seen = {}
    out, nfe = resshift_sample(lambda x, y, t: x0, y0, s, steps, torch.Generator().manual_seed(3),
                               callback=lambda info: seen.__setitem__(info["step"], info["x_t"].clone()))
    ts = s.timesteps(steps)
    assert nfe == steps == len(ts) and torch.equal(out, x0)
    for k in range(len(ts) - 1):
        s_idx = ts[k + 1]
        stats_close(seen[k + 1].double(), (x0[0] + etas[s_idx] / etas[-1] * (y0[0] - x0[0])).double(),
                    torch.full((1, 2, 2), 4.0 * etas[s_idx], dtype=torch.float64), f"x at index {s_idx}")


def test_rddm_sampler_with_an_oracle_is_exact_and_deterministic():
    """Oracle: the true residual y0 - x0 and the noise (I_t - x0 - abar_t I_res) / bbar_t. eta = 0: every iterate is
    exactly x0 + abar_s I_res + bbar_s eps (eps: the start noise) and the output is x0; eta = 1: the output is still
    x0, the iterates have mean x0 + abar_s I_res and variance bbar_s^2."""
    T, sum_scale = 1000, 0.01
    s = RDDMSchedule(T, sum_scale)
    _, acum, _, bcum = official_rddm(T, sum_scale)
    x0, y0 = _pair(1)

    def oracle(x0, y0):
        def predict(i_t, y, t):
            k = int(t[0])
            res = y0 - x0
            return res, (i_t - x0 - acum[k] * res) / math.sqrt(bcum[k])
        return predict

    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    seen = {}
    out, nfe = rddm_sample(oracle(x0, y0), y0, s, 10, eta=0.0, noise=eps,
                           callback=lambda info: seen.__setitem__(info["step"], info["x_t"].clone()))
    ts = s.timesteps(10)
    assert nfe == 10 and torch.allclose(out, x0, atol=1e-6)
    for k, t in enumerate(ts[:-1]):
        expected = x0 + acum[ts[k + 1]] * (y0 - x0) + math.sqrt(bcum[ts[k + 1]]) * eps
        assert torch.allclose(seen[k + 1], expected, atol=1e-6), t
    again, _ = rddm_sample(oracle(x0, y0), y0, s, 10, eta=0.0, noise=eps)
    assert torch.equal(again, out)  # deterministic given the start
    n = 20_000
    xb, yb = _pair(n)
    seen.clear()
    out, _ = rddm_sample(oracle(xb, yb), yb, s, 5, eta=1.0, generator=torch.Generator().manual_seed(5),
                         callback=lambda info: seen.__setitem__(info["step"], info["x_t"].clone()))
    assert torch.allclose(out, xb, atol=1e-5)
    ts = s.timesteps(5)
    for k in range(len(ts) - 1):
        j = ts[k + 1]
        stats_close(seen[k + 1].double(), (xb[0] + acum[j] * (yb[0] - xb[0])).double(),
                    torch.full((1, 2, 2), bcum[j], dtype=torch.float64), f"I at index {j}")


# -------------------------------------------------------------------------------------------------- degradations
def _water_disk(n=32):
    yy, xx = torch.meshgrid(torch.arange(n) - (n - 1) / 2, torch.arange(n) - (n - 1) / 2, indexing="ij")
    return torch.where(xx**2 + yy**2 < (0.4 * n) ** 2, 0.0, -1000.0).double()  # HU


def test_degradations_are_deterministic_shape_preserving_and_physical():
    low = Degradation("lowdose-ct", views=60)
    x = low.window.normalize(_water_disk())[None].float()  # (1, 32, 32), normalised
    g = lambda k: torch.Generator().manual_seed(k)  # noqa: E731
    a, b, c = low(x, g(0)), low(x, g(0)), low(x, g(1))
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.abs().max()) <= 1.0 and low.stochastic
    hu = low.window.denormalize(a.double())[0]
    inside = hu[10:22, 10:22]
    assert abs(float(inside.mean())) < 60 and float(inside.std()) > 1  # water stays ~0 HU, with noise
    quiet = Degradation("sparse-view-ct", photons=0)
    assert not quiet.stochastic and torch.equal(quiet(x), quiet(x))
    sr = Degradation("super-resolution")
    const = torch.full((2, 1, 30, 28), 0.25)  # not divisible by 4: padded and cropped back
    assert torch.allclose(sr(const), const, atol=1e-6)
    blurred = sr(x)
    assert blurred.shape == x.shape and float((blurred - x).abs().max()) > 0.1
    assert Degradation.from_config(low.config()).config() == low.config()
    with pytest.raises(ValueError, match="takes no"):
        Degradation("super-resolution", views=3)
    with pytest.raises(ValueError, match="unknown degradation"):
        Degradation("deblur")


# ------------------------------------------------------------------------------------------------------ training
def _tiny(data, out, **kw):
    base = dict(data=data, out=str(out), crop=16, batch_size=2, steps=2, channels=(8, 16), checkpoint_every=2,
                sample_every=0, progress=False, phantom_fraction=0.5, realizations=2, task_params={"views": 60})
    return RestorerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_restorer(tmp_path_factory):
    """A ResShift restorer trained for 2 steps on CT_small.dcm (+ phantoms), quality measured on CT_small."""
    out = tmp_path_factory.mktemp("restorer-run")
    summary = train_restorer(_tiny([CT_SMALL], out, eval_files=[CT_SMALL], sample_every=2))
    return out, summary


def test_training_writes_a_loadable_restorer_with_its_card(tiny_restorer):
    out, summary = tiny_restorer
    assert summary["step"] == 2 and summary["skipped"] == [] and not summary["interrupted"]
    assert (out / "checkpoint.pt").is_file() and (out / "samples_0000002.png").is_file()
    r = load_restorer(out / "restorer")
    card = json.loads((out / "restorer" / "model_card.json").read_text())
    assert r.kind == "resshift" and r.schedule.T == 15 and r.sampling_steps == 15
    assert card["model"]["schedule"] == {"kind": "resshift", "T": 15, "p": 0.3, "kappa": 2.0,
                                         "min_noise_level": 0.04, "etas_end": 0.99}
    assert card["degradation"]["task"] == "lowdose-ct" and card["degradation"]["params"]["photons"] == 5e4
    assert card["intensity"] == {"kind": "window", "low": -1000.0, "high": 1500.0, "unit": "HU"}
    assert card["training"]["files"] == ["CT_small.dcm"] and card["training"]["config"]["data"] == ["CT_small.dcm"]
    assert "NOT for clinical use" in card["intended_use"] and card["data_licence"]
    q = card["quality"]
    assert q["files"][0]["file"] == "CT_small.dcm" and q["steps"] == 15
    assert math.isfinite(q["degraded"]["psnr"]) and math.isfinite(q["restored"]["psnr"])
    text = json.dumps(card)
    assert str(Path(CT_SMALL).parent) not in text and str(out) not in text  # names only, no machine paths


@pytest.mark.parametrize("model", ["resshift", "rddm"])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, model):
    """3 steps in one go == 2 steps, a stop, and 1 resumed step: bit for bit (weights and EMA, CPU, same seed)."""
    full = train_restorer(_tiny([CT_SMALL], tmp_path / "a", model=model, steps=3))
    assert full["step"] == 3
    cfg = _tiny([CT_SMALL], tmp_path / "b", model=model, steps=3)
    assert train_restorer(cfg, max_steps_this_run=2)["step"] == 2
    assert train_restorer(cfg, resume=True)["step"] == 3
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert torch.equal(a["generator"], b["generator"])
    with pytest.raises(ValueError, match="different configuration"):
        train_restorer(_tiny([CT_SMALL], tmp_path / "b", model=model, steps=3, lr=1e-3), resume=True)


def test_unreadable_training_file_is_skipped_and_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(CT_SMALL, data / "CT_small.dcm")
    (data / "broken.dcm").write_bytes(b"DICM" * 10)
    summary = train_restorer(_tiny([data], tmp_path / "run", model="rddm", steps=1, checkpoint_every=1))
    assert [s["file"] for s in summary["skipped"]] == [str(data / "broken.dcm")]
    card = json.loads((tmp_path / "run" / "restorer" / "model_card.json").read_text())
    assert card["training"]["skipped"][0]["file"] == "broken.dcm" and str(data) not in json.dumps(card)
    from recon.datasets.slices import SliceReadError

    with pytest.raises(SliceReadError, match=r"broken\.dcm"):
        train_restorer(_tiny([data], tmp_path / "run2", steps=1, on_error="stop"))


def test_restorer_io_round_trip_and_refusals(tiny_restorer, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    out, _ = tiny_restorer
    r = load_restorer(out / "restorer")
    save_restorer(r, tmp_path / "copy")
    r2 = load_restorer(tmp_path / "copy")
    y = torch.zeros(1, 1, 16, 16)
    a, _ = r.restore(y, steps=3, generator=torch.Generator().manual_seed(0))
    b, _ = r2.restore(y, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    state = {k: v.contiguous() for k, v in r.network.state_dict().items()}  # NHWC weights: safetensors wants packed
    state["unet.conv_in.conv.weight"] = torch.zeros(8, 3, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "copy" / "model.safetensors"))
    with pytest.raises(ValueError, match="do not fit the architecture") as err:
        load_restorer(tmp_path / "copy")
    assert "extra.weight" in str(err.value) and "checkpoint (8, 3, 3, 3) vs model (8, 2, 3, 3)" in str(err.value)
    shutil.copytree(out / "restorer", tmp_path / "prior")
    card = json.loads((tmp_path / "prior" / "model_card.json").read_text())
    (tmp_path / "prior" / "model_card.json").write_text(json.dumps({**card, "format": "recon-prior"}))
    with pytest.raises(ValueError, match=r"not a recon restorer card.*recon-prior"):
        load_restorer(tmp_path / "prior")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_restorer(tmp_path / "nothing")
    import recon.restoration.io as rio

    monkeypatch.setattr(rio, "builtin_folder", lambda name: tmp_path / "no-weights")
    with pytest.raises(FileNotFoundError, match=r"recon train-restorer --preset default-lowdose-ct"):
        load_restorer("default")


def test_volumes_restore_slice_by_slice_independently_of_chunks(tiny_restorer):
    r = load_restorer(tiny_restorer[0] / "restorer")
    vol = np.stack([(_water_disk(24).numpy() + 40 * k) for k in range(3)])
    a, nfe = r.restore_array(vol, steps=3, seed=7, chunk=1)
    b, _ = r.restore_array(vol, steps=3, seed=7, chunk=3)
    assert nfe == 3 and a.shape == vol.shape and np.allclose(a, b, rtol=0, atol=1e-3)  # HU; float32 batching
    d1, d2 = r.degrade_array(vol, seed=1), r.degrade_array(vol, seed=1)
    assert np.array_equal(d1, d2) and not np.array_equal(d1, vol)


# ------------------------------------------------------------------------------------------------ command line
def test_recon_restore_end_to_end_on_ct_small(tiny_restorer, tmp_path):
    model = tiny_restorer[0] / "restorer"
    out = tmp_path / "restored.nii.gz"
    res = run("restore", "-i", CT_SMALL, "-o", out, "--model", model, "--degrade", "--steps", "4", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["model"] == "resshift" and report["nfe"] == 4 and report["degrade"] is True
    assert math.isfinite(report["psnr"]) and 0 < report["ssim"] <= 1 and math.isfinite(report["input"]["psnr"])
    for key in ("image", "preview", "report", "provenance"):
        assert Path(report["outputs"][key]).is_file(), key
    src = read_image(CT_SMALL)
    img = nib.load(out)
    assert img.shape == (128, 128, 1) and np.allclose(img.affine, src.affine, atol=1e-6)
    assert json.loads((tmp_path / "restored.report.json").read_text())["nfe"] == 4
    provenance = (tmp_path / "restored.provenance.json").read_text()
    assert "CT_small" not in provenance and str(tmp_path) not in provenance and str(model) not in provenance
    assert json.loads(provenance)["restorer"]["sha256"]
    # a derived DICOM series (no suffix), the input's geometry kept
    res = run("restore", "-i", CT_SMALL, "-o", tmp_path / "series", "--model", model, "--steps", "2")
    assert res.returncode == 0, res.stderr
    back = read_image(tmp_path / "series")
    assert back.shape == src.shape and np.allclose(back.affine, src.affine, atol=1e-4) and back.unit == "HU"
    assert (tmp_path / "series.preview.png").is_file() and (tmp_path / "series.report.json").is_file()


def test_restore_bad_inputs_give_one_line_errors(tiny_restorer, tmp_path, capsys):
    model = tiny_restorer[0] / "restorer"
    cases = [
        (["-i", CT_SMALL, "-o", tmp_path / "a.nii.gz", "--model", tmp_path / "no-model"], "no-model"),
        (["-i", tmp_path / "missing.dcm", "-o", tmp_path / "b.nii.gz", "--model", model], "missing.dcm"),
        (["-i", CT_SMALL, "-o", tmp_path / "x" / "c.nii.gz", "--model", model], "does not exist"),
        (["-i", CT_SMALL, "-o", tmp_path / "d.txt", "--model", model], "unknown output format"),
    ]
    (tmp_path / "e.nii.gz").write_bytes(b"")
    cases.append((["-i", CT_SMALL, "-o", tmp_path / "e.nii.gz", "--model", model], "exists"))
    for argv, needle in cases:
        assert main(["restore", *map(str, argv)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("recon: error:") and "\n" not in err and needle in err, err
        assert "Traceback" not in err
    assert (tmp_path / "e.nii.gz").read_bytes() == b""  # never overwritten without --overwrite


def test_train_restorer_command(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(CT_SMALL, data / "CT.dcm")
    np.save(data / "arr.npy", np.random.default_rng(0).normal(0, 100, (20, 20)))
    out = tmp_path / "run"
    res = run("train-restorer", "--model", "rddm", "--task", "super-resolution", "-i", data, "-o", out, "--steps", "1",
              "--crop", "16", "--batch-size", "2", "--checkpoint-every", "1", "--sample-every", "1")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["step"] == 1 and summary["skipped"] == []
    r = load_restorer(out / "restorer")
    assert r.kind == "rddm" and r.degradation.task == "super-resolution" and r.sampling_steps == 10
    assert (out / "samples_0000001.png").is_file()
    res = run("train-restorer", "-i", tmp_path / "missing", "-o", tmp_path / "run2")
    assert res.returncode == 2 and "missing" in res.stderr and "Traceback" not in res.stderr
    res = run("train-restorer", "--task", "lowdose-ct", "--modality", "mri", "-i", data, "-o", tmp_path / "run3")
    assert res.returncode == 2 and "modality" in res.stderr


def test_builtin_recipe_is_the_documented_one(tmp_path):
    """The preset behind the shipped restorer: lowdose-ct at 5e4 photons, ResShift T = 15 with κ = 1; the RDDM
    variant keeps RDDM's own schedule."""
    from recon.restoration.train import default_lowdose_ct_config

    cfg = default_lowdose_ct_config(str(tmp_path))
    assert cfg.model == "resshift" and cfg.kappa == 1.0 and cfg.diffusion_steps == 15
    assert cfg.schedule().kappa == 1.0 and cfg.degradation().params["photons"] == 5e4
    assert "693_UNCR.dcm" not in {Path(p).name for p in cfg.data}  # the benchmark's held-out image
    rddm = default_lowdose_ct_config(str(tmp_path), model="rddm")
    assert rddm.model == "rddm" and rddm.schedule().kind == "rddm"
    # the card's recipe is the command that reproduces the run: the preset plus what differs from it
    from recon.restoration.train import _recipe

    assert _recipe(cfg) == "recon train-restorer --preset default-lowdose-ct -o RUN"
    tuned = default_lowdose_ct_config(str(tmp_path), model="rddm", lr=2e-5, steps=1000, seed=2,
                                      init_from=str(tmp_path / "rddm-6000"))
    assert _recipe(tuned) == ("recon train-restorer --preset default-lowdose-ct --model rddm --steps 1000 --lr 2e-05 "
                              "--seed 2 --init-from rddm-6000 -o RUN")


def test_warm_start_begins_from_the_given_restorer(tiny_restorer, tmp_path):
    """``init_from`` loads a restorer's weights into the network and its EMA: with a zero learning rate the
    exported weights are exactly the initial ones; the card records the run it continued."""
    from safetensors.torch import load_file

    from recon.priors.io import WEIGHTS

    start = tiny_restorer[0] / "restorer"
    out = tmp_path / "warm"
    train_restorer(_tiny([CT_SMALL], out, lr=0.0, init_from=str(start)))
    a, b = load_file(str(start / WEIGHTS)), load_file(str(out / "restorer" / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((out / "restorer" / "model_card.json").read_text())
    assert card["training"]["init_from"] == {"folder": "restorer", "steps": 2} and card["training"]["total_steps"] == 4
    assert str(tmp_path) not in json.dumps(card)  # names, not machine paths
    with pytest.raises(FileNotFoundError, match="init-from"):
        train_restorer(_tiny([CT_SMALL], tmp_path / "bad", init_from=str(tmp_path / "nothing")))


def test_builtin_restorer_ships_and_restores_low_dose_ct():
    """The shipped restorer loads offline, is the documented recipe, is small, and improves a low-dose FBP of a CT
    phantom it never saw (unseen seed) by several dB against the clean image."""
    from recon.datasets.phantoms import random_ct_phantom
    from recon.pipeline import metrics
    from recon.priors.io import WEIGHTS
    from recon.restoration.io import builtin_folder

    r = load_restorer("default")
    assert r.kind == "resshift" and r.degradation.task == "lowdose-ct"
    assert r.degradation.params["photons"] == 5e4 and r.schedule.kappa == 1.0
    assert (builtin_folder("default-lowdose-ct") / WEIGHTS).stat().st_size < 10 * 2**20
    assert "NOT for clinical use" in r.card["intended_use"]
    hu = random_ct_phantom((128, 128), torch.Generator().manual_seed(123_456)).double().numpy()[None]
    degraded = r.degrade_array(hu, seed=3)
    restored, nfe = r.restore_array(degraded, steps=4, seed=3)
    before, after = metrics(degraded, hu, True)["psnr"], metrics(restored, hu, True)["psnr"]
    assert nfe == 4 and after > before + 3.0, (before, after)
    rddm = load_restorer("default-lowdose-ct-rddm")  # the RDDM trained on the same task, shipped for comparison
    assert rddm.kind == "rddm" and rddm.degradation.params == r.degradation.params
    restored, nfe = rddm.restore_array(degraded, steps=5, seed=3)
    assert nfe == 5 and metrics(restored, hu, True)["psnr"] > before + 2.0
