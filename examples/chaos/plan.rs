//! What a seed generates: the workload (events to append, foreign messages to
//! put on the consumers' queues, what each handler does with each event) and
//! the fault schedule. Everything here is a pure function of the seed and the
//! options, so a seed always yields the same plan.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};

/// The producer's broker limits: smaller than ActiveMQ's 100 MiB, so that an
/// event over them costs a few MiB of memory, not a hundred.
pub(crate) const PRODUCER_MAX_FRAME: usize = 4 * 1024 * 1024;
/// The most headers a message may have (`BrokerLimits::max_headers`).
pub(crate) const PRODUCER_MAX_HEADERS: usize = 1000;
/// The longest header line (`BrokerLimits::max_header_line`).
pub(crate) const PRODUCER_MAX_HEADER_LINE: usize = 10 * 1024;

/// The Virtual Topic the producer publishes to.
pub(crate) const TOPIC: &str = "chaos";

/// The consumer services, each with its own queue on [`TOPIC`].
pub(crate) const CONSUMERS: [&str; 2] = ["alpha", "beta"];

/// Classes of input that can be left out of a run (`--exclude`), for known
/// open defects: a fixed seed in the test suite must pass, and the switch is
/// removed once the defect is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Class {
    /// Handlers that swallow a database error and return `Ok`.
    Swallow,
    /// Foreign messages over the consumer's frame limits (16 MiB, 256 headers).
    Oversize,
    /// Outbox rows whose headers the relay cannot decode.
    CorruptRow,
    /// Foreign messages with an empty `event-id`.
    EmptyId,
    /// Foreign messages whose ids differ only in case.
    CaseId,
    /// Clock skews ahead (left out, every skew is behind): a producer whose
    /// process has no reading of the database's clock (none taken yet, or
    /// the reading failed) stamps a row's `next_attempt_at` with its own
    /// clock, so a row appended on a clock an hour ahead waits an hour
    /// before any relay takes it, and its key's later rows wait behind it.
    ClockAhead,
    /// Keyed events whose handler always fails (about 30 % of them; the
    /// rest go unkeyed). Left out, no key is ever held behind a parked
    /// event, so a run with few keys checks their order for its whole
    /// length.
    KeyedPark,
}

impl Class {
    pub(crate) const ALL: [Class; 7] = [
        Class::Swallow,
        Class::Oversize,
        Class::CorruptRow,
        Class::EmptyId,
        Class::CaseId,
        Class::ClockAhead,
        Class::KeyedPark,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Class::Swallow => "swallow",
            Class::Oversize => "oversize",
            Class::CorruptRow => "corrupt-row",
            Class::EmptyId => "empty-id",
            Class::CaseId => "case-id",
            Class::ClockAhead => "clock-ahead",
            Class::KeyedPark => "keyed-park",
        }
    }

    pub(crate) fn parse_list(list: &str) -> Result<BTreeSet<Class>, String> {
        let mut classes = BTreeSet::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let class = Class::ALL
                .into_iter()
                .find(|c| c.name() == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = Class::ALL.iter().map(|c| c.name()).collect();
                    format!(
                        "unknown class {name:?} in --exclude; known: {}",
                        known.join(",")
                    )
                })?;
            classes.insert(class);
        }
        Ok(classes)
    }
}

/// What a consumer's handler does with an event; carried in the event's
/// `chaos-behave` header so every consumer process knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "n")]
pub(crate) enum Behaviour {
    /// Writes its row.
    Apply,
    /// Fails its first `n` attempts, then writes its row.
    FailTimes(u32),
    /// Fails every attempt: parked.
    AlwaysFail,
    /// Writes its row, runs a statement that violates a unique key, ignores
    /// the error and returns `Ok`. Where the database gives up the whole
    /// transaction on a failed statement (PostgreSQL) it must be parked,
    /// never acknowledged; where only the statement fails (SQLite, MariaDB)
    /// the transaction still holds the row and the handler said `Ok`, so it
    /// is applied once (docs/guarantees.md).
    Swallow,
    /// Panics: parked.
    Panic,
    /// Sleeps this many milliseconds, then writes its row.
    Slow(u32),
}

impl Behaviour {
    /// The header value.
    pub(crate) fn header(self) -> String {
        match self {
            Behaviour::Apply => "apply".into(),
            Behaviour::FailTimes(n) => format!("fail-times:{n}"),
            Behaviour::AlwaysFail => "always-fail".into(),
            Behaviour::Swallow => "swallow".into(),
            Behaviour::Panic => "panic".into(),
            Behaviour::Slow(ms) => format!("slow:{ms}"),
        }
    }

    pub(crate) fn parse(header: &str) -> Option<Behaviour> {
        let (kind, n) = match header.split_once(':') {
            Some((kind, n)) => (kind, n.parse().ok()?),
            None => (header, 0),
        };
        Some(match kind {
            "apply" => Behaviour::Apply,
            "fail-times" => Behaviour::FailTimes(n),
            "always-fail" => Behaviour::AlwaysFail,
            "swallow" => Behaviour::Swallow,
            "panic" => Behaviour::Panic,
            "slow" => Behaviour::Slow(n),
            _ => return None,
        })
    }

    /// Whether the event must end parked in each consumer's inbox, on a
    /// database that does (`aborts`) or does not give up a transaction
    /// when one of its statements fails.
    pub(crate) fn parks(self, aborts: bool) -> bool {
        match self {
            Behaviour::AlwaysFail | Behaviour::Panic => true,
            Behaviour::Swallow => aborts,
            _ => false,
        }
    }
}

/// How an event's message breaks the producer's limits, if it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum OverLimit {
    /// A payload larger than the largest frame.
    Payload,
    /// More headers than a frame may have.
    Headers,
    /// One header line longer than allowed.
    HeaderLine,
}

/// One event the producer appends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PlannedEvent {
    /// Its place in the workload, from 1.
    pub(crate) seq: i64,
    /// Its key, if any.
    pub(crate) key: Option<String>,
    /// Its place among the events of its key, from 1.
    pub(crate) kseq: i64,
    pub(crate) behaviour: Behaviour,
    /// Payload bytes.
    pub(crate) size: usize,
    /// Extra headers.
    pub(crate) headers: usize,
    /// Over the producer's limits: must be refused at append.
    pub(crate) over: Option<OverLimit>,
    /// Written, then its row's headers made undecodable in the same transaction.
    pub(crate) corrupt: bool,
}

/// What a planned event must become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expected {
    /// Refused at append with a typed error; no row.
    Refused,
    /// Parked by the relay (a `FAILED` outbox row).
    ParkedAtRelay,
    /// Parked by each consumer (a `FAILED` inbox row), nothing applied.
    ParkedAtInbox,
    /// Applied exactly once by each consumer.
    Applied,
}

impl PlannedEvent {
    /// What the event must become on a database that does (`aborts`) or
    /// does not give up a transaction whose statement failed.
    pub(crate) fn expected(&self, aborts: bool) -> Expected {
        if self.over.is_some() {
            Expected::Refused
        } else if self.corrupt {
            Expected::ParkedAtRelay
        } else if self.behaviour.parks(aborts) {
            Expected::ParkedAtInbox
        } else {
            Expected::Applied
        }
    }

    /// The payload: `size` bytes, the same for every run of the seed.
    pub(crate) fn payload(&self) -> Vec<u8> {
        let pattern = format!("chaos-seq-{};", self.seq);
        pattern.bytes().cycle().take(self.size).collect()
    }
}

/// How a foreign message (sent straight to the topic with raw STOMP, not by a
/// relay) is odd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Oddity {
    /// An `event-id` of 120 characters whose first 64 match another's.
    LongId,
    /// An `event-id` that differs from another only in case.
    CaseId,
    /// No `event-id`: the broker's `message-id` is the dedup id.
    MissingId,
    /// An empty `event-id`.
    EmptyId,
    /// A body that is not JSON.
    Undecodable,
    /// A body over the consumer's 16 MiB frame limit.
    HugeBody,
    /// More headers than the consumer accepts.
    ManyHeaders,
}

/// One foreign message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ForeignMessage {
    /// Its number, from 1; the body carries it.
    pub(crate) fid: i64,
    pub(crate) oddity: Oddity,
    /// The `event-id` header, if any.
    pub(crate) event_id: Option<String>,
    /// Times it is sent (a second send is a duplicate the inbox must skip).
    pub(crate) copies: u32,
    /// When it is sent, from the start of the run.
    pub(crate) at_ms: u64,
}

/// What must become of a foreign message, at each consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForeignExpected {
    /// Applied once.
    Applied,
    /// Parked (undecodable).
    Parked,
    /// Applied once or parked, nothing else (over a limit, empty id).
    AppliedOrParked,
}

impl ForeignMessage {
    pub(crate) fn expected(&self) -> ForeignExpected {
        match self.oddity {
            Oddity::LongId | Oddity::CaseId | Oddity::MissingId => ForeignExpected::Applied,
            Oddity::Undecodable => ForeignExpected::Parked,
            Oddity::EmptyId | Oddity::HugeBody | Oddity::ManyHeaders => {
                ForeignExpected::AppliedOrParked
            }
        }
    }

    /// The marker every body carries, to find the message in parked rows.
    pub(crate) fn marker(&self) -> String {
        format!("chaos-fid-{};", self.fid)
    }

    /// The body.
    pub(crate) fn body(&self) -> Vec<u8> {
        match self.oddity {
            Oddity::Undecodable => format!("{{not json {}", self.marker()).into_bytes(),
            Oddity::HugeBody => {
                let mut body =
                    format!("{{\"fid\":{},\"note\":\"{}", self.fid, self.marker()).into_bytes();
                body.resize(17 * 1024 * 1024, b'x');
                body.extend_from_slice(b"\"}");
                body
            }
            _ => format!("{{\"fid\":{},\"note\":\"{}\"}}", self.fid, self.marker()).into_bytes(),
        }
    }

    /// Headers beyond `destination`, `event-id`, `persistent`, `receipt`.
    pub(crate) fn extra_headers(&self) -> Vec<(String, String)> {
        match self.oddity {
            Oddity::ManyHeaders => (0..300)
                .map(|n| (format!("x-chaos-{n}"), n.to_string()))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A fault the runner injects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub(crate) enum Fault {
    /// SIGKILL a service at a random moment, restart it after `pause_ms`.
    Kill { service: String, pause_ms: u64 },
    /// Restart a service with a failpoint armed for its `at`-th hit; it
    /// kills itself there and is restarted without it.
    Failpoint {
        service: String,
        point: String,
        at: u32,
    },
    /// kill -9 the broker, start it again on the same data after `down_ms`.
    BrokerKill { down_ms: u64 },
    /// SIGSTOP the broker for `ms`, then SIGCONT.
    BrokerFreeze { ms: u64 },
    /// Close every connection of a service's proxy (FIN).
    ProxyCut { service: String },
    /// Reset every connection of a service's proxy (RST).
    ProxyReset { service: String },
    /// Reset in the middle of the next chunk towards the broker or the service.
    ProxyResetMidFrame { service: String, to_broker: bool },
    /// Read and drop everything both ways for `ms` (a half-open link).
    ProxyBlackhole { service: String, ms: u64 },
    /// Stop reading one direction for `ms`.
    ProxyFreeze {
        service: String,
        to_broker: bool,
        ms: u64,
    },
    /// Terminate every database session of the services.
    DbTerminate,
    /// Restart a producer or relay with its wall clock off by `skew_ms`
    /// (`OUTBOX_CLOCK_SKEW_MS`): ahead when positive. The skew stays with
    /// the service through later restarts, as a host's clock would, until
    /// another skew replaces it.
    ClockSkew { service: String, skew_ms: i64 },
}

impl Fault {
    /// The kind, for counts.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "sigkill",
            Fault::Failpoint { .. } => "failpoint",
            Fault::BrokerKill { .. } => "broker-kill",
            Fault::BrokerFreeze { .. } => "broker-freeze",
            Fault::ProxyCut { .. } => "proxy-cut",
            Fault::ProxyReset { .. } => "proxy-reset",
            Fault::ProxyResetMidFrame { .. } => "proxy-reset-mid-frame",
            Fault::ProxyBlackhole { .. } => "proxy-blackhole",
            Fault::ProxyFreeze { .. } => "proxy-freeze",
            Fault::DbTerminate => "db-terminate",
            Fault::ClockSkew { .. } => "clock-skew",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |to_broker: &bool| {
            if *to_broker {
                "to broker"
            } else {
                "to service"
            }
        };
        match self {
            Fault::Kill { service, pause_ms } => {
                write!(f, "SIGKILL {service}, restart after {pause_ms} ms")
            }
            Fault::Failpoint { service, point, at } => {
                write!(f, "restart {service} with failpoint {point}@{at}")
            }
            Fault::BrokerKill { down_ms } => write!(f, "kill -9 the broker, {down_ms} ms down"),
            Fault::BrokerFreeze { ms } => write!(f, "SIGSTOP the broker for {ms} ms"),
            Fault::ProxyCut { service } => write!(f, "cut {service}'s broker connections"),
            Fault::ProxyReset { service } => write!(f, "reset {service}'s broker connections"),
            Fault::ProxyResetMidFrame { service, to_broker } => write!(
                f,
                "reset {service}'s broker connections mid-frame ({})",
                side(to_broker)
            ),
            Fault::ProxyBlackhole { service, ms } => {
                write!(f, "blackhole {service}'s broker link for {ms} ms")
            }
            Fault::ProxyFreeze {
                service,
                to_broker,
                ms,
            } => write!(
                f,
                "freeze {service}'s broker link ({}) for {ms} ms",
                side(to_broker)
            ),
            Fault::DbTerminate => write!(f, "terminate the services' database sessions"),
            Fault::ClockSkew { service, skew_ms } => {
                write!(f, "restart {service} with its clock {}", skew(*skew_ms))
            }
        }
    }
}

/// A clock skew as people read it: `37.5 min ahead (+2250000 ms)`.
pub(crate) fn skew(ms: i64) -> String {
    format!(
        "{:.1} min {} ({ms:+} ms)",
        ms.unsigned_abs() as f64 / 60_000.0,
        if ms >= 0 { "ahead" } else { "behind" }
    )
}

/// The whole plan of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) seed: u64,
    /// How long faults are injected.
    pub(crate) fault_ms: u64,
    /// Appends per second.
    pub(crate) rate: f64,
    pub(crate) events: Vec<PlannedEvent>,
    pub(crate) foreign: Vec<ForeignMessage>,
    /// Faults per minute by kind, as drawn from the seed.
    pub(crate) rates: Vec<(String, f64)>,
    /// `(at_ms, fault)`, in time order.
    pub(crate) faults: Vec<(u64, Fault)>,
    pub(crate) excluded: BTreeSet<Class>,
    /// Whether a failed statement makes the database give up the whole
    /// transaction (PostgreSQL): what a swallowed error must become.
    #[serde(default)]
    pub(crate) aborts: bool,
    /// When the second relay ([`RELAY2`]) runs, `(from_ms, until_ms)` from
    /// the start: a relay of its own process on the same outbox, sharing
    /// the key partitions with the producer's, so that a skewed clock on
    /// either would matter if leases were decided on the host's clock.
    #[serde(default)]
    pub(crate) second_relay: Option<(u64, u64)>,
}

/// The services faults may strike.
pub(crate) const PRODUCER: &str = "producer";

/// A second relay process on the producer's database, for part of the run.
pub(crate) const RELAY2: &str = "relay2";

fn services() -> Vec<String> {
    [PRODUCER, RELAY2]
        .into_iter()
        .chain(CONSUMERS)
        .map(str::to_owned)
        .collect()
}

impl Plan {
    /// The plan of `seed`: a run whose faults last `fault_time`, on a database
    /// that can (`db_sessions`) or cannot have its sessions terminated, and
    /// that does (`aborts`) or does not give up a transaction whose
    /// statement failed.
    pub(crate) fn generate(
        seed: u64,
        fault_time: Duration,
        db_sessions: bool,
        aborts: bool,
        excluded: BTreeSet<Class>,
    ) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        let fault_ms = u64::try_from(fault_time.as_millis())
            .unwrap_or(u64::MAX)
            .max(10_000);
        // Appends during the first 70 % of the fault time.
        let rate = rng.gen_range(4.0..10.0);
        let count = ((fault_ms as f64 / 1000.0) * 0.7 * rate).round().max(20.0) as i64;
        let events = workload(&mut rng, count, &excluded);
        let foreign = foreign(&mut rng, fault_ms, &excluded);
        // The second relay joins early and leaves before the faults stop.
        let second_relay = (
            rng.gen_range(fault_ms / 20..fault_ms / 4),
            rng.gen_range(fault_ms * 6 / 10..fault_ms * 9 / 10),
        );
        let (rates, faults) = schedule(
            &mut rng,
            fault_ms,
            db_sessions,
            second_relay,
            excluded.contains(&Class::ClockAhead),
        );
        Plan {
            seed,
            fault_ms,
            rate,
            events,
            foreign,
            rates,
            faults,
            excluded,
            aborts,
            second_relay: Some(second_relay),
        }
    }

    /// A readable account of the plan: the workload's mix and every fault.
    pub(crate) fn describe(&self) -> String {
        let mut out = String::new();
        let mut mix: HashMap<String, usize> = HashMap::new();
        for event in &self.events {
            let name = match (event.over, event.corrupt) {
                (Some(over), _) => format!("over the limits ({over:?})"),
                (None, true) => "corrupt row".to_owned(),
                (None, false) => match event.behaviour {
                    Behaviour::FailTimes(_) => "fails n times".to_owned(),
                    Behaviour::Slow(_) => "slow".to_owned(),
                    other => other.header(),
                },
            };
            *mix.entry(name).or_default() += 1;
        }
        let mut mix: Vec<_> = mix.into_iter().collect();
        mix.sort();
        let keys: BTreeSet<&str> = self
            .events
            .iter()
            .filter_map(|e| e.key.as_deref())
            .collect();
        out.push_str(&format!(
            "workload: {} events at {:.1}/s over {} keys (and unkeyed); {}\n",
            self.events.len(),
            self.rate,
            keys.len(),
            mix.iter()
                .map(|(name, n)| format!("{name} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        out.push_str(&format!(
            "foreign messages: {}\n",
            self.foreign
                .iter()
                .map(|m| format!(
                    "#{} {:?}×{} at {:.1}s",
                    m.fid,
                    m.oddity,
                    m.copies,
                    m.at_ms as f64 / 1000.0
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let excluded: Vec<&str> = self.excluded.iter().map(|c| c.name()).collect();
        out.push_str(&format!(
            "excluded classes: {}\n",
            if excluded.is_empty() {
                "none".to_owned()
            } else {
                excluded.join(",")
            }
        ));
        if let Some((from, until)) = self.second_relay {
            out.push_str(&format!(
                "second relay ({RELAY2}): from {:.1}s to {:.1}s\n",
                from as f64 / 1000.0,
                until as f64 / 1000.0
            ));
        }
        out.push_str("fault rates per minute: ");
        out.push_str(
            &self
                .rates
                .iter()
                .map(|(kind, rate)| format!("{kind} {rate:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        out.push('\n');
        out.push_str(&format!(
            "fault schedule ({} faults over {:.0} s):\n",
            self.faults.len(),
            self.fault_ms as f64 / 1000.0
        ));
        for (at, fault) in &self.faults {
            out.push_str(&format!("  {:>7.1}s  {fault}\n", *at as f64 / 1000.0));
        }
        out
    }
}

fn workload(rng: &mut StdRng, count: i64, excluded: &BTreeSet<Class>) -> Vec<PlannedEvent> {
    // Few keys (long runs per key, order matters) or many (mostly one event each).
    let key_count = if rng.gen_bool(0.5) {
        rng.gen_range(2..6)
    } else {
        rng.gen_range(50..500)
    };
    let mut kseqs: HashMap<String, i64> = HashMap::new();
    let mut events = Vec::new();
    for seq in 1..=count {
        let key = rng
            .gen_bool(0.8)
            .then(|| format!("k{}", rng.gen_range(0..key_count)));
        let roll = rng.gen_range(0..100);
        let mut behaviour = match roll {
            0..=64 => Behaviour::Apply,
            65..=74 => Behaviour::FailTimes(rng.gen_range(1..=2)),
            75..=79 => Behaviour::AlwaysFail,
            80..=83 => Behaviour::Swallow,
            84..=87 => Behaviour::Panic,
            _ => Behaviour::Slow(rng.gen_range(100..1500)),
        };
        if behaviour == Behaviour::Swallow && excluded.contains(&Class::Swallow) {
            behaviour = Behaviour::Apply;
        }
        // A parked event holds its key's later events until it is replayed;
        // most parking events go unkeyed, so a run with few keys keeps flowing.
        let key = if matches!(
            behaviour,
            Behaviour::AlwaysFail | Behaviour::Swallow | Behaviour::Panic
        ) && (rng.gen_bool(0.7) || excluded.contains(&Class::KeyedPark))
        {
            None
        } else {
            key
        };
        let size = match rng.gen_range(0..100) {
            0..=9 => 0,
            10..=79 => rng.gen_range(1..2048),
            80..=96 => rng.gen_range(2048..256 * 1024),
            _ => rng.gen_range(256 * 1024..2 * 1024 * 1024),
        };
        let mut event = PlannedEvent {
            seq,
            key: key.clone(),
            kseq: 0,
            behaviour,
            size,
            headers: if rng.gen_bool(0.1) {
                rng.gen_range(1..50)
            } else {
                0
            },
            over: None,
            corrupt: false,
        };
        match rng.gen_range(0..100) {
            0..=1 => {
                event.over = Some(OverLimit::Payload);
                event.size = PRODUCER_MAX_FRAME + rng.gen_range(1..64 * 1024);
            }
            2 => {
                event.over = Some(OverLimit::Headers);
                event.headers = PRODUCER_MAX_HEADERS + 1;
            }
            3 => event.over = Some(OverLimit::HeaderLine),
            4..=5 if !excluded.contains(&Class::CorruptRow) => event.corrupt = true,
            _ => {}
        }
        // Only events that reach the consumers take a place in their key's order.
        if event.over.is_none()
            && !event.corrupt
            && let Some(key) = &key
        {
            let next = kseqs.entry(key.clone()).or_default();
            *next += 1;
            event.kseq = *next;
        }
        events.push(event);
    }
    events
}

fn foreign(rng: &mut StdRng, fault_ms: u64, excluded: &BTreeSet<Class>) -> Vec<ForeignMessage> {
    let mut oddities = vec![
        Oddity::LongId,
        Oddity::LongId,
        Oddity::MissingId,
        Oddity::Undecodable,
        Oddity::Undecodable,
    ];
    if !excluded.contains(&Class::CaseId) {
        oddities.extend([Oddity::CaseId, Oddity::CaseId]);
    }
    if !excluded.contains(&Class::EmptyId) {
        oddities.extend([Oddity::EmptyId, Oddity::EmptyId]);
    }
    if !excluded.contains(&Class::Oversize) {
        oddities.extend([Oddity::HugeBody, Oddity::ManyHeaders]);
    }
    oddities.shuffle(rng);
    let stem = format!("ID:chaos-{:016x}-", rng.r#gen::<u64>()).repeat(4);
    let case = format!("Chaos-Case-{:08x}", rng.r#gen::<u32>());
    let (mut long, mut cased) = (0, 0);
    oddities
        .into_iter()
        .enumerate()
        .map(|(n, oddity)| {
            let fid = n as i64 + 1;
            let event_id = match oddity {
                Oddity::LongId => {
                    long += 1;
                    Some(format!("{stem:.64}{:->56}", long))
                }
                Oddity::CaseId => {
                    cased += 1;
                    Some(if cased == 1 {
                        case.clone()
                    } else {
                        case.to_lowercase()
                    })
                }
                Oddity::MissingId => None,
                Oddity::EmptyId => Some(String::new()),
                _ => Some(format!("chaos-foreign-{fid}-{:08x}", rng.r#gen::<u32>())),
            };
            // Sent twice where a second copy is a duplicate the inbox must skip.
            let copies = match oddity {
                Oddity::LongId | Oddity::CaseId | Oddity::Undecodable => 2,
                _ => 1,
            };
            ForeignMessage {
                fid,
                oddity,
                event_id,
                copies,
                at_ms: rng.gen_range(fault_ms / 10..fault_ms * 8 / 10),
            }
        })
        .collect()
}

/// `(at_ms, fault)` pairs.
type Schedule = Vec<(u64, Fault)>;

fn schedule(
    rng: &mut StdRng,
    fault_ms: u64,
    db_sessions: bool,
    second_relay: (u64, u64),
    behind_only: bool,
) -> (Vec<(String, f64)>, Schedule) {
    let services = services();
    let mut kinds: Vec<(&str, f64)> = vec![
        ("sigkill", rng.gen_range(1.0..4.0)),
        ("failpoint", rng.gen_range(1.0..4.0)),
        ("broker-kill", rng.gen_range(0.3..1.5)),
        ("broker-freeze", rng.gen_range(0.0..1.0)),
        ("proxy-cut", rng.gen_range(0.0..2.0)),
        ("proxy-reset", rng.gen_range(0.0..2.0)),
        ("proxy-reset-mid-frame", rng.gen_range(0.0..2.0)),
        ("proxy-blackhole", rng.gen_range(0.0..1.5)),
        ("proxy-freeze", rng.gen_range(0.0..1.5)),
    ];
    if db_sessions {
        kinds.push(("db-terminate", rng.gen_range(0.5..3.0)));
    }
    kinds.push(("clock-skew", rng.gen_range(1.0..4.0)));
    let minutes = fault_ms as f64 / 60_000.0;
    let mut faults = Vec::new();
    for (kind, rate) in &kinds {
        // At least one of the process and broker faults in every run.
        let floor = matches!(
            *kind,
            "sigkill" | "failpoint" | "broker-kill" | "clock-skew"
        ) as u32;
        let count = ((rate * minutes).round() as u32).max(floor);
        for _ in 0..count {
            let at = rng.gen_range(fault_ms / 20..fault_ms * 9 / 10);
            let mut service = if *kind == "clock-skew" {
                [PRODUCER, RELAY2][rng.gen_range(0..2)].to_owned()
            } else {
                services[rng.gen_range(0..services.len())].clone()
            };
            // The second relay only while it runs (with a margin for its start).
            if service == RELAY2 && !(second_relay.0 + 2000..second_relay.1).contains(&at) {
                service = PRODUCER.to_owned();
            }
            let fault = match *kind {
                "sigkill" => Fault::Kill {
                    service,
                    pause_ms: rng.gen_range(0..1500),
                },
                "failpoint" => {
                    let points: &[&str] = if service == PRODUCER {
                        &["relay.before_publish", "relay.after_receipt"]
                    } else {
                        &["inbox.before_commit", "inbox.after_commit"]
                    };
                    Fault::Failpoint {
                        point: points[rng.gen_range(0..points.len())].to_owned(),
                        at: rng.gen_range(1..12),
                        service,
                    }
                }
                "broker-kill" => Fault::BrokerKill {
                    down_ms: rng.gen_range(200..4000),
                },
                "broker-freeze" => Fault::BrokerFreeze {
                    ms: rng.gen_range(500..6000),
                },
                "proxy-cut" => Fault::ProxyCut { service },
                "proxy-reset" => Fault::ProxyReset { service },
                "proxy-reset-mid-frame" => Fault::ProxyResetMidFrame {
                    service,
                    to_broker: rng.gen_bool(0.5),
                },
                "proxy-blackhole" => Fault::ProxyBlackhole {
                    service,
                    ms: rng.gen_range(1000..10_000),
                },
                "proxy-freeze" => Fault::ProxyFreeze {
                    service,
                    to_broker: rng.gen_bool(0.5),
                    ms: rng.gen_range(1000..10_000),
                },
                "clock-skew" => {
                    // Minutes to an hour, ahead or behind.
                    let size = rng.gen_range(60_000..3_600_000i64);
                    let ahead = rng.gen_bool(0.5) && !behind_only;
                    Fault::ClockSkew {
                        service,
                        skew_ms: if ahead { size } else { -size },
                    }
                }
                _ => Fault::DbTerminate,
            };
            faults.push((at, fault));
        }
    }
    faults.sort_by_key(|(at, _)| *at);
    let rates = kinds.into_iter().map(|(k, r)| (k.to_owned(), r)).collect();
    (rates, faults)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_yields_the_same_plan() {
        let a = Plan::generate(7, Duration::from_secs(60), true, true, BTreeSet::new());
        let b = Plan::generate(7, Duration::from_secs(60), true, true, BTreeSet::new());
        assert_eq!(
            serde_json::to_string(&a).ok(),
            serde_json::to_string(&b).ok()
        );
    }
}
