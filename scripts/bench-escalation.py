#!/usr/bin/env python3
"""Escalated answers: time to first byte and total time, streamed, through corral serve.

A loopback provider streams every answer as 20 OpenAI chunks, the first after 150 ms and one
every 25 ms after it (about 625 ms in all), or sends the same answer whole at the end. corral
serve runs the default SLM (SmolLM2-135M-Instruct, in its sandbox) with the `minimum` method and
a threshold of 0.5, under which the small model's answers are escalated. Each row answers the
same streamed prompts (`max_tokens` 96, temperature 0):

  direct upstream          the provider alone (what a remote stream costs by itself)
  LiteLLM proxy            the peer, remote only (it cannot run an SLM first)
  corral: whole            the SLM runs to its end, the remote answer is read whole, then sent
                           (how corral answered before streamed relays)
  corral: streamed         the SLM runs to its end, the remote answer is relayed as it arrives
  corral: decided early    the SLM is cancelled once its score cannot reach 0.5
                           (routing.llm_fallback.decide_early), the remote answer relayed
  corral: window           streaming = "window": the first 16 tokens held, then streamed

and, with a threshold every answer passes (the SLM's answers kept), how long the client waits
for the first byte when the answer is held (`buffer`), held for 16 tokens (`window`), or sent
as it comes (`stream`).

    python3 scripts/bench-escalation.py [ROUNDS]   # installs litellm[proxy] from PyPI if missing

Needs target/release/corral and the default model (scripts/fetch-model.sh). Prints medians.
"""
import asyncio
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from bench_common import cpu, free_port, wait_http

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-bench-7f3a9c2e5b1d4f6a8e0c2b4d6f8a0c1e"
PIECES, FIRST_S, EVERY_S = 20, 0.150, 0.025
PROMPTS = [
    "What is the capital of Australia?",
    "How many legs does a spider have?",
    "Who wrote Pride and Prejudice?",
    "What is 17 times 23?",
    "Name the largest planet in the solar system.",
    "What is the boiling point of water in Fahrenheit?",
    "Which element has the chemical symbol Fe?",
    "In which year did the Berlin Wall fall?",
    "What is the square root of 144?",
    "Translate 'thank you' into German.",
]


async def upstream(reader, writer, whole):
    head = await reader.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            n = int(v)
    body = json.loads(await reader.readexactly(n)) if n else {}
    words = [f"word{i} " for i in range(PIECES)]
    if whole or not body.get("stream"):
        await asyncio.sleep(FIRST_S + EVERY_S * (PIECES - 1))
        data = json.dumps({"id": "x", "object": "chat.completion", "model": "remote-large",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 12, "completion_tokens": PIECES}}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    else:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        for i, w in enumerate(words):
            await asyncio.sleep(FIRST_S if i == 0 else EVERY_S)
            chunk = {"id": "x", "object": "chat.completion.chunk", "model": "remote-large",
                     "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
            writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await writer.drain()
        end = {"id": "x", "object": "chat.completion.chunk", "model": "remote-large",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 12, "completion_tokens": PIECES}}
        writer.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
    await writer.drain()
    writer.close()


def start_upstream(whole):
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def run():
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            asyncio.start_server(lambda r, w: upstream(r, w, whole), sock=sock))
        loop.run_until_complete(server.serve_forever())

    threading.Thread(target=run, daemon=True).start()
    return port


def one(port, model, prompt):
    """(time to the first content byte, total, escalated header) of one streamed request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": model, "stream": True, "max_tokens": 96, "temperature": 0,
                       "messages": [{"role": "user", "content": prompt}]})
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body,
                 {"content-type": "application/json", "authorization": "Bearer " + KEY})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"port {port}: {r.status} {r.read()[:300]!r}")
    first, buf = None, b""
    while True:
        data = r.read1(65536)
        if not data:
            break
        buf += data
        while first is None and b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            if line.startswith(b"data: {"):
                c = json.loads(line[6:])
                ch = c.get("choices") or [{}]
                if (ch[0].get("delta") or {}).get("content"):
                    first = time.perf_counter() - t
    total = time.perf_counter() - t
    conn.close()
    return first if first is not None else total, total, r.getheader("x-corral-escalated")


def measure(port, model):
    ttfb, total, escalated = [], [], 0
    one(port, model, "Say hello.")  # warm: the runner is started, caches filled
    for _ in range(ROUNDS):
        for p in PROMPTS:
            a, b, e = one(port, model, p)
            ttfb.append(a * 1e3)
            total.append(b * 1e3)
            escalated += e == "true"
    med = lambda v: sorted(v)[len(v) // 2]
    return med(ttfb), med(total), escalated, len(ttfb)


def corral(tmp, up_port, decide_early, threshold=0.5, streaming=None):
    port = free_port()
    cfg = os.path.join(tmp, f"corral-{port}.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[server]
bind = "127.0.0.1:{port}"
[server.pool]
warm = ["smollm2-135m-instruct"]
[providers.remote]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}/v1"
model = "remote-large"
max_retries = 0
[routing.llm_fallback]
providers = ["remote"]
decide_early = {"true" if decide_early else "false"}
[routing.confidence_thresholds]
default = {threshold}
method = "minimum"
""")
        if streaming:
            f.write(f'[routing]\ndefault_action = {{ type = "prefer_slm", streaming = "{streaming}" }}\n')
    exe = os.path.join(ROOT, "target/release/corral")
    p = subprocess.Popen([exe, "--config", cfg, "serve"], env=dict(os.environ, CORRAL_LOG="warn"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(port, "/readyz")
    return port, p


def main():
    try:
        import litellm  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "litellm[proxy]"], check=True)
    streamed, whole = start_upstream(False), start_upstream(True)
    tmp = tempfile.mkdtemp()
    lport = free_port()
    lcfg = os.path.join(tmp, "litellm.yaml")
    with open(lcfg, "w") as f:
        f.write(f"""model_list:
  - model_name: remote
    litellm_params:
      model: openai/remote-large
      api_base: http://127.0.0.1:{streamed}/v1
      api_key: sk-upstream
""")
    cli = shutil.which("litellm") or os.path.join(os.path.dirname(sys.executable), "litellm")
    litellm = subprocess.Popen([cli, "--config", lcfg, "--port", str(lport), "--num_workers", "1"],
                               env=dict(os.environ, LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True",
                                        LITELLM_MASTER_KEY=KEY),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        rows.append(("direct upstream", measure(streamed, "remote-large")))
        wait_http(lport, "/health/liveliness")
        rows.append(("LiteLLM proxy (remote only)", measure(lport, "remote")))
        runs = [("corral: whole", whole, False, 0.5, None), ("corral: streamed", streamed, False, 0.5, None),
                ("corral: decided early", streamed, True, 0.5, None),
                ("corral: window (16 tokens)", streamed, True, 0.5, "window"),
                # Answers the SLM keeps (a threshold they all pass): how long the client waits.
                ("kept: buffer", streamed, True, 1e-9, "buffer"),
                ("kept: window (16 tokens)", streamed, True, 1e-9, "window"),
                ("kept: stream", streamed, True, 1e-9, "stream")]
        for name, up, early, threshold, mode in runs:
            port, p = corral(tmp, up, early, threshold, mode)
            try:
                rows.append((name, measure(port, "auto")))
            finally:
                p.terminate()
                p.wait()
    finally:
        litellm.terminate()
        litellm.wait()
    print(f"CPU: {cpu()}; {len(PROMPTS) * ROUNDS} streamed prompts per row, max_tokens 96; "
          f"provider: first chunk after {FIRST_S * 1e3:.0f} ms, then {PIECES - 1} every {EVERY_S * 1e3:.0f} ms")
    print(f"{'path':<30}{'TTFB p50 ms':>13}{'total p50 ms':>14}{'escalated':>11}")
    for name, (a, b, e, n) in rows:
        esc = f"{e}/{n}" if name.startswith(("corral", "kept")) else "-"
        print(f"{name:<30}{a:13.0f}{b:14.0f}{esc:>11}")
    base = dict(rows)["corral: whole"]
    for name in ("corral: streamed", "corral: decided early"):
        r = dict(rows)[name]
        print(f"{name} vs whole: TTFB {r[0] / base[0]:.2f}x, total {r[1] / base[1]:.2f}x")


if __name__ == "__main__":
    main()
