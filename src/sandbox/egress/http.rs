//! Proxy request heads: parsing `CONNECT` and absolute-form HTTP requests, refusals, and the
//! framing of a forwarded HTTP body (only the request's own framed bytes go upstream).

use super::*;

/// How a connection asked to go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `CONNECT host:port`: a tunnel (HTTPS or raw TCP).
    Connect,
    /// An absolute-form plain HTTP request.
    Http,
}

/// Why a request was refused: the HTTP status sent back and the reason logged and shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) status: u16,
    pub(super) reason: String,
}

pub(super) fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// A parsed proxy request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Request {
    pub(super) kind: Kind,
    pub(super) method: String,
    pub(super) host: String,
    pub(super) port: u16,
    /// Origin-form target for plain HTTP (`/path?query`).
    pub(super) path: String,
    pub(super) version: String,
    pub(super) headers: Vec<(String, String)>,
}

/// Lower-case, no trailing dot; IPv6 literals without brackets.
pub(super) fn normalize_host(h: &str) -> String {
    let h = h.trim().trim_end_matches('.');
    let h = h
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(h);
    h.to_ascii_lowercase()
}

pub(super) fn same_host(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        (Err(_), Err(_)) => a == b,
        _ => false,
    }
}

/// `host[:port]` or `[v6][:port]`.
pub(super) fn parse_authority(
    auth: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), Refusal> {
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

pub(super) fn parse_request(head: &[u8]) -> Result<Request, Refusal> {
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

pub(super) fn respond(mut conn: &TcpStream, status: u16, reason: &str) -> io::Result<()> {
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
pub(super) fn read_head(mut conn: &TcpStream) -> Result<(Vec<u8>, Vec<u8>), Refusal> {
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

/// Where a plain HTTP request's body ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Framing {
    /// This many body bytes are still to come.
    Length(u64),
    /// Chunked: the parser's state.
    Chunked(ChunkState),
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ChunkState {
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
    pub(super) fn of(headers: &[(String, String)]) -> Result<Framing, Refusal> {
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

    pub(super) fn done(&self) -> bool {
        *self == Framing::Done
    }

    /// How many bytes of `data` belong to the body; `Err` for malformed chunking.
    pub(super) fn feed(&mut self, data: &[u8]) -> Result<usize, ()> {
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
