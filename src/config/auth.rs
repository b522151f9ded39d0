//! The `[server.auth]` section: its serde form and the validated form the server's
//! authentication runs with. Errors are `(key, message)` for `config` to place in its file.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `[server.auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    /// `[server.auth.keys.NAME]`: the API keys callers present as `Authorization: Bearer KEY`.
    /// NAME is the key alias policies match on.
    pub keys: BTreeMap<String, RawApiKey>,
    /// Environment variable holding the admin key (admin endpoints are off without it).
    pub admin_key_env: Option<String>,
    /// Serve callers without a key (as the anonymous identity). Refused unless `server.bind` is a
    /// loopback address, since nothing else would stand between the network and the models.
    pub allow_unauthenticated: bool,
}

/// `[server.auth.keys.NAME]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApiKey {
    /// SHA-256 of the key, hex (`printf %s "$KEY" | sha256sum`): the file never holds the key.
    pub sha256: Option<String>,
    /// Or: the environment variable holding the key.
    pub env: Option<String>,
    /// The agent id this key speaks for (allow lists and policies match on it).
    pub agent: Option<String>,
    pub team: Option<String>,
    /// Requests per minute (token bucket; absent: unlimited).
    pub requests_per_minute: Option<u32>,
    /// Requests in flight at once (absent: unlimited).
    pub max_concurrent: Option<u32>,
    /// Tokens (prompt plus completion, local or remote) per minute: a bucket refilled
    /// continuously; a key whose bucket is empty gets 429 until it refills (absent: unlimited).
    pub tokens_per_minute: Option<u64>,
    /// Tokens per UTC day; spent, 429 until midnight UTC (absent: unlimited).
    pub tokens_per_day: Option<u64>,
}

/// Where a key's secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySecret {
    Sha256([u8; 32]),
    Env(String),
}

/// A validated API key.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub alias: String,
    pub secret: KeySecret,
    pub agent: Option<String>,
    pub team: Option<String>,
    pub requests_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub keys: Vec<ApiKey>,
    pub admin_key_env: Option<String>,
    pub allow_unauthenticated: bool,
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn compile_auth(raw: &RawAuth, loopback: bool) -> Result<AuthConfig, (String, String)> {
    let mut keys = Vec::new();
    let mut hashes = std::collections::BTreeSet::new();
    for (alias, k) in &raw.keys {
        let key = format!("server.auth.keys.{alias}");
        let secret = match (&k.sha256, &k.env) {
            (Some(h), None) => KeySecret::Sha256(parse_hex32(h).ok_or_else(|| {
                (
                    format!("{key}.sha256"),
                    "expected 64 hex digits (the SHA-256 of the key)".to_string(),
                )
            })?),
            (None, Some(v)) if !v.is_empty() => KeySecret::Env(v.clone()),
            (Some(_), Some(_)) => {
                return Err((key, "give sha256 or env, not both".into()));
            }
            _ => return Err((key, "needs sha256 or env".into())),
        };
        if let KeySecret::Sha256(h) = &secret {
            if !hashes.insert(*h) {
                return Err((
                    format!("{key}.sha256"),
                    "the same key is listed twice".into(),
                ));
            }
        }
        for (field, v) in [
            ("requests_per_minute", k.requests_per_minute.map(u64::from)),
            ("max_concurrent", k.max_concurrent.map(u64::from)),
            ("tokens_per_minute", k.tokens_per_minute),
            ("tokens_per_day", k.tokens_per_day),
        ] {
            if v == Some(0) {
                return Err((
                    format!("{key}.{field}"),
                    "must be > 0 (leave it out for no limit)".into(),
                ));
            }
        }
        keys.push(ApiKey {
            alias: alias.clone(),
            secret,
            agent: k.agent.clone(),
            team: k.team.clone(),
            requests_per_minute: k.requests_per_minute,
            max_concurrent: k.max_concurrent,
            tokens_per_minute: k.tokens_per_minute,
            tokens_per_day: k.tokens_per_day,
        });
    }
    if raw.allow_unauthenticated && !loopback {
        return Err((
            "server.auth.allow_unauthenticated".into(),
            "only allowed when server.bind is a loopback address".into(),
        ));
    }
    if keys.is_empty() && !raw.allow_unauthenticated && !loopback {
        return Err((
            "server.auth.keys".into(),
            "no API keys: a server bound beyond loopback needs [server.auth.keys.NAME]".into(),
        ));
    }
    Ok(AuthConfig {
        keys,
        admin_key_env: raw.admin_key_env.clone().filter(|v| !v.is_empty()),
        // On loopback with no keys at all, callers are anonymous (the quick-start case).
        allow_unauthenticated: raw.allow_unauthenticated || raw.keys.is_empty(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_need_exactly_one_secret_and_open_access_stays_on_loopback() {
        let mut raw = RawAuth::default();
        raw.keys.insert("ci".into(), RawApiKey::default());
        assert_eq!(
            compile_auth(&raw, true).unwrap_err().1,
            "needs sha256 or env"
        );
        raw.keys.get_mut("ci").unwrap().sha256 = Some("zz".into());
        assert!(compile_auth(&raw, true)
            .unwrap_err()
            .0
            .ends_with("ci.sha256"));
        raw.keys.get_mut("ci").unwrap().sha256 = Some(hex(&sha256(b"k")));
        let a = compile_auth(&raw, false).unwrap();
        assert_eq!(a.keys[0].secret, KeySecret::Sha256(sha256(b"k")));
        assert!(!a.allow_unauthenticated);
        let open = RawAuth::default();
        assert!(compile_auth(&open, true).unwrap().allow_unauthenticated);
        assert!(compile_auth(&open, false).is_err());
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
