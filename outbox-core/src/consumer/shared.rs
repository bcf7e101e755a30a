//! What every part of a running consumer reads: its inbox, handler,
//! settings, counters, write gate and drain gate.

use std::sync::Arc;

use crate::backend::{Backend, WriteGate};
use crate::inbox::Inbox;

use super::config::ConsumerConfig;
use super::drain::Drain;
use super::handler::Handler;
use super::metrics::ConsumerMetrics;

/// The parts of one consumer, shared by its workers and its retry loop.
pub(super) struct Shared<DB: Backend, H: Handler<DB>> {
    pub(super) inbox: Inbox<DB>,
    pub(super) handler: H,
    pub(super) config: ConsumerConfig,
    pub(super) metrics: Arc<ConsumerMetrics>,
    pub(super) gate: WriteGate,
    /// Deliveries being settled now, and when the last one began or ended:
    /// inbox retention waits until the consumer has drained what the broker
    /// held for it ([`Drain`]).
    pub(super) drain: Drain,
}
