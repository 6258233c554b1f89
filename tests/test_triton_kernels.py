"""Triton-only checks (tunecomp.kernels): availability rules and the GPU config sets. The
numerical battery, shared with the other backends, is tests/test_kernels.py."""

import os
import warnings

import torch

# Triton picks interpreter or compiler when kernels are decorated: decide before any import
# of triton (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

kernels = pytest.importorskip("tunecomp.kernels")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def test_unavailable_reason():
    assert kernels.unavailable_reason(DEVICE, torch.float64) is not None
    assert kernels.unavailable_reason(DEVICE, torch.int32) is not None
    assert kernels.unavailable_reason(torch.device("meta"), torch.float32) is not None
    if not CUDA:
        assert kernels.unavailable_reason("cpu", torch.float32) is None
        assert "bfloat16" in kernels.unavailable_reason("cpu", torch.bfloat16)
    else:
        assert kernels.unavailable_reason("cuda", torch.bfloat16) is None


def test_host_integer_helpers_match_triton():
    # the grids, autotune keys and token splits use these instead of Triton's (slow from host code)
    import triton

    for n in [*range(1, 300), 4095, 4096, 4097, 12608, 50432, 2**31 + 1]:
        assert kernels.next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128, 1024):
            assert kernels.cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_interpreter_flag_read_as_triton_reads_it(monkeypatch):
    """TRITON_INTERPRET=yes makes Triton interpret (its own parsing takes "yes"), so the
    backend must see it set too."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "yes")
    assert kernels._interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels._interpreting()


def test_bf16_refused_under_the_interpreter_on_cuda_tensors_too(monkeypatch):
    """The interpreter copies CUDA tensors to the host and runs the same numpy tl.dot, which
    is wrong on bfloat16: refused on either device while TRITON_INTERPRET is set. (On a GPU
    the kernels may be imported compiled already: set aside, as in a fresh process.)"""
    import sys

    monkeypatch.delitem(sys.modules, "tunecomp.kernels.masked_lowrank", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in ("cuda", "cpu"):
        assert "bfloat16" in (kernels.unavailable_reason(device, torch.bfloat16) or ""), device
        assert kernels.unavailable_reason(device, torch.float16) is None, device


@pytest.mark.skipif(CUDA, reason="the interpreter's copy of the kernels runs on the CPU")
@pytest.mark.parametrize("blended", [False, True], ids=["plain", "blended"])
@pytest.mark.parametrize("in_features, out_features", [(5, 0), (0, 5)])
def test_backward_with_no_features(in_features, out_features, blended):
    """in or out features 0 (ops takes them): empty factor gradients, no division by zero in
    the token split, and what the torch backend gives."""
    from tunecomp import ops

    torch.manual_seed(0)
    x = torch.randn(40, in_features, requires_grad=True)
    u = torch.randn(out_features, 3, requires_grad=True)
    v = torch.randn(in_features, 3, requires_grad=True)
    extra = dict(teacher_weight=torch.randn(out_features, in_features), teacher_bias=None, alpha=0.5) if blended else {}
    results = []
    for backend in ("triton", "torch"):
        op = ops.blended_lowrank_linear if blended else ops.masked_lowrank_linear
        y = op(x, u, v, None, None, None, backend=backend, **extra)
        grads = torch.autograd.grad(y.sum() + (x.sum() * 0), (x, u, v), allow_unused=True)
        results.append((y, grads))
    (y, grads), (want_y, want_grads) = results
    assert y.shape == want_y.shape == (40, out_features) and torch.allclose(y, want_y)
    for got, want in zip(grads, want_grads):
        assert got.shape == want.shape and torch.allclose(got, want)


@pytest.mark.parametrize("rank", [1, 7, 64, 128, 200, 256, 384])
def test_config_pruning_keeps_a_config_for_every_rank(rank):
    """The GPU config sets (checked here without a GPU): large ranks keep only thin tiles, and
    pruning never leaves the autotuner empty."""
    from tunecomp.kernels import blended_lowrank, masked_lowrank

    r_pad = masked_lowrank.rank_pad(rank)
    for gpu_configs in (masked_lowrank.FORWARD_GPU_CONFIGS,
                        blended_lowrank.BLENDED_FORWARD_GPU_CONFIGS):
        kept = masked_lowrank.prune_forward_configs(gpu_configs, {"rank": rank})
        assert kept and kept[-1] is gpu_configs[-1]
        # T [BLOCK_M, padded rank] in fp32 takes at most 160 of a thread's 255 registers (128-row
        # tiles at rank 384 did not fit an H100's shared memory: benchmarks/kernel_resources.py)
        for c in kept[:-1]:
            assert c.kwargs["BLOCK_M"] * r_pad <= 160 * 32 * c.num_warps, (rank, c)
        # Ranks of several chunks keep only tiles under 64 rows (chained_chunks_ok: two
        # 64-row configs computed wrong outputs on an H200); one-chunk ranks keep the others.
        wide = [c for c in kept if c.kwargs["BLOCK_M"] >= 64]
        if len(masked_lowrank.rank_chunks(rank)) > 1:
            assert not wide, (rank, wide)
        elif rank <= 128:
            assert wide, rank


@pytest.mark.skipif(CUDA, reason="with a GPU the GPU tests compile and run the kernels for real")
def test_forward_at_rank_192_has_a_t_holding_config_with_loads_in_flight(tmp_path):
    """At the benchmark grid's rank (192, held as 128 + 64, bf16) the forward keeps a config that
    holds T across a whole 768-wide output row, fits an H100's shared memory, does not spill,
    and keeps a load in flight on every operand (at least 2 buffers per ring, no synchronous
    tile load). A masked factor tile gets num_stages - 1 buffers, so a 2-stage config waits
    for every load: the 0.17 ms pick on an H200 was one, the only T-holding config of the list
    before that fit.
    Compiled for sm_90 by benchmarks/kernel_resources.py (about 15 s), no GPU needed."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TUNECOMP_TRITON_ONE_CONFIG")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "kernel_resources.py"), "--ranks", "192",
         "--dtypes", "bfloat16", "--forward-only", "--no-write", "--print"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    good = []
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 11 or cells[0] != "_forward_kernel" or cells[2] != "128+64":
            continue
        blocks = dict(item.split("=") for item in cells[3].split() if "=" in item)
        holds_t = int(blocks["BLOCK_N"]) * int(blocks["OUT_TILES"]) >= 768
        no_spill, buffers, sync, note = cells[5] == "0", cells[8], cells[9], cells[10]
        if holds_t and no_spill and buffers and int(buffers) >= 2 and sync == "0" and not note:
            good.append(cells[3])
    assert good, proc.stdout[-5000:]


@pytest.mark.skipif(CUDA, reason="on a GPU test_every_gpu_config_on_the_gpu runs them compiled")
@pytest.mark.parametrize("rank", [64, 70, 300])
def test_every_forward_gpu_config_interpreted(rank):
    """Each GPU config of the two forward kernels that pruning keeps at this rank (held as
    64, 64 + 16 or 256 + 32 + 16: one, two and three chunks; only the one-chunk rank keeps the
    64- and 128-row tiles, see chained_chunks_ok), forced on its own under the interpreter:
    the output-tile groups (OUT_TILES), the 128-row tiles and the token, rank and output edges
    compute the op against float64 in fp32 (77 tokens, 200 -> 300, half the entries pruned; no
    block size divides these). Compiled code and the backward configs are checked by
    test_every_gpu_config_on_the_gpu."""
    from kernel_battery import assert_close, fresh_seed, make_problem, reference_lowrank
    from tunecomp.kernels import blended_lowrank, masked_lowrank

    seed = fresh_seed()
    p = make_problem(77, 200, 300, rank, torch.float32, "keep50", DEVICE, teacher=True)
    ref_y, ref_blend_y = reference_lowrank(p)[0], reference_lowrank(p, 0.6)[0]
    args = (p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"])
    ops = ((masked_lowrank._forward_kernel, masked_lowrank.FORWARD_GPU_CONFIGS, ref_y,
            lambda: masked_lowrank.forward(*args)),
           (blended_lowrank._blended_forward_kernel, blended_lowrank.BLENDED_FORWARD_GPU_CONFIGS,
            ref_blend_y, lambda: blended_lowrank.blended_forward(
                *args, p["teacher_weight"], p["teacher_bias"], torch.tensor(0.6))))
    for kernel, gpu_configs, expected, run in ops:
        saved = kernel.configs
        try:
            for config in masked_lowrank.prune_forward_configs(gpu_configs, {"rank": rank}):
                kernel.configs = [config]
                kernel.cache.clear()
                assert_close(f"{kernel.fn.__name__} {config}", run(), expected, torch.float32,
                             seed, 1e-5)
        finally:
            kernel.configs = saved
            kernel.cache.clear()


def test_a_tuned_key_launches_past_the_autotuner(monkeypatch):
    """masked_lowrank.launch: the first call of a key goes through the autotuner; later calls
    find its pick in the autotuner's own cache (so the key built here is the autotuner's) and
    launch it without Autotuner.run; a caller who clears that cache or forces one config is
    obeyed; every result matches float64."""
    from kernel_battery import assert_close, fresh_seed, make_problem, reference_lowrank
    from triton.runtime.autotuner import Autotuner

    from tunecomp.kernels import masked_lowrank as ml

    seed = fresh_seed()
    kernel = ml._forward_kernel
    two = [ml._cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, OUT_TILES=2),
           ml._cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, OUT_TILES=1)]
    monkeypatch.setattr(kernel, "configs", two)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "cache_results", False)  # no disk cache: tuned here
    monkeypatch.setattr(kernel, "_bench", lambda *args, config, **kw: [1.0 if config is two[1] else 2.0])
    autotuner_runs = []
    run = Autotuner.run

    def counted(self, *args, **kwargs):
        autotuner_runs.append(self)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counted)

    def forward_matches(n_tokens):
        p = make_problem(n_tokens, 20, 24, 6, torch.float32, "keep50", DEVICE)
        y = ml.forward(p["x"], p["u"], p["v"], p["bias"], p["mask_u"], p["mask_v"])
        assert_close(f"y, {n_tokens} tokens, {kernel.best_config}", y, reference_lowrank(p)[0],
                     torch.float32, seed, 1e-5)

    forward_matches(37)
    assert len(autotuner_runs) == 1 and len(kernel.cache) == 1 and kernel.best_config is two[1]
    forward_matches(37)
    forward_matches(40)  # the same token bucket: the same key
    assert len(autotuner_runs) == 1 and kernel.best_config is two[1]
    forward_matches(300)  # a new bucket: a new key, tuned
    assert len(autotuner_runs) == 2 and len(kernel.cache) == 2
    kernel.cache.clear()  # as the every-config tests and profile_forward do
    forward_matches(37)
    assert len(autotuner_runs) == 3
    kernel.configs = [two[0]]  # forced: a one-config autotuner runs it untimed
    forward_matches(37)
    assert kernel.best_config is two[0]
    # every autotuned kernel names its key arguments among its parameters
    for name, tuned, _ in kernels.autotuned():
        assert all(k in tuned.arg_names for k in tuned.keys), name


@pytest.mark.parametrize("route", ["two-branch", "folded"])
def test_launch_builds_the_autotuners_key_at_every_call_site(monkeypatch, route):
    """Every kernel given two configs, so that launch builds a key: at each of its call sites
    the key launch looks up is the one Autotuner.run checks for the same arguments (dtypes of
    fp32/fp16 tensors and uint8 masks included), and a second pass of the same calls never
    enters Autotuner.run."""
    from triton.runtime.autotuner import Autotuner

    from tunecomp import ops
    from tunecomp.kernels import blended_lowrank as bl, masked_lowrank as ml

    class Recording(dict):  # the keys Autotuner.run checks (in) and launch looks up (get)
        def __init__(self):
            super().__init__()
            self.checked, self.looked_up = [], []

        def __contains__(self, key):
            self.checked.append(key)
            return super().__contains__(key)

        def get(self, key, default=None):
            self.looked_up.append(key)
            return super().get(key, default)

    tuned = {name: kernel for name, kernel, _ in kernels.autotuned()}
    for kernel in tuned.values():
        two = [kernel.configs[0], triton_config_copy(kernel.configs[0])]
        monkeypatch.setattr(kernel, "configs", two)
        monkeypatch.setattr(kernel, "cache", Recording())
        monkeypatch.setattr(kernel, "cache_results", False)
        monkeypatch.setattr(kernel, "_bench", lambda *a, config, _two=two, **kw: [1.0 if config is _two[1] else 2.0])
    compared = []
    real_launch = ml.launch

    def both(kernel, grid, *args, **kwargs):
        kernel[grid](*args, **kwargs)  # Autotuner.run: tunes this key on a miss
        real_launch(kernel, grid, *args, **kwargs)
        compared.append((kernel.fn.__name__, kernel.cache.checked[-1], kernel.cache.looked_up[-1]))
        assert kernel.best_config is kernel.cache[kernel.cache.checked[-1]]

    monkeypatch.setattr(ops, "folding_pays", lambda *shape: route == "folded")
    monkeypatch.setattr(ops, "folding_pays_backward", lambda *shape: route == "folded")

    def steps(n_tokens, dtype, masks):
        g = torch.Generator().manual_seed(n_tokens)
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)  # noqa: E731
        x, u, v, w, b, gy = rnd(n_tokens, 24), rnd(20, 6), rnd(24, 6), rnd(20, 24), rnd(20), rnd(n_tokens, 20)
        mask_u, mask_v = (torch.rand(20, 6, generator=g).to(DEVICE) > 0.5,
                          torch.rand(24, 6, generator=g).to(DEVICE) > 0.5) if masks else (None, None)
        alpha = torch.full((), 0.3, device=DEVICE)
        kernels.forward(x, u, v, b, mask_u, mask_v)
        kernels.backward(gy, x, u, v, mask_u, mask_v, True)
        kernels.blended_forward(x, u, v, None, mask_u, mask_v, w, b, alpha)
        kernels.blended_backward(gy, x, u, v, mask_u, mask_v, w, alpha, False)

    cases = [(5, torch.float32, True), (301, torch.float16, False)]  # 301: the token-split path
    with monkeypatch.context() as patched:
        patched.setattr(ml, "launch", both)
        patched.setattr(bl, "launch", both)
        for case in cases:
            steps(*case)
    names = {name for name, _, _ in compared}
    assert names == {"_forward_kernel", "_rank_project_kernel", "_grad_x_kernel", "_grad_factor_kernel",
                     "_blended_forward_kernel" if route == "two-branch" else "_fold_kernel"}
    assert [(n, a) for n, a, b in compared if a != b] == []
    autotuner_runs = []
    run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **kw: autotuner_runs.append(self) or run(self, *a, **kw))
    for case in cases:
        steps(*case)
    assert autotuner_runs == []


def test_launch_never_reuses_a_config_tuned_for_another_key(monkeypatch):
    """Argument forms the call sites do not use, on a toy kernel: a tensor passed by keyword
    (its dtype is in Autotuner.run's key), a key argument left to its default, and key names
    changed after a first launch. Each gets the config Autotuner.run would pick, never one
    tuned for another key."""
    import triton
    import triton.language as tl

    from tunecomp.kernels.masked_lowrank import launch

    two = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]

    @triton.autotune(configs=two, key=["n", "m"])
    @triton.jit
    def copy(x_ptr, y_ptr, n, scale, m=7, BLOCK: tl.constexpr = 16):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    monkeypatch.setattr(copy, "cache_results", False)
    picks = iter([1, 0, 1, 0])  # the config each tuning picks: every tuning is told apart

    def bench(*args, config, **kwargs):
        return [1.0 if config is two[pick] else 2.0]

    def tune():
        nonlocal pick
        pick = next(picks)

    pick = None
    monkeypatch.setattr(copy, "_bench", bench)
    x, grid = torch.randn(64, device=DEVICE), (lambda meta: (triton.cdiv(64, meta["BLOCK"]),))

    def run(*args, **kwargs):
        y = torch.zeros(64, device=DEVICE)
        launch(copy, grid, x, y, *args, **kwargs)
        assert torch.equal(y, x)
        return copy.best_config

    tune()
    assert run(64, 2.0) is two[1]  # tuned: key (64, fp32, fp32), m left to its default
    assert run(64, 2.0) is two[1] and len(copy.cache) == 1
    tune()  # a tensor scale by keyword: a new key for Autotuner.run, so tuned again
    assert run(64, scale=torch.ones(1, dtype=torch.float16, device=DEVICE)) is two[0]
    assert len(copy.cache) == 2
    copy.keys = ["m"]  # the key changes: m is not passed, so (fp32, fp32), not yet tuned
    tune()
    assert run(64, 2.0) is two[1] and len(copy.cache) == 3


def triton_config_copy(config):
    """Another Config object with the same settings (the autotuner tells configs apart by identity)."""
    import triton

    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=config.num_stages)


def test_factor_gradient_token_split_rule(monkeypatch):
    """tokens_per_split with the GPU constants and an H100's 132 SMs: the ViT-B shapes whose
    [d, r] gradient has fewer 64 x 64 tiles than SMs split into about two programs per SM,
    each a multiple of SPLIT_ALIGN tokens, never more splits than 4 * SPLIT_ALIGN-token
    chunks; the others and small token counts do not split."""
    from tunecomp.kernels import masked_lowrank as ml

    monkeypatch.setattr(ml, "SPLIT_TILE", 64)
    monkeypatch.setattr(ml, "SPLIT_ALIGN", 128)
    monkeypatch.setattr(ml, "_multiprocessor_count", lambda device: 132)
    gpu = torch.device("cuda")
    # dV of a 768-wide input at rank 192: 12 x 3 = 36 tiles -> cdiv(264, 36) = 8 splits
    assert ml.tokens_per_split(256 * 197, 768, 192, gpu) == 6400  # cdiv(6304, 128) * 128
    assert ml.tokens_per_split(8 * 197, 768, 192, gpu) == 512  # only cdiv(1576, 512) = 4 splits
    assert ml.tokens_per_split(197, 768, 192, gpu) == 197  # too few tokens: no split
    assert ml.tokens_per_split(256 * 197, 3072, 192, gpu) == 256 * 197  # 144 tiles >= 132 SMs
    for n, d, r in [(50432, 768, 32), (12608, 2304, 96), (1000, 768, 384), (513, 64, 16)]:
        per_split = ml.tokens_per_split(n, d, r, gpu)
        splits = -(-n // per_split)
        tiles = -(-d // 64) * -(-r // 64)
        assert per_split % 128 == 0, (n, d, r, per_split)
        assert 1 < splits <= min(-(-264 // tiles), -(-n // 512)), (n, d, r, splits)


def test_battery_shapes_take_the_split_path():
    """The shared battery's 301-token shape (tests/test_kernels.py) runs the split factor
    gradients under the interpreter, for dV (24 wide) and dU (70 wide), and the small shapes
    the unsplit ones: both paths are checked against float64 in CI."""
    from tunecomp.kernels import masked_lowrank as ml

    if not ml.BUILT_FOR_INTERPRETER:
        pytest.skip("the GPU's split follows its SM count (test_factor_gradient_token_split_rule)")
    cpu = torch.device("cpu")
    assert ml.tokens_per_split(301, 24, 9, cpu) < 301
    assert ml.tokens_per_split(301, 70, 9, cpu) < 301
    assert ml.tokens_per_split(37, 24, 64, cpu) == 37


def test_dot_precision_follows_torch_fp32_setting(monkeypatch):
    """fp32 dots round as torch's matmuls would in this process: the per-backend setting of
    torch >= 2.9 where it is set (after which the legacy getter raises, so it must not be
    asked), else the legacy one. fp16/bf16 ignore the setting."""
    from tunecomp.kernels import masked_lowrank

    monkeypatch.setattr(masked_lowrank, "BUILT_FOR_INTERPRETER", False)  # the GPU's rule
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision  # restored by hand: monkeypatch cannot undo this attribute
    try:
        for new_api, expected in (("tf32", "tf32"), ("ieee", "ieee")):
            matmul.fp32_precision = new_api
            monkeypatch.setattr(torch, "get_float32_matmul_precision",
                                lambda: pytest.fail("asked the legacy getter"))
            assert masked_lowrank.dot_precision(torch.float32) == expected
            assert masked_lowrank.dot_precision(torch.bfloat16) == "ieee"
        matmul.fp32_precision = "none"  # unset: the legacy setting decides
        for legacy, expected in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda legacy=legacy: legacy)
            assert masked_lowrank.dot_precision(torch.float32) == expected
    finally:
        matmul.fp32_precision = before


@pytest.mark.skipif(CUDA, reason="with a GPU the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """Every GPU config the autotuner keeps, of every Triton kernel, compiles for an H100
    (sm_90) with this Triton, and each call has one that fits its shared memory: a GPU-only
    compile error (which the interpreter cannot show) fails here, in CI. Runs
    benchmarks/kernel_resources.py --quick (bf16, one layer shape, rank 64) in a fresh process:
    compiling needs TRITON_INTERPRET unset before the kernels are imported. It also reads the
    sm_90 kernels of a CUDA build of tunecomp._C, and fails if there are none."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TUNECOMP_TRITON_ONE_CONFIG")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "kernel_resources.py"), "--quick",
         "--no-write", "--print"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "; 0 problems" in proc.stdout, proc.stdout[-3000:]
    compiled = int(proc.stdout.split("kernel compiles (")[1].split()[0])
    assert compiled >= 6, proc.stdout  # one binary per kernel and the split factor gradients
    assert "| _grad_factor_kernel (token split) | bfloat16 |" in proc.stdout, proc.stdout[-3000:]
    from tunecomp import _C

    if _C.with_cuda:  # the CUDA C++ kernels were built: read for sm_90
        assert " CUDA C++ kernels;" in proc.stdout, proc.stdout


@pytest.mark.skipif(CUDA, reason="measures the host path with launches stubbed: for a machine without a GPU")
def test_host_overhead_script_runs():
    """benchmarks/host_overhead.py, the command behind KERNEL_LOG's host-time rows, runs
    without a GPU (a fresh process: it compiles for sm_90) and prints its three rows."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TUNECOMP_TRITON_ONE_CONFIG")}
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_overhead.py"), "--reps", "2",
                           "--rank", "64"], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\| (forward|backward|blend fold) .*\| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| -?[0-9.]+ \(",
                      proc.stdout, re.M)
    assert rows == ["forward", "backward", "blend fold"], proc.stdout


def test_direct_launches_match_tritons_own(tmp_path):
    """masked_lowrank.launch's direct way (past Autotuner.run and JITFunction.run) launches,
    at every call site of the backend, the same compiled kernel with the same grid, stream and
    arguments as Triton's route, tells a misaligned x from an aligned one, and steps aside for
    a cleared autotuner cache, a launch hook and a pre-run hook; on a toy kernel, it follows
    Triton through a config list cut to one, renamed key arguments, dropped JIT caches, the
    kernel's debug flag, equal values of other types, an unhashable argument and an assigned
    hook: tests/launch_parity.py, in a fresh process (it compiles for sm_90 with launches
    recorded; about 40 s)."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TUNECOMP_TRITON_ONE_CONFIG")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "launch_parity.py")],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.skipif(CUDA, reason="with a GPU the GPU tests compile and run the kernels for real")
def test_largest_fp32_rank_fits_shared_memory_on_sm90(tmp_path):
    """At the largest rank the Triton forward takes in fp32, some config the autotuner keeps
    fits the smallest opt-in shared memory of the GPUs it runs on (sm_86/89's 99 KiB), or the
    first call there fails with OutOfResources. (At R_PAD 1024 every config within the
    register budget exceeded even an H100's: the single-stage config is kept for that.)"""
    import subprocess
    import sys

    pytest.importorskip("triton")
    from tunecomp.kernels import SMALLEST_OPT_IN_SHARED, max_rank

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TUNECOMP_TRITON_ONE_CONFIG")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "kernel_resources.py"), "--ranks", str(max_rank(torch.float32)),
         "--dtypes", "float32", "--forward-only", "--max-shared", str(SMALLEST_OPT_IN_SHARED), "--no-write", "--print"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "; 0 problems" in proc.stdout, proc.stdout[-3000:]
    assert "| _forward_kernel | float32 | 512 |" in proc.stdout, proc.stdout[-3000:]


def test_rank_beyond_the_forward_limit_is_refused():
    from tunecomp import ops
    from tunecomp.kernels import max_rank

    assert (max_rank(torch.float32), max_rank(torch.bfloat16), max_rank(torch.float16)) == (512, 1024, 1024)
    device = torch.device("cuda" if CUDA else "cpu")
    if ops.available_backends(device, torch.float32)["triton"] is not None:
        pytest.skip("Triton does not run here")
    assert ops.resolve_backend("triton", device, torch.float32, rank=512) == "triton"
    assert ops.resolve_backend("triton", device, torch.float16, rank=1024) == "triton"
    with pytest.raises(ValueError, match="it takes rank <= 512 in torch.float32, got rank 513"):
        ops.resolve_backend("triton", device, torch.float32, rank=513)


def test_auto_passes_over_triton_beyond_its_rank(monkeypatch):
    """ops: "auto" skips Triton for a rank its forward cannot take; naming it is refused."""
    from tunecomp import ops

    device = torch.device("cuda" if CUDA else "cpu")
    if ops.available_backends(device, torch.float32)["triton"] is not None:
        pytest.skip("Triton does not run here")
    monkeypatch.setitem(ops._AUTO_ORDER, device.type, ("triton", "torch"))
    assert ops.resolve_backend("auto", device, torch.float32, rank=512) == "triton"
    assert ops.resolve_backend("auto", device, torch.float32, rank=513) == "torch"
    x, u, v = (torch.randn(*s, device=device) for s in ((3, 8), (4, 513), (8, 513)))
    with pytest.raises(ValueError, match="backend='triton' is not available .* it takes rank <= 512 in "
                                         "torch.float32, got rank 513. Use backend='auto' or one of"):
        ops.masked_lowrank_linear(x, u, v, backend="triton")
    y = ops.masked_lowrank_linear(x, u, v, backend="auto")  # runs on "torch"
    assert torch.allclose(y, (x @ v) @ u.T, rtol=1e-4, atol=1e-4)


def test_one_config_mode_gives_each_kernel_one_gpu_config():
    """TUNECOMP_TRITON_ONE_CONFIG=1 (the GPU test runs): every kernel's autotuner holds one of
    its GPU configs, so no test shape autotunes. Checked in a fresh process, as the switch
    is read at import (no GPU is needed to import the compiled kernels)."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("from tunecomp.kernels import autotuned\n"
            "for name, kernel, gpu_configs in autotuned():\n"
            "    assert len(kernel.configs) == 1 and kernel.configs[0] in gpu_configs, name\n"
            "    print(name, kernel.configs[0])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TUNECOMP_TRITON_ONE_CONFIG"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 6, proc.stdout


def test_every_autotuned_kernel_keeps_its_choice_on_disk():
    """Compiled (not interpreted), every kernel's autotuner writes its choice to Triton's disk
    cache, so a later process on the same machine does not time the configs again. Checked
    in a fresh process: the interpreter turns the cache off."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("from tunecomp.kernels import autotuned\n"
            "for name, kernel, _ in autotuned():\n"
            "    assert kernel.cache_results is True, name\n"
            "    print(name)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TUNECOMP_TRITON_ONE_CONFIG")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 6, proc.stdout


# kernels.autotuned()'s names (checked below), one test each so that gpu_check's shards share
# the compiling: all six in one test ran past a shard's 150 s cap in fp32 (H200, 2026-11-27).
AUTOTUNED = ("forward", "rank projection", "grad x", "grad factor", "blended forward", "fold")


def test_autotuned_names():
    assert tuple(name for name, _, _ in kernels.autotuned()) == AUTOTUNED


@pytest.mark.gpu
@pytest.mark.parametrize("kernel_name", AUTOTUNED)
@pytest.mark.parametrize("dtype, rank", [(torch.bfloat16, 70), (torch.float32, 70), (torch.bfloat16, 300)],
                         ids=["bf16-r70", "fp32-r70", "bf16-r300"])
def test_every_gpu_config_on_the_gpu(dtype, rank, kernel_name):
    """Each GPU config of the kernel that autotuning would consider at this rank, forced on
    its own (no timing), computes the op: masked and blended, forward and backward, against
    float64, on shapes no block size divides (77 and 1077 tokens, 200 -> 300; rank 70 or 300,
    held as 64 + 16 or 256 + 32 + 16, where only thin tiles are kept; at 1077 tokens the factor
    gradients split over tokens, at 77 they do not) with half the entries pruned. The rest
    of the GPU battery runs one config per kernel (TUNECOMP_TRITON_ONE_CONFIG, set by
    conftest.py), and autotuning in normal use only ever runs the configs it picks. A config
    too big for the shared memory is skipped, as the autotuner skips it; the kernel must
    have configs that run. Every config is tried before the test fails, and those that
    ``chained_chunks_ok`` removes at this rank are run too, to report in a warning whether
    they compute right here (a failure among them does not fail the test)."""
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    from triton.runtime.errors import OutOfResources

    from kernel_battery import assert_close, check_backward, fresh_seed, make_problem, reference_lowrank
    from tunecomp.kernels import blended_lowrank, masked_lowrank

    seed = fresh_seed()
    for d in (200, 300):  # dV, dU: split at 1077 tokens, whole at 77
        assert masked_lowrank.tokens_per_split(1077, d, rank, DEVICE) < 1077
        assert masked_lowrank.tokens_per_split(77, d, rank, DEVICE) == 77
    alpha = 0.6
    problems = []
    for n in (77, 1077):
        p = make_problem(n, 200, 300, rank, dtype, "keep50", DEVICE, teacher=True)
        problems.append((n, p, reference_lowrank(p), reference_lowrank(p, alpha)))
    a = torch.tensor(alpha, device=DEVICE)
    bound = 1e-2 if dtype == torch.bfloat16 else (1e-5 if masked_lowrank.dot_precision(dtype) == "ieee" else 5e-3)
    too_big, ran, wrong, removed_wrong, removed_right = [], {}, [], [], []
    for name, kernel, gpu_configs in kernels.autotuned():
        if name != kernel_name:
            continue
        removed = []
        if kernel.early_config_prune is not None:  # as the autotuner would at this rank
            kept = kernel.early_config_prune(gpu_configs, {"rank": rank})
            # and, only to report them, the configs removed for chaining rank chunks in wide tiles
            r_pad = masked_lowrank.rank_pad(rank)
            removed = [c for c in gpu_configs
                       if c not in kept and masked_lowrank._within_budget(c, r_pad)]
            gpu_configs = kept
        saved = kernel.configs
        try:
            for config in gpu_configs + removed:
                kernel.configs = [config]  # a one-config autotuner runs it without timing
                kernel.cache.clear()
                is_removed = config in removed
                for n, p, (ref_y, ref_grads), (ref_blend_y, ref_blend_grads) in problems:
                    where = f"{name} {config} at {n} tokens (seed {seed})"
                    args = (p["x"], p["u"], p["v"])
                    masks = (p["mask_u"], p["mask_v"])
                    try:
                        y = masked_lowrank.forward(*args, p["bias"], *masks)
                        grads = masked_lowrank.backward(p["grad_y"], *args, *masks, True)
                        blend_y = blended_lowrank.blended_forward(*args, p["bias"], *masks, p["teacher_weight"],
                                                                  p["teacher_bias"], a)
                        blend_grads = blended_lowrank.blended_backward(p["grad_y"], *args, *masks,
                                                                       p["teacher_weight"], a, True)
                    except OutOfResources as error:  # the autotuner skips such a config too
                        too_big.append(f"{where}: {error}")
                        break
                    try:
                        assert_close("y", y, ref_y, dtype, seed, bound)
                        check_backward(grads, p, ref_grads, dtype, seed, True, bound)
                        assert_close("blended y", blend_y, ref_blend_y, dtype, seed, bound)
                        check_backward(blend_grads, p, ref_blend_grads, dtype, seed, True, bound)
                    except AssertionError as error:  # every config is tried before failing
                        (removed_wrong if is_removed else wrong).append(f"{where}, rank {rank}: {error}")
                        break
                else:
                    if is_removed:
                        removed_right.append(f"{name} {config}")
                    else:
                        ran[name] = ran.get(name, 0) + 1
        finally:
            kernel.configs = saved
            kernel.cache.clear()
    print(f"{sum(ran.values())} configs checked; too big for shared memory: {too_big or 'none'}")
    if removed_wrong or removed_right:  # what the next change to chained_chunks_ok needs to know
        warnings.warn(f"rank {rank}, {dtype}: configs chained_chunks_ok removes; wrong here: "
                      f"{removed_wrong or 'none'}; right here: {removed_right or 'none'}")
    assert not wrong, "\n".join(wrong)
    assert ran.get(kernel_name), (ran, too_big)  # some config of it ran
