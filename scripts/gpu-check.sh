#!/usr/bin/env bash
# The GPU check of issue 22, on the GPU machine (see scripts/gpu-check-prepare.sh, run here
# first):
#   scripts/gpu-check.sh stage   # call 1: keeps target/gpu-check/a in /tmp/gpu-check
#   scripts/gpu-check.sh run     # call 2: adds target/gpu-check/b, runs scripts/gpu-check.py
# The report also goes to $OUT/gpu-check.log when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
gc=/tmp/gpu-check
mkdir -p "$gc"
case "${1:-}" in
stage)
    cp target/gpu-check/a/* "$gc/"
    ls -l "$gc"
    ;;
run)
    cp target/gpu-check/b/* "$gc/"
    mkdir -p "$gc/models" "$gc/bin"
    m="$gc/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    cat "$gc/model.part1" "$gc/model.part2" >"$m"
    [ "$(sha256sum "$m" | cut -d' ' -f1)" = "$(cat "$gc/model.sha256")" ] || {
        echo "the model's halves do not make the model" >&2
        exit 1
    }
    for b in corral corral-runner; do
        python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
            "$gc/$b.xz" "$gc/bin/$b"
        chmod +x "$gc/bin/$b"
    done
    python3 -m pip install -q --no-index --no-deps --target "$gc/site" "$gc"/gguf-*.whl &&
        export PYTHONPATH="$gc/site${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi -L || true
    nvidia-smi --query-gpu=driver_version,memory.total --format=csv || true
    uname -r
    export PYTHONUNBUFFERED=1 CORRAL_MODEL_DIR="$gc/models"
    set -o pipefail
    python3 scripts/gpu-check.py "$m" "$gc/bin/corral-runner" "$gc/bin/corral-runner" \
        "$gc/bin/corral" 2>&1 | tee "${OUT:-$gc}/gpu-check.log"
    ;;
*)
    echo "usage: scripts/gpu-check.sh stage|run" >&2
    exit 2
    ;;
esac
