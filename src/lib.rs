//! outbox: transactional events over ActiveMQ.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
pub use outbox_core as core;
pub use outbox_stomp as stomp;

/// What `#[transactional_event]` expands to refers to this module. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use outbox_core::__private::*;
    pub use outbox_core::{
        Consumer, ConsumerConfig, Delivery, Error, Event, Handler, HandlerError, Inbox, wake,
    };
}
