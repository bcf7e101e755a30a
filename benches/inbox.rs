//! Consumer throughput with dedup, and latency from producer commit to handler
//! commit, per database, side by side with a plain STOMP consumer that does no
//! database work. Prints two tables.
//!
//! Method: one broker from the test harness (persistent KahaDB, 2 GiB heap) on
//! loopback; 200-byte JSON payloads, `persistent:true`. Every pool is built
//! with `test_before_acquire(false)`, as the README recommends for latency.
//!
//! - Throughput, in `BENCH_ROUNDS` (default 3) interleaved rounds, each row's
//!   median reported: a queue is pre-filled with `N` messages (untimed). The plain
//!   consumer subscribes with `client-individual` acks and the same prefetch as
//!   the inbox consumer, acks every message, and is timed until the `N`th. The
//!   inbox consumer (`concurrency` 8, `batch_size` 16, prefetch 128, its own database) runs the full path per message —
//!   transaction, inbox insert (the dedup), a handler that inserts one business
//!   row, commit, ack — and is timed until `N` events are processed.
//! - Beside each inbox row, the business write alone: the same workers, batches
//!   and transactions, one points row per message, the batch's ACKs, and no
//!   inbox row. The gap between the two is the inbox's own cost.
//! - Each throughput row also shows the CPU time the whole machine (broker,
//!   database server, this process) spent per message while it ran, from
//!   `/proc/stat`: steadier than the rates, which move with the broker's speed.
//! - Latency at a steady `RATE` events/s for `SECS` seconds, after one second of
//!   unrecorded warm-up. Outbox rows use two databases of the same kind, as in
//!   the reference scenario (producer and relay on one, consumer on the other):
//!   the producer commits one event per
//!   transaction (`Outbox::commit`, which wakes the in-process relay) and notes
//!   the time after its commit returned; the relay publishes; the consumer's
//!   handler commits, and `Handler::after_commit` notes the time. Plain rows: the
//!   producer notes the time, sends with a receipt; the consumer notes the time
//!   of arrival, once on a plain queue and once through a Virtual Topic (the
//!   outbox rows' path). Same process, same clock.
//!
//! Run with `cargo bench --bench inbox`; `BENCH_N`, `BENCH_ROUNDS`, `BENCH_CONCURRENCY`,
//! `BENCH_BATCH`, `BENCH_PREFETCH`, `BENCH_RATE`,
//! `BENCH_SECS` change the sizes, `BENCH_PARTS` (`throughput,latency`) and `BENCH_DBS`
//! (`sqlite,pg,my`) pick what runs.

#[path = "common.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::core::consumer::{BoxFuture, HandlerError};
use outbox::core::relay::StompPublisher;
use outbox::core::{
    Backend, Consumer, ConsumerConfig, Delivery, Event, Handler, Inbox, Outbox, RelayConfig,
};
use outbox::stomp::{AckMode, Outgoing, Subscribe};
use outbox_test_harness::Broker;

const BODY: &str = r#"{"user_id":123456,"name":"a user with a name of a typical length","email":"someone@example.com","created_at":"2026-11-24T05:00:00Z","plan":"free","padding":"xxxxxxxxxxxx"}"#;
/// The inbox consumer's `concurrency` and `batch_size` (`BENCH_CONCURRENCY`,
/// default 8; `BENCH_BATCH`, default 16); the business-write-only consumer
/// takes the same.
fn shape() -> (usize, usize) {
    (
        common::env_usize("BENCH_CONCURRENCY", 8).max(1),
        common::env_usize("BENCH_BATCH", 16).max(1),
    )
}
/// Prefetch of every consumer (`BENCH_PREFETCH`, default 128).
fn prefetch() -> u32 {
    u32::try_from(common::env_usize("BENCH_PREFETCH", 128)).unwrap_or(128)
}

/// Inserts one business row per event; notes commit times for latency runs.
struct Award<DB> {
    sent: Arc<Mutex<HashMap<String, Instant>>>,
    done: Arc<Mutex<HashMap<String, Instant>>>,
    received: Arc<Mutex<HashMap<String, Instant>>>,
    latencies: Arc<Mutex<Vec<Duration>>>,
    /// Notes times (latency runs); throughput runs skip the bookkeeping, as
    /// the plain consumer does.
    timed: bool,
    _db: std::marker::PhantomData<fn() -> DB>,
}

macro_rules! award_handler {
    ($db:ty) => {
        impl Handler<$db> for Award<$db> {
            type Event = ();

            fn decode(&self, delivery: &Delivery) -> Result<(), String> {
                // The consumer decodes as soon as it takes the message: the split
                // point between the relay-and-broker part and the consumer part.
                if !self.timed {
                    return Ok(());
                }
                self.received
                    .lock()
                    .unwrap()
                    .entry(delivery.event_id.clone())
                    .or_insert_with(Instant::now);
                Ok(())
            }

            fn handle<'a>(
                &'a self,
                tx: &'a mut sqlx::Transaction<'static, $db>,
                _: (),
                _: &'a Delivery,
            ) -> BoxFuture<'a, Result<(), HandlerError>> {
                Box::pin(async move {
                    sqlx::query("INSERT INTO points (user_id, points) VALUES (1, 100)")
                        .execute(&mut **tx)
                        .await?;
                    Ok(())
                })
            }

            fn after_commit(&self, delivery: &Delivery) {
                // Matched with the producer's times at the end: the handler can
                // commit before the producer has noted its own commit time.
                if !self.timed {
                    return;
                }
                self.done
                    .lock()
                    .unwrap()
                    .insert(delivery.event_id.clone(), Instant::now());
            }
        }
    };
}
award_handler!(sqlx::Sqlite);
award_handler!(sqlx::Postgres);
award_handler!(sqlx::MySql);

fn award<DB>(timed: bool) -> Award<DB> {
    Award {
        timed,
        sent: Arc::default(),
        done: Arc::default(),
        received: Arc::default(),
        latencies: Arc::default(),
        _db: std::marker::PhantomData,
    }
}

async fn fill(broker: &Broker, queue: &str, n: usize) {
    common::fill_queue(broker, n, |k| {
        Outgoing::new(queue.to_owned(), BODY)
            .persistent(true)
            .header("event-id", format!("fill-{queue}-{k}"))
    })
    .await;
}

/// A `client-individual` subscription with the bench's prefetch, as every
/// plain consumer here uses.
async fn subscribe(client: &outbox::stomp::Client, queue: &str) -> outbox::stomp::Subscription {
    client
        .subscribe(
            Subscribe::new(queue)
                .ack(AckMode::ClientIndividual)
                .prefetch(prefetch())
                .buffer(prefetch() as usize),
        )
        .await
        .expect("subscribe")
}

/// (messages per second, machine CPU µs per message).
async fn plain_throughput(broker: &Broker, n: usize, queue: &str) -> (f64, f64) {
    fill(broker, queue, n).await;
    let client = common::client(broker).await;
    let start = Instant::now();
    let cpu = common::MachineCpu::start();
    let mut sub = subscribe(&client, queue).await;
    for _ in 0..n {
        let m = sub.next_message().await.expect("message");
        m.ack().await.expect("ack");
    }
    (n as f64 / start.elapsed().as_secs_f64(), cpu.micros_per(n))
}

async fn prepare<DB: Backend>(pool: &sqlx::Pool<DB>) -> Inbox<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let inbox = Inbox::new(pool.clone(), "bench").expect("inbox");
    inbox.migrate().await.expect("migrate");
    common::exec(pool, "DROP TABLE IF EXISTS points").await.ok();
    common::exec(
        pool,
        "CREATE TABLE points (user_id BIGINT NOT NULL, points BIGINT NOT NULL)",
    )
    .await
    .expect("points table");
    common::exec(pool, "DELETE FROM inbox_event")
        .await
        .expect("clean inbox");
    inbox
}

fn config(queue: &str) -> ConsumerConfig {
    ConsumerConfig::new(queue)
        .with_concurrency(shape().0)
        .with_batch_size(shape().1)
        .with_prefetch(Some(prefetch()))
        .with_retention(None)
}

/// The business write alone: the same workers, batches and transactions as the
/// inbox consumer (on SQLite its two workers, one writer at a time), each
/// transaction inserting one points row per message, then the batch's ACKs; no
/// inbox row, so no dedup. What remains between this row and the inbox row is
/// the inbox's own cost.
async fn business_only_throughput<DB: Backend>(
    broker: &Broker,
    pool: sqlx::Pool<DB>,
    n: usize,
    queue: &str,
) -> (f64, f64)
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    prepare(&pool).await;
    fill(broker, queue, n).await;
    let client = common::client(broker).await;
    // As the consumer splits them (outbox-core's `workers_and_batch`): on a
    // single writer, two workers share what `concurrency` workers would hold.
    let (concurrency, batch) = shape();
    let (workers, most) = if DB::DIALECT.single_writer && concurrency > 2 && batch > 1 {
        (2, (concurrency * batch / 2).min(1000))
    } else {
        (concurrency, batch)
    };
    let start = Instant::now();
    let cpu = common::MachineCpu::start();
    let subscription = subscribe(&client, queue).await;
    let subscription = Arc::new(tokio::sync::Mutex::new(subscription));
    let writer = Arc::new(tokio::sync::Mutex::new(()));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (subscription, writer, done, pool) = (
            subscription.clone(),
            writer.clone(),
            done.clone(),
            pool.clone(),
        );
        tasks.spawn(async move {
            loop {
                let batch = {
                    let mut subscription = subscription.lock().await;
                    let Some(first) = subscription.next_message().await else {
                        return;
                    };
                    let mut batch = vec![first];
                    while batch.len() < most {
                        match subscription.try_next_message() {
                            Some(m) => batch.push(m),
                            None => break,
                        }
                    }
                    batch
                };
                {
                    let _turn = if DB::DIALECT.single_writer {
                        Some(writer.lock().await)
                    } else {
                        None
                    };
                    let mut tx = DB::begin_write(&pool).await.expect("begin");
                    for _ in &batch {
                        DB::exec(
                            &mut tx,
                            &outbox::core::Query::fixed(
                                DB::DIALECT,
                                "INSERT INTO points (user_id, points) VALUES (1, 100)",
                            ),
                        )
                        .await
                        .expect("insert");
                    }
                    tx.commit().await.expect("commit");
                }
                futures_util::future::join_all(batch.iter().map(|m| m.ack())).await;
                done.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    while done.load(std::sync::atomic::Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let cpu = cpu.micros_per(n);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let _ = client.disconnect().await;
    (rate, cpu)
}

async fn inbox_throughput<DB: Backend>(
    broker: &Broker,
    pool: sqlx::Pool<DB>,
    n: usize,
    queue: &str,
) -> (f64, f64)
where
    Award<DB>: Handler<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let inbox = prepare(&pool).await;
    fill(broker, queue, n).await;
    let start = Instant::now();
    let cpu = common::MachineCpu::start();
    let handle = Consumer::new(inbox, award::<DB>(false), config(queue))
        .expect("consumer settings")
        .spawn(common::client(broker).await)
        .await
        .expect("consumer");
    while handle.metrics().snapshot().processed < n as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let cpu = cpu.micros_per(n);
    handle.shutdown().await.expect("shutdown");
    (rate, cpu)
}

/// One database's two throughput rows, business write only and then the inbox
/// consumer, each on its own queue (`tag`), named after `database`.
async fn database_rows<DB: Backend>(
    broker: &Broker,
    pool: &sqlx::Pool<DB>,
    n: usize,
    database: &str,
    tag: &str,
) -> [(String, (f64, f64)); 2]
where
    Award<DB>: Handler<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let queue = format!("/queue/bench.tx.{tag}");
    let business = business_only_throughput(broker, pool.clone(), n, &queue).await;
    let queue = format!("/queue/bench.in.{tag}");
    let inbox = inbox_throughput(broker, pool.clone(), n, &queue).await;
    [
        (format!("business write only, {database}"), business),
        (format!("inbox consumer, {database}"), inbox),
    ]
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, usize) {
    v.sort();
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO, 0);
    }
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (at(0.50), at(0.99), v.len())
}

/// Plain send → receive: the producer sends to `destination`, the consumer
/// reads `queue` (the same queue, or a Virtual Topic's consumer queue).
async fn plain_latency(
    broker: &Broker,
    rate: usize,
    secs: u64,
    destination: &str,
    queue: &str,
) -> (Duration, Duration, usize) {
    let consumer = common::client(broker).await;
    let mut sub = subscribe(&consumer, queue).await;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let reader = {
        let sent = sent.clone();
        let latencies = latencies.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next_message().await {
                let now = Instant::now();
                if let Some(t0) = m
                    .header("event-id")
                    .and_then(|id| sent.lock().unwrap().remove(id))
                {
                    latencies.lock().unwrap().push(now - t0);
                }
                let _ = m.ack().await;
            }
        })
    };
    let producer = common::client(broker).await;
    steady(rate, secs, &latencies, |i, record| {
        let producer = producer.clone();
        let sent = sent.clone();
        let destination = destination.to_owned();
        async move {
            let id = format!("p-{i}");
            if record {
                sent.lock().unwrap().insert(id.clone(), Instant::now());
            }
            producer
                .send(
                    Outgoing::new(destination, BODY)
                        .persistent(true)
                        .header("event-id", id),
                )
                .await
                .expect("send");
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    reader.abort();
    let v = latencies.lock().unwrap().clone();
    percentiles(v)
}

/// Calls `produce(i, record)` `rate` times a second: one second of warm-up
/// (`record = false`), then `secs` recorded seconds. Each call runs on its own
/// task so a slow one does not delay the schedule.
async fn steady<F, Fut>(rate: usize, secs: u64, latencies: &Arc<Mutex<Vec<Duration>>>, produce: F)
where
    F: Fn(usize, bool) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let period = Duration::from_secs(1) / rate as u32;
    let mut tick = tokio::time::interval(period);
    let total = rate * (secs as usize + 1);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tick.tick().await;
        if i == rate {
            latencies.lock().unwrap().clear();
        }
        tasks.push(tokio::spawn(produce(i, i >= rate)));
    }
    for t in tasks {
        t.await.expect("producer task");
    }
}

async fn outbox_latency<DB: Backend>(
    broker: &Broker,
    producer_pool: sqlx::Pool<DB>,
    pool: sqlx::Pool<DB>,
    rate: usize,
    secs: u64,
    topic: &str,
) -> (Duration, Duration, usize)
where
    Award<DB>: Handler<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let inbox = prepare(&pool).await;
    let outbox = Outbox::new(producer_pool);
    outbox.migrate().await.expect("migrate");
    let handler = award::<DB>(true);
    let sent = handler.sent.clone();
    let done = handler.done.clone();
    let received = handler.received.clone();
    let latencies = handler.latencies.clone();
    let queue = format!("/queue/Consumer.bench.VirtualTopic.{topic}");
    let consumer = Consumer::new(inbox, handler, config(&queue))
        .expect("consumer settings")
        .spawn(common::client(broker).await)
        .await
        .expect("consumer");
    let relay = outbox
        .relay(
            StompPublisher::new(common::client(broker).await),
            RelayConfig::default().with_retention(None),
        )
        .expect("relay settings")
        .spawn();
    let destination = format!("/topic/VirtualTopic.{topic}");
    steady(rate, secs, &latencies, |_, record| {
        let outbox = outbox.clone();
        let sent = sent.clone();
        let destination = destination.clone();
        async move {
            let mut tx = outbox.pool().begin().await.expect("begin");
            let event = Event::raw(
                "user.created",
                destination,
                BODY,
                outbox::core::producer::JSON,
            );
            let id = outbox
                .append(&mut tx, event)
                .await
                .expect("append")
                .to_string();
            outbox.commit(tx).await.expect("commit");
            if record {
                sent.lock().unwrap().insert(id, Instant::now());
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.shutdown().await.expect("relay");
    consumer.shutdown().await.expect("consumer");
    let sent = sent.lock().unwrap();
    let done = done.lock().unwrap();
    let received = received.lock().unwrap();
    let v: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, t0)| done.get(id).map(|t1| t1.saturating_duration_since(*t0)))
        .collect();
    let to_consumer: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, t0)| received.get(id).map(|t| t.saturating_duration_since(*t0)))
        .collect();
    let (p50, p99, _) = percentiles(to_consumer);
    eprintln!(
        "  {topic}: commit → consumer takes the message: p50 {} ms, p99 {} ms",
        ms(p50),
        ms(p99)
    );
    let _ = latencies;
    percentiles(v)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let n = common::env_usize("BENCH_N", 30_000);
    let rate = common::env_usize("BENCH_RATE", 1_000);
    let secs = common::env_usize("BENCH_SECS", 10) as u64;
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "throughput,latency".into());
    let dbs = std::env::var("BENCH_DBS").unwrap_or_else(|_| "sqlite,pg,my".into());
    let on = |list: &str, name: &str| list.split(',').any(|p| p.trim() == name);
    let broker = common::broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let producer_dir = tempfile::tempdir().expect("tempdir");
    let sqlite = common::sqlite(dir.path()).await;
    let sqlite_producer = common::sqlite(producer_dir.path()).await;
    let (pg, pg_producer) = if on(&dbs, "pg") {
        (common::postgres().await, common::postgres().await)
    } else {
        (None, None)
    };
    let (my, my_producer) = if on(&dbs, "my") {
        (common::mysql().await, common::mysql().await)
    } else {
        (None, None)
    };
    let sqlite_on = on(&dbs, "sqlite");

    // JVM warm-up: the broker's consume rate keeps rising over the first tens
    // of thousands of messages.
    let warm_up = common::env_usize("BENCH_WARMUP", 60_000);
    plain_throughput(&broker, warm_up, "/queue/bench.warmup").await;

    if on(&parts, "throughput") {
        let rounds = common::env_usize("BENCH_ROUNDS", 3).max(1);
        println!(
            "\nConsumer throughput: {n} persistent messages, concurrency {}, batch size {}, prefetch {}, median of {rounds} interleaved rounds\n",
            shape().0,
            shape().1,
            prefetch()
        );
        // Rows in the order of their first measurement, each with its rates.
        let mut rows: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        // Each round measures every row once, in the same order, so the
        // broker's drift over a run (JIT, store upkeep) touches every row alike.
        for _ in 0..rounds {
            let mut note =
                |name: String, rate: (f64, f64)| match rows.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, rates)) => rates.push(rate),
                    None => rows.push((name, vec![rate])),
                };
            note(
                "plain STOMP consumer (ack only)".into(),
                plain_throughput(&broker, n, "/queue/bench.in.plain").await,
            );
            let mut measured = Vec::new();
            if sqlite_on {
                measured.extend(database_rows(&broker, &sqlite, n, "SQLite (WAL)", "sqlite").await);
            }
            if let Some(pg) = &pg {
                measured.extend(database_rows(&broker, pg.pool(), n, "PostgreSQL", "pg").await);
            }
            if let Some(my) = &my {
                measured.extend(database_rows(&broker, my.pool(), n, "MariaDB", "my").await);
            }
            for (name, rate) in measured {
                note(name, rate);
            }
        }
        let rates = |v: &[(f64, f64)]| v.iter().map(|r| r.0).collect::<Vec<_>>();
        let cpus = |v: &[(f64, f64)]| v.iter().map(|r| r.1).collect::<Vec<_>>();
        let plain = common::median(&rates(&rows[0].1));
        // The inbox's own cost: an inbox row against the business write
        // alone on the same database.
        let business = |name: &str| {
            let database = name.strip_prefix("inbox consumer, ")?;
            let (_, measured) = rows
                .iter()
                .find(|(n, _)| n.strip_prefix("business write only, ") == Some(database))?;
            Some(common::median(&rates(measured)))
        };
        let widths = [40, 10, 8, 10, 10, 28];
        common::head(
            &widths,
            &[
                "consumer",
                "msg/s",
                "× plain",
                "× business",
                "CPU µs/msg",
                "each round, msg/s",
            ],
        );
        for (name, measured) in &rows {
            let each: Vec<String> = rates(measured).iter().map(|r| format!("{r:.0}")).collect();
            let rate = common::median(&rates(measured));
            common::row(
                &widths,
                &[
                    name.clone(),
                    format!("{rate:.0}"),
                    format!("{:.2}", rate / plain),
                    business(name).map_or_else(String::new, |b| format!("{:.2}", rate / b)),
                    format!("{:.0}", common::median(&cpus(measured))),
                    each.join(", "),
                ],
            );
        }
    }
    if !on(&parts, "latency") {
        return;
    }

    println!("\nLatency at {rate} events/s for {secs} s (after 1 s warm-up)\n");
    let widths = [52, 9, 9, 8];
    common::head(&widths, &["path", "p50 ms", "p99 ms", "events"]);
    let latency_row = |path: &str, (p50, p99, count): (Duration, Duration, usize)| {
        common::row(
            &widths,
            &[path.to_owned(), ms(p50), ms(p99), count.to_string()],
        );
    };
    latency_row(
        "plain STOMP send → receive",
        plain_latency(
            &broker,
            rate,
            secs,
            "/queue/bench.lat.plain",
            "/queue/bench.lat.plain",
        )
        .await,
    );
    latency_row(
        "plain STOMP send → receive, Virtual Topic",
        plain_latency(
            &broker,
            rate,
            secs,
            "/topic/VirtualTopic.lat.plain",
            "/queue/Consumer.bench.VirtualTopic.lat.plain",
        )
        .await,
    );
    if sqlite_on {
        let measured = outbox_latency(
            &broker,
            sqlite_producer.clone(),
            sqlite.clone(),
            rate,
            secs,
            "lat.sqlite",
        )
        .await;
        latency_row("outbox commit → inbox commit, SQLite (WAL)", measured);
    }
    if let (Some(pg), Some(producer)) = (&pg, &pg_producer) {
        let measured = outbox_latency(
            &broker,
            producer.pool().clone(),
            pg.pool().clone(),
            rate,
            secs,
            "lat.pg",
        )
        .await;
        latency_row("outbox commit → inbox commit, PostgreSQL", measured);
    }
    if let (Some(my), Some(producer)) = (&my, &my_producer) {
        let measured = outbox_latency(
            &broker,
            producer.pool().clone(),
            my.pool().clone(),
            rate,
            secs,
            "lat.my",
        )
        .await;
        latency_row("outbox commit → inbox commit, MariaDB", measured);
    }
}
