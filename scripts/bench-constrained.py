#!/usr/bin/env python3
"""Constrained decoding against llama.cpp, same machine, same run, same GGUF, 2 threads:
decode tok/s free versus under a JSON schema for llama.cpp (llama-cpp-python, its GBNF grammar
built from the schema by LlamaGrammar.from_json_schema) and for corral's runner (unsandboxed,
llguidance), the cost of each, corral's mask time per token, and a local tool call (corral only:
llama.cpp's Python binding has no grammar-constrained tool calls to compare with). Run through
scripts/bench-constrained.sh."""
import json, os, statistics, subprocess, time
from bench_common import frame, read

MODEL = os.path.expanduser(os.environ.get("CORRAL_BENCH_MODEL", "~/.local/share/corral/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RUNNER = os.path.join(ROOT, "target/release/corral-runner")
N = 160
REPS = int(os.environ.get("REPS", "5"))
USER = "List as many European cities as you can, as JSON."
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n")
# Long answers (20 to 40 short strings) so that decode speed, not the first tokens, dominates.
SCHEMA = {"type": "object", "properties": {"cities": {"type": "array", "minItems": 20, "maxItems": 40,
          "items": {"type": "string", "maxLength": 24}}}, "required": ["cities"], "additionalProperties": False}
TOOLS = {"functions": [{"name": "plan_trip", "description": "Plan a trip through cities",
                        "parameters": {"type": "object", "properties": {
                            "cities": {"type": "array", "minItems": 10, "maxItems": 20, "items": {"type": "string", "maxLength": 24}},
                            "days": {"type": "integer", "minimum": 1, "maximum": 30},
                            "mode": {"enum": ["train", "car", "plane"]}},
                            "required": ["cities", "days", "mode"]}}],
         "choice": {"type": "required"}, "parallel": False}


def llama_cpp():
    from llama_cpp import Llama, LlamaGrammar
    llm = Llama(model_path=MODEL, n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    eos = llm.token_eos()

    def run(seed, grammar):
        llm.reset()
        llm.set_seed(seed)
        gen = llm.generate(ids, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, grammar=grammar, reset=True)
        n, t1 = 0, None
        for tok in gen:
            if n == 0:
                t1 = time.perf_counter()
            if grammar is not None and tok == eos:
                break
            n += 1
            if n >= N:
                break
        return n, (n - 1) / (time.perf_counter() - t1)

    free, con, lens = [], [], []
    for seed in range(REPS):
        free.append(run(seed, None)[1])
        # A fresh grammar per answer (its state advances as tokens are accepted).
        n, tps = run(seed, LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False))
        con.append(tps)
        lens.append(n)
    return {"free": statistics.median(free), "json": statistics.median(con), "json_tokens": statistics.median(lens)}


def corral():
    p = subprocess.Popen([RUNNER, "--model", MODEL, "--no-tighten", "--threads", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    read(p)

    def run(seed, extra, messages=False):
        inp = {"messages": [{"role": "user", "content": USER}]} if messages else {"prompt": PROMPT}
        frame(p, {"type": "generate", "id": 1, "input": inp, "max_tokens": N, "stream": False,
                  "ignore_eos": not extra, "sampling": {"temperature": 1.0, "seed": seed}, **extra})
        d = read(p)
        assert d["type"] == "done", d
        return d

    free, con, lens, mask, tool, tool_mask, tool_lens = [], [], [], [], [], [], []
    for seed in range(REPS):
        free.append(run(seed, {})["decode_tokens_per_s"])
        d = run(seed, {"constraint": {"type": "json_schema", "schema": SCHEMA}})
        json.loads(d["text"]) if d["finish_reason"] == "stop" else None
        con.append(d["decode_tokens_per_s"])
        lens.append(d["completion_tokens"])
        mask.append(d.get("constraint_ms", 0.0) * 1e3 / d["completion_tokens"])
        d = run(seed, {"tools": TOOLS}, messages=True)
        assert d.get("tool_calls") or d["finish_reason"] == "length", d
        tool.append(d["decode_tokens_per_s"])
        tool_lens.append(d["completion_tokens"])
        tool_mask.append(d.get("constraint_ms", 0.0) * 1e3 / d["completion_tokens"])
    frame(p, {"type": "shutdown"})
    p.wait()
    med = statistics.median
    return {"free": med(free), "json": med(con), "json_tokens": med(lens), "mask_us": med(mask),
            "tool": med(tool), "tool_tokens": med(tool_lens), "tool_mask_us": med(tool_mask)}


def main():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    isa = "AVX-512" if " avx512f " in flags else "AVX2" if " avx2 " in flags else "no AVX2"
    print(f"CPU: {cpu} ({isa}), 2 threads, temperature 1, median of {REPS} seeds, up to {N} tokens")
    l = llama_cpp()
    c = corral()
    cost = lambda r: (1 - r["json"] / r["free"]) * 100
    print(f"| | free decode tok/s | JSON schema tok/s (tokens) | cost |")
    print(f"| --- | --- | --- | --- |")
    print(f"| llama.cpp (GBNF) | {l['free']:.1f} | {l['json']:.1f} ({l['json_tokens']:.0f}) | {cost(l):.1f}% |")
    print(f"| corral runner (llguidance) | {c['free']:.1f} | {c['json']:.1f} ({c['json_tokens']:.0f}) | {cost(c):.1f}% |")
    print(f"corral / llama.cpp under the schema: {c['json'] / l['json']:.2f}x (free: {c['free'] / l['free']:.2f}x)")
    print(f"corral mask + grammar update per token: {c['mask_us']:.0f} us (JSON schema), {c['tool_mask_us']:.0f} us (tool call)")
    # The tool prompt (the built-in tool list) is ~6x longer than the JSON one, which slows every
    # decode step by itself; the constraint's share of the decode time is what it costs.
    print(f"corral tool call (required, one function): {c['tool']:.1f} tok/s over {c['tool_tokens']:.0f} tokens; "
          f"constraint {c['tool_mask_us'] * c['tool'] / 1e4:.1f}% of the decode time "
          f"(JSON schema: {c['mask_us'] * c['json'] / 1e4:.1f}%)")


if __name__ == "__main__":
    main()
