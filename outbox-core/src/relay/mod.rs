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

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

use tokio::sync::Notify;
use uuid::Uuid;

use crate::Outbox;
use crate::backend::Backend;
use crate::error::Error;

mod claim;
mod config;
mod counters;
mod failure;
mod housekeeping;
mod lifecycle;
mod marks;
mod owner;
mod pacing;
mod pipeline;
mod share;

pub use crate::error::{PublishError, PublishErrorKind};
pub use crate::event::OutboxMessage;
pub use crate::transport::{Publisher, StompPublisher};
pub use config::{MAX_RELAY_BATCH, RelayConfig};
pub use counters::{RelayCounter, RelayCounts, RelayMetrics};
pub use share::KEY_PARTITIONS;
use share::ShareCell;
pub(crate) use share::key_partition;

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
    /// A relay that publishes the rows of `outbox` through `publisher`, as
    /// [`Consumer::new`](crate::Consumer::new) builds a consumer of an inbox.
    /// The settings are checked first ([`RelayConfig::validate`]): an
    /// [`Error::InvalidConfig`] names the one out of range, for instance a
    /// lease not longer than a publish can take.
    /// [`Outbox::relay`] is the same call.
    pub fn new(
        outbox: Outbox<DB>,
        publisher: P,
        config: RelayConfig,
    ) -> Result<Relay<DB, P>, Error> {
        config.validate(publisher.max_publish_time())?;
        Ok(Relay {
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
        })
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
}
