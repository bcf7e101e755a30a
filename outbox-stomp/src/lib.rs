//! STOMP 1.0–1.2 for Apache ActiveMQ: a codec and an async client.
//!
//! Data flows through three layers, each usable on its own:
//!
//! - [`codec`]: the wire format, bytes ⇄ [`Frame`], with no sockets
//!   (a `tokio_util` `Decoder`/`Encoder`: bounded, zero-copy, version-aware escaping);
//! - `session` (internal): the protocol rules as a state machine without IO —
//!   receipts, subscriptions, ack ids, heart-beat deadlines, the blame for a
//!   connection's end; it takes a frame and the time and returns what to
//!   write, whom to answer and what to deliver;
//! - [`client`]: the event loop that owns the socket and timers, and the
//!   [`Client`] handle: sends with awaitable receipts, transactions,
//!   subscriptions as streams, reconnect over a failover list ([`uri`]).
//!
//! Errors are layered the same way: [`CodecError`] → [`SessionError`] → [`Error`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), outbox_stomp::Error> {
//! use outbox_stomp::{Client, Config, Outgoing, Subscribe};
//!
//! let client = Client::connect(Config::parse("failover:(stomp://127.0.0.1:61613)")?).await?;
//! let mut orders = client.subscribe(Subscribe::new("/queue/orders").prefetch(100)).await?;
//! client.send(Outgoing::new("/queue/orders", "{\"id\":1}").persistent(true)).await?;
//! if let Some(message) = orders.next_message().await {
//!     message.ack().await?;
//! }
//! client.disconnect().await
//! # }
//! ```
//!
//! ActiveMQ notes: a NACK sends the message to the dead-letter queue at once;
//! `ack:auto` is at-most-once; without a receipt a failed SEND is dropped
//! silently, so [`Client::send`] always asks for one.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod activemq;
pub mod client;
pub mod codec;
pub mod error;
mod session;
mod tls;
pub mod uri;

pub use activemq::{BrokerLimits, FrameTooLarge, Outgoing};
pub use client::{
    AckMode, Client, Config, DEFAULT_BUFFER_BYTES, DEFAULT_QUEUE_BYTES, Message, ServerInfo,
    Subscribe, Subscription, Transaction,
};
pub use codec::{Command, Frame, Headers, Limits, Oversize, Received, StompCodec, Version};
pub use error::{BrokerError, CodecError, Error, SessionError, UriError};
pub use uri::{BrokerAddr, BrokerUri, ReconnectPolicy, Scheme};
