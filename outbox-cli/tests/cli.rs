//! The `outbox` binary, run as a process against real databases (modules
//! `sqlite`, `postgres`, `mysql`) and a real ActiveMQ: status numbers, parked
//! listings, replays that a running relay or consumer then carries out once,
//! and the exit codes of failures.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox_core::consumer::{BoxFuture, HandlerError, decode_json};
use outbox_core::relay::StompPublisher;
use outbox_core::{
    Backoff, Consumer, ConsumerConfig, Delivery, Event, Handler, Inbox, Outbox, RelayConfig,
};
use outbox_stomp::Outgoing;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use support::*;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct UserCreated {
    user_id: i64,
    name: String,
}

fn fast_relay() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_millis(50))
        .with_lease(Duration::from_secs(5))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
}

fn quick_consumer(destination: &str) -> ConsumerConfig {
    ConsumerConfig::new(destination)
        .with_retry_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(50),
        ))
        .with_retry_poll(Duration::from_millis(20))
        .with_max_attempts(2)
        .with_concurrency(1)
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis(),
    )
    .expect("ms fit i64")
}

/// The whitespace-separated cells of the line of `text` whose first cells
/// are `first`.
fn line_cells<'a>(text: &'a str, first: &[&str]) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.len() >= first.len() && cells[..first.len()] == *first)
        .unwrap_or_else(|| panic!("no line starting with {first:?} in:\n{text}"))
}

#[tokio::test]
async fn a_wrong_url_or_an_unreachable_database_exits_3_and_no_url_exits_2() {
    let run = outbox_on("oracle://scott:tiger@db/orcl", &["status"]).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("unsupported database URL"), "{run:?}");
    assert!(
        !run.stderr.contains("tiger"),
        "the password is hidden: {run:?}"
    );

    let run = outbox_on("postgres://postgres:secret@127.0.0.1:1/test", &["status"]).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr
            .contains("cannot connect to postgres://postgres:***@127.0.0.1:1/test"),
        "{run:?}"
    );

    let dir = tempfile_dir();
    let missing = format!("sqlite:{}/none.db", dir.display());
    let run = outbox_on(&missing, &["parked"]).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("cannot connect"), "{run:?}");
    assert!(
        !dir.join("none.db").exists(),
        "no database file is created by accident"
    );

    let run = outbox(&["status"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--database"), "{run:?}");

    let run = outbox(&["frobnicate"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh empty directory.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "outbox-cli-test-{}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

macro_rules! cli_suite {
    ($db:ty, $open:path, $dollar:expr) => {
        use super::*;

        type Db = $db;
        const DOLLAR: bool = $dollar;

        async fn exec(db: &outbox_test_harness::TestDb<Db>, sql: &str) {
            sqlx::query(sql).execute(db.pool()).await.expect(sql);
        }

        /// A database with both tables migrated through the library.
        async fn setup() -> Option<(outbox_test_harness::TestDb<Db>, Outbox<Db>)> {
            let db = $open().await?;
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            Inbox::new(db.pool().clone(), "setup").unwrap().migrate().await.unwrap();
            Some((db, outbox))
        }

        /// Appends `n` events, one transaction each, and returns their ids.
        async fn append(outbox: &Outbox<Db>, destination: &str, n: i64) -> Vec<String> {
            let mut ids = Vec::new();
            for i in 0..n {
                let mut tx = outbox.pool().begin().await.unwrap();
                let event = Event::json(
                    "user.created",
                    destination,
                    &UserCreated { user_id: i, name: format!("user{i}") },
                )
                .unwrap()
                .with_key(format!("user-{i}"));
                ids.push(outbox.append(&mut tx, event).await.unwrap().to_string());
                outbox.commit(tx).await.unwrap();
            }
            ids
        }

        /// Parks the outbox rows `ids` as a relay would after its budget.
        async fn park(db: &outbox_test_harness::TestDb<Db>, ids: &[String]) {
            for id in ids {
                sqlx::query(&placeholders(
                    "UPDATE outbox_event SET process = 'FAILED', attempts = 10, \
                     last_error = ?, update_time = ? WHERE event_id = ?",
                    DOLLAR,
                ))
                .bind("broker refused: message too large")
                .bind(now_ms())
                .bind(id)
                .execute(db.pool())
                .await
                .unwrap();
            }
        }

        async fn mark_published(db: &outbox_test_harness::TestDb<Db>, ids: &[String]) {
            for id in ids {
                sqlx::query(&placeholders(
                    "UPDATE outbox_event SET process = 'PUBLISHED', published_time = ? \
                     WHERE event_id = ?",
                    DOLLAR,
                ))
                .bind(now_ms())
                .bind(id)
                .execute(db.pool())
                .await
                .unwrap();
            }
        }

        /// An inbox row of `consumer` in `process`, as the consumer writes them.
        async fn inbox_row(
            db: &outbox_test_harness::TestDb<Db>,
            consumer: &str,
            event_id: &str,
            process: &str,
            content: Option<&[u8]>,
        ) {
            let now = now_ms();
            let processed = process == "PROCESSED";
            sqlx::query(&placeholders(
                "INSERT INTO inbox_event (consumer, event_id, event_type, event_key, process, \
                 attempts, next_attempt_at, last_error, headers, content, create_time, \
                 update_time, processed_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                DOLLAR,
            ))
            .bind(consumer)
            .bind(event_id)
            .bind("user.created")
            .bind(None::<String>)
            .bind(process)
            .bind(if processed { 1_i64 } else { 5 })
            .bind((!processed).then_some(now + 3_600_000))
            .bind((!processed).then_some("points service refused"))
            .bind((!processed).then_some("[]"))
            .bind(content.map(<[u8]>::to_vec))
            .bind(now)
            .bind(now)
            .bind(processed.then_some(now))
            .execute(db.pool())
            .await
            .unwrap();
        }

        #[tokio::test]
        async fn status_numbers_match_the_tables() {
            let Some((db, outbox)) = setup().await else { return };
            let ids = append(&outbox, "/queue/cli.status", 6).await;
            mark_published(&db, &ids[..2]).await;
            park(&db, &ids[2..3]).await;
            for n in 1..=3 {
                inbox_row(&db, "points", &format!("p-{n}"), "PROCESSED", None).await;
            }
            inbox_row(&db, "points", "r-1", "RETRY", Some(b"{}")).await;
            inbox_row(&db, "points", "f-1", "FAILED", Some(b"{}")).await;
            inbox_row(&db, "points", "f-2", "FAILED", Some(b"{}")).await;
            inbox_row(&db, "audit", "a-1", "PROCESSED", None).await;

            let json = outbox_on(db.url(), &["status", "--json"]).await.ok().json();
            assert_eq!(json["outbox"]["table"], "outbox_event");
            assert_eq!(json["outbox"]["exists"], true);
            assert_eq!(json["outbox"]["waiting"], 3, "{json}");
            assert_eq!(json["outbox"]["published"], 2, "{json}");
            assert_eq!(json["outbox"]["parked"], 1, "{json}");
            assert!(json["outbox"]["oldest_waiting_age_ms"].as_u64().is_some(), "{json}");
            let backlog = outbox.backlog().await.unwrap();
            assert_eq!((backlog.pending, backlog.parked), (3, 1));
            let consumers = json["inbox"]["consumers"].as_array().unwrap();
            assert_eq!(consumers.len(), 2, "{json}");
            assert_eq!(consumers[0]["consumer"], "audit");
            assert_eq!(
                (&consumers[0]["processed"], &consumers[0]["retrying"], &consumers[0]["parked"]),
                (&Value::from(1), &Value::from(0), &Value::from(0))
            );
            assert_eq!(consumers[1]["consumer"], "points");
            assert_eq!(
                (&consumers[1]["processed"], &consumers[1]["retrying"], &consumers[1]["parked"]),
                (&Value::from(3), &Value::from(1), &Value::from(2))
            );

            let human = outbox_on(db.url(), &["status"]).await.ok().stdout;
            let row = line_cells(&human, &["outbox_event"]);
            assert_eq!((row[1], row[3], row[4]), ("3", "2", "1"), "{human}");
            assert_eq!(line_cells(&human, &["inbox_event", "points"])[2..], ["3", "1", "2"]);
            assert_eq!(line_cells(&human, &["inbox_event", "audit"])[2..], ["1", "0", "0"]);
            // Aligned: the header's columns start where the values do.
            let header = human.lines().find(|l| l.starts_with("OUTBOX TABLE")).unwrap();
            let values = human.lines().find(|l| l.starts_with("outbox_event")).unwrap();
            assert_eq!(header.find("WAITING"), values.find(" 3 ").map(|i| i + 1), "{human}");
        }

        #[tokio::test]
        async fn parked_rows_are_listed_with_attempts_error_and_a_payload_preview() {
            let Some((db, outbox)) = setup().await else { return };
            let ids = append(&outbox, "/queue/cli.parked", 2).await;
            let mut tx = outbox.pool().begin().await.unwrap();
            let long = "x".repeat(200);
            let raw = outbox
                .append(
                    &mut tx,
                    Event::raw("blob", "/queue/cli.parked", [b"bad\n".as_slice(), &[0xff, 0xfe], long.as_bytes()].concat(), "application/octet-stream"),
                )
                .await
                .unwrap()
                .to_string();
            outbox.commit(tx).await.unwrap();
            park(&db, &[ids[0].clone(), ids[1].clone(), raw.clone()]).await;

            let json = outbox_on(db.url(), &["--json", "parked"]).await.ok().json();
            assert_eq!(json["total"], 3, "{json}");
            let events = json["events"].as_array().unwrap();
            assert_eq!(events.len(), 3);
            assert_eq!(events[0]["event_id"], ids[0].as_str());
            assert_eq!(events[0]["event_type"], "user.created");
            assert_eq!(events[0]["destination"], "/queue/cli.parked");
            assert_eq!(events[0]["key"], "user-0");
            assert_eq!(events[0]["attempts"], 10);
            assert_eq!(events[0]["last_error"], "broker refused: message too large");
            assert_eq!(events[0]["content_type"], "application/json");
            let payload: UserCreated =
                serde_json::from_str(events[0]["payload"].as_str().unwrap()).unwrap();
            assert_eq!(payload, UserCreated { user_id: 0, name: "user0".into() });
            assert_eq!(events[0]["payload_preview"], r#"{"user_id":0,"name":"user0"}"#);
            let blob = &events[2];
            assert_eq!(blob["event_id"], raw.as_str());
            assert_eq!(blob["payload"], Value::Null, "not UTF-8");
            assert_eq!(blob["payload_bytes"], 206);
            let preview = blob["payload_preview"].as_str().unwrap();
            assert!(preview.starts_with("bad\\n\u{fffd}\u{fffd}xxx"), "{preview}");
            assert!(preview.ends_with('…'), "{preview}");
            assert_eq!(preview.chars().count(), 80 + 1 + 1, "80 characters, the \\n's backslash and …");

            let human = outbox_on(db.url(), &["parked", "--limit", "2"]).await.ok().stdout;
            assert!(human.starts_with("EVENT ID"), "{human}");
            for column in ["TYPE", "DESTINATION", "KEY", "ATTEMPTS", "LAST ERROR", "PAYLOAD"] {
                assert!(human.lines().next().unwrap().contains(column), "{human}");
            }
            let row = line_cells(&human, &[ids[1].as_str()]);
            assert_eq!(&row[1..5], ["user.created", "/queue/cli.parked", "user-1", "10"], "{human}");
            assert!(human.contains(r#"{"user_id":1,"name":"user1"}"#), "{human}");
            assert!(!human.contains(&raw), "limited to 2: {human}");
            assert!(human.contains("2 of 3 shown"), "{human}");

            // The inbox side.
            inbox_row(&db, "points", "e-bad", "FAILED", Some(b"{not json")).await;
            inbox_row(&db, "points", "e-ok", "PROCESSED", None).await;
            let run = outbox_on(db.url(), &["inbox", "parked", "--consumer", "points", "--json"]).await.ok();
            let json = run.json();
            assert_eq!(json["consumer"], "points");
            assert_eq!(json["total"], 1);
            assert_eq!(json["events"][0]["event_id"], "e-bad");
            assert_eq!(json["events"][0]["payload"], "{not json");
            assert_eq!(json["events"][0]["attempts"], 5);
            assert_eq!(json["events"][0]["last_error"], "points service refused");
            let human = outbox_on(db.url(), &["inbox", "parked", "--consumer", "points"]).await.ok().stdout;
            let row = line_cells(&human, &["e-bad"]);
            assert_eq!(&row[1..3], ["user.created", "-"], "{human}");
            assert!(human.contains("{not json"), "{human}");
            assert!(!human.contains("DESTINATION"), "{human}");
            let none = outbox_on(db.url(), &["inbox", "parked", "--consumer", "audit"]).await.ok().stdout;
            assert_eq!(none, "consumer audit has no parked events in inbox_event\n");
        }

        #[tokio::test]
        async fn replayed_events_are_published_once_each_by_a_running_relay() {
            let Some((db, outbox)) = setup().await else { return };
            let broker = broker().await;
            let dest = "/queue/cli.replay";
            let ids = append(&outbox, dest, 6).await;
            park(&db, &ids[1..]).await;

            // Dry runs change nothing.
            let json = outbox_on(db.url(), &["--json", "replay", "--dry-run", &ids[1], &ids[2], "nope"]).await;
            assert_eq!(json.code, 5, "{json:?}");
            let json = json.json();
            assert_eq!((&json["dry_run"], &json["count"]), (&Value::from(true), &Value::from(2)), "{json}");
            assert_eq!(json["unknown"], serde_json::json!(["nope"]));
            assert_eq!(json["events"][0]["event_id"], ids[1].as_str());
            let run = outbox_on(db.url(), &["replay", "--all", "--dry-run"]).await.ok();
            assert!(run.stdout.contains("would replay 5 parked events (dry run: nothing changed)"), "{run:?}");
            for id in &ids[1..] {
                assert!(run.stdout.contains(id.as_str()), "{run:?}");
            }
            assert_eq!(outbox.backlog().await.unwrap().parked, 5);

            // Two by id.
            let json = outbox_on(db.url(), &["--json", "replay", &ids[1], &ids[2], &ids[1]]).await.ok().json();
            assert_eq!(json["count"], 2, "{json}");
            assert_eq!(json["ids"], serde_json::json!([ids[1], ids[2]]));
            assert_eq!(json["unknown"], serde_json::json!([]));
            let backlog = outbox.backlog().await.unwrap();
            assert_eq!((backlog.pending, backlog.parked), (3, 3));

            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), fast_relay())
                .expect("valid settings")
                .spawn();
            eventually("the replayed rows published", Duration::from_secs(60), || {
                let outbox = outbox.clone();
                async move { outbox.backlog().await.unwrap().pending == 0 }
            })
            .await;

            // The rest with --all, in batches of 2, with progress on stderr.
            let run = outbox_on(db.url(), &["replay", "--all", "--batch", "2", "--progress"]).await.ok();
            assert_eq!(
                run.stdout,
                "replayed 3 parked events; relays publish replayed events again\n",
                "{run:?}"
            );
            assert_eq!(run.stderr, "replayed 2/3\nreplayed 3/3\n", "{run:?}");
            eventually("every row published", Duration::from_secs(60), || {
                let outbox = outbox.clone();
                async move {
                    let counts = outbox.counts().await.unwrap();
                    counts.published == 6 && counts.total() == 6
                }
            })
            .await;
            let got = drain(&broker, dest, Duration::from_secs(3)).await;
            relay.shutdown().await.unwrap();
            let tally = tally(&got);
            assert_eq!(got.len(), 6, "{got:?}");
            for id in &ids {
                assert_eq!(tally.get(id), Some(&1), "{id} in {got:?}");
            }
            // Nothing parked any more: --all replays nothing and succeeds.
            let run = outbox_on(db.url(), &["replay", "--all"]).await.ok();
            assert_eq!(run.stdout, "replayed 0 parked events\n");
        }

        /// Writes one `points` row per event; fails while `broken` is set.
        struct Points {
            broken: Arc<AtomicBool>,
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
                    sqlx::query(&format!("INSERT INTO points (user_id) VALUES ({})", event.user_id))
                        .execute(&mut **tx)
                        .await?;
                    if event.user_id == 2 && self.broken.load(Ordering::SeqCst) {
                        return Err("points service refused user 2".into());
                    }
                    Ok(())
                })
            }
        }

        async fn points(db: &outbox_test_harness::TestDb<Db>) -> HashMap<i64, i64> {
            let rows: Vec<(i64, i64)> =
                sqlx::query_as("SELECT user_id, COUNT(*) FROM points GROUP BY user_id")
                    .fetch_all(db.pool())
                    .await
                    .unwrap();
            rows.into_iter().collect()
        }

        #[tokio::test]
        async fn an_inbox_replay_is_applied_once_by_the_running_consumer() {
            let Some((db, _outbox)) = setup().await else { return };
            exec(&db, "CREATE TABLE points (user_id BIGINT NOT NULL)").await;
            let broker = broker().await;
            let inbox = Inbox::new(db.pool().clone(), "points").unwrap();
            let broken = Arc::new(AtomicBool::new(true));
            let dest = "/queue/cli.inbox.replay";
            let handle = Consumer::new(inbox.clone(), Points { broken: broken.clone() }, quick_consumer(dest))
                .expect("valid settings")
                .spawn(client(&broker).await)
                .await
                .unwrap();
            let producer = client(&broker).await;
            for n in 1..=3 {
                producer
                    .send(
                        Outgoing::new(dest.to_owned(), serde_json::to_vec(&UserCreated { user_id: n, name: format!("user{n}") }).unwrap())
                            .persistent(true)
                            .header("event-id", format!("e-{n}"))
                            .header("event-type", "user.created"),
                    )
                    .await
                    .unwrap();
            }
            eventually("two applied and user 2 parked", Duration::from_secs(60), || {
                let inbox = inbox.clone();
                async move {
                    let c = inbox.counts().await.unwrap();
                    (c.processed, c.retry, c.failed) == (2, 0, 1)
                }
            })
            .await;
            let status = outbox_on(db.url(), &["--json", "status"]).await.ok().json();
            assert_eq!(status["inbox"]["consumers"][0]["parked"], 1, "{status}");

            let run = outbox_on(db.url(), &["inbox", "replay", "--consumer", "points", "--dry-run", "e-2"]).await.ok();
            assert!(run.stdout.contains("would replay 1 parked inbox event of consumer points"), "{run:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(inbox.counts().await.unwrap().failed, 1, "a dry run changes nothing");

            broken.store(false, Ordering::SeqCst);
            let run = outbox_on(db.url(), &["inbox", "replay", "--consumer", "points", "e-2"]).await.ok();
            assert!(run.stdout.contains("replayed 1 parked inbox event of consumer points"), "{run:?}");
            eventually("the replayed event applied", Duration::from_secs(60), || {
                let inbox = inbox.clone();
                async move { inbox.counts().await.unwrap().processed == 3 }
            })
            .await;
            // Applied once: a second replay finds nothing parked.
            let run = outbox_on(db.url(), &["inbox", "replay", "--consumer", "points", "e-2"]).await;
            assert_eq!(run.code, 5, "{run:?}");
            assert!(run.stderr.contains("no parked inbox event of consumer points with id e-2"), "{run:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
            handle.shutdown().await.unwrap();
            assert_eq!(points(&db).await, HashMap::from([(1, 1), (2, 1), (3, 1)]));
        }

        /// How many times each row of `table` was replayed, as the
        /// triggers of `re_park_on_replay` log it.
        async fn replays(db: &outbox_test_harness::TestDb<Db>, table: &str) -> HashMap<String, i64> {
            let rows: Vec<(String, i64)> = sqlx::query_as(&placeholders(
                "SELECT event_id, COUNT(*) FROM replay_log WHERE tbl = ? GROUP BY event_id",
                DOLLAR,
            ))
            .bind(table)
            .fetch_all(db.pool())
            .await
            .unwrap();
            rows.into_iter().collect()
        }

        #[tokio::test]
        async fn replay_all_replays_every_row_parked_at_the_start_once_even_if_parked_again() {
            let Some((db, outbox)) = setup().await else { return };
            let ids = append(&outbox, "/queue/cli.repark", 5).await;
            park(&db, &ids).await;
            let inbox_ids: Vec<String> = (1..=5).map(|n| format!("f-{n}")).collect();
            for id in &inbox_ids {
                inbox_row(&db, "points", id, "FAILED", Some(b"{}")).await;
            }
            // Every replayed row is parked again at once, as a relay or a
            // consumer whose every attempt fails would: the oldest parked
            // rows are then always the ones this run replayed already.
            re_park_on_replay(&db).await;

            let run = outbox_on(db.url(), &["--json", "replay", "--all", "--batch", "2", "--progress"]).await.ok();
            let json = run.json();
            assert_eq!(json["count"], 5, "{run:?}");
            assert_eq!(json["ids"], serde_json::json!(ids), "{run:?}");
            assert_eq!(run.stderr, "replayed 2/5\nreplayed 4/5\nreplayed 5/5\n", "{run:?}");
            let once: HashMap<String, i64> = ids.iter().map(|id| (id.clone(), 1)).collect();
            assert_eq!(replays(&db, "outbox_event").await, once);
            assert_eq!(outbox.backlog().await.unwrap().parked, 5, "parked again by the trigger");

            let run = outbox_on(
                db.url(),
                &["inbox", "replay", "--consumer", "points", "--all", "--batch", "2"],
            )
            .await
            .ok();
            assert_eq!(
                run.stdout,
                "replayed 5 parked inbox events of consumer points; \
                 the running consumer applies replayed events at its next retry poll\n",
                "{run:?}"
            );
            let once: HashMap<String, i64> = inbox_ids.iter().map(|id| (id.clone(), 1)).collect();
            assert_eq!(replays(&db, "inbox_event").await, once);
        }

        #[tokio::test]
        async fn a_closed_stdout_ends_the_command_quietly_with_exit_0() {
            let Some((db, outbox)) = setup().await else { return };
            // Far more output than a pipe holds (64 KiB): the command is
            // still writing when the reader goes away.
            let mut tx = outbox.pool().begin().await.unwrap();
            for i in 0..1500 {
                let event = Event::json(
                    "user.created",
                    "/queue/cli.pipe",
                    &UserCreated { user_id: i, name: format!("user{i}") },
                )
                .unwrap();
                outbox.append(&mut tx, event).await.unwrap();
            }
            outbox.commit(tx).await.unwrap();
            exec(&db, "UPDATE outbox_event SET process = 'FAILED', attempts = 10, last_error = 'refused'").await;

            for args in [&["parked", "--limit", "1500"][..], &["--json", "parked", "--limit", "1500"]] {
                let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
                    .args(["--database", db.url()])
                    .args(args)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("run the outbox binary");
                // `| head -1`: one line read, then the pipe closed.
                let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
                let mut first = String::new();
                tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut first).await.unwrap();
                assert!(!first.is_empty(), "{args:?}: a first line");
                drop(stdout);
                let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
                    .await
                    .expect("the command ends")
                    .unwrap();
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
                assert_eq!(stderr, "", "{args:?}: nothing on stderr");
            }
        }

        #[tokio::test]
        async fn status_on_a_consumer_s_database_shows_its_inbox_and_does_not_ask_for_an_outbox() {
            let Some(db) = $open().await else { return };
            outbox_on(db.url(), &["migrate", "--only", "inbox"]).await.ok();
            inbox_row(&db, "shipping", "s-1", "PROCESSED", None).await;
            inbox_row(&db, "shipping", "s-2", "FAILED", Some(b"{}")).await;
            let run = outbox_on(db.url(), &["status"]).await.ok();
            assert!(!run.stdout.contains("migrate"), "no migrate advice on a consumer's database: {run:?}");
            assert!(
                run.stdout.contains("outbox table outbox_event: none in this database (it only consumes events)"),
                "{run:?}"
            );
            assert_eq!(line_cells(&run.stdout, &["inbox_event", "shipping"])[2..], ["1", "0", "1"]);
            let json = outbox_on(db.url(), &["--json", "status"]).await.ok().json();
            assert_eq!(json["outbox"]["exists"], false, "{json}");
            assert_eq!(json["inbox"]["exists"], true, "{json}");

            // And the other way round: a producer's database has no inbox.
            let Some(db) = $open().await else { return };
            outbox_on(db.url(), &["migrate", "--only", "outbox"]).await.ok();
            let run = outbox_on(db.url(), &["status"]).await.ok();
            assert!(!run.stdout.contains("migrate"), "{run:?}");
            assert!(run.stdout.contains("inbox table inbox_event: none in this database (it only produces events)"), "{run:?}");
        }

        #[tokio::test]
        async fn discard_deletes_only_the_parked_rows_chosen_and_asks_first() {
            let Some((db, outbox)) = setup().await else { return };
            let ids = append(&outbox, "/queue/cli.discard", 4).await;
            let mut tx = outbox.pool().begin().await.unwrap();
            let blob = outbox
                .append(&mut tx, Event::raw("blob", "/queue/cli.discard", b"x".to_vec(), "application/octet-stream"))
                .await
                .unwrap()
                .to_string();
            outbox.commit(tx).await.unwrap();
            // ids[3] stays waiting; the others are parked.
            park(&db, &[ids[0].clone(), ids[1].clone(), ids[2].clone(), blob.clone()]).await;
            let parked_ids = async || -> Vec<String> {
                outbox.parked(100).await.unwrap().into_iter().map(|p| p.event_id).collect()
            };

            // Without --yes and without a terminal to ask on: nothing goes.
            let run = outbox_on(db.url(), &["discard", ids[0].as_str()]).await;
            assert_eq!(run.code, 2, "{run:?}");
            assert!(run.stderr.contains("without --yes"), "{run:?}");
            assert_eq!(parked_ids().await.len(), 4);

            let run = outbox_on(db.url(), &["discard", "--all", "--dry-run", "--json"]).await.ok();
            assert_eq!(run.json()["count"], 4, "{run:?}");
            assert_eq!(parked_ids().await.len(), 4, "a dry run changes nothing");

            // By id: a parked row goes; a waiting row and an unknown id stay, exit 5.
            let run = outbox_on(db.url(), &["discard", "--yes", ids[0].as_str(), ids[3].as_str(), "nope"]).await;
            assert_eq!(run.code, 5, "{run:?}");
            assert!(run.stdout.contains(ids[0].as_str()), "the removed row is printed: {run:?}");
            assert!(run.stdout.contains("discarded 1 parked event"), "{run:?}");
            assert!(run.stderr.contains(&format!("no parked event with id {}", ids[3])), "{run:?}");
            assert!(run.stderr.contains("no parked event with id nope"), "{run:?}");
            assert_eq!(parked_ids().await, [ids[1].clone(), ids[2].clone(), blob.clone()]);
            assert_eq!(outbox.backlog().await.unwrap().pending, 1, "the waiting row is still there");

            // By filter: only the parked rows of one type.
            let json = outbox_on(db.url(), &["discard", "--type", "blob", "--yes", "--json"]).await.ok().json();
            assert_eq!(json["count"], 1, "{json}");
            assert_eq!(json["events"][0]["event_id"], blob.as_str(), "{json}");
            assert_eq!(parked_ids().await, [ids[1].clone(), ids[2].clone()]);
            let run = outbox_on(db.url(), &["discard", "--all", "-y"]).await.ok();
            assert!(run.stdout.contains("discarded 2 parked events"), "{run:?}");
            assert!(parked_ids().await.is_empty());
            assert_eq!(outbox.backlog().await.unwrap().pending, 1);

            // The inbox side: one consumer's parked rows, nothing else.
            inbox_row(&db, "points", "p-ok", "PROCESSED", None).await;
            inbox_row(&db, "points", "p-retry", "RETRY", Some(b"{}")).await;
            inbox_row(&db, "points", "p-bad-1", "FAILED", Some(b"{}")).await;
            inbox_row(&db, "points", "p-bad-2", "FAILED", Some(b"{}")).await;
            inbox_row(&db, "audit", "a-bad", "FAILED", Some(b"{}")).await;
            let run = outbox_on(db.url(), &["inbox", "discard", "--consumer", "points", "p-bad-1", "--yes"]).await.ok();
            assert!(run.stdout.contains("discarded 1 parked inbox event of consumer points"), "{run:?}");
            let run = outbox_on(db.url(), &["inbox", "discard", "--consumer", "points", "p-retry", "--yes"]).await;
            assert_eq!(run.code, 5, "a row waiting for a retry is not parked: {run:?}");
            outbox_on(db.url(), &["inbox", "discard", "--consumer", "points", "--all", "--yes"]).await.ok();
            let points = Inbox::new(db.pool().clone(), "points").unwrap().counts().await.unwrap();
            assert_eq!((points.processed, points.retry, points.failed), (1, 1, 0));
            let audit = Inbox::new(db.pool().clone(), "audit").unwrap().counts().await.unwrap();
            assert_eq!(audit.failed, 1, "another consumer's rows stay");
        }

        #[tokio::test]
        async fn a_long_last_error_keeps_its_end_in_tables_and_is_whole_with_full() {
            let Some((db, outbox)) = setup().await else { return };
            let ids = append(&outbox, "/queue/cli.errors", 1).await;
            park(&db, &ids).await;
            let error = "broker refused a frame and closed the connection: The maximum frame size \
                         of 104857600 bytes was exceeded by 3145728 bytes, frame dropped at offset 104857601";
            exec(&db, &format!("UPDATE outbox_event SET last_error = '{error}'")).await;
            inbox_row(&db, "points", "e-long", "FAILED", Some(b"{\"order\":1}")).await;
            exec(&db, &format!("UPDATE inbox_event SET last_error = '{error}'")).await;

            let table = outbox_on(db.url(), &["parked"]).await.ok().stdout;
            assert!(table.contains("frame dropped at offset 104857601"), "the end is kept: {table}");
            assert!(table.contains("broker refused a frame"), "{table}");
            assert!(!table.contains(error), "cut in the table: {table}");
            let full = outbox_on(db.url(), &["parked", "--full"]).await.ok().stdout;
            assert!(full.contains(&format!("last error:  {error}\n")), "{full}");
            assert!(full.contains(&format!("event id:    {}\n", ids[0])), "{full}");
            assert!(full.contains("destination: /queue/cli.errors\n"), "{full}");
            let full = outbox_on(db.url(), &["inbox", "parked", "--consumer", "points", "--full"]).await.ok().stdout;
            assert!(full.contains(&format!("last error:  {error}\n")), "{full}");
            assert!(full.contains("payload:     {\"order\":1}\n"), "{full}");
            assert!(!full.contains("destination:"), "{full}");
        }

        #[tokio::test]
        async fn missing_tables_unknown_ids_and_bad_names_have_their_exit_codes() {
            let Some(db) = $open().await else { return };
            for args in [
                &["status"][..],
                &["parked"],
                &["replay", "--all"],
                &["replay", "e-1"],
            ] {
                let run = outbox_on(db.url(), args).await;
                assert_eq!(run.code, 4, "{args:?}: {run:?}");
                assert!(
                    run.stderr.contains("table outbox_event does not exist; run `outbox migrate`"),
                    "{args:?}: {run:?}"
                );
            }
            let run = outbox_on(db.url(), &["inbox", "parked", "--consumer", "points"]).await;
            assert_eq!(run.code, 4, "{run:?}");
            assert!(run.stderr.contains("table inbox_event does not exist; run `outbox migrate`"), "{run:?}");

            // Only the outbox table: the inbox is still missing.
            let run = outbox_on(db.url(), &["migrate", "--only", "outbox"]).await.ok();
            assert_eq!(run.stdout, "outbox table outbox_event is up to date\n");
            let status = outbox_on(db.url(), &["--json", "status"]).await.ok().json();
            assert_eq!(status["inbox"]["exists"], false, "{status}");
            assert_eq!(status["outbox"]["exists"], true, "{status}");
            let run = outbox_on(db.url(), &["inbox", "replay", "--consumer", "points", "--all"]).await;
            assert_eq!(run.code, 4, "{run:?}");

            // Both, twice: migrating is repeatable.
            for _ in 0..2 {
                let json = outbox_on(db.url(), &["migrate", "--json"]).await.ok().json();
                assert_eq!(json["migrated"][0]["kind"], "outbox");
                assert_eq!(json["migrated"][1]["table"], "inbox_event");
            }
            let run = outbox_on(db.url(), &["--table", "orders_outbox", "migrate"]).await.ok();
            assert!(run.stdout.contains("outbox table orders_outbox is up to date"), "{run:?}");
            outbox_on(db.url(), &["--table", "orders_outbox", "status"]).await.ok();

            let run = outbox_on(db.url(), &["replay", "nope"]).await;
            assert_eq!(run.code, 5, "{run:?}");
            assert_eq!(run.stderr, "error: no parked event with id nope\n");
            let run = outbox_on(db.url(), &["replay", "--json", "nope", "nada"]).await;
            assert_eq!(run.code, 5, "{run:?}");
            assert_eq!(run.json()["unknown"], serde_json::json!(["nope", "nada"]));
            assert!(run.stderr.contains("no parked event with id nada"), "{run:?}");
            let run = outbox_on(db.url(), &["inbox", "replay", "--consumer", "points", "nope"]).await;
            assert_eq!(run.code, 5, "{run:?}");
            assert!(run.stderr.contains("no parked inbox event of consumer points with id nope"), "{run:?}");

            // Usage errors.
            let run = outbox_on(db.url(), &["--table", "outbox; DROP TABLE x", "status"]).await;
            assert_eq!(run.code, 2, "{run:?}");
            assert!(run.stderr.contains("invalid outbox table name"), "{run:?}");
            let run = outbox_on(db.url(), &["replay", "--all", "e-1"]).await;
            assert_eq!(run.code, 2, "{run:?}");
            let run = outbox_on(db.url(), &["inbox", "replay", "e-1"]).await;
            assert_eq!(run.code, 2, "--consumer is required: {run:?}");
        }
    };
}

/// Runs `statements`, one at a time, outside prepared statements (MySQL
/// does not prepare `CREATE TRIGGER`).
async fn raw_exec<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, statements: &[&str])
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    for sql in statements {
        sqlx::raw_sql(sql).execute(pool).await.expect(sql);
    }
}

mod sqlite {
    cli_suite!(sqlx::Sqlite, crate::support::sqlite, false);

    /// Parks every replayed outbox and inbox row again at once, and logs
    /// each replay in `replay_log`.
    async fn re_park_on_replay(db: &outbox_test_harness::TestDb<Db>) {
        raw_exec(
            db.pool(),
            &[
                "CREATE TABLE replay_log (tbl TEXT NOT NULL, event_id TEXT NOT NULL)",
                "CREATE TRIGGER outbox_re_park AFTER UPDATE OF process ON outbox_event \
                 WHEN OLD.process = 'FAILED' AND NEW.process = 'NEW' BEGIN \
                 INSERT INTO replay_log (tbl, event_id) VALUES ('outbox_event', NEW.event_id); \
                 UPDATE outbox_event SET process = 'FAILED' WHERE id = NEW.id; END",
                "CREATE TRIGGER inbox_re_park AFTER UPDATE OF process ON inbox_event \
                 WHEN OLD.process = 'FAILED' AND NEW.process = 'RETRY' BEGIN \
                 INSERT INTO replay_log (tbl, event_id) VALUES ('inbox_event', NEW.event_id); \
                 UPDATE inbox_event SET process = 'FAILED' WHERE id = NEW.id; END",
            ],
        )
        .await;
    }
}

mod postgres {
    cli_suite!(sqlx::Postgres, crate::support::postgres, true);

    /// Parks every replayed outbox and inbox row again at once, and logs
    /// each replay in `replay_log`.
    async fn re_park_on_replay(db: &outbox_test_harness::TestDb<Db>) {
        raw_exec(
            db.pool(),
            &[
                "CREATE TABLE replay_log (tbl TEXT NOT NULL, event_id TEXT NOT NULL)",
                "CREATE FUNCTION re_park() RETURNS trigger AS $$ BEGIN \
                 INSERT INTO replay_log (tbl, event_id) VALUES (TG_TABLE_NAME, NEW.event_id); \
                 NEW.process := 'FAILED'; RETURN NEW; END $$ LANGUAGE plpgsql",
                "CREATE TRIGGER outbox_re_park BEFORE UPDATE ON outbox_event FOR EACH ROW \
                 WHEN (OLD.process = 'FAILED' AND NEW.process = 'NEW') EXECUTE FUNCTION re_park()",
                "CREATE TRIGGER inbox_re_park BEFORE UPDATE ON inbox_event FOR EACH ROW \
                 WHEN (OLD.process = 'FAILED' AND NEW.process = 'RETRY') EXECUTE FUNCTION re_park()",
            ],
        )
        .await;
    }
}

mod mysql {
    cli_suite!(sqlx::MySql, crate::support::mysql, false);

    /// Parks every replayed outbox and inbox row again at once, and logs
    /// each replay in `replay_log`.
    async fn re_park_on_replay(db: &outbox_test_harness::TestDb<Db>) {
        raw_exec(
            db.pool(),
            &[
                "CREATE TABLE replay_log (tbl VARCHAR(64) NOT NULL, event_id VARCHAR(64) NOT NULL)",
                "CREATE TRIGGER outbox_re_park BEFORE UPDATE ON outbox_event FOR EACH ROW \
                 IF OLD.process = 'FAILED' AND NEW.process = 'NEW' THEN \
                 INSERT INTO replay_log (tbl, event_id) VALUES ('outbox_event', NEW.event_id); \
                 SET NEW.process = 'FAILED'; END IF",
                "CREATE TRIGGER inbox_re_park BEFORE UPDATE ON inbox_event FOR EACH ROW \
                 IF OLD.process = 'FAILED' AND NEW.process = 'RETRY' THEN \
                 INSERT INTO replay_log (tbl, event_id) VALUES ('inbox_event', NEW.event_id); \
                 SET NEW.process = 'FAILED'; END IF",
            ],
        )
        .await;
    }
}
