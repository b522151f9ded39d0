//! Confidence evaluation (docs/confidence.md): answers the labelled set
//! `examples/data/confidence-set.jsonl` (made by `scripts/make-confidence-set.py`) with a model
//! in its sandbox, checks each answer, fits the learned calibrator on the set's tuning part and
//! reports on its test part: every score's AUROC with a bootstrap interval, accuracy at 20/30/50%
//! coverage, expected calibration error, reliability bins. Run through
//! `scripts/eval-confidence.sh`.
//!
//! ```text
//! eval-confidence [--model ID] [--set FILE] [--out DIR] [--rerun] [--write-calibrator]
//!                 [--samples K] [--sample-temperature T]
//! ```
//!
//! `--samples K` (an experiment, not what the server does): each question is also answered K
//! times more under sampling (temperature T, default 0.7, seeds 1..K, the K decoded together),
//! and the report adds *sampling consistency* — how much the sampled answers agree with the
//! greedy one — alone and mixed with the calibrated score (one weight chosen on the tuning part).
//!
//! The answers are kept in `DIR/<model>.jsonl` (default `target/confidence`) and reused unless
//! `--rerun`: fitting and reporting take a second, answering the set some minutes.
//! `--write-calibrator` stores the fit as `models/calibrators/<model>.json`, the file the
//! catalog entry names. A chat model is asked as `corral run` asks (the question as the user's
//! message, greedy, at most 12 tokens); a model without a chat template gets
//! `Question: ...\nAnswer:`, at most 24 tokens, and stops at the end of the line.
//!
//! The shipped calibrators must match this build's features ([`features::NAMES`]) for any
//! configuration to load; after changing the features, give each file in `models/calibrators/`
//! the new names (weights 0) and regenerate it with `--write-calibrator`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use corral::answer::Request;
use corral::audit::Caller;
use corral::confidence::calibrator::{self, Calibrator, Labelled};
use corral::confidence::features::{self, Prompt, Tok};
use corral::confidence::{self, Method, TokenStat};
use corral::config::{Config, Sources};
use corral::routing::calibrate::{calibrate, Sample};
use corral::sandbox::HostSupport;
use corral::slm::models;
use corral::slm::runner::{runner_binary, Progress, Runner, RunnerSpec};
use corral_protocol::{ChatMessage, GenerateRequest, Input, Sampling, TokenInfo};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// One item of the set.
#[derive(Debug, Clone, Deserialize)]
struct Item {
    id: String,
    kind: String,
    subkind: String,
    split: String,
    prompt: String,
    answers: Vec<String>,
    check: String,
    #[serde(default)]
    labels: Vec<String>,
}

/// One answered item.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Answered {
    id: String,
    /// The text the request carried (what the features compare the answer with).
    prompt_text: String,
    task: String,
    text: String,
    truncated: bool,
    tokens: Vec<TokenInfo>,
    /// The same question answered again under sampling (`--samples`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    samples: Vec<String>,
}

/// Lower-cased words (runs of letters, digits and inner apostrophes) and numbers (with sign,
/// decimal point; thousands separators dropped) of `s`.
fn words(s: &str) -> Vec<String> {
    let s = s.to_lowercase();
    let mut out = Vec::new();
    let mut cur = String::new();
    let cs: Vec<char> = s.chars().collect();
    for (i, c) in cs.iter().enumerate() {
        let next_digit = cs.get(i + 1).is_some_and(char::is_ascii_digit);
        let prev_digit = i > 0 && cs[i - 1].is_ascii_digit();
        let keep = c.is_alphanumeric()
            || (*c == '-' && cur.is_empty() && next_digit)
            || ((*c == '.' || *c == ',') && prev_digit && next_digit && !cur.is_empty());
        if keep {
            if *c != ',' {
                cur.push(*c);
            }
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Whether `phrase` (its words) occurs as consecutive words of `ws`.
fn has_phrase(ws: &[String], phrase: &str) -> bool {
    let p = words(phrase);
    !p.is_empty() && ws.windows(p.len()).any(|w| w == p.as_slice())
}

fn same_number(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() < 1e-9,
        _ => a == b,
    }
}

/// The set's answer check (see scripts/make-confidence-set.py).
fn correct(item: &Item, answer: &str) -> bool {
    let ws = words(answer);
    match item.check.as_str() {
        "number" => item.answers.iter().any(|a| {
            if a.chars().any(|c| c.is_ascii_digit()) {
                ws.iter().any(|w| same_number(w, a))
            } else {
                has_phrase(&ws, a)
            }
        }),
        "text" => item.answers.iter().any(|a| has_phrase(&ws, a)),
        "label" => {
            let gold = &item.answers[0];
            let said = |l: &String| has_phrase(&ws, l);
            let named: Vec<&String> = item.labels.iter().filter(|l| said(l)).collect();
            if !named.is_empty() {
                return named == [gold];
            }
            // A yes/no question answered by restating it ("91 is not a prime number"): the
            // answer must name the question's numbers and another of its words, and is "no"
            // when it negates.
            let yes_no =
                item.labels.len() == 2 && item.labels.iter().all(|l| l == "yes" || l == "no");
            if !yes_no {
                return false;
            }
            let asked = words(&item.prompt);
            let restates = asked
                .iter()
                .filter(|w| w.chars().any(|c| c.is_ascii_digit()))
                .all(|w| ws.contains(w))
                && asked
                    .iter()
                    .filter(|w| w.len() > 3 && !w.chars().any(|c| c.is_ascii_digit()))
                    .any(|w| ws.contains(w));
            let negates = ws
                .iter()
                .any(|w| w == "not" || w == "isn't" || w == "never" || w.ends_with("n't"));
            restates && (if negates { "no" } else { "yes" }) == gold
        }
        other => panic!("{}: unknown check {other}", item.id),
    }
}

struct Args {
    model: String,
    set: PathBuf,
    out: PathBuf,
    rerun: bool,
    write: bool,
    samples: usize,
    sample_temperature: f32,
}

fn args() -> Args {
    let mut a = Args {
        model: corral::catalog::DEFAULT_MODEL.to_string(),
        set: PathBuf::from("examples/data/confidence-set.jsonl"),
        out: PathBuf::from("target/confidence"),
        rerun: false,
        write: false,
        samples: 0,
        sample_temperature: 0.7,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--model" => a.model = it.next().expect("--model ID"),
            "--set" => a.set = it.next().expect("--set FILE").into(),
            "--out" => a.out = it.next().expect("--out DIR").into(),
            "--rerun" => a.rerun = true,
            "--write-calibrator" => a.write = true,
            "--samples" => a.samples = it.next().and_then(|k| k.parse().ok()).expect("--samples K"),
            "--sample-temperature" => {
                a.sample_temperature = it
                    .next()
                    .and_then(|t| t.parse().ok())
                    .expect("--sample-temperature T")
            }
            other => {
                panic!("unknown argument {other} (see the header of examples/eval-confidence.rs)")
            }
        }
    }
    a
}

/// Answers every item with the model, in its sandbox.
fn answer_all(
    config: &Config,
    model_id: &str,
    items: &[Item],
    samples: usize,
    temperature: f32,
) -> Vec<Answered> {
    let model = models::lookup(&config.slm.models, model_id).expect("model in the catalog");
    let path = models::require(&config.slm.model_dir, model).expect("model file");
    let profile_name = model
        .sandbox_profile
        .clone()
        .unwrap_or_else(|| "secure".into());
    let profile = config.profiles.resolve(&profile_name).expect("profile");
    let spec = RunnerSpec {
        model_path: path,
        sha256: model.sha256.clone(),
        binary: runner_binary(),
        slots: samples.max(1),
        gpu: model.resource_requirements.gpu_requirements.clone(),
    };
    let mut runner =
        Runner::start(&spec, &profile, &config.sandbox, &HostSupport::probe()).expect("runner");
    let chat = runner.ready.has_chat_template;
    let mut out = Vec::new();
    for (n, item) in items.iter().enumerate() {
        // What routing sees of the request (the task type is a feature).
        let req = Request::chat("eval", vec![("user".into(), item.prompt.clone())]);
        let task = config
            .routing
            .decide(&req.context(&Caller::default()))
            .task
            .task
            .as_str()
            .to_string();
        // A base model writes digits one token each and stops at the end of its line: it
        // gets room for a three-digit sum spelt out.
        let (input, prompt_text, stop, max_tokens) = if chat {
            (
                Input::Messages(vec![ChatMessage::new("user", item.prompt.clone())]),
                item.prompt.clone(),
                vec![],
                12,
            )
        } else {
            let p = format!("Question: {}\nAnswer:", item.prompt);
            (Input::Prompt(p.clone()), p, vec!["\n".to_string()], 24)
        };
        let g = GenerateRequest {
            id: n as u64,
            input,
            sampling: Sampling::default(),
            max_tokens,
            stop,
            top_logprobs: 0,
            stream: false,
            ignore_eos: false,
            constraint: None,
            tools: None,
            max_tokens_explicit: true,
            cache_key: None,
        };
        // The greedy answer alone (a batch rounds differently in the last digits), then the
        // samples together.
        let sampled = sample(&mut runner, &g, samples, temperature);
        let done = runner.generate(g, &mut |_| {}).expect("generate");
        let a = Answered {
            id: item.id.clone(),
            prompt_text,
            task,
            truncated: done.finish_reason == corral_protocol::FinishReason::Length,
            text: done.text.clone(),
            tokens: done.tokens,
            samples: sampled,
        };
        eprintln!(
            "[{}/{}] {:<5} {:<24} {:<50} -> {:?}",
            n + 1,
            items.len(),
            if correct(item, &a.text) {
                "ok"
            } else {
                "WRONG"
            },
            item.subkind,
            item.prompt,
            a.text
        );
        out.push(a);
    }
    runner.shutdown();
    out
}

/// `k` answers to `g` under sampling at `temperature` (seeds 1..=k), decoded together.
fn sample(runner: &mut Runner, g: &GenerateRequest, k: usize, temperature: f32) -> Vec<String> {
    let mut flights: Vec<(corral::slm::runner::InFlight, Option<String>)> = (1..=k as u64)
        .map(|seed| {
            let mut r = g.clone();
            r.sampling = Sampling {
                temperature,
                seed: Some(seed),
                ..Sampling::default()
            };
            (runner.submit(r).expect("submit"), None)
        })
        .collect();
    while flights.iter().any(|(_, t)| t.is_none()) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let frame = runner
            .poll(until)
            .expect("runner")
            .expect("a frame within 60 s");
        let id = Runner::frame_id(&frame).expect("a frame for a request");
        let (f, text) = flights
            .iter_mut()
            .find(|(f, _)| f.id == id)
            .expect("a request in flight");
        if let Progress::Done(d) = runner.take(f, frame).expect("frame") {
            *text = Some(d.text);
        }
    }
    flights.into_iter().filter_map(|(_, t)| t).collect()
}

/// The words an answer commits to: its words and numbers ([`words`]) less a few function
/// words and less the words of the question.
fn atoms(answer: &str, prompt: &str) -> std::collections::BTreeSet<String> {
    const FUNCTION: [&str; 24] = [
        "the", "a", "an", "is", "are", "was", "of", "in", "to", "and", "it", "its", "answer",
        "that", "this", "be", "as", "for", "on", "with", "by", "or", "which", "so",
    ];
    let asked = words(prompt);
    words(answer)
        .into_iter()
        .filter(|w| !FUNCTION.contains(&w.as_str()) && !asked.contains(w))
        .collect()
}

/// Sampling consistency: the mean, over the sampled answers, of the Jaccard similarity of their
/// atoms with the greedy answer's ([`atoms`]; both empty = 1). `None` without samples.
fn consistency(greedy: &str, samples: &[String], prompt: &str) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let g = atoms(greedy, prompt);
    let sum: f64 = samples
        .iter()
        .map(|s| {
            let a = atoms(s, prompt);
            let union = g.union(&a).count();
            if union == 0 {
                1.0
            } else {
                g.intersection(&a).count() as f64 / union as f64
            }
        })
        .sum();
    Some(sum / samples.len() as f64)
}

/// Everything computed for one answered item.
struct Row {
    item: Item,
    ok: bool,
    task: String,
    features: Option<features::Features>,
    /// Plain scores over every token and over the span.
    all: Vec<f64>,
    span: Vec<f64>,
    /// Sampling consistency ([`consistency`]), when the answers have samples.
    consistency: Option<f64>,
}

fn rows(items: &[Item], answered: &[Answered]) -> Vec<Row> {
    let by_id: BTreeMap<&str, &Answered> = answered.iter().map(|a| (a.id.as_str(), a)).collect();
    items
        .iter()
        .map(|item| {
            let a = by_id
                .get(item.id.as_str())
                .unwrap_or_else(|| panic!("{}: not answered (run with --rerun)", item.id));
            let toks: Vec<Tok<'_>> = a
                .tokens
                .iter()
                .filter(|t| !t.forced)
                .map(|t| Tok {
                    stat: TokenStat::from(t),
                    text: &t.text,
                })
                .collect();
            let prompt = Prompt::new(&a.prompt_text);
            let in_span = features::span(&toks, &prompt);
            let stats: Vec<TokenStat> = toks.iter().map(|t| t.stat).collect();
            let span_stats: Vec<TokenStat> = toks
                .iter()
                .zip(&in_span)
                .filter(|(_, s)| **s)
                .map(|(t, _)| t.stat)
                .collect();
            let plain = |s: &[TokenStat]| -> Vec<f64> {
                Method::PLAIN
                    .iter()
                    .map(|m| confidence::score(s, *m).unwrap_or(0.0))
                    .collect()
            };
            Row {
                item: item.clone(),
                ok: correct(item, &a.text),
                task: a.task.clone(),
                features: features::features(&toks, &prompt, a.truncated),
                all: plain(&stats),
                span: plain(&span_stats),
                consistency: consistency(&a.text, &a.samples, &item.prompt),
            }
        })
        .collect()
}

/// The rows with an answer (an empty one has no features, and no score in production: it is
/// below any threshold), as the fit sees them.
fn labelled(rows: &[&Row], keep: &[usize]) -> Vec<Labelled> {
    rows.iter()
        .filter_map(|r| {
            Some(Labelled {
                features: keep_only(&r.features.as_ref()?.values, keep),
                task: r.task.clone(),
                correct: r.ok,
                group: r.item.kind.clone(),
            })
        })
        .collect()
}

/// `values` with the features not in `keep` set to 0 (a constant: the fit ignores it).
fn keep_only(values: &[f64], keep: &[usize]) -> Vec<f64> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| if keep.contains(&i) { *v } else { 0.0 })
        .collect()
}

/// One line of the report: a score's AUROC (with interval), accuracy at coverage, ECE.
fn line(name: &str, s: &[f64], labels: &[bool]) -> serde_json::Value {
    let q = calibrator::quality(s, labels);
    let ci = calibrator::auroc_interval(s, labels, 1000, 7);
    let acc = |f| confidence::accuracy_of_top(s, labels, f);
    let f = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.3}"));
    println!(
        "| {name} | {} | {} | {} | {} | {} | {:.3} |",
        f(q.auroc),
        ci.map_or("n/a".into(), |(lo, hi)| format!("{lo:.3}–{hi:.3}")),
        f(acc(0.2)),
        f(acc(0.3)),
        f(acc(0.5)),
        q.ece,
    );
    json!({"name": name, "auroc": q.auroc, "interval": ci, "top20": acc(0.2), "top30": acc(0.3),
           "top50": acc(0.5), "ece": q.ece, "brier": q.brier,
           "reliability": calibrator::reliability(s, labels, 10)})
}

const HEADER: &str = "| score | AUROC | 95% interval | accuracy at 20% | 30% | 50% | ECE |\n| --- | --- | --- | --- | --- | --- | --- |";

fn main() {
    let a = args();
    let config = Config::load(&Sources::default()).expect("config");
    let items: Vec<Item> = std::fs::read_to_string(&a.set)
        .unwrap_or_else(|e| panic!("{}: {e}", a.set.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("set line"))
        .collect();
    std::fs::create_dir_all(&a.out).unwrap();
    let records = a.out.join(format!("{}.jsonl", a.model));
    let answered: Vec<Answered> = if a.rerun || !records.exists() {
        let answered = answer_all(&config, &a.model, &items, a.samples, a.sample_temperature);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&records).unwrap());
        for r in &answered {
            writeln!(f, "{}", serde_json::to_string(r).unwrap()).unwrap();
        }
        answered
    } else {
        std::io::BufReader::new(std::fs::File::open(&records).unwrap())
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
            .collect()
    };
    let rows = rows(&items, &answered);
    let tune: Vec<&Row> = rows.iter().filter(|r| r.item.split == "tune").collect();
    let test: Vec<&Row> = rows.iter().filter(|r| r.item.split == "test").collect();
    let count = |rs: &[&Row]| rs.iter().filter(|r| r.ok).count();
    println!(
        "model {}: {} items, tuning part {} ({} correct), test part {} ({} correct)\n",
        a.model,
        rows.len(),
        tune.len(),
        count(&tune),
        test.len(),
        count(&test)
    );
    let mut kinds: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
    for r in &rows {
        let e = kinds
            .entry((r.item.kind.clone(), r.item.split.clone()))
            .or_default();
        e.0 += usize::from(r.ok);
        e.1 += 1;
    }
    println!("| kind | part | correct |\n| --- | --- | --- |");
    for ((k, s), (ok, n)) in &kinds {
        println!("| {k} | {s} | {ok}/{n} |");
    }

    // The learned scores, fitted on the tuning part only.
    let all_features: Vec<usize> = (0..features::NAMES.len()).collect();
    let no_span: Vec<usize> = features::NAMES
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            !n.starts_with("span_") && !["echo_share", "copied_span", "new_words"].contains(n)
        })
        .map(|(i, _)| i)
        .collect();
    let fitted_on = format!("{}: tuning part, {} items", a.set.display(), tune.len());
    let cal = Calibrator::fit(&a.model, &labelled(&tune, &all_features), &fitted_on)
        .expect("the tuning part has correct and wrong answers");
    let cal_no_span = Calibrator::fit(&a.model, &labelled(&tune, &no_span), "")
        .expect("the tuning part has correct and wrong answers");
    // An empty answer scores 0 (no score: below any threshold).
    let predict = |c: &Calibrator, rs: &[&Row], keep: &[usize]| -> Vec<f64> {
        rs.iter()
            .map(|r| {
                r.features.as_ref().map_or(0.0, |f| {
                    c.predict_values(&keep_only(&f.values, keep), &r.task)
                })
            })
            .collect()
    };

    // Sampling consistency, alone and mixed with the calibrated score: w · calibrated +
    // (1 − w) · consistency, w chosen on the tuning part (the best AUROC there, steps of 0.05).
    let sampled = rows.iter().all(|r| r.consistency.is_some());
    let k = answered.first().map_or(0, |x| x.samples.len());
    let cons =
        |rs: &[&Row]| -> Vec<f64> { rs.iter().map(|r| r.consistency.unwrap_or(0.0)).collect() };
    let mix = |w: f64, rs: &[&Row]| -> Vec<f64> {
        predict(&cal, rs, &all_features)
            .iter()
            .zip(cons(rs))
            .map(|(p, c)| w * p + (1.0 - w) * c)
            .collect()
    };
    let mix_w = if sampled {
        // The tuning part's calibrated scores out of fold (each kind predicted by a fit on the
        // others): in-sample ones would favour the calibrator.
        let mut oof = vec![0.0; tune.len()];
        let tuned_kinds: std::collections::BTreeSet<&str> =
            tune.iter().map(|r| r.item.kind.as_str()).collect();
        for kind in tuned_kinds {
            let others: Vec<&Row> = tune
                .iter()
                .copied()
                .filter(|r| r.item.kind != kind)
                .collect();
            let Some(c) = Calibrator::fit(&a.model, &labelled(&others, &all_features), "") else {
                continue;
            };
            for (i, r) in tune.iter().enumerate().filter(|(_, r)| r.item.kind == kind) {
                oof[i] = r
                    .features
                    .as_ref()
                    .map_or(0.0, |f| c.predict_values(&f.values, &r.task));
            }
        }
        let tl: Vec<bool> = tune.iter().map(|r| r.ok).collect();
        let tc = cons(&tune);
        (0..=20)
            .map(|i| f64::from(i) * 0.05)
            .max_by(|x, y| {
                let q = |w: f64| {
                    let m: Vec<f64> = oof
                        .iter()
                        .zip(&tc)
                        .map(|(p, c)| w * p + (1.0 - w) * c)
                        .collect();
                    confidence::auroc(&m, &tl).unwrap_or(0.0)
                };
                q(*x).total_cmp(&q(*y))
            })
            .unwrap_or(0.5)
    } else {
        0.5
    };
    // The report's lines for consistency and the mixture (none without samples).
    let sampled_lines = |rs: &[&Row], labels: &[bool]| -> Vec<serde_json::Value> {
        if !sampled {
            return Vec::new();
        }
        vec![
            line(&format!("consistency ({k} samples)"), &cons(rs), labels),
            line(
                &format!("{mix_w:.2} · calibrated + {:.2} · consistency", 1.0 - mix_w),
                &mix(mix_w, rs),
                labels,
            ),
        ]
    };

    let mut report = serde_json::Map::new();
    report.insert("model".into(), json!(a.model));
    for (part, rs) in [("test", &test), ("tune", &tune)] {
        let labels: Vec<bool> = rs.iter().map(|r| r.ok).collect();
        println!(
            "\n{} part ({} items, {} correct):\n\n{HEADER}",
            part,
            rs.len(),
            count(rs)
        );
        let mut lines = vec![
            line("calibrated", &predict(&cal, rs, &all_features), &labels),
            line(
                "calibrated, no span features",
                &predict(&cal_no_span, rs, &no_span),
                &labels,
            ),
        ];
        for (i, m) in Method::PLAIN.iter().enumerate() {
            let all: Vec<f64> = rs.iter().map(|r| r.all[i]).collect();
            let span: Vec<f64> = rs.iter().map(|r| r.span[i]).collect();
            lines.push(line(m.name(), &all, &labels));
            lines.push(line(&format!("{} over the span", m.name()), &span, &labels));
        }
        lines.extend(sampled_lines(rs, &labels));
        report.insert(part.into(), json!(lines));
    }

    // The test part by whether its kind was in the tuning part.
    let tuned: Vec<&str> = tune.iter().map(|r| r.item.kind.as_str()).collect();
    for (name, keep) in [
        ("kinds the tuning part has", true),
        ("kinds the tuning part lacks", false),
    ] {
        let rs: Vec<&Row> = test
            .iter()
            .copied()
            .filter(|r| tuned.contains(&r.item.kind.as_str()) == keep)
            .collect();
        let labels: Vec<bool> = rs.iter().map(|r| r.ok).collect();
        println!(
            "\ntest part, {name} ({} items, {} correct):\n\n{HEADER}",
            rs.len(),
            count(&rs)
        );
        line("calibrated", &predict(&cal, &rs, &all_features), &labels);
        let gm: Vec<f64> = rs.iter().map(|r| r.all[0]).collect();
        line("geometric_mean", &gm, &labels);
        sampled_lines(&rs, &labels);
    }

    // Each feature alone on the test part (oriented by its sign on the tuning part).
    println!("\neach feature alone, test part (sign from the tuning part):\n\n| feature | AUROC |\n| --- | --- |");
    let tl: Vec<bool> = tune.iter().map(|r| r.ok).collect();
    let sl: Vec<bool> = test.iter().map(|r| r.ok).collect();
    for (i, name) in features::NAMES.iter().enumerate() {
        let v = |rs: &[&Row]| -> Vec<f64> {
            rs.iter()
                .map(|r| r.features.as_ref().map_or(0.0, |f| f.values[i]))
                .collect()
        };
        let sign = if confidence::auroc(&v(&tune), &tl).unwrap_or(0.5) < 0.5 {
            -1.0
        } else {
            1.0
        };
        let s: Vec<f64> = v(&test).iter().map(|x| sign * x).collect();
        println!(
            "| {}{name} | {} |",
            if sign < 0.0 { "−" } else { "" },
            confidence::auroc(&s, &sl).map_or("n/a".into(), |x| format!("{x:.3}"))
        );
    }
    // The test part by kind, and its arithmetic and facts (the kind of set the project's
    // goal for unseen questions is measured on).
    println!(
        "\ntest part by kind:\n\n| kind | items | correct | calibrated AUROC | accuracy at 30% | geometric_mean AUROC |{}\n| --- | --- | --- | --- | --- | --- |{}",
        if sampled { " consistency AUROC | mixed AUROC |" } else { "" },
        if sampled { " --- | --- |" } else { "" }
    );
    let kinds: std::collections::BTreeSet<&str> =
        test.iter().map(|r| r.item.kind.as_str()).collect();
    let groups: Vec<(String, Vec<&Row>)> = kinds
        .iter()
        .map(|k| {
            (
                k.to_string(),
                test.iter().copied().filter(|r| r.item.kind == *k).collect(),
            )
        })
        .chain(std::iter::once((
            "arithmetic, countries and elements".to_string(),
            test.iter()
                .copied()
                .filter(|r| {
                    matches!(
                        r.item.kind.as_str(),
                        "arithmetic" | "countries" | "elements"
                    )
                })
                .collect(),
        )))
        .collect();
    for (k, rs) in &groups {
        let labels: Vec<bool> = rs.iter().map(|r| r.ok).collect();
        let f = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.3}"));
        let gm: Vec<f64> = rs.iter().map(|r| r.all[0]).collect();
        let p = predict(&cal, rs, &all_features);
        // With samples: the consistency's AUROC and the mixture's, after the row's columns.
        let sampled_cols = if sampled {
            format!(
                " {} | {} |",
                f(confidence::auroc(&cons(rs), &labels)),
                f(confidence::auroc(&mix(mix_w, rs), &labels))
            )
        } else {
            String::new()
        };
        println!(
            "| {k} | {} | {} | {} | {} | {} |{sampled_cols}",
            rs.len(),
            count(rs),
            f(confidence::auroc(&p, &labels)),
            f(confidence::accuracy_of_top(&p, &labels, 0.3)),
            f(confidence::auroc(&gm, &labels)),
        );
    }
    // Thresholds picked from the tuning part's calibrated scores (the Wilson-bound calibration
    // feedback uses, src/routing/calibrate.rs), applied to the test part.
    println!("\nthresholds from the tuning part, applied to the test part:\n\n| target accuracy | threshold | test accepted | test accuracy |\n| --- | --- | --- | --- |");
    let tune_p = predict(&cal, &tune, &all_features);
    let test_p = predict(&cal, &test, &all_features);
    for target in [0.5, 0.6, 0.7, 0.8] {
        let samples: Vec<Sample> = tune_p
            .iter()
            .zip(&tune)
            .map(|(p, r)| Sample {
                score: *p,
                correct: r.ok,
            })
            .collect();
        let c = calibrate(&samples, target, 10);
        let (accepted, acc) = match c.threshold {
            Some(t) => {
                let kept: Vec<bool> = test_p
                    .iter()
                    .zip(&test)
                    .filter(|(p, _)| **p >= t)
                    .map(|(_, r)| r.ok)
                    .collect();
                let ok = kept.iter().filter(|k| **k).count();
                (
                    format!("{}/{}", kept.len(), test.len()),
                    if kept.is_empty() {
                        "n/a".to_string()
                    } else {
                        format!("{:.3}", ok as f64 / kept.len() as f64)
                    },
                )
            }
            None => (
                format!("0/{}", test.len()),
                "everything escalated".to_string(),
            ),
        };
        println!(
            "| {target} | {} | {accepted} | {acc} |",
            c.threshold
                .map_or("none".to_string(), |t| format!("{t:.3}"))
        );
    }
    println!(
        "\ncalibrator: l2 {}, bias {:.3}, tasks {:?}",
        cal.l2, cal.bias, cal.tasks
    );
    for (n, w) in features::NAMES.iter().zip(&cal.weights) {
        println!("  {n:<24} {w:+.3}");
    }
    for (t, w) in cal.tasks.iter().zip(&cal.weights[features::NAMES.len()..]) {
        println!("  task {t:<19} {w:+.3}");
    }
    let report_path = a.out.join(format!("{}-report.json", a.model));
    std::fs::write(&report_path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nreport: {}", report_path.display());
    if a.write {
        let path = PathBuf::from(format!("models/calibrators/{}.json", a.model));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(&cal).unwrap() + "\n").unwrap();
        println!("calibrator: {}", path.display());
    }
}
