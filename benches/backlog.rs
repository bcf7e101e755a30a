//! A deep backlog: how the relay's drain rate, memory and claim plans behave
//! when it starts on 1,000,000 waiting rows, against the same relay on 20,000.
//!
//! Method: one broker from the test harness; every row is the relay bench's
//! 171-byte JSON event with one of 100 keys, published to a topic nobody
//! subscribes to (the broker confirms each transaction and keeps nothing, so
//! the figure is the relay's, not the broker's store). Per database and size
//! `N`: commit `N` rows into a fresh table (untimed, 5000 per transaction),
//! `ANALYZE` it (the statistics a table that grew over time has), print the
//! plans of the relay's statements on the table — the claim, the probe for
//! due rows, the per-key order check, the hand-off read — (`EXPLAIN` on
//! PostgreSQL and MySQL, `EXPLAIN QUERY PLAN` on SQLite), then run one relay
//! (defaults, retention off, batches of 500) in a child process — this bench
//! binary started again — and time it from start until its counter reaches
//! `N`; the child also prints the rate of each tenth of the drain, to show
//! whether it falls as the published part of the table grows. The small
//! size runs three times (its drain takes seconds) and its median is the
//! rate the big one is compared with. Where PostgreSQL runs with autovacuum
//! off, the bench does its work during the drain, at autovacuum's default
//! thresholds, and prints each pass. The parent reads the child's resident
//! memory (`VmRSS`) every second and prints the samples.
//! After the drain the plan is printed again, with `N` published rows in the
//! table. Run with `cargo bench --bench backlog`; `BENCH_BACKLOG` (default
//! 1000000) and `BENCH_SMALL` (default 20000) change the sizes, `BENCH_DBS`
//! (comma list of sqlite, postgres, mysql) the databases.

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use outbox::core::relay::StompPublisher;
use outbox::core::{Backend, Event, Outbox, RelayConfig};
use sqlx::Row as _;

const BODY: &str = r#"{"user_id":123456,"name":"a user with a name of a typical length","email":"someone@example.com","created_at":"2026-11-24T05:00:00Z","plan":"free","padding":"xxxxxxxxxxxx"}"#;
const TOPIC: &str = "/topic/bench.backlog";

/// The table of the `run`th drain of `n` rows.
fn table(n: usize, run: usize) -> String {
    format!("backlog_{n}_{run}")
}

async fn fill<DB: Backend>(outbox: &Outbox<DB>, n: usize) {
    let mut i = 0;
    while i < n {
        let mut tx = outbox.pool().begin().await.expect("begin");
        let events: Vec<Event> = (i..(i + 5000).min(n))
            .map(|k| {
                Event::raw("user.created", TOPIC, BODY, outbox::core::producer::JSON)
                    .with_key(format!("user-{}", k % 100))
            })
            .collect();
        outbox.append_all(&mut tx, &events).await.expect("append");
        tx.commit().await.expect("commit");
        i += 5000;
    }
}

/// The plans of the claim statement, the due probe, the per-key order check
/// and the hand-off read, one line per step.
async fn plan<DB: Backend>(outbox: &Outbox<DB>, kind: &str) -> Vec<String>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'r> sqlx::Decode<'r, DB> + for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> &'r str: sqlx::ColumnIndex<DB::Row>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let now = i64::MAX / 2;
    let explain = if kind == "sqlite" {
        "EXPLAIN QUERY PLAN"
    } else {
        "EXPLAIN"
    };
    let sql = format!("{explain} {}", outbox.claim_statement());
    let mut rows = sqlx::query(&sql)
        .bind(now)
        .bind(now)
        .bind(0_i64)
        .bind(64_i64)
        .bind(500_i64)
        .fetch_all(outbox.pool())
        .await
        .expect("explain the claim");
    // The probe for due rows the relay runs before each claim transaction.
    let sql = format!("{explain} {}", outbox.due_probe_statement());
    rows.extend(
        sqlx::query(&sql)
            .bind(now)
            .bind(now)
            .bind(0_i64)
            .bind(64_i64)
            .fetch_all(outbox.pool())
            .await
            .expect("explain the due probe"),
    );
    // The per-key order check of a batch at the head of the table, with
    // every key in it (as in a batch of 500 rows over 100 keys).
    let sql = format!("{explain} {}", outbox.key_order_statement(100));
    let mut check = sqlx::query(&sql).bind(1000_i64);
    for k in 0..100 {
        check = check.bind(format!("user-{k}"));
    }
    rows.extend(
        check
            .fetch_all(outbox.pool())
            .await
            .expect("explain the key order check"),
    );
    // The hand-off read, which a relay runs on most turns.
    let sql = format!("{explain} {}", outbox.handoff_statement());
    rows.extend(
        sqlx::query(&sql)
            .bind("relay-h".to_owned())
            .bind(now)
            .bind(500_i64)
            .fetch_all(outbox.pool())
            .await
            .expect("explain the hand-off read"),
    );
    rows.iter()
        .map(|row| match kind {
            "sqlite" => row.try_get::<String, _>("detail").unwrap_or_default(),
            "mysql" => format!(
                "type={} key={} rows={} extra={}",
                row.try_get::<String, _>("type").unwrap_or_default(),
                row.try_get::<String, _>("key")
                    .unwrap_or_else(|_| "NULL".into()),
                row.try_get::<String, _>("rows").unwrap_or_default(),
                row.try_get::<String, _>("Extra").unwrap_or_default()
            ),
            _ => row.try_get::<String, _>(0_usize).unwrap_or_default(),
        })
        .collect()
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One relay in a child process: its rate, the rate of each tenth of the
/// drain, and the memory samples.
async fn drain(
    kind: &str,
    url: &str,
    broker: &str,
    (n, table): (usize, &str),
) -> (f64, Vec<f64>, Vec<u64>) {
    let exe = std::env::current_exe().expect("bench binary");
    let child = tokio::process::Command::new(exe)
        .env("BACKLOG_CHILD", kind)
        .env("BACKLOG_URL", url)
        .env("BACKLOG_BROKER", broker)
        .env("BACKLOG_N", n.to_string())
        .env("BACKLOG_TABLE", table)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the relay process");
    let pid = child.id().expect("child pid");
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        while let Some(kib) = rss_kib(pid) {
            samples.push(kib);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        samples
    });
    let out = child.wait_with_output().await.expect("relay process");
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("rate "))
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("the relay process printed no rate: {text}"));
    let tenths = text
        .lines()
        .filter_map(|l| l.strip_prefix("tenth ")?.trim().parse().ok())
        .collect();
    (rate, tenths, sampler.await.expect("sampler"))
}

/// The child: one relay on `table` until it published `n` rows.
async fn child<DB: Backend>(url: &str, broker: &str, n: usize, table: &str) {
    let pool = sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(4)
        .test_before_acquire(false)
        .connect(url)
        .await
        .expect("pool");
    let outbox = Outbox::with_table(pool, table).expect("table");
    let client = outbox::stomp::Client::connect(
        outbox::stomp::Config::parse(broker)
            .expect("uri")
            .with_receipt_timeout(Duration::from_secs(10)),
    )
    .await
    .expect("connect");
    let config = RelayConfig::default().with_retention(None);
    let relay = outbox
        .relay(StompPublisher::new(client), config)
        .expect("valid settings");
    let metrics = relay.metrics();
    let start = Instant::now();
    let handle = relay.spawn();
    // The rate of each tenth of the drain (rows published since the last
    // mark over the time since it), to see whether it falls as the published
    // part of the table grows.
    let tenth = n.div_ceil(10).max(1);
    let (mut mark, mut since) = (0, start);
    loop {
        let published = (metrics.snapshot().published as usize).min(n);
        if published >= (mark + tenth).min(n) && published > mark {
            let rate = (published - mark) as f64 / since.elapsed().as_secs_f64();
            println!("tenth {rate:.0}");
            (mark, since) = (published, Instant::now());
        }
        if published >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    handle.shutdown().await.expect("shutdown");
    println!("rate {rate}");
}

/// What autovacuum would do with its default thresholds, on a server where
/// it is off: every second, `VACUUM ANALYZE` the table once its dead rows pass
/// 50 + 20 % of its rows, `ANALYZE` it once its changes since the last
/// statistics pass 50 + 10 %. Prints each pass. Runs until aborted.
async fn autovacuum_stand_in(pool: &sqlx::Pool<sqlx::Postgres>, table: &str) {
    let on: Option<String> = sqlx::query_scalar("SHOW autovacuum")
        .fetch_optional(pool)
        .await
        .ok()
        .flatten();
    if on.as_deref() != Some("off") {
        return;
    }
    println!(
        "PostgreSQL: autovacuum is off on this server; the bench vacuums and analyzes at its default thresholds"
    );
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let figures: Result<(i64, i64, f32), _> = sqlx::query_as(
            "SELECT s.n_dead_tup, s.n_mod_since_analyze, c.reltuples FROM pg_stat_user_tables s \
             JOIN pg_class c ON c.oid = s.relid WHERE s.relname = $1",
        )
        .bind(table)
        .fetch_one(pool)
        .await;
        let Ok((dead, changed, rows)) = figures else {
            continue;
        };
        let rows = f64::from(rows.max(0.0));
        let pass = if dead as f64 > 50.0 + 0.2 * rows {
            "VACUUM ANALYZE"
        } else if changed as f64 > 50.0 + 0.1 * rows {
            "ANALYZE"
        } else {
            continue;
        };
        let at = Instant::now();
        match common::exec(pool, &format!("{pass} {table}")).await {
            Ok(()) => println!(
                "    {:>4.0} s: {pass} ({dead} dead rows, {changed} changed) took {:.1} s",
                started.elapsed().as_secs_f64(),
                at.elapsed().as_secs_f64()
            ),
            Err(e) => println!("    {pass} failed: {e}"),
        }
    }
}

async fn run_db<DB: Backend>(
    kind: &str,
    label: &str,
    pool: sqlx::Pool<DB>,
    url: &str,
    broker: &str,
    (small, big): (usize, usize),
    vacuum: Option<sqlx::PgPool>,
) -> Vec<Vec<String>>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'r> sqlx::Decode<'r, DB> + for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> &'r str: sqlx::ColumnIndex<DB::Row>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let mut rows = Vec::new();
    let mut small_rates = Vec::new();
    // The small size three times (its drain takes seconds, so one run is
    // noisy), then the big one.
    for (run, n) in [small, small, small, big].into_iter().enumerate() {
        let is_small = run < 3;
        let table = table(n, run);
        let outbox = Outbox::with_table(pool.clone(), &table).expect("table");
        outbox.migrate().await.expect("migrate");
        let filled = Instant::now();
        fill(&outbox, n).await;
        println!(
            "{label}: {n} rows committed in {:.0} s",
            filled.elapsed().as_secs_f64()
        );
        // Statistics as autovacuum (PostgreSQL) or InnoDB's sampling would
        // have them on a table that grew over time.
        let analyze = match kind {
            "sqlite" => "ANALYZE".to_owned(),
            "postgres" => format!("ANALYZE {table}"),
            _ => format!("ANALYZE TABLE {table}"),
        };
        common::exec(&pool, &analyze).await.expect("analyze");
        if !is_small {
            println!("{label}, claim plan with {n} waiting rows:");
            for line in plan(&outbox, kind).await {
                println!("    {line}");
            }
        }
        let upkeep = vacuum.clone().map(|pool| {
            let table = table.clone();
            tokio::spawn(async move { autovacuum_stand_in(&pool, &table).await })
        });
        let (rate, tenths, samples) = drain(kind, url, broker, (n, &table)).await;
        if let Some(upkeep) = upkeep {
            upkeep.abort();
        }
        if !is_small {
            println!("{label}, claim plan with {n} published rows and none waiting:");
            for line in plan(&outbox, kind).await {
                println!("    {line}");
            }
        }
        common::exec(&pool, &format!("DROP TABLE {table}"))
            .await
            .ok();
        if is_small {
            small_rates.push(rate);
            if small_rates.len() < 3 {
                continue;
            }
        } else {
            let tenths: Vec<String> = tenths.iter().map(|r| format!("{r:.0}")).collect();
            println!(
                "{label}, {n} rows: msg/s of each tenth of the drain: {}",
                tenths.join(" ")
            );
        }
        let mib: Vec<String> = samples
            .iter()
            .map(|k| format!("{:.0}", *k as f64 / 1024.0))
            .collect();
        println!(
            "{label}, {n} rows: relay RSS every second (MiB): {}",
            mib.join(" ")
        );
        let peak = samples.iter().max().copied().unwrap_or(0) as f64 / 1024.0;
        let small_rate = common::median(&small_rates);
        let (rate, note) = if is_small {
            let each: Vec<String> = small_rates.iter().map(|r| format!("{r:.0}")).collect();
            (small_rate, format!("median of {}", each.join(", ")))
        } else {
            (rate, String::new())
        };
        rows.push(vec![
            label.to_owned(),
            n.to_string(),
            format!("{rate:.0}"),
            format!("{:.2}", rate / small_rate),
            format!("{peak:.1}"),
            note,
        ]);
    }
    rows
}

#[tokio::main]
async fn main() {
    if let Ok(kind) = std::env::var("BACKLOG_CHILD") {
        let url = std::env::var("BACKLOG_URL").expect("BACKLOG_URL");
        let broker = std::env::var("BACKLOG_BROKER").expect("BACKLOG_BROKER");
        let n: usize = std::env::var("BACKLOG_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .expect("BACKLOG_N");
        let table = std::env::var("BACKLOG_TABLE").expect("BACKLOG_TABLE");
        match kind.as_str() {
            "sqlite" => child::<sqlx::Sqlite>(&url, &broker, n, &table).await,
            "postgres" => child::<sqlx::Postgres>(&url, &broker, n, &table).await,
            _ => child::<sqlx::MySql>(&url, &broker, n, &table).await,
        }
        return;
    }
    let big = common::env_usize("BENCH_BACKLOG", 1_000_000);
    let small = common::env_usize("BENCH_SMALL", 20_000);
    let dbs = std::env::var("BENCH_DBS").unwrap_or_else(|_| "sqlite,postgres,mysql".into());
    let broker = common::broker().await;
    let uri = broker.stomp_uri();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut table_rows = Vec::new();
    if dbs.contains("sqlite") {
        let pool = common::sqlite(dir.path()).await;
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        table_rows.extend(
            run_db(
                "sqlite",
                "SQLite (WAL)",
                pool,
                &url,
                &uri,
                (small, big),
                None,
            )
            .await,
        );
    }
    if dbs.contains("postgres")
        && let Some(pg) = common::postgres().await
    {
        let (pool, url) = (pg.pool().clone(), pg.url().to_owned());
        table_rows.extend(
            run_db(
                "postgres",
                "PostgreSQL",
                pool.clone(),
                &url,
                &uri,
                (small, big),
                Some(pool),
            )
            .await,
        );
    }
    if dbs.contains("mysql")
        && let Some(my) = common::mysql().await
    {
        let (pool, url) = (my.pool().clone(), my.url().to_owned());
        table_rows.extend(run_db("mysql", "MariaDB", pool, &url, &uri, (small, big), None).await);
    }
    println!("\nRelay drain of a backlog: one relay process, batches of 500, 100 keys\n");
    let widths = [14, 9, 9, 9, 12, 28];
    common::head(
        &widths,
        &["database", "rows", "msg/s", "× small", "peak RSS MiB", ""],
    );
    for row in &table_rows {
        common::row(&widths, row);
    }
}
