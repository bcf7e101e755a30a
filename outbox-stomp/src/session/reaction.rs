//! What the session tells the event loop to do: frames to write, callers to
//! answer, a message to deliver.

use crate::codec::Frame;
use crate::error::Error;

use super::ack::AckId;

/// The session's answer to a frame or a timer, for the event loop to carry
/// out: it writes `write` in order, answers each of `answers`, and hands
/// `deliver` to its subscription.
#[derive(Debug)]
#[must_use]
pub(crate) struct Reaction<T, S> {
    /// Frames to write now, in order.
    pub(crate) write: Vec<Frame>,
    /// Callers whose request completed or failed.
    pub(crate) answers: Vec<Answer<T>>,
    /// A message for one of the subscriptions.
    pub(crate) deliver: Option<Delivery<S>>,
    /// An ERROR that named no request arrived: the broker is likely to close
    /// the connection, and the close is then blamed on it.
    pub(crate) unsolicited_error: bool,
}

impl<T, S> Reaction<T, S> {
    /// Nothing to do.
    pub(crate) fn none() -> Reaction<T, S> {
        Reaction {
            write: Vec::new(),
            answers: Vec::new(),
            deliver: None,
            unsolicited_error: false,
        }
    }
}

/// A caller to answer.
#[derive(Debug)]
pub(crate) struct Answer<T> {
    /// Who waits.
    pub(crate) caller: T,
    /// What the request came to.
    pub(crate) result: Result<(), Error>,
    /// For a confirmed SUBSCRIBE, the subscription it created: if its
    /// caller has gone, the subscription ends
    /// ([`Session::caller_gone`](super::Session::caller_gone)).
    pub(crate) subscription: Option<String>,
}

impl<T> Answer<T> {
    pub(crate) fn ok(caller: T, subscription: Option<String>) -> Answer<T> {
        Answer {
            caller,
            result: Ok(()),
            subscription,
        }
    }

    pub(crate) fn failed(caller: T, error: Error) -> Answer<T> {
        Answer {
            caller,
            result: Err(error),
            subscription: None,
        }
    }
}

/// A MESSAGE for a known subscription.
#[derive(Debug)]
pub(crate) struct Delivery<S> {
    /// The subscription's id.
    pub(crate) subscription: String,
    /// Where its messages go.
    pub(crate) sink: S,
    /// How to acknowledge it on this connection.
    pub(crate) ack: AckId,
    /// The MESSAGE frame.
    pub(crate) frame: Frame,
}
