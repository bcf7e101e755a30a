//! Work beside the pipeline: retention deletes old published rows, and the
//! figures (backlog, its age, parked rows) feed health and the gauges.

use std::sync::Arc;

use super::{RelayConfig, RelayCounter, RelayMetrics};
use crate::Outbox;
use crate::backend::Backend;
use crate::error::Error;
use crate::names::ms;
use crate::store::lease::LeaseStore;

/// Deletes old published rows every `retention_interval`, while this relay
/// holds the table's retention lease, in batches of `retention_batch`.
pub(super) async fn retention_loop<DB: Backend>(
    outbox: Outbox<DB>,
    metrics: Arc<RelayMetrics>,
    config: RelayConfig,
    keep: std::time::Duration,
) {
    loop {
        if let Err(error) = retention(&outbox, &metrics, &config, keep).await {
            tracing::warn!(%error, "retention failed");
        }
        tokio::time::sleep(config.retention_interval).await;
    }
}

/// One retention pass, if this relay holds the retention lease.
async fn retention<DB: Backend>(
    outbox: &Outbox<DB>,
    metrics: &RelayMetrics,
    config: &RelayConfig,
    keep: std::time::Duration,
) -> Result<(), Error> {
    let name = format!("{}.retention", outbox.table());
    let now = crate::clock::now(outbox.pool()).await;
    let until = now + ms(config.retention_interval) * 2;
    if !LeaseStore::new(outbox.pool())
        .take(&name, &config.relay_id, now, until)
        .await?
    {
        return Ok(());
    }
    let before = now - ms(keep);
    let limit = config.retention_batch.max(1);
    loop {
        let n = outbox.store().delete_published(before, limit).await?;
        metrics.add(RelayCounter::Deleted, n);
        if n < u64::from(limit) {
            return Ok(());
        }
        // Small batches, with room for the relay's own statements between.
        tokio::task::yield_now().await;
    }
}

/// Reads the backlog, its age and the parked rows every `every`, for
/// [`RelayMetrics::health`] and the gauges.
pub(super) async fn read_figures<DB: Backend>(
    outbox: Outbox<DB>,
    metrics: Arc<RelayMetrics>,
    every: std::time::Duration,
) {
    loop {
        match outbox.backlog().await {
            Ok(backlog) => {
                let (pending, oldest, parked) =
                    (backlog.pending, backlog.oldest_pending_age, backlog.parked);
                metrics.status.set_figures(pending, oldest, parked);
                if let Some(i) = metrics.instruments.get() {
                    i.backlog.set(pending as f64);
                    i.oldest.set(oldest.unwrap_or_default().as_secs_f64());
                    i.parked_rows.set(parked as f64);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "could not read the backlog figures");
                metrics.status.database_failed(&error);
            }
        }
        tokio::time::sleep(every).await;
    }
}
