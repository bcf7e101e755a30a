//! Fresh databases for one test each: a SQLite file, or a uniquely named database
//! on a PostgreSQL or MySQL/MariaDB server.
//!
//! Server databases are created through an admin URL and dropped again when the
//! [`TestDb`] is dropped. A server that cannot be reached is an error, unless its
//! skip variable (`OUTBOX_SKIP_POSTGRES=1`, `OUTBOX_SKIP_MYSQL=1`) asks to skip it;
//! then the constructor returns `Ok(None)` and says so on stderr.

#[cfg(any(feature = "postgres", feature = "mysql"))]
use std::time::Duration;

use sqlx::pool::PoolOptions;
use sqlx::{Database, Pool};

use crate::HarnessError;

/// Connections per test pool; enough for tests that run concurrent transactions.
const POOL_SIZE: u32 = 8;

/// How long to wait for a database server to accept a connection.
#[cfg(any(feature = "postgres", feature = "mysql"))]
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin URL of the PostgreSQL server, overridable through this variable.
pub const POSTGRES_URL_VAR: &str = "OUTBOX_TEST_POSTGRES_URL";
/// Set to `1` to skip PostgreSQL tests instead of failing them.
pub const SKIP_POSTGRES_VAR: &str = "OUTBOX_SKIP_POSTGRES";
/// Admin URL of the MySQL/MariaDB server, overridable through this variable.
pub const MYSQL_URL_VAR: &str = "OUTBOX_TEST_MYSQL_URL";
/// Set to `1` to skip MySQL/MariaDB tests instead of failing them.
pub const SKIP_MYSQL_VAR: &str = "OUTBOX_SKIP_MYSQL";

#[cfg(feature = "postgres")]
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
#[cfg(feature = "mysql")]
const DEFAULT_MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// A database that exists for one test: its URL and a connection pool to it.
///
/// ```no_run
/// # #[cfg(feature = "sqlite")]
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_test_harness::TestDb;
///
/// let db = TestDb::sqlite().await?;
/// let one: i64 = sqlx::query_scalar("SELECT 1").fetch_one(db.pool()).await?;
/// assert_eq!(one, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct TestDb<DB: Database> {
    url: String,
    pool: Pool<DB>,
    // Never read: it exists to be dropped after the pool.
    _cleanup: Cleanup,
}

impl<DB: Database> TestDb<DB> {
    /// The URL of this test's database, for code that connects by itself.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pool connected to this test's database.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    async fn open(url: String, cleanup: Cleanup) -> Result<Self, HarnessError> {
        let pool = PoolOptions::<DB>::new()
            .max_connections(POOL_SIZE)
            .connect(&url)
            .await
            .map_err(|source| HarnessError::Database {
                action: format!("connecting a pool to {url}"),
                source,
            })?;
        Ok(TestDb {
            url,
            pool,
            _cleanup: cleanup,
        })
    }

    /// A fresh database on `server`, or `None` when its skip variable is set.
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    async fn on_server(server: Server) -> Result<Option<Self>, HarnessError> {
        let Some(admin_url) = server.admin_url() else {
            return Ok(None);
        };
        let name = server.create_database(&admin_url).await?;
        let url = with_database(&admin_url, &name);
        let cleanup = Cleanup::ServerDatabase {
            server,
            admin_url,
            name,
        };
        TestDb::open(url, cleanup).await.map(Some)
    }
}

#[cfg(feature = "sqlite")]
impl TestDb<sqlx::Sqlite> {
    /// A fresh SQLite database in a new temporary file, deleted on drop.
    pub async fn sqlite() -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("outbox-test-sqlite-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating a temporary directory", e))?;
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
        TestDb::open(url, Cleanup::TempDir { _dir: dir }).await
    }
}

#[cfg(feature = "postgres")]
impl TestDb<sqlx::Postgres> {
    /// A fresh database `outbox_test_<random>` on the PostgreSQL server at
    /// `OUTBOX_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
    /// dropped on drop. `Ok(None)` if `OUTBOX_SKIP_POSTGRES=1`.
    pub async fn postgres() -> Result<Option<Self>, HarnessError> {
        TestDb::on_server(Server::Postgres).await
    }
}

#[cfg(feature = "mysql")]
impl TestDb<sqlx::MySql> {
    /// A fresh database `outbox_test_<random>` on the MySQL/MariaDB server at
    /// `OUTBOX_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`),
    /// dropped on drop. `Ok(None)` if `OUTBOX_SKIP_MYSQL=1`.
    pub async fn mysql() -> Result<Option<Self>, HarnessError> {
        TestDb::on_server(Server::MySql).await
    }
}

/// What to remove once the test is done with its database.
#[derive(Debug)]
enum Cleanup {
    #[cfg(feature = "sqlite")]
    /// Deleting the directory deletes the database file.
    TempDir { _dir: tempfile::TempDir },
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    ServerDatabase {
        server: Server,
        admin_url: String,
        name: String,
    },
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl Drop for Cleanup {
    fn drop(&mut self) {
        #[allow(irrefutable_let_patterns)]
        let Cleanup::ServerDatabase {
            server,
            admin_url,
            name,
        } = self
        else {
            return;
        };
        let (server, admin_url, name) = (*server, admin_url.clone(), name.clone());
        // Drop cannot await, and blocking the test's runtime could deadlock it; a
        // thread with its own runtime does the work.
        let dropper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let outcome = match runtime {
                Ok(runtime) => runtime.block_on(server.drop_database(&admin_url, &name)),
                Err(e) => Err(HarnessError::io(
                    "building a runtime to drop a test database",
                    e,
                )),
            };
            if let Err(e) = outcome {
                eprintln!("warning: could not drop test database {name}: {e}");
            }
        });
        let _ = dropper.join();
    }
}

#[derive(Debug, Clone, Copy)]
#[cfg(any(feature = "postgres", feature = "mysql"))]
enum Server {
    #[cfg(feature = "postgres")]
    Postgres,
    #[cfg(feature = "mysql")]
    MySql,
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl Server {
    fn label(self) -> &'static str {
        match self {
            #[cfg(feature = "postgres")]
            Server::Postgres => "PostgreSQL",
            #[cfg(feature = "mysql")]
            Server::MySql => "MySQL/MariaDB",
        }
    }

    fn vars(self) -> (&'static str, &'static str, &'static str) {
        match self {
            #[cfg(feature = "postgres")]
            Server::Postgres => (POSTGRES_URL_VAR, SKIP_POSTGRES_VAR, DEFAULT_POSTGRES_URL),
            #[cfg(feature = "mysql")]
            Server::MySql => (MYSQL_URL_VAR, SKIP_MYSQL_VAR, DEFAULT_MYSQL_URL),
        }
    }

    /// The admin URL, or `None` (with a notice) if the skip variable is set.
    fn admin_url(self) -> Option<String> {
        let (url_var, skip_var, default_url) = self.vars();
        if crate::paths::env_flag(skip_var) {
            eprintln!(
                "notice: {skip_var} is set, skipping the {} part of this test",
                self.label()
            );
            return None;
        }
        Some(std::env::var(url_var).unwrap_or_else(|_| default_url.to_owned()))
    }

    async fn create_database(self, admin_url: &str) -> Result<String, HarnessError> {
        let name = crate::paths::unique_name("outbox_test_");
        self.admin_execute(admin_url, &format!("CREATE DATABASE {name}"))
            .await?;
        Ok(name)
    }

    async fn drop_database(self, admin_url: &str, name: &str) -> Result<(), HarnessError> {
        let statement = match self {
            // FORCE ends connections the test's pool may still hold.
            #[cfg(feature = "postgres")]
            Server::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            #[cfg(feature = "mysql")]
            Server::MySql => format!("DROP DATABASE IF EXISTS {name}"),
        };
        self.admin_execute(admin_url, &statement).await
    }

    /// Runs one statement on a fresh admin connection. Statements are built from
    /// generated names only, never from user input.
    async fn admin_execute(self, admin_url: &str, statement: &str) -> Result<(), HarnessError> {
        match self {
            #[cfg(feature = "postgres")]
            Server::Postgres => execute_on::<sqlx::PgConnection>(self, admin_url, statement).await,
            #[cfg(feature = "mysql")]
            Server::MySql => execute_on::<sqlx::MySqlConnection>(self, admin_url, statement).await,
        }
    }
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn execute_on<C>(server: Server, admin_url: &str, statement: &str) -> Result<(), HarnessError>
where
    C: sqlx::Connection,
    for<'c> &'c mut C: sqlx::Executor<'c>,
{
    use sqlx::Executor as _;

    let (url_var, skip_var, _) = server.vars();
    let unreachable = |source| HarnessError::DatabaseUnreachable {
        server: server.label(),
        url: admin_url.to_owned(),
        url_var,
        skip_var,
        source,
    };
    let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, C::connect(admin_url)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(source)) => return Err(unreachable(source)),
        Err(_) => {
            let silence = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            );
            return Err(unreachable(sqlx::Error::Io(silence)));
        }
    };
    let outcome =
        conn.execute(statement)
            .await
            .map(drop)
            .map_err(|source| HarnessError::Database {
                action: format!("running `{statement}` on {admin_url}"),
                source,
            });
    // Closing politely is a courtesy to the server; the statement's outcome is what counts.
    let _ = conn.close().await;
    outcome
}

/// `url` with its database (path) replaced by `name`, query string kept.
#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_in_a_url_is_replaced_and_the_query_kept() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306", "x"),
            "mysql://root@127.0.0.1:3306/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
    }
}
