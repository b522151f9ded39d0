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
    let bad = || refuse(400, format!("'{}' is not host:port", clean(auth)));
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
    // Control characters (a bare CR or LF included) have no place in a request head: refusing
    // them keeps smuggled lines away from the upstream and from the logs.
    let mut prev = 0u8;
    for (i, &b) in head.iter().enumerate() {
        let ctl = (b < 0x20 && b != b'\t' && b != b'\r' && b != b'\n') || b == 0x7f;
        let bare_cr = b == b'\r' && head.get(i + 1) != Some(&b'\n');
        let bare_lf = b == b'\n' && prev != b'\r';
        if ctl || bare_cr || bare_lf {
            return Err(refuse(400, "control characters in the request head"));
        }
        prev = b;
    }
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
            format!("unsupported protocol version '{}'", clean(version)),
        ));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(refuse(400, format!("malformed method '{}'", clean(method))));
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
    let path = path.split('#').next().unwrap_or_default();
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
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

/// A global unicast address: not loopback, private, link-local, shared, multicast,
/// documentation, reserved, or a transition form that embeds one of those.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
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
                || (a == 192 && b == 0 && c == 0)
                || (a == 192 && b == 88 && c == 99)
                || (a == 198 && (b == 18 || b == 19)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // Only 2000::/3 is global unicast; within it, documentation (2001:db8::/32,
            // 3fff::/20), Teredo and other IETF protocol assignments (2001::/23) and 6to4
            // (2002::/16, which embeds an IPv4 address) are refused too.
            (s[0] & 0xe000) == 0x2000
                && !(s[0] == 0x2001 && s[1] == 0x0db8)
                && !(s[0] == 0x3fff && s[1] < 0x1000)
                && !(s[0] == 0x2001 && s[1] < 0x0200)
                && s[0] != 0x2002
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
        let rate = bytes_per_sec.max(1) as f64;
        // A tenth of a second of burst, at least one chunk.
        let burst = (rate / 10.0).max(CHUNK as f64);
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `n` bytes' worth, sleeping off any debt; returns false if `stop` was raised
    /// meanwhile (the sleep is cut into slices that check it).
    fn take(&self, n: usize, stop: &AtomicBool) -> bool {
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
        let until = Instant::now() + wait;
        loop {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
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

fn respond(mut conn: &TcpStream, status: u16, reason: &str) -> io::Result<()> {
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
fn read_head(mut conn: &TcpStream) -> Result<(Vec<u8>, Vec<u8>), Refusal> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let mut scanned = 0usize;
    loop {
        if let Some(end) = buf[scanned..].windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(scanned + end + 4);
            return Ok((buf, rest));
        }
        scanned = buf.len().saturating_sub(3);
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

/// Connects to the first address that answers, within `CONNECT_TIMEOUT` for all of them
/// together; gives up early when `stop` is raised (attempts are made in short slices).
fn connect_any(
    addrs: &[SocketAddr],
    stop: &AtomicBool,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut last = None;
    for a in addrs {
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(refuse(503, "the sandbox ended"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last = Some(format!("{a}: timed out"));
                break;
            }
            // A slice per attempt: an unanswered SYN is retried until the deadline.
            match TcpStream::connect_timeout(a, left.min(Duration::from_millis(250))) {
                Ok(s) => return Ok((s, *a)),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => continue,
                Err(e) => {
                    last = Some(format!("{a}: {e}"));
                    break;
                }
            }
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

/// Largest ClientHello accepted (post-quantum key shares make them a few KiB).
const HELLO_LIMIT: usize = 64 * 1024;

/// Reads the client's ClientHello, which may span several TLS records, and returns the bytes
/// read (to forward) with the server name it asks for. Anything that is not a well-formed
/// ClientHello is refused: an HTTPS destination carries TLS and nothing else.
fn read_client_hello(
    mut conn: &TcpStream,
    mut raw: Vec<u8>,
) -> Result<(Vec<u8>, Option<String>), String> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut chunk = [0u8; 4096];
    // Handshake bytes gathered from complete records, and where the next record starts.
    let mut msg: Vec<u8> = Vec::new();
    let mut at = 0usize;
    loop {
        while raw.len() >= at + 5 {
            let h = &raw[at..at + 5];
            if h[0] != 0x16 {
                return Err(
                    "the tunnel to an HTTPS destination does not start with a TLS handshake".into(),
                );
            }
            if h[1] != 0x03 || h[2] > 0x04 {
                return Err("not a TLS record version".into());
            }
            let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
            if len == 0 || len > 16 * 1024 {
                return Err(format!("a TLS record of {len} bytes"));
            }
            if raw.len() < at + 5 + len {
                break;
            }
            msg.extend_from_slice(&raw[at + 5..at + 5 + len]);
            at += 5 + len;
            if msg.len() >= 4 {
                if msg[0] != 1 {
                    return Err("the first TLS handshake message is not a ClientHello".into());
                }
                let body =
                    usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]);
                if body + 4 > HELLO_LIMIT {
                    return Err("ClientHello larger than 64 KiB".into());
                }
                if msg.len() >= body + 4 {
                    // Records after the hello's (0-RTT early data, a compatibility
                    // ChangeCipherSpec) are forwarded as they are; more handshake bytes in
                    // the hello's own records are not something a client sends.
                    if msg.len() != body + 4 {
                        return Err("handshake data after the ClientHello".into());
                    }
                    let sni = server_name(&msg[4..])?;
                    return Ok((raw, sni));
                }
            }
        }
        if raw.len() > HELLO_LIMIT + 1024 {
            return Err("ClientHello larger than 64 KiB".into());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no complete TLS ClientHello within 10 s".into());
        }
        let _ = conn.set_read_timeout(Some(left));
        match conn.read(&mut chunk) {
            Ok(0) => return Err("closed before a complete TLS ClientHello".into()),
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the TLS ClientHello: {e}")),
        }
    }
}

/// Parses a ClientHello body strictly: `Ok(None)` only when it is complete and carries no
/// `server_name` extension.
fn server_name(body: &[u8]) -> Result<Option<String>, String> {
    struct Cur<'a>(&'a [u8]);
    impl<'a> Cur<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("truncated ClientHello".into());
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Ok(a)
        }
        fn u8(&mut self) -> Result<usize, String> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Result<usize, String> {
            self.take(2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
    }
    let bad = |what: &str| Err(format!("malformed ClientHello: {what}"));
    let mut c = Cur(body);
    c.take(2 + 32)?; // legacy version, random
    let n = c.u8()?;
    if n > 32 {
        return bad("session id");
    }
    c.take(n)?;
    let n = c.u16()?;
    if n == 0 || n % 2 != 0 {
        return bad("cipher suites");
    }
    c.take(n)?;
    let n = c.u8()?;
    if n == 0 {
        return bad("compression methods");
    }
    c.take(n)?;
    if c.0.is_empty() {
        return Ok(None); // no extensions at all
    }
    let n = c.u16()?;
    let mut ext = Cur(c.take(n)?);
    if !c.0.is_empty() {
        return bad("bytes after the extensions");
    }
    let mut seen = std::collections::HashSet::new();
    let mut name = None;
    while !ext.0.is_empty() {
        let kind = ext.u16()?;
        let len = ext.u16()?;
        let data = ext.take(len)?;
        if !seen.insert(kind) {
            return bad("a repeated extension");
        }
        if kind != 0 {
            continue;
        }
        let mut d = Cur(data);
        let list = d.u16()?;
        if list != d.0.len() {
            return bad("server_name list length");
        }
        let name_type = d.u8()?;
        let n = d.u16()?;
        let host = d.take(n)?;
        if name_type != 0 || !d.0.is_empty() {
            return bad("server_name must hold exactly one host name");
        }
        let valid = !host.is_empty()
            && host
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return bad("server_name is not a host name");
        }
        name = Some(normalize_host(
            std::str::from_utf8(host).unwrap_or_default(),
        ));
    }
    Ok(name)
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

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Sends `prefix`, then copies `first` and what `from` sends to `to`, at the bucket's pace,
/// until `from` ends or, with `framing`, the one request body it describes is complete;
/// returns the bytes sent.
#[allow(clippy::too_many_arguments)]
fn copy(
    mut from: &TcpStream,
    mut to: &TcpStream,
    prefix: &[u8],
    first: &[u8],
    mut framing: Option<Framing>,
    bucket: Option<&Bucket>,
    sh: &Shared,
    total: &AtomicU64,
) -> u64 {
    let mut copied = 0u64;
    let mut send = |data: &[u8]| -> bool {
        for part in data.chunks(CHUNK) {
            if let Some(b) = bucket {
                if !b.take(part.len(), &sh.stopping) {
                    return false;
                }
            }
            if to.write_all(part).is_err() {
                return false;
            }
            copied += part.len() as u64;
            total.fetch_add(part.len() as u64, Ordering::Relaxed);
        }
        true
    };
    let mut buf = vec![0u8; CHUNK];
    let mut pending = first.to_vec();
    let mut ok = send(prefix);
    while ok {
        if !pending.is_empty() {
            // With framing, only the request's own bytes go upstream: whatever the client sends
            // after its body (a pipelined or smuggled second request) is dropped.
            let keep = match framing.as_mut() {
                Some(f) => match f.feed(&pending) {
                    Ok(k) => k,
                    Err(()) => {
                        ok = false;
                        break;
                    }
                },
                None => pending.len(),
            };
            ok = send(&pending[..keep]);
            if !ok {
                break;
            }
        }
        if framing.as_ref().is_some_and(Framing::done) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => pending = buf[..n].to_vec(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => pending.clear(),
            Err(_) => break,
        }
    }
    if framing.is_none() {
        let _ = to.shutdown(Shutdown::Write);
    }
    if !ok {
        let _ = from.shutdown(Shutdown::Read);
        let _ = to.shutdown(Shutdown::Both);
    }
    copied
}

/// Where a plain HTTP request's body ends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Framing {
    /// This many body bytes are still to come.
    Length(u64),
    /// Chunked: the parser's state.
    Chunked(ChunkState),
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line (the size so far; whether extensions started).
    Size(u64, bool, bool),
    /// This many data bytes, then CRLF.
    Data(u64),
    /// The CR and LF after chunk data (bytes of it still expected).
    DataEnd(u8),
    /// Trailer lines after the last chunk (bytes of the current line so far).
    Trailer(usize),
}

impl Framing {
    /// From the request headers; `Err` for framing that cannot be trusted (both
    /// Content-Length and Transfer-Encoding, several lengths, a coding other than chunked).
    fn of(headers: &[(String, String)]) -> Result<Framing, Refusal> {
        let lens: Vec<&str> = headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.as_str())
            .collect();
        let te: Vec<&str> = headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
            .map(|(_, v)| v.as_str())
            .collect();
        match (lens.as_slice(), te.as_slice()) {
            ([], []) => Ok(Framing::Done),
            ([n], []) => n
                .parse::<u64>()
                .map(|n| {
                    if n == 0 {
                        Framing::Done
                    } else {
                        Framing::Length(n)
                    }
                })
                .map_err(|_| refuse(400, "malformed Content-Length")),
            ([], [t]) if t.eq_ignore_ascii_case("chunked") => {
                Ok(Framing::Chunked(ChunkState::Size(0, false, false)))
            }
            _ => Err(refuse(
                400,
                "ambiguous request body framing (Content-Length and Transfer-Encoding, several of either, or a coding other than chunked)",
            )),
        }
    }

    fn done(&self) -> bool {
        *self == Framing::Done
    }

    /// How many bytes of `data` belong to the body; `Err` for malformed chunking.
    fn feed(&mut self, data: &[u8]) -> Result<usize, ()> {
        let mut used = 0usize;
        while used < data.len() {
            match self {
                Framing::Done => break,
                Framing::Length(left) => {
                    let take = (*left).min((data.len() - used) as u64);
                    used += take as usize;
                    *left -= take;
                    if *left == 0 {
                        *self = Framing::Done;
                    }
                }
                Framing::Chunked(state) => {
                    let b = data[used];
                    used += 1;
                    match state {
                        ChunkState::Size(n, ext, cr) => {
                            if *cr {
                                if b != b'\n' {
                                    return Err(());
                                }
                                *state = if *n == 0 {
                                    ChunkState::Trailer(0)
                                } else {
                                    ChunkState::Data(*n)
                                };
                            } else if b == b'\r' {
                                *cr = true;
                            } else if *ext {
                                // chunk extensions: skipped up to CR
                            } else if b == b';' {
                                *ext = true;
                            } else {
                                let d = (b as char).to_digit(16).ok_or(())?;
                                *n = n
                                    .checked_mul(16)
                                    .and_then(|n| n.checked_add(u64::from(d)))
                                    .ok_or(())?;
                            }
                        }
                        ChunkState::Data(left) => {
                            // Take as much of this chunk as is here (the byte already counted).
                            let more = (*left - 1).min((data.len() - used) as u64);
                            used += more as usize;
                            *left -= 1 + more;
                            if *left == 0 {
                                *state = ChunkState::DataEnd(2);
                            }
                        }
                        ChunkState::DataEnd(k) => {
                            let want = if *k == 2 { b'\r' } else { b'\n' };
                            if b != want {
                                return Err(());
                            }
                            *k -= 1;
                            if *k == 0 {
                                *state = ChunkState::Size(0, false, false);
                            }
                        }
                        ChunkState::Trailer(len) => {
                            if b == b'\n' {
                                if *len <= 1 {
                                    *self = Framing::Done;
                                } else {
                                    *len = 0;
                                }
                            } else {
                                *len += 1;
                            }
                        }
                    }
                }
            }
        }
        Ok(used)
    }
}

/// Copies both ways until both sides are done; returns (bytes up, bytes down). Upstream gets
/// `head`, then `body` and what the client sends next, bounded by `framing` when given (plain
/// HTTP: the one request's body).
fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    head: Vec<u8>,
    body: Vec<u8>,
    framing: Option<Framing>,
    sh: &Shared,
) -> (u64, u64) {
    std::thread::scope(|s| {
        let up = s.spawn(|| {
            copy(
                client,
                upstream,
                &head,
                &body,
                framing,
                sh.up.as_ref(),
                sh,
                &sh.bytes_up,
            )
        });
        let down = copy(
            upstream,
            client,
            &[],
            &[],
            None,
            sh.down.as_ref(),
            sh,
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
        let r = parse_request(b"GET http://web.test:80#frag HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(r.path, "/");
        for smuggle in [
            &b"GET http://web.test/ HTTP/1.1\r\nX: a\nHost: evil\r\n\r\n"[..],
            b"GET http://web.test/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"GET http://web.test/\x1b[2J HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse_request(smuggle).is_err());
        }
        assert_eq!(clean("a\nb\x1b[c"), "a\\nb\\u{1b}[c");
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
            "fec0::1",
            "2002:7f00:1::1",
            "2001::1",
            "2001:db8::1",
            "::ffff:0:127.0.0.1",
            "64:ff9b::7f00:1",
            "192.88.99.1",
            "3fff::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    /// A ClientHello handshake message naming `sni` (none when empty), extensions repeated
    /// `ext_copies` times.
    fn hello(sni: &str, ext_copies: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        for _ in 0..ext_copies {
            if !sni.is_empty() {
                let n = sni.len() as u16;
                exts.extend_from_slice(&[0, 0]);
                exts.extend_from_slice(&(n + 5).to_be_bytes());
                exts.extend_from_slice(&(n + 3).to_be_bytes());
                exts.push(0);
                exts.extend_from_slice(&n.to_be_bytes());
                exts.extend_from_slice(sni.as_bytes());
            }
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]); // one suite, null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![1, 0];
        msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
        msg.extend_from_slice(&body);
        msg
    }

    /// `msg` as TLS records, cut at `cuts`.
    fn records(msg: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&msg.len())) {
            out.extend_from_slice(&[0x16, 3, 1]);
            out.extend_from_slice(&((to - from) as u16).to_be_bytes());
            out.extend_from_slice(&msg[from..to]);
            from = to;
        }
        out
    }

    /// Sends `bytes` over loopback TCP and runs `read_client_hello` on the far end.
    fn check(bytes: &[u8]) -> Result<Option<String>, String> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        c.write_all(bytes).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        read_client_hello(&s, Vec::new()).map(|(raw, sni)| {
            assert!(
                bytes.starts_with(&raw),
                "what was read is forwarded as it came"
            );
            sni
        })
    }

    #[test]
    fn client_hellos_are_parsed_strictly_across_records() {
        let m = hello("api.example.com", 1);
        assert_eq!(
            check(&records(&m, &[])).unwrap().as_deref(),
            Some("api.example.com")
        );
        // Split across records (even inside the header or the name): reassembled, not missed.
        for cuts in [&[4][..], &[60][..], &[2, 30, 70][..]] {
            assert_eq!(
                check(&records(&m, cuts)).unwrap().as_deref(),
                Some("api.example.com"),
                "{cuts:?}"
            );
        }
        assert_eq!(
            check(&records(&hello("", 1), &[])).unwrap(),
            None,
            "no SNI at all"
        );
        for (bad, why) in [
            (b"\x16\x03\x01\x00\x00NOT-TLS\n".to_vec(), "empty record"),
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "not TLS"),
            (
                records(&[&[2u8][..], &m[1..]].concat(), &[]),
                "not a ClientHello",
            ),
            (records(&m[..m.len() - 3], &[]), "truncated"),
            (
                records(&hello("api.example.com", 2), &[]),
                "repeated extension",
            ),
            (records(&hello("bad name!", 1), &[]), "not a host name"),
            (
                records(&[m.clone(), vec![2, 0, 0, 0]].concat(), &[]),
                "handshake data after the hello in its record",
            ),
        ] {
            assert!(check(&bad).is_err(), "{why} accepted");
        }
    }

    #[test]
    fn a_stop_cuts_a_bandwidth_wait_short() {
        let b = Bucket::new(1000);
        let stop = AtomicBool::new(false);
        assert!(b.take(1000, &stop), "within the burst");
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                stop.store(true, Ordering::Relaxed);
            });
            let t = Instant::now();
            assert!(!b.take(1_000_000, &stop), "a 1000 s debt, cut by the stop");
            assert!(t.elapsed() < Duration::from_secs(1));
        });
    }

    #[test]
    fn request_bodies_end_where_their_framing_says() {
        let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        // No body: nothing after the head goes upstream.
        let mut f = Framing::of(&h(&[])).unwrap();
        assert!(f.done());
        assert_eq!(f.feed(b"GET /smuggled HTTP/1.1\r\n\r\n"), Ok(0));
        // Content-Length: exactly that many bytes, in pieces.
        let mut f = Framing::of(&h(&[("Content-Length", "5")])).unwrap();
        assert_eq!(f.feed(b"hel"), Ok(3));
        assert_eq!(f.feed(b"loGET /next HTTP/1.1"), Ok(2));
        assert!(f.done());
        // Chunked, split anywhere, with an extension and a trailer; the next request is cut.
        let body = b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
        let next = b"GET /smuggled HTTP/1.1\r\n\r\n";
        let all = [&body[..], &next[..]].concat();
        for cut in [1, 3, 9, 20, body.len()] {
            let mut f = Framing::of(&h(&[("Transfer-Encoding", "chunked")])).unwrap();
            let a = f.feed(&all[..cut]).unwrap();
            let b = f.feed(&all[cut..]).unwrap();
            assert_eq!(a + b, body.len(), "cut at {cut}");
            assert!(f.done());
        }
        let mut f = Framing::of(&h(&[("Transfer-Encoding", "chunked")])).unwrap();
        assert!(f.feed(b"zz\r\n").is_err(), "not a hex size");
        for bad in [
            &[("Content-Length", "5"), ("Transfer-Encoding", "chunked")][..],
            &[("Content-Length", "5"), ("Content-Length", "6")],
            &[("Transfer-Encoding", "gzip, chunked")],
            &[("Content-Length", "-1")],
        ] {
            assert!(Framing::of(&h(bad)).is_err(), "{bad:?}");
        }
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
                        assert!(b.take(CHUNK, &AtomicBool::new(false)));
                    }
                });
            }
        });
        // 50 chunks = 819200 bytes at 1 MB/s, less the 100 KB burst: >= 0.7 s.
        let secs = t.elapsed().as_secs_f64();
        assert!((0.65..1.5).contains(&secs), "{secs}");
    }
}
