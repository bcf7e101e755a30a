//! The operator's calls on an outbox table: retention, the backlog and
//! counts, parked rows (listed, replayed, discarded), the state of given
//! events, and the rows as appended (the test kit's read).

use std::borrow::Cow;
use std::collections::HashMap;

use super::{ID_CHUNK, OutboxStore};
use crate::Error;
use crate::backend::{Backend, Column, Dialect, FromRow, Query, Row};
use crate::rows::{OutboxCounts, ParkedEvent};
use crate::store::{OutboxState, exec, fetch, fetch_first};

/// Waiting rows and the create time of the oldest. The oldest by id (the
/// first one the relay takes), read on the index instead of every waiting
/// row's time.
struct Backlog {
    pending: u64,
    oldest: Option<i64>,
}

impl FromRow for Backlog {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[Column::Int, Column::Int];

    fn columns(_: &Dialect, table: &str) -> Cow<'static, str> {
        Cow::Owned(format!(
            "COUNT(*), (SELECT create_time FROM {table} WHERE process = '{}' \
             ORDER BY id LIMIT 1)",
            OutboxState::New.as_sql()
        ))
    }

    fn from_row(row: Row) -> Result<Self, Error> {
        Ok(Backlog {
            pending: row.count(0, "COUNT(*)")?,
            oldest: row.opt_int(1),
        })
    }
}

/// A count of rows.
struct Count(u64);

impl FromRow for Count {
    const TABLE: &'static str = "outbox";
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
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[Column::Text, Column::Int];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("process, COUNT(*)")
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        Ok(StateCount {
            state: row.text(0, "process")?,
            n: row.count(1, "COUNT(*)")?,
        })
    }
}

/// A parked row without its payload, which is read apart.
impl FromRow for ParkedEvent {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[
        Column::Text,
        Column::Text,
        Column::Text,
        Column::Text,
        Column::Int,
        Column::Text,
        Column::Int,
        Column::Int,
    ];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed(
            "event_id, event_type, destination, event_key, attempts, last_error, \
             create_time, update_time",
        )
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
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
    }
}

/// The payload of an event.
struct Payload {
    event_id: String,
    content: Vec<u8>,
    content_type: String,
}

impl FromRow for Payload {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[Column::Text, Column::Bytes, Column::Text];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("event_id, content, content_type")
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        Ok(Payload {
            event_id: row.text(0, "event_id")?,
            content: row.bytes(1, "content")?,
            content_type: row.text(2, "content_type")?,
        })
    }
}

/// The state of an event and its last error.
struct EventState {
    event_id: String,
    state: OutboxState,
    last_error: Option<String>,
}

impl FromRow for EventState {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[Column::Text, Column::Text, Column::Text];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("event_id, process, last_error")
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        let state = row.text(1, "process")?;
        let state = OutboxState::from_sql(&state).ok_or(Error::Row {
            table: "outbox",
            column: "process",
            reason: "not NEW, PUBLISHED or FAILED",
        })?;
        Ok(EventState {
            event_id: row.text(0, "event_id")?,
            state,
            last_error: row.opt_text(2),
        })
    }
}

/// An event as a producer appended it.
#[cfg(feature = "testing")]
pub(crate) struct AppendedRow {
    pub(crate) event_id: String,
    pub(crate) event_type: String,
    pub(crate) destination: String,
    pub(crate) key: Option<String>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) content: Vec<u8>,
    pub(crate) content_type: String,
    pub(crate) create_time: i64,
}

#[cfg(feature = "testing")]
impl FromRow for AppendedRow {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[
        Column::Text,
        Column::Text,
        Column::Text,
        Column::Text,
        Column::Text,
        Column::Bytes,
        Column::Text,
        Column::Int,
    ];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed(
            "event_id, event_type, destination, event_key, headers, content, content_type, \
             create_time",
        )
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        let headers = row.text(4, "headers")?;
        Ok(AppendedRow {
            event_id: row.text(0, "event_id")?,
            event_type: row.text(1, "event_type")?,
            destination: row.text(2, "destination")?,
            key: row.opt_text(3),
            headers: serde_json::from_str(&headers).map_err(|_| Error::Row {
                table: "outbox",
                column: "headers",
                reason: "not a JSON array of [name, value] pairs",
            })?,
            content: row.bytes(5, "content")?,
            content_type: row.text(6, "content_type")?,
            create_time: row.int(7, "create_time")?,
        })
    }
}

/// Every row of outbox table `table` as appended, in id order, read on
/// `conn` (the test kit's read, which may run in the caller's transaction).
#[cfg(feature = "testing")]
pub(crate) async fn appended<DB: Backend>(
    conn: &mut DB::Connection,
    table: &crate::names::TableName,
) -> Result<Vec<AppendedRow>, Error> {
    let query = Query::new(DB::DIALECT)
        .sql("SELECT ")
        .columns::<AppendedRow>(table.as_str())
        .sql(&format!(" FROM {table} ORDER BY id"));
    fetch::<DB, _>(conn, &query, "reading the outbox").await
}

impl<DB: Backend> OutboxStore<DB> {
    /// Deletes up to `limit` rows published before `before`; returns how many.
    pub(crate) async fn delete_published(&self, before: i64, limit: u32) -> Result<u64, Error> {
        let published = OutboxState::Published.as_sql();
        let query = Query::new(DB::DIALECT).delete_limited(
            self.table(),
            |q| {
                q.sql(&format!("process = '{published}' AND published_time < "))
                    .bind(before)
            },
            "published_time",
            i64::from(limit),
        );
        let mut conn = self.acquire().await?;
        exec::<DB>(&mut conn, &query, "deleting published rows").await
    }

    /// Waiting rows, the create time of the oldest, and parked rows.
    pub(crate) async fn backlog(&self) -> Result<(u64, Option<i64>, u64), Error> {
        let t = self.table();
        let query = Query::new(DB::DIALECT)
            .sql("SELECT ")
            .columns::<Backlog>(t)
            .sql(&format!(
                " FROM {t} WHERE process = '{}'",
                OutboxState::New.as_sql()
            ));
        let mut conn = self.acquire().await?;
        let backlog = fetch_first::<DB, Backlog>(&mut conn, &query, "reading the backlog").await?;
        let (pending, oldest) = backlog.map_or((0, None), |b| (b.pending, b.oldest));
        let query = Query::new(DB::DIALECT)
            .sql("SELECT ")
            .columns::<Count>(t)
            .sql(&format!(
                " FROM {t} WHERE process = '{}'",
                OutboxState::Failed.as_sql()
            ));
        let parked = fetch_first::<DB, Count>(&mut conn, &query, "counting parked rows").await?;
        Ok((pending, oldest, parked.map_or(0, |Count(n)| n)))
    }

    /// Rows per state.
    pub(crate) async fn counts(&self) -> Result<OutboxCounts, Error> {
        let t = self.table();
        let query = Query::new(DB::DIALECT)
            .sql("SELECT ")
            .columns::<StateCount>(t)
            .sql(&format!(" FROM {t} GROUP BY process"));
        let mut conn = self.acquire().await?;
        let mut counts = OutboxCounts::default();
        for row in fetch::<DB, StateCount>(&mut conn, &query, "counting rows").await? {
            counts.add(OutboxState::from_sql(&row.state), row.n);
        }
        Ok(counts)
    }

    /// Up to `limit` parked rows, oldest first.
    pub(crate) async fn parked(&self, limit: u32) -> Result<Vec<ParkedEvent>, Error> {
        let t = self.table();
        let query = Query::new(DB::DIALECT)
            .sql("SELECT ")
            .columns::<ParkedEvent>(t)
            .sql(&format!(
                " FROM {t} WHERE process = '{}' ORDER BY id LIMIT ",
                OutboxState::Failed.as_sql()
            ))
            .bind(i64::from(limit));
        let mut conn = self.acquire().await?;
        let mut parked = fetch::<DB, _>(&mut conn, &query, "listing parked rows").await?;
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
            let query = Query::new(DB::DIALECT)
                .sql("SELECT ")
                .columns::<Payload>(self.table())
                .sql(&format!(" FROM {} WHERE event_id IN (", self.table()))
                .list(chunk.iter().map(|e| e.event_id.as_str()))
                .sql(")");
            let rows = fetch::<DB, Payload>(&mut *conn, &query, "reading parked payloads").await?;
            let mut payloads: HashMap<String, (Vec<u8>, String)> = rows
                .into_iter()
                .map(|p| (p.event_id, (p.content, p.content_type)))
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

    /// The start of a replay: parked rows back to `NEW` with a fresh budget,
    /// due at `now`, up to the condition on their state.
    fn replay_query(&self, now: i64) -> Query<'static> {
        Query::new(DB::DIALECT)
            .sql(&format!(
                "UPDATE {} SET process = '{}', attempts = 0, next_attempt_at = ",
                self.table(),
                OutboxState::New.as_sql()
            ))
            .bind(now)
            .sql(", update_time = ")
            .bind(now)
            .sql(&format!(
                ", claimed_by = NULL, claimed_until = NULL WHERE process = '{}'",
                OutboxState::Failed.as_sql()
            ))
    }

    /// Puts the parked row `event_id` (or every parked row) back to `NEW`
    /// with a fresh budget; returns how many.
    pub(crate) async fn replay(&self, event_id: Option<&str>, now: i64) -> Result<u64, Error> {
        let query = match event_id {
            Some(id) => self.replay_query(now).sql(" AND event_id = ").bind(id),
            None => self.replay_query(now),
        };
        let mut conn = self.acquire().await?;
        exec::<DB>(&mut conn, &query, "replaying parked rows").await
    }

    /// Puts the parked rows among `event_ids` back to `NEW` with a fresh
    /// budget, [`ID_CHUNK`] ids per statement; returns how many changed.
    pub(crate) async fn replay_ids(&self, event_ids: &[&str], now: i64) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let mut n = 0;
        for chunk in event_ids.chunks(ID_CHUNK) {
            let query = self
                .replay_query(now)
                .sql(" AND event_id IN (")
                .list(chunk)
                .sql(")");
            n += exec::<DB>(&mut conn, &query, "replaying parked rows").await?;
        }
        Ok(n)
    }

    /// Deletes the parked rows among `event_ids`, [`ID_CHUNK`] ids per
    /// statement; returns how many went. Rows in any other state stay.
    pub(crate) async fn discard_ids(&self, event_ids: &[&str]) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let mut n = 0;
        for chunk in event_ids.chunks(ID_CHUNK) {
            let query = Query::new(DB::DIALECT)
                .sql(&format!(
                    "DELETE FROM {} WHERE process = '{}' AND event_id IN (",
                    self.table(),
                    OutboxState::Failed.as_sql()
                ))
                .list(chunk)
                .sql(")");
            n += exec::<DB>(&mut conn, &query, "discarding parked rows").await?;
        }
        Ok(n)
    }

    /// The state and last error of the rows among `event_ids` (on the
    /// unique index of event ids), [`ID_CHUNK`] ids per statement; ids
    /// without a row are left out. What
    /// [`Outbox::wait_published`](crate::Outbox::wait_published) polls.
    pub(crate) async fn states(
        &self,
        event_ids: &[&str],
    ) -> Result<Vec<(String, OutboxState, Option<String>)>, Error> {
        let mut conn = self.acquire().await?;
        let mut out = Vec::with_capacity(event_ids.len());
        for chunk in event_ids.chunks(ID_CHUNK) {
            let query = Query::new(DB::DIALECT)
                .sql("SELECT ")
                .columns::<EventState>(self.table())
                .sql(&format!(" FROM {} WHERE event_id IN (", self.table()))
                .list(chunk)
                .sql(")");
            let rows = fetch::<DB, EventState>(&mut conn, &query, "reading the state of events");
            out.extend(
                rows.await?
                    .into_iter()
                    .map(|s| (s.event_id, s.state, s.last_error)),
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::assert_selects_what_it_decodes;

    #[test]
    fn the_admin_row_types_select_as_many_columns_as_they_decode() {
        assert_selects_what_it_decodes::<Backlog>();
        assert_selects_what_it_decodes::<Count>();
        assert_selects_what_it_decodes::<StateCount>();
        assert_selects_what_it_decodes::<ParkedEvent>();
        assert_selects_what_it_decodes::<Payload>();
        assert_selects_what_it_decodes::<EventState>();
        #[cfg(feature = "testing")]
        assert_selects_what_it_decodes::<AppendedRow>();
    }
}
