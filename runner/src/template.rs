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
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        env.set_trim_blocks(false);
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
        let tools = tools
            .filter(|t| native && !t.is_empty())
            .map(|t| Value::from_serialize(tools::openai_tools(t)));
        tmpl.render(context! {
            messages => msgs,
            tools => tools,
            add_generation_prompt => true,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
