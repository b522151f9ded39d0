#!/usr/bin/env bash
# Constrained decoding (JSON schema, tool call) against llama.cpp's grammar-constrained decoding
# on the same GGUF, in the same run (see scripts/bench-constrained.py). Installs the llama.cpp
# peer when missing (several minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-llama-cpp.sh
cargo build --release --workspace --all-targets   # as test.sh: no feature-driven rebuild
scripts/fetch-model.sh >/dev/null
python3 scripts/bench-constrained.py
