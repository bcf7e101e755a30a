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
//! Without the feature these functions create the same spans and write no
//! headers.

use crate::event::{Event, OutboxMessage};
use crate::inbox::Delivery;

/// The most rows whose contexts one `outbox.publish` span links to.
#[cfg(feature = "otel")]
const MAX_LINKS: usize = 128;

/// The span of one publish: a child of its row's producer (one row) or
/// linked to its rows' producers.
pub(crate) fn publish_span(batch: &[OutboxMessage]) -> tracing::Span {
    let span = tracing::info_span!("outbox.publish", rows = batch.len());
    #[cfg(feature = "otel")]
    otel::follow_rows(&span, batch);
    span
}

/// The span around one delivery's handler: a child of the context the
/// message carries.
pub(crate) fn handle_span(delivery: &Delivery) -> tracing::Span {
    let span = tracing::info_span!(
        "outbox.handle",
        event_id = %delivery.event_id,
        event_type = delivery.event_type.as_deref().unwrap_or(""),
        attempt = delivery.attempt,
    );
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
                    let own = event
                        .headers
                        .keys()
                        .any(|name| name.eq_ignore_ascii_case("traceparent"));
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
    #[cfg(not(feature = "otel"))]
    #[test]
    fn without_the_feature_no_trace_headers_are_added() {
        let event = crate::Event::json("t", "/queue/q", &1).unwrap();
        let span = tracing::info_span!("produce");
        let _entered = span.enter();
        assert!(super::with_context(std::slice::from_ref(&event)).is_none());
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
