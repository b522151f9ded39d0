//! One `[providers.NAME]` table of corral.toml: its serde form, defaults and validation.

use serde::{Deserialize, Serialize};

/// Which wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI chat completions, and servers that imitate it (llama.cpp, vLLM, Ollama).
    Openai,
    /// Anthropic Messages.
    Anthropic,
}

/// One `[providers.NAME]` table of corral.toml. API keys are never in the file: `api_key_env`
/// names the environment variable that holds one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// The API root: `https://api.openai.com/v1` (corral appends `/chat/completions`) or
    /// `https://api.anthropic.com` (corral appends `/v1/messages`).
    pub base_url: String,
    pub model: String,
    /// What else callers may ask this provider for by name (`NAME/ID` in a request's `model`):
    /// model ids, `*` and `?` wildcards allowed (`gpt-4o*`). `model` itself always may be.
    #[serde(default)]
    pub models: Vec<String>,
    /// US dollars per million tokens, by model id (`*` and `?` allowed; the most specific
    /// match wins): `prices = { "gpt-4o-mini*" = { input = 0.15, output = 0.6 } }`. What
    /// `corral_spend_usd_total` and `corral_spend_avoided_usd_total` are computed with.
    #[serde(default)]
    pub prices: std::collections::BTreeMap<String, Price>,
    /// Name of the environment variable holding the API key; none sends no key (a local
    /// server).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Time limit of one HTTP attempt, connect to last byte.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after the first attempt, on 429, 5xx, timeouts and transport errors only.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Base of the exponential backoff between retries (full jitter).
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Consecutive failed requests that open the circuit.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open circuit refuses requests before letting one trial through.
    #[serde(default = "default_breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
    /// `max_tokens` sent when the request sets none (Anthropic requires one).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Ask for a streamed answer even when the caller did not (it is assembled here): a caller
    /// that goes away then closes the connection, so the provider stops generating, instead
    /// of leaving a whole answer to finish. Off by default: not every OpenAI-compatible server
    /// takes `stream_options`.
    #[serde(default)]
    pub always_stream: bool,
    /// Ask an OpenAI-compatible provider's streams for their usage (`stream_options:
    /// {"include_usage": true}`). Off for a server that refuses the field; its streamed
    /// answers then count no tokens.
    #[serde(default = "default_stream_usage")]
    pub stream_usage: bool,
}

fn default_stream_usage() -> bool {
    true
}

/// Most retries a provider may be configured with.
pub const MAX_RETRIES_LIMIT: u32 = 10;

fn default_timeout_ms() -> u64 {
    60_000
}
fn default_max_retries() -> u32 {
    2
}
fn default_backoff_ms() -> u64 {
    250
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown_ms() -> u64 {
    30_000
}
fn default_max_tokens() -> u32 {
    1024
}

/// A model's price, US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

impl ProviderConfig {
    /// A configuration with every optional key at its default and no API key.
    pub fn new(
        kind: ProviderKind,
        base_url: impl Into<String>,
        model: impl Into<String>,
    ) -> ProviderConfig {
        ProviderConfig {
            kind,
            base_url: base_url.into(),
            model: model.into(),
            models: Vec::new(),
            prices: std::collections::BTreeMap::new(),
            api_key_env: None,
            timeout_ms: default_timeout_ms(),
            max_retries: default_max_retries(),
            backoff_ms: default_backoff_ms(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown_ms: default_breaker_cooldown_ms(),
            max_tokens: default_max_tokens(),
            always_stream: false,
            stream_usage: true,
        }
    }

    /// Checks every key of `[providers.NAME]`; the error names the first bad key by its full
    /// path (`providers.NAME.base_url: must start with http:// or https://`) and says what to
    /// write instead.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        let bad = |key: &str, message: &str| Err(format!("providers.{name}.{key}: {message}"));

        let url = self.base_url.as_str();
        let Some(rest) = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
        else {
            return bad("base_url", "must start with http:// or https://");
        };
        if rest.is_empty() || rest.starts_with('/') {
            return bad("base_url", "has no host after the scheme");
        }
        if url.chars().any(char::is_whitespace) {
            return bad("base_url", "must not contain whitespace");
        }
        let trimmed = url.trim_end_matches('/');
        match self.kind {
            ProviderKind::Openai if trimmed.ends_with("/chat/completions") => {
                return bad(
                    "base_url",
                    "give the API root (e.g. https://api.openai.com/v1); corral appends /chat/completions",
                );
            }
            ProviderKind::Anthropic
                if trimmed.ends_with("/v1") || trimmed.ends_with("/v1/messages") =>
            {
                return bad(
                    "base_url",
                    "give the API root (e.g. https://api.anthropic.com); corral appends /v1/messages",
                );
            }
            _ => {}
        }
        if self.model.trim().is_empty() {
            return bad("model", "must not be empty");
        }
        if let Some(m) = self
            .models
            .iter()
            .find(|m| m.trim().is_empty() || m.chars().any(char::is_whitespace))
        {
            return bad(
                "models",
                &format!("{m:?} is not a model id or pattern (no spaces; * and ? match any text)"),
            );
        }
        if let Some(env) = &self.api_key_env {
            let mut chars = env.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return bad(
                    "api_key_env",
                    "must be the name of an environment variable holding the key (letters, digits and _, e.g. OPENAI_API_KEY), never the key itself",
                );
            }
        }
        if let Some((m, _)) = self.prices.iter().find(|(_, p)| {
            !(p.input.is_finite() && p.output.is_finite() && p.input >= 0.0 && p.output >= 0.0)
        }) {
            return bad(
                &format!("prices.{m}"),
                "input and output are US dollars per million tokens, >= 0",
            );
        }
        if self.timeout_ms == 0 {
            return bad("timeout_ms", "must be > 0");
        }
        if self.max_retries > MAX_RETRIES_LIMIT {
            return bad(
                "max_retries",
                &format!("must be at most {MAX_RETRIES_LIMIT}"),
            );
        }
        if self.breaker_failures == 0 {
            return bad("breaker_failures", "must be > 0");
        }
        if self.breaker_cooldown_ms == 0 {
            return bad("breaker_cooldown_ms", "must be > 0");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be > 0");
        }
        Ok(())
    }

    /// What `prompt` and `completion` tokens of `model` cost, in US dollars (`None` without a
    /// price for it).
    pub fn cost(&self, model: &str, prompt: u64, completion: u64) -> Option<f64> {
        let p = self.price(model)?;
        Some((prompt as f64 * p.input + completion as f64 * p.output) / 1e6)
    }

    /// The price of `model`: its exact entry, else the most specific pattern matching it (the
    /// one with the most literal characters: `gpt-4o-mini*` before `gpt-4o*`).
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices.get(model).or_else(|| {
            self.prices
                .iter()
                .filter(|(k, _)| crate::routing::rules::wildcard(k, model))
                .max_by_key(|(k, _)| k.chars().filter(|c| !matches!(c, '*' | '?')).count())
                .map(|(_, v)| v)
        })
    }

    /// Whether callers may ask this provider for model `id` (its `model`, or one `models` matches).
    pub fn offers(&self, id: &str) -> bool {
        id == self.model
            || self
                .models
                .iter()
                .any(|p| crate::routing::rules::wildcard(p, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_price_wins() {
        let mut c = ProviderConfig::new(ProviderKind::Openai, "https://x/v1", "gpt-4o-mini");
        c.prices.insert(
            "gpt-4o*".into(),
            Price {
                input: 2.5,
                output: 10.0,
            },
        );
        c.prices.insert(
            "gpt-4o-mini*".into(),
            Price {
                input: 0.15,
                output: 0.6,
            },
        );
        // A dated name the provider reports takes the mini price, not the first pattern's.
        let usd = c
            .cost("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000)
            .unwrap();
        assert!((usd - 0.75).abs() < 1e-9, "{usd}");
        let usd = c.cost("gpt-4o-2024-08-06", 1_000_000, 0).unwrap();
        assert!((usd - 2.5).abs() < 1e-9, "{usd}");
        assert_eq!(c.cost("o3-mini", 1, 1), None);
    }

    fn parse(toml_text: &str) -> Result<ProviderConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn a_minimal_table_gets_the_documented_defaults() -> Result<(), toml::de::Error> {
        let cfg = parse(
            r#"
            kind = "openai"
            base_url = "https://api.openai.com/v1"
            model = "gpt-4o-mini"
            "#,
        )?;
        assert_eq!(
            cfg,
            ProviderConfig::new(
                ProviderKind::Openai,
                "https://api.openai.com/v1",
                "gpt-4o-mini"
            )
        );
        assert_eq!(cfg.timeout_ms, 60_000);
        assert_eq!(cfg.max_retries, 2);
        assert_eq!(cfg.backoff_ms, 250);
        assert_eq!(cfg.breaker_failures, 5);
        assert_eq!(cfg.breaker_cooldown_ms, 30_000);
        assert_eq!(cfg.max_tokens, 1024);
        assert_eq!(cfg.api_key_env, None);
        assert_eq!(cfg.validate("openai"), Ok(()));
        Ok(())
    }

    #[test]
    fn unknown_keys_and_kinds_are_rejected() {
        let typo = parse(
            r#"
            kind = "anthropic"
            base_url = "https://api.anthropic.com"
            model = "claude-sonnet-4-5"
            api_key = "sk-ant-..."
            "#,
        );
        let err = typo.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("unknown field `api_key`"), "{err}");

        let kind = parse(
            r#"
            kind = "gemini"
            base_url = "https://example.com"
            model = "m"
            "#,
        );
        let err = kind.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("openai") && err.contains("anthropic"), "{err}");
    }

    #[test]
    fn validation_names_the_key_and_the_fix() {
        let ok = ProviderConfig::new(ProviderKind::Openai, "http://127.0.0.1:8080/v1", "local");
        assert_eq!(ok.validate("local"), Ok(()));

        let case = |f: &dyn Fn(&mut ProviderConfig), kind: ProviderKind| {
            let mut cfg = ProviderConfig::new(kind, "https://api.example.com/v1", "m");
            if kind == ProviderKind::Anthropic {
                cfg.base_url = "https://api.anthropic.com".into();
            }
            f(&mut cfg);
            cfg.validate("main").err().unwrap_or_default()
        };
        let openai = ProviderKind::Openai;
        assert_eq!(
            case(&|c| c.base_url = "api.openai.com/v1".into(), openai),
            "providers.main.base_url: must start with http:// or https://"
        );
        assert_eq!(
            case(&|c| c.base_url = "https://".into(), openai),
            "providers.main.base_url: has no host after the scheme"
        );
        assert!(case(
            &|c| c.base_url = "https://api.openai.com/v1/chat/completions".into(),
            openai
        )
        .starts_with("providers.main.base_url: give the API root"));
        assert!(case(
            &|c| c.base_url = "https://api.anthropic.com/v1/".into(),
            ProviderKind::Anthropic
        )
        .contains("corral appends /v1/messages"));
        assert_eq!(
            case(&|c| c.model = " ".into(), openai),
            "providers.main.model: must not be empty"
        );
        assert!(
            case(&|c| c.api_key_env = Some("sk-proj-abc".into()), openai).starts_with(
                "providers.main.api_key_env: must be the name of an environment variable"
            )
        );
        assert_eq!(
            case(&|c| c.api_key_env = Some("OPENAI_API_KEY".into()), openai),
            ""
        );
        assert_eq!(
            case(&|c| c.timeout_ms = 0, openai),
            "providers.main.timeout_ms: must be > 0"
        );
        assert_eq!(
            case(&|c| c.max_retries = 11, openai),
            "providers.main.max_retries: must be at most 10"
        );
        assert_eq!(
            case(&|c| c.breaker_failures = 0, openai),
            "providers.main.breaker_failures: must be > 0"
        );
        assert_eq!(
            case(&|c| c.breaker_cooldown_ms = 0, openai),
            "providers.main.breaker_cooldown_ms: must be > 0"
        );
        assert_eq!(
            case(&|c| c.max_tokens = 0, openai),
            "providers.main.max_tokens: must be > 0"
        );
    }
}
