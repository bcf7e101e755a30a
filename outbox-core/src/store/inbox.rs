//! Every statement on an inbox table, for one consumer.

use std::borrow::Cow;

use bytes::Bytes;
use sqlx::Pool;

use super::{InboxState, exec, fetch, fetch_first};
use crate::backend::{Backend, Column, Dialect, FromRow, Query, Row, ddl};
use crate::delivery::Delivery;
use crate::names::TableName;
use crate::rows::{InboxCounts, ParkedDelivery};
use crate::{Error, schema};

/// Rows per multi-row insert: 7 values a row, well under every database's
/// limit on bound parameters.
const INSERT_CHUNK: usize = 500;
/// Keys checked in one pending-key query.
const KEY_CHUNK: usize = 200;

/// Ids per statement when rows are replayed by id.
const ID_CHUNK: usize = 500;

/// The most payload and header bytes one retry pass reads at once (8 MiB),
/// or one row when that row alone is larger: rows are chosen by their sizes
/// before their payloads are read.
pub(crate) const RETRY_PASS_BYTES: u64 = 8 * 1024 * 1024;

/// Columns written when a row is recorded.
const INSERT_COLUMNS: &str = "consumer, event_id, event_type, event_key, process, attempts, \
     next_attempt_at, last_error, headers, content, create_time, update_time, processed_time";

/// Whether a row was inserted or its (consumer, event id) was there already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    New,
    Duplicate,
}

/// A row waiting for a local retry.
pub(crate) struct DueRow {
    pub(crate) id: i64,
    pub(crate) attempts: i64,
    pub(crate) delivery: Delivery,
}

/// A due retry row's id and the bytes it holds (payload and headers), for
/// the retry pass to choose as many as its byte budget holds before it
/// reads them.
struct DueSize {
    id: i64,
    size: u64,
}

impl FromRow for DueSize {
    const TABLE: &'static str = "inbox";
    const TYPES: &'static [Column] = &[Column::Int, Column::Int];

    fn columns(dialect: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Owned(format!(
            "i.id, COALESCE({}, 0) + COALESCE({}, 0)",
            (dialect.byte_length)("i.content"),
            (dialect.byte_length)("i.headers")
        ))
    }

    fn from_row(row: Row) -> Result<Self, Error> {
        Ok(DueSize {
            id: row.int(0, "id")?,
            size: row.count(1, "size")?,
        })
    }
}

/// A due retry row read whole: a retry, or a row that cannot be read for
/// one (id, reason), which the consumer parks.
enum DueRead {
    Row(DueRow),
    Unreadable(i64, String),
}

impl FromRow for DueRead {
    const TABLE: &'static str = "inbox";
    const TYPES: &'static [Column] = &[
        Column::Int,
        Column::Text,
        Column::Text,
        Column::Text,
        Column::Text,
        Column::Bytes,
        Column::Int,
    ];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed(
            "i.id, i.event_id, i.event_type, i.event_key, i.headers, i.content, i.attempts",
        )
    }

    /// Each row on its own: one that cannot be read (headers that are not
    /// JSON, a NULL payload, written by hand or cut by a non-strict MySQL)
    /// is set apart with the reason; only a row without an id is an error.
    fn from_row(row: Row) -> Result<Self, Error> {
        let id = row.int(0, "id")?;
        Ok(match due_row(row) {
            Ok(row) => DueRead::Row(row),
            Err(error) => {
                DueRead::Unreadable(id, format!("the row cannot be read for a retry: {error}"))
            }
        })
    }
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

/// Rows in one state.
struct StateCount {
    state: String,
    n: u64,
}

impl FromRow for StateCount {
    const TABLE: &'static str = "inbox";
    const TYPES: &'static [Column] = &[Column::Text, Column::Int];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("process, COUNT(*)")
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        let n = row.count(1, "COUNT(*)")?;
        Ok(StateCount {
            state: row.text(0, "process")?,
            n,
        })
    }
}

impl FromRow for ParkedDelivery {
    const TABLE: &'static str = "inbox";
    const TYPES: &'static [Column] = &[
        Column::Text,
        Column::Text,
        Column::Text,
        Column::Int,
        Column::Text,
        Column::Int,
        Column::Int,
        Column::Bytes,
    ];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed(
            "event_id, event_type, event_key, attempts, last_error, create_time, \
             update_time, content",
        )
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        Ok(ParkedDelivery {
            event_id: row.text(0, "event_id")?,
            event_type: row.opt_text(1),
            key: row.opt_text(2),
            attempts: row.int(3, "attempts")?,
            last_error: row.opt_text(4),
            create_time: row.int(5, "create_time")?,
            update_time: row.int(6, "update_time")?,
            content: row.opt_bytes(7).unwrap_or_default(),
        })
    }
}

/// A consumer with rows in the table.
struct ConsumerName(String);

impl FromRow for ConsumerName {
    const TABLE: &'static str = "inbox";
    const TYPES: &'static [Column] = &[Column::Text];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("consumer")
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        Ok(ConsumerName(row.text(0, "consumer")?))
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

    /// Up to `limit` rows due for a retry, oldest first; with `key_order`
    /// only those no earlier pending row of their key must precede. Read in
    /// two steps: the ids and sizes (payload and headers) of the due rows,
    /// then the whole rows of as many of them as [`RETRY_PASS_BYTES`] holds
    /// (at least one, however large): a pass never holds more payload and
    /// headers than that budget, or one row over it.
    pub(crate) async fn due(
        &self,
        now: i64,
        limit: u32,
        key_order: bool,
    ) -> Result<DueRows, Error> {
        let mut conn = self.acquire().await?;
        let query = self.due_sizes_query(now, limit, key_order);
        let sizes = fetch::<DB, DueSize>(&mut conn, &query, "selecting due retries").await?;
        let mut ids = Vec::with_capacity(sizes.len());
        let mut held: u64 = 0;
        for DueSize { id, size } in sizes {
            if !ids.is_empty() && held.saturating_add(size) > RETRY_PASS_BYTES {
                break;
            }
            held = held.saturating_add(size);
            ids.push(id);
        }
        let mut due = DueRows::default();
        if ids.is_empty() {
            return Ok(due);
        }
        let query = Query::new(DB::DIALECT)
            .sql("SELECT ")
            .columns::<DueRead>(self.table())
            .sql(&format!(" FROM {} i WHERE i.id IN (", self.table))
            .list(&ids)
            .sql(&format!(
                ") AND i.process = '{}' ORDER BY i.id",
                InboxState::Retry.as_sql()
            ));
        for read in fetch::<DB, DueRead>(&mut conn, &query, "reading due retries").await? {
            match read {
                DueRead::Row(row) => due.rows.push(row),
                DueRead::Unreadable(id, reason) => due.unreadable.push((id, reason)),
            }
        }
        Ok(due)
    }

    /// The ids and sizes of up to `limit` due retry rows, oldest first;
    /// with `key_order` only those no earlier pending row of their key must
    /// precede. Repeats `process <> 'PROCESSED'`, the condition of version
    /// 3's partial indexes, so that SQLite uses them.
    fn due_sizes_query(&self, now: i64, limit: u32, key_order: bool) -> Query<'_> {
        let t = self.table();
        let (processed, retry) = (InboxState::Processed.as_sql(), InboxState::Retry.as_sql());
        let query = Query::new(DB::DIALECT)
            .sql("SELECT ")
            .columns::<DueSize>(t)
            .sql(&format!(" FROM {t} i WHERE i.consumer = "))
            .bind(self.consumer.as_str())
            .sql(&format!(
                " AND i.process = '{retry}' AND i.process <> '{processed}' AND i.next_attempt_at <= "
            ))
            .bind(now);
        let query = if key_order {
            query.sql(&format!(
                " AND (i.event_key IS NULL OR NOT EXISTS (SELECT 1 FROM {t} o \
                 WHERE o.consumer = i.consumer AND o.event_key = i.event_key \
                 AND o.process <> '{processed}' AND o.id < i.id))"
            ))
        } else {
            query
        };
        query.sql(" ORDER BY i.id LIMIT ").bind(i64::from(limit))
    }

    /// Switches the retry row `id` to `PROCESSED` inside `conn`'s transaction;
    /// `false` if another process took it meanwhile.
    pub(crate) async fn take_retry(
        &self,
        conn: &mut DB::Connection,
        id: i64,
        now: i64,
    ) -> Result<bool, Error> {
        let query = Query::new(DB::DIALECT)
            .sql(&format!(
                "UPDATE {} SET process = '{}', attempts = attempts + 1, processed_time = ",
                self.table,
                InboxState::Processed.as_sql()
            ))
            .bind(now)
            .sql(", update_time = ")
            .bind(now)
            .sql(", content = NULL WHERE id = ")
            .bind(id)
            .sql(&format!(" AND process = '{}'", InboxState::Retry.as_sql()));
        let taken = exec::<DB>(conn, &query, "taking a retry").await?;
        Ok(taken > 0)
    }

    /// Records a failed retry of row `id`: one attempt more, parked as
    /// `FAILED` when that reaches `budget`, else due again at
    /// `next_attempt_at`.
    pub(crate) async fn fail_retry(
        &self,
        id: i64,
        budget: i64,
        reason: &str,
        next_attempt_at: i64,
        now: i64,
    ) -> Result<(), Error> {
        let (retry, failed) = (InboxState::Retry.as_sql(), InboxState::Failed.as_sql());
        // `process` first: MySQL evaluates SET left to right with new values.
        let query = Query::new(DB::DIALECT)
            .sql(&format!(
                "UPDATE {} SET process = CASE WHEN attempts + 1 >= ",
                self.table
            ))
            .bind(budget)
            .sql(&format!(
                " THEN '{failed}' ELSE '{retry}' END, attempts = attempts + 1, last_error = "
            ))
            .bind(reason)
            .sql(", next_attempt_at = ")
            .bind(next_attempt_at)
            .sql(", update_time = ")
            .bind(now)
            .sql(" WHERE id = ")
            .bind(id)
            .sql(&format!(" AND process = '{retry}'"));
        let mut conn = self.acquire().await?;
        exec::<DB>(&mut conn, &query, "recording a failed retry").await?;
        Ok(())
    }

    /// Rows per state.
    pub(crate) async fn counts(&self) -> Result<InboxCounts, Error> {
        self.count_states(None).await
    }

    /// The retrying and parked rows of this consumer (`processed` is 0), on
    /// the pending index, however many rows are processed.
    pub(crate) async fn unsettled_counts(&self) -> Result<InboxCounts, Error> {
        let (retry, failed) = (InboxState::Retry.as_sql(), InboxState::Failed.as_sql());
        self.count_states(Some(&format!(" AND process IN ('{retry}', '{failed}')")))
            .await
    }

    /// Rows per state, of those `condition` (if any) keeps.
    async fn count_states(&self, condition: Option<&str>) -> Result<InboxCounts, Error> {
        let query = Query::new(DB::DIALECT)
            .sql("SELECT ")
            .columns::<StateCount>(self.table())
            .sql(&format!(" FROM {} WHERE consumer = ", self.table))
            .bind(self.consumer.as_str())
            .sql(condition.unwrap_or(""))
            .sql(" GROUP BY process");
        let mut conn = self.acquire().await?;
        let mut counts = InboxCounts::default();
        for row in fetch::<DB, StateCount>(&mut conn, &query, "counting inbox rows").await? {
            if row.state == InboxState::Processed.as_sql() {
                counts.processed = row.n;
            } else if row.state == InboxState::Retry.as_sql() {
                counts.retry = row.n;
            } else if row.state == InboxState::Failed.as_sql() {
                counts.failed = row.n;
            }
        }
        Ok(counts)
    }

    /// Up to `limit` parked rows, oldest first, with their payloads.
    pub(crate) async fn parked(&self, limit: u32) -> Result<Vec<ParkedDelivery>, Error> {
        let query = Query::new(DB::DIALECT)
            .sql("SELECT ")
            .columns::<ParkedDelivery>(self.table())
            .sql(&format!(" FROM {} WHERE consumer = ", self.table))
            .bind(self.consumer.as_str())
            .sql(&format!(
                " AND process = '{}' AND process <> '{}' ORDER BY id LIMIT ",
                InboxState::Failed.as_sql(),
                InboxState::Processed.as_sql()
            ))
            .bind(i64::from(limit));
        let mut conn = self.acquire().await?;
        fetch::<DB, _>(&mut conn, &query, "listing parked inbox rows").await
    }

    /// The start of a replay: this consumer's parked rows due again at
    /// `now` with a fresh budget, up to the condition on their state.
    fn replay_query(&self, now: i64) -> Query<'_> {
        Query::new(DB::DIALECT)
            .sql(&format!(
                "UPDATE {} SET process = '{}', attempts = 0, next_attempt_at = ",
                self.table,
                InboxState::Retry.as_sql()
            ))
            .bind(now)
            .sql(", update_time = ")
            .bind(now)
            .sql(" WHERE consumer = ")
            .bind(self.consumer.as_str())
            .sql(&format!(" AND process = '{}'", InboxState::Failed.as_sql()))
    }

    /// Schedules the parked row `event_id` (or every parked row) for another
    /// round of retries with a fresh budget; returns how many.
    pub(crate) async fn replay(&self, event_id: Option<&str>, now: i64) -> Result<u64, Error> {
        let query = match event_id {
            Some(id) => self.replay_query(now).sql(" AND event_id = ").bind(id),
            None => self.replay_query(now).sql(&format!(
                " AND process <> '{}'",
                InboxState::Processed.as_sql()
            )),
        };
        let mut conn = self.acquire().await?;
        exec::<DB>(&mut conn, &query, "replaying parked inbox rows").await
    }

    /// Schedules the parked rows among `event_ids` for another round of
    /// retries with a fresh budget, [`ID_CHUNK`] ids per statement; returns
    /// how many changed.
    pub(crate) async fn replay_ids(&self, event_ids: &[&str], now: i64) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let mut n = 0;
        for chunk in event_ids.chunks(ID_CHUNK) {
            let query = self
                .replay_query(now)
                .sql(" AND event_id IN (")
                .list(chunk)
                .sql(")");
            n += exec::<DB>(&mut conn, &query, "replaying parked inbox rows").await?;
        }
        Ok(n)
    }

    /// Deletes this consumer's parked rows among `event_ids`, [`ID_CHUNK`]
    /// ids per statement; returns how many went.
    pub(crate) async fn discard_ids(&self, event_ids: &[&str]) -> Result<u64, Error> {
        let (processed, failed) = (InboxState::Processed.as_sql(), InboxState::Failed.as_sql());
        let mut conn = self.acquire().await?;
        let mut n = 0;
        for chunk in event_ids.chunks(ID_CHUNK) {
            let query = self
                .of_consumer(&format!("DELETE FROM {} WHERE consumer = ", self.table))
                .sql(&format!(
                    " AND process = '{failed}' AND process <> '{processed}' AND event_id IN ("
                ))
                .list(chunk)
                .sql(")");
            n += exec::<DB>(&mut conn, &query, "discarding parked inbox rows").await?;
        }
        Ok(n)
    }

    /// Deletes up to `limit` rows processed before `before`; returns how many.
    pub(crate) async fn delete_processed(&self, before: i64, limit: u32) -> Result<u64, Error> {
        let processed = InboxState::Processed.as_sql();
        let query = Query::new(DB::DIALECT).delete_limited(
            self.table(),
            |q| {
                q.sql("consumer = ")
                    .bind(self.consumer.as_str())
                    .sql(&format!(
                        " AND process = '{processed}' AND processed_time < "
                    ))
                    .bind(before)
            },
            "processed_time",
            i64::from(limit.max(1)),
        );
        let mut conn = self.acquire().await?;
        exec::<DB>(&mut conn, &query, "deleting processed inbox rows").await
    }
}

/// The consumers that have rows in inbox table `table`, in name order.
pub(crate) async fn consumers<DB: Backend>(
    pool: &Pool<DB>,
    table: &TableName,
) -> Result<Vec<String>, Error> {
    let query = Query::new(DB::DIALECT)
        .sql("SELECT DISTINCT ")
        .columns::<ConsumerName>(table.as_str())
        .sql(&format!(" FROM {table} ORDER BY consumer"));
    let mut conn = crate::backend::acquire(pool).await?;
    let names = fetch::<DB, ConsumerName>(&mut conn, &query, "listing inbox consumers").await?;
    Ok(names.into_iter().map(|ConsumerName(name)| name).collect())
}

/// A unique violation is a duplicate; other errors are errors.
fn duplicate_or(result: Result<u64, sqlx::Error>, action: &'static str) -> Result<Recorded, Error> {
    match result {
        Ok(_) => Ok(Recorded::New),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(Recorded::Duplicate),
        Err(source) => Err(Error::Database { action, source }),
    }
}

/// Rows due for a retry: those to retry, and those that cannot be read (id,
/// reason), which the consumer parks.
#[derive(Default)]
pub(crate) struct DueRows {
    pub(crate) rows: Vec<DueRow>,
    pub(crate) unreadable: Vec<(i64, String)>,
}

/// A due row as a retry.
fn due_row(mut row: Row) -> Result<DueRow, Error> {
    let headers = match row.opt_text(4) {
        Some(json) => serde_json::from_str(&json).map_err(|_| Error::Row {
            table: "inbox",
            column: "headers",
            reason: "not a JSON array of name and value pairs",
        })?,
        None => Vec::new(),
    };
    let attempts = row.int(6, "attempts")?;
    Ok(DueRow {
        id: row.int(0, "id")?,
        attempts,
        delivery: Delivery {
            event_id: row.text(1, "event_id")?,
            event_type: row.opt_text(2),
            key: row.opt_text(3),
            headers,
            body: Bytes::from(row.bytes(5, "content")?),
            attempt: u32::try_from(attempts).unwrap_or(u32::MAX),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{count_columns, dialects};

    #[test]
    fn the_inbox_row_types_select_as_many_columns_as_they_decode() {
        for d in dialects() {
            for (columns, types) in [
                (DueSize::columns(d, "t"), DueSize::TYPES),
                (DueRead::columns(d, "t"), DueRead::TYPES),
                (Count::columns(d, "t"), Count::TYPES),
                (StateCount::columns(d, "t"), StateCount::TYPES),
                (ParkedDelivery::columns(d, "t"), ParkedDelivery::TYPES),
                (ConsumerName::columns(d, "t"), ConsumerName::TYPES),
            ] {
                assert_eq!(count_columns(&columns), types.len(), "{columns}");
            }
        }
    }
}
