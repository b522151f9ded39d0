//! Profile + command + host facts -> a [`Plan`]: everything the child will do, computed before
//! `fork` (mount list, Landlock rules, seccomp program, cgroup limits, rlimits, environment), and
//! the list of layers this host cannot enforce, which fails the launch unless the profile opted
//! into best effort.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::cgroup::Limits;
use super::host::HostSupport;
use super::landlock::{self, Handled};
use super::seccomp::{self, FilterSpec, SockFilter};
use super::{egress, elf, gpu, SandboxConfig, SandboxError};
use crate::profile::schema::{Enforcement, GpuAccess, NetworkAccessMode};
use crate::profile::Profile;

/// What to run, and what beyond the profile it needs.
#[derive(Debug, Clone, Default)]
pub struct Command {
    /// argv; `argv[0]` is resolved through PATH when it has no `/`.
    pub argv: Vec<OsString>,
    /// Variables added to the clean environment.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory inside the sandbox (default `/tmp` with temp files, else `/`).
    pub cwd: Option<PathBuf>,
    /// Extra paths bound read-only (a runner's model files), beyond `read_paths`.
    pub extra_read: Vec<PathBuf>,
    /// Force an empty network namespace whatever the profile says (model runners).
    pub force_no_network: bool,
    /// The reviewed allow-list strict profiles start from.
    pub seccomp_base: seccomp::Base,
    /// Calls the program needs beyond its base set (never those of the `[never]` table).
    pub extra_syscalls: Vec<syscalls::Sysno>,
}

/// A layer the host cannot enforce as the profile asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degradation {
    pub layer: String,
    pub reason: String,
    /// Another layer already enforces the same thing: reported, never fatal.
    pub covered: bool,
}

impl fmt::Display for Degradation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.layer, self.reason)
    }
}

/// One step of building the sandbox's root, in order. Paths are sandbox paths (`/usr/lib`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsOp {
    Dir {
        path: PathBuf,
    },
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
    /// Bind `src` (host) at `path`; a file bind first creates an empty file there.
    Bind {
        src: PathBuf,
        path: PathBuf,
        writable: bool,
        is_dir: bool,
        exec: bool,
        dev: bool,
        needs_mountpoint: bool,
    },
    Tmpfs {
        path: PathBuf,
        size_bytes: u64,
        mode: u32,
        readonly: bool,
    },
    Proc {
        path: PathBuf,
    },
    /// Make the mount at `path` read-only (after populating it).
    ReadOnly {
        path: PathBuf,
    },
    /// Hide a directory under an empty, read-only, mode-0 tmpfs.
    MaskDir {
        path: PathBuf,
    },
    /// Hide a file (or socket, fifo, device) under the empty mode-0 file.
    MaskFile {
        path: PathBuf,
    },
}

impl fmt::Display for FsOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsOp::Dir { path } => write!(f, "mkdir {}", path.display()),
            FsOp::Symlink { path, target } => {
                write!(f, "symlink {} -> {}", path.display(), target.display())
            }
            FsOp::Bind { src, writable, .. } => write!(
                f,
                "bind {} ({})",
                src.display(),
                if *writable { "rw" } else { "ro" }
            ),
            FsOp::Tmpfs { path, .. } => write!(f, "tmpfs on {}", path.display()),
            FsOp::Proc { path } => write!(f, "proc on {}", path.display()),
            FsOp::ReadOnly { path } => write!(f, "remount {} read-only", path.display()),
            FsOp::MaskDir { path } | FsOp::MaskFile { path } => {
                write!(f, "mask {}", path.display())
            }
        }
    }
}

/// The device nodes every sandbox's /dev has.
const BASIC_DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// Path of the empty, mode-0 file used to mask denied files.
pub const MASK_FILE: &str = "/.corral-masked";

#[derive(Debug, Clone)]
pub struct Plan {
    pub profile: String,
    /// The command as execve will see it (a sandbox path, identical to the host path).
    pub exe: PathBuf,
    pub argv: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    pub fs_ops: Vec<FsOp>,
    pub landlock: Option<(Handled, Vec<(PathBuf, u64)>)>,
    pub seccomp: Option<Vec<SockFilter>>,
    pub seccomp_log: bool,
    pub new_userns: bool,
    pub new_netns: bool,
    pub cgroup: Limits,
    pub rlimits: Vec<(u32, u64)>,
    pub nice: i32,
    pub uid: u32,
    pub gid: u32,
    pub threads: u32,
    pub time_limit: std::time::Duration,
    pub memory_mb: u64,
    pub pids_limit: u64,
    pub degradations: Vec<Degradation>,
    /// The egress proxy for network Restricted.
    pub egress: Option<egress::Policy>,
    /// TCP ports Landlock lets the program connect to (when it handles network rights).
    pub landlock_connect_ports: Vec<u16>,
    /// The GPUs handed to the sandbox (held until it ends).
    pub gpu: Option<gpu::GpuLease>,
}

/// Host-side checks of a profile: the degradations it would suffer here (empty = fully
/// enforceable). Shared by the planner and `corral doctor`.
pub fn check_host(
    profile: &Profile,
    host: &HostSupport,
    force_no_network: bool,
) -> Vec<Degradation> {
    let mut d = Vec::new();
    let mut add = |layer: &str, reason: String, covered: bool| {
        d.push(Degradation {
            layer: layer.into(),
            reason,
            covered,
        })
    };
    let network = if force_no_network {
        NetworkAccessMode::None
    } else {
        profile.network
    };
    if !host.user_namespaces {
        add(
            "user namespace",
            "user namespaces are disabled (user.max_user_namespaces = 0)".into(),
            false,
        );
    }
    if !host.seccomp {
        add(
            "seccomp",
            "this kernel has no seccomp filter support with SECCOMP_RET_KILL_PROCESS".into(),
            false,
        );
    }
    match host.landlock_abi {
        None => add(
            "landlock",
            "Landlock is not enabled in this kernel (add it to the lsm= boot parameter)".into(),
            false,
        ),
        Some(abi) => {
            if abi < 4 && network != NetworkAccessMode::Full {
                add("landlock network rules", format!("Landlock ABI {abi} < 4; the sandbox's own network namespace still leaves only the egress proxy reachable"), true);
            }
            if abi < 6 {
                let covered = network != NetworkAccessMode::Full;
                add(
                    "landlock scopes",
                    format!(
                        "Landlock ABI {abi} < 6 cannot scope abstract UNIX sockets and signals{}",
                        if covered {
                            "; the network and pid namespaces still isolate them"
                        } else {
                            " and network Full shares the host's abstract sockets"
                        }
                    ),
                    covered,
                );
            }
        }
    }
    let cg = &host.cgroups;
    if cg.memory.is_none() {
        add(
            "cgroup memory controller",
            "not available to corral's cgroup (enable it, or delegate it on cgroup v2)".into(),
            false,
        );
    }
    if cg.cpu.is_none() {
        add(
            "cgroup cpu controller",
            "not available to corral's cgroup".into(),
            false,
        );
    }
    if cg.pids.is_none() {
        add(
            "cgroup pids controller",
            "not available to corral's cgroup".into(),
            false,
        );
    }
    if profile.max_io_bandwidth_mbps.is_some() && cg.io.is_none() {
        add(
            "io bandwidth",
            "no io/blkio controller here: max_io_bandwidth_mbps is not enforced".into(),
            true,
        );
    }
    if !host.mount_setattr {
        add(
            "recursive read-only binds",
            "no mount_setattr(2) (Linux < 5.12): read paths are bound without their submounts"
                .into(),
            true,
        );
    }
    if profile.gpu_access != GpuAccess::None {
        if let Err(reason) = gpu::classify(&host.gpu_devices) {
            add("gpu access", reason, false);
        }
        if host.landlock_abi.is_some_and(|abi| abi < 5) {
            add(
                "landlock ioctl rules",
                "Landlock ABI < 5 cannot limit ioctl to the GPU nodes; seccomp still filters ioctl requests".into(),
                true,
            );
        }
        if cg.devices_supported().is_none() {
            add(
                "device cgroup",
                "no devices controller (v1) or BPF device program (v2) here; only the GPU nodes are in the sandbox's /dev".into(),
                true,
            );
        }
    }
    d
}

/// Builds the plan, or fails naming each layer this host cannot enforce. The steps: what the
/// host can enforce ([`enforceable`]), the filesystem view and its Landlock rules
/// ([`filesystem`]), the two kernel filters ([`landlock_ruleset`], [`seccomp_filter`]), the
/// environment ([`environment`]) and the cgroup limits ([`cgroup_limits`]).
pub fn plan(
    profile: &Profile,
    cmd: &Command,
    host: &HostSupport,
    cfg: &SandboxConfig,
) -> Result<Plan, SandboxError> {
    if !host.is_root {
        return Err(SandboxError::NotRoot);
    }
    let (degradations, skipped) = enforceable(profile, host, cmd)?;
    let skipped = |layer: &str| skipped.iter().any(|l| l == layer);
    let argv0 = cmd.argv.first().ok_or(SandboxError::EmptyCommand)?;
    let exe = resolve_command(Path::new(argv0))?;
    let network = if cmd.force_no_network {
        NetworkAccessMode::None
    } else {
        profile.network
    };
    let Filesystem { ops, rules, gpu } = filesystem(profile, cmd, host, cfg, &exe)?;
    let landlock = (!skipped("landlock"))
        .then(|| landlock_ruleset(host, network, rules))
        .flatten();
    let seccomp = (!skipped("seccomp")).then(|| seccomp_filter(profile, cmd));
    let threads = profile.thread_count();
    let cwd = cmd.cwd.clone().unwrap_or_else(|| {
        PathBuf::from(if profile.allow_temp_files {
            "/tmp"
        } else {
            "/"
        })
    });
    let egress = (network == NetworkAccessMode::Restricted).then(|| egress::Policy {
        profile: profile.name.clone(),
        destinations: profile.allowed_destinations.clone(),
        bytes_per_sec: profile
            .max_bandwidth_mbps
            .map(|m| m.saturating_mul(1_000_000) / 8),
        hosts: cfg.hosts.clone(),
    });
    let env = environment(profile, cmd, threads, egress.is_some(), gpu.as_ref());
    let cgroup = cgroup_limits(profile, cmd, &exe, host, gpu.as_ref(), &skipped);
    let pids_limit = profile.pids_limit();
    let rlimits = vec![
        (libc::RLIMIT_CORE, 0),
        (libc::RLIMIT_FSIZE, profile.max_file_size_mb * 1024 * 1024),
        (libc::RLIMIT_NOFILE, 4096),
    ];

    Ok(Plan {
        profile: profile.name.clone(),
        exe,
        argv: cmd.argv.clone(),
        env,
        cwd,
        fs_ops: ops,
        landlock,
        seccomp,
        seccomp_log: profile.enable_audit_logging,
        new_userns: !skipped("user namespace"),
        new_netns: network != NetworkAccessMode::Full,
        cgroup,
        rlimits,
        nice: profile.process_priority,
        uid: cfg.uid,
        gid: cfg.gid,
        threads,
        time_limit: profile.max_execution_time,
        memory_mb: profile.max_memory_mb,
        pids_limit,
        degradations,
        gpu,
        landlock_connect_ports: if egress.is_some() {
            vec![egress::PROXY_PORT]
        } else {
            Vec::new()
        },
        egress,
    })
}

/// What this host cannot enforce of the profile: every degradation, and the layers to leave
/// out (best effort). A strict profile with any layer missing, or a GPU profile without GPUs,
/// is refused naming each.
fn enforceable(
    profile: &Profile,
    host: &HostSupport,
    cmd: &Command,
) -> Result<(Vec<Degradation>, Vec<String>), SandboxError> {
    let degradations = check_host(profile, host, cmd.force_no_network);
    let fatal: Vec<&Degradation> = degradations.iter().filter(|d| !d.covered).collect();
    // Best effort never invents a GPU: without usable GPU nodes a GPU profile cannot run here.
    let no_gpu = fatal.iter().any(|d| d.layer == "gpu access");
    if !fatal.is_empty() && (profile.enforcement == Enforcement::Strict || no_gpu) {
        return Err(SandboxError::Unenforceable {
            profile: profile.name.clone(),
            layers: fatal.iter().map(|d| d.to_string()).collect(),
            hint: if no_gpu {
                "run it on a host with NVIDIA GPUs, or use a profile with gpu_access = \"None\""
            } else {
                "fix the host, or set enforcement = \"best_effort\" in the profile to run without these layers"
            },
        });
    }
    for d in &degradations {
        if d.covered {
            tracing::debug!(profile = %profile.name, layer = %d.layer, reason = %d.reason, "sandbox layer degraded (covered by another layer)");
        } else {
            tracing::warn!(profile = %profile.name, layer = %d.layer, reason = %d.reason, "sandbox layer NOT enforced (enforcement = best_effort)");
        }
    }
    let skipped = fatal.iter().map(|d| d.layer.clone()).collect();
    Ok((degradations, skipped))
}

/// The sandbox's filesystem: the mount operations in order, the Landlock rules for what is
/// visible, and the GPU lease when the profile has GPU access.
struct Filesystem {
    ops: Vec<FsOp>,
    rules: Vec<(PathBuf, u64)>,
    gpu: Option<gpu::GpuLease>,
}

fn filesystem(
    profile: &Profile,
    cmd: &Command,
    host: &HostSupport,
    cfg: &SandboxConfig,
    exe: &Path,
) -> Result<Filesystem, SandboxError> {
    let denied = Denied::new(&profile.denied_paths);
    let mut tree = Tree::default();
    for w in &profile.write_paths {
        tree.writable.push(w.clone());
        if let Ok(c) = fs::canonicalize(w) {
            tree.writable.push(c);
        }
    }
    let needed = needed_files(exe, &cmd.extra_read, &denied, &tree)?;
    let mut rules = path_rules(profile, cmd, cfg, &mut tree, &denied, needed)?;
    system_mounts(profile, &mut tree, &mut rules);
    let gpu = gpu_libraries(profile, host, cfg, &mut tree, &denied, &mut rules)?;
    let mut ops = tree.into_ops();
    for node in gpu.iter().flat_map(|g| &g.nodes) {
        let path = Path::new("/dev").join(node.file_name().unwrap_or_default());
        ops.push(FsOp::Bind {
            src: node.clone(),
            path: path.clone(),
            writable: true,
            is_dir: false,
            exec: false,
            dev: true,
            needs_mountpoint: true,
        });
        rules.push((
            path,
            landlock::ACCESS_FS_READ_FILE
                | landlock::ACCESS_FS_WRITE_FILE
                | landlock::ACCESS_FS_IOCTL_DEV,
        ));
    }
    ops.push(FsOp::ReadOnly {
        path: "/dev".into(),
    });
    kernel_masks(&mut ops, gpu.is_some());
    denied_masks(profile, &mut ops)?;
    drop_masked(&ops, &mut rules);
    Ok(Filesystem { ops, rules, gpu })
}

/// What the profile and the command make visible, with their Landlock rights: the read and
/// write paths, the launch's extra reads, the command's closure (the only executable files,
/// unless children are allowed: then the host's command and library directories too) and the
/// loader cache.
fn path_rules(
    profile: &Profile,
    cmd: &Command,
    cfg: &SandboxConfig,
    tree: &mut Tree,
    denied: &Denied,
    (closure, ld_cache): (Vec<elf::Needed>, bool),
) -> Result<Vec<(PathBuf, u64)>, SandboxError> {
    let mut rules: Vec<(PathBuf, u64)> = vec![(PathBuf::from("/"), landlock::ACCESS_FS_READ_DIR)];
    for (i, p) in profile.read_paths.iter().enumerate() {
        let keyed = |e| keyed_error("filesystem.read_paths", i, p, e);
        if let Some((canon, is_dir)) = tree.mirror(p, false).map_err(keyed)? {
            rules.push((canon, read_access(is_dir)));
        }
    }
    for (i, p) in profile.write_paths.iter().enumerate() {
        let keyed = |e| keyed_error("filesystem.write_paths", i, p, e);
        check_writable(p, cfg).map_err(keyed)?;
        if let Some((canon, is_dir)) = tree.mirror(p, true).map_err(keyed)? {
            rules.push((
                canon,
                if is_dir {
                    landlock::WRITE
                } else {
                    landlock::WRITE & landlock::FILE_RIGHTS
                },
            ));
        }
    }
    for p in &cmd.extra_read {
        let (canon, is_dir) = tree.mirror(p, false)?.ok_or_else(|| SandboxError::Path {
            path: p.clone(),
            reason: "does not exist".into(),
        })?;
        rules.push((canon, read_access(is_dir)));
    }
    // The command, its interpreter and libraries: read-only, and the only executable files.
    for n in &closure {
        if let Some((canon, _)) = tree.mirror_exec(&n.path)? {
            rules.push((canon, landlock::EXEC));
        }
    }
    // A program allowed to start processes gets something to start: the host's command
    // directories and the loader's library directories, read-only and executable (minus what
    // the profile denies). Without children, only the command's own closure can be executed.
    let children = profile.max_child_processes > 0;
    if children {
        for d in EXEC_DIRS
            .iter()
            .map(PathBuf::from)
            .chain(elf::library_dirs(ld_cache))
        {
            // Optional directories: one that is absent, denied or unreadable is left out.
            match tree.resolve(&d) {
                Ok(Some(r)) if denied.hiding(&r).is_none() && r.canon.is_dir() => {}
                _ => continue,
            }
            if let Some((canon, _)) = tree.mirror(&d, false)? {
                rules.push((canon, landlock::READ | landlock::ACCESS_FS_EXECUTE));
            }
        }
    }
    let dynamic = closure
        .iter()
        .any(|n| matches!(n.role, elf::Role::Interpreter { .. }));
    if ld_cache && (dynamic || children) {
        if let Some((canon, _)) = tree.mirror(Path::new(LD_CACHE), false)? {
            rules.push((canon, landlock::ACCESS_FS_READ_FILE));
        }
    }

    Ok(rules)
}

/// The sandbox's own /proc, minimal /dev and (with `allow_temp_files`) private /tmp and
/// /dev/shm, in the same path-ordered tree as the binds.
fn system_mounts(profile: &Profile, tree: &mut Tree, rules: &mut Vec<(PathBuf, u64)>) {
    // A read or write path below /tmp is bound on top of the private /tmp rather than hidden
    // by it.
    tree.nodes.insert("/proc".into(), Node::Proc);
    tree.nodes.insert(
        "/proc/sys".into(),
        Node::Bind {
            writable: false,
            is_dir: true,
            exec: false,
            dev: false,
        },
    );
    rules.push(("/proc".into(), landlock::READ));
    tree.nodes.insert(
        "/dev".into(),
        Node::Tmpfs {
            size_bytes: 64 * 1024,
            mode: 0o755,
        },
    );
    for node in BASIC_DEVICES {
        let p = Path::new("/dev").join(node);
        tree.nodes.insert(
            p.clone(),
            Node::Bind {
                writable: true,
                is_dir: false,
                exec: false,
                dev: true,
            },
        );
        rules.push((
            p,
            landlock::ACCESS_FS_READ_FILE | landlock::ACCESS_FS_WRITE_FILE,
        ));
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        tree.nodes
            .insert(Path::new("/dev").join(name), Node::Symlink(target.into()));
    }
    if profile.allow_temp_files {
        let size_bytes = profile.max_disk_mb * 1024 * 1024;
        for dir in ["/dev/shm", "/tmp"] {
            tree.nodes.insert(
                dir.into(),
                Node::Tmpfs {
                    size_bytes,
                    mode: 0o1777,
                },
            );
            rules.push((dir.into(), landlock::WRITE));
        }
    }
}

/// A GPU profile's lease on this host's GPUs and its driver libraries (readable unless denied).
fn gpu_libraries(
    profile: &Profile,
    host: &HostSupport,
    cfg: &SandboxConfig,
    tree: &mut Tree,
    denied: &Denied,
    rules: &mut Vec<(PathBuf, u64)>,
) -> Result<Option<gpu::GpuLease>, SandboxError> {
    Ok(match profile.gpu_access {
        GpuAccess::None => None,
        access => {
            let failed = |reason: String| SandboxError::Gpu {
                profile: profile.name.clone(),
                reason,
            };
            let nodes = gpu::classify(&host.gpu_devices).map_err(failed)?;
            let lease = gpu::lease(
                &nodes,
                access == GpuAccess::Exclusive,
                &cfg.state_dir.join("gpu"),
            )
            .map_err(failed)?;
            // The user-space driver is loaded with dlopen: readable, like any library — unless
            // the profile denies it (then CUDA will not start, which the program reports).
            for lib in gpu::driver_libraries() {
                if let Some(d) = tree.resolve(&lib)?.and_then(|r| denied.hiding(&r).cloned()) {
                    tracing::warn!(profile = %profile.name, library = %lib.display(), denied = %d.listed.display(), "GPU driver library left out: the profile denies it");
                    continue;
                }
                if let Some((canon, is_dir)) = tree.mirror(&lib, false)? {
                    rules.push((canon, read_access(is_dir)));
                }
            }
            Some(lease)
        }
    })
}

/// Kernel interfaces a sandbox has no business reading, hidden as Docker does (CUDA keeps
/// /proc/driver).
fn kernel_masks(ops: &mut Vec<FsOp>, gpu: bool) {
    for f in [
        "kcore",
        "keys",
        "timer_list",
        "sysrq-trigger",
        "latency_stats",
        "sched_debug",
        "kallsyms",
        "kpagecount",
        "kpageflags",
    ] {
        if Path::new("/proc").join(f).exists() {
            ops.push(FsOp::MaskFile {
                path: Path::new("/proc").join(f),
            });
        }
    }
    for d in ["acpi", "scsi", "bus", "irq", "fs", "driver"] {
        // CUDA reads /proc/driver/nvidia (driver parameters, GPU list).
        if d == "driver" && gpu {
            continue;
        }
        if Path::new("/proc").join(d).is_dir() {
            ops.push(FsOp::MaskDir {
                path: Path::new("/proc").join(d),
            });
        }
    }
}

fn denied_masks(profile: &Profile, ops: &mut Vec<FsOp>) -> Result<(), SandboxError> {
    // Denied paths: masked wherever they are visible in the sandbox (inside a bound tree, or in
    // its own /proc, /dev or /tmp); elsewhere they are not in the sandbox at all. They are
    // compared as resolved paths (a symlinked spelling such as /home -> /var/home must not slip past), and a
    // bind inside a denied path is hidden too (masks are mounted after every bind).
    for d in &profile.denied_paths {
        let system = d.starts_with("/proc") || d.starts_with("/dev") || d == Path::new("/tmp");
        let resolved = if system {
            Some(d.clone())
        } else {
            fs::canonicalize(d).ok()
        };
        let Some(r) = resolved else {
            // Absent: nothing to hide, unless it lies in a tree the sandbox can write to, where
            // it may have been moved away by an earlier run: refuse rather than guess.
            if profile.write_paths.iter().any(|w| d.starts_with(w)) {
                return Err(SandboxError::Path {
                    path: d.clone(),
                    reason: "denied path inside a write path no longer exists; it may have been moved by a sandboxed program".into(),
                });
            }
            continue;
        };
        let visible = system || ops.iter().any(|op| matches!(op, FsOp::Bind { path, .. } if r.starts_with(path) || path.starts_with(&r)));
        if !visible {
            continue;
        }
        match fs::symlink_metadata(&r) {
            Ok(m) if m.is_dir() => ops.push(FsOp::MaskDir { path: r }),
            Ok(_) => ops.push(FsOp::MaskFile { path: r }),
            Err(_) if system => {}
            Err(e) => {
                return Err(SandboxError::Path {
                    path: d.clone(),
                    reason: format!("denied path: {e}"),
                })
            }
        }
    }

    Ok(())
}

/// Nothing below a mask can be opened (a masked directory is mode 0) and nothing there is
/// visible: rules for such paths would only fail the launch.
fn drop_masked(ops: &[FsOp], rules: &mut Vec<(PathBuf, u64)>) {
    let masked: Vec<(&PathBuf, bool)> = ops
        .iter()
        .filter_map(|op| match op {
            FsOp::MaskDir { path } => Some((path, true)),
            FsOp::MaskFile { path } => Some((path, false)),
            _ => None,
        })
        .collect();
    rules.retain(|(p, _)| {
        !masked.iter().any(|(m, dir)| {
            if *dir {
                p.starts_with(m) && p != *m
            } else {
                p == *m
            }
        })
    });
}

/// The Landlock ruleset for this host's ABI (`None` where the kernel has none): each rule cut
/// to the rights the ABI handles; TCP bind/connect handled unless the network is full.
fn landlock_ruleset(
    host: &HostSupport,
    network: NetworkAccessMode,
    rules: Vec<(PathBuf, u64)>,
) -> Option<(Handled, Vec<(PathBuf, u64)>)> {
    let abi = host.landlock_abi.unwrap_or(0);
    (abi > 0).then(|| {
        let handled = Handled {
            fs: landlock::fs_rights(abi),
            net: if abi >= 4 && network != NetworkAccessMode::Full {
                landlock::ACCESS_NET_BIND_TCP | landlock::ACCESS_NET_CONNECT_TCP
            } else {
                0
            },
            scoped: if abi >= 6 {
                landlock::SCOPE_ABSTRACT_UNIX_SOCKET | landlock::SCOPE_SIGNAL
            } else {
                0
            },
        };
        let rules = rules
            .into_iter()
            .map(|(p, a)| (p, a & handled.fs))
            .collect();
        (handled, rules)
    })
}

/// The seccomp filter: the base set of the command's kind, the profile's strictness and extra
/// system calls, process creation when children are allowed.
fn seccomp_filter(profile: &Profile, cmd: &Command) -> Vec<SockFilter> {
    let mut extra = profile.allowed_syscalls.clone();
    extra.extend(cmd.extra_syscalls.iter().copied());
    seccomp::compile(&FilterSpec {
        base: cmd.seccomp_base,
        strict: profile.strict_syscall_filtering,
        extra,
        allow_processes: profile.max_child_processes > 0,
        denied_action: profile.seccomp_denied_action,
    })
}

/// The program's environment: a fixed base (PATH, HOME, LANG, the thread count for the usual
/// runtimes), the proxy variables under a restricted network, the GPU lease, then the
/// command's own variables, which win.
fn environment(
    profile: &Profile,
    cmd: &Command,
    threads: u32,
    proxy: bool,
    gpu: Option<&gpu::GpuLease>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        (
            "HOME".into(),
            if profile.allow_temp_files {
                "/tmp".into()
            } else {
                "/".into()
            },
        ),
        ("LANG".into(), "C.UTF-8".into()),
        ("CORRAL_SANDBOX_PROFILE".into(), profile.name.clone().into()),
        ("CORRAL_THREADS".into(), threads.to_string().into()),
        ("RAYON_NUM_THREADS".into(), threads.to_string().into()),
        ("CANDLE_NUM_THREADS".into(), threads.to_string().into()),
        ("OMP_NUM_THREADS".into(), threads.to_string().into()),
    ];
    if profile.allow_temp_files {
        env.push(("TMPDIR".into(), "/tmp".into()));
    }
    if proxy {
        for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.push((var.into(), egress::PROXY_URL.into()));
        }
    }
    if let Some(g) = gpu {
        let list: Vec<String> = g.indices.iter().map(u32::to_string).collect();
        env.push(("CORRAL_GPUS".into(), list.join(",").into()));
        // A driver outside the loader's default directories (/usr/local/nvidia/lib64 in
        // containers, WSL's) is found through the library path, as on the host.
        let extra = gpu::driver_library_path();
        if !extra.is_empty() {
            env.push(("LD_LIBRARY_PATH".into(), extra.into()));
        }
        if let GpuAccess::Shared { max_memory_mb } = profile.gpu_access {
            env.push((
                "CORRAL_GPU_MEMORY_MB".into(),
                max_memory_mb.to_string().into(),
            ));
        }
    }
    for (k, v) in &cmd.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// The cgroup limits: memory, CPU, pids and I/O bandwidth (on the block devices of the paths
/// the program sees), and the device allow list of a GPU sandbox. A layer left out (best effort)
/// gets no limit.
fn cgroup_limits(
    profile: &Profile,
    cmd: &Command,
    exe: &Path,
    host: &HostSupport,
    gpu: Option<&gpu::GpuLease>,
    skipped: &dyn Fn(&str) -> bool,
) -> Limits {
    let io = profile.max_io_bandwidth_mbps.and_then(|mbps| {
        let devices = block_devices(
            profile
                .read_paths
                .iter()
                .chain(&profile.write_paths)
                .chain(&cmd.extra_read)
                .chain(std::iter::once(&exe.to_path_buf())),
        );
        (!devices.is_empty()).then(|| (devices, mbps * 1_000_000 / 8))
    });
    Limits {
        memory_bytes: (!skipped("cgroup memory controller"))
            .then_some(profile.max_memory_mb * 1024 * 1024),
        cpu: (!skipped("cgroup cpu controller")).then(|| {
            let period = 100_000u64;
            (
                (profile.max_cpu_cores * period as f64).round() as u64,
                period,
            )
        }),
        pids: (!skipped("cgroup pids controller")).then_some(profile.pids_limit()),
        io,
        // Only GPU sandboxes get device nodes with device access (every other bind is nodev
        // and the minimal /dev holds null, zero, full, random and urandom): the device cgroup
        // then allows exactly those nodes.
        devices: match gpu {
            Some(g) if host.cgroups.devices_supported().is_some() => {
                Some(gpu::device_rules(BASIC_DEVICES, &g.nodes))
            }
            _ => None,
        },
    }
}

/// The files the command needs to start (its ELF closure), checked against the denied paths,
/// and whether the loader cache is to be bound. What a denied path hides is decided here:
/// the command, a script's interpreter, the ELF interpreter, a needed library and a file the
/// launch binds for the program (a model) are required, and a denied one refuses the launch
/// naming the denied path and what needs it; `/etc/ld.so.cache` is optional (the loader works
/// without it) unless a library can only be found through it. Returns the closure and whether
/// the cache is there to bind (the caller binds it only for dynamic programs and children).
fn needed_files(
    exe: &Path,
    extra_read: &[PathBuf],
    denied: &Denied,
    tree: &Tree,
) -> Result<(Vec<elf::Needed>, bool), SandboxError> {
    let cache = Path::new(LD_CACHE);
    let cache_denied = match tree.resolve(cache)? {
        Some(r) => denied.hiding(&r).cloned(),
        None => None,
    };
    let use_cache = cache.exists() && cache_denied.is_none();
    let closure = match elf::exec_closure(exe, use_cache) {
        Ok(c) => c,
        Err(elf::ElfError::MissingLibrary { path, lib }) if cache_denied.is_some() => {
            // Found through ld.so.conf's directories (the cache) but not without them?
            if let (Some(d), Ok(_)) = (&cache_denied, elf::exec_closure(exe, true)) {
                return Err(Denied::refuse(
                    d,
                    cache,
                    format!(
                        "the loader's cache, without which {} cannot find its library {lib} (it lies in a directory of /etc/ld.so.conf)",
                        path.display()
                    ),
                ));
            }
            return Err(SandboxError::Elf(elf::ElfError::MissingLibrary {
                path,
                lib,
            }));
        }
        Err(e) => return Err(SandboxError::Elf(e)),
    };
    for n in &closure {
        if let Some(r) = tree.resolve(&n.path)? {
            if let Some(d) = denied.hiding(&r) {
                return Err(Denied::refuse(d, &n.path, n.describe()));
            }
        }
    }
    for p in extra_read {
        if let Some(r) = tree.resolve(p)? {
            if let Some(d) = denied.hiding(&r) {
                return Err(Denied::refuse(
                    d,
                    p,
                    "a file this launch hands the program to read (a model file)".into(),
                ));
            }
        }
    }
    if let Some(d) = &cache_denied {
        tracing::debug!(denied = %d.listed.display(), "the loader cache is denied: the loader searches its built-in directories");
    }
    Ok((closure, use_cache))
}

/// Names the profile key a path error came from.
fn keyed_error(list: &str, index: usize, path: &Path, e: SandboxError) -> SandboxError {
    match e {
        SandboxError::Path { reason, .. } => SandboxError::ProfilePath {
            key: format!("{list}[{index}]"),
            path: path.to_path_buf(),
            reason,
        },
        other => other,
    }
}

/// Landlock rights for a read path: the directory tree, or the one file.
fn read_access(is_dir: bool) -> u64 {
    if is_dir {
        landlock::READ
    } else {
        landlock::ACCESS_FS_READ_FILE
    }
}

/// `argv[0]` -> absolute path of an executable regular file (PATH lookup when it has no `/`).
pub fn resolve_command(arg0: &Path) -> Result<PathBuf, SandboxError> {
    let candidates: Vec<PathBuf> = if arg0.to_string_lossy().contains('/') {
        vec![std::path::absolute(arg0).unwrap_or_else(|_| arg0.to_path_buf())]
    } else {
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path).map(|d| d.join(arg0)).collect()
    };
    for c in &candidates {
        if let Ok(m) = fs::metadata(c) {
            if m.is_file() && m.mode() & 0o111 != 0 {
                return Ok(c.clone());
            }
            if m.is_file() {
                return Err(SandboxError::NotExecutable { path: c.clone() });
            }
        }
    }
    Err(SandboxError::CommandNotFound {
        command: arg0.to_path_buf(),
    })
}

fn check_writable(p: &Path, cfg: &SandboxConfig) -> Result<(), SandboxError> {
    let m = fs::metadata(p).map_err(|e| SandboxError::Path {
        path: p.into(),
        reason: if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "write path does not exist on this host; create it, writable by the sandbox user {}:{}",
                cfg.uid, cfg.gid
            )
        } else {
            format!("write path: {e}")
        },
    })?;
    let mode = m.mode();
    let ok = (m.uid() == cfg.uid && mode & 0o200 != 0)
        || (m.gid() == cfg.gid && mode & 0o020 != 0)
        || mode & 0o002 != 0;
    if !ok {
        return Err(SandboxError::Path {
            path: p.into(),
            reason: format!(
                "write path is not writable by the sandbox user {}:{} (owner {}:{}, mode {:o}); chown it to the sandbox user or make it group-writable for gid {}",
                cfg.uid, cfg.gid, m.uid(), m.gid(), mode & 0o7777, cfg.gid
            ),
        });
    }
    Ok(())
}

/// Whole-disk block devices behind `paths` (throttling needs the disk, not a partition).
fn block_devices<'a>(paths: impl Iterator<Item = &'a PathBuf>) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for p in paths {
        let Ok(m) = fs::metadata(p) else { continue };
        let dev = m.dev();
        let (maj, min) = (libc::major(dev), libc::minor(dev));
        if maj == 0 {
            continue; // virtual file system (tmpfs, overlay): nothing to throttle
        }
        let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
        let disk = if sys.join("partition").exists() {
            fs::read_to_string(sys.join("../dev")).ok().and_then(|s| {
                let (a, b) = s.trim().split_once(':')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
        } else if sys.exists() {
            Some((maj, min))
        } else {
            None
        };
        if let Some(d) = disk {
            if !out.contains(&d) {
                out.push(d);
            }
        }
    }
    out
}

/// A host path as the kernel resolves it.
#[derive(Debug)]
struct Resolved {
    canon: PathBuf,
    /// Each symbolic link met on the way (its path, its target).
    links: Vec<(PathBuf, PathBuf)>,
}

/// The profile's denied paths, as listed (normalised) and resolved on this host.
struct Denied {
    entries: Vec<DeniedPath>,
}

#[derive(Debug, Clone)]
struct DeniedPath {
    /// Index in `filesystem.denied_paths`.
    index: usize,
    listed: PathBuf,
    resolved: PathBuf,
}

impl Denied {
    fn new(paths: &[PathBuf]) -> Denied {
        Denied {
            entries: paths
                .iter()
                .enumerate()
                .map(|(index, p)| DeniedPath {
                    index,
                    listed: p.clone(),
                    resolved: fs::canonicalize(p).unwrap_or_else(|_| p.clone()),
                })
                .collect(),
        }
    }

    /// The denied path that hides `r`: its resolved path or a symlink on the way lies in it.
    fn hiding(&self, r: &Resolved) -> Option<&DeniedPath> {
        let on_the_way = || std::iter::once(&r.canon).chain(r.links.iter().map(|(l, _)| l));
        self.entries
            .iter()
            .find(|d| on_the_way().any(|p| p.starts_with(&d.resolved) || p.starts_with(&d.listed)))
    }

    /// A launch that cannot start because `path` (`role`) is denied by `d`.
    fn refuse(d: &DeniedPath, path: &Path, role: String) -> SandboxError {
        SandboxError::DeniedButNeeded {
            index: d.index,
            denied: d.listed.clone(),
            path: path.to_path_buf(),
            role,
        }
    }
}

/// The dynamic loader's cache. Optional: without it the loader searches its built-in
/// directories (and DT_RUNPATH/DT_RPATH), which is enough unless a library lives only in a
/// directory of /etc/ld.so.conf.
const LD_CACHE: &str = "/etc/ld.so.cache";

/// The sandbox's PATH, made executable for profiles that allow child processes.
const EXEC_DIRS: [&str; 3] = ["/usr/local/bin", "/usr/bin", "/bin"];

/// The sandbox's root as a tree of sandbox paths, built by mirroring host paths (symlinks and
/// all) so every path means the same inside as outside.
#[derive(Debug, Default)]
struct Tree {
    nodes: BTreeMap<PathBuf, Node>,
    /// The profile's write paths (as written and resolved): symlinks below them are refused.
    writable: Vec<PathBuf>,
    /// What `lstat` (and `readlink`) said of each path walked so far in this plan: `None` for
    /// absent, `Some(None)` for not a symlink, `Some(Some(target))` for a symlink. A plan walks
    /// `/usr`, `/lib` and the library directories once per file under them; the child opens
    /// every bound path again itself (`openat2`, no symlinks followed), so nothing relies on
    /// this staying true after planning.
    seen: std::cell::RefCell<std::collections::HashMap<PathBuf, Option<Option<PathBuf>>>>,
}

impl Tree {
    fn lstat(&self, path: &Path) -> std::io::Result<Option<Option<PathBuf>>> {
        if let Some(known) = self.seen.borrow().get(path) {
            return Ok(known.clone());
        }
        let found = match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => Some(Some(fs::read_link(path)?)),
            Ok(_) => Some(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        self.seen
            .borrow_mut()
            .insert(path.to_path_buf(), found.clone());
        Ok(found)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Symlink(PathBuf),
    Bind {
        writable: bool,
        is_dir: bool,
        exec: bool,
        dev: bool,
    },
    Tmpfs {
        size_bytes: u64,
        mode: u32,
    },
    Proc,
}

impl Tree {
    /// Is `p` inside (or at) a bound directory?
    fn covered(&self, p: &Path) -> Option<&Node> {
        p.ancestors().find_map(|a| match self.nodes.get(a) {
            Some(n @ Node::Bind { is_dir: true, .. }) => Some(n),
            _ => None,
        })
    }

    /// Resolves `p` on the host as the kernel would: its canonical path and the symbolic links
    /// met on the way (`None` if `p` does not exist). Changes nothing.
    fn resolve(&self, p: &Path) -> Result<Option<Resolved>, SandboxError> {
        use std::path::Component;
        // Components still to walk, as a stack: the next one is last.
        let mut pending: Vec<OsString> = Vec::new();
        let push_all = |pending: &mut Vec<OsString>, path: &Path| {
            for c in path.components().rev() {
                match c {
                    Component::Normal(n) => pending.push(n.to_os_string()),
                    Component::ParentDir => pending.push("..".into()),
                    _ => {}
                }
            }
        };
        push_all(&mut pending, p);
        let mut cur = PathBuf::from("/");
        let mut links = Vec::new();
        let mut hops = 0;
        while let Some(comp) = pending.pop() {
            if comp == ".." {
                cur.pop();
                continue;
            }
            let next = cur.join(&comp);
            let target = match self.lstat(&next) {
                Ok(None) => return Ok(None),
                Ok(Some(None)) => {
                    cur = next;
                    continue;
                }
                Ok(Some(Some(target))) => target,
                Err(e) => {
                    return Err(SandboxError::Path {
                        path: p.into(),
                        reason: e.to_string(),
                    })
                }
            };
            hops += 1;
            if hops > 40 {
                return Err(SandboxError::Path {
                    path: p.into(),
                    reason: "too many levels of symbolic links".into(),
                });
            }
            // A symlink inside a tree a sandbox can write to may have been planted by an earlier
            // run to widen this one: never follow it.
            if self
                .writable
                .iter()
                .any(|w| next.starts_with(w) && next != *w)
            {
                return Err(SandboxError::Path {
                    path: p.into(),
                    reason: format!(
                        "{} is a symbolic link inside write path; refusing to follow it",
                        next.display()
                    ),
                });
            }
            links.push((next, target.clone()));
            if target.is_absolute() {
                cur = PathBuf::from("/");
            }
            push_all(&mut pending, &target);
        }
        Ok(Some(Resolved { canon: cur, links }))
    }

    /// Resolves `p` and records the symlinks met on the way (outside bound trees) so they exist
    /// in the sandbox too; returns the canonical path (`None` if `p` does not exist).
    fn walk(&mut self, p: &Path) -> Result<Option<PathBuf>, SandboxError> {
        let Some(r) = self.resolve(p)? else {
            return Ok(None);
        };
        for (link, target) in r.links {
            if self.covered(&link).is_none() {
                self.nodes.entry(link).or_insert(Node::Symlink(target));
            }
        }
        Ok(Some(r.canon))
    }

    fn mirror(
        &mut self,
        p: &Path,
        writable: bool,
    ) -> Result<Option<(PathBuf, bool)>, SandboxError> {
        let Some(canon) = self.walk(p)? else {
            if writable {
                return Err(SandboxError::Path {
                    path: p.into(),
                    reason: "write path does not exist".into(),
                });
            }
            tracing::debug!(path = %p.display(), "read path does not exist; skipped");
            return Ok(None);
        };
        let is_dir = fs::metadata(&canon).map(|m| m.is_dir()).unwrap_or(false);
        match self.covered(&canon) {
            // Already visible through an enclosing bind of the same kind (or a writable one).
            Some(Node::Bind { writable: w, .. }) if *w == writable || (*w && !writable) => {
                if !writable && *w {
                    // A read path inside a write path is bound read-only on top.
                    self.nodes.insert(
                        canon.clone(),
                        Node::Bind {
                            writable,
                            is_dir,
                            exec: false,
                            dev: false,
                        },
                    );
                }
            }
            _ => {
                self.nodes.insert(
                    canon.clone(),
                    Node::Bind {
                        writable,
                        is_dir,
                        exec: false,
                        dev: false,
                    },
                );
            }
        }
        Ok(Some((canon, is_dir)))
    }

    fn mirror_exec(&mut self, p: &Path) -> Result<Option<(PathBuf, bool)>, SandboxError> {
        let Some(canon) = self.walk(p)? else {
            return Err(SandboxError::Path {
                path: p.into(),
                reason: "needed to run the command but does not exist".into(),
            });
        };
        match self.covered(&canon) {
            Some(Node::Bind {
                writable: false, ..
            }) => {}
            // Under a writable bind, or not visible: bind the file itself, read-only.
            _ => {
                self.nodes.insert(
                    canon.clone(),
                    Node::Bind {
                        writable: false,
                        is_dir: false,
                        exec: true,
                        dev: false,
                    },
                );
            }
        }
        Ok(Some((canon, false)))
    }

    fn into_ops(self) -> Vec<FsOp> {
        let mut ops = Vec::new();
        let mut made: Vec<PathBuf> = Vec::new();
        // BTreeMap order puts parents before children.
        for (path, node) in &self.nodes {
            // Parent directories on the root tmpfs, unless inside a bind (they exist there).
            let covering = path.parent().and_then(|parent| {
                parent
                    .ancestors()
                    .find(|a| matches!(self.nodes.get(*a), Some(Node::Bind { is_dir: true, .. })))
            });
            if covering.is_none() {
                let mut parents: Vec<&Path> = path
                    .ancestors()
                    .skip(1)
                    .filter(|a| *a != Path::new("/"))
                    .collect();
                parents.reverse();
                for parent in parents {
                    if !made.iter().any(|m| m == parent)
                        && !matches!(self.nodes.get(parent), Some(Node::Symlink(_)))
                    {
                        made.push(parent.to_path_buf());
                        ops.push(FsOp::Dir {
                            path: parent.to_path_buf(),
                        });
                    }
                }
            }
            match node {
                Node::Symlink(target) => ops.push(FsOp::Symlink {
                    path: path.clone(),
                    target: target.clone(),
                }),
                Node::Tmpfs { size_bytes, mode } => {
                    ops.push(FsOp::Dir { path: path.clone() });
                    ops.push(FsOp::Tmpfs {
                        path: path.clone(),
                        size_bytes: *size_bytes,
                        mode: *mode,
                        readonly: false,
                    });
                }
                Node::Proc => {
                    ops.push(FsOp::Dir { path: path.clone() });
                    ops.push(FsOp::Proc { path: path.clone() });
                }
                Node::Bind {
                    writable,
                    is_dir,
                    exec,
                    dev,
                } => ops.push(FsOp::Bind {
                    src: path.clone(),
                    path: path.clone(),
                    writable: *writable,
                    is_dir: *is_dir,
                    exec: *exec,
                    dev: *dev,
                    needs_mountpoint: covering.is_none(),
                }),
            }
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::ProfileRegistry;

    fn host() -> HostSupport {
        let mut h = HostSupport::probe();
        h.is_root = true;
        h.landlock_abi = Some(7);
        h.seccomp = true;
        h.user_namespaces = true;
        let v1 = |p: &str| {
            Some(super::super::cgroup::Hierarchy {
                version: super::super::cgroup::Version::V1,
                own_dir: p.into(),
            })
        };
        h.cgroups.memory = v1("/sys/fs/cgroup/memory");
        h.cgroups.cpu = v1("/sys/fs/cgroup/cpu");
        h.cgroups.pids = v1("/sys/fs/cgroup/pids");
        h
    }

    fn cmd() -> Command {
        Command {
            argv: vec!["/bin/true".into()],
            ..Command::default()
        }
    }

    #[test]
    fn missing_layers_fail_closed_unless_best_effort() {
        let reg = ProfileRegistry::builtin();
        let secure = reg.resolve("secure").unwrap();
        let mut h = host();
        h.landlock_abi = None;
        h.cgroups.memory = None;
        let err = plan(&secure, &cmd(), &h, &SandboxConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("landlock: ") && err.contains("cgroup memory controller"),
            "{err}"
        );

        let mut lenient = secure.clone();
        lenient.enforcement = Enforcement::BestEffort;
        let p = plan(&lenient, &cmd(), &h, &SandboxConfig::default()).unwrap();
        assert!(p.landlock.is_none(), "skipped layer");
        assert!(p.cgroup.memory_bytes.is_none());
        assert!(p.seccomp.is_some(), "layers the host has stay on");
        assert!(p
            .degradations
            .iter()
            .any(|d| d.layer == "landlock" && !d.covered));
    }

    #[test]
    fn old_landlock_is_covered_by_namespaces_except_for_full_network() {
        let reg = ProfileRegistry::builtin();
        let secure = reg.resolve("secure").unwrap();
        let mut h = host();
        h.landlock_abi = Some(3);
        let p = plan(&secure, &cmd(), &h, &SandboxConfig::default()).unwrap();
        assert!(
            p.degradations.iter().all(|d| d.covered),
            "{:?}",
            p.degradations
        );
        let mut full = secure.clone();
        full.network = NetworkAccessMode::Full;
        let err = plan(&full, &cmd(), &h, &SandboxConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("landlock scopes"), "{err}");
    }

    #[test]
    fn plan_binds_the_command_closure_and_nothing_executable_else() {
        let reg = ProfileRegistry::builtin();
        let secure = reg.resolve("secure").unwrap();
        let p = plan(&secure, &cmd(), &host(), &SandboxConfig::default()).unwrap();
        let (handled, rules) = p.landlock.clone().unwrap();
        assert_ne!(handled.scoped, 0);
        let exec: Vec<&PathBuf> = rules
            .iter()
            .filter(|(_, a)| a & landlock::ACCESS_FS_EXECUTE != 0)
            .map(|(p, _)| p)
            .collect();
        assert!(exec.iter().any(|p| p.ends_with("true")), "{exec:?}");
        assert!(
            exec.iter().any(|p| p.to_string_lossy().contains("libc.so")),
            "{exec:?}"
        );
        assert!(
            exec.iter().all(|p| p.is_file()),
            "execute only on files: {exec:?}"
        );
        // The private /tmp comes before anything bound below it.
        let tmp = p
            .fs_ops
            .iter()
            .position(|o| matches!(o, FsOp::Tmpfs { path, .. } if path == Path::new("/tmp")));
        assert!(tmp.is_some());
        assert_eq!(p.cgroup.pids, Some(32));
        assert_eq!(p.cgroup.cpu, Some((200_000, 100_000)));
    }
}
