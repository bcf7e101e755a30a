//! The operator's calls on one consumer's inbox rows: counts, parked rows
//! (listed, replayed, discarded), retention, and the consumers of a table.

use std::borrow::Cow;

use sqlx::Pool;

use super::{ID_CHUNK, InboxStore};
use crate::Error;
use crate::backend::{Backend, Column, Dialect, FromRow, Query, Row};
use crate::names::TableName;
use crate::rows::{InboxCounts, ParkedDelivery};
use crate::store::{InboxState, exec, fetch};

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

impl<DB: Backend> InboxStore<DB> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::assert_selects_what_it_decodes;

    #[test]
    fn the_admin_row_types_select_as_many_columns_as_they_decode() {
        assert_selects_what_it_decodes::<StateCount>();
        assert_selects_what_it_decodes::<ParkedDelivery>();
        assert_selects_what_it_decodes::<ConsumerName>();
    }
}
