#!/usr/bin/env python3
"""Produce tests/fixtures/gemma3-reference.json with llama.cpp (llama-cpp-python) on Gemma 3 270M
(base, GGUF Q4_K_M; scripts/fetch-model.sh gemma3-270m fetches it): for each text, its token ids
with BOS (how a completion prompt is encoded) and without (plain), the first 16 greedy tokens
and the log-probability llama.cpp gives each (log-softmax of its logits, in f64). Committed, so
CI need not build llama.cpp.

    scripts/install-llama-cpp.sh
    scripts/make-reference-gemma3.py [MODEL.gguf]
"""
import json, os, sys

import numpy as np

import reference_llama  # noqa: F401  (before llama_cpp: see its docstring)
from llama_cpp import Llama

MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
    "~/.local/share/corral/models/gemma-3-270m-q4_k_m.gguf")
TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Romeo and Juliet was written by",
    "A spider has eight legs because",
    "The days of the week are Monday,",
    "Photosynthesis is the process by which",
    "In Python, a list differs from a tuple in that",
    "17 is a prime number because",
    "Écrivez une phrase en français :",
    "The square root of 81 is",
    "Octopuses are remarkable animals:",
    "5 kilometers is roughly",
    "  Spaces   and\ttabs\nand newlines  ",
    "数字 123 and émojis 🙂!",
    "<start_of_turn>user\nHi<end_of_turn>",
    "SELECT name FROM users WHERE",
    "The quick brown fox",
]


def main():
    llm = Llama(model_path=MODEL, n_ctx=512, n_threads=2, logits_all=False, verbose=False)
    out = {"model": os.path.basename(MODEL), "llama_cpp_python": __import__("llama_cpp").__version__, "cases": []}
    for t in TEXTS:
        ids = llm.tokenize(t.encode(), add_bos=True, special=True)  # a raw prompt: specials parsed
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
            if tok == llm.token_eos():
                break
            llm.eval([tok])
        plain = llm.tokenize(t.encode(), add_bos=False, special=False)
        out["cases"].append({"text": t, "prompt_ids": ids, "plain_ids": plain, "greedy_ids": gen,
                             "greedy_logprobs": logprobs})
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gemma3-reference.json")
    with open(path, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"wrote {path}: {len(out['cases'])} cases")


if __name__ == "__main__":
    main()
