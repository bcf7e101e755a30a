//! STOMP 1.0–1.2 for Apache ActiveMQ.
//!
//! - [`codec`]: the wire format, bytes ⇄ [`codec::Frame`], with no sockets.
//! - [`error`]: one error type per layer.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod codec;
pub mod error;

pub use codec::{Command, Frame, Headers, Limits, Received, StompCodec, Version};
pub use error::CodecError;
