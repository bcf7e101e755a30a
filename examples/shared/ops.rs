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
use outbox::core::observe::{Health, LinkState};
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
        return json!({ "state": LinkState::Starting.as_str(), "error": "connecting to the broker" });
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
