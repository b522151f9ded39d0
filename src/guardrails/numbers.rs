//! The numeric kinds: card numbers, SSNs and phone numbers.
//!
//! Ordinary prompts are full of numbers (years, prices, versions), so these kinds are found in
//! two steps. One pass over the bytes finds *numeric regions*: digit runs at most three separator
//! bytes apart (`(415) 555-2671` is one region, `2024` another). Only regions holding enough
//! digits for some kind (7 for a phone, 9 for an SSN, 13 for a card) are handed to that kind's
//! regex, and each regex match is then validated: the Luhn checksum, the never-issued SSN ranges,
//! the digit count of a phone shape, and isolation from neighbouring letters and digits.

use regex::Regex;

use super::builtin_regex;
use super::pii::{Finding, PiiKind};

/// Phone numbers, in four shapes (the digit count is checked afterwards, see `phone_ok`):
/// E.164-style `+CC ...`; NANP `(415) 555-2671` / `1-415-555-2671` / `415.555.2671` with
/// separators; national trunk-prefixed `020 7946 0958` / `(030) 123456`; and local `555-2671`.
const PHONE: &str = concat!(
    r"\+[1-9]\d{0,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d+)+",
    r"|(?:(?-u:\b)1[ .-]?)?(?:\([2-9]\d{2}\)[ .-]?|(?-u:\b)[2-9]\d{2}[ .-])\d{3}[ .-]\d{4}(?-u:\b)",
    r"|(?:(?-u:\b)0\d{1,4}|\(0\d{1,4}\))(?:[ .-]\d{2,8}){1,4}(?-u:\b)",
    r"|(?-u:\b)[2-9]\d{2}-\d{4}(?-u:\b)",
);

/// Runs of 3+ digit groups joined by single spaces or dashes: card-number candidates, split into
/// Luhn-checked windows by `find_cards`.
const CARD_RUN: &str = r"[0-9]{3,}(?:[ -][0-9]{3,})*";

const SSN: &str = r"(?-u:\b)\d{3}-\d{2}-\d{4}(?-u:\b)";

/// The compiled regexes of the enabled numeric kinds.
#[derive(Clone)]
pub(super) struct NumberFinder {
    phone: Option<Regex>,
    card: Option<Regex>,
    ssn: Option<Regex>,
}

/// The fewest digits a region needs for each kind.
const PHONE_MIN_DIGITS: usize = 7;
const SSN_DIGITS: usize = 9;
const CARD_MIN_DIGITS: usize = 13;

impl NumberFinder {
    /// The finder for whichever numeric kinds are in `kinds`, or `None` when none is.
    pub(super) fn new(kinds: &[PiiKind]) -> Option<NumberFinder> {
        let compile =
            |kind: PiiKind, pattern: &str| kinds.contains(&kind).then(|| builtin_regex(pattern));
        let finder = NumberFinder {
            phone: compile(PiiKind::Phone, PHONE),
            card: compile(PiiKind::CardNumber, CARD_RUN),
            ssn: compile(PiiKind::Ssn, SSN),
        };
        (finder.phone.is_some() || finder.card.is_some() || finder.ssn.is_some()).then_some(finder)
    }

    /// Appends every validated numeric finding in `text` to `out` (overlaps between kinds are
    /// left to the caller).
    pub(super) fn find(&self, text: &str, out: &mut Vec<Finding>) {
        let bytes = text.as_bytes();
        if count_digits(bytes) < PHONE_MIN_DIGITS {
            return;
        }
        for region in numeric_regions(bytes, PHONE_MIN_DIGITS) {
            if let (Some(re), true) = (&self.card, region.digits >= CARD_MIN_DIGITS) {
                find_cards(re, text, &region, out);
            }
            if let (Some(re), true) = (&self.ssn, region.digits >= SSN_DIGITS) {
                find_ssns(re, text, &region, out);
            }
            if let Some(re) = &self.phone {
                find_phones(re, text, &region, out);
            }
        }
    }
}

/// The number of ASCII digits in `bytes`, counted in blocks the compiler vectorises (a plain
/// `filter().count()` is ten times slower).
fn count_digits(bytes: &[u8]) -> usize {
    bytes
        .chunks(128)
        .map(|block| {
            let n = block
                .iter()
                .fold(0u8, |n, b| n + u8::from(b.wrapping_sub(b'0') < 10));
            usize::from(n)
        })
        .sum()
}

/// Bytes that may sit between the digit runs of one number: `+44 (0)20 7946-0958`.
fn is_separator(b: u8) -> bool {
    matches!(b, b' ' | b'-' | b'.' | b'(' | b')' | b'+')
}

/// `bytes[start..end]` (ASCII-delimited, so a valid `str` slice) holding `digits` digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    start: usize,
    end: usize,
    digits: usize,
}

/// The numeric regions of `bytes` holding at least `min_digits` digits. Each starts at its first
/// digit (or at a `+` or `(` right before it, which phone shapes begin with) and ends after its
/// last digit. Every regex match of this module lies inside one region: none of the patterns
/// allows more than three separator bytes between two digits.
fn numeric_regions(bytes: &[u8], min_digits: usize) -> Vec<Region> {
    let mut regions = Vec::new();
    let mut i = 0;
    while let Some(first) = next_digit(bytes, i) {
        i = first;
        let mut digits = 0;
        let end = loop {
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                digits += 1;
                i += 1;
            }
            let run_end = i;
            let mut j = i;
            while j < bytes.len() && j - run_end < 3 && is_separator(bytes[j]) {
                j += 1;
            }
            if j > run_end && bytes.get(j).is_some_and(u8::is_ascii_digit) {
                i = j;
            } else {
                break run_end;
            }
        };
        if digits >= min_digits {
            let mut start = first;
            while start > 0 && first - start < 2 && matches!(bytes[start - 1], b'+' | b'(') {
                start -= 1;
            }
            regions.push(Region { start, end, digits });
        }
        i = end;
    }
    regions
}

/// The index of the first digit at or after `from`, skipping digit-free 32-byte blocks with a
/// vectorisable test.
fn next_digit(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    let rest = bytes.get(from..)?;
    for block in rest.chunks(32) {
        if block.iter().fold(false, |any, b| any | b.is_ascii_digit()) {
            return block.iter().position(u8::is_ascii_digit).map(|p| at + p);
        }
        at += block.len();
    }
    None
}

/// The matches of `re` inside `region`, as offsets into the whole text.
fn matches_in<'t>(
    re: &'t Regex,
    text: &'t str,
    region: &Region,
) -> impl Iterator<Item = (usize, usize)> + 't {
    let base = region.start;
    re.find_iter(&text[region.start..region.end])
        .map(move |m| (base + m.start(), base + m.end()))
}

/// Whether `bytes[start..end]` stands alone as a number: no letter, digit or `_` touching it, and
/// no separator that continues a longer digit sequence (`2024-01-15`, `10.0.0.1`).
fn isolated(bytes: &[u8], start: usize, end: usize) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let sep = |b: u8| matches!(b, b'-' | b'.' | b'/');
    let before_ok = match start.checked_sub(1).map(|i| bytes[i]) {
        None => true,
        Some(b) if word(b) => false,
        Some(b) if sep(b) => !start
            .checked_sub(2)
            .is_some_and(|i| bytes[i].is_ascii_digit()),
        Some(_) => true,
    };
    let after_ok = match bytes.get(end) {
        None => true,
        Some(&b) if word(b) => false,
        Some(&b) if sep(b) => !bytes.get(end + 1).is_some_and(u8::is_ascii_digit),
        Some(_) => true,
    };
    before_ok && after_ok
}

/// The Luhn checksum over the digits of `s` (other bytes skipped).
fn luhn_valid(s: &[u8]) -> bool {
    let mut sum = 0u32;
    let mut double = false;
    for &b in s.iter().rev().filter(|b| b.is_ascii_digit()) {
        let mut d = u32::from(b - b'0');
        if double {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        double = !double;
    }
    sum.is_multiple_of(10)
}

/// Card numbers inside a digit run: the longest Luhn-valid window of whole groups holding 13-19
/// digits, not starting with 0, repeatedly (so `4111 1111 1111 1111 2025` yields the card
/// without the year).
fn find_cards(re: &Regex, text: &str, region: &Region, out: &mut Vec<Finding>) {
    let bytes = text.as_bytes();
    for (start, end) in matches_in(re, text, region) {
        if !isolated(bytes, start, end) {
            continue;
        }
        let groups: Vec<(usize, usize)> = digit_groups(bytes, start, end);
        let mut i = 0;
        while i < groups.len() {
            let mut best = None;
            let mut digits = 0;
            for (j, g) in groups.iter().enumerate().skip(i) {
                digits += g.1 - g.0;
                if digits > 19 {
                    break;
                }
                let span = &bytes[groups[i].0..g.1];
                if digits >= 13 && span[0] != b'0' && luhn_valid(span) {
                    best = Some(j);
                }
            }
            match best {
                Some(j) => {
                    out.push(Finding {
                        kind: PiiKind::CardNumber,
                        start: groups[i].0,
                        end: groups[j].1,
                    });
                    i = j + 1;
                }
                None => i += 1,
            }
        }
    }
}

/// The `(start, end)` of each maximal digit run in `bytes[start..end]`.
fn digit_groups(bytes: &[u8], start: usize, end: usize) -> Vec<(usize, usize)> {
    let mut groups = Vec::new();
    let mut run_start = None;
    for (i, b) in bytes.iter().enumerate().take(end).skip(start) {
        match (b.is_ascii_digit(), run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(s)) => {
                groups.push((s, i));
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run_start {
        groups.push((s, end));
    }
    groups
}

/// SSNs outside the never-assigned ranges: area 000, 666 or 900-999, group 00, serial 0000.
fn find_ssns(re: &Regex, text: &str, region: &Region, out: &mut Vec<Finding>) {
    let bytes = text.as_bytes();
    for (start, end) in matches_in(re, text, region) {
        let s = &bytes[start..end];
        let (area, group, serial) = (&s[0..3], &s[4..6], &s[7..11]);
        let valid = area != b"000"
            && area != b"666"
            && area[0] != b'9'
            && group != b"00"
            && serial != b"0000";
        if valid && isolated(bytes, start, end) {
            out.push(Finding {
                kind: PiiKind::Ssn,
                start,
                end,
            });
        }
    }
}

fn find_phones(re: &Regex, text: &str, region: &Region, out: &mut Vec<Finding>) {
    let bytes = text.as_bytes();
    for (start, end) in matches_in(re, text, region) {
        if phone_ok(&text[start..end]) && isolated(bytes, start, end) {
            out.push(Finding {
                kind: PiiKind::Phone,
                start,
                end,
            });
        }
    }
}

/// The digit count each phone shape needs: E.164 allows 7-15 digits; a trunk-prefixed national
/// number 9-12 (which keeps `01-15-2024` out); NANP and local shapes are fixed by the regex.
fn phone_ok(candidate: &str) -> bool {
    let digits = candidate.bytes().filter(u8::is_ascii_digit).count();
    if candidate.starts_with('+') {
        (7..=15).contains(&digits)
    } else if candidate.starts_with('0') || candidate.starts_with("(0") {
        (9..=12).contains(&digits)
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::guardrails::PiiDetector;

    fn masked(text: &str) -> String {
        PiiDetector::default().mask(text).0
    }

    fn kinds(text: &str) -> Vec<PiiKind> {
        PiiDetector::default()
            .detect(text)
            .into_iter()
            .map(|f| f.kind)
            .collect()
    }

    #[test]
    fn phone_numbers_in_common_formats_are_masked() {
        for phone in [
            "+1 415 555 2671",
            "+14155552671",
            "+44 20 7946 0958",
            "+44 (0)20 7946 0958",
            "+33 1 23 45 67 89",
            "(415) 555-2671",
            "415-555-2671",
            "415.555.2671",
            "1-800-555-0199",
            "020 7946 0958",
            "555-2671",
        ] {
            assert_eq!(
                masked(&format!("call me on {phone} today")),
                "call me on [PHONE] today",
                "{phone}"
            );
        }
    }

    #[test]
    fn years_dates_versions_and_short_numbers_are_not_phones() {
        for text in [
            "In 2024 we shipped 1500 units.",
            "The meeting is on 2024-01-15 at 10:30.",
            "Dates like 01-15-2024 and 15.01.2024 are not phone numbers.",
            "Upgrade to version 1.22.0.4567 now.",
            "The server is at 192.168.100.200.",
            "Order 12345678 ships tomorrow.",
            "+1 555",
            "call 555-2671x",
        ] {
            assert_eq!(masked(text), text);
        }
    }

    #[test]
    fn luhn_valid_card_numbers_are_masked() {
        for card in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "5500 0055 5555 5559",
            "3782 822463 10005",
            "6011111111111117",
        ] {
            assert_eq!(
                masked(&format!("card {card}, exp 12/27")),
                "card [CARD_NUMBER], exp 12/27"
            );
        }
        // The card is found inside a longer run of groups.
        assert_eq!(
            masked("pay with 4111 1111 1111 1111 2025 please"),
            "pay with [CARD_NUMBER] 2025 please"
        );
    }

    #[test]
    fn luhn_invalid_and_random_numbers_are_not_cards() {
        for text in [
            "order 4111111111111112",
            "order 1234 5678 9012 3456",
            "tracking 0000000000000000",
            "serial 49927398716123456789012",
            "account A4111111111111111",
        ] {
            assert_eq!(masked(text), text);
        }
        // Nine in ten random 16-digit numbers fail the check; these do.
        for n in ["8273645591827364", "1029384756473829", "5647382910293847"] {
            assert!(!luhn_valid(n.as_bytes()), "{n}");
            assert_eq!(masked(n), n);
        }
    }

    #[test]
    fn ssns_are_masked_except_never_issued_ranges() {
        assert_eq!(masked("SSN: 123-45-6789."), "SSN: [SSN].");
        assert_eq!(masked("ssn 078-05-1120"), "ssn [SSN]");
        for text in [
            "000-12-3456",
            "666-12-3456",
            "912-34-5678",
            "123-00-4567",
            "123-45-0000",
            "part 123-45-67890",
            "ref 9123-45-6789",
        ] {
            assert!(!kinds(text).contains(&PiiKind::Ssn), "{text}");
        }
    }

    #[test]
    fn regions_group_digit_runs_split_by_short_separators() {
        let text = "call +1 (415) 555-2671 in 2024, ref 12 34";
        let regions = numeric_regions(text.as_bytes(), 1);
        let spans: Vec<&str> = regions.iter().map(|r| &text[r.start..r.end]).collect();
        assert_eq!(spans, ["+1 (415) 555-2671", "2024", "12 34"]);
        assert_eq!(regions[0].digits, 11);
        assert!(numeric_regions(text.as_bytes(), 12).is_empty());
        assert_eq!(count_digits("a1b22c".repeat(100).as_bytes()), 300);
        assert_eq!(next_digit("x".repeat(70).as_bytes(), 0), None);
        assert_eq!(
            next_digit(format!("{}7", "x".repeat(70)).as_bytes(), 3),
            Some(70)
        );
    }
}
