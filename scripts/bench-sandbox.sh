#!/usr/bin/env bash
# Sandbox launch benchmark: `/bin/true` under corral's `secure` profile versus bubblewrap's
# namespace-only launch, same run, medians and ratio (hyperfine), then the library-level criterion
# bench with its per-phase breakdown. Installs bubblewrap and hyperfine if missing. Needs root.
#
# The two commands alternate in ROUNDS rounds of RUNS runs each (so drift in machine load hits
# both alike); the ratio reported is the median of the per-round ratios. corral is measured as an
# installed copy (install(1), as packages and `cargo install` put it on a machine) and, for
# reference, straight from target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
RUNS=${RUNS:-60}
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v hyperfine >/dev/null || need+=(hyperfine)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --workspace --all-targets   # as test.sh: no feature-driven rebuild
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
install -m 0755 target/release/corral "$tmp/corral"
bwrap_cmd='bwrap --unshare-all --die-with-parent --ro-bind / / --proc /proc --dev /dev /bin/true'
for i in $(seq "$ROUNDS"); do
    hyperfine -N --warmup 10 -r "$RUNS" --export-json "$tmp/round$i.json" \
        "$tmp/corral sandbox exec -p secure -- /bin/true" \
        "$bwrap_cmd" \
        './target/release/corral sandbox exec -p secure -- /bin/true' >/dev/null
done
python3 - "$tmp" "$ROUNDS" <<'PY'
import json, statistics, sys
d, rounds = sys.argv[1], int(sys.argv[2])
inst, bw, tgt, ratios = [], [], [], []
for i in range(1, rounds + 1):
    r = json.load(open(f"{d}/round{i}.json"))["results"]
    inst += r[0]["times"]; bw += r[1]["times"]; tgt += r[2]["times"]
    ratios.append(r[0]["median"] / r[1]["median"])
med = lambda xs: statistics.median(xs) * 1e3
print(f"corral secure launch (installed)  median {med(inst):6.2f} ms")
print(f"corral secure launch (target/)    median {med(tgt):6.2f} ms")
print(f"bubblewrap namespace-only launch  median {med(bw):6.2f} ms")
print(f"ratio corral/bwrap  median of {rounds} rounds {statistics.median(ratios):.2f}x "
      f"(rounds: {' '.join(f'{x:.2f}' for x in ratios)})")
PY
cargo bench --bench sandbox_launch 2>&1 | grep -E "phases|sandbox/|time:"
