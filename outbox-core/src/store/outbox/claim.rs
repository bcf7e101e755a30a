//! The relay's reads and leases: the due probe, the claim (and its windows
//! past rows held back by per-key order), the hand-off read, the per-key
//! order checks, the lease, and the full rows of a batch.

use std::borrow::Cow;

use bytes::Bytes;

use super::{ID_CHUNK, OutboxStore, Share, headers_of};
use crate::Error;
use crate::backend::{Backend, Column, Dialect, FromRow, Query, Row};
use crate::event::OutboxMessage;
use crate::store::{OutboxState, exec, fetch};

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

impl FromRow for RowHead {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[Column::Int, Column::Text, Column::Int, Column::Int];

    /// Its id, its key, the bytes of its payload and headers (see
    /// [`Dialect::payload_bytes`]) and its lease. A batch is sized on these
    /// before any payload is fetched.
    fn columns(dialect: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Owned(format!(
            "id, event_key, {}, claimed_until",
            dialect.payload_bytes
        ))
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        Ok(RowHead {
            id: row.int(0, "id")?,
            key: row.opt_text(1),
            bytes: row
                .opt_int(2)
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0),
            claimed_until: row.opt_int(3),
        })
    }
}

/// The id of a due row, for the probe that only asks whether there is one.
struct DueId;

impl FromRow for DueId {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[Column::Int];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("id")
    }

    fn from_row(_: Row) -> Result<Self, Error> {
        Ok(DueId)
    }
}

/// An unpublished row of a key, for the per-key order check.
struct KeyedRow(i64, String);

impl FromRow for KeyedRow {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[Column::Int, Column::Text];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("id, event_key")
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        Ok(KeyedRow(row.int(0, "id")?, row.text(1, "event_key")?))
    }
}

/// A key with a parked row or a row waiting for a later attempt.
struct HeldKey(String);

impl FromRow for HeldKey {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[Column::Text];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("event_key")
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        Ok(HeldKey(row.text(0, "event_key")?))
    }
}

/// A claimed row read in full: a message to publish, or a row that cannot
/// be read as one (id, reason), which the relay parks.
enum ClaimedRow {
    Message(OutboxMessage),
    Undecodable(i64, String),
}

impl FromRow for ClaimedRow {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[
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

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed(
            "id, event_id, event_type, destination, event_key, headers, content, content_type, \
             attempts, create_time",
        )
    }

    /// Each row on its own: a row written by hand, by a trigger or by
    /// another tool that does not hold a message (headers that are not
    /// JSON, a NULL where a value is needed) is set apart with the reason;
    /// only a row without an id is an error.
    fn from_row(row: Row) -> Result<Self, Error> {
        let id = row.int(0, "id")?;
        Ok(match message(row) {
            Ok(m) => ClaimedRow::Message(m),
            Err(error) => {
                ClaimedRow::Undecodable(id, format!("the row cannot be read as an event: {error}"))
            }
        })
    }
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

/// Rows a claim read: those to publish, in id order, and those it cannot
/// read as a message (`id`, reason), which the relay parks.
#[derive(Debug, Default)]
pub(crate) struct ClaimedRows {
    pub(crate) messages: Vec<OutboxMessage>,
    pub(crate) undecodable: Vec<(i64, String)>,
}

/// Rows a relay may claim: keyless ones (`partition_no` -1, also every row
/// written before schema version 4) and those of its share of the key
/// partitions.
fn in_share(q: Query<'_>, (from, to): Share) -> Query<'_> {
    q.sql("(partition_no < 0 OR (partition_no >= ")
        .bind(from)
        .sql(" AND partition_no < ")
        .bind(to)
        .sql("))")
}

/// Due rows not leased: the condition of the claim and the due probe.
fn due_and_free(q: Query<'_>, now: i64) -> Query<'_> {
    q.sql(" AND next_attempt_at <= ")
        .bind(now)
        .sql(" AND (claimed_until IS NULL OR claimed_until < ")
        .bind(now)
        .sql(")")
}

impl<DB: Backend> OutboxStore<DB> {
    /// The claim: due rows not leased, in the share, in id order; with
    /// `after`, only those past an id and not of the given keys. On the
    /// index of rows by state and id: with `ORDER BY id LIMIT` and
    /// statistics from a table of waiting rows, SQLite (and MySQL) would
    /// otherwise walk the table from its first row, through every
    /// published one.
    fn claim_query<'a>(
        &self,
        now: i64,
        share: Share,
        after: Option<(i64, &'a [&'a str])>,
        limit: u32,
    ) -> Query<'a> {
        let (d, t) = (DB::DIALECT, self.table());
        let q = Query::new(d)
            .sql("SELECT ")
            .columns::<RowHead>(t)
            .sql(&format!(
                " FROM {t} {} WHERE process = '{}'",
                (d.use_index)(t, "process"),
                OutboxState::New.as_sql()
            ))
            .with(|q| due_and_free(q, now))
            .sql(" AND ")
            .with(|q| in_share(q, share))
            .sql(" ");
        let q = match after {
            None => q,
            Some((id, [])) => q.sql("AND id > ").bind(id).sql(" "),
            Some((id, keys)) => q
                .sql("AND id > ")
                .bind(id)
                .sql(" AND (event_key IS NULL OR event_key NOT IN (")
                .list(keys)
                .sql(")) "),
        };
        q.sql("ORDER BY id LIMIT ")
            .bind(i64::from(limit))
            .sql(d.skip_locked)
    }

    fn due_probe_query(&self, now: i64, share: Share) -> Query<'static> {
        let (d, t) = (DB::DIALECT, self.table());
        Query::new(d)
            .sql("SELECT ")
            .columns::<DueId>(t)
            .sql(&format!(
                " FROM {t} {} WHERE process = '{}'",
                (d.use_index)(t, "process"),
                OutboxState::New.as_sql()
            ))
            .with(|q| due_and_free(q, now))
            .sql(" AND ")
            .with(|q| in_share(q, share))
            .sql(" ORDER BY id LIMIT 1")
    }

    /// On the lease index: with statistics that saw only unleased rows
    /// (all NULL), SQLite would otherwise scan the whole table.
    fn handed_off_query<'a>(&self, token: &'a str, now: i64, limit: i64) -> Query<'a> {
        let (d, t) = (DB::DIALECT, self.table());
        Query::new(d)
            .sql("SELECT ")
            .columns::<RowHead>(t)
            .sql(&format!(
                " FROM {t} {} WHERE claimed_by = ",
                (d.use_index)(t, "claim")
            ))
            .bind(token)
            .sql(&format!(
                " AND process = '{}' AND claimed_until > ",
                OutboxState::New.as_sql()
            ))
            .bind(now)
            .sql(" ORDER BY id LIMIT ")
            .bind(limit)
    }

    /// Unpublished rows of `keys` up to id `max_id`, to check per-key order.
    /// The state is named twice: `<>` matches the partial index of
    /// unpublished rows (PostgreSQL, SQLite), and the `IN` list of the other
    /// states keeps MySQL on ranges of its index: with `<>` alone and a
    /// hundred keys, MariaDB scans the whole index.
    fn key_rows_query<'a>(&self, max_id: i64, keys: &'a [&'a str]) -> Query<'a> {
        let (d, t) = (DB::DIALECT, self.table());
        let (new, published, failed) = (
            OutboxState::New.as_sql(),
            OutboxState::Published.as_sql(),
            OutboxState::Failed.as_sql(),
        );
        Query::new(d)
            .sql("SELECT ")
            .columns::<KeyedRow>(t)
            .sql(&format!(
                " FROM {t} {} WHERE process <> '{published}' \
                 AND process IN ('{new}', '{failed}') AND id <= ",
                (d.use_index)(t, "open_key"),
            ))
            .bind(max_id)
            .sql(" AND event_key IN (")
            .list(keys)
            .sql(") ORDER BY id")
    }

    /// The claim's text, as the database receives it (for `EXPLAIN`).
    pub(crate) fn claim_text(&self) -> String {
        self.claim_query(0, (0, 0), None, 0).into_text()
    }

    /// The due probe's text, as the database receives it.
    pub(crate) fn due_probe_text(&self) -> String {
        self.due_probe_query(0, (0, 0)).into_text()
    }

    /// The hand-off read's text, as the database receives it.
    pub(crate) fn handed_off_text(&self) -> String {
        self.handed_off_query("", 0, 0).into_text()
    }

    /// The per-key order check's text for `keys` keys.
    pub(crate) fn key_rows_text(&self, keys: usize) -> String {
        let keys = vec![""; keys];
        self.key_rows_query(0, &keys).into_text()
    }

    /// `true` if some row is due and not leased: a read that takes no lock.
    pub(crate) async fn any_due(&self, now: i64, share: Share) -> Result<bool, Error> {
        let mut conn = self.acquire().await?;
        let query = self.due_probe_query(now, share);
        let due: Vec<DueId> = fetch::<DB, _>(&mut conn, &query, "looking for due rows").await?;
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
        let query = self.claim_query(now, share, None, limit);
        fetch::<DB, _>(conn, &query, "selecting due rows").await
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
        let query = self.claim_query(now, share, Some((after, excluded)), limit);
        fetch::<DB, _>(conn, &query, "selecting due rows").await
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
        let query = self.handed_off_query(token, now, limit);
        fetch::<DB, _>(conn, &query, "reading handed-off rows").await
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
            let query = Query::new(DB::DIALECT)
                .sql(&format!("UPDATE {} SET claimed_until = ", self.table()))
                .bind(until)
                .sql(" WHERE claimed_by = ")
                .bind(token)
                .sql(&format!(
                    " AND process = '{}' AND claimed_until > ",
                    OutboxState::New.as_sql()
                ))
                .bind(now)
                .sql(" AND id IN (")
                .list(chunk)
                .sql(")");
            n += exec::<DB>(&mut *conn, &query, "renewing handed-off rows").await?;
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
            let query = Query::new(DB::DIALECT)
                .sql("SELECT ")
                .columns::<ClaimedRow>(self.table())
                .sql(&format!(" FROM {} WHERE id IN (", self.table()))
                .list(chunk)
                .sql(") ORDER BY id");
            let rows = fetch::<DB, ClaimedRow>(&mut *conn, &query, "reading the rows of a batch");
            for row in rows.await? {
                match row {
                    ClaimedRow::Message(m) => all.messages.push(m),
                    ClaimedRow::Undecodable(id, reason) => all.undecodable.push((id, reason)),
                }
            }
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
        let query = self.key_rows_query(max_id, keys);
        let rows = fetch::<DB, KeyedRow>(conn, &query, "checking key order").await?;
        Ok(rows
            .into_iter()
            .map(|KeyedRow(id, key)| (id, key))
            .collect())
    }

    /// Of `keys`, those with a parked row or a row not due before `now`.
    pub(crate) async fn held_keys(
        &self,
        conn: &mut DB::Connection,
        now: i64,
        keys: &[&str],
    ) -> Result<Vec<String>, Error> {
        let (new, failed) = (OutboxState::New.as_sql(), OutboxState::Failed.as_sql());
        let query = Query::new(DB::DIALECT)
            .sql("SELECT DISTINCT ")
            .columns::<HeldKey>(self.table())
            .sql(&format!(
                " FROM {} WHERE process IN ('{new}', '{failed}') \
                 AND (process = '{failed}' OR next_attempt_at > ",
                self.table()
            ))
            .bind(now)
            .sql(") AND event_key IN (")
            .list(keys)
            .sql(")");
        let rows = fetch::<DB, HeldKey>(conn, &query, "reading held keys").await?;
        Ok(rows.into_iter().map(|HeldKey(key)| key).collect())
    }

    /// Leases the rows `ids` to `token` until `until`.
    pub(crate) async fn lease(
        &self,
        conn: &mut DB::Connection,
        token: &str,
        until: i64,
        ids: &[i64],
    ) -> Result<(), Error> {
        let query = Query::new(DB::DIALECT)
            .sql(&format!("UPDATE {} SET claimed_by = ", self.table()))
            .bind(token)
            .sql(", claimed_until = ")
            .bind(until)
            .sql(" WHERE id IN (")
            .list(ids)
            .sql(")");
        exec::<DB>(conn, &query, "claiming rows").await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::assert_selects_what_it_decodes;

    #[test]
    fn the_claim_row_types_select_as_many_columns_as_they_decode() {
        assert_selects_what_it_decodes::<RowHead>();
        assert_selects_what_it_decodes::<DueId>();
        assert_selects_what_it_decodes::<KeyedRow>();
        assert_selects_what_it_decodes::<HeldKey>();
        assert_selects_what_it_decodes::<ClaimedRow>();
    }
}
