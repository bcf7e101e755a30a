//! The consumer side's table: the [`Inbox`] handle records which events a
//! consumer has applied, keeps failed ones for retry, and lists and replays
//! parked ones.
//!
//! Row states (`process`):
//!
//! | state | meaning |
//! |---|---|
//! | `PROCESSED` | the handler's transaction committed with this row: applied once |
//! | `RETRY` | the handler failed; payload kept, retried locally with backoff |
//! | `FAILED` | parked after the retry budget, or undecodable; payload and error kept |

use std::time::Duration;

use sqlx::Pool;
use uuid::Uuid;

use crate::Error;
use crate::backend::Backend;
pub use crate::delivery::Delivery;
use crate::names::{TableName, check_consumer, now_ms};
use crate::rows::{InboxCounts, Parked, ParkedDelivery, ParkedRows};
use crate::store::InboxStore;

/// Default name of the inbox table.
pub const DEFAULT_INBOX_TABLE: &str = outbox_rules::DEFAULT_INBOX_TABLE;

/// Handle on one consumer's rows in an inbox table. Cheap to clone.
pub struct Inbox<DB: Backend> {
    pub(crate) store: InboxStore<DB>,
}

impl<DB: Backend> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Inbox {
            store: self.store.clone(),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for Inbox<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("database", &DB::DIALECT.name)
            .field("table", &self.store.table())
            .field("consumer", &self.store.consumer())
            .finish()
    }
}

impl<DB: Backend> Inbox<DB> {
    /// The inbox of `consumer` in table [`DEFAULT_INBOX_TABLE`].
    pub fn new(pool: Pool<DB>, consumer: &str) -> Result<Inbox<DB>, Error> {
        Inbox::with_table(pool, consumer, DEFAULT_INBOX_TABLE)
    }

    /// The inbox of `consumer` in table `table`; both names are validated.
    pub fn with_table(pool: Pool<DB>, consumer: &str, table: &str) -> Result<Inbox<DB>, Error> {
        check_consumer(consumer)?;
        let table = TableName::new("inbox table name", table)?;
        Ok(Inbox {
            store: InboxStore::new(pool, consumer.to_owned(), table),
        })
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        self.store.consumer()
    }

    /// The inbox table's name.
    pub fn table(&self) -> &str {
        self.store.table()
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        self.store.pool()
    }

    /// Creates or upgrades the inbox table. Safe to call at every start.
    /// Waits for locks at most
    /// [`DEFAULT_MIGRATION_TIMEOUT`](crate::DEFAULT_MIGRATION_TIMEOUT); see
    /// [`migrate_with`](Inbox::migrate_with).
    pub async fn migrate(&self) -> Result<(), Error> {
        self.migrate_with(crate::DEFAULT_MIGRATION_TIMEOUT).await
    }

    /// [`migrate`](Inbox::migrate), giving up with
    /// [`Error::MigrationTimeout`] after waiting `timeout` for the migration
    /// lock (another process migrating) or for a lock on the table (another
    /// session's open transaction), each statement. On SQLite the pool's busy
    /// timeout applies instead.
    pub async fn migrate_with(&self, timeout: std::time::Duration) -> Result<(), Error> {
        self.store.migrate(timeout).await
    }

    /// Counts of this consumer's rows per state.
    pub async fn counts(&self) -> Result<InboxCounts, Error> {
        self.store.counts().await
    }

    /// Up to `limit` parked rows, oldest first, with their payloads.
    pub async fn parked(&self, limit: u32) -> Result<Vec<ParkedDelivery>, Error> {
        self.store.parked(limit).await
    }

    /// Schedules one parked event for another round of retries with a fresh
    /// budget. `false` when no parked row has this id.
    pub async fn replay(&self, event_id: &str) -> Result<bool, Error> {
        Ok(self.store.replay(Some(event_id), now_ms()).await? > 0)
    }

    /// Schedules the parked events of this consumer among `event_ids` for
    /// another round of retries with a fresh budget, in statements of a few
    /// hundred ids; returns how many were parked (other ids are skipped).
    pub async fn replay_many<S: AsRef<str>>(&self, event_ids: &[S]) -> Result<u64, Error> {
        let ids: Vec<&str> = event_ids.iter().map(AsRef::as_ref).collect();
        self.store.replay_ids(&ids, now_ms()).await
    }

    /// Deletes this consumer's parked events among `event_ids`; returns how
    /// many went. Rows in any other state (processed, waiting for a retry)
    /// are left alone. A parked message was acknowledged when it was parked,
    /// so the broker does not deliver it again; but with its row gone, the
    /// same event id sent anew would be applied as a new event.
    pub async fn discard_many<S: AsRef<str>>(&self, event_ids: &[S]) -> Result<u64, Error> {
        let ids: Vec<&str> = event_ids.iter().map(AsRef::as_ref).collect();
        self.store.discard_ids(&ids).await
    }

    /// The consumers that have rows in inbox table `table` (validated), in
    /// name order: what an operator lists before looking at each one.
    pub async fn consumers(pool: &Pool<DB>, table: &str) -> Result<Vec<String>, Error> {
        let table = TableName::new("inbox table name", table)?;
        crate::store::inbox::consumers(pool, &table).await
    }

    /// Schedules every parked event of this consumer for retry; returns how many.
    pub async fn replay_all(&self) -> Result<u64, Error> {
        self.store.replay(None, now_ms()).await
    }

    /// Deletes up to `limit` processed rows older than `age`; returns how many.
    ///
    /// The window must outlast the broker's redelivery horizon: a message
    /// redelivered after its row is gone is applied again.
    pub async fn delete_processed(&self, age: Duration, limit: u32) -> Result<u64, Error> {
        let before = now_ms() - crate::names::ms(age);
        self.store.delete_processed(before, limit).await
    }
}

/// The event id for a message without an `event-id` header.
pub(crate) fn fallback_event_id() -> String {
    Uuid::now_v7().to_string()
}

impl<DB: Backend> ParkedRows for Inbox<DB> {
    fn table(&self) -> &str {
        Inbox::table(self)
    }

    async fn count_parked(&self) -> Result<u64, Error> {
        Ok(self.counts().await?.failed)
    }

    async fn list_parked(&self, limit: u32) -> Result<Vec<Parked>, Error> {
        let rows = self.parked(limit).await?;
        Ok(rows.into_iter().map(Parked::from).collect())
    }

    async fn replay(&self, event_id: &str) -> Result<bool, Error> {
        Inbox::replay(self, event_id).await
    }

    async fn replay_many(&self, event_ids: &[String]) -> Result<u64, Error> {
        Inbox::replay_many(self, event_ids).await
    }

    async fn discard_many(&self, event_ids: &[String]) -> Result<u64, Error> {
        Inbox::discard_many(self, event_ids).await
    }
}
