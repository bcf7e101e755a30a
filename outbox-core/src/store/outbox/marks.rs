//! What the relay records after a publish: rows marked published, given
//! back, rejected (due again or parked), parked as unreadable, and a refused
//! destination's rows deferred.

use super::{ID_CHUNK, OutboxStore};
use crate::Error;
use crate::backend::{Backend, Query};
use crate::store::{OutboxState, exec};

/// Which of the two statements records a rejection. Each decides in its
/// `WHERE` (which reads the row as it was before the `SET`): the row is
/// parked (its budget spent) or due again later; which one changed the row
/// says what happened, without a second read.
#[derive(Debug, Clone, Copy)]
enum Rejection {
    Park,
    Retry,
}

/// The lease given back: no holder, no end.
const UNLEASED: &str = "claimed_by = NULL, claimed_until = NULL";

impl<DB: Backend> OutboxStore<DB> {
    /// Marks the rows `ids` held under `token` published; returns how many
    /// changed.
    pub(crate) async fn mark_published(
        &self,
        conn: &mut DB::Connection,
        token: &str,
        ids: &[i64],
        now: i64,
    ) -> Result<u64, Error> {
        let (new, published) = (OutboxState::New.as_sql(), OutboxState::Published.as_sql());
        let mut n = 0;
        for chunk in ids.chunks(ID_CHUNK) {
            let query = Query::new(DB::DIALECT)
                .sql(&format!(
                    "UPDATE {} SET process = '{published}', published_time = ",
                    self.table()
                ))
                .bind(now)
                .sql(", update_time = ")
                .bind(now)
                .sql(&format!(", {UNLEASED} WHERE claimed_by = "))
                .bind(token)
                .sql(&format!(" AND process = '{new}' AND id IN ("))
                .list(chunk)
                .sql(")");
            n += exec::<DB>(&mut *conn, &query, "marking rows published").await?;
        }
        Ok(n)
    }

    /// The start of a give-back: no lease, `error` kept as the last error
    /// (`None` keeps the one the row had), up to `WHERE claimed_by = token`.
    fn release_query<'a>(&self, token: &'a str, error: Option<&'a str>, now: i64) -> Query<'a> {
        Query::new(DB::DIALECT)
            .sql(&format!(
                "UPDATE {} SET {UNLEASED}, last_error = COALESCE(",
                self.table()
            ))
            .bind(error)
            .sql(", last_error), update_time = ")
            .bind(now)
            .sql(" WHERE claimed_by = ")
            .bind(token)
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
            let query = self
                .release_query(token, error, now)
                .sql(" AND id IN (")
                .list(chunk)
                .sql(")");
            exec::<DB>(&mut *conn, &query, "giving back rows").await?;
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
        let query = self.release_query(token, error, now);
        exec::<DB>(conn, &query, "releasing a claim").await?;
        Ok(())
    }

    /// Defers the waiting rows of `destination` that are free or held under
    /// `token` until `until`, keeping `error` as their last error; their
    /// attempts stay as they were (a destination the broker refuses to the
    /// relay's user; rows other relays hold are theirs to settle). Returns
    /// how many rows changed.
    pub(crate) async fn defer_destination(
        &self,
        token: &str,
        destination: &str,
        until: i64,
        error: &str,
        now: i64,
    ) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let query = Query::new(DB::DIALECT)
            .sql(&format!("UPDATE {} SET next_attempt_at = ", self.table()))
            .bind(until)
            .sql(", last_error = ")
            .bind(error)
            .sql(", update_time = ")
            .bind(now)
            .sql(&format!(
                ", {UNLEASED} WHERE process = '{}' AND destination = ",
                OutboxState::New.as_sql()
            ))
            .bind(destination)
            .sql(" AND next_attempt_at < ")
            .bind(until)
            .sql(" AND (claimed_until IS NULL OR claimed_until < ")
            .bind(now)
            .sql(" OR claimed_by = ")
            .bind(token)
            .sql(")");
        exec::<DB>(&mut conn, &query, "deferring a refused destination").await
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
        let (next, rejection) = (next_attempt_at, Rejection::Park);
        self.record_rejection(rejection, token, id, max_attempts, error, (next, now))
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
        let (next, rejection) = (next_attempt_at, Rejection::Retry);
        self.record_rejection(rejection, token, id, max_attempts, error, (next, now))
            .await
    }

    /// Runs the statement of `rejection`; `(next, now)` are the next attempt
    /// time and the update time.
    async fn record_rejection(
        &self,
        rejection: Rejection,
        token: &str,
        id: i64,
        max_attempts: u32,
        error: &str,
        (next_attempt_at, now): (i64, i64),
    ) -> Result<bool, Error> {
        let failed = OutboxState::Failed.as_sql();
        // `process` first: MySQL evaluates SET left to right with new values.
        let (park, spent) = match rejection {
            Rejection::Park => (format!("process = '{failed}', "), ">="),
            Rejection::Retry => (String::new(), "<"),
        };
        let query = Query::new(DB::DIALECT)
            .sql(&format!(
                "UPDATE {} SET {park}attempts = attempts + 1, last_error = ",
                self.table()
            ))
            .bind(error)
            .sql(", next_attempt_at = ")
            .bind(next_attempt_at)
            .sql(", update_time = ")
            .bind(now)
            .sql(&format!(", {UNLEASED} WHERE id = "))
            .bind(id)
            .sql(" AND claimed_by = ")
            .bind(token)
            .sql(&format!(
                " AND process = '{}' AND attempts + 1 {spent} ",
                OutboxState::New.as_sql()
            ))
            .bind(i64::from(max_attempts));
        let mut conn = self.acquire().await?;
        let changed = exec::<DB>(&mut conn, &query, "recording a rejection").await?;
        Ok(changed > 0)
    }

    /// Parks the waiting row `id`, which cannot be read as an event, with
    /// `reason`; `true` if it was still waiting. Per-key order then holds
    /// its key's later rows.
    pub(crate) async fn park_undecodable(
        &self,
        conn: &mut DB::Connection,
        id: i64,
        reason: &str,
        now: i64,
    ) -> Result<bool, Error> {
        let query = Query::new(DB::DIALECT)
            .sql(&format!(
                "UPDATE {} SET process = '{}', attempts = attempts + 1, last_error = ",
                self.table(),
                OutboxState::Failed.as_sql()
            ))
            .bind(reason)
            .sql(", update_time = ")
            .bind(now)
            .sql(&format!(", {UNLEASED} WHERE id = "))
            .bind(id)
            .sql(&format!(" AND process = '{}'", OutboxState::New.as_sql()));
        let changed = exec::<DB>(conn, &query, "parking a row that cannot be read").await?;
        Ok(changed > 0)
    }
}
