"""The accuracy-comparison script on a tiny budget: it runs, and writes tables, plots, JSON
and the README block."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accuracy", "reproduce.py")


@pytest.mark.slow
def test_reproduce_script_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{reproduce.BEGIN}\nold numbers\n{reproduce.END}\noutro\n")
    out = tmp_path / "results"
    reproduce.main(["--steps", "4", "--methods", "svd-ft,tunecomp", "--levels", "0.5", "--sweep", "0.5",
                    "--seeds", "0,1", "--out", str(out), "--readme", str(readme)])
    for name in ("results.json", "results.md", "accuracy_vs_compression.png", "accuracy_vs_rho.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4 and len(results["sweep_runs"]) == 2
    assert {tuple(r["key"]) for r in results["comparison"]} == {("svd-ft", 0.5), ("tunecomp", 0.5)}
    assert results["meta"]["device"] and results["meta"]["date"]
    text = readme.read_text()
    assert "old numbers" not in text and "| **tunecomp** |" in text and text.endswith("outro\n")
    assert "](results/accuracy_vs_compression.png)" in text
    # re-rendering from the JSON gives the same table
    before = (out / "results.md").read_text()
    reproduce.main(["--from-json", str(out / "results.json"), "--readme", ""])
    assert (out / "results.md").read_text() == before
