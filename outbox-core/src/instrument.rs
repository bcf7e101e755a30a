//! The metrics a relay and a consumer record, each described once.
//!
//! A role declares its counters in one table with [`counters!`]: for each,
//! its rustdoc, its name and help text in the metrics facade (or none, for a
//! counter read only on the handle). From that table come the role's counter
//! enum (`RelayCounter`, `ConsumerCounter`), its plain snapshot
//! (`RelayCounts`, `ConsumerCounts`), and the atomics behind it with their
//! twins in the facade ([`Counters`]). Gauges and histograms are
//! [`Instrument`] constants beside the handles that use them. Every handle
//! describes its metric to the recorder when it is taken, so the names and
//! help texts a recorder shows are those of the tables, and nowhere else.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::Unit;

/// A counter as the metrics facade shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counter {
    /// Its name in the facade, or `None` for a counter read only on the handle.
    pub(crate) name: Option<&'static str>,
    /// What it counts, in a sentence.
    pub(crate) help: &'static str,
}

/// A gauge or histogram as the metrics facade shows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Instrument {
    /// Its name in the facade.
    pub(crate) name: &'static str,
    /// What its values measure.
    pub(crate) unit: Unit,
    /// What it shows, in a sentence.
    pub(crate) help: &'static str,
}

/// The label on every handle of one relay (`table`) or consumer (`consumer`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Label<'a> {
    pub(crate) key: &'static str,
    pub(crate) value: &'a str,
}

impl Instrument {
    /// The gauge's handle from the recorder installed now.
    pub(crate) fn gauge(&self, label: Label<'_>) -> metrics::Gauge {
        metrics::describe_gauge!(self.name, self.unit, self.help);
        metrics::gauge!(self.name, label.key => label.value.to_owned())
    }

    /// The histogram's handle from the recorder installed now.
    pub(crate) fn histogram(&self, label: Label<'_>) -> metrics::Histogram {
        metrics::describe_histogram!(self.name, self.unit, self.help);
        metrics::histogram!(self.name, label.key => label.value.to_owned())
    }
}

impl Counter {
    /// The counter's handle from the recorder installed now, if the facade
    /// shows it.
    fn register(&self, label: Label<'_>) -> Option<metrics::Counter> {
        let name = self.name?;
        metrics::describe_counter!(name, Unit::Count, self.help);
        Some(metrics::counter!(name, label.key => label.value.to_owned()))
    }
}

/// The `N` counters of one role: private atomics, and their twins in the
/// facade once the role started.
#[derive(Debug)]
pub(crate) struct Counters<const N: usize> {
    values: [AtomicU64; N],
    facade: OnceLock<[Option<metrics::Counter>; N]>,
}

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Counters {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            facade: OnceLock::new(),
        }
    }
}

impl<const N: usize> Counters<N> {
    /// Takes the facade's handles of the counters in `table` that it shows;
    /// the first call wins.
    pub(crate) fn register(&self, table: &[Counter; N], label: Label<'_>) {
        let _ = self
            .facade
            .get_or_init(|| table.map(|counter| counter.register(label)));
    }

    /// Adds `n` to counter `i`, and to its twin in the facade.
    pub(crate) fn add(&self, i: usize, n: u64) {
        if let Some(value) = self.values.get(i) {
            value.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(Some(counter)) = self.facade.get().and_then(|f| f.get(i)) {
            counter.increment(n);
        }
    }

    /// Sets counter `i` to at least `n` (a flag such as `stopped`).
    pub(crate) fn raise(&self, i: usize, n: u64) {
        if let Some(value) = self.values.get(i) {
            value.fetch_max(n, Ordering::Relaxed);
        }
    }

    /// Counter `i` now.
    pub(crate) fn get(&self, i: usize) -> u64 {
        self.values
            .get(i)
            .map_or(0, |value| value.load(Ordering::Relaxed))
    }
}

/// Declares a role's counters in one table, and derives from it:
///
/// - the public enum naming each counter, with `ALL`, `name()` and `help()`;
/// - the public snapshot struct, one `u64` field per counter, with `get`;
/// - `const COUNTERS: usize` (how many) and `TABLE`, the [`Counter`]s in
///   the enum's order, for [`Counters`].
///
/// Each row: its rustdoc (on the variant and on the field), then
/// `field / Variant = "facade name", "help text";`, or
/// `field / Variant = _, "help text";` for a counter the facade does not show.
macro_rules! counters {
    (
        $(#[$enum_doc:meta])* pub enum $Enum:ident;
        $(#[$counts_doc:meta])* pub struct $Counts:ident;
        $(
            $(#[$doc:meta])*
            $field:ident / $Variant:ident = $name:tt, $help:literal;
        )+
    ) => {
        $(#[$enum_doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $Enum {
            $( $(#[$doc])* $Variant, )+
        }

        /// How many counters the role has.
        pub(crate) const COUNTERS: usize = [$(stringify!($Variant)),+].len();

        /// The role's counters as the metrics facade shows them, in the
        /// order of their enum.
        pub(crate) const TABLE: [$crate::instrument::Counter; COUNTERS] = [
            $( $crate::instrument::Counter {
                name: $crate::instrument::counters!(@name $name),
                help: $help,
            }, )+
        ];

        impl $Enum {
            /// Every counter, in the order of the snapshot's fields.
            pub const ALL: [$Enum; COUNTERS] = [$($Enum::$Variant),+];

            /// Its name in the metrics facade (for example
            /// `outbox_relay_published_total`), or `None` for a counter
            /// read only on the handle.
            pub fn name(self) -> Option<&'static str> {
                TABLE[self as usize].name
            }

            /// The help text the metrics facade shows with it.
            pub fn help(self) -> &'static str {
                TABLE[self as usize].help
            }
        }

        $(#[$counts_doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        #[non_exhaustive]
        pub struct $Counts {
            $( $(#[$doc])* pub $field: u64, )+
        }

        impl $Counts {
            /// The value of one counter.
            pub fn get(&self, counter: $Enum) -> u64 {
                match counter {
                    $( $Enum::$Variant => self.$field, )+
                }
            }

            /// The counters of `set` now.
            pub(crate) fn read(set: &$crate::instrument::Counters<COUNTERS>) -> $Counts {
                $Counts {
                    $( $field: set.get($Enum::$Variant as usize), )+
                }
            }
        }
    };
    (@name _) => { None };
    (@name $name:literal) => { Some($name) };
}
pub(crate) use counters;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use metrics::{Key, KeyName, Metadata, Recorder, SharedString};

    use super::*;
    use crate::consumer::{ConsumerCounter, ConsumerMetrics};
    use crate::relay::{RelayCounter, RelayMetrics};

    /// A metric's kind, unit and help text.
    type Described = (&'static str, Option<Unit>, String);
    /// A metric's kind and labels.
    type Registered = (&'static str, Vec<(String, String)>);

    /// What a recorder was told: per name, the kind, unit and help it was
    /// described with, the labels it was registered with, and a counter's
    /// value.
    #[derive(Default)]
    struct Told {
        described: Mutex<BTreeMap<String, Described>>,
        registered: Mutex<BTreeMap<String, Registered>>,
        counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    }

    impl Told {
        fn describe(
            &self,
            kind: &'static str,
            name: KeyName,
            unit: Option<Unit>,
            help: SharedString,
        ) {
            let mut described = self.described.lock().unwrap();
            described.insert(name.as_str().to_owned(), (kind, unit, help.to_string()));
        }

        fn register(&self, kind: &'static str, key: &Key) {
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            let mut registered = self.registered.lock().unwrap();
            registered.insert(key.name().to_owned(), (kind, labels));
        }

        fn counter(&self, name: &str) -> u64 {
            let counters = self.counters.lock().unwrap();
            counters.get(name).map_or(0, |c| c.load(Ordering::Relaxed))
        }
    }

    impl Recorder for Told {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.describe("counter", key, unit, help);
        }
        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.describe("gauge", key, unit, help);
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.describe("histogram", key, unit, help);
        }
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> metrics::Counter {
            self.register("counter", key);
            let value = Arc::new(AtomicU64::new(0));
            let mut counters = self.counters.lock().unwrap();
            counters.insert(key.name().to_owned(), value.clone());
            metrics::Counter::from_arc(value)
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> metrics::Gauge {
            self.register("gauge", key);
            metrics::Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> metrics::Histogram {
            self.register("histogram", key);
            metrics::Histogram::noop()
        }
    }

    /// Every metric a recorder is shown: name, kind, unit, label and help
    /// text, as the operations guide lists them. A change here is a change
    /// users' dashboards and alerts see.
    const SHOWN: [(&str, &str, Unit, &str, &str); 21] = [
        (
            "outbox_relay_published_total",
            "counter",
            Unit::Count,
            "table",
            "Outbox rows marked PUBLISHED.",
        ),
        (
            "outbox_relay_retried_total",
            "counter",
            Unit::Count,
            "table",
            "Rejections that scheduled a retry.",
        ),
        (
            "outbox_relay_parked_total",
            "counter",
            Unit::Count,
            "table",
            "Outbox rows parked as FAILED.",
        ),
        (
            "outbox_relay_unavailable_total",
            "counter",
            Unit::Count,
            "table",
            "Batches given back because the broker was unavailable.",
        ),
        (
            "outbox_relay_db_errors_total",
            "counter",
            Unit::Count,
            "table",
            "Database errors the relay backed off from.",
        ),
        (
            "outbox_relay_deleted_total",
            "counter",
            Unit::Count,
            "table",
            "Published rows deleted by retention.",
        ),
        (
            "outbox_relay_deferred_total",
            "counter",
            Unit::Count,
            "table",
            "Outbox rows deferred because the broker refused their destination to the relay's user.",
        ),
        (
            "outbox_relay_publish_seconds",
            "histogram",
            Unit::Seconds,
            "table",
            "A batch from its claim to the broker's receipt.",
        ),
        (
            "outbox_backlog_rows",
            "gauge",
            Unit::Count,
            "table",
            "Outbox rows waiting to be published.",
        ),
        (
            "outbox_backlog_oldest_seconds",
            "gauge",
            Unit::Seconds,
            "table",
            "Age of the oldest waiting outbox row.",
        ),
        (
            "outbox_parked_rows",
            "gauge",
            Unit::Count,
            "table",
            "Outbox rows parked as FAILED.",
        ),
        (
            "outbox_consumer_processed_total",
            "counter",
            Unit::Count,
            "consumer",
            "Events applied.",
        ),
        (
            "outbox_consumer_duplicates_total",
            "counter",
            Unit::Count,
            "consumer",
            "Deliveries acknowledged without running the handler.",
        ),
        (
            "outbox_consumer_retried_total",
            "counter",
            Unit::Count,
            "consumer",
            "Deliveries set aside for a local retry.",
        ),
        (
            "outbox_consumer_parked_total",
            "counter",
            Unit::Count,
            "consumer",
            "Deliveries parked as FAILED.",
        ),
        (
            "outbox_consumer_handler_failures_total",
            "counter",
            Unit::Count,
            "consumer",
            "Handler errors and panics.",
        ),
        (
            "outbox_consumer_db_errors_total",
            "counter",
            Unit::Count,
            "consumer",
            "Database errors the consumer backed off from.",
        ),
        (
            "outbox_consumer_in_flight",
            "gauge",
            Unit::Count,
            "consumer",
            "Deliveries being applied now.",
        ),
        (
            "outbox_consumer_latency_seconds",
            "histogram",
            Unit::Seconds,
            "consumer",
            "From an event's append to its handler's commit.",
        ),
        (
            "outbox_inbox_retrying_rows",
            "gauge",
            Unit::Count,
            "consumer",
            "Inbox rows waiting for a retry.",
        ),
        (
            "outbox_inbox_parked_rows",
            "gauge",
            Unit::Count,
            "consumer",
            "Inbox rows parked as FAILED.",
        ),
    ];

    #[test]
    fn the_recorder_is_shown_every_metric_with_its_name_unit_label_and_help() {
        let told = Told::default();
        metrics::with_local_recorder(&told, || {
            RelayMetrics::default().register("outbox_event");
            ConsumerMetrics::default().register("points");
        });
        let described = told.described.lock().unwrap().clone();
        let registered = told.registered.lock().unwrap().clone();
        assert_eq!(described.len(), SHOWN.len(), "{described:#?}");
        assert_eq!(registered.len(), SHOWN.len(), "{registered:#?}");
        for (name, kind, unit, label, help) in SHOWN {
            assert_eq!(
                described.get(name),
                Some(&(kind, Some(unit), help.to_owned())),
                "{name}"
            );
            let value = if label == "table" {
                "outbox_event"
            } else {
                "points"
            };
            assert_eq!(
                registered.get(name),
                Some(&(kind, vec![(label.to_owned(), value.to_owned())])),
                "{name}"
            );
        }
        // The counters' own descriptions agree with what the recorder saw.
        let shown = RelayCounter::ALL
            .iter()
            .filter_map(|c| c.name().map(|n| (n, c.help())))
            .chain(
                ConsumerCounter::ALL
                    .iter()
                    .filter_map(|c| c.name().map(|n| (n, c.help()))),
            );
        for (name, help) in shown {
            assert_eq!(described.get(name).map(|d| d.2.as_str()), Some(help));
        }
    }

    #[test]
    fn a_count_goes_to_the_snapshot_and_to_its_twin_in_the_facade() {
        let told = Told::default();
        let relay = RelayMetrics::default();
        relay.add(RelayCounter::Published, 2);
        metrics::with_local_recorder(&told, || relay.register("outbox_event"));
        relay.add(RelayCounter::Published, 3);
        relay.add(RelayCounter::Failed, 1);
        relay.stopped();
        relay.stopped();
        let counts = relay.snapshot();
        assert_eq!((counts.published, counts.failed, counts.stopped), (5, 1, 1));
        assert_eq!(relay.get(RelayCounter::Published), 5);
        assert_eq!(counts.get(RelayCounter::Failed), 1);
        // The facade counts from its registration on.
        assert_eq!(told.counter("outbox_relay_published_total"), 3);
        assert_eq!(told.counter("outbox_relay_parked_total"), 1);
        assert_eq!(RelayCounter::Stopped.name(), None);

        let consumer = ConsumerMetrics::default();
        metrics::with_local_recorder(&told, || consumer.register("points"));
        consumer.add(ConsumerCounter::HandlerFailures, 1);
        consumer.add(ConsumerCounter::AckFailures, 1);
        let counts = consumer.snapshot();
        assert_eq!((counts.handler_failures, counts.ack_failures), (1, 1));
        assert_eq!(told.counter("outbox_consumer_handler_failures_total"), 1);
    }

    #[test]
    fn a_counter_adds_up_and_a_flag_is_raised_once() {
        let counters = Counters::<2>::default();
        counters.add(0, 2);
        counters.add(0, 3);
        counters.raise(1, 1);
        counters.raise(1, 1);
        assert_eq!((counters.get(0), counters.get(1)), (5, 1));
        // Out of range is nothing, not a panic.
        counters.add(2, 1);
        assert_eq!(counters.get(2), 0);
    }
}
