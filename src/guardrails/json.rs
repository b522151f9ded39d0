//! Redaction of JSON documents before they are written anywhere durable (the audit log): values
//! under sensitive keys are replaced outright, and every other string can be PII-masked.

use serde_json::Value;

use super::pii::{apply_mask, PiiDetector};

/// What the value of a sensitive key becomes.
pub const REDACTED: &str = "[REDACTED]";

/// Keys whose values are secrets whatever they look like. Compared as [`redact_json`] describes,
/// so `Authorization`, `API-Key` and `clientSecret` all match.
pub const DEFAULT_SENSITIVE_KEYS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "access_token",
    "refresh_token",
    "api_key",
    "apikey",
    "authorization",
    "ssn",
    "card_number",
    "cvv",
    "cvc",
    "private_key",
    "client_secret",
];

/// [`DEFAULT_SENSITIVE_KEYS`] as owned strings, the form [`redact_json`] and configs take.
pub fn default_sensitive_keys() -> Vec<String> {
    DEFAULT_SENSITIVE_KEYS
        .iter()
        .map(|k| (*k).to_owned())
        .collect()
}

/// Redacts `value` in place and returns how many values changed.
///
/// - An object member whose key equals one of `sensitive_keys`, ignoring case, `-` and `_`
///   (`Access-Token` matches `access_token`; `x-api-key` does not match `api_key`), gets the
///   string [`REDACTED`] whatever it held (an object, an array, `null`); its contents are not
///   visited. A member already holding exactly `"[REDACTED]"` is not counted again.
/// - With `pii`, every other string value, at any depth, is masked as
///   [`PiiDetector::mask`] does (`"mail bob@example.com"` → `"mail [EMAIL]"`). Object keys are
///   not masked.
///
/// The walk uses an explicit stack, so deeply nested input cannot overflow the call stack.
pub fn redact_json(
    value: &mut Value,
    sensitive_keys: &[String],
    pii: Option<&PiiDetector>,
) -> usize {
    redact_json_with(value, &SensitiveKeys::new(sensitive_keys), pii)
}

/// Sensitive keys normalized once, for a caller that redacts many documents with the same list
/// (the audit log's writer): [`redact_json_with`] then skips normalizing them per document.
#[derive(Debug, Clone, Default)]
pub struct SensitiveKeys(Vec<String>);

impl SensitiveKeys {
    pub fn new(keys: &[String]) -> SensitiveKeys {
        SensitiveKeys(keys.iter().map(|k| normalize_key(k)).collect())
    }
}

/// [`redact_json`] with keys normalized beforehand.
pub fn redact_json_with(
    value: &mut Value,
    sensitive: &SensitiveKeys,
    pii: Option<&PiiDetector>,
) -> usize {
    let sensitive = &sensitive.0;
    let mut changed = 0;
    let mut normalized = String::new();
    let mut stack: Vec<&mut Value> = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    normalize_into(key, &mut normalized);
                    if !sensitive.contains(&normalized) {
                        stack.push(child);
                    } else if child.as_str() != Some(REDACTED) {
                        *child = Value::String(REDACTED.to_owned());
                        changed += 1;
                    }
                }
            }
            Value::Array(items) => stack.extend(items.iter_mut()),
            Value::String(s) => {
                if let Some(detector) = pii {
                    let findings = detector.detect(s);
                    if !findings.is_empty() {
                        *s = apply_mask(s, &findings);
                        changed += 1;
                    }
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    changed
}

/// Lowercase with `-` and `_` removed.
fn normalize_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    normalize_into(key, &mut out);
    out
}

/// [`normalize_key`] into a reused buffer: each object key is normalized once and compared with
/// the (already normalized) sensitive keys, rather than re-walked for every one of them.
fn normalize_into(key: &str, out: &mut String) {
    out.clear();
    for c in key.chars() {
        match c {
            '-' | '_' => {}
            c if c.is_ascii() => out.push(c.to_ascii_lowercase()),
            c => out.extend(c.to_lowercase()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn sensitive_keys_are_redacted_at_any_depth_and_type() {
        let mut doc = json!({
            "user": "ann",
            "Password": "hunter2",
            "headers": {"Authorization": "Bearer abc", "Accept": "application/json"},
            "clientSecret": {"value": "s3cr3t", "rotated": true},
            "cards": [{"card-number": 4111111111111111u64, "CVV": 123, "name": "Ann"}],
            "refresh_token": null,
        });
        let n = redact_json(&mut doc, &default_sensitive_keys(), None);
        assert_eq!(n, 6);
        assert_eq!(
            doc,
            json!({
                "user": "ann",
                "Password": "[REDACTED]",
                "headers": {"Authorization": "[REDACTED]", "Accept": "application/json"},
                "clientSecret": "[REDACTED]",
                "cards": [{"card-number": "[REDACTED]", "CVV": "[REDACTED]", "name": "Ann"}],
                "refresh_token": "[REDACTED]",
            })
        );
        // Redacting again changes nothing.
        assert_eq!(redact_json(&mut doc, &default_sensitive_keys(), None), 0);
    }

    #[test]
    fn keys_must_match_whole_not_as_substrings() {
        let mut doc = json!({"token_count": 42, "x-api-key": "k", "secretary": "Bo", "TOKEN": "t"});
        let n = redact_json(&mut doc, &default_sensitive_keys(), None);
        assert_eq!(n, 1);
        assert_eq!(
            doc,
            json!({"token_count": 42, "x-api-key": "k", "secretary": "Bo", "TOKEN": "[REDACTED]"})
        );
        // Callers add their own keys.
        let keys = vec!["X-Api-Key".to_owned()];
        assert_eq!(redact_json(&mut doc, &keys, None), 1);
        assert_eq!(doc["x-api-key"], "[REDACTED]");
    }

    #[test]
    fn pii_in_string_values_is_masked_when_a_detector_is_given() {
        let mut doc = json!({
            "messages": [
                {"role": "user", "content": "I'm ann@example.com, card 4111 1111 1111 1111"},
                {"role": "assistant", "content": "Thanks!"},
            ],
            "meta": {"notes": ["call +44 20 7946 0958", 7, false]},
            "password": "ann@example.com",
        });
        let detector = PiiDetector::default();
        let n = redact_json(&mut doc, &default_sensitive_keys(), Some(&detector));
        assert_eq!(n, 3);
        assert_eq!(
            doc,
            json!({
                "messages": [
                    {"role": "user", "content": "I'm [EMAIL], card [CARD_NUMBER]"},
                    {"role": "assistant", "content": "Thanks!"},
                ],
                "meta": {"notes": ["call [PHONE]", 7, false]},
                "password": "[REDACTED]",
            })
        );
    }

    #[test]
    fn without_a_detector_strings_are_left_alone() {
        let mut doc = json!(["ann@example.com", {"nested": ["123-45-6789"]}]);
        let before = doc.clone();
        assert_eq!(redact_json(&mut doc, &default_sensitive_keys(), None), 0);
        assert_eq!(doc, before);
    }

    #[test]
    fn deeply_nested_documents_do_not_overflow_the_stack() {
        let mut doc = json!({"password": "x"});
        for _ in 0..100_000 {
            doc = Value::Array(vec![doc]);
        }
        assert_eq!(redact_json(&mut doc, &default_sensitive_keys(), None), 1);
        // Dropping a deep Value recurses too; unwind it iteratively.
        let mut cur = doc;
        while let Value::Array(mut items) = cur {
            cur = items.pop().unwrap_or(Value::Null);
        }
        assert_eq!(cur, json!({"password": "[REDACTED]"}));
    }
}
