//! Subscriptions: the options ([`Subscribe`]), the stream ([`Subscription`])
//! and what it yields ([`Message`]).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use super::{Client, Request};
use crate::codec::{Command, Frame, Headers, Oversize};
use crate::error::Error;
use crate::session::AckId;

/// How a subscription acknowledges messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// The broker considers a message consumed once dispatched (at-most-once).
    Auto,
    /// ACK of one message acknowledges it and every earlier one.
    Client,
    /// ACK acknowledges exactly one message (what an inbox wants).
    ClientIndividual,
}

impl AckMode {
    /// The `ack` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::Auto => "auto",
            AckMode::Client => "client",
            AckMode::ClientIndividual => "client-individual",
        }
    }
}

/// Options of a subscription.
#[derive(Debug, Clone)]
pub struct Subscribe {
    destination: String,
    id: Option<String>,
    ack: AckMode,
    selector: Option<String>,
    prefetch: Option<u32>,
    durable_name: Option<String>,
    headers: Vec<(String, String)>,
    buffer: usize,
    buffer_bytes: usize,
    queue_bytes: usize,
}

/// The default [`Subscribe::buffer_bytes`]: 16 MiB.
pub const DEFAULT_BUFFER_BYTES: usize = 16 * 1024 * 1024;

/// The default [`Subscribe::queue_bytes`]: 64 MiB.
pub const DEFAULT_QUEUE_BYTES: usize = 64 * 1024 * 1024;

impl Subscribe {
    pub(crate) fn id_or(&self, generate: impl FnOnce() -> String) -> String {
        self.id.clone().unwrap_or_else(generate)
    }

    pub(crate) fn destination(&self) -> &str {
        &self.destination
    }

    pub(crate) fn capacity(&self) -> usize {
        self.buffer.max(1)
    }

    /// Bytes of delivered messages this subscription may hold at once (see
    /// [`Subscribe::buffer_bytes`]).
    pub fn byte_budget(&self) -> usize {
        self.buffer_bytes
    }

    /// The SUBSCRIBE frame for subscription `id` (without a receipt).
    pub(crate) fn frame(&self, id: &str) -> Frame {
        let mut frame =
            Frame::subscribe(self.destination.clone(), id.to_owned(), self.ack.as_str());
        if let Some(selector) = &self.selector {
            frame = frame.with_header("selector", selector.clone());
        }
        // With client acks the broker stops at the prefetch, so a buffer of the
        // same size never fills and the socket is always read.
        let prefetch = self.prefetch.or_else(|| {
            (self.ack != AckMode::Auto).then(|| u32::try_from(self.buffer).unwrap_or(u32::MAX))
        });
        if let Some(prefetch) = prefetch {
            frame = frame.with_header("activemq.prefetchSize", prefetch);
        }
        if let Some(name) = &self.durable_name {
            frame = frame
                .with_header("activemq.subscriptionName", name.clone())
                .with_header("durable-subscription-name", name.clone());
        }
        for (k, v) in &self.headers {
            frame = frame.with_header(k.clone(), v.clone());
        }
        frame
    }

    /// Subscribes to `destination` (`/queue/…` or `/topic/…`) with
    /// `client-individual` acks.
    pub fn new(destination: impl Into<String>) -> Subscribe {
        Subscribe {
            destination: destination.into(),
            id: None,
            ack: AckMode::ClientIndividual,
            selector: None,
            prefetch: None,
            durable_name: None,
            headers: Vec::new(),
            buffer: 256,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }

    /// The ack mode. `Auto` is at-most-once on ActiveMQ.
    pub fn ack(mut self, mode: AckMode) -> Subscribe {
        self.ack = mode;
        self
    }

    /// A fixed subscription id (default: generated).
    pub fn id(mut self, id: impl Into<String>) -> Subscribe {
        self.id = Some(id.into());
        self
    }

    /// A JMS selector, e.g. `type = 'user.created'`.
    pub fn selector(mut self, selector: impl Into<String>) -> Subscribe {
        self.selector = Some(selector.into());
        self
    }

    /// `activemq.prefetchSize`: how many unacknowledged messages the broker
    /// dispatches ahead. Also sizes the local buffer unless set otherwise.
    pub fn prefetch(mut self, n: u32) -> Subscribe {
        self.prefetch = Some(n);
        self.buffer = n.max(1) as usize;
        self
    }

    /// A durable topic subscription under `name` (needs a client id).
    pub fn durable(mut self, name: impl Into<String>) -> Subscribe {
        self.durable_name = Some(name.into());
        self
    }

    /// Any other SUBSCRIBE header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Subscribe {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Messages buffered locally (default 256; with client acks also the
    /// default prefetch). When an `auto` subscription's buffer is full the
    /// client stops reading the socket, which also delays receipts on this
    /// connection: read `auto` subscriptions promptly, or give them their own
    /// client.
    pub fn buffer(mut self, n: usize) -> Subscribe {
        self.buffer = n.max(1);
        self
    }

    /// Bytes of messages (body and headers) the subscription may hand out
    /// at once (default [`DEFAULT_BUFFER_BYTES`], 16 MiB; at most
    /// `u32::MAX`). A message counts from when it enters the stream until it
    /// is dropped, so messages taken from the stream and not yet
    /// acknowledged count too. A message larger than the whole budget waits
    /// until nothing else is held, then is delivered alone.
    ///
    /// What happens to messages that do not fit depends on the ack mode:
    ///
    /// - With `client` or `client-individual` acks, the client keeps reading
    ///   its connection and only this subscription's messages wait, in
    ///   arrival order, in a queue of the subscription: receipts, other
    ///   subscriptions and heart-beats of the same client go on. The broker
    ///   bounds that queue in messages (it sends a subscription at most its
    ///   prefetch, `activemq.prefetchSize`, [`prefetch`](Subscribe::prefetch),
    ///   by default the [`buffer`](Subscribe::buffer), of unacknowledged
    ///   messages); the client bounds it in bytes by
    ///   [`queue_bytes`](Subscribe::queue_bytes). Only when the queue too is
    ///   full (large messages, or a reader far behind) does the client stop
    ///   reading its connection until the queue has room, as with `auto`
    ///   acks below. A subscription thus holds at most about this budget
    ///   plus `queue_bytes` plus one message.
    /// - With `auto` acks the broker does not wait for acknowledgements, so
    ///   nothing but the client bounds them: the client stops reading its
    ///   connection until enough is dropped (backpressure, as with a full
    ///   buffer), and everything else on the client waits too. Do not share
    ///   a client between an `auto` subscription that may fall behind and
    ///   anything that waits for receipts (a publisher).
    pub fn buffer_bytes(mut self, bytes: usize) -> Subscribe {
        self.buffer_bytes = bytes.clamp(1, u32::MAX as usize);
        self
    }

    /// Bytes of messages that may wait in the subscription's own queue when
    /// its [`buffer_bytes`](Subscribe::buffer_bytes) are in use (client and
    /// client-individual acks; default [`DEFAULT_QUEUE_BYTES`], 64 MiB). While
    /// they fit, the client reads on and only this subscription waits; past
    /// them it stops reading its connection until the queue has room. A
    /// message larger than the whole queue is taken when the queue is empty.
    pub fn queue_bytes(mut self, bytes: usize) -> Subscribe {
        self.queue_bytes = bytes.max(1);
        self
    }

    /// Where the event loop puts this subscription's messages, and the
    /// stream's receiving end. With client acks, messages go through a queue
    /// and a task of their own that waits for room, so the event loop never
    /// waits for this subscription (see [`buffer_bytes`](Subscribe::buffer_bytes)).
    pub(crate) fn sink(&self) -> (Sink, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(self.capacity());
        let total = u32::try_from(self.buffer_bytes.max(1)).unwrap_or(u32::MAX);
        let mut sink = Sink {
            tx,
            budget: Arc::new(Semaphore::new(total as usize)),
            total,
            waiting: None,
        };
        if self.ack != AckMode::Auto {
            let (tx, queue) = mpsc::unbounded_channel();
            let queued = Arc::new(Queued {
                bytes: AtomicUsize::new(0),
                cap: self.queue_bytes.max(1),
                freed: Notify::new(),
            });
            tokio::spawn(hand_out(queue, sink.clone(), queued.clone()));
            sink.waiting = Some(Waiting { tx, queued });
        }
        (sink, rx)
    }
}

/// The bytes of messages in a subscription's queue (client acks): the event
/// loop adds a message's size when it queues it, the task that hands messages
/// out takes it off once the message is in the stream.
struct Queued {
    /// Bytes in the queue now.
    bytes: AtomicUsize,
    /// The most the queue takes, unless it is empty.
    cap: usize,
    /// Woken each time a message leaves the queue.
    freed: Notify,
}

impl Queued {
    /// True if `size` more bytes fit: within the cap, or into an empty
    /// queue (so a message larger than the cap is never refused for good).
    fn fits(&self, size: usize) -> bool {
        let now = self.bytes.load(Ordering::Acquire);
        now == 0 || now.saturating_add(size) <= self.cap
    }
}

/// The queue of a client-ack subscription and what it holds.
#[derive(Clone)]
struct Waiting {
    tx: mpsc::UnboundedSender<Message>,
    queued: Arc<Queued>,
}

/// What became of a message offered to a subscription's queue.
pub(crate) enum Queue {
    /// Queued: the task hands it out in order.
    Queued,
    /// The queue is full: wait for [`Sink::queue_room`], then offer it again.
    Full(Box<Message>),
    /// The subscription's stream is gone.
    Closed,
}

/// Hands the queued messages of a subscription to its stream in order, each
/// once it has its share of the budget and a place in the channel. Ends when
/// the stream is gone (its messages left unacknowledged go back to the
/// broker) or the subscription is forgotten.
async fn hand_out(mut queue: mpsc::UnboundedReceiver<Message>, sink: Sink, queued: Arc<Queued>) {
    while let Some(mut message) = queue.recv().await {
        let size = frame_bytes(&message.frame);
        let Ok((charge, slot)) = sink.room(&message).await else {
            return;
        };
        if charge.is_some() {
            message.charge = charge;
        }
        slot.send(message);
        queued.bytes.fetch_sub(size, Ordering::AcqRel);
        queued.freed.notify_one();
    }
}

/// A frame's body and headers in bytes.
fn frame_bytes(frame: &Frame) -> usize {
    let heads: usize = frame
        .headers()
        .iter()
        .map(|(name, value)| name.len() + value.len() + 2)
        .sum();
    frame.body().len().saturating_add(heads)
}

/// Where the event loop puts one subscription's messages: a bounded channel
/// (a count) and a byte budget. A message holds its share of the budget
/// until it is dropped.
#[derive(Clone)]
pub(crate) struct Sink {
    tx: mpsc::Sender<Message>,
    budget: Arc<Semaphore>,
    /// The whole budget in bytes.
    total: u32,
    /// With client acks: the queue of the task that hands messages out, so
    /// that a subscription without room does not stop the event loop.
    waiting: Option<Waiting>,
}

/// A delivered message's share of its subscription's byte budget.
pub(crate) type Charge = OwnedSemaphorePermit;

impl Sink {
    /// True once the stream is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// What `frame` costs of the budget: its body and headers, at most the
    /// whole budget.
    fn cost(&self, frame: &Frame) -> u32 {
        u32::try_from(frame_bytes(frame))
            .unwrap_or(u32::MAX)
            .min(self.total)
    }

    /// True for a subscription whose messages go through its own queue
    /// (client acks).
    pub(crate) fn is_queued(&self) -> bool {
        self.waiting.is_some()
    }

    /// Offers `message` to the subscription's queue (client acks; a sink
    /// without a queue answers [`Queue::Full`]).
    pub(crate) fn try_queue(&self, message: Message) -> Queue {
        let Some(waiting) = &self.waiting else {
            return Queue::Full(Box::new(message));
        };
        let size = frame_bytes(&message.frame);
        if !waiting.queued.fits(size) {
            return Queue::Full(Box::new(message));
        }
        waiting.queued.bytes.fetch_add(size, Ordering::AcqRel);
        if waiting.tx.send(message).is_err() || self.is_closed() {
            return Queue::Closed;
        }
        Queue::Queued
    }

    /// Waits until the subscription's queue takes `message`. `Err` once the
    /// stream is gone.
    pub(crate) async fn queue_room(&self, message: &Message) -> Result<(), ()> {
        let Some(waiting) = &self.waiting else {
            return Ok(());
        };
        let size = frame_bytes(&message.frame);
        // `notify_one` keeps a wake-up for a waiter still to come, so a
        // message leaving between the check and the wait is not missed.
        while !waiting.queued.fits(size) {
            tokio::select! {
                _ = waiting.queued.freed.notified() => {}
                _ = self.tx.closed() => return Err(()),
            }
        }
        Ok(())
    }

    /// `frame`'s share of the budget, if it is free now.
    pub(crate) fn try_charge(&self, frame: &Frame) -> Option<Charge> {
        self.budget
            .clone()
            .try_acquire_many_owned(self.cost(frame))
            .ok()
    }

    /// The channel's sending end.
    pub(crate) fn sender(&self) -> &mpsc::Sender<Message> {
        &self.tx
    }

    /// Waits until there is room for `message`: its share of the budget
    /// (unless it has it) and a place in the channel. `Err` once the stream
    /// is gone.
    pub(crate) async fn room(
        &self,
        message: &Message,
    ) -> Result<(Option<Charge>, mpsc::OwnedPermit<Message>), ()> {
        let charge = match message.charge {
            Some(_) => None,
            None => {
                let cost = self.cost(&message.frame);
                tokio::select! {
                    charge = self.budget.clone().acquire_many_owned(cost) => Some(charge.map_err(|_| ())?),
                    _ = self.tx.closed() => return Err(()),
                }
            }
        };
        let slot = self.tx.clone().reserve_owned().await.map_err(|_| ())?;
        Ok((charge, slot))
    }
}

/// A stream of [`Message`]s of one subscription. Ends when the client closes.
/// Dropping it unsubscribes.
pub struct Subscription {
    id: String,
    destination: String,
    rx: mpsc::Receiver<Message>,
    client: Client,
    active: bool,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("destination", &self.destination)
            .finish()
    }
}

impl Subscription {
    pub(crate) fn new(
        id: String,
        destination: String,
        rx: mpsc::Receiver<Message>,
        client: Client,
    ) -> Subscription {
        Subscription {
            id,
            destination,
            rx,
            client,
            active: true,
        }
    }

    /// The subscription id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The destination.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The next message, or `None` once the client closed.
    pub async fn next_message(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// A message that has already arrived, without waiting; `None` when none
    /// is waiting (or the client closed).
    pub fn try_next_message(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Ends the subscription (UNSUBSCRIBE is queued; it is not confirmed).
    pub async fn unsubscribe(mut self) -> Result<(), Error> {
        self.active = false;
        let deadline = self.client.deadline();
        self.client
            .submit(
                Request::Unsubscribe {
                    id: self.id.clone(),
                },
                deadline,
            )
            .await
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.active {
            self.client.try_submit(Request::Unsubscribe {
                id: self.id.clone(),
            });
        }
    }
}

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
