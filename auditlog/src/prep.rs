//! Preparing large records off the async workers.
//!
//! Redacting, serialising and compressing a record costs tens of microseconds for the few KiB of
//! a Stripe API call, but milliseconds for a record with a large body (a 17 MiB file upload, a
//! long list). Done on a Tokio worker, that stalls every other request scheduled there. Records
//! whose bodies reach [`OFFLOAD_BYTES`] are therefore prepared on a pool of threads of the audit
//! log's own, as many as there are cores.
//!
//! Invariants: at most one job per pool thread runs or waits in the pool (the rest wait, as
//! futures, for a slot), so the pool's queue never grows with a burst; a job's slot is given back
//! when the job ends, even if its caller has gone away; a job that panics answers its caller
//! [`AuditError::Closed`] (an unavailable error: the proxy answers 503) and the pool goes on.
//! A fixed pool, not `spawn_blocking` or `block_in_place`: both let the set of threads that
//! prepare records grow, and each such thread keeps its own zstd context and allocator arena
//! (measured: 13 MiB more peak RSS in tests/tests/proxy_memory.rs with `block_in_place`).

use std::sync::Arc;

use tokio::sync::{Semaphore, oneshot};

use crate::error::AuditError;

/// Records whose bodies add up to at least this many bytes are prepared on the pool; below it,
/// preparing costs less than handing the work over.
pub const OFFLOAD_BYTES: usize = 64 * 1024;

/// The pool (see the module docs).
pub struct PrepPool {
    pool: rayon::ThreadPool,
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for PrepPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrepPool").field("threads", &self.pool.current_num_threads()).finish_non_exhaustive()
    }
}

impl PrepPool {
    /// A pool of `threads` threads (at least one), named `keygate-audit-prep-N`.
    pub fn new(threads: usize) -> Result<PrepPool, AuditError> {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|n| format!("keygate-audit-prep-{n}"))
            // The job's result channel is dropped with it: its caller gets `Closed`.
            .panic_handler(|_| tracing::error!("preparing an audit record panicked; the record was refused"))
            .build()
            .map_err(|e| AuditError::Config(format!("cannot start the audit record preparation threads: {e}")))?;
        Ok(PrepPool { pool, slots: Arc::new(Semaphore::new(threads)) })
    }

    /// A pool with one thread per core.
    pub fn per_core() -> Result<PrepPool, AuditError> {
        PrepPool::new(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
    }

    /// Runs `job` on the pool once a slot is free, and returns its result.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, AuditError> {
        let slot = self.slots.clone().acquire_owned().await.map_err(|_| AuditError::Closed)?;
        let (tx, rx) = oneshot::channel();
        self.pool.spawn(move || {
            let _slot = slot;
            let _ = tx.send(job());
        });
        rx.await.map_err(|_| AuditError::Closed)
    }

    /// Runs `job` for a record of `size` body bytes: on the pool from [`OFFLOAD_BYTES`] on, in
    /// place below it.
    pub async fn prepare<T: Send + 'static>(
        &self,
        size: usize,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuditError> {
        if size < OFFLOAD_BYTES { Ok(job()) } else { self.run(job).await }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_pool_and_small_ones_in_place() {
        let pool = PrepPool::new(2).unwrap();
        let here = std::thread::current().id();
        let small = pool.prepare(OFFLOAD_BYTES - 1, || std::thread::current().id()).await.unwrap();
        assert_eq!(small, here);
        let name = pool.prepare(OFFLOAD_BYTES, || std::thread::current().name().map(str::to_owned)).await.unwrap();
        assert!(name.unwrap_or_default().starts_with("keygate-audit-prep-"));
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_the_pool_goes_on() {
        let pool = PrepPool::new(1).unwrap();
        let error = pool.run(|| -> u8 { panic!("boom") }).await.unwrap_err();
        assert!(matches!(error, AuditError::Closed), "{error}");
        // Its slot was given back: the one-thread pool still runs jobs.
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slots_are_given_back_when_callers_go_away() {
        let pool = Arc::new(PrepPool::new(2).unwrap());
        let callers: Vec<_> = (0..16)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.run(|| std::thread::sleep(std::time::Duration::from_millis(5))).await })
            })
            .collect();
        for (n, caller) in callers.into_iter().enumerate() {
            if n % 2 == 0 {
                caller.abort();
            } else {
                caller.await.unwrap().unwrap();
            }
        }
        // The aborted callers' jobs (if they had started) end on their own and free their slots.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pool.slots.available_permits() < 2 {
            assert!(std::time::Instant::now() < deadline, "a slot was never given back");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
