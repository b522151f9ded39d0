//! Keeping the compute pool's other workers awake through one forward pass.
//!
//! A forward pass is a few hundred short parallel regions (a matrix product, an attention
//! block) with short serial steps between them (norms, RoPE, the gate's activation). rayon puts
//! an idle worker to sleep after a few dozen `sched_yield`s, and waking it for the next region
//! costs more than some regions last: measured on a 42-token prompt, the runner context-switched
//! ~270 times per prefill and one worker did 60% of the work (the caller finished a product's
//! chunks alone before the sleeper woke). So for the length of a pass each other worker runs a
//! job that takes whatever work appears in the pool (`rayon::yield_now`) and, in between, gives
//! its core up only to whatever else wants it (`sched_yield`), much as llama.cpp's threads spin
//! between its graph's nodes. Nothing spins between passes; a busy loop on a pause instead of
//! the yield took the cores from other runners sharing them (four runners on two cores: 86
//! tok/s against 137).
//!
//! A spinner also leaves after [`IDLE_LIMIT`] without work, and that is not only thrift: rayon
//! may start a worker's spinner *inside* another job. A worker that stole part of the pass
//! before it saw its spinner, and then waits in that part for a piece someone else took, runs
//! whatever it finds while it waits, its spinner included; the spinner then sits on top of the
//! stolen part, which cannot finish until the spinner returns, while the pass (and so the
//! spinner's end) waits for that part. Waiting for the pass alone deadlocked a loop of short
//! passes within some thousands, in every run (and a runner mid-request in CI); with the limit
//! such a pass loses at most that much time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a spinner goes on without finding work before it leaves the rest of the pass to
/// rayon's own sleeping and waking: longer than the serial steps between a pass's parallel
/// regions, even in a 512-token prompt chunk, and short enough that a spinner started inside
/// another job (see above), rare, costs little. (2 ms made a
/// 400-token Gemma prefill a few percent slower in some rounds; 10 and 20 ms did not differ
/// from no limit within this VM's noise.)
pub const IDLE_LIMIT: Duration = Duration::from_millis(10);

/// Runs `f` on the current worker of a pool while the pool's other workers stay awake to take
/// its parallel work; outside a pool, or in a pool of one, just runs `f`.
pub fn with_workers_awake<R>(f: impl FnOnce() -> R) -> R {
    let me = rayon::current_thread_index();
    if me.is_none() || rayon::current_num_threads() < 2 {
        return f();
    }
    let done = AtomicBool::new(false);
    /// Ends the spinning when the pass ends, even by unwinding (the scope waits for the
    /// spinners before it returns or goes on unwinding).
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    rayon::in_place_scope(|s| {
        // One job on each worker of the pool (a job per worker pushed on the caller's own
        // queue could be taken, one inside another, by a single worker).
        s.spawn_broadcast(|_, ctx| {
            // The caller's own copy, run when it waits for work: no one to keep awake.
            if Some(ctx.index()) == me {
                return;
            }
            let mut idle_since: Option<Instant> = None;
            while !done.load(Ordering::Acquire) {
                if matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                    idle_since = None;
                    continue;
                }
                let now = Instant::now();
                match idle_since {
                    None => idle_since = Some(now),
                    Some(t) if now.duration_since(t) >= IDLE_LIMIT => return,
                    Some(_) => {}
                }
                // Gives the core up when anything else wants it (other runners' threads on
                // the same cores); returns at once when nothing does.
                std::thread::yield_now();
            }
        });
        let _done = Done(&done);
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Inside a pool the pass's parallel work is done and its value returned; the spinners end
    /// with the pass (the call returns), also when the pass panics; outside a pool it just runs.
    #[test]
    fn the_pass_runs_and_the_spinners_end_with_it() {
        assert_eq!(with_workers_awake(|| 7), 7);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            for _ in 0..50 {
                let sum: u64 =
                    with_workers_awake(|| (0..10_000u64).into_par_iter().map(|x| x * x).sum());
                assert_eq!(sum, (0..10_000u64).map(|x| x * x).sum::<u64>());
            }
            let r = std::panic::catch_unwind(|| with_workers_awake(|| panic!("pass failed")));
            assert!(r.is_err());
            // The pool still works after the panic (no spinner left holding a worker).
            let v: Vec<u32> = (0..100).into_par_iter().map(|x| x + 1).collect();
            assert_eq!(v.len(), 100);
        });
    }

    /// Many short passes in a row, each a few parallel regions with a serial step between the
    /// passes (a decode): every pass ends. A worker can take part of a pass before its spinner
    /// and then run the spinner inside that part; spinning until the pass ends then deadlocked
    /// within a few thousand passes, in every run of this test.
    #[test]
    fn passes_end_even_when_a_spinner_starts_inside_the_pass_s_own_work() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            pool.install(|| {
                let mut v = vec![0f32; 4096];
                for i in 0..100_000u32 {
                    with_workers_awake(|| {
                        for _ in 0..4 {
                            v.par_chunks_mut(64).for_each(|c| {
                                for x in c.iter_mut() {
                                    *x = (*x + 1.0).sqrt();
                                }
                            });
                        }
                    });
                    let gap: f32 = (0..i % 50).map(|k| (k as f32).sqrt()).sum();
                    std::hint::black_box(gap);
                }
                tx.send(v[0]).unwrap();
            });
        });
        let v = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("100,000 passes did not end within two minutes: a pass deadlocked");
        assert!(v > 1.0 && v < 2.0, "{v}");
    }
}
