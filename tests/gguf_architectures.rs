//! The architectures no real model of which can be fetched here (Qwen2, Qwen3, Phi-3, Gemma 2),
//! exercised with real weights: the default model's (and Gemma 3's) tensors rewritten in each
//! architecture's GGUF layout by scripts/make-architectures.py at test time, each read by corral's
//! own forward pass and by llama.cpp built for this CPU. Every option those layouts switch on —
//! rotary halves, q/k/v biases, per-head q/k norms, fused QKV and gate/up, LongRoPE factors and
//! attention factor, untied output, sliding windows, attention and final soft-capping — is
//! checked against llama.cpp's reading of the same file, not against corral's idea of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use corral::slm::runner::Runner;
use corral_protocol::{ChatMessage, GenerateRequest, Input};

/// Every variant is made of types corral computes with ggml's arithmetic (Q4_1 for the
/// SmolLM2-based ones; Q5_0, Q6_K and Q8_0 for gemma2, whose Q4_K rows the script requantizes
/// because llama.cpp repacks Q4_K and sums it in another order): all 8 continuations identical
/// for 16 tokens and the log-probabilities equal to float rounding.
fn expected(_arch: &str) -> (usize, usize, f64) {
    (8, 8, 1e-3)
}

#[test]
fn each_architecture_reads_its_layout_as_llama_cpp_does() {
    let (dir, reference) = architectures_reference();
    let variants = reference["variants"].as_object().unwrap();
    assert_eq!(variants.len(), 4, "{:?}", variants.keys());
    let mut summary = Vec::new();
    let mut misses = Vec::new();
    for (arch, v) in variants {
        let file = dir.join(v["file"].as_str().unwrap());
        let mut r = start_runner(&file, v["sha256"].as_str().unwrap(), "secure").unwrap();
        assert_eq!(&r.ready.architecture, arch);
        let completion = v["completion"].as_bool().unwrap();
        let cases = v["cases"].as_array().unwrap();
        let (mut same, mut first, mut worst_lp) = (0, 0, 0f64);
        let mut report = Vec::new();
        for c in cases {
            let prompt = c["prompt"].as_str().unwrap();
            // A completion prompt is encoded with BOS first (Gemma), a chat prompt as it is.
            let prompt_ids = ids(&c["prompt_ids"]);
            assert_eq!(
                r.tokenize(prompt, true).unwrap(),
                prompt_ids[usize::from(completion)..],
                "{arch}: {prompt:?}"
            );
            let done = r
                .generate(
                    greedy_request(Input::Prompt(prompt.into()), 16),
                    &mut |_| {},
                )
                .unwrap();
            assert_eq!(
                done.prompt_tokens as usize,
                prompt_ids.len(),
                "{arch}: {prompt:?}"
            );
            let a = agreement(arch, &done, c, &r.ready.eos_token_ids);
            same += usize::from(a.same);
            first += usize::from(a.agree >= 1);
            worst_lp = worst_lp.max(a.worst_lp);
            report.extend(a.report);
        }
        r.shutdown();
        let n = cases.len();
        let (want_same, want_first, bound) = expected(arch);
        let line = format!(
            "{arch}: identical {same}/{n}, first token {first}/{n}, largest logprob difference \
             {worst_lp:.1e}"
        );
        if same < want_same || first < want_first || worst_lp > bound {
            misses.push(format!(
                "{line} (want {want_same}, {want_first}, <= {bound:.0e})\n{}",
                report.join("\n")
            ));
        }
        summary.push(line);
    }
    eprintln!("{}", summary.join("\n"));
    assert!(misses.is_empty(), "{}", misses.join("\n"));
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
