"""Tests of `recon.operators.downsampling`: Downsampling, alone and composed with Blur."""

from __future__ import annotations

import math
import warnings

import deepinv
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from operator_checks import assert_adjoint, assert_batch_consistent, assert_dtypes, assert_operator_contract

from recon.operators import Blur, Downsampling


def _rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CONFIGS = [
    # (img_size, kwargs, gradcheck size)
    ((16, 16), dict(factor=2), (4, 4)),
    ((16, 12), dict(factor=(4, 3)), (4, 6)),
    ((16, 16), dict(factor=2, filter="box"), (4, 4)),
    ((16, 16), dict(factor=2, filter="none"), (4, 4)),
    ((8, 12, 12), dict(factor=(4, 1, 1)), (4, 2, 2)),
    ((8, 12, 12), dict(factor=2), (2, 2, 2)),
    ((8, 12, 12), dict(factor=3, axes=(1, 2)), (1, 3, 3)),
]


@pytest.mark.parametrize(("size", "kwargs", "gsize"), CONFIGS)
def test_contract(size, kwargs, gsize):
    op = Downsampling(size, **kwargs)
    assert_operator_contract(op, (2, 2, *size))
    # gradcheck on a tiny operator of the same kind (sizes divisible by the factors)
    small = Downsampling(gsize, **kwargs)
    assert_operator_contract(small, (2, 1, *gsize), gradcheck_shape=(1, 1, *gsize))


def test_through_plane_box_is_mean_of_slice_groups():
    """Independent truth: numpy reshape-mean over groups of `factor` consecutive slices."""
    op = Downsampling((12, 6, 5), factor=(4, 1, 1))
    assert op.filters == ("box", "-", "-") and op.out_size == (3, 6, 5)
    x = _rand((2, 3, 12, 6, 5))
    ref = x.numpy().reshape(2, 3, 3, 4, 6, 5).mean(axis=3)
    np.testing.assert_allclose(op.A(x).numpy(), ref, rtol=0, atol=1e-14)


def test_gaussian_odd_factor_matches_scipy_filter_then_decimate():
    """Independent truth: scipy gaussian_filter1d (sigma = f / 2.3548, mode 'reflect') sampled at i*f + 1."""
    f = 3
    sigma = f / (2 * math.sqrt(2 * math.log(2)))
    radius = math.ceil(4 * sigma)
    x = _rand((1, 1, 15, 12))
    op = Downsampling((15, 12), factor=f, filter="gaussian")
    ref = x[0, 0].numpy()
    for axis in (0, 1):
        ref = ndi.gaussian_filter1d(ref, sigma, axis=axis, mode="reflect", radius=radius)
    np.testing.assert_allclose(op.A(x)[0, 0].numpy(), ref[1::f, 1::f], rtol=0, atol=1e-12)


@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize("filt", ["gaussian", "box"])
def test_block_centred_geometry_commutes_with_flips(factor, filt):
    """Output pixel i is centred on its block of f input pixels, so A(flip x) = flip A(x) for any f."""
    op = Downsampling((12, 24), factor=factor, filter=filt)
    x = _rand((1, 1, 12, 24))
    torch.testing.assert_close(op.A(x.flip(-1, -2)), op.A(x).flip(-1, -2), rtol=0, atol=1e-13)


@pytest.mark.parametrize(("size", "kwargs"), [(c[0], c[1]) for c in CONFIGS])
def test_constant_maps_to_same_constant(size, kwargs):
    op = Downsampling(size, **kwargs).to(torch.float32)  # weights stay float64 under .to(dtype)
    x = torch.full((1, 2, *size), -1.75, dtype=torch.float64)
    y = op.A(x)
    assert y.shape == (1, 2, *op.out_size)
    torch.testing.assert_close(y, torch.full_like(y, -1.75), rtol=0, atol=1e-14)


def test_composition_with_blur_through_deepinv():
    """`down * blur` is deepinv's ComposedLinearPhysics: A = down(blur(x)), with an exact adjoint."""
    size = (8, 12, 12)
    blur = Blur.gaussian(size, fwhm=(2.0, 1.5, 1.5), spacing=(1.0, 0.5, 0.5))
    down = Downsampling(size, factor=(2, 2, 2), spacing=(1.0, 0.5, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # composing linear operators must not warn
        op = down * blur
    assert isinstance(op, deepinv.physics.ComposedLinearPhysics)
    x = _rand((2, 1, *size))
    torch.testing.assert_close(op.A(x), down.A(blur.A(x)), rtol=0, atol=0)
    torch.testing.assert_close(op.A_adjoint(op.A(x)), blur.A_adjoint(down.A_adjoint(down.A(blur.A(x)))))
    assert_adjoint(op, (2, 1, *size))
    assert_batch_consistent(op, (2, 1, *size))
    assert_dtypes(op, (2, 1, *size))
    assert op(x).shape == (2, 1, 4, 6, 6)


def test_box_pseudo_inverse_is_replication():
    """For box filters A Aᵀ = I / prod(f), so A† = prod(f) Aᵀ: each thick slice repeated f times."""
    op = Downsampling((8, 4, 4), factor=(4, 1, 1))
    y = _rand((1, 1, 2, 4, 4))
    xd = op.A_dagger(y)
    torch.testing.assert_close(xd, y.repeat_interleave(4, dim=2))
    torch.testing.assert_close(op.A(xd), y)


def test_geometry_attributes_and_repr():
    op = Downsampling((32, 64, 64), factor=(4, 1, 1), spacing=(1.0, 0.5, 0.5))
    assert op.out_size == (8, 64, 64) and op.out_spacing == (4.0, 0.5, 0.5) and op.factor == (4, 1, 1)
    text = repr(op)
    parts = ("Downsampling(", "(32, 64, 64) -> (8, 64, 64)", "factor=(4, 1, 1)", "(4, 0.5, 0.5) mm", "box")
    assert all(part in text for part in parts), text
    op2 = Downsampling((16, 16, 16), factor=2, axes=(1, 2), filter=("box", "gaussian"))
    assert op2.factor == (1, 2, 2) and op2.filters == ("-", "box", "gaussian")


def test_errors():
    with pytest.raises(ValueError, match=r"divisible.*remainders \[2, 0\]"):
        Downsampling((10, 8), factor=4)
    with pytest.raises(ValueError, match="integer >= 1, got 0"):
        Downsampling((8, 8), factor=0)
    with pytest.raises(ValueError, match=r"integer >= 1, got 1\.5"):
        Downsampling((8, 8), factor=1.5)
    with pytest.raises(ValueError, match=r"factor must be one integer or 3"):
        Downsampling((8, 8, 8), factor=(2, 2))
    with pytest.raises(ValueError, match="filter"):
        Downsampling((8, 8), factor=2, filter="bicubic")
    with pytest.raises(ValueError, match="axes"):
        Downsampling((8, 8), factor=2, axes=(2,))
    with pytest.raises(ValueError, match="repeat"):
        Downsampling((8, 8), factor=2, axes=(0, -2))
    with pytest.raises(ValueError, match="spacing"):
        Downsampling((8, 8), factor=2, spacing=(1.0, -1.0))
    op = Downsampling((8, 8), factor=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, 8, 8\), got \(1, 1, 4, 4\)"):
        op.A(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"y must have shape \(B, C, 4, 4\), got \(1, 1, 8, 8\)"):
        op.A_adjoint(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="float32 or float64"):
        op.A(torch.zeros(1, 1, 8, 8, dtype=torch.float16))
