//! The answer pipeline's table through both front ends, with a scripted local model and a
//! loopback OpenAI-compatible provider: the HTTP app (`app()` called directly, no socket) and
//! the `corral run` path (`run_with`, its output captured). Needs neither root nor weights; the
//! suites with real runners (serve.rs, routing.rs, audit.rs) cover the sandboxed parts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::Request as HttpRequest;
use corral::answer::testing::{Script, ScriptedModel};
use corral::commands::route::CallerArgs;
use corral::commands::run::{run_with, Report, RunArgs};
use corral::config::{Config, Sources};
use corral::server::{app, State};
use serde_json::{json, Value};
use tower::ServiceExt;

use common::{fake, fake_stream, openai_answer, openai_chunk, openai_stream_end, Fake};

/// A configuration file's text with the loopback provider as the fallback chain (when `chain`)
/// and a confidence threshold of 0.5.
fn config(remote: Option<&Fake>, extra: &str) -> (tempfile::TempDir, Config) {
    config_at(remote.map(|f| f.url.as_str()), extra)
}

/// `config` with the provider at `url`.
fn config_at(url: Option<&str>, extra: &str) -> (tempfile::TempDir, Config) {
    let chain = match url {
        Some(url) => format!(
            "[providers.remote]\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodel = \"remote-large\"\nmax_retries = 0\n\
             [routing.llm_fallback]\nproviders = [\"remote\"]\n",
            url
        ),
        None => String::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("corral.toml");
    std::fs::write(
        &p,
        format!("{chain}[routing.confidence_thresholds]\ndefault = 0.5\n{extra}"),
    )
    .unwrap();
    (dir, load(&p, &|_| None).unwrap())
}

/// The configuration file at `p`, with `env` as the environment; the error as text.
fn load(p: &std::path::Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
    Config::load_with_env(
        &Sources {
            config: Some(p.to_path_buf()),
            profiles_dir: None,
        },
        env,
    )
    .map_err(|e| e.to_string())
}

fn sure() -> Script {
    Script::Answer(vec![("Teal", -0.01), (" it", -0.02), (" is.", -0.01)])
}

fn unsure() -> Script {
    Script::Answer(vec![("Maybe", -2.5), (" mauve", -3.0)])
}

fn crash() -> Script {
    Script::Crash { retryable: true }
}

const DENY_SECRETS: &str = "[[routing.policies]]\nid = \"no-secrets\"\nconditions = { metadata = { kind = \"secret\" } }\naction = { type = \"deny\", reason = \"secret projects stay off models\" }\n";
const ALLOW_NONE: &str = "[slm.model_allow_lists.agent_model_maps]\n\"*\" = []\n";
const ALL_REMOTE: &str =
    "[routing]\ndefault_action = { type = \"require_llm\", reason = \"all remote\" }\n";
const TOOLS_REMOTE: &str = "[[routing.policies]]\nid = \"tools-remote\"\nconditions = { capabilities = [\"ToolUse\"] }\naction = { type = \"require_llm\", reason = \"tools go remote\" }\n";

/// One row: the setup, and what each front end must show.
struct Row {
    name: &'static str,
    chain: bool,
    extra: &'static str,
    scripts: Vec<Script>,
    /// `model` asked for (`auto` when None), `metadata.kind`.
    model: Option<&'static str>,
    secret: bool,
    /// HTTP status, route, escalated, escalation reason fragment.
    status: u16,
    route: &'static str,
    escalated: bool,
    why: &'static str,
    /// The answer's text (empty: none).
    text: &'static str,
    /// Local jobs submitted, remote calls made.
    jobs: usize,
    calls: usize,
    /// `corral run`'s exit status.
    exit: i32,
}

fn rows() -> Vec<Row> {
    let row = |name, chain, scripts: Vec<Script>| Row {
        name,
        chain,
        extra: "",
        scripts,
        model: None,
        secret: false,
        status: 200,
        route: "slm",
        escalated: false,
        why: "",
        text: "Teal it is.",
        jobs: 1,
        calls: 0,
        exit: 0,
    };
    vec![
        row("accepted above the threshold", true, vec![sure()]),
        Row {
            route: "llm",
            escalated: true,
            why: "confidence",
            text: "Remote says teal",
            calls: 1,
            ..row("escalated below the threshold", true, vec![unsure()])
        },
        Row {
            route: "llm",
            escalated: true,
            why: "the SLM failed",
            text: "Remote says teal",
            jobs: 2,
            calls: 1,
            ..row(
                "escalated on a crash after its retry",
                true,
                vec![crash(), crash()],
            )
        },
        Row {
            jobs: 2,
            ..row(
                "a crash retried on a fresh runner",
                false,
                vec![crash(), sure()],
            )
        },
        Row {
            status: 503,
            route: "none",
            text: "",
            jobs: 2,
            exit: 1,
            ..row("retried then 503", false, vec![crash(), crash()])
        },
        Row {
            extra: DENY_SECRETS,
            secret: true,
            status: 403,
            route: "deny",
            text: "",
            jobs: 0,
            exit: 3,
            ..row("denied by policy", true, vec![sure()])
        },
        Row {
            extra: ALLOW_NONE,
            model: Some("smollm2-135m-instruct"),
            status: 403,
            route: "none",
            text: "",
            jobs: 0,
            exit: 2,
            ..row("refused by the allow list", true, vec![sure()])
        },
        Row {
            extra: ALL_REMOTE,
            route: "llm",
            text: "Remote says teal",
            jobs: 0,
            calls: 1,
            ..row("require_llm", true, vec![])
        },
        Row {
            status: 400,
            route: "none",
            text: "",
            exit: 1,
            ..row("a prompt the model refuses", true, vec![Script::Refuse])
        },
        Row {
            route: "llm",
            escalated: true,
            why: "does not fit the local model's context",
            text: "Remote says teal",
            calls: 1,
            ..row(
                "a prompt too long for the local model goes to the chain",
                true,
                vec![Script::TooLong],
            )
        },
        Row {
            status: 400,
            route: "none",
            text: "",
            exit: 1,
            ..row(
                "a prompt too long, no chain: the caller's 400",
                false,
                vec![Script::TooLong],
            )
        },
    ]
}

fn body(row: &Row, stream: bool) -> Value {
    let mut b = json!({
        "model": row.model.unwrap_or("auto"),
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 8,
        "stream": stream,
    });
    if row.secret {
        b["metadata"] = json!({"kind": "secret"});
    }
    b
}

fn state(row: &Row, remote: Option<&Fake>) -> (tempfile::TempDir, Arc<ScriptedModel>, Arc<State>) {
    let (dir, cfg) = config(remote, row.extra);
    let local = Arc::new(ScriptedModel::new(row.scripts.clone()));
    let st = State::with_local(cfg, Sources::default(), local.clone()).unwrap();
    (dir, local, st)
}

async fn post(st: &Arc<State>, body: &Value) -> (u16, axum::http::HeaderMap, String) {
    post_with(st, None, body).await
}

/// `post` with `Authorization: Bearer KEY` when `key` is given.
async fn post_with(
    st: &Arc<State>,
    key: Option<&str>,
    body: &Value,
) -> (u16, axum::http::HeaderMap, String) {
    let mut r =
        HttpRequest::post("/v1/chat/completions").header("content-type", "application/json");
    if let Some(k) = key {
        r = r.header("authorization", format!("Bearer {k}"));
    }
    let resp = app(st.clone())
        .oneshot(r.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_table_through_the_http_app() {
    let remote = fake(vec![(200, openai_answer("Remote says teal"))]);
    for row in rows() {
        let (_dir, local, st) = state(&row, row.chain.then_some(&remote));
        let before = remote.seen.lock().unwrap().len();
        let (status, h, text) = rt().block_on(post(&st, &body(&row, false)));
        let n = &row.name;
        assert_eq!(status, row.status, "{n}: {text}");
        assert!(h.get("x-request-id").is_some(), "{n}");
        let v: Value = serde_json::from_str(&text).unwrap();
        if status == 200 {
            assert_eq!(v["choices"][0]["message"]["content"], row.text, "{n}: {v}");
            assert_eq!(v["corral"]["route"], row.route, "{n}: {v}");
            assert_eq!(h["x-corral-route"], row.route, "{n}");
            assert_eq!(v["corral"]["escalated"], row.escalated, "{n}: {v}");
            let why = v["corral"]["escalation_reason"].as_str().unwrap_or("");
            assert!(why.contains(row.why), "{n}: {why}");
        } else {
            assert!(v["error"]["message"].is_string(), "{n}: {v}");
            if row.route == "deny" {
                assert_eq!(v["error"]["code"], "policy_denied", "{n}");
                assert_eq!(h["x-corral-route"], "deny", "{n}");
            }
        }
        assert_eq!(local.submitted(), row.jobs, "{n}: local jobs");
        assert_eq!(
            remote.seen.lock().unwrap().len() - before,
            row.calls,
            "{n}: remote calls"
        );
        // Counted once, under its route and outcome.
        let metrics = st.metrics.render();
        let outcome = if status == 200 {
            "ok".to_string()
        } else {
            status.to_string()
        };
        let counted: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("corral_requests_total{"))
            .collect();
        assert_eq!(counted.len(), 1, "{n}: {counted:?}");
        let route = if status == 200 { row.route } else { "none" };
        assert!(
            counted[0].contains(&format!("route=\"{route}\""))
                && counted[0].contains(&format!("outcome=\"{outcome}\""))
                && counted[0].ends_with(" 1"),
            "{n}: {counted:?}"
        );
    }
}

#[test]
fn streams_through_the_http_app_held_or_live() {
    let remote = fake(vec![(200, openai_answer("Remote says teal"))]);
    // With a chain to escalate to, the answer is held until scored: the escalated answer is
    // the only one the stream carries.
    let row = Row {
        scripts: vec![unsure()],
        ..rows().remove(1)
    };
    let (_d, _l, st) = state(&row, Some(&remote));
    let (status, h, text) = rt().block_on(post(&st, &body(&row, true)));
    assert_eq!(status, 200, "{text}");
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(h["x-corral-route"], "llm");
    assert!(
        text.contains("Remote says teal") && !text.contains("mauve"),
        "{text}"
    );
    assert!(text.contains("\"escalated\":true") && text.trim_end().ends_with("data: [DONE]"));

    // With none, the SLM's tokens stream live; its low score is said at the end.
    let row = Row {
        scripts: vec![unsure()],
        ..rows().remove(0)
    };
    let (_d, _l, st) = state(&row, None);
    let (status, h, text) = rt().block_on(post(&st, &body(&row, true)));
    assert_eq!(status, 200);
    assert_eq!(h["x-corral-route"], "slm");
    let chunks = sse_chunks(&text);
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, "Maybe mauve");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["corral"]["below_threshold"], true, "{last}");

    // A runner failing after the first token ends the stream with an error event.
    let row = Row {
        scripts: vec![Script::CrashAfter(vec![("Teal", -0.1)])],
        ..rows().remove(0)
    };
    let (_d, local, st) = state(&row, None);
    let (status, _, text) = rt().block_on(post(&st, &body(&row, true)));
    assert_eq!(status, 200);
    assert!(
        text.contains("Teal") && text.contains("\"error\""),
        "{text}"
    );
    assert!(!text.contains("[DONE]"));
    assert_eq!(local.submitted(), 1);
    assert!(st.metrics.render().contains("outcome=\"stream_error\"} 1"));
}

fn run_args(row: &Row) -> RunArgs {
    RunArgs {
        model: row.model.map(String::from),
        profile: None,
        temperature: 0.0,
        top_p: None,
        seed: None,
        max_tokens: 8,
        system: None,
        json: true,
        ignore_eos: false,
        tools: None,
        tool_choice: None,
        caller: CallerArgs {
            metadata: if row.secret {
                vec!["kind=secret".into()]
            } else {
                vec![]
            },
            ..CallerArgs::default()
        },
        prompt: "Name a colour.".into(),
    }
}

#[test]
fn the_table_through_corral_run() {
    let remote = fake(vec![(200, openai_answer("Remote says teal"))]);
    for row in rows() {
        let (_dir, cfg) = config(row.chain.then_some(&remote), row.extra);
        let local = Arc::new(ScriptedModel::new(row.scripts.clone()));
        let before = remote.seen.lock().unwrap().len();
        let mut out = Vec::new();
        let n = &row.name;
        let code = match run_with(
            &cfg,
            &run_args(&row),
            local.clone(),
            &Mutex::new(Report::default()),
            &mut out,
        ) {
            Ok(c) => c,
            Err(e) => e.exit_code(),
        };
        assert_eq!(code, row.exit, "{n}: {}", String::from_utf8_lossy(&out));
        assert_eq!(local.submitted(), row.jobs, "{n}: local jobs");
        assert_eq!(
            remote.seen.lock().unwrap().len() - before,
            row.calls,
            "{n}: remote calls"
        );
        if row.exit == 0 {
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["text"], row.text, "{n}: {v}");
            assert_eq!(v["escalated"], row.escalated, "{n}: {v}");
            let why = v["escalation_reason"].as_str().unwrap_or("");
            assert!(why.contains(row.why), "{n}: {why}");
            let picked = v["route"]["selection"]["kind"].as_str().unwrap();
            let expect = if row.route == "llm" && !row.escalated {
                "llm"
            } else {
                "slm"
            };
            assert_eq!(picked, expect, "{n}: {v}");
        } else if row.exit == 3 {
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["denied"], "secret projects stay off models", "{n}");
        }
    }
}

#[test]
fn corral_run_streams_an_answer_nothing_can_replace_and_holds_one_that_may_be() {
    let remote = fake(vec![(200, openai_answer("Remote says teal"))]);
    for (chain, script, want) in [
        (false, sure(), "Teal it is.\n"),
        (true, unsure(), "Remote says teal\n"),
    ] {
        let (_dir, cfg) = config(chain.then_some(&remote), "");
        let local = Arc::new(ScriptedModel::new(vec![script]));
        let mut args = run_args(&rows().remove(0));
        args.json = false;
        let mut out = Vec::new();
        let code = run_with(&cfg, &args, local, &Mutex::new(Report::default()), &mut out).unwrap();
        assert_eq!(code, 0);
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }
}

fn tool_answer() -> String {
    json!({
        "id": "x", "object": "chat.completion", "model": "remote-large",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": null,
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 9}
    })
    .to_string()
}

/// The JSON chunks of an SSE answer (`[DONE]` left out).
fn sse_chunks(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The first tool-call delta of each chunk that has one.
fn call_deltas(chunks: &[Value]) -> Vec<&Value> {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect()
}

/// `corral run` with `args` on `local`: exits 0 and prints one JSON line, returned.
fn run_one_line(cfg: &Config, args: &RunArgs, local: Arc<ScriptedModel>) -> Value {
    let mut out = Vec::new();
    let code = run_with(cfg, args, local, &Mutex::new(Report::default()), &mut out).unwrap();
    assert_eq!(code, 0);
    serde_json::from_slice(&out).unwrap()
}

fn tools_body(stream: bool) -> Value {
    json!({
        "model": "auto",
        "stream": stream,
        "messages": [
            {"role": "user", "content": "Weather in Paris, then Lyon?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "{\"temp_c\": 21}"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": "auto",
    })
}

#[test]
fn tools_go_to_a_remote_model_and_its_calls_come_back_in_openais_shape() {
    let remote = fake(vec![(200, tool_answer())]);
    let row = Row {
        scripts: vec![sure()],
        extra: TOOLS_REMOTE,
        ..rows().remove(0)
    };
    let (_d, local, st) = state(&row, Some(&remote));
    let (status, h, text) = rt().block_on(post(&st, &tools_body(false)));
    assert_eq!(status, 200, "{text}");
    assert_eq!(h["x-corral-route"], "llm", "a policy sends ToolUse remote");
    let v: Value = serde_json::from_str(&text).unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Lyon\"}"
    );
    assert_eq!(local.submitted(), 0);
    // The provider got the tools, the choice and the conversation's calls and results as sent.
    let (_, sent) = remote.seen.lock().unwrap().last().cloned().unwrap();
    let sent: Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(sent["tools"], tools_body(false)["tools"]);
    assert_eq!(sent["tool_choice"], "auto");
    assert_eq!(sent["messages"][1]["tool_calls"][0]["id"], "call_0");
    assert_eq!(sent["messages"][2]["role"], "tool");
    assert_eq!(sent["messages"][2]["tool_call_id"], "call_0");

    // Streamed, the call arrives as OpenAI streams it and reassembles to the same call.
    let (status, _, text) = rt().block_on(post(&st, &tools_body(true)));
    assert_eq!(status, 200, "{text}");
    let chunks = sse_chunks(&text);
    let deltas = call_deltas(&chunks);
    assert_eq!(deltas[0]["id"], "call_1");
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    let args: String = deltas
        .iter()
        .filter_map(|d| d["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, "{\"city\":\"Lyon\"}");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
}

#[test]
fn local_tool_calls_come_back_whole_in_openais_shape_and_json_goes_local_constrained() {
    // The local model (it has ToolUse) gets the tools; its call comes back as OpenAI's
    // `tool_calls`, streamed as id and name first, then the arguments.
    let call = || Script::Calls(vec![("get_weather", json!({"city": "Lyon"}))], -0.02);
    let row = Row {
        scripts: vec![call(), call()],
        ..rows().remove(0)
    };
    let (_d, local, st) = state(&row, None);
    let (status, h, text) = rt().block_on(post(&st, &tools_body(false)));
    assert_eq!(status, 200, "{text}");
    assert_eq!(h["x-corral-route"], "slm");
    let v: Value = serde_json::from_str(&text).unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let c = &choice["message"]["tool_calls"][0];
    assert_eq!(c["function"]["name"], "get_weather");
    assert_eq!(c["function"]["arguments"], "{\"city\":\"Lyon\"}");
    assert!(c["id"].as_str().unwrap().starts_with("call_"));
    let sent = local.jobs.lock().unwrap()[0].2.tools.clone().unwrap();
    assert_eq!(sent.functions[0].name, "get_weather");
    assert_eq!(sent.choice, corral_protocol::ToolChoice::Auto);
    let (status, _, text) = rt().block_on(post(&st, &tools_body(true)));
    assert_eq!(status, 200, "{text}");
    let chunks = sse_chunks(&text);
    let deltas = call_deltas(&chunks);
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    assert!(deltas[0]["id"].as_str().unwrap().starts_with("call_"));
    let args: String = deltas
        .iter()
        .filter_map(|d| d["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, "{\"city\":\"Lyon\"}");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "", "no call syntax leaks as text");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
    let row = Row {
        scripts: vec![sure()],
        ..rows().remove(0)
    };
    let (_d, local, st) = state(&row, None);
    // A JSON schema goes to the local model (it has StructuredOutput) with the constraint the
    // runner enforces.
    let schema = json!({"type": "object", "properties": {"colour": {"type": "string"}}});
    let mut b = body(&row, false);
    b["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "c", "schema": schema}});
    let (status, h, text) = rt().block_on(post(&st, &b));
    assert_eq!(status, 200, "{text}");
    assert_eq!(h["x-corral-route"], "slm");
    assert_eq!(
        local.jobs.lock().unwrap()[0].2.constraint,
        Some(corral_protocol::OutputConstraint::JsonSchema { schema })
    );
    // Malformed ones are the caller's 400, naming the field.
    for (field, bad, param) in [
        ("tools", json!([{"type": "retrieval"}]), "tools[0].type"),
        (
            "tool_choice",
            json!({"type": "function", "function": {"name": "nope"}}),
            "tool_choice",
        ),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format.json_schema.schema",
        ),
        ("functions", json!([{"name": "f"}]), "functions"),
    ] {
        let mut b = tools_body(false);
        b[field] = bad;
        let (status, _, text) = rt().block_on(post(&st, &b));
        assert_eq!(status, 400, "{field}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], param, "{text}");
    }
}

#[test]
fn a_json_schema_goes_to_the_remote_model_as_sent() {
    let remote = fake(vec![(200, openai_answer("{\"colour\":\"teal\"}"))]);
    // A policy sends everything remote (the local model could answer it constrained too).
    let row = Row {
        scripts: vec![sure()],
        extra: ALL_REMOTE,
        ..rows().remove(0)
    };
    let (_d, _l, st) = state(&row, Some(&remote));
    let mut b = body(&row, false);
    let rf = json!({"type": "json_schema", "json_schema": {"name": "c", "strict": true,
        "schema": {"type": "object", "properties": {"colour": {"enum": ["teal", "red"]}}, "required": ["colour"]}}});
    b["response_format"] = rf.clone();
    let (status, h, text) = rt().block_on(post(&st, &b));
    assert_eq!(status, 200, "{text}");
    assert_eq!(h["x-corral-route"], "llm");
    let (_, sent) = remote.seen.lock().unwrap().last().cloned().unwrap();
    let sent: Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(sent["response_format"], rf);
}

#[test]
fn corral_run_passes_tools_from_a_file_and_prints_the_calls() {
    let remote = fake(vec![(200, tool_answer())]);
    let row = Row {
        scripts: vec![sure()],
        ..rows().remove(0)
    };
    // The local model's call, one JSON line (its id is corral's).
    let (dir, cfg) = config(None, "");
    let file = dir.path().join("tools.json");
    std::fs::write(&file, tools_body(false)["tools"].to_string()).unwrap();
    let mut args = run_args(&row);
    args.json = false;
    args.tools = Some(file.clone());
    args.tool_choice = Some("get_weather".into());
    let local = Arc::new(ScriptedModel::new(vec![Script::Calls(
        vec![("get_weather", json!({"city": "Nice"}))],
        -0.01,
    )]));
    let line = run_one_line(&cfg, &args, local.clone());
    assert_eq!(line["name"], "get_weather");
    assert_eq!(line["arguments"], json!({"city": "Nice"}));
    assert_eq!(
        local.jobs.lock().unwrap()[0]
            .2
            .tools
            .as_ref()
            .unwrap()
            .choice,
        corral_protocol::ToolChoice::Function {
            name: "get_weather".into()
        }
    );
    // A policy sending tools remote: the provider's call, and the choice it was sent.
    let (_dir2, cfg) = config(Some(&remote), TOOLS_REMOTE);
    let local = Arc::new(ScriptedModel::new(vec![]));
    let line = run_one_line(&cfg, &args, local.clone());
    assert_eq!(
        line,
        json!({"id": "call_1", "name": "get_weather", "arguments": {"city": "Lyon"}})
    );
    assert_eq!(local.submitted(), 0);
    let (_, sent) = remote.seen.lock().unwrap().last().cloned().unwrap();
    let sent: Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    // A choice that names no tool is the caller's mistake, before anything runs.
    args.tool_choice = Some("get_time".into());
    let e = run_with(
        &cfg,
        &args,
        local,
        &Mutex::new(Report::default()),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("get_weather"), "{e}");
}

/// A remote provider offering more than its configured model, aliases of every kind, and the
/// test body asking for `model`.
const NAMED: &str = "[providers.remote]\nkind = \"openai\"\nbase_url = \"URL/v1\"\nmodel = \"remote-large\"\nmodels = [\"gpt-4o*\"]\nmax_retries = 0\n\
[routing.llm_fallback]\nproviders = [\"remote\"]\n\
[routing.aliases]\nfast = \"remote/gpt-4o-mini\"\n\"claude-*\" = \"remote/*\"\nsmall = \"smollm2-135m-instruct\"\nsmart = \"auto\"\n";

fn named_state(allow: &str) -> (tempfile::TempDir, Arc<ScriptedModel>, Arc<State>, Fake) {
    let remote = fake(vec![(200, openai_answer("Remote says teal"))]);
    let extra = format!("{}{allow}", NAMED.replace("URL", &remote.url));
    let (dir, cfg) = config(None, &extra);
    let local = Arc::new(ScriptedModel::new(vec![sure(); 8]));
    let st = State::with_local(cfg, Sources::default(), local.clone()).unwrap();
    (dir, local, st, remote)
}

fn ask(st: &Arc<State>, model: &str) -> (u16, axum::http::HeaderMap, Value) {
    let b = json!({"model": model, "messages": [{"role": "user", "content": "What colour is the sea?"}]});
    let (status, h, text) = rt().block_on(post(st, &b));
    (status, h, serde_json::from_str(&text).unwrap())
}

/// The model the last upstream request asked for.
fn sent_model(remote: &Fake) -> Option<String> {
    let seen = remote.seen.lock().unwrap();
    let (_, body) = seen.last()?;
    let v: Value = serde_json::from_str(body).unwrap();
    v["model"].as_str().map(String::from)
}

#[test]
fn remote_model_names_and_aliases() {
    let (_d, local, st, remote) = named_state("");
    // PROVIDER/MODEL for a model the provider offers: that provider, that model, no SLM.
    for (name, upstream) in [
        ("remote/gpt-4o-mini", "gpt-4o-mini"),
        ("remote/remote-large", "remote-large"),
        ("fast", "gpt-4o-mini"),
        ("claude-3-haiku", "claude-3-haiku"),
    ] {
        let (status, h, v) = ask(&st, name);
        assert_eq!(status, 200, "{name}: {v}");
        assert_eq!(h["x-corral-route"], "llm", "{name}");
        assert_eq!(v["corral"]["provider"], "remote", "{name}: {v}");
        assert_eq!(sent_model(&remote).as_deref(), Some(upstream), "{name}");
    }
    assert_eq!(
        local.submitted(),
        0,
        "named remote models never reach the SLM"
    );
    // Names nobody configured stay 404, in OpenAI's format.
    for name in ["remote/gpt-5", "other/gpt-4o", "gpt-4o-mini"] {
        let (status, _, v) = ask(&st, name);
        assert_eq!(status, 404, "{name}: {v}");
        assert_eq!(v["error"]["code"], "model_not_found", "{name}");
    }
    // Aliases of a catalog model and of `auto` route as those would.
    let before = remote.seen.lock().unwrap().len();
    for name in ["small", "smart"] {
        let (status, h, v) = ask(&st, name);
        assert_eq!(status, 200, "{name}: {v}");
        assert_eq!(h["x-corral-route"], "slm", "{name}: {v}");
    }
    assert_eq!(local.submitted(), 2);
    assert_eq!(remote.seen.lock().unwrap().len(), before);
    // /v1/models lists what may be named (patterns cannot be listed).
    let resp = rt()
        .block_on(
            app(st.clone()).oneshot(HttpRequest::get("/v1/models").body(Body::empty()).unwrap()),
        )
        .unwrap();
    let bytes = rt()
        .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for want in [
        "auto",
        "smollm2-135m-instruct",
        "remote/remote-large",
        "fast",
        "small",
        "smart",
    ] {
        assert!(ids.contains(&want), "{want} missing from {ids:?}");
    }
    assert!(!ids.iter().any(|i| i.contains('*')), "{ids:?}");
}

#[test]
fn allow_lists_apply_to_remote_names() {
    // Anyone may use the provider's gpt-4o models, by name or alias; nothing else.
    let allow = "[slm.model_allow_lists.agent_model_maps]\n\"*\" = [\"remote/gpt-4o*\"]\n";
    let (_d, _l, st, remote) = named_state(allow);
    for name in ["remote/gpt-4o-mini", "fast"] {
        let (status, _, v) = ask(&st, name);
        assert_eq!(status, 200, "{name}: {v}");
        assert_eq!(sent_model(&remote).as_deref(), Some("gpt-4o-mini"));
    }
    for name in ["remote/remote-large", "claude-3-haiku", "small"] {
        let (status, _, v) = ask(&st, name);
        assert_eq!(status, 403, "{name}: {v}");
        assert_eq!(v["error"]["code"], "model_not_allowed", "{name}");
    }
}

#[test]
fn aliases_to_nothing_configured_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    for (aliases, key) in [
        ("x = \"nowhere/gpt-4o\"\n", "routing.aliases.x"),
        ("x = \"no-such-model\"\n", "routing.aliases.x"),
        (
            "\"smollm2-135m-instruct\" = \"auto\"\n",
            "routing.aliases.smollm2-135m-instruct",
        ),
    ] {
        let p = dir.path().join("corral.toml");
        std::fs::write(&p, format!("[routing.aliases]\n{aliases}")).unwrap();
        let err = load(&p, &|_| None).unwrap_err();
        assert!(err.contains(key), "{aliases}: {err}");
    }
}

/// Token budgets per key: answers are charged with their tokens; a key out of tokens gets 429
/// with `Retry-After` in OpenAI's format, other keys are untouched; tokens and spend (remote
/// cost, and what local answers saved) are in /metrics.
#[test]
fn token_budgets_and_spend() {
    use sha2::Digest;
    let hex = |k: &str| {
        sha2::Sha256::digest(k.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let remote = fake(vec![(200, openai_answer("Remote says teal"))]);
    let extra = format!(
        "[providers.remote]\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodel = \"remote-large\"\nmax_retries = 0\n\
         prices = {{ \"remote-*\" = {{ input = 1000.0, output = 2000.0 }} }}\n\
         [routing.llm_fallback]\nproviders = [\"remote\"]\n\
         [server.auth.keys.small]\nsha256 = \"{}\"\ntokens_per_minute = 40\n\
         [server.auth.keys.big]\nsha256 = \"{}\"\n",
        remote.url,
        hex("small-key"),
        hex("big-key")
    );
    let (_d, cfg) = config(None, &extra);
    let local = Arc::new(ScriptedModel::new(vec![sure(); 64]));
    let st = State::with_local(cfg, Sources::default(), local).unwrap();
    let b = json!({"model": "auto", "messages": [{"role": "user", "content": "What colour is the sea?"}]});
    let mut answered = 0;
    let refusal = loop {
        let (status, h, text) = rt().block_on(post_with(&st, Some("small-key"), &b));
        if status == 429 {
            break (h, text);
        }
        assert_eq!(status, 200, "{text}");
        answered += 1;
        assert!(answered < 40, "a 40-token budget never ran out");
    };
    assert!(answered >= 1, "the first request fits the budget");
    let (h, text) = refusal;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{text}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("40 tokens per minute"));
    let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // Another key is not affected, and a remote answer is priced.
    let (status, _, text) = rt().block_on(post_with(&st, Some("big-key"), &b));
    assert_eq!(status, 200, "{text}");
    let mut remote_b = b.clone();
    remote_b["model"] = json!("remote/remote-large");
    let (status, _, text) = rt().block_on(post_with(&st, Some("big-key"), &remote_b));
    assert_eq!(status, 200, "{text}");
    let m = st.metrics.render();
    assert!(m.contains("corral_tokens_total{model=\"smollm2-135m-instruct\",route=\"slm\",kind=\"completion\"}"), "{m}");
    assert!(
        m.contains("corral_spend_usd_total{provider=\"remote\",model=\"remote-large\"}"),
        "{m}"
    );
    assert!(
        m.contains(
            "corral_spend_avoided_usd_total{provider=\"remote\",model=\"smollm2-135m-instruct\"}"
        ),
        "{m}"
    );
    // The totals /admin/monitor reports: the remote answer's 20 + 2 tokens at 1,000 and 2,000
    // dollars per million.
    let spend = *st.spend.lock().unwrap();
    assert!((spend.remote_usd - 0.024).abs() < 1e-9, "{spend:?}");
    assert!(spend.avoided_usd > 0.0, "{spend:?}");
}

/// What the review of remote names asked for: a policy's required providers are not
/// overridden by the caller's choice; an attachment scoped to a provider's models applies to
/// an alias of one; an allow list naming a local alias lets that alias through to the SLM.
#[test]
fn remote_names_under_policies_attachments_and_allow_lists() {
    let residency = "[[routing.policies]]\nid = \"eu-only\"\nconditions = { metadata = { region = \"eu\" } }\naction = { type = \"require_llm\", reason = \"data stays in the EU\", providers = [\"remote\"] }\n";
    // Another provider the policy does not name.
    let other = fake(vec![(200, openai_answer("Other says teal"))]);
    let extra = format!(
        "{residency}[providers.other]\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodel = \"other-model\"\nmax_retries = 0\n\
         [[routing.attachments]]\nid = \"no-pii-to-remote\"\nscope = {{ model = \"remote/*\" }}\nguardrails = {{ add = {{ pii = \"block\" }} }}\n\
         [routing.guardrails]\npii_kinds = [\"email\"]\n",
        other.url
    );
    let (_d, _l, st, remote) = named_state(&extra);
    let mut b = json!({"model": "other/other-model", "metadata": {"region": "eu"},
        "messages": [{"role": "user", "content": "What colour is the sea?"}]});
    let (status, _, text) = rt().block_on(post(&st, &b));
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("eu-only requires the providers remote"),
        "{text}"
    );
    assert!(
        other.seen.lock().unwrap().is_empty(),
        "nothing reached the other provider"
    );
    // The policy's own provider, named by the caller, is fine.
    b["model"] = json!("remote/gpt-4o-mini");
    let (status, _, text) = rt().block_on(post(&st, &b));
    assert_eq!(status, 200, "{text}");
    // PII to an alias of a remote model: the attachment scoped to remote/* blocks it.
    let before = remote.seen.lock().unwrap().len();
    let b = json!({"model": "fast", "messages": [{"role": "user", "content": "Mail ana@example.com the colour of the sea"}]});
    let (status, _, text) = rt().block_on(post(&st, &b));
    assert_eq!(status, 403, "{text}");
    assert_eq!(remote.seen.lock().unwrap().len(), before);
    // An allow list naming a local alias lets it through to the local model.
    let (_d, local, st, _remote) =
        named_state("[slm.model_allow_lists.agent_model_maps]\n\"*\" = [\"small\"]\n");
    let (status, h, v) = ask(&st, "small");
    assert_eq!(status, 200, "{v}");
    assert_eq!(h["x-corral-route"], "slm", "{v}");
    assert_eq!(local.submitted(), 1);
}

#[test]
fn provider_names_cannot_hold_a_slash() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("corral.toml");
    std::fs::write(
        &p,
        "[providers.\"azure/eu\"]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n",
    )
    .unwrap();
    let err = load(&p, &|_| None).unwrap_err();
    assert!(err.contains("providers.azure/eu"), "{err}");
}

/// A state with the audit log on (a fixed key) whose local model hangs, and the log's directory.
fn hung_with_audit(timeout_s: u64) -> (tempfile::TempDir, std::path::PathBuf, Arc<State>) {
    let tmp = tempfile::tempdir().unwrap();
    let audit_dir = tmp.path().join("audit");
    let p = tmp.path().join("corral.toml");
    std::fs::write(
        &p,
        format!(
            "[server]\nrequest_timeout_seconds = {timeout_s}\n[audit]\nenabled = true\ndir = {:?}\n",
            audit_dir.display().to_string()
        ),
    )
    .unwrap();
    let key_hex = "07".repeat(32);
    let cfg = load(&p, &|k| (k == "CORRAL_LOG_KEY").then(|| key_hex.clone())).unwrap();
    let local = Arc::new(ScriptedModel::new(vec![Script::Hang]));
    let st = State::with_local(cfg, Sources::default(), local).unwrap();
    (tmp, audit_dir, st)
}

/// The audit log's entries, verified.
fn audit_entries(dir: &std::path::Path) -> u64 {
    let keys = corral::audit::Keyring::from(corral::audit::AuditKey::from_bytes(&[7u8; 32]));
    let v = corral::audit::verify_path(dir, &keys).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    v.entries
}

/// A caller that goes away before its response starts cancels the work (the pipeline's task
/// is aborted) and its request is still audited.
#[test]
fn a_request_abandoned_before_its_response_is_audited() {
    let (_tmp, audit_dir, st) = hung_with_audit(30);
    let b = json!({"model": "auto", "messages": [{"role": "user", "content": "Name a colour."}]});
    let gone = rt().block_on(async {
        tokio::time::timeout(std::time::Duration::from_millis(200), post(&st, &b)).await
    });
    assert!(gone.is_err(), "the hung request cannot have answered");
    drop(st);
    assert_eq!(audit_entries(&audit_dir), 1);
}

/// A request that times out before its response starts (504) is audited too: the pipeline's
/// task is aborted with it, so the server writes the entry itself.
#[test]
fn a_request_timeout_is_audited() {
    let (_tmp, audit_dir, st) = hung_with_audit(1);
    let b = json!({"model": "auto", "messages": [{"role": "user", "content": "Name a colour."}]});
    let (status, _, text) = rt().block_on(post(&st, &b));
    assert_eq!(status, 504, "{text}");
    assert!(text.contains("request_timeout_seconds"), "{text}");
    drop(st); // flushes and closes the log
    assert_eq!(
        audit_entries(&audit_dir),
        1,
        "the timed-out request has its entry"
    );
}

/// A streamed chat request through the app: the response's headers and its body's pieces, each
/// with when it arrived; `stop_after`: drop the response once a piece contains this text. Then
/// `after` runs with the app's tasks still going (a runtime gone would end them).
fn stream_pieces<T>(
    st: &Arc<State>,
    body: &Value,
    stop_after: Option<&str>,
    after: impl FnOnce() -> T,
) -> (axum::http::HeaderMap, Vec<(std::time::Duration, String)>, T) {
    stream_pieces_at(st, "/v1/chat/completions", None, body, stop_after, after)
}

/// `stream_pieces` posting to `path`.
fn stream_pieces_at<T>(
    st: &Arc<State>,
    path: &str,
    key: Option<&str>,
    body: &Value,
    stop_after: Option<&str>,
    after: impl FnOnce() -> T,
) -> (axum::http::HeaderMap, Vec<(std::time::Duration, String)>, T) {
    use tokio_stream::StreamExt;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (headers, pieces) = rt.block_on(async {
        let t0 = std::time::Instant::now();
        let mut r = HttpRequest::post(path).header("content-type", "application/json");
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        let r = r.body(Body::from(body.to_string())).unwrap();
        let resp = app(st.clone()).oneshot(r).await.unwrap();
        let headers = resp.headers().clone();
        let mut data = resp.into_body().into_data_stream();
        let mut pieces = Vec::new();
        while let Some(b) = data.next().await {
            let text = String::from_utf8(b.unwrap().to_vec()).unwrap();
            let stop = stop_after.is_some_and(|s| text.contains(s));
            pieces.push((t0.elapsed(), text));
            if stop {
                break;
            }
        }
        (headers, pieces)
    });
    let out = after();
    drop(rt);
    (headers, pieces, out)
}

fn streamed_request() -> Value {
    json!({"model": "auto", "stream": true, "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": "What colour is the sea?"}]})
}

#[test]
fn an_escalated_stream_relays_the_remote_answer_as_it_arrives() {
    let ms = std::time::Duration::from_millis;
    let remote = fake_stream(vec![
        (ms(0), openai_chunk("Remote")),
        (ms(800), openai_chunk(" says teal")),
        (ms(0), openai_stream_end()),
    ]);
    let (_d, cfg) = config_at(Some(&remote.url), "");
    let local = Arc::new(ScriptedModel::new(vec![unsure()]));
    let st = State::with_local(cfg, Sources::default(), local.clone()).unwrap();
    let (h, pieces, ()) = stream_pieces(&st, &streamed_request(), None, || ());
    assert_eq!(h["x-corral-route"], "llm");
    assert_eq!(h["x-corral-escalated"], "true");
    assert!(h["x-corral-escalation-reason"]
        .to_str()
        .unwrap()
        .contains("confidence"));
    // The remote answer's first words reached the client before the provider sent the rest.
    let first = pieces.iter().find(|(_, t)| t.contains("Remote")).unwrap();
    let rest = pieces
        .iter()
        .find(|(_, t)| t.contains("says teal"))
        .unwrap();
    assert!(first.0 < ms(600), "{pieces:?}");
    assert!(rest.0 >= ms(750), "{pieces:?}");
    let text: String = pieces.iter().map(|(_, t)| t.as_str()).collect();
    let chunks = sse_chunks(&text);
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Remote says teal");
    assert!(!text.contains("mauve"), "{text}");
    let last = chunks
        .iter()
        .find(|c| !c["corral"].is_null())
        .expect("a chunk with the corral facts");
    assert_eq!(last["corral"]["escalated"], true);
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    let usage = chunks.iter().find(|c| c["usage"].is_object()).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let sent: Value = serde_json::from_str(&remote.seen.lock().unwrap()[0]).unwrap();
    assert_eq!(sent["stream"], true);
    // Its tokens are counted (and charged) from the provider's usage.
    let m = st.metrics.render();
    assert!(
        m.contains(
            "corral_tokens_total{model=\"remote-large\",route=\"llm\",kind=\"completion\"} 4"
        ),
        "{m}"
    );
    // The local answer it replaced was computed too: counted as local tokens.
    assert!(
        m.contains(
            "corral_tokens_total{model=\"smollm2-135m-instruct\",route=\"slm\",kind=\"completion\"} 2"
        ),
        "{m}"
    );
}

#[test]
fn a_client_leaving_a_remote_stream_closes_the_providers_connection() {
    let ms = std::time::Duration::from_millis;
    // After its first words the provider sends only keep-alives for a while (as one does while
    // a model thinks): the client's leaving must still close the connection.
    let mut parts = vec![(ms(0), openai_chunk("Remote"))];
    parts.extend((0..100).map(|_| (ms(30), ": keep-alive\n\n".to_string())));
    parts.push((ms(0), openai_stream_end()));
    let remote = fake_stream(parts);
    let (_d, cfg) = config_at(Some(&remote.url), "");
    let local = Arc::new(ScriptedModel::new(vec![]));
    let st = State::with_local(cfg, Sources::default(), local.clone()).unwrap();
    let mut body = streamed_request();
    body["model"] = json!("remote/remote-large");
    let wait = |done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while !done() && std::time::Instant::now() < deadline {
            std::thread::sleep(ms(10));
        }
    };
    let (h, pieces, counted) = stream_pieces(&st, &body, Some("Remote"), || {
        // The provider's writes start failing soon after: its connection was closed.
        wait(&|| !remote.broken.lock().unwrap().is_empty());
        let counted = || {
            st.metrics
                .render()
                .lines()
                .find(|l| l.starts_with("corral_requests_total{"))
                .map(str::to_string)
        };
        wait(&|| counted().is_some());
        counted()
    });
    assert_eq!(h["x-corral-route"], "llm");
    assert_eq!(h["x-corral-escalated"], "false");
    assert!(pieces.last().unwrap().0 < ms(1000), "{pieces:?}");
    let broken = remote.broken.lock().unwrap().clone();
    assert!(broken.first().is_some_and(|i| *i < 40), "{broken:?}");
    assert_eq!(local.submitted(), 0);
    // Counted once, as the client's leaving, on the remote route.
    let counted = counted.expect("the request is counted");
    assert!(
        counted.contains("outcome=\"client_gone\"") && counted.contains("route=\"llm\""),
        "{counted}"
    );
}

#[test]
fn v1_messages_relays_a_remote_stream_as_anthropic_events() {
    let ms = std::time::Duration::from_millis;
    let remote = fake_stream(vec![
        (ms(0), openai_chunk("Remote")),
        (ms(600), openai_chunk(" says teal")),
        (ms(0), openai_stream_end()),
    ]);
    let (_d, cfg) = config_at(Some(&remote.url), "");
    let local = Arc::new(ScriptedModel::new(vec![unsure()]));
    let st = State::with_local(cfg, Sources::default(), local.clone()).unwrap();
    let body = json!({"model": "auto", "max_tokens": 64, "stream": true,
                      "system": "Be brief.",
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "What colour is the sea?"}]}]});
    let (h, pieces, ()) = stream_pieces_at(&st, "/v1/messages", None, &body, None, || ());
    assert_eq!(h["x-corral-route"], "llm");
    assert_eq!(h["x-corral-escalated"], "true");
    let first = pieces.iter().find(|(_, t)| t.contains("Remote")).unwrap();
    assert!(first.0 < ms(450), "{pieces:?}");
    let text: String = pieces.iter().map(|(_, t)| t.as_str()).collect();
    // Events in Anthropic's order, each named as its data's type.
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap()
                .to_string();
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            (name, serde_json::from_str(data).unwrap())
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "{text}"
    );
    for (n, d) in &events {
        assert_eq!(d["type"], n.as_str());
    }
    let said: String = events
        .iter()
        .filter_map(|(_, d)| d.pointer("/delta/text").and_then(Value::as_str))
        .collect();
    assert_eq!(said, "Remote says teal");
    let end = &events[6].1;
    assert_eq!(end["delta"]["stop_reason"], "end_turn");
    assert_eq!(end["usage"]["output_tokens"], 4);
    assert_eq!(end["corral"]["escalated"], true);
    // The provider got the system prompt and the text block as a chat request.
    let sent: Value = serde_json::from_str(&remote.seen.lock().unwrap()[0]).unwrap();
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(sent["messages"][1]["content"], "What colour is the sea?");
    assert_eq!(sent["max_tokens"], 64);
    assert!(st.metrics.render().contains("endpoint=\"messages\""));
}

#[test]
fn v1_messages_answers_locally_and_errs_in_anthropics_format() {
    let row = Row {
        scripts: vec![sure()],
        ..rows().remove(0)
    };
    let (_d, _l, st) = state(&row, None);
    let post = |body: Value| {
        rt().block_on(async {
            let r = HttpRequest::post("/v1/messages")
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let resp = app(st.clone()).oneshot(r).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        })
    };
    let (status, m) = post(json!({"model": "auto", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Name a colour."}]}));
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["type"], "message");
    assert_eq!(
        m["content"][0],
        json!({"type": "text", "text": "Teal it is."})
    );
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["usage"]["output_tokens"], 3);
    assert_eq!(m["corral"]["route"], "slm");
    let (status, e) = post(json!({"model": "nope", "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(status, 404);
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "not_found_error");
    let (status, e) =
        post(json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(
        (status, e["error"]["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{e}"
    );
}

#[test]
fn leaving_a_stream_before_its_end_is_charged_to_the_budget() {
    use sha2::Digest;
    let ms = std::time::Duration::from_millis;
    let mut parts = vec![(ms(0), openai_chunk("Remote"))];
    parts.extend((0..60).map(|_| (ms(20), openai_chunk(" more"))));
    parts.push((ms(0), openai_stream_end()));
    let remote = fake_stream(parts);
    let hex: String = sha2::Sha256::digest(b"small-key")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let extra = format!("[server.auth.keys.small]\nsha256 = \"{hex}\"\ntokens_per_minute = 30\n");
    let (_d, cfg) = config_at(Some(&remote.url), &extra);
    let st = State::with_local(
        cfg,
        Sources::default(),
        Arc::new(ScriptedModel::new(vec![])),
    )
    .unwrap();
    // A 160-character prompt: about 40 tokens, more than the key's 30 a minute.
    let mut body = streamed_request();
    body["model"] = json!("remote/remote-large");
    body["messages"][0]["content"] = json!("Tell me about the sea. ".repeat(7));
    let (_, pieces, ()) = stream_pieces_at(
        &st,
        "/v1/chat/completions",
        Some("small-key"),
        &body,
        Some("Remote"),
        || std::thread::sleep(ms(300)),
    );
    assert!(pieces.iter().any(|(_, t)| t.contains("Remote")));
    // Nothing came back with a usage, yet the next request finds the budget spent.
    let (status, _, text) = rt().block_on(post_with(&st, Some("small-key"), &body));
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("token_budget_exceeded"), "{text}");
}
