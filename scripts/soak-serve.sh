#!/usr/bin/env bash
# Soak check of `corral serve` (not a CI test): DURATION seconds (default 600) of mixed traffic on
# loopback against real SmolLM2 runners — streamed and buffered chat, completions, clients that
# disconnect at random, over-long prompts, runners killed with SIGKILL, configuration reloads —
# bounded in rate (CLIENTS concurrent clients, default 4) and time, then SIGTERM. Reports requests
# by outcome, p50/p99 latency, the server's RSS over time, leftover processes and cgroups
# (expected: none), and whether every request was accounted for (answered, refused with a reason,
# errored with a reason, or abandoned by the client on purpose; none lost).
# Needs root (the sandbox) and the default model (scripts/fetch-model.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-600}
CLIENTS=${CLIENTS:-4}
cargo build --release --workspace --all-targets >/dev/null   # as test.sh: no feature-driven rebuild
scripts/fetch-model.sh >/dev/null
exec python3 - "$DURATION" "$CLIENTS" <<'PY'
import http.client, json, os, random, re, signal, statistics, subprocess, sys, tempfile, threading, time

duration, clients = float(sys.argv[1]), int(sys.argv[2])
model_dir = os.environ.get("CORRAL_MODEL_DIR") or os.path.join(
    os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "corral/models")
tmp = tempfile.mkdtemp(prefix="corral-soak-")
cfg = os.path.join(tmp, "corral.toml")
def config(extra=""):
    return f"""[slm]
model_dir = "{model_dir}"
[server]
bind = "127.0.0.1:0"
request_timeout_seconds = 30
shutdown_grace_seconds = 5
[server.pool]
runners = 2
queue_depth = 8
queue_timeout_seconds = 10
warm = ["smollm2-135m-instruct"]
{extra}
"""
open(cfg, "w").write(config())
server = subprocess.Popen(["target/release/corral", "--config", cfg, "serve"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
port = None
log_lines = []
def pump():
    global port
    for line in server.stderr:
        log_lines.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
threading.Thread(target=pump, daemon=True).start()
t0 = time.time()
while port is None:
    if time.time() - t0 > 60 or server.poll() is not None:
        sys.exit("corral serve did not start:\n" + "".join(log_lines))
    time.sleep(0.1)
# Wait for the warm runners.
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/readyz")
        if c.getresponse().status == 200:
            break
    except OSError:
        pass
    if time.time() - t0 > 120:
        sys.exit("never ready")
    time.sleep(0.2)

results = []   # (kind, outcome, seconds)
lock = threading.Lock()
stop_at = time.time() + duration
PROMPTS = ["Say hi.", "Name three primary colors.", "What is 2 + 2?", "Translate 'cat' to French.",
           "Write one sentence about the sea.", "List two fruits."]

def record(kind, outcome, secs):
    with lock:
        results.append((kind, outcome, secs))

def one(rng):
    kind = rng.choices(["chat", "stream", "completion", "too_long", "disconnect"],
                       weights=[35, 30, 15, 10, 10])[0]
    body = {"model": "auto", "max_tokens": rng.choice([8, 24, 64]), "temperature": rng.choice([0, 0.7])}
    path = "/v1/chat/completions"
    if kind == "completion":
        path = "/v1/completions"
        body["prompt"] = rng.choice(PROMPTS)
    else:
        content = "fox " * 5000 if kind == "too_long" else rng.choice(PROMPTS)
        body["messages"] = [{"role": "user", "content": content}]
    if kind in ("stream", "disconnect"):
        body["stream"] = True
    if kind == "disconnect":
        body["max_tokens"] = 400
    start = time.time()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        r = c.getresponse()
        if kind == "disconnect" and r.status == 200:
            r.read(rng.randint(50, 800))   # a little of the stream, then hang up
            c.close()
            record(kind, "abandoned by client", time.time() - start)
            return
        data = r.read().decode("utf-8", "replace")
        secs = time.time() - start
        if r.status == 200 and body.get("stream"):
            if "data: [DONE]" in data:
                record(kind, "200 answered (stream)", secs)
            elif '"error"' in data:
                record(kind, "200 stream ended with an error event", secs)
            else:
                record(kind, "LOST: stream ended without [DONE] or error", secs)
        elif r.status == 200:
            ok = "choices" in json.loads(data)
            record(kind, "200 answered" if ok else "LOST: 200 without choices", secs)
        else:
            try:
                err = json.loads(data)["error"]
                record(kind, f"{r.status} {err.get('type')}", secs)
            except Exception:
                record(kind, f"LOST: {r.status} without an error body", secs)
    except Exception as e:
        record(kind, f"LOST: {type(e).__name__}", time.time() - start)

def client(seed):
    rng = random.Random(seed)
    while time.time() < stop_at:
        one(rng)
        time.sleep(rng.uniform(0.05, 0.5))

def runner_pids():
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read()
            if b"corral-runner" not in cmd:
                continue
            pid, hops = int(p), 0
            while pid > 1 and hops < 10:
                st = open(f"/proc/{pid}/stat").read()
                pid = int(st.rsplit(")", 1)[1].split()[1])
                if pid == server.pid:
                    out.append(int(p))
                    break
                hops += 1
        except OSError:
            pass
    return out

def chaos():
    rng = random.Random(7)
    n = 0
    while time.time() < stop_at:
        time.sleep(rng.uniform(20, 40))
        if time.time() >= stop_at:
            break
        n += 1
        if n % 2:
            pids = runner_pids()
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                record("chaos", "runner killed", 0)
        else:
            open(cfg, "w").write(config(f"# reload {n}"))
            os.kill(server.pid, signal.SIGHUP)
            record("chaos", "reload", 0)

rss = []
def sample_rss():
    while time.time() < stop_at:
        try:
            kb = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{server.pid}/status").read()).group(1))
            rss.append((round(time.time() - t0), kb // 1024))
        except (OSError, AttributeError):
            pass
        time.sleep(30)

threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
threads += [threading.Thread(target=chaos), threading.Thread(target=sample_rss)]
for t in threads:
    t.start()
for t in threads:
    t.join()
term = time.time()
server.send_signal(signal.SIGTERM)
try:
    code = server.wait(timeout=30)
except subprocess.TimeoutExpired:
    server.kill()
    code = "did not exit within 30 s of SIGTERM"
shutdown = time.time() - term
time.sleep(0.5)
left_procs = runner_pids()
left_cgroups = []
for root, dirs, _ in os.walk("/sys/fs/cgroup"):
    for d in dirs:
        if d.startswith(f"{server.pid}-"):
            left_cgroups.append(os.path.join(root, d))
    if root.count("/") > 6:
        dirs[:] = []

traffic = [r for r in results if r[0] != "chaos"]
by = {}
for kind, outcome, _ in traffic:
    by[outcome] = by.get(outcome, 0) + 1
lost = sum(n for o, n in by.items() if o.startswith("LOST"))
print(f"soak: {duration:.0f} s, {clients} clients, {len(traffic)} requests "
      f"({len(traffic) / duration:.1f}/s), chaos: "
      f"{sum(1 for r in results if r[1] == 'runner killed')} runner kills, "
      f"{sum(1 for r in results if r[1] == 'reload')} reloads")
for o, n in sorted(by.items(), key=lambda x: -x[1]):
    print(f"  {n:6d}  {o}")
for kind in ["chat", "stream", "completion", "too_long"]:
    xs = sorted(s for k, o, s in traffic if k == kind and o.startswith("200"))
    if xs:
        p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
        print(f"  latency {kind:10s} n={len(xs):5d} p50 {statistics.median(xs):6.2f} s  p99 {p99:6.2f} s")
too_long = [o for k, o, _ in traffic if k == "too_long"]
print(f"  over-long prompts: {sum(1 for o in too_long if o.startswith('400'))}/{len(too_long)} answered 400")
print("  server RSS (s, MiB): " + ", ".join(f"{t}:{m}" for t, m in rss))
print(f"  SIGTERM: exit {code} after {shutdown:.1f} s")
print(f"  leftover runner processes: {left_procs or 'none'}")
print(f"  leftover cgroups: {left_cgroups or 'none'}")
print(f"  every request accounted for: {'yes' if lost == 0 else f'NO, {lost} lost'}")
sys.exit(0 if lost == 0 and not left_procs and not left_cgroups and code == 0 else 1)
PY
