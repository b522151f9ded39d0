#!/usr/bin/env bash
# Build corral, fetch the default model if absent, and answer a prompt with SmolLM2 running in
# the `secure` sandbox. Pass your own prompt as arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

# The same build as scripts/test.sh (features unify the same way), so running both builds
# the dependencies once.
cargo build --release --workspace --all-targets
scripts/fetch-model.sh
prompt=${*:-"What are the three primary colors?"}
./target/release/corral run "$prompt"
