//! Acknowledging settled deliveries, and ending a connection whose
//! delivery can be neither acknowledged nor settled.

use std::time::Duration;

use crate::backend::Backend;
use crate::backoff::Backoff;
use crate::inbox::Delivery;
use crate::subscriber::Incoming;

use super::handler::Handler;
use super::metrics::ConsumerCounter;
use super::shared::Shared;

/// Further attempts at an ACK that failed on a live connection.
pub(super) const ACK_RETRIES: u32 = 3;

/// The pause before each further attempt at an ACK.
pub(super) const ACK_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(2),
};

/// Acknowledges settled deliveries; their ACKs, queued together, leave in
/// one write. An ACK that fails while the delivery's connection lives is
/// tried again ([`ack_again`]): ActiveMQ would hold the message, and its
/// prefetch slot, until that connection ends.
pub(super) async fn acknowledge<DB: Backend, H: Handler<DB>, M: Incoming>(
    shared: &Shared<DB, H>,
    settled: &[(&M, &Delivery)],
) {
    let acks = futures_util::future::join_all(settled.iter().map(|(m, _)| m.ack())).await;
    let again = acks.into_iter().zip(settled).filter_map(|(acked, (m, d))| {
        acked.err().map(|error| {
            // The broker may redeliver it: retention waits for a fresh
            // drain before it may delete its inbox row.
            shared.drain.reset();
            ack_again(shared, *m, d, error)
        })
    });
    futures_util::future::join_all(again).await;
}

/// Tries a failed ACK again, with backoff, while the message's connection
/// lives; if it still fails, ends that connection, so the broker delivers
/// the message again and its inbox row settles it. Once the connection has
/// ended on its own, the broker redelivers it anyway.
pub(super) async fn ack_again<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    message: &impl Incoming,
    delivery: &Delivery,
    error: String,
) {
    let metrics = &shared.metrics;
    if !message.on_live_connection() {
        tracing::debug!(%error, event_id = delivery.event_id, "ack failed with its connection; the broker delivers it again");
        return;
    }
    metrics.add(ConsumerCounter::AckFailures, 1);
    tracing::warn!(%error, event_id = delivery.event_id, "ack failed on a live connection; trying again");
    metrics
        .status
        .broker_failed(format_args!("acknowledging {}: {error}", delivery.event_id));
    let mut last = error;
    for attempt in 0..ACK_RETRIES {
        tokio::time::sleep(ACK_BACKOFF.delay(attempt)).await;
        if !message.on_live_connection() {
            return;
        }
        match message.ack_again().await {
            Ok(()) => {
                metrics.status.succeeded();
                return;
            }
            Err(error) => last = error,
        }
    }
    if message.on_live_connection() {
        let reason = format!("its ACK failed {} times: {last}", ACK_RETRIES + 1);
        end_connection(shared, message, delivery, &reason);
    }
}

/// Ends the connection `message` came on, so that the broker delivers it
/// again rather than hold it, and its prefetch slot, for as long as the
/// connection lives.
pub(super) fn end_connection<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    message: &impl Incoming,
    delivery: &Delivery,
    why: &str,
) {
    if !message.on_live_connection() {
        return;
    }
    let reason = format!("delivery {} left unacknowledged: {why}", delivery.event_id);
    tracing::error!(
        event_id = delivery.event_id,
        why,
        "ending the broker connection so that the delivery comes again"
    );
    shared.metrics.add(ConsumerCounter::ConnectionsEnded, 1);
    shared.metrics.status.broker_failed(&reason);
    message.end_connection(&reason);
}
