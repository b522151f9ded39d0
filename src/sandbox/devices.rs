//! Device access for one sandbox: which device nodes it may open or create.
//!
//! cgroup v1 has a `devices` controller fed with allow/deny lines; cgroup v2 has none and instead
//! runs every BPF program of type `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the cgroup (or an
//! ancestor) on each device open and mknod. A list of [`DeviceRule`]s becomes either
//! `devices.allow` lines ([`DeviceRule::v1_line`]) or such a program ([`program`], [`load`],
//! [`attach`]); `cgroup.rs` picks one and applies it before the sandbox's process joins.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Char,
    Block,
}

/// One allowed device (or every minor of a major) and the accesses allowed on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub kind: DeviceKind,
    pub major: u32,
    /// None: every minor.
    pub minor: Option<u32>,
    pub read: bool,
    pub write: bool,
    pub mknod: bool,
}

// Values from include/uapi/linux/bpf.h.
const DEVCG_DEV_BLOCK: i32 = 1;
const DEVCG_DEV_CHAR: i32 = 2;
const DEVCG_ACC_MKNOD: i32 = 1;
const DEVCG_ACC_READ: i32 = 2;
const DEVCG_ACC_WRITE: i32 = 4;

impl DeviceRule {
    /// The rule as a `devices.allow` line (`c 1:3 rw`, `c 195:* rwm`); None if it allows nothing.
    pub fn v1_line(&self) -> Option<String> {
        let kind = match self.kind {
            DeviceKind::Char => 'c',
            DeviceKind::Block => 'b',
        };
        let minor = self.minor.map_or("*".to_string(), |m| m.to_string());
        let access: String = [(self.read, 'r'), (self.write, 'w'), (self.mknod, 'm')]
            .into_iter()
            .filter_map(|(on, c)| on.then_some(c))
            .collect();
        (!access.is_empty()).then(|| format!("{kind} {}:{minor} {access}", self.major))
    }

    fn access_bits(&self) -> i32 {
        [
            (self.read, DEVCG_ACC_READ),
            (self.write, DEVCG_ACC_WRITE),
            (self.mknod, DEVCG_ACC_MKNOD),
        ]
        .into_iter()
        .filter_map(|(on, bit)| on.then_some(bit))
        .fold(0, |a, b| a | b)
    }
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst register in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JSET_K: u8 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The device program for `rules`: 1 (allow) when one rule matches the device and grants every
/// requested access, else 0.
///
/// Registers: r1 = `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }`,
/// r2 = requested access, r3 = device type, r4 = major, r5 = minor.
pub fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(MOV_X, 3, 2, 0, 0),
        insn(AND_K, 3, 0, 0, 0xffff),
        insn(RSH_K, 2, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for rule in rules {
        let allowed = rule.access_bits();
        if allowed == 0 {
            continue;
        }
        let kind = match rule.kind {
            DeviceKind::Char => DEVCG_DEV_CHAR,
            DeviceKind::Block => DEVCG_DEV_BLOCK,
        };
        // Each check jumps past the rule's block when it fails. Majors and minors fit in 20 bits,
        // so the sign-extended immediates compare correctly.
        let mut checks = vec![(JNE_K, 3, kind), (JNE_K, 4, rule.major as i32)];
        if let Some(minor) = rule.minor {
            checks.push((JNE_K, 5, minor as i32));
        }
        let denied = !allowed & 0xffff;
        checks.push((JSET_K, 2, denied));
        let block_len = checks.len() + 2;
        for (i, (code, reg, imm)) in checks.into_iter().enumerate() {
            p.push(insn(code, reg, 0, (block_len - i - 1) as i16, imm));
        }
        p.push(insn(MOV_K, 0, 0, 0, 1));
        p.push(insn(EXIT, 0, 0, 0, 0));
    }
    p.push(insn(MOV_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills the rest.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The leading fields of `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Loads `insns` as a cgroup device program.
pub fn load(insns: &[Insn]) -> io::Result<OwnedFd> {
    const LICENSE: &[u8] = b"Apache-2.0\0";
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"corral_dev");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(insns.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; the instruction and license
    // buffers it points to outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success bpf(2) returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches a loaded device program to the cgroup directory `dir`, beside any attached above.
/// The attachment keeps the program alive; removing the cgroup detaches it.
pub fn attach(prog: &OwnedFd, dir: &Path) -> io::Result<()> {
    let cgroup = std::fs::File::open(dir)?;
    let attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; both fds are open.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process may load cgroup device programs (needs CAP_BPF or CAP_SYS_ADMIN).
/// Probed once, by loading a program that allows everything.
pub fn bpf_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| load(&[insn(MOV_K, 0, 0, 0, 1), insn(EXIT, 0, 0, 0, 0)]).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::cgroup::{self, Cgroup, CgroupHost, Limits};
    use std::ffi::CString;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    /// Path as a C string, built before forking so the child need not allocate.
    fn cstr(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    fn rule(kind: DeviceKind, major: u32, minor: Option<u32>, access: &str) -> DeviceRule {
        DeviceRule {
            kind,
            major,
            minor,
            read: access.contains('r'),
            write: access.contains('w'),
            mknod: access.contains('m'),
        }
    }

    #[test]
    fn v1_lines() {
        use DeviceKind::*;
        assert_eq!(
            rule(Char, 1, Some(3), "rw").v1_line().as_deref(),
            Some("c 1:3 rw")
        );
        assert_eq!(
            rule(Char, 195, None, "rwm").v1_line().as_deref(),
            Some("c 195:* rwm")
        );
        assert_eq!(
            rule(Block, 8, Some(0), "m").v1_line().as_deref(),
            Some("b 8:0 m")
        );
        assert_eq!(rule(Char, 1, Some(3), "").v1_line(), None);
    }

    #[test]
    fn program_bytes_for_one_rule() {
        let p = program(&[rule(DeviceKind::Char, 1, Some(3), "rw")]);
        let expect = [
            insn(LDX_W, 2, 1, 0, 0),
            insn(MOV_X, 3, 2, 0, 0),
            insn(AND_K, 3, 0, 0, 0xffff),
            insn(RSH_K, 2, 0, 0, 16),
            insn(LDX_W, 4, 1, 4, 0),
            insn(LDX_W, 5, 1, 8, 0),
            insn(JNE_K, 3, 0, 5, DEVCG_DEV_CHAR),
            insn(JNE_K, 4, 0, 4, 1),
            insn(JNE_K, 5, 0, 3, 3),
            insn(JSET_K, 2, 0, 2, 0xfff9), // anything but read and write
            insn(MOV_K, 0, 0, 0, 1),
            insn(EXIT, 0, 0, 0, 0),
            insn(MOV_K, 0, 0, 0, 0),
            insn(EXIT, 0, 0, 0, 0),
        ];
        assert_eq!(p, expect);
        // The raw encoding the kernel reads: code, regs, off (LE), imm (LE).
        // SAFETY: Insn is repr(C), 8 bytes with no padding.
        let bytes: [u8; 8] = unsafe { std::mem::transmute(p[6]) };
        assert_eq!(bytes, [0x55, 0x03, 5, 0, 2, 0, 0, 0]);
    }

    /// Runs `p` on one context the way the kernel would, for the opcodes `program` emits.
    fn run(p: &[Insn], access_type: u32, major: u32, minor: u32) -> u64 {
        let ctx = [access_type as u64, major as u64, minor as u64];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            let imm = i.imm as i64 as u64;
            pc += 1;
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1);
                    r[dst] = ctx[i.off as usize / 4];
                }
                MOV_X => r[dst] = r[src],
                MOV_K => r[dst] = imm,
                AND_K => r[dst] &= imm,
                RSH_K => r[dst] >>= imm,
                JNE_K if r[dst] != imm => pc += i.off as usize,
                JSET_K if r[dst] & imm != 0 => pc += i.off as usize,
                JNE_K | JSET_K => {}
                EXIT => return r[0],
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn program_allows_exactly_the_rules() {
        use DeviceKind::*;
        let p = program(&[
            rule(Char, 1, Some(3), "rw"),
            rule(Char, 1, Some(5), "r"),
            rule(Char, 195, None, "rwm"),
            rule(Block, 8, Some(0), "m"),
            rule(Char, 4, Some(0), ""),
        ]);
        let (c, b) = (DEVCG_DEV_CHAR as u32, DEVCG_DEV_BLOCK as u32);
        let (m, r, w) = (
            DEVCG_ACC_MKNOD as u32,
            DEVCG_ACC_READ as u32,
            DEVCG_ACC_WRITE as u32,
        );
        let at = |kind: u32, acc: u32| kind | (acc << 16);
        let cases = [
            (at(c, r | w), 1, 3, 1),
            (at(c, m), 1, 3, 0),
            (at(b, r), 1, 3, 0),
            (at(c, r), 1, 5, 1),
            (at(c, r | w), 1, 5, 0),
            (at(c, w), 1, 5, 0),
            (at(c, r), 1, 7, 0),
            (at(c, r | w | m), 195, 0, 1),
            (at(c, r), 195, 255, 1),
            (at(b, r), 195, 0, 0),
            (at(b, m), 8, 0, 1),
            (at(b, r), 8, 0, 0),
            (at(b, m), 8, 1, 0),
            (at(c, r), 4, 0, 0),
            (at(c, 8), 1, 3, 0), // an access bit this program does not know
        ];
        for (access_type, major, minor, want) in cases {
            assert_eq!(
                run(&p, access_type, major, minor),
                want,
                "access_type {access_type:#x} {major}:{minor}"
            );
        }
        assert_eq!(run(&program(&[]), at(c, r), 1, 3), 0);
    }

    /// A host with the path `force` ("v1" or "v2 bpf") available, or None (said loudly).
    fn kernel_host(force: &str) -> Option<CgroupHost> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: the {force} device cgroup test needs root");
            return None;
        }
        let mut host = CgroupHost::detect();
        if force == "v2 bpf" {
            host.devices = None;
        }
        if host.devices_supported() != Some(force) {
            eprintln!(
                "SKIPPED: this host cannot use {force} device cgroups ({})",
                host.describe()
            );
            return None;
        }
        Some(host)
    }

    const ATTEMPTS: usize = 7;

    /// Forks a child, moves it into `cg`, and returns the errno (0: success) of each attempt:
    /// open /dev/null rw, /dev/zero r, /dev/zero w, /dev/full r, /dev/random r,
    /// mknod c 1:3, mknod c 1:7 (in `scratch`).
    fn attempts(cg: &Cgroup, scratch: &Path) -> [i32; ATTEMPTS] {
        let dev = |n: &str| cstr(&Path::new("/dev").join(n));
        let opens = [
            (dev("null"), libc::O_RDWR),
            (dev("zero"), libc::O_RDONLY),
            (dev("zero"), libc::O_WRONLY),
            (dev("full"), libc::O_RDONLY),
            (dev("random"), libc::O_RDONLY),
        ];
        let nodes = [
            (cstr(&scratch.join("null")), libc::makedev(1, 3)),
            (cstr(&scratch.join("full")), libc::makedev(1, 7)),
        ];
        let mut go = [0; 2];
        let mut res = [0; 2];
        // SAFETY: pipe2 writes two fds into each array.
        let ok = unsafe {
            libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) == 0
                && libc::pipe2(res.as_mut_ptr(), libc::O_CLOEXEC) == 0
        };
        assert!(ok, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: the child only makes async-signal-safe syscalls on data prepared above, then
        // _exits; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: see above; every pointer is to memory built before the fork.
            unsafe {
                let mut b = 0u8;
                libc::close(go[1]);
                if libc::read(go[0], (&mut b as *mut u8).cast(), 1) != 1 {
                    libc::_exit(1);
                }
                let mut out = [0i32; ATTEMPTS];
                for (i, (path, flags)) in opens.iter().enumerate() {
                    let fd = libc::open(path.as_ptr(), flags | libc::O_CLOEXEC);
                    out[i] = if fd >= 0 {
                        libc::close(fd);
                        0
                    } else {
                        *libc::__errno_location()
                    };
                }
                for (i, (path, dev)) in nodes.iter().enumerate() {
                    let rc = libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, *dev);
                    out[opens.len() + i] = if rc == 0 {
                        0
                    } else {
                        *libc::__errno_location()
                    };
                }
                let n = std::mem::size_of_val(&out);
                libc::write(res[1], out.as_ptr().cast(), n);
                libc::_exit(0);
            }
        }
        // SAFETY: the parent owns these four fds from here on.
        let (go_r, mut go_w, mut res_r, res_w) = unsafe {
            (
                OwnedFd::from_raw_fd(go[0]),
                File::from_raw_fd(go[1]),
                File::from_raw_fd(res[0]),
                OwnedFd::from_raw_fd(res[1]),
            )
        };
        drop((go_r, res_w));
        let added = cg.add(pid);
        if added.is_ok() {
            go_w.write_all(b"g").unwrap();
        }
        drop(go_w);
        let mut buf = Vec::new();
        res_r.read_to_end(&mut buf).unwrap();
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        added.unwrap();
        assert_eq!(buf.len(), ATTEMPTS * 4, "child status {status:#x}");
        let mut out = [0i32; ATTEMPTS];
        for (o, c) in out.iter_mut().zip(buf.chunks_exact(4)) {
            *o = i32::from_ne_bytes(c.try_into().unwrap());
        }
        out
    }

    fn check_enforced(force: &str, name_seq: u64) -> Option<Vec<PathBuf>> {
        use DeviceKind::Char;
        let host = kernel_host(force)?;
        let limits = Limits {
            devices: Some(vec![
                rule(Char, 1, Some(3), "rw"),
                rule(Char, 1, Some(5), "r"),
                rule(Char, 1, Some(7), "m"),
            ]),
            ..Limits::default()
        };
        let name = cgroup::sandbox_name(name_seq);
        let cg = Cgroup::create(&host, &name, &limits).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let got = attempts(&cg, scratch.path());
        let e = libc::EPERM;
        assert_eq!(
            got,
            [0, 0, e, e, e, e, 0],
            "{force}: null rw, zero r, zero w, full r, random r, mknod 1:3, mknod 1:7"
        );
        if force == "v1" {
            let dir = cg
                .dirs()
                .iter()
                .find(|d| d.starts_with(&host.devices.as_ref().unwrap().own_dir))
                .unwrap();
            assert_eq!(
                std::fs::read_to_string(dir.join("devices.list")).unwrap(),
                "c 1:3 rw\nc 1:5 r\nc 1:7 m\n"
            );
        }
        let dirs = cg.dirs().to_vec();
        drop(cg);
        for d in &dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
        Some(dirs)
    }

    #[test]
    fn cgroup_v1_devices_allow_only_listed_devices() {
        if let Some(dirs) = check_enforced("v1", 1 << 40) {
            let v2 = CgroupHost::detect().v2_own;
            assert!(
                v2.is_none_or(|v2| !dirs.iter().any(|d| d.starts_with(&v2))),
                "the v1 path also created a cgroup2 dir: {dirs:?}"
            );
        }
    }

    #[test]
    fn cgroup_v2_bpf_devices_allow_only_listed_devices() {
        if let Some(dirs) = check_enforced("v2 bpf", (1 << 40) + 1) {
            let v2 = CgroupHost::detect().v2_own.unwrap();
            assert!(
                dirs.iter().any(|d| d.starts_with(&v2)),
                "no cgroup2 dir: {dirs:?}"
            );
        }
    }

    #[test]
    fn cgroup_v2_bpf_wildcard_minor() {
        use DeviceKind::Char;
        let Some(host) = kernel_host("v2 bpf") else {
            return;
        };
        let limits = Limits {
            devices: Some(vec![rule(Char, 1, None, "r")]),
            ..Limits::default()
        };
        let cg = Cgroup::create(&host, &cgroup::sandbox_name((1 << 40) + 2), &limits).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let e = libc::EPERM;
        assert_eq!(attempts(&cg, scratch.path()), [e, 0, e, 0, 0, e, e]);
    }

    #[test]
    fn device_rules_without_any_device_cgroup_fail() {
        let limits = Limits {
            devices: Some(vec![]),
            ..Limits::default()
        };
        let err = Cgroup::create(&CgroupHost::default(), "1-2-3", &limits).unwrap_err();
        assert!(err.to_string().contains("device cgroup"), "{err}");
    }
}
