//! Scoped policies: `[[routing.attachments]]` attach policies and guardrail changes to teams, API
//! key aliases and requested models, by wildcard pattern.
//!
//! How several matching attachments combine (the rule is: the more specific attachment is applied
//! later, and later wins):
//!
//! 1. Policies referenced by no attachment are *global*; a policy referenced by an attachment
//!    applies only where one of its attachments matches.
//! 2. The attachments that match a request are ordered from broadest to most specific:
//!    fewer scope keys (`team`, `key_alias`, `model`) is broader; with as many keys, fewer literal
//!    (non-wildcard) characters in the patterns is broader; then by `id`.
//! 3. Starting from the global policies and the global `[routing.guardrails]`, each attachment in
//!    that order: with `inherit = false`, first drops everything accumulated so far (global and
//!    broader attachments' policies and guardrails); then adds its policies; then applies its
//!    guardrail `remove` list, then its `add` table.
//!
//! So a more specific `remove` always beats a broader `add` (it is applied after it), a more
//! specific `add` always beats a broader `remove`, and an attachment's own `add` beats its own
//! `remove` of the same guardrail. The resulting policies are evaluated in the usual order
//! (priority, then id); `corral route --explain` lists the attachments in application order.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::rules::{wildcard, RequestContext};
use crate::guardrails::GuardrailAction;

/// The guardrails attachments can add or remove.
pub const GUARDRAILS: [&str; 2] = ["pii", "prompt_injection"];

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    pub team: Option<String>,
    pub key_alias: Option<String>,
    /// The model the request asked for (the API's `model` field, `--model`).
    pub model: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailChanges {
    /// Guardrail name -> action (`pii`: block, mask or log; `prompt_injection`: block or log).
    #[serde(default)]
    pub add: BTreeMap<String, GuardrailAction>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `[[routing.attachments]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAttachment {
    pub id: String,
    pub scope: Scope,
    /// Policy ids from `[[routing.policies]]`.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Keep what broader levels (global, broader attachments) set (default true).
    #[serde(default = "yes")]
    pub inherit: bool,
    #[serde(default)]
    pub guardrails: GuardrailChanges,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone)]
pub struct Attachment {
    pub id: String,
    scope: Scope,
    /// Indices into the router's rules.
    policies: Vec<usize>,
    inherit: bool,
    add: BTreeMap<String, GuardrailAction>,
    remove: Vec<String>,
    specificity: (usize, usize),
}

/// What applies to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Indices of the rules that apply, in evaluation order.
    pub rules: Vec<usize>,
    /// Guardrail name -> action.
    pub guardrails: BTreeMap<String, GuardrailAction>,
    /// Trace: each matching attachment in application order and what it changed.
    pub trace: Vec<String>,
}

fn literal_chars(p: &Option<String>) -> usize {
    p.as_deref()
        .map_or(0, |p| p.chars().filter(|c| *c != '*' && *c != '?').count())
}

impl Attachment {
    /// Validates `raw` at `key`; `rule_index` maps policy ids to rule indices.
    pub fn compile(
        raw: &RawAttachment,
        key: &str,
        rule_index: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<Attachment, (String, String)> {
        let s = &raw.scope;
        if s.team.is_none() && s.key_alias.is_none() && s.model.is_none() {
            return Err((
                format!("{key}.scope"),
                "needs team, key_alias or model (global policies need no attachment)".into(),
            ));
        }
        for (k, p) in [
            ("team", &s.team),
            ("key_alias", &s.key_alias),
            ("model", &s.model),
        ] {
            if p.as_deref() == Some("") {
                return Err((format!("{key}.scope.{k}"), "an empty pattern".into()));
            }
        }
        let mut policies = Vec::new();
        for (i, p) in raw.policies.iter().enumerate() {
            match rule_index(p) {
                Some(ix) => policies.push(ix),
                None => {
                    return Err((
                        format!("{key}.policies[{i}]"),
                        format!("no policy with id '{p}'"),
                    ))
                }
            }
        }
        for (name, action) in &raw.guardrails.add {
            if !GUARDRAILS.contains(&name.as_str()) {
                return Err((
                    format!("{key}.guardrails.add.{name}"),
                    format!("unknown guardrail (known: {})", GUARDRAILS.join(", ")),
                ));
            }
            if name == "prompt_injection" && *action == GuardrailAction::Mask {
                return Err((
                    format!("{key}.guardrails.add.{name}"),
                    "an injection cannot be masked: use block or log".into(),
                ));
            }
        }
        for (i, name) in raw.guardrails.remove.iter().enumerate() {
            if !GUARDRAILS.contains(&name.as_str()) {
                return Err((
                    format!("{key}.guardrails.remove[{i}]"),
                    format!("unknown guardrail (known: {})", GUARDRAILS.join(", ")),
                ));
            }
        }
        let keys = [&s.team, &s.key_alias, &s.model]
            .iter()
            .filter(|p| p.is_some())
            .count();
        let literals =
            literal_chars(&s.team) + literal_chars(&s.key_alias) + literal_chars(&s.model);
        Ok(Attachment {
            id: raw.id.clone(),
            scope: s.clone(),
            policies,
            inherit: raw.inherit,
            add: raw.guardrails.add.clone(),
            remove: raw.guardrails.remove.clone(),
            specificity: (keys, literals),
        })
    }

    /// `resolved_model`: what the requested model stands for (an alias's target, `PROVIDER/MODEL`
    /// for a remote one); a model scope matches the name as sent or that.
    fn matches(&self, req: &RequestContext, resolved_model: Option<&str>) -> bool {
        let m = |p: &Option<String>, v: &Option<String>| match (p, v) {
            (None, _) => true,
            (Some(p), Some(v)) => wildcard(p, v),
            (Some(_), None) => false,
        };
        m(&self.scope.team, &req.team)
            && m(&self.scope.key_alias, &req.key_alias)
            && (m(&self.scope.model, &req.requested_model)
                || matches!((&self.scope.model, resolved_model), (Some(p), Some(r)) if wildcard(p, r)))
    }
}

/// Orders attachments broadest first (the order they are applied in).
pub fn sort(attachments: &mut [Attachment]) {
    attachments.sort_by(|a, b| {
        a.specificity
            .cmp(&b.specificity)
            .then_with(|| a.id.cmp(&b.id))
    });
}

/// The policies (as indices into the router's rules, which are stored in evaluation order, so
/// ascending indices are the order to evaluate them in) and guardrails that apply to `req`.
pub fn resolve(
    attachments: &[Attachment],
    global_rules: &[usize],
    global_guardrails: &BTreeMap<String, GuardrailAction>,
    req: &RequestContext,
    resolved_model: Option<&str>,
) -> Resolved {
    let mut rules: BTreeSet<usize> = global_rules.iter().copied().collect();
    let mut guardrails = global_guardrails.clone();
    let mut trace = Vec::new();
    for a in attachments
        .iter()
        .filter(|a| a.matches(req, resolved_model))
    {
        let mut what = Vec::new();
        if !a.inherit {
            rules.clear();
            guardrails.clear();
            what.push("inherit=false: dropped broader policies and guardrails".to_string());
        }
        rules.extend(a.policies.iter().copied());
        if !a.policies.is_empty() {
            what.push(format!("+{} policies", a.policies.len()));
        }
        for g in &a.remove {
            if guardrails.remove(g).is_some() {
                what.push(format!("-{g}"));
            }
        }
        for (g, act) in &a.add {
            guardrails.insert(g.clone(), *act);
            what.push(format!("+{g}={}", act.name()));
        }
        trace.push(format!(
            "attachment {} applies{}",
            a.id,
            if what.is_empty() {
                String::new()
            } else {
                format!(": {}", what.join(", "))
            }
        ));
    }
    let rules: Vec<usize> = rules.into_iter().collect(); // a BTreeSet: ascending
    Resolved {
        rules,
        guardrails,
        trace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(
        id: &str,
        scope: Scope,
        policies: &[usize],
        inherit: bool,
        add: &[(&str, GuardrailAction)],
        remove: &[&str],
    ) -> Attachment {
        let raw = RawAttachment {
            id: id.into(),
            scope,
            policies: policies.iter().map(|p| format!("p{p}")).collect(),
            inherit,
            guardrails: GuardrailChanges {
                add: add.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                remove: remove.iter().map(|s| s.to_string()).collect(),
            },
        };
        Attachment::compile(&raw, "k", &|p| {
            p.strip_prefix('p').and_then(|n| n.parse().ok())
        })
        .unwrap()
    }

    fn team(p: &str) -> Scope {
        Scope {
            team: Some(p.into()),
            ..Default::default()
        }
    }

    fn req(team: &str, key: Option<&str>) -> RequestContext {
        RequestContext {
            team: Some(team.into()),
            key_alias: key.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn a_specific_remove_beats_a_broad_add_and_vice_versa() {
        use GuardrailAction::*;
        let mut a = vec![
            // broad: every research team gets PII blocking
            att(
                "broad",
                team("research-*"),
                &[1],
                true,
                &[("pii", Block)],
                &[],
            ),
            // specific: the red team removes it again
            att("red", team("research-red"), &[], true, &[], &["pii"]),
            // more specific still: red team with one key adds a PII log back
            att(
                "red-key",
                Scope {
                    team: Some("research-red".into()),
                    key_alias: Some("audit".into()),
                    model: None,
                },
                &[2],
                true,
                &[("pii", Log)],
                &[],
            ),
        ];
        sort(&mut a);
        assert_eq!(
            a.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["broad", "red", "red-key"]
        );
        let global: BTreeMap<String, GuardrailAction> =
            [("prompt_injection".to_string(), Block)].into();
        let r = resolve(&a, &[0], &global, &req("research-blue", None), None);
        assert_eq!(r.rules, vec![0, 1]);
        assert_eq!(r.guardrails.get("pii"), Some(&Block));
        let r = resolve(&a, &[0], &global, &req("research-red", None), None);
        assert_eq!(
            r.guardrails.get("pii"),
            None,
            "the specific remove wins: {:?}",
            r.trace
        );
        assert_eq!(r.guardrails.get("prompt_injection"), Some(&Block));
        let r = resolve(&a, &[0], &global, &req("research-red", Some("audit")), None);
        assert_eq!(r.guardrails.get("pii"), Some(&Log));
        assert_eq!(r.rules, vec![0, 1, 2]);
        let r = resolve(&a, &[0], &global, &req("sales", None), None);
        assert_eq!((r.rules, r.trace.len()), (vec![0], 0));
    }

    #[test]
    fn inherit_false_drops_broader_levels() {
        use GuardrailAction::*;
        let mut a = vec![
            att("broad", team("*"), &[1], true, &[("pii", Mask)], &[]),
            att("iso", team("isolated"), &[2], false, &[], &[]),
        ];
        sort(&mut a);
        let global: BTreeMap<String, GuardrailAction> =
            [("prompt_injection".to_string(), Block)].into();
        let r = resolve(&a, &[0], &global, &req("isolated", None), None);
        assert_eq!(r.rules, vec![2]);
        assert!(r.guardrails.is_empty());
        assert!(r.trace[1].contains("inherit=false"));
    }

    #[test]
    fn bad_attachments_are_errors() {
        let raw = RawAttachment {
            id: "x".into(),
            scope: Scope::default(),
            policies: vec![],
            inherit: true,
            guardrails: GuardrailChanges::default(),
        };
        assert_eq!(
            Attachment::compile(&raw, "k", &|_| None).unwrap_err().0,
            "k.scope"
        );
        let raw = RawAttachment {
            scope: team("t"),
            policies: vec!["ghost".into()],
            ..raw
        };
        assert_eq!(
            Attachment::compile(&raw, "k", &|_| None).unwrap_err().0,
            "k.policies[0]"
        );
        let raw = RawAttachment {
            policies: vec![],
            guardrails: GuardrailChanges {
                add: BTreeMap::new(),
                remove: vec!["toxicity".into()],
            },
            ..raw
        };
        assert_eq!(
            Attachment::compile(&raw, "k", &|_| None).unwrap_err().0,
            "k.guardrails.remove[0]"
        );
    }
}
