//! Every statement on an inbox table, for one consumer.

use std::sync::Arc;

use bytes::Bytes;
use sqlx::Pool;

use super::{InboxState, Row, decode_all};
use crate::backend::sql::InboxSql;
use crate::backend::{Backend, Column, Value};
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

/// The statements of one consumer's rows in an inbox table.
#[derive(Debug)]
pub(crate) struct InboxStore<DB: Backend> {
    pool: Pool<DB>,
    consumer: String,
    table: String,
    sql: Arc<InboxSql>,
}

impl<DB: Backend> Clone for InboxStore<DB> {
    fn clone(&self) -> Self {
        InboxStore {
            pool: self.pool.clone(),
            consumer: self.consumer.clone(),
            table: self.table.clone(),
            sql: self.sql.clone(),
        }
    }
}

impl<DB: Backend> InboxStore<DB> {
    pub(crate) fn new(
        pool: Pool<DB>,
        consumer: String,
        table: String,
        sql: Arc<InboxSql>,
    ) -> InboxStore<DB> {
        InboxStore {
            pool,
            consumer,
            table,
            sql,
        }
    }

    pub(crate) fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    pub(crate) fn consumer(&self) -> &str {
        &self.consumer
    }

    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    pub(crate) async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<DB>, Error> {
        crate::backend::acquire(&self.pool).await
    }

    /// Creates or upgrades the table.
    pub(crate) async fn migrate(&self, timeout: std::time::Duration) -> Result<(), Error> {
        schema::migrate(&self.pool, &self.table, &self.sql.migrations, timeout).await
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
        let result = DB::exec(
            conn,
            &self.sql.insert,
            &[
                Value::Text(Some(&self.consumer)),
                Value::Text(Some(&delivery.event_id)),
                Value::Text(delivery.event_type.as_deref()),
                Value::Text(delivery.key.as_deref()),
                Value::Text(Some(state.as_sql())),
                Value::Int(attempts),
                next_attempt_at.map_or(Value::NullInt, Value::Int),
                Value::Text(error),
                Value::Text(headers.as_deref()),
                Value::Bytes((!processed).then_some(&delivery.body[..])),
                Value::Int(now),
                Value::Int(now),
                if processed {
                    Value::Int(now)
                } else {
                    Value::NullInt
                },
            ],
        )
        .await;
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
        for chunk in deliveries.chunks(INSERT_CHUNK) {
            let mut args = Vec::with_capacity(chunk.len() * 7);
            for d in chunk {
                args.extend([
                    Value::Text(Some(&self.consumer)),
                    Value::Text(Some(&d.event_id)),
                    Value::Text(d.event_type.as_deref()),
                    Value::Text(d.key.as_deref()),
                    Value::Int(now),
                    Value::Int(now),
                    Value::Int(now),
                ]);
            }
            let result = DB::exec(conn, &self.sql.insert_processed(chunk.len()), &args).await;
            if duplicate_or(result, "recording events in the inbox")? == Recorded::Duplicate {
                return Ok(Recorded::Duplicate);
            }
        }
        Ok(Recorded::New)
    }

    /// How many of `event_ids` have a `PROCESSED` row of this consumer, as
    /// `conn`'s transaction sees them: [`ID_CHUNK`] ids per statement.
    pub(crate) async fn count_processed(
        &self,
        conn: &mut DB::Connection,
        event_ids: &[&str],
    ) -> Result<u64, Error> {
        let mut n = 0;
        for chunk in event_ids.chunks(ID_CHUNK) {
            let mut args = Vec::with_capacity(chunk.len() + 1);
            args.push(Value::Text(Some(&self.consumer)));
            args.extend(chunk.iter().map(|id| Value::Text(Some(id))));
            let rows = DB::fetch(
                conn,
                &self.sql.count_processed(chunk.len()),
                &args,
                &[Column::Int],
            )
            .await
            .map_err(Error::db("checking the inbox rows before commit"))?;
            n += match rows.into_iter().next() {
                Some(cells) => Row::new("inbox", cells).count(0, "COUNT(*)")?,
                None => 0,
            };
        }
        Ok(n)
    }

    /// `true` when an earlier event of any of `keys` is waiting for a retry
    /// or parked: one query per [`KEY_CHUNK`] keys.
    pub(crate) async fn keys_pending(&self, keys: &[&str]) -> Result<bool, Error> {
        if keys.is_empty() {
            return Ok(false);
        }
        let mut conn = self.acquire().await?;
        for chunk in keys.chunks(KEY_CHUNK) {
            let mut args = Vec::with_capacity(chunk.len() + 1);
            args.push(Value::Text(Some(&self.consumer)));
            args.extend(chunk.iter().map(|key| Value::Text(Some(key))));
            let rows = DB::fetch(
                &mut conn,
                &self.sql.keys_pending(chunk.len()),
                &args,
                &[Column::Int],
            )
            .await
            .map_err(Error::db("checking keys for pending events"))?;
            let pending = match rows.into_iter().next() {
                Some(cells) => Row::new("inbox", cells).count(0, "COUNT(*)")?,
                None => 0,
            };
            if pending > 0 {
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
        let sql = if key_order {
            &self.sql.due_in_key_order
        } else {
            &self.sql.due
        };
        let mut conn = self.acquire().await?;
        let sizes = DB::fetch(
            &mut conn,
            sql,
            &[
                Value::Text(Some(&self.consumer)),
                Value::Int(now),
                Value::Int(i64::from(limit)),
            ],
            &[Column::Int, Column::Int],
        )
        .await
        .map_err(Error::db("selecting due retries"))?;
        let mut ids = Vec::with_capacity(sizes.len());
        let mut held: u64 = 0;
        for cells in sizes {
            let row = Row::new("inbox", cells);
            let id = row.int(0, "id")?;
            let size = row.count(1, "size")?;
            if !ids.is_empty() && held.saturating_add(size) > RETRY_PASS_BYTES {
                break;
            }
            held = held.saturating_add(size);
            ids.push(Value::Int(id));
        }
        let mut due = DueRows::default();
        if ids.is_empty() {
            return Ok(due);
        }
        let rows = DB::fetch(
            &mut conn,
            &self.sql.due_rows(ids.len()),
            &ids,
            &[
                Column::Int,
                Column::Text,
                Column::Text,
                Column::Text,
                Column::Text,
                Column::Bytes,
                Column::Int,
            ],
        )
        .await
        .map_err(Error::db("reading due retries"))?;
        // Each row on its own: one that cannot be read (headers that are not
        // JSON, a NULL payload, written by hand or cut by a non-strict MySQL)
        // is set apart with the reason, and the others are retried.
        for cells in rows {
            let row = Row::new("inbox", cells);
            let id = row.int(0, "id")?;
            match due_row(row) {
                Ok(row) => due.rows.push(row),
                Err(error) => due
                    .unreadable
                    .push((id, format!("the row cannot be read for a retry: {error}"))),
            }
        }
        Ok(due)
    }

    /// Switches the retry row `id` to `PROCESSED` inside `conn`'s transaction;
    /// `false` if another process took it meanwhile.
    pub(crate) async fn take_retry(
        &self,
        conn: &mut DB::Connection,
        id: i64,
        now: i64,
    ) -> Result<bool, Error> {
        let taken = DB::exec(
            conn,
            &self.sql.take_retry,
            &[Value::Int(now), Value::Int(now), Value::Int(id)],
        )
        .await
        .map_err(Error::db("taking a retry"))?;
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
        let mut conn = self.acquire().await?;
        DB::exec(
            &mut conn,
            &self.sql.fail_retry,
            &[
                Value::Int(budget),
                Value::Text(Some(reason)),
                Value::Int(next_attempt_at),
                Value::Int(now),
                Value::Int(id),
            ],
        )
        .await
        .map_err(Error::db("recording a failed retry"))?;
        Ok(())
    }

    /// Rows per state.
    pub(crate) async fn counts(&self) -> Result<InboxCounts, Error> {
        self.count_states(&self.sql.counts).await
    }

    /// The retrying and parked rows of this consumer (`processed` is 0).
    pub(crate) async fn unsettled_counts(&self) -> Result<InboxCounts, Error> {
        self.count_states(&self.sql.counts_unsettled).await
    }

    async fn count_states(&self, sql: &str) -> Result<InboxCounts, Error> {
        let mut conn = self.acquire().await?;
        let rows = DB::fetch(
            &mut conn,
            sql,
            &[Value::Text(Some(&self.consumer))],
            &[Column::Text, Column::Int],
        )
        .await
        .map_err(Error::db("counting inbox rows"))?;
        let mut counts = InboxCounts::default();
        for cells in rows {
            let mut row = Row::new("inbox", cells);
            let n = row.count(1, "COUNT(*)")?;
            let state = row.text(0, "process")?;
            if state == InboxState::Processed.as_sql() {
                counts.processed = n;
            } else if state == InboxState::Retry.as_sql() {
                counts.retry = n;
            } else if state == InboxState::Failed.as_sql() {
                counts.failed = n;
            }
        }
        Ok(counts)
    }

    /// Up to `limit` parked rows, oldest first, with their payloads.
    pub(crate) async fn parked(&self, limit: u32) -> Result<Vec<ParkedDelivery>, Error> {
        let mut conn = self.acquire().await?;
        let rows = DB::fetch(
            &mut conn,
            &self.sql.parked,
            &[
                Value::Text(Some(&self.consumer)),
                Value::Int(i64::from(limit)),
            ],
            &[
                Column::Text,
                Column::Text,
                Column::Text,
                Column::Int,
                Column::Text,
                Column::Int,
                Column::Int,
                Column::Bytes,
            ],
        )
        .await
        .map_err(Error::db("listing parked inbox rows"))?;
        decode_all("inbox", rows, |mut row| {
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
        })
    }

    /// Schedules the parked row `event_id` (or every parked row) for another
    /// round of retries with a fresh budget; returns how many.
    pub(crate) async fn replay(&self, event_id: Option<&str>, now: i64) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let mut args = vec![
            Value::Int(now),
            Value::Int(now),
            Value::Text(Some(&self.consumer)),
        ];
        let sql = match event_id {
            Some(id) => {
                args.push(Value::Text(Some(id)));
                &self.sql.replay_one
            }
            None => &self.sql.replay_all,
        };
        DB::exec(&mut conn, sql, &args)
            .await
            .map_err(Error::db("replaying parked inbox rows"))
    }

    /// Schedules the parked rows among `event_ids` for another round of
    /// retries with a fresh budget, [`ID_CHUNK`] ids per statement; returns
    /// how many changed.
    pub(crate) async fn replay_ids(&self, event_ids: &[&str], now: i64) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let mut n = 0;
        for chunk in event_ids.chunks(ID_CHUNK) {
            let mut args = vec![
                Value::Int(now),
                Value::Int(now),
                Value::Text(Some(&self.consumer)),
            ];
            args.extend(chunk.iter().map(|id| Value::Text(Some(id))));
            n += DB::exec(&mut conn, &self.sql.replay_ids(chunk.len()), &args)
                .await
                .map_err(Error::db("replaying parked inbox rows"))?;
        }
        Ok(n)
    }

    /// Deletes this consumer's parked rows among `event_ids`, [`ID_CHUNK`]
    /// ids per statement; returns how many went.
    pub(crate) async fn discard_ids(&self, event_ids: &[&str]) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let mut n = 0;
        for chunk in event_ids.chunks(ID_CHUNK) {
            let mut args = vec![Value::Text(Some(&self.consumer))];
            args.extend(chunk.iter().map(|id| Value::Text(Some(id))));
            n += DB::exec(&mut conn, &self.sql.discard_ids(chunk.len()), &args)
                .await
                .map_err(Error::db("discarding parked inbox rows"))?;
        }
        Ok(n)
    }

    /// Deletes up to `limit` rows processed before `before`; returns how many.
    pub(crate) async fn delete_processed(&self, before: i64, limit: u32) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        DB::exec(
            &mut conn,
            &self.sql.delete_processed,
            &[
                Value::Text(Some(&self.consumer)),
                Value::Int(before),
                Value::Int(i64::from(limit.max(1))),
            ],
        )
        .await
        .map_err(Error::db("deleting processed inbox rows"))
    }
}

/// The consumers that have rows in inbox table `table`, in name order.
pub(crate) async fn consumers<DB: Backend>(
    pool: &Pool<DB>,
    table: &TableName,
) -> Result<Vec<String>, Error> {
    let mut conn = crate::backend::acquire(pool).await?;
    let rows = DB::fetch(
        &mut conn,
        &format!("SELECT DISTINCT consumer FROM {table} ORDER BY consumer"),
        &[],
        &[Column::Text],
    )
    .await
    .map_err(Error::db("listing inbox consumers"))?;
    decode_all("inbox", rows, |mut row| row.text(0, "consumer"))
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

/// A row of [`InboxSql::due`](crate::backend::sql::InboxSql::due) as a retry.
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
