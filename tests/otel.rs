//! Trace context across the broker (feature `otel`), with a real ActiveMQ,
//! two databases, two `Client`s and OpenTelemetry's in-memory exporter: the
//! consumer's `outbox.handle` span is a child of the producer's span, the
//! relay's `outbox.publish` span follows it too, baggage arrives, a message
//! from outside the framework that carries `traceparent` is continued, and
//! rows appended outside any trace carry no trace headers.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::baggage::BaggageExt as _;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::{SpanId, TraceContextExt as _, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox::core::consumer::{BoxFuture, HandlerError};
use outbox::core::relay::StompPublisher;
use outbox::core::{
    Consumer, ConsumerConfig, Delivery, Event, Handler, Inbox, Outbox, RelayConfig,
};
use outbox::stomp::Outgoing;
use support::*;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

type Db = sqlx::Sqlite;

/// The exporter and provider every test of this binary records into.
fn telemetry() -> &'static (InMemorySpanExporter, SdkTracerProvider) {
    static TELEMETRY: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    TELEMETRY.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let tracer = provider.tracer("outbox-tests");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ]));
        (exporter, provider)
    })
}

fn finished_spans() -> Vec<SpanData> {
    let (exporter, provider) = telemetry();
    provider.force_flush().expect("flush spans");
    exporter.get_finished_spans().expect("finished spans")
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// What the handler saw of each event: its trace id and the baggage entry `tenant`.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, Observed>>>);

/// An event's trace id and its `tenant` baggage, as its handler saw them.
type Observed = (TraceId, Option<String>);

impl Handler<Db> for Seen {
    type Event = ();

    fn decode(&self, _delivery: &Delivery) -> Result<(), String> {
        Ok(())
    }

    fn handle<'a>(
        &'a self,
        _tx: &'a mut sqlx::Transaction<'static, Db>,
        _event: (),
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let cx = tracing::Span::current().context();
            let trace = cx.span().span_context().trace_id();
            let tenant = cx.baggage().get("tenant").map(|v| v.to_string());
            self.0
                .lock()
                .unwrap()
                .insert(delivery.event_id.clone(), (trace, tenant));
            Ok(())
        })
    }
}

async fn wait_seen(seen: &Seen, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.0.lock().unwrap().len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} events handled",
            seen.0.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumers_handler_span_continues_the_producers_trace_across_the_broker() -> TestResult
{
    telemetry();
    let broker = broker().await;
    let (db1, db2) = (sqlite().await.unwrap(), sqlite().await.unwrap());
    let queue = "/queue/otel.traced";
    let outbox = Outbox::new(db1.pool().clone());
    outbox.migrate().await?;
    let inbox = Inbox::new(db2.pool().clone(), "traced")?;
    inbox.migrate().await?;
    let seen = Seen::default();
    let consumer_client = client(&broker).await;
    let consumer = Consumer::new(inbox, seen.clone(), ConsumerConfig::new(queue))?
        .spawn(consumer_client.clone())
        .await?;

    // Three events, each appended in its own producer span with baggage.
    let mut produced = HashMap::new();
    for i in 0..3 {
        let _baggage =
            Context::current_with_baggage(vec![KeyValue::new("tenant", "acme")]).attach();
        let span = tracing::info_span!("produce", i);
        let id = async {
            let mut tx = db1.pool().begin().await?;
            let event = Event::json("otel.test", queue, &serde_json::json!({ "i": i }))?;
            let id = outbox.append(&mut tx, event).await?;
            tx.commit().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(id)
        }
        .instrument(span.clone())
        .await?;
        let producer = span.context().span().span_context().clone();
        produced.insert(id.to_string(), (producer.trace_id(), producer.span_id()));
        drop(span);
    }
    let relay = outbox
        .relay(
            StompPublisher::new(client(&broker).await),
            RelayConfig::default()
                .with_lease(Duration::from_secs(5))
                .with_poll_interval(Duration::from_millis(50)),
        )?
        .spawn();

    // A message from a producer outside the framework, with its own traceparent.
    let foreign_trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736")?;
    let foreign_parent = SpanId::from_hex("00f067aa0ba902b7")?;
    consumer_client
        .send(
            Outgoing::new(queue, "{}")
                .header("event-id", "foreign-1")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
        )
        .await?;
    wait_seen(&seen, 4).await;
    relay.shutdown().await?;
    consumer.shutdown().await?;

    let spans = finished_spans();
    let handle_span = |event_id: &str| {
        spans
            .iter()
            .find(|s| {
                s.name == "outbox.handle" && attribute(s, "event_id").as_deref() == Some(event_id)
            })
            .unwrap_or_else(|| panic!("no outbox.handle span for {event_id}"))
    };
    let seen = seen.0.lock().unwrap().clone();
    for (id, (trace, producer)) in &produced {
        let handled = handle_span(id);
        assert_eq!(handled.span_context.trace_id(), *trace, "trace of {id}");
        assert_eq!(handled.parent_span_id, *producer, "parent of {id}");
        assert_eq!(
            seen[id],
            (*trace, Some("acme".to_owned())),
            "what the handler saw of {id}"
        );
        // The relay's publish span is the producer's child, or links to it in a batch.
        let published = spans.iter().any(|s| {
            s.name == "outbox.publish"
                && ((s.parent_span_id == *producer && s.span_context.trace_id() == *trace)
                    || s.links
                        .iter()
                        .any(|l| l.span_context.span_id() == *producer))
        });
        assert!(
            published,
            "no outbox.publish span follows the producer of {id}"
        );
    }
    let foreign = handle_span("foreign-1");
    assert_eq!(foreign.span_context.trace_id(), foreign_trace);
    assert_eq!(foreign.parent_span_id, foreign_parent);
    assert_eq!(seen["foreign-1"].0, foreign_trace);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_appended_outside_a_trace_carry_no_trace_headers() -> TestResult {
    telemetry();
    let broker = broker().await;
    let db = sqlite().await.unwrap();
    let queue = "/queue/otel.untraced";
    let outbox = Outbox::new(db.pool().clone());
    outbox.migrate().await?;
    let mut tx = db.pool().begin().await?;
    outbox
        .append(&mut tx, Event::json("otel.test", queue, &1)?)
        .await?;
    tx.commit().await?;
    // And one whose producer sets its own traceparent: kept as it is.
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let traced = tracing::info_span!("produce");
    async {
        let mut tx = db.pool().begin().await?;
        let event = Event::json("otel.test", queue, &2)?.with_header("traceparent", own);
        outbox.append(&mut tx, event).await?;
        tx.commit().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .instrument(traced)
    .await?;
    let relay = outbox
        .relay(
            StompPublisher::new(client(&broker).await),
            RelayConfig::default()
                .with_lease(Duration::from_secs(5))
                .with_poll_interval(Duration::from_millis(50)),
        )?
        .spawn();
    wait_published(&outbox, Duration::from_secs(30)).await;
    relay.shutdown().await?;
    let received = drain(&broker, queue, Duration::from_secs(2)).await;
    assert_eq!(received.len(), 2);
    let header = |r: &Received, name: &str| {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let untraced = received.iter().find(|r| r.body == b"1").expect("event 1");
    for name in ["traceparent", "tracestate", "baggage"] {
        assert_eq!(header(untraced, name), None, "{name} on an untraced event");
    }
    let own_event = received.iter().find(|r| r.body == b"2").expect("event 2");
    assert_eq!(header(own_event, "traceparent").as_deref(), Some(own));
    Ok(())
}
