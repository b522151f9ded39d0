//! The TLS ClientHello of a `CONNECT` tunnel, reassembled across records and parsed strictly for
//! its server name (which must equal the `CONNECT` host when present).

use super::*;

/// Largest ClientHello accepted (post-quantum key shares make them a few KiB).
pub(super) const HELLO_LIMIT: usize = 64 * 1024;

/// Reads the client's ClientHello, which may span several TLS records, and returns the bytes
/// read (to forward) with the server name it asks for. Anything that is not a well-formed
/// ClientHello is refused: an HTTPS destination carries TLS and nothing else.
pub(super) fn read_client_hello(
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
pub(super) fn server_name(body: &[u8]) -> Result<Option<String>, String> {
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
