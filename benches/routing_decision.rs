#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The routing decision (guardrails + classification + rules + allow lists) on a 2 KiB prompt,
//! for 10, 100 and 1,000 policies. Criterion reports means; the p50/p99 lines printed first come
//! from 20,000 individually timed decisions per size (the issue's goal is p99 < 20 µs at 100).
//!
//! `cargo bench --bench routing_decision`

use std::collections::BTreeMap;
use std::time::Instant;

use corral::catalog::{Catalog, CatalogFile, BUILTIN_CATALOG};
use corral::providers::{ProviderConfig, ProviderKind};
use corral::routing::{Context, RawRouting, RequestContext, Router};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};

/// `n` policies of mixed kinds, none matching the benchmark request until the last one looked
/// at, so every decision walks all of them (the worst case).
fn config(n: usize) -> String {
    let mut s = String::from(
        "[llm_fallback]\nproviders = [\"remote\"]\n[guardrails]\npii = \"mask\"\nprompt_injection = \"log\"\n",
    );
    for i in 0..n {
        let cond = match i % 5 {
            0 => format!("conditions = {{ agent = \"team-{i}-*\" }}"),
            1 => format!("conditions = {{ metadata = {{ tenant = \"t{i}\" }} }}"),
            2 => "task_types = [\"Translation\"]".to_string(),
            3 => format!(
                "conditions = {{ content_length = {{ min = {} }} }}",
                100_000 + i
            ),
            _ => format!("conditions = {{ key_alias = \"key-{i}\", complexity = [\"high\"] }}"),
        };
        s.push_str(&format!(
            "[[policies]]\nid = \"p{i:04}\"\npriority = {}\n{cond}\naction = {{ type = \"require_llm\", reason = \"r\" }}\n",
            i % 17
        ));
    }
    s
}

fn router(n: usize) -> Router {
    let raw: RawRouting = toml::from_str(&config(n)).unwrap();
    let mut catalog = Catalog::default();
    let file: CatalogFile = toml::from_str(BUILTIN_CATALOG).unwrap();
    for m in file.models {
        catalog.insert(m, "builtin".into()).unwrap();
    }
    let providers: BTreeMap<String, ProviderConfig> = [(
        "remote".to_string(),
        ProviderConfig::new(ProviderKind::Openai, "http://127.0.0.1:9/v1", "m"),
    )]
    .into();
    Router::compile(
        &raw,
        Context {
            catalog: &catalog,
            providers: &providers,
            profile_exists: &|_| true,
            default_profile: "secure",
            slm_enabled: true,
            agent_model_maps: &BTreeMap::new(),
            base_dir: std::path::Path::new("."),
        },
    )
    .unwrap()
}

/// A 2 KiB prompt of ordinary prose with one email address in it (masked by the guardrail).
fn request() -> RequestContext {
    let mut prompt = String::new();
    while prompt.len() < 2000 {
        prompt.push_str("Please review the quarterly figures and tell me whether revenue grew. ");
    }
    prompt.push_str("Reply to finance@example.com.");
    RequestContext {
        prompt,
        agent: Some("web-frontend".into()),
        metadata: [("tenant".to_string(), "acme".to_string())].into(),
        minute_of_day: Some(600),
        ..Default::default()
    }
}

/// (p50, p99) in µs of `n` timed calls of `f`.
fn p50_p99(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    (t[t.len() / 2], t[t.len() * 99 / 100])
}

fn percentiles(r: &Router, req: &RequestContext, n: usize) {
    for _ in 0..2_000 {
        black_box(r.decide(req));
    }
    let (p50, p99) = p50_p99(20_000, || {
        black_box(r.decide(black_box(req)));
    });
    println!("routing decision, {n:>4} policies, 2 KiB prompt: p50 {p50:.2} µs, p99 {p99:.2} µs");
}

fn bench(c: &mut Criterion) {
    // `cargo test --all-targets` runs benches once as tests: time percentiles only for real runs.
    let timed = std::env::args().any(|a| a == "--bench");
    let req = request();
    let mut g = c.benchmark_group("routing_decision");
    for n in [10, 100, 1000] {
        let r = router(n);
        if timed {
            percentiles(&r, &req, n);
        }
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(r.decide(black_box(&req))))
        });
    }
    g.finish();

    // One WASM policy call: instantiate, write the input, run, read and parse the answer.
    let action = corral::routing::wasm::WasmAction {
        module: "examples/policies/tier.wat".into(),
        fail_safe: None,
        fuel: 1_000_000,
        memory_mb: 16,
        timeout_ms: 50,
    };
    let policy = corral::routing::wasm::WasmPolicy::compile(
        &action,
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        "bench",
    )
    .unwrap();
    let class = corral::routing::Classifier::new(true, &[], corral::routing::TaskType::QA)
        .unwrap()
        .classify(&req.prompt, None);
    let input =
        corral::routing::wasm::WasmPolicy::input(&req, &class, req.prompt.chars().count(), None);
    let (p50, p99) = p50_p99(5_000, || {
        black_box(policy.call(black_box(&input)));
    });
    println!(
        "wasm policy call (example tier.wat, 2 KiB request): p50 {p50:.2} µs, p99 {p99:.2} µs"
    );
    // The same with a module that answers at once: what the call itself costs (instantiation,
    // memory, input, answer parsing), whatever the module computes.
    let dir = std::env::temp_dir().join(format!("corral-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pass = dir.join("pass.wat");
    std::fs::write(
        &pass,
        r#"(module (memory (export "memory") 1)
             (data (i32.const 0) "{\"pass\":true}")
             (func (export "alloc") (param i32) (result i32) (i32.const 64))
             (func (export "decide") (param i32 i32) (result i64) (i64.const 13)))"#,
    )
    .unwrap();
    let trivial = corral::routing::wasm::WasmPolicy::compile(
        &corral::routing::wasm::WasmAction {
            module: pass,
            ..action.clone()
        },
        &dir,
        "bench",
    )
    .unwrap();
    if timed {
        let (p50, p99) = p50_p99(5_000, || {
            black_box(trivial.call(black_box(&input)));
        });
        println!(
            "wasm policy call (a module that answers at once): p50 {p50:.2} µs, p99 {p99:.2} µs"
        );
    }
    c.bench_function("wasm_policy_call", |b| {
        b.iter(|| black_box(policy.call(black_box(&input))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
