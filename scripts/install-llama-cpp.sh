#!/usr/bin/env bash
# Installs the llama.cpp peer (llama-cpp-python 0.3.36, built from source: several minutes) when
# it is missing. GGML_NATIVE stays off: on AMX-capable VMs a native build dies with a general
# protection fault at `ldtilecfg`; the instruction sets are chosen from /proc/cpuinfo instead.
set -euo pipefail
python3 -c "import llama_cpp" 2>/dev/null && exit 0
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
if [[ " $flags " == *" avx512f "* ]]; then
    args+=" -DGGML_AVX512=ON"
    [[ " $flags " == *" avx512_vnni "* ]] && args+=" -DGGML_AVX512_VNNI=ON"
    [[ " $flags " == *" avx512_bf16 "* ]] && args+=" -DGGML_AVX512_BF16=ON"
    [[ " $flags " == *" avx512vbmi "* ]] && args+=" -DGGML_AVX512_VBMI=ON"
fi
[[ " $flags " == *" avx_vnni "* ]] && args+=" -DGGML_AVX_VNNI=ON"
echo "building llama-cpp-python 0.3.36 with CMAKE_ARGS=\"$args\"" >&2
CMAKE_ARGS="$args" python3 -m pip install --quiet --no-cache-dir "llama-cpp-python==0.3.36"
