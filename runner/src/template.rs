//! Chat templates: the GGUF's `tokenizer.chat_template` rendered as the Jinja it is (minijinja,
//! with Python string methods), or a fallback when the model has none.

use corral_protocol::{ChatMessage, Function};
use minijinja::{context, Environment, Error, ErrorKind, Value};

use crate::tools::{self, Format};

#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// True when the model ships its own template.
    pub from_model: bool,
    /// The call syntax of a template that renders `tools` itself; `None`: corral's built-in
    /// tool prompt and syntax are used.
    pub tool_format: Option<Format>,
}

/// ChatML, used when the model has no template but knows `<|im_start|>`.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
/// Plain text for models with neither.
const PLAIN: &str = "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n\n{% else %}{{ m.role | capitalize }}: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";

impl ChatTemplate {
    pub fn new(
        source: Option<String>,
        knows_chatml: bool,
        bos: String,
        eos: String,
    ) -> Result<ChatTemplate, Error> {
        let from_model = source.is_some();
        let src = source.unwrap_or_else(|| (if knows_chatml { CHATML } else { PLAIN }).to_string());
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        // Llama 3.x templates write "Today Date: " from it (they fall back to a fixed date only
        // when the function is missing).
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_utc(now_unix(), &fmt)
        });
        // Hugging Face's `tojson` (Python's json.dumps with ensure_ascii=False): ", " and ": "
        // between items, no HTML escaping; minijinja's own is compact and escapes `<`, which
        // would change the tool lists and calls templates write from what the model was
        // trained on.
        env.add_filter(
            "tojson",
            |v: Value, kwargs: minijinja::value::Kwargs| -> Result<Value, Error> {
                let indent: Option<usize> = kwargs.get("indent")?;
                let separators: Option<Vec<String>> = kwargs.get("separators")?;
                let (item, key) = match separators.as_deref() {
                    Some([i, k]) => (i.clone(), k.clone()),
                    Some(_) => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            "tojson: separators must be (item, key)",
                        ))
                    }
                    None if indent.is_some() => (",".into(), ": ".into()),
                    None => (", ".into(), ": ".into()),
                };
                let opts = PyJson {
                    indent,
                    item,
                    key,
                    sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
                    ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
                };
                kwargs.assert_all_used()?;
                let json = serde_json::to_value(&v)
                    .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
                let mut out = String::new();
                opts.write(&json, 0, &mut out);
                Ok(Value::from_safe_string(out))
            },
        );
        // As Hugging Face's `apply_chat_template` (and llama.cpp's template engine) render them:
        // the newline after a block tag dropped, and whitespace before one on its line.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        let format = Format::of_template(&src);
        env.add_template_owned("chat", src)?;
        let renders_tools = env
            .get_template("chat")?
            .undeclared_variables(false)
            .contains("tools");
        Ok(ChatTemplate {
            env,
            bos,
            eos,
            from_model,
            tool_format: format.filter(|_| renders_tools),
        })
    }

    /// The syntax the model writes calls in.
    pub fn call_format(&self) -> Format {
        self.tool_format.unwrap_or(Format::Hermes)
    }

    /// The prompt for `messages`, with `tools` offered (through the template when it renders
    /// them, else corral's built-in tool prompt).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Function]>,
    ) -> Result<String, Error> {
        let tmpl = self.env.get_template("chat")?;
        let native = self.tool_format.is_some();
        let uses_tools = tools.is_some_and(|t| !t.is_empty())
            || messages
                .iter()
                .any(|m| !m.tool_calls.is_empty() || m.role == "tool");
        let msgs: Vec<Value> = if uses_tools && !native {
            tools::builtin_messages(messages, tools)
                .iter()
                .map(|m| context! { role => m.role.clone(), content => m.content.clone() })
                .collect()
        } else if uses_tools {
            messages
                .iter()
                .map(|m| Value::from_serialize(tools::template_message(m)))
                .collect()
        } else {
            messages
                .iter()
                .map(|m| context! { role => m.role.clone(), content => m.content.clone() })
                .collect()
        };
        let offered = tools.is_some_and(|t| !t.is_empty());
        let tools = tools
            .filter(|t| native && !t.is_empty())
            .map(|t| Value::from_serialize(tools::openai_tools(t)));
        let ctx = context! {
            messages => msgs,
            tools => tools,
            add_generation_prompt => true,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        };
        // Reasoning templates (Qwen3, SmolLM3) answer straight away when tools are offered: a
        // `<think>` block would come before the call the grammar expects. Otherwise the
        // variable stays undefined, as Hugging Face leaves it (a defined `none` reads as "off"
        // to SmolLM3's `is not defined` test).
        tmpl.render(if offered {
            context! { enable_thinking => false, ..ctx }
        } else {
            ctx
        })
    }
}

/// Seconds since the epoch (tests pin it to their goldens' instant).
fn now_unix() -> i64 {
    #[cfg(test)]
    {
        let pinned = tests::PINNED_NOW.load(std::sync::atomic::Ordering::Relaxed);
        if pinned != 0 {
            return pinned;
        }
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Python's `datetime.strftime` for the directives chat templates use (%d %m %Y %y %b %B %a %A
/// %H %I %M %S %p %j %e %%; others are kept as written), in UTC: a sandboxed runner has no time
/// zone files.
fn strftime_utc(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (h, mi, se) = (tod / 3600, tod / 60 % 60, tod % 60);
    // The civil date of a day count (proleptic Gregorian, eras of 400 years).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(m - 1) as usize];
    let yday = before + d + i64::from(leap && m > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", (h + 11) % 12 + 1)),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{se:02}")),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python's `json.dumps` options, as Hugging Face's `tojson` passes them (`ensure_ascii`
/// false by default there).
struct PyJson {
    indent: Option<usize>,
    item: String,
    key: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = serde_json::Value::String(s.to_string()).to_string();
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }

    /// `v` as `json.dumps` writes it.
    fn write(&self, v: &serde_json::Value, depth: usize, out: &mut String) {
        use serde_json::Value as J;
        match v {
            J::Array(a) if !a.is_empty() => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(out, depth + 1);
                    self.write(x, depth + 1, out);
                }
                self.newline(out, depth);
                out.push(']');
            }
            J::Object(m) if !m.is_empty() => {
                let mut entries: Vec<(&String, &J)> = m.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(out, depth + 1);
                    self.string(k, out);
                    out.push_str(&self.key);
                    self.write(x, depth + 1, out);
                }
                self.newline(out, depth);
                out.push('}');
            }
            J::String(s) => self.string(s, out),
            J::Number(n) if n.is_f64() => out.push_str(&python_float(&n.to_string())),
            other => out.push_str(&other.to_string()),
        }
    }
}

/// A float as Python's `repr` writes it: the exponent signed and of at least two digits
/// (`1e+16`, `1e-05`; Rust writes `1e16`, `1e-5`).
fn python_float(s: &str) -> String {
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', e.trim_start_matches('+')),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `strftime_now`'s clock when not 0 (the golden renders' instant).
    pub(super) static PINNED_NOW: std::sync::atomic::AtomicI64 =
        std::sync::atomic::AtomicI64::new(0);

    #[test]
    fn strftime_writes_dates_as_python_does() {
        // 2026-01-02 03:04:05 UTC, a Friday; 2024-02-29 23:59:59, a leap day (Thursday);
        // 1999-12-31 12:00:00 (Friday).
        let fmt = "%d %b %Y|%e|%m/%y|%B %A %a|%H:%M:%S %I%p|%j|%%|%Q";
        assert_eq!(
            strftime_utc(1_767_323_045, fmt),
            "02 Jan 2026| 2|01/26|January Friday Fri|03:04:05 03AM|002|%|%Q"
        );
        assert_eq!(
            strftime_utc(1_709_251_199, fmt),
            "29 Feb 2024|29|02/24|February Thursday Thu|23:59:59 11PM|060|%|%Q"
        );
        assert_eq!(
            strftime_utc(946_641_600, "%d %b %Y %H %I %p %j"),
            "31 Dec 1999 12 12 PM 365"
        );
    }

    /// Real models' templates (tests/fixtures/templates) render here exactly as Hugging Face's
    /// `apply_chat_template` renders them (tests/fixtures/template-goldens.json, made with Jinja2
    /// by scripts/make-template-goldens.py): plain chats, system prompts, multi-turn, non-ASCII,
    /// tools offered and a tool call's round trip; a template's own errors stay errors.
    #[test]
    fn real_templates_render_as_hugging_face_renders_them() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let goldens: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("template-goldens.json")).unwrap(),
        )
        .unwrap();
        PINNED_NOW.store(
            goldens["now_unix"].as_i64().unwrap(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut checked = 0;
        for t in goldens["templates"].as_array().unwrap() {
            let file = t["file"].as_str().unwrap();
            let src = std::fs::read_to_string(dir.join("templates").join(file)).unwrap();
            let tmpl = ChatTemplate::new(
                Some(src),
                false,
                t["bos"].as_str().unwrap().into(),
                t["eos"].as_str().unwrap().into(),
            )
            .unwrap();
            for c in t["cases"].as_array().unwrap() {
                let name = c["name"].as_str().unwrap();
                let messages: Vec<ChatMessage> =
                    serde_json::from_value(c["messages"].clone()).unwrap();
                let tools: Option<Vec<Function>> =
                    serde_json::from_value(c["tools"].clone()).unwrap();
                if tools.is_some() {
                    assert!(tmpl.tool_format.is_some(), "{file}: renders no tools");
                }
                let got = tmpl.render(&messages, tools.as_deref());
                match (c.get("rendered"), got) {
                    (Some(want), Ok(got)) => {
                        assert_eq!(got, want.as_str().unwrap(), "{file} {name}")
                    }
                    (None, Err(e)) => {
                        let want = c["error"].as_str().unwrap();
                        assert!(e.to_string().contains(want), "{file} {name}: {e}")
                    }
                    (want, got) => panic!("{file} {name}: want {want:?}, got {got:?}"),
                }
                checked += 1;
            }
        }
        assert!(checked >= 30, "{checked}");
    }

    #[test]
    fn renders_a_model_template_with_python_methods_and_errors() {
        let src = "{% for m in messages %}{% if m['role'] not in ['user', 'system'] %}{{ raise_exception('bad role') }}{% endif %}<{{ m['role'] }}>{{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let t = ChatTemplate::new(Some(src.into()), false, "<s>".into(), "</s>".into()).unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  hi  ")], None)
            .unwrap();
        assert_eq!(out, "<user>hi\n<assistant>");
        let err = t
            .render(&[ChatMessage::new("robot", "x")], None)
            .unwrap_err();
        assert!(err.to_string().contains("bad role"));
        let fallback = ChatTemplate::new(None, true, String::new(), String::new()).unwrap();
        assert_eq!(
            fallback
                .render(&[ChatMessage::new("user", "hi")], None)
                .unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_template_that_renders_tools_gets_them_and_keeps_its_syntax() {
        use corral_protocol::{Function, ToolCall};
        // Shaped like Qwen2.5's: tools as JSON in the system turn, calls in <tool_call> tags.
        let src = r#"{%- if tools %}<|im_start|>system
<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> Reply with <tool_call></tool_call>.<|im_end|>
{% endif %}{% for m in messages %}{% if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{% endfor %}<|im_start|>assistant
"#;
        let t = ChatTemplate::new(Some(src.into()), true, String::new(), String::new()).unwrap();
        assert_eq!(t.tool_format, Some(Format::Hermes));
        let f = [Function {
            name: "now".into(),
            description: None,
            parameters: serde_json::json!({"type": "object", "properties": {"tz": {"type": "string"}}}),
        }];
        let msgs = [
            ChatMessage::new("user", "time?"),
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![ToolCall {
                    id: "c1".into(),
                    name: "now".into(),
                    arguments: serde_json::json!({"tz": "UTC"}),
                }],
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "12:00".into(),
                tool_call_id: Some("c1".into()),
                ..ChatMessage::default()
            },
        ];
        let out = t.render(&msgs, Some(&f)).unwrap();
        assert!(
            out.contains("<tools>{\"type\": \"function\", \"function\": {\"name\": \"now\", \"parameters\": {\"type\": \"object\", \"properties\": {\"tz\": {\"type\": \"string\"}}}}}</tools>"),
            "{out}"
        );
        assert!(
            out.contains(
                "<tool_call>{\"name\": \"now\", \"arguments\": {\"tz\": \"UTC\"}}</tool_call>"
            ),
            "{out}"
        );
        assert!(
            out.contains("<tool_response>12:00</tool_response>"),
            "{out}"
        );
        // ChatML without tools: corral's built-in prompt, in the system turn.
        let plain = ChatTemplate::new(None, true, String::new(), String::new()).unwrap();
        assert_eq!(plain.tool_format, None);
        let out = plain.render(&msgs, Some(&f)).unwrap();
        assert!(
            out.starts_with("<|im_start|>system\nYou can call functions"),
            "{out}"
        );
        assert!(
            out.contains("<tool_response>\n12:00\n</tool_response>"),
            "{out}"
        );
        // Llama 3's bare-JSON instruction is recognised.
        assert_eq!(
            Format::of_template(
                r#"{"name": function name, "parameters": dictionary of argument name and its value}"#
            ),
            Some(Format::Llama3)
        );
        // tojson as Python writes it, indent included, `<` left alone.
        let t = ChatTemplate::new(
            Some("{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}".into()),
            false,
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("u", "a<b")], None).unwrap(),
            "{\"role\": \"u\", \"content\": \"a<b\"}|{\n  \"role\": \"u\",\n  \"content\": \"a<b\"\n}"
        );
        let t = ChatTemplate::new(
            Some("{{ messages[0] | tojson(sort_keys=true, separators=(',', ':'), ensure_ascii=true) }}".into()),
            false,
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("u", "é😀")], None).unwrap(),
            "{\"content\":\"\\u00e9\\ud83d\\ude00\",\"role\":\"u\"}"
        );
        assert_eq!(super::python_float("1e16"), "1e+16");
        assert_eq!(super::python_float("1e-5"), "1e-05");
        assert_eq!(super::python_float("0.5"), "0.5");
    }
}
