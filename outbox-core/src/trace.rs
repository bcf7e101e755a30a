//! Trace context across the broker (cargo feature `otel`).
//!
//! When an event is appended inside a span that OpenTelemetry knows (through
//! `tracing-opentelemetry`), the span's context is written with the row as
//! message headers — by OpenTelemetry's global text-map propagator, so the
//! W3C `traceparent` and `tracestate` and, with the baggage propagator,
//! `baggage` — and the relay sends them with the message. The relay's
//! `outbox.publish` span is a child of that context (a batch of one) or links
//! to the contexts of its rows; the consumer's `outbox.handle` span, around
//! the handler, is a child of the context the message carries, whoever sent
//! it. An event that sets `traceparent` itself keeps it.
//!
//! Set the propagator once at start:
//!
//! ```ignore
//! opentelemetry::global::set_text_map_propagator(
//!     opentelemetry::propagation::TextMapCompositePropagator::new(vec![
//!         Box::new(opentelemetry_sdk::propagation::TraceContextPropagator::new()),
//!         Box::new(opentelemetry_sdk::propagation::BaggagePropagator::new()),
//!     ]),
//! );
//! ```
//!
//! With the feature both spans are at level `info`, so a service's usual
//! filter keeps them for its exporter. Without it they are `debug` spans, as
//! the relay's publish span was before, and no headers are written.

use crate::event::{Event, OutboxMessage};
use crate::inbox::Delivery;

/// The most rows whose contexts one `outbox.publish` span links to.
#[cfg(feature = "otel")]
const MAX_LINKS: usize = 128;

/// The span of one publish: a child of its row's producer (one row) or
/// linked to its rows' producers.
pub(crate) fn publish_span(batch: &[OutboxMessage]) -> tracing::Span {
    #[cfg(feature = "otel")]
    let span = tracing::info_span!("outbox.publish", rows = batch.len());
    #[cfg(not(feature = "otel"))]
    let span = tracing::debug_span!("outbox.publish", rows = batch.len());
    #[cfg(feature = "otel")]
    otel::follow_rows(&span, batch);
    span
}

/// The span around one delivery's handler: a child of the context the
/// message carries.
pub(crate) fn handle_span(delivery: &Delivery) -> tracing::Span {
    macro_rules! handle_span {
        ($level:expr) => {
            tracing::span!(
                $level,
                "outbox.handle",
                event_id = %delivery.event_id,
                event_type = delivery.event_type.as_deref().unwrap_or(""),
                attempt = delivery.attempt,
            )
        };
    }
    #[cfg(feature = "otel")]
    let span = handle_span!(tracing::Level::INFO);
    #[cfg(not(feature = "otel"))]
    let span = handle_span!(tracing::Level::DEBUG);
    #[cfg(feature = "otel")]
    otel::continue_from(&span, &delivery.headers);
    span
}

/// `events` with the current trace context in their headers, or `None` when
/// there is nothing to add (no context, or the feature is off).
pub(crate) fn with_context(events: &[Event]) -> Option<Vec<Event>> {
    #[cfg(feature = "otel")]
    return otel::with_context(events);
    #[cfg(not(feature = "otel"))]
    {
        let _ = events;
        None
    }
}

#[cfg(feature = "otel")]
mod otel {
    use std::collections::BTreeMap;

    use opentelemetry::Context;
    use opentelemetry::propagation::{Extractor, Injector};
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::MAX_LINKS;
    use crate::event::{Event, OutboxMessage};

    /// Headers read as a propagation carrier (names compared without case,
    /// as the W3C headers are defined).
    struct Headers<'a>(&'a [(String, String)]);

    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(key))
                .map(|(_, value)| value.as_str())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(name, _)| name.as_str()).collect()
        }
    }

    struct Written(BTreeMap<String, String>);

    impl Injector for Written {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key.to_owned(), value);
        }
    }

    fn extract(headers: &[(String, String)]) -> Context {
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)))
    }

    pub(super) fn with_context(events: &[Event]) -> Option<Vec<Event>> {
        let cx = tracing::Span::current().context();
        let mut written = Written(BTreeMap::new());
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut written));
        if written.0.is_empty() {
            return None;
        }
        Some(
            events
                .iter()
                .map(|event| {
                    let mut event = event.clone();
                    // An event that carries trace context of its own keeps all of it.
                    let own = event.headers.keys().any(|name| {
                        ["traceparent", "tracestate", "baggage"]
                            .iter()
                            .any(|h| name.eq_ignore_ascii_case(h))
                    });
                    if !own {
                        event.headers.extend(written.0.clone());
                    }
                    event
                })
                .collect(),
        )
    }

    pub(super) fn follow_rows(span: &tracing::Span, batch: &[OutboxMessage]) {
        if let [one] = batch {
            let cx = extract(&one.headers);
            if cx.span().span_context().is_valid() {
                let _ = span.set_parent(cx);
            }
            return;
        }
        for m in batch.iter().take(MAX_LINKS) {
            let cx = extract(&m.headers);
            let linked = cx.span().span_context().clone();
            if linked.is_valid() {
                span.add_link(linked);
            }
        }
    }

    pub(super) fn continue_from(span: &tracing::Span, headers: &[(String, String)]) {
        let cx = extract(headers);
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Inside a span OpenTelemetry knows, with the W3C propagator set: the
    /// feature decides whether the context is written.
    fn appended_in_a_trace() -> (bool, Option<Vec<crate::Event>>) {
        use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let event = crate::Event::json("t", "/queue/q", &1).unwrap();
            let span = tracing::info_span!("produce");
            let _entered = span.enter();
            let traced = span.context().span().span_context().is_valid();
            (traced, super::with_context(std::slice::from_ref(&event)))
        })
    }

    #[cfg(not(feature = "otel"))]
    #[test]
    fn without_the_feature_no_trace_headers_are_added() {
        let (traced, events) = appended_in_a_trace();
        assert!(traced, "the append ran in a trace");
        assert!(events.is_none(), "no trace headers without the feature");
    }

    #[cfg(feature = "otel")]
    #[test]
    fn with_the_feature_the_trace_context_is_added() {
        let (traced, events) = appended_in_a_trace();
        assert!(traced);
        let events = events.expect("trace headers");
        assert!(events[0].headers.contains_key("traceparent"));
    }

    #[test]
    fn the_handle_span_names_the_event() {
        let delivery = crate::Delivery {
            event_id: "e1".into(),
            event_type: Some("t".into()),
            key: None,
            headers: vec![],
            body: bytes::Bytes::new(),
            attempt: 0,
        };
        // Without a subscriber the span is disabled; building it must not fail.
        let _ = super::handle_span(&delivery);
        let _ = super::publish_span(&[]);
    }
}
