//! Budgets against parallel requests. A job's requests are each checked against what it has
//! spent, which says nothing of requests still running: a CLI running subagents in parallel
//! could overshoot by all of them. So each request of a job with a budget reserves its worst
//! case (prompt size and output limit at the model's price) while it runs, and a request
//! whose worst case no longer fits beside those in flight waits for them to settle. The first
//! request in flight always runs: the spent-so-far check alone decides it.
//!
//! A job's requests all reach the gateway on its own host, so this state is per process.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use serde_json::Value;
use tokio::sync::{Notify, futures::OwnedNotified};

use crate::meter::{Price, Tokens};

/// Output tokens assumed for a request that sets no output limit.
pub(crate) const ASSUMED_OUTPUT_TOKENS: u64 = 8_192;

#[derive(Debug, Default)]
pub(crate) struct InFlight {
    jobs: Mutex<HashMap<String, Job>>,
}

#[derive(Debug)]
struct Job {
    /// Worst-case USD of the requests running now.
    reserved: f64,
    running: usize,
    /// Woken whenever one of them settles.
    settled: Arc<Notify>,
}

/// One request's share of its job's in-flight worst case; given back when dropped (the
/// charge settled, or the client went away).
#[derive(Debug)]
pub(crate) struct Reservation {
    in_flight: Arc<InFlight>,
    job_id: String,
    usd: f64,
}

impl InFlight {
    /// Reserves `usd` for a request of `job_id` if it fits beside those in flight; otherwise
    /// returns what to wait on before trying again (with a fresh `spent`).
    pub(crate) fn try_reserve(
        self: &Arc<Self>,
        job_id: &str,
        usd: f64,
        spent: f64,
        budget: f64,
    ) -> Result<Reservation, OwnedNotified> {
        let mut jobs = self.jobs.lock().expect("in-flight lock");
        let job = jobs.entry(job_id.to_owned()).or_insert_with(|| Job {
            reserved: 0.0,
            running: 0,
            settled: Arc::default(),
        });
        if job.running > 0 && spent + job.reserved + usd > budget {
            // Made under the lock, so a settle after it cannot be missed.
            return Err(job.settled.clone().notified_owned());
        }
        job.reserved += usd;
        job.running += 1;
        Ok(Reservation {
            in_flight: self.clone(),
            job_id: job_id.to_owned(),
            usd,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut jobs = self.in_flight.jobs.lock().expect("in-flight lock");
        if let Some(job) = jobs.get_mut(&self.job_id) {
            job.reserved -= self.usd;
            job.running -= 1;
            job.settled.notify_waiters();
            if job.running == 0 {
                jobs.remove(&self.job_id);
            }
        }
    }
}

/// The most a request can cost: its body as prompt (about 3 bytes a token, generous) and the
/// output limit it sets, or [`ASSUMED_OUTPUT_TOKENS`].
pub(crate) fn worst_case(price: &Price, body_bytes: usize, json: Option<&Value>) -> f64 {
    let output = json
        .and_then(|v| {
            [
                &v["max_tokens"],
                &v["max_completion_tokens"],
                &v["max_output_tokens"],
                &v["generationConfig"]["maxOutputTokens"],
            ]
            .into_iter()
            .find_map(Value::as_u64)
        })
        .unwrap_or(ASSUMED_OUTPUT_TOKENS);
    // Input is priced at the dearer of input and cache-write: either may apply.
    let input = Price {
        input: price.input.max(price.cache_write),
        ..*price
    };
    input.cost(&Tokens {
        input: body_bytes as u64 / 3,
        output,
        ..Tokens::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_request_waits_only_while_others_would_not_leave_room() {
        let in_flight = Arc::new(InFlight::default());
        // Alone, a request runs even if its worst case exceeds the budget.
        let first = in_flight.try_reserve("j", 0.8, 0.0, 1.0).unwrap();
        // Beside it, one that would not fit waits...
        let waiting = in_flight.try_reserve("j", 0.3, 0.0, 1.0).unwrap_err();
        // ...one that fits does not, and other jobs are not concerned.
        let small = in_flight.try_reserve("j", 0.1, 0.0, 1.0).unwrap();
        let other = in_flight.try_reserve("k", 5.0, 0.0, 1.0).unwrap();
        drop(small);
        drop(first);
        // Settling wakes the waiter; with nothing in flight it runs.
        futures::executor::block_on(waiting);
        let again = in_flight.try_reserve("j", 0.3, 0.9, 1.0).unwrap();
        drop((again, other));
        assert!(
            in_flight.jobs.lock().unwrap().is_empty(),
            "nothing left behind"
        );
    }

    #[test]
    fn worst_case_reads_each_api_s_output_limit() {
        let price = Price {
            input: 1.0,
            output: 10.0,
            cache_read: 0.1,
            cache_write: 2.0,
        };
        // 1,000 prompt tokens at the cache-write price, plus the output limit.
        let check = |body: Value, output: u64| {
            let expected = (1_000.0 * 2.0 + output as f64 * 10.0) / 1e6;
            let cost = worst_case(&price, 3_000, Some(&body));
            assert!(
                (cost - expected).abs() < 1e-12,
                "{body}: {cost} != {expected}"
            );
        };
        check(json!({"max_tokens": 100}), 100);
        check(json!({"max_completion_tokens": 200}), 200);
        check(json!({"max_output_tokens": 300}), 300);
        check(json!({"generationConfig": {"maxOutputTokens": 400}}), 400);
        check(json!({}), ASSUMED_OUTPUT_TOKENS);
    }
}
