#!/usr/bin/env python3
"""Inference benchmark, same machine, same run, same GGUF, greedy, 2 threads:
llama.cpp (PyPI llama-cpp-python) versus corral's runner unsandboxed versus corral sandboxed
(`corral run` under the secure profile). Prints decode tok/s, prefill tok/s, time to first token,
runner spawn + load, and the ratios; the three take turns round by round (REPS rounds, medians). Run through scripts/bench-inference.sh. Another model:
CORRAL_BENCH_MODEL=FILE.gguf CORRAL_BENCH_MODEL_ID=<catalog id> (e.g. Gemma 3 270M:
~/.local/share/corral/models/gemma-3-270m-q4_k_m.gguf, gemma3-270m)."""
import json, os, statistics, subprocess, time
from bench_common import frame, read

MODEL = os.path.expanduser(os.environ.get("CORRAL_BENCH_MODEL", "~/.local/share/corral/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CORRAL = os.path.join(ROOT, "target/release/corral")
RUNNER = os.path.join(ROOT, "target/release/corral-runner")
N = 128
REPS = int(os.environ.get("REPS", "3"))
PREFILLS = 7  # prompt-only runs per round for the prefill figure
USER = "Write a long story about a dragon who learns to paint."
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n")


class LlamaCpp:
    def __init__(self):
        from llama_cpp import Llama
        t0 = time.perf_counter()
        self.llm = Llama(model_path=MODEL, n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.ids = self.llm.tokenize(PROMPT.encode(), add_bos=False, special=True)

    def prefill_ms(self):
        """The prompt alone: milliseconds."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(self.ids)
        self.llm.sample(temp=0.0, top_k=1)
        return (time.perf_counter() - t0) * 1e3

    def rep(self):
        llm, ids = self.llm, self.ids
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = llm.sample(temp=0.0, top_k=1)
        t1 = time.perf_counter()
        for _ in range(N - 1):
            llm.eval([tok])
            tok = llm.sample(temp=0.0, top_k=1)
        t2 = time.perf_counter()
        return {"prefill_tps": len(ids) / (t1 - t0), "ttft_ms": (t1 - t0) * 1e3, "decode_tps": (N - 1) / (t2 - t1)}


class Runner:
    """corral's runner, unsandboxed, kept loaded across rounds (CORRAL_KERNELS passes through)."""

    def __init__(self):
        t0 = time.perf_counter()
        self.p = subprocess.Popen([RUNNER, "--model", MODEL, "--no-tighten", "--threads", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ready = read(self.p)
        self.load_ms = (time.perf_counter() - t0) * 1e3

    def rep(self):
        frame(self.p, {"type": "generate", "id": 1, "input": {"prompt": PROMPT}, "max_tokens": N, "stream": False, "ignore_eos": True})
        d = read(self.p)
        self.prompt_tokens = d["prompt_tokens"]
        return {"prefill_tps": d["prompt_tokens"] / (d["prefill_ms"] / 1e3), "ttft_ms": d["ttft_ms"], "decode_tps": d["decode_tokens_per_s"]}

    def prefill_ms(self):
        """The prompt alone (one token answered): the runner's prefill milliseconds."""
        frame(self.p, {"type": "generate", "id": 2, "input": {"prompt": PROMPT}, "max_tokens": 1, "stream": False})
        return read(self.p)["prefill_ms"]

    def close(self):
        frame(self.p, {"type": "shutdown"})
        self.p.wait()


def sandboxed_rep():
    """One `corral run` under the secure profile: spawn, sandbox, load, answer."""
    model = ["--model", os.environ["CORRAL_BENCH_MODEL_ID"]] if os.environ.get("CORRAL_BENCH_MODEL_ID") else []
    r = subprocess.run([CORRAL, "run", "--json", "--ignore-eos", "--max-tokens", str(N), *model, USER], capture_output=True, check=True)
    v = json.loads(r.stdout)
    t = v["timings"]
    return {"load_ms": t["startup_ms"], "prefill_tps": v["usage"]["prompt_tokens"] / (t["prefill_ms"] / 1e3), "ttft_ms": t["ttft_ms"], "decode_tps": t["decode_tokens_per_s"]}


def median(rows):
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def cpu():
    """The CPU model and the vector extensions that matter here, from /proc/cpuinfo."""
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = set(next((l.split(":", 1)[1] for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split())
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile"]
    return f"{model} [{' '.join(f for f in wanted if f in flags)}]"


def main():
    print(f"CPU: {cpu()}, 2 threads, model {os.path.basename(MODEL)}")
    # `corral run` loads catalog models: a file outside the catalog (CORRAL_BENCH_MODEL without
    # CORRAL_BENCH_MODEL_ID, e.g. tests/quantized.rs's files) is measured unsandboxed only.
    sandboxed = "CORRAL_BENCH_MODEL" not in os.environ or bool(os.environ.get("CORRAL_BENCH_MODEL_ID"))
    llama, runner = LlamaCpp(), Runner()
    print(f"corral kernels: {runner.ready.get('kernels', '?')}")
    rounds = {"llama.cpp": [], "corral (unsandboxed)": [], "corral (sandboxed, secure)": []}
    # The peers take turns, round by round: this VM's speed drifts by 10-20% within minutes, and
    # a drift shared by both sides of a round cancels in its ratio.
    ratios = []
    for i in range(REPS):
        l, u = llama.rep(), runner.rep()
        # Prefill: PREFILLS prompt-only runs each, taking turns one by one (a 42-token prefill
        # takes ~0.1 s: too short for one measurement on this VM); the medians.
        lp, up = [], []
        for _ in range(PREFILLS):
            lp.append(llama.prefill_ms())
            up.append(runner.prefill_ms())
        l["prefill_tps"] = len(llama.ids) / (statistics.median(lp) / 1e3)
        u["prefill_tps"] = runner.prompt_tokens / (statistics.median(up) / 1e3)
        rounds["llama.cpp"].append(l)
        rounds["corral (unsandboxed)"].append(u)
        if sandboxed:
            rounds["corral (sandboxed, secure)"].append(sandboxed_rep())
        ratios.append((u['decode_tps'] / l['decode_tps'], u['prefill_tps'] / l['prefill_tps']))
        print(f"round {i + 1}: decode {ratios[-1][0]:.2f}x, prefill {ratios[-1][1]:.2f}x")
    runner.close()
    res = {"llama.cpp": {"load_ms": llama.load_ms, "prompt_tokens": len(llama.ids), **median(rounds["llama.cpp"])},
           "corral (unsandboxed)": {"load_ms": runner.load_ms, "runner_load_ms": runner.ready["load_ms"], **median(rounds["corral (unsandboxed)"])}}
    if sandboxed:
        res["corral (sandboxed, secure)"] = median(rounds["corral (sandboxed, secure)"])
    print(f"{'':28} {'decode tok/s':>12} {'prefill tok/s':>13} {'ttft ms':>8} {'spawn+load ms':>14}")
    for k, v in res.items():
        print(f"{k:28} {v['decode_tps']:12.1f} {v['prefill_tps']:13.1f} {v['ttft_ms']:8.1f} {v['load_ms']:14.1f}")
    l, u = res["llama.cpp"], res["corral (unsandboxed)"]
    s = res.get("corral (sandboxed, secure)")
    boxed = f" (sandboxed {s['decode_tps'] / l['decode_tps']:.2f}x)" if s else " (not measured sandboxed: not a catalog model)"
    print(f"\ndecode: corral/llama.cpp = {u['decode_tps'] / l['decode_tps']:.2f}x{boxed}")
    print(f"prefill: corral/llama.cpp = {u['prefill_tps'] / l['prefill_tps']:.2f}x")
    print(f"median of the rounds' ratios (drift within a round cancels): decode "
          f"{statistics.median(r[0] for r in ratios):.2f}x, prefill {statistics.median(r[1] for r in ratios):.2f}x")
    if s:
        print(f"sandbox overhead on decode: {100 * (1 - s['decode_tps'] / u['decode_tps']):.1f}%")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
