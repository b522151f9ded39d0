//! Parent side of a launch: create the cgroup, clone into new namespaces, feed the child its
//! uid/gid maps, learn whether `execve` succeeded, then supervise: wait with the time limit,
//! kill the whole tree, read back which limit (if any) ended the program.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use super::cgroup::{self, Cgroup, Stats};
use super::child;
use super::egress;
use super::host::HostSupport;
use super::landlock;
use super::plan::Plan;
use super::spec::{ChildSpec, Stage};
use super::{SandboxConfig, SandboxError};

static SEQ: AtomicU64 = AtomicU64::new(0);
/// Held from creating a launch's pipes until the parent has closed the child's ends of them.
static CLONE_LOCK: Mutex<()> = Mutex::new(());
static SWEEP: Once = Once::new();

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// A limit that ended or constrained the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitHit {
    Time { limit: Duration },
    Memory { limit_mb: u64 },
    Pids { limit: u64, refused: u64 },
    Seccomp,
}

impl LimitHit {
    /// The one stderr line `corral sandbox exec` prints for this limit.
    pub fn message(&self) -> String {
        match self {
            LimitHit::Time { limit } => format!("time limit: killed after {}s (process_limits.max_execution_time_seconds)", limit.as_secs()),
            LimitHit::Memory { limit_mb } => format!("memory limit: the kernel OOM killer ended it at {limit_mb} MiB (resources.max_memory_mb)"),
            LimitHit::Pids { limit, refused } => format!("pids limit: {refused} thread/process creation(s) refused at {limit} (process_limits.max_threads + max_child_processes)"),
            LimitHit::Seccomp => "seccomp: killed by SIGSYS for a forbidden system call".to_string(),
        }
    }
}

/// Where a launch spent its time (for `benches/sandbox_launch.rs` and debug logs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LaunchTimes {
    /// Setup before `clone` plus `clone` itself with its new namespaces.
    pub clone: Duration,
    /// Creating the cgroups and writing their limits (overlaps `root`; where the child is born
    /// in a cgroup v2 directory they are made before `clone` and counted there).
    pub cgroups: Duration,
    /// From `clone` until the child has built its root, pivoted and joined its cgroups.
    pub root: Duration,
    /// uid/gid maps, credentials, Landlock, seccomp and `execve` until it succeeded.
    pub exec: Duration,
    /// Removing the cgroups after the program ended.
    pub cgroup_removal: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub exit: Exit,
    pub limits: Vec<LimitHit>,
    pub stats: Stats,
    pub elapsed: Duration,
}

impl Outcome {
    /// The exit status corral itself returns: the command's own code, 128+N for signal N, 124
    /// after the time limit, and never 0 when a limit was hit (then 1).
    pub fn exit_code(&self) -> i32 {
        if self
            .limits
            .iter()
            .any(|l| matches!(l, LimitHit::Time { .. }))
        {
            return 124;
        }
        let code = match self.exit {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        };
        if code == 0 && !self.limits.is_empty() {
            1
        } else {
            code
        }
    }
}

/// A running sandboxed program. Dropping it kills the program and removes its cgroup.
#[derive(Debug)]
pub struct Sandbox {
    /// Launch sequence number (the cgroup name's suffix; the key in the live registry).
    id: u64,
    pid: i32,
    pidfd: OwnedFd,
    cgroup: Option<Cgroup>,
    started: Instant,
    plan_time_limit: Duration,
    memory_mb: u64,
    pids_limit: u64,
    time_limit_hit: bool,
    outcome: Option<Outcome>,
    egress: Option<egress::Proxy>,
    times: LaunchTimes,
    /// GPU locks, released when the program ends.
    gpu: Option<super::gpu::GpuLease>,
    /// In the live registry ([`stop_all`]).
    registered: bool,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SandboxError::Os {
        what: "pipe2",
        source: e.into(),
    })
}

fn read_byte(fd: BorrowedFd<'_>) -> Option<u8> {
    let mut b = [0u8];
    loop {
        match nix::unistd::read(fd, &mut b) {
            Ok(1) => return Some(b[0]),
            Err(nix::errno::Errno::EINTR) => continue,
            _ => return None,
        }
    }
}

fn write_byte(fd: BorrowedFd<'_>, b: u8) -> bool {
    matches!(nix::unistd::write(fd, &[b]), Ok(1))
}

/// Waits for one byte on `fd` until `deadline`: `Ok(Some(b))`, `Ok(None)` at EOF or error,
/// `Err(())` when the deadline passed first.
fn read_byte_until(fd: BorrowedFd<'_>, deadline: Instant) -> Result<Option<u8>, ()> {
    if !wait_readable(fd, deadline) {
        return Err(());
    }
    Ok(read_byte(fd))
}

/// Polls `fd` for input (or hang-up) until `deadline`; false when the deadline passed.
fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match poll(&mut pfd, timeout) {
            Ok(n) if n > 0 => return true,
            Ok(_) if left.is_zero() => return false,
            Err(e) if e != nix::errno::Errno::EINTR => return true, // the read reports it
            _ => {}
        }
        if left.is_zero() {
            return false;
        }
        // Nothing yet with time left (rounding) or EINTR: poll again.
    }
}

/// One shared, anonymous page holding the child's current [`Stage`]: the child stores to it
/// before each step (a plain store, safe between clone and exec), the parent reads it when a
/// launch misses its deadline.
struct Progress {
    word: *mut AtomicU32,
}

impl Progress {
    fn new() -> Result<Progress, SandboxError> {
        // SAFETY: a fresh anonymous shared mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(SandboxError::Os {
                what: "mmap (launch progress page)",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Progress { word: p.cast() })
    }

    fn stage(&self) -> Option<Stage> {
        // SAFETY: the page is mapped until drop; zero-filled memory is a valid AtomicU32.
        Stage::from_u32(unsafe { &*self.word }.load(Ordering::Relaxed))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `new`; no reference to it outlives self.
        unsafe { libc::munmap(self.word.cast(), 4096) };
    }
}

/// The sandboxes this process runs, by pidfd, so that a supervisor shutting down can end them
/// all from any thread ([`stop_all`]), whatever their owners are blocked on.
struct Live {
    stopping: bool,
    pidfds: Vec<(u64, RawFd)>,
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    stopping: false,
    pidfds: Vec::new(),
});

fn live() -> std::sync::MutexGuard<'static, Live> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Refuses every launch from now on and kills every sandbox this process started (their whole
/// trees: pid 1 of a pid namespace takes its namespace with it). Owners blocked on a sandbox see
/// it exit and clean up (reap, remove cgroups) as usual. For a supervisor's shutdown.
pub fn stop_all() -> usize {
    let mut l = live();
    l.stopping = true;
    for (_, fd) in &l.pidfds {
        // SAFETY: the fd is a pidfd kept open by its Sandbox, which unregisters it (under this
        // lock) before closing it.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                *fd,
                libc::SIGKILL,
                std::ptr::null::<u8>(),
                0,
            )
        };
    }
    l.pidfds.len()
}

/// The directory each child mounts its root tmpfs on (inside its own mount namespace, so one
/// directory serves every concurrent launch and nothing is ever mounted on the host).
fn root_dir(cfg: &SandboxConfig) -> Result<PathBuf, SandboxError> {
    let root = cfg.state_dir.join("root");
    std::fs::create_dir_all(&root).map_err(|source| SandboxError::Io {
        path: root.clone(),
        source,
    })?;
    Ok(root)
}

/// Starts `plan`. `stdio` replaces the child's fds 0, 1, 2 (None: inherit the supervisor's).
pub fn spawn(
    plan: &Plan,
    cfg: &SandboxConfig,
    host: &HostSupport,
    stdio: [Option<OwnedFd>; 3],
) -> Result<Sandbox, SandboxError> {
    let t_start = Instant::now();
    let root = root_dir(cfg)?;
    let progress = Progress::new()?;
    let ruleset = match &plan.landlock {
        Some((handled, _)) => {
            let fd = landlock::create_ruleset(*handled).map_err(|source| SandboxError::Os {
                what: "landlock_create_ruleset",
                source,
            })?;
            if handled.net & landlock::ACCESS_NET_CONNECT_TCP != 0 {
                for port in &plan.landlock_connect_ports {
                    landlock::add_net_rule(&fd, *port, landlock::ACCESS_NET_CONNECT_TCP).map_err(
                        |source| SandboxError::Os {
                            what: "landlock_add_rule (TCP connect port)",
                            source,
                        },
                    )?;
                }
            }
            Some(fd)
        }
        None => None,
    };
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let name = cgroup::sandbox_name(seq);
    let join_tasks = Cgroup::planned_self_join_files(&host.cgroups, &name, &plan.cgroup);

    let mut spec = ChildSpec::new(
        plan,
        &root,
        ruleset.as_ref().map_or(-1, |f| f.as_raw_fd()),
        host.mount_setattr,
    );
    spec.progress = progress.word;
    spec.join_tasks = join_tasks
        .iter()
        .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok())
        .collect();
    for (i, s) in stdio.iter().enumerate() {
        spec.stdio[i] = s.as_ref().map_or(-1, |f| f.as_raw_fd());
    }

    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if plan.new_netns {
        flags |= libc::CLONE_NEWNET;
    }
    // With a cgroup v2 directory the cgroups are made first and the child is born in the v2 one
    // (clone3 CLONE_INTO_CGROUP: no `cgroup.procs` write, whose global lock waits for an RCU
    // grace period); otherwise they are made while the child builds its root.
    let mut early_cgroup = None;
    let mut into_cgroup = None;
    if Cgroup::uses_v2(&host.cgroups, &plan.cgroup) {
        let cg =
            Cgroup::create(&host.cgroups, &name, &plan.cgroup).map_err(SandboxError::Cgroup)?;
        into_cgroup = cg.v2_dir().and_then(|d| std::fs::File::open(d).ok());
        early_cgroup = Some(cg);
    }
    // The pipes to this child exist only while no other launch clones: a child cloned by
    // another thread would inherit their ends until its own execve, and a copy of a write end
    // there hides this child's EOF (its exec, or its death) from this launch.
    let clone_turn = CLONE_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (from_parent_r, from_parent_w) = pipe()?;
    let (to_parent_r, to_parent_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    spec.from_parent = from_parent_r.as_raw_fd();
    spec.to_parent = to_parent_w.as_raw_fd();
    spec.err = err_w.as_raw_fd();
    spec.parent_ends = [
        from_parent_w.as_raw_fd(),
        to_parent_r.as_raw_fd(),
        err_r.as_raw_fd(),
    ];
    let pid = clone_child(flags, into_cgroup.as_ref().map(|f| f.as_raw_fd()));
    let (pid, born_in_cgroup) = match pid {
        Ok(x) => x,
        Err(source) => {
            return Err(SandboxError::Os {
                what: "clone",
                source,
            })
        }
    };
    if pid == 0 {
        // SAFETY: we are the freshly cloned child and spec is complete.
        unsafe { child::run(&spec) }
    }
    drop(into_cgroup);
    let t_clone = Instant::now();
    // From here on the child has `launch_timeout` to reach execve; past it, it is killed (by
    // `sandbox`'s drop) and the error names the step it was in.
    let deadline = t_clone + cfg.launch_timeout;
    let timed_out = || SandboxError::LaunchTimeout {
        stage: progress
            .stage()
            .map_or("at an unknown step", Stage::describe),
        after: t_clone.elapsed(),
    };
    drop((from_parent_r, to_parent_w, err_w, ruleset, stdio));
    drop(clone_turn);
    // SAFETY: pidfd_open on our own child.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let source = std::io::Error::last_os_error();
        kill_reap(pid);
        return Err(SandboxError::Os {
            what: "pidfd_open",
            source,
        });
    }
    // SAFETY: new fd owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut sandbox = Sandbox {
        id: seq,
        pid,
        pidfd,
        cgroup: None,
        started: Instant::now(),
        plan_time_limit: plan.time_limit,
        memory_mb: plan.memory_mb,
        pids_limit: plan.pids_limit,
        time_limit_hit: false,
        outcome: None,
        egress: None,
        times: LaunchTimes::default(),
        gpu: plan.gpu.clone(),
        registered: false,
    };
    sandbox.register()?;
    // The child runs nothing but corral's setup until the 'm' answer below; it joins the v1
    // cgroups itself on 'c', the v2 one (unless born there) is joined from here. On any error
    // `sandbox`'s drop kills and reaps the child.
    let cg = match early_cgroup {
        Some(cg) => cg,
        None => Cgroup::create(&host.cgroups, &name, &plan.cgroup).map_err(SandboxError::Cgroup)?,
    };
    let made = cg.self_join_files();
    sandbox.cgroup = Some(cg);
    if made != join_tasks {
        return Err(SandboxError::Os {
            what: "cgroup layout changed while launching",
            source: std::io::Error::other(format!("planned {join_tasks:?}, made {made:?}")),
        });
    }
    let t_cgroup = Instant::now();
    if !write_byte(from_parent_w.as_fd(), b'c') {
        return Err(child_failure(err_r.as_fd(), plan));
    }
    if let Some(cg) = sandbox.cgroup.as_ref().filter(|_| !born_in_cgroup) {
        cg.add_remaining(pid).map_err(SandboxError::Cgroup)?;
    }
    if let Some(policy) = &plan.egress {
        // Listening before the child goes on: the program may connect at once.
        let proxy =
            egress::Proxy::start(pid, policy.clone()).map_err(|source| SandboxError::Os {
                what: "starting the egress proxy in the sandbox's network namespace",
                source,
            })?;
        sandbox.egress = Some(proxy);
    }
    match read_byte_until(to_parent_r.as_fd(), deadline) {
        Ok(Some(b'u')) => {}
        Ok(_) => return Err(child_failure(err_r.as_fd(), plan)),
        Err(()) => return Err(timed_out()),
    }
    let t_root = Instant::now();
    if plan.new_userns {
        write_id_maps(pid, plan.uid, plan.gid)?;
    }
    if !write_byte(from_parent_w.as_fd(), b'm') {
        return Err(child_failure(err_r.as_fd(), plan));
    }
    // EOF on the error pipe: execve succeeded (the pipe is close-on-exec).
    if !wait_readable(err_r.as_fd(), deadline) {
        return Err(timed_out());
    }
    let mut msg = [0u8; 12];
    if let Ok(n @ 1..) = nix::unistd::read(err_r.as_fd(), &mut msg) {
        return Err(decode_failure(&msg, n, plan));
    }
    drop(from_parent_w);
    let t_exec = Instant::now();
    sandbox.times = LaunchTimes {
        clone: t_clone - t_start,
        cgroups: t_cgroup - t_clone,
        root: t_root - t_clone,
        exec: t_exec - t_root,
        cgroup_removal: Duration::ZERO,
    };
    tracing::debug!(
        pid,
        profile = %plan.profile,
        exe = %plan.exe.display(),
        times = ?sandbox.times,
        "sandbox started"
    );
    // Cgroups of dead supervisors go once per process, after the first launch rather than
    // before it: the program is already running (on a second core) while the directories of
    // every hierarchy are read, and the names cannot collide (they carry the owner's pid and
    // start time).
    SWEEP.call_once(|| {
        for dir in cgroup::sweep_stale(&host.cgroups) {
            tracing::info!(cgroup = %dir.display(), "removed a stale sandbox cgroup left by a dead supervisor");
        }
    });
    Ok(sandbox)
}

/// `struct clone_args` (Linux 5.7+, with the `cgroup` field).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Clones a fork-like child with `flags` (0 in the child, its pid in the parent), born in the
/// cgroup v2 directory `cgroup_fd` when given and the kernel can (then `true`).
fn clone_child(flags: i32, cgroup_fd: Option<RawFd>) -> std::io::Result<(i32, bool)> {
    // Every signal blocked across the clone: the child must not run the supervisor's handlers
    // (it unblocks them once their dispositions are back to default, just before execve).
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let mut old = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    let r = clone_child_blocked(flags, cgroup_fd);
    if !matches!(r, Ok((0, _))) {
        // Restores this thread's mask (the child keeps everything blocked). The child must not
        // run this: nix's wrapper is not a raw system call.
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    r
}

fn clone_child_blocked(flags: i32, cgroup_fd: Option<RawFd>) -> std::io::Result<(i32, bool)> {
    if let Some(fd) = cgroup_fd {
        let args = CloneArgs {
            flags: flags as u64 | CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: fd as u64,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 with no new stack behaves like fork (the child gets a copy of this
        // stack); `args` is a complete struct of the size passed.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if pid >= 0 {
            return Ok((pid as i32, true));
        }
        let e = std::io::Error::last_os_error();
        // Kernels before 5.7 (no clone3 or no CLONE_INTO_CGROUP): the plain path below.
        if !matches!(
            e.raw_os_error(),
            Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL)
        ) {
            return Err(e);
        }
    }
    // SAFETY: a raw clone with no new stack behaves like fork: the child gets a copy of this
    // stack and runs only child::run, which makes async-signal-safe syscalls on `spec`.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((pid as i32, false))
}

fn write_id_maps(pid: i32, uid: u32, gid: u32) -> Result<(), SandboxError> {
    for (file, content) in [
        ("uid_map", format!("{uid} {uid} 1\n")),
        ("setgroups", "deny".to_string()),
        ("gid_map", format!("{gid} {gid} 1\n")),
    ] {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        std::fs::write(&path, content).map_err(|source| SandboxError::Io { path, source })?;
    }
    Ok(())
}

fn child_failure(err_fd: BorrowedFd<'_>, plan: &Plan) -> SandboxError {
    let mut msg = [0u8; 12];
    let n = nix::unistd::read(err_fd, &mut msg).unwrap_or(0);
    decode_failure(&msg, n, plan)
}

fn decode_failure(msg: &[u8; 12], n: usize, plan: &Plan) -> SandboxError {
    if n < 12 {
        return SandboxError::ChildDied;
    }
    let word = |i: usize| u32::from_ne_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
    let (stage, index, errno) = (word(0), word(4) as usize, word(8) as i32);
    let source = std::io::Error::from_raw_os_error(errno);
    let stage = Stage::from_u32(stage);
    match stage {
        Some(Stage::Execve) if errno == libc::ENOENT => SandboxError::CommandNotFound {
            command: plan.exe.clone(),
        },
        Some(Stage::Execve) if errno == libc::EACCES => SandboxError::NotExecutable {
            path: plan.exe.clone(),
        },
        _ => {
            let detail = match stage {
                Some(Stage::FsOp) => plan.fs_ops.get(index).map(|op| op.to_string()),
                Some(Stage::LandlockRule) => plan
                    .landlock
                    .as_ref()
                    .and_then(|(_, r)| r.get(index))
                    .map(|(p, _)| p.display().to_string()),
                _ => None,
            };
            SandboxError::Child {
                stage: stage.map_or("an unknown step", Stage::describe).to_string(),
                detail: detail.map(|d| format!(" ({d})")).unwrap_or_default(),
                source,
            }
        }
    }
}

fn kill_reap(pid: i32) {
    // SAFETY: kill and waitpid on our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
}

impl Sandbox {
    /// Enters the live registry, unless the process is shutting down (then the launch fails and
    /// the drop kills the child).
    fn register(&mut self) -> Result<(), SandboxError> {
        let mut l = live();
        if l.stopping {
            return Err(SandboxError::ShuttingDown);
        }
        l.pidfds.push((self.id, self.pidfd.as_raw_fd()));
        self.registered = true;
        Ok(())
    }

    fn unregister(&mut self) {
        if std::mem::take(&mut self.registered) {
            live().pidfds.retain(|(id, _)| *id != self.id);
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Readable when the program has exited (for poll/epoll loops).
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Where the launch (and, once reaped, the cleanup) spent its time.
    pub fn times(&self) -> LaunchTimes {
        self.times
    }

    /// Live cgroup accounting.
    pub fn stats(&self) -> Stats {
        self.cgroup.as_ref().map(Cgroup::stats).unwrap_or_default()
    }

    /// Sends `sig` to the program (pid 1 of its namespace: only signals it handles arrive,
    /// except SIGKILL).
    pub fn signal(&self, sig: i32) {
        if self.outcome.is_none() {
            // SAFETY: pidfd_send_signal on our own child's pidfd; no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    self.pidfd.as_raw_fd(),
                    sig,
                    std::ptr::null::<u8>(),
                    0,
                )
            };
        }
    }

    /// Kills the whole tree (pid 1 of the namespace, then anything left in the cgroup).
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        }
    }

    /// Reaps the program if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<&Outcome>, SandboxError> {
        if self.outcome.is_none() {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a stack status word.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r < 0 {
                return Err(SandboxError::Os {
                    what: "waitpid",
                    source: std::io::Error::last_os_error(),
                });
            }
            if r == 0 {
                return Ok(None);
            }
            self.finish(status);
        }
        Ok(self.outcome.as_ref())
    }

    /// Waits until the program exits or `deadline` passes (then returns `None`).
    pub fn wait_until(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<&Outcome>, SandboxError> {
        loop {
            if self.try_wait()?.is_some() {
                return Ok(self.outcome.as_ref());
            }
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    PollTimeout::try_from(left.max(Duration::from_millis(1)))
                        .unwrap_or(PollTimeout::MAX)
                }
            };
            let mut pfd = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut pfd, timeout) {
                Err(e) if e != nix::errno::Errno::EINTR => {
                    return Err(SandboxError::Os {
                        what: "poll",
                        source: e.into(),
                    })
                }
                _ => {}
            }
        }
    }

    /// Waits for the program with its profile's lifetime limit; past it, kills the whole tree.
    pub fn wait(&mut self) -> Result<Outcome, SandboxError> {
        let deadline = self.started + self.plan_time_limit;
        if self.wait_until(Some(deadline))?.is_none() {
            self.time_limit_hit = true;
            self.kill();
            self.wait_until(None)?;
        }
        self.outcome.clone().ok_or(SandboxError::ChildDied)
    }

    /// Marks the time limit as the reason the program ends, and kills it.
    pub fn kill_for_time_limit(&mut self) {
        self.time_limit_hit = true;
        self.kill();
    }

    fn finish(&mut self, status: i32) {
        self.unregister();
        let exit = if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        };
        // Anything the program left behind (children under max_child_processes) has died with
        // it: the program was pid 1 of its own PID namespace, and the kernel kills and reaps
        // every other process of that namespace before it reports pid 1's exit. Nothing else
        // can join the sandbox's cgroups, so they are empty; checked all the same (one read
        // instead of a kill pass over every hierarchy: ~0.3 ms of each launch's teardown).
        if let Some(cg) = self.cgroup.as_ref().filter(|cg| cg.populated()) {
            cg.kill_all();
        }
        let stats = self.stats();
        let mut limits = Vec::new();
        if self.time_limit_hit {
            limits.push(LimitHit::Time {
                limit: self.plan_time_limit,
            });
        }
        if stats.oom_kills > 0 {
            limits.push(LimitHit::Memory {
                limit_mb: self.memory_mb,
            });
        }
        if stats.pids_max_hits > 0 {
            limits.push(LimitHit::Pids {
                limit: self.pids_limit,
                refused: stats.pids_max_hits,
            });
        }
        if exit == Exit::Signal(libc::SIGSYS) {
            limits.push(LimitHit::Seccomp);
        }
        self.outcome = Some(Outcome {
            exit,
            limits,
            stats,
            elapsed: self.started.elapsed(),
        });
        self.gpu = None;
        if let Some(mut proxy) = self.egress.take() {
            proxy.stop();
            let s = proxy.stats();
            if s.allowed + s.refused > 0 {
                tracing::info!(target: "corral::egress", allowed = s.allowed, refused = s.refused, bytes_up = s.bytes_up, bytes_down = s.bytes_down, "egress totals");
            }
        }
        if let Some(mut cg) = self.cgroup.take() {
            let t = Instant::now();
            if let Err(e) = cg.remove() {
                tracing::warn!(error = %e, "could not remove sandbox cgroup");
            }
            self.times.cgroup_removal = t.elapsed();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.outcome.is_none() {
            self.kill();
            kill_reap(self.pid);
        }
        self.unregister();
        // self.cgroup (if still there) removes itself on drop.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::cgroup::{CgroupHost, Limits};
    use crate::sandbox::devices::{DeviceKind, DeviceRule};

    /// With a cgroup v2 directory the child is born in it (clone3 CLONE_INTO_CGROUP), which
    /// this host's controller-less cgroup2 mount lets us check: a v2 device program forces one.
    #[test]
    fn a_child_is_born_in_its_cgroup_v2_directory() {
        let mut host = CgroupHost::detect();
        assert!(host.v2_own.is_some(), "no cgroup2 mount on this host");
        host.devices = None; // use the v2 device program, so the cgroup has a v2 directory
        let limits = Limits {
            devices: Some(vec![DeviceRule {
                kind: DeviceKind::Char,
                major: 1,
                minor: Some(3),
                read: true,
                write: true,
                mknod: false,
            }]),
            ..Limits::default()
        };
        assert!(Cgroup::uses_v2(&host, &limits));
        let name = format!("test-clone3-{}", std::process::id());
        let cg = Cgroup::create(&host, &name, &limits).unwrap();
        let dir = cg.v2_dir().expect("a v2 directory").to_path_buf();
        let fd = std::fs::File::open(&dir).unwrap();
        let (r, w) = pipe().unwrap();
        let (pid, born) = clone_child(0, Some(fd.as_raw_fd())).unwrap();
        if pid == 0 {
            // SAFETY: the child only blocks on the pipe and exits (async-signal-safe).
            unsafe {
                let mut b = 0u8;
                libc::read(r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        assert!(born, "clone3 with CLONE_INTO_CGROUP was not used");
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        drop(w);
        kill_reap(pid);
        let v2 = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        assert!(
            v2.ends_with(&name),
            "child's v2 cgroup is {v2}, not {}",
            dir.display()
        );
    }
}
