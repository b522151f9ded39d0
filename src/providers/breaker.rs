//! The circuit breaker of one provider, as a state machine with the time passed in.
//!
//! Closed: requests go through; `threshold` consecutive failed requests open the circuit.
//! Open: requests are refused without touching the network until `cooldown` has passed.
//! Half-open: one trial request goes through (others are still refused); its success closes
//! the circuit, its failure opens it for another `cooldown`.

use std::time::{Duration, Instant};

/// Where a provider's circuit breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests go through.
    Closed,
    /// Requests are refused for another `retry_in_ms`.
    Open { retry_in_ms: u64 },
    /// The cooldown is over: the next request is a trial whose outcome closes or re-opens it.
    HalfOpen,
}

/// How a request was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// The circuit is closed.
    Normal,
    /// The one trial of a half-open circuit.
    Trial,
}

/// A request refused by an open circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refused {
    pub failures: u32,
    pub retry_in_ms: u64,
}

/// A state change worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transition {
    Opened,
    HalfOpened,
    Reopened,
    Closed,
}

#[derive(Debug)]
pub(super) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    /// Consecutive failed requests.
    failures: u32,
    /// When the circuit last opened; `None` while closed.
    opened_at: Option<Instant>,
    trial_in_flight: bool,
}

impl Breaker {
    pub(super) fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            opened_at: None,
            trial_in_flight: false,
        }
    }

    pub(super) fn failures(&self) -> u32 {
        self.failures
    }

    pub(super) fn state(&self, now: Instant) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(at) => {
                let elapsed = now.saturating_duration_since(at);
                if elapsed < self.cooldown {
                    BreakerState::Open {
                        retry_in_ms: ceil_ms(self.cooldown - elapsed),
                    }
                } else {
                    BreakerState::HalfOpen
                }
            }
        }
    }

    /// Lets a request through, or says how long the circuit stays open. A trial already in
    /// flight refuses the others with `retry_in_ms` 0: the circuit's fate is being decided.
    pub(super) fn admit(
        &mut self,
        now: Instant,
    ) -> Result<(Admission, Option<Transition>), Refused> {
        match self.state(now) {
            BreakerState::Closed => Ok((Admission::Normal, None)),
            BreakerState::Open { retry_in_ms } => Err(Refused {
                failures: self.failures,
                retry_in_ms,
            }),
            BreakerState::HalfOpen if self.trial_in_flight => Err(Refused {
                failures: self.failures,
                retry_in_ms: 0,
            }),
            BreakerState::HalfOpen => {
                self.trial_in_flight = true;
                Ok((Admission::Trial, Some(Transition::HalfOpened)))
            }
        }
    }

    /// The provider answered (successfully, or with an error that is the caller's fault).
    pub(super) fn on_healthy(&mut self, admission: Admission) -> Option<Transition> {
        if admission == Admission::Trial {
            self.trial_in_flight = false;
        }
        self.failures = 0;
        self.opened_at.take().map(|_| Transition::Closed)
    }

    /// The request failed for the provider's reasons, retries included.
    pub(super) fn on_failure(&mut self, admission: Admission, now: Instant) -> Option<Transition> {
        self.failures = self.failures.saturating_add(1);
        match admission {
            Admission::Trial => {
                self.trial_in_flight = false;
                self.opened_at = Some(now);
                Some(Transition::Reopened)
            }
            // A request let through before the circuit opened does not extend the cooldown.
            Admission::Normal if self.opened_at.is_some() => None,
            Admission::Normal if self.failures >= self.threshold => {
                self.opened_at = Some(now);
                Some(Transition::Opened)
            }
            Admission::Normal => None,
        }
    }
}

fn ceil_ms(d: Duration) -> u64 {
    let ms = d.as_millis();
    let ms = if d > Duration::from_millis(ms as u64) {
        ms + 1
    } else {
        ms
    };
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_millis(1000);

    #[test]
    fn consecutive_failures_open_the_circuit() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, COOLDOWN);
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Ok((Admission::Normal, None)));
            assert_eq!(b.on_failure(Admission::Normal, t0), None);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert_eq!(
            b.on_failure(Admission::Normal, t0),
            Some(Transition::Opened)
        );
        assert_eq!(b.state(t0), BreakerState::Open { retry_in_ms: 1000 });
        let later = t0 + Duration::from_millis(400);
        assert_eq!(
            b.admit(later),
            Err(Refused {
                failures: 3,
                retry_in_ms: 600
            })
        );
    }

    #[test]
    fn a_healthy_answer_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, COOLDOWN);
        b.on_failure(Admission::Normal, t0);
        assert_eq!(b.on_healthy(Admission::Normal), None);
        b.on_failure(Admission::Normal, t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert_eq!(b.failures(), 1);
    }

    #[test]
    fn after_the_cooldown_one_trial_decides() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOLDOWN);
        b.on_failure(Admission::Normal, t0);
        let t1 = t0 + COOLDOWN;
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert_eq!(
            b.admit(t1),
            Ok((Admission::Trial, Some(Transition::HalfOpened)))
        );
        // A second caller while the trial is out is refused.
        assert_eq!(
            b.admit(t1),
            Err(Refused {
                failures: 1,
                retry_in_ms: 0
            })
        );
        // The trial fails: open for another full cooldown.
        assert_eq!(
            b.on_failure(Admission::Trial, t1),
            Some(Transition::Reopened)
        );
        assert_eq!(b.state(t1), BreakerState::Open { retry_in_ms: 1000 });
        let t2 = t1 + COOLDOWN;
        assert_eq!(b.admit(t2).map(|a| a.0), Ok(Admission::Trial));
        assert_eq!(b.on_healthy(Admission::Trial), Some(Transition::Closed));
        assert_eq!(b.state(t2), BreakerState::Closed);
        assert_eq!(b.failures(), 0);
        assert_eq!(b.admit(t2), Ok((Admission::Normal, None)));
    }

    #[test]
    fn late_failures_do_not_extend_an_open_circuit() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOLDOWN);
        b.on_failure(Admission::Normal, t0);
        let t1 = t0 + Duration::from_millis(900);
        assert_eq!(b.on_failure(Admission::Normal, t1), None);
        assert_eq!(b.state(t1), BreakerState::Open { retry_in_ms: 100 });
    }

    #[test]
    fn retry_in_rounds_up() {
        assert_eq!(ceil_ms(Duration::from_micros(1)), 1);
        assert_eq!(ceil_ms(Duration::from_millis(5)), 5);
        assert_eq!(ceil_ms(Duration::ZERO), 0);
    }
}
