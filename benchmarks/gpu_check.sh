#!/usr/bin/env bash
# One-call GPU validation of tunecomp: build, info, tests, compute-sanitizer, kernel benchmarks.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Stages, in order; a failing stage does not stop the later ones (the exit code says it):
#   build     pip install -e . --no-build-isolation --no-deps      -> setup.log (tail on failure)
#   info      python -m tunecomp info                               -> setup.log, printed
#   tests     python -m pytest tests -q --maxfail 20 (GPU tests run) -> tests.log
#   sanitize  benchmarks/sanitize_kernels.py once plain (autotunes, results cached on disk),
#             then under compute-sanitizer --tool memcheck (triton and cuda backends) and
#             --tool racecheck (cuda backend: its shared-memory pipeline) -> sanitize.log
#   bench     python -m pytest benchmarks/ (grid TUNECOMP_BENCH_GRID, default "gpu")
#                                                                     -> bench.log, bench.json
#   report    benchmarks/report.py: <device>-<date>.json and .md in $OUT, the .md printed last
# so $OUT gets 7 files. Copy the two results files to benchmarks/results/ to commit them.
#
# Time: the whole script is capped at GPU_CHECK_TOTAL_S (default 520 s, for a 600 s call).
# Each stage has a cap (timeout sends SIGINT first, so an interrupted pytest still writes its
# log and benchmark JSON); the benchmarks get what is left minus a reserve for the report, and
# skip their remaining cases once TUNECOMP_BENCH_BUDGET_S is spent. Expected on an H100:
# build ~1-1.5 min, tests ~1-2.5 min, sanitize ~1 min, benchmarks the rest (the "gpu" grid
# needs ~5.5 min; its last section, extra ranks, is what a short budget drops).
#
# Optional stage "model": benchmarks/model_bench.py's gpu grid (ViT-B/16 end to end, ~5 min),
# results model-<device>-<date>.{json,md} in $OUT. Run it in its own call,
# GPU_CHECK_STAGES="build model", since the device tool returns at most 8 files.
#
# Knobs: PYTHON (default python), GPU_CHECK_STAGES (default "build info tests sanitize bench"),
# GPU_CHECK_TOTAL_S, GPU_CHECK_TESTS_S (tests cap, default 180), TUNECOMP_BENCH_GRID,
# TUNECOMP_BENCH_BACKENDS, TUNECOMP_CUDA_ARCHS (default here: 90, i.e. H100/H200 only).
set -o pipefail  # not -e: keep going to the benchmarks when a stage fails

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TUNECOMP_CUDA_ARCHS=${TUNECOMP_CUDA_ARCHS:-90}  # one arch: half the nvcc time
TOTAL=${GPU_CHECK_TOTAL_S:-520}
STAGES=" ${GPU_CHECK_STAGES:-build info tests sanitize bench} "
START=$SECONDS
SUMMARY=()
FAILED=0

wants() { [[ "$STAGES" == *" $1 "* ]]; }
left() { echo $((TOTAL - (SECONDS - START))); }

# stage NAME CAP_S LOG CMD...: runs CMD capped at CAP_S (and at the time left), output
# appended to LOG; records the outcome and prints the log's tail (longer on failure).
stage() {
  local name=$1 cap=$2 log=$3 rc t0
  shift 3
  (( cap > $(left) )) && cap=$(left)
  if (( cap < 15 )); then
    SUMMARY+=("$(printf '%-13s NOT RUN (time budget spent)' "$name")")
    FAILED=1
    return 1
  fi
  echo "=== $name (cap ${cap} s): $*"
  echo "=== $name: $*" >>"$log"
  t0=$SECONDS
  timeout -s INT -k 20 "$cap" "$@" >>"$log" 2>&1
  rc=$?
  if (( rc == 0 )); then
    SUMMARY+=("$(printf '%-13s ok         %4d s' "$name" $((SECONDS - t0)))")
    tail -n 5 "$log"
  else
    local why="rc $rc"
    (( rc == 124 )) && why="timed out after ${cap} s"
    SUMMARY+=("$(printf '%-13s FAILED     %4d s  (%s; see %s)' "$name" $((SECONDS - t0)) "$why" "$(basename "$log")")")
    FAILED=1
    tail -n 40 "$log"
  fi
  return "$rc"
}

echo "gpu_check: $(date -u +%FT%TZ), out=$OUT, python=$(command -v "$PY")"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 4

if wants build; then
  stage build 240 "$OUT/setup.log" \
    "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index --disable-pip-version-check
fi
if wants info; then
  stage info 60 "$OUT/setup.log" "$PY" -m tunecomp info >/dev/null  # printed whole below
  echo "=== info"
  sed -n '/^=== info/,$p' "$OUT/setup.log" | tail -n +2 | head -n 40
fi
if wants tests; then
  stage tests "${GPU_CHECK_TESTS_S:-180}" "$OUT/tests.log" "$PY" -m pytest tests -q --maxfail 20 -p no:cacheprovider
fi
if wants sanitize; then
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  # Autotune results cached on disk: the sanitized run reuses them instead of benchmarking
  # every config under memcheck.
  stage sanitize-warm 90 "$OUT/sanitize.log" env TRITON_CACHE_AUTOTUNING=1 \
    "$PY" benchmarks/sanitize_kernels.py
  if [[ -z "$SANITIZER" ]]; then
    SUMMARY+=("sanitize      FAILED     compute-sanitizer not found")
    FAILED=1
  else
    # No caching allocator: every tensor its own allocation, so out-of-bounds accesses show.
    stage sanitize 120 "$OUT/sanitize.log" env TRITON_CACHE_AUTOTUNING=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 50 \
      "$PY" benchmarks/sanitize_kernels.py
    stage racecheck 90 "$OUT/sanitize.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool racecheck --error-exitcode 3 --print-limit 50 \
      "$PY" benchmarks/sanitize_kernels.py --backends cuda
  fi
fi
if wants model; then  # not in the default stages: run it as GPU_CHECK_STAGES="build model"
  stage model 400 "$OUT/model.log" env TUNECOMP_MODEL_GRID=${TUNECOMP_MODEL_GRID:-gpu} TUNECOMP_RESULTS_DIR="$OUT" \
    "$PY" -m pytest benchmarks/model_bench.py -q -p no:cacheprovider
  for md in "$OUT"/model-*.md; do [[ -f "$md" ]] && cat "$md"; done
fi
if wants bench; then
  rm -f "$OUT/bench.json"
  cap=$(( $(left) - 30 ))  # the report and the final printout
  # The suite stops starting cases 45 s before the hard cap (a new rank padding's compile and
  # autotuning can take ~30 s), so it normally ends on its own and writes its JSON.
  stage bench "$cap" "$OUT/bench.log" env TUNECOMP_BENCH_BUDGET_S=$(( cap > 90 ? cap - 45 : cap / 2 )) \
    "$PY" -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
    --benchmark-columns=median,rounds
  if [[ -s "$OUT/bench.json" ]]; then
    stage report 60 "$OUT/bench.log" "$PY" benchmarks/report.py "$OUT/bench.json" --out-dir "$OUT"
    for md in "$OUT"/*.md; do
      [[ -f "$md" ]] && { echo; echo "=== $(basename "$md")"; cat "$md"; }
    done
  else
    SUMMARY+=("report        NOT RUN (no bench.json)")
    FAILED=1
  fi
fi

echo
echo "=== gpu_check summary: $((SECONDS - START)) s, files in $OUT"
printf '%s\n' "${SUMMARY[@]}"
if (( FAILED )); then echo "gpu_check: FAILED"; else echo "gpu_check: all stages ok"; fi
exit "$FAILED"
