//! The `[server.pool]` section: its serde form and the validated form the pools run with.
//! Errors are `(key, message)` for `config` to place in its file.

use std::time::Duration;

use serde::Deserialize;

/// `[server.pool]`: warm runners per (model, profile).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPool {
    /// Runners per (model, profile) pool.
    pub runners: usize,
    /// Requests each runner decodes together (continuous batching): up to this many sequences
    /// share one pass over the weights per step, within the KV budget the profile's memory
    /// leaves. 1: one request at a time.
    pub slots: usize,
    /// Model ids whose pools start at boot (`/readyz` waits for them); others start on first use.
    pub warm: Vec<String>,
    /// A runner idle this long is stopped (it restarts on the next request). 0: never.
    pub idle_timeout_seconds: u64,
    /// Requests waiting per pool beyond the ones being served; one more gets 429.
    pub queue_depth: usize,
    /// A request waiting longer than this for a runner gets 429.
    pub queue_timeout_seconds: u64,
    /// Restart a runner after this many requests (0: never).
    pub recycle_after_requests: u64,
    /// Whose prompt state a runner reuses for whom: `key` (default: a request reuses only what
    /// the previous request of the same API key left), `team`, or `off`.
    pub prefix_cache: PrefixScope,
    /// Models whose runners reuse prompt state across callers (an operator's opt-in: a caller
    /// can then tell from timing whether another sent the same prefix).
    pub prefix_cache_shared: Vec<String>,
}

/// `server.pool.prefix_cache`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixScope {
    #[default]
    Key,
    Team,
    Off,
}

impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            runners: 1,
            slots: 4,
            warm: vec![],
            idle_timeout_seconds: 600,
            queue_depth: 32,
            queue_timeout_seconds: 30,
            recycle_after_requests: 0,
            prefix_cache: PrefixScope::Key,
            prefix_cache_shared: vec![],
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub runners: usize,
    pub slots: usize,
    pub warm: Vec<String>,
    pub idle_timeout: Option<Duration>,
    pub queue_depth: usize,
    pub queue_timeout: Duration,
    pub recycle_after: Option<u64>,
    pub prefix_cache: PrefixScope,
    pub prefix_cache_shared: Vec<String>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        // The defaults of the raw form always validate.
        compile_pool(&RawPool::default(), &|_| true).unwrap_or(PoolConfig {
            runners: 1,
            slots: 4,
            warm: vec![],
            idle_timeout: None,
            queue_depth: 32,
            queue_timeout: Duration::from_secs(30),
            recycle_after: None,
            prefix_cache: PrefixScope::Key,
            prefix_cache_shared: vec![],
        })
    }
}

pub fn compile_pool(
    raw: &RawPool,
    model_exists: &dyn Fn(&str) -> bool,
) -> Result<PoolConfig, (String, String)> {
    if raw.runners == 0 || raw.runners > 64 {
        return Err(("server.pool.runners".into(), "must be within 1..=64".into()));
    }
    if raw.slots == 0 || raw.slots > 64 {
        return Err(("server.pool.slots".into(), "must be within 1..=64".into()));
    }
    if raw.queue_timeout_seconds == 0 {
        return Err((
            "server.pool.queue_timeout_seconds".into(),
            "must be > 0".into(),
        ));
    }
    for (i, m) in raw.prefix_cache_shared.iter().enumerate() {
        if !model_exists(m) {
            return Err((
                format!("server.pool.prefix_cache_shared[{i}]"),
                format!("model '{m}' is not in the catalog"),
            ));
        }
    }
    for (i, m) in raw.warm.iter().enumerate() {
        if !model_exists(m) {
            return Err((
                format!("server.pool.warm[{i}]"),
                format!("model '{m}' is not in the catalog"),
            ));
        }
    }
    Ok(PoolConfig {
        runners: raw.runners,
        slots: raw.slots,
        warm: raw.warm.clone(),
        idle_timeout: (raw.idle_timeout_seconds > 0)
            .then(|| Duration::from_secs(raw.idle_timeout_seconds)),
        queue_depth: raw.queue_depth,
        queue_timeout: Duration::from_secs(raw.queue_timeout_seconds),
        recycle_after: (raw.recycle_after_requests > 0).then_some(raw.recycle_after_requests),
        prefix_cache: raw.prefix_cache,
        prefix_cache_shared: raw.prefix_cache_shared.clone(),
    })
}
