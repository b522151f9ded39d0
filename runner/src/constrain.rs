//! Constrained decoding: an answer that must be JSON (any object, or valid against a schema) is
//! generated under a grammar, so each step may only pick tokens that keep it valid. The
//! automaton and the per-step token masks are llguidance's (the library llama.cpp, vLLM and
//! SGLang use), over this model's own vocabulary; this file builds its tokenizer view once per
//! model and checks a schema against the subset corral documents before compiling it.
//!
//! The supported JSON Schema subset (docs/serving.md): `type`, `properties`, `required`,
//! `additionalProperties`, `enum`, `const`, `items`, `prefixItems`, `minItems`, `maxItems`,
//! `anyOf`, `oneOf`, `allOf`, `minLength`, `maxLength`, `pattern`, `format`, `minimum`,
//! `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `multipleOf`, local `$ref` with `$defs` /
//! `definitions`, and the annotations `title`, `description`, `default`, `examples`, `$schema`,
//! `$id`, `$comment`. Any other key in a schema object is refused by name: a misspelt or unknown
//! keyword would otherwise be ignored and the answer constrained less than the caller thinks.

use std::sync::Arc;

use corral_protocol::OutputConstraint;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;

use crate::tokenizer::Tokenizer;

pub use corral_protocol::check_schema;

/// The grammar side of one model: its vocabulary as llguidance sees it.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// Builds the token trie from the tokenizer: each token's bytes; control tokens (which have
    /// no bytes) marked special, so their text can never appear inside a JSON string.
    pub fn new(tok: &Tokenizer) -> Result<Grammars, String> {
        let n = tok.vocab_size();
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let b = tok.token_bytes(id);
                if b.is_empty() {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(format!("<[{id}]>").as_bytes());
                    w
                } else {
                    b.to_vec()
                }
            })
            .collect();
        Grammars::from_words(&words, &tok.eos)
    }

    /// From each token's bytes (special tokens marked) and the end-of-sequence tokens.
    fn from_words(words: &[Vec<u8>], eos: &[u32]) -> Result<Grammars, String> {
        let first = eos
            .first()
            .copied()
            .ok_or("the tokenizer has no end-of-sequence token")?;
        let info = TokRxInfo::new(words.len() as u32, first);
        let trie = TokTrie::from(&info, words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// A vocabulary of the 256 single bytes (token id = byte) and an end-of-sequence token
    /// (256): enough to test a grammar on any text.
    #[cfg(test)]
    pub fn bytes_for_tests() -> Grammars {
        let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        words.push(vec![TokTrie::SPECIAL_TOKEN_MARKER, b'e', b'o', b's']);
        #[allow(clippy::unwrap_used)]
        Grammars::from_words(&words, &[256]).unwrap()
    }

    /// A matcher for a grammar in llguidance's Lark dialect (tool calls).
    pub fn lark_matcher(&self, grammar: &str) -> Result<Matcher, String> {
        self.build(
            TopLevelGrammar::from_lark(grammar.to_string()),
            "the tools' grammar",
        )
    }

    fn build(&self, g: TopLevelGrammar, what: &str) -> Result<Matcher, String> {
        let parser = self
            .factory
            .create_parser(g)
            .map_err(|e| format!("{what} cannot be enforced: {e}"))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(format!("{what} cannot be enforced: {e}"));
        }
        Ok(m)
    }

    /// A matcher for one answer. A schema outside the supported subset, or one llguidance
    /// cannot compile, is an error naming why.
    pub fn matcher(&self, c: &OutputConstraint) -> Result<Matcher, String> {
        self.build(
            TopLevelGrammar::from_json_schema(schema_of(c)?),
            "the JSON schema",
        )
    }
}

/// The schema an answer under `c` is generated under: checked against the subset, compact.
pub fn schema_of(c: &OutputConstraint) -> Result<Value, String> {
    let mut schema = match c {
        OutputConstraint::JsonObject => serde_json::json!({"type": "object"}),
        OutputConstraint::JsonSchema { schema } => {
            check_schema(schema)?;
            match schema {
                Value::Bool(true) => serde_json::json!({}),
                Value::Bool(false) => return Err("the schema `false` admits no answer".into()),
                s => s.clone(),
            }
        }
    };
    close_objects(&mut schema);
    compact(&mut schema);
    Ok(schema)
}

/// Objects that list their `properties` and say nothing of `additionalProperties` get only
/// those properties. The answer is still valid against the caller's schema (it is one of the
/// instances the schema admits); without this a small model fills an open object with keys
/// of its own invention until `max_tokens`. An object whose properties combine with others'
/// is left open, and so are those others: one beside `anyOf`/`oneOf`/`allOf`/`$ref`, and the
/// branches of such an object (closing either would reject the other's properties).
pub fn close_objects(schema: &mut Value) {
    const COMBINERS: [&str; 4] = ["anyOf", "oneOf", "allOf", "$ref"];
    fn walk(v: &mut Value, combined: bool) {
        let Some(obj) = v.as_object_mut() else {
            return;
        };
        let has_props = obj.contains_key("properties");
        let combines = COMBINERS.iter().any(|k| obj.contains_key(*k));
        if !combined && has_props && !combines && !obj.contains_key("additionalProperties") {
            obj.insert("additionalProperties".into(), Value::Bool(false));
        }
        for (k, sub) in obj.iter_mut() {
            match k.as_str() {
                "properties" | "$defs" | "definitions" => {
                    for s in sub.as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
                        walk(s, false);
                    }
                }
                "items" | "additionalProperties" => walk(sub, false),
                "prefixItems" => {
                    for s in sub.as_array_mut().into_iter().flatten() {
                        walk(s, false);
                    }
                }
                // A branch is combined with its parent's properties, and `allOf`'s with each
                // other.
                "anyOf" | "oneOf" | "allOf" => {
                    let joint = has_props || combined || k == "allOf";
                    for s in sub.as_array_mut().into_iter().flatten() {
                        walk(s, joint);
                    }
                }
                _ => {}
            }
        }
    }
    walk(schema, false);
}

/// Compact JSON (no free whitespace between tokens): the model cannot spend its token budget
/// on indentation, and the answer is what the caller parses anyway.
pub fn compact(schema: &mut Value) {
    if schema.is_object() {
        JsonCompileOptions {
            whitespace_flexible: false,
            ..JsonCompileOptions::default()
        }
        .apply_to(schema);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::check_schema;
    use serde_json::json;

    #[test]
    fn keys_outside_the_subset_are_named_where_they_are() {
        let ok = json!({"type": "object", "title": "t", "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1},
            "n": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]}},
            "required": ["tags"], "additionalProperties": false});
        assert_eq!(check_schema(&ok), Ok(()));
        let bad = json!({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": true}}});
        let e = check_schema(&bad).unwrap_err();
        assert!(
            e.contains("'uniqueItems'") && e.contains("/properties/tags"),
            "{e}"
        );
        let typo = json!({"type": "string", "maxLenght": 3});
        // Objects listing properties are closed; free objects and allOf parts stay open.
        let mut s = json!({"type": "object", "properties": {"a": {"type": "object",
            "properties": {"b": {"type": "string"}}}, "free": {"type": "object"},
            "both": {"allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]},
            "open": {"properties": {}, "additionalProperties": true}}});
        super::close_objects(&mut s);
        assert_eq!(s["additionalProperties"], json!(false));
        assert_eq!(s["properties"]["a"]["additionalProperties"], json!(false));
        assert!(s["properties"]["free"]
            .get("additionalProperties")
            .is_none());
        assert!(s["properties"]["both"]["allOf"][0]
            .get("additionalProperties")
            .is_none());
        assert_eq!(s["properties"]["open"]["additionalProperties"], json!(true));
        assert!(check_schema(&typo).unwrap_err().contains("'maxLenght'"));
        assert!(check_schema(&json!("string")).is_err());
    }
}
