//! Who may publish a handed-off row: two relays started under one
//! `relay_id` (each with a pool of its own, as two processes would be) share
//! the hand-off token, so only one of them may run at a time; and a row
//! handed off in a transaction that commits late, with little of its lease
//! left, is not also claimed by another relay while it is on its way.
//! Against a real ActiveMQ, on SQLite, PostgreSQL and MySQL/MariaDB; every
//! test counts the copies of each event the broker received.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use outbox::core::relay::{OutboxMessage, PublishError, Publisher, StompPublisher};
use outbox::core::{Backoff, Event, Outbox, RelayConfig};
use support::*;

/// Waits `delay` before each publish, then publishes for real: rows stay
/// leased and unmarked that much longer.
#[derive(Clone)]
struct Slow {
    inner: StompPublisher,
    delay: Duration,
}

impl Publisher for Slow {
    fn max_publish_time(&self) -> Option<Duration> {
        self.inner.max_publish_time().map(|t| t + self.delay)
    }

    async fn publish(&self, batch: &[OutboxMessage]) -> Result<(), PublishError> {
        tokio::time::sleep(self.delay).await;
        self.inner.publish(batch).await
    }
}

fn relay_config(relay_id: &str) -> RelayConfig {
    RelayConfig::default()
        .with_relay_id(relay_id.to_owned())
        .with_poll_interval(Duration::from_millis(50))
        .with_lease(Duration::from_secs(8))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
}

/// Events that arrived more than once, and how many copies too many.
fn doubled(counts: &HashMap<String, usize>) -> usize {
    counts.values().map(|n| n.saturating_sub(1)).sum()
}

macro_rules! ownership_suite {
    ($db:ty, $open:path) => {
        use super::*;

        type Db = $db;

        /// A second pool on the same database: what another process has.
        async fn second_pool(url: &str) -> sqlx::Pool<Db> {
            sqlx::pool::PoolOptions::<Db>::new()
                .max_connections(8)
                .connect(url)
                .await
                .unwrap()
        }

        async fn append(outbox: &Outbox<Db>, dest: &str, from: i64, n: i64) -> Vec<String> {
            let mut tx = outbox.pool().begin().await.unwrap();
            let mut ids = Vec::new();
            for seq in from..from + n {
                let event = Event::json("ok", dest, &seq).unwrap();
                ids.push(outbox.append(&mut tx, event).await.unwrap().to_string());
            }
            outbox.commit(tx).await.unwrap();
            ids
        }

        #[tokio::test]
        async fn two_relays_started_under_one_relay_id_publish_each_row_once() {
            let Some(db) = $open().await else { return };
            let outbox_a = Outbox::new(db.pool().clone());
            outbox_a.migrate().await.unwrap();
            let outbox_b = Outbox::new(second_pool(db.url()).await);
            let broker = broker().await;
            let dest = "/queue/test.ownership.twins";
            let slow = async || Slow {
                inner: StompPublisher::new(client(&broker).await),
                delay: Duration::from_millis(150),
            };
            let relay_a = outbox_a.relay(slow().await, relay_config("twin")).unwrap().spawn();
            let relay_b = outbox_b.relay(slow().await, relay_config("twin")).unwrap().spawn();
            // Rows appended in both "processes", each handed off to the
            // relay of its own pool, under the token both relays share.
            let mut ids = Vec::new();
            for round in 0..10 {
                ids.extend(append(&outbox_a, dest, round * 20, 10).await);
                ids.extend(append(&outbox_b, dest, round * 20 + 10, 10).await);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            wait_published(&outbox_a, Duration::from_secs(60)).await;
            // One of them stops; the other goes on with rows appended after.
            relay_a.shutdown().await.unwrap();
            ids.extend(append(&outbox_b, dest, 1000, 10).await);
            ids.extend(append(&outbox_a, dest, 2000, 10).await);
            wait_published(&outbox_a, Duration::from_secs(60)).await;
            relay_b.shutdown().await.unwrap();
            let got = drain(&broker, dest, Duration::from_secs(2)).await;
            let counts = tally(&got);
            let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
            eprintln!(
                "{} events, {} messages received, {} copies too many, {missing} missing",
                ids.len(),
                got.len(),
                doubled(&counts)
            );
            assert_eq!(missing, 0, "events never published");
            assert_eq!(doubled(&counts), 0, "events published by both relays");
            assert_eq!(got.len(), ids.len());
        }

        #[tokio::test]
        async fn a_row_committed_near_the_end_of_its_hand_off_lease_is_not_claimed_by_another_relay_on_its_way() {
            let Some(db) = $open().await else { return };
            let outbox_a = Outbox::new(db.pool().clone());
            outbox_a.migrate().await.unwrap();
            let outbox_b = Outbox::new(second_pool(db.url()).await);
            let broker = broker().await;
            let dest = "/queue/test.ownership.late_commit";
            // Relay A takes 2 s per publish (within its lease of 8 s).
            let relay_a = outbox_a
                .relay(
                    Slow {
                        inner: StompPublisher::new(client(&broker).await),
                        delay: Duration::from_secs(2),
                    },
                    relay_config("late-a"),
                )
                .unwrap()
                .spawn();
            // Relay B serves the same table from another pool (another process).
            let relay_b = outbox_b
                .relay(StompPublisher::new(client(&broker).await), relay_config("late-b"))
                .unwrap()
                .spawn();
            // The producer's transaction stays open 7 s of the 8 s lease its
            // rows were handed off with at append.
            let mut tx = outbox_a.pool().begin().await.unwrap();
            let mut ids = Vec::new();
            for seq in 0..5 {
                let event = Event::json("ok", dest, &seq).unwrap();
                ids.push(outbox_a.append(&mut tx, event).await.unwrap().to_string());
            }
            tokio::time::sleep(Duration::from_secs(7)).await;
            outbox_a.commit(tx).await.unwrap();
            wait_published(&outbox_a, Duration::from_secs(60)).await;
            // Anything still on its way arrives before the relays stop.
            tokio::time::sleep(Duration::from_secs(3)).await;
            relay_a.shutdown().await.unwrap();
            relay_b.shutdown().await.unwrap();
            let got = drain(&broker, dest, Duration::from_secs(2)).await;
            let counts = tally(&got);
            let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
            eprintln!(
                "{} events, {} messages received, {} copies too many, {missing} missing",
                ids.len(),
                got.len(),
                doubled(&counts)
            );
            assert_eq!(missing, 0, "events never published");
            assert_eq!(doubled(&counts), 0, "events published by both relays");
        }
    };
}

mod sqlite {
    ownership_suite!(sqlx::Sqlite, support::sqlite);
}

mod postgres {
    ownership_suite!(sqlx::Postgres, support::postgres);
}

mod mysql {
    ownership_suite!(sqlx::MySql, support::mysql);
}
