"""The kernel benchmark suite and its report, end to end on the tiny CPU "smoke" grid.

Checks the plumbing, not the speed: the suite runs under pytest-benchmark and writes its JSON,
``benchmarks/report.py`` turns that into the results .json/.md with every field the GPU run
relies on, and the numbers are sane (finite, positive, the byte floor and FLOPs as defined).
"""

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env, timeout):
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _benchmarks_module(name):
    """A module of benchmarks/ (not a package), imported with that folder on the path."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_benchmark_suite_and_report_on_cpu(tmp_path):
    env = dict(os.environ, TUNECOMP_BENCH_GRID="smoke", TUNECOMP_BENCH_BACKENDS="torch",
               CUDA_VISIBLE_DEVICES="",
               # One thread: on a shared 2-core machine OpenMP barriers turn into scheduler
               # ticks (ms per op); this test is about the plumbing, not CPU speed.
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py; the smoke grid needs no Triton
    bench = tmp_path / "bench.json"
    _run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
          f"--benchmark-json={bench}"], env, timeout=240)
    out = tmp_path / "results"
    _run([sys.executable, "benchmarks/report.py", str(bench), "--out-dir", str(out)], env, timeout=60)

    (json_path,), (md_path,) = list(out.glob("*.json")), list(out.glob("*.md"))
    assert json_path.stem == md_path.stem
    assert re.fullmatch(r"cpu-[a-z0-9-]+-\d{4}-\d{2}-\d{2}", json_path.stem), json_path.stem
    results = json.loads(json_path.read_text())
    assert results["device"].startswith("CPU")
    assert json_path.stem == f"{results['device_slug']}-{results['date']}"
    assert results["grid"] == "smoke" and results["dtype"] == "float32"
    assert {"torch", "triton", "tunecomp"} <= set(results["versions"])
    assert _positive(results["ceilings"]["copy_gb_s"])
    assert _positive(results["ceilings"]["matmul_tflop_s"])
    assert results["backends"] == ["torch"]
    assert results["skipped"] == [] and results["failed"] == []

    points = results["points"]
    measured = {(p["impl"], p["op"], p["direction"]) for p in points}
    for op, impls in (("masked", ("torch", "eager", "compile", "dense")), ("blended", ("torch", "eager"))):
        for direction in ("fwd", "fwd+bwd"):
            for impl in impls:
                assert (impl, op, direction) in measured
    for p in points:
        for key in ("median_s", "min_s", "gb_s", "tflop_s", "bytes", "flops", "byte_floor_s",
                    "pct_byte_floor", "pct_roofline"):
            assert _positive(p[key]), (key, p)
        assert p["k"] >= 1 and p["rounds"] >= 1 and p["dtype"] == "float32"
        if p["role"] == "backend":
            expected = {"eager", "compile", "dense"} if p["op"] == "masked" else {"eager"}
            assert set(p["speedup"]) == expected, p
            assert all(_positive(r) for r in p["speedup"].values()), p
            # The smoke grid is paired: its ratios come from the backend case's own rounds.
            assert set(p["paired"]) == expected, p
            for impl, pair in p["paired"].items():
                assert _positive(pair["median_s"]) and p["speedup"][impl] == pair["speedup"], (impl, p)

    # The byte floor and FLOPs as benchmarks/README.md defines them, at one point.
    (p,) = [p for p in points if (p["impl"], p["op"], p["direction"], p["tokens"], p["rho"])
            == ("torch", "masked", "fwd", 40, 0.5)]
    n, n_in, n_out, r = 40, 64, 96, 8
    assert (p["in_features"], p["out_features"], p["rank"]) == (n_in, n_out, r)
    assert p["bytes"] == 4 * (n * n_in + n * n_out + r * (n_in + n_out) + n_out) + r * (n_in + n_out)
    assert p["flops"] == round(2 * n * r * (n_in + n_out) * (1 - 0.5))  # products of kept entries

    geomeans = {(g["backend"], g["op"], g["direction"]): g for g in results["geomeans"]}
    assert _positive(geomeans[("torch", "masked", "fwd")]["speedup"]["compile"])
    statuses = {t["name"]: t["status"] for t in results["targets"]}
    assert len(statuses) == 5 and not results["targets_apply"]
    assert statuses["masked fwd, >= 8192 tokens: % of byte floor at every point"] == "NOT MEASURED"
    for name, status in statuses.items():
        if "8192" not in name:
            assert status in ("PASS", "MISS"), (name, status)

    md = md_path.read_text()
    for text in ("## torch: masked fwd", "## torch: blended fwd+bwd", "×compile", "GB/s",
                 "Geometric means", "Informational only", "never edited by hand", "Paired timing"):
        assert text in md
    assert md.count("| torch | ") >= 4 + 5  # geometric-mean rows + target rows

    # A run without torch.compile says so instead of leaving the column silently empty.
    data = json.loads(bench.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"]["impl"] != "compile"]
    data["tunecomp"]["baselines"]["masked"].remove("compile")
    bench.write_text(json.dumps(data))
    _run([sys.executable, "benchmarks/report.py", str(bench), "--out-dir", str(tmp_path / "nc")],
         env, timeout=60)
    md = next((tmp_path / "nc").glob("*.md")).read_text()
    assert "baseline `compile`: not in this run's grid" in md
    assert "torch.compile | **NOT MEASURED**" in md

    # Two kernel backends in one run: the cuda rows carry x-triton ratios and its targets.
    data = json.loads(bench.read_text())
    extra = []
    for b in data["benchmarks"]:
        if b["extra_info"].get("role") == "backend" and b["extra_info"]["impl"] == "torch":
            for impl, slower in (("triton", 1.0), ("cuda", 1.25)):
                c = json.loads(json.dumps(b))
                c["extra_info"]["impl"] = impl
                c["stats"] = {k: v * slower for k, v in b["stats"].items() if k in ("median", "min")} | {"rounds": b["stats"]["rounds"]}
                extra.append(c)
    data["benchmarks"] += extra
    run = data["tunecomp"]
    assert sorted(map(tuple, run["timed_ops"])) == [("torch", op, d) for op in ("blended", "masked")
                                                    for d in ("fwd", "fwd+bwd")]
    run["timed_ops"] += [[impl, op, d] for impl in ("triton", "cuda") for _, op, d in run["timed_ops"]]
    bench.write_text(json.dumps(data))
    _run([sys.executable, "benchmarks/report.py", str(bench), "--out-dir", str(tmp_path / "two")],
         env, timeout=60)
    results = json.loads(next((tmp_path / "two").glob("*.json")).read_text())
    cuda = [p for p in results["points"] if p["impl"] == "cuda"]
    assert cuda and all(abs(p["speedup"]["triton"] - 0.8) < 1e-9 for p in cuda)
    versus_triton = [t for t in results["targets"] if "over triton" in t["name"]]
    assert {t["backend"] for t in versus_triton} == {"cuda"} and len(versus_triton) == 4
    assert all(t["status"] == "MISS" and "short by 12.0%" in t["detail"] for t in versus_triton)  # 0.8 x 1.1
    assert "×triton" in next((tmp_path / "two").glob("*.md")).read_text()

    # A backend that the grid timed on the blend alone (as "torch" on the gpu and cpu grids)
    # gets the blend's target and no rows for the masked op it was never run on.
    data = json.loads(bench.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"]["impl"] == "torch"]
    data["tunecomp"]["timed_ops"] = [["torch", "blended", "fwd"], ["torch", "blended", "fwd+bwd"]]
    bench.write_text(json.dumps(data))
    _run([sys.executable, "benchmarks/report.py", str(bench), "--out-dir", str(tmp_path / "blend")],
         env, timeout=60)
    results = json.loads(next((tmp_path / "blend").glob("*.json")).read_text())
    assert [(t["backend"], t["name"]) for t in results["targets"]] == [
        ("torch", "blended fwd+bwd: geometric-mean speedup over eager blended")]
    assert results["targets"][0]["status"] in ("PASS", "MISS")


def test_a_grid_records_the_baselines_it_times():
    """The results list the baselines each op was planned against: a grid's own, not the
    defaults (the cpu grid leaves torch.compile out)."""
    bench_kernels = _benchmarks_module("bench_kernels")
    cpu = bench_kernels.GRIDS["cpu"]
    assert bench_kernels.grid_baselines(cpu) == {"masked": ("eager", "dense"), "blended": ("eager",)}
    timed = {c.impl for c in bench_kernels.grid_cases(cpu, ("cpu",)) if c.role == "baseline"}
    assert timed == {"eager", "dense"}
    assert bench_kernels.grid_baselines(bench_kernels.GRIDS["gpu"]) == bench_kernels.BASELINES


def test_cpu_grid_report_checks_the_cpu_targets_on_paired_ratios():
    """A "cpu" grid run (synthetic timings): the ratios come from the backend case's paired
    baseline rounds, not the baselines' separate cases; the CPU kernels' targets are checked
    at their own rho only, and the per-point cells below them are bold."""
    report = _benchmarks_module("report")

    def entry(impl, role, rho, median, paired=None):
        info = dict(op="masked", direction="fwd", impl=impl, role=role, in_features=768,
                    out_features=768, tokens=197, rank=0 if impl == "dense" else 192, rho=rho,
                    dtype="float32", bytes=10 ** 6, flops=10 ** 9, k=1)
        if paired:  # here the per-round ratios' median is that of the medians
            info["paired"] = {i: dict(median_s=t, speedup=t / median) for i, t in paired.items()}
        return {"extra_info": info, "stats": {"median": median, "min": median, "rounds": 7}}

    ms = 1e-3
    benchmarks = [
        # rho 0.9: 3x eager, 5x dense (paired) -> both targets pass
        entry("cpu", "backend", 0.9, 1 * ms, {"eager": 3 * ms, "dense": 5 * ms}),
        # rho 0: 1/1.2 = 0.83x eager -> "at most 10% slower" missed by 8.3%
        entry("cpu", "backend", 0.0, 1.2 * ms, {"eager": 1 * ms, "dense": 2 * ms}),
        # rho 0.5 is in no CPU target: its 0.5x must not count for the rho-0 one
        entry("cpu", "backend", 0.5, 2 * ms, {"eager": 1 * ms, "dense": 2 * ms}),
        # the separately timed baselines, at other load: never used for the ratios above
        entry("eager", "baseline", 0.9, 10 * ms), entry("eager", "baseline", 0.0, 10 * ms),
        entry("eager", "baseline", 0.5, 10 * ms), entry("dense", "baseline", 0.0, 10 * ms),
    ]
    bench = {"datetime": "2026-01-01T00:00:00", "benchmarks": benchmarks,
             "tunecomp": {"grid": "cpu", "dtype": "float32", "device_name": "CPU test, 2 threads",
                          "baselines": {"masked": ["eager", "dense"]}, "versions": {}}}
    results = report.build(bench)
    speedups = {p["rho"]: p["speedup"] for p in results["points"] if p["role"] == "backend"}
    assert speedups[0.9] == pytest.approx({"eager": 3.0, "dense": 5.0})
    assert speedups[0.0] == pytest.approx({"eager": 1 / 1.2, "dense": 2 / 1.2})
    assert results["targets_apply"] and "CPU" in results["targets_for"]
    targets = {t["name"]: t for t in results["targets"]}
    assert [t["stat"] for t in targets.values()] == ["min"] * 3
    assert targets["masked fwd, rho 0.9: speedup over dense nn.Linear at every point"]["status"] == "PASS"
    assert targets["masked fwd, rho 0.9: speedup over eager at every point"]["status"] == "PASS"
    rho0 = targets["masked fwd, rho 0: at most 10% slower than eager at every point"]
    assert rho0["status"] == "MISS" and rho0["value"] == pytest.approx(1 / 1.2), rho0
    assert "short by 8.3%" in rho0["detail"] and rho0["points"] == 1

    md = report.markdown(results)
    rows = {line.split(" | ")[3]: line for line in md.splitlines() if line.startswith("| 768→768 | 197 |")}
    assert rows["0"].endswith("| **0.83** | 1.67 |"), rows["0"]  # below the 0.909x target
    assert rows["0.5"].endswith("| 0.50 | 1.00 |"), rows["0.5"]  # no target at rho 0.5
    assert rows["0.9"].endswith("| 3.00 | 5.00 |"), rows["0.9"]
    assert "## Targets (CPU kernels" in md and "Informational only" not in md
    assert "Paired timing" in md and "(target >= 0.909x)" in md
    # fwd+bwd timed with the parameters changing each step (the cpu grid): said once
    assert "update the parameters in place" not in md
    benchmarks[0]["extra_info"]["params_change"] = True
    assert report.markdown(report.build(bench)).count("update the parameters in place") == 1


def _entry(impl, role, tokens, median, op="masked", direction="fwd", rho=0.5):
    """A pytest-benchmark record of bench_kernels (768->768, rank 192) with a given median."""
    info = dict(op=op, direction=direction, impl=impl, role=role, in_features=768,
                out_features=768, tokens=tokens, rank=0 if impl == "dense" else 192, rho=rho,
                dtype="bfloat16", bytes=10 ** 6, flops=10 ** 9, k=1)
    return {"extra_info": info, "stats": {"median": median, "min": median, "rounds": 7}}


def test_gpu_report_verdicts_count_every_point():
    """A "gpu" grid run (synthetic timings) on an H200: a point whose eager case was skipped is
    left out of the verdicts and named, and a verdict that passes without it is INCOMPLETE; a
    backend timed without a single point keeps its rows, NOT MEASURED; cuda within 10% of
    Triton means at most 1.1x its time (0.9025x misses); the same run on the smoke grid is
    informational."""
    report = _benchmarks_module("report")
    us = 1e-6
    benchmarks = [_entry("triton", "backend", 197, 10 * us), _entry("eager", "baseline", 197, 20 * us),
                  _entry("triton", "backend", 12608, 100 * us),  # its eager case was skipped
                  _entry("cuda", "backend", 197, 10 * us / 0.9025),
                  _entry("triton", "backend", 197, 10 * us, "blended"), _entry("cuda", "backend", 197, 20 * us, "blended")]
    timed = [[b, op, d] for b in ("triton", "cuda", "torch") for op, d in (("masked", "fwd"), ("blended", "fwd"))]
    run = {"grid": "gpu", "dtype": "bfloat16", "device_name": "NVIDIA H200", "timed_ops": timed,
           "baselines": {"masked": ["eager"], "blended": ["eager"]}, "versions": {}}
    results = report.build({"datetime": "2026-01-01T00:00:00", "benchmarks": benchmarks, "tunecomp": run})
    assert results["targets_apply"] and results["timed_ops"] == timed
    targets = {(t["backend"], t["name"]): t for t in results["targets"]}
    every = targets[("triton", "masked fwd: speedup over eager at every point")]
    assert every["status"] == "INCOMPLETE" and every["value"] == pytest.approx(2.0), every
    assert "1 of 2 points left out: no eager time" in every["detail"]
    assert targets[("triton", "masked fwd: geometric-mean speedup over eager")]["status"] == "INCOMPLETE"
    assert targets[("torch", "masked fwd: geometric-mean speedup over eager")]["status"] == "NOT MEASURED"
    vs_triton = targets[("cuda", "masked fwd: geometric-mean speedup over triton")]
    assert vs_triton["status"] == "MISS" and vs_triton["value"] == pytest.approx(0.9025), vs_triton
    assert targets[("cuda", "blended fwd: geometric-mean speedup over triton")]["value"] == pytest.approx(0.5)
    md = report.markdown(results)
    assert "| triton | masked | fwd | 2 | 2.00 (1 of 2) | — | — | — |" in md, md
    assert "**INCOMPLETE**" in md and "(target >= 0.909x)" in md
    run["grid"] = "smoke"
    assert not report.build({"datetime": "2026-01-01", "benchmarks": benchmarks, "tunecomp": run})["targets_apply"]


def test_gpu_report_verdicts_count_the_backends_own_skipped_and_failed_cases():
    """Points the backend has no time for (its own case skipped by the time budget, or
    failed) keep a verdict from being a PASS, as a missing baseline does; and a geometric
    mean's MISS with points left out is INCOMPLETE, since they could lift it (a "min" MISS
    stands: a measured point is already below)."""
    report = _benchmarks_module("report")
    us = 1e-6
    fast = [_entry("triton", "backend", 197, 10 * us), _entry("eager", "baseline", 197, 20 * us),
            _entry("compile", "baseline", 197, 20 * us)]

    def case(impl, role, tokens):  # a case's description, as the suite records one it did not time
        return _entry(impl, role, tokens, None)["extra_info"]

    run = {"grid": "gpu", "dtype": "bfloat16", "device_name": "NVIDIA H200", "versions": {},
           "timed_ops": [["triton", "masked", "fwd"]], "baselines": {"masked": ["eager", "compile"]},
           "skipped": [{"case": case(impl, role, 12608), "reason": "time budget spent"}
                       for impl, role in (("triton", "backend"), ("eager", "baseline"))],
           "failed": [{"case": case("triton", "backend", 50432), "error": "RuntimeError: boom"}]}

    def verdicts(benchmarks, run):
        results = report.build({"datetime": "2026-01-01T00:00:00", "benchmarks": benchmarks, "tunecomp": run})
        return {t["name"]: t for t in results["targets"] if t["backend"] == "triton"}

    targets = verdicts(fast, run)
    for name in ("masked fwd: geometric-mean speedup over eager",
                 "masked fwd: geometric-mean speedup over torch.compile",
                 "masked fwd: speedup over eager at every point"):
        assert targets[name]["status"] == "INCOMPLETE", targets[name]
        assert targets[name]["value"] == pytest.approx(2.0)
        assert "2 of 3 points left out: 2 of triton's own cases skipped or failed" in targets[name]["detail"]
    # the >= 8192-token floor target: no point of the backend measured at all
    assert targets["masked fwd, >= 8192 tokens: % of byte floor at every point"]["status"] == "NOT MEASURED"
    # nothing left out: the same timings pass
    complete = dict(run, skipped=[], failed=[])
    assert verdicts(fast, complete)["masked fwd: speedup over eager at every point"]["status"] == "PASS"

    slow = [_entry("triton", "backend", 197, 16 * us), _entry("eager", "baseline", 197, 20 * us),
            _entry("compile", "baseline", 197, 20 * us)]  # 1.25x: under both targets
    targets = verdicts(slow, run)
    geo = targets["masked fwd: geometric-mean speedup over eager"]
    assert geo["status"] == "INCOMPLETE" and "short by" not in geo["detail"], geo
    assert verdicts(slow, complete)["masked fwd: geometric-mean speedup over eager"]["status"] == "MISS"
    slower = [_entry("triton", "backend", 197, 25 * us), *slow[1:]]  # 0.8x: under 0.95 already
    every = verdicts(slower, run)["masked fwd: speedup over eager at every point"]
    assert every["status"] == "MISS" and "short by 15.8%" in every["detail"], every

def test_paired_ratio_is_the_median_over_alternating_rounds(monkeypatch):
    """bench_kernels.measure with baselines paired: each backend round is compared with the
    baseline round just before it, the warm-up round's pair is dropped, and the ratio is the
    median of the per-round ratios (here 2), not the ratio of the medians (3). Timings come
    from a fake clock that the steps advance by a per-round cost."""
    bench_kernels, pairing = _benchmarks_module("bench_kernels"), _benchmarks_module("pairing")
    clock, phase = [0.0], [0]
    # per-call cost (backend, baseline) in each phase: 0 = before the rounds (warm-up and
    # probes), 1 = the warm-up round, then the three timed rounds
    costs = {0: (1.0, 1.0), 1: (1.0, 100.0), 2: (1.0, 2.0), 3: (2.0, 6.0), 4: (20.0, 30.0)}

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock[0]

    class FakeBenchmark:
        extra_info: dict = {}

        def pedantic(self, target, rounds, iterations, warmup_rounds, setup):
            assert iterations == 1
            for _ in range(warmup_rounds + rounds):  # as pytest-benchmark: setup before each round
                phase[0] += 1
                setup()
                target()

    def step(which):
        def run(i):
            clock[0] += costs[phase[0]][which]
        return run

    monkeypatch.setattr(bench_kernels, "time", FakeTime)
    monkeypatch.setattr(pairing, "time", FakeTime)
    monkeypatch.setattr(bench_kernels, "GRID", bench_kernels.replace(bench_kernels.GRIDS["smoke"], rounds=3))
    benchmark = FakeBenchmark()
    bench_kernels.measure(benchmark, step(0), 2, False, {}, {"eager": step(1)})
    assert phase[0] == 4
    pair = benchmark.extra_info["paired"]["eager"]
    assert pair["speedup"] == pytest.approx(2.0)  # median of 2/1, 6/2, 30/20
    assert pair["median_s"] == pytest.approx(6.0)  # median of 2, 6, 30 per call


def test_resources_file_records_its_command_without_the_output_folder(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import kernel_resources

    command = kernel_resources.recorded_command
    assert command([]) == "python benchmarks/kernel_resources.py"
    assert command(["--out-dir", "/some/dir", "--quick"]) == "python benchmarks/kernel_resources.py --quick"
    assert command(["--ranks", "64", "--out-dir=/some/dir", "--print"]) == \
        "python benchmarks/kernel_resources.py --ranks 64 --print"


def test_raise_probe_tells_a_crash_from_an_exception():
    """benchmarks/raise_probe.py (gpu_check's diagnosis of a crashing C++ throw) reports a
    child killed by a signal as such, and an exception by its Python type and message."""
    raise_probe = _benchmarks_module("raise_probe")

    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    crash = run("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert raise_probe.outcome(crash) == "killed by SIGSEGV"
    raised = run("print('building'); print('ValueError: n must be positive')")
    assert raised.returncode == 0 and raise_probe.outcome(raised) == "ValueError: n must be positive"
    failed = run("raise SystemExit('no compiler')")
    assert raise_probe.outcome(failed) == "exit 1: no compiler"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a CUDA device")
def test_sanitize_script_without_cuda_fails_only_when_cuda_is_required(capsys):
    """gpu_check runs it with --require-cuda under compute-sanitizer: a CUDA start-up the
    sanitizer broke must fail the stage, not pass it as "nothing to check"."""
    sanitize_kernels = _benchmarks_module("sanitize_kernels")
    assert sanitize_kernels.main([]) == 0
    assert sanitize_kernels.main(["--require-cuda"]) == 1
    assert capsys.readouterr().out.count("no CUDA device, nothing to check") == 2
