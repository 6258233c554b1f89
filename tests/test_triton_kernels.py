"""Triton kernels (tunecomp.kernels) against tunecomp.reference computed in float64.

Without a GPU the kernels run on the CPU under Triton's interpreter (slow: shapes stay small,
bf16 is skipped because the interpreter's tl.dot is wrong on bf16). Inputs are fresh random
every run; the seed of a failing case is in its assertion message.
"""

import os

import torch

# Triton picks interpreter or compiler when kernels are decorated: decide before any import
# of triton (tests/conftest.py does the same, which covers other modules importing it first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tunecomp import reference  # noqa: E402

kernels = pytest.importorskip("tunecomp.kernels")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=needs_cuda),
]
CPU_DTYPES = DTYPES[:2]


def _fp32_tolerance():
    from tunecomp.kernels.masked_lowrank import fp32_dot_precision

    return 1e-5 if fp32_dot_precision() == "ieee" else 5e-3


# Relative Frobenius error bounds ||out - ref|| / ||ref|| against float64 math on the same
# (already rounded) inputs. The kernels accumulate in fp32 and round twice: the rank-r
# intermediate (T or G, stored/used in the input dtype as eager PyTorch does) and the output.
# Each rounding is at most the unit roundoff u relative, and random signs keep the Frobenius
# ratio near u, so the bounds are a few u:
#   fp32 ieee: u = 6e-8, fp32 sums over a few hundred terms stay far below 1e-5;
#   fp32 tf32 (only if torch's fp32 matmul precision is lowered): operands truncated to 10
#              mantissa bits, up to 9.8e-4 each and biased towards zero, two per product -> 5e-3;
#   fp16:      u = 4.9e-4 -> 2e-3;
#   bf16:      u = 3.9e-3 -> 1e-2.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def tolerance(dtype):
    return _fp32_tolerance() if dtype == torch.float32 else TOLERANCE[dtype]


def skip_if_unavailable(dtype):
    reason = kernels.unavailable_reason(DEVICE, dtype)
    if reason is not None:
        pytest.skip(reason)


def fresh_seed():
    """Seed torch from OS randomness and return it, so a failure names its inputs."""
    return torch.seed()


# mask cases: None (all kept), all pruned, all kept (explicit), keep 50 %, keep 5 % (95 % pruned)
MASK_CASES = ["none", "zeros", "ones", "keep50", "keep5"]


def make_mask(case, shape):
    if case == "none":
        return None
    if case == "zeros":
        return torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    if case == "ones":
        return torch.ones(shape, dtype=torch.bool, device=DEVICE)
    keep = {"keep50": 0.5, "keep5": 0.05}[case]
    return torch.rand(shape, device=DEVICE) < keep


def plant_nan(weight, mask):
    """Store NaN in one pruned entry (if any): a masked kernel must never read it as a value."""
    if mask is None or bool(mask.all()):
        return weight
    weight = weight.clone()
    idx = (~mask).nonzero()[0]
    weight[idx[0], idx[1]] = float("nan")
    return weight


def make_problem(n_tokens, in_f, out_f, rank, dtype, mask_case, has_bias=True, teacher=False):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    p = {
        "x": rnd(n_tokens, in_f),
        "u": rnd(out_f, rank, scale=rank ** -0.5),
        "v": rnd(in_f, rank, scale=in_f ** -0.5),
        "bias": rnd(out_f) if has_bias else None,
        "mask_u": make_mask(mask_case, (out_f, rank)),
        "mask_v": make_mask(mask_case, (in_f, rank)),
        "grad_y": rnd(n_tokens, out_f),
    }
    p["u"] = plant_nan(p["u"], p["mask_u"])
    p["v"] = plant_nan(p["v"], p["mask_v"])
    if teacher:
        p["teacher_weight"] = rnd(out_f, in_f, scale=in_f ** -0.5)
        p["teacher_bias"] = rnd(out_f) if has_bias else None
    return p


def f64(t):
    return None if t is None else t.detach().to(torch.float64)


def reference_lowrank(p, alpha=None):
    """Output and (x, u, v, bias) gradients of the float64 reference, by autograd."""
    x, u, v = (f64(p[k]).requires_grad_() for k in ("x", "u", "v"))
    bias = f64(p["bias"])
    if bias is not None:
        bias.requires_grad_()
    if alpha is None:
        y = reference.masked_lowrank_linear(x, u, v, bias, p["mask_u"], p["mask_v"])
    else:
        y = reference.blended_lowrank_linear(
            x, u, v, bias, p["mask_u"], p["mask_v"], f64(p["teacher_weight"]),
            f64(p["teacher_bias"]), torch.tensor(alpha, dtype=torch.float64, device=DEVICE),
        )
    y.backward(f64(p["grad_y"]))
    grads = (x.grad, u.grad, v.grad, bias.grad if bias is not None else None)
    return y.detach(), grads


def assert_close(name, out, ref, dtype, seed):
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (seed {seed})"
    ref_norm = ref.norm().item()
    if ref_norm == 0.0:
        # All-pruned factors: zero is exact, not approximately zero.
        assert (out == 0).all(), f"{name}: expected exact zeros (seed {seed})"
        return
    err = (out.double() - ref).norm().item() / ref_norm
    bound = tolerance(dtype)
    assert err <= bound, f"{name}: rel error {err:.3g} > {bound} (seed {seed})"


def assert_pruned_grads_zero(grad_u, grad_v, p, seed):
    for name, grad, mask in (("grad_u", grad_u, p["mask_u"]), ("grad_v", grad_v, p["mask_v"])):
        if mask is not None:
            assert (grad[~mask] == 0).all(), f"{name}: pruned entries not exactly 0 (seed {seed})"


def check_backward(outs, p, ref_grads, dtype, seed, has_bias):
    grad_x, grad_u, grad_v, grad_b = outs
    for name, out, ref in zip(("grad_x", "grad_u", "grad_v"), outs[:3], ref_grads[:3]):
        assert_close(name, out, ref, dtype, seed)
    if has_bias:
        assert_close("grad_b", grad_b, ref_grads[3], dtype, seed)
    else:
        assert grad_b.shape == (0,)
    assert_pruned_grads_zero(grad_u, grad_v, p, seed)


# (tokens, in, out, rank, bias): one token, odd token counts not a multiple of any block,
# in/out not multiples of 16, ranks 1, 7, 64.
SHAPES = [
    (1, 24, 40, 7, True),
    (37, 33, 17, 1, False),
    (37, 24, 40, 64, True),
    (53, 33, 17, 7, True),
]
SHAPE_IDS = [f"N{n}-{i}to{o}-r{r}-{'bias' if b else 'nobias'}" for n, i, o, r, b in SHAPES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_case", MASK_CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_backward(shape, mask_case, dtype):
    skip_if_unavailable(dtype)
    seed = fresh_seed()
    n, i, o, r, has_bias = shape
    p = make_problem(n, i, o, r, dtype, mask_case, has_bias)
    ref_y, ref_grads = reference_lowrank(p)

    y = kernels.forward(p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"])
    assert_close("y", y, ref_y, dtype, seed)

    outs = kernels.backward(p["grad_y"], p["x"], p["u"], p["v"], p["mask_u"], p["mask_v"],
                            has_bias)
    check_backward(outs, p, ref_grads, dtype, seed, has_bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mask_case", ["none", "zeros", "keep50", "keep5"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3]],
                         ids=[SHAPE_IDS[0], SHAPE_IDS[2], SHAPE_IDS[3]])
def test_blended_forward_backward(shape, mask_case, alpha, dtype):
    skip_if_unavailable(dtype)
    seed = fresh_seed()
    n, i, o, r, has_bias = shape
    p = make_problem(n, i, o, r, dtype, mask_case, has_bias, teacher=True)
    ref_y, ref_grads = reference_lowrank(p, alpha=alpha)
    a = torch.tensor(alpha, dtype=torch.float32, device=DEVICE)

    y = kernels.blended_forward(p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"],
                                p["teacher_weight"], p["teacher_bias"], a)
    assert_close("y", y, ref_y, dtype, seed)

    outs = kernels.blended_backward(p["grad_y"], p["x"], p["u"], p["v"], p["mask_u"],
                                    p["mask_v"], p["teacher_weight"], a, has_bias)
    check_backward(outs, p, ref_grads, dtype, seed, has_bias)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("blended", [False, True], ids=["plain", "blended"])
def test_rank_384(blended, dtype):
    """The largest supported rank: T padded to 512 columns, held on chip."""
    skip_if_unavailable(dtype)
    seed = fresh_seed()
    p = make_problem(5, 24, 40, 384, dtype, "keep50", True, teacher=blended)
    alpha = 0.3 if blended else None
    ref_y, ref_grads = reference_lowrank(p, alpha=alpha)
    if blended:
        a = torch.tensor(alpha, device=DEVICE)
        y = kernels.blended_forward(p["x"], p["u"], p["v"], p["bias"], p["mask_u"],
                                    p["mask_v"], p["teacher_weight"], p["teacher_bias"], a)
        outs = kernels.blended_backward(p["grad_y"], p["x"], p["u"], p["v"], p["mask_u"],
                                        p["mask_v"], p["teacher_weight"], a, True)
    else:
        y = kernels.forward(p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"])
        outs = kernels.backward(p["grad_y"], p["x"], p["u"], p["v"], p["mask_u"], p["mask_v"],
                                True)
    assert_close("y", y, ref_y, dtype, seed)
    check_backward(outs, p, ref_grads, dtype, seed, True)


def _strided_copy(t, how):
    """The same values as ``t`` in a non-contiguous layout."""
    if how == "transposed":
        return t.T.contiguous().T
    # every other column of a twice-as-wide buffer
    wide = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    wide[:, ::2] = t
    return wide[:, ::2]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("how", ["transposed", "sliced"])
def test_non_contiguous_inputs(how, dtype):
    """Kernels read through strides: views give the same result as contiguous tensors."""
    skip_if_unavailable(dtype)
    seed = fresh_seed()
    p = make_problem(37, 33, 17, 7, dtype, "keep50", True, teacher=True)
    ref_y, ref_grads = reference_lowrank(p)
    ref_blend_y, ref_blend_grads = reference_lowrank(p, alpha=0.3)
    q = dict(p)
    for key in ("x", "u", "v", "grad_y", "teacher_weight", "mask_u", "mask_v"):
        q[key] = _strided_copy(p[key], how)
        assert not q[key].is_contiguous()
    for key in ("bias", "teacher_bias"):  # 1-D: every other element of a longer buffer
        q[key] = torch.stack([p[key], torch.zeros_like(p[key])], dim=1)[:, 0]
        assert q[key].stride(0) == 2
    a = torch.tensor(0.3, device=DEVICE)

    y = kernels.forward(q["x"], q["u"], q["v"], q["bias"], q["mask_u"], q["mask_v"])
    assert_close("y", y, ref_y, dtype, seed)
    outs = kernels.backward(q["grad_y"], q["x"], q["u"], q["v"], q["mask_u"], q["mask_v"], True)
    check_backward(outs, p, ref_grads, dtype, seed, True)

    y = kernels.blended_forward(q["x"], q["u"], q["v"], q["bias"], q["mask_u"], q["mask_v"],
                                q["teacher_weight"], q["teacher_bias"], a)
    assert_close("blended y", y, ref_blend_y, dtype, seed)
    outs = kernels.blended_backward(q["grad_y"], q["x"], q["u"], q["v"], q["mask_u"],
                                    q["mask_v"], q["teacher_weight"], a, True)
    check_backward(outs, p, ref_blend_grads, dtype, seed, True)


def test_alpha_is_read_from_the_tensor_each_call():
    """Same alpha tensor object, new value: the result follows (no cached .item())."""
    dtype = torch.float32
    skip_if_unavailable(dtype)
    seed = fresh_seed()
    p = make_problem(9, 24, 40, 7, dtype, "keep50", True, teacher=True)
    a = torch.tensor(0.0, device=DEVICE)
    args = (p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"],
            p["teacher_weight"], p["teacher_bias"])
    for alpha in (0.0, 0.6, 1.0):
        a.fill_(alpha)
        ref_y, _ = reference_lowrank(p, alpha=alpha)
        assert_close(f"y(alpha={alpha})", kernels.blended_forward(*args, a), ref_y, dtype, seed)


def test_unavailable_reason():
    assert kernels.unavailable_reason(DEVICE, torch.float64) is not None
    assert kernels.unavailable_reason(DEVICE, torch.int32) is not None
    assert kernels.unavailable_reason(torch.device("meta"), torch.float32) is not None
    if not CUDA:
        assert kernels.unavailable_reason("cpu", torch.float32) is None
        assert "bfloat16" in kernels.unavailable_reason("cpu", torch.bfloat16)
    else:
        assert kernels.unavailable_reason("cuda", torch.bfloat16) is None


@pytest.mark.parametrize("rank", [1, 7, 64, 128, 200, 256, 384])
def test_config_pruning_keeps_a_config_for_every_rank(rank):
    """The GPU config sets (checked here without a GPU): large ranks keep only thin tiles, and
    pruning never leaves the autotuner empty."""
    from tunecomp.kernels import blended_lowrank, masked_lowrank

    for gpu_configs in (masked_lowrank.FORWARD_GPU_CONFIGS,
                        blended_lowrank.BLENDED_FORWARD_GPU_CONFIGS):
        kept = masked_lowrank.prune_by_registers(gpu_configs, {"rank": rank})
        assert kept
        if rank > 256:
            assert all(c.kwargs["BLOCK_K"] == 16 for c in kept)


def test_backend_object_has_the_contract():
    backend = kernels.TritonBackend()
    assert backend.name == "triton"
    for fn in ("unavailable_reason", "forward", "backward", "blended_forward",
               "blended_backward"):
        assert callable(getattr(backend, fn))


# ------------------------------------------------------------------------------------------
# GPU only: real model shapes (the autotuned configs, not the single interpreter config).
# ------------------------------------------------------------------------------------------

GPU_SHAPES = [  # ViT-B/16 layers, tokens = batch x 197
    (197, 768, 2304, 32),
    (2 * 197, 768, 768, 384),
    (8 * 197, 768, 3072, 256),
    (8 * 197, 3072, 768, 128),
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", GPU_SHAPES,
                         ids=[f"N{n}-{i}to{o}-r{r}" for n, i, o, r in GPU_SHAPES])
def test_gpu_vit_shapes(shape, dtype):
    seed = fresh_seed()
    n, i, o, r = shape
    p = make_problem(n, i, o, r, dtype, "keep50", True, teacher=True)
    a = torch.tensor(0.3, device=DEVICE)
    ref_y, ref_grads = reference_lowrank(p)
    y = kernels.forward(p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"])
    assert_close("y", y, ref_y, dtype, seed)
    outs = kernels.backward(p["grad_y"], p["x"], p["u"], p["v"], p["mask_u"], p["mask_v"], True)
    check_backward(outs, p, ref_grads, dtype, seed, True)

    ref_y, ref_grads = reference_lowrank(p, alpha=0.3)
    y = kernels.blended_forward(p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"],
                                p["teacher_weight"], p["teacher_bias"], a)
    assert_close("blended y", y, ref_y, dtype, seed)
    outs = kernels.blended_backward(p["grad_y"], p["x"], p["u"], p["v"], p["mask_u"],
                                    p["mask_v"], p["teacher_weight"], a, True)
    check_backward(outs, p, ref_grads, dtype, seed, True)


@needs_cuda
def test_gpu_int64_offsets():
    """N * in > 2**31: element offsets overflow int32. Checks the last rows, which are the
    ones an int32 offset would send to the wrong address."""
    seed = fresh_seed()
    n, i, o, r = 2 ** 21 + 37, 1024, 24, 16
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * i * 2:
        pytest.skip("not enough GPU memory for a > 2**31-element x")
    p = make_problem(n, i, o, r, torch.float16, "keep50", True)
    y = kernels.forward(p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"])
    tail = {k: (p[k][-300:] if k in ("x", "grad_y") else p[k]) for k in p}
    ref_tail, ref_grads = reference_lowrank(tail)
    assert_close("y[-300:]", y[-300:], ref_tail, torch.float16, seed)
    grad_x = kernels.backward(p["grad_y"], p["x"], p["u"], p["v"], p["mask_u"], p["mask_v"],
                              True)[0]
    assert_close("grad_x[-300:]", grad_x[-300:], ref_grads[0], torch.float16, seed)
