//! Competing consumers: one and two consumer processes on one queue, with and
//! without per-key order, side by side with plain consumers that write nothing.
//!
//! Method: one broker from the test harness (persistent KahaDB, 2 GiB heap) on
//! loopback and one PostgreSQL database. For each row a fresh queue is
//! pre-filled (untimed) with `N` persistent messages of 171 bytes, each with
//! one of 100 keys as `event-key` and `JMSXGroupID`, as the relay sends them.
//! Every consumer is a child process — this bench binary started again —
//! with its own broker connection and, for the inbox consumer, its own pool
//! of 8 connections; it prints how many messages it has settled every 10 ms.
//! The clock starts once every process has subscribed and stops when their
//! counts add up to `N`.
//!
//! A message group belongs to the consumer that gets its first message, so on
//! a queue with a backlog the first consumer to subscribe would take every
//! group. The queues of the two-process rows therefore hold dispatch until
//! two consumers are subscribed (ActiveMQ's `consumersBeforeDispatchStarts`,
//! capped at 10 s), the broker set-up docs/configuration.md recommends for
//! competing consumers with per-key order.
//!
//! - Plain consumer: `client-individual` acks, prefetch 128, acks each
//!   message; no database.
//! - Inbox consumer: concurrency 8, batch size 16, prefetch 128; the handler
//!   inserts one row naming its process, and the bench checks afterwards that
//!   every event was applied exactly once. Once as configured by default, once
//!   with `per_key_order`.
//!
//! Now and then ActiveMQ starts dispatching before it counts the second
//! consumer, and one process gets every group; such a two-process row (one
//! process settled more than 3/4 of the messages) measures one process, so it
//! is measured again, up to twice, and the bench says how often that happened.
//!
//! Each row also shows the share of the busiest process and the CPU time the
//! whole machine spent per message (`/proc/stat`), with how busy the machine
//! was: on 2 cores one consumer process already keeps the broker, the
//! database and itself near the machine's limit.
//!
//! Run with `cargo bench --bench consumers`; `BENCH_N` (default 40000),
//! `BENCH_ROUNDS` (default 3, interleaved, median per row), `BENCH_WARMUP`
//! (default 60000) change the sizes.

#[path = "common.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox::core::consumer::{BoxFuture, HandlerError};
use outbox::core::{Consumer, ConsumerConfig, Delivery, Handler, Inbox};
use outbox::stomp::{AckMode, Outgoing, Subscribe};
use outbox_test_harness::{Broker, BrokerConfig};
use tokio::io::AsyncBufReadExt as _;

const BODY: &str = r#"{"user_id":123456,"name":"a user with a name of a typical length","email":"someone@example.com","created_at":"2026-11-24T05:00:00Z","plan":"free","padding":"xxxxxxxxxxxx"}"#;
const KEYS: usize = 100;
const PREFETCH: u32 = 128;
/// Queues whose dispatch waits for two consumers.
const SHARED_QUEUES: &str = "bench.c2.>";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Inbox,
    /// The inbox consumer with `per_key_order`.
    KeyOrder,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Inbox => "inbox",
            Kind::KeyOrder => "keyorder",
        }
    }
}

/// `n` messages on `queue`, 500 per STOMP transaction.
async fn fill(broker: &Broker, queue: &str, n: usize) {
    common::fill_queue(broker, n, |k| {
        let key = format!("user-{}", k % KEYS);
        Outgoing::new(queue.to_owned(), BODY)
            .persistent(true)
            .header("event-id", format!("{queue}-{k}"))
            .header("event-type", "user.created")
            .header("event-key", key.clone())
            .group_id(key)
    })
    .await;
}

/// What one row measured.
struct Measured {
    rate: f64,
    busiest_share: f64,
    cpu_per_msg: f64,
    busy: f64,
}

/// One row: `processes` consumers of `kind` on a fresh queue of `n` messages.
async fn run_row(
    broker: &Broker,
    pg: &common::ServerDb<sqlx::Postgres>,
    kind: Kind,
    processes: usize,
    n: usize,
    (round, attempt): (usize, usize),
) -> Measured {
    let family = if processes > 1 { "c2" } else { "c1" };
    let queue = format!("/queue/bench.{family}.{}.r{round}.{attempt}", kind.name());
    if kind != Kind::Plain {
        common::exec(pg.pool(), "TRUNCATE inbox_event, points")
            .await
            .expect("empty the tables");
    }
    fill(broker, &queue, n).await;
    let exe = std::env::current_exe().expect("bench binary");
    let counts: Vec<Arc<AtomicUsize>> = (0..processes).map(|_| Arc::default()).collect();
    let ready = Arc::new(AtomicUsize::new(0));
    let mut children = Vec::new();
    for (p, count) in counts.iter().enumerate() {
        let mut child = tokio::process::Command::new(&exe)
            .env("CONSUMERS_CHILD", kind.name())
            .env("CONSUMERS_BROKER", broker.stomp_uri())
            .env("CONSUMERS_QUEUE", &queue)
            .env("CONSUMERS_URL", pg.url())
            .env("CONSUMERS_PROCESS", p.to_string())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start a consumer process");
        let stdout = child.stdout.take().expect("child stdout");
        let (count, ready) = (count.clone(), ready.clone());
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line == "ready" {
                    ready.fetch_add(1, Ordering::SeqCst);
                } else if let Some(settled) = line.strip_prefix("n ").and_then(|c| c.parse().ok()) {
                    count.store(settled, Ordering::SeqCst);
                }
            }
        });
        children.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::SeqCst) < processes {
        assert!(
            Instant::now() < deadline,
            "consumer processes did not subscribe"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = Instant::now();
    let cpu = common::MachineCpu::start();
    let total = || {
        counts
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .sum::<usize>()
    };
    let deadline = start + Duration::from_secs(600);
    while total() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} messages settled after 10 minutes",
            total()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let settled: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    let measured = Measured {
        rate: n as f64 / elapsed,
        busiest_share: settled.iter().copied().max().unwrap_or(0) as f64 / n as f64,
        cpu_per_msg: cpu.micros_per(n),
        busy: cpu.busy(),
    };
    for child in &mut children {
        let _ = child.kill().await;
    }
    let split: Vec<String> = settled.iter().map(usize::to_string).collect();
    println!(
        "{queue}: {:.0} msg/s, settled per process {}",
        measured.rate,
        split.join(" + ")
    );
    if kind != Kind::Plain {
        let (applied, events): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM points), (SELECT COUNT(*) FROM inbox_event)",
        )
        .fetch_one(pg.pool())
        .await
        .expect("count the applied events");
        assert_eq!(
            (applied, events),
            (n as i64, n as i64),
            "each event applied exactly once"
        );
    }
    measured
}

/// Inserts one row naming its process per event.
struct Award {
    process: i64,
}

impl Handler<sqlx::Postgres> for Award {
    type Event = ();

    fn decode(&self, _: &Delivery) -> Result<(), String> {
        Ok(())
    }

    fn handle<'a>(
        &'a self,
        tx: &'a mut sqlx::Transaction<'static, sqlx::Postgres>,
        _: (),
        _: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO points (user_id, points) VALUES ($1, 100)")
                .bind(self.process)
                .execute(&mut **tx)
                .await?;
            Ok(())
        })
    }
}

/// Prints `n <settled>` every 10 ms while the count moves, until killed.
async fn report(settled: impl Fn() -> usize) {
    let mut last = usize::MAX;
    loop {
        let now = settled();
        if now != last {
            println!("n {now}");
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A consumer process, until the parent kills it.
async fn child(kind: &str) {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let (broker, queue, url) = (
        var("CONSUMERS_BROKER"),
        var("CONSUMERS_QUEUE"),
        var("CONSUMERS_URL"),
    );
    let process: i64 = var("CONSUMERS_PROCESS").parse().expect("process number");
    let client = outbox::stomp::Client::connect(
        outbox::stomp::Config::parse(&broker)
            .expect("uri")
            .with_receipt_timeout(Duration::from_secs(10)),
    )
    .await
    .expect("connect");
    if kind == Kind::Plain.name() {
        let mut sub = client
            .subscribe(
                Subscribe::new(queue)
                    .ack(AckMode::ClientIndividual)
                    .prefetch(PREFETCH)
                    .buffer(PREFETCH as usize),
            )
            .await
            .expect("subscribe");
        println!("ready");
        let settled = Arc::new(AtomicUsize::new(0));
        let reporter = {
            let settled = settled.clone();
            tokio::spawn(report(move || settled.load(Ordering::Relaxed)))
        };
        while let Some(m) = sub.next_message().await {
            m.ack().await.expect("ack");
            settled.fetch_add(1, Ordering::Relaxed);
        }
        reporter.abort();
        return;
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .expect("pool");
    let inbox = Inbox::new(pool, "bench").expect("inbox");
    let config = ConsumerConfig::new(queue)
        .with_per_key_order(kind == Kind::KeyOrder.name())
        .with_concurrency(8)
        .with_batch_size(16)
        .with_prefetch(Some(PREFETCH))
        .with_retention(None);
    let handle = Consumer::new(inbox, Award { process }, config)
        .expect("consumer settings")
        .spawn(client)
        .await
        .expect("consumer");
    println!("ready");
    let metrics = handle.metrics();
    report(move || metrics.snapshot().processed as usize).await;
}

#[tokio::main]
async fn main() {
    if let Ok(kind) = std::env::var("CONSUMERS_CHILD") {
        child(&kind).await;
        return;
    }
    let n = common::env_usize("BENCH_N", 40_000);
    let rounds = common::env_usize("BENCH_ROUNDS", 3).max(1);
    let broker = Broker::start_with(
        BrokerConfig::default()
            .with_max_heap_mb(2048)
            .with_dispatch_wait(SHARED_QUEUES, 2, Duration::from_secs(10)),
    )
    .await
    .expect("start ActiveMQ");
    let Some(pg) = common::postgres().await else {
        println!("PostgreSQL is not reachable: nothing to measure");
        return;
    };
    Inbox::new(pg.pool().clone(), "bench")
        .expect("inbox")
        .migrate()
        .await
        .expect("migrate");
    common::exec(
        pg.pool(),
        "CREATE TABLE points (user_id BIGINT NOT NULL, points BIGINT NOT NULL)",
    )
    .await
    .expect("points table");

    // JVM warm-up: the broker's consume rate keeps rising over the first tens
    // of thousands of messages.
    let warm_up = common::env_usize("BENCH_WARMUP", 60_000);
    if warm_up > 0 {
        run_row(&broker, &pg, Kind::Plain, 1, warm_up, (0, 0)).await;
    }

    let rows = [
        ("plain consumer (ack only)", Kind::Plain, 1),
        ("plain consumer (ack only)", Kind::Plain, 2),
        ("inbox consumer", Kind::Inbox, 1),
        ("inbox consumer", Kind::Inbox, 2),
        ("inbox consumer, per-key order", Kind::KeyOrder, 1),
        ("inbox consumer, per-key order", Kind::KeyOrder, 2),
    ];
    let mut measured: Vec<Vec<Measured>> = rows.iter().map(|_| Vec::new()).collect();
    // Two-process rows whose first attempt was lopsided, and those that
    // stayed so after every attempt.
    let (mut lopsided, mut kept_lopsided) = (0, 0);
    for round in 1..=rounds {
        for (i, (_, kind, processes)) in rows.iter().enumerate() {
            // Now and then the broker starts dispatching before the second
            // consumer is counted and every group goes to the first: that
            // row measures one process, so it is measured again.
            let mut attempt = 0;
            let row = loop {
                let row = run_row(&broker, &pg, *kind, *processes, n, (round, attempt)).await;
                let even = row.busiest_share <= 0.75 || *processes == 1;
                if !even && attempt == 0 {
                    lopsided += 1;
                }
                if !even && attempt == 2 {
                    kept_lopsided += 1;
                }
                if even || attempt == 2 {
                    break row;
                }
                attempt += 1;
            };
            measured[i].push(row);
        }
    }
    // The median over the rounds of one figure of row `i`.
    let median_of = |i: usize, figure: fn(&Measured) -> f64| {
        common::median(&measured[i].iter().map(figure).collect::<Vec<_>>())
    };
    let rate = |i: usize| median_of(i, |m| m.rate);
    println!(
        "\nCompeting consumers on PostgreSQL: {n} persistent messages over {KEYS} keys (JMSXGroupID), \
         median of {rounds} interleaved rounds\n"
    );
    let widths = [30, 9, 9, 7, 13, 8, 7, 26];
    common::head(
        &widths,
        &[
            "consumer",
            "processes",
            "msg/s",
            "× one",
            "× plain, same",
            "busiest",
            "CPU µs",
            "machine busy, each round",
        ],
    );
    let row_of = |kind: Kind, processes: usize| {
        rows.iter()
            .position(|(_, k, p)| *k == kind && *p == processes)
            .unwrap_or(0)
    };
    for (i, (name, kind, processes)) in rows.iter().enumerate() {
        // The same consumer with one process, and the plain one with as many.
        let one = row_of(*kind, 1);
        let plain = row_of(Kind::Plain, *processes);
        let each: Vec<String> = measured[i]
            .iter()
            .map(|m| format!("{:.0} ({:.0}%)", m.rate, m.busy * 100.0))
            .collect();
        common::row(
            &widths,
            &[
                name.to_string(),
                processes.to_string(),
                format!("{:.0}", rate(i)),
                format!("{:.2}", rate(i) / rate(one)),
                format!("{:.2}", rate(i) / rate(plain)),
                format!("{:.2}", median_of(i, |m| m.busiest_share)),
                format!("{:.0}", median_of(i, |m| m.cpu_per_msg)),
                each.join(", "),
            ],
        );
    }
    if lopsided > 0 {
        println!(
            "\nIn {lopsided} two-process rows the broker first gave every group to one process; \
             they were measured again, up to twice; {kept_lopsided} stayed so, and for those \
             the last attempt is in the table"
        );
    }
}
