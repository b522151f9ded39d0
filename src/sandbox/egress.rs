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

/// The proxy's port on the sandbox's loopback.
pub const PROXY_PORT: u16 = 3128;
/// What `HTTP_PROXY`/`HTTPS_PROXY` say inside the sandbox.
pub const PROXY_URL: &str = "http://127.0.0.1:3128";

const HEAD_LIMIT: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 256;
const CHUNK: usize = 16 * 1024;

/// What the proxy lets through, from the profile and the host configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub profile: String,
    pub destinations: Vec<Destination>,
    /// Bytes per second in each direction, shared by all of the sandbox's connections.
    pub bytes_per_sec: Option<u64>,
    /// Names the operator mapped to addresses (`[sandbox.hosts]`): used instead of DNS, and
    /// exempt from the public-address check.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
}

/// How a connection asked to go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `CONNECT host:port`: a tunnel (HTTPS or raw TCP).
    Connect,
    /// An absolute-form plain HTTP request.
    Http,
}

/// Why a request was refused: the HTTP status sent back and the reason logged and shown.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    status: u16,
    reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// A parsed proxy request head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    kind: Kind,
    method: String,
    host: String,
    port: u16,
    /// Origin-form target for plain HTTP (`/path?query`).
    path: String,
    version: String,
    headers: Vec<(String, String)>,
}

/// Lower-case, no trailing dot; IPv6 literals without brackets.
fn normalize_host(h: &str) -> String {
    let h = h.trim().trim_end_matches('.');
    let h = h
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(h);
    h.to_ascii_lowercase()
}

fn same_host(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        (Err(_), Err(_)) => a == b,
        _ => false,
    }
}

/// `host[:port]` or `[v6][:port]`.
fn parse_authority(auth: &str, default_port: Option<u16>) -> Result<(String, u16), Refusal> {
    let bad = || refuse(400, format!("'{auth}' is not host:port"));
    if auth.contains('@') {
        return Err(refuse(400, "credentials in the request target are refused"));
    }
    let (host, port) = if let Some(rest) = auth.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        h.parse::<Ipv6Addr>().map_err(|_| bad())?;
        (h, after.strip_prefix(':'))
    } else {
        match auth.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        None => default_port.ok_or_else(bad)?,
    };
    let host = normalize_host(host);
    let valid = !host.is_empty()
        && host.len() <= 253
        && (host.parse::<IpAddr>().is_ok()
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'));
    if !valid {
        return Err(bad());
    }
    Ok((host, port))
}

fn parse_request(head: &[u8]) -> Result<Request, Refusal> {
    let text = std::str::from_utf8(head).map_err(|_| refuse(400, "request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(refuse(
            400,
            format!("unsupported protocol version '{version}'"),
        ));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(refuse(400, format!("malformed method '{method}'")));
    }
    let mut headers = Vec::new();
    for l in lines {
        if l.is_empty() {
            break;
        }
        if l.starts_with([' ', '\t']) {
            return Err(refuse(400, "folded header lines are refused"));
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| refuse(400, "malformed header line"))?;
        if k.is_empty() || k.contains([' ', '\t']) {
            return Err(refuse(400, "malformed header name"));
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    if method == "CONNECT" {
        let (host, port) = parse_authority(target, None)?;
        return Ok(Request {
            kind: Kind::Connect,
            method: method.into(),
            host,
            port,
            path: String::new(),
            version: version.into(),
            headers,
        });
    }
    let lower = target.get(..8).map(str::to_ascii_lowercase);
    if lower.as_deref() == Some("https://") {
        return Err(refuse(
            400,
            "https:// URLs go through CONNECT (set HTTPS_PROXY)",
        ));
    }
    let rest = match target.get(..7).map(str::to_ascii_lowercase).as_deref() {
        Some("http://") => &target[7..],
        _ => {
            return Err(refuse(
                400,
                "not a proxy request: use an absolute http:// URL or CONNECT",
            ))
        }
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(end);
    let (host, port) = parse_authority(auth, Some(80))?;
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.split('#').next().unwrap_or("/").to_string()
    };
    Ok(Request {
        kind: Kind::Http,
        method: method.into(),
        host,
        port,
        path,
        version: version.into(),
        headers,
    })
}

fn protocol_name(p: Option<Protocol>) -> &'static str {
    match p {
        None => "any",
        Some(Protocol::Tcp) => "TCP",
        Some(Protocol::Udp) => "UDP",
        Some(Protocol::Http) => "HTTP",
        Some(Protocol::Https) => "HTTPS",
    }
}

impl Policy {
    /// The destination entry that allows `host:port` by `kind`, or why none does.
    fn allow(&self, host: &str, port: u16, kind: Kind) -> Result<&Destination, Refusal> {
        let named: Vec<&Destination> = self
            .destinations
            .iter()
            .filter(|d| same_host(&normalize_host(&d.host), host))
            .collect();
        if named.is_empty() {
            return Err(refuse(
                403,
                format!("{host} is not in network.allowed_destinations"),
            ));
        }
        let port_ok = |d: &Destination| match (d.port, d.protocol) {
            (Some(p), _) => p == port,
            (None, Some(Protocol::Https)) => port == 443,
            (None, Some(Protocol::Http)) => port == 80,
            (None, None) => port == 80 || port == 443,
            (None, _) => false,
        };
        let kind_ok = |d: &Destination| match d.protocol {
            None => true,
            Some(Protocol::Https | Protocol::Tcp) => kind == Kind::Connect,
            Some(Protocol::Http) => kind == Kind::Http,
            Some(Protocol::Udp) => false,
        };
        let with_port: Vec<&&Destination> = named.iter().filter(|d| port_ok(d)).collect();
        if with_port.is_empty() {
            return Err(refuse(
                403,
                format!("port {port} is not allowed for {host}"),
            ));
        }
        with_port
            .iter()
            .find(|d| kind_ok(d))
            .map(|d| **d)
            .ok_or_else(|| {
                let d = with_port[0];
                refuse(
                    403,
                    format!(
                        "{host}:{port} is allowed for {} only, not {}",
                        protocol_name(d.protocol),
                        match kind {
                            Kind::Connect => "CONNECT tunnels",
                            Kind::Http => "plain HTTP",
                        }
                    ),
                )
            })
    }

    /// Addresses to try for an allowed host. IP literals are used as given (they were listed
    /// literally); mapped names use their mapping; other names go to the system resolver and
    /// must resolve to public addresses.
    fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(ips) = self.hosts.get(host) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        let found: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map_err(|e| refuse(502, format!("cannot resolve {host}: {e}")))?
            .collect();
        let public: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|a| is_public(a.ip()))
            .collect();
        if public.is_empty() {
            return Err(refuse(
                403,
                format!(
                    "{host} resolves only to non-public addresses ({}); map it in [sandbox.hosts] to allow that",
                    found
                        .iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(public)
    }
}

/// Not loopback, private, link-local, shared, multicast, documentation or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || (a == 198 && (b == 18 || b == 19)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b))
        }
    }
}

/// A shared token bucket with debt: a writer takes what it needs and sleeps off any deficit,
/// so concurrent connections share the rate.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(bytes_per_sec: u64) -> Bucket {
        let rate = bytes_per_sec as f64;
        // A tenth of a second of burst, at least one chunk.
        let burst = (rate / 10.0).max(CHUNK as f64);
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let (tokens, last) = *s;
            let tokens = (tokens + (now - last).as_secs_f64() * self.rate).min(self.burst);
            let left = tokens - n as f64;
            *s = (left, now);
            if left < 0.0 {
                Duration::from_secs_f64(-left / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

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
    open: Mutex<HashMap<u64, Vec<TcpStream>>>,
    allowed: AtomicU64,
    refused: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

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

    /// Stops accepting and cuts every open connection.
    pub fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown on the listening socket the accept thread still owns: it wakes the
        // blocked accept (EINVAL), after which the thread drops the socket.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        let _ = accept.join();
        let open = std::mem::take(&mut *lock(&self.shared.open));
        for s in open.values().flatten() {
            let _ = s.shutdown(Shutdown::Both);
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
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                if sh.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
                let too_many = {
                    let mut open = lock(&sh.open);
                    if open.len() >= MAX_CONNECTIONS {
                        true
                    } else {
                        if let Ok(c) = conn.try_clone() {
                            open.insert(id, vec![c]);
                        }
                        false
                    }
                };
                if too_many {
                    let mut conn = conn;
                    sh.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "corral::egress", profile = %sh.policy.profile, sandbox_pid = sh.sandbox_pid, conn = id, decision = "refused", reason = "too many open connections", "egress connection refused");
                    let _ = respond(&mut conn, 503, "too many open connections");
                    continue;
                }
                let sh2 = Arc::clone(&sh);
                let spawned = std::thread::Builder::new()
                    .name("corral-egress-conn".into())
                    .spawn(move || {
                        handle(conn, id, &sh2);
                        lock(&sh2.open).remove(&id);
                    });
                if spawned.is_err() {
                    lock(&sh.open).remove(&id);
                }
            }
            Err(e) => {
                if sh.stopping.load(Ordering::SeqCst) {
                    return;
                }
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::ECONNABORTED) => {}
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS) => {
                        tracing::warn!(target: "corral::egress", error = %e, "egress proxy cannot accept; retrying");
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

fn respond(conn: &mut TcpStream, status: u16, reason: &str) -> io::Result<()> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!("corral egress proxy: {reason}\n");
    write!(
        conn,
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Reads up to the end of the request head; returns (head, bytes after it).
fn read_head(conn: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), Refusal> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > HEAD_LIMIT {
            return Err(refuse(431, "request head larger than 16 KiB"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(refuse(408, "request head not received within 10 s"));
        }
        let _ = conn.set_read_timeout(Some(left));
        match conn.read(&mut chunk) {
            Ok(0) => return Err(refuse(400, "connection closed before a full request head")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(refuse(408, "request head not received within 10 s"))
            }
            Err(e) => return Err(refuse(400, format!("reading the request: {e}"))),
        }
    }
}

fn connect_any(addrs: &[SocketAddr]) -> Result<(TcpStream, SocketAddr), Refusal> {
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok((s, *a)),
            Err(e) => last = Some(format!("{a}: {e}")),
        }
    }
    Err(refuse(
        502,
        format!(
            "cannot connect: {}",
            last.unwrap_or_else(|| "no address".into())
        ),
    ))
}

/// Reads the client's first TLS record (a ClientHello) and returns it with the server name it
/// asks for, or why it is not TLS.
fn read_client_hello(
    conn: &mut TcpStream,
    mut have: Vec<u8>,
) -> Result<(Vec<u8>, Option<String>), String> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut chunk = [0u8; 4096];
    loop {
        if have.len() >= 5 {
            if have[0] != 0x16 || have[1] != 0x03 {
                return Err(
                    "the tunnel to an HTTPS destination does not start a TLS handshake".into(),
                );
            }
            let len = usize::from(u16::from_be_bytes([have[3], have[4]]));
            if have.len() >= 5 + len {
                let sni = server_name(&have[5..5 + len]);
                return Ok((have, sni));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no TLS ClientHello within 10 s".into());
        }
        let _ = conn.set_read_timeout(Some(left));
        match conn.read(&mut chunk) {
            Ok(0) => return Err("closed before a TLS ClientHello".into()),
            Ok(n) => have.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the TLS ClientHello: {e}")),
        }
    }
}

/// The `server_name` of a ClientHello handshake fragment, if it carries one (and the part of
/// the message in this record is enough to find it).
fn server_name(msg: &[u8]) -> Option<String> {
    struct Cur<'a>(&'a [u8]);
    impl<'a> Cur<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
    }
    let mut c = Cur(msg);
    if c.u8()? != 1 {
        return None; // not a ClientHello
    }
    c.take(3)?; // length
    c.take(2 + 32)?; // version, random
    let n = c.u8()?;
    c.take(n)?; // session id
    let n = c.u16()?;
    c.take(n)?; // cipher suites
    let n = c.u8()?;
    c.take(n)?; // compression methods
    let n = c.u16()?;
    let mut ext = Cur(c.take(n).unwrap_or(c.0));
    while let (Some(kind), Some(len)) = (ext.u16(), ext.u16()) {
        let data = ext.take(len)?;
        if kind == 0 {
            let mut d = Cur(data);
            d.u16()?; // list length
            while let Some(name_type) = d.u8() {
                let n = d.u16()?;
                let name = d.take(n)?;
                if name_type == 0 {
                    return std::str::from_utf8(name).ok().map(normalize_host);
                }
            }
            return None;
        }
    }
    None
}

fn handle(mut conn: TcpStream, id: u64, sh: &Shared) {
    let started = Instant::now();
    let policy = &sh.policy;
    let log_refusal = |req: Option<&Request>, r: &Refusal| {
        sh.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            target: "corral::egress",
            profile = %policy.profile,
            sandbox_pid = sh.sandbox_pid,
            conn = id,
            method = req.map_or("", |q| q.method.as_str()),
            host = req.map_or("", |q| q.host.as_str()),
            port = req.map_or(0, |q| q.port),
            decision = "refused",
            status = r.status,
            reason = %r.reason,
            "egress connection refused"
        );
    };
    let (head, rest) = match read_head(&mut conn) {
        Ok(x) => x,
        Err(r) => {
            log_refusal(None, &r);
            let _ = respond(&mut conn, r.status, &r.reason);
            return;
        }
    };
    let req = match parse_request(&head) {
        Ok(r) => r,
        Err(r) => {
            log_refusal(None, &r);
            let _ = respond(&mut conn, r.status, &r.reason);
            return;
        }
    };
    let decided = policy
        .allow(&req.host, req.port, req.kind)
        .and_then(|d| Ok((d.protocol, policy.resolve(&req.host, req.port)?)))
        .and_then(|(p, addrs)| Ok((p, connect_any(&addrs)?)));
    let (protocol, (upstream, addr)) = match decided {
        Ok(x) => x,
        Err(r) => {
            log_refusal(Some(&req), &r);
            let _ = respond(&mut conn, r.status, &r.reason);
            return;
        }
    };
    let _ = conn.set_read_timeout(None);
    let _ = conn.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Ok(u) = upstream.try_clone() {
        if let Some(v) = lock(&sh.open).get_mut(&id) {
            v.push(u);
        }
    }
    if sh.stopping.load(Ordering::SeqCst) {
        return;
    }
    // What goes upstream first: the rewritten request head, or the client's ClientHello.
    let first: Vec<u8> = match req.kind {
        Kind::Connect => {
            if conn
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .is_err()
            {
                return;
            }
            if protocol == Some(Protocol::Https) {
                match read_client_hello(&mut conn, rest) {
                    Ok((hello, sni)) => {
                        if let Some(name) = sni.filter(|n| !same_host(n, &req.host)) {
                            let r = refuse(
                                403,
                                format!(
                                    "TLS server name {name} does not match the CONNECT host {}",
                                    req.host
                                ),
                            );
                            log_refusal(Some(&req), &r);
                            return;
                        }
                        let _ = conn.set_read_timeout(None);
                        hello
                    }
                    Err(reason) => {
                        log_refusal(Some(&req), &refuse(403, reason));
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
            let mut b = h.into_bytes();
            b.extend_from_slice(&rest);
            b
        }
    };
    sh.allowed.fetch_add(1, Ordering::Relaxed);
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
        "egress connection allowed"
    );
    let (up_bytes, down_bytes) = relay(conn, upstream, first, sh);
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

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Copies both ways until both sides are done; returns (bytes up, bytes down).
fn relay(client: TcpStream, upstream: TcpStream, first: Vec<u8>, sh: &Shared) -> (u64, u64) {
    let copy = |mut from: TcpStream,
                mut to: TcpStream,
                first: Vec<u8>,
                bucket: Option<&Bucket>,
                total: &AtomicU64|
     -> u64 {
        let mut n_total = 0u64;
        let mut send = |to: &mut TcpStream, data: &[u8]| -> bool {
            for part in data.chunks(CHUNK) {
                if let Some(b) = bucket {
                    b.take(part.len());
                }
                if to.write_all(part).is_err() {
                    return false;
                }
                n_total += part.len() as u64;
                total.fetch_add(part.len() as u64, Ordering::Relaxed);
            }
            true
        };
        let mut ok = send(&mut to, &first);
        let mut buf = vec![0u8; CHUNK];
        while ok {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => ok = send(&mut to, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        if !ok {
            let _ = from.shutdown(Shutdown::Read);
        }
        n_total
    };
    let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
        return (0, 0);
    };
    std::thread::scope(|s| {
        let up = s.spawn(|| copy(client, upstream, first, sh.up.as_ref(), &sh.bytes_up));
        let down = copy(
            upstream2,
            client2,
            Vec::new(),
            sh.down.as_ref(),
            &sh.bytes_down,
        );
        (up.join().unwrap_or(0), down)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(host: &str, port: Option<u16>, protocol: Option<Protocol>) -> Destination {
        Destination {
            host: host.into(),
            port,
            protocol,
        }
    }

    fn policy() -> Policy {
        Policy {
            profile: "t".into(),
            destinations: vec![
                dest("api.example.com", Some(443), Some(Protocol::Https)),
                dest("plain.example.com", None, Some(Protocol::Http)),
                dest("db.example.com", Some(5432), Some(Protocol::Tcp)),
                dest("any.example.com", None, None),
                dest("203.0.113.7", Some(8443), None),
            ],
            bytes_per_sec: None,
            hosts: BTreeMap::new(),
        }
    }

    #[test]
    fn requests_parse_into_host_port_and_kind() {
        let r = parse_request(b"CONNECT API.Example.com.:443 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(
            (r.kind, r.host.as_str(), r.port),
            (Kind::Connect, "api.example.com", 443)
        );
        let r = parse_request(b"GET http://plain.example.com/a?b=1 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(
            (r.kind, r.host.as_str(), r.port, r.path.as_str()),
            (Kind::Http, "plain.example.com", 80, "/a?b=1")
        );
        let r = parse_request(b"POST http://[::1]:8080 HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.path.as_str()),
            ("::1", 8080, "/")
        );
        for bad in [
            &b"GET /local HTTP/1.1\r\n\r\n"[..],
            b"GET https://api.example.com/ HTTP/1.1\r\n\r\n",
            b"CONNECT api.example.com HTTP/1.1\r\n\r\n",
            b"CONNECT user@api.example.com:443 HTTP/1.1\r\n\r\n",
            b"CONNECT api.example.com:0 HTTP/1.1\r\n\r\n",
            b"CONNECT a b:443 HTTP/1.1\r\n\r\n",
            b"GET http://x/ HTTP/2\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n folded\r\n\r\n",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn allow_list_checks_host_port_and_protocol() {
        let p = policy();
        assert!(p.allow("api.example.com", 443, Kind::Connect).is_ok());
        assert!(
            p.allow("api.example.com", 443, Kind::Http).is_err(),
            "HTTPS is CONNECT only"
        );
        assert!(p.allow("api.example.com", 8443, Kind::Connect).is_err());
        assert!(p.allow("evil.example.com", 443, Kind::Connect).is_err());
        assert!(p.allow("plain.example.com", 80, Kind::Http).is_ok());
        assert!(p.allow("plain.example.com", 80, Kind::Connect).is_err());
        assert!(p.allow("db.example.com", 5432, Kind::Connect).is_ok());
        assert!(p.allow("any.example.com", 443, Kind::Connect).is_ok());
        assert!(p.allow("any.example.com", 80, Kind::Http).is_ok());
        assert!(p.allow("any.example.com", 22, Kind::Connect).is_err());
        assert!(p.allow("203.0.113.7", 8443, Kind::Connect).is_ok());
        assert!(p.allow("203.0.113.8", 8443, Kind::Connect).is_err());
        let msg = p
            .allow("api.example.com", 22, Kind::Connect)
            .unwrap_err()
            .reason;
        assert!(msg.contains("port 22"), "{msg}");
    }

    #[test]
    fn names_must_resolve_to_public_addresses_unless_mapped() {
        let mut p = policy();
        p.destinations.push(dest("localhost", Some(80), None));
        let err = p.resolve("localhost", 80).unwrap_err();
        assert!(err.reason.contains("non-public"), "{}", err.reason);
        p.hosts
            .insert("localhost".into(), vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        assert_eq!(
            p.resolve("localhost", 80).unwrap(),
            vec!["127.0.0.1:80".parse().unwrap()]
        );
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn server_name_is_read_from_a_client_hello() {
        // A minimal ClientHello with one SNI entry "api.example.com".
        let name = b"api.example.com";
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut exts = vec![0, 0];
        exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![1, 0];
        msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
        msg.extend_from_slice(&body);
        assert_eq!(server_name(&msg).as_deref(), Some("api.example.com"));
        assert_eq!(server_name(&msg[..msg.len() - 4]), None, "truncated");
        assert_eq!(server_name(b"\x02garbage"), None);
    }

    #[test]
    fn the_bucket_holds_the_rate_across_writers() {
        let b = Arc::new(Bucket::new(1_000_000));
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                let b = Arc::clone(&b);
                s.spawn(move || {
                    for _ in 0..25 {
                        b.take(CHUNK);
                    }
                });
            }
        });
        // 50 chunks = 819200 bytes at 1 MB/s, less the 100 KB burst: >= 0.7 s.
        let secs = t.elapsed().as_secs_f64();
        assert!((0.65..1.5).contains(&secs), "{secs}");
    }
}
