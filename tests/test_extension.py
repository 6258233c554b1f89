"""The native extension tunecomp._C: the C++ CPU kernels (both paths) against the float64
reference, and their checks raising Python errors."""

import gc
import os
import shutil
import sys
import threading
import time

import pytest
import torch

from conftest import random_mask, rel_error
from kernel_battery import assert_close, check_backward, fresh_seed, reference_lowrank
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


def assert_matches_float64(y, grads, seed, x, u, v, bias, mask_u, mask_v, grad_y):
    """y and [grad_x, grad_u, grad_v, grad_b] of the fp32 kernels against the float64 reference
    (by autograd), with the kernel battery's yardstick: fp32 sums of at most 300 products stay
    well under 1e-5 of the larger of the result and its rounded terms (a one-element result,
    say at size 1 or with one kept factor entry, can cancel far below its terms)."""
    p = dict(x=x, u=u, v=v, bias=bias, mask_u=mask_u, mask_v=mask_v, grad_y=grad_y)
    want_y, want_grads = reference_lowrank(p)
    assert_close("y", y.detach(), want_y, torch.float32, seed, 1e-5)
    check_backward(grads, p, want_grads, torch.float32, seed, bias is not None, 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_backward_match_reference(shape, keep, sparse, with_bias):
    seed = fresh_seed()
    x, u, v, bias, mask_u, mask_v = inputs(shape, keep, with_bias, contiguous=shape[0] % 2 == 0)
    y = _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, sparse)
    grad_y = torch.randn_like(y)
    grads = _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, with_bias, sparse)
    assert_matches_float64(y, grads, seed, x, u, v, bias, mask_u, mask_v, grad_y)


@pytest.mark.parametrize("sparse", [False, True])
def test_nan_in_pruned_entries_does_not_leak(sparse):
    x, u, v, bias, mask_u, mask_v = inputs((20, 16, 12, 4), 0.5, True)
    mask_u[0, 0] = mask_v[0, 0] = False
    u[0, 0] = v[0, 0] = float("nan")
    assert torch.isfinite(_C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, sparse)).all()
    grads = _C.lowrank_backward_cpu(torch.randn(20, 12), x, u, v, mask_u, mask_v, True, sparse)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sparse_backward_across_threads(threads):
    """The sparse backward sums each thread's chunks apart and adds the sums in a fixed order:
    right for any thread count (here 1 to 3 over 5 chunks of 64 tokens, the last one short,
    so some threads take more chunks than others), and the same bits on every call."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seed = fresh_seed()
        x, u, v, bias, mask_u, mask_v = inputs((300, 40, 36, 12), 0.3, True)
        grad_y = torch.randn(300, 36)
        grads = _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, True)
        again = _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, True)
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))
    y = _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True)
    assert_matches_float64(y, grads, seed, x, u, v, bias, mask_u, mask_v, grad_y)


def _out_of_index_order(packed):
    """pack_groups_cpu's groupings with every group's entries reversed."""
    packed = [t.clone() for t in packed]
    for slot in range(len(packed) // 3):
        start, index, value = packed[3 * slot: 3 * slot + 3]
        for g in range(start.numel() - 1):
            a, b = start[g].item(), start[g + 1].item()
            index[a:b], value[a:b] = index[a:b].flip(0), value[a:b].flip(0)
    return packed


@pytest.mark.parametrize("n", [1, 9, 17, 45, 97, 197])
def test_sparse_path_at_wider_layers_and_entries_in_any_order(n):
    """The sparse path at 600 inputs and 530 outputs (the other tests stay under 71), 1 to 197
    tokens, none a multiple of the chunks (32, 64): a token's products are added in the same
    order whatever chunk and thread it falls in, so the forward's bits do not depend on the
    thread count. Packed entries out of index order (reversed by hand) give the same result
    up to rounding: the kernels read each entry's index, never assume an order."""
    seed = fresh_seed()
    x, u, v, bias, mask_u, mask_v = inputs((n, 600, 530, 12), 0.2, True)
    grad_y = torch.randn(n, 530)
    packed = _C.pack_groups_cpu(u, v, mask_u, mask_v, backward=True)
    previous = torch.get_num_threads()
    try:
        ys = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ys.append(_C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True, packed))
        torch.set_num_threads(2)
        grads = _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, True, packed)
        reversed_packed = _out_of_index_order(packed)
        y_reversed = _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True, reversed_packed)
        grads_reversed = _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, True,
                                                 reversed_packed)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])
    assert_matches_float64(ys[0], grads, seed, x, u, v, bias, mask_u, mask_v, grad_y)
    assert_matches_float64(y_reversed, grads_reversed, seed, x, u, v, bias, mask_u, mask_v, grad_y)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("sparse", [False, True])
def test_forward_with_t_and_backward_taking_it(shape, keep, sparse):
    """lowrank_forward_with_t_cpu: either path's y and t = x·Vm; the backward given that t
    returns what it computes without it (the dense path: exactly; the sparse path, which
    writes t out of the same fp32 sums it would make again: exactly too), and matches the
    float64 reference."""
    seed = fresh_seed()
    x, u, v, bias, mask_u, mask_v = inputs(shape, keep, True, contiguous=shape[0] % 2 == 1)
    packed = _C.pack_groups_cpu(u, v, mask_u, mask_v) if sparse else None
    y, t = _C.lowrank_forward_with_t_cpu(x, u, v, bias, mask_u, mask_v, sparse, packed)
    assert torch.equal(y, _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, sparse, packed))
    assert t.shape == (x.shape[0], u.shape[1])
    want_t = double(x) @ reference.apply_mask(double(v), mask_v)
    assert rel_error(t, want_t) < 1e-5 if want_t.any() else not t.any()
    grad_y = torch.randn_like(y)
    grads = _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, sparse, packed, t)
    for got, want in zip(grads, _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, sparse, packed)):
        assert torch.equal(got, want)
    assert_matches_float64(y, grads, seed, x, u, v, bias, mask_u, mask_v, grad_y)
    # the t given is the one used: a zero t gives a zero grad_u
    zero_t = _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, sparse, packed, torch.zeros_like(t))
    assert not zero_t[1].any() and torch.equal(zero_t[0], grads[0])
    # a strided t is read as well (the sparse path makes it contiguous once; BLAS may sum a
    # transposed operand in another order)
    strided = torch.empty(t.shape[1], t.shape[0]).T.copy_(t)
    for got, want in zip(_C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, sparse, packed, strided),
                         grads):
        assert torch.equal(got, want) if sparse else rel_error(got, want) < 1e-6


def test_backward_checks_t():
    x, u, v, bias, mask_u, mask_v = inputs((9, 6, 5, 3), 0.5, True)
    grad_y = torch.randn(9, 5)
    backward = _C.lowrank_backward_cpu
    with pytest.raises(ValueError, match=r"t must have shape \(tokens, rank\) = \(9, 3\); got \[9, 4\]"):
        backward(grad_y, x, u, v, mask_u, mask_v, True, False, None, torch.randn(9, 4))
    with pytest.raises(TypeError, match="t must have x's dtype"):
        backward(grad_y, x, u, v, mask_u, mask_v, True, False, None, torch.randn(9, 3).double())
    with pytest.raises(ValueError, match="t must be 2-D"):
        backward(grad_y, x, u, v, mask_u, mask_v, True, False, None, torch.randn(27))
    with pytest.raises(ValueError, match=r"t must have shape \(tokens, rank\) = \(9, 3\); got \[8, 3\]"):
        backward(grad_y, x, u, v, mask_u, mask_v, True, True, None, torch.randn(8, 3))


@pytest.mark.parametrize("keep", [0.05, 1.0])
def test_cpu_backend_through_ops_with_autograd(keep):
    seed = fresh_seed()
    x, u, v, bias, mask_u, mask_v = inputs((30, 24, 20, 6), keep, True)
    leaves = [t.clone().requires_grad_() for t in (x, u, v, bias)]
    y = ops.masked_lowrank_linear(*leaves, mask_u, mask_v, backend="cpu")
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert_matches_float64(y, [t.grad for t in leaves], seed, x, u, v, bias, mask_u, mask_v, grad_y)


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


def _cpu_kernel_calls():
    """One call of each CPU entry point of _C, on inputs big enough to take milliseconds."""
    x, u, v, bias, mask_u, mask_v = inputs((1024, 1024, 1024, 256), 0.5, True)
    packed = _C.pack_groups_cpu(u, v, mask_u, mask_v, backward=True)
    grad_y = torch.randn(1024, 1024)
    return {
        "lowrank_forward_cpu": lambda: _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v),
        "lowrank_forward_with_t_cpu": lambda: _C.lowrank_forward_with_t_cpu(
            x, u, v, bias, mask_u, mask_v, True, packed),
        "pack_groups_cpu": lambda: _C.pack_groups_cpu(u, v, mask_u, mask_v, backward=True),
        "pack_values_cpu": lambda: _C.pack_values_cpu(u, v, packed),
        "lowrank_forward_packed_cpu": lambda: _C.lowrank_forward_packed_cpu(x, packed[:6], bias),
        "lowrank_backward_cpu": lambda: _C.lowrank_backward_cpu(
            grad_y, x, u, v, mask_u, mask_v, True, True, packed),
    }


@pytest.mark.parametrize("name", ["lowrank_forward_cpu", "lowrank_forward_with_t_cpu", "pack_groups_cpu",
                                  "pack_values_cpu", "lowrank_forward_packed_cpu",
                                  "lowrank_backward_cpu"])
def test_kernels_let_other_python_threads_run(name):
    """While a kernel runs, another Python thread runs too: the bindings let go of the GIL.

    With the switch interval raised far beyond the test, the thread holding the GIL keeps it
    until it blocks. A second thread wakes every millisecond and notes the time. A kernel
    holding the GIL lets it go, if at all, only around the call (converting and freeing
    tensors: measured at 97-100% of the call's time); so no note falls in the middle half of
    the call, whatever the timing. Released, a note lands there within a few calls (each
    takes milliseconds). The garbage collector is off meanwhile: a collection between the
    two clock reads could take long enough to blur "around"."""
    call = _cpu_kernel_calls()[name]
    notes, started, done = [], threading.Event(), threading.Event()

    def note():
        started.set()
        while not done.is_set():
            notes.append(time.perf_counter())
            time.sleep(0.001)  # blocks: lets go of the GIL

    interval, collecting = sys.getswitchinterval(), gc.isenabled()
    sys.setswitchinterval(1000.0)
    gc.disable()
    thread = threading.Thread(target=note, daemon=True)
    try:
        thread.start()
        started.wait()
        inside = 0
        for _ in range(50):
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            quarter = (t1 - t0) / 4
            inside += sum(t0 + quarter < t < t1 - quarter for t in list(notes))
            if inside:
                break
    finally:
        done.set()
        sys.setswitchinterval(interval)
        if collecting:
            gc.enable()
        thread.join()
    assert inside > 0, f"{name} held the GIL in all 50 calls: no other thread ran in their middle"


def test_threads_share_the_cpu_backend():
    """Python threads running the same layers at once (the kernels let go of the GIL), sparse
    and dense, packing anew and reading the packing cache together, each get what one thread
    gets alone."""
    layers = [inputs((97, 40, 36, 8), keep, True)[1:] for keep in (0.05, 0.1, 0.6)]
    xs = [torch.randn(97, 40) for _ in range(4)]
    with torch.no_grad():
        want = [[ops.masked_lowrank_linear(x, *layer, backend="cpu") for layer in layers]
                for x in xs]
    ops._BACKENDS["cpu"]._packed.clear()  # the threads pack anew, together
    got, errors = {}, []

    def work(i):
        try:
            with torch.no_grad():
                got[i] = [[ops.masked_lowrank_linear(xs[i], *layer, backend="cpu")
                           for layer in layers] for _ in range(20)]
        except Exception as error:  # raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, rounds in got.items():
        for ys in rounds:
            for y, y_alone in zip(ys, want[i]):
                assert rel_error(y, y_alone) < 1e-6


def test_cuda_part_built_when_toolkit_present():
    """With a CUDA build of torch and nvcc, setup.py compiles csrc/*.cu for sm_80 and sm_90."""
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("CPU-only torch or no nvcc: the extension is CPU only by design")
    assert _C.with_cuda
    archs = os.environ.get("TUNECOMP_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    assert set(_C.cuda_compiled_archs()) == {int(a) * 10 for a in archs}  # __CUDA_ARCH__ style


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects only")
def test_extension_uses_the_shared_cxx_runtime():
    """tunecomp._C takes the C++ runtime from libstdc++.so.6 rather than holding a copy of it:
    with its own copy, an integer written into an error message is silently dropped on this
    kind of machine, and an H200 machine's build crashed on one the same way (2026-11-27; see
    setup.py, _shared_cxx_runtime_flags)."""
    import subprocess

    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) not found")
    listing = subprocess.run(["readelf", "--dynamic", "--dyn-syms", "--wide", _C.__file__],
                             capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in listing.splitlines() if "(NEEDED)" in line]
    assert "libstdc++.so.6" in needed, f"{_C.__file__} needs {needed}: libstdc++ was linked statically"
    defined = {line.split()[-1] for line in listing.splitlines()
               if line.split()[-1:] and " UND " not in line and "FUNC" in line}
    assert "__cxa_throw" not in defined, f"{_C.__file__} defines __cxa_throw: it holds a copy of libstdc++"


def test_packed_groups_match_and_follow_in_place_changes():
    x, u, v, bias, mask_u, mask_v = inputs((70, 24, 20, 6), 0.1, True)
    packed = _C.pack_groups_cpu(u, v, mask_u, mask_v)
    assert len(packed) == 12
    assert torch.equal(_C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True, packed),
                       _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True))
    with pytest.raises(ValueError, match="packed must hold the 6 or 12 tensors"):
        _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True, packed[:3])
    # the forward's half of the packing: the same result, and the sparse backward refuses it
    forward_only = _C.pack_groups_cpu(u, v, mask_u, mask_v, backward=False)
    assert len(forward_only) == 6
    assert all(torch.equal(a, b) for a, b in zip(forward_only, packed[:6]))
    assert torch.equal(_C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True, forward_only),
                       _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, True))
    grad_y = torch.randn(x.shape[0], u.shape[0])
    with pytest.raises(ValueError, match="forward groupings only"):
        _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, True, forward_only)
    for got, want in zip(_C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, True, packed),
                         _C.lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, True, True)):
        assert torch.equal(got, want)
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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("backward", [False, True])
def test_pack_values_reads_the_new_values_of_the_same_entries(shape, keep, backward):
    _, k, m, r = shape
    u, v = torch.randn(m, r), torch.randn(k, r)
    mask_u, mask_v = random_mask(u.shape, keep), random_mask(v.shape, keep)
    packed = _C.pack_groups_cpu(u, v, mask_u, mask_v, backward=backward)
    u2, v2 = torch.randn(m, r), torch.randn(k, r).T.contiguous().T  # v2 not contiguous
    fresh = _C.pack_values_cpu(u2, v2, packed)
    want = _C.pack_groups_cpu(u2, v2, mask_u, mask_v, backward=backward)
    assert len(fresh) == len(want) == (12 if backward else 6)
    assert all(torch.equal(a, b) for a, b in zip(fresh, want))
    assert all(fresh[i] is packed[i] for i in range(len(packed)) if i % 3 != 2)  # starts, indices
    assert all(torch.equal(a, b) for a, b in zip(packed, _C.pack_groups_cpu(u, v, mask_u, mask_v, backward)))


def test_pack_values_checks_its_inputs():
    u, v = torch.randn(20, 6), torch.randn(24, 6)
    packed = _C.pack_groups_cpu(u, v, random_mask(u.shape, 0.3), random_mask(v.shape, 0.3))
    with pytest.raises(ValueError, match="packed does not match these factors"):
        _C.pack_values_cpu(torch.randn(19, 6), v, packed)
    for wrong in ([], packed[:3]):
        with pytest.raises(ValueError, match=f"packed must hold the 6 or 12 tensors of pack_groups_cpu; got {len(wrong)}"):
            _C.pack_values_cpu(u, v, wrong)
    with pytest.raises(ValueError, match="mask_u must be on its factor's device cpu; got meta"):
        _C.pack_groups_cpu(u, v, torch.ones(20, 6, dtype=torch.bool, device="meta"), None)
    with pytest.raises(TypeError, match="u and v must be float32; got Double and Float"):
        _C.pack_values_cpu(u.double(), v, packed)
    with pytest.raises(ValueError, match=r"must be CPU tensors; got \(meta, cpu, cpu\)"):
        _C.pack_values_cpu(u, v, [packed[0].to("meta")] + packed[1:])
    with pytest.raises(ValueError, match=r"must be contiguous 1-D tensors; got sizes \(\[7\], \[\d+\], \[\d+\]\) "
                                         r"and strides \(\[2\], \[1\], \[1\]\)"):
        _C.pack_values_cpu(u, v, [packed[0].repeat_interleave(2)[::2]] + packed[1:])


def test_backend_reads_new_values_only_while_the_masks_stay(monkeypatch):
    """Training steps between two prunings change u and v in place, not the masks: the
    backend reads the kept entries' new values (pack_values_cpu) instead of packing anew;
    a changed mask packs anew. Each step's output and gradients match the reference."""
    calls = []
    for name in ("pack_groups_cpu", "pack_values_cpu"):
        real = getattr(_C, name)
        monkeypatch.setattr(_C, name, lambda *a, _real=real, _name=name, **kw:
                            calls.append(_name) or _real(*a, **kw))
    x, u, v, bias, mask_u, mask_v = inputs((70, 48, 40, 24), 0.1, True)
    leaves = [t.requires_grad_() for t in (x, u, v, bias)]
    optimizer = torch.optim.SGD([u, v], lr=0.1)
    for step in range(4):
        seed = fresh_seed()
        if step == 2:
            mask_v[0] = False  # a pruning step
        y = ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
        assert_matches_float64(y, [t.grad for t in leaves], seed, x, u, v, bias, mask_u, mask_v,
                               grad_y)
        optimizer.step()
        for t in leaves:
            t.grad = None
    assert calls == ["pack_groups_cpu", "pack_values_cpu", "pack_groups_cpu", "pack_values_cpu"]


def test_backend_packs_again_when_the_data_is_swapped():
    """Module.to()/.half()/.float() and `.data =` give a tensor new data without bumping its
    version: the packing must follow the data, not the version alone. Nor the data pointer
    alone: the new data can lie at the old address (in about 1% of these rounds; 300 rounds
    find that with 95% odds, and failed 5 runs in 5 with the pointer as the key)."""
    x, u, v, bias, mask_u, mask_v = inputs((70, 24, 20, 6), 0.1, True)
    mask_u[0, 0] = mask_v[0, 0] = True  # one component alive, or y would be the bias alone
    u, v = torch.nn.Parameter(u), torch.nn.Parameter(v)
    layer = torch.nn.Module()
    layer.u, layer.v = u, v
    with torch.no_grad():
        for _ in range(300):
            u.data = torch.randn_like(u)
            y1 = ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
            version = u._version
            layer.half().float()  # u and v rounded to half precision, in the same Parameters
            assert layer.u is u and u._version == version
            y2 = ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
            want = reference.masked_lowrank_linear(x.double(), u.double(), v.double(),
                                                   bias.double(), mask_u, mask_v)
            assert not torch.equal(y1, y2)
            assert rel_error(y2, want) < 1e-6
        u.data = 2 * u.data
        y3 = ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
    assert rel_error(y3 - bias, 2 * (y2 - bias)) < 1e-6


@pytest.mark.parametrize("factor", ["u", "v", "mask_u", "mask_v"])
def test_backend_packs_again_when_the_data_is_a_view_of_the_same_storage(factor):
    """`.data =` a transpose of a square factor or mask keeps the storage, the data pointer
    and the version: only the strides tell the packing is stale. A slice to a lower rank
    keeps them too, and changes the shape."""
    x, u, v, bias, mask_u, mask_v = inputs((40, 8, 8, 8), 0.1, True)
    tensors = dict(u=u, v=v, mask_u=mask_u, mask_v=mask_v)

    def check():
        want = reference.masked_lowrank_linear(x.double(), u.double(), v.double(), bias.double(),
                                               mask_u, mask_v)
        got = ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
        assert rel_error(got, want) < 1e-6

    check()
    tensors[factor].data = tensors[factor].data.T
    check()
    for t in tensors.values():
        t.data = t.data[:, :4]
    check()


@pytest.mark.parametrize("keep, sparse", [(0.05, True), (0.2, True), (0.5, False)])
def test_backend_switches_both_passes_at_one_threshold(monkeypatch, keep, sparse):
    """Forward and backward run sparse below the same kept fraction (SPARSE_BELOW): there the
    forward packs all four groupings and the backward runs sparse from them; above it,
    nothing is packed. Either way the backward gets the forward's T."""
    backend = ops._BACKENDS["cpu"]
    assert 0.2 < backend.SPARSE_BELOW < 0.5
    calls = []
    real_backward = _C.lowrank_backward_cpu
    monkeypatch.setattr(_C, "lowrank_backward_cpu", lambda *args: calls.append(args) or real_backward(*args))
    seed = fresh_seed()
    x, u, v, bias, _, _ = inputs((70, 48, 40, 24), keep, True)
    # exactly `keep` of the entries: the backend's choice must not depend on the draw
    mask_u, mask_v = (torch.randperm(t.numel()).reshape(t.shape) < round(keep * t.numel()) for t in (u, v))
    x, u, v, bias = (t.requires_grad_() for t in (x, u, v, bias))
    y = ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
    kept, packed = backend._pack(u, v, mask_u, mask_v)
    assert abs(kept - keep) < 0.01
    assert (len(packed) == 12) if sparse else (packed is None)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    (args,) = calls
    assert args[7] is sparse  # lowrank_backward_cpu(grad_y, x, u, v, mask_u, mask_v, has_bias, sparse, packed, t)
    assert args[8] is packed
    assert args[9].shape == (70, 24)  # the forward's T, from either path
    grads = [t.grad for t in (x, u, v, bias)]
    assert_matches_float64(y, grads, seed, x, u, v, bias, mask_u, mask_v, grad_y)


@pytest.mark.parametrize("keep", [1.0, 0.99])
def test_backend_applies_masks_only_where_an_entry_is_pruned(monkeypatch, keep):
    """All-one masks (no pruning yet, or rho 0) reach neither kernel: selecting by them would
    copy the factors for nothing. One pruned entry and both passes apply them."""
    seen = []
    for name in ("lowrank_forward_with_t_cpu", "lowrank_backward_cpu"):
        real = getattr(_C, name)
        monkeypatch.setattr(_C, name, lambda *args, real=real: seen.append(args[4:6]) or real(*args))
    seed = fresh_seed()
    x, u, v, bias, _, _ = inputs((37, 24, 40, 16), 1.0, True)
    mask_u, mask_v = torch.ones_like(u, dtype=torch.bool), torch.ones_like(v, dtype=torch.bool)
    if keep < 1:
        mask_u[3, 5] = False
    x, u, v, bias = (t.requires_grad_() for t in (x, u, v, bias))
    y = ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert len(seen) == 2  # forward (mask_u, mask_v), backward (mask_u, mask_v)
    for masks in seen:
        assert (masks == (None, None)) if keep == 1 else (masks[0] is mask_u and masks[1] is mask_v)
    grads = [t.grad for t in (x, u, v, bias)]
    assert_matches_float64(y, grads, seed, x, u, v, bias, mask_u, mask_v, grad_y)
    assert (u.grad[3, 5] == 0) == (keep < 1)


def test_backend_forgets_the_packing_of_deleted_factors():
    backend = ops._BACKENDS["cpu"]
    x, u, v, bias, mask_u, mask_v = inputs((70, 48, 40, 24), 0.05, True)
    ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend="cpu")
    key = tuple(id(t) for t in (u, v, mask_u, mask_v))
    assert key in backend._packed
    del u
    assert key not in backend._packed


# ------------------------------------------------------------------------------------------
# Inference from the kept entries alone: ops.pack_kept + ops.packed_lowrank_linear
# ------------------------------------------------------------------------------------------


def kept_factors(shape, keep):
    """u, v whose pruned entries are zeros (as exported), from the shape (N, in, out, r)."""
    _, k, m, r = shape
    u, v = torch.randn(m, r), torch.randn(k, r)
    return u * random_mask(u.shape, keep), v * random_mask(v.shape, keep)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_forward_matches_reference(shape, keep, with_bias):
    seed = fresh_seed()
    u, v = kept_factors(shape, keep)
    bias = torch.randn(u.shape[0]) if with_bias else None
    packed = ops.pack_kept(u, v)
    assert packed[1].numel() == int((v != 0).sum()) and packed[4].numel() == int((u != 0).sum())
    for x in (torch.randn(shape[0], shape[1]), torch.randn(shape[1], 2, shape[0]).permute(2, 1, 0)):
        with torch.no_grad():  # a contiguous [N, in] and a non-contiguous [N, 2, in]
            y = ops.packed_lowrank_linear(x, packed, bias)
        assert y.shape == (*x.shape[:-1], u.shape[0]) and y.dtype == torch.float32
        p = dict(x=x, u=u, v=v, bias=bias, mask_u=None, mask_v=None, grad_y=torch.randn_like(y))
        want, _ = reference_lowrank(p)  # (and gradients, unused)
        assert_close("y", y, want, torch.float32, seed, 1e-5)
    with torch.no_grad():  # no tokens
        assert ops.packed_lowrank_linear(torch.randn(0, shape[1]), packed, bias).shape == (0, u.shape[0])


def test_packed_forward_with_no_outputs():
    """out_features = 0 packs to one U start: a [tokens, 0] result, as masked_lowrank_linear
    gives."""
    packed = ops.pack_kept(torch.zeros(0, 3), torch.randn(5, 3))
    with torch.no_grad():
        for bias in (None, torch.zeros(0)):
            assert ops.packed_lowrank_linear(torch.randn(4, 5), packed, bias).shape == (4, 0)


def test_packed_forward_checks_its_inputs():
    u, v = kept_factors((9, 12, 10, 4), 0.5)
    u[-1, -1] = v[-1, -1] = 1.0  # the last row of each kept: the checks below rely on it
    packed = ops.pack_kept(u, v)
    x, bias = torch.randn(9, 12), torch.randn(10)
    f = ops.packed_lowrank_linear
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        f(x.double(), packed, bias)
    with pytest.raises(TypeError, match="packed must be the 6 tensors"):
        f(x, packed[:3], bias)
    with pytest.raises(TypeError, match=r"\(a PackedFactors, which also holds in_features\); got list of 6"):
        f(x, list(packed), bias)
    with pytest.raises(ValueError, match=r"x must have at least 1 dim \[..., in_features\]"):
        f(torch.tensor(1.0), packed, bias)
    with pytest.raises(RuntimeError, match="no gradient"):
        f(x.requires_grad_(), packed, bias)
    x = x.detach()
    with pytest.raises(ValueError, match="pack_kept needs u and v as float32"):
        ops.pack_kept(u.double(), v.double())
    with pytest.raises(ValueError, match="same rank"):
        ops.pack_kept(u, v[:, :3])
    with pytest.raises(ValueError, match="must be 2-D"):  # the binding checks by itself too
        _C.pack_groups_cpu(u.reshape(5, 2, 4), v, None, None, False)
    with torch.no_grad():
        with pytest.raises(ValueError, match="bias must have shape"):
            f(x, packed, bias[:4])
        for width in (11, 13):  # x narrower or wider than V: caught before any read
            with pytest.raises(ValueError, match=rf"in_features the factors were packed for, 12; got x \(9, {width}\)"):
                f(torch.randn(9, width), packed, bias)
        # the C++ checks the tensors themselves (here: packed for a narrower x than they index)
        with pytest.raises(ValueError, match=r"packed V .* indices must lie in \[0, 11\)"):
            f(x[:, :11], ops.PackedFactors(packed, 11), bias)
        for slot, change, message in ((1, lambda t: t.fill_(-1), "indices must lie in"),
                                      (4, lambda t: t.fill_(4), r"indices must lie in \[0, 4\)"),
                                      (0, lambda t: t.flip(0), "starts must rise"),
                                      (3, lambda t: t.roll(1), "starts must rise"),
                                      (2, lambda t: t[:-1], "as many indices as values"),
                                      (5, lambda t: t.double(), "must be \\(int64 starts")):
            bad = ops.PackedFactors([t.clone() for t in packed], packed.in_features)
            bad[slot] = change(bad[slot])
            with pytest.raises((ValueError, TypeError), match=message):
                f(x, bad, bias)


# ------------------------------------------------------------------------------------------
# The CUDA C++ backend. Its numbers are checked by tests/test_kernels.py (on the GPU, and on
# the CPU through tests/cuda_emulator); here: its checks and its wiring into the ops.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real cuda backend is tested instead")
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build the CUDA emulator")
    import cuda_emulator

    return cuda_emulator.load()


@pytest.fixture(scope="module")
def cuda_entry_points():
    """(module with the cuda backend's entry points, device): tunecomp._C on a GPU, the
    emulator (same host code) on the CPU elsewhere."""
    if torch.cuda.is_available() and _C.with_cuda:
        return _C, "cuda"
    if shutil.which("c++") is None:
        pytest.skip("no GPU, and no C++ compiler to build the CUDA emulator")
    import cuda_emulator

    return cuda_emulator.load(), "cpu"


def test_cuda_checks_raise_python_errors(cuda_entry_points):
    """The CUDA entry points' TORCH_CHECKs (on the CPU: the same host code, emulated) raise
    ValueError/TypeError naming the argument, the expected and the actual."""
    native, device = cuda_entry_points

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype)

    def ones(*shape, dtype=torch.float32):
        return torch.ones(*shape, device=device, dtype=dtype)

    x, u, v = randn(4, 6), randn(5, 2), randn(6, 2)
    f = native.lowrank_forward_cuda
    with pytest.raises(ValueError, match=r"x.shape\[1\] \(in_features\) must equal v.shape\[0\]; got 6 and 7"):
        f(x, u, randn(7, 2))
    with pytest.raises(ValueError, match="u and v must have the same rank; got 3 and 2"):
        f(x, randn(5, 3), v)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        f(x, randn(5, 0), randn(6, 0))
    with pytest.raises(TypeError, match="mask_u must be a bool tensor; got Float"):
        f(x, u, v, None, ones(5, 2))
    with pytest.raises(ValueError, match=r"mask_v must have shape \[6, 2\]; got \[6, 3\]"):
        f(x, u, v, None, None, ones(6, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="v must have x's dtype Float; got Double"):
        f(x, u, v.double())
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16 for the cuda backend; got Double"):
        f(x.double(), u.double(), v.double())
    with pytest.raises(ValueError, match=r"bias must have shape \(out_features,\) = \(5,\); got \[4\]"):
        f(x, u, v, randn(4))
    with pytest.raises(ValueError, match="x must be 2-D"):
        f(x[None], u, v)
    with pytest.raises(ValueError, match=r"grad_y must have shape \(tokens, out_features\) = \(4, 5\); got \[4, 4\]"):
        native.lowrank_backward_cuda(randn(4, 4), x, u, v)
    w0, alpha = randn(5, 6), torch.tensor(0.5, device=device)
    g = native.blended_forward_cuda
    with pytest.raises(ValueError, match=r"teacher_weight must have shape \(out_features, in_features\) = \(5, 6\); got \[6, 5\]"):
        g(x, u, v, None, None, None, w0.T.contiguous(), None, alpha)
    with pytest.raises(TypeError, match="alpha must be a float32 tensor; got Double"):
        g(x, u, v, None, None, None, w0, None, alpha.double())
    with pytest.raises(ValueError, match="alpha must have one element"):
        g(x, u, v, None, None, None, w0, None, ones(2))
    with pytest.raises(ValueError, match=r"teacher_bias must have shape \(out_features,\) = \(5,\)"):
        g(x, u, v, None, None, None, w0, randn(3), alpha)
    if device == "cuda":
        with pytest.raises(ValueError, match="x must be a CUDA tensor; got cpu"):
            f(x.cpu(), u, v)
        with pytest.raises(ValueError, match="u must be on x's device cuda:0; got cpu"):
            f(x, u.cpu(), v)


def test_cuda_backend_zero_tokens(cuda_entry_points):
    native, device = cuda_entry_points
    x, u, v = (torch.randn(*s, device=device) for s in ((0, 6), (5, 2), (6, 2)))
    assert native.lowrank_forward_cuda(x, u, v).shape == (0, 5)
    gx, gu, gv, gb = native.lowrank_backward_cuda(torch.randn(0, 5, device=device), x, u, v, None, None, True)
    assert gx.shape == (0, 6) and not gu.any() and not gv.any() and gb.shape == (5,) and not gb.any()


@pytest.mark.parametrize("blend", [False, True])
def test_cuda_backend_through_the_custom_ops(emulator, monkeypatch, blend):
    """ops -> autograd (eager route) -> the cuda backend's Python glue -> the C++ entry
    points, with the emulator standing in for the GPU build; against the float64 reference."""
    monkeypatch.setitem(ops._BACKENDS, "cuda", ops._CudaBackend(native=emulator, device_type="cpu"))
    x, u, v, bias, mask_u, mask_v = inputs((9, 24, 20, 5), 0.5, True)
    x = x.reshape(3, 3, 24)  # leading dims are flattened by the ops layer
    w0, b0 = torch.randn(20, 24), torch.randn(20)

    def run(backend):
        cast = torch.float64 if backend == "reference" else torch.float32
        leaves = [t.detach().to(cast, copy=True).requires_grad_() for t in (x, u, v, bias)]
        ops_or_reference = reference if backend == "reference" else ops
        kwargs = {} if backend == "reference" else {"backend": backend}
        if blend:
            y = ops_or_reference.blended_lowrank_linear(*leaves, mask_u, mask_v, w0.to(cast), b0.to(cast), 0.6,
                                                        **kwargs)
        else:
            y = ops_or_reference.masked_lowrank_linear(*leaves, mask_u, mask_v, **kwargs)
        y.square().sum().backward()
        return y, [t.grad for t in leaves]

    y, grads = run("cuda")
    y_ref, grads_ref = run("reference")
    assert y.shape == (3, 3, 20)
    assert rel_error(y, y_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_error(g, g_ref) < 1e-5


def test_cuda_backend_availability():
    reason = ops.available_backends("cpu", torch.float32)["cuda"]
    if not _C.with_cuda:
        assert "built without its CUDA part" in reason
        return
    assert reason == "the CUDA kernels take cuda tensors, not cpu"
    cuda = ops._BACKENDS["cuda"]
    if not torch.cuda.is_available():
        assert cuda.unavailable_reason(torch.device("cuda"), torch.float32) == "CUDA is not available"
    else:
        assert cuda.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None
    assert "float64" in cuda.unavailable_reason(torch.device("cuda"), torch.float64)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rank", [130, 384])  # 3 and 6 column blocks of T
@pytest.mark.parametrize("blend", [False, True])
def test_cuda_fused_forward_taken_from_64_tokens_per_sm(emulator, blend, rank, dtype, bound):
    """From 64 x (SM count) tokens the forward is one fused launch holding T in shared memory
    (the emulator reports 4 SMs: 256 tokens); below, two launches. Both match the reference."""
    u, v, bias = torch.randn(70, rank) / rank ** 0.5, torch.randn(24, rank) / 5, torch.randn(70)
    mask_u, mask_v = random_mask(u.shape, 0.5), random_mask(v.shape, 0.5)
    w0, b0, alpha = torch.randn(70, 24) / 5, torch.randn(70), torch.tensor(0.4)
    u, v, bias, w0, b0 = (t.to(dtype) for t in (u, v, bias, w0, b0))
    for tokens, fused in ((255, False), (256, True), (301, True))[: 3 if rank < 384 else 2]:
        x = torch.randn(tokens, 24).to(dtype)
        before = emulator.fused_launches()
        if blend:
            y = emulator.blended_forward_cuda(x, u, v, bias, mask_u, mask_v, w0, b0, alpha)
            want = reference.blended_lowrank_linear(*map(double, (x, u, v, bias)), mask_u, mask_v,
                                                    w0.double(), b0.double(), alpha.double())
        else:
            y = emulator.lowrank_forward_cuda(x, u, v, bias, mask_u, mask_v)
            want = reference.masked_lowrank_linear(*map(double, (x, u, v, bias)), mask_u, mask_v)
        assert emulator.fused_launches() - before == int(fused)
        assert y.dtype == dtype and rel_error(y, want) < bound
