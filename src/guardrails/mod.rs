//! Guardrails: finding personal data, secrets and prompt injections in text, shared by the
//! routing policy (which blocks, masks or logs a request) and the encrypted audit log (which
//! redacts what it stores).
//!
//! How the files relate:
//! - `pii.rs`: [`PiiKind`], [`PiiDetector`] (one regex per kind behind a cheap prefilter,
//!   overlap resolution) and masking with `[LABEL]` placeholders.
//! - `numbers.rs`: the numeric kinds for `pii.rs`: card numbers (Luhn-checked), SSNs (never-issued
//!   ranges excluded) and phone numbers, searched only in regions of the text dense with digits.
//! - `json.rs`: [`redact_json`], which replaces values under sensitive keys with `[REDACTED]` and
//!   masks PII in every other string, for audit records.
//! - `injection.rs`: [`InjectionDetector`], a weighted set of phrase signals combined into a score
//!   in [0, 1].
//!
//! Everything here is built once (all patterns compile in the constructors) and is `Send + Sync`,
//! so one instance serves every request. `docs/guardrails.md` describes what each detector matches
//! and what it misses.

mod injection;
mod json;
mod numbers;
mod pii;

use std::fmt;
use std::str::FromStr;

use regex::Regex;
use serde::{Deserialize, Serialize};

pub use injection::{InjectionDetector, InjectionVerdict, Signal, SIGNALS};
pub use json::{
    default_sensitive_keys, redact_json, redact_json_with, SensitiveKeys, DEFAULT_SENSITIVE_KEYS,
    REDACTED,
};
pub use pii::{Finding, PiiDetector, PiiKind};

/// Errors from parsing guardrail settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardrailError {
    #[error(
        "unknown PII kind `{value}`: expected one of email, phone, card_number, ssn, api_key, \
         jwt, private_key"
    )]
    UnknownPiiKind { value: String },
    #[error("unknown guardrail action `{value}`: expected block, mask or log")]
    UnknownAction { value: String },
}

pub type Result<T, E = GuardrailError> = std::result::Result<T, E>;

/// What a policy does when a guardrail fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardrailAction {
    /// Refuse the request.
    Block,
    /// Replace what was found (PII masking) and let the request through.
    Mask,
    /// Let the request through unchanged and record what was found.
    Log,
}

impl GuardrailAction {
    /// The name used in configuration (`block`, `mask`, `log`).
    pub fn name(self) -> &'static str {
        match self {
            GuardrailAction::Block => "block",
            GuardrailAction::Mask => "mask",
            GuardrailAction::Log => "log",
        }
    }
}

impl fmt::Display for GuardrailAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GuardrailAction {
    type Err = GuardrailError;

    /// Parses `block`, `mask` or `log`, ignoring case.
    fn from_str(s: &str) -> Result<Self> {
        [
            GuardrailAction::Block,
            GuardrailAction::Mask,
            GuardrailAction::Log,
        ]
        .into_iter()
        .find(|a| a.name().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| GuardrailError::UnknownAction {
            value: s.to_owned(),
        })
    }
}

/// Compiles one of this module's built-in patterns.
///
/// The patterns are string constants in this module, not input: one that failed to compile would
/// be a bug here, caught by every unit test that builds a detector, never a condition a user or
/// the system can cause. So the failure is a panic rather than an error every caller must handle.
#[allow(clippy::expect_used)]
fn builtin_regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("built-in guardrail pattern compiles")
}

/// Whether `a` and `b` are equal ignoring ASCII case, `-` and `_`.
fn loose_eq(a: &str, b: &str) -> bool {
    let strip = |s: &str| {
        s.trim()
            .bytes()
            .filter(|c| *c != b'-' && *c != b'_')
            .map(|c| c.to_ascii_lowercase())
            .collect::<Vec<u8>>()
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn actions_serialize_in_snake_case_and_parse_from_config_text() {
        let json = serde_json::to_string(&[
            GuardrailAction::Block,
            GuardrailAction::Mask,
            GuardrailAction::Log,
        ])
        .unwrap();
        assert_eq!(json, r#"["block","mask","log"]"#);
        let back: Vec<GuardrailAction> = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back,
            [
                GuardrailAction::Block,
                GuardrailAction::Mask,
                GuardrailAction::Log
            ]
        );
        assert_eq!(
            "Mask".parse::<GuardrailAction>().unwrap(),
            GuardrailAction::Mask
        );
        let err = "drop".parse::<GuardrailAction>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown guardrail action `drop`: expected block, mask or log"
        );
        assert!(serde_json::from_str::<GuardrailAction>(r#""Block""#).is_err());
    }

    #[test]
    fn detectors_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<PiiDetector>();
        assert_send_sync::<InjectionDetector>();
    }
}
