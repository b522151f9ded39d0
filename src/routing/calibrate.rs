//! Confidence monitoring, feedback and threshold calibration.
//!
//! The [`Monitor`] keeps, per (model, task type), how many answers were scored, their confidence
//! distribution and how many were escalated; [`Monitor::feedback`] records the quality a caller
//! reports for a past request id against the decision that was made for it. [`calibrate`] picks
//! a per-task threshold from such labelled samples:
//!
//! > the lowest threshold such that, among the answers scoring at or above it, the one-sided 95%
//! > Wilson upper bound on the error rate is at most `1 - target_accuracy`, with at least
//! > `min_accepted` such answers.
//!
//! Using the upper confidence bound rather than the observed error rate is what keeps small
//! samples from over-accepting: with 5 answers all correct the observed error is 0%, but the bound
//! is 35%, so a 90% target is not met until enough evidence accumulates. When no threshold meets
//! the target, the task gets none (everything escalates) and the result says so.
//!
//! Feedback on an answer that carried confidence features (every local answer does) is also kept
//! per model as a [`Labelled`] row: `/admin/monitor` measures the calibrator in force on them and
//! `POST /admin/calibrator` refits one from them with the evaluation's own fitting code
//! ([`crate::confidence::calibrator`]).

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use super::task::TaskType;
use crate::confidence::calibrator::Labelled;

/// One labelled answer: its confidence score and whether it was good enough.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    pub score: f64,
    pub correct: bool,
}

/// The outcome of calibrating one task's threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// Accept answers scoring at least this; `None`: no threshold meets the target.
    pub threshold: Option<f64>,
    /// Labelled answers that would have been accepted, and how many of those were wrong.
    pub accepted: usize,
    pub errors: usize,
    /// The one-sided upper confidence bound on the error rate of accepted answers.
    pub error_upper_bound: f64,
    pub samples: usize,
}

/// One-sided 95% normal quantile.
pub const Z95: f64 = 1.6449;

/// Wilson score upper bound of a binomial proportion (`k` of `n`) at quantile `z`.
pub fn wilson_upper(k: usize, n: usize, z: f64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre + spread) / (1.0 + z2 / n)).min(1.0)
}

/// See the module documentation.
pub fn calibrate(samples: &[Sample], target_accuracy: f64, min_accepted: usize) -> Calibration {
    let mut s: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.score.is_finite())
        .collect();
    s.sort_by(|a, b| b.score.total_cmp(&a.score));
    let max_error = 1.0 - target_accuracy;
    let mut best = Calibration {
        threshold: None,
        accepted: 0,
        errors: 0,
        error_upper_bound: 1.0,
        samples: s.len(),
    };
    let mut errors = 0;
    for (i, x) in s.iter().enumerate() {
        errors += usize::from(!x.correct);
        // A threshold sits at a score: it accepts every answer scoring at least that much, so
        // only the last of a run of equal scores is a candidate.
        if s.get(i + 1).is_some_and(|next| next.score == x.score) {
            continue;
        }
        let n = i + 1;
        let ub = wilson_upper(errors, n, Z95);
        if n >= min_accepted && ub <= max_error {
            best = Calibration {
                threshold: Some(x.score),
                accepted: n,
                errors,
                error_upper_bound: ub,
                samples: s.len(),
            };
        }
    }
    best
}

/// Per (model, task) counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub answers: u64,
    pub escalated: u64,
    /// Confidence histogram in tenths: `[0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]`.
    pub histogram: [u64; 10],
    /// Labelled samples from feedback.
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

impl Stats {
    pub fn escalation_rate(&self) -> f64 {
        if self.answers == 0 {
            0.0
        } else {
            self.escalated as f64 / self.answers as f64
        }
    }
}

/// What was decided for a request, kept so that feedback can be matched to it.
#[derive(Debug, Clone)]
struct Decided {
    request_id: String,
    model: String,
    task: TaskType,
    score: f64,
    /// The answer's confidence features, when it had any.
    features: Option<Vec<f64>>,
}

/// Counts, confidence distributions, escalation rates, and feedback, per model and task type.
#[derive(Debug, Clone, Default)]
pub struct Monitor {
    stats: BTreeMap<(String, TaskType), Stats>,
    /// Recent decisions, oldest first (bounded: feedback for very old requests is refused).
    recent: VecDeque<Decided>,
    capacity: usize,
    /// Labelled answers with their features, per model: what a calibrator is refitted on.
    labelled: BTreeMap<String, Vec<Labelled>>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeedbackError {
    #[error("no decision on record for request {0} (unknown, or too old)")]
    Unknown(String),
    #[error("actual_quality must be within 0..=1, not {0}")]
    Quality(f64),
}

impl Monitor {
    /// Remembers the last `capacity` decisions for feedback.
    pub fn new(capacity: usize) -> Monitor {
        Monitor {
            capacity: capacity.max(1),
            ..Monitor::default()
        }
    }

    /// An SLM answer was scored (and accepted or escalated).
    pub fn record(
        &mut self,
        request_id: &str,
        model: &str,
        task: &TaskType,
        score: f64,
        features: Option<Vec<f64>>,
        escalated: bool,
    ) {
        let st = self
            .stats
            .entry((model.to_string(), task.clone()))
            .or_default();
        st.answers += 1;
        st.escalated += u64::from(escalated);
        let bucket = ((score.clamp(0.0, 1.0) * 10.0) as usize).min(9);
        st.histogram[bucket] += 1;
        if self.recent.len() == self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back(Decided {
            request_id: request_id.to_string(),
            model: model.to_string(),
            task: task.clone(),
            score,
            features,
        });
    }

    /// Records the quality a caller reports for a past request (`actual_quality` in 0..=1;
    /// at least `good` counts as correct).
    pub fn feedback(
        &mut self,
        request_id: &str,
        actual_quality: f64,
        good: f64,
    ) -> Result<(), FeedbackError> {
        if !(0.0..=1.0).contains(&actual_quality) {
            return Err(FeedbackError::Quality(actual_quality));
        }
        let d = self
            .recent
            .iter()
            .rev()
            .find(|d| d.request_id == request_id)
            .cloned()
            .ok_or_else(|| FeedbackError::Unknown(request_id.to_string()))?;
        let correct = actual_quality >= good;
        if let Some(features) = d.features {
            let labelled = self.labelled.entry(d.model.clone()).or_default();
            if labelled.len() == self.capacity {
                labelled.remove(0);
            }
            labelled.push(Labelled {
                features,
                task: d.task.as_str().to_string(),
                correct,
                group: String::new(),
            });
        }
        self.stats
            .entry((d.model, d.task))
            .or_default()
            .samples
            .push(Sample {
                score: d.score,
                correct,
            });
        Ok(())
    }

    /// The labelled answers of `model` that carry features (oldest first).
    pub fn labelled(&self, model: &str) -> &[Labelled] {
        self.labelled.get(model).map_or(&[], Vec::as_slice)
    }

    /// Models with labelled answers.
    pub fn labelled_models(&self) -> impl Iterator<Item = &str> {
        self.labelled.keys().map(String::as_str)
    }

    pub fn stats(&self) -> impl Iterator<Item = (&(String, TaskType), &Stats)> {
        self.stats.iter()
    }

    /// Calibrated thresholds per task type from all feedback (all models pooled).
    pub fn calibrate(
        &self,
        target_accuracy: f64,
        min_accepted: usize,
    ) -> BTreeMap<TaskType, Calibration> {
        let mut by_task: BTreeMap<TaskType, Vec<Sample>> = BTreeMap::new();
        for ((_, task), st) in &self.stats {
            by_task.entry(task.clone()).or_default().extend(&st.samples);
        }
        by_task
            .into_iter()
            .map(|(t, s)| (t, calibrate(&s, target_accuracy, min_accepted)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_bound_is_wide_for_small_samples() {
        assert!((wilson_upper(0, 5, Z95) - 0.351).abs() < 0.01);
        assert!(wilson_upper(0, 100, Z95) < 0.03);
        assert!((wilson_upper(10, 100, Z95) - 0.1604).abs() < 0.002);
        assert_eq!(wilson_upper(0, 0, Z95), 1.0);
    }

    #[test]
    fn small_samples_do_not_over_accept() {
        // Five perfect answers: observed accuracy 100%, but not enough to promise 90%.
        let five: Vec<Sample> = (0..5)
            .map(|i| Sample {
                score: 0.9 - i as f64 * 0.01,
                correct: true,
            })
            .collect();
        assert_eq!(calibrate(&five, 0.9, 1).threshold, None);
        // Forty perfect answers above 0.6, noise below: the threshold lands at the boundary.
        let mut s: Vec<Sample> = (0..40)
            .map(|i| Sample {
                score: 0.6 + i as f64 * 0.01,
                correct: true,
            })
            .collect();
        s.extend((0..40).map(|i| Sample {
            score: 0.2 + i as f64 * 0.01,
            correct: i % 2 == 0,
        }));
        let c = calibrate(&s, 0.9, 10);
        let t = c.threshold.unwrap();
        assert!((0.55..=0.62).contains(&t), "{c:?}");
        assert!(c.error_upper_bound <= 0.1);
        // A stricter target moves the threshold up, never down.
        let strict = calibrate(&s, 0.93, 10).threshold.unwrap();
        assert!(strict >= t);
    }

    #[test]
    fn feedback_matches_decisions_and_feeds_calibration() {
        let mut m = Monitor::new(100);
        let qa = TaskType::QA;
        for i in 0..60 {
            let score = i as f64 / 60.0;
            m.record(&format!("r{i}"), "smol", &qa, score, None, score < 0.5);
            m.feedback(&format!("r{i}"), if score > 0.4 { 1.0 } else { 0.0 }, 0.5)
                .unwrap();
        }
        let (_, st) = m.stats().next().unwrap();
        assert_eq!(st.answers, 60);
        assert_eq!(st.escalated, 30);
        assert_eq!(st.histogram.iter().sum::<u64>(), 60);
        assert_eq!(
            m.feedback("nope", 1.0, 0.5),
            Err(FeedbackError::Unknown("nope".into()))
        );
        assert_eq!(m.feedback("r1", 2.0, 0.5), Err(FeedbackError::Quality(2.0)));
        let cal = m.calibrate(0.9, 10);
        let t = cal[&qa].threshold.unwrap();
        assert!((0.4..0.5).contains(&t), "{cal:?}");
        // Answers without features (none were given) leave nothing to refit on.
        assert!(m.labelled("smol").is_empty());
    }

    #[test]
    fn labelled_features_are_kept_per_model_and_bounded() {
        let mut m = Monitor::new(3);
        for i in 0..5 {
            let f = vec![i as f64; 2];
            m.record(&format!("r{i}"), "smol", &TaskType::QA, 0.5, Some(f), false);
            m.feedback(&format!("r{i}"), if i % 2 == 0 { 1.0 } else { 0.2 }, 0.5)
                .unwrap();
        }
        let l = m.labelled("smol");
        assert_eq!(l.len(), 3, "the oldest labels go first");
        assert_eq!(l[0].features, vec![2.0, 2.0]);
        assert_eq!(
            l.iter().map(|s| s.correct).collect::<Vec<_>>(),
            [true, false, true]
        );
        assert_eq!(l[0].task, "QA");
        assert_eq!(m.labelled_models().collect::<Vec<_>>(), ["smol"]);
    }
}
