//! The broker as the consumer sees it, and its STOMP implementation: the
//! mirror of [`Publisher`](crate::relay::Publisher) on the relay's side.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use outbox_stomp::{Client, Message, Subscription};

/// A stream of messages from one queue, each acknowledged on its own.
///
/// [`Consumer::spawn`](crate::Consumer::spawn) subscribes over STOMP
/// ([`StompSubscriber`]); [`Consumer::spawn_on`](crate::Consumer::spawn_on)
/// takes any implementation, which lets the consumer's logic be tested with
/// scripted messages.
pub trait Subscriber: Send + 'static {
    /// One message.
    type Message: Incoming;

    /// The next message; `None` once the stream has ended for good.
    fn next_message(&mut self) -> impl Future<Output = Option<Self::Message>> + Send;

    /// A message already waiting, without waiting for one.
    fn try_next_message(&mut self) -> Option<Self::Message>;

    /// The state of the connection behind the stream, readable while the
    /// stream itself is being read elsewhere.
    fn status(&self) -> Arc<dyn LinkStatus>;

    /// Ends the subscription, so messages not yet handed out go back to the
    /// queue.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// The state of a [`Subscriber`]'s connection.
pub trait LinkStatus: Send + Sync + 'static {
    /// `true` while the broker can deliver (false while reconnecting).
    fn is_connected(&self) -> bool;

    /// Why the stream ended, once it has.
    fn end_reason(&self) -> String;
}

/// A message from a [`Subscriber`].
pub trait Incoming: Send + Sync + 'static {
    /// The first header named `name`.
    fn header(&self, name: &str) -> Option<&str>;

    /// Every header, in order.
    fn headers(&self) -> Vec<(String, String)>;

    /// The broker's id of the message, if it has one.
    fn message_id(&self) -> Option<&str>;

    /// The payload.
    fn body(&self) -> Bytes;

    /// What is missing, when the message was over the size limits of the
    /// connection it came on (its body or some of its headers were read past,
    /// not kept); the consumer then parks it with this reason and
    /// acknowledges it. The default says it never is.
    fn oversize(&self) -> Option<String> {
        None
    }

    /// Acknowledges the message. After an error the message may still be
    /// held for this consumer: while [`on_live_connection`] says so, the
    /// consumer tries [`ack_again`], then [`end_connection`].
    ///
    /// [`on_live_connection`]: Incoming::on_live_connection
    /// [`ack_again`]: Incoming::ack_again
    /// [`end_connection`]: Incoming::end_connection
    fn ack(&self) -> impl Future<Output = Result<(), String>> + Send;

    /// Acknowledges the message again after [`ack`](Incoming::ack) failed,
    /// and waits for the broker's answer: `Ok` also when the broker no longer
    /// holds the delivery (an earlier attempt got through). The default is
    /// `ack`.
    fn ack_again(&self) -> impl Future<Output = Result<(), String>> + Send {
        self.ack()
    }

    /// True while the connection the message came on is up: until it ends,
    /// the broker keeps an unacknowledged message for this consumer (and
    /// counts it against the prefetch). Once it has ended, the broker
    /// delivers the message again. The default says it always is.
    fn on_live_connection(&self) -> bool {
        true
    }

    /// Ends the connection the message came on, so that the broker delivers
    /// it again, to the next connection: for a message that cannot be
    /// acknowledged or settled while that connection lives. The default does
    /// nothing.
    fn end_connection(&self, reason: &str) {
        let _ = reason;
    }
}

/// A STOMP subscription with `client-individual` acknowledgements.
#[derive(Debug)]
pub struct StompSubscriber {
    client: Client,
    subscription: Subscription,
}

impl StompSubscriber {
    /// Reads `subscription`, which `client` opened with `client-individual`
    /// acknowledgements ([`Consumer::spawn`](crate::Consumer::spawn) does).
    pub(crate) fn new(client: Client, subscription: Subscription) -> StompSubscriber {
        StompSubscriber {
            client,
            subscription,
        }
    }
}

impl Subscriber for StompSubscriber {
    type Message = Message;

    async fn next_message(&mut self) -> Option<Message> {
        self.subscription.next_message().await
    }

    fn try_next_message(&mut self) -> Option<Message> {
        self.subscription.try_next_message()
    }

    fn status(&self) -> Arc<dyn LinkStatus> {
        Arc::new(self.client.clone())
    }

    async fn close(self) {
        if let Err(error) = self.subscription.unsubscribe().await {
            tracing::debug!(%error, "unsubscribe on shutdown failed");
        }
    }
}

impl LinkStatus for Client {
    fn is_connected(&self) -> bool {
        Client::is_connected(self)
    }

    fn end_reason(&self) -> String {
        match self.close_reason() {
            Some(reason) => reason,
            None if self.is_closed() => "the STOMP client was closed".to_owned(),
            None => "the broker refused to restore the subscription".to_owned(),
        }
    }
}

impl Incoming for Message {
    fn header(&self, name: &str) -> Option<&str> {
        Message::header(self, name)
    }

    fn headers(&self) -> Vec<(String, String)> {
        Message::headers(self)
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn message_id(&self) -> Option<&str> {
        Message::message_id(self)
    }

    fn body(&self) -> Bytes {
        Message::body(self).clone()
    }

    fn oversize(&self) -> Option<String> {
        Message::oversize(self).map(ToString::to_string)
    }

    async fn ack(&self) -> Result<(), String> {
        Message::ack(self).await.map_err(|e| e.to_string())
    }

    async fn ack_again(&self) -> Result<(), String> {
        match Message::ack_confirmed(self).await {
            // ActiveMQ refuses an ACK for a delivery it no longer holds
            // ("Unexpected ACK"): the first ACK got through after all.
            Ok(()) | Err(outbox_stomp::Error::Rejected(_)) => Ok(()),
            Err(error) => Err(error.to_string()),
        }
    }

    fn on_live_connection(&self) -> bool {
        Message::on_live_connection(self)
    }

    fn end_connection(&self, reason: &str) {
        Message::end_connection(self, reason);
    }
}
