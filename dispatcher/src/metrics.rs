//! `GET /metrics` of a dispatcher (Prometheus text format 0.0.4): what this replica did since
//! it started. Labels have a fixed, small set of values.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// What the intake did with one submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Admission {
    /// Recorded as pending and queued for the fleet.
    Accepted,
    /// Invalid or a taken id: kept on the rejected stream.
    Rejected,
    /// NATS trouble: handed back to be tried again.
    Retried,
}

impl EncodeLabelValue for Admission {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let value = match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Retried => "retried",
        };
        EncodeLabelValue::encode(&value, encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AdmissionLabel {
    result: Admission,
}

pub(crate) struct DispatcherMetrics {
    registry: Registry,
    submissions: Family<AdmissionLabel, Counter>,
    pub(crate) lost_nodes: Counter,
    pub(crate) requeued: Counter,
    pub(crate) dead_letters: Counter,
    pub(crate) queue_timeouts: Counter,
    pub(crate) retention_deleted: Counter,
    leader: Gauge,
}

impl Default for DispatcherMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let submissions = Family::<AdmissionLabel, Counter>::default();
        let lost_nodes = Counter::default();
        let requeued = Counter::default();
        let dead_letters = Counter::default();
        let queue_timeouts = Counter::default();
        let retention_deleted = Counter::default();
        let leader = Gauge::default();
        registry.register(
            "flotilla_dispatcher_leader",
            "1 while this replica holds the leader lease, else 0",
            leader.clone(),
        );
        registry.register(
            "flotilla_dispatcher_submissions",
            "Direct NATS submissions handled by this replica's intake, by result",
            submissions.clone(),
        );
        registry.register(
            "flotilla_dispatcher_lost_nodes",
            "Nodes whose heartbeat stopped, handled by this replica as leader",
            lost_nodes.clone(),
        );
        registry.register(
            "flotilla_dispatcher_requeued_jobs",
            "Running jobs of lost nodes handed back to the queue",
            requeued.clone(),
        );
        registry.register(
            "flotilla_dispatcher_dead_letters",
            "Job messages that ran out of deliveries, failed and kept on the dead-letter stream",
            dead_letters.clone(),
        );
        registry.register(
            "flotilla_dispatcher_queue_timeouts",
            "Jobs failed for waiting in the queue longer than FLOTILLA_MAX_QUEUED_SECS",
            queue_timeouts.clone(),
        );
        registry.register(
            "flotilla_dispatcher_retention_deleted",
            "Finished jobs deleted past their TTL or beyond the retained count",
            retention_deleted.clone(),
        );
        Self {
            registry,
            submissions,
            lost_nodes,
            requeued,
            dead_letters,
            queue_timeouts,
            retention_deleted,
            leader,
        }
    }
}

impl DispatcherMetrics {
    pub(crate) fn submission(&self, result: Admission) {
        self.submissions
            .get_or_create(&AdmissionLabel { result })
            .inc();
    }

    pub(crate) fn render(&self, leading: bool) -> String {
        self.leader.set(i64::from(leading));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_bounded_labels() {
        let metrics = DispatcherMetrics::default();
        metrics.submission(Admission::Accepted);
        metrics.submission(Admission::Rejected);
        metrics.lost_nodes.inc();
        let text = metrics.render(true);
        for line in [
            "flotilla_dispatcher_leader 1",
            "flotilla_dispatcher_submissions_total{result=\"accepted\"} 1",
            "flotilla_dispatcher_submissions_total{result=\"rejected\"} 1",
            "flotilla_dispatcher_lost_nodes_total 1",
            "flotilla_dispatcher_dead_letters_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }
}
