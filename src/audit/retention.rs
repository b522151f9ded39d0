//! Retention: which files are old enough to delete. Only sealed files go, oldest first and
//! without gaps (the oldest remaining file must link to the newest deleted one), never the active
//! file. A file's age is its modification time, which for a sealed file is when it was sealed.
//! The writer records the deletions in a `retention` record (each file's name and last record)
//! and fsyncs it before unlinking anything, so `verify` can tell these deletions from an attack.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::format::{list_files, mac_hex, split_line, Deleted, Record};

/// The files in `dir` older than `keep`, oldest first, up to (not including) `active` or the
/// first file that is younger or not sealed.
pub(crate) fn expired(
    dir: &Path,
    active: &str,
    keep: Duration,
    now: SystemTime,
) -> std::io::Result<Vec<Deleted>> {
    let mut out = Vec::new();
    for name in list_files(dir)? {
        if name == active {
            break;
        }
        let path = dir.join(&name);
        let modified = std::fs::metadata(&path)?.modified()?;
        if now.duration_since(modified).unwrap_or_default() < keep {
            break;
        }
        match seal_of(&path)? {
            Some(d) => out.push(Deleted { file: name, ..d }),
            None => {
                tracing::warn!(
                    file = %path.display(),
                    "audit retention: not deleting a file that does not end with a seal record; run `corral logs verify`"
                );
                break;
            }
        }
    }
    Ok(out)
}

/// The file's last record if it is a seal: (last seq, its MAC).
fn seal_of(path: &Path) -> std::io::Result<Option<Deleted>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let from = len.saturating_sub(4096);
    f.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail)?;
    // The seal line is ASCII; a cut multi-byte character earlier in the window does not matter.
    let tail = String::from_utf8_lossy(&tail);
    let Some(line) = tail.trim_end_matches('\n').rsplit('\n').next() else {
        return Ok(None);
    };
    let Some((body, mac)) = split_line(line) else {
        return Ok(None);
    };
    Ok(match serde_json::from_str::<Record>(&body) {
        Ok(Record::Seal { seq, .. }) => Some(Deleted {
            file: String::new(),
            last_seq: seq,
            head: mac_hex(&mac),
        }),
        _ => None,
    })
}
