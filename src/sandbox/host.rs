//! What this host can enforce: the facts `corral doctor` prints and the planner checks a profile
//! against before launching (fail closed).

use std::path::PathBuf;

use super::cgroup::CgroupHost;
use super::landlock;

#[derive(Debug, Clone)]
pub struct HostSupport {
    pub kernel: String,
    pub arch: &'static str,
    pub is_root: bool,
    /// Landlock ABI version, `None` when Landlock is off.
    pub landlock_abi: Option<u32>,
    /// seccomp filters with SECCOMP_RET_KILL_PROCESS (Linux 4.14+).
    pub seccomp: bool,
    pub user_namespaces: bool,
    pub cgroups: CgroupHost,
    /// `mount_setattr(2)` (Linux 5.12+): recursive read-only binds.
    pub mount_setattr: bool,
    /// `openat2(2)` with RESOLVE_NO_SYMLINKS (Linux 5.6+).
    pub openat2: bool,
    /// `pidfd_open(2)` (Linux 5.3+).
    pub pidfd: bool,
    pub gpu_devices: Vec<PathBuf>,
}

impl HostSupport {
    /// Probes the host, with the GPU nodes `[sandbox] gpu_devices` names when it names some.
    pub fn probe_for(cfg: &super::SandboxConfig) -> Self {
        let mut h = Self::probe();
        if let Some(list) = &cfg.gpu_devices {
            h.gpu_devices = list.clone();
        }
        h
    }

    pub fn probe() -> Self {
        // SAFETY: uname fills the struct we pass; zeroed is a valid initial value.
        let kernel = unsafe {
            let mut u: libc::utsname = std::mem::zeroed();
            if libc::uname(&mut u) == 0 {
                let c = |f: &[libc::c_char]| {
                    let bytes: Vec<u8> = f
                        .iter()
                        .take_while(|c| **c != 0)
                        .map(|c| *c as u8)
                        .collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                };
                format!("{} {}", c(&u.sysname), c(&u.release))
            } else {
                "unknown".into()
            }
        };
        // SAFETY: geteuid cannot fail.
        let is_root = unsafe { libc::geteuid() } == 0;
        let kill_process: u32 = super::seccomp::RET_KILL_PROCESS;
        // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 we own.
        let seccomp = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                2, /* GET_ACTION_AVAIL */
                0,
                &kill_process as *const u32,
            )
        } == 0;
        let user_namespaces = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0);
        // Probing with invalid arguments: ENOSYS means missing, anything else means present.
        let has = |nr: libc::c_long| {
            // SAFETY: every argument is null/zero/-1, which these syscalls reject with EBADF/EINVAL/EFAULT.
            let r = unsafe {
                libc::syscall(nr, -1, std::ptr::null::<u8>(), 0, std::ptr::null::<u8>(), 0)
            };
            !(r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS))
        };
        let mut gpu_devices: Vec<PathBuf> = std::fs::read_dir("/dev")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("nvidia"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        gpu_devices.sort();
        HostSupport {
            kernel,
            arch: std::env::consts::ARCH,
            is_root,
            landlock_abi: landlock::abi_version(),
            seccomp,
            user_namespaces,
            cgroups: CgroupHost::detect(),
            mount_setattr: has(libc::SYS_mount_setattr),
            openat2: has(libc::SYS_openat2),
            pidfd: has(libc::SYS_pidfd_open),
            gpu_devices,
        }
    }
}
