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
    keywords: Vec<String>,
    regex: Vec<Regex>,
    weight: f32,
}

/// Compiled classification rules.
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<ClassRule>,
    default_task: TaskType,
    /// Every rule's regexes in one set (one pass over the prompt), and the rule of each.
    set: RegexSet,
    set_rule: Vec<usize>,
    has_keywords: bool,
}

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

impl Classifier {
    /// Built-in rules (when `builtin`) followed by `extra`, in that order of precedence on ties.
    pub fn new(
        builtin: bool,
        extra: &[RawClassRule],
        default_task: TaskType,
    ) -> Result<Classifier, (String, String)> {
        let mut rules = Vec::new();
        if builtin {
            for (task, re, weight) in BUILTIN_RULES {
                let regex = Regex::new(re)
                    .map_err(|e| ("routing.classification".to_string(), e.to_string()))?;
                rules.push(ClassRule {
                    task: task
                        .parse()
                        .map_err(|e| ("routing.classification".into(), e))?,
                    keywords: vec![],
                    regex: vec![regex],
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
            let regex = r
                .regex
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    Regex::new(s).map_err(|e| (format!("{key}.regex[{j}]"), e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            rules.push(ClassRule {
                task: r.task.clone(),
                keywords: r.keywords.iter().map(|k| k.to_lowercase()).collect(),
                regex,
                weight: r.weight,
            });
        }
        let mut patterns = Vec::new();
        let mut set_rule = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            for re in &r.regex {
                patterns.push(re.as_str().to_string());
                set_rule.push(i);
            }
        }
        let set = RegexSet::new(&patterns)
            .map_err(|e| ("routing.classification".to_string(), e.to_string()))?;
        let has_keywords = rules.iter().any(|r| !r.keywords.is_empty());
        Ok(Classifier {
            rules,
            default_task,
            set,
            set_rule,
            has_keywords,
        })
    }

    /// Task types the rules can produce (custom ones become nameable by policies).
    pub fn known_tasks(&self) -> impl Iterator<Item = &TaskType> {
        self.rules
            .iter()
            .map(|r| &r.task)
            .chain([&self.default_task])
    }

    pub fn classify(&self, prompt: &str, hint: Option<&TaskType>) -> Classification {
        let lower = prompt.to_lowercase();
        let (complexity, complexity_score, mut evidence) = complexity_of(prompt, &lower);
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
        // One pass over the prompt finds which rules' regexes match.
        let mut hit_rules = vec![false; self.rules.len()];
        for m in self.set.matches(prompt).iter() {
            hit_rules[self.set_rule[m]] = true;
        }
        // (task, score, first rule index) in first-seen order
        let mut scores: Vec<(TaskType, f32, usize)> = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let keyword = if self.has_keywords {
                r.keywords.iter().find(|k| lower.contains(k.as_str()))
            } else {
                None
            };
            let hit = match keyword {
                Some(k) => Some(format!("keyword '{k}'")),
                None if hit_rules[i] => r.regex.iter().find_map(|re| {
                    re.find(prompt)
                        .map(|m| format!("'{}'", truncate(m.as_str(), 40)))
                }),
                None => None,
            };
            if let Some(what) = hit {
                evidence.push(format!("{what} -> {} +{}", r.task, r.weight));
                match scores.iter_mut().find(|(t, _, _)| *t == r.task) {
                    Some(s) => s.1 += r.weight,
                    None => scores.push((r.task.clone(), r.weight, i)),
                }
            }
        }
        let best = scores
            .iter()
            .fold(None::<&(TaskType, f32, usize)>, |best, s| match best {
                Some(b) if b.1 >= s.1 => Some(b),
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
/// several questions, constraints), capped at 1. Low below 0.25, High from 0.6.
pub fn estimate_complexity(prompt: &str) -> (Complexity, f32, Vec<String>) {
    complexity_of(prompt, &prompt.to_lowercase())
}

/// The phrases the complexity markers look for (in the lower-cased prompt).
const MARKER_PHRASES: [&str; 9] = [
    "step by step",
    "step-by-step",
    "prove",
    "derive",
    "must ",
    "should not",
    "at least",
    "no more than",
    "without using",
];

fn complexity_of(prompt: &str, lower: &str) -> (Complexity, f32, Vec<String>) {
    // Words: runs of bytes above the space character (ASCII whitespace and control characters
    // separate them; UTF-8 multi-byte characters count as word bytes). Vectorizes.
    let b = prompt.as_bytes();
    let words = b
        .iter()
        .zip(b.iter().skip(1))
        .filter(|(p, c)| **p <= b' ' && **c > b' ')
        .count()
        + usize::from(b.first().is_some_and(|c| *c > b' '));
    let mut score = (words as f32 / 400.0).min(0.6);
    let mut evidence = vec![format!("{words} words")];
    let questions = b.iter().filter(|c| **c == b'?').count();
    let numbered = prompt
        .split('\n')
        .filter(|l| {
            let t = l.trim_start().as_bytes();
            t.len() > 2 && t[0].is_ascii_digit() && (t[1] == b'.' || t[1] == b')')
        })
        .count();
    let seen = MARKER_PHRASES.map(|p| lower.contains(p));
    let markers: [(&str, bool); 6] = [
        ("asks for steps", seen[0] || seen[1]),
        ("asks for a proof or derivation", seen[2] || seen[3]),
        ("contains code", prompt.contains("```")),
        ("numbered list", numbered >= 2),
        ("several questions", questions >= 2),
        ("constraints", seen[4..].iter().filter(|s| **s).count() >= 2),
    ];
    for (name, hit) in markers {
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
