//! A `corral-runner` process inside its sandbox, seen from the supervisor.
//!
//! The runner always gets an empty network namespace (whatever the profile says), read-only
//! access to its model file and binary, the runner seccomp allow-list under strict profiles, and
//! the profile's memory/CPU/pids limits. Each request is bounded by the profile's
//! `max_execution_time_seconds`: past it the runner is killed. Everything the runner sends is
//! validated: frame size, token ids against the vocabulary, log-probabilities and entropies in
//! range, streamed text consistent with the final text.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use corral_protocol::{
    Done, ErrorKind, GenerateRequest, Ready, Request, Response, TokenInfo, MAX_REQUEST_FRAME,
    MAX_RESPONSE_FRAME, MAX_TOP_LOGPROBS,
};
use syscalls::Sysno;

use crate::profile::Profile;
use crate::sandbox::{
    self, launch, plan, seccomp, HostSupport, Outcome, Sandbox, SandboxConfig, SandboxError,
};

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("the runner broke the protocol: {0}")]
    Protocol(String),
    #[error("time limit: the runner took longer than {0:?} (process_limits.max_execution_time_seconds) and was killed")]
    TimeLimit(Duration),
    #[error("the runner died{}", describe(.0))]
    Died(Option<Outcome>),
    #[error("the runner refused the request: {0}")]
    Refused(String),
    /// The request does not fit the model's context (a larger model may take it).
    #[error("the request does not fit the model's context: {0}")]
    TooLong(String),
    #[error("the model's output is unusable: {0}")]
    Model(String),
    #[error("the runner could not load the model: {0}")]
    Load(String),
    #[error("runner i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the runner did not stop within {0:?} of being cancelled (a prefill step cannot be interrupted) and was killed")]
    CancelIgnored(Duration),
}

fn describe(o: &Option<Outcome>) -> String {
    match o {
        None => String::new(),
        Some(o) => {
            let mut s = match o.exit {
                sandbox::Exit::Code(c) => format!(" (exit status {c})"),
                sandbox::Exit::Signal(n) => format!(" (killed by signal {n})"),
            };
            for l in &o.limits {
                s.push_str(": ");
                s.push_str(&l.message());
            }
            s
        }
    }
}

pub type Result<T, E = RunnerError> = std::result::Result<T, E>;

/// Where the `corral-runner` binary is: `$CORRAL_RUNNER`, else beside the running executable.
pub fn runner_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CORRAL_RUNNER") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Integration tests run from target/<profile>/deps.
    let beside = dir.join("corral-runner");
    if beside.exists() {
        return beside;
    }
    dir.parent()
        .map(|d| d.join("corral-runner"))
        .filter(|p| p.exists())
        .unwrap_or(beside)
}

/// Options for starting a runner.
#[derive(Debug, Clone)]
pub struct RunnerSpec {
    pub model_path: PathBuf,
    pub sha256: Option<String>,
    pub binary: PathBuf,
    /// Requests the runner decodes together at most (`server.pool.slots`).
    pub slots: usize,
    /// The catalog entry's GPU requirements: the profile must hand over a GPU, and the runner
    /// checks the GPU against them.
    pub gpu: Option<crate::catalog::GpuRequirements>,
}

/// Reads frames from a pipe with a deadline.
#[derive(Debug)]
struct FrameReader {
    file: File,
    buf: Vec<u8>,
}

enum Read_ {
    Frame(Response),
    Eof,
    Timeout,
}

impl FrameReader {
    fn next(&mut self, deadline: Instant) -> Result<Read_> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                if len > MAX_RESPONSE_FRAME {
                    return Err(RunnerError::Protocol(format!(
                        "frame of {len} bytes exceeds the {MAX_RESPONSE_FRAME}-byte limit"
                    )));
                }
                let total = 4 + len as usize;
                if self.buf.len() >= total {
                    let msg = serde_json::from_slice(&self.buf[4..total])
                        .map_err(|e| RunnerError::Protocol(format!("malformed frame: {e}")))?;
                    self.buf.drain(..total);
                    return Ok(Read_::Frame(msg));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Read_::Timeout);
            }
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: poll on one pollfd we own.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if r == 0 {
                return Ok(Read_::Timeout);
            }
            let mut chunk = [0u8; 65536];
            let n = self.file.read(&mut chunk)?;
            if n == 0 {
                return Ok(if self.buf.is_empty() {
                    Read_::Eof
                } else {
                    return Err(RunnerError::Protocol("stream ended inside a frame".into()));
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A generation request the runner holds, as the supervisor tracks it.
#[derive(Debug)]
pub struct InFlight {
    pub id: u64,
    stream: bool,
    max_tokens: u32,
    top_n: u32,
    /// Text of the tokens streamed so far.
    streamed: String,
    count: u32,
    /// When `cancel` was sent.
    pub cancelled: Option<Instant>,
    /// Past this the runner is killed (the profile's `max_execution_time_seconds`).
    pub deadline: Instant,
}

/// What a frame meant for its request.
#[derive(Debug)]
pub enum Progress {
    /// The runner started computing it (after holding it back).
    Started,
    Token(TokenInfo),
    Done(Box<Done>),
}

/// A started runner with its model loaded.
#[derive(Debug)]
pub struct Runner {
    sandbox: Sandbox,
    stdin: File,
    reader: FrameReader,
    pub ready: Ready,
    pub profile: String,
    time_limit: Duration,
    next_id: u64,
    /// Spawn to Ready, as the supervisor saw it.
    pub startup: Duration,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new fds into our array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// How often a generation waiting on its runner asks whether to stop.
pub const STOP_POLL: Duration = Duration::from_millis(100);
/// How long a cancelled runner has to answer before it is killed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

impl Runner {
    /// Starts the runner for `spec` under `profile` and waits for its model to load.
    pub fn start(
        spec: &RunnerSpec,
        profile: &Profile,
        cfg: &SandboxConfig,
        host: &HostSupport,
    ) -> Result<Runner> {
        let started = Instant::now();
        if let (Some(g), crate::profile::schema::GpuAccess::None) = (&spec.gpu, &profile.gpu_access)
        {
            return Err(RunnerError::Load(format!(
                "the model needs a GPU (gpu_requirements: {} MB{}) and profile '{}' grants none \
                 (resources.gpu_access is None): use a profile with GPU access, e.g. `gpu`",
                g.min_vram_mb,
                g.compute_capability
                    .as_ref()
                    .map(|c| format!(", compute capability {c}"))
                    .unwrap_or_default(),
                profile.name
            )));
        }
        let mut argv: Vec<std::ffi::OsString> = vec![
            spec.binary.clone().into(),
            "--model".into(),
            spec.model_path.clone().into(),
        ];
        if let Some(sha) = &spec.sha256 {
            argv.push("--sha256".into());
            argv.push(sha.into());
        }
        if spec.slots > 1 {
            argv.push("--slots".into());
            argv.push(spec.slots.to_string().into());
        }
        if let Some(g) = &spec.gpu {
            argv.push("--gpu-min-vram-mb".into());
            argv.push(g.min_vram_mb.to_string().into());
            if let Some(c) = &g.compute_capability {
                argv.push("--gpu-compute-capability".into());
                argv.push(c.into());
            }
        }
        if profile.max_memory_mb > 0 {
            // The runner sizes its KV budget from what this leaves beside the loaded model.
            argv.push("--memory-limit-mb".into());
            argv.push(profile.max_memory_mb.to_string().into());
        }
        let cmd = plan::Command {
            argv,
            env: vec![],
            cwd: Some("/".into()),
            extra_read: vec![spec.model_path.clone()],
            force_no_network: true,
            seccomp_base: seccomp::Base::Runner,
            extra_syscalls: vec![
                Sysno::landlock_create_ruleset,
                Sysno::landlock_restrict_self,
            ],
        };
        let p = plan::plan(profile, &cmd, host, cfg)?;
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let sandbox = launch::spawn(&p, cfg, host, [Some(in_r), Some(out_w), None])?;
        // Writes to the runner are bounded by the same deadline as reads: a runner that stops
        // reading must not block the supervisor.
        // SAFETY: fcntl on the pipe fd we own.
        unsafe { libc::fcntl(in_w.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut runner = Runner {
            sandbox,
            stdin: File::from(in_w),
            reader: FrameReader {
                file: File::from(out_r),
                buf: Vec::new(),
            },
            ready: Ready {
                architecture: String::new(),
                quantization: String::new(),
                vocab_size: 0,
                context_length: 0,
                eos_token_ids: vec![],
                has_chat_template: false,
                threads: 0,
                kernels: String::new(),
                device: String::new(),
                load_ms: 0.0,
                slots: 1,
                kv_bytes_per_token: 0,
                kv_budget_mb: 0,
            },
            profile: profile.name.clone(),
            time_limit: profile.max_execution_time,
            next_id: 1,
            startup: Duration::ZERO,
        };
        match runner.read(started + runner.time_limit)? {
            Response::Ready(r) => {
                if r.vocab_size == 0 || r.context_length == 0 {
                    return Err(RunnerError::Protocol(
                        "ready frame with an empty vocabulary or context".into(),
                    ));
                }
                runner.ready = r;
                // Never more than the supervisor asked for (its queue counts on it).
                runner.ready.slots = runner.ready.slots.clamp(1, spec.slots.max(1) as u32);
            }
            Response::Error { message, .. } => return Err(RunnerError::Load(message)),
            other => {
                return Err(RunnerError::Protocol(format!(
                    "expected ready, got {other:?}"
                )))
            }
        }
        runner.startup = started.elapsed();
        Ok(runner)
    }

    /// What the runner's cgroup has counted so far (memory peak, CPU time, OOM kills).
    pub fn stats(&self) -> crate::sandbox::cgroup::Stats {
        self.sandbox.stats()
    }

    pub fn pid(&self) -> i32 {
        self.sandbox.pid()
    }

    /// Sends one request frame before `deadline`; past it, kills the runner.
    fn send(&mut self, req: &Request, deadline: Instant) -> Result<()> {
        let body = serde_json::to_vec(req).map_err(|e| RunnerError::Protocol(e.to_string()))?;
        let len = u32::try_from(body.len())
            .ok()
            .filter(|l| *l <= MAX_REQUEST_FRAME)
            .ok_or_else(|| {
                RunnerError::Refused(format!(
                    "request of {} bytes exceeds the {MAX_REQUEST_FRAME}-byte frame limit",
                    body.len()
                ))
            })?;
        let mut frame = len.to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        let mut off = 0;
        while off < frame.len() {
            match self.stdin.write(&frame[off..]) {
                Ok(0) => return Err(RunnerError::Died(None)),
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let mut pfd = libc::pollfd {
                        fd: self.stdin.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
                    // SAFETY: poll on one pollfd we own.
                    if left.is_zero() || unsafe { libc::poll(&mut pfd, 1, ms) } == 0 {
                        return Err(self.overran());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(self.died()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads the next frame before `deadline`; on timeout kills the runner.
    fn read(&mut self, deadline: Instant) -> Result<Response> {
        match self.reader.next(deadline)? {
            Read_::Frame(r) => Ok(r),
            Read_::Timeout => Err(self.overran()),
            Read_::Eof => Err(self.died()),
        }
    }

    /// The request ran past the time limit: kill the runner and say so.
    fn overran(&mut self) -> RunnerError {
        self.sandbox.kill_for_time_limit();
        let _ = self.sandbox.wait_until(None);
        RunnerError::TimeLimit(self.time_limit)
    }

    /// The runner closed its end: reap it and report how it ended.
    fn died(&mut self) -> RunnerError {
        let deadline = Instant::now() + Duration::from_secs(5);
        RunnerError::Died(
            self.sandbox
                .wait_until(Some(deadline))
                .ok()
                .flatten()
                .cloned(),
        )
    }

    /// Runs one request; `on_token` sees each validated token as it arrives.
    pub fn generate(
        &mut self,
        req: GenerateRequest,
        on_token: &mut dyn FnMut(&TokenInfo),
    ) -> Result<Done> {
        self.generate_until(req, on_token, &|| false)
    }

    /// [`Runner::generate`], ended early once `stop()` says so (its caller went away or ran
    /// out of time): the runner is sent `cancel`, which it honours between tokens, and the
    /// answer so far comes back with finish reason `cancelled`. `stop` is asked after every
    /// token and every [`STOP_POLL`] while waiting; the runner stays usable.
    pub fn generate_until(
        &mut self,
        req: GenerateRequest,
        on_token: &mut dyn FnMut(&TokenInfo),
        stop: &dyn Fn() -> bool,
    ) -> Result<Done> {
        let mut f = self.submit(req)?;
        loop {
            let frame = loop {
                if let Some(r) = self.poll((Instant::now() + STOP_POLL).min(f.deadline))? {
                    break r;
                }
                self.check_time(&mut f, stop())?;
            };
            if f.cancelled.is_none() && stop() {
                self.cancel(&mut f)?;
            }
            match self.take(&mut f, frame)? {
                Progress::Started => {}
                Progress::Token(t) => on_token(&t),
                Progress::Done(d) => return Ok(*d),
            }
        }
    }

    /// Sends a generation request; the runner answers it (with others it holds) through
    /// [`Runner::poll`] and [`Runner::take`].
    pub fn submit(&mut self, mut req: GenerateRequest) -> Result<InFlight> {
        req.id = self.next_id;
        self.next_id += 1;
        req.top_logprobs = req.top_logprobs.min(MAX_TOP_LOGPROBS);
        let deadline = Instant::now() + self.time_limit;
        self.send(&Request::Generate(Box::new(req.clone())), deadline)?;
        Ok(InFlight {
            id: req.id,
            stream: req.stream,
            max_tokens: req.max_tokens,
            top_n: req.top_logprobs,
            streamed: String::new(),
            count: 0,
            cancelled: None,
            deadline,
        })
    }

    /// Asks the runner to end a request (it answers `done` with finish reason `cancelled`).
    pub fn cancel(&mut self, f: &mut InFlight) -> Result<()> {
        if f.cancelled.is_none() {
            self.send(&Request::Cancel { id: f.id }, f.deadline)?;
            f.cancelled = Some(Instant::now());
        }
        Ok(())
    }

    /// The next frame the runner sends before `until` (`None` when none came); an ended
    /// stream is the runner's death.
    pub fn poll(&mut self, until: Instant) -> Result<Option<Response>> {
        match self.reader.next(until)? {
            Read_::Frame(r) => Ok(Some(r)),
            Read_::Eof => Err(self.died()),
            Read_::Timeout => Ok(None),
        }
    }

    /// The limits of a request in flight: past its time limit, or cancelled and not answered
    /// within [`CANCEL_GRACE`] (a prefill step has no point to stop at), it ends the runner;
    /// with `stop` (its caller is gone) it is cancelled.
    pub fn check_time(&mut self, f: &mut InFlight, stop: bool) -> Result<()> {
        if Instant::now() >= f.deadline {
            return Err(self.overran());
        }
        match f.cancelled {
            None if stop => self.cancel(f)?,
            Some(at) if at.elapsed() >= CANCEL_GRACE => {
                self.sandbox.kill();
                let _ = self.sandbox.wait_until(None);
                return Err(RunnerError::CancelIgnored(CANCEL_GRACE));
            }
            _ => {}
        }
        Ok(())
    }

    /// A frame for request `f`, validated: a token (counted, checked against the vocabulary
    /// and `max_tokens`) or its answer. The request's own failures (refused, too long, a model
    /// whose output is unusable) are errors the runner survives; anything else means the
    /// runner can no longer be trusted.
    pub fn take(&self, f: &mut InFlight, frame: Response) -> Result<Progress> {
        match frame {
            Response::Started { id } if id == f.id => {
                // It waited in the runner for a slot or for memory: its time starts now.
                f.deadline = Instant::now() + self.time_limit;
                Ok(Progress::Started)
            }
            Response::Token { id, token } => {
                if id != f.id || !f.stream {
                    return Err(RunnerError::Protocol(format!(
                        "token for request {id}, expected {}",
                        f.id
                    )));
                }
                self.check_token(&token, f.top_n)?;
                f.count += 1;
                if f.count > f.max_tokens {
                    return Err(RunnerError::Protocol("more tokens than max_tokens".into()));
                }
                f.streamed.push_str(&token.text);
                Ok(Progress::Token(token))
            }
            Response::Done(done) => {
                if done.id != f.id {
                    return Err(RunnerError::Protocol(format!(
                        "done for request {}, expected {}",
                        done.id, f.id
                    )));
                }
                for t in &done.tokens {
                    self.check_token(t, f.top_n)?;
                }
                let n = if f.stream {
                    f.count
                } else {
                    done.tokens.len() as u32
                };
                if done.completion_tokens != n || n > f.max_tokens {
                    return Err(RunnerError::Protocol(format!(
                        "done reports {} tokens, {n} were sent",
                        done.completion_tokens
                    )));
                }
                if !done.text.starts_with(&f.streamed) {
                    return Err(RunnerError::Protocol(
                        "final text does not extend the streamed text".into(),
                    ));
                }
                if !(done.prefill_ms.is_finite()
                    && done.ttft_ms.is_finite()
                    && done.decode_tokens_per_s.is_finite())
                {
                    return Err(RunnerError::Protocol("non-finite timings".into()));
                }
                Ok(Progress::Done(Box::new(done)))
            }
            Response::Error {
                id: Some(id),
                message,
                kind,
            } if id == f.id => Err(match kind {
                ErrorKind::Request => RunnerError::Refused(message),
                ErrorKind::Model => RunnerError::Model(message),
                ErrorKind::Context => RunnerError::TooLong(message),
            }),
            other => Err(RunnerError::Protocol(format!("unexpected frame {other:?}"))),
        }
    }

    /// The request a frame is about, if it names one.
    pub fn frame_id(frame: &Response) -> Option<u64> {
        match frame {
            Response::Token { id, .. } | Response::Tokens { id, .. } | Response::Started { id } => {
                Some(*id)
            }
            Response::Done(d) => Some(d.id),
            Response::Error { id, .. } => *id,
            Response::Ready(_) => None,
        }
    }

    /// The profile's time limit per request.
    pub fn time_limit(&self) -> Duration {
        self.time_limit
    }

    /// Requests the runner decodes together at most.
    pub fn slots(&self) -> usize {
        self.ready.slots.max(1) as usize
    }

    /// The runner's tokenization of `text` (for parity tests and prompt accounting).
    pub fn tokenize(&mut self, text: &str, special: bool) -> Result<Vec<u32>> {
        let id = self.next_id;
        self.next_id += 1;
        let deadline = Instant::now() + self.time_limit;
        self.send(
            &Request::Tokenize {
                id,
                text: text.to_string(),
                special,
            },
            deadline,
        )?;
        match self.read(deadline)? {
            Response::Tokens { id: got, ids } if got == id => {
                if ids.iter().any(|t| *t >= self.ready.vocab_size) {
                    return Err(RunnerError::Protocol(
                        "token id outside the vocabulary".into(),
                    ));
                }
                Ok(ids)
            }
            other => Err(RunnerError::Protocol(format!(
                "expected tokens for request {id}, got {other:?}"
            ))),
        }
    }

    fn check_token(&self, t: &TokenInfo, top_n: u32) -> Result<()> {
        let v = self.ready.vocab_size;
        let bad = |what: &str| {
            Err(RunnerError::Protocol(format!(
                "token {}: {what}",
                t.token_id
            )))
        };
        if t.token_id >= v {
            return bad("id outside the vocabulary");
        }
        if t.bytes.len() > 1024 || t.text.len() > 4096 {
            return bad("oversized token");
        }
        if !(t.logprob.is_finite() && t.logprob <= 1e-3) {
            return bad("log-probability out of range");
        }
        let max_h = (v as f32).ln() + 1e-2;
        if !(t.entropy.is_finite() && t.entropy >= -1e-3 && t.entropy <= max_h) {
            return bad("entropy out of range");
        }
        if t.top.len() > top_n as usize
            || t.top
                .iter()
                .any(|a| a.token_id >= v || !(a.logprob.is_finite() && a.logprob <= 1e-3))
        {
            return bad("bad top_logprobs");
        }
        Ok(())
    }

    /// Asks the runner to exit and reaps it; the outcome says how it ended.
    pub fn shutdown(mut self) -> Option<Outcome> {
        let _ = self.send(&Request::Shutdown, Instant::now() + Duration::from_secs(2));
        match self
            .sandbox
            .wait_until(Some(Instant::now() + Duration::from_secs(5)))
        {
            Ok(Some(o)) => Some(o.clone()),
            _ => {
                self.sandbox.kill();
                self.sandbox.wait_until(None).ok().flatten().cloned()
            }
        }
    }
}
