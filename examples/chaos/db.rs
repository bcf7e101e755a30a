//! The run's database as the runner sees it: the business tables it creates
//! before the services start, what it reads for progress and for the checker,
//! and the database fault (terminating the services' sessions).

use crate::shared::BoxError;

/// The producer's own record: one row per planned event, written in the same
/// transaction as the event (`COMMITTED`) or after the append refused it
/// (`REFUSED: <error>`).
pub(crate) const PRODUCED: &str = "chaos_produced";
/// One row per application of an event by a consumer. No unique key, so a
/// double effect shows as a second row.
pub(crate) const APPLIED: &str = "chaos_applied";
/// A table with one row, whose key a swallowing handler violates.
pub(crate) const UNIQUE: &str = "chaos_unique";

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

/// A row of [`PRODUCED`]: seq, event id, outcome.
pub(crate) type ProducedRow = (i64, Option<String>, String);
/// A row of the outbox: event id, state, last error.
pub(crate) type OutboxRow = (String, String, Option<String>);
/// A row of [`APPLIED`]: id, consumer, seq, fid, key, kseq, and how it
/// was delivered (process, attempt, `redelivered`, `message-id`).
pub(crate) type AppliedRow = (
    i64,
    String,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
);
/// A row of the inbox: consumer, event id, state, last error, content.
pub(crate) type InboxRow = (String, String, String, Option<String>, Option<Vec<u8>>);

impl Db {
    pub(crate) async fn open(url: &str) -> Result<Db, BoxError> {
        let scheme = url.split(':').next().unwrap_or_default();
        Ok(match scheme {
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
            _ => return Err(format!("unsupported database URL {url:?}").into()),
        })
    }

    /// Creates the business tables.
    pub(crate) async fn create_tables(&self) -> Result<(), BoxError> {
        let id = match self {
            Db::Sqlite(_) => "id INTEGER PRIMARY KEY AUTOINCREMENT",
            Db::Postgres(_) => "id BIGSERIAL PRIMARY KEY",
            Db::MySql(_) => "id BIGINT AUTO_INCREMENT PRIMARY KEY",
        };
        let statements = [
            format!(
                "CREATE TABLE {PRODUCED} (seq BIGINT PRIMARY KEY, event_id VARCHAR(64), \
                 outcome VARCHAR(512) NOT NULL)"
            ),
            format!(
                "CREATE TABLE {APPLIED} ({id}, consumer VARCHAR(16) NOT NULL, seq BIGINT, \
                 fid BIGINT, ekey VARCHAR(64), kseq BIGINT, note VARCHAR(200))"
            ),
            format!("CREATE TABLE {UNIQUE} (id BIGINT PRIMARY KEY)"),
            format!("INSERT INTO {UNIQUE} (id) VALUES (1)"),
        ];
        for sql in statements {
            self.execute(&sql).await?;
        }
        Ok(())
    }

    pub(crate) async fn execute(&self, sql: &str) -> Result<(), sqlx::Error> {
        with_pool!(self, pool => sqlx::query(sql).execute(pool).await.map(drop))
    }

    /// A single number, e.g. a `COUNT(*)`.
    pub(crate) async fn number(&self, sql: &str) -> Result<i64, sqlx::Error> {
        with_pool!(self, pool => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await)
    }

    pub(crate) async fn produced(&self) -> Result<Vec<ProducedRow>, sqlx::Error> {
        let sql = format!("SELECT seq, event_id, outcome FROM {PRODUCED}");
        with_pool!(self, pool => sqlx::query_as(&sql).fetch_all(pool).await)
    }

    pub(crate) async fn outbox(&self) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let sql = "SELECT event_id, process, last_error FROM outbox_event";
        with_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await)
    }

    pub(crate) async fn applied(&self) -> Result<Vec<AppliedRow>, sqlx::Error> {
        let sql =
            format!("SELECT id, consumer, seq, fid, ekey, kseq, note FROM {APPLIED} ORDER BY id");
        with_pool!(self, pool => sqlx::query_as(&sql).fetch_all(pool).await)
    }

    pub(crate) async fn inbox(&self) -> Result<Vec<InboxRow>, sqlx::Error> {
        // MySQL reports the dedup columns (utf8mb4_bin) as VARBINARY, which
        // sqlx decodes as bytes only (docs/configuration.md): read them as text.
        let sql = match self {
            Db::MySql(_) => {
                "SELECT CAST(consumer AS CHAR), CAST(event_id AS CHAR), process, last_error, content \
                 FROM inbox_event"
            }
            _ => "SELECT consumer, event_id, process, last_error, content FROM inbox_event",
        };
        with_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await)
    }

    /// A figure that changes whenever the system makes progress: rows
    /// produced, outbox rows settled, inbox rows settled, rows applied.
    pub(crate) async fn progress(&self) -> Result<[i64; 4], sqlx::Error> {
        Ok([
            self.number(&format!("SELECT COUNT(*) FROM {PRODUCED}"))
                .await?,
            self.number("SELECT COUNT(*) FROM outbox_event WHERE process <> 'NEW'")
                .await
                .unwrap_or(0),
            self.number(
                "SELECT COUNT(*) FROM inbox_event WHERE process IN ('PROCESSED', 'FAILED')",
            )
            .await
            .unwrap_or(0),
            self.number(&format!("SELECT COUNT(*) FROM {APPLIED}"))
                .await?,
        ])
    }

    /// Terminates every other session on this database (the services'):
    /// PostgreSQL `pg_terminate_backend`, MariaDB `KILL`. Returns how many.
    pub(crate) async fn terminate_sessions(&self) -> Result<u64, sqlx::Error> {
        match self {
            Db::Sqlite(_) => Ok(0),
            Db::Postgres(pool) => {
                let ended: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .fetch_all(pool)
                .await?;
                Ok(ended.into_iter().filter(|e| *e).count() as u64)
            }
            Db::MySql(pool) => {
                let mut conn = pool.acquire().await?;
                let ids: Vec<i64> = sqlx::query_scalar(
                    "SELECT ID FROM information_schema.PROCESSLIST \
                     WHERE DB = DATABASE() AND ID <> CONNECTION_ID()",
                )
                .fetch_all(&mut *conn)
                .await?;
                let mut killed = 0;
                for id in ids {
                    // A session may end by itself meanwhile.
                    if sqlx::query(&format!("KILL {id}"))
                        .execute(&mut *conn)
                        .await
                        .is_ok()
                    {
                        killed += 1;
                    }
                }
                Ok(killed)
            }
        }
    }

    pub(crate) async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }
}
