//! The sandbox: a profile becomes one enforced child process.
//!
//! How the files relate:
//! - `host.rs` probes what this kernel can enforce; `plan.rs` turns profile + command + host
//!   into a [`Plan`] (mount list, Landlock rules, seccomp program, cgroup limits), failing closed
//!   on layers the host lacks; `elf.rs` finds the command's loader and libraries for it.
//! - `seccomp.rs` compiles the BPF program from the reviewed tables in `profiles/seccomp/`;
//!   `landlock.rs` wraps Landlock's syscalls; `cgroup.rs` handles cgroup v1, v2 and hybrids,
//!   with `devices.rs` for device access (v1 allow lists or a v2 BPF device program).
//! - `launch.rs` is the parent side of a launch and supervision; `child.rs` the child side, the
//!   only code that runs between `clone` and `execve` (async-signal-safe syscalls only).
//!
//! Every sandbox gets new user, pid, mount, ipc, uts, cgroup and (unless network Full) net
//! namespaces, runs as an unprivileged uid/gid with no capabilities and no_new_privs, in a
//! minimal root, with Landlock and seccomp on top. `docs/sandbox.md` explains each layer.

pub mod cgroup;
mod child;
pub mod devices;
pub mod egress;
pub mod elf;
pub mod gpu;
pub mod host;
pub mod landlock;
pub mod launch;
pub mod plan;
pub mod seccomp;

use std::path::PathBuf;

pub use host::HostSupport;
pub use launch::{Exit, LaunchTimes, LimitHit, Outcome, Sandbox};
pub use plan::{Command, Degradation, Plan};

use crate::profile::Profile;

/// Host-level settings shared by every sandbox (`[sandbox]` in corral.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The host uid/gid sandboxed programs run as. Must not be 0 and should belong to no one else.
    pub uid: u32,
    pub gid: u32,
    /// Where corral keeps its runtime state (the directory each child mounts its root on).
    pub state_dir: PathBuf,
    /// Names mapped to addresses for the egress proxy (`[sandbox.hosts]`), used instead of DNS.
    pub hosts: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    /// The NVIDIA device nodes corral may hand to GPU profiles (`[sandbox] gpu_devices`);
    /// None: every `/dev/nvidia*` node of the host.
    pub gpu_devices: Option<Vec<PathBuf>>,
}

pub const DEFAULT_UID: u32 = 61_000;
pub const DEFAULT_GID: u32 = 61_000;

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            uid: DEFAULT_UID,
            gid: DEFAULT_GID,
            state_dir: PathBuf::from("/run/corral"),
            hosts: Default::default(),
            gpu_devices: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the sandbox needs root on the host (to build namespaces, mounts and cgroups); run corral as root")]
    NotRoot,
    #[error("profile '{profile}' cannot be enforced on this host: {}; {hint}", layers.join("; "))]
    Unenforceable {
        profile: String,
        layers: Vec<String>,
        hint: &'static str,
    },
    #[error("no command given")]
    EmptyCommand,
    #[error("command not found: {}", command.display())]
    CommandNotFound { command: PathBuf },
    #[error("permission denied: {} is not executable", path.display())]
    NotExecutable { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Path { path: PathBuf, reason: String },
    #[error(transparent)]
    Elf(#[from] elf::ElfError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox setup failed while {stage}{detail}: {source}")]
    Child {
        stage: String,
        detail: String,
        source: std::io::Error,
    },
    #[error("GPU access for profile '{profile}': {reason}")]
    Gpu { profile: String, reason: String },
    #[error("the sandbox's first process died before starting the command")]
    ChildDied,
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// Plans and starts `cmd` under `profile`; stdio is inherited.
pub fn launch(
    profile: &Profile,
    cmd: &Command,
    cfg: &SandboxConfig,
    host: &HostSupport,
) -> Result<Sandbox> {
    let plan = plan::plan(profile, cmd, host, cfg)?;
    launch::spawn(&plan, cfg, host, [None, None, None])
}
