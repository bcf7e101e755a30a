//! Where the event loop puts one subscription's messages ([`Sink`]): a
//! bounded channel and a byte budget, and for client acks a queue of its own
//! with the task that hands its messages out, so that a subscription without
//! room does not stop the event loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, Semaphore, mpsc};

use super::message::{Charge, Message};
use crate::codec::Frame;

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

impl Sink {
    /// A sink whose channel holds `capacity` messages and whose messages
    /// hold at most `budget_bytes` at once, with a queue of `queue_bytes`
    /// (client acks) or none; and the stream's receiving end.
    pub(crate) fn new(
        capacity: usize,
        budget_bytes: usize,
        queue_bytes: Option<usize>,
    ) -> (Sink, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(capacity);
        let total = u32::try_from(budget_bytes.max(1)).unwrap_or(u32::MAX);
        let mut sink = Sink {
            tx,
            budget: Arc::new(Semaphore::new(total as usize)),
            total,
            waiting: None,
        };
        if let Some(queue_bytes) = queue_bytes {
            let (tx, queue) = mpsc::unbounded_channel();
            let queued = Arc::new(Queued {
                bytes: AtomicUsize::new(0),
                cap: queue_bytes.max(1),
                freed: Notify::new(),
            });
            tokio::spawn(hand_out(queue, sink.clone(), queued.clone()));
            sink.waiting = Some(Waiting { tx, queued });
        }
        (sink, rx)
    }

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
