//! The relay's counters, declared once: what it published, retried, parked,
//! deferred and deleted, and the database errors it backed off from; and its
//! gauges and histogram in the metrics facade.

use std::sync::OnceLock;

use metrics::{Gauge, Histogram, Unit};

use crate::instrument::{Counters, Instrument, Label, counters};
use crate::observe::{Health, Status};

counters! {
    /// A counter of [`RelayMetrics`]: `relay.metrics().get(RelayCounter::Published)`.
    pub enum RelayCounter;
    /// A plain copy of the counters of [`RelayMetrics`]
    /// ([`RelayMetrics::snapshot`]).
    pub struct RelayCounts;

    /// Rows marked `PUBLISHED`, as the databases reported them changed. A mark
    /// whose commit went through while the connection failed (so the relay saw
    /// an error) finds nothing left to change when it is tried again: those
    /// rows are published and marked but not counted here. Count the table
    /// (`Outbox::counts`) for an exact figure.
    published / Published = "outbox_relay_published_total", "Outbox rows marked PUBLISHED.";
    /// Rejections that scheduled a retry.
    retried / Retried = "outbox_relay_retried_total", "Rejections that scheduled a retry.";
    /// Rows parked as `FAILED`.
    failed / Failed = "outbox_relay_parked_total", "Outbox rows parked as FAILED.";
    /// Batches given back because the broker was unavailable.
    unavailable / Unavailable = "outbox_relay_unavailable_total",
        "Batches given back because the broker was unavailable.";
    /// Published rows deleted by retention.
    deleted / Deleted = "outbox_relay_deleted_total", "Published rows deleted by retention.";
    /// Rows deferred because the broker refused their destination to the
    /// relay's user (its authorisation map); no attempt of theirs was spent.
    deferred / Deferred = "outbox_relay_deferred_total",
        "Outbox rows deferred because the broker refused their destination to the relay's user.";
    /// Database errors the relay backed off from (claim, mark, release,
    /// reject); it keeps going after each.
    db_errors / DbErrors = "outbox_relay_db_errors_total",
        "Database errors the relay backed off from.";
    /// 1 once the relay stopped because its broker connection ended for good.
    stopped / Stopped = _, "1 once the relay stopped because its broker connection ended for good.";
}

/// The label on every metric of a relay: its outbox table.
const LABEL: &str = "table";

const PUBLISH_SECONDS: Instrument = Instrument {
    name: "outbox_relay_publish_seconds",
    unit: Unit::Seconds,
    help: "A batch from its claim to the broker's receipt.",
};
const BACKLOG_ROWS: Instrument = Instrument {
    name: "outbox_backlog_rows",
    unit: Unit::Count,
    help: "Outbox rows waiting to be published.",
};
const BACKLOG_OLDEST: Instrument = Instrument {
    name: "outbox_backlog_oldest_seconds",
    unit: Unit::Seconds,
    help: "Age of the oldest waiting outbox row.",
};
const PARKED_ROWS: Instrument = Instrument {
    name: "outbox_parked_rows",
    unit: Unit::Count,
    help: "Outbox rows parked as FAILED.",
};

/// Counters and health of one relay, shared with whoever holds the `Arc`.
/// Read the counters with [`snapshot`](Self::snapshot) or [`get`](Self::get).
#[derive(Debug, Default)]
pub struct RelayMetrics {
    counters: Counters<COUNTERS>,
    /// What [`health`](RelayMetrics::health) reports.
    pub(crate) status: Status,
    /// Handles into the metrics facade, taken when the relay starts.
    pub(crate) instruments: OnceLock<RelayInstruments>,
}

/// The relay's gauges and histogram in the metrics facade.
#[derive(Debug)]
pub(crate) struct RelayInstruments {
    pub(crate) publish_seconds: Histogram,
    pub(crate) backlog: Gauge,
    pub(crate) oldest: Gauge,
    pub(crate) parked_rows: Gauge,
}

impl RelayMetrics {
    /// Takes the handles into the metrics facade, labelled with `table`,
    /// from the recorder installed now; the first call wins.
    pub(crate) fn register(&self, table: &str) {
        let label = Label {
            key: LABEL,
            value: table,
        };
        self.counters.register(&TABLE, label);
        let _ = self.instruments.get_or_init(|| RelayInstruments {
            publish_seconds: PUBLISH_SECONDS.histogram(label),
            backlog: BACKLOG_ROWS.gauge(label),
            oldest: BACKLOG_OLDEST.gauge(label),
            parked_rows: PARKED_ROWS.gauge(label),
        });
    }

    /// Adds `n` to a counter, and to its twin in the metrics facade.
    pub(crate) fn add(&self, counter: RelayCounter, n: u64) {
        self.counters.add(counter as usize, n);
    }

    /// The relay stopped because its broker connection ended for good.
    pub(crate) fn stopped(&self) {
        self.counters.raise(RelayCounter::Stopped as usize, 1);
    }

    /// The relay's health, as far as these counters know it: a relay run
    /// with [`Relay::run`](super::Relay::run) reports [`Stopped`](crate::observe::RunState::Stopped)
    /// only once it stopped on its own; [`RelayHandle::health`](crate::task::TaskHandle::health)
    /// also knows when its task ended.
    pub fn health(&self) -> Health {
        self.status.health(false)
    }

    /// One counter now.
    pub fn get(&self, counter: RelayCounter) -> u64 {
        self.counters.get(counter as usize)
    }

    /// The counters now.
    pub fn snapshot(&self) -> RelayCounts {
        RelayCounts::read(&self.counters)
    }
}

impl crate::task::TaskHandle<RelayMetrics> {
    /// The relay's health, for readiness and liveness probes: connected,
    /// reconnecting, failing on its database or stopped (with why), the time
    /// since the broker last confirmed a batch, and the backlog and its age
    /// as last read ([`RelayConfig::stats_interval`](crate::RelayConfig::stats_interval)).
    pub fn health(&self) -> Health {
        self.metrics.status.health(self.is_finished())
    }
}
