//! The operator's view of a service: Prometheus metrics and health probes
//! over HTTP (`--metrics ADDR`).
//!
//! - `GET /metrics`: every metric the relay or consumer records (see
//!   `outbox::core::observe`), in Prometheus' text format;
//! - `GET /health/ready`: 200 while connected and working, 503 otherwise
//!   (a readiness probe), with the health as JSON;
//! - `GET /health/live`: 200 unless stopped for good (a liveness probe).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use outbox::core::observe::{Health, RunState};
use serde_json::{Value, json};

use super::BoxError;

/// Reads the health of the service's relay or consumer; `None` while it has
/// not started yet (connecting to the broker for the first time).
pub(crate) type HealthSource = Arc<dyn Fn() -> Option<Health> + Send + Sync>;

/// Histogram buckets, in seconds: a millisecond to half a minute.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone)]
struct Ops {
    metrics: PrometheusHandle,
    health: HealthSource,
}

/// Installs the Prometheus recorder (before the relay or consumer starts, so
/// it records into it) and serves `/metrics` and `/health/*` on `addr`.
/// Returns the address bound (`addr` may name port 0).
pub(crate) async fn serve(addr: SocketAddr, health: HealthSource) -> Result<SocketAddr, BoxError> {
    let metrics = PrometheusBuilder::new()
        .set_buckets(BUCKETS)?
        .install_recorder()?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(ops): State<Ops>| async move { ops.metrics.render() }),
        )
        .route("/health/ready", get(ready))
        .route("/health/live", get(live))
        .with_state(Ops { metrics, health });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /health/ready and /health/live");
    Ok(bound)
}

async fn ready(State(ops): State<Ops>) -> (StatusCode, Json<Value>) {
    let health = (ops.health)();
    let ok = health.as_ref().is_some_and(Health::is_ready);
    (status(ok), Json(describe(health.as_ref())))
}

async fn live(State(ops): State<Ops>) -> (StatusCode, Json<Value>) {
    let health = (ops.health)();
    let ok = health.as_ref().is_none_or(Health::is_live);
    (status(ok), Json(describe(health.as_ref())))
}

fn status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The health as JSON; durations in seconds.
fn describe(health: Option<&Health>) -> Value {
    let Some(h) = health else {
        return json!({ "state": RunState::Starting.as_str(), "error": "connecting to the broker" });
    };
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    json!({
        "state": h.state.as_str(),
        "error": h.error,
        "since_last_success_seconds": secs(h.since_last_success),
        "backlog": h.backlog,
        "backlog_age_seconds": secs(h.backlog_age),
        "parked": h.parked,
        "figures_age_seconds": secs(h.figures_age),
    })
}

/// Logging to stderr as [`super::init_logging`] does and, with `trace`, an
/// OpenTelemetry layer whose finished spans are printed to stderr one line
/// each (`span name=… trace=… id=… parent=… ms=…`, then the span's fields).
/// The W3C trace-context and baggage propagators are installed, so with the
/// library's `otel` feature the trace goes across the broker with each event.
pub(crate) fn init_telemetry(trace: bool) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    if !trace {
        super::init_logging();
        return;
    }
    opentelemetry::global::set_text_map_propagator(
        opentelemetry::propagation::TextMapCompositePropagator::new(vec![
            Box::new(opentelemetry_sdk::propagation::TraceContextPropagator::new()),
            Box::new(opentelemetry_sdk::propagation::BaggagePropagator::new()),
        ]),
    );
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(SpanLines)
        .build();
    let tracer = provider.tracer("outbox-example");
    // The spans go to OpenTelemetry whatever `RUST_LOG` keeps in the log.
    tracing_subscriber::registry()
        .with(super::log_layer())
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .init();
}

/// Prints each finished span as one line on stderr.
#[derive(Debug)]
struct SpanLines;

impl opentelemetry_sdk::trace::SpanExporter for SpanLines {
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        use std::io::Write as _;
        let mut out = std::io::stderr().lock();
        for span in batch {
            let ms = span
                .end_time
                .duration_since(span.start_time)
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0;
            let mut line = format!(
                "span name={} trace={} id={} parent={} ms={ms:.1}",
                span.name,
                span.span_context.trace_id(),
                span.span_context.span_id(),
                span.parent_span_id,
            );
            for kv in &span.attributes {
                if !kv.key.as_str().starts_with("code.") && !kv.key.as_str().starts_with("thread.")
                {
                    line.push_str(&format!(" {}={}", kv.key, kv.value));
                }
            }
            for link in span.links.iter() {
                line.push_str(&format!(" link={}", link.span_context.span_id()));
            }
            let _ = writeln!(out, "{line}");
        }
        Ok(())
    }
}
