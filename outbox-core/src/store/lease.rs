//! Every statement on the shared lease table, `outbox_lease`: named,
//! expiring leases that make a periodic job (such as retention) run in one
//! process at a time, and the relays' memberships of a table (see
//! `relay/share.rs`). The table is created with the schema-version table
//! (`schema.rs`).

use std::borrow::Cow;

use sqlx::Pool;

use super::{exec, fetch};
use crate::Error;
use crate::backend::{Backend, Column, Dialect, FromRow, Query, Row};

/// The name of a lease.
struct LeaseName(String);

impl FromRow for LeaseName {
    const TABLE: &'static str = "outbox_lease";
    const TYPES: &'static [Column] = &[Column::Text];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("name")
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        Ok(LeaseName(row.text(0, "name")?))
    }
}

/// The leases of one database, on its pool.
#[derive(Debug)]
pub(crate) struct LeaseStore<'p, DB: Backend> {
    pool: &'p Pool<DB>,
}

impl<'p, DB: Backend> LeaseStore<'p, DB> {
    pub(crate) fn new(pool: &'p Pool<DB>) -> LeaseStore<'p, DB> {
        LeaseStore { pool }
    }

    /// Takes or renews the lease `name` for `holder` until `until` (ms).
    /// `true` when this holder has it now.
    pub(crate) async fn take(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, Error> {
        let mut conn = crate::backend::acquire(self.pool).await?;
        let create = Query::new(DB::DIALECT).insert_ignore(
            "outbox_lease",
            "name, holder, until_time",
            |q| q.bind(name).sql(", NULL, 0"),
        );
        exec::<DB>(&mut conn, &create, "creating a lease").await?;
        let take = Query::new(DB::DIALECT)
            .sql("UPDATE outbox_lease SET holder = ")
            .bind(holder)
            .sql(", until_time = ")
            .bind(until)
            .sql(" WHERE name = ")
            .bind(name)
            .sql(" AND (until_time < ")
            .bind(now)
            .sql(" OR holder = ")
            .bind(holder)
            .sql(")");
        let changed = exec::<DB>(&mut conn, &take, "taking a lease").await?;
        Ok(changed == 1)
    }

    /// The names in `[from, to)` of the leases that hold past `now`, in order.
    pub(crate) async fn held_in_range(
        &self,
        (from, to): (&str, &str),
        now: i64,
    ) -> Result<Vec<String>, Error> {
        let query = Query::new(DB::DIALECT)
            .sql("SELECT ")
            .columns::<LeaseName>("outbox_lease")
            .sql(" FROM outbox_lease WHERE name >= ")
            .bind(from)
            .sql(" AND name < ")
            .bind(to)
            .sql(" AND until_time > ")
            .bind(now)
            .sql(" ORDER BY name");
        let mut conn = crate::backend::acquire(self.pool).await?;
        let names = fetch::<DB, LeaseName>(&mut conn, &query, "reading the relays of the table");
        Ok(names.await?.into_iter().map(|LeaseName(n)| n).collect())
    }

    /// Drops the leases in `[from, to)` that ran out before `before`.
    pub(crate) async fn purge_range(
        &self,
        (from, to): (&str, &str),
        before: i64,
    ) -> Result<(), Error> {
        let query = Query::new(DB::DIALECT)
            .sql("DELETE FROM outbox_lease WHERE name >= ")
            .bind(from)
            .sql(" AND name < ")
            .bind(to)
            .sql(" AND until_time < ")
            .bind(before);
        let mut conn = crate::backend::acquire(self.pool).await?;
        exec::<DB>(&mut conn, &query, "dropping old relay memberships").await?;
        Ok(())
    }

    /// Drops the lease `name`, whoever holds it.
    pub(crate) async fn drop_lease(&self, name: &str) -> Result<(), Error> {
        let query = Query::new(DB::DIALECT)
            .sql("DELETE FROM outbox_lease WHERE name = ")
            .bind(name);
        let mut conn = crate::backend::acquire(self.pool).await?;
        exec::<DB>(&mut conn, &query, "leaving the relays of the table").await?;
        Ok(())
    }
}
