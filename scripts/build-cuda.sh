#!/usr/bin/env bash
# Builds corral-runner with the forward pass on NVIDIA GPUs (the `cuda` feature), on any
# x86-64 Linux host, GPU or not: the kernels are compiled to PTX by NVRTC, taken from PyPI
# (nvidia-cuda-nvrtc-cu12 12.1: PTX that drivers from 530 on load); at run time the runner
# loads only the driver (libcuda.so.1).
#
#   scripts/build-cuda.sh           # -> target/cuda/release/corral-runner
#   scripts/build-cuda.sh --strip   # also a stripped copy, target/cuda/corral-runner
#   scripts/build-cuda.sh --clippy  # no binary: compiles the kernels and lints the GPU code
#                                   # (what scripts/test.sh runs)
#
# The CPU-only build (plain `cargo build`) stays the default. A separate target directory keeps
# the two runners apart.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=target/cuda-tools
if [ ! -e "$tools/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$tools" "nvidia-cuda-nvrtc-cu12==12.1.105"
fi
nvrtc="$PWD/$tools/nvidia/cuda_nvrtc/lib"
# cudarc looks for libnvrtc.so (unversioned) among its names too; the wheel has only .so.12.
[ -e "$nvrtc/libnvrtc.so" ] || ln -s libnvrtc.so.12 "$nvrtc/libnvrtc.so"
export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "${1:-}" = "--clippy" ]; then
    cargo clippy --release -p corral-runner --features cuda --target-dir target/cuda \
        --all-targets -- -D warnings
    exit 0
fi
cargo build --release -p corral-runner --features cuda --target-dir target/cuda
if [ "${1:-}" = "--strip" ]; then
    strip -o target/cuda/corral-runner target/cuda/release/corral-runner
    ls -l target/cuda/corral-runner
fi
echo "built target/cuda/release/corral-runner (CUDA; run it with CORRAL_RUNNER=... or corral --runner)"
