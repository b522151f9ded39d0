//! The code that runs in the child between `clone` and `execve`.
//!
//! The supervisor is multi-threaded (tokio, pool workers, the egress proxy), and a `clone`d
//! child inherits a copy of the cloning thread only, with the other threads' memory — and
//! glibc's view of them — frozen mid-step. So the child must not call anything that depends on
//! another thread making progress:
//!
//! - **no glibc wrapper that broadcasts to threads**: `setgroups`, `setresuid`, `setresgid`,
//!   `setuid`, … run `__nptl_setxid`, which signals every thread glibc believes exists and waits
//!   for each; in the child those threads do not exist (and one that was being created at clone
//!   time is waited for forever). This was a real deadlock in one server start in four;
//! - **no allocation, no locks, no formatting, no stdio**: another thread may have held the
//!   allocator's or stdio's lock at clone time, and it is never released in the child.
//!
//! What the child may call, and why it is safe:
//!
//! - `libc::syscall(SYS_…, …)`: glibc's `syscall` moves its arguments into registers, executes
//!   the `syscall` instruction and stores a failure in this thread's `errno` slot — no lock,
//!   no allocation, no other thread involved. Every kernel call below goes through it (see
//!   [`sys`]);
//! - `libc::__errno_location`: returns the address of the calling thread's `errno` (a TLS
//!   offset), to read what the last call stored;
//! - `super::landlock::{add_path_rule, restrict_self}`: each is one `libc::syscall`;
//! - plain Rust on data the parent prepared ([`ChildSpec`]): reads of C strings and pointer
//!   arrays, stack buffers, integer arithmetic, and stores to the shared progress word.
//!
//! Nothing else runs in the child: `launch::clone_child` returns the raw `clone`/`clone3`
//! result (integer moves only) and `launch::spawn` calls [`run`] at once when it is 0.
//!
//! `spec.rs` builds everything (C strings, pointer arrays, the BPF program, the Landlock
//! ruleset fd) in the parent. A failing step writes `(stage, index, errno)` to the error pipe and
//! exits 125; the parent turns that into a message naming the step. Before each step the child
//! stores its number in the launch's shared progress word, so a launch that misses its deadline
//! names the step the child was stuck in. A unit test in `spec.rs` reads this file and fails on
//! any other call into libc and on allocating or locking constructs.

use std::ffi::{c_char, c_int, c_long, c_ulong, c_void, CString};
use std::sync::atomic::Ordering;

use super::seccomp::SockFilter;
use super::spec::{
    ChildOp, ChildSpec, Stage, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
};

const AT_RECURSIVE: c_int = 0x8000;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const CLOSE_RANGE_CLOEXEC: c_int = 1 << 2;
const SECBITS_LOCKED_NOROOT: c_ulong = 0xef; // NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED, NO_CAP_AMBIENT_RAISE, all locked
/// The kernel's `sigset_t` is 64 bits on x86_64 and aarch64.
const KERNEL_SIGSET_SIZE: usize = 8;

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

/// The kernel's `struct sigaction` (x86_64 and aarch64 share this layout: handler, flags,
/// restorer, mask).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: c_ulong,
    restorer: usize,
    mask: u64,
}

/// The system calls the child makes, each one `libc::syscall`: no glibc wrapper with logic of
/// its own (thread broadcasts, caches, locks) stands between the child and the kernel. Each
/// returns the kernel's result as glibc's `syscall` does: -1 with `errno` set on failure.
mod sys {
    use super::*;

    /// # Safety
    /// `path` is a NUL-terminated string.
    pub unsafe fn open(path: *const c_char, flags: c_int, mode: u32) -> c_long {
        // SAFETY: the caller passes a C string; the kernel only reads it.
        unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, path, flags, mode) }
    }

    pub fn close(fd: c_int) {
        // SAFETY: closing an fd has no memory effects in this process.
        unsafe { libc::syscall(libc::SYS_close, fd) };
    }

    /// # Safety
    /// `buf` is valid for `len` bytes of writing.
    pub unsafe fn read(fd: c_int, buf: *mut c_void, len: usize) -> c_long {
        // SAFETY: the caller guarantees the buffer.
        unsafe { libc::syscall(libc::SYS_read, fd, buf, len) }
    }

    /// # Safety
    /// `buf` is valid for `len` bytes of reading.
    pub unsafe fn write(fd: c_int, buf: *const c_void, len: usize) -> c_long {
        // SAFETY: the caller guarantees the buffer.
        unsafe { libc::syscall(libc::SYS_write, fd, buf, len) }
    }

    /// # Safety
    /// Every non-null pointer is a NUL-terminated string (or `data` the fs's option string).
    pub unsafe fn mount(
        src: *const c_char,
        dst: *const c_char,
        fstype: *const c_char,
        flags: c_ulong,
        data: *const c_void,
    ) -> c_long {
        // SAFETY: the caller guarantees the strings; the kernel only reads them.
        unsafe { libc::syscall(libc::SYS_mount, src, dst, fstype, flags, data) }
    }

    /// # Safety
    /// `path` is a NUL-terminated string.
    pub unsafe fn mkdir(path: *const c_char, mode: u32) -> c_long {
        // SAFETY: the caller passes a C string.
        unsafe { libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, path, mode) }
    }

    /// # Safety
    /// Both are NUL-terminated strings.
    pub unsafe fn symlink(target: *const c_char, path: *const c_char) -> c_long {
        // SAFETY: the caller passes C strings.
        unsafe { libc::syscall(libc::SYS_symlinkat, target, libc::AT_FDCWD, path) }
    }

    /// # Safety
    /// `path` is a NUL-terminated string.
    pub unsafe fn chdir(path: *const c_char) -> c_long {
        // SAFETY: the caller passes a C string.
        unsafe { libc::syscall(libc::SYS_chdir, path) }
    }

    /// # Safety
    /// Arguments are whatever `prctl(2)` expects for `option` (integers here).
    pub unsafe fn prctl(option: c_int, a2: c_ulong, a3: c_ulong) -> c_long {
        // SAFETY: every prctl the child makes takes integer arguments only.
        unsafe { libc::syscall(libc::SYS_prctl, option, a2, a3, 0 as c_ulong, 0 as c_ulong) }
    }

    pub fn errno() -> c_int {
        // SAFETY: __errno_location returns the calling thread's errno slot (a TLS address).
        unsafe { *libc::__errno_location() }
    }

    /// `_exit`: the whole (single-threaded) process ends here.
    pub fn exit(code: c_int) -> ! {
        // SAFETY: exit_group ends the process; nothing runs after it.
        unsafe { libc::syscall(libc::SYS_exit_group, code) };
        // exit_group does not return; should it ever, spin rather than run on.
        #[allow(clippy::empty_loop)]
        loop {}
    }
}

use sys::errno;

/// Records the step the child is about to take (read by the parent only after a deadline).
#[inline(always)]
fn mark(spec: &ChildSpec, stage: Stage) {
    // SAFETY: `progress` is null or points into the launch's shared anonymous mapping, which
    // the parent keeps mapped until the child has exec'd or died; an atomic store is a plain
    // `mov`, no lock.
    if let Some(word) = unsafe { spec.progress.as_ref() } {
        word.store(stage as u32, Ordering::Relaxed);
    }
}

/// Writes the failure and exits.
fn fail(spec: &ChildSpec, stage: Stage, index: usize, errno: c_int) -> ! {
    let mut msg = [0u8; 12];
    msg[0..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    msg[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    msg[8..12].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: msg outlives the call.
    unsafe { sys::write(spec.err, msg.as_ptr().cast(), msg.len()) };
    sys::exit(125)
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
fn open_path_nofollow(path: &CString) -> c_int {
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
        sys::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0,
        ) as c_int
    }
}

/// Reads one byte from the supervisor (EINTR cannot happen: every signal stays blocked until
/// `reset_signals`, as the supervisor arranged around `clone`).
fn wait_parent(spec: &ChildSpec, stage: Stage) {
    mark(spec, stage);
    let mut b = 0u8;
    // SAFETY: reads one byte into a stack variable.
    if unsafe { sys::read(spec.from_parent, (&mut b as *mut u8).cast(), 1) } != 1 {
        fail(spec, stage, 0, errno());
    }
}

/// The child's whole life. Never returns.
///
/// # Safety
/// Must be called only in a freshly cloned child, with `spec` fully prepared by the parent.
pub(crate) unsafe fn run(spec: &ChildSpec) -> ! {
    // In each `unsafe` block below ("see above"): a raw system call on C strings and structs
    // owned by `spec` or this stack frame, which outlive the call.
    mark(spec, Stage::Cloned);
    for fd in spec.parent_ends {
        if fd >= 0 {
            sys::close(fd);
        }
    }
    // SAFETY: integer arguments only.
    unsafe {
        sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong, 0);
    }
    mark(spec, Stage::PrivateMounts);
    // SAFETY: see above.
    if unsafe {
        sys::mount(
            std::ptr::null(),
            spec.slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        fail(spec, Stage::PrivateMounts, 0, errno());
    }
    mark(spec, Stage::RootTmpfs);
    // SAFETY: see above.
    unsafe {
        if sys::mount(
            c"tmpfs".as_ptr(),
            spec.root.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"size=1m,mode=755".as_ptr().cast(),
        ) != 0
        {
            fail(spec, Stage::RootTmpfs, 0, errno());
        }
        let fd = sys::open(
            spec.mask.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0,
        );
        if fd < 0 {
            fail(spec, Stage::RootTmpfs, 0, errno());
        }
        sys::close(fd as c_int);
    }
    mark(spec, Stage::FsOp);
    for (i, op) in spec.ops.iter().enumerate() {
        if !fs_op(spec, op) {
            fail(spec, Stage::FsOp, i, errno());
        }
    }
    // The supervisor has created the cgroups meanwhile: join the v1 ones (host paths are still
    // visible before pivot_root). Writing 0, oneself, to `tasks` skips the global threadgroup
    // lock a `cgroup.procs` write takes and the RCU grace period it waits for.
    wait_parent(spec, Stage::WaitCgroups);
    mark(spec, Stage::CgroupJoin);
    for (i, tasks) in spec.join_tasks.iter().enumerate() {
        // SAFETY: see above.
        unsafe {
            let fd = sys::open(tasks.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC, 0);
            if fd < 0 || sys::write(fd as c_int, c"0".as_ptr().cast(), 1) != 1 {
                fail(spec, Stage::CgroupJoin, i, errno());
            }
            sys::close(fd as c_int);
        }
    }
    mark(spec, Stage::PivotRoot);
    // SAFETY: see above.
    unsafe {
        if sys::chdir(spec.root.as_ptr()) != 0
            || libc::syscall(
                libc::SYS_pivot_root,
                spec.pivot_dot.as_ptr(),
                spec.pivot_dot.as_ptr(),
            ) != 0
            || libc::syscall(libc::SYS_umount2, spec.pivot_dot.as_ptr(), libc::MNT_DETACH) != 0
            || sys::chdir(spec.slash.as_ptr()) != 0
        {
            fail(spec, Stage::PivotRoot, 0, errno());
        }
    }
    mark(spec, Stage::ReadOnlyRoot);
    // SAFETY: see above.
    if unsafe {
        sys::mount(
            std::ptr::null(),
            spec.slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        )
    } != 0
    {
        fail(spec, Stage::ReadOnlyRoot, 0, errno());
    }
    mark(spec, Stage::Hostname);
    // SAFETY: see above.
    if unsafe {
        libc::syscall(
            libc::SYS_sethostname,
            spec.hostname.as_ptr(),
            spec.hostname.as_bytes().len(),
        )
    } != 0
    {
        fail(spec, Stage::Hostname, 0, errno());
    }
    if spec.lo_up {
        mark(spec, Stage::Loopback);
        loopback_up(spec);
    }
    mark(spec, Stage::Rlimit);
    for (i, (res, lim)) in spec.rlimits.iter().enumerate() {
        // SAFETY: prlimit64 on ourselves (pid 0) reading the struct owned by spec.
        if unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0,
                *res as c_ulong,
                lim as *const libc::rlimit,
                std::ptr::null_mut::<libc::rlimit>(),
            )
        } != 0
        {
            fail(spec, Stage::Rlimit, i, errno());
        }
    }
    mark(spec, Stage::Nice);
    // SAFETY: integer arguments only.
    if unsafe { libc::syscall(libc::SYS_setpriority, libc::PRIO_PROCESS, 0, spec.nice) } != 0 {
        fail(spec, Stage::Nice, 0, errno());
    }
    mark(spec, Stage::SetGroups);
    // SAFETY: an empty list (size 0, null pointer). The raw call, not glibc's setgroups, which
    // would broadcast to threads this child does not have and wait for them forever.
    if unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) } != 0 {
        fail(spec, Stage::SetGroups, 0, errno());
    }
    if spec.new_userns {
        mark(spec, Stage::UserNs);
        // SAFETY: integer argument only.
        if unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) } != 0 {
            fail(spec, Stage::UserNs, 0, errno());
        }
    }
    // Hand over to the supervisor, which writes the uid/gid maps and has placed this process in
    // the sandbox's cgroups meanwhile (while the root was being built here), then answers.
    mark(spec, Stage::WaitIdMaps);
    let u = b'u';
    // SAFETY: writes one byte from a stack variable.
    if unsafe { sys::write(spec.to_parent, (&u as *const u8).cast(), 1) } != 1 {
        fail(spec, Stage::WaitIdMaps, 0, errno());
    }
    wait_parent(spec, Stage::WaitIdMaps);
    // Now in the sandbox's cgroup: that becomes the root of its cgroup namespace.
    mark(spec, Stage::CgroupNs);
    // SAFETY: integer argument only.
    if unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWCGROUP) } != 0 {
        fail(spec, Stage::CgroupNs, 0, errno());
    }
    drop_privileges(spec);
    mark(spec, Stage::Setsid);
    // SAFETY: no arguments.
    if unsafe { libc::syscall(libc::SYS_setsid) } < 0 {
        fail(spec, Stage::Setsid, 0, errno());
    }
    mark(spec, Stage::Stdio);
    for (target, fd) in spec.stdio.iter().enumerate() {
        if *fd < 0 {
            continue;
        }
        // SAFETY: integer arguments only.
        let ok = unsafe {
            if *fd == target as c_int {
                libc::syscall(libc::SYS_fcntl, *fd, libc::F_SETFD, 0) == 0
            } else {
                libc::syscall(libc::SYS_dup3, *fd, target as c_int, 0) >= 0
            }
        };
        if !ok {
            fail(spec, Stage::Stdio, target, errno());
        }
    }
    mark(spec, Stage::Chdir);
    // SAFETY: see above.
    if unsafe { sys::chdir(spec.cwd.as_ptr()) } != 0 {
        fail(spec, Stage::Chdir, 0, errno());
    }
    reset_signals(spec);
    mark(spec, Stage::CloseFds);
    // Every inherited fd beyond stdio closes at exec.
    // SAFETY: integer arguments only.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            for fd in 3..4096 {
                libc::syscall(libc::SYS_fcntl, fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
    mark(spec, Stage::NoNewPrivs);
    // SAFETY: integer arguments only.
    if unsafe { sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0) } != 0 {
        fail(spec, Stage::NoNewPrivs, 0, errno());
    }
    if spec.landlock_fd >= 0 {
        enforce_landlock(spec);
    }
    if let Some((prog, flags)) = &spec.seccomp {
        mark(spec, Stage::Seccomp);
        let fprog = SockFprog {
            len: prog.len() as u16,
            filter: prog.as_ptr(),
        };
        // SAFETY: fprog and the program it points to outlive the call.
        if unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                1, /* SET_MODE_FILTER */
                *flags,
                &fprog as *const SockFprog,
            )
        } != 0
        {
            fail(spec, Stage::Seccomp, 0, errno());
        }
    }
    mark(spec, Stage::Execve);
    // SAFETY: the strings and NULL-terminated pointer arrays were built by the parent.
    unsafe {
        libc::syscall(
            libc::SYS_execve,
            spec.exe.as_ptr(),
            spec.argv_ptrs.as_ptr(),
            spec.env_ptrs.as_ptr(),
        );
    }
    fail(spec, Stage::Execve, 0, errno())
}

/// Brings `lo` up in the new network namespace.
fn loopback_up(spec: &ChildSpec) {
    // SAFETY: socket/ioctl/close on a stack `ifreq`.
    unsafe {
        let s = libc::syscall(
            libc::SYS_socket,
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
        ) as c_int;
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..2].copy_from_slice(b"lo");
        if s < 0
            || libc::syscall(
                libc::SYS_ioctl,
                s,
                libc::SIOCGIFFLAGS,
                &mut req as *mut IfReq,
            ) != 0
        {
            fail(spec, Stage::Loopback, 0, errno());
        }
        req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        if libc::syscall(
            libc::SYS_ioctl,
            s,
            libc::SIOCSIFFLAGS,
            &mut req as *mut IfReq,
        ) != 0
        {
            fail(spec, Stage::Loopback, 1, errno());
        }
        sys::close(s);
    }
}

/// Capabilities, securebits, the sandbox uid/gid (raw `setresgid`/`setresuid`: glibc's
/// wrappers broadcast to threads), then the parent-death signal again.
fn drop_privileges(spec: &ChildSpec) {
    mark(spec, Stage::DropCapabilities);
    for cap in 0..64 {
        // SAFETY: integer arguments only.
        if unsafe { sys::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0) } != 0
            && errno() != libc::EINVAL
        {
            fail(spec, Stage::DropCapabilities, cap, errno());
        }
    }
    mark(spec, Stage::Securebits);
    // SAFETY: integer arguments only.
    if unsafe { sys::prctl(libc::PR_SET_SECUREBITS, SECBITS_LOCKED_NOROOT, 0) } != 0 {
        fail(spec, Stage::Securebits, 0, errno());
    }
    mark(spec, Stage::SetResGid);
    // SAFETY: integer arguments only.
    if unsafe { libc::syscall(libc::SYS_setresgid, spec.gid, spec.gid, spec.gid) } != 0 {
        fail(spec, Stage::SetResGid, 0, errno());
    }
    mark(spec, Stage::SetResUid);
    // SAFETY: integer arguments only.
    if unsafe { libc::syscall(libc::SYS_setresuid, spec.uid, spec.uid, spec.uid) } != 0 {
        fail(spec, Stage::SetResUid, 0, errno());
    }
    mark(spec, Stage::DropCapabilities);
    let header = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: integer prctl; capset reads the header and two data structs on this stack.
    unsafe {
        if libc::syscall(
            libc::SYS_prctl,
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
        ) != 0
            || libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0
        {
            fail(spec, Stage::DropCapabilities, 64, errno());
        }
    }
    // Credentials changed, which clears the parent-death signal: arm it again, then make sure
    // the supervisor did not die in between (its end of the pipe would be closed).
    mark(spec, Stage::ParentDeath);
    // SAFETY: integer arguments only.
    if unsafe { sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong, 0) } != 0 {
        fail(spec, Stage::ParentDeath, 0, errno());
    }
    let mut pfd = libc::pollfd {
        fd: spec.from_parent,
        events: libc::POLLIN,
        revents: 0,
    };
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ppoll on one stack pollfd with a zero timeout and no signal mask.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ppoll,
            &mut pfd as *mut libc::pollfd,
            1 as c_ulong,
            &zero as *const libc::timespec,
            std::ptr::null::<c_void>(),
            0usize,
        )
    };
    if r != 0 && pfd.revents & libc::POLLHUP != 0 {
        sys::exit(125);
    }
}

/// Default dispositions, then nothing blocked (the supervisor may ignore some, and it cloned
/// this child with every signal blocked).
fn reset_signals(spec: &ChildSpec) {
    mark(spec, Stage::Signals);
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: rt_sigaction reads a stack struct of the kernel's layout.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    KERNEL_SIGSET_SIZE,
                )
            };
        }
    }
    let empty: u64 = 0;
    // SAFETY: rt_sigprocmask reads a stack word of the kernel's sigset size.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            KERNEL_SIGSET_SIZE,
        )
    };
}

/// Fills the ruleset the supervisor created with the planned paths (opened inside the new
/// root) and enforces it.
fn enforce_landlock(spec: &ChildSpec) {
    mark(spec, Stage::LandlockRule);
    for (i, (path, access)) in spec.landlock_rules.iter().enumerate() {
        let fd = open_path_nofollow(path);
        if fd < 0 {
            if errno() == libc::ENOENT {
                continue; // removed since planning: nothing to allow
            }
            fail(spec, Stage::LandlockRule, i, errno());
        }
        // SAFETY: both fds are open; add_path_rule is one raw landlock_add_rule call.
        if unsafe { super::landlock::add_path_rule(spec.landlock_fd, fd, *access) } != 0 {
            fail(spec, Stage::LandlockRule, i, errno());
        }
        sys::close(fd);
    }
    mark(spec, Stage::LandlockRestrict);
    // SAFETY: the ruleset fd is open and no_new_privs is set; one raw syscall.
    if unsafe { super::landlock::restrict_self(spec.landlock_fd) } != 0 {
        fail(spec, Stage::LandlockRestrict, 0, errno());
    }
    sys::close(spec.landlock_fd);
}

/// One file-system op. Returns false with errno set on failure.
fn fs_op(spec: &ChildSpec, op: &ChildOp) -> bool {
    // SAFETY: raw syscalls on C strings owned by `spec` and `op`, and stack buffers.
    unsafe {
        match op {
            ChildOp::Mkdir(p) => sys::mkdir(p.as_ptr(), 0o755) == 0 || errno() == libc::EEXIST,
            ChildOp::Symlink { target, path } => {
                sys::symlink(target.as_ptr(), path.as_ptr()) == 0 || errno() == libc::EEXIST
            }
            ChildOp::Bind {
                src,
                dst,
                attrs,
                mountpoint,
            } => {
                match mountpoint {
                    Some(true)
                        if sys::mkdir(dst.as_ptr(), 0o755) != 0 && errno() != libc::EEXIST =>
                    {
                        return false;
                    }
                    Some(true) => {}
                    Some(false) => {
                        let fd = sys::open(
                            dst.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o444,
                        );
                        if fd < 0 {
                            return false;
                        }
                        sys::close(fd as c_int);
                    }
                    None => {}
                }
                let sfd = open_path_nofollow(src);
                if sfd < 0 {
                    return false;
                }
                let dfd = open_path_nofollow(dst);
                if dfd < 0 {
                    sys::close(sfd);
                    return false;
                }
                let (mut sb, mut db) = ([0u8; 32], [0u8; 32]);
                let r = sys::mount(
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
                sys::close(sfd);
                sys::close(dfd);
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
                sys::mount(
                    source.as_ptr(),
                    dst.as_ptr(),
                    fstype.as_ptr(),
                    *flags,
                    data_ptr,
                ) == 0
            }
            ChildOp::ReadOnly { dst, flags } => {
                sys::mount(
                    std::ptr::null(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    *flags,
                    std::ptr::null(),
                ) == 0
            }
            ChildOp::MaskFile { dst } => {
                sys::mount(
                    spec.mask.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0
                    && sys::mount(
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
fn set_attrs(spec: &ChildSpec, dst: &CString, attrs: u64) -> bool {
    if spec.mount_setattr {
        let attr = MountAttr {
            attr_set: attrs,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: reads a C string and a stack struct of the size passed.
        return unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                dst.as_ptr(),
                AT_RECURSIVE,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        } == 0;
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
    // SAFETY: a C string owned by the spec.
    unsafe {
        sys::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ) == 0
    }
}
