//! The outbox and its relay against a real ActiveMQ, on SQLite, PostgreSQL and
//! MySQL/MariaDB (modules `sqlite`, `postgres`, `mysql`; run one database's
//! tests with e.g. `cargo nextest run --test relay postgres::`).
//!
//! Crash tests re-run this binary as a child process (the `#[ignore]`d
//! `child_relay` test) with a failpoint armed, so the relay dies by SIGKILL at
//! an exact place; a fresh relay then finishes the job and the queue is counted.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::core::producer::BrokerLimits;
use outbox::core::relay::{OutboxMessage, PublishError, Publisher, StompPublisher};
use outbox::core::{Backoff, Error, Event, Outbox, RelayConfig};
use serde::{Deserialize, Serialize};
use support::*;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct UserCreated {
    user_id: i64,
    name: String,
    seq: i64,
}

fn fast_relay() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_millis(50))
        // Longer than a publish on `support::client` can take.
        .with_lease(Duration::from_secs(5))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
}

/// A lease long enough that a killed relay's batch is still held when its
/// successor starts, short enough that the test does not wait long for it.
fn crash_loop_relay() -> RelayConfig {
    fast_relay().with_lease(Duration::from_secs(6))
}

/// A publisher in memory that rejects events of type `poison` while `reject` is
/// on, refuses everything as if the broker were down while `down` is on, and
/// takes `slow` for each publish, counting how many are in progress at once.
#[derive(Clone, Default)]
struct Scripted {
    reject: Arc<Mutex<bool>>,
    down: Arc<Mutex<bool>>,
    slow: Arc<Mutex<Duration>>,
    /// Publishes in progress now, and the most at once.
    in_flight: Arc<Mutex<(usize, usize)>>,
    published: Arc<Mutex<Vec<OutboxMessage>>>,
}

impl Scripted {
    /// The JSON payloads published so far, in order.
    fn sent(&self) -> Vec<i64> {
        self.published
            .lock()
            .unwrap()
            .iter()
            .map(|m| serde_json::from_slice(&m.content).unwrap())
            .collect()
    }
}

/// Polls `done` every 20 ms until it holds; fails after `limit`.
async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Publisher for Scripted {
    async fn publish(&self, batch: &[OutboxMessage]) -> Result<(), PublishError> {
        if *self.down.lock().unwrap() {
            return Err(PublishError::unavailable("down in the test"));
        }
        let reject = *self.reject.lock().unwrap();
        if reject && batch.iter().any(|m| m.event_type == "poison") {
            return Err(PublishError::rejected("poison refused"));
        }
        self.published.lock().unwrap().extend(batch.iter().cloned());
        let slow = *self.slow.lock().unwrap();
        if !slow.is_zero() {
            {
                let mut n = self.in_flight.lock().unwrap();
                n.0 += 1;
                n.1 = n.1.max(n.0);
            }
            tokio::time::sleep(slow).await;
            self.in_flight.lock().unwrap().0 -= 1;
        }
        Ok(())
    }
}

macro_rules! relay_suite {
    ($db:ty, $open:path) => {
        use super::*;

        async fn append_users(
            outbox: &Outbox<$db>,
            destination: &str,
            range: std::ops::Range<i64>,
            keys: i64,
        ) -> Vec<String> {
            let mut ids = Vec::new();
            for i in range {
                let mut tx = outbox.pool().begin().await.unwrap();
                sqlx::query(&format!(
                    "INSERT INTO users (id, name) VALUES ({i}, 'user{i}')"
                ))
                .execute(&mut *tx)
                .await
                .unwrap();
                let event = Event::json(
                    "user.created",
                    destination,
                    &UserCreated {
                        user_id: i,
                        name: format!("user{i}"),
                        seq: i,
                    },
                )
                .unwrap()
                .with_key(format!("k{}", i % keys));
                ids.push(outbox.append(&mut tx, event).await.unwrap().to_string());
                outbox.commit(tx).await.unwrap();
            }
            ids
        }

        async fn setup() -> Option<(outbox_test_harness::TestDb<$db>, Outbox<$db>)> {
            let db = $open().await?;
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            outbox.migrate().await.unwrap(); // repeatable
            sqlx::query("CREATE TABLE users (id BIGINT PRIMARY KEY, name VARCHAR(100) NOT NULL)")
                .execute(db.pool())
                .await
                .unwrap();
            Some((db, outbox))
        }

        #[tokio::test]
        async fn committed_events_arrive_with_their_headers_and_rolled_back_ones_never() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let broker = broker().await;
            let dest = "/queue/test.users";
            let mut tx = outbox.pool().begin().await.unwrap();
            sqlx::query("INSERT INTO users (id, name) VALUES (1, 'ada')")
                .execute(&mut *tx)
                .await
                .unwrap();
            let kept = vec![
                Event::json(
                    "user.created",
                    dest,
                    &UserCreated {
                        user_id: 1,
                        name: "ada".into(),
                        seq: 1,
                    },
                )
                .unwrap()
                .with_key("user-1")
                .with_header("tenant", "acme"),
                Event::raw(
                    "user.avatar",
                    dest,
                    vec![0u8, 1, 2, 255],
                    "application/octet-stream",
                ),
            ];
            let ids = outbox.append_all(&mut tx, &kept).await.unwrap();
            outbox.commit(tx).await.unwrap();

            let mut tx = outbox.pool().begin().await.unwrap();
            sqlx::query("INSERT INTO users (id, name) VALUES (2, 'bob')")
                .execute(&mut *tx)
                .await
                .unwrap();
            let lost = outbox
                .append(
                    &mut tx,
                    Event::json(
                        "user.created",
                        dest,
                        &UserCreated {
                            user_id: 2,
                            name: "bob".into(),
                            seq: 2,
                        },
                    )
                    .unwrap(),
                )
                .await
                .unwrap();
            tx.rollback().await.unwrap();

            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), fast_relay())
                .expect("valid settings").spawn();
            wait_published(&outbox, Duration::from_secs(30)).await;
            let got = drain(&broker, dest, Duration::from_secs(2)).await;
            relay.shutdown().await.unwrap();

            assert_eq!(got.len(), 2, "{got:?}");
            assert!(got.iter().all(|r| r.event_id != lost.to_string()));
            let json = &got[0];
            assert_eq!(json.event_id, ids[0].to_string());
            assert_eq!(json.event_type.as_deref(), Some("user.created"));
            assert_eq!(json.key.as_deref(), Some("user-1"), "{:?}", json.headers);
            // ActiveMQ keeps JMSXGroupID as the message group and does not echo it
            // in STOMP MESSAGE frames; `message_for` is checked for it in outbox-core.
            assert_eq!(json.persistent.as_deref(), Some("true"));
            assert_eq!(json.content_type.as_deref(), Some("application/json"));
            assert!(
                json.headers
                    .iter()
                    .any(|(k, v)| k == "tenant" && v == "acme")
            );
            // The event type again as `type`: JMSType for JMS consumers.
            assert!(
                json.headers
                    .iter()
                    .any(|(k, v)| k == "type" && v == "user.created"),
                "{:?}",
                json.headers
            );
            let payload: UserCreated = serde_json::from_slice(&json.body).unwrap();
            assert_eq!(
                payload,
                UserCreated {
                    user_id: 1,
                    name: "ada".into(),
                    seq: 1
                }
            );
            let raw = &got[1];
            assert_eq!(raw.event_id, ids[1].to_string());
            assert_eq!(raw.body, vec![0u8, 1, 2, 255]);
            assert_eq!(raw.key, None);
            let counts = outbox.counts().await.unwrap();
            assert_eq!(count(&counts, "PUBLISHED"), 2);
            assert_eq!(count(&counts, "NEW"), 0);
        }

        #[tokio::test]
        async fn the_relay_resumes_by_itself_after_the_broker_was_down() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let mut broker = broker().await;
            let dest = "/queue/test.outage";
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), fast_relay())
                .expect("valid settings").spawn();
            let mut ids = append_users(&outbox, dest, 0..30, 5).await;
            wait_published(&outbox, Duration::from_secs(30)).await;
            broker.kill().await.unwrap();
            ids.extend(append_users(&outbox, dest, 30..60, 5).await);
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(
                outbox.backlog().await.unwrap().pending,
                30,
                "nothing can be published while the broker is down"
            );
            broker.start_again().await.unwrap();
            wait_published(&outbox, Duration::from_secs(60)).await;
            relay.shutdown().await.unwrap();
            let got = tally(&drain(&broker, dest, Duration::from_secs(2)).await);
            let missing: Vec<_> = ids.iter().filter(|id| !got.contains_key(*id)).collect();
            assert!(missing.is_empty(), "lost {missing:?}");
            assert_eq!(got.len(), 60);
        }

        #[tokio::test]
        async fn a_relay_killed_at_either_failpoint_loses_nothing() {
            let Some((db, outbox)) = setup().await else {
                return;
            };
            let broker = broker().await;
            let dest = "/queue/test.crash";
            let ids = append_users(&outbox, dest, 0..50, 7).await;
            let env = |failpoint: &str| {
                vec![
                    ("OUTBOX_FAILPOINT", failpoint.to_owned()),
                    ("OUTBOX_TEST_DB_URL", db.url().to_owned()),
                    ("OUTBOX_TEST_BROKER", broker.stomp_uri()),
                ]
            };
            let child = concat!(module_path!(), "::child_relay");
            let child = child.split_once("::").map_or(child, |(_, rest)| rest);
            let (killed, stderr) =
                run_child(child, &env("relay.before_publish"), Duration::from_secs(60)).await;
            assert!(
                killed,
                "child was not killed at relay.before_publish: {stderr}"
            );
            let (killed, stderr) =
                run_child(child, &env("relay.after_receipt"), Duration::from_secs(60)).await;
            assert!(
                killed,
                "child was not killed at relay.after_receipt: {stderr}"
            );
            assert_eq!(
                outbox.backlog().await.unwrap().pending,
                50,
                "no row may be marked by a killed relay"
            );

            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), fast_relay())
                .expect("valid settings").spawn();
            wait_published(&outbox, Duration::from_secs(30)).await;
            relay.shutdown().await.unwrap();
            let got = drain(&broker, dest, Duration::from_secs(2)).await;
            let counts = tally(&got);
            let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
            let doubled = counts.values().filter(|n| **n == 2).count();
            assert_eq!(missing, 0);
            assert!(counts.values().all(|n| *n <= 2), "{counts:?}");
            // Exactly the batch confirmed before the kill arrives twice, under the same ids.
            assert_eq!(doubled, 20, "{counts:?}");
            assert_eq!(got.len(), 70);
        }

        #[tokio::test]
        async fn a_relay_restarted_under_its_id_in_a_crash_loop_never_marks_what_it_did_not_publish() {
            let Some((db, outbox)) = setup().await else {
                return;
            };
            let broker = broker().await;
            let dest = "/queue/test.crash-loop";
            // Eight batches of 20; each killed incarnation holds one, leased.
            // One key per event, so no batch waits for another's key.
            let ids = append_users(&outbox, dest, 0..160, 1000).await;
            let env = vec![
                ("OUTBOX_FAILPOINT", "relay.before_publish".to_owned()),
                ("OUTBOX_TEST_DB_URL", db.url().to_owned()),
                ("OUTBOX_TEST_BROKER", broker.stomp_uri()),
                ("OUTBOX_TEST_RELAY_ID", "fixed-relay".to_owned()),
            ];
            let child = concat!(module_path!(), "::child_relay");
            let child = child.split_once("::").map_or(child, |(_, rest)| rest);
            for round in 0..3 {
                let (killed, stderr) = run_child(child, &env, Duration::from_secs(60)).await;
                assert!(killed, "round {round}: child not killed: {stderr}");
            }
            assert_eq!(outbox.backlog().await.unwrap().pending, 160, "nothing published yet");
            // Started at once under the same id, while the dead ones' leases hold.
            let relay = outbox
                .relay(
                    StompPublisher::new(client(&broker).await),
                    crash_loop_relay()
                        .with_batch_size(20)
                        .with_relay_id("fixed-relay".to_owned()),
                )
                .expect("valid settings").spawn();
            wait_published(&outbox, Duration::from_secs(60)).await;
            relay.shutdown().await.unwrap();
            let got = tally(&drain(&broker, dest, Duration::from_secs(2)).await);
            let missing: Vec<_> = ids.iter().filter(|id| !got.contains_key(*id)).collect();
            assert!(missing.is_empty(), "marked published but never sent: {} events", missing.len());
            assert!(got.values().all(|n| *n == 1), "nothing was sent by the killed ones");
            assert_eq!(count(&outbox.counts().await.unwrap(), "PUBLISHED"), 160);
        }

        #[tokio::test]
        #[ignore = "child process of a_relay_killed_at_either_failpoint_loses_nothing"]
        async fn child_relay() {
            let (Some(url), Some(broker)) = (
                child_var("OUTBOX_TEST_DB_URL"),
                child_var("OUTBOX_TEST_BROKER"),
            ) else {
                return;
            };
            let pool = sqlx::Pool::<$db>::connect(&url).await.unwrap();
            let outbox = Outbox::new(pool);
            let client =
                outbox::stomp::Client::connect(
                    outbox::stomp::Config::parse(&broker)
                        .unwrap()
                        .with_receipt_timeout(Duration::from_secs(2)),
                )
                .await
                    .unwrap();
            let mut config = fast_relay()
                .with_batch_size(20);
            if let Some(relay_id) = child_var("OUTBOX_TEST_RELAY_ID") {
                config.relay_id = relay_id;
                config.lease = crash_loop_relay().lease;
            }
            let relay = outbox.relay(StompPublisher::new(client), config);
            // The armed failpoint ends this process; a timeout means it never fired.
            let _ =
                tokio::time::timeout(Duration::from_secs(30), relay.expect("valid settings").run(std::future::pending()))
                    .await;
        }

        /// A header ActiveMQ refuses (a line over 10 KiB) in the middle of a
        /// 500-row batch, and alone in a batch of its own: the broker answers
        /// with an ERROR and closes the connection each time. The producer
        /// here believes the broker takes larger headers (its outbox has
        /// raised limits); the default limits refuse such an event at append.
        #[tokio::test]
        async fn a_header_over_the_broker_s_limit_is_parked_after_its_attempts_and_every_other_event_arrives() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let broker = broker().await;
            let dest = "/queue/test.poison";
            let limit = BrokerLimits::default().max_header_line;
            let over = "x".repeat(limit);
            let poison = |n: i64| {
                Event::json("poison", dest, &serde_json::json!({ "seq": n }))
                    .unwrap()
                    .with_key(format!("poison-{n}"))
                    .with_header("blob", over.clone())
            };
            // Refused at append with the default limits, naming the header.
            let mut tx = outbox.pool().begin().await.unwrap();
            match outbox.append(&mut tx, poison(0)).await {
                Err(Error::EventTooLarge { source, .. }) => {
                    assert!(source.to_string().contains("\"blob\""), "{source}")
                }
                other => panic!("expected EventTooLarge, got {other:?}"),
            }
            // A line right at the limit passes the check, and the broker takes it.
            let at_limit = "y".repeat(limit - "blob:".len());
            let fits = Event::json("fits", dest, &serde_json::json!({ "seq": -1 }))
                .unwrap()
                .with_header("blob", at_limit);
            let fits_id = outbox.append(&mut tx, fits).await.unwrap().to_string();
            tx.rollback().await.unwrap();

            let lax = outbox.clone().with_limits(BrokerLimits {
                max_header_line: 1 << 20,
                ..BrokerLimits::default()
            });
            let mut expected = Vec::new();
            let mut poisons = Vec::new();
            let mut tx = lax.pool().begin().await.unwrap();
            for i in 0..500i64 {
                let event = if i == 250 {
                    poisons.push(lax.append(&mut tx, poison(i)).await.unwrap().to_string());
                    continue;
                } else {
                    Event::json("ok", dest, &serde_json::json!({ "seq": i }))
                        .unwrap()
                        .with_key(format!("k{}", i % 20))
                };
                expected.push(lax.append(&mut tx, event).await.unwrap().to_string());
            }
            let fits = Event::json("fits", dest, &serde_json::json!({ "seq": 500 }))
                .unwrap()
                .with_header("blob", "y".repeat(limit - "blob:".len()));
            expected.push(lax.append(&mut tx, fits).await.unwrap().to_string());
            lax.commit(tx).await.unwrap();
            assert_ne!(fits_id, expected[expected.len() - 1]);

            let config = fast_relay()
                .with_batch_size(500)
                .with_max_attempts(3)
                .with_retry_backoff(Backoff::new(Duration::from_millis(50), Duration::from_millis(200)));
            let relay = lax
                .relay(StompPublisher::new(client(&broker).await), config)
                .unwrap()
                .spawn();
            wait_published(&outbox, Duration::from_secs(120)).await;
            // Then one alone, in a batch of its own.
            let mut tx = lax.pool().begin().await.unwrap();
            poisons.push(lax.append(&mut tx, poison(501)).await.unwrap().to_string());
            lax.commit(tx).await.unwrap();
            let until = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let parked = outbox.parked(10).await.unwrap();
                if parked.len() == 2 && outbox.backlog().await.unwrap().pending == 0 {
                    for p in &parked {
                        assert!(poisons.contains(&p.event_id.to_string()), "{p:?}");
                        assert_eq!(p.attempts, 3, "{p:?}");
                        let error = p.last_error.as_deref().unwrap_or_default();
                        assert!(error.contains("rejected") || error.contains("broker"), "{error}");
                    }
                    break;
                }
                assert!(tokio::time::Instant::now() < until, "parked: {parked:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let metrics = relay.metrics().snapshot();
            relay.shutdown().await.unwrap();
            assert_eq!(metrics.failed, 2, "{metrics:?}");

            let got = drain(&broker, dest, Duration::from_secs(2)).await;
            let counts = tally(&got);
            for id in &expected {
                assert!(counts.contains_key(id), "event {id} never arrived");
            }
            for id in &poisons {
                assert!(!counts.contains_key(id), "the broker took a poison event {id}");
            }
            // Per-key order of first arrivals (a refused batch may have been
            // applied in part by the broker before it closed: those rows come twice).
            let mut seen = std::collections::HashSet::new();
            let mut last: HashMap<String, i64> = HashMap::new();
            for r in &got {
                if !seen.insert(r.event_id.clone()) {
                    continue;
                }
                let seq = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["seq"]
                    .as_i64()
                    .unwrap();
                if let Some(key) = r.key.clone()
                    && let Some(prev) = last.insert(key.clone(), seq)
                {
                    assert!(prev < seq, "key {key} went {prev} then {seq}");
                }
            }
            println!(
                "{} messages, {} distinct, relay {metrics:?}",
                got.len(),
                seen.len()
            );
        }

        #[tokio::test]
        async fn two_and_four_relays_publish_every_event_once_in_key_order() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let broker = broker().await;
            for (round, relays) in [(0i64, 2usize), (1, 4)] {
                let dest = format!("/queue/test.many.{relays}");
                let mut handles = Vec::new();
                for _ in 0..relays {
                    // A lease and a receipt timeout far longer than any publish: an
                    // expired lease or an unknown outcome is re-published by design,
                    // which would make a duplicate here.
                    let config = fast_relay()
                        .with_batch_size(25)
                        .with_lease(Duration::from_secs(120));
                    let patient = outbox::stomp::Client::connect(
                        outbox::stomp::Config::parse(&broker.stomp_uri())
                            .unwrap()
                            .with_receipt_timeout(Duration::from_secs(50)),
                    )
                    .await
                    .unwrap();
                    handles.push(outbox.relay(StompPublisher::new(patient), config).expect("valid settings").spawn());
                }
                let base = round * 1000;
                let ids = append_users(&outbox, &dest, base..base + 300, 10).await;
                wait_published(&outbox, Duration::from_secs(60)).await;
                let mut published = 0;
                let mut all = Vec::new();
                for h in handles {
                    let metrics = h.metrics().clone();
                    h.shutdown().await.unwrap();
                    published += metrics.snapshot().published;
                    all.push(metrics.snapshot());
                }
                assert_eq!(published, 300, "{relays} relays");
                let got = drain(&broker, &dest, Duration::from_secs(2)).await;
                let counts = tally(&got);
                assert_eq!(
                    got.len(),
                    300,
                    "{relays} relays: each event exactly once; relay counters {all:?}"
                );
                assert!(ids.iter().all(|id| counts.get(id) == Some(&1)));
                let mut last: HashMap<String, i64> = HashMap::new();
                for r in &got {
                    let seq = serde_json::from_slice::<UserCreated>(&r.body).unwrap().seq;
                    let key = r.key.clone().unwrap();
                    if let Some(prev) = last.insert(key.clone(), seq) {
                        assert!(
                            prev < seq,
                            "{relays} relays: key {key} went {prev} then {seq}"
                        );
                    }
                }
            }
        }

        #[tokio::test]
        async fn a_rejected_event_is_retried_parked_and_replayed_while_its_key_waits() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let dest = "/queue/test.poison";
            let mut tx = outbox.pool().begin().await.unwrap();
            let events = vec![
                Event::json("ok", dest, &1).unwrap().with_key("a"),
                Event::json("poison", dest, &2).unwrap().with_key("b"),
                Event::json("ok", dest, &3).unwrap().with_key("b"),
                Event::json("ok", dest, &4).unwrap().with_key("c"),
            ];
            let ids = outbox.append_all(&mut tx, &events).await.unwrap();
            outbox.commit(tx).await.unwrap();
            let publisher = Scripted::default();
            *publisher.reject.lock().unwrap() = true;
            let config = fast_relay()
                .with_max_attempts(3)
                .with_retry_backoff(Backoff::new(Duration::from_millis(20), Duration::from_millis(40)));
            let relay = outbox.relay(publisher.clone(), config).expect("valid settings").spawn();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while outbox.backlog().await.unwrap().parked == 0 {
                assert!(tokio::time::Instant::now() < deadline, "never parked");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let parked = outbox.parked(10).await.unwrap();
            assert_eq!(parked.len(), 1);
            assert_eq!(parked[0].event_id, ids[1].to_string());
            assert_eq!(parked[0].attempts, 3);
            assert!(
                parked[0]
                    .last_error
                    .as_deref()
                    .unwrap()
                    .contains("poison refused")
            );
            let backlog = outbox.backlog().await.unwrap();
            assert_eq!(
                backlog.pending, 1,
                "the later event of key b waits behind the parked one"
            );
            let sent: Vec<i64> = publisher
                .published
                .lock()
                .unwrap()
                .iter()
                .map(|m| serde_json::from_slice(&m.content).unwrap())
                .collect();
            assert_eq!(sent, vec![1, 4]);

            *publisher.reject.lock().unwrap() = false;
            assert!(outbox.replay(&ids[1].to_string()).await.unwrap());
            wait_published(&outbox, Duration::from_secs(10)).await;
            let metrics = relay.metrics().snapshot();
            relay.shutdown().await.unwrap();
            let sent: Vec<i64> = publisher
                .published
                .lock()
                .unwrap()
                .iter()
                .map(|m| serde_json::from_slice(&m.content).unwrap())
                .collect();
            assert_eq!(sent, vec![1, 4, 2, 3]);
            assert_eq!(metrics.failed, 1);
            assert_eq!(metrics.retried, 2);
            assert_eq!(outbox.backlog().await.unwrap().parked, 0);
        }

        /// The relay lease `claimed_by` of the row of `event_id`, read through `conn`.
        async fn lease_of(
            conn: &mut <$db as sqlx::Database>::Connection,
            event_id: &uuid::Uuid,
        ) -> Option<String> {
            sqlx::query_scalar::<_, Option<String>>(&format!(
                "SELECT claimed_by FROM outbox_event WHERE event_id = '{event_id}'"
            ))
            .fetch_one(conn)
            .await
            .unwrap()
        }

        #[tokio::test]
        async fn handed_off_rows_skip_the_claim_and_wait_behind_a_parked_row_of_their_key() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let dest = "/queue/test.handoff";
            let publisher = Scripted::default();
            *publisher.reject.lock().unwrap() = true;
            let config = fast_relay()
                .with_relay_id("handoff-a")
                .with_max_attempts(3)
                .with_retry_backoff(Backoff::new(Duration::from_millis(20), Duration::from_millis(40)))
                // Far longer than the test: a handed-off row can only be
                // published by the hand-off, never by a claim after its lease.
                .with_lease(Duration::from_secs(600));
            let relay = outbox.relay(publisher.clone(), config).expect("valid settings").spawn();
            // Appends in one transaction, checks the rows are leased to the
            // relay before the commit, commits.
            let append_handed_off = async |events: &[Event]| {
                let mut tx = outbox.pool().begin().await.unwrap();
                let ids = outbox.append_all(&mut tx, events).await.unwrap();
                for id in &ids {
                    assert_eq!(lease_of(&mut tx, id).await.as_deref(), Some("handoff-a-h"));
                }
                outbox.commit(tx).await.unwrap();
                ids
            };
            let first = append_handed_off(&[
                Event::json("ok", dest, &1).unwrap().with_key("a"),
                Event::json("poison", dest, &2).unwrap().with_key("b"),
            ])
            .await;
            until(
                "the poison row is parked",
                Duration::from_secs(20),
                async || outbox.backlog().await.unwrap().parked == 1,
            )
            .await;

            let later = append_handed_off(&[
                Event::json("ok", dest, &3).unwrap().with_key("b"),
                Event::json("ok", dest, &4).unwrap().with_key("c"),
            ])
            .await;
            until(
                "event 4 is published",
                Duration::from_secs(10),
                async || publisher.sent().contains(&4),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(publisher.sent(), vec![1, 4]);
            assert_eq!(
                outbox.backlog().await.unwrap().pending,
                1,
                "event 3 waits behind the parked event of key b"
            );
            let mut conn = outbox.pool().acquire().await.unwrap();
            assert_eq!(
                lease_of(&mut conn, &later[0]).await,
                None,
                "the held-back row went back to the usual claim"
            );
            drop(conn);

            *publisher.reject.lock().unwrap() = false;
            assert!(outbox.replay(&first[1].to_string()).await.unwrap());
            wait_published(&outbox, Duration::from_secs(10)).await;
            relay.shutdown().await.unwrap();
            assert_eq!(publisher.sent(), vec![1, 4, 2, 3]);
        }

        #[tokio::test]
        async fn rows_handed_off_during_a_publish_follow_it_unless_they_share_a_key() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let dest = "/queue/test.handoff.follow";
            let publisher = Scripted::default();
            *publisher.slow.lock().unwrap() = Duration::from_millis(400);
            let config = fast_relay()
                .with_relay_id("handoff-c")
                .with_lease(Duration::from_secs(600));
            let relay = outbox.relay(publisher.clone(), config).expect("valid settings").spawn();
            let append = async |n: i64, key: &str| {
                let mut tx = outbox.pool().begin().await.unwrap();
                let event = Event::json("ok", dest, &n).unwrap().with_key(key);
                outbox.append(&mut tx, event).await.unwrap();
                outbox.commit(tx).await.unwrap();
            };
            let publishing = async || publisher.in_flight.lock().unwrap().0 == 1;
            append(1, "a").await;
            until(
                "event 1 is on the wire",
                Duration::from_secs(10),
                publishing,
            )
            .await;
            append(2, "b").await;
            wait_published(&outbox, Duration::from_secs(10)).await;
            let most = publisher.in_flight.lock().unwrap().1;
            assert_eq!(most, 2, "event 2 (another key) followed event 1 at once");

            *publisher.in_flight.lock().unwrap() = (0, 0);
            append(3, "c").await;
            until(
                "event 3 is on the wire",
                Duration::from_secs(10),
                publishing,
            )
            .await;
            append(4, "c").await;
            wait_published(&outbox, Duration::from_secs(10)).await;
            let most = publisher.in_flight.lock().unwrap().1;
            assert_eq!(most, 1, "event 4 (same key) waited for event 3's receipt");
            relay.shutdown().await.unwrap();
            assert_eq!(publisher.sent(), vec![1, 2, 3, 4]);
        }

        #[tokio::test]
        async fn a_relay_that_cannot_publish_gives_its_rows_back_and_takes_no_more() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let dest = "/queue/test.handoff.down";
            let publisher = Scripted::default();
            *publisher.down.lock().unwrap() = true;
            let config = fast_relay()
                .with_relay_id("handoff-b")
                .with_lease(Duration::from_secs(600))
                .with_outage_backoff(Backoff::new(Duration::from_millis(50), Duration::from_millis(100)));
            let relay = outbox.relay(publisher.clone(), config).expect("valid settings").spawn();
            let metrics = relay.metrics().clone();
            let append = async |n: i64| {
                let mut tx = outbox.pool().begin().await.unwrap();
                let id = outbox
                    .append(&mut tx, Event::json("ok", dest, &n).unwrap().with_key("k"))
                    .await
                    .unwrap();
                let lease = lease_of(&mut tx, &id).await;
                outbox.commit(tx).await.unwrap();
                (id, lease)
            };
            let (one, lease) = append(1).await;
            assert_eq!(lease.as_deref(), Some("handoff-b-h"));
            // Two failed publishes: after the first the relay stopped taking
            // hand-offs and gave the row back; the second claimed it the usual way.
            until(
                "two failed publishes",
                Duration::from_secs(10),
                async || metrics.snapshot().unavailable >= 2,
            )
            .await;
            let mut conn = outbox.pool().acquire().await.unwrap();
            assert_ne!(
                lease_of(&mut conn, &one).await.as_deref(),
                Some("handoff-b-h")
            );
            drop(conn);
            let (_, lease) = append(2).await;
            assert_eq!(lease, None, "no hand-off to a relay that cannot publish");

            *publisher.down.lock().unwrap() = false;
            wait_published(&outbox, Duration::from_secs(10)).await;
            let (_, lease) = append(3).await;
            assert_eq!(
                lease.as_deref(),
                Some("handoff-b-h"),
                "hand-off resumes after a publish"
            );
            wait_published(&outbox, Duration::from_secs(10)).await;
            relay.shutdown().await.unwrap();
            assert_eq!(publisher.sent(), vec![1, 2, 3]);
            let mut conn = outbox.pool().acquire().await.unwrap();
            let leased: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM outbox_event WHERE claimed_by IS NOT NULL",
            )
            .fetch_one(&mut *conn)
            .await
            .unwrap();
            assert_eq!(leased, 0, "nothing is left leased after shutdown");
        }

        #[tokio::test]
        async fn a_killed_relay_s_hand_offs_are_taken_over_by_its_successor() {
            let Some((db, outbox)) = setup().await else {
                return;
            };
            let broker = broker().await;
            let dest = "/queue/test.handoff.crash";
            let env = |failpoint: &str, from: i64| {
                vec![
                    ("OUTBOX_FAILPOINT", failpoint.to_owned()),
                    ("OUTBOX_TEST_DB_URL", db.url().to_owned()),
                    ("OUTBOX_TEST_BROKER", broker.stomp_uri()),
                    ("OUTBOX_TEST_DEST", dest.to_owned()),
                    ("OUTBOX_TEST_FROM", from.to_string()),
                ]
            };
            let child = concat!(module_path!(), "::child_producer_relay");
            let child = child.split_once("::").map_or(child, |(_, rest)| rest);
            let (killed, stderr) = run_child(
                child,
                &env("relay.before_publish", 0),
                Duration::from_secs(60),
            )
            .await;
            assert!(
                killed,
                "child was not killed at relay.before_publish: {stderr}"
            );
            let (killed, stderr) = run_child(
                child,
                &env("relay.after_receipt", 50),
                Duration::from_secs(60),
            )
            .await;
            assert!(
                killed,
                "child was not killed at relay.after_receipt: {stderr}"
            );
            assert_eq!(outbox.backlog().await.unwrap().pending, 100);
            let leased: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM outbox_event WHERE claimed_by = 'crashy-h'",
            )
            .fetch_one(outbox.pool())
            .await
            .unwrap();
            assert_eq!(leased, 100, "every row was handed off to the killed relays");

            // The same relay name takes the rows over at once; under a claim
            // they would wait for their ten-minute lease.
            let relay = outbox
                .relay(
                    StompPublisher::new(client(&broker).await),
                    fast_relay()
                        .with_relay_id("crashy")
                        .with_batch_size(20)
                        .with_lease(Duration::from_secs(600)),
                )
                .expect("valid settings").spawn();
            wait_published(&outbox, Duration::from_secs(30)).await;
            relay.shutdown().await.unwrap();
            let got = drain(&broker, dest, Duration::from_secs(2)).await;
            let counts = tally(&got);
            assert_eq!(counts.len(), 100, "every event arrives");
            assert!(counts.values().all(|n| *n <= 2), "{counts:?}");
            // Exactly the batch confirmed before the second kill arrives twice.
            assert_eq!(counts.values().filter(|n| **n == 2).count(), 20);
            assert_eq!(got.len(), 120);
        }

        #[tokio::test]
        #[ignore = "child process of a_killed_relay_s_hand_offs_are_taken_over_by_its_successor"]
        async fn child_producer_relay() {
            let (Some(url), Some(broker), Some(dest), Some(from)) = (
                child_var("OUTBOX_TEST_DB_URL"),
                child_var("OUTBOX_TEST_BROKER"),
                child_var("OUTBOX_TEST_DEST"),
                child_var("OUTBOX_TEST_FROM"),
            ) else {
                return;
            };
            let from: i64 = from.parse().unwrap();
            let pool = sqlx::Pool::<$db>::connect(&url).await.unwrap();
            let outbox = Outbox::new(pool);
            let client =
                outbox::stomp::Client::connect(
                    outbox::stomp::Config::parse(&broker)
                        .unwrap()
                        .with_receipt_timeout(Duration::from_secs(2)),
                )
                .await
                    .unwrap();
            let relay = outbox
                .relay(
                    StompPublisher::new(client),
                    fast_relay()
                        .with_relay_id("crashy")
                        .with_batch_size(20)
                        .with_lease(Duration::from_secs(600)),
                )
                .expect("valid settings").spawn();
            let events: Vec<Event> = (from..from + 50)
                .map(|i| {
                    Event::json(
                        "user.created",
                        &dest,
                        &UserCreated {
                            user_id: i,
                            name: format!("user{i}"),
                            seq: i,
                        },
                    )
                    .unwrap()
                    .with_key(format!("k{}", i % 7))
                })
                .collect();
            let mut tx = outbox.pool().begin().await.unwrap();
            outbox.append_all(&mut tx, &events).await.unwrap();
            outbox.commit(tx).await.unwrap();
            // The armed failpoint ends this process; a timeout means it never fired.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(relay);
        }

        #[tokio::test]
        async fn retention_deletes_only_old_published_rows() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let dest = "/queue/test.retention";
            append_users(&outbox, dest, 0..5, 5).await;
            let no_retention = fast_relay()
                .with_retention(None);
            let relay = outbox.relay(Scripted::default(), no_retention).expect("valid settings").spawn();
            wait_published(&outbox, Duration::from_secs(10)).await;
            relay.shutdown().await.unwrap();
            append_users(&outbox, dest, 5..8, 5).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let config = fast_relay()
                .with_retention(Some(Duration::from_millis(1)))
                .with_retention_batch(2);
            // A publisher that refuses everything: the 3 new rows stay NEW.
            let relay = outbox.relay(Refuse, config).expect("valid settings").spawn();
            // Waits for retention to act instead of a fixed time, which a
            // loaded machine can overrun.
            let watched = relay.metrics().clone();
            until("retention deletes the old rows", Duration::from_secs(20), async || {
                watched.snapshot().deleted >= 5
            })
            .await;
            let metrics = relay.metrics().snapshot();
            relay.shutdown().await.unwrap();
            assert_eq!(metrics.deleted, 5);
            let counts = outbox.counts().await.unwrap();
            assert_eq!(count(&counts, "PUBLISHED"), 0);
            assert_eq!(count(&counts, "NEW"), 3);
        }

        #[tokio::test]
        async fn bad_table_names_and_bad_events_are_typed_errors() {
            let Some((_db, outbox)) = setup().await else {
                return;
            };
            let err = Outbox::with_table(outbox.pool().clone(), "x; DROP TABLE users").unwrap_err();
            assert!(
                matches!(err, outbox::core::Error::InvalidName { .. }),
                "{err}"
            );
            let mut tx = outbox.pool().begin().await.unwrap();
            let err = outbox
                .append(
                    &mut tx,
                    Event::raw("t", "/queue/x", "b", "text/plain")
                        .with_header("destination", "/queue/evil"),
                )
                .await
                .unwrap_err();
            assert!(matches!(err, outbox::core::Error::InvalidEvent(_)), "{err}");
            let err = outbox
                .append(&mut tx, Event::raw("t", "", "b", "text/plain"))
                .await
                .unwrap_err();
            assert!(matches!(err, outbox::core::Error::InvalidEvent(_)), "{err}");
        }
    };
}

/// Refuses every batch as if the broker were down.
struct Refuse;

impl Publisher for Refuse {
    async fn publish(&self, _: &[OutboxMessage]) -> Result<(), PublishError> {
        Err(PublishError::unavailable("refused by the test"))
    }
}

mod sqlite {
    relay_suite!(sqlx::Sqlite, support::sqlite);
}

mod postgres {
    relay_suite!(sqlx::Postgres, support::postgres);
}

mod mysql {
    relay_suite!(sqlx::MySql, support::mysql);
}

/// PostgreSQL only: a commit made without the in-process wake-up (as another
/// process would make it) wakes the relay through LISTEN/NOTIFY, also after
/// the listening connection was lost; a relay that is dropped stops listening.
mod postgres_notify {
    use super::*;

    use outbox::stomp::{AckMode, Subscribe, Subscription};

    /// The backends of this test's database whose last statement was a
    /// `LISTEN`, other than `except`.
    async fn listening(pool: &sqlx::PgPool, except: Option<i32>) -> Vec<i32> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid() AND pid <> $1",
        )
        .bind(except.unwrap_or(0))
        .fetch_all(pool)
        .await
        .unwrap()
    }

    /// The one listening backend other than `except`, once it is there.
    async fn listener_pid(pool: &sqlx::PgPool, except: Option<i32>) -> i32 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let pids = listening(pool, except).await;
            assert!(pids.len() <= 1, "one relay, one listener: {pids:?}");
            if let [pid] = pids[..] {
                return pid;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no connection listens (other than {except:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Appends one event through `outbox` and commits it plainly, as another
    /// process would (no in-process wake-up). Returns the event's id.
    async fn append_elsewhere(outbox: &Outbox<sqlx::Postgres>, destination: &str) -> String {
        let mut tx = outbox.pool().begin().await.unwrap();
        let id = outbox
            .append(&mut tx, Event::json("ping", destination, &1).unwrap())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        id.to_string()
    }

    /// The id of the next message on `sub`, waited for far less than the
    /// relay's poll interval, so only a wake-up can deliver it in time.
    async fn next_event_id(sub: &mut Subscription, what: &str) -> String {
        let message = tokio::time::timeout(Duration::from_secs(30), sub.next_message())
            .await
            .unwrap_or_else(|_| panic!("{what}: the relay was not woken"))
            .expect("subscription open");
        message.header("event-id").unwrap_or_default().to_owned()
    }

    /// While shut, a pool built with [`Gate::pool`] hands out and makes no
    /// connection: the test decides when the relay's listener can connect again.
    #[derive(Clone)]
    struct Gate(Arc<tokio::sync::watch::Sender<bool>>);

    impl Gate {
        fn new() -> Gate {
            Gate(Arc::new(tokio::sync::watch::channel(true).0))
        }

        fn set_open(&self, open: bool) {
            self.0.send_replace(open);
        }

        async fn pass(&self) {
            let _ = self.0.subscribe().wait_for(|open| *open).await;
        }

        async fn pool(&self, url: &str) -> sqlx::PgPool {
            let (on_acquire, on_connect) = (self.clone(), self.clone());
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .before_acquire(move |_, _| {
                    let gate = on_acquire.clone();
                    Box::pin(async move {
                        gate.pass().await;
                        Ok(true)
                    })
                })
                .after_connect(move |_, _| {
                    let gate = on_connect.clone();
                    Box::pin(async move {
                        gate.pass().await;
                        Ok(())
                    })
                })
                .connect(url)
                .await
                .unwrap()
        }
    }

    #[tokio::test]
    async fn a_relay_whose_listening_connection_was_ended_is_woken_again() {
        let Some(db) = support::postgres().await else {
            return;
        };
        let gate = Gate::new();
        let outbox = Outbox::new(gate.pool(db.url()).await);
        outbox.migrate().await.unwrap();
        let broker = broker().await;
        let dest = "/queue/test.listen-lost";
        let consumer = client(&broker).await;
        let mut sub = consumer
            .subscribe(Subscribe::new(dest).ack(AckMode::Auto))
            .await
            .unwrap();
        // Ten minutes between polls, 30 s allowed per event: only NOTIFY or
        // the wake-up after listening again can deliver it in time.
        let config = fast_relay()
            .with_poll_interval(Duration::from_secs(600))
            .with_handoff(false);
        let relay = outbox
            .relay(StompPublisher::new(client(&broker).await), config)
            .expect("valid settings")
            .spawn();
        // Another process: a pool of its own, which the relay does not know.
        let other = db.pool();
        let elsewhere = Outbox::new(other.clone());
        let first = listener_pid(other, None).await;

        // Listening: NOTIFY wakes the relay. Waiting for the mark as well gives
        // the reads that follow a publish time to run before the next commit,
        // so that the next row is found by a wake-up, not by one of them.
        let listened = append_elsewhere(&elsewhere, dest).await;
        assert_eq!(
            next_event_id(&mut sub, "committed while listening").await,
            listened
        );
        until(
            "the first event marked",
            Duration::from_secs(30),
            async || count(&outbox.counts().await.unwrap(), "PUBLISHED") == 1,
        )
        .await;

        // The listener's backend is ended, and while it cannot connect again
        // an event is committed: its notification reaches nobody. The relay
        // finds the row when it is woken after listening again.
        gate.set_open(false);
        let ended: Vec<bool> = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(first)
            .fetch_all(other)
            .await
            .unwrap();
        assert_eq!(ended, [true], "the listening backend is ended");
        until(
            "the listening backend gone",
            Duration::from_secs(30),
            async || {
                let left: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE pid = $1")
                        .bind(first)
                        .fetch_one(other)
                        .await
                        .unwrap();
                left == 0
            },
        )
        .await;
        let missed = append_elsewhere(&elsewhere, dest).await;
        gate.set_open(true);
        assert_eq!(
            next_event_id(&mut sub, "committed while not listening").await,
            missed
        );

        // Listening on a new connection, the relay is woken by NOTIFY again.
        let second = listener_pid(other, Some(first)).await;
        let notified = append_elsewhere(&elsewhere, dest).await;
        assert_eq!(
            next_event_id(&mut sub, "committed after listening again").await,
            notified
        );
        assert_eq!(listener_pid(other, Some(first)).await, second);

        relay.shutdown().await.unwrap();
        let _ = consumer.disconnect().await;
    }

    #[tokio::test]
    async fn a_relay_dropped_while_running_stops_listening() {
        let Some(db) = support::postgres().await else {
            return;
        };
        let outbox = Outbox::new(db.pool().clone());
        outbox.migrate().await.unwrap();
        let config = fast_relay()
            .with_poll_interval(Duration::from_secs(600))
            .with_handoff(false);
        // Run in place, as under a timeout or a select, then dropped.
        let mut running = Box::pin(
            outbox
                .relay(Scripted::default(), config)
                .expect("valid settings")
                .run(std::future::pending()),
        );
        tokio::select! {
            result = &mut running => panic!("the relay stopped by itself: {result:?}"),
            _ = listener_pid(db.pool(), None) => {}
        }
        drop(running);
        until(
            "no connection listens",
            Duration::from_secs(30),
            async || listening(db.pool(), None).await.is_empty(),
        )
        .await;
    }

    #[tokio::test]
    async fn a_commit_elsewhere_wakes_the_relay_through_notify() {
        let Some(db) = support::postgres().await else {
            return;
        };
        let outbox = Outbox::new(db.pool().clone());
        outbox.migrate().await.unwrap();
        let publisher = Scripted::default();
        // The poll would take a minute: only a notification can be this quick.
        // Without hand-off: the row stays free for relays of other processes,
        // which is what NOTIFY is for.
        let config = fast_relay()
            .with_poll_interval(Duration::from_secs(60))
            .with_handoff(false);
        let relay = outbox
            .relay(publisher.clone(), config)
            .expect("valid settings")
            .spawn();
        tokio::time::sleep(Duration::from_millis(500)).await; // LISTEN is up
        let mut tx = db.pool().begin().await.unwrap();
        outbox
            .append(&mut tx, Event::json("ping", "/queue/x", &1).unwrap())
            .await
            .unwrap();
        tx.commit().await.unwrap(); // plain commit: no in-process wake-up
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while publisher.published.lock().unwrap().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay was not woken"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        relay.shutdown().await.unwrap();
    }
}
