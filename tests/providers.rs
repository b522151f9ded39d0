//! Remote providers over real HTTP on loopback: each test starts a tiny HTTP/1.1 server that
//! records the requests it receives and answers with a scripted sequence of replies, then checks
//! what corral sent, what it made of the answers, and when it retried, gave up, or stopped
//! calling.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use corral::providers::{
    BreakerState, Chain, ChatRequest, Delta, Message, Provider, ProviderConfig, ProviderError,
    ProviderKind,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// The loopback server.

/// One scripted answer.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    /// How long the server waits before answering.
    delay: Duration,
    /// A streamed body instead: each part written after its wait, the connection closed after
    /// the last (no content-length).
    events: Option<Vec<(Duration, String)>>,
}

impl Reply {
    fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string(),
            delay: Duration::ZERO,
            events: None,
        }
    }

    /// A `text/event-stream` answer of these parts, each written after its wait.
    fn sse(events: Vec<(Duration, String)>) -> Reply {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            body: String::new(),
            delay: Duration::ZERO,
            events: Some(events),
        }
    }

    fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn delayed(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// One request as the server received it; header names lowercased.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("request body is JSON")
    }
}

struct Server {
    /// `http://127.0.0.1:PORT`
    url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// Streamed answers the client closed: the index of the part whose write failed, and when.
    broken: Arc<Mutex<Vec<(usize, Instant)>>>,
}

impl Server {
    /// Listens on an ephemeral loopback port and answers the n-th request with `script[n]`
    /// (a 500 saying so once the script is used up). Each connection gets its own thread so a
    /// delayed reply does not hold up the next request.
    fn start(script: Vec<Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let recorded = Arc::clone(&requests);
        let broken = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::clone(&broken);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let recorded = Arc::clone(&recorded);
                let script = Arc::clone(&script);
                let closed = Arc::clone(&closed);
                thread::spawn(move || serve_one(stream, &recorded, &script, &closed));
            }
        });
        Server {
            url,
            requests,
            broken,
        }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Waits (at most 2 s) until `n` requests have arrived: a client that gave up on a slow
    /// reply may return before the server thread has finished recording.
    fn wait_for(&self, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.count() < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        self.count()
    }
}

fn serve_one(
    stream: TcpStream,
    recorded: &Mutex<Vec<Recorded>>,
    script: &Mutex<VecDeque<Reply>>,
    broken: &Mutex<Vec<(usize, Instant)>>,
) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    recorded.lock().unwrap().push(Recorded {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let reply = script.lock().unwrap().pop_front().unwrap_or_else(|| {
        Reply::json(
            500,
            json!({"error": {"message": "test server: no scripted reply left"}}),
        )
    });
    thread::sleep(reply.delay);
    let mut out = format!("HTTP/1.1 {} Scripted\r\n", reply.status);
    for (name, value) in &reply.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    let mut stream = stream;
    if let Some(events) = reply.events {
        out.push_str("connection: close\r\n\r\n");
        if stream.write_all(out.as_bytes()).is_err() {
            return;
        }
        for (i, (wait, part)) in events.iter().enumerate() {
            thread::sleep(*wait);
            if stream
                .write_all(part.as_bytes())
                .and_then(|()| stream.flush())
                .is_err()
            {
                broken.lock().unwrap().push((i, Instant::now()));
                return;
            }
        }
        return;
    }
    out.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n{}",
        reply.body.len(),
        reply.body
    ));
    // The client may have given up (timeout tests): a failed write is expected then.
    let _ = stream.write_all(out.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// A config for `server` with test-sized timings: 2 s timeout, 2 retries, 1 ms backoff.
fn config(kind: ProviderKind, server: &Server) -> ProviderConfig {
    let base_url = match kind {
        ProviderKind::Openai => format!("{}/v1", server.url),
        ProviderKind::Anthropic => server.url.clone(),
    };
    let mut cfg = ProviderConfig::new(kind, base_url, "test-model");
    cfg.timeout_ms = 2000;
    cfg.backoff_ms = 1;
    cfg
}

/// Sets a process-unique environment variable to `value` and returns its name.
fn key_env(test: &str, value: &str) -> String {
    let name = format!(
        "CORRAL_TEST_KEY_{}_{}",
        test.to_uppercase(),
        std::process::id()
    );
    std::env::set_var(&name, value);
    name
}

fn ask(prompt: &str) -> ChatRequest {
    ChatRequest {
        messages: vec![Message::new("user", prompt)],
        ..ChatRequest::default()
    }
}

fn openai_ok(text: &str) -> Reply {
    Reply::json(
        200,
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-test-2025",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
        }),
    )
}

fn anthropic_ok(text: &str) -> Reply {
    Reply::json(
        200,
        json!({
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 5, "output_tokens": 1}
        }),
    )
}

fn openai_error(status: u16, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"error": {"message": message, "type": "server_error", "code": null}}),
    )
}

// ---------------------------------------------------------------------------------------------
// Wire formats.

#[test]
fn openai_request_carries_key_model_and_messages_and_logprobs_come_back() {
    let server = Server::start(vec![Reply::json(
        200,
        json!({
            "model": "gpt-test-2025",
            "choices": [{
                "message": {"role": "assistant", "content": "Paris."},
                "finish_reason": "length",
                "logprobs": {"content": [
                    {"token": "Paris", "logprob": -0.125, "bytes": [80], "top_logprobs": []},
                    {"token": ".", "logprob": -2.5, "bytes": [46], "top_logprobs": []}
                ]}
            }],
            "usage": {"prompt_tokens": 21, "completion_tokens": 2}
        }),
    )]);
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.api_key_env = Some(key_env("openai_ok", "sk-test-123"));
    let provider = Provider::new("oa", cfg);
    let req = ChatRequest {
        messages: vec![
            Message::new("system", "Answer briefly."),
            Message::new("user", "Capital of France?"),
        ],
        max_tokens: Some(2),
        temperature: Some(0.5),
        stop: vec!["\n".into()],
        logprobs: true,
        user: Some("agent-7".into()),
        ..ChatRequest::default()
    };

    let r = provider.complete(&req).unwrap();

    assert_eq!(r.provider, "oa");
    assert_eq!(r.model, "gpt-test-2025");
    assert_eq!(r.text, "Paris.");
    assert_eq!(r.finish_reason, "length");
    assert_eq!(r.usage.prompt_tokens, 21);
    assert_eq!(r.usage.completion_tokens, 2);
    assert_eq!(r.token_logprobs, Some(vec![-0.125, -2.5]));
    assert_eq!(r.attempts, 1);
    assert!(r.latency_ms > 0.0);

    let sent = server.requests();
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    assert_eq!(s.method, "POST");
    assert_eq!(s.path, "/v1/chat/completions");
    assert_eq!(s.header("authorization"), Some("Bearer sk-test-123"));
    assert_eq!(s.header("content-type"), Some("application/json"));
    assert_eq!(
        s.json(),
        json!({
            "model": "test-model",
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Capital of France?"}
            ],
            "max_tokens": 2,
            "temperature": 0.5,
            "stop": ["\n"],
            "user": "agent-7",
            "logprobs": true,
            "top_logprobs": 0
        })
    );
}

#[test]
fn a_local_openai_server_gets_no_authorization_and_the_default_max_tokens() {
    let server = Server::start(vec![Reply::json(
        200,
        json!({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}),
    )]);
    let provider = Provider::new("local", config(ProviderKind::Openai, &server));

    let r = provider.complete(&ask("hello")).unwrap();

    // No usage and no model in the answer: zeros and the configured model.
    assert_eq!(r.text, "hi");
    assert_eq!(r.model, "test-model");
    assert_eq!((r.usage.prompt_tokens, r.usage.completion_tokens), (0, 0));
    assert_eq!(r.token_logprobs, None);
    let s = &server.requests()[0];
    assert_eq!(s.header("authorization"), None);
    let body = s.json();
    assert_eq!(body["max_tokens"], 1024);
    assert!(body.get("logprobs").is_none(), "{body}");
    assert!(body.get("stop").is_none(), "{body}");
}

#[test]
fn anthropic_request_hoists_system_and_sends_its_headers() {
    let server = Server::start(vec![Reply::json(
        200,
        json!({
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-test-20250101",
            "content": [
                {"type": "text", "text": "Bonjour"},
                {"type": "tool_use", "id": "t1", "name": "noop", "input": {}},
                {"type": "text", "text": " le monde"}
            ],
            "stop_reason": "max_tokens",
            "stop_sequence": null,
            "usage": {"input_tokens": 14, "output_tokens": 3}
        }),
    )]);
    let mut cfg = config(ProviderKind::Anthropic, &server);
    cfg.api_key_env = Some(key_env("anthropic_ok", "sk-ant-test"));
    let provider = Provider::new("claude", cfg);
    let req = ChatRequest {
        messages: vec![
            Message::new("system", "You translate."),
            Message::new("user", "Hello world"),
            Message::new("assistant", "Into which language?"),
            Message::new("system", "Always French."),
            Message::new("user", "French"),
        ],
        stop: vec!["END".into()],
        logprobs: true,
        ..ChatRequest::default()
    };

    let r = provider.complete(&req).unwrap();

    assert_eq!(r.provider, "claude");
    assert_eq!(r.model, "claude-test-20250101");
    assert_eq!(r.text, "Bonjour le monde");
    assert_eq!(r.finish_reason, "length");
    assert_eq!(r.usage.prompt_tokens, 14);
    assert_eq!(r.usage.completion_tokens, 3);
    assert_eq!(r.token_logprobs, None, "Anthropic has no logprobs");

    let s = &server.requests()[0];
    assert_eq!(s.path, "/v1/messages");
    assert_eq!(s.header("x-api-key"), Some("sk-ant-test"));
    assert_eq!(s.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(s.header("content-type"), Some("application/json"));
    assert_eq!(s.header("authorization"), None);
    assert_eq!(
        s.json(),
        json!({
            "model": "test-model",
            "max_tokens": 1024,
            "system": "You translate.\n\nAlways French.",
            "messages": [
                {"role": "user", "content": "Hello world"},
                {"role": "assistant", "content": "Into which language?"},
                {"role": "user", "content": "French"}
            ],
            "stop_sequences": ["END"]
        })
    );
}

#[test]
fn a_success_status_with_garbage_is_an_unreadable_response() {
    let server = Server::start(vec![Reply {
        status: 200,
        headers: vec![("content-type".into(), "text/html".into())],
        body: "<html>login page</html>".into(),
        delay: Duration::ZERO,
        events: None,
    }]);
    let provider = Provider::new("oa", config(ProviderKind::Openai, &server));

    let err = provider.complete(&ask("hi")).unwrap_err();

    assert!(matches!(err, ProviderError::BadResponse { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("provider oa: unreadable response: "),
        "{message}"
    );
    assert!(message.contains("<html>login page"), "{message}");
    assert_eq!(server.count(), 1, "a garbled answer is not retried");
}

// ---------------------------------------------------------------------------------------------
// Retries.

#[test]
fn a_429_with_retry_after_zero_is_retried_once_then_succeeds() {
    let server = Server::start(vec![
        openai_error(429, "Rate limit reached").header("retry-after", "0"),
        openai_ok("done"),
    ]);
    let provider = Provider::new("oa", config(ProviderKind::Openai, &server));

    let r = provider.complete(&ask("hi")).unwrap();

    assert_eq!(r.text, "done");
    assert_eq!(r.attempts, 2);
    assert_eq!(server.count(), 2);
    assert_eq!(provider.breaker_state(), BreakerState::Closed);
}

#[test]
fn retry_after_seconds_are_waited_out() {
    let server = Server::start(vec![
        openai_error(429, "slow down").header("retry-after", "1"),
        openai_ok("done"),
    ]);
    // The backoff alone would wait at most 1 ms.
    let provider = Provider::new("oa", config(ProviderKind::Openai, &server));

    let t0 = Instant::now();
    let r = provider.complete(&ask("hi")).unwrap();

    assert_eq!(r.attempts, 2);
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "retried after {:?}",
        t0.elapsed()
    );
    assert!(r.latency_ms >= 1000.0, "latency {}", r.latency_ms);
}

#[test]
fn server_errors_500_and_529_are_retried() {
    let server = Server::start(vec![
        openai_error(500, "internal error"),
        Reply::json(
            529,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ),
        anthropic_ok("finally"),
    ]);
    let provider = Provider::new("claude", config(ProviderKind::Anthropic, &server));

    let r = provider.complete(&ask("hi")).unwrap();

    assert_eq!(r.text, "finally");
    assert_eq!(r.finish_reason, "stop");
    assert_eq!(r.attempts, 3);
    assert_eq!(server.count(), 3);
}

#[test]
fn retries_stop_at_max_retries_and_report_the_last_status() {
    let server = Server::start(vec![
        openai_error(503, "down 1"),
        openai_error(503, "down 2"),
        openai_error(502, "down 3"),
        openai_ok("too late"),
    ]);
    let provider = Provider::new("oa", config(ProviderKind::Openai, &server));

    let err = provider.complete(&ask("hi")).unwrap_err();

    assert_eq!(err.to_string(), "provider oa: http status 502: down 3");
    assert!(err.retryable());
    assert_eq!(
        server.count(),
        3,
        "first attempt and max_retries = 2 retries"
    );
}

#[test]
fn a_400_is_not_retried_and_reports_the_providers_message() {
    let server = Server::start(vec![
        Reply::json(
            400,
            json!({"error": {
                "message": "'messages' must contain at least one message",
                "type": "invalid_request_error",
                "param": "messages",
                "code": null
            }}),
        ),
        openai_ok("never sent"),
    ]);
    let provider = Provider::new("oa", config(ProviderKind::Openai, &server));

    let err = provider.complete(&ChatRequest::default()).unwrap_err();

    assert_eq!(
        err.to_string(),
        "provider oa: http status 400: 'messages' must contain at least one message"
    );
    assert_eq!(err.provider(), "oa");
    assert!(!err.retryable());
    assert_eq!(server.count(), 1);
}

#[test]
fn caller_errors_do_not_open_the_circuit() {
    let server = Server::start(vec![
        openai_error(401, "Incorrect API key provided"),
        openai_error(401, "Incorrect API key provided"),
        openai_ok("ok"),
    ]);
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.breaker_failures = 1;
    let provider = Provider::new("oa", cfg);

    for _ in 0..2 {
        let err = provider.complete(&ask("hi")).unwrap_err();
        assert_eq!(err.status(), Some(401));
    }
    assert_eq!(provider.breaker_state(), BreakerState::Closed);
    assert_eq!(provider.complete(&ask("hi")).unwrap().text, "ok");
    assert_eq!(server.count(), 3);
}

#[test]
fn a_slow_provider_times_out_at_timeout_ms_and_is_retried() {
    let server = Server::start(vec![
        openai_ok("late").delayed(Duration::from_secs(3)),
        openai_ok("late").delayed(Duration::from_secs(3)),
    ]);
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.timeout_ms = 100;
    cfg.max_retries = 1;
    let provider = Provider::new("slow", cfg);

    let t0 = Instant::now();
    let err = provider.complete(&ask("hi")).unwrap_err();
    let elapsed = t0.elapsed();

    assert!(
        matches!(err, ProviderError::Timeout { ref provider, ms: 100 } if provider == "slow"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "provider slow: timed out after 100 ms");
    assert!(
        elapsed < Duration::from_millis(1500),
        "gave up after {elapsed:?}, not after two 100 ms attempts"
    );
    assert_eq!(server.wait_for(2), 2, "a timeout is retried");
}

#[test]
fn a_refused_connection_is_a_transport_error() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = ProviderConfig::new(
        ProviderKind::Openai,
        format!("http://127.0.0.1:{port}/v1"),
        "m",
    );
    cfg.max_retries = 1;
    cfg.backoff_ms = 1;
    let provider = Provider::new("gone", cfg);

    let err = provider.complete(&ask("hi")).unwrap_err();

    assert!(matches!(err, ProviderError::Transport { .. }), "{err:?}");
    assert!(err.to_string().starts_with("provider gone: "), "{err}");
    assert!(err.retryable());
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker.

#[test]
fn the_breaker_opens_stops_calling_then_a_half_open_trial_closes_it() {
    let server = Server::start(vec![
        openai_error(500, "boom"),
        openai_error(500, "boom"),
        openai_ok("recovered"),
        openai_ok("business as usual"),
    ]);
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.max_retries = 0;
    cfg.breaker_failures = 2;
    cfg.breaker_cooldown_ms = 300;
    let provider = Provider::new("oa", cfg);

    for _ in 0..2 {
        assert_eq!(
            provider.complete(&ask("hi")).unwrap_err().status(),
            Some(500)
        );
    }
    assert!(matches!(
        provider.breaker_state(),
        BreakerState::Open { retry_in_ms } if retry_in_ms <= 300
    ));

    // While open: refused without a request.
    let err = provider.complete(&ask("hi")).unwrap_err();
    match &err {
        ProviderError::CircuitOpen {
            provider,
            failures,
            retry_in_ms,
        } => {
            assert_eq!(provider, "oa");
            assert_eq!(*failures, 2);
            assert!(*retry_in_ms <= 300, "{retry_in_ms}");
        }
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
    assert!(err
        .to_string()
        .contains("circuit open after 2 consecutive failures"));
    assert!(!err.retryable());
    assert_eq!(server.count(), 2, "no request while the circuit is open");

    // After the cooldown one trial goes through, succeeds, and closes the circuit.
    thread::sleep(Duration::from_millis(350));
    assert_eq!(provider.breaker_state(), BreakerState::HalfOpen);
    assert_eq!(provider.complete(&ask("hi")).unwrap().text, "recovered");
    assert_eq!(provider.breaker_state(), BreakerState::Closed);
    assert_eq!(
        provider.complete(&ask("hi")).unwrap().text,
        "business as usual"
    );
    assert_eq!(server.count(), 4);
}

#[test]
fn a_failed_half_open_trial_is_one_attempt_and_reopens_the_circuit() {
    let server = Server::start(vec![
        openai_error(503, "down"),
        openai_error(503, "still down"),
        openai_ok("never reached"),
    ]);
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.max_retries = 0;
    cfg.breaker_failures = 1;
    cfg.breaker_cooldown_ms = 200;
    let provider = Provider::new("oa", cfg);
    provider.complete(&ask("hi")).unwrap_err();
    thread::sleep(Duration::from_millis(250));

    let err = provider.complete(&ask("hi")).unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert!(
        matches!(provider.breaker_state(), BreakerState::Open { .. }),
        "{:?}",
        provider.breaker_state()
    );
    assert!(matches!(
        provider.complete(&ask("hi")).unwrap_err(),
        ProviderError::CircuitOpen { failures: 2, .. }
    ));
    assert_eq!(server.count(), 2);
}

#[test]
fn a_half_open_trial_is_not_retried() {
    let server = Server::start(vec![
        openai_error(500, "down"),
        openai_error(500, "down"),
        openai_error(500, "down"),
        openai_error(500, "trial fails"),
        openai_ok("a retry of the trial would get this"),
    ]);
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.max_retries = 2;
    cfg.breaker_failures = 1;
    cfg.breaker_cooldown_ms = 200;
    let provider = Provider::new("oa", cfg);
    // First request: 3 attempts, one breaker failure, circuit opens.
    provider.complete(&ask("hi")).unwrap_err();
    assert_eq!(server.count(), 3);
    assert!(matches!(
        provider.breaker_state(),
        BreakerState::Open { .. }
    ));
    thread::sleep(Duration::from_millis(250));

    let err = provider.complete(&ask("hi")).unwrap_err();

    assert_eq!(err.to_string(), "provider oa: http status 500: trial fails");
    assert_eq!(server.count(), 4, "the trial is a single attempt");
    assert!(matches!(
        provider.breaker_state(),
        BreakerState::Open { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Fallback chains and keys.

#[test]
fn the_chain_falls_back_to_the_second_provider() {
    let first = Server::start(vec![openai_error(500, "primary down")]);
    let second = Server::start(vec![anthropic_ok("from the backup")]);
    let mut a = config(ProviderKind::Openai, &first);
    a.max_retries = 0;
    let chain = Chain::new(vec![
        Arc::new(Provider::new("primary", a)),
        Arc::new(Provider::new(
            "backup",
            config(ProviderKind::Anthropic, &second),
        )),
    ]);

    let r = chain.complete(&ask("hi")).unwrap();

    assert_eq!(r.provider, "backup");
    assert_eq!(r.text, "from the backup");
    assert_eq!(first.count(), 1);
    assert_eq!(second.count(), 1);
}

#[test]
fn the_chain_skips_a_provider_whose_circuit_is_open() {
    let first = Server::start(vec![openai_error(500, "primary down")]);
    let second = Server::start(vec![openai_ok("one"), openai_ok("two")]);
    let mut a = config(ProviderKind::Openai, &first);
    a.max_retries = 0;
    a.breaker_failures = 1;
    let primary = Arc::new(Provider::new("primary", a));
    let chain = Chain::new(vec![
        Arc::clone(&primary),
        Arc::new(Provider::new(
            "backup",
            config(ProviderKind::Openai, &second),
        )),
    ]);

    assert_eq!(chain.complete(&ask("hi")).unwrap().text, "one");
    assert!(matches!(primary.breaker_state(), BreakerState::Open { .. }));
    assert_eq!(chain.complete(&ask("hi")).unwrap().text, "two");

    assert_eq!(first.count(), 1, "the open circuit was not called again");
    assert_eq!(second.count(), 2);
}

#[test]
fn when_every_provider_fails_the_chain_reports_each() {
    let first = Server::start(vec![openai_error(500, "primary down")]);
    let second = Server::start(vec![openai_error(404, "model not found")]);
    let mut a = config(ProviderKind::Openai, &first);
    a.max_retries = 0;
    let chain = Chain::new(vec![
        Arc::new(Provider::new("primary", a)),
        Arc::new(Provider::new(
            "backup",
            config(ProviderKind::Openai, &second),
        )),
    ]);

    let err = chain.complete(&ask("hi")).unwrap_err();

    assert_eq!(err.errors.len(), 2);
    assert_eq!(
        err.to_string(),
        "every provider failed: provider primary: http status 500: primary down; \
         provider backup: http status 404: model not found"
    );
}

#[test]
fn a_missing_key_variable_is_named_and_nothing_is_sent() {
    let server = Server::start(vec![openai_ok("never")]);
    let env = format!("CORRAL_TEST_UNSET_KEY_{}", std::process::id());
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.api_key_env = Some(env.clone());
    let provider = Provider::new("openai", cfg);

    let err = provider.complete(&ask("hi")).unwrap_err();

    assert!(
        matches!(&err, ProviderError::MissingKey { env: e, .. } if *e == env),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "provider openai: environment variable {env} (providers.openai.api_key_env) is not set"
        )
    );
    assert_eq!(server.count(), 0);
    assert_eq!(provider.breaker_state(), BreakerState::Closed);
}

#[test]
fn providers_are_shared_between_threads() {
    let server = Server::start((0..8).map(|i| openai_ok(&format!("answer {i}"))).collect());
    let provider = Arc::new(Provider::new("oa", config(ProviderKind::Openai, &server)));

    let handles: Vec<_> = (0..8)
        .map(|_| {
            let p = Arc::clone(&provider);
            thread::spawn(move || p.complete(&ask("hi")).map(|r| r.text))
        })
        .collect();
    let mut answers: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    answers.sort();

    let expected: Vec<String> = (0..8).map(|i| format!("answer {i}")).collect();
    assert_eq!(answers, expected);
    assert_eq!(server.count(), 8);
}

#[test]
fn anthropic_tools_are_translated_both_ways_over_the_wire() {
    let server = Server::start(vec![Reply::json(
        200,
        json!({
            "id": "msg_02", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "tool_use", "id": "toolu_9", "name": "get_weather",
                         "input": {"city": "Lyon"}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 40, "output_tokens": 12}
        }),
    )]);
    let mut cfg = config(ProviderKind::Anthropic, &server);
    cfg.api_key_env = Some(key_env("anthropic_tools", "sk-ant-test"));
    let provider = Provider::new("claude", cfg);
    let mut assistant = Message::new("assistant", "");
    assistant.tool_calls = Some(json!([{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]));
    let mut result = Message::new("tool", "{\"temp_c\": 21}");
    result.tool_call_id = Some("call_1".into());
    let req = ChatRequest {
        messages: vec![Message::new("user", "Paris, then Lyon?"), assistant, result],
        tools: Some(
            json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]),
        ),
        tool_choice: Some(json!("required")),
        parallel_tool_calls: Some(false),
        ..ChatRequest::default()
    };
    let r = provider.complete(&req).unwrap();
    // What went over the wire is Anthropic's shape.
    let body = server.requests()[0].json();
    assert_eq!(
        body["tools"],
        json!([{"name": "get_weather", "description": "Weather now",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
    );
    assert_eq!(
        body["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        body["messages"][1]["content"],
        json!([{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}])
    );
    assert_eq!(
        body["messages"][2],
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "{\"temp_c\": 21}"}]})
    );
    // What came back is OpenAI's.
    assert_eq!(r.finish_reason, "tool_calls");
    assert_eq!(
        r.tool_calls,
        Some(json!([{"id": "toolu_9", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}]))
    );
}

/// A model a caller names (`PROVIDER/MODEL`) has its own circuit: failures of that model open
/// it and leave the provider's configured model, which fallback chains use, untouched.
#[test]
fn a_named_model_failing_opens_its_own_circuit_only() {
    let server = Server::start(vec![
        openai_error(500, "the named model is down"),
        openai_ok("the configured model answers"),
    ]);
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.breaker_failures = 1;
    cfg.max_retries = 0;
    cfg.models = vec!["flaky-*".into()];
    let provider = Provider::new("oa", cfg);
    let named = ChatRequest {
        model: Some("flaky-1".into()),
        ..ask("hi")
    };
    assert_eq!(provider.complete(&named).unwrap_err().status(), Some(500));
    // Its circuit is open: refused without a request.
    let err = provider.complete(&named).unwrap_err();
    assert!(matches!(err, ProviderError::CircuitOpen { .. }), "{err:?}");
    assert_eq!(server.count(), 1);
    // The provider's own model still goes through.
    assert_eq!(provider.breaker_state(), BreakerState::Closed);
    let ok = provider.complete(&ask("hi")).unwrap();
    assert_eq!(ok.text, "the configured model answers");
    assert_eq!(server.count(), 2);
}

/// A caller that goes away stops the retries (and the chain's later providers): no further
/// request is sent once the cancel flag is set.
#[test]
fn cancelling_stops_retries_and_later_providers() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // The first attempt's answer takes 300 ms; the caller leaves after 100 ms, during it.
    let first = Server::start(vec![
        openai_error(500, "down").delayed(Duration::from_millis(300)),
        openai_error(500, "down"),
        openai_error(500, "down"),
    ]);
    let second = Server::start(vec![openai_ok("never asked")]);
    let mut cfg = config(ProviderKind::Openai, &first);
    cfg.max_retries = 3;
    cfg.backoff_ms = 1;
    let chain = corral::providers::Chain::new(vec![
        Arc::new(Provider::new("first", cfg)),
        Arc::new(Provider::new(
            "second",
            config(ProviderKind::Openai, &second),
        )),
    ]);
    let flag = Arc::new(AtomicBool::new(false));
    let req = ChatRequest {
        cancel: Some(flag.clone()),
        ..ask("hi")
    };
    let setter = {
        let flag = flag.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            flag.store(true, Ordering::Release);
        })
    };
    let t0 = Instant::now();
    let err = chain.complete(&req).unwrap_err();
    setter.join().unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        err.errors
            .iter()
            .any(|e| matches!(e, ProviderError::Cancelled { .. })),
        "{err}"
    );
    assert_eq!(first.count(), 1, "no retry after the caller left");
    assert_eq!(second.count(), 0, "no later provider either");
}

/// A provider whose own circuit is open takes no request for a named model either.
#[test]
fn an_open_provider_refuses_named_models_too() {
    let server = Server::start(vec![openai_error(500, "down"), openai_ok("not asked")]);
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.breaker_failures = 1;
    cfg.max_retries = 0;
    cfg.models = vec!["other-*".into()];
    let provider = Provider::new("oa", cfg);
    assert_eq!(
        provider.complete(&ask("hi")).unwrap_err().status(),
        Some(500)
    );
    let named = ChatRequest {
        model: Some("other-1".into()),
        ..ask("hi")
    };
    let err = provider.complete(&named).unwrap_err();
    assert!(matches!(err, ProviderError::CircuitOpen { .. }), "{err:?}");
    assert_eq!(server.count(), 1);
}

// ---------------------------------------------------------------------------------------------
// Streamed answers.

/// An OpenAI chunk's `data:` event.
fn chunk(v: Value) -> String {
    format!("data: {v}\n\n")
}

fn text_chunk(text: &str) -> String {
    chunk(
        json!({"model": "gpt-stream", "choices": [{"index": 0, "delta": {"content": text},
        "logprobs": {"content": [{"token": text, "logprob": -0.25, "top_logprobs": []}]}}]}),
    )
}

/// The pieces `provider.stream` handed out, with when each arrived after `t0`.
fn collect(
    provider: &Provider,
    req: &ChatRequest,
    t0: Instant,
) -> (
    Result<corral::providers::ChatResponse, ProviderError>,
    Vec<(Delta, Duration)>,
) {
    let mut got = Vec::new();
    let r = provider.stream(req, &mut |d| {
        got.push((d, t0.elapsed()));
        true
    });
    (r, got)
}

#[test]
fn an_openai_stream_is_handed_on_as_it_arrives_and_assembled() {
    let server = Server::start(vec![Reply::sse(vec![
        (Duration::ZERO, text_chunk("Hel")),
        (Duration::from_millis(400), text_chunk("lo")),
        (
            Duration::ZERO,
            chunk(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})),
        ),
        (
            Duration::ZERO,
            chunk(json!({"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 2}})),
        ),
        (Duration::ZERO, "data: [DONE]\n\n".into()),
    ])]);
    let provider = Provider::new("oa", config(ProviderKind::Openai, &server));
    let mut req = ask("hi");
    req.logprobs = true;
    let t0 = Instant::now();
    let (r, got) = collect(&provider, &req, t0);
    let r = r.unwrap();
    assert_eq!(r.text, "Hello");
    assert_eq!(r.model, "gpt-stream");
    assert_eq!(r.finish_reason, "stop");
    assert_eq!((r.usage.prompt_tokens, r.usage.completion_tokens), (6, 2));
    assert_eq!(r.token_logprobs, Some(vec![-0.25, -0.25]));
    assert_eq!(
        got[0].0,
        Delta::Begin {
            provider: "oa".into(),
            model: "gpt-stream".into()
        }
    );
    // The first piece went on before the provider sent the second.
    let Delta::Text { text, logprobs } = &got[1].0 else {
        panic!("{got:?}")
    };
    assert_eq!(text, "Hel");
    assert_eq!(logprobs.as_ref().unwrap()[0]["logprob"], -0.25);
    assert!(got[1].1 < Duration::from_millis(300), "{got:?}");
    assert!(got[2].1 >= Duration::from_millis(350), "{got:?}");
    let body = server.requests()[0].json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(
        server.requests()[0].header("accept"),
        Some("text/event-stream")
    );
}

#[test]
fn an_anthropic_stream_gives_text_and_tool_calls_in_openais_shape() {
    let ev = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
    let z = Duration::ZERO;
    let server = Server::start(vec![Reply::sse(vec![
        (
            z,
            ev(
                "message_start",
                json!({"type": "message_start", "message": {"model": "claude-s", "usage": {"input_tokens": 11, "output_tokens": 1}}}),
            ),
        ),
        (
            z,
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
        ),
        (z, ev("ping", json!({"type": "ping"}))),
        (
            z,
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me look."}}),
            ),
        ),
        (
            z,
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
        ),
        (
            z,
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {}}}),
            ),
        ),
        (
            z,
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}}),
            ),
        ),
        (
            z,
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": " \"Oslo\"}"}}),
            ),
        ),
        (
            z,
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
        ),
        (
            z,
            ev(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 17}}),
            ),
        ),
        (z, ev("message_stop", json!({"type": "message_stop"}))),
    ])]);
    let provider = Provider::new("claude", config(ProviderKind::Anthropic, &server));
    let mut req = ask("weather in Oslo?");
    req.tools = Some(
        json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]),
    );
    let (r, got) = collect(&provider, &req, Instant::now());
    let r = r.unwrap();
    assert_eq!(r.text, "Let me look.");
    assert_eq!(r.finish_reason, "tool_calls");
    assert_eq!((r.usage.prompt_tokens, r.usage.completion_tokens), (11, 17));
    let calls = r.tool_calls.unwrap();
    assert_eq!(calls[0]["id"], "toolu_9");
    assert_eq!(calls[0]["function"]["name"], "weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Oslo"}));
    // The call's pieces: its id and name first, then the arguments as they came.
    let pieces: Vec<&Delta> = got
        .iter()
        .map(|(d, _)| d)
        .filter(|d| matches!(d, Delta::ToolCall { .. }))
        .collect();
    assert_eq!(pieces.len(), 3, "{got:?}");
    assert!(
        matches!(pieces[0], Delta::ToolCall { index: 0, id: Some(_), name: Some(n), .. } if n == "weather")
    );
    let body = server.requests()[0].json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["tools"][0]["name"], "weather");
}

#[test]
fn a_stream_that_fails_before_its_first_piece_is_retried_after_it_is_not() {
    // A 503, then an error event before any content (both retried), then a stream.
    let overloaded = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let server = Server::start(vec![
        openai_error(503, "busy"),
        Reply::sse(vec![(Duration::ZERO, overloaded.into())]),
        Reply::sse(vec![
            (Duration::ZERO, text_chunk("fine")),
            (Duration::ZERO, "data: [DONE]\n\n".into()),
        ]),
    ]);
    let provider = Provider::new("oa", config(ProviderKind::Openai, &server));
    let (r, _) = collect(&provider, &ask("hi"), Instant::now());
    let r = r.unwrap();
    assert_eq!((r.text.as_str(), r.attempts), ("fine", 3));

    // Cut after its first piece: an interruption, not retried, and no later provider asked.
    let cut = Server::start(vec![Reply::sse(vec![(Duration::ZERO, text_chunk("Hal"))])]);
    let spare = Server::start(vec![openai_ok("spare")]);
    let chain = Chain::new(vec![
        Arc::new(Provider::new("cut", config(ProviderKind::Openai, &cut))),
        Arc::new(Provider::new("spare", config(ProviderKind::Openai, &spare))),
    ]);
    let mut texts = String::new();
    let err = chain
        .stream(&ask("hi"), &mut |d| {
            if let Delta::Text { text, .. } = d {
                texts.push_str(&text);
            }
            true
        })
        .unwrap_err();
    assert_eq!(texts, "Hal");
    assert!(
        matches!(&err.errors[..], [ProviderError::Interrupted { provider, .. }] if provider == "cut"),
        "{err}"
    );
    assert_eq!(cut.count(), 1);
    assert_eq!(spare.count(), 0);
}

#[test]
fn a_caller_that_stops_reading_closes_the_providers_connection() {
    let mut parts = vec![(Duration::ZERO, text_chunk("a"))];
    parts.extend((0..200).map(|_| (Duration::from_millis(20), text_chunk("b"))));
    let server = Server::start(vec![Reply::sse(parts)]);
    let provider = Provider::new("oa", config(ProviderKind::Openai, &server));
    let mut n = 0;
    let t0 = Instant::now();
    let err = provider
        .stream(&ask("hi"), &mut |d| {
            n += usize::from(matches!(d, Delta::Text { .. }));
            n < 3
        })
        .unwrap_err();
    let stopped = t0.elapsed();
    assert!(matches!(err, ProviderError::Cancelled { .. }), "{err}");
    assert!(stopped < Duration::from_secs(1), "{stopped:?}");
    // The provider's next writes fail: the connection is gone, well before its 200 parts.
    let deadline = Instant::now() + Duration::from_secs(3);
    while server.broken.lock().unwrap().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let broken = server.broken.lock().unwrap().clone();
    assert!(
        broken.first().is_some_and(|(i, _)| *i < 20),
        "the provider kept writing: {broken:?}"
    );
    // A provider that stopped because its caller did is not counted as failing.
    assert_eq!(provider.breaker_state(), BreakerState::Closed);
}

#[test]
fn a_provider_that_answers_a_stream_request_whole_gives_one_piece() {
    let server = Server::start(vec![openai_ok("all at once")]);
    let provider = Provider::new("oa", config(ProviderKind::Openai, &server));
    let (r, got) = collect(&provider, &ask("hi"), Instant::now());
    assert_eq!(r.unwrap().text, "all at once");
    let texts: Vec<&Delta> = got.iter().map(|(d, _)| d).collect();
    assert_eq!(texts.len(), 2, "{got:?}");
    assert!(matches!(texts[1], Delta::Text { text, .. } if text == "all at once"));
}

#[test]
fn a_stream_cut_before_its_end_is_an_error() {
    // Headers and nothing else, twice (retried: nothing went out), then a finished stream.
    let server = Server::start(vec![
        Reply::sse(vec![]),
        Reply::sse(vec![]),
        Reply::sse(vec![]),
    ]);
    let provider = Provider::new("oa", config(ProviderKind::Openai, &server));
    let (r, got) = collect(&provider, &ask("hi"), Instant::now());
    let err = r.unwrap_err();
    assert!(err.to_string().contains("ended before"), "{err}");
    assert!(got.is_empty());
    assert_eq!(server.count(), 3);
}

#[test]
fn always_stream_lets_a_caller_that_leaves_close_a_non_streamed_answer() {
    let mut parts = vec![(Duration::ZERO, text_chunk("a"))];
    parts.extend((0..200).map(|_| (Duration::from_millis(20), text_chunk("b"))));
    parts.push((Duration::ZERO, "data: [DONE]\n\n".into()));
    let server = Server::start(vec![Reply::sse(parts)]);
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.always_stream = true;
    let provider = Provider::new("oa", cfg);
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut req = ask("hi");
    req.cancel = Some(flag.clone());
    let leave = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        flag.store(true, std::sync::atomic::Ordering::Release);
    });
    let t0 = Instant::now();
    let err = provider.complete(&req).unwrap_err();
    leave.join().unwrap();
    assert!(matches!(err, ProviderError::Cancelled { .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(3);
    while server.broken.lock().unwrap().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let broken = server.broken.lock().unwrap().clone();
    assert!(
        broken.first().is_some_and(|(i, _)| *i < 40),
        "the provider kept writing: {broken:?}"
    );
    assert_eq!(server.requests()[0].json()["stream"], true);
}

#[test]
fn always_stream_assembles_the_answer_and_retries_a_stream_cut_midway() {
    let end = chunk(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}));
    let server = Server::start(vec![
        // Cut after a piece: nothing went to anyone, so it is retried.
        Reply::sse(vec![(Duration::ZERO, text_chunk("Hal"))]),
        Reply::sse(vec![
            (Duration::ZERO, text_chunk("Hel")),
            (Duration::ZERO, text_chunk("lo")),
            (Duration::ZERO, end),
            (Duration::ZERO, "data: [DONE]\n\n".into()),
        ]),
    ]);
    let mut cfg = config(ProviderKind::Openai, &server);
    cfg.always_stream = true;
    let provider = Provider::new("oa", cfg);
    let r = provider.complete(&ask("hi")).unwrap();
    assert_eq!((r.text.as_str(), r.attempts), ("Hello", 2));
    assert_eq!(r.finish_reason, "stop");
}
