//! The request shapes of OpenAI's `/v1/chat/completions` and `/v1/completions`, and what corral
//! does with each field. Unknown fields are refused (as OpenAI does), and every field corral
//! cannot honour is refused by name rather than ignored.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;

/// `stop`: a string or up to 4 strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A message's content: a string, or an array of parts of which only `text` parts are supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Value>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<InMessage>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub user: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    // Refused unless trivial (see `check_unsupported`).
    pub n: Option<u32>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    pub response_format: Option<Value>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<u32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    /// Integer: how many alternatives per position (0..=5 as OpenAI); absent: none.
    pub logprobs: Option<u32>,
    pub user: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub best_of: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
}

/// Parses a body with errors that name the field, in OpenAI's format.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if let Some(field) = msg
            .strip_prefix("unknown field `")
            .and_then(|m| m.split('`').next())
        {
            return ApiError::invalid(
                format!("Unrecognized request argument supplied: {field}"),
                Some(field),
            );
        }
        let param = (path != ".").then_some(path.as_str());
        ApiError::invalid(
            format!("We could not parse the JSON body of your request: {msg}"),
            param,
        )
    })
}

fn penalties(
    p: Option<f32>,
    f: Option<f32>,
    bias: &Option<BTreeMap<String, f32>>,
) -> Result<(), ApiError> {
    for (name, v) in [("presence_penalty", p), ("frequency_penalty", f)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::unsupported(
                name,
                format!("{name} is not supported by corral's local models; leave it out or 0"),
            ));
        }
    }
    if bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::unsupported(
            "logit_bias",
            "logit_bias is not supported by corral; leave it out",
        ));
    }
    Ok(())
}

fn sampling(temperature: Option<f32>, top_p: Option<f32>) -> Result<(), ApiError> {
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::invalid(
            "temperature must be within [0, 2]",
            Some("temperature"),
        ));
    }
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(ApiError::invalid(
            "top_p must be within (0, 1]",
            Some("top_p"),
        ));
    }
    Ok(())
}

/// Checks both endpoints share: `n`, `stream_options` without `stream`, at most 4 stops.
fn common(
    n: Option<u32>,
    stream: bool,
    stream_options: bool,
    stop: &Option<Stop>,
) -> Result<(), ApiError> {
    if n.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported("n", "only n=1 is supported"));
    }
    if stream_options && !stream {
        return Err(ApiError::invalid(
            "stream_options is only allowed with stream: true",
            Some("stream_options"),
        ));
    }
    if let Some(Stop::Many(v)) = stop {
        if v.len() > 4 {
            return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
        }
    }
    Ok(())
}

impl ChatRequest {
    /// Refuses what corral does not implement, by name.
    pub fn check(&self) -> Result<(), ApiError> {
        common(
            self.n,
            self.stream,
            self.stream_options.is_some(),
            &self.stop,
        )?;
        for (name, v) in [
            ("functions", &self.functions),
            ("function_call", &self.function_call),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(
                    name,
                    format!("{name} is OpenAI's deprecated form: use tools and tool_choice"),
                ));
            }
        }
        self.check_tools()?;
        if let Some(rf) = &self.response_format {
            match rf.get("type").and_then(Value::as_str) {
                Some("text" | "json_object") => {}
                Some("json_schema") => {
                    if !rf
                        .pointer("/json_schema/schema")
                        .is_some_and(Value::is_object)
                    {
                        return Err(ApiError::invalid(
                            "response_format.json_schema.schema must be a JSON Schema object",
                            Some("response_format.json_schema.schema"),
                        ));
                    }
                    if !rf
                        .pointer("/json_schema/name")
                        .is_some_and(Value::is_string)
                    {
                        return Err(ApiError::invalid(
                            "response_format.json_schema.name is required",
                            Some("response_format.json_schema.name"),
                        ));
                    }
                }
                _ => {
                    return Err(ApiError::invalid(
                        "response_format.type must be text, json_object or json_schema",
                        Some("response_format.type"),
                    ))
                }
            }
        }
        penalties(
            self.presence_penalty,
            self.frequency_penalty,
            &self.logit_bias,
        )?;
        sampling(self.temperature, self.top_p)?;
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages must not be empty",
                Some("messages"),
            ));
        }
        if self.top_logprobs.is_some_and(|n| n > 20) {
            return Err(ApiError::invalid(
                "top_logprobs must be within 0..=20",
                Some("top_logprobs"),
            ));
        }
        if self.top_logprobs.is_some() && !self.logprobs {
            return Err(ApiError::invalid(
                "top_logprobs requires logprobs: true",
                Some("top_logprobs"),
            ));
        }
        Ok(())
    }

    /// `tools`, `tool_choice` and `parallel_tool_calls` as OpenAI defines them.
    fn check_tools(&self) -> Result<(), ApiError> {
        let mut names = Vec::new();
        if let Some(tools) = self.tools.as_ref().filter(|t| !t.is_null()) {
            let Some(list) = tools.as_array() else {
                return Err(ApiError::invalid("tools must be an array", Some("tools")));
            };
            for (i, t) in list.iter().enumerate() {
                let at = |f: &str| format!("tools[{i}]{f}");
                if t.get("type").and_then(Value::as_str) != Some("function") {
                    return Err(ApiError::invalid(
                        format!("{}: only function tools are supported", at(".type")),
                        Some(&at(".type")),
                    ));
                }
                let name = t.pointer("/function/name").and_then(Value::as_str);
                let valid = name.is_some_and(|n| {
                    (1..=64).contains(&n.len())
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                });
                if !valid {
                    return Err(ApiError::invalid(
                        format!(
                            "{} must be 1 to 64 letters, digits, _ or -",
                            at(".function.name")
                        ),
                        Some(&at(".function.name")),
                    ));
                }
                if t.pointer("/function/parameters")
                    .is_some_and(|p| !p.is_object())
                {
                    return Err(ApiError::invalid(
                        format!(
                            "{} must be a JSON Schema object",
                            at(".function.parameters")
                        ),
                        Some(&at(".function.parameters")),
                    ));
                }
                names.extend(name);
            }
        }
        match &self.tool_choice {
            None | Some(Value::Null) => {}
            Some(_) if names.is_empty() => {
                return Err(ApiError::invalid(
                    "tool_choice needs tools",
                    Some("tool_choice"),
                ))
            }
            Some(Value::String(s)) if matches!(s.as_str(), "none" | "auto" | "required") => {}
            Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(n) if v.get("type").and_then(Value::as_str) == Some("function") => {
                    if !names.contains(&n) {
                        return Err(ApiError::invalid(
                            format!("tool_choice names '{n}', which is not in tools"),
                            Some("tool_choice"),
                        ));
                    }
                }
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\"}}",
                        Some("tool_choice"),
                    ))
                }
            },
        }
        if self
            .parallel_tool_calls
            .as_ref()
            .is_some_and(|v| !v.is_boolean() && !v.is_null())
        {
            return Err(ApiError::invalid(
                "parallel_tool_calls must be a boolean",
                Some("parallel_tool_calls"),
            ));
        }
        Ok(())
    }

    /// Every message with its text (content parts other than text are refused), an
    /// assistant's `tool_calls` and a `tool` message's `tool_call_id`.
    pub fn messages(&self) -> Result<Vec<crate::providers::Message>, ApiError> {
        let texts = self.texts()?;
        let mut out = Vec::with_capacity(texts.len());
        for (i, ((role, text), m)) in texts.into_iter().zip(&self.messages).enumerate() {
            let mut msg = crate::providers::Message::new(role, text);
            if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_null()) {
                let ok = m.role == "assistant"
                    && calls.as_array().is_some_and(|a| {
                        a.iter().all(|c| {
                            c.get("id").is_some_and(Value::is_string)
                                && c.pointer("/function/name").is_some_and(Value::is_string)
                                && c.pointer("/function/arguments")
                                    .is_some_and(Value::is_string)
                        })
                    });
                if !ok {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].tool_calls must be an assistant's [{{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}]"),
                        Some(&format!("messages[{i}].tool_calls")),
                    ));
                }
                msg.tool_calls = Some(calls.clone());
            }
            if m.role == "tool" {
                let Some(id) = &m.tool_call_id else {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].tool_call_id is required for a tool message"),
                        Some(&format!("messages[{i}].tool_call_id")),
                    ));
                };
                msg.tool_call_id = Some(id.clone());
            }
            out.push(msg);
        }
        Ok(out)
    }

    /// (role, text) of every message; content parts other than text are refused.
    pub fn texts(&self) -> Result<Vec<(String, String)>, ApiError> {
        let mut out = Vec::new();
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant" | "tool"
            ) {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role '{}' is not supported (system, developer, user, assistant, tool)", m.role),
                    Some(&format!("messages[{i}].role")),
                ));
            }
            let _ = &m.name;
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(s)) => s.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::unsupported(
                                    &format!("messages[{i}].content[{j}]"),
                                    "only text content parts are supported",
                                ))
                            }
                        }
                    }
                    s
                }
            };
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            out.push((role.to_string(), text));
        }
        Ok(out)
    }
}

impl CompletionRequest {
    pub fn check(&self) -> Result<(), ApiError> {
        common(
            self.n,
            self.stream,
            self.stream_options.is_some(),
            &self.stop,
        )?;
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::unsupported(
                "best_of",
                "only best_of=1 is supported",
            ));
        }
        if self.echo {
            return Err(ApiError::unsupported("echo", "echo is not supported"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported(
                "suffix",
                "suffix (insertion) is not supported",
            ));
        }
        penalties(
            self.presence_penalty,
            self.frequency_penalty,
            &self.logit_bias,
        )?;
        sampling(self.temperature, self.top_p)?;
        if self.logprobs.is_some_and(|n| n > 5) {
            return Err(ApiError::invalid(
                "logprobs must be within 0..=5",
                Some("logprobs"),
            ));
        }
        Ok(())
    }

    pub fn prompt(&self) -> Result<String, ApiError> {
        match &self.prompt {
            Prompt::One(s) => Ok(s.clone()),
            Prompt::Many(v) if v.len() == 1 => Ok(v[0].clone()),
            Prompt::Many(_) => Err(ApiError::unsupported(
                "prompt",
                "only one prompt per request is supported",
            )),
        }
    }
}
