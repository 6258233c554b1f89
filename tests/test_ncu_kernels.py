"""benchmarks/ncu_kernels.py without a GPU: its cases run (on the CPU backends), and its report
turns an ncu raw-page CSV into per-kernel records assigned to their cases."""

import csv
import io
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ncu_kernels(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import ncu_kernels

    return ncu_kernels


def test_every_case_runs_and_computes_the_op(ncu_kernels):
    cases = ncu_kernels.build_cases(device="cpu", dtype=torch.float32, shape=(24, 20, 33), rank=8,
                                    small_tokens=5, backends=("torch", "cpu"))
    expected = ["cpu fwd", "dense fwd", "eager fwd", "torch fwd", "torch blend fwd", "cpu blend fwd",
                "eager fwd+bwd", "torch fwd+bwd", "cpu fwd+bwd", "torch fwd n=5", "cpu fwd n=5"]
    assert list(cases) == expected
    outputs = {name: call() for name, call in cases.items()}
    assert outputs["torch fwd"].shape == (33, 20)
    assert outputs["torch fwd n=5"].shape == (5, 20)
    torch.testing.assert_close(outputs["cpu fwd"], outputs["torch fwd"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["eager fwd"], outputs["torch fwd"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["cpu blend fwd"], outputs["torch blend fwd"], rtol=1e-5, atol=1e-5)
    assert all(outputs[name] is None for name in expected if name.endswith("fwd+bwd"))  # backward() ran


def _raw_csv(kernels, metrics):
    """An ncu ``--csv --page raw`` text: a message line, the header, the units row, the kernels."""
    fixed = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
             "Block Size", "Grid Size", "Device", "CC"]
    names = list(metrics)
    out = io.StringIO()
    out.write("==PROF== Disconnected from process 1\n")
    w = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(fixed + names)
    w.writerow([""] * len(fixed) + [metrics[n] for n in names])
    for i, (name, values) in enumerate(kernels):
        w.writerow([str(i), "7", "python3", "127.0.0.1", name, "1", "7", "(256, 1, 1)", "(99, 1, 1)", "0",
                    "9.0"] + [values.get(n, "") for n in names])
    return out.getvalue()


METRICS = {
    "gpu__time_duration.sum": "nsecond",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "%",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "%",
    "launch__registers_per_thread": "register/thread",
    "launch__shared_mem_per_block_static": "byte/block",  # as ncu writes them
    "launch__shared_mem_per_block_dynamic": "Kbyte/block",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "%",
    "sm__inst_issued.avg.pct_of_peak_sustained_active": "%",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "%",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": "%",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": "ratio",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": "ratio",
    "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio": "ratio",
    "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio": "ratio",
    "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio": "ratio",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum": "",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum": "",
}

MARK = "_ncu_case_marker"
FORWARD = "_forward_kernel"
GEMM = "void tunecomp::cuda_kernels::masked_gemm_kernel<__nv_bfloat16, (int)1>(tunecomp::cuda_kernels::GemmParams)"


def _kernels():
    forward = {"gpu__time_duration.sum": "1,234,567", "sm__throughput.avg.pct_of_peak_sustained_elapsed": "12.5",
               "launch__registers_per_thread": "232", "launch__shared_mem_per_block_static": "0",
               "launch__shared_mem_per_block_dynamic": "98.30",
               "smsp__issue_active.avg.pct_of_peak_sustained_active": "41.5",
               "sm__inst_issued.avg.pct_of_peak_sustained_active": "40.1",
               "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "3.1",
               "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": "9.8",
               "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": "7.25",
               "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": "2.5",
               "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio": "1",
               "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio": "0.5",
               "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio": "4",
               "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum": "1,000",
               "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum": "24"}
    gemm = {"gpu__time_duration.sum": "2000", "dram__throughput.avg.pct_of_peak_sustained_elapsed": "n/a",
            "sm__inst_issued.avg.pct_of_peak_sustained_active": "22.0"}
    return [(MARK, {}), (FORWARD, forward), (MARK, {}), (GEMM, gemm), (GEMM, gemm)]


def test_report_assigns_kernels_to_cases_and_reads_ncu_numbers(ncu_kernels, tmp_path):
    kernels = ncu_kernels.parse_raw_csv(_raw_csv(_kernels(), METRICS))
    assert len(kernels) == 5
    records = ncu_kernels.summarize(kernels, ["triton fwd", "cuda fwd"])
    assert [r["case"] for r in records] == ["triton fwd", "cuda fwd", "cuda fwd"]
    forward, gemm = records[0], records[1]
    assert forward["us"] == pytest.approx(1234.567)
    assert forward["sm_pct"] == 12.5 and forward["registers"] == 232
    assert forward["shared_kib"] == pytest.approx(98300 / 1024)  # byte/block + Kbyte/block
    assert forward["issue_pct"] == 41.5 and gemm["issue_pct"] == 22.0  # else issue slots busy
    assert forward["tensor_pct"] == 9.8  # the busier of the two tensor pipes
    assert list(forward["stalls"]) == ["long_scoreboard", "wait", "barrier", "mio_throttle"]  # not "selected"
    assert forward["shared_bank_conflicts"] == 1024
    assert gemm["kernel"] == "masked_gemm_kernel<bf16,(int)1>"
    assert gemm["us"] == 2.0 and gemm["dram_pct"] is None and gemm["shared_kib"] is None
    assert gemm["stalls"] == {} and gemm["shared_bank_conflicts"] is None

    info = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "dtype": "torch.bfloat16",
            "torch": "2.11", "triton": "3.6", "tunecomp": "0.1", "cuda": "13.0",
            "shape": {"in": 768, "out": 768, "tokens": 12608, "rank": 192, "small_tokens": 197, "kept": 0.5},
            "cases": ["triton fwd", "cuda fwd"], "unavailable": {}}
    path = ncu_kernels.write_results(kernels, info, str(tmp_path))
    assert os.path.basename(path) == "ncu-nvidia-h100-80gb-hbm3-2026-11-26.md"
    text = open(path).read()
    assert "| triton fwd | `_forward_kernel` | (99, 1, 1) × (256, 1, 1) | 1234.6 | 12 |" in text
    assert "long_scoreboard 7.2, wait 4.0, barrier 2.5" in text
    assert "| cuda fwd | 2 | 4.0 |" in text  # per-case total of its two kernels
    saved = json.load(open(path[:-3] + ".json"))
    assert saved["kernels"][0]["metrics"]["launch__registers_per_thread"] == ["232", "register/thread"]


def test_report_refuses_a_profile_whose_markers_do_not_match_the_cases(ncu_kernels):
    kernels = ncu_kernels.parse_raw_csv(_raw_csv(_kernels(), METRICS))
    with pytest.raises(ValueError, match="2 case markers in the profile, but 3 cases"):
        ncu_kernels.summarize(kernels, ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 case markers in the profile, but 1 cases"):
        ncu_kernels.summarize(kernels, ["a"], complete=False)  # more markers than cases: never


def test_report_of_a_profile_stopped_by_its_time_cap(ncu_kernels, tmp_path):
    """ncu stopped at its cap: run wrote the cases before profiling, with complete false; the
    report assigns the kernels profiled to the first cases and names the others."""
    kernels = ncu_kernels.parse_raw_csv(_raw_csv(_kernels(), METRICS))
    info = {"device": "NVIDIA H200", "date": "2026-11-27", "dtype": "torch.bfloat16",
            "torch": "2.11", "triton": "3.6", "tunecomp": "0.1", "cuda": "13.0",
            "shape": {"in": 768, "out": 768, "tokens": 12608, "rank": 192, "small_tokens": 197, "kept": 0.5},
            "cases": ["triton fwd", "cuda fwd", "dense fwd", "eager fwd"], "unavailable": {},
            "complete": False}
    text = open(ncu_kernels.write_results(kernels, info, str(tmp_path))).read()
    assert "| triton fwd | `_forward_kernel` |" in text and "| cuda fwd | 2 | 4.0 |" in text
    assert "Not profiled (ncu stopped at its time cap; the last case profiled may lack kernels): " \
           "dense fwd, eager fwd" in text
    with pytest.raises(ValueError, match="2 case markers in the profile, but 4 cases"):
        ncu_kernels.write_results(kernels, {**info, "complete": True}, str(tmp_path))
    with pytest.raises(ValueError, match="no ncu raw-page header"):
        ncu_kernels.parse_raw_csv("==ERROR== the profiler could not be loaded\n")


def test_short_kernel_names(ncu_kernels):
    assert ncu_kernels.short_name("_grad_factor_kernel") == "_grad_factor_kernel"
    assert ncu_kernels.short_name("void at::native::vectorized_elementwise_kernel<4, at::native::Foo>(int, Foo)") \
        == "vectorized_elementwise_kernel<4,Foo>"
    assert len(ncu_kernels.short_name("nvjet_" + "x" * 100)) == 60
    assert ncu_kernels.short_name("void at::native::(anonymous namespace)::reduce_kernel<512, 1>(R)") \
        == "reduce_kernel<512,1>"
