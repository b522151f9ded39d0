//! Local tool calls: how the offered functions reach the model, the grammar a call is
//! generated under, and how the answer is read back.
//!
//! A model whose chat template renders the Jinja `tools` variable, and whose call syntax corral
//! recognises from that template, gets the tools through its own template and writes calls in
//! its own syntax ([`Format::Hermes`]: Qwen2.5/Qwen3, Hermes, SmolLM3; [`Format::Llama3`]:
//! Llama 3.1/3.2). Every other model gets corral's built-in tool prompt (a system message listing
//! the functions as JSON Schema and asking for `<tool_call>` blocks, the Hermes syntax), and the
//! conversation's earlier calls and tool results are written in that syntax as well.
//!
//! Whatever the prompt, the answer is generated under a grammar (llguidance's Lark dialect):
//! each call is `{"name": <one of the offered names>, "arguments": <JSON valid against that
//! function's parameters>}` in the format's frame. Under `auto` the grammar also admits a text
//! answer that holds no call; under `required` (or a named function) it admits calls only; under
//! `none`, text only. So a local call always parses and always validates against its schema; a call cut
//! short by `max_tokens` is reported as no call at all.

use corral_protocol::{ChatMessage, Function, ToolCall, ToolChoice, Tools};
use serde_json::{json, Value};

use crate::constrain::{check_schema, close_objects, compact};

/// The syntax calls are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call,
    /// separated by newlines. corral's built-in format.
    Hermes,
    /// A bare `{"name": ..., "parameters": {...}}` (Llama 3.1/3.2): one call per answer.
    Llama3,
}

impl Format {
    /// The format a chat template's own tool prompt asks for, when it renders `tools` and
    /// corral knows its syntax.
    pub fn of_template(source: &str) -> Option<Format> {
        if source.contains("<tool_call>") {
            Some(Format::Hermes)
        } else if source.contains("\"parameters\": dictionary of argument name")
            || source.contains("<|python_tag|>")
        {
            Some(Format::Llama3)
        } else {
            None
        }
    }

    /// What a call's text starts with.
    fn trigger(self) -> &'static str {
        match self {
            Format::Hermes => "<tool_call>",
            Format::Llama3 => "{",
        }
    }

    /// What a call's text ends with.
    pub fn call_end(self) -> &'static str {
        match self {
            Format::Hermes => "</tool_call>",
            Format::Llama3 => "}",
        }
    }

    fn arguments_key(self) -> &'static str {
        match self {
            Format::Hermes => "arguments",
            Format::Llama3 => "parameters",
        }
    }

    /// Whether `text`, the answer so far, may still be (or is) a call: its text must be held
    /// back from the caller and stop sequences do not apply to it.
    pub fn may_be_call(self, text: &str) -> bool {
        let t = trim_ws(text);
        let trigger = self.trigger();
        t.starts_with(trigger) || trigger.starts_with(t)
    }

    /// The Lark grammar an answer is generated under. `text`: the schema a text answer must
    /// follow (`response_format`), if any.
    pub fn grammar(self, tools: &Tools, text: Option<&Value>) -> Result<String, String> {
        if tools.choice == ToolChoice::None {
            let mut g = String::from("start: text\n");
            self.text_rule(text, &mut g)?;
            return Ok(g);
        }
        let offered: Vec<&Function> = match &tools.choice {
            ToolChoice::Function { name } => {
                let f = tools
                    .functions
                    .iter()
                    .find(|f| &f.name == name)
                    .ok_or_else(|| format!("tool_choice names '{name}', which is not offered"))?;
                vec![f]
            }
            _ => tools.functions.iter().collect(),
        };
        if offered.is_empty() {
            return Err("tools: no function is offered".into());
        }
        let mut g = String::new();
        let calls = match (self, &tools.choice) {
            // A named function is called once; Llama 3 makes one call per answer.
            (_, ToolChoice::Function { .. }) | (Format::Llama3, _) => "call",
            (Format::Hermes, _) if tools.parallel => "call (\"\\n\" call)*",
            (Format::Hermes, _) => "call",
        };
        match tools.choice {
            ToolChoice::Auto => g.push_str("start: calls | text\n"),
            _ => g.push_str("start: calls\n"),
        }
        g.push_str(&format!("calls: {calls}\n"));
        match self {
            Format::Hermes => g.push_str("call: \"<tool_call>\\n\" function \"\\n</tool_call>\"\n"),
            Format::Llama3 => g.push_str("call: function\n"),
        }
        let alts: Vec<String> = (0..offered.len()).map(|i| format!("f{i}")).collect();
        g.push_str(&format!("function: {}\n", alts.join(" | ")));
        for (i, f) in offered.iter().enumerate() {
            let params = parameters(f)?;
            let head = format!(
                "{{\"name\": {}, \"{}\": ",
                serde_json::to_string(&f.name).map_err(|e| e.to_string())?,
                self.arguments_key()
            );
            g.push_str(&format!(
                "f{i}: {} %json {} \"}}\"\n",
                lark_string(&head)?,
                serde_json::to_string(&params).map_err(|e| e.to_string())?
            ));
        }
        if tools.choice == ToolChoice::Auto {
            self.text_rule(text, &mut g)?;
        }
        Ok(g)
    }

    /// The rule for a text answer: under the JSON schema `text` when there is one, else any
    /// text that does not start a call (Llama 3: does not open with `{`) and, in the `<tool_call>`
    /// syntax, holds no call anywhere (a call after some text would escape its schema).
    fn text_rule(self, text: Option<&Value>, g: &mut String) -> Result<(), String> {
        match text {
            Some(schema) => g.push_str(&format!(
                "text: %json {}\n",
                serde_json::to_string(schema).map_err(|e| e.to_string())?
            )),
            None => {
                g.push_str("text: TEXT\n");
                g.push_str(match self {
                    Format::Hermes => "TEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/\n",
                    Format::Llama3 => "TEXT: /(?s:.*)/ & ~/(?s:[ \\t\\r\\n]*\\{.*)/\n",
                });
            }
        }
        Ok(())
    }

    /// Reads an answer generated under [`Format::grammar`].
    pub fn parse(self, text: &str, tools: &Tools) -> Parsed {
        if tools.choice == ToolChoice::None || !trim_ws(text).starts_with(self.trigger()) {
            return Parsed::Text;
        }
        let mut calls: Vec<ToolCall> = Vec::new();
        let mut rest = trim_ws(text);
        while !rest.is_empty() {
            if self == Format::Hermes {
                let Some(r) = rest.strip_prefix("<tool_call>") else {
                    return Parsed::Incomplete(calls);
                };
                rest = r;
            }
            let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
            let Some(Ok(v)) = values.next() else {
                return Parsed::Incomplete(calls);
            };
            rest = &rest[values.byte_offset()..];
            let name = v.get("name").and_then(Value::as_str);
            let args = v.get(self.arguments_key()).filter(|a| a.is_object());
            let (Some(name), Some(args)) = (name, args) else {
                // Only reachable when a JSON text answer is itself an object (Llama 3 with
                // `response_format`): it is text, not a call.
                return if calls.is_empty() && self == Format::Llama3 {
                    Parsed::Text
                } else {
                    Parsed::Incomplete(calls)
                };
            };
            if !tools.functions.iter().any(|f| f.name == name) {
                return Parsed::Incomplete(calls);
            }
            let call = ToolCall {
                id: String::new(),
                name: name.to_string(),
                arguments: args.clone(),
            };
            if self == Format::Hermes {
                let Some(r) = trim_ws(rest).strip_prefix("</tool_call>") else {
                    return Parsed::Incomplete(calls);
                };
                rest = trim_ws(r);
            } else {
                rest = trim_ws(rest);
                if !rest.is_empty() {
                    return Parsed::Incomplete(calls);
                }
            }
            calls.push(call);
        }
        Parsed::Calls(calls)
    }
}

/// `s` without the white space a grammar admits before and between calls (ASCII only: the
/// grammar allows nothing else there, so nothing else may be skipped when reading back).
fn trim_ws(s: &str) -> &str {
    s.trim_start_matches([' ', '\t', '\r', '\n'])
}

/// What an answer under tools turned out to be.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    Text,
    Calls(Vec<ToolCall>),
    /// A call that did not finish (`max_tokens`, the context, a cancellation), after the
    /// calls that did.
    Incomplete(Vec<ToolCall>),
}

impl Parsed {
    /// Whether the answer so far ends with a call identical to an earlier one: a model
    /// repeating itself (small models under greedy decoding do), since the same call twice
    /// gets the same result twice. The answer stops there and the copy is dropped.
    pub fn repeats(&self) -> bool {
        match self {
            Parsed::Calls(c) => c
                .split_last()
                .is_some_and(|(last, rest)| rest.contains(last)),
            _ => false,
        }
    }
}

/// A function's `parameters` as the schema its arguments are generated under: an object (a
/// function without parameters takes `{}`), checked against the supported subset, compact.
fn parameters(f: &Function) -> Result<Value, String> {
    let mut p = match &f.parameters {
        Value::Null => json!({"type": "object", "properties": {}, "additionalProperties": false}),
        Value::Object(_) => f.parameters.clone(),
        _ => {
            return Err(format!(
                "the parameters of function '{}' must be a JSON Schema object",
                f.name
            ))
        }
    };
    check_schema(&p).map_err(|e| format!("function '{}': {e}", f.name))?;
    match p.get("type") {
        None => {
            p["type"] = json!("object");
        }
        Some(t) if t == "object" => {}
        Some(t) => {
            return Err(format!(
                "the parameters of function '{}' must describe an object, not {t}",
                f.name
            ))
        }
    }
    close_objects(&mut p);
    compact(&mut p);
    Ok(p)
}

/// `s` as a Lark string literal (JSON string syntax).
fn lark_string(s: &str) -> Result<String, String> {
    serde_json::to_string(s).map_err(|e| e.to_string())
}

/// The tools as OpenAI (and Hugging Face chat templates) list them.
pub fn openai_tools(functions: &[Function]) -> Value {
    Value::Array(
        functions
            .iter()
            .map(|f| {
                let mut func = json!({"name": f.name});
                if let Some(d) = &f.description {
                    func["description"] = json!(d);
                }
                func["parameters"] = if f.parameters.is_null() {
                    json!({"type": "object", "properties": {}})
                } else {
                    f.parameters.clone()
                };
                json!({"type": "function", "function": func})
            })
            .collect(),
    )
}

/// A message as a Hugging Face chat template reads it: `tool_calls` with `function.arguments`
/// as an object, `tool_call_id` and `name` on a tool result.
pub fn template_message(m: &ChatMessage) -> Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        v["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    if let Some(n) = &m.name {
        v["name"] = json!(n);
    }
    v
}

/// The conversation in corral's built-in tool syntax, for a template that knows nothing of
/// tools: the functions described in the system message, earlier calls written as
/// `<tool_call>` blocks in the assistant's text, and tool results as a user message of
/// `<tool_response>` blocks (consecutive results in one message, so user and assistant turns
/// still alternate).
pub fn builtin_messages(
    messages: &[ChatMessage],
    functions: Option<&[Function]>,
) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if let Some(fs) = functions.filter(|f| !f.is_empty()) {
        let prompt = builtin_prompt(fs);
        match messages.first() {
            Some(m) if m.role == "system" => {}
            _ => out.push(ChatMessage::new("system", prompt.trim_start())),
        }
        for (i, m) in messages.iter().enumerate() {
            if i == 0 && m.role == "system" {
                out.push(ChatMessage::new("system", format!("{}{prompt}", m.content)));
            } else {
                push_builtin(&mut out, m);
            }
        }
    } else {
        for m in messages {
            push_builtin(&mut out, m);
        }
    }
    out
}

fn push_builtin(out: &mut Vec<ChatMessage>, m: &ChatMessage) {
    match m.role.as_str() {
        "tool" => {
            let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
            match out.last_mut() {
                Some(prev) if prev.role == "user" && prev.content.ends_with("</tool_response>") => {
                    prev.content.push('\n');
                    prev.content.push_str(&block);
                }
                _ => out.push(ChatMessage::new("user", block)),
            }
        }
        _ if !m.tool_calls.is_empty() => {
            let mut text = m.content.clone();
            for c in &m.tool_calls {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&format!(
                    "<tool_call>\n{}\n</tool_call>",
                    json!({"name": c.name, "arguments": c.arguments})
                ));
            }
            out.push(ChatMessage::new(m.role.clone(), text));
        }
        _ => out.push(ChatMessage::new(m.role.clone(), m.content.clone())),
    }
}

/// The built-in tool prompt (appended to the system message).
fn builtin_prompt(functions: &[Function]) -> String {
    let mut s = String::from(
        "\n\nYou can call functions to help with the request. Each is described by a JSON Schema \
         between the <tools></tools> tags:\n<tools>\n",
    );
    if let Value::Array(list) = openai_tools(functions) {
        for t in list {
            s.push_str(&t.to_string());
            s.push('\n');
        }
    }
    s.push_str(
        "</tools>\nTo call a function, answer with a JSON object holding its name and its \
         arguments between <tool_call></tool_call> tags, one block per call:\n<tool_call>\n\
         {\"name\": <function name>, \"arguments\": <arguments object>}\n</tool_call>\n\
         Otherwise answer in plain text.",
    );
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::constrain::Grammars;

    fn weather() -> Tools {
        Tools {
            functions: vec![
                Function {
                    name: "get_weather".into(),
                    description: Some("Weather in a city".into()),
                    parameters: json!({"type": "object", "properties": {
                        "city": {"type": "string", "minLength": 1},
                        "unit": {"enum": ["c", "f"]}},
                        "required": ["city", "unit"], "additionalProperties": false}),
                },
                Function {
                    name: "now".into(),
                    description: None,
                    parameters: Value::Null,
                },
            ],
            choice: ToolChoice::Auto,
            parallel: true,
        }
    }

    /// How many bytes of `text` the grammar accepts, and whether it may end there.
    fn accepts(g: &Grammars, grammar: &str, text: &str) -> (usize, bool) {
        let mut m = g.lark_matcher(grammar).unwrap();
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        let n = m.validate_tokens(&ids).unwrap();
        let done = n == ids.len() && {
            m.consume_tokens(&ids).unwrap();
            m.is_accepting().unwrap()
        };
        (n, done)
    }

    #[test]
    fn calls_follow_their_schema_and_auto_admits_text_that_is_not_a_call() {
        let g = Grammars::bytes_for_tests();
        let tools = weather();
        let auto = Format::Hermes.grammar(&tools, None).unwrap();
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Oslo\",\"unit\":\"c\"}}\n</tool_call>";
        assert_eq!(accepts(&g, &auto, call), (call.len(), true));
        let two = format!(
            "{call}\n<tool_call>\n{{\"name\": \"now\", \"arguments\": {{}}}}\n</tool_call>"
        );
        assert_eq!(accepts(&g, &auto, &two), (two.len(), true));
        // A value outside the enum, a missing required field, an unknown function: refused
        // where they go wrong.
        let bad = call.replace("\"c\"", "\"k\"");
        assert!(accepts(&g, &auto, &bad).0 < bad.len());
        let missing =
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Oslo\"}}";
        assert!(accepts(&g, &auto, missing).0 < missing.len());
        let unknown = "<tool_call>\n{\"name\": \"rm\"";
        assert!(accepts(&g, &auto, unknown).0 < unknown.len());
        // Text is fine unless it holds a call, at the start or after other text.
        assert_eq!(accepts(&g, &auto, "It is sunny."), (12, true));
        assert!(accepts(&g, &auto, "  <tool_call>hello").0 < 18);
        let later = format!("Sure.\n{call}");
        assert!(accepts(&g, &auto, &later).0 < later.len());
        // `none`: text only, never a call.
        let mut none = tools.clone();
        none.choice = ToolChoice::None;
        let text_only = Format::Hermes.grammar(&none, None).unwrap();
        assert_eq!(accepts(&g, &text_only, "Rain."), (5, true));
        assert!(accepts(&g, &text_only, call).0 < call.len());
        // Required: no text at all.
        let mut req = tools.clone();
        req.choice = ToolChoice::Required;
        let required = Format::Hermes.grammar(&req, None).unwrap();
        assert_eq!(accepts(&g, &required, "It").0, 0);
        assert_eq!(accepts(&g, &required, call), (call.len(), true));
        // A named function: that one, once.
        req.choice = ToolChoice::Function { name: "now".into() };
        let named = Format::Hermes.grammar(&req, None).unwrap();
        assert!(accepts(&g, &named, call).0 < call.len());
        let now = "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        assert_eq!(accepts(&g, &named, now), (now.len(), true));
        assert!(accepts(&g, &named, &format!("{now}\n{now}")).0 < 2 * now.len());
        // Llama 3's bare JSON, with `parameters`.
        let l3 = Format::Llama3.grammar(&tools, None).unwrap();
        let lcall =
            "{\"name\": \"get_weather\", \"parameters\": {\"city\":\"Rome\",\"unit\":\"f\"}}";
        assert_eq!(accepts(&g, &l3, lcall), (lcall.len(), true));
        assert_eq!(accepts(&g, &l3, "Hi"), (2, true));
    }

    #[test]
    fn answers_read_back_as_calls_text_or_incomplete() {
        let tools = weather();
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Oslo\",\"unit\":\"c\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let Parsed::Calls(calls) = Format::Hermes.parse(call, &tools) else {
            panic!("not calls")
        };
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, json!({"city": "Oslo", "unit": "c"}));
        assert_eq!(calls[1].arguments, json!({}));
        assert_eq!(Format::Hermes.parse("Sunny.", &tools), Parsed::Text);
        assert_eq!(
            Format::Hermes.parse(&call[..40], &tools),
            Parsed::Incomplete(vec![])
        );
        // Cut in the second call: the first stands.
        let Parsed::Incomplete(first) = Format::Hermes.parse(&call[..call.len() - 20], &tools)
        else {
            panic!("not incomplete")
        };
        assert_eq!(first.len(), 1);
        // A call repeated verbatim is a loop.
        let first_block = &call[..call.find("\n<tool_call>").unwrap()];
        let twice = format!("{first_block}\n{first_block}");
        assert!(Format::Hermes.parse(&twice, &tools).repeats());
        assert!(!Format::Hermes.parse(call, &tools).repeats());
        assert!(Format::Hermes.may_be_call(" <tool"));
        assert!(!Format::Hermes.may_be_call("<b>"));
        // Only the white space the grammar admits is skipped: anything else makes it text.
        let nbsp = format!("\u{a0}{call}");
        assert_eq!(Format::Hermes.parse(&nbsp, &tools), Parsed::Text);
        assert!(!Format::Hermes.may_be_call("\u{a0}<tool"));
    }

    #[test]
    fn parameters_outside_the_subset_or_not_objects_are_refused_by_name() {
        let mut tools = weather();
        tools.functions[0].parameters =
            json!({"type": "object", "properties": {"x": {"type": "string", "format2": 1}}});
        let e = Format::Hermes.grammar(&tools, None).unwrap_err();
        assert!(e.contains("get_weather") && e.contains("format2"), "{e}");
        tools.functions[0].parameters = json!({"type": "array"});
        assert!(Format::Hermes
            .grammar(&tools, None)
            .unwrap_err()
            .contains("object"));
    }

    #[test]
    fn the_builtin_format_writes_the_conversation_into_text() {
        let fs = weather().functions;
        let msgs = vec![
            ChatMessage::new("user", "Weather in Oslo and the time?"),
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "now".into(),
                    arguments: json!({}),
                }],
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "12:00".into(),
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "sunny".into(),
                tool_call_id: Some("call_2".into()),
                ..ChatMessage::default()
            },
        ];
        let out = builtin_messages(&msgs, Some(&fs));
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(
            out[0].content.contains("\"name\":\"get_weather\"")
                && out[0].content.contains("<tool_call>")
        );
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\":\"now\",\"arguments\":{}}\n</tool_call>"
        );
        assert_eq!(
            out[3].content,
            "<tool_response>\n12:00\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        );
    }
}
