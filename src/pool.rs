//! A fork-join pool for the many small parallel loops of token-by-token decoding.
//!
//! Decoding SmolLM2-135M runs ~210 weight products per token, each a few tens of microseconds of work. Handing
//! each one to rayon from the generating thread costs a futex wake of a sleeping worker and a sleep of the caller
//! (the caller is not a rayon worker), a few to tens of microseconds each way, which `perf` showed as a third of the
//! decode time (2026-11-30, 2-core EPYC). Here, as in ggml's thread pool, the calling thread takes part in the work
//! and the other threads spin on an epoch counter between loops, so a loop starts within nanoseconds; after
//! [`SPIN`] without work a thread parks on a condition variable, so an idle process does not burn cores.
//!
//! ```text
//! caller:  publish job, epoch += 1 ─► claim tasks (next.fetch_add) ─► wait until every worker has left the epoch
//! worker:  spin / park until epoch changes ─► claim tasks ─► leave (pending -= 1)
//! ```
//! The job closure lives on the caller's stack: the caller returns only after `pending` reaches 0, and a worker
//! touches the job only between seeing the new epoch and decrementing `pending`.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

type Job = &'static (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per loop; a worker runs a loop when it sees a value it has not seen.
    epoch: AtomicU64,
    /// The loop's body and task count: written by the caller only while no worker is inside an epoch.
    job: UnsafeCell<Option<(Job, usize)>>,
    /// The next unclaimed task index of the current loop.
    next: AtomicUsize,
    /// Workers that have not yet left the current loop.
    pending: AtomicUsize,
    /// A task panicked in a worker (the caller re-raises it).
    panicked: AtomicBool,
    /// Parked workers wait here for a new epoch.
    parked: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `SpinPool::caller` while `pending` is 0 (no worker reads it),
// and read by workers only between their Acquire load of the new epoch and their Release decrement of `pending`.
unsafe impl Sync for Shared {}

/// A fixed set of threads that run `for i in 0..n { f(i) }` together with the calling thread.
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: usize,
    /// One loop at a time; a second caller (or a nested loop) runs its loop on its own thread instead.
    caller: Mutex<()>,
}

impl SpinPool {
    /// A pool of `threads` threads in all, the caller included (so `threads − 1` are spawned).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        });
        // A thread the system refuses to start is one fewer worker (loops still run, on fewer threads).
        let workers = (0..threads.max(1) - 1)
            .filter(|i| {
                let s = shared.clone();
                std::thread::Builder::new().name(format!("peftkit-spin-{i}")).spawn(move || worker(&s)).is_ok()
            })
            .count();
        Self { shared, workers, caller: Mutex::new(()) }
    }

    /// Threads that run a loop, the caller included.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(0) … f(n − 1)`, each exactly once, spread over the pool's threads; returns when all have run.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = match self.caller.try_lock() {
            Ok(g) if self.workers > 0 && n > 1 => g,
            _ => return (0..n).for_each(f),
        };
        let s = &*self.shared;
        // SAFETY: the pointer is only dereferenced by workers inside this epoch, and this function does not return
        // before every worker has left it (`pending` = 0 below), so the borrow outlives every use.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        // SAFETY: no worker is inside an epoch (the previous call waited for `pending` = 0), so none reads `job`.
        unsafe { *s.job.get() = Some((job, n)) };
        s.next.store(0, Ordering::Relaxed);
        s.pending.store(self.workers, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        if *s.parked.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        // A panic here must not unwind past the workers still using `f`: wait for them first.
        let mine = catch_unwind(AssertUnwindSafe(|| claim(s, f, n)));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) > 0 {
            spin_or_yield(&mut spins);
        }
        // SAFETY: every worker has left the epoch.
        unsafe { *s.job.get() = None };
        drop(guard);
        if let Err(e) = mine {
            std::panic::resume_unwind(e);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a task of a parallel loop panicked on a pool thread");
        }
    }
}

/// One step of a busy wait: a pause instruction, and from the 4096th step on a yield to the scheduler every 64th,
/// so that a waiter never holds a core for a whole time slice from a thread it waits for (more threads than cores).
fn spin_or_yield(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if *spins > 4096 && (*spins).is_multiple_of(64) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

fn claim(s: &Shared, f: &(dyn Fn(usize) + Sync), n: usize) {
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return;
        }
        f(i);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a new epoch: spin, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            spin_or_yield(&mut spins);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
                *parked += 1;
                while s.epoch.load(Ordering::Acquire) == seen {
                    parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
                }
                *parked -= 1;
            }
        };
        seen = epoch;
        // SAFETY: the caller published `job` before the Release increment of the epoch we just Acquired, and keeps
        // it until `pending` reaches 0.
        if let Some((job, n)) = unsafe { *s.job.get() } {
            if catch_unwind(AssertUnwindSafe(|| claim(s, job, n))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

/// An output buffer that the tasks of one [`SpinPool::run`] write at disjoint indices.
pub struct SharedOut(*mut f32);

// SAFETY: `SharedOut` only hands out raw pointers; its users write disjoint elements while the buffer outlives the
// loop (each use site states why).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn new(buf: &mut [f32]) -> Self {
        Self(buf.as_mut_ptr())
    }
    /// The address of element `i` (no bounds check: the caller's indexing keeps it inside the buffer).
    pub fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// The process-wide pool, sized like rayon's global pool (`RAYON_NUM_THREADS`, else the available cores).
pub fn global() -> &'static SpinPool {
    static POOL: OnceLock<SpinPool> = OnceLock::new();
    POOL.get_or_init(|| SpinPool::new(rayon::current_num_threads()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_loops() {
        let pool = SpinPool::new(3);
        for n in [0, 1, 2, 7, 100, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
            }
        }
    }

    #[test]
    fn parked_workers_wake_up_and_nested_loops_run_inline() {
        let pool = SpinPool::new(2);
        std::thread::sleep(SPIN * 3); // the worker parks
        let total = AtomicUsize::new(0);
        pool.run(8, &|_| {
            // A loop inside a loop runs on the calling thread.
            pool.run(4, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 32);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_still_works() {
        let pool = SpinPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(64, &|i| {
                if i == 63 {
                    panic!("task 63");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(10, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 10);
    }
}
