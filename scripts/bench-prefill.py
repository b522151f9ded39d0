#!/usr/bin/env python3
"""Prefill A/B: llama.cpp (llama-cpp-python) against one or more corral runner binaries on the
same GGUF, 2 threads, unsandboxed, the peers taking turns prompt by prompt (7 per round; the
round's medians and ratios printed). For comparing kernel changes: keep the runner of the old
build beside the new one and name both. Needs scripts/install-llama-cpp.sh and a release build.

    python3 scripts/bench-prefill.py MODEL.gguf [RUNNER[,RUNNER...]] [ROUNDS]

RUNNER defaults to target/release/corral-runner. `WORDS=N` prompts with N words of varied text
(different each time: no prefix reuse) instead of the 42-token chat prompt of
scripts/bench-inference.py; `CORRAL_KERNELS=avx2` and `PYTHONPATH=target/llama-cpp-avx2` put both
sides on their AVX2 builds (on an AVX-512 host)."""
import os, statistics, subprocess, sys, time
from bench_common import frame, read

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWrite a long story about a dragon who learns to paint.<|im_end|>\n<|im_start|>assistant\n")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near old river banks".split()


def prompt(k, words):
    if words:
        return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for i in range(words))
    return PROMPT


def main():
    model = os.path.expanduser(sys.argv[1])
    runners = sys.argv[2].split(",") if len(sys.argv) > 2 else [os.path.join(ROOT, "target/release/corral-runner")]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    words = int(os.environ.get("WORDS", "0"))
    from llama_cpp import Llama
    llm = Llama(model_path=model, n_ctx=4096, n_batch=2048, n_threads=2, n_threads_batch=2, verbose=False)
    procs = []
    for r in runners:
        p = subprocess.Popen([r, "--model", model, "--no-tighten", "--threads", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready = read(p)
        print(f"{r}: kernels {ready.get('kernels', '?')}")
        procs.append(p)
    k = 0
    for rnd in range(rounds):
        ms = {"llama.cpp": []}
        ms.update({r: [] for r in runners})
        for _ in range(7):
            k += 1
            text = prompt(k, words)
            ids = llm.tokenize(text.encode(), add_bos=bool(words), special=True)
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            llm.sample(temp=0.0, top_k=1)
            ms["llama.cpp"].append((time.perf_counter() - t0) * 1e3)
            for r, p in zip(runners, procs):
                frame(p, {"type": "generate", "id": k, "input": {"prompt": text}, "max_tokens": 1, "stream": False})
                d = read(p)
                ms[r].append(d["prefill_ms"])
                n = d["prompt_tokens"]
        base = statistics.median(ms["llama.cpp"])
        cols = " | ".join(f"{os.path.basename(r)} {statistics.median(ms[r]):.1f} ms ({base / statistics.median(ms[r]):.2f}x)" for r in runners)
        print(f"round {rnd + 1} ({n} tokens): llama.cpp {base:.1f} ms | {cols}", flush=True)
    for p in procs:
        frame(p, {"type": "shutdown"})
        p.wait()


if __name__ == "__main__":
    main()
