//! One row stops nothing else: a key waiting behind a parked row with more
//! rows than a batch, a row that cannot be read as an event, and a row whose
//! stored key partition is beyond the table's; a broker that refuses sends
//! for a while (its memory full) parks nothing; a broker that refuses one
//! destination to the relay's user (its authorisation map) spends no row's
//! attempts and holds up no other destination; a long retention pass holds
//! up no publishing; an append of many events that fails part way leaves
//! none of them; and a wait for one's own events to be published ends while
//! an unrelated row keeps failing. Against a real ActiveMQ, on
//! SQLite, PostgreSQL and MySQL/MariaDB.

mod support;

use std::time::Duration;

use outbox::core::producer::BrokerLimits;
use outbox::core::relay::StompPublisher;
use outbox::core::{Backoff, Error, Event, Outbox, RelayConfig};
use outbox::stomp::{Client, Config};
use outbox_test_harness::{Authorization, Broker, BrokerConfig};
use support::*;

fn quick_relay() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_millis(50))
        .with_lease(Duration::from_secs(5))
        .with_max_attempts(2)
        .with_retry_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        ))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
}

/// Polls `done` every 50 ms until it holds; fails after `limit` with `what`.
async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

macro_rules! rows_suite {
    ($db:ty, $open:path) => {
        use super::*;

        type Db = $db;

        async fn setup() -> Option<(outbox_test_harness::TestDb<Db>, Outbox<Db>)> {
            let db = $open().await?;
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            Some((db, outbox))
        }

        /// Rows of `outbox_event` in state `process`, keyless or of `key`.
        async fn rows(outbox: &Outbox<Db>, key: Option<&str>, process: &str) -> i64 {
            let sql = match key {
                None => format!(
                    "SELECT COUNT(*) FROM outbox_event WHERE event_key IS NULL AND process = '{process}'"
                ),
                Some(k) => format!(
                    "SELECT COUNT(*) FROM outbox_event WHERE event_key = '{k}' AND process = '{process}'"
                ),
            };
            sqlx::query_scalar::<_, i64>(&sql).fetch_one(outbox.pool()).await.unwrap()
        }

        fn ok(dest: &str, seq: i64) -> Event {
            Event::json("ok", dest, &serde_json::json!({ "seq": seq })).unwrap()
        }

        #[tokio::test]
        async fn a_key_waiting_behind_a_parked_row_with_more_rows_than_a_batch_stops_no_other_row() {
            let Some((_db, outbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.rows.waiting_key";
            // The broker refuses a header line over its limit; the outbox
            // lets it through only with raised limits.
            let lax = outbox.clone().with_limits(BrokerLimits {
                max_header_line: 1 << 20,
                ..BrokerLimits::default()
            });
            let over = "x".repeat(BrokerLimits::default().max_header_line);
            let mut tx = lax.pool().begin().await.unwrap();
            let poison = Event::json("poison", dest, &serde_json::json!({ "seq": 0 }))
                .unwrap()
                .with_key("K")
                .with_header("blob", over);
            lax.append(&mut tx, poison).await.unwrap();
            for seq in 1..=6 {
                lax.append(&mut tx, ok(dest, seq).with_key("K")).await.unwrap();
            }
            let mut keyless = Vec::new();
            for seq in 7..27 {
                keyless.push(lax.append(&mut tx, ok(dest, seq)).await.unwrap().to_string());
            }
            lax.commit(tx).await.unwrap();

            let config = quick_relay().with_batch_size(5);
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), config)
                .unwrap()
                .spawn();
            until("the 20 keyless rows are published", Duration::from_secs(60), async || {
                rows(&outbox, None, "PUBLISHED").await == 20
            })
            .await;
            until("the refused row is parked", Duration::from_secs(60), async || {
                rows(&outbox, Some("K"), "FAILED").await == 1
            })
            .await;
            relay.shutdown().await.unwrap();
            // Per-key order: the key's later rows wait behind its parked one.
            assert_eq!(rows(&outbox, Some("K"), "NEW").await, 6);
            assert_eq!(rows(&outbox, Some("K"), "PUBLISHED").await, 0);
            let got = drain(&broker, dest, Duration::from_secs(2)).await;
            let counts = tally(&got);
            for id in &keyless {
                assert!(counts.contains_key(id), "event {id} never arrived");
            }
            assert!(got.iter().all(|r| r.key.is_none()), "a row of K was published");
        }

        #[tokio::test]
        async fn waiting_for_one_s_own_events_ends_while_an_unrelated_row_keeps_failing() {
            let Some((_db, outbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.rows.wait_published";
            // A row the broker refuses (a header line over its limit), with a
            // budget that keeps it failing and retrying through the test.
            let lax = outbox.clone().with_limits(BrokerLimits {
                max_header_line: 1 << 20,
                ..BrokerLimits::default()
            });
            let over = "x".repeat(BrokerLimits::default().max_header_line);
            let mut tx = lax.pool().begin().await.unwrap();
            let poison = lax
                .append(&mut tx, ok(dest, 0).with_header("blob", over))
                .await
                .unwrap()
                .to_string();
            lax.commit(tx).await.unwrap();
            let retrying = quick_relay().with_max_attempts(1_000_000);
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), retrying)
                .unwrap()
                .spawn();
            until("the refused row has failed once", Duration::from_secs(60), async || {
                let sql = "SELECT COUNT(*) FROM outbox_event WHERE attempts > 0 AND process = 'NEW'";
                sqlx::query_scalar::<_, i64>(sql).fetch_one(outbox.pool()).await.unwrap() == 1
            })
            .await;

            let mut tx = outbox.pool().begin().await.unwrap();
            let mut mine = Vec::new();
            for seq in 1..=5 {
                mine.push(outbox.append(&mut tx, ok(dest, seq)).await.unwrap());
            }
            outbox.commit(tx).await.unwrap();
            let settled = outbox.wait_published(&mine, Duration::from_secs(60)).await.unwrap();
            let texts: Vec<String> = mine.iter().map(ToString::to_string).collect();
            assert_eq!(settled.published, texts, "{settled:?}");
            assert!(settled.all_published(), "{settled:?}");
            // The unrelated row still waits: a wait for the backlog to empty
            // would not have ended.
            let backlog = outbox.backlog().await.unwrap();
            assert_eq!((backlog.pending, backlog.parked), (1, 0), "{backlog:?}");

            // Waiting on the refused row itself gives up, naming it.
            match outbox.wait_published(&[poison.as_str()], Duration::from_millis(300)).await {
                Err(Error::WaitTimeout { waiting, .. }) => assert_eq!(waiting, [poison.as_str()]),
                other => panic!("expected a timeout, got {other:?}"),
            }
            // An id without a row is reported at once, not waited for.
            let settled = outbox
                .wait_published(&["not-an-event"], Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(settled.missing, ["not-an-event"]);
            assert!(!settled.all_published());
            relay.shutdown().await.unwrap();

            // With a small budget the refused row is parked, and said so.
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), quick_relay())
                .unwrap()
                .spawn();
            let settled = outbox
                .wait_published(&[poison.as_str(), texts[0].as_str()], Duration::from_secs(60))
                .await
                .unwrap();
            relay.shutdown().await.unwrap();
            assert_eq!(settled.published, [texts[0].clone()], "{settled:?}");
            assert_eq!(settled.parked.len(), 1, "{settled:?}");
            assert_eq!(settled.parked[0].event_id, poison);
            assert!(settled.parked[0].last_error.is_some(), "{settled:?}");
            let got = tally(&drain(&broker, dest, Duration::from_secs(2)).await);
            for id in &texts {
                assert_eq!(got.get(id), Some(&1), "event {id} on the broker once");
            }
        }

        #[tokio::test]
        async fn keys_waiting_behind_parked_rows_with_more_rows_than_eight_windows_stop_no_other_row() {
            let Some((_db, outbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.rows.many_waiting";
            // Nine keys of 60 rows each, every key's first row parked: 540
            // rows held back, more than a claim's eight windows of 50 read.
            let mut heads = Vec::new();
            for k in 0..9 {
                let key = format!("held{k}");
                let events: Vec<Event> =
                    (0..60).map(|seq| ok(dest, seq).with_key(key.clone())).collect();
                let mut tx = outbox.pool().begin().await.unwrap();
                let ids = outbox.append_all(&mut tx, &events).await.unwrap();
                outbox.commit(tx).await.unwrap();
                heads.push(ids[0].to_string());
            }
            for head in &heads {
                sqlx::query(&format!(
                    "UPDATE outbox_event SET process = 'FAILED' WHERE event_id = '{head}'"
                ))
                .execute(outbox.pool())
                .await
                .unwrap();
            }
            let mut tx = outbox.pool().begin().await.unwrap();
            let keyless = outbox.append(&mut tx, ok(dest, 1000)).await.unwrap().to_string();
            let fresh = outbox
                .append(&mut tx, ok(dest, 1001).with_key("fresh"))
                .await
                .unwrap()
                .to_string();
            outbox.commit(tx).await.unwrap();
            let config = quick_relay().with_batch_size(50).with_handoff(false);
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), config)
                .unwrap()
                .spawn();
            until("the keyless and the fresh key's rows are published", Duration::from_secs(60), async || {
                rows(&outbox, None, "PUBLISHED").await == 1
                    && rows(&outbox, Some("fresh"), "PUBLISHED").await == 1
            })
            .await;
            relay.shutdown().await.unwrap();
            let counts = tally(&drain(&broker, dest, Duration::from_secs(2)).await);
            assert_eq!(counts.get(&keyless), Some(&1));
            assert_eq!(counts.get(&fresh), Some(&1));
            assert_eq!(counts.len(), 2, "a held row was published: {counts:?}");
        }

        #[tokio::test]
        async fn a_row_that_cannot_be_read_as_an_event_is_parked_and_the_rows_behind_it_published() {
            let Some((_db, outbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.rows.unreadable";
            let mut tx = outbox.pool().begin().await.unwrap();
            let bad = outbox.append(&mut tx, ok(dest, 0)).await.unwrap().to_string();
            let mut expected = Vec::new();
            for seq in 1..=50 {
                expected.push(outbox.append(&mut tx, ok(dest, seq)).await.unwrap().to_string());
            }
            outbox.commit(tx).await.unwrap();
            // As another tool, a trigger or a hand might write it.
            sqlx::query(&format!(
                "UPDATE outbox_event SET headers = 'not json at all' WHERE event_id = '{bad}'"
            ))
            .execute(outbox.pool())
            .await
            .unwrap();

            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), quick_relay())
                .unwrap()
                .spawn();
            wait_published(&outbox, Duration::from_secs(60)).await;
            let metrics = relay.metrics().snapshot();
            relay.shutdown().await.unwrap();
            let parked = outbox.parked(10).await.unwrap();
            assert_eq!(parked.len(), 1, "{parked:?}");
            assert_eq!(parked[0].event_id, bad);
            let reason = parked[0].last_error.as_deref().unwrap_or_default();
            assert!(reason.contains("headers"), "{reason}");
            assert_eq!(metrics.failed, 1, "{metrics:?}");
            let got = drain(&broker, dest, Duration::from_secs(2)).await;
            let counts = tally(&got);
            for id in &expected {
                assert!(counts.contains_key(id), "event {id} never arrived");
            }
            assert!(!counts.contains_key(&bad));
        }

        #[tokio::test]
        async fn an_append_of_many_events_that_fails_part_way_leaves_none_of_them() {
            let Some((_db, outbox)) = setup().await else { return };
            let dest = "/queue/test.rows.append";
            let mut events: Vec<Event> = (0..250).map(|seq| ok(dest, seq)).collect();
            // The 231st repeats the 11th's id: its statement (the second of
            // 200 rows each) fails on the unique key.
            let repeated = events[10].clone();
            events[230] = repeated;
            let mut tx = outbox.pool().begin().await.unwrap();
            sqlx::query("CREATE TABLE IF NOT EXISTS business (n BIGINT)")
                .execute(outbox.pool())
                .await
                .unwrap();
            sqlx::query("INSERT INTO business (n) VALUES (1)").execute(&mut *tx).await.unwrap();
            match outbox.append_all(&mut tx, &events).await {
                Err(Error::Database { .. }) => {}
                other => panic!("expected a database error, got {other:?}"),
            }
            // A caller that commits anyway.
            let _ = tx.commit().await;
            let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox_event")
                .fetch_one(outbox.pool())
                .await
                .unwrap();
            assert_eq!(rows, 0, "part of the events were committed");
        }

        /// A transaction whose COMMIT the broker refuses ("marked rollback
        /// only", after it refused one of its SENDs for want of room) stays
        /// open at ActiveMQ, holding queue memory, until its connection ends:
        /// the client ends the connection then, or the queue stays full and
        /// the relay stalls with rows waiting.
        #[tokio::test]
        async fn a_broker_whose_memory_is_full_for_a_while_gets_every_event_and_parks_none() {
            let Some((_db, outbox)) = setup().await else { return };
            // 256 KiB on the queue, then ERRORs until a consumer reads it.
            let broker = Broker::start_with(
                BrokerConfig::default().with_queue_memory_limit("test.rows.full", 256 * 1024),
            )
            .await
            .unwrap();
            let dest = "/queue/test.rows.full";
            let body = "x".repeat(4096);
            let mut tx = outbox.pool().begin().await.unwrap();
            let mut ids = Vec::new();
            for seq in 0..300 {
                let event = Event::json("ok", dest, &serde_json::json!({ "seq": seq, "pad": body }))
                    .unwrap()
                    .with_key(format!("k{}", seq % 10));
                ids.push(outbox.append(&mut tx, event).await.unwrap().to_string());
            }
            outbox.commit(tx).await.unwrap();
            let config = quick_relay().with_batch_size(20);
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), config)
                .unwrap()
                .spawn();
            let metrics = relay.metrics().clone();
            until("the broker refuses a send", Duration::from_secs(60), async || {
                let m = metrics.snapshot();
                m.unavailable + m.retried + m.failed > 0
            })
            .await;
            // Two seconds of refusals, then a consumer reads the queue until
            // every row is published.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let done = std::sync::atomic::AtomicBool::new(false);
            let reading = async {
                let mut got = Vec::new();
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    got.extend(drain(&broker, dest, Duration::from_secs(2)).await);
                }
                got.extend(drain(&broker, dest, Duration::from_secs(2)).await);
                got
            };
            let publishing = async {
                wait_published(&outbox, Duration::from_secs(120)).await;
                done.store(true, std::sync::atomic::Ordering::Release);
            };
            let (got, ()) = tokio::join!(reading, publishing);
            let counts = outbox.counts().await.unwrap();
            let parked = outbox.parked(5).await.unwrap();
            relay.shutdown().await.unwrap();
            assert!(parked.is_empty(), "{} parked: {parked:?}", count(&counts, "FAILED"));
            let arrived = tally(&got);
            for id in &ids {
                assert!(arrived.contains_key(id), "event {id} never arrived");
            }
        }

        /// Rows of `outbox_event` to `destination` in state `process`, and
        /// the attempts they were charged.
        async fn rows_to(outbox: &Outbox<Db>, destination: &str, process: &str) -> (i64, i64) {
            let sql = format!(
                "SELECT attempts FROM outbox_event \
                 WHERE destination = '{destination}' AND process = '{process}'"
            );
            let attempts: Vec<i64> =
                sqlx::query_scalar(&sql).fetch_all(outbox.pool()).await.unwrap();
            (attempts.len() as i64, attempts.iter().sum())
        }

        #[tokio::test]
        async fn a_destination_the_broker_refuses_to_the_relay_s_user_spends_no_attempt_and_stops_no_other() {
            let Some((_db, outbox)) = setup().await else { return };
            let (open, closed) = ("/queue/test.authz.open", "/queue/test.authz.closed");
            let grants = |closed_too: bool| {
                // The tests read the queues as `admin`.
                let mut grants = vec![
                    Authorization::queue("test.authz.>").all("admins"),
                    Authorization::queue("test.authz.open").all("relay"),
                ];
                if closed_too {
                    grants.push(Authorization::queue("test.authz.closed").all("relay"));
                }
                grants
            };
            let mut broker = Broker::start_with(
                BrokerConfig::default()
                    .with_credentials("admin", "admin-secret")
                    .with_user("relay", "relay-secret", ["relay"])
                    .with_authorization(grants(false)),
            )
            .await
            .unwrap();
            let mut tx = outbox.pool().begin().await.unwrap();
            let mut ids = Vec::new();
            for seq in 0..60 {
                // Keyed and keyless rows of both destinations, interleaved.
                let (dest, key) = match seq % 4 {
                    0 => (closed, Some(format!("c{}", seq % 3))),
                    1 => (open, Some(format!("o{}", seq % 3))),
                    2 => (closed, None),
                    _ => (open, None),
                };
                let mut event = ok(dest, seq);
                if let Some(key) = key {
                    event = event.with_key(key);
                }
                ids.push((dest, outbox.append(&mut tx, event).await.unwrap().to_string()));
            }
            outbox.commit(tx).await.unwrap();
            let relay_client = Client::connect(
                Config::parse(&broker.stomp_uri())
                    .unwrap()
                    .with_receipt_timeout(Duration::from_secs(2))
                    .with_credentials("relay", "relay-secret"),
            )
            .await
            .unwrap();
            let config = quick_relay()
                .with_batch_size(8)
                .with_stats_interval(Some(Duration::from_millis(200)));
            let relay = outbox
                .relay(StompPublisher::new(relay_client), config)
                .unwrap()
                .spawn();
            let metrics = relay.metrics().clone();
            until("the open destination's 30 rows are published", Duration::from_secs(60), async || {
                rows_to(&outbox, open, "PUBLISHED").await.0 == 30
            })
            .await;
            // Long enough for many retries at the relay's retry backoff (50 to
            // 200 ms, two attempts before a row is parked).
            tokio::time::sleep(Duration::from_secs(3)).await;
            let (parked, parked_attempts) = rows_to(&outbox, closed, "FAILED").await;
            let (waiting, waiting_attempts) = rows_to(&outbox, closed, "NEW").await;
            let counts = metrics.snapshot();
            let health = relay.health();
            eprintln!(
                "refused destination: {parked} parked ({parked_attempts} attempts), {waiting} \
                 waiting ({waiting_attempts} attempts); {counts:?}; {health:?}"
            );
            assert_eq!((parked, parked_attempts), (0, 0), "rows of the refused destination were parked");
            assert_eq!((waiting, waiting_attempts), (30, 0), "attempts were charged for the refusal");
            assert!(counts.deferred > 0, "{counts:?}");
            let error = health.error.clone().unwrap_or_default();
            assert!(error.contains("not authorized"), "health does not say it: {health:?}");
            assert!(health.deferred_destinations.iter().any(|d| d == closed), "{health:?}");
            let last: Option<String> = sqlx::query_scalar(&format!(
                "SELECT MAX(last_error) FROM outbox_event WHERE destination = '{closed}'"
            ))
            .fetch_one(outbox.pool())
            .await
            .unwrap();
            assert!(last.is_some_and(|e| e.contains("not authorized")), "no last_error on the rows");

            // The broker's operator grants the right: the rows go out.
            broker.restart_with(|config| config.with_authorization(grants(true))).await.unwrap();
            until("every row is published", Duration::from_secs(90), async || {
                rows_to(&outbox, closed, "PUBLISHED").await.0 == 30
            })
            .await;
            let health = relay.health();
            relay.shutdown().await.unwrap();
            assert!(health.deferred_destinations.is_empty(), "{health:?}");
            let mut got = drain(&broker, open, Duration::from_secs(2)).await;
            got.extend(drain(&broker, closed, Duration::from_secs(2)).await);
            let arrived = tally(&got);
            for (dest, id) in &ids {
                assert!(arrived.contains_key(id), "event {id} to {dest} never arrived");
            }
        }

        #[tokio::test]
        async fn a_long_retention_pass_holds_up_no_publishing() {
            let Some((_db, outbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.rows.retention";
            const OLD: u64 = 3000;
            let old: Vec<Event> = (0..OLD as i64).map(|seq| ok(dest, seq)).collect();
            let mut tx = outbox.pool().begin().await.unwrap();
            outbox.append_all(&mut tx, &old).await.unwrap();
            tx.commit().await.unwrap();
            sqlx::query("UPDATE outbox_event SET process = 'PUBLISHED', published_time = 1")
                .execute(outbox.pool())
                .await
                .unwrap();
            // One row per statement: a pass of 3000 statements.
            let config = quick_relay()
                .with_retention(Some(Duration::from_secs(1)))
                .with_retention_batch(1);
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), config)
                .unwrap()
                .spawn();
            let metrics = relay.metrics().clone();
            until("retention starts", Duration::from_secs(30), async || {
                metrics.snapshot().deleted > 0
            })
            .await;
            let mut tx = outbox.pool().begin().await.unwrap();
            let fresh = outbox.append(&mut tx, ok(dest, -1)).await.unwrap().to_string();
            outbox.commit(tx).await.unwrap();
            until("the fresh event is published", Duration::from_secs(60), async || {
                metrics.snapshot().published >= 1
            })
            .await;
            let deleted = metrics.snapshot().deleted;
            relay.shutdown().await.unwrap();
            assert!(
                deleted < OLD,
                "the fresh event waited for the whole retention pass ({deleted} rows deleted)"
            );
            let counts = tally(&drain(&broker, dest, Duration::from_secs(2)).await);
            assert_eq!(counts.get(&fresh), Some(&1));
        }

        #[tokio::test]
        async fn rows_whose_stored_partition_is_beyond_the_table_s_are_published() {
            let Some((_db, outbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/test.rows.partition";
            for key_partitions in [false, true] {
                let mut tx = outbox.pool().begin().await.unwrap();
                let mut ids = Vec::new();
                for seq in 0..3 {
                    let event = ok(dest, seq).with_key(format!("k{seq}"));
                    ids.push(outbox.append(&mut tx, event).await.unwrap().to_string());
                }
                outbox.commit(tx).await.unwrap();
                sqlx::query(&format!(
                    "UPDATE outbox_event SET partition_no = 999 WHERE event_id = '{}'",
                    ids[1]
                ))
                .execute(outbox.pool())
                .await
                .unwrap();
                let config = quick_relay().with_key_partitions(key_partitions);
                let relay = outbox
                    .relay(StompPublisher::new(client(&broker).await), config)
                    .unwrap()
                    .spawn();
                wait_published(&outbox, Duration::from_secs(30)).await;
                relay.shutdown().await.unwrap();
                let counts = tally(&drain(&broker, dest, Duration::from_secs(2)).await);
                for id in &ids {
                    assert!(counts.contains_key(id), "{id} never arrived (key partitions {key_partitions})");
                }
            }
        }
    };
}

mod sqlite {
    rows_suite!(sqlx::Sqlite, support::sqlite);
}

mod postgres {
    rows_suite!(sqlx::Postgres, support::postgres);
}

mod mysql {
    rows_suite!(sqlx::MySql, support::mysql);
}
