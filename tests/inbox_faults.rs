//! The consumer's fault paths against a real ActiveMQ, on SQLite, PostgreSQL
//! and MySQL/MariaDB (modules `sqlite`, `postgres`, `mysql`): handlers that
//! misbehave (swallow a database error, panic in `decode` or `after_commit`),
//! database errors that recur on one delivery or one retry row, and input from
//! producers outside this framework (blank event ids, ids differing only in
//! case). In each, nothing is lost, nothing is counted processed without its
//! inbox row, and one bad delivery never holds back the others.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::core::consumer::{BoxFuture, HandlerError, decode_json};
use outbox::core::{Backend, Backoff, Consumer, ConsumerConfig, Delivery, Handler, Inbox};
use outbox::stomp::{Client, Outgoing};
use serde::{Deserialize, Serialize};
use support::*;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct UserCreated {
    user_id: i64,
}

fn user(n: i64) -> Vec<u8> {
    serde_json::to_vec(&UserCreated { user_id: n }).unwrap()
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Failures to inject: user id → failures left (`u32::MAX` = for ever).
#[derive(Clone, Default)]
struct Faults(Arc<Mutex<HashMap<i64, u32>>>);

impl Faults {
    fn with(faults: &[(i64, u32)]) -> Faults {
        Faults(Arc::new(Mutex::new(faults.iter().copied().collect())))
    }

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

/// What a test handler does wrong.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Misbehaviour {
    /// Nothing: writes its ledger row, fails when its faults say so.
    None,
    /// Ignores the error of its ledger insert (`.ok()`) and returns `Ok`.
    SwallowErrors,
    /// For user 13, ends the transaction with a `ROLLBACK` of its own, as the
    /// server does after a deadlock on MySQL, writes on (autocommitted) and
    /// returns `Ok`.
    RollBack13,
    /// Decoding user 13 panics, and decoding user 17 on a retry;
    /// `after_commit` of user 14 panics.
    Panic13And14,
    /// Where its faults say to fail, never returns instead (a lock wait
    /// without a timeout, a call that never answers).
    HangWhenFaulted,
}

/// Writes one `ledger` row per event.
struct Ledger {
    misbehaviour: Misbehaviour,
    faults: Faults,
}

fn ledger(misbehaviour: Misbehaviour) -> Ledger {
    Ledger {
        misbehaviour,
        faults: Faults::default(),
    }
}

macro_rules! fault_suite {
    ($db:ty, $open:path) => {
        use super::*;

        type Db = $db;

        impl Handler<Db> for Ledger {
            type Event = UserCreated;

            fn decode(&self, delivery: &Delivery) -> Result<UserCreated, String> {
                let event: UserCreated = decode_json(delivery)?;
                if self.misbehaviour == Misbehaviour::Panic13And14 {
                    if event.user_id == 13 {
                        panic!("decoding user 13 panics");
                    }
                    if event.user_id == 17 && delivery.attempt > 0 {
                        panic!("decoding user 17 on a retry panics");
                    }
                }
                Ok(event)
            }

            fn handle<'a>(
                &'a self,
                tx: &'a mut sqlx::Transaction<'static, Db>,
                event: UserCreated,
                _delivery: &'a Delivery,
            ) -> BoxFuture<'a, Result<(), HandlerError>> {
                Box::pin(async move {
                    let insert = format!("INSERT INTO ledger (user_id) VALUES ({})", event.user_id);
                    match self.misbehaviour {
                        Misbehaviour::SwallowErrors => {
                            sqlx::query(&insert).execute(&mut **tx).await.ok();
                            return Ok(());
                        }
                        Misbehaviour::RollBack13 if event.user_id == 13 => {
                            sqlx::query(&insert).execute(&mut **tx).await?;
                            sqlx::query("ROLLBACK").execute(&mut **tx).await?;
                            sqlx::query("INSERT INTO ledger (user_id) VALUES (1013)")
                                .execute(&mut **tx)
                                .await?;
                            return Ok(());
                        }
                        _ => {}
                    }
                    sqlx::query(&insert).execute(&mut **tx).await?;
                    if self.misbehaviour == Misbehaviour::HangWhenFaulted
                        && self.faults.should_fail(event.user_id)
                    {
                        std::future::pending::<()>().await;
                    }
                    if self.faults.should_fail(event.user_id) {
                        return Err(format!("user {} refused", event.user_id).into());
                    }
                    Ok(())
                })
            }

            fn after_commit(&self, delivery: &Delivery) {
                if self.misbehaviour == Misbehaviour::Panic13And14
                    && decode_json::<UserCreated>(delivery).is_ok_and(|e| e.user_id == 14)
                {
                    panic!("after_commit of user 14 panics");
                }
            }
        }

        fn dialect() -> &'static str {
            <Db as Backend>::DIALECT.name
        }

        /// A database with an inbox of `consumer` and a `ledger` table whose
        /// user ids are unique.
        async fn setup_for(consumer: &str) -> Option<(outbox_test_harness::TestDb<Db>, Inbox<Db>)> {
            let db = $open().await?;
            let inbox = Inbox::new(db.pool().clone(), consumer).unwrap();
            inbox.migrate().await.unwrap();
            sqlx::query("CREATE TABLE ledger (user_id BIGINT NOT NULL UNIQUE)")
                .execute(db.pool())
                .await
                .unwrap();
            Some((db, inbox))
        }

        async fn setup() -> Option<(outbox_test_harness::TestDb<Db>, Inbox<Db>)> {
            setup_for("ledger").await
        }

        async fn run(db: &outbox_test_harness::TestDb<Db>, sql: &str) {
            sqlx::raw_sql(sql).execute(db.pool()).await.unwrap();
        }

        /// `sql` with `?` placeholders written the database's way.
        fn marks(sql: &str) -> String {
            if dialect() != "PostgreSQL" {
                return sql.to_owned();
            }
            let mut out = String::new();
            let mut n = 0;
            for c in sql.chars() {
                if c == '?' {
                    n += 1;
                    out.push_str(&format!("${n}"));
                } else {
                    out.push(c);
                }
            }
            out
        }

        async fn ledger_users(db: &outbox_test_harness::TestDb<Db>) -> Vec<i64> {
            let mut users: Vec<i64> = sqlx::query_scalar("SELECT user_id FROM ledger")
                .fetch_all(db.pool())
                .await
                .unwrap();
            users.sort();
            users
        }

        /// A handler that ignores a unique-key error: on PostgreSQL the error
        /// aborts its transaction and `COMMIT` answers `ROLLBACK`, so user 13's
        /// inbox row is never written. It must be retried and parked like a
        /// failing handler, never counted processed and acknowledged.
        #[tokio::test]
        async fn a_handler_that_swallows_a_database_error_never_has_its_event_counted_processed_without_a_row() {
            let Some((db, inbox)) = setup().await else { return };
            run(&db, "INSERT INTO ledger (user_id) VALUES (13)").await;
            let broker = broker().await;
            let dest = "/queue/test.faults.swallow";
            let producer = client(&broker).await;
            for n in 10..=16 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            // One worker: the waiting messages go into one transaction.
            let config = quick(dest).with_concurrency(1).with_batch_size(16).with_max_attempts(3);
            let handle = Consumer::new(inbox.clone(), ledger(Misbehaviour::SwallowErrors), config)
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            let metrics = handle.metrics().clone();
            eventually("every delivery settled", Duration::from_secs(60), || {
                let m = metrics.snapshot();
                async move { m.processed + m.failed >= 7 }
            })
            .await;
            handle.shutdown().await.unwrap();
            let m = metrics.snapshot();
            let counts = inbox.counts().await.unwrap();
            assert_eq!(m.processed, counts.processed, "every event counted processed has its inbox row: {m:?} {counts:?}");
            assert_eq!(counts.processed + counts.failed, 7, "nothing lost: {counts:?}");
            if dialect() == "PostgreSQL" {
                assert_eq!((counts.processed, counts.retry, counts.failed), (6, 0, 1));
                let parked = inbox.parked(10).await.unwrap();
                assert_eq!(parked[0].event_id, "e-13");
                assert_eq!(parked[0].attempts, 3, "retried, then parked: {parked:?}");
            } else {
                // SQLite and MySQL undo only the failed statement: the
                // transaction stands and the check passes.
                assert_eq!((counts.processed, counts.retry, counts.failed), (7, 0, 0));
            }
            assert_eq!(ledger_users(&db).await, vec![10, 11, 12, 13, 14, 15, 16]);
        }

        /// The database rolled back the handler's whole transaction (MySQL
        /// after a deadlock; here the handler's own `ROLLBACK`): what follows
        /// autocommits and `COMMIT` commits nothing. The event must be treated
        /// as a failure, on every path (batch, single, retry), and parked.
        #[tokio::test]
        async fn a_handler_whose_transaction_was_rolled_back_underneath_is_retried_and_parked() {
            // sqlx's SQLite connection keeps counting a transaction its handler
            // ended with a `ROLLBACK` of its own; SQLite itself never rolls a
            // transaction back underneath its writer in this way.
            if dialect() == "SQLite" {
                return;
            }
            let Some((db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.faults.rollback";
            let producer = client(&broker).await;
            // User 13 last: the handlers after its in a batch would write
            // outside any transaction, for good.
            for n in [10, 11, 12, 14, 15, 16, 13] {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            let config = quick(dest).with_concurrency(1).with_batch_size(16).with_max_attempts(3);
            let handle = Consumer::new(inbox.clone(), ledger(Misbehaviour::RollBack13), config)
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            let metrics = handle.metrics().clone();
            eventually("every delivery settled", Duration::from_secs(60), || {
                let m = metrics.snapshot();
                async move { m.processed + m.failed >= 7 }
            })
            .await;
            handle.shutdown().await.unwrap();
            let m = metrics.snapshot();
            let counts = inbox.counts().await.unwrap();
            assert_eq!((counts.processed, counts.retry, counts.failed), (6, 0, 1), "{m:?}");
            assert_eq!(m.processed, 6, "{m:?}");
            let parked = inbox.parked(10).await.unwrap();
            assert_eq!(parked[0].event_id, "e-13");
            assert_eq!(parked[0].attempts, 3, "{parked:?}");
            let users: Vec<i64> = ledger_users(&db).await.into_iter().filter(|u| *u < 1000).collect();
            assert_eq!(users, vec![10, 11, 12, 14, 15, 16]);
        }

        /// Retry rows of users 1 to 5, the first of which the table refuses
        /// to switch to `PROCESSED` every time: the others are retried and
        /// applied, and the refused one is parked with its error.
        #[tokio::test]
        async fn a_retry_row_the_database_refuses_every_time_is_parked_and_the_later_rows_are_retried() {
            let Some((db, inbox)) = setup().await else { return };
            match dialect() {
                "SQLite" => run(&db, "CREATE TRIGGER refuse_e1 BEFORE UPDATE ON inbox_event FOR EACH ROW \
                    WHEN NEW.event_id = 'e-1' AND NEW.process = 'PROCESSED' \
                    BEGIN SELECT RAISE(ABORT, 'e-1 is refused'); END").await,
                _ => run(&db, "ALTER TABLE inbox_event ADD CONSTRAINT refuse_e1 \
                    CHECK (event_id <> 'e-1' OR process <> 'PROCESSED')").await,
            }
            let insert = marks(
                "INSERT INTO inbox_event (consumer, event_id, event_type, process, attempts, \
                 next_attempt_at, last_error, headers, content, create_time, update_time) \
                 VALUES ('ledger', ?, 'user.created', 'RETRY', 1, 0, 'earlier failure', '[]', ?, ?, ?)",
            );
            for n in 1..=5 {
                sqlx::query(&insert)
                    .bind(format!("e-{n}"))
                    .bind(user(n))
                    .bind(now_ms())
                    .bind(now_ms())
                    .execute(db.pool())
                    .await
                    .unwrap();
            }
            let broker = broker().await;
            let config = (quick("/queue/test.faults.retry")).with_max_attempts(3);
            let handle = Consumer::new(inbox.clone(), ledger(Misbehaviour::None), config)
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            eventually("four retried and one parked", Duration::from_secs(60), || {
                let inbox = inbox.clone();
                async move {
                    let c = inbox.counts().await.unwrap();
                    c.processed == 4 && c.failed == 1
                }
            })
            .await;
            handle.shutdown().await.unwrap();
            assert_eq!(ledger_users(&db).await, vec![2, 3, 4, 5]);
            let parked = inbox.parked(10).await.unwrap();
            assert_eq!(parked[0].event_id, "e-1");
            assert!(parked[0].last_error.as_deref().is_some_and(|e| e.contains("refuse")), "{parked:?}");
            assert_eq!(parked[0].content, user(1), "parked with its payload");
        }

        /// A retry row that cannot be read (headers that are not JSON, as a
        /// hand or a non-strict MySQL cutting a long value may leave them) is
        /// parked with the reason; the other retry rows are retried. Before,
        /// the read of the whole pass failed, every pass.
        #[tokio::test]
        async fn a_retry_row_that_cannot_be_read_is_parked_and_the_others_are_retried() {
            let Some((db, inbox)) = setup().await else { return };
            let insert = marks(
                "INSERT INTO inbox_event (consumer, event_id, event_type, process, attempts, \
                 next_attempt_at, last_error, headers, content, create_time, update_time) \
                 VALUES ('ledger', ?, 'user.created', 'RETRY', 1, 0, 'earlier failure', ?, ?, ?, ?)",
            );
            for n in 1..=5 {
                let headers = if n == 1 { "[\"cut" } else { "[]" };
                sqlx::query(&insert)
                    .bind(format!("e-{n}"))
                    .bind(headers)
                    .bind(user(n))
                    .bind(now_ms())
                    .bind(now_ms())
                    .execute(db.pool())
                    .await
                    .unwrap();
            }
            let broker = broker().await;
            let config = quick("/queue/test.faults.unreadable_retry");
            let handle = Consumer::new(inbox.clone(), ledger(Misbehaviour::None), config)
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            eventually("four retried and one parked", Duration::from_secs(60), || {
                let inbox = inbox.clone();
                async move {
                    let c = inbox.counts().await.unwrap();
                    c.processed == 4 && c.failed == 1
                }
            })
            .await;
            handle.shutdown().await.unwrap();
            assert_eq!(ledger_users(&db).await, vec![2, 3, 4, 5]);
            let parked = inbox.parked(10).await.unwrap();
            assert_eq!(parked[0].event_id, "e-1");
            assert!(
                parked[0].last_error.as_deref().is_some_and(|e| e.contains("headers")),
                "{parked:?}"
            );
        }

        /// A handler that never returns for user 13, once: it is stopped at
        /// `handler_timeout`, its transaction rolled back, and the delivery
        /// applied on its next try; everything else is applied too. Without the bound the
        /// delivery was never settled (and on SQLite nothing after it was).
        #[tokio::test]
        async fn a_handler_that_never_returns_is_stopped_at_its_timeout_and_retried() {
            let Some((db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.faults.hung";
            let producer = client(&broker).await;
            for n in 10..=16 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            let config = quick(dest)
                .with_handler_timeout(Some(Duration::from_millis(500)))
                .with_max_attempts(3);
            let handler = Ledger {
                misbehaviour: Misbehaviour::HangWhenFaulted,
                faults: Faults::with(&[(13, 1)]),
            };
            let handle = Consumer::new(inbox.clone(), handler, config)
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            eventually("all seven applied", Duration::from_secs(60), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed == 7 }
            })
            .await;
            handle.shutdown().await.unwrap();
            assert_eq!(ledger_users(&db).await, (10..=16).collect::<Vec<_>>());
        }

        /// Messages from a producer outside this framework with an empty or
        /// blank `event-id`, or none: each is its own event (the broker's
        /// `message-id` decides), none is skipped as a duplicate of another.
        #[tokio::test]
        async fn foreign_messages_with_a_blank_event_id_are_each_applied() {
            let Some((db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.faults.blank";
            let producer = client(&broker).await;
            for (n, id) in [(1, Some("")), (2, Some("")), (3, Some("  ")), (4, None), (5, None)] {
                let mut message = Outgoing::new(dest, user(n)).persistent(true);
                if let Some(id) = id {
                    message = message.header("event-id", id);
                }
                producer.send(message).await.unwrap();
            }
            let handle = Consumer::new(inbox.clone(), ledger(Misbehaviour::None), quick(dest))
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            let metrics = handle.metrics().clone();
            eventually("five settled", Duration::from_secs(30), || {
                let m = metrics.snapshot();
                async move { m.processed + m.duplicates >= 5 }
            })
            .await;
            handle.shutdown().await.unwrap();
            let m = metrics.snapshot();
            assert_eq!((m.processed, m.duplicates), (5, 0), "{m:?}");
            assert_eq!(ledger_users(&db).await, vec![1, 2, 3, 4, 5]);
        }

        /// Foreign ids that differ only in case are two events.
        #[tokio::test]
        async fn event_ids_differing_only_in_case_are_two_events() {
            let Some((db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.faults.case";
            let producer = client(&broker).await;
            send(&producer, dest, "abc", &user(1)).await;
            send(&producer, dest, "ABC", &user(2)).await;
            let handle = Consumer::new(inbox.clone(), ledger(Misbehaviour::None), quick(dest))
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            let metrics = handle.metrics().clone();
            eventually("two settled", Duration::from_secs(30), || {
                let m = metrics.snapshot();
                async move { m.processed + m.duplicates >= 2 }
            })
            .await;
            handle.shutdown().await.unwrap();
            let m = metrics.snapshot();
            assert_eq!((m.processed, m.duplicates), (2, 0), "{m:?}");
            assert_eq!(ledger_users(&db).await, vec![1, 2]);
        }

        /// Foreign ids that differ only in trailing spaces are two events
        /// (MySQL's `utf8mb4_bin` pads with spaces and took them for one).
        #[tokio::test]
        async fn event_ids_differing_only_in_trailing_spaces_are_two_events() {
            let Some((db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.faults.spaces";
            let producer = client(&broker).await;
            send(&producer, dest, "abc", &user(1)).await;
            send(&producer, dest, "abc ", &user(2)).await;
            send(&producer, dest, "abc  ", &user(3)).await;
            send(&producer, dest, "abc ", &user(2)).await;
            let handle = Consumer::new(inbox.clone(), ledger(Misbehaviour::None), quick(dest))
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            let metrics = handle.metrics().clone();
            eventually("four settled", Duration::from_secs(30), || {
                let m = metrics.snapshot();
                async move { m.processed + m.duplicates >= 4 }
            })
            .await;
            handle.shutdown().await.unwrap();
            let m = metrics.snapshot();
            assert_eq!((m.processed, m.duplicates), (3, 1), "{m:?}");
            assert_eq!(ledger_users(&db).await, vec![1, 2, 3]);
        }

        /// With per-key order, an event set aside behind an earlier event of
        /// its key has spent no attempt: with a budget of three, its handler
        /// may fail twice and succeed the third time.
        #[tokio::test]
        async fn an_event_waiting_behind_its_key_keeps_its_whole_retry_budget() {
            let Some((db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.faults.waiting";
            let producer = client(&broker).await;
            for n in [1, 2] {
                producer
                    .send(
                        Outgoing::new(dest, user(n))
                            .persistent(true)
                            .header("event-id", format!("e-{n}"))
                            .header("event-key", "k"),
                    )
                    .await
                    .unwrap();
            }
            let handler = Ledger { misbehaviour: Misbehaviour::None, faults: Faults::with(&[(1, 2), (2, 2)]) };
            let config = quick(dest).with_per_key_order(true).with_max_attempts(3);
            let handle = Consumer::new(inbox.clone(), handler, config)
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            eventually("both applied or one parked", Duration::from_secs(30), || {
                let inbox = inbox.clone();
                async move {
                    let c = inbox.counts().await.unwrap();
                    c.processed + c.failed == 2
                }
            })
            .await;
            handle.shutdown().await.unwrap();
            let counts = inbox.counts().await.unwrap();
            assert_eq!(
                (counts.processed, counts.retry, counts.failed),
                (2, 0, 0),
                "parked: {:?}",
                inbox.parked(10).await.unwrap()
            );
            assert_eq!(ledger_users(&db).await, vec![1, 2]);
        }

        /// The longest consumer name (128 characters) makes a retention lease
        /// name longer than the lease column; retention still runs.
        #[tokio::test]
        async fn retention_runs_for_a_consumer_with_the_longest_name() {
            let consumer = "c".repeat(128);
            let Some((db, inbox)) = setup_for(&consumer).await else { return };
            let then = now_ms() - 8 * 24 * 3_600_000;
            run(&db, &format!(
                "INSERT INTO inbox_event (consumer, event_id, process, attempts, \
                 create_time, update_time, processed_time) \
                 VALUES ('{consumer}', 'e-old', 'PROCESSED', 1, {then}, {then}, {then})"
            ))
            .await;
            let broker = broker().await;
            let config = (quick("/queue/test.faults.retention"))
                .with_retention(Some(Duration::from_secs(7 * 24 * 3600)))
                .with_retention_interval(Duration::from_millis(20));
            let handle = Consumer::new(inbox.clone(), ledger(Misbehaviour::None), config)
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            eventually("the old row deleted", Duration::from_secs(30), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed == 0 }
            })
            .await;
            handle.shutdown().await.unwrap();
        }

        /// `decode` panics for user 13, `after_commit` for user 14: user 13 is
        /// parked, user 14 applied and acknowledged, the rest flows. Users 17
        /// and 18 fail once; decoding 17 panics on its retry, in the retry
        /// loop: it is parked, and 18's retry after it is applied.
        #[tokio::test]
        async fn a_panicking_decode_parks_its_delivery_and_a_panicking_after_commit_still_acks() {
            let Some((db, inbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.faults.panic";
            let producer = client(&broker).await;
            for n in 10..=18 {
                send(&producer, dest, &format!("e-{n}"), &user(n)).await;
            }
            // One event per transaction: a failure spends its fault once.
            let config = quick(dest).with_concurrency(1).with_batch_size(1);
            let handler = Ledger { misbehaviour: Misbehaviour::Panic13And14, faults: Faults::with(&[(17, 1), (18, 1)]) };
            let handle = Consumer::new(inbox.clone(), handler, config)
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            eventually("seven applied and two parked", Duration::from_secs(30), || {
                let inbox = inbox.clone();
                async move {
                    let c = inbox.counts().await.unwrap();
                    c.processed == 7 && c.failed == 2
                }
            })
            .await;
            let metrics = handle.metrics().clone();
            eventually("every delivery counted", Duration::from_secs(30), || {
                let m = metrics.snapshot();
                async move { m.processed == 7 && m.failed == 2 }
            })
            .await;
            handle.shutdown().await.unwrap();
            assert_eq!(ledger_users(&db).await, vec![10, 11, 12, 14, 15, 16, 18]);
            let parked = inbox.parked(10).await.unwrap();
            let parked_ids: Vec<&str> = parked.iter().map(|p| p.event_id.as_str()).collect();
            assert_eq!(parked_ids, ["e-13", "e-17"]);
            for p in &parked {
                assert!(p.last_error.as_deref().is_some_and(|e| e.contains("decode panicked")), "{parked:?}");
            }
            let left = drain(&broker, dest, Duration::from_secs(1)).await;
            assert!(left.is_empty(), "every delivery acknowledged: {:?}", tally(&left));
        }
    };
}

mod sqlite {
    fault_suite!(sqlx::Sqlite, support::sqlite);
}

mod postgres {
    fault_suite!(sqlx::Postgres, support::postgres);

    /// A deferred constraint trigger that raises for user 13 at `COMMIT`,
    /// an error the consumer classes as transient, every time: that delivery
    /// is parked after a bound and the others of its batch are applied.
    #[tokio::test]
    async fn an_error_at_commit_that_recurs_every_time_parks_its_delivery_and_the_rest_flows() {
        let Some((db, inbox)) = setup().await else {
            return;
        };
        run(
            &db,
            "CREATE FUNCTION refuse_13() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.user_id = 13 THEN RAISE EXCEPTION 'user 13 is refused at commit'; END IF; \
             RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER ledger_refuse_13 AFTER INSERT ON ledger \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_13();",
        )
        .await;
        let broker = broker().await;
        let dest = "/queue/test.faults.deferred";
        let producer = client(&broker).await;
        for n in 10..=16 {
            send(&producer, dest, &format!("e-{n}"), &user(n)).await;
        }
        let config = quick(dest)
            .with_concurrency(1)
            .with_batch_size(16)
            .with_max_attempts(3);
        let handle = Consumer::new(inbox.clone(), ledger(Misbehaviour::None), config)
            .unwrap()
            .spawn(client(&broker).await)
            .await
            .unwrap();
        eventually(
            "six applied and one parked",
            Duration::from_secs(60),
            || {
                let inbox = inbox.clone();
                async move {
                    let c = inbox.counts().await.unwrap();
                    c.processed == 6 && c.failed == 1
                }
            },
        )
        .await;
        handle.shutdown().await.unwrap();
        assert_eq!(ledger_users(&db).await, vec![10, 11, 12, 14, 15, 16]);
        let parked = inbox.parked(10).await.unwrap();
        assert_eq!(parked[0].event_id, "e-13");
        assert!(
            parked[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("refused at commit")),
            "{parked:?}"
        );
        let left = drain(&broker, dest, Duration::from_secs(1)).await;
        assert!(left.is_empty(), "{:?}", tally(&left));
    }

    /// Holds every event of key `slow` until the gate opens; writes a ledger
    /// row for the others.
    struct HeldKey {
        gate: tokio::sync::watch::Receiver<bool>,
    }

    impl Handler<sqlx::Postgres> for HeldKey {
        type Event = UserCreated;

        fn decode(&self, delivery: &Delivery) -> Result<UserCreated, String> {
            decode_json(delivery)
        }

        fn handle<'a>(
            &'a self,
            tx: &'a mut sqlx::Transaction<'static, sqlx::Postgres>,
            event: UserCreated,
            delivery: &'a Delivery,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            Box::pin(async move {
                if delivery.key.as_deref() == Some("slow") {
                    let mut gate = self.gate.clone();
                    let _ = gate.wait_for(|open| *open).await;
                }
                sqlx::query("INSERT INTO ledger (user_id) VALUES ($1)")
                    .bind(event.user_id)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            })
        }
    }

    /// With per-key order, each key goes to a lane of its own worker. A key
    /// whose handler is held, with more of its messages waiting than a lane
    /// held (64, while the default prefetch is 128), stopped the reader: the
    /// events of every other key waited behind it. Now a lane holds what
    /// the prefetch lets in.
    #[tokio::test]
    async fn a_held_key_with_many_messages_waiting_holds_up_no_other_key() {
        let Some((_db, inbox)) = setup().await else {
            return;
        };
        let broker = broker().await;
        let dest = "/queue/test.faults.lanes";
        let producer = client(&broker).await;
        let keyed = |n: i64, key: &str| {
            Outgoing::new(dest.to_owned(), user(n))
                .persistent(true)
                .header("event-id", format!("e-{n}"))
                .header("event-type", "user.created")
                .header("event-key", key.to_owned())
        };
        for n in 0..100 {
            producer.send(keyed(n, "slow")).await.unwrap();
        }
        for n in 100..116 {
            producer.send(keyed(n, &format!("k{n}"))).await.unwrap();
        }
        let (open, gate) = tokio::sync::watch::channel(false);
        let config = quick(dest).with_per_key_order(true);
        let handle = Consumer::new(inbox.clone(), HeldKey { gate }, config)
            .unwrap()
            .spawn(client(&broker).await)
            .await
            .unwrap();
        eventually(
            "events of other keys applied while `slow` is held",
            Duration::from_secs(30),
            || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed >= 8 }
            },
        )
        .await;
        let _ = open.send(true);
        eventually("all 116 applied", Duration::from_secs(60), || {
            let inbox = inbox.clone();
            async move { inbox.counts().await.unwrap().processed == 116 }
        })
        .await;
        handle.shutdown().await.unwrap();
    }
}

mod mysql {
    fault_suite!(sqlx::MySql, support::mysql);

    /// Writes one `applied` row per attempt at an event (the table has no
    /// unique key, so a second application shows as a second row). For
    /// user 13 it ends the transaction with a `ROLLBACK` of its own, as the
    /// server does after a deadlock, swallows that, writes a row for 1013
    /// and returns `Ok`.
    struct RollsBack13;

    impl Handler<sqlx::MySql> for RollsBack13 {
        type Event = UserCreated;

        fn decode(&self, delivery: &Delivery) -> Result<UserCreated, String> {
            decode_json(delivery)
        }

        fn handle<'a>(
            &'a self,
            tx: &'a mut sqlx::Transaction<'static, sqlx::MySql>,
            event: UserCreated,
            _delivery: &'a Delivery,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            Box::pin(async move {
                sqlx::query("INSERT INTO applied (user_id) VALUES (?)")
                    .bind(event.user_id)
                    .execute(&mut **tx)
                    .await?;
                if event.user_id == 13 {
                    sqlx::query("ROLLBACK").execute(&mut **tx).await.ok();
                    sqlx::query("INSERT INTO applied (user_id) VALUES (1013)")
                        .execute(&mut **tx)
                        .await?;
                }
                Ok(())
            })
        }
    }

    /// MySQL rolls the whole transaction back after a deadlock (here the
    /// handler's own `ROLLBACK`, which the server treats alike), and what
    /// follows used to autocommit: the business writes of the batch-mates
    /// after user 13 (and of 13's own later writes) were committed at once,
    /// then again when the consumer, finding its inbox rows gone, applied
    /// the batch one by one. Each event must be applied exactly once, and
    /// nothing written after the rollback may stay.
    #[tokio::test]
    async fn writes_after_a_rollback_underneath_are_discarded_and_batch_mates_apply_once() {
        let Some((db, inbox)) = setup().await else {
            return;
        };
        run(&db, "CREATE TABLE applied (user_id BIGINT NOT NULL)").await;
        let broker = broker().await;
        let dest = "/queue/test.faults.rollback.mates";
        let producer = client(&broker).await;
        let users = [10, 11, 12, 13, 14, 15, 16, 17];
        for n in users {
            send(&producer, dest, &format!("e-{n}"), &user(n)).await;
        }
        let config = quick(dest)
            .with_concurrency(1)
            .with_batch_size(16)
            .with_max_attempts(3);
        let handle = Consumer::new(inbox.clone(), RollsBack13, config)
            .unwrap()
            .spawn(client(&broker).await)
            .await
            .unwrap();
        let metrics = handle.metrics().clone();
        eventually("every delivery settled", Duration::from_secs(60), || {
            let m = metrics.snapshot();
            async move { m.processed + m.failed >= 8 }
        })
        .await;
        handle.shutdown().await.unwrap();
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT user_id, COUNT(*) FROM applied GROUP BY user_id ORDER BY user_id",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        let expected: Vec<(i64, i64)> = users
            .iter()
            .filter(|&&n| n != 13)
            .map(|&n| (n, 1))
            .collect();
        assert_eq!(rows, expected, "applications per user (user_id, rows)");
        let counts = inbox.counts().await.unwrap();
        assert_eq!((counts.processed, counts.retry, counts.failed), (7, 0, 1));
        let parked = inbox.parked(10).await.unwrap();
        assert_eq!(parked[0].event_id, "e-13");
        // The pool's connections are back in autocommit: a plain write from
        // each of them is visible to another connection.
        let mut held = Vec::new();
        for _ in 0..db.pool().size() {
            held.push(db.pool().acquire().await.unwrap());
        }
        for (n, conn) in held.iter_mut().enumerate() {
            let autocommit: i64 = sqlx::query_scalar("SELECT CAST(@@autocommit AS SIGNED)")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(autocommit, 1, "connection {n} of the pool");
        }
    }
}
