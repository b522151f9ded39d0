//! What the cloned child will do, prepared in the parent before `clone`: every C string, pointer
//! array, BPF program and mount attribute the child needs, so that `child.rs` only reads them
//! and makes raw system calls. Also the list of setup stages the child reports (by number, in a
//! word shared with the parent and in its failure message), which the parent turns into text.

use std::ffi::{c_char, c_int, c_ulong, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::AtomicU32;

use super::plan::{FsOp, Plan, MASK_FILE};
use super::seccomp::SockFilter;

/// Setup steps of the child, in order. The child stores the number of the step it is in into
/// the launch's shared progress word before starting it, so a launch that misses its deadline
/// can say where the child was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    /// Cloned; not yet at the first step.
    Cloned = 0,
    PrivateMounts,
    RootTmpfs,
    FsOp,
    WaitCgroups,
    CgroupJoin,
    PivotRoot,
    ReadOnlyRoot,
    Hostname,
    Loopback,
    Rlimit,
    Nice,
    SetGroups,
    UserNs,
    WaitIdMaps,
    CgroupNs,
    DropCapabilities,
    Securebits,
    SetResGid,
    SetResUid,
    ParentDeath,
    Setsid,
    Stdio,
    Chdir,
    Signals,
    CloseFds,
    NoNewPrivs,
    LandlockRule,
    LandlockRestrict,
    Seccomp,
    Execve,
}

impl Stage {
    const ALL: [Stage; 31] = [
        Stage::Cloned,
        Stage::PrivateMounts,
        Stage::RootTmpfs,
        Stage::FsOp,
        Stage::WaitCgroups,
        Stage::CgroupJoin,
        Stage::PivotRoot,
        Stage::ReadOnlyRoot,
        Stage::Hostname,
        Stage::Loopback,
        Stage::Rlimit,
        Stage::Nice,
        Stage::SetGroups,
        Stage::UserNs,
        Stage::WaitIdMaps,
        Stage::CgroupNs,
        Stage::DropCapabilities,
        Stage::Securebits,
        Stage::SetResGid,
        Stage::SetResUid,
        Stage::ParentDeath,
        Stage::Setsid,
        Stage::Stdio,
        Stage::Chdir,
        Stage::Signals,
        Stage::CloseFds,
        Stage::NoNewPrivs,
        Stage::LandlockRule,
        Stage::LandlockRestrict,
        Stage::Seccomp,
        Stage::Execve,
    ];

    pub fn from_u32(v: u32) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| *s as u32 == v)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Stage::Cloned => "starting the sandbox's first process",
            Stage::PrivateMounts => "making mounts private",
            Stage::RootTmpfs => "mounting the root tmpfs",
            Stage::FsOp => "building the sandbox root",
            Stage::WaitCgroups => "waiting for the supervisor to create the cgroups",
            Stage::CgroupJoin => "joining the sandbox's cgroup",
            Stage::PivotRoot => "pivot_root into the sandbox root",
            Stage::ReadOnlyRoot => "making the root read-only",
            Stage::Hostname => "setting the host name",
            Stage::Loopback => "bringing loopback up",
            Stage::Rlimit => "setting resource limits",
            Stage::Nice => "setting the nice value",
            Stage::SetGroups => "clearing supplementary groups",
            Stage::UserNs => "entering a user namespace",
            Stage::WaitIdMaps => "waiting for the supervisor (uid/gid maps, cgroup placement)",
            Stage::CgroupNs => "entering a cgroup namespace",
            Stage::DropCapabilities => "dropping capabilities",
            Stage::Securebits => "locking securebits",
            Stage::SetResGid => "switching to the sandbox gid",
            Stage::SetResUid => "switching to the sandbox uid",
            Stage::ParentDeath => "arming the parent-death signal",
            Stage::Setsid => "starting a new session",
            Stage::Stdio => "setting up stdin/stdout/stderr",
            Stage::Chdir => "changing to the working directory",
            Stage::Signals => "resetting signal dispositions and the signal mask",
            Stage::CloseFds => "closing inherited file descriptors",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::LandlockRule => "adding a Landlock rule",
            Stage::LandlockRestrict => "enforcing Landlock",
            Stage::Seccomp => "installing the seccomp filter",
            Stage::Execve => "executing the command",
        }
    }
}

pub(super) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(super) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(super) const MOUNT_ATTR_NODEV: u64 = 0x4;
pub(super) const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// One step of building the root, as the child will make it.
pub(crate) enum ChildOp {
    Mkdir(CString),
    Symlink {
        target: CString,
        path: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        attrs: u64,
        mountpoint: Option<bool>,
    },
    Mount {
        source: CString,
        dst: CString,
        fstype: CString,
        flags: c_ulong,
        data: CString,
    },
    ReadOnly {
        dst: CString,
        flags: c_ulong,
    },
    MaskFile {
        dst: CString,
    },
}

/// Everything the child needs, prepared in the parent.
pub(crate) struct ChildSpec {
    pub(super) root: CString,
    /// The empty mode-0 file that masks denied files, inside the root.
    pub(super) mask: CString,
    pub(super) ops: Vec<ChildOp>,
    pub(super) pivot_dot: CString,
    pub(super) slash: CString,
    pub(super) hostname: CString,
    pub(super) lo_up: bool,
    pub(super) rlimits: Vec<(u32, libc::rlimit)>,
    pub(super) nice: i32,
    pub(super) new_userns: bool,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mount_setattr: bool,
    pub(super) landlock_fd: c_int,
    pub(super) landlock_rules: Vec<(CString, u64)>,
    pub(super) seccomp: Option<(Vec<SockFilter>, u32)>,
    pub(super) exe: CString,
    pub(super) _argv: Vec<CString>,
    pub(super) argv_ptrs: Vec<*const c_char>,
    pub(super) _env: Vec<CString>,
    pub(super) env_ptrs: Vec<*const c_char>,
    pub(super) cwd: CString,
    pub(super) stdio: [c_int; 3],
    /// v1 `tasks` files to write `0` to, first thing.
    pub(super) join_tasks: Vec<CString>,
    pub(super) from_parent: c_int,
    pub(super) to_parent: c_int,
    pub(super) err: c_int,
    /// The launch's shared progress word (the current [`Stage`]); null: none.
    pub(super) progress: *const AtomicU32,
    /// The parent's ends of the launch pipes, closed by the child first thing (so the child
    /// sees the supervisor's end close when it dies); -1: none.
    pub(super) parent_ends: [c_int; 3],
}

fn cstr(p: &Path) -> CString {
    // Paths from the plan never contain NUL: validation and the OS guarantee it.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn under(root: &Path, p: &Path) -> CString {
    cstr(&root.join(p.strip_prefix("/").unwrap_or(p)))
}

impl ChildSpec {
    pub(crate) fn new(
        plan: &Plan,
        root: &Path,
        landlock_fd: c_int,
        mount_setattr: bool,
    ) -> ChildSpec {
        let mut ops = Vec::new();
        for op in &plan.fs_ops {
            ops.push(match op {
                FsOp::Dir { path } => ChildOp::Mkdir(under(root, path)),
                FsOp::Symlink { path, target } => ChildOp::Symlink {
                    target: cstr(target),
                    path: under(root, path),
                },
                FsOp::Bind {
                    src,
                    path,
                    writable,
                    is_dir,
                    exec,
                    dev,
                    needs_mountpoint,
                } => {
                    let mut attrs = MOUNT_ATTR_NOSUID;
                    if !writable {
                        attrs |= MOUNT_ATTR_RDONLY;
                    }
                    if !dev {
                        attrs |= MOUNT_ATTR_NODEV;
                    }
                    if *writable && !exec {
                        attrs |= MOUNT_ATTR_NOEXEC;
                    }
                    ChildOp::Bind {
                        src: cstr(src),
                        dst: under(root, path),
                        attrs,
                        mountpoint: needs_mountpoint.then_some(*is_dir),
                    }
                }
                FsOp::Tmpfs {
                    path,
                    size_bytes,
                    mode,
                    readonly,
                } => ChildOp::Mount {
                    source: CString::from(c"tmpfs"),
                    dst: under(root, path),
                    fstype: CString::from(c"tmpfs"),
                    flags: libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC
                        | if *readonly { libc::MS_RDONLY } else { 0 },
                    data: CString::new(format!("size={size_bytes},mode={mode:o}"))
                        .unwrap_or_default(),
                },
                FsOp::Proc { path } => ChildOp::Mount {
                    source: CString::from(c"proc"),
                    dst: under(root, path),
                    fstype: CString::from(c"proc"),
                    flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    data: CString::default(),
                },
                FsOp::ReadOnly { path } => ChildOp::ReadOnly {
                    dst: under(root, path),
                    flags: libc::MS_REMOUNT
                        | libc::MS_BIND
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                },
                FsOp::MaskDir { path } => ChildOp::Mount {
                    source: CString::from(c"tmpfs"),
                    dst: under(root, path),
                    fstype: CString::from(c"tmpfs"),
                    flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    data: CString::from(c"size=4k,nr_inodes=1,mode=000"),
                },
                FsOp::MaskFile { path } => ChildOp::MaskFile {
                    dst: under(root, path),
                },
            });
        }
        let argv: Vec<CString> = plan
            .argv
            .iter()
            .map(|a| CString::new(a.as_bytes()).unwrap_or_default())
            .collect();
        let env: Vec<CString> = plan
            .env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).unwrap_or_default()
            })
            .collect();
        let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut env_ptrs: Vec<*const c_char> = env.iter().map(|a| a.as_ptr()).collect();
        env_ptrs.push(std::ptr::null());
        ChildSpec {
            root: cstr(root),
            mask: under(root, Path::new(MASK_FILE)),
            ops,
            pivot_dot: CString::from(c"."),
            slash: CString::from(c"/"),
            hostname: CString::from(c"corral"),
            lo_up: plan.new_netns,
            rlimits: plan
                .rlimits
                .iter()
                .map(|(r, v)| {
                    (
                        *r,
                        libc::rlimit {
                            rlim_cur: *v,
                            rlim_max: *v,
                        },
                    )
                })
                .collect(),
            nice: plan.nice,
            new_userns: plan.new_userns,
            uid: plan.uid,
            gid: plan.gid,
            mount_setattr,
            landlock_fd,
            landlock_rules: plan
                .landlock
                .as_ref()
                .map(|(_, r)| r.iter().map(|(p, a)| (cstr(p), *a)).collect())
                .unwrap_or_default(),
            seccomp: plan.seccomp.clone().map(|p| {
                (
                    p,
                    if plan.seccomp_log {
                        2 /* SECCOMP_FILTER_FLAG_LOG */
                    } else {
                        0
                    },
                )
            }),
            exe: cstr(&plan.exe),
            _argv: argv,
            argv_ptrs,
            _env: env,
            env_ptrs,
            cwd: cstr(&plan.cwd),
            stdio: [-1; 3],
            join_tasks: Vec::new(),
            from_parent: -1,
            to_parent: -1,
            err: -1,
            progress: std::ptr::null(),
            parent_ends: [-1; 3],
        }
    }
}

/// What `child.rs` may call (see its module doc): `libc::syscall` and the errno slot, two
/// one-syscall Landlock wrappers, and plain Rust. Returns each violation with its line.
#[cfg(test)]
fn child_rule_violations(src: &str) -> Vec<String> {
    const LIBC_ALLOWED: [&str; 2] = ["syscall", "__errno_location"];
    const CORRAL_ALLOWED: [&str; 4] = [
        "super::landlock::add_path_rule",
        "super::landlock::restrict_self",
        "super::seccomp::SockFilter",
        "super::spec::",
    ];
    // Allocating, locking, formatting or thread-aware constructs.
    const FORBIDDEN: [&str; 33] = [
        "Vec::",
        "vec!",
        "format!",
        "String::",
        "Box::",
        "Arc::",
        "Rc::",
        ".to_vec(",
        ".to_string(",
        ".to_owned(",
        ".collect",
        ".clone()",
        "CString::new",
        "print!",
        "println!",
        "eprintln!",
        "panic!",
        "assert",
        "unreachable!",
        "todo!",
        ".unwrap(",
        ".expect(",
        "tracing::",
        "std::fs",
        "std::io",
        "std::thread",
        "std::env",
        "Mutex",
        "RwLock",
        ".lock(",
        "crate::",
        "use libc::",
        "extern \"C\"",
    ];
    let mut bad = Vec::new();
    for (n, line) in src.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let at = |what: String| format!("child.rs:{}: {what}", n + 1);
        for (i, _) in code.match_indices("libc::") {
            let rest = &code[i + "libc::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let is_call = rest[name.len()..].trim_start().starts_with('(')
                && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_');
            if is_call && !LIBC_ALLOWED.contains(&name.as_str()) {
                bad.push(at(format!(
                    "libc::{name} is a libc wrapper, not a raw system call"
                )));
            }
        }
        for (i, _) in code.match_indices("super::") {
            if i >= 2 && &code[i - 2..i] == "::" {
                continue; // the tail of a longer path already checked
            }
            if !CORRAL_ALLOWED.iter().any(|a| code[i..].starts_with(a))
                && !code[i..].starts_with("super::*")
            {
                bad.push(at(format!(
                    "call into corral code not reviewed for the child: {}",
                    code[i..].trim()
                )));
            }
        }
        for f in FORBIDDEN {
            if code.contains(f) {
                bad.push(at(format!("'{f}' may allocate, lock or format")));
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cloned_child_makes_only_raw_system_calls() {
        let bad = child_rule_violations(include_str!("child.rs"));
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn the_child_rule_catches_wrappers_allocation_and_other_calls() {
        let src = "unsafe { libc::setgroups(0, std::ptr::null()) };\n\
                   let v = Vec::new(); // libc::setresuid( in a comment is fine\n\
                   super::cgroup::join(x);\n\
                   let x = libc::rlimit { rlim_cur: 0, rlim_max: 0 };\n\
                   unsafe { libc::syscall(libc::SYS_setgroups, 0, 0) };";
        let bad = child_rule_violations(src);
        assert_eq!(bad.len(), 3, "{bad:#?}");
        assert!(bad[0].contains("libc::setgroups"), "{bad:#?}");
        assert!(bad[1].contains("Vec::"), "{bad:#?}");
        assert!(bad[2].contains("super::cgroup::join"), "{bad:#?}");
    }
}
