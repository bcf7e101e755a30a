//! What the consumer logs about failing handlers, read from the `tracing`
//! events themselves, against a real ActiveMQ on SQLite, PostgreSQL and
//! MySQL/MariaDB (modules `sqlite`, `postgres`, `mysql`): a line for every
//! failed attempt with its number, the event's id, type and key and the
//! error; an ERROR when the event is parked; a line when a retried or
//! replayed event is applied at last.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use outbox::core::consumer::{BoxFuture, HandlerError, decode_json};
use outbox::core::{Backoff, Consumer, ConsumerConfig, Delivery, Handler, Inbox};
use outbox::stomp::{Client, Outgoing};
use serde::{Deserialize, Serialize};
use support::*;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

/// One captured `tracing` event: its level, message and fields as text.
#[derive(Debug, Clone)]
struct Line {
    level: tracing::Level,
    message: String,
    fields: HashMap<String, String>,
}

impl Line {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// Keeps every event of the process; tests pick theirs by event id.
struct Capture(Arc<Mutex<Vec<Line>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let message = fields.0.remove("message").unwrap_or_default();
        self.0.lock().unwrap().push(Line {
            level: *event.metadata().level(),
            message,
            fields: fields.0,
        });
    }
}

/// The lines logged so far (one subscriber for the whole process, as the
/// consumer's tasks log from wherever they run).
fn captured() -> &'static Arc<Mutex<Vec<Line>>> {
    static LINES: OnceLock<Arc<Mutex<Vec<Line>>>> = OnceLock::new();
    LINES.get_or_init(|| {
        let lines = Arc::new(Mutex::new(Vec::new()));
        tracing_subscriber::registry()
            .with(Capture(lines.clone()))
            .init();
        lines
    })
}

/// The captured lines about `event_id`, in order.
fn lines_of(event_id: &str) -> Vec<Line> {
    captured()
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.field("event_id") == Some(event_id))
        .cloned()
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order: i64,
}

/// Failures left per order (`u32::MAX`: until changed).
#[derive(Clone, Default)]
struct Faults(Arc<Mutex<HashMap<i64, u32>>>);

impl Faults {
    fn set(&self, order: i64, n: u32) {
        self.0.lock().unwrap().insert(order, n);
    }
    fn should_fail(&self, order: i64) -> bool {
        let mut faults = self.0.lock().unwrap();
        match faults.get_mut(&order) {
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

async fn send(client: &Client, destination: &str, event_id: &str, order: i64, key: &str) {
    client
        .send(
            Outgoing::new(
                destination.to_owned(),
                serde_json::to_vec(&OrderPlaced { order }).unwrap(),
            )
            .persistent(true)
            .header("event-id", event_id.to_owned())
            .header("event-type", "order.placed")
            .header("event-key", key.to_owned()),
        )
        .await
        .expect("send");
}

async fn eventually<F: FnMut() -> bool>(what: &str, limit: Duration, mut check: F) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The attempts of the WARN lines "handler failed; retry scheduled".
fn warned_attempts(lines: &[Line]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.level == tracing::Level::WARN && l.message.contains("handler failed"))
        .map(|l| l.field("attempt").unwrap_or("-").to_owned())
        .collect()
}

macro_rules! log_suite {
    ($db:ty, $open:path, $name:literal) => {
        use super::*;

        type Db = $db;

        struct Shipping {
            faults: Faults,
        }

        impl Handler<Db> for Shipping {
            type Event = OrderPlaced;

            fn decode(&self, delivery: &Delivery) -> Result<OrderPlaced, String> {
                decode_json(delivery)
            }

            fn handle<'a>(
                &'a self,
                _tx: &'a mut sqlx::Transaction<'static, Db>,
                event: OrderPlaced,
                _delivery: &'a Delivery,
            ) -> BoxFuture<'a, Result<(), HandlerError>> {
                Box::pin(async move {
                    if self.faults.should_fail(event.order) {
                        return Err(format!("carrier refused order {}", event.order).into());
                    }
                    Ok(())
                })
            }
        }

        #[tokio::test]
        async fn every_failed_attempt_is_logged_with_type_and_key_and_so_are_park_and_late_success()
        {
            captured();
            let Some(db) = $open().await else { return };
            let inbox = Inbox::new(db.pool().clone(), "shipping").unwrap();
            inbox.migrate().await.unwrap();
            let broker = broker().await;
            let faults = Faults::default();
            // Order 1 fails twice, then is applied on its third attempt;
            // order 2 fails all of its three attempts and is parked.
            faults.set(1, 2);
            faults.set(2, u32::MAX);
            let destination = "/queue/test.consumer.logs";
            let config = ConsumerConfig::new(destination)
                .with_retry_backoff(Backoff::new(
                    Duration::from_millis(20),
                    Duration::from_millis(50),
                ))
                .with_retry_poll(Duration::from_millis(20))
                .with_max_attempts(3)
                // One event per transaction: a failure inside a batch runs
                // the handler once more on its own, which would spend a
                // scripted fault without being an attempt.
                .with_batch_size(1);
            let handle = Consumer::new(
                inbox.clone(),
                Shipping {
                    faults: faults.clone(),
                },
                config,
            )
            .expect("valid settings")
            .spawn(client(&broker).await)
            .await
            .unwrap();
            let producer = client(&broker).await;
            let (late, parked) = (
                concat!("logs-", $name, "-late"),
                concat!("logs-", $name, "-parked"),
            );
            send(&producer, destination, late, 1, "customer-7").await;
            send(&producer, destination, parked, 2, "customer-8").await;
            let metrics = handle.metrics().clone();
            eventually(
                "one applied and one parked",
                Duration::from_secs(30),
                || {
                    let m = metrics.snapshot();
                    m.processed == 1 && m.failed == 1
                },
            )
            .await;

            let lines = lines_of(late);
            assert_eq!(
                warned_attempts(&lines),
                ["1", "2"],
                "a WARN per failed attempt: {lines:#?}"
            );
            for warn in lines.iter().filter(|l| l.level == tracing::Level::WARN) {
                assert_eq!(warn.field("event_type"), Some("order.placed"), "{warn:?}");
                assert_eq!(warn.field("key"), Some("customer-7"), "{warn:?}");
                assert_eq!(warn.field("max_attempts"), Some("3"), "{warn:?}");
                assert_eq!(
                    warn.field("error"),
                    Some("carrier refused order 1"),
                    "{warn:?}"
                );
            }
            let applied: Vec<&Line> = lines
                .iter()
                .filter(|l| l.level == tracing::Level::INFO)
                .collect();
            assert_eq!(
                applied.len(),
                1,
                "one line when it is applied at last: {lines:#?}"
            );
            assert_eq!(applied[0].field("attempt"), Some("3"), "{applied:?}");
            assert_eq!(applied[0].field("key"), Some("customer-7"), "{applied:?}");

            let lines = lines_of(parked);
            assert_eq!(warned_attempts(&lines), ["1", "2"], "{lines:#?}");
            let errors: Vec<&Line> = lines
                .iter()
                .filter(|l| l.level == tracing::Level::ERROR)
                .collect();
            assert_eq!(errors.len(), 1, "one ERROR when parked: {lines:#?}");
            assert!(errors[0].message.contains("parked"), "{errors:?}");
            assert_eq!(errors[0].field("attempt"), Some("3"), "{errors:?}");
            assert_eq!(
                errors[0].field("event_type"),
                Some("order.placed"),
                "{errors:?}"
            );
            assert_eq!(errors[0].field("key"), Some("customer-8"), "{errors:?}");
            assert_eq!(
                errors[0].field("error"),
                Some("carrier refused order 2"),
                "{errors:?}"
            );

            // The carrier is fixed and the event replayed: applied, and said so.
            faults.set(2, 0);
            assert!(inbox.replay(parked).await.unwrap());
            eventually(
                "the replayed event applied",
                Duration::from_secs(30),
                || metrics.snapshot().processed == 2,
            )
            .await;
            let lines = lines_of(parked);
            let applied: Vec<&Line> = lines
                .iter()
                .filter(|l| l.level == tracing::Level::INFO)
                .collect();
            assert_eq!(
                applied.len(),
                1,
                "one line when the replay is applied: {lines:#?}"
            );
            assert_eq!(
                applied[0].field("attempt"),
                Some("1"),
                "a replay starts the count again: {applied:?}"
            );
            assert_eq!(
                applied[0].field("event_type"),
                Some("order.placed"),
                "{applied:?}"
            );
            handle.shutdown().await.unwrap();
        }
    };
}

mod sqlite {
    log_suite!(sqlx::Sqlite, crate::support::sqlite, "sqlite");
}

mod postgres {
    log_suite!(sqlx::Postgres, crate::support::postgres, "postgres");
}

mod mysql {
    log_suite!(sqlx::MySql, crate::support::mysql, "mysql");
}
