#!/usr/bin/env bash
# Confidence evaluation (see examples/eval-confidence.rs and docs/confidence.md): answers the
# labelled set examples/data/confidence-set.jsonl with the default model and with Gemma 3 270M in
# their sandboxes, fits each model's calibrator on the set's tuning part, reports every score on
# the test part (AUROC with a bootstrap interval, accuracy at 20/30/50% coverage, calibration
# error) and draws the reliability diagram docs/confidence-reliability.png.
#
#   scripts/eval-confidence.sh [--rerun] [--write-calibrator]
#
# Answers are kept in target/confidence/ and reused unless --rerun (answering the set takes
# ~20 minutes per model on 2 cores); --write-calibrator stores the fits in models/calibrators/.
# Needs root (the runner runs in its sandbox).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
scripts/fetch-model.sh gemma3-270m >/dev/null
cargo build --release --workspace --all-targets   # same features as the tests: no rebuild
python3 -c 'import matplotlib' 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check matplotlib
mkdir -p target/confidence
for model in smollm2-135m-instruct gemma3-270m; do
    ./target/release/examples/eval-confidence --model "$model" "$@" |
        tee "target/confidence/$model-report.md"
done
python3 scripts/plot-reliability.py docs/confidence-reliability.png \
    target/confidence/smollm2-135m-instruct-report.json target/confidence/gemma3-270m-report.json
