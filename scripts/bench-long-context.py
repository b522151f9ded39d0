#!/usr/bin/env python3
"""Long-context speed, same machine, same run, same GGUF, 2 threads: prefill of a ~1,100-token
prompt (llama.cpp through llama-cpp-python versus corral's runner, unsandboxed), and corral's
decode speed over 600 greedy tokens and at temperature 1 (the sampler's cost). Needs
scripts/install-llama-cpp.sh and a release build (scripts/bench-inference.sh does both)."""
import json, os, statistics, struct, subprocess, time

MODEL = os.path.expanduser(os.environ.get("CORRAL_BENCH_MODEL", "~/.local/share/corral/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target/release/corral-runner")
LONG = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 80)


def llama_cpp_prefill():
    from llama_cpp import Llama
    llm = Llama(model_path=MODEL, n_ctx=2048, n_threads=2, n_threads_batch=2, n_batch=2048, verbose=False)
    ids = llm.tokenize(LONG.encode(), add_bos=False, special=True)
    times = []
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        times.append(time.perf_counter() - t0)
    return len(ids), min(times)


def corral():
    p = subprocess.Popen([RUNNER, "--model", MODEL, "--no-tighten", "--threads", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def frame(o):
        b = json.dumps(o).encode()
        p.stdin.write(struct.pack("<I", len(b)) + b)
        p.stdin.flush()

    def read():
        n = struct.unpack("<I", p.stdout.read(4))[0]
        return json.loads(p.stdout.read(n))

    def gen(prompt, n, temp):
        frame({"type": "generate", "id": 1, "input": {"prompt": prompt}, "max_tokens": n, "stream": False,
               "ignore_eos": True, "sampling": {"temperature": temp, "seed": 1}})
        return read()

    read()
    prefill = min(gen(LONG, 2, 0.0)["prefill_ms"] for _ in range(2)) / 1e3
    long_decode = statistics.median(gen("Write a long story about a dragon.", 600, 0.0)["decode_tokens_per_s"] for _ in range(2))
    greedy = statistics.median(gen("Write a long story about a dragon.", 128, 0.0)["decode_tokens_per_s"] for _ in range(3))
    hot = statistics.median(gen("Write a long story about a dragon.", 128, 1.0)["decode_tokens_per_s"] for _ in range(3))
    frame({"type": "shutdown"})
    p.wait()
    return prefill, long_decode, greedy, hot


n, l_pre = llama_cpp_prefill()
c_pre, c_long, c_greedy, c_hot = corral()
print(f"prefill of {n} tokens: llama.cpp {l_pre:.1f} s, corral {c_pre:.1f} s ({l_pre / c_pre:.2f}x)")
print(f"corral decode: 600 greedy tokens {c_long:.1f} tok/s; 128 tokens greedy {c_greedy:.1f}, temperature 1 {c_hot:.1f} tok/s")
