//! Relay throughput: committed outbox rows → PUBLISHED in ActiveMQ, per
//! database, side by side with a plain STOMP publisher that does no database
//! work (the broker's ceiling for the same messages). Prints a table.
//!
//! Method: one broker from the test harness (persistent KahaDB, 2 GiB heap) on
//! loopback. Every message is the same 200-byte JSON payload, `persistent:true`,
//! with the outbox headers. The ceiling publishes pre-built messages with the
//! relay's own publisher (`StompPublisher`: `BEGIN`, a `SEND` per message,
//! `COMMIT` with a receipt), `BATCH` per transaction, from `RELAYS` connections at
//! once. A relay row first commits `N` rows (untimed), then starts `RELAYS`
//! relays with `batch_size = BATCH` and times from start until all `N` rows are
//! `PUBLISHED` (relay counters; the database confirms `NEW = 0` at the end).
//! Each row uses its own queue, emptied after the row (untimed), so the
//! broker holds no earlier row's messages. Rows share one table per database,
//! emptied after each row; on PostgreSQL it is then vacuumed and analyzed
//! (untimed), so no row inherits an earlier one's dead rows, whether or not
//! the server runs autovacuum. A warm-up ceiling run precedes the table.
//! Beside each rate: how busy the whole machine was over the timed part
//! (broker, database and this process; 100 % = every core busy) and the CPU
//! time it spent per message, so that a row bound by the machine's cores can
//! be told from one whose publishers wait.
//! Run with `cargo bench --bench relay`; `BENCH_N`, `BENCH_BATCH`, and
//! `BENCH_RELAYS` (comma list, default `1,2`) change the sizes.

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use outbox::core::relay::{OutboxMessage, Publisher, StompPublisher};
use outbox::core::{Backend, Event, Outbox, RelayConfig};
use outbox_test_harness::Broker;

const BODY: &str = r#"{"user_id":123456,"name":"a user with a name of a typical length","email":"someone@example.com","created_at":"2026-11-24T05:00:00Z","plan":"free","padding":"xxxxxxxxxxxx"}"#;

fn messages(n: usize, queue: &str) -> Vec<OutboxMessage> {
    (0..n)
        .map(|i| OutboxMessage {
            id: i as i64,
            event_id: uuid::Uuid::now_v7().to_string(),
            event_type: "user.created".into(),
            destination: queue.into(),
            key: Some(format!("user-{}", i % 100)),
            headers: vec![],
            content: Bytes::from_static(BODY.as_bytes()),
            content_type: outbox::core::producer::JSON.into(),
            attempts: 0,
            create_time: 0,
        })
        .collect()
}

/// A timed run: messages per second, the machine's busy share and its CPU
/// microseconds per message over the same span.
struct Measured {
    rate: f64,
    busy: f64,
    cpu_us: f64,
}

impl Measured {
    fn of(cpu: &common::MachineCpu, start: Instant, n: usize) -> Measured {
        Measured {
            rate: n as f64 / start.elapsed().as_secs_f64(),
            busy: cpu.busy(),
            cpu_us: cpu.micros_per(n),
        }
    }
}

/// The broker's ceiling: `connections` publishers sharing `n` messages.
async fn ceiling(
    broker: &Broker,
    n: usize,
    batch: usize,
    connections: usize,
    queue: &str,
) -> Measured {
    let per = n / connections;
    let mut publishers = Vec::new();
    for _ in 0..connections {
        publishers.push(StompPublisher::new(common::client(broker).await));
    }
    let batches: Vec<_> = (0..connections).map(|_| messages(per, queue)).collect();
    let cpu = common::MachineCpu::start();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (p, all) in publishers.into_iter().zip(batches) {
        tasks.push(tokio::spawn(async move {
            for chunk in all.chunks(batch) {
                p.publish(chunk).await.expect("publish");
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher task");
    }
    let measured = Measured::of(&cpu, start, per * connections);
    common::drain_queue(broker, queue, per * connections).await;
    measured
}

async fn relay_run<DB: Backend>(
    broker: &Broker,
    pool: sqlx::Pool<DB>,
    n: usize,
    batch: usize,
    relays: usize,
    partitions: bool,
    queue: &str,
) -> Measured
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let outbox = Outbox::new(pool.clone());
    outbox.migrate().await.expect("migrate");
    // Commit N rows, untimed.
    let mut i = 0;
    while i < n {
        let mut tx = pool.begin().await.expect("begin");
        let events: Vec<Event> = (i..(i + 500).min(n))
            .map(|k| {
                Event::raw("user.created", queue, BODY, outbox::core::producer::JSON)
                    .with_key(format!("user-{}", k % 100))
            })
            .collect();
        outbox.append_all(&mut tx, &events).await.expect("append");
        tx.commit().await.expect("commit");
        i += 500;
    }
    // Every relay connected before the clock starts; all start together.
    let mut ready = Vec::new();
    for _ in 0..relays {
        let config = RelayConfig::default()
            .with_batch_size(batch as u32)
            .with_retention(None)
            .with_key_partitions(partitions);
        ready.push(
            outbox
                .relay(StompPublisher::new(common::client(broker).await), config)
                .expect("valid settings"),
        );
    }
    let metrics: Vec<_> = ready.iter().map(|r| r.metrics()).collect();
    let cpu = common::MachineCpu::start();
    let start = Instant::now();
    let handles: Vec<_> = ready.into_iter().map(|r| r.spawn()).collect();
    loop {
        let done: u64 = metrics.iter().map(|m| m.snapshot().published).sum();
        if done as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let measured = Measured::of(&cpu, start, n);
    for h in handles {
        h.shutdown().await.expect("shutdown");
    }
    let backlog = outbox.backlog().await.expect("backlog");
    assert_eq!(backlog.pending, 0, "every row published");
    // Keep the next run's database small.
    common::exec(&pool, "DELETE FROM outbox_event").await.ok();
    common::drain_queue(broker, queue, n).await;
    measured
}

#[tokio::main]
async fn main() {
    let n = common::env_usize("BENCH_N", 20_000);
    let batch = common::env_usize("BENCH_BATCH", 500);
    let relay_counts: Vec<usize> = std::env::var("BENCH_RELAYS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let broker = common::broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = common::sqlite(dir.path()).await;
    let pg = common::postgres().await;
    let my = common::mysql().await;

    // JVM warm-up.
    ceiling(&broker, n.min(10_000), batch, 1, "/queue/bench.warmup").await;

    println!(
        "\nRelay throughput: {n} persistent messages of {} B, {batch} per STOMP transaction\n",
        BODY.len()
    );
    let widths = [48, 11, 12, 10, 13, 11];
    common::head(
        &widths,
        &[
            "publisher",
            "connections",
            "msg/s",
            "× ceiling",
            "machine busy",
            "CPU µs/msg",
        ],
    );
    let mut q = 0;
    let mut queue = || {
        q += 1;
        format!("/queue/bench.relay.{q}")
    };
    for &relays in &relay_counts {
        let top = ceiling(&broker, n, batch, relays, &queue()).await;
        let fmt = |name: &str, m: &Measured| {
            vec![
                name.to_string(),
                relays.to_string(),
                format!("{:.0}", m.rate),
                format!("{:.2}", m.rate / top.rate),
                format!("{:.0} %", m.busy * 100.0),
                format!("{:.0}", m.cpu_us),
            ]
        };
        common::row(&widths, &fmt("plain STOMP publisher (ceiling)", &top));
        // Several relays: with key partitions (the default) and without.
        let modes: &[(bool, &str)] = if relays > 1 {
            &[(true, ""), (false, ", no partitions")]
        } else {
            &[(true, "")]
        };
        for &(partitions, mode) in modes {
            let m = relay_run(
                &broker,
                sqlite.clone(),
                n,
                batch,
                relays,
                partitions,
                &queue(),
            )
            .await;
            common::row(&widths, &fmt(&format!("relay, SQLite (WAL){mode}"), &m));
            if let Some(pg) = &pg {
                let pool = pg.pool().clone();
                let m = relay_run(
                    &broker,
                    pool.clone(),
                    n,
                    batch,
                    relays,
                    partitions,
                    &queue(),
                )
                .await;
                // The next row starts on a vacuumed, analyzed table, as on a
                // server whose autovacuum ran after the emptying DELETE.
                common::exec(&pool, "VACUUM ANALYZE outbox_event")
                    .await
                    .expect("vacuum");
                common::row(&widths, &fmt(&format!("relay, PostgreSQL{mode}"), &m));
            }
            if let Some(my) = &my {
                let pool = my.pool().clone();
                let m = relay_run(&broker, pool, n, batch, relays, partitions, &queue()).await;
                common::row(&widths, &fmt(&format!("relay, MariaDB{mode}"), &m));
            }
        }
    }
}
