//! Prometheus text exposition, kept by hand: labelled counters, gauges and fixed-bucket
//! histograms behind one mutex (a handful of updates per request, far below the cost of the
//! request itself).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Label pairs in a fixed order.
type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Default)]
struct Histogram {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
struct Inner {
    counters: BTreeMap<(&'static str, Labels), f64>,
    gauges: BTreeMap<(&'static str, Labels), f64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
}

/// Bucket bounds of each histogram.
fn bounds(name: &str) -> &'static [f64] {
    const SECONDS: &[f64] = &[
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    const OVERHEAD: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    ];
    const UNIT: &[f64] = &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0];
    match name {
        "corral_confidence" => UNIT,
        "corral_gateway_overhead_seconds" => OVERHEAD,
        _ => SECONDS,
    }
}

const HELP: &[(&str, &str, &str)] = &[
    (
        "corral_requests_total",
        "counter",
        "Requests by endpoint, route, model and outcome",
    ),
    (
        "corral_escalations_total",
        "counter",
        "SLM answers replaced by a remote one, by reason",
    ),
    (
        "corral_tokens_total",
        "counter",
        "Tokens of answers, by model, route and kind (prompt, completion)",
    ),
    (
        "corral_spend_usd_total",
        "counter",
        "What remote answers cost, by provider and model (the provider's configured prices)",
    ),
    (
        "corral_spend_avoided_usd_total",
        "counter",
        "What local answers would have cost from the fallback chain's first provider",
    ),
    (
        "corral_runner_restarts_total",
        "counter",
        "Runners replaced after a crash, hang, OOM kill or recycling, by pool and cause",
    ),
    (
        "corral_runner_start_failures_total",
        "counter",
        "Runner starts that failed (a launch past its deadline, a refused sandbox, a model that did not load), by pool",
    ),
    (
        "corral_sandbox_limit_hits_total",
        "counter",
        "Sandbox limits runners hit (memory, cpu time, pids, time limit), by pool and limit",
    ),
    (
        "corral_runner_cpu_seconds_total",
        "counter",
        "CPU time of runners that have exited, from their cgroups, by pool",
    ),
    (
        "corral_runner_memory_peak_bytes",
        "gauge",
        "Peak memory of each runner's cgroup so far (updated after every request), by pool and runner slot",
    ),
    (
        "corral_runner_cpu_seconds",
        "gauge",
        "CPU time of each runner's cgroup so far (updated after every request), by pool and runner slot",
    ),
    (
        "corral_runner_sequences",
        "gauge",
        "Requests each runner holds now (decoded together, up to server.pool.slots), by pool and runner slot",
    ),
    (
        "corral_queue_depth",
        "gauge",
        "Requests waiting for a runner, by pool",
    ),
    (
        "corral_runners",
        "gauge",
        "Runners with a loaded model, by pool",
    ),
    (
        "corral_rate_limited_total",
        "counter",
        "Requests refused with 429, by cause",
    ),
    (
        "corral_confidence",
        "histogram",
        "Confidence of SLM answers, by model and task",
    ),
    (
        "corral_request_duration_seconds",
        "histogram",
        "Request latency as the client saw it, by endpoint and route",
    ),
    (
        "corral_gateway_overhead_seconds",
        "histogram",
        "Time spent in corral itself (request latency minus model or provider time), by route",
    ),
];

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut g)
    }

    pub fn inc(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        self.add(name, labels, 1.0);
    }

    pub fn add(&self, name: &'static str, labels: &[(&'static str, &str)], v: f64) {
        let key = (name, own(labels));
        self.with(|m| *m.counters.entry(key).or_default() += v);
    }

    pub fn set(&self, name: &'static str, labels: &[(&'static str, &str)], v: f64) {
        let key = (name, own(labels));
        self.with(|m| {
            m.gauges.insert(key, v);
        });
    }

    pub fn gauge_add(&self, name: &'static str, labels: &[(&'static str, &str)], v: f64) {
        let key = (name, own(labels));
        self.with(|m| *m.gauges.entry(key).or_default() += v);
    }

    pub fn observe(&self, name: &'static str, labels: &[(&'static str, &str)], v: f64) {
        let key = (name, own(labels));
        let b = bounds(name);
        self.with(|m| {
            let h = m.histograms.entry(key).or_insert_with(|| Histogram {
                buckets: vec![0; b.len()],
                ..Histogram::default()
            });
            for (i, le) in b.iter().enumerate() {
                if v <= *le {
                    h.buckets[i] += 1;
                }
            }
            h.sum += v;
            h.count += 1;
        });
    }

    /// A counter's current value (tests and `/readyz` use it).
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> f64 {
        let key = (name, own(labels));
        self.with(|m| m.counters.get(&key).copied().unwrap_or(0.0))
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.with(|m| {
            for (name, kind, help) in HELP {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                match *kind {
                    "counter" => series(&mut out, name, &m.counters),
                    "gauge" => series(&mut out, name, &m.gauges),
                    _ => {
                        for ((n, labels), h) in m.histograms.iter().filter(|((n, _), _)| n == name)
                        {
                            let mut acc = 0;
                            for (i, le) in bounds(n).iter().enumerate() {
                                acc = h.buckets[i].max(acc);
                                let mut l = labels.clone();
                                l.push(("le", le.to_string()));
                                let _ = writeln!(out, "{n}_bucket{} {}", fmt_labels(&l), acc);
                            }
                            let mut l = labels.clone();
                            l.push(("le", "+Inf".into()));
                            let _ = writeln!(out, "{n}_bucket{} {}", fmt_labels(&l), h.count);
                            let _ = writeln!(out, "{n}_sum{} {}", fmt_labels(labels), h.sum);
                            let _ = writeln!(out, "{n}_count{} {}", fmt_labels(labels), h.count);
                        }
                    }
                }
            }
        });
        out
    }
}

fn own(labels: &[(&'static str, &str)]) -> Labels {
    labels.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

fn series(out: &mut String, name: &str, m: &BTreeMap<(&'static str, Labels), f64>) {
    for ((n, labels), v) in m.iter().filter(|((n, _), _)| *n == name) {
        let _ = writeln!(out, "{n}{} {v}", fmt_labels(labels));
    }
}

fn fmt_labels(l: &[(&'static str, String)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = l
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_types_labels_and_cumulative_buckets() {
        let m = Metrics::default();
        m.inc(
            "corral_requests_total",
            &[("route", "slm"), ("outcome", "ok")],
        );
        m.inc(
            "corral_requests_total",
            &[("route", "slm"), ("outcome", "ok")],
        );
        m.observe("corral_confidence", &[("model", "a\"b")], 0.55);
        let t = m.render();
        assert!(t.contains("# TYPE corral_requests_total counter"));
        assert!(t.contains("corral_requests_total{route=\"slm\",outcome=\"ok\"} 2"));
        assert!(t.contains("corral_confidence_bucket{model=\"a\\\"b\",le=\"0.5\"} 0"));
        assert!(t.contains("corral_confidence_bucket{model=\"a\\\"b\",le=\"0.6\"} 1"));
        assert!(t.contains("corral_confidence_count{model=\"a\\\"b\"} 1"));
    }
}
