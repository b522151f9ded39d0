#!/usr/bin/env python3
"""Many requests, one runner: aggregate decode speed and time to first token under concurrency.

For N concurrent streams (1, 2, 4, 8 by default) each row sends N streamed completions at once
(greedy continuations of counts, so none ends early; max_tokens TOKENS each) and reports the
aggregate decode speed (tokens that arrived while all N streams were decoding — from the last
stream's first token to the first stream's end — over that window), the overall speed (all
tokens over the wall time from sending to the last token, prefills included) and the p50/p99
time to first token:

  one runner, slots = N        continuous batching: one pass over the weights per step for all
  N runners, slots = 1         the same number of single-sequence runners (each its own copy of
                               the model and threads, fighting for the same cores)

Same model file (SmolLM2-135M-Instruct Q4_1), the `secure` profile, same run.

    python3 scripts/bench-batching.py [TOKENS] [N ...]

Needs target/release/corral and the default model (scripts/fetch-model.sh).
"""
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench_common import cpu, free_port, sse_chunks, wait_http

TOKENS = int(sys.argv[1]) if len(sys.argv) > 1 else 128
COUNTS = [int(a) for a in sys.argv[2:]] or [1, 2, 4, 8]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["1, 2, 3, 4,", "100, 101, 102,", "5, 10, 15, 20,", "2, 4, 6, 8,",
           "30, 31, 32,", "7, 14, 21,", "1000, 1001, 1002,", "3, 6, 9, 12,"]


def stream(port, prompt, t0, out):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": "auto", "stream": True, "max_tokens": TOKENS, "temperature": 0,
                       "stream_options": {"include_usage": True}, "prompt": prompt})
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"{r.status} {r.read()[:300]!r}")
    first, tokens, times = None, 0, []
    for c in sse_chunks(r):
        ch = c.get("choices") or [{}]
        if ch[0].get("text"):
            now = time.perf_counter() - t0
            times.append(now)
            if first is None:
                first = now
        if c.get("usage"):
            tokens = c["usage"]["completion_tokens"]
    conn.close()
    out.append((first, tokens, time.perf_counter() - t0, times))


def row(n, runners, slots):
    port = free_port()
    tmp = tempfile.mkdtemp()
    cfg = os.path.join(tmp, "corral.toml")
    with open(cfg, "w") as f:
        f.write(f'[server]\nbind = "127.0.0.1:{port}"\n[server.pool]\nwarm = ["smollm2-135m-instruct"]\n'
                f'runners = {runners}\nslots = {slots}\nprefix_cache = "off"\n')
    p = subprocess.Popen([os.path.join(ROOT, "target/release/corral"), "--config", cfg, "serve"],
                         env=dict(os.environ, CORRAL_LOG="warn"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port, "/readyz")
        stream(port, "1, 2,", time.perf_counter(), [])  # warm-up
        out = []
        t0 = time.perf_counter()
        ts = [threading.Thread(target=stream, args=(port, PROMPTS[i % len(PROMPTS)], t0, out))
              for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        p.terminate()
        p.wait()
    wall = max(o[2] for o in out)
    total = sum(o[1] for o in out)
    ttft = sorted(o[0] for o in out)
    p99 = ttft[min(len(ttft) - 1, int(round(0.99 * (len(ttft) - 1))))]
    # The window in which every stream was decoding.
    lo, hi = max(o[0] for o in out), min(o[3][-1] for o in out)
    inside = sum(1 for o in out for t in o[3] if lo < t <= hi)
    decode = inside / (hi - lo) if hi > lo else float("nan")
    return decode, total / wall, statistics.median(ttft), p99


def main():
    print(f"CPU: {cpu()}; {TOKENS} tokens per stream, greedy; SmolLM2-135M-Instruct Q4_1")
    print(f"{'streams':>7} {'path':<24}{'decode tok/s':>13}{'overall tok/s':>14}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}")
    base, base_all = None, None
    for n in COUNTS:
        rows = [("1 runner, slots = %d" % n, row(n, 1, n))]
        if n > 1:
            rows.append(("%d runners, slots = 1" % n, row(n, n, 1)))
        for name, (dec, agg, p50, p99) in rows:
            print(f"{n:>7} {name:<24}{dec:13.1f}{agg:14.1f}{p50 * 1e3:13.0f}{p99 * 1e3:13.0f}")
        if n == 1:
            base, base_all = rows[0][1][0], rows[0][1][1]
        elif base:
            b = rows[0][1][0]
            print(f"{'':>7} decode: batched vs one stream {b / base:.2f}x, batched vs {n} runners "
                  f"{b / rows[1][1][0]:.2f}x; overall: {rows[0][1][1] / base_all:.2f}x and "
                  f"{rows[0][1][1] / rows[1][1][1]:.2f}x")


if __name__ == "__main__":
    main()
