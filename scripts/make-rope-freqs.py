#!/usr/bin/env python3
"""A Llama 3.1-style test file made from the default model: the same weights plus a
`rope_freqs.weight` tensor (the per-frequency divisors Llama 3.1/3.2 GGUFs carry, computed with
Llama 3's rule: factor 8, low/high frequency factors 1 and 4, an original context of 8,192), and
what llama.cpp answers on it. For tests/runner.rs; made at test time, never committed.

    scripts/make-rope-freqs.py OUT_DIR [MODEL.gguf]
writes OUT_DIR/smollm2-rope-freqs.gguf and OUT_DIR/rope-freqs-reference.json (llama.cpp's greedy
continuations, as scripts/make-quantized.py records them).
"""
import hashlib, importlib.util, json, math, os, sys

import numpy as np

import gguf


def llama3_factors(head_dim, base, factor=8.0, low=1.0, high=4.0, original=8192):
    """Llama 3's frequency divisors: 1 for wavelengths shorter than original/high, `factor` for
    those longer than original/low, a smooth mix between."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out_dir = sys.argv[1]
    src = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser(
        "~/.local/share/corral/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, "smollm2-rope-freqs.gguf")
    r = gguf.GGUFReader(src)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    md = {f.name: f.contents() for f in r.fields.values()}
    head_dim = int(md[f"{arch}.rope.dimension_count"])
    factors = llama3_factors(head_dim, float(md[f"{arch}.rope.freq_base"]))
    w = gguf.GGUFWriter(dst, arch)
    for field in r.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        t = field.types[0]
        sub = field.types[-1] if t == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), t, sub_type=sub)
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes,
                      gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data, tensor_endianess=r.endianess)
    w.write_tensor_data(factors)
    w.close()
    spec = importlib.util.spec_from_file_location(
        "make_quantized", os.path.join(os.path.dirname(os.path.abspath(__file__)), "make-quantized.py"))
    mq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mq)
    ref = {"file": os.path.basename(dst), "sha256": mq.sha256(dst),
           "factors": factors.tolist(), "cases": mq.greedy(dst)}
    with open(os.path.join(out_dir, "rope-freqs-reference.json"), "w") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)
    print(dst)


if __name__ == "__main__":
    main()
