//! The egress proxy behind `network.access_mode = "Restricted"`.
//!
//! The sandbox keeps its own network namespace with nothing in it but loopback. Before the
//! program starts, a short-lived supervisor thread joins that namespace (`setns`), binds
//! `127.0.0.1:3128` there and leaves; the socket stays in the namespace it was created in, so
//! the supervisor serves it from its own namespace and the listener is the sandbox's only way
//! out. Each connection is one proxy request:
//! - `CONNECT host:port` for HTTPS (the TLS session is tunnelled untouched; its ClientHello must
//!   be TLS and name the same host when it names one) and for raw TCP destinations;
//! - an absolute-form `GET http://host[:port]/path` for plain HTTP.
//!
//! The proxy checks host, port and protocol against `allowed_destinations`, resolves names
//! itself (the sandbox has no DNS), refuses names that resolve into loopback or private ranges
//! unless the operator mapped them in `[sandbox.hosts]`, caps each direction at
//! `max_bandwidth_mbps` across the sandbox's connections, and logs every decision as a
//! structured event (target `corral::egress`).
//!
//! Files: `http.rs` parses request heads and frames forwarded bodies, `tls.rs` reads a tunnel's
//! ClientHello, `policy.rs` decides what may go out and where a name points, `bandwidth.rs` is
//! the shared token bucket, `relay.rs` connects and copies; this file runs the listener, handles
//! each connection and logs.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::profile::schema::{Destination, Protocol};

mod bandwidth;
mod http;
mod policy;
mod relay;
mod tls;

use bandwidth::*;
use http::*;
use policy::*;
pub use policy::{is_public, Policy};
use relay::*;
use tls::*;

/// The proxy's port on the sandbox's loopback.
pub const PROXY_PORT: u16 = 3128;

/// What `HTTP_PROXY`/`HTTPS_PROXY` say inside the sandbox.
pub const PROXY_URL: &str = "http://127.0.0.1:3128";

const HEAD_LIMIT: usize = 16 * 1024;

const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const MAX_CONNECTIONS: usize = 256;

const CHUNK: usize = 16 * 1024;

/// Counters for one proxy's life, for the caller's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressStats {
    pub allowed: u64,
    pub refused: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

struct Shared {
    policy: Policy,
    sandbox_pid: i32,
    up: Option<Bucket>,
    down: Option<Bucket>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Open connections (client side, and upstream once connected), shut down on stop.
    open: Mutex<HashMap<u64, Vec<Arc<TcpStream>>>>,
    /// Connection threads, joined on stop so their last log events are written.
    threads: Mutex<Vec<JoinHandle<()>>>,
    allowed: AtomicU64,
    refused: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// Refusals logged one by one; past this, one in every `REFUSAL_LOG_EVERY` (the totals at the
/// end count them all), so a sandbox cannot flood the supervisor's log.
const REFUSALS_LOGGED: u64 = 100;

const REFUSAL_LOG_EVERY: u64 = 1000;

/// The same for allowed connections (and their close events), with a larger allowance.
const CONNECTIONS_LOGGED: u64 = 1000;

const CONNECTIONS_LOG_EVERY: u64 = 100;

/// A running proxy. Dropping it stops the listener and cuts every open connection.
pub struct Proxy {
    shared: Arc<Shared>,
    listener_fd: i32,
    accept: Option<JoinHandle<()>>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("profile", &self.shared.policy.profile)
            .field("sandbox_pid", &self.shared.sandbox_pid)
            .finish()
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Brings `lo` up in the calling thread's network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket used only for the two interface ioctls below, then closed.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    let r = unsafe {
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req as *mut IfReq) != 0 {
            -1
        } else {
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16;
            libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req as *mut IfReq)
        }
    };
    let err = io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(s) };
    if r != 0 {
        return Err(err);
    }
    Ok(())
}

impl Proxy {
    /// Opens the listener inside the network namespace of `pid` (which must not run the
    /// program yet) and starts serving it.
    pub fn start(pid: i32, policy: Policy) -> io::Result<Proxy> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        let listener = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<TcpListener> {
                // SAFETY: setns changes only this thread's network namespace; the thread ends
                // right after creating the socket, which stays in the namespace it was made in.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                loopback_up()?;
                TcpListener::bind((Ipv4Addr::LOCALHOST, PROXY_PORT))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("egress listener thread panicked")))
        })?;
        let shared = Arc::new(Shared {
            up: policy.bytes_per_sec.map(Bucket::new),
            down: policy.bytes_per_sec.map(Bucket::new),
            policy,
            sandbox_pid: pid,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            allowed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        });
        let listener_fd = listener.as_raw_fd();
        let sh = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("corral-egress".into())
            .spawn(move || accept_loop(listener, sh))?;
        Ok(Proxy {
            shared,
            listener_fd,
            accept: Some(accept),
        })
    }

    pub fn stats(&self) -> EgressStats {
        let s = &self.shared;
        EgressStats {
            allowed: s.allowed.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            bytes_up: s.bytes_up.load(Ordering::Relaxed),
            bytes_down: s.bytes_down.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, cuts every open connection and waits for their threads (which log how
    /// each connection ended).
    pub fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown on the listening socket the accept thread still owns: it wakes the
        // blocked accept (EINVAL), after which the thread drops the socket.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        let _ = accept.join();
        for s in lock(&self.shared.open).values().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Relays end at once (their sockets are shut, bandwidth waits check the flag); a thread
        // still inside a name lookup or a connect attempt is left to finish on its own after
        // a second rather than holding up the end of the sandbox.
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        let deadline = Instant::now() + Duration::from_secs(1);
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    let mut last_warning: Option<Instant> = None;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                if sh.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
                let conn = Arc::new(conn);
                let too_many = {
                    let mut open = lock(&sh.open);
                    if open.len() >= MAX_CONNECTIONS {
                        true
                    } else {
                        open.insert(id, vec![Arc::clone(&conn)]);
                        false
                    }
                };
                if too_many {
                    let r = refuse(503, "too many open connections");
                    log_refusal(&sh, id, None, &r);
                    let _ = respond(&conn, r.status, &r.reason);
                    continue;
                }
                let sh2 = Arc::clone(&sh);
                let spawned = std::thread::Builder::new()
                    .name("corral-egress-conn".into())
                    .spawn(move || {
                        handle(&conn, id, &sh2);
                        lock(&sh2.open).remove(&id);
                    });
                match spawned {
                    Ok(t) => {
                        let mut threads = lock(&sh.threads);
                        threads.retain(|t| !t.is_finished());
                        threads.push(t);
                    }
                    Err(_) => {
                        lock(&sh.open).remove(&id);
                    }
                }
            }
            Err(e) => {
                if sh.stopping.load(Ordering::SeqCst) {
                    return;
                }
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::ECONNABORTED) => {}
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS) => {
                        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::warn!(target: "corral::egress", error = %e, "egress proxy cannot accept; retrying");
                            last_warning = Some(Instant::now());
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    _ => {
                        tracing::error!(target: "corral::egress", error = %e, "egress proxy stopped accepting");
                        return;
                    }
                }
            }
        }
    }
}

/// Text from the sandbox, made safe for a log line or a response: printable ASCII only
/// (anything else escaped), at most 120 characters.
fn clean(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() >= 120 {
            out.push_str("...");
            break;
        }
        if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

fn log_refusal(sh: &Shared, id: u64, req: Option<&Request>, r: &Refusal) {
    let n = sh.refused.fetch_add(1, Ordering::Relaxed) + 1;
    if n > REFUSALS_LOGGED && !n.is_multiple_of(REFUSAL_LOG_EVERY) {
        return;
    }
    tracing::warn!(
        target: "corral::egress",
        profile = %sh.policy.profile,
        sandbox_pid = sh.sandbox_pid,
        conn = id,
        method = req.map_or("", |q| q.method.as_str()),
        host = req.map_or("", |q| q.host.as_str()),
        port = req.map_or(0, |q| q.port),
        decision = "refused",
        status = r.status,
        reason = %r.reason,
        refused_so_far = n,
        "egress connection refused{}",
        if n == REFUSALS_LOGGED {
            " (further refusals: one logged in 1000, all counted)"
        } else {
            ""
        }
    );
}

fn handle(conn: &TcpStream, id: u64, sh: &Shared) {
    let started = Instant::now();
    let policy = &sh.policy;
    let (head, rest) = match read_head(conn) {
        Ok(x) => x,
        Err(r) => {
            log_refusal(sh, id, None, &r);
            let _ = respond(conn, r.status, &r.reason);
            return;
        }
    };
    let req = match parse_request(&head) {
        Ok(r) => r,
        Err(r) => {
            log_refusal(sh, id, None, &r);
            let _ = respond(conn, r.status, &r.reason);
            return;
        }
    };
    let refused = |r: Refusal| {
        log_refusal(sh, id, Some(&req), &r);
        let _ = respond(conn, r.status, &r.reason);
    };
    let (protocol, addrs) = match policy
        .allow(&req.host, req.port, req.kind)
        .and_then(|d| Ok((d.protocol, policy.resolve(&req.host, req.port)?)))
    {
        Ok(x) => x,
        Err(r) => return refused(r),
    };
    let _ = conn.set_nodelay(true);
    // What goes upstream first: the client's checked ClientHello, its first bytes, or the
    // rewritten request head (then the body, bounded by its framing). An HTTPS tunnel is
    // checked before the destination is contacted.
    let mut framing = None;
    let mut body = Vec::new();
    let first: Vec<u8> = match req.kind {
        Kind::Connect => {
            if (&*conn)
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .is_err()
            {
                log_refusal(
                    sh,
                    id,
                    Some(&req),
                    &refuse(499, "client closed before the tunnel opened"),
                );
                return;
            }
            if protocol == Some(Protocol::Https) {
                match read_client_hello(conn, rest) {
                    Ok((hello, sni)) => {
                        if let Some(name) = sni.filter(|n| !same_host(n, &req.host)) {
                            let r = refuse(
                                403,
                                format!(
                                    "TLS server name {} does not match the CONNECT host {}",
                                    clean(&name),
                                    req.host
                                ),
                            );
                            log_refusal(sh, id, Some(&req), &r);
                            return;
                        }
                        hello
                    }
                    Err(reason) => {
                        log_refusal(sh, id, Some(&req), &refuse(403, reason));
                        return;
                    }
                }
            } else {
                rest
            }
        }
        Kind::Http => {
            let mut h = format!("{} {} {}\r\n", req.method, req.path, req.version);
            let authority = if req.port == 80 {
                bracket(&req.host)
            } else {
                format!("{}:{}", bracket(&req.host), req.port)
            };
            h.push_str(&format!("Host: {authority}\r\n"));
            for (k, v) in &req.headers {
                let lk = k.to_ascii_lowercase();
                if lk == "host"
                    || lk == "connection"
                    || lk == "keep-alive"
                    || lk.starts_with("proxy-")
                {
                    continue;
                }
                h.push_str(&format!("{k}: {v}\r\n"));
            }
            h.push_str("Connection: close\r\n\r\n");
            match Framing::of(&req.headers) {
                Ok(f) => framing = Some(f),
                Err(r) => return refused(r),
            }
            body = rest;
            h.into_bytes()
        }
    };
    let (upstream, addr) = match connect_any(&addrs, &sh.stopping) {
        Ok(x) => x,
        Err(r) => {
            log_refusal(sh, id, Some(&req), &r);
            if req.kind == Kind::Http {
                let _ = respond(conn, r.status, &r.reason);
            }
            return;
        }
    };
    let _ = conn.set_read_timeout(None);
    let _ = upstream.set_nodelay(true);
    let upstream = Arc::new(upstream);
    if let Some(v) = lock(&sh.open).get_mut(&id) {
        v.push(Arc::clone(&upstream));
    }
    if sh.stopping.load(Ordering::SeqCst) {
        return;
    }
    // Like refusals, a flood of connections cannot flood the log: the first ones are logged
    // one by one, then one in `CONNECTIONS_LOG_EVERY`; the totals count them all.
    let n = sh.allowed.fetch_add(1, Ordering::Relaxed) + 1;
    let logged = n <= CONNECTIONS_LOGGED || n.is_multiple_of(CONNECTIONS_LOG_EVERY);
    if logged {
        tracing::info!(
        target: "corral::egress",
        profile = %policy.profile,
        sandbox_pid = sh.sandbox_pid,
        conn = id,
        method = %req.method,
        host = %req.host,
        port = req.port,
        protocol = protocol_name(protocol),
        upstream = %addr,
        decision = "allowed",
        allowed_so_far = n,
        "egress connection allowed{}",
        if n == CONNECTIONS_LOGGED {
            " (further connections: one logged in 100, all counted)"
        } else {
            ""
        }
        );
    }
    let (up_bytes, down_bytes) = relay(conn, &upstream, first, body, framing, sh);
    if logged {
        tracing::info!(
            target: "corral::egress",
            profile = %policy.profile,
            sandbox_pid = sh.sandbox_pid,
            conn = id,
            host = %req.host,
            port = req.port,
            bytes_up = up_bytes,
            bytes_down = down_bytes,
            duration_ms = started.elapsed().as_millis() as u64,
            "egress connection closed"
        );
    }
}

#[cfg(test)]
mod tests;
