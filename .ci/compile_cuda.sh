#!/usr/bin/env bash
# CI step: compile every csrc/*.cu with nvcc for sm_80 and sm_90a (-c only, no torch
# headers), two files at a time.  ptxas -v output (registers, spills per kernel) stays in
# OUTDIR/<file>.o.log for bench/static_sm90_cuda.py.  Fails loudly (non-zero exit, nvcc output shown) if any
# file does not compile.  Usage: .ci/compile_cuda.sh [outdir]   (env: NVCC, JOBS)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-}"
if [ -z "$NVCC" ]; then
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC="$CUDA_HOME/bin/nvcc"
  elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
  else NVCC="$(command -v nvcc || true)"; fi
fi
if [ -z "$NVCC" ]; then echo "compile_cuda.sh: nvcc not found (set CUDA_HOME or NVCC)" >&2; exit 2; fi

OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
JOBS="${JOBS:-2}"
# Same defines as torch's extension build (half/bf16 operators disabled) so that code which
# compiles here also compiles inside the CUDAExtension.
FLAGS=(-c -std=c++17 -O3 -lineinfo -Xptxas=-warn-spills -Xptxas=-v
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -Icsrc)

if grep -lE '#include *[<"](torch|ATen|c10)/' csrc/*.cu csrc/*.cuh csrc/*.h 2>/dev/null; then
  echo "compile_cuda.sh: the files above include torch headers; kernels must not" >&2; exit 1
fi

echo "nvcc: $("$NVCC" --version | tail -1)"
start=$(date +%s)
export NVCC OUT
printf '%s\n' "${FLAGS[@]}" > "$OUT/flags.txt"
status=0
ls csrc/*.cu | xargs -P "$JOBS" -I{} bash -c '
  f="{}"; o="$OUT/$(basename "$f" .cu).o"; t0=$(date +%s)
  mapfile -t fl < "$OUT/flags.txt"
  if "$NVCC" "${fl[@]}" "$f" -o "$o" > "$o.log" 2>&1; then
    echo "ok   $f ($(( $(date +%s) - t0 )) s)"; grep -i "warning" "$o.log" | sort -u | head -20 || true
  else
    echo "FAIL $f"; cat "$o.log"; exit 255
  fi' || status=1
echo "compile_cuda.sh: total $(( $(date +%s) - start )) s"
if [ "$status" != 0 ]; then echo "compile_cuda.sh: CUDA sources FAILED to compile" >&2; exit 1; fi
echo "compile_cuda.sh: all CUDA sources compiled for sm_80 and sm_90a"
