//! GPU access for `resources.gpu_access = Shared | Exclusive`: which NVIDIA device nodes a
//! sandbox gets, the supervisor-side locks that make `Exclusive` exclusive, and the driver
//! libraries a CUDA program loads.
//!
//! A granted sandbox sees `/dev/nvidiactl`, `/dev/nvidia-uvm` and its `/dev/nvidiaN` nodes in its
//! minimal `/dev`, bound from the host with device access; the device cgroup allows exactly those
//! (major, minor) pairs; Landlock allows reading, writing and (ABI 5+) ioctl on exactly those
//! files. Each GPU has a lock file under `STATE_DIR/gpu/`: `Shared` holds a shared `flock` on
//! every GPU it gets, `Exclusive` an exclusive one on one GPU, so an exclusive sandbox never
//! shares its GPU with another corral sandbox. Locks die with the supervisor (kernel `flock`).
//! GPU memory cannot be capped by the kernel: `Shared.max_memory_mb` is passed to the program as
//! `CORRAL_GPU_MEMORY_MB` and is advisory.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::devices::{DeviceKind, DeviceRule};

/// The character-device major of `nvidiactl` and `nvidiaN` (fixed by the driver).
const NVIDIA_MAJOR: u32 = 195;

/// The NVIDIA nodes of a host (or of `[sandbox] gpu_devices`), by role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuNodes {
    pub ctl: PathBuf,
    pub uvm: PathBuf,
    /// (index N, path of nvidiaN), by index.
    pub gpus: Vec<(u32, PathBuf)>,
}

/// Sorts device paths into roles; says what is missing when a GPU cannot be handed out.
pub fn classify(devices: &[PathBuf]) -> Result<GpuNodes, String> {
    let mut ctl = None;
    let mut uvm = None;
    let mut gpus = Vec::new();
    for p in devices {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((major, _)) = char_device(p) else {
            continue;
        };
        // nvidiactl and nvidiaN live on NVIDIA's registered major; a node of another device
        // under such a name (a mistake in `[sandbox] gpu_devices`) is never handed out.
        let nvidia = || {
            if major == NVIDIA_MAJOR {
                Ok(p.clone())
            } else {
                Err(format!(
                    "{} is not an NVIDIA device (major {major}, not {NVIDIA_MAJOR})",
                    p.display()
                ))
            }
        };
        match name {
            "nvidiactl" => ctl = Some(nvidia()?),
            "nvidia-uvm" => uvm = Some(p.clone()),
            _ => {
                if let Some(n) = name
                    .strip_prefix("nvidia")
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    gpus.push((n, nvidia()?));
                }
            }
        }
    }
    gpus.sort();
    if devices.is_empty() {
        return Err("no NVIDIA device nodes on this host (/dev/nvidiactl, /dev/nvidiaN): no GPU or no driver loaded".into());
    }
    match (ctl, uvm, gpus.is_empty()) {
        (None, _, _) => Err("/dev/nvidiactl is missing (is the NVIDIA driver loaded?)".into()),
        (_, None, _) => Err(
            "/dev/nvidia-uvm is missing (load nvidia-uvm, e.g. `nvidia-modprobe -u -c=0`)".into(),
        ),
        (_, _, true) => Err("no /dev/nvidiaN GPU node".into()),
        (Some(ctl), Some(uvm), false) => Ok(GpuNodes { ctl, uvm, gpus }),
    }
}

/// The GPUs one sandbox got, the host nodes to bind, and the locks it holds while it lives.
#[derive(Debug, Clone)]
pub struct GpuLease {
    pub indices: Vec<u32>,
    /// Host paths, each bound at `/dev/<file name>` in the sandbox.
    pub nodes: Vec<PathBuf>,
    /// Open lock files; dropping the last clone releases the GPUs.
    pub locks: Vec<Arc<File>>,
}

fn try_flock(file: &File, exclusive: bool) -> bool {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock on a file we hold open.
    unsafe { libc::flock(file.as_raw_fd(), op) == 0 }
}

/// Takes the GPUs for one launch: `Exclusive` the first GPU no one else holds, `Shared` every
/// GPU not held exclusively.
pub fn lease(nodes: &GpuNodes, exclusive: bool, lock_dir: &Path) -> Result<GpuLease, String> {
    fs::create_dir_all(lock_dir)
        .map_err(|e| format!("cannot create {}: {e}", lock_dir.display()))?;
    let mut lease = GpuLease {
        indices: Vec::new(),
        nodes: vec![nodes.ctl.clone(), nodes.uvm.clone()],
        locks: Vec::new(),
    };
    for (n, path) in &nodes.gpus {
        let lock_path = lock_dir.join(format!("nvidia{n}.lock"));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        if !try_flock(&file, exclusive) {
            continue;
        }
        lease.indices.push(*n);
        lease.nodes.push(path.clone());
        lease.locks.push(Arc::new(file));
        if exclusive {
            break;
        }
    }
    if lease.indices.is_empty() {
        let all: Vec<String> = nodes.gpus.iter().map(|(n, _)| n.to_string()).collect();
        return Err(if exclusive {
            format!(
                "every GPU ({}) is in use by another corral sandbox; Exclusive needs one to itself",
                all.join(", ")
            )
        } else {
            format!(
                "every GPU ({}) is held by an Exclusive sandbox",
                all.join(", ")
            )
        });
    }
    Ok(lease)
}

/// The (major, minor) of a character device node.
pub fn char_device(p: &Path) -> Option<(u32, u32)> {
    let m = fs::metadata(p).ok()?;
    m.file_type()
        .is_char_device()
        .then(|| (libc::major(m.rdev()), libc::minor(m.rdev())))
}

/// Device cgroup rules: the basic nodes every sandbox has, plus `extra` (read and write, never
/// mknod).
pub fn device_rules(basic: &[&str], extra: &[PathBuf]) -> Vec<DeviceRule> {
    basic
        .iter()
        .map(|n| Path::new("/dev").join(n))
        .chain(extra.iter().cloned())
        .filter_map(|p| char_device(&p))
        .map(|(major, minor)| DeviceRule {
            kind: DeviceKind::Char,
            major,
            minor: Some(minor),
            read: true,
            write: true,
            mknod: false,
        })
        .collect()
}

/// Library directories searched for the NVIDIA user-space driver.
const LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/nvidia/lib64",
    "/usr/lib/wsl/lib",
];

/// The driver's user-space libraries (`libcuda`, `libnvidia-*`) and a CUDA toolkit's library
/// directory, which a CUDA program loads at run time (dlopen, so not in its ELF closure).
pub fn driver_libraries() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in LIB_DIRS {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for e in rd.flatten() {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if n.starts_with("libcuda.so")
                || n.starts_with("libcudadebugger.so")
                || n.starts_with("libnvidia-ml.so")
                || n.starts_with("libnvidia-ptxjitcompiler.so")
                || n.starts_with("libnvidia-nvvm.so")
                || n.starts_with("libnvidia-gpucomp.so")
            {
                out.push(e.path());
            }
        }
    }
    for dir in ["/usr/local/cuda/lib64", "/usr/local/cuda/targets"] {
        if Path::new(dir).is_dir() {
            out.push(PathBuf::from(dir));
        }
    }
    out.sort();
    out
}

/// The directories of the driver's libraries that the dynamic loader does not search by
/// default, joined for `LD_LIBRARY_PATH` (empty when the driver lies in a default one).
pub fn driver_library_path() -> String {
    library_path_of(&driver_libraries())
}

fn library_path_of(libs: &[PathBuf]) -> String {
    let defaults = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/lib",
        "/lib64",
    ];
    let mut dirs: Vec<&Path> = libs
        .iter()
        .filter(|l| {
            l.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libcuda.so"))
        })
        .filter_map(|l| l.parent())
        .filter(|d| !defaults.iter().any(|x| Path::new(x) == *d))
        .collect();
    dirs.dedup();
    dirs.iter()
        .map(|d| d.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runner finds a driver in a container's /usr/local/nvidia/lib64 through the library
    /// path; one in the loader's own directories needs none.
    #[test]
    fn driver_library_path_names_only_directories_the_loader_does_not_search() {
        let libs = [
            PathBuf::from("/usr/local/nvidia/lib64/libcuda.so.1"),
            PathBuf::from("/usr/local/nvidia/lib64/libcuda.so.580.159.04"),
            PathBuf::from("/usr/local/nvidia/lib64/libnvidia-ml.so.1"),
            PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
        ];
        assert_eq!(library_path_of(&libs), "/usr/local/nvidia/lib64");
        assert_eq!(library_path_of(&libs[3..]), "");
    }

    fn mknod(dir: &Path, name: &str, major: u32, minor: u32) -> PathBuf {
        let p = dir.join(name);
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mknod with a valid path; the test runs as root.
        let r = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        assert_eq!(
            r,
            0,
            "mknod {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
        p
    }

    fn fake_host() -> (tempfile::TempDir, Vec<PathBuf>) {
        let d = tempfile::tempdir().unwrap();
        let nodes = vec![
            mknod(d.path(), "nvidiactl", 195, 255),
            mknod(d.path(), "nvidia-uvm", 508, 0),
            mknod(d.path(), "nvidia0", 195, 0),
            mknod(d.path(), "nvidia1", 195, 1),
        ];
        (d, nodes)
    }

    #[test]
    fn nodes_are_sorted_into_roles_and_missing_ones_named() {
        let (_d, nodes) = fake_host();
        let g = classify(&nodes).unwrap();
        assert_eq!(g.gpus.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [0, 1]);
        assert!(classify(&[])
            .unwrap_err()
            .contains("no NVIDIA device nodes"));
        let no_uvm: Vec<PathBuf> = nodes
            .iter()
            .filter(|p| !p.ends_with("nvidia-uvm"))
            .cloned()
            .collect();
        assert!(classify(&no_uvm).unwrap_err().contains("nvidia-uvm"));
        // A node of another device under an NVIDIA name is refused, naming it.
        let d3 = tempfile::tempdir().unwrap();
        let mut wrong = nodes.clone();
        wrong[2] = mknod(d3.path(), "nvidia0", 1, 3);
        assert!(classify(&wrong)
            .unwrap_err()
            .contains("not an NVIDIA device"));
        // A regular file named like a node is not a device.
        let d2 = tempfile::tempdir().unwrap();
        let f = d2.path().join("nvidiactl");
        std::fs::write(&f, "").unwrap();
        assert!(classify(&[f]).is_err());
    }

    #[test]
    fn exclusive_takes_one_gpu_to_itself_and_shared_the_rest() {
        let (_d, nodes) = fake_host();
        let g = classify(&nodes).unwrap();
        let locks = tempfile::tempdir().unwrap();
        let a = lease(&g, true, locks.path()).unwrap();
        assert_eq!(a.indices, [0]);
        let b = lease(&g, true, locks.path()).unwrap();
        assert_eq!(b.indices, [1]);
        let err = lease(&g, true, locks.path()).unwrap_err();
        assert!(err.contains("in use"), "{err}");
        assert!(lease(&g, false, locks.path())
            .unwrap_err()
            .contains("Exclusive"));
        drop(a);
        let s = lease(&g, false, locks.path()).unwrap();
        assert_eq!(s.indices, [0]);
        assert_eq!(s.nodes.len(), 3, "ctl, uvm and nvidia0");
        let s2 = lease(&g, false, locks.path()).unwrap();
        assert_eq!(s2.indices, [0], "shared leases coexist");
        assert!(
            lease(&g, true, locks.path()).is_err(),
            "nvidia1 is still exclusive"
        );
        drop(b);
        assert!(lease(&g, true, locks.path()).unwrap().indices == [1]);
    }

    #[test]
    fn device_rules_name_exact_nodes() {
        let (_d, nodes) = fake_host();
        let rules = device_rules(&["null"], &nodes[..3]);
        let lines: Vec<String> = rules.iter().filter_map(DeviceRule::v1_line).collect();
        assert_eq!(
            lines,
            ["c 1:3 rw", "c 195:255 rw", "c 508:0 rw", "c 195:0 rw"]
        );
    }
}
