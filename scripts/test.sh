#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs every test in
# the release profile (the same profile as the binaries, so dependencies build once).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: the sandbox tests need root (namespaces, mounts, cgroups)" >&2
    exit 1
fi

cargo test --release --workspace --all-targets "$@"
