//! The relay under broker faults, with a real ActiveMQ behind the harness's
//! fault proxy and a SQLite outbox: a broker frozen while megabytes are
//! queued, and an outage longer than three receipt timeouts while the relay
//! publishes at full rate. Each test counts every event at the broker, and the
//! outage test prints the process's memory through the outage and the
//! duplicates the broker received.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::core::consumer::{BoxFuture, HandlerError, decode_json};
use outbox::core::relay::{OutboxMessage, PublishError, Publisher, StompPublisher};
use outbox::core::{
    Backoff, Consumer, ConsumerConfig, Delivery, Event, Handler, Inbox, Outbox, RelayConfig,
};
use outbox::stomp::{Client, Config};
use outbox_test_harness::{Broker, BrokerConfig, Direction, FaultProxy};
use support::*;
use tokio::time::Instant;

const RECEIPT: Duration = Duration::from_millis(1500);
const HEART_BEAT: Duration = Duration::from_millis(300);
const DESTINATION: &str = "/queue/relay-faults";

fn relay_config(batch_size: u32) -> RelayConfig {
    RelayConfig::default()
        .with_batch_size(batch_size)
        // Longer than a publish can take, as the rule says.
        .with_lease(Duration::from_secs(20))
        .with_poll_interval(Duration::from_millis(50))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(100),
            Duration::from_millis(500),
        ))
}

fn client_config(uri: &str) -> Config {
    Config::parse(&format!(
        "failover:({uri})?initialReconnectDelay=50&maxReconnectDelay=500"
    ))
    .expect("URI parses")
    .with_heart_beat(HEART_BEAT, HEART_BEAT)
    .with_receipt_timeout(RECEIPT)
    .with_connect_timeout(Duration::from_secs(1))
}

/// The STOMP publisher, recording each failed publish: its size and whether
/// anything of it may have reached the broker.
#[derive(Clone)]
struct Recording {
    inner: StompPublisher,
    failed: Arc<Mutex<Vec<(usize, String)>>>,
}

impl Publisher for Recording {
    fn max_publish_time(&self) -> Option<Duration> {
        self.inner.max_publish_time()
    }

    async fn publish(&self, batch: &[OutboxMessage]) -> Result<(), PublishError> {
        let result = self.inner.publish(batch).await;
        if let Err(e) = &result {
            self.failed
                .lock()
                .unwrap()
                .push((batch.len(), e.message.clone()));
        }
        result
    }
}

impl Recording {
    /// Rows of failed publishes that may have been written to the broker:
    /// every failure except a request withdrawn before it was written.
    fn rows_possibly_sent(&self) -> usize {
        self.failed
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| !e.contains("the request was not sent"))
            .map(|(n, _)| n)
            .sum()
    }
}

/// Appends `count` events with `payload` bytes each, `per_tx` to a transaction.
async fn append(outbox: &Outbox<sqlx::Sqlite>, from: usize, count: usize, payload: usize) {
    let pad = "p".repeat(payload);
    let mut i = from;
    while i < from + count {
        let mut tx = outbox.pool().begin().await.unwrap();
        for _ in 0..50.min(from + count - i) {
            let event = Event::json(
                "fault.test",
                DESTINATION,
                &serde_json::json!({ "seq": i, "pad": pad }),
            )
            .unwrap()
            .with_key(format!("k{}", i % 20));
            outbox.append(&mut tx, event).await.unwrap();
            i += 1;
        }
        outbox.commit(tx).await.unwrap();
    }
}

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn setup() -> (
    outbox_test_harness::TestDb<sqlx::Sqlite>,
    Outbox<sqlx::Sqlite>,
) {
    let db = sqlite().await.expect("SQLite");
    let outbox = Outbox::new(db.pool().clone());
    outbox.migrate().await.unwrap();
    (db, outbox)
}

fn distinct(received: &[Received]) -> HashSet<String> {
    received.iter().map(|r| r.event_id.clone()).collect()
}

/// The outage test measures its own process's memory, so it runs alone in
/// a child process: under `cargo test` the other tests of this binary run
/// beside it, in the same process, and their memory would count as its own.
#[tokio::test]
async fn an_outage_of_three_receipt_timeouts_resends_only_what_was_in_flight_in_flat_memory() {
    let mut child = child_command("outage_in_a_process_of_its_own", &[]);
    child
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit());
    if let Ok(timeouts) = std::env::var("OUTBOX_TEST_OUTAGE_TIMEOUTS") {
        child.env("OUTBOX_TEST_OUTAGE_TIMEOUTS", timeouts);
    }
    let status = child
        .status()
        .await
        .expect("run the outage test in a process of its own");
    assert!(status.success(), "the outage test failed: {status}");
}

#[tokio::test]
#[ignore = "run by an_outage_of_three_receipt_timeouts_resends_only_what_was_in_flight_in_flat_memory in a process of its own"]
async fn outage_in_a_process_of_its_own() {
    const EVENTS: usize = 6000;
    const BATCH: u32 = 200;
    let broker = broker().await;
    let proxy = FaultProxy::start(broker.stomp_addr()).await.unwrap();
    let (_db, outbox) = setup().await;
    let client = Client::connect(client_config(&proxy.stomp_uri()))
        .await
        .unwrap();
    let publisher = Recording {
        inner: StompPublisher::new(client.clone()),
        failed: Arc::default(),
    };
    let relay = outbox
        .relay(publisher.clone(), relay_config(BATCH))
        .expect("valid settings")
        .spawn();

    // Events flow at full rate while the broker goes away.
    let producer = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            for round in 0..30 {
                append(&outbox, round * (EVENTS / 30), EVENTS / 30, 64).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib();
    proxy.refuse(true);
    proxy.cut();
    // OUTBOX_TEST_OUTAGE_TIMEOUTS sets a longer outage, to see memory stay flat.
    let timeouts: u32 = std::env::var("OUTBOX_TEST_OUTAGE_TIMEOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let outage = RECEIPT * timeouts;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut most_waiting = 0;
    while started.elapsed() < outage {
        tokio::time::sleep(Duration::from_millis(50)).await;
        most_waiting = most_waiting.max(client.waiting_requests());
        if samples.len() * 250 < started.elapsed().as_millis() as usize {
            samples.push(rss_kib());
        }
    }
    let waiting = outbox.backlog().await.unwrap().pending;
    proxy.pass();
    producer.await.unwrap();
    wait_published(&outbox, Duration::from_secs(60)).await;
    let got = drain(&broker, DESTINATION, Duration::from_secs(2)).await;
    let metrics = relay.metrics().snapshot();
    relay.shutdown().await.unwrap();

    let peak = samples.iter().copied().max().unwrap_or(before);
    let ids = distinct(&got);
    let duplicates = got.len() - ids.len();
    let in_flight = publisher.rows_possibly_sent();
    let failed = publisher.failed.lock().unwrap().len();
    println!(
        "outage {outage:?} ({} receipt timeouts), {waiting} events waiting at its end",
        outage.as_millis() / RECEIPT.as_millis()
    );
    println!(
        "RSS before {before} KiB, peak during the outage {peak} KiB (+{} KiB); samples {samples:?}",
        peak.saturating_sub(before)
    );
    println!(
        "received {} messages for {} events: {duplicates} duplicates; \
         {failed} failed publishes, {in_flight} rows of them possibly sent; relay {metrics:?}",
        got.len(),
        ids.len()
    );
    assert!(waiting > 0, "the outage held events back");
    assert_eq!(ids.len(), EVENTS, "every event arrives");
    assert!(
        duplicates <= in_flight,
        "duplicates ({duplicates}) beyond the rows in flight when attempts failed ({in_flight})"
    );
    assert!(
        in_flight <= 3 * BATCH as usize,
        "only the batches in flight at the cut were written: {in_flight}"
    );
    println!("requests waiting for a connection during the outage: at most {most_waiting}");
    // One relay is one caller: a request per attempt at most, never a pile.
    assert!(most_waiting <= 1, "requests piled up: {most_waiting}");
    assert!(
        peak.saturating_sub(before) < 16 * 1024,
        "memory grew during the outage: {before} -> {peak} KiB"
    );
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_broker_frozen_with_megabytes_queued_is_failed_over_and_every_event_arrives() {
    const EVENTS: usize = 3000;
    let first = broker().await;
    let second = broker().await;
    let proxy = FaultProxy::start(first.stomp_addr()).await.unwrap();
    let (_db, outbox) = setup().await;
    let uri = format!("{},{}", proxy.stomp_uri(), second.stomp_uri());
    let client = Client::connect(client_config(&uri)).await.unwrap();
    let relay = outbox
        .relay(StompPublisher::new(client.clone()), relay_config(100))
        .expect("valid settings")
        .spawn();
    // 8 KiB per event: a batch is most of a megabyte.
    let producer = {
        let outbox = outbox.clone();
        tokio::spawn(async move { append(&outbox, 0, EVENTS, 8 * 1024).await })
    };
    let until = Instant::now() + Duration::from_secs(30);
    while relay.metrics().snapshot().published < 500 {
        assert!(
            Instant::now() < until,
            "nothing published before the freeze"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("before the freeze: {:?}", relay.metrics().snapshot());
    let frozen = Instant::now();
    // The broker stops reading and writing, as in a long GC pause.
    proxy.freeze(Direction::ToServer);
    proxy.freeze(Direction::ToClient);
    let until = Instant::now() + Duration::from_secs(30);
    while client
        .server_info()
        .is_none_or(|i| i.addr != second.stomp_uri())
    {
        assert!(Instant::now() < until, "no failover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "failed over {:?} after the freeze (heart-beat read timeout {:?})",
        frozen.elapsed(),
        HEART_BEAT.mul_f64(2.5)
    );
    producer.await.unwrap();
    wait_published(&outbox, Duration::from_secs(60)).await;
    relay.shutdown().await.unwrap();
    drop(proxy);
    let mut got = drain(&first, DESTINATION, Duration::from_secs(2)).await;
    let on_first = got.len();
    got.extend(drain(&second, DESTINATION, Duration::from_secs(2)).await);
    let ids = distinct(&got);
    println!(
        "{on_first} messages on the first broker, {} on the second, {} distinct of {EVENTS}",
        got.len() - on_first,
        ids.len()
    );
    assert!(on_first > 0, "events flowed before the freeze");
    assert_eq!(ids.len(), EVENTS, "every event arrives");
    client.disconnect().await.unwrap();
}

/// Applies nothing; the login test only needs a running consumer.
struct Nothing;

impl Handler<sqlx::Sqlite> for Nothing {
    type Event = serde_json::Value;

    fn decode(&self, delivery: &Delivery) -> Result<serde_json::Value, String> {
        decode_json(delivery)
    }

    fn handle<'a>(
        &'a self,
        _tx: &'a mut sqlx::Transaction<'static, sqlx::Sqlite>,
        _event: serde_json::Value,
        _delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn a_login_refused_on_reconnect_stops_the_relay_and_the_consumer_with_the_reason() {
    // The client logs in to an open broker; after a cut, the proxy leads it to
    // a broker that refuses those credentials.
    let open = broker().await;
    let strict = Broker::start_with(BrokerConfig::default().with_credentials("alice", "s3cret"))
        .await
        .unwrap();
    let proxy = FaultProxy::start(open.stomp_addr()).await.unwrap();
    let (_db, outbox) = setup().await;
    let config = || client_config(&proxy.stomp_uri()).with_credentials("mallory", "guess");
    let relay_client = Client::connect(config()).await.unwrap();
    let consumer_client = Client::connect(config()).await.unwrap();
    let relay = outbox
        .relay(StompPublisher::new(relay_client.clone()), relay_config(50))
        .expect("valid settings")
        .spawn();
    let inbox = Inbox::new(outbox.pool().clone(), "login-test").unwrap();
    inbox.migrate().await.unwrap();
    let consumer = Consumer::new(inbox, Nothing, ConsumerConfig::new(DESTINATION))
        .expect("valid settings")
        .spawn(consumer_client.clone())
        .await
        .unwrap();
    append(&outbox, 0, 10, 8).await;
    wait_published(&outbox, Duration::from_secs(30)).await;

    proxy.set_upstream(strict.stomp_addr());
    proxy.cut();
    let until = Instant::now() + Duration::from_secs(30);
    while !(relay_client.is_closed() && consumer_client.is_closed()) {
        assert!(
            Instant::now() < until,
            "the clients should give up on a refused login"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("client stopped: {:?}", relay_client.close_reason());
    // The relay notices at its next publish.
    append(&outbox, 10, 5, 8).await;
    let until = Instant::now() + Duration::from_secs(30);
    while relay.metrics().snapshot().stopped == 0 || consumer.metrics().snapshot().stopped == 0 {
        assert!(
            Instant::now() < until,
            "relay and consumer should report the stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relay_result = relay.shutdown().await;
    let consumer_result = consumer.shutdown().await;
    println!("relay: {relay_result:?}\nconsumer: {consumer_result:?}");
    for result in [relay_result, consumer_result] {
        match result {
            Err(outbox::core::Error::BrokerGone(reason)) => {
                assert!(reason.contains("refused"), "{reason}")
            }
            other => panic!("expected BrokerGone, got {other:?}"),
        }
    }
    // The rows the relay could not publish wait for the next relay.
    assert_eq!(outbox.backlog().await.unwrap().pending, 5);
}

/// Rows of `payload` bytes, keyless (any relay may take any of them).
async fn append_keyless(outbox: &Outbox<sqlx::Sqlite>, count: usize, payload: usize) {
    let pad = "p".repeat(payload);
    let mut tx = outbox.pool().begin().await.unwrap();
    for i in 0..count {
        let event = Event::json(
            "slow.link",
            SLOW_DESTINATION,
            &serde_json::json!({ "seq": i, "pad": pad }),
        )
        .unwrap();
        outbox.append(&mut tx, event).await.unwrap();
    }
    outbox.commit(tx).await.unwrap();
}

const SLOW_DESTINATION: &str = "/queue/relay-faults-slow-link";

/// The slow client's receipt timeout: its publish bound (about 7.8 s) is
/// just inside the 8 s lease, and the SENDs of one batch reach the broker
/// only after that bound.
const SLOW_RECEIPT: Duration = Duration::from_millis(3500);

/// Waits until the proxy has forwarded no more than heart-beats towards the
/// broker for `quiet`: whatever the client wrote (a late COMMIT too) reached
/// the broker.
async fn until_link_quiet(proxy: &FaultProxy, quiet: Duration, limit: Duration) {
    let until = Instant::now() + limit;
    let mut last = proxy.forwarded(Direction::ToServer);
    let mut since = Instant::now();
    while since.elapsed() < quiet {
        assert!(
            Instant::now() < until,
            "the link to the broker never went quiet"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = proxy.forwarded(Direction::ToServer);
        if now > last + 1024 {
            last = now;
            since = Instant::now();
        }
    }
}

/// A batch that cannot reach the broker within `max_publish_time` over a
/// slow link is given up, and none of it is delivered: its COMMIT is never
/// written once its caller gave up, so the second relay, which publishes the
/// rows given back, is the only one whose copies arrive.
#[tokio::test]
async fn a_batch_given_up_on_a_slow_link_is_never_committed_behind_the_relay_s_back() {
    const ROWS: usize = 40;
    const PAYLOAD: usize = 100 * 1024;
    let broker = broker().await;
    let proxy = FaultProxy::start(broker.stomp_addr()).await.unwrap();
    let (_db, outbox) = setup().await;
    append_keyless(&outbox, ROWS, PAYLOAD).await;

    // Heart-beats of ten seconds (the default): the link is slow, not dead.
    let slow = Client::connect(
        client_config(&proxy.stomp_uri())
            .with_heart_beat(Duration::from_secs(10), Duration::from_secs(10))
            .with_receipt_timeout(SLOW_RECEIPT),
    )
    .await
    .unwrap();
    let publisher = Recording {
        inner: StompPublisher::new(slow.clone()),
        failed: Arc::default(),
    };
    let max_publish = publisher.max_publish_time().expect("a bound");
    // About 4 MB at 400 KB/s: ten seconds, far past the publish bound.
    proxy.set_bandwidth(Some(400_000));
    let config = RelayConfig::default()
        .with_batch_size(ROWS as u32)
        .with_lease(Duration::from_secs(8))
        .with_poll_interval(Duration::from_millis(50))
        // After its first failure the slow relay waits, so the rows it gives
        // back go to the second relay.
        .with_outage_backoff(Backoff::new(
            Duration::from_secs(60),
            Duration::from_secs(60),
        ))
        .with_key_partitions(false);
    let first = outbox
        .relay(publisher.clone(), config.clone())
        .expect("valid settings")
        .spawn();
    let until = Instant::now() + Duration::from_secs(30);
    while first.metrics().snapshot().unavailable == 0 {
        assert!(
            Instant::now() < until,
            "the batch on the slow link was never given up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gave_up = first.metrics().snapshot();
    let fast = Client::connect(client_config(&broker.stomp_uri()))
        .await
        .unwrap();
    // A relay of its own name: one of the first's name would wait for its lock.
    let second = outbox
        .relay(
            StompPublisher::new(fast.clone()),
            config.with_relay_id("second".to_owned()),
        )
        .expect("valid settings")
        .spawn();
    wait_published(&outbox, Duration::from_secs(60)).await;
    // Let everything the slow client wrote reach the broker before counting.
    until_link_quiet(&proxy, Duration::from_secs(3), Duration::from_secs(60)).await;
    let first_metrics = first.metrics().snapshot();
    let second_metrics = second.metrics().snapshot();
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    let got = drain(&broker, SLOW_DESTINATION, Duration::from_secs(2)).await;
    let counts = tally(&got);
    let twice = counts.values().filter(|&&n| n > 1).count();
    println!(
        "max publish time {max_publish:?}; slow relay at give-up {gave_up:?}, at the end \
         {first_metrics:?}; second relay {second_metrics:?}; failed publishes {:?}; \
         {} messages for {} events, {twice} delivered more than once; \
         {} bytes forwarded to the broker",
        publisher
            .failed
            .lock()
            .unwrap()
            .iter()
            .map(|(n, e)| format!("{n} rows: {e}"))
            .collect::<Vec<_>>(),
        got.len(),
        counts.len(),
        proxy.forwarded(Direction::ToServer),
    );
    assert_eq!(counts.len(), ROWS, "every event arrives");
    assert_eq!(
        twice, 0,
        "a batch given up past max_publish_time was committed at the broker all the same"
    );
    let _ = fast.disconnect().await;
    drop(proxy);
}

/// A batch of one row on a slow link, given up past `max_publish_time`, is
/// never delivered behind the relay's back. (It was once published as a bare
/// SEND with a receipt, which the broker delivered once written, whoever
/// still waited: the row was then published again.) A row that goes alone
/// is exactly the large one (over `max_batch_bytes`), or a lone hand-off.
/// Same setting as the 40-row test above, with one row of 4 MB.
#[tokio::test]
async fn a_single_row_given_up_on_a_slow_link_is_never_delivered_behind_the_relay_s_back() {
    const PAYLOAD: usize = 4 * 1024 * 1024;
    let broker = broker().await;
    let proxy = FaultProxy::start(broker.stomp_addr()).await.unwrap();
    let (_db, outbox) = setup().await;
    append_keyless(&outbox, 1, PAYLOAD).await;

    let slow = Client::connect(
        client_config(&proxy.stomp_uri())
            .with_heart_beat(Duration::from_secs(10), Duration::from_secs(10))
            .with_receipt_timeout(SLOW_RECEIPT),
    )
    .await
    .unwrap();
    let publisher = Recording {
        inner: StompPublisher::new(slow.clone()),
        failed: Arc::default(),
    };
    // About 4 MB at 400 KB/s: ten seconds, past the receipt timeout and
    // the publish bound.
    proxy.set_bandwidth(Some(400_000));
    let config = RelayConfig::default()
        .with_batch_size(10)
        .with_lease(Duration::from_secs(8))
        .with_poll_interval(Duration::from_millis(50))
        .with_outage_backoff(Backoff::new(
            Duration::from_secs(60),
            Duration::from_secs(60),
        ))
        .with_key_partitions(false);
    let first = outbox
        .relay(publisher.clone(), config.clone())
        .expect("valid settings")
        .spawn();
    let until = Instant::now() + Duration::from_secs(30);
    while first.metrics().snapshot().unavailable == 0 {
        assert!(
            Instant::now() < until,
            "the row on the slow link was never given up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gave_up = first.metrics().snapshot();
    let fast = Client::connect(client_config(&broker.stomp_uri()))
        .await
        .unwrap();
    // A relay of its own name: one of the first's name would wait for its lock.
    let second = outbox
        .relay(
            StompPublisher::new(fast.clone()),
            config.with_relay_id("second".to_owned()),
        )
        .expect("valid settings")
        .spawn();
    wait_published(&outbox, Duration::from_secs(60)).await;
    until_link_quiet(&proxy, Duration::from_secs(3), Duration::from_secs(60)).await;
    let first_metrics = first.metrics().snapshot();
    let second_metrics = second.metrics().snapshot();
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    let got = drain(&broker, SLOW_DESTINATION, Duration::from_secs(2)).await;
    let counts = tally(&got);
    println!(
        "slow relay at give-up {gave_up:?}, at the end {first_metrics:?}; second relay \
         {second_metrics:?}; failed publishes {:?}; {} messages for {} events; \
         {} bytes forwarded to the broker",
        publisher.failed.lock().unwrap().clone(),
        got.len(),
        counts.len(),
        proxy.forwarded(Direction::ToServer),
    );
    assert_eq!(counts.len(), 1, "the event arrives");
    assert_eq!(
        got.len(),
        1,
        "a single row the relay gave up on was delivered behind its back and published again"
    );
    let _ = fast.disconnect().await;
    drop(proxy);
}

/// The same with one relay alone and a short outage backoff: a single row
/// too large for the link within `max_publish_time` is given up at every
/// attempt and never delivered (once, as a bare SEND, a copy arrived at each
/// attempt while the row stayed waiting: copies without bound).
#[tokio::test]
async fn a_single_row_on_a_slow_link_is_not_delivered_again_and_again() {
    const PAYLOAD: usize = 4 * 1024 * 1024;
    let broker = broker().await;
    let proxy = FaultProxy::start(broker.stomp_addr()).await.unwrap();
    let (_db, outbox) = setup().await;
    append_keyless(&outbox, 1, PAYLOAD).await;
    let slow = Client::connect(
        client_config(&proxy.stomp_uri())
            .with_heart_beat(Duration::from_secs(10), Duration::from_secs(10))
            .with_receipt_timeout(SLOW_RECEIPT),
    )
    .await
    .unwrap();
    let publisher = Recording {
        inner: StompPublisher::new(slow.clone()),
        failed: Arc::default(),
    };
    proxy.set_bandwidth(Some(400_000));
    let config = RelayConfig::default()
        .with_batch_size(10)
        .with_lease(Duration::from_secs(8))
        .with_poll_interval(Duration::from_millis(50))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(500),
            Duration::from_millis(500),
        ))
        .with_key_partitions(false);
    let relay = outbox
        .relay(publisher.clone(), config)
        .expect("valid settings")
        .spawn();
    // Forty seconds of a slow link: room for four transfers of the row.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let metrics = relay.metrics().snapshot();
    relay.shutdown().await.unwrap();
    until_link_quiet(&proxy, Duration::from_secs(3), Duration::from_secs(60)).await;
    let pending = outbox.backlog().await.unwrap().pending;
    let got = drain(&broker, SLOW_DESTINATION, Duration::from_secs(2)).await;
    println!(
        "relay {metrics:?}; {} failed publishes; {} copies at the broker; {pending} rows \
         still waiting; {} bytes forwarded",
        publisher.failed.lock().unwrap().len(),
        got.len(),
        proxy.forwarded(Direction::ToServer),
    );
    assert!(
        got.len() <= 1,
        "{} copies of one event reached the broker while its row stayed waiting ({pending})",
        got.len()
    );
    drop(proxy);
}
