//! corral's seccomp filters against Firecracker's `seccompiler` (0.5) compiling the same
//! reviewed tables (docs/sandbox.md, "The design card's crates"):
//!
//! - instructions the kernel runs to decide one call (counted with corral's evaluator), per call
//!   and over the whole allow-list;
//! - the real cost of a call under each filter: a forked process installs the filter and times
//!   a tight loop of cheap calls (`read(-1)`, `getppid`, `getrandom(len 0)`: numbers 0, 110 and
//!   318, early, middle and late in a linear chain), against the same loop unfiltered;
//! - an x32 call (`__X32_SYSCALL_BIT | ptrace`) through each deny-list filter.
//!
//! The seccompiler programs carry no argument conditions (corral's carry clone, socket and ioctl
//! checks), so its numbers are a lower bound on what it would cost with them.
//!
//! `cargo bench --bench seccomp_peer` (Linux x86_64; no root needed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Instant;

use corral::profile::schema::DeniedAction;
use corral::sandbox::seccomp::{self, Base, FilterSpec, SockFilter};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_BIT: u32 = 0x4000_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

fn peer(calls: &[i64], match_action: SeccompAction, mismatch: SeccompAction) -> Vec<SockFilter> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = calls.iter().map(|n| (*n, vec![])).collect();
    let f = SeccompFilter::new(rules, mismatch, match_action, TargetArch::x86_64).unwrap();
    let prog: BpfProgram = f.try_into().unwrap();
    prog.iter()
        .map(|i| SockFilter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

/// Nanoseconds per call of `nr(a0, a1, a2)` in a forked process under `filter` (median of 5).
fn ns_per_call(filter: Option<&[SockFilter]>, nr: i64, a: [i64; 3]) -> f64 {
    const N: u64 = 400_000;
    let mut runs = Vec::new();
    for _ in 0..5 {
        let mut fds = [0i32; 2];
        // SAFETY: a plain pipe2 into a local array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the bench is single-threaded; the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: the filter outlives the call; prctl and seccomp take plain arguments.
            unsafe {
                if let Some(f) = filter {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    let prog = libc::sock_fprog {
                        len: f.len() as u16,
                        filter: f.as_ptr() as *mut libc::sock_filter,
                    };
                    if libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const _) != 0 {
                        libc::_exit(2);
                    }
                }
                let t = Instant::now();
                for _ in 0..N {
                    libc::syscall(nr, a[0], a[1], a[2]);
                }
                let ns = t.elapsed().as_nanos() as f64 / N as f64;
                libc::write(fds[1], (&ns as *const f64).cast(), 8);
                libc::_exit(0);
            }
        }
        let mut ns = 0f64;
        // SAFETY: reading 8 bytes into a local f64; waiting for our own child.
        unsafe {
            libc::close(fds[1]);
            assert_eq!(libc::read(fds[0], (&mut ns as *mut f64).cast(), 8), 8);
            libc::close(fds[0]);
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
        }
        runs.push(ns);
    }
    runs.sort_by(f64::total_cmp);
    runs[2]
}

fn main() {
    // Allow-list mode: the generic table.
    let strict = seccomp::compile(&FilterSpec {
        base: Base::Generic,
        strict: true,
        extra: vec![],
        allow_processes: true,
        denied_action: DeniedAction::Errno,
    });
    let allowed: Vec<i64> = seccomp::generic_base()
        .iter()
        .map(|(s, _)| i64::from(s.id()))
        .collect();
    let peer_strict = peer(
        &allowed,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    );
    // Deny-list mode: the reviewed deny table.
    let loose = seccomp::compile(&FilterSpec {
        base: Base::Generic,
        strict: false,
        extra: vec![],
        allow_processes: true,
        denied_action: DeniedAction::Errno,
    });
    let denied: Vec<i64> = seccomp::deny_base()
        .iter()
        .map(|s| i64::from(s.id()))
        .collect();
    let peer_loose = peer(
        &denied,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    );

    let steps = |prog: &[SockFilter], nr: i64| {
        seccomp::evaluate_counted(prog, AUDIT_ARCH_X86_64, nr as u32, [0; 6])
    };
    // Both allow what the table allows.
    for n in &allowed {
        assert_eq!(
            steps(&peer_strict, *n).0,
            RET_ALLOW,
            "seccompiler, call {n}"
        );
    }
    println!(
        "program length (instructions): allow-list corral {} · seccompiler {}; deny-list corral {} · seccompiler {}",
        strict.len(),
        peer_strict.len(),
        loose.len(),
        peer_loose.len()
    );
    let over = |prog: &[SockFilter], calls: &[i64]| {
        let v: Vec<usize> = calls.iter().map(|n| steps(prog, *n).1).collect();
        (
            v.iter().sum::<usize>() as f64 / v.len() as f64,
            *v.iter().max().unwrap(),
        )
    };
    let (cm, cx) = over(&strict, &allowed);
    let (pm, px) = over(&peer_strict, &allowed);
    println!(
        "allow-list, instructions run per allowed call over its {} calls: corral mean {cm:.1} max {cx} · seccompiler mean {pm:.1} max {px} ({:.1}x)",
        allowed.len(),
        pm / cm
    );
    println!("\n| call | corral instructions | seccompiler instructions |\n| --- | --- | --- |");
    for (name, nr) in [
        ("read", libc::SYS_read),
        ("write", libc::SYS_write),
        ("mmap", libc::SYS_mmap),
        ("getppid", libc::SYS_getppid),
        ("futex", libc::SYS_futex),
        ("openat", libc::SYS_openat),
        ("getrandom", libc::SYS_getrandom),
    ] {
        println!(
            "| {name} ({nr}) | {} | {} |",
            steps(&strict, nr).1,
            steps(&peer_strict, nr).1
        );
    }

    // x32: the same number with the x32 bit, through each deny-list filter.
    let x32_ptrace = X32_BIT | libc::SYS_ptrace as u32;
    let verdict = |prog: &[SockFilter]| match seccomp::evaluate(
        prog,
        AUDIT_ARCH_X86_64,
        x32_ptrace,
        [0; 6],
    ) {
        RET_ALLOW => "allowed",
        0x8000_0000 => "process killed",
        r if r & 0xffff_0000 == 0x0005_0000 => "refused (errno)",
        _ => "other",
    };
    println!(
        "\nx32 ptrace (nr {x32_ptrace:#x}) through the deny-list filter: corral {} · seccompiler {}",
        verdict(&loose),
        verdict(&peer_loose)
    );

    println!("\nns per call, tight loop in a forked process (median of 5 runs of 400k calls):\n\n| call | no filter | corral | seccompiler | seccompiler / corral |\n| --- | --- | --- | --- | --- |");
    for (name, nr, args) in [
        ("read(-1)", libc::SYS_read, [-1, 0, 0]),
        ("getppid", libc::SYS_getppid, [0, 0, 0]),
        ("getrandom(len 0)", libc::SYS_getrandom, [0, 0, 0]),
    ] {
        let none = ns_per_call(None, nr, args);
        let ours = ns_per_call(Some(&strict), nr, args);
        let theirs = ns_per_call(Some(&peer_strict), nr, args);
        println!(
            "| {name} | {none:.0} | {ours:.0} | {theirs:.0} | {:.2} |",
            theirs / ours
        );
    }
}
