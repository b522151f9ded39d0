//! Personal data and secrets in free text: the kinds corral recognises, where they occur, and
//! masking them with `[LABEL]` placeholders.
//!
//! Every kind is a regular expression (compiled once, in [`PiiDetector::new`]), some followed by
//! a validation step for what a regex cannot say (a bearer token must look random; the numeric
//! kinds in `numbers.rs` have their own). A cheap prefilter (an `@`, a literal prefix such as
//! `eyJ` or `-----BEGIN`, enough digits) skips each regex on text that cannot contain its kind,
//! which is the common case.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::numbers::NumberFinder;
use super::{builtin_regex, GuardrailError};

/// A kind of personal data or secret that [`PiiDetector`] finds.
///
/// Serialized as the variant name (`"CardNumber"`); deserialization also accepts the snake-case
/// name (`"card_number"`) and the mask label (`"CARD_NUMBER"`), the forms a config file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PiiKind {
    /// An e-mail address: `jane.doe+news@example.co.uk`.
    #[serde(alias = "email", alias = "EMAIL")]
    Email,
    /// A phone number: `+44 20 7946 0958`, `(415) 555-2671`, `020 7946 0958`.
    #[serde(alias = "phone", alias = "PHONE")]
    Phone,
    /// A payment card number of 13-19 digits that passes the Luhn check.
    #[serde(alias = "card_number", alias = "CARD_NUMBER")]
    CardNumber,
    /// A US social security number, `ddd-dd-dddd`, outside the never-issued ranges.
    #[serde(alias = "ssn", alias = "SSN")]
    Ssn,
    /// An API key or bearer token of a known shape (OpenAI, Anthropic, AWS, GitHub, Slack,
    /// Google, `Bearer <token>`).
    #[serde(alias = "api_key", alias = "API_KEY")]
    ApiKey,
    /// A JSON Web Token: three base64url segments, the header starting `eyJ`.
    #[serde(alias = "jwt", alias = "JWT")]
    Jwt,
    /// A PEM private key block, `-----BEGIN ... PRIVATE KEY-----` through its END line.
    #[serde(alias = "private_key", alias = "PRIVATE_KEY")]
    PrivateKey,
}

impl PiiKind {
    /// Every kind, in the order of the enum.
    pub const ALL: [PiiKind; 7] = [
        PiiKind::Email,
        PiiKind::Phone,
        PiiKind::CardNumber,
        PiiKind::Ssn,
        PiiKind::ApiKey,
        PiiKind::Jwt,
        PiiKind::PrivateKey,
    ];

    /// The label used in masks (`[EMAIL]`) and logs.
    pub fn label(self) -> &'static str {
        match self {
            PiiKind::Email => "EMAIL",
            PiiKind::Phone => "PHONE",
            PiiKind::CardNumber => "CARD_NUMBER",
            PiiKind::Ssn => "SSN",
            PiiKind::ApiKey => "API_KEY",
            PiiKind::Jwt => "JWT",
            PiiKind::PrivateKey => "PRIVATE_KEY",
        }
    }

    /// Which kind wins when two findings of the same length overlap: the more specific shape
    /// (a JWT is also a bearer token; an SSN also looks like a phone number).
    fn specificity(self) -> u8 {
        match self {
            PiiKind::Phone => 1,
            PiiKind::Email => 2,
            PiiKind::Ssn => 3,
            PiiKind::CardNumber => 4,
            PiiKind::ApiKey => 5,
            PiiKind::Jwt => 6,
            PiiKind::PrivateKey => 7,
        }
    }
}

impl fmt::Display for PiiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl FromStr for PiiKind {
    type Err = GuardrailError;

    /// Parses a label or name, ignoring case, `-` and `_`: `card_number`, `CARD-NUMBER` and
    /// `CardNumber` are all [`PiiKind::CardNumber`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PiiKind::ALL
            .into_iter()
            .find(|kind| super::loose_eq(s, kind.label()))
            .ok_or_else(|| GuardrailError::UnknownPiiKind {
                value: s.to_owned(),
            })
    }
}

/// One occurrence of a [`PiiKind`]: `text[start..end]`, byte offsets into the scanned text (always
/// on character boundaries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
}

impl Finding {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// E-mail addresses: ASCII local part and a dotted domain ending in an alphabetic TLD.
const EMAIL: &str =
    r"[A-Za-z0-9_%+-][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}";

/// Provider key shapes with their literal prefixes (the regex engine scans for the prefixes
/// first, so text without any of them costs one vectorised pass).
const API_KEY: &str = concat!(
    r"(?-u:\b)(?:",
    r"sk-[A-Za-z0-9_-]{20,}", // OpenAI (sk-, sk-proj-), Anthropic (sk-ant-)
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}(?-u:\b)", // AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{30,}", // GitHub classic tokens
    r"|github_pat_[A-Za-z0-9_]{20,}", // GitHub fine-grained tokens
    r"|xox[baprs]-[A-Za-z0-9-]{10,}", // Slack
    r"|AIza[0-9A-Za-z_-]{35}", // Google API keys
    r"|(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}", // Stripe secret and restricted keys
    r"|hf_[A-Za-z0-9]{30,}",  // Hugging Face access tokens
    r")",
);

/// `Bearer <token>`; the finding covers the token only, so `Authorization: Bearer [API_KEY]`
/// keeps its shape.
const BEARER: &str = r"(?:Bearer|bearer|BEARER)[ \t]+([A-Za-z0-9._~+/-]{16,}=*)";

/// JSON Web Tokens: a JWS (`header.payload.signature`, the signature empty for `alg: none`) or a
/// JWE (five segments, the encrypted key empty for `alg: dir`); the header is base64url JSON, so
/// it starts `eyJ`.
const JWT: &str = concat!(
    r"(?-u:\b)eyJ[A-Za-z0-9_-]{8,}",
    r"(?:\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]{8,}",
    r"|\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*)",
);

/// PEM private key BEGIN and END lines (`RSA`, `EC`, `OPENSSH`, `ENCRYPTED`, PGP `... BLOCK`).
const PEM_BEGIN: &str = r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----";
const PEM_END: &str = r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----";

/// Finds and masks [`PiiKind`]s in text.
///
/// Build one with the kinds a policy enables and share it (it is `Send + Sync`, and `clone` is
/// cheap): all regexes are compiled in [`PiiDetector::new`].
#[derive(Clone)]
pub struct PiiDetector {
    kinds: Vec<PiiKind>,
    email: Option<Regex>,
    numbers: Option<NumberFinder>,
    api_key: Option<(Regex, Regex)>,
    jwt: Option<Regex>,
    private_key: Option<(Regex, Regex)>,
}

impl fmt::Debug for PiiDetector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PiiDetector")
            .field("kinds", &self.kinds)
            .finish_non_exhaustive()
    }
}

impl Default for PiiDetector {
    /// A detector for every kind.
    fn default() -> Self {
        PiiDetector::new(&PiiKind::ALL)
    }
}

impl PiiDetector {
    /// A detector for `kinds` (duplicates are ignored; an empty slice detects nothing).
    pub fn new(kinds: &[PiiKind]) -> PiiDetector {
        let on = |kind: PiiKind| kinds.contains(&kind);
        let compile = |kind: PiiKind, pattern: &str| on(kind).then(|| builtin_regex(pattern));
        PiiDetector {
            kinds: PiiKind::ALL.into_iter().filter(|k| on(*k)).collect(),
            email: compile(PiiKind::Email, EMAIL),
            numbers: NumberFinder::new(kinds),
            api_key: on(PiiKind::ApiKey).then(|| (builtin_regex(API_KEY), builtin_regex(BEARER))),
            jwt: compile(PiiKind::Jwt, JWT),
            private_key: on(PiiKind::PrivateKey)
                .then(|| (builtin_regex(PEM_BEGIN), builtin_regex(PEM_END))),
        }
    }

    /// The kinds this detector looks for, in [`PiiKind::ALL`] order.
    pub fn kinds(&self) -> &[PiiKind] {
        &self.kinds
    }

    /// Every finding in `text`, sorted by start and non-overlapping. Where candidates overlap the
    /// longest wins, and between equally long ones the more specific kind (private key, JWT, API
    /// key, card number, SSN, e-mail, phone, in that order).
    pub fn detect(&self, text: &str) -> Vec<Finding> {
        let bytes = text.as_bytes();
        let mut found = Vec::new();
        if let Some((begin, end)) = &self.private_key {
            if text.contains("-----BEGIN ") {
                find_private_keys(begin, end, text, &mut found);
            }
        }
        if let Some(re) = &self.jwt {
            if text.contains("eyJ") {
                push_all(re, text, PiiKind::Jwt, &mut found);
            }
        }
        if let Some((keys, bearer)) = &self.api_key {
            find_api_keys(keys, bearer, text, &mut found);
        }
        if let Some(re) = &self.email {
            if bytes.contains(&b'@') {
                push_all(re, text, PiiKind::Email, &mut found);
            }
        }
        if let Some(numbers) = &self.numbers {
            numbers.find(text, &mut found);
        }
        resolve_overlaps(found)
    }

    /// `text` with every finding replaced by its label in brackets (`[EMAIL]`), and the findings
    /// (offsets into the original `text`).
    pub fn mask(&self, text: &str) -> (String, Vec<Finding>) {
        let findings = self.detect(text);
        (apply_mask(text, &findings), findings)
    }
}

/// `text` with each of `findings` (sorted, non-overlapping, from [`PiiDetector::detect`] on this
/// same text) replaced by `[LABEL]`.
pub(crate) fn apply_mask(text: &str, findings: &[Finding]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for f in findings {
        out.push_str(&text[last..f.start]);
        out.push('[');
        out.push_str(f.kind.label());
        out.push(']');
        last = f.end;
    }
    out.push_str(&text[last..]);
    out
}

fn push_all(re: &Regex, text: &str, kind: PiiKind, out: &mut Vec<Finding>) {
    out.extend(re.find_iter(text).map(|m| Finding {
        kind,
        start: m.start(),
        end: m.end(),
    }));
}

/// PEM private keys: each BEGIN line through the next END line; a truncated block (no END
/// follows) through the last base64 line after it. Done by hand rather than with one lazy regex,
/// which would rescan the rest of the text for an END after every BEGIN (quadratic on text full
/// of BEGIN lines).
fn find_private_keys(begin: &Regex, end: &Regex, text: &str, out: &mut Vec<Finding>) {
    // The first END at or after some position; `None` once none is left after it.
    let mut next_end: Option<Option<(usize, usize)>> = None;
    let mut covered = 0;
    for header in begin.find_iter(text) {
        if header.start() < covered {
            continue;
        }
        if next_end.is_some_and(|e| e.is_some_and(|(s, _)| s < header.end())) {
            next_end = None;
        }
        let found_end = *next_end.get_or_insert_with(|| {
            end.find_at(text, header.end())
                .map(|m| (m.start(), m.end()))
        });
        let stop = match found_end {
            Some((_, e)) => e,
            None => base64_body_end(text.as_bytes(), header.end()),
        };
        out.push(Finding {
            kind: PiiKind::PrivateKey,
            start: header.start(),
            end: stop,
        });
        covered = stop;
    }
}

/// Where a run of base64 lines (chunks of 16+ base64 characters separated by whitespace or by
/// the escapes `\n` and `\r`, as in a key pasted from JSON) starting at `from` ends.
fn base64_body_end(bytes: &[u8], from: usize) -> usize {
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
    let mut end = from;
    let mut i = from;
    loop {
        loop {
            match (bytes.get(i), bytes.get(i + 1)) {
                (Some(b), _) if b.is_ascii_whitespace() => i += 1,
                (Some(b'\\'), Some(b'n' | b'r')) => i += 2,
                _ => break,
            }
        }
        let chunk_start = i;
        while bytes.get(i).is_some_and(|&b| is_b64(b)) {
            i += 1;
        }
        if i - chunk_start < 16 {
            return end;
        }
        end = i;
    }
}

/// Provider keys, plus bearer tokens that look random (a letter and a digit: "bearer
/// instruments" is prose, not a credential).
fn find_api_keys(keys: &Regex, bearer: &Regex, text: &str, out: &mut Vec<Finding>) {
    for m in keys.find_iter(text) {
        // `sk-` also starts hyphenated prose ("sk-learn-style-..."); real keys mix in digits.
        if m.as_str().starts_with("sk-") && !letter_and_digit(&m.as_str()[3..]) {
            continue;
        }
        out.push(Finding {
            kind: PiiKind::ApiKey,
            start: m.start(),
            end: m.end(),
        });
    }
    if !text.contains("earer") && !text.contains("EARER") {
        return;
    }
    for caps in bearer.captures_iter(text) {
        if let Some(token) = caps.get(1).filter(|t| letter_and_digit(t.as_str())) {
            out.push(Finding {
                kind: PiiKind::ApiKey,
                start: token.start(),
                end: token.end(),
            });
        }
    }
}

fn letter_and_digit(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_alphabetic()) && s.bytes().any(|b| b.is_ascii_digit())
}

/// Keeps the longest of overlapping findings (the more specific kind on a tie) and returns the
/// survivors sorted by start.
fn resolve_overlaps(mut found: Vec<Finding>) -> Vec<Finding> {
    if found.len() < 2 {
        return found;
    }
    found.sort_by(|a, b| {
        b.len()
            .cmp(&a.len())
            .then(b.kind.specificity().cmp(&a.kind.specificity()))
            .then(a.start.cmp(&b.start))
    });
    // Kept findings are disjoint, so the one with the greatest start before `f.end` is the only
    // one that can reach past `f.start`.
    let mut kept: BTreeMap<usize, Finding> = BTreeMap::new();
    for f in found {
        let overlaps = kept
            .range(..f.end)
            .next_back()
            .is_some_and(|(_, k)| k.end > f.start);
        if !overlaps {
            kept.insert(f.start, f);
        }
    }
    kept.into_values().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn all() -> PiiDetector {
        PiiDetector::default()
    }

    /// The masked text from a detector for every kind.
    fn masked(text: &str) -> String {
        all().mask(text).0
    }

    fn kinds(text: &str) -> Vec<PiiKind> {
        all().detect(text).into_iter().map(|f| f.kind).collect()
    }

    #[test]
    fn labels_and_parsing_round_trip() {
        for kind in PiiKind::ALL {
            assert_eq!(kind.label().parse::<PiiKind>().unwrap(), kind);
            assert_eq!(kind.to_string(), kind.label());
        }
        assert_eq!(
            "card-number".parse::<PiiKind>().unwrap(),
            PiiKind::CardNumber
        );
        let err = "passport".parse::<PiiKind>().unwrap_err();
        assert!(err.to_string().contains("passport"), "{err}");
        let kinds: Vec<PiiKind> =
            serde_json::from_str(r#"["email","CARD_NUMBER","PrivateKey"]"#).unwrap();
        assert_eq!(
            kinds,
            [PiiKind::Email, PiiKind::CardNumber, PiiKind::PrivateKey]
        );
    }

    #[test]
    fn emails_are_masked() {
        assert_eq!(
            masked("Write to jane.doe+billing@example.co.uk, or ops@corp.io."),
            "Write to [EMAIL], or [EMAIL]."
        );
        let text = "contact: bob@example.com";
        assert_eq!(
            all().detect(text),
            [Finding {
                kind: PiiKind::Email,
                start: 9,
                end: 24
            }]
        );
        assert_eq!(masked("ping @channel at 10am"), "ping @channel at 10am");
    }

    #[test]
    fn api_keys_of_each_provider_are_masked() {
        for key in [
            "sk-proj-4fJ9kLm2Qx8vB7nR3tW6yZ1aC5dE0gH2",
            "sk-ant-api03-Xy7Kq2Lm9Np4Rs6Tu8Vw0Yz1Ab3Cd5Ef",
            "sk-4fJ9kLm2Qx8vB7nR3tW6yZ1aC5dE0gH2iJ4kL6mN8",
            "AKIAIOSFODNN7EXAMPLE",
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
            "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOp",
            "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "hf_kQzWbXyTnRvLmPaSdFgHjKlZxCvBnMqWeRt",
        ] {
            assert_eq!(
                masked(&format!("key={key} ok")),
                "key=[API_KEY] ok",
                "{key}"
            );
        }
        assert_eq!(
            masked("Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
            "Authorization: Bearer [API_KEY]"
        );
    }

    #[test]
    fn prose_that_resembles_key_prefixes_is_left_alone() {
        for text in [
            "Our task-management-system-overhaul starts Monday.",
            "use the sk-learn-compatible-interface-design here",
            "He was the bearer of unfortunate-news-and-bad-tidings.",
            "AKIA is not a key on its own",
        ] {
            assert_eq!(masked(text), text);
        }
    }

    #[test]
    fn jwts_are_masked_and_win_over_bearer() {
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        assert_eq!(
            masked(&format!("token {jwt} expired")),
            "token [JWT] expired"
        );
        let jwe = "eyJhbGciOiJkaXIiLCJlbmMiOiJBMTI4R0NNIn0..6KB707dM9YTIgHtLvtgWQ8mKwboJW3of9locizkDTHzBC2IlrT1oOQ.5ObF6aq5wR3AUQXPUpTzbH9dMJJ7lKrGCBAAvn0iGfs.G8lYSgv2zj1ppu5Sg4u2Tg";
        assert_eq!(masked(&format!("jwe={jwe};")), "jwe=[JWT];");
        // Base64url-ish text without the JSON header is not a token.
        let dotted = "see abcdefghijkl.mnopqrstuvwx.yz123456";
        assert_eq!(masked(dotted), dotted);
        assert_eq!(
            masked(&format!("Authorization: Bearer {jwt}")),
            "Authorization: Bearer [JWT]"
        );
    }

    #[test]
    fn pem_private_keys_are_masked_whole() {
        let text = "here is my key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgwMbRvI0MBZhpF\nY2hAbmaPQZ6TgwsVTQNmRc4ivBe7tgzbmR3vGQ1mDQJl2hRzSZT+g3p3xe1RXTfE\n-----END RSA PRIVATE KEY-----\nthanks";
        assert_eq!(masked(text), "here is my key:\n[PRIVATE_KEY]\nthanks");
        let openssh = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n-----END OPENSSH PRIVATE KEY-----";
        assert_eq!(masked(openssh), "[PRIVATE_KEY]");
        // A truncated paste is masked through its last base64 line.
        let truncated = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIB\n\nwhat went wrong?";
        assert_eq!(masked(truncated), "[PRIVATE_KEY]\n\nwhat went wrong?");
        // So is one pasted from JSON, with escaped newlines.
        let escaped = r"key: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcw\nggSjAgEAAoIBAQC7VJTUt9Us8cKj\n";
        assert_eq!(masked(escaped), r"key: [PRIVATE_KEY]\n");
        // Public keys and certificates are not secrets.
        let public = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----";
        assert_eq!(masked(public), public);
    }

    #[test]
    fn overlapping_candidates_resolve_to_the_longest() {
        // The key block contains an AWS-shaped id and a card-shaped run; one finding covers all.
        let text = "-----BEGIN EC PRIVATE KEY-----\nAKIAIOSFODNN7EXAMPLE 4111 1111 1111 1111\n-----END EC PRIVATE KEY-----";
        assert_eq!(kinds(text), [PiiKind::PrivateKey]);
        // An SSN is also a NANP-free dashed number; equal spans go to the more specific kind.
        let resolved = resolve_overlaps(vec![
            Finding {
                kind: PiiKind::Phone,
                start: 0,
                end: 11,
            },
            Finding {
                kind: PiiKind::Ssn,
                start: 0,
                end: 11,
            },
            Finding {
                kind: PiiKind::Email,
                start: 5,
                end: 20,
            },
            Finding {
                kind: PiiKind::Phone,
                start: 25,
                end: 30,
            },
        ]);
        assert_eq!(
            resolved,
            [
                Finding {
                    kind: PiiKind::Email,
                    start: 5,
                    end: 20
                },
                Finding {
                    kind: PiiKind::Phone,
                    start: 25,
                    end: 30
                },
            ]
        );
    }

    #[test]
    fn findings_are_sorted_and_masks_keep_the_rest_of_the_text() {
        let text = "Ünïcödé ok: mail ann@example.org, call +1 415 555 2671, SSN 123-45-6789.";
        let (out, findings) = all().mask(text);
        assert_eq!(out, "Ünïcödé ok: mail [EMAIL], call [PHONE], SSN [SSN].");
        let found: Vec<&str> = findings.iter().map(|f| &text[f.start..f.end]).collect();
        assert_eq!(found, ["ann@example.org", "+1 415 555 2671", "123-45-6789"]);
    }

    #[test]
    fn only_enabled_kinds_are_detected() {
        let det = PiiDetector::new(&[PiiKind::Email]);
        assert_eq!(det.kinds(), [PiiKind::Email]);
        let (out, _) = det.mask("a@b.io 123-45-6789 4111111111111111");
        assert_eq!(out, "[EMAIL] 123-45-6789 4111111111111111");
        let none = PiiDetector::new(&[]);
        assert!(none.detect("a@b.io 123-45-6789").is_empty());
    }

    #[test]
    fn detector_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PiiDetector>();
    }
}
