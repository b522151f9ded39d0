#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The audit log's costs, for an entry with a 4 KiB request payload (and a 512-byte response):
//!
//! - `audit_entry/encode`: what the writer thread does per entry: serialize the metadata and both
//!   payloads, AES-256-GCM with fresh nonces, the HMAC chain, the JSON line. Without PII masking,
//!   with it (every kind), and sensitive keys redacted in both.
//! - what the request path pays: `AuditLog::record` (timestamp, enqueue) with the log on, against
//!   no log at all: p50/p99 of 5,000 individually timed calls each way (the queue holds them all,
//!   so none is dropped), printed with the writer's sustained rate, fsyncs included.
//!
//! `cargo bench --bench audit_log`

use std::time::{Instant, SystemTime};

use corral::audit::{AuditConfig, AuditKey, AuditLog, AuditRecord, EntryEncoder, KeySource};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use serde_json::json;

fn key() -> AuditKey {
    AuditKey::from_bytes(&[3u8; 32])
}

/// A chat request of 4 KiB of prose (one e-mail address in it) and a 512-byte answer.
fn record() -> AuditRecord {
    let mut prompt = String::new();
    while prompt.len() < 4000 {
        prompt.push_str("Please review the quarterly figures and tell me whether revenue grew. ");
    }
    prompt.push_str("Reply to finance@example.com.");
    let mut answer = String::new();
    while answer.len() < 500 {
        answer.push_str("Revenue grew by four percent over the quarter. ");
    }
    AuditRecord {
        request_id: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
        model: Some("smollm2-135m-instruct".into()),
        policies: vec!["policy:default".into()],
        confidence: Some(0.82),
        latency_ms: 431.5,
        request: json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 256, "api_key": "sk-secret"}),
        response: json!({"text": answer, "finish_reason": "stop"}),
        ..Default::default()
    }
}

fn config(dir: &std::path::Path, mask_pii: bool) -> AuditConfig {
    let mut c = AuditConfig::new(dir);
    c.key = KeySource::Env(key());
    c.mask_pii = mask_pii;
    c
}

/// (p50, p99) in µs of timing `f` on each of `items`.
fn p50_p99<T>(items: Vec<T>, mut f: impl FnMut(T)) -> (f64, f64) {
    let mut t: Vec<f64> = items
        .into_iter()
        .map(|x| {
            let s = Instant::now();
            f(x);
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    (t[t.len() / 2], t[t.len() * 99 / 100])
}

fn bench(c: &mut Criterion) {
    // `cargo test --all-targets` runs benches once as tests: time percentiles only for real runs.
    let timed = std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().unwrap();
    let rec = record();
    let payload = serde_json::to_vec(&rec.request).unwrap().len()
        + serde_json::to_vec(&rec.response).unwrap().len();

    let mut g = c.benchmark_group("audit_entry");
    for (name, mask) in [("encode", false), ("encode_pii_masked", true)] {
        let enc = EntryEncoder::new(key(), &config(dir.path(), mask));
        let k = key();
        let now = SystemTime::now();
        if timed {
            let (p50, p99) = p50_p99(vec![rec.clone(); 5_000], |r| {
                black_box(enc.prepare(r, now).unwrap().chain(1, &k, &[0; 32]));
            });
            println!(
                "audit entry, {payload} B of payloads, {name}: p50 {p50:.2} µs, p99 {p99:.2} µs"
            );
        }
        g.bench_function(name, |b| {
            b.iter_batched(
                || rec.clone(),
                |r| black_box(enc.prepare(r, now).unwrap().chain(1, &k, &[0; 32])),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // The request path. `off`: no log; `on`: a real log writing to a temporary directory.
    let mut cfg = config(&dir.path().join("log"), true);
    cfg.queue_capacity = 8_192;
    let off: Option<AuditLog> = None;
    let on = AuditLog::open(&cfg).unwrap();
    if timed {
        let n = 5_000;
        // Off, the record is dropped later by its owner, not in the timed call: keep it.
        let mut kept = Vec::with_capacity(n);
        let (p50, p99) = p50_p99(vec![rec.clone(); n], |r| {
            if let Some(l) = &off {
                l.record(r);
            } else {
                kept.push(r);
            }
        });
        drop(kept);
        println!("record(), logging off: p50 {p50:.2} µs, p99 {p99:.2} µs");
        let log = &on;
        log.flush().unwrap();
        let before = log.stats();
        let items = vec![rec.clone(); n];
        let start = Instant::now();
        let (p50, p99) = p50_p99(items, |r| {
            log.record(r);
        });
        log.flush().unwrap();
        let took = start.elapsed();
        let s = log.stats();
        assert_eq!(s.dropped, before.dropped, "nothing dropped");
        println!("record(), logging on:  p50 {p50:.2} µs, p99 {p99:.2} µs");
        println!(
            "writer: {n} entries written and fsynced in {:.0} ms: {:.1} µs per entry, {:.0} entries/s",
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e6 / n as f64,
            n as f64 / took.as_secs_f64()
        );
    }
    // No criterion loop for `record()`: a loop of millions of calls outruns any writer, so it
    // would measure the full-queue path (drop or block) and fill the disk. The timed calls above
    // are the request path's cost.
    drop(on);
}

criterion_group!(benches, bench);
criterion_main!(benches);
