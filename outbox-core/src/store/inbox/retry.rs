//! The retry pass's statements: the due rows, chosen by size before their
//! payloads are read, a retry taken and a failed retry recorded.

use std::borrow::Cow;

use bytes::Bytes;

use super::InboxStore;
use crate::Error;
use crate::backend::{Backend, Column, Dialect, FromRow, Query, Row};
use crate::delivery::Delivery;
use crate::store::{InboxState, exec, fetch};

/// The most payload and header bytes one retry pass reads at once (8 MiB),
/// or one row when that row alone is larger: rows are chosen by their sizes
/// before their payloads are read.
pub(crate) const RETRY_PASS_BYTES: u64 = 8 * 1024 * 1024;

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

impl<DB: Backend> InboxStore<DB> {
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
    use crate::backend::assert_selects_what_it_decodes;

    #[test]
    fn the_retry_row_types_select_as_many_columns_as_they_decode() {
        assert_selects_what_it_decodes::<DueSize>();
        assert_selects_what_it_decodes::<DueRead>();
    }
}
