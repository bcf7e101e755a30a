//! Every statement on an outbox table, in rooms: the relay's reads and
//! leases (`claim`), what the relay records after a publish (`marks`), the
//! operator's calls (`admin`) and the producer's insert (`append`). Here:
//! the store itself, its migration and the stored headers' two shapes.

mod admin;
mod append;
mod claim;
mod marks;

#[cfg(feature = "testing")]
pub(crate) use admin::appended;
pub(crate) use append::insert;
pub(crate) use claim::RowHead;

use std::borrow::Cow;

use sqlx::{Pool, Transaction};

use crate::backend::{Backend, Column, Dialect, FromRow, Query, Row, ddl};
use crate::names::TableName;
use crate::store::{exec, fetch};
use crate::{Error, schema};

/// Key partitions `[from, to)` a relay claims from (keyless rows it always may).
pub(crate) type Share = (i64, i64);

/// Ids per statement when rows are marked, given back or read by id.
const ID_CHUNK: usize = 500;

/// Rows per pass of the rewrite of headers stored before schema version 3.
const REWRITE_CHUNK: i64 = 500;

/// The statements of one outbox table, on its pool.
#[derive(Debug)]
pub(crate) struct OutboxStore<DB: Backend> {
    pool: Pool<DB>,
    table: TableName,
}

impl<DB: Backend> Clone for OutboxStore<DB> {
    fn clone(&self) -> Self {
        OutboxStore {
            pool: self.pool.clone(),
            table: self.table.clone(),
        }
    }
}

/// A row whose headers may still be a JSON object (before schema version 3).
struct LegacyHeaders {
    id: i64,
    headers: String,
}

impl FromRow for LegacyHeaders {
    const TABLE: &'static str = "outbox";
    const TYPES: &'static [Column] = &[Column::Int, Column::Text];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("id, headers")
    }

    fn from_row(mut row: Row) -> Result<Self, Error> {
        Ok(LegacyHeaders {
            id: row.int(0, "id")?,
            headers: row.text(1, "headers")?,
        })
    }
}

impl<DB: Backend> OutboxStore<DB> {
    pub(crate) fn new(pool: Pool<DB>, table: TableName) -> OutboxStore<DB> {
        OutboxStore { pool, table }
    }

    pub(crate) fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The table, validated, for producers that append through the store's
    /// [`insert`].
    pub(crate) fn table_name(&self) -> &TableName {
        &self.table
    }

    pub(crate) fn table(&self) -> &str {
        self.table.as_str()
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
        let steps = ddl::outbox_migrations(DB::DIALECT, self.table());
        schema::migrate(&self.pool, self.table(), &steps, timeout).await
    }

    /// Rewrites headers stored as a JSON object into `[name, value]` pairs,
    /// 500 rows at a time. Each update names the old text, so two processes
    /// doing it at once do no harm; a row whose headers are not a JSON
    /// object of strings is left as it is (and read as such).
    async fn rewrite_legacy_headers(&self) -> Result<(), Error> {
        let t = self.table();
        let mut after = 0i64;
        loop {
            // One transaction per 500 rows: one commit each, not one per row.
            let mut conn = DB::begin_write(&self.pool)
                .await
                .map_err(Error::db("beginning a headers rewrite"))?;
            let query = Query::new(DB::DIALECT)
                .sql("SELECT ")
                .columns::<LegacyHeaders>(t)
                .sql(&format!(" FROM {t} WHERE id > "))
                .bind(after)
                .sql(" AND headers LIKE '{%' ORDER BY id LIMIT ")
                .bind(REWRITE_CHUNK);
            let rows: Vec<LegacyHeaders> =
                fetch::<DB, _>(&mut conn, &query, "reading headers to rewrite").await?;
            let Some(last) = rows.last().map(|row| row.id) else {
                conn.commit()
                    .await
                    .map_err(Error::db("ending a headers rewrite"))?;
                return Ok(());
            };
            for LegacyHeaders { id, headers: old } in &rows {
                // The relay's reader: a row it cannot read is left as it is.
                let Ok(pairs) = headers_of(old) else {
                    continue;
                };
                let new = serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned());
                let query = Query::new(DB::DIALECT)
                    .sql(&format!("UPDATE {t} SET headers = "))
                    .bind(new.as_str())
                    .sql(" WHERE id = ")
                    .bind(*id)
                    .sql(" AND headers = ")
                    .bind(old.as_str());
                exec::<DB>(&mut conn, &query, "rewriting headers").await?;
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
            let query = Query::fixed(DB::DIALECT, relaxed);
            exec::<DB>(&mut tx, &query, "relaxing a relay transaction's commit").await?;
        }
        Ok(tx)
    }
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
