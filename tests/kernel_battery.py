"""The float64-reference battery shared by every kernel backend (tests/test_kernels.py) and
the Triton-only tests: problem generation, the reference, tolerances and assertions.

Inputs are fresh random every run; the seed of a failing case is in its assertion message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import warnings
from typing import NamedTuple, Optional

import pytest
import torch

from tunecomp import ops, reference

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _triton_fp32_tolerance():
    from tunecomp.kernels.masked_lowrank import dot_precision

    return 1e-5 if dot_precision(torch.float32) == "ieee" else 5e-3


# Relative Frobenius error bounds ||out - ref|| / ||ref|| against float64 math on the same
# (already rounded) inputs. The kernels accumulate in fp32 and round twice: the rank-r
# intermediate (T or G, stored/used in the input dtype as eager PyTorch does) and the output.
# Each rounding is at most the unit roundoff u relative, so the bounds are a few u:
#   fp32 ieee: u = 6e-8, fp32 sums over a few hundred terms stay far below 1e-5;
#   fp32 tf32 (Triton only, if torch's fp32 matmul precision is lowered): operands truncated
#              to 10 mantissa bits, up to 9.8e-4 each and biased towards zero, two per
#              product -> 5e-3;
#   fp16:      u = 2^-11 = 4.9e-4 -> 2e-3 (4u);
#   bf16:      u = 2^-8 = 3.9e-3 -> 1.6e-2 (4u).
# 4u, not 2u: random signs keep the Frobenius ratio of a large result near u, but a result
# of one element (a size-1 layer) has no such averaging, and eager PyTorch (the torch
# backend) rounds dU three times on its way: T, the product, the product times s. (With
# 1e-2, 2.6u, for bf16, the torch backend came to 0.8 of the bound in 50 draws of the tiny
# shapes.)
# Where a result is a sum with heavy cancellation (a handful of kept entries, rank 1 at 95%
# pruned), ||ref|| understates the rounding errors: rounding T to the dtype moves each term
# of dU = s·dyᵀ·T by up to u of the term, and the terms can be hundreds of times the sum. No
# kernel in that dtype can meet the bound there, so the error is measured against the larger
# of ||ref|| and the size of the terms that get rounded (``rounded_terms``): sqrt of the sum
# of their squares, the scale of a sum of independent roundings. Without cancellation that
# size is about ||ref|| (up to 2x: y and grad_x add a few such sums), so the bound keeps its
# meaning. (Two earlier escapes failed: the error relative to the same math on |inputs|
# grew with the sum length and at the GPU tests' ViT sizes let a bf16 gradient of all zeros
# pass; 4x the error of eager PyTorch in the dtype, itself one random draw of the same
# noise, failed a correct kernel: 2 draws in 400 of the rank-1, 95%-pruned fp16 blend.)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass
class Backend:
    """A backend object of tunecomp.ops and the device its tests put tensors on."""

    name: str
    impl: object
    device: torch.device

    def skip_unless_available(self, dtype):
        reason = self.impl.unavailable_reason(self.device, dtype)
        if reason is not None:
            pytest.skip(reason)

    def tolerance(self, dtype):
        if dtype != torch.float32:
            return TOLERANCE[dtype]
        return _triton_fp32_tolerance() if self.name == "triton" else 1e-5


def make_backend(name: str) -> Backend:
    """triton, torch: on the GPU, else the CPU (Triton: its interpreter); cuda: the GPU
    only; cpu: the C++ CPU kernels; cuda-emulator: the CUDA backend's C++ run on CPU threads
    (tests/cuda_emulator)."""
    if name == "cuda-emulator":
        if CUDA:  # building and running it costs about a minute of the GPU session
            pytest.skip("a GPU is here: the real cuda backend is tested instead")
        if shutil.which("c++") is None:
            pytest.skip("no C++ compiler to build the CUDA emulator")
        import cuda_emulator

        return Backend(name, ops._CudaBackend(native=cuda_emulator.load(), device_type="cpu"),
                       torch.device("cpu"))
    device = {"triton": "cuda" if CUDA else "cpu", "torch": "cuda" if CUDA else "cpu",
              "cuda": "cuda", "cpu": "cpu"}[name]
    return Backend(name, ops._BACKENDS[name], torch.device(device))


def fresh_seed():
    """Seed torch from OS randomness and return it, so a failure names its inputs."""
    return torch.seed()


# mask cases: None (all kept), all pruned, all kept (explicit), keep 50 %, keep 5 % (95 % pruned)
MASK_CASES = ["none", "zeros", "ones", "keep50", "keep5"]


def make_mask(case, shape, device):
    if case == "none":
        return None
    if case == "zeros":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if case == "ones":
        return torch.ones(shape, dtype=torch.bool, device=device)
    keep = {"keep50": 0.5, "keep5": 0.05}[case]
    return torch.rand(shape, device=device) < keep


def plant_nan(weight, mask):
    """Store NaN in one pruned entry (if any): a masked kernel must never read it as a value."""
    if mask is None or bool(mask.all()):
        return weight
    weight = weight.clone()
    idx = (~mask).nonzero()[0]
    weight[idx[0], idx[1]] = float("nan")
    return weight


def make_problem(n_tokens, in_f, out_f, rank, dtype, mask_case, device, has_bias=True,
                 teacher=False):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    p = {
        "x": rnd(n_tokens, in_f),
        "u": rnd(out_f, rank, scale=rank ** -0.5),
        "v": rnd(in_f, rank, scale=in_f ** -0.5),
        "bias": rnd(out_f) if has_bias else None,
        "mask_u": make_mask(mask_case, (out_f, rank), device),
        "mask_v": make_mask(mask_case, (in_f, rank), device),
        "grad_y": rnd(n_tokens, out_f),
    }
    p["u"] = plant_nan(p["u"], p["mask_u"])
    p["v"] = plant_nan(p["v"], p["mask_v"])
    if teacher:
        p["teacher_weight"] = rnd(out_f, in_f, scale=in_f ** -0.5)
        p["teacher_bias"] = rnd(out_f) if has_bias else None
    return p


def force_blend_route(monkeypatch, route):
    """The blend forced onto one route (``ops.folding_pays``), "two-branch" or "folded",
    whichever its shape would take."""
    monkeypatch.setattr(ops, "folding_pays", lambda *sizes: route == "folded")
    monkeypatch.setattr(ops, "folding_pays_backward", lambda *sizes: route == "folded")


@contextlib.contextmanager
def blend_route(route):
    """``force_blend_route`` while inside."""
    with pytest.MonkeyPatch.context() as patch:
        force_blend_route(patch, route)
        yield


@contextlib.contextmanager
def unwritten_memory_is_nan():
    """Every tensor allocated without initialisation inside (``torch.empty`` in Python,
    ``at::empty`` in the C++ extensions: both go through the same ATen op, on any device)
    starts as NaN, integers as their largest value. So an output element or intermediate a
    kernel forgets to write shows as NaN, not as whatever the memory held (often zeros, the
    right answer for pruned entries). This is torch's deterministic mode, taken only for its
    fill (``torch.utils.deterministic.fill_uninitialized_memory``): warn-only, its warnings
    about ops with no deterministic version silenced."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deterministic", category=UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


class Expected(NamedTuple):
    value: torch.Tensor  # float64
    rounded_terms: float = 0.0  # size of the terms rounded on the way (see above); 0: the bound alone


def reference_lowrank(p, alpha: Optional[float] = None):
    """(y, (grad_x, grad_u, grad_v, grad_bias)) of the float64 reference, by autograd, each an
    ``Expected`` with the size of its rounded terms (grad_bias: None without a bias). alpha is
    rounded to float32 first, as the ops get it (0.9995 moves by 2e-8, s = sqrt(1 - alpha²) by
    2e-5 of itself)."""
    if alpha is not None:  # the float32 the ops get, so that both see the same alpha
        alpha = float(torch.tensor(alpha, dtype=torch.float32))
    y, grads = _reference(p, alpha)
    sizes = rounded_terms(p, alpha)
    return Expected(y, sizes[0]), tuple(
        None if g is None else Expected(g, size) for g, size in zip(grads, sizes[1:]))


def _f64(t):
    return None if t is None else t.detach().double()


def _reference(p, alpha):
    x, u, v = (_f64(p[k]).requires_grad_() for k in ("x", "u", "v"))
    bias = _f64(p["bias"])
    if bias is not None:
        bias.requires_grad_()
    if alpha is None:
        y = reference.masked_lowrank_linear(x, u, v, bias, p["mask_u"], p["mask_v"])
    else:
        a = torch.tensor(alpha, dtype=torch.float64, device=x.device)
        y = reference.blended_lowrank_linear(
            x, u, v, bias, p["mask_u"], p["mask_v"], _f64(p["teacher_weight"]),
            _f64(p.get("teacher_bias")), a,
        )
    y.backward(_f64(p["grad_y"]))
    grads = (x.grad, u.grad, v.grad, bias.grad if bias is not None else None)
    return y.detach(), grads


def rounded_terms(p, alpha: Optional[float] = None):
    """For y, grad_x, grad_u, grad_v, grad_bias: sqrt of the sum of the squares of every term
    that a correct computation in the inputs' dtype may round before summing, in float64.
    Those are the products through the rank-r intermediates T = s·x·Vm and G = s·dy·Um, and
    for the blend also through the folded weight W = alpha·W0 + s·Um·Vmᵀ (its two summands),
    plus the branches that are added (teacher, student, bias; for grad_x the teacher's and
    the student's). Each rounding moves its term by at most u of it, so the rounding error of
    a result is about u times this size, however much the terms cancel. grad_bias = s·Σ dy:
    its terms s·dy (the cpu backend rounds s·dy before summing; a sum of 3 tokens cancelled
    to 1e-3 of them in about 1 draw in 1000 of the tiny shapes, against a bound of 0 here
    before)."""
    x, dy = (_f64(p[k]).flatten(0, -2) for k in ("x", "grad_y"))  # [tokens, features]
    um = reference.apply_mask(_f64(p["u"]), p["mask_u"])
    vm = reference.apply_mask(_f64(p["v"]), p["mask_v"])
    a, s = (0.0, 1.0) if alpha is None else (alpha, reference.student_scale(alpha))
    t, g = s * (x @ vm), s * (dy @ um)
    y_sq = t.square() @ um.square().T + (t @ um.T).square()
    gx_sq = g.square() @ vm.square().T + (g @ vm.T).square()
    gu_sq = dy.square().T @ t.square()  # dU = dyᵀ·T, T already scaled by s
    gv_sq = x.square().T @ g.square()
    if p["bias"] is not None:
        y_sq = y_sq + (s * _f64(p["bias"])).square()
    if alpha is not None:
        w0 = _f64(p["teacher_weight"])
        teacher = x @ w0.T if p.get("teacher_bias") is None else x @ w0.T + _f64(p["teacher_bias"])
        w_sq = (a * w0).square() + (s * um @ vm.T).square()
        y_sq = y_sq + (a * teacher).square() + x.square() @ w_sq.T
        gx_sq = gx_sq + (a * dy @ w0).square() + dy.square() @ w_sq
    gu_sq = reference.apply_mask(gu_sq, p["mask_u"])
    gv_sq = reference.apply_mask(gv_sq, p["mask_v"])
    gb = (s * dy).square().sum().sqrt().item()
    return tuple(m.sum().sqrt().item() for m in (y_sq, gx_sq, gu_sq, gv_sq)) + (gb,)


def assert_close(name, out, expected: Expected, dtype, seed, bound):
    """``out`` within ``bound`` of the float64 result, relative to the larger of its norm and
    the size of the terms rounded on the way (see above); exactly zero where the result is."""
    ref = expected.value
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (seed {seed})"
    ref_norm = ref.norm().item()
    if ref_norm == 0.0:
        # All-pruned factors: zero is exact, not approximately zero.
        assert (out == 0).all(), f"{name}: expected exact zeros (seed {seed})"
        return
    error = (out.double() - ref).norm().item()
    scale = max(ref_norm, expected.rounded_terms)
    # fp16 has subnormals below 2^-14: a result that small (a few kept entries of small
    # factors) is rounded to an absolute step of 2^-24, not to a relative one; four roundings
    # on the way allow 2^-23 per element.
    floor = 2.0 ** -23 * out.numel() ** 0.5 if dtype == torch.float16 else 0.0
    assert error <= bound * scale + floor, (
        f"{name}: error {error / ref_norm:.3g} relative to the result, {error / scale:.3g} "
        f"relative to the larger of it and the terms rounded on the way "
        f"({expected.rounded_terms / ref_norm:.3g} x the result), > {bound} in {dtype} (seed {seed})")


def assert_pruned_grads_zero(grad_u, grad_v, p, seed):
    for name, grad, mask in (("grad_u", grad_u, p["mask_u"]), ("grad_v", grad_v, p["mask_v"])):
        if mask is not None:
            assert (grad[~mask] == 0).all(), f"{name}: pruned entries not exactly 0 (seed {seed})"


def check_backward(outs, p, ref_grads, dtype, seed, has_bias, bound):
    grad_x, grad_u, grad_v, grad_b = outs
    for name, out, ref in zip(("grad_x", "grad_u", "grad_v"), outs[:3], ref_grads[:3]):
        assert_close(name, out, ref, dtype, seed, bound)
    if has_bias:
        assert_close("grad_b", grad_b, ref_grads[3], dtype, seed, bound)
    else:
        assert grad_b.shape == (0,)
    assert_pruned_grads_zero(grad_u, grad_v, p, seed)
