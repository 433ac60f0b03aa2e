//! The multi-threaded tokio runtime that the server and the load generator's
//! closed loop run on, and the process's memory pages ([`huge_pages`]).
//!
//! It is tokio's default runtime with one change: the worker's LIFO slot is
//! off. With the slot, a task woken by the running task runs as soon as
//! that task's poll returns, ahead of every task already queued.
//! A gRPC handler that finishes wakes its HTTP/2 connection's task, so that
//! task ran right after every handler and wrote that one response out with a
//! `writev` of its own: one system call, and one loopback packet for the
//! reader to take in, for every response, however many requests the last
//! read had brought. Without the slot the woken connection task queues
//! behind the handlers already waiting, and writes their responses out
//! together. The same holds on the client side, for requests.
//!
//! Measured on 2 cores (server and `loadgen` each pinned to one; closed
//! loop, 4 connections x 16 streams, 1M users; BENCHMARKS.md, session 13):
//! the engine's `writev` calls fell from 0.99 to 0.10 a response, and it
//! served about 105,000 requests/s instead of about 84,000.
//!
//! The switch is one of tokio's unstable APIs, so it is compiled in only
//! under `--cfg tokio_unstable`, which this repository's
//! `.cargo/config.toml` sets. A build without it (a `RUSTFLAGS` variable in
//! the environment replaces the config's flags) keeps the slot: it behaves
//! the same and is slower, the server says so when it starts, and the test
//! below fails.

use tokio::runtime::{Builder, Runtime};

/// Whether this build turns the LIFO slot off (see the module docs).
pub const LIFO_SLOT_OFF: bool = cfg!(tokio_unstable);

/// A multi-threaded runtime with every driver on, one worker per core this
/// process may run on (or `TOKIO_WORKER_THREADS`), and no LIFO slot where
/// the build allows it.
pub fn multi_thread() -> std::io::Result<Runtime> {
    builder().build()
}

fn builder() -> Builder {
    let mut builder = Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder
}

/// Transparent huge pages for the whole process (Linux; elsewhere a no-op):
/// mimalloc asks for them on its arenas (madvise), and this grants or
/// refuses them. `riskgate` refuses them first thing, as do the benches and
/// the memory example that measure it: a fault into a fresh 2 MiB page
/// zeroes it (and may compact memory to find one) on the core serving
/// requests, a stall of milliseconds (BENCHMARKS.md, session 8). `serve
/// --pretouch` takes its faults before serving, and grants them.
pub fn huge_pages(on: bool) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    return rustix::thread::disable_transparent_huge_pages(!on).map_err(Into::into);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = on;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The order in which one worker runs two tasks that a running task
    /// spawns, `first` and then `second`.
    fn order_on(mut builder: Builder) -> Vec<&'static str> {
        let rt = builder.worker_threads(1).build().unwrap();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let seen = ran.clone();
        rt.block_on(async move {
            // Spawned from a worker, as a connection's task wakes handlers.
            tokio::spawn(async move {
                let early = seen.clone();
                let first = tokio::spawn(async move { early.lock().unwrap().push("first") });
                let second = tokio::spawn(async move { seen.lock().unwrap().push("second") });
                first.await.unwrap();
                second.await.unwrap();
            })
            .await
            .unwrap()
        });
        let order = ran.lock().unwrap().clone();
        order
    }

    /// The server's throughput depends on this: tasks woken on a worker run
    /// in the order they were woken, so a connection's task runs
    /// after the handlers queued before it and writes their answers together.
    /// It fails for a build that lost `.cargo/config.toml`'s
    /// `--cfg tokio_unstable` (or runs under a `RUSTFLAGS` that replaces it).
    #[test]
    fn woken_tasks_run_in_the_order_they_were_woken() {
        assert_eq!(order_on(builder()), ["first", "second"]);
    }

    /// What the test above guards against: tokio's default runs the last
    /// woken task first.
    #[test]
    fn the_default_runtime_runs_the_last_woken_task_first() {
        assert_eq!(order_on(Builder::new_multi_thread()), ["second", "first"]);
    }

    #[test]
    fn the_runtime_runs_tasks_on_its_workers() {
        let rt = multi_thread().unwrap();
        let main = std::thread::current().id();
        let on = rt.block_on(async { tokio::spawn(async { std::thread::current().id() }).await });
        assert_ne!(on.unwrap(), main, "spawned tasks run on a worker thread");
    }
}
