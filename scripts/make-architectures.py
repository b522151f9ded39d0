#!/usr/bin/env python3
"""Test files for the architectures no real model of which can be fetched here, written from real
weights in each architecture's GGUF layout, and what llama.cpp answers on each: the test files
of tests/gguf_architectures.rs (made at test time, never committed).

From the default model (SmolLM2, a llama GGUF, Q4_1):
  qwen2   Q and K rows reordered for rotary halves (NeoX), q/k/v biases (random, fixed seed)
  qwen3   the same reordering, per-head RMS norms on queries and keys (random weights), no biases
  phi3    Q, K and V fused into one matrix and gate/up into another, an untied output matrix,
          Phi-3.5's LongRoPE: per-frequency factors (long ones used, since the context exceeds
          the declared original one) and an attention factor on cos/sin
From Gemma 3 270M (Q4_K_M):
  gemma2  no q/k norms (their usual scale folded into the Q and K rows), attention and final logit soft-capping, a sliding window of 16 tokens on
          every other layer (so the fixture's prompts cross it); its Q4_K tensors
          requantized to Q8_0, since llama.cpp sums repacked Q4_K in another order

Quantized tensors keep their bytes (rows are moved or joined whole), so the files exercise the
same kernels as the originals. llama.cpp, built for this CPU by scripts/install-llama-cpp.sh,
tokenizes each prompt and decodes 16 tokens greedily (scripts/make-quantized.py's `greedy`).
OUT/architectures.json records per variant the file, its sha256 and the cases. Files whose
recorded sha256 still matches are kept.

    scripts/make-architectures.py OUT [SMOLLM2.gguf GEMMA3.gguf]
"""
import importlib.util, json, math, os, sys

import numpy as np

import gguf
from gguf import quants

MODELS = os.path.expanduser("~/.local/share/corral/models")
# Completion prompts for the Gemma-based variant (a base model), held out from
# tests/fixtures/gemma3-reference.json.
TEXTS = [
    "The largest ocean on Earth is",
    "My favourite breakfast is",
    "import numpy as np\n",
    "The first man on the Moon was",
    "A triangle has three",
    "Rain falls from",
    "The chemical symbol for gold is",
    "Once there was a dragon who",
]


def load_make_quantized():
    spec = importlib.util.spec_from_file_location(
        "make_quantized", os.path.join(os.path.dirname(os.path.abspath(__file__)), "make-quantized.py"))
    mq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mq)
    return mq


def halves(rows, n_head):
    """Rows of a llama-layout Q or K (rotary pairs adjacent) in the NeoX layout (halves): within
    each head, row 2k becomes row k and row 2k+1 row k + head_dim/2."""
    head_dim = rows.shape[0] // n_head
    order = []
    for h in range(n_head):
        base = h * head_dim
        order += [base + 2 * k for k in range(head_dim // 2)]
        order += [base + 2 * k + 1 for k in range(head_dim // 2)]
    return rows[order]


def head_rms(t, norm_w, n_head):
    """Per head, about how large a query or key row's RMS is for this layer's input: the input is
    RMS-normalised times `norm_w`, so row d has a variance near sum_j (W_dj * norm_w_j)^2."""
    w = quants.dequantize(t.data, t.tensor_type) * norm_w[None, :]
    var = (w.astype(np.float64) ** 2).sum(axis=1)
    return np.sqrt(var.reshape(n_head, -1).mean(axis=1))


def scale_rows(t, factors):
    """Rows of a Q5_0 or Q8_0 tensor (each block: an f16 scale, then the quants) with every
    block's scale multiplied by its row's factor."""
    size = {gguf.GGMLQuantizationType.Q5_0: 22, gguf.GGMLQuantizationType.Q8_0: 34}[t.tensor_type]
    data = t.data.copy()
    blocks = data.reshape(data.shape[0], -1, size)
    d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
    d *= factors[:, None, None]
    blocks[:, :, :2] = d.astype(np.float16).view(np.uint8)
    return data


class Variant:
    """A GGUF being written: metadata copied from a source file under a new architecture name,
    tensors added in order."""

    def __init__(self, src, arch):
        self.r = gguf.GGUFReader(src)
        self.src_arch = self.r.fields[gguf.Keys.General.ARCHITECTURE].contents()
        self.arch = arch
        self.md = {f.name: f for f in self.r.fields.values()}
        self.tensors = {t.name: t for t in self.r.tensors}
        self.out_tensors = []  # (name, data, type)
        self.extra_kv = []

    def val(self, key):
        return self.md[f"{self.src_arch}.{key}"].contents()

    def copy(self, name, new_name=None):
        t = self.tensors[name]
        self.out_tensors.append((new_name or name, t.data, t.tensor_type))

    def put(self, name, data, ttype):
        self.out_tensors.append((name, data, ttype))

    def f32(self, name, values):
        self.put(name, np.ascontiguousarray(values, dtype=np.float32), gguf.GGMLQuantizationType.F32)

    def write(self, dst):
        w = gguf.GGUFWriter(dst, self.arch)
        for field in self.r.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            name = field.name
            if name.startswith(self.src_arch + "."):
                name = self.arch + name[len(self.src_arch):]
            t = field.types[0]
            sub = field.types[-1] if t == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), t, sub_type=sub)
        for key, value, vtype in self.extra_kv:
            w.add_key_value(f"{self.arch}.{key}", value, vtype)
        for name, data, ttype in self.out_tensors:
            w.add_tensor_info(name, data.shape, data.dtype, data.nbytes, ttype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, data, _ in self.out_tensors:
            w.write_tensor_data(np.ascontiguousarray(data), tensor_endianess=self.r.endianess)
        w.close()


def from_smollm2(src, arch, dst):
    v = Variant(src, arch)
    rng = np.random.default_rng({"qwen2": 2, "qwen3": 3, "phi3": 33}[arch])
    n_head, n_kv = int(v.val("attention.head_count")), int(v.val("attention.head_count_kv"))
    n_layer = int(v.val("block_count"))
    head_dim = int(v.val("embedding_length")) // n_head
    v.copy("token_embd.weight")
    v.copy("output_norm.weight")
    if arch == "phi3":
        v.copy("token_embd.weight", "output.weight")
        half = head_dim // 2
        v.f32("rope_factors_long.weight", np.linspace(1.0, 3.0, half))
        v.f32("rope_factors_short.weight", np.linspace(1.0, 1.2, half))
        # As llama.cpp's converter writes LongRoPE: the attention factor from the context the
        # model declares (8192) over the original one.
        ctx, orig = int(v.val("context_length")), 256
        attn = math.sqrt(1 + math.log(ctx / orig) / math.log(orig))
        v.extra_kv += [("rope.scaling.type", "longrope", gguf.GGUFValueType.STRING),
                       ("rope.scaling.original_context_length", orig, gguf.GGUFValueType.UINT32),
                       ("rope.scaling.attn_factor", attn, gguf.GGUFValueType.FLOAT32)]
    for i in range(n_layer):
        p = f"blk.{i}"
        t = lambda n: v.tensors[f"{p}.{n}.weight"]
        for n in ["attn_norm", "ffn_norm", "attn_output", "ffn_down"]:
            v.copy(f"{p}.{n}.weight")
        q, k, vv = t("attn_q"), t("attn_k"), t("attn_v")
        assert q.tensor_type == k.tensor_type == vv.tensor_type
        wq, wk = halves(q.data, n_head), halves(k.data, n_kv)
        if arch == "phi3":
            v.put(f"{p}.attn_qkv.weight", np.concatenate([wq, wk, vv.data]), q.tensor_type)
            g, u = t("ffn_gate"), t("ffn_up")
            assert g.tensor_type == u.tensor_type
            v.put(f"{p}.ffn_up.weight", np.concatenate([g.data, u.data]), u.tensor_type)
            continue
        v.put(f"{p}.attn_q.weight", wq, q.tensor_type)
        v.put(f"{p}.attn_k.weight", wk, k.tensor_type)
        v.copy(f"{p}.attn_v.weight")
        v.copy(f"{p}.ffn_gate.weight")
        v.copy(f"{p}.ffn_up.weight")
        if arch == "qwen2":
            for n, rows in [("attn_q", n_head * head_dim), ("attn_k", n_kv * head_dim), ("attn_v", n_kv * head_dim)]:
                v.f32(f"{p}.{n}.bias", rng.normal(0.0, 0.1, rows))
        else:
            # Norm weights near the rows' usual size, so attention stays about as sharp as the
            # original's and the answers stay words (the file is for parity, not quality).
            a = v.tensors[f"{p}.attn_norm.weight"].data
            for n, t_, heads in [("attn_q", q, n_head), ("attn_k", k, n_kv)]:
                size = head_rms(t_, a, heads).mean()
                v.f32(f"{p}.{n}_norm.weight", size * rng.uniform(0.8, 1.2, head_dim))
    v.write(dst)


def from_gemma3(src, dst):
    v = Variant(src, "gemma2")
    n_head = int(v.val("attention.head_count"))
    n_kv = int(v.val("attention.head_count_kv"))
    for t in v.r.tensors:
        name = t.name
        if name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")):
            continue
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            # Gemma 2 has no q/k norms: their usual effect folded into the rows' scales (each
            # head divided by its typical RMS, each dimension times the norm's weight).
            layer = name.rsplit(".", 2)[0]
            kind = name.split(".")[-2]
            a = v.tensors[f"{layer}.attn_norm.weight"].data
            nw = v.tensors[f"{layer}.{kind}_norm.weight"].data
            heads = n_head if kind == "attn_q" else n_kv
            rms = head_rms(t, a, heads)
            factors = (np.tile(nw, heads) / np.repeat(rms, len(nw))).astype(np.float32)
            v.put(name, scale_rows(t, factors), t.tensor_type)
            continue
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_K:
            # llama.cpp repacks Q4_K rows at load and sums them in another order than ggml's
            # reference (tests/quantized.rs); Q8_0 keeps the comparison exact.
            q8 = quants.quantize(quants.dequantize(t.data, t.tensor_type), gguf.GGMLQuantizationType.Q8_0)
            v.put(name, q8, gguf.GGMLQuantizationType.Q8_0)
            continue
        v.copy(name)
    # Gemma 3's sliding_window would be renamed too: replaced by a short one.
    del v.md["gemma3.attention.sliding_window"]
    v.r.fields.pop("gemma3.attention.sliding_window")
    v.extra_kv += [("attention.sliding_window", 16, gguf.GGUFValueType.UINT32),
                   ("attn_logit_softcapping", 50.0, gguf.GGUFValueType.FLOAT32),
                   ("final_logit_softcapping", 30.0, gguf.GGUFValueType.FLOAT32),
                   ("rope.freq_base_swa", 10000.0, gguf.GGUFValueType.FLOAT32)]
    v.write(dst)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = sys.argv[1]
    smollm2 = sys.argv[2] if len(sys.argv) > 2 else os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf")
    gemma3 = sys.argv[3] if len(sys.argv) > 3 else os.path.join(MODELS, "gemma-3-270m-q4_k_m.gguf")
    os.makedirs(out, exist_ok=True)
    mq = load_make_quantized()
    ref_path = os.path.join(out, "architectures.json")
    old = {}
    if os.path.exists(ref_path):
        with open(ref_path) as f:
            old = json.load(f)
    script_sha = mq.sha256(os.path.abspath(__file__))
    ref = {"script_sha256": script_sha, "llama_cpp_python": mq.llama_cpp.__version__, "variants": {}}
    for arch in ["qwen2", "qwen3", "phi3", "gemma2"]:
        src = gemma3 if arch == "gemma2" else smollm2
        dst = os.path.join(out, f"{arch}.gguf")
        prev = old.get("variants", {}).get(arch)
        if (prev and old.get("script_sha256") == script_sha and prev.get("source_sha256") == mq.sha256(src)
                and os.path.exists(dst) and mq.sha256(dst) == prev["sha256"]
                and old.get("llama_cpp_python") == mq.llama_cpp.__version__):
            ref["variants"][arch] = prev
            continue
        if arch == "gemma2":
            from_gemma3(src, dst)
            cases = mq.greedy(dst, TEXTS, add_bos=True)
        else:
            from_smollm2(src, arch, dst)
            cases = mq.greedy(dst)
        ref["variants"][arch] = {"file": os.path.basename(dst), "sha256": mq.sha256(dst),
                                 "source_sha256": mq.sha256(src), "completion": arch == "gemma2",
                                 "cases": cases}
        print(f"{arch}: {[c['greedy_ids'][:6] for c in cases[:3]]}", file=sys.stderr)
    with open(ref_path, "w") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)
    print(ref_path)


if __name__ == "__main__":
    main()
