//! Pieces shared by the benchmark binaries: the broker, the databases, and the
//! table printer.
#![allow(dead_code)]

use std::str::FromStr;
use std::time::Duration;

use outbox::stomp::{Client, Config};
use outbox_test_harness::{Broker, BrokerConfig, TestDb};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// A broker with a heap large enough that producer flow control stays out of the way.
pub async fn broker() -> Broker {
    Broker::start_with(BrokerConfig::default().with_max_heap_mb(2048))
        .await
        .expect("start ActiveMQ")
}

pub async fn client(broker: &Broker) -> Client {
    Client::connect(
        Config::parse(&broker.stomp_uri())
            .expect("uri")
            .with_receipt_timeout(Duration::from_secs(10)),
    )
    .await
    .expect("connect")
}

/// The median of `values` (the upper one of an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Sends the messages `message(0..n)`, 500 per STOMP transaction, on a
/// connection of its own.
pub async fn fill_queue(
    broker: &Broker,
    n: usize,
    message: impl Fn(usize) -> outbox::stomp::Outgoing,
) {
    let client = client(broker).await;
    let mut i = 0;
    while i < n {
        let tx = client.begin().await.expect("begin");
        for k in i..(i + 500).min(n) {
            tx.send(message(k)).await.expect("send");
        }
        tx.commit().await.expect("commit");
        i += 500;
    }
    let _ = client.disconnect().await;
}

/// Takes up to `n` messages off `queue` (auto acks), so that rows measured
/// later do not run on a broker holding every earlier row's messages. Stops
/// early once the queue stays empty for five seconds, and says so on stderr.
pub async fn drain_queue(broker: &Broker, queue: &str, n: usize) {
    let client = client(broker).await;
    let mut sub = client
        .subscribe(
            outbox::stomp::Subscribe::new(queue)
                .ack(outbox::stomp::AckMode::Auto)
                .prefetch(1000),
        )
        .await
        .expect("subscribe");
    let mut taken = 0;
    while taken < n {
        match tokio::time::timeout(Duration::from_secs(5), sub.next_message()).await {
            Ok(Some(_)) => taken += 1,
            _ => break,
        }
    }
    let _ = client.disconnect().await;
    if taken < n {
        eprintln!("{queue}: took {taken} of {n} messages; the rest stay on the broker");
    }
}

/// A SQLite file in WAL mode with `synchronous=NORMAL`, the settings the
/// README recommends for the embedded default.
pub async fn sqlite(dir: &std::path::Path) -> sqlx::SqlitePool {
    let options = SqliteConnectOptions::from_str(&format!(
        "sqlite://{}?mode=rwc",
        dir.join("bench.db").display()
    ))
    .expect("sqlite url")
    .journal_mode(SqliteJournalMode::Wal)
    .synchronous(SqliteSynchronous::Normal);
    SqlitePoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .expect("sqlite pool")
}

/// A fresh server database and a pool on it set up as the README recommends
/// for latency: `test_before_acquire(false)`, so taking a connection costs no
/// round trip.
pub struct ServerDb<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    // Dropped after the pool: removes the database.
    _db: TestDb<DB>,
}

impl<DB: sqlx::Database> ServerDb<DB> {
    pub fn pool(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }

    pub fn url(&self) -> &str {
        self._db.url()
    }
}

async fn server_db<DB: sqlx::Database>(db: TestDb<DB>) -> ServerDb<DB> {
    let pool = sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect(db.url())
        .await
        .expect("bench pool");
    ServerDb { pool, _db: db }
}

pub async fn postgres() -> Option<ServerDb<sqlx::Postgres>> {
    Some(server_db(TestDb::postgres().await.expect("PostgreSQL")?).await)
}

pub async fn mysql() -> Option<ServerDb<sqlx::MySql>> {
    Some(server_db(TestDb::mysql().await.expect("MySQL")?).await)
}

/// Prints one table row of `cells` with the widths of `widths`.
pub fn row(widths: &[usize], cells: &[String]) {
    let line: Vec<String> = cells
        .iter()
        .zip(widths)
        .map(|(c, w)| format!("{c:<w$}"))
        .collect();
    println!("| {} |", line.join(" | "));
}

pub fn head(widths: &[usize], names: &[&str]) {
    row(
        widths,
        &names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
    let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", dashes.join("-|-"));
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs one statement on any of the three pools.
pub async fn exec<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, sql: &str) -> Result<(), sqlx::Error>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    sqlx::raw_sql(sql).execute(pool).await.map(|_| ())
}

/// Busy and total time of all CPUs (`/proc/stat`, in ticks); `None` off Linux.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3)? + v.get(4)?;
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle, total))
}

/// Measures the CPU time the whole machine spends (every process: broker,
/// database, this one) while a section runs.
pub struct MachineCpu {
    start: Option<(u64, u64)>,
    at: std::time::Instant,
}

impl MachineCpu {
    /// Starts measuring.
    pub fn start() -> MachineCpu {
        MachineCpu {
            start: cpu_ticks(),
            at: std::time::Instant::now(),
        }
    }

    /// CPU time in microseconds per `items` since the start; NaN off Linux.
    pub fn micros_per(&self, items: usize) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        self.busy() * cpus * self.at.elapsed().as_secs_f64() * 1e6 / items.max(1) as f64
    }

    /// The share of all CPUs' time spent busy since the start (1.0 = every
    /// CPU busy all the time); NaN off Linux.
    pub fn busy(&self) -> f64 {
        let (Some((busy0, total0)), Some((busy1, total1))) = (self.start, cpu_ticks()) else {
            return f64::NAN;
        };
        (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64
    }
}
