#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Sandbox launch cost: `/bin/true` under the built-in `secure` profile, through the library
//! (plan, cgroups, clone, mounts, Landlock, seccomp, exec, wait, cleanup), with a per-phase
//! breakdown. The comparison with bubblewrap is `scripts/bench-sandbox.sh`.
//!
//! `cargo bench --bench sandbox_launch` (needs root).

use std::time::{Duration, Instant};

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
    let mut t = [Duration::ZERO; 4];
    for _ in 0..n {
        let t0 = Instant::now();
        let p = plan::plan(&profile, &cmd, &host, &cfg).expect("plan");
        let t1 = Instant::now();
        let mut sb = launch::spawn(&p, &cfg, &host, [None, None, None]).expect("spawn");
        let t2 = Instant::now();
        sb.wait_until(None).expect("wait");
        let t3 = Instant::now();
        drop(sb);
        let t4 = Instant::now();
        for (acc, d) in t.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
            *acc += d;
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / n as f64;
    eprintln!(
        "phases (mean of {n}): plan {:.2} ms | cgroups + clone + namespaces + mounts + landlock + seccomp + exec {:.2} ms | run + exit + cgroup removal {:.2} ms | drop {:.2} ms",
        ms(t[0]), ms(t[1]), ms(t[2]), ms(t[3])
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
