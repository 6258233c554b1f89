"""Checks that ``masked_lowrank.launch``'s direct way launches exactly what Triton's own
route launches, without a GPU: run by tests/test_triton_kernels.py in a fresh process.

The kernels are compiled for sm_90 under benchmarks/kernel_resources' stand-in driver (it
names the target, it cannot launch) and every compiled kernel's launcher records its call
instead of launching. Each call site of the Triton backend (forward, backward, the blend's
two-branch and folded forwards and its backward) runs on the same inputs three times: through
``kernel[grid]`` (``Autotuner.run`` and ``JITFunction.run``, the reference), then twice through
``launch``; the second pass must take the direct way (neither ``Autotuner.run`` nor
``JITFunction.run`` entered) and record, launch by launch, the same compiled kernel, grid,
stream, function, metadata and arguments as the reference. Cases cover fp32/fp16/bf16, masks
or none, a token count that splits the factor gradients, and a view of x that is not 16-byte
aligned (Triton compiles another kernel for it). Then the direct way must step aside where
the slow ways serve the call: a cleared autotuner cache, a launch hook, a pre-run hook.
Last, a toy kernel goes through the changes of state and argument forms after which a stored
launch would no longer be Triton's (``toy_kernel_cases``). Prints "ok" and exits 0, or raises.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import kernel_resources  # noqa: E402

LAUNCHES: list = []  # (compiled kernel, launcher arguments) per recorded launch
ENTERED: list = []  # "autotuner" / "jit" per entry into Triton's slow route


def _record_launches() -> None:
    # tuning picks the second config of two (below), so a wrong key would show as another pick
    kernel_resources.stub_launches(lambda kernel, args: LAUNCHES.append((kernel, args)),
                                   pick=lambda configs: configs[-1])
    autotuner_run, jit_run = Autotuner.run, JITFunction.run
    Autotuner.run = lambda self, *a, **k: ENTERED.append("autotuner") or autotuner_run(self, *a, **k)
    JITFunction.run = lambda self, *a, **k: ENTERED.append("jit") or jit_run(self, *a, **k)


def _describe(value, inputs):
    """A launcher argument, comparable across passes: an input tensor by identity, an output
    (allocated per call) by layout, the rest by value."""
    if isinstance(value, torch.Tensor):
        for name, tensor in inputs.items():
            if value is tensor or (value.data_ptr() == tensor.data_ptr() and value.shape == tensor.shape
                                   and value.stride() == tensor.stride()):
                return ("input", name, value.dtype)
        return ("output", value.dtype, tuple(value.shape), value.stride(), value.data_ptr() % 16)
    return value


def _launched(calls, inputs):
    """The launches of ``calls`` (a list of thunks) as comparable tuples; the launch metadata
    and the hooks (positions 6-8: Triton passes its metadata and hook chains, the direct way
    None, which the launcher reads as "no hook") are compared separately by the caller."""
    del LAUNCHES[:]
    for call in calls:
        call()
    out = []
    for kernel, args in LAUNCHES:
        head, rest = args[:6], args[9:]
        out.append((kernel, head, tuple(_describe(a, inputs) for a in rest)))
    return out, [args[6:9] for _, args in LAUNCHES]


def main() -> None:
    _record_launches()
    from tunecomp import kernels, ops
    from tunecomp.kernels import blended_lowrank as bl, masked_lowrank as ml

    for _, kernel, _ in kernels.autotuned():  # two configs: launch builds the autotuner's key
        first = kernel.configs[0]
        import triton
        kernel.configs = [first, triton.Config(dict(first.kwargs), num_warps=first.num_warps,
                                               num_stages=first.num_stages)]
        kernel.cache_results = False
    real_launch = ml.launch

    def through_triton(kernel, grid, *args, **kwargs):
        kernel[grid](*args, **kwargs)

    def case(n_tokens, dtype, masks, misaligned, folded):
        g = torch.Generator().manual_seed(n_tokens)
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
        x = rnd(n_tokens * 24 + 1)[1:].view(n_tokens, 24) if misaligned else rnd(n_tokens, 24)
        u, v, w, b, gy = rnd(20, 6), rnd(24, 6), rnd(20, 24), rnd(20), rnd(n_tokens, 20)
        mask_u, mask_v = (torch.rand(20, 6, generator=g) > 0.5,
                          torch.rand(24, 6, generator=g) > 0.5) if masks else (None, None)
        alpha = torch.full((), 0.3)
        inputs = {"x": x, "u": u, "v": v, "w": w, "b": b, "gy": gy, "alpha": alpha}
        if masks:
            inputs.update(mask_u=mask_u.view(torch.uint8), mask_v=mask_v.view(torch.uint8))
        ops.folding_pays = lambda *shape: folded
        ops.folding_pays_backward = lambda *shape: folded
        calls = [lambda: kernels.forward(x, u, v, b, mask_u, mask_v),
                 lambda: kernels.backward(gy, x, u, v, mask_u, mask_v, True),
                 lambda: kernels.blended_forward(x, u, v, None, mask_u, mask_v, w, b, alpha),
                 lambda: kernels.blended_backward(gy, x, u, v, mask_u, mask_v, w, alpha, False)]
        return calls, inputs

    # the third and fourth differ only in x's alignment: the same signature but for that
    cases = [(5, torch.float32, True, False, False), (301, torch.float16, False, False, True),
             (301, torch.bfloat16, True, True, False), (301, torch.bfloat16, True, False, False),
             (40, torch.bfloat16, True, False, True)]
    compiled_for = {}
    for spec in cases:
        calls, inputs = case(*spec)
        ml.launch = bl.launch = through_triton
        reference, triton_meta = _launched(calls, inputs)
        ml.launch = bl.launch = real_launch
        _launched(calls, inputs)  # tunes nothing new; remembers each call's kernel
        del ENTERED[:]
        direct, direct_meta = _launched(calls, inputs)
        assert ENTERED == [], f"{spec}: the second pass entered Triton's route: {ENTERED}"
        assert len(direct) == len(reference) > 0, (spec, len(direct), len(reference))
        for i, (want, got) in enumerate(zip(reference, direct)):
            assert want == got, f"{spec}, launch {i} ({want[0].name}):\n  triton {want}\n  direct {got}"
        assert all(m == (None, None, None) for m in direct_meta), direct_meta
        assert all(h[1:] == (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
                   for h in triton_meta)
        for kernel, _, _ in reference:
            compiled_for.setdefault(kernel.name, set()).add(id(kernel))
    # the misaligned x compiled other kernels than the aligned one, and the direct way told
    # them apart (the comparison above)
    assert len(compiled_for["_forward_kernel"]) >= 2, compiled_for

    calls, inputs = case(*cases[-1])
    forward = calls[0]
    del ENTERED[:]
    forward()
    assert ENTERED == [], ENTERED
    ml._forward_kernel.cache.clear()  # a caller clears the autotuner's picks: it tunes again
    forward()
    assert ENTERED[:1] == ["autotuner"], ENTERED
    del ENTERED[:]
    forward()
    assert ENTERED == [], ENTERED
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)  # a profiler's hook: Triton's route
    try:
        del ENTERED[:]
        forward()
        assert ENTERED == ["jit"] and LAUNCHES[-1][1][6] is not None, (ENTERED, LAUNCHES[-1][1][6:9])
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    ml._forward_kernel.fn.add_pre_run_hook(lambda *a, **k: seen.append("pre"))
    del ENTERED[:]
    forward()
    assert ENTERED == ["jit"] and seen == ["pre"], (ENTERED, seen)
    toy_kernel_cases(ml.launch)
    print("ok")


def toy_kernel_cases(launch) -> None:
    """Each case: calls that store a launch, a change, then the same call through Triton's
    route and through ``launch``, which must launch the same compiled kernel (signature,
    constants, options) with the same grid and arguments."""
    import triton
    import triton.language as tl

    two = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]

    @triton.autotune(configs=list(two), key=["n"])
    @triton.jit
    def toy(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale, mask=offs < n)

    @triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=[])
    @triton.jit
    def described(x_desc, y_ptr, BLOCK: tl.constexpr):  # a host tensor descriptor: unhashable
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs[:, None] * 16 + tl.arange(0, 16)[None, :], x_desc.load([tl.program_id(0) * BLOCK, 0]))

    for kernel in (toy, described):
        kernel.cache_results = False
    pick = [1]  # the config a tuning of toy picks: the change below can make it another
    toy._bench = lambda *args, config, **kwargs: [1.0 if config is toy.configs[pick[0]] else 2.0]
    x, y = torch.randn(64), torch.empty(64)
    grid = lambda meta: (triton.cdiv(64, meta["BLOCK"]),)  # noqa: E731

    def launched(route, kernel, *args, **kwargs):
        del LAUNCHES[:]
        if route == "triton":
            kernel[grid](*args, **kwargs)
        else:
            launch(kernel, grid, *args, **kwargs)
        compiled, arguments = LAUNCHES[-1]
        values = tuple((a.data_ptr(), a.dtype, tuple(a.shape)) if isinstance(a, torch.Tensor) else a
                       for a in arguments[9:])
        return (compiled.src.signature, compiled.src.constants, compiled.metadata.debug,
                compiled.metadata.enable_fp_fusion, arguments[:3], values)

    def same(label, change, *args, kernel=toy, stored=((x, y, 64, 2.0), {}), **kwargs):
        toy.configs, toy.keys, pick[0] = list(two), ["n"], 1
        toy.cache.clear()
        _LAUNCHES_OF(kernel).clear()
        for _ in range(2):
            launch(kernel, grid, *stored[0], **stored[1])
        change()
        want = launched("triton", kernel, *args, **kwargs)
        got = launched("launch", kernel, *args, **kwargs)
        assert got == want, f"{label}:\n  triton {want}\n  launch {got}"

    nothing = lambda: None  # noqa: E731
    same("the same call", nothing, x, y, 64, 2.0)
    same("configs cut to one, the autotuner's cache kept", lambda: setattr(toy, "configs", two[:1]),
         x, y, 64, 2.0)
    same("key names changed", lambda: (setattr(toy, "keys", ["scale"]), pick.__setitem__(0, 0)), x, y, 64, 2.0)
    for first, then in [(2, 2.0), (1, True), (True, 1.0), (0, 0.0)]:  # equal keys, other types
        same(f"scale {first!r} then {then!r}", nothing, x, y, 64, then, stored=((x, y, 64, first), {}))
        same(f"scale={first!r} then scale={then!r}", nothing, x, y, 64, scale=then,
             stored=((x, y, 64), {"scale": first}))
    same("the kernel's own debug flag", lambda: setattr(toy.fn, "debug", True), x, y, 64, 2.0)
    toy.fn.debug = False
    fusion = knobs.language.default_fp_fusion

    def recompile():  # how Triton is made to compile again with new options
        knobs.language.default_fp_fusion = not fusion
        toy.fn.device_caches.clear()

    try:
        same("the JIT function's caches dropped", recompile, x, y, 64, 2.0)
    finally:
        knobs.language.default_fp_fusion = fusion
    # an unhashable argument Triton takes: launched each time the slow way, no error
    from triton.tools.tensor_descriptor import TensorDescriptor

    x2, y2 = torch.randn(64, 16), torch.empty(64, 16)
    descriptor = TensorDescriptor.from_tensor(x2, [16, 16])
    same("a tensor descriptor", nothing, descriptor, y2, kernel=described, stored=((descriptor, y2), {}))
    hooks = knobs.runtime.launch_enter_hook
    for assigned in (None, lambda metadata: None):  # a hook set by assignment, not .add
        knobs.runtime.launch_enter_hook = assigned
        try:
            same(f"launch_enter_hook = {assigned!r}", nothing, x, y, 64, 2.0)
        finally:
            knobs.runtime.launch_enter_hook = hooks


def _LAUNCHES_OF(kernel) -> dict:
    from tunecomp.kernels import masked_lowrank as ml

    return ml._LAUNCHES.setdefault(kernel, {})


if __name__ == "__main__":
    main()
