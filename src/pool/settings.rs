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
}

impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            runners: 1,
            warm: vec![],
            idle_timeout_seconds: 600,
            queue_depth: 32,
            queue_timeout_seconds: 30,
            recycle_after_requests: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub runners: usize,
    pub warm: Vec<String>,
    pub idle_timeout: Option<Duration>,
    pub queue_depth: usize,
    pub queue_timeout: Duration,
    pub recycle_after: Option<u64>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        // The defaults of the raw form always validate.
        compile_pool(&RawPool::default(), &|_| true).unwrap_or(PoolConfig {
            runners: 1,
            warm: vec![],
            idle_timeout: None,
            queue_depth: 32,
            queue_timeout: Duration::from_secs(30),
            recycle_after: None,
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
    if raw.queue_timeout_seconds == 0 {
        return Err((
            "server.pool.queue_timeout_seconds".into(),
            "must be > 0".into(),
        ));
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
        warm: raw.warm.clone(),
        idle_timeout: (raw.idle_timeout_seconds > 0)
            .then(|| Duration::from_secs(raw.idle_timeout_seconds)),
        queue_depth: raw.queue_depth,
        queue_timeout: Duration::from_secs(raw.queue_timeout_seconds),
        recycle_after: (raw.recycle_after_requests > 0).then_some(raw.recycle_after_requests),
    })
}
