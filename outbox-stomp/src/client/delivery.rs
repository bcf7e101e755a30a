//! Handing a delivered message to its subscription without waiting: it is
//! taken, or its subscription has no room for it now (the event loop then
//! holds it as [`Blocked`] and stops reading the socket until there is room),
//! or the subscription's stream is gone.

use tokio::sync::mpsc;

use super::Client;
use super::message::{Charge, Message};
use super::sink::{Queue, Sink};
use crate::session::Delivery;

/// What became of a delivered message.
pub(crate) enum Offer {
    /// Its subscription took it.
    Taken,
    /// Its subscription has no room for it now.
    Blocked(Box<Blocked>),
    /// The stream of this subscription is gone.
    StreamGone(String),
}

/// A delivered message its subscription has no room for yet.
pub(crate) struct Blocked {
    sink: Sink,
    message: Message,
}

/// Room for a blocked message.
pub(crate) enum Room {
    /// In its subscription's queue (client acks): offer it again.
    Queue,
    /// In its subscription's stream: its share of the byte budget and a
    /// place in the channel.
    Stream(Option<Charge>, mpsc::OwnedPermit<Message>),
}

/// Offers `delivery` (of connection `epoch`, acknowledged through `client`)
/// to its subscription.
pub(crate) fn offer(delivery: Delivery<Sink>, client: Client, epoch: u64) -> Offer {
    let Delivery {
        subscription,
        sink,
        ack,
        frame,
    } = delivery;
    // Queued messages are charged in order by the task that hands them out,
    // so a later one never takes the budget an earlier one waits for.
    let charge = match sink.is_queued() {
        true => None,
        false => sink.try_charge(&frame),
    };
    let message = Message {
        ack,
        charge,
        frame,
        epoch,
        client,
    };
    if sink.is_queued() {
        // The broker bounds these by the prefetch and the queue by bytes:
        // the socket is read on, and only this subscription waits, until its
        // queue too is full.
        return match sink.try_queue(message) {
            Queue::Queued => Offer::Taken,
            Queue::Full(message) => Offer::Blocked(Box::new(Blocked {
                sink,
                message: *message,
            })),
            Queue::Closed => Offer::StreamGone(subscription),
        };
    }
    if message.charge.is_none() && !sink.is_closed() {
        // Over the byte budget: stop reading until enough is dropped.
        return Offer::Blocked(Box::new(Blocked { sink, message }));
    }
    match sink.sender().try_send(message) {
        Ok(()) => Offer::Taken,
        Err(mpsc::error::TrySendError::Full(message)) => {
            Offer::Blocked(Box::new(Blocked { sink, message }))
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Offer::StreamGone(subscription),
    }
}

impl Blocked {
    /// Places the message in the `room` that was found; a queue that filled
    /// again meanwhile leaves it blocked.
    pub(crate) fn place(self, room: Room) -> Option<Blocked> {
        let Blocked { sink, mut message } = self;
        match room {
            Room::Queue => match sink.try_queue(message) {
                Queue::Full(message) => Some(Blocked {
                    sink,
                    message: *message,
                }),
                Queue::Queued | Queue::Closed => None,
            },
            Room::Stream(charge, slot) => {
                if charge.is_some() {
                    message.charge = charge;
                }
                slot.send(message);
                None
            }
        }
    }
}

/// Waits for room for the blocked message, if any (else for ever): in its
/// subscription's queue where it has one, else its share of the byte budget
/// and a place in its subscription's channel. `Err` once its stream is gone.
pub(crate) async fn room(blocked: &Option<Blocked>) -> Result<Room, ()> {
    match blocked {
        Some(Blocked { sink, message }) if sink.is_queued() => {
            sink.queue_room(message).await?;
            Ok(Room::Queue)
        }
        Some(Blocked { sink, message }) => {
            let (charge, slot) = sink.room(message).await?;
            Ok(Room::Stream(charge, slot))
        }
        None => std::future::pending().await,
    }
}
