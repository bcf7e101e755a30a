//! The broker as the relay and the inbox see it, and its STOMP implementation.
//!
//! The relay needs one thing: publish a batch and learn whether the broker
//! confirmed all of it ([`Publisher`]). [`StompPublisher`] does that with one
//! STOMP transaction per batch — `BEGIN`, a persistent `SEND` per event,
//! `COMMIT` with a receipt — so a batch is delivered whole or not at all.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

#[cfg(test)]
use bytes::Bytes;
use outbox_stomp::{Client, Outgoing};

use crate::error::PublishError;
use crate::event::{JSON, OutboxMessage};
use crate::subscriber::LinkStatus;

/// Publishes batches of outbox messages.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `batch` in order. `Ok` only when the broker confirmed every
    /// message; then the relay marks them published.
    fn publish(
        &self,
        batch: &[OutboxMessage],
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// The longest one [`publish`](Publisher::publish) can take before it
    /// fails, if the publisher knows it. The relay's lease must be longer
    /// (checked by [`Outbox::relay`](crate::Outbox::relay)), or another relay
    /// could take rows that are still on their way. The default: unknown,
    /// which turns that check off; a publisher that wraps another should
    /// forward it.
    fn max_publish_time(&self) -> Option<Duration> {
        None
    }

    /// The connection behind the publisher, if it has one the relay's
    /// [`Health`](crate::observe::Health) can report on. The default: none, so
    /// the health follows the outcome of the last publish.
    fn link(&self) -> Option<Arc<dyn LinkStatus>> {
        None
    }
}

/// Publishes through an [`outbox_stomp::Client`]: one STOMP transaction per batch
/// (a batch of one is a plain `SEND` with a receipt).
///
/// Every message is `persistent:true` and carries `content-type`, `event-id`,
/// `event-type` (and the same as `type`, which ActiveMQ maps to `JMSType`),
/// `event-time` (the append time, milliseconds since the Unix epoch),
/// the extra headers of its event, and — when the event has a
/// key — `event-key` and `JMSXGroupID`. JSON and text payloads go as
/// ActiveMQ TextMessages (`amq-msg-type:text`) so JMS consumers read them as text.
#[derive(Debug, Clone)]
pub struct StompPublisher {
    client: Client,
}

impl StompPublisher {
    /// Publishes through `client`.
    pub fn new(client: Client) -> StompPublisher {
        StompPublisher { client }
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The STOMP message for one outbox row.
pub(crate) fn message_for(m: &OutboxMessage) -> Outgoing {
    let mut out = Outgoing::new(m.destination.clone(), m.content.clone())
        .persistent(true)
        .content_type(m.content_type.clone())
        .header("event-id", m.event_id.clone())
        .header("event-type", m.event_type.clone())
        .header("event-time", m.create_time.to_string())
        // ActiveMQ maps `type` to JMSType, which JMS selectors can name
        // (`JMSType = 'user.created'`); hyphenated property names they cannot.
        .message_type(m.event_type.clone());
    if m.content_type.starts_with(JSON) || m.content_type.starts_with("text/") {
        out = out.text();
    }
    if let Some(key) = &m.key {
        out = out.header("event-key", key.clone()).group_id(key.clone());
    }
    for (name, value) in &m.headers {
        out = out.header(name.clone(), value.clone());
    }
    out
}

impl Publisher for StompPublisher {
    /// Twice the client's [`Client::max_wait`] (about twice the receipt
    /// timeout): a batch's BEGIN waits at most that long to reach a live
    /// connection, its COMMIT at most that long for the broker's receipt.
    /// [`publish`](Publisher::publish) gives up at this bound whatever is
    /// still pending, and a COMMIT not yet written by then never is.
    fn max_publish_time(&self) -> Option<Duration> {
        Some(self.client.max_wait().saturating_mul(2))
    }

    fn link(&self) -> Option<Arc<dyn LinkStatus>> {
        Some(Arc::new(self.client.clone()))
    }

    /// Publishes the batch, all of it within [`max_publish_time`]
    /// (`Publisher::max_publish_time`), however many SENDs it takes: each
    /// SEND has a deadline of its own, and a batch on a slow link could
    /// otherwise outlast its claim's lease, letting another relay publish it
    /// too. Past the bound the batch fails as unavailable and its
    /// transaction is aborted: the client writes the COMMIT only after the
    /// broker confirmed the batch's last SEND and only while this call still
    /// waits ([`outbox_stomp::Transaction`]), so a batch given up before its
    /// COMMIT was written is never delivered. Only a COMMIT written in time
    /// whose receipt came too late leaves the outcome unknown.
    ///
    /// [`max_publish_time`]: Publisher::max_publish_time
    async fn publish(&self, batch: &[OutboxMessage]) -> Result<(), PublishError> {
        let limit = self.client.max_wait().saturating_mul(2);
        match tokio::time::timeout(limit, self.publish_unbounded(batch)).await {
            Ok(published) => published,
            Err(_) => Err(PublishError::unavailable(format!(
                "a batch of {} rows was not confirmed within {limit:?}; outcome unknown",
                batch.len()
            ))),
        }
    }
}

impl StompPublisher {
    /// [`Publisher::publish`] without its overall bound: a transaction, even
    /// for a single row. A lone SEND would be delivered once written, and a
    /// large one on a slow link is still being written when its receipt
    /// times out: the publish is given up, the row released, and the SEND
    /// delivered after all, again at every attempt. In a transaction the
    /// COMMIT is written only once the SEND is confirmed and the call still
    /// waits.
    async fn publish_unbounded(&self, batch: &[OutboxMessage]) -> Result<(), PublishError> {
        let classify = |error| classify(&self.client, error);
        let tx = self.client.begin().await.map_err(classify)?;
        for m in batch {
            tx.send(message_for(m)).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }
}

/// Sorts a client error into "the broker refused" (or the message cannot be
/// written at all), "the broker was not there" and "the client stopped for
/// good".
fn classify(client: &Client, error: outbox_stomp::Error) -> PublishError {
    use outbox_stomp::Error as E;
    match &error {
        // A broker out of room refuses every row alike, for a while: an
        // outage, which charges no row an attempt, not a rejection.
        E::Rejected(b) | E::Broker(b) if b.is_out_of_room() => {
            PublishError::unavailable(error.to_string())
        }
        // A destination the broker's authorisation map does not let the
        // relay's user write to: no row's fault, and it passes once the
        // map allows it; the relay defers that destination.
        E::Rejected(b) | E::Broker(b) if b.is_not_authorized() => {
            PublishError::unauthorized(error.to_string())
        }
        // A message the connection's version cannot carry is that row's
        // fault, as a broker's refusal is.
        E::Rejected(_) | E::Broker(_) | E::Unencodable(_) => {
            PublishError::rejected(error.to_string())
        }
        E::Closed => PublishError::closed(
            client
                .close_reason()
                .unwrap_or_else(|| "the STOMP client was closed".to_owned()),
        ),
        _ => PublishError::unavailable(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyed_message_carries_the_key_as_group_and_all_outbox_headers() {
        let m = OutboxMessage {
            id: 1,
            event_id: "e1".into(),
            event_type: "user.created".into(),
            destination: "/topic/VirtualTopic.user.created".into(),
            key: Some("user-7".into()),
            headers: vec![("tenant".into(), "acme".into())],
            content: Bytes::from_static(b"{}"),
            content_type: JSON.into(),
            attempts: 0,
            create_time: 1_700_000_000_123,
        };
        let frame = message_for(&m).into_frame();
        let h = frame.headers();
        assert_eq!(
            h.get("destination"),
            Some("/topic/VirtualTopic.user.created")
        );
        assert_eq!(h.get("persistent"), Some("true"));
        assert_eq!(h.get("JMSXGroupID"), Some("user-7"));
        assert_eq!(h.get("event-key"), Some("user-7"));
        assert_eq!(h.get("event-id"), Some("e1"));
        assert_eq!(h.get("event-type"), Some("user.created"));
        assert_eq!(h.get("type"), Some("user.created"), "JMSType");
        assert_eq!(h.get("content-type"), Some(JSON));
        assert_eq!(h.get("amq-msg-type"), Some("text"));
        assert_eq!(h.get("tenant"), Some("acme"));
        assert_eq!(h.get("event-time"), Some("1700000000123"));
    }

    #[test]
    fn binary_payloads_stay_bytes_messages_and_unkeyed_ones_have_no_group() {
        let m = OutboxMessage {
            id: 1,
            event_id: "e1".into(),
            event_type: "blob".into(),
            destination: "/queue/x".into(),
            key: None,
            headers: vec![],
            content: Bytes::from_static(&[0, 1]),
            content_type: "application/octet-stream".into(),
            attempts: 0,
            create_time: 0,
        };
        let frame = message_for(&m).into_frame();
        assert_eq!(frame.headers().get("amq-msg-type"), None);
        assert_eq!(frame.headers().get("JMSXGroupID"), None);
    }
}
