//! Safetensors checkpoints with a `tokenizer.json`: the default model's GGUF is turned into the
//! directory a Hugging Face repository holds (bf16 weights in HF's tensor names and layout,
//! `config.json`, `tokenizer.json`, `tokenizer_config.json`), and the sandboxed runner serves it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use corral::slm::runner::Runner;
use corral_protocol::Input;
use serde_json::{json, Value};

/// Writes the checkpoint directory for the GGUF at `gguf` (the default model, or one of its
/// copies in another architecture's layout: scripts/make-architectures.py) into `dir`, its
/// weights as `dtype`: what a Hugging Face repository of that family holds.
fn gguf_to_checkpoint(gguf: &Path, dir: &Path, dtype: DType) {
    let mut f = std::fs::File::open(gguf).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let md = |k: &str| ct.metadata.get(k).unwrap();
    let arch = md("general.architecture").to_string().unwrap().clone();
    let u = |k: &str| md(&format!("{arch}.{k}")).to_u32().unwrap() as usize;
    let (n_embd, n_head, n_kv, n_layer) = (
        u("embedding_length"),
        u("attention.head_count"),
        u("attention.head_count_kv"),
        u("block_count"),
    );
    let tokens: Vec<String> = md("tokenizer.ggml.tokens")
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_string().unwrap().clone())
        .collect();
    let types: Vec<i32> = md("tokenizer.ggml.token_type")
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_i32().unwrap())
        .collect();
    let merges: Vec<String> = md("tokenizer.ggml.merges")
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_string().unwrap().clone())
        .collect();

    // Weights: HF names; llama's Q and K rows in HF's order (GGUF conversion interleaves the two
    // rotary halves of each head; undo it), the NeoX families' as they are.
    let dev = Device::Cpu;
    let has = |name: &str| ct.tensor_infos.contains_key(name);
    let get = |name: &str| -> Tensor {
        ct.tensor(&mut f.try_clone().unwrap(), name, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap()
    };
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), get("token_embd.weight"));
    w.insert("model.norm.weight".into(), get("output_norm.weight"));
    let tied = !has("output.weight");
    if !tied {
        w.insert("lm_head.weight".into(), get("output.weight"));
    }
    for i in 0..n_layer {
        let g = |n: &str| get(&format!("blk.{i}.{n}"));
        let p = format!("model.layers.{i}");
        let mut put = |name: String, t: Tensor| w.insert(name, t);
        put(format!("{p}.input_layernorm.weight"), g("attn_norm.weight"));
        put(
            format!("{p}.post_attention_layernorm.weight"),
            g("ffn_norm.weight"),
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            g("attn_output.weight"),
        );
        put(format!("{p}.mlp.down_proj.weight"), g("ffn_down.weight"));
        if arch == "phi3" {
            put(
                format!("{p}.self_attn.qkv_proj.weight"),
                g("attn_qkv.weight"),
            );
            put(format!("{p}.mlp.gate_up_proj.weight"), g("ffn_up.weight"));
            continue;
        }
        let (q, k) = (g("attn_q.weight"), g("attn_k.weight"));
        let (q, k) = if arch == "llama" {
            (rotary_halves(q, n_head), rotary_halves(k, n_kv))
        } else {
            (q, k)
        };
        put(format!("{p}.self_attn.q_proj.weight"), q);
        put(format!("{p}.self_attn.k_proj.weight"), k);
        put(format!("{p}.self_attn.v_proj.weight"), g("attn_v.weight"));
        for x in ["q", "k", "v"] {
            if has(&format!("blk.{i}.attn_{x}.bias")) {
                put(
                    format!("{p}.self_attn.{x}_proj.bias"),
                    g(&format!("attn_{x}.bias")),
                );
            }
        }
        for x in ["q", "k"] {
            if has(&format!("blk.{i}.attn_{x}_norm.weight")) {
                put(
                    format!("{p}.self_attn.{x}_norm.weight"),
                    g(&format!("attn_{x}_norm.weight")),
                );
            }
        }
        put(format!("{p}.mlp.gate_proj.weight"), g("ffn_gate.weight"));
        put(format!("{p}.mlp.up_proj.weight"), g("ffn_up.weight"));
    }
    let n_ff = u("feed_forward_length");
    let w: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();

    let mut config = json!({
        "model_type": arch,
        "hidden_size": n_embd,
        "intermediate_size": n_ff,
        "vocab_size": tokens.len(),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": n_embd / n_head,
        "rms_norm_eps": md(&format!("{arch}.attention.layer_norm_rms_epsilon")).to_f32().unwrap(),
        "rope_theta": md(&format!("{arch}.rope.freq_base")).to_f32().unwrap(),
        "max_position_embeddings": u("context_length"),
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": format!("{dtype:?}").to_lowercase(),
    });
    if has("rope_factors_long.weight") {
        let factors = |n: &str| get(n).to_vec1::<f32>().unwrap();
        config["rope_scaling"] = json!({
            "type": "longrope",
            "long_factor": factors("rope_factors_long.weight"),
            "short_factor": factors("rope_factors_short.weight"),
        });
        config["original_max_position_embeddings"] =
            json!(u("rope.scaling.original_context_length"));
    }
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == 3)
        .map(|(i, t)| json!({"id": i, "content": t, "special": true}))
        .collect();
    // The pre-tokenizer SmolLM2's own tokenizer.json declares.
    let tokenizer = json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges}
    });
    let tokenizer_config = json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": md("tokenizer.chat_template").to_string().unwrap(),
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("README.md"), "not part of the digest\n").unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn start(dir: &Path, sha256: &str) -> Result<Runner, corral::slm::runner::RunnerError> {
    start_runner(dir, sha256, "secure")
}

#[test]
fn a_safetensors_checkpoint_with_tokenizer_json_runs_in_the_sandbox() {
    let tmp = tempfile::Builder::new()
        .prefix("corral-ckpt-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("SmolLM2-135M-Instruct");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    gguf_to_checkpoint(&model_file(), &dir, DType::BF16);
    let digest = corral_protocol::digest::model_digest(&dir).unwrap();

    // A digest that does not match is refused before anything is used.
    let last = if digest.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &digest[..63]);
    let err = start(&dir, &wrong).unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");

    let mut r = start(&dir, &digest).unwrap();
    assert_eq!(r.ready.architecture, "llama");
    assert_eq!(r.ready.quantization, "BF16 -> F32");
    assert!(
        r.ready.has_chat_template,
        "chat template from tokenizer_config.json"
    );

    // The tokenizer built from tokenizer.json splits exactly as llama.cpp does from the GGUF.
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/smollm2-reference.json")).unwrap();
    for c in fixture["cases"].as_array().unwrap() {
        let ids = |k: &str| -> Vec<u32> {
            c[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        assert_eq!(
            r.tokenize(c["prompt"].as_str().unwrap(), true).unwrap(),
            ids("prompt_ids")
        );
        assert_eq!(
            r.tokenize(c["user"].as_str().unwrap(), false).unwrap(),
            ids("plain_ids")
        );
    }

    // Real weights, real answer, through the checkpoint's own chat template.
    let req = greedy_request(
        Input::Messages(vec![corral_protocol::ChatMessage::new(
            "user",
            "What is the capital of France?",
        )]),
        24,
    );
    let done = r.generate(req, &mut |_| {}).unwrap();
    assert!(done.text.contains("Paris"), "{:?}", done.text);
    assert!(done
        .tokens
        .iter()
        .all(|t| t.logprob <= 0.0 && t.logprob.is_finite()));
    r.shutdown();
}

/// The GGUF at `src` with every tensor as f16 (the weights of an f16 checkpoint made from it),
/// written to `dst`.
fn widened(src: &Path, dst: &Path) {
    let mut f = std::fs::File::open(src).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let dev = Device::Cpu;
    let tensors: Vec<(String, QTensor)> = ct
        .tensor_infos
        .keys()
        .map(|name| {
            let t = ct.tensor(&mut f, name, &dev).unwrap();
            // (LongRoPE's factors stay f32: a checkpoint has them in config.json.)
            let dtype = if name.starts_with("rope_factors") {
                GgmlDType::F32
            } else {
                GgmlDType::F16
            };
            let t = QTensor::quantize(&t.dequantize(&dev).unwrap(), dtype).unwrap();
            (name.clone(), t)
        })
        .collect();
    let md: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(dst).unwrap(), &md, &t_refs).unwrap();
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Each family's checkpoint (the default model's weights in the llama, Qwen2, Qwen3 and Phi-3
/// layouts, f16) runs on corral's own forward pass with its options — biases, q/k norms, fused
/// matrices, LongRoPE read from `rope_scaling` — exactly as the same weights do from a GGUF:
/// compared with the GGUF in f16 (the same weights, the same f32 products), answers and
/// log-probabilities are identical.
#[test]
fn each_family_checkpoint_answers_as_its_gguf_does() {
    let (dir, reference) = architectures_reference();
    let mut files = vec![("llama".to_string(), model_file())];
    for arch in ["qwen2", "qwen3", "phi3"] {
        let v = &reference["variants"][arch];
        files.push((arch.into(), dir.join(v["file"].as_str().unwrap())));
    }
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/smollm2-reference.json")).unwrap();
    let prompts: Vec<String> = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .take(8)
        .map(|c| c["prompt"].as_str().unwrap().to_string())
        .collect();
    let tmp = tempfile::Builder::new()
        .prefix("corral-ckpt-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let answers = |r: &mut Runner| -> Vec<Vec<(u32, f32)>> {
        prompts
            .iter()
            .map(|p| {
                r.generate(greedy_request(Input::Prompt(p.clone()), 8), &mut |_| {})
                    .unwrap()
                    .tokens
                    .iter()
                    .map(|t| (t.token_id, t.logprob))
                    .collect()
            })
            .collect()
    };
    let (mut summary, mut misses) = (Vec::new(), Vec::new());
    for (arch, gguf) in files {
        let ckpt = tmp.path().join(&arch);
        std::fs::create_dir(&ckpt).unwrap();
        gguf_to_checkpoint(&gguf, &ckpt, DType::F16);
        let mut r = start(
            &ckpt,
            &corral_protocol::digest::model_digest(&ckpt).unwrap(),
        )
        .unwrap();
        assert_eq!(r.ready.architecture, arch);
        assert_eq!(r.ready.quantization, "F16 -> F32");
        let got = answers(&mut r);
        r.shutdown();
        let wide = tmp.path().join(format!("{arch}-f16.gguf"));
        widened(&gguf, &wide);
        let sha = corral_protocol::digest::model_digest(&wide).unwrap();
        let mut r = start(&wide, &sha).unwrap();
        let want = answers(&mut r);
        r.shutdown();
        let (mut first, mut same, mut worst) = (0, 0, 0f32);
        for (g, w) in got.iter().zip(&want) {
            first += usize::from(g.first().map(|t| t.0) == w.first().map(|t| t.0));
            same += usize::from(g.iter().map(|t| t.0).eq(w.iter().map(|t| t.0)));
            for (a, b) in g.iter().zip(w).take_while(|(a, b)| a.0 == b.0) {
                worst = worst.max((a.1 - b.1).abs());
            }
        }
        let n = prompts.len();
        summary.push(format!(
            "{arch}: first token {first}/{n}, 8 tokens identical {same}/{n}, largest logprob \
             difference {worst:.1e}"
        ));
        if first < n || same < n || worst > 1e-5 {
            misses.push(arch);
        }
    }
    eprintln!("{}", summary.join("\n"));
    assert!(misses.is_empty(), "{misses:?}:\n{}", summary.join("\n"));
}
