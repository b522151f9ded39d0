//! [`AuditLog`]: the request path's handle on the log.
//!
//! [`AuditLog::record`] only timestamps the record and puts it on a bounded queue (a
//! `sync_channel`); when the queue is full, `audit.on_queue_full` decides: `drop` (counted in
//! [`AuditStats::dropped`], the request never waits) or `block` (backpressure). One writer thread
//! takes what is queued, up to [`MAX_BATCH`] at a time, and for each batch:
//!
//! 1. redacts and encrypts every entry (no lock held; this is most of the work);
//! 2. hands them to the store (`store.rs`), which takes the directory lock (`flock` on `.lock`),
//!    so several corral processes can share one log and one chain, and re-reads `HEAD` in case
//!    another process wrote since;
//! 3. rotates the active file when it is too big or too old (seal record, fsync, new file whose
//!    `open` record links to the seal), and applies retention (a `retention` record first);
//! 4. chains the entries (seq, prev MAC, MAC), appends them in one write, fsyncs, rewrites `HEAD`
//!    (write, fsync, rename), and only then deletes expired files.
//!
//! Nothing is sealed on close: `HEAD` already pins the end of the active file after every fsync,
//! and the next process to open the log (the next `corral run`) appends to the same file.

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::config::{AuditConfig, KeySource, QueueFull};
use super::entry::{AuditRecord, EntryEncoder};
use super::format::LOCK_FILE;
use super::key::{AuditKey, KeyId};
use super::store::{DirLock, Store, HOUSEKEEPING};
use super::{AuditError, Result};

/// Most entries the writer takes off the queue for one write and fsync.
pub const MAX_BATCH: usize = 256;

/// Counters since [`AuditLog::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Entries accepted onto the queue.
    pub recorded: u64,
    /// Entries dropped because the queue was full (`on_queue_full = "drop"`).
    pub dropped: u64,
    /// Entries written and fsynced.
    pub written: u64,
    /// Entries lost to an error (encryption, a failed write, a stopped writer); each is logged.
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    recorded: AtomicU64,
    dropped: AtomicU64,
    written: AtomicU64,
    failed: AtomicU64,
}

// A record is a few hundred bytes; boxing it would cost an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Entry(AuditRecord, SystemTime),
    Flush(SyncSender<()>),
}

/// The audit log, open for writing. `Send + Sync`: share one per process. Dropping it (or
/// [`AuditLog::shutdown`]) writes everything queued and waits for the writer.
#[derive(Debug)]
pub struct AuditLog {
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<()>>,
    policy: QueueFull,
    counters: Arc<Counters>,
    dir: PathBuf,
    key_id: KeyId,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Entry(..) => "Entry",
            Msg::Flush(_) => "Flush",
        })
    }
}

impl AuditLog {
    /// Opens (creating when needed) the log in `config.dir`: directory 0700, the key (see
    /// [`KeySource`]; a generated key's path is logged), recovery of the active file, retention;
    /// then starts the writer thread. Errors here are the ones a caller should refuse to serve
    /// requests over: a missing or loose key file, an unwritable directory.
    pub fn open(config: &AuditConfig) -> Result<AuditLog> {
        let dir = config.dir.clone();
        create_private_dir(&dir)?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dir.join(LOCK_FILE))
            .map_err(AuditError::io(dir.join(LOCK_FILE)))?;
        let key = {
            let _guard = DirLock::take(&lock, &dir)?;
            load_key(&config.key)?
        };
        let key_id = key.id();
        let encoder = EntryEncoder::new(key.clone(), config);
        let mut store = Store::new(&dir, key, lock, config);
        store.write_batch(Vec::new())?;
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity);
        let c = Arc::clone(&counters);
        let group_commit = config.commit_interval;
        let thread = std::thread::Builder::new()
            .name("corral-audit".into())
            .spawn(move || run(&encoder, store, &rx, &c, group_commit))
            .map_err(|e| AuditError::Writer(format!("cannot start the writer thread: {e}")))?;
        Ok(AuditLog {
            tx: Some(tx),
            thread: Some(thread),
            policy: config.on_queue_full,
            counters,
            dir,
            key_id,
        })
    }

    /// Queues one entry, stamped with the current time. With `on_queue_full = "drop"` this never
    /// waits: a full queue drops the entry, counts it and (at the 1st, 2nd, 4th, 8th, ... drop)
    /// logs a warning. With `"block"` it waits for room. Returns whether the entry was queued.
    pub fn record(&self, rec: AuditRecord) -> bool {
        let Some(tx) = &self.tx else { return false };
        let msg = Msg::Entry(rec, SystemTime::now());
        let queued = match self.policy {
            QueueFull::Drop => match tx.try_send(msg) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(
                            dropped = n,
                            "audit log queue full: entries dropped (audit.on_queue_full = \"drop\"; raise audit.queue_capacity or use \"block\")"
                        );
                    }
                    return false;
                }
                Err(TrySendError::Disconnected(_)) => false,
            },
            QueueFull::Block => tx.send(msg).is_ok(),
        };
        let counter = if queued {
            &self.counters.recorded
        } else {
            &self.counters.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        queued
    }

    /// Waits until everything queued before this call is written and fsynced (or failed).
    pub fn flush(&self) -> Result<()> {
        let stopped = || AuditError::Writer("the writer thread has stopped".into());
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        let (ack, done) = mpsc::sync_channel(1);
        tx.send(Msg::Flush(ack)).map_err(|_| stopped())?;
        done.recv().map_err(|_| stopped())
    }

    pub fn stats(&self) -> AuditStats {
        let c = &self.counters;
        AuditStats {
            recorded: c.recorded.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            written: c.written.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Writes everything queued, stops the writer and returns the final counters.
    pub fn shutdown(mut self) -> Result<AuditStats> {
        match self.close() {
            Some(Err(())) => Err(AuditError::Writer("the writer thread panicked".into())),
            _ => Ok(self.stats()),
        }
    }

    fn close(&mut self) -> Option<std::result::Result<(), ()>> {
        self.tx = None;
        self.thread.take().map(|t| t.join().map_err(|_| ()))
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The writer thread: takes up to [`MAX_BATCH`] queued entries, prepares them (redaction and
/// encryption, no lock held) and hands them to the store; runs housekeeping when idle.
fn run(
    encoder: &EntryEncoder,
    mut store: Store,
    rx: &Receiver<Msg>,
    counters: &Counters,
    group_commit: Duration,
) {
    loop {
        let first = match rx.recv_timeout(HOUSEKEEPING) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = store.write_batch(Vec::new()) {
                    tracing::error!(error = %e, "audit log housekeeping failed");
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut entries = Vec::new();
        let mut acks = Vec::new();
        let mut take = |m: Msg| match m {
            Msg::Entry(rec, at) => match encoder.prepare(rec, at) {
                Ok(p) => entries.push(p),
                Err(e) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "audit entry not written");
                }
            },
            Msg::Flush(ack) => acks.push(ack),
        };
        let mut flush = matches!(first, Msg::Flush(_));
        take(first);
        // Group commit: gather what arrives within `audit.commit_interval_ms` of the first entry, so that a
        // steady stream of requests costs one append + fsync + HEAD rewrite per window rather
        // than per request (those fsyncs otherwise compete with the requests themselves). A
        // flush, or the log closing, ends the window at once.
        let window = Instant::now() + group_commit;
        for _ in 1..MAX_BATCH {
            let next = if flush {
                rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
            } else {
                rx.recv_timeout(window.saturating_duration_since(Instant::now()))
            };
            match next {
                Ok(m) => {
                    flush |= matches!(m, Msg::Flush(_));
                    take(m)
                }
                Err(_) => break,
            }
        }
        let n = entries.len() as u64;
        match store.write_batch(entries) {
            Ok(()) => counters.written.fetch_add(n, Ordering::Relaxed),
            Err(e) => {
                tracing::error!(error = %e, entries = n, "audit entries not written");
                counters.failed.fetch_add(n, Ordering::Relaxed)
            }
        };
        for a in acks {
            let _ = a.send(());
        }
    }
}

/// Creates `dir` 0700 (and missing parents), or tightens an existing one that group or others
/// can access.
fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(AuditError::io(dir))?;
    let mode = std::fs::metadata(dir).map_err(AuditError::io(dir))?.mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(AuditError::io(dir))?;
        tracing::warn!(dir = %dir.display(), "audit log directory had mode {mode:04o}; set it to 0700");
    }
    Ok(())
}

fn load_key(source: &KeySource) -> Result<AuditKey> {
    match source {
        KeySource::Env(k) => Ok(k.clone()),
        KeySource::File(p) => AuditKey::load(p),
        KeySource::Generated(p) => match AuditKey::load(p) {
            Err(AuditError::KeyFileMissing { .. }) => {
                let k = AuditKey::generate_file(p)?;
                tracing::warn!(
                    key_file = %p.display(),
                    key_id = %k.id(),
                    "no audit key configured: generated one at {} (mode 0600). Keep a copy somewhere else: the log cannot be read without it, and anyone who can read it can read the log",
                    p.display()
                );
                Ok(k)
            }
            other => other,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::audit::format::{file_name, list_files, CHECKPOINT_FILE};
    use crate::audit::key::Keyring;
    use crate::audit::store::flock;
    use crate::audit::verify::verify_path;

    fn read(path: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(path).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    fn config(dir: &Path) -> AuditConfig {
        let mut c = AuditConfig::new(dir);
        c.key = KeySource::Env(AuditKey::from_bytes(&[4u8; 32]));
        c
    }

    fn keys() -> Keyring {
        Keyring::from(AuditKey::from_bytes(&[4u8; 32]))
    }

    fn rec(i: usize) -> AuditRecord {
        AuditRecord {
            request_id: format!("req-{i}"),
            request: json!({"prompt": format!("prompt {i}")}),
            response: json!({"text": format!("answer {i}")}),
            ..Default::default()
        }
    }

    #[test]
    fn full_queue_drops_and_counts_or_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.queue_capacity = 2;
        let log = AuditLog::open(&c).unwrap();
        // Hold the directory lock so the writer stalls on its first batch.
        let lock = File::open(dir.path().join(LOCK_FILE)).unwrap();
        flock(&lock, libc::LOCK_EX).unwrap();
        // The writer takes up to MAX_BATCH entries off the queue before it waits for the lock,
        // and the queue holds 2 more: the rest are dropped.
        let mut queued = 0;
        for i in 0..MAX_BATCH + 100 {
            queued += usize::from(log.record(rec(i)));
        }
        let s = log.stats();
        assert!(s.dropped >= 98, "{s:?}");
        assert_eq!(s.recorded as usize, queued);
        flock(&lock, libc::LOCK_UN).unwrap();
        let s = log.shutdown().unwrap();
        assert_eq!(s.written, s.recorded);
        assert_eq!(s.failed, 0);
        let v = verify_path(dir.path(), &keys()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(v.entries, s.written);

        // `block`: the caller waits for room instead.
        let mut c = config(dir.path());
        c.queue_capacity = 1;
        c.on_queue_full = QueueFull::Block;
        let log = Arc::new(AuditLog::open(&c).unwrap());
        flock(&lock, libc::LOCK_EX).unwrap();
        let l = Arc::clone(&log);
        let n = MAX_BATCH + 10;
        let t = std::thread::spawn(move || (0..n).filter(|i| l.record(rec(*i))).count() == n);
        std::thread::sleep(Duration::from_millis(500));
        let blocked = !t.is_finished();
        flock(&lock, libc::LOCK_UN).unwrap();
        assert!(blocked, "record() blocks while the queue is full");
        assert!(t.join().unwrap());
        log.flush().unwrap();
        let s = log.stats();
        assert_eq!((s.recorded, s.dropped, s.written), (n as u64, 0, n as u64));
    }

    #[test]
    fn reopening_appends_to_the_same_file_and_a_crash_tail_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        for i in 0..3 {
            let log = AuditLog::open(&c).unwrap();
            assert!(log.record(rec(i)));
            log.shutdown().unwrap();
        }
        assert_eq!(
            list_files(dir.path()).unwrap().len(),
            1,
            "one file for three runs"
        );
        let active = dir.path().join(file_name(0));
        // A crash after the fsync of a batch, before HEAD was rewritten: HEAD is one batch
        // behind. And a line cut short by a crash.
        let head_before = read(&dir.path().join(CHECKPOINT_FILE));
        let log = AuditLog::open(&c).unwrap();
        log.record(rec(3));
        log.shutdown().unwrap();
        std::fs::write(dir.path().join(CHECKPOINT_FILE), &head_before).unwrap();
        let mut f = OpenOptions::new().append(true).open(&active).unwrap();
        f.write_all(b"{\"type\":\"entry\",\"seq\":5").unwrap();
        let v = verify_path(dir.path(), &keys()).unwrap();
        assert!(
            v.problems
                .iter()
                .any(|p| p.what.contains("incomplete last line")),
            "{:?}",
            v.problems
        );
        let log = AuditLog::open(&c).unwrap();
        log.record(rec(4));
        log.shutdown().unwrap();
        let v = verify_path(dir.path(), &keys()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(v.entries, 5);
        assert_eq!(list_files(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn a_cut_active_file_makes_the_writer_start_a_new_one_and_verify_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let log = AuditLog::open(&c).unwrap();
        for i in 0..3 {
            log.record(rec(i));
        }
        log.shutdown().unwrap();
        let active = dir.path().join(file_name(0));
        let len = std::fs::metadata(&active).unwrap().len();
        let text = String::from_utf8(read(&active)).unwrap();
        let last_line = text.trim_end().rsplit('\n').next().unwrap().len() as u64 + 1;
        OpenOptions::new()
            .write(true)
            .open(&active)
            .unwrap()
            .set_len(len - last_line)
            .unwrap();
        let log = AuditLog::open(&c).unwrap();
        log.record(rec(9));
        log.shutdown().unwrap();
        assert_eq!(list_files(dir.path()).unwrap().len(), 2);
        let v = verify_path(dir.path(), &keys()).unwrap();
        let all: Vec<String> = v.problems.iter().map(ToString::to_string).collect();
        assert!(
            all.iter().any(|p| p.contains("tail truncated"))
                && all.iter().any(|p| p.contains("its tail was cut")),
            "{all:#?}"
        );
    }
}
