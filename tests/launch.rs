#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Launches that never deadlock or hang, and the design's own profiles launching as written.
//!
//! - hundreds of launches from a process whose threads keep coming and going all finish (a
//!   glibc `setgroups` in the cloned child used to wait forever for such a thread);
//! - a child stuck before `execve` is killed at the launch deadline, the error names its step,
//!   and its cgroups are gone;
//! - the design's `secure` and `standard` profiles, verbatim (tests/fixtures/profiles/), run
//!   programs, from a file and inline in corral.toml;
//! - a denied path that hides what a program needs to start is refused by name, before any
//!   clone, by `sandbox exec` and by `profile check` alike.

mod common;

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use corral::profile::ProfileRegistry;
use corral::sandbox::{self, HostSupport, SandboxConfig, SandboxError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/profiles")
        .join(name)
}

fn command(argv: &[&str]) -> sandbox::Command {
    sandbox::Command {
        argv: argv.iter().map(Into::into).collect(),
        ..sandbox::Command::default()
    }
}

/// Runs `argv` under `profile` (a name or path) through the library; returns the exit code.
fn launch_and_wait(
    profile: &corral::profile::Profile,
    argv: &[&str],
    cfg: &SandboxConfig,
    host: &HostSupport,
) -> Result<i32, SandboxError> {
    let mut sb = sandbox::launch(profile, &command(argv), cfg, host)?;
    Ok(sb.wait()?.exit_code())
}

#[test]
fn hundreds_of_launches_from_a_process_whose_threads_come_and_go_all_finish() {
    let _turn = IN_PROCESS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let profile = ProfileRegistry::builtin().resolve("secure").unwrap();
    let cfg = SandboxConfig::default();
    let host = HostSupport::probe_for(&cfg);
    // Threads created and destroyed all the time: glibc's thread list is mid-change at many
    // of the clones below, which is what made a broadcasting setgroups wait forever.
    let stop = Arc::new(AtomicBool::new(false));
    let churn: Vec<_> = (0..6)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let h = std::thread::spawn(|| std::hint::black_box(vec![0u8; 4096]).len());
                    n += h.join().unwrap() as u64;
                }
                n
            })
        })
        .collect();
    const LAUNCHES: usize = 400;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..LAUNCHES {
            let r = launch_and_wait(&profile, &["/bin/true"], &cfg, &host);
            if tx.send((i, r.map_err(|e| e.to_string()))).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut failures = Vec::new();
    for _ in 0..LAUNCHES {
        // Each launch is bounded by its own deadline (5 s); a hang past that is the old bug.
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok((_, Ok(0))) => {}
            Ok((i, other)) => failures.push(format!("launch {i}: {other:?}")),
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                panic!(
                    "a launch has not finished for 60 s after {:?}: the sandbox launch hangs",
                    started.elapsed()
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let threads: u64 = churn.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(
        failures.is_empty(),
        "{} of {LAUNCHES} launches failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(threads > 1000, "the churn threads barely ran ({threads})");
    eprintln!(
        "{LAUNCHES} launches in {:?} beside {} short-lived threads",
        started.elapsed(),
        threads / 4096
    );
}

/// The two tests that launch sandboxes from this process take turns: the stuck-child test
/// stops the first sandbox child it sees, which must be its own.
static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_child_stuck_before_exec_is_killed_at_the_deadline_naming_its_step() {
    let _turn = IN_PROCESS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let profile = ProfileRegistry::builtin().resolve("secure").unwrap();
    let cfg = SandboxConfig {
        launch_timeout: Duration::from_millis(1500),
        ..SandboxConfig::default()
    };
    let host = HostSupport::probe_for(&cfg);
    // A watcher stops the sandbox's first process (SIGSTOP) as soon as it appears, which holds
    // it at whatever setup step it reached. Stopping it in time is a race the watcher usually
    // wins within a few attempts; the launch itself takes ~10 ms.
    for attempt in 0..20 {
        let before = sandbox_children("self");
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let done = done.clone();
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if let Some(pid) = sandbox_children("self")
                        .into_iter()
                        .find(|p| !before.contains(p))
                    {
                        // SAFETY: stops our own child.
                        unsafe { libc::kill(pid, libc::SIGSTOP) };
                        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                            .unwrap_or_default();
                        return Some((pid, cgroups));
                    }
                }
                None
            })
        };
        let started = Instant::now();
        let r = sandbox::launch(&profile, &command(&["/bin/sleep", "30"]), &cfg, &host);
        done.store(true, Ordering::Relaxed);
        let stopped = watcher.join().unwrap();
        let err = match r {
            Ok(mut sb) => {
                // Stopped only after execve: not the case under test. End it and try again.
                sb.kill();
                let _ = sb.wait();
                continue;
            }
            Err(e) => e,
        };
        let (pid, cgroups) = stopped.expect("the launch failed but no child was seen");
        let text = err.to_string();
        assert!(
            matches!(err, SandboxError::LaunchTimeout { .. }),
            "attempt {attempt}: expected a launch timeout, got: {text}"
        );
        assert!(
            text.contains("timed out after")
                && text.contains(" while ")
                && text.contains("launch_timeout_seconds"),
            "the error names the step and the setting: {text}"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
            "the deadline is 1.5 s, the launch failed after {took:?}"
        );
        // Killed and reaped: no process, no zombie.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the stuck child {pid} is still there"
        );
        // Its cgroups (the v1 ones it joined, if it got that far) are removed.
        for line in cgroups.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            let (Some(controllers), Some(path)) = (controllers, path) else {
                continue;
            };
            if !path.contains("/corral/") {
                continue;
            }
            let ctl = controllers.split(',').next().unwrap_or_default();
            let dir = if ctl.is_empty() {
                PathBuf::from(format!("/sys/fs/cgroup/unified{path}"))
            } else {
                PathBuf::from(format!("/sys/fs/cgroup/{ctl}{path}"))
            };
            assert!(!dir.exists(), "cgroup {} left behind", dir.display());
        }
        return;
    }
    panic!("the watcher never stopped a child before its execve in 20 attempts");
}

/// The host directories the design's `secure` profile names: /tmp/sandbox (read) and
/// /tmp/sandbox/output (write, so owned by the sandbox user).
fn secure_dirs() {
    std::fs::create_dir_all("/tmp/sandbox/output").unwrap();
    std::fs::set_permissions("/tmp/sandbox", std::fs::Permissions::from_mode(0o755)).unwrap();
    chown("/tmp/sandbox/output", Some(SANDBOX_UID), Some(SANDBOX_UID)).unwrap();
}

/// /home/sandbox for the design's `standard` profile (a write path: owned by the sandbox user).
fn standard_dirs() {
    std::fs::create_dir_all("/home/sandbox").unwrap();
    chown("/home/sandbox", Some(SANDBOX_UID), Some(SANDBOX_UID)).unwrap();
}

/// A statically linked program built with the C compiler the Rust toolchain links with.
fn static_hello(dir: &Path) -> PathBuf {
    let src = dir.join("hello.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(void){puts(\"static hello\");return 0;}\n",
    )
    .unwrap();
    let exe = dir.join("hello-static");
    let out = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("cc (the Rust toolchain's linker) is needed for this test");
    assert!(out.status.success(), "cc -static: {}", stderr(&out));
    exe
}

#[test]
fn the_design_secure_profile_runs_dynamic_and_static_programs() {
    secure_dirs();
    let s = Scratch::new();
    let p = fixture("secure.toml");
    let out = exec(&p, &["/bin/echo", "hi"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    let hello = static_hello(s.dir.path());
    let out = exec(&p, &[hello.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "static hello\n");

    // What it denies stays denied: /etc is not there (the loader ran without its cache).
    let out = exec(&p, &["/bin/cat", "/etc/hostname"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "read /etc/hostname under secure"
    );
    assert!(out.stdout.is_empty());
    // The write path works.
    let name = format!("corral-{}", std::process::id());
    let target = format!("/tmp/sandbox/output/{name}");
    let out = exec(&p, &["/bin/touch", &target]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        Path::new(&target).exists(),
        "the write did not reach the host"
    );
    std::fs::remove_file(&target).unwrap();
}

#[test]
fn the_design_standard_profile_runs_a_pipeline() {
    standard_dirs();
    let p = fixture("standard.toml");
    let out = exec(&p, &["/bin/sh", "-c", "echo x | cat; echo $HTTPS_PROXY"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("x"), "{text}");
    assert_eq!(
        lines.next(),
        Some("http://127.0.0.1:3128"),
        "Restricted network goes through the egress proxy: {text}"
    );
    // Denied files stay hidden even though children may exec what /usr/bin holds.
    let out = exec(&p, &["/bin/sh", "-c", "cat /etc/shadow || echo refused"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "refused");
    // Writing to /home/sandbox reaches the host.
    let marker = format!("corral-{}", std::process::id());
    let out = exec(
        &p,
        &[
            "/bin/sh",
            "-c",
            &format!("echo ok > /home/sandbox/{marker}"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let host_file = Path::new("/home/sandbox").join(&marker);
    assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "ok\n");
    std::fs::remove_file(host_file).unwrap();
}

#[test]
fn the_design_profiles_pass_config_check_inline_and_launch_from_it() {
    secure_dirs();
    standard_dirs();
    let dir = tempfile::tempdir().unwrap();
    let mut profiles = toml::Table::new();
    for (name, file) in [("secure", "secure.toml"), ("standard", "standard.toml")] {
        let text = std::fs::read_to_string(fixture(file)).unwrap();
        let t: toml::Table = toml::from_str(&text).unwrap();
        profiles.insert(name.into(), toml::Value::Table(t));
    }
    let mut slm = toml::Table::new();
    slm.insert("sandbox_profiles".into(), toml::Value::Table(profiles));
    let mut root = toml::Table::new();
    root.insert("slm".into(), toml::Value::Table(slm));
    let config = dir.path().join("corral.toml");
    std::fs::write(&config, toml::to_string(&root).unwrap()).unwrap();
    let run = |args: &[&str]| {
        Command::new(corral())
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&[
        "sandbox",
        "exec",
        "-p",
        "secure",
        "--",
        "/bin/echo",
        "inline",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "inline\n");
    let out = run(&[
        "sandbox",
        "exec",
        "-p",
        "standard",
        "--",
        "/bin/sh",
        "-c",
        "echo y | cat",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "y\n");
    // profile check plans both here, and notes the read/write overlap of `standard`.
    let out = run(&["profile", "check", "secure", "standard", "--", "/bin/echo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    assert!(text.contains("launch of `/bin/echo` planned"), "{text}");
    assert!(
        text.contains("filesystem.write_paths[0] '/tmp' is also filesystem.read_paths[0]"),
        "{text}"
    );
}

/// A program linked against a library of its own in `dir/lib` (found through DT_RUNPATH).
fn program_with_own_library(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    std::fs::write(dir.join("lib.c"), "int corral_answer(void){return 42;}\n").unwrap();
    std::fs::write(
        dir.join("main.c"),
        "#include <stdio.h>\nint corral_answer(void);\nint main(void){printf(\"%d\\n\",corral_answer());return 0;}\n",
    )
    .unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(dir.join("lib/libcorralanswer.so"))
        .arg(dir.join("lib.c"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cc -shared: {}", stderr(&out));
    let exe = dir.join("answer");
    let out = Command::new("cc")
        .arg("-o")
        .arg(&exe)
        .arg(dir.join("main.c"))
        .arg(format!("-L{}", dir.join("lib").display()))
        .args([
            "-lcorralanswer",
            "-Wl,--enable-new-dtags,-rpath,$ORIGIN/lib",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "cc: {}", stderr(&out));
    for p in [dir.to_path_buf(), dir.join("lib")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    exe
}

#[test]
fn a_denied_path_hiding_what_a_program_needs_is_named_before_any_clone() {
    let s = Scratch::new();
    let exe = program_with_own_library(&s.path("app"));
    let allowed = s.profile("app-ok", "");
    let out = exec(&allowed, &[exe.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");

    let lib_dir = s.path("app/lib");
    let denied = s.profile(
        "app-denied",
        &format!(
            "[filesystem]\ndenied_paths = [\"/srv/nothing-here\", \"{}/*\"]\n",
            lib_dir.display()
        ),
    );
    let out = exec(&denied, &[exe.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains(&format!(
            "filesystem.denied_paths[1] ('{}') hides {}/libcorralanswer.so",
            lib_dir.display(),
            lib_dir.display()
        )) && err.contains(&format!("a shared library {} needs", exe.display())),
        "the error names the denied path, the library and the program: {err}"
    );
    assert!(!err.contains("Permission denied"), "{err}");

    // The command itself under a denied path.
    let denied_app = s.profile(
        "app-denied-2",
        &format!(
            "[filesystem]\ndenied_paths = [\"{}\"]\n",
            s.path("app").display()
        ),
    );
    let out = exec(&denied_app, &[exe.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("the command itself"), "{err}");

    // The loader's cache is optional: denying /etc leaves dynamic programs running.
    let no_etc = s.profile("no-etc", "[filesystem]\ndenied_paths = [\"/etc\"]\n");
    let out = exec(&no_etc, &["/bin/echo", "still"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // `profile check` says the same before anything runs.
    let out = corral_with(&[
        "profile",
        "check",
        denied.to_str().unwrap(),
        "--",
        exe.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("invalid") && text.contains("libcorralanswer.so"),
        "{text}"
    );
    let out = corral_with(&[
        "profile",
        "check",
        allowed.to_str().unwrap(),
        "--",
        exe.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn profile_check_refuses_what_a_launch_would_refuse_naming_the_key() {
    let s = Scratch::new();
    let missing = s.profile(
        "missing-write",
        &format!(
            "[filesystem]\nwrite_paths = [\"{}\"]\n",
            s.path("not-there").display()
        ),
    );
    let out = corral_with(&["profile", "check", missing.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("filesystem.write_paths[0]") && text.contains("does not exist"),
        "{text}"
    );
    // The launch says the same.
    let out = exec(&missing, &["/bin/true"]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("filesystem.write_paths[0]"),
        "{}",
        stderr(&out)
    );
    // A command that is not there.
    let ok = s.profile("fine", "");
    let out = corral_with(&[
        "profile",
        "check",
        ok.to_str().unwrap(),
        "--",
        "/no/such/cmd",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("command not found"), "{text}");
}
