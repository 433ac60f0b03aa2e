//! The in-memory store's long walk, the sweep of idle keys and expired
//! records, on a thread of its own at the lowest CPU priority.
//!
//! Why a thread of its own, and not tokio's blocking pool: a sweep visits
//! every key, a quarter of a second of CPU at two million. Where the
//! request workers share their cores with it (a one-core container, or a
//! server pinned to its cores), a walk at normal priority takes its share
//! of the core from them for the whole walk, and requests queue behind it.
//! At nice 19 the scheduler gives the walk the time the workers leave idle.
//! The walk holds one shard's lock at a time. A worker that needs the shard
//! the walk holds parks until the walk lets go of it, which is soon while the
//! core has idle time, and can be long on a core with other runnable threads
//! at normal priority.
//!
//! Measured on 2 cores (server pinned to one; open loop at 39,500/s for
//! 45 s over 1M users, with a sweep at 30 s; BENCHMARKS.md, session 13),
//! two rounds each: p99 9.7 and 11.1 ms with the walks on tokio's blocking
//! pool, 1.6 and 0.9 ms on a housekeeping thread; p99.9 44 and 48 ms
//! against 8.9 and 4.2 ms. (Evictions at the key cap walked every key too,
//! then; since session 14 they take one shard at a time, inline, see
//! `Bounded::evict` in `state/memory.rs`.)
//!
//! The priority is a Linux thread's nice value. Elsewhere the thread keeps
//! the process's priority.

use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// A handle on one housekeeping thread; cheap to clone. The thread ends
/// when the last handle is dropped.
#[derive(Clone)]
pub struct Housekeeper {
    jobs: mpsc::Sender<Job>,
}

/// The nice value the housekeeping thread runs at: the lowest priority.
pub const NICE: i32 = 19;

impl Housekeeper {
    /// Starts a housekeeping thread named `name` (Linux keeps 15 bytes).
    pub fn start(name: &str) -> std::io::Result<Housekeeper> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                lower_priority();
                for job in queue {
                    // A walk that panics is logged; the next one still runs.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a housekeeping walk panicked");
                    }
                }
            })?;
        Ok(Housekeeper { jobs })
    }

    /// Runs `job` on the housekeeping thread, after the jobs queued before
    /// it, and waits for it to finish (or to panic). The thread catches a
    /// job's panic, so it outlives every job.
    pub async fn run(&self, job: impl FnOnce() + Send + 'static) {
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let job: Job = Box::new(move || {
            job();
            let _ = done.send(());
        });
        if self.jobs.send(job).is_ok() {
            let _ = finished.await;
        }
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // On Linux a thread id names one thread here, not the whole process.
    let thread = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(thread), NICE) {
        tracing::warn!(error = %e, "the housekeeping thread keeps normal priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn jobs_run_in_order_and_a_panic_stops_none_after_it() {
        let keeper = Housekeeper::start("rg-test").unwrap();
        let ran = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let ran = ran.clone();
            keeper.run(move || ran.lock().unwrap().push(i)).await;
        }
        keeper.run(|| panic!("a walk that fails")).await;
        let after = ran.clone();
        keeper.run(move || after.lock().unwrap().push(3)).await;
        assert_eq!(*ran.lock().unwrap(), [0, 1, 2, 3]);
    }

    /// The point of the thread: its walks run at the lowest priority, while
    /// the caller's thread keeps its own.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn walks_run_at_the_lowest_priority() {
        let mine = nice();
        let keeper = Housekeeper::start("rg-test").unwrap();
        let seen = Arc::new(Mutex::new(None));
        let into = seen.clone();
        keeper
            .run(move || *into.lock().unwrap() = Some(nice()))
            .await;
        assert_eq!(*seen.lock().unwrap(), Some(NICE));
        assert_eq!(nice(), mine, "the caller's thread keeps its priority");
    }

    /// This thread's nice value.
    #[cfg(target_os = "linux")]
    fn nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }
}
