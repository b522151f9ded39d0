//! Warm runners per (model, profile).
//!
//! Each pool has `server.pool.runners` worker threads sharing one bounded queue. A worker owns
//! one sandboxed `corral-runner` at a time: it starts it (at boot for `server.pool.warm` models,
//! else on the first request), feeds it up to `server.pool.slots` requests at once (the runner
//! decodes them together; frames come back tagged with their request's id), and stops it after
//! `idle_timeout_seconds` without work or `recycle_after_requests` requests (a runner due for
//! recycling takes no new request and is replaced once the ones it holds end). The worker thread is
//! the runner's parent for its whole life, which matters: the runner is started with
//! `PR_SET_PDEATHSIG`, which fires when the *thread* that forked it exits.
//!
//! A runner that crashes, is OOM-killed or hangs past its profile's
//! `max_execution_time_seconds` is killed (the sandbox's cgroup goes with it), counted in
//! `corral_runner_restarts_total` with its limit hits, and replaced after a backoff that grows
//! with consecutive failures (0.1 s doubling to 5 s). Every request it was serving gets
//! [`Event::Failed`] with `retryable`, and the API layer retries it once or escalates it
//! (see `crate::answer`): nothing is dropped silently.
//!
//! An idle runner is health-checked every 30 s (a tokenize round trip within its time limit) and
//! replaced if it fails, so a runner that died or wedged while idle is found before a request
//! meets it.
//!
//! Runners are shared between callers: the prompt states a runner keeps are keyed by caller
//! (`server.pool.prefix_cache`) and never reused across callers unless an operator opts in, and
//! the sandbox's job is to protect the host from the model, which holds for every caller alike; per-tenant pools would multiply the memory of
//! every loaded model. `recycle_after_requests` bounds how long one process lives for operators
//! who want fresh processes regularly.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use corral_protocol::{Done, GenerateRequest, Ready, TokenInfo};
use tokio::sync::mpsc::UnboundedSender;

pub mod queue;
pub mod settings;

use crate::metrics::Metrics;
use crate::profile::Profile;
use crate::sandbox::{HostSupport, LimitHit, SandboxConfig, SandboxError};
use crate::slm::runner::{InFlight, Progress, Runner, RunnerError, RunnerSpec, STOP_POLL};
use queue::JobQueue;
pub use settings::{PoolConfig, PrefixScope, RawPool};

/// What a worker tells the request that submitted a job.
#[derive(Debug)]
pub enum Event {
    Token(TokenInfo),
    Done(Box<Done>, Box<Ready>),
    /// The job failed. `retryable`: the runner crashed, hung or broke the protocol (a fresh
    /// runner may well succeed); otherwise (the model cannot load, the request was refused, the
    /// queue wait ran out) it will not.
    Failed {
        kind: FailKind,
        error: String,
        retryable: bool,
    },
}

/// Why a job failed, for the API to answer in kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// It waited longer than `queue_timeout_seconds` for a runner (429).
    QueueTimeout,
    /// The runner refused the request as given (a prompt longer than the model's context, ...):
    /// the caller's error (400); the runner is healthy and stays.
    Refused,
    /// The request does not fit the model's context: 400, unless the remote chain takes it.
    TooLong,
    /// The runner crashed, hung, broke the protocol or could not be started.
    Runner,
    /// The server is shutting down.
    ShuttingDown,
}

/// The event for a runner that failed to start (`starting`) or to answer: the request's own
/// fault (`Refused`) or the runner's, retryable when a fresh runner may well succeed (it
/// crashed, hung or broke the protocol; a model that cannot load or whose output is unusable
/// will not do better).
pub fn failed(e: &RunnerError, starting: bool) -> Event {
    let (kind, retryable) = match e {
        RunnerError::Refused(_) => (FailKind::Refused, false),
        RunnerError::TooLong(_) => (FailKind::TooLong, false),
        RunnerError::Load(_) | RunnerError::Model(_) => (FailKind::Runner, false),
        // A sandbox this host refuses (not root, a layer it cannot enforce, a path the profile
        // denies but the program needs, ...) is refused again; a launch that timed out, a
        // cgroup or system call that failed, a child that died may well work the next time.
        RunnerError::Sandbox(s) if starting => (
            FailKind::Runner,
            matches!(
                s,
                SandboxError::LaunchTimeout { .. }
                    | SandboxError::Cgroup(_)
                    | SandboxError::Os { .. }
                    | SandboxError::Io { .. }
                    | SandboxError::Child { .. }
                    | SandboxError::ChildDied
                    | SandboxError::Gpu { .. }
            ),
        ),
        _ if starting => (FailKind::Runner, true),
        RunnerError::Died(_)
        | RunnerError::TimeLimit(_)
        | RunnerError::Protocol(_)
        | RunnerError::Io(_) => (FailKind::Runner, true),
        _ => (FailKind::Runner, false),
    };
    let error = match e {
        RunnerError::Refused(why) | RunnerError::TooLong(why) => why.clone(),
        RunnerError::Model(why) => format!("the model's output is unusable: {why}"),
        other => other.to_string(),
    };
    Event::Failed {
        kind,
        error,
        retryable,
    }
}

#[derive(Debug)]
pub struct Job {
    pub req: GenerateRequest,
    pub events: UnboundedSender<Event>,
    pub enqueued: Instant,
}

/// Everything a worker needs to start a runner.
#[derive(Debug, Clone)]
pub struct Launch {
    pub spec: RunnerSpec,
    pub profile: Profile,
    pub sandbox: SandboxConfig,
    pub host: HostSupport,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    queue: Arc<JobQueue>,
    loaded: Arc<AtomicUsize>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    queue_timeout: Duration,
    runners: usize,
    /// Set by [`Pool::abort`]: queued jobs fail at once, no runner is started or waited for.
    aborting: Arc<AtomicBool>,
}

impl Pool {
    /// Starts the workers (and, when `warm`, their runners).
    pub fn start(
        name: String,
        launch: Launch,
        cfg: &PoolConfig,
        warm: bool,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<Pool>> {
        let mut launch = launch;
        launch.spec.slots = cfg.slots;
        let queue = Arc::new(JobQueue::new(cfg.queue_depth, cfg.queue_timeout));
        let pool = Arc::new(Pool {
            name: name.clone(),
            queue: queue.clone(),
            loaded: Arc::new(AtomicUsize::new(0)),
            workers: Mutex::new(Vec::new()),
            queue_timeout: cfg.queue_timeout,
            runners: cfg.runners,
            aborting: Arc::new(AtomicBool::new(false)),
        });
        let mut handles = Vec::new();
        for i in 0..cfg.runners {
            let w = Worker {
                slot: i,
                pool: name.clone(),
                launch: launch.clone(),
                queue: queue.clone(),
                loaded: pool.loaded.clone(),
                metrics: metrics.clone(),
                idle_timeout: cfg.idle_timeout,
                queue_timeout: cfg.queue_timeout,
                recycle_after: cfg.recycle_after,
                aborting: pool.aborting.clone(),
            };
            handles.push(
                std::thread::Builder::new()
                    .name(format!("corral-pool-{i}"))
                    .spawn(move || w.run(warm))?,
            );
        }
        // Queue deadlines fire on time, whether or not a runner frees up.
        let timer_metrics = metrics.clone();
        let timer_pool = name.clone();
        handles.push(
            std::thread::Builder::new()
                .name("corral-pool-timer".into())
                .spawn(move || {
                    queue.run_timer(&|depth| {
                        timer_metrics.set(
                            "corral_queue_depth",
                            &[("pool", &timer_pool)],
                            depth as f64,
                        )
                    })
                })?,
        );
        *lock(&pool.workers) = handles;
        Ok(pool)
    }

    /// Queues a job; a full queue (of callers still waiting) is the caller's 429.
    pub fn submit(&self, job: Job) -> Result<(), Box<Job>> {
        self.queue.push(job)
    }

    /// Jobs waiting whose callers are still there.
    pub fn queue_depth(&self) -> usize {
        self.queue.waiting()
    }

    /// Runners with a model loaded and ready.
    pub fn loaded(&self) -> usize {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn runners(&self) -> usize {
        self.runners
    }

    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// Stops taking jobs; workers finish what is queued, stop their runners and exit.
    pub fn close(&self) {
        self.queue.close();
    }

    /// Whether the pool was closed (a reload retired it, or shutdown).
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Waits for the workers after [`Pool::close`].
    pub fn join(&self) {
        let handles = std::mem::take(&mut *lock(&self.workers));
        for h in handles {
            let _ = h.join();
        }
    }

    /// Whether every worker has exited (after [`Pool::close`]).
    pub fn finished(&self) -> bool {
        lock(&self.workers).iter().all(JoinHandle::is_finished)
    }

    /// After [`Pool::close`], for a shutdown that cannot wait: queued jobs fail at once and no
    /// runner is started any more. Running runners are ended by the caller
    /// ([`crate::sandbox::launch::stop_all`]), which unblocks their workers.
    pub fn abort(&self) {
        self.aborting.store(true, Ordering::Release);
    }
}

/// How often an idle runner is asked to prove it still answers.
const HEALTH_INTERVAL: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Worker {
    /// Index of this worker (and its runner) in the pool, for metrics.
    slot: usize,
    pool: String,
    launch: Launch,
    queue: Arc<JobQueue>,
    loaded: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    idle_timeout: Option<Duration>,
    queue_timeout: Duration,
    recycle_after: Option<u64>,
    aborting: Arc<AtomicBool>,
}

/// How a worker's serving of requests ended.
enum Served {
    /// The runner is kept; `answered`: at least one request was answered (the runner works).
    Kept { answered: bool },
    /// The runner must go (`cause` for the restart metric; `failure`: counts toward backoff).
    Replace { cause: &'static str, failure: bool },
}

/// How often a worker with a free slot looks at the queue while its runner computes.
const ADMIT_POLL: Duration = Duration::from_millis(10);

/// The wait before the next start after `failures` consecutive failed starts or runs.
fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(100 << failures.min(6)).min(Duration::from_secs(5))
}

impl Worker {
    fn run(self, warm: bool) {
        let mut runner: Option<Runner> = None;
        let mut served = 0u64;
        let mut failures = 0u32;
        if warm {
            match self.start_runner() {
                Ok(r) => runner = Some(r),
                Err(e) => {
                    self.start_failed(&e, true);
                    failures += 1;
                }
            }
        }
        let mut idle_since = Instant::now();
        loop {
            let next = if runner.is_none() && warm && failures > 0 && !self.aborting() {
                // A warm runner that failed to start is tried again after the backoff, without
                // waiting for a request to need it.
                match self
                    .queue
                    .pop_for(Some(backoff(failures)), self.launch.spec.slots)
                {
                    Err(RecvTimeoutError::Timeout) => {
                        match self.start_runner() {
                            Ok(r) => {
                                runner = Some(r);
                                failures = 0;
                                idle_since = Instant::now();
                            }
                            Err(e) => {
                                self.start_failed(&e, true);
                                failures += 1;
                            }
                        }
                        continue;
                    }
                    other => other,
                }
            } else if runner.is_some() {
                // Wake for the next health check, or when the idle timeout is due.
                let mut wait = HEALTH_INTERVAL;
                if let Some(t) = self.idle_timeout {
                    wait = wait.min(t.saturating_sub(idle_since.elapsed()));
                }
                self.queue.pop_for(Some(wait), self.launch.spec.slots)
            } else {
                self.queue.pop_for(None, self.launch.spec.slots)
            };
            let job = match next {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout) => {
                    if self.idle_timeout.is_some_and(|t| idle_since.elapsed() >= t) {
                        tracing::info!(pool = %self.pool, "runner idle: stopping it");
                        self.stop(runner.take(), "idle");
                    } else if let Some(r) = runner.as_mut() {
                        // Health check of an idle runner: a tokenize round trip within its time
                        // limit. A runner that fails it is replaced before a request meets it.
                        if let Err(e) = r.tokenize("health check", false) {
                            tracing::warn!(pool = %self.pool, error = %e, "runner failed its health check: replacing it");
                            self.stop(runner.take(), "health_check");
                            failures += 1; // a warm pool starts the next one in the background
                            self.metrics.inc(
                                "corral_runner_restarts_total",
                                &[("pool", &self.pool), ("cause", "health_check")],
                            );
                        }
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            // The queue counts this worker's other slots as open from the moment it took the
            // job (given back below if no runner serves it).
            let mut open = self.launch.spec.slots.max(1) - 1;
            idle_since = Instant::now();
            self.metrics.set(
                "corral_queue_depth",
                &[("pool", &self.pool)],
                self.queue.waiting() as f64,
            );
            if self.aborting() || job.enqueued.elapsed() > self.queue_timeout {
                self.refuse(job);
                self.queue.set_open(open, 0);
                continue;
            }
            let r = match runner.as_mut() {
                Some(r) => r,
                None => {
                    if !self.aborting() {
                        std::thread::sleep(backoff(failures));
                    }
                    match self.start_runner() {
                        Ok(r) => runner.insert(r),
                        Err(e) => {
                            self.start_failed(&e, false);
                            failures += 1;
                            let _ = job.events.send(failed(&e, true));
                            self.queue.set_open(open, 0);
                            continue;
                        }
                    }
                }
            };
            let end = self.serve(r, job, &mut served, &mut open);
            self.queue.set_open(open, 0);
            // Nothing is in flight any more (a failed runner's requests included).
            let slot = self.slot.to_string();
            self.metrics.set(
                "corral_runner_sequences",
                &[("pool", self.pool.as_str()), ("runner", slot.as_str())],
                0.0,
            );
            idle_since = Instant::now();
            match end {
                Served::Kept { answered } => {
                    if answered {
                        failures = 0;
                    }
                    if self.recycle_after.is_some_and(|n| served >= n) {
                        served = 0;
                        self.stop(runner.take(), "recycled");
                    }
                }
                Served::Replace { cause, failure } => {
                    if failure {
                        failures += 1;
                    }
                    served = 0;
                    self.stop(runner.take(), cause);
                }
            }
        }
        self.stop(runner.take(), "shutdown");
    }

    /// Serves `first`, and whatever the queue holds while the runner has a free slot, until
    /// nothing is in flight: each frame goes to its request; a request's own failure (refused,
    /// too long, a model's unusable output) fails it alone; a runner that dies, hangs past a
    /// request's time limit, ignores a cancel or breaks the protocol fails every request it
    /// held (each retryable: its caller retries it once on a fresh runner or escalates it) and
    /// is replaced. `open` is the number of free slots declared to the queue.
    fn serve(&self, r: &mut Runner, first: Job, served: &mut u64, open: &mut usize) -> Served {
        struct Slot {
            job: Job,
            f: InFlight,
        }
        let slots = r.slots();
        let mut active: Vec<Slot> = Vec::new();
        let mut next = Some(first);
        let mut answered = false;
        // Requests in flight as the gauge last showed them.
        let mut shown = usize::MAX;
        // The runner is gone or untrusted: every request in flight fails with `e` (each
        // retryable), and the runner is replaced.
        let runner_failed = |active: Vec<Slot>, e: &RunnerError| {
            tracing::warn!(pool = %self.pool, error = %e, "runner failed: replacing it");
            for s in active {
                let _ = s.job.events.send(failed(e, false));
            }
            Served::Replace {
                cause: "failed",
                failure: true,
            }
        };
        loop {
            // A runner due for recycling takes nothing more: it drains, then is replaced.
            let due = self.recycle_after.is_some_and(|n| *served >= n);
            while active.len() < slots {
                let Some(job) = next
                    .take()
                    .or_else(|| (!due).then(|| self.queue.try_pop()).flatten())
                else {
                    break;
                };
                if self.aborting() || job.enqueued.elapsed() > self.queue_timeout {
                    self.refuse(job);
                    continue;
                }
                match r.submit(job.req.clone()) {
                    Ok(f) => active.push(Slot { job, f }),
                    Err(e @ RunnerError::Refused(_)) => {
                        // Too large a frame: the request's fault, the runner is fine.
                        let _ = job.events.send(failed(&e, false));
                    }
                    Err(e) => {
                        let _ = job.events.send(failed(&e, false));
                        return runner_failed(active, &e);
                    }
                }
            }
            let free = if self.aborting() || due {
                0
            } else {
                slots - active.len()
            };
            if self.queue_open_changed(open, free) || active.len() != shown {
                shown = active.len();
                let slot = self.slot.to_string();
                self.metrics.set(
                    "corral_runner_sequences",
                    &[("pool", self.pool.as_str()), ("runner", slot.as_str())],
                    shown as f64,
                );
            }
            if active.is_empty() {
                return Served::Kept { answered };
            }
            // With a free slot the queue is looked at again soon; either way every request's
            // caller and time limit are checked at least every STOP_POLL.
            let wait = if free > 0 { ADMIT_POLL } else { STOP_POLL };
            let mut until = Instant::now() + wait;
            for s in &active {
                until = until.min(s.f.deadline);
            }
            let frame = match r.poll(until) {
                Ok(f) => f,
                Err(e) => {
                    return runner_failed(active, &e);
                }
            };
            {
                let checked = active.iter_mut().try_for_each(|s| {
                    let gone = s.job.events.is_closed();
                    r.check_time(&mut s.f, gone)
                });
                if let Err(e) = checked {
                    let cancel_ignored = matches!(e, RunnerError::CancelIgnored(_));
                    if cancel_ignored {
                        // Nobody waits for that answer; the runner was busy in a prefill it
                        // could not leave and has been killed. Replaced like any stopped
                        // runner, without counting as a failure (no backoff).
                        tracing::info!(pool = %self.pool, error = %e, "cancelled generation: runner replaced");
                    } else {
                        tracing::warn!(pool = %self.pool, error = %e, "runner failed: replacing it");
                    }
                    for s in active {
                        // Requests whose callers are gone need no answer; the others were
                        // killed with the runner and may be retried.
                        let err = if cancel_ignored {
                            RunnerError::Died(None)
                        } else {
                            RunnerError::TimeLimit(r.time_limit())
                        };
                        if !s.job.events.is_closed() {
                            let _ = s.job.events.send(failed(&err, false));
                        }
                    }
                    return Served::Replace {
                        cause: if cancel_ignored {
                            "cancel_ignored"
                        } else {
                            "failed"
                        },
                        failure: !cancel_ignored,
                    };
                }
            }
            let Some(frame) = frame else { continue };
            let Some(i) =
                Runner::frame_id(&frame).and_then(|id| active.iter().position(|s| s.f.id == id))
            else {
                let e =
                    RunnerError::Protocol(format!("a frame for no request in flight: {frame:?}"));
                return runner_failed(active, &e);
            };
            match r.take(&mut active[i].f, frame) {
                Ok(Progress::Started) => {}
                Ok(Progress::Token(t)) => {
                    let _ = active[i].job.events.send(Event::Token(t));
                }
                Ok(Progress::Done(done)) => {
                    let s = active.remove(i);
                    self.record_usage(r);
                    answered = true;
                    if done.finish_reason == corral_protocol::FinishReason::Cancelled {
                        tracing::info!(pool = %self.pool, tokens = done.completion_tokens, "generation cancelled: its caller went away or ran out of time");
                    } else {
                        *served += 1;
                        let ready = r.ready.clone();
                        let _ = s.job.events.send(Event::Done(done, Box::new(ready)));
                    }
                }
                Err(e @ RunnerError::Model(_)) => {
                    // The model, not the process: a fresh runner of the same weights would do
                    // the same. Kept; the request fails over (escalation) or gets 503.
                    tracing::error!(pool = %self.pool, error = %e, "the model's output is unusable");
                    let s = active.remove(i);
                    let _ = s.job.events.send(failed(&e, false));
                }
                Err(e @ (RunnerError::Refused(_) | RunnerError::TooLong(_))) => {
                    // The request, not the runner: answered as the caller's error (or taken by
                    // the chain, when too long for this model), runner kept.
                    let s = active.remove(i);
                    let _ = s.job.events.send(failed(&e, false));
                }
                Err(e) => {
                    return runner_failed(active, &e);
                }
            }
        }
    }

    /// Fails a job the server is shutting down for, or that waited past the queue timeout.
    fn refuse(&self, job: Job) {
        let _ = job.events.send(if self.aborting() {
            Event::Failed {
                kind: FailKind::ShuttingDown,
                error: "the server is shutting down".into(),
                retryable: false,
            }
        } else {
            Event::Failed {
                kind: FailKind::QueueTimeout,
                error: "queue timeout".into(),
                retryable: false,
            }
        });
    }

    /// Declares `free` slots to the queue (`open` held the last count); whether it changed.
    fn queue_open_changed(&self, open: &mut usize, free: usize) -> bool {
        if *open == free {
            return false;
        }
        self.queue.set_open(*open, free);
        *open = free;
        true
    }

    /// Live cgroup usage of a runner (the gauges of a runner that exits are its last).
    fn record_usage(&self, r: &Runner) {
        let st = r.stats();
        let slot = self.slot.to_string();
        let labels = [("pool", self.pool.as_str()), ("runner", slot.as_str())];
        if let Some(b) = st.memory_peak_bytes {
            self.metrics
                .set("corral_runner_memory_peak_bytes", &labels, b as f64);
        }
        if let Some(ns) = st.cpu_usage_ns {
            self.metrics
                .set("corral_runner_cpu_seconds", &labels, ns as f64 / 1e9);
        }
    }

    fn aborting(&self) -> bool {
        self.aborting.load(Ordering::Acquire)
    }

    /// Logs and counts a runner that did not start (a launch that timed out, a sandbox the
    /// host refused, a model that did not load).
    fn start_failed(&self, e: &RunnerError, warm: bool) {
        tracing::error!(pool = %self.pool, warm, error = %e, "runner failed to start");
        self.metrics.inc(
            "corral_runner_start_failures_total",
            &[("pool", &self.pool)],
        );
    }

    fn start_runner(&self) -> Result<Runner, RunnerError> {
        let l = &self.launch;
        let r = Runner::start(&l.spec, &l.profile, &l.sandbox, &l.host)?;
        self.loaded.fetch_add(1, Ordering::AcqRel);
        self.metrics
            .gauge_add("corral_runners", &[("pool", &self.pool)], 1.0);
        tracing::info!(pool = %self.pool, pid = r.pid(), load_ms = r.ready.load_ms, kernels = %r.ready.kernels, device = %r.ready.device, "runner ready");
        Ok(r)
    }

    /// Stops a runner and records what its cgroup saw.
    fn stop(&self, runner: Option<Runner>, cause: &str) {
        let Some(r) = runner else { return };
        self.loaded.fetch_sub(1, Ordering::AcqRel);
        self.metrics
            .gauge_add("corral_runners", &[("pool", &self.pool)], -1.0);
        if matches!(cause, "failed" | "recycled" | "cancel_ignored") {
            self.metrics.inc(
                "corral_runner_restarts_total",
                &[("pool", &self.pool), ("cause", cause)],
            );
        }
        let outcome = r.shutdown();
        if let Some(o) = outcome {
            for l in &o.limits {
                let name = match l {
                    LimitHit::Time { .. } => "time",
                    LimitHit::Memory { .. } => "memory",
                    LimitHit::Pids { .. } => "pids",
                    LimitHit::Seccomp => "seccomp",
                };
                tracing::warn!(pool = %self.pool, limit = name, "{}", l.message());
                self.metrics.inc(
                    "corral_sandbox_limit_hits_total",
                    &[("pool", &self.pool), ("limit", name)],
                );
            }
            if let Some(ns) = o.stats.cpu_usage_ns {
                self.metrics.add(
                    "corral_runner_cpu_seconds_total",
                    &[("pool", &self.pool)],
                    ns as f64 / 1e9,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retryable(e: RunnerError, starting: bool) -> bool {
        matches!(
            failed(&e, starting),
            Event::Failed {
                retryable: true,
                ..
            }
        )
    }

    #[test]
    fn only_failures_a_fresh_runner_may_not_repeat_are_retryable() {
        // A sandbox this host refuses is refused again; a launch that timed out may not be.
        assert!(!retryable(
            RunnerError::Sandbox(SandboxError::NotRoot),
            true
        ));
        let timeout = SandboxError::LaunchTimeout {
            stage: "mounting",
            after: Duration::from_secs(5),
        };
        assert!(retryable(RunnerError::Sandbox(timeout), true));
        assert!(!retryable(RunnerError::Load("bad file".into()), true));
        assert!(retryable(RunnerError::Died(None), false));
        assert!(retryable(RunnerError::Protocol("x".into()), false));
        assert!(!retryable(RunnerError::Model("NaN".into()), false));
        let Event::Failed { kind, error, .. } =
            failed(&RunnerError::Refused("too long".into()), false)
        else {
            panic!()
        };
        assert_eq!((kind, error.as_str()), (FailKind::Refused, "too long"));
    }
}
