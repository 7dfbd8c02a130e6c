//! W3C trace context across process boundaries: injected into the headers of a NATS message
//! or read from those of a NATS message or an HTTP request. Without trace export (no OTLP
//! endpoint) spans carry no context, so nothing is injected and extracted parents are ignored.

use flotilla_proto::names;
use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::TraceContextExt as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The trace-context headers of `span` (`traceparent`, `tracestate`), to send with a message
/// so that the receiver's spans join its trace. Empty when the span is not traced.
pub fn nats_headers(span: &tracing::Span) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    let context = span.context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut NatsInjector(&mut headers));
    }
    headers
}

/// The W3C `traceparent` of `span`, when it is traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    nats_headers(span)
        .get(names::HEADER_TRACEPARENT)
        .map(|v| v.as_str().to_owned())
}

/// Makes `span` a child of the span `traceparent` names (see [`traceparent`]).
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::HEADER_TRACEPARENT, traceparent);
    set_parent_from_nats(span, Some(&headers));
}

/// Like [`nats_headers`], but when `span` is not traced (this service exports no traces), the
/// trace context of `incoming` is passed on unchanged, so the next hop still joins the
/// submitter's trace.
pub fn nats_headers_or_forward(
    span: &tracing::Span,
    incoming: Option<&async_nats::HeaderMap>,
) -> async_nats::HeaderMap {
    let mut headers = nats_headers(span);
    if headers.is_empty()
        && let Some(incoming) = incoming
    {
        for name in names::TRACE_HEADERS {
            if let Some(value) = incoming.get(name) {
                headers.insert(name, value.as_str());
            }
        }
    }
    headers
}

/// Makes `span` a child of the trace context a NATS message carries, if any. Call it before
/// the span is first entered.
pub fn set_parent_from_nats(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if let Some(headers) = headers {
        set_parent(span, &NatsExtractor(headers));
    }
}

/// Makes `span` a child of the trace context an HTTP request carries, if any, so a caller's
/// trace goes on through Flotilla.
pub fn set_parent_from_http(span: &tracing::Span, headers: &http::HeaderMap) {
    set_parent(span, &HttpExtractor(headers));
}

fn set_parent(span: &tracing::Span, extractor: &dyn Extractor) {
    let parent = TraceContextPropagator::new().extract(extractor);
    if parent.span().span_context().is_valid() {
        // Fails only when the span is not traced or was already entered: nothing to link then.
        let _ = span.set_parent(parent);
    }
}

/// Only the names flotilla-proto defines are written, so every header on the wire is one of
/// `names`.
struct NatsInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let Some(name) = trace_header(key) {
            self.0.insert(name, value.as_str());
        }
    }
}

struct NatsExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(trace_header(key)?).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        names::TRACE_HEADERS
            .into_iter()
            .filter(|name| self.0.get(*name).is_some())
            .collect()
    }
}

struct HttpExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(trace_header(key)?)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        names::TRACE_HEADERS
            .into_iter()
            .filter(|name| self.0.contains_key(*name))
            .collect()
    }
}

fn trace_header(key: &str) -> Option<&'static str> {
    names::TRACE_HEADERS
        .into_iter()
        .find(|name| name.eq_ignore_ascii_case(key))
}

/// The current OpenTelemetry context of `span`, for tests and diagnostics.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context: Context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::{
        error::OTelSdkResult,
        trace::{SdkTracerProvider, SpanData, SpanExporter},
    };
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Keeps finished spans in memory.
    #[derive(Debug, Clone, Default)]
    struct Memory(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Memory {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().expect("spans").extend(batch);
            Ok(())
        }
    }

    #[test]
    fn the_propagator_uses_the_header_names_of_flotilla_proto() {
        let propagator = TraceContextPropagator::new();
        let fields: Vec<&str> = propagator.fields().collect();
        assert_eq!(fields, names::TRACE_HEADERS);
    }

    #[test]
    fn a_span_continues_the_trace_of_the_message_headers() {
        let spans = Memory::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let submit = tracing::info_span!("POST /jobs");
            let headers = nats_headers(&submit);
            assert!(headers.get(names::HEADER_TRACEPARENT).is_some());
            let sent_trace = trace_id(&submit);
            drop(submit);

            let job = tracing::info_span!("job");
            set_parent_from_nats(&job, Some(&headers));
            assert_eq!(trace_id(&job), sent_trace);
            drop(job);

            let orphan = tracing::info_span!("unrelated");
            set_parent_from_nats(&orphan, Some(&async_nats::HeaderMap::new()));
            assert_ne!(trace_id(&orphan), sent_trace);
        });
        let _ = provider.force_flush();
        let spans = spans.0.lock().expect("spans");
        let submit = spans
            .iter()
            .find(|s| s.name == "POST /jobs")
            .expect("submit span");
        let job = spans.iter().find(|s| s.name == "job").expect("job span");
        assert_eq!(job.span_context.trace_id(), submit.span_context.trace_id());
        assert_eq!(job.parent_span_id, submit.span_context.span_id());
    }

    #[test]
    fn untraced_spans_inject_nothing_but_forward_what_came_in() {
        let span = tracing::info_span!("not exported");
        assert!(nats_headers(&span).is_empty());
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut incoming = async_nats::HeaderMap::new();
        incoming.insert(names::HEADER_TRACEPARENT, parent);
        incoming.insert(names::HEADER_JOB_ID, "not-forwarded");
        let forwarded = nats_headers_or_forward(&span, Some(&incoming));
        assert_eq!(
            forwarded.get(names::HEADER_TRACEPARENT).map(|v| v.as_str()),
            Some(parent)
        );
        assert_eq!(forwarded.len(), 1);
    }
}
