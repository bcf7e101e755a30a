//! The database side: one [`Backend`] implementation per supported database.
//!
//! The relay and the inbox are written once, against this small interface:
//! run a [`Query`] (a statement built with its bound [`Value`]s, `query.rs`),
//! fetch rows as [`Cell`]s decoded into row types (`row.rs`), begin a
//! transaction that writes (`handler.rs` for a handler's). The SQL text that
//! differs between databases — column types, `FOR UPDATE SKIP LOCKED`,
//! insert-or-ignore, wake-up notifications — lives in one file per database
//! (`sqlite.rs`, `postgres.rs`, `mysql.rs`) as a [`Dialect`]: data the
//! statements of the storage layer (`store/`) and the schema's DDL per
//! version (`ddl.rs`) are built from.

// Built without any database feature, the crate has no dialect, and the
// helpers the dialects share are unused; nothing is wrong then.
#![cfg_attr(
    not(any(feature = "sqlite", feature = "postgres", feature = "mysql")),
    allow(dead_code, unused_macros, unused_imports)
)]

use std::future::Future;
use std::sync::Arc;

use sqlx::{Database, Pool, Transaction};
use tokio::sync::Notify;

pub(crate) mod ddl;
mod handler;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
mod query;
mod row;
#[cfg(feature = "sqlite")]
mod sqlite;

pub(crate) use handler::HandlerTx;
pub use query::Query;
pub(crate) use row::{FromRow, Row, decode};

/// Every dialect built in, for tests of statements and row types.
#[cfg(test)]
pub(crate) fn dialects() -> Vec<&'static Dialect> {
    vec![
        #[cfg(feature = "sqlite")]
        <sqlx::Sqlite as Backend>::DIALECT,
        #[cfg(feature = "postgres")]
        <sqlx::Postgres as Backend>::DIALECT,
        #[cfg(feature = "mysql")]
        <sqlx::MySql as Backend>::DIALECT,
    ]
}

#[cfg(test)]
pub(crate) use row::assert_selects_what_it_decodes;

/// A value bound to a statement placeholder.
#[derive(Debug, Clone)]
#[doc(hidden)]
pub enum Value<'a> {
    /// An integer (`BIGINT`).
    Int(i64),
    /// A `BIGINT` SQL `NULL`.
    NullInt,
    /// Text, or SQL `NULL`.
    Text(Option<&'a str>),
    /// Bytes, or SQL `NULL`.
    Bytes(Option<&'a [u8]>),
}

/// The expected type of a fetched column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)]
pub enum Column {
    /// A nullable integer.
    Int,
    /// Nullable text.
    Text,
    /// Nullable bytes.
    Bytes,
}

/// A fetched column value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[doc(hidden)]
pub enum Cell {
    /// An integer or `NULL`.
    Int(Option<i64>),
    /// Text or `NULL`.
    Text(Option<String>),
    /// Bytes or `NULL`.
    Bytes(Option<Vec<u8>>),
}

impl Cell {
    pub(crate) fn int(&self) -> Option<i64> {
        match self {
            Cell::Int(v) => *v,
            _ => None,
        }
    }

    pub(crate) fn take_text(&mut self) -> Option<String> {
        match self {
            Cell::Text(v) => v.take(),
            _ => None,
        }
    }

    pub(crate) fn take_bytes(&mut self) -> Option<Vec<u8>> {
        match self {
            Cell::Bytes(v) => v.take(),
            _ => None,
        }
    }
}

/// How a database writes statement placeholders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)]
pub enum Placeholders {
    /// `?` (SQLite, MySQL).
    Question,
    /// `$1`, `$2`… (PostgreSQL).
    Dollar,
}

/// The SQL that differs between databases. One value per database, in that
/// database's file.
#[derive(Debug)]
#[doc(hidden)]
pub struct Dialect {
    /// The database's name, for messages.
    pub name: &'static str,
    /// Placeholder style.
    pub placeholders: Placeholders,
    /// Suffix of the claim query that skips rows other relays hold.
    pub skip_locked: &'static str,
    /// Query of the database's clock: one row, one integer, ms since the
    /// Unix epoch. Leases are decided on it (see `clock.rs`).
    pub clock: &'static str,
    /// `CREATE TABLE` (and index) statements for the outbox table.
    pub outbox_ddl: fn(&str) -> Vec<String>,
    /// `CREATE TABLE` (and index) statements for the inbox table.
    pub inbox_ddl: fn(&str) -> Vec<String>,
    /// `CREATE TABLE` statements for the schema-version and lease tables.
    pub meta_ddl: fn() -> Vec<String>,
    /// `INSERT` that does nothing when the key exists: the words before the
    /// table name and what follows the values (see [`Query::insert_ignore`]).
    pub insert_ignore: (&'static str, &'static str),
    /// Statement run inside an appending transaction so other processes wake up
    /// when it commits; `None` where the database has no such feature.
    pub notify: fn(&str) -> Option<String>,
    /// How a `DELETE` of at most `LIMIT n` rows matching a condition, taken
    /// in the order of an indexed column, is written (see
    /// [`Query::delete_limited`]).
    pub delete_limited: LimitedDelete,
    /// `CREATE INDEX` for a migration step: (index, table, columns). Safe to
    /// run again, through `IF NOT EXISTS` or [`already_applied`](Self::already_applied).
    pub create_index: fn(&str, &str, &str) -> String,
    /// `ALTER TABLE … ADD COLUMN` for a migration step: (table, column
    /// definition). Safe to run again, through `IF NOT EXISTS` or
    /// [`already_applied`](Self::already_applied).
    pub add_column: fn(&str, &str) -> String,
    /// Inbox schema version 3 (table): the indexes that find retry and parked
    /// rows and a key's pending rows, cut down to those rows (partial indexes),
    /// so an applied event no longer updates them. Empty where the database
    /// has no partial indexes (MySQL).
    pub inbox_pending_indexes: fn(&str) -> Vec<String>,
    /// Inbox schema version 4 (table): the dedup columns (`consumer`,
    /// `event_id`) compare byte for byte, so that ids differing only in case
    /// are two events. Empty where text compares so already (PostgreSQL,
    /// SQLite); on MySQL the table's default collation ignored case.
    pub inbox_binary_ids: fn(&str) -> Vec<String>,
    /// Inbox schema version 5 (table): the dedup id (`event_id`) compares
    /// byte for byte without padding, so that ids differing only in trailing
    /// spaces are two events. Empty where text compares so already
    /// (PostgreSQL, SQLite); on MySQL `utf8mb4_bin` pads with spaces, and the
    /// column becomes `VARBINARY`.
    pub inbox_exact_ids: fn(&str) -> Vec<String>,
    /// The length in bytes of a text or binary column's value (SQL `NULL`
    /// for `NULL`): `OCTET_LENGTH` where it exists, else the length of the
    /// value as a blob (SQLite, whose `LENGTH` of text counts characters).
    pub byte_length: fn(&str) -> String,
    /// The outbox index of unpublished rows by key, for the per-key order
    /// check: partial where the database has partial indexes, otherwise
    /// `(event_key, process, id)`. Either way the check never reads the
    /// published rows of a key, however many there are.
    pub outbox_open_key_index: fn(&str) -> String,
    /// Indexes of the waiting rows for the claim, where the planner needs one
    /// of its own: PostgreSQL, whose statistics of a table taken while every
    /// row waited otherwise make it walk the primary key past the published
    /// rows. SQLite and MySQL claim on `(process, id)` already.
    pub outbox_waiting_index: fn(&str) -> Vec<String>,
    /// `DROP INDEX` of index `{table}_{name}`: (table, name). Safe to run
    /// again, through `IF EXISTS` or [`already_applied`](Self::already_applied).
    pub drop_index: fn(&str, &str) -> String,
    /// What follows the table name to make a query use index `{table}_{name}`
    /// (`INDEXED BY` on SQLite, `FORCE INDEX` on MySQL; nothing on
    /// PostgreSQL, whose planner picks the partial index by itself). For the
    /// per-key order check, whose many keys otherwise lead SQLite and MySQL to
    /// range over the primary key (every published row below the batch); the
    /// hand-off read, which statistics of an unleased table lead SQLite to
    /// answer with a full scan; and the claim and the due probe, which
    /// statistics of a table of waiting rows lead SQLite to answer (`ORDER BY
    /// id LIMIT`) by walking the table from its first, long published, row.
    pub use_index: fn(&str, &str) -> String,
    /// Whether a migration statement failed only because its work is already
    /// done: what it creates or adds exists, what it drops is gone. A step cut
    /// off before its version was recorded runs again from its first
    /// statement, so each must be safe to repeat; where the database has no
    /// `IF [NOT] EXISTS` for a statement (MySQL: indexes and columns), its
    /// error says so instead. Never where every statement can say
    /// `IF [NOT] EXISTS` (PostgreSQL, SQLite).
    pub already_applied: fn(&sqlx::Error) -> bool,
    /// The lock that lets one process at a time migrate, and how long its
    /// statements may wait for table locks. `IF NOT EXISTS` alone is not
    /// enough: on PostgreSQL two sessions creating the same index at once can
    /// still collide, and MySQL has no `CREATE INDEX IF NOT EXISTS`. `None`
    /// where one writer at a time is the rule anyway (SQLite).
    pub migration_lock: Option<MigrationLock>,
    /// Statement that lets the current transaction commit without waiting for
    /// its log flush, for the relay's own bookkeeping (claims and marks): losing
    /// one in a database crash only means a re-publish. `None` where the
    /// database has no per-transaction switch.
    pub relaxed_commit: Option<&'static str>,
    /// One writer at a time (SQLite): writers of one component queue in the
    /// process instead of sleeping in the database's busy handler.
    pub single_writer: bool,
    /// Session switches around a handler's transaction where the database,
    /// having rolled a transaction back by itself (MySQL: after a deadlock,
    /// or a lock wait timeout with `innodb_rollback_on_timeout`), would run
    /// the statements that follow on their own, each committed at once.
    /// `None` where a transaction the database gave up on refuses further
    /// statements (PostgreSQL) or is never rolled back underneath
    /// (SQLite, which takes its write lock up front).
    pub handler_session: Option<HandlerSession>,
    /// The bytes a stored row's payload and headers take, as an expression
    /// on its `content` and `headers` columns, read without the payload
    /// itself: the relay sizes a batch by it before it fetches any payload.
    pub payload_bytes: &'static str,
    /// How a relay holds its `relay_id` for as long as it runs, so that two
    /// live relays never share one hand-off token.
    pub relay_lock: RelayLock,
}

/// The statements that keep a handler's writes after a rollback underneath
/// inside a transaction, and give the session back as it was.
#[derive(Debug, Clone, Copy)]
pub struct HandlerSession {
    /// Run after `BEGIN`: statements after a rollback open a new transaction
    /// instead of committing one by one (`SET autocommit = 0`).
    pub enter: &'static str,
    /// Ends whatever transaction is open, committing it.
    pub commit: &'static str,
    /// Ends whatever transaction is open, rolling it back.
    pub rollback: &'static str,
    /// Run after the transaction ended, before the connection goes back to
    /// the pool (`SET autocommit = 1`).
    pub leave: &'static str,
}

/// The lock a running relay holds on its `relay_id` and table. It belongs to
/// a session or an open file, so it ends with the process that held it: a
/// relay restarted after a crash takes it at once.
#[derive(Debug, Clone, Copy)]
pub enum RelayLock {
    /// A session lock on a connection of the relay's own: this statement,
    /// its text before and after one bound 64-bit key, tries to take it
    /// without waiting; one row, 1 when taken, else 0.
    Session([&'static str; 2]),
    /// An exclusive lock on a file beside the database file, which this
    /// query names (one row, one text; empty for an in-memory database,
    /// whose relays can only be in this process).
    FileBeside(&'static str),
}

/// How a database lets one session at a time migrate, and bounds the waits of
/// a migration. The lock belongs to the session: the migration runs on a
/// connection of its own that is closed afterwards (or when the call is
/// abandoned), never handed back to the pool, so the lock dies with it.
#[derive(Debug, Clone, Copy)]
pub struct MigrationLock {
    /// Tries to take the lock without waiting: one row, 1 when taken, else 0.
    pub try_take: &'static str,
    /// The statement that bounds how long each later statement of the session
    /// waits for a table lock (`timeout` rounded up as the database needs).
    pub lock_timeout: fn(std::time::Duration) -> String,
    /// The database gave up waiting for a table lock.
    pub is_lock_timeout: fn(&sqlx::Error) -> bool,
}

/// How a database takes a `DELETE` of at most `LIMIT n` rows in a given order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)]
pub enum LimitedDelete {
    /// Through a subquery of their ids, where the database takes `LIMIT`
    /// there (PostgreSQL, SQLite).
    IdSubquery,
    /// `ORDER BY … LIMIT` on the `DELETE` itself (MySQL, which refuses
    /// `LIMIT` inside an `IN` subquery).
    OrderLimit,
}

/// Lets one writing transaction at a time through on single-writer databases.
#[derive(Debug, Default)]
pub(crate) struct WriteGate(Option<tokio::sync::Mutex<()>>);

impl WriteGate {
    pub(crate) fn new(dialect: &Dialect) -> WriteGate {
        WriteGate(dialect.single_writer.then(|| tokio::sync::Mutex::new(())))
    }

    /// Waits for this component's turn to write; the turn ends when the guard drops.
    pub(crate) async fn enter(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.0 {
            Some(lock) => Some(lock.lock().await),
            None => None,
        }
    }
}

/// A database the outbox and the inbox can use: SQLite, PostgreSQL or
/// MySQL/MariaDB (each behind its cargo feature). Sealed.
pub trait Backend: Database + sealed::Sealed {
    #[doc(hidden)]
    const DIALECT: &'static Dialect;

    /// Begins a transaction that will write, taking the write lock up front
    /// where the database needs that to avoid deadlocks (SQLite).
    #[doc(hidden)]
    fn begin_write(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send;

    /// Runs one statement and returns the number of rows it changed.
    #[doc(hidden)]
    fn exec(
        conn: &mut Self::Connection,
        query: &Query<'_>,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    /// Runs one query and returns its rows, decoded as `columns` says.
    #[doc(hidden)]
    fn fetch(
        conn: &mut Self::Connection,
        query: &Query<'_>,
        columns: &[Column],
    ) -> impl Future<Output = Result<Vec<Vec<Cell>>, sqlx::Error>> + Send;

    /// Starts a task that calls `wake.notify_one()` whenever another process
    /// commits events to `table`. `None` where the database cannot notify.
    #[doc(hidden)]
    fn listen(
        pool: &Pool<Self>,
        table: &str,
        wake: Arc<Notify>,
    ) -> Option<tokio::task::JoinHandle<()>>;
}

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// Defines `bind`: a statement of one sqlx database type with [`Value`]s bound
/// to its placeholders. Used by [`statement_plumbing`], at module level.
macro_rules! query_binder {
    ($db:ty) => {
        /// `query`'s text with its values bound to its placeholders, in order.
        fn bind<'q>(
            built: &'q $crate::backend::Query<'q>,
        ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
            let mut query = sqlx::query::<$db>(built.text());
            for arg in built.args() {
                query = match arg {
                    $crate::backend::Value::Int(v) => query.bind(*v),
                    $crate::backend::Value::NullInt => query.bind(Option::<i64>::None),
                    $crate::backend::Value::Text(v) => query.bind(*v),
                    $crate::backend::Value::Bytes(v) => query.bind(*v),
                };
            }
            query
        }
    };
}
pub(crate) use query_binder;

/// Implements [`Backend`]'s statement plumbing for one sqlx database type
/// (inside its `impl Backend`; the module must also invoke [`query_binder`]).
macro_rules! statement_plumbing {
    ($db:ty) => {
        async fn exec(
            conn: &mut <$db as sqlx::Database>::Connection,
            query: &$crate::backend::Query<'_>,
        ) -> Result<u64, sqlx::Error> {
            use sqlx::Executor as _;
            Ok(conn.execute(bind(query)).await?.rows_affected())
        }

        async fn fetch(
            conn: &mut <$db as sqlx::Database>::Connection,
            query: &$crate::backend::Query<'_>,
            columns: &[$crate::backend::Column],
        ) -> Result<Vec<Vec<$crate::backend::Cell>>, sqlx::Error> {
            use sqlx::Executor as _;
            use sqlx::Row as _;
            use $crate::backend::{Cell, Column};
            let rows = conn.fetch_all(bind(query)).await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let mut cells = Vec::with_capacity(columns.len());
                for (i, column) in columns.iter().enumerate() {
                    cells.push(match column {
                        Column::Int => Cell::Int(row.try_get(i)?),
                        Column::Text => Cell::Text($crate::backend::text_cell(&row, i)?),
                        Column::Bytes => Cell::Bytes(row.try_get(i)?),
                    });
                }
                out.push(cells);
            }
            Ok(out)
        }
    };
}
pub(crate) use statement_plumbing;

/// Text column `i` of `row`. MySQL flags a text column in a binary collation
/// (the inbox's `consumer`, `utf8mb4_bin` since inbox version 4) and a
/// `VARBINARY` column (the inbox's `event_id` since version 5) as binary,
/// which sqlx will not decode as a string: its bytes are read instead, and
/// must be UTF-8.
pub(crate) fn text_cell<R>(row: &R, i: usize) -> Result<Option<String>, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    match row.try_get::<Option<String>, _>(i) {
        Err(sqlx::Error::ColumnDecode { .. }) => row
            .try_get::<Option<Vec<u8>>, _>(i)?
            .map(String::from_utf8)
            .transpose()
            .map_err(|source| sqlx::Error::ColumnDecode {
                index: i.to_string(),
                source: Box::new(source),
            }),
        decoded => decoded,
    }
}

/// A connection from `pool`, with the error every caller reports.
pub(crate) async fn acquire<DB: Backend>(
    pool: &Pool<DB>,
) -> Result<sqlx::pool::PoolConnection<DB>, crate::Error> {
    pool.acquire()
        .await
        .map_err(crate::Error::db("acquiring a connection"))
}
