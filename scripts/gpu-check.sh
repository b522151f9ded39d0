#!/usr/bin/env bash
# The GPU check of issue 22, on the GPU machine (see scripts/gpu-check-prepare.sh, run here
# first):
#   scripts/gpu-check.sh stage   # call 1: keeps target/gpu-check/a in /tmp/gpu-check; runs the
#                                # GPU kernel self-test and the sandbox-layer checks (no model)
#   scripts/gpu-check.sh run     # call 2: adds target/gpu-check/b, runs scripts/gpu-check.py
# Each report also goes to $OUT/gpu-check-{stage,run}.log when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
gc=/tmp/gpu-check
mkdir -p "$gc"
unpack() {
    mkdir -p "$gc/bin"
    for b in corral corral-runner; do
        [ -x "$gc/bin/$b" ] && continue
        python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
            "$gc/$b.xz" "$gc/bin/$b"
        chmod +x "$gc/bin/$b"
    done
}
log="${OUT:-$gc}/gpu-check-${1:-none}.log"
case "${1:-}" in
stage)
    # Call 1: what needs no model. Every kernel on the GPU against the CPU reference, and the
    # gpu sandbox's layers from inside.
    cp target/gpu-check/a/* "$gc/"
    unpack
    {
        nvidia-smi -L || true
        nvidia-smi --query-gpu=driver_version,memory.total --format=csv || true
        uname -r
        "$gc/bin/corral-runner" --gpu-self-test || echo "GPU SELF-TEST FAILED"
        python3 scripts/gpu-check.py --layers "$gc/bin/corral" || true
    } 2>&1 | tee "$log"
    ;;
run)
    # Call 2: the model's second half; the checks that need the model.
    cp target/gpu-check/b/* "$gc/"
    unpack
    mkdir -p "$gc/models"
    m="$gc/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    cat "$gc/model.part1" "$gc/model.part2" >"$m"
    [ "$(sha256sum "$m" | cut -d' ' -f1)" = "$(cat "$gc/model.sha256")" ] || {
        echo "the model's halves do not make the model (did the machine go cold between the calls?)" >&2
        exit 1
    }
    python3 -m pip install -q --no-index --no-deps --target "$gc/site" "$gc"/gguf-*.whl &&
        export PYTHONPATH="$gc/site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 CORRAL_MODEL_DIR="$gc/models"
    set -o pipefail
    python3 scripts/gpu-check.py "$m" "$gc/bin/corral-runner" "$gc/bin/corral-runner" \
        "$gc/bin/corral" 2>&1 | tee "$log"
    ;;
*)
    echo "usage: scripts/gpu-check.sh stage|run" >&2
    exit 2
    ;;
esac
