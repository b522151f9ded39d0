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
        let eos = tok
            .eos
            .first()
            .copied()
            .ok_or("the tokenizer has no end-of-sequence token")?;
        let info = TokRxInfo::new(n as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&tok.eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// A matcher for one answer. A schema outside the supported subset, or one llguidance
    /// cannot compile, is an error naming why.
    pub fn matcher(&self, c: &OutputConstraint) -> Result<Matcher, String> {
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
        // Compact JSON (no free whitespace between tokens): the model cannot spend its token
        // budget on indentation, and the answer is what the caller parses anyway.
        if schema.is_object() {
            JsonCompileOptions {
                whitespace_flexible: false,
                ..JsonCompileOptions::default()
            }
            .apply_to(&mut schema);
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| format!("the JSON schema cannot be enforced: {e}"))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(format!("the JSON schema cannot be enforced: {e}"));
        }
        Ok(m)
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
        assert!(check_schema(&typo).unwrap_err().contains("'maxLenght'"));
        assert!(check_schema(&json!("string")).is_err());
    }
}
