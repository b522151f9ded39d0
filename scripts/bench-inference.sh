#!/usr/bin/env bash
# Inference benchmark against llama.cpp on the same GGUF, in the same run (see
# scripts/bench-inference.py). Installs llama-cpp-python (built from source: several minutes
# the first time) when missing. Needs root for the sandboxed runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-llama-cpp.sh
cargo build --release --workspace --all-targets   # as test.sh: no feature-driven rebuild
scripts/fetch-model.sh >/dev/null
python3 scripts/bench-inference.py
