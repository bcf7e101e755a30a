//! The consumer's background loop: retry passes, inbox retention once the
//! queue is drained, and the figures of its rows.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::watch;

use crate::Error;
use crate::backend::Backend;
use crate::names::ms;
use crate::store::lease::LeaseStore;
use crate::subscriber::LinkStatus;

use super::columns::digest;
use super::drain::drain_quiet;
use super::handler::Handler;
use super::retry::{RowErrors, retry_due};
use super::shared::Shared;

#[cfg(doc)]
use super::metrics::ConsumerMetrics;

/// Retries `RETRY` rows whose time has come, and runs retention.
pub(super) async fn retry_loop<DB: Backend, H: Handler<DB>>(
    shared: Arc<Shared<DB, H>>,
    status: Arc<dyn LinkStatus>,
    mut stopped: watch::Receiver<bool>,
) {
    let holder = uuid::Uuid::now_v7().simple().to_string();
    let mut row_errors = RowErrors::default();
    let mut next_retention = tokio::time::Instant::now();
    let mut next_figures = tokio::time::Instant::now();
    loop {
        if let Some(every) = shared.config.stats_interval
            && tokio::time::Instant::now() >= next_figures
        {
            next_figures = tokio::time::Instant::now() + every;
            read_figures(&shared).await;
        }
        // The handler's calls are contained one by one; this keeps retries
        // and retention going whatever else a pass runs into.
        let pass = AssertUnwindSafe(retry_due(&shared, &mut row_errors))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(Error::TaskFailed("a retry pass panicked".to_owned())));
        let busy = match pass {
            Ok(n) => {
                if row_errors.0.is_empty() {
                    shared.metrics.status.idle();
                }
                n > 0
            }
            Err(error) => {
                tracing::warn!(%error, "retry loop failed");
                shared.metrics.status.database_failed(&error);
                false
            }
        };
        // Retention starts once the consumer has drained its queue; until
        // then it is looked at again every poll.
        if tokio::time::Instant::now() >= next_retention
            && shared
                .drain
                .drained(drain_quiet(&shared.config), status.is_connected())
        {
            next_retention = tokio::time::Instant::now() + shared.config.retention_interval;
            if let Err(error) = retention(&shared, &holder).await {
                tracing::warn!(%error, "inbox retention failed");
            }
        }
        let pause = if busy {
            Duration::ZERO
        } else {
            shared.config.retry_poll
        };
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Reads the inbox rows waiting for a retry and the parked ones, for
/// [`ConsumerMetrics::health`] and the gauges.
pub(super) async fn read_figures<DB: Backend, H: Handler<DB>>(shared: &Shared<DB, H>) {
    match shared.inbox.store.unsettled_counts().await {
        Ok(counts) => {
            let metrics = &shared.metrics;
            metrics
                .status
                .set_figures(counts.retry, None, counts.failed);
            if let Some(i) = metrics.instruments.get() {
                i.retrying_rows.set(counts.retry as f64);
                i.parked_rows.set(counts.failed as f64);
            }
        }
        Err(error) => {
            tracing::debug!(%error, "could not read the inbox figures");
            shared.metrics.status.database_failed(&error);
        }
    }
}

pub(super) async fn retention<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    holder: &str,
) -> Result<(), Error> {
    let Some(keep) = shared.config.retention else {
        return Ok(());
    };
    let inbox = &shared.inbox;
    let name = retention_lease(inbox.table(), inbox.consumer());
    let now = crate::clock::now(inbox.pool()).await;
    let until = now + ms(shared.config.retention_interval) * 2;
    if !LeaseStore::new(inbox.pool())
        .take(&name, holder, now, until)
        .await?
    {
        return Ok(());
    }
    while inbox.delete_processed(keep, 1000).await? == 1000 {
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// Longest lease name the lease table holds (`outbox_lease.name`, `VARCHAR(128)`).
pub(super) const LEASE_NAME_MAX: usize = 128;

/// The name of the retention lease of `consumer`'s rows in inbox table
/// `table`: `{table}.{consumer}.retention`, or, when that is longer than the
/// lease column (consumer names over 106 characters), a stable digest of it
/// (`sha256-` and 56 hex digits, then `.retention`), the same in every
/// process of the consumer.
pub(super) fn retention_lease(table: &str, consumer: &str) -> String {
    let name = format!("{table}.{consumer}.retention");
    if name.len() <= LEASE_NAME_MAX {
        return name;
    }
    format!("{}.retention", digest(&name))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_retention_lease_name_longer_than_its_column_becomes_a_stable_digest() {
        assert_eq!(
            super::retention_lease("inbox_event", "points"),
            "inbox_event.points.retention"
        );
        let long = "c".repeat(128);
        let name = super::retention_lease("inbox_event", &long);
        assert!(name.len() <= super::LEASE_NAME_MAX, "{name}");
        assert_eq!(name, super::retention_lease("inbox_event", &long), "stable");
        assert_ne!(name, super::retention_lease("inbox_other", &long));
    }
}
