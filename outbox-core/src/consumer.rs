//! The consumer runtime: commit, then ack.
//!
//! For every delivery:
//!
//! ```text
//! decode ──fails──► park FAILED with raw bytes ─────────────────────────┐
//!   │                                                                   │
//! BEGIN ─► INSERT inbox row ──unique violation──► ROLLBACK (duplicate) ──┤
//!   │                                                                   ├─► ACK
//! handler(tx, event) ──Err──► ROLLBACK, INSERT RETRY row with payload ──┤
//!   │                                                                   │
//! COMMIT ───────────────────────────────────────────────────────────────┘
//! ```
//!
//! A database error anywhere leaves the message unacked and the delivery is
//! tried again with backoff; if the process dies, the broker redelivers it and
//! the inbox row decides. `RETRY` rows are picked up by a local retry loop: the
//! row is switched to `PROCESSED` inside the handler's transaction, so the
//! row lock makes two processes retrying the same row harmless. NACK is never
//! used — on ActiveMQ it sends the message straight to the dead-letter queue.
//!
//! ActiveMQ holds an unacknowledged message, and its prefetch slot, until its
//! connection ends. So an ACK that fails while the connection lives is tried
//! again a few times with backoff, and if it still fails — or a delivery can
//! be neither recorded nor parked — the consumer ends that connection: the
//! client reconnects, the broker delivers the message again and its inbox
//! row settles it. Health reports the failure until a delivery settles.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt as _;
use outbox_stomp::{AckMode, Client, Subscribe};
use tracing::Instrument as _;

pub use crate::subscriber::{Incoming, LinkStatus, StompSubscriber, Subscriber};
use serde::de::DeserializeOwned;
use sqlx::Transaction;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::backend::{Backend, HandlerTx, WriteGate};
use crate::backoff::Backoff;
pub use crate::error::HandlerError;
pub use crate::inbox::{DEFAULT_INBOX_TABLE, Delivery, Inbox};

use crate::inbox::fallback_event_id;
use crate::names::{ms, now_ms};
use crate::observe::{ConsumerInstruments, Health, Status, age_since};
use crate::store::inbox::DueRow;
use crate::store::{InboxState, Recorded};
use crate::{Error, failpoint, schema};

/// A boxed, sendable future: what a [`Handler`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Applies one kind of event inside the consumer's database transaction.
///
/// `#[transactional_event(consumer = …)]` implements this for an annotated
/// function; implement it by hand for anything else.
pub trait Handler<DB: Backend>: Send + Sync + 'static {
    /// The decoded event.
    type Event: Send + 'static;

    /// Decodes the payload. An error parks the delivery as `FAILED` with its
    /// raw bytes; the handler is not called.
    fn decode(&self, delivery: &Delivery) -> Result<Self::Event, String>;

    /// Applies the event. Everything written through `tx` commits together
    /// with the inbox row; an `Err` rolls it all back and schedules a retry.
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, DB>,
        event: Self::Event,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Called after the handler's transaction committed (before the ACK):
    /// a place for in-memory effects that must follow a durable write, such as
    /// metrics. The default does nothing.
    fn after_commit(&self, delivery: &Delivery) {
        let _ = delivery;
    }
}

/// Decodes a JSON payload; the error text names the type and the position.
pub fn decode_json<T: DeserializeOwned>(delivery: &Delivery) -> Result<T, String> {
    serde_json::from_slice(&delivery.body)
        .map_err(|e| format!("payload is not a valid {}: {e}", std::any::type_name::<T>()))
}

/// Settings of a consumer.
#[derive(Debug, Clone)]
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
    /// park a fresh delivery after `max_attempts` already. A database that
    /// cannot be reached (connection refused or cut, pool timeouts) counts
    /// for nothing: an outage is waited out however long it lasts. A batch
    /// of deliveries that meets this many errors is settled one by one, each
    /// with its own count.
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
    /// Checks the settings; [`Consumer::new`] calls it.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |setting, reason: String| Err(Error::InvalidConfig { setting, reason });
        if self.destination.trim().is_empty() {
            return invalid(
                "ConsumerConfig::destination",
                "is empty; name a queue such as /queue/orders".to_owned(),
            );
        }
        if let Err(reason) = outbox_rules::destination(&self.destination) {
            return invalid(
                "ConsumerConfig::destination",
                format!("{:?}: {reason}", self.destination),
            );
        }
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
            crate::relay::bounded(setting, value)?;
        }
        if let Some(keep) = self.retention {
            crate::relay::bounded("ConsumerConfig::retention", keep)?;
        }
        if let Some(every) = self.stats_interval {
            crate::relay::bounded("ConsumerConfig::stats_interval", every)?;
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
enum Count {
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
    fn add(&self, what: Count, n: u64) {
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
    fn handler_failed(&self) {
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

/// An inbox consumer: a handler, its inbox and its queue.
pub struct Consumer<DB: Backend, H: Handler<DB>> {
    shared: Arc<Shared<DB, H>>,
}

struct Shared<DB: Backend, H: Handler<DB>> {
    inbox: Inbox<DB>,
    handler: H,
    config: ConsumerConfig,
    metrics: Arc<ConsumerMetrics>,
    gate: WriteGate,
    /// Deliveries being settled now, and when the last one began or ended:
    /// inbox retention waits until the consumer has drained what the broker
    /// held for it ([`Drain`]).
    drain: Drain,
}

/// One delivery in progress, for [`Drain`].
struct InFlight<'a>(&'a Drain);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether the consumer has drained its queue since it started, or since its
/// link to the broker last dropped: no delivery in progress and none for a
/// quiet period. Until then inbox retention does not run, because the broker
/// may still redeliver messages the previous run (or the previous connection)
/// received, committed and never acked, however long ago; their inbox rows
/// must be there when they come.
#[derive(Debug)]
struct Drain {
    in_flight: std::sync::atomic::AtomicUsize,
    last_activity: std::sync::atomic::AtomicI64,
    drained: std::sync::atomic::AtomicBool,
}

impl Drain {
    fn new() -> Drain {
        Drain {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            last_activity: std::sync::atomic::AtomicI64::new(now_ms()),
            drained: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A delivery begins; it ends when the guard drops, however it ends.
    fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        InFlight(self)
    }

    /// Counts the quiet period from now (at subscribe, and while the
    /// connection is down: the broker cannot deliver then).
    fn touch(&self) {
        self.last_activity.store(now_ms(), Ordering::Release);
    }

    /// The link dropped (or an ACK failed, which it does when the link
    /// drops): messages committed but not acknowledged come again after the
    /// reconnect, so a fresh drain is waited for.
    fn reset(&self) {
        self.drained.store(false, Ordering::Release);
        self.touch();
    }

    /// `true` once nothing was in progress for `quiet` while connected, until
    /// the link drops or an ACK fails.
    fn drained(&self, quiet: Duration, connected: bool) -> bool {
        if !connected {
            self.reset();
            return false;
        }
        if self.drained.load(Ordering::Acquire) {
            return true;
        }
        let idle = self.in_flight.load(Ordering::Acquire) == 0
            && now_ms() - self.last_activity.load(Ordering::Acquire) >= ms(quiet);
        if idle {
            self.drained.store(true, Ordering::Release);
        }
        idle
    }
}

impl<DB: Backend, H: Handler<DB>> std::fmt::Debug for Consumer<DB, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("inbox", &self.shared.inbox)
            .field("destination", &self.shared.config.destination)
            .finish()
    }
}

/// A running consumer. [`shutdown`](crate::task::TaskHandle::shutdown) stops
/// taking deliveries, finishes (commits and acks) the ones in flight,
/// unsubscribes so unprocessed prefetched messages go back to the queue, and
/// waits for all of that.
pub type ConsumerHandle = crate::task::TaskHandle<ConsumerMetrics>;

/// What became of one delivery.
enum Outcome {
    Processed,
    Duplicate,
    Retry,
    Parked,
}

impl<DB: Backend, H: Handler<DB>> Consumer<DB, H> {
    /// A consumer that applies `handler` to the messages of
    /// `config.destination`, recording them in `inbox`. The settings are
    /// checked first ([`ConsumerConfig::validate`]).
    pub fn new(
        inbox: Inbox<DB>,
        handler: H,
        config: ConsumerConfig,
    ) -> Result<Consumer<DB, H>, Error> {
        config.validate()?;
        Ok(Consumer {
            shared: Arc::new(Shared {
                inbox,
                handler,
                config,
                metrics: Arc::default(),
                gate: WriteGate::new(DB::DIALECT),
                drain: Drain::new(),
            }),
        })
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<ConsumerMetrics> {
        self.shared.metrics.clone()
    }

    /// Subscribes (so a Virtual Topic consumer queue exists from now on) and
    /// starts consuming on a task.
    pub async fn spawn(self, client: Client) -> Result<ConsumerHandle, Error> {
        let config = &self.shared.config;
        let prefetch = config.effective_prefetch();
        let subscription = client
            .subscribe(
                Subscribe::new(config.destination.clone())
                    .ack(AckMode::ClientIndividual)
                    .prefetch(prefetch)
                    .buffer(usize::try_from(prefetch).unwrap_or(usize::MAX)),
            )
            .await?;
        Ok(self.spawn_on(StompSubscriber::new(client, subscription)))
    }

    /// Starts consuming `subscriber` on a task: any source of messages, such
    /// as a scripted one in a test. [`spawn`](Consumer::spawn) is this with a
    /// STOMP subscription.
    pub fn spawn_on<S: Subscriber>(self, subscriber: S) -> ConsumerHandle {
        crate::task::TaskHandle::spawn("consumer", self.metrics(), |stopped| {
            self.run(subscriber, stopped)
        })
    }

    async fn run<S: Subscriber>(
        self,
        subscription: S,
        stopped: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let status = subscription.status();
        let shared = self.shared;
        let _ = shared
            .metrics
            .instruments
            .set(ConsumerInstruments::new(shared.inbox.consumer()));
        shared.metrics.status.set_link(status.clone());
        let (workers, most) = workers_and_batch(
            DB::DIALECT.single_writer,
            shared.config.concurrency,
            shared.config.batch_size,
        );
        // The quiet period of the drain counts from the subscription.
        shared.drain.touch();
        let retry = tokio::spawn(retry_loop(shared.clone(), status.clone(), stopped.clone()));
        let subscription = if shared.config.per_key_order {
            in_key_lanes(&shared, subscription, stopped.clone(), workers, most).await
        } else {
            shared_subscription(&shared, subscription, stopped.clone(), workers, most).await
        };
        if !*stopped.borrow() {
            // The subscription ended on its own: the client stopped for good or
            // the broker refused to restore the subscription.
            let reason = status.end_reason();
            tracing::error!(destination = %shared.config.destination, %reason, "consumer stopped: the broker connection ended for good");
            shared.metrics.stopped.store(1, Ordering::Relaxed);
            shared.metrics.status.stopped(&reason);
            retry.abort();
            let _ = retry.await;
            return Err(Error::BrokerGone(reason));
        }
        let _ = retry.await;
        // Prefetched messages nobody took go back to the queue.
        if let Some(subscription) = subscription {
            subscription.close().await;
        }
        Ok(())
    }
}

/// Runs `workers` workers that each take up to `most` waiting messages
/// straight from the subscription, until the consumer stops or the
/// subscription ends; then hands the subscription back.
async fn shared_subscription<DB: Backend, H: Handler<DB>, S: Subscriber>(
    shared: &Arc<Shared<DB, H>>,
    subscription: S,
    stopped: watch::Receiver<bool>,
    workers: usize,
    most: usize,
) -> Option<S> {
    let subscription = Arc::new(tokio::sync::Mutex::new(subscription));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let shared = shared.clone();
        let subscription = subscription.clone();
        let mut stopped = stopped.clone();
        tasks.spawn(async move {
            loop {
                let batch = {
                    let mut subscription = subscription.lock().await;
                    let first = tokio::select! {
                        biased;
                        _ = stopped.wait_for(|s| *s) => return,
                        m = subscription.next_message() => m,
                    };
                    let Some(first) = first else {
                        tracing::warn!("subscription ended; consumer stops");
                        return;
                    };
                    gather(first, most, || subscription.try_next_message())
                };
                deliver(&shared, batch, &mut stopped).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(subscription)
        .ok()
        .map(tokio::sync::Mutex::into_inner)
}

/// Per-key order: one lane per worker, and a key's messages go to one lane
/// while any of them is there, so a key's events are applied one after
/// another. A key with nothing in a lane goes to the least loaded one: a
/// slow key holds up its own lane's backlog, not every key that happens to
/// hash to it ([`LaneMap`]). Reads the subscription until the consumer stops
/// or it ends, lets the lanes drain, then hands the subscription back.
async fn in_key_lanes<DB: Backend, H: Handler<DB>, S: Subscriber>(
    shared: &Arc<Shared<DB, H>>,
    mut subscription: S,
    mut stopped: watch::Receiver<bool>,
    workers: usize,
    most: usize,
) -> Option<S> {
    // A lane holds as much as the broker may push: a key whose handler is
    // held then never fills its lane while the subscription still has
    // messages of other keys (the reader would wait on that lane and hold
    // them all up).
    let capacity = usize::try_from(shared.config.effective_prefetch()).unwrap_or(1000);
    let mut tasks = JoinSet::new();
    let mut lanes: Vec<mpsc::Sender<S::Message>> = Vec::with_capacity(workers);
    let map = Arc::new(std::sync::Mutex::new(LaneMap::new(workers.max(1))));
    for lane in 0..workers.max(1) {
        let (tx, mut rx) = mpsc::channel::<S::Message>(capacity.max(1));
        let shared = shared.clone();
        let mut stopped = stopped.clone();
        let map = map.clone();
        tasks.spawn(async move {
            while let Some(first) = rx.recv().await {
                let batch = gather(first, most, || rx.try_recv().ok());
                let keys: Vec<Option<String>> = batch
                    .iter()
                    .map(|m| m.header("event-key").map(str::to_owned))
                    .collect();
                deliver(&shared, batch, &mut stopped).await;
                // A panic elsewhere while holding the map leaves plain counts.
                map.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .done(lane, &keys);
            }
        });
        lanes.push(tx);
    }
    loop {
        let message = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            m = subscription.next_message() => m,
        };
        let Some(message) = message else {
            tracing::warn!("subscription ended; consumer stops");
            break;
        };
        let lane = map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .assign(message.header("event-key"));
        if lanes[lane].send(message).await.is_err() {
            break;
        }
    }
    drop(lanes);
    while tasks.join_next().await.is_some() {}
    Some(subscription)
}

/// Which lane a message goes to, with per-key order.
///
/// A key holds a lane while it has messages there (queued or being
/// applied), so its messages are applied one after another, in order. A key
/// with none goes to the least loaded lane, as does a message without a key.
/// So a key whose handler is slow keeps one lane busy with its own backlog,
/// and the keys arriving behind it go to the other lanes instead of waiting
/// behind it because their hash matched.
#[derive(Debug)]
struct LaneMap {
    /// Per lane: messages sent to it and not yet done.
    load: Vec<usize>,
    /// Keys with messages in a lane: the lane and how many.
    keys: HashMap<String, (usize, usize)>,
}

impl LaneMap {
    fn new(lanes: usize) -> LaneMap {
        LaneMap {
            load: vec![0; lanes.max(1)],
            keys: HashMap::new(),
        }
    }

    /// The lane for the next message of `key`, counted in.
    fn assign(&mut self, key: Option<&str>) -> usize {
        let lane = match key.and_then(|k| self.keys.get_mut(k)) {
            Some((lane, n)) => {
                *n += 1;
                *lane
            }
            None => {
                let lane = self.least_loaded();
                if let Some(key) = key {
                    self.keys.insert(key.to_owned(), (lane, 1));
                }
                lane
            }
        };
        self.load[lane] += 1;
        lane
    }

    /// Lane `lane` is done with messages of these keys.
    fn done(&mut self, lane: usize, keys: &[Option<String>]) {
        if let Some(load) = self.load.get_mut(lane) {
            *load = load.saturating_sub(keys.len());
        }
        for key in keys.iter().flatten() {
            if let Some((_, n)) = self.keys.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.keys.remove(key);
                }
            }
        }
    }

    /// The lane with the fewest messages; the first of those on a tie.
    fn least_loaded(&self) -> usize {
        let mut best = 0;
        for (lane, load) in self.load.iter().enumerate() {
            if *load < self.load[best] {
                best = lane;
            }
        }
        best
    }
}

/// `first` and whatever else is already waiting, up to `most` messages.
fn gather<M>(first: M, most: usize, mut waiting: impl FnMut() -> Option<M>) -> Vec<M> {
    let mut batch = vec![first];
    while batch.len() < most {
        match waiting() {
            Some(m) => batch.push(m),
            None => break,
        }
    }
    batch
}

/// Workers and the most deliveries one batch gathers. On a database that
/// writes one transaction at a time (SQLite) more workers would only queue for
/// the write lock, each holding a few deliveries: two workers (one applies a
/// batch while the other acks and gathers the next) each gather the share of
/// the others, so as many deliveries are in progress as configured.
fn workers_and_batch(single_writer: bool, concurrency: usize, batch_size: usize) -> (usize, usize) {
    let (concurrency, batch_size) = (concurrency.max(1), batch_size.max(1));
    if single_writer && concurrency > 2 && batch_size > 1 {
        (2, (batch_size * concurrency / 2).min(1000))
    } else {
        (concurrency, batch_size)
    }
}

/// Processes messages until they are settled (acked) or the consumer stops.
async fn deliver<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    messages: Vec<impl Incoming>,
    stopped: &mut watch::Receiver<bool>,
) {
    let (oversize, messages): (Vec<_>, Vec<_>) =
        messages.into_iter().partition(|m| m.oversize().is_some());
    for message in &oversize {
        if let Some(reason) = message.oversize() {
            park_message(shared, message, "oversize message parked", &reason, stopped).await;
        }
    }
    // Without an id, a redelivery cannot be told from a new message: applied,
    // each redelivery would apply it again.
    let (anonymous, messages): (Vec<_>, Vec<_>) = messages
        .into_iter()
        .partition(|m| dedup_source(m).is_none());
    for message in &anonymous {
        park_message(
            shared,
            message,
            "message without an id parked",
            NO_DEDUP_ID,
            stopped,
        )
        .await;
    }
    if messages.is_empty() {
        return;
    }
    let deliveries: Vec<Delivery> = messages.iter().map(to_delivery).collect();
    let _in_flight = shared.drain.begin();
    let _gauge = InFlightGauge::add(&shared.metrics, deliveries.len());
    let outcomes = if let [one] = deliveries.as_slice() {
        vec![settle_one(shared, one, stopped).await]
    } else {
        settle_batch(shared, &deliveries, stopped).await
    };
    count_outcomes(&shared.metrics, &deliveries, &outcomes);
    failpoint::hit("inbox.after_commit");
    // A delivery left unsettled because the consumer stopped is not acked:
    // the broker redelivers it after the unsubscribe. One left unsettled
    // while the consumer runs (neither recorded nor parked) would hold its
    // prefetch slot as long as its connection lives: that connection ends.
    let mut settled: Vec<(_, &Delivery)> = Vec::with_capacity(messages.len());
    for (pair, outcome) in messages.iter().zip(&deliveries).zip(&outcomes) {
        if outcome.is_some() {
            settled.push(pair);
        } else if !*stopped.borrow() {
            let (message, delivery) = pair;
            end_connection(
                shared,
                message,
                delivery,
                "it can be neither recorded nor parked",
            );
        }
    }
    acknowledge(shared, &settled).await;
}

/// Further attempts at an ACK that failed on a live connection.
const ACK_RETRIES: u32 = 3;

/// The pause before each further attempt at an ACK.
const ACK_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(2),
};

/// Acknowledges settled deliveries; their ACKs, queued together, leave in
/// one write. An ACK that fails while the delivery's connection lives is
/// tried again ([`ack_again`]): ActiveMQ would hold the message, and its
/// prefetch slot, until that connection ends.
async fn acknowledge<DB: Backend, H: Handler<DB>, M: Incoming>(
    shared: &Shared<DB, H>,
    settled: &[(&M, &Delivery)],
) {
    let acks = futures_util::future::join_all(settled.iter().map(|(m, _)| m.ack())).await;
    let again = acks.into_iter().zip(settled).filter_map(|(acked, (m, d))| {
        acked.err().map(|error| {
            // The broker may redeliver it: retention waits for a fresh
            // drain before it may delete its inbox row.
            shared.drain.reset();
            ack_again(shared, *m, d, error)
        })
    });
    futures_util::future::join_all(again).await;
}

/// Tries a failed ACK again, with backoff, while the message's connection
/// lives; if it still fails, ends that connection, so the broker delivers
/// the message again and its inbox row settles it. Once the connection has
/// ended on its own, the broker redelivers it anyway.
async fn ack_again<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    message: &impl Incoming,
    delivery: &Delivery,
    error: String,
) {
    let metrics = &shared.metrics;
    if !message.on_live_connection() {
        tracing::debug!(%error, event_id = delivery.event_id, "ack failed with its connection; the broker delivers it again");
        return;
    }
    metrics.ack_failures.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%error, event_id = delivery.event_id, "ack failed on a live connection; trying again");
    metrics
        .status
        .broker_failed(format_args!("acknowledging {}: {error}", delivery.event_id));
    let mut last = error;
    for attempt in 0..ACK_RETRIES {
        tokio::time::sleep(ACK_BACKOFF.delay(attempt)).await;
        if !message.on_live_connection() {
            return;
        }
        match message.ack_again().await {
            Ok(()) => {
                metrics.status.succeeded();
                return;
            }
            Err(error) => last = error,
        }
    }
    if message.on_live_connection() {
        let reason = format!("its ACK failed {} times: {last}", ACK_RETRIES + 1);
        end_connection(shared, message, delivery, &reason);
    }
}

/// Ends the connection `message` came on, so that the broker delivers it
/// again rather than hold it, and its prefetch slot, for as long as the
/// connection lives.
fn end_connection<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    message: &impl Incoming,
    delivery: &Delivery,
    why: &str,
) {
    if !message.on_live_connection() {
        return;
    }
    let reason = format!("delivery {} left unacknowledged: {why}", delivery.event_id);
    tracing::error!(
        event_id = delivery.event_id,
        why,
        "ending the broker connection so that the delivery comes again"
    );
    shared
        .metrics
        .connections_ended
        .fetch_add(1, Ordering::Relaxed);
    shared.metrics.status.broker_failed(&reason);
    message.end_connection(&reason);
}

/// Deliveries in progress on the in-flight gauge; taken off when dropped,
/// however the delivery ends.
struct InFlightGauge<'a>(Option<&'a metrics::Gauge>, f64);

impl<'a> InFlightGauge<'a> {
    fn add(metrics: &'a ConsumerMetrics, n: usize) -> InFlightGauge<'a> {
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
fn count_outcomes(
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

/// Settles several deliveries, in one transaction when it can. A database
/// error that trying again cannot cure (a value a column refuses, a violated
/// constraint) settles them one by one instead, so one such delivery never
/// holds back the others. `None` for a delivery left unsettled because the
/// consumer stopped.
async fn settle_batch<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    deliveries: &[Delivery],
    stopped: &mut watch::Receiver<bool>,
) -> Vec<Option<Outcome>> {
    let mut failures = 0u32;
    let mut recurring = 0u32;
    loop {
        let error = match process_batch(shared, deliveries).await {
            Ok(outcomes) => return outcomes.into_iter().map(Some).collect(),
            Err(error) => error,
        };
        shared.metrics.add(Count::DbErrors, 1);
        shared.metrics.status.database_failed(&error);
        if recurs(&error) {
            recurring += 1;
        }
        if error.is_permanent() || recurring >= shared.config.recurring_error_limit {
            tracing::warn!(%error, messages = deliveries.len(), "a delivery of the batch cannot be recorded; settling them one by one");
            let mut outcomes = Vec::with_capacity(deliveries.len());
            for delivery in deliveries {
                outcomes.push(settle_one(shared, delivery, stopped).await);
            }
            return outcomes;
        }
        tracing::warn!(%error, messages = deliveries.len(), "deliveries not settled; will try again");
        if !pause(shared, &mut failures, stopped).await {
            return deliveries.iter().map(|_| None).collect();
        }
    }
}

/// Settles one delivery: database errors are tried again with backoff until
/// the consumer stops (`None`); after `max_attempts` permanent ones, or
/// `recurring_error_limit` answered by the database in a row, the delivery
/// is parked with the error.
async fn settle_one<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    delivery: &Delivery,
    stopped: &mut watch::Receiver<bool>,
) -> Option<Outcome> {
    let mut failures = 0u32;
    let mut permanent = 0u32;
    let mut recurring = 0u32;
    loop {
        let error = match process(shared, delivery).await {
            Ok(outcome) => return Some(outcome),
            Err(error) => error,
        };
        shared.metrics.add(Count::DbErrors, 1);
        shared.metrics.status.database_failed(&error);
        if error.is_permanent() {
            permanent += 1;
        }
        if recurs(&error) {
            recurring += 1;
        }
        if permanent >= shared.config.max_attempts
            || recurring >= shared.config.recurring_error_limit
        {
            return park_unrecordable(shared, delivery, &error, stopped).await;
        }
        tracing::warn!(%error, event_id = delivery.event_id, "delivery not settled; will try again");
        if !pause(shared, &mut failures, stopped).await {
            return None;
        }
    }
}

/// `true` for an error the database answered with (a statement or a commit
/// it refused), which may recur every time the same delivery is tried and
/// so counts towards [`ConsumerConfig::recurring_error_limit`]; `false` when
/// the database could not be reached, which says nothing of the delivery.
fn recurs(error: &Error) -> bool {
    match error {
        Error::Database { source, .. } => matches!(
            source,
            sqlx::Error::Database(_)
                | sqlx::Error::Encode(_)
                | sqlx::Error::Decode(_)
                | sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::TypeNotFound { .. }
                | sqlx::Error::ColumnNotFound(_)
                | sqlx::Error::ColumnIndexOutOfBounds { .. }
        ),
        Error::Row { .. } => true,
        _ => false,
    }
}

/// Waits the backoff for the `failures`-th failure; `false` if the consumer
/// stopped meanwhile.
async fn pause<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    failures: &mut u32,
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    let pause = shared.config.retry_backoff.delay(*failures);
    *failures = failures.saturating_add(1);
    tokio::select! {
        // Unacked: the broker redelivers them after we disconnect.
        _ = stopped.wait_for(|s| *s) => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// Parks a delivery the database keeps refusing, with the error and its
/// payload; if that is refused for good too, once more without the fields
/// that may be at fault (type, key, headers). Transient errors are tried
/// again with backoff until the consumer stops. `None` if it stopped, or the
/// bare row is refused for good as well: then the delivery stays unacked and
/// the broker redelivers it to the next connection.
async fn park_unrecordable<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    delivery: &Delivery,
    error: &Error,
    stopped: &mut watch::Receiver<bool>,
) -> Option<Outcome> {
    let reason = format!("cannot be recorded: {error}");
    tracing::error!(event_id = delivery.event_id, %error, "delivery parked: the database refuses it");
    let bare = Delivery {
        event_type: None,
        key: None,
        headers: Vec::new(),
        ..delivery.clone()
    };
    let mut failures = 0u32;
    for attempt in [delivery, &bare] {
        loop {
            match set_aside(&shared.inbox, attempt, InboxState::Failed, 1, &reason, None).await {
                Ok(outcome) => return Some(outcome),
                Err(error) if error.is_permanent() => {
                    tracing::warn!(%error, event_id = delivery.event_id, "could not park the delivery");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, event_id = delivery.event_id, "could not park the delivery yet");
                    if !pause(shared, &mut failures, stopped).await {
                        return None;
                    }
                }
            }
        }
    }
    tracing::error!(
        event_id = delivery.event_id,
        "delivery neither recorded nor parked; left unacknowledged for the broker to redeliver"
    );
    None
}

/// Several fresh deliveries in one database transaction: one commit settles
/// them all. Optimistic: if any of them turns out to be a duplicate or its
/// handler fails, the transaction is rolled back and the deliveries are
/// processed one by one, each in its own transaction — so a failing handler
/// never undoes another event's work. `Err` only for database trouble (then
/// nothing is acked).
async fn process_batch<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    deliveries: &[Delivery],
) -> Result<Vec<Outcome>, Error> {
    let inbox = &shared.inbox;
    let mut outcomes: Vec<Option<Outcome>> = deliveries.iter().map(|_| None).collect();
    let mut todo = Vec::with_capacity(deliveries.len());
    for (i, delivery) in deliveries.iter().enumerate() {
        match decode(&shared.handler, delivery) {
            Ok(event) => todo.push((i, event)),
            Err(reason) => outcomes[i] = Some(park_undecodable(inbox, delivery, &reason).await?),
        }
    }
    let mut one_by_one = false;
    if shared.config.per_key_order {
        // One query for the batch: any key with an earlier event waiting
        // sends the whole batch one by one, where each event is checked alone.
        let mut keys: Vec<&str> = todo
            .iter()
            .filter_map(|(i, _)| deliveries[*i].key.as_deref())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        one_by_one = inbox.store.keys_pending(&keys).await?;
    }
    if !one_by_one && !todo.is_empty() {
        let _turn = shared.gate.enter().await;
        let mut tx = HandlerTx::<DB>::begin(inbox.pool())
            .await
            .map_err(Error::db("beginning an inbox transaction"))?;
        let mut applied = Vec::with_capacity(todo.len());
        let rows: Vec<&Delivery> = todo.iter().map(|(i, _)| &deliveries[*i]).collect();
        let mut clean = inbox
            .store
            .record_processed(&mut tx, &rows, now_ms())
            .await?
            == Recorded::New;
        if clean {
            for (i, event) in todo {
                let delivery = &deliveries[i];
                if run_handler(
                    &shared.handler,
                    shared.config.handler_timeout,
                    &mut tx,
                    event,
                    delivery,
                )
                .await
                .is_err()
                {
                    clean = false;
                    break;
                }
                applied.push(i);
            }
        }
        if clean {
            let ids: Vec<&str> = applied
                .iter()
                .map(|&i| deliveries[i].event_id.as_str())
                .collect();
            if let Some(reason) = undone(inbox, &mut tx, &ids).await? {
                tracing::warn!(
                    reason,
                    messages = ids.len(),
                    "a handler's transaction was undone; applying the batch one by one"
                );
                clean = false;
            }
        }
        if clean {
            failpoint::hit("inbox.before_commit");
            tx.commit()
                .await
                .map_err(Error::db("committing an inbox transaction"))?;
            for &i in &applied {
                after_commit(&shared.handler, &deliveries[i]);
                outcomes[i] = Some(Outcome::Processed);
            }
        } else {
            let _ = tx.rollback().await;
            one_by_one = true;
        }
    }
    if one_by_one {
        for (i, delivery) in deliveries.iter().enumerate() {
            if outcomes[i].is_none() {
                outcomes[i] = Some(process(shared, delivery).await?);
            }
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::Duplicate))
        .collect())
}

/// One attempt at a fresh delivery. `Err` only for database trouble.
async fn process<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    delivery: &Delivery,
) -> Result<Outcome, Error> {
    let inbox = &shared.inbox;
    let event = match decode(&shared.handler, delivery) {
        Ok(event) => event,
        Err(reason) => return park_undecodable(inbox, delivery, &reason).await,
    };
    if shared.config.per_key_order
        && let Some(key) = &delivery.key
        && inbox.store.keys_pending(&[key]).await?
    {
        // An earlier event of this key waits for a retry: queue behind it,
        // with no attempt spent (its handler has not run).
        let waiting = "waiting for an earlier event of its key";
        return set_aside(
            inbox,
            delivery,
            InboxState::Retry,
            0,
            waiting,
            Some(now_ms()),
        )
        .await;
    }
    let _turn = shared.gate.enter().await;
    let mut tx = HandlerTx::<DB>::begin(inbox.pool())
        .await
        .map_err(Error::db("beginning an inbox transaction"))?;
    if inbox
        .store
        .record(
            &mut tx,
            delivery,
            InboxState::Processed,
            1,
            None,
            None,
            now_ms(),
        )
        .await?
        == Recorded::Duplicate
    {
        let _ = tx.rollback().await;
        return Ok(Outcome::Duplicate);
    }
    let result = match run_handler(
        &shared.handler,
        shared.config.handler_timeout,
        &mut tx,
        event,
        delivery,
    )
    .await
    {
        Ok(()) => match undone(inbox, &mut tx, &[&delivery.event_id]).await? {
            None => Ok(()),
            Some(reason) => Err(reason),
        },
        Err(error) => Err(error.to_string()),
    };
    match result {
        Ok(()) => {
            failpoint::hit("inbox.before_commit");
            tx.commit()
                .await
                .map_err(Error::db("committing an inbox transaction"))?;
            after_commit(&shared.handler, delivery);
            Ok(Outcome::Processed)
        }
        Err(reason) => {
            let _ = tx.rollback().await;
            shared.metrics.handler_failed();
            let delay = shared.config.retry_backoff.delay(0);
            let parked = shared.config.max_attempts <= 1;
            log_failed_attempt(
                delivery,
                1,
                shared.config.max_attempts,
                parked,
                delay,
                &reason,
            );
            let next = now_ms() + ms(delay);
            let state = if parked {
                InboxState::Failed
            } else {
                InboxState::Retry
            };
            set_aside(inbox, delivery, state, 1, &reason, Some(next)).await
        }
    }
}

/// Logs a failed handler attempt: a WARN with the retry's delay while the
/// event has attempts left, an ERROR when this one parked it. Both name the
/// attempt, the budget, the event (id, type, key) and the error, so one
/// event's attempts can be followed in the log.
fn log_failed_attempt(
    delivery: &Delivery,
    attempt: i64,
    max_attempts: u32,
    parked: bool,
    retry_in: Duration,
    error: &str,
) {
    let (event_type, key) = (delivery.event_type.as_deref(), delivery.key.as_deref());
    if parked {
        tracing::error!(
            event_id = delivery.event_id,
            event_type,
            key,
            attempt,
            max_attempts,
            error,
            "handler failed; event parked as FAILED (`outbox inbox replay` applies it again)"
        );
    } else {
        tracing::warn!(
            event_id = delivery.event_id,
            event_type,
            key,
            attempt,
            max_attempts,
            error,
            retry_in = ?retry_in,
            "handler failed; retry scheduled"
        );
    }
}

/// Records `delivery` in state `FAILED` (parked) or `RETRY` with `attempts`
/// spent, outside any handler transaction; a row already there makes it a
/// duplicate.
async fn set_aside<DB: Backend>(
    inbox: &Inbox<DB>,
    delivery: &Delivery,
    state: InboxState,
    attempts: i64,
    reason: &str,
    next_attempt_at: Option<i64>,
) -> Result<Outcome, Error> {
    let reason = error_text(reason);
    let mut conn = inbox.store.acquire().await?;
    let recorded = inbox
        .store
        .record(
            &mut conn,
            delivery,
            state,
            attempts,
            Some(&reason),
            next_attempt_at,
            now_ms(),
        )
        .await?;
    Ok(match recorded {
        Recorded::Duplicate => Outcome::Duplicate,
        Recorded::New if state == InboxState::Failed => Outcome::Parked,
        Recorded::New => Outcome::Retry,
    })
}

/// Parks a delivery whose payload the handler cannot decode, with its raw bytes.
async fn park_undecodable<DB: Backend>(
    inbox: &Inbox<DB>,
    delivery: &Delivery,
    reason: &str,
) -> Result<Outcome, Error> {
    tracing::error!(
        event_id = delivery.event_id,
        event_type = delivery.event_type.as_deref(),
        key = delivery.key.as_deref(),
        reason,
        "undecodable payload parked"
    );
    set_aside(inbox, delivery, InboxState::Failed, 1, reason, None).await
}

/// Reads, inside the handler's transaction and just before its commit, that
/// the inbox rows of `event_ids` are all still there. A handler that ignored
/// a database error can leave a transaction the database has given up on:
/// PostgreSQL aborts it at the failed statement and answers `COMMIT` with a
/// `ROLLBACK`; MySQL rolls the whole transaction back after a deadlock and
/// runs what follows on its own. Either way the commit would write no inbox
/// row, and an event acknowledged as processed would be lost. `Some(reason)`
/// when the transaction is no longer whole (the delivery is then a handler
/// failure: retried, then parked); `Err` for other database trouble.
async fn undone<DB: Backend>(
    inbox: &Inbox<DB>,
    tx: &mut Transaction<'static, DB>,
    event_ids: &[&str],
) -> Result<Option<String>, Error> {
    let expected = u64::try_from(event_ids.len()).unwrap_or(u64::MAX);
    match inbox.store.count_processed(tx, event_ids).await {
        Ok(n) if n == expected => Ok(None),
        Ok(n) => Ok(Some(format!(
            "the database rolled back the handler's transaction ({n} of {expected} inbox rows \
             left): an error the handler did not return"
        ))),
        Err(error) if aborted(&error) => Ok(Some(format!(
            "the database aborted the handler's transaction after an error the handler did \
             not return: {error}"
        ))),
        Err(error) => Err(error),
    }
}

/// `true` for PostgreSQL's answer to a statement in a transaction that an
/// earlier error aborted (`25P02`, in failed SQL transaction).
fn aborted(error: &Error) -> bool {
    match error {
        Error::Database {
            source: sqlx::Error::Database(db),
            ..
        } => db.code().as_deref() == Some("25P02"),
        _ => false,
    }
}

/// Decodes a delivery, turning a panic of [`Handler::decode`] into a decode
/// error: the delivery is parked with it like any undecodable payload.
fn decode<DB: Backend, H: Handler<DB>>(
    handler: &H,
    delivery: &Delivery,
) -> Result<H::Event, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| handler.decode(delivery))) {
        Ok(decoded) => decoded,
        Err(panic) => Err(format!("decode panicked: {}", panic_text(panic.as_ref()))),
    }
}

/// Runs [`Handler::after_commit`]; a panic is logged and goes no further:
/// the event is committed, so it is counted and acknowledged all the same.
fn after_commit<DB: Backend, H: Handler<DB>>(handler: &H, delivery: &Delivery) {
    if let Err(panic) =
        std::panic::catch_unwind(AssertUnwindSafe(|| handler.after_commit(delivery)))
    {
        tracing::error!(
            event_id = delivery.event_id,
            panic = panic_text(panic.as_ref()),
            "after_commit panicked; the event is committed and is acknowledged"
        );
    }
}

/// The message of a panic, when it has one.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Parks a message that must not reach the handler: one the client read
/// past in part for being over its size limits (see
/// [`Incoming::oversize`]), or one without an id to deduplicate it by
/// ([`NO_DEDUP_ID`]). `FAILED` with `reason` and what was kept of its headers
/// and payload, then acknowledged, so it leaves the queue and what follows it
/// flows. Transient database errors are tried again with backoff until the
/// consumer stops (then it stays unacked, for the broker to redeliver).
async fn park_message<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    message: &impl Incoming,
    what: &'static str,
    reason: &str,
    stopped: &mut watch::Receiver<bool>,
) {
    let _in_flight = shared.drain.begin();
    let delivery = to_delivery(message);
    tracing::error!(event_id = delivery.event_id, reason, "{what}");
    let mut failures = 0u32;
    let outcome = loop {
        let error = match set_aside(
            &shared.inbox,
            &delivery,
            InboxState::Failed,
            1,
            reason,
            None,
        )
        .await
        {
            Ok(outcome) => break Some(outcome),
            Err(error) => error,
        };
        shared.metrics.add(Count::DbErrors, 1);
        shared.metrics.status.database_failed(&error);
        if error.is_permanent() {
            break park_unrecordable(shared, &delivery, &error, stopped).await;
        }
        tracing::warn!(%error, event_id = delivery.event_id, "message not parked yet");
        if !pause(shared, &mut failures, stopped).await {
            break None;
        }
    };
    if outcome.is_none() {
        if !*stopped.borrow() {
            end_connection(
                shared,
                message,
                &delivery,
                "it can be neither recorded nor parked",
            );
        }
        return;
    }
    count_outcomes(&shared.metrics, std::slice::from_ref(&delivery), &[outcome]);
    acknowledge(shared, &[(message, &delivery)]).await;
}

/// Runs the handler, turning a panic into an error.
async fn run_handler<DB: Backend, H: Handler<DB>>(
    handler: &H,
    timeout: Option<Duration>,
    tx: &mut Transaction<'static, DB>,
    event: H::Event,
    delivery: &Delivery,
) -> Result<(), HandlerError> {
    let run = AssertUnwindSafe(handler.handle(tx, event, delivery))
        .catch_unwind()
        .instrument(crate::trace::handle_span(delivery));
    let ran = match timeout {
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(ran) => ran,
            Err(_) => {
                return Err(format!("the handler did not finish within {limit:?}").into());
            }
        },
        None => run.await,
    };
    match ran {
        Ok(result) => result,
        Err(_) => Err("the handler panicked".into()),
    }
}

/// Retries `RETRY` rows whose time has come, and runs retention.
async fn retry_loop<DB: Backend, H: Handler<DB>>(
    shared: Arc<Shared<DB, H>>,
    status: Arc<dyn LinkStatus>,
    mut stopped: watch::Receiver<bool>,
) {
    let holder = uuid::Uuid::now_v7().simple().to_string();
    let mut row_errors = RowErrors::default();
    let mut next_retention = tokio::time::Instant::now();
    let mut next_figures = tokio::time::Instant::now();
    loop {
        if let Some(every) = shared.config.stats_interval
            && tokio::time::Instant::now() >= next_figures
        {
            next_figures = tokio::time::Instant::now() + every;
            read_figures(&shared).await;
        }
        // The handler's calls are contained one by one; this keeps retries
        // and retention going whatever else a pass runs into.
        let pass = AssertUnwindSafe(retry_due(&shared, &mut row_errors))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(Error::TaskFailed("a retry pass panicked".to_owned())));
        let busy = match pass {
            Ok(n) => {
                if row_errors.0.is_empty() {
                    shared.metrics.status.idle();
                }
                n > 0
            }
            Err(error) => {
                tracing::warn!(%error, "retry loop failed");
                shared.metrics.status.database_failed(&error);
                false
            }
        };
        // Retention starts once the consumer has drained its queue; until
        // then it is looked at again every poll.
        if tokio::time::Instant::now() >= next_retention
            && shared
                .drain
                .drained(drain_quiet(&shared.config), status.is_connected())
        {
            next_retention = tokio::time::Instant::now() + shared.config.retention_interval;
            if let Err(error) = retention(&shared, &holder).await {
                tracing::warn!(%error, "inbox retention failed");
            }
        }
        let pause = if busy {
            Duration::ZERO
        } else {
            shared.config.retry_poll
        };
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Reads the inbox rows waiting for a retry and the parked ones, for
/// [`ConsumerMetrics::health`] and the gauges.
async fn read_figures<DB: Backend, H: Handler<DB>>(shared: &Shared<DB, H>) {
    match shared.inbox.store.unsettled_counts().await {
        Ok(counts) => {
            let metrics = &shared.metrics;
            metrics
                .status
                .set_figures(counts.retry, None, counts.failed);
            if let Some(i) = metrics.instruments.get() {
                i.retrying_rows.set(counts.retry as f64);
                i.parked_rows.set(counts.failed as f64);
            }
        }
        Err(error) => {
            tracing::debug!(%error, "could not read the inbox figures");
            shared.metrics.status.database_failed(&error);
        }
    }
}

/// Database errors in a row per retry row (by id) of the rows the last pass
/// saw fail.
#[derive(Debug, Default)]
struct RowErrors(std::collections::HashMap<i64, u32>);

/// Handles due retry rows once; returns how many were settled (applied,
/// failed again or parked). A row the database refuses is a failure of its
/// own: the rows after it are still tried, and one refused
/// [`ConsumerConfig::recurring_error_limit`] times in a row is parked with
/// the error. A database that cannot be reached ends the pass.
async fn retry_due<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    errors: &mut RowErrors,
) -> Result<usize, Error> {
    let due = shared
        .inbox
        .store
        .due(now_ms(), 100, shared.config.per_key_order)
        .await?;
    let mut settled = 0;
    for (id, reason) in &due.unreadable {
        tracing::error!(row = id, reason, "retry row parked: it cannot be read");
        // A budget of 0: parked whatever its attempts.
        shared
            .inbox
            .store
            .fail_retry(*id, 0, &error_text(reason), now_ms(), now_ms())
            .await?;
        shared.metrics.add(Count::Failed, 1);
        settled += 1;
    }
    let rows = due.rows;
    for row in &rows {
        let error = match retry_one(shared, row).await {
            Ok(()) => {
                errors.0.remove(&row.id);
                settled += 1;
                continue;
            }
            Err(error) => error,
        };
        shared.metrics.add(Count::DbErrors, 1);
        shared.metrics.status.database_failed(&error);
        if !recurs(&error) {
            return Err(error);
        }
        let seen = errors.0.entry(row.id).or_insert(0);
        *seen += 1;
        if *seen < shared.config.recurring_error_limit {
            tracing::warn!(%error, event_id = row.delivery.event_id, "retry not settled; will try again");
            continue;
        }
        let reason = error_text(&format!("cannot be retried: {error}"));
        tracing::error!(event_id = row.delivery.event_id, %error, "retry row parked: the database refuses it");
        // A budget of 0: parked whatever its attempts.
        match shared
            .inbox
            .store
            .fail_retry(row.id, 0, &reason, now_ms(), now_ms())
            .await
        {
            Ok(()) => {
                errors.0.remove(&row.id);
                shared.metrics.add(Count::Failed, 1);
                settled += 1;
            }
            Err(error) => {
                tracing::warn!(%error, event_id = row.delivery.event_id, "could not park the retry row");
            }
        }
    }
    // Rows no longer due (settled elsewhere, or waiting their backoff) start
    // afresh.
    errors
        .0
        .retain(|id, _| rows.iter().any(|row| row.id == *id));
    Ok(settled)
}

async fn retry_one<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    row: &DueRow,
) -> Result<(), Error> {
    let (id, attempts, delivery) = (row.id, row.attempts, &row.delivery);
    let store = &shared.inbox.store;
    let _turn = shared.gate.enter().await;
    let mut tx = HandlerTx::<DB>::begin(store.pool())
        .await
        .map_err(Error::db("beginning a retry"))?;
    if !store.take_retry(&mut tx, id, now_ms()).await? {
        // Another process took it meanwhile.
        let _ = tx.rollback().await;
        return Ok(());
    }
    let result = match decode(&shared.handler, delivery) {
        Ok(event) => match run_handler(
            &shared.handler,
            shared.config.handler_timeout,
            &mut tx,
            event,
            delivery,
        )
        .await
        {
            Ok(()) => match undone(&shared.inbox, &mut tx, &[&delivery.event_id]).await? {
                None => Ok(()),
                Some(reason) => Err((reason, false)),
            },
            Err(error) => Err((error.to_string(), false)),
        },
        Err(reason) => Err((reason, true)),
    };
    let result = match result {
        Ok(()) => match tx.commit().await {
            Ok(()) => Ok(()),
            // A constraint checked at commit fails every time: an attempt
            // spent, like a failing handler.
            Err(error) => {
                let error = Error::db("committing a retry")(error);
                if !error.is_permanent() {
                    return Err(error);
                }
                Err((error.to_string(), false))
            }
        },
        Err(failed) => {
            let _ = tx.rollback().await;
            Err(failed)
        }
    };
    // This try's number within the row's budget: a replay starts the
    // count again.
    let attempt = attempts + 1;
    match result {
        Ok(()) => {
            after_commit(&shared.handler, delivery);
            shared.metrics.add(Count::Processed, 1);
            // The end of a story the log told in WARNs (or an ERROR before a
            // replay): the event is in.
            tracing::info!(
                event_id = delivery.event_id,
                event_type = delivery.event_type.as_deref(),
                key = delivery.key.as_deref(),
                attempt,
                "event applied on a retry after a failure, a replay or a wait for its key"
            );
            Ok(())
        }
        Err((reason, undecodable)) => {
            if !undecodable {
                shared.metrics.handler_failed();
            }
            let reason = error_text(&reason);
            let budget = if undecodable {
                0
            } else {
                i64::from(shared.config.max_attempts)
            };
            let spent = attempt >= budget;
            let delay = shared
                .config
                .retry_backoff
                .delay(u32::try_from(attempts).unwrap_or(u32::MAX));
            let next = now_ms() + ms(delay);
            store
                .fail_retry(id, budget, &reason, next, now_ms())
                .await?;
            if undecodable {
                tracing::error!(
                    event_id = delivery.event_id,
                    event_type = delivery.event_type.as_deref(),
                    key = delivery.key.as_deref(),
                    reason,
                    "undecodable payload parked"
                );
            } else {
                log_failed_attempt(
                    delivery,
                    attempt,
                    shared.config.max_attempts,
                    spent,
                    delay,
                    &reason,
                );
            }
            if spent {
                shared.metrics.add(Count::Failed, 1);
            } else {
                shared.metrics.add(Count::Retried, 1);
            }
            Ok(())
        }
    }
}

/// How long without a delivery counts as drained: a second, or four retry
/// polls if that is longer.
fn drain_quiet(config: &ConsumerConfig) -> Duration {
    Duration::from_secs(1).max(config.retry_poll.saturating_mul(4))
}

async fn retention<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    holder: &str,
) -> Result<(), Error> {
    let Some(keep) = shared.config.retention else {
        return Ok(());
    };
    let inbox = &shared.inbox;
    let name = retention_lease(inbox.table(), inbox.consumer());
    let now = crate::clock::now(inbox.pool()).await;
    let until = now + ms(shared.config.retention_interval) * 2;
    if !schema::take_lease(inbox.pool(), &name, holder, now, until).await? {
        return Ok(());
    }
    while inbox.delete_processed(keep, 1000).await? == 1000 {
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// Longest lease name the lease table holds (`outbox_lease.name`, `VARCHAR(128)`).
const LEASE_NAME_MAX: usize = 128;

/// The name of the retention lease of `consumer`'s rows in inbox table
/// `table`: `{table}.{consumer}.retention`, or, when that is longer than the
/// lease column (consumer names over 106 characters), a stable digest of it
/// (`sha256-` and 56 hex digits, then `.retention`), the same in every
/// process of the consumer.
fn retention_lease(table: &str, consumer: &str) -> String {
    let name = format!("{table}.{consumer}.retention");
    if name.len() <= LEASE_NAME_MAX {
        return name;
    }
    format!("{}.retention", digest(&name))
}

/// Longest dedup id the inbox column holds (`VARCHAR(64)`).
const DEDUP_ID_MAX: usize = outbox_rules::MAX_EVENT_ID;

/// Longest `event_type` / `event_key` the inbox columns hold (`VARCHAR(255)`).
const TEXT_COLUMN_MAX: usize = outbox_rules::MAX_EVENT_TYPE;

/// The inbox's dedup id for an `event-id` (or, from producers outside this
/// framework, a broker `message-id`): the id itself when it fits the column
/// and holds no NUL, else a stable digest of it, so every redelivery of the
/// message maps to the same row. ActiveMQ's message ids grow with the
/// producer's host name and can exceed the column.
fn dedup_id(raw: &str) -> String {
    if raw.len() <= DEDUP_ID_MAX && !raw.contains('\0') {
        return raw.to_owned();
    }
    digest(raw)
}

/// `sha256-` and the first 56 hex digits (224 bits) of the SHA-256 of `raw`:
/// 63 characters.
fn digest(raw: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(raw.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    // "sha256-" and 56 hex digits (224 bits): 63 characters.
    format!("sha256-{}", &hex[..56])
}

/// Longest error text stored as `last_error`.
const ERROR_TEXT_MAX: usize = 2000;

/// An error text as the inbox can store it: NUL removed, cut to
/// [`ERROR_TEXT_MAX`] characters.
fn error_text(reason: &str) -> String {
    fit(reason, ERROR_TEXT_MAX)
}

/// A header value as the inbox can store it: cut to the column's length.
fn fit_column(raw: &str) -> String {
    fit(raw, TEXT_COLUMN_MAX)
}

/// `raw` without NUL (PostgreSQL text cannot hold it), cut to `max`
/// characters on a character boundary.
fn fit(raw: &str, max: usize) -> String {
    raw.chars().filter(|c| *c != '\0').take(max).collect()
}

/// Why a message with neither an `event-id` nor a `message-id` is parked.
const NO_DEDUP_ID: &str = "the message has neither an `event-id` nor a `message-id` header, so \
     it cannot be deduplicated: each redelivery would be applied again. Parked unapplied \
     (replaying it applies this row once)";

/// The id a message is deduplicated by: its `event-id`, or else the
/// broker's `message-id`. A blank id from a producer outside this framework
/// would make every later such message a duplicate of the first, so a blank
/// `event-id` gives way to the `message-id`, and a blank `message-id` counts
/// as none. `None` when there is no id at all (only a custom [`Subscriber`]
/// can deliver such a message: ActiveMQ always sends a `message-id`).
fn dedup_source(message: &impl Incoming) -> Option<&str> {
    let present = |id: &&str| !id.trim().is_empty();
    message
        .header("event-id")
        .filter(present)
        .or_else(|| message.message_id().filter(present))
}

fn to_delivery(message: &impl Incoming) -> Delivery {
    let headers = message.headers();
    // A message without an id is only ever parked, under an id of its own.
    let event_id = dedup_source(message)
        .map(dedup_id)
        .unwrap_or_else(fallback_event_id);
    Delivery {
        event_id,
        event_type: message.header("event-type").map(fit_column),
        key: message.header("event-key").map(fit_column),
        headers,
        body: message.body(),
        attempt: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::LaneMap;

    fn key(k: &str) -> Option<String> {
        Some(k.to_owned())
    }

    #[test]
    fn a_key_keeps_its_lane_while_it_has_messages_there_and_new_keys_go_to_the_least_loaded() {
        let mut map = LaneMap::new(3);
        let slow = map.assign(Some("slow"));
        assert_eq!(
            map.assign(Some("slow")),
            slow,
            "a key's messages share one lane"
        );
        assert_eq!(map.assign(Some("slow")), slow);
        // Other keys avoid the busy lane, whatever their hash.
        let a = map.assign(Some("a"));
        let b = map.assign(Some("b"));
        assert!(a != slow && b != slow && a != b, "{slow} {a} {b}");
        assert_eq!(map.assign(Some("a")), a);
        // Unkeyed messages too.
        let c = map.assign(None);
        assert_ne!(c, slow);
        // Once a key is done in its lane, it may go elsewhere.
        map.done(a, &[key("a"), key("a")]);
        map.done(b, &[key("b")]);
        map.done(c, &[None]);
        assert_eq!(map.assign(Some("slow")), slow, "still has messages there");
        map.done(slow, &[key("slow"), key("slow"), key("slow"), key("slow")]);
        assert!(map.keys.is_empty(), "{:?}", map.keys);
        assert_eq!(map.load, vec![0, 0, 0]);
        assert_eq!(
            map.assign(Some("slow")),
            0,
            "an idle key goes to the least loaded lane"
        );
    }

    #[test]
    fn a_dedup_id_that_does_not_fit_becomes_a_stable_digest_and_one_that_fits_stays() {
        let short = "0190d5a0-5f6e-7c3b-9a4e-2b8f6c1d0e9a";
        assert_eq!(super::dedup_id(short), short);
        let long = format!("ID:{}-40123-1733000000000-1:1:1:1:1", "pod-".repeat(25));
        assert!(long.len() > 100);
        let id = super::dedup_id(&long);
        assert!(id.len() <= super::DEDUP_ID_MAX, "{id}");
        assert_eq!(id, super::dedup_id(&long), "stable");
        assert_ne!(id, super::dedup_id(&format!("{long}x")));
        assert!(super::dedup_id("a\0b").starts_with("sha256-"));
    }

    #[test]
    fn a_retention_lease_name_longer_than_its_column_becomes_a_stable_digest() {
        assert_eq!(
            super::retention_lease("inbox_event", "points"),
            "inbox_event.points.retention"
        );
        let long = "c".repeat(128);
        let name = super::retention_lease("inbox_event", &long);
        assert!(name.len() <= super::LEASE_NAME_MAX, "{name}");
        assert_eq!(name, super::retention_lease("inbox_event", &long), "stable");
        assert_ne!(name, super::retention_lease("inbox_other", &long));
    }

    #[test]
    fn over_long_or_nul_holding_type_and_key_are_fitted_to_their_columns() {
        let long = "é".repeat(300);
        let fitted = super::fit_column(&long);
        assert_eq!(fitted.chars().count(), super::TEXT_COLUMN_MAX);
        assert_eq!(super::fit_column("user\0.created"), "user.created");
    }

    use super::workers_and_batch;

    #[test]
    fn the_drain_gate_closes_when_the_link_drops_and_waits_for_a_fresh_quiet_period() {
        use std::time::Duration;
        let drain = super::Drain::new();
        let (none, hour) = (Duration::ZERO, Duration::from_secs(3600));
        assert!(drain.drained(none, true), "quiet and connected");
        assert!(
            drain.drained(hour, true),
            "drained stays drained while connected"
        );
        assert!(!drain.drained(none, false), "not while the link is down");
        assert!(
            !drain.drained(hour, true),
            "a fresh quiet period after the reconnect"
        );
        assert!(drain.drained(none, true));
        drain.reset();
        assert!(
            !drain.drained(hour, true),
            "an ACK that failed closes the gate too"
        );
    }

    #[test]
    fn a_single_writer_gets_two_workers_with_the_same_deliveries_in_progress() {
        assert_eq!(workers_and_batch(true, 8, 16), (2, 64));
        assert_eq!(workers_and_batch(true, 2, 16), (2, 16));
        assert_eq!(
            workers_and_batch(true, 8, 1),
            (8, 1),
            "one event per transaction is kept"
        );
        assert_eq!(workers_and_batch(true, 64, 100), (2, 1000));
        assert_eq!(workers_and_batch(false, 8, 16), (8, 16));
        assert_eq!(workers_and_batch(false, 0, 0), (1, 1));
    }
}

/// The consumer's batch, rollback and one-by-one paths with a scripted
/// subscriber on a real SQLite file (no broker).
#[cfg(all(test, feature = "sqlite"))]
mod scripted {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use sqlx::Sqlite;
    use tokio::sync::mpsc;

    use super::*;

    /// Event ids acknowledged, in order.
    type Acks = Arc<Mutex<Vec<String>>>;

    struct Script {
        rx: mpsc::UnboundedReceiver<Scripted>,
    }

    struct Scripted {
        headers: Vec<(String, String)>,
        body: Bytes,
        acks: Acks,
        /// The connection it came on and its epoch there; `None`: one that
        /// never ends.
        link: Option<(Arc<Link>, u64)>,
        /// Its ACKs fail while its connection lives.
        acks_fail: bool,
    }

    /// A scripted connection: its epoch moves on when the consumer ends it.
    #[derive(Default)]
    struct Link {
        epoch: std::sync::atomic::AtomicU64,
        ended: Mutex<Vec<String>>,
    }

    struct Up;

    impl LinkStatus for Up {
        fn is_connected(&self) -> bool {
            true
        }
        fn end_reason(&self) -> String {
            "the script ended".to_owned()
        }
    }

    impl Subscriber for Script {
        type Message = Scripted;
        async fn next_message(&mut self) -> Option<Scripted> {
            self.rx.recv().await
        }
        fn try_next_message(&mut self) -> Option<Scripted> {
            self.rx.try_recv().ok()
        }
        fn status(&self) -> Arc<dyn LinkStatus> {
            Arc::new(Up)
        }
        async fn close(self) {}
    }

    impl Incoming for Scripted {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
        fn headers(&self) -> Vec<(String, String)> {
            self.headers.clone()
        }
        fn message_id(&self) -> Option<&str> {
            None
        }
        fn body(&self) -> Bytes {
            self.body.clone()
        }
        async fn ack(&self) -> Result<(), String> {
            if self.acks_fail && self.on_live_connection() {
                return Err("the write stalled".to_owned());
            }
            let id = self.header("event-id").unwrap_or_default().to_owned();
            self.acks.lock().unwrap().push(id);
            Ok(())
        }

        fn on_live_connection(&self) -> bool {
            self.link
                .as_ref()
                .is_none_or(|(link, epoch)| link.epoch.load(Ordering::SeqCst) == *epoch)
        }

        fn end_connection(&self, reason: &str) {
            if let Some((link, epoch)) = &self.link
                && link
                    .epoch
                    .compare_exchange(*epoch, epoch + 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                link.ended.lock().unwrap().push(reason.to_owned());
            }
        }
    }

    /// Writes a row per user; refuses user 13 (a handler error) every time.
    struct Ledger;

    impl Handler<Sqlite> for Ledger {
        type Event = i64;

        fn decode(&self, delivery: &Delivery) -> Result<i64, String> {
            std::str::from_utf8(&delivery.body)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| "not a user id".to_owned())
        }

        fn handle<'a>(
            &'a self,
            tx: &'a mut Transaction<'static, Sqlite>,
            user: i64,
            _delivery: &'a Delivery,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            Box::pin(async move {
                sqlx::query("INSERT INTO ledger (user_id) VALUES (?)")
                    .bind(user)
                    .execute(&mut **tx)
                    .await?;
                if user == 13 {
                    return Err("user 13 is refused".into());
                }
                Ok(())
            })
        }
    }

    struct Fixture {
        inbox: Inbox<Sqlite>,
        path: std::path::PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    async fn fixture() -> Fixture {
        let path =
            std::env::temp_dir().join(format!("outbox-scripted-{}.db", uuid::Uuid::now_v7()));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE ledger (user_id BIGINT NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        let inbox = Inbox::new(pool, "ledger").unwrap();
        inbox.migrate().await.unwrap();
        Fixture { inbox, path }
    }

    /// Feeds `users` (event ids `e-{user}`) before the consumer starts, so
    /// they arrive as one batch, and waits until every one is acked.
    async fn consume(inbox: &Inbox<Sqlite>, users: &[i64]) -> (ConsumerCounts, Vec<String>) {
        let users: Vec<(i64, Option<&str>)> = users.iter().map(|u| (*u, None)).collect();
        consume_keyed(inbox, &users, false).await
    }

    /// [`consume`] with an `event-key` per user, and `per_key_order` as given.
    async fn consume_keyed(
        inbox: &Inbox<Sqlite>,
        users: &[(i64, Option<&str>)],
        per_key_order: bool,
    ) -> (ConsumerCounts, Vec<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let acks = Acks::default();
        for (user, key) in users {
            let mut headers = vec![("event-id".into(), format!("e-{user}"))];
            if let Some(key) = key {
                headers.push(("event-key".into(), (*key).to_owned()));
            }
            tx.send(Scripted {
                headers,
                body: Bytes::from(user.to_string()),
                acks: acks.clone(),
                link: None,
                acks_fail: false,
            })
            .unwrap();
        }
        let config = ConsumerConfig {
            concurrency: 1,
            batch_size: 16,
            per_key_order,
            retry_poll: Duration::from_secs(3600),
            ..ConsumerConfig::new("/queue/scripted")
        };
        let consumer = Consumer::new(inbox.clone(), Ledger, config).unwrap();
        let handle = consumer.spawn_on(Script { rx });
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while acks.lock().unwrap().len() < users.len() {
            assert!(
                tokio::time::Instant::now() < until,
                "not every delivery was acked"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let counts = handle.metrics().snapshot();
        handle.shutdown().await.unwrap();
        let acked = acks.lock().unwrap().clone();
        (counts, acked)
    }

    async fn ledger(inbox: &Inbox<Sqlite>) -> Vec<i64> {
        sqlx::query_scalar("SELECT user_id FROM ledger ORDER BY user_id")
            .fetch_all(inbox.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_clean_batch_is_applied_and_acked_in_order() {
        let f = fixture().await;
        let (counts, acked) = consume(&f.inbox, &[1, 2, 3, 4]).await;
        assert_eq!(
            (counts.processed, counts.duplicates, counts.retried),
            (4, 0, 0)
        );
        assert_eq!(acked, ["e-1", "e-2", "e-3", "e-4"]);
        assert_eq!(ledger(&f.inbox).await, [1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_duplicate_rolls_the_batch_back_and_the_rest_is_applied_one_by_one() {
        let f = fixture().await;
        consume(&f.inbox, &[2]).await;
        let (counts, acked) = consume(&f.inbox, &[1, 2, 3]).await;
        assert_eq!((counts.processed, counts.duplicates), (2, 1), "{counts:?}");
        assert_eq!(acked.len(), 3, "the duplicate is acked too");
        assert_eq!(ledger(&f.inbox).await, [1, 2, 3], "user 2 once");
    }

    #[tokio::test]
    async fn a_failing_handler_undoes_only_its_own_work() {
        let f = fixture().await;
        let (counts, acked) = consume(&f.inbox, &[12, 13, 14]).await;
        assert_eq!((counts.processed, counts.retried), (2, 1), "{counts:?}");
        assert_eq!(acked.len(), 3);
        assert_eq!(
            ledger(&f.inbox).await,
            [12, 14],
            "user 13's row rolled back"
        );
        let inbox = f.inbox.counts().await.unwrap();
        assert_eq!((inbox.processed, inbox.retry), (2, 1));
    }

    #[tokio::test]
    async fn with_per_key_order_a_batch_holds_back_only_the_key_with_an_earlier_event_waiting() {
        let f = fixture().await;
        // User 13's handler fails: its key `a` now has an event waiting for a retry.
        consume_keyed(&f.inbox, &[(13, Some("a"))], true).await;
        let batch = [(1, Some("b")), (2, Some("a")), (3, None), (4, Some("c"))];
        let (counts, acked) = consume_keyed(&f.inbox, &batch, true).await;
        assert_eq!(acked.len(), 4);
        assert_eq!(counts.processed, 3, "{counts:?}");
        assert_eq!(ledger(&f.inbox).await, [1, 3, 4], "user 2 waits behind 13");
        let inbox = f.inbox.counts().await.unwrap();
        assert_eq!((inbox.processed, inbox.retry), (3, 2));
    }

    #[tokio::test]
    async fn pending_keys_are_found_beyond_the_first_query() {
        let f = fixture().await;
        consume_keyed(&f.inbox, &[(13, Some("a"))], true).await;
        let mut keys: Vec<String> = (0..450).map(|k| format!("k-{k}")).collect();
        let store = &f.inbox.store;
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert!(!store.keys_pending(&refs).await.unwrap());
        assert!(!store.keys_pending(&[]).await.unwrap());
        keys.push("a".into());
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert!(
            store.keys_pending(&refs).await.unwrap(),
            "`a` is in the third query"
        );
        assert!(store.keys_pending(&["a"]).await.unwrap());
    }

    /// Waits until `done` holds, failing the test after 30 s.
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(
                tokio::time::Instant::now() < until,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// User `user`'s event (`e-{user}`) on epoch `epoch` of `link`.
    fn on_link(user: i64, link: &Arc<Link>, epoch: u64, acks: &Acks, acks_fail: bool) -> Scripted {
        Scripted {
            headers: vec![("event-id".into(), format!("e-{user}"))],
            body: Bytes::from(user.to_string()),
            acks: acks.clone(),
            link: Some((link.clone(), epoch)),
            acks_fail,
        }
    }

    fn one_at_a_time() -> ConsumerConfig {
        ConsumerConfig {
            concurrency: 1,
            batch_size: 1,
            max_attempts: 2,
            retry_backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(5)),
            retry_poll: Duration::from_secs(3600),
            ..ConsumerConfig::new("/queue/scripted")
        }
    }

    /// A message with neither `event-id` nor `message-id` (a custom
    /// subscriber's; ActiveMQ always sends one) cannot be told from its
    /// redelivery: delivered twice, it is parked twice with the reason and
    /// acknowledged, and never applied.
    #[tokio::test]
    async fn a_message_without_any_id_is_parked_and_acked_and_never_applied() {
        let f = fixture().await;
        let (tx, rx) = mpsc::unbounded_channel();
        let acks = Acks::default();
        let consumer = Consumer::new(f.inbox.clone(), Ledger, one_at_a_time()).unwrap();
        let handle = consumer.spawn_on(Script { rx });
        for delivery in 1..=2 {
            tx.send(Scripted {
                headers: vec![("event-type".into(), "user.created".into())],
                body: Bytes::from("7"),
                acks: acks.clone(),
                link: None,
                acks_fail: false,
            })
            .unwrap();
            eventually("the delivery acked", || {
                acks.lock().unwrap().len() == delivery
            })
            .await;
        }
        let counts = handle.metrics().snapshot();
        handle.shutdown().await.unwrap();
        assert_eq!(ledger(&f.inbox).await, Vec::<i64>::new(), "never applied");
        assert_eq!((counts.processed, counts.failed), (0, 2), "{counts:?}");
        let parked = f.inbox.parked(10).await.unwrap();
        assert_eq!(parked.len(), 2, "{parked:?}");
        for p in &parked {
            assert_eq!(p.content, b"7");
            assert!(
                p.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("cannot be deduplicated")),
                "{p:?}"
            );
        }
    }

    /// A retry pass over many large due rows holds at most
    /// `RETRY_PASS_BYTES` of payloads and headers, plus one row.
    #[tokio::test]
    async fn a_retry_pass_holds_at_most_its_byte_budget_plus_one_row() {
        const BUDGET: usize = crate::store::inbox::RETRY_PASS_BYTES as usize;
        let f = fixture().await;
        let store = &f.inbox.store;
        let row_bytes = 256 * 1024;
        let mut conn = store.acquire().await.unwrap();
        for n in 0..100 {
            let delivery = Delivery {
                event_id: format!("e-{n}"),
                event_type: None,
                key: None,
                headers: vec![("event-id".into(), format!("e-{n}"))],
                body: Bytes::from(vec![b'x'; row_bytes]),
                attempt: 0,
            };
            store
                .record(
                    &mut conn,
                    &delivery,
                    InboxState::Retry,
                    1,
                    Some("failed"),
                    Some(0),
                    0,
                )
                .await
                .unwrap();
        }
        drop(conn);
        let mut seen = 0;
        let mut passes = 0;
        loop {
            let due = store.due(now_ms(), 100, false).await.unwrap();
            if due.rows.is_empty() {
                break;
            }
            passes += 1;
            let held: usize = due
                .rows
                .iter()
                .map(|r| r.delivery.body.len() + r.delivery.headers_json().len())
                .sum();
            let largest = due
                .rows
                .iter()
                .map(|r| r.delivery.body.len() + r.delivery.headers_json().len())
                .max()
                .unwrap_or(0);
            assert!(
                held <= BUDGET + largest,
                "a pass held {held} bytes in {} rows",
                due.rows.len()
            );
            seen += due.rows.len();
            // Settle them, as the retry pass does.
            for row in &due.rows {
                let mut tx = store.pool().begin().await.unwrap();
                assert!(store.take_retry(&mut tx, row.id, now_ms()).await.unwrap());
                tx.commit().await.unwrap();
            }
        }
        assert_eq!(seen, 100, "every due row read once");
        assert!(passes > 1, "{passes} passes");
    }

    #[tokio::test]
    async fn an_ack_that_keeps_failing_ends_its_connection_and_the_redelivery_is_acked_as_a_duplicate()
     {
        let f = fixture().await;
        let (tx, rx) = mpsc::unbounded_channel();
        let (acks, link) = (Acks::default(), Arc::new(Link::default()));
        tx.send(on_link(1, &link, 0, &acks, true)).unwrap();
        let consumer = Consumer::new(f.inbox.clone(), Ledger, one_at_a_time()).unwrap();
        let handle = consumer.spawn_on(Script { rx });
        eventually("the connection ended", || {
            !link.ended.lock().unwrap().is_empty()
        })
        .await;
        let reason = link.ended.lock().unwrap()[0].clone();
        assert!(
            reason.contains("e-1") && reason.contains("the write stalled"),
            "{reason}"
        );
        assert!(!handle.metrics().health().is_ready(), "health says so");
        // The broker delivers it again on the next connection.
        tx.send(on_link(1, &link, 1, &acks, false)).unwrap();
        eventually("the redelivery acked", || acks.lock().unwrap().len() == 1).await;
        let counts = handle.metrics().snapshot();
        assert_eq!(
            (
                counts.processed,
                counts.duplicates,
                counts.ack_failures,
                counts.connections_ended
            ),
            (1, 1, 1, 1),
            "{counts:?}"
        );
        assert!(handle.metrics().health().is_ready());
        handle.shutdown().await.unwrap();
        assert_eq!(ledger(&f.inbox).await, [1], "applied once");
        assert_eq!(link.ended.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_delivery_neither_recorded_nor_parked_ends_its_connection_and_the_rest_flow() {
        let f = fixture().await;
        // Every inbox row of event e-66 is refused, parked or not.
        sqlx::query(
            "CREATE TRIGGER refuse_66 BEFORE INSERT ON inbox_event WHEN NEW.event_id = 'e-66' \
             BEGIN SELECT RAISE(ABORT, 'e-66 is refused'); END",
        )
        .execute(f.inbox.pool())
        .await
        .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let (acks, link) = (Acks::default(), Arc::new(Link::default()));
        tx.send(on_link(66, &link, 0, &acks, false)).unwrap();
        let consumer = Consumer::new(f.inbox.clone(), Ledger, one_at_a_time()).unwrap();
        let handle = consumer.spawn_on(Script { rx });
        eventually("the connection ended", || {
            !link.ended.lock().unwrap().is_empty()
        })
        .await;
        let reason = link.ended.lock().unwrap()[0].clone();
        assert!(
            reason.contains("e-66") && reason.contains("neither recorded nor parked"),
            "{reason}"
        );
        tx.send(on_link(2, &link, 1, &acks, false)).unwrap();
        eventually("the next delivery acked", || {
            acks.lock().unwrap().len() == 1
        })
        .await;
        let counts = handle.metrics().snapshot();
        assert_eq!(
            (counts.processed, counts.connections_ended),
            (1, 1),
            "{counts:?}"
        );
        handle.shutdown().await.unwrap();
        assert_eq!(acks.lock().unwrap().as_slice(), ["e-2"], "e-66 never acked");
        assert_eq!(ledger(&f.inbox).await, [2]);
    }
}
