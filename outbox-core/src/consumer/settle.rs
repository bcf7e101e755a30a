//! Settling deliveries: attempt after attempt until each has an outcome
//! (applied, a duplicate, retrying or parked), with backoff on database
//! errors and the bounds [`after_failure`] sets on those that recur. The
//! middle of three levels: [`receive`](super::receive) above,
//! [`apply`](super::apply) below.

use std::time::Duration;

use tokio::sync::watch;

use crate::Error;
use crate::backend::Backend;
use crate::backoff::Backoff;
use crate::inbox::Delivery;
use crate::names::now_ms;
use crate::store::InboxState;

use super::apply::{attempt_batch, attempt_one, record_unapplied};
use super::failure::{Failure, Next, Tally, after_failure};
use super::handler::Handler;
use super::metrics::{ConsumerCounter, Outcome};
use super::shared::Shared;

/// Settles several deliveries, in one transaction when it can. A database
/// error that one delivery may cause (a value a column refuses, a violated
/// constraint), or one that recurs up to its bound, settles them one by one
/// instead, so one such delivery never holds back the others. `None` for a
/// delivery left unsettled because the consumer stopped.
pub(super) async fn settle_batch<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    deliveries: &[Delivery],
    stopped: &mut watch::Receiver<bool>,
) -> Vec<Option<Outcome>> {
    let mut tally = Tally::default();
    loop {
        let error = match attempt_batch(shared, deliveries).await {
            Ok(outcomes) => return outcomes.into_iter().map(Some).collect(),
            Err(error) => error,
        };
        let (failure, next);
        (failure, next, tally) = database_failed(shared, &error, tally);
        match next {
            Next::TryAgain { delay } if failure != Failure::Refused => {
                tracing::warn!(%error, messages = deliveries.len(), "deliveries not settled; will try again");
                if !wait(delay, stopped).await {
                    return deliveries.iter().map(|_| None).collect();
                }
            }
            _ => {
                tracing::warn!(%error, messages = deliveries.len(), "a delivery of the batch cannot be recorded; settling them one by one");
                let mut outcomes = Vec::with_capacity(deliveries.len());
                for delivery in deliveries {
                    outcomes.push(settle_one(shared, delivery, stopped).await);
                }
                return outcomes;
            }
        }
    }
}

/// Settles one delivery: database errors are tried again with backoff until
/// the consumer stops (`None`), or until [`after_failure`] parks the
/// delivery with the error (after `max_attempts` errors its data causes, or
/// `recurring_error_limit` answered by the database, in a row).
pub(super) async fn settle_one<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    delivery: &Delivery,
    stopped: &mut watch::Receiver<bool>,
) -> Option<Outcome> {
    let mut tally = Tally::default();
    loop {
        let error = match attempt_one(shared, delivery).await {
            Ok(outcome) => return Some(outcome),
            Err(error) => error,
        };
        let next;
        (_, next, tally) = database_failed(shared, &error, tally);
        let Next::TryAgain { delay } = next else {
            return park_unrecordable(shared, delivery, &error, stopped).await;
        };
        tracing::warn!(%error, event_id = delivery.event_id, "delivery not settled; will try again");
        if !wait(delay, stopped).await {
            return None;
        }
    }
}

/// Counts and reports a database error met settling an event, and asks
/// [`after_failure`] what comes next.
fn database_failed<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    error: &Error,
    so_far: Tally,
) -> (Failure, Next, Tally) {
    shared.metrics.add(ConsumerCounter::DbErrors, 1);
    shared.metrics.status.database_failed(error);
    let failure = Failure::of(error);
    let (next, tally) = after_failure(failure, so_far, &shared.config, now_ms(), Backoff::jitter());
    (failure, next, tally)
}

/// Waits the backoff for the `failures`-th failure; `false` if the consumer
/// stopped meanwhile.
pub(super) async fn pause<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    failures: &mut u32,
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    let delay = shared.config.retry_backoff.delay(*failures);
    *failures = failures.saturating_add(1);
    wait(delay, stopped).await
}

/// Waits `delay`; `false` if the consumer stopped meanwhile.
async fn wait(delay: Duration, stopped: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        // Unacked: the broker redelivers them after we disconnect.
        _ = stopped.wait_for(|s| *s) => false,
        _ = tokio::time::sleep(delay) => true,
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
            match record_unapplied(&shared.inbox, attempt, InboxState::Failed, 1, &reason, None)
                .await
            {
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
