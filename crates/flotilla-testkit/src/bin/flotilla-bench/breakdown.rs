//! Where a warm job's time goes: the stages of its path, read from the spans the services
//! export (OTLP to an in-process receiver), so that each later change can be placed.

use std::{collections::HashMap, time::Duration};

use flotilla_testkit::{OtlpReceiver, ReceivedSpan};

use crate::path::Sample;

/// The stages, in path order, with how each is read from the job's spans.
pub const STAGES: [&str; 10] = [
    "parse and validate",
    "KV create",
    "publish acknowledged",
    "delivered to a node",
    "claim",
    "container handed the script",
    "first byte out",
    "exit known",
    "record written",
    "/wait woken",
];

/// Each stage's duration for every sample whose spans all arrived, in [`STAGES`] order.
pub async fn stages(receiver: &OtlpReceiver, samples: &[Sample]) -> anyhow::Result<Vec<Vec<f64>>> {
    let spans = all_spans(receiver, samples).await?;
    let mut figures = vec![Vec::new(); STAGES.len()];
    for sample in samples {
        if let Some(stages) = job_stages(&spans, sample) {
            for (figure, stage) in figures.iter_mut().zip(stages) {
                figure.push(stage);
            }
        }
    }
    Ok(figures)
}

/// Waits (with a deadline) until every sample's last span, its `/wait` request, has arrived.
async fn all_spans(
    receiver: &OtlpReceiver,
    samples: &[Sample],
) -> anyhow::Result<Vec<ReceivedSpan>> {
    flotilla_testkit::wait_until(Duration::from_secs(30), "every job's spans", || async {
        let spans = receiver.spans();
        let complete = samples.iter().all(|s| {
            spans.iter().any(|span| wait_span_of(span, &s.job_id))
                && spans
                    .iter()
                    .any(|span| span.name == "record outcome" && in_job(&spans, span, &s.job_id))
        });
        complete.then_some(spans)
    })
    .await
}

fn wait_span_of(span: &ReceivedSpan, job_id: &str) -> bool {
    span.attributes.get("url.path").map(String::as_str) == Some(&format!("/jobs/{job_id}/wait"))
}

fn in_job(spans: &[ReceivedSpan], span: &ReceivedSpan, job_id: &str) -> bool {
    trace_of(spans, job_id).is_some_and(|trace| span.trace_id == trace)
}

fn trace_of<'a>(spans: &'a [ReceivedSpan], job_id: &str) -> Option<&'a str> {
    spans
        .iter()
        .find(|s| s.name == "job" && s.attributes.get("job_id").map(String::as_str) == Some(job_id))
        .map(|s| s.trace_id.as_str())
}

/// One sample's stages in milliseconds, or `None` when a span is missing.
fn job_stages(spans: &[ReceivedSpan], sample: &Sample) -> Option<Vec<f64>> {
    let trace = trace_of(spans, &sample.job_id)?;
    let named: HashMap<&str, &ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == trace)
        .map(|s| (s.name.as_str(), s))
        .collect();
    let span = |name: &str| named.get(name).copied();
    let (validate, create, publish) = (span("validate")?, span("kv create")?, span("publish")?);
    let (job, claim) = (span("job")?, span("claim")?);
    let (start, run, record) = (
        span("start container")?,
        span("run container")?,
        span("record outcome")?,
    );
    let at = |name: &str| run.attributes.get(name)?.parse::<u64>().ok();
    let (first_output, exit) = (at("first_output_unix_ns")?, at("exit_reported_unix_ns")?);
    let wait = spans.iter().find(|s| wait_span_of(s, &sample.job_id))?;
    let gap = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
    Some(vec![
        gap(validate.start_ns, validate.end_ns),
        gap(create.start_ns, create.end_ns),
        gap(publish.start_ns, publish.end_ns),
        gap(publish.end_ns, job.start_ns),
        gap(claim.start_ns, claim.end_ns),
        gap(claim.end_ns, start.end_ns),
        gap(start.end_ns, first_output),
        gap(first_output, exit),
        gap(exit, record.end_ns),
        gap(record.end_ns, wait.end_ns),
    ])
}
