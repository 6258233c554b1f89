"""The native extension tunecomp._C: the C++ CPU kernels (both paths) against the float64
reference, and their checks raising Python errors."""

import os
import shutil

import pytest
import torch

from conftest import random_mask, rel_error
from tunecomp import ops, reference

_C = ops._C
pytestmark = pytest.mark.skipif(_C is None, reason=f"tunecomp._C not built: {ops.NATIVE_IMPORT_ERROR}")

SHAPES = [(1, 1, 1, 1), (37, 24, 40, 16), (5, 33, 17, 3), (130, 70, 65, 9)]  # 130: two chunks + a tail


def inputs(shape, keep, with_bias, contiguous=True):
    n, k, m, r = shape
    x = torch.randn(n, k) if contiguous else torch.randn(k, n).T
    u, v = torch.randn(m, r), torch.randn(k, r)
    bias = torch.randn(m) if with_bias else None
    return x, u, v, bias, random_mask(u.shape, keep), random_mask(v.shape, keep)


def double(t):
    return None if t is None else (t.double() if t.is_floating_point() else t)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_backward_match_reference(shape, keep, sparse, with_bias):
    x, u, v, bias, mask_u, mask_v = inputs(shape, keep, with_bias, contiguous=shape[0] % 2 == 0)
    y = _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, sparse)
    expected = reference.masked_lowrank_linear(*map(double, (x, u, v, bias)), mask_u, mask_v)
    grad_y = torch.randn_like(y)
    grads = _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, with_bias, sparse)
    expected_grads = ops._TorchBackend.backward(*map(double, (grad_y, x, u, v)), mask_u, mask_v, with_bias)
    # fp32 products summed over at most 70 terms: well under 1e-5 relative
    for got, want in [(y, expected), *zip(grads, expected_grads)]:
        if want.numel() == 0:
            assert got.numel() == 0
        elif want.norm() == 0:
            assert torch.count_nonzero(got) == 0
        else:
            assert rel_error(got, want) < 1e-5
    assert torch.all(grads[1][~mask_u] == 0) and torch.all(grads[2][~mask_v] == 0)


@pytest.mark.parametrize("sparse", [False, True])
def test_nan_in_pruned_entries_does_not_leak(sparse):
    x, u, v, bias, mask_u, mask_v = inputs((20, 16, 12, 4), 0.5, True)
    mask_u[0, 0] = mask_v[0, 0] = False
    u[0, 0] = v[0, 0] = float("nan")
    assert torch.isfinite(_C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, sparse)).all()
    grads = _C.lowrank_backward_cpu(torch.randn(20, 12), x, u, v, mask_u, mask_v, True, sparse)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("keep", [0.05, 1.0])
def test_cpu_backend_through_ops_with_autograd(keep):
    x, u, v, bias, mask_u, mask_v = inputs((30, 24, 20, 6), keep, True)
    leaves = [t.clone().requires_grad_() for t in (x, u, v, bias)]
    y = ops.masked_lowrank_linear(*leaves, mask_u, mask_v, backend="cpu")
    y.square().sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (x, u, v, bias)]
    ref = reference.masked_lowrank_linear(*ref_leaves, mask_u, mask_v)
    ref.square().sum().backward()
    assert rel_error(y, ref) < 1e-5
    for got, want in zip(leaves, ref_leaves):
        if want.grad.norm() > 0:
            assert rel_error(got.grad, want.grad) < 1e-5


def test_cpu_backend_refuses_other_dtypes_and_devices():
    assert "float32" in ops.available_backends("cpu", torch.float64)["cpu"]
    assert "CPU tensors" in ops.available_backends("cuda", torch.float32)["cpu"]
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float64) == "torch"


def test_checks_raise_python_errors():
    x, u, v = torch.randn(4, 6), torch.randn(5, 2), torch.randn(6, 2)
    f = _C.lowrank_forward_cpu
    with pytest.raises(ValueError, match=r"x.shape\[1\] \(in_features\) must equal v.shape\[0\]; got 6 and 7"):
        f(x, u, torch.randn(7, 2))
    with pytest.raises(ValueError, match="u and v must have the same rank"):
        f(x, torch.randn(5, 3), v)
    with pytest.raises(TypeError, match="mask_u must be a bool tensor"):
        f(x, u, v, None, torch.ones(5, 2))
    with pytest.raises(ValueError, match="mask_v must have shape"):
        f(x, u, v, None, None, torch.ones(6, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="v must have x's dtype"):
        f(x, u, v.double())
    with pytest.raises(ValueError, match="bias must have shape"):
        f(x, u, v, torch.randn(4))
    with pytest.raises(TypeError, match="x must be float32"):
        f(x.double(), u.double(), v.double())
    with pytest.raises(ValueError, match="grad_y must have shape"):
        _C.lowrank_backward_cpu(torch.randn(4, 4), x, u, v)


def test_cuda_part_built_when_toolkit_present():
    """With a CUDA build of torch and nvcc, setup.py compiles csrc/*.cu for sm_80 and sm_90."""
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("CPU-only torch or no nvcc: the extension is CPU only by design")
    assert _C.with_cuda
    archs = os.environ.get("TUNECOMP_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    assert set(_C.cuda_compiled_archs()) == {int(a) * 10 for a in archs}  # __CUDA_ARCH__ style


def test_packed_groups_match_and_follow_in_place_changes():
    x, u, v, bias, mask_u, mask_v = inputs((70, 24, 20, 6), 0.1, True)
    packed = _C.pack_groups_cpu(u, v, mask_u, mask_v)
    assert len(packed) == 12
    assert torch.equal(_C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True, packed),
                       _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True))
    with pytest.raises(ValueError, match="packed must hold the 12 tensors"):
        _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True, packed[:3])
    with pytest.raises(ValueError, match="packed does not match these factors"):
        _C.lowrank_forward_cpu(x, u[:, :5].contiguous(), v[:, :5].contiguous(), bias,
                               mask_u[:, :5].contiguous(), mask_v[:, :5].contiguous(), True, packed)
    # the backend caches the packing; an in-place update (an optimiser step, a new mask) must
    # be seen at once
    y1 = ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
    u.mul_(2.0)
    y2 = ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
    assert rel_error(y2 - bias, 2 * (y1 - bias)) < 1e-6
    mask_v.zero_()
    y3 = ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
    assert torch.allclose(y3, bias.expand_as(y3))
