#!/usr/bin/env python3
"""Produce tests/fixtures/smollm2-reference.json with llama.cpp (PyPI llama-cpp-python) on the
same GGUF corral runs: for each prompt, the token ids of the rendered chat prompt, the first
16 greedily generated token ids and the log-probability llama.cpp gives each of them (log-softmax
of its logits, in f64). The fixture is committed so CI need not build llama.cpp.

    scripts/install-llama-cpp.sh     # llama-cpp-python 0.3.36, GGML_NATIVE off, the CPU's ISA
    scripts/make-reference.py [MODEL.gguf]
"""
import json, os, sys

import numpy as np

import reference_llama  # noqa: F401  (before llama_cpp: see its docstring)
from llama_cpp import Llama

MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
    "~/.local/share/corral/models/SmolLM2-135M-Instruct.Q4_1.gguf")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 + 7?",
    "Name three primary colors.",
    "Explain photosynthesis in one sentence.",
    "def fibonacci(n):",
    "List the days of the week.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for 'happy'.",
    "Summarize: The cat sat on the mat all afternoon, watching birds.",
    "What's the difference between a list and a tuple in Python?",
    "Is 17 a prime number?",
    "Écris une phrase en français.",
    "What is the square root of 81?",
    "Tell me a fun fact about octopuses.",
    "Convert 5 kilometers to miles.",
    "  Spaces   and\ttabs\nand newlines  ",
    "数字 123 and émojis 🙂!",
]


def render(user):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def main():
    llm = Llama(model_path=MODEL, n_ctx=2048, n_threads=2, logits_all=False, verbose=False)
    out = {"model": os.path.basename(MODEL), "llama_cpp_python": __import__("llama_cpp").__version__, "cases": []}
    for p in PROMPTS:
        text = render(p)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
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
        plain = llm.tokenize(p.encode(), add_bos=False, special=False)
        out["cases"].append({"user": p, "prompt": text, "prompt_ids": ids, "plain_ids": plain, "greedy_ids": gen,
                             "greedy_logprobs": logprobs})
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2-reference.json")
    with open(path, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"wrote {path}: {len(out['cases'])} cases")


if __name__ == "__main__":
    main()
