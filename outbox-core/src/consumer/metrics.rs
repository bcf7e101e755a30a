//! The consumer's counters, declared once, its gauges and histogram in the
//! metrics facade, and what became of each delivery.

use std::sync::OnceLock;

use metrics::{Gauge, Histogram, Unit};

use crate::inbox::Delivery;
use crate::instrument::{Counters, Instrument, Label, counters};
use crate::names::now_ms;
use crate::observe::{Health, Status, age_since};

counters! {
    /// A counter of [`ConsumerMetrics`]: `consumer.metrics().get(ConsumerCounter::Processed)`.
    pub enum ConsumerCounter;
    /// A plain copy of the counters of [`ConsumerMetrics`]
    /// ([`ConsumerMetrics::snapshot`]).
    pub struct ConsumerCounts;

    /// Events applied (first delivery or retry).
    processed / Processed = "outbox_consumer_processed_total", "Events applied.";
    /// Deliveries recognised as duplicates and acked without the handler.
    duplicates / Duplicates = "outbox_consumer_duplicates_total",
        "Deliveries acknowledged without running the handler.";
    /// Handler failures that scheduled a retry.
    retried / Retried = "outbox_consumer_retried_total", "Deliveries set aside for a local retry.";
    /// Events parked as `FAILED` (budget spent or undecodable).
    failed / Failed = "outbox_consumer_parked_total", "Deliveries parked as FAILED.";
    /// Database errors that delayed a delivery.
    db_errors / DbErrors = "outbox_consumer_db_errors_total",
        "Database errors the consumer backed off from.";
    /// 1 once the consumer stopped because its broker connection ended for
    /// good (or the broker refused to restore its subscription).
    stopped / Stopped = _, "1 once the consumer stopped because its broker connection ended for good.";
    /// ACKs that failed on a connection that was still up (each is tried
    /// again a few times).
    ack_failures / AckFailures = _, "ACKs that failed on a connection that was still up.";
    /// Connections the consumer ended because a delivery on them could not
    /// be acknowledged or settled: the broker delivers it again, to the next
    /// connection.
    connections_ended / ConnectionsEnded = _,
        "Connections ended to have a delivery that could not be acknowledged or settled delivered again.";
    /// Handler errors and panics (each is then retried or parked).
    handler_failures / HandlerFailures = "outbox_consumer_handler_failures_total",
        "Handler errors and panics.";
}

/// The label on every metric of a consumer: its name.
const LABEL: &str = "consumer";

const IN_FLIGHT: Instrument = Instrument {
    name: "outbox_consumer_in_flight",
    unit: Unit::Count,
    help: "Deliveries being applied now.",
};
const LATENCY_SECONDS: Instrument = Instrument {
    name: "outbox_consumer_latency_seconds",
    unit: Unit::Seconds,
    help: "From an event's append to its handler's commit.",
};
const RETRYING_ROWS: Instrument = Instrument {
    name: "outbox_inbox_retrying_rows",
    unit: Unit::Count,
    help: "Inbox rows waiting for a retry.",
};
const PARKED_ROWS: Instrument = Instrument {
    name: "outbox_inbox_parked_rows",
    unit: Unit::Count,
    help: "Inbox rows parked as FAILED.",
};

/// Counters and health of one consumer. Read the counters with
/// [`snapshot`](Self::snapshot) or [`get`](Self::get).
#[derive(Debug, Default)]
pub struct ConsumerMetrics {
    counters: Counters<COUNTERS>,
    /// What [`health`](ConsumerMetrics::health) reports.
    pub(crate) status: Status,
    /// Handles into the metrics facade, taken when the consumer starts.
    pub(crate) instruments: OnceLock<ConsumerInstruments>,
}

/// The consumer's gauges and histogram in the metrics facade.
#[derive(Debug)]
pub(crate) struct ConsumerInstruments {
    pub(crate) in_flight: Gauge,
    pub(crate) latency_seconds: Histogram,
    pub(crate) retrying_rows: Gauge,
    pub(crate) parked_rows: Gauge,
}

impl ConsumerMetrics {
    /// Takes the handles into the metrics facade, labelled with the
    /// `consumer`'s name, from the recorder installed now; the first call
    /// wins.
    pub(crate) fn register(&self, consumer: &str) {
        let label = Label {
            key: LABEL,
            value: consumer,
        };
        self.counters.register(&TABLE, label);
        let _ = self.instruments.get_or_init(|| ConsumerInstruments {
            in_flight: IN_FLIGHT.gauge(label),
            latency_seconds: LATENCY_SECONDS.histogram(label),
            retrying_rows: RETRYING_ROWS.gauge(label),
            parked_rows: PARKED_ROWS.gauge(label),
        });
    }

    /// Adds `n` to a counter, and to its twin in the metrics facade.
    pub(crate) fn add(&self, counter: ConsumerCounter, n: u64) {
        self.counters.add(counter as usize, n);
    }

    /// The consumer stopped because its broker connection ended for good.
    pub(crate) fn stopped(&self) {
        self.counters.raise(ConsumerCounter::Stopped as usize, 1);
    }

    /// The consumer's health, as far as these counters know it;
    /// [`ConsumerHandle::health`](crate::task::TaskHandle::health) also
    /// knows when its task ended.
    pub fn health(&self) -> Health {
        self.status.health(false)
    }

    /// One counter now.
    pub fn get(&self, counter: ConsumerCounter) -> u64 {
        self.counters.get(counter as usize)
    }

    /// The counters now.
    pub fn snapshot(&self) -> ConsumerCounts {
        ConsumerCounts::read(&self.counters)
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
            Outcome::Processed => ConsumerCounter::Processed,
            Outcome::Duplicate => ConsumerCounter::Duplicates,
            Outcome::Retry => ConsumerCounter::Retried,
            Outcome::Parked => ConsumerCounter::Failed,
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
