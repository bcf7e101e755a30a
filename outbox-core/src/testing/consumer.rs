//! [`TestConsumer`]: the consumer runtime on a scripted subscription.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::backoff::Backoff;
use crate::consumer::{ConsumerCounts, ConsumerHandle, Incoming, LinkStatus, Subscriber};
use crate::rows::ParkedDelivery;
use crate::{Consumer, ConsumerConfig, Delivery, Error, Handler, Inbox};

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
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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
