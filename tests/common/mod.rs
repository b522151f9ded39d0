#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Helpers shared by the integration tests: the binaries under test, scratch trees the sandbox
//! user can use, profile files, and running `corral sandbox exec`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

pub const SANDBOX_UID: u32 = 61_000;

pub fn corral() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_corral"))
}

/// The escape probe, built by `cargo test` as the example `escape-probe`.
pub fn probe() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/examples/escape-probe
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples/escape-probe");
    assert!(
        p.exists(),
        "escape probe not built at {} (cargo test builds examples)",
        p.display()
    );
    p
}

/// A scratch tree: `ro/` (readable, with `ro/file` and a denied `ro/secret/`), `rw/` (owned by
/// the sandbox user), and the outside (`outside.txt`), all reachable by the sandbox user.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("corral-test-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(root.join("ro/secret")).unwrap();
        std::fs::create_dir_all(root.join("ro/sub")).unwrap();
        std::fs::write(root.join("ro/file"), "readable\n").unwrap();
        std::fs::write(root.join("ro/secret/key"), "top secret\n").unwrap();
        std::fs::write(root.join("outside.txt"), "outside\n").unwrap();
        std::fs::create_dir(root.join("rw")).unwrap();
        chown(root.join("rw"), Some(SANDBOX_UID), Some(SANDBOX_UID)).unwrap();
        for p in ["ro", "ro/secret", "ro/sub"] {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for p in ["ro/file", "ro/secret/key", "outside.txt"] {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        Scratch { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a profile file (merged onto `secure` by corral) and returns its path.
    pub fn profile(&self, name: &str, toml: &str) -> PathBuf {
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, toml).unwrap();
        p
    }

    /// The standard escape-test profile: secure, plus the scratch ro/rw trees and /usr.
    pub fn escape_profile(&self) -> PathBuf {
        let root = self.dir.path().display();
        self.profile(
            "escape",
            &format!(
                r#"
[resources]
max_memory_mb = 128
[filesystem]
read_paths = ["{root}/ro", "/usr"]
write_paths = ["{root}/rw"]
denied_paths = ["{root}/ro/secret"]
[process_limits]
max_execution_time_seconds = 20
max_threads = 16
"#
            ),
        )
    }
}

/// `corral sandbox exec --profile PROFILE -- ARGS...` with a clean config (no ./corral.toml).
pub fn exec(profile: &Path, args: &[&str]) -> Output {
    Command::new(corral())
        .arg("--config")
        .arg(empty_config())
        .args(["sandbox", "exec", "--profile"])
        .arg(profile)
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run corral")
}

/// An empty corral.toml (so a developer's ./corral.toml or $CORRAL_CONFIG cannot interfere).
pub fn empty_config() -> PathBuf {
    let p = std::env::temp_dir().join("corral-test-empty.toml");
    if !p.exists() {
        std::fs::write(&p, "").unwrap();
    }
    p
}

/// One probe attempt: runs `escape-probe CHECK ARGS` in the sandbox and parses its JSON line.
pub fn probe_check(profile: &Path, check: &[&str]) -> (serde_json::Value, Output) {
    let probe = probe();
    let mut args = vec![probe.to_str().unwrap()];
    args.extend_from_slice(check);
    let out = exec(profile, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "probe {check:?}: no JSON ({e}); status {:?}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Directories of sandbox cgroups (`<hierarchy>/<own>/corral/*`) on this host.
pub fn sandbox_cgroups() -> Vec<PathBuf> {
    let host = corral::sandbox::cgroup::CgroupHost::detect();
    let mut out = Vec::new();
    let dirs = [&host.memory, &host.cpu, &host.pids, &host.io, &host.devices]
        .into_iter()
        .flatten()
        .map(|h| h.own_dir.clone())
        .chain(host.v2_own.clone());
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(d.join("corral")) {
            out.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The default model's file. Missing weights fail the test (CI fetches them first).
pub fn model_file() -> PathBuf {
    model_named("SmolLM2-135M-Instruct.Q4_1.gguf", "scripts/fetch-model.sh")
}

/// A model file in corral's model directory; missing, it fails the test naming how to fetch it.
pub fn model_named(file: &str, fetch: &str) -> PathBuf {
    let dir = std::env::var_os("CORRAL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("XDG_DATA_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/share")
                });
            base.join("corral/models")
        });
    let p = dir.join(file);
    assert!(
        p.is_file(),
        "the weights are missing at {}: run {fetch} (tests that need them fail rather than skip)",
        p.display()
    );
    p
}

/// `corral ARGS...` with a clean config.
pub fn corral_with(args: &[&str]) -> Output {
    Command::new(corral())
        .arg("--config")
        .arg(empty_config())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run corral")
}

/// Undoes the GGUF conversion's interleaving of the two rotary halves of each head's Q or K rows
/// (llama GGUFs rotate adjacent pairs; Hugging Face checkpoints, Qwen2 and Phi-3 rotate halves).
pub fn rotary_halves(t: candle_core::Tensor, heads: usize) -> candle_core::Tensor {
    let (rows, cols) = t.dims2().unwrap();
    t.reshape((heads, rows / heads / 2, 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// The built-in catalog's entry for `id`.
pub fn catalog_entry(id: &str) -> corral::catalog::ModelDef {
    #[derive(serde::Deserialize)]
    struct File {
        models: Vec<corral::catalog::ModelDef>,
    }
    let f: File = toml::from_str(corral::catalog::BUILTIN_CATALOG).unwrap();
    f.models.into_iter().find(|m| m.id == id).unwrap()
}

/// A greedy, unstreamed generation of at most `max_tokens` for `input`, nothing else set.
pub fn greedy_request(
    input: corral_protocol::Input,
    max_tokens: u32,
) -> corral_protocol::GenerateRequest {
    corral_protocol::GenerateRequest {
        id: 0,
        input,
        sampling: corral_protocol::Sampling::default(),
        max_tokens,
        stop: vec![],
        top_logprobs: 0,
        stream: false,
        ignore_eos: false,
        constraint: None,
        tools: None,
        max_tokens_explicit: false,
        cache_key: None,
    }
}

/// Starts a sandboxed runner for `model` (a GGUF file or a checkpoint directory) under the
/// built-in profile `profile`, checking `sha256`.
pub fn start_runner(
    model: &Path,
    sha256: &str,
    profile: &str,
) -> Result<corral::slm::runner::Runner, corral::slm::runner::RunnerError> {
    let spec = corral::slm::runner::RunnerSpec {
        model_path: model.to_path_buf(),
        sha256: Some(sha256.into()),
        binary: corral::slm::runner::runner_binary(),
        slots: 1,
        gpu: None,
    };
    corral::slm::runner::Runner::start(
        &spec,
        &corral::profile::ProfileRegistry::builtin()
            .resolve(profile)
            .unwrap(),
        &corral::sandbox::SandboxConfig::default(),
        &corral::sandbox::HostSupport::probe(),
    )
}

/// One HTTP/1.1 request read from `s`: its path and its body (by `content-length`); `None`
/// when the client closed the connection first.
fn read_request(s: &std::net::TcpStream) -> Option<(String, String)> {
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some((path, String::from_utf8_lossy(&body).into_owned()))
}

/// A loopback HTTP server answering each request with the next scripted (status, body); the last
/// one repeats. Records each request's path and body.
pub struct Fake {
    pub url: String,
    pub seen: Arc<Mutex<Vec<(String, String)>>>,
}

pub fn fake(script: Vec<(u16, String)>) -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut i = 0;
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let Some((path, body)) = read_request(&s) else {
                continue;
            };
            log.lock().unwrap().push((path, body));
            let (status, text) = &script[i.min(script.len() - 1)];
            i += 1;
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    Fake { url, seen }
}

/// A loopback OpenAI-compatible provider that streams each answer as these parts (server-sent
/// events), each written after its wait. Records each request's body, and the index of the
/// part whose write failed when a client closed the connection early.
pub struct FakeStream {
    pub url: String,
    pub seen: Arc<Mutex<Vec<String>>>,
    pub broken: Arc<Mutex<Vec<usize>>>,
}

pub fn fake_stream(parts: Vec<(std::time::Duration, String)>) -> FakeStream {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let broken = Arc::new(Mutex::new(Vec::new()));
    let (log, cut) = (seen.clone(), broken.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let (log, cut, parts) = (log.clone(), cut.clone(), parts.clone());
            std::thread::spawn(move || {
                let Some((_, body)) = read_request(&s) else {
                    return;
                };
                log.lock().unwrap().push(body);
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                if s.write_all(head.as_bytes()).is_err() {
                    return;
                }
                for (i, (wait, part)) in parts.iter().enumerate() {
                    std::thread::sleep(*wait);
                    if s.write_all(part.as_bytes())
                        .and_then(|()| s.flush())
                        .is_err()
                    {
                        cut.lock().unwrap().push(i);
                        return;
                    }
                }
            });
        }
    });
    FakeStream { url, seen, broken }
}

/// An OpenAI chunk carrying `text`, as a server-sent event.
pub fn openai_chunk(text: &str) -> String {
    let v = serde_json::json!({"model": "remote-large",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    format!("data: {v}\n\n")
}

/// The closing events of an OpenAI stream: finish reason, usage, `[DONE]`.
pub fn openai_stream_end() -> String {
    let fin = serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
    let usage =
        serde_json::json!({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 4}});
    format!("data: {fin}\n\ndata: {usage}\n\ndata: [DONE]\n\n")
}

pub fn openai_answer(text: &str) -> String {
    serde_json::json!({
        "id": "x", "object": "chat.completion", "model": "remote-large",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop",
                     "logprobs": {"content": [{"token": "a", "logprob": -0.01}, {"token": "b", "logprob": -0.02}]}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 2}
    })
    .to_string()
}

/// The children (of any thread) of process `pid` (`"self"` or a number) that are a sandbox's
/// first process: in a pid namespace of their own, not `corral` or `cc` processes tests start.
pub fn sandbox_children(pid: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out.retain(|child| {
        std::fs::read_to_string(format!("/proc/{child}/status")).is_ok_and(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|ids| ids.split_whitespace().count() > 1)
        })
    });
    out
}

/// A JSON array of token ids (the reference fixtures').
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The files and llama.cpp's answers, made (or reused while their hashes match) under
/// target/architectures.
pub fn architectures_reference() -> (std::path::PathBuf, serde_json::Value) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/architectures");
    let gemma = model_named(
        "gemma-3-270m-q4_k_m.gguf",
        "scripts/fetch-model.sh gemma3-270m",
    );
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/make-architectures.py"
        ))
        .arg(&dir)
        .arg(model_file())
        .arg(&gemma)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "scripts/make-architectures.py failed (it needs llama.cpp and the gguf package, which \
         scripts/test.sh installs):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.join("architectures.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

/// How a runner's greedy continuation compares with the one llama.cpp recorded for the same
/// prompt (a case written by scripts/make-quantized.py's `greedy`): `same` when identical,
/// `agree` the common prefix, `worst_lp` the largest log-probability difference over it, and
/// a report line when they differ. End-of-sequence ids llama.cpp recorded are dropped (corral
/// does not return them as tokens).
pub struct Agreement {
    pub same: bool,
    pub agree: usize,
    pub worst_lp: f64,
    pub report: Option<String>,
}

pub fn agreement(
    label: &str,
    done: &corral_protocol::Done,
    case: &serde_json::Value,
    eos: &[u32],
) -> Agreement {
    let want: Vec<u32> = ids(&case["greedy_ids"])
        .into_iter()
        .filter(|t| !eos.contains(t))
        .collect();
    let got: Vec<u32> = done.tokens.iter().map(|t| t.token_id).collect();
    let agree = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
    let worst_lp = done
        .tokens
        .iter()
        .zip(case["greedy_logprobs"].as_array().unwrap())
        .take(agree)
        .map(|(tok, lp)| (f64::from(tok.logprob) - lp.as_f64().unwrap()).abs())
        .fold(0f64, f64::max);
    let prompt = case["prompt"].as_str().unwrap_or_default();
    Agreement {
        same: got == want,
        agree,
        worst_lp,
        report: (got != want).then(|| {
            format!("{label} {prompt:?}: agree for {agree}: llama.cpp {want:?} corral {got:?}")
        }),
    }
}
