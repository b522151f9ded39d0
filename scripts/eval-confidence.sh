#!/usr/bin/env bash
# Confidence evaluation of the default model (see examples/eval-confidence.rs and
# docs/confidence.md): AUROC of each confidence method for predicting correctness, and accuracy of
# the most confident 20/30/50% of answers. Needs root (the runner runs in its sandbox).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
cargo build --release --workspace --all-targets   # same features as the tests: no rebuild
./target/release/examples/eval-confidence "$@"
