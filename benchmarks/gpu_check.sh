#!/usr/bin/env bash
# GPU validation of tunecomp, sized for a session's 15 minutes of device time (the machine's
# start counted in): one call of at most 600 s that does what resolving the kernel and deploy
# issues needs most (GPU tests, kernel benchmarks, ncu, the model benchmark), and an optional
# second one, run at once while the machine is warm, for the rest:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh                                  # 1
#   OUT=/some/dir GPU_CHECK_STAGES="build sanitize profile" GPU_CHECK_TOTAL_S=200 \
#     bash benchmarks/gpu_check.sh                                              # 2
#
# Stages, in order; a failing stage does not stop the later ones (the exit code says it):
#   build     pip install -e . --no-build-isolation --no-deps      -> setup.log (tail on failure)
#             (a second call on a warm machine rebuilds nothing: ninja finds the objects)
#   info      python -m tunecomp info                               -> setup.log, printed
#             and a check that the torch, triton and cuda backends all run on the GPU, and
#             that an argument error raised in tunecomp._C reaches Python as a ValueError (on
#             an H200, 2026-11-26, every such error ended the process with a segfault: where
#             it still does, the log gets the toolchain, the unwinder and C++ runtime the
#             throw binds to, and, with GPU_CHECK_RAISE_DIAG=1, cuda-gdb's stack of the crash
#             and whether minimal torch extensions raising the same way crash too
#             (benchmarks/raise_probe.py; ~2-4 min together);
#             and the test stages leave out tests/test_extension.py; without the info stage
#             the probe runs before the test stages)
#   tests-gpu the GPU tests: pytest -k "gpu or (cuda and not emulator)" -> tests.log
#             (the CUDA backend's battery, every Triton config on its own, CUDA graphs, 2:4,
#             the deploy forms on the GPU)
#   tests     the rest of the suite (CI runs it on the CPU too), the Triton battery with one
#             config per kernel (conftest.py sets TUNECOMP_TRITON_ONE_CONFIG: autotuning each
#             test shape would take ~20 min)                       -> tests.log
#             Both run in GPU_CHECK_SHARDS pytest processes at once (default 8; tests/conftest.py's
#             TUNECOMP_TEST_SHARD): compiling Triton kernels, one CPU core per process, is most
#             of their time (~170 binaries for the every-config test, ~360 for the battery).
#   bench     python -m pytest benchmarks/ (grid TUNECOMP_BENCH_GRID, default "gpu"), capped
#             at GPU_CHECK_BENCH_S (default 150 s); its sections put every op at one rank
#             first, and it stops starting cases 45 s before its cap
#                                                                     -> bench.log, bench.json
#   report    benchmarks/report.py: <device>-<date>.json and .md in $OUT, the .md printed
#   ncu       benchmarks/ncu_kernels.py under Nsight Compute: one call of each case (the
#             masked op forward, forward+backward and blend at 768->768, 12608 tokens, rank 192,
#             per backend, with dense and eager beside them), after a warm-up outside the
#             profiled range; then its report: per kernel, duration, % of peak of SM, memory,
#             DRAM and tensor pipes, occupancy, registers, shared memory, top stall reasons,
#             bank conflicts: why the kernels are slow (a minute or so, estimated; the bench
#             stage's autotuning picks are in Triton's disk cache by then)
#                                 -> ncu.log, ncu-details.log, ncu-raw.log, ncu-<device>-<date>.{json,md}
#   sanitize  a probe of about a second under memcheck: where compute-sanitizer refuses the
#             device ("Device not supported", as on gVisor machines) the stage is NOT RUN and
#             says so, without spending its minutes; else
#             benchmarks/sanitize_kernels.py once plain (compiles the Triton kernels into the
#             disk cache; one config per kernel, TUNECOMP_TRITON_ONE_CONFIG=1: autotuning its
#             ~40 keys would not fit the stage's cap), then under compute-sanitizer --tool
#             memcheck (triton and cuda backends) and
#             --tool racecheck (the cuda backend's run: its shared-memory pipeline)
#                                                                   -> sanitize.log
#   model     benchmarks/model_bench.py's gpu grid (ViT-B/16 end to end, bf16): eager at
#             batch 256 and 64, replayed from a CUDA graph at 64 (no host work per call), eager
#             and graph at 1, eager at 8, then torch.compile at 256 and 1; stops starting
#             cases when its budget (GPU_CHECK_MODEL_S, default 120 s, less 40 s for a compile
#             in flight) is spent, and lists what it left out
#                                                 -> model.log, model-<device>-<date>.{json,md}
#   profile   benchmarks/profile_forward.py: CUDA-event times of the masked forward (dense,
#             eager, each backend, Triton as two launches and on factors masked beforehand),
#             the blend folded and not, host time per call, every Triton forward config on its
#             own on masked and premasked factors, ranks 320 against 307 (aligned rows or
#             not); the JSON is rewritten after each section, so the cap loses only the
#             section in flight            -> profile.log, profile-<device>-<date>.json
# The results files (<device>-*, ncu-<device>-*, model-*, profile-*) go to benchmarks/results/
# to be committed. Where $OUT ends with more than 8 files (every stage of call 1 makes 16:
# 8 logs, bench.json, 7 results files), the logs and bench.json (the report's input) are
# packed into logs-<time>.tar.gz.
#
# Time: each call is capped at GPU_CHECK_TOTAL_S (default 550 s, for a 600 s call). Each stage
# has a cap (timeout sends SIGINT first, so an interrupted pytest still writes its log and
# benchmark JSON); pytest dumps every thread's stack into the log when one test runs past
# 60 s (faulthandler_timeout), so a hung test shows where it hangs. Seen on an H200
# (2026-11-26, gVisor, before the profile and ncu stages existed): build 52 s, info 15 s,
# tests-gpu shards 24-72 s (one hung until the 180 s cap, now 150 s), model 120 s, bench
# 119 s. So call 1 is about build 1 min, info 0.5, tests-gpu 1-2.5, bench 2.5, ncu 1-2,
# model 2, which leaves the profile stage little or nothing. Seen on an H200 (2026-11-27):
# build 66 s, info 12 s, tests-gpu 153 s (the every-config test, then one test for all six
# kernels, hit its shard's cap in fp32: now one test per kernel), bench 117 s, ncu cut at its
# 104 s cap before its report (the report now runs on what was profiled, the backends' own
# forward first); model, profile not run. Call 2: sanitize 84 s, model 93 s. That order puts
# first what the issues' targets are read from (the benchmarks; ncu says why a target is
# missed). A second call in the ~3-5 min a 15-minute session has left: sanitize (~1.5-5 min,
# as much as fits), then model or profile, whichever call 1 left out.
#
# Knobs: PYTHON (default python3, else python), GPU_CHECK_STAGES (default "build info
# tests-gpu bench ncu model profile"; the stages always run in the order above; an unknown
# name is an error), GPU_CHECK_TOTAL_S (keep it below the device time left), GPU_CHECK_SHARDS,
# GPU_CHECK_BENCH_S, GPU_CHECK_MODEL_S, GPU_CHECK_RAISE_DIAG,
# TUNECOMP_BENCH_GRID, TUNECOMP_BENCH_BACKENDS, TUNECOMP_CUDA_ARCHS (default here: 90, i.e.
# H100/H200 only).
set -o pipefail  # not -e: keep going to the benchmarks when a stage fails

cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the image's python3 holds torch
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TUNECOMP_CUDA_ARCHS=${TUNECOMP_CUDA_ARCHS:-90}  # one arch: half the nvcc time
TOTAL=${GPU_CHECK_TOTAL_S:-550}
STAGES=" ${GPU_CHECK_STAGES:-build info tests-gpu bench ncu model profile} "
KNOWN="build info tests-gpu tests bench ncu sanitize model profile"
for name in $STAGES; do  # a misspelt stage would be skipped without a word: a wasted call
  [[ " $KNOWN " == *" $name "* ]] || { echo "GPU_CHECK_STAGES: unknown stage '$name' (stages: $KNOWN)" >&2; exit 2; }
done
SHARDS=${GPU_CHECK_SHARDS:-8}
[[ "$SHARDS" =~ ^[1-9][0-9]*$ ]] || { echo "GPU_CHECK_SHARDS must be a positive integer; got '$SHARDS'" >&2; exit 2; }
MODEL_S=${GPU_CHECK_MODEL_S:-120}
[[ "$MODEL_S" =~ ^[1-9][0-9]*$ ]] || { echo "GPU_CHECK_MODEL_S must be a positive integer; got '$MODEL_S'" >&2; exit 2; }
BENCH_S=${GPU_CHECK_BENCH_S:-150}
[[ "$BENCH_S" =~ ^[1-9][0-9]*$ ]] || { echo "GPU_CHECK_BENCH_S must be a positive integer; got '$BENCH_S'" >&2; exit 2; }
START=$SECONDS
SUMMARY=()
FAILED=0

wants() { [[ "$STAGES" == *" $1 "* ]]; }
left() { echo $((TOTAL - (SECONDS - START))); }

# begin NAME CAP_S: CAP = CAP_S cut to the time left; false, with NAME recorded as not run,
# when that is under 15 s.
begin() {
  CAP=$2
  (( CAP > $(left) )) && CAP=$(left)
  if (( CAP < 15 )); then
    SUMMARY+=("$(printf '%-13s NOT RUN (time budget spent)' "$1")")
    FAILED=1
    return 1
  fi
}

# finish NAME RC T0 LOG [WHY]: records the outcome of a stage begun at T0; true when RC is 0.
finish() {
  local name=$1 rc=$2 t0=$3 log=$4 why=${5:-"rc $2"}
  if (( rc == 0 )); then
    SUMMARY+=("$(printf '%-13s ok         %4d s' "$name" $((SECONDS - t0)))")
    return 0
  fi
  (( rc == 124 )) && why="timed out after ${CAP} s"
  SUMMARY+=("$(printf '%-13s FAILED     %4d s  (%s; see %s)' "$name" $((SECONDS - t0)) "$why" "$(basename "$log")")")
  FAILED=1
  return 1
}

# stage NAME CAP_S LOG CMD...: runs CMD capped at CAP_S (and at the time left), output
# appended to LOG; records the outcome and prints the log's tail (longer on failure).
stage() {
  local name=$1 log=$3 rc t0
  begin "$name" "$2" || return 1
  shift 3
  echo "=== $name (cap ${CAP} s): $*"
  echo "=== $name: $*" >>"$log"
  t0=$SECONDS
  timeout -s INT -k 20 "$CAP" "$@" >>"$log" 2>&1
  rc=$?
  if finish "$name" "$rc" "$t0" "$log"; then tail -n 5 "$log"; else tail -n 40 "$log"; fi
  return "$rc"
}

echo "gpu_check: $(date -u +%FT%TZ), out=$OUT, python=$(command -v "$PY")"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 4

# pstage NAME CAP_S LOG CMD...: CMD (a pytest run) in $SHARDS processes at once, the i-th with
# TUNECOMP_TEST_SHARD=i/$SHARDS (tests/conftest.py keeps every SHARDS-th test from the i-th),
# each capped at CAP_S; their outputs go to LOG one after the other. Ok when every shard is
# (pytest's 5, "no tests collected", counts as ok for a shard, but not for all of them).
pstage() {
  local name=$1 log=$3 rc=0 ran=0 t0 i failures="" pids=() codes=()
  begin "$name" "$2" || return 1
  shift 3
  echo "=== $name (cap ${CAP} s, $SHARDS processes): $*"
  t0=$SECONDS
  for ((i = 0; i < SHARDS; i++)); do
    TUNECOMP_TEST_SHARD="$i/$SHARDS" timeout -s INT -k 20 "$CAP" "$@" >"$log.shard$i" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid"
    codes+=($?)
  done
  for ((i = 0; i < SHARDS; i++)); do
    echo "=== $name shard $i/$SHARDS (rc ${codes[$i]}): $*" >>"$log"
    cat "$log.shard$i" >>"$log"
    echo "$name shard $i/$SHARDS: $(tail -n 1 "$log.shard$i")"
    (( codes[i] != 0 )) && failures+=$(grep -E "^(FAILED|ERROR) |Error|error:" "$log.shard$i" | head -n 20)$'\n'
    rm -f "$log.shard$i"
    (( codes[i] == 0 )) && ran=1
    (( codes[i] != 0 && codes[i] != 5 && rc == 0 )) && rc=${codes[$i]}
  done
  (( rc == 0 && ran == 0 )) && rc=5  # no shard ran a test
  finish "$name" "$rc" "$t0" "$log" "$( (( rc == 5 )) && echo "no tests ran" || echo "rc $rc")" ||
    printf '%s' "$failures" | head -n 40
  return "$rc"
}

# probe_raise: an argument error in tunecomp._C must reach Python as a ValueError. Checked in a
# child process, as a stage of its own. Where it kills the process (every such error did on an
# H200, 2026-11-26), cuda-gdb (the one debugger on these machines; it runs host-only programs)
# records the crash's stack, with the toolchain, and the test stages leave out
# tests/test_extension.py, whose error checks would take their shard down with them.
IGNORE=()
probe_raise() {
  local probe='import torch
from tunecomp import _C
try:
    _C.lowrank_forward_cpu(torch.randn(4, 6), torch.randn(5, 2), torch.randn(7, 2))
except ValueError as error:
    print("tunecomp._C raised ValueError:", error)
else:
    raise SystemExit("tunecomp._C raised no ValueError")'
  stage raise-probe 60 "$OUT/setup.log" "$PY" -c "$probe" && return 0
  {
    echo "=== raise-probe: toolchain"
    c++ --version 2>&1 | head -n 1
    "$PY" -c 'import glob, torch.utils.cpp_extension as c
print("pybind11 headers:", [h for d in c.include_paths() for h in glob.glob(d + "/pybind11/detail/common.h")])'
    "$PY" -m pip list 2>/dev/null | grep -i pybind
    # Which unwinder and C++ runtime the throw goes through: a second unwinder loaded into
    # the process (libunwind.so.8 taking _Unwind_RaiseException from libgcc_s) crashes C++
    # throws in this way elsewhere. The dynamic linker's bindings of _C's throw symbols, and
    # every runtime library the process maps.
    echo "=== raise-probe: _C's exception symbols as the dynamic linker binds them"
    LD_DEBUG=bindings timeout -k 5 30 "$PY" -c "$probe" 2>&1 | grep -E "_C\..*(_Unwind_|__cxa_throw|__gxx_personality)|libstdc\+\+[^ ]* \[0\] to .*_Unwind_RaiseException" | sed 's/^ *[0-9]*://' | sort -u | head -n 20
    echo "=== raise-probe: runtime libraries mapped after importing _C"
    timeout -k 5 30 "$PY" -c 'import torch
from tunecomp import _C
libs = {line.split()[-1] for line in open("/proc/self/maps") if ".so" in line}
print(*sorted(l for l in libs if any(k in l for k in ("unwind", "gcc_s", "stdc++", "c++", "gomp", "omp", "_C."))), sep="\n")'
    # The crash's stack and minimal torch extensions raising the same way (~2-4 min): the
    # H200 runs of 11-26 and 11-27 have them; only on request (GPU_CHECK_RAISE_DIAG=1), as they
    # would take that time from the benchmarks.
    if [[ "${GPU_CHECK_RAISE_DIAG:-0}" == 1 ]]; then
      local gdb
      gdb=$(command -v cuda-gdb || ls /usr/local/cuda*/bin/cuda-gdb 2>/dev/null | head -n 1)
      echo "=== raise-probe under ${gdb:-cuda-gdb (not found)}"
      [[ -n "$gdb" ]] && timeout -k 5 90 "$gdb" -q -batch -ex run -ex bt --args "$PY" -c "$probe"
      echo "=== raise-probe: minimal torch extensions (benchmarks/raise_probe.py)"
      timeout -k 5 150 "$PY" benchmarks/raise_probe.py
    else
      echo "=== raise-probe: cuda-gdb stack and benchmarks/raise_probe.py not run (GPU_CHECK_RAISE_DIAG=1 runs them)"
    fi
  } >>"$OUT/setup.log" 2>&1
  tail -n 60 "$OUT/setup.log"
  IGNORE=(--ignore=tests/test_extension.py)
  SUMMARY+=("tests         tests/test_extension.py left out of the test stages (raise-probe failed)")
}

if wants build; then
  # A missing Python.h (no python3-dev on the image) is the likeliest build failure: say so first.
  # setuptools: the image's version is unknown, and the metadata forms it accepts differ (README, License).
  "$PY" -c "import os, sysconfig; h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); print('Python.h:', h if os.path.exists(h) else 'MISSING (' + h + ')')
import setuptools; print('setuptools', setuptools.__version__)"
  stage build 240 "$OUT/setup.log" \
    "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index --disable-pip-version-check
  # How the C++ runtime was linked (setup.py's _shared_cxx_runtime_flags): a static copy of
  # libstdc++ in _C crashed every error message with a number in it (H200, 2026-11-27).
  {
    echo "=== link: c++ -print-file-name=libstdc++.so -> $(${CXX:-c++} -print-file-name=libstdc++.so 2>&1); LDFLAGS='${LDFLAGS:-}'"
    for so in tunecomp/_C*.so; do
      echo "$so needs: $(readelf -d "$so" 2>&1 | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
    done
  } | tee -a "$OUT/setup.log"
fi
if wants info; then
  stage info 60 "$OUT/setup.log" "$PY" -m tunecomp info >/dev/null  # printed whole below
  echo "=== info"
  sed -n '/^=== info/,$p' "$OUT/setup.log" | tail -n +2 | head -n 40
  # A build that quietly left out the CUDA part (nvcc not found) would turn every CUDA test
  # into a skip and this check green: fail here instead (each GPU backend must say it is
  # available for bf16 on cuda; the test stages run them).
  stage backends 60 "$OUT/setup.log" "$PY" -c 'import sys, torch; from tunecomp import ops
missing = {n: r for n, r in ops.available_backends("cuda", torch.bfloat16).items() if n != "cpu" and r}
print(missing or "torch, triton and cuda backends available for bfloat16 on cuda"); sys.exit(1 if missing else 0)'
  probe_raise
fi
GPU_TESTS="gpu or (cuda and not emulator)"
if ! wants info && { wants tests || wants tests-gpu; }; then probe_raise; fi
# faulthandler dumps every thread's stack when one test runs past 60 s (a shard's cap is
# 150-180 s); -v names each test before it runs, so a hang without a dump still shows which.
PYTEST=("$PY" -m pytest tests --maxfail 20 -p no:cacheprovider -o faulthandler_timeout=60 "${IGNORE[@]}")
if wants tests-gpu; then
  pstage tests-gpu 150 "$OUT/tests.log" "${PYTEST[@]}" -v -rs -k "$GPU_TESTS"
fi
if wants tests; then
  pstage tests 180 "$OUT/tests.log" "${PYTEST[@]}" -q -k "not ($GPU_TESTS)"
fi
if wants bench; then
  rm -f "$OUT/bench.json"
  cap=$(( $(left) - 30 ))  # the report and the final printout
  (( cap > BENCH_S )) && cap=$BENCH_S
  # The suite stops starting cases 45 s before the hard cap (a new rank padding's compile and
  # autotuning can take ~30 s), so it normally ends on its own and writes its JSON.
  stage bench "$cap" "$OUT/bench.log" env TUNECOMP_BENCH_BUDGET_S=$(( cap > 90 ? cap - 45 : cap / 2 )) \
    "$PY" -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
    --benchmark-columns=median,rounds
  if [[ -s "$OUT/bench.json" ]]; then
    stage report 60 "$OUT/bench.log" "$PY" benchmarks/report.py "$OUT/bench.json" --out-dir "$OUT"
    for md in "$OUT"/*.md; do  # the report's table (model-* is printed by its own stage)
      [[ -f "$md" && "$(basename "$md")" != model-* && "$(basename "$md")" != ncu-* ]] &&
        { echo; echo "=== $(basename "$md")"; cat "$md"; }
    done
  else
    SUMMARY+=("report        NOT RUN (no bench.json)")
    FAILED=1
  fi
fi
# ncu: first a probe of a few seconds (one small kernel under ncu: where the profiler cannot
# read the counters, as on gVisor machines, "LibraryNotLoaded", the stage is NOT RUN without
# spending its minutes); then the sections of benchmarks/ncu_kernels.py's SECTIONS that this
# ncu lists (an unknown one would fail the whole run), the clocks left alone, capped so that
# 45 s are left for its report. The profile and the case list stay out of $OUT (a device call
# brings back at most 8 files), unless the report could not be made from them: then they go
# to $OUT (kernels.ncu-rep.gz, packed with the logs) to be read later.
ncu_reads_counters() {
  local out
  out=$(timeout -k 5 90 "$NCU" --clock-control none --metrics gpu__time_duration.sum "$PY" -c \
    'import torch; torch.ones(1024, device="cuda").add_(1); torch.cuda.synchronize()' 2>&1)
  printf '=== ncu probe\n%s\n' "$out" >>"$OUT/ncu.log"
  [[ "$out" == *"gpu__time_duration.sum"* ]]
}
if wants ncu; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  if [[ -z "$NCU" ]]; then
    SUMMARY+=("ncu           FAILED     ncu (Nsight Compute) not found")
    FAILED=1
  elif (( $(left) < 120 )); then  # probe (<= 95 s) + a profile worth having + its report
    SUMMARY+=("ncu           NOT RUN (time budget spent)")
    FAILED=1
  elif ! ncu_reads_counters; then
    SUMMARY+=("ncu           NOT RUN    ncu read no counter of a probe kernel here (see ncu.log)")
    FAILED=1
  else
    NCU_SECTIONS=()
    NCU_LISTED=$("$NCU" --list-sections 2>&1)
    for section in $("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import ncu_kernels; print(*ncu_kernels.SECTIONS)'); do
      grep -qw -- "$section" <<<"$NCU_LISTED" && NCU_SECTIONS+=(--section "$section")
    done
    NCU_TMP=$(mktemp -d)
    cap=$(( $(left) - 45 ))  # its report's time kept back
    (( cap > 120 )) && cap=120
    stage ncu "$cap" "$OUT/ncu.log" "$NCU" --profile-from-start off --clock-control none "${NCU_SECTIONS[@]}" \
      --export "$NCU_TMP/kernels" --force-overwrite "$PY" benchmarks/ncu_kernels.py run --out-dir "$NCU_TMP"
    # Also after a stop at the cap: ncu still writes what it profiled, and the run wrote its
    # case list before profiling (the report names the cases not profiled).
    reported=0
    if [[ ! -s "$NCU_TMP/kernels.ncu-rep" || ! -s "$NCU_TMP/ncu-cases.json" ]]; then
      SUMMARY+=("ncu-report    NOT RUN    ncu wrote no profile, or the run no case list (see ncu.log)")
      FAILED=1
    fi
    [[ -s "$NCU_TMP/kernels.ncu-rep" && -s "$NCU_TMP/ncu-cases.json" ]] &&
      stage ncu-report 60 "$OUT/ncu.log" "$PY" benchmarks/ncu_kernels.py report --ncu "$NCU" \
        --report "$NCU_TMP/kernels.ncu-rep" --cases "$NCU_TMP/ncu-cases.json" --out-dir "$OUT" && reported=1
    # A profile with no report is kept, to read later with ncu --import (packed with the logs)
    if (( ! reported )) && [[ -s "$NCU_TMP/kernels.ncu-rep" ]]; then
      gzip -c "$NCU_TMP/kernels.ncu-rep" >"$OUT/kernels.ncu-rep.gz"
      cp "$NCU_TMP/ncu-cases.json" "$OUT/ncu-cases.json" 2>/dev/null
    fi
    rm -rf "$NCU_TMP"
  fi
fi
# sanitizer_takes_device: false when compute-sanitizer refuses this machine's GPU ("Device not
# supported", seen on gVisor machines), found by a probe of about a second under memcheck (the
# CUDA driver through ctypes: init, a context, one allocation) before the sanitize stages
# spend minutes compiling and running. Any other outcome lets the stages run and show it.
sanitizer_takes_device() {
  local out
  out=$(timeout -k 5 60 "$SANITIZER" --tool memcheck "$PY" -c 'import ctypes
c, d, ctx, p = ctypes.CDLL("libcuda.so.1"), ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
assert c.cuInit(0) == 0 and c.cuDeviceGet(ctypes.byref(d), 0) == 0
assert c.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), d) == 0 and c.cuCtxSetCurrent(ctx) == 0
assert c.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(1 << 20)) == 0 and c.cuMemFree_v2(p) == 0
print("sanitizer probe: a context and an allocation under memcheck")' 2>&1)
  printf '=== sanitizer probe\n%s\n' "$out" >>"$OUT/sanitize.log"
  [[ "$out" != *"Device not supported"* ]]
}
if wants sanitize; then
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  if [[ -z "$SANITIZER" ]]; then
    SUMMARY+=("sanitize      FAILED     compute-sanitizer not found")
    FAILED=1
  elif (( $(left) < 75 )); then  # probe (<= 65 s) and a stage worth starting
    SUMMARY+=("sanitize      NOT RUN (time budget spent)")
    FAILED=1
  elif ! sanitizer_takes_device; then
    SUMMARY+=("sanitize      NOT RUN    compute-sanitizer refuses this device: 'Device not supported' (see sanitize.log)")
    FAILED=1
  else
    # One config per kernel (no autotuning: under memcheck every config's timing launch would
    # be slowed by orders of magnitude), compiled once here into Triton's disk cache, which
    # the sanitized runs reuse.
    # (Set per command: the model and profile stages after this one must autotune.)
    stage sanitize-warm 90 "$OUT/sanitize.log" env TUNECOMP_TRITON_ONE_CONFIG=1 "$PY" benchmarks/sanitize_kernels.py
    # No caching allocator: every tensor its own allocation, so out-of-bounds accesses show.
    stage sanitize 120 "$OUT/sanitize.log" env TUNECOMP_TRITON_ONE_CONFIG=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 50 \
      "$PY" benchmarks/sanitize_kernels.py --require-cuda
    # racecheck: hazards of error level only, where this compute-sanitizer has the option
    # (checked in its --help). Not filtered by kernel name: a filter that matched nothing would
    # pass silently. A hazard in one of PyTorch's own kernels (racecheck has reported a real
    # one in its reduce kernel upstream) fails the stage too; the log names the kernel.
    RACE_OPTS=()
    [[ "$("$SANITIZER" --help 2>&1)" == *"--racecheck-detect-level"* ]] && RACE_OPTS+=(--racecheck-detect-level error)
    stage racecheck 90 "$OUT/sanitize.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool racecheck "${RACE_OPTS[@]}" --error-exitcode 3 --print-limit 50 \
      "$PY" benchmarks/sanitize_kernels.py --backends cuda --require-cuda
  fi
fi
if wants model; then
  if begin model "$MODEL_S"; then
    stage model "$CAP" "$OUT/model.log" env TUNECOMP_MODEL_GRID=${TUNECOMP_MODEL_GRID:-gpu} TUNECOMP_RESULTS_DIR="$OUT" \
      TUNECOMP_BENCH_BUDGET_S=$(( CAP > 80 ? CAP - 40 : CAP / 2 )) \
      "$PY" -m pytest benchmarks/model_bench.py -q -rs -p no:cacheprovider
    for md in "$OUT"/model-*.md; do [[ -f "$md" ]] && cat "$md"; done
  fi
fi
if wants profile; then
  stage profile 150 "$OUT/profile.log" "$PY" benchmarks/profile_forward.py --out-dir "$OUT"
fi

# A device call brings back at most 8 files: past that, the logs travel as one archive, named
# per call (a second call into the same $OUT must not replace the first one's).
if (( $(find "$OUT" -maxdepth 1 -type f | wc -l) > 8 )); then
  (cd "$OUT" && packed=(*.log $(ls bench.json kernels.ncu-rep.gz ncu-cases.json 2>/dev/null)) && tar czf "logs-$(date -u +%H%M%S).tar.gz" -- "${packed[@]}" &&
    rm -f -- "${packed[@]}")
fi

echo
echo "=== gpu_check summary: $((SECONDS - START)) s, files in $OUT"
printf '%s\n' "${SUMMARY[@]}"
if (( FAILED )); then echo "gpu_check: FAILED"; else echo "gpu_check: all stages ok"; fi
exit "$FAILED"
