//! STOMP transactions: BEGIN, SENDs and ACKs, then COMMIT or ABORT with a receipt.

use std::fmt;
use std::sync::Mutex;

use super::{Client, Message, Request, into_send};
use crate::codec::{Command, Frame};
use crate::error::Error;

/// A STOMP transaction. Dropping it without commit aborts it.
///
/// Its latest SEND is held back until the next frame of the transaction or
/// the commit: [`Transaction::commit`] writes it with a receipt and writes
/// the COMMIT only once the broker confirmed it, that is once the broker
/// has every frame of the transaction. So the COMMIT never waits in a
/// buffer behind the transaction's own messages, and a commit whose caller
/// gave up before then (its deadline passed, its future dropped) is never
/// written at all: the transaction is aborted instead.
pub struct Transaction {
    pub(crate) client: Client,
    pub(crate) id: String,
    pub(crate) epoch: u64,
    pub(crate) finished: bool,
    /// The latest SEND, not yet handed to the connection.
    pub(crate) held: Mutex<Option<Frame>>,
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
    ///
    /// The SEND is held back until the next frame of the transaction (see
    /// [`Transaction`]); an error of the connection may therefore show at
    /// the next call, and means the same: the transaction cannot commit.
    pub async fn send(&self, message: impl Into<Frame>) -> Result<(), Error> {
        let mut frame = into_send(message.into());
        frame.headers_mut().set("transaction", self.id.clone());
        self.client.encodable(&frame)?;
        match self.hold(Some(frame)) {
            Some(previous) => self.client.queue(previous, self.epoch, "transaction").await,
            None => Ok(()),
        }
    }

    /// Queues an ACK of `message` in this transaction (after the SEND held
    /// back, if any, so the frames keep their order).
    pub async fn ack(&self, message: &Message) -> Result<(), Error> {
        if message.epoch != self.epoch {
            return Err(Error::Stale("delivery"));
        }
        if let Some(previous) = self.hold(None) {
            self.client
                .queue(previous, self.epoch, "transaction")
                .await?;
        }
        let frame = message.ack.frame(Command::Ack, Some(&self.id));
        self.client.queue(frame, self.epoch, "transaction").await
    }

    /// COMMIT with a receipt: `Ok` means the broker applied the whole
    /// transaction. The SEND held back goes first, with a receipt of its
    /// own; the COMMIT is written only after the broker confirmed it. If
    /// that fails, or the caller gives up before the COMMIT is written, the
    /// transaction is aborted and nothing of it is delivered. An error after
    /// the COMMIT was written leaves the outcome unknown.
    pub async fn commit(self) -> Result<(), Error> {
        if let Some(last) = self.hold(None) {
            // On an error `self` is dropped unfinished: an ABORT is queued.
            self.client
                .request(last, Some(self.epoch), "transaction")
                .await?;
        }
        self.finish(Frame::commit).await
    }

    /// ABORT with a receipt. The SEND held back is never written.
    pub async fn abort(self) -> Result<(), Error> {
        self.hold(None);
        self.finish(Frame::abort).await
    }

    /// Puts `frame` in the place of the held-back SEND; returns what was there.
    fn hold(&self, frame: Option<Frame>) -> Option<Frame> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *held, frame)
    }

    /// Ends the transaction with COMMIT or ABORT, waiting for the receipt.
    ///
    /// ActiveMQ forgets the STOMP id of a transaction as soon as it takes
    /// its COMMIT. A COMMIT it then refuses (a transaction marked rollback
    /// only, after it refused one of its SENDs for want of room) leaves the
    /// transaction open on the broker, holding the memory of the messages it
    /// did take, and no ABORT can name it any more: only the end of the
    /// connection discards it. So a refused COMMIT ends its connection (the
    /// client reconnects as after a loss); otherwise such transactions pile
    /// up and keep a full destination full for good.
    async fn finish(mut self, end: fn(String) -> Frame) -> Result<(), Error> {
        self.finished = true;
        let frame = end(self.id.clone());
        let commit = frame.command() == Command::Commit;
        let result = self
            .client
            .request(frame, Some(self.epoch), "transaction")
            .await;
        if commit && let Err(Error::Rejected(refusal)) = &result {
            self.client.end_connection(
                self.epoch,
                format!(
                    "the broker refused the COMMIT of {} ({refusal}); \
                     its transaction stays open there until the connection ends",
                    self.id
                ),
            );
        }
        result
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
