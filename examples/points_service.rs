//! The points service of the reference scenario: it owns database DB2 and gives
//! every new user exactly one welcome-points row.
//!
//! It consumes `user.created` from its own Virtual Topic queue,
//! `/queue/Consumer.points.VirtualTopic.user.created`, with a
//! `#[transactional_event]` consumer: each event's id is recorded in DB2's inbox
//! in the same transaction as the `welcome_points` row, and the message is
//! acknowledged only after that commit. Kill the process at any moment: an
//! uncommitted event is delivered again after the restart, and an event the
//! broker delivers twice (same event id) is recognised and skipped. The
//! `welcome_points` table deliberately has no unique key on `user_id`, so a
//! double effect would show as a second row.
//!
//! ```text
//! cargo run --example points_service
//! cargo run --example points_service --all-features -- \
//!     --broker 'failover:(stomp://127.0.0.1:61613)?maxReconnectDelay=1000' \
//!     --database mysql://root@127.0.0.1:3306/points
//! ```
//!
//! `--metrics 127.0.0.1:9465` serves Prometheus metrics and health probes
//! (`/metrics`, `/health/ready`, `/health/live`).
//!
//! `--database` takes `sqlite://…` (default `sqlite://target/demo/points.db?mode=rwc`),
//! `postgres://…` or `mysql://…`. Start this service before the user service:
//! subscribing creates the queue, and a Virtual Topic queue only receives
//! messages published after it exists. It runs until SIGINT or SIGTERM, then
//! finishes the events in flight and stops; `RUST_LOG` sets the log filter
//! (default `info`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use outbox::core::consumer::ConsumerMetrics;
use outbox::core::{Backend, Consumer, Delivery, Handler, Inbox};
use outbox::stomp::Config;
use outbox::transactional_event;
use serde::Deserialize;
use sqlx::Transaction;
use tokio::sync::watch;

#[path = "shared/mod.rs"]
mod shared;

use shared::{BoxError, connect, now_ms, open_sqlite, stop_on_signals};

/// Consumes `user.created` and writes one welcome-points row per user into DB2.
#[derive(Debug, Parser)]
struct Args {
    /// Broker URI, e.g. `stomp://host:61613` or `failover:(stomp://a:61613,stomp://b:61613)`.
    #[arg(long, default_value = "stomp://127.0.0.1:61613")]
    broker: String,
    /// DB2: `sqlite://…`, `postgres://…` or `mysql://…`.
    #[arg(long, default_value = "sqlite://target/demo/points.db?mode=rwc")]
    database: String,
    /// Serve Prometheus metrics (`/metrics`) and health probes
    /// (`/health/ready`, `/health/live`) on this address, e.g. `127.0.0.1:9465`.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Print each finished span (OpenTelemetry) on stderr, one line each;
    /// with the `otel` feature the trace goes across the broker with each event.
    #[arg(long)]
    trace: bool,
}

/// The part of the user service's event this service needs.
#[derive(Debug, Deserialize)]
struct UserCreated {
    user_id: i64,
}

const WELCOME_POINTS: i64 = 100;

/// The same table on SQLite, PostgreSQL and MySQL/MariaDB. No unique key on
/// `user_id`: the inbox, not the schema, keeps the effect single.
const CREATE_WELCOME_POINTS: &str = "CREATE TABLE IF NOT EXISTS welcome_points (\
     user_id BIGINT NOT NULL, points BIGINT NOT NULL, \
     event_id VARCHAR(64) NOT NULL, create_time BIGINT NOT NULL)";

/// One module per database: `#[transactional_event]` needs the concrete
/// transaction type, and the placeholders differ (`?` or `$1`).
macro_rules! points_in {
    ($db:ty, $insert:literal) => {
        use super::*;

        /// Gives the new user their welcome points, once per event id.
        #[transactional_event(
            consumer = "points",
            destination = "/queue/Consumer.points.VirtualTopic.user.created"
        )]
        pub(super) async fn award_welcome_points(
            tx: &mut Transaction<'_, $db>,
            event: UserCreated,
            delivery: &Delivery,
        ) -> Result<(), sqlx::Error> {
            sqlx::query($insert)
                .bind(event.user_id)
                .bind(WELCOME_POINTS)
                .bind(&delivery.event_id)
                .bind(now_ms())
                .execute(&mut **tx)
                .await?;
            Ok(())
        }

        /// Creates the tables and starts consuming.
        pub(super) async fn run(
            pool: sqlx::Pool<$db>,
            args: &Args,
            stop: watch::Receiver<bool>,
        ) -> Result<(), BoxError> {
            sqlx::query(CREATE_WELCOME_POINTS).execute(&pool).await?;
            let inbox = AwardWelcomePoints::inbox(pool.clone())?;
            inbox.migrate().await?;
            let consumer = || AwardWelcomePoints::consumer(pool.clone());
            consume(args, consumer, inbox, stop).await?;
            pool.close().await;
            Ok(())
        }
    };
}

mod on_sqlite {
    points_in!(
        sqlx::Sqlite,
        "INSERT INTO welcome_points (user_id, points, event_id, create_time) VALUES (?, ?, ?, ?)"
    );
}

mod on_postgres {
    points_in!(
        sqlx::Postgres,
        "INSERT INTO welcome_points (user_id, points, event_id, create_time) VALUES ($1, $2, $3, $4)"
    );
}

mod on_mysql {
    points_in!(
        sqlx::MySql,
        "INSERT INTO welcome_points (user_id, points, event_id, create_time) VALUES (?, ?, ?, ?)"
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    shared::ops::init_telemetry(args.trace);
    let stop = stop_on_signals()?.subscribe();
    let scheme = args.database.split(':').next().unwrap_or_default();
    match scheme {
        "sqlite" => on_sqlite::run(open_sqlite(&args.database, 10).await?, &args, stop).await,
        "postgres" | "postgresql" => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(10)
                .test_before_acquire(false)
                .connect(&args.database)
                .await?;
            on_postgres::run(pool, &args, stop).await
        }
        "mysql" | "mariadb" => {
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(10)
                .test_before_acquire(false)
                .connect(&args.database)
                .await?;
            on_mysql::run(pool, &args, stop).await
        }
        _ => Err(format!(
            "unsupported database URL {:?}: use sqlite://, postgres:// or mysql://",
            args.database
        )
        .into()),
    }
}

/// Subscribes (which creates the Virtual Topic queue), consumes until stopped,
/// then shuts the consumer down gracefully.
async fn consume<DB: Backend, H: Handler<DB>>(
    args: &Args,
    consumer: impl Fn() -> Result<Consumer<DB, H>, outbox::core::Error>,
    inbox: Inbox<DB>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError> {
    let config = Config::parse(&args.broker)?.with_receipt_timeout(Duration::from_secs(5));
    let running = Arc::new(Mutex::new(None::<Arc<ConsumerMetrics>>));
    if let Some(addr) = args.metrics {
        let running = running.clone();
        let health = move || {
            let metrics = running.lock().unwrap_or_else(|e| e.into_inner()).clone();
            metrics.map(|m| m.health())
        };
        shared::ops::serve(addr, Arc::new(health)).await?;
    }
    let (client, consumer) = loop {
        let Some(client) = connect(config.clone(), stop.clone()).await? else {
            return Ok(());
        };
        let consumer = consumer()?;
        *running.lock().unwrap_or_else(|e| e.into_inner()) = Some(consumer.metrics());
        match consumer.spawn(client.clone()).await {
            Ok(consumer) => break (client, consumer),
            // The broker went away between connecting and subscribing.
            Err(error) => {
                tracing::warn!(%error, "subscribing failed; connecting again");
                let _ = client.disconnect().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    tracing::info!(
        queue = "/queue/Consumer.points.VirtualTopic.user.created",
        "subscribed to the user.created queue; it keeps every event published from now on"
    );
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    let mut last = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            _ = progress.tick() => {
                let now = consumer.metrics().snapshot();
                if last != Some(now) {
                    last = Some(now);
                    let outbox::core::consumer::ConsumerCounts { processed, duplicates, retried, failed, .. } = now;
                    tracing::info!(processed, duplicates, retried, failed, "welcome points");
                }
            }
        }
    }
    let metrics = consumer.metrics().clone();
    consumer.shutdown().await?;
    let _ = client.disconnect().await;
    let outbox::core::consumer::ConsumerCounts {
        processed,
        duplicates,
        retried,
        failed,
        ..
    } = metrics.snapshot();
    tracing::info!(processed, duplicates, retried, failed, "welcome points");
    let counts = inbox.counts().await?;
    tracing::info!(
        processed = counts.processed,
        retry = counts.retry,
        failed = counts.failed,
        "points service stopped; inbox rows"
    );
    Ok(())
}

/// The handler tested with the test kit on SQLite and PostgreSQL, without a
/// broker (`cargo test --example points_service`): the same path as from
/// ActiveMQ — inbox row, handler, commit, then acknowledgement.
#[cfg(test)]
mod tests {
    use outbox::core::testing::{self, Flaky, TestConsumer};
    use outbox_test_harness::TestDb;

    use super::*;

    fn user_created(user_id: i64) -> Delivery {
        Delivery::json(
            format!("user-{user_id}"),
            &serde_json::json!({ "user_id": user_id, "name": "ada" }),
        )
        .expect("serialisable")
        .with_type("user.created")
        .with_key(user_id)
    }

    macro_rules! points_tests {
        ($db:ty, $module:ident, $open:expr) => {
            use super::*;
            use crate::$module::AwardWelcomePoints;

            async fn points(pool: &sqlx::Pool<$db>) -> Vec<(i64, i64)> {
                sqlx::query_as("SELECT user_id, points FROM welcome_points ORDER BY user_id")
                    .fetch_all(pool)
                    .await
                    .expect("welcome points")
            }

            async fn start(
                handler: Flaky<AwardWelcomePoints>,
            ) -> Option<(TestDb<$db>, TestConsumer<$db>)> {
                let db = $open.await?;
                sqlx::query(CREATE_WELCOME_POINTS)
                    .execute(db.pool())
                    .await
                    .expect("table");
                let inbox = AwardWelcomePoints::inbox(db.pool().clone()).expect("inbox");
                inbox.migrate().await.expect("migrate");
                let config = testing::config().with_max_attempts(3);
                let consumer = TestConsumer::start_with(inbox, handler, config).expect("consumer");
                Some((db, consumer))
            }

            #[tokio::test]
            async fn a_user_delivered_twice_gets_one_welcome() {
                let Some((db, consumer)) = start(Flaky::new(AwardWelcomePoints)).await else {
                    return;
                };
                for user_id in [2, 1, 2, 1, 3] {
                    consumer.deliver(user_created(user_id));
                }
                let counts = consumer.drain().await.expect("drained");
                assert_eq!((counts.processed, counts.duplicates), (3, 2), "{counts:?}");
                assert_eq!(
                    points(db.pool()).await,
                    [
                        (1, WELCOME_POINTS),
                        (2, WELCOME_POINTS),
                        (3, WELCOME_POINTS)
                    ]
                );
                consumer.shutdown().await.expect("shutdown");
            }

            #[tokio::test]
            async fn a_failing_transaction_leaves_no_points_and_is_retried() {
                let handler = Flaky::new(AwardWelcomePoints).fail("user-7", 2);
                let Some((db, consumer)) = start(handler).await else {
                    return;
                };
                consumer.deliver(user_created(7));
                let counts = consumer.drain().await.expect("drained");
                assert_eq!((counts.processed, counts.failed), (1, 0), "{counts:?}");
                assert!(counts.retried >= 2, "two failed attempts: {counts:?}");
                assert_eq!(
                    points(db.pool()).await,
                    [(7, WELCOME_POINTS)],
                    "the failed attempts rolled back"
                );
                consumer.shutdown().await.expect("shutdown");
            }

            #[tokio::test]
            async fn an_event_that_keeps_failing_is_parked_and_can_be_replayed() {
                let handler = Flaky::new(AwardWelcomePoints).fail_always("user-9");
                let faults = handler.clone();
                let Some((db, consumer)) = start(handler).await else {
                    return;
                };
                consumer.deliver(user_created(9));
                consumer.deliver(Delivery::raw("garbled", "{\"user\":"));
                let counts = consumer.drain().await.expect("drained");
                assert_eq!((counts.processed, counts.failed), (0, 2), "{counts:?}");
                let mut parked: Vec<String> = consumer
                    .parked()
                    .await
                    .expect("parked")
                    .into_iter()
                    .map(|p| p.event_id)
                    .collect();
                parked.sort();
                assert_eq!(parked, ["garbled", "user-9"]);
                assert!(points(db.pool()).await.is_empty());
                // The cause fixed, the operator replays it with a fresh budget.
                faults.heal("user-9");
                assert!(consumer.inbox().replay("user-9").await.expect("replay"));
                let counts = consumer.drain().await.expect("drained");
                assert_eq!(counts.processed, 1, "{counts:?}");
                assert_eq!(points(db.pool()).await, [(9, WELCOME_POINTS)]);
                consumer.shutdown().await.expect("shutdown");
            }
        };
    }

    mod sqlite {
        points_tests!(sqlx::Sqlite, on_sqlite, async {
            Some(TestDb::sqlite().await.expect("sqlite"))
        });
    }

    mod postgres {
        points_tests!(sqlx::Postgres, on_postgres, async {
            TestDb::postgres().await.expect("postgres")
        });
    }
}
