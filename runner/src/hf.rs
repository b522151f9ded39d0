//! Hugging Face checkpoint metadata: `tokenizer.json` (+ `tokenizer_config.json`, `config.json`)
//! turned into the same [`TokenizerSpec`] a GGUF's metadata gives, and the chat template.
//!
//! Supported: BPE models, either byte-level (GPT-2 style: SmolLM, Llama 3, Qwen2; the
//! pre-tokenizer's `Split` regexes, `Digits` and `ByteLevel` steps are honoured) or
//! SentencePiece-style with byte fallback (Llama 2, TinyLlama, Mistral, Phi-3: merge priority
//! from the merge list's order, `<0xNN>` byte tokens, the `▁` prefix from the normalizer or
//! `Metaspace`). Anything else is refused with the name of what is not supported.

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

use crate::tokenizer::{
    TokenizerSpec, GPT2, TYPE_BYTE, TYPE_CONTROL, TYPE_NORMAL, TYPE_USER_DEFINED,
};

/// `"text"` or `{"content": "text", ...}` (both forms appear in `tokenizer_config.json`).
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

fn has_type(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(o) => {
            o.get("type").and_then(Value::as_str) == Some(ty)
                || ["pretokenizers", "normalizers", "decoders"]
                    .iter()
                    .filter_map(|k| o.get(*k).and_then(Value::as_array))
                    .flatten()
                    .any(|x| has_type(x, ty))
        }
        _ => false,
    }
}

/// The regexes a byte-level pre-tokenizer splits with, in order.
fn pre_patterns(pre: &Value, out: &mut Vec<String>) -> anyhow::Result<()> {
    if pre.is_null() {
        return Ok(());
    }
    let ty = pre.get("type").and_then(Value::as_str).unwrap_or_default();
    match ty {
        "Sequence" => {
            for p in pre
                .get("pretokenizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                pre_patterns(p, out)?;
            }
        }
        "Split" => {
            let pat = &pre["pattern"];
            if let Some(r) = pat.get("Regex").and_then(Value::as_str) {
                out.push(r.to_string());
            } else if let Some(s) = pat.get("String").and_then(Value::as_str) {
                out.push(fancy_regex::escape(s).into_owned());
            } else {
                bail!("tokenizer.json: a Split pre-tokenizer without a pattern");
            }
            let behavior = pre.get("behavior").and_then(Value::as_str);
            if !matches!(behavior, None | Some("Isolated")) {
                bail!(
                    "tokenizer.json: Split behavior {:?} is not supported (Isolated is)",
                    behavior.unwrap_or_default()
                );
            }
        }
        "Digits" => out.push(
            if pre["individual_digits"].as_bool().unwrap_or(false) {
                r"\p{N}"
            } else {
                r"\p{N}+"
            }
            .to_string(),
        ),
        "ByteLevel" => {
            if pre["use_regex"].as_bool().unwrap_or(true) {
                out.push(GPT2.to_string());
            }
        }
        other => bail!("tokenizer.json: pre-tokenizer {other:?} is not supported"),
    }
    Ok(())
}

/// The tokenizer and chat template of a checkpoint directory's JSON files.
pub fn tokenizer(
    tokenizer_json: &str,
    tokenizer_config: Option<&str>,
    config: &Value,
) -> anyhow::Result<(TokenizerSpec, Option<String>)> {
    let tj: Value = serde_json::from_str(tokenizer_json).context("tokenizer.json")?;
    let tc: Value = match tokenizer_config {
        Some(t) => serde_json::from_str(t).context("tokenizer_config.json")?,
        None => Value::Null,
    };
    let model = &tj["model"];
    let mtype = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
    if mtype != "BPE" {
        bail!("tokenizer.json: model type {mtype:?} is not supported (BPE is)");
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| anyhow!("tokenizer.json: model.vocab is missing"))?;
    let added: Vec<&Value> = tj["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let id_of = |v: &Value| v.as_u64().and_then(|i| usize::try_from(i).ok());
    let n = vocab
        .values()
        .filter_map(id_of)
        .chain(added.iter().filter_map(|a| id_of(&a["id"])))
        .max()
        .map_or(0, |m| m + 1);
    if n == 0 || n > 4_000_000 {
        bail!("tokenizer.json: vocabulary of {n} tokens");
    }
    let mut tokens = vec![String::new(); n];
    let mut types = vec![TYPE_NORMAL; n];
    for (text, id) in vocab {
        let id = id_of(id).ok_or_else(|| anyhow!("tokenizer.json: bad id for {text:?}"))?;
        tokens[id] = text.clone();
    }
    let byte_level =
        has_type(&tj["pre_tokenizer"], "ByteLevel") || has_type(&tj["decoder"], "ByteLevel");
    if !byte_level {
        for (i, t) in tokens.iter().enumerate() {
            if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                types[i] = TYPE_BYTE;
            }
        }
    }
    for a in &added {
        let (Some(id), Some(text)) = (id_of(&a["id"]), a["content"].as_str()) else {
            bail!("tokenizer.json: an added token without id or content");
        };
        tokens[id] = text.to_string();
        types[id] = if a["special"].as_bool().unwrap_or(false) {
            TYPE_CONTROL
        } else {
            TYPE_USER_DEFINED
        };
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => match (p.first()?.as_str(), p.get(1)?.as_str()) {
                (Some(a), Some(b)) => Some(format!("{a} {b}")),
                _ => None,
            },
            _ => None,
        })
        .collect();

    let id_of_text = |t: &str| tokens.iter().position(|x| x == t).map(|i| i as u32);
    let special = |key: &str| {
        tc.get(key)
            .and_then(token_text)
            .and_then(|t| id_of_text(&t))
    };
    let config_ids = |key: &str| -> Vec<u32> {
        match &config[key] {
            Value::Number(n) => n.as_u64().map(|v| v as u32).into_iter().collect(),
            Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect(),
            _ => Vec::new(),
        }
    };
    let eos_ids = config_ids("eos_token_id");
    let eos = special("eos_token").or(eos_ids.first().copied());
    let eot = eos_ids.iter().copied().find(|i| Some(*i) != eos);
    let bos = special("bos_token").or(config_ids("bos_token_id").first().copied());

    let mut spec = TokenizerSpec {
        bos,
        eos,
        eot,
        add_bos: tc.get("add_bos_token").and_then(Value::as_bool),
        ..TokenizerSpec::default()
    };
    if byte_level {
        spec.model = "gpt2".into();
        pre_patterns(&tj["pre_tokenizer"], &mut spec.pre_patterns)?;
        if spec.pre_patterns.is_empty() {
            spec.pre_patterns.push(GPT2.to_string());
        }
    } else {
        // SentencePiece BPE: the merge list is ordered by the merged piece's score.
        spec.model = "llama".into();
        let mut scores = vec![-1e9f32; n];
        for (rank, m) in merges.iter().enumerate() {
            if let Some((a, b)) = m.split_once(' ') {
                if let Some(id) = id_of_text(&format!("{a}{b}")) {
                    let s = &mut scores[id as usize];
                    *s = s.max(-(rank as f32));
                }
            }
        }
        spec.scores = scores;
        spec.add_space_prefix = Some(
            has_type(&tj["normalizer"], "Prepend") || has_type(&tj["pre_tokenizer"], "Metaspace"),
        );
    }
    spec.tokens = tokens;
    spec.token_types = types;
    spec.merges = merges;

    let template = match &tc["chat_template"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"].as_str() == Some("default"))
            .or(list.first())
            .and_then(|t| t["template"].as_str())
            .map(String::from),
        _ => None,
    };
    Ok((spec, template))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    #[test]
    fn byte_level_tokenizer_json_with_digits_and_specials() {
        let tj = r#"{
          "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": true},
                           {"id": 1, "content": "<|im_start|>", "special": true}],
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Digits", "individual_digits": true},
              {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]},
          "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "<|im_start|>": 1, "h": 2,
              "i": 3, "hi": 4, "Ġ": 5, "1": 6, "2": 7, "Ġhi": 8},
              "merges": ["h i", ["Ġ", "hi"]]}
        }"#;
        let tc = r#"{"eos_token": {"content": "<|endoftext|>"}, "chat_template": "{{ x }}"}"#;
        let (spec, template) = tokenizer(tj, Some(tc), &Value::Null).unwrap();
        assert_eq!(template.as_deref(), Some("{{ x }}"));
        assert_eq!(spec.eos, Some(0));
        let t = Tokenizer::new(spec).unwrap();
        // digits split one by one, the merge list in both JSON forms, specials parsed
        assert_eq!(
            t.encode("<|im_start|>hi hi12", true, false),
            vec![1, 4, 8, 6, 7]
        );
        assert_eq!(t.decode_bytes(&[4, 8, 6]), b"hi hi1");
    }

    #[test]
    fn sentencepiece_style_tokenizer_json() {
        let tj = r#"{
          "normalizer": {"type": "Sequence", "normalizers": [
              {"type": "Prepend", "prepend": "▁"}, {"type": "Replace"}]},
          "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}]},
          "added_tokens": [{"id": 1, "content": "<s>", "special": true}],
          "model": {"type": "BPE", "byte_fallback": true, "vocab": {"<unk>": 0, "<s>": 1,
              "<0x0A>": 2, "▁": 3, "a": 4, "b": 5, "ab": 6, "▁ab": 7},
              "merges": ["a b", "▁ ab"]}
        }"#;
        let (spec, _) = tokenizer(
            tj,
            Some(r#"{"add_bos_token": true, "bos_token": "<s>"}"#),
            &Value::Null,
        )
        .unwrap();
        let t = Tokenizer::new(spec).unwrap();
        assert_eq!(t.encode("ab\n", true, true), vec![1, 7, 2]);
    }

    #[test]
    fn unsupported_parts_are_named() {
        let e = tokenizer(
            r#"{"model": {"type": "Unigram", "vocab": []}}"#,
            None,
            &Value::Null,
        )
        .unwrap_err();
        assert!(e.to_string().contains("Unigram"), "{e}");
        let e = tokenizer(
            r#"{"pre_tokenizer": {"type": "Whitespace"}, "decoder": {"type": "ByteLevel"},
                "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}"#,
            None,
            &Value::Null,
        )
        .unwrap_err();
        assert!(e.to_string().contains("Whitespace"), "{e}");
    }
}
