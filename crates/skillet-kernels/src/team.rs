//! A team of threads that runs one piece of work from start to end,
//! meeting at barriers between its phases, as llama.cpp's thread pool
//! runs a graph: for work made of many short parallel phases with short
//! serial stretches between them (a decode step: four products per layer,
//! a norm or an attention between), where handing each phase to the
//! thread pool and waiting for it costs about as much as the phase.
//!
//! The members are the calling thread (member 0, the lead) and threads
//! spawned for this call alone, which never touch the thread pool, so a
//! member waiting at a barrier can never hold up pool work another member
//! waits on. A member that returns early with an error or panics aborts
//! the team: the others leave their next barrier with [`Aborted`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Spins at a barrier before yielding the core between checks.
const SPINS: usize = 1 << 16;

/// The team stopped: a member failed or panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aborted;

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a member of the thread team failed")
    }
}

impl std::error::Error for Aborted {}

/// The barrier the members share.
#[derive(Debug)]
struct Barrier {
    members: usize,
    arrived: AtomicUsize,
    /// Passages so far.
    generation: AtomicUsize,
    aborted: AtomicBool,
}

/// One member's handle.
#[derive(Debug)]
pub struct Member<'a> {
    index: usize,
    barrier: &'a Barrier,
}

impl Member<'_> {
    /// This member's number, `0..members` (0 is the calling thread).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Members in the team.
    pub fn members(&self) -> usize {
        self.barrier.members
    }

    /// Whether this is member 0, the calling thread.
    pub fn is_lead(&self) -> bool {
        self.index == 0
    }

    /// Waits until every member has arrived here. Writes made before it
    /// are seen after it by every member.
    pub fn sync(&self) -> Result<(), Aborted> {
        let b = self.barrier;
        if b.members == 1 {
            return self.check();
        }
        let generation = b.generation.load(Ordering::Acquire);
        if b.arrived.fetch_add(1, Ordering::AcqRel) + 1 == b.members {
            b.arrived.store(0, Ordering::Relaxed);
            b.generation.fetch_add(1, Ordering::AcqRel);
            return self.check();
        }
        let mut spins = 0;
        while b.generation.load(Ordering::Acquire) == generation {
            if b.aborted.load(Ordering::Acquire) {
                return Err(Aborted);
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.check()
    }

    /// Stops the team: every member's next [`Member::sync`] fails.
    pub fn abort(&self) {
        self.barrier.aborted.store(true, Ordering::Release);
    }

    fn check(&self) -> Result<(), Aborted> {
        match self.barrier.aborted.load(Ordering::Acquire) {
            true => Err(Aborted),
            false => Ok(()),
        }
    }
}

/// Aborts the team when its member unwinds (a panic), so no other member
/// waits for it forever.
struct AbortOnUnwind<'a, 'b>(&'a Member<'b>);

impl Drop for AbortOnUnwind<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort();
        }
    }
}

/// The threads a team should have: those of the thread pool the caller
/// runs in (`--threads`).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `work` on `members` threads (at least one: the caller, member 0)
/// and returns each member's result, in member order. A member's error
/// aborts the team (see [`Member::sync`]); a panic is passed on to the
/// caller once every member has stopped.
pub fn run<R: Send, E: Send>(
    members: usize,
    work: impl Fn(&Member) -> Result<R, E> + Sync,
) -> Vec<Result<R, E>> {
    let barrier = Barrier {
        members: members.max(1),
        arrived: AtomicUsize::new(0),
        generation: AtomicUsize::new(0),
        aborted: AtomicBool::new(false),
    };
    let one = |index: usize| {
        let member = Member {
            index,
            barrier: &barrier,
        };
        let _guard = AbortOnUnwind(&member);
        let r = work(&member);
        if r.is_err() {
            member.abort();
        }
        r
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..barrier.members)
            .map(|i| scope.spawn(move || one(i)))
            .collect();
        let mut results = vec![one(0)];
        for h in others {
            match h.join() {
                Ok(r) => results.push(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        results
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn members_see_each_others_writes_after_a_barrier() {
        for members in [1, 2, 3] {
            let slots: Vec<Mutex<usize>> = (0..members).map(|_| Mutex::new(0)).collect();
            let results = run(members, |m| -> Result<usize, Aborted> {
                let mut seen = 0;
                for round in 1..=50 {
                    *slots[m.index()].lock().unwrap() = round * (m.index() + 1);
                    m.sync()?;
                    seen += slots.iter().map(|s| *s.lock().unwrap()).sum::<usize>();
                    m.sync()?;
                }
                Ok(seen)
            });
            let per_round: usize = (1..=members).sum();
            let want = per_round * (1..=50).sum::<usize>();
            assert_eq!(results.len(), members);
            for r in results {
                assert_eq!(r, Ok(want), "{members} members");
            }
        }
    }

    #[test]
    fn a_failing_member_stops_the_others() {
        let results = run(3, |m| -> Result<(), String> {
            for round in 0.. {
                if m.index() == 1 && round == 7 {
                    return Err("member 1 failed".into());
                }
                m.sync().map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        assert_eq!(results[1], Err("member 1 failed".into()));
        for i in [0, 2] {
            assert_eq!(results[i], Err(Aborted.to_string()));
        }
    }

    #[test]
    fn a_panicking_member_stops_the_others_and_the_panic_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| {
            run(2, |m| -> Result<(), Aborted> {
                loop {
                    if m.index() == 1 {
                        panic!("boom");
                    }
                    m.sync()?;
                }
            })
        });
        assert!(caught.is_err());
    }
}
