"""Checks that every `recon` operator must pass (the deepinv physics contract, made strict).

Each function takes an operator and an input shape and raises ``AssertionError`` with numbers when the
contract is broken. Test modules call them for each operator they define.
"""

from __future__ import annotations

import torch


def _randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def adjoint_mismatch(op, x_shape, dtype=torch.float64, seed=0) -> float:
    """|<A x, y> - <x, A^T y>| / |<A x, y>| for random x and a y correlated with the range of A.

    y = A x' + n with an independent x' keeps <A x, y> away from zero, so the ratio is meaningful.
    """
    op = op.to(dtype) if hasattr(op, "to") else op
    x = _randn(x_shape, dtype, seed)
    x2 = x + _randn(x_shape, dtype, seed + 1)
    y0 = op.A(x2)
    y = y0 + 0.1 * y0.std() * _randn(y0.shape, dtype, seed + 2)
    lhs = (op.A(x) * y).sum(dtype=torch.float64)
    rhs = (x * op.A_adjoint(y)).sum(dtype=torch.float64)
    return float((lhs - rhs).abs() / lhs.abs())


def assert_adjoint(op, x_shape, tol32=1e-5, tol64=1e-10):
    for dtype, tol in ((torch.float32, tol32), (torch.float64, tol64)):
        err = adjoint_mismatch(op, x_shape, dtype)
        assert err < tol, f"adjoint mismatch {err:.3e} >= {tol:g} in {dtype}"


def assert_gradcheck(op, x_shape, seed=0):
    """Gradients through A and A_adjoint match finite differences (float64)."""
    x = _randn(x_shape, torch.float64, seed).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: op.A(v), (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
    y = _randn(op.A(x.detach()).shape, torch.float64, seed + 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: op.A_adjoint(v), (y,), eps=1e-6, atol=1e-6, rtol=1e-4)


def assert_batch_consistent(op, x_shape, seed=0):
    """A and A_adjoint act on each batch element independently: a batch of 3 equals 3 single calls."""
    x = _randn((3, *x_shape[1:]), torch.float64, seed)
    y = op.A(x)
    singles = torch.cat([op.A(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(y, singles, rtol=1e-10, atol=1e-10)
    xt = op.A_adjoint(y)
    singles_t = torch.cat([op.A_adjoint(y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(xt, singles_t, rtol=1e-10, atol=1e-10)


def assert_dtypes(op, x_shape, seed=0):
    """float32 and float64 inputs give outputs of the same dtype that agree to float32 precision."""
    x64 = _randn(x_shape, torch.float64, seed)
    y64 = op.A(x64)
    y32 = op.A(x64.float())
    assert y64.dtype == torch.float64 and y32.dtype == torch.float32
    scale = y64.abs().max()
    assert float((y32.double() - y64).abs().max() / scale) < 1e-4
    xt64 = op.A_adjoint(y64)
    xt32 = op.A_adjoint(y64.float())
    assert xt64.dtype == torch.float64 and xt32.dtype == torch.float32
    assert xt64.shape == x64.shape
    assert float((xt32.double() - xt64).abs().max() / xt64.abs().max()) < 1e-4


def assert_operator_contract(op, x_shape, gradcheck_shape=None, tol32=1e-5, tol64=1e-10):
    """The whole contract: adjointness (float32/64), gradients, batching and dtypes."""
    import deepinv

    assert isinstance(op, deepinv.physics.LinearPhysics)
    assert_adjoint(op, x_shape, tol32, tol64)
    assert_batch_consistent(op, x_shape)
    assert_dtypes(op, x_shape)
    if gradcheck_shape is not None:
        assert_gradcheck(op, gradcheck_shape)
    text = repr(op)
    assert type(op).__name__ in text and len(text) < 2000
