//! Caps on requests at once. Each request may buffer a body of up to `max_request_bytes` (and
//! its parsed JSON) and holds an upstream connection until its answer ends, so without a cap
//! one job could run the gateway out of memory. A request holds its [`Permit`] from before its
//! body is read until its charge is settled, which also bounds the answers the gateway keeps
//! reading after their job hung up. Per-job counts live in a map whose entries go with their
//! last request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub(crate) struct Limits {
    per_job: usize,
    total: usize,
    /// Requests running now, by job; a job with none has no entry.
    jobs: Mutex<HashMap<String, usize>>,
    all: Arc<Semaphore>,
}

/// Why a request may not start now.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Busy {
    #[error(
        "job {job_id} has {limit} requests at the llm-gateway already, its cap \
         (FLOTILLA_LLM_MAX_CONCURRENT_PER_JOB): retry once one has ended"
    )]
    Job { job_id: String, limit: usize },
    #[error(
        "the llm-gateway is serving its cap of {limit} requests at once \
         (FLOTILLA_LLM_MAX_CONCURRENT): retry shortly"
    )]
    Gateway { limit: usize },
}

/// One running request of a job; counted until dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    limits: Arc<Limits>,
    job_id: String,
    _all: OwnedSemaphorePermit,
}

impl Limits {
    pub(crate) fn new(per_job: usize, total: usize) -> Self {
        Self {
            per_job,
            total,
            jobs: Mutex::default(),
            all: Arc::new(Semaphore::new(total)),
        }
    }

    /// A permit for one more request of `job_id`, unless the job or the gateway is at its cap.
    /// Never waits: the client is told to retry, so no request queues here holding memory.
    pub(crate) fn try_acquire(self: &Arc<Self>, job_id: &str) -> Result<Permit, Busy> {
        let mut jobs = self.jobs.lock().expect("limits lock");
        let running = jobs.get(job_id).copied().unwrap_or(0);
        if running >= self.per_job {
            return Err(Busy::Job {
                job_id: job_id.to_owned(),
                limit: self.per_job,
            });
        }
        // The job's own cap first: a job at it takes nothing from the others.
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy::Gateway { limit: self.total })?;
        jobs.insert(job_id.to_owned(), running + 1);
        Ok(Permit {
            limits: self.clone(),
            job_id: job_id.to_owned(),
            _all: all,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut jobs = self.limits.jobs.lock().expect("limits lock");
        if let Some(running) = jobs.get_mut(&self.job_id) {
            *running -= 1;
            if *running == 0 {
                jobs.remove(&self.job_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_job_and_in_total_and_nothing_is_left_behind() {
        let limits = Arc::new(Limits::new(2, 3));
        let a1 = limits.try_acquire("a").unwrap();
        let a2 = limits.try_acquire("a").unwrap();
        assert!(matches!(
            limits.try_acquire("a"),
            Err(Busy::Job { limit: 2, .. })
        ));
        let b1 = limits.try_acquire("b").unwrap();
        assert!(matches!(
            limits.try_acquire("b"),
            Err(Busy::Gateway { limit: 3 })
        ));
        // A refusal took nothing: one ending makes room again.
        drop(a1);
        let b2 = limits.try_acquire("b").unwrap();
        drop((a2, b1, b2));
        assert!(limits.jobs.lock().unwrap().is_empty());
        assert_eq!(limits.all.available_permits(), 3);
    }
}
