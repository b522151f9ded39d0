//! Reaching the destination and relaying bytes both ways within the bandwidth cap.

use super::*;

/// Connects to the first address that answers, within `CONNECT_TIMEOUT` for all of them
/// together; gives up early when `stop` is raised (attempts are made in short slices).
pub(super) fn connect_any(
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

pub(super) fn bracket(host: &str) -> String {
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
pub(super) fn copy(
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

/// Copies both ways until both sides are done; returns (bytes up, bytes down). Upstream gets
/// `head`, then `body` and what the client sends next, bounded by `framing` when given (plain
/// HTTP: the one request's body).
pub(super) fn relay(
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
