//! The relay's counters: what it published, retried, parked, deferred and
//! deleted, and the database errors it backed off from.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::observe::{Health, RelayInstruments, Status};

/// Counters of one relay, shared with whoever holds the `Arc`.
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Rows marked `PUBLISHED`, as the databases reported them changed. A mark
    /// whose commit went through while the connection failed (so the relay saw
    /// an error) finds nothing left to change when it is tried again: those
    /// rows are published and marked but not counted here. Count the table
    /// (`Outbox::counts`) for an exact figure.
    pub published: AtomicU64,
    /// Rejections that scheduled a retry.
    pub retried: AtomicU64,
    /// Rows parked as `FAILED`.
    pub failed: AtomicU64,
    /// Batches given back because the broker was unavailable.
    pub unavailable: AtomicU64,
    /// Published rows deleted by retention.
    pub deleted: AtomicU64,
    /// Rows deferred because the broker refused their destination to the
    /// relay's user (its authorisation map); no attempt of theirs was spent.
    pub deferred: AtomicU64,
    /// Database errors the relay backed off from (claim, mark, release,
    /// reject); it keeps going after each.
    pub db_errors: AtomicU64,
    /// 1 once the relay stopped because its broker connection ended for good.
    pub stopped: AtomicU64,
    /// What [`health`](RelayMetrics::health) reports.
    pub(crate) status: Status,
    /// Handles into the metrics facade, taken when the relay starts.
    pub(crate) instruments: OnceLock<RelayInstruments>,
}

/// A counter of [`RelayMetrics`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Count {
    Published,
    Retried,
    Failed,
    Unavailable,
    Deleted,
    Deferred,
    DbErrors,
}

/// A plain copy of [`RelayMetrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayCounts {
    /// Rows marked `PUBLISHED`.
    pub published: u64,
    /// Rejections that scheduled a retry.
    pub retried: u64,
    /// Rows parked as `FAILED`.
    pub failed: u64,
    /// Batches given back because the broker was unavailable.
    pub unavailable: u64,
    /// Published rows deleted by retention.
    pub deleted: u64,
    /// Rows deferred because the broker refused their destination to the
    /// relay's user.
    pub deferred: u64,
    /// Database errors the relay backed off from.
    pub db_errors: u64,
    /// 1 once the relay stopped because its broker connection ended for good.
    pub stopped: u64,
}

impl RelayMetrics {
    /// Adds `n` to a counter, and to its twin in the metrics facade.
    pub(crate) fn add(&self, what: Count, n: u64) {
        let (atomic, facade) = match (what, self.instruments.get()) {
            (Count::Published, i) => (&self.published, i.map(|i| &i.published)),
            (Count::Retried, i) => (&self.retried, i.map(|i| &i.retried)),
            (Count::Failed, i) => (&self.failed, i.map(|i| &i.parked)),
            (Count::Unavailable, i) => (&self.unavailable, i.map(|i| &i.unavailable)),
            (Count::Deleted, i) => (&self.deleted, i.map(|i| &i.deleted)),
            (Count::Deferred, i) => (&self.deferred, i.map(|i| &i.deferred)),
            (Count::DbErrors, i) => (&self.db_errors, i.map(|i| &i.db_errors)),
        };
        atomic.fetch_add(n, Ordering::Relaxed);
        if let Some(counter) = facade {
            counter.increment(n);
        }
    }

    /// The relay's health, as far as these counters know it: a relay run
    /// with [`Relay::run`](super::Relay::run) reports [`Stopped`](crate::observe::RunState::Stopped)
    /// only once it stopped on its own; [`RelayHandle::health`](crate::task::TaskHandle::health)
    /// also knows when its task ended.
    pub fn health(&self) -> Health {
        self.status.health(false)
    }

    /// The counters now.
    pub fn snapshot(&self) -> RelayCounts {
        RelayCounts {
            published: self.published.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            unavailable: self.unavailable.load(Ordering::Relaxed),
            deleted: self.deleted.load(Ordering::Relaxed),
            deferred: self.deferred.load(Ordering::Relaxed),
            db_errors: self.db_errors.load(Ordering::Relaxed),
            stopped: self.stopped.load(Ordering::Relaxed),
        }
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
