//! `corral profile check` and `corral profile show`.

use serde_json::json;

use crate::config::Config;
use crate::profile::Profile;
use crate::sandbox::plan::{self, FsOp, Plan};
use crate::sandbox::{seccomp, Command, HostSupport};

/// Validates the named profiles (all known ones when `names` is empty) and plans the launch of
/// `command` (default `/bin/true`) under each on this host, short of cloning: a profile that
/// checks ok launches here. Returns 0 when all pass, 1 otherwise.
pub fn check(
    config: &Config,
    names: &[String],
    command: &[std::ffi::OsString],
) -> crate::Result<i32> {
    let names: Vec<String> = if names.is_empty() {
        config.profiles.names().map(str::to_string).collect()
    } else {
        names.to_vec()
    };
    let argv: Vec<std::ffi::OsString> = if command.is_empty() {
        vec!["/bin/true".into()]
    } else {
        command.to_vec()
    };
    let cmd = Command {
        argv: argv.clone(),
        ..Command::default()
    };
    let shown = argv
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let host = HostSupport::probe_for(&config.sandbox);
    let mut failed = 0;
    for name in &names {
        let p = match config.profiles.resolve(name) {
            Ok(p) => p,
            Err(e) => {
                failed += 1;
                println!("invalid  {name}: {e}");
                continue;
            }
        };
        match plan::plan(&p, &cmd, &host, &config.sandbox) {
            Ok(plan) => {
                println!("ok       {name} ({})", p.origin);
                println!("         launch of `{shown}` planned: {}", summary(&plan));
                for d in plan.degradations.iter().filter(|d| !d.covered) {
                    println!("         warning: not enforced on this host (best effort): {d}");
                }
            }
            Err(e) => {
                failed += 1;
                println!(
                    "invalid  {name} ({}): cannot launch `{shown}` here: {e}",
                    p.origin
                );
            }
        }
        for note in &p.notes {
            println!("         note: {note}");
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// One line about a plan: what the sandbox will hold and which layers are on.
fn summary(plan: &Plan) -> String {
    let binds = plan
        .fs_ops
        .iter()
        .filter(|op| matches!(op, FsOp::Bind { .. }))
        .count();
    let masks = plan
        .fs_ops
        .iter()
        .filter(|op| matches!(op, FsOp::MaskDir { .. } | FsOp::MaskFile { .. }))
        .count();
    let landlock = plan
        .landlock
        .as_ref()
        .map_or("Landlock off".to_string(), |(_, r)| {
            format!("{} Landlock rules", r.len())
        });
    let seccomp = if plan.seccomp.is_some() {
        "seccomp on"
    } else {
        "seccomp off"
    };
    format!(
        "{binds} binds, {masks} masks, {landlock}, {seccomp}, network {}",
        if plan.egress.is_some() {
            "through the egress proxy"
        } else if plan.new_netns {
            "none"
        } else {
            "host"
        }
    )
}

/// The effective profile: merged onto its base, validated, with the limits it implies.
pub fn show(config: &Config, name: &str, as_json: bool) -> crate::Result<i32> {
    let p = config.profiles.resolve(name)?;
    let derived = derived(&p);
    if as_json {
        let v = json!({"name": p.name, "origin": p.origin, "profile": p.raw, "derived": derived});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(0);
    }
    println!(
        "# profile '{}' from {}, as enforced (merged onto its base)",
        p.name, p.origin
    );
    for (k, v) in derived.as_object().into_iter().flatten() {
        println!("# {k}: {v}");
    }
    print!("{}", toml::to_string_pretty(&p.raw).unwrap_or_default());
    Ok(0)
}

fn derived(p: &Profile) -> serde_json::Value {
    let mode = if p.strict_syscall_filtering {
        format!(
            "allow-list: {} base + {} extra syscalls",
            seccomp::generic_base().len(),
            p.allowed_syscalls.len()
        )
    } else {
        "deny-list of dangerous syscalls".to_string()
    };
    json!({
        "threads_told": p.thread_count(),
        "cgroup_pids_max": p.pids_limit(),
        "cpu_quota": format!("{:.0} ms per 100 ms", p.max_cpu_cores * 100.0),
        "seccomp": mode,
        "tmp": if p.allow_temp_files { format!("private tmpfs of {} MiB", p.max_disk_mb) } else { "none".into() },
    })
}
