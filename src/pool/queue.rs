//! A pool's queue of waiting jobs.
//!
//! Unlike a channel, it can look at what it holds: a job whose caller has gone (its event
//! receiver dropped: a client that disconnected or gave up) gives its place back at once instead
//! of holding it until a worker reaches it, and a timer fails every job that has waited longer
//! than `queue_timeout_seconds` when its time is up, not when a runner frees up.
//!
//! `queue_depth` counts jobs waiting beyond those an idle worker takes at once (so
//! `queue_depth = 0` accepts a job only when a worker is free, like a rendezvous channel).

use std::collections::VecDeque;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{Event, FailKind, Job};

#[derive(Debug)]
pub struct JobQueue {
    state: Mutex<State>,
    /// Workers wait here for jobs.
    work: Condvar,
    /// The expiry timer waits here for the next deadline.
    timer: Condvar,
    capacity: usize,
    timeout: Duration,
}

#[derive(Debug, Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers blocked in [`JobQueue::pop`].
    waiting: usize,
    /// Free slots of workers serving requests (each takes more through [`JobQueue::try_pop`]).
    open: usize,
    closed: bool,
}

impl JobQueue {
    pub fn new(capacity: usize, timeout: Duration) -> JobQueue {
        JobQueue {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            timer: Condvar::new(),
            capacity,
            timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job` unless the queue is closed or full of callers still waiting.
    pub fn push(&self, job: Job) -> Result<(), Box<Job>> {
        let mut s = self.lock();
        s.jobs.retain(|j| !j.events.is_closed());
        if s.closed || s.jobs.len() >= self.capacity + s.waiting + s.open {
            return Err(Box::new(job));
        }
        s.jobs.push_back(job);
        drop(s);
        self.work.notify_one();
        self.timer.notify_one();
        Ok(())
    }

    /// The next job whose caller is still there, waiting at most `wait` (`None`: until one
    /// comes). `Disconnected` once the queue is closed and empty.
    pub fn pop(&self, wait: Option<Duration>) -> Result<Job, RecvTimeoutError> {
        self.pop_for(wait, 1)
    }

    /// [`JobQueue::pop`] for a worker that can take `room` jobs at once: while it waits, `room`
    /// jobs count as taken at once; once it has one, its other `room - 1` free slots stay
    /// counted (as open, see [`JobQueue::set_open`]) so that callers arriving together are
    /// not refused while it starts the first.
    pub fn pop_for(&self, wait: Option<Duration>, room: usize) -> Result<Job, RecvTimeoutError> {
        let room = room.max(1);
        let deadline = wait.map(|w| Instant::now() + w);
        let mut s = self.lock();
        loop {
            while let Some(j) = s.jobs.pop_front() {
                if !j.events.is_closed() {
                    if s.closed && s.jobs.is_empty() {
                        self.timer.notify_all(); // its last job is gone: the timer may end
                    }
                    s.open += room - 1;
                    return Ok(j);
                }
            }
            if s.closed {
                self.timer.notify_all();
                return Err(RecvTimeoutError::Disconnected);
            }
            s.waiting += room;
            s = match deadline {
                None => self.work.wait(s).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        s.waiting -= room;
                        return Err(RecvTimeoutError::Timeout);
                    }
                    self.work
                        .wait_timeout(s, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
            s.waiting -= room;
        }
    }

    /// The next job whose caller is still there, if one waits (for a worker with a free slot).
    pub fn try_pop(&self) -> Option<Job> {
        let mut s = self.lock();
        while let Some(j) = s.jobs.pop_front() {
            if !j.events.is_closed() {
                if s.closed && s.jobs.is_empty() {
                    self.timer.notify_all();
                }
                return Some(j);
            }
        }
        None
    }

    /// A serving worker's free slots went from `was` to `now` (they count as room, like a
    /// waiting worker).
    pub fn set_open(&self, was: usize, now: usize) {
        let mut s = self.lock();
        s.open = (s.open + now).saturating_sub(was);
    }

    /// Jobs waiting whose callers are still there.
    pub fn waiting(&self) -> usize {
        let mut s = self.lock();
        s.jobs.retain(|j| !j.events.is_closed());
        s.jobs.len()
    }

    /// Whether [`JobQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// No new jobs; workers take what is queued, then see `Disconnected`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
        self.timer.notify_all();
    }

    /// The expiry timer's loop: fails each job as its queue wait runs out (429 for its caller),
    /// calling `on_change` with the new depth; returns once the queue is closed and empty.
    pub fn run_timer(&self, on_change: &dyn Fn(usize)) {
        let mut s = self.lock();
        loop {
            let now = Instant::now();
            let before = s.jobs.len();
            s.jobs.retain(|j| {
                if j.events.is_closed() {
                    return false;
                }
                if now.duration_since(j.enqueued) < self.timeout {
                    return true;
                }
                let _ = j.events.send(Event::Failed {
                    kind: FailKind::QueueTimeout,
                    error: "queue timeout".into(),
                    retryable: false,
                });
                false
            });
            if s.jobs.len() != before {
                on_change(s.jobs.len());
            }
            if s.closed && s.jobs.is_empty() {
                return;
            }
            let next_due = s
                .jobs
                .iter()
                .map(|j| (j.enqueued + self.timeout).saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(3600));
            s = self
                .timer
                .wait_timeout(s, next_due.max(Duration::from_millis(1)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_protocol::{GenerateRequest, Input, Sampling};
    use std::sync::Arc;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    fn job() -> (Job, UnboundedReceiver<Event>) {
        let (tx, rx) = unbounded_channel();
        let req = GenerateRequest {
            id: 0,
            input: Input::Prompt("x".into()),
            sampling: Sampling::default(),
            max_tokens: 1,
            stop: vec![],
            top_logprobs: 0,
            stream: true,
            ignore_eos: false,
            constraint: None,
            tools: None,
            max_tokens_explicit: false,
            cache_key: None,
        };
        (
            Job {
                req,
                events: tx,
                enqueued: Instant::now(),
            },
            rx,
        )
    }

    #[test]
    fn callers_that_left_give_their_place_back() {
        let q = JobQueue::new(2, Duration::from_secs(30));
        let (a, ra) = job();
        let (b, rb) = job();
        let (c, _rc) = job();
        q.push(a).unwrap();
        q.push(b).unwrap();
        assert!(q.push(c).is_err(), "full at two waiting callers");
        drop((ra, rb)); // both gave up
        let (d, _rd) = job();
        q.push(d).expect("their places are free again");
        assert_eq!(q.waiting(), 1);
        assert!(q.pop(Some(Duration::ZERO)).is_ok());
        assert!(matches!(
            q.pop(Some(Duration::from_millis(10))),
            Err(RecvTimeoutError::Timeout)
        ));
    }

    #[test]
    fn a_waiting_job_gets_its_429_when_its_time_is_up_not_when_a_runner_frees() {
        let q = Arc::new(JobQueue::new(4, Duration::from_millis(300)));
        let timer = {
            let q = q.clone();
            std::thread::spawn(move || q.run_timer(&|_| {}))
        };
        let (a, mut ra) = job();
        let t = Instant::now();
        q.push(a).unwrap();
        let ev = ra.blocking_recv();
        assert!(
            matches!(
                ev,
                Some(Event::Failed {
                    kind: FailKind::QueueTimeout,
                    ..
                })
            ),
            "{ev:?}"
        );
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500),
            "{waited:?}"
        );
        q.close();
        timer.join().unwrap();
    }

    #[test]
    fn the_timer_ends_once_a_closed_queue_is_drained() {
        let q = Arc::new(JobQueue::new(4, Duration::from_secs(30)));
        let timer = {
            let q = q.clone();
            std::thread::spawn(move || q.run_timer(&|_| {}))
        };
        let (a, _ra) = job();
        q.push(a).unwrap();
        std::thread::sleep(Duration::from_millis(50)); // the timer now waits for a's deadline
        q.close();
        assert!(
            q.pop(None).is_ok(),
            "queued work is still handed out after close"
        );
        let t = Instant::now();
        timer.join().unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn depth_zero_accepts_only_when_a_worker_waits() {
        let q = Arc::new(JobQueue::new(0, Duration::from_secs(30)));
        let (a, _ra) = job();
        assert!(q.push(a).is_err(), "no worker is waiting");
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || q.pop(None).is_ok())
        };
        let t = Instant::now();
        let _kept = loop {
            let (b, rb) = job();
            match q.push(b) {
                Ok(()) => break rb,
                Err(_) => {
                    assert!(t.elapsed() < Duration::from_secs(5));
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        assert!(worker.join().unwrap(), "the waiting worker got the job");
        q.close();
        assert!(matches!(q.pop(None), Err(RecvTimeoutError::Disconnected)));
    }
}
