//! The sandboxed Candle runner with the real SmolLM2 weights: answers, confinement, parity with
//! llama.cpp, and what happens when a runner dies or overruns its limits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use corral::config::{Config, Sources};
use corral::slm::runner::Runner;
use corral_protocol::{GenerateRequest, Input, Sampling};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn start(profile: &str) -> Runner {
    start_runner(&model_file(), SHA, profile).unwrap()
}

/// A runner of the default model under the built-in `secure` profile changed by `edit`,
/// decoding up to `slots` requests together.
fn start_with(slots: usize, edit: impl FnOnce(&mut corral::profile::Profile)) -> Runner {
    let mut profile = corral::profile::ProfileRegistry::builtin()
        .resolve("secure")
        .unwrap();
    edit(&mut profile);
    let spec = corral::slm::runner::RunnerSpec {
        model_path: model_file(),
        sha256: Some(SHA.into()),
        binary: corral::slm::runner::runner_binary(),
        slots,
        gpu: None,
    };
    Runner::start(
        &spec,
        &profile,
        &corral::sandbox::SandboxConfig::default(),
        &corral::sandbox::HostSupport::probe(),
    )
    .unwrap()
}

fn greedy(prompt: &str, max_tokens: u32) -> GenerateRequest {
    greedy_request(Input::Prompt(prompt.into()), max_tokens)
}

#[test]
fn corral_run_json_answers_with_confidence() {
    let _ = model_file();
    let out = corral_with(&[
        "run",
        "--json",
        "--max-tokens",
        "12",
        "What is the capital of France?",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!v["text"].as_str().unwrap().trim().is_empty(), "{v}");
    assert_eq!(v["model"], "smollm2-135m-instruct");
    assert_eq!(v["profile"], "secure");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&n), "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let score = v["confidence"]["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score), "{v}");
    assert!(v["timings"]["load_ms"].as_f64().unwrap() > 0.0);
    assert!(v["timings"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(["stop", "length"].contains(&v["finish_reason"].as_str().unwrap()));

    // The human form streams the answer on stdout and one summary line on stderr.
    let out = corral_with(&["run", "--max-tokens", "8", "Say hello."]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("smollm2-135m-instruct")
            && err.contains("secure")
            && err.contains("tok/s")
            && err.contains("confidence"),
        "{err}"
    );
}

#[test]
fn runner_is_confined_while_serving() {
    let mut r = start("secure");
    let pid = r.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains(&format!("Uid:\t{SANDBOX_UID}")), "{status}");
    let net = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(
        net,
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "runner shares the host network namespace"
    );
    // In the profile's memory cgroup, with the profile's limit.
    let host = corral::sandbox::cgroup::CgroupHost::detect();
    let mem = host.memory.as_ref().unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let line = cg
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|x| x == "memory"))
                || l.starts_with("0::")
        })
        .unwrap();
    let rel = line.splitn(3, ':').nth(2).unwrap();
    assert!(rel.contains("/corral/"), "{cg}");
    let limit_file = match mem.version {
        corral::sandbox::cgroup::Version::V1 => "memory.limit_in_bytes",
        corral::sandbox::cgroup::Version::V2 => "memory.max",
    };
    let dir = cgroup_dir_of(pid, &mem.own_dir);
    let limit: u64 = std::fs::read_to_string(dir.join(limit_file))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(limit, 1024 * 1024 * 1024, "secure's max_memory_mb");
    // And it still answers.
    let done = r
        .generate(greedy("The capital of France is", 4), &mut |_| {})
        .unwrap();
    assert!(done.text.contains("Paris"), "{done:?}");
    let outcome = r.shutdown().unwrap();
    assert_eq!(outcome.exit, corral::sandbox::Exit::Code(0));
}

/// The sandbox cgroup directory holding `pid`, searched below `own`/corral.
fn cgroup_dir_of(pid: i32, own: &std::path::Path) -> std::path::PathBuf {
    for e in std::fs::read_dir(own.join("corral")).unwrap().flatten() {
        let procs = std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
        if procs.lines().any(|l| l.trim() == pid.to_string()) {
            return e.path();
        }
    }
    panic!("pid {pid} is in no sandbox cgroup below {}", own.display());
}

#[test]
fn tokenization_and_greedy_decoding_match_llama_cpp() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/smollm2-reference.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut r = start("secure");
    let mut same = 0;
    let mut worst_logprob = 0f64;
    let mut report = Vec::new();
    for c in cases {
        let prompt = c["prompt"].as_str().unwrap();
        let ids: Vec<u32> = c["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            r.tokenize(prompt, true).unwrap(),
            ids,
            "chat prompt tokenization differs for {:?}",
            c["user"]
        );
        let plain: Vec<u32> = c["plain_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            r.tokenize(c["user"].as_str().unwrap(), false).unwrap(),
            plain,
            "plain tokenization differs for {:?}",
            c["user"]
        );
        let want: Vec<u32> = c["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .filter(|t| *t != 2)
            .collect();
        let want_lp: Vec<f64> = c["greedy_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let done = r.generate(greedy(prompt, 16), &mut |_| {}).unwrap();
        let got: Vec<u32> = done.tokens.iter().map(|t| t.token_id).collect();
        if got == want {
            same += 1;
            // Same tokens because the same numbers: the reported log-probabilities (what the
            // confidence score is made of) agree with llama.cpp's to float rounding.
            for (t, lp) in done.tokens.iter().zip(&want_lp) {
                worst_logprob = worst_logprob.max((f64::from(t.logprob) - lp).abs());
            }
        } else {
            report.push(format!(
                "{:?}: llama.cpp {want:?} corral {got:?}",
                c["user"]
            ));
        }
    }
    r.shutdown();
    // corral reproduces llama.cpp's CPU arithmetic operation for operation (runner/src/ggml_math.rs),
    // so every continuation must match, not just the 18 of 20: a single differing one
    // means some operation no longer rounds as ggml does.
    eprintln!(
        "greedy continuations identical for {same}/{}; largest logprob difference {worst_logprob:.2e}",
        cases.len()
    );
    assert!(
        same == cases.len(),
        "greedy continuations identical for {same}/{}:\n{}",
        cases.len(),
        report.join("\n")
    );
    assert!(
        worst_logprob < 1e-4,
        "log-probabilities differ from llama.cpp's by up to {worst_logprob}"
    );
}

#[test]
fn sampling_settings_do_not_move_the_reported_logprobs() {
    let mut r = start("secure");
    let mut g = greedy("1, 2, 3, 4,", 3);
    g.top_logprobs = 3;
    let a = r.generate(g.clone(), &mut |_| {}).unwrap();
    let mut hot = g.clone();
    hot.sampling = Sampling {
        temperature: 0.7,
        top_k: Some(1),
        repetition_penalty: 1.3,
        seed: Some(1),
        ..Sampling::default()
    };
    let b = r.generate(hot, &mut |_| {}).unwrap();
    // The first step's distribution depends on the prompt alone: whatever the penalties and
    // temperature did to the choice, the reported alternatives are the same.
    assert_eq!(a.tokens[0].top.len(), 3);
    for (x, y) in a.tokens[0].top.iter().zip(&b.tokens[0].top) {
        assert_eq!(x.token_id, y.token_id);
        assert!((x.logprob - y.logprob).abs() < 1e-4, "{x:?} vs {y:?}");
    }
    assert!(
        (a.tokens[0].top[0].logprob - a.tokens[0].logprob).abs() < 1e-4,
        "the greedy token is the most likely"
    );
    // and the sampled token's logprob is its raw one
    if let Some(alt) = b.tokens[0]
        .top
        .iter()
        .find(|t| t.token_id == b.tokens[0].token_id)
    {
        assert!((alt.logprob - b.tokens[0].logprob).abs() < 1e-4);
    }
    r.shutdown();
}

#[test]
fn a_killed_runner_is_retried_once_then_reported_and_corral_run_fails() {
    let _ = model_file();
    let child = Command::new(corral())
        .arg("--config")
        .arg(empty_config())
        // --json: the answer is printed whole, so nothing has reached the terminal when a
        // runner dies and the retry is always possible (a streamed answer cannot be retried
        // once its first token is shown).
        .args([
            "run",
            "--json",
            "--max-tokens",
            "3000",
            "Write a very long story about a dragon.",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let supervisor = child.id();
    // Kill each runner of this run mid-request: the first is replaced by a fresh one (the retry
    // the server makes too), the second failure ends the run.
    let mut killed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while killed.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "runner {} never started",
            killed.len() + 1
        );
        let pids: Vec<i32> = sandbox_cgroups()
            .into_iter()
            .filter(|d| {
                d.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{supervisor}-"))
            })
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| s.lines().map(str::to_string).collect::<Vec<_>>())
            .filter_map(|p| p.parse().ok())
            .filter(|p| !killed.contains(p))
            .collect();
        if let Some(p) = pids.first() {
            std::thread::sleep(Duration::from_millis(1500)); // mid-request
                                                             // SAFETY: killing a runner process found in our child's sandbox cgroup.
            unsafe { libc::kill(*p, libc::SIGKILL) };
            killed.push(*p);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("runner died") && err.contains("signal 9"),
        "{err}"
    );
    assert!(err.contains("local model failed"), "{err}");
}

#[test]
fn limits_end_runners_with_named_reasons() {
    let _ = model_file();
    let s = Scratch::new();
    let small = s.profile("small", "[resources]\nmax_memory_mb = 96\n");
    let out = corral_with(&[
        "run",
        "--profile",
        small.to_str().unwrap(),
        "--max-tokens",
        "4",
        "Hi",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("memory limit"), "{}", stderr(&out));

    let quick = s.profile(
        "quick",
        "[process_limits]\nmax_execution_time_seconds = 2\n",
    );
    let out = corral_with(&[
        "run",
        "--profile",
        quick.to_str().unwrap(),
        "--max-tokens",
        "3000",
        "Write a very long story.",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("time limit"), "{}", stderr(&out));
}

#[test]
fn a_model_file_with_the_wrong_checksum_is_refused() {
    let model = model_file();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("corral.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[slm.model_allow_lists.global_models]]\nid = \"tampered\"\nname = \"t\"\nprovider = {{ LocalFile = {{ file_path = \"{}\" }} }}\nsha256 = \"{}\"\n",
            model.display(),
            "0".repeat(64)
        ),
    )
    .unwrap();
    let c = Config::load(&Sources {
        config: Some(cfg.clone()),
        profiles_dir: None,
    })
    .unwrap();
    assert!(c.slm.models.contains("tampered"));
    let out = Command::new(corral())
        .arg("--config")
        .arg(&cfg)
        .args(["run", "--model", "tampered", "Hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not match the catalog"),
        "{}",
        stderr(&out)
    );
}

/// Checks `v` against the keywords the constrained-decoding test schemas use (type,
/// properties, required, additionalProperties, enum, items, minItems, maxItems, minimum,
/// maximum, maxLength); a failure names the path.
fn validate(v: &serde_json::Value, s: &serde_json::Value, at: &str) -> Result<(), String> {
    use serde_json::Value;
    let fail = |why: &str| Err(format!("{at}: {why} ({v})"));
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        };
        if !ok {
            return fail(&format!("not {t}"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return fail("not in the enum");
        }
    }
    if let (Some(n), Some(min)) = (v.as_f64(), s.get("minimum").and_then(Value::as_f64)) {
        if n < min {
            return fail("below minimum");
        }
    }
    if let (Some(n), Some(max)) = (v.as_f64(), s.get("maximum").and_then(Value::as_f64)) {
        if n > max {
            return fail("above maximum");
        }
    }
    if let (Some(t), Some(max)) = (v.as_str(), s.get("maxLength").and_then(Value::as_u64)) {
        if t.chars().count() as u64 > max {
            return fail("longer than maxLength");
        }
    }
    if let Some(o) = v.as_object() {
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !o.contains_key(r.as_str().unwrap_or_default()) {
                return fail(&format!("missing required {r}"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, sub) in o {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(sub, ps, &format!("{at}/{k}"))?,
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return fail(&format!("additional property {k}"))
                }
                None => {}
            }
        }
    }
    if let Some(a) = v.as_array() {
        if s.get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|n| (a.len() as u64) < n)
        {
            return fail("fewer than minItems");
        }
        if s.get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|n| (a.len() as u64) > n)
        {
            return fail("more than maxItems");
        }
        if let Some(items) = s.get("items") {
            for (i, x) in a.iter().enumerate() {
                validate(x, items, &format!("{at}/{i}"))?;
            }
        }
    }
    Ok(())
}

#[test]
fn a_json_schema_constrains_the_local_answer_and_unsupported_keywords_are_refused() {
    use corral_protocol::OutputConstraint;
    use serde_json::json;
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "colour": {"enum": ["black", "white", "ginger", "grey"]},
            "toys": {"type": "array", "items": {"type": "object",
                "properties": {"kind": {"type": "string", "maxLength": 12}, "loved": {"type": "boolean"}},
                "required": ["kind", "loved"], "additionalProperties": false},
                "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "age", "colour", "toys"],
        "additionalProperties": false,
    });
    let mut r = start("secure");
    for (temperature, seed) in [(0.0, None), (1.0, Some(7)), (1.0, Some(8))] {
        let mut req = greedy(
            "Describe a cat called Tom, his age, colour and favourite toys.",
            200,
        );
        req.input = Input::Messages(vec![corral_protocol::ChatMessage::new(
            "user",
            "Describe a cat called Tom, his age, colour and favourite toys, as JSON.",
        )]);
        req.sampling.temperature = temperature;
        req.sampling.seed = seed;
        req.constraint = Some(OutputConstraint::JsonSchema {
            schema: schema.clone(),
        });
        let done = r.generate(req, &mut |_| {}).unwrap();
        assert_eq!(
            done.finish_reason,
            corral_protocol::FinishReason::Stop,
            "{}",
            done.text
        );
        let v: serde_json::Value = serde_json::from_str(&done.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", done.text));
        validate(&v, &schema, "").unwrap();
        // Tokens the grammar forced are marked (the keys and punctuation of a fixed schema).
        assert!(done.tokens.iter().any(|t| t.forced), "{}", done.text);
    }
    // Any JSON object.
    let mut req = greedy("Give me a JSON object about Paris.", 60);
    req.constraint = Some(OutputConstraint::JsonObject);
    let done = r.generate(req, &mut |_| {}).unwrap();
    if done.finish_reason == corral_protocol::FinishReason::Stop {
        let v: serde_json::Value = serde_json::from_str(&done.text).unwrap();
        assert!(v.is_object(), "{}", done.text);
    } else {
        assert!(done.text.trim_start().starts_with('{'), "{}", done.text);
    }
    // A keyword outside the subset is the request's error, naming it; the runner stays.
    let mut req = greedy("x", 5);
    req.constraint = Some(OutputConstraint::JsonSchema {
        schema: json!({"type": "array", "items": {"type": "string"}, "uniqueItems": true}),
    });
    let e = r.generate(req, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("uniqueItems"), "{e}");
    let done = r.generate(greedy("Say hi.", 3), &mut |_| {}).unwrap();
    assert!(done.completion_tokens > 0);
}

#[test]
fn local_tool_calls_are_generated_under_their_schema() {
    use corral_protocol::{ChatMessage, FinishReason, Function, ToolCall, ToolChoice, Tools};
    use serde_json::json;
    let weather = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": false,
    });
    let tools = |choice| Tools {
        functions: vec![
            Function {
                name: "get_forecast".into(),
                description: Some("The weather forecast for a city".into()),
                parameters: weather.clone(),
            },
            Function {
                name: "get_time".into(),
                description: Some("The local time in a city".into()),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]}),
            },
        ],
        choice,
        parallel: true,
    };
    let ask = |choice, seed| {
        let mut req = greedy("", 120);
        req.input = Input::Messages(vec![ChatMessage::new(
            "user",
            "What will the weather be in Lisbon for the next three days?",
        )]);
        req.sampling.temperature = 1.0;
        req.sampling.seed = seed;
        req.tools = Some(tools(choice));
        req
    };
    let mut r = start("secure");
    // Required and named: the answer is calls, each valid against its function's schema. One
    // call (parallel off, or named) ends the answer; parallel calls may run to max_tokens, and
    // then the complete ones stand.
    for (choice, seed, parallel) in [
        (ToolChoice::Required, Some(1), false),
        (ToolChoice::Required, Some(2), true),
        (
            ToolChoice::Function {
                name: "get_forecast".into(),
            },
            Some(3),
            true,
        ),
    ] {
        let named = matches!(choice, ToolChoice::Function { .. });
        let mut req = ask(choice, seed);
        req.tools.as_mut().unwrap().parallel = parallel;
        let done = r.generate(req, &mut |_| {}).unwrap();
        if !parallel || named {
            assert_eq!(done.finish_reason, FinishReason::Stop, "{done:?}");
            assert_eq!(done.tool_calls.len(), 1, "{done:?}");
        }
        assert!(!done.tool_calls.is_empty(), "{done:?}");
        assert_eq!(done.text, "");
        for c in &done.tool_calls {
            match c.name.as_str() {
                "get_forecast" => validate(&c.arguments, &weather, "").unwrap(),
                "get_time" if !named => assert!(c.arguments["city"].is_string(), "{c:?}"),
                other => panic!("called {other}"),
            }
        }
        if named {
            assert_eq!(done.tool_calls.len(), 1);
        }
    }
    // Auto: text or calls, never a broken call; and the conversation with a call and its result
    // renders and is answered.
    for seed in [4, 6, 9] {
        let done = r
            .generate(ask(ToolChoice::Auto, Some(seed)), &mut |_| {})
            .unwrap();
        assert!(
            done.text.is_empty() != done.tool_calls.is_empty(),
            "{done:?}"
        );
        // Tokens held back while they might have started a call get their own text once it is
        // text: the tokens still spell the answer.
        if !done.text.is_empty() {
            let spelled: String = done.tokens.iter().map(|t| t.text.as_str()).collect();
            assert_eq!(spelled, done.text);
        }
    }
    let mut req = ask(ToolChoice::Auto, Some(5));
    let Input::Messages(m) = &mut req.input else {
        unreachable!()
    };
    m.push(ChatMessage {
        role: "assistant".into(),
        tool_calls: vec![ToolCall {
            id: "call_1".into(),
            name: "get_forecast".into(),
            arguments: json!({"city": "Lisbon", "unit": "celsius", "days": 3}),
        }],
        ..ChatMessage::default()
    });
    m.push(ChatMessage {
        role: "tool".into(),
        content: "{\"forecast\": [\"sun\", \"sun\", \"rain\"]}".into(),
        tool_call_id: Some("call_1".into()),
        name: Some("get_forecast".into()),
        ..ChatMessage::default()
    });
    let done = r.generate(req, &mut |_| {}).unwrap();
    assert!(done.completion_tokens > 0);
    assert!(
        done.prompt_tokens > 100,
        "the tools and the call reach the prompt"
    );
    // Parameters outside the supported subset: refused by name, before any token.
    let mut req = ask(ToolChoice::Required, None);
    req.tools.as_mut().unwrap().functions[1].parameters =
        json!({"type": "object", "properties": {"city": {"type": "string", "uniqueItems": true}}});
    let e = r.generate(req, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("uniqueItems") && e.contains("get_time"), "{e}");
}

#[test]
fn the_catalog_says_what_the_runner_reports_and_max_tokens_past_the_context_is_refused() {
    let mut r = start("secure");
    // What `corral models list` says of the default model is what its runner reports.
    let entry = catalog_entry("smollm2-135m-instruct");
    assert_eq!(
        entry.architecture.as_deref(),
        Some(r.ready.architecture.as_str())
    );
    assert_eq!(
        entry.quantization.as_deref(),
        Some(r.ready.quantization.as_str())
    );
    let ctx = r.ready.context_length;
    let mut req = greedy("Say hi.", ctx);
    req.max_tokens_explicit = true;
    let e = r.generate(req, &mut |_| {}).unwrap_err().to_string();
    assert!(
        e.contains("max_tokens asks for")
            && e.contains(&ctx.to_string())
            && e.contains("tokens and"),
        "{e}"
    );
    // Within the context, or not asked for (a default), it answers.
    let mut req = greedy("Say hi.", 4);
    req.max_tokens_explicit = true;
    assert!(r.generate(req, &mut |_| {}).unwrap().completion_tokens > 0);
    r.shutdown();
}

/// Llama 3.1/3.2 files carry `rope_freqs.weight`, a divisor per rotary frequency. A test file
/// made from the default model with Llama 3's divisors (scripts/make-rope-freqs.py, at test
/// time) must answer as llama.cpp answers it: the same arithmetic, so the same tokens and
/// log-probabilities to float rounding.
#[test]
fn rope_frequency_factors_as_llama_cpp_applies_them() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/rope");
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/make-rope-freqs.py"
        ))
        .arg(&dir)
        .arg(model_file())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "scripts/make-rope-freqs.py failed (it needs llama.cpp and gguf; scripts/test.sh \
         installs both):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("rope-freqs-reference.json")).unwrap(),
    )
    .unwrap();
    let factors = reference["factors"].as_array().unwrap();
    assert!(factors.iter().any(|f| f.as_f64().unwrap() > 1.0));
    let mut r = start_runner(
        &dir.join(reference["file"].as_str().unwrap()),
        reference["sha256"].as_str().unwrap(),
        "secure",
    )
    .unwrap();
    let mut worst = 0f64;
    for c in reference["cases"].as_array().unwrap() {
        let prompt = c["prompt"].as_str().unwrap();
        let want: Vec<u32> = c["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .filter(|t| *t != 2)
            .collect();
        let done = r.generate(greedy(prompt, 16), &mut |_| {}).unwrap();
        let got: Vec<u32> = done.tokens.iter().map(|t| t.token_id).collect();
        assert_eq!(got, want, "{prompt:?}");
        for (t, lp) in done
            .tokens
            .iter()
            .zip(c["greedy_logprobs"].as_array().unwrap())
        {
            worst = worst.max((f64::from(t.logprob) - lp.as_f64().unwrap()).abs());
        }
    }
    r.shutdown();
    assert!(worst < 1e-4, "log-probabilities differ by up to {worst}");
}

/// A long system prompt and a question, as chat messages.
fn with_system(system: &str, question: &str) -> GenerateRequest {
    let mut g = greedy_request(
        Input::Messages(vec![
            corral_protocol::ChatMessage::new("system", system),
            corral_protocol::ChatMessage::new("user", question),
        ]),
        8,
    );
    g.top_logprobs = 2;
    g
}

#[test]
fn a_callers_repeated_prefix_is_reused_and_never_another_callers() {
    let mut r = start("secure");
    let system = "You are a careful assistant for a shipping company. ".repeat(24);
    let ask = |q: &str, key: Option<&str>| {
        let mut g = with_system(&system, q);
        g.cache_key = key.map(str::to_string);
        g
    };
    // Without a key nothing is reused (and nothing kept).
    let cold = r
        .generate(ask("Where is Oslo?", None), &mut |_| {})
        .unwrap();
    assert_eq!(cold.cached_tokens, 0);
    let first = r
        .generate(ask("Where is Oslo?", Some("key:a")), &mut |_| {})
        .unwrap();
    assert_eq!(first.cached_tokens, 0, "nothing was kept for key a yet");
    // The same caller, another question after the same system prompt: the prompt up to the
    // question is reused, and the answer is what it is without reuse.
    let again = r
        .generate(ask("Where is Lima?", Some("key:a")), &mut |_| {})
        .unwrap();
    let plain = r
        .generate(ask("Where is Lima?", None), &mut |_| {})
        .unwrap();
    assert!(
        again.cached_tokens as f64 > 0.8 * f64::from(again.prompt_tokens),
        "{} of {} prompt tokens reused",
        again.cached_tokens,
        again.prompt_tokens
    );
    assert!(
        again.prefill_ms < plain.prefill_ms / 3.0,
        "{} vs {} ms",
        again.prefill_ms,
        plain.prefill_ms
    );
    assert_eq!(again.text, plain.text);
    assert_eq!(again.tokens.len(), plain.tokens.len());
    for (x, y) in again.tokens.iter().zip(&plain.tokens) {
        assert_eq!(x.token_id, y.token_id);
        assert!((x.logprob - y.logprob).abs() < 1e-3, "{x:?} vs {y:?}");
    }
    // Another caller with the very same prompt reuses nothing of key a's, and key a's state
    // stays key a's: its next request still starts after the shared prefix.
    let other = r
        .generate(ask("Where is Lima?", Some("key:b")), &mut |_| {})
        .unwrap();
    assert_eq!(other.cached_tokens, 0);
    let back = r
        .generate(ask("Where is Oslo?", Some("key:a")), &mut |_| {})
        .unwrap();
    assert!(
        back.cached_tokens as f64 > 0.8 * f64::from(back.prompt_tokens),
        "key a's state survived key b's request: {} of {} reused",
        back.cached_tokens,
        back.prompt_tokens
    );
    // Key b has its own state now.
    let b_again = r
        .generate(ask("Where is Oslo?", Some("key:b")), &mut |_| {})
        .unwrap();
    assert!(b_again.cached_tokens as f64 > 0.8 * f64::from(b_again.prompt_tokens));
    // An identical prompt reuses all but its last token (which must be fed to answer).
    let same = r
        .generate(ask("Where is Oslo?", Some("key:a")), &mut |_| {})
        .unwrap();
    assert_eq!(same.cached_tokens, same.prompt_tokens - 1);
    assert_eq!(same.text, cold.text);
}

/// A memory limit under which a runner with `slots` slots gets the smallest KV budget (16 MiB):
/// the runner sizes its budget from what the limit leaves beside the loaded model, so a runner
/// under `secure` says what that is, and the limit is set 8 MiB above it.
fn limit_for_16_mib(slots: usize) -> u64 {
    let probe = start_with(slots, |_| {});
    let secure = corral::profile::ProfileRegistry::builtin()
        .resolve("secure")
        .unwrap()
        .max_memory_mb;
    let budget = probe.ready.kv_budget_mb;
    probe.shutdown();
    assert!(budget > 16 && budget < secure, "{budget} MiB");
    secure - budget + 8
}

#[test]
fn kept_prompt_states_give_way_under_the_runners_memory_limit() {
    // A memory limit that leaves the runner a KV budget of 16 MiB beside its loaded model: room
    // for one ~270-token state of this model (45 KiB a position), not two.
    let limit = limit_for_16_mib(1);
    let mut r = start_with(1, |p| p.max_memory_mb = limit);
    assert_eq!(r.ready.kv_budget_mb, 16);
    let system = "You are a careful assistant for a shipping company. ".repeat(24);
    let ask = |q: &str, key: &str| {
        let mut g = with_system(&system, q);
        g.cache_key = Some(key.into());
        g
    };
    let mut run = |q: &str, key: &str| r.generate(ask(q, key), &mut |_| {}).unwrap();
    let a = run("Where is Oslo?", "key:a");
    assert!(a.prompt_tokens > 200, "{} prompt tokens", a.prompt_tokens);
    // Within the budget: key a's state is reused.
    let hit = run("Where is Lima?", "key:a");
    assert!(hit.cached_tokens > 200, "{}", hit.cached_tokens);
    // Key b's request needs the room: key a's state goes (never shared: b reuses nothing).
    let b = run("Where is Lima?", "key:b");
    assert_eq!(b.cached_tokens, 0);
    let evicted = run("Where is Oslo?", "key:a");
    assert_eq!(
        evicted.cached_tokens, 0,
        "key a's state was dropped for key b's"
    );
    // The runner stayed within its memory limit all along.
    let peak = r.stats().memory_peak_bytes.unwrap_or(0);
    assert!(peak > 0 && peak <= limit << 20, "peak {peak} bytes");
    r.shutdown();
}

/// Requests sent to one runner at once, each answered on its own: its tokens streamed with its
/// id, its own `done`.
fn batch(r: &mut Runner, reqs: Vec<GenerateRequest>) -> Vec<corral_protocol::Done> {
    batch_started(r, reqs).into_iter().map(|(d, _)| d).collect()
}

/// [`batch`], with whether each request was announced as started after waiting.
fn batch_started(r: &mut Runner, reqs: Vec<GenerateRequest>) -> Vec<(corral_protocol::Done, bool)> {
    use corral::slm::runner::Progress;
    let mut fs: Vec<_> = reqs.into_iter().map(|q| r.submit(q).unwrap()).collect();
    let mut done: Vec<Option<corral_protocol::Done>> = fs.iter().map(|_| None).collect();
    let mut streamed: Vec<String> = fs.iter().map(|_| String::new()).collect();
    let mut started = vec![false; fs.len()];
    while done.iter().any(Option::is_none) {
        let Some(frame) = r.poll(Instant::now() + Duration::from_secs(60)).unwrap() else {
            panic!("no frame within a minute");
        };
        let id = Runner::frame_id(&frame).unwrap();
        let i = fs.iter().position(|f| f.id == id).unwrap();
        match r.take(&mut fs[i], frame).unwrap() {
            Progress::Started => {
                assert!(done[i].is_none() && streamed[i].is_empty());
                started[i] = true;
            }
            Progress::Token(t) => streamed[i].push_str(&t.text),
            Progress::Done(d) => {
                assert!(done[i].is_none());
                if !streamed[i].is_empty() {
                    assert_eq!(streamed[i], d.text);
                }
                done[i] = Some(*d);
            }
        }
    }
    done.into_iter().map(Option::unwrap).zip(started).collect()
}

#[test]
fn a_request_without_room_waits_in_the_runner_and_is_told_when_it_starts() {
    // Two slots, but a KV budget of 16 MiB: two ~300-token requests (13 MiB each at their
    // worst) do not fit together, so the second waits for the first.
    let limit = limit_for_16_mib(2);
    let mut r = start_with(2, |p| p.max_memory_mb = limit);
    assert_eq!(r.ready.kv_budget_mb, 16);
    let system = "You are a careful assistant for a shipping company. ".repeat(24);
    let reqs = vec![
        with_system(&system, "Where is Oslo?"),
        with_system(&system, "Where is Lima?"),
    ];
    let out = batch_started(&mut r, reqs);
    assert!(!out[0].1, "the first started at once");
    assert!(out[1].1, "the second waited and was announced");
    for (d, _) in &out {
        assert!(d.completion_tokens > 0);
    }
    // The second's time to first token includes its wait.
    assert!(
        out[1].0.ttft_ms > out[0].0.ttft_ms,
        "{} vs {} ms",
        out[1].0.ttft_ms,
        out[0].0.ttft_ms
    );
    r.shutdown();
}

#[test]
fn requests_decoded_together_answer_as_they_do_alone() {
    let mut r = start_with(4, |_| {});
    assert_eq!(r.ready.slots, 4);
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Water boils at",
        "The three primary colours are",
    ];
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| r.generate(greedy(p, 24), &mut |_| {}).unwrap())
        .collect();
    // Each its own settings: two streamed, one with top alternatives, one stopped by a stop
    // sequence, one cut by a smaller max_tokens.
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut g = greedy(p, if i == 3 { 5 } else { 24 });
            g.stream = i % 2 == 0;
            g.top_logprobs = if i == 1 { 3 } else { 0 };
            g
        })
        .collect();
    let together = batch(&mut r, reqs);
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let n = b.completion_tokens as usize;
        if i == 3 {
            assert_eq!(n, 5, "its own max_tokens");
            assert_eq!(b.finish_reason, corral_protocol::FinishReason::Length);
        }
        // Batched rows take the grouped products, rounded differently from a lone sequence's
        // (8-bit activations then round some values the other way, layer after layer, as in
        // llama.cpp's batches): greedy answers agree on their first tokens and their
        // log-probabilities stay close; a near-tie later in an answer may go the other way.
        let a_ids: Vec<u32> = a.tokens.iter().map(|t| t.token_id).collect();
        assert!(
            a.text.starts_with(&b.text[..b.text.len().min(8)]),
            "{i}: {:?} vs {:?}",
            a.text,
            b.text
        );
        if !b.tokens.is_empty() {
            let b_ids: Vec<u32> = b.tokens.iter().map(|t| t.token_id).collect();
            assert_eq!(a_ids[..5], b_ids[..5], "{i}");
            let shared = a_ids.iter().zip(&b_ids).take_while(|(x, y)| x == y).count();
            let diffs: Vec<f32> = a
                .tokens
                .iter()
                .zip(&b.tokens)
                .take(shared)
                .map(|(x, y)| (x.logprob - y.logprob).abs())
                .collect();
            let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
            let worst = diffs.iter().fold(0f32, |m, d| m.max(*d));
            assert!(
                mean < 0.12 && worst < 0.3,
                "{i}: mean {mean}, worst {worst}"
            );
        }
        if i == 1 {
            assert!(b.tokens.iter().all(|t| t.top.len() == 3));
        }
    }
    r.shutdown();
}

/// A catalog entry with GPU requirements is refused, before anything is launched, under a
/// profile that hands over no GPU; the message names both sides.
#[test]
fn a_model_that_needs_a_gpu_is_refused_under_a_profile_without_one() {
    let profile = corral::profile::ProfileRegistry::builtin()
        .resolve("secure")
        .unwrap();
    let spec = corral::slm::runner::RunnerSpec {
        model_path: model_file(),
        sha256: Some(SHA.into()),
        binary: corral::slm::runner::runner_binary(),
        slots: 1,
        gpu: Some(corral::catalog::GpuRequirements {
            min_vram_mb: 2048,
            compute_capability: Some("8.0".into()),
        }),
    };
    let started = Instant::now();
    let err = Runner::start(
        &spec,
        &profile,
        &corral::sandbox::SandboxConfig::default(),
        &corral::sandbox::HostSupport::probe(),
    )
    .expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("needs a GPU") && msg.contains("'secure'") && msg.contains("gpu_access"),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused before launching"
    );
}
