//! Subscriptions: the options ([`Subscribe`]) and the stream
//! ([`Subscription`]) of [`Message`]s.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc;

use super::message::Message;
use super::sink::Sink;
use super::{Client, Request};
use crate::codec::Frame;
use crate::error::Error;

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
        let queue_bytes = (self.ack != AckMode::Auto).then_some(self.queue_bytes);
        Sink::new(self.capacity(), self.buffer_bytes, queue_bytes)
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
