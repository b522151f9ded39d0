//! Raw profile -> compiled [`Profile`]: every check a profile must pass before any launch.
//!
//! Errors name the key (`process_limits.max_execution_time_seconds`) or the offending value
//! (`process_limits.allowed_syscalls[2]: unknown syscall 'fooo'`); the caller prefixes the file.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use syscalls::Sysno;

use super::schema::{
    DeniedAction, Destination, Enforcement, GpuAccess, NetworkAccessMode, Protocol, RawProfile,
};
use crate::sandbox::seccomp;

/// A validated profile: the typed values the sandbox planner uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    /// Where it was defined (`built-in`, a file path, or `corral.toml [slm.sandbox_profiles.X]`).
    pub origin: String,
    pub description: Option<String>,
    pub enforcement: Enforcement,
    pub max_memory_mb: u64,
    pub max_cpu_cores: f64,
    pub max_disk_mb: u64,
    pub gpu_access: GpuAccess,
    pub max_io_bandwidth_mbps: Option<u64>,
    pub read_paths: Vec<PathBuf>,
    pub write_paths: Vec<PathBuf>,
    pub denied_paths: Vec<PathBuf>,
    pub allow_temp_files: bool,
    pub max_file_size_mb: u64,
    pub max_child_processes: u32,
    pub max_threads: u32,
    pub max_execution_time: Duration,
    pub allowed_syscalls: Vec<Sysno>,
    pub process_priority: i32,
    pub network: NetworkAccessMode,
    pub allowed_destinations: Vec<Destination>,
    pub max_bandwidth_mbps: Option<u64>,
    pub strict_syscall_filtering: bool,
    pub disable_debugging: bool,
    pub enable_audit_logging: bool,
    pub require_encryption: bool,
    pub seccomp_denied_action: DeniedAction,
    /// Things worth knowing that are not errors (a path in both read_paths and write_paths),
    /// printed by `corral profile check`.
    pub notes: Vec<String>,
    /// The merged raw form, for `corral profile show`.
    pub raw: RawProfile,
}

impl Profile {
    /// Threads the program is told to use: the ceiling of the CPU quota.
    pub fn thread_count(&self) -> u32 {
        // Validation bounds max_cpu_cores to (0, 4096], so the cast cannot overflow.
        (self.max_cpu_cores.ceil() as u32).max(1)
    }

    /// The cgroup pids limit: threads plus child processes (the kernel counts both).
    pub fn pids_limit(&self) -> u64 {
        u64::from(self.max_threads) + u64::from(self.max_child_processes)
    }
}

/// One validation failure: the key path inside the profile and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Default when `process_limits.max_threads` is not given.
pub const DEFAULT_MAX_THREADS: u32 = 64;

pub fn validate(name: &str, origin: &str, raw: RawProfile) -> Result<Profile, Invalid> {
    let r = &raw.resources;
    if r.max_memory_mb == 0 {
        return Err(invalid("resources.max_memory_mb", "must be > 0"));
    }
    if r.max_memory_mb > 16 * 1024 * 1024 {
        return Err(invalid("resources.max_memory_mb", "is larger than 16 TiB"));
    }
    if !(r.max_cpu_cores.is_finite() && r.max_cpu_cores > 0.0) {
        return Err(invalid("resources.max_cpu_cores", "must be > 0"));
    }
    if r.max_cpu_cores > 4096.0 {
        return Err(invalid("resources.max_cpu_cores", "must be <= 4096"));
    }
    if r.max_cpu_cores < 0.01 {
        return Err(invalid(
            "resources.max_cpu_cores",
            "must be >= 0.01 (the kernel's smallest CPU quota is 1 ms per 100 ms)",
        ));
    }
    if let GpuAccess::Shared { max_memory_mb: 0 } = r.gpu_access {
        return Err(invalid(
            "resources.gpu_access.Shared.max_memory_mb",
            "must be > 0",
        ));
    }
    if r.max_io_bandwidth_mbps == Some(0) {
        return Err(invalid(
            "resources.max_io_bandwidth_mbps",
            "must be > 0 (leave it out for no limit)",
        ));
    }

    let fs = &raw.filesystem;
    let mut read_paths = paths("filesystem.read_paths", &fs.read_paths)?;
    let mut notes = Vec::new();
    let write_paths = paths("filesystem.write_paths", &fs.write_paths)?;
    let denied_paths = paths("filesystem.denied_paths", &fs.denied_paths)?;
    for (i, p) in read_paths.iter().chain(&write_paths).enumerate() {
        let key = if i < read_paths.len() {
            format!("filesystem.read_paths[{i}]")
        } else {
            format!("filesystem.write_paths[{}]", i - read_paths.len())
        };
        if p.starts_with("/proc") || p.starts_with("/dev") {
            return Err(invalid(
                key,
                format!(
                    "'{}': the sandbox has its own /proc and /dev; host ones cannot be bound",
                    p.display()
                ),
            ));
        }
        if let Some(d) = denied_paths.iter().find(|d| p.starts_with(d)) {
            return Err(invalid(
                key,
                format!(
                    "'{}' lies inside denied path '{}'",
                    p.display(),
                    d.display()
                ),
            ));
        }
    }
    if let Some(i) = read_paths.iter().position(|p| p == Path::new("/")) {
        return Err(invalid(
            format!("filesystem.read_paths[{i}]"),
            "'/' would show the sandbox the whole host (and hide the sandbox's own root); list the directories the program needs, such as /usr or /etc/ssl",
        ));
    }
    for (i, p) in write_paths.iter().enumerate() {
        let key = format!("filesystem.write_paths[{i}]");
        if p == Path::new("/") {
            return Err(invalid(key, "'/' would make the whole host writable"));
        }
        if p.starts_with("/sys") {
            return Err(invalid(
                key,
                format!("'{}': /sys can only be read", p.display()),
            ));
        }
        if let Some(r) = read_paths.iter().position(|rp| rp == p) {
            notes.push(format!(
                "{key} '{}' is also filesystem.read_paths[{r}]: writing implies reading, the write rule applies",
                p.display()
            ));
        }
    }
    let tmp = Path::new("/tmp");
    if fs.allow_temp_files && (read_paths.iter().chain(&write_paths).any(|p| p == tmp)) {
        notes.push(
            "'/tmp' is listed in filesystem paths: with allow_temp_files the sandbox gets a private /tmp instead of the host's"
                .into(),
        );
    }
    // Writing implies reading: a path in both lists is bound (and allowed) writable, once.
    read_paths.retain(|rp| !write_paths.contains(rp));
    if fs.allow_temp_files && r.max_disk_mb == 0 {
        return Err(invalid(
            "resources.max_disk_mb",
            "must be > 0 when filesystem.allow_temp_files is true (it sizes /tmp)",
        ));
    }
    if fs.max_file_size_mb == 0 {
        return Err(invalid("filesystem.max_file_size_mb", "must be > 0"));
    }

    let pl = &raw.process_limits;
    if pl.max_execution_time_seconds == 0 {
        return Err(invalid(
            "process_limits.max_execution_time_seconds",
            "must be > 0",
        ));
    }
    if pl.max_child_processes > 65_536 {
        return Err(invalid(
            "process_limits.max_child_processes",
            "must be <= 65536",
        ));
    }
    if !(-20..=19).contains(&pl.process_priority) {
        return Err(invalid(
            "process_limits.process_priority",
            "must be a nice value in -20..=19",
        ));
    }
    let max_threads = pl.max_threads.unwrap_or(DEFAULT_MAX_THREADS);
    if max_threads == 0 || max_threads > 65_536 {
        return Err(invalid(
            "process_limits.max_threads",
            "must be in 1..=65536",
        ));
    }
    let mut allowed_syscalls = Vec::with_capacity(pl.allowed_syscalls.len());
    for (i, name) in pl.allowed_syscalls.iter().enumerate() {
        let key = format!("process_limits.allowed_syscalls[{i}]");
        let sysno = seccomp::sysno(name.trim()).ok_or_else(|| {
            invalid(
                &key,
                format!("unknown syscall '{name}' on {}", std::env::consts::ARCH),
            )
        })?;
        if let Some(reason) = seccomp::never_allowed(sysno) {
            return Err(invalid(
                key,
                format!("syscall '{name}' cannot be allowed: {reason}"),
            ));
        }
        allowed_syscalls.push(sysno);
    }

    let net = &raw.network;
    match net.access_mode {
        NetworkAccessMode::Restricted => {
            if net.allowed_destinations.is_empty() {
                return Err(invalid("network.allowed_destinations", "must list at least one destination when access_mode is Restricted (use None for no network)"));
            }
        }
        mode => {
            if !net.allowed_destinations.is_empty() {
                return Err(invalid(
                    "network.allowed_destinations",
                    format!("only applies to access_mode Restricted, not {mode:?}"),
                ));
            }
            if net.max_bandwidth_mbps.is_some() {
                return Err(invalid(
                    "network.max_bandwidth_mbps",
                    format!("only applies to access_mode Restricted, not {mode:?}"),
                ));
            }
        }
    }
    for (i, d) in net.allowed_destinations.iter().enumerate() {
        let key = format!("network.allowed_destinations[{i}]");
        let host = d.host.trim();
        if host.is_empty() || host.contains(['/', ' ', '*']) {
            return Err(invalid(
                format!("{key}.host"),
                format!("'{}' is not a host name or address", d.host),
            ));
        }
        if d.port == Some(0) {
            return Err(invalid(format!("{key}.port"), "must be in 1..=65535"));
        }
        if d.protocol == Some(Protocol::Udp) {
            return Err(invalid(
                format!("{key}.protocol"),
                "UDP destinations are not supported: the egress proxy carries TCP, HTTP and HTTPS only",
            ));
        }
        if d.protocol == Some(Protocol::Tcp) && d.port.is_none() {
            return Err(invalid(
                format!("{key}.port"),
                "a TCP destination needs a port",
            ));
        }
    }
    if net.max_bandwidth_mbps == Some(0) {
        return Err(invalid(
            "network.max_bandwidth_mbps",
            "must be > 0 (leave it out for no limit)",
        ));
    }
    if net.max_bandwidth_mbps.is_some_and(|m| m > 1_000_000) {
        return Err(invalid(
            "network.max_bandwidth_mbps",
            "must be <= 1000000 (1 Tbit/s; leave it out for no limit)",
        ));
    }

    let sec = &raw.security;
    Ok(Profile {
        name: name.to_string(),
        origin: origin.to_string(),
        description: raw.description.clone(),
        enforcement: raw.enforcement,
        max_memory_mb: r.max_memory_mb,
        max_cpu_cores: r.max_cpu_cores,
        max_disk_mb: r.max_disk_mb,
        gpu_access: r.gpu_access,
        max_io_bandwidth_mbps: r.max_io_bandwidth_mbps,
        read_paths,
        write_paths,
        denied_paths,
        allow_temp_files: fs.allow_temp_files,
        max_file_size_mb: fs.max_file_size_mb,
        max_child_processes: pl.max_child_processes,
        max_threads,
        max_execution_time: Duration::from_secs(pl.max_execution_time_seconds),
        allowed_syscalls,
        process_priority: pl.process_priority,
        network: net.access_mode,
        allowed_destinations: net.allowed_destinations.clone(),
        max_bandwidth_mbps: net.max_bandwidth_mbps,
        strict_syscall_filtering: sec.strict_syscall_filtering,
        disable_debugging: sec.disable_debugging,
        enable_audit_logging: sec.enable_audit_logging,
        require_encryption: sec.require_encryption,
        seccomp_denied_action: sec.seccomp_denied_action.unwrap_or_default(),
        notes,
        raw,
    })
}

fn paths(key: &str, list: &[String]) -> Result<Vec<PathBuf>, Invalid> {
    let mut out: Vec<PathBuf> = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let p = normalize_path(s).map_err(|m| invalid(format!("{key}[{i}]"), m))?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// Accepts an absolute path, optionally ending in `/*` or `/**` (the design's notation for
/// "this directory and everything below it"), and returns it in normal form.
pub fn normalize_path(s: &str) -> Result<PathBuf, String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if s.contains('\0') {
        return Err("must not contain NUL".into());
    }
    let trimmed = s
        .strip_suffix("/**")
        .or_else(|| s.strip_suffix("/*"))
        .unwrap_or(s);
    let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
    if trimmed.contains(['*', '?', '[']) {
        return Err(format!(
            "'{s}': wildcards are only supported as a trailing '/*' (the whole directory)"
        ));
    }
    let path = Path::new(trimmed);
    if !path.is_absolute() {
        return Err(format!("'{s}' must be an absolute path"));
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir => return Err(format!("'{s}' must not contain '..'")),
            Component::Prefix(_) => return Err(format!("'{s}' is not a Unix path")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_design_globs_and_rejects_others() {
        assert_eq!(
            normalize_path("/tmp/sandbox/*").unwrap(),
            PathBuf::from("/tmp/sandbox")
        );
        assert_eq!(normalize_path("/etc/**").unwrap(), PathBuf::from("/etc"));
        assert_eq!(normalize_path("/*").unwrap(), PathBuf::from("/"));
        assert_eq!(
            normalize_path("//usr/./lib/").unwrap(),
            PathBuf::from("/usr/lib")
        );
        assert!(normalize_path("/usr/*/lib")
            .unwrap_err()
            .contains("wildcards"));
        assert!(normalize_path("usr/lib").unwrap_err().contains("absolute"));
        assert!(normalize_path("/usr/../etc").unwrap_err().contains(".."));
        assert!(normalize_path("  ").unwrap_err().contains("empty"));
    }
}
