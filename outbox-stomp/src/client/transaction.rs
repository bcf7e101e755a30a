//! STOMP transactions: BEGIN, SENDs and ACKs, then COMMIT or ABORT with a receipt.

use std::fmt;

use super::{Client, Message, Request, into_send};
use crate::codec::{Command, Frame};
use crate::error::Error;

/// A STOMP transaction. Dropping it without commit aborts it.
pub struct Transaction {
    pub(crate) client: Client,
    pub(crate) id: String,
    pub(crate) epoch: u64,
    pub(crate) finished: bool,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("id", &self.id)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Transaction {
    /// The transaction id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Queues a SEND in this transaction. Nothing is delivered before
    /// [`Transaction::commit`] returns `Ok`. A message the connection's
    /// version cannot carry fails here with [`Error::Unencodable`] and is not
    /// queued; the transaction stays open.
    pub async fn send(&self, message: impl Into<Frame>) -> Result<(), Error> {
        let mut frame = into_send(message.into());
        frame.headers_mut().set("transaction", self.id.clone());
        self.client.encodable(&frame)?;
        self.client.queue(frame, self.epoch, "transaction").await
    }

    /// Queues an ACK of `message` in this transaction.
    pub async fn ack(&self, message: &Message) -> Result<(), Error> {
        if message.epoch != self.epoch {
            return Err(Error::Stale("delivery"));
        }
        let frame = message.ack.frame(Command::Ack, Some(&self.id));
        self.client.queue(frame, self.epoch, "transaction").await
    }

    /// COMMIT with a receipt: `Ok` means the broker applied the whole transaction.
    pub async fn commit(self) -> Result<(), Error> {
        self.finish(Frame::commit).await
    }

    /// ABORT with a receipt.
    pub async fn abort(self) -> Result<(), Error> {
        self.finish(Frame::abort).await
    }

    /// Ends the transaction with COMMIT or ABORT, waiting for the receipt.
    async fn finish(mut self, end: fn(String) -> Frame) -> Result<(), Error> {
        self.finished = true;
        let frame = end(self.id.clone());
        self.client
            .request(frame, Some(self.epoch), "transaction")
            .await
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if !self.finished {
            self.client.try_submit(Request::Queued {
                frame: Frame::abort(self.id.clone()),
                epoch: self.epoch,
                what: "transaction",
            });
        }
    }
}
