//! The escape suite: the probe runs inside a `secure`-derived sandbox and tries to get out.
//! Each attempt is its own launch and must fail the expected way; allowed things must work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::io::Read;
use std::net::TcpListener;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};

fn blocked(v: &serde_json::Value, errors: &[&str]) {
    assert_eq!(v["ok"], false, "attempt succeeded: {v}");
    let e = v["error"].as_str().unwrap_or_default();
    assert!(errors.contains(&e), "expected one of {errors:?}, got {v}");
}

fn allowed(v: &serde_json::Value) {
    assert_eq!(v["ok"], true, "allowed operation failed: {v}");
}

#[test]
fn probe_refuses_to_run_unsandboxed() {
    let out = std::process::Command::new(probe())
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing"));
}

#[test]
fn identity_and_isolation() {
    let s = Scratch::new();
    let (v, _) = probe_check(&s.escape_profile(), &["status"]);
    let d = &v["detail"];
    assert_eq!(d["uid"], SANDBOX_UID);
    assert_eq!(d["euid"], SANDBOX_UID);
    assert_eq!(d["pid"], 1, "own pid namespace");
    assert_eq!(d["hostname"], "corral");
    assert_eq!(d["no_new_privs"], "1");
    assert_eq!(d["seccomp"], "2");
    assert_eq!(
        d["interfaces"],
        serde_json::json!(["lo"]),
        "empty network namespace"
    );
    assert!(
        d["uid_map"].as_str().unwrap().starts_with("61000 61000 1"),
        "{d}"
    );
    let env: Vec<&str> = d["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(
        !env.iter().any(|k| k.contains("CARGO") || *k == "USER"),
        "environment not clean: {env:?}"
    );
    assert!(env.contains(&"CORRAL_SANDBOX_PROFILE"));
    assert_eq!(d["fd_count"], 3, "only stdio inherited: {d}");

    let (v, _) = probe_check(&s.escape_profile(), &["caps"]);
    assert_eq!(v["ok"], false, "capabilities present: {v}");
    let (v, _) = probe_check(&s.escape_profile(), &["procs"]);
    assert_eq!(v["ok"], false, "host processes visible: {v}");
    let (v, _) = probe_check(&s.escape_profile(), &["setuid0"]);
    blocked(&v, &["EPERM"]);
}

#[test]
fn file_system_barriers() {
    let s = Scratch::new();
    let p = s.escape_profile();
    let root = s.dir.path().display().to_string();
    // outside read_paths: not in the sandbox at all
    for path in [
        "/etc/shadow",
        "/etc/passwd",
        "/root/.bashrc",
        "/home",
        &format!("{root}/outside.txt"),
    ] {
        let (v, _) = probe_check(&p, &["read", path]);
        blocked(&v, &["ENOENT", "EACCES"]);
    }
    // the denied path inside an allowed tree is masked
    let (v, _) = probe_check(&p, &["read", &format!("{root}/ro/secret/key")]);
    blocked(&v, &["ENOENT", "EACCES"]);
    let (v, _) = probe_check(&p, &["list", &format!("{root}/ro/secret")]);
    blocked(&v, &["EACCES"]);
    // allowed reads work; the listing does not show the secret's content
    let (v, _) = probe_check(&p, &["read", &format!("{root}/ro/file")]);
    allowed(&v);
    let (v, _) = probe_check(&p, &["list", &format!("{root}/ro")]);
    allowed(&v);
    // writes: only write_paths and the private /tmp
    let (v, _) = probe_check(&p, &["write", &format!("{root}/rw/out.txt")]);
    allowed(&v);
    assert_eq!(
        std::fs::read_to_string(s.path("rw/out.txt")).unwrap(),
        "corral-probe\n",
        "the write reached the host tree"
    );
    let (v, _) = probe_check(&p, &["write", "/tmp/x"]);
    allowed(&v);
    for path in [
        format!("{root}/ro/new"),
        format!("{root}/outside-new"),
        "/usr/new".into(),
        "/etc/new".into(),
        "/new".into(),
    ] {
        let (v, _) = probe_check(&p, &["write", &path]);
        blocked(&v, &["EROFS", "EACCES", "ENOENT"]);
        assert!(
            !std::path::Path::new(&path).exists(),
            "{path} created on the host"
        );
    }
    // exec: only the command itself
    let (v, _) = probe_check(&p, &["exec", "/usr/bin/sh", "-c", "true"]);
    blocked(&v, &["EACCES"]);
    let (v, _) = probe_check(&p, &["exec", "/bin/sh", "-c", "true"]);
    blocked(&v, &["EACCES", "ENOENT"]);
    // cgroup files are not reachable
    let (v, _) = probe_check(&p, &["cgroup-write"]);
    assert_eq!(v["ok"], false, "{v}");
}

#[test]
fn processes_and_kernel_interfaces() {
    let s = Scratch::new();
    let p = s.escape_profile();
    for check in [
        &["fork"][..],
        &["clone-process"],
        &["mount"],
        &["userns"],
        &["netns"],
        &["chroot"],
        &["bpf"],
        &["perf"],
        &["add-key"],
        &["keyctl"],
        &["init-module"],
        &["finit-module"],
        &["io-uring"],
        &["userfaultfd"],
        &["kexec"],
        &["reboot"],
        &["clock-settime"],
        &["personality"],
        &["tiocsti"],
    ] {
        let (v, _) = probe_check(&p, check);
        blocked(&v, &["EPERM"]);
    }
    let (v, _) = probe_check(&p, &["setns"]);
    assert_eq!(v["ok"], false, "{v}");
    // raw packet and vsock sockets
    for fam in [["17", "3"], ["40", "1"]] {
        let (v, _) = probe_check(&p, &["socket", fam[0], fam[1]]);
        blocked(&v, &["EPERM"]);
    }
    // INET sockets whose protocols Landlock's TCP rules do not cover: MPTCP, SCTP, UDP-Lite, and
    // SOCK_SEQPACKET (SCTP's type where its module is loaded)
    for (fam, ty, proto) in [
        ("2", "5", "0"),
        ("2", "1", "262"),
        ("10", "1", "262"),
        ("2", "1", "132"),
        ("2", "2", "136"),
    ] {
        let (v, _) = probe_check(&p, &["socket-proto", fam, ty, proto]);
        blocked(&v, &["EPERM"]);
    }
    // ... while plain TCP and UDP sockets can be made (the namespace and Landlock decide where
    // they may go)
    for (fam, ty, proto) in [("2", "1", "6"), ("10", "2", "0")] {
        let (v, _) = probe_check(&p, &["socket-proto", fam, ty, proto]);
        allowed(&v);
    }
    // threads are allowed
    let (v, _) = probe_check(&p, &["thread"]);
    allowed(&v);
}

#[test]
fn host_processes_cannot_be_touched() {
    let s = Scratch::new();
    let p = s.escape_profile();
    let mut victim = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = victim.id().to_string();
    let (v, _) = probe_check(&p, &["ptrace", &pid]);
    blocked(&v, &["EPERM", "ESRCH"]);
    let (v, _) = probe_check(&p, &["kill", &pid, "9"]);
    blocked(&v, &["ESRCH", "EPERM"]);
    let (v, _) = probe_check(&p, &["process-vm-readv", &pid]);
    blocked(&v, &["EPERM", "ESRCH"]);
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the host process was killed"
    );
    victim.kill().unwrap();
    victim.wait().unwrap();
}

#[test]
fn network_barriers() {
    let s = Scratch::new();
    let p = s.escape_profile();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let port = tcp.local_addr().unwrap().port().to_string();
    let (v, _) = probe_check(&p, &["tcp", "127.0.0.1", &port]);
    blocked(&v, &["ECONNREFUSED", "EACCES", "ENETUNREACH"]);
    assert!(tcp.accept().is_err(), "the host listener got a connection");
    let (v, _) = probe_check(&p, &["udp", "127.0.0.1", &port]);
    // UDP "send" on the sandbox's own loopback succeeds locally but reaches nothing on the host.
    let _ = v;

    let name = format!("corral-test-{}", std::process::id());
    let abs =
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    abs.set_nonblocking(true).unwrap();
    let (v, _) = probe_check(&p, &["unix-abstract", &name]);
    blocked(&v, &["ECONNREFUSED", "EPERM"]);
    assert!(
        abs.accept().is_err(),
        "the abstract socket got a connection"
    );

    // A pathname socket outside the sandbox's view, and one hidden by a denied path.
    let outside = s.path("host.sock");
    let l1 = UnixListener::bind(&outside).unwrap();
    let hidden = s.path("ro/secret/host.sock");
    let l2 = UnixListener::bind(&hidden).unwrap();
    for (sock, l) in [(&outside, &l1), (&hidden, &l2)] {
        l.set_nonblocking(true).unwrap();
        let (v, _) = probe_check(&p, &["unix-path", sock.to_str().unwrap()]);
        blocked(&v, &["ENOENT", "ECONNREFUSED", "EACCES"]);
        assert!(l.accept().is_err());
    }
}

#[test]
fn memory_limit_kills_and_is_named() {
    let s = Scratch::new();
    let (_, out) = probe_check_raw(&s.escape_profile(), &["alloc", "400"]);
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    assert!(stderr(&out).contains("memory limit"), "{}", stderr(&out));
    // Below the limit the same program completes.
    let (v, out) = probe_check(&s.escape_profile(), &["alloc", "32"]);
    allowed(&v);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn time_limit_kills_the_tree_and_is_named() {
    let s = Scratch::new();
    let p = s.profile(
        "short",
        "[process_limits]\nmax_execution_time_seconds = 1\n",
    );
    let start = std::time::Instant::now();
    let (_, out) = probe_check_raw(&p, &["spin", "30"]);
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(stderr(&out).contains("time limit"), "{}", stderr(&out));
}

#[test]
fn pids_limit_counts_threads_and_is_named() {
    let s = Scratch::new();
    let (v, out) = probe_check(&s.escape_profile(), &["threads", "64"]);
    assert_eq!(v["ok"], false, "{v}");
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("pids limit"), "{}", stderr(&out));
    let (v, out) = probe_check(&s.escape_profile(), &["threads", "8"]);
    allowed(&v);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn foreign_abi_syscalls_are_killed() {
    let s = Scratch::new();
    let (_, out) = probe_check_raw(&s.escape_profile(), &["x32"]);
    assert_eq!(out.status.code(), Some(128 + 31), "{}", stderr(&out));
    assert!(stderr(&out).contains("seccomp"), "{}", stderr(&out));
}

/// Like `probe_check` for attempts that are expected to end the probe (no JSON result).
fn probe_check_raw(profile: &std::path::Path, check: &[&str]) -> (String, std::process::Output) {
    let probe = probe();
    let mut args = vec![probe.to_str().unwrap()];
    args.extend_from_slice(check);
    let out = exec(profile, &args);
    let mut s = String::new();
    let _ = (&out.stdout[..]).read_to_string(&mut s);
    (s, out)
}
