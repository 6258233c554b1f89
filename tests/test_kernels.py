"""Every kernel backend against tunecomp.reference in float64: one battery, parametrised
over backends.

  torch          eager PyTorch ("auto"'s pick on CUDA): on the GPU, else the CPU
  triton         the Triton kernels: on the GPU, or on the CPU under Triton's interpreter
                 (slow: shapes stay small; bf16 skipped, the interpreter's tl.dot is wrong)
  cuda           the CUDA C++ kernels (csrc/lowrank_cuda.cu): GPU only
  cpu            the C++ CPU kernels (csrc/lowrank_cpu.cpp): float32 only
  cuda-emulator  the CUDA backend's kernel and host code compiled for the CPU
                 (tests/cuda_emulator): checks its logic where no GPU is at hand

A backend skips the dtypes and devices it does not support, with its own reason.
"""

import os

import torch

# Triton picks interpreter or compiler when kernels are decorated: decide before any import
# of triton (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tunecomp import ops, reference  # noqa: E402

from kernel_battery import (  # noqa: E402
    MASK_CASES, TOLERANCE, Backend, Expected, assert_close, assert_pruned_grads_zero, blend_route,
    check_backward, fresh_seed, make_backend, make_problem, needs_cuda, reference_lowrank,
    unwritten_memory_is_nan,
)

BACKENDS = ["torch", "triton", "cuda", "cpu", "cuda-emulator"]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request):
    return make_backend(request.param)


def run_plain(backend, p, has_bias=True):
    impl = backend.impl
    y = impl.forward(p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"])
    grads = impl.backward(p["grad_y"], p["x"], p["u"], p["v"], p["mask_u"], p["mask_v"], has_bias)
    return y, grads


def run_blended(backend, p, alpha, has_bias=True):
    impl = backend.impl
    a = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, device=backend.device)
    y = impl.blended_forward(p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"],
                             p["teacher_weight"], p["teacher_bias"], a)
    grads = impl.blended_backward(p["grad_y"], p["x"], p["u"], p["v"], p["mask_u"],
                                  p["mask_v"], p["teacher_weight"], a, has_bias)
    return y, grads


def check_against_reference(backend, p, dtype, seed, alpha=None, has_bias=True, run_on=None):
    """Forward and backward of the plain op (alpha None) or the blend on problem ``p`` (run on
    ``run_on``, default ``p`` itself), against the float64 reference of ``p``. Memory the
    backend allocates starts as NaN (``unwritten_memory_is_nan``): every element it returns
    must have been written."""
    ref_y, ref_grads = reference_lowrank(p, alpha=alpha)
    q = p if run_on is None else run_on
    with unwritten_memory_is_nan():
        y, grads = (run_plain(backend, q, has_bias) if alpha is None
                    else run_blended(backend, q, alpha, has_bias))
    bound = backend.tolerance(dtype)
    assert_close("y" if alpha is None else f"blended y (alpha={alpha})", y, ref_y, dtype, seed, bound)
    check_backward(grads, p, ref_grads, dtype, seed, has_bias, bound)


def check_blend_on_both_routes(backend, p, dtype, seed, alpha, run_on=None, has_bias=True):
    """The blend on each route, whichever the shape would pick: the two-branch kernels and the
    fold read the inputs with code of their own."""
    for route in ("two-branch", "folded"):
        with blend_route(route):
            try:
                check_against_reference(backend, p, dtype, seed, alpha, has_bias, run_on)
            except AssertionError as error:
                raise AssertionError(f"blend on the {route} route: {error}") from None


# (tokens, in, out, rank, bias): one token, odd token counts not a multiple of any block,
# in/out not multiples of 16, ranks 1, 7, 64; 301 tokens: the factor gradients split over
# tokens in the CUDA backend (the emulator reports few SMs) and the Triton one (the
# interpreter's stand-in SM count, see tests/test_triton_kernels.py).
SHAPES = [
    (1, 24, 40, 7, True),
    (37, 33, 17, 1, False),
    (37, 24, 40, 64, True),
    (53, 33, 17, 7, True),
    (301, 24, 70, 9, True),
]
SHAPE_IDS = [f"N{n}-{i}to{o}-r{r}-{'bias' if b else 'nobias'}" for n, i, o, r, b in SHAPES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_case", MASK_CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_backward(backend, shape, mask_case, dtype):
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    n, i, o, r, has_bias = shape
    p = make_problem(n, i, o, r, dtype, mask_case, backend.device, has_bias)
    check_against_reference(backend, p, dtype, seed, has_bias=has_bias)


# in, out and rank of 1 at once, and sizes below one 16-byte run
TINY_SHAPES = [(3, 1, 1, 1, True), (7, 5, 3, 2, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_case", ["none", "zeros", "keep50"])
@pytest.mark.parametrize("shape", TINY_SHAPES, ids=[f"N{n}-{i}to{o}-r{r}" for n, i, o, r, _ in TINY_SHAPES])
def test_tiny_sizes(backend, shape, mask_case, dtype):
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    n, i, o, r, has_bias = shape
    p = make_problem(n, i, o, r, dtype, mask_case, backend.device, has_bias, teacher=True)
    check_against_reference(backend, p, dtype, seed, has_bias=has_bias)
    check_blend_on_both_routes(backend, p, dtype, seed, 0.3, has_bias=has_bias)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_unwritten_memory_is_nan(device):
    """What the battery's NaN-filled allocations rest on, on each device; and that it leaves
    torch's settings as they were."""
    with unwritten_memory_is_nan():
        assert torch.empty(3, 5, device=device).isnan().all()
        assert torch.empty_like(torch.ones(4, device=device, dtype=torch.float16)).isnan().all()
        assert (torch.empty(4, dtype=torch.int32, device=device) == 2 ** 31 - 1).all()
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_battery_catches_an_unwritten_output():
    """A backend that returns its output unwritten where the answer is 0 (every factor entry
    pruned, no bias) fails the battery, whatever the fresh memory held."""
    torch_backend = make_backend("torch")

    class Unwritten:
        def forward(self, x, u, v, bias, mask_u, mask_v):
            return torch.empty(x.shape[0], u.shape[0], dtype=x.dtype, device=x.device)

        def backward(self, *args):
            return torch_backend.impl.backward(*args)

    p = make_problem(5, 24, 40, 7, torch.float32, "zeros", torch_backend.device, has_bias=False)
    backend = Backend("unwritten", Unwritten(), torch_backend.device)
    with pytest.raises(AssertionError, match="y: non-finite"):
        check_against_reference(backend, p, torch.float32, fresh_seed(), has_bias=False)


def test_the_battery_allows_for_cancellation_but_not_a_wrong_result():
    """grad_u of a rank-1 fp16 blend keeping 2 entries of U (the draw on which a correct
    kernel once failed CI): each entry is a sum over 37 tokens that cancels to ~1/40 of its
    terms, so rounding T to fp16, as the kernels and eager PyTorch do, moves it by twice the
    fp16 bound relative to itself. The battery accepts that, measuring against the terms, and
    still rejects a result that misses one token's term."""
    seed = 57173130366388733
    torch.manual_seed(seed)
    p = make_problem(37, 33, 17, 1, torch.float16, "keep5", torch.device("cpu"), False, teacher=True)
    _, (_, want, _, _) = reference_lowrank(p, alpha=0.3)
    s = reference.student_scale(float(torch.tensor(0.3)))  # the float32 alpha the ops get
    t = (p["x"].float() @ reference.apply_mask(p["v"], p["mask_v"]).float()).half()

    def grad_u(tokens):  # fp32 sums of the rounded T, rounded once: the kernels' contract
        got = s * p["grad_y"][tokens].double().T @ t[tokens].double()
        return reference.apply_mask(got, p["mask_u"]).half()

    bound = TOLERANCE[torch.float16]
    rounded = grad_u(slice(None))
    assert p["mask_u"].sum() == 2 and want.rounded_terms > 20 * want.value.norm()
    assert (rounded.double() - want.value).norm() > bound * want.value.norm()
    assert_close("grad_u", rounded, want, torch.float16, seed, bound)
    with pytest.raises(AssertionError, match="grad_u: error"):
        assert_close("grad_u", grad_u(slice(1, None)), want, torch.float16, seed, bound)


# Sizes in whole 16-byte runs and 32-wide K tiles: the CUDA backend's asynchronous tile and
# mask copies and its multi-stage ring carry the problem (8 K tiles of x·Vm, 10 of each factor
# gradient) instead of the synchronous path of the edges and odd strides, which most SHAPES
# take; 300 tokens run its fused forward (the emulator reports 4 SMs: from 256 tokens on).
ALIGNED_SHAPE = (300, 256, 64, 64, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_case", ["none", "keep50"])
def test_aligned_shape(backend, mask_case, dtype):
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    n, i, o, r, has_bias = ALIGNED_SHAPE
    p = make_problem(n, i, o, r, dtype, mask_case, backend.device, has_bias)
    check_against_reference(backend, p, dtype, seed, has_bias=has_bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mask_case", ["none", "zeros", "keep50", "keep5"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
def test_blended_forward_backward(backend, shape, mask_case, alpha, dtype):
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    n, i, o, r, has_bias = shape
    p = make_problem(n, i, o, r, dtype, mask_case, backend.device, has_bias, teacher=True)
    check_against_reference(backend, p, dtype, seed, alpha, has_bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_blend_with_one_bias(backend, which, dtype):
    """Only the student has a bias, or only the teacher: each bias keeps its own scale, on
    each route (this shape would take the folded one alone)."""
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    p = make_problem(*SHAPES[3][:4], dtype, "keep50", backend.device, True, teacher=True)
    p["teacher_bias" if which == "student" else "bias"] = None
    check_blend_on_both_routes(backend, p, dtype, seed, 0.3, has_bias=which == "student")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha_near_one", [0.9995, 0.9999])
def test_blend_with_alpha_near_one(backend, dtype, alpha_near_one):
    """alpha = 0.9995, which rounds to 1.0 in bf16: the student's weight sqrt(1 - alpha^2) is
    0.032, not 0 (computed before alpha is rounded to the inputs' dtype), so its factors still
    get their gradients. At 0.9999 sqrt(1 - alpha*alpha) in fp32 loses ~2.5e-5 of the scale
    to cancellation, which the bound sees; sqrt((1 - alpha)(1 + alpha)) does not."""
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    p = make_problem(*SHAPES[2][:4], dtype, "keep50", backend.device, True, teacher=True)
    check_blend_on_both_routes(backend, p, dtype, seed, alpha_near_one)


def test_blend_with_alpha_outside_its_range_is_nan(backend):
    """A tensor alpha's range is not checked (that would sync the device on every call): at
    1.5 the student's weight sqrt(1 - alpha^2) is NaN on every backend, on both routes, and so
    are the output and the input's gradient, rather than one backend clamping it to 0."""
    dtype = torch.float32
    backend.skip_unless_available(dtype)
    p = make_problem(*SHAPES[2][:4], dtype, "keep50", backend.device, True, teacher=True)
    for route in ("two-branch", "folded"):
        with blend_route(route):
            y, grads = run_blended(backend, p, torch.tensor(1.5, device=backend.device))
        assert torch.isnan(y).all() and torch.isnan(grads[0]).all(), route


@pytest.mark.parametrize("dtype", DTYPES)
def test_blended_many_tokens(backend, dtype):
    """301 tokens: the blended factor gradients through the CUDA backend's split-K path."""
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    p = make_problem(*SHAPES[4][:4], dtype, "keep50", backend.device, True, teacher=True)
    check_against_reference(backend, p, dtype, seed, 0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blended", [False, True], ids=["plain", "blended"])
def test_rank_384(backend, blended, dtype):
    """The largest rank the design names (Triton pads T to 512 columns, held on chip)."""
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    p = make_problem(5, 24, 40, 384, dtype, "keep50", backend.device, True, teacher=blended)
    check_against_reference(backend, p, dtype, seed, 0.3 if blended else None)


def _strided_copy(t, how):
    """The same values as ``t`` in a non-contiguous layout: ``transposed`` (column-major),
    ``sliced`` (every other column), ``padded`` (unit stride, rows 8 elements longer),
    ``offset`` (the same, started one element into the buffer: rows a whole number of 16-byte
    runs apart where ``t``'s are, the start never 16-byte aligned)."""
    rows, cols = t.shape
    if how == "transposed":
        return t.T.contiguous().T
    width, start, step = {"sliced": (2 * cols, 0, 2), "offset": (cols + 8, 1, 1),
                          "padded": (cols + 8, 0, 1)}[how]
    wide = torch.empty(rows, width, dtype=t.dtype, device=t.device)
    view = wide[:, start:start + step * cols:step]
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["transposed", "sliced"])
def test_non_contiguous_inputs(backend, how, dtype):
    """Views give the same result as contiguous tensors (read through strides or copied)."""
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    p = make_problem(37, 33, 17, 7, dtype, "keep50", backend.device, True, teacher=True)
    q = dict(p)
    for key in ("x", "u", "v", "grad_y", "teacher_weight", "mask_u", "mask_v"):
        q[key] = _strided_copy(p[key], how)
        assert not q[key].is_contiguous()
    for key, step in (("bias", 2), ("teacher_bias", 3)):  # 1-D: every step-th element of a
        # longer buffer, the steps unlike (a kernel reading one bias with the other's stride)
        q[key] = torch.stack([p[key]] + [torch.zeros_like(p[key])] * (step - 1), dim=1)[:, 0]
        assert q[key].stride(0) == step
    check_against_reference(backend, p, dtype, seed, run_on=q)
    check_blend_on_both_routes(backend, p, dtype, seed, 0.3, run_on=q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["transposed", "sliced", "offset", "padded"])
@pytest.mark.parametrize("strided", ["masks", "factors"])
def test_factors_and_masks_in_different_layouts(backend, strided, how, dtype):
    """Contiguous factors with strided masks, and the reverse, at rank 64 and in/out multiples
    of 8, where contiguous rows are whole 16-byte runs: a kernel that takes the data's layout
    (one vector load, its direction) for the mask's, or the reverse, gets these wrong; one
    that loads vectors from an ``offset`` start (not 16-byte aligned) faults on the GPU and
    in the CUDA emulator, which checks the alignment of every asynchronous copy."""
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    p = make_problem(37, 40, 24, 64, dtype, "keep50", backend.device, True, teacher=True)
    q = dict(p)
    for key in ("mask_u", "mask_v") if strided == "masks" else ("u", "v"):
        q[key] = _strided_copy(p[key], how)
        assert not q[key].is_contiguous()
    check_against_reference(backend, p, dtype, seed, run_on=q)
    check_blend_on_both_routes(backend, p, dtype, seed, 0.3, run_on=q)


def test_alpha_is_read_from_the_tensor_each_call(backend):
    """Same alpha tensor object, new value: the result and the gradients follow (no cached
    .item())."""
    dtype = torch.float32
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    p = make_problem(9, 24, 40, 7, dtype, "keep50", backend.device, True, teacher=True)
    a = torch.tensor(0.0, device=backend.device)
    for alpha in (0.0, 0.6, 1.0):
        a.fill_(alpha)
        ref_y, ref_grads = reference_lowrank(p, alpha=alpha)
        with unwritten_memory_is_nan():
            y, grads = run_blended(backend, p, a)
        assert_close(f"y(alpha={alpha})", y, ref_y, dtype, seed, backend.tolerance(dtype))
        check_backward(grads, p, ref_grads, dtype, seed, True, backend.tolerance(dtype))


def test_backend_object_has_the_contract(backend):
    assert backend.impl.name == backend.name.replace("-emulator", "")
    for fn in ("unavailable_reason", "forward", "backward", "blended_forward",
               "blended_backward"):
        assert callable(getattr(backend.impl, fn))
    if backend.name == "torch":  # the reference math: every device and floating dtype
        assert backend.impl.unavailable_reason(backend.device, torch.float64) is None
        return
    assert backend.impl.unavailable_reason(backend.device, torch.float64) is not None
    assert backend.impl.unavailable_reason(torch.device("meta"), torch.float32) is not None


@pytest.mark.parametrize("mask_case", ["keep50", "keep5"])
def test_bool_masks_holding_other_bytes_than_0_and_1(backend, mask_case):
    """A bool mask made from bytes (a uint8 buffer viewed as bool) may hold 2 or 255 for True:
    every backend keeps every entry whose byte is nonzero, as torch counts them, in the plain
    op and the blend on both routes (reading such a byte as a C++ bool is undefined: the cpu
    kernels added raw bytes, the CUDA ones tested bools)."""
    dtype = torch.float32
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    p = make_problem(37, 24, 40, 9, dtype, mask_case, backend.device, True, teacher=True)
    q = dict(p)
    for name in ("mask_u", "mask_v"):
        byte = torch.randint(1, 256, p[name].shape, dtype=torch.uint8).to(backend.device)
        q[name] = (p[name].to(torch.uint8) * byte).view(torch.bool)
    check_against_reference(backend, p, dtype, seed, run_on=q)
    check_blend_on_both_routes(backend, p, dtype, seed, 0.3, run_on=q)


@pytest.fixture(params=["torch", "cpu", "triton", "cuda", "cuda-emulator"], scope="module")
def folding_backend(request):
    return make_backend(request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_case", ["none", "zeros", "keep50", "keep5"])
@pytest.mark.parametrize("shape", [(29, 24, 40, 9), (1, 33, 17, 37)], ids=["N29-r9", "N1-r37"])
@pytest.mark.parametrize("route", ["folded", "two-branch"])
def test_blend_folded_into_the_teacher_weight(folding_backend, route, shape, mask_case, dtype,
                                              monkeypatch):
    """The blend's two routes (ops.folding_pays), each forced on the same problems: the student
    folded into the teacher's weight, and the teacher and student as two branches. Both
    against the float64 reference, NaN in pruned entries; the folded route must be taken."""
    backend = folding_backend
    backend.skip_unless_available(dtype)
    folded = route == "folded"
    folds = []
    if backend.name in ("torch", "cpu"):
        fold = ops._folded_weight
        monkeypatch.setattr(ops, "_folded_weight", lambda *a: folds.append(1) or fold(*a))
    elif backend.name == "triton":
        from tunecomp.kernels import blended_lowrank
        fold = blended_lowrank.fold
        monkeypatch.setattr(blended_lowrank, "fold", lambda *a, **k: folds.append(1) or fold(*a, **k))
    else:  # the C++ folds inside the call: count the calls whose last argument says so
        def counting(call):
            def counted(*args):
                folds.extend([1] if args[-1] else [])
                return call(*args)
            return counted

        for name in ("blended_forward_cuda", "blended_backward_cuda"):
            monkeypatch.setattr(backend.impl.native, name,
                                counting(getattr(backend.impl.native, name)))
    seed = fresh_seed()
    p = make_problem(*shape, dtype, mask_case, backend.device, True, teacher=True)
    with blend_route(route):
        check_against_reference(backend, p, dtype, seed, 0.3)
    # the "cpu" backend folds only where its student runs dense (SPARSE_BELOW: not at 0 or 5%
    # kept)
    sparse = backend.name == "cpu" and mask_case in ("zeros", "keep5")
    expect_folds = 2 if folded and not sparse else 0
    assert len(folds) == expect_folds


def test_folding_pays_from_the_documented_token_counts():
    assert not ops.folding_pays(384, 768, 768) and ops.folding_pays(385, 768, 768)
    assert not ops.folding_pays(197, 768, 3072) and ops.folding_pays(8 * 197, 768, 3072)
    assert not ops.folding_pays_backward(768, 768) and ops.folding_pays_backward(769, 768)


# ------------------------------------------------------------------------------------------
# GPU only: real model shapes, outputs poisoned with NaN (check_against_reference), > 2**31-
# element inputs.
# ------------------------------------------------------------------------------------------

GPU_SHAPES = [  # ViT-B/16 layers, tokens = batch x 197
    (197, 768, 2304, 32),
    (2 * 197, 768, 768, 384),
    (8 * 197, 768, 3072, 256),
    (8 * 197, 3072, 768, 128),
]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"N{n}-{i}to{o}-r{r}" for n, i, o, r in GPU_SHAPES])
def test_gpu_vit_shapes(backend, shape, dtype):
    if backend.device.type != "cuda":
        pytest.skip(f"{backend.name} does not run on the GPU")
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    n, i, o, r = shape
    p = make_problem(n, i, o, r, dtype, "keep50", backend.device, True, teacher=True)
    check_against_reference(backend, p, dtype, seed)
    check_blend_on_both_routes(backend, p, dtype, seed, 0.3)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [64, 130, 384])
def test_gpu_tokens_filling_every_sm(backend, rank, dtype):
    """64 x (SM count) tokens and more: the cuda backend's fused forward (T held in shared
    memory, over 48 KB of it at the larger ranks), plain and blended, outputs poisoned."""
    if backend.device.type != "cuda":
        pytest.skip(f"{backend.name} does not run on the GPU")
    backend.skip_unless_available(dtype)
    seed = fresh_seed()
    n = 64 * torch.cuda.get_device_properties(0).multi_processor_count + 37
    p = make_problem(n, 96, 80, rank, dtype, "keep50", backend.device, True, teacher=True)
    check_against_reference(backend, p, dtype, seed)
    check_blend_on_both_routes(backend, p, dtype, seed, 0.3)


@needs_cuda
def test_gpu_int64_offsets(backend):
    """N * in > 2**31: element offsets overflow int32. Checks the last rows of y and grad_x,
    the ones an int32 offset would send to the wrong address, and the factor gradients, which
    read every row; for the plain op and for the blend's two-branch kernels."""
    if backend.device.type != "cuda":
        pytest.skip(f"{backend.name} does not run on the GPU")
    backend.skip_unless_available(torch.float16)
    seed = fresh_seed()
    n, i, o, r = 2 ** 21 + 37, 1024, 24, 16
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * n * i * 2:
        pytest.skip("not enough GPU memory for a > 2**31-element x")
    p = make_problem(n, i, o, r, torch.float16, "keep50", backend.device, True, teacher=True)
    tail = {k: (p[k][-300:] if k in ("x", "grad_y") else p[k]) for k in p}
    bound = backend.tolerance(torch.float16)
    for alpha in (None, 0.3):
        with blend_route("two-branch"):
            y, (grad_x, grad_u, grad_v, _) = (run_plain(backend, p) if alpha is None
                                              else run_blended(backend, p, alpha))
        ref_tail, ref_grads = reference_lowrank(tail, alpha=alpha)
        assert_close(f"y[-300:] (alpha={alpha})", y[-300:], ref_tail, torch.float16, seed, bound)
        assert_close(f"grad_x[-300:] (alpha={alpha})", grad_x[-300:], ref_grads[0],
                     torch.float16, seed, bound)
        del y, grad_x
        student = 1.0 if alpha is None else reference.student_scale(alpha)
        for name, got, want in zip(("grad_u", "grad_v"), (grad_u, grad_v),
                                   _factor_grads_float64(p, student)):
            assert_close(f"{name} (alpha={alpha})", got, Expected(want), torch.float16, seed, bound)
        assert_pruned_grads_zero(grad_u, grad_v, p, seed)


def _factor_grads_float64(p, scale, chunk=2 ** 18):
    """grad_u = scale·grad_yᵀ·(x·Vm) ⊙ Mu and grad_v = scale·xᵀ·(grad_y·Um) ⊙ Mv in float64,
    summed over chunks of tokens (all of x in float64 would take 17 GB)."""
    um = torch.where(p["mask_u"], p["u"], 0).double()
    vm = torch.where(p["mask_v"], p["v"], 0).double()
    grad_u, grad_v = torch.zeros_like(um), torch.zeros_like(vm)
    for start in range(0, p["x"].shape[0], chunk):
        x = p["x"][start:start + chunk].double()
        g = p["grad_y"][start:start + chunk].double()
        grad_u += g.T @ (x @ vm)
        grad_v += x.T @ (g @ um)
    return grad_u * p["mask_u"] * scale, grad_v * p["mask_v"] * scale
