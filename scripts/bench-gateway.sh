#!/usr/bin/env bash
# Gateway overhead of `corral serve` versus the LiteLLM proxy, same upstream, same run (see
# scripts/bench-gateway.py). Builds like test.sh; installs litellm[proxy] from PyPI if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --all-targets
exec python3 scripts/bench-gateway.py "$@"
