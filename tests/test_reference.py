"""tunecomp.reference against independent float64 math."""

import math

import pytest
import torch

from conftest import random_mask, rel_error
from tunecomp import reference

SHAPES = [  # (tokens, in, out, rank)
    (1, 1, 1, 1),
    (7, 13, 5, 3),
    (37, 24, 40, 16),
    (64, 33, 17, 17),
]


def dense_math(x, u, v, bias, mask_u, mask_v):
    """The op through the merged dense weight W = Um·Vmᵀ, in float64 (another route to y)."""
    um = u.double() * mask_u.double()
    vm = v.double() * mask_v.double()
    w = torch.einsum("or,ir->oi", um, vm)
    y = torch.einsum("...i,oi->...o", x.double(), w)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_masked_matches_dense_math(shape, keep, dtype, with_bias):
    n, k, m, r = shape
    x = torch.randn(3, n, k, dtype=dtype)  # extra leading dim
    u, v = torch.randn(m, r, dtype=dtype), torch.randn(k, r, dtype=dtype)
    bias = torch.randn(m, dtype=dtype) if with_bias else None
    mask_u, mask_v = random_mask(u.shape, keep), random_mask(v.shape, keep)
    y = reference.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v)
    expected = dense_math(x, u, v, bias, mask_u, mask_v)
    assert y.shape == (3, n, m) and y.dtype == dtype
    if expected.norm() == 0:  # everything pruned, no bias: exactly zero
        assert torch.count_nonzero(y) == 0
    else:
        # fp32: a K-term dot product rounds to ~sqrt(K)·2⁻²⁴ relative; 1e-5 leaves margin.
        assert rel_error(y, expected) < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_blended_matches_dense_math(alpha):
    n, k, m, r = 11, 20, 9, 4
    x = torch.randn(n, k, dtype=torch.float64)
    u, v, bias = torch.randn(m, r, dtype=torch.float64), torch.randn(k, r, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    w0, b0 = torch.randn(m, k, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    mask_u, mask_v = random_mask(u.shape, 0.5), random_mask(v.shape, 0.5)
    y = reference.blended_lowrank_linear(x, u, v, bias, mask_u, mask_v, w0, b0, alpha)
    student = dense_math(x, u, v, bias, mask_u, mask_v)
    expected = alpha * (x @ w0.T + b0) + math.sqrt(1 - alpha**2) * student
    assert rel_error(y, expected) < 1e-12
    y_tensor_alpha = reference.blended_lowrank_linear(
        x, u, v, bias, mask_u, mask_v, w0, b0, torch.tensor(alpha, dtype=torch.float64)
    )
    assert rel_error(y_tensor_alpha, expected) < 1e-12


def test_student_scale_is_accurate_near_alpha_one():
    """sqrt(1 - alpha²) of a float32 alpha, in float32, within 2 units of float32 roundoff of
    the float64 value for the same alpha, up to alpha = 1 - 2**-20. Computed as
    1 - alpha*alpha it is off by up to u/(1 - alpha²): 5.8e-6 of itself at alpha = 0.9995."""
    alpha = 1.0 - torch.logspace(-1, -20, 200, base=2.0, dtype=torch.float32)
    assert alpha.dtype == torch.float32 and (alpha < 1).all()
    exact = torch.sqrt(1.0 - alpha.double() ** 2)
    got = reference.student_scale(alpha)
    assert got.dtype == torch.float32
    worst = ((got.double() - exact) / exact).abs().max().item()
    assert worst <= 2 * 2.0 ** -24, worst
    assert reference.student_scale(0.9995) == pytest.approx(math.sqrt(1 - 0.9995 ** 2), rel=1e-15)


def test_gradcheck_masked_and_blended():
    n, k, m, r = 5, 6, 4, 3
    opts = {"dtype": torch.float64, "requires_grad": True}
    x, u, v, bias = torch.randn(n, k, **opts), torch.randn(m, r, **opts), torch.randn(k, r, **opts), torch.randn(m, **opts)
    mask_u, mask_v = random_mask(u.shape, 0.5), random_mask(v.shape, 0.5)
    w0, b0 = torch.randn(m, k, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *a: reference.masked_lowrank_linear(*a, mask_u, mask_v), (x, u, v, bias)
    )
    assert torch.autograd.gradcheck(
        lambda *a: reference.blended_lowrank_linear(*a, mask_u, mask_v, w0, b0, 0.6), (x, u, v, bias)
    )


def test_pruned_entries_have_zero_gradient_and_hide_nan():
    n, k, m, r = 9, 8, 7, 5
    x = torch.randn(n, k)
    u, v = torch.randn(m, r), torch.randn(k, r)
    mask_u, mask_v = random_mask(u.shape, 0.5), random_mask(v.shape, 0.5)
    mask_u[0, 0] = mask_v[0, 0] = False
    with torch.no_grad():  # a NaN stored in a pruned entry must not reach the output
        u[0, 0] = v[0, 0] = float("nan")
    u.requires_grad_(), v.requires_grad_()
    y = reference.masked_lowrank_linear(x, u, v, None, mask_u, mask_v)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.all(u.grad[~mask_u] == 0) and torch.all(v.grad[~mask_v] == 0)
    assert torch.isfinite(u.grad).all() and torch.isfinite(v.grad).all()
    # kept entries do get gradient (fails if masks were inverted)
    assert torch.count_nonzero(u.grad[mask_u]) > 0 and torch.count_nonzero(v.grad[mask_v]) > 0
