//! Policy rules: conditions on a request and the action taken when they all hold.
//!
//! Rules are evaluated from the highest `priority` down; among equal priorities, by `id` in
//! byte order (ids are unique, so the order is total and does not depend on the file's layout).
//! The first rule whose `task_types` and every condition hold decides; none holding means
//! `routing.default_action`. A condition that is absent does not constrain; an unknown condition
//! key, an empty list, an inverted range or an empty time window is a configuration error, never
//! silently true.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::task::{Classification, Complexity, TaskType};
use crate::catalog::Capability;

/// `[[routing.policies]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub id: String,
    #[serde(default)]
    pub description: String,
    /// The rule applies only to these task types (empty: to every task).
    #[serde(default)]
    pub task_types: Vec<TaskType>,
    #[serde(default)]
    pub conditions: RawConditions,
    pub action: Action,
    #[serde(default)]
    pub priority: i32,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConditions {
    /// The classified task type equals this.
    pub task_type: Option<TaskType>,
    /// The complexity level is one of these.
    pub complexity: Option<Vec<Complexity>>,
    /// The prompt's length in characters lies in this range (bounds inclusive).
    pub content_length: Option<LengthRange>,
    /// The request requires all of these model capabilities.
    pub capabilities: Option<Vec<Capability>>,
    /// UTC time of day within `start`..`end` ("HH:MM"; `start > end` wraps past midnight).
    pub time_of_day: Option<TimeWindow>,
    /// The calling agent's id matches this pattern (`*` any run, `?` one character).
    pub agent: Option<String>,
    /// The caller's team matches this pattern.
    pub team: Option<String>,
    /// The caller's API key alias matches this pattern.
    pub key_alias: Option<String>,
    /// Each request metadata key is present with a value matching the pattern.
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LengthRange {
    #[serde(default)]
    pub min: Option<usize>,
    #[serde(default)]
    pub max: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    pub start: String,
    pub end: String,
}

/// How `corral serve` streams an SLM answer that may still be escalated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Streaming {
    /// Hold the answer until its confidence is known, then send it (or the escalated one): the
    /// client never sees an answer that is replaced, at the cost of time to first byte.
    Buffer,
    /// Send tokens as they come; a low score can then no longer escalate (the answer is
    /// delivered), and the final chunk says `below_threshold`.
    Stream,
    /// Hold the first `routing.llm_fallback.stream_window_tokens` tokens: an answer decided
    /// low within them (`decide_early`, `early_floor`) is replaced by the remote one without
    /// the client seeing any of it; one that gets past them streams from there on and can no
    /// longer be replaced. One continuous stream from whichever model answers.
    Window,
}

/// What a rule (or the default) decides.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Answer with a local SLM; escalate when its confidence is below `min_confidence` (default:
    /// the task's threshold from `routing.confidence_thresholds`).
    PreferSlm {
        #[serde(default)]
        min_confidence: Option<f32>,
        /// Catalog model id (default: `routing.slm_preferences.model`).
        #[serde(default)]
        model: Option<String>,
        /// Sandbox profile (default: the model's, else `slm.default_sandbox_profile`).
        #[serde(default)]
        profile: Option<String>,
        /// How a streamed answer meets escalation (default: `buffer` when the answer may be
        /// escalated, else `stream`; see docs/serving.md).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        streaming: Option<Streaming>,
        /// For a JSON answer (`response_format`): the confidence each named top-level field
        /// needs (its value's tokens, forced ones left out); a field below it, or missing,
        /// escalates like a low answer.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        field_thresholds: BTreeMap<String, f32>,
    },
    /// Skip the SLM and send the request to the remote chain.
    RequireLlm {
        reason: String,
        /// Provider names (default: `routing.llm_fallback.providers`).
        #[serde(default)]
        providers: Option<Vec<String>>,
    },
    /// Refuse the request.
    Deny { reason: String },
    /// Ask a WebAssembly module (see `wasm.rs`).
    Wasm(super::wasm::WasmAction),
}

/// Everything about a request that rules may look at.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub prompt: String,
    pub task_hint: Option<TaskType>,
    pub agent: Option<String>,
    pub team: Option<String>,
    pub key_alias: Option<String>,
    /// The model the request asked for (the API's `model`, `--model`), for attachments.
    pub requested_model: Option<String>,
    /// The sandbox profile the caller asked for (`corral run --profile`): it replaces the one an
    /// SLM selection would get.
    pub requested_profile: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub required_capabilities: Vec<Capability>,
    /// Minutes since UTC midnight (the clock, unless a test sets it).
    pub minute_of_day: Option<u32>,
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub description: String,
    pub priority: i32,
    pub task_types: Vec<TaskType>,
    task_type: Option<TaskType>,
    complexity: Option<Vec<Complexity>>,
    content_length: Option<(usize, usize)>,
    capabilities: Option<Vec<Capability>>,
    time_of_day: Option<(u32, u32)>,
    agent: Option<Wildcard>,
    team: Option<Wildcard>,
    key_alias: Option<Wildcard>,
    metadata: Vec<(String, Wildcard)>,
    pub action: Action,
    /// The compiled module of a `wasm` action.
    pub wasm: Option<super::wasm::Handle>,
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

impl Rule {
    /// Validates `raw` (found at `key`); `known_task` says whether a task type can occur.
    pub fn compile(
        raw: &RawRule,
        key: &str,
        known_task: &dyn Fn(&TaskType) -> bool,
    ) -> Result<Rule, (String, String)> {
        let err = |k: &str, m: String| Err((format!("{key}.{k}"), m));
        if raw.id.trim().is_empty() {
            return err("id", "must not be empty".into());
        }
        for (i, t) in raw.task_types.iter().enumerate() {
            if !known_task(t) {
                return err(
                    &format!("task_types[{i}]"),
                    format!("unknown task type '{t}' (declare custom types in routing.classification.rules)"),
                );
            }
        }
        let c = &raw.conditions;
        if let Some(t) = &c.task_type {
            if !known_task(t) {
                return err("conditions.task_type", format!("unknown task type '{t}'"));
            }
            if !raw.task_types.is_empty() && !raw.task_types.contains(t) {
                return err(
                    "conditions.task_type",
                    format!("'{t}' is not among the rule's task_types: the rule could never match"),
                );
            }
        }
        if c.complexity.as_ref().is_some_and(Vec::is_empty) {
            return err(
                "conditions.complexity",
                "an empty list never matches".into(),
            );
        }
        if c.capabilities.as_ref().is_some_and(Vec::is_empty) {
            return err("conditions.capabilities", "an empty list: remove it".into());
        }
        let content_length = match c.content_length {
            None => None,
            Some(LengthRange { min, max }) => {
                let (lo, hi) = (min.unwrap_or(0), max.unwrap_or(usize::MAX));
                if min.is_none() && max.is_none() {
                    return err("conditions.content_length", "needs min or max".into());
                }
                if lo > hi {
                    return err(
                        "conditions.content_length",
                        format!("min {lo} is greater than max {hi}"),
                    );
                }
                Some((lo, hi))
            }
        };
        let time_of_day = match &c.time_of_day {
            None => None,
            Some(w) => {
                let (Some(s), Some(e)) = (parse_hhmm(&w.start), parse_hhmm(&w.end)) else {
                    return err(
                        "conditions.time_of_day",
                        "start and end are \"HH:MM\" (UTC)".into(),
                    );
                };
                if s == e {
                    return err(
                        "conditions.time_of_day",
                        "start equals end: an empty window".into(),
                    );
                }
                Some((s, e))
            }
        };
        for (k, p) in [
            ("agent", &c.agent),
            ("team", &c.team),
            ("key_alias", &c.key_alias),
        ] {
            if p.as_ref().is_some_and(|p| p.is_empty()) {
                return err(
                    &format!("conditions.{k}"),
                    "an empty pattern; use \"*\" for any".into(),
                );
            }
        }
        match &raw.action {
            Action::PreferSlm {
                min_confidence: Some(m),
                ..
            } if !(0.0..=1.0).contains(m) => {
                return err("action.min_confidence", "must be within 0..=1".into());
            }
            Action::PreferSlm {
                field_thresholds, ..
            } if field_thresholds.values().any(|t| !(0.0..=1.0).contains(t)) => {
                return err(
                    "action.field_thresholds",
                    "each threshold must be within 0..=1".into(),
                );
            }
            Action::RequireLlm { reason, .. } | Action::Deny { reason }
                if reason.trim().is_empty() =>
            {
                return err("action.reason", "must say why".into());
            }
            _ => {}
        }
        Ok(Rule {
            id: raw.id.clone(),
            description: raw.description.clone(),
            priority: raw.priority,
            task_types: raw.task_types.clone(),
            task_type: c.task_type.clone(),
            complexity: c.complexity.clone(),
            content_length,
            capabilities: c.capabilities.clone(),
            time_of_day,
            agent: c.agent.as_deref().map(Wildcard::new),
            team: c.team.as_deref().map(Wildcard::new),
            key_alias: c.key_alias.as_deref().map(Wildcard::new),
            metadata: c
                .metadata
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), Wildcard::new(v)))
                .collect(),
            action: raw.action.clone(),
            wasm: None,
        })
    }

    /// `Ok(())` when the rule applies, else the first reason it does not (formatted only when
    /// displayed: the hot path allocates nothing). `prompt_chars` is the prompt's length in
    /// characters, counted once per request.
    pub fn check<'a>(
        &'a self,
        req: &'a RequestContext,
        class: &'a Classification,
        prompt_chars: usize,
    ) -> Result<(), Skip<'a>> {
        if !self.task_types.is_empty() && !self.task_types.contains(&class.task) {
            return Err(Skip::TaskNotIn(&class.task, &self.task_types));
        }
        if let Some(t) = &self.task_type {
            if *t != class.task {
                return Err(Skip::TaskNot(&class.task, t));
            }
        }
        if let Some(levels) = &self.complexity {
            if !levels.contains(&class.complexity) {
                return Err(Skip::Complexity(class.complexity, levels));
            }
        }
        if let Some((lo, hi)) = self.content_length {
            if prompt_chars < lo || prompt_chars > hi {
                return Err(Skip::Length(prompt_chars, lo, hi));
            }
        }
        if let Some(caps) = &self.capabilities {
            if let Some(c) = caps.iter().find(|c| !req.required_capabilities.contains(c)) {
                return Err(Skip::Capability(*c));
            }
        }
        if let Some((s, e)) = self.time_of_day {
            let now = req.minute_of_day.unwrap_or_else(minute_of_day_utc);
            let inside = if s < e {
                now >= s && now < e
            } else {
                now >= s || now < e
            };
            if !inside {
                return Err(Skip::Time(now));
            }
        }
        for (name, pat, val) in [
            ("agent", &self.agent, &req.agent),
            ("team", &self.team, &req.team),
            ("key alias", &self.key_alias, &req.key_alias),
        ] {
            if let Some(p) = pat {
                match val {
                    Some(v) if p.matches(v) => {}
                    Some(v) => return Err(Skip::NoMatch(name, v, p.as_str())),
                    None => return Err(Skip::Missing(name)),
                }
            }
        }
        for (k, p) in &self.metadata {
            match req.metadata.get(k) {
                Some(v) if p.matches(v) => {}
                Some(v) => return Err(Skip::MetadataNoMatch(k, v, p.as_str())),
                None => return Err(Skip::MetadataMissing(k)),
            }
        }
        Ok(())
    }
}

/// Why a rule did not apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip<'a> {
    TaskNotIn(&'a TaskType, &'a [TaskType]),
    TaskNot(&'a TaskType, &'a TaskType),
    Complexity(Complexity, &'a [Complexity]),
    Length(usize, usize, usize),
    Capability(Capability),
    Time(u32),
    NoMatch(&'static str, &'a str, &'a str),
    Missing(&'static str),
    MetadataNoMatch(&'a str, &'a str, &'a str),
    MetadataMissing(&'a str),
}

impl std::fmt::Display for Skip<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::TaskNotIn(t, ts) => write!(f, "task {t} not in {:?}", names(ts)),
            Skip::TaskNot(t, want) => write!(f, "task {t} != {want}"),
            Skip::Complexity(c, levels) => write!(f, "complexity {c:?} not in {levels:?}"),
            Skip::Length(n, lo, hi) => write!(f, "length {n} outside {lo}..={hi}"),
            Skip::Capability(c) => write!(f, "request does not require {c:?}"),
            Skip::Time(now) => write!(
                f,
                "time {:02}:{:02} UTC outside the window",
                now / 60,
                now % 60
            ),
            Skip::NoMatch(name, v, p) => write!(f, "{name} '{v}' does not match '{p}'"),
            Skip::Missing(name) => write!(f, "no {name}"),
            Skip::MetadataNoMatch(k, v, p) => write!(f, "metadata {k}='{v}' does not match '{p}'"),
            Skip::MetadataMissing(k) => write!(f, "no metadata {k}"),
        }
    }
}

fn names(ts: &[TaskType]) -> Vec<&str> {
    ts.iter().map(TaskType::as_str).collect()
}

/// Minutes since midnight, UTC, from the system clock.
pub fn minute_of_day_utc() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    ((secs % 86_400) / 60) as u32
}

/// A wildcard pattern sorted at compile time into the cheapest test that decides it: most
/// patterns in practice are a literal, `prefix*`, `*suffix` or `*`, each a single comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wildcard {
    pattern: String,
    shape: Shape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Any,
    Exact,
    /// `literal*`
    Prefix,
    /// `*literal`
    Suffix,
    /// Anything else: the general matcher.
    Glob,
}

impl Wildcard {
    pub fn new(pattern: &str) -> Wildcard {
        let wild = |c: char| c == '*' || c == '?';
        let inner = |s: &str| !s.contains(wild);
        let shape = if !pattern.is_empty() && pattern.chars().all(|c| c == '*') {
            Shape::Any
        } else if inner(pattern) {
            Shape::Exact
        } else if pattern.strip_suffix('*').is_some_and(inner) {
            Shape::Prefix
        } else if pattern.strip_prefix('*').is_some_and(inner) {
            Shape::Suffix
        } else {
            Shape::Glob
        };
        Wildcard {
            pattern: pattern.to_string(),
            shape,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether `text` matches, exactly as [`wildcard`] decides.
    pub fn matches(&self, text: &str) -> bool {
        let p = &self.pattern;
        match self.shape {
            Shape::Any => true,
            Shape::Exact => p == text,
            Shape::Prefix => text.starts_with(&p[..p.len() - 1]),
            Shape::Suffix => text.ends_with(&p[1..]),
            Shape::Glob => wildcard(p, text),
        }
    }
}

/// Glob match: `*` matches any run of characters (including none), `?` exactly one.
pub fn wildcard(pattern: &str, text: &str) -> bool {
    if pattern.is_ascii() && text.is_ascii() {
        glob(pattern.as_bytes(), text.as_bytes())
    } else {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        glob(&p, &t)
    }
}

/// Iterative glob with backtracking to the last `*` (linear in practice, no recursion).
fn glob<T: PartialEq + Copy + IsWild>(p: &[T], t: &[T]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi].is_one() || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi].is_any() {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| c.is_any())
}

trait IsWild {
    fn is_any(&self) -> bool;
    fn is_one(&self) -> bool;
}

impl IsWild for u8 {
    fn is_any(&self) -> bool {
        *self == b'*'
    }
    fn is_one(&self) -> bool {
        *self == b'?'
    }
}

impl IsWild for char {
    fn is_any(&self) -> bool {
        *self == '*'
    }
    fn is_one(&self) -> bool {
        *self == '?'
    }
}

/// Sorts rules into evaluation order: priority descending, then id ascending.
pub fn sort(rules: &mut [Rule]) {
    rules.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wildcards() {
        assert!(wildcard("ci-*", "ci-build"));
        assert!(wildcard("*", ""));
        assert!(wildcard("a?c", "abc"));
        assert!(!wildcard("a?c", "ac"));
        assert!(wildcard("*-prod-*", "eu-prod-7"));
        assert!(!wildcard("ci-*", "cd-build"));
        assert!(wildcard("exact", "exact") && !wildcard("exact", "exact2"));
    }

    proptest! {
        #[test]
        fn star_matches_everything_and_literals_match_themselves(s in "[a-z0-9_-]{0,20}") {
            prop_assert!(wildcard("*", &s));
            prop_assert!(wildcard(&s, &s));
            let pat = format!("{s}*");
            let txt = format!("{s}tail");
            prop_assert!(wildcard(&pat, &txt));
        }

        #[test]
        fn compiled_wildcards_decide_as_the_general_matcher(
            p in "[ab*?]{0,6}", t in "[ab]{0,6}"
        ) {
            prop_assert_eq!(Wildcard::new(&p).matches(&t), wildcard(&p, &t), "{} {}", p, t);
        }

        #[test]
        fn evaluation_order_is_priority_then_id(prios in proptest::collection::vec(-5i32..5, 1..12)) {
            let raw: Vec<RawRule> = prios.iter().enumerate().map(|(i, p)| RawRule {
                id: format!("r{:02}", (i * 7) % 13),
                description: String::new(),
                task_types: vec![],
                conditions: RawConditions::default(),
                action: Action::Deny { reason: "x".into() },
                priority: *p,
            }).collect();
            let mut rules: Vec<Rule> = raw.iter().map(|r| Rule::compile(r, "k", &|_| true).unwrap()).collect();
            sort(&mut rules);
            for w in rules.windows(2) {
                prop_assert!(w[0].priority > w[1].priority
                    || (w[0].priority == w[1].priority && w[0].id <= w[1].id));
            }
        }
    }

    fn raw(conditions: RawConditions) -> RawRule {
        RawRule {
            id: "r".into(),
            description: String::new(),
            task_types: vec![],
            conditions,
            action: Action::Deny {
                reason: "no".into(),
            },
            priority: 0,
        }
    }

    #[test]
    fn contradictory_conditions_are_errors() {
        let any = |_: &TaskType| true;
        let e = Rule::compile(
            &raw(RawConditions {
                content_length: Some(LengthRange {
                    min: Some(10),
                    max: Some(5),
                }),
                ..Default::default()
            }),
            "routing.policies[0]",
            &any,
        )
        .unwrap_err();
        assert_eq!(e.0, "routing.policies[0].conditions.content_length");
        let e = Rule::compile(
            &raw(RawConditions {
                time_of_day: Some(TimeWindow {
                    start: "25:00".into(),
                    end: "01:00".into(),
                }),
                ..Default::default()
            }),
            "p",
            &any,
        )
        .unwrap_err();
        assert!(e.1.contains("HH:MM"));
        let mut r = raw(RawConditions {
            task_type: Some(TaskType::QA),
            ..Default::default()
        });
        r.task_types = vec![TaskType::Translation];
        assert!(Rule::compile(&r, "p", &any)
            .unwrap_err()
            .1
            .contains("never match"));
        let r = raw(RawConditions {
            task_type: Some(TaskType::Custom("legal".into())),
            ..Default::default()
        });
        assert!(Rule::compile(&r, "p", &|t| t.is_builtin()).is_err());
    }

    #[test]
    fn conditions_are_all_required() {
        let r = Rule::compile(
            &raw(RawConditions {
                agent: Some("ci-*".into()),
                metadata: Some([("tenant".to_string(), "acme*".to_string())].into()),
                time_of_day: Some(TimeWindow {
                    start: "22:00".into(),
                    end: "06:00".into(),
                }),
                ..Default::default()
            }),
            "p",
            &|_| true,
        )
        .unwrap();
        let class = super::super::task::Classifier::new(true, &[], TaskType::QA)
            .unwrap()
            .classify("hi", None);
        let mut req = RequestContext {
            prompt: "hi".into(),
            agent: Some("ci-7".into()),
            metadata: [("tenant".to_string(), "acme-eu".to_string())].into(),
            minute_of_day: Some(23 * 60),
            ..Default::default()
        };
        let why = |req: &RequestContext| r.check(req, &class, 2).map_err(|s| s.to_string());
        assert_eq!(why(&req), Ok(()));
        req.minute_of_day = Some(12 * 60);
        assert!(why(&req).unwrap_err().contains("outside the window"));
        req.minute_of_day = Some(5 * 60);
        req.agent = Some("web".into());
        assert!(why(&req).unwrap_err().contains("does not match"));
        req.agent = None;
        assert_eq!(why(&req), Err("no agent".into()));
        assert!(wildcard("é?x*", "éax-ü") && !wildcard("é?x", "éx"));
    }
}
