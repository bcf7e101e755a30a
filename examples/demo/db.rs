//! Read-only looks into DB1 and DB2, on whichever database each one is.

use std::collections::{HashMap, HashSet};

use outbox::core::Outbox;

use crate::BoxError;

/// A pool on one of the three databases.
pub(crate) enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
}

/// Runs `$body` with `$pool` bound to the pool, whatever its database.
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
            Db::MySql($pool) => $body,
        }
    };
}

impl Db {
    pub(crate) async fn open(url: &str) -> Result<Db, BoxError> {
        let scheme = url.split(':').next().unwrap_or_default();
        Ok(match scheme {
            // The services' settings; the services create the file's tables.
            "sqlite" => Db::Sqlite(crate::shared::open_sqlite(url, 2).await?),
            "postgres" | "postgresql" => Db::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(url)
                    .await?,
            ),
            "mysql" | "mariadb" => Db::MySql(
                sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(2)
                    .connect(url)
                    .await?,
            ),
            _ => {
                return Err(format!(
                    "unsupported database URL {url:?}: use sqlite://, postgres:// or mysql://"
                )
                .into());
            }
        })
    }

    /// A single number, e.g. a `COUNT(*)`.
    pub(crate) async fn number(&self, sql: &str) -> Result<i64, sqlx::Error> {
        with_pool!(self, pool => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await)
    }

    /// One number per row.
    pub(crate) async fn numbers(&self, sql: &str) -> Result<Vec<i64>, sqlx::Error> {
        with_pool!(self, pool => sqlx::query_scalar::<_, i64>(sql).fetch_all(pool).await)
    }

    /// Two numbers per row.
    pub(crate) async fn pairs(&self, sql: &str) -> Result<Vec<(i64, i64)>, sqlx::Error> {
        with_pool!(self, pool => sqlx::query_as::<_, (i64, i64)>(sql).fetch_all(pool).await)
    }

    /// Events in the default outbox table not published yet.
    pub(crate) async fn unpublished(&self) -> Result<u64, outbox::core::Error> {
        with_pool!(self, pool => Outbox::new(pool.clone()).backlog().await.map(|b| b.pending))
    }

    pub(crate) async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }
}

/// How far the demo has come; `None` where a table does not exist yet.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Progress {
    pub(crate) users: Option<i64>,
    pub(crate) unpublished: Option<u64>,
    pub(crate) points_rows: Option<i64>,
    pub(crate) points_users: Option<i64>,
}

impl Progress {
    pub(crate) async fn read(db1: &Db, db2: &Db) -> Progress {
        Progress {
            users: db1.number("SELECT COUNT(*) FROM users").await.ok(),
            unpublished: db1.unpublished().await.ok(),
            points_rows: db2.number("SELECT COUNT(*) FROM welcome_points").await.ok(),
            points_users: db2
                .number("SELECT COUNT(DISTINCT user_id) FROM welcome_points")
                .await
                .ok(),
        }
    }
}

/// The final comparison of DB1 and DB2.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Check {
    /// Users in DB1.
    pub(crate) users: usize,
    /// `welcome_points` rows in DB2.
    pub(crate) rows: i64,
    /// Users without a row.
    pub(crate) missing: usize,
    /// Users with more than one row.
    pub(crate) duplicated: usize,
    /// Rows for user ids DB1 does not have.
    pub(crate) unknown: usize,
}

impl Check {
    pub(crate) async fn read(db1: &Db, db2: &Db) -> Result<Check, BoxError> {
        let users: HashSet<i64> = db1
            .numbers("SELECT id FROM users")
            .await
            .map_err(|e| format!("reading the users of DB1: {e}"))?
            .into_iter()
            .collect();
        let rows: HashMap<i64, i64> = db2
            .pairs("SELECT user_id, COUNT(*) FROM welcome_points GROUP BY user_id")
            .await
            .map_err(|e| format!("reading the welcome points of DB2: {e}"))?
            .into_iter()
            .collect();
        Ok(Check {
            users: users.len(),
            rows: rows.values().sum(),
            missing: users.iter().filter(|id| !rows.contains_key(id)).count(),
            duplicated: rows.values().filter(|n| **n > 1).count(),
            unknown: rows.keys().filter(|id| !users.contains(id)).count(),
        })
    }

    /// Every user has exactly one row, and no row belongs to nobody.
    pub(crate) fn holds(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.unknown == 0
    }
}
