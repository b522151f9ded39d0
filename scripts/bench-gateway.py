#!/usr/bin/env python3
"""Gateway overhead: corral serve versus the LiteLLM proxy in front of the same upstream.

One loopback "provider" answers every chat completion with a fixed body. Each request goes
(a) straight to it, (b) through `corral serve` (a require_llm policy: routing, guardrails,
the provider chain), (c) the same with the encrypted audit log on, (d) through the LiteLLM proxy, sequentially over a kept-alive connection.
Overhead = gateway latency - direct latency, at p50 and p99, and the corral/LiteLLM ratio.

    python3 scripts/bench-gateway.py [N]      # installs litellm[proxy] from PyPI if missing

Needs target/release/corral (scripts/bench-gateway.sh builds it). Prints a table.
"""
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

N = int(sys.argv[1]) if len(sys.argv) > 1 else 500
KEY = "sk-bench-7f3a9c2e5b1d4f6a8e0c2b4d6f8a0c1e"  # LiteLLM's master key; corral on loopback ignores it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = json.dumps({
    "id": "x", "object": "chat.completion", "created": 0, "model": "remote-large",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
}).encode()


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms to every exchange

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *a):
        pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(port, path, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"nothing answered on port {port}{path}")


def measure(port, path, n, model):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                       "max_tokens": 8})
    hdr = {"content-type": "application/json", "authorization": "Bearer " + KEY}
    out = []
    for i in range(n + 50):
        t = time.perf_counter()
        conn.request("POST", path, body, hdr)
        r = conn.getresponse()
        data = r.read()
        dt = time.perf_counter() - t
        if r.status != 200:
            raise SystemExit(f"port {port}: {r.status} {data[:300]!r}")
        if i >= 50:
            out.append(dt * 1e3)
    out.sort()
    return out[len(out) // 2], out[len(out) * 99 // 100]


def main():
    try:
        import litellm  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "litellm[proxy]"], check=True)
    up = ThreadingHTTPServer(("127.0.0.1", free_port()), Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    up_port = up.server_address[1]
    tmp = tempfile.mkdtemp()
    corral_port, litellm_port = free_port(), free_port()
    cfg = os.path.join(tmp, "corral.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[server]
bind = "127.0.0.1:{corral_port}"
[providers.remote]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}/v1"
model = "remote-large"
max_retries = 0
[routing.llm_fallback]
providers = ["remote"]
[routing]
default_action = {{ type = "require_llm", reason = "gateway benchmark" }}
""")
    lcfg = os.path.join(tmp, "litellm.yaml")
    with open(lcfg, "w") as f:
        f.write(f"""model_list:
  - model_name: remote
    litellm_params:
      model: openai/remote-large
      api_base: http://127.0.0.1:{up_port}/v1
      api_key: sk-upstream
""")
    # The same server with the encrypted audit log on (one entry per request).
    audited_port = free_port()
    acfg = os.path.join(tmp, "corral-audit.toml")
    with open(cfg) as f:
        text = f.read().replace(f"127.0.0.1:{corral_port}", f"127.0.0.1:{audited_port}")
    with open(acfg, "w") as f:
        f.write(text + f'\n[audit]\nenabled = true\ndir = "{tmp}/audit"\n')
    env = dict(os.environ, CORRAL_LOG="warn")
    corral = subprocess.Popen([os.path.join(ROOT, "target/release/corral"), "--config", cfg, "serve"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    audited = subprocess.Popen([os.path.join(ROOT, "target/release/corral"), "--config", acfg, "serve"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli = shutil.which("litellm") or os.path.join(os.path.dirname(sys.executable), "litellm")
    lenv = dict(os.environ, LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True",
                LITELLM_MASTER_KEY=KEY)
    litellm = subprocess.Popen([cli, "--config", lcfg, "--port", str(litellm_port), "--num_workers", "1"],
                               env=lenv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(corral_port, "/healthz")
        wait_http(audited_port, "/healthz")
        wait_http(litellm_port, "/health/liveliness")
        direct = measure(up_port, "/v1/chat/completions", N, "remote-large")
        via_corral = measure(corral_port, "/v1/chat/completions", N, "auto")
        via_audited = measure(audited_port, "/v1/chat/completions", N, "auto")
        via_litellm = measure(litellm_port, "/v1/chat/completions", N, "remote")
    finally:
        corral.terminate()
        audited.terminate()
        litellm.terminate()
        corral.wait()
        audited.wait()
        litellm.wait()
    print(f"{N} sequential chat completions per path, kept-alive connection, loopback upstream")
    print(f"{'path':<22}{'p50 ms':>9}{'p99 ms':>9}{'overhead p50':>14}{'overhead p99':>14}")
    print(f"{'direct':<22}{direct[0]:9.3f}{direct[1]:9.3f}")
    for name, (p50, p99) in [("corral serve", via_corral), ("corral serve + audit", via_audited),
                             ("LiteLLM proxy", via_litellm)]:
        print(f"{name:<22}{p50:9.3f}{p99:9.3f}{p50 - direct[0]:14.3f}{p99 - direct[1]:14.3f}")
    oc = (via_corral[0] - direct[0], via_corral[1] - direct[1])
    ol = (via_litellm[0] - direct[0], via_litellm[1] - direct[1])
    print(f"overhead ratio corral/LiteLLM: p50 {oc[0] / ol[0]:.3f}x, p99 {oc[1] / ol[1]:.3f}x")


if __name__ == "__main__":
    main()
