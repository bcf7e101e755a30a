//! What a running relay or consumer reports: its [`Health`], for readiness
//! and liveness probes, and its figures through the [`metrics`] facade.
//!
//! # Metrics
//!
//! The relay and the consumer record through the `metrics` crate's facade,
//! so the application picks the exporter (Prometheus, StatsD, OpenTelemetry
//! through a bridge) by installing a recorder; without one, recording costs
//! next to nothing. Install the recorder before starting relays and
//! consumers: each takes its handles when it starts.
//!
//! | name | kind | labels | what |
//! |------|------|--------|------|
//! | `outbox_relay_published_total` | counter | `table` | rows marked `PUBLISHED` |
//! | `outbox_relay_retried_total` | counter | `table` | rejections that scheduled a retry |
//! | `outbox_relay_parked_total` | counter | `table` | rows parked as `FAILED` |
//! | `outbox_relay_unavailable_total` | counter | `table` | batches given back: broker unavailable |
//! | `outbox_relay_db_errors_total` | counter | `table` | database errors the relay backed off from |
//! | `outbox_relay_deleted_total` | counter | `table` | published rows deleted by retention |
//! | `outbox_relay_deferred_total` | counter | `table` | rows deferred: the broker refused their destination to the relay's user |
//! | `outbox_relay_publish_seconds` | histogram | `table` | a batch from its claim to the broker's receipt |
//! | `outbox_backlog_rows` | gauge | `table` | rows waiting to be published |
//! | `outbox_backlog_oldest_seconds` | gauge | `table` | age of the oldest waiting row |
//! | `outbox_parked_rows` | gauge | `table` | rows parked as `FAILED` |
//! | `outbox_consumer_processed_total` | counter | `consumer` | events applied |
//! | `outbox_consumer_duplicates_total` | counter | `consumer` | deliveries acked without running the handler |
//! | `outbox_consumer_retried_total` | counter | `consumer` | deliveries set aside for a local retry |
//! | `outbox_consumer_parked_total` | counter | `consumer` | deliveries parked as `FAILED` |
//! | `outbox_consumer_handler_failures_total` | counter | `consumer` | handler errors and panics |
//! | `outbox_consumer_db_errors_total` | counter | `consumer` | database errors the consumer backed off from |
//! | `outbox_consumer_in_flight` | gauge | `consumer` | deliveries being applied now |
//! | `outbox_consumer_latency_seconds` | histogram | `consumer` | from the event's append to its handler's commit |
//! | `outbox_inbox_retrying_rows` | gauge | `consumer` | inbox rows waiting for a retry |
//! | `outbox_inbox_parked_rows` | gauge | `consumer` | inbox rows parked as `FAILED` |
//!
//! The gauges of the tables are read from the database every
//! [`RelayConfig::stats_interval`](crate::RelayConfig::stats_interval) and
//! [`ConsumerConfig::stats_interval`](crate::ConsumerConfig::stats_interval).
//! The latency histogram needs the producer's clock in the message: the
//! relay sends the row's append time as the `event-time` header
//! (milliseconds since the Unix epoch), and messages without it are not
//! measured.
//!
//! The counters are also on the handles as plain numbers:
//! [`RelayMetrics::snapshot`](crate::relay::RelayMetrics::snapshot) and
//! [`ConsumerMetrics::snapshot`](crate::consumer::ConsumerMetrics::snapshot),
//! or one at a time with `get`. Each [`RelayCounter`](crate::relay::RelayCounter)
//! and [`ConsumerCounter`](crate::consumer::ConsumerCounter) knows its name in
//! this table and its help text; a few (`stopped`, the consumer's ACK
//! failures and ended connections) are only on the handle.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::subscriber::LinkStatus;

/// What a relay or consumer is doing, as a probe sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RunState {
    /// Started; nothing has gone through or failed yet.
    Starting,
    /// Connected to the broker, and the last round with the database went
    /// through.
    Connected,
    /// The broker cannot be reached; the client is reconnecting.
    Reconnecting,
    /// The broker is there but the database fails; tried again with backoff.
    DatabaseFailing,
    /// Stopped for good ([`Health::error`] says why) or shut down.
    Stopped,
}

impl RunState {
    /// The state as a lowercase word: `starting`, `connected`,
    /// `reconnecting`, `database_failing`, `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Connected => "connected",
            RunState::Reconnecting => "reconnecting",
            RunState::DatabaseFailing => "database_failing",
            RunState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The health of a relay or consumer: [`RelayHandle::health`] and
/// [`ConsumerHandle::health`].
///
/// [`RelayHandle::health`]: crate::task::TaskHandle::health
/// [`ConsumerHandle::health`]: crate::task::TaskHandle::health
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Health {
    /// What it is doing.
    pub state: RunState,
    /// The last error, until something goes through again; why it stopped
    /// once [`Stopped`](RunState::Stopped).
    pub error: Option<String>,
    /// Time since the last batch the broker confirmed (relay) or the last
    /// delivery settled (consumer); `None` before the first.
    pub since_last_success: Option<Duration>,
    /// Relay: rows waiting to be published; consumer: inbox rows waiting for
    /// a retry. As last read from the database (`None` before the first
    /// read or when the reads are off).
    pub backlog: Option<u64>,
    /// Relay: the age of the oldest waiting row, as last read.
    pub backlog_age: Option<Duration>,
    /// Rows parked as `FAILED`, as last read.
    pub parked: Option<u64>,
    /// Time since `backlog` and `parked` were read.
    pub figures_age: Option<Duration>,
    /// Relay: the destinations the broker refuses to the relay's user (its
    /// authorisation map), whose rows wait with backoff until a send to
    /// them goes through. While there are any, [`error`](Self::error) says
    /// why if nothing else failed since. Empty for a consumer.
    pub deferred_destinations: Vec<String>,
}

impl Health {
    /// For a liveness probe: `false` once it has stopped, which only a
    /// restart cures.
    pub fn is_live(&self) -> bool {
        self.state != RunState::Stopped
    }

    /// For a readiness probe: `true` while connected and working.
    pub fn is_ready(&self) -> bool {
        self.state == RunState::Connected
    }
}

/// How the last round went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Last {
    #[default]
    Nothing,
    Ok,
    BrokerDown,
    DatabaseDown,
    Stopped,
}

#[derive(Debug, Default)]
struct Inner {
    last: Last,
    error: Option<String>,
    last_success: Option<Instant>,
    /// Backlog rows, oldest age, parked rows, and when they were read.
    figures: Option<(u64, Option<Duration>, u64, Instant)>,
    /// Destinations refused to the relay's user: refusals in a row, and the
    /// last one's words.
    deferred: std::collections::BTreeMap<String, (u32, String)>,
}

/// The shared state behind [`Health`], written by the running task.
#[derive(Default)]
pub(crate) struct Status {
    inner: Mutex<Inner>,
    link: OnceLock<Arc<dyn LinkStatus>>,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Status")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Status {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while holding this lock leaves plain values behind.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut inner)
    }

    /// The connection whose state [`Health`] reports, once known.
    pub(crate) fn set_link(&self, link: Arc<dyn LinkStatus>) {
        let _ = self.link.set(link);
    }

    /// Something went through (a receipt, a settled delivery).
    pub(crate) fn succeeded(&self) {
        self.with(|s| {
            s.last_success = Some(Instant::now());
            if s.last != Last::Stopped {
                s.last = Last::Ok;
                s.error = None;
            }
        });
    }

    /// A round with the database went through: that clears a database
    /// failure, not a broker one (only a confirmed publish does that).
    pub(crate) fn idle(&self) {
        self.with(|s| {
            if matches!(s.last, Last::Nothing | Last::DatabaseDown) {
                s.last = Last::Ok;
                s.error = None;
            }
        });
    }

    /// The broker could not be reached.
    pub(crate) fn broker_failed(&self, error: impl std::fmt::Display) {
        self.failed(Last::BrokerDown, error);
    }

    /// The database failed.
    pub(crate) fn database_failed(&self, error: impl std::fmt::Display) {
        self.failed(Last::DatabaseDown, error);
    }

    /// Stopped for good, for `reason`.
    pub(crate) fn stopped(&self, reason: impl std::fmt::Display) {
        self.failed(Last::Stopped, reason);
    }

    fn failed(&self, last: Last, error: impl std::fmt::Display) {
        self.with(|s| {
            if s.last != Last::Stopped {
                s.last = last;
                s.error = Some(error.to_string());
            }
        });
    }

    /// The broker refused `destination` to the relay's user once more;
    /// returns how many times in a row (1 for the first).
    pub(crate) fn destination_refused(&self, destination: &str, error: &str) -> u32 {
        self.with(|s| {
            let entry = s
                .deferred
                .entry(destination.to_owned())
                .or_insert((0, String::new()));
            entry.0 = entry.0.saturating_add(1);
            entry.1 = error.to_owned();
            entry.0
        })
    }

    /// The broker took messages for these destinations: they are refused
    /// no more.
    pub(crate) fn destinations_accepted<'a>(&self, destinations: impl Iterator<Item = &'a str>) {
        self.with(|s| {
            if s.deferred.is_empty() {
                return;
            }
            for destination in destinations {
                s.deferred.remove(destination);
            }
        });
    }

    /// The figures read from the database.
    pub(crate) fn set_figures(&self, backlog: u64, oldest: Option<Duration>, parked: u64) {
        self.with(|s| s.figures = Some((backlog, oldest, parked, Instant::now())));
    }

    /// The health now; `finished` says the task has ended.
    pub(crate) fn health(&self, finished: bool) -> Health {
        let connected = self.link.get().map(|link| link.is_connected());
        self.with(|s| {
            let state = match (s.last, connected) {
                _ if finished => RunState::Stopped,
                (Last::Stopped, _) => RunState::Stopped,
                (_, Some(false)) => RunState::Reconnecting,
                (Last::DatabaseDown, _) => RunState::DatabaseFailing,
                // Connected, but the last publish found no broker to
                // confirm it (a receipt timed out): not ready until one does.
                (Last::BrokerDown, _) => RunState::Reconnecting,
                (Last::Nothing, None) => RunState::Starting,
                _ => RunState::Connected,
            };
            let error = match (state, &s.error) {
                (RunState::Stopped, None) => Some("stopped".to_owned()),
                (_, None) => s.deferred.values().next().map(|(_, error)| error.clone()),
                (_, error) => error.clone(),
            };
            Health {
                state,
                error,
                since_last_success: s.last_success.map(|t| t.elapsed()),
                backlog: s.figures.map(|f| f.0),
                backlog_age: s.figures.and_then(|f| f.1),
                parked: s.figures.map(|f| f.2),
                figures_age: s.figures.map(|f| f.3.elapsed()),
                deferred_destinations: s.deferred.keys().cloned().collect(),
            }
        })
    }
}

/// The age of an event appended at `event_time` (ms since the Unix epoch).
pub(crate) fn age_since(event_time: i64, now: i64) -> Option<Duration> {
    u64::try_from(now.checked_sub(event_time)?)
        .ok()
        .map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Link(bool);
    impl LinkStatus for Link {
        fn is_connected(&self) -> bool {
            self.0
        }
        fn end_reason(&self) -> String {
            "gone".into()
        }
    }

    #[test]
    fn a_refused_destination_is_named_and_its_error_shown_until_a_send_to_it_goes_through() {
        let status = Status::default();
        status.set_link(Arc::new(Link(true)));
        assert_eq!(
            status.destination_refused("/queue/a", "not authorized a"),
            1
        );
        assert_eq!(
            status.destination_refused("/queue/a", "not authorized a"),
            2
        );
        // Other destinations go through; the refusal stays visible.
        status.succeeded();
        status.destinations_accepted(["/queue/b"].into_iter());
        let h = status.health(false);
        assert_eq!(h.state, RunState::Connected);
        assert_eq!(h.deferred_destinations, vec!["/queue/a".to_owned()]);
        assert_eq!(h.error.as_deref(), Some("not authorized a"));
        status.destinations_accepted(["/queue/a"].into_iter());
        let h = status.health(false);
        assert!(h.deferred_destinations.is_empty());
        assert_eq!(h.error, None);
        assert_eq!(status.destination_refused("/queue/a", "again"), 1);
    }

    #[test]
    fn the_state_follows_the_last_round_and_the_link() {
        let status = Status::default();
        assert_eq!(status.health(false).state, RunState::Starting);
        status.broker_failed("refused");
        let h = status.health(false);
        assert_eq!(h.state, RunState::Reconnecting);
        assert_eq!(h.error.as_deref(), Some("refused"));
        assert!(!h.is_ready() && h.is_live());
        status.succeeded();
        let h = status.health(false);
        assert_eq!(h.state, RunState::Connected);
        assert!(h.error.is_none() && h.since_last_success.is_some());
        assert!(h.is_ready());
        status.database_failed("pool timed out");
        assert_eq!(status.health(false).state, RunState::DatabaseFailing);
        status.idle();
        assert_eq!(status.health(false).state, RunState::Connected);
        // A link that is up does not hide a publish the broker did not confirm.
        let linked = Status::default();
        linked.set_link(Arc::new(Link(true)));
        assert_eq!(linked.health(false).state, RunState::Connected);
        linked.broker_failed("receipt timed out");
        assert_eq!(linked.health(false).state, RunState::Reconnecting);
        linked.succeeded();
        assert_eq!(linked.health(false).state, RunState::Connected);
        // A link that is down is reconnecting whatever went before.
        status.set_link(Arc::new(Link(false)));
        assert_eq!(status.health(false).state, RunState::Reconnecting);
        status.stopped("the broker refused the login");
        status.succeeded();
        let h = status.health(false);
        assert_eq!(h.state, RunState::Stopped);
        assert!(!h.is_live());
        // A finished task is stopped whatever was recorded.
        let fresh = Status::default();
        fresh.succeeded();
        let h = fresh.health(true);
        assert_eq!(
            (h.state, h.error.as_deref()),
            (RunState::Stopped, Some("stopped"))
        );
    }

    #[test]
    fn figures_are_reported_with_their_age() {
        let status = Status::default();
        assert_eq!(status.health(false).backlog, None);
        status.set_figures(7, Some(Duration::from_secs(3)), 2);
        let h = status.health(false);
        assert_eq!(h.backlog, Some(7));
        assert_eq!(h.backlog_age, Some(Duration::from_secs(3)));
        assert_eq!(h.parked, Some(2));
        assert!(h.figures_age.is_some());
        assert_eq!(age_since(1_000, 1_500), Some(Duration::from_millis(500)));
        assert_eq!(age_since(2_000, 1_500), None);
    }
}
