//! The relay: moves committed outbox rows to the broker.
//!
//! One step of the loop:
//!
//! ```text
//!  claim ──► publish (one STOMP transaction) ──► receipt ──► mark PUBLISHED
//!    │            │ rejected                        │
//!    │            └─► one by one: each row PUBLISHED, or attempts+1 / backoff / FAILED
//!    │            │ destination refused to the relay's user (authorisation)
//!    │            └─► its rows deferred with backoff, no attempt spent; the rest flows
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
//! The token is shared by every incarnation of a `relay_id`, so a relay
//! holds a lock on its `relay_id` while it runs (see `owner.rs`) and a
//! second one of the name waits for it.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

use crate::backend::Backend;
use crate::names::{ms, now_ms};
use crate::observe::{Health, RelayInstruments, Status};
use crate::wake::Handoff;
use crate::{Error, Outbox, failpoint, schema, wake};

mod claim;
mod config;
mod marks;
mod owner;
mod pacing;
mod share;

pub use crate::error::{PublishError, PublishErrorKind};
pub use crate::event::OutboxMessage;
pub use crate::transport::{Publisher, StompPublisher};
pub(crate) use config::bounded;
pub use config::{MAX_RELAY_BATCH, RelayConfig};
use marks::{Marker, Marks};
use pacing::{Next, Pacing};
pub use share::KEY_PARTITIONS;
pub(crate) use share::key_partition;
use share::{Membership, ShareCell};
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
    /// with [`Relay::run`] reports [`Stopped`](crate::observe::RunState::Stopped)
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
    /// The longest one publish can take, as the publisher says (zero if it
    /// does not know): a batch claimed behind another is leased that much longer.
    max_publish: std::time::Duration,
    /// The key partitions this relay claims from.
    share: Arc<ShareCell>,
    /// Keys lately found waiting behind an earlier row: claims leave them out
    /// from their first window.
    waiting: std::sync::Mutex<claim::WaitingKeys>,
    /// Whether this relay holds the lock on its `relay_id` now: only then
    /// does it read, or give back, rows under the shared hand-off token.
    owned: Arc<AtomicBool>,
    /// Published rows wait for a mark that failed: they are still held under
    /// their token, so a failed publish gives back its own rows only, never
    /// every row of the shared hand-off token.
    unmarked: AtomicBool,
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
    /// When the batch was claimed or read.
    taken_at: Instant,
}

impl Claimed {
    fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.batch.iter().map(|m| m.id)
    }

    /// The broker confirmed the batch: its time from claim to receipt goes
    /// to the publish histogram.
    fn confirmed(&self, metrics: &RelayMetrics) {
        metrics.status.succeeded();
        metrics
            .status
            .destinations_accepted(self.batch.iter().map(|m| m.destination.as_str()));
        if let Some(i) = metrics.instruments.get() {
            i.publish_seconds
                .record(self.taken_at.elapsed().as_secs_f64());
        }
    }
}

/// A running relay. [`shutdown`](crate::task::TaskHandle::shutdown) stops it
/// after the batch in flight: that batch is marked, a claimed one given back.
pub type RelayHandle = crate::task::TaskHandle<RelayMetrics>;

impl<DB: Backend, P: Publisher> Relay<DB, P> {
    pub(crate) fn new(outbox: Outbox<DB>, publisher: P, config: RelayConfig) -> Relay<DB, P> {
        Relay {
            handoff_token: format!("{}-h", config.relay_id),
            // The random tail of a UUID v7.
            incarnation: Uuid::now_v7().simple().to_string()[24..].to_owned(),
            turn: AtomicU64::new(0),
            max_publish: publisher.max_publish_time().unwrap_or_default(),
            outbox,
            publisher,
            config,
            metrics: Arc::default(),
            wake: Arc::new(Notify::new()),
            batch: AtomicU64::new(0),
            share: Arc::new(ShareCell::all()),
            waiting: std::sync::Mutex::default(),
            owned: Arc::new(AtomicBool::new(false)),
            unmarked: AtomicBool::new(false),
        }
    }

    /// The relay's counters.
    pub fn metrics(&self) -> Arc<RelayMetrics> {
        self.metrics.clone()
    }

    /// Runs the relay on a task until [`RelayHandle::shutdown`].
    pub fn spawn(self) -> RelayHandle {
        // Registered before the task starts: rows appended right after
        // `spawn` returns are handed off already.
        let handoff = self.offer_handoff();
        crate::task::TaskHandle::spawn("relay", self.metrics(), |mut stopped| async move {
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            self.run_with(stop, handoff).await
        })
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
        // Nothing is taken before this relay is the only one of its
        // `relay_id` on the table.
        let lock = match self.take_lock(&mut shutdown).await {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                tracing::info!(relay = %self.config.relay_id, "relay stopped before it could run");
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        self.owned.store(true, Ordering::Release);
        let (stop_keeping, stop) = tokio::sync::oneshot::channel();
        let keeper = AbortOnDrop(tokio::spawn(keep_lock(
            lock,
            self.outbox.clone(),
            self.config.relay_id.clone(),
            self.owned.clone(),
            stop,
        )));
        let table = self.outbox.table().to_owned();
        // Ends with this call however it ends: returned, failed or dropped.
        let _listener = DB::listen(self.outbox.pool(), &table, self.wake.clone()).map(AbortOnDrop);
        let _ = self.metrics.instruments.set(RelayInstruments::new(&table));
        if let Some(link) = self.publisher.link() {
            self.metrics.status.set_link(link);
        }
        let _figures = self.config.stats_interval.map(|every| {
            AbortOnDrop(tokio::spawn(read_figures(
                self.outbox.clone(),
                self.metrics.clone(),
                every,
            )))
        });
        let membership = self.join().await;
        let _renewing = membership
            .clone()
            .map(|m| AbortOnDrop(tokio::spawn(m.keep_renewing())));
        let mut pacing = Pacing::new(&self.config, handoff.clone());
        // Retention runs beside the pipeline: a first pass over millions of
        // old rows must not hold up publishing (and the claimed batch's lease).
        let _retention = self.config.retention.map(|keep| {
            AbortOnDrop(tokio::spawn(retention_loop(
                self.outbox.clone(),
                self.metrics.clone(),
                self.config.clone(),
                keep,
            )))
        });
        // Published batches are marked in the background; until then their
        // rows count as ahead of everything read.
        let mut marks = Marks::new(Marker {
            outbox: self.outbox.clone(),
            metrics: self.metrics.clone(),
            backoff: self.config.outage_backoff,
        });
        let mut ready: Option<Claimed> = None;
        tracing::info!(relay = %self.config.relay_id, table, "relay started");
        let stopped = loop {
            marks.advance().await;
            let outcome = self.turn(&mut ready, &mut marks).await;
            let pause = match pacing.after(outcome, &self.metrics) {
                Next::Go(pause) => pause,
                Next::Stop(reason) => break Some(reason),
            };
            if self.wait(pause, &mut shutdown, &mut marks).await {
                break None;
            }
        };
        pacing.offer(false);
        drop(_renewing);
        if let Some(membership) = membership
            && let Err(error) = membership.leave().await
        {
            tracing::warn!(%error, "could not leave the relays of the table; the others take this relay's partitions when its membership runs out");
        }
        let ended = self.finish(ready, marks, handoff, stopped).await;
        // Given up last: a relay that takes it next finds nothing of this
        // one's still under way.
        let _ = stop_keeping.send(());
        let _ = keeper.finish().await;
        ended
    }

    /// Waits until this relay holds the lock on its `relay_id` and table;
    /// `None` if `shutdown` completes first. Database errors are retried;
    /// a SQLite lock file that cannot be opened is an error.
    async fn take_lock(
        &self,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<owner::OwnerLock<DB>>, Error> {
        let mut spare = None;
        let mut warned = false;
        loop {
            match owner::OwnerLock::try_take(
                self.outbox.pool(),
                self.outbox.table(),
                &self.config.relay_id,
                &mut spare,
            )
            .await
            {
                Ok(Some(lock)) => {
                    if warned {
                        tracing::info!(relay = %self.config.relay_id, "the other relay of this relay_id stopped; starting");
                    }
                    return Ok(Some(lock));
                }
                Ok(None) => {
                    if !warned {
                        warned = true;
                        tracing::warn!(
                            relay = %self.config.relay_id,
                            table = self.outbox.table(),
                            "another relay runs under this relay_id on this table; waiting until it stops"
                        );
                    }
                }
                Err(error @ Error::RelayLockFile { .. }) => return Err(error),
                Err(error) => {
                    self.metrics.add(Count::DbErrors, 1);
                    self.metrics.status.database_failed(&error);
                    tracing::warn!(%error, "could not take the relay's lock; trying again");
                }
            }
            tokio::select! {
                _ = shutdown.as_mut() => return Ok(None),
                _ = tokio::time::sleep(LOCK_RETRY) => {}
            }
        }
    }

    /// Joins the relays of the table (with [`RelayConfig::key_partitions`]):
    /// the first renewal sets this relay's share before its first claim.
    async fn join(&self) -> Option<Arc<Membership<DB>>> {
        if !self.config.key_partitions {
            return None;
        }
        let membership = Arc::new(Membership::new(
            self.outbox.pool().clone(),
            self.outbox.table(),
            &self.config.relay_id,
            &self.incarnation,
            self.config.lease,
            self.share.clone(),
        ));
        if let Err(error) = membership.renew().await {
            tracing::warn!(%error, "could not join the relays of the table yet; claiming from every partition");
        }
        Some(membership)
    }

    /// One turn of the pipeline. Batches go to the broker one after another
    /// on one connection, so a key's events keep their order. While batch i
    /// is on the wire, rows for batch i+1 are claimed; if batch i fails, a
    /// batch claimed meanwhile is given back unpublished. Rows handed off
    /// while a handed-off batch is on the wire follow it at once when they
    /// share no key with it ([`publish_handed_off`](Relay::publish_handed_off)).
    async fn turn(
        &self,
        ready: &mut Option<Claimed>,
        marks: &mut Marks<DB>,
    ) -> Result<Step, Error> {
        match ready.take() {
            None => {
                let next = self.next_batch(&marks.ids(), false).await?;
                let step = if next.is_some() {
                    Step::Published(0)
                } else {
                    Step::Idle
                };
                *ready = next;
                Ok(step)
            }
            Some(current) if current.handed_off => {
                self.publish_handed_off(current, marks, ready).await
            }
            Some(current) => self.publish_claimed(current, marks, ready).await,
        }
    }

    /// Publishes a claimed batch while claiming the next one.
    async fn publish_claimed(
        &self,
        current: Claimed,
        marks: &mut Marks<DB>,
        ready: &mut Option<Claimed>,
    ) -> Result<Step, Error> {
        let mut in_flight = marks.ids();
        in_flight.extend(current.ids());
        let n = current.batch.len();
        failpoint::hit("relay.before_publish");
        let (published, following) = tokio::join!(
            self.publisher
                .publish(&current.batch)
                .instrument(crate::trace::publish_span(&current.batch)),
            self.next_batch(&in_flight, true)
        );
        match published {
            Ok(()) => {
                failpoint::hit("relay.after_receipt");
                current.confirmed(&self.metrics);
                marks.push(current);
                *ready = following?;
                Ok(Step::Published(n))
            }
            Err(error) => {
                if let Ok(Some(next)) = following {
                    self.give_back_claimed(&next).await;
                }
                // Marked first: giving the batch back may give back every
                // row under its token.
                marks.drain().await;
                self.unmarked
                    .store(!marks.ids().is_empty(), Ordering::Release);
                self.publish_failed(&current, error).await
            }
        }
    }

    /// Waits `pause` (none: only checks for shutdown), waking early for a
    /// commit; `true` when asked to stop.
    async fn wait(
        &self,
        pause: Option<std::time::Duration>,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        marks: &mut Marks<DB>,
    ) -> bool {
        let Some(pause) = pause else {
            return futures_poll_ready(shutdown).await;
        };
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = shutdown.as_mut() => return true,
                _ = self.wake.notified() => return false,
                _ = &mut sleep => return false,
                // A finished mark may leave more to mark; keep waiting.
                _ = marks.finish(), if marks.is_running() => marks.start(),
            }
        }
    }

    /// Finishes what is in flight: marks the published batches, gives back
    /// the claimed one and the rows handed off but not yet read. Each step
    /// is tried even if one before it failed; rows not given back stay
    /// leased and are taken by any relay when the lease runs out.
    async fn finish(
        &self,
        mut ready: Option<Claimed>,
        mut marks: Marks<DB>,
        handoff: Option<Arc<Handoff>>,
        stopped: Option<String>,
    ) -> Result<(), Error> {
        let mut ended = marks.settle().await;
        if let Some(claimed) = ready.take() {
            ended = ended.and(self.release(&claimed, None).await);
        }
        if handoff.is_some() && self.owned.load(Ordering::Acquire) {
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
            self.metrics.add(Count::DbErrors, 1);
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
                    .instrument(crate::trace::publish_span(&current.batch))
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
                    if let Some(next) = self.take_handed_off(&ahead, false).await? {
                        break next;
                    }
                };
                if !shares_no_key(&current.batch, &next.batch) {
                    return Ok(Some((next, None)));
                }
                failpoint::hit("relay.before_publish");
                let published = self
                    .publisher
                    .publish(&next.batch)
                    .instrument(crate::trace::publish_span(&next.batch))
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
            self.unmarked
                .store(!marks.ids().is_empty(), Ordering::Release);
            return self.publish_failed(&current, error).await;
        }
        failpoint::hit("relay.after_receipt");
        current.confirmed(&self.metrics);
        marks.push(current);
        match following {
            Ok(None) => Ok(Step::Published(n)),
            Ok(Some((next, None))) => {
                *ready = Some(next);
                Ok(Step::Published(n))
            }
            Ok(Some((next, Some(Ok(()))))) => {
                failpoint::hit("relay.after_receipt");
                next.confirmed(&self.metrics);
                let m = next.batch.len();
                marks.push(next);
                Ok(Step::Published(n + m))
            }
            Ok(Some((next, Some(Err(error))))) => {
                marks.drain().await;
                self.unmarked
                    .store(!marks.ids().is_empty(), Ordering::Release);
                self.publish_failed(&next, error).await
            }
            Err(error) => Err(error),
        }
    }

    /// Settles a batch whose publish failed.
    async fn publish_failed(&self, claimed: &Claimed, error: PublishError) -> Result<Step, Error> {
        let n = claimed.batch.len();
        match error.kind {
            PublishErrorKind::Closed => self.closed(claimed, &error).await,
            PublishErrorKind::Unavailable => {
                tracing::warn!(%error, rows = n, "broker unavailable; batch released");
                self.unavailable(claimed, &error).await
            }
            PublishErrorKind::Unauthorized if n == 1 => {
                self.defer(&claimed.token, &claimed.batch[0], &error)
                    .await?;
                Ok(Step::Published(n))
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

    /// The broker could not be reached: count it, report it, give the batch
    /// back (the whole relay backs off next).
    async fn unavailable(&self, claimed: &Claimed, error: &PublishError) -> Result<Step, Error> {
        self.metrics.add(Count::Unavailable, 1);
        self.metrics.status.broker_failed(&error.message);
        self.release_failed(claimed, &error.message).await?;
        Ok(Step::Unavailable)
    }

    /// The transport stopped for good: give the rows back (another relay may
    /// publish them) and stop.
    async fn closed(&self, claimed: &Claimed, error: &PublishError) -> Result<Step, Error> {
        if let Err(release) = self.release_failed(claimed, &error.message).await {
            // The rows stay leased until the lease runs out; the relay stops anyway.
            tracing::warn!(error = %release, "could not give back a batch while stopping");
        }
        Ok(Step::Stopped(error.message.clone()))
    }

    /// After a rejected batch: find the culprits by publishing each row alone.
    /// A row whose destination is refused to the relay's user defers that
    /// destination; the batch's later rows of it are not tried.
    async fn one_by_one(&self, claimed: &Claimed) -> Result<Step, Error> {
        let (token, batch) = (claimed.token.as_str(), claimed.batch.as_slice());
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut refused: HashSet<&str> = HashSet::new();
        for m in batch {
            if m.key.as_deref().is_some_and(|k| blocked.contains(k)) {
                continue;
            }
            if refused.contains(m.destination.as_str()) {
                // Per-key order: the key's later rows wait behind this one.
                if let Some(key) = &m.key {
                    blocked.insert(key);
                }
                continue;
            }
            // Row by row the batch can outlast its lease: each row's lease
            // is made whole first, and a row whose lease ran out (another
            // relay's by now) is left to that relay, its key's later rows
            // behind it.
            if !self.renew_for_one_publish(token, m.id).await? {
                if let Some(key) = &m.key {
                    blocked.insert(key);
                }
                continue;
            }
            let one = std::slice::from_ref(m);
            match self
                .publisher
                .publish(one)
                .instrument(crate::trace::publish_span(one))
                .await
            {
                Ok(()) => {
                    failpoint::hit("relay.after_receipt");
                    let store = self.outbox.store();
                    let now = crate::clock::now(store.pool()).await;
                    let mut conn = store.acquire().await?;
                    store.mark_published(&mut conn, token, &[m.id], now).await?;
                    self.metrics.add(Count::Published, 1);
                    self.metrics.status.succeeded();
                    self.metrics
                        .status
                        .destinations_accepted(std::iter::once(m.destination.as_str()));
                }
                Err(error) if error.kind == PublishErrorKind::Closed => {
                    return self.closed(claimed, &error).await;
                }
                Err(error) if error.kind == PublishErrorKind::Unavailable => {
                    return self.unavailable(claimed, &error).await;
                }
                Err(error) if error.kind == PublishErrorKind::Unauthorized => {
                    self.defer(token, m, &error).await?;
                    refused.insert(&m.destination);
                    if let Some(key) = &m.key {
                        blocked.insert(key);
                    }
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

    /// Sets row `id`'s lease to a whole [`RelayConfig::lease`] from now (on
    /// the database's clock) if `token` still holds it unexpired; `false` if
    /// not.
    async fn renew_for_one_publish(&self, token: &str, id: i64) -> Result<bool, Error> {
        let store = self.outbox.store();
        let now = crate::clock::now(store.pool()).await;
        let lease = i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
        let mut conn = store.acquire().await?;
        let renewed = store
            .renew_lease(&mut conn, token, &[id], now, now.saturating_add(lease))
            .await?;
        Ok(renewed == 1)
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
        // Every row under the shared token only while the lock is held: a
        // relay that lost it may no longer speak for the token's rows; and
        // only while no published row waits for its mark under the token.
        if claimed.handed_off
            && self.owned.load(Ordering::Acquire)
            && !self.unmarked.load(Ordering::Acquire)
        {
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

    /// The broker refused `m`'s destination to the relay's user: every
    /// waiting row of that destination (free, or held by this claim) is due
    /// again after a backoff that grows with each refusal in a row, its
    /// attempts untouched. Other destinations go on; the broker's
    /// authorisation may allow it again at any time.
    async fn defer(
        &self,
        token: &str,
        m: &OutboxMessage,
        error: &PublishError,
    ) -> Result<(), Error> {
        let refusals = self
            .metrics
            .status
            .destination_refused(&m.destination, &error.message);
        let delay = self.config.outage_backoff.delay(refusals.saturating_sub(1));
        let now = crate::clock::now(self.outbox.pool()).await;
        let rows = self
            .outbox
            .store()
            .defer_destination(token, &m.destination, now + ms(delay), &error.message, now)
            .await?;
        self.metrics.add(Count::Deferred, rows);
        tracing::warn!(
            destination = m.destination,
            rows,
            refusals,
            ?delay,
            %error,
            "the broker refuses the destination to the relay's user; its rows are deferred, no attempt spent"
        );
        Ok(())
    }

    async fn reject(
        &self,
        token: &str,
        m: &OutboxMessage,
        error: &PublishError,
    ) -> Result<(), Error> {
        let attempts = u32::try_from(m.attempts).unwrap_or(u32::MAX);
        let now = crate::clock::now(self.outbox.pool()).await;
        let next = now + ms(self.config.retry_backoff.delay(attempts));
        let state = self
            .outbox
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
        // Counted as the table has it: a row no longer held changed nothing.
        match state {
            Some(crate::store::OutboxState::Failed) => {
                tracing::error!(event_id = m.event_id, %error, "event parked as FAILED");
                self.metrics.add(Count::Failed, 1);
            }
            Some(_) => {
                tracing::warn!(event_id = m.event_id, %error, "event rejected; will retry");
                self.metrics.add(Count::Retried, 1);
            }
            None => {
                tracing::debug!(event_id = m.event_id, %error, "rejected row no longer held; nothing recorded");
            }
        }
        Ok(())
    }
}

/// Deletes old published rows every `retention_interval`, while this relay
/// holds the table's retention lease, in batches of `retention_batch`.
async fn retention_loop<DB: Backend>(
    outbox: Outbox<DB>,
    metrics: Arc<RelayMetrics>,
    config: RelayConfig,
    keep: std::time::Duration,
) {
    loop {
        if let Err(error) = retention(&outbox, &metrics, &config, keep).await {
            tracing::warn!(%error, "retention failed");
        }
        tokio::time::sleep(config.retention_interval).await;
    }
}

/// One retention pass, if this relay holds the retention lease.
async fn retention<DB: Backend>(
    outbox: &Outbox<DB>,
    metrics: &RelayMetrics,
    config: &RelayConfig,
    keep: std::time::Duration,
) -> Result<(), Error> {
    let name = format!("{}.retention", outbox.table());
    let now = crate::clock::now(outbox.pool()).await;
    let until = now + ms(config.retention_interval) * 2;
    if !schema::take_lease(outbox.pool(), &name, &config.relay_id, now, until).await? {
        return Ok(());
    }
    let before = now - ms(keep);
    let limit = config.retention_batch.max(1);
    loop {
        let n = outbox.store().delete_published(before, limit).await?;
        metrics.add(Count::Deleted, n);
        if n < u64::from(limit) {
            return Ok(());
        }
        // Small batches, with room for the relay's own statements between.
        tokio::task::yield_now().await;
    }
}

/// Reads the backlog, its age and the parked rows every `every`, for
/// [`RelayMetrics::health`] and the gauges.
async fn read_figures<DB: Backend>(
    outbox: Outbox<DB>,
    metrics: Arc<RelayMetrics>,
    every: std::time::Duration,
) {
    loop {
        match outbox.backlog().await {
            Ok(backlog) => {
                let (pending, oldest, parked) =
                    (backlog.pending, backlog.oldest_pending_age, backlog.parked);
                metrics.status.set_figures(pending, oldest, parked);
                if let Some(i) = metrics.instruments.get() {
                    i.backlog.set(pending as f64);
                    i.oldest.set(oldest.unwrap_or_default().as_secs_f64());
                    i.parked_rows.set(parked as f64);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "could not read the backlog figures");
                metrics.status.database_failed(&error);
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// How long a relay waits between tries to take its `relay_id`'s lock.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// How often a relay checks that its lock's session is still there.
const LOCK_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Holds the relay's lock until `stop`, then gives it up. A lock whose
/// session ended (connection cut, server restart, session killed) is
/// noticed within [`LOCK_CHECK`]: `owned` is cleared, so the relay leaves
/// the hand-off token's rows alone, and the lock is taken again as soon as
/// it is free.
async fn keep_lock<DB: Backend>(
    lock: owner::OwnerLock<DB>,
    outbox: Outbox<DB>,
    relay_id: String,
    owned: Arc<AtomicBool>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut lock = Some(lock);
    let mut spare = None;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(LOCK_CHECK) => {}
        }
        match lock.as_mut() {
            Some(held) => {
                if !held.still_held().await {
                    owned.store(false, Ordering::Release);
                    lock = None;
                    tracing::warn!(relay = %relay_id, "the session holding the relay's lock ended; leaving handed-off rows alone until it is taken again");
                }
            }
            None => {
                let taking = owner::OwnerLock::try_take(
                    outbox.pool(),
                    outbox.table(),
                    &relay_id,
                    &mut spare,
                );
                // A try that hangs (a half-open link to the database) is
                // abandoned and made again at the next check.
                match tokio::time::timeout(LOCK_CHECK * 5, taking)
                    .await
                    .unwrap_or(Ok(None))
                {
                    Ok(Some(taken)) => {
                        lock = Some(taken);
                        owned.store(true, Ordering::Release);
                        tracing::info!(relay = %relay_id, "relay's lock taken again");
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::debug!(%error, "could not take the relay's lock again yet")
                    }
                }
            }
        }
    }
    owned.store(false, Ordering::Release);
    if let Some(lock) = lock {
        lock.release().await;
    }
}

/// A background task that is stopped when this handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Waits for the task to end by itself.
    async fn finish(mut self) -> Result<(), tokio::task::JoinError> {
        let handle = std::mem::replace(&mut self.0, tokio::spawn(async {}));
        handle.await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
