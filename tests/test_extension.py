"""The native extension tunecomp._C: built, loaded, correct, and its checks raise."""

import pytest
import torch

from conftest import random_mask, rel_error
from tunecomp import ops, reference

_C = ops._C
pytestmark = pytest.mark.skipif(_C is None, reason=f"tunecomp._C not built: {ops.NATIVE_IMPORT_ERROR}")


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (37, 24, 40, 16), (5, 33, 17, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_forward_matches_reference(shape, dtype, keep, with_bias):
    n, k, m, r = shape
    x, u, v = torch.randn(n, k, dtype=dtype), torch.randn(m, r, dtype=dtype), torch.randn(k, r, dtype=dtype)
    bias = torch.randn(m, dtype=dtype) if with_bias else None
    mask_u, mask_v = random_mask(u.shape, keep), random_mask(v.shape, keep)
    y = _C.masked_lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v)
    expected = reference.masked_lowrank_linear(
        x.double(), u.double(), v.double(), None if bias is None else bias.double(), mask_u, mask_v
    )
    if expected.norm() == 0:
        assert torch.count_nonzero(y) == 0
    else:
        assert rel_error(y, expected) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert torch.equal(_C.masked_lowrank_forward_cpu(x, u, v), reference.masked_lowrank_linear(x, u, v))


def test_cpu_forward_checks_raise_python_errors():
    x, u, v = torch.randn(4, 6), torch.randn(5, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"x.shape\[1\] \(in_features\) must equal v.shape\[0\]; got 6 and 7"):
        _C.masked_lowrank_forward_cpu(x, u, torch.randn(7, 2))
    with pytest.raises(ValueError, match="u and v must have the same rank"):
        _C.masked_lowrank_forward_cpu(x, torch.randn(5, 3), v)
    with pytest.raises(TypeError, match="mask_u must be a bool tensor"):
        _C.masked_lowrank_forward_cpu(x, u, v, None, torch.ones(5, 2))
    with pytest.raises(ValueError, match="mask_v must have shape"):
        _C.masked_lowrank_forward_cpu(x, u, v, None, None, torch.ones(6, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="v must have x's dtype"):
        _C.masked_lowrank_forward_cpu(x, u, v.double())
    with pytest.raises(ValueError, match="bias must have shape"):
        _C.masked_lowrank_forward_cpu(x, u, v, torch.randn(4))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        _C.masked_lowrank_forward_cpu(x.long(), u, v)


def test_cuda_part_built_when_toolkit_present():
    """With a CUDA build of torch and nvcc, setup.py compiles csrc/*.cu for sm_80 and sm_90."""
    import os
    import shutil

    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("CPU-only torch or no nvcc: the extension is CPU only by design")
    assert _C.with_cuda
    archs = os.environ.get("TUNECOMP_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    assert set(_C.cuda_compiled_archs()) == {int(a) * 10 for a in archs}  # __CUDA_ARCH__ style
