#![allow(clippy::unwrap_used, clippy::expect_used)]
//! network.access_mode = "Restricted": the egress proxy is the only way out of the sandbox, and
//! it lets through exactly the allowed host, port and protocol. Loopback servers play the
//! allowed and forbidden destinations; `[sandbox.hosts]` maps their names to 127.0.0.1 (names
//! that DNS resolved to loopback would be refused as non-public).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{corral, probe, stderr, Scratch};

/// A loopback TCP server: each connection's first bytes are recorded, and `reply(bytes)` is
/// sent back before closing.
struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn server(reply: fn(&[u8]) -> Vec<u8>) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                // Read what the client sends first (a line, a request head or a TLS record).
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.ends_with(b"\n") || got.first() == Some(&0x16) {
                        break;
                    }
                }
                log.lock().unwrap().push(got.clone());
                let _ = s.write_all(&reply(&got));
            });
        }
    });
    Server { port, seen }
}

fn echo(got: &[u8]) -> Vec<u8> {
    [b"echo:".as_slice(), got].concat()
}

/// A plain HTTP server: `/big` is 2 MB, anything else a short page naming the Host it saw.
fn http(got: &[u8]) -> Vec<u8> {
    let head = String::from_utf8_lossy(got);
    let host = head
        .lines()
        .find_map(|l| l.strip_prefix("Host: "))
        .unwrap_or("?")
        .trim()
        .to_string();
    let body = if head.starts_with("GET /big ") {
        vec![b'x'; 2_000_000]
    } else {
        format!("hello from {host}").into_bytes()
    };
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(&body);
    r
}

fn tls_ack(_: &[u8]) -> Vec<u8> {
    b"tls-bytes-received".to_vec()
}

struct Setup {
    _scratch: Scratch,
    config: PathBuf,
    profile: PathBuf,
    echo: Server,
    web: Server,
    tls: Server,
    other: Server,
}

fn setup(bandwidth_mbps: u32) -> Setup {
    let scratch = Scratch::new();
    let (echo, web, tls, other) = (server(echo), server(http), server(tls_ack), server(echo));
    let config = scratch.path("corral.toml");
    std::fs::write(
        &config,
        r#"
[sandbox.hosts]
"echo.test" = "127.0.0.1"
"web.test" = "127.0.0.1"
"tls.test" = "127.0.0.1"
"evil.test" = "127.0.0.1"
"#,
    )
    .unwrap();
    let profile = scratch.profile(
        "restricted",
        &format!(
            r#"
[filesystem]
read_paths = ["/usr"]
[process_limits]
max_execution_time_seconds = 30
max_threads = 16
[network]
access_mode = "Restricted"
max_bandwidth_mbps = {bandwidth_mbps}
allowed_destinations = [
  {{ host = "echo.test", port = {}, protocol = "TCP" }},
  {{ host = "web.test", port = {}, protocol = "HTTP" }},
  {{ host = "tls.test", port = {}, protocol = "HTTPS" }},
]
"#,
            echo.port, web.port, tls.port
        ),
    );
    Setup {
        _scratch: scratch,
        config,
        profile,
        echo,
        web,
        tls,
        other,
    }
}

impl Setup {
    fn exec(&self, args: &[&str]) -> Output {
        Command::new(corral())
            .arg("--config")
            .arg(&self.config)
            .args(["sandbox", "exec", "--profile"])
            .arg(&self.profile)
            .arg("--")
            .args(args)
            .env("CORRAL_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .output()
            .expect("run corral")
    }

    fn probe(&self, check: &[&str]) -> (serde_json::Value, Output) {
        let probe = probe();
        let mut args = vec![probe.to_str().unwrap()];
        args.extend_from_slice(check);
        let out = self.exec(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v =
            serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| {
                panic!(
                    "probe {check:?}: no JSON ({e}); stdout {stdout}; stderr {}",
                    stderr(&out)
                )
            });
        (v, out)
    }
}

/// The egress log events corral wrote to stderr (JSON lines with target corral::egress).
fn events(out: &Output) -> Vec<serde_json::Value> {
    stderr(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "corral::egress")
        .collect()
}

fn refused_with(out: &Output, host: &str, reason_part: &str) {
    let ev = events(out);
    assert!(
        ev.iter().any(|e| e["fields"]["decision"] == "refused"
            && e["fields"]["host"] == host
            && e["fields"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(reason_part))),
        "no refusal event for {host} containing {reason_part:?}: {ev:#?}"
    );
}

#[test]
fn allowed_destinations_are_reachable_through_the_proxy_and_logged() {
    let s = setup(100);
    let echo_port = s.echo.port.to_string();
    let (v, out) = s.probe(&["proxy-connect", "echo.test", &echo_port]);
    assert_eq!(v["ok"], true, "{v}\n{}", stderr(&out));
    assert_eq!(v["detail"]["reply"], "echo:ping\n");
    let ev = events(&out);
    let allowed = ev
        .iter()
        .find(|e| e["fields"]["decision"] == "allowed")
        .unwrap_or_else(|| panic!("no allowed event: {ev:#?}"));
    assert_eq!(allowed["fields"]["host"], "echo.test");
    assert_eq!(allowed["fields"]["port"], s.echo.port);
    assert_eq!(allowed["fields"]["protocol"], "TCP");
    assert!(
        ev.iter()
            .any(|e| e["fields"]["message"] == "egress connection closed"
                && e["fields"]["bytes_up"] == 5),
        "{ev:#?}"
    );

    // Plain HTTP in absolute form; the upstream sees an origin-form request with its own Host.
    let url = format!("http://web.test:{}/page", s.web.port);
    let (v, out) = s.probe(&["proxy-get", &url]);
    assert_eq!(v["ok"], true, "{v}\n{}", stderr(&out));
    assert_eq!(
        v["detail"]["body"],
        format!("hello from web.test:{}", s.web.port)
    );
    let seen = s.web.seen.lock().unwrap().clone();
    let head = String::from_utf8_lossy(seen.last().unwrap()).into_owned();
    assert!(head.starts_with("GET /page HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("Connection: close"), "{head}");

    // HTTPS: a tunnel whose first bytes are a TLS ClientHello for the same name.
    let tls_port = s.tls.port.to_string();
    let (v, out) = s.probe(&["proxy-tls", "tls.test", &tls_port, "tls.test"]);
    assert_eq!(v["ok"], true, "{v}\n{}", stderr(&out));
    assert_eq!(v["detail"]["reply"], "tls-bytes-received");
    assert_eq!(s.tls.seen.lock().unwrap().last().unwrap()[0], 0x16);
}

#[test]
fn everything_else_is_refused() {
    let s = setup(100);
    let (echo_port, other_port) = (s.echo.port.to_string(), s.other.port.to_string());
    let tls_port = s.tls.port.to_string();

    // A host that is not listed (even though the operator mapped it).
    let (v, out) = s.probe(&["proxy-connect", "evil.test", &echo_port]);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["detail"]["status"], 403);
    refused_with(&out, "evil.test", "not in network.allowed_destinations");
    // A listed host on another port.
    let (v, out) = s.probe(&["proxy-connect", "echo.test", &other_port]);
    assert_eq!(v["detail"]["status"], 403, "{v}");
    refused_with(&out, "echo.test", &format!("port {other_port}"));
    // The raw address behind an allowed name.
    let (v, out) = s.probe(&["proxy-connect", "127.0.0.1", &echo_port]);
    assert_eq!(v["detail"]["status"], 403, "{v}");
    refused_with(&out, "127.0.0.1", "not in network.allowed_destinations");
    // The wrong protocol: web.test is plain HTTP only, tls.test is HTTPS (CONNECT) only.
    let web_port = s.web.port.to_string();
    let (v, out) = s.probe(&["proxy-connect", "web.test", &web_port]);
    assert_eq!(v["detail"]["status"], 403, "{v}");
    refused_with(&out, "web.test", "HTTP only");
    let (v, _) = s.probe(&["proxy-get", &format!("http://tls.test:{tls_port}/")]);
    assert_eq!(v["detail"]["status"], 403, "{v}");
    // An HTTPS destination carries TLS for the name it was opened for, nothing else.
    let before = s.tls.seen.lock().unwrap().len();
    let (v, out) = s.probe(&["proxy-connect", "tls.test", &tls_port]);
    assert_eq!(v["ok"], false, "{v}");
    refused_with(&out, "tls.test", "TLS handshake");
    let (v, out) = s.probe(&["proxy-tls", "tls.test", &tls_port, "evil.test"]);
    assert_eq!(v["ok"], false, "{v}");
    refused_with(&out, "tls.test", "does not match");
    assert!(
        s.tls.seen.lock().unwrap()[before..]
            .iter()
            .all(|b| b.is_empty()),
        "the HTTPS upstream received bytes of a refused tunnel"
    );
    assert!(s.other.seen.lock().unwrap().is_empty());

    // Routes around the proxy: direct TCP to the host's servers, UDP, DNS.
    let (v, _) = s.probe(&["tcp", "127.0.0.1", &echo_port]);
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        ["EACCES", "ECONNREFUSED"].contains(&v["error"].as_str().unwrap_or_default()),
        "{v}"
    );
    let (v, _) = s.probe(&["tcp", "10.1.2.3", "443"]);
    assert_eq!(v["ok"], false, "{v}");
    let (v, _) = s.probe(&["udp", "8.8.8.8", "53"]);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"], "ENETUNREACH", "{v}");
    let (v, _) = s.probe(&["dns", "echo.test", "80"]);
    assert_eq!(v["ok"], false, "{v}");
    let (v, _) = s.probe(&["dns", "localhost", "80"]);
    assert_eq!(v["ok"], false, "no /etc/hosts, no resolver: {v}");
    assert!(
        s.echo.seen.lock().unwrap().is_empty(),
        "the echo server was reached"
    );
}

#[test]
fn bandwidth_cap_is_observed() {
    // 8 Mbit/s = 1 MB/s each way: a 2 MB download takes about 1.9 s (0.1 s of burst).
    let s = setup(8);
    let url = format!("http://web.test:{}/big", s.web.port);
    let (v, out) = s.probe(&["proxy-get", &url]);
    assert_eq!(v["ok"], true, "{v}\n{}", stderr(&out));
    assert_eq!(v["detail"]["bytes"], 2_000_000);
    let secs = v["detail"]["secs"].as_f64().unwrap();
    assert!((1.6..8.0).contains(&secs), "2 MB at 1 MB/s took {secs} s");

    // The same download without a cap is far faster (the cap, not the machine, set the pace).
    let fast = setup(10_000);
    let url = format!("http://web.test:{}/big", fast.web.port);
    let (v, _) = fast.probe(&["proxy-get", &url]);
    let quick = v["detail"]["secs"].as_f64().unwrap();
    assert!(quick < secs / 3.0, "uncapped {quick} s vs capped {secs} s");
}

#[test]
fn curl_reaches_an_allowed_https_host_with_tls_intact() {
    // A real TLS server (openssl s_server) with a certificate for tls.test, reached by curl
    // through HTTPS_PROXY: the proxy tunnels the handshake without touching it.
    let s = Scratch::new();
    let dir = s.path("tls");
    std::fs::create_dir(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tls.test",
            "-addext",
            "subjectAltName=DNS:tls.test",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl (scripts/test.sh installs it)");
    assert!(ok.success());
    for (f, mode) in [(&dir, 0o755), (&cert, 0o644)] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(port.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "s_server did not start"
        );
        if let Ok(Some(st)) = server.try_wait() {
            panic!("s_server exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _server = Kill(server);
    let config = s.path("corral.toml");
    std::fs::write(&config, "[sandbox.hosts]\n\"tls.test\" = \"127.0.0.1\"\n").unwrap();
    let profile = s.profile(
        "curl",
        &format!(
            r#"
extends = "standard"
[filesystem]
read_paths = ["/usr", "/etc/ssl/certs", "{}"]
[network]
access_mode = "Restricted"
allowed_destinations = [{{ host = "tls.test", port = {port}, protocol = "HTTPS" }}]
"#,
            dir.display()
        ),
    );
    let run = |url: &str| -> Output {
        Command::new(corral())
            .arg("--config")
            .arg(&config)
            .args(["sandbox", "exec", "--profile"])
            .arg(&profile)
            .args(["--", "curl", "-sS", "--max-time", "20", "--cacert"])
            .arg(&cert)
            .arg(url)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&format!("https://tls.test:{port}/"));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {}\n{body}",
        stderr(&out)
    );
    // s_server -www answers with an HTML page describing the TLS session it negotiated.
    assert!(
        body.contains("Ciphers supported in s_server binary") || body.contains("s_server"),
        "{body}"
    );
    // The same server under a name that is not allowed: refused by the proxy.
    let out = run(&format!("https://evil.test:{port}/"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
}
