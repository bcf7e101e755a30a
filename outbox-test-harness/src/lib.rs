//! Test harness: real ActiveMQ brokers and fresh databases for integration tests.
//!
//! Nothing here is mocked. The modules:
//!
//! - [`Broker`] (with [`BrokerConfig`] and [`Credentials`]) starts ActiveMQ Classic
//!   from the Debian package in a child JVM: a generated `activemq.xml`, free
//!   loopback ports, its own KahaDB folder under `target/test-brokers/`, optional
//!   authentication and an optional `stomp+ssl` connector with a generated CA. A
//!   test can kill, pause, stop and restart it on the same ports and data, which is
//!   how crash safety is tested. The JVM dies with the test process.
//! - [`RawStomp`] and [`RawFrame`] speak bare STOMP over any stream. The harness
//!   uses them to decide when a broker is ready (`CONNECT` → `CONNECTED`); tests use
//!   them to talk to the broker without the client under test.
//! - [`TestDb`] (cargo features `sqlite`, `postgres`, `mysql`) gives each test its
//!   own SQLite file or its own uniquely named database on a PostgreSQL or
//!   MySQL/MariaDB server, and removes it afterwards.
//! - [`FaultProxy`] sits between a client and a broker (or a database server) and
//!   injects network faults while traffic flows: latency, bandwidth, blackhole,
//!   one frozen direction, cut, reset (also in the middle of a frame), refusal.
//! - [`HarnessError`] is the one error type; it says how to install or start what
//!   is missing.
//!
//! Data flow of a broker start: config → `activemq.xml` + log4j file → JVM spawned
//! from a long-lived thread (so `PR_SET_PDEATHSIG` ties it to the process) →
//! readiness probes over [`RawStomp`] until `CONNECTED` or the timeout, whose error
//! quotes the broker log.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod broker;
mod config;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod db;
mod error;
mod paths;
mod process;
mod proxy;
mod raw_stomp;
mod tls;

pub use broker::{Broker, KEEP_BROKER_DATA_VAR};
pub use config::{Authorization, BrokerConfig, Credentials};
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub use db::{MYSQL_URL_VAR, POSTGRES_URL_VAR, SKIP_MYSQL_VAR, SKIP_POSTGRES_VAR, TestDb};
pub use error::HarnessError;
pub use proxy::{Direction, FaultProxy};
pub use raw_stomp::{RawFrame, RawStomp};
