"""Hardware counters of every kernel behind the masked low-rank op and its blend, read by
Nsight Compute (ncu), in one short run: why a kernel is as slow as it is, where the CUDA-event
times of ``profile_forward.py`` only say how slow.

Two steps, both run by ``gpu_check.sh``'s ``ncu`` stage:

    ncu --profile-from-start off --clock-control none --section ... --export REPORT \\
        python benchmarks/ncu_kernels.py run --out-dir TMP
    python benchmarks/ncu_kernels.py report --ncu NCU --report REPORT.ncu-rep \\
        --cases TMP/ncu-cases.json --out-dir DIR

``run`` builds the cases (``build_cases``: the masked op forward, forward+backward and the
blend on ViT-B/16's 768->768 layer at 12608 tokens, batch 64, rank 192, half of each mask kept,
bf16; dense and eager PyTorch beside them; and the forward at 197 tokens), calls each twice
outside the profiled range (Triton autotunes there), then calls each once between
``cudaProfilerStart`` and ``cudaProfilerStop``, so that ncu profiles one call of each and
nothing else. Before each case it launches a tiny Triton kernel (``_ncu_case_marker``) that
tells the report where a case begins; it writes the case names in order to
``TMP/ncu-cases.json``.

``report`` reads the profile back through ``ncu --import`` (the raw page as CSV, kept as
``DIR/ncu-raw.log``; the details page with ncu's rule advice as ``DIR/ncu-details.log``) and
writes ``DIR/ncu-<device>-<date>.json`` (every collected metric of every kernel) and ``.md``
(one row per kernel: duration, throughputs as % of peak, tensor-pipe use, occupancy,
registers, shared memory, the warps' top stall reasons, shared-memory bank conflicts).

ncu serializes the kernels and, by default, flushes the caches before each one (and replays it
once per counter pass): its durations are for a cold cache and are not the benchmarks' times.
The clocks are left as the card runs them (``--clock-control none``, as the device machines'
method asks).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import re
import subprocess
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench_kernels, when run as a script from anywhere

SHAPE = (768, 768, 12608)  # in, out, tokens: ViT-B/16 attention projection at batch 64
SMALL_TOKENS = 197  # batch 1
RANK = 192
DTYPE = torch.bfloat16
BACKENDS = ("torch", "triton", "cuda")
MARKER = "_ncu_case_marker"

# The sections ``gpu_check.sh`` asks ncu for (those its ncu lists), in this order.
SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "SchedulerStats", "WarpStateStats",
            "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "MemoryWorkloadAnalysis_Tables")


def _marker_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _ncu_case_marker(ptr):
        tl.store(ptr, tl.load(ptr) + 1)

    return _ncu_case_marker


def build_cases(device="cuda", dtype=DTYPE, shape=SHAPE, rank=RANK, small_tokens=SMALL_TOKENS,
                backends=BACKENDS, seed=0) -> dict:
    """{case name: a call that launches that case's kernels}, in the order they are profiled.
    Fresh random inputs (never zeros) from ``seed``."""
    from bench_kernels import eager_masked
    from profile_forward import layer
    from tunecomp import ops

    in_features, out_features, n_tokens = shape
    a = layer(in_features, out_features, n_tokens, seed, rank, device, dtype)
    small = layer(in_features, out_features, small_tokens, seed + 1, rank, device, dtype)
    g = torch.Generator(device=device).manual_seed(seed + 2)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=g) * scale).to(dtype)

    weight = randn(out_features, in_features, scale=in_features ** -0.5)
    teacher = (weight, randn(out_features), torch.tensor(0.5, device=device))
    grad_y = randn(n_tokens, out_features)
    leaves = {k: (t.detach().clone().requires_grad_() if k in ("x", "u", "v", "bias") else t)
              for k, t in a.items()}

    def forward_backward(fn):
        def call():
            for name in ("x", "u", "v", "bias"):
                leaves[name].grad = None  # no accumulation kernels in the profile
            fn(**leaves).backward(grad_y)
        return call

    # Most wanted first: ncu replays each kernel once per counter pass (~33 passes, a few
    # seconds a kernel), and a run cut short by its time cap keeps the cases profiled so far.
    ours = [b for b in backends if b != "torch"]
    cases = {f"{b} fwd": lambda b=b: ops.masked_lowrank_linear(**a, backend=b) for b in ours}
    cases["dense fwd"] = lambda: F.linear(a["x"], weight, a["bias"])
    cases["eager fwd"] = lambda: eager_masked(**a)
    if "torch" in backends:
        cases["torch fwd"] = lambda: ops.masked_lowrank_linear(**a, backend="torch")
    for b in backends:
        cases[f"{b} blend fwd"] = lambda b=b: ops.blended_lowrank_linear(**a, teacher_weight=teacher[0],
                                                                         teacher_bias=teacher[1],
                                                                         alpha=teacher[2], backend=b)
    cases["eager fwd+bwd"] = forward_backward(eager_masked)
    for b in backends:
        cases[f"{b} fwd+bwd"] = forward_backward(lambda b=b, **t: ops.masked_lowrank_linear(**t, backend=b))
    for b in backends:
        cases[f"{b} fwd n={small_tokens}"] = lambda b=b: ops.masked_lowrank_linear(**small, backend=b)
    return cases


def run(out_dir: str, backends=BACKENDS) -> dict:
    """Profiled workload (``run``): returns what it wrote to ``ncu-cases.json``."""
    from tunecomp import ops, provenance

    if not torch.cuda.is_available():
        raise SystemExit("ncu_kernels run: needs a CUDA GPU")
    missing = {b: r for b, r in ops.available_backends("cuda", DTYPE).items() if b in backends and r}
    if missing:
        print(f"ncu_kernels: left out, unavailable here: {missing}", flush=True)
    cases = build_cases(backends=[b for b in backends if b not in missing])
    for name, call in cases.items():  # compile and autotune outside the profiled range
        call()
        call()
        print(f"warmed up: {name}", flush=True)
    marker, flag = _marker_kernel(), torch.zeros(1, device="cuda")
    marker[(1,)](flag)  # compiled outside the profiled range too
    flag.zero_()
    info = {"device": provenance.device_name("cuda"), **provenance.versions(),
            "date": datetime.date.today().isoformat(), "dtype": str(DTYPE),
            "shape": {"in": SHAPE[0], "out": SHAPE[1], "tokens": SHAPE[2], "rank": RANK,
                      "small_tokens": SMALL_TOKENS, "kept": 0.5},
            "cases": list(cases), "unavailable": missing, "complete": False}

    def write():
        with open(os.path.join(out_dir, "ncu-cases.json"), "w") as f:
            json.dump(info, f, indent=1)

    write()  # before profiling: where ncu is stopped by a time cap, the report reads the cases done
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in cases.values():
        marker[(1,)](flag)
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    if flag.item() != len(cases):
        raise SystemExit(f"ncu_kernels: {int(flag.item())} case markers ran, expected {len(cases)}")
    info["complete"] = True
    write()
    print(f"profiled {len(cases)} cases once each", flush=True)
    return info


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

_TIME_TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
               "second": 1e6, "s": 1e6}
_BYTES = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9,
          "Kibyte": 1024, "Mibyte": 2**20}
_STALL = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)_per_issue_active\.ratio$")
_TENSOR = re.compile(r"^sm__pipe_tensor\w*_cycles_active\.avg\.pct_of_peak_sustained_active$")
_BANK = re.compile(r"^l1tex__data_bank_conflicts_pipe_lsu_mem_shared(_op_(?:ld|st))?\.sum$")
_FIXED = ("ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
          "Block Size", "Grid Size", "Device", "CC")


def number(text):
    """ncu's printed value as a float (thousands separators dropped), or None."""
    text = (text or "").strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def parse_raw_csv(text: str) -> list:
    """ncu's raw page (``--csv --page raw``): one dict per kernel, {metric: (value, unit)} plus
    the fixed columns as text. Lines before the header (ncu's own messages) are skipped; the
    row of units under the header is recognised by its empty kernel name."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if '"Kernel Name"' in line), None)
    if start is None:
        raise ValueError('no ncu raw-page header (a line with a "Kernel Name" column) in the CSV')
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, body = rows[0], rows[1:]
    name_at = header.index("Kernel Name")
    units = [""] * len(header)
    if body and len(body[0]) == len(header) and body[0][name_at].strip() == "":
        units, body = body[0], body[1:]
    kernels = []
    for row in body:
        if len(row) != len(header):
            continue  # a truncated last line
        kernel = {}
        for name, unit, value in zip(header, units, row):
            kernel[name] = value if name in _FIXED else (value, unit)
        kernels.append(kernel)
    return kernels


def _value(kernel, name, scale=None):
    value, unit = kernel.get(name, (None, ""))
    value = number(value)
    if value is None:
        return None
    if scale is not None:  # "byte/block": the unit of the launch__shared_mem_per_block_* metrics
        factor = scale.get(unit.split("/")[0])
        return None if factor is None else value * factor
    return value


def short_name(name: str) -> str:
    """``void ns::masked_gemm_kernel<__nv_bfloat16, 1>(ns::GemmParams)`` -> ``masked_gemm_kernel<bf16,1>``."""
    name = re.sub(r"^void |\(anonymous ?namespace\)::", "", name.strip())
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the argument list: the first "(" outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    name = re.sub(r"\b\w+::", "", name[:cut])
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace(" ", "")
    return name if len(name) <= 60 else name[:57] + "..."


def summarize(kernels: list, case_names: list, complete: bool = True) -> list:
    """One record per profiled kernel (markers dropped), each with its case: the k-th marker
    opens the k-th case. ``complete``: every case was run under the profiler (else the run was
    stopped, and fewer markers than cases is expected: the last case profiled may lack
    kernels)."""
    records, case = [], None
    markers = 0
    for kernel in kernels:  # in launch order, as ncu lists them
        name = kernel.get("Kernel Name", "")
        if MARKER in name:
            case = case_names[markers] if markers < len(case_names) else f"case {markers}"
            markers += 1
            continue
        stalls = {}
        for metric in kernel:
            m = _STALL.match(metric)
            if m and m.group(1) not in ("selected",):
                value = _value(kernel, metric)
                if value:
                    stalls[m.group(1)] = stalls.get(m.group(1), 0.0) + value
        tensor = [v for metric in kernel if _TENSOR.match(metric) for v in [_value(kernel, metric)] if v is not None]
        bank = {}
        for metric in kernel:
            m = _BANK.match(metric)
            if m and _value(kernel, metric) is not None:
                bank[m.group(1) or ""] = _value(kernel, metric)
        conflicts = (bank.get("_op_ld", 0) + bank.get("_op_st", 0)) if ("_op_ld" in bank or "_op_st" in bank) \
            else bank.get("")
        smem = [_value(kernel, f"launch__shared_mem_per_block_{k}", _BYTES) for k in ("static", "dynamic")]
        records.append({
            "case": case, "kernel": short_name(name), "kernel_full": name,
            "grid": kernel.get("Grid Size", ""), "block": kernel.get("Block Size", ""),
            "us": _value(kernel, "gpu__time_duration.sum", _TIME_TO_US),
            "sm_pct": _value(kernel, "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
            "memory_pct": _value(kernel, "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
            "dram_pct": _value(kernel, "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
            "tensor_pct": max(tensor) if tensor else None,
            # SchedulerStats' "one or more eligible"; else ComputeWorkloadAnalysis' "issue slots busy"
            "issue_pct": next((v for v in (_value(kernel, "smsp__issue_active.avg.pct_of_peak_sustained_active"),
                                           _value(kernel, "sm__inst_issued.avg.pct_of_peak_sustained_active"))
                               if v is not None), None),
            "registers": _value(kernel, "launch__registers_per_thread"),
            "shared_kib": None if None in smem else sum(smem) / 1024,
            "waves": _value(kernel, "launch__waves_per_multiprocessor"),
            "occupancy_pct": _value(kernel, "sm__warps_active.avg.pct_of_peak_sustained_active"),
            "occupancy_limit_pct": _value(kernel, "sm__maximum_warps_per_active_cycle_pct"),
            "stalls": dict(sorted(stalls.items(), key=lambda kv: -kv[1])),
            "shared_bank_conflicts": conflicts,
            "metrics": {k: list(v) for k, v in kernel.items() if k not in _FIXED},
        })
    if markers > len(case_names) or (complete and markers != len(case_names)):
        raise ValueError(f"{markers} case markers in the profile, but {len(case_names)} cases were run: "
                         "the kernels cannot be assigned to their cases")
    return records


def _fmt(value, digits=1):
    if value is None:
        return "—"
    if isinstance(value, float) and value.is_integer() and digits == 0:
        return str(int(value))
    return f"{value:.{digits}f}"


def markdown(records: list, info: dict, command: str) -> str:
    shape = info["shape"]
    lines = [
        f"# Nsight Compute counters: {info['device']}, {info['date']}", "",
        f"Generated by `{command}` from one ncu profile of `benchmarks/ncu_kernels.py run`; never "
        f"edited by hand. torch {info['torch']}, triton {info['triton']}, tunecomp {info['tunecomp']}, "
        f"CUDA {info['cuda']}.", "",
        f"Cases: the masked low-rank op at {shape['in']}->{shape['out']}, {shape['tokens']} tokens "
        f"(and {shape['small_tokens']} where named), rank {shape['rank']}, {shape['kept']:.0%} of each "
        f"mask kept, {info['dtype'].replace('torch.', '')}; one call each, after two outside the profile.", "",
        "ncu serializes the kernels and flushes the caches before each (cold L2), so these durations "
        "are not the benchmarks' times. SM, memory, DRAM, tensor, issue: % of peak (tensor: the "
        "busiest tensor pipe; issue: cycles a scheduler issued). occ.: achieved / theoretical "
        "occupancy, % of the warp slots. Stalls: the three largest reasons, cycles per issued "
        "instruction. Bank conflicts: shared-memory loads + stores.", "",
    ]
    if info.get("unavailable"):
        lines += [f"Left out (unavailable on this machine): {info['unavailable']}", ""]
    if info.get("not_profiled"):
        lines += [f"Not profiled (ncu stopped at its time cap; the last case profiled may lack "
                  f"kernels): {', '.join(info['not_profiled'])}", ""]
    lines += ["| case | kernel | grid × block | µs | SM | memory | DRAM | tensor | issue | regs | smem KiB "
              "| waves | occ. | top stalls | bank conflicts |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    totals = {}
    for r in records:
        stalls = ", ".join(f"{k} {v:.1f}" for k, v in list(r["stalls"].items())[:3]) or "—"
        occupancy = f"{_fmt(r['occupancy_pct'], 0)} / {_fmt(r['occupancy_limit_pct'], 0)}"
        lines.append(
            f"| {r['case']} | `{r['kernel']}` | {r['grid']} × {r['block']} | {_fmt(r['us'])} "
            f"| {_fmt(r['sm_pct'], 0)} | {_fmt(r['memory_pct'], 0)} | {_fmt(r['dram_pct'], 0)} "
            f"| {_fmt(r['tensor_pct'], 0)} | {_fmt(r['issue_pct'], 0)} | {_fmt(r['registers'], 0)} "
            f"| {_fmt(r['shared_kib'])} | {_fmt(r['waves'], 2)} | {occupancy} | {stalls} "
            f"| {_fmt(r['shared_bank_conflicts'], 0)} |")
        if r["us"] is not None:
            totals[r["case"]] = totals.get(r["case"], 0.0) + r["us"]
    lines += ["", "Per case, the sum of its kernels' ncu durations (µs):", "",
              "| case | kernels | µs |", "|---|---|---|"]
    for case in info["cases"]:
        count = sum(r["case"] == case for r in records)
        lines.append(f"| {case} | {count} | {_fmt(totals.get(case))} |")
    return "\n".join(lines) + "\n"


def report(ncu: str, report_path: str, out_dir: str, cases_path: str) -> str:
    """``report``: the markdown's path."""
    with open(cases_path) as f:
        info = json.load(f)
    command = [ncu, "--import", report_path, "--csv", "--page", "raw", "--print-units", "base"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # an ncu without --print-units: its default units (read per column)
        done = subprocess.run(command[:-2], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ncu could not read {report_path}: {done.stderr.strip()[-2000:]}")
    raw = done.stdout
    with open(os.path.join(out_dir, "ncu-raw.log"), "w") as f:
        f.write(raw)
    details = subprocess.run([ncu, "--import", report_path, "--page", "details", "--print-units", "base"],
                             capture_output=True, text=True)
    with open(os.path.join(out_dir, "ncu-details.log"), "w") as f:
        f.write(details.stdout + details.stderr)
    return write_results(parse_raw_csv(raw), info, out_dir)


def write_results(kernels: list, info: dict, out_dir: str) -> str:
    complete = info.get("complete", True)
    records = summarize(kernels, info["cases"], complete)
    if not complete:  # the cases after the last marker were never profiled
        profiled = {r["case"] for r in records}
        info = {**info, "not_profiled": [c for c in info["cases"] if c not in profiled]}
    command = "bash benchmarks/gpu_check.sh (stage ncu)"
    from report import slug  # benchmarks/ (sys.path[0] when run as a script)

    stem = os.path.join(out_dir, f"ncu-{slug(info['device'])}-{info['date']}")
    with open(stem + ".json", "w") as f:
        json.dump({**info, "command": command, "kernels": records}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(records, info, command))
    return stem + ".md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="the workload to run under ncu")
    p_run.add_argument("--out-dir", default=".", help="where ncu-cases.json goes (default: .)")
    p_run.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: %(default)s)")
    p_rep = sub.add_parser("report", help="tables from the ncu report that `run` produced")
    p_rep.add_argument("--ncu", default="ncu", help="the ncu executable (default: ncu)")
    p_rep.add_argument("--report", required=True, help="the .ncu-rep file ncu wrote (--export)")
    p_rep.add_argument("--cases", default=None, help="run's ncu-cases.json (default: in --out-dir)")
    p_rep.add_argument("--out-dir", default=".", help="where the results go (default: .)")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.out_dir, tuple(b for b in args.backends.split(",") if b))
    else:
        path = report(args.ncu, args.report, args.out_dir,
                      args.cases or os.path.join(args.out_dir, "ncu-cases.json"))
        with open(path) as f:
            print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
