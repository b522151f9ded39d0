//! `corral run`: answer one prompt with a local model in its sandbox, streaming the answer.

use std::io::Write;
use std::time::Instant;

use corral_protocol::{ChatMessage, GenerateRequest, Input, Sampling};
use serde_json::json;

use crate::catalog::DEFAULT_MODEL;
use crate::confidence::{self, TokenStat};
use crate::config::Config;
use crate::sandbox::HostSupport;
use crate::slm::models;
use crate::slm::runner::{runner_binary, Runner, RunnerSpec};

/// `corral run`'s arguments (also its command-line definition).
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Model id from the catalog (default: smollm2-135m-instruct)
    #[arg(long, short = 'm', value_name = "ID")]
    pub model: Option<String>,
    /// Sandbox profile name or path (default: the model's, else slm.default_sandbox_profile)
    #[arg(long, short = 'p', value_name = "NAME|PATH")]
    pub profile: Option<String>,
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed for sampling
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens to generate
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// A system message
    #[arg(long)]
    pub system: Option<String>,
    /// Print one JSON object (text, model, profile, confidence, usage, timings, finish_reason)
    #[arg(long)]
    pub json: bool,
    /// Generate exactly --max-tokens, past end-of-sequence (for benchmarks)
    #[arg(long, hide = true)]
    pub ignore_eos: bool,
    /// The prompt, sent as a user message through the model's chat template
    pub prompt: String,
}

/// Model output is untrusted: escape control characters (ESC sequences could rewrite the
/// terminal, set its title or write the clipboard) except newline and tab.
pub fn terminal_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if (c.is_control() && c != '\n' && c != '\t') || ('\u{80}'..='\u{9f}').contains(&c) {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

pub fn run(config: &Config, args: &RunArgs) -> crate::Result<i32> {
    let id = args
        .model
        .clone()
        .unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let model = models::lookup(config, &id).map_err(|e| crate::Error::Usage(e.to_string()))?;
    let path = models::require(config, model).map_err(|e| crate::Error::Usage(e.to_string()))?;
    let profile_name = args
        .profile
        .clone()
        .or_else(|| model.sandbox_profile.clone())
        .unwrap_or_else(|| config.slm.default_sandbox_profile.clone());
    let profile = config.profiles.resolve(&profile_name)?;
    let host = HostSupport::probe();
    let spec = RunnerSpec {
        model_path: path,
        sha256: model.sha256.clone(),
        binary: runner_binary(),
        requantize: true,
    };

    let t0 = Instant::now();
    let mut runner = Runner::start(&spec, &profile, &config.sandbox, &host)?;
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(ChatMessage {
            role: "system".into(),
            content: s.clone(),
        });
    }
    messages.push(ChatMessage {
        role: "user".into(),
        content: args.prompt.clone(),
    });
    let req = GenerateRequest {
        id: 0,
        input: Input::Messages(messages),
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
            ..Sampling::default()
        },
        max_tokens: args.max_tokens,
        stop: vec![],
        top_logprobs: 0,
        stream: true,
        ignore_eos: args.ignore_eos,
    };
    let mut stats = Vec::new();
    let mut stdout = std::io::stdout();
    let mut streamed = String::new();
    let result = runner.generate(req, &mut |t| {
        stats.push(TokenStat {
            logprob: t.logprob,
            entropy: t.entropy,
        });
        if !args.json {
            streamed.push_str(&t.text);
            let _ = stdout.write_all(terminal_safe(&t.text).as_bytes());
            let _ = stdout.flush();
        }
    });
    let done = match result {
        Ok(d) => d,
        Err(e) => {
            let _ = runner.shutdown();
            return Err(crate::Error::Runner(e));
        }
    };
    if !args.json {
        // Text held back for stop sequences arrives with the final frame.
        let rest = done.text.get(streamed.len()..).unwrap_or_default();
        let _ = stdout.write_all(terminal_safe(rest).as_bytes());
        let _ = writeln!(stdout);
    }
    let ready = runner.ready.clone();
    let startup = runner.startup;
    let outcome = runner.shutdown();
    if let Some(o) = &outcome {
        for l in &o.limits {
            eprintln!("corral: {}", l.message());
        }
    }
    let method = confidence::DEFAULT_METHOD;
    let score = confidence::score(&stats, method);
    let all: serde_json::Map<String, serde_json::Value> = confidence::all_scores(&stats)
        .into_iter()
        .map(|(m, s)| (m.name().to_string(), json!(s)))
        .collect();
    if args.json {
        let v = json!({
            "text": done.text,
            "model": id,
            "profile": profile.name,
            "confidence": {"score": score, "method": method.name(), "scores": all},
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
            "timings": {
                "load_ms": ready.load_ms,
                "startup_ms": startup.as_secs_f64() * 1e3,
                "prefill_ms": done.prefill_ms,
                "ttft_ms": done.ttft_ms,
                "decode_tokens_per_s": done.decode_tokens_per_s,
                "total_ms": t0.elapsed().as_secs_f64() * 1e3,
            },
            "finish_reason": done.finish_reason,
            "runner": {
                "architecture": ready.architecture,
                "quantization": ready.quantization,
                "threads": ready.threads,
                "memory_peak_mb": outcome.as_ref().and_then(|o| o.stats.memory_peak_bytes).map(|b| b / (1024 * 1024)),
                "cpu_ms": outcome.as_ref().and_then(|o| o.stats.cpu_usage_ns).map(|n| n / 1_000_000),
            },
        });
        println!("{v}");
    } else {
        eprintln!(
            "corral: {id} · profile {} · {} prompt + {} tokens · load {:.0} ms · ttft {:.0} ms · {:.1} tok/s · confidence {} ({})",
            profile.name,
            done.prompt_tokens,
            done.completion_tokens,
            ready.load_ms,
            done.ttft_ms,
            done.decode_tokens_per_s,
            score.map_or("n/a".to_string(), |s| format!("{s:.3}")),
            method.name()
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_do_not_reach_the_terminal() {
        assert_eq!(
            super::terminal_safe("a\x1b]52;c;aGk=\x07b\n\tc\u{9b}"),
            "a\u{fffd}]52;c;aGk=\u{fffd}b\n\tc\u{fffd}"
        );
    }
}
