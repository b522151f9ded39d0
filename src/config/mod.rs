//! corral.toml: found, parsed into the raw serde form (`raw.rs`), overridden from the
//! environment (`env.rs`), then validated into [`Config`], the only form the rest of corral sees.
//!
//! Lookup: `--config PATH`, else `$CORRAL_CONFIG`, else `./corral.toml` if present, else the
//! built-in defaults. Errors name the file and the full key path:
//! `corral.toml: slm.model_allow_lists.agent_model_maps.code_generator: model 'x' not in global_models`.

pub mod auth;
pub mod env;
pub mod raw;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::catalog::{self, Catalog, CatalogFile};
use crate::profile::{ProfileError, ProfileRegistry};
use crate::sandbox::SandboxConfig;
use raw::RawConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub request_timeout: Duration,
    pub max_request_body_bytes: u64,
    pub shutdown_grace: Duration,
    pub auth: auth::AuthConfig,
    pub pool: crate::pool::PoolConfig,
}

#[derive(Debug, Clone)]
pub struct SlmConfig {
    pub enabled: bool,
    pub default_sandbox_profile: String,
    pub allow_runtime_overrides: bool,
    pub models: Catalog,
    pub agent_model_maps: BTreeMap<String, Vec<String>>,
    pub model_dir: PathBuf,
    /// Each model's confidence calibrator (the catalog entry's `calibrator`).
    pub calibrators: crate::confidence::calibrator::Calibrators,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub filter: String,
    pub format: LogFormat,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (`None`: built-in defaults).
    pub path: Option<PathBuf>,
    pub server: ServerConfig,
    pub slm: SlmConfig,
    pub logging: LoggingConfig,
    pub sandbox: SandboxConfig,
    pub profiles: ProfileRegistry,
    /// Shared (`Arc`) so a request in flight keeps the router it was decided by.
    pub routing: std::sync::Arc<crate::routing::Router>,
    pub providers: BTreeMap<String, crate::providers::ProviderConfig>,
    pub audit: crate::audit::AuditConfig,
}

/// Where to look for things; the CLI fills it from flags, tests from their own values.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub config: Option<PathBuf>,
    pub profiles_dir: Option<PathBuf>,
}

impl Config {
    /// Loads from the process environment.
    pub fn load(sources: &Sources) -> Result<Config> {
        Self::load_with_env(sources, &|k| {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        })
    }

    pub fn load_with_env(
        sources: &Sources,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config> {
        let path = match (&sources.config, get("CORRAL_CONFIG")) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(p)) => Some(PathBuf::from(p)),
            (None, None) => Some(PathBuf::from("corral.toml")).filter(|p| p.is_file()),
        };
        let (mut raw, file) = match &path {
            Some(p) => {
                let text = crate::files::read_text(p, crate::files::MAX_CONFIG_BYTES).map_err(
                    |source| ConfigError::Io {
                        path: p.clone(),
                        source,
                    },
                )?;
                let file = p.display().to_string();
                let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    file: file.clone(),
                    message: e.to_string(),
                })?;
                let raw: RawConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
                    .map_err(|e| ConfigError::Invalid {
                        file: file.clone(),
                        key: e.path().to_string(),
                        message: crate::profile::serde_message(e.into_inner()),
                    })?;
                (raw, file)
            }
            None => (RawConfig::default(), "<built-in defaults>".to_string()),
        };
        let applied = env::apply(&mut raw, get)?;
        let profiles_dir = sources
            .profiles_dir
            .clone()
            .or_else(|| get("CORRAL_PROFILES_DIR").map(PathBuf::from))
            .or_else(|| {
                path.as_ref()
                    .and_then(|p| p.parent())
                    .map(|d| {
                        if d.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            d
                        }
                    })
                    .map(|d| d.join("profiles"))
                    .filter(|d| d.is_dir())
            });
        compile(raw, path, &file, profiles_dir.as_deref(), &applied, get)
    }
}

fn compile(
    raw: RawConfig,
    path: Option<PathBuf>,
    file: &str,
    profiles_dir: Option<&Path>,
    applied: &[(&'static str, String)],
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Config> {
    // A key overridden from the environment is named with its variable.
    let key = |k: &str| match applied.iter().find(|(a, _)| *a == k) {
        Some((_, var)) => format!("{k} (from {var})"),
        None => k.to_string(),
    };
    let invalid = |k: &str, message: String| ConfigError::Invalid {
        file: file.to_string(),
        key: key(k),
        message,
    };

    let bind: SocketAddr = raw.server.bind.parse().map_err(|_| {
        invalid(
            "server.bind",
            format!("'{}' is not an address:port", raw.server.bind),
        )
    })?;
    if raw.server.request_timeout_seconds == 0 {
        return Err(invalid(
            "server.request_timeout_seconds",
            "must be > 0".into(),
        ));
    }
    if raw.server.max_request_body_bytes == 0 {
        return Err(invalid(
            "server.max_request_body_bytes",
            "must be > 0".into(),
        ));
    }

    let format = match raw.logging.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(invalid(
                "logging.format",
                format!("must be 'text' or 'json', not '{other}'"),
            ))
        }
    };
    tracing_subscriber::EnvFilter::try_new(&raw.logging.level).map_err(|e| {
        invalid(
            "logging.level",
            format!("'{}' is not a log filter: {e}", raw.logging.level),
        )
    })?;

    if raw.sandbox.uid == 0 || raw.sandbox.gid == 0 {
        return Err(invalid(
            if raw.sandbox.uid == 0 {
                "sandbox.uid"
            } else {
                "sandbox.gid"
            },
            "must not be 0: sandboxed programs never run as host root".into(),
        ));
    }

    let mut hosts = std::collections::BTreeMap::new();
    for (name, addrs) in &raw.sandbox.hosts {
        let k = format!("sandbox.hosts.\"{name}\"");
        let norm = name.trim_end_matches('.').to_ascii_lowercase();
        if norm.is_empty()
            || norm.parse::<std::net::IpAddr>().is_ok()
            || !norm
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(invalid(&k, format!("'{name}' is not a host name")));
        }
        let list: Vec<&String> = match addrs {
            raw::HostAddrs::One(a) => vec![a],
            raw::HostAddrs::Many(v) => v.iter().collect(),
        };
        if list.is_empty() {
            return Err(invalid(&k, "needs at least one address".into()));
        }
        let mut ips = Vec::new();
        for a in list {
            ips.push(
                a.parse::<std::net::IpAddr>()
                    .map_err(|_| invalid(&k, format!("'{a}' is not an IP address")))?,
            );
        }
        hosts.insert(norm, ips);
    }

    let launch_timeout = raw.sandbox.launch_timeout_seconds;
    if !(0.1..=600.0).contains(&launch_timeout) {
        return Err(invalid(
            "sandbox.launch_timeout_seconds",
            format!("{launch_timeout} must be between 0.1 and 600"),
        ));
    }
    let launch_timeout = Duration::from_secs_f64(launch_timeout);
    if let Some(list) = &raw.sandbox.gpu_devices {
        for (i, p) in list.iter().enumerate() {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let known = name == "nvidiactl"
                || name == "nvidia-uvm"
                || name
                    .strip_prefix("nvidia")
                    .is_some_and(|n| n.parse::<u32>().is_ok());
            if !p.is_absolute() || !known {
                return Err(invalid(
                    &format!("sandbox.gpu_devices[{i}]"),
                    format!(
                        "'{}' is not an absolute path to nvidiactl, nvidia-uvm or nvidiaN",
                        p.display()
                    ),
                ));
            }
        }
    }

    let profiles = ProfileRegistry::load(profiles_dir, &raw.slm.sandbox_profiles, path.as_deref())?;
    // Every profile must be valid before anything starts, not when first used. The built-ins
    // (part of the binary, compiled by the test suite) compile when first used.
    let names: Vec<String> = profiles.names().map(str::to_string).collect();
    for name in names.iter().filter(|n| !profiles.is_builtin(n)) {
        profiles.resolve(name)?;
    }
    if profiles.resolve(&raw.slm.default_sandbox_profile).is_err() {
        return Err(invalid(
            "slm.default_sandbox_profile",
            format!(
                "no profile named '{}' (known: {})",
                raw.slm.default_sandbox_profile,
                names.join(", ")
            ),
        ));
    }

    let mut models = Catalog::default();
    let builtin: CatalogFile = toml::from_str(catalog::BUILTIN_CATALOG).unwrap_or_default();
    for m in builtin.models {
        let _ = models.insert(m, "built-in models/catalog.toml".into());
    }
    if let Some(cat) = &raw.slm.catalog {
        let text =
            crate::files::read_text(cat, crate::files::MAX_CONFIG_BYTES).map_err(|source| {
                ConfigError::Io {
                    path: cat.clone(),
                    source,
                }
            })?;
        let catfile = cat.display().to_string();
        let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: catfile.clone(),
            message: e.to_string(),
        })?;
        let parsed: CatalogFile = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::Invalid {
                file: catfile.clone(),
                key: e.path().to_string(),
                message: crate::profile::serde_message(e.into_inner()),
            })?;
        for (i, m) in parsed.models.into_iter().enumerate() {
            let id = m.id.clone();
            models
                .insert(m, catfile.clone())
                .map_err(|first| ConfigError::Invalid {
                    file: catfile.clone(),
                    key: format!("models[{i}].id"),
                    message: format!("model '{id}' is already defined in {first}"),
                })?;
        }
    }
    for (i, m) in raw.slm.model_allow_lists.global_models.iter().enumerate() {
        let k = format!("slm.model_allow_lists.global_models[{i}]");
        validate_model(m, &k, &profiles, &raw.slm.default_sandbox_profile)
            .map_err(|(sub, msg)| invalid(&format!("{k}{sub}"), msg))?;
        models
            .insert(m.clone(), file.to_string())
            .map_err(|first| {
                invalid(
                    &format!("{k}.id"),
                    format!("model '{}' is already defined in {first}", m.id),
                )
            })?;
    }
    let calibrators = crate::confidence::calibrator::Calibrators::new(
        models
            .calibrators()
            .map_err(|(id, msg)| invalid(&format!("model '{id}'"), msg))?,
    );
    // An entry names a catalog model, an alias, `PROVIDER/MODEL` of a configured provider, or
    // is a pattern (`openai/*`).
    for (agent, ids) in &raw.slm.model_allow_lists.agent_model_maps {
        for id in ids {
            let remote = id
                .split_once('/')
                .is_some_and(|(p, _)| raw.providers.contains_key(p));
            let ok = models.contains(id)
                || remote
                || raw.routing.aliases.contains_key(id)
                || id.contains(['*', '?']);
            if !ok {
                return Err(invalid(
                    &format!("slm.model_allow_lists.agent_model_maps.{agent}"),
                    format!(
                        "model '{id}' not in global_models (known: {}), not an alias, and not PROVIDER/MODEL of a configured provider",
                        models.ids().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }

    for (name, p) in &raw.providers {
        // `PROVIDER/MODEL` names a provider's model in requests: a name with `/` (or spaces)
        // could not be told apart.
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                &format!("providers.{name}"),
                "a provider's name is letters, digits, '-', '_' and '.' (requests name its models as NAME/MODEL)".into(),
            ));
        }
        p.validate(name).map_err(|m| match m.split_once(": ") {
            Some((k, msg)) if k.starts_with("providers.") => invalid(k, msg.to_string()),
            _ => invalid(&format!("providers.{name}"), m.clone()),
        })?;
    }
    let router = crate::routing::Router::compile(
        &raw.routing,
        crate::routing::Context {
            catalog: &models,
            providers: &raw.providers,
            profile_exists: &|p| profiles.resolve(p).is_ok(),
            default_profile: &raw.slm.default_sandbox_profile,
            slm_enabled: raw.slm.enabled,
            agent_model_maps: &raw.slm.model_allow_lists.agent_model_maps,
            base_dir: path
                .as_deref()
                .and_then(Path::parent)
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        },
    )
    .map_err(|(k, m)| invalid(&k, m))?;

    // The key itself, never a config key: parsed here so a bad one is reported before anything
    // runs, whether or not the log is enabled (`corral logs decrypt` uses it too).
    let env_key = match get("CORRAL_LOG_KEY") {
        None => None,
        Some(v) => Some(
            crate::audit::AuditKey::parse(&v, "environment variable CORRAL_LOG_KEY").map_err(
                |e| ConfigError::Env {
                    var: "CORRAL_LOG_KEY".into(),
                    message: match e {
                        crate::audit::AuditError::BadKey { message, .. } => message,
                        other => other.to_string(),
                    },
                },
            )?,
        ),
    };
    let audit = crate::audit::AuditConfig::compile(
        &raw.audit,
        &default_data_dir(get).join("audit"),
        env_key,
    )
    .map_err(|(k, m)| invalid(&k, m))?;

    let server_auth = auth::compile_auth(&raw.server.auth, bind.ip().is_loopback())
        .map_err(|(k, m)| invalid(&k, m))?;
    let server_pool =
        crate::pool::settings::compile_pool(&raw.server.pool, &|id| models.contains(id))
            .map_err(|(k, m)| invalid(&k, m))?;
    let model_dir = raw
        .slm
        .model_dir
        .clone()
        .unwrap_or_else(|| default_data_dir(get).join("models"));
    Ok(Config {
        path,
        server: ServerConfig {
            bind,
            request_timeout: Duration::from_secs(raw.server.request_timeout_seconds),
            max_request_body_bytes: raw.server.max_request_body_bytes,
            shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_seconds),
            auth: server_auth,
            pool: server_pool,
        },
        slm: SlmConfig {
            enabled: raw.slm.enabled,
            default_sandbox_profile: raw.slm.default_sandbox_profile,
            allow_runtime_overrides: raw.slm.model_allow_lists.allow_runtime_overrides,
            models,
            agent_model_maps: raw.slm.model_allow_lists.agent_model_maps,
            model_dir,
            calibrators,
        },
        logging: LoggingConfig {
            filter: raw.logging.level,
            format,
        },
        routing: std::sync::Arc::new(router),
        providers: raw.providers,
        sandbox: SandboxConfig {
            uid: raw.sandbox.uid,
            gid: raw.sandbox.gid,
            state_dir: raw.sandbox.state_dir,
            hosts,
            gpu_devices: raw.sandbox.gpu_devices,
            launch_timeout,
        },
        profiles,
        audit,
    })
}

/// Checks one model definition; errors are (key suffix, message).
fn validate_model(
    m: &catalog::ModelDef,
    _key: &str,
    profiles: &ProfileRegistry,
    default_profile: &str,
) -> std::result::Result<(), (String, String)> {
    let ok_id = !m.id.is_empty()
        && m.id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if !ok_id {
        return Err((
            ".id".into(),
            format!(
                "'{}' is not a valid model id (letters, digits, '-', '_', '.', ':')",
                m.id
            ),
        ));
    }
    if let Some(sha) = &m.sha256 {
        if !catalog::valid_sha256(sha) {
            return Err((".sha256".into(), "must be 64 hexadecimal digits".into()));
        }
    }
    let profile_name = m.sandbox_profile.as_deref().unwrap_or(default_profile);
    let profile = profiles
        .resolve(profile_name)
        .map_err(|e| (".sandbox_profile".to_string(), e.to_string()))?;
    if let Some(c) = m
        .resource_requirements
        .gpu_requirements
        .as_ref()
        .and_then(|g| g.compute_capability.as_deref())
    {
        let ok = match c.split_once('.') {
            Some((a, b)) => a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok(),
            None => c.parse::<u32>().is_ok(),
        };
        if !ok {
            return Err((
                ".resource_requirements.gpu_requirements.compute_capability".into(),
                format!("'{c}' is not a compute capability (MAJOR.MINOR, e.g. \"8.0\")"),
            ));
        }
    }
    if m.resource_requirements.min_memory_mb > profile.max_memory_mb {
        return Err((
            ".resource_requirements.min_memory_mb".into(),
            format!(
                "{} MiB exceeds profile '{}' max_memory_mb = {}",
                m.resource_requirements.min_memory_mb, profile.name, profile.max_memory_mb
            ),
        ));
    }
    Ok(())
}

/// corral's data directory, holding `models/` and `audit/`: `$XDG_DATA_HOME/corral`, else
/// `~/.local/share/corral`, else `/var/lib/corral`.
fn default_data_dir(get: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(x) = get("XDG_DATA_HOME") {
        return PathBuf::from(x).join("corral");
    }
    if let Some(h) = get("HOME") {
        return PathBuf::from(h).join(".local/share/corral");
    }
    PathBuf::from("/var/lib/corral")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml_text: &str, env: &[(&str, &str)]) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("corral.toml");
        std::fs::write(&p, toml_text).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Config::load_with_env(
            &Sources {
                config: Some(p),
                profiles_dir: None,
            },
            &move |k| env.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone()),
        )
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = load("", &[]).unwrap();
        assert!(c.slm.enabled);
        assert_eq!(c.slm.default_sandbox_profile, "secure");
        assert_eq!(c.server.bind.to_string(), "127.0.0.1:8080");
        assert!(c.slm.models.contains(catalog::DEFAULT_MODEL));
    }

    #[test]
    fn agent_map_to_unknown_model_names_file_and_key() {
        let err = load(
            "[slm.model_allow_lists.agent_model_maps]\ncode_generator = [\"x\"]\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.ends_with("corral.toml: slm.model_allow_lists.agent_model_maps.code_generator: model 'x' not in global_models (known: gemma3-270m, smollm2-135m-instruct), not an alias, and not PROVIDER/MODEL of a configured provider"), "{err}");
        // A provider nobody configured is no better.
        let err = load(
            "[slm.model_allow_lists.agent_model_maps]\ncode_generator = [\"openai/gpt-4o\"]\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("model 'openai/gpt-4o' not in global_models"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_and_precedence() {
        let c = load("[slm]\nenabled = true\n", &[("SLM_FIRST_ENABLED", "false")]).unwrap();
        assert!(!c.slm.enabled);
        let c = load(
            "",
            &[
                ("SLM_FIRST_ENABLED", "false"),
                ("CORRAL_SLM_ENABLED", "true"),
            ],
        )
        .unwrap();
        assert!(c.slm.enabled, "CORRAL_ wins over SLM_FIRST_");
        let c = load(
            "",
            &[
                ("SLM_FIRST_ALLOW_RUNTIME_OVERRIDES", "1"),
                ("SLM_FIRST_DEFAULT_SANDBOX_PROFILE", "standard"),
            ],
        )
        .unwrap();
        assert!(c.slm.allow_runtime_overrides);
        assert_eq!(c.slm.default_sandbox_profile, "standard");
        let err = load("", &[("SLM_FIRST_DEFAULT_SANDBOX_PROFILE", "nope")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("slm.default_sandbox_profile (from SLM_FIRST_DEFAULT_SANDBOX_PROFILE): no profile named 'nope'"), "{err}");
        let err = load("", &[("SLM_FIRST_ENABLED", "maybe")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "environment variable SLM_FIRST_ENABLED: expected true or false, got 'maybe'"
        );
    }

    #[test]
    fn unknown_keys_and_routing_errors_name_the_key() {
        let err = load("[server]\nbnid = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.bnid") && err.contains("unknown field"),
            "{err}"
        );
        let err = load("[routing]\nenabeld = true\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(": routing.enabeld: "), "{err}");
        let err = load("[routing.llm_fallback]\nproviders = [\"openai\"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("routing.llm_fallback.providers[0]: no provider 'openai'"),
            "{err}"
        );
        let c = load(
            "[providers.local]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n[routing.llm_fallback]\nproviders = [\"local\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.routing.fallback, vec!["local".to_string()]);
        let err = load("[sandbox]\nuid = 0\n", &[]).unwrap_err().to_string();
        assert!(err.contains("sandbox.uid: must not be 0"), "{err}");
    }

    #[test]
    fn audit_defaults_env_overrides_and_errors_name_the_key() {
        use crate::audit::{KeySource, QueueFull};
        let c = load("", &[("XDG_DATA_HOME", "/data")]).unwrap();
        assert!(!c.audit.enabled);
        assert_eq!(c.audit.dir, PathBuf::from("/data/corral/audit"));
        assert_eq!(c.slm.model_dir, PathBuf::from("/data/corral/models"));
        assert!(
            matches!(&c.audit.key, KeySource::Generated(p) if p == Path::new("/data/corral/audit/audit.key"))
        );
        assert_eq!(c.audit.on_queue_full, QueueFull::Drop);
        assert_eq!(c.audit.retention, Some(Duration::from_secs(90 * 86_400)));

        let c = load(
            "[audit]\nenabled = true\ndir = \"/a\"\nkey_file = \"/k\"\non_queue_full = \"block\"\nretention_days = 0\npii_kinds = [\"email\"]\n",
            &[],
        )
        .unwrap();
        assert!(c.audit.enabled && c.audit.retention.is_none());
        assert!(matches!(&c.audit.key, KeySource::File(p) if p == Path::new("/k")));
        assert_eq!(c.audit.on_queue_full, QueueFull::Block);
        assert_eq!(c.audit.pii_kinds, vec![crate::guardrails::PiiKind::Email]);

        let hex = "07".repeat(32);
        let c = load(
            "[audit]\nkey_file = \"/k\"\n",
            &[
                ("CORRAL_AUDIT_ENABLED", "yes"),
                ("CORRAL_AUDIT_DIR", "/env/audit"),
                ("CORRAL_LOG_KEY", &hex),
            ],
        )
        .unwrap();
        assert!(c.audit.enabled);
        assert_eq!(c.audit.dir, PathBuf::from("/env/audit"));
        assert!(
            matches!(c.audit.key, KeySource::Env(_)),
            "CORRAL_LOG_KEY wins"
        );

        let err = load("", &[("CORRAL_LOG_KEY", "abcd")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "environment variable CORRAL_LOG_KEY: 3 bytes, expected 32 (a 256-bit key, base64 or hex)"
        );
        let err = load("", &[("CORRAL_LOG_KEY", "not a key!")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("CORRAL_LOG_KEY: not base64 or hex"), "{err}");
        let err = load("[audit]\non_queue_full = \"wait\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("audit.on_queue_full") && err.contains("unknown variant"),
            "{err}"
        );
        let err = load("[audit]\nqueue_capacity = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("corral.toml: audit.queue_capacity: must be > 0"),
            "{err}"
        );
        let err = load("[audit]\nmax_file_bytes = 10\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("audit.max_file_bytes: must be at least 4096"),
            "{err}"
        );
        let err = load("[audit]\npii_kinds = []\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("audit.pii_kinds: must name at least one kind"),
            "{err}"
        );
        let err = load("[audit]\nsensitive_keys = [\"a\", \" \"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("audit.sensitive_keys[1]: must not be empty"),
            "{err}"
        );
        let err = load("[audit]\nkeyfile = \"/k\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("audit.keyfile") && err.contains("unknown field"),
            "{err}"
        );
    }

    #[test]
    fn inline_profile_errors_and_model_requirements() {
        let err = load(
            "[slm.sandbox_profiles.tiny.resources]\nmax_memory_mb = 0\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("slm.sandbox_profiles.tiny.resources.max_memory_mb: must be > 0"),
            "{err}"
        );
        let text = r#"
[slm.sandbox_profiles.tiny.resources]
max_memory_mb = 64
[[slm.model_allow_lists.global_models]]
id = "big"
name = "Big"
provider = { LocalFile = { file_path = "/models/big.gguf" } }
sandbox_profile = "tiny"
resource_requirements = { min_memory_mb = 4096 }
"#;
        let err = load(text, &[]).unwrap_err().to_string();
        assert!(err.contains("global_models[0].resource_requirements.min_memory_mb: 4096 MiB exceeds profile 'tiny'"), "{err}");
        let text = r#"
[[slm.model_allow_lists.global_models]]
id = "gpu-model"
name = "GPU model"
provider = { LocalFile = { file_path = "/models/g.gguf" } }
resource_requirements = { gpu_requirements = { min_vram_mb = 2048, compute_capability = "eight" } }
"#;
        let err = load(text, &[]).unwrap_err().to_string();
        assert!(
            err.contains(
                "gpu_requirements.compute_capability: 'eight' is not a compute capability"
            ),
            "{err}"
        );
        let ok = text.replace("\"eight\"", "\"8.0\"");
        load(&ok, &[]).unwrap();
    }
}
