//! The learned confidence: a logistic regression from an answer's [`features`] and its task type
//! to the probability that the answer is correct, fitted per model on a labelled set
//! (`examples/eval-confidence.rs` on `examples/data/confidence-set.jsonl`) or on the labels
//! `/admin/feedback` collected, with the same code. The fit is stored as JSON beside the model's
//! catalog entry (`models/calibrators/`) and loaded by the supervisor.
//!
//! Why our own fit rather than a crate: the model is ~30 weights fitted by Newton's method on at
//! most a few thousand rows, which is 150 lines with no numerical subtlety; the ML crates that
//! offer it (linfa-logistic over ndarray and argmin) would add a large dependency tree to the
//! supervisor for it, and this one is deterministic and reviewable in place.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::features::{self, Features};

/// The calibrator in force for each model, shared by the configuration, the answer pipeline and
/// the admin endpoint that refits one from feedback.
#[derive(Debug, Clone, Default)]
pub struct Calibrators(Arc<RwLock<BTreeMap<String, Arc<Calibrator>>>>);

impl Calibrators {
    pub fn new(map: BTreeMap<String, Calibrator>) -> Calibrators {
        Calibrators(Arc::new(RwLock::new(
            map.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        )))
    }

    pub fn get(&self, model: &str) -> Option<Arc<Calibrator>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(model)
            .cloned()
    }

    /// Puts `c` in force for `model` (a refit from feedback).
    pub fn set(&self, model: &str, c: Calibrator) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(model.to_string(), Arc::new(c));
    }
}

/// The file format's version.
pub const VERSION: u32 = 1;

/// One labelled answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Labelled {
    pub features: Vec<f64>,
    /// The router's task type for the request (`QA`, `Reasoning`, ...).
    pub task: String,
    pub correct: bool,
    /// What kind of question it was (the evaluation set's kinds; empty when unknown): the
    /// penalty is chosen by leaving out one kind at a time, so that it suits kinds not seen.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
}

/// The cross-validation fold of each row of `data`: one fold per group when there are at least
/// three groups, else five by position.
fn folds(data: &[Labelled]) -> (Vec<usize>, usize) {
    let mut groups: Vec<&str> = data.iter().map(|s| s.group.as_str()).collect();
    groups.sort_unstable();
    groups.dedup();
    if groups.len() >= 3 && !groups.contains(&"") {
        let ids = data
            .iter()
            .map(|s| groups.binary_search(&s.group.as_str()).unwrap_or(0))
            .collect();
        return (ids, groups.len());
    }
    let k = 5.min(data.len()).max(1);
    ((0..data.len()).map(|i| i % k).collect(), k)
}

/// The rows of `data` outside fold `f`.
fn outside(data: &[Labelled], fold: &[usize], f: usize) -> Vec<Labelled> {
    data.iter()
        .zip(fold)
        .filter(|(_, k)| **k != f)
        .map(|(s, _)| s.clone())
        .collect()
}

/// A fitted calibrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibrator {
    pub version: u32,
    /// The model it was fitted for.
    pub model: String,
    /// The feature names, in order ([`features::NAMES`]).
    pub features: Vec<String>,
    /// Task types with their own weight (others share the intercept).
    pub tasks: Vec<String>,
    /// Standardisation of each feature: (x - mean) / scale.
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
    /// The range each feature had in the fit: a value outside it is clipped to it before the
    /// weights apply, so an answer unlike any the fit saw (a 200-token answer to a fit on
    /// 12-token ones, a long system prompt) is not extrapolated linearly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub low: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub high: Vec<f64>,
    /// One weight per feature, then one per task.
    pub weights: Vec<f64>,
    pub bias: f64,
    /// The L2 penalty it was fitted with (chosen by cross-validation).
    pub l2: f64,
    /// What it was fitted on, in words (file, split, count).
    #[serde(default)]
    pub fitted_on: String,
    #[serde(default)]
    pub items: usize,
    #[serde(default)]
    pub correct: usize,
}

impl Calibrator {
    /// Reads a calibrator file, refusing one made for other features.
    pub fn from_json(text: &str) -> Result<Calibrator, String> {
        let c: Calibrator = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if c.version != VERSION {
            return Err(format!(
                "calibrator version {} (this build reads {VERSION})",
                c.version
            ));
        }
        if c.features.iter().map(String::as_str).ne(features::NAMES) {
            return Err(format!(
                "calibrator features {:?} are not this build's {:?}",
                c.features,
                features::NAMES
            ));
        }
        let d = features::NAMES.len();
        let ranges = (c.low.is_empty() && c.high.is_empty())
            || (c.low.len() == d
                && c.high.len() == d
                && c.low.iter().zip(&c.high).all(|(l, h)| l <= h));
        let ok = ranges
            && c.mean.len() == d
            && c.scale.len() == d
            && c.weights.len() == d + c.tasks.len()
            && c.scale.iter().all(|s| s.is_finite() && *s > 0.0)
            && c.mean.iter().chain(&c.weights).all(|v| v.is_finite())
            && c.bias.is_finite();
        if !ok {
            return Err("calibrator weights do not match its features or are not finite".into());
        }
        Ok(c)
    }

    /// The probability that an answer with `f` for a request of type `task` is correct;
    /// `None` when a feature is not a number.
    pub fn predict(&self, f: &Features, task: &str) -> Option<f64> {
        let p = self.predict_values(&f.values, task);
        p.is_finite().then_some(p)
    }

    pub fn predict_values(&self, values: &[f64], task: &str) -> f64 {
        let x = self.row(values, task);
        sigmoid(self.bias + dot(&self.weights, &x))
    }

    /// The standardised row: features (clipped to the fit's range), then the task's one-hot.
    fn row(&self, values: &[f64], task: &str) -> Vec<f64> {
        let mut x: Vec<f64> = values
            .iter()
            .enumerate()
            .zip(self.mean.iter().zip(&self.scale))
            .map(|((i, v), (m, s))| {
                let v = match (self.low.get(i), self.high.get(i)) {
                    (Some(l), Some(h)) => v.clamp(*l, *h),
                    _ => *v,
                };
                (v - m) / s
            })
            .collect();
        x.extend(self.tasks.iter().map(|t| f64::from(u8::from(t == task))));
        x
    }

    /// Fits a calibrator for `model` on `data`, choosing the L2 penalty by cross-validated
    /// log-loss ([`folds`]: leaving out one kind of question at a time when the data says its
    /// kinds). `None` without both correct and wrong answers.
    pub fn fit(model: &str, data: &[Labelled], fitted_on: &str) -> Option<Calibrator> {
        let pos = data.iter().filter(|s| s.correct).count();
        if pos == 0 || pos == data.len() {
            return None;
        }
        let grid = [0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0];
        let (fold, k) = folds(data);
        let mut best = (f64::INFINITY, 30.0);
        for l2 in grid {
            let mut loss = 0.0;
            for f in 0..k {
                let Some(c) = Self::fit_with(model, &outside(data, &fold, f), l2, "") else {
                    loss = f64::INFINITY;
                    break;
                };
                for (s, _) in data.iter().zip(&fold).filter(|(_, g)| **g == f) {
                    let p = c
                        .predict_values(&s.features, &s.task)
                        .clamp(1e-6, 1.0 - 1e-6);
                    loss -= if s.correct { p.ln() } else { (1.0 - p).ln() };
                }
            }
            if loss < best.0 {
                best = (loss, l2);
            }
        }
        Self::fit_with(model, data, best.1, fitted_on)
    }

    /// Fits with a given penalty (Newton's method on the penalised log-likelihood; the
    /// intercept is not penalised).
    pub fn fit_with(
        model: &str,
        data: &[Labelled],
        l2: f64,
        fitted_on: &str,
    ) -> Option<Calibrator> {
        let d = features::NAMES.len();
        if data.is_empty()
            || data
                .iter()
                .any(|s| s.features.len() != d || s.features.iter().any(|v| !v.is_finite()))
        {
            return None;
        }
        let n = data.len() as f64;
        let mut mean = vec![0.0; d];
        for s in data {
            for (m, v) in mean.iter_mut().zip(&s.features) {
                *m += v / n;
            }
        }
        let mut scale = vec![0.0; d];
        for s in data {
            for ((q, v), m) in scale.iter_mut().zip(&s.features).zip(&mean) {
                *q += (v - m) * (v - m) / n;
            }
        }
        for q in &mut scale {
            // A constant feature keeps scale 1 (it then contributes nothing).
            *q = if *q > 1e-12 { q.sqrt() } else { 1.0 };
        }
        let mut low = vec![f64::INFINITY; d];
        let mut high = vec![f64::NEG_INFINITY; d];
        for s in data {
            for (i, v) in s.features.iter().enumerate() {
                low[i] = low[i].min(*v);
                high[i] = high[i].max(*v);
            }
        }
        // Tasks seen at least 5 times get their own weight.
        let mut tasks: Vec<String> = Vec::new();
        for s in data {
            if !tasks.contains(&s.task) && data.iter().filter(|t| t.task == s.task).count() >= 5 {
                tasks.push(s.task.clone());
            }
        }
        tasks.sort();
        let mut c = Calibrator {
            version: VERSION,
            model: model.to_string(),
            features: features::NAMES.iter().map(|s| s.to_string()).collect(),
            weights: vec![0.0; d + tasks.len()],
            tasks,
            mean,
            scale,
            low,
            high,
            bias: 0.0,
            l2,
            fitted_on: fitted_on.to_string(),
            items: data.len(),
            correct: data.iter().filter(|s| s.correct).count(),
        };
        let rows: Vec<Vec<f64>> = data.iter().map(|s| c.row(&s.features, &s.task)).collect();
        let p = c.weights.len() + 1; // the intercept last
        let mut beta = vec![0.0; p];
        for _ in 0..100 {
            let mut grad = vec![0.0; p];
            let mut hess = vec![0.0; p * p];
            for (x, s) in rows.iter().zip(data) {
                let z = beta[p - 1] + dot(&beta[..p - 1], x);
                let mu = sigmoid(z);
                let r = mu - f64::from(u8::from(s.correct));
                let w = (mu * (1.0 - mu)).max(1e-10);
                for i in 0..p {
                    let xi = if i == p - 1 { 1.0 } else { x[i] };
                    grad[i] += r * xi;
                    for j in 0..=i {
                        let xj = if j == p - 1 { 1.0 } else { x[j] };
                        hess[i * p + j] += w * xi * xj;
                    }
                }
            }
            for i in 0..p - 1 {
                grad[i] += l2 * beta[i];
                hess[i * p + i] += l2;
            }
            hess[(p - 1) * p + (p - 1)] += 1e-9;
            for i in 0..p {
                for j in 0..i {
                    hess[j * p + i] = hess[i * p + j];
                }
            }
            let step = solve(&mut hess, &grad, p)?;
            let mut change = 0.0f64;
            for (b, s) in beta.iter_mut().zip(&step) {
                *b -= s;
                change = change.max(s.abs());
            }
            if change < 1e-10 {
                break;
            }
        }
        if beta.iter().any(|b| !b.is_finite()) {
            return None;
        }
        c.bias = beta[p - 1];
        c.weights = beta[..p - 1].to_vec();
        Some(c)
    }
}

/// How well calibrators fitted like [`Calibrator::fit`] predict answers they were not fitted on:
/// each fold ([`folds`]) predicted by a fit on the others. `None` when a fold's training part
/// lacks a class.
pub fn cross_validated(model: &str, data: &[Labelled]) -> Option<Quality> {
    let mut p = vec![0.0; data.len()];
    let (fold, k) = folds(data);
    for f in 0..k {
        let c = Calibrator::fit(model, &outside(data, &fold, f), "")?;
        for (i, _) in fold.iter().enumerate().filter(|(_, g)| **g == f) {
            p[i] = c.predict_values(&data[i].features, &data[i].task);
        }
    }
    let labels: Vec<bool> = data.iter().map(|s| s.correct).collect();
    Some(quality(&p, &labels))
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves `a x = b` for a symmetric positive definite `a` (n×n, row-major; overwritten) by
/// Cholesky; `None` when it is not positive definite.
fn solve(a: &mut [f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut s = a[j * n + j];
        for k in 0..j {
            s -= a[j * n + k] * a[j * n + k];
        }
        if s <= 0.0 || !s.is_finite() {
            return None;
        }
        let l = s.sqrt();
        a[j * n + j] = l;
        for i in j + 1..n {
            let mut t = a[i * n + j];
            for k in 0..j {
                t -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = t / l;
        }
    }
    let mut y = vec![0.0; n];
    for i in 0..n {
        let mut t = b[i];
        for k in 0..i {
            t -= a[i * n + k] * y[k];
        }
        y[i] = t / a[i * n + i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let mut t = y[i];
        for k in i + 1..n {
            t -= a[k * n + i] * x[k];
        }
        x[i] = t / a[i * n + i];
    }
    Some(x)
}

/// How well probabilities `p` predict `labels`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quality {
    pub items: usize,
    pub correct: usize,
    pub auroc: Option<f64>,
    /// Expected calibration error over ten equal-width bins.
    pub ece: f64,
    /// Mean squared error of the probabilities.
    pub brier: f64,
}

pub fn quality(p: &[f64], labels: &[bool]) -> Quality {
    let n = p.len().max(1) as f64;
    Quality {
        items: p.len(),
        correct: labels.iter().filter(|l| **l).count(),
        auroc: super::auroc(p, labels),
        ece: reliability(p, labels, 10)
            .iter()
            .map(|b| b.items as f64 / n * (b.accuracy - b.mean_confidence).abs())
            .sum(),
        brier: p
            .iter()
            .zip(labels)
            .map(|(q, l)| (q - f64::from(u8::from(*l))).powi(2))
            .sum::<f64>()
            / n,
    }
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bin {
    pub low: f64,
    pub high: f64,
    pub items: usize,
    pub mean_confidence: f64,
    pub accuracy: f64,
}

/// `bins` equal-width bins of [0, 1]; empty ones left out.
pub fn reliability(p: &[f64], labels: &[bool], bins: usize) -> Vec<Bin> {
    let mut out = Vec::new();
    for b in 0..bins {
        let (low, high) = (b as f64 / bins as f64, (b + 1) as f64 / bins as f64);
        let inside: Vec<usize> = (0..p.len())
            .filter(|i| {
                let q = p[*i].clamp(0.0, 1.0);
                q >= low && (q < high || (b + 1 == bins && q <= high))
            })
            .collect();
        if inside.is_empty() {
            continue;
        }
        let k = inside.len() as f64;
        out.push(Bin {
            low,
            high,
            items: inside.len(),
            mean_confidence: inside.iter().map(|i| p[*i]).sum::<f64>() / k,
            accuracy: inside.iter().filter(|i| labels[**i]).count() as f64 / k,
        });
    }
    out
}

/// A 95% percentile-bootstrap interval of the AUROC (`reps` resamples from a fixed seed).
pub fn auroc_interval(
    scores: &[f64],
    labels: &[bool],
    reps: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    let n = scores.len();
    if n == 0 {
        return None;
    }
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let idx: Vec<usize> = (0..n).map(|_| next()).collect();
        let s: Vec<f64> = idx.iter().map(|i| scores[*i]).collect();
        let l: Vec<bool> = idx.iter().map(|i| labels[*i]).collect();
        if let Some(a) = super::auroc(&s, &l) {
            v.push(a);
        }
    }
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some((at(0.025), at(0.975)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confidence::tests::lcg;

    /// Answers whose correctness follows a known logistic law in two of the features.
    fn synthetic(n: usize, seed: &mut u64) -> Vec<Labelled> {
        (0..n)
            .map(|i| {
                let mut f: Vec<f64> = (0..features::NAMES.len()).map(|_| lcg(seed)).collect();
                f[0] = -3.0 * lcg(seed);
                let task = if i % 3 == 0 { "Reasoning" } else { "QA" };
                let z = 2.5 * (f[0] + 1.5) + if task == "Reasoning" { -1.0 } else { 0.5 };
                let p = 1.0 / (1.0 + (-z).exp());
                Labelled {
                    features: f,
                    task: task.into(),
                    correct: lcg(seed) < p,
                    group: String::new(),
                }
            })
            .collect()
    }

    #[test]
    fn a_fit_recovers_the_law_and_predicts_held_out_answers() {
        let mut seed = 11;
        let train = synthetic(600, &mut seed);
        let test = synthetic(600, &mut seed);
        let c = Calibrator::fit("m", &train, "synthetic").unwrap();
        // The informative feature carries the weight (per standard deviation: 2.5 * sd).
        let w0 = c.weights[0] / c.scale[0];
        assert!((w0 - 2.5).abs() < 0.8, "weight {w0}");
        let noise = c.weights[1..features::NAMES.len()]
            .iter()
            .map(|w| w.abs())
            .fold(0.0, f64::max);
        assert!(noise < 0.4, "noise features {noise}");
        let p: Vec<f64> = test
            .iter()
            .map(|s| c.predict_values(&s.features, &s.task))
            .collect();
        let labels: Vec<bool> = test.iter().map(|s| s.correct).collect();
        let q = quality(&p, &labels);
        assert!(q.auroc.unwrap() > 0.8, "{q:?}");
        assert!(q.ece < 0.08, "calibrated: {q:?}");
        let (lo, hi) = auroc_interval(&p, &labels, 200, 1).unwrap();
        assert!(lo < q.auroc.unwrap() && q.auroc.unwrap() < hi && hi - lo < 0.15);
        // What it writes it reads back, and it refuses another feature order.
        let text = serde_json::to_string(&c).unwrap();
        let back = Calibrator::from_json(&text).unwrap();
        for s in test.iter().take(50) {
            let (a, b) = (
                back.predict_values(&s.features, &s.task),
                c.predict_values(&s.features, &s.task),
            );
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let mut other = c.clone();
        other.features.swap(0, 1);
        let err = Calibrator::from_json(&serde_json::to_string(&other).unwrap()).unwrap_err();
        assert!(err.contains("features"), "{err}");
        // A feature beyond the range it had in the fit is clipped, not extrapolated.
        let at = |v: f64| {
            let mut f = train[0].features.clone();
            f[0] = v;
            c.predict_values(&f, "QA")
        };
        assert_eq!(at(-3.0), at(-300.0));
        assert!(at(-1.0) > at(-2.0));
        // One class only: nothing to fit.
        let all: Vec<Labelled> = train
            .iter()
            .map(|s| Labelled {
                correct: true,
                ..s.clone()
            })
            .collect();
        assert_eq!(Calibrator::fit("m", &all, ""), None);
        // Cross-validation measures fits on data they did not see: close to the held-out set.
        let cv = cross_validated("m", &train).unwrap();
        assert!(
            (cv.auroc.unwrap() - q.auroc.unwrap()).abs() < 0.06,
            "{cv:?} vs {q:?}"
        );
    }

    #[test]
    fn reliability_bins_and_quality() {
        let p = [0.05, 0.15, 0.95, 1.0, 0.92];
        let l = [false, false, true, true, false];
        let bins = reliability(&p, &l, 10);
        assert_eq!(bins.len(), 3);
        assert_eq!(bins[2].items, 3);
        assert!((bins[2].accuracy - 2.0 / 3.0).abs() < 1e-12);
        let q = quality(&p, &l);
        assert_eq!((q.items, q.correct), (5, 2));
        assert!(q.ece > 0.0 && q.brier > 0.0);
    }
}
