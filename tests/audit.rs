//! The audit log as its owner and an attacker see it: round trips through `corral logs`, every
//! kind of tampering named by `verify`, file modes, no plaintext on disk, PII masked before
//! encryption, rotation and retention, key files, and one `corral run` end to end with the real
//! SLM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use corral::audit::{
    decrypt_path, verify_path, AuditConfig, AuditKey, AuditLog, AuditRecord, Caller, Interaction,
    KeySource, Keyring, Route, TokenUsage, Verification, CHECKPOINT_FILE, LOCK_FILE,
};
use serde_json::{json, Value};

const PROMPT: &str = "Where is Atlantis? zqpromptmarker";
const ANSWER: &str = "Under the sea, zqanswermarker";

fn key() -> AuditKey {
    AuditKey::from_bytes(&[7u8; 32])
}

fn keys() -> Keyring {
    Keyring::from(key())
}

fn config(dir: &Path) -> AuditConfig {
    let mut c = AuditConfig::new(dir);
    c.key = KeySource::Env(key());
    c
}

fn rec(i: usize) -> AuditRecord {
    AuditRecord {
        request_id: format!("req-{i}"),
        caller: Caller {
            agent: Some("agent-a".into()),
            team: Some("blue".into()),
            key_alias: Some("k1".into()),
        },
        interaction: Interaction::Chat,
        model: Some("smollm2-135m-instruct".into()),
        route: Some(Route::Slm),
        policies: vec!["default_action".into()],
        confidence: Some(0.75),
        latency_ms: 12.5,
        usage: Some(TokenUsage {
            prompt_tokens: 10,
            completion_tokens: 5,
        }),
        request: json!({"messages": [{"role": "user", "content": format!("{PROMPT} #{i}")}]}),
        response: json!({"text": format!("{ANSWER} #{i}")}),
        ..Default::default()
    }
}

fn write_log(c: &AuditConfig, from: usize, n: usize) {
    let log = AuditLog::open(c).unwrap();
    for i in from..from + n {
        assert!(log.record(rec(i)));
    }
    let s = log.shutdown().unwrap();
    assert_eq!((s.written, s.dropped, s.failed), (n as u64, 0, 0), "{s:?}");
}

fn verify(dir: &Path) -> Verification {
    verify_path(dir, &keys()).unwrap()
}

fn problems(v: &Verification) -> String {
    v.problems
        .iter()
        .map(|p| format!("{p}\n"))
        .collect::<String>()
}

/// The log files of `dir`, oldest first.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(p: &Path, lines: &[String]) {
    std::fs::write(
        p,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `corral logs ARGS...` with a clean config.
fn logs(args: &[&str]) -> Output {
    let mut a = vec!["logs"];
    a.extend_from_slice(args);
    corral_with(&a)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn round_trip_through_keygen_verify_and_decrypt() {
    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("keys/audit.key");
    let k = key_file.to_str().unwrap();
    let out = logs(&["keygen", "--out", k]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("(mode 0600)"), "{}", stdout(&out));
    assert_eq!(mode(&key_file), 0o600);
    let before = std::fs::read(&key_file).unwrap();
    let out = logs(&["keygen", "--out", k]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("refusing to overwrite"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&key_file).unwrap(), before, "key untouched");

    let dir = tmp.path().join("audit");
    let mut c = AuditConfig::new(&dir);
    c.key = KeySource::File(key_file.clone());
    write_log(&c, 0, 3);
    let d = dir.to_str().unwrap();

    let out = logs(&["verify", "--key-file", k, d]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).starts_with("ok: ") && stdout(&out).contains("3 entries"),
        "{}",
        stdout(&out)
    );

    let out = logs(&["decrypt", "--key-file", k, d]);
    assert!(out.status.success(), "{}", stderr(&out));
    let entries: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 3);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["request_id"], format!("req-{i}"));
        assert_eq!(e["seq"], i + 1, "after the open record");
        assert_eq!(
            e["request"]["messages"][0]["content"],
            format!("{PROMPT} #{i}")
        );
        assert_eq!(e["response"]["text"], format!("{ANSWER} #{i}"));
        assert_eq!(e["caller"]["team"], "blue");
        assert_eq!(e["route"], "slm");
        assert_eq!(e["interaction"], "chat");
        assert_eq!(e["usage"]["completion_tokens"], 5);
        assert!(e["ts"].as_str().unwrap().ends_with('Z'));
    }

    let out = logs(&["decrypt", "--key-file", k, "--request-id", "req-1", d]);
    assert_eq!(stdout(&out).lines().count(), 1);
    let out = logs(&["decrypt", "--key-file", k, "--since", "1h", d]);
    assert_eq!(stdout(&out).lines().count(), 3);
    let out = logs(&["decrypt", "--key-file", k, "--since", "2999-01-01", d]);
    assert!(out.status.success() && out.stdout.is_empty());
    let out = logs(&["decrypt", "--key-file", k, "--since", "soon", d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--since"), "{}", stderr(&out));

    // One file on its own: the active file is checked against HEAD beside it.
    let files = log_files(&dir);
    let out = logs(&["verify", "--key-file", k, files[0].to_str().unwrap()]);
    assert!(out.status.success(), "{}", stdout(&out));
}

#[test]
fn no_prompt_or_answer_bytes_anywhere_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(&config(tmp.path()), 0, 5);
    let mut seen = 0;
    for e in std::fs::read_dir(tmp.path()).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        for needle in [
            "zqpromptmarker",
            "zqanswermarker",
            "Atlantis",
            "Under the sea",
        ] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} in {}",
                p.display()
            );
        }
        seen += 1;
    }
    assert!(seen >= 3, "log file, HEAD and lock were searched");
    // ... and they are all there for the key holder.
    let mut texts = Vec::new();
    decrypt_path(tmp.path(), &keys(), &mut |e| {
        texts.push(e.response["text"].clone())
    })
    .unwrap();
    assert_eq!(texts.len(), 5);
    assert_eq!(texts[4], format!("{ANSWER} #4"));
}

#[test]
fn pii_and_sensitive_keys_are_redacted_before_encryption() {
    let tmp = tempfile::tempdir().unwrap();
    let pii = "mail jane.doe@example.com or call card 4111 1111 1111 1111";
    let r = AuditRecord {
        request_id: "pii".into(),
        request: json!({"messages": [{"role": "user", "content": pii}], "headers": {"Authorization": "Bearer abc.def"}, "password": "hunter2"}),
        response: json!({"text": "I emailed jane.doe@example.com"}),
        ..Default::default()
    };
    let mut c = config(tmp.path());
    let log = AuditLog::open(&c).unwrap();
    log.record(r.clone());
    log.shutdown().unwrap();
    let mut got = Vec::new();
    decrypt_path(tmp.path(), &keys(), &mut |e| got.push(e)).unwrap();
    let e = &got[0];
    let content = e.request["messages"][0]["content"].as_str().unwrap();
    assert_eq!(content, "mail [EMAIL] or call card [CARD_NUMBER]");
    assert_eq!(e.request["password"], "[REDACTED]");
    assert_eq!(e.request["headers"]["Authorization"], "[REDACTED]");
    assert_eq!(e.response["text"], "I emailed [EMAIL]");

    // mask_pii off: PII kept (encrypted), sensitive keys still redacted.
    let dir2 = tmp.path().join("raw");
    c.dir = dir2.clone();
    c.mask_pii = false;
    let log = AuditLog::open(&c).unwrap();
    log.record(r);
    log.shutdown().unwrap();
    let mut got = Vec::new();
    decrypt_path(&dir2, &keys(), &mut |e| got.push(e)).unwrap();
    assert_eq!(got[0].request["messages"][0]["content"], pii);
    assert_eq!(got[0].request["password"], "[REDACTED]");
}

#[test]
fn directory_is_0700_and_every_file_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/audit");
    // No key configured: one is generated into the directory, 0600, and reused.
    let c = AuditConfig::new(&dir);
    let first = AuditLog::open(&c).unwrap();
    let id = first.key_id();
    first.record(rec(0));
    first.shutdown().unwrap();
    let again = AuditLog::open(&c).unwrap();
    assert_eq!(again.key_id(), id, "the generated key is reused");
    again.shutdown().unwrap();
    assert_eq!(mode(&dir), 0o700);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| name(&e.unwrap().path()))
        .collect();
    for n in [CHECKPOINT_FILE, LOCK_FILE, "audit.key"] {
        assert!(names.contains(&n.to_string()), "{n} in {names:?}");
    }
    for n in &names {
        assert_eq!(mode(&dir.join(n)), 0o600, "{n}");
    }
    // A directory made too open is tightened on the next open.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    AuditLog::open(&c).unwrap().shutdown().unwrap();
    assert_eq!(mode(&dir), 0o700);
}

#[test]
fn a_flipped_byte_anywhere_in_an_entry_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(&config(tmp.path()), 0, 3);
    let file = log_files(tmp.path())[0].clone();
    let original = std::fs::read(&file).unwrap();
    let text = String::from_utf8(original.clone()).unwrap();
    // Line 3 is the second entry (line 1 is the open record).
    let start = text.match_indices('\n').nth(1).unwrap().0 + 1;
    let end = text.match_indices('\n').nth(2).unwrap().0 + 1;
    let fname = name(&file);
    for at in start..end {
        let mut bytes = original.clone();
        bytes[at] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        let v = verify(tmp.path());
        assert!(
            v.problems
                .iter()
                .any(|p| p.file == fname && p.line == Some(3)),
            "flipping byte {} of line 3 ({:?}) went unnamed: {}",
            at - start,
            char::from(original[at]),
            problems(&v)
        );
    }
    std::fs::write(&file, &original).unwrap();
    assert!(verify(tmp.path()).ok());
}

#[test]
fn a_removed_entry_is_a_sequence_gap() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(&config(tmp.path()), 0, 4);
    let file = log_files(tmp.path())[0].clone();
    let mut l = lines(&file);
    l.remove(2);
    write_lines(&file, &l);
    let v = verify(tmp.path());
    let first = v.problems[0].to_string();
    assert_eq!(
        first,
        format!(
            "{}:3: seq 3: sequence gap: expected seq 2, found seq 3 (records removed or reordered)",
            name(&file)
        )
    );
    // The CLI prints it and fails.
    let out = logs(&[
        "verify",
        "--key-file",
        key_file(tmp.path()).to_str().unwrap(),
        tmp.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains(&first), "{}", stdout(&out));
    assert!(stdout(&out).contains("FAILED: "), "{}", stdout(&out));
}

/// Writes the test key, as hex, to a 0600 file in `dir` (the log ignores other files).
fn key_file(dir: &Path) -> PathBuf {
    let p = dir.join("test.key");
    std::fs::write(
        &p,
        "0707070707070707070707070707070707070707070707070707070707070707\n",
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(AuditKey::load(&p).unwrap().id(), key().id());
    p
}

#[test]
fn a_swapped_pair_is_out_of_order() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(&config(tmp.path()), 0, 4);
    let file = log_files(tmp.path())[0].clone();
    let mut l = lines(&file);
    l.swap(2, 3);
    write_lines(&file, &l);
    let v = verify(tmp.path());
    let all = problems(&v);
    assert!(
        all.contains(&format!(
            "{}:4: seq 2: out of order: seq 2 after seq 3",
            name(&file)
        )),
        "{all}"
    );
    assert!(v.problems[0].line == Some(3), "{all}");
}

#[test]
fn a_truncated_tail_is_detected_in_the_active_and_in_a_sealed_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(&config(tmp.path()), 0, 3);
    let file = log_files(tmp.path())[0].clone();
    let mut l = lines(&file);
    l.pop();
    write_lines(&file, &l);
    let all = problems(&verify(tmp.path()));
    assert!(
        all.contains("tail truncated: checkpoint HEAD records seq 3")
            && all.contains("but the file ends at seq 2"),
        "{all}"
    );

    // A sealed file cut short: the next file's link no longer meets its end.
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.max_file_bytes = 4096;
    write_log(&c, 0, 12);
    let files = log_files(tmp.path());
    assert!(files.len() >= 2, "{files:?}");
    assert!(verify(tmp.path()).ok(), "{}", problems(&verify(tmp.path())));
    let mut l = lines(&files[0]);
    assert!(l.last().unwrap().contains("\"type\":\"seal\""));
    l.truncate(l.len() - 2);
    write_lines(&files[0], &l);
    let all = problems(&verify(tmp.path()));
    assert!(
        all.contains(&format!(
            "{}: tail truncated: the file ends at seq",
            name(&files[0])
        )),
        "{all}"
    );
    // Verified alone, the file says it lacks its seal.
    let v = verify_path(&files[0], &keys()).unwrap();
    assert!(problems(&v).contains("not sealed"), "{}", problems(&v));
}

#[test]
fn a_chain_recomputed_without_the_key_fails_its_macs() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(&config(tmp.path()), 0, 3);
    let file = log_files(tmp.path())[0].clone();
    let attacker = AuditKey::from_bytes(&[66u8; 32]);
    // The attacker edits the second entry's metadata and rebuilds every MAC from there on with a
    // key of their own, keeping the key id, then rewrites HEAD to match.
    let mut l = lines(&file);
    l[2] = l[2].replace("\"request_id\":\"req-1\"", "\"request_id\":\"forged\"");
    let mut prev: Option<String> = None;
    for line in l.iter_mut().skip(2) {
        let mut body = format!("{}}}", &line[..line.len() - 74]);
        if let Some(p) = &prev {
            let old = body.split("\"prev\":\"").nth(1).unwrap()[..64].to_string();
            body = body.replace(&old, p);
        }
        let mac = hex(&attacker.record_mac(body.as_bytes()));
        *line = format!("{},\"mac\":\"{mac}\"}}", &body[..body.len() - 1]);
        prev = Some(mac);
    }
    write_lines(&file, &l);
    let v = verify(tmp.path());
    let first = &v.problems[0];
    assert_eq!(
        (first.line, first.seq),
        (Some(3), Some(2)),
        "{}",
        problems(&v)
    );
    assert!(
        first.what.contains("MAC mismatch") && first.what.contains("tag mismatch"),
        "{first}"
    );

    // Under the attacker's own key id instead: no key for it.
    let own = l[2].replace(key().id_hex(), attacker.id_hex());
    let mut l2 = l.clone();
    l2[2] = own;
    write_lines(&file, &l2);
    let all = problems(&verify(tmp.path()));
    assert!(
        all.contains(&format!("no key for key id {}", attacker.id_hex())),
        "{all}"
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn the_wrong_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(&config(tmp.path()), 0, 2);
    let other = AuditKey::from_bytes(&[1u8; 32]);
    let v = verify_path(tmp.path(), &Keyring::from(other.clone())).unwrap();
    assert!(!v.ok());
    assert!(
        v.problems[0].what.starts_with(&format!(
            "no key for key id {} (held: {})",
            key().id_hex(),
            other.id_hex()
        )),
        "{}",
        problems(&v)
    );
    // The CLI, given a wrong key file, fails the same way; decrypt prints nothing.
    let wrong = tmp.path().join("wrong.key");
    AuditKey::generate_file(&wrong).unwrap();
    let w = wrong.to_str().unwrap();
    let out = logs(&["verify", "--key-file", w, tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("no key for key id"),
        "{}",
        stdout(&out)
    );
    let out = logs(&["decrypt", "--key-file", w, tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    // With both keys (a rotation), everything reads.
    let k = key_file(tmp.path());
    let out = logs(&[
        "verify",
        "--key-file",
        w,
        "--key-file",
        k.to_str().unwrap(),
        tmp.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
}

#[test]
fn key_rotation_continues_the_chain_in_a_new_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(&config(tmp.path()), 0, 2);
    let new_key = AuditKey::from_bytes(&[8u8; 32]);
    let mut c = config(tmp.path());
    c.key = KeySource::Env(new_key.clone());
    write_log(&c, 2, 2);
    assert_eq!(log_files(tmp.path()).len(), 2);
    let mut both = keys();
    both.add(new_key);
    let v = verify_path(tmp.path(), &both).unwrap();
    assert!(v.ok(), "{}", problems(&v));
    assert_eq!(v.entries, 4);
    let only_old = problems(&verify(tmp.path()));
    assert!(only_old.contains("no key for key id"), "{only_old}");
}

#[test]
fn rotation_by_size_and_age_and_logged_retention() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.max_file_bytes = 4096;
    write_log(&c, 0, 30);
    let files = log_files(tmp.path());
    assert!(files.len() >= 4, "{files:?}");
    for f in &files[..files.len() - 1] {
        assert!(lines(f).last().unwrap().contains("\"type\":\"seal\""));
    }
    let v = verify(tmp.path());
    assert!(v.ok(), "{}", problems(&v));
    let mut ids = Vec::new();
    decrypt_path(tmp.path(), &keys(), &mut |e| ids.push(e.meta.request_id)).unwrap();
    assert_eq!(ids, (0..30).map(|i| format!("req-{i}")).collect::<Vec<_>>());

    // Age: a file older than max_file_age is sealed before the next write.
    let aged = tmp.path().join("aged");
    let mut a = config(&aged);
    a.max_file_age = Duration::from_millis(1);
    write_log(&a, 0, 1);
    std::thread::sleep(Duration::from_millis(20));
    write_log(&a, 1, 1);
    assert_eq!(log_files(&aged).len(), 2);
    assert!(verify(&aged).ok(), "{}", problems(&verify(&aged)));

    // Retention: the two oldest files are 100 days old; keep 30 days.
    let old = SystemTime::now() - Duration::from_secs(100 * 86_400);
    for f in &files[..2] {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    c.retention = Some(Duration::from_secs(30 * 86_400));
    write_log(&c, 30, 1);
    let left = log_files(tmp.path());
    assert!(!files[0].exists() && !files[1].exists(), "{left:?}");
    assert!(files[2].exists());
    let active = left.last().unwrap();
    let text = std::fs::read_to_string(active).unwrap();
    assert!(
        text.contains("\"type\":\"retention\"") && text.contains(&name(&files[1])),
        "the deletion is recorded"
    );
    let v = verify(tmp.path());
    assert!(
        v.ok(),
        "retention deletions are legitimate: {}",
        problems(&v)
    );

    // A file deleted by someone else is not.
    std::fs::remove_file(&files[2]).unwrap();
    let all = problems(&verify(tmp.path()));
    assert!(
        all.contains(&format!(
            "{} is missing: {} links to it and no retention record says it was deleted",
            name(&files[2]),
            name(&files[3])
        )),
        "{all}"
    );
}

#[test]
fn a_missing_middle_file_or_checkpoint_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.max_file_bytes = 4096;
    write_log(&c, 0, 20);
    let files = log_files(tmp.path());
    assert!(files.len() >= 3);
    let middle = std::fs::read(&files[1]).unwrap();
    std::fs::remove_file(&files[1]).unwrap();
    let all = problems(&verify(tmp.path()));
    assert!(
        all.contains(&format!("{} is missing", name(&files[1]))),
        "{all}"
    );
    std::fs::write(&files[1], middle).unwrap();
    assert!(verify(tmp.path()).ok());
    std::fs::remove_file(tmp.path().join(CHECKPOINT_FILE)).unwrap();
    let all = problems(&verify(tmp.path()));
    assert!(all.contains("HEAD: checkpoint HEAD is missing"), "{all}");
    // The writer, finding no checkpoint, starts a new file that says so.
    write_log(&c, 20, 1);
    let all = problems(&verify(tmp.path()));
    assert!(
        all.contains(
            "the writer recorded an anomaly when it opened this file: checkpoint HEAD is missing"
        ),
        "{all}"
    );
}

#[test]
fn key_files_that_are_loose_or_missing_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("loose.key");
    AuditKey::generate_file(&p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = AuditConfig::new(tmp.path().join("audit"));
    c.key = KeySource::File(p.clone());
    let err = AuditLog::open(&c).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "audit key file {} has mode 0644: it must be 0600 or stricter, readable by its owner only (chmod 600 {})",
            p.display(),
            p.display()
        )
    );
    let out = logs(&[
        "verify",
        "--key-file",
        p.to_str().unwrap(),
        tmp.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("has mode 0644"), "{}", stderr(&out));

    c.key = KeySource::File(tmp.path().join("absent.key"));
    let err = AuditLog::open(&c).unwrap_err().to_string();
    assert!(
        err.contains("does not exist") && err.contains("corral logs keygen"),
        "{err}"
    );
}

/// `corral run` with the audit log on: one verifiable entry per request, SLM answers and refusals
/// alike, nothing of the prompt or answer in the clear. Needs the SmolLM2 weights.
#[test]
fn corral_run_writes_one_entry_per_request() {
    let model = model_file();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let cfg = tmp.path().join("corral.toml");
    std::fs::write(
        &cfg,
        format!(
            "[slm]\nmodel_dir = {:?}\n[audit]\nenabled = true\ndir = {:?}\n\
             [[routing.policies]]\nid = \"no-ci\"\npriority = 1\nconditions = {{ agent = \"ci-*\" }}\n\
             action = {{ type = \"deny\", reason = \"CI agents may not use models\" }}\n",
            model.parent().unwrap().display().to_string(),
            dir.display().to_string()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(corral())
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env_remove("CORRAL_LOG_KEY")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let prompt = "Name a colour. Mention jane@example.com.";
    let out = run(&[
        "run",
        "--json",
        "--max-tokens",
        "8",
        "--team",
        "t-research",
        prompt,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("generated one at") && stderr(&out).contains("audit.key"),
        "the generated key's path is logged: {}",
        stderr(&out)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = run(&["run", "--agent", "ci-7", "hello there"]);
    assert_eq!(out.status.code(), Some(3));

    // An escalation (every answer sampled for audit), then a remote failure, sharing the log.
    let good = fake(vec![(200, openai_answer("Remote says teal"))]);
    let bad = fake(vec![(500, r#"{"error":{"message":"boom"}}"#.into())]);
    let remote = |url: &str, extra: &str| {
        let cfg2 = tmp.path().join("remote.toml");
        std::fs::write(
            &cfg2,
            format!(
                "[slm]\nmodel_dir = {:?}\n[audit]\nenabled = true\ndir = {:?}\n\
                 [providers.openai]\nkind = \"openai\"\nbase_url = \"{url}/v1\"\nmodel = \"remote-large\"\nmax_retries = 0\n\
                 [routing.llm_fallback]\nproviders = [\"openai\"]\n{extra}",
                model.parent().unwrap().display().to_string(),
                dir.display().to_string()
            ),
        )
        .unwrap();
        cfg2
    };
    let cfg2 = remote(
        &good.url,
        "[routing.confidence_thresholds]\ndefault = 0.001\naudit_rate = 1.0\n",
    );
    let out = Command::new(corral())
        .args([
            "--config",
            cfg2.to_str().unwrap(),
            "run",
            "--json",
            "--max-tokens",
            "8",
            prompt,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let escalated: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cfg3 = remote(
        &bad.url,
        "[routing]\ndefault_action = { type = \"require_llm\", reason = \"all remote\" }\n",
    );
    let out = Command::new(corral())
        .args(["--config", cfg3.to_str().unwrap(), "run", "hello remote"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    let out = run(&["logs", "verify"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("4 entries"), "{}", stdout(&out));
    let out = run(&["logs", "decrypt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(e.len(), 4);
    assert_eq!(e[0]["interaction"], "chat");
    assert_eq!(e[0]["route"], "slm");
    assert_eq!(e[0]["model"], "smollm2-135m-instruct");
    assert_eq!(e[0]["caller"]["team"], "t-research");
    assert_eq!(e[0]["error"], false);
    assert_eq!(
        e[0]["usage"]["completion_tokens"],
        answer["usage"]["completion_tokens"]
    );
    assert_eq!(e[0]["confidence"], answer["confidence"]["score"]);
    assert_eq!(e[0]["response"]["text"], answer["text"]);
    assert_eq!(
        e[0]["request"]["messages"][0]["content"],
        "Name a colour. Mention [EMAIL]."
    );
    assert_eq!(e[1]["interaction"], "route_denied");
    assert_eq!(e[1]["route"], "deny");
    assert_eq!(e[1]["caller"]["agent"], "ci-7");
    assert_eq!(e[1]["response"]["denied"], "CI agents may not use models");
    assert_eq!(e[1]["request"]["messages"][0]["content"], "hello there");

    assert_eq!(e[2]["interaction"], "escalation");
    assert_eq!(e[2]["route"], "slm");
    assert_eq!(
        (&e[2]["model"], &e[2]["provider"]),
        (&json!("remote-large"), &json!("openai"))
    );
    assert!(
        e[2]["escalation_reason"]
            .as_str()
            .unwrap()
            .contains("audit sample"),
        "{}",
        e[2]
    );
    assert_eq!(
        e[2]["confidence"], escalated["slm"]["confidence"]["score"],
        "the SLM's score"
    );
    assert_eq!(e[2]["response"]["text"], "Remote says teal");
    assert_eq!(e[2]["response"]["slm"]["text"], escalated["slm"]["text"]);
    assert_eq!(e[2]["usage"]["prompt_tokens"], 20);
    assert_eq!(e[3]["route"], "llm");
    assert_eq!(e[3]["error"], true);
    let msg = e[3]["response"]["error"].as_str().unwrap();
    assert!(msg.contains("500") && msg.contains("boom"), "{msg}");
    assert!(e[3]["escalation_reason"].is_null());

    let answer_text = answer["text"].as_str().unwrap();
    for f in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        for needle in [
            "Name a colour",
            "hello there",
            "Remote says teal",
            "hello remote",
            answer_text.trim(),
        ] {
            // (a short answer could occur in the metadata or the base64 by chance)
            if needle.len() >= 8 {
                assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_bytes()));
            }
        }
    }
}
