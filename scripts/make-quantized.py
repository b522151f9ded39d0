#!/usr/bin/env python3
"""Make the other weight types of the default model with llama.cpp's own quantizer, and what
llama.cpp answers on each: the test files of tests/quantized.rs (made at test time, never
committed).

For each type in TYPES, llama.cpp (llama-cpp-python's `llama_model_quantize`, with
`allow_requantize`, since the source is the Q4_1 file) writes OUT/smollm2-<type>.gguf; then
llama.cpp, built for this CPU by scripts/install-llama-cpp.sh, tokenizes each prompt and decodes
16 tokens greedily. OUT/reference.json records, per type: the file, its sha256, which tensor
types it holds, and per prompt the prompt ids, the greedy ids and their log-probabilities.
Files already there with the recorded sha256 are kept.

    scripts/install-llama-cpp.sh
    scripts/make-quantized.py OUT [MODEL.gguf]
"""
import ctypes, hashlib, json, os, sys
from collections import Counter

import numpy as np

import reference_llama  # noqa: F401  (before llama_cpp: see its docstring)
import llama_cpp
from llama_cpp import Llama

TYPES = ["Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "F16", "BF16"]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Held out from the Q4_1 fixture's prompts (tests/fixtures/smollm2-reference.json).
PROMPTS = [
    "What is the tallest mountain on Earth?",
    "Write one sentence about autumn.",
    "How many minutes are in two hours?",
    "What colour is a ripe banana?",
    "Give an example of a mammal that can fly.",
    "def add(a, b):",
    "What does CPU stand for?",
    "Name a planet with rings.",
]


def render(user):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_types(path):
    try:
        import gguf
    except ImportError:
        return {}
    r = gguf.GGUFReader(path)
    return dict(Counter(t.tensor_type.name for t in r.tensors))


def quantize(src, dst, name):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {name} failed: {rc}")


def greedy(path, texts=None, add_bos=False):
    """llama.cpp's tokens for each text (default: PROMPTS in the chat template) and its first 16
    greedy continuations with their log-probabilities."""
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
    cases = []
    for text in texts if texts is not None else [render(p) for p in PROMPTS]:
        ids = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
        llm.reset()
        llm.eval(ids)
        gen, logprobs = [], []
        for _ in range(16):
            tok = llm.sample(temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            z = logits.astype(np.float64)
            z = z - z.max()
            logprobs.append(float(z[tok] - np.log(np.exp(z).sum())))
            gen.append(int(tok))
            if tok == llm.token_eos() or tok == 2:
                break
            llm.eval([tok])
        cases.append({"prompt": text, "prompt_ids": ids, "greedy_ids": gen, "greedy_logprobs": logprobs})
    del llm
    return cases


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = sys.argv[1]
    src = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser(
        "~/.local/share/corral/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    os.makedirs(out, exist_ok=True)
    ref_path = os.path.join(out, "reference.json")
    old = {}
    if os.path.exists(ref_path):
        with open(ref_path) as f:
            old = json.load(f)
    src_sha = sha256(src)
    ref = {"source": os.path.basename(src), "source_sha256": src_sha,
           "llama_cpp_python": llama_cpp.__version__, "types": {}}
    for name in TYPES:
        path = os.path.join(out, f"smollm2-{name.lower()}.gguf")
        prev = old.get("types", {}).get(name)
        if (prev and old.get("source_sha256") == src_sha and os.path.exists(path)
                and sha256(path) == prev["sha256"] and old.get("llama_cpp_python") == llama_cpp.__version__):
            ref["types"][name] = prev
            continue
        quantize(src, path, name)
        ref["types"][name] = {"file": os.path.basename(path), "sha256": sha256(path),
                              "tensor_types": tensor_types(path), "cases": greedy(path)}
        print(f"{name}: {ref['types'][name]['tensor_types']}", file=sys.stderr)
    with open(ref_path, "w") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)
    print(ref_path)


if __name__ == "__main__":
    main()
