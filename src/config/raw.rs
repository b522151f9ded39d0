//! The serde form of corral.toml: every section optional, every field with a default.
//! Each field's doc says which environment variables override it (see `env.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::catalog::ModelDef;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub slm: RawSlm,
    pub logging: RawLogging,
    pub sandbox: RawSandbox,
    /// Policies, classification, thresholds, guardrails (see `crate::routing`).
    pub routing: crate::routing::RawRouting,
    /// Remote LLM providers by name (see `crate::providers`). API keys come from the
    /// environment variables they name, never from this file.
    pub providers: BTreeMap<String, crate::providers::ProviderConfig>,
    /// The encrypted model I/O audit log (see `crate::audit`; each field's doc names its
    /// environment variable). Its key may come from `CORRAL_LOG_KEY`, never from this file.
    pub audit: crate::audit::RawAudit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Listen address. Env: `CORRAL_SERVER_BIND`.
    pub bind: String,
    pub request_timeout_seconds: u64,
    pub max_request_body_bytes: u64,
    pub shutdown_grace_seconds: u64,
    /// API keys, the admin key, anonymous access (see `super::auth`).
    pub auth: super::auth::RawAuth,
    /// Warm runner pools (see `crate::pool::settings`).
    pub pool: crate::pool::RawPool,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            bind: "127.0.0.1:8080".into(),
            request_timeout_seconds: 120,
            max_request_body_bytes: 1024 * 1024,
            shutdown_grace_seconds: 30,
            auth: Default::default(),
            pool: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSlm {
    /// Use local SLMs at all. Env: `CORRAL_SLM_ENABLED`, `SLM_FIRST_ENABLED`.
    pub enabled: bool,
    /// Profile for runners of models that name none.
    /// Env: `CORRAL_SLM_DEFAULT_SANDBOX_PROFILE`, `SLM_FIRST_DEFAULT_SANDBOX_PROFILE`.
    pub default_sandbox_profile: String,
    pub model_allow_lists: RawAllowLists,
    /// Inline profiles, `[slm.sandbox_profiles.NAME]`, in the profile file schema.
    pub sandbox_profiles: BTreeMap<String, toml::Table>,
    /// Where model files are stored. Env: `CORRAL_MODEL_DIR`.
    pub model_dir: Option<PathBuf>,
    /// An extra catalog file (`[[models]]`), beside the built-in one.
    pub catalog: Option<PathBuf>,
}

impl Default for RawSlm {
    fn default() -> Self {
        RawSlm {
            enabled: true,
            default_sandbox_profile: "secure".into(),
            model_allow_lists: RawAllowLists::default(),
            sandbox_profiles: BTreeMap::new(),
            model_dir: None,
            catalog: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAllowLists {
    /// Models beyond the catalog's.
    pub global_models: Vec<ModelDef>,
    /// agent id -> the only models that agent may use. Agents not listed may use every model.
    pub agent_model_maps: BTreeMap<String, Vec<String>>,
    /// Allow changing allow lists at run time (admin API).
    /// Env: `CORRAL_SLM_ALLOW_RUNTIME_OVERRIDES`, `SLM_FIRST_ALLOW_RUNTIME_OVERRIDES`.
    pub allow_runtime_overrides: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLogging {
    /// `tracing` filter (`info`, `corral=debug`). Env: `CORRAL_LOG` (filter syntax).
    pub level: String,
    /// `text` or `json`. Env: `CORRAL_LOG_FORMAT`.
    pub format: String,
}

impl Default for RawLogging {
    fn default() -> Self {
        RawLogging {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSandbox {
    /// Host uid sandboxed programs run as. Env: `CORRAL_SANDBOX_UID`.
    pub uid: u32,
    /// Host gid sandboxed programs run as. Env: `CORRAL_SANDBOX_GID`.
    pub gid: u32,
    /// Runtime state directory. Env: `CORRAL_STATE_DIR`.
    pub state_dir: PathBuf,
    /// Host names the egress proxy maps to fixed addresses instead of asking DNS
    /// (`"api.internal" = "10.0.0.7"` or a list).
    pub hosts: std::collections::BTreeMap<String, HostAddrs>,
    /// NVIDIA device nodes GPU profiles may get (default: every /dev/nvidia* node).
    pub gpu_devices: Option<Vec<PathBuf>>,
    /// Seconds a sandbox launch may take from `clone` to `execve` before the child is killed.
    pub launch_timeout_seconds: f64,
}

/// One address or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum HostAddrs {
    One(String),
    Many(Vec<String>),
}

impl Default for RawSandbox {
    fn default() -> Self {
        let d = crate::sandbox::SandboxConfig::default();
        RawSandbox {
            uid: d.uid,
            gid: d.gid,
            state_dir: d.state_dir,
            hosts: Default::default(),
            gpu_devices: None,
            launch_timeout_seconds: d.launch_timeout.as_secs_f64(),
        }
    }
}
