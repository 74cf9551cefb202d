#!/usr/bin/env bash
# The GPU round in one call, from the repository root of a copy of the tree on a GPU machine,
# most important first, so that a run cut by its budget loses the least:
#   env, build (sm_90 only), pytest -k cuda (each result logged as it comes), every CUDA op
#   against the CPU kernels and dcx.reference (benchmarks/gpu_sanitize.py), the same checks under
#   compute-sanitizer memcheck and racecheck (quick), the CUDA tables at reduced sizes, one ncu
#   profile of spqmm last; the summary is printed at the end.
# Every step has its own time cap and the whole run a budget (DCX_GPU_BUDGET_S, default 450 s:
# 7.5 minutes, leaving room in a 15-minute lease for the machine's start and a second run); a
# step that would start with too little budget left is skipped, a hang costs one step, and a
# failed step is recorded while the next one runs.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        # OUTDIR: default $OUT, else ./gpu-out
#   bash benchmarks/gpu_check.sh --dry-run       # the steps, their caps and the budget; runs nothing
#
# Environment: DCX_GPU_BUDGET_S (whole run), DCX_COMMIT (the commit stamped on the tables when
# the copy has no git), PYTHON (default python3).
# OUTDIR gets 7 files at most: summary.txt, tables.md (every table written by this run),
# gpu-round.tar.gz (all logs and tables), build.log, pytest.log, sanitize-<tool>.log.
# Without a GPU the GPU steps are reported as skipped.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
BUDGET="${DCX_GPU_BUDGET_S:-450}"  # the caps below add up to 410 s
RESERVE=25   # seconds kept for a step's kill grace (10 s), the summary and the tarball
# The plan: step, time cap in seconds, what it does. The caps are worst cases and add up to
# less than the budget (the dry run shows it); the build's longest file, spqmm_kernel.cu, takes
# about 65 s for sm_90 on one core.
PLAN=(
  "env            10  versions of the machine, torch, nvcc, the tools"
  "build         140  DCX_USE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 setup.py build_ext --inplace"
  "kernels        10  every op but the Huffman codec has a CUDA kernel"
  "pytest         65  pytest -k cuda (8 workers), each result logged as it comes"
  "check-ops      25  gpu_sanitize.py: every CUDA op against the CPU kernel / dcx.reference"
  "memcheck       40  compute-sanitizer memcheck on gpu_sanitize.py --quick"
  "racecheck      30  compute-sanitizer racecheck on gpu_sanitize.py --quick"
  "bench-spqmm    35  bench_spqmm.py --preset gpu-table (CUDA-graph replays)"
  "bench-masked_sgd 10  bench_masked_sgd.py at 10M"
  "bench-centroid_grad 10  bench_centroid_grad.py at 10M"
  "bench-kmeans   15  bench_kmeans.py at 1M"
  "ncu            20  one ncu profile of the spqmm kernels (AlexNet fc6, 10%, 5 bits, fp16)"
)
cap_of() {  # cap_of STEP: the step's cap from PLAN
  local line
  for line in "${PLAN[@]}"; do
    read -r name cap _ <<<"$line"
    [[ $name == "$1" ]] && { echo "$cap"; return; }
  done
  echo 30
}
if [[ "${1:-}" == "--dry-run" ]]; then
  total=0
  printf '%-20s %6s %8s  %s\n' step cap "by then" what
  for line in "${PLAN[@]}"; do
    read -r name cap what <<<"$line"
    total=$((total + cap))
    printf '%-20s %5ss %7ss  %s\n' "$name" "$cap" "$total" "$what"
  done
  echo "budget ${BUDGET} s, ${RESERVE} s of it kept for the summary: the caps add up to ${total} s,"
  echo "$((total + RESERVE)) s with it; a step that would start with under 15 s of budget left is skipped."
  exit 0
fi
OUTDIR="${1:-${OUT:-./gpu-out}}"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 1
# Logs beyond the few kept in OUTDIR go here, then into the tarball (OUTDIR holds 8 files).
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dcx-gpu.XXXXXX")" || exit 1
mkdir -p "$WORK/tables"
MARK="$WORK/start.mark"
touch "$MARK"

PY="${PYTHON:-python3}"
START=$SECONDS
JOBS="$(nproc 2>/dev/null || echo 4)"
(( JOBS > 16 )) && JOBS=16
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # dcx is built in place, not installed
export PATH="$PATH:/usr/local/cuda/bin"
# The interpreter's bin first: torch builds with the ninja found there (pip's ninja), in parallel;
# without ninja it falls back to one file at a time.
PYBIN="$(timeout 30 "$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))' 2>/dev/null)"
[[ -n "$PYBIN" ]] && export PATH="$PYBIN:$PATH"

NAMES=() STATUS=() SECS=()
record() {  # record NAME STATUS SECONDS
  NAMES+=("$1") STATUS+=("$2") SECS+=("$3")
  printf '%-20s %-36s %5ss\n' "$1" "$2" "$3" >>"$OUTDIR/summary.txt"  # progress, if cut short
}

# run_step NAME LOG CMD...: CMD under a timeout of the step's cap (less when the budget runs
# short), output to LOG. Returns CMD's exit status (124 on timeout, 125 when skipped).
run_step() {
  local name=$1 cap log=$2
  cap=$(cap_of "$name")
  shift 2
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  if ((left < 15)); then
    record "$name" "skipped (time budget)" 0
    echo "skipped: the time budget is spent" >"$log"
    return 125
  fi
  local limit=$((cap < left ? cap : left)) t0=$SECONDS rc status
  printf '=== %s (limit %ss, %s)\n' "$name" "$limit" "$(date +%T)"
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT (${limit}s)" ;;
    *) status="FAILED (rc $rc)" ;;
  esac
  record "$name" "$status" $((SECONDS - t0))
  tail -n 3 "$log" | cut -c1-200 | sed 's/^/    /'
  return $rc
}

skip() {  # skip NAME REASON [LOG]
  record "$1" "skipped ($2)" 0
  [[ -n "${3:-}" ]] && echo "skipped: $2" >"$3"
  printf '=== %s: skipped (%s)\n' "$1" "$2"
}

find_tool() {  # find_tool NAME GLOB...: path of a CUDA tool on PATH or in the usual places
  local name=$1 p
  shift
  command -v "$name" 2>/dev/null && return 0
  for p in "$@"; do
    [[ -x "$p" ]] && { echo "$p"; return 0; }
  done
  return 1
}

# ---- a. environment ------------------------------------------------------------------------
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)"
if [[ -n "$COMMIT" ]]; then
  [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]] && COMMIT+="+dirty"
else
  COMMIT="${DCX_COMMIT:-unknown}"
fi
export DCX_COMMIT="$COMMIT"
SANITIZER="$(find_tool compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer)" || SANITIZER=""
NCU="$(find_tool ncu /opt/nvidia/nsight-compute/*/ncu)" || NCU=""

cat >"$WORK/env.sh" <<'EOF'
t() { echo "\$ $*"; timeout 30 "$@" 2>&1 || echo "(failed: rc $?)"; echo; }
t date -u
t uname -a
echo "cores: $(nproc)"; t free -g
t nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,memory.total,power.limit,temperature.gpu,persistence_mode --format=csv
t nvidia-smi
t "$PY" -c '
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| capability", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory", f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("torch sees no CUDA GPU")
for m in ("xdist", "pytest_timeout", "sklearn", "hypothesis", "ninja"):
    try:
        __import__(m); print(m, "present")
    except ImportError:
        print(m, "absent")
'
t nvcc --version
echo "ninja: $(command -v ninja || echo absent)"
echo "commit: $DCX_COMMIT"
echo "compute-sanitizer: ${SANITIZER:-absent}"; [[ -n "$SANITIZER" ]] && t "$SANITIZER" --version
echo "ncu: ${NCU:-absent}"; [[ -n "$NCU" ]] && t "$NCU" --version
true
EOF
export PY SANITIZER NCU
: >"$OUTDIR/summary.txt"
run_step env "$WORK/env.log" bash "$WORK/env.sh"

# What can run here: a CUDA build of torch (to build), a GPU (to run).
FLAGS="$(timeout 60 "$PY" -c 'import torch; print(int(torch.version.cuda is not None), int(torch.cuda.is_available()))' 2>/dev/null | tail -n 1)"
read -r CUDA_TORCH HAVE_GPU <<<"${FLAGS:-0 0}"
GPU_WHY=""
((HAVE_GPU)) || GPU_WHY="no GPU"
((CUDA_TORCH)) || GPU_WHY="no GPU: torch has no CUDA"

# ---- b. build in place, CUDA kernels for sm_90 only ---------------------------------------
# The distribution's newest g++-NN, not a CXX that points elsewhere: on the H200 machines CXX is
# /opt/gcc/bin/g++, a wrapper, and the extension it linked crashed the process (segmentation
# fault) whenever a TORCH_CHECK formatted its message (every CUDA bad-input test, 2026-12-04);
# built by /usr/bin/g++-13 the same tests raise and pass.
SYSTEM_CXX="$(ls /usr/bin/g++-[0-9]* 2>/dev/null | sort -V | tail -1)"
if [[ -n "$SYSTEM_CXX" && "${CXX:-}" != /usr/bin/* ]]; then
  export CXX="$SYSTEM_CXX" CC="${SYSTEM_CXX/g++/gcc}"
fi
BUILD_OK=0
if [[ -n "$GPU_WHY" ]]; then
  skip build "$GPU_WHY" "$OUTDIR/build.log"
else
  if run_step build "$OUTDIR/build.log" \
    env DCX_USE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" "$PY" setup.py build_ext --inplace; then
    # Every op but the CPU-only Huffman codec must have a CUDA kernel.
    run_step kernels "$WORK/kernels.log" "$PY" -c '
import dcx
from dcx._native import CPU_ONLY
print(dcx.kernels())
missing = [n for n, keys in dcx.kernels().items() if n not in CPU_ONLY and "CUDA" not in keys]
assert dcx.available() and not missing, f"no CUDA kernel: {missing}"
print("every op but", CPU_ONLY, "has a CUDA kernel")' && BUILD_OK=1
  fi
fi
NEED=""   # why the steps that need the CUDA build cannot run
if [[ -n "$GPU_WHY" ]]; then NEED="$GPU_WHY"; elif ((!BUILD_OK)); then NEED="build failed"; fi

# ---- c. the CUDA tests (CI runs the CPU ones) ---------------------------------------------
# Each result goes to $WORK/tests.log as it comes (tests/conftest.py, DCX_TEST_LOG), so a run
# cut by its cap still counts what ran; junit is written at the end as well.
if [[ -n "$NEED" ]]; then
  skip pytest "$NEED" "$OUTDIR/pytest.log"
else
  # 8 workers of 2 threads each where pytest-xdist is present, each compiling torch.compile
  # graphs in-process; a per-test timeout where pytest-timeout is.
  PYTEST_ARGS=(-q -ra tests -k cuda --junitxml="$WORK/pytest.xml")
  "$PY" -c 'import xdist' 2>/dev/null && PYTEST_ARGS+=(-n 8)
  "$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST_ARGS+=(--timeout 60)
  run_step pytest "$OUTDIR/pytest.log" env DCX_TEST_LOG="$WORK/tests.log" OMP_NUM_THREADS=2 \
    TORCHINDUCTOR_COMPILE_THREADS=1 "$PY" -m pytest "${PYTEST_ARGS[@]}"
fi

# ---- d. every CUDA op against the CPU kernels / dcx.reference, without a sanitizer ----------
# (without a GPU it checks the CPU kernels instead: a smoke test of the driver)
if [[ -n "$NEED" && -z "$GPU_WHY" ]]; then
  skip check-ops "$NEED"
elif [[ -n "$GPU_WHY" ]] && ! timeout 60 "$PY" -c 'import dcx, sys; sys.exit(not dcx.available())' 2>/dev/null; then
  skip check-ops "$GPU_WHY; dcx not built"
else
  run_step check-ops "$WORK/check-ops.log" "$PY" benchmarks/gpu_sanitize.py
fi

# ---- e. compute-sanitizer memcheck and racecheck on the op checks (quick) --------------------
SAN_OPTS=(--error-exitcode 1 --target-processes all)
SAN_FILTER=() MEM_FILTER=()
if [[ -z "$NEED" && -n "$SANITIZER" ]]; then
  # Options that this compute-sanitizer accepts, tried on a program without CUDA. API errors
  # are not counted: torch meets some on purpose, and dcx checks every call it makes itself.
  timeout 30 "$SANITIZER" --report-api-errors no true >/dev/null 2>&1 && SAN_OPTS+=(--report-api-errors no)
  # Only dcx's kernels, and for memcheck also the CUB ones it launches with its own scratch
  # buffers: torch's and cuBLAS's kernels would cost most of the time and are not under test.
  if timeout 30 "$SANITIZER" --kernel-name kns=dcx true >/dev/null 2>&1; then
    SAN_FILTER=(--kernel-name kns=dcx)
    MEM_FILTER=(--kernel-name kns=dcx --kernel-name kns=cub)
  fi
fi
sanitize() {  # sanitize TOOL TOOL-OPTIONS... -- DRIVER-ARGS...
  local tool=$1 opts=() log="$OUTDIR/sanitize-$1.log"
  shift 1
  while [[ $1 != -- ]]; do opts+=("$1"); shift; done
  shift
  if [[ -n "$NEED" ]]; then skip "$tool" "$NEED" "$log"; return; fi
  if [[ -z "$SANITIZER" ]]; then skip "$tool" "no compute-sanitizer" "$log"; return; fi
  run_step "$tool" "$log" "$SANITIZER" --tool "$tool" "${SAN_OPTS[@]}" "${opts[@]}" \
    "$PY" benchmarks/gpu_sanitize.py "$@"
}
# Without the caching allocator every tensor is its own allocation, so memcheck sees an access
# past its end.
PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitize memcheck --leak-check no "${MEM_FILTER[@]}" -- --quick
sanitize racecheck "${SAN_FILTER[@]}" -- --quick

# ---- f. the CUDA tables at reduced sizes (the CPU tables are not repeated) ------------------
bench() {  # bench NAME ENV... -- ARGS...
  local name=$1 envs=()
  shift 1
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  if [[ -n "$NEED" ]]; then skip "$name" "$NEED"; return; fi
  run_step "$name" "$WORK/$name.log" env DCX_BENCH_DEVICES=cuda "${envs[@]}" "$PY" "$@"
}
bench bench-spqmm -- benchmarks/bench_spqmm.py --preset gpu-table --devices cuda \
  --note "Preset gpu-table (benchmarks/gpu_check.sh)."
bench bench-masked_sgd DCX_BENCH_SIZES=10000000 -- benchmarks/bench_masked_sgd.py
bench bench-centroid_grad DCX_BENCH_SIZES=10000000 -- benchmarks/bench_centroid_grad.py
bench bench-kmeans DCX_BENCH_SIZES=1000000 -- benchmarks/bench_kmeans.py
if ((HAVE_GPU)); then
  timeout 20 nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv >"$WORK/clocks-after-benchmarks.txt" 2>&1
fi

# ---- h. last: one ncu profile of the spqmm kernels (AlexNet fc6, 10%, 5 bits, fp16, batch 1) --
cat >"$WORK/ncu_spqmm.py" <<'EOF'
import torch

import dcx

g = torch.Generator().manual_seed(0)
n, k = 4096, 9216
mask = torch.rand(n, k, generator=g) < 0.1
p = dcx.pack(mask, torch.randint(0, 32, (n, k), generator=g), torch.randn(32, generator=g), 5)
p = p._replace(**{f: getattr(p, f).cuda() for f in ("codes", "windows", "group_ptr", "chunks", "codebook")})
x = torch.randn(1, k, device="cuda", dtype=torch.float16)
for _ in range(3):
    y = p.spqmm(x)
torch.cuda.synchronize()
print("spqmm ran:", tuple(y.shape), y.dtype)
EOF
if [[ -n "$NEED" ]]; then
  skip ncu "$NEED"
elif [[ -z "$NCU" ]]; then
  skip ncu "no ncu"
else
  run_step ncu "$WORK/ncu.log" "$NCU" --clock-control none --kernel-name regex:spqmm \
    --launch-count 3 "$PY" "$WORK/ncu_spqmm.py"
fi

# ---- f. tables, tarball, summary -----------------------------------------------------------
TABLES=()
while IFS= read -r f; do TABLES+=("$f"); done < <(find benchmarks/results -maxdepth 1 -name '*.md' -newer "$MARK" 2>/dev/null | sort)
: >"$OUTDIR/tables.md"
for f in "${TABLES[@]}"; do
  cp "$f" "$WORK/tables/"
  { echo "<!-- $f -->"; cat "$f"; echo; } >>"$OUTDIR/tables.md"
done
for f in build.log pytest.log sanitize-memcheck.log sanitize-racecheck.log; do
  [[ -f "$OUTDIR/$f" ]] && cp "$OUTDIR/$f" "$WORK/"
done

# CUDA test counts from the results logged as they came (tests/conftest.py): passed, failed,
# and skipped (for want of a GPU: must be none), also when pytest was cut by its cap.
CUDA_TESTS=""
if [[ -f "$WORK/tests.log" ]]; then
  CUDA_TESTS="$(awk '{n[$1]++} $1 == "skipped" && /no CUDA GPU/ {g++}
    END {printf "CUDA tests (ids with cuda): %d passed, %d failed, %d skipped; skipped for want of a GPU: %d%s",
         n["passed"], n["failed"], n["skipped"], g, (g ? " (must be 0)" : "")}' "$WORK/tests.log")"
fi

{
  echo
  echo "==================== dcx GPU round: summary ===================="
  grep -E '^(python|device|torch sees)' "$WORK/env.log" 2>/dev/null
  grep -A2 '^\$ nvidia-smi --query-gpu' "$WORK/env.log" 2>/dev/null | tail -n 2
  grep -m1 -E 'release [0-9.]+' "$WORK/env.log" 2>/dev/null
  echo "commit: $COMMIT; compute-sanitizer: ${SANITIZER:-absent}${SANITIZER:+ ${SAN_OPTS[*]} ${MEM_FILTER[*]}}; ncu: ${NCU:-absent}"
  [[ -f "$WORK/clocks-after-benchmarks.txt" ]] && echo "after the benchmarks: $(tail -n 1 "$WORK/clocks-after-benchmarks.txt")"
  echo
  echo "--- tests and checks"
  echo "pytest: $(grep -E '(passed|failed|error)' "$OUTDIR/pytest.log" 2>/dev/null | tail -n 1 || head -n 1 "$OUTDIR/pytest.log")"
  [[ -n "$CUDA_TESTS" ]] && echo "$CUDA_TESTS"
  grep -h -A 8 '^gpu_sanitize (' "$WORK/check-ops.log" 2>/dev/null | cut -c1-160
  for tool in memcheck racecheck; do
    log="$OUTDIR/sanitize-$tool.log"
    [[ -f "$log" ]] || continue
    echo "$tool: $(grep -h -E '(ERROR|RACECHECK|SYNCCHECK) SUMMARY|^gpu_sanitize \(|Device not supported|skipped' "$log" | tr '\n' ' ' | cut -c1-300)"
  done
  if [[ -f "$WORK/ncu.log" ]]; then
    echo "ncu:"
    grep -E '^  [a-z_]*spqmm|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per Thread|==ERR|==WARNING' \
      "$WORK/ncu.log" | head -n 24 | cut -c1-160 || head -n 1 "$WORK/ncu.log"
  fi
  echo
  for f in "${TABLES[@]}"; do
    echo "--- $(basename "$f")"
    # the header and every row (the spqmm gpu-table: fc6 over the batches, then batch 1 rows)
    grep -E '^\| ' "$f" | cut -c1-230
  done
  for i in "${!NAMES[@]}"; do
    case "${STATUS[$i]}" in
      ok | skipped*) ;;
      *)
        echo
        echo "--- ${NAMES[$i]} ${STATUS[$i]}: end of its log"
        for log in "$WORK/${NAMES[$i]}.log" "$OUTDIR/sanitize-${NAMES[$i]}.log"; do
          [[ -f "$log" ]] && { tail -n 12 "$log" | cut -c1-200; break; }
        done
        ;;
    esac
  done
  echo
  echo "--- steps"
  printf '%-20s %-36s %6s\n' step status seconds
  for i in "${!NAMES[@]}"; do printf '%-20s %-36s %6s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
  echo "total $((SECONDS - START)) s of a ${BUDGET} s budget; files in $OUTDIR:"
} >"$WORK/summary.txt"

cp "$WORK/summary.txt" "$OUTDIR/summary.txt"
tar -czf "$OUTDIR/gpu-round.tar.gz" -C "$WORK" . 2>/dev/null || echo "(tarball failed)" >>"$OUTDIR/summary.txt"
(cd "$OUTDIR" && printf '%s ' * && echo) >>"$OUTDIR/summary.txt"
rm -rf "$WORK"
cat "$OUTDIR/summary.txt"
