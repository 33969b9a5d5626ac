"""Cartesian MRI operators and coil maps, checked against numpy FFTs, deepinv 0.5.0 and explicit sums."""

from __future__ import annotations

import deepinv
import numpy as np
import pytest
import torch
from operator_checks import assert_operator_contract

from recon.operators import (
    CartesianMRI,
    MultiCoilMRI,
    estimate_coil_maps,
    random_mask,
    simulate_coil_maps,
)


def _randn(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _np_complex(x: torch.Tensor) -> np.ndarray:
    """(B, 2, ...) real tensor -> (B, ...) complex numpy array."""
    a = x.detach().numpy()
    return a[:, 0] + 1j * a[:, 1]


def _rand_maps(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(n, *size, generator=g), torch.randn(n, *size, generator=g)).to(
        torch.complex128
    )


def _binary(shape, seed=0, p=0.5):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(shape, generator=g) < p).float()
    m.view(-1)[0] = 1
    return m


# ------------------------------------------------------------------------------------------ contract
CONTRACT_CASES = {
    "2d": lambda: CartesianMRI((8, 12), acceleration=3, center_fraction=0.2),
    "2d_gaussian": lambda: CartesianMRI((16, 16), acceleration=3, mask_type="gaussian", center_fraction=0.25),
    "3d_slicewise_3dmask": lambda: CartesianMRI((3, 6, 8), mask=_binary((3, 6, 8)), fft_dims="2d"),
    "3d_full_fft": lambda: CartesianMRI((3, 6, 8), mask=_binary((6, 8)), fft_dims="3d"),
    "multicoil_2d": lambda: MultiCoilMRI((8, 12), _rand_maps(3, (8, 12)), acceleration=2),
    "multicoil_3d_slicewise": lambda: MultiCoilMRI(
        (3, 6, 8), _rand_maps(2, (3, 6, 8)), mask=_binary((3, 6, 8)), fft_dims="2d"
    ),
    "multicoil_3d_full_fft_2d_maps": lambda: MultiCoilMRI(
        (3, 6, 8), _rand_maps(2, (6, 8)), mask=_binary((6, 8)), fft_dims="3d"
    ),
}


CONTRACT_CASES |= {
    "2d_real_input": lambda: CartesianMRI((8, 12), acceleration=3, center_fraction=0.2, real_input=True),
    "multicoil_3d_real_input": lambda: MultiCoilMRI(
        (3, 6, 8), _rand_maps(2, (3, 6, 8)), mask=_binary((3, 6, 8)), fft_dims="2d", real_input=True
    ),
}


@pytest.mark.parametrize("name", list(CONTRACT_CASES))
def test_operator_contract(name):
    op = CONTRACT_CASES[name]()
    size = op.img_size
    c = op.image_channels
    assert_operator_contract(op, (2, c, *size), gradcheck_shape=(1, c, *size))


@pytest.mark.parametrize("multicoil", [False, True])
def test_real_input_is_the_complex_operator_on_real_images(multicoil):
    """``real_input``: A(x) equals the complex operator on x + 0i, A_adjoint its real part, and the least-squares
    A_dagger recovers a real image from fully sampled data."""
    size = (8, 12)
    kw = {"mask": _binary(size, seed=3)}
    if multicoil:
        maps = _rand_maps(3, size)
        cplx, real = MultiCoilMRI(size, maps, **kw), MultiCoilMRI(size, maps, real_input=True, **kw)
    else:
        cplx, real = CartesianMRI(size, **kw), CartesianMRI(size, real_input=True, **kw)
    x = _randn((2, 1, *size))
    x2 = torch.cat([x, torch.zeros_like(x)], dim=1)
    torch.testing.assert_close(real.A(x), cplx.A(x2), rtol=0, atol=0)
    y = cplx.A(_randn((2, 2, *size), seed=1))
    torch.testing.assert_close(real.A_adjoint(y), cplx.A_adjoint(y)[:, :1], rtol=0, atol=0)
    assert "real_input=True" in repr(real)
    with pytest.raises(ValueError, match="x"):
        real.A(x2)  # two channels given to a real-input operator
    full = CartesianMRI(size, mask=torch.ones(size), real_input=True)
    torch.testing.assert_close(full.A_dagger(full.A(x)), x, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ FFT
@pytest.mark.parametrize("size", [(8, 8), (7, 10)])
def test_fft_matches_numpy_centred_orthonormal(size):
    x = _randn((2, 2, *size))
    op = CartesianMRI(size, mask=torch.ones(size))
    ref = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(_np_complex(x), axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    np.testing.assert_allclose(_np_complex(op.A(x)), ref, rtol=1e-12, atol=1e-12)
    # DC at index n // 2: a constant image has all its energy there
    y = op.A(torch.ones(1, 2, *size, dtype=torch.float64))
    k = _np_complex(y)[0]
    assert abs(k[size[0] // 2, size[1] // 2]) == pytest.approx(np.sqrt(2 * size[0] * size[1]))


@pytest.mark.parametrize("fft_dims,axes", [("2d", (-2, -1)), ("3d", (-3, -2, -1))])
def test_fft_3d_modes_match_numpy(fft_dims, axes):
    size = (5, 6, 7)
    x = _randn((2, 2, *size))
    op = CartesianMRI(size, mask=torch.ones(size[-2:]), fft_dims=fft_dims)
    ref = np.fft.fftshift(
        np.fft.fftn(np.fft.ifftshift(_np_complex(x), axes=axes), axes=axes, norm="ortho"), axes=axes
    )
    np.testing.assert_allclose(_np_complex(op.A(x)), ref, rtol=1e-12, atol=1e-12)


def test_mask_multiplies_kspace():
    size = (8, 12)
    mask = _binary(size, seed=3)
    x = _randn((1, 2, *size))
    full = CartesianMRI(size, mask=torch.ones(size)).A(x)
    torch.testing.assert_close(CartesianMRI(size, mask=mask).A(x), full * mask.double())


@pytest.mark.parametrize("size,fft_dims", [((8, 12), "2d"), ((3, 6, 8), "2d"), ((3, 6, 8), "3d")])
def test_fully_sampled_is_unitary(size, fft_dims):
    x = _randn((2, 2, *size))
    op = CartesianMRI(size, mask=torch.ones(size[-2:]), fft_dims=fft_dims)
    y = op.A(x)
    torch.testing.assert_close(op.A_adjoint(y), x, rtol=1e-12, atol=1e-12)
    assert float(y.norm() / x.norm()) == pytest.approx(1.0, abs=1e-12)
    maps = simulate_coil_maps(size, 4, dtype=torch.complex128)
    mc = MultiCoilMRI(size, maps, mask=torch.ones(size[-2:]), fft_dims=fft_dims)
    torch.testing.assert_close(mc.A_adjoint(mc.A(x)), x, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ deepinv interop
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_coil_matches_deepinv_mri(dtype):
    size = (16, 12)
    mask = random_mask(size, 4, seed=1)
    x = _randn((2, 2, *size), dtype=dtype)
    ours = CartesianMRI(size, mask=mask)
    ref = deepinv.physics.MRI(mask=mask.to(dtype), img_size=size)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(ours.A(x), ref.A(x), **tol)
    y = ref.A(x)
    torch.testing.assert_close(ours.A_adjoint(y), ref.A_adjoint(y), **tol)


@pytest.mark.parametrize("fft_dims,three_d", [("2d", False), ("3d", True)])
def test_3d_matches_deepinv_mri(fft_dims, three_d):
    size = (4, 6, 8)
    mask = _binary(size, seed=2)
    x = _randn((2, 2, *size))
    ours = CartesianMRI(size, mask=mask, fft_dims=fft_dims)
    ref = deepinv.physics.MRI(mask=mask.double(), img_size=size, three_d=three_d)
    torch.testing.assert_close(ours.A(x), ref.A(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.A_adjoint(ours.A(x)), ref.A_adjoint(ref.A(x)), rtol=1e-12, atol=1e-12)


def test_multicoil_matches_deepinv_layout_and_values():
    size = (8, 12)
    maps = _rand_maps(3, size)
    mask = random_mask(size, 2, seed=0)
    x = _randn((2, 2, *size))
    ours = MultiCoilMRI(size, maps, mask=mask)
    ref = deepinv.physics.MultiCoilMRI(mask=mask.double(), coil_maps=maps, img_size=size)
    y = ours.A(x)
    assert y.shape == (2, 2, 3, *size)
    torch.testing.assert_close(y, ref.A(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.A_adjoint(y), ref.A_adjoint(y), rtol=1e-12, atol=1e-12)


def test_multicoil_adjoint_equals_explicit_numpy_sum():
    """A^H y = sum_c conj(S_c) F^-1 (M y_c), computed coil by coil with numpy."""
    size = (8, 10)
    maps = _rand_maps(4, size, seed=5)
    mask = _binary(size, seed=6)
    y = _randn((2, 2, 4, *size), seed=7)
    op = MultiCoilMRI(size, maps, mask=mask)
    yc = _np_complex(y)  # (B, N, H, W)
    s, m = maps.numpy(), mask.numpy()
    ref = np.zeros((2, *size), dtype=complex)
    for b in range(2):
        for c in range(4):
            img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(m * yc[b, c]), norm="ortho"))
            ref[b] += np.conj(s[c]) * img
    np.testing.assert_allclose(_np_complex(op.A_adjoint(y)), ref, rtol=1e-12, atol=1e-12)


def test_multicoil_3d_maps_broadcast_over_slices():
    size = (3, 6, 8)
    maps2d = _rand_maps(2, size[-2:])
    x = _randn((1, 2, *size))
    a = MultiCoilMRI(size, maps2d, mask=torch.ones(size[-2:]), fft_dims="3d")
    b = MultiCoilMRI(size, maps2d[:, None].expand(2, *size), mask=torch.ones(size[-2:]), fft_dims="3d")
    torch.testing.assert_close(a.A(x), b.A(x))
    assert a.A(x).shape == (1, 2, 2, *size)


# ------------------------------------------------------------------------------------------ extras
def test_closed_form_pseudo_inverse_and_prox():
    size = (8, 12)
    op = CartesianMRI(size, mask=_binary(size, seed=1))
    x, z = _randn((2, 2, *size), 1), _randn((2, 2, *size), 2)
    y = op.A(x)
    torch.testing.assert_close(op.A(op.A_dagger(y)), y)
    gamma = 0.7
    p = op.prox_l2(z, y, gamma)
    # normal equations of argmin 1/2 |A p - y|^2 + 1/(2 gamma) |p - z|^2
    torch.testing.assert_close(op.A_adjoint(op.A(p)) + p / gamma, op.A_adjoint(y) + z / gamma)


def test_noise_only_on_sampled_points():
    size = (8, 12)
    mask = _binary(size, seed=4)
    op = CartesianMRI(size, mask=mask, noise_model=deepinv.physics.GaussianNoise(sigma=0.1))
    y = op(_randn((1, 2, *size)))
    assert (y[..., mask == 0] == 0).all()
    assert (y[..., mask == 1] != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_cast_keeps_complex_maps(dtype):
    size = (6, 8)
    maps = _rand_maps(2, size)
    op = MultiCoilMRI(size, maps, acceleration=2).to(dtype)  # module.to(real dtype) must not drop imag
    torch.testing.assert_close(op.coil_maps.to(torch.complex128), maps, rtol=1e-6, atol=1e-6)
    x = _randn((1, 2, *size), dtype=dtype)
    assert op.A(x).dtype == dtype and op.A_adjoint(op.A(x)).dtype == dtype


def test_buffers_follow_module_to_and_state_dict():
    op = MultiCoilMRI((6, 8), _rand_maps(2, (6, 8)), acceleration=2)
    assert {"mask", "coil_maps_ri"} <= set(op.state_dict())
    if torch.cuda.is_available():
        op = op.to("cuda")
        x = _randn((1, 2, 6, 8)).cuda()
        assert op.A(x).device.type == "cuda"


@pytest.mark.parametrize("mask_type", ["random", "equispaced", "equispaced_fraction", "poisson", "gaussian"])
def test_default_masks_and_repr(mask_type):
    op = CartesianMRI((64, 64), acceleration=4, mask_type=mask_type, seed=3)
    assert op.mask.shape == (64, 64)
    if mask_type in ("equispaced_fraction", "poisson", "gaussian"):
        assert abs(op.acceleration - 4) / 4 < 0.05
    text = repr(op)
    assert "(64, 64)" in text and mask_type in text and f"{op.acceleration:.2f}" in text
    mc = MultiCoilMRI((3, 16, 16), simulate_coil_maps((3, 16, 16), 5), acceleration=2, fft_dims="3d")
    assert "coils=5" in repr(mc) and "fft_dims='3d'" in repr(mc)


def test_mask_update_on_the_fly():
    size = (8, 12)
    op = CartesianMRI(size, acceleration=2)
    new = _binary(size, seed=9)
    x = _randn((1, 2, *size))
    torch.testing.assert_close(op.A(x, mask=new), CartesianMRI(size, mask=new).A(x))
    assert torch.equal(op.mask, new)


# ------------------------------------------------------------------------------------------ errors
def test_constructor_errors():
    maps = _rand_maps(2, (8, 8))
    with pytest.raises(ValueError, match="neither"):
        CartesianMRI((8, 8))
    with pytest.raises(ValueError, match="both"):
        CartesianMRI((8, 8), mask=torch.ones(8, 8), acceleration=2)
    with pytest.raises(ValueError, match="acceleration"):
        CartesianMRI((8, 8), acceleration=0.5)
    with pytest.raises(ValueError, match=r"mask must have shape \(8, 8\).*got \(8, 7\)"):
        CartesianMRI((8, 8), mask=torch.ones(8, 7))
    with pytest.raises(ValueError, match=r"\(6, 8\) or \(3, 6, 8\)"):
        CartesianMRI((3, 6, 8), mask=torch.ones(4, 6, 8))
    with pytest.raises(ValueError, match="real"):
        CartesianMRI((8, 8), mask=torch.ones(8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="all zeros"):
        CartesianMRI((8, 8), mask=torch.zeros(8, 8))
    with pytest.raises(ValueError, match="mask_type"):
        CartesianMRI((8, 8), acceleration=2, mask_type="spiral")
    with pytest.raises(ValueError, match="fft_dims"):
        CartesianMRI((8, 8), acceleration=2, fft_dims="3d")
    with pytest.raises(ValueError, match="img_size"):
        CartesianMRI((8,), acceleration=2)
    with pytest.raises(ValueError, match=r"coil_maps must have shape \(N, 8, 8\).*got \(2, 8, 6\)"):
        MultiCoilMRI((8, 8), _rand_maps(2, (8, 6)), acceleration=2)
    with pytest.raises(ValueError, match="complex"):
        MultiCoilMRI((8, 8), maps.real, acceleration=2)
    with pytest.raises(ValueError, match="neither"):
        MultiCoilMRI((8, 8), maps)


def test_call_errors():
    op = CartesianMRI((8, 8), acceleration=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, 8, 8\), got \(1, 1, 8, 8\)"):
        op.A(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"got \(1, 2, 8, 9\)"):
        op.A(torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="float32 or float64"):
        op.A(torch.zeros(1, 2, 8, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="y must have shape"):
        op.A_adjoint(torch.zeros(1, 2, 8))
    mc = MultiCoilMRI((8, 8), _rand_maps(3, (8, 8)), acceleration=2)
    with pytest.raises(ValueError, match=r"y must have shape \(B, 2, 3, 8, 8\).*got \(1, 2, 2, 8, 8\)"):
        mc.A_adjoint(torch.zeros(1, 2, 2, 8, 8))
    with pytest.raises(ValueError, match="float32 or float64"):
        mc.A_adjoint(torch.zeros(1, 2, 3, 8, 8, dtype=torch.int64))


# ------------------------------------------------------------------------------------------ coil maps
@pytest.mark.parametrize("size", [(24, 32), (4, 16, 16)])
def test_simulated_maps_normalised_and_smooth(size):
    maps = simulate_coil_maps(size, 8, dtype=torch.complex128)
    assert maps.shape == (8, *size) and maps.dtype == torch.complex128
    torch.testing.assert_close((maps.abs() ** 2).sum(0), torch.ones(size, dtype=torch.float64))
    # smooth: over 90 % of the maps' energy lies in the central quarter (+-n/8) of their spectrum
    h, w = size[-2:]
    spec = torch.fft.fftshift(torch.fft.fft2(maps), dim=(-2, -1)).abs() ** 2
    low = spec[..., h // 2 - h // 8 : h // 2 + h // 8 + 1, w // 2 - w // 8 : w // 2 + w // 8 + 1].sum()
    assert float(low / spec.sum()) > 0.9
    assert (maps[0].abs() - maps[1].abs()).abs().max() > 0.05


def test_simulate_errors():
    with pytest.raises(ValueError, match="n_coils"):
        simulate_coil_maps((8, 8), 0)
    with pytest.raises(ValueError, match="radius"):
        simulate_coil_maps((8, 8), 4, radius=1.0)
    with pytest.raises(ValueError, match="img_size"):
        simulate_coil_maps((8,), 4)


def _smooth_object(size):
    ax = [(np.arange(n) - (n - 1) / 2) / (n / 2) for n in size[-2:]]
    yy, xx = np.meshgrid(*ax, indexing="ij")
    support = (yy / 0.8) ** 2 + (xx / 0.7) ** 2 < 1
    obj = support * (1 + 0.3 * np.cos(2 * xx)) * np.exp(0.5j * yy)
    obj, support = np.broadcast_to(obj, size), np.broadcast_to(support, size)
    return torch.from_numpy(np.stack([obj.real, obj.imag]))[None], support


@pytest.mark.parametrize("size,fft_dims", [((32, 32), "2d"), ((3, 24, 24), "2d"), ((3, 24, 24), "3d")])
def test_espirit_recovers_simulated_maps(size, fft_dims):
    true = simulate_coil_maps(size, 8, dtype=torch.complex128)
    x, support = _smooth_object(size)
    op = MultiCoilMRI(size, true, mask=torch.ones(size[-2:]), fft_dims=fft_dims)
    y = op.A(x)
    # only the centre is needed: zero the k-space outside a 16 x 16 ACS block
    acs = torch.zeros(size[-2:], dtype=torch.float64)
    h, w = size[-2:]
    acs[h // 2 - 8 : h // 2 + 8, w // 2 - 8 : w // 2 + 8] = 1
    est = estimate_coil_maps(y * acs, calib_size=16, kernel_size=5, fft_dims=fft_dims)
    assert est.shape == (1, 8, *size) and est.is_complex()
    est = est[0]
    # equal up to a per-pixel phase: |<S_est(r), S_true(r)>| ~ 1 inside the object
    proj = (est.conj() * true).sum(0).abs().numpy()
    assert proj[support].min() > 0.99
    # data consistency: the SENSE operator with the estimated maps reproduces the fully sampled data for
    # the object with the phase ESPIRiT absorbed
    phase = (est.conj() * true).sum(0)
    xc = torch.complex(x[:, 0], x[:, 1]) * phase
    op_est = MultiCoilMRI(size, est, mask=torch.ones(size[-2:]), fft_dims=fft_dims)
    y_est = op_est.A(torch.stack((xc.real, xc.imag), dim=1))
    assert float((y_est - y).norm() / y.norm()) < 1e-2


def test_espirit_complex_input_and_errors():
    size = (24, 24)
    maps = simulate_coil_maps(size, 4, dtype=torch.complex128)
    x, _ = _smooth_object(size)
    y = MultiCoilMRI(size, maps, mask=torch.ones(size)).A(x)
    est = estimate_coil_maps(torch.complex(y[0, 0], y[0, 1]), calib_size=16, kernel_size=5)
    assert est.shape == (4, *size)
    with pytest.raises(ValueError, match="real kspace must be"):
        estimate_coil_maps(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="smaller than kernel_size"):
        estimate_coil_maps(y, calib_size=4, kernel_size=6)
    with pytest.raises(ValueError, match="fft_dims"):
        estimate_coil_maps(y, fft_dims="4d")
