//! The relay: moves committed outbox rows to the broker.
//!
//! One step of the loop:
//!
//! ```text
//!  claim ──► publish (one STOMP transaction) ──► receipt ──► mark PUBLISHED
//!    │            │ rejected                        │
//!    │            └─► one by one: each row PUBLISHED, or attempts+1 / backoff / FAILED
//!    │            │ broker unavailable
//!    │            └─► release the claim, back off the whole relay
//!    └─ nothing due ──► wait for a wake-up (in process, NOTIFY) or the poll interval
//! ```
//!
//! Claiming takes rows that are `NEW`, due (`next_attempt_at` passed) and not
//! leased, in id order, skipping rows other relays have locked; a row whose key
//! has an earlier unpublished row outside the batch is left alone, so a key's
//! events are never reordered. The claim is a lease (`claimed_by`,
//! `claimed_until`): a relay that dies leaves rows that another relay takes
//! when the lease runs out, and publishes them again — a duplicate with the same
//! event id, never a loss.
//!
//! Hand-off ([`RelayConfig::handoff`]): while a relay runs, rows appended in
//! its process through an [`Outbox`] on its pool are inserted already leased to
//! it (`claimed_by` = the relay's hand-off token). After the commit wakes it,
//! the relay reads them with a plain `SELECT` and publishes them: no claim
//! transaction and no write lock on the way. They obey the same rules as
//! claimed rows: per-key order (a row with an earlier unpublished row of its key
//! elsewhere is given back to the usual claim), the lease (if the relay dies,
//! any relay takes them when it runs out; one started with the same
//! `relay_id` takes them at once), marked only after the broker's receipt.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tracing::Instrument;
use uuid::Uuid;

use crate::backend::Backend;
use crate::backoff::Backoff;
use crate::error::{PublishError, PublishErrorKind};
use crate::event::OutboxMessage;
use crate::names::{ms, now_ms};
use crate::wake::Handoff;
use crate::{Error, Outbox, Publisher, failpoint, schema, wake};

/// Settings of a relay. `RelayConfig::default()` suits most services.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows per claim and per STOMP transaction (default 500).
    pub batch_size: u32,
    /// How long a claim holds before another relay may take the rows (default
    /// 30 s). Must exceed the time a publish can take
    /// ([`Publisher::max_publish_time`]: about twice the STOMP client's
    /// receipt timeout, 21 s by default); [`Outbox::relay`] checks it.
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
    /// predecessor at once instead of after their lease.
    pub relay_id: String,
    /// Hand-off (default on): while this relay runs, rows appended in this
    /// process through an [`Outbox`] on the same pool (or a
    /// `#[transactional_event(pool)]` function) are leased to it as they are
    /// inserted, and it publishes them right after their commit without a
    /// claim transaction. Rows written elsewhere are claimed as usual. A
    /// transaction that commits after the relay stopped leaves its rows to
    /// any relay once their lease runs out.
    pub handoff: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 500,
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
        }
    }
}

/// The largest [`RelayConfig::batch_size`]: a claim binds one parameter per
/// row, well within every database's limit (SQLite's is 32,766).
pub const MAX_RELAY_BATCH: u32 = 10_000;

/// The longest duration a setting may have (ten years): every deadline
/// computed from one stays far from overflowing.
pub(crate) const MAX_SETTING: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Checks that `value` is at most [`MAX_SETTING`].
pub(crate) fn bounded(setting: &'static str, value: Duration) -> Result<(), Error> {
    if value > MAX_SETTING {
        return Err(Error::InvalidConfig {
            setting,
            reason: format!("{value:?} is longer than ten years; use a shorter duration"),
        });
    }
    Ok(())
}

impl RelayConfig {
    /// Checks the settings against each other and against a publish that
    /// can take up to `max_publish` ([`Publisher::max_publish_time`]).
    /// [`Outbox::relay`] calls it; a relay never starts with settings that
    /// would let another relay take rows still on their way.
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
    /// Database errors the relay backed off from (claim, mark, release,
    /// reject); it keeps going after each.
    pub db_errors: AtomicU64,
    /// 1 once the relay stopped because its broker connection ended for good.
    pub stopped: AtomicU64,
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
    /// Database errors the relay backed off from.
    pub db_errors: u64,
    /// 1 once the relay stopped because its broker connection ended for good.
    pub stopped: u64,
}

impl RelayMetrics {
    /// The counters now.
    pub fn snapshot(&self) -> RelayCounts {
        RelayCounts {
            published: self.published.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            unavailable: self.unavailable.load(Ordering::Relaxed),
            deleted: self.deleted.load(Ordering::Relaxed),
            db_errors: self.db_errors.load(Ordering::Relaxed),
            stopped: self.stopped.load(Ordering::Relaxed),
        }
    }
}

/// What one turn of the relay loop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing was due.
    Idle,
    /// This many rows were claimed and published (some may have been rejected).
    Published(usize),
    /// The broker could not be reached; the claim was released.
    Unavailable,
    /// The transport stopped for good (why); the claim was released.
    Stopped(String),
}

/// Publishes an outbox's rows. Build with [`Outbox::relay`], run with
/// [`Relay::run`] or [`Relay::spawn`].
pub struct Relay<DB: Backend, P: Publisher> {
    outbox: Outbox<DB>,
    publisher: P,
    config: RelayConfig,
    metrics: Arc<RelayMetrics>,
    wake: Arc<Notify>,
    batch: AtomicU64,
    turn: AtomicU64,
    handoff_token: String,
    /// Tells this run's claim tokens from those of earlier runs under the same `relay_id`.
    incarnation: String,
}

impl<DB: Backend, P: Publisher> std::fmt::Debug for Relay<DB, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("outbox", &self.outbox)
            .field("relay_id", &self.config.relay_id)
            .finish()
    }
}

/// A claimed batch and the token that holds it.
struct Claimed {
    token: String,
    batch: Vec<OutboxMessage>,
    /// Rows handed off at insert time: the token is shared with rows not in
    /// this batch, so the batch is settled by id.
    handed_off: bool,
}

impl Claimed {
    fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.batch.iter().map(|m| m.id)
    }
}

/// A running relay: stop it gracefully with [`RelayHandle::shutdown`].
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
    metrics: Arc<RelayMetrics>,
}

impl RelayHandle {
    /// The relay's counters.
    pub fn metrics(&self) -> &Arc<RelayMetrics> {
        &self.metrics
    }

    /// Asks the relay to stop after the batch in flight and waits for it.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(Error::TaskFailed(format!("relay: {join}"))),
        }
    }

    /// `true` once the relay's task has ended, which before
    /// [`shutdown`](RelayHandle::shutdown) only happens when it stopped for
    /// good ([`Error::BrokerGone`]) or its task panicked; `shutdown` then
    /// returns why.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl<DB: Backend, P: Publisher> Relay<DB, P> {
    pub(crate) fn new(outbox: Outbox<DB>, publisher: P, config: RelayConfig) -> Relay<DB, P> {
        Relay {
            handoff_token: format!("{}-h", config.relay_id),
            // The random tail of a UUID v7.
            incarnation: Uuid::now_v7().simple().to_string()[24..].to_owned(),
            turn: AtomicU64::new(0),
            outbox,
            publisher,
            config,
            metrics: Arc::default(),
            wake: Arc::new(Notify::new()),
            batch: AtomicU64::new(0),
        }
    }

    /// The relay's counters.
    pub fn metrics(&self) -> Arc<RelayMetrics> {
        self.metrics.clone()
    }

    /// Runs the relay on a task until [`RelayHandle::shutdown`].
    pub fn spawn(self) -> RelayHandle {
        let (stop, mut stopped) = watch::channel(false);
        let metrics = self.metrics();
        // Registered before the task starts: rows appended right after
        // `spawn` returns are handed off already.
        let handoff = self.offer_handoff();
        let task = tokio::spawn(async move {
            self.run_with(
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
                handoff,
            )
            .await
        });
        RelayHandle {
            stop,
            task,
            metrics,
        }
    }

    /// Runs until `shutdown` completes. The batch in flight is finished (its
    /// rows marked) before returning; nothing is left claimed.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let handoff = self.offer_handoff();
        self.run_with(shutdown, handoff).await
    }

    /// Registers for in-process wake-ups and, if enabled, for hand-off. The
    /// hand-off lasts as long as the returned `Arc`.
    fn offer_handoff(&self) -> Option<Arc<Handoff>> {
        let table = self.outbox.table();
        wake::register(table, &self.wake);
        self.config.handoff.then(|| {
            let handoff = Arc::new(Handoff {
                token: self.handoff_token.clone(),
                lease_ms: ms(self.config.lease),
                active: AtomicBool::new(true),
            });
            wake::register_handoff(table, self.outbox.inner.pool_id, &handoff);
            handoff
        })
    }

    async fn run_with(
        self,
        shutdown: impl Future<Output = ()> + Send,
        handoff: Option<Arc<Handoff>>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let table = self.outbox.table().to_owned();
        // Ends with this call however it ends: returned, failed or dropped.
        let _listener = DB::listen(self.outbox.pool(), &table, self.wake.clone()).map(AbortOnDrop);
        let mut outages = 0u32;
        let mut db_failures = 0u32;
        let mut next_retention = Instant::now();
        // Pipeline: batches go to the broker one after another on one
        // connection, so a key's events keep their order; if batch i fails,
        // a batch claimed meanwhile is released unpublished. While batch i is
        // on the wire, claimed rows for batch i+1 are claimed. Rows handed off
        // while a handed-off batch is on the wire are read when their commit
        // wakes the relay and, sharing no key with it, follow it at once (see
        // `publish_handed_off`); otherwise they go out after its receipt.
        // Published batches are marked in the background; until then their
        // rows count as ahead of everything read.
        let mut marks = Marks::new(Marker {
            outbox: self.outbox.clone(),
            metrics: self.metrics.clone(),
            backoff: self.config.outage_backoff,
        });
        let mut ready: Option<Claimed> = None;
        let mut stopped: Option<String> = None;
        tracing::info!(relay = %self.config.relay_id, table, "relay started");
        loop {
            marks.advance().await;
            let outcome: Result<Step, Error> = match ready.take() {
                None => match self.next_batch(&marks.ids()).await {
                    Ok(Some(claimed)) => {
                        ready = Some(claimed);
                        Ok(Step::Published(0))
                    }
                    Ok(None) => Ok(Step::Idle),
                    Err(error) => Err(error),
                },
                Some(current) if current.handed_off => {
                    self.publish_handed_off(current, &mut marks, &mut ready)
                        .await
                }
                Some(current) => {
                    let mut in_flight = marks.ids();
                    in_flight.extend(current.ids());
                    let read_ahead = !current.handed_off;
                    let n = current.batch.len();
                    failpoint::hit("relay.before_publish");
                    let (published, following) = tokio::join!(
                        self.publisher
                            .publish(&current.batch)
                            .instrument(tracing::debug_span!("outbox.publish", rows = n)),
                        async {
                            if read_ahead {
                                self.next_batch(&in_flight).await
                            } else {
                                Ok(None)
                            }
                        }
                    );
                    match published {
                        Ok(()) => {
                            failpoint::hit("relay.after_receipt");
                            marks.push(current);
                            match following {
                                Ok(next) => {
                                    ready = next;
                                    Ok(Step::Published(n))
                                }
                                Err(error) => Err(error),
                            }
                        }
                        Err(error) => {
                            if let Ok(Some(next)) = following {
                                self.give_back_claimed(&next).await;
                            }
                            // Marked first: giving the batch back may give back
                            // every row under its token.
                            marks.drain().await;
                            self.publish_failed(&current, error).await
                        }
                    }
                }
            };
            let pause = match outcome {
                Ok(Step::Published(_)) => {
                    outages = 0;
                    db_failures = 0;
                    None
                }
                Ok(Step::Idle) => {
                    outages = 0;
                    db_failures = 0;
                    Some(self.config.poll_interval)
                }
                Ok(Step::Stopped(reason)) => {
                    stopped = Some(reason);
                    break;
                }
                Ok(Step::Unavailable) => {
                    outages += 1;
                    Some(self.config.outage_backoff.delay(outages - 1))
                }
                Err(error) => {
                    db_failures += 1;
                    self.metrics.db_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "relay step failed");
                    Some(self.config.outage_backoff.delay(db_failures - 1))
                }
            };
            // While the relay cannot publish, producers stop handing rows to it
            // (what it already holds it gave back or holds under a lease).
            if let Some(handoff) = &handoff {
                handoff
                    .active
                    .store(outages == 0 && db_failures == 0, Ordering::Release);
            }
            if Instant::now() >= next_retention {
                next_retention = Instant::now() + self.config.retention_interval;
                if let Err(error) = self.retention().await {
                    tracing::warn!(%error, "retention failed");
                }
            }
            let stop = match pause {
                None => futures_poll_ready(&mut shutdown).await,
                Some(pause) => {
                    let sleep = tokio::time::sleep(pause);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut shutdown => break true,
                            _ = self.wake.notified() => break false,
                            _ = &mut sleep => break false,
                            // A finished mark may leave more to mark; keep waiting.
                            _ = marks.finish(), if marks.is_running() => marks.start(),
                        }
                    }
                }
            };
            if stop {
                break;
            }
        }
        // Finish what is in flight: mark the published batches, give back the
        // claimed one and the rows handed off but not yet read.
        if let Some(handoff) = &handoff {
            handoff.active.store(false, Ordering::Release);
        }
        // Each step is tried even if one before it failed; rows not given back
        // stay leased and are taken by any relay when the lease runs out.
        let mut ended = marks.settle().await;
        if let Some(claimed) = ready.take() {
            ended = ended.and(self.release(&claimed, None).await);
        }
        if handoff.is_some() {
            ended = ended.and(self.release_token(&self.handoff_token, None).await);
        }
        drop(handoff);
        if let Err(error) = &ended {
            tracing::warn!(relay = %self.config.relay_id, %error, "relay stopped; some rows stay leased until their lease runs out");
        }
        if let Some(reason) = stopped {
            tracing::error!(relay = %self.config.relay_id, %reason, "relay stopped: the broker connection ended for good");
            self.metrics.stopped.store(1, Ordering::Relaxed);
            return Err(Error::BrokerGone(reason));
        }
        tracing::info!(relay = %self.config.relay_id, "relay stopped");
        ended
    }

    /// Gives back a batch claimed ahead whose predecessor failed. If that
    /// fails too, its rows stay leased to this relay until the lease runs
    /// out, and are claimed again then: late, never lost.
    async fn give_back_claimed(&self, claimed: &Claimed) {
        if let Err(error) = self.release(claimed, None).await {
            self.metrics.db_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, rows = claimed.batch.len(), "could not give back a batch; it is taken again when its lease runs out");
        }
    }

    /// Publishes a handed-off batch. Rows committed while it is on the wire
    /// are read at once and, if they share no key with it, published right
    /// behind it on the same connection (the broker keeps their order) instead
    /// of after its receipt; otherwise they become the next batch.
    async fn publish_handed_off(
        &self,
        current: Claimed,
        marks: &mut Marks<DB>,
        ready: &mut Option<Claimed>,
    ) -> Result<Step, Error> {
        let n = current.batch.len();
        let mut ahead = marks.ids();
        ahead.extend(current.ids());
        let (done, receipt) = tokio::sync::oneshot::channel::<()>();
        failpoint::hit("relay.before_publish");
        let (published, following) = tokio::join!(
            async {
                let published = self
                    .publisher
                    .publish(&current.batch)
                    .instrument(tracing::debug_span!("outbox.publish", rows = n))
                    .await;
                let _ = done.send(());
                published
            },
            async {
                // A wake-up may be left over from a commit this batch already
                // holds: then the read finds nothing and the next one is awaited.
                tokio::pin!(receipt);
                let next = loop {
                    tokio::select! {
                        biased;
                        _ = &mut receipt => return Ok(None),
                        _ = self.wake.notified() => {}
                    }
                    if let Some(next) = self.take_handed_off(&ahead).await? {
                        break next;
                    }
                };
                if !shares_no_key(&current.batch, &next.batch) {
                    return Ok(Some((next, None)));
                }
                failpoint::hit("relay.before_publish");
                let m = next.batch.len();
                let published = self
                    .publisher
                    .publish(&next.batch)
                    .instrument(tracing::debug_span!("outbox.publish", rows = m))
                    .await;
                Ok::<_, Error>(Some((next, Some(published))))
            }
        );
        if let Err(error) = published {
            // The batch behind it goes back too, even if it arrived: it is
            // published again later (same event ids).
            if let Ok(Some((next, _))) = following {
                self.give_back_claimed(&next).await;
            }
            marks.drain().await;
            return self.publish_failed(&current, error).await;
        }
        failpoint::hit("relay.after_receipt");
        marks.push(current);
        match following {
            Ok(None) => Ok(Step::Published(n)),
            Ok(Some((next, None))) => {
                *ready = Some(next);
                Ok(Step::Published(n))
            }
            Ok(Some((next, Some(Ok(()))))) => {
                failpoint::hit("relay.after_receipt");
                let m = next.batch.len();
                marks.push(next);
                Ok(Step::Published(n + m))
            }
            Ok(Some((next, Some(Err(error))))) => {
                marks.drain().await;
                self.publish_failed(&next, error).await
            }
            Err(error) => Err(error),
        }
    }

    /// The next batch: rows handed off to this relay, or rows claimed the
    /// usual way. Every fourth turn tries the claim first, so a steady stream
    /// of handed-off rows cannot starve rows written by other processes.
    async fn next_batch(&self, ahead: &HashSet<i64>) -> Result<Option<Claimed>, Error> {
        if !self.config.handoff {
            return self.claim_next(ahead).await;
        }
        if self.turn.fetch_add(1, Ordering::Relaxed).is_multiple_of(4) {
            if let Some(claimed) = self.claim_next(ahead).await? {
                return Ok(Some(claimed));
            }
            return self.take_handed_off(ahead).await;
        }
        if let Some(claimed) = self.take_handed_off(ahead).await? {
            return Ok(Some(claimed));
        }
        self.claim_next(ahead).await
    }

    /// Reads the committed rows leased to this relay at insert time (none of
    /// `ahead`, which are on their way already). A row whose key has an
    /// earlier unpublished row that is neither here nor ahead is given back
    /// to the usual claim, which keeps the key's order.
    async fn take_handed_off(&self, ahead: &HashSet<i64>) -> Result<Option<Claimed>, Error> {
        let size = usize::try_from(self.config.batch_size.max(1)).unwrap_or(usize::MAX);
        let limit = i64::try_from(size.saturating_add(ahead.len())).unwrap_or(i64::MAX);
        let token = self.handoff_token.as_str();
        let store = self.outbox.store();
        let mut conn = store.acquire().await?;
        let rows = store.handed_off(&mut conn, token, now_ms(), limit).await?;
        let mut batch: Vec<OutboxMessage> = rows
            .into_iter()
            .filter(|m| !ahead.contains(&m.id))
            .take(size)
            .collect();
        if batch.is_empty() {
            return Ok(None);
        }
        let accepted = self.key_order(&mut conn, &batch, ahead).await?;
        let held: Vec<i64> = batch
            .iter()
            .filter(|m| m.key.is_some() && !accepted.contains(&m.id))
            .map(|m| m.id)
            .collect();
        if !held.is_empty() {
            self.give_back_ids(&mut conn, token, &held, None).await?;
            batch.retain(|m| m.key.is_none() || accepted.contains(&m.id));
        }
        Ok((!batch.is_empty()).then(|| Claimed {
            token: token.to_owned(),
            batch,
            handed_off: true,
        }))
    }

    /// Claims the next batch under a fresh token; `None` when nothing is due.
    async fn claim_next(&self, in_flight: &HashSet<i64>) -> Result<Option<Claimed>, Error> {
        let seq = self.batch.fetch_add(1, Ordering::Relaxed);
        let token = claim_token(&self.config.relay_id, &self.incarnation, seq);
        let batch = self
            .claim(&token, in_flight)
            .instrument(tracing::debug_span!("outbox.claim", token))
            .await?;
        Ok((!batch.is_empty()).then_some(Claimed {
            token,
            batch,
            handed_off: false,
        }))
    }

    /// Settles a batch whose publish failed.
    async fn publish_failed(&self, claimed: &Claimed, error: PublishError) -> Result<Step, Error> {
        let n = claimed.batch.len();
        match error.kind {
            PublishErrorKind::Closed => self.closed(claimed, &error).await,
            PublishErrorKind::Unavailable => {
                tracing::warn!(%error, rows = n, "broker unavailable; batch released");
                self.metrics.unavailable.fetch_add(1, Ordering::Relaxed);
                self.release_failed(claimed, &error.message).await?;
                Ok(Step::Unavailable)
            }
            _ if n == 1 => {
                self.reject(&claimed.token, &claimed.batch[0], &error)
                    .await?;
                Ok(Step::Published(n))
            }
            _ => {
                tracing::warn!(%error, rows = n, "batch rejected; publishing one by one");
                self.one_by_one(claimed).await
            }
        }
    }

    /// The transport stopped for good: give the rows back (another relay may
    /// publish them) and stop.
    async fn closed(&self, claimed: &Claimed, error: &PublishError) -> Result<Step, Error> {
        self.release_failed(claimed, &error.message).await?;
        Ok(Step::Stopped(error.message.clone()))
    }

    /// After a rejected batch: find the culprits by publishing each row alone.
    async fn one_by_one(&self, claimed: &Claimed) -> Result<Step, Error> {
        let (token, batch) = (claimed.token.as_str(), claimed.batch.as_slice());
        let mut blocked: HashSet<&str> = HashSet::new();
        for m in batch {
            if m.key.as_deref().is_some_and(|k| blocked.contains(k)) {
                continue;
            }
            match self.publisher.publish(std::slice::from_ref(m)).await {
                Ok(()) => {
                    failpoint::hit("relay.after_receipt");
                    let store = self.outbox.store();
                    let mut conn = store.acquire().await?;
                    store
                        .mark_published(&mut conn, token, &[m.id], now_ms())
                        .await?;
                    self.metrics.published.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) if error.kind == PublishErrorKind::Closed => {
                    return self.closed(claimed, &error).await;
                }
                Err(error) if error.kind == PublishErrorKind::Unavailable => {
                    self.metrics.unavailable.fetch_add(1, Ordering::Relaxed);
                    self.release_failed(claimed, &error.message).await?;
                    return Ok(Step::Unavailable);
                }
                Err(error) => {
                    self.reject(token, m, &error).await?;
                    if let Some(key) = &m.key {
                        blocked.insert(key);
                    }
                }
            }
        }
        // Rows held back behind a rejected row of their key.
        self.release(claimed, None).await?;
        Ok(Step::Published(batch.len()))
    }

    /// Claims up to `batch_size` due rows for `token`. Rows in `in_flight` (the
    /// batch this relay is publishing right now, on the same connection, before
    /// this one) count as going ahead of the claimed rows of their keys.
    async fn claim(
        &self,
        token: &str,
        in_flight: &HashSet<i64>,
    ) -> Result<Vec<OutboxMessage>, Error> {
        let store = self.outbox.store();
        let now = now_ms();
        // A read first: an idle relay takes no write lock (SQLite) and opens no
        // transaction.
        if !store.any_due(now).await? {
            return Ok(Vec::new());
        }
        let mut tx = store.begin_relaxed().await?;
        let mut batch = store
            .select_due(&mut tx, now, self.config.batch_size.max(1))
            .await?;
        if batch.is_empty() {
            tx.commit().await.map_err(Error::db("ending a claim"))?;
            return Ok(Vec::new());
        }
        // Per-key order: drop rows that an unpublished earlier row of their key
        // (not in this batch) must precede.
        let accepted = self.key_order(&mut tx, &batch, in_flight).await?;
        batch.retain(|m| m.key.is_none() || accepted.contains(&m.id));
        if !batch.is_empty() {
            let ids: Vec<i64> = batch.iter().map(|m| m.id).collect();
            store
                .lease(&mut tx, token, now + ms(self.config.lease), &ids)
                .await?;
        }
        tx.commit().await.map_err(Error::db("committing a claim"))?;
        Ok(batch)
    }

    /// Of the keyed rows of `batch`, those no unpublished earlier row of their
    /// key must precede: every earlier unpublished row of the key is in
    /// `batch` itself or in `ahead` (published before `batch`, on the same
    /// connection).
    async fn key_order(
        &self,
        conn: &mut DB::Connection,
        batch: &[OutboxMessage],
        ahead: &HashSet<i64>,
    ) -> Result<HashSet<i64>, Error> {
        let mut seen = HashSet::new();
        let keys: Vec<&str> = batch
            .iter()
            .filter_map(|m| m.key.as_deref())
            .filter(|k| seen.insert(*k))
            .collect();
        let mut accepted = HashSet::new();
        if keys.is_empty() {
            return Ok(accepted);
        }
        let max_id = batch.iter().map(|m| m.id).max().unwrap_or(0);
        let earlier = self
            .outbox
            .store()
            .unpublished_of_keys(conn, max_id, &keys)
            .await?;
        let in_batch: HashSet<i64> = batch.iter().map(|m| m.id).collect();
        let mut blocked = HashSet::new();
        for (id, key) in earlier {
            if ahead.contains(&id) {
                continue;
            }
            if in_batch.contains(&id) && !blocked.contains(&key) {
                accepted.insert(id);
            } else {
                blocked.insert(key);
            }
        }
        Ok(accepted)
    }

    /// Gives back the rows of a batch, named by id and token.
    async fn release(&self, claimed: &Claimed, error: Option<&str>) -> Result<(), Error> {
        let ids: Vec<i64> = claimed.ids().collect();
        let mut conn = self.outbox.store().acquire().await?;
        self.give_back_ids(&mut conn, &claimed.token, &ids, error)
            .await
    }

    /// Gives back a batch whose publish failed; for a handed-off one also the
    /// rows handed off but not yet read, so other relays may take them while
    /// this one waits for the broker.
    async fn release_failed(&self, claimed: &Claimed, error: &str) -> Result<(), Error> {
        if claimed.handed_off {
            self.release_token(&claimed.token, Some(error)).await
        } else {
            self.release(claimed, Some(error)).await
        }
    }

    /// Gives back the rows `ids` held under `token`.
    async fn give_back_ids(
        &self,
        conn: &mut DB::Connection,
        token: &str,
        ids: &[i64],
        error: Option<&str>,
    ) -> Result<(), Error> {
        self.outbox
            .store()
            .release_ids(conn, token, ids, error, now_ms())
            .await
    }

    /// Gives back every row held under `token`.
    async fn release_token(&self, token: &str, error: Option<&str>) -> Result<(), Error> {
        self.outbox
            .store()
            .release_token(token, error, now_ms())
            .await
    }

    async fn reject(
        &self,
        token: &str,
        m: &OutboxMessage,
        error: &PublishError,
    ) -> Result<(), Error> {
        let attempts = u32::try_from(m.attempts).unwrap_or(u32::MAX);
        let now = now_ms();
        let next = now + ms(self.config.retry_backoff.delay(attempts));
        self.outbox
            .store()
            .reject(
                token,
                m.id,
                self.config.max_attempts,
                &error.message,
                next,
                now,
            )
            .await?;
        if attempts.saturating_add(1) >= self.config.max_attempts {
            tracing::error!(event_id = m.event_id, %error, "event parked as FAILED");
            self.metrics.failed.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::warn!(event_id = m.event_id, %error, "event rejected; will retry");
            self.metrics.retried.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Deletes old published rows, if this relay holds the retention lease.
    async fn retention(&self) -> Result<(), Error> {
        let Some(keep) = self.config.retention else {
            return Ok(());
        };
        let name = format!("{}.retention", self.outbox.table());
        let until = now_ms() + ms(self.config.retention_interval) * 2;
        if !schema::take_lease(self.outbox.pool(), &name, &self.config.relay_id, until).await? {
            return Ok(());
        }
        let before = now_ms() - ms(keep);
        let limit = self.config.retention_batch.max(1);
        loop {
            let n = self.outbox.store().delete_published(before, limit).await?;
            self.metrics.deleted.fetch_add(n, Ordering::Relaxed);
            if n < u64::from(limit) {
                return Ok(());
            }
            // Small batches, with room for the relay's own statements between.
            tokio::task::yield_now().await;
        }
    }
}

/// Marks published batches in the background, one database round at a time,
/// so a slow mark never holds up the next publish.
struct Marker<DB: Backend> {
    outbox: Outbox<DB>,
    metrics: Arc<RelayMetrics>,
    backoff: Backoff,
}

impl<DB: Backend> Marker<DB> {
    /// Marks `batches` published, in one transaction. A failure here means a
    /// re-publish, so transient errors (deadlock victims, a dropped
    /// connection) are retried a few times first.
    #[tracing::instrument(
        name = "outbox.mark",
        level = "debug",
        skip_all,
        fields(batches = batches.len(), rows = batches.iter().map(|b| b.batch.len()).sum::<usize>())
    )]
    async fn mark(&self, batches: &[Claimed]) -> Result<(), Error> {
        let mut attempt = 0;
        loop {
            match self.mark_once(batches).await {
                Ok(n) => {
                    self.metrics.published.fetch_add(n, Ordering::Relaxed);
                    return Ok(());
                }
                Err(error) if attempt < 4 => {
                    tracing::warn!(%error, attempt, "marking published failed; retrying");
                    tokio::time::sleep(self.backoff.delay(attempt)).await;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn mark_once(&self, batches: &[Claimed]) -> Result<u64, Error> {
        let store = self.outbox.store();
        let now = now_ms();
        let mut tx = store.begin_relaxed().await?;
        let mut n = 0;
        for claimed in batches {
            // Named by id and token: a mark never touches rows it did not publish.
            let ids: Vec<i64> = claimed.ids().collect();
            n += store
                .mark_published(&mut tx, &claimed.token, &ids, now)
                .await?;
        }
        tx.commit().await.map_err(Error::db("committing a mark"))?;
        Ok(n)
    }
}

/// Longest claim token: the `claimed_by` column is `VARCHAR(64)`.
const TOKEN_MAX: usize = outbox_rules::MAX_CLAIM_TOKEN;

/// The claim token of batch `seq`: unique to this incarnation, so a relay
/// started again under the same `relay_id` never holds a token its
/// predecessor held. A long `relay_id` is cut (on a character boundary) to
/// leave room for the incarnation and the sequence; the incarnation keeps the
/// token unique.
fn claim_token(relay_id: &str, incarnation: &str, seq: u64) -> String {
    let tail = format!("-{incarnation}-{seq}");
    let room = TOKEN_MAX.saturating_sub(tail.len());
    let mut cut = relay_id.len().min(room);
    while !relay_id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tail}", &relay_id[..cut])
}

/// A background task that is stopped when this handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A finished mark: its batches and how it went.
type MarkOutcome = (Vec<Claimed>, Result<(), Error>);

/// Published batches waiting to be marked: at most one mark runs at a time,
/// and what was published meanwhile is marked together in the next one.
struct Marks<DB: Backend> {
    marker: Arc<Marker<DB>>,
    running: Option<tokio::task::JoinHandle<MarkOutcome>>,
    /// Ids of the rows of the running mark (published, still `NEW` in the table).
    running_ids: HashSet<i64>,
    queued: Vec<Claimed>,
}

impl<DB: Backend> Marks<DB> {
    fn new(marker: Marker<DB>) -> Marks<DB> {
        Marks {
            marker: Arc::new(marker),
            running: None,
            running_ids: HashSet::new(),
            queued: Vec::new(),
        }
    }

    /// Rows published but not yet marked: they go ahead of anything read now.
    fn ids(&self) -> HashSet<i64> {
        let mut ids = self.running_ids.clone();
        ids.extend(self.queued.iter().flat_map(Claimed::ids));
        ids
    }

    fn push(&mut self, published: Claimed) {
        self.queued.push(published);
        self.start();
    }

    /// Starts a mark of everything queued, unless one is running.
    fn start(&mut self) {
        if self.running.is_some() || self.queued.is_empty() {
            return;
        }
        let batches = std::mem::take(&mut self.queued);
        self.running_ids = batches.iter().flat_map(Claimed::ids).collect();
        let marker = self.marker.clone();
        self.running = Some(tokio::spawn(async move {
            let result = marker.mark(&batches).await;
            (batches, result)
        }));
    }

    /// Takes the result of a finished mark (without waiting) and starts the next.
    async fn advance(&mut self) {
        if self.running.as_ref().is_some_and(|h| h.is_finished()) {
            self.finish().await;
        }
        self.start();
    }

    fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Waits for the running mark, if any (cancel-safe). A mark that failed
    /// after its retries is queued again: its rows stay ahead of later reads,
    /// so they are not published again while the relay runs.
    async fn finish(&mut self) {
        let Some(handle) = self.running.as_mut() else {
            return;
        };
        let outcome = handle.await;
        self.running = None;
        self.running_ids.clear();
        match outcome {
            Ok((_, Ok(()))) => {}
            Ok((batches, Err(error))) => {
                tracing::warn!(%error, "marking published failed; will try again");
                self.queued.extend(batches);
            }
            Err(join) => tracing::error!(%join, "mark task failed"),
        }
    }

    /// Waits until everything published so far has had its mark attempted.
    async fn drain(&mut self) {
        self.finish().await;
        self.start();
        self.finish().await;
    }

    /// Marks everything still unmarked (at shutdown).
    async fn settle(&mut self) -> Result<(), Error> {
        self.finish().await;
        let batches = std::mem::take(&mut self.queued);
        if batches.is_empty() {
            return Ok(());
        }
        self.marker.mark(&batches).await
    }
}

/// `true` when no key has rows in both batches.
fn shares_no_key(a: &[OutboxMessage], b: &[OutboxMessage]) -> bool {
    let keys: HashSet<&str> = a.iter().filter_map(|m| m.key.as_deref()).collect();
    b.iter()
        .filter_map(|m| m.key.as_deref())
        .all(|k| !keys.contains(k))
}

/// `true` if `shutdown` has completed, without waiting.
async fn futures_poll_ready<F: Future<Output = ()>>(shutdown: &mut std::pin::Pin<&mut F>) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.as_mut() => true,
        _ = std::future::ready(()) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{RelayConfig, claim_token};
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
        let cases = [
            (
                RelayConfig {
                    batch_size: 0,
                    ..RelayConfig::default()
                },
                "RelayConfig::batch_size",
            ),
            (
                RelayConfig {
                    batch_size: 10_001,
                    ..RelayConfig::default()
                },
                "RelayConfig::batch_size",
            ),
            (
                RelayConfig {
                    max_attempts: 0,
                    ..RelayConfig::default()
                },
                "RelayConfig::max_attempts",
            ),
            (
                RelayConfig {
                    relay_id: String::new(),
                    ..RelayConfig::default()
                },
                "RelayConfig::relay_id",
            ),
            (
                RelayConfig {
                    relay_id: "r".repeat(63),
                    ..RelayConfig::default()
                },
                "RelayConfig::relay_id",
            ),
            (
                RelayConfig {
                    relay_id: "a\nb".into(),
                    ..RelayConfig::default()
                },
                "RelayConfig::relay_id",
            ),
            (
                RelayConfig {
                    lease: Duration::ZERO,
                    ..RelayConfig::default()
                },
                "RelayConfig::lease",
            ),
            (
                RelayConfig {
                    lease: Duration::MAX,
                    ..RelayConfig::default()
                },
                "RelayConfig::lease",
            ),
            (
                RelayConfig {
                    retention: Some(Duration::MAX),
                    ..RelayConfig::default()
                },
                "RelayConfig::retention",
            ),
            (
                RelayConfig {
                    retry_backoff: crate::Backoff::new(Duration::from_secs(1), Duration::MAX),
                    ..RelayConfig::default()
                },
                "RelayConfig::retry_backoff",
            ),
        ];
        for (config, setting) in cases {
            assert_eq!(refused(&config, None), setting);
        }
        let longest = RelayConfig {
            relay_id: "r".repeat(62),
            ..RelayConfig::default()
        };
        longest.validate(None).unwrap();
    }

    #[test]
    fn claim_tokens_differ_per_incarnation_and_fit_the_column_for_any_relay_id() {
        assert_eq!(claim_token("relay", "0a1b2c3d", 7), "relay-0a1b2c3d-7");
        assert_ne!(
            claim_token("relay", "0a1b2c3d", 7),
            claim_token("relay", "ffeeddcc", 7)
        );
        let long = "é".repeat(60);
        let token = claim_token(&long, "0a1b2c3d", u64::MAX);
        assert!(token.len() <= super::TOKEN_MAX, "{} bytes", token.len());
        assert!(token.ends_with(&format!("-0a1b2c3d-{}", u64::MAX)));
    }
}
