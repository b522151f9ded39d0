#!/usr/bin/env bash
# Installs the llama.cpp peer (llama-cpp-python 0.3.36, built from source: several minutes) when
# it is missing. GGML_NATIVE stays off: on AMX-capable VMs a native build dies with a general
# protection fault at `ldtilecfg`; the instruction sets are chosen from /proc/cpuinfo instead.
#
# On a CPU with AVX-512 the peer uses it, and a second, AVX2-only build goes into
# target/llama-cpp-avx2: the exactness references (scripts/reference_llama.py) come from ggml's
# AVX2 kernels, whose arithmetic corral's kernels reproduce.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
base="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
if ! python3 -c "import llama_cpp" 2>/dev/null; then
    args="$base"
    if [[ " $flags " == *" avx512f "* ]]; then
        args+=" -DGGML_AVX512=ON"
        [[ " $flags " == *" avx512_vnni "* ]] && args+=" -DGGML_AVX512_VNNI=ON"
        [[ " $flags " == *" avx512_bf16 "* ]] && args+=" -DGGML_AVX512_BF16=ON"
        [[ " $flags " == *" avx512vbmi "* ]] && args+=" -DGGML_AVX512_VBMI=ON"
    fi
    [[ " $flags " == *" avx_vnni "* ]] && args+=" -DGGML_AVX_VNNI=ON"
    echo "building llama-cpp-python 0.3.36 with CMAKE_ARGS=\"$args\"" >&2
    CMAKE_ARGS="$args" python3 -m pip install --quiet --no-cache-dir "llama-cpp-python==0.3.36"
fi
ref="$root/target/llama-cpp-avx2"
if [[ " $flags " == *" avx512f "* ]] && [ ! -d "$ref/llama_cpp" ]; then
    echo "building the AVX2-only reference llama-cpp-python 0.3.36 into $ref" >&2
    CMAKE_ARGS="$base" python3 -m pip install --quiet --no-cache-dir --no-deps \
        --target "$ref" "llama-cpp-python==0.3.36"
fi
