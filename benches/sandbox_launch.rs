#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Sandbox launch cost: `/bin/true` under the built-in `secure` profile, through the library
//! (plan, cgroups, clone, mounts, Landlock, seccomp, exec, wait, cleanup), with a per-phase
//! breakdown. The comparison with bubblewrap is `scripts/bench-sandbox.sh`.
//!
//! `cargo bench --bench sandbox_launch` (needs root).

use std::time::Instant;

use corral::profile::ProfileRegistry;
use corral::sandbox::{launch, plan, HostSupport, SandboxConfig};
use criterion::{criterion_group, criterion_main, Criterion};

/// `/bin/true` under the built-in secure profile on this host.
fn setup() -> (
    corral::profile::Profile,
    HostSupport,
    SandboxConfig,
    plan::Command,
) {
    let profile = ProfileRegistry::builtin()
        .resolve("secure")
        .expect("secure profile");
    let cmd = plan::Command {
        argv: vec!["/bin/true".into()],
        ..plan::Command::default()
    };
    (profile, HostSupport::probe(), SandboxConfig::default(), cmd)
}

fn phases(n: usize) {
    let (profile, host, cfg, cmd) = setup();
    // plan, clone + namespaces, cgroups (overlapping root), root, exec, run + reap, cgroup removal
    let mut t = [0f64; 7];
    for _ in 0..n {
        let t0 = Instant::now();
        let p = plan::plan(&profile, &cmd, &host, &cfg).expect("plan");
        let t1 = Instant::now();
        let mut sb = launch::spawn(&p, &cfg, &host, [None, None, None]).expect("spawn");
        let t2 = Instant::now();
        sb.wait_until(None).expect("wait");
        let t3 = Instant::now();
        let l = sb.times();
        let run = (t3 - t2).saturating_sub(l.cgroup_removal);
        for (acc, d) in t.iter_mut().zip([
            t1 - t0,
            l.clone,
            l.cgroups,
            l.root,
            l.exec,
            run,
            l.cgroup_removal,
        ]) {
            *acc += d.as_secs_f64() * 1e3 / n as f64;
        }
    }
    eprintln!(
        "phases (mean of {n}, ms): plan {:.2} | clone + namespaces {:.2} | cgroups create {:.2} (overlaps root) | root: mounts + pivot + cgroup join {:.2} | uid maps + landlock + seccomp + execve {:.2} | run + reap {:.2} | cgroup removal {:.2}",
        t[0], t[1], t[2], t[3], t[4], t[5], t[6]
    );
}

fn bench(c: &mut Criterion) {
    phases(50);
    let (profile, host, cfg, cmd) = setup();
    let mut g = c.benchmark_group("sandbox");
    g.sample_size(50);
    g.bench_function("plan secure /bin/true", |b| {
        b.iter(|| plan::plan(&profile, &cmd, &host, &cfg).expect("plan"))
    });
    g.bench_function("launch secure /bin/true", |b| {
        b.iter(|| {
            let p = plan::plan(&profile, &cmd, &host, &cfg).expect("plan");
            let mut sb = launch::spawn(&p, &cfg, &host, [None, None, None]).expect("spawn");
            sb.wait_until(None).expect("wait");
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
