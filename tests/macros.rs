//! `#[transactional_event]` against a real ActiveMQ, on SQLite, PostgreSQL and
//! MySQL/MariaDB (modules `sqlite`, `postgres`, `mysql`; run one database's
//! tests with e.g. `cargo nextest run --test macros postgres::`).
//!
//! The annotated functions are written once, inside the suite macro, because
//! each names its concrete database type.

mod support;

use std::fmt;
use std::time::Duration;

use outbox::core::relay::StompPublisher;
use outbox::core::{Backoff, ConsumerConfig, Delivery, Event, Outbox, RelayConfig};
use outbox::transactional_event;
use serde::{Deserialize, Serialize};
use sqlx::Transaction;
use support::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UserCreated {
    user_id: i64,
    name: String,
}

/// The error of the annotated functions: the business's own failures plus
/// what the database and the outbox report.
#[derive(Debug)]
enum AppError {
    Refused(String),
    Database(sqlx::Error),
    Outbox(outbox::core::Error),
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppError::Refused(why) => write!(f, "refused: {why}"),
            AppError::Database(e) => write!(f, "database: {e}"),
            AppError::Outbox(e) => write!(f, "outbox: {e}"),
        }
    }
}

impl std::error::Error for AppError {}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Database(e)
    }
}

impl From<outbox::core::Error> for AppError {
    fn from(e: outbox::core::Error) -> Self {
        AppError::Outbox(e)
    }
}

/// A relay that only publishes promptly when it is woken: its poll is long.
fn sleepy_relay() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_secs(60))
        // Longer than a publish on `support::client` can take.
        .with_lease(Duration::from_secs(5))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
}

fn fast_relay() -> RelayConfig {
    sleepy_relay().with_poll_interval(Duration::from_millis(50))
}

fn fast_consumer(destination: &str) -> ConsumerConfig {
    ConsumerConfig::new(destination)
        .with_retry_poll(Duration::from_millis(50))
        .with_retry_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        ))
}

fn header<'a>(received: &'a Received, name: &str) -> Option<&'a str> {
    received
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

macro_rules! macro_suite {
    ($db:ty, $open:path) => {
        use super::*;

        const USERS: &str = "/queue/macros.users";
        const TOPIC: &str = "/topic/VirtualTopic.macros.user.created";
        const POINTS_QUEUE: &str = "/queue/Consumer.points.VirtualTopic.macros.user.created";
        const AUDIT_QUEUE: &str = "/queue/Consumer.audit.VirtualTopic.macros.user.created";

        /// The body both producer forms run: inserts a user; `name` "" is
        /// refused after the insert.
        async fn insert_user(
            tx: &mut Transaction<'_, $db>,
            user_id: i64,
            name: &str,
        ) -> Result<UserCreated, AppError> {
            sqlx::query(&format!(
                "INSERT INTO users (id, name) VALUES ({user_id}, '{name}')"
            ))
            .execute(&mut **tx)
            .await?;
            if name.is_empty() {
                return Err(AppError::Refused("a user needs a name".into()));
            }
            Ok(UserCreated {
                user_id,
                name: name.to_owned(),
            })
        }

        /// Inserts a user; `name` "" is refused after the insert.
        #[transactional_event(
            destination = "/queue/macros.users",
            event_type = "user.created",
            key = event.user_id,
            headers(tenant = "acme", "x-name" = event.name.to_uppercase())
        )]
        async fn create_user(
            tx: &mut Transaction<'_, $db>,
            user_id: i64,
            name: &str,
        ) -> Result<UserCreated, AppError> {
            insert_user(tx, user_id, name).await
        }

        /// Inserts several users, one event each.
        #[transactional_event(
            destination = "/queue/macros.users",
            event_type = "user.created",
            key = format!("team-{}", event.user_id % 2)
        )]
        async fn create_team(
            tx: &mut Transaction<'_, $db>,
            ids: std::ops::Range<i64>,
        ) -> Result<Vec<UserCreated>, AppError> {
            let mut created = Vec::new();
            for user_id in ids {
                let name = format!("member{user_id}");
                sqlx::query(&format!(
                    "INSERT INTO users (id, name) VALUES ({user_id}, '{name}')"
                ))
                .execute(&mut **tx)
                .await?;
                created.push(UserCreated { user_id, name });
            }
            Ok(created)
        }

        /// The pool form, into a table of its own, published to a Virtual Topic.
        #[transactional_event(
            pool,
            destination = "/topic/VirtualTopic.macros.user.created",
            event_type = "user.registered",
            key = event.user_id,
            table = "Macro_Outbox"
        )]
        async fn register_user(
            tx: &mut Transaction<'_, $db>,
            user_id: i64,
            name: &str,
        ) -> Result<UserCreated, AppError> {
            insert_user(tx, user_id, name).await
        }

        /// Applied once per event id: a second run would add a second row.
        #[transactional_event(
            consumer = "points",
            destination = "/queue/Consumer.points.VirtualTopic.macros.user.created"
        )]
        async fn award_points(
            tx: &mut Transaction<'_, $db>,
            event: UserCreated,
        ) -> Result<(), AppError> {
            sqlx::query(&format!(
                "INSERT INTO points (user_id, points) VALUES ({}, 100)",
                event.user_id
            ))
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        /// Sees the delivery, and keeps its rows in an inbox table of its own.
        #[transactional_event(
            consumer = "audit",
            destination = "/queue/Consumer.audit.VirtualTopic.macros.user.created",
            table = "audit_inbox"
        )]
        async fn audit(
            tx: &mut Transaction<'_, $db>,
            event: UserCreated,
            delivery: &Delivery,
        ) -> Result<(), String> {
            sqlx::query(&format!(
                "INSERT INTO audit (event_id, event_type, event_key, user_id) \
                 VALUES ('{}', '{}', '{}', {})",
                delivery.event_id,
                delivery.event_type.as_deref().unwrap_or("-"),
                delivery.key.as_deref().unwrap_or("-"),
                event.user_id
            ))
            .execute(&mut **tx)
            .await
            .map_err(|e| e.to_string())?;
            Ok(())
        }

        async fn setup() -> Option<(outbox_test_harness::TestDb<$db>, Outbox<$db>)> {
            let db = $open().await?;
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            for ddl in [
                "CREATE TABLE users (id BIGINT PRIMARY KEY, name VARCHAR(100) NOT NULL)",
                "CREATE TABLE points (user_id BIGINT NOT NULL, points BIGINT NOT NULL)",
                "CREATE TABLE audit (event_id VARCHAR(64) NOT NULL, event_type VARCHAR(64) NOT NULL, \
                 event_key VARCHAR(64) NOT NULL, user_id BIGINT NOT NULL)",
            ] {
                sqlx::query(ddl).execute(db.pool()).await.unwrap();
            }
            Some((db, outbox))
        }

        async fn rows(pool: &sqlx::Pool<$db>, table: &str) -> i64 {
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(pool)
                .await
                .unwrap()
        }

        #[tokio::test]
        async fn a_producer_appends_its_events_in_the_callers_transaction() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let broker = broker().await;
            let pool = outbox.pool().clone();

            let mut tx = pool.begin().await.unwrap();
            let ada = create_user(&mut tx, 1, "ada").await.unwrap();
            assert_eq!(ada, UserCreated { user_id: 1, name: "ada".into() });
            let team = create_team(&mut tx, 10..13).await.unwrap();
            assert_eq!(team.len(), 3);
            // Inside the transaction: nothing is visible outside yet.
            assert_eq!(count(&outbox.counts().await.unwrap(), "NEW"), 0);
            outbox.commit(tx).await.unwrap();
            assert_eq!(count(&outbox.counts().await.unwrap(), "NEW"), 4);

            // A transaction that rolls back takes its events with it.
            let mut tx = pool.begin().await.unwrap();
            create_user(&mut tx, 2, "bob").await.unwrap();
            tx.rollback().await.unwrap();
            assert_eq!(count(&outbox.counts().await.unwrap(), "NEW"), 4);

            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), fast_relay())
                .expect("valid settings").spawn();
            wait_published(&outbox, Duration::from_secs(30)).await;
            let got = drain(&broker, USERS, Duration::from_secs(2)).await;
            relay.shutdown().await.unwrap();

            assert_eq!(got.len(), 4, "{got:?}");
            assert!(tally(&got).values().all(|n| *n == 1), "{got:?}");
            let first = &got[0];
            assert_eq!(first.event_type.as_deref(), Some("user.created"));
            assert_eq!(first.key.as_deref(), Some("1"));
            assert_eq!(first.content_type.as_deref(), Some("application/json"));
            assert_eq!(header(first, "tenant"), Some("acme"));
            assert_eq!(header(first, "x-name"), Some("ADA"));
            assert!(uuid::Uuid::parse_str(&first.event_id).is_ok(), "{first:?}");
            let payload: UserCreated = serde_json::from_slice(&first.body).unwrap();
            assert_eq!(payload, ada);
            let members: Vec<UserCreated> = got[1..]
                .iter()
                .map(|r| serde_json::from_slice(&r.body).unwrap())
                .collect();
            assert_eq!(members, team);
            let keys: Vec<Option<&str>> = got[1..].iter().map(|r| r.key.as_deref()).collect();
            assert_eq!(keys, [Some("team-0"), Some("team-1"), Some("team-0")]);
            assert!(got[1..].iter().all(|r| header(r, "tenant").is_none()));
        }

        #[tokio::test]
        async fn a_pool_producer_commits_and_wakes_the_relay() {
            let Some((_db, _)) = setup().await else {
                return;
            };
            let broker = broker().await;
            let pool = _db.pool().clone();
            let outbox = Outbox::with_table(pool.clone(), "macro_outbox").unwrap();
            outbox.migrate().await.unwrap();
            // A consumer queue of a Virtual Topic exists once it has been
            // subscribed; it keeps its messages after that.
            let watcher = client(&broker).await;
            watcher
                .subscribe(outbox::stomp::Subscribe::new(POINTS_QUEUE))
                .await
                .unwrap()
                .unsubscribe()
                .await
                .unwrap();

            // The relay polls once a minute: only the wake-up makes it publish now.
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), sleepy_relay())
                .expect("valid settings").spawn();
            tokio::time::sleep(Duration::from_millis(500)).await;

            let started = tokio::time::Instant::now();
            let grace = register_user(&pool, 7, "grace").await.unwrap();
            assert_eq!(grace.user_id, 7);
            assert_eq!(rows(&pool, "users").await, 1, "the business write committed");
            wait_published(&outbox, Duration::from_secs(10)).await;
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "published after {:?}",
                started.elapsed()
            );
            relay.shutdown().await.unwrap();

            let got = drain(&broker, POINTS_QUEUE, Duration::from_secs(2)).await;
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(got[0].event_type.as_deref(), Some("user.registered"));
            assert_eq!(got[0].key.as_deref(), Some("7"));
            let payload: UserCreated = serde_json::from_slice(&got[0].body).unwrap();
            assert_eq!(payload, grace);
            // The default outbox table was not used.
            let default = Outbox::new(pool.clone());
            assert_eq!(count(&default.counts().await.unwrap(), "NEW"), 0);
            assert_eq!(count(&outbox.counts().await.unwrap(), "PUBLISHED"), 1);
        }

        #[tokio::test]
        async fn a_failing_body_appends_and_publishes_nothing() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let broker = broker().await;
            let pool = outbox.pool().clone();
            let custom = Outbox::with_table(pool.clone(), "macro_outbox").unwrap();
            custom.migrate().await.unwrap();

            // Transaction form: the caller's transaction commits the body's own
            // write, but the refused call appended no event.
            let mut tx = pool.begin().await.unwrap();
            let err = create_user(&mut tx, 1, "").await.unwrap_err();
            assert!(matches!(err, AppError::Refused(_)), "{err}");
            outbox.commit(tx).await.unwrap();
            assert_eq!(rows(&pool, "users").await, 1);
            assert!(outbox.counts().await.unwrap().total() == 0);

            // Pool form: the transaction rolls back, the body's write with it.
            let err = register_user(&pool, 2, "").await.unwrap_err();
            assert!(matches!(err, AppError::Refused(_)), "{err}");
            assert_eq!(rows(&pool, "users").await, 1);
            assert!(custom.counts().await.unwrap().total() == 0);

            // A failing business write is the body's error, converted by `?`.
            let err = register_user(&pool, 1, "again").await.unwrap_err();
            assert!(matches!(err, AppError::Database(_)), "{err}");
            assert!(custom.counts().await.unwrap().total() == 0);

            let relays = [
                outbox
                    .relay(StompPublisher::new(client(&broker).await), fast_relay())
                    .expect("valid settings").spawn(),
                custom
                    .relay(StompPublisher::new(client(&broker).await), fast_relay())
                    .expect("valid settings").spawn(),
            ];
            let got = drain(&broker, USERS, Duration::from_secs(2)).await;
            for relay in relays {
                let metrics = relay.metrics().snapshot();
                relay.shutdown().await.unwrap();
                assert_eq!(metrics.published, 0, "{metrics:?}");
            }
            assert!(got.is_empty(), "{got:?}");
        }

        #[tokio::test]
        async fn a_consumer_applies_each_event_once() {
            let Some((_db, _)) = setup().await else {
                return;
            };
            let broker = broker().await;
            let pool = _db.pool().clone();
            let outbox = Outbox::with_table(pool.clone(), "macro_outbox").unwrap();
            outbox.migrate().await.unwrap();
            AwardPoints::inbox(pool.clone()).unwrap().migrate().await.unwrap();
            Audit::inbox(pool.clone()).unwrap().migrate().await.unwrap();
            assert_eq!(AwardPoints::CONSUMER, "points");
            assert_eq!(AwardPoints::DESTINATION, POINTS_QUEUE);
            assert_eq!(Audit::DESTINATION, AUDIT_QUEUE);
            assert_eq!(Audit::INBOX_TABLE, "audit_inbox");

            // Subscribing creates the Virtual Topic queues before anything is published.
            let points = AwardPoints::consumer_with(pool.clone(), fast_consumer(POINTS_QUEUE))
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            let audit = Audit::consumer(pool.clone())
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), fast_relay())
                .expect("valid settings").spawn();

            for (id, name) in [(1, "ada"), (2, "bob"), (3, "cy")] {
                register_user(&pool, id, name).await.unwrap();
            }
            let long = Duration::from_secs(30);
            let applied = eventually(long, || async {
                points.metrics().snapshot().processed == 3 && audit.metrics().snapshot().processed == 3
            })
            .await;
            assert!(
                applied,
                "three events not applied: points {:?}, audit {:?}",
                points.metrics(),
                audit.metrics()
            );
            assert_eq!(rows(&pool, "points").await, 3);
            assert_eq!(rows(&pool, "audit").await, 3);

            // The first event again, under its original id.
            let first: String = sqlx::query_scalar(
                "SELECT event_id FROM macro_outbox WHERE event_key = '1'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            let again = Event::json(
                "user.registered",
                TOPIC,
                &UserCreated {
                    user_id: 1,
                    name: "ada".into(),
                },
            )
            .unwrap()
            .with_key("1")
            .with_id(uuid::Uuid::parse_str(&first).unwrap());
            let mut tx = pool.begin().await.unwrap();
            // Through the default outbox table: the first one's holds the id already.
            let resend = Outbox::new(pool.clone());
            resend.append(&mut tx, again).await.unwrap();
            resend.commit(tx).await.unwrap();
            let resend_relay = resend
                .relay(StompPublisher::new(client(&broker).await), fast_relay())
                .expect("valid settings").spawn();

            let recognised = eventually(long, || async {
                points.metrics().snapshot().duplicates == 1 && audit.metrics().snapshot().duplicates == 1
            })
            .await;
            assert!(
                recognised,
                "the duplicate was not recognised: points {:?}, audit {:?}",
                points.metrics(),
                audit.metrics()
            );
            assert_eq!(rows(&pool, "points").await, 3, "the handler ran only once");
            assert_eq!(rows(&pool, "audit").await, 3);
            let outbox::core::consumer::ConsumerCounts { processed, duplicates, retried, failed, .. } = points.metrics().snapshot();
            assert_eq!((processed, duplicates, retried, failed), (3, 1, 0, 0));
            let counts = AwardPoints::inbox(pool.clone()).unwrap().counts().await.unwrap();
            assert_eq!(counts.processed, 3);

            // What the delivery carried reached the handler.
            let (event_type, key): (String, String) = sqlx::query_as(&format!(
                "SELECT event_type, event_key FROM audit WHERE event_id = '{first}'"
            ))
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!((event_type.as_str(), key.as_str()), ("user.registered", "1"));

            resend_relay.shutdown().await.unwrap();
            relay.shutdown().await.unwrap();
            points.shutdown().await.unwrap();
            audit.shutdown().await.unwrap();
        }
    };
}

mod sqlite {
    macro_suite!(sqlx::Sqlite, support::sqlite);
}

mod postgres {
    macro_suite!(sqlx::Postgres, support::postgres);
}

mod mysql {
    macro_suite!(sqlx::MySql, support::mysql);
}
