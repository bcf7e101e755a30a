//! The user service of the reference scenario: it owns database DB1, registers
//! users, and tells the rest of the world through ActiveMQ.
//!
//! Each registration is one database transaction holding the user row and its
//! `user.created` event (a `#[transactional_event]` producer in `pool` form). The
//! relay, running in the same process, publishes the events to the Virtual Topic
//! `/topic/VirtualTopic.user.created` (key: the user id) and marks them published
//! only after the broker confirmed them. Kill the process at any moment: a
//! committed user's event is still sent after the restart, and the restarted
//! service continues after the highest user id already in DB1.
//!
//! ```text
//! cargo run --example user_service -- --users 1000 --rate 200
//! cargo run --example user_service --all-features -- \
//!     --broker 'failover:(stomp://127.0.0.1:61613)?maxReconnectDelay=1000' \
//!     --database postgres://postgres@127.0.0.1:5432/users --users 1000 --exit-when-done
//! ```
//!
//! `--metrics 127.0.0.1:9464` serves Prometheus metrics and health probes
//! (`/metrics`, `/health/ready`, `/health/live`).
//!
//! `--database` takes `sqlite://…` (default `sqlite://target/demo/users.db?mode=rwc`),
//! `postgres://…` or `mysql://…`. Start the points service first: a Virtual Topic
//! queue only receives messages published after it exists. SIGINT or SIGTERM
//! stops the service gracefully; `RUST_LOG` sets the log filter (default `info`).

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Parser;
use outbox::core::relay::{RelayHandle, RelayMetrics, StompPublisher};
use outbox::core::{Backend, Outbox, RelayConfig};
use outbox::stomp::Config;
use outbox::transactional_event;
use serde::Serialize;
use sqlx::Transaction;
use tokio::sync::watch;
use tokio::time::{MissedTickBehavior, interval};
use tracing::Instrument as _;

#[path = "shared/mod.rs"]
mod shared;

use shared::{BoxError, connect, now_ms, open_sqlite, stop_on_signals};

/// Registers users 1..=N in DB1 and publishes a `user.created` event for each.
#[derive(Debug, Parser)]
struct Args {
    /// Broker URI, e.g. `stomp://host:61613` or `failover:(stomp://a:61613,stomp://b:61613)`.
    #[arg(long, default_value = "stomp://127.0.0.1:61613")]
    broker: String,
    /// DB1: `sqlite://…`, `postgres://…` or `mysql://…`.
    #[arg(long, default_value = "sqlite://target/demo/users.db?mode=rwc")]
    database: String,
    /// Register users 1..=N (continuing after the highest id already in DB1).
    #[arg(long, default_value_t = 1000)]
    users: i64,
    /// Registrations per second; 0 registers as fast as the database allows.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Exit once N users exist and every event has been published.
    #[arg(long)]
    exit_when_done: bool,
    /// Serve Prometheus metrics (`/metrics`) and health probes
    /// (`/health/ready`, `/health/live`) on this address, e.g. `127.0.0.1:9464`.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Print each finished span (OpenTelemetry) on stderr, one line each;
    /// with the `otel` feature the trace goes across the broker with each event.
    #[arg(long)]
    trace: bool,
}

/// The event: what the points service (or anyone else) learns about a new user.
#[derive(Debug, Serialize)]
struct UserCreated {
    user_id: i64,
    name: String,
}

/// The same table on SQLite, PostgreSQL and MySQL/MariaDB.
const CREATE_USERS: &str = "CREATE TABLE IF NOT EXISTS users (\
     id BIGINT PRIMARY KEY, name VARCHAR(100) NOT NULL, create_time BIGINT NOT NULL)";
const HIGHEST_ID: &str = "SELECT COALESCE(MAX(id), 0) FROM users";

/// What the service needs from DB1 besides the outbox.
trait Users {
    /// Creates the `users` table if it does not exist.
    fn create_table(&self) -> impl Future<Output = Result<(), sqlx::Error>>;
    /// The highest registered user id, 0 if none.
    fn highest_id(&self) -> impl Future<Output = Result<i64, sqlx::Error>>;
    /// Registers one user: its row and its event, in one transaction.
    fn register(
        &self,
        user_id: i64,
    ) -> impl Future<Output = Result<UserCreated, outbox::core::Error>>;
}

/// One module per database: `#[transactional_event]` needs the concrete
/// transaction type, and the placeholders differ (`?` or `$1`).
// Skipped because rustfmt re-indents an attribute's lines inside a macro body on every run.
#[rustfmt::skip]
macro_rules! users_in {
    ($db:ty, $insert:literal) => {
        use super::*;

        /// Inserts the user; the generated code appends its `user.created`
        /// event in the same transaction, commits, and wakes the relay.
        #[transactional_event(
            pool,
            destination = "/topic/VirtualTopic.user.created",
            event_type = "user.created",
            key = event.user_id
        )]
        async fn register_user(
            tx: &mut Transaction<'_, $db>,
            user_id: i64,
        ) -> Result<UserCreated, outbox::core::Error> {
            let user = UserCreated {
                user_id,
                name: format!("user-{user_id}"),
            };
            sqlx::query($insert)
                .bind(user.user_id)
                .bind(&user.name)
                .bind(now_ms())
                .execute(&mut **tx)
                .await?;
            Ok(user)
        }

        pub(super) struct Db1(pub(super) sqlx::Pool<$db>);

        impl Users for Db1 {
            async fn create_table(&self) -> Result<(), sqlx::Error> {
                sqlx::query(CREATE_USERS).execute(&self.0).await.map(drop)
            }

            async fn highest_id(&self) -> Result<i64, sqlx::Error> {
                sqlx::query_scalar(HIGHEST_ID).fetch_one(&self.0).await
            }

            async fn register(&self, user_id: i64) -> Result<UserCreated, outbox::core::Error> {
                register_user(&self.0, user_id).await
            }
        }
    };
}

mod on_sqlite {
    users_in!(
        sqlx::Sqlite,
        "INSERT INTO users (id, name, create_time) VALUES (?, ?, ?)"
    );
}

mod on_postgres {
    users_in!(
        sqlx::Postgres,
        "INSERT INTO users (id, name, create_time) VALUES ($1, $2, $3)"
    );
}

mod on_mysql {
    users_in!(
        sqlx::MySql,
        "INSERT INTO users (id, name, create_time) VALUES (?, ?, ?)"
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    shared::ops::init_telemetry(args.trace);
    let stop = stop_on_signals()?;
    let scheme = args.database.split(':').next().unwrap_or_default();
    match scheme {
        "sqlite" => {
            let pool = open_sqlite(&args.database, 4).await?;
            serve(&args, Outbox::new(pool.clone()), on_sqlite::Db1(pool), stop).await
        }
        "postgres" | "postgresql" => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .test_before_acquire(false)
                .connect(&args.database)
                .await?;
            serve(
                &args,
                Outbox::new(pool.clone()),
                on_postgres::Db1(pool),
                stop,
            )
            .await
        }
        "mysql" | "mariadb" => {
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(4)
                .test_before_acquire(false)
                .connect(&args.database)
                .await?;
            serve(&args, Outbox::new(pool.clone()), on_mysql::Db1(pool), stop).await
        }
        _ => Err(format!(
            "unsupported database URL {:?}: use sqlite://, postgres:// or mysql://",
            args.database
        )
        .into()),
    }
}

/// Migrates, starts the relay, registers the users, and stops on a signal
/// (or, with `--exit-when-done`, once everything is published).
async fn serve<DB: Backend>(
    args: &Args,
    outbox: Outbox<DB>,
    users: impl Users,
    stop: Arc<watch::Sender<bool>>,
) -> Result<(), BoxError> {
    outbox.migrate().await?;
    users.create_table().await?;
    let broker = Config::parse(&args.broker)?.with_receipt_timeout(Duration::from_secs(5));
    let started = Arc::new(OnceLock::<Arc<RelayMetrics>>::new());
    if let Some(addr) = args.metrics {
        let relay = started.clone();
        shared::ops::serve(addr, Arc::new(move || relay.get().map(|m| m.health()))).await?;
    }
    // The relay needs the broker, registrations do not: while the broker is
    // away users keep being registered and their events wait in the outbox.
    let relay = tokio::spawn(start_relay(
        outbox.clone(),
        broker,
        started,
        stop.subscribe(),
    ));
    let registered = register_users(args, &users, &outbox, stop.subscribe()).await;
    stop.send_replace(true);
    match relay.await {
        Ok(Ok(Some(relay))) => relay.shutdown().await?,
        Ok(Ok(None)) => {}
        Ok(Err(error)) => return Err(error),
        Err(join) => return Err(join.into()),
    }
    registered?;
    let backlog = outbox.backlog().await?;
    let highest = users.highest_id().await?;
    tracing::info!(
        users = highest,
        unpublished = backlog.pending,
        "user service stopped"
    );
    outbox.pool().close().await;
    Ok(())
}

/// Connects to the broker (waiting for it if need be) and runs the relay.
async fn start_relay<DB: Backend>(
    outbox: Outbox<DB>,
    broker: Config,
    started: Arc<OnceLock<Arc<RelayMetrics>>>,
    stop: watch::Receiver<bool>,
) -> Result<Option<RelayHandle>, BoxError> {
    let Some(client) = connect(broker, stop).await? else {
        return Ok(None);
    };
    let config = RelayConfig::default()
        // A killed relay's claimed rows are taken over after this long; it
        // must exceed the longest publish, about twice the receipt timeout
        // above.
        .with_lease(Duration::from_secs(15));
    let relay = outbox.relay(StompPublisher::new(client), config)?;
    let _ = started.set(relay.metrics());
    Ok(Some(relay.spawn()))
}

/// Registers users up to `--users` at `--rate`, until done or stopped.
async fn register_users<DB: Backend>(
    args: &Args,
    users: &impl Users,
    outbox: &Outbox<DB>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError> {
    let mut next = users.highest_id().await? + 1;
    if next > 1 {
        tracing::info!(
            highest = next - 1,
            "users exist already; continuing after them"
        );
    }
    let mut pace = (args.rate > 0.0).then(|| {
        let mut pace = interval(Duration::from_secs_f64(1.0 / args.rate));
        pace.set_missed_tick_behavior(MissedTickBehavior::Burst);
        pace
    });
    let mut progress = interval(Duration::from_secs(2));
    let mut announced = false;
    loop {
        let done = next > args.users;
        if done && !announced {
            announced = true;
            tracing::info!(users = args.users, "all users registered");
        }
        tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
            _ = progress.tick() => {
                let pending = outbox.backlog().await.map(|b| b.pending).unwrap_or(0);
                tracing::info!(registered = next - 1, of = args.users, unpublished = pending, "progress");
            }
            _ = tokio::time::sleep(Duration::from_millis(100)), if done => {
                let published = outbox.backlog().await.is_ok_and(|b| b.pending == 0);
                if args.exit_when_done && published {
                    tracing::info!("every event is published; exiting as asked");
                    return Ok(());
                }
            }
            _ = tick(&mut pace), if !done => match users
                .register(next)
                .instrument(tracing::info_span!("register_user", user_id = next))
                .await
            {
                Ok(user) => {
                    tracing::debug!(user_id = user.user_id, "registered");
                    next += 1;
                }
                Err(error) => {
                    tracing::warn!(%error, user_id = next, "registration failed; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    // The commit may have succeeded before the error: ask DB1.
                    if let Ok(highest) = users.highest_id().await {
                        next = highest + 1;
                    }
                }
            },
        }
    }
}

async fn tick(pace: &mut Option<tokio::time::Interval>) {
    if let Some(pace) = pace {
        pace.tick().await;
    }
}

/// The producer tested with the test kit on SQLite and PostgreSQL, without a
/// broker (`cargo test --example user_service`): each registration appends
/// its `user.created` event with the user row, and a failed one appends
/// nothing.
#[cfg(test)]
mod tests {
    use outbox::core::testing::appended;
    use outbox_test_harness::TestDb;

    use super::*;

    macro_rules! user_tests {
        ($db:ty, $module:ident, $open:expr) => {
            use super::*;
            use crate::$module::Db1;

            #[tokio::test]
            async fn a_registration_appends_its_event_and_a_failed_one_appends_nothing() {
                let Some(db) = $open.await else { return };
                let pool: sqlx::Pool<$db> = db.pool().clone();
                Outbox::new(pool.clone()).migrate().await.expect("migrate");
                let users = Db1(pool.clone());
                users.create_table().await.expect("users table");
                for user_id in [1, 2] {
                    users.register(user_id).await.expect("registered");
                }
                // User 2 again: the insert fails, and so the whole transaction.
                users.register(2).await.expect_err("a duplicate user id");
                let events = appended(&pool).await.expect("outbox rows");
                assert_eq!(events.len(), 2, "{events:?}");
                for (event, user_id) in events.iter().zip([1, 2]) {
                    assert_eq!(event.event_type, "user.created");
                    assert_eq!(event.destination, "/topic/VirtualTopic.user.created");
                    assert_eq!(event.key, Some(user_id.to_string()));
                    let payload: serde_json::Value = event.json().expect("JSON");
                    assert_eq!(payload["user_id"], user_id);
                    assert_eq!(payload["name"], format!("user-{user_id}"));
                }
                assert_eq!(users.highest_id().await.expect("highest"), 2);
            }
        };
    }

    mod sqlite {
        user_tests!(sqlx::Sqlite, on_sqlite, async {
            Some(TestDb::sqlite().await.expect("sqlite"))
        });
    }

    mod postgres {
        user_tests!(sqlx::Postgres, on_postgres, async {
            TestDb::postgres().await.expect("postgres")
        });
    }
}
