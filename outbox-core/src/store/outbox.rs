//! Every statement on an outbox table.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use sqlx::{Pool, Transaction};

use super::{OutboxState, Row, decode_all};
use crate::backend::sql::{INSERT_VALUES, OutboxSql};
use crate::backend::{Backend, Column, Value, marks, placeholders};
use crate::event::{Event, OutboxMessage};
use crate::rows::{OutboxCounts, ParkedEvent};
use crate::{Error, schema};

/// Rows per `INSERT` statement: keeps the number of bound values well under
/// every database's limit.
const INSERT_CHUNK: usize = 200;

/// Key partitions `[from, to)` a relay claims from (keyless rows it always may).
pub(crate) type Share = (i64, i64);

/// Ids per statement when rows are marked or given back by id.
const ID_CHUNK: usize = 500;

/// Column types of [`CLAIM_COLUMNS`](crate::backend::sql::CLAIM_COLUMNS).
const CLAIM_TYPES: [Column; 10] = [
    Column::Int,
    Column::Text,
    Column::Text,
    Column::Text,
    Column::Text,
    Column::Text,
    Column::Bytes,
    Column::Text,
    Column::Int,
    Column::Int,
];

/// Column types of a row's head (see `head_columns` in `backend/sql.rs`).
const HEAD_TYPES: [Column; 4] = [Column::Int, Column::Text, Column::Int, Column::Int];

/// A waiting row without its payload: what a batch is chosen and sized on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowHead {
    pub(crate) id: i64,
    pub(crate) key: Option<String>,
    /// Bytes of payload and headers as stored.
    pub(crate) bytes: usize,
    /// When its lease ends (ms on the database's clock), if it has one.
    pub(crate) claimed_until: Option<i64>,
}

/// Reads fetched heads; a row without an id is an error naming the column.
fn row_heads(rows: Vec<Vec<crate::backend::Cell>>) -> Result<Vec<RowHead>, Error> {
    decode_all("outbox", rows, |mut row| {
        Ok(RowHead {
            id: row.int(0, "id")?,
            key: row.opt_text(1),
            bytes: row
                .opt_int(2)
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0),
            claimed_until: row.opt_int(3),
        })
    })
}

/// The statements of one outbox table, on its pool.
#[derive(Debug)]
pub(crate) struct OutboxStore<DB: Backend> {
    pool: Pool<DB>,
    sql: Arc<OutboxSql>,
}

impl<DB: Backend> Clone for OutboxStore<DB> {
    fn clone(&self) -> Self {
        OutboxStore {
            pool: self.pool.clone(),
            sql: self.sql.clone(),
        }
    }
}

impl<DB: Backend> OutboxStore<DB> {
    pub(crate) fn new(pool: Pool<DB>, sql: Arc<OutboxSql>) -> OutboxStore<DB> {
        OutboxStore { pool, sql }
    }

    pub(crate) fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The statements, for producers that append without an [`Outbox`](crate::Outbox).
    pub(crate) fn sql(&self) -> &OutboxSql {
        &self.sql
    }

    pub(crate) fn table(&self) -> &str {
        self.sql.table.as_str()
    }

    pub(crate) async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<DB>, Error> {
        crate::backend::acquire(&self.pool).await
    }

    /// Creates or upgrades the table. Rows written before version 3 keep
    /// their headers as a JSON object; they are rewritten as pairs first, so
    /// version 3 is recorded only after the rows there were then have the new
    /// shape (a process that dies half way leaves the rest to the next
    /// start). Producers of an older release still running may write objects
    /// after that: the relay reads both shapes.
    pub(crate) async fn migrate(&self, timeout: std::time::Duration) -> Result<(), Error> {
        let version = schema::version(&self.pool, self.table()).await?;
        if version.is_some_and(|v| (1..3).contains(&v)) {
            self.rewrite_legacy_headers().await?;
        }
        schema::migrate(&self.pool, self.table(), &self.sql.migrations, timeout).await
    }

    /// Rewrites headers stored as a JSON object into `[name, value]` pairs,
    /// 500 rows at a time. Each update names the old text, so two processes
    /// doing it at once do no harm; a row whose headers are not a JSON
    /// object of strings is left as it is (and read as such).
    async fn rewrite_legacy_headers(&self) -> Result<(), Error> {
        let mut after = 0i64;
        loop {
            // One transaction per 500 rows: one commit each, not one per row.
            let mut conn = DB::begin_write(&self.pool)
                .await
                .map_err(Error::db("beginning a headers rewrite"))?;
            let rows = DB::fetch(
                &mut conn,
                &self.sql.legacy_headers,
                &[Value::Int(after), Value::Int(500)],
                &[Column::Int, Column::Text],
            )
            .await
            .map_err(Error::db("reading headers to rewrite"))?;
            let rows = decode_all("outbox", rows, |mut row| {
                Ok((row.int(0, "id")?, row.text(1, "headers")?))
            })?;
            let Some(last) = rows.last().map(|(id, _)| *id) else {
                conn.commit()
                    .await
                    .map_err(Error::db("ending a headers rewrite"))?;
                return Ok(());
            };
            for (id, old) in &rows {
                // The relay's reader: a row it cannot read is left as it is.
                let Ok(pairs) = headers_of(old) else {
                    continue;
                };
                let new = serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned());
                DB::exec(
                    &mut conn,
                    &self.sql.rewrite_headers,
                    &[
                        Value::Text(Some(&new)),
                        Value::Int(*id),
                        Value::Text(Some(old)),
                    ],
                )
                .await
                .map_err(Error::db("rewriting headers"))?;
            }
            conn.commit()
                .await
                .map_err(Error::db("committing a headers rewrite"))?;
            after = last;
        }
    }

    /// A transaction that writes, with the relaxed commit of the database
    /// where it has one (the relay's claims and marks can be redone).
    pub(crate) async fn begin_relaxed(&self) -> Result<Transaction<'static, DB>, Error> {
        let mut tx = DB::begin_write(&self.pool)
            .await
            .map_err(Error::db("beginning a relay transaction"))?;
        if let Some(relaxed) = DB::DIALECT.relaxed_commit {
            DB::exec(&mut tx, relaxed, &[])
                .await
                .map_err(Error::db("relaxing a relay transaction's commit"))?;
        }
        Ok(tx)
    }

    /// `true` if some row is due and not leased: a read that takes no lock.
    pub(crate) async fn any_due(&self, now: i64, share: Share) -> Result<bool, Error> {
        let mut conn = self.acquire().await?;
        let due = DB::fetch(
            &mut conn,
            &self.sql.due_probe,
            &[
                Value::Int(now),
                Value::Int(now),
                Value::Int(share.0),
                Value::Int(share.1),
            ],
            &[Column::Int],
        )
        .await
        .map_err(Error::db("looking for due rows"))?;
        Ok(!due.is_empty())
    }

    /// Up to `limit` due rows not leased, keyless or in the key partitions
    /// `share`, in id order, skipping rows other relays have locked.
    pub(crate) async fn select_due(
        &self,
        conn: &mut DB::Connection,
        now: i64,
        share: Share,
        limit: u32,
    ) -> Result<Vec<RowHead>, Error> {
        let rows = DB::fetch(
            conn,
            &self.sql.claim,
            &[
                Value::Int(now),
                Value::Int(now),
                Value::Int(share.0),
                Value::Int(share.1),
                Value::Int(i64::from(limit)),
            ],
            &HEAD_TYPES,
        )
        .await
        .map_err(Error::db("selecting due rows"))?;
        row_heads(rows)
    }

    /// [`select_due`](Self::select_due) past id `after`, skipping the rows
    /// of the keys `excluded`: the next window of a claim whose rows so far
    /// were held back by per-key order.
    pub(crate) async fn select_due_after(
        &self,
        conn: &mut DB::Connection,
        now: i64,
        share: Share,
        after: i64,
        excluded: &[&str],
        limit: u32,
    ) -> Result<Vec<RowHead>, Error> {
        let mut args = vec![
            Value::Int(now),
            Value::Int(now),
            Value::Int(share.0),
            Value::Int(share.1),
            Value::Int(after),
        ];
        args.extend(excluded.iter().map(|k| Value::Text(Some(k))));
        args.push(Value::Int(i64::from(limit)));
        let rows = DB::fetch(
            conn,
            &self.sql.claim_after(excluded.len()),
            &args,
            &HEAD_TYPES,
        )
        .await
        .map_err(Error::db("selecting due rows"))?;
        row_heads(rows)
    }

    /// The heads of up to `limit` committed rows leased to `token` (handed
    /// off at insert) whose lease still holds.
    pub(crate) async fn handed_off(
        &self,
        conn: &mut DB::Connection,
        token: &str,
        now: i64,
        limit: i64,
    ) -> Result<Vec<RowHead>, Error> {
        let rows = DB::fetch(
            conn,
            &self.sql.handed_off,
            &[Value::Text(Some(token)), Value::Int(now), Value::Int(limit)],
            &HEAD_TYPES,
        )
        .await
        .map_err(Error::db("reading handed-off rows"))?;
        row_heads(rows)
    }

    /// Lengthens to `until` the lease of the rows `ids` held under `token`
    /// whose lease has not run out by `now`; returns how many.
    pub(crate) async fn renew_lease(
        &self,
        conn: &mut DB::Connection,
        token: &str,
        ids: &[i64],
        now: i64,
        until: i64,
    ) -> Result<u64, Error> {
        let mut n = 0;
        for chunk in ids.chunks(ID_CHUNK) {
            let mut args = vec![Value::Int(until), Value::Text(Some(token)), Value::Int(now)];
            args.extend(chunk.iter().map(|id| Value::Int(*id)));
            n += DB::exec(&mut *conn, &self.sql.renew_lease(chunk.len()), &args)
                .await
                .map_err(Error::db("renewing handed-off rows"))?;
        }
        Ok(n)
    }

    /// The rows `ids` in full (payloads too), in id order, [`ID_CHUNK`] at
    /// a time; rows that cannot be read as a message are set apart.
    pub(crate) async fn rows_by_id(
        &self,
        conn: &mut DB::Connection,
        ids: &[i64],
    ) -> Result<ClaimedRows, Error> {
        let mut all = ClaimedRows::default();
        for chunk in ids.chunks(ID_CHUNK) {
            let args: Vec<Value<'_>> = chunk.iter().map(|id| Value::Int(*id)).collect();
            let rows = DB::fetch(
                &mut *conn,
                &self.sql.rows_by_id(chunk.len()),
                &args,
                &CLAIM_TYPES,
            )
            .await
            .map_err(Error::db("reading the rows of a batch"))?;
            let read = claimed_rows(rows)?;
            all.messages.extend(read.messages);
            all.undecodable.extend(read.undecodable);
        }
        Ok(all)
    }

    /// The unpublished rows of `keys` up to id `max_id`, in id order: (id, key).
    pub(crate) async fn unpublished_of_keys(
        &self,
        conn: &mut DB::Connection,
        max_id: i64,
        keys: &[&str],
    ) -> Result<Vec<(i64, String)>, Error> {
        let mut args = vec![Value::Int(max_id)];
        args.extend(keys.iter().map(|k| Value::Text(Some(k))));
        let rows = DB::fetch(
            conn,
            &self.sql.key_rows(keys.len()),
            &args,
            &[Column::Int, Column::Text],
        )
        .await
        .map_err(Error::db("checking key order"))?;
        decode_all("outbox", rows, |mut row| {
            Ok((row.int(0, "id")?, row.text(1, "event_key")?))
        })
    }

    /// Of `keys`, those with a parked row or a row not due before `now`.
    pub(crate) async fn held_keys(
        &self,
        conn: &mut DB::Connection,
        now: i64,
        keys: &[&str],
    ) -> Result<Vec<String>, Error> {
        let mut args = vec![Value::Int(now)];
        args.extend(keys.iter().map(|k| Value::Text(Some(k))));
        let rows = DB::fetch(
            conn,
            &self.sql.held_keys(keys.len()),
            &args,
            &[Column::Text],
        )
        .await
        .map_err(Error::db("reading held keys"))?;
        decode_all("outbox", rows, |mut row| row.text(0, "event_key"))
    }

    /// Leases the rows `ids` to `token` until `until`.
    pub(crate) async fn lease(
        &self,
        conn: &mut DB::Connection,
        token: &str,
        until: i64,
        ids: &[i64],
    ) -> Result<(), Error> {
        let mut args = vec![Value::Text(Some(token)), Value::Int(until)];
        args.extend(ids.iter().map(|id| Value::Int(*id)));
        DB::exec(conn, &self.sql.claim_update(ids.len()), &args)
            .await
            .map_err(Error::db("claiming rows"))?;
        Ok(())
    }

    /// Marks the rows `ids` held under `token` published; returns how many
    /// changed.
    pub(crate) async fn mark_published(
        &self,
        conn: &mut DB::Connection,
        token: &str,
        ids: &[i64],
        now: i64,
    ) -> Result<u64, Error> {
        let mut n = 0;
        for chunk in ids.chunks(ID_CHUNK) {
            let mut args = vec![Value::Int(now), Value::Int(now), Value::Text(Some(token))];
            args.extend(chunk.iter().map(|id| Value::Int(*id)));
            n += DB::exec(conn, &self.sql.mark_published_ids(chunk.len()), &args)
                .await
                .map_err(Error::db("marking rows published"))?;
        }
        Ok(n)
    }

    /// Gives back the rows `ids` held under `token`, keeping `error` as
    /// their last error (`None` keeps the one they had).
    pub(crate) async fn release_ids(
        &self,
        conn: &mut DB::Connection,
        token: &str,
        ids: &[i64],
        error: Option<&str>,
        now: i64,
    ) -> Result<(), Error> {
        for chunk in ids.chunks(ID_CHUNK) {
            let mut args = vec![
                Value::Text(error),
                Value::Int(now),
                Value::Text(Some(token)),
            ];
            args.extend(chunk.iter().map(|id| Value::Int(*id)));
            DB::exec(&mut *conn, &self.sql.release_ids(chunk.len()), &args)
                .await
                .map_err(Error::db("giving back rows"))?;
        }
        Ok(())
    }

    /// Gives back every row held under `token`.
    pub(crate) async fn release_token(
        &self,
        conn: &mut DB::Connection,
        token: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), Error> {
        DB::exec(
            conn,
            &self.sql.release,
            &[
                Value::Text(error),
                Value::Int(now),
                Value::Text(Some(token)),
            ],
        )
        .await
        .map_err(Error::db("releasing a claim"))?;
        Ok(())
    }

    /// Defers the waiting rows of `destination` that are free or held under
    /// `token` until `until`, keeping `error` as their last error; their
    /// attempts stay as they were. Returns how many rows changed.
    pub(crate) async fn defer_destination(
        &self,
        token: &str,
        destination: &str,
        until: i64,
        error: &str,
        now: i64,
    ) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        DB::exec(
            &mut conn,
            &self.sql.defer_destination,
            &[
                Value::Int(until),
                Value::Text(Some(error)),
                Value::Int(now),
                Value::Text(Some(destination)),
                Value::Int(until),
                Value::Int(now),
                Value::Text(Some(token)),
            ],
        )
        .await
        .map_err(Error::db("deferring a refused destination"))
    }

    /// Records a rejection of row `id` held under `token` that spent its
    /// last attempt: one attempt more, parked as `FAILED`. The statement
    /// checks that one more attempt reaches `max_attempts`, as the relay
    /// decided from the attempts it read; `false` when nothing changed (the
    /// row was no longer held under `token`).
    pub(crate) async fn park_rejected(
        &self,
        token: &str,
        id: i64,
        max_attempts: u32,
        error: &str,
        next_attempt_at: i64,
        now: i64,
    ) -> Result<bool, Error> {
        let sql = &self.sql.park_rejected;
        self.record_rejection(sql, token, id, max_attempts, error, (next_attempt_at, now))
            .await
    }

    /// Records a rejection of row `id` held under `token` with attempts
    /// left: one attempt more, due again at `next_attempt_at`. The statement
    /// checks that one more attempt stays below `max_attempts`; `false` when
    /// nothing changed (the row was no longer held under `token`).
    pub(crate) async fn retry_rejected(
        &self,
        token: &str,
        id: i64,
        max_attempts: u32,
        error: &str,
        next_attempt_at: i64,
        now: i64,
    ) -> Result<bool, Error> {
        let sql = &self.sql.retry_rejected;
        self.record_rejection(sql, token, id, max_attempts, error, (next_attempt_at, now))
            .await
    }

    /// Runs `sql`, one of the two rejection statements; `(next, now)` are
    /// the next attempt time and the update time.
    async fn record_rejection(
        &self,
        sql: &str,
        token: &str,
        id: i64,
        max_attempts: u32,
        error: &str,
        (next_attempt_at, now): (i64, i64),
    ) -> Result<bool, Error> {
        let mut conn = self.acquire().await?;
        let changed = DB::exec(
            &mut conn,
            sql,
            &[
                Value::Text(Some(error)),
                Value::Int(next_attempt_at),
                Value::Int(now),
                Value::Int(id),
                Value::Text(Some(token)),
                Value::Int(i64::from(max_attempts)),
            ],
        )
        .await
        .map_err(Error::db("recording a rejection"))?;
        Ok(changed > 0)
    }

    /// Parks the waiting row `id`, which cannot be read as an event, with
    /// `reason`; `true` if it was still waiting.
    pub(crate) async fn park_undecodable(
        &self,
        conn: &mut DB::Connection,
        id: i64,
        reason: &str,
        now: i64,
    ) -> Result<bool, Error> {
        let changed = DB::exec(
            conn,
            &self.sql.park_undecodable,
            &[Value::Text(Some(reason)), Value::Int(now), Value::Int(id)],
        )
        .await
        .map_err(Error::db("parking a row that cannot be read"))?;
        Ok(changed > 0)
    }

    /// Deletes up to `limit` rows published before `before`; returns how many.
    pub(crate) async fn delete_published(&self, before: i64, limit: u32) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        DB::exec(
            &mut conn,
            &self.sql.delete_published,
            &[Value::Int(before), Value::Int(i64::from(limit))],
        )
        .await
        .map_err(Error::db("deleting published rows"))
    }

    /// Waiting rows, the create time of the oldest, and parked rows.
    pub(crate) async fn backlog(&self) -> Result<(u64, Option<i64>, u64), Error> {
        let mut conn = self.acquire().await?;
        let rows = DB::fetch(
            &mut conn,
            &self.sql.backlog,
            &[],
            &[Column::Int, Column::Int],
        )
        .await
        .map_err(Error::db("reading the backlog"))?;
        let (pending, oldest) = match rows.into_iter().next() {
            Some(cells) => {
                let row = Row::new("outbox", cells);
                (row.count(0, "COUNT(*)")?, row.opt_int(1))
            }
            None => (0, None),
        };
        let parked = DB::fetch(&mut conn, &self.sql.parked_count, &[], &[Column::Int])
            .await
            .map_err(Error::db("counting parked rows"))?;
        let parked = match parked.into_iter().next() {
            Some(cells) => Row::new("outbox", cells).count(0, "COUNT(*)")?,
            None => 0,
        };
        Ok((pending, oldest, parked))
    }

    /// Rows per state.
    pub(crate) async fn counts(&self) -> Result<OutboxCounts, Error> {
        let mut conn = self.acquire().await?;
        let rows = DB::fetch(
            &mut conn,
            &self.sql.count_by_process,
            &[],
            &[Column::Text, Column::Int],
        )
        .await
        .map_err(Error::db("counting rows"))?;
        let by_state = decode_all("outbox", rows, |mut row| {
            Ok((row.text(0, "process")?, row.count(1, "COUNT(*)")?))
        })?;
        let mut counts = OutboxCounts::default();
        for (state, n) in by_state {
            counts.add(OutboxState::from_sql(&state), n);
        }
        Ok(counts)
    }

    /// Up to `limit` parked rows, oldest first.
    pub(crate) async fn parked(&self, limit: u32) -> Result<Vec<ParkedEvent>, Error> {
        let mut conn = self.acquire().await?;
        let rows = DB::fetch(
            &mut conn,
            &self.sql.parked,
            &[Value::Int(i64::from(limit))],
            &[
                Column::Text,
                Column::Text,
                Column::Text,
                Column::Text,
                Column::Int,
                Column::Text,
                Column::Int,
                Column::Int,
            ],
        )
        .await
        .map_err(Error::db("listing parked rows"))?;
        let mut parked = decode_all("outbox", rows, |mut row| {
            Ok(ParkedEvent {
                event_id: row.text(0, "event_id")?,
                event_type: row.text(1, "event_type")?,
                destination: row.text(2, "destination")?,
                key: row.opt_text(3),
                attempts: row.int(4, "attempts")?,
                last_error: row.opt_text(5),
                create_time: row.int(6, "create_time")?,
                update_time: row.int(7, "update_time")?,
                content: Vec::new(),
                content_type: String::new(),
            })
        })?;
        self.fill_payloads(&mut conn, &mut parked).await?;
        Ok(parked)
    }

    /// Fills in the payload and content type of `events`, read by event id
    /// (unique) in chunks of [`ID_CHUNK`]. A row gone meanwhile keeps an
    /// empty payload.
    async fn fill_payloads(
        &self,
        conn: &mut DB::Connection,
        events: &mut [ParkedEvent],
    ) -> Result<(), Error> {
        for chunk in events.chunks_mut(ID_CHUNK) {
            let sql = placeholders(
                DB::DIALECT.placeholders,
                &format!(
                    "SELECT event_id, content, content_type FROM {} WHERE event_id IN ({})",
                    self.table(),
                    marks(chunk.len())
                ),
            );
            let args: Vec<Value<'_>> = chunk
                .iter()
                .map(|e| Value::Text(Some(e.event_id.as_str())))
                .collect();
            let rows = DB::fetch(
                &mut *conn,
                &sql,
                &args,
                &[Column::Text, Column::Bytes, Column::Text],
            )
            .await
            .map_err(Error::db("reading parked payloads"))?;
            let mut payloads: HashMap<String, (Vec<u8>, String)> =
                decode_all("outbox", rows, |mut row| {
                    Ok((
                        row.text(0, "event_id")?,
                        (row.bytes(1, "content")?, row.text(2, "content_type")?),
                    ))
                })?
                .into_iter()
                .collect();
            for event in chunk.iter_mut() {
                if let Some((content, content_type)) = payloads.remove(&event.event_id) {
                    event.content = content;
                    event.content_type = content_type;
                }
            }
        }
        Ok(())
    }

    /// Puts the parked row `event_id` (or every parked row) back to `NEW`
    /// with a fresh budget; returns how many.
    pub(crate) async fn replay(&self, event_id: Option<&str>, now: i64) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let (sql, args) = match event_id {
            Some(id) => (
                &self.sql.replay_one,
                vec![Value::Int(now), Value::Int(now), Value::Text(Some(id))],
            ),
            None => (&self.sql.replay_all, vec![Value::Int(now), Value::Int(now)]),
        };
        DB::exec(&mut conn, sql, &args)
            .await
            .map_err(Error::db("replaying parked rows"))
    }

    /// Puts the parked rows among `event_ids` back to `NEW` with a fresh
    /// budget, [`ID_CHUNK`] ids per statement; returns how many changed.
    pub(crate) async fn replay_ids(&self, event_ids: &[&str], now: i64) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let mut n = 0;
        for chunk in event_ids.chunks(ID_CHUNK) {
            let mut args = vec![Value::Int(now), Value::Int(now)];
            args.extend(chunk.iter().map(|id| Value::Text(Some(id))));
            n += DB::exec(&mut conn, &self.sql.replay_ids(chunk.len()), &args)
                .await
                .map_err(Error::db("replaying parked rows"))?;
        }
        Ok(n)
    }

    /// Deletes the parked rows among `event_ids`, [`ID_CHUNK`] ids per
    /// statement; returns how many went. Rows in any other state stay.
    pub(crate) async fn discard_ids(&self, event_ids: &[&str]) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let mut n = 0;
        for chunk in event_ids.chunks(ID_CHUNK) {
            let args: Vec<Value<'_>> = chunk.iter().map(|id| Value::Text(Some(id))).collect();
            n += DB::exec(&mut conn, &self.sql.discard_ids(chunk.len()), &args)
                .await
                .map_err(Error::db("discarding parked rows"))?;
        }
        Ok(n)
    }

    /// The state and last error of the rows among `event_ids`, [`ID_CHUNK`]
    /// ids per statement; ids without a row are left out.
    pub(crate) async fn states(
        &self,
        event_ids: &[&str],
    ) -> Result<Vec<(String, OutboxState, Option<String>)>, Error> {
        let mut conn = self.acquire().await?;
        let mut out = Vec::with_capacity(event_ids.len());
        for chunk in event_ids.chunks(ID_CHUNK) {
            let args: Vec<Value<'_>> = chunk.iter().map(|id| Value::Text(Some(id))).collect();
            let rows = DB::fetch(
                &mut conn,
                &self.sql.states_of(chunk.len()),
                &args,
                &[Column::Text, Column::Text, Column::Text],
            )
            .await
            .map_err(Error::db("reading the state of events"))?;
            out.extend(decode_all("outbox", rows, |mut row| {
                let state = row.text(1, "process")?;
                let state = OutboxState::from_sql(&state).ok_or(Error::Row {
                    table: "outbox",
                    column: "process",
                    reason: "not NEW, PUBLISHED or FAILED",
                })?;
                Ok((row.text(0, "event_id")?, state, row.opt_text(2)))
            })?);
        }
        Ok(out)
    }
}

/// Inserts `events` into the table of `sql` inside `tx` (see
/// [`OutboxStore::insert`]); also used by the macro's producers, which have
/// the statements but no store.
pub(crate) async fn insert<DB: Backend>(
    sql: &OutboxSql,
    tx: &mut Transaction<'_, DB>,
    events: &[Event],
    lease: Option<(&str, i64)>,
    now: i64,
) -> Result<(), Error> {
    // More rows than one statement takes: the statements go under a
    // savepoint, so a later one that fails (a repeated id, a value a column
    // refuses) takes the earlier ones back with it. A caller that commits
    // after the error then commits none of the events, never a part.
    let several = events.len() > INSERT_CHUNK;
    if several {
        DB::exec(&mut **tx, "SAVEPOINT outbox_append", &[])
            .await
            .map_err(Error::db("appending events"))?;
    }
    match insert_chunks(sql, tx, events, lease, now).await {
        Ok(()) if several => {
            DB::exec(&mut **tx, "RELEASE SAVEPOINT outbox_append", &[])
                .await
                .map_err(Error::db("appending events"))?;
        }
        Ok(()) => {}
        Err(error) => {
            if several {
                // If this fails too, the transaction is unusable: the
                // caller's commit cannot keep part of the events either.
                let _ = DB::exec(&mut **tx, "ROLLBACK TO SAVEPOINT outbox_append", &[]).await;
            }
            return Err(error);
        }
    }
    // Handed-off rows are leased to a relay of this process, which the commit
    // wakes: other relays could not take them, so they need no NOTIFY.
    if let Some(notify) = sql.notify.as_ref().filter(|_| lease.is_none()) {
        DB::exec(&mut **tx, notify, &[])
            .await
            .map_err(Error::db("notifying relays"))?;
    }
    Ok(())
}

/// The `INSERT` statements of [`insert`], [`INSERT_CHUNK`] rows each.
async fn insert_chunks<DB: Backend>(
    sql: &OutboxSql,
    tx: &mut Transaction<'_, DB>,
    events: &[Event],
    lease: Option<(&str, i64)>,
    now: i64,
) -> Result<(), Error> {
    let (claimed_by, claimed_until) = match lease {
        Some((token, until)) => (Value::Text(Some(token)), Value::Int(until)),
        None => (Value::Text(None), Value::NullInt),
    };
    let new = OutboxState::New.as_sql();
    for chunk in events.chunks(INSERT_CHUNK) {
        let ids: Vec<String> = chunk.iter().map(|e| e.id.to_string()).collect();
        let headers: Vec<String> = chunk.iter().map(Event::headers_json).collect();
        let mut args = Vec::with_capacity(chunk.len() * INSERT_VALUES);
        for ((event, id), headers) in chunk.iter().zip(&ids).zip(&headers) {
            args.extend([
                Value::Text(Some(id)),
                Value::Text(Some(&event.event_type)),
                Value::Text(Some(&event.destination)),
                Value::Text(event.key.as_deref()),
                Value::Text(Some(headers)),
                Value::Bytes(Some(&event.content)),
                Value::Text(Some(&event.content_type)),
                Value::Text(Some(new)),
                Value::Int(0),
                // Due at once, on any clock: a producer whose host clock is
                // ahead of the relays' would otherwise hold its rows (and,
                // by per-key order, its keys' later rows) back that long.
                Value::Int(0),
                Value::Int(now),
                Value::Int(now),
                claimed_by.clone(),
                claimed_until.clone(),
                Value::Int(crate::relay::key_partition(event.key.as_deref())),
            ]);
        }
        DB::exec(&mut **tx, &sql.insert(chunk.len()), &args)
            .await
            .map_err(Error::db("appending events"))?;
    }
    Ok(())
}

/// Stored headers: `[name, value]` pairs, or (rows written before schema
/// version 3 and not yet rewritten) a JSON object, read in name order.
fn headers_of(json: &str) -> Result<Vec<(String, String)>, Error> {
    if let Ok(pairs) = serde_json::from_str::<Vec<(String, String)>>(json) {
        return Ok(pairs);
    }
    let map: std::collections::BTreeMap<String, String> =
        serde_json::from_str(json).map_err(|_| Error::Row {
            table: "outbox",
            column: "headers",
            reason: "neither [name, value] pairs nor an object of strings",
        })?;
    Ok(map.into_iter().collect())
}

/// Rows a claim read: those to publish, in id order, and those it cannot
/// read as a message (`id`, reason), which the relay parks.
#[derive(Debug, Default)]
pub(crate) struct ClaimedRows {
    pub(crate) messages: Vec<OutboxMessage>,
    pub(crate) undecodable: Vec<(i64, String)>,
}

/// Decodes each claimed row on its own: a row written by hand, by a trigger
/// or by another tool that does not hold a message (headers that are not
/// JSON, a NULL where a value is needed) is set apart with the reason, and
/// the other rows are read as usual.
fn claimed_rows(rows: Vec<Vec<crate::backend::Cell>>) -> Result<ClaimedRows, Error> {
    let mut claimed = ClaimedRows::default();
    for cells in rows {
        let row = Row::new("outbox", cells);
        let id = row.int(0, "id")?;
        match message(row) {
            Ok(m) => claimed.messages.push(m),
            Err(error) => claimed
                .undecodable
                .push((id, format!("the row cannot be read as an event: {error}"))),
        }
    }
    Ok(claimed)
}

/// A claimed row as the relay publishes it.
fn message(mut row: Row) -> Result<OutboxMessage, Error> {
    let headers = match row.opt_text(5) {
        Some(json) => headers_of(&json)?,
        None => Vec::new(),
    };
    Ok(OutboxMessage {
        id: row.int(0, "id")?,
        event_id: row.text(1, "event_id")?,
        event_type: row.text(2, "event_type")?,
        destination: row.text(3, "destination")?,
        key: row.opt_text(4),
        headers,
        content: Bytes::from(row.bytes(6, "content")?),
        content_type: row.text(7, "content_type")?,
        attempts: row.int(8, "attempts")?,
        create_time: row.int(9, "create_time")?,
    })
}
