#!/usr/bin/env bash
# Assembles every CUDA kernel source for the real GPUs this project runs on: nvcc compiles each .cu to PTX for
# compute_80 (as build.rs does), then ptxas assembles that PTX for sm_80 (A100) and sm_90 (H100/H200) and prints
# each kernel's registers, shared memory and spills (-v). build.rs alone only proves the C++ compiles to PTX; the
# driver's JIT assembles it on the GPU at load time, so an error ptxas finds (registers, an instruction the target
# lacks) would otherwise first show on a GPU machine.
#
# Usage: scripts/ptxas-check.sh [KERNEL.cu ...]   (default: every kernel source in the repository)
# Needs nvcc and ptxas on PATH (or CUDA_ROOT/bin). Fails on the first source that does not compile or assemble,
# and on any spill.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${CUDA_ROOT:-}" ]]; then
  export PATH="$CUDA_ROOT/bin:$PATH"
fi
for tool in nvcc ptxas; do
  command -v "$tool" >/dev/null || { echo "ptxas-check: $tool not found (set CUDA_ROOT or PATH)" >&2; exit 1; }
done
if (($# == 0)); then
  set -- src/quant/cuda/nf4.cu src/ops/cuda/*.cu
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for src in "$@"; do
  stem=$(basename "$src" .cu)
  nvcc --ptx -arch=compute_80 -O3 -std=c++17 -lineinfo -o "$work/$stem.ptx" "$src"
  for arch in sm_80 sm_90; do
    log="$work/$stem.$arch.log"
    if ! ptxas -v -arch="$arch" -o /dev/null "$work/$stem.ptx" >"$log" 2>&1; then
      cat "$log" >&2
      echo "ptxas-check: $src does not assemble for $arch" >&2
      exit 1
    fi
    # One line per kernel: name, registers, shared memory, spills.
    awk -v arch="$arch" -v src="$src" '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
      /spill stores/ { spill = $0; sub(/.*frame, /, "", spill) }
      /Used [0-9]+ registers/ { regs = $0; sub(/.*Used /, "", regs); printf "%s %s %-32s %s; %s\n", src, arch, name, regs, spill }
    ' "$log"
    if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" >&2; then
      echo "ptxas-check: $src spills registers on $arch" >&2
      status=1
    fi
  done
done
exit $status
