//! What constrained decoding costs: decode speed of the default model in its sandbox with a
//! JSON schema versus without, same prompt and runner, same run.
//!
//!     cargo bench --bench constrained_decoding      # needs root and the default model
//!
//! Unconstrained answers run with `ignore_eos` to a fixed length; constrained ones stop when
//! the schema is complete (an array of 20 to 40 short strings keeps them long). Prints decode
//! tokens/s for each (median of the rounds), the cost in percent, and the time per token spent
//! in the constraint (mask and grammar update). scripts/bench-constrained.sh compares with
//! llama.cpp's own grammar-constrained decoding in the same run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral_protocol::{ChatMessage, GenerateRequest, Input, OutputConstraint, Sampling};
use serde_json::json;

fn request(constraint: Option<OutputConstraint>, seed: u64) -> GenerateRequest {
    GenerateRequest {
        id: 0,
        input: Input::Messages(vec![ChatMessage::new(
            "user",
            "List as many European cities as you can, as JSON.",
        )]),
        sampling: Sampling {
            temperature: 1.0,
            seed: Some(seed),
            ..Sampling::default()
        },
        max_tokens: 160,
        stop: vec![],
        top_logprobs: 0,
        stream: false,
        ignore_eos: constraint.is_none(),
        constraint,
        tools: None,
        max_tokens_explicit: false,
        cache_key: None,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // Where scripts/fetch-model.sh puts the default model.
    let model = std::env::var("CORRAL_MODEL_DIR")
        .or_else(|_| std::env::var("XDG_DATA_HOME").map(|d| format!("{d}/corral/models")))
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
            format!("{home}/.local/share/corral/models")
        })
        + "/SmolLM2-135M-Instruct.Q4_1.gguf";
    let spec = corral::slm::runner::RunnerSpec {
        model_path: model.clone().into(),
        sha256: None,
        binary: corral::slm::runner::runner_binary(),
        slots: 1,
        gpu: None,
    };
    let profile = corral::profile::ProfileRegistry::builtin()
        .resolve("secure")
        .unwrap();
    let mut r = corral::slm::runner::Runner::start(
        &spec,
        &profile,
        &corral::sandbox::SandboxConfig::default(),
        &corral::sandbox::HostSupport::probe(),
    )
    .unwrap_or_else(|e| panic!("starting a runner for {model}: {e}"));
    let schema = json!({
        "type": "object",
        "properties": {"cities": {"type": "array", "minItems": 20, "maxItems": 40,
            "items": {"type": "string", "maxLength": 24}}},
        "required": ["cities"], "additionalProperties": false,
    });
    // `cargo test --all-targets` runs this too (without `--bench`): one short round there, as a
    // smoke test of the constrained path in the sandbox.
    let rounds = if std::env::args().any(|a| a == "--bench") {
        7
    } else {
        1
    };
    let (mut free, mut constrained, mut tokens, mut mask) = (vec![], vec![], vec![], vec![]);
    for seed in 0..rounds {
        let d = r.generate(request(None, seed), &mut |_| {}).unwrap();
        free.push(d.decode_tokens_per_s);
        let c = Some(OutputConstraint::JsonSchema {
            schema: schema.clone(),
        });
        let d = r.generate(request(c, seed), &mut |_| {}).unwrap();
        serde_json::from_str::<serde_json::Value>(&d.text)
            .map_err(|e| format!("{e}: {}", d.text))
            .ok();
        constrained.push(d.decode_tokens_per_s);
        tokens.push(d.completion_tokens as f64);
        mask.push(d.constraint_ms * 1e3 / f64::from(d.completion_tokens.max(1)));
    }
    let (f, c) = (median(free), median(constrained));
    println!(
        "decode tok/s, median of {rounds}: unconstrained {f:.1}, JSON schema {c:.1} ({} tokens median); cost {:.1}%; mask + grammar update {:.0} us per token",
        median(tokens),
        (1.0 - c / f) * 100.0,
        median(mask)
    );
    r.shutdown();
}
