//! Task classification: what kind of request this is and how hard it looks, with the evidence.
//!
//! An explicit hint (`metadata.task` in the API, `--task` on the CLI) wins. Otherwise every
//! classification rule (built-in ones unless `routing.classification.builtin = false`, then the
//! configured ones) whose keyword or regex matches adds its weight to its task type; the highest
//! total wins, ties going to the rule listed first. No match: `routing.classification.default_task`.

use std::fmt;
use std::str::FromStr;

use regex::{Regex, RegexSet};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The task types policies can name. `Custom` names come from classification rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskType {
    Intent,
    Extract,
    Template,
    BoilerplateCode,
    CodeGeneration,
    Reasoning,
    Analysis,
    Summarization,
    Translation,
    QA,
    Custom(String),
}

impl TaskType {
    pub const BUILTIN: [TaskType; 10] = [
        TaskType::Intent,
        TaskType::Extract,
        TaskType::Template,
        TaskType::BoilerplateCode,
        TaskType::CodeGeneration,
        TaskType::Reasoning,
        TaskType::Analysis,
        TaskType::Summarization,
        TaskType::Translation,
        TaskType::QA,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            TaskType::Intent => "Intent",
            TaskType::Extract => "Extract",
            TaskType::Template => "Template",
            TaskType::BoilerplateCode => "BoilerplateCode",
            TaskType::CodeGeneration => "CodeGeneration",
            TaskType::Reasoning => "Reasoning",
            TaskType::Analysis => "Analysis",
            TaskType::Summarization => "Summarization",
            TaskType::Translation => "Translation",
            TaskType::QA => "QA",
            TaskType::Custom(s) => s,
        }
    }

    pub fn is_builtin(&self) -> bool {
        !matches!(self, TaskType::Custom(_))
    }
}

impl FromStr for TaskType {
    type Err = String;
    /// Built-in names are matched exactly; any other non-empty identifier is a custom type
    /// (whether it is declared is checked when the configuration is compiled).
    fn from_str(s: &str) -> Result<TaskType, String> {
        if let Some(t) = TaskType::BUILTIN.iter().find(|t| t.as_str() == s) {
            return Ok(t.clone());
        }
        let ok = !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            Ok(TaskType::Custom(s.to_string()))
        } else {
            Err(format!("'{s}' is not a task type name"))
        }
    }
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for TaskType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TaskType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TaskType, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Complexity {
    Low,
    Medium,
    High,
}

/// The classifier's answer and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    pub task: TaskType,
    /// `hint`, `rules` or `default`.
    pub source: &'static str,
    pub complexity: Complexity,
    /// 0..1, see [`estimate_complexity`].
    pub complexity_score: f32,
    pub evidence: Vec<String>,
}

/// A classification rule from `[[routing.classification.rules]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClassRule {
    pub task: TaskType,
    /// Case-insensitive substrings.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Regular expressions (Rust `regex` syntax; add `(?i)` for case-insensitive).
    #[serde(default)]
    pub regex: Vec<String>,
    #[serde(default = "one")]
    pub weight: f32,
}

fn one() -> f32 {
    1.0
}

#[derive(Debug, Clone)]
struct ClassRule {
    task: TaskType,
    weight: f32,
}

/// What one pattern of the classifier's set stands for.
#[derive(Debug, Clone)]
enum Pattern {
    /// A keyword of rule `.0` (lower-cased, as configured).
    Keyword(usize, String),
    /// A regex of rule `.0` (source, and compiled on its own, on first use, to quote what matched
    /// as evidence).
    Regex(usize, String, std::sync::OnceLock<Regex>),
}

/// Compiles a pattern already known to be valid (checked at load, or a built-in constant that
/// every unit test compiles).
#[allow(clippy::expect_used)]
fn known_good(pattern: &str) -> Regex {
    Regex::new(pattern).expect("pattern validated when the configuration loaded")
}

/// Compiled classification rules, and the one [`RegexSet`] that finds everything the router
/// looks for in a prompt in a single pass: the complexity markers, every rule's keywords and
/// regexes, and the caller's extra patterns (the prompt-injection signals).
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<ClassRule>,
    default_task: TaskType,
    /// `[MARKERS][patterns][extra]`, in that order; compiled at load when the configuration
    /// adds patterns (so a bad one is a load error), else on first use (the built-in ones are
    /// known to compile, and commands that never classify, such as `sandbox exec`, should not
    /// pay for them).
    set: std::sync::OnceLock<RegexSet>,
    sources: Vec<String>,
    patterns: Vec<Pattern>,
}

/// What one pass of [`Classifier::scan`] found in a prompt.
#[derive(Debug, Clone)]
pub struct Scan(regex::SetMatches);

/// The built-in rules (`routing.classification.builtin = true`).
const BUILTIN_RULES: &[(&str, &str, f32)] = &[
    (
        "Translation",
        r"(?i)(?-u:\b)translat(e|ion|ing)(?-u:\b)|(?-u:\b)(into|to|in) (english|spanish|french|german|italian|portuguese|chinese|japanese|korean|russian|arabic|dutch)(?-u:\b)",
        3.0,
    ),
    (
        "Summarization",
        r"(?i)(?-u:\b)summar(y|ize|ise|ies)(?-u:\b)|(?-u:\b)tl;?dr(?-u:\b)|(?-u:\b)in (one|a few|two|three) sentences?(?-u:\b)|(?-u:\b)condense(?-u:\b)",
        3.0,
    ),
    (
        "BoilerplateCode",
        r"(?i)(?-u:\b)(boilerplate|scaffold(ing)?|skeleton|stub)(?-u:\b)",
        3.0,
    ),
    (
        "CodeGeneration",
        r"(?i)(?-u:\b)(write|implement|create|generate|code)(?-u:\b)[^.?!]{0,60}(?-u:\b)(function|class|method|program|script|module|api|endpoint|sql|query|regex)(?-u:\b)",
        3.0,
    ),
    (
        "CodeGeneration",
        r"(?m)^\s*(def |fn |func |function |class |public |#include|import |SELECT )|```",
        1.5,
    ),
    (
        "Extract",
        r"(?i)(?-u:\b)(extract|pull out|parse|list all|find all)(?-u:\b)|(?-u:\b)as json(?-u:\b)",
        2.5,
    ),
    (
        "Intent",
        r"(?i)(?-u:\b)(classify|categori[sz]e|what is the intent|which category|sentiment)(?-u:\b)",
        2.5,
    ),
    (
        "Template",
        r"(?i)(?-u:\b)(fill in|form letter|template|mail merge)(?-u:\b)",
        2.0,
    ),
    (
        "Analysis",
        r"(?i)(?-u:\b)(analy[sz]e|analysis|compare|contrast|evaluate|assess|pros and cons|trade-?offs?)(?-u:\b)",
        2.0,
    ),
    (
        "Reasoning",
        r"(?i)(?-u:\b)(why|prove|derive|step by step|reason(ing)?|logic(al)?|puzzle|solve)(?-u:\b)",
        1.5,
    ),
    (
        "QA",
        r"(?i)^\s*(what|who|when|where|which|how many|how much|how old|is|are|does|do|did|can|was|were)(?-u:\b)[^\n]*\?\s*$",
        1.5,
    ),
];

/// The complexity markers (see [`estimate_complexity`]), each one pattern of the scan set:
/// (pattern, what the evidence calls it).
const MARKERS: [(&str, &str); 8] = [
    (r"(?i)step by step|step-by-step", "asks for steps"),
    (r"(?i)prove|derive", "asks for a proof or derivation"),
    (r"```", "contains code"),
    (r"(?i)must ", "constraint"),
    (r"(?i)should not", "constraint"),
    (r"(?i)at least", "constraint"),
    (r"(?i)no more than", "constraint"),
    (r"(?i)without using", "constraint"),
];
/// Index of the first constraint phrase in [`MARKERS`].
const FIRST_CONSTRAINT: usize = 3;

impl Classifier {
    /// Built-in rules (when `builtin`) followed by `extra`, in that order of precedence on ties.
    pub fn new(
        builtin: bool,
        extra: &[RawClassRule],
        default_task: TaskType,
    ) -> Result<Classifier, (String, String)> {
        Self::with_patterns(builtin, extra, default_task, std::iter::empty())
    }

    /// [`Classifier::new`] whose scan also looks for `more` (indices reported by
    /// [`Classifier::extra_matches`] in the order given), so that one pass over the prompt serves
    /// other detectors too.
    pub fn with_patterns(
        builtin: bool,
        extra: &[RawClassRule],
        default_task: TaskType,
        more: impl Iterator<Item = String>,
    ) -> Result<Classifier, (String, String)> {
        let mut rules = Vec::new();
        let mut patterns = Vec::new();
        if builtin {
            for (task, re, weight) in BUILTIN_RULES {
                patterns.push(Pattern::Regex(
                    rules.len(),
                    re.to_string(),
                    std::sync::OnceLock::new(),
                ));
                rules.push(ClassRule {
                    task: task
                        .parse()
                        .map_err(|e| ("routing.classification".into(), e))?,
                    weight: *weight,
                });
            }
        }
        for (i, r) in extra.iter().enumerate() {
            let key = format!("routing.classification.rules[{i}]");
            if r.keywords.is_empty() && r.regex.is_empty() {
                return Err((key, "needs keywords or regex".into()));
            }
            if !(r.weight.is_finite() && r.weight > 0.0) {
                return Err((format!("{key}.weight"), "must be > 0".into()));
            }
            for (j, k) in r.keywords.iter().enumerate() {
                if k.is_empty() {
                    return Err((format!("{key}.keywords[{j}]"), "is empty".into()));
                }
                patterns.push(Pattern::Keyword(rules.len(), k.to_lowercase()));
            }
            for (j, re) in r.regex.iter().enumerate() {
                let regex =
                    Regex::new(re).map_err(|e| (format!("{key}.regex[{j}]"), e.to_string()))?;
                patterns.push(Pattern::Regex(rules.len(), re.clone(), regex.into()));
            }
            rules.push(ClassRule {
                task: r.task.clone(),
                weight: r.weight,
            });
        }
        let sources: Vec<String> = MARKERS
            .iter()
            .map(|(p, _)| p.to_string())
            .chain(patterns.iter().map(|p| match p {
                // Case-insensitive substring, as the keyword was documented.
                Pattern::Keyword(_, k) => format!("(?i){}", regex::escape(k)),
                Pattern::Regex(_, re, _) => re.clone(),
            }))
            .chain(more)
            .collect();
        let set = std::sync::OnceLock::new();
        if !extra.is_empty() {
            let compiled = RegexSet::new(&sources)
                .map_err(|e| ("routing.classification".to_string(), e.to_string()))?;
            let _ = set.set(compiled);
        }
        Ok(Classifier {
            rules,
            default_task,
            set,
            sources,
            patterns,
        })
    }

    /// Task types the rules can produce (custom ones become nameable by policies).
    pub fn known_tasks(&self) -> impl Iterator<Item = &TaskType> {
        self.rules
            .iter()
            .map(|r| &r.task)
            .chain([&self.default_task])
    }

    /// One pass over `prompt` with every pattern; feed the result to
    /// [`Classifier::classify_scanned`] and [`Classifier::extra_matches`].
    pub fn scan(&self, prompt: &str) -> Scan {
        let set = self.set.get_or_init(|| {
            #[allow(clippy::expect_used)] // built-in patterns only: see the field's doc
            RegexSet::new(&self.sources).expect("built-in classification patterns compile")
        });
        Scan(set.matches(prompt))
    }

    /// Which of the extra patterns given to [`Classifier::with_patterns`] matched (ascending).
    pub fn extra_matches<'a>(&self, scan: &'a Scan) -> impl Iterator<Item = usize> + 'a {
        let first = MARKERS.len() + self.patterns.len();
        scan.0.iter().filter_map(move |i| i.checked_sub(first))
    }

    pub fn classify(&self, prompt: &str, hint: Option<&TaskType>) -> Classification {
        self.classify_scanned(prompt, hint, &self.scan(prompt))
    }

    /// [`Classifier::classify`] from a [`Classifier::scan`] of the same `prompt`.
    pub fn classify_scanned(
        &self,
        prompt: &str,
        hint: Option<&TaskType>,
        scan: &Scan,
    ) -> Classification {
        let mut markers = [false; MARKERS.len()];
        for (i, m) in markers.iter_mut().enumerate() {
            *m = scan.0.matched(i);
        }
        let (complexity, complexity_score, mut evidence) = complexity_of(prompt, markers);
        if let Some(t) = hint {
            evidence.insert(0, format!("task given by the request: {t}"));
            return Classification {
                task: t.clone(),
                source: "hint",
                complexity,
                complexity_score,
                evidence,
            };
        }
        // (task, score, first rule index) in first-seen order; a rule counts once, for the first
        // of its patterns that matched.
        let mut scores: Vec<(TaskType, f32, usize)> = Vec::new();
        let mut counted = usize::MAX;
        for i in scan.0.iter() {
            let Some(p) = i
                .checked_sub(MARKERS.len())
                .and_then(|i| self.patterns.get(i))
            else {
                continue;
            };
            let (rule, what) = match p {
                Pattern::Keyword(r, k) => (*r, format!("keyword '{k}'")),
                Pattern::Regex(r, src, re) => (
                    *r,
                    re.get_or_init(|| known_good(src))
                        .find(prompt)
                        .map(|m| format!("'{}'", truncate(m.as_str(), 40)))
                        .unwrap_or_default(),
                ),
            };
            if rule == counted {
                continue;
            }
            counted = rule;
            let r = &self.rules[rule];
            evidence.push(format!("{what} -> {} +{}", r.task, r.weight));
            match scores.iter_mut().find(|(t, _, _)| *t == r.task) {
                Some(s) => s.1 += r.weight,
                None => scores.push((r.task.clone(), r.weight, rule)),
            }
        }
        let best = scores
            .iter()
            .fold(None::<&(TaskType, f32, usize)>, |best, s| match best {
                Some(b) if b.1 > s.1 || (b.1 == s.1 && b.2 < s.2) => Some(b),
                _ => Some(s),
            });
        match best {
            Some((task, _, _)) => Classification {
                task: task.clone(),
                source: "rules",
                complexity,
                complexity_score,
                evidence,
            },
            None => {
                evidence.push(format!("no rule matched: default {}", self.default_task));
                Classification {
                    task: self.default_task.clone(),
                    source: "default",
                    complexity,
                    complexity_score,
                    evidence,
                }
            }
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// A cheap complexity estimate in [0, 1]: length (words / 400, capped at 0.6) plus 0.15 for each
/// marker of multi-step work (step-by-step requests, proofs, code blocks, numbered lists,
/// several questions, two or more constraint phrases such as "must" and "at least"), capped at 1.
/// Low below 0.25, High from 0.6. Phrases match ignoring case.
pub fn estimate_complexity(prompt: &str) -> (Complexity, f32, Vec<String>) {
    static SET: std::sync::OnceLock<RegexSet> = std::sync::OnceLock::new();
    let set = SET.get_or_init(|| {
        #[allow(clippy::expect_used)] // constants above, compiled by every test
        RegexSet::new(MARKERS.iter().map(|(p, _)| p)).expect("marker patterns compile")
    });
    let found = set.matches(prompt);
    let mut markers = [false; MARKERS.len()];
    for (i, m) in markers.iter_mut().enumerate() {
        *m = found.matched(i);
    }
    complexity_of(prompt, markers)
}

fn complexity_of(prompt: &str, markers: [bool; MARKERS.len()]) -> (Complexity, f32, Vec<String>) {
    // Words: starts of runs of bytes above the space character (ASCII whitespace and control
    // characters separate them; UTF-8 multi-byte characters count as word bytes). Counted over
    // fixed-size chunks so the compiler vectorizes it.
    let b = prompt.as_bytes();
    let mut words = usize::from(b.first().is_some_and(|c| *c > b' '));
    let mut questions = 0usize;
    if let Some(rest) = b.get(1..) {
        // Pairs (previous, current) in blocks of 64: a block's count fits in a u8, which
        // keeps the loop in byte-wide vector lanes.
        let (prev, cur) = (&b[..rest.len()], rest);
        let mut pc = prev.chunks_exact(64);
        let mut cc = cur.chunks_exact(64);
        for (p, c) in pc.by_ref().zip(cc.by_ref()) {
            let n: u8 = p
                .iter()
                .zip(c)
                .map(|(p, c)| u8::from(*p <= b' ') & u8::from(*c > b' '))
                .sum();
            words += usize::from(n);
        }
        words += pc
            .remainder()
            .iter()
            .zip(cc.remainder())
            .filter(|(p, c)| **p <= b' ' && **c > b' ')
            .count();
    }
    let mut qc = b.chunks_exact(64);
    for c in qc.by_ref() {
        let n: u8 = c.iter().map(|c| u8::from(*c == b'?')).sum();
        questions += usize::from(n);
    }
    questions += qc.remainder().iter().filter(|c| **c == b'?').count();
    let mut score = (words as f32 / 400.0).min(0.6);
    let mut evidence = vec![format!("{words} words")];
    let numbered = prompt
        .split('\n')
        .filter(|l| {
            let t = l.trim_start().as_bytes();
            t.len() > 2 && t[0].is_ascii_digit() && (t[1] == b'.' || t[1] == b')')
        })
        .count();
    let constraints = markers[FIRST_CONSTRAINT..].iter().filter(|m| **m).count();
    let hits: [(&str, bool); 6] = [
        (MARKERS[0].1, markers[0]),
        (MARKERS[1].1, markers[1]),
        (MARKERS[2].1, markers[2]),
        ("numbered list", numbered >= 2),
        ("several questions", questions >= 2),
        ("constraints", constraints >= 2),
    ];
    for (name, hit) in hits {
        if hit {
            score += 0.15;
            evidence.push(name.to_string());
        }
    }
    let score = score.min(1.0);
    let level = if score >= 0.6 {
        Complexity::High
    } else if score >= 0.25 {
        Complexity::Medium
    } else {
        Complexity::Low
    };
    evidence.push(format!("complexity {score:.2} ({level:?})"));
    (level, score, evidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c() -> Classifier {
        Classifier::new(true, &[], TaskType::QA).unwrap()
    }

    #[test]
    fn builtin_rules_pick_the_obvious_task() {
        let cases = [
            (
                "Translate 'good morning' into Spanish.",
                TaskType::Translation,
            ),
            (
                "Summarize: the cat sat on the mat.",
                TaskType::Summarization,
            ),
            (
                "Write a Python function that reverses a list",
                TaskType::CodeGeneration,
            ),
            (
                "Extract every email address from this text as JSON",
                TaskType::Extract,
            ),
            (
                "Compare the pros and cons of Rust and Go",
                TaskType::Analysis,
            ),
            ("What is the capital of France?", TaskType::QA),
            ("Classify the sentiment of this review", TaskType::Intent),
        ];
        for (p, want) in cases {
            let got = c().classify(p, None);
            assert_eq!(got.task, want, "{p}: {:?}", got.evidence);
            assert_eq!(got.source, "rules");
        }
        let none = c().classify("hello there", None);
        assert_eq!((none.task, none.source), (TaskType::QA, "default"));
    }

    #[test]
    fn a_hint_wins_and_custom_rules_add_weight() {
        let hint = TaskType::Custom("legal".into());
        assert_eq!(c().classify("Translate this", Some(&hint)).task, hint);
        let extra = vec![RawClassRule {
            task: TaskType::Custom("legal".into()),
            keywords: vec!["Contract".into()],
            regex: vec![],
            weight: 5.0,
        }];
        let cl = Classifier::new(true, &extra, TaskType::QA).unwrap();
        assert_eq!(cl.classify("Summarize this contract", None).task, hint);
        let bad = vec![RawClassRule {
            task: TaskType::QA,
            keywords: vec![],
            regex: vec!["(".into()],
            weight: 1.0,
        }];
        let e = Classifier::new(false, &bad, TaskType::QA).unwrap_err();
        assert_eq!(e.0, "routing.classification.rules[0].regex[0]");
    }

    #[test]
    fn complexity_grows_with_length_and_markers() {
        assert_eq!(estimate_complexity("What is 2+2?").0, Complexity::Low);
        let long = "word ".repeat(300) + " Explain step by step and prove it. Why? How?";
        assert_eq!(estimate_complexity(&long).0, Complexity::High);
    }
}
