//! The raw, serde form of a sandbox profile: exactly the TOML a user writes.
//!
//! Field names and shapes follow the profile schema of the SLM-first design corral implements
//! (`resources`, `filesystem`, `process_limits`, `network`, `security`), plus a few corral
//! extensions that are all optional: `extends`, `enforcement`, `description`,
//! `process_limits.max_threads` and `security.seccomp_denied_action`.

use serde::{Deserialize, Serialize};

/// A profile as written in `profiles/NAME.toml` or `[slm.sandbox_profiles.NAME]`.
///
/// Every section is required once the profile has been merged onto its base (the profile named
/// by `extends`, or the built-in `secure` profile), so a file may give only what differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    /// Name of the profile this one starts from (default: the built-in `secure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// Free text shown by `corral profile show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `strict` (default): a layer the host cannot enforce fails the launch.
    /// `best_effort`: such a layer is skipped and the degradation logged and reported.
    #[serde(default)]
    pub enforcement: Enforcement,
    pub resources: RawResources,
    pub filesystem: RawFilesystem,
    pub process_limits: RawProcessLimits,
    pub network: RawNetwork,
    pub security: RawSecurity,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    #[default]
    Strict,
    BestEffort,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    pub max_memory_mb: u64,
    pub max_cpu_cores: f64,
    pub max_disk_mb: u64,
    pub gpu_access: GpuAccess,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_io_bandwidth_mbps: Option<u64>,
}

/// `gpu_access = "None" | { Shared = { max_memory_mb = N } } | "Exclusive"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuAccess {
    None,
    Shared { max_memory_mb: u64 },
    Exclusive,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilesystem {
    pub read_paths: Vec<String>,
    pub write_paths: Vec<String>,
    pub denied_paths: Vec<String>,
    pub allow_temp_files: bool,
    pub max_file_size_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcessLimits {
    pub max_child_processes: u32,
    pub max_execution_time_seconds: u64,
    pub allowed_syscalls: Vec<String>,
    pub process_priority: i32,
    /// Threads the program may run at once (corral extension). The cgroup pids limit is
    /// `max_threads + max_child_processes`, since the kernel counts threads as pids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_threads: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    pub access_mode: NetworkAccessMode,
    #[serde(default)]
    pub allowed_destinations: Vec<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mbps: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkAccessMode {
    None,
    Restricted,
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecurity {
    pub strict_syscall_filtering: bool,
    pub disable_debugging: bool,
    pub enable_audit_logging: bool,
    pub require_encryption: bool,
    /// What a syscall outside the filter gets: `errno` (EPERM, default) or `kill`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp_denied_action: Option<DeniedAction>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeniedAction {
    #[default]
    Errno,
    Kill,
}
