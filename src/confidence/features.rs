//! What the learned confidence ([`super::calibrator`]) sees of an answer: numbers over its tokens,
//! both over every token and over the tokens that carry the answer (its *span*), plus the task
//! type and the answer's shape.
//!
//! **The answer span.** Most tokens of a short answer are near-certain whatever the model knows:
//! the template's and the model's own boilerplate ("The answer is", "Sure!") and the words it
//! repeats from the question ("The capital of Peru is ..."). Averaging over them dilutes the few
//! tokens that decide correctness. The span is found from the answer's words (runs of letters
//! and digits; a number keeps its sign, decimal point and thousands separators):
//!
//! 1. the tokens that overlap a *new* word: not a stop word and not a word of the prompt;
//! 2. else (an answer made only of words the prompt has, e.g. a label it offered: "odd") the
//!    tokens that overlap any word that is not a stop word;
//! 3. else every token.
//!
//! Beside the numbers over the span and over every token, the shape of the exchange: whether
//! the answer was cut off at its token limit (before finishing a sentence), whether it brings a
//! number the prompt lacks (a computed one) or copies its content from the prompt, how large the
//! prompt's numbers are. docs/confidence.md reports what each adds.

use std::collections::HashSet;

use super::TokenStat;

/// The feature names, in the order [`Features::values`] has them (the calibrator file names them
/// too, so a file made for another order is refused).
pub const NAMES: [&str; 32] = [
    "span_mean_logprob",
    "span_min_logprob",
    "span_q25_logprob",
    "span_first_logprob",
    "span_mean_entropy",
    "span_max_entropy",
    "span_mean_top_entropy",
    "span_mean_margin",
    "span_min_margin",
    "all_mean_logprob",
    "all_min_logprob",
    "all_q10_logprob",
    "all_mean_entropy",
    "all_mean_top_entropy",
    "all_mean_margin",
    "log_tokens",
    "span_share",
    "truncated",
    "has_digit",
    "echo_share",
    "new_number",
    "copied_span",
    "prompt_max_digits",
    "prompt_numbers",
    "log_prompt_words",
    "ends_clean",
    "new_words",
    "span_start",
    "span_at_end",
    "span_number_logprob",
    "cut_short",
    "sentence_done",
];

/// Margins are capped here (nats): past it the best token is simply certain, and a rare huge
/// margin would otherwise dominate a mean.
const MARGIN_CAP: f64 = 12.0;

/// Words that say nothing about the answer's content.
const STOP_WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "it",
    "its",
    "it's",
    "this",
    "that",
    "these",
    "those",
    "of",
    "in",
    "on",
    "at",
    "to",
    "for",
    "from",
    "by",
    "with",
    "as",
    "and",
    "or",
    "but",
    "so",
    "if",
    "then",
    "than",
    "answer",
    "answers",
    "question",
    "result",
    "equals",
    "equal",
    "sure",
    "i",
    "you",
    "we",
    "my",
    "your",
    "our",
    "here",
    "there",
    "what",
    "which",
    "who",
    "whom",
    "how",
    "when",
    "where",
    "why",
    "do",
    "does",
    "did",
    "can",
    "could",
    "would",
    "should",
    "will",
    "has",
    "have",
    "had",
    "not",
    "let",
    "me",
    "us",
    "s",
    "correct",
    "final",
    "therefore",
    "thus",
    "just",
    "only",
    "also",
    "very",
    "well",
    "okay",
    "ok",
    "hello",
    "hi",
    "please",
    "thank",
    "thanks",
    "called",
    "known",
    "named",
];

/// What an answer's features depend on besides its tokens.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    /// The prompt's words, lower-cased.
    words: HashSet<String>,
    /// Its numbers.
    numbers: HashSet<String>,
    /// How many words it has.
    count: usize,
    /// Digits of its longest number.
    max_digits: usize,
}

fn is_number(w: &str) -> bool {
    w.bytes().any(|b| b.is_ascii_digit())
}

impl Prompt {
    pub fn new(text: &str) -> Prompt {
        let ws = words(text);
        let numbers: HashSet<String> = ws
            .iter()
            .filter(|w| is_number(&w.text))
            .map(|w| w.text.clone())
            .collect();
        Prompt {
            count: ws.len(),
            max_digits: numbers
                .iter()
                .map(|n| n.bytes().filter(u8::is_ascii_digit).count())
                .max()
                .unwrap_or(0),
            numbers,
            words: ws.into_iter().map(|w| w.text).collect(),
        }
    }
}

/// One word of a text: its lower-cased form and byte range.
#[derive(Debug, Clone, PartialEq)]
struct Word {
    text: String,
    start: usize,
    end: usize,
}

/// The words of `text`: runs of alphanumerics (and apostrophes inside them), a number with its
/// leading minus, inner `.` or `,` between digits.
fn words(text: &str) -> Vec<Word> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !c.is_alphanumeric() {
            continue;
        }
        let numeric = c.is_ascii_digit();
        let mut start = i;
        if numeric && i > 0 && b[i - 1] == b'-' && (i < 2 || !b[i - 2].is_ascii_alphanumeric()) {
            start = i - 1;
        }
        let mut end = i + c.len_utf8();
        while let Some(&(j, d)) = chars.peek() {
            let inner = |k: usize| {
                matches!(d, '.' | ',' | '\'')
                    && text[k + 1..].chars().next().is_some_and(|n| {
                        if numeric {
                            n.is_ascii_digit() && d != '\''
                        } else {
                            n.is_alphabetic() && d == '\''
                        }
                    })
            };
            if d.is_alphanumeric() || inner(j) {
                end = j + d.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        let mut w = text[start..end].to_lowercase();
        if numeric {
            w.retain(|c| c != ',');
        }
        out.push(Word {
            text: w,
            start,
            end,
        });
    }
    out
}

/// One token of an answer: its numbers and its text.
#[derive(Debug, Clone, Copy)]
pub struct Tok<'a> {
    pub stat: TokenStat,
    pub text: &'a str,
}

/// An answer's features ([`NAMES`], in order).
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub values: Vec<f64>,
    /// How many of the tokens the span holds (for reports).
    pub span_tokens: usize,
}

/// Which of `tokens` form the answer span (see the module's header).
pub fn span(tokens: &[Tok<'_>], prompt: &Prompt) -> Vec<bool> {
    found_span(tokens, prompt).0
}

/// The span, which rule found it (1, 2 or 3: see the module's header) and how many new words
/// the answer has.
fn found_span(tokens: &[Tok<'_>], prompt: &Prompt) -> (Vec<bool>, u8, usize) {
    let text: String = tokens.iter().map(|t| t.text).collect();
    let ws = words(&text);
    let stop = |w: &Word| STOP_WORDS.contains(&w.text.as_str());
    let new: Vec<&Word> = ws
        .iter()
        .filter(|w| !stop(w) && !prompt.words.contains(&w.text))
        .collect();
    let n_new = new.len();
    let (chosen, rule): (Vec<&Word>, u8) = if new.is_empty() {
        (ws.iter().filter(|w| !stop(w)).collect(), 2)
    } else {
        (new, 1)
    };
    if chosen.is_empty() {
        return (vec![true; tokens.len()], 3, 0);
    }
    // One sweep: tokens and the chosen words both run left to right.
    let mut at = 0;
    let mut w = 0;
    let span = tokens
        .iter()
        .map(|t| {
            let (s, e) = (at, at + t.text.len());
            at = e;
            // A token with no text of its own (part of a character) goes with its neighbours:
            // it counts when the character it starts does.
            let e = e.max(s + 1);
            while w < chosen.len() && chosen[w].end <= s {
                w += 1;
            }
            w < chosen.len() && chosen[w].start < e
        })
        .collect();
    (span, rule, n_new)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The `q` quantile (lowest value at or above that share), 0 for none.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).floor() as usize]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::min)
}

/// The features of an answer made of `tokens` (forced tokens already left out); `truncated`:
/// it ended at its token limit. `None` for an empty answer.
pub fn features(tokens: &[Tok<'_>], prompt: &Prompt, truncated: bool) -> Option<Features> {
    if tokens.is_empty() {
        return None;
    }
    let (in_span, rule, n_new) = found_span(tokens, prompt);
    let pick = |f: &dyn Fn(&TokenStat) -> f64, span_only: bool| -> Vec<f64> {
        tokens
            .iter()
            .zip(&in_span)
            .filter(|(_, s)| **s || !span_only)
            .map(|(t, _)| f(&t.stat))
            .collect()
    };
    let lp = |t: &TokenStat| f64::from(t.logprob).clamp(-30.0, 0.0);
    let h = |t: &TokenStat| f64::from(t.entropy).max(0.0);
    let th = |t: &TokenStat| f64::from(t.top_entropy).max(0.0);
    let mg = |t: &TokenStat| f64::from(t.margin).clamp(0.0, MARGIN_CAP);
    let (s_lp, s_h, s_th, s_mg) = (
        pick(&lp, true),
        pick(&h, true),
        pick(&th, true),
        pick(&mg, true),
    );
    let (a_lp, a_h, a_th, a_mg) = (
        pick(&lp, false),
        pick(&h, false),
        pick(&th, false),
        pick(&mg, false),
    );
    let text: String = tokens.iter().map(|t| t.text).collect();
    let ws = words(&text);
    let echo = if ws.is_empty() {
        0.0
    } else {
        ws.iter().filter(|w| prompt.words.contains(&w.text)).count() as f64 / ws.len() as f64
    };
    let n_span = in_span.iter().filter(|s| **s).count();
    let n = tokens.len();
    let first = in_span.iter().position(|s| *s).unwrap_or(n);
    let last = in_span.iter().rposition(|s| *s).unwrap_or(0);
    let span_number_lp = tokens
        .iter()
        .zip(&in_span)
        .filter(|(t, s)| **s && t.text.bytes().any(|b| b.is_ascii_digit()))
        .map(|(t, _)| lp(&t.stat))
        .fold(0.0, f64::min);
    let trimmed = text.trim_end();
    let sentence_done = text.char_indices().any(|(i, c)| {
        matches!(c, '.' | '!' | '?') && text[i + 1..].chars().next().is_none_or(char::is_whitespace)
    });
    let flag = |b: bool| f64::from(u8::from(b));
    let values = vec![
        mean(&s_lp),
        min(&s_lp),
        quantile(&s_lp, 0.25),
        s_lp.first().copied().unwrap_or(0.0),
        mean(&s_h),
        s_h.iter().copied().fold(0.0, f64::max),
        mean(&s_th),
        mean(&s_mg),
        s_mg.iter().copied().fold(MARGIN_CAP, f64::min),
        mean(&a_lp),
        min(&a_lp),
        quantile(&a_lp, 0.10),
        mean(&a_h),
        mean(&a_th),
        mean(&a_mg),
        (1.0 + tokens.len() as f64).ln(),
        n_span as f64 / tokens.len() as f64,
        flag(truncated),
        flag(text.chars().any(|c| c.is_ascii_digit())),
        echo,
        flag(
            ws.iter()
                .any(|w| is_number(&w.text) && !prompt.numbers.contains(&w.text)),
        ),
        flag(rule == 2),
        prompt.max_digits as f64,
        prompt.numbers.len() as f64,
        (1.0 + prompt.count as f64).ln(),
        flag(!truncated && trimmed.ends_with(['.', '!', '"', '\''])),
        n_new as f64,
        first as f64 / n as f64,
        flag(truncated && last + 2 >= n),
        span_number_lp,
        flag(truncated && !sentence_done),
        flag(sentence_done),
    ];
    debug_assert_eq!(values.len(), NAMES.len());
    Some(Features {
        values,
        span_tokens: n_span,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks<'a>(parts: &[(&'a str, f32)]) -> Vec<Tok<'a>> {
        parts
            .iter()
            .map(|(text, lp)| Tok {
                stat: TokenStat {
                    logprob: *lp,
                    entropy: -lp,
                    margin: 1.0,
                    top_entropy: 0.5,
                },
                text,
            })
            .collect()
    }

    #[test]
    fn words_keep_numbers_whole() {
        let w: Vec<String> = words("It's -7, then 1,234.5 and x-3 (Paris).")
            .into_iter()
            .map(|w| w.text)
            .collect();
        assert_eq!(
            w,
            ["it's", "-7", "then", "1234.5", "and", "x", "3", "paris"]
        );
    }

    #[test]
    fn the_span_is_the_new_words() {
        let p = Prompt::new("What is the capital of Peru?");
        let t = toks(&[
            ("The", -0.01),
            (" capital", -0.02),
            (" of", -0.01),
            (" Peru", -0.01),
            (" is", -0.01),
            (" Li", -1.5),
            ("ma", -0.1),
            (".", -0.2),
        ]);
        assert_eq!(
            span(&t, &p),
            [false, false, false, false, false, true, true, false]
        );
        let f = features(&t, &p, false).unwrap();
        assert_eq!(f.span_tokens, 2);
        assert!(
            (f.values[0] - (-0.8)).abs() < 1e-6,
            "span mean {}",
            f.values[0]
        );
        assert!((f.values[3] - (-1.5)).abs() < 1e-6, "first span token");
        assert!(
            f.values[9] > f.values[0],
            "the whole answer looks surer than its span"
        );
        // A label the prompt offered: the words that are not stop words.
        let p = Prompt::new("Is 7 even or odd?");
        let t = toks(&[("7", -0.1), (" is", -0.1), (" odd", -0.7)]);
        assert_eq!(span(&t, &p), [true, false, true]);
        // A yes or no is the answer, not a stop word.
        let t = toks(&[("Yes", -0.3), (".", -0.1)]);
        assert_eq!(span(&t, &p), [true, false]);
        // Nothing but stop words: every token.
        let t = toks(&[("It", -0.3), (" is", -0.1), (".", -0.1)]);
        assert_eq!(span(&t, &p), [true, true, true]);
        assert_eq!(features(&[], &p, false), None);
    }
}
