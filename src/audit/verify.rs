//! Reading the log back. [`verify_path`] checks a directory (or one file) and reports every
//! problem by file, line and seq; [`decrypt_path`] hands each verified entry, decrypted, to a
//! callback. Both rest on [`scan_file`], which the writer also uses to recover after a crash.
//!
//! What is checked, per record: it parses and carries a MAC; its key id is held; the MAC matches
//! (so the record is as the key holder wrote it; an entry's MAC covers its payloads through their
//! nonces and GCM tags, and the rest of its line must be the writer's exact encoding of them);
//! its seq is one more than the previous record's and its `prev` is that record's MAC (nothing removed, inserted or reordered); an entry's two
//! payloads open under AES-GCM with its metadata as associated data (always, the writer's
//! recovery included: the tags are what authenticate the ciphertexts). Per file: it starts with an
//! `open` record naming itself; nothing follows a `seal`, whose count matches. Across files: each
//! `open` links to the previous file's last record (name, seq and MAC), so a truncated or missing
//! file breaks the link; the oldest file links to nothing (the log's start) or to a file a
//! `retention` record says was deleted. At the end: `HEAD` is intact and its file holds the
//! record it names, at no fewer bytes (the active file's tail was not cut).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::entry::{entry_mac_input, open_payload, raw_meta, EntryMeta};
use super::format::{
    self, list_files, parse_file_name, parse_mac, read_checkpoint, split_line, CheckpointError,
    Deleted, Mac, Record, GENESIS,
};
use super::key::Keyring;

/// One thing wrong with the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file's name (or the checkpoint's); empty for the log as a whole.
    pub file: String,
    /// 1-based line number in the file.
    pub line: Option<usize>,
    pub seq: Option<u64>,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.file.is_empty() {
            f.write_str(&self.file)?;
            if let Some(l) = self.line {
                write!(f, ":{l}")?;
            }
            f.write_str(": ")?;
        }
        if let Some(s) = self.seq {
            write!(f, "seq {s}: ")?;
        }
        f.write_str(&self.what)
    }
}

/// The outcome of [`verify_path`].
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub files: usize,
    pub records: u64,
    pub entries: u64,
    /// The last record's seq and MAC (hex): worth recording elsewhere, since a copy kept off
    /// this machine is what detects a rollback of the whole log.
    pub head: Option<(u64, String)>,
    pub problems: Vec<Problem>,
    /// Things checked only partly (one file verified alone: its link to the previous file).
    pub notes: Vec<String>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// An entry as `corral logs decrypt` prints it.
#[derive(Debug, Clone)]
pub struct DecryptedEntry {
    pub file: String,
    pub line: usize,
    pub seq: u64,
    pub kid: String,
    pub meta: EntryMeta,
    pub request: Value,
    pub response: Value,
}

/// The `open` record of a file.
#[derive(Debug, Clone)]
pub(crate) struct OpenInfo {
    pub seq: u64,
    pub prev: Option<Mac>,
    pub prev_file: Option<String>,
    pub ts: String,
}

/// What [`scan_file`] found in one file.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileScan {
    pub name: String,
    pub len: u64,
    pub open: Option<OpenInfo>,
    /// (seq, MAC) of every record that parsed, in file order.
    pub records: Vec<(u64, Mac)>,
    /// Whether the file has a seal record.
    pub sealed: bool,
    pub entries: u64,
    pub deleted: Vec<Deleted>,
    /// Byte offset just past the last complete line.
    pub complete_bytes: u64,
    /// The file ends with bytes that are not a complete line.
    pub incomplete_tail: bool,
    pub problems: Vec<Problem>,
}

impl FileScan {
    pub fn last(&self) -> Option<(u64, Mac)> {
        self.records.last().copied()
    }

    pub fn mac_of(&self, seq: u64) -> Option<Mac> {
        self.records
            .iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, m)| *m)
    }
}

/// Where [`scan_file`] starts when not at the top of the file: a byte offset at a line start,
/// and the seq and `prev` the record there must have.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScanStart {
    pub offset: u64,
    pub seq: u64,
    pub prev: Mac,
}

/// Reads and checks one file on its own (records, MACs, order within the file, the payloads'
/// GCM tags), from the top or from `start`, passing each good entry to `on_entry` when given.
pub(crate) fn scan_file(
    path: &Path,
    keys: &Keyring,
    start: Option<ScanStart>,
    mut on_entry: Option<&mut dyn FnMut(DecryptedEntry)>,
) -> std::io::Result<FileScan> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut bytes)?;
    let mut scan = FileScan {
        name: name.clone(),
        len: bytes.len() as u64,
        ..FileScan::default()
    };
    let mut expect: Option<(u64, Mac)> = start.map(|s| (s.seq, s.prev));
    let mut offset = start.map_or(0, |s| usize::try_from(s.offset).unwrap_or(usize::MAX));
    if offset > bytes.len() {
        offset = bytes.len();
    }
    let mut line_no = bytes[..offset].iter().filter(|b| **b == b'\n').count();
    scan.complete_bytes = offset as u64;
    let mut sealed_at: Option<usize> = None;
    while offset < bytes.len() {
        line_no += 1;
        let Some(nl) = bytes[offset..].iter().position(|b| *b == b'\n') else {
            scan.incomplete_tail = true;
            scan.problems.push(Problem {
                file: name.clone(),
                line: Some(line_no),
                seq: None,
                what: format!(
                    "incomplete last line ({} bytes without a newline): a write cut short by a crash, or a cut file",
                    bytes.len() - offset
                ),
            });
            break;
        };
        let raw = &bytes[offset..offset + nl];
        offset += nl + 1;
        let mut problem = |seq: Option<u64>, what: String| {
            scan.problems.push(Problem {
                file: name.clone(),
                line: Some(line_no),
                seq,
                what,
            })
        };
        let Some((body, mac)) = std::str::from_utf8(raw).ok().and_then(split_line) else {
            problem(None, "not a record: no MAC at the end of the line".into());
            expect = None;
            continue;
        };
        let rec: Record = match serde_json::from_str(&body) {
            Ok(r) => r,
            Err(e) => {
                problem(None, format!("not a record: {e}"));
                expect = None;
                continue;
            }
        };
        let seq = rec.seq();
        let mut wrong: Vec<String> = Vec::new();
        let key = keys.get(rec.kid());
        let mac_ok = |k: &super::key::AuditKey| match &rec {
            // An entry's MAC covers its payloads' nonces and GCM tags, not the ciphertexts (the
            // tags, checked below, authenticate those); the rest of the line must be exactly as
            // written.
            Record::Entry {
                request, response, ..
            } => entry_mac_input(&body, request, response)
                .map(|(head, payloads)| k.verify_entry_mac(head.as_bytes(), &payloads, &mac)),
            _ => Ok(k.verify_record_mac(body.as_bytes(), &mac)),
        };
        match key.map(mac_ok) {
            None => wrong.push(format!(
                "no key for key id {} (held: {}): the wrong key, or a record written by someone else",
                rec.kid(),
                if keys.is_empty() { "none".to_string() } else { keys.ids().join(", ") }
            )),
            Some(Ok(false)) => wrong.push(
                "MAC mismatch: the record was modified, or the chain was recomputed without the key"
                    .into(),
            ),
            Some(Err(e)) => wrong.push(e),
            Some(Ok(true)) => {}
        }
        let prev = parse_mac(rec.prev());
        if prev.is_none() {
            wrong.push("prev is not a MAC".into());
        }
        if let Some((eseq, eprev)) = expect {
            if seq > eseq {
                wrong.push(format!(
                    "sequence gap: expected seq {eseq}, found seq {seq} (records removed or reordered)"
                ));
            } else if seq < eseq {
                wrong.push(format!(
                    "out of order: seq {seq} after seq {} (records reordered or repeated)",
                    eseq - 1
                ));
            } else if prev.is_some_and(|p| p != eprev) {
                wrong.push(
                    "does not follow the record before it (its prev is another MAC): a record was replaced"
                        .into(),
                );
            }
        }
        if let Some(at) = sealed_at {
            wrong.push(format!("a record after the seal on line {at}"));
        }
        match &rec {
            Record::Open {
                file,
                prev_file,
                ts,
                anomaly,
                ..
            } => {
                if line_no != 1 {
                    wrong.push("an open record in the middle of a file".into());
                } else {
                    scan.open = Some(OpenInfo {
                        seq,
                        prev,
                        prev_file: prev_file.clone(),
                        ts: ts.clone(),
                    });
                }
                if *file != name {
                    wrong.push(format!(
                        "the open record names file {file}: this file was renamed or copied"
                    ));
                }
                if let Some(a) = anomaly {
                    wrong.push(format!(
                        "the writer recorded an anomaly when it opened this file: {a}"
                    ));
                }
            }
            Record::Seal { records, .. } => {
                sealed_at = Some(line_no);
                scan.sealed = true;
                if *records != (line_no - 1) as u64 {
                    wrong.push(format!(
                        "the seal counts {records} records before it, the file has {}",
                        line_no - 1
                    ));
                }
            }
            Record::Retention { deleted, .. } => scan.deleted.extend(deleted.iter().cloned()),
            Record::Entry {
                meta,
                request,
                response,
                kid,
                ..
            } => {
                scan.entries += 1;
                // Always (the writer's recovery too): the GCM tags are what authenticates the
                // ciphertexts, which the MAC does not cover byte for byte.
                if let Some(k) = key {
                    let opened = raw_meta(&body)
                        .ok_or_else(|| "the metadata cannot be located".to_string())
                        .and_then(|m| {
                            let req = open_payload(k, m, "request", request);
                            let resp = open_payload(k, m, "response", response);
                            match (req, resp) {
                                (Ok(a), Ok(b)) => Ok((a, b)),
                                (Err(a), Err(b)) => Err(format!("{a}; {b}")),
                                (Err(e), _) | (_, Err(e)) => Err(e),
                            }
                        });
                    match opened {
                        Err(e) => wrong.push(e),
                        Ok((req, resp)) if wrong.is_empty() => {
                            if let Some(f) = on_entry.as_mut() {
                                f(DecryptedEntry {
                                    file: name.clone(),
                                    line: line_no,
                                    seq,
                                    kid: kid.clone(),
                                    meta: (**meta).clone(),
                                    request: req,
                                    response: resp,
                                });
                            }
                        }
                        Ok(_) => {}
                    }
                }
            }
        }
        if line_no == 1 && !matches!(rec, Record::Open { .. }) {
            wrong.insert(
                0,
                "the file does not start with its open record (its first lines were removed)"
                    .into(),
            );
        }
        if !wrong.is_empty() {
            problem(Some(seq), wrong.join("; "));
        }
        expect = Some((seq + 1, mac));
        scan.records.push((seq, mac));
        scan.complete_bytes = offset as u64;
    }
    if bytes.is_empty() {
        scan.problems.push(Problem {
            file: name.clone(),
            line: None,
            seq: None,
            what: "empty file (its records were removed)".into(),
        });
    }
    Ok(scan)
}

/// Verifies a log directory, or one file of it.
pub fn verify_path(path: &Path, keys: &Keyring) -> std::io::Result<Verification> {
    if path.is_dir() {
        verify_dir(path, keys)
    } else {
        verify_file(path, keys)
    }
}

fn verify_dir(dir: &Path, keys: &Keyring) -> std::io::Result<Verification> {
    let names = list_files(dir)?;
    let mut v = Verification {
        files: names.len(),
        ..Verification::default()
    };
    if names.is_empty() {
        v.problems.push(Problem {
            file: String::new(),
            line: None,
            seq: None,
            what: format!("no audit log files (audit-*.log) in {}", dir.display()),
        });
        return Ok(v);
    }
    let mut scans = Vec::with_capacity(names.len());
    for n in &names {
        let s = scan_file(&dir.join(n), keys, None, None)?;
        v.records += s.records.len() as u64;
        v.entries += s.entries;
        v.problems.extend(s.problems.iter().cloned());
        scans.push(s);
    }
    let deleted: BTreeMap<&str, &Deleted> = scans
        .iter()
        .flat_map(|s| s.deleted.iter())
        .map(|d| (d.file.as_str(), d))
        .collect();
    for (i, s) in scans.iter().enumerate() {
        let Some(open) = &s.open else { continue };
        if parse_file_name(&s.name) != Some(open.seq) {
            v.problems.push(file_problem(
                &s.name,
                format!(
                    "the name does not match its first record (seq {})",
                    open.seq
                ),
            ));
        }
        let link = |d: &str| {
            match deleted.get(d) {
            Some(del) if Some(del.head.as_str()).and_then(parse_mac) == open.prev
                && del.last_seq + 1 == open.seq =>
            {
                None
            }
            Some(_) => Some(format!(
                "{d} was deleted by retention, but its recorded last record is not the one this file links to"
            )),
            None => Some(format!(
                "{d} is missing: {} links to it and no retention record says it was deleted",
                s.name
            )),
        }
        };
        let trouble = match (i, &open.prev_file) {
            (0, None) => (open.prev != Some(GENESIS) || open.seq != 0).then(|| {
                "the first file of the log does not start at seq 0 from the genesis MAC".to_string()
            }),
            (0, Some(p)) => link(p),
            (_, None) => Some(format!(
                "does not link to the file before it ({}): the chain was restarted",
                scans[i - 1].name
            )),
            (_, Some(p)) if *p != scans[i - 1].name => {
                link(p).map(|m| format!("{m} (the file before it here is {})", scans[i - 1].name))
            }
            (_, Some(_)) => {
                let before = &scans[i - 1];
                match before.last() {
                    Some((seq, mac)) if seq + 1 == open.seq && Some(mac) == open.prev => None,
                    Some((seq, _)) if seq + 1 < open.seq => {
                        v.problems.push(file_problem(
                            &before.name,
                            format!(
                                "tail truncated: the file ends at seq {seq}, but {} continues from seq {}",
                                s.name,
                                open.seq - 1
                            ),
                        ));
                        None
                    }
                    Some((seq, _)) if seq + 1 > open.seq => Some(format!(
                        "links to seq {} of {}, but that file goes on to seq {seq}",
                        open.seq - 1,
                        before.name
                    )),
                    _ => Some(format!(
                        "does not link to the last record of {} (it was rewritten)",
                        before.name
                    )),
                }
            }
        };
        if let Some(what) = trouble {
            v.problems.push(Problem {
                file: s.name.clone(),
                line: Some(1),
                seq: Some(open.seq),
                what,
            });
        }
    }
    check_checkpoint(dir, keys, &scans, &mut v);
    v.head = scans
        .last()
        .and_then(FileScan::last)
        .map(|(s, m)| (s, format::mac_hex(&m)));
    Ok(v)
}

fn check_checkpoint(dir: &Path, keys: &Keyring, scans: &[FileScan], v: &mut Verification) {
    let c = match read_checkpoint(dir, keys) {
        Ok(c) => c,
        Err(e) => {
            let extra = match e {
                CheckpointError::Missing => {
                    ": the end of the active file cannot be checked (was it deleted?)"
                }
                _ => "",
            };
            v.problems
                .push(file_problem(format::CHECKPOINT_FILE, format!("{e}{extra}")));
            return;
        }
    };
    let Some(s) = scans.iter().find(|s| s.name == c.file) else {
        v.problems.push(file_problem(
            format::CHECKPOINT_FILE,
            format!("names the active file {}, which is missing", c.file),
        ));
        return;
    };
    let last = s.last().map_or(0, |(q, _)| q);
    match s.mac_of(c.seq) {
        None => v.problems.push(file_problem(
            &s.name,
            format!(
                "tail truncated: checkpoint HEAD records seq {} ({} bytes), but the file ends at seq {last} ({} bytes)",
                c.seq, c.bytes, s.len
            ),
        )),
        Some(m) if Some(m) != parse_mac(&c.head) => v.problems.push(file_problem(
            &s.name,
            format!(
                "the record at seq {} is not the one checkpoint HEAD records (the file was rewritten)",
                c.seq
            ),
        )),
        Some(_) if s.len < c.bytes => v.problems.push(file_problem(
            &s.name,
            format!(
                "tail truncated: {} bytes, checkpoint HEAD records {}",
                s.len, c.bytes
            ),
        )),
        Some(_) => {}
    }
}

fn file_problem(file: &str, what: String) -> Problem {
    Problem {
        file: file.to_string(),
        line: None,
        seq: None,
        what,
    }
}

fn verify_file(path: &Path, keys: &Keyring) -> std::io::Result<Verification> {
    let s = scan_file(path, keys, None, None)?;
    let mut v = Verification {
        files: 1,
        records: s.records.len() as u64,
        entries: s.entries,
        head: s.last().map(|(q, m)| (q, format::mac_hex(&m))),
        problems: s.problems.clone(),
        notes: vec![],
    };
    if s.open.as_ref().is_some_and(|o| o.prev_file.is_some()) {
        v.notes.push(format!(
            "{}: its link to the previous file is checked only when the directory is verified",
            s.name
        ));
    }
    if !s.sealed {
        let dir = path.parent().unwrap_or(Path::new("."));
        match read_checkpoint(dir, keys) {
            Ok(c) if c.file == s.name => {
                let mut dv = Verification::default();
                check_checkpoint(dir, keys, std::slice::from_ref(&s), &mut dv);
                v.problems.extend(dv.problems);
            }
            _ => v.problems.push(file_problem(
                &s.name,
                "not sealed, and not the active file named by HEAD beside it: its tail may have been cut"
                    .into(),
            )),
        }
    }
    Ok(v)
}

/// Decrypts every entry in `path` (a directory, oldest file first, or one file) whose record and
/// payloads verify, handing each to `on_entry`; returns the problems met on the way (records
/// that did not verify are skipped, not printed).
pub fn decrypt_path(
    path: &Path,
    keys: &Keyring,
    on_entry: &mut dyn FnMut(DecryptedEntry),
) -> std::io::Result<Vec<Problem>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        list_files(path)?
            .into_iter()
            .map(|n| path.join(n))
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    let mut problems = Vec::new();
    for f in files {
        let s = scan_file(&f, keys, None, Some(&mut *on_entry))?;
        problems.extend(s.problems);
    }
    Ok(problems)
}
