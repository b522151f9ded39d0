#!/usr/bin/env bash
# Sandbox launch benchmark: `/bin/true` under corral's `secure` profile versus bubblewrap's
# namespace-only launch, same run, medians and ratio (hyperfine), then the library-level criterion
# bench with its per-phase breakdown. Installs bubblewrap and hyperfine if missing. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v hyperfine >/dev/null || need+=(hyperfine)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --workspace --all-targets   # as test.sh: no feature-driven rebuild
out=$(mktemp)
hyperfine -N --warmup 10 -r 100 --export-json "$out" \
    './target/release/corral sandbox exec -p secure -- /bin/true' \
    'bwrap --unshare-all --die-with-parent --ro-bind / / --proc /proc --dev /dev /bin/true' >/dev/null
python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
c, b = r[0]["median"] * 1e3, r[1]["median"] * 1e3
print(f"corral secure launch  median {c:6.2f} ms")
print(f"bubblewrap launch     median {b:6.2f} ms")
print(f"ratio corral/bwrap    {c / b:.2f}x")
PY
rm -f "$out"
cargo bench --bench sandbox_launch 2>&1 | grep -E "phases|sandbox/|time:"
