"""Tests of `recon.operators.blur`: Blur, gaussian_kernel, motion_kernel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from operator_checks import assert_operator_contract

from recon.operators import Blur, gaussian_kernel, motion_kernel
from recon.operators.blur import FWHM_PER_SIGMA


def _rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _scipy_blur(x: torch.Tensor, k: torch.Tensor, mode: str) -> np.ndarray:
    xs = x.numpy()
    return np.stack(
        [
            [ndi.convolve(xs[b, c], k.numpy(), mode=mode) for c in range(xs.shape[1])]
            for b in range(xs.shape[0])
        ]
    )


def _moments(k: torch.Tensor, spacing) -> tuple:
    """Mean and covariance of a kernel in mm, positions relative to the centre index size // 2."""
    grids = torch.meshgrid(
        *[(torch.arange(n, dtype=torch.float64) - n // 2) * s for n, s in zip(k.shape, spacing, strict=True)],
        indexing="ij",
    )
    pos = torch.stack([g.flatten() for g in grids], 1)
    w = k.flatten() / k.sum()
    mean = (w[:, None] * pos).sum(0)
    d = pos - mean
    return mean, (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)


SCIPY_CASES = [
    ((16, 16), (5, 5)),
    ((16, 16), (4, 6)),  # even sizes: centre at size // 2, as scipy
    ((12, 10), (7, 3)),
    ((8, 12, 12), (3, 5, 5)),
    ((6, 8, 10), (2, 3, 4)),
]


@pytest.mark.parametrize(("size", "ksize"), SCIPY_CASES)
@pytest.mark.parametrize(("boundary", "mode"), [("circular", "wrap"), ("zero", "constant")])
def test_matches_scipy_convolve(size, ksize, boundary, mode):
    """Independent truth: scipy.ndimage.convolve (mode 'wrap' for circular, 'constant' for zero)."""
    k = torch.rand(ksize, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = _rand((2, 3, *size))
    y = Blur(size, k, boundary=boundary).A(x)
    np.testing.assert_allclose(y.numpy(), _scipy_blur(x, k, mode), rtol=0, atol=1e-12)


def test_zero_boundary_kernel_larger_than_image():
    """Independent truth: scipy.ndimage.convolve(mode='constant') with a kernel wider than the image."""
    k = torch.rand((9, 11), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = _rand((1, 1, 6, 5))
    y = Blur((6, 5), k, boundary="zero").A(x)
    np.testing.assert_allclose(y.numpy(), _scipy_blur(x, k, "constant"), atol=1e-12)


def test_circular_kernel_larger_than_image_is_folded():
    """Independent truth: the periodic sum y = sum_j k[j] roll(x, j - c), written with np.roll."""
    k = torch.rand((9, 7), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = _rand((1, 1, 5, 6))
    y = Blur((5, 6), k, boundary="circular").A(x)[0, 0].numpy()
    ref = np.zeros((5, 6))
    c = (9 // 2, 7 // 2)
    for j0 in range(9):
        for j1 in range(7):
            ref += float(k[j0, j1]) * np.roll(x[0, 0].numpy(), (j0 - c[0], j1 - c[1]), axis=(0, 1))
    np.testing.assert_allclose(y, ref, atol=1e-12)


@pytest.mark.parametrize("boundary", ["circular", "zero"])
@pytest.mark.parametrize(
    ("size", "kernel", "grad_size", "grad_kernel"),
    [
        ((16, 16), gaussian_kernel((2.0, 3.0), spacing=(1.0, 0.8)), (5, 6), (3, 2)),
        ((8, 12, 12), gaussian_kernel((2.0, 1.0, 1.5), spacing=(2.0, 1.0, 1.0)), (3, 4, 4), (2, 3, 2)),
    ],
)
def test_contract(size, kernel, grad_size, grad_kernel, boundary):
    op = Blur(size, kernel, boundary=boundary)
    assert_operator_contract(op, (2, 2, *size))
    k_small = torch.rand(grad_kernel, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    small = Blur(grad_size, k_small, boundary=boundary)
    assert_operator_contract(small, (2, 1, *grad_size), gradcheck_shape=(1, 1, *grad_size))


def test_motion_contract():
    op = Blur.motion((16, 16), length=6.0, angle=30.0, boundary="zero")
    assert_operator_contract(op, (2, 1, 16, 16))


def test_adjoint_is_flipped_kernel_convolution():
    """Independent truth: the adjoint equals scipy convolution with the flipped kernel (circular)."""
    k = torch.rand((5, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = _rand((1, 1, 12, 12))
    xt = Blur((12, 12), k).A_adjoint(y)
    # correlate == convolve with flipped kernel; scipy correlate uses the same centre size // 2
    np.testing.assert_allclose(
        xt[0, 0].numpy(), ndi.correlate(y[0, 0].numpy(), k.numpy(), mode="wrap"), atol=1e-12
    )


@pytest.mark.parametrize(
    ("fwhm", "spacing"),
    [((2.0, 3.5), (0.5, 0.7)), (4.0, 1.0), ((6.0, 2.0, 3.0), (2.0, 0.5, 1.0)), ((0.8, 0.5), (1.0, 1.0))],
)
def test_gaussian_second_moment(fwhm, spacing):
    """Second moment in mm² equals sigma² = (fwhm / 2.3548)² per axis within 2% (also below 1 px)."""
    ndim = len(fwhm) if isinstance(fwhm, tuple) else 2
    k = gaussian_kernel(fwhm, spacing, ndim=ndim)
    sp = spacing if isinstance(spacing, tuple) else (spacing,) * ndim
    fw = fwhm if isinstance(fwhm, tuple) else (fwhm,) * ndim
    assert k.dtype == torch.float64 and abs(float(k.sum()) - 1) < 1e-12
    assert all(n % 2 == 1 for n in k.shape)
    mean, cov = _moments(k, sp)
    assert float(mean.abs().max()) < 1e-12
    expected = torch.tensor([(f / FWHM_PER_SIGMA) ** 2 for f in fw], dtype=torch.float64)
    torch.testing.assert_close(torch.diagonal(cov), expected, rtol=0.02, atol=0)
    off = cov - torch.diag(torch.diagonal(cov))
    assert float(off.abs().max()) < 1e-12  # axis-aligned, separable


def test_gaussian_anisotropic_separable_and_truncated():
    k = gaussian_kernel((4.0, 1.0, 0.0), spacing=(2.0, 0.5, 1.0))
    sig_px = (4.0 / FWHM_PER_SIGMA / 2.0, 1.0 / FWHM_PER_SIGMA / 0.5)
    assert k.shape == (2 * math.ceil(4 * sig_px[0]) + 1, 2 * math.ceil(4 * sig_px[1]) + 1, 1)
    marg = [k.sum(dim=tuple(d for d in range(3) if d != a)) for a in range(3)]
    outer = marg[0][:, None, None] * marg[1][None, :, None] * marg[2]
    torch.testing.assert_close(k, outer, rtol=0, atol=1e-15)
    torch.testing.assert_close(k, k.flip(0, 1), rtol=0, atol=1e-15)
    # the wider axis really is wider, in mm
    _, cov = _moments(k[..., 0], (2.0, 0.5))
    assert cov[0, 0] > 10 * cov[1, 1]


def test_gaussian_blur_preserves_mean_and_constant():
    op = Blur.gaussian((16, 16), fwhm=3.0, spacing=0.7)
    x = torch.full((1, 1, 16, 16), 2.5, dtype=torch.float64)
    torch.testing.assert_close(op.A(x), x, rtol=0, atol=1e-12)
    assert "fwhm=(3, 3) mm" in repr(op) and "spacing=(0.7, 0.7) mm" in repr(op)


def test_motion_kernel_length_and_direction_axis_aligned():
    """Along the line the variance is L²/12 + 1/6 px² (uniform segment ⊛ linear-interpolation tent)."""
    k = motion_kernel(7.0, angle=0.0, spacing=1.0)
    assert abs(float(k.sum()) - 1) < 1e-12
    assert k.shape[0] == 1  # horizontal: a single row
    mean, cov = _moments(k, (1.0, 1.0))
    assert float(mean.abs().max()) < 1e-12
    length = math.sqrt(12 * (float(cov[1, 1]) - 1 / 6))
    assert abs(length - 7.0) < 0.01 * 7.0
    cols = torch.nonzero(k[0] > 0).flatten()
    assert int(cols.max() - cols.min()) + 1 == 9  # 7 px segment + 1 px of tent each side
    kv = motion_kernel(7.0, angle=90.0)
    torch.testing.assert_close(kv, k.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("length", "angle", "spacing"), [(9.0, 30.0, (1.0, 1.0)), (12.0, 120.0, (0.8, 1.5))])
def test_motion_kernel_oblique_length_and_angle(length, angle, spacing):
    """Principal axis of the kernel covariance (in mm) points along the angle; length from its variance."""
    k = motion_kernel(length, angle=angle, spacing=spacing)
    mean, cov = _moments(k, spacing)
    assert float(mean.abs().max()) < 1e-10
    evals, evecs = torch.linalg.eigh(cov)
    u = evecs[:, -1]  # (y, x)
    theta = math.degrees(math.atan2(float(u[0]), float(u[1]))) % 180
    assert abs(theta - angle % 180) < 1.0
    # tent variance projected on the line: sum_a u_a² s_a² / 6 (approximately, for oblique lines)
    tent = sum(float(u[a]) ** 2 * spacing[a] ** 2 / 6 for a in range(2))
    est = math.sqrt(12 * (float(evals[-1]) - tent))
    assert abs(est - length) < 0.02 * length


def test_motion_kernel_3d_direction():
    k = motion_kernel(8.0, direction=(1.0, 1.0, 0.0), spacing=(2.0, 1.0, 1.0))
    assert k.dim() == 3 and k.shape[2] == 1 and abs(float(k.sum()) - 1) < 1e-12
    _, cov = _moments(k, (2.0, 1.0, 1.0))
    # remove the linear-interpolation tent (variance s²/6 mm² on the axes the line crosses obliquely)
    cov = cov - torch.diag(torch.tensor([4.0 / 6, 1.0 / 6, 0.0], dtype=torch.float64))
    evals, evecs = torch.linalg.eigh(cov)
    u = evecs[:, -1] * torch.sign(evecs[0, -1])
    torch.testing.assert_close(
        u, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2), atol=0.02, rtol=0
    )
    assert abs(math.sqrt(12 * float(evals[-1])) - 8.0) < 0.02 * 8.0
    op = Blur.motion((8, 12, 12), 8.0, direction=(1.0, 1.0, 0.0), spacing=(2.0, 1.0, 1.0))
    assert_operator_contract(op, (1, 1, 8, 12, 12))


def test_zero_length_motion_is_identity():
    assert motion_kernel(0.0).shape == (1, 1)
    x = _rand((1, 1, 8, 8))
    torch.testing.assert_close(Blur.motion((8, 8), 0.0).A(x), x)


def test_prox_l2_and_normal_operator():
    """prox solves (gamma AᵀA + I) x = gamma Aᵀ y + z; A_adjoint_A equals Aᵀ(A x)."""
    op = Blur.gaussian((12, 12), fwhm=2.5)
    x, y, z = _rand((2, 1, 12, 12), 1), _rand((2, 1, 12, 12), 2), _rand((2, 1, 12, 12), 3)
    torch.testing.assert_close(op.A_adjoint_A(x), op.A_adjoint(op.A(x)), rtol=0, atol=1e-12)
    gamma = 0.7
    p = op.prox_l2(z, y, gamma)
    torch.testing.assert_close(gamma * op.A_adjoint_A(p) + p, gamma * op.A_adjoint(y) + z, rtol=0, atol=1e-10)


def test_dtype_cast_keeps_float64_kernel_and_device_buffers():
    op = Blur.gaussian((8, 8), fwhm=2.0).to(torch.float32)
    assert op.kernel.dtype == torch.float64  # kernel values are not rounded by .to(float32)
    x = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    assert float((op.A(x) - 1).abs().max()) < 1e-13
    assert op.A(x.float()).dtype == torch.float32
    assert {name for name, _ in op.named_buffers()} >= {"kernel", "_kernel_grid"}


def test_errors():
    k = torch.ones(3, 3) / 9
    with pytest.raises(ValueError, match="boundary"):
        Blur((8, 8), k, boundary="reflect")
    with pytest.raises(ValueError, match=r"kernel must have 2 .*got shape \(3, 3, 3\)"):
        Blur((8, 8), torch.ones(3, 3, 3))
    with pytest.raises(ValueError, match="finite"):
        Blur((8, 8), torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="real"):
        Blur((8, 8), torch.ones(3, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="spacing"):
        Blur((8, 8), k, spacing=-1.0)
    with pytest.raises(ValueError, match="img_size"):
        Blur((8,), torch.ones(3))
    op = Blur((8, 8), k)
    with pytest.raises(ValueError, match=r"\(B, C, 8, 8\), got \(1, 1, 8, 9\)"):
        op.A(torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="float32 or float64"):
        op.A(torch.zeros(1, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(B, C, 8, 8\), got \(8, 8\)"):
        op.A_adjoint(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="fwhm"):
        gaussian_kernel(-1.0)
    with pytest.raises(ValueError, match=r"axes.*\[2, 3\]"):
        gaussian_kernel((1.0, 2.0, 3.0), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="length"):
        motion_kernel(-2.0)
    with pytest.raises(ValueError, match="not both"):
        motion_kernel(2.0, angle=10.0, direction=(0.0, 1.0))
    with pytest.raises(ValueError, match="direction"):
        motion_kernel(2.0, direction=(0.0, 0.0))
    with pytest.raises(ValueError, match="direction"):
        Blur.motion((8, 8, 8), 3.0, angle=10.0)


def test_repr_has_geometry():
    text = repr(Blur.motion((16, 12), 5.0, angle=30.0, spacing=(0.5, 1.0), boundary="zero"))
    parts = ("Blur(", "img_size=(16, 12)", "spacing=(0.5, 1) mm", "motion length=5 mm", "angle=30", "'zero'")
    for part in parts:
        assert part in text


def test_out_of_field_padding_is_air_for_image_domain_tasks():
    """A CT slice with the scanner's −3024 HU padding outside its field of view: an image-domain task measures it as
    air (as the CT tasks do through μ ≥ 0), so the measurement, and the noise level relative to its RMS, are those
    of the image with air there; an image in other units is measured as it is."""
    from recon.tasks import AIR_HU, make_task, simulate

    img = torch.full((32, 32), 40.0)
    img[:6], img[10:20, 10:20] = -3024.0, -1000.0
    air = img.clamp_min(AIR_HU)
    spec = make_task("blur", (1, 32, 32), (1.0, 1.0, 1.0), fwhm=2.0)
    padded, clean = simulate(spec, img, "HU", noise=0.01, seed=3), simulate(spec, air, "HU", noise=0.01, seed=3)
    torch.testing.assert_close(padded.y, clean.y)
    assert padded.sigma_y == clean.sigma_y
    raw = simulate(spec, img, None, noise=0.01, seed=3)
    assert float(raw.y.min()) < -3000 and raw.sigma_y > clean.sigma_y
