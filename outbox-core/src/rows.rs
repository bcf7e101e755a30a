//! The rows the operator's calls return, for both tables: backlog, counts
//! and parked rows, and the one interface ([`ParkedRows`]) through which the
//! outbox's and an inbox's parked rows are listed, replayed and discarded,
//! so an operator's tool is written once for both.

use std::future::Future;
use std::time::Duration;

use crate::Error;
use crate::store::OutboxState;

/// How far behind the relay is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backlog {
    /// Rows waiting to be published (`NEW`).
    pub pending: u64,
    /// Age of the oldest waiting row.
    pub oldest_pending_age: Option<Duration>,
    /// Rows parked after their retry budget (`FAILED`).
    pub parked: u64,
}

/// Row counts of one outbox table, by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct OutboxCounts {
    /// Waiting to be published, or being published under a claim (`NEW`).
    pub new: u64,
    /// Confirmed by the broker (`PUBLISHED`), until retention removes them.
    pub published: u64,
    /// Parked after the broker kept refusing them (`FAILED`).
    pub failed: u64,
    /// Rows in a state this library does not write (changed by hand or by
    /// another tool).
    pub other: u64,
}

impl OutboxCounts {
    /// Every row of the table.
    pub fn total(&self) -> u64 {
        self.new + self.published + self.failed + self.other
    }

    /// Adds `n` rows of the stored state `state`.
    pub(crate) fn add(&mut self, state: Option<OutboxState>, n: u64) {
        let slot = match state {
            Some(OutboxState::New) => &mut self.new,
            Some(OutboxState::Published) => &mut self.published,
            Some(OutboxState::Failed) => &mut self.failed,
            None => &mut self.other,
        };
        *slot += n;
    }
}

/// Row counts of one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct InboxCounts {
    /// Applied events.
    pub processed: u64,
    /// Events waiting for a local retry.
    pub retry: u64,
    /// Parked events.
    pub failed: u64,
}

/// A row parked as `FAILED`, as listed by [`Outbox::parked`](crate::Outbox::parked).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedEvent {
    /// The event id.
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// The destination.
    pub destination: String,
    /// The key, if any.
    pub key: Option<String>,
    /// Publish attempts made.
    pub attempts: i64,
    /// The last error.
    pub last_error: Option<String>,
    /// When it was appended (ms since the Unix epoch).
    pub create_time: i64,
    /// When it was parked (ms since the Unix epoch).
    pub update_time: i64,
    /// The payload, as appended.
    pub content: Vec<u8>,
    /// The payload's content type, e.g. `application/json`.
    pub content_type: String,
}

/// A parked inbox row, as listed by [`Inbox::parked`](crate::Inbox::parked).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedDelivery {
    /// The event id.
    pub event_id: String,
    /// The event type, if the message had one.
    pub event_type: Option<String>,
    /// The key, if any.
    pub key: Option<String>,
    /// Handler attempts made.
    pub attempts: i64,
    /// The last error (handler error or decode error).
    pub last_error: Option<String>,
    /// First seen (ms since the Unix epoch).
    pub create_time: i64,
    /// Parked (ms since the Unix epoch).
    pub update_time: i64,
    /// The raw payload.
    pub content: Vec<u8>,
}

/// A parked row of either table, in the shape both share. The outbox's rows
/// carry a destination and a content type; inbox rows carry neither.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Parked {
    /// The event id.
    pub event_id: String,
    /// The event type, where the row has one.
    pub event_type: Option<String>,
    /// Where the event goes (outbox rows only).
    pub destination: Option<String>,
    /// The key, if any.
    pub key: Option<String>,
    /// Attempts made: publishes for an outbox row, handler runs for an inbox row.
    pub attempts: i64,
    /// The last error.
    pub last_error: Option<String>,
    /// When the row was written (ms since the Unix epoch).
    pub create_time: i64,
    /// When it was parked (ms since the Unix epoch).
    pub update_time: i64,
    /// The payload's content type (outbox rows only).
    pub content_type: Option<String>,
    /// The payload.
    pub content: Vec<u8>,
}

/// The parked rows of one table: the outbox ([`Outbox`](crate::Outbox)) or
/// one consumer's rows of the inbox ([`Inbox`](crate::Inbox)).
///
/// ```no_run
/// # #[cfg(feature = "sqlite")]
/// # async fn demo(pool: sqlx::SqlitePool) -> Result<(), outbox_core::Error> {
/// use outbox_core::admin::ParkedRows;
/// use outbox_core::{Inbox, Outbox};
///
/// async fn replay_everything(side: &impl ParkedRows) -> Result<u64, outbox_core::Error> {
///     let ids = side.parked_ids().await?;
///     side.replay_many(&ids).await
/// }
/// replay_everything(&Outbox::new(pool.clone())).await?;
/// replay_everything(&Inbox::new(pool, "points")?).await?;
/// # Ok(())
/// # }
/// ```
pub trait ParkedRows: Send + Sync {
    /// The table's name.
    fn table(&self) -> &str;

    /// How many rows are parked.
    fn count_parked(&self) -> impl Future<Output = Result<u64, Error>> + Send;

    /// Up to `limit` parked rows, oldest first, with their payloads.
    fn list_parked(&self, limit: u32) -> impl Future<Output = Result<Vec<Parked>, Error>> + Send;

    /// The ids of every parked row, oldest first.
    fn parked_ids(&self) -> impl Future<Output = Result<Vec<String>, Error>> + Send {
        async move {
            let rows = self.list_parked(u32::MAX).await?;
            Ok(rows.into_iter().map(|row| row.event_id).collect())
        }
    }

    /// Gives one parked row a fresh budget; `false` when no parked row has
    /// this id.
    fn replay(&self, event_id: &str) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Gives the parked rows among `event_ids` a fresh budget; how many were
    /// parked.
    fn replay_many(&self, event_ids: &[String]) -> impl Future<Output = Result<u64, Error>> + Send;

    /// Deletes the parked rows among `event_ids` for good; how many went.
    /// Rows not parked (any more) are left alone.
    fn discard_many(&self, event_ids: &[String])
    -> impl Future<Output = Result<u64, Error>> + Send;
}

impl From<ParkedEvent> for Parked {
    fn from(e: ParkedEvent) -> Parked {
        Parked {
            event_id: e.event_id,
            event_type: Some(e.event_type),
            destination: Some(e.destination),
            key: e.key,
            attempts: e.attempts,
            last_error: e.last_error,
            create_time: e.create_time,
            update_time: e.update_time,
            content_type: Some(e.content_type),
            content: e.content,
        }
    }
}

impl From<ParkedDelivery> for Parked {
    fn from(d: ParkedDelivery) -> Parked {
        Parked {
            event_id: d.event_id,
            event_type: d.event_type,
            destination: None,
            key: d.key,
            attempts: d.attempts,
            last_error: d.last_error,
            create_time: d.create_time,
            update_time: d.update_time,
            content_type: None,
            content: d.content,
        }
    }
}
