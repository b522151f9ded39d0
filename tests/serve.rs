//! `corral serve` over real HTTP: real SmolLM2 runners in their sandboxes, and a loopback server
//! playing the remote OpenAI-compatible provider.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const KEY: &str = "sk-test-alpha";
const ADMIN: &str = "admin-secret";

fn sha_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
    cfg: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_text(extra: &str) -> String {
    format!(
        "[slm]\nmodel_dir = {:?}\n\n[server]\nbind = \"127.0.0.1:0\"\nshutdown_grace_seconds = 10\n\n\
         [server.auth]\nadmin_key_env = \"CORRAL_TEST_ADMIN\"\n\n\
         [server.auth.keys.alpha]\nsha256 = \"{}\"\nagent = \"alpha-agent\"\nteam = \"a-team\"\n\n\
         [server.auth.keys.metered]\nenv = \"CORRAL_TEST_METERED\"\nrequests_per_minute = 2\n\n{extra}",
        model_file().parent().unwrap().display().to_string(),
        sha_hex(KEY)
    )
}

/// Starts `corral serve` with the config text and waits for its address.
fn serve(toml: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("corral.toml");
    std::fs::write(&cfg, toml).unwrap();
    let mut child = Command::new(corral())
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .env("CORRAL_TEST_ADMIN", ADMIN)
        .env("CORRAL_TEST_METERED", "sk-metered")
        .env("CORRAL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(u) = line.strip_prefix("corral: listening on ") {
                let _ = tx.send(u.to_string());
            }
            let mut g = l.lock().unwrap();
            g.push_str(&line);
            g.push('\n');
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("corral serve did not start: {}", log.lock().unwrap()));
    Server {
        child,
        url,
        log,
        cfg,
        _dir: dir,
    }
}

/// (status, headers we care about, body) of a request; errors are responses too.
fn call(method: &str, url: &str, key: Option<&str>, body: Option<Value>) -> (u16, ureq::Response) {
    let mut r = ureq::request(method, url).timeout(Duration::from_secs(120));
    if let Some(k) = key {
        r = r.set("authorization", &format!("Bearer {k}"));
    }
    let res = match body {
        Some(b) => r.send_json(b),
        None => r.call(),
    };
    match res {
        Ok(resp) => (resp.status(), resp),
        Err(ureq::Error::Status(code, resp)) => (code, resp),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

/// A response's headers.
struct Headers(std::collections::HashMap<String, String>);

impl Headers {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

fn post(s: &Server, path: &str, key: Option<&str>, body: Value) -> (u16, Value, Headers) {
    let (code, resp) = call("POST", &format!("{}{path}", s.url), key, Some(body));
    let headers = Headers(
        resp.headers_names()
            .into_iter()
            .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string())))
            .collect(),
    );
    let text = resp.into_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, v, headers)
}

fn chat(prompt: &str, max_tokens: u32) -> Value {
    json!({"model": "auto", "messages": [{"role": "user", "content": prompt}],
           "temperature": 0, "max_tokens": max_tokens})
}

/// The `data:` payloads of an SSE body.
fn sse(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn openai_shapes_auth_logprobs_and_streaming() {
    let s = serve(&config_text(""));
    // Auth: none, wrong, right.
    let (code, v, _) = post(&s, "/v1/chat/completions", None, chat("hi", 4));
    assert_eq!(code, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let (code, _, _) = post(&s, "/v1/chat/completions", Some("sk-wrong"), chat("hi", 4));
    assert_eq!(code, 401);
    let (code, resp) = call("GET", &format!("{}/v1/models", s.url), Some(KEY), None);
    assert_eq!(code, 200);
    let models: Value = resp.into_json().unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["auto", "gemma3-270m", "smollm2-135m-instruct"]);

    // A chat answer from the sandboxed SLM, with logprobs and corral's headers.
    let mut req = chat("What is the capital of France?", 24);
    req["logprobs"] = json!(true);
    req["top_logprobs"] = json!(2);
    let (code, v, h) = post(&s, "/v1/chat/completions", Some(KEY), req.clone());
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty());
    assert_eq!(h.header("x-corral-route"), Some("slm"));
    assert_eq!(h.header("x-corral-model"), Some("smollm2-135m-instruct"));
    assert_eq!(h.header("x-corral-escalated"), Some("false"));
    assert!(
        h.header("x-corral-confidence")
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
    assert_eq!(
        h.header("x-request-id").unwrap(),
        v["corral"]["request_id"].as_str().unwrap()
    );
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lp.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let joined: String = lp.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(joined, text, "logprob tokens spell the answer");
    for t in lp {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert!(top[0]["logprob"].as_f64().unwrap() >= top[1]["logprob"].as_f64().unwrap());
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
    }

    // The same request streamed: the same text (greedy), then the usage chunk and [DONE].
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (code, resp) = call(
        "POST",
        &format!("{}/v1/chat/completions", s.url),
        Some(KEY),
        Some(req),
    );
    assert_eq!(code, 200);
    assert!(resp.content_type().starts_with("text/event-stream"));
    let events = sse(&resp.into_string().unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|c| c["delta"]["content"].as_str())
        })
        .collect();
    assert_eq!(streamed, text);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], v["usage"]["completion_tokens"]);

    // Legacy completions: integer logprobs, its own shape.
    let (code, c, _) = post(
        &s,
        "/v1/completions",
        Some(KEY),
        json!({"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(code, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    let l = &c["choices"][0]["logprobs"];
    assert_eq!(l["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(l["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(l["text_offset"][0], 0);

    // A key with requests_per_minute = 2 (read from the environment): the third call is 429.
    for _ in 0..2 {
        let (code, _) = call(
            "GET",
            &format!("{}/v1/models", s.url),
            Some("sk-metered"),
            None,
        );
        assert_eq!(code, 200);
    }
    let (code, e, h) = post(
        &s,
        "/v1/chat/completions",
        Some("sk-metered"),
        chat("hi", 2),
    );
    assert_eq!(code, 429, "{e}");
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert!(h.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);

    // Refused by name, in OpenAI's error format; unknown models are 404.
    for (body, param) in [
        (
            json!({"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 2}),
            "n",
        ),
        (
            json!({"model": "auto", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
            "tools[0].function.name",
        ),
        (
            json!({"model": "auto", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}),
            "presence_penalty",
        ),
        (
            json!({"model": "auto", "messages": [{"role": "user", "content": "x"}], "bogus": 1}),
            "bogus",
        ),
        (
            json!({"model": "auto", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
            "response_format.type",
        ),
    ] {
        let (code, e, _) = post(&s, "/v1/chat/completions", Some(KEY), body);
        assert_eq!(code, 400, "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    // Runtime allow-list overrides are off unless the config turns them on.
    let (code, e, _) = post(
        &s,
        "/admin/allow_lists",
        Some(ADMIN),
        json!({"agent": "x", "models": []}),
    );
    assert_eq!(code, 403, "{e}");
    assert_eq!(e["error"]["code"], "overrides_disabled");
    let (code, e, _) = post(
        &s,
        "/v1/chat/completions",
        Some(KEY),
        json!({"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(code, 404, "{e}");
    assert_eq!(e["error"]["code"], "model_not_found");

    // Metrics saw it all.
    let (_, m) = call("GET", &format!("{}/metrics", s.url), None, None);
    let m = m.into_string().unwrap();
    assert!(m.contains("corral_requests_total{endpoint=\"chat\",route=\"slm\",model=\"smollm2-135m-instruct\",outcome=\"ok\"} 2"), "{m}");
    assert!(m.contains("corral_gateway_overhead_seconds_count{route=\"slm\"}"));
    assert!(m.contains("corral_confidence_count{model=\"smollm2-135m-instruct\""));
    // Live cgroup usage of the runner.
    let peak = m
        .lines()
        .find(|l| l.starts_with("corral_runner_memory_peak_bytes{pool=\"smollm2-135m-instruct/secure\",runner=\"0\"}"))
        .unwrap_or_else(|| panic!("{m}"));
    let bytes: f64 = peak.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(bytes > 50e6, "{peak}");
    assert!(
        m.contains("corral_runner_cpu_seconds{pool=\"smollm2-135m-instruct/secure\",runner=\"0\"}")
    );
}

#[test]
fn low_confidence_escalates_and_allow_lists_refuse() {
    let remote = fake(vec![(200, openai_answer("Paris, from the remote model."))]);
    let toml = config_text(&format!(
        r#"
[slm.model_allow_lists]
allow_runtime_overrides = true

[slm.model_allow_lists.agent_model_maps]
alpha-agent = ["smollm2-135m-instruct"]
beta-agent = []

[server.auth.keys.beta]
sha256 = "{}"
agent = "beta-agent"

[providers.remote]
kind = "openai"
base_url = "{}/v1"
model = "remote-large"
max_retries = 0

[routing.llm_fallback]
providers = ["remote"]

[routing.confidence_thresholds]
default = 0.999

[[routing.policies]]
id = "live-stream"
conditions = {{ metadata = {{ ui = "live" }} }}
action = {{ type = "prefer_slm", streaming = "stream" }}
"#,
        sha_hex("sk-beta"),
        remote.url
    ));
    let s = serve(&toml);
    let (code, v, h) = post(
        &s,
        "/v1/chat/completions",
        Some(KEY),
        chat("What is the capital of France?", 16),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(h.header("x-corral-escalated"), Some("true"));
    assert_eq!(h.header("x-corral-route"), Some("llm"));
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Paris, from the remote model."
    );
    assert!(
        v["corral"]["escalation_reason"]
            .as_str()
            .unwrap()
            .starts_with("confidence"),
        "{v}"
    );
    assert_eq!(remote.seen.lock().unwrap().len(), 1);
    // Escalated while streaming: the client only ever sees the remote answer.
    let mut req = chat("What is the capital of France?", 16);
    req["stream"] = json!(true);
    let (code, resp) = call(
        "POST",
        &format!("{}/v1/chat/completions", s.url),
        Some(KEY),
        Some(req),
    );
    assert_eq!(code, 200);
    let body = resp.into_string().unwrap();
    let text: String = sse(&body)
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, "Paris, from the remote model.");
    // A policy that chose `streaming = "stream"`: the SLM's tokens go out as they come, so a low
    // score can no longer escalate, and the last chunk says so.
    let mut req = chat("What is the capital of France?", 16);
    req["stream"] = json!(true);
    req["metadata"] = json!({"ui": "live"});
    let (code, resp) = call(
        "POST",
        &format!("{}/v1/chat/completions", s.url),
        Some(KEY),
        Some(req),
    );
    assert_eq!(code, 200);
    assert_eq!(resp.header("x-corral-route"), Some("slm"));
    let chunks: Vec<Value> = sse(&resp.into_string().unwrap())
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["corral"]["below_threshold"], true, "{last}");
    assert_eq!(last["corral"]["policies"][0], "policy:live-stream");
    assert_eq!(
        remote.seen.lock().unwrap().len(),
        2,
        "no escalation for the streamed answer"
    );

    // beta-agent may use no local model: naming one is refused, and /v1/models lists only auto.
    let mut req = chat("hi", 4);
    req["model"] = json!("smollm2-135m-instruct");
    let (code, e, _) = post(&s, "/v1/chat/completions", Some("sk-beta"), req);
    assert_eq!(code, 403, "{e}");
    assert_eq!(e["error"]["code"], "model_not_allowed");
    let (_, resp) = call(
        "GET",
        &format!("{}/v1/models", s.url),
        Some("sk-beta"),
        None,
    );
    let m: Value = resp.into_json().unwrap();
    assert_eq!(m["data"].as_array().unwrap().len(), 1);
    // Runtime overrides are on in this config: the admin grants beta the model.
    let grant = json!({"agent": "beta-agent", "models": ["smollm2-135m-instruct"]});
    let (code, _, _) = post(&s, "/admin/allow_lists", Some(KEY), grant.clone());
    assert_eq!(code, 403, "only with the admin key");
    let (code, v, _) = post(
        &s,
        "/admin/allow_lists",
        Some(ADMIN),
        json!({"agent": "beta-agent", "models": ["gpt-x"]}),
    );
    assert_eq!(code, 400, "{v}");
    let (code, v, _) = post(&s, "/admin/allow_lists", Some(ADMIN), grant);
    assert_eq!(code, 200, "{v}");
    let mut req = chat("hi", 2);
    req["model"] = json!("smollm2-135m-instruct");
    req["metadata"] = json!({"ui": "live"});
    let (code, v, _) = post(&s, "/v1/chat/completions", Some("sk-beta"), req);
    assert_eq!(code, 200, "{v}");

    // Feedback on a past request needs the admin key and lands in the monitor.
    let (code, v, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 4));
    assert_eq!(code, 200);
    let rid = v["corral"]["request_id"].as_str().unwrap().to_string();
    let fb = json!({"request_id": rid, "actual_quality": 1.0});
    let (code, _, _) = post(&s, "/admin/feedback", Some(KEY), fb.clone());
    assert_eq!(code, 403);
    let (code, v, _) = post(&s, "/admin/feedback", Some(ADMIN), fb);
    assert_eq!(code, 200, "{v}");
    let (_, resp) = call(
        "GET",
        &format!("{}/admin/monitor", s.url),
        Some(ADMIN),
        None,
    );
    let mon: Value = resp.into_json().unwrap();
    let st = &mon["stats"][0];
    assert_eq!(st["model"], "smollm2-135m-instruct");
    // Five SLM answers; all but the streamed one were escalated (threshold 0.999; a policy's
    // `streaming = "stream"` only matters for streamed requests).
    assert_eq!(st["answers"], 5);
    assert_eq!(st["escalated"], 4);
    assert_eq!(st["feedback"], 1);
    // The labelled answer carried its confidence features: the monitor measures the calibrator
    // in force on it, and a refit needs more labels than one.
    let cal = &mon["calibrators"][0];
    assert_eq!(cal["model"], "smollm2-135m-instruct");
    assert_eq!(cal["labelled"], 1);
    assert_eq!(cal["quality"]["items"], 1);
    assert!(cal["in_force"]["fitted_on"]
        .as_str()
        .unwrap()
        .contains("tuning part"));
    let refit = json!({"model": "smollm2-135m-instruct", "apply": true});
    let (code, v, _) = post(&s, "/admin/calibrator", Some(KEY), refit.clone());
    assert_eq!(code, 403, "{v}");
    let (code, v, _) = post(&s, "/admin/calibrator", Some(ADMIN), refit.clone());
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least 30"),
        "{v}"
    );
    // Forty more labelled answers (the capitals judged good, the rest not): the refit is fitted
    // on them with the evaluation's code and put in force.
    let questions = [
        ("What is the capital of France?", true),
        ("What is 48 times 37?", false),
        ("What is the capital of Japan?", true),
        ("Spell 'rabbit' backwards.", false),
    ];
    for i in 0..40 {
        let (q, good) = questions[i % questions.len()];
        let (code, v, _) = post(&s, "/v1/chat/completions", Some(KEY), chat(q, 12));
        assert_eq!(code, 200, "{v}");
        let rid = v["corral"]["request_id"].as_str().unwrap().to_string();
        let fb = json!({"request_id": rid, "actual_quality": if good { 1.0 } else { 0.0 }});
        let (code, v, _) = post(&s, "/admin/feedback", Some(ADMIN), fb);
        assert_eq!(code, 200, "{v}");
    }
    let (code, v, _) = post(&s, "/admin/calibrator", Some(ADMIN), refit);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["applied"], true);
    assert_eq!(v["labelled"], 41);
    assert_eq!(v["calibrator"]["model"], "smollm2-135m-instruct");
    assert_eq!(v["calibrator"]["items"], 41);
    assert!(v["in_force"]["auroc"].is_number(), "{v}");
    let (_, resp) = call(
        "GET",
        &format!("{}/admin/monitor", s.url),
        Some(ADMIN),
        None,
    );
    let mon: Value = resp.into_json().unwrap();
    assert_eq!(
        mon["calibrators"][0]["in_force"]["fitted_on"],
        "feedback: 41 labelled answers"
    );
}

fn runner_pids(server: u32) -> Vec<i32> {
    // The runners are grandchildren or deeper; find every process whose ancestry includes the server.
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmd).contains("corral-runner") {
            continue;
        }
        let mut p = pid;
        for _ in 0..10 {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                break;
            };
            let ppid: i32 = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            if ppid == server as i32 {
                out.push(pid);
                break;
            }
            if ppid <= 1 {
                break;
            }
            p = ppid;
        }
    }
    out
}

/// Waits until `/readyz` says the warm runners have loaded.
fn wait_ready(s: &Server) {
    let t = Instant::now();
    loop {
        let (code, _) = call("GET", &format!("{}/readyz", s.url), None, None);
        if code == 200 {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "never ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_runner_loses_no_request_and_a_full_queue_is_429() {
    let s = serve(&config_text(
        "[server.pool]\nrunners = 1\nslots = 1\nqueue_depth = 0\nwarm = [\"smollm2-135m-instruct\"]\n",
    ));
    wait_ready(&s);
    let url = s.url.clone();
    let long = std::thread::spawn(move || {
        let (code, resp) = call(
            "POST",
            &format!("{url}/v1/chat/completions"),
            Some(KEY),
            Some(chat(
                "Write a long story about a dragon who learns to sing.",
                120,
            )),
        );
        (code, resp.into_json::<Value>().unwrap())
    });
    // While it runs, the queue (depth 0) is full.
    std::thread::sleep(Duration::from_millis(400));
    let (code, e, h) = post(&s, "/v1/chat/completions", Some(KEY), chat("hi", 2));
    assert_eq!(code, 429, "{e}");
    assert!(h.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    // Kill the runner mid-answer: the request is retried on a fresh one and completes.
    let pids = runner_pids(s.child.id());
    assert!(!pids.is_empty(), "no runner found");
    for p in &pids {
        // SAFETY: sending a signal to a process we found by its command line.
        unsafe { libc::kill(*p, libc::SIGKILL) };
    }
    let (code, v) = long.join().unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 120);
    let (_, m) = call("GET", &format!("{}/metrics", s.url), None, None);
    let m = m.into_string().unwrap();
    assert!(m.contains("corral_runner_restarts_total{pool=\"smollm2-135m-instruct/secure\",cause=\"failed\"} 1"), "{m}");
    assert!(s.log.lock().unwrap().contains("killed by signal 9"));
}

/// The value of the first metric line starting with `prefix`.
fn metric(s: &Server, prefix: &str) -> Option<f64> {
    let (_, resp) = call("GET", &format!("{}/metrics", s.url), None, None);
    let m = resp.into_string().unwrap();
    m.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn requests_share_a_runner_and_its_crash_mid_batch_loses_none() {
    let s = serve(&config_text(
        "[server.pool]\nrunners = 1\nslots = 4\nqueue_depth = 0\nwarm = [\"smollm2-135m-instruct\"]\n",
    ));
    wait_ready(&s);
    // Greedy continuations of counts: none ends before its 100 tokens.
    let prompts = [
        "1, 2, 3, 4,",
        "100, 101, 102,",
        "5, 10, 15, 20,",
        "2, 4, 6, 8,",
    ];
    let calls: Vec<_> = prompts
        .iter()
        .map(|p| {
            let url = s.url.clone();
            let body = json!({"model": "auto", "temperature": 0, "max_tokens": 100,
                              "prompt": p});
            std::thread::spawn(move || {
                let (code, resp) = call(
                    "POST",
                    &format!("{url}/v1/completions"),
                    Some(KEY),
                    Some(body),
                );
                (code, resp.into_json::<Value>().unwrap())
            })
        })
        .collect();
    // All four are decoded together by the one runner (a queue of depth 0 took them: the
    // runner's free slots count as room) ...
    let t = Instant::now();
    while metric(&s, "corral_runner_sequences{") != Some(4.0) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never four in flight"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... and a fifth is refused: every slot is taken and the queue holds none.
    let (code, e, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("hi", 2));
    assert_eq!(code, 429, "{e}");
    // Kill the runner mid-batch: every request it held is retried on a fresh runner and
    // completes; none is dropped.
    std::thread::sleep(Duration::from_millis(500));
    let pids = runner_pids(s.child.id());
    assert!(!pids.is_empty(), "no runner found");
    for p in &pids {
        // SAFETY: sending a signal to a process we found by its command line.
        unsafe { libc::kill(*p, libc::SIGKILL) };
    }
    for c in calls {
        let (code, v) = c.join().unwrap();
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 100, "{v}");
    }
    let (_, m) = call("GET", &format!("{}/metrics", s.url), None, None);
    let m = m.into_string().unwrap();
    assert!(m.contains("corral_runner_restarts_total{pool=\"smollm2-135m-instruct/secure\",cause=\"failed\"} 1"), "{m}");
}

#[test]
fn a_bad_reload_keeps_the_old_config_and_shutdown_leaves_nothing_behind() {
    let mut s = serve(&config_text(""));
    let (code, _, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    assert_eq!(code, 200);
    assert!(!runner_pids(s.child.id()).is_empty());
    // A broken file: SIGHUP logs the error, the old configuration keeps serving.
    std::fs::write(&s.cfg, "[server\nbind = 1").unwrap();
    Command::new("kill")
        .args(["-HUP", &s.child.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    while !s.log.lock().unwrap().contains("reload failed") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}",
            s.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    assert_eq!(code, 200);
    // The admin endpoint reloads a good file: a new key works, the old one no longer does.
    std::fs::write(
        &s.cfg,
        config_text("").replace(&sha_hex(KEY), &sha_hex("sk-rotated")),
    )
    .unwrap();
    let (code, v, _) = post(&s, "/admin/reload", Some(ADMIN), json!({}));
    assert_eq!(code, 200, "{v}");
    let (code, _, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    assert_eq!(code, 401);
    let (code, _, _) = post(
        &s,
        "/v1/chat/completions",
        Some("sk-rotated"),
        chat("Say hi.", 3),
    );
    assert_eq!(code, 200);
    // SIGTERM with a request in flight: it completes, then the server exits 0 with no runner,
    // process or cgroup left.
    let url = s.url.clone();
    let inflight = std::thread::spawn(move || {
        call(
            "POST",
            &format!("{url}/v1/chat/completions"),
            Some("sk-rotated"),
            Some(chat("Count from one to twenty.", 60)),
        )
        .0
    });
    std::thread::sleep(Duration::from_millis(500));
    // This server's runner cgroups (other tests' servers run beside it).
    let ours: Vec<String> = runner_pids(s.child.id())
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/cgroup")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.rsplit('/').next().map(String::from))
                .collect::<Vec<_>>()
        })
        .filter(|n| !n.is_empty())
        .collect();
    assert!(!ours.is_empty());
    Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(inflight.join().unwrap(), 200);
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", s.log.lock().unwrap());
    assert!(runner_pids(s.child.id()).is_empty());
    for c in sandbox_cgroups() {
        let name = c.file_name().unwrap().to_string_lossy().to_string();
        assert!(!ours.contains(&name), "cgroup {} left behind", c.display());
    }
}

/// Runs `tests/clients/SCRIPT` (the official `openai` Python client; scripts/test.sh installs it
/// and `modules`, and without them this fails rather than skips) against the server, and checks
/// that every line of `checks` was printed.
fn run_client(s: &Server, script: &str, modules: &str, checks: &[&str]) {
    let have = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .status()
        .unwrap();
    assert!(
        have.success(),
        "Python packages missing ({modules}): python3 -m pip install {}",
        modules.replace(',', "")
    );
    let out = Command::new("python3")
        .arg(format!(
            "{}/tests/clients/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args([&s.url, KEY])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log.lock().unwrap()
    );
    for check in checks {
        assert!(stdout.contains(check), "{stdout}");
    }
}

#[test]
fn the_official_openai_python_client_works() {
    let s = serve(&config_text(""));
    run_client(
        &s,
        "openai_client.py",
        "openai",
        &[
            "models ok",
            "chat ok",
            "stream ok",
            "completions ok",
            "auth error ok",
            "unsupported parameter ok",
        ],
    );
}

#[test]
fn the_official_anthropic_python_client_works_on_v1_messages() {
    let s = serve(&config_text(""));
    run_client(
        &s,
        "anthropic_client.py",
        "anthropic",
        &[
            "message ok",
            "stream ok",
            "structured output ok",
            "tool use ok",
            "streamed tool use ok",
            "tool result conversation ok",
            "auth error ok",
            "unknown model ok",
            "unsupported parameter ok",
        ],
    );
}

#[test]
fn tools_through_the_official_openai_client_reach_a_remote_model_and_come_back() {
    let call = json!({
        "id": "x", "object": "chat.completion", "model": "remote-large",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": null,
            "tool_calls": [{"id": "call_7", "type": "function",
                            "function": {"name": "get_weather", "arguments": "{\"city\": \"Lyon\"}"}}]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 9}
    });
    let remote = fake(vec![(200, call.to_string())]);
    let s = serve(&config_text(&format!(
        "[providers.remote]\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodel = \"remote-large\"\nmax_retries = 0\n\
         [routing.llm_fallback]\nproviders = [\"remote\"]\n\
         [[routing.policies]]\nid = \"tools-remote\"\nconditions = {{ capabilities = [\"ToolUse\"] }}\n\
         action = {{ type = \"require_llm\", reason = \"tools go to the large model\" }}\n",
        remote.url
    )));
    run_client(
        &s,
        "openai_tools.py",
        "openai",
        &[
            "tool call ok",
            "streamed tool call ok",
            "tool result conversation ok",
            "malformed tool ok",
        ],
    );
    // The provider saw the tools and, in the follow-up, the call and its result.
    let seen = remote.seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "three requests reached the provider");
    let last: Value = serde_json::from_str(&seen[2].1).unwrap();
    assert_eq!(last["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(last["messages"][2]["tool_call_id"], "call_7");
}

#[test]
fn the_local_model_answers_json_schemas_with_valid_json_through_the_official_client() {
    let s = serve(&config_text(""));
    run_client(
        &s,
        "openai_structured.py",
        "openai, jsonschema",
        &["json_schema ok", "json_object ok", "unsupported keyword ok"],
    );
}

#[test]
fn the_local_model_calls_tools_under_their_schemas_through_the_official_client() {
    let s = serve(&config_text(""));
    run_client(
        &s,
        "openai_local_tools.py",
        "openai, jsonschema",
        &[
            "required ok",
            "parallel ok",
            "named function ok",
            "auto ok",
            "streamed tool call ok",
            "tool result conversation ok",
            "unsupported keyword ok",
        ],
    );
}

#[test]
fn every_request_that_reaches_routing_is_audited_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let audit_dir = dir.path().join("audit");
    let mut s = serve(&config_text(&format!(
        r#"
[audit]
enabled = true
dir = {:?}

[[routing.policies]]
id = "no-secrets"
conditions = {{ metadata = {{ kind = "secret" }} }}
action = {{ type = "deny", reason = "secret projects stay off models" }}
"#,
        audit_dir.display().to_string()
    )));
    let prompt = "What is the capital of Burkina Faso?";
    let (code, v, _) = post(&s, "/v1/chat/completions", Some(KEY), chat(prompt, 8));
    assert_eq!(code, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let rid = v["corral"]["request_id"].as_str().unwrap().to_string();
    let mut denied = chat("Plan the secret launch.", 8);
    denied["metadata"] = json!({"kind": "secret"});
    let (code, e, h) = post(&s, "/v1/chat/completions", Some(KEY), denied);
    assert_eq!(code, 403, "{e}");
    assert_eq!(e["error"]["code"], "policy_denied");
    assert_eq!(h.header("x-corral-route"), Some("deny"));
    Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(s.child.wait().unwrap().success());

    // Nothing of the prompt or the answer is in the files in the clear.
    for f in std::fs::read_dir(&audit_dir).unwrap().flatten() {
        let bytes = std::fs::read(f.path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("Burkina"), "{}", f.path().display());
        assert!(!text.contains("secret launch"), "{}", f.path().display());
        if answer.len() > 8 {
            assert!(!text.contains(&answer), "{}", f.path().display());
        }
    }
    let logs = |args: &[&str]| {
        Command::new(corral())
            .arg("--config")
            .arg(&s.cfg)
            .arg("logs")
            .args(args)
            .arg(&audit_dir)
            .output()
            .unwrap()
    };
    let out = logs(&["verify"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let out = logs(&["decrypt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let entries: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let e0 = entries[0].to_string();
    assert!(
        e0.contains(&rid) && e0.contains("Burkina") && e0.contains("alpha-agent"),
        "{e0}"
    );
    let e1 = entries[1].to_string();
    assert!(
        e1.contains("route_denied") && e1.contains("policy:no-secrets"),
        "{e1}"
    );
}

#[test]
fn a_runner_dying_mid_stream_ends_the_stream_with_an_error_event() {
    use std::io::Read;
    // No fallback chain: the answer streams live, so a failure after the first bytes cannot be
    // retried and must end the stream visibly.
    let s = serve(&config_text(""));
    let mut req = chat("Write a long story about a lighthouse keeper.", 200);
    req["stream"] = json!(true);
    // (ureq directly, to print the server's log if the stream never starts.)
    let resp = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .set("authorization", &format!("Bearer {KEY}"))
        .timeout(Duration::from_secs(120))
        .send_json(req)
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", s.log.lock().unwrap()));
    assert_eq!(resp.status(), 200);
    let mut reader = resp.into_reader();
    let mut body = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until some content has arrived, then kill the runner.
    while !String::from_utf8_lossy(&body).contains("\"content\":\"") || body.len() < 600 {
        let n = reader.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&body)
        );
        body.extend_from_slice(&buf[..n]);
    }
    for p in runner_pids(s.child.id()) {
        // SAFETY: sending a signal to a process we found by its command line.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    reader.read_to_end(&mut body).unwrap();
    let events = sse(&String::from_utf8_lossy(&body));
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("after the answer started streaming"),
        "{last}"
    );
    assert!(!events.iter().any(|e| e == "[DONE]"));
    let (_, m) = call("GET", &format!("{}/metrics", s.url), None, None);
    assert!(m
        .into_string()
        .unwrap()
        .contains("outcome=\"stream_error\"} 1"));
}

/// Watches for the first sandbox the server starts (a child of one of its threads, in a pid
/// namespace of its own) and stops it with SIGSTOP before it can reach `execve`: a runner start
/// stuck in the sandbox's setup. Returns the stopped pid.
fn stop_first_sandbox_of(server: u32) -> std::thread::JoinHandle<Option<i32>> {
    std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            for pid in sandbox_children(&server.to_string()) {
                let exec_d = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("corral-runner"));
                if !exec_d {
                    // SAFETY: stops a process of the server under test.
                    unsafe { libc::kill(pid, libc::SIGSTOP) };
                    return Some(pid);
                }
            }
        }
        None
    })
}

/// Starts `corral serve` with `toml` (a lazy pool) and makes its first runner start hang: a
/// watcher stops the sandbox's first process before `execve` while `first_request` runs. The
/// watcher races a ~10 ms launch, so a start it missed is retried with a fresh server.
fn serve_with_a_stuck_first_start(
    toml: &str,
    first_request: impl Fn(String) + Send + Clone + 'static,
) -> (Server, i32, std::thread::JoinHandle<()>) {
    for _ in 0..8 {
        let s = serve(toml);
        let watcher = stop_first_sandbox_of(s.child.id());
        std::thread::sleep(Duration::from_millis(50));
        let req = first_request.clone();
        let url = s.url.clone();
        let client = std::thread::spawn(move || req(url));
        if let Some(stopped) = watcher.join().unwrap() {
            return (s, stopped, client);
        }
        let _ = client.join();
    }
    panic!("the watcher never caught a runner's sandbox before execve in 8 servers");
}

#[test]
fn a_stuck_runner_start_fails_at_the_deadline_and_sigterm_never_waits_for_it() {
    // 1. A runner start held before execve fails at the 1 s deadline naming the step, is
    //    counted, and the request is retried on a fresh runner: the caller is answered.
    let (s, stopped, client) = serve_with_a_stuck_first_start(
        &config_text("[sandbox]\nlaunch_timeout_seconds = 1\n"),
        |url| {
            let (code, r) = call(
                "POST",
                &format!("{url}/v1/chat/completions"),
                Some(KEY),
                Some(chat("Say hi.", 3)),
            );
            assert_eq!(code, 200, "{}", r.into_string().unwrap_or_default());
        },
    );
    client
        .join()
        .expect("the request behind the stuck start was not answered");
    {
        let log = s.log.lock().unwrap();
        assert!(
            log.contains("runner failed to start")
                && log.contains("sandbox launch timed out after"),
            "{log}"
        );
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{stopped}")).exists(),
        "the stuck sandbox {stopped} was not killed"
    );
    let (_, resp) = call("GET", &format!("{}/metrics", s.url), None, None);
    let metrics = resp.into_string().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("corral_runner_start_failures_total{") && l.ends_with(" 1")),
        "{metrics}"
    );
    drop(s);

    // 2. A start stuck far longer than the shutdown grace: SIGTERM still ends the server within
    //    grace + margin, killing the stuck sandbox and removing its cgroups.
    let (mut s, stopped, client) = serve_with_a_stuck_first_start(
        &config_text("[sandbox]\nlaunch_timeout_seconds = 120\n")
            .replace("shutdown_grace_seconds = 10", "shutdown_grace_seconds = 1"),
        |url| {
            // Answered with an error or cut off by the shutdown: either way it returns.
            let _ = ureq::post(&format!("{url}/v1/chat/completions"))
                .set("authorization", &format!("Bearer {KEY}"))
                .timeout(Duration::from_secs(60))
                .send_json(chat("Say hi.", 3));
        },
    );
    let server = s.child.id();
    let t = Instant::now();
    while cgroups_of_server(server).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no cgroup for the stuck start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let status = sigterm_and_wait(&mut s, Duration::from_secs(15));
    assert!(status.success(), "{status:?}: {}", s.log.lock().unwrap());
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "shutdown took {:?} (grace 1 s + 2 s margin)",
        t.elapsed()
    );
    client.join().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{stopped}")).exists(),
        "the stuck sandbox {stopped} outlived the server"
    );
    assert_eq!(
        cgroups_of_server(server),
        Vec::<PathBuf>::new(),
        "cgroups left behind"
    );
}

/// Sandbox cgroup directories of the server with this pid (`<pid>-<start time>-<n>`).
fn cgroups_of_server(pid: u32) -> Vec<PathBuf> {
    sandbox_cgroups()
        .into_iter()
        .filter(|c| {
            c.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pid}-")))
        })
        .collect()
}

fn wait_for_log(s: &Server, text: &str, within: Duration) {
    let t = Instant::now();
    while !s.log.lock().unwrap().contains(text) {
        assert!(
            t.elapsed() < within,
            "'{text}' not logged within {within:?}: {}",
            s.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm_and_wait(s: &mut Server, within: Duration) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            return st;
        }
        assert!(
            t.elapsed() < within,
            "SIGTERM did not end the server within {within:?}: {}",
            s.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_right_after_a_reload_leaves_no_runner_or_cgroup_and_a_bind_change_is_named() {
    let mut s = serve(&config_text(""));
    let (code, _, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    assert_eq!(code, 200);
    assert!(!cgroups_of_server(s.child.id()).is_empty());
    // A reload that also moves the listening address: the old generation's pool retires, the
    // answer says the address needs a restart.
    std::fs::write(
        &s.cfg,
        config_text("").replace("127.0.0.1:0", "127.0.0.1:9"),
    )
    .unwrap();
    let (code, v, _) = post(&s, "/admin/reload", Some(ADMIN), json!({}));
    assert_eq!(code, 200, "{v}");
    let needed = v["restart_needed"].to_string();
    assert!(needed.contains("server.bind"), "{v}");
    // At once SIGTERM: the retiring generation's runner is stopped and its cgroups removed
    // before the server exits.
    let server = s.child.id();
    let status = sigterm_and_wait(&mut s, Duration::from_secs(20));
    assert!(status.success(), "{status:?}: {}", s.log.lock().unwrap());
    assert!(runner_pids(server).is_empty());
    assert_eq!(
        cgroups_of_server(server),
        Vec::<PathBuf>::new(),
        "cgroups left behind"
    );
}

#[test]
fn a_fifo_or_a_device_at_the_config_path_cannot_wedge_reload_or_shutdown() {
    let mut s = serve(&config_text(""));
    // A FIFO: opening it would block until a writer comes.
    std::fs::remove_file(&s.cfg).unwrap();
    let c = std::ffi::CString::new(s.cfg.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a C string we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    Command::new("kill")
        .args(["-HUP", &s.child.id().to_string()])
        .status()
        .unwrap();
    wait_for_log(&s, "not a regular file", Duration::from_secs(5));
    let t = Instant::now();
    let (code, v, _) = post(&s, "/admin/reload", Some(ADMIN), json!({}));
    assert_eq!(code, 400, "{v}");
    assert!(v.to_string().contains("not a regular file"), "{v}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // /dev/zero behind a symlink: refused without reading it (the server does not grow).
    std::fs::remove_file(&s.cfg).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &s.cfg).unwrap();
    let (code, v, _) = post(&s, "/admin/reload", Some(ADMIN), json!({}));
    assert_eq!(code, 400, "{v}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(rss_kb < 512 * 1024, "the server grew to {rss_kb} kB");
    // A huge regular file: refused by size.
    std::fs::remove_file(&s.cfg).unwrap();
    std::fs::write(&s.cfg, vec![b'#'; 5 * 1024 * 1024]).unwrap();
    let (code, v, _) = post(&s, "/admin/reload", Some(ADMIN), json!({}));
    assert_eq!(code, 400, "{v}");
    assert!(v.to_string().contains("larger than"), "{v}");
    // The old configuration still serves, and SIGTERM ends the server at once.
    let (code, _) = call("GET", &format!("{}/healthz", s.url), None, None);
    assert_eq!(code, 200);
    let status = sigterm_and_wait(&mut s, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_prompt_longer_than_the_context_is_the_callers_400_and_the_runner_stays() {
    let s = serve(&config_text(""));
    let (code, _, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    assert_eq!(code, 200);
    let before = runner_pids(s.child.id());
    assert_eq!(before.len(), 1);
    let t = Instant::now();
    let (code, v, _) = post(
        &s,
        "/v1/chat/completions",
        Some(KEY),
        chat(&"fox ".repeat(5000), 8),
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("tokens") && msg.contains("context holds"),
        "{v}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    // The same runner answers the next request at once: no restart, no backoff.
    let t = Instant::now();
    let (code, _, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    assert_eq!(code, 200);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(runner_pids(s.child.id()), before, "the runner was replaced");
    let (_, resp) = call("GET", &format!("{}/metrics", s.url), None, None);
    let metrics = resp.into_string().unwrap();
    assert!(
        !metrics.contains("corral_runner_restarts_total{"),
        "a refused request restarted the runner: {metrics}"
    );
}

#[test]
fn a_client_that_goes_away_cancels_its_generation_and_frees_the_runner() {
    let s = serve(&config_text(
        "[server.pool]\nrunners = 1\nslots = 1\nwarm = [\"smollm2-135m-instruct\"]\n",
    ));
    let (code, _, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    assert_eq!(code, 200);
    // A long streamed answer whose client reads a little and hangs up. (A greedy continuation
    // of a count: a sampled chat answer sometimes ends within a second, and then there is
    // nothing left to cancel.)
    let body = json!({"model": "auto", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
                      "temperature": 0, "max_tokens": 3000, "stream": true});
    let resp = ureq::post(&format!("{}/v1/completions", s.url))
        .set("authorization", &format!("Bearer {KEY}"))
        .timeout(Duration::from_secs(60))
        .send_json(body)
        .unwrap();
    let mut reader = resp.into_reader();
    let mut buf = [0u8; 2048];
    let mut seen = 0;
    while seen < 600 {
        let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
        assert!(n > 0, "the stream ended before the client hung up");
        seen += n;
    }
    drop(reader);
    // The runner is told to stop: the next request does not wait for 3000 tokens.
    wait_for_log(&s, "generation cancelled", Duration::from_secs(10));
    let t = Instant::now();
    let (code, _, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    assert_eq!(code, 200);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the next request waited {:?}",
        t.elapsed()
    );
    // A request that runs past server.request_timeout_seconds is cancelled too.
    let mut s2_cfg = config_text("[server.pool]\nrunners = 1\nslots = 1\n");
    s2_cfg = s2_cfg.replace("[server]\n", "[server]\nrequest_timeout_seconds = 2\n");
    let s2 = serve(&s2_cfg);
    let long = json!({"model": "auto", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
                      "temperature": 0, "max_tokens": 3000});
    let (code, v, _) = post(&s2, "/v1/completions", Some(KEY), long);
    assert_eq!(code, 504, "{v}");
    wait_for_log(&s2, "generation cancelled", Duration::from_secs(10));
    // One still in its prefill is not left computing: the runner honours the cancel between
    // prefill chunks (512 tokens), or, when a chunk outlasts the grace, is killed and
    // replaced; either way the next caller is served at once.
    let (code, v, _) = post(
        &s2,
        "/v1/chat/completions",
        Some(KEY),
        chat(&"fox ".repeat(1500), 8),
    );
    assert_eq!(code, 504, "{v}");
    let t = Instant::now();
    loop {
        let log = s2.log.lock().unwrap().clone();
        if log.contains("cancelled generation: runner replaced")
            || log.matches("generation cancelled").count() >= 2
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the cancelled prefill went on: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let (code, _, _) = post(&s2, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    assert_eq!(code, 200);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the next request waited {:?}",
        t.elapsed()
    );
}

#[test]
fn callers_that_gave_up_free_their_queue_places_and_the_queue_timeout_fires_on_time() {
    let s = serve(&config_text(
        "[server.pool]\nrunners = 1\nslots = 1\nqueue_depth = 2\nqueue_timeout_seconds = 3\nwarm = [\"smollm2-135m-instruct\"]\n",
    ));
    let (code, _, _) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    assert_eq!(code, 200);
    // The only runner is busy with a long answer (streamed, so we know when it is running).
    let url = s.url.clone();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = ureq::post(&format!("{url}/v1/completions"))
            .set("authorization", &format!("Bearer {KEY}"))
            .timeout(Duration::from_secs(120))
            .send_json(
                json!({"model": "auto", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
                              "temperature": 0, "max_tokens": 3000, "stream": true}),
            );
        if let Ok(r) = r {
            let mut reader = r.into_reader();
            let mut buf = [0u8; 256];
            let _ = std::io::Read::read(&mut reader, &mut buf);
            let _ = started_tx.send(());
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        }
    });
    started_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the long answer never started");
    // Two callers queue behind it and give up after a second each.
    let givers: Vec<_> = (0..2)
        .map(|_| {
            let url = s.url.clone();
            std::thread::spawn(move || {
                ureq::post(&format!("{url}/v1/chat/completions"))
                    .set("authorization", &format!("Bearer {KEY}"))
                    .timeout(Duration::from_secs(1))
                    .send_json(chat("Say hi.", 3))
                    .is_err()
            })
        })
        .collect();
    for g in givers {
        assert!(
            g.join().unwrap(),
            "a caller was answered while the runner was busy"
        );
    }
    // Their places are freed as soon as the server sees them gone (hyper notices the closed
    // connections, the handlers are dropped and their pipeline tasks aborted): within moments.
    let t = Instant::now();
    loop {
        let (_, resp) = call("GET", &format!("{}/metrics", s.url), None, None);
        let metrics = resp.into_string().unwrap();
        let depth = metrics
            .lines()
            .find(|l| l.starts_with("corral_queue_depth{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if depth == Some(0.0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the queue places of callers that gave up were not freed: {depth:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next caller is queued (not refused as 'queue is full') and gets its 429 when its own
    // 3 s are up, though the runner is still busy.
    let t = Instant::now();
    let (code, v, headers) = post(&s, "/v1/chat/completions", Some(KEY), chat("Say hi.", 3));
    let waited = t.elapsed();
    assert_eq!(code, 429, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("timed out waiting"), "{v}");
    assert!(headers.header("retry-after").is_some());
    assert!(
        waited >= Duration::from_millis(2800) && waited < Duration::from_secs(8),
        "the queue timeout of 3 s fired after {waited:?}"
    );
}

#[test]
fn a_callers_repeated_system_prompt_is_reused_and_not_another_callers() {
    let beta = "sk-test-beta";
    let s = serve(&config_text(&format!(
        "[server.auth.keys.beta]\nsha256 = \"{}\"\nagent = \"beta-agent\"\n",
        sha_hex(beta)
    )));
    let system = "You answer questions about the ports of the North Sea, briefly. ".repeat(20);
    let ask = |q: &str| {
        json!({"model": "auto", "temperature": 0, "max_tokens": 4, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": q}]})
    };
    let cached = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let (code, first, _) = post(
        &s,
        "/v1/chat/completions",
        Some(KEY),
        ask("Which port is largest?"),
    );
    assert_eq!(code, 200, "{first}");
    assert_eq!(cached(&first), 0);
    let (_, second, _) = post(
        &s,
        "/v1/chat/completions",
        Some(KEY),
        ask("Which port is oldest?"),
    );
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached(&second) * 10 > prompt * 8, "{second}");
    // Another key sends the very same request: nothing of alpha's is reused.
    let (_, other, _) = post(
        &s,
        "/v1/chat/completions",
        Some(beta),
        ask("Which port is oldest?"),
    );
    assert_eq!(cached(&other), 0, "{other}");
    // Anthropic's shape counts the reused tokens apart.
    let body = json!({"model": "auto", "max_tokens": 4, "system": system,
                      "messages": [{"role": "user", "content": "Which port is busiest?"}]});
    let (code, m, _) = post(&s, "/v1/messages", Some(beta), body);
    assert_eq!(code, 200, "{m}");
    let read = m["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert!(
        read > 0 && m["usage"]["input_tokens"].as_u64().unwrap() < read,
        "{m}"
    );
}
