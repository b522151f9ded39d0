//! The Qwen2 and Phi-3 GGUF paths (Candle's quantized models, with Q4_1 requantized to Q8_0),
//! exercised with real weights: the default model's tensors rewritten in each architecture's GGUF
//! layout. Qwen2 is the llama block plus q/k/v biases (zero here) with rotary embeddings over
//! halves instead of adjacent pairs (so Q and K rows are reordered); Phi-3 additionally fuses
//! Q/K/V into one matrix and gate/up into another.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use corral::slm::runner::Runner;
use corral_protocol::{ChatMessage, GenerateRequest, Input};

/// Rewrites the llama GGUF at `src` as `arch` ("qwen2" or "phi3") into `dst`.
fn relabel(src: &Path, dst: &Path, arch: &str) {
    let mut f = std::fs::File::open(src).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let dev = Device::Cpu;
    let u = |k: &str| ct.metadata[&format!("llama.{k}")].to_u32().unwrap() as usize;
    let (n_head, n_kv, n_layer) = (
        u("attention.head_count"),
        u("attention.head_count_kv"),
        u("block_count"),
    );
    let q = |name: &str| ct.tensor(&mut f.try_clone().unwrap(), name, &dev).unwrap();
    let deq = |name: &str| q(name).dequantize(&dev).unwrap();
    // Attention projections stay f32: requantizing them to Q8_0 a second time (after Q4_1) was
    // enough to derail this small model's answers; the feed-forward tolerates Q8_0.
    let f32 = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).unwrap();
    let q8 = |t: &Tensor| QTensor::quantize(t, GgmlDType::Q8_0).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q("token_embd.weight")),
        ("output_norm.weight".into(), q("output_norm.weight")),
    ];
    if arch == "phi3" {
        tensors.push(("output.weight".into(), q("token_embd.weight")));
    }
    for i in 0..n_layer {
        let p = format!("blk.{i}");
        // these architectures rotate halves, llama GGUFs adjacent pairs
        let wq = rotary_halves(deq(&format!("{p}.attn_q.weight")), n_head);
        let wk = rotary_halves(deq(&format!("{p}.attn_k.weight")), n_kv);
        let mut add = |n: &str, t: QTensor| tensors.push((format!("{p}.{n}"), t));
        for n in [
            "attn_norm.weight",
            "ffn_norm.weight",
            "attn_output.weight",
            "ffn_down.weight",
        ] {
            add(n, q(&format!("{p}.{n}")));
        }
        if arch == "qwen2" {
            let zeros = |t: &Tensor| {
                QTensor::quantize(
                    &Tensor::zeros(t.dims2().unwrap().0, candle_core::DType::F32, &dev).unwrap(),
                    GgmlDType::F32,
                )
                .unwrap()
            };
            let wv = deq(&format!("{p}.attn_v.weight"));
            add("attn_q.bias", zeros(&wq));
            add("attn_k.bias", zeros(&wk));
            add("attn_v.bias", zeros(&wv));
            add("attn_q.weight", f32(&wq));
            add("attn_k.weight", f32(&wk));
            add("attn_v.weight", q(&format!("{p}.attn_v.weight")));
            add("ffn_gate.weight", q(&format!("{p}.ffn_gate.weight")));
            add("ffn_up.weight", q(&format!("{p}.ffn_up.weight")));
        } else {
            let wv = deq(&format!("{p}.attn_v.weight"));
            add(
                "attn_qkv.weight",
                f32(&Tensor::cat(&[&wq, &wk, &wv], 0).unwrap()),
            );
            let gate = deq(&format!("{p}.ffn_gate.weight"));
            let up = deq(&format!("{p}.ffn_up.weight"));
            add("ffn_up.weight", q8(&Tensor::cat(&[&gate, &up], 0).unwrap()));
        }
    }
    let mut md: Vec<(String, gguf_file::Value)> = ct
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer.") || k.starts_with("general."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    md.retain(|(k, _)| k != "general.architecture");
    md.push((
        "general.architecture".into(),
        gguf_file::Value::String(arch.into()),
    ));
    for k in [
        "embedding_length",
        "block_count",
        "attention.head_count",
        "attention.head_count_kv",
        "context_length",
        "feed_forward_length",
        "rope.dimension_count",
    ] {
        md.push((format!("{arch}.{k}"), gguf_file::Value::U32(u(k) as u32)));
    }
    for k in ["rope.freq_base", "attention.layer_norm_rms_epsilon"] {
        md.push((
            format!("{arch}.{k}"),
            ct.metadata[&format!("llama.{k}")].clone(),
        ));
    }
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &md_refs, &t_refs).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn start(model: &Path) -> Runner {
    start_runner(
        model,
        &corral_protocol::digest::model_digest(model).unwrap(),
        "secure",
    )
    .unwrap()
}

fn request(input: Input, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        top_logprobs: 5,
        ..greedy_request(input, max_tokens)
    }
}

fn france() -> Input {
    Input::Messages(vec![ChatMessage::new(
        "user",
        "What is the capital of France?",
    )])
}

fn scratch() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("corral-arch-")
        .tempdir()
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn qwen2_gguf_answers_like_the_llama_original() {
    let tmp = scratch();
    let path = tmp.path().join("smollm2-as-qwen2.gguf");
    relabel(&model_file(), &path, "qwen2");
    let mut r = start(&path);
    assert_eq!(r.ready.architecture, "qwen2");
    assert!(
        r.ready.quantization.ends_with("-> Q8_0"),
        "{}",
        r.ready.quantization
    );
    let done = r.generate(request(france(), 24), &mut |_| {}).unwrap();
    r.shutdown();
    assert!(done.text.contains("Paris"), "{:?}", done.text);

    // (The Q4_1 original, run exactly as llama.cpp runs it, drifts off on this prompt; the
    // f32 attention of this copy keeps it on track. Answers are therefore not compared.)
}

#[test]
fn phi3_gguf_with_fused_projections_matches_the_llama_original_at_the_first_position() {
    let tmp = scratch();
    let path = tmp.path().join("smollm2-as-phi3.gguf");
    relabel(&model_file(), &path, "phi3");
    // Candle's Phi-3 fixes the rotary base at 10000 (Phi-3's own) while SmolLM2 was trained
    // with 100000, so compare where rotation does nothing: a one-token prompt at position 0.
    let first = |model: &Path| {
        let mut r = start(model);
        let arch = r.ready.architecture.clone();
        let d = r
            .generate(request(Input::Prompt("Paris".into()), 1), &mut |_| {})
            .unwrap();
        r.shutdown();
        assert_eq!(d.prompt_tokens, 1);
        (arch, d.tokens[0].clone())
    };
    let (arch, got) = first(&path);
    assert_eq!(arch, "phi3");
    let (_, want) = first(&model_file());
    assert_eq!(got.token_id, want.token_id);
    assert_eq!(got.top.len(), 5);
    // the leading alternatives agree (the tail of near-equal ones may reorder)
    for (g, w) in got.top.iter().zip(&want.top).take(3) {
        assert_eq!(g.token_id, w.token_id, "{:?} vs {:?}", got.top, want.top);
        // f32 attention projections here, Q4_1 with 8-bit activations there: close, not equal
        assert!((g.logprob - w.logprob).abs() < 0.3, "{g:?} vs {w:?}");
    }
}

/// A copy of the default model with `output_norm.weight` set to NaN: every logit is NaN.
fn with_nan_output_norm(src: &Path, dst: &Path) {
    let mut f = std::fs::File::open(src).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let dev = Device::Cpu;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in ct.tensor_infos.keys() {
        let t = ct.tensor(&mut f, name, &dev).unwrap();
        let t = if name == "output_norm.weight" {
            let n = t.shape().elem_count();
            QTensor::quantize(
                &Tensor::from_vec(vec![f32::NAN; n], t.shape().clone(), &dev).unwrap(),
                GgmlDType::F32,
            )
            .unwrap()
        } else {
            t
        };
        tensors.push((name.clone(), t));
    }
    let md: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &md, &t_refs).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o644)).unwrap();
}

#[test]
fn non_finite_logits_are_a_model_error_not_an_empty_answer() {
    let tmp = scratch();
    let path = tmp.path().join("smollm2-nan-norm.gguf");
    with_nan_output_norm(&model_file(), &path);
    let mut r = start(&path);
    for temperature in [0.0, 1.0] {
        let mut req = request(france(), 8);
        req.sampling.temperature = temperature;
        match r.generate(req, &mut |_| {}) {
            Err(corral::slm::runner::RunnerError::Model(m)) => {
                assert!(m.contains("non-finite values"), "{m}")
            }
            other => panic!("temperature {temperature}: expected a model error, got {other:?}"),
        }
    }
    // The runner itself is fine and still answers the protocol.
    assert!(r.tokenize("still there", false).is_ok());
}
