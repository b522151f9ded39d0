//! Landlock through its raw system calls, for both sides of corral: the supervisor's sandbox
//! ruleset (the second file-system barrier behind the mount layout) and the runner's
//! self-restriction after it has loaded its model ([`forbid_file_access`]).
//!
//! In the supervisor, the ruleset is created by the supervisor (so an unsupported kernel is reported before any
//! fork) and filled and enforced by the child after `pivot_root`, with paths inside the new root:
//! only `openat2`, `landlock_add_rule` and `landlock_restrict_self`, all async-signal-safe.
//! corral always asks for every right the running ABI knows ("hard requirement"): there is no
//! silent best-effort fallback; what an old ABI lacks is reported by the planner as a named
//! degradation and refused unless the profile opted into best effort.

use std::os::fd::{FromRawFd, OwnedFd};

pub const ACCESS_FS_EXECUTE: u64 = 1 << 0;
pub const ACCESS_FS_WRITE_FILE: u64 = 1 << 1;
pub const ACCESS_FS_READ_FILE: u64 = 1 << 2;
pub const ACCESS_FS_READ_DIR: u64 = 1 << 3;
pub const ACCESS_FS_REMOVE_DIR: u64 = 1 << 4;
pub const ACCESS_FS_REMOVE_FILE: u64 = 1 << 5;
pub const ACCESS_FS_MAKE_CHAR: u64 = 1 << 6;
pub const ACCESS_FS_MAKE_DIR: u64 = 1 << 7;
pub const ACCESS_FS_MAKE_REG: u64 = 1 << 8;
pub const ACCESS_FS_MAKE_SOCK: u64 = 1 << 9;
pub const ACCESS_FS_MAKE_FIFO: u64 = 1 << 10;
pub const ACCESS_FS_MAKE_BLOCK: u64 = 1 << 11;
pub const ACCESS_FS_MAKE_SYM: u64 = 1 << 12;
pub const ACCESS_FS_REFER: u64 = 1 << 13; // ABI 2
pub const ACCESS_FS_TRUNCATE: u64 = 1 << 14; // ABI 3
pub const ACCESS_FS_IOCTL_DEV: u64 = 1 << 15; // ABI 5
pub const ACCESS_NET_BIND_TCP: u64 = 1 << 0; // ABI 4
pub const ACCESS_NET_CONNECT_TCP: u64 = 1 << 1; // ABI 4
pub const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0; // ABI 6
pub const SCOPE_SIGNAL: u64 = 1 << 1; // ABI 6

const CREATE_RULESET_VERSION: u32 = 1;
pub const RULE_PATH_BENEATH: u32 = 1;
pub const RULE_NET_PORT: u32 = 2;

/// Rights for files only (Landlock refuses directory-only rights on a file rule).
pub const FILE_RIGHTS: u64 = ACCESS_FS_EXECUTE
    | ACCESS_FS_WRITE_FILE
    | ACCESS_FS_READ_FILE
    | ACCESS_FS_TRUNCATE
    | ACCESS_FS_IOCTL_DEV;
pub const READ: u64 = ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR;
pub const WRITE: u64 = READ
    | ACCESS_FS_WRITE_FILE
    | ACCESS_FS_REMOVE_DIR
    | ACCESS_FS_REMOVE_FILE
    | ACCESS_FS_MAKE_DIR
    | ACCESS_FS_MAKE_REG
    | ACCESS_FS_MAKE_SYM
    | ACCESS_FS_MAKE_FIFO
    | ACCESS_FS_MAKE_SOCK
    | ACCESS_FS_REFER
    | ACCESS_FS_TRUNCATE;
pub const EXEC: u64 = ACCESS_FS_READ_FILE | ACCESS_FS_EXECUTE;

#[repr(C)]
#[derive(Debug, Default)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the kernel UAPI).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub struct PathBeneathAttr {
    pub allowed_access: u64,
    pub parent_fd: i32,
}

/// The Landlock ABI version of the running kernel, or `None` when Landlock is unavailable
/// (not built in, not in the `lsm=` list, or disabled).
pub fn abi_version() -> Option<u32> {
    // SAFETY: the VERSION query takes no attribute pointer and size 0; it only returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).ok().filter(|v| *v > 0)
}

/// File-system rights the given ABI knows.
pub fn fs_rights(abi: u32) -> u64 {
    let mut r = (1u64 << 13) - 1;
    if abi >= 2 {
        r |= ACCESS_FS_REFER;
    }
    if abi >= 3 {
        r |= ACCESS_FS_TRUNCATE;
    }
    if abi >= 5 {
        r |= ACCESS_FS_IOCTL_DEV;
    }
    r
}

/// What a ruleset handles (denies unless a rule allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handled {
    pub fs: u64,
    pub net: u64,
    pub scoped: u64,
}

/// Creates a ruleset handling `handled`; the child adds rules to it and enforces it.
pub fn create_ruleset(handled: Handled) -> std::io::Result<OwnedFd> {
    let attr = RulesetAttr {
        handled_access_fs: handled.fs,
        handled_access_net: handled.net,
        scoped: handled.scoped,
    };
    // SAFETY: attr is a valid, initialised struct of the size passed; the kernel copies it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd (O_CLOEXEC) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Adds a path rule. Async-signal-safe.
///
/// # Safety
/// `ruleset` and `parent` must be open fds.
pub unsafe fn add_path_rule(ruleset: i32, parent: i32, allowed: u64) -> i64 {
    let attr = PathBeneathAttr {
        allowed_access: allowed,
        parent_fd: parent,
    };
    // SAFETY: attr lives across the call; the caller guarantees the fds.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    }
}

/// `struct landlock_net_port_attr`.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
struct NetPortAttr {
    allowed_access: u64,
    port: u64,
}

/// Allows `access` (ACCESS_NET_*) on TCP `port`, whatever the address.
pub fn add_net_rule(ruleset: &OwnedFd, port: u16, access: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let attr = NetPortAttr {
        allowed_access: access,
        port: u64::from(port),
    };
    // SAFETY: attr lives across the call and the ruleset fd is open (borrowed).
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_NET_PORT,
            &attr as *const NetPortAttr,
            0u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Enforces the ruleset on the calling thread (and its future children). Async-signal-safe.
///
/// # Safety
/// `ruleset` must be an open Landlock ruleset fd; no_new_privs must already be set.
pub unsafe fn restrict_self(ruleset: i32) -> i64 {
    // SAFETY: plain syscall on an fd the caller guarantees.
    unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) }
}

/// Self-restriction: a domain that handles every file-system right this kernel knows and
/// allows none, so the calling process cannot open any file again. Stacks on any domain already
/// in force. Without Landlock (a runner started unsandboxed for a benchmark) it does nothing.
pub fn forbid_file_access() -> std::io::Result<()> {
    let Some(abi) = abi_version() else {
        return Ok(());
    };
    // `landlock_restrict_self` restricts the calling thread and the threads it starts later,
    // not threads that already run (the kernel's all-threads flag is ABI 8). The runner calls
    // this after its loading threads have ended and before it starts its pool: were another
    // thread running, it would escape the restriction, so refuse.
    // A thread its caller has just joined can still be listed for a moment (the kernel wakes
    // the joiner before it removes the thread): give such a thread 100 ms to go.
    let mut threads = thread_count()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    while threads != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
        threads = thread_count()?;
    }
    if threads != 1 {
        return Err(std::io::Error::other(format!(
            "{threads} threads are running: a Landlock self-restriction would leave all but this one unrestricted"
        )));
    }
    let ruleset = create_ruleset(Handled {
        fs: fs_rights(abi),
        net: 0,
        scoped: 0,
    })?;
    use std::os::fd::AsRawFd;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `ruleset` is the open ruleset fd created above; no_new_privs is set.
    if unsafe { restrict_self(ruleset.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The threads of this process (`/proc/self/task`).
pub fn thread_count() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

#[cfg(test)]
mod tests {
    #[test]
    fn threads_are_counted() {
        let before = super::thread_count().unwrap();
        assert!(before >= 1);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            ready_tx.send(()).unwrap();
            rx.recv().ok();
        });
        ready_rx.recv().unwrap();
        assert!(super::thread_count().unwrap() > before.min(1));
        assert!(super::thread_count().unwrap() >= 2);
        tx.send(()).unwrap();
        t.join().unwrap();
    }
}
