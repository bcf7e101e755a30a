//! Leases decided on the database's clock: a relay on a host whose clock is
//! an hour ahead takes no rows another relay holds, and shares the key
//! partitions as if its clock were right. Against a real ActiveMQ, on SQLite,
//! PostgreSQL and MySQL/MariaDB; the skewed relay is a child process of this
//! test binary (`OUTBOX_CLOCK_SKEW_MS`, feature `failpoints`).

mod support;

use std::sync::Arc;
use std::time::Duration;

use outbox::core::relay::{OutboxMessage, PublishError, Publisher, StompPublisher};
use outbox::core::{Event, Outbox, RelayConfig};
use support::*;
use tokio::sync::watch;

/// Holds every publish until the gate opens, then publishes for real.
#[derive(Clone)]
struct Gated {
    inner: StompPublisher,
    open: watch::Receiver<bool>,
}

impl Publisher for Gated {
    fn max_publish_time(&self) -> Option<Duration> {
        self.inner.max_publish_time()
    }

    async fn publish(&self, batch: &[OutboxMessage]) -> Result<(), PublishError> {
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        self.inner.publish(batch).await
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_millis(50))
        // Longer than the test holds the batch; far shorter than the skew.
        .with_lease(Duration::from_secs(30))
        .with_handoff(false)
}

const DEST: &str = "/queue/test.clock";

macro_rules! clock_suite {
    ($db:ty, $open:path) => {
        use super::*;

        #[tokio::test]
        async fn a_relay_whose_clock_is_an_hour_ahead_takes_no_rows_another_relay_holds() {
            let Some(db) = $open().await else { return };
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            let broker = broker().await;
            let mut tx = outbox.pool().begin().await.unwrap();
            let mut ids = Vec::new();
            for seq in 0..20 {
                let event = Event::json("ok", DEST, &seq)
                    .unwrap()
                    .with_key(format!("k{}", seq % 5));
                ids.push(outbox.append(&mut tx, event).await.unwrap().to_string());
            }
            outbox.commit(tx).await.unwrap();

            let (gate, open) = watch::channel(false);
            let publisher = Gated {
                inner: StompPublisher::new(client(&broker).await),
                open,
            };
            let relay = outbox.relay(publisher, relay_config()).unwrap().spawn();
            // The held relay claims every row, and holds them.
            let pool = outbox.pool().clone();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let claimed: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM outbox_event WHERE claimed_by IS NOT NULL",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                if claimed == 20 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{claimed} rows claimed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // A relay an hour ahead runs meanwhile, in a process of its own.
            let name = concat!(module_path!(), "::child_relay_an_hour_ahead");
            let name = name.split_once("::").map_or(name, |(_, rest)| rest);
            let mut child = child_command(
                name,
                &[
                    ("OUTBOX_TEST_DB_URL", db.url().to_owned()),
                    ("OUTBOX_TEST_BROKER", broker.stomp_uri()),
                    (
                        outbox::core::failpoint::CLOCK_SKEW_VAR,
                        "3600000".to_owned(),
                    ),
                ],
            );
            let status = child.status().await.unwrap();
            assert!(status.success(), "the skewed relay failed: {status}");
            let _ = gate.send(true);
            wait_published(&outbox, Duration::from_secs(30)).await;
            relay.shutdown().await.unwrap();
            let got = drain(&broker, DEST, Duration::from_secs(2)).await;
            let counts = tally(&got);
            for id in &ids {
                assert_eq!(counts.get(id), Some(&1), "event {id}: {counts:?}");
            }
            assert_eq!(got.len(), 20);
            drop(pool);
        }

        #[tokio::test]
        #[ignore = "run by a_relay_whose_clock_is_an_hour_ahead_takes_no_rows_another_relay_holds"]
        async fn child_relay_an_hour_ahead() {
            let (Some(url), Some(broker)) = (
                child_var("OUTBOX_TEST_DB_URL"),
                child_var("OUTBOX_TEST_BROKER"),
            ) else {
                return;
            };
            let pool = sqlx::Pool::<$db>::connect(&url).await.unwrap();
            let outbox = Outbox::new(pool);
            let client = outbox::stomp::Client::connect(
                outbox::stomp::Config::parse(&broker)
                    .unwrap()
                    .with_receipt_timeout(Duration::from_secs(2)),
            )
            .await
            .unwrap();
            let relay = outbox
                .relay(StompPublisher::new(client), relay_config())
                .unwrap()
                .spawn();
            // Long enough for several claims and membership renewals.
            tokio::time::sleep(Duration::from_secs(4)).await;
            let metrics = Arc::new(relay.metrics().snapshot());
            relay.shutdown().await.unwrap();
            eprintln!("skewed relay: {metrics:?}");
        }
    };
}

mod sqlite {
    clock_suite!(sqlx::Sqlite, support::sqlite);
}

mod postgres {
    clock_suite!(sqlx::Postgres, support::postgres);
}

mod mysql {
    clock_suite!(sqlx::MySql, support::mysql);
}
