//! The `#[transactional_event]` attribute macro.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
