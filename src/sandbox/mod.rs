//! The sandbox: a profile becomes one enforced child process.
//!
//! How the files relate:
//! - `host.rs` probes what this kernel can enforce; `plan.rs` turns profile + command + host
//!   into a [`Plan`] (mount list, Landlock rules, seccomp program, cgroup limits), failing closed
//!   on layers the host lacks; `elf.rs` finds the command's loader and libraries for it.
//! - `seccomp.rs` compiles the BPF program from the reviewed tables in `profiles/seccomp/`;
//!   `landlock.rs` wraps Landlock's syscalls; `cgroup.rs` handles cgroup v1, v2 and hybrids,
//!   with `devices.rs` for device access (v1 allow lists or a v2 BPF device program).
//! - `launch.rs` is the parent side of a launch and supervision; `spec.rs` prepares, in the
//!   parent, everything the child will use; `child.rs` is the child side, the only code that
//!   runs between `clone` and `execve` (raw system calls only: its module doc lists what it may
//!   call and why, and a test holds it to that).
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
mod spec;

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
    /// How long a launch may take from `clone` to a successful `execve` before the child is
    /// killed and the launch fails naming the step it was stuck in (`[sandbox]
    /// launch_timeout_seconds`).
    pub launch_timeout: std::time::Duration,
}

/// The default for [`SandboxConfig::launch_timeout`]: a launch takes ~10 ms.
pub const DEFAULT_LAUNCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
            launch_timeout: DEFAULT_LAUNCH_TIMEOUT,
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
    #[error("sandbox launch timed out after {:.1} s while {stage}; the child was killed (sandbox.launch_timeout_seconds)", after.as_secs_f64())]
    LaunchTimeout {
        stage: &'static str,
        after: std::time::Duration,
    },
    #[error("the supervisor is shutting down: no new sandbox is started")]
    ShuttingDown,
    #[error("filesystem.denied_paths[{index}] ('{}') hides {}, {role}: the program cannot start without it; take the path out of denied_paths or run a program that does not need it", denied.display(), path.display())]
    DeniedButNeeded {
        index: usize,
        denied: PathBuf,
        path: PathBuf,
        role: String,
    },
    #[error("{key} ('{}'): {reason}", path.display())]
    ProfilePath {
        key: String,
        path: PathBuf,
        reason: String,
    },
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
