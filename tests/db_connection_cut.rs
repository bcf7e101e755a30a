//! Database connections cut while events flow, on PostgreSQL and MySQL/MariaDB
//! (modules `postgres`, `mysql`), with a real ActiveMQ.
//!
//! The pools are built the way docs/configuration.md recommends for latency:
//! `test_before_acquire(false)`, so a connection the server closed is handed
//! out once and the statement on it fails. The producer (user service, DB1),
//! the relay and the inbox consumer (points service, DB2) must come through
//! every connection of both databases being terminated again and again:
//! every event applied exactly once, nothing left unpublished or parked.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use outbox::core::consumer::{BoxFuture, HandlerError, decode_json};
use outbox::core::relay::StompPublisher;
use outbox::core::{
    Backoff, Consumer, ConsumerConfig, Delivery, Event, Handler, Inbox, Outbox, RelayConfig,
};
use serde::{Deserialize, Serialize};
use support::*;

const USERS: i64 = 300;
const CUTS: usize = 6;

#[derive(Debug, Serialize, Deserialize)]
struct UserCreated {
    user_id: i64,
}

/// The retries a service needs when a statement fails on a cut connection.
fn quick_relay() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_millis(50))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
        .with_retention(None)
}

fn quick_consumer(queue: &str) -> ConsumerConfig {
    ConsumerConfig::new(queue)
        .with_retry_backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
        .with_retry_poll(Duration::from_millis(20))
        .with_retention(None)
}

macro_rules! cut_suite {
    ($db:ty, $open:path, $placeholders:expr, $terminate:expr) => {
        use super::*;

        type Db = $db;

        struct Points;

        impl Handler<Db> for Points {
            type Event = UserCreated;

            fn decode(&self, delivery: &Delivery) -> Result<UserCreated, String> {
                decode_json(delivery)
            }

            fn handle<'a>(
                &'a self,
                tx: &'a mut sqlx::Transaction<'static, Db>,
                event: UserCreated,
                _delivery: &'a Delivery,
            ) -> BoxFuture<'a, Result<(), HandlerError>> {
                Box::pin(async move {
                    sqlx::query(&$placeholders(
                        "INSERT INTO points (user_id, points) VALUES (?, 100)",
                    ))
                    .bind(event.user_id)
                    .execute(&mut **tx)
                    .await?;
                    Ok(())
                })
            }
        }

        /// Inserts the user and its event in one transaction, retrying after a failed
        /// statement. A commit that failed but went through shows up as the user's row
        /// on the next try, so each user gets exactly one event.
        async fn register(outbox: &Outbox<Db>, user: i64, destination: &str) {
            for attempt in 0.. {
                assert!(attempt < 100, "user {user} could not be registered");
                let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = async {
                    let mut tx = outbox.pool().begin().await?;
                    let exists: Option<(i64,)> =
                        sqlx::query_as(&$placeholders("SELECT id FROM users WHERE id = ?"))
                            .bind(user)
                            .fetch_optional(&mut *tx)
                            .await?;
                    if exists.is_some() {
                        return Ok(());
                    }
                    sqlx::query(&$placeholders("INSERT INTO users (id) VALUES (?)"))
                        .bind(user)
                        .execute(&mut *tx)
                        .await?;
                    let event =
                        Event::json("user.created", destination, &UserCreated { user_id: user })?
                            .with_key(format!("user-{user}"));
                    outbox.append(&mut tx, event).await?;
                    outbox.commit(tx).await?;
                    Ok(())
                }
                .await;
                match result {
                    Ok(()) => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }

        /// A pool on `db` that does not ping a connection before handing it out.
        async fn unpinged(db: &outbox_test_harness::TestDb<Db>) -> sqlx::Pool<Db> {
            sqlx::pool::PoolOptions::<Db>::new()
                .max_connections(8)
                .test_before_acquire(false)
                .connect(db.url())
                .await
                .expect("pool")
        }

        #[tokio::test]
        async fn every_event_is_applied_once_while_database_connections_are_cut() {
            let (Some(db1), Some(db2)) = ($open().await, $open().await) else {
                return;
            };
            let (users_pool, points_pool) = (unpinged(&db1).await, unpinged(&db2).await);
            sqlx::query("CREATE TABLE users (id BIGINT NOT NULL PRIMARY KEY)")
                .execute(&users_pool)
                .await
                .unwrap();
            sqlx::query("CREATE TABLE points (user_id BIGINT NOT NULL, points BIGINT NOT NULL)")
                .execute(&points_pool)
                .await
                .unwrap();
            let outbox = Outbox::new(users_pool.clone());
            outbox.migrate().await.unwrap();
            let inbox = Inbox::new(points_pool.clone(), "points").unwrap();
            inbox.migrate().await.unwrap();

            let broker = broker().await;
            let topic = "/topic/VirtualTopic.cut.user.created";
            let consumer = Consumer::new(
                inbox.clone(),
                Points,
                quick_consumer("/queue/Consumer.points.VirtualTopic.cut.user.created"),
            )
            .expect("valid settings")
            .spawn(client(&broker).await)
            .await
            .unwrap();
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), quick_relay())
                .expect("valid settings")
                .spawn();

            let producer = {
                let outbox = outbox.clone();
                tokio::spawn(async move {
                    for user in 1..=USERS {
                        register(&outbox, user, topic).await;
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                })
            };
            let mut cut = 0;
            for _ in 0..CUTS {
                tokio::time::sleep(Duration::from_millis(150)).await;
                cut += $terminate(db1.url()).await;
                cut += $terminate(db2.url()).await;
            }
            producer.await.unwrap();
            assert!(cut >= CUTS, "connections should have been cut, {cut} were");

            wait_published(&outbox, Duration::from_secs(60)).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while inbox.counts().await.unwrap().processed < USERS as u64 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "not all events applied: {:?}",
                    inbox.counts().await
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let db_errors = consumer.metrics().snapshot().db_errors;
            eprintln!(
                "{cut} connections cut; consumer database errors: {db_errors}; relay: {:?}",
                relay.metrics().snapshot()
            );
            // Taken from the pool after the cut, a dead connection fails a statement.
            assert!(
                db_errors > 0,
                "the consumer should have met a cut connection"
            );
            relay.shutdown().await.unwrap();
            consumer.shutdown().await.unwrap();

            let rows: Vec<(i64, i64)> =
                sqlx::query_as("SELECT user_id, COUNT(*) FROM points GROUP BY user_id")
                    .fetch_all(&points_pool)
                    .await
                    .unwrap();
            let applied: HashMap<i64, i64> = rows.into_iter().collect();
            let wrong: Vec<_> = (1..=USERS).filter(|u| applied.get(u) != Some(&1)).collect();
            assert!(
                wrong.is_empty(),
                "users not applied exactly once: {wrong:?} ({cut} connections cut)"
            );
            assert_eq!(applied.len() as i64, USERS);
            let counts = inbox.counts().await.unwrap();
            assert_eq!((counts.retry, counts.failed), (0, 0), "{counts:?}");
            assert_eq!(count(&outbox.counts().await.unwrap(), "FAILED"), 0);
            assert_eq!(
                count(&outbox.counts().await.unwrap(), "PUBLISHED") as i64,
                USERS
            );
        }
    };
}

mod postgres {
    /// Terminates every other connection to the database of `url`; returns how many.
    async fn terminate(url: &str) -> usize {
        use sqlx::Connection as _;
        let mut admin = sqlx::PgConnection::connect(url)
            .await
            .expect("admin connection");
        let ended: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&mut admin)
        .await
        .expect("pg_terminate_backend");
        let _ = admin.close().await;
        ended.into_iter().filter(|(ok,)| *ok).count()
    }

    fn dollars(sql: &str) -> String {
        let mut n = 0;
        sql.chars()
            .map(|c| {
                if c == '?' {
                    n += 1;
                    format!("${n}")
                } else {
                    c.to_string()
                }
            })
            .collect()
    }

    cut_suite!(sqlx::Postgres, support::postgres, dollars, terminate);
}

mod mysql {
    /// Kills every other connection to the database of `url`; returns how many.
    async fn terminate(url: &str) -> usize {
        use sqlx::Connection as _;
        let mut admin = sqlx::MySqlConnection::connect(url)
            .await
            .expect("admin connection");
        let ids: Vec<(i64,)> = sqlx::query_as(
            "SELECT ID FROM information_schema.PROCESSLIST \
             WHERE DB = DATABASE() AND ID <> CONNECTION_ID()",
        )
        .fetch_all(&mut admin)
        .await
        .expect("processlist");
        let mut killed = 0;
        for (id,) in ids {
            // A connection may end by itself meanwhile.
            if sqlx::query(&format!("KILL CONNECTION {id}"))
                .execute(&mut admin)
                .await
                .is_ok()
            {
                killed += 1;
            }
        }
        let _ = admin.close().await;
        killed
    }

    fn same(sql: &str) -> String {
        sql.to_owned()
    }

    cut_suite!(sqlx::MySql, support::mysql, same, terminate);
}
