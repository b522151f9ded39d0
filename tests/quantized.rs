//! The weight types people download, made at test time from the default model by llama.cpp's
//! own quantizer (scripts/make-quantized.py; nothing committed), each read by corral and by
//! llama.cpp built for this CPU (scripts/install-llama-cpp.sh): the prompts must tokenize
//! identically and the greedy continuations agree as measured below.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use corral_protocol::Input;
use std::path::PathBuf;
use std::process::Command;

/// The files and llama.cpp's answers, made (or reused, when their hashes still match) under
/// target/quantized.
fn reference() -> (PathBuf, serde_json::Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/quantized");
    let model = model_file();
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/make-quantized.py"
        ))
        .arg(&dir)
        .arg(&model)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "scripts/make-quantized.py failed (it needs llama.cpp: scripts/install-llama-cpp.sh, \
         which scripts/test.sh runs):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

#[test]
fn every_weight_type_answers_as_llama_cpp_does() {
    let (dir, reference) = reference();
    let types = reference["types"].as_object().unwrap();
    assert!(types.len() >= 9, "{types:?}");
    let mut summary = Vec::new();
    let mut report = Vec::new();
    let mut misses = Vec::new();
    for (name, t) in types {
        if std::env::var("QONLY").is_ok_and(|o| o != *name) {
            continue;
        }
        let file = dir.join(t["file"].as_str().unwrap());
        let mut r = start_runner(&file, t["sha256"].as_str().unwrap(), "secure").unwrap();
        let quantization = r.ready.quantization.clone();
        let (mut same, mut first, mut worst_lp) = (0, 0, 0f64);
        let cases = t["cases"].as_array().unwrap();
        for c in cases {
            let prompt = c["prompt"].as_str().unwrap();
            assert_eq!(
                r.tokenize(prompt, true).unwrap(),
                ids(&c["prompt_ids"]),
                "{name}: {prompt:?}"
            );
            let done = r
                .generate(
                    greedy_request(Input::Prompt(prompt.into()), 16),
                    &mut |_| {},
                )
                .unwrap();
            let a = agreement(name, &done, c, &r.ready.eos_token_ids);
            same += usize::from(a.same);
            first += usize::from(a.agree >= 1);
            worst_lp = worst_lp.max(a.worst_lp);
            report.extend(a.report);
        }
        r.shutdown();
        let n = cases.len();
        let (want_same, want_first, lp_bound) = expected(name);
        if same < want_same.min(n) || first < want_first.min(n) || worst_lp > lp_bound {
            misses.push(format!(
                "{name}: identical {same}/{n} (want {want_same}), first token {first}/{n} (want \
                 {want_first}), logprob difference {worst_lp:.1e} (want <= {lp_bound:.0e})"
            ));
        }
        summary.push(format!(
            "{name} ({}): identical {same}/{}, first token {first}/{}, largest logprob difference {worst_lp:.1e}",
            quantization,
            cases.len(),
            cases.len()
        ));
    }
    eprintln!("{}", summary.join("\n"));
    assert!(
        misses.is_empty(),
        "{}\n{}",
        misses.join("\n"),
        report.join("\n")
    );
}

/// What each type must reach against llama.cpp built for this CPU (AVX2): identical
/// continuations, right first tokens, and the largest log-probability difference over the tokens
/// where both agree.
///
/// - Q5_0, Q5_1, Q8_0, Q5_K, Q6_K (and the Q5_K_M file, which mixes them): corral computes
///   them with ggml's arithmetic (`runner/src/kernels.rs`: its `vec_dot` order for one row, its
///   tiled order for eight rows or more), so every continuation is identical and the
///   log-probabilities agree to float rounding.
/// - Q4_0 and Q4_K (the Q4_K_M file): llama.cpp repacks them at load into 8-row interleaved
///   blocks (its CPU_REPACK buffers, on any AVX2 host) whose kernels sum in another order;
///   corral keeps ggml's non-repacked orders, so near-ties go either way and the
///   log-probabilities drift by tenths (measured: Q4_0 5/8 identical, 8/8 first tokens, 0.14;
///   Q4_K_M 2–4/8 identical, 7–8/8 first tokens, 0.20–0.27). Reproducing the repacked orders
///   is open work (issue 17).
/// - F16 and BF16: corral's own kernels with ggml's arithmetic (activations rounded to f16 or
///   bf16; `vec_dot_f16`'s order for one row and tinyBLAS's for more, `vec_dot_bf16`'s for any),
///   so identical too.
fn expected(name: &str) -> (usize, usize, f64) {
    match name {
        "Q5_0" | "Q5_1" | "Q8_0" | "Q5_K_M" | "Q6_K" | "F16" | "BF16" => (8, 8, 1e-4),
        "Q4_0" | "Q4_K_M" => (2, 7, 0.35),
        _ => (6, 8, 0.1),
    }
}
