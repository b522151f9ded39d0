#!/usr/bin/env bash
# Escalated answers' time to first byte and total time through `corral serve`, with the LiteLLM
# proxy as the remote-only peer, same run (see scripts/bench-escalation.py). Builds like test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --all-targets
scripts/fetch-model.sh >/dev/null
exec python3 scripts/bench-escalation.py "$@"
