//! The broker as the relay and the inbox see it, and its STOMP implementation.
//!
//! The relay needs one thing: publish a batch and learn whether the broker
//! confirmed all of it ([`Publisher`]). [`StompPublisher`] does that with one
//! STOMP transaction per batch — `BEGIN`, a persistent `SEND` per event,
//! `COMMIT` with a receipt — so a batch is delivered whole or not at all.

use std::future::Future;

use outbox_stomp::{Client, Outgoing};

use crate::error::PublishError;
use crate::event::{JSON, OutboxMessage};

/// Publishes batches of outbox messages.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `batch` in order. `Ok` only when the broker confirmed every
    /// message; then the relay marks them published.
    fn publish(
        &self,
        batch: &[OutboxMessage],
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Publishes through an [`outbox_stomp::Client`]: one STOMP transaction per batch.
///
/// Every message is `persistent:true` and carries `content-type`, `event-id`,
/// `event-type`, the extra headers of its event, and — when the event has a
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
pub fn message_for(m: &OutboxMessage) -> Outgoing {
    let mut out = Outgoing::new(m.destination.clone(), m.content.clone())
        .persistent(true)
        .content_type(m.content_type.clone())
        .header("event-id", m.event_id.clone())
        .header("event-type", m.event_type.clone());
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
    async fn publish(&self, batch: &[OutboxMessage]) -> Result<(), PublishError> {
        let tx = self.client.begin().await.map_err(classify)?;
        for m in batch {
            tx.send(message_for(m)).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }
}

/// Sorts a client error into "the broker refused" and "the broker was not there".
fn classify(error: outbox_stomp::Error) -> PublishError {
    use outbox_stomp::Error as E;
    match &error {
        E::Rejected(_) | E::Broker(_) => PublishError::rejected(error.to_string()),
        _ => PublishError::unavailable(error.to_string()),
    }
}
