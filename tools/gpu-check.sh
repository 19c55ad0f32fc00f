#!/usr/bin/env bash
# Runs the GPU check on a machine with an NVIDIA GPU and no toolchain or network:
#
#   cargo xtask gpu-check          # here: builds gpu-check/gpu_check with --features cuda
#   tools/gpu-check.sh OUT_DIR     # there, from the repository root (gpu-check/ carried along)
#
# burn-cuda compiles its kernels at run time with NVRTC, which needs the CUDA headers
# (CUDA_PATH, default /usr/local/cuda) and libnvrtc on the loader path; this finds both.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check/out}
shift || true
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv || true
if [ -z "${CUDA_PATH:-}" ]; then
  for d in /usr/local/cuda /opt/cuda; do
    if [ -d "$d/include" ]; then export CUDA_PATH=$d; break; fi
  done
  if [ -z "${CUDA_PATH:-}" ] && command -v nvcc >/dev/null; then
    CUDA_PATH=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_PATH
  fi
fi
if ! ldconfig -p | grep -q 'libnvrtc\.so'; then
  lib=$(ls "${CUDA_PATH:-/usr/local/cuda}"/lib64/libnvrtc.so* 2>/dev/null | head -1)
  if [ -z "$lib" ]; then lib=$(find / -xdev -name 'libnvrtc.so*' 2>/dev/null | head -1); fi
  if [ -n "$lib" ]; then export LD_LIBRARY_PATH="$(dirname "$lib"):${LD_LIBRARY_PATH:-}"; fi
fi
echo "CUDA_PATH=${CUDA_PATH:-unset} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
gpu-check/gpu_check --out "$out" "$@" 2>&1 | tee "$out/gpu-check.log"
