//! `max_bandwidth_mbps`: one token bucket per direction shared by all of a sandbox's connections.

use super::*;

/// A shared token bucket with debt: a writer takes what it needs and sleeps off any deficit,
/// so concurrent connections share the rate.
#[derive(Debug)]
pub(super) struct Bucket {
    pub(super) rate: f64,
    pub(super) burst: f64,
    pub(super) state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub(super) fn new(bytes_per_sec: u64) -> Bucket {
        let rate = bytes_per_sec.max(1) as f64;
        // A tenth of a second of burst, at least one chunk.
        let burst = (rate / 10.0).max(CHUNK as f64);
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `n` bytes' worth, sleeping off any debt; returns false if `stop` was raised
    /// meanwhile (the sleep is cut into slices that check it).
    pub(super) fn take(&self, n: usize, stop: &AtomicBool) -> bool {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let (tokens, last) = *s;
            let tokens = (tokens + (now - last).as_secs_f64() * self.rate).min(self.burst);
            let left = tokens - n as f64;
            *s = (left, now);
            if left < 0.0 {
                Duration::from_secs_f64(-left / self.rate)
            } else {
                Duration::ZERO
            }
        };
        let until = Instant::now() + wait;
        loop {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}
