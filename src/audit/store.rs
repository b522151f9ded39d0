//! The log directory under its lock: [`Store::write_batch`] catches up with `HEAD` (another
//! process may have written since), rotates, applies retention, appends a batch, fsyncs and
//! rewrites `HEAD`. Catching up is also recovery after a crash or tampering: a file longer than
//! `HEAD` says (a crash between the fsync and the rewrite of `HEAD`) is adopted when its extra
//! records verify, and a cut last line is trimmed; anything else that does not match (`HEAD`
//! missing, invalid, or ahead of its file) starts a new file whose `open` record states the
//! anomaly, which `corral logs verify` then reports.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::config::AuditConfig;
use super::entry::PreparedEntry;
use super::format::{
    self, encode, encode_checkpoint, file_name, list_files, mac_hex, parse_checkpoint,
    parse_file_name, parse_mac, Checkpoint, CheckpointError, Mac, Record, CHECKPOINT_FILE, GENESIS,
    LOCK_FILE,
};
use super::key::{AuditKey, Keyring};
use super::retention;
use super::time::{format_rfc3339, parse_rfc3339};
use super::verify::{scan_file, ScanStart};
use super::{AuditError, Result};

/// How often retention runs (and, when idle, how long the writer waits between checks).
pub(super) const HOUSEKEEPING: Duration = Duration::from_secs(3600);

/// `flock(2)` on the lock file, released when dropped.
pub(super) struct DirLock<'a>(&'a File);

impl<'a> DirLock<'a> {
    pub(super) fn take(file: &'a File, dir: &Path) -> Result<DirLock<'a>> {
        flock(file, libc::LOCK_EX).map_err(AuditError::io(dir.join(LOCK_FILE)))?;
        Ok(DirLock(file))
    }
}

impl Drop for DirLock<'_> {
    fn drop(&mut self) {
        let _ = flock(self.0, libc::LOCK_UN);
    }
}

/// `flock(2)`, retried when interrupted by a signal.
pub(super) fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock(2) on a descriptor `file` owns and keeps open for the duration of the
        // call; it takes no pointers.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The file being appended to.
#[derive(Debug)]
struct Active {
    name: String,
    file: File,
    bytes: u64,
    first_seq: u64,
    seq: u64,
    mac: Mac,
    created: SystemTime,
}

/// The log directory as one writer sees it, changed only under the directory lock.
#[derive(Debug)]
pub(super) struct Store {
    dir: PathBuf,
    key: AuditKey,
    /// `key` alone, for reading the checkpoint and scanning files.
    keys: Keyring,
    lock: File,
    active: Option<Active>,
    /// The text of `HEAD` as this writer last wrote or read it.
    checkpoint: Option<String>,
    max_file_bytes: u64,
    max_file_age: Duration,
    retention: Option<Duration>,
    last_retention: Option<Instant>,
}

impl Store {
    /// A store for `dir`, written with `key`; nothing is read until the first
    /// [`Store::write_batch`].
    pub(super) fn new(dir: &Path, key: AuditKey, lock: File, config: &AuditConfig) -> Store {
        Store {
            dir: dir.to_path_buf(),
            keys: Keyring::from(key.clone()),
            key,
            lock,
            active: None,
            checkpoint: None,
            max_file_bytes: config.max_file_bytes,
            max_file_age: config.max_file_age,
            retention: config.retention,
            last_retention: None,
        }
    }

    fn key(&self) -> &AuditKey {
        &self.key
    }

    /// Under the directory lock: catch up with `HEAD`, rotate, apply retention, append
    /// `entries`, fsync, rewrite `HEAD`, then delete expired files.
    pub(super) fn write_batch(&mut self, entries: Vec<PreparedEntry>) -> Result<()> {
        let lock = self
            .lock
            .try_clone()
            .map_err(AuditError::io(self.dir.join(LOCK_FILE)))?;
        let _guard = DirLock::take(&lock, &self.dir)?;
        self.sync()?;
        let now = SystemTime::now();
        self.rotate_if_due(now)?;
        let expired = self.expired(now)?;
        let (mut seq, mut mac) = match &self.active {
            Some(a) => (a.seq, a.mac),
            None => return Err(AuditError::Writer("no active file".into())),
        };
        let kid = self.key().id_hex().to_string();
        let mut text = String::new();
        if !expired.is_empty() {
            seq += 1;
            let rec = Record::Retention {
                seq,
                kid: kid.clone(),
                prev: mac_hex(&mac),
                ts: format_rfc3339(now),
                deleted: expired.clone(),
            };
            let (line, m) = encode(&rec, self.key());
            text.push_str(&line);
            mac = m;
        }
        for e in &entries {
            // Rotate inside a batch too, so no file grows far past max_file_bytes.
            let fill = self.active.as_ref().map_or(0, |a| a.bytes) + text.len() as u64;
            if fill >= self.max_file_bytes {
                if !text.is_empty() {
                    self.append(&text, seq, mac)?;
                    text.clear();
                }
                self.rotate(now)?;
                if let Some(a) = &self.active {
                    (seq, mac) = (a.seq, a.mac);
                }
            }
            seq += 1;
            let (line, m) = e.chain(seq, self.key(), &mac);
            text.push_str(&line);
            mac = m;
        }
        if !text.is_empty() {
            self.append(&text, seq, mac)?;
            self.write_checkpoint()?;
        }
        for d in &expired {
            let path = self.dir.join(&d.file);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(file = %path.display(), "audit retention: deleted"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "audit retention: could not delete")
                }
            }
        }
        Ok(())
    }

    /// Makes `self.active` match the directory: unchanged `HEAD` and file length is the fast
    /// path; anything else goes through [`Writer::recover`].
    fn sync(&mut self) -> Result<()> {
        let head_path = self.dir.join(CHECKPOINT_FILE);
        let text = match std::fs::read_to_string(&head_path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(AuditError::io(head_path)(e)),
        };
        if let (Some(a), Some(cached)) = (&self.active, &self.checkpoint) {
            let len = a.file.metadata().map(|m| m.len()).ok();
            if text.as_ref() == Some(cached) && len == Some(a.bytes) {
                return Ok(());
            }
        }
        self.active = None;
        self.checkpoint = None;
        self.recover(text)
    }

    fn recover(&mut self, text: Option<String>) -> Result<()> {
        let parsed = match &text {
            None => Err(CheckpointError::Missing),
            Some(t) => parse_checkpoint(t.trim_end_matches('\n'), &self.keys),
        };
        match parsed {
            Ok(c) => self.recover_from(c, text),
            // Written under another key: a rotated key. Continue its chain in a new file.
            Err(CheckpointError::UnknownKey(c)) => match parse_mac(&c.head) {
                Some(head) => self.new_file(Some((c.seq, head, c.file)), None),
                None => {
                    let last = self.last_record_on_disk()?;
                    self.new_file(last, Some("checkpoint HEAD is unreadable".into()))
                }
            },
            Err(CheckpointError::Missing)
                if list_files(&self.dir)
                    .map_err(AuditError::io(&self.dir))?
                    .is_empty() =>
            {
                self.new_file(None, None)
            }
            Err(e) => {
                let last = self.last_record_on_disk()?;
                self.new_file(last, Some(e.to_string()))
            }
        }
    }

    fn recover_from(&mut self, c: Checkpoint, text: Option<String>) -> Result<()> {
        let path = self.dir.join(&c.file);
        let head = parse_mac(&c.head).unwrap_or(GENESIS);
        let after = Some((c.seq, head, c.file.clone()));
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let why = format!("{} named by checkpoint HEAD is missing", c.file);
                return self.new_file(after, Some(why));
            }
            Err(e) => return Err(AuditError::io(path)(e)),
        };
        let created = parse_rfc3339(&c.created).unwrap_or_else(SystemTime::now);
        if len == c.bytes {
            self.resume(&c.file, len, c.seq, head, created)?;
            self.checkpoint = text;
            return Ok(());
        }
        if len < c.bytes {
            let why = format!(
                "{} is {len} bytes, checkpoint HEAD recorded {} (its tail was cut)",
                c.file, c.bytes
            );
            return self.new_file(after, Some(why));
        }
        // Longer than the checkpoint: records written after it (a crash before HEAD was
        // rewritten), possibly through a seal and into the next file.
        let mut name = c.file.clone();
        let mut start = ScanStart {
            offset: c.bytes,
            seq: c.seq + 1,
            prev: head,
        };
        let mut created = created;
        loop {
            let path = self.dir.join(&name);
            let scan =
                scan_file(&path, &self.keys, Some(start), None).map_err(AuditError::io(&path))?;
            let bad = scan.problems.len() > usize::from(scan.incomplete_tail);
            if bad {
                let why =
                    format!(
                    "records in {name} after the point checkpoint HEAD recorded do not verify: {}",
                    scan.problems.first().map(ToString::to_string).unwrap_or_default()
                );
                return self.new_file(after, Some(why));
            }
            if scan.incomplete_tail {
                trim(&path, scan.complete_bytes)?;
            }
            let (seq, mac) = scan.last().unwrap_or((start.seq - 1, start.prev));
            if !scan.sealed {
                self.resume(&name, scan.complete_bytes, seq, mac, created)?;
                return self.write_checkpoint();
            }
            let next = file_name(seq + 1);
            if !self.dir.join(&next).exists() {
                return self.new_file(Some((seq, mac, name)), None);
            }
            // Rotated just before the crash: the next file must continue from the seal.
            let first = scan_file(&self.dir.join(&next), &self.keys, None, None)
                .map_err(AuditError::io(self.dir.join(&next)))?;
            let links = first.open.as_ref().is_some_and(|o| {
                o.seq == seq + 1 && o.prev == Some(mac) && o.prev_file.as_deref() == Some(&name)
            });
            if !links {
                return Err(AuditError::Invalid {
                    path: self.dir.join(&next),
                    message: "exists but does not continue the log from the seal before it; move it aside and run `corral logs verify`".into(),
                });
            }
            created = first
                .open
                .as_ref()
                .and_then(|o| parse_rfc3339(&o.ts))
                .unwrap_or_else(SystemTime::now);
            start = ScanStart {
                offset: 0,
                seq: seq + 1,
                prev: mac,
            };
            name = next;
        }
    }

    /// The last record of the newest file, whatever state it is in: where a new file links to
    /// when `HEAD` cannot be trusted.
    fn last_record_on_disk(&self) -> Result<Option<(u64, Mac, String)>> {
        let names = list_files(&self.dir).map_err(AuditError::io(&self.dir))?;
        for name in names.iter().rev() {
            let path = self.dir.join(name);
            let scan = scan_file(&path, &self.keys, None, None).map_err(AuditError::io(&path))?;
            if let Some((seq, mac)) = scan.last() {
                return Ok(Some((seq, mac, name.clone())));
            }
        }
        Ok(None)
    }

    fn resume(
        &mut self,
        name: &str,
        bytes: u64,
        seq: u64,
        mac: Mac,
        created: SystemTime,
    ) -> Result<()> {
        let path = self.dir.join(name);
        let file = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(AuditError::io(&path))?;
        self.active = Some(Active {
            name: name.to_string(),
            file,
            bytes,
            first_seq: parse_file_name(name).unwrap_or(seq),
            seq,
            mac,
            created,
        });
        Ok(())
    }

    /// Starts a file whose `open` record continues from `after` (seq, MAC, file) or from the
    /// genesis, created under a temporary name and linked into place so an existing file is
    /// never overwritten.
    fn new_file(
        &mut self,
        after: Option<(u64, Mac, String)>,
        anomaly: Option<String>,
    ) -> Result<()> {
        if let Some(a) = &anomaly {
            tracing::warn!(dir = %self.dir.display(), anomaly = %a, "audit log: starting a new file after a problem; `corral logs verify` reports it");
        }
        let (seq, prev, prev_file) = match after {
            Some((s, m, f)) => (s + 1, m, Some(f)),
            None => (0, GENESIS, None),
        };
        let name = file_name(seq);
        let now = SystemTime::now();
        let rec = Record::Open {
            seq,
            kid: self.key().id_hex().to_string(),
            prev: mac_hex(&prev),
            ts: format_rfc3339(now),
            file: name.clone(),
            prev_file,
            anomaly,
        };
        let (line, mac) = encode(&rec, self.key());
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        write_synced(&tmp, line.as_bytes())?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(AuditError::Invalid {
                    path,
                    message: "exists but is not where checkpoint HEAD says the log ends; move it aside and run `corral logs verify`".into(),
                })
            }
            Err(e) => return Err(AuditError::io(path)(e)),
        }
        sync_dir(&self.dir)?;
        self.resume(&name, line.len() as u64, seq, mac, now)?;
        self.write_checkpoint()
    }

    /// Rotates when the active file is too big, or too old and holding more than its `open`
    /// record.
    fn rotate_if_due(&mut self, now: SystemTime) -> Result<()> {
        let Some(a) = &self.active else {
            return Ok(());
        };
        let old = a.seq > a.first_seq
            && now.duration_since(a.created).unwrap_or_default() >= self.max_file_age;
        if a.bytes < self.max_file_bytes && !old {
            return Ok(());
        }
        self.rotate(now)
    }

    /// Seals the active file (fsynced) and starts the next, linked to the seal.
    fn rotate(&mut self, now: SystemTime) -> Result<()> {
        let Some(a) = &self.active else {
            return Ok(());
        };
        let seq = a.seq + 1;
        let rec = Record::Seal {
            seq,
            kid: self.key().id_hex().to_string(),
            prev: mac_hex(&a.mac),
            ts: format_rfc3339(now),
            records: seq - a.first_seq,
        };
        let name = a.name.clone();
        let (line, mac) = encode(&rec, self.key());
        self.append(&line, seq, mac)?;
        self.new_file(Some((seq, mac, name)), None)
    }

    fn expired(&mut self, now: SystemTime) -> Result<Vec<format::Deleted>> {
        let Some(keep) = self.retention else {
            return Ok(Vec::new());
        };
        if self
            .last_retention
            .is_some_and(|t| t.elapsed() < HOUSEKEEPING)
        {
            return Ok(Vec::new());
        }
        self.last_retention = Some(Instant::now());
        let active = self
            .active
            .as_ref()
            .map(|a| a.name.clone())
            .unwrap_or_default();
        retention::expired(&self.dir, &active, keep, now).map_err(AuditError::io(&self.dir))
    }

    /// Appends `text` (whole lines ending at `seq`/`mac`) to the active file and fsyncs. On
    /// failure the state is dropped, so the next batch re-reads it from `HEAD` (and trims a
    /// partly written line).
    fn append(&mut self, text: &str, seq: u64, mac: Mac) -> Result<()> {
        let Some(a) = self.active.as_mut() else {
            return Err(AuditError::Writer("no active file".into()));
        };
        let path = self.dir.join(&a.name);
        if let Err(e) = a
            .file
            .write_all(text.as_bytes())
            .and_then(|()| a.file.sync_data())
        {
            self.active = None;
            self.checkpoint = None;
            return Err(AuditError::io(path)(e));
        }
        a.bytes += text.len() as u64;
        a.seq = seq;
        a.mac = mac;
        Ok(())
    }

    /// Rewrites `HEAD` for the active file: written to `HEAD.tmp`, fsynced, renamed over.
    fn write_checkpoint(&mut self) -> Result<()> {
        let Some(a) = &self.active else {
            return Ok(());
        };
        let c = Checkpoint {
            kid: self.key().id_hex().to_string(),
            ts: format_rfc3339(SystemTime::now()),
            file: a.name.clone(),
            created: format_rfc3339(a.created),
            bytes: a.bytes,
            seq: a.seq,
            head: mac_hex(&a.mac),
        };
        let text = encode_checkpoint(&c, self.key());
        let tmp = self.dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        write_synced(&tmp, text.as_bytes())?;
        let head = self.dir.join(CHECKPOINT_FILE);
        std::fs::rename(&tmp, &head).map_err(AuditError::io(head))?;
        self.checkpoint = Some(text);
        Ok(())
    }
}

/// Writes a new file (mode 0600, replacing any old one, never through a symlink) and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(AuditError::io(path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(AuditError::io(path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(AuditError::io(dir))
}

/// Cuts a file back to `len` bytes (a line left incomplete by a crash).
fn trim(path: &Path, len: u64) -> Result<()> {
    tracing::warn!(file = %path.display(), len, "audit log: trimming an incomplete last line left by a crash");
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(AuditError::io(path))?;
    f.set_len(len)
        .and_then(|()| f.sync_all())
        .map_err(AuditError::io(path))
}
