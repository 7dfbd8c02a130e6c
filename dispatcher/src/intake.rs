//! Intake of jobs published straight to NATS: validate, record as `pending`, queue for the
//! fleet. A malformed or invalid message is acked (it never blocks the queue), kept on the
//! rejected stream with its reason, and, when it names a usable job id, recorded as a failed
//! job so `GET /jobs/{id}` explains it.

use std::sync::Arc;

use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use flotilla_catalog::{Limits, Origin};
use flotilla_config::LiveCatalog;
use flotilla_nats::{StoreError, SubmitError, Submitted, Topology};
use flotilla_proto::{Encoding, JobRecord, SubmitRequest, ids, names};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::metrics::{Admission, DispatcherMetrics};

pub(crate) struct Intake {
    pub(crate) topology: Topology,
    pub(crate) catalog: Arc<LiveCatalog>,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<DispatcherMetrics>,
}

/// Submissions admitted at once: each waits on two JetStream round trips (the record, then the
/// run queue), so one at a time caps intake at about 2,000/s. Admission is idempotent and the
/// jobs are independent, so their order does not matter.
const CONCURRENCY: usize = 256;

pub(crate) async fn run(intake: Arc<Intake>, stop: CancellationToken) {
    let consumer = intake.topology.intake.clone();
    crate::consume::consume(&consumer, "submissions", &stop, CONCURRENCY, |message| {
        intake.handle(message)
    })
    .await;
}

impl Intake {
    async fn handle(&self, message: jetstream::Message) {
        // A publisher's trace context (W3C headers) makes admission part of its trace; the
        // job message then carries this span's context on to the node.
        let span = tracing::info_span!(
            "intake",
            otel.kind = "consumer",
            job_id = tracing::field::Empty
        );
        flotilla_telemetry::propagation::set_parent_from_nats(&span, message.headers.as_ref());
        let admitted = self.admit(&message).instrument(span).await;
        let ack = match admitted {
            Ok(admission) => {
                self.metrics.submission(admission);
                AckKind::Ack
            }
            // NATS trouble: try the message again (as often as it takes: the consumer has no
            // delivery limit), backing off; admission is idempotent.
            Err(e) => {
                let delivered = message.info().map_or(1, |info| info.delivered);
                tracing::warn!(error = %e, delivered, "cannot admit submission, will retry");
                self.metrics.submission(Admission::Retried);
                AckKind::Nak(Some(flotilla_nats::redelivery_delay(delivered)))
            }
        };
        if let Err(e) = message.ack_with(ack).await {
            tracing::warn!(error = %e, "cannot ack submission");
        }
    }

    async fn admit(&self, message: &jetstream::Message) -> Result<Admission, SubmitError> {
        let encoding = Encoding::from_content_type(
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(names::HEADER_CONTENT_TYPE))
                .map(|v| v.as_str()),
        );
        let submission: SubmitRequest = match flotilla_proto::decode(&message.payload, encoding) {
            Ok(submission) => submission,
            Err(e) => {
                self.reject(message, None, &format!("undecodable message: {e}"))
                    .await;
                return Ok(Admission::Rejected);
            }
        };
        let claimed_id = submission
            .job_id
            .clone()
            .filter(|id| ids::is_valid_job_id(id));
        let request = match flotilla_catalog::validate(
            &self.catalog.current(),
            &self.limits,
            submission.clone(),
            Origin::Nats,
            Utc::now(),
        )
        .await
        {
            Ok(request) => request,
            Err(e) => {
                let reason = match &e.field {
                    Some(field) => format!("{field}: {}", e.message),
                    None => e.message.clone(),
                };
                if let Some(job_id) = &claimed_id {
                    self.record_rejection(job_id, &submission, &reason).await?;
                }
                self.reject(message, claimed_id.as_deref(), &reason).await;
                return Ok(Admission::Rejected);
            }
        };

        let span = tracing::Span::current();
        span.record("job_id", request.job_id.as_str());
        let trace = flotilla_telemetry::propagation::nats_headers_or_forward(
            &span,
            message.headers.as_ref(),
        );
        match flotilla_nats::submit(&self.topology, &request, trace).await? {
            Submitted::Queued(_) => {
                tracing::info!(job_id = %request.job_id, "direct submission queued");
                Ok(Admission::Accepted)
            }
            Submitted::Taken => {
                let reason = format!("job id {} is already taken", request.job_id);
                self.reject(message, Some(&request.job_id), &reason).await;
                Ok(Admission::Rejected)
            }
        }
    }

    /// Records a failed job explaining the rejection, unless the id is already in use.
    async fn record_rejection(
        &self,
        job_id: &str,
        submission: &SubmitRequest,
        reason: &str,
    ) -> Result<(), StoreError> {
        let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
        let record = JobRecord::rejected(job_id, &clipped(submission), &reason, Utc::now());
        match self.topology.jobs.create(&record).await {
            Ok(_) | Err(StoreError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Keeps the original message on the rejected stream with the reason in a header.
    async fn reject(&self, message: &jetstream::Message, job_id: Option<&str>, reason: &str) {
        tracing::warn!(job_id, reason, "submission rejected");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            names::HEADER_REJECT_REASON,
            flotilla_nats::header_safe(reason).as_str(),
        );
        if let Some(content_type) = message
            .headers
            .as_ref()
            .and_then(|h| h.get(names::HEADER_CONTENT_TYPE))
        {
            headers.insert(names::HEADER_CONTENT_TYPE, content_type.as_str());
        }
        if let Some(job_id) = job_id {
            headers.insert(names::HEADER_JOB_ID, job_id);
        }
        let published = self
            .topology
            .js
            .publish_with_headers(
                names::rejected_subject(job_id),
                headers,
                message.payload.clone(),
            )
            .await;
        match published {
            Ok(ack) => {
                if let Err(e) = ack.await {
                    tracing::warn!(error = %e, "rejected submission not stored");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot store rejected submission"),
        }
    }
}

/// The longest rejection reason a record keeps.
const MAX_REASON_CHARS: usize = 1024;

/// What the record of a rejected submission keeps: only the fields that pass their own rules,
/// so that a flood of large invalid submissions fills neither the job store nor the gateways'
/// indexes.
fn clipped(submission: &SubmitRequest) -> SubmitRequest {
    let id = |value: &Option<String>| value.clone().filter(|v| ids::is_safe_id(v, 64));
    SubmitRequest {
        agent_id: id(&submission.agent_id),
        engine: id(&submission.engine),
        profile: id(&submission.profile),
        metadata: submission
            .metadata
            .clone()
            .filter(flotilla_catalog::metadata_is_valid),
        dry_run: submission.dry_run,
        ..SubmitRequest::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_rejected_record_keeps_only_valid_clipped_fields() {
        let huge = "x".repeat(1 << 20);
        let submission = SubmitRequest {
            agent_id: Some(huge.clone()),
            engine: Some("shell".to_owned()),
            profile: Some("bad profile!".to_owned()),
            prompt: Some(huge.clone()),
            metadata: Some(BTreeMap::from([("k".to_owned(), huge)])),
            dry_run: Some(true),
            ..SubmitRequest::default()
        };
        let kept = clipped(&submission);
        assert_eq!(kept.agent_id, None);
        assert_eq!(kept.engine.as_deref(), Some("shell"));
        assert_eq!(kept.profile, None);
        assert_eq!(kept.prompt, None);
        assert_eq!(kept.metadata, None);
        assert_eq!(kept.dry_run, Some(true));
        let record = JobRecord::rejected("a-1", &kept, "r", Utc::now());
        let size = flotilla_proto::encode(&record).unwrap().len();
        assert!(size < 1024, "{size} bytes");
        let valid = BTreeMap::from([("team".to_owned(), "blue".to_owned())]);
        let kept = clipped(&SubmitRequest {
            metadata: Some(valid.clone()),
            ..SubmitRequest::default()
        });
        assert_eq!(kept.metadata, Some(valid));
    }
}
