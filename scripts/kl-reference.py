#!/usr/bin/env python3
"""How far llama.cpp's next-token distributions are from exact arithmetic, for a GGUF llama
model: the reference the runner's KL test (runner/src/llama.rs, `kl_to_exact_reference`) holds
corral to.

For each prompt: llama.cpp (built for this CPU) decodes 16 tokens greedily, prompt first then one
token at a time, keeping its full logits at each of the 16 steps. An exact forward pass (numpy,
f64, the file's weights dequantized, nothing rounded in between) gives the distributions at the
same positions of the same token sequence. Writes OUT.json (the token sequences, llama.cpp's mean
KL divergence KL(exact || llama.cpp)) and OUT.f32 (the exact log-probabilities, f32, one row of
n_vocab per step) for the test to score corral's distributions against.

    scripts/kl-reference.py MODEL.gguf OUT   # writes OUT.json and OUT.f32
"""
import json, os, sys

import numpy as np

import reference_llama  # noqa: F401  (before llama_cpp: see its docstring)
import gguf
from llama_cpp import Llama

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROMPTS = [
    "What is the tallest mountain on Earth?",
    "Write one sentence about autumn.",
    "def add(a, b):",
    "Name a planet with rings.",
    "How many minutes are in two hours?",
    "What colour is a ripe banana?",
    "Give an example of a mammal that can fly.",
    "What does CPU stand for?",
]
STEPS = 16


def render(user):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


class Exact:
    """The llama forward pass in f64 on dequantized weights."""

    def __init__(self, path):
        r = gguf.GGUFReader(path)
        md = {f.name: f for f in r.fields.values()}

        def val(key):
            f = md[key]
            return f.parts[f.data[0]].tolist()[0]

        self.n_head = int(val("llama.attention.head_count"))
        self.n_kv = int(val("llama.attention.head_count_kv"))
        self.eps = float(val("llama.attention.layer_norm_rms_epsilon"))
        self.base = float(val("llama.rope.freq_base"))
        self.n_layer = int(val("llama.block_count"))
        self.t = {}
        for t in r.tensors:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
            shape = [int(s) for s in reversed(t.shape.tolist())]
            self.t[t.name] = w.reshape(shape)
        self.out = self.t.get("output.weight", self.t["token_embd.weight"])

    def norm(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, n_head):
        seq, dim = x.shape
        hd = dim // n_head
        x = x.reshape(seq, n_head, hd // 2, 2)
        inv = self.base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = np.arange(seq, dtype=np.float64)[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0], x[..., 1]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(seq, dim)

    def log_probs(self, tokens):
        x = self.t["token_embd.weight"][tokens]
        seq = len(tokens)
        hd = x.shape[1] // self.n_head
        mask = np.triu(np.full((seq, seq), -np.inf), 1)
        for l in range(self.n_layer):
            p = f"blk.{l}."
            h = self.norm(x, self.t[p + "attn_norm.weight"])
            q = self.rope(h @ self.t[p + "attn_q.weight"].T, self.n_head)
            k = self.rope(h @ self.t[p + "attn_k.weight"].T, self.n_kv)
            v = h @ self.t[p + "attn_v.weight"].T
            out = np.zeros_like(q)
            for hh in range(self.n_head):
                kv = hh // (self.n_head // self.n_kv)
                qs = q[:, hh * hd:(hh + 1) * hd]
                ks = k[:, kv * hd:(kv + 1) * hd]
                vs = v[:, kv * hd:(kv + 1) * hd]
                sc = qs @ ks.T / np.sqrt(hd) + mask
                sc = np.exp(sc - sc.max(-1, keepdims=True))
                out[:, hh * hd:(hh + 1) * hd] = (sc / sc.sum(-1, keepdims=True)) @ vs
            x = x + out @ self.t[p + "attn_output.weight"].T
            h = self.norm(x, self.t[p + "ffn_norm.weight"])
            g = h @ self.t[p + "ffn_gate.weight"].T
            u = h @ self.t[p + "ffn_up.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ self.t[p + "ffn_down.weight"].T
        logits = self.norm(x, self.t["output_norm.weight"]) @ self.out.T
        z = logits - logits.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))


def log_softmax(v):
    z = v.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def kl(p_log, q_log):
    return float((np.exp(p_log) * (p_log - q_log)).sum())


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    path, out = sys.argv[1], sys.argv[2]
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
    exact = Exact(path)
    cases, rows, kls = [], [], []
    for p in PROMPTS:
        ids = llm.tokenize(render(p).encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        gen = []
        mine = []
        for _ in range(STEPS):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
            mine.append(log_softmax(logits))
            tok = int(np.argmax(logits))
            gen.append(tok)
            llm.eval([tok])
        ref = exact.log_probs(ids + gen[:-1])[len(ids) - 1:]
        for r, m in zip(ref, mine):
            kls.append(kl(r, m))
            rows.append(r.astype(np.float32))
        cases.append({"prompt_ids": ids, "greedy_ids": gen})
    np.stack(rows).tofile(out + ".f32")
    with open(out + ".json", "w") as f:
        json.dump({"model": os.path.basename(path), "steps": STEPS, "n_vocab": llm.n_vocab(),
                   "cases": cases, "llama_cpp_mean_kl": float(np.mean(kls)),
                   "llama_cpp_max_kl": float(np.max(kls))}, f)
    print(f"llama.cpp mean KL to the exact reference {np.mean(kls):.3e} (max {np.max(kls):.3e})")


if __name__ == "__main__":
    main()
