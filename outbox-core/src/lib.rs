//! Transactional outbox, relay and idempotent inbox.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
