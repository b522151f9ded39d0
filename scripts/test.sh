#!/usr/bin/env bash
# The whole test suite, from a fresh machine: builds everything once in the release profile
# (the binaries and the tests share it, so dependencies build once), fetches the default model if
# absent (the runner tests need the real weights and fail without them), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: the sandbox tests need root (namespaces, mounts, cgroups)" >&2
    exit 1
fi

# tests/egress.rs runs curl inside a Restricted sandbox against an openssl s_server.
need=()
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
# The GPU kernels run under a C++ emulation of CUDA with AddressSanitizer (runner/src/gpu).
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --workspace --all-targets
# Lints are part of the suite: clippy (in the build's profile) enforces the workspace's lints,
# `undocumented_unsafe_blocks` among them; formatting is checked too.
cargo clippy --release --workspace --all-targets -- -D warnings
if cargo fmt --version >/dev/null 2>&1; then
    cargo fmt --all -- --check
fi
# The GPU runner (the `cuda` feature) keeps compiling: NVRTC (from PyPI) compiles its kernels and
# clippy lints its code. Its kernels run in the tests below under an emulation of CUDA; on a GPU,
# scripts/gpu-check.sh.
scripts/build-cuda.sh --clippy
scripts/fetch-model.sh
scripts/fetch-model.sh gemma3-270m   # the second model (tests/gemma3.rs)
# tests/serve.rs drives `corral serve` with the official OpenAI Python client, and checks
# structured answers with the `jsonschema` package.
python3 -c 'import openai, anthropic, jsonschema' 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check openai anthropic jsonschema
# tests/quantized.rs makes the other weight types with llama.cpp's own quantizer and compares
# corral's answers with llama.cpp's on each: the peer is built for this CPU (several minutes,
# once); `gguf` lists the tensor types of each file in the test's report.
scripts/install-llama-cpp.sh
python3 -c 'import gguf' 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check gguf
cargo test --release --workspace --all-targets "$@"
