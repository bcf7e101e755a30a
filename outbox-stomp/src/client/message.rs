//! What a subscription yields: a delivered [`Message`], and its ACK and NACK.

use std::fmt;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use super::Client;
use crate::codec::{Command, Frame, Headers, Oversize};
use crate::error::Error;
use crate::session::AckId;

/// A delivered message's share of its subscription's byte budget.
pub(crate) type Charge = OwnedSemaphorePermit;

/// A delivered message.
pub struct Message {
    pub(crate) frame: Frame,
    pub(crate) ack: AckId,
    pub(crate) epoch: u64,
    pub(crate) client: Client,
    /// Its share of the subscription's byte budget, given back on drop.
    pub(crate) charge: Option<Charge>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("frame", &self.frame)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Message {
    /// The MESSAGE frame.
    pub fn frame(&self) -> &Frame {
        &self.frame
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        self.frame.headers()
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.frame.header(name)
    }

    /// The body (empty when the message was over the client's size limit;
    /// see [`oversize`](Message::oversize)).
    pub fn body(&self) -> &Bytes {
        self.frame.body()
    }

    /// Set when the message was over the client's [`Limits`](crate::Limits):
    /// the client read past what was over them without buffering it (a body
    /// over `max_body`, header lines over `max_line_length` or past
    /// `max_headers`), so the message comes without it but with the headers
    /// it is settled by. Acknowledge it to take it off the queue.
    pub fn oversize(&self) -> Option<&Oversize> {
        self.frame.oversize()
    }

    /// `destination` header.
    pub fn destination(&self) -> Option<&str> {
        self.frame.header("destination")
    }

    /// `message-id` header.
    pub fn message_id(&self) -> Option<&str> {
        self.frame.header("message-id")
    }

    /// True if ActiveMQ marked it as a redelivery.
    pub fn redelivered(&self) -> bool {
        self.frame.header("redelivered") == Some("true")
    }

    /// The connection epoch it arrived on.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// True while the connection the message arrived on is up: until it
    /// ends, the broker holds the message for this subscription unless it is
    /// acknowledged.
    pub fn on_live_connection(&self) -> bool {
        self.client.epoch() == self.epoch && self.client.is_connected()
    }

    /// Ends the connection the message arrived on, if it is still up, so
    /// that the broker delivers it again (with every other unacknowledged
    /// message of that connection): see [`Client::end_connection`].
    pub fn end_connection(&self, reason: impl Into<String>) {
        self.client.end_connection(self.epoch, reason);
    }

    /// Acknowledges the message (ACK, written without a receipt). After a
    /// reconnect this fails with [`Error::Stale`]: the broker redelivers it.
    pub async fn ack(&self) -> Result<(), Error> {
        let frame = self.ack.frame(Command::Ack, None);
        self.client
            .written(frame, Some(self.epoch), "delivery")
            .await
    }

    /// Acknowledges and waits for the broker's receipt.
    pub async fn ack_confirmed(&self) -> Result<(), Error> {
        let frame = self.ack.frame(Command::Ack, None);
        self.client
            .request(frame, Some(self.epoch), "delivery")
            .await
    }

    /// Rejects the message. **On ActiveMQ a NACK sends the message to its
    /// dead-letter queue at once** (no redelivery): do not use it for retries.
    pub async fn nack(&self) -> Result<(), Error> {
        let frame = self.ack.frame(Command::Nack, None);
        self.client
            .request(frame, Some(self.epoch), "delivery")
            .await
    }

    /// Takes the frame out.
    pub fn into_frame(self) -> Frame {
        self.frame
    }
}
