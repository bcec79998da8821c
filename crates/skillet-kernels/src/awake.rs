//! Keeps the thread pool's other threads polling for work through a run
//! of many short parallel ops, such as a training step on short
//! sequences: between two products, rayon puts an idle thread to sleep
//! after a few rounds of yielding, and the next product must wake it (a
//! `futex` call, costly in a virtual machine) and then waits for it.
//! In a profile of short-example SFT on 2 cores, a pool thread went to
//! sleep about 2,000 times a step, and the waking took about 5% of the
//! samples. Short steps alternating with and without this ran 3–12%
//! faster with it (BENCHMARKS.md, "pool threads polling through short
//! steps").

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Empty polls between two yields of the core, so a thread outside the
/// pool that needs the core (candle's elementwise helper, another
/// process) gets it. Pure spinning gained little or nothing.
const POLLS_PER_YIELD: u32 = 64;

/// How long the calling thread waits for the others to start polling
/// before it runs the body anyway (they are idle between steps, so they
/// start as soon as they wake).
const CHECK_IN: Duration = Duration::from_millis(1);

/// Set in [`Roll::state`] once the body may start: no poller starts after.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Pollers nested in one thread at most (see [`poll`]).
const MAX_DEPTH: usize = 4;

/// Pollers running now, over every pool (for tests).
static POLLING: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Pollers running on this thread, one inside another.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// One call's pollers: how many started (with [`CLOSED`] once the body
/// may start), and whether the body has ended.
#[derive(Default)]
struct Roll {
    state: AtomicUsize,
    stop: AtomicBool,
}

/// Runs `body` on the calling thread while every other thread of the
/// calling thread's rayon pool polls for jobs instead of sleeping; the
/// polling ends when `body` returns or unwinds. Outside a pool, or in a
/// pool of one thread, `body` just runs.
///
/// The pollers run queued jobs as rayon's idle loop would, so work that
/// `body` hands to the pool is done exactly as without them. Only call it
/// around work that keeps the pool busy: a poller holds its core for the
/// whole of `body`, yielding it between polls.
pub fn keep_awake<R>(body: impl FnOnce() -> R) -> R {
    keep_awake_within(CHECK_IN, body)
}

/// [`keep_awake`], waiting up to `check_in` for the pollers to start.
///
/// A poller blocks its thread until the body ends, so it must never run
/// on top of a job the body waits for: that would be a cycle. So the
/// pollers start before the body does. The calling thread waits for them
/// (at most `check_in`), then closes the roll; a poller that arrives
/// later returns at once. A poller that starts before the body can only
/// have below it work that was already complete when the body started.
fn keep_awake_within<R>(check_in: Duration, body: impl FnOnce() -> R) -> R {
    let Some(lead) = rayon::current_thread_index() else {
        return body();
    };
    let others = rayon::current_num_threads().saturating_sub(1);
    if others == 0 {
        return body();
    }
    let roll = Arc::new(Roll::default());
    let theirs = roll.clone();
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() != lead {
            poll(&theirs);
        }
    });
    // Ends the pollers however the body leaves.
    let _stop = Stop(roll.clone());
    let start = Instant::now();
    while roll.state.load(Ordering::Acquire) < others && start.elapsed() < check_in {
        std::hint::spin_loop();
    }
    roll.state.fetch_or(CLOSED, Ordering::AcqRel);
    body()
}

/// Runs the pool's queued jobs until the roll's body has ended, if the
/// roll is still open. A poller may start inside another on the same
/// thread (its job taken while the other polled, just after that one's
/// body ended): that is safe, as the outer one waits on nothing the new
/// body needs, but the depth is bounded.
fn poll(roll: &Roll) {
    if DEPTH.with(Cell::get) >= MAX_DEPTH {
        return;
    }
    // Counted before it checks in, so a body sees every poller counted.
    let _running = Running::start();
    let joined = roll
        .state
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n & CLOSED == 0).then_some(n + 1)
        });
    if joined.is_err() {
        return;
    }
    let mut idle = 0u32;
    while !roll.stop.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle = 0,
            Some(rayon::Yield::Idle) => {
                idle += 1;
                if idle.is_multiple_of(POLLS_PER_YIELD) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            None => break,
        }
    }
}

/// Counts a running poller, in this thread and in [`POLLING`].
struct Running;

impl Running {
    fn start() -> Self {
        DEPTH.with(|d| d.set(d.get() + 1));
        POLLING.fetch_add(1, Ordering::AcqRel);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        POLLING.fetch_sub(1, Ordering::AcqRel);
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Ends the pollers when the body returns or unwinds.
struct Stop(Arc<Roll>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Waits up to 10 s for every poller to end.
    fn pollers_end() -> bool {
        let start = Instant::now();
        while POLLING.load(Ordering::Acquire) != 0 {
            if start.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Sums `0..n` by splitting in halves with `rayon::join`, so threads
    /// steal halves from each other and wait on halves they gave away.
    fn split_sum(lo: u64, hi: u64) -> u64 {
        if hi - lo <= 64 {
            return (lo..hi).sum();
        }
        let mid = lo + (hi - lo) / 2;
        let (a, b) = rayon::join(|| split_sum(lo, mid), || split_sum(mid, hi));
        a + b
    }

    // One test: the counter is shared by every pool of the process.
    #[test]
    fn pollers_start_before_the_body_work_with_it_and_stop_after_it() {
        let three = pool(3);
        let wait = Duration::from_secs(10);
        let (polled, sum) = three.install(|| {
            keep_awake_within(wait, || {
                let polled = POLLING.load(Ordering::Acquire);
                let sum: u64 = (0..100_000usize)
                    .into_par_iter()
                    .with_min_len(1000)
                    .map(|i| 2 * i as u64)
                    .sum();
                (polled, sum)
            })
        });
        assert_eq!(polled, 2, "both other threads poll before the body");
        assert_eq!(sum, 99_999 * 100_000);
        assert!(pollers_end(), "pollers still running after the body");

        let seen = AtomicUsize::new(0);
        let panicked = three.install(|| {
            std::panic::catch_unwind(|| {
                keep_awake_within(wait, || {
                    seen.store(POLLING.load(Ordering::Acquire), Ordering::Release);
                    panic!("body fails")
                })
            })
        });
        assert!(panicked.is_err());
        assert_eq!(
            seen.load(Ordering::Acquire),
            2,
            "pollers ran in the failing body"
        );
        assert!(pollers_end(), "pollers still running after a panic");

        // Many short bodies in a row, with work split and stolen both
        // ways, as training steps run: each ends, and gives the right sum.
        let two = pool(2);
        for round in 0..200u64 {
            let n = 1000 + round;
            let sum = two.install(|| keep_awake(|| split_sum(0, n)));
            assert_eq!(sum, n * (n - 1) / 2);
        }
        assert!(pollers_end(), "pollers still running after the rounds");

        // Outside a pool, and in a pool of one, nothing polls.
        assert_eq!(keep_awake(|| POLLING.load(Ordering::Acquire)), 0);
        assert_eq!(pool(1).install(|| keep_awake(|| 7)), 7);
        assert_eq!(POLLING.load(Ordering::Acquire), 0);
    }
}
