"""tunecomp.ops: dispatch, custom-op registration, autograd and input checks."""

import pytest
import torch

from conftest import random_mask, rel_error
from kernel_battery import Expected, assert_close, force_blend_route, rounded_terms
from tunecomp import ops, reference

CPU_BACKENDS = ["torch", "cpu", "auto"]


def _triton_ready():
    return ops.available_backends("cpu", torch.float32)["triton"] is None


needs_triton = pytest.mark.skipif(not _triton_ready(),
                                  reason="triton backend unavailable on CPU (needs TRITON_INTERPRET=1)")
# the Triton kernels too, under the interpreter (small shapes)
WITH_TRITON = CPU_BACKENDS + [pytest.param("triton", marks=needs_triton)]


def make_inputs(n=7, k=13, m=5, r=3, dtype=torch.float64, keep=0.5, lead=(), grad=False):
    opts = {"dtype": dtype, "requires_grad": grad}
    return dict(
        x=torch.randn(*lead, n, k, **opts),
        u=torch.randn(m, r, **opts),
        v=torch.randn(k, r, **opts),
        bias=torch.randn(m, **opts),
        mask_u=random_mask((m, r), keep),
        mask_v=random_mask((k, r), keep),
    )


def make_teacher(a, dtype=torch.float64):
    m, k = a["u"].shape[0], a["v"].shape[0]
    return dict(teacher_weight=torch.randn(m, k, dtype=dtype), teacher_bias=torch.randn(m, dtype=dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_masked_op_matches_reference(backend, lead, keep):
    a = make_inputs(dtype=torch.float32, keep=keep, lead=lead)
    y = ops.masked_lowrank_linear(**a, backend=backend)
    expected = reference.masked_lowrank_linear(**{k: (t.double() if t.is_floating_point() else t) for k, t in a.items()})
    assert y.shape == (*lead, 7, 5) and y.dtype == torch.float32
    assert rel_error(y, expected) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, torch.tensor(0.6)])
def test_blended_op_matches_reference(backend, alpha):
    a = make_inputs(dtype=torch.float32, lead=(2,))
    t = make_teacher(a, torch.float32)
    y = ops.blended_lowrank_linear(**a, **t, alpha=alpha, backend=backend)
    dbl = {k: (v.double() if v.is_floating_point() else v) for k, v in {**a, **t}.items()}
    expected = reference.blended_lowrank_linear(**dbl, alpha=float(alpha))
    assert rel_error(y, expected) < 1e-5


@pytest.mark.parametrize("route", ["eager", "custom_op"])
def test_gradcheck(route):
    """Numerical gradients of both autograd routes: the public ops in eager mode (an
    autograd.Function) and the custom ops that torch.compile sees, called directly."""
    a = make_inputs(n=4, k=5, m=3, r=2, grad=True)
    t = make_teacher(a)
    names = ("x", "u", "v", "bias")
    masks = (a["mask_u"], a["mask_v"])
    teacher = (t["teacher_weight"], t["teacher_bias"])

    if route == "eager":
        def masked(x, u, v, bias):
            return ops.masked_lowrank_linear(x, u, v, bias, *masks, backend="torch")

        def blended(x, u, v, bias):
            return ops.blended_lowrank_linear(x, u, v, bias, *masks, *teacher, alpha=0.4, backend="torch")
    else:
        def masked(x, u, v, bias):
            return torch.ops.tunecomp.masked_lowrank_linear(x, u, v, bias, *masks, "torch")

        def blended(x, u, v, bias):
            alpha = torch.tensor(0.4, dtype=torch.float32)
            return torch.ops.tunecomp.blended_lowrank_linear(x, u, v, bias, *masks, *teacher, alpha, "torch")

    inputs = tuple(a[n] for n in names)
    assert torch.autograd.gradcheck(masked, inputs)
    assert torch.autograd.gradcheck(blended, inputs)


@pytest.mark.parametrize("route", ["eager", "custom_op"])
def test_double_backward_is_refused(route):
    """No backend's backward is differentiable; both routes say so instead of returning a
    silently wrong second derivative."""
    a = make_inputs(n=4, k=6, m=5, r=2, grad=True)
    if route == "eager":
        y = ops.masked_lowrank_linear(a["x"], a["u"], a["v"], backend="torch")
    else:
        y = torch.ops.tunecomp.masked_lowrank_linear(a["x"], a["u"], a["v"], None, None, None, "torch")
    (grad_x,) = torch.autograd.grad(y.pow(2).sum(), a["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|no autograd formula"):
        grad_x.sum().backward()


@pytest.mark.parametrize("blend", [False, True])
def test_gradients_match_reference_autograd(blend):
    a = make_inputs(n=9, k=12, m=10, r=4, dtype=torch.float32, lead=(3,), grad=True)
    t = make_teacher(a, torch.float32)
    grad_y = torch.randn(3, 9, 10)

    def run(fn, inputs):
        args = {k: (v.detach().clone().requires_grad_() if v.requires_grad else v) for k, v in inputs.items()}
        y = fn(**args, **t, alpha=0.7) if blend else fn(**args)
        y.backward(grad_y)
        return {k: args[k].grad for k in ("x", "u", "v", "bias")}

    if blend:
        got = run(lambda **kw: ops.blended_lowrank_linear(**kw, backend="torch"), a)
        want = run(reference.blended_lowrank_linear, a)
    else:
        got = run(lambda **kw: ops.masked_lowrank_linear(**kw, backend="torch"), a)
        want = run(reference.masked_lowrank_linear, a)
    for name in got:
        assert rel_error(got[name], want[name]) < 1e-5, name
    assert torch.all(got["u"][~a["mask_u"]] == 0) and torch.all(got["v"][~a["mask_v"]] == 0)


@pytest.mark.parametrize("blend", [False, True])
def test_opcheck(blend):
    """torch.library's own consistency checks: schema, fake tensors, autograd registration,
    AOT dispatch (what torch.compile relies on)."""
    a = make_inputs(n=6, k=8, m=5, r=3, dtype=torch.float32, grad=True)
    if blend:
        t = make_teacher(a, torch.float32)
        args = (a["x"], a["u"], a["v"], a["bias"], a["mask_u"], a["mask_v"],
                t["teacher_weight"], t["teacher_bias"], torch.tensor(0.5), "torch")
        torch.library.opcheck(torch.ops.tunecomp.blended_lowrank_linear.default, args)
    else:
        args = (a["x"], a["u"], a["v"], a["bias"], a["mask_u"], a["mask_v"], "torch")
        torch.library.opcheck(torch.ops.tunecomp.masked_lowrank_linear.default, args)
        args = (a["x"], a["u"], a["v"], None, None, None, "torch")
        torch.library.opcheck(torch.ops.tunecomp.masked_lowrank_linear.default, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("student_grad", [False, True])
def test_teacher_gets_no_gradient(backend, student_grad):
    """The teacher is a constant even where it requires grad, whether or not the student
    does (with only the teacher requiring grad the call still goes through autograd)."""
    a = make_inputs(dtype=torch.float32, grad=student_grad)
    t = {k: v.requires_grad_() for k, v in make_teacher(a, torch.float32).items()}
    y = ops.blended_lowrank_linear(**a, **t, alpha=0.5, backend=backend)
    y.sum().backward()
    assert t["teacher_weight"].grad is None and t["teacher_bias"].grad is None


@pytest.mark.parametrize("backend", WITH_TRITON)
@pytest.mark.parametrize("blend", [False, True])
def test_a_trainable_bias_alone_gets_its_gradient(backend, blend):
    """Frozen factors and input, a bias that trains: the call still goes through autograd."""
    a = make_inputs(dtype=torch.float32)
    a["bias"].requires_grad_()
    if blend:
        y = ops.blended_lowrank_linear(**a, **make_teacher(a, torch.float32), alpha=torch.tensor(0.6),
                                       backend=backend)
    else:
        y = ops.masked_lowrank_linear(**a, backend=backend)
    assert y.requires_grad
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    scale = reference.student_scale(0.6) if blend else 1.0
    assert rel_error(a["bias"].grad, grad_y.sum(0) * scale) < 1e-5  # fp32 sums, other orders


@pytest.mark.parametrize("blend", [False, True])
def test_zero_tokens(blend):
    a = make_inputs(n=0, dtype=torch.float32, lead=(2,), grad=True)
    if blend:
        y = ops.blended_lowrank_linear(**a, **make_teacher(a, torch.float32), alpha=0.5)
    else:
        y = ops.masked_lowrank_linear(**a)
    assert y.shape == (2, 0, 5)
    y.sum().backward()
    assert a["x"].grad.shape == (2, 0, 13)
    for name in ("u", "v", "bias"):  # a sum over no tokens: zero gradient, not empty
        assert a[name].grad.shape == a[name].shape and torch.count_nonzero(a[name].grad) == 0


@pytest.mark.parametrize("blend", [False, True])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_each_mode_takes_its_route(monkeypatch, blend, backend):
    """With nothing for autograd to record the backend runs directly; with a gradient to
    record, eagerly, the autograd.Function; under torch.compile the custom op, as one node of
    the graph. Each route gives the reference's values, a NaN in a pruned entry does not
    leak, and zero tokens give an empty output."""
    if ops.available_backends("cpu", torch.float32)[backend] is not None:
        pytest.skip(f"backend {backend!r} unavailable")
    a = make_inputs(dtype=torch.float32, lead=(2,))
    a["u"][~a["mask_u"]] = float("nan")
    t = make_teacher(a, torch.float32) if blend else {}
    dbl = {k: (v.double() if v.is_floating_point() else v) for k, v in {**a, **t}.items()}
    if blend:
        want = reference.blended_lowrank_linear(**dbl, alpha=0.5)
        fn = lambda **kw: ops.blended_lowrank_linear(**kw, **t, alpha=0.5, backend=backend)  # noqa: E731
        function, op = ops._BlendedLowRankFunction, "blended_lowrank_linear"
    else:
        want = reference.masked_lowrank_linear(**dbl)
        fn = lambda **kw: ops.masked_lowrank_linear(**kw, backend=backend)  # noqa: E731
        function, op = ops._MaskedLowRankFunction, "masked_lowrank_linear"
    applied = []
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: applied.append(1) or apply(*args))

    for context in (torch.no_grad(), torch.inference_mode()):
        with context:
            y = fn(**a)
        assert not y.isnan().any() and rel_error(y, want) < 1e-5
    assert fn(**{**a, "x": torch.randn(2, 0, 13)}).shape == (2, 0, 5)
    assert applied == []

    y = fn(**{**a, "u": a["u"].clone().requires_grad_()})
    assert applied == [1] and y.requires_grad and rel_error(y, want) < 1e-5

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    y = torch.compile(lambda x: fn(**{**a, "x": x}), backend=record, fullgraph=True)(a["x"])
    assert applied == [1] and rel_error(y, want) < 1e-5
    targets = [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert getattr(torch.ops.tunecomp, op).default in targets


@pytest.mark.parametrize("op", ["masked", "two-branch", "folded"])
@pytest.mark.parametrize("backend,keep", [("torch", 0.5), ("cpu", 0.5), ("cpu", 0.05)])
def test_eager_route_keeps_t_for_the_backward(monkeypatch, op, backend, keep):
    """ops "Saved T": where the backend's forward makes T = x·Vm (torch; cpu on either path;
    the blend where it does not fold), the eager route saves it and the backward uses it (a T
    zeroed between the passes zeroes grad_u); elsewhere nothing [N, r] is saved. The
    gradients equal the custom-op route's, which always recomputes T, and the reference's."""
    if ops.available_backends("cpu", torch.float32)[backend] is not None:
        pytest.skip(f"backend {backend!r} unavailable")
    if op != "masked":
        force_blend_route(monkeypatch, op)
    a = make_inputs(n=7, k=13, m=5, r=3, dtype=torch.float32, keep=keep)
    teacher = make_teacher(a, torch.float32) if op != "masked" else {}
    grad_y = torch.randn(7, 5)
    # "cpu" folds only where its student runs dense
    # (by the fraction the masks drawn keep: at keep 0.5, 1 draw in 10,000 keeps under 25%)
    kept = ops._CpuBackend._kept(a["u"], a["v"], a["mask_u"], a["mask_v"])
    folds = op == "folded" and (backend == "torch" or kept >= ops._CpuBackend.SPARSE_BELOW)
    t_kept = not folds
    t_want = a["x"] @ reference.apply_mask(a["v"], a["mask_v"])

    def grads(route, zero_t=False):
        leaves = {k: a[k].clone().requires_grad_() for k in ("x", "u", "v", "bias")}
        masks = (a["mask_u"], a["mask_v"])
        saved = []

        def unpack(t):  # the saved [N, r] tensor, zeroed if asked
            return torch.zeros_like(t) if zero_t and t.shape == t_want.shape else t

        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, unpack):
            if route == "eager" and op == "masked":
                y = ops.masked_lowrank_linear(*leaves.values(), *masks, backend=backend)
            elif route == "eager":
                y = ops.blended_lowrank_linear(*leaves.values(), *masks, **teacher, alpha=0.6, backend=backend)
            elif op == "masked":
                y = torch.ops.tunecomp.masked_lowrank_linear(*leaves.values(), *masks, backend)
            else:
                y = torch.ops.tunecomp.blended_lowrank_linear(*leaves.values(), *masks, *teacher.values(),
                                                              torch.tensor(0.6), backend)
            y.backward(grad_y)
        return [t for t in saved if t.shape == t_want.shape], {k: t.grad for k, t in leaves.items()}

    saved_t, eager = grads("eager")
    assert len(saved_t) == int(t_kept)
    if t_kept:
        assert rel_error(saved_t[0], t_want.double()) < 1e-5
        assert not grads("eager", zero_t=True)[1]["u"].any()
    saved_t, custom = grads("custom_op")
    assert saved_t == []
    dbl = {k: (v.double() if v.is_floating_point() else v) for k, v in {**a, **teacher}.items()}
    with torch.enable_grad():
        leaves = {k: dbl[k].clone().requires_grad_() for k in ("x", "u", "v", "bias")}
        if op == "masked":
            y = reference.masked_lowrank_linear(**{**dbl, **leaves})
        else:
            y = reference.blended_lowrank_linear(**{**dbl, **leaves}, alpha=0.6)
        y.backward(grad_y.double())
    # against the size of the terms rounded on the way too: at 5% kept a gradient entry can
    # be a short sum that cancels (kernel_battery, "rounded_terms")
    sizes = rounded_terms({**a, **teacher, "grad_y": grad_y}, None if op == "masked" else 0.6)[1:]
    for (name, leaf), size in zip(leaves.items(), sizes):
        assert_close(name, eager[name], Expected(custom[name].double(), size), torch.float32, None, 1e-6)
        assert_close(name, eager[name], Expected(leaf.grad, size), torch.float32, None, 1e-5)


def test_one_dim_and_non_contiguous_x():
    a = make_inputs(dtype=torch.float32)
    x_1d = torch.randn(13)
    y = ops.masked_lowrank_linear(x_1d, a["u"], a["v"], a["bias"])
    assert y.shape == (5,)
    assert rel_error(y, reference.masked_lowrank_linear(x_1d.double(), a["u"].double(), a["v"].double(), a["bias"].double())) < 1e-5
    x_t = torch.randn(13, 7).T  # [7, 13], not contiguous
    assert not x_t.is_contiguous()
    y = ops.masked_lowrank_linear(x_t, a["u"], a["v"], a["bias"], a["mask_u"], a["mask_v"])
    want = reference.masked_lowrank_linear(x_t.double(), a["u"].double(), a["v"].double(), a["bias"].double(), a["mask_u"], a["mask_v"])
    assert rel_error(y, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_backend_masking_is_the_reference_bit_for_bit(dtype, keep):
    """ops.apply_mask (an integer multiply of the bits) gives reference.apply_mask's (where's)
    tensor exactly: kept entries unchanged, NaN and inf included, pruned ones +0.0 whatever
    they held; on a transposed view too. Where autograd records, the result is differentiable
    and its gradient is the mask."""
    weight = torch.randn(37, 11, dtype=dtype)
    weight.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-30])
    mask = random_mask(weight.shape, keep)
    mask.view(-1)[:6] = torch.tensor([True, False, True, False, True, False]) if keep == 0.5 else keep == 1.0
    for w, m in ((weight, mask), (weight.T, mask.T)):
        got, want = ops.apply_mask(w, m), reference.apply_mask(w, m)
        assert got.dtype == dtype and got.shape == w.shape
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
        assert torch.equal(got.contiguous().view(bits), want.contiguous().view(bits))
    assert ops.apply_mask(weight, None) is weight
    leaf = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    mask = random_mask(leaf.shape, 0.5)
    ops.apply_mask(leaf, mask).sum().backward()
    assert torch.equal(leaf.grad, mask.to(dtype))


def test_autocast_casts_inputs():
    a = make_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.masked_lowrank_linear(**a, backend="torch")
    assert y.dtype == torch.bfloat16
    want = reference.masked_lowrank_linear(**{k: (t.double() if t.is_floating_point() else t) for k, t in a.items()})
    assert rel_error(y, want) < 2e-2  # bf16 operands: 8-bit mantissa
    # the blend: the teacher's weight and bias are cast too (training's default amp on CUDA)
    t = make_teacher(a, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.blended_lowrank_linear(**a, **t, alpha=torch.tensor(0.6), backend="torch")
    assert y.dtype == torch.bfloat16
    dbl = {k: (v.double() if v.is_floating_point() else v) for k, v in {**a, **t}.items()}
    assert rel_error(y, reference.blended_lowrank_linear(**dbl, alpha=0.6)) < 2e-2
    a = make_inputs(dtype=torch.float64)  # left alone, as torch's autocast leaves F.linear's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.masked_lowrank_linear(**a, backend="torch")
        assert torch.nn.functional.linear(a["x"], a["u"] @ a["v"].T).dtype == torch.float64
    assert y.dtype == torch.float64 and rel_error(y, reference.masked_lowrank_linear(**a)) < 1e-14


@pytest.mark.parametrize("backend", WITH_TRITON)
@pytest.mark.parametrize("which", ["mask_u", "mask_v"])
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.05])
def test_one_mask_given(backend, which, keep):
    """A mask left out keeps its factor whole; the one given still prunes, exactly (values,
    gradients, a NaN in a pruned entry), on every path: in 96 -> 8 at rank 4 a v kept at 5%
    is 12% of all entries, which the cpu backend runs sparse."""
    a = make_inputs(n=9, k=96, m=8, r=4, dtype=torch.float32, keep=keep, grad=True)
    a["mask_u" if which == "mask_v" else "mask_v"] = None
    mask = a[which]
    factor = a["u" if which == "mask_u" else "v"]
    with torch.no_grad():
        factor[~mask] = float("nan")
    y = ops.masked_lowrank_linear(**a, backend=backend)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    dbl = {k: (t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
           for k, t in a.items()}
    want = reference.masked_lowrank_linear(**dbl)
    want.backward(grad_y.double())
    assert rel_error(y, want) < 1e-5
    # a few kept entries of u: a gradient entry can be a 9-token sum that cancels, judged
    # against the size of its rounded terms too (kernel_battery, "rounded_terms")
    sizes = rounded_terms({**a, "grad_y": grad_y})[1:]
    for name, size in zip(("x", "u", "v", "bias"), sizes):
        assert_close(name, a[name].grad, Expected(dbl[name].grad, size), torch.float32, None, 1e-5)
    assert torch.all(factor.grad[~mask] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("keep", [0.7, 0.08])  # the cpu backend's dense and sparse paths
@pytest.mark.parametrize("cached", [True, False], ids=["both-masks", "mask-v-only"])
def test_bool_masks_holding_other_bytes_than_0_and_1(backend, keep, cached):
    """A bool tensor made from bytes (a uint8 buffer viewed as bool) may hold 2 or 255 for
    True: every nonzero byte is kept, as torch itself counts them. The cpu kernels added the
    raw bytes, so the packed groups held uninitialised indices (a crash, or an error about
    the packing) and the dense path cleared mantissa bits."""
    a = make_inputs(n=9, k=64, m=40, r=8, dtype=torch.float32, keep=keep, grad=True)
    for name in ("mask_u", "mask_v"):
        byte = torch.randint(1, 256, a[name].shape, dtype=torch.uint8)
        a[name] = (a[name].to(torch.uint8) * byte).view(torch.bool)  # nonzero bytes = kept
    if not cached:
        a["mask_u"] = None
    y = ops.masked_lowrank_linear(**a, backend=backend)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    dbl = {k: (t.detach().double().requires_grad_() if t.is_floating_point() else t != 0)
           for k, t in a.items() if t is not None}
    want = reference.masked_lowrank_linear(**dbl)
    want.backward(grad_y.double())
    assert rel_error(y, want) < 1e-5
    sizes = rounded_terms({"mask_u": None, **dbl, "grad_y": grad_y})[1:]  # as in test_one_mask_given
    for name, size in zip(("x", "u", "v", "bias"), sizes):
        assert_close(name, a[name].grad, Expected(dbl[name].grad, size), torch.float32, None, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_features(backend):
    """in_features = out_features = 0: an empty result, not a ZeroDivisionError in the cpu
    backend's kept fraction."""
    a = make_inputs(n=3, k=0, m=0, r=2, dtype=torch.float32, grad=True)
    y = ops.masked_lowrank_linear(**a, backend=backend)
    assert y.shape == (3, 0)
    y.sum().backward()
    assert a["x"].grad.shape == (3, 0) and a["u"].grad.shape == (0, 2)


def test_sparse_path_computes_with_kept_entries_only():
    """The cpu backend's sparse path (high ρ) never touches a pruned entry, so a non-finite
    input feature whose row of V is wholly pruned reaches no output, where the dense math
    (and the torch backend) gives NaN·0 = NaN. A non-finite input that meets a kept entry
    still reaches every output it feeds. Pinned here, as the README states it."""
    a = make_inputs(n=5, k=64, m=40, r=8, dtype=torch.float32, keep=0.05)
    a["mask_v"][3] = False  # feature 3 feeds nothing
    a["mask_v"][7] = False
    a["mask_v"][7, 0] = True  # feature 7 feeds component 0, which reaches output 0
    a["mask_u"][0, 0] = True
    a["x"][1, 3] = float("nan")
    a["x"][2, 7] = float("inf")
    y = ops.masked_lowrank_linear(**a, backend="cpu")
    clean = dict(a, x=a["x"].clone())
    clean["x"][1, 3] = 0.0
    clean["x"][2, 7] = 0.0
    want = reference.masked_lowrank_linear(**{k: (t.double() if t.is_floating_point() else t) for k, t in clean.items()})
    rows = [0, 1, 3, 4]
    assert torch.isfinite(y[rows]).all() and rel_error(y[rows], want[rows]) < 1e-5
    fed = (a["u"] * a["mask_u"])[:, 0] != 0  # outputs that component 0 reaches
    assert fed.any() and not torch.isfinite(y[2, fed]).any()
    assert not torch.isfinite(ops.masked_lowrank_linear(**a, backend="torch")[1]).any()  # the dense math


def test_cpu_backend_reads_values_written_without_a_version_bump():
    """Fused optimizers (fused=True) change the factors without bumping their version: the
    sparse path reads their values again after any optimiser step. In-place ops on `.data`
    are not seen until clear_cache()."""
    a = make_inputs(n=9, k=40, m=30, r=6, dtype=torch.float32, keep=0.1)
    u, v = (torch.nn.Parameter(a[k]) for k in ("u", "v"))
    rest = {k: a[k] for k in ("x", "bias", "mask_u", "mask_v")}

    def check():
        with torch.no_grad():
            y = ops.masked_lowrank_linear(u=u, v=v, **rest, backend="cpu")
        want = reference.masked_lowrank_linear(u=u.detach().double(), v=v.detach().double(),
                                               **{k: (t.double() if t.is_floating_point() else t) for k, t in rest.items()})
        assert rel_error(y, want) < 1e-5

    check()
    version = u._version
    u.data.mul_(2)
    v.data.add_(1)
    assert u._version == version
    ops.clear_cache()
    check()
    try:
        optimizer = torch.optim.SGD([u, v], lr=0.5, fused=True)
    except (RuntimeError, ValueError):  # no fused CPU SGD in this torch
        return
    for _ in range(2):
        y = ops.masked_lowrank_linear(u=u, v=v, **rest, backend="cpu")
        y.square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        check()


def test_cpu_backend_takes_inference_tensors():
    """Tensors made under torch.inference_mode have no version counter: not cached, still
    right (sparse and dense)."""
    for keep in (0.05, 0.6):
        with torch.inference_mode():
            a = make_inputs(n=9, k=40, m=30, r=6, dtype=torch.float32, keep=keep)
            y = ops.masked_lowrank_linear(**a, backend="cpu")
        want = reference.masked_lowrank_linear(**{k: (t.double() if t.is_floating_point() else t) for k, t in a.items()})
        assert rel_error(y, want) < 1e-5


def test_float64_blend_keeps_alpha_in_float64():
    """alpha, a float or a float64 tensor, is not rounded to float32 for float64 inputs."""
    a = make_inputs(grad=True)
    t = make_teacher(a)
    for alpha in (0.6, torch.tensor(0.6, dtype=torch.float64)):
        y = ops.blended_lowrank_linear(**a, **t, alpha=alpha, backend="torch")
        want = reference.blended_lowrank_linear(**{k: v.detach() for k, v in a.items()}, **t, alpha=0.6)
        assert rel_error(y, want) < 1e-14


@pytest.mark.parametrize("blend", [False, True])
def test_zero_in_features(blend):
    """in_features 0: x·V is [N, r] of zeros, so y is the bias (and the teacher's)."""
    a = make_inputs(k=0, dtype=torch.float32, lead=(2,))
    if blend:
        t = make_teacher(a, torch.float32)
        y = ops.blended_lowrank_linear(**a, **t, alpha=0.5)
        want = reference.blended_lowrank_linear(**a, **t, alpha=0.5)
    else:
        y = ops.masked_lowrank_linear(**a)
        want = reference.masked_lowrank_linear(**a)
    assert y.shape == (2, 7, 5) and torch.allclose(y, want.float())


def test_backend_resolution():
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) in ("torch", "cpu", "triton")
    assert ops.resolve_backend("auto", "cpu", torch.float32) == ops.resolve_backend("auto", torch.device("cpu"), torch.float32)
    assert ops.available_backends("cpu")["torch"] is None
    assert set(ops.available_backends("cpu")) == set(ops.BACKENDS) - {"auto"}
    # on CUDA tensors eager PyTorch measured fastest (benchmarks/results/nvidia-h200-*.md);
    # torch is available for any device, so this holds with or without a GPU here
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert ops.resolve_backend("auto", torch.device("cuda"), dtype) == "torch"


# ---- bad inputs: (what, change to the good arguments, error type, words the message must hold)
BAD_MASKED = [
    ("x not a tensor", dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("integer x", dict(x=torch.ones(7, 13, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
    ("in mismatch", dict(x=torch.randn(7, 12)), ValueError, "x.shape[-1] (in_features) must equal v.shape[0]"),
    ("u not 2-D", dict(u=torch.randn(5, 3, 1)), ValueError, "u must be 2-D"),
    ("rank mismatch", dict(u=torch.randn(5, 4)), ValueError, "same rank"),
    ("zero rank", dict(u=torch.randn(5, 0), v=torch.randn(13, 0), mask_u=None, mask_v=None), ValueError, "rank must be at least 1"),
    ("mask dtype", dict(mask_u=torch.ones(5, 3)), TypeError, "mask_u must be a bool tensor"),
    ("mask shape", dict(mask_v=torch.ones(13, 2, dtype=torch.bool)), ValueError, "mask_v must have the shape of v (13, 3); got (13, 2)"),
    ("bias shape", dict(bias=torch.randn(6)), ValueError, "bias must have shape (out_features,) = (5,); got (6,)"),
    ("dtype mismatch", dict(u=torch.randn(5, 3, dtype=torch.float64)), TypeError, "u must have x's dtype torch.float32; got torch.float64"),
    ("bias dtype", dict(bias=torch.randn(5, dtype=torch.float16)), TypeError, "bias must have x's dtype"),
    ("device mismatch", dict(u=torch.randn(5, 3, device="meta")), ValueError, "u must be on x's device cpu; got meta"),
    ("mask device", dict(mask_u=torch.ones(5, 3, dtype=torch.bool, device="meta")), ValueError, "mask_u must be on x's device cpu; got meta"),
    ("0-dim x", dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dim [..., in_features]; got"),
    ("unknown backend", dict(backend="cublas"), ValueError, "backend must be one of"),
    ("backend type", dict(backend=3), TypeError, "backend must be a str"),
    ("unavailable backend", dict(backend="cuda"), ValueError, "backend='cuda' is not available"),
]


@pytest.mark.parametrize("case", BAD_MASKED, ids=lambda c: c[0])
def test_bad_input_masked(case):
    what, change, error, words = case
    args = {**make_inputs(dtype=torch.float32), "backend": "torch", **change}
    with pytest.raises(error) as info:
        ops.masked_lowrank_linear(**args)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(alpha=1.5), ValueError, "alpha must be in [0, 1]; got 1.5"),
        (dict(alpha=-0.1), ValueError, "alpha must be in [0, 1]"),
        (dict(alpha=float("nan")), ValueError, "alpha must be in [0, 1]"),
        (dict(alpha="0.5"), TypeError, "alpha must be a float"),
        (dict(alpha=torch.ones(2)), ValueError, "one-element tensor"),
        (dict(alpha=torch.tensor(1)), TypeError, "alpha tensor must have a floating dtype"),
        (dict(teacher_weight=torch.randn(13, 5)), ValueError, "teacher_weight must have shape (out_features, in_features) = (5, 13)"),
        (dict(teacher_weight=torch.randn(5, 13, dtype=torch.float64)), TypeError, "teacher_weight must have x's dtype"),
        (dict(teacher_bias=torch.randn(4)), ValueError, "teacher_bias must have shape (out_features,) = (5,)"),
        (dict(teacher_weight=None), TypeError, "teacher_weight must be a torch.Tensor"),
    ],
)
def test_bad_input_blended(change, error, words):
    a = make_inputs(dtype=torch.float32)
    args = {**a, **make_teacher(a, torch.float32), "alpha": 0.5, **change}
    with pytest.raises(error) as info:
        ops.blended_lowrank_linear(**args)
    assert words in str(info.value)


def _gpu_backend(name, dtype):
    reason = ops.available_backends("cuda", dtype)[name]
    if reason is not None:
        pytest.skip(f"backend {name!r}: {reason}")
    return name


def _gpu_bound(backend, dtype):
    """The kernel battery's bounds (tests/kernel_battery.py: a few units of the dtype's
    roundoff; fp32 IEEE unless torch's fp32 matmul precision lets Triton use tf32)."""
    from kernel_battery import TOLERANCE, _triton_fp32_tolerance

    if dtype != torch.float32:
        return TOLERANCE[dtype]
    return _triton_fp32_tolerance() if backend == "triton" else 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ops_on_gpu_match_reference(gpu, dtype, backend):
    if backend != "auto":
        _gpu_backend(backend, dtype)
    a = {k: t.to(gpu) for k, t in make_inputs(n=197, k=96, m=80, r=24, dtype=dtype).items()}
    a["backend"] = backend
    t = {k: v.to(gpu) for k, v in make_teacher(a, dtype).items()}
    dbl = {k: (v.double() if v.is_floating_point() else v) for k, v in {**a, **t}.items()
           if k != "backend"}
    bound = _gpu_bound(backend, dtype)
    y = ops.masked_lowrank_linear(**a)
    assert rel_error(y, reference.masked_lowrank_linear(**{k: dbl[k] for k in a if k != "backend"})) < bound
    alpha = torch.tensor(0.4, device=gpu)
    y = ops.blended_lowrank_linear(**a, **t, alpha=alpha)
    assert rel_error(y, reference.blended_lowrank_linear(**dbl, alpha=0.4)) < bound


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["two-branch", "folded"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_blend_in_cuda_graph_reads_new_alpha(gpu, backend, route, monkeypatch):
    """alpha lives in a tensor: a captured graph replays with a new value, no recapture."""
    _gpu_backend(backend, torch.float32)
    force_blend_route(monkeypatch, route)
    a = {k: t.to(gpu) for k, t in make_inputs(n=64, k=32, m=48, r=8, dtype=torch.float32).items()}
    a["backend"] = backend
    t = {k: v.to(gpu) for k, v in make_teacher(a, torch.float32).items()}
    alpha = torch.tensor(0.9, device=gpu)
    ops.blended_lowrank_linear(**a, **t, alpha=alpha)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.blended_lowrank_linear(**a, **t, alpha=alpha)
    dbl = {k: (v.double() if v.is_floating_point() else v) for k, v in {**a, **t}.items()
           if k != "backend"}
    for value in (0.9, 0.1):
        alpha.fill_(value)
        graph.replay()
        assert rel_error(y, reference.blended_lowrank_linear(**dbl, alpha=value)) < _gpu_bound(backend, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["two-branch", "folded"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_training_step_in_cuda_graph(gpu, backend, route, monkeypatch):
    """Forward and backward of the blend captured together, as a whole-step CUDA graph does,
    then replayed with new inputs and a new alpha: the gradients match float64 each time. 1100
    tokens into a [64, 8] factor: the factor gradients split over tokens, so their partial-sum
    buffers are allocated in the capture."""
    _gpu_backend(backend, torch.float32)
    force_blend_route(monkeypatch, route)
    if backend == "triton":
        from tunecomp.kernels import masked_lowrank

        assert masked_lowrank.tokens_per_split(1100, 64, 8, gpu) < 1100  # the split path
    a = {k: t.to(gpu) for k, t in make_inputs(n=1100, k=64, m=48, r=8, dtype=torch.float32).items()}
    t = {k: v.to(gpu) for k, v in make_teacher(a, torch.float32).items()}
    names = ("x", "u", "v", "bias")
    for k in names:
        a[k].requires_grad_()
    alpha = torch.tensor(0.7, device=gpu)
    grad_y = torch.randn(1100, 48, device=gpu)

    def step():
        y = ops.blended_lowrank_linear(**a, **t, alpha=alpha, backend=backend)
        return (y, *torch.autograd.grad(y, [a[k] for k in names], grad_y))

    side = torch.cuda.Stream()  # warm up (autotuning included) outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for value in (0.7, 0.2):
        with torch.no_grad():
            for tensor in [a[k] for k in names] + [t["teacher_weight"], grad_y]:
                tensor.copy_(torch.randn_like(tensor))
        alpha.fill_(value)
        graph.replay()
        dbl = {k: v.detach().double().requires_grad_(k in names) if v.is_floating_point() else v
               for k, v in {**a, **t}.items()}
        y = reference.blended_lowrank_linear(**dbl, alpha=value)
        want = (y, *torch.autograd.grad(y, [dbl[k] for k in names], grad_y.double()))
        for name, got, ref in zip(("y",) + names, outs, want):
            assert rel_error(got, ref) < _gpu_bound(backend, torch.float32), (name, value)


@needs_triton
@pytest.mark.parametrize("blend", [False, True])
def test_triton_backend_through_the_custom_ops(blend):
    """The ops layer (checks, flattening, autograd, alpha tensor) over the Triton kernels,
    against the float64 reference. The kernels themselves: tests/test_kernels.py."""
    a = make_inputs(n=9, k=24, m=20, r=5, dtype=torch.float32, lead=(2,), grad=True)
    t = make_teacher(a, torch.float32)
    grad_y = torch.randn(2, 9, 20)

    def run(backend):
        cast = torch.float64 if backend == "reference" else torch.float32
        args = {k: (v.detach().to(cast).requires_grad_() if v.requires_grad else v) for k, v in a.items()}
        teacher = {k: v.to(cast) for k, v in t.items()}
        if backend == "reference":
            y = (reference.blended_lowrank_linear(**args, **teacher, alpha=0.6) if blend
                 else reference.masked_lowrank_linear(**args))
        elif blend:
            y = ops.blended_lowrank_linear(**args, **teacher, alpha=torch.tensor(0.6), backend=backend)
        else:
            y = ops.masked_lowrank_linear(**args, backend=backend)
        y.backward(grad_y.to(cast))
        return y, [args[k].grad for k in ("x", "u", "v", "bias")]

    y, grads = run("triton")
    y_ref, grads_ref = run("reference")
    assert rel_error(y, y_ref) < 1e-5  # both fp32 with ieee products: rounding order only
    for g, g_ref in zip(grads, grads_ref):
        assert rel_error(g, g_ref) < 1e-5


@pytest.mark.slow
@needs_triton
def test_triton_backend_under_torch_compile():
    a = make_inputs(n=5, k=16, m=12, r=4, dtype=torch.float32, grad=True)
    torch._dynamo.reset()

    def f(x, u, v, bias):
        return torch.relu(ops.masked_lowrank_linear(x, u, v, bias, a["mask_u"], a["mask_v"], backend="triton"))

    compiled = torch.compile(f, fullgraph=True)
    inputs = [a[k] for k in ("x", "u", "v", "bias")]
    y = compiled(*inputs)
    assert rel_error(y, f(*inputs)) < 1e-6
    grads = torch.autograd.grad(y.sum(), inputs)
    ref = torch.autograd.grad(f(*inputs).sum(), inputs)
    for g, r in zip(grads, ref):
        assert rel_error(g, r) < 1e-6
