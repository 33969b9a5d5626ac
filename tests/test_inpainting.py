"""Tests of `recon.operators.inpainting`: Inpainting and its mask builders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from operator_checks import assert_operator_contract

from recon.operators import Inpainting, box_mask, missing_slice_mask, random_pixel_mask


def _rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    ("size", "mask"),
    [
        ((16, 16), random_pixel_mask((16, 16), 0.4, seed=1)),
        ((8, 12, 12), missing_slice_mask((8, 12, 12), keep_every=2)),
        ((16, 16), box_mask((16, 16), ((4, 10), (2, 14)))),
    ],
)
def test_contract(size, mask):
    op = Inpainting(size, mask)
    assert_operator_contract(op, (2, 2, *size))


def test_contract_gradcheck_and_per_channel_mask():
    mask = torch.stack([random_pixel_mask((4, 5), 0.5, seed=s) for s in range(3)])  # (C, H, W)
    op = Inpainting((4, 5), mask)
    assert op.channels == 3
    assert_operator_contract(op, (2, 3, 4, 5), gradcheck_shape=(1, 3, 4, 5))
    x = _rand((2, 3, 4, 5))
    torch.testing.assert_close(op.A(x), x * mask.double()[None], rtol=0, atol=0)


def test_forward_is_elementwise_product_and_self_adjoint():
    """Independent truth: numpy elementwise product with the mask, broadcast over batch and channels."""
    mask = random_pixel_mask((6, 7), 0.3, seed=5)
    op = Inpainting((6, 7), mask)
    x = _rand((3, 2, 6, 7))
    np.testing.assert_array_equal(op.A(x).numpy(), x.numpy() * mask.numpy()[None, None].astype(np.float64))
    torch.testing.assert_close(op.A_adjoint(x), op.A(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("size", "frac"), [((16, 16), 0.3), ((8, 12, 12), 0.75), ((5, 7), 0.5), ((4, 4), 0.0), ((3, 3), 1.0)]
)
def test_random_mask_exact_fraction(size, frac):
    m = random_pixel_mask(size, missing_fraction=frac, seed=3)
    n = math.prod(size)
    assert m.shape == size and m.dtype == torch.float32
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    assert int((m == 0).sum()) == math.floor(frac * n + 0.5)


def test_random_mask_is_uniform_over_the_image():
    """The missing pixels are spread out: each quarter of a 64² mask holds 30% ± 3% missing pixels."""
    m = random_pixel_mask((64, 64), 0.3, seed=0)
    for q in (m[:32, :32], m[:32, 32:], m[32:, :32], m[32:, 32:]):
        assert abs(float((q == 0).float().mean()) - 0.3) < 0.03  # ~4 hypergeometric std


def test_random_mask_reproducible_with_seed():
    a = random_pixel_mask((16, 16), 0.5, seed=7)
    b = random_pixel_mask((16, 16), 0.5, seed=7)
    c = random_pixel_mask((16, 16), 0.5, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_box_mask():
    m = box_mask((8, 10), ((2, 5), None))
    assert m.dtype == torch.float32 and m.shape == (8, 10)
    assert (m[2:5] == 0).all() and (m[:2] == 1).all() and (m[5:] == 1).all()
    m3 = box_mask((6, 8, 8), ((1, 3), (0, 4), (4, 8)))
    assert int((m3 == 0).sum()) == 2 * 4 * 4
    assert (m3[1:3, 0:4, 4:8] == 0).all()


def test_missing_slices_are_exactly_zero():
    size = (8, 6, 6)
    mask = missing_slice_mask(size, missing=[1, 4, -1], axis=0)
    x = _rand((2, 3, *size)) + 5.0  # no accidental zeros
    y = Inpainting(size, mask).A(x)
    for d in range(8):
        if d in (1, 4, 7):
            assert (y[:, :, d] == 0).all()
        else:
            assert torch.equal(y[:, :, d], x[:, :, d])


def test_keep_every_and_rows_in_2d():
    m = missing_slice_mask((8, 12, 12), keep_every=3, offset=1, axis=0)
    kept = [d for d in range(8) if bool((m[d] == 1).all())]
    assert kept == [1, 4, 7] and int(m.sum()) == 3 * 144
    rows = missing_slice_mask((6, 5), missing=[0, 2])  # 2D: missing rows
    assert (rows[[0, 2]] == 0).all() and (rows[[1, 3, 4, 5]] == 1).all()
    cols = missing_slice_mask((6, 5), missing=[3], axis=-1)
    assert (cols[:, 3] == 0).all() and int(cols.sum()) == 6 * 4


def test_closed_form_pseudo_inverse_and_prox():
    """prox solves (gamma M + I) x = gamma M y + z; A_dagger is the zero-filled measurement."""
    op = Inpainting((8, 8), random_pixel_mask((8, 8), 0.5))
    y, z = op.A(_rand((2, 1, 8, 8), 1)), _rand((2, 1, 8, 8), 2)
    torch.testing.assert_close(op.A(op.A_dagger(y)), y)
    p = op.prox_l2(z, y, 0.3)
    torch.testing.assert_close(0.3 * op.A_adjoint_A(p) + p, 0.3 * op.A_adjoint(y) + z)


def test_device_buffers_and_dtypes():
    op = Inpainting((4, 4), box_mask((4, 4), ((1, 3), (1, 3))))
    assert "mask" in dict(op.named_buffers())
    assert op.A(torch.ones(1, 1, 4, 4)).dtype == torch.float32
    assert op.A(torch.ones(1, 1, 4, 4, dtype=torch.float64)).dtype == torch.float64


def test_errors():
    with pytest.raises(ValueError, match=r"mask must have shape \(8, 8\).*got \(8, 9\)"):
        Inpainting((8, 8), torch.ones(8, 9))
    with pytest.raises(ValueError, match="binary"):
        Inpainting((4, 4), torch.full((4, 4), 0.5))
    op = Inpainting((4, 4), torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 2, 4, 4\), got \(1, 3, 4, 4\)"):
        op.A(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, 4, 4\), got \(1, 4, 4\)"):
        Inpainting((4, 4), torch.ones(4, 4)).A(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="float32 or float64"):
        Inpainting((4, 4), torch.ones(4, 4)).A(torch.zeros(1, 1, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="missing_fraction"):
        random_pixel_mask((4, 4), 1.5)
    with pytest.raises(ValueError, match=r"box\[1\]"):
        box_mask((4, 4), ((0, 2), (3, 6)))
    with pytest.raises(ValueError, match="per axis"):
        box_mask((4, 4), ((0, 2),))
    with pytest.raises(ValueError, match="exactly one"):
        missing_slice_mask((4, 4, 4), missing=[1], keep_every=2)
    with pytest.raises(ValueError, match="exactly one"):
        missing_slice_mask((4, 4, 4))
    with pytest.raises(ValueError, match=r"\[-4, 3\].*\[5\]"):
        missing_slice_mask((4, 4, 4), missing=[5])
    with pytest.raises(ValueError, match="axis"):
        missing_slice_mask((4, 4), missing=[0], axis=2)
    with pytest.raises(ValueError, match="keep_every"):
        missing_slice_mask((4, 4), keep_every=0)
    with pytest.raises(ValueError, match="img_size"):
        random_pixel_mask((4,), 0.5)


def test_repr():
    text = repr(Inpainting((8, 8), box_mask((8, 8), ((0, 4), None))))
    assert text.startswith("Inpainting(") and "img_size=(8, 8)" in text and "kept=50.0%" in text
