#!/usr/bin/env bash
# Build corral and show what it does on this host: what can be enforced, then a program run
# inside the `secure` sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bin corral
corral=./target/release/corral
"$corral" doctor || true
echo
echo "\$ corral sandbox exec --profile secure -- /usr/bin/id"
"$corral" sandbox exec --profile secure -- /usr/bin/id
echo "\$ corral sandbox exec --profile secure -- /bin/ls /"
"$corral" sandbox exec --profile secure -- /bin/ls /
