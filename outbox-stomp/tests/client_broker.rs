//! The client against real ActiveMQ brokers started by the test harness.

use std::time::Duration;

use bytes::Bytes;
use outbox_stomp::{
    AckMode, Client, Config, Error, Message, Outgoing, Subscribe, Subscription, Version,
};
use outbox_test_harness::{Broker, BrokerConfig};

const WAIT: Duration = Duration::from_secs(20);

async fn recv(sub: &mut Subscription, within: Duration) -> Option<Message> {
    tokio::time::timeout(within, sub.next_message())
        .await
        .ok()
        .flatten()
}

fn config(broker: &Broker) -> Config {
    Config::parse(&format!(
        "failover:({})?initialReconnectDelay=100&maxReconnectDelay=1000",
        broker.stomp_uri()
    ))
    .expect("harness URI parses")
    .with_receipt_timeout(Duration::from_secs(15))
}

/// Polls `check` until it holds or `WAIT` runs out; never asserts on time itself.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < until {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

#[tokio::test]
async fn binary_bodies_and_escaped_headers_round_trip_on_every_version() {
    let broker = Broker::start().await.unwrap();
    for version in Version::ALL {
        let client = Client::connect(config(&broker).with_versions(&[version]))
            .await
            .unwrap();
        assert_eq!(client.version(), version);
        let queue = format!("/queue/round-trip-{version}");
        let mut sub = client
            .subscribe(Subscribe::new(queue.clone()))
            .await
            .unwrap();
        let body = Bytes::from_static(b"\0binary\0\xff\xfe\x00end");
        // 1.0 has no escaping: a colon passes, a newline cannot be written at all.
        let tricky = match version {
            Version::V1_0 => "a:b:c",
            Version::V1_1 => "back\\slash new\nline co:lon",
            Version::V1_2 => "back\\slash new\nline co:lon car\rriage",
        };
        client
            .send(
                Outgoing::new(queue.clone(), body.clone())
                    .header("x-tricky", tricky)
                    .header("x-plain", "é€"),
            )
            .await
            .unwrap();
        let msg = recv(&mut sub, WAIT).await.expect("message arrives");
        assert_eq!(msg.body(), &body, "version {version}");
        assert_eq!(msg.header("x-tricky"), Some(tricky), "version {version}");
        assert_eq!(msg.header("x-plain"), Some("é€"));
        msg.ack().await.unwrap();
        client.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn receipts_confirm_sends_and_a_rejected_send_gets_its_own_error() {
    let broker = Broker::start().await.unwrap();
    let client = Client::connect(config(&broker)).await.unwrap();
    client
        .send(Outgoing::new("/queue/ok", "fine").persistent(true))
        .await
        .unwrap();
    // A remote temporary queue that does not exist: ActiveMQ refuses the SEND.
    let err = client
        .send(Outgoing::new("/remote-temp-queue/does-not-exist", "bad"))
        .await
        .unwrap_err();
    match err {
        Error::Rejected(e) => {
            assert!(e.receipt_id.is_some(), "{e:?}");
            assert!(e.details.contains("DestinationDoesNotExist"), "{e:?}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // A SEND naming an unknown transaction is refused with its own receipt id too.
    let err = client
        .send(Outgoing::new("/queue/ok", "bad").header("transaction", "no-such-tx"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Rejected(ref e) if e.message.contains("no-such-tx")),
        "{err:?}"
    );
    // The same client keeps working (reconnecting if the broker closed the socket).
    client
        .send(Outgoing::new("/queue/ok", "still fine"))
        .await
        .unwrap();
    let mut sub = client.subscribe(Subscribe::new("/queue/ok")).await.unwrap();
    let mut bodies = Vec::new();
    while let Some(m) = recv(&mut sub, Duration::from_secs(3)).await {
        bodies.push(String::from_utf8_lossy(m.body()).into_owned());
        m.ack().await.unwrap();
    }
    assert_eq!(bodies, ["fine", "still fine"]);
}

#[tokio::test]
async fn committed_transaction_delivers_and_aborted_one_delivers_nothing() {
    let broker = Broker::start().await.unwrap();
    let client = Client::connect(config(&broker)).await.unwrap();
    let mut sub = client.subscribe(Subscribe::new("/queue/tx")).await.unwrap();

    let aborted = client.begin().await.unwrap();
    for i in 0..5 {
        aborted
            .send(Outgoing::new("/queue/tx", format!("aborted-{i}")))
            .await
            .unwrap();
    }
    aborted.abort().await.unwrap();

    let committed = client.begin().await.unwrap();
    for i in 0..5 {
        committed
            .send(Outgoing::new("/queue/tx", format!("committed-{i}")).persistent(true))
            .await
            .unwrap();
    }
    committed.commit().await.unwrap();

    let mut got = Vec::new();
    while let Some(m) = recv(&mut sub, Duration::from_secs(3)).await {
        got.push(String::from_utf8_lossy(m.body()).into_owned());
        m.ack().await.unwrap();
    }
    let expected: Vec<String> = (0..5).map(|i| format!("committed-{i}")).collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn unacked_message_is_redelivered_and_acked_one_is_not() {
    let broker = Broker::start().await.unwrap();
    let producer = Client::connect(config(&broker)).await.unwrap();
    producer
        .send(Outgoing::new("/queue/ack", "acked").persistent(true))
        .await
        .unwrap();
    producer
        .send(Outgoing::new("/queue/ack", "unacked").persistent(true))
        .await
        .unwrap();

    let first = Client::connect(config(&broker)).await.unwrap();
    let mut sub = first
        .subscribe(Subscribe::new("/queue/ack").ack(AckMode::ClientIndividual))
        .await
        .unwrap();
    let a = recv(&mut sub, WAIT).await.unwrap();
    let b = recv(&mut sub, WAIT).await.unwrap();
    assert_eq!(a.body().as_ref(), b"acked");
    assert_eq!(b.body().as_ref(), b"unacked");
    a.ack_confirmed().await.unwrap();
    drop(b);
    drop(sub);
    first.disconnect().await.unwrap();

    let second = Client::connect(config(&broker)).await.unwrap();
    let mut sub = second
        .subscribe(Subscribe::new("/queue/ack"))
        .await
        .unwrap();
    let again = recv(&mut sub, WAIT).await.expect("redelivery");
    assert_eq!(again.body().as_ref(), b"unacked");
    again.ack_confirmed().await.unwrap();
    assert!(
        recv(&mut sub, Duration::from_secs(2)).await.is_none(),
        "the acked message came back"
    );
}

#[tokio::test]
async fn ending_a_connection_brings_its_unacked_deliveries_back_on_the_next_one() {
    let broker = Broker::start().await.unwrap();
    let producer = Client::connect(config(&broker)).await.unwrap();
    for body in ["held", "next"] {
        producer
            .send(Outgoing::new("/queue/end", body).persistent(true))
            .await
            .unwrap();
    }
    let client = Client::connect(config(&broker)).await.unwrap();
    let mut sub = client
        .subscribe(
            Subscribe::new("/queue/end")
                .ack(AckMode::ClientIndividual)
                .prefetch(1),
        )
        .await
        .unwrap();
    let held = recv(&mut sub, WAIT).await.unwrap();
    assert_eq!(held.body().as_ref(), b"held");
    assert!(held.on_live_connection());
    // Unacknowledged, it takes the only prefetch slot: nothing else comes.
    assert!(recv(&mut sub, Duration::from_secs(1)).await.is_none());
    // A stale epoch ends nothing.
    client.end_connection(client.epoch() + 1, "not this one");
    held.end_connection("its ACK cannot be sent");
    assert!(eventually(|| client.epoch() >= 1 && client.is_connected()).await);
    assert!(!held.on_live_connection());
    assert!(matches!(held.ack().await, Err(Error::Stale(_))));
    // The broker may hand out "next" before it has put "held" back.
    let mut bodies = Vec::new();
    let mut last = None;
    for _ in 0..2 {
        let m = recv(&mut sub, WAIT)
            .await
            .expect("both on the next connection");
        assert_eq!(m.epoch(), 1);
        if m.body().as_ref() == b"held" {
            assert!(m.redelivered());
        }
        bodies.push(m.body().clone());
        m.ack_confirmed().await.unwrap();
        last = Some(m);
    }
    bodies.sort();
    assert_eq!(bodies, [&b"held"[..], &b"next"[..]]);
    let next = last.expect("two messages");
    // An ACK for a delivery the broker no longer holds is refused, not fatal.
    assert!(matches!(
        next.ack_confirmed().await,
        Err(Error::Rejected(_))
    ));
    assert_eq!(client.epoch(), 1, "one connection ended");
}

#[tokio::test]
async fn wrong_credentials_are_a_typed_error() {
    let broker =
        Broker::start_with(BrokerConfig::default().with_credentials("app", "right-secret"))
            .await
            .unwrap();
    let err = Client::connect(config(&broker).with_credentials("app", "wrong-secret"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ConnectRejected(_)), "{err:?}");
    let client = Client::connect(config(&broker).with_credentials("app", "right-secret"))
        .await
        .unwrap();
    client
        .send(Outgoing::new("/queue/auth", "in"))
        .await
        .unwrap();
    let shown = format!(
        "{:?}",
        config(&broker).with_credentials("app", "right-secret")
    );
    assert!(!shown.contains("right-secret"), "{shown}");
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn tls_connection_to_a_stomp_ssl_connector() {
    let broker = Broker::start_with(BrokerConfig::default().with_ssl())
        .await
        .unwrap();
    let uri = broker.ssl_uri().unwrap().replace("127.0.0.1", "localhost");
    let config = Config::parse(&uri)
        .unwrap()
        .with_tls_ca_file(broker.ca_cert_pem().unwrap());
    let client = Client::connect(config).await.unwrap();
    let mut sub = client
        .subscribe(Subscribe::new("/queue/tls"))
        .await
        .unwrap();
    client
        .send(Outgoing::new("/queue/tls", "secret"))
        .await
        .unwrap();
    let m = recv(&mut sub, WAIT).await.unwrap();
    assert_eq!(m.body().as_ref(), b"secret");
}

#[tokio::test]
async fn broker_kill_during_publishing_loses_no_confirmed_message_and_subscription_resumes() {
    let mut broker = Broker::start().await.unwrap();
    let client = Client::connect(config(&broker)).await.unwrap();
    let mut events = client
        .subscribe(Subscribe::new("/queue/after-restart"))
        .await
        .unwrap();

    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut confirmed = Vec::new();
            let mut unknown = 0;
            for i in 0..600u32 {
                match client
                    .send(Outgoing::new("/queue/kill", i.to_string()).persistent(true))
                    .await
                {
                    Ok(()) => confirmed.push(i),
                    Err(e) if e.outcome_unknown() || matches!(e, Error::Stale(_)) => unknown += 1,
                    Err(e) => panic!("unexpected error {e:?}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (confirmed, unknown)
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    broker.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.start_again().await.unwrap();
    let (confirmed, unknown) = publisher.await.unwrap();
    assert!(client.epoch() >= 1, "the client never noticed the kill");
    assert!(!confirmed.is_empty());

    // The subscription made before the kill is live again.
    client
        .send(Outgoing::new("/queue/after-restart", "hello again"))
        .await
        .unwrap();
    let m = recv(&mut events, WAIT)
        .await
        .expect("resubscribed after reconnect");
    assert_eq!(m.body().as_ref(), b"hello again");

    let mut sub = client
        .subscribe(Subscribe::new("/queue/kill").prefetch(1000))
        .await
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(m) = recv(&mut sub, Duration::from_secs(3)).await {
        seen.insert(String::from_utf8_lossy(m.body()).parse::<u32>().unwrap());
        m.ack().await.unwrap();
    }
    let lost: Vec<u32> = confirmed
        .iter()
        .copied()
        .filter(|i| !seen.contains(i))
        .collect();
    eprintln!(
        "confirmed {} / unknown outcome {} / on broker after restart {} / lost {}",
        confirmed.len(),
        unknown,
        seen.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "confirmed but missing: {lost:?}");
}

#[tokio::test]
async fn frozen_broker_is_detected_by_heart_beats_and_the_client_recovers() {
    let broker = Broker::start().await.unwrap();
    let mut config =
        config(&broker).with_heart_beat(Duration::from_millis(500), Duration::from_millis(500));
    config.connect_timeout = Duration::from_secs(2);
    let client = Client::connect(config).await.unwrap();
    let mut sub = client
        .subscribe(Subscribe::new("/queue/frozen"))
        .await
        .unwrap();
    assert_eq!(client.epoch(), 0);
    broker.pause().unwrap();
    let noticed = eventually(|| client.epoch() >= 1).await;
    broker.resume().unwrap();
    assert!(noticed, "a silent broker was not detected");
    client
        .send(Outgoing::new("/queue/frozen", "thawed"))
        .await
        .unwrap();
    let m = recv(&mut sub, WAIT)
        .await
        .expect("subscription resumed after the thaw");
    assert_eq!(m.body().as_ref(), b"thawed");
}

#[tokio::test]
async fn slow_consumer_does_not_make_the_client_buffer_without_bound() {
    let broker = Broker::start().await.unwrap();
    let client = Client::connect(config(&broker)).await.unwrap();
    let tx = client.begin().await.unwrap();
    for i in 0..2000 {
        tx.send(Outgoing::new("/queue/slow", format!("{i}")))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // The prefetch bounds what the broker dispatches ahead of the acks, and the
    // local buffer is sized to it, so a consumer that does not read holds the
    // broker back instead of filling memory.
    let mut sub = client
        .subscribe(Subscribe::new("/queue/slow").prefetch(8))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Meanwhile the connection keeps answering other requests.
    client
        .send(Outgoing::new("/queue/other", "still responsive"))
        .await
        .unwrap();
    let mut count = 0;
    while let Some(m) = recv(&mut sub, Duration::from_secs(3)).await {
        m.ack().await.unwrap();
        count += 1;
    }
    assert_eq!(count, 2000);
    assert_eq!(client.epoch(), 0);
}

#[tokio::test]
async fn broker_closing_the_session_fails_the_request_and_the_client_reconnects() {
    let broker = Broker::start().await.unwrap();
    let client = Client::connect(config(&broker)).await.unwrap();
    // An empty queue name makes ActiveMQ send an ERROR and drop the connection.
    let err = client
        .send(Outgoing::new("/queue/", "x"))
        .await
        .unwrap_err();
    assert!(
        err.outcome_unknown() || matches!(err, Error::Rejected(_)),
        "{err:?}"
    );
    assert!(eventually(|| client.epoch() >= 1).await);
    client
        .send(Outgoing::new("/queue/ok", "after"))
        .await
        .unwrap();
}

#[tokio::test]
async fn virtual_topic_fans_out_to_consumer_queues_and_selectors_filter() {
    let broker = Broker::start().await.unwrap();
    let client = Client::connect(config(&broker)).await.unwrap();
    // Consumer queues must exist before the producer publishes.
    let mut points = client
        .subscribe(Subscribe::new(
            "/queue/Consumer.points.VirtualTopic.user.created",
        ))
        .await
        .unwrap();
    let mut mail = client
        .subscribe(
            Subscribe::new("/queue/Consumer.mail.VirtualTopic.user.created")
                .selector("plan = 'pro'"),
        )
        .await
        .unwrap();
    for plan in ["free", "pro"] {
        client
            .send(
                Outgoing::new("/topic/VirtualTopic.user.created", plan)
                    .header("plan", plan)
                    .persistent(true),
            )
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while let Some(m) = recv(&mut points, Duration::from_secs(3)).await {
        got.push(String::from_utf8_lossy(m.body()).into_owned());
        m.ack().await.unwrap();
    }
    assert_eq!(got, ["free", "pro"]);
    let m = recv(&mut mail, WAIT).await.expect("selected message");
    assert_eq!(m.body().as_ref(), b"pro");
    m.ack().await.unwrap();
    assert!(recv(&mut mail, Duration::from_secs(2)).await.is_none());
}

#[tokio::test]
async fn durable_topic_subscription_keeps_messages_while_offline_and_acks_in_a_transaction() {
    let broker = Broker::start().await.unwrap();
    let durable = || config(&broker).with_client_id("durable-client");
    let consumer = Client::connect(durable()).await.unwrap();
    let sub = consumer
        .subscribe(Subscribe::new("/topic/news").durable("news-reader"))
        .await
        .unwrap();
    drop(sub);
    consumer.disconnect().await.unwrap();

    let producer = Client::connect(config(&broker)).await.unwrap();
    producer
        .send(Outgoing::new("/topic/news", "while away").persistent(true))
        .await
        .unwrap();

    let consumer = Client::connect(durable()).await.unwrap();
    let mut sub = consumer
        .subscribe(Subscribe::new("/topic/news").durable("news-reader"))
        .await
        .unwrap();
    let m = recv(&mut sub, WAIT)
        .await
        .expect("kept for the durable subscriber");
    assert_eq!(m.body().as_ref(), b"while away");
    let tx = consumer.begin().await.unwrap();
    tx.ack(&m).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_subscription_holds_at_most_its_byte_budget_of_unread_messages() {
    let broker = Broker::start().await.unwrap();
    let client = Client::connect(config(&broker)).await.unwrap();
    let body = vec![b'x'; 1024 * 1024];
    for _ in 0..40 {
        client
            .send(Outgoing::new("/queue/large", body.clone()))
            .await
            .unwrap();
    }
    // The count buffer (and the prefetch) would take all forty: 40 MiB.
    let mut sub = client
        .subscribe(Subscribe::new("/queue/large").prefetch(100))
        .await
        .unwrap();
    let budget = Subscribe::new("/queue/large").byte_budget();
    // Messages taken out of the stream but kept (not dropped) still count
    // against the budget, so the client stops taking more from the socket.
    let mut held = Vec::new();
    while let Some(m) = recv(&mut sub, Duration::from_secs(2)).await {
        held.push(m);
    }
    let bytes: usize = held.iter().map(|m| m.body().len()).sum();
    assert!(!held.is_empty());
    assert!(
        bytes <= budget,
        "{} messages of {bytes} bytes held, over the budget of {budget}",
        held.len()
    );
    // Backpressure, not loss: acked and dropped, they make room for the rest.
    let mut count = 0;
    for m in held.drain(..) {
        m.ack().await.unwrap();
        count += 1;
    }
    while let Some(m) = recv(&mut sub, Duration::from_secs(3)).await {
        m.ack().await.unwrap();
        count += 1;
    }
    assert_eq!(count, 40);
    assert_eq!(client.epoch(), 0);
}

#[tokio::test]
async fn a_header_stomp_1_0_cannot_carry_fails_that_send_and_the_client_goes_on() {
    let broker = Broker::start().await.unwrap();
    let client = Client::connect(config(&broker).with_versions(&[Version::V1_0]))
        .await
        .unwrap();
    assert_eq!(client.version(), Version::V1_0);
    let bad = Outgoing::new("/queue/v10", "bad").header("note", "two\nlines");
    let error = client.send(bad.clone()).await.unwrap_err();
    assert!(matches!(error, Error::Unencodable(_)), "{error:?}");
    let tx = client.begin().await.unwrap();
    let in_tx = tx.send(bad).await;
    assert!(matches!(in_tx, Err(Error::Unencodable(_))), "{in_tx:?}");
    tx.abort().await.unwrap();
    client
        .send(Outgoing::new("/queue/v10", "good"))
        .await
        .expect("the client is still up");
    assert!(!client.is_closed(), "{:?}", client.close_reason());
    assert_eq!(client.epoch(), 0, "the connection was kept");
    let mut sub = client
        .subscribe(Subscribe::new("/queue/v10"))
        .await
        .unwrap();
    let m = recv(&mut sub, WAIT).await.expect("the good message");
    assert_eq!(m.body().as_ref(), b"good");
}

/// A subscription whose consumer takes nothing, on the client a publisher
/// also uses: once the subscription's byte budget is spent, the publisher's
/// receipts must still arrive (its messages wait in the subscription's own
/// queue), and the subscription's messages all arrive once it is read.
#[tokio::test]
async fn a_subscription_over_its_byte_budget_holds_up_no_receipt_of_the_same_client() {
    let (timeouts, other, seen) = shared_client_with_a_full_subscription(None).await;
    assert_eq!(
        (timeouts, other),
        (0, 0),
        "receipts waited behind the full subscription"
    );
    assert_eq!(
        seen,
        (0..60).collect::<Vec<_>>(),
        "messages lost or out of order"
    );
}

/// The same with a subscription queue of 8 KiB: the queue's byte bound holds
/// (the client stops reading its connection, so receipts wait: the memory
/// bound wins over the shared client), and still nothing is lost or reordered.
#[tokio::test]
async fn a_full_subscription_queue_stops_the_reading_and_loses_nothing() {
    let (timeouts, other, seen) = shared_client_with_a_full_subscription(Some(8 * 1024)).await;
    assert_eq!(other, 0, "unexpected errors");
    assert!(
        timeouts > 0,
        "the client read on past a full queue of 8 KiB: the queue is not bounded in bytes"
    );
    assert_eq!(
        seen,
        (0..60).collect::<Vec<_>>(),
        "messages lost or out of order"
    );
}

/// 60 messages of 1 KiB for a subscription with a budget of 4 KiB that
/// nobody reads, then 5 confirmed sends on the same client: the receipt
/// timeouts, other errors, and the messages' numbers as then read.
async fn shared_client_with_a_full_subscription(
    queue_bytes: Option<usize>,
) -> (usize, usize, Vec<u32>) {
    let broker = Broker::start().await.unwrap();
    let client = Client::connect(config(&broker).with_receipt_timeout(Duration::from_secs(2)))
        .await
        .unwrap();
    let queue = "/queue/byte-budget-shared";
    let mut options = Subscribe::new(queue).prefetch(100).buffer_bytes(4 * 1024);
    if let Some(bytes) = queue_bytes {
        options = options.queue_bytes(bytes);
    }
    let mut sub = client.subscribe(options).await.unwrap();
    // 60 messages of 1 KiB from another client: far over the budget of 4 KiB.
    let feeder = Client::connect(config(&broker)).await.unwrap();
    let body = Bytes::from(vec![b'x'; 1024]);
    for n in 0..60 {
        feeder
            .send(Outgoing::new(queue, body.clone()).header("n", n.to_string()))
            .await
            .unwrap();
    }
    // Let the broker push them while nobody reads the subscription.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut timeouts = 0;
    let mut other = 0;
    for n in 0..5 {
        match client
            .send(
                Outgoing::new("/queue/byte-budget-other", Bytes::from_static(b"p"))
                    .header("n", n.to_string()),
            )
            .await
        {
            Ok(()) => {}
            Err(Error::ReceiptTimeout { .. } | Error::Withdrawn { .. }) => timeouts += 1,
            Err(e) => {
                eprintln!("send {n}: {e}");
                other += 1;
            }
        }
    }
    eprintln!("5 sends on the shared client: {timeouts} receipt timeouts, {other} other errors");
    // Read and ack all 60.
    let mut seen = Vec::new();
    while seen.len() < 60 {
        let Some(message) = recv(&mut sub, WAIT).await else {
            break;
        };
        seen.push(
            message
                .header("n")
                .and_then(|n| n.parse().ok())
                .unwrap_or(u32::MAX),
        );
        message.ack().await.unwrap();
    }
    (timeouts, other, seen)
}
