//! STOMP 1.0–1.2 for Apache ActiveMQ.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
