//! Testing producers and handlers against the application's real database,
//! with no broker (cargo feature `testing`; `outbox::testing` in the facade).
//!
//! - **Producers**: run the producer in a transaction, then read what it
//!   appended with [`appended`] — in order, with payloads, keys and headers
//!   ([`Appended`]) — and roll back to see the events go with the business
//!   rows.
//! - **Handlers**: a [`TestConsumer`] runs a [`Handler`] through the consumer
//!   runtime itself ([`Consumer::spawn_on`]) on a scripted, in-memory
//!   subscription: each delivery gets its inbox row, its transaction and its
//!   commit before it is acknowledged, exactly as from ActiveMQ. Deliver the
//!   events a producer appended ([`Appended::delivery`]) or hand-made ones
//!   ([`Delivery::json`]) — twice, out of order — then [`drain`] until
//!   nothing is in flight or waiting for a retry, and read the counts, the
//!   acknowledgements and the parked rows. [`Flaky`] makes a handler's
//!   transaction fail a given number of times, to see retries and parking.
//!
//! Retries in a test consumer ([`config`]) wait milliseconds,
//! not seconds, so a drain that includes a parked event takes well under a
//! second.
//!
//! [`drain`]: TestConsumer::drain
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_core::testing::{TestConsumer, appended};
//! use outbox_core::{Delivery, Event, Inbox, Outbox};
//! # use outbox_core::consumer::{BoxFuture, Handler, HandlerError};
//! # struct Count;
//! # impl Handler<sqlx::Sqlite> for Count {
//! #     type Event = serde_json::Value;
//! #     fn decode(&self, d: &Delivery) -> Result<serde_json::Value, String> {
//! #         outbox_core::consumer::decode_json(d)
//! #     }
//! #     fn handle<'a>(&'a self, tx: &'a mut sqlx::Transaction<'static, sqlx::Sqlite>,
//! #         _: serde_json::Value, _: &'a Delivery) -> BoxFuture<'a, Result<(), HandlerError>> {
//! #         Box::pin(async move {
//! #             sqlx::query("INSERT INTO seen DEFAULT VALUES").execute(&mut **tx).await?;
//! #             Ok(())
//! #         })
//! #     }
//! # }
//! // One connection: an in-memory database is one per connection.
//! let pool = sqlx::sqlite::SqlitePoolOptions::new()
//!     .max_connections(1)
//!     .connect("sqlite::memory:")
//!     .await?;
//! # sqlx::query("CREATE TABLE seen (n INTEGER PRIMARY KEY)").execute(&pool).await?;
//! let outbox = Outbox::new(pool.clone());
//! outbox.migrate().await?;
//!
//! // The producer's side: what a transaction appended.
//! let mut tx = pool.begin().await?;
//! let event = Event::json("user.created", "/topic/VirtualTopic.user.created", &serde_json::json!({ "user_id": 7 }))?;
//! outbox.append(&mut tx, event.with_key("7")).await?;
//! let events = appended(&mut tx).await?;
//! assert_eq!(events[0].key.as_deref(), Some("7"));
//! tx.commit().await?;
//!
//! // The consumer's side: the event, twice, through the inbox.
//! let inbox = Inbox::new(pool.clone(), "points")?;
//! inbox.migrate().await?;
//! let consumer = TestConsumer::start(inbox, Count)?;
//! consumer.deliver(events[0].delivery());
//! consumer.deliver(events[0].delivery());
//! let counts = consumer.drain().await?;
//! assert_eq!((counts.processed, counts.duplicates), (1, 1));
//! consumer.shutdown().await?;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "sqlite"))]
//! # fn main() {}
//! ```

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use bytes;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::Transaction;
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::backoff::Backoff;
use crate::consumer::{
    BoxFuture, ConsumerCounts, ConsumerHandle, HandlerError, Incoming, LinkStatus, Subscriber,
};
use crate::event::{JSON, OutboxMessage};
use crate::names::TableName;
use crate::outbox::DEFAULT_OUTBOX_TABLE;
use crate::rows::ParkedDelivery;
use crate::{Consumer, ConsumerConfig, Delivery, Error, Handler, Inbox};

/// An event as a producer appended it, read back from the outbox table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Appended {
    /// The event id (the consumer's dedup key).
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// Where the relay will publish it.
    pub destination: String,
    /// The aggregate key, if any.
    pub key: Option<String>,
    /// The extra headers, in the order they are stored.
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub content: Vec<u8>,
    /// The payload's content type.
    pub content_type: String,
    /// When it was appended (ms since the Unix epoch).
    pub create_time: i64,
}

impl Appended {
    /// The payload decoded from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.content)
    }

    /// The header `name` among the extra headers.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The event as a consumer receives it from the relay: the same headers
    /// the relay sends (`event-id`, `event-type`, `event-key`,
    /// `JMSXGroupID`, `content-type`, the extra headers…) and the payload.
    pub fn delivery(&self) -> Delivery {
        let message = OutboxMessage {
            id: 0,
            event_id: self.event_id.clone(),
            event_type: self.event_type.clone(),
            destination: self.destination.clone(),
            key: self.key.clone(),
            headers: self.headers.clone(),
            content: Bytes::copy_from_slice(&self.content),
            content_type: self.content_type.clone(),
            attempts: 0,
            create_time: self.create_time,
        };
        let frame = crate::transport::message_for(&message).into_frame();
        Delivery {
            event_id: self.event_id.clone(),
            event_type: Some(self.event_type.clone()),
            key: self.key.clone(),
            headers: frame
                .headers()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            body: message.content,
            attempt: 0,
        }
    }
}

impl From<&Appended> for Delivery {
    fn from(event: &Appended) -> Delivery {
        event.delivery()
    }
}

impl From<Appended> for Delivery {
    fn from(event: Appended) -> Delivery {
        event.delivery()
    }
}

/// Every event in the outbox table [`DEFAULT_OUTBOX_TABLE`], oldest first,
/// whatever its state, as `source` sees them: pass the producer's open
/// transaction (`&mut tx`) to see what it appended before it commits, or the
/// pool to see what was committed.
pub async fn appended<'c, A>(source: A) -> Result<Vec<Appended>, Error>
where
    A: sqlx::Acquire<'c>,
    A::Database: Backend,
{
    appended_to(source, DEFAULT_OUTBOX_TABLE).await
}

/// [`appended`], for the outbox table `table`.
pub async fn appended_to<'c, A>(source: A, table: &str) -> Result<Vec<Appended>, Error>
where
    A: sqlx::Acquire<'c>,
    A::Database: Backend,
{
    let table = TableName::new("outbox table name", table)?;
    let mut conn = source
        .acquire()
        .await
        .map_err(Error::db("connecting to read the outbox"))?;
    let rows = crate::store::outbox::appended::<A::Database>(&mut conn, &table).await?;
    Ok(rows
        .into_iter()
        .map(|row| Appended {
            event_id: row.event_id,
            event_type: row.event_type,
            destination: row.destination,
            key: row.key,
            headers: row.headers,
            content: row.content,
            content_type: row.content_type,
            create_time: row.create_time,
        })
        .collect())
}

/// Hand-made deliveries, for handlers in tests.
impl Delivery {
    /// A delivery of event `event_id` whose payload is `payload` as JSON,
    /// with the `event-id` and `content-type` headers a relay sends. Add the
    /// type, key and other headers with [`with_type`](Delivery::with_type),
    /// [`with_key`](Delivery::with_key) and
    /// [`with_header`](Delivery::with_header).
    pub fn json<T: Serialize + ?Sized>(
        event_id: impl Display,
        payload: &T,
    ) -> Result<Delivery, Error> {
        let body = serde_json::to_vec(payload).map_err(|source| Error::Serialize {
            event_type: String::new(),
            source,
        })?;
        Ok(Delivery::raw(event_id, body).with_header("content-type", JSON))
    }

    /// A delivery of event `event_id` with the payload `body` as it is.
    pub fn raw(event_id: impl Display, body: impl Into<Bytes>) -> Delivery {
        let event_id = event_id.to_string();
        Delivery {
            headers: vec![("event-id".to_owned(), event_id.clone())],
            event_id,
            event_type: None,
            key: None,
            body: body.into(),
            attempt: 0,
        }
    }

    /// Sets the event type (the `event-type` header).
    pub fn with_type(mut self, event_type: impl Into<String>) -> Delivery {
        let event_type = event_type.into();
        self.set_header("event-type", &event_type);
        self.event_type = Some(event_type);
        self
    }

    /// Sets the aggregate key (the `event-key` and `JMSXGroupID` headers).
    pub fn with_key(mut self, key: impl Display) -> Delivery {
        let key = key.to_string();
        self.set_header("event-key", &key);
        self.set_header("JMSXGroupID", &key);
        self.key = Some(key);
        self
    }

    /// Sets header `name` (replacing a header of that name).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Delivery {
        let (name, value) = (name.into(), value.into());
        self.set_header(&name, &value);
        self
    }

    fn set_header(&mut self, name: &str, value: &str) {
        self.headers.retain(|(k, _)| k != name);
        self.headers.push((name.to_owned(), value.to_owned()));
    }
}

/// The event ids a test consumer acknowledged, in order.
type Acks = Arc<Mutex<Vec<String>>>;

/// A consumer fed from the test instead of a broker: the consumer runtime
/// itself ([`Consumer::spawn_on`]) on a scripted subscription, so each
/// delivery is applied exactly as one from ActiveMQ — inbox row, handler,
/// commit, then acknowledgement; a duplicate acknowledged without the
/// handler; a failure recorded for a retry, then parked.
pub struct TestConsumer<DB: Backend> {
    inbox: Inbox<DB>,
    feed: mpsc::UnboundedSender<Scripted>,
    acks: Acks,
    /// The event ids delivered, in order.
    delivered: Mutex<Vec<String>>,
    next_message: AtomicU64,
    handle: ConsumerHandle,
}

impl<DB: Backend> std::fmt::Debug for TestConsumer<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestConsumer")
            .field("inbox", &self.inbox)
            .field("delivered", &lock(&self.delivered).len())
            .finish()
    }
}

/// How long [`TestConsumer::drain`] sees nothing move before it returns.
const QUIET: Duration = Duration::from_millis(25);

/// How long [`TestConsumer::drain`] waits at most.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings of a test consumer: those of [`ConsumerConfig::new`], with
/// retries a few milliseconds apart (5 ms doubling to 50 ms, looked for every
/// 5 ms), no retention and no periodic counts. Change what the test is
/// about, e.g. `ConsumerConfig { max_attempts: 2, ..testing::config() }`.
pub fn config() -> ConsumerConfig {
    ConsumerConfig {
        retry_backoff: Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
        retry_poll: Duration::from_millis(5),
        retention: None,
        stats_interval: None,
        ..ConsumerConfig::new("/queue/outbox.testing")
    }
}

impl<DB: Backend> TestConsumer<DB> {
    /// Starts `handler` on `inbox` with the test settings ([`config`]).
    /// For a `#[transactional_event]` consumer `award_points`:
    /// `TestConsumer::start(AwardPoints::inbox(pool)?, AwardPoints)`. The
    /// inbox table must exist (`inbox.migrate()`).
    pub fn start<H: Handler<DB>>(inbox: Inbox<DB>, handler: H) -> Result<TestConsumer<DB>, Error> {
        TestConsumer::start_with(inbox, handler, config())
    }

    /// Starts `handler` on `inbox` with `config` (its `destination` is only
    /// a name here: the test delivers the messages).
    pub fn start_with<H: Handler<DB>>(
        inbox: Inbox<DB>,
        handler: H,
        config: ConsumerConfig,
    ) -> Result<TestConsumer<DB>, Error> {
        let consumer = Consumer::new(inbox.clone(), handler, config)?;
        let (feed, rx) = mpsc::unbounded_channel();
        let handle = consumer.spawn_on(Script { rx });
        Ok(TestConsumer {
            inbox,
            feed,
            acks: Acks::default(),
            delivered: Mutex::default(),
            next_message: AtomicU64::new(1),
            handle,
        })
    }

    /// Delivers one message, as the broker would: `delivery`'s headers and
    /// payload, with a `message-id` of its own. Deliver the same event twice
    /// to see the duplicate skipped, or events in any order.
    pub fn deliver(&self, delivery: impl Into<Delivery>) {
        let delivery = delivery.into();
        let mut headers = delivery.headers;
        let mut ensure = |name: &str, value: Option<&str>| {
            if let Some(value) = value
                && !headers.iter().any(|(k, _)| k == name)
            {
                headers.push((name.to_owned(), value.to_owned()));
            }
        };
        ensure("event-id", Some(&delivery.event_id));
        ensure("event-type", delivery.event_type.as_deref());
        ensure("event-key", delivery.key.as_deref());
        let n = self.next_message.fetch_add(1, Ordering::Relaxed);
        let id = delivery.event_id;
        let message = Scripted {
            headers,
            body: delivery.body,
            message_id: format!("ID:outbox-testing-{n}"),
            acks: self.acks.clone(),
        };
        // The consumer ended (it is stopped or failed): `drain` says so.
        if self.feed.send(message).is_ok() {
            lock(&self.delivered).push(id);
        }
    }

    /// Waits until every delivered message is acknowledged, no event of
    /// this consumer waits for a retry (each is applied or parked) and the
    /// counts stayed still for a moment (25 ms), at most [`DRAIN_TIMEOUT`];
    /// returns the consumer's counts.
    pub async fn drain(&self) -> Result<ConsumerCounts, Error> {
        self.drain_within(DRAIN_TIMEOUT).await
    }

    /// [`drain`](TestConsumer::drain), waiting at most `timeout`; past it,
    /// [`Error::WaitTimeout`] names the event ids not yet acknowledged and
    /// counts those still waiting for a retry.
    pub async fn drain_within(&self, timeout: Duration) -> Result<ConsumerCounts, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Settled and unchanged for a moment: the counters move just after
        // the commit that makes a row settled.
        let mut settled: Option<(ConsumerCounts, tokio::time::Instant)> = None;
        loop {
            if self.handle.is_finished() {
                return Err(Error::TaskFailed(
                    "the test consumer stopped; shut it down to see why".to_owned(),
                ));
            }
            let unacknowledged = self.unacknowledged();
            if unacknowledged.is_empty() && self.inbox.counts().await?.retry == 0 {
                let now = (self.counts(), tokio::time::Instant::now());
                match settled {
                    Some((counts, since)) if counts == now.0 => {
                        if now.1 - since >= QUIET {
                            return Ok(counts);
                        }
                    }
                    _ => settled = Some(now),
                }
            } else {
                settled = None;
            }
            if tokio::time::Instant::now() >= deadline {
                let mut waiting = unacknowledged;
                let retry = self.inbox.counts().await?.retry;
                if retry > 0 {
                    waiting.push(format!("{retry} event(s) waiting for a retry"));
                }
                return Err(Error::WaitTimeout {
                    waiting,
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The consumer's counters: applied, duplicates, retried, parked….
    pub fn counts(&self) -> ConsumerCounts {
        self.handle.metrics().snapshot()
    }

    /// The event ids acknowledged so far, in the order of their
    /// acknowledgements (each after its transaction committed).
    pub fn acknowledged(&self) -> Vec<String> {
        lock(&self.acks).clone()
    }

    /// The consumer's parked events (`FAILED`), oldest first.
    pub async fn parked(&self) -> Result<Vec<ParkedDelivery>, Error> {
        self.inbox.parked(1000).await
    }

    /// The consumer's inbox, for its counts, replays and discards.
    pub fn inbox(&self) -> &Inbox<DB> {
        &self.inbox
    }

    /// Stops the consumer after the deliveries in flight.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.handle.shutdown().await
    }

    /// The deliveries not acknowledged yet, by event id (an event delivered
    /// twice and acknowledged once is named once).
    fn unacknowledged(&self) -> Vec<String> {
        let mut acked: HashMap<String, usize> = HashMap::new();
        for id in lock(&self.acks).iter() {
            *acked.entry(id.clone()).or_default() += 1;
        }
        let mut waiting = Vec::new();
        for id in lock(&self.delivered).iter() {
            match acked.get_mut(id) {
                Some(n) if *n > 0 => *n -= 1,
                _ => waiting.push(id.clone()),
            }
        }
        waiting
    }
}

/// A mutex's value, also after a panic elsewhere while it was held.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wraps a handler so that its transaction fails, after the handler ran,
/// at given attempts of given events: the handler's writes roll back with
/// the inbox row, and the consumer retries the event, or parks it once its
/// budget ([`ConsumerConfig::max_attempts`]) is spent. Attempts are counted
/// as the consumer counts them ([`Delivery::attempt`]), so an event applied
/// again on its own after its batch was rolled back is the same attempt.
/// Clones share the plan: keep one to [`heal`](Flaky::heal) an event, e.g.
/// before replaying it.
///
/// ```
/// # use outbox_core::testing::Flaky;
/// # #[derive(Clone)]
/// # struct AwardPoints;
/// let handler = Flaky::new(AwardPoints)
///     .fail("event-1", 2) // applied at the third attempt
///     .fail_always("event-2"); // parked
/// let faults = handler.clone();
/// // … later, before a replay:
/// faults.heal("event-2");
/// ```
#[derive(Debug)]
pub struct Flaky<H> {
    inner: Arc<H>,
    /// Attempts that fail, by event id: those numbered below the value.
    plan: Arc<Mutex<HashMap<String, u32>>>,
}

impl<H> Clone for Flaky<H> {
    fn clone(&self) -> Self {
        Flaky {
            inner: self.inner.clone(),
            plan: self.plan.clone(),
        }
    }
}

impl<H> Flaky<H> {
    /// `inner`, failing nothing yet.
    pub fn new(inner: H) -> Flaky<H> {
        Flaky {
            inner: Arc::new(inner),
            plan: Arc::default(),
        }
    }

    /// The first `times` attempts at event `event_id` fail.
    pub fn fail(self, event_id: impl Display, times: u32) -> Flaky<H> {
        lock(&self.plan).insert(event_id.to_string(), times);
        self
    }

    /// Every attempt at event `event_id` fails.
    pub fn fail_always(self, event_id: impl Display) -> Flaky<H> {
        self.fail(event_id, u32::MAX)
    }

    /// From now on, attempts at event `event_id` no longer fail.
    pub fn heal(&self, event_id: impl Display) {
        lock(&self.plan).remove(&event_id.to_string());
    }

    /// Whether this attempt is one to fail.
    fn fails(&self, delivery: &Delivery) -> bool {
        lock(&self.plan)
            .get(&delivery.event_id)
            .is_some_and(|times| delivery.attempt < *times)
    }
}

impl<DB: Backend, H: Handler<DB>> Handler<DB> for Flaky<H> {
    type Event = H::Event;

    fn decode(&self, delivery: &Delivery) -> Result<H::Event, String> {
        self.inner.decode(delivery)
    }

    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, DB>,
        event: H::Event,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.inner.handle(tx, event, delivery).await?;
            if self.fails(delivery) {
                return Err(format!(
                    "injected failure of event {} (attempt {})",
                    delivery.event_id,
                    delivery.attempt + 1
                )
                .into());
            }
            Ok(())
        })
    }

    fn after_commit(&self, delivery: &Delivery) {
        self.inner.after_commit(delivery);
    }
}

/// The scripted subscription: what [`TestConsumer::deliver`] sends.
struct Script {
    rx: mpsc::UnboundedReceiver<Scripted>,
}

/// One scripted message.
struct Scripted {
    headers: Vec<(String, String)>,
    body: Bytes,
    message_id: String,
    acks: Acks,
}

/// The scripted connection never drops.
struct Connected;

impl LinkStatus for Connected {
    fn is_connected(&self) -> bool {
        true
    }

    fn end_reason(&self) -> String {
        "the test consumer was dropped".to_owned()
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
        Arc::new(Connected)
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
        Some(&self.message_id)
    }

    fn body(&self) -> Bytes {
        self.body.clone()
    }

    async fn ack(&self) -> Result<(), String> {
        let id = self
            .header("event-id")
            .unwrap_or(&self.message_id)
            .to_owned();
        lock(&self.acks).push(id);
        Ok(())
    }
}
