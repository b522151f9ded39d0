#!/usr/bin/env python3
"""Gateway overhead: corral serve versus the LiteLLM proxy in front of the same upstream.

One loopback "provider" (asyncio, keep-alive) answers every chat completion with a fixed
body. Each request goes (a) straight to it, (b) through `corral serve` (a require_llm policy:
routing, guardrails, the provider chain), (c) the same with the encrypted audit log on, (d)
through the LiteLLM proxy, sequentially over a kept-alive connection. Overhead = gateway
latency - direct latency, at p50 and p99, and the corral/LiteLLM ratio.

With CORRAL_BASE=/path/to/an/older/corral, that binary is measured too (paths (b) and (c)), in
the same run, to compare two versions. With `wrk` installed, each corral also gets a throughput
run: `wrk -t1 -c16 -d10s` (audit log on), requests per second and its latency percentiles.

    python3 scripts/bench-gateway.py [N]      # installs litellm[proxy] from PyPI if missing

Needs target/release/corral (scripts/bench-gateway.sh builds it). Prints a table.
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

from bench_common import free_port, wait_http as wait_ready

N = int(sys.argv[1]) if len(sys.argv) > 1 else 500
KEY = "sk-bench-7f3a9c2e5b1d4f6a8e0c2b4d6f8a0c1e"  # LiteLLM's master key; corral on loopback ignores it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = json.dumps({
    "id": "x", "object": "chat.completion", "created": 0, "model": "remote-large",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
}).encode()


RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


class FastUpstream(asyncio.Protocol):
    """Keep-alive HTTP/1.1: reads a head and its content-length body, answers RESPONSE."""

    def connection_made(self, transport):
        self.t = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            n = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    n = int(v)
            if len(self.buf) < end + 4 + n:
                return
            self.buf = self.buf[end + 4 + n:]
            self.t.write(RESPONSE)


def fast_upstream():
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def run():
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(loop.create_server(FastUpstream, sock=sock))
        loop.run_until_complete(server.serve_forever())

    threading.Thread(target=run, daemon=True).start()
    return port


def wrk(port):
    """Throughput through corral with wrk, or None without wrk."""
    if not shutil.which("wrk"):
        return None
    lua = os.path.join(tempfile.mkdtemp(), "post.lua")
    with open(lua, "w") as f:
        body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 8})
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                'wrk.headers["content-type"] = "application/json"\n')
    out = subprocess.run(["wrk", "-t1", "-c16", "-d10s", "--latency", "-s", lua,
                          f"http://127.0.0.1:{port}/v1/chat/completions"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(next(l.split()[1] for l in out.splitlines() if l.startswith("Requests/sec")))
    pct = {}
    for l in out.splitlines():
        parts = l.split()
        if len(parts) == 2 and parts[0] in ("50%", "99%"):
            v = parts[1]
            ms = float(v[:-2]) if v.endswith("ms") else float(v[:-2]) / 1e3 if v.endswith("us") else float(v[:-1]) * 1e3
            pct[parts[0]] = ms
    non2xx = [l for l in out.splitlines() if "Non-2xx" in l]
    if non2xx:
        raise SystemExit(f"wrk: {non2xx[0]}")
    return rps, pct.get("50%"), pct.get("99%")


def wait_http(port, path):
    wait_ready(port, path, timeout=120, ok=lambda status: status < 500)


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
    up_port = fast_upstream()
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
    binaries = [("corral serve", os.path.join(ROOT, "target/release/corral"))]
    if os.environ.get("CORRAL_BASE"):
        binaries.append(("base corral", os.environ["CORRAL_BASE"]))
    servers = []  # (name, plain port, audited port, processes)
    for name, exe in binaries:
        ports = []
        procs = []
        for conf in (cfg, acfg):
            port = free_port()
            c = os.path.join(tmp, f"{len(servers)}-{os.path.basename(conf)}")
            with open(conf) as f:
                text = f.read().replace(f"127.0.0.1:{corral_port}", f"127.0.0.1:{port}")
                text = text.replace(f"127.0.0.1:{audited_port}", f"127.0.0.1:{port}")
                text = text.replace(f'dir = "{tmp}/audit"', f'dir = "{tmp}/audit-{len(servers)}-{port}"')
            with open(c, "w") as f:
                f.write(text)
            procs.append(subprocess.Popen([exe, "--config", c, "serve"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(port)
        servers.append((name, ports[0], ports[1], procs))
    cli = shutil.which("litellm") or os.path.join(os.path.dirname(sys.executable), "litellm")
    lenv = dict(os.environ, LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True",
                LITELLM_MASTER_KEY=KEY)
    litellm = subprocess.Popen([cli, "--config", lcfg, "--port", str(litellm_port), "--num_workers", "1"],
                               env=lenv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    throughput = []
    try:
        for _, plain, audited_p, _ in servers:
            wait_http(plain, "/healthz")
            wait_http(audited_p, "/healthz")
        wait_http(litellm_port, "/health/liveliness")
        direct = measure(up_port, "/v1/chat/completions", N, "remote-large")
        for name, plain, audited_p, _ in servers:
            rows.append((name, measure(plain, "/v1/chat/completions", N, "auto")))
            rows.append((name + " + audit", measure(audited_p, "/v1/chat/completions", N, "auto")))
        via_litellm = measure(litellm_port, "/v1/chat/completions", N, "remote")
        rows.append(("LiteLLM proxy", via_litellm))
        for name, _, audited_p, _ in servers:
            t = wrk(audited_p)
            if t:
                throughput.append((name + " + audit", t))
    finally:
        for *_, procs in servers:
            for p in procs:
                p.terminate()
                p.wait()
        litellm.terminate()
        litellm.wait()
    via_corral = rows[0][1]
    print(f"{N} sequential chat completions per path, kept-alive connection, loopback upstream")
    print(f"{'path':<26}{'p50 ms':>9}{'p99 ms':>9}{'overhead p50':>14}{'overhead p99':>14}")
    print(f"{'direct':<26}{direct[0]:9.3f}{direct[1]:9.3f}")
    for name, (p50, p99) in rows:
        print(f"{name:<26}{p50:9.3f}{p99:9.3f}{p50 - direct[0]:14.3f}{p99 - direct[1]:14.3f}")
    for name, (rps, p50, p99) in throughput:
        print(f"throughput {name}: {rps:,.0f} req/s (wrk -t1 -c16 -d10s; p50 {p50} ms, p99 {p99} ms)")
    oc = (via_corral[0] - direct[0], via_corral[1] - direct[1])
    ol = (via_litellm[0] - direct[0], via_litellm[1] - direct[1])
    print(f"overhead ratio corral/LiteLLM: p50 {oc[0] / ol[0]:.3f}x, p99 {oc[1] / ol[1]:.3f}x")


if __name__ == "__main__":
    main()
