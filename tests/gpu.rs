#![allow(clippy::unwrap_used, clippy::expect_used)]
//! GPU access per profile, tested without a GPU: `[sandbox] gpu_devices` points corral at
//! character device nodes made with mknod that carry the NVIDIA numbers (195:N, 195:255) but have
//! no driver behind them. Opening one inside the sandbox then fails with ENXIO ("no such device")
//! only if every layer let the open through (bind with device access, device cgroup, Landlock);
//! a layer refusing it gives EACCES or EPERM instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{corral, probe, stderr, Scratch};

fn mknod(dir: &Path, name: &str, major: u32, minor: u32) -> PathBuf {
    let p = dir.join(name);
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: mknod with a valid NUL-terminated path; the tests run as root.
    let r = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    p
}

struct Gpus {
    s: Scratch,
    config: PathBuf,
    nodes: PathBuf,
}

/// Fake nodes for GPUs 0 and 1 and a config handing them to corral.
fn gpus(n: u32) -> Gpus {
    let s = Scratch::new();
    let nodes = s.path("dev");
    std::fs::create_dir(&nodes).unwrap();
    let mut list = vec![
        mknod(&nodes, "nvidiactl", 195, 255),
        mknod(&nodes, "nvidia-uvm", 508, 0),
    ];
    for i in 0..n {
        list.push(mknod(&nodes, &format!("nvidia{i}"), 195, i));
    }
    let config = s.path("corral.toml");
    let state = s.path("state");
    std::fs::write(
        &config,
        format!(
            "[sandbox]\nstate_dir = \"{}\"\ngpu_devices = [{}]\n",
            state.display(),
            list.iter()
                .map(|p| format!("\"{}\"", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .unwrap();
    Gpus { s, config, nodes }
}

impl Gpus {
    fn profile(&self, name: &str, gpu: &str, extra: &str) -> PathBuf {
        self.s.profile(
            name,
            &format!(
                "[resources]\nmax_memory_mb = 256\ngpu_access = {gpu}\n[process_limits]\nmax_execution_time_seconds = 20\n{extra}"
            ),
        )
    }

    fn command(&self, profile: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(corral());
        c.arg("--config")
            .arg(&self.config)
            .args(["sandbox", "exec", "--profile"])
            .arg(profile)
            .arg("--")
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn exec(&self, profile: &Path, args: &[&str]) -> Output {
        self.command(profile, args).output().unwrap()
    }

    fn probe(&self, profile: &Path, check: &[&str]) -> serde_json::Value {
        let probe = probe();
        let mut args = vec![probe.to_str().unwrap()];
        args.extend_from_slice(check);
        let out = self.exec(profile, &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{check:?}: no JSON ({e}): {stdout} {}", stderr(&out)))
    }
}

const SHARED: &str = "{ Shared = { max_memory_mb = 1024 } }";

#[test]
fn shared_exposes_exactly_the_nvidia_nodes_and_every_layer_lets_them_through() {
    let g = gpus(2);
    let p = g.profile("shared", SHARED, "");
    let v = g.probe(&p, &["list", "/dev"]);
    assert_eq!(
        v["detail"], "fd,full,null,nvidia-uvm,nvidia0,nvidia1,nvidiactl,random,shm,stderr,stdin,stdout,urandom,zero",
        "{v}"
    );
    for node in [
        "/dev/nvidia0",
        "/dev/nvidia1",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
    ] {
        let v = g.probe(&p, &["read", node]);
        assert_eq!(
            v["error"], "ENXIO",
            "{node}: the open must reach the (absent) driver: {v}"
        );
    }
    // The program learns which GPUs it got and its (advisory) memory cap.
    let out = g.exec(&p, &["/usr/bin/env"]);
    let env = String::from_utf8_lossy(&out.stdout);
    assert!(env.contains("CORRAL_GPUS=0,1\n"), "{env}{}", stderr(&out));
    assert!(env.contains("CORRAL_GPU_MEMORY_MB=1024\n"), "{env}");

    // The device cgroup of the running sandbox allows exactly those nodes.
    let host = corral::sandbox::cgroup::CgroupHost::detect();
    if host.devices.is_some() {
        let probe = probe();
        let mut child = g
            .command(&p, &[probe.to_str().unwrap(), "sleep", "5"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let list = wait_devices_list(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let mut lines: Vec<&str> = list.lines().collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                "c 195:0 rw",
                "c 195:1 rw",
                "c 195:255 rw",
                "c 1:3 rw",
                "c 1:5 rw",
                "c 1:7 rw",
                "c 1:8 rw",
                "c 1:9 rw",
                "c 508:0 rw"
            ]
        );
    }
}

/// The v1 `devices.list` of the sandbox started by corral process `corral_pid`.
fn wait_devices_list(corral_pid: u32) -> String {
    let dir = corral::sandbox::cgroup::CgroupHost::detect()
        .devices
        .unwrap()
        .own_dir
        .join("corral");
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sandbox cgroup not found"
        );
        if let Some(pid) = child_of(corral_pid) {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let procs =
                    std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                if procs.lines().any(|l| l == pid.to_string()) {
                    return std::fs::read_to_string(e.path().join("devices.list")).unwrap();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process of `pid`, if it has one.
fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?;
        (ppid == pid.to_string()).then(|| e.file_name().to_str()?.parse().ok())?
    })
}

#[test]
fn gpu_none_leaves_no_gpu_node_reachable() {
    let g = gpus(1);
    // Even with the node directory among its read paths, a profile without GPU access sees the
    // nodes only as inert files: every bind but a GPU grant is nodev.
    let p = g.profile(
        "none",
        "\"None\"",
        &format!("[filesystem]\nread_paths = [\"{}\"]\n", g.nodes.display()),
    );
    let v = g.probe(&p, &["list", "/dev"]);
    assert!(!v["detail"].as_str().unwrap().contains("nvidia"), "{v}");
    let node = g.nodes.join("nvidia0");
    let v = g.probe(&p, &["read", node.to_str().unwrap()]);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"], "EACCES", "{v}");
    let out = g.exec(&p, &["/usr/bin/env"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("CORRAL_GPUS"));
}

#[test]
fn exclusive_holds_its_gpu_until_it_ends() {
    let g = gpus(1);
    let excl = g.profile("excl", "\"Exclusive\"", "");
    let shared = g.profile("shared", SHARED, "");
    let probe = probe();
    let mut first = g
        .command(&excl, &[probe.to_str().unwrap(), "sleep", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first sandbox runs (its program is a child of corral).
    let start = Instant::now();
    while child_of(first.id()).is_none() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in [&excl, &shared] {
        let out = g.exec(p, &["/bin/true"]);
        assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
        assert!(stderr(&out).contains("GPU access"), "{}", stderr(&out));
    }
    assert!(first.wait().unwrap().success());
    let out = g.exec(&shared, &["/bin/true"]);
    assert!(
        out.status.success(),
        "the lock is released when the sandbox ends: {}",
        stderr(&out)
    );
}

#[test]
fn a_host_without_gpus_refuses_gpu_profiles_and_doctor_says_why() {
    let s = Scratch::new();
    let config = s.path("corral.toml");
    std::fs::write(&config, "[sandbox]\ngpu_devices = []\n").unwrap();
    let p = s.profile(
        "gpu",
        &format!("enforcement = \"best_effort\"\n[resources]\ngpu_access = {SHARED}\n"),
    );
    let out = Command::new(corral())
        .arg("--config")
        .arg(&config)
        .args(["sandbox", "exec", "--profile"])
        .arg(&p)
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(125),
        "best effort never invents a GPU"
    );
    assert!(
        stderr(&out).contains("gpu access: no NVIDIA device nodes"),
        "{}",
        stderr(&out)
    );

    let doctor = |config: &Path| -> serde_json::Value {
        let out = Command::new(corral())
            .arg("--config")
            .arg(config)
            .args(["doctor", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let gpu_profile = |v: &serde_json::Value| -> serde_json::Value {
        let list = v["profiles"].as_array().unwrap();
        list.iter().find(|p| p["name"] == "gpu").unwrap().clone()
    };
    let v = doctor(&config);
    let gpu = gpu_profile(&v);
    assert_eq!(gpu["status"], "not enforceable", "{v:#}");
    assert!(
        gpu["missing"][0].as_str().unwrap().contains("gpu access"),
        "{gpu}"
    );
    assert_eq!(v["gpu"]["devices"].as_array().unwrap().len(), 0);

    let g = gpus(1);
    let v = doctor(&g.config);
    let gpu = gpu_profile(&v);
    assert_eq!(gpu["status"], "enforceable", "{v:#}");
    assert_eq!(v["gpu"]["gpus"], serde_json::json!([0]), "{v:#}");
}
