//! Who is calling: `Authorization: Bearer KEY` (or `x-api-key`) looked up by its SHA-256 among
//! the configured keys, mapped to the identity (agent, team, key alias) that routing, scopes and
//! allow lists use; per-key rate limits (token bucket) and concurrency limits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::HeaderMap;

use super::error::ApiError;
use crate::config::auth::{sha256, AuthConfig, KeySecret};

/// The caller, as routing sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub key_alias: Option<String>,
    pub agent: Option<String>,
    pub team: Option<String>,
    /// The key's token budgets (`server::budget`).
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

#[derive(Debug)]
struct Entry {
    identity: Identity,
    rpm: Option<u32>,
    max_concurrent: Option<u32>,
    in_flight: Arc<AtomicU32>,
}

/// The keys of one configuration generation, with their limiters.
#[derive(Debug)]
pub struct Keys {
    by_hash: HashMap<[u8; 32], Entry>,
    admin: Option<[u8; 32]>,
    open: bool,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

/// Held while a request is in flight; releases the key's concurrency slot on drop.
#[derive(Debug)]
pub struct Slot(Option<Arc<AtomicU32>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        return Some(
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .unwrap_or(v)
                .trim(),
        );
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

impl Keys {
    /// Reads keys held in environment variables; a missing one is an error naming it.
    pub fn load(cfg: &AuthConfig, get: &dyn Fn(&str) -> Option<String>) -> Result<Keys, String> {
        let mut by_hash = HashMap::new();
        for k in &cfg.keys {
            let hash = match &k.secret {
                KeySecret::Sha256(h) => *h,
                KeySecret::Env(var) => sha256(
                    get(var)
                        .ok_or_else(|| {
                            format!(
                                "server.auth.keys.{}: environment variable {var} is not set",
                                k.alias
                            )
                        })?
                        .as_bytes(),
                ),
            };
            by_hash.insert(
                hash,
                Entry {
                    identity: Identity {
                        key_alias: Some(k.alias.clone()),
                        agent: k.agent.clone(),
                        team: k.team.clone(),
                        tokens_per_minute: k.tokens_per_minute,
                        tokens_per_day: k.tokens_per_day,
                    },
                    rpm: k.requests_per_minute,
                    max_concurrent: k.max_concurrent,
                    in_flight: Arc::new(AtomicU32::new(0)),
                },
            );
        }
        let admin = match &cfg.admin_key_env {
            None => None,
            Some(var) => Some(sha256(
                get(var)
                    .ok_or_else(|| {
                        format!("server.auth.admin_key_env: environment variable {var} is not set")
                    })?
                    .as_bytes(),
            )),
        };
        Ok(Keys {
            by_hash,
            admin,
            open: cfg.allow_unauthenticated,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// The caller's identity and its concurrency slot, or 401/429.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<(Identity, Slot), ApiError> {
        if self.open && self.by_hash.is_empty() {
            // No keys configured (loopback only): every caller is anonymous, whatever key its
            // client library insists on sending.
            return Ok((Identity::default(), Slot(None)));
        }
        let entry = match presented(headers) {
            Some(k) if !k.is_empty() => match self.by_hash.get(&sha256(k.as_bytes())) {
                Some(e) => e,
                None => {
                    return Err(ApiError::unauthorized(
                        "Incorrect API key provided. You can find your keys in corral.toml [server.auth.keys].",
                    ))
                }
            },
            _ if self.open => return Ok((Identity::default(), Slot(None))),
            _ => {
                return Err(ApiError::unauthorized(
                    "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                ))
            }
        };
        let alias = entry.identity.key_alias.clone().unwrap_or_default();
        if let Some(rpm) = entry.rpm {
            let mut b = self
                .buckets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let cap = f64::from(rpm);
            let (tokens, at) = b.entry(alias.clone()).or_insert((cap, now));
            *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * cap / 60.0).min(cap);
            *at = now;
            if *tokens < 1.0 {
                let wait = ((1.0 - *tokens) * 60.0 / cap).ceil() as u64;
                return Err(ApiError::rate_limited(
                    format!("Rate limit reached for key '{alias}': {rpm} requests per minute."),
                    wait,
                ));
            }
            *tokens -= 1.0;
        }
        if let Some(max) = entry.max_concurrent {
            let prev = entry.in_flight.fetch_add(1, Ordering::AcqRel);
            if prev >= max {
                entry.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(ApiError::rate_limited(
                    format!("Too many requests in flight for key '{alias}' (limit {max})."),
                    1,
                ));
            }
            return Ok((entry.identity.clone(), Slot(Some(entry.in_flight.clone()))));
        }
        Ok((entry.identity.clone(), Slot(None)))
    }

    /// Whether the request carries the admin key (403 if not; admin endpoints are off without
    /// `server.auth.admin_key_env`).
    pub fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(want) = &self.admin else {
            return Err(ApiError::forbidden(
                "admin endpoints are disabled (server.auth.admin_key_env is not set)",
                "admin_disabled",
            ));
        };
        match presented(headers) {
            Some(k) if constant_eq(&sha256(k.as_bytes()), want) => Ok(()),
            _ => Err(ApiError::forbidden("admin key required", "admin_required")),
        }
    }
}

fn constant_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
