//! The consumer's batch, rollback and one-by-one paths with a scripted
//! subscriber on a real SQLite file (no broker).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sqlx::Sqlite;
use tokio::sync::mpsc;

use sqlx::Transaction;

use super::*;
use crate::backoff::Backoff;
use crate::names::now_ms;
use crate::store::InboxState;

/// Event ids acknowledged, in order.
type Acks = Arc<Mutex<Vec<String>>>;

struct Script {
    rx: mpsc::UnboundedReceiver<Scripted>,
}

struct Scripted {
    headers: Vec<(String, String)>,
    body: Bytes,
    acks: Acks,
    /// The connection it came on and its epoch there; `None`: one that
    /// never ends.
    link: Option<(Arc<Link>, u64)>,
    /// Its ACKs fail while its connection lives.
    acks_fail: bool,
}

/// A scripted connection: its epoch moves on when the consumer ends it.
#[derive(Default)]
struct Link {
    epoch: std::sync::atomic::AtomicU64,
    ended: Mutex<Vec<String>>,
}

struct Up;

impl LinkStatus for Up {
    fn is_connected(&self) -> bool {
        true
    }
    fn end_reason(&self) -> String {
        "the script ended".to_owned()
    }
}

impl Subscriber for Script {
    type Message = Scripted;
    async fn next_message(&mut self) -> Option<Scripted> {
        self.rx.recv().await
    }
    fn try_next_message(&mut self) -> Option<Scripted> {
        self.rx.try_recv().ok()
    }
    fn status(&self) -> Arc<dyn LinkStatus> {
        Arc::new(Up)
    }
    async fn close(self) {}
}

impl Incoming for Scripted {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn headers(&self) -> Vec<(String, String)> {
        self.headers.clone()
    }
    fn message_id(&self) -> Option<&str> {
        None
    }
    fn body(&self) -> Bytes {
        self.body.clone()
    }
    async fn ack(&self) -> Result<(), String> {
        if self.acks_fail && self.on_live_connection() {
            return Err("the write stalled".to_owned());
        }
        let id = self.header("event-id").unwrap_or_default().to_owned();
        self.acks.lock().unwrap().push(id);
        Ok(())
    }

    fn on_live_connection(&self) -> bool {
        self.link
            .as_ref()
            .is_none_or(|(link, epoch)| link.epoch.load(Ordering::SeqCst) == *epoch)
    }

    fn end_connection(&self, reason: &str) {
        if let Some((link, epoch)) = &self.link
            && link
                .epoch
                .compare_exchange(*epoch, epoch + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            link.ended.lock().unwrap().push(reason.to_owned());
        }
    }
}

/// Writes a row per user; refuses user 13 (a handler error) every time.
struct Ledger;

impl Handler<Sqlite> for Ledger {
    type Event = i64;

    fn decode(&self, delivery: &Delivery) -> Result<i64, String> {
        std::str::from_utf8(&delivery.body)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "not a user id".to_owned())
    }

    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, Sqlite>,
        user: i64,
        _delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO ledger (user_id) VALUES (?)")
                .bind(user)
                .execute(&mut **tx)
                .await?;
            if user == 13 {
                return Err("user 13 is refused".into());
            }
            Ok(())
        })
    }
}

struct Fixture {
    inbox: Inbox<Sqlite>,
    path: std::path::PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn fixture() -> Fixture {
    let path = std::env::temp_dir().join(format!("outbox-scripted-{}.db", uuid::Uuid::now_v7()));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE ledger (user_id BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let inbox = Inbox::new(pool, "ledger").unwrap();
    inbox.migrate().await.unwrap();
    Fixture { inbox, path }
}

/// Feeds `users` (event ids `e-{user}`) before the consumer starts, so
/// they arrive as one batch, and waits until every one is acked.
async fn consume(inbox: &Inbox<Sqlite>, users: &[i64]) -> (ConsumerCounts, Vec<String>) {
    let users: Vec<(i64, Option<&str>)> = users.iter().map(|u| (*u, None)).collect();
    consume_keyed(inbox, &users, false).await
}

/// [`consume`] with an `event-key` per user, and `per_key_order` as given.
async fn consume_keyed(
    inbox: &Inbox<Sqlite>,
    users: &[(i64, Option<&str>)],
    per_key_order: bool,
) -> (ConsumerCounts, Vec<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let acks = Acks::default();
    for (user, key) in users {
        let mut headers = vec![("event-id".into(), format!("e-{user}"))];
        if let Some(key) = key {
            headers.push(("event-key".into(), (*key).to_owned()));
        }
        tx.send(Scripted {
            headers,
            body: Bytes::from(user.to_string()),
            acks: acks.clone(),
            link: None,
            acks_fail: false,
        })
        .unwrap();
    }
    let config = ConsumerConfig {
        concurrency: 1,
        batch_size: 16,
        per_key_order,
        retry_poll: Duration::from_secs(3600),
        ..ConsumerConfig::new("/queue/scripted")
    };
    let consumer = Consumer::new(inbox.clone(), Ledger, config).unwrap();
    let handle = consumer.spawn_on(Script { rx });
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while acks.lock().unwrap().len() < users.len() {
        assert!(
            tokio::time::Instant::now() < until,
            "not every delivery was acked"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let counts = handle.metrics().snapshot();
    handle.shutdown().await.unwrap();
    let acked = acks.lock().unwrap().clone();
    (counts, acked)
}

async fn ledger(inbox: &Inbox<Sqlite>) -> Vec<i64> {
    sqlx::query_scalar("SELECT user_id FROM ledger ORDER BY user_id")
        .fetch_all(inbox.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_clean_batch_is_applied_and_acked_in_order() {
    let f = fixture().await;
    let (counts, acked) = consume(&f.inbox, &[1, 2, 3, 4]).await;
    assert_eq!(
        (counts.processed, counts.duplicates, counts.retried),
        (4, 0, 0)
    );
    assert_eq!(acked, ["e-1", "e-2", "e-3", "e-4"]);
    assert_eq!(ledger(&f.inbox).await, [1, 2, 3, 4]);
}

#[tokio::test]
async fn a_duplicate_rolls_the_batch_back_and_the_rest_is_applied_one_by_one() {
    let f = fixture().await;
    consume(&f.inbox, &[2]).await;
    let (counts, acked) = consume(&f.inbox, &[1, 2, 3]).await;
    assert_eq!((counts.processed, counts.duplicates), (2, 1), "{counts:?}");
    assert_eq!(acked.len(), 3, "the duplicate is acked too");
    assert_eq!(ledger(&f.inbox).await, [1, 2, 3], "user 2 once");
}

#[tokio::test]
async fn a_failing_handler_undoes_only_its_own_work() {
    let f = fixture().await;
    let (counts, acked) = consume(&f.inbox, &[12, 13, 14]).await;
    assert_eq!((counts.processed, counts.retried), (2, 1), "{counts:?}");
    assert_eq!(acked.len(), 3);
    assert_eq!(
        ledger(&f.inbox).await,
        [12, 14],
        "user 13's row rolled back"
    );
    let inbox = f.inbox.counts().await.unwrap();
    assert_eq!((inbox.processed, inbox.retry), (2, 1));
}

#[tokio::test]
async fn with_per_key_order_a_batch_holds_back_only_the_key_with_an_earlier_event_waiting() {
    let f = fixture().await;
    // User 13's handler fails: its key `a` now has an event waiting for a retry.
    consume_keyed(&f.inbox, &[(13, Some("a"))], true).await;
    let batch = [(1, Some("b")), (2, Some("a")), (3, None), (4, Some("c"))];
    let (counts, acked) = consume_keyed(&f.inbox, &batch, true).await;
    assert_eq!(acked.len(), 4);
    assert_eq!(counts.processed, 3, "{counts:?}");
    assert_eq!(ledger(&f.inbox).await, [1, 3, 4], "user 2 waits behind 13");
    let inbox = f.inbox.counts().await.unwrap();
    assert_eq!((inbox.processed, inbox.retry), (3, 2));
}

#[tokio::test]
async fn pending_keys_are_found_beyond_the_first_query() {
    let f = fixture().await;
    consume_keyed(&f.inbox, &[(13, Some("a"))], true).await;
    let mut keys: Vec<String> = (0..450).map(|k| format!("k-{k}")).collect();
    let store = &f.inbox.store;
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert!(!store.keys_pending(&refs).await.unwrap());
    assert!(!store.keys_pending(&[]).await.unwrap());
    keys.push("a".into());
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert!(
        store.keys_pending(&refs).await.unwrap(),
        "`a` is in the third query"
    );
    assert!(store.keys_pending(&["a"]).await.unwrap());
}

/// Waits until `done` holds, failing the test after 30 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// User `user`'s event (`e-{user}`) on epoch `epoch` of `link`.
fn on_link(user: i64, link: &Arc<Link>, epoch: u64, acks: &Acks, acks_fail: bool) -> Scripted {
    Scripted {
        headers: vec![("event-id".into(), format!("e-{user}"))],
        body: Bytes::from(user.to_string()),
        acks: acks.clone(),
        link: Some((link.clone(), epoch)),
        acks_fail,
    }
}

fn one_at_a_time() -> ConsumerConfig {
    ConsumerConfig {
        concurrency: 1,
        batch_size: 1,
        max_attempts: 2,
        retry_backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(5)),
        retry_poll: Duration::from_secs(3600),
        ..ConsumerConfig::new("/queue/scripted")
    }
}

/// A message with neither `event-id` nor `message-id` (a custom
/// subscriber's; ActiveMQ always sends one) cannot be told from its
/// redelivery: delivered twice, it is parked twice with the reason and
/// acknowledged, and never applied.
#[tokio::test]
async fn a_message_without_any_id_is_parked_and_acked_and_never_applied() {
    let f = fixture().await;
    let (tx, rx) = mpsc::unbounded_channel();
    let acks = Acks::default();
    let consumer = Consumer::new(f.inbox.clone(), Ledger, one_at_a_time()).unwrap();
    let handle = consumer.spawn_on(Script { rx });
    for delivery in 1..=2 {
        tx.send(Scripted {
            headers: vec![("event-type".into(), "user.created".into())],
            body: Bytes::from("7"),
            acks: acks.clone(),
            link: None,
            acks_fail: false,
        })
        .unwrap();
        eventually("the delivery acked", || {
            acks.lock().unwrap().len() == delivery
        })
        .await;
    }
    let counts = handle.metrics().snapshot();
    handle.shutdown().await.unwrap();
    assert_eq!(ledger(&f.inbox).await, Vec::<i64>::new(), "never applied");
    assert_eq!((counts.processed, counts.failed), (0, 2), "{counts:?}");
    let parked = f.inbox.parked(10).await.unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    for p in &parked {
        assert_eq!(p.content, b"7");
        assert!(
            p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("cannot be deduplicated")),
            "{p:?}"
        );
    }
}

/// A retry pass over many large due rows holds at most
/// `RETRY_PASS_BYTES` of payloads and headers, plus one row.
#[tokio::test]
async fn a_retry_pass_holds_at_most_its_byte_budget_plus_one_row() {
    const BUDGET: usize = crate::store::inbox::RETRY_PASS_BYTES as usize;
    let f = fixture().await;
    let store = &f.inbox.store;
    let row_bytes = 256 * 1024;
    let mut conn = store.acquire().await.unwrap();
    for n in 0..100 {
        let delivery = Delivery {
            event_id: format!("e-{n}"),
            event_type: None,
            key: None,
            headers: vec![("event-id".into(), format!("e-{n}"))],
            body: Bytes::from(vec![b'x'; row_bytes]),
            attempt: 0,
        };
        store
            .record(
                &mut conn,
                &delivery,
                InboxState::Retry,
                1,
                Some("failed"),
                Some(0),
                0,
            )
            .await
            .unwrap();
    }
    drop(conn);
    let mut seen = 0;
    let mut passes = 0;
    loop {
        let due = store.due(now_ms(), 100, false).await.unwrap();
        if due.rows.is_empty() {
            break;
        }
        passes += 1;
        let held: usize = due
            .rows
            .iter()
            .map(|r| r.delivery.body.len() + r.delivery.headers_json().len())
            .sum();
        let largest = due
            .rows
            .iter()
            .map(|r| r.delivery.body.len() + r.delivery.headers_json().len())
            .max()
            .unwrap_or(0);
        assert!(
            held <= BUDGET + largest,
            "a pass held {held} bytes in {} rows",
            due.rows.len()
        );
        seen += due.rows.len();
        // Settle them, as the retry pass does.
        for row in &due.rows {
            let mut tx = store.pool().begin().await.unwrap();
            assert!(store.take_retry(&mut tx, row.id, now_ms()).await.unwrap());
            tx.commit().await.unwrap();
        }
    }
    assert_eq!(seen, 100, "every due row read once");
    assert!(passes > 1, "{passes} passes");
}

#[tokio::test]
async fn an_ack_that_keeps_failing_ends_its_connection_and_the_redelivery_is_acked_as_a_duplicate()
{
    let f = fixture().await;
    let (tx, rx) = mpsc::unbounded_channel();
    let (acks, link) = (Acks::default(), Arc::new(Link::default()));
    tx.send(on_link(1, &link, 0, &acks, true)).unwrap();
    let consumer = Consumer::new(f.inbox.clone(), Ledger, one_at_a_time()).unwrap();
    let handle = consumer.spawn_on(Script { rx });
    eventually("the connection ended", || {
        !link.ended.lock().unwrap().is_empty()
    })
    .await;
    let reason = link.ended.lock().unwrap()[0].clone();
    assert!(
        reason.contains("e-1") && reason.contains("the write stalled"),
        "{reason}"
    );
    assert!(!handle.metrics().health().is_ready(), "health says so");
    // The broker delivers it again on the next connection.
    tx.send(on_link(1, &link, 1, &acks, false)).unwrap();
    eventually("the redelivery acked", || acks.lock().unwrap().len() == 1).await;
    let counts = handle.metrics().snapshot();
    assert_eq!(
        (
            counts.processed,
            counts.duplicates,
            counts.ack_failures,
            counts.connections_ended
        ),
        (1, 1, 1, 1),
        "{counts:?}"
    );
    assert!(handle.metrics().health().is_ready());
    handle.shutdown().await.unwrap();
    assert_eq!(ledger(&f.inbox).await, [1], "applied once");
    assert_eq!(link.ended.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_delivery_neither_recorded_nor_parked_ends_its_connection_and_the_rest_flow() {
    let f = fixture().await;
    // Every inbox row of event e-66 is refused, parked or not.
    sqlx::query(
        "CREATE TRIGGER refuse_66 BEFORE INSERT ON inbox_event WHEN NEW.event_id = 'e-66' \
         BEGIN SELECT RAISE(ABORT, 'e-66 is refused'); END",
    )
    .execute(f.inbox.pool())
    .await
    .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (acks, link) = (Acks::default(), Arc::new(Link::default()));
    tx.send(on_link(66, &link, 0, &acks, false)).unwrap();
    let consumer = Consumer::new(f.inbox.clone(), Ledger, one_at_a_time()).unwrap();
    let handle = consumer.spawn_on(Script { rx });
    eventually("the connection ended", || {
        !link.ended.lock().unwrap().is_empty()
    })
    .await;
    let reason = link.ended.lock().unwrap()[0].clone();
    assert!(
        reason.contains("e-66") && reason.contains("neither recorded nor parked"),
        "{reason}"
    );
    tx.send(on_link(2, &link, 1, &acks, false)).unwrap();
    eventually("the next delivery acked", || {
        acks.lock().unwrap().len() == 1
    })
    .await;
    let counts = handle.metrics().snapshot();
    assert_eq!(
        (counts.processed, counts.connections_ended),
        (1, 1),
        "{counts:?}"
    );
    handle.shutdown().await.unwrap();
    assert_eq!(acks.lock().unwrap().as_slice(), ["e-2"], "e-66 never acked");
    assert_eq!(ledger(&f.inbox).await, [2]);
}
