//! The code that runs in the child between `clone` and `execve`.
//!
//! The supervisor may be multi-threaded, so the child may only make async-signal-safe calls: no
//! allocation, no locks, no formatting. Everything it needs was prepared by [`ChildSpec::new`]
//! in the parent (C strings, pointer arrays, the BPF program, the Landlock ruleset fd). A failing
//! step writes `(stage, index, errno)` to the error pipe and exits 125; the parent turns that
//! into a message naming the step.

use std::ffi::{c_char, c_int, c_ulong, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::plan::{FsOp, Plan, MASK_FILE};
use super::seccomp::SockFilter;

/// Steps reported by the child, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    WaitSupervisor = 1,
    CgroupJoin,
    CgroupNs,
    PrivateMounts,
    RootTmpfs,
    FsOp,
    PivotRoot,
    ReadOnlyRoot,
    Hostname,
    Loopback,
    Rlimit,
    Nice,
    SetGroups,
    UserNs,
    Securebits,
    SetResGid,
    SetResUid,
    DropCapabilities,
    ParentDeath,
    Setsid,
    Stdio,
    Chdir,
    NoNewPrivs,
    LandlockRule,
    LandlockRestrict,
    Seccomp,
    Execve,
}

impl Stage {
    pub fn from_u32(v: u32) -> Option<Stage> {
        use Stage::*;
        const ALL: [Stage; 27] = [
            WaitSupervisor,
            CgroupJoin,
            CgroupNs,
            PrivateMounts,
            RootTmpfs,
            FsOp,
            PivotRoot,
            ReadOnlyRoot,
            Hostname,
            Loopback,
            Rlimit,
            Nice,
            SetGroups,
            UserNs,
            Securebits,
            SetResGid,
            SetResUid,
            DropCapabilities,
            ParentDeath,
            Setsid,
            Stdio,
            Chdir,
            NoNewPrivs,
            LandlockRule,
            LandlockRestrict,
            Seccomp,
            Execve,
        ];
        ALL.into_iter().find(|s| *s as u32 == v)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Stage::WaitSupervisor => "waiting for the supervisor (uid/gid maps, cgroup placement)",
            Stage::CgroupJoin => "joining the sandbox's cgroup",
            Stage::CgroupNs => "entering a cgroup namespace",
            Stage::PrivateMounts => "making mounts private",
            Stage::RootTmpfs => "mounting the root tmpfs",
            Stage::FsOp => "building the sandbox root",
            Stage::PivotRoot => "pivot_root into the sandbox root",
            Stage::ReadOnlyRoot => "making the root read-only",
            Stage::Hostname => "setting the host name",
            Stage::Loopback => "bringing loopback up",
            Stage::Rlimit => "setting resource limits",
            Stage::Nice => "setting the nice value",
            Stage::SetGroups => "clearing supplementary groups",
            Stage::UserNs => "entering a user namespace",
            Stage::Securebits => "locking securebits",
            Stage::SetResGid => "switching to the sandbox gid",
            Stage::SetResUid => "switching to the sandbox uid",
            Stage::DropCapabilities => "dropping capabilities",
            Stage::ParentDeath => "arming the parent-death signal",
            Stage::Setsid => "starting a new session",
            Stage::Stdio => "setting up stdin/stdout/stderr",
            Stage::Chdir => "changing to the working directory",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::LandlockRule => "adding a Landlock rule",
            Stage::LandlockRestrict => "enforcing Landlock",
            Stage::Seccomp => "installing the seccomp filter",
            Stage::Execve => "executing the command",
        }
    }
}

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

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const AT_RECURSIVE: c_int = 0x8000;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const CLOSE_RANGE_CLOEXEC: c_int = 1 << 2;
const SECBITS_LOCKED_NOROOT: c_ulong = 0xef; // NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED, NO_CAP_AMBIENT_RAISE, all locked

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `struct open_how` (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Everything the child needs, prepared in the parent.
pub(crate) struct ChildSpec {
    root: CString,
    /// The empty mode-0 file that masks denied files, inside the root.
    mask: CString,
    ops: Vec<ChildOp>,
    pivot_dot: CString,
    slash: CString,
    hostname: CString,
    lo_up: bool,
    rlimits: Vec<(u32, libc::rlimit)>,
    nice: i32,
    new_userns: bool,
    uid: u32,
    gid: u32,
    mount_setattr: bool,
    landlock_fd: c_int,
    landlock_rules: Vec<(CString, u64)>,
    seccomp: Option<(Vec<SockFilter>, u32)>,
    exe: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _env: Vec<CString>,
    env_ptrs: Vec<*const c_char>,
    cwd: CString,
    pub stdio: [c_int; 3],
    /// v1 `tasks` files to write `0` to, first thing.
    pub join_tasks: Vec<CString>,
    pub from_parent: c_int,
    pub to_parent: c_int,
    pub err: c_int,
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
        }
    }
}

/// Writes the failure and exits. Async-signal-safe.
fn fail(spec: &ChildSpec, stage: Stage, index: usize, errno: c_int) -> ! {
    let mut msg = [0u8; 12];
    msg[0..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    msg[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    msg[8..12].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: write and _exit are async-signal-safe; msg outlives the call.
    unsafe {
        libc::write(spec.err, msg.as_ptr().cast(), msg.len());
        libc::_exit(125)
    }
}

fn errno() -> c_int {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// `/proc/self/fd/N` in a stack buffer.
fn fd_path(fd: c_int, buf: &mut [u8; 32]) -> *const c_char {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 12];
    let mut n = fd.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let d = &digits[i..];
    buf[PREFIX.len()..PREFIX.len() + d.len()].copy_from_slice(d);
    buf[PREFIX.len() + d.len()] = 0;
    buf.as_ptr().cast()
}

/// Opens `path` as O_PATH refusing any symlink on the way (a host path swapped for a symlink
/// between planning and mounting must not redirect a mount). Falls back to O_NOFOLLOW.
///
/// # Safety
/// `path` must be a valid C string.
unsafe fn open_path_nofollow(path: &CString) -> c_int {
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_NO_SYMLINKS,
    };
    // SAFETY: how and path outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd >= 0 {
        return fd as c_int;
    }
    if errno() != libc::ENOSYS {
        return -1;
    }
    // SAFETY: path is a valid C string.
    unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    }
}

/// The child's whole life. Never returns.
///
/// # Safety
/// Must be called only in a freshly cloned child, with `spec` fully prepared by the parent.
pub(crate) unsafe fn run(spec: &ChildSpec) -> ! {
    // SAFETY: every call below is a raw syscall wrapper on data prepared by the parent; the
    // pointers passed are to C strings and structs owned by `spec` or this stack frame.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong);
        let mut b = 0u8;
        if libc::mount(
            std::ptr::null(),
            spec.slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(spec, Stage::PrivateMounts, 0, errno());
        }
        if libc::mount(
            c"tmpfs".as_ptr(),
            spec.root.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"size=1m,mode=755".as_ptr().cast(),
        ) != 0
        {
            fail(spec, Stage::RootTmpfs, 0, errno());
        }
        let fd = libc::open(
            spec.mask.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0,
        );
        if fd < 0 {
            fail(spec, Stage::RootTmpfs, 0, errno());
        }
        libc::close(fd);
        for (i, op) in spec.ops.iter().enumerate() {
            if !fs_op(spec, op) {
                fail(spec, Stage::FsOp, i, errno());
            }
        }
        // The supervisor has created the cgroups meanwhile: join the v1 ones (host paths are
        // still visible before pivot_root). Writing 0, oneself, to `tasks` skips the global
        // threadgroup lock a `cgroup.procs` write takes and the RCU grace period it waits for.
        if libc::read(spec.from_parent, (&mut b as *mut u8).cast(), 1) != 1 {
            fail(spec, Stage::WaitSupervisor, 0, errno());
        }
        for (i, tasks) in spec.join_tasks.iter().enumerate() {
            let fd = libc::open(tasks.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                fail(spec, Stage::CgroupJoin, i, errno());
            }
            libc::close(fd);
        }
        if libc::chdir(spec.root.as_ptr()) != 0
            || libc::syscall(
                libc::SYS_pivot_root,
                spec.pivot_dot.as_ptr(),
                spec.pivot_dot.as_ptr(),
            ) != 0
            || libc::umount2(spec.pivot_dot.as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(spec.slash.as_ptr()) != 0
        {
            fail(spec, Stage::PivotRoot, 0, errno());
        }
        if libc::mount(
            std::ptr::null(),
            spec.slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        ) != 0
        {
            fail(spec, Stage::ReadOnlyRoot, 0, errno());
        }
        if libc::sethostname(spec.hostname.as_ptr(), spec.hostname.as_bytes().len()) != 0 {
            fail(spec, Stage::Hostname, 0, errno());
        }
        if spec.lo_up {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            let mut req = IfReq {
                name: [0; 16],
                flags: 0,
                _pad: [0; 22],
            };
            req.name[..2].copy_from_slice(b"lo");
            if s < 0 || libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req as *mut IfReq) != 0 {
                fail(spec, Stage::Loopback, 0, errno());
            }
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16;
            if libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req as *mut IfReq) != 0 {
                fail(spec, Stage::Loopback, 1, errno());
            }
            libc::close(s);
        }
        for (i, (res, lim)) in spec.rlimits.iter().enumerate() {
            if libc::setrlimit(*res as _, lim) != 0 {
                fail(spec, Stage::Rlimit, i, errno());
            }
        }
        if libc::setpriority(libc::PRIO_PROCESS, 0, spec.nice) != 0 {
            fail(spec, Stage::Nice, 0, errno());
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            fail(spec, Stage::SetGroups, 0, errno());
        }
        if spec.new_userns && libc::unshare(libc::CLONE_NEWUSER) != 0 {
            fail(spec, Stage::UserNs, 0, errno());
        }
        // Hand over to the supervisor, which writes the uid/gid maps and has placed this process
        // in the sandbox's cgroups meanwhile (while the root was being built here), then answers.
        let u = b'u';
        if libc::write(spec.to_parent, (&u as *const u8).cast(), 1) != 1
            || libc::read(spec.from_parent, (&mut b as *mut u8).cast(), 1) != 1
        {
            fail(spec, Stage::WaitSupervisor, 0, errno());
        }
        // Now in the sandbox's cgroup: that becomes the root of its cgroup namespace.
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            fail(spec, Stage::CgroupNs, 0, errno());
        }
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong) != 0 && errno() != libc::EINVAL {
                fail(spec, Stage::DropCapabilities, cap, errno());
            }
        }
        if libc::prctl(libc::PR_SET_SECUREBITS, SECBITS_LOCKED_NOROOT) != 0 {
            fail(spec, Stage::Securebits, 0, errno());
        }
        if libc::setresgid(spec.gid, spec.gid, spec.gid) != 0 {
            fail(spec, Stage::SetResGid, 0, errno());
        }
        if libc::setresuid(spec.uid, spec.uid, spec.uid) != 0 {
            fail(spec, Stage::SetResUid, 0, errno());
        }
        let header = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
            0,
            0,
            0,
        ) != 0
            || libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0
        {
            fail(spec, Stage::DropCapabilities, 64, errno());
        }
        // Credentials changed, which clears the parent-death signal: arm it again, then make
        // sure the supervisor did not die in between (its end of the pipe would be closed).
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong) != 0 {
            fail(spec, Stage::ParentDeath, 0, errno());
        }
        let mut pfd = libc::pollfd {
            fd: spec.from_parent,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut pfd, 1, 0) != 0 && pfd.revents & libc::POLLHUP != 0 {
            libc::_exit(125);
        }
        if libc::setsid() < 0 {
            fail(spec, Stage::Setsid, 0, errno());
        }
        for (target, fd) in spec.stdio.iter().enumerate() {
            if *fd < 0 {
                continue;
            }
            let ok = if *fd == target as c_int {
                libc::fcntl(*fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(*fd, target as c_int) >= 0
            };
            if !ok {
                fail(spec, Stage::Stdio, target, errno());
            }
        }
        if libc::chdir(spec.cwd.as_ptr()) != 0 {
            fail(spec, Stage::Chdir, 0, errno());
        }
        // Signals: default dispositions, nothing blocked (the supervisor may block some).
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // Every inherited fd beyond stdio closes at exec.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            for fd in 3..4096 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(spec, Stage::NoNewPrivs, 0, errno());
        }
        if spec.landlock_fd >= 0 {
            for (i, (path, access)) in spec.landlock_rules.iter().enumerate() {
                let fd = open_path_nofollow(path);
                if fd < 0 {
                    if errno() == libc::ENOENT {
                        continue; // masked or absent: nothing to allow
                    }
                    fail(spec, Stage::LandlockRule, i, errno());
                }
                if super::landlock::add_path_rule(spec.landlock_fd, fd, *access) != 0 {
                    fail(spec, Stage::LandlockRule, i, errno());
                }
                libc::close(fd);
            }
            if super::landlock::restrict_self(spec.landlock_fd) != 0 {
                fail(spec, Stage::LandlockRestrict, 0, errno());
            }
            libc::close(spec.landlock_fd);
        }
        if let Some((prog, flags)) = &spec.seccomp {
            let fprog = SockFprog {
                len: prog.len() as u16,
                filter: prog.as_ptr(),
            };
            if libc::syscall(
                libc::SYS_seccomp,
                1, /* SET_MODE_FILTER */
                *flags,
                &fprog as *const SockFprog,
            ) != 0
            {
                fail(spec, Stage::Seccomp, 0, errno());
            }
        }
        libc::execve(
            spec.exe.as_ptr(),
            spec.argv_ptrs.as_ptr(),
            spec.env_ptrs.as_ptr(),
        );
        fail(spec, Stage::Execve, 0, errno())
    }
}

/// One file-system op. Async-signal-safe. Returns false with errno set on failure.
///
/// # Safety
/// Pointers in `op` are valid C strings owned by the spec.
unsafe fn fs_op(spec: &ChildSpec, op: &ChildOp) -> bool {
    // SAFETY: raw syscalls on C strings owned by `spec` and `op`, and stack buffers.
    unsafe {
        match op {
            ChildOp::Mkdir(p) => libc::mkdir(p.as_ptr(), 0o755) == 0 || errno() == libc::EEXIST,
            ChildOp::Symlink { target, path } => {
                libc::symlink(target.as_ptr(), path.as_ptr()) == 0 || errno() == libc::EEXIST
            }
            ChildOp::Bind {
                src,
                dst,
                attrs,
                mountpoint,
            } => {
                match mountpoint {
                    Some(true)
                        if libc::mkdir(dst.as_ptr(), 0o755) != 0 && errno() != libc::EEXIST =>
                    {
                        return false;
                    }
                    Some(true) => {}
                    Some(false) => {
                        let fd = libc::open(
                            dst.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o444,
                        );
                        if fd < 0 {
                            return false;
                        }
                        libc::close(fd);
                    }
                    None => {}
                }
                let sfd = open_path_nofollow(src);
                if sfd < 0 {
                    return false;
                }
                let dfd = open_path_nofollow(dst);
                if dfd < 0 {
                    libc::close(sfd);
                    return false;
                }
                let (mut sb, mut db) = ([0u8; 32], [0u8; 32]);
                let r = libc::mount(
                    fd_path(sfd, &mut sb),
                    fd_path(dfd, &mut db),
                    std::ptr::null(),
                    // Recursive only where mount_setattr can make every submount read-only too;
                    // without it, a submount would keep its own (writable) flags.
                    if spec.mount_setattr {
                        libc::MS_BIND | libc::MS_REC
                    } else {
                        libc::MS_BIND
                    },
                    std::ptr::null(),
                );
                libc::close(sfd);
                libc::close(dfd);
                if r != 0 {
                    return false;
                }
                set_attrs(spec, dst, *attrs)
            }
            ChildOp::Mount {
                source,
                dst,
                fstype,
                flags,
                data,
            } => {
                let data_ptr = if data.as_bytes().is_empty() {
                    std::ptr::null()
                } else {
                    data.as_ptr().cast()
                };
                libc::mount(
                    source.as_ptr(),
                    dst.as_ptr(),
                    fstype.as_ptr(),
                    *flags,
                    data_ptr,
                ) == 0
            }
            ChildOp::ReadOnly { dst, flags } => {
                libc::mount(
                    std::ptr::null(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    *flags,
                    std::ptr::null(),
                ) == 0
            }
            ChildOp::MaskFile { dst } => {
                libc::mount(
                    spec.mask.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0
                    && libc::mount(
                        std::ptr::null(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT
                            | libc::MS_BIND
                            | libc::MS_RDONLY
                            | libc::MS_NOSUID
                            | libc::MS_NODEV
                            | libc::MS_NOEXEC,
                        std::ptr::null(),
                    ) == 0
            }
        }
    }
}

/// Read-only/nosuid/nodev/noexec on a bind, recursively where the kernel can.
///
/// # Safety
/// `dst` is a valid C string.
unsafe fn set_attrs(spec: &ChildSpec, dst: &CString, attrs: u64) -> bool {
    // SAFETY: raw syscalls on a C string and a stack struct.
    unsafe {
        if spec.mount_setattr {
            let attr = MountAttr {
                attr_set: attrs,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            };
            return libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                dst.as_ptr(),
                AT_RECURSIVE,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ) == 0;
        }
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND;
        if attrs & MOUNT_ATTR_RDONLY != 0 {
            flags |= libc::MS_RDONLY;
        }
        if attrs & MOUNT_ATTR_NOSUID != 0 {
            flags |= libc::MS_NOSUID;
        }
        if attrs & MOUNT_ATTR_NODEV != 0 {
            flags |= libc::MS_NODEV;
        }
        if attrs & MOUNT_ATTR_NOEXEC != 0 {
            flags |= libc::MS_NOEXEC;
        }
        libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ) == 0
    }
}
