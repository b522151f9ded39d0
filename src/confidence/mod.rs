//! Confidence of an answer from its per-token log-probabilities and entropies, as a score in
//! [0, 1]. Which method and threshold apply is the routing configuration's choice;
//! `docs/confidence.md` explains each method and reports how well each predicts correctness.

use serde::{Deserialize, Serialize};

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
}

impl Method {
    pub const ALL: [Method; 4] = [
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
        }
    }

    pub fn from_name(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// The default method, chosen from the evaluation in docs/confidence.md.
pub const DEFAULT_METHOD: Method = Method::GeometricMean;

/// One generated token's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenStat {
    pub logprob: f32,
    pub entropy: f32,
}

impl From<&corral_protocol::TokenInfo> for TokenStat {
    fn from(t: &corral_protocol::TokenInfo) -> TokenStat {
        TokenStat {
            logprob: t.logprob,
            entropy: t.entropy,
        }
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
    let stats: Vec<TokenStat> = logprobs
        .iter()
        .map(|l| TokenStat {
            logprob: *l,
            entropy: 0.0,
        })
        .collect();
    score(&stats, method)
}

/// The score of `tokens` under `method`; `None` for an empty answer (no evidence either way).
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
        Method::GeometricMean => (lp.iter().sum::<f64>() / n).exp(),
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
#[derive(Debug, Clone)]
pub struct Running {
    method: Method,
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
            method,
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
        (self.n > 0).then(|| self.with_certain(0))
    }

    /// The highest score the answer can still reach with at most `remaining` more tokens.
    pub fn best_reachable(&self, remaining: usize) -> f64 {
        if self.n + remaining == 0 {
            return 1.0;
        }
        self.with_certain(remaining)
            .max(self.score().unwrap_or(0.0))
    }

    /// The score of the tokens so far and `extra` certain ones.
    fn with_certain(&self, extra: usize) -> f64 {
        let total = (self.n + extra) as f64;
        let s = match self.method {
            Method::GeometricMean => (self.sum_lp / total).exp(),
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

/// Every method's score, for reports and `--json`.
pub fn all_scores(tokens: &[TokenStat]) -> Vec<(Method, Option<f64>)> {
    Method::ALL
        .into_iter()
        .map(|m| (m, score(tokens, m)))
        .collect()
}

/// Area under the ROC curve of `scores` predicting `labels` (true = correct): the probability
/// that a random correct answer scores above a random wrong one (ties count half).
pub fn auroc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let pos: Vec<f64> = scores
        .iter()
        .zip(labels)
        .filter(|(_, l)| **l)
        .map(|(s, _)| *s)
        .collect();
    let neg: Vec<f64> = scores
        .iter()
        .zip(labels)
        .filter(|(_, l)| !**l)
        .map(|(s, _)| *s)
        .collect();
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let mut wins = 0.0;
    for p in &pos {
        for q in &neg {
            wins += if p > q {
                1.0
            } else if p == q {
                0.5
            } else {
                0.0
            };
        }
    }
    Some(wins / (pos.len() * neg.len()) as f64)
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
    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    #[test]
    fn the_running_score_is_the_score_and_its_bound_is_reached_by_certain_tokens() {
        let mut seed = 7;
        for method in Method::ALL {
            for len in [1usize, 2, 9, 10, 11, 57] {
                let toks: Vec<TokenStat> = (0..len)
                    .map(|_| TokenStat {
                        logprob: (-4.0 * lcg(&mut seed)) as f32,
                        entropy: (3.0 * lcg(&mut seed)) as f32,
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
                    certain.extend((0..remaining).map(|_| TokenStat {
                        logprob: 0.0,
                        entropy: 0.0,
                    }));
                    let reached = score(&certain, method).unwrap();
                    assert!(
                        (best - reached.max(want)).abs() < 1e-9,
                        "{method:?} {len} {remaining}"
                    );
                    for _ in 0..20 {
                        let mut any = toks.clone();
                        let k = (lcg(&mut seed) * (remaining as f64 + 1.0)) as usize;
                        any.extend((0..k.min(remaining)).map(|_| TokenStat {
                            logprob: (-2.0 * lcg(&mut seed)) as f32,
                            entropy: (2.0 * lcg(&mut seed)) as f32,
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
        TokenStat {
            logprob: lp,
            entropy: h,
        }
    }

    #[test]
    fn scores_are_probabilities_and_order_sensibly() {
        let sure = [t(-0.01, 0.05), t(-0.02, 0.1)];
        let unsure = [t(-0.01, 0.05), t(-3.0, 2.5)];
        for m in Method::ALL {
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
        assert_eq!(
            accuracy_of_top(&[0.9, 0.1, 0.8, 0.2], &[true, false, false, true], 0.5),
            Some(0.5)
        );
    }
}
