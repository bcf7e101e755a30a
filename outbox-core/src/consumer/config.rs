//! The consumer's settings and their checks.

use std::time::Duration;

#[cfg(doc)]
use super::Consumer;
use crate::Error;
use crate::backoff::Backoff;
#[cfg(doc)]
use crate::observe::Health;

/// Settings of a consumer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// The queue to consume, e.g. `/queue/Consumer.points.VirtualTopic.user.created`.
    pub destination: String,
    /// Handlers running at once (default 8). On SQLite, which writes one
    /// transaction at a time, the consumer runs two workers instead, each
    /// applying up to `concurrency × batch_size / 2` waiting deliveries in one
    /// transaction (at most 1000): the same number in progress, in fewer, larger
    /// transactions.
    pub concurrency: usize,
    /// Unacked messages the broker may push (`activemq.prefetchSize`; default
    /// `concurrency × batch_size`, at most 1000).
    pub prefetch: Option<u32>,
    /// Deliveries applied in one database transaction when several are waiting
    /// (default 16): one commit for many events. When one of them is a
    /// duplicate or its handler fails, that transaction is rolled back and the
    /// batch is applied one event per transaction, so a failing handler never
    /// undoes another event's work. 1 = a transaction per event.
    pub batch_size: usize,
    /// Handle the events of one key one after another, in order, and hold later
    /// events of a key while an earlier one waits for a retry (default on:
    /// a producer's `key` promises order). Events without a key are not
    /// held. Costs some throughput (about 17 % fewer events per second on
    /// the consumer bench, docs/benchmarks.md); turn it off for events whose
    /// order does not matter.
    pub per_key_order: bool,
    /// Handler failures before an event is parked as `FAILED` (default 5).
    pub max_attempts: u32,
    /// Database errors in a row on one delivery, or on one row waiting for a
    /// retry, before it is parked as `FAILED` with the error (default 10).
    /// Counted are the errors the database answered with that look
    /// transient but may recur every time: a trigger or deferred constraint
    /// raising at `COMMIT`, a table missing after a schema change, a
    /// deadlock. Errors the data itself causes (a value a column refuses)
    /// park a delivery, or a row waiting for a retry, after `max_attempts`
    /// of them in a row already. A database that cannot be reached
    /// (connection refused or cut, pool timeouts) counts for nothing: an
    /// outage is waited out however long it lasts. A batch of deliveries
    /// that meets this many errors is settled one by one, each with its own
    /// count.
    pub recurring_error_limit: u32,
    /// Longest a handler may run (default 60 s; `None`: no bound). A handler
    /// still running then (a lock wait without a timeout, a call that never
    /// answers) is stopped, its transaction rolled back, and the delivery
    /// counts as a handler failure: retried, then parked. Without a bound
    /// one hung handler would hold its worker, the retry loop, and on
    /// SQLite every other worker, for good.
    pub handler_timeout: Option<Duration>,
    /// Delay between local retries (default 500 ms doubling to 5 min).
    pub retry_backoff: Backoff,
    /// How often the retry loop looks for due rows (default 250 ms).
    pub retry_poll: Duration,
    /// Processed rows older than this are deleted (default 7 days). Keep it
    /// longer than the broker can redeliver a message while the consumer
    /// runs, or a late redelivery is applied again. After a start, and again
    /// after each loss of the broker link (or a failed ACK), retention waits
    /// until the consumer has drained its queue (subscribed and connected,
    /// nothing in progress and no delivery for a second), so messages
    /// received but never acknowledged find their rows however long ago they
    /// were committed. Each consumer process decides for
    /// itself: with several processes on one queue, one that is given no
    /// messages counts as drained while another still works through a
    /// backlog, so keep `retention` longer than a backlog takes to drain.
    pub retention: Option<Duration>,
    /// How often retention runs (default 1 min).
    pub retention_interval: Duration,
    /// How often the consumer counts its inbox rows (retrying, parked) for
    /// its [`Health`] and the gauges of [`observe`](crate::observe#metrics);
    /// `None` counts nothing (default 10 s).
    pub stats_interval: Option<Duration>,
}

impl ConsumerConfig {
    /// Consumes `destination` with default settings.
    pub fn new(destination: impl Into<String>) -> ConsumerConfig {
        ConsumerConfig {
            destination: destination.into(),
            concurrency: 8,
            prefetch: None,
            batch_size: 16,
            per_key_order: true,
            max_attempts: 5,
            recurring_error_limit: 10,
            handler_timeout: Some(Duration::from_secs(60)),
            retry_backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(300)),
            retry_poll: Duration::from_millis(250),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_interval: Duration::from_secs(60),
            stats_interval: Some(Duration::from_secs(10)),
        }
    }

    /// Consumes service `service`'s queue of the Virtual Topic `topic`:
    /// `/queue/Consumer.<service>.VirtualTopic.<topic>`. Producers publish to
    /// `/topic/VirtualTopic.<topic>`.
    pub fn virtual_topic(service: &str, topic: &str) -> ConsumerConfig {
        ConsumerConfig::new(format!("/queue/Consumer.{service}.VirtualTopic.{topic}"))
    }
}

impl ConsumerConfig {
    /// The prefetch the subscription asks for: [`prefetch`](Self::prefetch),
    /// or `concurrency × batch_size` (at most 1000).
    pub fn effective_prefetch(&self) -> u32 {
        self.prefetch
            .unwrap_or_else(|| {
                let batch = self.batch_size.max(1);
                let concurrency = self.concurrency.max(1);
                u32::try_from((concurrency * batch).min(1000)).unwrap_or(1000)
            })
            .max(1)
    }
}

/// The largest [`ConsumerConfig::batch_size`] and
/// [`ConsumerConfig::concurrency`]: a batch's inbox rows are inserted with one
/// statement, well within every database's limit on bound parameters.
pub const MAX_CONSUMER_BATCH: usize = 1000;

impl ConsumerConfig {
    /// Checks the destination: not empty, and a form ActiveMQ documents.
    fn validate_destination(&self) -> Result<(), Error> {
        let reason = if self.destination.trim().is_empty() {
            "is empty; name a queue such as /queue/orders".to_owned()
        } else if let Err(reason) = outbox_rules::destination(&self.destination) {
            format!("{:?}: {reason}", self.destination)
        } else {
            return Ok(());
        };
        Err(Error::InvalidConfig {
            setting: "ConsumerConfig::destination",
            reason,
        })
    }

    /// Checks the settings; [`Consumer::new`] calls it.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |setting, reason: String| Err(Error::InvalidConfig { setting, reason });
        self.validate_destination()?;
        for (setting, value) in [
            ("ConsumerConfig::concurrency", self.concurrency),
            ("ConsumerConfig::batch_size", self.batch_size),
        ] {
            if value == 0 || value > MAX_CONSUMER_BATCH {
                return invalid(
                    setting,
                    format!("{value} is outside 1..={MAX_CONSUMER_BATCH}"),
                );
            }
        }
        if self.prefetch == Some(0) {
            return invalid(
                "ConsumerConfig::prefetch",
                "0 would let the broker send nothing; use 1 or more, or None".to_owned(),
            );
        }
        if self.max_attempts == 0 {
            return invalid(
                "ConsumerConfig::max_attempts",
                "0 would park every event before its handler ran; use 1 or more".to_owned(),
            );
        }
        if self.handler_timeout.is_some_and(|t| t.is_zero()) {
            return invalid(
                "ConsumerConfig::handler_timeout",
                "0 would stop every handler at once; use None for no bound".to_owned(),
            );
        }
        if self.recurring_error_limit == 0 {
            return invalid(
                "ConsumerConfig::recurring_error_limit",
                "0 would park a delivery on its first database error; use 1 or more".to_owned(),
            );
        }
        for (setting, value) in [
            ("ConsumerConfig::retry_backoff", self.retry_backoff.max),
            ("ConsumerConfig::retry_poll", self.retry_poll),
            (
                "ConsumerConfig::retention_interval",
                self.retention_interval,
            ),
        ] {
            crate::settings::bounded(setting, value)?;
        }
        if let Some(keep) = self.retention {
            crate::settings::bounded("ConsumerConfig::retention", keep)?;
        }
        if let Some(every) = self.stats_interval {
            crate::settings::bounded("ConsumerConfig::stats_interval", every)?;
            if every.is_zero() {
                return invalid(
                    "ConsumerConfig::stats_interval",
                    "must be longer than zero, or None to count nothing".to_owned(),
                );
            }
        }
        Ok(())
    }
}

/// Builders: each sets one field and returns the settings, so a
/// configuration reads `ConsumerConfig::default().with_…(…)`.
impl ConsumerConfig {
    /// Sets [`destination`](Self::destination).
    #[must_use]
    pub fn with_destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = destination.into();
        self
    }

    /// Sets [`concurrency`](Self::concurrency).
    #[must_use]
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Sets [`prefetch`](Self::prefetch).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: Option<u32>) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets [`batch_size`](Self::batch_size).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets [`per_key_order`](Self::per_key_order).
    #[must_use]
    pub fn with_per_key_order(mut self, per_key_order: bool) -> Self {
        self.per_key_order = per_key_order;
        self
    }

    /// Sets [`max_attempts`](Self::max_attempts).
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets [`recurring_error_limit`](Self::recurring_error_limit).
    #[must_use]
    pub fn with_recurring_error_limit(mut self, recurring_error_limit: u32) -> Self {
        self.recurring_error_limit = recurring_error_limit;
        self
    }

    /// Sets [`handler_timeout`](Self::handler_timeout).
    #[must_use]
    pub fn with_handler_timeout(mut self, handler_timeout: Option<Duration>) -> Self {
        self.handler_timeout = handler_timeout;
        self
    }

    /// Sets [`retry_backoff`](Self::retry_backoff).
    #[must_use]
    pub fn with_retry_backoff(mut self, retry_backoff: Backoff) -> Self {
        self.retry_backoff = retry_backoff;
        self
    }

    /// Sets [`retry_poll`](Self::retry_poll).
    #[must_use]
    pub fn with_retry_poll(mut self, retry_poll: Duration) -> Self {
        self.retry_poll = retry_poll;
        self
    }

    /// Sets [`retention`](Self::retention).
    #[must_use]
    pub fn with_retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// Sets [`retention_interval`](Self::retention_interval).
    #[must_use]
    pub fn with_retention_interval(mut self, retention_interval: Duration) -> Self {
        self.retention_interval = retention_interval;
        self
    }

    /// Sets [`stats_interval`](Self::stats_interval).
    #[must_use]
    pub fn with_stats_interval(mut self, stats_interval: Option<Duration>) -> Self {
        self.stats_interval = stats_interval;
        self
    }
}
