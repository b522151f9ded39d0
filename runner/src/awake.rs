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

use std::sync::atomic::{AtomicBool, Ordering};

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
            while !done.load(Ordering::Acquire) {
                if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                    // Gives the core up when anything else wants it (other runners' threads on
                    // the same cores); returns at once when nothing does.
                    std::thread::yield_now();
                }
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
}
