//! Messages as they come from the subscription, from screening to the ACK:
//! those that must not reach the handler are parked, the others settled,
//! and the settled ones acknowledged. The highest of three levels:
//! [`settle`](super::settle) below makes attempts until each delivery has an
//! outcome, [`apply`](super::apply) makes one attempt.

use tokio::sync::watch;

use crate::backend::Backend;
use crate::failpoint;
use crate::inbox::Delivery;
use crate::store::InboxState;
use crate::subscriber::Incoming;

use super::ack::{acknowledge, end_connection};
use super::apply::record_unapplied;
use super::columns::{NO_DEDUP_ID, dedup_source, to_delivery};
use super::handler::Handler;
use super::metrics::{ConsumerCounter, InFlightGauge, count_outcomes};
use super::settle::{park_unrecordable, pause, settle_batch, settle_one};
use super::shared::Shared;

/// Takes messages handed over by the subscription to their ACK: parks
/// those that must not reach the handler, settles the others
/// ([`settle_one`], [`settle_batch`]) and acknowledges what is settled, until
/// the consumer stops.
pub(super) async fn receive<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    messages: Vec<impl Incoming>,
    stopped: &mut watch::Receiver<bool>,
) {
    let (oversize, messages): (Vec<_>, Vec<_>) =
        messages.into_iter().partition(|m| m.oversize().is_some());
    for message in &oversize {
        if let Some(reason) = message.oversize() {
            park_message(shared, message, "oversize message parked", &reason, stopped).await;
        }
    }
    // Without an id, a redelivery cannot be told from a new message: applied,
    // each redelivery would apply it again.
    let (anonymous, messages): (Vec<_>, Vec<_>) = messages
        .into_iter()
        .partition(|m| dedup_source(m).is_none());
    for message in &anonymous {
        park_message(
            shared,
            message,
            "message without an id parked",
            NO_DEDUP_ID,
            stopped,
        )
        .await;
    }
    if messages.is_empty() {
        return;
    }
    let deliveries: Vec<Delivery> = messages.iter().map(to_delivery).collect();
    let _in_flight = shared.drain.begin();
    let _gauge = InFlightGauge::add(&shared.metrics, deliveries.len());
    let outcomes = if let [one] = deliveries.as_slice() {
        vec![settle_one(shared, one, stopped).await]
    } else {
        settle_batch(shared, &deliveries, stopped).await
    };
    count_outcomes(&shared.metrics, &deliveries, &outcomes);
    failpoint::hit("inbox.after_commit");
    // A delivery left unsettled because the consumer stopped is not acked:
    // the broker redelivers it after the unsubscribe. One left unsettled
    // while the consumer runs (neither recorded nor parked) would hold its
    // prefetch slot as long as its connection lives: that connection ends.
    let mut settled: Vec<(_, &Delivery)> = Vec::with_capacity(messages.len());
    for (pair, outcome) in messages.iter().zip(&deliveries).zip(&outcomes) {
        if outcome.is_some() {
            settled.push(pair);
        } else if !*stopped.borrow() {
            let (message, delivery) = pair;
            end_connection(
                shared,
                message,
                delivery,
                "it can be neither recorded nor parked",
            );
        }
    }
    acknowledge(shared, &settled).await;
}

/// Parks a message that must not reach the handler: one the client read
/// past in part for being over its size limits (see
/// [`Incoming::oversize`]), or one without an id to deduplicate it by
/// ([`NO_DEDUP_ID`]). `FAILED` with `reason` and what was kept of its headers
/// and payload, then acknowledged, so it leaves the queue and what follows it
/// flows. Transient database errors are tried again with backoff until the
/// consumer stops (then it stays unacked, for the broker to redeliver).
pub(super) async fn park_message<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    message: &impl Incoming,
    what: &'static str,
    reason: &str,
    stopped: &mut watch::Receiver<bool>,
) {
    let _in_flight = shared.drain.begin();
    let delivery = to_delivery(message);
    tracing::error!(event_id = delivery.event_id, reason, "{what}");
    let mut failures = 0u32;
    let outcome = loop {
        let error = match record_unapplied(
            &shared.inbox,
            &delivery,
            InboxState::Failed,
            1,
            reason,
            None,
        )
        .await
        {
            Ok(outcome) => break Some(outcome),
            Err(error) => error,
        };
        shared.metrics.add(ConsumerCounter::DbErrors, 1);
        shared.metrics.status.database_failed(&error);
        if error.is_permanent() {
            break park_unrecordable(shared, &delivery, &error, stopped).await;
        }
        tracing::warn!(%error, event_id = delivery.event_id, "message not parked yet");
        if !pause(shared, &mut failures, stopped).await {
            break None;
        }
    };
    if outcome.is_none() {
        if !*stopped.borrow() {
            end_connection(
                shared,
                message,
                &delivery,
                "it can be neither recorded nor parked",
            );
        }
        return;
    }
    count_outcomes(&shared.metrics, std::slice::from_ref(&delivery), &[outcome]);
    acknowledge(shared, &[(message, &delivery)]).await;
}
