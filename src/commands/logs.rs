//! `corral logs keygen | verify | decrypt`: the audit log's key, and reading the log back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

use crate::audit::{
    self, decrypt_path, AuditKey, KeySource, Keyring, Verification, DEFAULT_KEY_FILE,
};
use crate::config::Config;

/// Which keys to read the log with.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// Key file to read the log with; repeat it for a log written across key rotations. Without
    /// it: $CORRAL_LOG_KEY, else audit.key_file, else the audit.key in the log's directory
    #[arg(long = "key-file", value_name = "FILE")]
    pub key_files: Vec<PathBuf>,
}

/// `corral logs keygen`.
#[derive(Debug, Clone, clap::Args)]
pub struct KeygenArgs {
    /// Where to write the key (mode 0600; an existing file is never overwritten). Default:
    /// audit.key_file, else audit.key in the audit directory
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `corral logs verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub keys: KeyArgs,
    /// A log directory or one log file (default: audit.dir)
    #[arg(value_name = "FILE|DIR")]
    pub path: Option<PathBuf>,
}

/// `corral logs decrypt`.
#[derive(Debug, Clone, clap::Args)]
pub struct DecryptArgs {
    /// Only entries recorded at or after this time: RFC 3339 (2026-11-22T08:00:00Z), a date
    /// (2026-11-22), or an age (30m, 24h, 7d)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only entries of this request id
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// A log directory or one log file (default: audit.dir)
    #[arg(value_name = "FILE|DIR")]
    pub path: Option<PathBuf>,
}

/// Writes a new key file; prints where and its key id.
pub fn keygen(config: &Config, args: &KeygenArgs) -> crate::Result<i32> {
    let out = match (&args.out, &config.audit.key) {
        (Some(p), _) => p.clone(),
        (None, KeySource::File(p) | KeySource::Generated(p)) => p.clone(),
        (None, KeySource::Env(_)) => config.audit.dir.join(DEFAULT_KEY_FILE),
    };
    let key = AuditKey::generate_file(&out)?;
    println!(
        "wrote a new audit key (key id {}) to {} (mode 0600)",
        key.id(),
        out.display()
    );
    eprintln!("corral: keep a copy of it somewhere safe: the log cannot be read without it");
    Ok(0)
}

/// Verifies the log; prints every problem, then a summary. Exit status 1 when anything is wrong.
pub fn verify(config: &Config, args: &VerifyArgs) -> crate::Result<i32> {
    let path = args
        .path
        .clone()
        .unwrap_or_else(|| config.audit.dir.clone());
    let keys = keyring(config, &args.keys, &path)?;
    let v = audit::verify_path(&path, &keys).map_err(io(&path))?;
    print!("{}", report(&path, &v));
    Ok(if v.ok() { 0 } else { 1 })
}

/// The text `corral logs verify` prints.
pub fn report(path: &Path, v: &Verification) -> String {
    const SHOWN: usize = 50;
    let mut out = String::new();
    for p in v.problems.iter().take(SHOWN) {
        out.push_str(&format!("{p}\n"));
    }
    if v.problems.len() > SHOWN {
        out.push_str(&format!("... and {} more\n", v.problems.len() - SHOWN));
    }
    for n in &v.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    let counts = format!(
        "{} file(s), {} record(s), {} entr{}",
        v.files,
        v.records,
        v.entries,
        if v.entries == 1 { "y" } else { "ies" }
    );
    match v.problems.first() {
        None => {
            out.push_str(&format!("ok: {}: {counts}", path.display()));
            if let Some((seq, mac)) = &v.head {
                out.push_str(&format!("; head seq {seq} mac {mac}"));
            }
            out.push('\n');
        }
        Some(first) => out.push_str(&format!(
            "FAILED: {}: {} problem(s) in {counts}; first: {first}\n",
            path.display(),
            v.problems.len()
        )),
    }
    out
}

/// Prints each matching entry as one JSON line: position (file, line, seq, kid), the plaintext
/// metadata, and the decrypted `request` and `response`. Records that fail verification are
/// named on stderr and the exit status is 1.
pub fn decrypt(config: &Config, args: &DecryptArgs) -> crate::Result<i32> {
    let path = args
        .path
        .clone()
        .unwrap_or_else(|| config.audit.dir.clone());
    let since = args
        .since
        .as_deref()
        .map(|s| audit::parse_since(s, SystemTime::now()))
        .transpose()
        .map_err(|e| crate::Error::Usage(format!("--since: {e}")))?;
    let keys = keyring(config, &args.keys, &path)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_failed = false;
    let problems = decrypt_path(&path, &keys, &mut |e| {
        if write_failed
            || args
                .request_id
                .as_ref()
                .is_some_and(|id| *id != e.meta.request_id)
            || since.is_some_and(|s| audit::parse_rfc3339(&e.meta.ts).is_none_or(|t| t < s))
        {
            return;
        }
        let mut m = serde_json::Map::new();
        m.insert("file".into(), Value::from(e.file));
        m.insert("line".into(), Value::from(e.line));
        m.insert("seq".into(), Value::from(e.seq));
        m.insert("kid".into(), Value::from(e.kid));
        if let Ok(Value::Object(meta)) = serde_json::to_value(&e.meta) {
            m.extend(meta);
        }
        m.insert("request".into(), e.request);
        m.insert("response".into(), e.response);
        write_failed = writeln!(out, "{}", Value::Object(m)).is_err();
    })
    .map_err(io(&path))?;
    let _ = out.flush();
    for p in &problems {
        eprintln!("corral: not decrypted: {p}");
    }
    if !problems.is_empty() {
        eprintln!("corral: run `corral logs verify` for the whole log's integrity");
    }
    Ok(if problems.is_empty() { 0 } else { 1 })
}

/// The keys to read `path` with (see [`KeyArgs`]).
fn keyring(config: &Config, args: &KeyArgs, path: &Path) -> crate::Result<Keyring> {
    let mut keys = Keyring::new();
    if !args.key_files.is_empty() {
        for p in &args.key_files {
            keys.add(AuditKey::load(p)?);
        }
        return Ok(keys);
    }
    match &config.audit.key {
        KeySource::Env(k) => keys.add(k.clone()),
        KeySource::File(p) => keys.add(AuditKey::load(p)?),
        KeySource::Generated(_) => {}
    }
    if keys.is_empty() {
        let dir = if path.is_dir() {
            path
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        let generated = dir.join(DEFAULT_KEY_FILE);
        if generated.exists() {
            keys.add(AuditKey::load(&generated)?);
        }
    }
    if keys.is_empty() {
        return Err(audit::AuditError::NoKey.into());
    }
    Ok(keys)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> crate::Error + '_ {
    move |source| {
        audit::AuditError::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()
    }
}
