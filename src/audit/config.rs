//! The `[audit]` section of corral.toml: its serde form ([`RawAudit`], each field's doc naming the
//! environment variable that overrides it) and its validated form ([`AuditConfig`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::key::{AuditKey, DEFAULT_KEY_FILE};
use crate::guardrails::{default_sensitive_keys, PiiKind};

/// What [`super::AuditLog::record`] does when the writer's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueFull {
    /// Drop the entry and count it ([`super::AuditStats::dropped`]); the request never waits.
    Drop,
    /// Wait until the writer has room (backpressure on the request path).
    Block,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    /// Write the audit log. Env: `CORRAL_AUDIT_ENABLED`.
    pub enabled: bool,
    /// Directory of the log files (created 0700). Default: `$XDG_DATA_HOME/corral/audit`, else
    /// `~/.local/share/corral/audit`, else `/var/lib/corral/audit`. Env: `CORRAL_AUDIT_DIR`.
    pub dir: Option<PathBuf>,
    /// Key file (base64 or hex, mode 0600 or stricter); must exist when set. Unset: the key in
    /// `CORRAL_LOG_KEY` (which always wins), else `DIR/audit.key`, generated on first use.
    /// Env: `CORRAL_AUDIT_KEY_FILE`.
    pub key_file: Option<PathBuf>,
    /// Entries the writer's queue holds.
    pub queue_capacity: usize,
    /// `drop` (count and drop when the queue is full) or `block` (wait).
    pub on_queue_full: QueueFull,
    /// Rotate the active file once it reaches this size.
    pub max_file_bytes: u64,
    /// Rotate the active file once it is this old.
    pub max_file_age_hours: u64,
    /// Delete sealed files this many days after they were sealed; 0 keeps them forever.
    pub retention_days: u64,
    /// Mask PII in payloads before encryption.
    pub mask_pii: bool,
    /// Which kinds `mask_pii` masks.
    pub pii_kinds: Vec<PiiKind>,
    /// JSON keys whose values are replaced by `[REDACTED]` in payloads, at any depth.
    pub sensitive_keys: Vec<String>,
    /// Group commit: the writer gathers entries arriving within this many milliseconds of the
    /// first and writes them with one fsync. Longer: fewer fsyncs competing with requests
    /// (measured in docs/performance.md), more entries lost if the machine crashes. 0: each
    /// batch as soon as the writer takes it.
    pub commit_interval_ms: u64,
}

impl Default for RawAudit {
    fn default() -> Self {
        RawAudit {
            enabled: false,
            dir: None,
            key_file: None,
            queue_capacity: 1024,
            on_queue_full: QueueFull::Drop,
            max_file_bytes: 64 * 1024 * 1024,
            max_file_age_hours: 24,
            retention_days: 90,
            mask_pii: true,
            pii_kinds: PiiKind::ALL.to_vec(),
            sensitive_keys: default_sensitive_keys(),
            commit_interval_ms: 50,
        }
    }
}

/// Where the writer's key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `CORRAL_LOG_KEY`, already parsed.
    Env(AuditKey),
    /// `audit.key_file`: must exist (an error otherwise).
    File(PathBuf),
    /// Nothing configured: this file (`DIR/audit.key`) is loaded, or generated (mode 0600) on
    /// first use and its path logged.
    Generated(PathBuf),
}

/// The validated `[audit]` section.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub enabled: bool,
    pub dir: PathBuf,
    pub key: KeySource,
    pub queue_capacity: usize,
    pub on_queue_full: QueueFull,
    pub max_file_bytes: u64,
    pub max_file_age: Duration,
    /// `None`: keep files forever.
    pub retention: Option<Duration>,
    pub mask_pii: bool,
    pub pii_kinds: Vec<PiiKind>,
    pub sensitive_keys: Vec<String>,
    pub commit_interval: Duration,
}

impl AuditConfig {
    /// The defaults, enabled, writing to `dir` with the key `dir/audit.key` (generated when
    /// missing).
    pub fn new(dir: impl Into<PathBuf>) -> AuditConfig {
        let dir = dir.into();
        let raw = RawAudit {
            enabled: true,
            ..RawAudit::default()
        };
        match AuditConfig::compile(&raw, &dir, None) {
            Ok(c) => c,
            Err((key, message)) => unreachable!("the defaults are valid ({key}: {message})"),
        }
    }

    /// Validates `raw`; `default_dir` applies when `raw.dir` is unset, `env_key` is the parsed
    /// `CORRAL_LOG_KEY`. Errors are (key path, message).
    pub fn compile(
        raw: &RawAudit,
        default_dir: &Path,
        env_key: Option<AuditKey>,
    ) -> Result<AuditConfig, (String, String)> {
        let err = |k: &str, m: &str| Err((format!("audit.{k}"), m.to_string()));
        if raw.queue_capacity == 0 {
            return err("queue_capacity", "must be > 0");
        }
        if raw.queue_capacity > 1 << 20 {
            return err("queue_capacity", "must be at most 1048576");
        }
        if raw.max_file_bytes < 4096 {
            return err("max_file_bytes", "must be at least 4096");
        }
        if raw.max_file_age_hours == 0 {
            return err("max_file_age_hours", "must be > 0");
        }
        if raw.retention_days > 36_500 {
            return err(
                "retention_days",
                "must be at most 36500 (use 0 to keep files forever)",
            );
        }
        if raw.mask_pii && raw.pii_kinds.is_empty() {
            return err(
                "pii_kinds",
                "must name at least one kind when mask_pii is on (or set mask_pii = false)",
            );
        }
        if raw.commit_interval_ms > 10_000 {
            return err("commit_interval_ms", "must be at most 10000");
        }
        if let Some(i) = raw.sensitive_keys.iter().position(|k| k.trim().is_empty()) {
            return err(&format!("sensitive_keys[{i}]"), "must not be empty");
        }
        let dir = raw.dir.clone().unwrap_or_else(|| default_dir.to_path_buf());
        if dir.as_os_str().is_empty() {
            return err("dir", "must not be empty");
        }
        let key = match (env_key, &raw.key_file) {
            (Some(k), _) => KeySource::Env(k),
            (None, Some(p)) => KeySource::File(p.clone()),
            (None, None) => KeySource::Generated(dir.join(DEFAULT_KEY_FILE)),
        };
        Ok(AuditConfig {
            enabled: raw.enabled,
            dir,
            key,
            queue_capacity: raw.queue_capacity,
            on_queue_full: raw.on_queue_full,
            max_file_bytes: raw.max_file_bytes,
            max_file_age: Duration::from_secs(raw.max_file_age_hours * 3600),
            retention: (raw.retention_days > 0)
                .then(|| Duration::from_secs(raw.retention_days * 86_400)),
            mask_pii: raw.mask_pii,
            pii_kinds: raw.pii_kinds.clone(),
            sensitive_keys: raw.sensitive_keys.clone(),
            commit_interval: Duration::from_millis(raw.commit_interval_ms),
        })
    }
}
