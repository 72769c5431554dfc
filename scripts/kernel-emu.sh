#!/usr/bin/env bash
# Runs the training-primitive CUDA kernels (src/ops/cuda/*.cu) on the CPU, without a GPU: g++ compiles their source
# against a small shim (scripts/kernel-emu/cuda_bf16.h: one std::thread per CUDA thread, __syncthreads as a barrier,
# warp shuffles through a shared array) and checks each kernel against its formula in double precision. It checks
# the kernels' indexing, reductions and arithmetic, not the GPU, the launch code or the Rust side: the GPU tests
# (src/ops/cuda/gpu_tests.rs) do that on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/kernel-emu"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
g++ -std=c++20 -O1 -ffp-contract=off -I. -pthread -include cuda_bf16.h emu.cpp -o "$out/emu"
"$out/emu"
