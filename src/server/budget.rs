//! Per-key token budgets (`tokens_per_minute`, `tokens_per_day` of `[server.auth.keys.NAME]`):
//! what each key has spent, kept across configuration reloads (a reload must not hand out a new
//! day), checked before a request runs and charged with its tokens when it ends.
//!
//! The minute budget is a bucket of `tokens_per_minute` refilled continuously; an answer is
//! charged whole when it ends, so the bucket can go below zero, and the key waits until it is
//! above zero again. The day budget counts the tokens of the current UTC day.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::auth::Identity;
use super::error::ApiError;

#[derive(Debug)]
struct Spent {
    /// Tokens left in the minute bucket (negative after an answer larger than what was left).
    minute: f64,
    at: Instant,
    /// Days since the epoch (UTC) that `day` counts.
    day_index: u64,
    day: u64,
}

/// A 429 for a spent budget (its own `code`, so `corral_rate_limited_total{cause}` tells it
/// from the request-rate and concurrency limits).
fn spent(message: String, wait: u64) -> ApiError {
    let mut e = ApiError::rate_limited(message, wait);
    e.code = Some("token_budget_exceeded");
    e
}

/// What every key has spent, by key alias.
#[derive(Debug, Default)]
pub struct Budgets(Mutex<HashMap<String, Spent>>);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Budgets {
    fn with<T>(&self, ident: &Identity, f: impl FnOnce(&mut Spent, u64) -> T) -> Option<T> {
        let alias = ident.key_alias.as_deref()?;
        if ident.tokens_per_minute.is_none() && ident.tokens_per_day.is_none() {
            return None;
        }
        let mut m = crate::server::lock(&self.0);
        let now = Instant::now();
        let secs = now_secs();
        let cap = ident.tokens_per_minute.unwrap_or(0) as f64;
        let s = m.entry(alias.to_string()).or_insert(Spent {
            minute: cap,
            at: now,
            day_index: secs / 86_400,
            day: 0,
        });
        if cap > 0.0 {
            s.minute = (s.minute + now.duration_since(s.at).as_secs_f64() * cap / 60.0).min(cap);
        }
        s.at = now;
        if s.day_index != secs / 86_400 {
            s.day_index = secs / 86_400;
            s.day = 0;
        }
        Some(f(s, secs))
    }

    /// 429 (OpenAI's `rate_limit_error`, with `Retry-After`) when the caller's key has no
    /// tokens left this minute or this day.
    pub fn check(&self, ident: &Identity) -> Result<(), ApiError> {
        let alias = ident.key_alias.clone().unwrap_or_default();
        self.with(ident, |s, secs| {
            if let Some(tpd) = ident.tokens_per_day {
                if s.day >= tpd {
                    let wait = 86_400 - secs % 86_400;
                    return Err(spent(
                        format!(
                            "Token budget spent for key '{alias}': {} of {tpd} tokens per day (UTC).",
                            s.day
                        ),
                        wait,
                    ));
                }
            }
            if let Some(tpm) = ident.tokens_per_minute {
                if s.minute <= 0.0 {
                    let rate = tpm as f64 / 60.0;
                    let wait = ((1.0 - s.minute) / rate).ceil().max(1.0) as u64;
                    return Err(spent(
                        format!("Token budget spent for key '{alias}': {tpm} tokens per minute."),
                        wait,
                    ));
                }
            }
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    /// Charges an answer's tokens to the caller's key.
    pub fn charge(&self, ident: &Identity, tokens: u64) {
        self.with(ident, |s, _| {
            if let Some(tpm) = ident.tokens_per_minute {
                // Overdrawn by at most a minute's worth: a key waits a minute at most.
                s.minute = (s.minute - tokens as f64).max(-(tpm as f64));
            }
            s.day += tokens;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tpm: Option<u64>, tpd: Option<u64>) -> Identity {
        Identity {
            key_alias: Some("k".into()),
            tokens_per_minute: tpm,
            tokens_per_day: tpd,
            ..Identity::default()
        }
    }

    #[test]
    fn minute_and_day_budgets() {
        let b = Budgets::default();
        let k = key(Some(600), None);
        assert!(b.check(&k).is_ok());
        // One large answer overdraws the bucket: refused until it refills (10 tokens/s).
        b.charge(&k, 650);
        let e = b.check(&k).unwrap_err();
        assert_eq!(e.status.as_u16(), 429);
        assert!(
            (5..=6).contains(&e.retry_after.unwrap()),
            "{:?}",
            e.retry_after
        );
        // The day budget, on its own key.
        let d = Identity {
            key_alias: Some("d".into()),
            ..key(None, Some(100))
        };
        b.charge(&d, 99);
        assert!(b.check(&d).is_ok());
        b.charge(&d, 1);
        let e = b.check(&d).unwrap_err();
        assert!(
            e.message.contains("100 of 100 tokens per day"),
            "{}",
            e.message
        );
        assert!(e.retry_after.unwrap() <= 86_400);
        // A day-only key's spending does not count against a minute budget added later (a
        // reload): the bucket only moves while there is one.
        let later = Identity {
            key_alias: Some("d2".into()),
            ..key(None, Some(1_000_000))
        };
        b.charge(&later, 50_000);
        let with_minute = Identity {
            key_alias: Some("d2".into()),
            ..key(Some(600), Some(1_000_000))
        };
        assert!(b.check(&with_minute).is_ok());
        // The 429 says which limit: its own code.
        assert_eq!(e.code, Some("token_budget_exceeded"));
        // Keys without budgets, and anonymous callers, are never refused.
        let free = Identity::default();
        b.charge(&free, 1_000_000);
        assert!(b.check(&free).is_ok());
    }
}
