#!/usr/bin/env bash
# One-shot GPU check of avstfp_fast, at most ~8 minutes on an offline machine with torch
# preinstalled (torch 2.11 / triton 3.6 on the lent H100/H200):
#   1. install the wheels in .whl/ if present (bench/fetch_wheels.sh makes them);
#   2. build the CUDA extension (pip install -e ., MAX_JOBS=16, only the device's arch);
#   3. run the GPU-marked tests (pytest -m gpu tests/);
#   4. a short benchmark pass of every case: kernels, CPU case, end-to-end (--bench-size short);
#   5. write <date>-<gpu>.json, .md (tables: speedups vs each peer, memory, roofline,
#      PASS/MISS of the targets) and .png into $OUT if set, else bench/results/, plus
#      gpu_check.log; print the Markdown summary last.
# Every phase runs under `timeout`; the benchmark phases also get a soft budget
# (--bench-budget) so that pytest still writes its JSON, and a JSON-lines record of each
# finished case survives a hard kill.  Total budget: AVSTFP_CHECK_BUDGET seconds (450).
# AVSTFP_CHECK_SIZE=tiny|short|full (default short).  AVSTFP_CHECK_ALLOW_CPU=1 runs the
# plumbing on a CPU machine (no wheels, no build; GPU cases skip) -- for testing this script.
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
TOTAL=${AVSTFP_CHECK_BUDGET:-450}
PY=${PYTHON:-python3}
RES=${OUT:-bench/results}
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
run() {  # run LIMIT_S CMD...: bounded, output to the log and a short tail to stdout
    local lim=$1; shift
    if [ "$lim" -le 5 ]; then say "no time left for: $*"; return 124; fi
    timeout -k 10 "$lim" "$@" >> "$LOG" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && say "TIMEOUT after ${lim}s: $*"
    return $rc
}

say "start; budget ${TOTAL}s; results -> $RES"
{ nvidia-smi -L; "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"; } 2>&1 | tee -a "$LOG"
SIZE=${AVSTFP_CHECK_SIZE:-short}
DRY=0
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "${AVSTFP_CHECK_ALLOW_CPU:-0}" != 1 ]; then
        say "no CUDA device visible: this script is for the GPU machine (CPU: pytest bench/ --benchmark-only)"
        exit 2
    fi
    DRY=1     # plumbing test on a CPU machine: no wheels, no build
    say "AVSTFP_CHECK_ALLOW_CPU=1: dry run on CPU (no wheel install, no build), size $SIZE"
fi
if [ $DRY = 1 ]; then GPU=cpu; CAP=none; else
GPU=$("$PY" -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
CAP=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}' + ('a' if (a, b) == (9, 0) else ''))")
fi
NAME="$(date -u +%Y-%m-%d)-$GPU"

# ---- 1. wheels
if [ $DRY = 1 ]; then :
elif [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    say "installing wheels from .whl/: $(ls .whl | tr '\n' ' ')"
    run "$(min 90 "$(left)")" "$PY" -m pip install --no-index --no-deps --no-cache-dir \
        --find-links .whl .whl/*.whl || say "wheel install failed (see log)"
else
    say "no .whl/ folder: open_clip/xformers must already be installed (bench/fetch_wheels.sh)"
fi

# ---- 2. CUDA extension (only this GPU's arch: half the compile time)
export AVSTFP_CUDA_ARCHS=${AVSTFP_CUDA_ARCHS:-$CAP} MAX_JOBS=${MAX_JOBS:-16}
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
B0=$(date +%s)
if [ $DRY = 1 ]; then BUILD=skipped; else
say "building the CUDA extension for sm_$AVSTFP_CUDA_ARCHS (MAX_JOBS=$MAX_JOBS)"
run "$(min 210 $(( $(left) - 200 )))" "$PY" -m pip install --no-build-isolation --no-deps -e . \
    && BUILD=ok || BUILD=failed
fi
if "$PY" -c "import avstfp_fast._C" >> "$LOG" 2>&1; then
    say "extension built and importable ($(( $(date +%s) - B0 ))s)"
else
    say "extension NOT available after the build ($BUILD): cuda backend cases skip; no JIT build"
    export AVSTFP_NO_JIT=1 AVSTFP_BENCH_SKIP_CUDA=1
    "$PY" -c "import avstfp_fast" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- 3. GPU tests
say "GPU tests: pytest -m gpu tests/"
run "$(min 110 $(( $(left) - 150 )))" "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider -rfEs
TESTS_RC=$?
TESTS_LINE=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)|no tests ran|[0-9]+ (passed|failed|skipped)" "$LOG" | tail -1)
say "GPU tests rc=$TESTS_RC: ${TESTS_LINE:-no summary line (see log)}"

# ---- 4. benchmarks: kernels first (the core), then the CPU case and end-to-end
BENCH=(-p no:cacheprovider -q --benchmark-only --bench-size $SIZE -W ignore::UserWarning
       --benchmark-columns=median,min,rounds,iterations --benchmark-sort=name)
rm -f "$RES/e2e.json" "$RES/e2e.jsonl" "$RES/kern.json" "$RES/kern.jsonl"
KB=$(( ($(left) - 35) * 55 / 100 - 20 ))
say "benchmarks: kernels (soft budget ${KB}s)"
run $(( KB + 40 )) "$PY" -m pytest bench/test_kernels.py "${BENCH[@]}" \
    --bench-budget "$KB" --benchmark-json "$RES/kern.json" --bench-partial "$RES/kern.jsonl"
EB=$(( $(left) - 35 - 35 ))
say "benchmarks: CPU case + end-to-end (soft budget ${EB}s)"
run $(( EB + 35 )) "$PY" -m pytest bench/test_cpu.py bench/test_e2e.py "${BENCH[@]}" \
    --bench-budget "$EB" --benchmark-json "$RES/e2e.json" --bench-partial "$RES/e2e.jsonl"

# ---- 5. summary
IN=()
for f in kern e2e; do
    [ -s "$RES/$f.json" ] && IN+=("$RES/$f.json")
    [ -s "$RES/$f.jsonl" ] && IN+=("$RES/$f.jsonl")     # fills in cases a killed run lost
done
say "summarising ${IN[*]:-nothing}"
if [ ${#IN[@]} -gt 0 ]; then
    timeout -k 5 60 "$PY" bench/summarize.py "${IN[@]}" --quiet --md "$RES/$NAME.md" \
        --png "$RES/$NAME.png" --merged "$RES/$NAME.json" >> "$LOG" 2>&1 \
        && rm -f "$RES/e2e.json" "$RES/e2e.jsonl" "$RES/kern.json" "$RES/kern.jsonl"
fi
{
    echo
    echo "GPU tests (pytest -m gpu tests/): rc=$TESTS_RC ${TESTS_LINE:-}"
    echo "CUDA extension: $BUILD; files in $RES: $(ls "$RES" | tr '\n' ' ')"
    echo "total $(( $(date +%s) - T0 ))s"
    echo
} | tee -a "$LOG"
if [ -s "$RES/$NAME.md" ]; then cat "$RES/$NAME.md"; else echo "no summary written (see $LOG)"; fi
