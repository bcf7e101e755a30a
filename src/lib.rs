//! outbox: transactional events over ActiveMQ.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
pub use outbox_core as core;
pub use outbox_stomp as stomp;

#[cfg(feature = "macros")]
#[cfg_attr(doctest, doc = include_str!("../outbox-macros/manual.md"))]
pub use outbox_macros::transactional_event;

/// What `#[transactional_event]` expands to refers to this module. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use outbox_core::__private::*;
    pub use outbox_core::{
        Backend, Consumer, ConsumerConfig, DEFAULT_INBOX_TABLE, Delivery, Error, Event, Handler,
        HandlerError, Inbox, wake,
    };
}
