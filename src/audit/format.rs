//! The log on disk.
//!
//! ```text
//! DIR/                          0700
//!   audit-0000000000000000.log  0600  records 0.., sealed when rotated
//!   audit-0000000000000412.log  0600  the active file: its name is the seq of its first record
//!   HEAD                        0600  checkpoint: active file, its length, last seq and MAC
//!   .lock                       0600  flock(2) taken by a writer around each batch
//!   audit.key                   0600  only when corral generated the key (no key configured)
//! ```
//!
//! A file is JSON lines, one [`Record`] per line: an `open` record first (its own file name, the
//! previous file's name, and the MAC it continues from), then `entry` and `retention` records,
//! and, once rotated, a `seal` record (how many records came before it). Every record carries a
//! global sequence number (`seq`, +1 per record across files), the key id (`kid`), the previous
//! record's MAC (`prev`, 64 hex digits; zeros before the very first record), and ends with its
//! own `"mac"`: HMAC-SHA256 under the chain subkey. For `open`, `retention` and `seal` it covers
//! the exact bytes of the line without the `,"mac":"…"` member ([`encode`]). For an `entry` it
//! covers the exact bytes of the line up to the end of `meta` and both payloads' nonces and GCM
//! tags, in a domain of its own ([`AuditKey::entry_mac`]): the tags authenticate the ciphertexts
//! (and the metadata) under the encryption key and are always checked on reading, and the rest of
//! the line must be exactly the writer's encoding of those payloads. So each MAC covers the one
//! before it, the metadata and (through the tags) the ciphertexts, and the chain runs across
//! files.
//!
//! `HEAD` is one JSON object with its own MAC (a different domain from records), rewritten after
//! each fsync: it pins the end of the active file so a truncated tail is detected even though the
//! active file has no seal yet.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::entry::{EntryMeta, Sealed};
use super::key::{push_hex, unhex, AuditKey, Keyring, MAC_LEN};

pub type Mac = [u8; MAC_LEN];
/// The `prev` of the very first record of a log.
pub const GENESIS: Mac = [0; MAC_LEN];
/// The checkpoint file's name in the audit directory.
pub const CHECKPOINT_FILE: &str = "HEAD";
/// The lock file's name in the audit directory.
pub const LOCK_FILE: &str = ".lock";

/// One line of a log file (without its MAC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// The first record of every file.
    Open {
        seq: u64,
        kid: String,
        prev: String,
        ts: String,
        /// This file's own name (a renamed file is detected).
        file: String,
        /// The file before this one; `None` only for the first file of a log.
        prev_file: Option<String>,
        /// Something the writer found wrong when it opened this file (a checkpoint that did not
        /// match its file, say); `verify` reports it.
        anomaly: Option<String>,
    },
    /// One audit entry.
    Entry {
        seq: u64,
        kid: String,
        prev: String,
        meta: Box<EntryMeta>,
        request: Sealed,
        response: Sealed,
    },
    /// Files deleted by retention, recorded before they were deleted.
    Retention {
        seq: u64,
        kid: String,
        prev: String,
        ts: String,
        deleted: Vec<Deleted>,
    },
    /// The last record of a rotated file.
    Seal {
        seq: u64,
        kid: String,
        prev: String,
        ts: String,
        /// Records in the file before this one (the `open` record included).
        records: u64,
    },
}

/// A file deleted by retention: its name, and its last record (the seal) by seq and MAC, which
/// the next file's `open` record links to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub file: String,
    pub last_seq: u64,
    pub head: String,
}

impl Record {
    pub fn seq(&self) -> u64 {
        match self {
            Record::Open { seq, .. }
            | Record::Entry { seq, .. }
            | Record::Retention { seq, .. }
            | Record::Seal { seq, .. } => *seq,
        }
    }

    pub fn kid(&self) -> &str {
        match self {
            Record::Open { kid, .. }
            | Record::Entry { kid, .. }
            | Record::Retention { kid, .. }
            | Record::Seal { kid, .. } => kid,
        }
    }

    pub fn prev(&self) -> &str {
        match self {
            Record::Open { prev, .. }
            | Record::Entry { prev, .. }
            | Record::Retention { prev, .. }
            | Record::Seal { prev, .. } => prev,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Record::Open { .. } => "open",
            Record::Entry { .. } => "entry",
            Record::Retention { .. } => "retention",
            Record::Seal { .. } => "seal",
        }
    }
}

/// The checkpoint (`HEAD`): where the log ends, as of the writer's last fsync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub kid: String,
    pub ts: String,
    /// The active file.
    pub file: String,
    /// When the active file was opened (its `open` record's time), for rotation by age.
    pub created: String,
    /// The active file's length.
    pub bytes: u64,
    /// The seq of its last record.
    pub seq: u64,
    /// The MAC of its last record, hex.
    pub head: String,
}

/// `audit-<seq of the first record, 16 digits>.log`.
pub fn file_name(first_seq: u64) -> String {
    format!("audit-{first_seq:016}.log")
}

/// The first seq a log file name carries; `None` for other names.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".log")?;
    (digits.len() == 16 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())?
}

/// The log files in `dir`, oldest (lowest first seq) first.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<(u64, String)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| parse_file_name(&n).map(|s| (s, n)))
        .collect();
    names.sort();
    Ok(names.into_iter().map(|(_, n)| n).collect())
}

/// Appends `,"mac":"<hex>"}` and a newline to a body (which ends with `}`).
pub fn finish_line(mut body: String, mac: &Mac) -> String {
    debug_assert!(body.ends_with('}'));
    body.pop();
    body.push_str(",\"mac\":\"");
    push_hex(&mut body, mac);
    body.push_str("\"}\n");
    body
}

/// Serializes a record, MACs it and returns (line, MAC).
pub fn encode(rec: &Record, key: &AuditKey) -> (String, Mac) {
    // A `Record` is plain strings and numbers: serializing it cannot fail.
    let body = serde_json::to_string(rec).unwrap_or_default();
    let mac = key.record_mac(body.as_bytes());
    (finish_line(body, &mac), mac)
}

/// The length of `,"mac":"` + 64 hex digits + `"}`.
const MAC_SUFFIX: usize = 8 + 2 * MAC_LEN + 2;

/// Splits a line (without its newline) into the body its MAC covers and the MAC.
pub fn split_line(line: &str) -> Option<(String, Mac)> {
    let n = line.len();
    if n < MAC_SUFFIX + 2 || !line.ends_with("\"}") {
        return None;
    }
    let cut = n - MAC_SUFFIX;
    if line.get(cut..cut + 8)? != ",\"mac\":\"" {
        return None;
    }
    let mac: Mac = unhex(line.get(cut + 8..n - 2)?)?.try_into().ok()?;
    let mut body = String::with_capacity(cut + 1);
    body.push_str(&line[..cut]);
    body.push('}');
    Some((body, mac))
}

/// Parses a MAC written as hex.
pub fn parse_mac(s: &str) -> Option<Mac> {
    unhex(s)?.try_into().ok()
}

pub fn mac_hex(mac: &Mac) -> String {
    super::key::hex(mac)
}

/// Serializes a checkpoint with its MAC.
pub fn encode_checkpoint(c: &Checkpoint, key: &AuditKey) -> String {
    let body = serde_json::to_string(c).unwrap_or_default();
    let mac = key.checkpoint_mac(body.as_bytes());
    finish_line(body, &mac)
}

/// Why a checkpoint could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointError {
    Missing,
    Unreadable(String),
    /// Written with a key not held; the checkpoint as it claims to be.
    UnknownKey(Box<Checkpoint>),
    BadMac,
}

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointError::Missing => f.write_str("checkpoint HEAD is missing"),
            CheckpointError::Unreadable(why) => write!(f, "checkpoint HEAD is unreadable ({why})"),
            CheckpointError::UnknownKey(c) => {
                write!(
                    f,
                    "checkpoint HEAD was written with key id {}, which is not held",
                    c.kid
                )
            }
            CheckpointError::BadMac => f.write_str(
                "checkpoint HEAD's MAC does not match (modified, or written without the key)",
            ),
        }
    }
}

/// Reads and checks `dir/HEAD`.
pub fn read_checkpoint(dir: &Path, keys: &Keyring) -> Result<Checkpoint, CheckpointError> {
    let mut text = String::new();
    match std::fs::File::open(dir.join(CHECKPOINT_FILE)) {
        Ok(mut f) => f
            .read_to_string(&mut text)
            .map_err(|e| CheckpointError::Unreadable(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CheckpointError::Missing),
        Err(e) => return Err(CheckpointError::Unreadable(e.to_string())),
    };
    parse_checkpoint(text.trim_end_matches('\n'), keys)
}

pub fn parse_checkpoint(text: &str, keys: &Keyring) -> Result<Checkpoint, CheckpointError> {
    let (body, mac) =
        split_line(text).ok_or_else(|| CheckpointError::Unreadable("no MAC".into()))?;
    let c: Checkpoint =
        serde_json::from_str(&body).map_err(|e| CheckpointError::Unreadable(e.to_string()))?;
    let Some(key) = keys.get(&c.kid) else {
        return Err(CheckpointError::UnknownKey(Box::new(c)));
    };
    if key.checkpoint_mac(body.as_bytes()) != mac {
        return Err(CheckpointError::BadMac);
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_back_into_body_and_mac() {
        let key = AuditKey::from_bytes(&[5u8; 32]);
        let rec = Record::Seal {
            seq: 3,
            kid: key.id_hex().into(),
            prev: mac_hex(&GENESIS),
            ts: "2026-01-01T00:00:00.000Z".into(),
            records: 3,
        };
        let (line, mac) = encode(&rec, &key);
        assert!(line.ends_with("\"}\n") && line.starts_with("{\"type\":\"seal\",\"seq\":3,"));
        let (body, got) = split_line(line.trim_end()).unwrap();
        assert_eq!(got, mac);
        assert!(key.verify_record_mac(body.as_bytes(), &mac));
        assert_eq!(serde_json::from_str::<Record>(&body).unwrap(), rec);
        assert!(split_line("{\"a\":1}").is_none());
    }

    #[test]
    fn file_names_sort_by_first_seq() {
        assert_eq!(file_name(42), "audit-0000000000000042.log");
        assert_eq!(parse_file_name("audit-0000000000000042.log"), Some(42));
        assert_eq!(parse_file_name("audit-42.log"), None);
        assert_eq!(parse_file_name("HEAD"), None);
    }

    #[test]
    fn checkpoints_are_keyed() {
        let key = AuditKey::from_bytes(&[5u8; 32]);
        let c = Checkpoint {
            kid: key.id_hex().into(),
            ts: "t".into(),
            file: file_name(0),
            created: "t".into(),
            bytes: 10,
            seq: 1,
            head: mac_hex(&GENESIS),
        };
        let text = encode_checkpoint(&c, &key);
        let keys = Keyring::from(key.clone());
        assert_eq!(parse_checkpoint(text.trim_end(), &keys), Ok(c.clone()));
        let forged = text.replace("\"bytes\":10", "\"bytes\":9");
        assert_eq!(
            parse_checkpoint(forged.trim_end(), &keys),
            Err(CheckpointError::BadMac)
        );
        let other = Keyring::from(AuditKey::from_bytes(&[6u8; 32]));
        assert!(matches!(
            parse_checkpoint(text.trim_end(), &other),
            Err(CheckpointError::UnknownKey(_))
        ));
    }
}
