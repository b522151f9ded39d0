//! Log-probabilities, entropy and sampling over one step's logits.
//!
//! What is reported (the token's log-probability, its top alternatives, the entropy) comes from
//! the raw distribution: log-softmax of the logits at temperature 1, before the repetition
//! penalty, temperature, top-k and top-p. What is sampled comes from the adjusted one. So the
//! numbers the confidence score uses do not move with sampling settings.

use corral_protocol::Sampling;

/// Statistics of the raw distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct RawStats {
    /// log Σ exp(logit)
    pub log_z: f32,
    /// Entropy in nats over the full vocabulary.
    pub entropy: f32,
    /// The `n` most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
    /// Log-probability of the most likely token minus that of the second (nats, >= 0).
    pub margin: f32,
    /// Entropy (nats) of the five most likely tokens' probabilities, renormalised: how the
    /// model hesitates among its real candidates, without the long tail's mass.
    pub top_entropy: f32,
}

/// The margin reported when only one token is possible.
pub const MARGIN_ALONE: f32 = 30.0;

/// How many of the best tokens [`RawStats::top_entropy`] is over.
pub const TOP_ENTROPY_K: usize = 5;

pub fn raw_stats(logits: &[f32], n: usize) -> RawStats {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    let mut weighted = 0f64;
    // The best TOP_ENTROPY_K logits, in descending order (NEG_INFINITY: not yet filled).
    let mut best = [f32::NEG_INFINITY; TOP_ENTROPY_K];
    for &l in logits {
        let e = f64::from(l - max).exp();
        sum += e;
        weighted += e * f64::from(l - max);
        if l > best[TOP_ENTROPY_K - 1] {
            let mut at = TOP_ENTROPY_K - 1;
            while at > 0 && l > best[at - 1] {
                best[at] = best[at - 1];
                at -= 1;
            }
            best[at] = l;
        }
    }
    let log_z = max + sum.ln() as f32;
    // H = log Z' - E[l - max], with Z' the sum of exp(l - max)
    let entropy = (sum.ln() - weighted / sum).max(0.0) as f32;
    // One possible token: as certain as a step can be (a large finite margin: JSON has no
    // infinity).
    let margin = if best[1].is_finite() {
        best[0] - best[1]
    } else {
        MARGIN_ALONE
    };
    let top_entropy = {
        let (mut z, mut w) = (0f64, 0f64);
        for &b in best.iter().filter(|b| b.is_finite()) {
            let e = f64::from(b - max).exp();
            z += e;
            w += e * f64::from(b - max);
        }
        (z.ln() - w / z).max(0.0) as f32
    };
    let top = if n == 0 {
        Vec::new()
    } else {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = n.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| {
            logits[*b as usize].total_cmp(&logits[*a as usize])
        });
        idx.truncate(k);
        idx.sort_by(|a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        idx.into_iter()
            .map(|i| (i, logits[i as usize] - log_z))
            .collect()
    };
    RawStats {
        log_z,
        entropy,
        top,
        margin,
        top_entropy,
    }
}

/// SplitMix64: small, fast, seedable; good enough for sampling.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seeded from the kernel (getrandom is allowed by the runner's seccomp filter).
    pub fn from_entropy() -> Rng {
        let mut b = [0u8; 8];
        // SAFETY: getrandom fills the 8-byte buffer we own.
        unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        Rng(u64::from_ne_bytes(b))
    }

    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token. `logits` is consumed (penalties are applied in place).
pub fn sample(logits: &mut [f32], s: &Sampling, history: &[u32], rng: &mut Rng) -> u32 {
    if s.repetition_penalty != 1.0 && s.repetition_penalty > 0.0 {
        let start = history.len().saturating_sub(s.repeat_last_n as usize);
        let mut seen = std::collections::HashSet::new();
        for &t in &history[start..] {
            if seen.insert(t) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / s.repetition_penalty
                    } else {
                        *l * s.repetition_penalty
                    };
                }
            }
        }
    }
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    // Weights exp((l - max) / T), in f64. Without top-k or top-p the draw walks them in index
    // order (no sort: a full sort of a 50k vocabulary cost ~4 ms a token); with either, the
    // candidates are ordered by logit (ties by id), but only as far as the cut needs.
    let inv_t = 1.0 / f64::from(s.temperature);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |l: f32| (f64::from(l - max) * inv_t).exp();
    let top_k = s.top_k.filter(|k| *k > 0).map(|k| k as usize);
    let top_p = s.top_p.filter(|p| *p > 0.0 && *p < 1.0).map(f64::from);
    if top_k.is_none() && top_p.is_none() {
        let total: f64 = logits.iter().map(|l| weight(*l)).sum();
        let r = rng.next_f64() * total;
        let mut acc = 0.0;
        let mut last = 0;
        for (i, l) in logits.iter().enumerate() {
            let w = weight(*l);
            if w > 0.0 {
                last = i;
            }
            acc += w;
            if r < acc {
                return i as u32;
            }
        }
        return last as u32;
    }
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    if let Some(k) = top_k.filter(|k| *k < idx.len()) {
        idx.select_nth_unstable_by(k - 1, by_logit);
        idx.truncate(k);
    }
    let total: f64 = idx.iter().map(|i| weight(logits[*i as usize])).sum();
    // The smallest prefix (by logit) whose mass reaches top_p: sort a growing head until it
    // does.
    let mut keep = idx.len();
    let mut head = 64.min(idx.len());
    loop {
        if head < idx.len() {
            idx.select_nth_unstable_by(head - 1, by_logit);
        }
        idx[..head].sort_unstable_by(by_logit);
        match top_p {
            None => break,
            Some(p) => {
                let mut acc = 0.0;
                if let Some(n) = idx[..head].iter().position(|i| {
                    acc += weight(logits[*i as usize]) / total;
                    acc >= p
                }) {
                    keep = n + 1;
                    break;
                }
                if head == idx.len() {
                    break;
                }
                head = (head * 4).min(idx.len());
            }
        }
    }
    if top_p.is_none() {
        // top-k alone: every candidate, sorted.
        idx.sort_unstable_by(by_logit);
    }
    idx.truncate(keep);
    let kept: f64 = idx.iter().map(|i| weight(logits[*i as usize])).sum();
    let r = rng.next_f64() * kept;
    let mut acc = 0.0;
    for i in &idx {
        acc += weight(logits[*i as usize]);
        if r < acc {
            return *i;
        }
    }
    idx.last().copied().unwrap_or(0)
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_stats_are_a_proper_distribution() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let s = raw_stats(&logits, 2);
        let p: Vec<f32> = logits.iter().map(|l| (l - s.log_z).exp()).collect();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let h: f32 = -p.iter().map(|q| q * q.ln()).sum::<f32>();
        assert!((h - s.entropy).abs() < 1e-4);
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((s.top[0].1 - p[0].ln()).abs() < 1e-5);
        let uniform = raw_stats(&[0.0; 8], 0);
        assert!((uniform.entropy - 8f32.ln()).abs() < 1e-5);
        // Five-best entropy and margin: the tail past the fifth token does not count.
        assert!((uniform.top_entropy - 5f32.ln()).abs() < 1e-5);
        assert_eq!(uniform.margin, 0.0);
        let tail = [5.0f32, 3.0, 9.0, 1.0, 1.0, -2.0, 8.0, 0.5];
        let s = raw_stats(&tail, 0);
        assert!((s.margin - 1.0).abs() < 1e-6);
        let best = [9.0f32, 8.0, 5.0, 3.0, 1.0];
        let z: f32 = best.iter().map(|b| b.exp()).sum();
        let h5: f32 = -best
            .iter()
            .map(|b| (b.exp() / z) * (b.exp() / z).ln())
            .sum::<f32>();
        assert!(
            (s.top_entropy - h5).abs() < 1e-5,
            "{} vs {h5}",
            s.top_entropy
        );
        let two = raw_stats(&[0.0, 1.0], 0);
        assert!((two.margin - 1.0).abs() < 1e-6);
        assert!(two.top_entropy < two.entropy + 1e-6);
    }

    #[test]
    fn sampling_respects_greedy_seed_topk_and_penalty() {
        let base = Sampling::default();
        let mut rng = Rng::new(1);
        assert_eq!(sample(&mut [0.1, 3.0, 0.2], &base, &[], &mut rng), 1);
        let penal = Sampling {
            repetition_penalty: 20.0,
            ..base.clone()
        };
        assert_eq!(
            sample(&mut [0.1, 3.0, 0.2], &penal, &[1], &mut rng),
            2,
            "penalty pushes the repeated token down"
        );
        let hot = Sampling {
            temperature: 1.0,
            top_k: Some(1),
            ..base.clone()
        };
        for _ in 0..20 {
            assert_eq!(sample(&mut [0.0, 0.5, 0.4], &hot, &[], &mut rng), 1);
        }
        let t = Sampling {
            temperature: 1.0,
            seed: Some(3),
            ..base
        };
        let a: Vec<u32> = {
            let mut r = Rng::new(3);
            (0..10)
                .map(|_| sample(&mut [0.0; 5], &t, &[], &mut r))
                .collect()
        };
        let b: Vec<u32> = {
            let mut r = Rng::new(3);
            (0..10)
                .map(|_| sample(&mut [0.0; 5], &t, &[], &mut r))
                .collect()
        };
        assert_eq!(a, b, "same seed, same tokens");
        assert!(a.iter().any(|x| *x != a[0]), "uniform sampling varies");
    }

    #[test]
    fn top_p_keeps_the_smallest_head_reaching_p_and_draws_follow_the_weights() {
        // 300 tokens: three likely ones, the rest a long flat tail.
        let mut logits = vec![0f32; 300];
        logits[7] = 6.0;
        logits[123] = 5.5;
        logits[250] = 5.0;
        let p = |l: f32| {
            let z: f32 = logits.iter().map(|x| x.exp()).sum();
            l.exp() / z
        };
        let head = p(6.0) + p(5.5);
        let s = Sampling {
            temperature: 1.0,
            top_p: Some(head - 1e-4),
            ..Sampling::default()
        };
        let mut rng = Rng::new(9);
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..4000 {
            *seen
                .entry(sample(&mut logits.clone(), &s, &[], &mut rng))
                .or_insert(0) += 1;
        }
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![7, 123]);
        let share = f64::from(seen[&7]) / 4000.0;
        let want = f64::from(p(6.0) / head);
        assert!((share - want).abs() < 0.03, "{share} vs {want}");
        // A top_p that needs more than the first 64 candidates still works.
        let wide = Sampling {
            temperature: 1.0,
            top_p: Some(0.99),
            ..Sampling::default()
        };
        let mut tail = 0;
        for _ in 0..2000 {
            if ![7, 123, 250].contains(&sample(&mut logits.clone(), &wide, &[], &mut rng)) {
                tail += 1;
            }
        }
        assert!(tail > 0);
        // No filter: the draw follows the softmax, in index order.
        let free = Sampling {
            temperature: 1.0,
            ..Sampling::default()
        };
        let n = (0..4000)
            .filter(|_| sample(&mut logits.clone(), &free, &[], &mut rng) == 7)
            .count();
        assert!((n as f32 / 4000.0 - p(6.0)).abs() < 0.03);
    }
}
