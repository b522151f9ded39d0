#!/usr/bin/env python3
"""A repeated long system prompt: time to first token with and without prompt-prefix reuse.

An agent sends the same ~2,000-token system prompt on every turn. Each row asks QUESTIONS
questions in turn after that system prompt (streamed, temperature 0, max_tokens 8) and reports
the time to the first token of the first turn (nothing to reuse) and the median of the later
turns:

  corral serve, prefix_cache = "off"   every turn prefilled from scratch
  corral serve, prefix_cache = "key"   (the default) later turns reuse the caller's prefix
  llama.cpp (llama-cpp-python)         the peer: a Llama object reuses its longest prefix

Same model file (SmolLM2-135M-Instruct Q4_1), 2 threads each, same run.

    python3 scripts/bench-prefix-cache.py [QUESTIONS]

Needs target/release/corral, the default model (scripts/fetch-model.sh) and llama-cpp-python
(scripts/install-llama-cpp.sh).
"""
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import cpu, free_port, sse_chunks, wait_http

QUESTIONS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.expanduser("~/.local/share/corral/models/SmolLM2-135M-Instruct.Q4_1.gguf")
SYSTEM = " ".join(
    f"Rule {i}: when a customer asks about shipment {i}, look up the manifest, confirm the port "
    f"of loading and the vessel, and answer in one short sentence." for i in range(1, 61))
ASK = ["Where is shipment 7?", "Which vessel carries shipment 12?", "Is shipment 3 late?",
       "Where was shipment 44 loaded?", "Who handles shipment 21?", "When does shipment 9 arrive?",
       "Is shipment 30 insured?", "What port is shipment 18 bound for?"]


def corral_ttft(port, question):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = json.dumps({"model": "auto", "stream": True, "max_tokens": 8, "temperature": 0,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": question}]})
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"{r.status} {r.read()[:300]!r}")
    first, prompt, cached = None, 0, 0
    for c in sse_chunks(r):
        ch = c.get("choices") or [{}]
        if first is None and (ch[0].get("delta") or {}).get("content"):
            first = time.perf_counter() - t
        if c.get("usage"):
            prompt = c["usage"]["prompt_tokens"]
            cached = c["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
    conn.close()
    return first, prompt, cached


def corral_row(scope):
    port = free_port()
    tmp = tempfile.mkdtemp()
    cfg = os.path.join(tmp, "corral.toml")
    with open(cfg, "w") as f:
        f.write(f'[server]\nbind = "127.0.0.1:{port}"\n[server.pool]\nwarm = ["smollm2-135m-instruct"]\n'
                f'prefix_cache = "{scope}"\n')
    p = subprocess.Popen([os.path.join(ROOT, "target/release/corral"), "--config", cfg, "serve"],
                         env=dict(os.environ, CORRAL_LOG="warn"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port, "/readyz")
        turns = [corral_ttft(port, ASK[i % len(ASK)]) for i in range(QUESTIONS)]
    finally:
        p.terminate()
        p.wait()
    return [t[0] for t in turns], turns[0][1], [t[2] for t in turns]


def llama_row():
    from llama_cpp import Llama
    llm = Llama(model_path=MODEL, n_ctx=4096, n_threads=2, n_batch=512, verbose=False)
    out = []
    for i in range(QUESTIONS):
        t = time.perf_counter()
        first = None
        for chunk in llm.create_chat_completion(
                messages=[{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": ASK[i % len(ASK)]}],
                max_tokens=8, temperature=0, stream=True):
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t
        out.append(first if first is not None else time.perf_counter() - t)
    return out


def main():
    off, prompt, _ = corral_row("off")
    on, _, cached = corral_row("key")
    peer = llama_row()
    print(f"CPU: {cpu()}; system prompt + question: {prompt} tokens; {QUESTIONS} turns, max_tokens 8")
    print(f"{'path':<34}{'first turn ms':>15}{'later turns p50 ms':>20}")
    rows = [("corral, prefix_cache off", off), ("corral, prefix_cache key", on), ("llama.cpp (prefix reuse)", peer)]
    for name, ts in rows:
        print(f"{name:<34}{ts[0] * 1e3:15.0f}{statistics.median(ts[1:]) * 1e3:20.0f}")
    print(f"reused prompt tokens per turn (corral, key): {cached}")
    m = lambda ts: statistics.median(ts[1:])
    print(f"later turns: corral key vs off {m(off) / m(on):.1f}x faster; corral key / llama.cpp {m(on) / m(peer):.2f}x")


if __name__ == "__main__":
    main()
