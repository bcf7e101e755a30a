//! The inbox consumer against a real ActiveMQ, on SQLite, PostgreSQL and
//! MySQL/MariaDB (modules `sqlite`, `postgres`, `mysql`).
//!
//! The handler writes one `points` row per event into a table without a unique
//! key, so a double effect would show up as two rows. Crash tests re-run this
//! binary as a child process (the `#[ignore]`d `child_consumer` test) with a
//! failpoint armed.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::core::consumer::{BoxFuture, HandlerError, decode_json};
use outbox::core::{Backoff, Consumer, ConsumerConfig, Delivery, Handler, Inbox};
use outbox::stomp::{Client, Config, Limits, Outgoing};
use outbox_test_harness::{Direction, FaultProxy};
use serde::{Deserialize, Serialize};
use support::*;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct UserCreated {
    user_id: i64,
}

/// Failures to inject: user id → failures left (`u32::MAX` = until fixed).
#[derive(Clone, Default)]
struct Faults(Arc<Mutex<HashMap<i64, u32>>>);

impl Faults {
    fn should_fail(&self, user: i64) -> bool {
        let mut faults = self.0.lock().unwrap();
        match faults.get_mut(&user) {
            Some(0) | None => false,
            Some(n) => {
                if *n != u32::MAX {
                    *n -= 1;
                }
                true
            }
        }
    }
}

async fn send(client: &Client, destination: &str, event_id: &str, body: &[u8]) {
    client
        .send(
            Outgoing::new(destination.to_owned(), body.to_vec())
                .persistent(true)
                .header("event-id", event_id.to_owned())
                .header("event-type", "user.created"),
        )
        .await
        .expect("send");
}

fn user(n: i64) -> Vec<u8> {
    serde_json::to_vec(&UserCreated { user_id: n }).unwrap()
}

async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn quick(destination: &str) -> ConsumerConfig {
    ConsumerConfig::new(destination)
        .with_retry_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(50),
        ))
        .with_retry_poll(Duration::from_millis(20))
}

macro_rules! inbox_suite {
    ($db:ty, $open:path) => {
        use super::*;

        type Db = $db;

        /// Writes one points row per event, first, then fails if told to: a
        /// failure must roll the row back.
        struct Points {
            faults: Faults,
            /// Users in the order their events were applied.
            order: Arc<Mutex<Vec<i64>>>,
            /// Time each handler takes.
            delay: Duration,
            /// Only users below this id take `delay`.
            slow_below: i64,
        }

        fn points_handler(faults: &Faults) -> Points {
            Points { faults: faults.clone(), order: Arc::default(), delay: Duration::ZERO, slow_below: i64::MAX }
        }

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
                    sqlx::query(&format!("INSERT INTO points (user_id, points) VALUES ({}, 100)", event.user_id))
                        .execute(&mut **tx)
                        .await?;
                    if event.user_id < self.slow_below {
                        tokio::time::sleep(self.delay).await;
                    }
                    if self.faults.should_fail(event.user_id) {
                        return Err(format!("points service refused user {}", event.user_id).into());
                    }
                    self.order.lock().unwrap().push(event.user_id);
                    Ok(())
                })
            }
        }

        async fn setup() -> Option<(outbox_test_harness::TestDb<Db>, Inbox<Db>)> {
            let db = $open().await?;
            let inbox = Inbox::new(db.pool().clone(), "points").unwrap();
            inbox.migrate().await.unwrap();
            inbox.migrate().await.unwrap();
            sqlx::query("CREATE TABLE points (user_id BIGINT NOT NULL, points BIGINT NOT NULL)")
                .execute(db.pool())
                .await
                .unwrap();
            Some((db, inbox))
        }

        /// Rows per user in the points table.
        async fn points(inbox: &Inbox<Db>) -> HashMap<i64, i64> {
            let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT user_id, COUNT(*) FROM points GROUP BY user_id")
                .fetch_all(inbox.pool())
                .await
                .unwrap();
            rows.into_iter().collect()
        }

        #[tokio::test]
        async fn a_duplicate_is_applied_once_and_a_malformed_payload_is_parked() {
            let Some((_db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let consumer = Consumer::new(
                inbox.clone(),
                points_handler(&Faults::default()),
                quick(&ConsumerConfig::virtual_topic("points", "user.created").destination),
            );
            // Subscribing creates the Virtual Topic consumer queue.
            let handle = consumer.expect("valid settings").spawn(client(&broker).await).await.unwrap();
            let producer = client(&broker).await;
            let topic = "/topic/VirtualTopic.user.created";
            send(&producer, topic, "e-1", &user(1)).await;
            send(&producer, topic, "e-1", &user(1)).await;
            send(&producer, topic, "e-bad", b"{not json").await;
            send(&producer, topic, "e-2", &user(2)).await;
            let metrics = handle.metrics().clone();
            eventually("two applied, a duplicate and a parked event", Duration::from_secs(30), || {
                let m = metrics.snapshot();
                async move { m.processed == 2 && m.duplicates == 1 && m.failed == 1 }
            })
            .await;
            handle.shutdown().await.unwrap();
            assert_eq!(points(&inbox).await, HashMap::from([(1, 1), (2, 1)]));
            let counts = inbox.counts().await.unwrap();
            assert_eq!((counts.processed, counts.retry, counts.failed), (2, 0, 1));
            let parked = inbox.parked(10).await.unwrap();
            assert_eq!(parked.len(), 1);
            assert_eq!(parked[0].event_id, "e-bad");
            assert_eq!(parked[0].content, b"{not json");
            assert!(parked[0].last_error.as_deref().unwrap().contains("UserCreated"), "{parked:?}");
        }

        #[tokio::test]
        async fn foreign_messages_with_ids_type_and_key_longer_than_the_columns_are_applied_once() {
            let Some((_db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.inbox.foreign";
            let producer = client(&broker).await;
            // Two 120-character ids that share their first 64 characters, as
            // ActiveMQ message ids from one long host name do.
            let stem = format!("ID:{}", "points-service-7d9f8b6c5-x2k4q-".repeat(3));
            let (first, second) = (format!("{stem:.64}{:->56}", "1"), format!("{stem:.64}{:->56}", "2"));
            assert_eq!((first.len(), second.len()), (120, 120));
            let long = "t".repeat(300);
            for (id, n) in [(&first, 1), (&first, 1), (&second, 2)] {
                producer
                    .send(
                        Outgoing::new(dest, user(n))
                            .persistent(true)
                            .header("event-id", id.clone())
                            .header("event-type", long.clone())
                            .header("event-key", long.clone()),
                    )
                    .await
                    .unwrap();
            }
            let handle = Consumer::new(inbox.clone(), points_handler(&Faults::default()), quick(dest))
                .expect("valid settings").spawn(client(&broker).await)
                .await
                .unwrap();
            let metrics = handle.metrics().clone();
            eventually("two applied and a duplicate", Duration::from_secs(30), || {
                let m = metrics.snapshot();
                async move { m.processed == 2 && m.duplicates == 1 }
            })
            .await;
            handle.shutdown().await.unwrap();
            assert_eq!(points(&inbox).await, HashMap::from([(1, 1), (2, 1)]));
            let counts = inbox.counts().await.unwrap();
            assert_eq!((counts.processed, counts.retry, counts.failed), (2, 0, 0));
            assert_eq!(metrics.snapshot().db_errors, 0, "nothing retried on a column limit");
        }

        /// Writes a `ledger` row per event; the table refuses user 13 every
        /// time: at COMMIT on PostgreSQL (a deferred unique key) and SQLite (a
        /// deferred foreign key), at the statement on MySQL (a CHECK).
        struct Ledger;

        impl Handler<Db> for Ledger {
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
                    sqlx::query(&format!("INSERT INTO ledger (user_id) VALUES ({})", event.user_id))
                        .execute(&mut **tx)
                        .await?;
                    Ok(())
                })
            }
        }

        async fn refuse_user_13(pool: &sqlx::Pool<Db>) {
            let statements: &[&str] = match <Db as outbox::core::Backend>::DIALECT.name {
                "PostgreSQL" => &[
                    "CREATE TABLE ledger (user_id BIGINT NOT NULL, \
                     CONSTRAINT ledger_once UNIQUE (user_id) DEFERRABLE INITIALLY DEFERRED)",
                    "INSERT INTO ledger (user_id) VALUES (13)",
                ],
                "SQLite" => &[
                    "CREATE TABLE ledger_users (id BIGINT PRIMARY KEY)",
                    "INSERT INTO ledger_users (id) VALUES (10), (11), (12), (14), (15), (16)",
                    "CREATE TABLE ledger (user_id BIGINT NOT NULL \
                     REFERENCES ledger_users (id) DEFERRABLE INITIALLY DEFERRED)",
                ],
                _ => &["CREATE TABLE ledger (user_id BIGINT NOT NULL, \
                        CONSTRAINT ledger_not_13 CHECK (user_id <> 13))"],
            };
            for sql in statements {
                sqlx::raw_sql(sql).execute(pool).await.unwrap();
            }
        }

        #[tokio::test]
        async fn a_delivery_whose_write_violates_a_constraint_every_time_is_parked_and_the_rest_of_its_batch_applied() {
            let Some((db, inbox)) = setup().await else { return };
            refuse_user_13(db.pool()).await;
            let broker = broker().await;
            let dest = "/queue/test.inbox.constraint";
            let producer = client(&broker).await;
            for n in 10..=16 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            // One worker: the waiting messages go into one transaction.
            let config = quick(dest).with_concurrency(1).with_batch_size(16).with_max_attempts(3);
            let handle = Consumer::new(inbox.clone(), Ledger, config)
                .expect("valid settings").spawn(client(&broker).await)
                .await
                .unwrap();
            eventually("six applied and one parked", Duration::from_secs(60), || {
                let inbox = inbox.clone();
                async move {
                    let counts = inbox.counts().await.unwrap();
                    counts.processed == 6 && counts.failed == 1
                }
            })
            .await;
            let metrics = handle.metrics().clone();
            handle.shutdown().await.unwrap();
            let mut users: Vec<i64> = sqlx::query_scalar("SELECT user_id FROM ledger WHERE user_id <> 13")
                .fetch_all(db.pool())
                .await
                .unwrap();
            users.sort();
            assert_eq!(users, vec![10, 11, 12, 14, 15, 16], "the rest applied once");
            let parked = inbox.parked(10).await.unwrap();
            assert_eq!(parked.len(), 1, "{parked:?}");
            assert_eq!(parked[0].event_id, "e-13");
            let error = parked[0].last_error.clone().unwrap_or_default();
            assert!(!error.is_empty(), "parked with its error");
            assert_eq!(parked[0].content, user(13), "parked with its payload");
            let counts = inbox.counts().await.unwrap();
            assert_eq!((counts.processed, counts.retry, counts.failed), (6, 0, 1));
            println!("parked with {error:?}; {metrics:?}");
        }

        /// The previous run applied `e-old` eight days ago and died before its
        /// ACK; the broker still holds it, behind a backlog. Retention (seven
        /// days) must not delete its row before it comes back.
        #[tokio::test]
        async fn after_a_long_downtime_retention_waits_until_the_queue_is_drained() {
            let Some((db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.inbox.downtime";
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            let then = now - 8 * 24 * 3_600_000;
            for sql in [
                format!(
                    "INSERT INTO inbox_event (consumer, event_id, process, attempts, \
                     create_time, update_time, processed_time) \
                     VALUES ('points', 'e-old', 'PROCESSED', 1, {then}, {then}, {then})"
                ),
                "INSERT INTO points (user_id, points) VALUES (999, 100)".to_owned(),
            ] {
                sqlx::raw_sql(&sql).execute(db.pool()).await.unwrap();
            }
            let producer = client(&broker).await;
            for n in 1..=100 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            send(&producer, dest, "e-old", &user(999)).await;
            // One event per transaction, one at a time: the backlog takes a
            // while, and retention is due all along.
            let config = quick(dest)
                .with_concurrency(1)
                .with_batch_size(1)
                .with_retention(Some(Duration::from_secs(7 * 24 * 3600)))
                .with_retention_interval(Duration::from_millis(20));
            let handle = Consumer::new(inbox.clone(), points_handler(&Faults::default()), config)
                .expect("valid settings").spawn(client(&broker).await)
                .await
                .unwrap();
            let metrics = handle.metrics().clone();
            eventually("the backlog applied and e-old seen again", Duration::from_secs(60), || {
                let m = metrics.snapshot();
                async move { m.processed + m.duplicates >= 101 }
            })
            .await;
            let old_rows = || async {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox_event WHERE event_id = 'e-old'")
                    .fetch_one(db.pool())
                    .await
                    .unwrap();
                n
            };
            // Drained: now retention deletes the old row.
            eventually("the old row deleted after the drain", Duration::from_secs(30), || async {
                old_rows().await == 0
            })
            .await;
            handle.shutdown().await.unwrap();
            let outbox::core::consumer::ConsumerCounts { processed, duplicates, .. } = metrics.snapshot();
            assert_eq!((processed, duplicates), (100, 1), "e-old is a duplicate, not applied again");
            assert_eq!(points(&inbox).await.get(&999), Some(&1));
        }

        #[tokio::test]
        async fn a_prefilled_queue_with_duplicates_failures_and_bad_payloads_is_applied_once() {
            let Some((_db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.inbox.batch";
            let producer = client(&broker).await;
            send(&producer, dest, "e-1", &user(1)).await;
            send(&producer, dest, "e-1", &user(1)).await;
            send(&producer, dest, "e-bad", b"[]").await;
            send(&producer, dest, "e-2", &user(2)).await;
            send(&producer, dest, "e-3", &user(3)).await;
            send(&producer, dest, "e-4", &user(4)).await;
            let faults = Faults::default();
            faults.0.lock().unwrap().insert(3, 1);
            // One worker: waiting messages go into one transaction when they
            // arrive together.
            let config = quick(dest).with_concurrency(1).with_batch_size(16);
            let handle = Consumer::new(inbox.clone(), points_handler(&faults), config)
                .expect("valid settings").spawn(client(&broker).await)
                .await
                .unwrap();
            eventually("four applied", Duration::from_secs(30), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed == 4 }
            })
            .await;
            let metrics = handle.metrics().clone();
            handle.shutdown().await.unwrap();
            assert_eq!(points(&inbox).await, HashMap::from([(1, 1), (2, 1), (3, 1), (4, 1)]));
            let outbox::core::consumer::ConsumerCounts { processed, duplicates, retried, failed, .. } = metrics.snapshot();
            assert_eq!((processed, duplicates, failed), (4, 1, 1));
            // User 3's one failure either rolled back the batch it was in (then
            // it is applied on its own, no retry) or, if the messages arrived
            // one by one, scheduled one local retry.
            assert!(retried <= 1, "{retried}");
            assert_eq!(inbox.parked(10).await.unwrap()[0].event_id, "e-bad");
        }

        #[tokio::test]
        async fn failing_handlers_are_retried_parked_and_replayed_while_others_flow() {
            let Some((_db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let faults = Faults::default();
            faults.0.lock().unwrap().extend([(1, 3), (2, u32::MAX)]);
            let dest = "/queue/test.inbox.retry";
            let handle = Consumer::new(inbox.clone(), points_handler(&faults), quick(dest))
                .expect("valid settings").spawn(client(&broker).await)
                .await
                .unwrap();
            let producer = client(&broker).await;
            for n in 1..=10 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            eventually("user 2 parked and the other nine applied", Duration::from_secs(30), || {
                let inbox = inbox.clone();
                async move {
                    let c = inbox.counts().await.unwrap();
                    c.processed == 9 && c.failed == 1
                }
            })
            .await;
            let parked = inbox.parked(10).await.unwrap();
            assert_eq!(parked[0].event_id, "e-2");
            assert_eq!(parked[0].attempts, 5);
            assert!(parked[0].last_error.as_deref().unwrap().contains("refused user 2"));
            let applied = points(&inbox).await;
            assert_eq!(applied.len(), 9, "{applied:?}");
            assert!(!applied.contains_key(&2), "a failed attempt must leave no row");

            // The cause is fixed; replay.
            faults.0.lock().unwrap().insert(2, 0);
            assert!(inbox.replay("e-2").await.unwrap());
            eventually("the replayed event applied", Duration::from_secs(30), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed == 10 }
            })
            .await;
            let metrics = handle.metrics().clone();
            handle.shutdown().await.unwrap();
            let applied = points(&inbox).await;
            assert_eq!(applied, (1..=10).map(|n| (n, 1)).collect::<HashMap<_, _>>());
            let outbox::core::consumer::ConsumerCounts { processed, duplicates, retried, failed, .. } = metrics.snapshot();
            assert_eq!((processed, duplicates, failed), (10, 0, 1));
            // Retention removes processed rows in small batches, nothing else.
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(inbox.delete_processed(Duration::ZERO, 4).await.unwrap(), 4);
            assert_eq!(inbox.delete_processed(Duration::ZERO, 4).await.unwrap(), 4);
            assert_eq!(inbox.delete_processed(Duration::ZERO, 4).await.unwrap(), 2);
            assert_eq!(inbox.counts().await.unwrap().processed, 0);
            assert_eq!(inbox.delete_processed(Duration::from_secs(3600), 4).await.unwrap(), 0);
            // User 2: 5 recorded failures, the 5th parks it. User 1: 3 failures,
            // one of which may fall in a batch that is rolled back and applied one
            // by one, which records no retry.
            assert!(retried == 3 + 4 || retried == 2 + 4, "retried {retried}");
        }

        #[tokio::test]
        async fn consumers_killed_before_commit_and_before_ack_apply_every_event_once() {
            let Some((db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.inbox.crash";
            let producer = client(&broker).await;
            // First, as from producers outside this framework: ids longer than
            // the inbox column (120 characters, the same first 64), over-long
            // type and key; the first batches, which the children commit and
            // die on, hold them, and their redeliveries must map to the same rows.
            let stem = format!("ID:{}", "points-service-7d9f8b6c5-x2k4q-".repeat(3));
            for n in 1..=10 {
                let id = format!("{stem:.64}{n:->56}");
                assert_eq!(id.len(), 120);
                producer
                    .send(
                        Outgoing::new(dest, user(n))
                            .persistent(true)
                            .header("event-id", id)
                            .header("event-type", "t".repeat(300))
                            .header("event-key", format!("{n}{}", "k".repeat(300))),
                    )
                    .await
                    .unwrap();
            }
            for n in 11..=30 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            let child = concat!(module_path!(), "::child_consumer");
            let child = child.split_once("::").map_or(child, |(_, rest)| rest);
            for failpoint in ["inbox.before_commit", "inbox.after_commit"] {
                let env = vec![
                    ("OUTBOX_FAILPOINT", failpoint.to_owned()),
                    ("OUTBOX_TEST_DB_URL", db.url().to_owned()),
                    ("OUTBOX_TEST_BROKER", broker.stomp_uri()),
                    ("OUTBOX_TEST_QUEUE", dest.to_owned()),
                ];
                let (killed, stderr) = run_child(child, &env, Duration::from_secs(60)).await;
                assert!(killed, "child was not killed at {failpoint}: {stderr}");
            }
            let committed_before_restart = inbox.counts().await.unwrap().processed;
            assert!(committed_before_restart >= 1, "the after_commit child committed at least one event");

            let handle = Consumer::new(inbox.clone(), points_handler(&Faults::default()), quick(dest))
                .expect("valid settings").spawn(client(&broker).await)
                .await
                .unwrap();
            eventually("all 30 applied", Duration::from_secs(60), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed == 30 }
            })
            .await;
            // Let redeliveries of already-applied events arrive and be skipped.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let metrics = handle.metrics().clone();
            handle.shutdown().await.unwrap();
            let applied = points(&inbox).await;
            assert_eq!(applied, (1..=30).map(|n| (n, 1)).collect::<HashMap<_, _>>(), "every event applied exactly once");
            let outbox::core::consumer::ConsumerCounts { duplicates, .. } = metrics.snapshot();
            assert!(duplicates >= 1, "the event committed before the kill came again and was skipped");
            let counts = inbox.counts().await.unwrap();
            assert_eq!((counts.processed, counts.retry, counts.failed), (30, 0, 0));
        }

        #[tokio::test]
        #[ignore = "child process of consumers_killed_before_commit_and_before_ack_apply_every_event_once"]
        async fn child_consumer() {
            let (Some(url), Some(broker), Some(queue)) = (
                child_var("OUTBOX_TEST_DB_URL"),
                child_var("OUTBOX_TEST_BROKER"),
                child_var("OUTBOX_TEST_QUEUE"),
            ) else {
                return;
            };
            let pool = sqlx::Pool::<Db>::connect(&url).await.unwrap();
            let inbox = Inbox::new(pool, "points").unwrap();
            let client = Client::connect(outbox::stomp::Config::parse(&broker).unwrap()).await.unwrap();
            let handle = Consumer::new(inbox, points_handler(&Faults::default()), quick(&queue))
                .expect("valid settings").spawn(client)
                .await
                .unwrap();
            // The armed failpoint ends this process; a timeout means it never fired.
            tokio::time::sleep(Duration::from_secs(30)).await;
            let _ = handle.shutdown().await;
        }

        #[tokio::test]
        async fn with_per_key_order_a_failing_event_holds_back_later_events_of_its_key_only() {
            let Some((_db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let faults = Faults::default();
            faults.0.lock().unwrap().insert(1, 2);
            let dest = "/queue/test.inbox.keys";
            let handler = points_handler(&faults);
            let order = handler.order.clone();
            let config = quick(dest).with_per_key_order(true).with_concurrency(4);
            let handle = Consumer::new(inbox.clone(), handler, config)
                .expect("valid settings").spawn(client(&broker).await)
                .await
                .unwrap();
            let producer = client(&broker).await;
            for n in [1, 2, 3, 100, 4, 101, 5, 6, 102] {
                let mut message = Outgoing::new(dest.to_owned(), user(n))
                    .persistent(true)
                    .header("event-id", format!("e-{n}"));
                if n < 100 {
                    message = message.header("event-key", "user-group-a");
                }
                producer.send(message).await.unwrap();
            }
            eventually("all nine applied", Duration::from_secs(30), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed == 9 }
            })
            .await;
            handle.shutdown().await.unwrap();
            let order = order.lock().unwrap().clone();
            let keyed: Vec<i64> = order.iter().copied().filter(|n| *n < 100).collect();
            assert_eq!(keyed, vec![1, 2, 3, 4, 5, 6], "key order kept through the retries: {order:?}");
            let unkeyed: HashSet<i64> = order.iter().copied().filter(|n| *n >= 100).collect();
            assert_eq!(unkeyed, HashSet::from([100, 101, 102]));
            assert_eq!(points(&inbox).await.values().sum::<i64>(), 9);
        }

        /// Records, for each event of a key, which event of that key was the
        /// last applied before it (read in the same transaction): the
        /// business rows then show the order of application per key.
        struct Chain {
            delay: Duration,
        }

        impl Handler<Db> for Chain {
            type Event = (i64, i64);

            fn decode(&self, delivery: &Delivery) -> Result<(i64, i64), String> {
                let chain: Vec<i64> = serde_json::from_slice(&delivery.body).map_err(|e| e.to_string())?;
                match chain.as_slice() {
                    [key, n] => Ok((*key, *n)),
                    _ => Err(format!("not a [key, n] pair: {chain:?}")),
                }
            }

            fn handle<'a>(
                &'a self,
                tx: &'a mut sqlx::Transaction<'static, Db>,
                (key, n): (i64, i64),
                _delivery: &'a Delivery,
            ) -> BoxFuture<'a, Result<(), HandlerError>> {
                Box::pin(async move {
                    let last: i64 = sqlx::query_scalar(&format!(
                        "SELECT COALESCE(MAX(n), -1) FROM chain WHERE k = {key}"
                    ))
                    .fetch_one(&mut **tx)
                    .await?;
                    tokio::time::sleep(self.delay).await;
                    sqlx::query(&format!("INSERT INTO chain (k, n, prev) VALUES ({key}, {n}, {last})"))
                        .execute(&mut **tx)
                        .await?;
                    Ok(())
                })
            }
        }

        /// 20 keys of 30 events each, with per-key order, to a consumer whose
        /// broker link is reset three times while hundreds of keyed events
        /// are in flight: the broker redelivers what was not acknowledged on
        /// the new connection. Every event is applied once, and each key's
        /// events in order (each saw its predecessor as the last applied).
        #[tokio::test]
        async fn with_per_key_order_resets_of_the_broker_link_keep_each_keys_order() {
            let Some((db, inbox)) = setup().await else { return };
            sqlx::query("CREATE TABLE chain (k BIGINT NOT NULL, n BIGINT NOT NULL, prev BIGINT NOT NULL)")
                .execute(db.pool())
                .await
                .unwrap();
            let broker = broker().await;
            let dest = "/queue/test.inbox.keys.resets";
            let (keys, per_key) = (20_i64, 30_i64);
            let producer = client(&broker).await;
            for n in 0..per_key {
                for key in 0..keys {
                    let message = Outgoing::new(dest.to_owned(), serde_json::to_vec(&[key, n]).unwrap())
                        .persistent(true)
                        .header("event-id", format!("e-{key}-{n}"))
                        .header("event-key", format!("key-{key}"))
                        .header("JMSXGroupID", format!("key-{key}"));
                    producer.send(message).await.unwrap();
                }
            }
            let proxy = FaultProxy::start(broker.stomp_addr()).await.unwrap();
            let config = Config::parse(&proxy.stomp_uri())
                .unwrap()
                .with_receipt_timeout(Duration::from_secs(2));
            let consumer_client = Client::connect(config).await.unwrap();
            let config = quick(dest).with_per_key_order(true).with_concurrency(4);
            let handler = Chain { delay: Duration::from_millis(2) };
            let handle = Consumer::new(inbox.clone(), handler, config)
                .expect("valid settings")
                .spawn(consumer_client.clone())
                .await
                .unwrap();
            let total = u64::try_from(keys * per_key).unwrap();
            for (i, at) in [total / 6, total / 3, total / 2].into_iter().enumerate() {
                eventually(&format!("{at} applied before reset {}", i + 1), Duration::from_secs(120), || {
                    let inbox = inbox.clone();
                    async move { inbox.counts().await.unwrap().processed >= at }
                })
                .await;
                proxy.reset();
            }
            eventually("every event applied", Duration::from_secs(180), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed == total }
            })
            .await;
            assert!(consumer_client.epoch() >= 3, "the link was reset three times");
            handle.shutdown().await.unwrap();
            let rows: Vec<(i64, i64, i64)> = sqlx::query_as("SELECT k, n, prev FROM chain")
                .fetch_all(db.pool())
                .await
                .unwrap();
            let mut per: HashMap<i64, Vec<(i64, i64)>> = HashMap::new();
            for (k, n, prev) in rows {
                per.entry(k).or_default().push((n, prev));
            }
            assert_eq!(per.len(), usize::try_from(keys).unwrap());
            for (k, mut applied) in per {
                applied.sort_unstable();
                let ns: Vec<i64> = applied.iter().map(|(n, _)| *n).collect();
                assert_eq!(ns, (0..per_key).collect::<Vec<_>>(), "key {k}: each event applied once");
                let out_of_order: Vec<_> = applied.iter().filter(|(n, prev)| *prev != n - 1).collect();
                assert!(out_of_order.is_empty(), "key {k}: applied after a later event of its key (n, last applied before it): {out_of_order:?}");
            }
            let counts = inbox.counts().await.unwrap();
            assert_eq!((counts.processed, counts.retry, counts.failed), (total, 0, 0));
        }

        #[tokio::test]
        async fn a_message_over_the_consumers_body_limit_is_parked_and_the_rest_flow_on_one_connection() {
            let Some((_db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.inbox.oversize";
            let producer = client(&broker).await;
            for n in 1..=25 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            // Within the broker's limits, over the consumer's own.
            send(&producer, dest, "e-big", &vec![b' '; 1024 * 1024]).await;
            for n in 26..=50 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            let small = Limits { max_body: 64 * 1024, ..Limits::default() };
            let mut config = Config::parse(&broker.stomp_uri()).unwrap().with_receipt_timeout(Duration::from_secs(2));
            config.limits = small;
            let consumer_client = Client::connect(config).await.unwrap();
            let handle = Consumer::new(inbox.clone(), points_handler(&Faults::default()), quick(dest))
                .expect("valid settings")
                .spawn(consumer_client.clone())
                .await
                .unwrap();
            let metrics = handle.metrics().clone();
            eventually("fifty applied and the large one parked", Duration::from_secs(60), || {
                let m = metrics.snapshot();
                async move { m.processed == 50 && m.failed == 1 }
            })
            .await;
            assert_eq!(consumer_client.epoch(), 0, "the connection was never lost");
            assert!(consumer_client.is_connected());
            handle.shutdown().await.unwrap();
            let applied = points(&inbox).await;
            assert_eq!(applied.len(), 50);
            assert!(applied.values().all(|n| *n == 1), "{applied:?}");
            let parked = inbox.parked(10).await.unwrap();
            assert_eq!(parked.len(), 1, "{parked:?}");
            assert_eq!(parked[0].event_id, "e-big");
            assert_eq!(parked[0].event_type.as_deref(), Some("user.created"), "headers kept");
            assert!(parked[0].content.is_empty());
            let reason = parked[0].last_error.as_deref().unwrap();
            assert!(reason.contains("1048576") && reason.contains("65536") && reason.contains("max_body"), "{reason}");
            let m = metrics.snapshot();
            assert_eq!((m.processed, m.failed), (50, 1));
        }

        #[tokio::test]
        async fn a_message_over_the_consumers_header_limits_is_parked_and_the_rest_flow_on_one_connection() {
            let Some((_db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.inbox.head";
            let producer = client(&broker).await;
            for n in 1..=10 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            // Within the broker's limits (10 KiB a line, 1000 headers), over the consumer's own.
            let long = Outgoing::new(dest.to_owned(), user(1000))
                .persistent(true)
                .header("x-note", "n".repeat(4096))
                .header("event-id", "e-long")
                .header("event-type", "user.created");
            producer.send(long).await.unwrap();
            for n in 11..=20 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            let mut wide = Outgoing::new(dest.to_owned(), user(1001))
                .persistent(true)
                .header("event-id", "e-wide")
                .header("event-type", "user.created");
            for i in 0..40 {
                wide = wide.header(format!("x-tag-{i}"), format!("{i}"));
            }
            producer.send(wide).await.unwrap();
            let small = Limits { max_line_length: 1024, max_headers: 20, ..Limits::default() };
            let mut config = Config::parse(&broker.stomp_uri()).unwrap().with_receipt_timeout(Duration::from_secs(2));
            config.limits = small;
            let consumer_client = Client::connect(config).await.unwrap();
            let handle = Consumer::new(inbox.clone(), points_handler(&Faults::default()), quick(dest))
                .expect("valid settings")
                .spawn(consumer_client.clone())
                .await
                .unwrap();
            let metrics = handle.metrics().clone();
            eventually("twenty applied and the two large heads parked", Duration::from_secs(60), || {
                let m = metrics.snapshot();
                async move { m.processed == 20 && m.failed == 2 }
            })
            .await;
            assert_eq!(consumer_client.epoch(), 0, "the connection was never lost");
            assert!(consumer_client.is_connected());
            handle.shutdown().await.unwrap();
            let applied = points(&inbox).await;
            assert_eq!(applied.len(), 20);
            assert!(applied.values().all(|n| *n == 1), "{applied:?}");
            let mut parked = inbox.parked(10).await.unwrap();
            parked.sort_by(|a, b| a.event_id.cmp(&b.event_id));
            assert_eq!(parked.len(), 2, "{parked:?}");
            assert_eq!((parked[0].event_id.as_str(), parked[1].event_id.as_str()), ("e-long", "e-wide"));
            for row in &parked {
                assert_eq!(row.event_type.as_deref(), Some("user.created"), "headers kept");
            }
            let reason = parked[0].last_error.as_deref().unwrap();
            assert!(reason.contains("1024") && reason.contains("max_line_length"), "{reason}");
            let reason = parked[1].last_error.as_deref().unwrap();
            assert!(reason.contains("20") && reason.contains("max_headers"), "{reason}");
            let m = metrics.snapshot();
            assert_eq!((m.processed, m.failed), (20, 2));
        }

        #[tokio::test]
        async fn a_message_with_three_hundred_headers_is_applied_under_the_default_limits() {
            let Some((_db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.inbox.headers";
            let producer = client(&broker).await;
            let mut message = Outgoing::new(dest.to_owned(), user(1))
                .persistent(true)
                .header("event-id", "e-wide")
                .header("event-type", "user.created");
            for i in 0..300 {
                message = message.header(format!("x-tag-{i}"), format!("{i}"));
            }
            producer.send(message).await.unwrap();
            send(&producer, dest, "e-2", &user(2)).await;
            let consumer_client = client(&broker).await;
            let handle = Consumer::new(inbox.clone(), points_handler(&Faults::default()), quick(dest))
                .expect("valid settings")
                .spawn(consumer_client.clone())
                .await
                .unwrap();
            let metrics = handle.metrics().clone();
            eventually("both applied", Duration::from_secs(30), || {
                let m = metrics.snapshot();
                async move { m.processed == 2 }
            })
            .await;
            assert_eq!(consumer_client.epoch(), 0, "the connection was never lost");
            handle.shutdown().await.unwrap();
            assert_eq!(points(&inbox).await, HashMap::from([(1, 1), (2, 1)]));
        }

        /// Applies events like [`Points`]; the first time it sees user 1 it
        /// stalls the consumer's own connection for longer than its receipt
        /// timeout: the broker stops reading (the proxy freezes that way)
        /// while a large frame is being written, so the ACK that follows
        /// waits behind it and fails, on a connection that lives on.
        struct StallOnce {
            points: Points,
            proxy: Arc<FaultProxy>,
            client: Client,
            stalled: Arc<std::sync::atomic::AtomicBool>,
        }

        impl Handler<Db> for StallOnce {
            type Event = UserCreated;

            fn decode(&self, delivery: &Delivery) -> Result<UserCreated, String> {
                decode_json(delivery)
            }

            fn handle<'a>(
                &'a self,
                tx: &'a mut sqlx::Transaction<'static, Db>,
                event: UserCreated,
                delivery: &'a Delivery,
            ) -> BoxFuture<'a, Result<(), HandlerError>> {
                Box::pin(async move {
                    use std::sync::atomic::Ordering;
                    if event.user_id == 1 && !self.stalled.swap(true, Ordering::SeqCst) {
                        self.proxy.freeze(Direction::ToServer);
                        // More than the socket buffers on both sides of the
                        // proxy hold: the write blocks until the proxy reads again.
                        let big = Outgoing::new("/topic/test.inbox.nobody", vec![b'x'; 32 * 1024 * 1024]);
                        let sent = self.client.send_unconfirmed(big).await;
                        assert!(sent.is_err(), "the write must still be blocked");
                        let proxy = self.proxy.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            proxy.pass();
                        });
                    }
                    self.points.handle(tx, event, delivery).await
                })
            }
        }

        #[tokio::test]
        async fn an_ack_that_fails_on_a_live_connection_is_sent_again_and_the_queue_flows() {
            let Some((_db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.inbox.ackfail";
            let producer = client(&broker).await;
            for n in 1..=10 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            let proxy = Arc::new(FaultProxy::start(broker.stomp_addr()).await.unwrap());
            let config = Config::parse(&proxy.stomp_uri())
                .unwrap()
                .with_receipt_timeout(Duration::from_secs(1))
                .with_write_timeout(Duration::from_secs(30));
            let consumer_client = Client::connect(config).await.unwrap();
            let handler = StallOnce {
                points: points_handler(&Faults::default()),
                proxy: proxy.clone(),
                client: consumer_client.clone(),
                stalled: Arc::default(),
            };
            // One unacknowledged delivery takes the only prefetch slot.
            let config = quick(dest).with_prefetch(Some(1)).with_concurrency(1).with_batch_size(1);
            let handle = Consumer::new(inbox.clone(), handler, config)
                .expect("valid settings")
                .spawn(consumer_client.clone())
                .await
                .unwrap();
            eventually("all ten applied", Duration::from_secs(60), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed == 10 }
            })
            .await;
            let m = handle.metrics().snapshot();
            assert!(m.ack_failures >= 1, "{m:?}");
            handle.shutdown().await.unwrap();
            let applied = points(&inbox).await;
            assert_eq!(applied.len(), 10, "{applied:?}");
            assert!(applied.values().all(|n| *n == 1), "applied once each: {applied:?}");
            // Nothing is left in flight on the queue.
            assert!(drain(&broker, dest, Duration::from_secs(2)).await.is_empty());
        }

        #[tokio::test]
        async fn a_broker_restart_loses_nothing_and_doubles_nothing() {
            let Some((_db, inbox)) = setup().await else { return };
            let mut broker = broker().await;
            let dest = "/queue/test.inbox.restart";
            let producer = client(&broker).await;
            for n in 1..=200 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            let _ = producer.disconnect().await;
            let config = quick(dest).with_concurrency(2);
            let slow = Points { delay: Duration::from_millis(20), ..points_handler(&Faults::default()) };
            let handle = Consumer::new(inbox.clone(), slow, config)
                .expect("valid settings").spawn(client(&broker).await)
                .await
                .unwrap();
            eventually("some events applied", Duration::from_secs(30), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed >= 20 }
            })
            .await;
            broker.kill().await.unwrap();
            let before_restart = inbox.counts().await.unwrap().processed;
            assert!(before_restart < 200, "the broker must die mid-stream");
            tokio::time::sleep(Duration::from_millis(500)).await;
            broker.start_again().await.unwrap();
            eventually("all 200 applied after the restart", Duration::from_secs(90), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed == 200 }
            })
            .await;
            handle.shutdown().await.unwrap();
            let applied = points(&inbox).await;
            let doubled: HashSet<_> = applied.iter().filter(|(_, n)| **n != 1).collect();
            assert!(doubled.is_empty(), "{doubled:?}");
            assert_eq!(applied.len(), 200);
        }
    };
}

/// Tests for databases that apply several transactions at once.
macro_rules! parallel_writers_suite {
    () => {
        /// With `per_key_order`, a key whose handler is slow and whose
        /// messages fill the subscription's prefetch holds back the other
        /// keys at the broker: ActiveMQ sends no more than the prefetch of
        /// unacknowledged messages, in queue order, and the consumer cannot
        /// give a slow key's messages back without a NACK (which ActiveMQ
        /// answers with the dead-letter queue). A prefetch above the slow
        /// key's backlog lets the others through; docs/configuration.md says
        /// so. On SQLite one transaction writes at a time, so a slow
        /// handler holds up every key whatever the prefetch: not run there.
        #[tokio::test]
        async fn with_per_key_order_a_slow_key_over_the_prefetch_paces_the_other_keys_until_the_prefetch_covers_it() {
            let mut others_at_half = Vec::new();
            for (run, prefetch) in [(0, 16u32), (1, 1000)] {
                let Some((_db, inbox)) = setup().await else { return };
                let broker = broker().await;
                let dest = format!("/queue/test.inbox.slow_key.{run}");
                let producer = client(&broker).await;
                // 120 events of one slow key (users 1..=120), each followed by
                // an event of a key of its own (users 1001..=1120).
                for n in 1..=120 {
                    for (user_id, key) in [(n, "slow".to_owned()), (1000 + n, format!("k{n}"))] {
                        let message = Outgoing::new(dest.clone(), user(user_id))
                            .persistent(true)
                            .header("event-id", format!("e-{user_id}"))
                            .header("event-key", key);
                        producer.send(message).await.unwrap();
                    }
                }
                let handler = Points { delay: Duration::from_millis(40), slow_below: 1000, ..points_handler(&Faults::default()) };
                let order = handler.order.clone();
                let config = quick(&dest).with_per_key_order(true).with_concurrency(4).with_batch_size(1).with_prefetch(Some(prefetch));
                let handle = Consumer::new(inbox.clone(), handler, config)
                    .expect("valid settings").spawn(client(&broker).await)
                    .await
                    .unwrap();
                let (mut slow, mut others) = (0, 0);
                eventually("half the slow key applied", Duration::from_secs(60), || {
                    let order = order.lock().unwrap();
                    slow = order.iter().filter(|n| **n < 1000).count();
                    others = order.len() - slow;
                    async move { slow >= 60 }
                })
                .await;
                eprintln!("prefetch {prefetch}: {others} of 120 other-key events applied while 60 of the slow key's 120 were");
                others_at_half.push(others);
                eventually("all 240 applied", Duration::from_secs(60), || {
                    let inbox = inbox.clone();
                    async move { inbox.counts().await.unwrap().processed == 240 }
                })
                .await;
                handle.shutdown().await.unwrap();
                let keyed: Vec<i64> = order.lock().unwrap().iter().copied().filter(|n| *n < 1000).collect();
                assert_eq!(keyed, (1..=120).collect::<Vec<_>>(), "the slow key's order");
            }
            assert!(others_at_half[0] < 120, "a prefetch of 16 let every other key past the slow one: {others_at_half:?}");
            assert_eq!(others_at_half[1], 120, "a prefetch above the backlog held other keys back: {others_at_half:?}");
        }
    };
}

mod sqlite {
    inbox_suite!(sqlx::Sqlite, support::sqlite);
}

mod postgres {
    inbox_suite!(sqlx::Postgres, support::postgres);
    parallel_writers_suite!();
}

mod mysql {
    inbox_suite!(sqlx::MySql, support::mysql);
    parallel_writers_suite!();
}
