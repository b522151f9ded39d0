//! `corral doctor`: what this host can enforce, and whether each known profile is fully
//! enforceable here.

use serde_json::json;

use crate::config::Config;
use crate::sandbox::plan::check_host;
use crate::sandbox::{cgroup::Version, HostSupport};

/// Prints the report; returns 0 when every profile is enforceable (or opted into best effort
/// with only covered degradations), 1 otherwise.
pub fn run(config: &Config, as_json: bool) -> crate::Result<i32> {
    let host = HostSupport::probe_for(&config.sandbox);
    let mut profiles = Vec::new();
    let mut all_ok = true;
    for name in config.profiles.names() {
        let p = config.profiles.resolve(name)?;
        let d = check_host(&p, &host, false);
        let fatal: Vec<String> = d
            .iter()
            .filter(|x| !x.covered)
            .map(ToString::to_string)
            .collect();
        let notes: Vec<String> = d
            .iter()
            .filter(|x| x.covered)
            .map(ToString::to_string)
            .collect();
        let status = if fatal.is_empty() {
            "enforceable"
        } else if p.enforcement == crate::profile::schema::Enforcement::BestEffort {
            "degraded (best effort)"
        } else {
            all_ok = false;
            "not enforceable"
        };
        profiles.push(json!({"name": name, "origin": p.origin, "status": status, "missing": fatal, "notes": notes}));
    }
    let cg = &host.cgroups;
    let version = |h: &Option<crate::sandbox::cgroup::Hierarchy>| match h {
        Some(h) if h.version == Version::V1 => "v1",
        Some(_) => "v2",
        None => "missing",
    };
    let gpu_nodes = crate::sandbox::gpu::classify(&host.gpu_devices);
    let driver = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|v| v.lines().next().map(str::to_string));
    let gpu = json!({
        "devices": host.gpu_devices,
        "gpus": gpu_nodes.as_ref().map(|n| n.gpus.iter().map(|(i, _)| *i).collect::<Vec<_>>()).unwrap_or_default(),
        "usable": gpu_nodes.is_ok(),
        "problem": gpu_nodes.as_ref().err(),
        "driver": driver,
        "memory_caps": "advisory: the kernel cannot cap GPU memory; Shared.max_memory_mb is passed as CORRAL_GPU_MEMORY_MB",
    });
    let report = json!({
        "kernel": host.kernel,
        "arch": host.arch,
        "root": host.is_root,
        "landlock_abi": host.landlock_abi,
        "seccomp": host.seccomp,
        "user_namespaces": host.user_namespaces,
        "cgroups": {
            "memory": version(&cg.memory), "cpu": version(&cg.cpu), "pids": version(&cg.pids), "io": version(&cg.io),
            "cgroup2_mount": cg.v2_mount,
        },
        "mount_setattr": host.mount_setattr,
        "openat2": host.openat2,
        "pidfd": host.pidfd,
        "device_cgroup": cg.devices_supported(),
        "gpu": gpu,
        "profiles": profiles,
    });
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return Ok(if all_ok { 0 } else { 1 });
    }
    let yn = |b: bool| if b { "yes" } else { "NO" };
    println!("host");
    println!("  kernel           {} ({})", host.kernel, host.arch);
    println!("  running as root  {}", yn(host.is_root));
    println!(
        "  landlock         {}",
        host.landlock_abi
            .map_or("NO (not enabled)".to_string(), |a| format!("ABI {a}"))
    );
    println!("  seccomp          {}", yn(host.seccomp));
    println!("  user namespaces  {}", yn(host.user_namespaces));
    println!(
        "  cgroups          {}{}",
        cg.describe(),
        cg.v2_mount
            .as_ref()
            .map(|m| format!(" (cgroup2 at {})", m.display()))
            .unwrap_or_default()
    );
    println!("  mount_setattr    {}", yn(host.mount_setattr));
    println!("  openat2          {}", yn(host.openat2));
    println!("  pidfd            {}", yn(host.pidfd));
    println!(
        "  device cgroup    {}",
        cg.devices_supported()
            .unwrap_or("NO (GPU profiles rely on the minimal /dev alone)")
    );
    if host.gpu_devices.is_empty() {
        println!("  gpu devices      none");
    } else {
        println!(
            "  gpu devices      {}",
            host.gpu_devices
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    match &gpu_nodes {
        Ok(n) => println!(
            "  gpus             {} (Shared: all not held exclusively; Exclusive: one each){}",
            n.gpus
                .iter()
                .map(|(i, _)| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            report["gpu"]["driver"]
                .as_str()
                .map(|d| format!("; {d}"))
                .unwrap_or_default()
        ),
        Err(why) if !host.gpu_devices.is_empty() => {
            println!("  gpus             NOT usable: {why}")
        }
        Err(_) => {}
    }
    println!("profiles");
    for p in report["profiles"].as_array().into_iter().flatten() {
        println!(
            "  {:<12} {:<24} {}",
            p["name"].as_str().unwrap_or_default(),
            p["status"].as_str().unwrap_or_default(),
            p["origin"].as_str().unwrap_or_default()
        );
        for m in p["missing"].as_array().into_iter().flatten() {
            println!("      missing: {}", m.as_str().unwrap_or_default());
        }
        for n in p["notes"].as_array().into_iter().flatten() {
            println!("      note:    {}", n.as_str().unwrap_or_default());
        }
    }
    Ok(if all_ok { 0 } else { 1 })
}
