//! Every statement on an inbox table, for one consumer, in rooms: the
//! retry pass's reads and marks (`retry`) and the operator's calls
//! (`admin`). Here: the store itself and what the consumer records per
//! delivery, with the checks it makes before it commits.

mod admin;
mod retry;

pub(crate) use admin::consumers;
pub(crate) use retry::DueRow;
#[cfg(test)]
pub(crate) use retry::RETRY_PASS_BYTES;

use std::borrow::Cow;

use sqlx::Pool;

use super::{InboxState, fetch_first};
use crate::backend::{Backend, Column, Dialect, FromRow, Query, Row, ddl};
use crate::delivery::Delivery;
use crate::names::TableName;
use crate::{Error, schema};

/// Rows per multi-row insert: 7 values a row, well under every database's
/// limit on bound parameters.
const INSERT_CHUNK: usize = 500;
/// Keys checked in one pending-key query.
const KEY_CHUNK: usize = 200;

/// Ids per statement when rows are replayed by id.
const ID_CHUNK: usize = 500;

/// Columns written when a row is recorded.
const INSERT_COLUMNS: &str = "consumer, event_id, event_type, event_key, process, attempts, \
     next_attempt_at, last_error, headers, content, create_time, update_time, processed_time";

/// Whether a row was inserted or its (consumer, event id) was there already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    New,
    Duplicate,
}

/// A count of rows.
struct Count(u64);

impl FromRow for Count {
    const TABLE: &'static str = "inbox";
    const TYPES: &'static [Column] = &[Column::Int];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("COUNT(*)")
    }

    fn from_row(row: Row) -> Result<Self, Error> {
        Ok(Count(row.count(0, "COUNT(*)")?))
    }
}

/// The statements of one consumer's rows in an inbox table.
#[derive(Debug)]
pub(crate) struct InboxStore<DB: Backend> {
    pool: Pool<DB>,
    consumer: String,
    table: TableName,
}

impl<DB: Backend> Clone for InboxStore<DB> {
    fn clone(&self) -> Self {
        InboxStore {
            pool: self.pool.clone(),
            consumer: self.consumer.clone(),
            table: self.table.clone(),
        }
    }
}

impl<DB: Backend> InboxStore<DB> {
    pub(crate) fn new(pool: Pool<DB>, consumer: String, table: TableName) -> InboxStore<DB> {
        InboxStore {
            pool,
            consumer,
            table,
        }
    }

    pub(crate) fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    pub(crate) fn consumer(&self) -> &str {
        &self.consumer
    }

    pub(crate) fn table(&self) -> &str {
        self.table.as_str()
    }

    pub(crate) async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<DB>, Error> {
        crate::backend::acquire(&self.pool).await
    }

    /// Creates or upgrades the table.
    pub(crate) async fn migrate(&self, timeout: std::time::Duration) -> Result<(), Error> {
        let steps = ddl::inbox_migrations(DB::DIALECT, self.table());
        schema::migrate(&self.pool, self.table(), &steps, timeout).await
    }

    /// A statement of this consumer's rows that opens with `start` (a text
    /// ending in `consumer = `), the consumer bound next.
    fn of_consumer(&self, start: &str) -> Query<'_> {
        Query::new(DB::DIALECT)
            .sql(start)
            .bind(self.consumer.as_str())
    }

    /// Inserts the row of `delivery` in `state`, with `attempts` spent,
    /// inside `conn`'s transaction. A unique violation on (consumer,
    /// event_id) is a duplicate. A row not processed keeps the headers and
    /// payload for its retry or replay.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn record(
        &self,
        conn: &mut DB::Connection,
        delivery: &Delivery,
        state: InboxState,
        attempts: i64,
        error: Option<&str>,
        next_attempt_at: Option<i64>,
        now: i64,
    ) -> Result<Recorded, Error> {
        let processed = state == InboxState::Processed;
        let headers = (!processed).then(|| delivery.headers_json());
        let query = Query::new(DB::DIALECT)
            .sql(&format!(
                "INSERT INTO {} ({INSERT_COLUMNS}) VALUES (",
                self.table
            ))
            .bind(self.consumer.as_str())
            .sql(", ")
            .bind(delivery.event_id.as_str())
            .sql(", ")
            .bind(delivery.event_type.as_deref())
            .sql(", ")
            .bind(delivery.key.as_deref())
            .sql(", ")
            .bind(state.as_sql())
            .sql(", ")
            .bind(attempts)
            .sql(", ")
            .bind(next_attempt_at)
            .sql(", ")
            .bind(error)
            .sql(", ")
            .bind(headers.as_deref())
            .sql(", ")
            .bind((!processed).then_some(&delivery.body[..]))
            .sql(", ")
            .bind(now)
            .sql(", ")
            .bind(now)
            .sql(", ")
            .bind(processed.then_some(now))
            .sql(")");
        let result = DB::exec(conn, &query).await;
        duplicate_or(result, "recording an event in the inbox")
    }

    /// Inserts `PROCESSED` rows for all of `deliveries` in one statement per
    /// chunk. A unique violation (any of them a duplicate) is
    /// [`Recorded::Duplicate`] and leaves the transaction to be rolled back.
    pub(crate) async fn record_processed(
        &self,
        conn: &mut DB::Connection,
        deliveries: &[&Delivery],
        now: i64,
    ) -> Result<Recorded, Error> {
        let processed = InboxState::Processed.as_sql();
        for chunk in deliveries.chunks(INSERT_CHUNK) {
            let mut query = Query::new(DB::DIALECT).sql(&format!(
                "INSERT INTO {} ({INSERT_COLUMNS}) VALUES ",
                self.table
            ));
            for (i, d) in chunk.iter().enumerate() {
                query = query
                    .sql(if i > 0 { ", (" } else { "(" })
                    .list([
                        Some(self.consumer.as_str()),
                        Some(d.event_id.as_str()),
                        d.event_type.as_deref(),
                        d.key.as_deref(),
                    ])
                    .sql(&format!(", '{processed}', 1, NULL, NULL, NULL, NULL, "))
                    .list([now, now, now])
                    .sql(")");
            }
            let result = DB::exec(conn, &query).await;
            if duplicate_or(result, "recording events in the inbox")? == Recorded::Duplicate {
                return Ok(Recorded::Duplicate);
            }
        }
        Ok(Recorded::New)
    }

    /// How many of `event_ids` have a `PROCESSED` row of this consumer, as
    /// `conn`'s transaction sees them: [`ID_CHUNK`] ids per statement. Read
    /// inside a handler's transaction before it commits, to see that its
    /// inbox rows are still there.
    pub(crate) async fn count_processed(
        &self,
        conn: &mut DB::Connection,
        event_ids: &[&str],
    ) -> Result<u64, Error> {
        let mut n = 0;
        for chunk in event_ids.chunks(ID_CHUNK) {
            let query = self
                .of_consumer(&format!(
                    "SELECT COUNT(*) FROM {} WHERE consumer = ",
                    self.table
                ))
                .sql(&format!(
                    " AND process = '{}' AND event_id IN (",
                    InboxState::Processed.as_sql()
                ))
                .list(chunk)
                .sql(")");
            let count =
                fetch_first::<DB, Count>(conn, &query, "checking the inbox rows before commit");
            n += count.await?.map_or(0, |Count(n)| n);
        }
        Ok(n)
    }

    /// `true` when an earlier event of any of `keys` is waiting for a retry
    /// or parked: one query per [`KEY_CHUNK`] keys. As in the outbox's key
    /// check, the state is named twice: `<>` for the partial index of
    /// pending rows (PostgreSQL, SQLite), the `IN` list so that MySQL keeps
    /// to ranges of its index with many keys.
    pub(crate) async fn keys_pending(&self, keys: &[&str]) -> Result<bool, Error> {
        if keys.is_empty() {
            return Ok(false);
        }
        let (processed, retry, failed) = (
            InboxState::Processed.as_sql(),
            InboxState::Retry.as_sql(),
            InboxState::Failed.as_sql(),
        );
        let mut conn = self.acquire().await?;
        for chunk in keys.chunks(KEY_CHUNK) {
            let query = self
                .of_consumer(&format!(
                    "SELECT COUNT(*) FROM {} WHERE consumer = ",
                    self.table
                ))
                .sql(" AND event_key IN (")
                .list(chunk)
                .sql(&format!(
                    ") AND process <> '{processed}' AND process IN ('{retry}', '{failed}')"
                ));
            let count =
                fetch_first::<DB, Count>(&mut conn, &query, "checking keys for pending events");
            if count.await?.is_some_and(|Count(n)| n > 0) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// A unique violation is a duplicate; other errors are errors.
fn duplicate_or(result: Result<u64, sqlx::Error>, action: &'static str) -> Result<Recorded, Error> {
    match result {
        Ok(_) => Ok(Recorded::New),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(Recorded::Duplicate),
        Err(source) => Err(Error::Database { action, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::assert_selects_what_it_decodes;

    #[test]
    fn a_count_selects_one_column() {
        assert_selects_what_it_decodes::<Count>();
    }
}
