//! outbox: transactional events over ActiveMQ — a transactional outbox on
//! the producer side, an idempotent inbox on the consumer side, and a STOMP
//! client for ActiveMQ.
//!
//! The API by role:
//!
//! | role | module | start with |
//! |---|---|---|
//! | write events with your data | [`producer`] | [`Outbox`](producer::Outbox), [`Event`](producer::Event), or `#[transactional_event]` |
//! | move them to the broker | [`relay`] | [`Relay`](relay::Relay), [`RelayConfig`](relay::RelayConfig), [`StompPublisher`](relay::StompPublisher) |
//! | apply them once | [`consumer`] | [`Consumer`](consumer::Consumer), [`Handler`](consumer::Handler), [`Inbox`](consumer::Inbox), or `#[transactional_event(consumer = …)]` |
//! | watch and repair | [`admin`] | the backlog, parked rows, replays |
//! | talk STOMP yourself | [`stomp`] | [`Client`](stomp::Client), [`Config`](stomp::Config) |
//! | test your producers and handlers | `testing` (feature `testing`) | `appended`, `TestConsumer`, `Delivery::json` |
//!
//! [`core`] is the whole runtime crate (`outbox-core`), with the items above
//! and [`Error`](core::Error), [`Backend`](core::Backend) and
//! [`Backoff`](core::Backoff) at its root. The README is the front page; the
//! configuration reference, the guarantees and the operations notes are in
//! the `docs/` folder next to it.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
pub use outbox_core as core;
pub use outbox_core::{admin, consumer, producer, relay};
pub use outbox_stomp as stomp;

#[cfg(feature = "macros")]
#[cfg_attr(doctest, doc = include_str!("../outbox-macros/manual.md"))]
pub use outbox_macros::transactional_event;

/// Testing producers and handlers with the application's real database and
/// no broker (feature `testing`; add it to the `outbox` dev-dependency):
/// what a producer appended, and handlers run through the consumer itself on
/// scripted deliveries. docs/testing.md, "Testing your handlers", has a
/// worked example.
#[cfg(feature = "testing")]
pub use outbox_core::testing;

/// What `#[transactional_event]` expands to refers to this module. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use outbox_core::__private::*;
    pub use outbox_core::consumer::{DEFAULT_INBOX_TABLE, HandlerError};
    pub use outbox_core::{
        Backend, Consumer, ConsumerConfig, Delivery, Error, Event, Handler, Inbox,
    };
}

/// The README's quickstart, compiled as a doc test so that it keeps building.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeQuickstart;
