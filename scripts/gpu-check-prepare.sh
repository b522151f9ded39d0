#!/usr/bin/env bash
# Prepares the GPU check of issue 22 here, for a GPU machine that cannot fetch anything and takes
# at most 64 MiB per call: the CUDA runner (stripped; it computes on the CPU too, so one binary
# serves both sides of the comparison), the supervisor (stripped), both xz-compressed, the
# transformers GGUF reader (gguf wheel), and the default model split in two halves:
#
#   target/gpu-check/a   binaries, wheel, first half of the model   (carry it in call 1)
#   target/gpu-check/b   second half of the model                   (carry it in call 2)
#
# Then, on the device machine, two calls in a row (a warm machine keeps /tmp between them):
#   call 1, carry ["target/gpu-check/a"]:  scripts/gpu-check.sh stage
#   call 2, carry ["target/gpu-check/b"]:  scripts/gpu-check.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-cuda.sh --strip
# The same build as scripts/test.sh (another feature set would rebuild the dependencies).
cargo build --release --workspace --all-targets
model="${CORRAL_MODEL_DIR:-$HOME/.local/share/corral/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$model" ] || scripts/fetch-model.sh
out=target/gpu-check
rm -rf "$out" && mkdir -p "$out/a" "$out/b"
strip -o "$out/corral" target/release/corral
xz -9 -T2 -c "$out/corral" >"$out/a/corral.xz" && rm "$out/corral"
xz -9 -T2 -c target/cuda/corral-runner >"$out/a/corral-runner.xz"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$out/a" gguf
half=$(( ($(stat -c %s "$model") + 1) / 2 ))
head -c "$half" "$model" >"$out/a/model.part1"
tail -c +"$((half + 1))" "$model" >"$out/b/model.part2"
sha256sum "$model" | cut -d' ' -f1 >"$out/a/model.sha256"
du -sh "$out/a" "$out/b"
