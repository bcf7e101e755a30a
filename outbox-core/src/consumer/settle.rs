//! Settling deliveries: one attempt after another until each has an
//! outcome, with backoff on database errors and a bound on those that
//! recur.

use tokio::sync::watch;

use crate::Error;
use crate::backend::Backend;
use crate::inbox::Delivery;
use crate::store::InboxState;

use super::apply::{process, process_batch, set_aside};
use super::handler::Handler;
use super::metrics::{Count, Outcome};
use super::shared::Shared;

#[cfg(doc)]
use super::config::ConsumerConfig;

/// Settles several deliveries, in one transaction when it can. A database
/// error that trying again cannot cure (a value a column refuses, a violated
/// constraint) settles them one by one instead, so one such delivery never
/// holds back the others. `None` for a delivery left unsettled because the
/// consumer stopped.
pub(super) async fn settle_batch<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    deliveries: &[Delivery],
    stopped: &mut watch::Receiver<bool>,
) -> Vec<Option<Outcome>> {
    let mut failures = 0u32;
    let mut recurring = 0u32;
    loop {
        let error = match process_batch(shared, deliveries).await {
            Ok(outcomes) => return outcomes.into_iter().map(Some).collect(),
            Err(error) => error,
        };
        shared.metrics.add(Count::DbErrors, 1);
        shared.metrics.status.database_failed(&error);
        if recurs(&error) {
            recurring += 1;
        }
        if error.is_permanent() || recurring >= shared.config.recurring_error_limit {
            tracing::warn!(%error, messages = deliveries.len(), "a delivery of the batch cannot be recorded; settling them one by one");
            let mut outcomes = Vec::with_capacity(deliveries.len());
            for delivery in deliveries {
                outcomes.push(settle_one(shared, delivery, stopped).await);
            }
            return outcomes;
        }
        tracing::warn!(%error, messages = deliveries.len(), "deliveries not settled; will try again");
        if !pause(shared, &mut failures, stopped).await {
            return deliveries.iter().map(|_| None).collect();
        }
    }
}

/// Settles one delivery: database errors are tried again with backoff until
/// the consumer stops (`None`); after `max_attempts` permanent ones, or
/// `recurring_error_limit` answered by the database in a row, the delivery
/// is parked with the error.
pub(super) async fn settle_one<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    delivery: &Delivery,
    stopped: &mut watch::Receiver<bool>,
) -> Option<Outcome> {
    let mut failures = 0u32;
    let mut permanent = 0u32;
    let mut recurring = 0u32;
    loop {
        let error = match process(shared, delivery).await {
            Ok(outcome) => return Some(outcome),
            Err(error) => error,
        };
        shared.metrics.add(Count::DbErrors, 1);
        shared.metrics.status.database_failed(&error);
        if error.is_permanent() {
            permanent += 1;
        }
        if recurs(&error) {
            recurring += 1;
        }
        if permanent >= shared.config.max_attempts
            || recurring >= shared.config.recurring_error_limit
        {
            return park_unrecordable(shared, delivery, &error, stopped).await;
        }
        tracing::warn!(%error, event_id = delivery.event_id, "delivery not settled; will try again");
        if !pause(shared, &mut failures, stopped).await {
            return None;
        }
    }
}

/// `true` for an error the database answered with (a statement or a commit
/// it refused), which may recur every time the same delivery is tried and
/// so counts towards [`ConsumerConfig::recurring_error_limit`]; `false` when
/// the database could not be reached, which says nothing of the delivery.
pub(super) fn recurs(error: &Error) -> bool {
    match error {
        Error::Database { source, .. } => matches!(
            source,
            sqlx::Error::Database(_)
                | sqlx::Error::Encode(_)
                | sqlx::Error::Decode(_)
                | sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::TypeNotFound { .. }
                | sqlx::Error::ColumnNotFound(_)
                | sqlx::Error::ColumnIndexOutOfBounds { .. }
        ),
        Error::Row { .. } => true,
        _ => false,
    }
}

/// Waits the backoff for the `failures`-th failure; `false` if the consumer
/// stopped meanwhile.
pub(super) async fn pause<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    failures: &mut u32,
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    let pause = shared.config.retry_backoff.delay(*failures);
    *failures = failures.saturating_add(1);
    tokio::select! {
        // Unacked: the broker redelivers them after we disconnect.
        _ = stopped.wait_for(|s| *s) => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// Parks a delivery the database keeps refusing, with the error and its
/// payload; if that is refused for good too, once more without the fields
/// that may be at fault (type, key, headers). Transient errors are tried
/// again with backoff until the consumer stops. `None` if it stopped, or the
/// bare row is refused for good as well: then the delivery stays unacked and
/// the broker redelivers it to the next connection.
pub(super) async fn park_unrecordable<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    delivery: &Delivery,
    error: &Error,
    stopped: &mut watch::Receiver<bool>,
) -> Option<Outcome> {
    let reason = format!("cannot be recorded: {error}");
    tracing::error!(event_id = delivery.event_id, %error, "delivery parked: the database refuses it");
    let bare = Delivery {
        event_type: None,
        key: None,
        headers: Vec::new(),
        ..delivery.clone()
    };
    let mut failures = 0u32;
    for attempt in [delivery, &bare] {
        loop {
            match set_aside(&shared.inbox, attempt, InboxState::Failed, 1, &reason, None).await {
                Ok(outcome) => return Some(outcome),
                Err(error) if error.is_permanent() => {
                    tracing::warn!(%error, event_id = delivery.event_id, "could not park the delivery");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, event_id = delivery.event_id, "could not park the delivery yet");
                    if !pause(shared, &mut failures, stopped).await {
                        return None;
                    }
                }
            }
        }
    }
    tracing::error!(
        event_id = delivery.event_id,
        "delivery neither recorded nor parked; left unacknowledged for the broker to redeliver"
    );
    None
}
