//! The model I/O audit log: one encrypted, tamper-evident entry per request that reaches a model
//! (SLM or LLM answers, escalations, denials, failures), readable back by the key holder with
//! `corral logs decrypt` and checked with `corral logs verify`. `docs/audit.md` describes the
//! format and what it does and does not protect against.
//!
//! How the files relate:
//! - `config.rs`: the `[audit]` section of corral.toml ([`RawAudit`]) and its validated form
//!   ([`AuditConfig`]), including where the key comes from ([`KeySource`]).
//! - `key.rs`: [`AuditKey`], a 256-bit key, its key id and the two subkeys derived from it once
//!   (AES-256-GCM for payloads, HMAC-SHA256 for the chain); key files (mode 0600 or refused) and
//!   [`Keyring`], the keys a reader holds, looked up by key id.
//! - `entry.rs`: what a caller records ([`AuditRecord`]) and what is stored: plaintext
//!   [`EntryMeta`] with nothing sensitive in it, and the request and response payloads, redacted
//!   (sensitive JSON keys, PII) and then encrypted with the metadata bound as associated data
//!   ([`EntryEncoder`]).
//! - `format.rs`: the files on disk: one JSON record per line ([`Record`]: `open`, `entry`,
//!   `retention`, `seal`), each carrying the previous record's MAC and its own; the `HEAD`
//!   checkpoint ([`Checkpoint`]) that protects the tail of the active file; file names.
//! - `writer.rs`: [`AuditLog`], the request path's handle: a bounded queue to a writer thread that
//!   redacts and encrypts entries in batches.
//! - `store.rs`: the directory under its lock: appending a batch to the chain, fsync, `HEAD`,
//!   rotation, retention, and recovery after a crash (or evidence of tampering).
//! - `retention.rs`: which sealed files are old enough to delete; deletions are themselves
//!   recorded (a `retention` record) before the files go.
//! - `verify.rs`: reading the log back: [`verify_path`] checks MACs, GCM tags, sequence numbers,
//!   links between files, seals and the checkpoint, and names the first bad record;
//!   [`decrypt_path`] yields decrypted entries.
//! - `time.rs`: RFC 3339 timestamps (UTC) without a date-time dependency.

mod config;
mod entry;
mod format;
mod key;
mod retention;
mod store;
mod time;
mod verify;
mod writer;

use std::path::PathBuf;

pub use config::{AuditConfig, KeySource, QueueFull, RawAudit};
pub use entry::{
    new_id, AuditRecord, Caller, EntryEncoder, EntryMeta, Interaction, PreparedEntry, Route,
    TokenUsage,
};
pub use format::{Checkpoint, Record, CHECKPOINT_FILE, LOCK_FILE};
pub use key::{AuditKey, KeyId, Keyring, DEFAULT_KEY_FILE};
pub use time::{format_rfc3339, parse_rfc3339, parse_since};
pub use verify::{decrypt_path, verify_path, DecryptedEntry, Problem, Verification};
pub use writer::{AuditLog, AuditStats};

/// Errors from opening, writing or reading the audit log, and from its keys.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit key file {} does not exist (audit.key_file); create one with `corral logs keygen --out {}`", path.display(), path.display())]
    KeyFileMissing { path: PathBuf },
    #[error("audit key file {} has mode {mode:04o}: it must be 0600 or stricter, readable by its owner only (chmod 600 {})", path.display(), path.display())]
    KeyFileMode { path: PathBuf, mode: u32 },
    #[error("audit key file {}: {source}", path.display())]
    KeyFileIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit key from {origin}: {message}")]
    BadKey { origin: String, message: String },
    #[error("{} already exists: refusing to overwrite an audit key (entries written with it could no longer be read)", path.display())]
    KeyExists { path: PathBuf },
    #[error("no audit key: pass --key-file, set CORRAL_LOG_KEY, or set audit.key_file")]
    NoKey,
    #[error("could not get random bytes from the operating system: {0}")]
    Random(String),
    #[error("audit log {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit log {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("audit log writer: {0}")]
    Writer(String),
}

impl AuditError {
    /// Whether the user can fix this in configuration or key files (exit status 2) rather than
    /// it being a failure of the log itself.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            AuditError::KeyFileMissing { .. }
                | AuditError::KeyFileMode { .. }
                | AuditError::BadKey { .. }
                | AuditError::KeyExists { .. }
                | AuditError::NoKey
        )
    }

    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> AuditError {
        let path = path.into();
        move |source| AuditError::Io { path, source }
    }
}

pub type Result<T, E = AuditError> = std::result::Result<T, E>;
