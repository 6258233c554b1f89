"""benchmarks/model_bench.py on its tiny grid: it runs and writes the results files."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_bench_smoke(tmp_path):
    env = dict(os.environ, TUNECOMP_MODEL_GRID="smoke", TUNECOMP_RESULTS_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks", "model_bench.py"),
                             "-q", "-p", "no:cacheprovider"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (json_file,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(json_file.read_text())
    rows = data["rows"]
    assert {r["variant"] for r in rows} == {"dense", "params 50%", "params 50%, rho 0.9",
                                            "params 50%, rho 0.5 2:4"}
    for r in rows:  # each form stores little beyond its kept entries (and their positions)
        assert 1.0 <= r["file_bytes"] / r["needed_bytes"] < 1.1, r
    dense = next(r for r in rows if r["variant"] == "dense")
    for r in rows:
        assert r["median_s"] > 0 and r["speedup_vs_dense"] > 0
        # eager compressed cases are timed in rounds alternating with the dense model's
        assert (r["paired_speedup_vs_dense"] is None) == (r["variant"] == "dense")
        if r["variant"] != "dense":
            assert r["speedup_vs_dense"] == r["paired_speedup_vs_dense"] > 0
        if r["variant"] != "dense":  # compressed: fewer parameters and a smaller file
            assert r["params"] < dense["params"] and r["file_bytes"] < dense["file_bytes"]
    meta = data["meta"]
    assert meta["device"].startswith("CPU ") and meta["device"].endswith(" threads") and meta["date"]
    assert {"python", "torch", "cuda", "triton", "tunecomp"} <= set(meta)  # where it was measured
    assert json_file.stem.startswith("model-cpu-") and json_file.stem.endswith(meta["date"])
    assert "| variant |" in json_file.with_suffix(".md").read_text()


def test_model_bench_stops_starting_cases_when_the_budget_is_spent(tmp_path):
    env = dict(os.environ, TUNECOMP_MODEL_GRID="smoke", TUNECOMP_RESULTS_DIR=str(tmp_path),
               TUNECOMP_BENCH_BUDGET_S="0")
    result = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks", "model_bench.py"),
                             "-q", "-rs", "-p", "no:cacheprovider"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "8 skipped" in result.stdout and "time budget spent" in result.stdout
    assert not list(tmp_path.iterdir())  # nothing measured, no results file
