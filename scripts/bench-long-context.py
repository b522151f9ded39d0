#!/usr/bin/env python3
"""Long-context speed, same machine, same run, same GGUF, 2 threads: prefill of a ~1,100-token and
a ~2,000-token prompt (llama.cpp through llama-cpp-python versus corral's runner, unsandboxed,
taking turns), and corral's decode speed over 600 greedy tokens and at temperature 1 (the
sampler's cost). Needs
scripts/install-llama-cpp.sh and a release build (scripts/bench-inference.sh does both)."""
import json, os, statistics, struct, subprocess, time

MODEL = os.path.expanduser(os.environ.get("CORRAL_BENCH_MODEL", "~/.local/share/corral/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target/release/corral-runner")
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
LONGS = [" ".join([SENTENCE] * 80), " ".join([SENTENCE] * 145)]  # ~1,100 and ~2,000 tokens


class LlamaCpp:
    def __init__(self):
        from llama_cpp import Llama
        self.llm = Llama(model_path=MODEL, n_ctx=4096, n_threads=2, n_threads_batch=2, n_batch=2048, verbose=False)

    def prefill(self, text):
        """Tokens and seconds of one prefill of `text`."""
        ids = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return len(ids), time.perf_counter() - t0


class Corral:
    def __init__(self):
        self.p = subprocess.Popen([RUNNER, "--model", MODEL, "--no-tighten", "--threads", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.read()

    def frame(self, o):
        b = json.dumps(o).encode()
        self.p.stdin.write(struct.pack("<I", len(b)) + b)
        self.p.stdin.flush()

    def read(self):
        n = struct.unpack("<I", self.p.stdout.read(4))[0]
        return json.loads(self.p.stdout.read(n))

    def gen(self, prompt, n, temp):
        self.frame({"type": "generate", "id": 1, "input": {"prompt": prompt}, "max_tokens": n, "stream": False,
                    "ignore_eos": True, "sampling": {"temperature": temp, "seed": 1}})
        return self.read()

    def prefill(self, text):
        d = self.gen(text, 1, 0.0)
        return d["prompt_tokens"], d["prefill_ms"] / 1e3

    def close(self):
        self.frame({"type": "shutdown"})
        self.p.wait()


llama, runner = LlamaCpp(), Corral()
for text in LONGS:
    # Two rounds, the peers taking turns; the faster of each side's two.
    rounds = [(llama.prefill(text), runner.prefill(text)) for _ in range(2)]
    (n, _), (m, _) = rounds[0]
    l_pre = min(r[0][1] for r in rounds)
    c_pre = min(r[1][1] for r in rounds)
    print(f"prefill of {n} tokens (corral: {m}): llama.cpp {l_pre:.2f} s, corral {c_pre:.2f} s ({l_pre / c_pre:.2f}x)")
long_decode = statistics.median(runner.gen("Write a long story about a dragon.", 600, 0.0)["decode_tokens_per_s"] for _ in range(2))
greedy = statistics.median(runner.gen("Write a long story about a dragon.", 128, 0.0)["decode_tokens_per_s"] for _ in range(3))
hot = statistics.median(runner.gen("Write a long story about a dragon.", 128, 1.0)["decode_tokens_per_s"] for _ in range(3))
runner.close()
print(f"corral decode: 600 greedy tokens {long_decode:.1f} tok/s; 128 tokens greedy {greedy:.1f}, temperature 1 {hot:.1f} tok/s")
