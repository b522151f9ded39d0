//! `corral sandbox exec`, `corral profile`, `corral doctor` as a user runs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn corral_cmd() -> Command {
    let mut c = Command::new(corral());
    c.arg("--config").arg(empty_config());
    c
}

#[test]
fn exit_status_stdin_and_clean_environment() {
    let s = Scratch::new();
    let p = s.profile("plain", "");
    let out = exec(&p, &["/bin/sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));

    let mut child = corral_cmd()
        .args(["sandbox", "exec", "-p"])
        .arg(&p)
        .args(["-e", "GREETING=hi", "--", "/bin/cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"through the sandbox\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "through the sandbox\n"
    );

    let out = Command::new(corral())
        .arg("--config")
        .arg(empty_config())
        .args(["sandbox", "exec", "-p"])
        .arg(&p)
        .args(["-e", "GREETING=hi", "--", "/usr/bin/env"])
        .env("SECRET_TOKEN", "leak")
        .output()
        .unwrap();
    let env = String::from_utf8_lossy(&out.stdout);
    assert!(env.contains("GREETING=hi\n"), "{env}");
    assert!(
        env.contains("CORRAL_THREADS=2\n"),
        "threads follow max_cpu_cores: {env}"
    );
    assert!(
        !env.contains("SECRET_TOKEN"),
        "host environment leaked: {env}"
    );
}

#[test]
fn command_errors_have_conventional_codes() {
    let s = Scratch::new();
    let p = s.profile("plain", "");
    let out = exec(&p, &["/nonexistent/cmd"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(stderr(&out).contains("command not found"));
    let out = exec(&p, &[s.path("ro/file").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
}

#[test]
fn bad_profiles_are_refused_naming_file_and_key() {
    let s = Scratch::new();
    let cases = [
        (
            "[process_limits]\nmax_execution_time_seconds = 0\n",
            "process_limits.max_execution_time_seconds: must be > 0",
        ),
        (
            "[resources]\nmax_memory_mb = 0\n",
            "resources.max_memory_mb: must be > 0",
        ),
        (
            "[resources]\nmax_cpu_cores = -1.0\n",
            "resources.max_cpu_cores: must be > 0",
        ),
        (
            "[process_limits]\nallowed_syscalls = [\"read\", \"fooo\"]\n",
            "process_limits.allowed_syscalls[1]: unknown syscall 'fooo'",
        ),
        (
            "[process_limits]\nallowed_syscalls = [\"ptrace\"]\n",
            "syscall 'ptrace' cannot be allowed",
        ),
        (
            "[filesystem]\nread_paths = [\"\"]\n",
            "filesystem.read_paths[0]: must not be empty",
        ),
        (
            "[filesystem]\nwrite_paths = [\"relative/dir\"]\n",
            "filesystem.write_paths[0]: 'relative/dir' must be an absolute path",
        ),
        (
            "[network]\naccess_mode = \"Sometimes\"\n",
            "network.access_mode",
        ),
        (
            "[resources]\nmax_memroy_mb = 5\n",
            "resources.max_memroy_mb",
        ),
    ];
    for (i, (toml, expect)) in cases.iter().enumerate() {
        let p = s.profile(&format!("bad{i}"), toml);
        let out = exec(&p, &["/bin/true"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{toml}: {err}");
        assert!(
            err.contains(p.to_str().unwrap()),
            "file not named for {toml}: {err}"
        );
        assert!(
            err.contains(expect),
            "expected '{expect}' for {toml}: {err}"
        );
    }
    // `profile check` reports the same, and passes valid profiles.
    let good = s.profile("good", "[resources]\nmax_memory_mb = 256\n");
    let bad = s.path("bad0.toml");
    let out = corral_cmd()
        .args(["profile", "check"])
        .arg(&good)
        .arg(&bad)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("ok       ")
            && text.contains("invalid  ")
            && text.contains("max_execution_time_seconds"),
        "{text}"
    );
}

#[test]
fn unenforceable_layers_fail_closed_naming_the_layer() {
    let s = Scratch::new();
    let p = s.profile("gpu", "enforcement = \"best_effort\"\n[resources]\ngpu_access = { Shared = { max_memory_mb = 1024 } }\n");
    let out = exec(&p, &["/bin/true"]);
    assert_eq!(
        out.status.code(),
        Some(125),
        "best effort does not invent GPU access"
    );
    assert!(stderr(&out).contains("gpu access"), "{}", stderr(&out));
}

#[test]
fn child_processes_follow_max_child_processes() {
    let s = Scratch::new();
    let p = s.profile("kids", "[process_limits]\nmax_child_processes = 4\n");
    let (v, _) = probe_check(&p, &["fork"]);
    assert_eq!(v["ok"], true, "{v}");
    let (v, _) = probe_check(&p, &["userns"]);
    assert_eq!(v["ok"], false, "{v}");
}

/// A program that leaves a child running and exits: the child dies with it (it was in the
/// program's PID namespace), the command returns at once, and nothing of it remains.
#[test]
fn children_left_running_die_with_the_program() {
    let s = Scratch::new();
    let p = s.profile("kids", "[process_limits]\nmax_child_processes = 4\n");
    let started = Instant::now();
    let child = corral_cmd()
        .args(["sandbox", "exec", "-p"])
        .arg(&p)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "/bin/sleep 37.25 & /bin/sleep 0.1; kill -0 $! && echo started",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The background sleep holds the output pipe: reading to its end waits for it to die.
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "started");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the background child outlived the program: {:?}",
        started.elapsed()
    );
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("sleep 37.25"))
        .collect();
    assert!(survivors.is_empty(), "still running: {survivors:?}");
    assert!(
        cgroups_of(pid).is_empty(),
        "cgroup left behind: {:?}",
        cgroups_of(pid)
    );
}

fn cgroups_of(pid: u32) -> Vec<std::path::PathBuf> {
    sandbox_cgroups()
        .into_iter()
        .filter(|d| {
            d.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{pid}-"))
        })
        .collect()
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nothing_left_behind_and_stale_cgroups_swept() {
    let s = Scratch::new();
    let p = s.profile("plain", "");
    // Normal exit: no cgroup of that supervisor remains.
    let child = corral_cmd()
        .args(["sandbox", "exec", "-p"])
        .arg(&p)
        .args(["--", "/bin/true"])
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        cgroups_of(pid).is_empty(),
        "cgroup left behind: {:?}",
        cgroups_of(pid)
    );

    // Supervisor killed: its sandbox dies with it (parent-death signal), the cgroup stays
    // behind, and the next supervisor sweeps it.
    let mut child = corral_cmd()
        .args(["sandbox", "exec", "-p"])
        .arg(&p)
        .args(["--", "/bin/sleep", "60"])
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for(
        || {
            cgroups_of(pid).iter().any(|d| {
                std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty())
            })
        },
        "the sandbox to start",
    );
    let dirs = cgroups_of(pid);
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for(
        || {
            dirs.iter().all(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .map_or(true, |s| s.trim().is_empty())
            })
        },
        "the orphaned sandbox to die",
    );
    // The next launch (ours below, or one from a test running in parallel) sweeps it.
    let out = exec(&p, &["/bin/true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        dirs.iter().all(|d| !d.exists()),
        "stale cgroup not swept: {dirs:?}"
    );
}

#[test]
fn signals_are_forwarded_and_a_second_one_kills() {
    let s = Scratch::new();
    let p = s.profile("plain", "");
    let child = corral_cmd()
        .args(["sandbox", "exec", "-p"])
        .arg(&p)
        .args(["--", "/bin/sleep", "60"])
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    wait_for(
        || {
            cgroups_of(pid as u32).iter().any(|d| {
                std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty())
            })
        },
        "the sandbox to start",
    );
    let start = Instant::now();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(
        out.status.code(),
        Some(137),
        "sleep ignores SIGTERM as pid 1; the second signal kills it"
    );
    assert!(cgroups_of(pid as u32).is_empty());
}

#[test]
fn doctor_and_profile_show() {
    let out = corral_cmd().args(["doctor", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["landlock_abi"].as_u64().unwrap_or(0) >= 1, "{v}");
    assert_eq!(v["seccomp"], true);
    let secure = v["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "secure")
        .unwrap();
    assert_eq!(secure["status"], "enforceable", "{secure}");
    let standard = v["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "standard")
        .unwrap();
    assert_eq!(standard["status"], "enforceable", "{standard}");

    let out = corral_cmd()
        .args(["profile", "show", "secure"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("max_memory_mb = 1024") && text.contains("cgroup_pids_max: 32"),
        "{text}"
    );
}

#[test]
fn denied_paths_hold_whatever_the_spelling() {
    let s = Scratch::new();
    let root = s.dir.path();
    std::os::unix::fs::symlink(root.join("ro"), root.join("alias")).unwrap();
    // Read through the real path, deny through a symlinked spelling.
    let p = s.profile(
        "alias",
        &format!(
            "[filesystem]\nread_paths = [\"{0}/ro\"]\ndenied_paths = [\"{0}/alias/secret\"]\n",
            root.display()
        ),
    );
    let (v, _) = probe_check(&p, &["read", &format!("{}/ro/secret/key", root.display())]);
    assert_eq!(v["ok"], false, "{v}");
    // A read path inside a denied tree (reached through another spelling) is hidden too.
    let p = s.profile(
        "inside",
        &format!("[filesystem]\nread_paths = [\"{0}/ro/sub\", \"{0}/ro\"]\ndenied_paths = [\"{0}/alias/sub\"]\n", root.display()),
    );
    std::fs::write(s.path("ro/sub/f"), "x").unwrap();
    let (v, _) = probe_check(&p, &["read", &format!("{}/ro/sub/f", root.display())]);
    assert_eq!(v["ok"], false, "{v}");
}

#[test]
fn symlinks_planted_in_write_paths_are_not_followed() {
    let s = Scratch::new();
    let root = s.dir.path();
    std::os::unix::fs::symlink("/root", root.join("rw/data")).unwrap();
    let p = s.profile(
        "planted",
        &format!(
            "[filesystem]\nwrite_paths = [\"{0}/rw\"]\nread_paths = [\"{0}/rw/data\"]\n",
            root.display()
        ),
    );
    let out = exec(&p, &["/bin/true"]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("symbolic link inside write path"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_fifo_named_as_interpreter_does_not_stall_the_supervisor() {
    let s = Scratch::new();
    let fifo = s.path("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path in our scratch directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let script = s.path("script.sh");
    std::fs::write(&script, format!("#!{}\n", fifo.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let p = s.profile("plain", "");
    let start = Instant::now();
    let out = exec(&p, &[script.to_str().unwrap()]);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
}
