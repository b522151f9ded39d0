//! Control groups for one sandbox: memory (swap off), CPU quota, pids, I/O bandwidth, and which
//! devices it may use (v1 `devices` controller or a v2 BPF device program, see `devices.rs`).
//!
//! Hosts differ: pure v2 (the usual case), pure v1, or hybrid (v1 controllers and a cgroup2 mount
//! with none, as on corral's CI machines). [`CgroupHost::detect`] finds, per controller, the
//! hierarchy that really has it, and the supervisor's own cgroup in it; sandboxes are created
//! below `<own cgroup>/corral/<supervisor pid>-<start time>-<n>`, so corral nests inside whatever
//! cgroup its service manager or container gave it. A supervisor killed before it could clean up
//! leaves such directories behind: [`sweep_stale`] removes those whose owner is gone.

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::devices::{self, DeviceRule};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path}: device cgroup program: {what}: {source}")]
    DeviceProgram {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("device cgroup: this host has neither a cgroup v1 devices controller nor a cgroup2 mount where corral may attach BPF device programs (needs root with CAP_BPF or CAP_SYS_ADMIN)")]
    DevicesUnavailable,
}

pub type Result<T, E = CgroupError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1,
    V2,
}

/// Where one controller lives: its hierarchy's directory for the supervisor's own cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub version: Version,
    /// `<mount point>/<own cgroup relative to the mount root>`.
    pub own_dir: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupHost {
    pub memory: Option<Hierarchy>,
    pub cpu: Option<Hierarchy>,
    pub cpuacct: Option<Hierarchy>,
    pub pids: Option<Hierarchy>,
    pub io: Option<Hierarchy>,
    /// The cgroup v1 `devices` controller (v2 has none: see [`CgroupHost::devices_supported`]).
    pub devices: Option<Hierarchy>,
    /// The cgroup2 mount point, if any (even one without controllers).
    pub v2_mount: Option<PathBuf>,
    /// The supervisor's own cgroup in the cgroup2 mount, where device programs attach.
    pub v2_own: Option<PathBuf>,
}

impl CgroupHost {
    pub fn detect() -> Self {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::from_proc(&mountinfo, &own, &|p| fs::read_to_string(p).ok())
    }

    /// Detection from the text of `/proc/self/mountinfo` and `/proc/self/cgroup`; `read` reads
    /// `cgroup.controllers` files (a parameter so tests can describe any host).
    pub fn from_proc(mountinfo: &str, own: &str, read: &dyn Fn(&Path) -> Option<String>) -> Self {
        let mut host = CgroupHost::default();
        // own cgroup per hierarchy: "ID:controllers:path"
        let mut own_v1: Vec<(Vec<String>, String)> = Vec::new();
        let mut own_v2: Option<String> = None;
        for line in own.lines() {
            let mut it = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if ctrls.is_empty() {
                own_v2 = Some(path.to_string());
            } else {
                own_v1.push((
                    ctrls.split(',').map(str::to_string).collect(),
                    path.to_string(),
                ));
            }
        }
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(root), Some(mnt), Some(fstype), Some(opts)) = (
                fields.get(3),
                fields.get(4),
                fields.get(sep + 1),
                fields.get(sep + 3),
            ) else {
                continue;
            };
            let mnt = unescape(mnt);
            match *fstype {
                "cgroup2" => {
                    let Some(own) = &own_v2 else { continue };
                    let mut dir = join_rel(Path::new(&mnt), root, own);
                    // A supervisor already moved to its leaf by an earlier run uses the parent, so
                    // repeated runs do not nest one level deeper each time.
                    if dir.file_name().is_some_and(|n| n == V2_LEAF) {
                        dir.pop();
                    }
                    host.v2_mount.get_or_insert_with(|| PathBuf::from(&mnt));
                    host.v2_own.get_or_insert_with(|| dir.clone());
                    let ctrls = read(&dir.join("cgroup.controllers")).unwrap_or_default();
                    let h = Hierarchy {
                        version: Version::V2,
                        own_dir: dir,
                    };
                    for c in ctrls.split_whitespace() {
                        let slot = match c {
                            "memory" => &mut host.memory,
                            "cpu" => &mut host.cpu,
                            "pids" => &mut host.pids,
                            "io" => &mut host.io,
                            _ => continue,
                        };
                        // v1 wins where both claim a controller: only one can really have it.
                        if slot.as_ref().is_none_or(|s| s.version == Version::V2) {
                            *slot = Some(h.clone());
                        }
                    }
                    // v2 accounts CPU time in cpu.stat without the cpu controller.
                    if host.cpuacct.is_none() {
                        host.cpuacct = Some(h);
                    }
                }
                "cgroup" => {
                    let opts: Vec<&str> = opts.split(',').collect();
                    let Some((_, own)) = own_v1
                        .iter()
                        .find(|(c, _)| c.iter().any(|c| opts.contains(&c.as_str())))
                    else {
                        continue;
                    };
                    let h = Hierarchy {
                        version: Version::V1,
                        own_dir: join_rel(Path::new(&mnt), root, own),
                    };
                    for (name, slot) in [
                        ("memory", &mut host.memory),
                        ("cpu", &mut host.cpu),
                        ("cpuacct", &mut host.cpuacct),
                        ("pids", &mut host.pids),
                        ("blkio", &mut host.io),
                        ("devices", &mut host.devices),
                    ] {
                        if opts.contains(&name) {
                            *slot = Some(h.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        host
    }

    fn hierarchies(&self) -> impl Iterator<Item = &Hierarchy> {
        [
            &self.memory,
            &self.cpu,
            &self.cpuacct,
            &self.pids,
            &self.io,
            &self.devices,
        ]
        .into_iter()
        .flatten()
    }

    /// How [`Limits::devices`] would be enforced here: `"v1"` (the `devices` controller), `"v2 bpf"`
    /// (a BPF device program on the cgroup2 hierarchy), or None. The first v2 query loads a
    /// trivial program once to learn whether this process may.
    pub fn devices_supported(&self) -> Option<&'static str> {
        if self.devices.is_some() {
            Some("v1")
        } else if self.v2_own.is_some() && devices::bpf_supported() {
            Some("v2 bpf")
        } else {
            None
        }
    }

    /// Human-readable summary for `corral doctor`.
    pub fn describe(&self) -> String {
        let one = |name: &str, h: &Option<Hierarchy>| match h {
            Some(h) => format!("{name}={:?}", h.version).to_lowercase(),
            None => format!("{name}=missing"),
        };
        [
            one("memory", &self.memory),
            one("cpu", &self.cpu),
            one("pids", &self.pids),
            one("io", &self.io),
            format!(
                "devices={}",
                self.devices_supported()
                    .unwrap_or("missing")
                    .replace(' ', "-")
            ),
        ]
        .join(" ")
    }
}

/// `mount` + (`own` relative to the mount's `root`).
fn join_rel(mount: &Path, root: &str, own: &str) -> PathBuf {
    let rel = own
        .strip_prefix(root)
        .unwrap_or(own)
        .trim_start_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

/// mountinfo escapes spaces and friends as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Limits to write into a new cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// (quota, period) in microseconds.
    pub cpu: Option<(u64, u64)>,
    pub pids: Option<u64>,
    /// Block devices (major, minor) and bytes per second for reads and writes.
    pub io: Option<(Vec<(u32, u32)>, u64)>,
    /// Some: deny every device except these. None: device access is not restricted here.
    pub devices: Option<Vec<DeviceRule>>,
}

/// Accounting read back after (or during) a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub oom_kills: u64,
    pub pids_max_hits: u64,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_usage_ns: Option<u64>,
}

/// One sandbox's cgroup(s): one directory per distinct hierarchy in use.
#[derive(Debug)]
pub struct Cgroup {
    memory: Option<(Version, PathBuf)>,
    pids: Option<(Version, PathBuf)>,
    cpuacct: Option<(Version, PathBuf)>,
    dirs: Vec<PathBuf>,
    /// The cgroup v2 directories among `dirs` (one, unless cgroup2 is mounted twice).
    v2: Vec<PathBuf>,
}

const BASE: &str = "corral";
const V2_LEAF: &str = "corral-supervisor";

impl Cgroup {
    /// Creates `<own>/corral/<name>` in every hierarchy needed and writes `limits`.
    pub fn create(host: &CgroupHost, name: &str, limits: &Limits) -> Result<Cgroup> {
        let mut cg = Cgroup {
            memory: None,
            pids: None,
            cpuacct: None,
            dirs: Vec::new(),
            v2: Vec::new(),
        };
        let result = cg.create_inner(host, name, limits);
        if let Err(e) = result {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn dir_for(&mut self, h: &Hierarchy, name: &str, v2_controllers: &[&str]) -> Result<PathBuf> {
        let base = h.own_dir.join(BASE);
        let dir = base.join(name);
        if self.dirs.contains(&dir) {
            return Ok(dir);
        }
        if h.version == Version::V2 && !v2_controllers.is_empty() {
            enable_v2_controllers(&h.own_dir, &base, v2_controllers)?;
        } else {
            mkdir(&base)?;
        }
        mkdir(&dir)?;
        self.dirs.push(dir.clone());
        if h.version == Version::V2 {
            self.v2.push(dir.clone());
        }
        Ok(dir)
    }

    fn create_inner(&mut self, host: &CgroupHost, name: &str, limits: &Limits) -> Result<()> {
        let v2_ctrls: Vec<&str> = [
            (limits.memory_bytes.is_some(), &host.memory, "memory"),
            (limits.cpu.is_some(), &host.cpu, "cpu"),
            (limits.pids.is_some(), &host.pids, "pids"),
            (limits.io.is_some(), &host.io, "io"),
        ]
        .into_iter()
        .filter(|(want, h, _)| *want && h.as_ref().is_some_and(|h| h.version == Version::V2))
        .map(|(_, _, c)| c)
        .collect();

        if let (Some(bytes), Some(h)) = (limits.memory_bytes, &host.memory) {
            let dir = self.dir_for(h, name, &v2_ctrls)?;
            match h.version {
                Version::V1 => {
                    write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    // Swap off: memory+swap limited to the same value where swap accounting exists.
                    write_if_exists(&dir.join("memory.memsw.limit_in_bytes"), &bytes.to_string())?;
                    write_if_exists(&dir.join("memory.swappiness"), "0")?;
                }
                Version::V2 => {
                    write(&dir.join("memory.max"), &bytes.to_string())?;
                    write_if_exists(&dir.join("memory.swap.max"), "0")?;
                    write_if_exists(&dir.join("memory.oom.group"), "1")?;
                }
            }
            self.memory = Some((h.version, dir));
        }
        if let (Some((quota, period)), Some(h)) = (limits.cpu, &host.cpu) {
            let dir = self.dir_for(h, name, &v2_ctrls)?;
            match h.version {
                Version::V1 => {
                    write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                Version::V2 => write(&dir.join("cpu.max"), &format!("{quota} {period}"))?,
            }
        }
        if let (Some(max), Some(h)) = (limits.pids, &host.pids) {
            let dir = self.dir_for(h, name, &v2_ctrls)?;
            write(&dir.join("pids.max"), &max.to_string())?;
            self.pids = Some((h.version, dir));
        }
        if let (Some((devices, bps)), Some(h)) = (&limits.io, &host.io) {
            let dir = self.dir_for(h, name, &v2_ctrls)?;
            for (maj, min) in devices {
                match h.version {
                    Version::V1 => {
                        write(
                            &dir.join("blkio.throttle.read_bps_device"),
                            &format!("{maj}:{min} {bps}"),
                        )?;
                        write(
                            &dir.join("blkio.throttle.write_bps_device"),
                            &format!("{maj}:{min} {bps}"),
                        )?;
                    }
                    Version::V2 => write(
                        &dir.join("io.max"),
                        &format!("{maj}:{min} rbps={bps} wbps={bps}"),
                    )?,
                }
            }
        }
        if let Some(h) = &host.cpuacct {
            let dir = self.dir_for(h, name, &[])?;
            self.cpuacct = Some((h.version, dir));
        }
        if let Some(rules) = &limits.devices {
            self.restrict_devices(host, name, rules)?;
        }
        Ok(())
    }

    /// v1: `a` to `devices.deny`, then one `devices.allow` line per rule. v2: a BPF device
    /// program attached to the sandbox's cgroup2 directory (created just for it on hybrid hosts;
    /// the program needs no controller).
    fn restrict_devices(
        &mut self,
        host: &CgroupHost,
        name: &str,
        rules: &[DeviceRule],
    ) -> Result<()> {
        // Same order as `CgroupHost::devices_supported`.
        if let Some(h) = &host.devices {
            let dir = self.dir_for(h, name, &[])?;
            write(&dir.join("devices.deny"), "a")?;
            // The kernel takes one rule per write.
            for line in rules.iter().filter_map(DeviceRule::v1_line) {
                write(&dir.join("devices.allow"), &line)?;
            }
        } else if let Some(own) = host.v2_own.as_ref().filter(|_| devices::bpf_supported()) {
            let h = Hierarchy {
                version: Version::V2,
                own_dir: own.clone(),
            };
            let dir = self.dir_for(&h, name, &[])?;
            let err = |what| {
                let path = dir.clone();
                move |source| CgroupError::DeviceProgram { path, what, source }
            };
            let prog = devices::load(&devices::program(rules)).map_err(err("load"))?;
            devices::attach(&prog, &dir).map_err(err("attach"))?;
        } else {
            return Err(CgroupError::DevicesUnavailable);
        }
        Ok(())
    }

    /// Moves `pid` into every hierarchy of this cgroup.
    pub fn add(&self, pid: i32) -> Result<()> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The v1 `tasks` files a single-threaded process joins by writing `0` (itself) to each.
    /// Moving oneself by thread skips the global threadgroup lock that every `cgroup.procs`
    /// write takes, and the RCU grace period that lock waits for (often 5-20 ms).
    pub fn self_join_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .filter(|d| !self.v2.contains(d))
            .map(|d| d.join("tasks"))
            .collect()
    }

    /// The `tasks` files [`Cgroup::create`] will make for `name` (its v1 directories), known
    /// before they exist so a child can be told where to join while they are being created.
    /// The launcher checks the result against [`Cgroup::self_join_files`].
    pub fn planned_self_join_files(host: &CgroupHost, name: &str, limits: &Limits) -> Vec<PathBuf> {
        let devices_v1 = limits.devices.as_ref().and(host.devices.as_ref());
        let used = [
            limits.memory_bytes.and(host.memory.as_ref()),
            limits.cpu.and(host.cpu.as_ref()),
            limits.pids.and(host.pids.as_ref()),
            limits.io.as_ref().and(host.io.as_ref()),
            host.cpuacct.as_ref(),
            devices_v1,
        ];
        let mut out: Vec<PathBuf> = Vec::new();
        for h in used.into_iter().flatten() {
            if h.version == Version::V1 {
                let t = h.own_dir.join(BASE).join(name).join("tasks");
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
        out
    }

    /// Whether [`Cgroup::create`] will make a cgroup v2 directory for these limits (a v2
    /// controller, or the v2 device program).
    pub fn uses_v2(host: &CgroupHost, limits: &Limits) -> bool {
        let v2 = |h: Option<&Hierarchy>| h.is_some_and(|h| h.version == Version::V2);
        v2(limits.memory_bytes.and(host.memory.as_ref()))
            || v2(limits.cpu.and(host.cpu.as_ref()))
            || v2(limits.pids.and(host.pids.as_ref()))
            || v2(limits.io.as_ref().and(host.io.as_ref()))
            || v2(host.cpuacct.as_ref())
            || (limits.devices.is_some() && host.devices.is_none() && host.v2_own.is_some())
    }

    /// The cgroup v2 directory, if this cgroup has one (for `CLONE_INTO_CGROUP`).
    pub fn v2_dir(&self) -> Option<&Path> {
        self.v2.first().map(PathBuf::as_path)
    }

    /// Adds `pid` to the hierarchies [`Cgroup::self_join_files`] does not cover (cgroup v2).
    pub fn add_remaining(&self, pid: i32) -> Result<()> {
        for dir in &self.v2 {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The directories created (one per hierarchy), for tests and reports.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        if let Some((v, dir)) = &self.memory {
            let (events, peak) = match v {
                Version::V1 => ("memory.oom_control", "memory.max_usage_in_bytes"),
                Version::V2 => ("memory.events", "memory.peak"),
            };
            s.oom_kills = keyed(&dir.join(events), "oom_kill").unwrap_or(0);
            s.memory_peak_bytes = read_u64(&dir.join(peak));
        }
        if let Some((_, dir)) = &self.pids {
            s.pids_max_hits = keyed(&dir.join("pids.events"), "max").unwrap_or(0);
        }
        if let Some((v, dir)) = &self.cpuacct {
            s.cpu_usage_ns = match v {
                Version::V1 => read_u64(&dir.join("cpuacct.usage")),
                Version::V2 => keyed(&dir.join("cpu.stat"), "usage_usec").map(|us| us * 1000),
            };
        }
        s
    }

    /// Whether any process is still in the cgroup (read from one hierarchy: they all hold the
    /// same processes). An unreadable list counts as populated.
    pub fn populated(&self) -> bool {
        self.dirs.first().is_some_and(|d| {
            fs::read_to_string(d.join("cgroup.procs")).map_or(true, |s| !s.trim().is_empty())
        })
    }

    /// SIGKILLs every process still in the cgroup.
    pub fn kill_all(&self) {
        // Every hierarchy holds the same processes (the child joins them all, its descendants
        // inherit them): a v2 `cgroup.kill` (Linux 5.14+) reaches all of them at once.
        if let Some(dir) = self.v2.first() {
            if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                return;
            }
        }
        for dir in &self.dirs {
            for pid in fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
            {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: kill(2) with a pid read from the cgroup; no memory is involved.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    /// Kills what is left and removes the directories (retrying while the kernel reaps).
    pub fn remove(&mut self) -> Result<()> {
        let mut first_err = None;
        self.v2.clear();
        for dir in std::mem::take(&mut self.dirs).into_iter().rev() {
            if let Err(e) = remove_dir(&dir) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "could not remove sandbox cgroup");
        }
    }
}

fn remove_dir(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                let _ = fs::write(dir.join("cgroup.kill"), "1");
                for pid in fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        // SAFETY: kill(2) with a pid read from the cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(CgroupError::Io {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// cgroup v2: controllers must be enabled in every ancestor's `cgroup.subtree_control`, and a
/// cgroup with processes cannot enable them for its children ("no internal processes"). If the
/// supervisor's own cgroup has processes, they move to a `corral-supervisor` leaf first, the
/// usual arrangement for a delegated cgroup (systemd `Delegate=yes`).
fn enable_v2_controllers(own: &Path, base: &Path, ctrls: &[&str]) -> Result<()> {
    let want = ctrls
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let own_ctl = own.join("cgroup.subtree_control");
    let enabled: BTreeSet<String> = fs::read_to_string(&own_ctl)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if !ctrls.iter().all(|c| enabled.contains(*c)) {
        if let Err(e) = fs::write(&own_ctl, &want) {
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(CgroupError::Io {
                    path: own_ctl,
                    source: e,
                });
            }
            let leaf = own.join(V2_LEAF);
            mkdir(&leaf)?;
            for pid in fs::read_to_string(own.join("cgroup.procs"))
                .map_err(io(own))?
                .lines()
            {
                // A process may exit meanwhile; ESRCH is fine.
                let _ = fs::write(leaf.join("cgroup.procs"), pid.trim());
            }
            fs::write(&own_ctl, &want).map_err(io(&own_ctl))?;
        }
    }
    mkdir(base)?;
    write(&base.join("cgroup.subtree_control"), &want)
}

fn mkdir(p: &Path) -> Result<()> {
    match fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Io {
            path: p.to_path_buf(),
            source,
        }),
    }
}

fn write(p: &Path, v: &str) -> Result<()> {
    fs::write(p, v).map_err(io(p))
}

fn write_if_exists(p: &Path, v: &str) -> Result<()> {
    if p.exists() {
        write(p, v)
    } else {
        Ok(())
    }
}

fn read_u64(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Value of `key` in a flat-keyed file (`oom_kill 3`).
fn keyed(p: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(p).ok()?.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key)
            .then(|| it.next()?.parse().ok())
            .flatten()
    })
}

/// Start time (clock ticks since boot) of `pid`, from `/proc/<pid>/stat` field 22.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Name of the next sandbox cgroup of this supervisor.
pub fn sandbox_name(seq: u64) -> String {
    let pid = std::process::id();
    format!("{pid}-{}-{seq}", process_start_time(pid).unwrap_or(0))
}

/// Removes sandbox cgroups whose supervisor is gone (killed before it could clean up),
/// killing whatever still runs in them. Returns the directories removed.
pub fn sweep_stale(host: &CgroupHost) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let bases: BTreeSet<PathBuf> = host
        .hierarchies()
        .map(|h| &h.own_dir)
        .chain(&host.v2_own)
        .map(|d| d.join(BASE))
        .collect();
    for base in bases {
        let Ok(rd) = fs::read_dir(&base) else {
            continue;
        };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let mut parts = name.splitn(3, '-');
            let (Some(Ok(pid)), Some(Ok(start))) = (
                parts.next().map(str::parse::<u32>),
                parts.next().map(str::parse::<u64>),
            ) else {
                continue;
            };
            // This process's own (a name with start time 0 where /proc could not tell it) are
            // never stale: the sweep runs while its first sandbox is running.
            if pid == std::process::id() || process_start_time(pid) == Some(start) {
                continue; // owner alive
            }
            let dir = entry.path();
            if remove_dir(&dir).is_ok() {
                removed.push(dir);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_HYBRID: &str = "\
30 27 0:25 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 27 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
31 27 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 27 0:27 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 27 0:28 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
34 27 0:29 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
35 27 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const OWN_HYBRID: &str =
        "8:pids:/\n7:blkio:/\n5:devices:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn hybrid_host_uses_v1_controllers_and_own_paths() {
        let h = CgroupHost::from_proc(MOUNTINFO_HYBRID, OWN_HYBRID, &|_| Some(String::new()));
        let mem = h.memory.unwrap();
        assert_eq!(mem.version, Version::V1);
        assert_eq!(
            mem.own_dir,
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert_eq!(h.cpu.unwrap().own_dir, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(h.io.unwrap().version, Version::V1);
        assert_eq!(h.v2_mount, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(h.v2_own, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let dev = h.devices.unwrap();
        assert_eq!(dev.version, Version::V1);
        assert_eq!(dev.own_dir, PathBuf::from("/sys/fs/cgroup/devices"));
    }

    #[test]
    fn pure_v2_host_reads_controllers_of_own_cgroup() {
        let mi = "25 20 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let own = "0::/system.slice/corral.service\n";
        let h = CgroupHost::from_proc(mi, own, &|p| {
            assert_eq!(
                p,
                Path::new("/sys/fs/cgroup/system.slice/corral.service/cgroup.controllers")
            );
            Some("cpuset cpu io memory pids\n".into())
        });
        for c in [&h.memory, &h.cpu, &h.pids, &h.io] {
            let c = c.as_ref().unwrap();
            assert_eq!(c.version, Version::V2);
            assert_eq!(
                c.own_dir,
                PathBuf::from("/sys/fs/cgroup/system.slice/corral.service")
            );
        }
        // v2 has no devices controller; device programs attach in the own cgroup.
        assert_eq!(h.devices, None);
        assert_eq!(
            h.v2_own,
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/corral.service"))
        );
    }

    #[test]
    fn v2_limits_written_to_a_delegated_tree() {
        // A fake v2 tree in a temp dir: the files a kernel would show.
        let tmp = tempfile::tempdir().unwrap();
        let own = tmp.path().join("svc");
        fs::create_dir(&own).unwrap();
        fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        let h = Hierarchy {
            version: Version::V2,
            own_dir: own.clone(),
        };
        let host = CgroupHost {
            memory: Some(h.clone()),
            cpu: Some(h.clone()),
            pids: Some(h.clone()),
            io: None,
            cpuacct: None,
            devices: None,
            v2_mount: None,
            v2_own: None,
        };
        let limits = Limits {
            memory_bytes: Some(1 << 20),
            cpu: Some((50_000, 100_000)),
            pids: Some(40),
            io: None,
            devices: None,
        };
        let mut cg = Cgroup::create(&host, "1-2-3", &limits).unwrap();
        let dir = own.join("corral/1-2-3");
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            "1048576"
        );
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "50000 100000"
        );
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "40");
        assert_eq!(
            fs::read_to_string(own.join("corral/cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
        // remove() must tolerate regular files a fake tree has; the real kernel has none.
        for f in ["memory.max", "cpu.max", "pids.max"] {
            fs::remove_file(dir.join(f)).unwrap();
        }
        cg.remove().unwrap();
        assert!(!dir.exists());
    }
}
