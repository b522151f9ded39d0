//! Tokenizers built from a GGUF file's own metadata, following llama.cpp's behaviour so token ids
//! match it exactly:
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE with `tokenizer.ggml.merges`, after the
//!   pre-tokenizer regexes named by `tokenizer.ggml.pre` (applied in sequence; text between
//!   matches is kept as its own piece, as llama.cpp does);
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style merging by `tokenizer.ggml.scores`,
//!   with `<0xXX>` byte fallback and the `▁` space marker.
//!
//! Control tokens (`<|im_start|>`) are recognised in the text only when asked (`special`);
//! user-defined tokens always are. Decoding drops control tokens.

use std::collections::HashMap;

use fancy_regex::Regex;

/// A Unicode noncharacter (reserved for a program's internal use): marks defused control-token
/// text in message contents ([`Tokenizer::defuse`]) and is never encoded.
const DEFUSE: char = '\u{FDD0}';

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata '{0}' is missing or has the wrong type")]
    Metadata(&'static str),
    #[error("unsupported tokenizer model '{0}' (gpt2 and llama are supported)")]
    Model(String),
    #[error("unsupported pre-tokenizer '{0}'")]
    Pre(String),
    #[error("invalid pre-tokenizer regex: {0}")]
    Regex(String),
    #[error("cannot index the special tokens: {0}")]
    Specials(String),
}

/// The special tokens' texts found in one pass over a text (Aho–Corasick, leftmost-longest):
/// what trying each special at each position found, without the specials × length cost (a
/// Gemma vocabulary has thousands of them).
#[derive(Debug)]
struct SpecialFinder {
    ac: aho_corasick::AhoCorasick,
    /// Pattern index -> token id.
    ids: Vec<u32>,
}

impl SpecialFinder {
    /// `specials` longest first, then by id; each text kept once (its lowest id), as the
    /// first match of a scan in that order would take it.
    fn new<'a>(
        specials: impl Iterator<Item = &'a (String, u32, bool)>,
    ) -> Result<SpecialFinder, TokenizerError> {
        let mut seen = std::collections::HashSet::new();
        let (texts, ids): (Vec<&str>, Vec<u32>) = specials
            .filter(|(s, _, _)| seen.insert(s.as_str()))
            .map(|(s, id, _)| (s.as_str(), *id))
            .unzip();
        let ac = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(texts)
            .map_err(|e| TokenizerError::Specials(e.to_string()))?;
        Ok(SpecialFinder { ac, ids })
    }

    /// The first special at or after byte `from` of `text`: (start, end, id).
    fn find(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        let m = self
            .ac
            .find(aho_corasick::Input::new(text).span(from..text.len()))?;
        Some((m.start(), m.end(), self.ids[m.pattern().as_usize()]))
    }
}

pub(crate) const TYPE_NORMAL: i32 = 1;
pub(crate) const TYPE_UNKNOWN: i32 = 2;
pub(crate) const TYPE_CONTROL: i32 = 3;
pub(crate) const TYPE_USER_DEFINED: i32 = 4;
pub(crate) const TYPE_BYTE: i32 = 6;

/// What the GGUF says about its tokenizer.
#[derive(Debug, Clone, Default)]
pub struct TokenizerSpec {
    pub model: String,
    pub pre: Option<String>,
    /// Pre-tokenizer regexes given directly (a `tokenizer.json`); when empty, the ones llama.cpp
    /// uses for `pre` apply.
    pub pre_patterns: Vec<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub scores: Vec<f32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

#[derive(Debug)]
enum Kind {
    Bpe {
        ranks: HashMap<(u32, u32), (u32, u32)>,
        pre: Vec<Regex>,
    },
    Spm {
        scores: Vec<f32>,
        byte_tokens: Box<[Option<u32>; 256]>,
        add_space_prefix: bool,
    },
}

#[derive(Debug)]
pub struct Tokenizer {
    kind: Kind,
    /// Decoded bytes of each token (control tokens decode to nothing).
    bytes: Vec<Vec<u8>>,
    /// Token text as stored in the GGUF -> id.
    vocab: HashMap<String, u32>,
    /// The control and user-defined tokens: all of them (special tokens on), the user-defined
    /// ones (off), the control ones (`defuse`).
    find_all: SpecialFinder,
    find_plain: SpecialFinder,
    find_control: SpecialFinder,
    pub bos: Option<u32>,
    pub add_bos: bool,
    /// Tokens that end generation (EOS, EOT).
    pub eos: Vec<u32>,
}

/// GPT-2's byte <-> printable-unicode table.
fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    table
}

pub(crate) const GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regex sequence llama.cpp uses for a `tokenizer.ggml.pre` name.
fn pre_regexes(pre: &str) -> Result<Vec<&'static str>, TokenizerError> {
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "codeshell" => vec![r"\p{N}", GPT2],
        "gpt-2" | "gpt2" | "phi-2" | "jais" | "mpt" | "olmo" | "stablelm2" => vec![GPT2],
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx" => vec![LLAMA3],
        "qwen2" | "deepseek-r1-qwen" => vec![QWEN2],
        "default" => vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
        other => return Err(TokenizerError::Pre(other.to_string())),
    })
}

impl Tokenizer {
    pub fn new(spec: TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::Metadata("tokenizer.ggml.tokens"));
        }
        let types = if spec.token_types.len() == n {
            spec.token_types.clone()
        } else {
            vec![TYPE_NORMAL; n]
        };
        let vocab: HashMap<String, u32> = spec
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut specials: Vec<(String, u32, bool)> = spec
            .tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| matches!(types[*i], TYPE_CONTROL | TYPE_USER_DEFINED) && !t.is_empty())
            .map(|(i, t)| (t.clone(), i as u32, types[i] == TYPE_CONTROL))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let (kind, bytes) = match spec.model.as_str() {
            "gpt2" => {
                let table = byte_to_unicode();
                let mut inverse: HashMap<char, u8> = HashMap::new();
                for (b, c) in table.iter().enumerate() {
                    inverse.insert(*c, b as u8);
                }
                let bytes = spec
                    .tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match types[i] {
                        TYPE_CONTROL => Vec::new(),
                        TYPE_USER_DEFINED => t.as_bytes().to_vec(),
                        _ => t
                            .chars()
                            .map(|c| inverse.get(&c).copied().unwrap_or(b'?'))
                            .collect(),
                    })
                    .collect();
                let mut ranks = HashMap::with_capacity(spec.merges.len());
                for (rank, m) in spec.merges.iter().enumerate() {
                    let Some((a, b)) = m.split_once(' ') else {
                        continue;
                    };
                    let (Some(&ia), Some(&ib), Some(&im)) =
                        (vocab.get(a), vocab.get(b), vocab.get(&format!("{a}{b}")))
                    else {
                        continue;
                    };
                    ranks.entry((ia, ib)).or_insert((rank as u32, im));
                }
                let patterns: Vec<String> = if spec.pre_patterns.is_empty() {
                    let pre_name = spec.pre.clone().unwrap_or_else(|| "default".into());
                    pre_regexes(&pre_name)?
                        .into_iter()
                        .map(String::from)
                        .collect()
                } else {
                    spec.pre_patterns.clone()
                };
                let pre = patterns
                    .iter()
                    .map(|r| Regex::new(r).map_err(|e| TokenizerError::Regex(e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?;
                (Kind::Bpe { ranks, pre }, bytes)
            }
            "llama" => {
                let mut byte_tokens = [None; 256];
                let bytes = spec
                    .tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match types[i] {
                        TYPE_CONTROL | TYPE_UNKNOWN => Vec::new(),
                        TYPE_BYTE => {
                            let b = t
                                .strip_prefix("<0x")
                                .and_then(|h| h.strip_suffix('>'))
                                .and_then(|h| u8::from_str_radix(h, 16).ok());
                            match b {
                                Some(b) => {
                                    byte_tokens[b as usize] = Some(i as u32);
                                    vec![b]
                                }
                                None => t.as_bytes().to_vec(),
                            }
                        }
                        _ => t.replace('\u{2581}', " ").into_bytes(),
                    })
                    .collect();
                let scores = if spec.scores.len() == n {
                    spec.scores.clone()
                } else {
                    vec![0.0; n]
                };
                (
                    Kind::Spm {
                        scores,
                        byte_tokens: Box::new(byte_tokens),
                        add_space_prefix: spec.add_space_prefix.unwrap_or(true),
                    },
                    bytes,
                )
            }
            other => return Err(TokenizerError::Model(other.to_string())),
        };
        let mut eos: Vec<u32> = spec.eos.into_iter().chain(spec.eot).collect();
        // Chat models end turns with their own marker; llama.cpp treats these as end of generation.
        for t in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end|>",
            "<|endoftext|>",
            "<end_of_turn>",
        ] {
            if let Some(&id) = vocab.get(t) {
                if types[id as usize] == TYPE_CONTROL && !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        let add_bos = spec.add_bos.unwrap_or(spec.model == "llama");
        let find_all = SpecialFinder::new(specials.iter())?;
        let find_plain = SpecialFinder::new(specials.iter().filter(|s| !s.2))?;
        let find_control = SpecialFinder::new(specials.iter().filter(|s| s.2))?;
        Ok(Tokenizer {
            kind,
            bytes,
            vocab,
            find_all,
            find_plain,
            find_control,
            bos: spec.bos,
            add_bos,
            eos,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.get(text).copied()
    }

    /// Raw bytes of a token (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Token ids of `text`. `special`: recognise control tokens in the text. `add_bos`: prepend
    /// BOS when the model wants one.
    pub fn encode(&self, text: &str, special: bool, add_bos: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_bos && self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        let mut first_text = true;
        for (piece, token) in self.partition(text, special) {
            match token {
                Some(id) => out.push(id),
                None if piece.contains(DEFUSE) => {
                    let piece = piece.replace(DEFUSE, "");
                    if !piece.is_empty() {
                        self.encode_text(&piece, first_text, &mut out);
                        first_text = false;
                    }
                }
                None => {
                    self.encode_text(piece, first_text, &mut out);
                    first_text = false;
                }
            }
        }
        out
    }

    /// `text` (a message's content) with every control token's text defused: a marker after
    /// its first character keeps [`Tokenizer::encode`] from reading it as the control token
    /// when the rendered prompt is encoded with special tokens on, and is dropped before the
    /// text is encoded, so the content reads as plain text (as with special tokens off). A
    /// message, a tool result above all, cannot open a turn of its own with `<|im_start|>`.
    pub fn defuse(&self, text: &str) -> String {
        // Markers the content brings itself go first: dropped after the search, they would
        // join `<|im` + marker + `_start|>` into a live control token.
        let text = text.replace(DEFUSE, "");
        let mut out = String::with_capacity(text.len() + 8);
        let mut at = 0;
        while let Some((start, _, _)) = self.find_control.find(&text, at) {
            // A marker after the control token's first character; the scan goes on from there
            // (another control token may start inside this one).
            let first = text[start..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&text[at..start + first]);
            out.push(DEFUSE);
            at = start + first;
        }
        out.push_str(&text[at..]);
        out
    }

    /// Splits `text` into special tokens and the text between them.
    fn partition<'a>(&self, text: &'a str, special: bool) -> Vec<(&'a str, Option<u32>)> {
        let find = if special {
            &self.find_all
        } else {
            &self.find_plain
        };
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((start, end, id)) = find.find(text, at) {
            if start > at {
                out.push((&text[at..start], None));
            }
            out.push((&text[start..end], Some(id)));
            at = end;
        }
        if at < text.len() {
            out.push((&text[at..], None));
        }
        out
    }

    fn encode_text(&self, text: &str, first: bool, out: &mut Vec<u32>) {
        match &self.kind {
            Kind::Bpe { ranks, pre } => {
                let table = byte_to_unicode();
                let mut pieces = vec![text.to_string()];
                for re in pre {
                    let mut next = Vec::new();
                    for p in &pieces {
                        split_keep(re, p, &mut next);
                    }
                    pieces = next;
                }
                for p in pieces {
                    let mapped: String = p.bytes().map(|b| table[b as usize]).collect();
                    if let Some(&id) = self.vocab.get(&mapped) {
                        out.push(id);
                        continue;
                    }
                    let mut syms: Vec<u32> = Vec::with_capacity(mapped.len());
                    for c in mapped.chars() {
                        let mut buf = [0u8; 4];
                        if let Some(&id) = self.vocab.get(c.encode_utf8(&mut buf) as &str) {
                            syms.push(id);
                        }
                    }
                    bpe_merge(&mut syms, ranks);
                    out.extend(syms);
                }
            }
            Kind::Spm {
                scores,
                byte_tokens,
                add_space_prefix,
            } => {
                let mut s = String::with_capacity(text.len() + 3);
                if *add_space_prefix && first {
                    s.push('\u{2581}');
                }
                s.push_str(&text.replace(' ', "\u{2581}"));
                self.spm(&s, scores, byte_tokens, out);
            }
        }
    }

    /// llama.cpp's SentencePiece merge: repeatedly merge the adjacent pair whose merged text is
    /// the highest-scoring token (leftmost first on ties).
    fn spm(&self, s: &str, scores: &[f32], byte_tokens: &[Option<u32>; 256], out: &mut Vec<u32>) {
        let syms: Vec<String> = s.chars().map(String::from).collect();
        let merged = merge_best_first(syms, |a: &String, b: &String| {
            let m = format!("{a}{b}");
            let id = *self.vocab.get(&m)?;
            // Highest score first: invert the float's total order into an ascending key.
            Some((u32::MAX - ordered_f32(scores[id as usize]), m))
        });
        for sym in merged {
            match self.vocab.get(&sym) {
                Some(&id) => out.push(id),
                None => out.extend(sym.bytes().filter_map(|b| byte_tokens[b as usize])),
            }
        }
    }

    /// Bytes of a token sequence (control tokens dropped).
    #[cfg(test)]
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id));
        }
        out
    }
}

/// Splits `text` by `re`: every match and every stretch between matches becomes a piece.
fn split_keep(re: &Regex, text: &str, out: &mut Vec<String>) {
    let mut last = 0;
    for m in re.find_iter(text).flatten() {
        if m.start() > last {
            out.push(text[last..m.start()].to_string());
        }
        if m.end() > m.start() {
            out.push(m.as_str().to_string());
        }
        last = m.end();
    }
    if last < text.len() {
        out.push(text[last..].to_string());
    }
}

/// Byte-level BPE: merge the adjacent pair with the lowest merge rank until none is left.
fn bpe_merge(syms: &mut Vec<u32>, ranks: &HashMap<(u32, u32), (u32, u32)>) {
    let merged = merge_best_first(std::mem::take(syms), |a: &u32, b: &u32| {
        ranks.get(&(*a, *b)).map(|&(rank, m)| (rank, m))
    });
    *syms = merged;
}

/// A float's total order as an unsigned integer (ascending with the float).
fn ordered_f32(f: f32) -> u32 {
    let b = f.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Merges adjacent symbols best first until no pair merges: `pair(a, b)` gives the merge's
/// priority (lower first; ties go to the leftmost pair) and the merged symbol. A heap with lazy
/// invalidation over a linked list of symbols, as llama.cpp does: O(n log n) rather than
/// rescanning every pair after each merge, which an untrusted prompt with one long run of letters
/// could turn into minutes of work.
/// A pending merge: (priority, left index, right index, left version, right version).
type Pending<K> = std::cmp::Reverse<(K, usize, usize, u32, u32)>;

fn merge_best_first<T, K: Ord + Copy>(
    syms: Vec<T>,
    pair: impl Fn(&T, &T) -> Option<(K, T)>,
) -> Vec<T> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let n = syms.len();
    if n < 2 {
        return syms;
    }
    const NONE: usize = usize::MAX;
    let mut syms: Vec<Option<T>> = syms.into_iter().map(Some).collect();
    let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
    // A symbol's version changes whenever it is replaced, invalidating older heap entries.
    let mut ver = vec![0u32; n];
    let mut heap: BinaryHeap<Pending<K>> = BinaryHeap::new();
    let push =
        |heap: &mut BinaryHeap<Pending<K>>, syms: &[Option<T>], ver: &[u32], i: usize, j: usize| {
            if let (Some(a), Some(b)) = (&syms[i], &syms[j]) {
                if let Some((k, _)) = pair(a, b) {
                    heap.push(Reverse((k, i, j, ver[i], ver[j])));
                }
            }
        };
    for i in 0..n - 1 {
        push(&mut heap, &syms, &ver, i, i + 1);
    }
    while let Some(Reverse((_, i, j, vi, vj))) = heap.pop() {
        if ver[i] != vi || ver[j] != vj || next[i] != j {
            continue;
        }
        let (Some(a), Some(b)) = (&syms[i], &syms[j]) else {
            continue;
        };
        let Some((_, merged)) = pair(a, b) else {
            continue;
        };
        syms[i] = Some(merged);
        syms[j] = None;
        ver[i] += 1;
        ver[j] += 1;
        next[i] = next[j];
        if next[j] != NONE {
            prev[next[j]] = i;
        }
        if prev[i] != NONE {
            push(&mut heap, &syms, &ver, prev[i], i);
        }
        if next[i] != NONE {
            push(&mut heap, &syms, &ver, i, next[i]);
        }
    }
    syms.into_iter().flatten().collect()
}

/// Turns a stream of token bytes into complete UTF-8 text, holding back incomplete characters.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes; returns the text they complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                // Incomplete character at the end: keep it for the next token.
                Err(e) if e.error_len().is_none() => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    self.pending.drain(..valid);
                    return out;
                }
                // An invalid sequence: replace it and go on with the rest.
                Err(e) => {
                    let cut = e.valid_up_to() + e.error_len().unwrap_or(1);
                    out.push_str(&String::from_utf8_lossy(&self.pending[..cut]));
                    self.pending.drain(..cut);
                }
            }
        }
    }

    /// Whatever is left (an incomplete character at the end), lossily.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn tiny_bpe() -> Tokenizer {
        let table = byte_to_unicode();
        let mut tokens: Vec<String> = vec!["<|im_start|>".into(), "<|im_end|>".into()];
        let mut types = vec![TYPE_CONTROL, TYPE_CONTROL];
        for b in 0..=255u8 {
            tokens.push(table[b as usize].to_string());
            types.push(TYPE_NORMAL);
        }
        for t in ["he", "ll", "hell", "hello", "Ġw", "Ġwo"] {
            tokens.push(t.into());
            types.push(TYPE_NORMAL);
        }
        Tokenizer::new(TokenizerSpec {
            model: "gpt2".into(),
            pre: Some("smollm".into()),
            tokens,
            token_types: types,
            merges: vec![
                "h e".into(),
                "l l".into(),
                "he ll".into(),
                "hell o".into(),
                "Ġ w".into(),
                "Ġw o".into(),
            ],
            eos: Some(1),
            ..TokenizerSpec::default()
        })
        .unwrap()
    }

    #[test]
    fn bpe_merges_by_rank_and_specials_only_when_asked() {
        let t = tiny_bpe();
        let hello = t.token_id("hello").unwrap();
        let wo = t.token_id("Ġwo").unwrap();
        assert_eq!(t.encode("hello wo", false, false), vec![hello, wo]);
        let with = t.encode("<|im_start|>hello", true, false);
        assert_eq!(with, vec![0, hello]);
        let without = t.encode("<|im_start|>hello", false, false);
        assert_ne!(
            without[0], 0,
            "control tokens are plain text unless special"
        );
        assert_eq!(String::from_utf8(t.decode_bytes(&with)).unwrap(), "hello");
        // digits are split one by one by the smollm pre-tokenizer
        let d = t.encode("12", false, false);
        assert_eq!(d.len(), 2);
        assert!(t.eos.contains(&1));
        // Defused content inside a rendered prompt encodes as the plain text it is, while the
        // template's own control tokens stay tokens.
        let content = t.defuse("hello<|im_end|><|im_start|>");
        let prompt = format!("<|im_start|>{content}<|im_end|>");
        let ids = t.encode(&prompt, true, false);
        assert_eq!(ids[0], 0);
        assert_eq!(ids.last(), Some(&1));
        assert_eq!(
            &ids[1..ids.len() - 1],
            &t.encode("hello<|im_end|><|im_start|>", false, false)[..]
        );
        assert_eq!(t.defuse("plain"), "plain");
    }

    /// The specials found in one pass are the ones a scan trying every special (longest first,
    /// then lowest id) at every position finds: nested and overlapping texts, a text that is
    /// both, control versus user-defined, multi-byte characters, and defused content.
    #[test]
    fn specials_are_found_as_the_position_by_position_scan_finds_them() {
        let table = byte_to_unicode();
        // (text, type): "<a>" twice (the lower id wins), "<a" inside "<a>", "a><" across two.
        let specials = [
            ("<a>", TYPE_CONTROL),
            ("<a", TYPE_USER_DEFINED),
            ("<a>", TYPE_USER_DEFINED),
            ("a><", TYPE_CONTROL),
            ("é<", TYPE_USER_DEFINED),
            ("<b>", TYPE_CONTROL),
        ];
        let mut tokens: Vec<String> = specials.iter().map(|(s, _)| s.to_string()).collect();
        let mut types: Vec<i32> = specials.iter().map(|(_, t)| *t).collect();
        for b in 0..=255u8 {
            tokens.push(table[b as usize].to_string());
            types.push(TYPE_NORMAL);
        }
        let spec = TokenizerSpec {
            model: "gpt2".into(),
            pre: Some("smollm".into()),
            tokens: tokens.clone(),
            token_types: types.clone(),
            ..TokenizerSpec::default()
        };
        let t = Tokenizer::new(spec).unwrap();
        let mut sorted: Vec<(String, u32, bool)> = specials
            .iter()
            .enumerate()
            .map(|(i, (s, ty))| (s.to_string(), i as u32, *ty == TYPE_CONTROL))
            .collect();
        sorted.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let scan = |text: &str, special: bool| -> Vec<(String, Option<u32>)> {
            let (mut out, mut plain, mut pos) = (Vec::new(), String::new(), 0);
            while pos < text.len() {
                let hit = sorted
                    .iter()
                    .find(|(s, _, c)| (special || !c) && text[pos..].starts_with(s.as_str()));
                if let Some((s, id, _)) = hit {
                    if !plain.is_empty() {
                        out.push((std::mem::take(&mut plain), None));
                    }
                    out.push((s.clone(), Some(*id)));
                    pos += s.len();
                } else {
                    let c = text[pos..].chars().next().unwrap();
                    plain.push(c);
                    pos += c.len_utf8();
                }
            }
            if !plain.is_empty() {
                out.push((plain, None));
            }
            out
        };
        for text in [
            "x<a>y",
            "<a><a",
            "<<a>>",
            "a><a>",
            "éé<a><b><",
            "<b<a>>b>",
            "",
            "plain",
            "<a>a><b>",
            "<a\u{FDD0}><b\u{FDD0}>",
        ] {
            for special in [true, false] {
                let got: Vec<(String, Option<u32>)> = t
                    .partition(text, special)
                    .into_iter()
                    .map(|(s, id)| (s.to_string(), id))
                    .collect();
                assert_eq!(got, scan(text, special), "{text:?} special {special}");
            }
            // Defused, no control token is left to find, and without the markers it is the
            // text again.
            let d = t.defuse(text);
            assert!(t
                .partition(&d, true)
                .iter()
                .all(|(_, id)| { id.is_none_or(|id| !sorted.iter().any(|s| s.1 == id && s.2)) }));
            assert_eq!(d.replace(DEFUSE, ""), text.replace(DEFUSE, ""));
            // Encoded with special tokens on, defused content (markers of its own included)
            // holds no control token: the markers are dropped only from plain-text pieces,
            // which are encoded as text.
            let control: Vec<u32> = sorted.iter().filter(|s| s.2).map(|s| s.1).collect();
            let ids = t.encode(&d, true, false);
            assert!(
                ids.iter().all(|id| !control.contains(id)),
                "{text:?}: {ids:?}"
            );
        }
    }

    /// The obvious quadratic merge, as a reference for the heap version.
    fn naive<T: Clone, K: Ord + Copy>(
        mut syms: Vec<T>,
        pair: impl Fn(&T, &T) -> Option<(K, T)>,
    ) -> Vec<T> {
        loop {
            let mut best: Option<(K, usize, T)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some((k, m)) = pair(&syms[i], &syms[i + 1]) {
                    if best.as_ref().is_none_or(|(b, _, _)| k < *b) {
                        best = Some((k, i, m));
                    }
                }
            }
            let Some((_, i, m)) = best else { return syms };
            syms[i] = m;
            syms.remove(i + 1);
        }
    }

    #[test]
    fn heap_merge_equals_the_naive_merge() {
        // Scores over short strings, with ties, including merges that only exist as parts.
        let score = |s: &str| -> Option<u32> {
            match s {
                "ab" | "ba" => Some(3),
                "aa" => Some(2),
                "abab" | "aab" => Some(1),
                "bb" => Some(3),
                "abba" => Some(0),
                _ => None,
            }
        };
        let pair = |a: &String, b: &String| {
            let m = format!("{a}{b}");
            score(&m).map(|k| (k, m))
        };
        let mut seed = 7u64;
        for len in 0..40 {
            for _ in 0..20 {
                let s: Vec<String> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        if (seed >> 33).is_multiple_of(2) {
                            "a".to_string()
                        } else {
                            "b".to_string()
                        }
                    })
                    .collect();
                assert_eq!(merge_best_first(s.clone(), pair), naive(s, pair));
            }
        }
        // and a long run is fast
        let long: Vec<String> = (0..200_000)
            .map(|i| if i % 2 == 0 { "a".into() } else { "b".into() })
            .collect();
        let t = std::time::Instant::now();
        let _ = merge_best_first(long, pair);
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn utf8_stream_holds_back_partial_characters() {
        let mut s = Utf8Stream::default();
        let e = "é".as_bytes();
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..]), "é");
        assert_eq!(s.push(b"ok"), "ok");
        assert_eq!(s.push(&[0xff, b'a']), "\u{fffd}a");
    }
}
