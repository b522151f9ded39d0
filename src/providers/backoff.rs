//! How long to wait before a retry: exponential backoff with full jitter, or what the provider
//! asked for in `Retry-After`, both capped at 10 s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest wait before one retry, whatever the backoff or the provider's `Retry-After` say.
pub(super) const MAX_DELAY: Duration = Duration::from_secs(10);

/// The wait before retry number `retry` (0 for the first retry): `Retry-After` when the
/// provider sent one, else uniform in `[0, min(base * 2^retry, 10 s)]` ("full jitter"), with
/// `random` the source of the uniform draw.
pub(super) fn delay(
    base_ms: u64,
    retry: u32,
    retry_after: Option<Duration>,
    random: u64,
) -> Duration {
    if let Some(wait) = retry_after {
        return wait.min(MAX_DELAY);
    }
    let max_ms = MAX_DELAY.as_millis() as u64;
    let ceiling = base_ms
        .saturating_mul(1u64.checked_shl(retry).unwrap_or(u64::MAX))
        .min(max_ms);
    Duration::from_millis(random % (ceiling + 1))
}

/// The wait a response asks for: `retry-after-ms` (milliseconds, sent by OpenAI) or
/// `Retry-After` in seconds. The HTTP-date form of `Retry-After` is not understood and is
/// ignored (the backoff applies).
pub(super) fn retry_after(
    retry_after_ms: Option<&str>,
    retry_after: Option<&str>,
) -> Option<Duration> {
    let parse = |s: &str, scale: f64| {
        let v: f64 = s.trim().parse().ok()?;
        (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64((v * scale).min(3600.0)))
    };
    retry_after_ms
        .and_then(|ms| parse(ms, 0.001))
        .or_else(|| retry_after.and_then(|s| parse(s, 1.0)))
}

/// A xorshift64 generator shared by the threads of one provider: jitter needs spread, not
/// quality.
#[derive(Debug)]
pub(super) struct Jitter(AtomicU64);

impl Jitter {
    /// Seeded from the clock and a process-wide counter, so providers created together differ.
    pub(super) fn from_clock() -> Jitter {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let seed = nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Jitter(AtomicU64::new(seed | 1))
    }

    pub(super) fn next(&self) -> u64 {
        let step = |mut x: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let prev = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(step(x)))
            .unwrap_or_else(|x| x);
        step(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn backoff_stays_within_the_exponential_ceiling(
            base in 0u64..100_000, retry in 0u32..80, random in any::<u64>()
        ) {
            let d = delay(base, retry, None, random);
            let ceiling = (base as u128) << retry.min(64);
            prop_assert!(d.as_millis() <= ceiling.min(10_000));
        }
    }

    #[test]
    fn backoff_spreads_over_the_whole_window() {
        let jitter = Jitter(AtomicU64::new(42));
        let draws: Vec<u128> = (0..1000)
            .map(|_| delay(100, 2, None, jitter.next()).as_millis())
            .collect();
        // Window [0, 400]: both ends are reached, nothing beyond.
        assert!(draws.iter().all(|&d| d <= 400));
        assert!(draws.iter().any(|&d| d < 40));
        assert!(draws.iter().any(|&d| d > 360));
    }

    #[test]
    fn retry_after_wins_and_is_capped_at_ten_seconds() {
        assert_eq!(
            delay(250, 0, Some(Duration::from_secs(3)), 7),
            Duration::from_secs(3)
        );
        assert_eq!(delay(250, 0, Some(Duration::from_secs(3600)), 7), MAX_DELAY);
        assert_eq!(delay(250, 0, Some(Duration::ZERO), 7), Duration::ZERO);
    }

    #[test]
    fn retry_after_headers_are_parsed() {
        assert_eq!(retry_after(None, Some("2")), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(None, Some(" 0 ")), Some(Duration::ZERO));
        assert_eq!(
            retry_after(Some("1500"), Some("9")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(None, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            None
        );
        assert_eq!(retry_after(None, Some("-1")), None);
        assert_eq!(retry_after(None, None), None);
    }

    #[test]
    fn jitter_generators_seeded_together_differ() {
        let a = Jitter::from_clock();
        let b = Jitter::from_clock();
        let xs: Vec<u64> = (0..4).map(|_| a.next()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next()).collect();
        assert_ne!(xs, ys);
    }
}
