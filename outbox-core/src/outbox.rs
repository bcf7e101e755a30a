//! The producer side: the [`Outbox`] handle appends events inside the caller's
//! transaction and reports on the table.

use std::sync::Arc;
use std::time::Duration;

use outbox_stomp::BrokerLimits;
use sqlx::{Pool, Transaction};
use uuid::Uuid;

use crate::backend::Backend;
use crate::event::Event;
use crate::names::TableName;
use crate::rows::{Backlog, OutboxCounts, Parked, ParkedEvent, ParkedRows};
use crate::store::{OutboxState, OutboxStore};
use crate::wake::PoolId;
use crate::{Error, Publisher, Relay, RelayConfig, wake};

/// Default name of the outbox table.
pub const DEFAULT_OUTBOX_TABLE: &str = outbox_rules::DEFAULT_OUTBOX_TABLE;

/// Handle on one outbox table in one database. Cheap to clone.
///
/// ```no_run
/// # #[cfg(feature = "sqlite")]
/// # async fn demo(pool: sqlx::SqlitePool) -> Result<(), outbox_core::Error> {
/// use outbox_core::{Event, Outbox};
///
/// let outbox = Outbox::new(pool.clone());
/// outbox.migrate().await?;
///
/// let mut tx = pool.begin().await.map_err(|e| outbox_core::Error::Database { action: "begin", source: e })?;
/// sqlx::query("INSERT INTO users (name) VALUES ('ada')").execute(&mut *tx).await.ok();
/// outbox.append(&mut tx, Event::json("user.created", "/topic/VirtualTopic.user.created", &"ada")?).await?;
/// outbox.commit(tx).await?; // commits, then wakes the relays of this process
/// # Ok(())
/// # }
/// ```
pub struct Outbox<DB: Backend> {
    pub(crate) inner: Arc<Inner<DB>>,
}

pub(crate) struct Inner<DB: Backend> {
    pub(crate) store: OutboxStore<DB>,
    pub(crate) pool_id: PoolId,
    /// What the broker accepts; events beyond it are refused at append.
    pub(crate) limits: BrokerLimits,
}

impl<DB: Backend> Clone for Outbox<DB> {
    fn clone(&self) -> Self {
        Outbox {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for Outbox<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("database", &DB::DIALECT.name)
            .field("table", &self.table())
            .finish()
    }
}

/// What became of the events [`Outbox::wait_published`] waited for: each id
/// given is in exactly one of the lists (once, however often it was given).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Settled {
    /// Confirmed by the broker (`PUBLISHED`).
    pub published: Vec<String>,
    /// Parked (`FAILED`) after the broker kept refusing them: they will not
    /// be published unless replayed ([`Outbox::replay`]).
    pub parked: Vec<ParkedId>,
    /// No row has this id: never committed (rolled back, or not an id of
    /// this table), discarded, or published and already removed by
    /// retention.
    pub missing: Vec<String>,
}

impl Settled {
    /// `true` when every event given was published.
    pub fn all_published(&self) -> bool {
        self.parked.is_empty() && self.missing.is_empty()
    }
}

/// A parked event among those [`Outbox::wait_published`] waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedId {
    /// The event id.
    pub event_id: String,
    /// Why the broker refused it the last time.
    pub last_error: Option<String>,
}

/// First and longest pause between two reads of [`Outbox::wait_published`].
const WAIT_POLL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(250));

impl<DB: Backend> Outbox<DB> {
    /// The outbox in table [`DEFAULT_OUTBOX_TABLE`].
    pub fn new(pool: Pool<DB>) -> Outbox<DB> {
        let table = TableName::new("outbox table name", DEFAULT_OUTBOX_TABLE)
            .unwrap_or_else(|_| unreachable!("the default name is valid"));
        Outbox::with(pool, table)
    }

    /// The outbox in table `table`; the name is validated.
    pub fn with_table(pool: Pool<DB>, table: &str) -> Result<Outbox<DB>, Error> {
        Ok(Outbox::with(
            pool,
            TableName::new("outbox table name", table)?,
        ))
    }

    fn with(pool: Pool<DB>, table: TableName) -> Outbox<DB> {
        Outbox {
            inner: Arc::new(Inner {
                pool_id: wake::pool_id(&pool),
                store: OutboxStore::new(pool, table),
                limits: BrokerLimits::default(),
            }),
        }
    }

    /// This outbox with other broker limits (default: ActiveMQ's,
    /// [`BrokerLimits::default`]). An event whose message would exceed them
    /// is refused at append with [`Error::EventTooLarge`], instead of being
    /// refused by the broker later. Set them to what the broker's transport
    /// is configured to accept. `#[transactional_event]` producers append
    /// without an `Outbox` and check against the defaults.
    pub fn with_limits(self, limits: BrokerLimits) -> Outbox<DB> {
        Outbox {
            inner: Arc::new(Inner {
                store: self.inner.store.clone(),
                pool_id: self.inner.pool_id,
                limits,
            }),
        }
    }

    /// The broker limits events are checked against.
    pub fn limits(&self) -> &BrokerLimits {
        &self.inner.limits
    }

    /// The pool this outbox uses.
    pub fn pool(&self) -> &Pool<DB> {
        self.inner.store.pool()
    }

    /// The table name.
    pub fn table(&self) -> &str {
        self.inner.store.table()
    }

    /// The relay's claim statement for this table, as the database receives
    /// it (for `EXPLAIN` in benchmarks). Not a stable API.
    #[doc(hidden)]
    pub fn claim_statement(&self) -> String {
        self.store().claim_text()
    }

    /// The relay's probe for due rows, which it runs before it opens a
    /// claim transaction (for `EXPLAIN` in benchmarks). Not a stable API.
    #[doc(hidden)]
    pub fn due_probe_statement(&self) -> String {
        self.store().due_probe_text()
    }

    /// The per-key order check a claim runs, for `keys` keys (for `EXPLAIN`
    /// in benchmarks). Not a stable API.
    #[doc(hidden)]
    pub fn key_order_statement(&self, keys: usize) -> String {
        self.store().key_rows_text(keys)
    }

    /// The relay's read of the rows handed off to it (for `EXPLAIN` in
    /// benchmarks). Not a stable API.
    #[doc(hidden)]
    pub fn handoff_statement(&self) -> String {
        self.store().handed_off_text()
    }

    pub(crate) fn store(&self) -> &OutboxStore<DB> {
        &self.inner.store
    }

    /// Creates or upgrades the outbox table (and the shared
    /// `outbox_schema_version` and `outbox_lease` tables). Safe to call at
    /// every start and from several processes. Waits for locks at most
    /// [`DEFAULT_MIGRATION_TIMEOUT`](crate::DEFAULT_MIGRATION_TIMEOUT); see
    /// [`migrate_with`](Outbox::migrate_with).
    pub async fn migrate(&self) -> Result<(), Error> {
        self.migrate_with(crate::DEFAULT_MIGRATION_TIMEOUT).await
    }

    /// [`migrate`](Outbox::migrate), giving up with
    /// [`Error::MigrationTimeout`] after waiting `timeout` for the migration
    /// lock (another process migrating) or for a lock on the table (another
    /// session's open transaction), each statement. An abandoned call leaves
    /// no lock behind: the migration's connection is closed, not pooled. On
    /// SQLite the pool's busy timeout applies instead.
    pub async fn migrate_with(&self, timeout: std::time::Duration) -> Result<(), Error> {
        self.inner.store.migrate(timeout).await
    }

    /// Appends one event in the caller's transaction. Nothing reaches the broker
    /// before that transaction commits; if it rolls back, the event never existed.
    pub async fn append(&self, tx: &mut Transaction<'_, DB>, event: Event) -> Result<Uuid, Error> {
        let id = event.id;
        append_all(
            self.inner.store.table_name(),
            self.inner.pool_id,
            &self.inner.limits,
            tx,
            std::slice::from_ref(&event),
        )
        .await?;
        Ok(id)
    }

    /// Appends several events in the caller's transaction, in order.
    pub async fn append_all(
        &self,
        tx: &mut Transaction<'_, DB>,
        events: &[Event],
    ) -> Result<Vec<Uuid>, Error> {
        append_all(
            self.inner.store.table_name(),
            self.inner.pool_id,
            &self.inner.limits,
            tx,
            events,
        )
        .await?;
        Ok(events.iter().map(|e| e.id).collect())
    }

    /// Commits `tx` and wakes this process's relays at once.
    pub async fn commit(&self, tx: Transaction<'_, DB>) -> Result<(), Error> {
        tx.commit().await.map_err(Error::db("committing"))?;
        self.wake();
        Ok(())
    }

    /// Wakes this process's relays for this table (after a commit made elsewhere).
    pub fn wake(&self) {
        wake::wake(self.table());
    }

    /// A relay for this outbox, publishing through `publisher`:
    /// [`Relay::new`] with a clone of this outbox. The settings
    /// are checked first ([`RelayConfig::validate`]): an
    /// [`Error::InvalidConfig`] names the one out of range, for instance a
    /// lease not longer than a publish can take.
    pub fn relay<P: Publisher>(
        &self,
        publisher: P,
        config: RelayConfig,
    ) -> Result<Relay<DB, P>, Error> {
        Relay::new(self.clone(), publisher, config)
    }

    /// Backlog size, oldest waiting row and parked rows.
    pub async fn backlog(&self) -> Result<Backlog, Error> {
        let now = crate::clock::now(self.pool()).await;
        let (pending, oldest, parked) = self.inner.store.backlog().await?;
        Ok(Backlog {
            pending,
            oldest_pending_age: oldest
                .map(|t| Duration::from_millis(u64::try_from(now - t).unwrap_or(0))),
            parked,
        })
    }

    /// Rows by state, for dashboards and tests.
    pub async fn counts(&self) -> Result<OutboxCounts, Error> {
        self.inner.store.counts().await
    }

    /// Up to `limit` parked rows, oldest first, with their payloads.
    pub async fn parked(&self, limit: u32) -> Result<Vec<ParkedEvent>, Error> {
        self.inner.store.parked(limit).await
    }

    /// Puts one parked event back to `NEW` with a fresh budget. `false` when no
    /// parked row has this id. The id is text, as [`ParkedEvent::event_id`]
    /// and [`Inbox::replay`](crate::Inbox::replay) have it.
    pub async fn replay(&self, event_id: &str) -> Result<bool, Error> {
        let now = crate::clock::now(self.pool()).await;
        let n = self.inner.store.replay(Some(event_id), now).await?;
        self.wake();
        Ok(n > 0)
    }

    /// Puts the parked events among `event_ids` back to `NEW` with a fresh
    /// budget, in statements of a few hundred ids; returns how many were
    /// parked (ids that are not parked are skipped). For replays too large
    /// for one [`Outbox::replay_all`] statement, or with progress reports.
    pub async fn replay_many<S: AsRef<str>>(&self, event_ids: &[S]) -> Result<u64, Error> {
        let ids: Vec<&str> = event_ids.iter().map(AsRef::as_ref).collect();
        let now = crate::clock::now(self.pool()).await;
        let n = self.inner.store.replay_ids(&ids, now).await?;
        if n > 0 {
            self.wake();
        }
        Ok(n)
    }

    /// Deletes the parked events among `event_ids`; returns how many went.
    /// Ids of rows in any other state (waiting, published) are left alone:
    /// only an event the relay gave up on can be thrown away.
    pub async fn discard_many<S: AsRef<str>>(&self, event_ids: &[S]) -> Result<u64, Error> {
        let ids: Vec<&str> = event_ids.iter().map(AsRef::as_ref).collect();
        self.inner.store.discard_ids(&ids).await
    }

    /// Waits until each of `event_ids` (as [`append`](Self::append) returned
    /// them, or their text) is published or parked, and says which; waits at
    /// most `timeout`, then fails with [`Error::WaitTimeout`] naming the ids
    /// still waiting. Only these rows are read (on the unique index of event
    /// ids, every 10 ms at first and at most every 250 ms), so rows of
    /// others that keep failing or wait for a retry do not hold it up, as
    /// they would a wait for [`backlog`](Self::backlog) to empty.
    ///
    /// Call it after the events' transaction committed: an id that has no
    /// row is reported [`missing`](Settled::missing) at once. A relay must be
    /// running somewhere on the table; this only watches the rows.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlite")]
    /// # async fn demo(outbox: outbox_core::Outbox<sqlx::Sqlite>, ids: Vec<uuid::Uuid>) -> Result<(), outbox_core::Error> {
    /// let settled = outbox.wait_published(&ids, std::time::Duration::from_secs(10)).await?;
    /// for parked in &settled.parked {
    ///     eprintln!("{} parked: {:?}", parked.event_id, parked.last_error);
    /// }
    /// assert!(settled.all_published());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn wait_published<S: std::fmt::Display>(
        &self,
        event_ids: &[S],
        timeout: Duration,
    ) -> Result<Settled, Error> {
        let ids: Vec<String> = event_ids.iter().map(ToString::to_string).collect();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = WAIT_POLL.0;
        let mut settled = Settled::default();
        // Ids not settled yet, in the order given.
        let mut waiting: Vec<String> = {
            let mut seen = std::collections::HashSet::new();
            ids.into_iter()
                .filter(|id| seen.insert(id.clone()))
                .collect()
        };
        let mut first = true;
        while !waiting.is_empty() {
            if !first {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(Error::WaitTimeout {
                        waiting,
                        after: timeout,
                    });
                }
                tokio::time::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(WAIT_POLL.1);
            }
            let refs: Vec<&str> = waiting.iter().map(String::as_str).collect();
            let states: std::collections::HashMap<String, (OutboxState, Option<String>)> = self
                .inner
                .store
                .states(&refs)
                .await?
                .into_iter()
                .map(|(id, state, error)| (id, (state, error)))
                .collect();
            waiting.retain(|id| match states.get(id) {
                // A committed row goes only once published (retention) or
                // parked (a discard): either way it waits no longer.
                None => {
                    settled.missing.push(id.clone());
                    false
                }
                Some((OutboxState::New, _)) => true,
                Some((OutboxState::Published, _)) => {
                    settled.published.push(id.clone());
                    false
                }
                Some((OutboxState::Failed, last_error)) => {
                    settled.parked.push(ParkedId {
                        event_id: id.clone(),
                        last_error: last_error.clone(),
                    });
                    false
                }
            });
            first = false;
        }
        Ok(settled)
    }

    /// Puts every parked event back to `NEW`; returns how many.
    pub async fn replay_all(&self) -> Result<u64, Error> {
        let now = crate::clock::now(self.pool()).await;
        let n = self.inner.store.replay(None, now).await?;
        self.wake();
        Ok(n)
    }
}

/// Inserts `events` into the outbox table of `sql` inside `tx`. When a relay
/// of this process serves that table on the pool `pool`, the rows are leased
/// to it as they are inserted (hand-off): it publishes them without a claim.
pub(crate) async fn append_all<DB: Backend>(
    table: &TableName,
    pool: PoolId,
    limits: &BrokerLimits,
    tx: &mut Transaction<'_, DB>,
    events: &[Event],
) -> Result<(), Error> {
    if events.is_empty() {
        return Ok(());
    }
    // With the `otel` feature: the caller's trace context goes with the rows.
    let traced = crate::trace::with_context(events);
    let events = traced.as_deref().unwrap_or(events);
    for event in events {
        event.validate(limits)?;
    }
    // The database's clock as last read in this process (no round trip in
    // the caller's transaction): the hand-off lease is compared on it.
    let now = crate::clock::now_of_id(pool);
    let lease = wake::handoff_lease(table.as_str(), pool, now);
    let lease = lease
        .as_ref()
        .map(|(token, until)| (token.as_str(), *until));
    crate::store::outbox::insert(table, tx, events, lease, now).await
}

/// Appends `events` to the outbox table `table` inside `tx`: what
/// `#[transactional_event]` producers that receive the caller's transaction
/// call. The statements are built once per database and table; events are
/// checked against the default [`BrokerLimits`].
pub async fn append_to_table<DB: Backend>(
    tx: &mut Transaction<'_, DB>,
    table: &str,
    events: &[Event],
) -> Result<(), Error> {
    // Without the pool the rows cannot be matched with a relay: no hand-off.
    let limits = BrokerLimits::default();
    let table = TableName::new("outbox table name", table)?;
    append_all(&table, 0, &limits, tx, events).await
}

/// As [`append_to_table`], for `#[transactional_event(pool)]` functions: `tx`
/// was begun on `pool`, so a relay of this process on that pool takes the rows
/// without a claim.
pub async fn append_to_pool_table<DB: Backend>(
    pool: &Pool<DB>,
    tx: &mut Transaction<'_, DB>,
    table: &str,
    events: &[Event],
) -> Result<(), Error> {
    let limits = BrokerLimits::default();
    let table = TableName::new("outbox table name", table)?;
    append_all(&table, wake::pool_id(pool), &limits, tx, events).await
}

impl<DB: Backend> ParkedRows for Outbox<DB> {
    fn table(&self) -> &str {
        Outbox::table(self)
    }

    async fn count_parked(&self) -> Result<u64, Error> {
        Ok(self.counts().await?.failed)
    }

    async fn list_parked(&self, limit: u32) -> Result<Vec<Parked>, Error> {
        let rows = self.parked(limit).await?;
        Ok(rows.into_iter().map(Parked::from).collect())
    }

    async fn replay(&self, event_id: &str) -> Result<bool, Error> {
        Outbox::replay(self, event_id).await
    }

    async fn replay_many(&self, event_ids: &[String]) -> Result<u64, Error> {
        Outbox::replay_many(self, event_ids).await
    }

    async fn discard_many(&self, event_ids: &[String]) -> Result<u64, Error> {
        Outbox::discard_many(self, event_ids).await
    }
}
