//! Per-field confidence of a JSON answer: for each top-level key of the object, the score of the
//! tokens that wrote its value. Tokens a constraint forced (one allowed choice: keys, quotes,
//! punctuation of a fixed schema) carry no evidence and are left out; a value written only by
//! forced tokens has no score.

use std::collections::BTreeMap;

use corral_protocol::TokenInfo;

use crate::confidence::{self, Method, TokenStat};

/// The byte span of each top-level value of the JSON object `text`, with its key; `None` when
/// `text` is not an object (or not well formed).
pub fn value_spans(text: &str) -> Option<Vec<(String, std::ops::Range<usize>)>> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut out = Vec::new();
    if b.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        let key_end = string_end(b, i)?;
        let key: String = serde_json::from_str(text.get(i..key_end)?).ok()?;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let end = value_end(b, start)?;
        out.push((key, start..end));
        i = skip_ws(b, end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Some(out),
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// The index just past the string starting at `i` (which must be `"`).
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// The index just past the JSON value starting at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']') && !b[j].is_ascii_whitespace()
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// Each top-level field's confidence under `method`, from the tokens whose text overlaps its
/// value (the tokens' texts concatenated must be the answer). `None` when the answer is not a
/// JSON object.
pub fn field_confidence(
    tokens: &[TokenInfo],
    method: Method,
) -> Option<BTreeMap<String, Option<f64>>> {
    let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
    let spans = value_spans(&text)?;
    let mut starts = Vec::with_capacity(tokens.len());
    let mut at = 0;
    for t in tokens {
        starts.push(at);
        at += t.text.len();
    }
    Some(
        spans
            .into_iter()
            .map(|(key, span)| {
                let stats: Vec<TokenStat> = tokens
                    .iter()
                    .zip(&starts)
                    .filter(|(t, s)| !t.forced && **s < span.end && **s + t.text.len() > span.start)
                    .map(|(t, _)| TokenStat::from(t))
                    .collect();
                (key, confidence::score(&stats, method))
            })
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tok(text: &str, logprob: f32, forced: bool) -> TokenInfo {
        TokenInfo {
            token_id: 1,
            bytes: text.as_bytes().to_vec(),
            text: text.into(),
            logprob,
            entropy: 0.0,
            margin: 0.0,
            top_entropy: 0.0,
            top: vec![],
            forced,
        }
    }

    #[test]
    fn spans_follow_json_not_its_look() {
        let t = r#"{"a": "x,}\"y", "b":{"c":[1,{"d":"]"}]},"e":-1.5e3 ,"f":true}"#;
        let s = value_spans(t).unwrap();
        let got: Vec<(&str, &str)> = s.iter().map(|(k, r)| (k.as_str(), &t[r.clone()])).collect();
        assert_eq!(
            got,
            [
                ("a", r#""x,}\"y""#),
                ("b", r#"{"c":[1,{"d":"]"}]}"#),
                ("e", "-1.5e3"),
                ("f", "true")
            ]
        );
        assert_eq!(value_spans("{}").unwrap(), vec![]);
        assert!(value_spans("[1]").is_none());
        assert!(value_spans(r#"{"a":"#).is_none());
    }

    #[test]
    fn each_field_scores_its_own_free_tokens() {
        // {"name":"Tom","colour":"grey"} with the keys and punctuation forced.
        let tokens = vec![
            tok(r#"{"name":""#, 0.0, true),
            tok("Tom", -0.01, false),
            tok(r#"","colour":""#, 0.0, true),
            tok("gr", -2.0, false),
            tok("ey", -0.5, false),
            tok(r#""}"#, 0.0, true),
        ];
        let f = field_confidence(&tokens, Method::Minimum).unwrap();
        assert!(
            (f["name"].unwrap() - (-0.01f64).exp()).abs() < 1e-6,
            "{f:?}"
        );
        assert!(
            (f["colour"].unwrap() - (-2.0f64).exp()).abs() < 1e-6,
            "{f:?}"
        );
        // A value written only by forced tokens has no evidence.
        let forced = vec![tok(r#"{"ok":true}"#, 0.0, true)];
        assert_eq!(
            field_confidence(&forced, Method::Minimum).unwrap()["ok"],
            None
        );
        assert!(field_confidence(&[tok("plain text", -0.1, false)], Method::Minimum).is_none());
    }
}
