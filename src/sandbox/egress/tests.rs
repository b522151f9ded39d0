//! The proxy's parsers, allow-list, address check, ClientHello reading, body framing and bucket.
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
