//! seccomp-BPF programs built from the reviewed tables in `profiles/seccomp/`.
//!
//! The program is compiled in the supervisor before `fork` and only installed by the child.
//! Layout, in order:
//!
//! 1. architecture check: anything but the native ABI is killed (no i386 `int 0x80` calls);
//! 2. x32 check on x86_64: syscall numbers with `__X32_SYSCALL_BIT` are killed;
//! 3. special cases that inspect arguments (clone flags, ioctl requests, socket families);
//! 4. strict: `jeq nr, ret ALLOW` for each allowed call, then the default action (EPERM or kill);
//!    deny-list: `jeq nr, ret DENY` for each denied call, then ALLOW.
//!
//! Each comparison is a `jeq` followed by its own `ret`, so no jump ever needs more than one
//! instruction of offset and the program is valid whatever the table sizes.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use syscalls::Sysno;

use crate::profile::schema::DeniedAction;

const GENERIC: &str = include_str!("../../profiles/seccomp/generic.toml");
const RUNNER: &str = include_str!("../../profiles/seccomp/runner.toml");
const DENYLIST: &str = include_str!("../../profiles/seccomp/denylist.toml");

// Classic BPF opcodes (linux/bpf_common.h).
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const BPF_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const BPF_JGT_K: u16 = 0x05 | 0x20; // BPF_JMP | BPF_JGT | BPF_K
const BPF_JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const BPF_ALU_AND_K: u16 = 0x04 | 0x50; // BPF_ALU | BPF_AND | BPF_K
/// Never emitted here; the evaluator reads it (other compilers' long jumps).
const BPF_JA: u16 = 0x05; // BPF_JMP | BPF_JA

// struct seccomp_data offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const fn off_arg_lo(i: u32) -> u32 {
    16 + 8 * i // little-endian: low half first
}

pub const RET_ALLOW: u32 = 0x7fff_0000;
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const fn ret_errno(errno: i32) -> u32 {
    0x0005_0000 | (errno as u32 & 0xffff)
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: Option<u32> = Some(0x4000_0000);
#[cfg(target_arch = "aarch64")]
const X32_SYSCALL_BIT: Option<u32> = None;

const CLONE_THREAD: u32 = 0x0001_0000;
/// Every CLONE_NEW* flag plus CLONE_NEWTIME (0x80).
const CLONE_NS_FLAGS: u32 = 0x0002_0000 // NEWNS
    | 0x0200_0000 // NEWCGROUP
    | 0x0400_0000 // NEWUTS
    | 0x0800_0000 // NEWIPC
    | 0x1000_0000 // NEWUSER
    | 0x2000_0000 // NEWPID
    | 0x4000_0000 // NEWNET
    | 0x0000_0080; // NEWTIME
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541c;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_TYPE_MASK: u32 = 0xf;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
/// Protocols INET/INET6 sockets may ask for: the type's default, TCP, UDP.
const INET_PROTOCOLS: [u32; 3] = [0, 6, 17];
const ALLOWED_FAMILIES: [u32; 4] = [
    1,  /* UNIX */
    2,  /* INET */
    10, /* INET6 */
    16, /* NETLINK */
];

/// One classic BPF instruction, laid out as `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const fn stmt(code: u16, k: u32) -> SockFilter {
    SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}
const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

/// The `name = "why"` entries of `[section]`, by name. The reviewed tables use a small subset of
/// TOML (section headers, comments, one basic string per key, no escapes), read here by hand: a
/// general TOML parser on every launch's path cost about 0.3 ms of the CLI's launch (a unit test
/// holds this reading to the toml crate's).
fn section_entries<'a>(text: &'a str, section: &str) -> BTreeMap<&'a str, &'a str> {
    let mut out = BTreeMap::new();
    let mut current = "";
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim();
            continue;
        }
        if current != section {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let why = value
            .strip_prefix('"')
            .and_then(|v| v.split_once('"'))
            .map_or("", |(why, _)| why);
        out.insert(key.trim(), why);
    }
    out
}

/// The system call named `name` on this architecture. `Sysno::from_str` compares the name with
/// each of the ~460 names in turn (about 1 µs a lookup); an index built once answers the
/// reviewed tables' ~500 lookups in a few µs.
pub fn sysno(name: &str) -> Option<Sysno> {
    static INDEX: OnceLock<std::collections::HashMap<&'static str, Sysno>> = OnceLock::new();
    INDEX
        .get_or_init(|| {
            // Every number in the table's range (`Sysno::iter` stops before the last call).
            (Sysno::first().id()..=Sysno::last().id())
                .filter_map(|id| usize::try_from(id).ok().and_then(Sysno::new))
                .map(|s| (s.name(), s))
                .collect()
        })
        .get(name)
        .copied()
}

fn parse_section(text: &'static str, section: &str) -> Vec<(Sysno, &'static str)> {
    section_entries(text, section)
        .into_iter()
        .filter_map(|(name, why)| {
            // Names the architecture lacks are skipped (documented in the table header).
            sysno(name).map(|s| (s, why))
        })
        .collect()
}

// Each table is read when first needed (a launch under the generic allow-list reads only
// that one: reading all four took ~0.15 ms of every CLI launch).
fn generic() -> &'static [(Sysno, &'static str)] {
    static T: OnceLock<Vec<(Sysno, &'static str)>> = OnceLock::new();
    T.get_or_init(|| parse_section(GENERIC, "syscalls"))
}

fn runner() -> &'static [(Sysno, &'static str)] {
    static T: OnceLock<Vec<(Sysno, &'static str)>> = OnceLock::new();
    T.get_or_init(|| parse_section(RUNNER, "syscalls"))
}

fn never() -> &'static BTreeMap<Sysno, &'static str> {
    static T: OnceLock<BTreeMap<Sysno, &'static str>> = OnceLock::new();
    T.get_or_init(|| parse_section(DENYLIST, "never").into_iter().collect())
}

fn denied() -> &'static BTreeMap<Sysno, &'static str> {
    static T: OnceLock<BTreeMap<Sysno, &'static str>> = OnceLock::new();
    T.get_or_init(|| parse_section(DENYLIST, "denied").into_iter().collect())
}

/// Why `sysno` may never be added to a profile's allow-list, if it may not.
pub fn never_allowed(sysno: Sysno) -> Option<&'static str> {
    never().get(&sysno).copied()
}

/// The generic base set with the reason for each entry (for `corral profile show`, docs, tests).
pub fn generic_base() -> &'static [(Sysno, &'static str)] {
    generic()
}

/// Which reviewed allow-list a strict filter starts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Base {
    /// `generic.toml`: ordinary programs.
    #[default]
    Generic,
    /// `runner.toml`: corral-runner, the model worker.
    Runner,
}

/// What the filter must express for one launch.
#[derive(Debug, Clone)]
pub struct FilterSpec {
    pub base: Base,
    /// Allow-list (true) or deny-list (false).
    pub strict: bool,
    /// Extra calls: added to the allow-list, or removed from the deny-list's `[denied]` part.
    pub extra: Vec<Sysno>,
    /// Whether processes may be created (`max_child_processes > 0`).
    pub allow_processes: bool,
    pub denied_action: DeniedAction,
}

/// Compiles `spec` into a BPF program ready for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub fn compile(spec: &FilterSpec) -> Vec<SockFilter> {
    let deny = match spec.denied_action {
        DeniedAction::Errno => ret_errno(libc::EPERM),
        DeniedAction::Kill => RET_KILL_PROCESS,
    };
    let mut prog = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
    ];
    if let Some(bit) = X32_SYSCALL_BIT {
        prog.push(jump(BPF_JGE_K, bit, 0, 1));
        prog.push(stmt(BPF_RET_K, RET_KILL_PROCESS));
    }

    // clone: namespace flags never; processes only when allowed.
    let mut clone = vec![
        stmt(BPF_LD_W_ABS, off_arg_lo(0)),
        jump(BPF_JSET_K, CLONE_NS_FLAGS, 0, 1),
        stmt(BPF_RET_K, deny),
    ];
    if spec.allow_processes {
        clone.push(stmt(BPF_RET_K, RET_ALLOW));
    } else {
        clone.push(jump(BPF_JSET_K, CLONE_THREAD, 0, 1));
        clone.push(stmt(BPF_RET_K, RET_ALLOW));
        clone.push(stmt(BPF_RET_K, deny));
    }
    push_block(&mut prog, Sysno::clone, clone);
    push_ret(&mut prog, Sysno::clone3, ret_errno(libc::ENOSYS));
    for fork in ["fork", "vfork"] {
        if let Some(s) = sysno(fork) {
            push_ret(
                &mut prog,
                s,
                if spec.allow_processes {
                    RET_ALLOW
                } else {
                    deny
                },
            );
        }
    }
    // ioctl: no terminal input injection.
    push_block(
        &mut prog,
        Sysno::ioctl,
        vec![
            stmt(BPF_LD_W_ABS, off_arg_lo(1)),
            jump(BPF_JEQ_K, TIOCSTI, 0, 1),
            stmt(BPF_RET_K, deny),
            jump(BPF_JEQ_K, TIOCLINUX, 0, 1),
            stmt(BPF_RET_K, deny),
            stmt(BPF_RET_K, RET_ALLOW),
        ],
    );
    // socket families (a runner gets no sockets at all).
    for call in [Sysno::socket, Sysno::socketpair] {
        if spec.strict && spec.base == Base::Runner {
            push_ret(&mut prog, call, deny);
            continue;
        }
        // INET and INET6 sockets only with the protocols Landlock's TCP rules and the network
        // namespace reason about (default, TCP, UDP): not MPTCP (262), SCTP or UDP-Lite, which
        // Landlock's TCP port rules do not cover.
        let others: Vec<u32> = ALLOWED_FAMILIES
            .into_iter()
            .filter(|f| *f != AF_INET && *f != AF_INET6)
            .collect();
        let to_inet = 2 * others.len() as u8; // from the AF_INET6 test to the protocol check - 1
        let mut b = vec![
            stmt(BPF_LD_W_ABS, off_arg_lo(0)),
            jump(BPF_JEQ_K, AF_INET, to_inet + 2, 0),
            jump(BPF_JEQ_K, AF_INET6, to_inet + 1, 0),
        ];
        for fam in others {
            b.push(jump(BPF_JEQ_K, fam, 0, 1));
            b.push(stmt(BPF_RET_K, RET_ALLOW));
        }
        b.push(stmt(BPF_RET_K, deny));
        // The type must be a stream or datagram socket (flags such as SOCK_CLOEXEC aside): with
        // protocol 0, SOCK_SEQPACKET would select SCTP where its module is loaded.
        b.push(stmt(BPF_LD_W_ABS, off_arg_lo(1)));
        b.push(stmt(BPF_ALU_AND_K, SOCK_TYPE_MASK));
        b.push(jump(BPF_JEQ_K, SOCK_STREAM, 1, 0));
        b.push(jump(
            BPF_JEQ_K,
            SOCK_DGRAM,
            0,
            2 * INET_PROTOCOLS.len() as u8 + 1,
        ));
        b.push(stmt(BPF_LD_W_ABS, off_arg_lo(2)));
        for proto in INET_PROTOCOLS {
            b.push(jump(BPF_JEQ_K, proto, 0, 1));
            b.push(stmt(BPF_RET_K, RET_ALLOW));
        }
        b.push(stmt(BPF_RET_K, deny));
        push_block(&mut prog, call, b);
    }

    // Calls with their own blocks above return there; the lookup handles every other number.
    let special = special_numbers();
    if spec.strict {
        let base = match spec.base {
            Base::Generic => generic(),
            Base::Runner => runner(),
        };
        let mut allowed: Vec<Sysno> = base.iter().map(|(s, _)| *s).collect();
        allowed.extend(
            spec.extra
                .iter()
                .copied()
                .filter(|s| never_allowed(*s).is_none()),
        );
        let allowed: Vec<u32> = allowed.iter().map(|s| s.id() as u32).collect();
        prog.extend(lookup(&allowed, &special, RET_ALLOW, deny));
    } else {
        let mut denied: Vec<Sysno> = never().keys().copied().collect();
        denied.extend(
            self::denied()
                .keys()
                .copied()
                .filter(|s| !spec.extra.contains(s)),
        );
        let denied: Vec<u32> = denied.iter().map(|s| s.id() as u32).collect();
        prog.extend(lookup(&denied, &special, deny, RET_ALLOW));
    }
    prog
}

/// Numbers of the calls handled by their own blocks above the lookup, which never reach it:
/// they may join either side's ranges.
fn special_numbers() -> Vec<u32> {
    let mut v: Vec<u32> = [
        Sysno::clone,
        Sysno::clone3,
        Sysno::ioctl,
        Sysno::socket,
        Sysno::socketpair,
    ]
    .iter()
    .map(|s| s.id() as u32)
    .collect();
    for name in ["fork", "vfork"] {
        if let Some(s) = sysno(name) {
            v.push(s.id() as u32);
        }
    }
    v
}

/// Code returning `hit` for the syscall numbers in `set` and `miss` for every other, with the
/// number in the accumulator: `set` becomes ranges of consecutive numbers (numbers in
/// `dont_care` may fill gaps) searched as a binary tree, so a call costs a handful of
/// comparisons rather than one per listed call, and the program stays small.
fn lookup(set: &[u32], dont_care: &[u32], hit: u32, miss: u32) -> Vec<SockFilter> {
    let mut nums: Vec<u32> = set.to_vec();
    nums.sort_unstable();
    nums.dedup();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for n in nums {
        match ranges.last_mut() {
            // Contiguous, or separated only by calls that never get here.
            Some((_, hi)) if (*hi + 1..n).all(|g| dont_care.contains(&g)) => *hi = n,
            _ => ranges.push((n, n)),
        }
    }
    tree(&ranges, hit, miss).unwrap_or_else(|| linear(&ranges, hit, miss))
}

fn linear(ranges: &[(u32, u32)], hit: u32, miss: u32) -> Vec<SockFilter> {
    let mut out = Vec::new();
    for &(lo, hi) in ranges {
        if lo == hi {
            out.push(jump(BPF_JEQ_K, lo, 0, 1));
        } else {
            // nr < lo: skip both; nr > hi: skip the return.
            out.push(jump(BPF_JGE_K, lo, 0, 2));
            out.push(jump(BPF_JGT_K, hi, 1, 0));
        }
        out.push(stmt(BPF_RET_K, hit));
    }
    out.push(stmt(BPF_RET_K, miss));
    out
}

/// Binary search over `ranges`; None if a jump would not fit BPF's 8-bit offsets.
fn tree(ranges: &[(u32, u32)], hit: u32, miss: u32) -> Option<Vec<SockFilter>> {
    if ranges.len() <= 4 {
        return Some(linear(ranges, hit, miss));
    }
    let mid = ranges.len() / 2;
    let low = tree(&ranges[..mid], hit, miss)?;
    let high = tree(&ranges[mid..], hit, miss)?;
    let mut out = vec![jump(
        BPF_JGE_K,
        ranges[mid].0,
        u8::try_from(low.len()).ok()?,
        0,
    )];
    out.extend(low);
    out.extend(high);
    Some(out)
}

fn push_ret(prog: &mut Vec<SockFilter>, s: Sysno, ret: u32) {
    prog.push(jump(BPF_JEQ_K, s.id() as u32, 0, 1));
    prog.push(stmt(BPF_RET_K, ret));
}

/// `if nr == s { block }`; every path through `block` must end in a return.
fn push_block(prog: &mut Vec<SockFilter>, s: Sysno, block: Vec<SockFilter>) {
    debug_assert!(block.last().is_some_and(|i| i.code == BPF_RET_K));
    let len = u8::try_from(block.len()).unwrap_or(u8::MAX);
    prog.push(jump(BPF_JEQ_K, s.id() as u32, 0, len));
    prog.extend(block);
}

/// The calls a deny-list filter refuses: `denylist.toml`'s `[never]` and `[denied]` parts.
pub fn deny_base() -> Vec<Sysno> {
    never().keys().chain(denied().keys()).copied().collect()
}

/// Runs `prog` on one syscall the way the kernel would (for tests and `profile show`).
pub fn evaluate(prog: &[SockFilter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    evaluate_counted(prog, arch, nr, args).0
}

/// [`evaluate`], and how many instructions the kernel would run to decide.
pub fn evaluate_counted(prog: &[SockFilter], arch: u32, nr: u32, args: [u64; 6]) -> (u32, usize) {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_ne_bytes());
    data[4..8].copy_from_slice(&arch.to_ne_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
    }
    let mut acc: u32 = 0;
    let mut pc = 0usize;
    let mut steps = 0usize;
    while let Some(ins) = prog.get(pc) {
        steps += 1;
        match ins.code {
            BPF_LD_W_ABS => {
                let o = ins.k as usize;
                acc = u32::from_ne_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
                pc += 1;
            }
            BPF_RET_K => return (ins.k, steps),
            BPF_ALU_AND_K => {
                acc &= ins.k;
                pc += 1;
            }
            BPF_JA => pc += 1 + ins.k as usize,
            code => {
                let taken = match code {
                    BPF_JEQ_K => acc == ins.k,
                    BPF_JGE_K => acc >= ins.k,
                    BPF_JGT_K => acc > ins.k,
                    BPF_JSET_K => acc & ins.k != 0,
                    _ => return (RET_KILL_PROCESS, steps),
                };
                pc += 1 + usize::from(if taken { ins.jt } else { ins.jf });
            }
        }
    }
    (RET_KILL_PROCESS, steps)
}

/// The native audit architecture value the filter accepts.
pub const fn native_arch() -> u32 {
    AUDIT_ARCH
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_read_by_hand_are_what_toml_reads() {
        for (text, sections) in [
            (GENERIC, &["syscalls"][..]),
            (RUNNER, &["syscalls"][..]),
            (DENYLIST, &["never", "denied"][..]),
        ] {
            let table: toml::Table = toml::from_str(text).unwrap();
            for section in sections {
                let want: BTreeMap<&str, &str> = table[*section]
                    .as_table()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
                    .collect();
                assert!(want.len() > 10, "{section}");
                assert_eq!(section_entries(text, section), want, "{section}");
            }
        }
    }

    fn spec(strict: bool, allow_processes: bool) -> FilterSpec {
        FilterSpec {
            base: Base::Generic,
            strict,
            extra: vec![],
            allow_processes,
            denied_action: DeniedAction::Errno,
        }
    }
    fn run(prog: &[SockFilter], s: Sysno, args: [u64; 6]) -> u32 {
        evaluate(prog, native_arch(), s.id() as u32, args)
    }
    const EPERM: u32 = ret_errno(libc::EPERM);

    #[test]
    fn every_table_name_is_a_real_syscall_here() {
        for (text, section) in [
            (GENERIC, "syscalls"),
            (DENYLIST, "never"),
            (DENYLIST, "denied"),
        ] {
            let table: toml::Table = toml::from_str(text).unwrap();
            let t = table[section].as_table().unwrap();
            for (name, why) in t {
                assert!(!why.as_str().unwrap().is_empty(), "{name} has no reason");
                #[cfg(target_arch = "x86_64")]
                assert!(
                    sysno(name).is_some() || name == "_sysctl" || name == "nfsservctl",
                    "unknown syscall {name} in {section}"
                );
            }
        }
        let base: Vec<_> = generic_base().iter().map(|(s, _)| *s).collect();
        for s in never().keys() {
            assert!(
                !base.contains(s),
                "{s} is both in the base set and never-allowed"
            );
        }
    }

    #[test]
    fn the_name_index_reads_names_as_the_syscalls_crate_does() {
        use std::str::FromStr;
        let mut seen = 0;
        for id in 0..=Sysno::last().id() + 64 {
            let Some(s) = Sysno::new(id as usize) else {
                continue;
            };
            assert_eq!(sysno(s.name()), Some(s), "{}", s.name());
            assert_eq!(Sysno::from_str(s.name()), Ok(s));
            seen += 1;
        }
        assert!(seen > 300, "{seen} calls");
        assert_eq!(sysno(Sysno::last().name()), Some(Sysno::last()));
        for name in ["", "open ", "OPEN", "nosuchcall", "_sysctl"] {
            assert_eq!(sysno(name), Sysno::from_str(name).ok(), "{name:?}");
        }
    }

    #[test]
    fn lookup_matches_the_set_for_every_number() {
        let allowed: Vec<u32> = generic().iter().map(|(s, _)| s.id() as u32).collect();
        let special = special_numbers();
        for (set, hit, miss) in [
            (allowed.clone(), RET_ALLOW, EPERM),
            (vec![0, 1, 2, 5, 9, 10, 11, 400], EPERM, RET_ALLOW),
            (vec![3], RET_ALLOW, EPERM),
            (vec![], RET_ALLOW, EPERM),
            ((0..300).step_by(2).collect(), RET_ALLOW, EPERM),
        ] {
            let mut prog = vec![stmt(BPF_LD_W_ABS, OFF_NR)];
            prog.extend(lookup(&set, &special, hit, miss));
            for nr in 0..1024u32 {
                if special.contains(&nr) {
                    continue;
                }
                let want = if set.contains(&nr) { hit } else { miss };
                assert_eq!(evaluate(&prog, native_arch(), nr, [0; 6]), want, "nr {nr}");
            }
            if set == allowed {
                // One comparison pair per call before; now ranges of neighbours.
                assert!(prog.len() < set.len(), "{} instructions", prog.len());
            }
        }
        // The strict program as a whole: every base call allowed, nothing else.
        let p = compile(&spec(true, true));
        for nr in 0..1024u32 {
            if special.contains(&nr) {
                continue;
            }
            let want = if allowed.contains(&nr) {
                RET_ALLOW
            } else {
                EPERM
            };
            assert_eq!(evaluate(&p, native_arch(), nr, [0; 6]), want, "nr {nr}");
        }
    }

    #[test]
    fn strict_filter_allows_base_and_denies_the_rest() {
        let p = compile(&spec(true, false));
        assert_eq!(run(&p, Sysno::read, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, Sysno::futex, [0; 6]), RET_ALLOW);
        for s in [
            Sysno::mount,
            Sysno::ptrace,
            Sysno::bpf,
            Sysno::unshare,
            Sysno::add_key,
            Sysno::perf_event_open,
            Sysno::init_module,
        ] {
            assert_eq!(run(&p, s, [0; 6]), EPERM, "{s}");
        }
        assert_eq!(run(&p, Sysno::clone3, [0; 6]), ret_errno(libc::ENOSYS));
        // threads yes, processes no, namespaces never
        assert_eq!(
            run(&p, Sysno::clone, [0x003d_0f00, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            run(&p, Sysno::clone, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(run(&p, Sysno::clone, [0x1001_0000, 0, 0, 0, 0, 0]), EPERM);
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(run(&p, Sysno::fork, [0; 6]), EPERM);
            assert_eq!(
                evaluate(&p, native_arch(), 0x4000_0000 | 39, [0; 6]),
                RET_KILL_PROCESS,
                "x32"
            );
        }
        assert_eq!(
            evaluate(&p, 0x4000_0003 /* i386 */, 0, [0; 6]),
            RET_KILL_PROCESS
        );
        assert_eq!(
            run(&p, Sysno::ioctl, [0, u64::from(TIOCSTI), 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(
            run(&p, Sysno::ioctl, [0, 0x5401 /* TCGETS */, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            run(&p, Sysno::socket, [40 /* AF_VSOCK */, 1, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(run(&p, Sysno::socket, [1, 1, 0, 0, 0, 0]), RET_ALLOW);
        for (fam, proto, want) in [
            (2, 0, RET_ALLOW),
            (2, 6, RET_ALLOW),
            (10, 17, RET_ALLOW),
            (2, 262 /* MPTCP */, EPERM),
            (10, 262, EPERM),
            (2, 132 /* SCTP */, EPERM),
            (10, 136 /* UDP-Lite */, EPERM),
            (16 /* NETLINK */, 0, RET_ALLOW),
        ] {
            assert_eq!(
                run(&p, Sysno::socket, [fam, 1, proto, 0, 0, 0]),
                want,
                "{fam}/{proto}"
            );
        }
    }

    #[test]
    fn extras_and_processes_and_kill_action() {
        let mut s = spec(true, true);
        s.extra = vec![Sysno::personality, Sysno::mount];
        s.denied_action = DeniedAction::Kill;
        let p = compile(&s);
        assert_eq!(run(&p, Sysno::personality, [0; 6]), RET_ALLOW);
        assert_eq!(
            run(&p, Sysno::mount, [0; 6]),
            RET_KILL_PROCESS,
            "never-allowed extras are ignored"
        );
        assert_eq!(
            run(&p, Sysno::clone, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            run(
                &p,
                Sysno::clone,
                [0x1000_0000 | libc::SIGCHLD as u64, 0, 0, 0, 0, 0]
            ),
            RET_KILL_PROCESS
        );
    }

    #[test]
    fn denylist_filter_denies_dangerous_and_allows_the_rest() {
        let mut s = spec(false, false);
        s.extra = vec![Sysno::personality];
        let p = compile(&s);
        assert_eq!(run(&p, Sysno::read, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, Sysno::mq_open, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, Sysno::personality, [0; 6]), RET_ALLOW);
        for sc in [
            Sysno::mount,
            Sysno::setns,
            Sysno::kexec_load,
            Sysno::io_uring_setup,
            Sysno::keyctl,
            Sysno::clock_settime,
        ] {
            assert_eq!(run(&p, sc, [0; 6]), EPERM, "{sc}");
        }
    }

    #[test]
    fn runner_filter_has_no_network_and_no_file_changes() {
        let p = compile(&FilterSpec {
            base: Base::Runner,
            ..spec(true, false)
        });
        for s in [
            Sysno::socket,
            Sysno::connect,
            Sysno::unlink,
            Sysno::mkdir,
            Sysno::rename,
            Sysno::kill,
            Sysno::execveat,
        ] {
            assert_eq!(run(&p, s, [1, 1, 0, 0, 0, 0]), EPERM, "{s}");
        }
        for s in [
            Sysno::read,
            Sysno::futex,
            Sysno::openat,
            Sysno::landlock_restrict_self,
        ] {
            assert_eq!(run(&p, s, [0; 6]), RET_ALLOW, "{s}");
        }
    }
}
