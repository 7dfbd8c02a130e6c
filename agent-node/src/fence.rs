//! Before a job gets LLM access (a token and the job network), the node checks that the job
//! network is still fenced: internal, no ICC, no IPv6, every firewall rule in place. The node
//! sets the fence up at start, but anyone with root on the host can undo it while the node
//! runs (a firewall reload flushes INPUT, `docker network rm` and a re-create with other
//! settings); a job on an unfenced network could reach the host's services or other jobs.
//!
//! A check is a network inspect and a few `iptables -C`, so a good result is reused for
//! [`FRESH`]; a bad one is not kept: every job checks again until the fence is whole.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::runtime::ContainerRuntime;

/// How long a fence found whole is trusted without looking again.
pub(crate) const FRESH: Duration = Duration::from_secs(5);

pub(crate) struct FenceCheck {
    network: String,
    gateway_port: u16,
    /// The llm-gateway's URL found at start, which the jobs' environment points at.
    url: String,
    last_whole: Mutex<Option<Instant>>,
}

impl FenceCheck {
    pub(crate) fn new(network: &str, gateway_port: u16, url: &str) -> Self {
        Self {
            network: network.to_owned(),
            gateway_port,
            url: url.to_owned(),
            last_whole: Mutex::new(None),
        }
    }

    /// `Ok` when the fence is whole (or was, less than [`FRESH`] ago); otherwise why not, for
    /// the job's error.
    pub(crate) async fn ensure(&self, runtime: &dyn ContainerRuntime) -> Result<(), String> {
        let fresh = |at: &Instant| at.elapsed() < FRESH;
        if self
            .last_whole
            .lock()
            .expect("fence check")
            .as_ref()
            .is_some_and(fresh)
        {
            return Ok(());
        }
        let network = &self.network;
        match runtime.check_job_network(network, self.gateway_port).await {
            Ok(url) if url == self.url => {
                *self.last_whole.lock().expect("fence check") = Some(Instant::now());
                Ok(())
            }
            Ok(url) => Err(format!(
                "the job network {network} changed since the node started: the llm-gateway is \
                 now at {url}, not {}; restart the node",
                self.url
            )),
            Err(e) => Err(format!(
                "the job network {network} is not safe to run on: {e}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::runtime::fake::{Event, FakeRuntime, Op};

    use super::*;

    const URL: &str = "http://fake-llm-gateway:8421";

    fn checks(fake: &FakeRuntime) -> usize {
        let events = fake.events();
        events
            .iter()
            .filter(|e| **e == Event::NetworkChecked)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_fence_is_checked_again_once_its_result_is_stale() {
        let fake = FakeRuntime::default();
        let fence = FenceCheck::new("flotilla-jobs", 8421, URL);
        assert_eq!(fence.ensure(&fake).await, Ok(()));
        assert_eq!(fence.ensure(&fake).await, Ok(()));
        assert_eq!(checks(&fake), 1, "the second job reuses the fresh result");
        tokio::time::advance(FRESH).await;
        assert_eq!(fence.ensure(&fake).await, Ok(()));
        assert_eq!(checks(&fake), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fence_broken_after_start_fails_the_jobs_until_it_is_whole() {
        let fake = FakeRuntime::default();
        let fence = FenceCheck::new("flotilla-jobs", 8421, URL);
        assert_eq!(fence.ensure(&fake).await, Ok(()));
        fake.set_broken_fence(Some("firewall rule `iptables -C INPUT ...` is gone"));
        tokio::time::advance(FRESH).await;
        for _ in 0..2 {
            let error = fence.ensure(&fake).await.unwrap_err();
            assert_eq!(
                error,
                "the job network flotilla-jobs is not safe to run on: firewall rule \
                 `iptables -C INPUT ...` is gone"
            );
        }
        // A bad result is not kept: each job looked again.
        assert_eq!(checks(&fake), 3);
        fake.set_broken_fence(None);
        assert_eq!(fence.ensure(&fake).await, Ok(()));
        // A failing runtime call counts as a broken fence too.
        tokio::time::advance(FRESH).await;
        fake.fail(Op::CheckJobNetwork, 1);
        assert!(fence.ensure(&fake).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_network_re_created_with_another_gateway_address_fails_the_jobs() {
        let fake = FakeRuntime::default();
        let fence = FenceCheck::new("flotilla-jobs", 8421, "http://172.30.0.1:8421");
        let error = fence.ensure(&fake).await.unwrap_err();
        assert!(error.contains("changed since the node started"), "{error}");
    }
}
