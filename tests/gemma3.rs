//! The second real model: Gemma 3 270M (base, GGUF Q4_K_M, fetched by `scripts/fetch-model.sh
//! gemma3-270m`), in the sandbox, against llama.cpp's reading of the same file
//! (tests/fixtures/gemma3-reference.json, made by scripts/make-reference-gemma3.py).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use corral_protocol::Input;

const SHA: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

#[test]
fn gemma3_tokenizes_like_llama_cpp_and_completes_greedily_in_agreement() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/gemma3-reference.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let model = model_named(
        "gemma-3-270m-q4_k_m.gguf",
        "scripts/fetch-model.sh gemma3-270m",
    );
    let mut r = start_runner(&model, SHA, "secure").unwrap();
    let ready = r.ready.clone();
    assert_eq!(ready.architecture, "gemma3");
    // What `corral models list` says of it is what the runner reports.
    let entry = catalog_entry("gemma3-270m");
    assert_eq!(
        entry.architecture.as_deref(),
        Some(ready.architecture.as_str())
    );
    assert_eq!(
        entry.quantization.as_deref(),
        Some(ready.quantization.as_str())
    );
    // The file declares 32,768 tokens; a runner offers at most 4,096 (docs/runner-protocol.md).
    assert_eq!(ready.context_length, 4096);
    let (mut same16, mut same4, mut first) = (0, 0, 0);
    let mut worst_lp = 0f64;
    let mut report = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        // SentencePiece tokenization identical, with and without BOS.
        assert_eq!(
            r.tokenize(text, false).unwrap(),
            ids(&c["plain_ids"]),
            "{text:?}"
        );
        let want = ids(&c["greedy_ids"]);
        let done = r
            .generate(greedy_request(Input::Prompt(text.into()), 16), &mut |_| {})
            .unwrap();
        assert_eq!(
            done.prompt_tokens as usize,
            ids(&c["prompt_ids"]).len(),
            "{text:?}"
        );
        let got: Vec<u32> = done.tokens.iter().map(|t| t.token_id).collect();
        let agree = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        same16 += usize::from(got == want.iter().copied().filter(|t| *t != 1).collect::<Vec<_>>());
        same4 += usize::from(agree >= 4.min(want.len()));
        first += usize::from(agree >= 1);
        if agree >= 1 {
            let lp = c["greedy_logprobs"][0].as_f64().unwrap();
            worst_lp = worst_lp.max((f64::from(done.tokens[0].logprob) - lp).abs());
        }
        if got != want {
            report.push(format!(
                "{text:?}: agree for {agree}: llama.cpp {want:?} corral {got:?}"
            ));
        }
    }
    r.shutdown();
    eprintln!(
        "gemma3: identical 16-token completions {same16}/{n}, first 4 tokens {same4}/{n}, first token {first}/{n}; largest first-token logprob difference {worst_lp:.3}\n{}",
        report.join("\n"),
        n = cases.len()
    );
    // Not bit for bit: the K-quant products (Q4_K, Q6_K, ...) are Candle's, whose activation
    // quantization and summation orders differ from ggml's, so the log-probabilities differ by
    // up to ~0.2 nats and near-ties part (measured 2026-12-06: 11/20 identical 16-token
    // completions, 17/20 agree on 4 tokens, 19/20 on the first, the one miss a 0.09-nat tie;
    // docs/runner-protocol.md). These bounds catch a broken architecture (Candle's own Gemma 3,
    // with SiLU for GELU, agreed on the first token for 14/20 and on 16 tokens for 0/20).
    assert!(first * 10 >= cases.len() * 9, "{}", report.join("\n"));
    assert!(same4 * 4 >= cases.len() * 3, "{}", report.join("\n"));
    assert!(same16 * 10 >= cases.len() * 4, "{}", report.join("\n"));
    assert!(
        worst_lp < 0.5,
        "first-token log-probabilities differ by {worst_lp}"
    );
}
