//! Confidence of an answer from its per-token log-probabilities and entropies, as a score in
//! [0, 1]. Which method and threshold apply is the routing configuration's choice;
//! `docs/confidence.md` explains each method and reports how well each predicts correctness.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub mod calibrator;
pub mod features;

pub use calibrator::Calibrator;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// exp(mean log p): the geometric-mean probability of the chosen tokens.
    GeometricMean,
    /// exp(10th-percentile log p): how likely the least likely tenth of the tokens were.
    LowPercentile,
    /// exp(min log p): the single least likely token.
    Minimum,
    /// exp(-mean entropy): how peaked the distributions were, whatever was chosen.
    Entropy,
    /// The model's calibrator ([`calibrator`]): the estimated probability that the answer is
    /// correct, from features of the tokens that carry it. A model without a calibrator is
    /// scored with `geometric_mean`, and so are remote answers and JSON fields.
    Calibrated,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::Calibrated,
        Method::GeometricMean,
        Method::LowPercentile,
        Method::Minimum,
        Method::Entropy,
    ];

    /// The methods computed from the tokens' numbers alone.
    pub const PLAIN: [Method; 4] = [
        Method::GeometricMean,
        Method::LowPercentile,
        Method::Minimum,
        Method::Entropy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::GeometricMean => "geometric_mean",
            Method::LowPercentile => "low_percentile",
            Method::Minimum => "minimum",
            Method::Entropy => "entropy",
            Method::Calibrated => "calibrated",
        }
    }

    /// The method scores are computed with when there is no calibrator to apply.
    pub fn plain(self) -> Method {
        if self == Method::Calibrated {
            Method::GeometricMean
        } else {
            self
        }
    }

    pub fn from_name(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// The default method, chosen on the test part of the evaluation in docs/confidence.md.
pub const DEFAULT_METHOD: Method = Method::Calibrated;

/// One generated token's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TokenStat {
    pub logprob: f32,
    pub entropy: f32,
    /// The best token's log-probability minus the second best's.
    pub margin: f32,
    /// Entropy of the five best tokens, renormalised.
    pub top_entropy: f32,
}

impl TokenStat {
    pub fn new(logprob: f32, entropy: f32) -> TokenStat {
        TokenStat {
            logprob,
            entropy,
            ..TokenStat::default()
        }
    }
}

impl From<&corral_protocol::TokenInfo> for TokenStat {
    fn from(t: &corral_protocol::TokenInfo) -> TokenStat {
        TokenStat {
            logprob: t.logprob,
            entropy: t.entropy,
            margin: t.margin,
            top_entropy: t.top_entropy,
        }
    }
}

/// Scores one request's answers: the configured method, the model's calibrator when the
/// method is `calibrated`, and what the calibrated features need of the request.
#[derive(Debug, Clone)]
pub struct Scorer {
    method: Method,
    calibrator: Option<Arc<Calibrator>>,
    prompt: Arc<features::Prompt>,
    task: String,
}

impl Scorer {
    /// `calibrator` is used only when `method` is `calibrated`; `prompt` is what the answer
    /// answers (the last user message, or a completion's prompt).
    pub fn new(
        method: Method,
        calibrator: Option<Arc<Calibrator>>,
        prompt: &str,
        task: &str,
    ) -> Scorer {
        let calibrator = calibrator.filter(|_| method == Method::Calibrated);
        Scorer {
            // Built whatever the method: the features are recorded for feedback refits too.
            prompt: Arc::new(features::Prompt::new(prompt)),
            method,
            calibrator,
            task: task.to_string(),
        }
    }

    /// A scorer without a calibrator.
    pub fn plain(method: Method) -> Scorer {
        Scorer::new(method.plain(), None, "", "")
    }

    /// The method the scores come from: `calibrated` only with a calibrator.
    pub fn method(&self) -> Method {
        if self.calibrator.is_some() {
            Method::Calibrated
        } else {
            self.method.plain()
        }
    }

    pub fn calibrator(&self) -> Option<&Calibrator> {
        self.calibrator.as_deref()
    }

    pub fn task(&self) -> &str {
        &self.task
    }

    /// The features of an answer (forced tokens left out), for the calibrator and for
    /// feedback; `None` for an empty answer.
    pub fn features(
        &self,
        tokens: &[corral_protocol::TokenInfo],
        truncated: bool,
    ) -> Option<features::Features> {
        let toks: Vec<features::Tok<'_>> = tokens
            .iter()
            .filter(|t| !t.forced)
            .map(|t| features::Tok {
                stat: TokenStat::from(t),
                text: &t.text,
            })
            .collect();
        features::features(&toks, &self.prompt, truncated)
    }

    /// The answer's score; `truncated`: it ended at its token limit.
    pub fn score(&self, tokens: &[corral_protocol::TokenInfo], truncated: bool) -> Option<f64> {
        match &self.calibrator {
            Some(c) => self
                .features(tokens, truncated)
                .and_then(|f| c.predict(&f, &self.task)),
            None => {
                let stats: Vec<TokenStat> = tokens
                    .iter()
                    .filter(|t| !t.forced)
                    .map(TokenStat::from)
                    .collect();
                score(&stats, self.method.plain())
            }
        }
    }

    /// A running score for this request's answer.
    pub fn running(&self) -> Running {
        let mut r = Running::new(self.method.plain());
        if self.calibrator.is_some() {
            r.calibrated = Some((self.clone(), Vec::new()));
        }
        r
    }
}

/// The score of a runner's tokens under `method`.
pub fn score_tokens(tokens: &[corral_protocol::TokenInfo], method: Method) -> Option<f64> {
    let stats: Vec<TokenStat> = tokens.iter().map(TokenStat::from).collect();
    score(&stats, method)
}

/// The score of a remote answer from the log-probabilities of its tokens (providers report no
/// entropies: methods that need them see 0).
pub fn score_logprobs(logprobs: &[f32], method: Method) -> Option<f64> {
    let stats: Vec<TokenStat> = logprobs.iter().map(|l| TokenStat::new(*l, 0.0)).collect();
    score(&stats, method)
}

/// The score of `tokens` under `method` (`calibrated`, which needs more than the numbers, is
/// `geometric_mean` here); `None` for an empty answer (no evidence either way).
pub fn score(tokens: &[TokenStat], method: Method) -> Option<f64> {
    if tokens.is_empty() {
        return None;
    }
    let n = tokens.len() as f64;
    let lp: Vec<f64> = tokens
        .iter()
        .map(|t| f64::from(t.logprob).min(0.0))
        .collect();
    let s = match method {
        Method::GeometricMean | Method::Calibrated => (lp.iter().sum::<f64>() / n).exp(),
        Method::LowPercentile => {
            let mut v = lp.clone();
            v.sort_by(f64::total_cmp);
            let idx = ((v.len() - 1) as f64 * 0.10).floor() as usize;
            v[idx].exp()
        }
        Method::Minimum => lp.iter().copied().fold(0.0, f64::min).exp(),
        Method::Entropy => (-(tokens
            .iter()
            .map(|t| f64::from(t.entropy).max(0.0))
            .sum::<f64>()
            / n))
            .exp(),
    };
    Some(s.clamp(0.0, 1.0))
}

/// An answer's score kept up to date as its tokens arrive, and the best score it can still
/// reach: the one it would get if every token it may still generate were certain (log p = 0,
/// entropy 0). For each method that is an upper bound over every way the answer can go on,
/// stopping at once included: a mean over more tokens of 0 rises towards 0 (so the bound is
/// the mean over all `remaining` of them), a minimum never rises, and a low percentile is
/// highest when the certain tokens push it furthest up the sorted list. A bound below the
/// threshold decides the outcome exactly: the finished answer would be escalated too.
///
/// A calibrated score (made by [`Scorer::running`]) is recomputed from the tokens so far; it has
/// no such bound (a logistic model of many features can rise with any token), so its
/// `best_reachable` is 1 and only the floor (`early_floor`) decides early on it.
#[derive(Debug, Clone)]
pub struct Running {
    method: Method,
    /// With a calibrator: the scorer and every token with its text.
    calibrated: Option<(Scorer, Vec<(TokenStat, String)>)>,
    n: usize,
    sum_lp: f64,
    sum_h: f64,
    min_lp: f64,
    /// Log-probabilities in ascending order (kept for `LowPercentile` only).
    sorted: Vec<f64>,
}

impl Running {
    pub fn new(method: Method) -> Running {
        Running {
            method: method.plain(),
            calibrated: None,
            n: 0,
            sum_lp: 0.0,
            sum_h: 0.0,
            min_lp: 0.0,
            sorted: Vec::new(),
        }
    }

    /// Tokens seen.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn push(&mut self, t: TokenStat) {
        self.push_text(t, "");
    }

    /// A token with its text (what a calibrated score's answer span is found from).
    pub fn push_text(&mut self, t: TokenStat, text: &str) {
        if let Some((_, toks)) = &mut self.calibrated {
            toks.push((t, text.to_string()));
        }
        let lp = f64::from(t.logprob).min(0.0);
        self.n += 1;
        self.sum_lp += lp;
        self.sum_h += f64::from(t.entropy).max(0.0);
        self.min_lp = self.min_lp.min(lp);
        if self.method == Method::LowPercentile {
            let at = self.sorted.partition_point(|v| *v <= lp);
            self.sorted.insert(at, lp);
        }
    }

    /// The score of the tokens so far ([`score`] of them).
    pub fn score(&self) -> Option<f64> {
        if let Some((scorer, toks)) = &self.calibrated {
            let c = scorer.calibrator.as_deref()?;
            let toks: Vec<features::Tok<'_>> = toks
                .iter()
                .map(|(stat, text)| features::Tok { stat: *stat, text })
                .collect();
            return features::features(&toks, &scorer.prompt, false)
                .and_then(|f| c.predict(&f, &scorer.task));
        }
        (self.n > 0).then(|| self.with_certain(0))
    }

    /// The highest score the answer can still reach with at most `remaining` more tokens.
    pub fn best_reachable(&self, remaining: usize) -> f64 {
        if self.calibrated.is_some() || self.n + remaining == 0 {
            return 1.0;
        }
        self.with_certain(remaining)
            .max(self.score().unwrap_or(0.0))
    }

    /// The score of the tokens so far and `extra` certain ones.
    fn with_certain(&self, extra: usize) -> f64 {
        let total = (self.n + extra) as f64;
        let s = match self.method {
            Method::GeometricMean | Method::Calibrated => (self.sum_lp / total).exp(),
            Method::Entropy => (-self.sum_h / total).exp(),
            Method::Minimum => self.min_lp.exp(),
            Method::LowPercentile => {
                let idx = ((total - 1.0) * 0.10).floor() as usize;
                // The certain tokens (0) sort after every other.
                self.sorted.get(idx).map_or(1.0, |v| v.exp())
            }
        };
        s.clamp(0.0, 1.0)
    }
}

/// Every plain method's score, for reports and `--json`.
pub fn all_scores(tokens: &[TokenStat]) -> Vec<(Method, Option<f64>)> {
    Method::PLAIN
        .into_iter()
        .map(|m| (m, score(tokens, m)))
        .collect()
}

/// Area under the ROC curve of `scores` predicting `labels` (true = correct): the probability
/// that a random correct answer scores above a random wrong one (ties count half).
pub fn auroc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let pos = labels.iter().filter(|l| **l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    // Mann-Whitney: the rank sum of the correct answers (ties share their mean rank).
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mean_rank * idx[i..=j].iter().filter(|k| labels[**k]).count() as f64;
        i = j + 1;
    }
    let (p, n) = (pos as f64, neg as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// Accuracy of the `fraction` most confident answers.
pub fn accuracy_of_top(scores: &[f64], labels: &[bool], fraction: f64) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    let k = ((scores.len() as f64) * fraction).round().max(1.0) as usize;
    let top = &idx[..k.min(idx.len())];
    if top.is_empty() {
        return None;
    }
    Some(top.iter().filter(|i| labels[**i]).count() as f64 / top.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (no dependency for a test's noise).
    pub(super) fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    #[test]
    fn the_running_score_is_the_score_and_its_bound_is_reached_by_certain_tokens() {
        let mut seed = 7;
        for method in Method::PLAIN {
            for len in [1usize, 2, 9, 10, 11, 57] {
                let toks: Vec<TokenStat> = (0..len)
                    .map(|_| {
                        TokenStat::new(
                            (-4.0 * lcg(&mut seed)) as f32,
                            (3.0 * lcg(&mut seed)) as f32,
                        )
                    })
                    .collect();
                let mut r = Running::new(method);
                for t in &toks {
                    r.push(*t);
                }
                let want = score(&toks, method).unwrap();
                assert!((r.score().unwrap() - want).abs() < 1e-9, "{method:?} {len}");
                // The bound is what the answer gets when it goes on with certain tokens, and
                // no continuation of random tokens beats it.
                for remaining in [0usize, 1, 5, 40] {
                    let best = r.best_reachable(remaining);
                    let mut certain = toks.clone();
                    certain.extend((0..remaining).map(|_| TokenStat::new(0.0, 0.0)));
                    let reached = score(&certain, method).unwrap();
                    assert!(
                        (best - reached.max(want)).abs() < 1e-9,
                        "{method:?} {len} {remaining}"
                    );
                    for _ in 0..20 {
                        let mut any = toks.clone();
                        let k = (lcg(&mut seed) * (remaining as f64 + 1.0)) as usize;
                        any.extend((0..k.min(remaining)).map(|_| {
                            TokenStat::new(
                                (-2.0 * lcg(&mut seed)) as f32,
                                (2.0 * lcg(&mut seed)) as f32,
                            )
                        }));
                        assert!(score(&any, method).unwrap() <= best + 1e-9, "{method:?}");
                    }
                }
            }
        }
        assert_eq!(Running::new(Method::GeometricMean).score(), None);
        assert_eq!(Running::new(Method::Minimum).best_reachable(3), 1.0);
    }

    fn t(lp: f32, h: f32) -> TokenStat {
        TokenStat::new(lp, h)
    }

    #[test]
    fn scores_are_probabilities_and_order_sensibly() {
        let sure = [t(-0.01, 0.05), t(-0.02, 0.1)];
        let unsure = [t(-0.01, 0.05), t(-3.0, 2.5)];
        for m in Method::PLAIN {
            let a = score(&sure, m).unwrap();
            let b = score(&unsure, m).unwrap();
            assert!((0.0..=1.0).contains(&a) && (0.0..=1.0).contains(&b));
            assert!(a > b, "{m:?}: {a} <= {b}");
        }
        assert!(
            (score(&[t(-1.0, 0.0), t(-3.0, 0.0)], Method::GeometricMean).unwrap()
                - (-2.0f64).exp())
            .abs()
                < 1e-9
        );
        assert!(
            (score(&[t(-1.0, 0.0), t(-3.0, 0.0)], Method::Minimum).unwrap() - (-3.0f64).exp())
                .abs()
                < 1e-9
        );
        assert_eq!(score(&[], Method::Entropy), None);
    }

    #[test]
    fn auroc_and_top_accuracy() {
        assert_eq!(
            auroc(&[0.9, 0.8, 0.1, 0.2], &[true, true, false, false]),
            Some(1.0)
        );
        assert_eq!(
            auroc(&[0.1, 0.2, 0.9, 0.8], &[true, true, false, false]),
            Some(0.0)
        );
        assert_eq!(auroc(&[0.5, 0.5], &[true, false]), Some(0.5));
        // Ties share ranks: one correct above two wrong, one tied with one of them.
        assert_eq!(
            auroc(&[0.9, 0.3, 0.3, 0.1], &[true, true, false, false]),
            Some(0.875)
        );
        assert_eq!(
            accuracy_of_top(&[0.9, 0.1, 0.8, 0.2], &[true, false, false, true], 0.5),
            Some(0.5)
        );
    }
}
