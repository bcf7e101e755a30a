//! Test harness: real ActiveMQ brokers and fresh databases.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
