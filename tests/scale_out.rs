//! Scale-out, with separate processes on each database.
//!
//! Relays: three on one table, sharing it by key partitions; one is killed
//! with SIGKILL at a failpoint mid-run and one starts late, while rows keep
//! being appended. Every event arrives, the only duplicates are rows the
//! killed relay held unconfirmed, and each key's events arrive in order.
//!
//! Consumers: two processes on one queue with per-key order; one is killed
//! between its commit and its acks and started again. Every event is
//! applied once, and each key's events are applied in order.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox::core::consumer::{BoxFuture, HandlerError, decode_json};
use outbox::core::relay::StompPublisher;
use outbox::core::{
    Backoff, Consumer, ConsumerConfig, Delivery, Event, Handler, Inbox, Outbox, RelayConfig,
};
use serde::{Deserialize, Serialize};
use support::*;

const KEYS: i64 = 100;
/// Rows appended in each of three rounds.
const ROUND: i64 = 600;

#[derive(Debug, Serialize, Deserialize)]
struct Step {
    key: i64,
    seq: i64,
}

/// The relays of these tests: small batches, so each holds several at a
/// time, and a lease of 5 s (longer than a publish on a 2 s receipt timeout).
fn relay_config(relay_id: &str) -> RelayConfig {
    RelayConfig::default()
        .with_relay_id(relay_id)
        .with_batch_size(20)
        .with_lease(Duration::from_secs(5))
        .with_poll_interval(Duration::from_millis(50))
}

/// Starts the child test `child` of this test binary as its own process.
fn spawn_child(child: &str, env: &[(&str, String)]) -> tokio::process::Child {
    child_command(child, env)
        .spawn()
        .expect("spawn a child process")
}

/// Checks what arrived: every event of `produced` (id → (key, seq)), no
/// duplicate outside `unconfirmed`, each key's first arrivals in order.
fn check_arrivals(
    produced: &HashMap<String, (i64, i64)>,
    received: &[Received],
    unconfirmed: &HashSet<String>,
) {
    let counts = tally(received);
    let missing: Vec<_> = produced
        .keys()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events lost: {missing:?}",
        missing.len()
    );
    let stray: Vec<_> = counts
        .keys()
        .filter(|id| !produced.contains_key(*id))
        .collect();
    assert!(stray.is_empty(), "events nobody appended: {stray:?}");
    let doubled: Vec<_> = counts
        .iter()
        .filter(|(id, n)| **n > 1 && !unconfirmed.contains(*id))
        .collect();
    assert!(
        doubled.is_empty(),
        "duplicates of rows the killed relay did not hold: {doubled:?}"
    );
    let mut seen = HashSet::new();
    let mut last: HashMap<i64, i64> = HashMap::new();
    for r in received {
        if !seen.insert(r.event_id.clone()) {
            continue;
        }
        let (key, seq) = produced[&r.event_id];
        let before = last.insert(key, seq).unwrap_or(-1);
        assert!(seq > before, "key {key}: seq {seq} arrived after {before}");
    }
}

macro_rules! scale_suite {
    ($db:ty, $open:path) => {
        use super::*;

        async fn append_round(
            outbox: &Outbox<$db>,
            destination: &str,
            round: i64,
            produced: &mut HashMap<String, (i64, i64)>,
        ) {
            for chunk in 0..ROUND / KEYS {
                let mut tx = outbox.pool().begin().await.unwrap();
                for key in 0..KEYS {
                    let seq = round * ROUND + chunk * KEYS + key;
                    let event = Event::json("step", destination, &Step { key, seq })
                        .unwrap()
                        .with_key(format!("k{key}"));
                    let id = outbox.append(&mut tx, event).await.unwrap();
                    produced.insert(id.to_string(), (key, seq));
                }
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// The event ids still held by a relay whose ids start with `relay`.
        async fn held_by(outbox: &Outbox<$db>, relay: &str) -> HashSet<String> {
            let sql = format!(
                "SELECT event_id FROM {} WHERE process = 'NEW' AND claimed_by LIKE '{relay}-%'",
                outbox.table()
            );
            let rows: Vec<(String,)> = sqlx::query_as(&sql).fetch_all(outbox.pool()).await.unwrap();
            rows.into_iter().map(|(id,)| id).collect()
        }

        async fn live_relays(outbox: &Outbox<$db>) -> i64 {
            let sql = format!(
                "SELECT COUNT(*) FROM outbox_lease WHERE name >= '{t}.m.' AND name < '{t}.m/' \
                 AND until_time > {now}",
                t = outbox.table(),
                now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
            );
            let (n,): (i64,) = sqlx::query_as(&sql).fetch_one(outbox.pool()).await.unwrap();
            n
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn three_relays_one_killed_one_late_lose_nothing_and_keep_key_order() {
            let Some(db) = $open().await else {
                return;
            };
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            let broker = broker().await;
            let dest = "/queue/test.scale_out";
            let child = concat!(module_path!(), "::child_relay");
            let child = child.split_once("::").map_or(child, |(_, rest)| rest);
            let env = |relay: &str, failpoint: Option<&str>| {
                let mut env = vec![
                    ("OUTBOX_TEST_DB_URL", db.url().to_owned()),
                    ("OUTBOX_TEST_BROKER", broker.stomp_uri()),
                    ("OUTBOX_TEST_RELAY_ID", relay.to_owned()),
                ];
                if let Some(point) = failpoint {
                    env.push(("OUTBOX_FAILPOINT", point.to_owned()));
                }
                env
            };
            let mut produced = HashMap::new();
            append_round(&outbox, dest, 0, &mut produced).await;

            // Relay A dies at its 12th receipt, before marking that batch.
            let mut a = spawn_child(child, &env("relay-a", Some("relay.after_receipt@12")));
            let mut b = spawn_child(child, &env("relay-b", None));
            append_round(&outbox, dest, 1, &mut produced).await;
            let status = tokio::time::timeout(Duration::from_secs(120), a.wait())
                .await
                .expect("relay A reaches its failpoint")
                .expect("relay A's exit status");
            use std::os::unix::process::ExitStatusExt as _;
            assert_eq!(
                status.signal(),
                Some(9),
                "relay A was killed at its failpoint"
            );
            // What A held when it died: published or not, only these may come twice.
            let unconfirmed = held_by(&outbox, "relay-a").await;

            // Relay C starts late, and more rows come.
            let mut c = spawn_child(child, &env("relay-c", None));
            append_round(&outbox, dest, 2, &mut produced).await;
            wait_published(&outbox, Duration::from_secs(180)).await;
            // B and C share the table: both are members (A's membership ran out).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while live_relays(&outbox).await != 2 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "B and C never both members"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for relay in [&mut b, &mut c] {
                assert!(
                    relay.try_wait().unwrap().is_none(),
                    "a relay died on its own"
                );
                relay.kill().await.unwrap();
            }

            let received = drain(&broker, dest, Duration::from_secs(3)).await;
            check_arrivals(&produced, &received, &unconfirmed);
            assert_eq!(produced.len() as i64, 3 * ROUND);
        }

        /// What the consumers apply: a row per event, with the highest seq
        /// of its key applied before it (read in the same transaction).
        const APPLIED: &str = "CREATE TABLE IF NOT EXISTS applied (event_id VARCHAR(64) NOT NULL, \
             k BIGINT NOT NULL, seq BIGINT NOT NULL, prev BIGINT NOT NULL)";

        struct Apply;

        impl Handler<$db> for Apply {
            type Event = Step;

            fn decode(&self, delivery: &Delivery) -> Result<Step, String> {
                decode_json(delivery)
            }

            fn handle<'a>(
                &'a self,
                tx: &'a mut sqlx::Transaction<'static, $db>,
                step: Step,
                delivery: &'a Delivery,
            ) -> BoxFuture<'a, Result<(), HandlerError>> {
                Box::pin(async move {
                    let (prev,): (Option<i64>,) = sqlx::query_as(&format!(
                        "SELECT MAX(seq) FROM applied WHERE k = {}",
                        step.key
                    ))
                    .fetch_one(&mut **tx)
                    .await?;
                    sqlx::query(&format!(
                        "INSERT INTO applied (event_id, k, seq, prev) VALUES ('{}', {}, {}, {})",
                        delivery.event_id,
                        step.key,
                        step.seq,
                        prev.unwrap_or(-1)
                    ))
                    .execute(&mut **tx)
                    .await?;
                    Ok(())
                })
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn two_consumer_processes_one_killed_apply_each_event_once_in_key_order() {
            let Some(db) = $open().await else {
                return;
            };
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            Inbox::new(db.pool().clone(), "competing")
                .unwrap()
                .migrate()
                .await
                .unwrap();
            sqlx::query(APPLIED).execute(db.pool()).await.unwrap();
            let broker = broker().await;
            let dest = "/queue/test.competing";
            let child = concat!(module_path!(), "::child_consumer");
            let child = child.split_once("::").map_or(child, |(_, rest)| rest);
            let env = |failpoint: Option<&str>| {
                let mut env = vec![
                    ("OUTBOX_TEST_DB_URL", db.url().to_owned()),
                    ("OUTBOX_TEST_BROKER", broker.stomp_uri()),
                    ("OUTBOX_TEST_DEST", dest.to_owned()),
                ];
                if let Some(point) = failpoint {
                    env.push(("OUTBOX_FAILPOINT", point.to_owned()));
                }
                env
            };
            // Consumer A dies after its 15th commit, before acking it.
            let mut a = spawn_child(child, &env(Some("inbox.after_commit@15")));
            let mut b = spawn_child(child, &env(None));
            // Both subscribed before anything is published: wait for two consumers.
            tokio::time::sleep(Duration::from_secs(3)).await;

            let relay = outbox
                .relay(
                    StompPublisher::new(client(&broker).await),
                    relay_config("producer"),
                )
                .expect("valid settings")
                .spawn();
            let mut produced = HashMap::new();
            append_round(&outbox, dest, 0, &mut produced).await;
            let status = tokio::time::timeout(Duration::from_secs(120), a.wait())
                .await
                .expect("consumer A reaches its failpoint")
                .expect("consumer A's exit status");
            use std::os::unix::process::ExitStatusExt as _;
            assert_eq!(
                status.signal(),
                Some(9),
                "consumer A was killed at its failpoint"
            );
            let mut a = spawn_child(child, &env(None));
            append_round(&outbox, dest, 1, &mut produced).await;
            wait_published(&outbox, Duration::from_secs(120)).await;
            relay.shutdown().await.unwrap();

            let n = produced.len() as i64;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let (applied,): (i64,) =
                    sqlx::query_as("SELECT COUNT(DISTINCT event_id) FROM applied")
                        .fetch_one(db.pool())
                        .await
                        .unwrap();
                if applied == n {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{applied} of {n} events applied"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Redeliveries of the killed consumer's unacked messages come now
            // if at all; give them a moment, then stop both.
            tokio::time::sleep(Duration::from_secs(2)).await;
            for consumer in [&mut a, &mut b] {
                assert!(
                    consumer.try_wait().unwrap().is_none(),
                    "a consumer died on its own"
                );
                consumer.kill().await.unwrap();
            }
            let rows: Vec<(String, i64, i64, i64)> =
                sqlx::query_as("SELECT event_id, k, seq, prev FROM applied")
                    .fetch_all(db.pool())
                    .await
                    .unwrap();
            assert_eq!(rows.len() as i64, n, "each event applied exactly once");
            let ids: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
            assert_eq!(ids.len() as i64, n);
            for (id, k, seq, prev) in &rows {
                assert_eq!(
                    produced.get(id),
                    Some(&(*k, *seq)),
                    "applied an unknown event"
                );
                assert!(prev < seq, "key {k}: seq {seq} applied after {prev}");
            }
        }

        /// A consumer process: runs until killed (by its failpoint or the test).
        #[tokio::test]
        #[ignore = "run as a child process by the tests above"]
        async fn child_consumer() {
            let (Some(url), Some(broker), Some(dest)) = (
                child_var("OUTBOX_TEST_DB_URL"),
                child_var("OUTBOX_TEST_BROKER"),
                child_var("OUTBOX_TEST_DEST"),
            ) else {
                return;
            };
            let pool = sqlx::Pool::<$db>::connect(&url).await.unwrap();
            let inbox = Inbox::new(pool, "competing").unwrap();
            let client = outbox::stomp::Client::connect(
                outbox::stomp::Config::parse(&broker)
                    .unwrap()
                    .with_receipt_timeout(Duration::from_secs(2)),
            )
            .await
            .unwrap();
            let config = ConsumerConfig::new(dest)
                .with_per_key_order(true)
                .with_concurrency(4)
                .with_batch_size(8)
                .with_prefetch(Some(50))
                .with_retry_poll(Duration::from_millis(50))
                .with_retry_backoff(Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_millis(200),
                ));
            let _consumer = Consumer::new(inbox, Apply, config)
                .unwrap()
                .spawn(client)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(300)).await;
        }

        /// A relay process: runs until killed (by its failpoint or the test).
        #[tokio::test]
        #[ignore = "run as a child process by the tests above"]
        async fn child_relay() {
            let (Some(url), Some(broker), Some(relay_id)) = (
                child_var("OUTBOX_TEST_DB_URL"),
                child_var("OUTBOX_TEST_BROKER"),
                child_var("OUTBOX_TEST_RELAY_ID"),
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
                .relay(StompPublisher::new(client), relay_config(&relay_id))
                .expect("valid settings");
            let _ =
                tokio::time::timeout(Duration::from_secs(300), relay.run(std::future::pending()))
                    .await;
        }
    };
}

mod sqlite {
    scale_suite!(sqlx::Sqlite, support::sqlite);
}

mod postgres {
    scale_suite!(sqlx::Postgres, support::postgres);
}

mod mysql {
    scale_suite!(sqlx::MySql, support::mysql);
}
