//! `escape-probe`: run *inside* a corral sandbox by the integration tests, it attempts one
//! forbidden (or, for a few checks, required) operation per invocation and prints what the kernel
//! answered as one JSON line on stdout:
//! `{"check","target","ok","errno","error","detail"}` where `ok` says whether the attempt succeeded.
//!
//! Safety guard: run unsandboxed as root, some checks could damage the machine. So before anything
//! else the probe reads `/proc/self/status` and refuses (exit 2) unless `NoNewPrivs` is 1, a seccomp
//! filter is installed (`Seccomp: 2`) and the effective uid is not 0.
//!
//! Usage: `escape-probe CHECK [ARGS...]`; an unknown check or bad arguments exits 64.

use serde_json::{json, Value};
use std::ffi::{c_char, c_int, c_long, c_ulong, c_void, CString};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};
use std::{fs, ptr, thread};

use libc::{syscall, SYS_add_key, SYS_bpf, SYS_clone, SYS_finit_module, SYS_init_module};
use libc::{SYS_io_uring_setup, SYS_kexec_load, SYS_keyctl, SYS_perf_event_open};
use libc::{SYS_process_vm_readv, SYS_reboot, SYS_userfaultfd};

const MIB: usize = 1 << 20;

/// Outcome of one attempt: did it succeed, and what errno the kernel gave when it did not.
struct Out {
    ok: bool,
    errno: Option<i32>,
    detail: Value,
}

impl Out {
    /// From a raw libc/syscall return value (negative = failure); reads errno immediately, so call
    /// it right after the libc call.
    fn ret(r: i64) -> Self {
        let errno = (r < 0).then(io::Error::last_os_error);
        Out::new(r >= 0, errno.and_then(|e| e.raw_os_error()))
    }
    fn new(ok: bool, errno: Option<i32>) -> Self {
        let detail = Value::Null;
        Out { ok, errno, detail }
    }
    fn success() -> Self {
        Out::new(true, None)
    }
    fn err(e: &io::Error) -> Self {
        // std reports its own connect timeout without an OS error code.
        let timeout = (e.kind() == io::ErrorKind::TimedOut).then_some(libc::ETIMEDOUT);
        Out::new(false, e.raw_os_error().or(timeout))
    }
    fn detail(mut self, d: impl Into<Value>) -> Self {
        self.detail = d.into();
        self
    }
    /// Sets `detail` (the failing step, or what succeeded) depending on the outcome.
    fn detail_if(self, on_ok: impl FnOnce() -> Value, on_err: impl Into<Value>) -> Self {
        let d = if self.ok { on_ok() } else { on_err.into() };
        self.detail(d)
    }
}

/// Tags an I/O failure with the step that failed (used as `detail`).
fn step<T>(r: io::Result<T>, name: &str) -> Result<T, Out> {
    r.map_err(|e| Out::err(&e).detail(name))
}

/// Flattens the result of a multi-step attempt (failures carry their own `Out`).
fn flat(r: Result<Out, Out>) -> Out {
    r.unwrap_or_else(|o| o)
}

/// For calls returning a new fd: reports the result and closes the fd if one was made.
fn fd_out(r: i64) -> Out {
    let out = Out::ret(r);
    if let Ok(fd) = c_int::try_from(r) {
        if fd >= 0 {
            // SAFETY: `fd` was just returned to us by the kernel and is owned by nobody else.
            unsafe { libc::close(fd) };
        }
    }
    out
}

/// Reports a fork/clone result in the parent (reaping the child); the child never gets here.
fn reap(pid: i64) -> Out {
    let out = Out::ret(pid);
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return out;
    };
    if pid <= 0 {
        return out;
    }
    let mut status = 0;
    // SAFETY: waiting for our own child; `status` is a valid out pointer.
    let w = unsafe { libc::waitpid(pid, &mut status, 0) };
    out.detail(format!("pid={pid} waited={w} status={status}"))
}

fn errno_name(e: i32) -> String {
    macro_rules! names {
        ($($n:ident)*) => {
            match e { $(libc::$n => stringify!($n).to_string(),)* _ => format!("E{e}") }
        };
    }
    // ENOTSUP == EOPNOTSUPP and EWOULDBLOCK == EAGAIN on Linux.
    names!(EPERM ENOENT ESRCH EINTR EIO ENXIO E2BIG ENOEXEC EBADF ECHILD EAGAIN ENOMEM EACCES
        EFAULT EBUSY EEXIST EXDEV ENODEV ENOTDIR EISDIR EINVAL ENFILE EMFILE ENOTTY ETXTBSY EFBIG
        ENOSPC ESPIPE EROFS EMLINK EPIPE ERANGE ENAMETOOLONG ENOSYS ENOTEMPTY ELOOP ENOKEY ENOTSOCK
        EPROTOTYPE ENOPROTOOPT EPROTONOSUPPORT ESOCKTNOSUPPORT EOPNOTSUPP EPFNOSUPPORT EAFNOSUPPORT
        EADDRINUSE EADDRNOTAVAIL ENETDOWN ENETUNREACH ECONNABORTED ECONNRESET ENOBUFS EISCONN
        ENOTCONN ETIMEDOUT ECONNREFUSED EHOSTUNREACH EALREADY EINPROGRESS EDQUOT)
}

/// The safety guard: true only under no_new_privs, a seccomp filter, and a non-zero euid.
fn sandboxed() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let has = |line: &str| status.lines().any(|l| l == line);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    has("NoNewPrivs:\t1") && has("Seccomp:\t2") && euid != 0
}

fn main() {
    if !sandboxed() {
        eprintln!("escape-probe: refusing to run outside a corral sandbox");
        std::process::exit(2);
    }
    let args: Result<Vec<String>, _> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect();
    let result = match args.as_deref() {
        Ok([check, rest @ ..]) => {
            run(check, rest).map(|(target, out)| (check.clone(), target, out))
        }
        Ok([]) => Err("usage: escape-probe CHECK [ARGS...]".to_string()),
        Err(_) => Err("arguments must be UTF-8".to_string()),
    };
    let (check, target, out) = match result {
        Ok(r) => r,
        Err(msg) => {
            eprintln!("escape-probe: {msg}");
            std::process::exit(64);
        }
    };
    let line = json!({
        "check": check, "target": target, "ok": out.ok, "errno": out.errno,
        "error": out.errno.map(errno_name), "detail": out.detail,
    });
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn num<T: FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad number {s:?}"))
}

fn secs(s: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(num(s)?).map_err(|_| format!("bad duration {s:?}"))
}

/// Runs one check; returns (target, outcome) or a usage error.
fn run(check: &str, a: &[String]) -> Result<(String, Out), String> {
    let arity = match check {
        "read" | "list" | "write" | "stat" | "threads" | "alloc" | "spin" | "sleep"
        | "unix-abstract" | "unix-path" | "ptrace" | "process-vm-readv" => 1,
        "tcp" | "udp" | "kill" | "socket" | "proxy-connect" | "dns" => 2,
        "proxy-get" => 1,
        "proxy-tls" | "socket-proto" => 3,
        _ => 0,
    };
    if check == "exec" {
        if a.is_empty() {
            return Err("exec: expected PATH [ARGS...]".into());
        }
    } else if a.len() != arity {
        return Err(format!(
            "{check}: expected {arity} argument(s), got {}",
            a.len()
        ));
    }
    let p = a.first().map_or("", String::as_str);
    let q = a.get(1).map_or("", String::as_str);
    let t = |s: &str| s.to_string();
    let tmp = Path::new("/tmp").is_dir();
    let root_or_tmp = if tmp { c"/tmp" } else { c"/" };
    Ok(match check {
        "read" => (t(p), read(p)),
        "list" => (t(p), list(p)),
        "write" => (t(p), write(p)),
        "stat" => (t(p), stat(p)),
        "exec" => (a.join(" "), exec(a)?),
        "fork" => {
            // SAFETY: the process is single-threaded here; the child only calls `_exit`.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: `_exit` is async-signal-safe and always sound to call.
                unsafe { libc::_exit(0) }
            }
            (t("fork()"), reap(pid.into()))
        }
        "clone-process" => {
            let flags = libc::SIGCHLD as c_ulong;
            // SAFETY: a fork-like clone (no CLONE_VM/CLONE_THREAD, stack 0 = copy of ours); the
            // child only calls `_exit`.
            let pid = unsafe { syscall(SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
            if pid == 0 {
                // SAFETY: `_exit` is async-signal-safe and always sound to call.
                unsafe { libc::_exit(0) }
            }
            (t("clone(SIGCHLD)"), reap(pid))
        }
        "thread" => (
            t("thread::spawn"),
            match thread::Builder::new().spawn(|| 42) {
                Ok(h) => match h.join() {
                    Ok(42) => Out::success(),
                    _ => Out::new(false, None).detail("join"),
                },
                Err(e) => Out::err(&e).detail("spawn"),
            },
        ),
        "threads" => (format!("{p} threads"), threads(num(p)?)),
        "alloc" => (format!("{p} MiB"), alloc(num(p)?)),
        "spin" => {
            let end = Instant::now() + secs(p)?;
            let _ = io::stdout().flush();
            let mut n = 0u64;
            while Instant::now() < end {
                n = std::hint::black_box(n.wrapping_add(1));
            }
            (format!("{p} s"), Out::success())
        }
        "sleep" => {
            thread::sleep(secs(p)?);
            (format!("{p} s"), Out::success())
        }
        "tcp" | "udp" => {
            let addr = SocketAddr::new(num::<IpAddr>(p)?, num(q)?);
            let out = if check == "tcp" { tcp(addr) } else { udp(addr) };
            (addr.to_string(), out)
        }
        "proxy-connect" => (format!("CONNECT {p}:{q}"), proxy_connect(p, q, b"ping\n")),
        "proxy-tls" => {
            let sni = a.get(2).map_or("", String::as_str);
            (
                format!("CONNECT {p}:{q} sni {sni}"),
                proxy_connect(p, q, &client_hello(sni)),
            )
        }
        "proxy-get" => (t(p), proxy_get(p)),
        "dns" => (format!("{p}:{q}"), dns(p, num(q)?)),
        "unix-abstract" => (format!("@{p}"), unix_abstract(p)?),
        "unix-path" => (
            t(p),
            match UnixStream::connect(p) {
                Ok(_) => Out::success(),
                Err(e) => Out::err(&e),
            },
        ),
        "ptrace" => (format!("pid {p}"), ptrace(num(p)?)),
        "kill" => {
            let (pid, sig) = (num(p)?, num(q)?);
            // SAFETY: kill takes plain integers.
            let r = unsafe { libc::kill(pid, sig) };
            (format!("pid {pid} signal {sig}"), Out::ret(r.into()))
        }
        "mount" => {
            // SAFETY: all pointers are NUL-terminated string literals or null (no data).
            let r = unsafe {
                let (src, fs) = (c"none".as_ptr(), c"tmpfs".as_ptr());
                libc::mount(src, root_or_tmp.as_ptr(), fs, 0, ptr::null())
            };
            (
                format!("tmpfs on {}", root_or_tmp.to_string_lossy()),
                Out::ret(r.into()),
            )
        }
        "userns" | "netns" => {
            let (flag, name) = match check {
                "userns" => (libc::CLONE_NEWUSER, "CLONE_NEWUSER"),
                _ => (libc::CLONE_NEWNET, "CLONE_NEWNET"),
            };
            // SAFETY: unshare takes a plain flag word.
            let r = unsafe { libc::unshare(flag) };
            (format!("unshare({name})"), Out::ret(r.into()))
        }
        "setns" => (t("/proc/1/ns/mnt"), setns()),
        "chroot" => {
            // SAFETY: the path is a NUL-terminated string literal.
            let r = unsafe { libc::chroot(root_or_tmp.as_ptr()) };
            let target = root_or_tmp.to_string_lossy().into_owned();
            (target, Out::ret(r.into()))
        }
        "bpf" => {
            let mut attr = [0u32; 32]; // 128 bytes: map_type=hash, key 4, value 4, 1 entry
            attr[..4].copy_from_slice(&[1, 4, 4, 1]);
            // SAFETY: `attr` is a live 128-byte buffer for the duration of the call.
            let r = unsafe { syscall(SYS_bpf, 0usize, attr.as_mut_ptr(), 128usize) };
            (t("bpf(BPF_MAP_CREATE)"), fd_out(r))
        }
        "perf" => {
            let mut attr = [0u32; 32]; // PERF_TYPE_SOFTWARE, size 128, config CPU_CLOCK (0)
            attr[..2].copy_from_slice(&[1, 128]);
            let (pid, cpu, group): (c_long, c_long, c_long) = (0, -1, -1);
            // SAFETY: `attr` is a live 128-byte perf_event_attr for the duration of the call.
            let r = unsafe {
                syscall(
                    SYS_perf_event_open,
                    attr.as_mut_ptr(),
                    pid,
                    cpu,
                    group,
                    0usize,
                )
            };
            (t("perf_event_open(SW_CPU_CLOCK)"), fd_out(r))
        }
        "add-key" => {
            let (ty, desc, keyring) = (c"user".as_ptr(), c"corral-probe".as_ptr(), -2 as c_long);
            // SAFETY: NUL-terminated literals and a 1-byte payload that outlive the call;
            // keyring -2 is KEY_SPEC_PROCESS_KEYRING.
            let r = unsafe { syscall(SYS_add_key, ty, desc, b"x".as_ptr(), 1usize, keyring) };
            (t("add_key(user, corral-probe)"), Out::ret(r))
        }
        "keyctl" => {
            let (cmd, keyring, create): (c_long, c_long, c_long) = (0, -3, 0);
            // SAFETY: KEYCTL_GET_KEYRING_ID takes only integers.
            let r = unsafe { syscall(SYS_keyctl, cmd, keyring, create) };
            (t("keyctl(GET_KEYRING_ID, session)"), Out::ret(r))
        }
        "init-module" => {
            let image = [0u8; 64];
            // SAFETY: `image` is a live 64-byte buffer; params is a NUL-terminated literal.
            let r = unsafe { syscall(SYS_init_module, image.as_ptr(), 64usize, c"".as_ptr()) };
            (t("init_module(64 zero bytes)"), Out::ret(r))
        }
        "finit-module" => (t("finit_module(/proc/self/exe)"), finit_module()),
        "io-uring" => {
            let mut params = [0u8; 120];
            // SAFETY: `params` is a live, zeroed 120-byte io_uring_params.
            let r = unsafe { syscall(SYS_io_uring_setup, 1usize, params.as_mut_ptr()) };
            (t("io_uring_setup(1)"), fd_out(r))
        }
        "userfaultfd" => {
            // SAFETY: userfaultfd takes a plain flag word.
            let r = unsafe { syscall(SYS_userfaultfd, 0usize) };
            (t("userfaultfd(0)"), fd_out(r))
        }
        "kexec" => {
            // SAFETY: all-zero arguments: no segments, no pointers dereferenced.
            let r = unsafe { syscall(SYS_kexec_load, 0usize, 0usize, 0usize, 0usize) };
            (t("kexec_load(0,0,0,0)"), Out::ret(r))
        }
        "reboot" => {
            // SAFETY: deliberately wrong magic numbers: the kernel answers EPERM or EINVAL and
            // never reboots.
            let r = unsafe { syscall(SYS_reboot, 0usize, 0usize, 0usize, 0usize) };
            (t("reboot(bad magic)"), Out::ret(r))
        }
        "clock-settime" => (t("CLOCK_REALTIME"), clock_settime()),
        "process-vm-readv" => (format!("pid {p} @0x400000"), process_vm_readv(num(p)?)),
        "tiocsti" => {
            let c = b'x' as c_char;
            // SAFETY: TIOCSTI reads one byte from a valid pointer.
            let r = unsafe { libc::ioctl(0, libc::TIOCSTI, &c) };
            (t("ioctl(0, TIOCSTI)"), Out::ret(r.into()))
        }
        "setuid0" => {
            // SAFETY: setresuid takes plain integers.
            let r = unsafe { libc::setresuid(0, 0, 0) };
            (t("setresuid(0,0,0)"), Out::ret(r.into()))
        }
        "caps" => (t("/proc/self/status"), caps()),
        "procs" => (t("/proc"), procs()),
        "cgroup-write" => (t("cgroup files"), cgroup_write()),
        "status" => (t("self"), status()),
        "x32" => {
            let _ = io::stdout().flush();
            // SAFETY: getpid through the x32 ABI takes no arguments and touches no memory.
            let r = unsafe { syscall(0x4000_0000 | 39) };
            let out = Out::ret(r);
            (
                t("x32 getpid"),
                Out { ok: true, ..out }.detail(format!("ret={r}")),
            )
        }
        "socket" => {
            let (domain, ty) = (num(p)?, num(q)?);
            // SAFETY: socket takes plain integers.
            let r = unsafe { libc::socket(domain, ty, 0) };
            (format!("socket({domain}, {ty}, 0)"), fd_out(r.into()))
        }
        "socket-proto" => {
            let (domain, ty, proto) = (num(p)?, num(q)?, num(&a[2])?);
            // SAFETY: socket takes plain integers.
            let r = unsafe { libc::socket(domain, ty, proto) };
            (format!("socket({domain}, {ty}, {proto})"), fd_out(r.into()))
        }
        "personality" => {
            // SAFETY: personality takes a plain flag word.
            let r = unsafe { libc::personality(0x0040000) };
            let out =
                Out::ret(r.into()).detail_if(|| format!("previous=0x{r:x}").into(), Value::Null);
            (t("personality(ADDR_NO_RANDOMIZE)"), out)
        }
        _ => return Err(format!("unknown check {check:?}")),
    })
}

fn read(path: &str) -> Out {
    flat((|| {
        let mut f = step(fs::File::open(path), "open")?;
        let mut buf = [0u8; 64];
        let n = step(f.read(&mut buf), "read")?;
        Ok(Out::success().detail(n.to_string()))
    })())
}

fn list(path: &str) -> Out {
    flat((|| {
        let names = step(fs::read_dir(path), "opendir")?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<Vec<_>>>();
        let mut names = step(names, "readdir")?;
        names.sort();
        names.truncate(50);
        Ok(Out::success().detail(names.join(",")))
    })())
}

fn write(path: &str) -> Out {
    flat((|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true).mode(0o644);
        let mut f = step(opts.open(path), "open")?;
        step(f.write_all(b"corral-probe\n"), "write")?;
        Ok(Out::success())
    })())
}

fn stat(path: &str) -> Out {
    match fs::symlink_metadata(path) {
        Ok(m) => {
            let (mode, uid, size) = (m.mode(), m.uid(), m.size());
            Out::success().detail(format!("mode={mode:o} uid={uid} size={size}"))
        }
        Err(e) => Out::err(&e),
    }
}

fn exec(argv: &[String]) -> Result<Out, String> {
    let cargs: Result<Vec<_>, _> = argv.iter().map(|s| CString::new(s.as_str())).collect();
    let cargs = cargs.map_err(|_| "exec: NUL byte in argument")?;
    let mut ptrs: Vec<*const c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(ptr::null());
    let env = [ptr::null::<c_char>()];
    let _ = io::stdout().flush();
    // SAFETY: `ptrs` and `env` are null-terminated arrays of pointers to live C strings.
    let r = unsafe { libc::execve(ptrs[0], ptrs.as_ptr(), env.as_ptr()) };
    Ok(Out::ret(r.into()))
}

fn threads(n: usize) -> Out {
    let mut handles = Vec::new();
    let mut failure = None;
    for _ in 0..n {
        let b = thread::Builder::new().stack_size(64 * 1024);
        match b.spawn(|| thread::sleep(Duration::from_secs(2))) {
            Ok(h) => handles.push(h),
            Err(e) => {
                failure = Some(Out::err(&e));
                break;
            }
        }
    }
    let k = handles.len();
    for h in handles {
        let _ = h.join();
    }
    let out = failure.unwrap_or_else(Out::success);
    Out { ok: k == n, ..out }.detail(format!("spawned={k}"))
}

fn alloc(mb: usize) -> Out {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for i in 0..mb {
        let mut chunk = Vec::new();
        if chunk.try_reserve_exact(MIB).is_err() || chunks.try_reserve(1).is_err() {
            return Out::new(false, Some(libc::ENOMEM)).detail(format!("allocated={i}"));
        }
        chunk.resize(MIB, 0);
        for page in (0..MIB).step_by(4096) {
            chunk[page] = 1;
        }
        chunks.push(chunk);
        if (i + 1) % 64 == 0 {
            eprintln!("escape-probe: allocated {} MiB", i + 1);
        }
    }
    std::hint::black_box(&chunks);
    Out::success().detail(format!("allocated={mb}"))
}

fn tcp(addr: SocketAddr) -> Out {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => Out::success(),
        Err(e) => Out::err(&e).detail("connect"),
    }
}

fn udp(addr: SocketAddr) -> Out {
    flat((|| {
        let local = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let s = step(UdpSocket::bind(local), "bind")?;
        step(s.connect(addr), "connect")?;
        step(s.send(b"x"), "send")?;
        Ok(Out::success())
    })())
}

/// The proxy named by `HTTPS_PROXY` (as corral sets it for network Restricted).
fn proxy() -> Result<TcpStream, Out> {
    let url =
        std::env::var("HTTPS_PROXY").map_err(|_| Out::new(false, None).detail("no HTTPS_PROXY"))?;
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let s = step(TcpStream::connect(addr), "connect to proxy")?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    Ok(s)
}

/// Reads a response head; returns (status, head text).
fn response_head(s: &mut TcpStream) -> Result<(u16, String), Out> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            Ok(_) => break,
            Err(e) => return Err(Out::err(&e).detail("read response")),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

/// `CONNECT host:port` through the proxy, then sends `payload` and reads what comes back.
fn proxy_connect(host: &str, port: &str, payload: &[u8]) -> Out {
    flat((|| {
        let mut s = proxy()?;
        step(
            write!(
                s,
                "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
            ),
            "send CONNECT",
        )?;
        let (status, head) = response_head(&mut s)?;
        if status != 200 {
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            return Ok(Out::new(false, None).detail(json!({"status": status, "body": body.trim()})));
        }
        let _ = head;
        step(s.write_all(payload), "send payload")?;
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        Ok(Out::new(!reply.is_empty(), None)
            .detail(json!({"status": status, "reply": String::from_utf8_lossy(&reply)})))
    })())
}

/// An absolute-form GET through the proxy; reports status, size and time of the body.
fn proxy_get(url: &str) -> Out {
    flat((|| {
        let mut s = proxy()?;
        let host = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        step(
            write!(s, "GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            "send GET",
        )?;
        let t = Instant::now();
        let (status, _) = response_head(&mut s)?;
        let mut body = Vec::new();
        let _ = s.read_to_end(&mut body);
        let secs = t.elapsed().as_secs_f64();
        let prefix = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        Ok(Out::new((200..300).contains(&status), None)
            .detail(json!({"status": status, "bytes": body.len(), "secs": secs, "body": prefix})))
    })())
}

/// A minimal TLS 1.2/1.3 ClientHello record naming `sni` (empty: no server_name).
fn client_hello(sni: &str) -> Vec<u8> {
    let mut exts = Vec::new();
    if !sni.is_empty() {
        let n = sni.len() as u16;
        exts.extend_from_slice(&[0, 0]);
        exts.extend_from_slice(&(n + 5).to_be_bytes());
        exts.extend_from_slice(&(n + 3).to_be_bytes());
        exts.push(0);
        exts.extend_from_slice(&n.to_be_bytes());
        exts.extend_from_slice(sni.as_bytes());
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x5a; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut msg = vec![1, 0];
    msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
    msg.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    rec.extend_from_slice(&msg);
    rec
}

/// Name resolution the usual way (getaddrinfo).
fn dns(name: &str, port: u16) -> Out {
    use std::net::ToSocketAddrs;
    match (name, port).to_socket_addrs() {
        Ok(a) => Out::success().detail(a.map(|x| x.to_string()).collect::<Vec<_>>().join(",")),
        Err(e) => Out::err(&e).detail(e.to_string()),
    }
}

fn unix_abstract(name: &str) -> Result<Out, String> {
    // SAFETY: sockaddr_un is plain old data, for which all-zero bytes are valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.len() + 1 > addr.sun_path.len() {
        return Err("unix-abstract: name too long".into());
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path[1..].iter_mut().zip(name.bytes()) {
        *d = s as c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len();
    // SAFETY: socket takes plain integers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Ok(Out::ret(fd.into()).detail("socket"));
    }
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let r = unsafe { libc::connect(fd, ptr::from_ref(&addr).cast(), len as libc::socklen_t) };
    let out = Out::ret(r.into());
    // SAFETY: `fd` is our own socket.
    unsafe { libc::close(fd) };
    Ok(out.detail_if(|| Value::Null, "connect"))
}

fn ptrace(pid: libc::pid_t) -> Out {
    let null = ptr::null_mut::<c_void>();
    // SAFETY: PTRACE_ATTACH ignores addr and data.
    let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, null, null) };
    let out = Out::ret(r);
    if r == 0 {
        let mut status = 0;
        // SAFETY: wait for the attach stop of our new tracee, then detach from it.
        unsafe {
            libc::waitpid(pid, &mut status, libc::__WALL);
            libc::ptrace(libc::PTRACE_DETACH, pid, null, null);
        }
    }
    out
}

fn setns() -> Out {
    // SAFETY: the path is a NUL-terminated string literal.
    let fd = unsafe { libc::open(c"/proc/1/ns/mnt".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Out::ret(fd.into()).detail("open");
    }
    // SAFETY: `fd` is our own open file.
    let r = unsafe { libc::setns(fd, 0) };
    let out = Out::ret(r.into());
    // SAFETY: `fd` is our own open file.
    unsafe { libc::close(fd) };
    out.detail_if(|| Value::Null, "setns")
}

fn finit_module() -> Out {
    let file = match fs::File::open("/proc/self/exe") {
        Ok(f) => f,
        Err(e) => return Out::err(&e).detail("open"),
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file) as c_long;
    // SAFETY: `fd` is open for the duration of the call; params is a NUL-terminated literal.
    let r = unsafe { syscall(SYS_finit_module, fd, c"".as_ptr(), 0usize) };
    Out::ret(r)
}

fn clock_settime() -> Out {
    // SAFETY: timespec is plain old data, for which all-zero bytes are valid.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid out pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } != 0 {
        return Out::ret(-1).detail("clock_gettime");
    }
    // SAFETY: `ts` is a valid timespec (the current time, so success changes nothing).
    let r = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    Out::ret(r.into())
}

fn process_vm_readv(pid: libc::pid_t) -> Out {
    let mut buf = [0u8; 8];
    let (iov_base, iov_len) = (buf.as_mut_ptr().cast(), buf.len());
    let local = libc::iovec { iov_base, iov_len };
    let iov_base = ptr::without_provenance_mut(0x40_0000);
    let remote = libc::iovec { iov_base, iov_len };
    let (pid, one) = (c_long::from(pid), 1usize);
    // SAFETY: `local` points at our live 8-byte buffer; `remote` is only read by the kernel in
    // the other process, with faults reported as errors.
    let r = unsafe { syscall(SYS_process_vm_readv, pid, &local, one, &remote, one, 0usize) };
    Out::ret(r).detail_if(|| format!("bytes={r}").into(), Value::Null)
}

fn caps() -> Out {
    let status = match fs::read_to_string("/proc/self/status") {
        Ok(s) => s,
        Err(e) => return Out::err(&e),
    };
    let mut any = false;
    let mut parts = Vec::new();
    for key in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .map_or("?", str::trim);
        any |= u64::from_str_radix(v, 16) != Ok(0); // unparsable counts as non-zero
        parts.push(format!("{key}={v}"));
    }
    Out::new(any, None).detail(parts.join(","))
}

fn procs() -> Out {
    let entries = match fs::read_dir("/proc") {
        Ok(d) => d,
        Err(e) => return Out::err(&e),
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let me = std::process::id();
    let mut foreign = false;
    let mut parts = Vec::new();
    for pid in pids {
        match fs::read(format!("/proc/{pid}/cmdline")) {
            Ok(cmd) => {
                let argv0 = cmd.split(|&b| b == 0).next().unwrap_or_default();
                foreign |= pid != me && !cmd.windows(12).any(|w| w == b"escape-probe");
                parts.push(format!("{pid}:{}", String::from_utf8_lossy(argv0)));
            }
            // Gone in the meantime: not there any more. Anything else: visible but unreadable.
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOENT | libc::ESRCH) => {}
                errno => {
                    foreign |= pid != me;
                    let name = errno.map(errno_name).unwrap_or_default();
                    parts.push(format!("{pid}:?{name}"));
                }
            },
        }
    }
    Out::new(foreign, None).detail(parts.join(";"))
}

fn cgroup_write() -> Out {
    const PATHS: [&str; 4] = [
        "/sys/fs/cgroup/cgroup.procs",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/pids/pids.max",
        "/proc/self/cgroup",
    ];
    let mut first = None;
    let mut any = false;
    let mut parts = Vec::new();
    for path in PATHS {
        // Open only: nothing is ever written.
        let opened = fs::OpenOptions::new().write(true).open(path);
        let errno = opened.err().map(|e| e.raw_os_error().unwrap_or(-1));
        any |= errno.is_none();
        first.get_or_insert(errno);
        let name = errno.map_or("OK".to_string(), errno_name);
        parts.push(format!("{path}={name}"));
    }
    Out::new(any, first.flatten()).detail(parts.join(","))
}

fn status() -> Out {
    let st = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        st.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .map(str::trim)
    };
    let collapse = |p: &str| {
        fs::read_to_string(p)
            .ok()
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    // SAFETY: utsname is plain old data, for which all-zero bytes are valid.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid out pointer.
    let hostname = (unsafe { libc::uname(&mut uts) } == 0).then(|| {
        let node = uts.nodename.iter().take_while(|&&c| c != 0);
        let bytes: Vec<u8> = node.map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let cgroup = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| s.lines().next().map(String::from));
    let netdev = fs::read_to_string("/proc/net/dev").unwrap_or_default();
    let ifaces: Vec<&str> = netdev
        .lines()
        .skip(2)
        .filter_map(|l| Some(l.split(':').next()?.trim()))
        .collect();
    let mut env: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    env.sort();
    // List fds, then keep those still open once the directory handle itself is closed.
    let listed: Vec<c_int> = fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // SAFETY: F_GETFD only queries the descriptor-table entry.
    let mut fds: Vec<c_int> = listed
        .into_iter()
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1)
        .collect();
    fds.sort_unstable();
    // SAFETY: these id getters have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // SAFETY: as above.
    let (euid, ppid) = unsafe { (libc::geteuid(), libc::getppid()) };
    Out::success().detail(json!({
        "uid": uid, "gid": gid, "euid": euid, "pid": std::process::id(), "ppid": ppid,
        "hostname": hostname, "no_new_privs": field("NoNewPrivs"), "seccomp": field("Seccomp"),
        "uid_map": collapse("/proc/self/uid_map"), "gid_map": collapse("/proc/self/gid_map"),
        "cgroup": cgroup, "interfaces": ifaces, "env": env, "fd_count": fds.len(), "fds": fds,
    }))
}
