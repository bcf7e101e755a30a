//! The consumer's counters, and what became of each delivery.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::inbox::Delivery;
use crate::names::now_ms;
use crate::observe::{ConsumerInstruments, Health, Status, age_since};

/// Counters of one consumer.
#[derive(Debug, Default)]
pub struct ConsumerMetrics {
    /// Events applied (first delivery or retry).
    pub processed: AtomicU64,
    /// Deliveries recognised as duplicates and acked without the handler.
    pub duplicates: AtomicU64,
    /// Handler failures that scheduled a retry.
    pub retried: AtomicU64,
    /// Events parked as `FAILED` (budget spent or undecodable).
    pub failed: AtomicU64,
    /// Database errors that delayed a delivery.
    pub db_errors: AtomicU64,
    /// 1 once the consumer stopped because its broker connection ended for
    /// good (or the broker refused to restore its subscription).
    pub stopped: AtomicU64,
    /// ACKs that failed on a connection that was still up (each is tried
    /// again a few times).
    pub ack_failures: AtomicU64,
    /// Connections the consumer ended because a delivery on them could not
    /// be acknowledged or settled: the broker delivers it again, to the next
    /// connection.
    pub connections_ended: AtomicU64,
    /// What [`health`](ConsumerMetrics::health) reports.
    pub(crate) status: Status,
    /// Handles into the metrics facade, taken when the consumer starts.
    pub(crate) instruments: OnceLock<ConsumerInstruments>,
}

/// A counter of [`ConsumerMetrics`].
#[derive(Debug, Clone, Copy)]
pub(super) enum Count {
    Processed,
    Duplicates,
    Retried,
    Failed,
    DbErrors,
}

/// A plain copy of [`ConsumerMetrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumerCounts {
    /// Events applied (first delivery or retry).
    pub processed: u64,
    /// Deliveries recognised as duplicates and acked without the handler.
    pub duplicates: u64,
    /// Handler failures that scheduled a retry.
    pub retried: u64,
    /// Events parked as `FAILED`.
    pub failed: u64,
    /// Database errors that delayed a delivery.
    pub db_errors: u64,
    /// 1 once the consumer stopped because its broker connection ended for good.
    pub stopped: u64,
    /// ACKs that failed on a connection that was still up.
    pub ack_failures: u64,
    /// Connections ended to have a delivery that could not be acknowledged
    /// or settled delivered again.
    pub connections_ended: u64,
}

impl ConsumerMetrics {
    /// Adds `n` to a counter, and to its twin in the metrics facade.
    pub(super) fn add(&self, what: Count, n: u64) {
        let (atomic, facade) = match (what, self.instruments.get()) {
            (Count::Processed, i) => (&self.processed, i.map(|i| &i.processed)),
            (Count::Duplicates, i) => (&self.duplicates, i.map(|i| &i.duplicates)),
            (Count::Retried, i) => (&self.retried, i.map(|i| &i.retried)),
            (Count::Failed, i) => (&self.failed, i.map(|i| &i.parked)),
            (Count::DbErrors, i) => (&self.db_errors, i.map(|i| &i.db_errors)),
        };
        atomic.fetch_add(n, Ordering::Relaxed);
        if let Some(counter) = facade {
            counter.increment(n);
        }
    }

    /// A handler failed (an error or a panic).
    pub(super) fn handler_failed(&self) {
        if let Some(i) = self.instruments.get() {
            i.handler_failures.increment(1);
        }
    }

    /// The consumer's health, as far as these counters know it;
    /// [`ConsumerHandle::health`](crate::task::TaskHandle::health) also
    /// knows when its task ended.
    pub fn health(&self) -> Health {
        self.status.health(false)
    }

    /// The counters now.
    pub fn snapshot(&self) -> ConsumerCounts {
        ConsumerCounts {
            processed: self.processed.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            db_errors: self.db_errors.load(Ordering::Relaxed),
            stopped: self.stopped.load(Ordering::Relaxed),
            ack_failures: self.ack_failures.load(Ordering::Relaxed),
            connections_ended: self.connections_ended.load(Ordering::Relaxed),
        }
    }
}

/// What became of one delivery.
pub(super) enum Outcome {
    Processed,
    Duplicate,
    Retry,
    Parked,
}

/// Deliveries in progress on the in-flight gauge; taken off when dropped,
/// however the delivery ends.
pub(super) struct InFlightGauge<'a>(Option<&'a metrics::Gauge>, f64);

impl<'a> InFlightGauge<'a> {
    pub(super) fn add(metrics: &'a ConsumerMetrics, n: usize) -> InFlightGauge<'a> {
        let gauge = metrics.instruments.get().map(|i| &i.in_flight);
        let n = n as f64;
        if let Some(g) = gauge {
            g.increment(n);
        }
        InFlightGauge(gauge, n)
    }
}

impl Drop for InFlightGauge<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0 {
            g.decrement(self.1);
        }
    }
}

/// Counts what became of a batch of deliveries, and how long the applied ones
/// took from their append (`event-time`) to their commit.
pub(super) fn count_outcomes(
    metrics: &ConsumerMetrics,
    deliveries: &[Delivery],
    outcomes: &[Option<Outcome>],
) {
    let now = now_ms();
    for (delivery, outcome) in deliveries.iter().zip(outcomes) {
        let Some(outcome) = outcome else { continue };
        let what = match outcome {
            Outcome::Processed => Count::Processed,
            Outcome::Duplicate => Count::Duplicates,
            Outcome::Retry => Count::Retried,
            Outcome::Parked => Count::Failed,
        };
        metrics.add(what, 1);
        if let (Outcome::Processed, Some(i)) = (outcome, metrics.instruments.get())
            && let Some(age) = delivery
                .header("event-time")
                .and_then(|t| t.parse().ok())
                .and_then(|t| age_since(t, now))
        {
            i.latency_seconds.record(age.as_secs_f64());
        }
    }
    if outcomes.iter().any(Option::is_some) {
        metrics.status.succeeded();
    }
}

impl crate::task::TaskHandle<ConsumerMetrics> {
    /// The consumer's health, for readiness and liveness probes: connected,
    /// reconnecting, failing on its database or stopped (with why), the time
    /// since a delivery was last settled, and the inbox rows retrying and
    /// parked as last counted ([`ConsumerConfig::stats_interval`](crate::ConsumerConfig::stats_interval)).
    pub fn health(&self) -> Health {
        self.metrics.status.health(self.is_finished())
    }
}
