#!/usr/bin/env python3
"""The GPU check of issue 22, run ON a GPU machine (scripts/gpu-check.sh prepares and calls it):

1. The runner on CUDA against the runner on the CPU, unsandboxed, same file, same greedy
   requests: the tokens, and each token's log-probability and entropy (tolerances printed).
2. Decode and prefill speed: the runner on the GPU, on the CPU (2 threads, as the CPU
   benchmarks), and PyTorch/transformers on the GPU from the same GGUF (dequantized by
   transformers; skipped with a note when transformers or gguf is missing).
3. `corral run -p gpu --json`: the default model answers in the sandbox, on the GPU (the
   record's `device`), and the sandbox's layers are on as seen from inside
   (`corral sandbox exec -p gpu`: seccomp mode, no new privileges, no capabilities, a file
   outside the profile unreadable, no network).

    python3 scripts/gpu-check.py MODEL.gguf GPU_RUNNER CPU_RUNNER CORRAL
    python3 scripts/gpu-check.py --layers CORRAL      # step 3's layers only (no model)

Prints one report; exits 1 when a correctness check fails. `GPU_CHECK_DEVICE=cpu` runs the GPU
side on the CPU (a dry run of the script on a machine without a GPU)."""
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import frame, read  # noqa: E402

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nList three prime numbers.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n",
]
LONG = "<|im_start|>user\nTell me a long story about a dragon who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)
    return ok


def start(runner, model, device, threads=None):
    env = dict(os.environ, CORRAL_DEVICE=device)
    argv = [runner, "--model", model, "--no-tighten"]
    if threads:
        argv += ["--threads", str(threads)]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    ready = read(p)
    if ready.get("type") == "error":
        raise SystemExit(f"{runner} on {device}: {ready.get('message')}")
    print(f"{device}: {ready.get('device', '?')}, load {ready.get('load_ms', 0):.0f} ms", flush=True)
    return p


def generate(p, rid, prompt, n, ignore_eos=False):
    frame(p, {"type": "generate", "id": rid, "input": {"prompt": prompt}, "max_tokens": n,
              "top_logprobs": 5, "stream": False, "ignore_eos": ignore_eos,
              "sampling": {"temperature": 0.0}})
    d = read(p)
    if d.get("type") == "error":
        raise SystemExit(f"generate failed: {d.get('message')}")
    return d


def parity(gpu, cpu):
    """Same greedy tokens (or a divergence at a near-tie), log-probabilities close."""
    worst_lp, worst_ent, n = 0.0, 0.0, 0
    for i, prompt in enumerate(PROMPTS):
        a = generate(gpu, 100 + i, prompt, 24)
        b = generate(cpu, 100 + i, prompt, 24)
        ta = [t["token_id"] for t in a["tokens"]]
        tb = [t["token_id"] for t in b["tokens"]]
        same = 0
        while same < min(len(ta), len(tb)) and ta[same] == tb[same]:
            same += 1
        for x, y in zip(a["tokens"][:same], b["tokens"][:same]):
            worst_lp = max(worst_lp, abs(x["logprob"] - y["logprob"]))
            worst_ent = max(worst_ent, abs(x["entropy"] - y["entropy"]))
            n += 1
        if same < min(len(ta), len(tb)):
            # A divergence must be a near-tie on the CPU side: the two best within 0.1 nats.
            margin = b["tokens"][same]["margin"]
            check(margin < 0.1, f"prompt {i}: tokens agree for {same}, then differ where the "
                                f"CPU's margin is {margin:.3f} nats (a near-tie is < 0.1)")
        else:
            check(True, f"prompt {i}: the same {same} greedy tokens")
    # The CPU pass quantizes activations to 8 bits; the GPU computes in f32 (closer to an
    # exact pass). Their log-probabilities differ by what that costs: KL ~ 0.003 measured.
    check(worst_lp < 0.25, f"log-probabilities of {n} tokens within {worst_lp:.4f} nats (limit 0.25)")
    check(worst_ent < 0.25, f"entropies within {worst_ent:.4f} nats (limit 0.25)")


def speed(p, label, rounds=5):
    generate(p, 1, LONG, 8)  # warm up
    dec, pre = [], []
    for r in range(rounds):
        d = generate(p, 10 + r, LONG, 128, ignore_eos=True)
        dec.append(d["decode_tokens_per_s"])
        pre.append(d["prompt_tokens"] / d["prefill_ms"] * 1e3)
    dm, pm = statistics.median(dec), statistics.median(pre)
    print(f"{label}: decode {dm:.1f} tok/s, prefill {pm:.0f} tok/s (medians of {rounds}, "
          f"128 tokens after a {d['prompt_tokens']}-token prompt)", flush=True)
    return dm


def torch_speed(model):
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except Exception as e:  # noqa: BLE001
        print(f"PyTorch/transformers: skipped ({e})", flush=True)
        return None
    d, f = os.path.dirname(model), os.path.basename(model)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).to("cuda").eval()
    ids = tok(LONG, return_tensors="pt").input_ids.to("cuda")
    rates = []
    with torch.no_grad():
        m.generate(ids, max_new_tokens=8, do_sample=False)
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = m.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
            torch.cuda.synchronize()
            rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
    r = statistics.median(rates)
    print(f"PyTorch {torch.__version__} (transformers, f32, {torch.cuda.get_device_name()}): "
          f"generate {r:.1f} tok/s including prefill (median of 5)", flush=True)
    return r


def sandboxed(corral, model, gpu_runner):
    env = dict(os.environ, CORRAL_RUNNER=gpu_runner, CORRAL_MODEL_DIR=os.path.dirname(model))
    r = subprocess.run([corral, "run", "-p", "gpu", "--json", "--max-tokens", "16",
                        "What is the capital of France?"], env=env, capture_output=True, text=True)
    print(r.stderr.strip()[-2000:], flush=True)
    try:
        d = json.loads(r.stdout)
    except ValueError:
        d = {}
    device = json.dumps(d)
    if not d.get("text"):
        kernel_log()
    check(bool(d.get("text")), f"corral run -p gpu answers: {d.get('text')!r}")
    check("cuda" in device, "the sandboxed runner computed on the GPU (record's device)")


def dmesg_lines():
    r = subprocess.run(["dmesg"], capture_output=True, text=True)
    return r.stdout.splitlines()


DMESG_BEFORE = len(dmesg_lines())


def kernel_log():
    """What the kernel logged since the check began, on a failed sandboxed run: a system call
    the seccomp filter refused is logged with its number (audit type 1326; code 0x50000 is an
    errno answer, such as clone3's, 0x80000000 a kill): what the driver needed."""
    lines = [l for l in dmesg_lines()[DMESG_BEFORE:] if "type=1326" in l or "seccomp" in l
             or "landlock" in l.lower() or "nvidia" in l.lower() or "NVRM" in l]
    print("dmesg since the check began:\n" + "\n".join(lines[-30:]) if lines
          else "dmesg: nothing new about seccomp, Landlock or the driver", flush=True)


def layers(corral):
    """The sandbox's layers as seen from inside a `gpu` sandbox (no model needed)."""
    inside = ("grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status; "
              "cat /etc/shadow >/dev/null 2>&1 && echo SHADOW-READABLE; "
              "ls /dev/nvidia*; [ -c /dev/nvidiactl ] && echo HAS-NVIDIACTL; "
              "(exec 3<>/dev/tcp/1.1.1.1/443) 2>/dev/null && echo NETWORK-REACHABLE; "
              "echo INSIDE-DONE")
    r = subprocess.run([corral, "sandbox", "exec", "-p", "gpu", "--", "/bin/bash", "-c", inside],
                       capture_output=True, text=True)
    out = r.stdout
    print((r.stdout + r.stderr).strip(), flush=True)
    if not check(r.returncode == 0 and "INSIDE-DONE" in out, "corral sandbox exec -p gpu ran"):
        kernel_log()
        return
    check("Seccomp:\t2" in out, "seccomp filter on inside (Seccomp: 2)")
    check("NoNewPrivs:\t1" in out, "no new privileges inside")
    check("CapEff:\t0000000000000000" in out, "no capabilities inside")
    check("SHADOW-READABLE" not in out, "/etc/shadow unreadable inside")
    check("NETWORK-REACHABLE" not in out, "no network inside")
    check("HAS-NVIDIACTL" in out, "the GPU's device nodes are there")


def main():
    if sys.argv[1] == "--layers":
        layers(sys.argv[2])
        print(f"{len(failures)} check(s) failed" if failures else "all checks passed", flush=True)
        sys.exit(1 if failures else 0)
    model, gpu_runner, cpu_runner, corral = sys.argv[1:5]
    device = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    gpu = start(gpu_runner, model, device)
    cpu = start(cpu_runner, model, "cpu", threads=2)
    parity(gpu, cpu)
    g = speed(gpu, f"corral runner on {device}")
    c = speed(cpu, "corral runner on the CPU (2 threads)")
    print(f"GPU / CPU decode: {g / c:.2f}x", flush=True)
    for p in (gpu, cpu):
        p.stdin.close()
        p.wait(timeout=30)
    if device == "cuda":
        t = torch_speed(model)
        if t:
            print(f"corral GPU decode / PyTorch generate: {g / t:.2f}x", flush=True)
    sandboxed(corral, model, gpu_runner)
    layers(corral)
    print(f"{len(failures)} check(s) failed" if failures else "all checks passed", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
