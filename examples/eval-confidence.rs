//! Confidence evaluation: a labelled question set (arithmetic of rising difficulty, short
//! facts), answered greedily by the default model in its `secure` sandbox; reports, for each
//! confidence method, the AUROC for predicting a correct answer and the accuracy of the most
//! confident 20/30/50%. Run through `scripts/eval-confidence.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral::confidence::{self, Method, TokenStat};
use corral::config::{Config, Sources};
use corral::routing::calibrate::{calibrate, Sample};
use corral::sandbox::HostSupport;
use corral::slm::models;
use corral::slm::runner::{runner_binary, Runner, RunnerSpec};
use corral_protocol::{ChatMessage, GenerateRequest, Input, Sampling};

struct Q {
    kind: &'static str,
    question: String,
    answers: Vec<String>,
}

/// Deterministic pseudo-random numbers for the question generator.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn questions() -> Vec<Q> {
    let mut r = Lcg(42);
    let mut qs = Vec::new();
    for (kind, lo, hi, op) in [
        ("add-1digit", 1, 10, '+'),
        ("add-2digit", 10, 100, '+'),
        ("add-3digit", 100, 1000, '+'),
        ("sub-2digit", 10, 100, '-'),
        ("mul-1digit", 2, 10, '*'),
        ("mul-2digit", 10, 100, '*'),
    ] {
        for _ in 0..12 {
            let a = lo + r.next(hi - lo);
            let b = lo + r.next(hi - lo);
            let v = match op {
                '+' => a as i64 + b as i64,
                '-' => a as i64 - b as i64,
                _ => a as i64 * b as i64,
            };
            qs.push(Q {
                kind,
                question: format!("What is {a} {op} {b}? Answer with the number only."),
                answers: vec![v.to_string()],
            });
        }
    }
    let facts: &[(&str, &[&str])] = &[
        ("What is the capital of France?", &["paris"]),
        ("What is the capital of Japan?", &["tokyo"]),
        ("What is the capital of Italy?", &["rome"]),
        ("What is the capital of Germany?", &["berlin"]),
        ("What is the capital of Spain?", &["madrid"]),
        ("What is the capital of Canada?", &["ottawa"]),
        ("What is the capital of Australia?", &["canberra"]),
        ("What is the capital of Egypt?", &["cairo"]),
        ("What is the capital of Russia?", &["moscow"]),
        ("What is the capital of China?", &["beijing"]),
        ("What color is the sky on a clear day?", &["blue"]),
        ("What color is grass?", &["green"]),
        ("How many days are in a week?", &["7", "seven"]),
        ("How many legs does a spider have?", &["8", "eight"]),
        ("How many continents are there?", &["7", "seven"]),
        (
            "What is the largest planet in the solar system?",
            &["jupiter"],
        ),
        ("What planet is known as the Red Planet?", &["mars"]),
        ("Who wrote Romeo and Juliet?", &["shakespeare"]),
        ("What is the chemical symbol for water?", &["h2o"]),
        (
            "What is the freezing point of water in Celsius?",
            &["0", "zero"],
        ),
        ("What is the boiling point of water in Celsius?", &["100"]),
        ("How many hours are in a day?", &["24"]),
        ("What is the opposite of hot?", &["cold"]),
        ("What animal is known as the king of the jungle?", &["lion"]),
        ("What is the largest ocean on Earth?", &["pacific"]),
        (
            "Which gas do plants absorb from the air?",
            &["carbon dioxide", "co2"],
        ),
        ("What is the square root of 64?", &["8", "eight"]),
        ("How many months are in a year?", &["12", "twelve"]),
        ("What is the first letter of the English alphabet?", &["a"]),
        ("In which continent is Kenya?", &["africa"]),
    ];
    for (q, a) in facts {
        qs.push(Q {
            kind: "fact",
            question: format!("{q} Answer in one or two words."),
            answers: a.iter().map(|s| s.to_string()).collect(),
        });
    }
    qs
}

fn correct(answer: &str, q: &Q) -> bool {
    let a = answer.to_lowercase();
    if q.kind == "fact" {
        return q.answers.iter().any(|x| {
            if x.len() <= 2 {
                a.split(|c: char| !c.is_alphanumeric())
                    .any(|w| w == x.as_str())
            } else {
                a.contains(x.as_str())
            }
        });
    }
    // The last number in the answer ("8 + 7 = 15" answers 15).
    let numbers: Vec<&str> = a
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .collect();
    numbers
        .last()
        .is_some_and(|n| *n == q.answers[0].trim_start_matches('-'))
        && (q.answers[0].starts_with('-')
            == a.contains(&format!("-{}", q.answers[0].trim_start_matches('-'))))
}

fn main() {
    let config = Config::load(&Sources::default()).expect("config");
    let model = models::lookup(&config.slm.models, corral::catalog::DEFAULT_MODEL).unwrap();
    let path = models::require(&config.slm.model_dir, model).unwrap();
    let profile = config.profiles.resolve("secure").unwrap();
    let spec = RunnerSpec {
        model_path: path,
        sha256: model.sha256.clone(),
        binary: runner_binary(),
    };
    let mut runner =
        Runner::start(&spec, &profile, &config.sandbox, &HostSupport::probe()).expect("runner");
    let qs = questions();
    let mut labels = Vec::new();
    let mut scores: Vec<Vec<f64>> = vec![Vec::new(); Method::ALL.len()];
    let mut by_kind: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for q in &qs {
        let req = GenerateRequest {
            id: 0,
            input: Input::Messages(vec![ChatMessage::new("user", q.question.clone())]),
            sampling: Sampling::default(),
            max_tokens: 12,
            stop: vec!["\n".into()],
            top_logprobs: 0,
            stream: false,
            ignore_eos: false,
            constraint: None,
            tools: None,
            max_tokens_explicit: false,
            cache_key: None,
        };
        let done = runner.generate(req, &mut |_| {}).expect("generate");
        let stats: Vec<TokenStat> = done
            .tokens
            .iter()
            .map(|t| TokenStat {
                logprob: t.logprob,
                entropy: t.entropy,
            })
            .collect();
        let ok = correct(&done.text, q);
        labels.push(ok);
        let e = by_kind.entry(q.kind).or_default();
        e.0 += usize::from(ok);
        e.1 += 1;
        for (i, m) in Method::ALL.iter().enumerate() {
            scores[i].push(confidence::score(&stats, *m).unwrap_or(0.0));
        }
        eprintln!(
            "{:<5} {:<60} -> {:?}",
            if ok { "ok" } else { "WRONG" },
            q.question,
            done.text
        );
    }
    runner.shutdown();
    let n_ok = labels.iter().filter(|l| **l).count();
    println!(
        "questions: {}  correct: {} ({:.1}%)",
        qs.len(),
        n_ok,
        100.0 * n_ok as f64 / qs.len() as f64
    );
    for (k, (ok, n)) in &by_kind {
        println!("  {k:<12} {ok}/{n}");
    }
    println!("\n| method | AUROC | accuracy of top 20% | top 30% | top 50% |");
    println!("| --- | --- | --- | --- | --- |");
    for (i, m) in Method::ALL.iter().enumerate() {
        let f = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.3}"));
        println!(
            "| {} | {} | {} | {} | {} |",
            m.name(),
            f(confidence::auroc(&scores[i], &labels)),
            f(confidence::accuracy_of_top(&scores[i], &labels, 0.2)),
            f(confidence::accuracy_of_top(&scores[i], &labels, 0.3)),
            f(confidence::accuracy_of_top(&scores[i], &labels, 0.5)),
        );
    }

    // Threshold calibration (src/routing/calibrate.rs), validated by 2-fold cross-validation on
    // this set: calibrate on half the questions, measure the other half, and swap.
    let gm = Method::ALL
        .iter()
        .position(|m| *m == confidence::DEFAULT_METHOD)
        .unwrap_or(0);
    println!("\n| target accuracy | fold | threshold | held-out accepted | held-out accuracy |");
    println!("| --- | --- | --- | --- | --- |");
    for target in [0.5, 0.6, 0.7, 0.8] {
        for fold in 0..2 {
            let part = |keep: usize| -> Vec<Sample> {
                (0..labels.len())
                    .filter(|i| i % 2 == keep)
                    .map(|i| Sample {
                        score: scores[gm][i],
                        correct: labels[i],
                    })
                    .collect()
            };
            let (train, test) = (part(fold), part(1 - fold));
            let c = calibrate(&train, target, 10);
            let (acc, n) = match c.threshold {
                Some(t) => {
                    let kept: Vec<&Sample> = test.iter().filter(|s| s.score >= t).collect();
                    let ok = kept.iter().filter(|s| s.correct).count();
                    (
                        if kept.is_empty() {
                            "n/a".to_string()
                        } else {
                            format!("{:.3}", ok as f64 / kept.len() as f64)
                        },
                        format!("{}/{}", kept.len(), test.len()),
                    )
                }
                None => (
                    "everything escalated".to_string(),
                    format!("0/{}", test.len()),
                ),
            };
            println!(
                "| {target} | {fold} | {} | {n} | {acc} |",
                c.threshold
                    .map_or("none".to_string(), |t| format!("{t:.3}"))
            );
        }
    }
}
