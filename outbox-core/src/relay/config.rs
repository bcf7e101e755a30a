//! The relay's settings and their checks.

use std::time::Duration;

use uuid::Uuid;

use crate::Error;
use crate::backoff::Backoff;

/// Settings of a relay. `RelayConfig::default()` suits most services.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Rows per claim and per STOMP transaction (default 500).
    pub batch_size: u32,
    /// Payload and header bytes per batch (default 32 MiB): the claim and
    /// the hand-off read choose their rows on the stored lengths and fetch
    /// the payloads of those that fit only, so the memory a batch reads and
    /// holds is bounded in bytes as well as in rows. A single row larger
    /// than this is still taken, alone.
    pub max_batch_bytes: usize,
    /// How long a claim holds before another relay may take the rows (default
    /// 30 s). Must exceed the time a publish can take
    /// ([`Publisher::max_publish_time`](crate::Publisher::max_publish_time): about twice the STOMP client's
    /// receipt timeout, 21 s by default); [`Outbox::relay`](crate::Outbox::relay) checks it.
    pub lease: Duration,
    /// Fallback poll when no wake-up arrives (default 100 ms).
    pub poll_interval: Duration,
    /// Rejections a row may have before it is parked as `FAILED` (default 10).
    pub max_attempts: u32,
    /// Delay before a rejected row is tried again (default 1 s doubling to 5 min).
    pub retry_backoff: Backoff,
    /// Pause of the whole relay while the broker is unreachable (default 100 ms
    /// doubling to 10 s).
    pub outage_backoff: Backoff,
    /// Published rows older than this are deleted; `None` keeps them (default 7 days).
    pub retention: Option<Duration>,
    /// How often retention runs (default 1 min).
    pub retention_interval: Duration,
    /// Rows deleted per retention statement (default 1000).
    pub retention_batch: u32,
    /// This relay's name in `claimed_by` (default: a fresh UUID). A relay
    /// started again with the same name takes over the rows handed off to its
    /// predecessor at once instead of after their lease. One relay per name
    /// and table runs at a time: a relay holds a lock on its name while it
    /// runs (a session lock on PostgreSQL and MySQL, a file beside the
    /// database on SQLite), and one started under a name another live relay
    /// holds waits until that one stops before it takes any row.
    pub relay_id: String,
    /// Hand-off (default on): while this relay runs, rows appended in this
    /// process through an [`Outbox`](crate::Outbox) on the same pool (or a
    /// `#[transactional_event(pool)]` function) are leased to it as they are
    /// inserted, and it publishes them right after their commit without a
    /// claim transaction. Rows written elsewhere are claimed as usual. A
    /// transaction that commits after the relay stopped leaves its rows to
    /// any relay once their lease runs out.
    pub handoff: bool,
    /// How often the relay reads its table's backlog, the age of the oldest
    /// waiting row and the parked rows, for its [`Health`](crate::observe::Health)
    /// and the gauges of [`observe`](crate::observe#metrics); `None` reads
    /// nothing (default 10 s; each read is two indexed `COUNT`s).
    pub stats_interval: Option<Duration>,
    /// Share the table with the other relays by key partitions (default
    /// on): each relay claims keyed rows only from its share of the
    /// [`KEY_PARTITIONS`](crate::relay::KEY_PARTITIONS), found through
    /// membership leases in `outbox_lease` and rebalanced as relays start,
    /// stop or die (within half a lease); keyless rows go to any relay. Off:
    /// every relay claims from every partition, and relays whose batches share
    /// keys wait for each other. Per-key order holds either way.
    pub key_partitions: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 500,
            max_batch_bytes: 32 * 1024 * 1024,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            max_attempts: 10,
            retry_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            outage_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_interval: Duration::from_secs(60),
            retention_batch: 1000,
            relay_id: Uuid::now_v7().simple().to_string(),
            handoff: true,
            stats_interval: Some(Duration::from_secs(10)),
            key_partitions: true,
        }
    }
}

/// The largest [`RelayConfig::batch_size`]: a claim binds one parameter per
/// row, well within every database's limit (SQLite's is 32,766).
pub const MAX_RELAY_BATCH: u32 = 10_000;

use crate::settings::bounded;

impl RelayConfig {
    /// Checks the settings against each other and against a publish that
    /// can take up to `max_publish` ([`Publisher::max_publish_time`](crate::Publisher::max_publish_time)).
    /// [`Outbox::relay`](crate::Outbox::relay) calls it, so a relay never
    /// starts with a lease another relay could take while a batch is on its
    /// way (a batch claimed while another is published is leased one publish
    /// longer). A rejected batch is published row by row only while its
    /// lease leaves room for one more publish; the rest is given back and
    /// claimed again with a lease of its own.
    pub fn validate(&self, max_publish: Option<Duration>) -> Result<(), Error> {
        let invalid = |setting, reason: String| Err(Error::InvalidConfig { setting, reason });
        if self.batch_size == 0 || self.batch_size > MAX_RELAY_BATCH {
            return invalid(
                "RelayConfig::batch_size",
                format!("{} is outside 1..={MAX_RELAY_BATCH}", self.batch_size),
            );
        }
        if self.max_attempts == 0 {
            return invalid(
                "RelayConfig::max_attempts",
                "0 would park every row at its first rejection; use 1 or more".to_owned(),
            );
        }
        if self.relay_id.is_empty() || self.relay_id.len() > crate::names::RELAY_ID_MAX {
            return invalid(
                "RelayConfig::relay_id",
                format!(
                    "{:?} must be 1 to {} bytes (it is stored in claimed_by with a suffix)",
                    self.relay_id,
                    crate::names::RELAY_ID_MAX
                ),
            );
        }
        if self.relay_id.chars().any(char::is_control) {
            return invalid(
                "RelayConfig::relay_id",
                format!("{:?} holds a control character", self.relay_id),
            );
        }
        for (setting, value) in [
            ("RelayConfig::lease", self.lease),
            ("RelayConfig::poll_interval", self.poll_interval),
            ("RelayConfig::retry_backoff", self.retry_backoff.max),
            ("RelayConfig::outage_backoff", self.outage_backoff.max),
            ("RelayConfig::retention_interval", self.retention_interval),
        ] {
            bounded(setting, value)?;
        }
        if let Some(every) = self.stats_interval {
            bounded("RelayConfig::stats_interval", every)?;
            if every.is_zero() {
                return invalid(
                    "RelayConfig::stats_interval",
                    "must be longer than zero, or None to read no figures".to_owned(),
                );
            }
        }
        if let Some(keep) = self.retention {
            bounded("RelayConfig::retention", keep)?;
        }
        if self.lease.is_zero() {
            return invalid("RelayConfig::lease", "must be longer than zero".to_owned());
        }
        if let Some(publish) = max_publish
            && self.lease <= publish
        {
            return invalid(
                "RelayConfig::lease",
                format!(
                    "{:?} is not longer than a publish can take ({publish:?}: about twice the \
                     STOMP receipt timeout): another relay could take rows still on their way; \
                     raise the lease or lower the receipt timeout",
                    self.lease
                ),
            );
        }
        Ok(())
    }
}

/// Builders: each sets one field and returns the settings, so a
/// configuration reads `RelayConfig::default().with_…(…)`.
impl RelayConfig {
    /// Sets [`batch_size`](Self::batch_size).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets [`max_batch_bytes`](Self::max_batch_bytes).
    #[must_use]
    pub fn with_max_batch_bytes(mut self, max_batch_bytes: usize) -> Self {
        self.max_batch_bytes = max_batch_bytes;
        self
    }

    /// Sets [`lease`](Self::lease).
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets [`poll_interval`](Self::poll_interval).
    #[must_use]
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// Sets [`max_attempts`](Self::max_attempts).
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets [`retry_backoff`](Self::retry_backoff).
    #[must_use]
    pub fn with_retry_backoff(mut self, retry_backoff: Backoff) -> Self {
        self.retry_backoff = retry_backoff;
        self
    }

    /// Sets [`outage_backoff`](Self::outage_backoff).
    #[must_use]
    pub fn with_outage_backoff(mut self, outage_backoff: Backoff) -> Self {
        self.outage_backoff = outage_backoff;
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

    /// Sets [`retention_batch`](Self::retention_batch).
    #[must_use]
    pub fn with_retention_batch(mut self, retention_batch: u32) -> Self {
        self.retention_batch = retention_batch;
        self
    }

    /// Sets [`relay_id`](Self::relay_id).
    #[must_use]
    pub fn with_relay_id(mut self, relay_id: impl Into<String>) -> Self {
        self.relay_id = relay_id.into();
        self
    }

    /// Sets [`handoff`](Self::handoff).
    #[must_use]
    pub fn with_handoff(mut self, handoff: bool) -> Self {
        self.handoff = handoff;
        self
    }

    /// Sets [`stats_interval`](Self::stats_interval).
    #[must_use]
    pub fn with_stats_interval(mut self, stats_interval: Option<Duration>) -> Self {
        self.stats_interval = stats_interval;
        self
    }

    /// Sets [`key_partitions`](Self::key_partitions).
    #[must_use]
    pub fn with_key_partitions(mut self, key_partitions: bool) -> Self {
        self.key_partitions = key_partitions;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::RelayConfig;
    use crate::Error;
    use std::time::Duration;

    fn refused(config: &RelayConfig, publish: Option<Duration>) -> &'static str {
        match config.validate(publish) {
            Err(Error::InvalidConfig { setting, .. }) => setting,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn settings_out_of_range_are_refused_with_the_setting_named() {
        let ok = RelayConfig::default();
        ok.validate(Some(Duration::from_secs(21))).unwrap();
        ok.validate(None).unwrap();
        // The lease must outlast the longest publish.
        assert_eq!(
            refused(&ok, Some(Duration::from_secs(30))),
            "RelayConfig::lease"
        );
        type Change = fn(&mut RelayConfig);
        let cases: [(Change, &str); 10] = [
            (|c| c.batch_size = 0, "RelayConfig::batch_size"),
            (|c| c.batch_size = 10_001, "RelayConfig::batch_size"),
            (|c| c.max_attempts = 0, "RelayConfig::max_attempts"),
            (|c| c.relay_id = String::new(), "RelayConfig::relay_id"),
            (|c| c.relay_id = "r".repeat(63), "RelayConfig::relay_id"),
            (|c| c.relay_id = "a\nb".into(), "RelayConfig::relay_id"),
            (|c| c.lease = Duration::ZERO, "RelayConfig::lease"),
            (|c| c.lease = Duration::MAX, "RelayConfig::lease"),
            (
                |c| c.retention = Some(Duration::MAX),
                "RelayConfig::retention",
            ),
            (
                |c| c.retry_backoff = crate::Backoff::new(Duration::from_secs(1), Duration::MAX),
                "RelayConfig::retry_backoff",
            ),
        ];
        for (change, setting) in cases {
            let mut config = RelayConfig::default();
            change(&mut config);
            assert_eq!(refused(&config, None), setting);
        }
        let longest = RelayConfig {
            relay_id: "r".repeat(62),
            ..RelayConfig::default()
        };
        longest.validate(None).unwrap();
    }
}
