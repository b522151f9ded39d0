//! Safetensors checkpoints with a `tokenizer.json`: the default model's GGUF is turned into the
//! directory a Hugging Face repository holds (bf16 weights in HF's tensor names and layout,
//! `config.json`, `tokenizer.json`, `tokenizer_config.json`), and the sandboxed runner serves it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use common::*;
use corral::slm::runner::Runner;
use corral_protocol::Input;
use serde_json::{json, Value};

/// Writes the checkpoint directory for the GGUF at `gguf` into `dir`.
fn gguf_to_checkpoint(gguf: &Path, dir: &Path) {
    let mut f = std::fs::File::open(gguf).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let md = |k: &str| ct.metadata.get(k).unwrap();
    let u = |k: &str| md(&format!("llama.{k}")).to_u32().unwrap() as usize;
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

    // Weights: HF names, bf16 (as SmolLM2 is published), Q and K rows in HF's order (GGUF
    // conversion interleaves the two rotary halves of each head; undo it).
    let dev = Device::Cpu;
    let get = |name: &str| -> Tensor {
        ct.tensor(&mut f.try_clone().unwrap(), name, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap()
    };
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), get("token_embd.weight"));
    w.insert("model.norm.weight".into(), get("output_norm.weight"));
    for i in 0..n_layer {
        let g = |n: &str| get(&format!("blk.{i}.{n}.weight"));
        let p = format!("model.layers.{i}");
        w.insert(format!("{p}.input_layernorm.weight"), g("attn_norm"));
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            g("ffn_norm"),
        );
        w.insert(
            format!("{p}.self_attn.q_proj.weight"),
            rotary_halves(g("attn_q"), n_head),
        );
        w.insert(
            format!("{p}.self_attn.k_proj.weight"),
            rotary_halves(g("attn_k"), n_kv),
        );
        w.insert(format!("{p}.self_attn.v_proj.weight"), g("attn_v"));
        w.insert(format!("{p}.self_attn.o_proj.weight"), g("attn_output"));
        w.insert(format!("{p}.mlp.gate_proj.weight"), g("ffn_gate"));
        w.insert(format!("{p}.mlp.up_proj.weight"), g("ffn_up"));
        w.insert(format!("{p}.mlp.down_proj.weight"), g("ffn_down"));
    }
    let w: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();

    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": n_embd,
        "intermediate_size": w["model.layers.0.mlp.up_proj.weight"].dims2().unwrap().0,
        "vocab_size": tokens.len(),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": md("llama.attention.layer_norm_rms_epsilon").to_f32().unwrap(),
        "rope_theta": md("llama.rope.freq_base").to_f32().unwrap(),
        "max_position_embeddings": u("context_length"),
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    });
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
    gguf_to_checkpoint(&model_file(), &dir);
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
