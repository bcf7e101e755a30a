//! outbox: transactional events over ActiveMQ.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
pub use outbox_core as core;
pub use outbox_stomp as stomp;
