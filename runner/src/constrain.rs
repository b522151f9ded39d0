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

/// Keys a schema object may have.
const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "const",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "anyOf",
    "oneOf",
    "allOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "$ref",
    "$defs",
    "definitions",
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
];

/// Checks every schema object in `schema` against [`KEYWORDS`]; the error names the first
/// other key and where it is (a JSON pointer).
pub fn check_schema(schema: &Value) -> Result<(), String> {
    fn walk(v: &Value, at: &str) -> Result<(), String> {
        let Some(obj) = v.as_object() else {
            return match v {
                Value::Bool(_) => Ok(()),
                _ => Err(format!("{}: a schema must be an object", pointer(at))),
            };
        };
        for (k, sub) in obj {
            if !KEYWORDS.contains(&k.as_str()) {
                return Err(format!(
                    "JSON Schema keyword '{k}' at {} is not supported for local constrained decoding (see docs/serving.md for the subset)",
                    pointer(at)
                ));
            }
            let here = format!("{at}/{k}");
            match k.as_str() {
                "properties" | "$defs" | "definitions" => {
                    for (name, s) in sub.as_object().into_iter().flatten() {
                        walk(s, &format!("{here}/{name}"))?;
                    }
                }
                "items" | "additionalProperties" => walk(sub, &here)?,
                "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                    for (i, s) in sub.as_array().into_iter().flatten().enumerate() {
                        walk(s, &format!("{here}/{i}"))?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
    fn pointer(at: &str) -> String {
        if at.is_empty() {
            "the schema's root".into()
        } else {
            format!("'{at}'")
        }
    }
    walk(schema, "")
}

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
/// of its own invention until `max_tokens`. An object combined with others by `allOf` is left
/// open (closing each part would reject the others' properties).
pub fn close_objects(schema: &mut Value) {
    fn walk(v: &mut Value, in_all_of: bool) {
        let Some(obj) = v.as_object_mut() else {
            return;
        };
        if !in_all_of
            && obj.contains_key("properties")
            && !obj.contains_key("additionalProperties")
            && !obj.contains_key("allOf")
        {
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
                "anyOf" | "oneOf" | "prefixItems" | "allOf" => {
                    for s in sub.as_array_mut().into_iter().flatten() {
                        walk(s, k == "allOf");
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
