//! Environment overrides, applied to the raw config before validation. `CORRAL_*` wins over the
//! `SLM_FIRST_*` names that users of the SLM-first design already know; both win over the file.

use super::raw::RawConfig;
use super::ConfigError;

/// (variables in precedence order, key they override)
pub const OVERRIDES: &[(&[&str], &str)] = &[
    (&["CORRAL_SLM_ENABLED", "SLM_FIRST_ENABLED"], "slm.enabled"),
    (
        &[
            "CORRAL_SLM_DEFAULT_SANDBOX_PROFILE",
            "SLM_FIRST_DEFAULT_SANDBOX_PROFILE",
        ],
        "slm.default_sandbox_profile",
    ),
    (
        &[
            "CORRAL_SLM_ALLOW_RUNTIME_OVERRIDES",
            "SLM_FIRST_ALLOW_RUNTIME_OVERRIDES",
        ],
        "slm.model_allow_lists.allow_runtime_overrides",
    ),
    (&["CORRAL_MODEL_DIR"], "slm.model_dir"),
    (&["CORRAL_SERVER_BIND"], "server.bind"),
    (&["CORRAL_LOG"], "logging.level"),
    (&["CORRAL_LOG_FORMAT"], "logging.format"),
    (&["CORRAL_SANDBOX_UID"], "sandbox.uid"),
    (&["CORRAL_SANDBOX_GID"], "sandbox.gid"),
    (&["CORRAL_STATE_DIR"], "sandbox.state_dir"),
    (&["CORRAL_AUDIT_ENABLED"], "audit.enabled"),
    (&["CORRAL_AUDIT_DIR"], "audit.dir"),
    (&["CORRAL_AUDIT_KEY_FILE"], "audit.key_file"),
];

fn parse_bool(var: &str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Env {
            var: var.into(),
            message: format!("expected true or false, got '{v}'"),
        }),
    }
}

fn parse_u32(var: &str, v: &str) -> Result<u32, ConfigError> {
    v.trim().parse().map_err(|_| ConfigError::Env {
        var: var.into(),
        message: format!("expected a number, got '{v}'"),
    })
}

/// Applies every set override; returns (key, variable) for each applied, so errors in the
/// resulting values can name the variable.
pub fn apply(
    raw: &mut RawConfig,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let mut applied = Vec::new();
    for (vars, key) in OVERRIDES {
        let Some((var, value)) = vars.iter().find_map(|v| get(v).map(|val| (*v, val))) else {
            continue;
        };
        match *key {
            "slm.enabled" => raw.slm.enabled = parse_bool(var, &value)?,
            "slm.default_sandbox_profile" => {
                raw.slm.default_sandbox_profile = value.trim().to_string()
            }
            "slm.model_allow_lists.allow_runtime_overrides" => {
                raw.slm.model_allow_lists.allow_runtime_overrides = parse_bool(var, &value)?
            }
            "slm.model_dir" => raw.slm.model_dir = Some(value.into()),
            "server.bind" => raw.server.bind = value,
            "logging.level" => raw.logging.level = value,
            "logging.format" => raw.logging.format = value,
            "sandbox.uid" => raw.sandbox.uid = parse_u32(var, &value)?,
            "sandbox.gid" => raw.sandbox.gid = parse_u32(var, &value)?,
            "sandbox.state_dir" => raw.sandbox.state_dir = value.into(),
            "audit.enabled" => raw.audit.enabled = parse_bool(var, &value)?,
            "audit.dir" => raw.audit.dir = Some(value.into()),
            "audit.key_file" => raw.audit.key_file = Some(value.into()),
            _ => continue,
        }
        applied.push((*key, var.to_string()));
    }
    Ok(applied)
}
