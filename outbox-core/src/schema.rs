//! Versioned migrations and the shared lease table.
//!
//! Each table's version lives in `outbox_schema_version` (one row per table);
//! a migration runs only the steps above that version. One process at a time
//! migrates (an advisory lock on PostgreSQL, a named lock on MySQL, the write
//! lock on SQLite), so two processes starting together do no harm. Waits for
//! locks are bounded ([`DEFAULT_MIGRATION_TIMEOUT`]), and the lock dies with
//! the migration's own connection, even when the call is abandoned.
//! `outbox_lease`, created here too, holds named, expiring leases that make a
//! periodic job (such as retention) run in one process at a time; its
//! statements are in `store/lease.rs`.

use std::borrow::Cow;
use std::time::Duration;

use sqlx::Pool;

use crate::Backoff;
use crate::backend::{Backend, Column, Dialect, FromRow, MigrationLock, Query, Row, decode};
use crate::names::now_ms;
use crate::{Error, failpoint};

/// How long a migration waits for a lock by default: for the migration lock
/// (another process migrating) and, for each statement, for the locks on its
/// table (another session's open transaction). Building an index is not
/// counted, only waiting for a lock.
pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Brings `table` up to its newest version, `steps.len()`, by running
/// `steps[v - 1]` for every missing version `v`. A step's version is recorded
/// after its last statement, so a process that dies in between leaves the
/// step to run again from its first statement: each statement must be safe to
/// repeat (`IF [NOT] EXISTS`, or an error the dialect knows as
/// [`already_applied`](crate::backend::Dialect::already_applied)).
///
/// Every wait for a lock gives up after `timeout` with
/// [`Error::MigrationTimeout`]. The migration runs on a connection taken out
/// of the pool and closed at the end, or dropped if the call is abandoned:
/// the session's migration lock dies with it, never parked in the pool.
pub(crate) async fn migrate<DB: Backend>(
    pool: &Pool<DB>,
    table: &str,
    steps: &[Vec<String>],
    timeout: Duration,
) -> Result<(), Error> {
    let Some(lock) = DB::DIALECT.migration_lock else {
        let mut conn = crate::backend::acquire(pool).await?;
        return migrate_locked::<DB>(&mut conn, table, steps, None).await;
    };
    let mut conn = crate::backend::acquire(pool).await?.detach();
    let migrated = async {
        take_migration_lock::<DB>(&mut conn, table, &lock, timeout).await?;
        let bound = (lock.lock_timeout)(timeout);
        DB::exec(&mut conn, &Query::fixed(DB::DIALECT, &bound))
            .await
            .map_err(Error::db("setting the migration's lock timeout"))?;
        migrate_locked::<DB>(&mut conn, table, steps, Some((&lock, timeout))).await
    }
    .await;
    // Ends the session, and with it the lock and the session's settings.
    let _ = sqlx::Connection::close(conn).await;
    migrated
}

/// Polls for the migration lock with backoff until `timeout` has passed.
async fn take_migration_lock<DB: Backend>(
    conn: &mut DB::Connection,
    table: &str,
    lock: &MigrationLock,
    timeout: Duration,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    for attempt in 0u32.. {
        let query = Query::fixed(DB::DIALECT, lock.try_take);
        let taken = DB::fetch(conn, &query, &[Column::Int])
            .await
            .map_err(Error::db("taking the migration lock"))?;
        if taken.first().and_then(|r| r.first()).and_then(|c| c.int()) == Some(1) {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(pause.delay(attempt).min(deadline - now)).await;
    }
    Err(Error::MigrationTimeout {
        table: table.to_owned(),
        waiting_for: "the migration lock, which another process holds while it migrates".to_owned(),
        after: timeout,
    })
}

/// A table's recorded schema version.
struct Version(Option<i64>);

impl FromRow for Version {
    const TABLE: &'static str = "outbox_schema_version";
    const TYPES: &'static [Column] = &[Column::Int];

    fn columns(_: &Dialect, _: &str) -> Cow<'static, str> {
        Cow::Borrowed("version")
    }

    fn from_row(row: Row) -> Result<Self, Error> {
        Ok(Version(row.opt_int(0)))
    }
}

/// The reading of `table`'s recorded version.
fn version_query<DB: Backend>(table: &str) -> Query<'_> {
    Query::new(DB::DIALECT)
        .sql("SELECT ")
        .columns::<Version>("outbox_schema_version")
        .sql(" FROM outbox_schema_version WHERE table_name = ")
        .bind(table)
}

/// What a failed migration statement is reported as: a wait for a table
/// lock that ran out names the statement and the cause.
struct Failure<'a> {
    table: &'a str,
    lock: Option<(&'a MigrationLock, Duration)>,
}

impl Failure<'_> {
    fn of(&self, action: &'static str, statement: &str, error: sqlx::Error) -> Error {
        match self.lock {
            Some((lock, after)) if (lock.is_lock_timeout)(&error) => Error::MigrationTimeout {
                table: self.table.to_owned(),
                waiting_for: format!(
                    "a lock on the table that another session holds in an open transaction \
                     (look for sessions idle in transaction), to run `{statement}`"
                ),
                after,
            },
            _ => Error::db(action)(error),
        }
    }
}

async fn migrate_locked<DB: Backend>(
    conn: &mut DB::Connection,
    table: &str,
    steps: &[Vec<String>],
    lock: Option<(&MigrationLock, Duration)>,
) -> Result<(), Error> {
    let failed = Failure { table, lock };
    let found = recorded_version::<DB>(conn, table, &failed).await?;
    let known = i64::try_from(steps.len()).unwrap_or(i64::MAX);
    if found > known {
        return Err(Error::SchemaTooNew {
            table: table.to_owned(),
            found,
            known,
        });
    }
    for (version, step) in (1_i64..)
        .zip(steps)
        .skip(usize::try_from(found).unwrap_or(0))
    {
        for statement in step {
            match DB::exec(conn, &Query::fixed(DB::DIALECT, statement)).await {
                Ok(_) => {}
                // This step ran before and died before its version was recorded.
                Err(error) if (DB::DIALECT.already_applied)(&error) => {
                    tracing::info!(table, version, %error, "migration statement already applied");
                }
                Err(error) => return Err(failed.of("running a migration", statement, error)),
            }
            failpoint::hit("schema.after_statement");
        }
        let record = Query::new(DB::DIALECT)
            .sql("UPDATE outbox_schema_version SET version = ")
            .bind(version)
            .sql(", update_time = ")
            .bind(now_ms())
            .sql(" WHERE table_name = ")
            .bind(table);
        DB::exec(conn, &record)
            .await
            .map_err(|e| failed.of("recording the schema version", record.text(), e))?;
        tracing::info!(table, version, "migrated");
    }
    Ok(())
}

/// Creates the schema-version and lease tables and `table`'s row (version
/// 0) where missing; returns `table`'s recorded version.
async fn recorded_version<DB: Backend>(
    conn: &mut DB::Connection,
    table: &str,
    failed: &Failure<'_>,
) -> Result<i64, Error> {
    for statement in (DB::DIALECT.meta_ddl)() {
        DB::exec(conn, &Query::fixed(DB::DIALECT, &statement))
            .await
            .map_err(|e| failed.of("creating outbox_schema_version", &statement, e))?;
    }
    let now = now_ms();
    let insert = Query::new(DB::DIALECT).insert_ignore(
        "outbox_schema_version",
        "table_name, version, update_time",
        |q| q.bind(table).sql(", 0, ").bind(now),
    );
    DB::exec(conn, &insert)
        .await
        .map_err(|e| failed.of("recording the schema version", insert.text(), e))?;
    let query = version_query::<DB>(table);
    let rows = DB::fetch(conn, &query, Version::TYPES)
        .await
        .map_err(|e| failed.of("reading the schema version", query.text(), e))?;
    Ok(decode::<Version>(rows)?
        .first()
        .and_then(|v| v.0)
        .unwrap_or(0))
}

/// The recorded schema version of `table`; `None` before its first
/// migration (no version table or no row for it).
pub(crate) async fn version<DB: Backend>(
    pool: &Pool<DB>,
    table: &str,
) -> Result<Option<i64>, Error> {
    let mut conn = crate::backend::acquire(pool).await?;
    match DB::fetch(&mut conn, &version_query::<DB>(table), Version::TYPES).await {
        Ok(rows) => Ok(decode::<Version>(rows)?.first().and_then(|v| v.0)),
        // The version table does not exist yet: nothing was migrated.
        Err(error) if missing_table(&error) => Ok(None),
        Err(error) => Err(Error::db("reading the schema version")(error)),
    }
}

/// `true` for "no such table" on any of the databases (PostgreSQL 42P01,
/// MySQL 42S02, SQLite's message); every other error is a real one.
fn missing_table(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    matches!(db.code().as_deref(), Some("42P01" | "42S02"))
        || db.message().contains("no such table")
}
