//! `corral profile check` and `corral profile show`.

use serde_json::json;

use crate::config::Config;
use crate::profile::Profile;
use crate::sandbox::{plan::check_host, seccomp, HostSupport};

/// Validates the named profiles (all known ones when `names` is empty). Returns 0 when all are
/// valid, 1 otherwise; host-enforceability problems are printed as warnings.
pub fn check(config: &Config, names: &[String]) -> crate::Result<i32> {
    let names: Vec<String> = if names.is_empty() {
        config.profiles.names().map(str::to_string).collect()
    } else {
        names.to_vec()
    };
    let host = HostSupport::probe_for(&config.sandbox);
    let mut failed = 0;
    for name in &names {
        match config.profiles.resolve(name) {
            Ok(p) => {
                println!("ok       {name} ({})", p.origin);
                for d in check_host(&p, &host, false).iter().filter(|d| !d.covered) {
                    println!("         warning: not enforceable on this host: {d}");
                }
            }
            Err(e) => {
                failed += 1;
                println!("invalid  {name}: {e}");
            }
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
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
