"""Turns the pytest-benchmark JSON of ``benchmarks/bench_kernels.py`` into the results files.

    python benchmarks/report.py bench.json [--out-dir DIR] [--print]
    python benchmarks/report.py --run [--out-dir DIR] [--print]   # run the suite first

writes ``DIR/<device-slug>-<YYYY-MM-DD>.json`` (default DIR: benchmarks/results) with the run's
device, versions, date, measured ceilings and every point (per-call median time, GB/s,
TFLOP/s, byte floor, speedups over the baselines), and a markdown table beside it with the
per-point ratios, geometric means and each target of the issue as PASS/MISS (and by how
much). Works on any JSON the suite writes, a CPU smoke run included; the targets are for
H100/H200 in bf16 and are marked informational elsewhere. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# The targets, checked for every tunecomp backend the run timed on their op.
# "speedup" = baseline time / backend time. "floor" = % of the byte floor at the measured copy
# bandwidth.
TARGETS = (
    dict(op="masked", direction="fwd", stat="geomean", baseline="eager", at_least=1.3,
         name="masked fwd: geometric-mean speedup over eager"),
    dict(op="masked", direction="fwd", stat="geomean", baseline="compile", at_least=1.1,
         name="masked fwd: geometric-mean speedup over torch.compile"),
    dict(op="masked", direction="fwd", stat="min", baseline="eager", at_least=0.95,
         name="masked fwd: speedup over eager at every point"),
    dict(op="masked", direction="fwd", stat="floor", min_tokens=8192, at_least=80.0,
         name="masked fwd, >= 8192 tokens: % of byte floor at every point"),
    dict(op="blended", direction="fwd+bwd", stat="geomean", baseline="eager", at_least=1.3,
         name="blended fwd+bwd: geometric-mean speedup over eager blended"),
    # The native CUDA kernels against the Triton ones (issue: within 10% or faster, i.e. at
    # most 1.1x Triton's time: a speedup of at least 1/1.1).
    *(dict(op=op, direction=direction, stat="geomean", baseline="triton", at_least=1 / 1.1,
           backends=("cuda",), name=f"{op} {direction}: geometric-mean speedup over triton")
      for op, direction in (("masked", "fwd"), ("masked", "fwd+bwd"), ("blended", "fwd"),
                            ("blended", "fwd+bwd"))),
)
# Issue #4's targets for the CPU kernels, checked instead of the above on the "cpu" grid
# (float32, a 2-core CI-class machine), at every point of one rho. "Not more than 10% slower
# than the reference" is a speedup of at least 1/1.1.
CPU_TARGETS = (
    dict(op="masked", direction="fwd", stat="min", baseline="dense", rho=0.9, at_least=2.0,
         name="masked fwd, rho 0.9: speedup over dense nn.Linear at every point"),
    dict(op="masked", direction="fwd", stat="min", baseline="eager", rho=0.9, at_least=1.5,
         name="masked fwd, rho 0.9: speedup over eager at every point"),
    dict(op="masked", direction="fwd", stat="min", baseline="eager", rho=0.0, at_least=1 / 1.1,
         name="masked fwd, rho 0: at most 10% slower than eager at every point"),
)
POINT_KEYS = ("op", "direction", "in_features", "out_features", "tokens", "rank", "rho")


def target_set(grid) -> tuple:
    """(targets, what they are for) of a run of this grid."""
    if grid == "cpu":
        return CPU_TARGETS, "CPU kernels, float32, 2-core CI-class machine"
    return TARGETS, "H100/H200, bf16"


def point_targets(grid, p: dict) -> list:
    """The per-point targets ("min" over points, and the byte floor) that apply to point p."""
    targets, _ = target_set(grid)
    return [t for t in targets if t["stat"] in ("min", "floor")
            and p["impl"] in t.get("backends", (p["impl"],))
            and (t["op"], t["direction"]) == (p["op"], p["direction"])
            and p["tokens"] >= t.get("min_tokens", 0) and p["rho"] == t.get("rho", p["rho"])]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _point_key(p, dense=False):
    if dense:  # dense does not depend on rank or rho, and serves the masked op only
        return ("masked", p["direction"], p["in_features"], p["out_features"], p["tokens"])
    return tuple(p[k] for k in POINT_KEYS)


def build(bench: dict) -> dict:
    """The results document (a plain dict, written as the .json) from a pytest-benchmark JSON."""
    run = bench.get("tunecomp", {})
    points, ceilings = [], {}
    for b in bench["benchmarks"]:
        info, stats = dict(b["extra_info"]), b["stats"]
        k = info.get("k", 1)
        t = stats["median"] / k
        info.update(median_s=t, min_s=stats["min"] / k, rounds=stats["rounds"])
        if info.get("role") == "ceiling":
            if info["impl"] == "copy":
                ceilings.update(copy_gb_s=info["bytes"] / t / 1e9, copy_bytes=info["bytes"] // 2)
            elif info["impl"] == "matmul":
                ceilings.update(matmul_tflop_s=info["flops"] / t / 1e12, matmul_size=info.get("size"))
            continue
        info["gb_s"] = info["bytes"] / t / 1e9
        info["tflop_s"] = info["flops"] / t / 1e12
        points.append(info)

    copy_bw = ceilings.get("copy_gb_s")
    peak = ceilings.get("matmul_tflop_s")
    for p in points:
        floor = p["bytes"] / (copy_bw * 1e9) if copy_bw else None
        compute = p["flops"] / (peak * 1e12) if peak else None
        roof = max(x for x in (floor, compute) if x is not None) if (floor or compute) else None
        p["byte_floor_s"] = floor
        p["pct_byte_floor"] = 100 * floor / p["median_s"] if floor else None
        p["pct_roofline"] = 100 * roof / p["median_s"] if roof else None

    baselines = {}
    for p in points:
        if p["role"] == "baseline":
            baselines[(p["impl"], _point_key(p, dense=p["impl"] == "dense"))] = p["median_s"]
    triton_times = {_point_key(p): p["median_s"] for p in points
                    if p["role"] == "backend" and p["impl"] == "triton"}
    backends = []
    for p in points:
        if p["role"] != "backend":
            continue
        if p["impl"] not in backends:
            backends.append(p["impl"])
        p["speedup"] = {}
        # Paired grids: the median ratio of the backend's rounds to the baseline rounds taken
        # alternately with them. Otherwise: the baseline's own case at the same point.
        paired = p.get("paired", {})
        for impl in run.get("baselines", {}).get(p["op"], ("eager", "compile", "dense")):
            if impl in paired:
                p["speedup"][impl] = paired[impl]["speedup"]
                continue
            t = baselines.get((impl, _point_key(p, dense=impl == "dense")))
            if t is not None:
                p["speedup"][impl] = t / p["median_s"]
        if p["impl"] != "triton" and _point_key(p) in triton_times:
            p["speedup"]["triton"] = triton_times[_point_key(p)] / p["median_s"]

    geomeans = []
    for backend in backends:
        for op, direction in _tables(points, backend):
            mine = [p for p in points if (p["impl"], p["op"], p["direction"]) == (backend, op, direction)]
            row = dict(backend=backend, op=op, direction=direction, points=len(mine), speedup={},
                       points_with={})  # per baseline: the points that have its ratio
            for impl in sorted({i for p in mine for i in p["speedup"]}):
                ratios = [p["speedup"][impl] for p in mine if impl in p["speedup"]]
                row["speedup"][impl] = geomean(ratios)
                row["points_with"][impl] = len(ratios)
            geomeans.append(row)

    device_name = run.get("device_name", "unknown device")
    target_defs, targets_for = target_set(run.get("grid"))
    if run.get("grid") == "cpu":
        applies = run.get("dtype") == "float32"
    else:  # the targets are about the gpu grid (or the full one), not a smoke run's toy shapes
        applies = (bool(re.search(r"H100|H200", device_name)) and run.get("dtype") == "bfloat16"
                   and run.get("grid") in ("gpu", "full"))
    # A backend's targets are those of the ops the grid timed it on: a section's extra backend
    # ("torch" for the blend) gets no rows for the masked op. Older runs did not record them.
    # A backend timed but left without a single point (every case failed or was skipped)
    # keeps its rows, NOT MEASURED.
    timed = {tuple(t) for t in run["timed_ops"]} if "timed_ops" in run else None
    target_backends = backends + sorted({b for b, _, _ in timed or ()} - set(backends))
    targets = [check_target(t, backend, points, run) for backend in target_backends for t in target_defs
               if backend in t.get("backends", (backend,))
               and (timed is None or (backend, t["op"], t["direction"]) in timed)]
    return {
        "device": device_name,
        "device_slug": slug(device_name),
        "date": bench.get("datetime", "")[:10],
        "datetime": bench.get("datetime"),
        "grid": run.get("grid"),
        "dtype": run.get("dtype"),
        "versions": run.get("versions", {}),
        "ceilings": ceilings,
        "backends": backends,
        "unavailable_backends": run.get("unavailable_backends", {}),
        "planned_baselines": run.get("baselines", {}),
        "skipped": run.get("skipped", []),
        "failed": run.get("failed", []),
        "elapsed_s": run.get("elapsed_s"),
        "timed_ops": run.get("timed_ops"),  # which targets apply: rebuilding needs it
        "targets_for": targets_for,
        "targets_apply": applies,
        "targets": targets,
        "geomeans": geomeans,
        "points": points,
    }


def _tables(points, backend) -> list:
    """(op, direction) pairs of ``backend`` in the order the run measured them."""
    return list(dict.fromkeys((p["op"], p["direction"]) for p in points if p["impl"] == backend))


def _where(p) -> str:
    return f"{p['in_features']}->{p['out_features']} n={p['tokens']} r={p['rank']} rho={p['rho']:g}"


def _of_target(target: dict, backend: str, p: dict) -> bool:
    """Whether ``p`` (a point, or a skipped or failed case) is one of ``target``'s points."""
    return (p.get("impl") == backend and p.get("op") == target["op"]
            and p.get("direction") == target["direction"]
            and p.get("tokens", 0) >= target.get("min_tokens", 0)
            and p.get("rho") == target.get("rho", p.get("rho")))


def check_target(target: dict, backend: str, points: list, run: dict) -> dict:
    mine = [p for p in points if _of_target(target, backend, p)]
    # the backend's own cases of these points that the run skipped or that failed
    unrun = sum(_of_target(target, backend, entry["case"])
                for entry in [*run.get("skipped", ()), *run.get("failed", ())])
    result = dict(name=target["name"], backend=backend, at_least=target["at_least"],
                  stat=target["stat"], value=None, status="NOT MEASURED", detail="")
    if target["stat"] == "floor":
        values = [(p["pct_byte_floor"], p) for p in mine if p["pct_byte_floor"] is not None]
        lacking = "byte floor (no copy ceiling)"
    else:
        values = [(p["speedup"][target["baseline"]], p) for p in mine
                  if target["baseline"] in p["speedup"]]
        lacking = f"{target['baseline']} time"
    # Points of the backend whose ratio is missing (the baseline's case skipped or failed) or
    # that it has no time for: the verdict cannot be a PASS without them, nor a geometric
    # mean's MISS (they could lift it).
    missing = len(mine) - len(values) + unrun
    if not values:
        baseline = target.get("baseline")
        if baseline == "triton":
            result["detail"] = "no triton timings of the same points in this run"
        elif baseline and baseline not in run.get("baselines", {}).get(target["op"], ()):
            result["detail"] = f"baseline {baseline!r} not in this run's grid"
        else:
            result["detail"] = "no such points in this run (grid, skips or missing ceilings)"
        return result
    if target["stat"] == "geomean":
        value = geomean([v for v, _ in values])
    else:
        value, worst = min(values, key=lambda vp: vp[0])
        below = sum(v < target["at_least"] for v, _ in values)
        result["detail"] = f"worst at {_where(worst)}; {below} of {len(values)} points below"
    result["value"] = value
    result["points"] = len(values)
    if value >= target["at_least"] or (missing and target["stat"] == "geomean"):
        result["status"] = "INCOMPLETE" if missing else "PASS"
    else:
        result["status"] = "MISS"
        short = f"short by {100 * (1 - value / target['at_least']):.1f}%"
        result["detail"] = f"{short}; {result['detail']}" if result["detail"] else short
    if missing:
        no_ratio, why = len(mine) - len(values), []
        if no_ratio:
            why.append(f"{no_ratio} with no {lacking}" if unrun else f"no {lacking}")
        if unrun:
            why.append(f"{unrun} of {backend}'s own cases skipped or failed")
        note = f"{missing} of {len(mine) + unrun} points left out: {', '.join(why)}"
        result["detail"] = f"{result['detail']}; {note}" if result["detail"] else note
    return result


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _f(value, spec: str, bold: bool = False) -> str:
    if value is None:
        return "—"
    text = format(value, spec)
    return f"**{text}**" if bold else text


def _g(value, bold: bool = False) -> str:
    """Three significant digits without exponents for anything from 0.001 to 100000."""
    if value is None:
        return "—"
    text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"**{text}**" if bold else text


def _target_value(t: dict) -> str:
    if t["value"] is None:
        return "—"
    unit = "%" if t["stat"] == "floor" else "x"
    spec = ".1f" if t["stat"] == "floor" else ".2f"
    return f"{format(t['value'], spec)}{unit} (target >= {t['at_least']:.3g}{unit})"


def markdown(results: dict) -> str:
    v = results["versions"]
    c = results["ceilings"]
    lines = [
        f"# Kernel benchmarks: {results['device']}, {results['date']}",
        "",
        "Generated by `benchmarks/report.py` from one run of `benchmarks/bench_kernels.py` "
        f"(grid `{results['grid']}`, {results['dtype']}); never edited by hand. "
        f"torch {v.get('torch')} (built for CUDA {v.get('cuda')}), triton {v.get('triton')}, "
        f"tunecomp {v.get('tunecomp')}; run took {_f(results['elapsed_s'], '.0f')} s.",
        "",
        "Ceilings measured in this run: device-to-device copy "
        f"**{_g(c.get('copy_gb_s'))} GB/s** ({_g(c.get('copy_bytes', 0) / 2**20)} MiB), "
        f"matmul **{_g(c.get('matmul_tflop_s'))} TFLOP/s** "
        f"({c.get('matmul_size')}^3, {results['dtype']}).",
        "",
    ]
    absent = [f"backend `{b}`: unavailable ({why})" for b, why in results["unavailable_backends"].items()]
    planned = results["planned_baselines"]
    for impl in ("eager", "compile", "dense"):
        if impl not in planned.get("masked", ()):
            absent.append(f"baseline `{impl}`: not in this run's grid")
    if results["skipped"]:
        reasons = {}
        for s in results["skipped"]:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        absent += [f"{n} case(s) skipped: {why}" for why, n in reasons.items()]
    for f in results["failed"]:
        c = f["case"]
        absent.append(f"FAILED {c['op']} {c['direction']} {c['impl']} {_where(c)}: {f['error']}")
    if absent:
        lines += ["Not measured:", ""] + [f"- {a}" for a in absent] + [""]
    lines += [
        "µs: median time per call. GB/s, TFLOP/s: byte floor and useful FLOPs over it. "
        "%floor: the byte floor at the measured copy bandwidth, as % of the time; %roof: the "
        "same for max(that, FLOPs at the matmul rate). ×eager/×compile/×dense/×triton: that "
        "implementation's time over the backend's (above 1: backend faster). **Bold**: below a per-point target. "
        "Definitions: benchmarks/README.md.",
        "",
    ]
    if any("paired" in p for p in results["points"]):
        lines += ["Paired timing: each backend case also timed its baselines, one round of each "
                  "before each of its own rounds; its ratios are the median over rounds of "
                  "(baseline round / backend round), so that load drifting between separately "
                  "timed cases on a shared machine cancels.", ""]
    if any(p.get("params_change") for p in results["points"]):
        lines += ["fwd+bwd steps update the parameters in place first (multiplied by 1), as an "
                  "optimiser step does: work redone whenever they change (the cpu backend's "
                  "packing of the kept entries) is timed as training pays it.", ""]
    for backend in results["backends"]:
        for op, direction in _tables(results["points"], backend):
            rows = sorted((p for p in results["points"]
                           if (p["impl"], p["op"], p["direction"]) == (backend, op, direction)),
                          key=lambda p: (p["in_features"], p["out_features"], p["tokens"],
                                         p["rank"], p["rho"]))
            cols = [i for i in ("eager", "compile", "dense") if i in planned.get(op, ())]
            if any("triton" in p["speedup"] for p in rows):
                cols.append("triton")
            lines += [f"## {backend}: {op} {direction}", ""]
            lines.append("| in→out | tokens | r | ρ | µs | GB/s | TFLOP/s | %floor | %roof | "
                         + " | ".join(f"×{i}" for i in cols) + " |")
            lines.append("|" + "---|" * (9 + len(cols)))
            for p in rows:
                s = p["speedup"]
                below = {("floor" if t["stat"] == "floor" else t["baseline"]): t["at_least"]
                         for t in point_targets(results["grid"], p)}
                floor = p["pct_byte_floor"]
                floor_low = "floor" in below and floor is not None and floor < below["floor"]
                cells = [f"{p['in_features']}→{p['out_features']}", str(p["tokens"]),
                         str(p["rank"]), f"{p['rho']:g}", _g(p["median_s"] * 1e6),
                         _g(p["gb_s"]), _g(p["tflop_s"]),
                         _g(floor, floor_low), _g(p["pct_roofline"])]
                for i in cols:
                    low = i in below and s.get(i) is not None and s[i] < below[i]
                    cells.append(_f(s.get(i), ".2f", low))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Geometric means of the speedups", "",
              "| backend | op | direction | points | ×eager | ×compile | ×dense | ×triton |",
              "|---|---|---|---|---|---|---|---|"]
    for g in results["geomeans"]:
        s, counts = g["speedup"], g.get("points_with", {})

        def cell(impl):  # "(k of n)" where only k of the row's points have that ratio
            k = counts.get(impl, g["points"])
            return _f(s.get(impl), ".2f") + (f" ({k} of {g['points']})" if impl in s and k < g["points"] else "")

        lines.append(f"| {g['backend']} | {g['op']} | {g['direction']} | {g['points']} | "
                     f"{cell('eager')} | {cell('compile')} | {cell('dense')} | {cell('triton')} |")
    lines += ["", f"## Targets ({results['targets_for']}, ratios from this one run)", ""]
    if not results["targets_apply"]:
        lines += [f"Informational only: this run is {results['device']}, {results['dtype']}.", ""]
    lines += ["| backend | target | result | measured | detail |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['backend']} | {t['name']} | **{t['status']}** | "
                     f"{_target_value(t)} | {t['detail']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def write(results: dict, out_dir: str) -> tuple:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{results['device_slug']}-{results['date'] or 'undated'}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(markdown(results))
    return stem + ".json", stem + ".md"


def run_suite(bench_json: str) -> int:
    cmd = [sys.executable, "-m", "pytest", HERE, "-q", f"--benchmark-json={bench_json}"]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=os.path.dirname(HERE))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", nargs="?", help="pytest-benchmark JSON of the suite")
    parser.add_argument("--run", action="store_true",
                        help="run the suite first (grid from TUNECOMP_BENCH_GRID)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--print", action="store_true", help="print the markdown")
    args = parser.parse_args(argv)
    if args.run == bool(args.bench_json):
        parser.error("give either a pytest-benchmark JSON or --run")
    if args.run:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.json")
            rc = run_suite(path)
            if not os.path.exists(path):
                print(f"the suite wrote no JSON (pytest exit code {rc})", file=sys.stderr)
                return rc or 1
            with open(path) as f:
                bench = json.load(f)
    else:
        with open(args.bench_json) as f:
            bench = json.load(f)
        rc = 0
    results = build(bench)
    json_path, md_path = write(results, args.out_dir)
    if args.print:
        print(markdown(results), end="")
    print(f"wrote {json_path}\nwrote {md_path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
