//! Shared pieces of the `outbox` command's tests: running the binary,
//! databases, brokers, counting what arrived.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use outbox_stomp::{AckMode, Client, Config, Subscribe};
use outbox_test_harness::{Broker, BrokerConfig, TestDb};

/// What one run of `outbox` gave.
#[derive(Debug)]
pub struct Run {
    /// The exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Standard output parsed as one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    /// Asserts a success.
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }
}

/// Runs the `outbox` binary with `args` (and no `DATABASE_URL` from the
/// environment the tests run in).
pub async fn outbox(args: &[&str]) -> Run {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env_remove("DATABASE_URL")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the outbox binary");
    Run {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

/// `outbox --database url args…`.
pub async fn outbox_on(url: &str, args: &[&str]) -> Run {
    let mut all = vec!["--database", url];
    all.extend_from_slice(args);
    outbox(&all).await
}

/// A SQLite test database (never skipped).
pub async fn sqlite() -> Option<TestDb<sqlx::Sqlite>> {
    Some(TestDb::sqlite().await.expect("SQLite test database"))
}

/// A PostgreSQL test database, or `None` when skipped by configuration.
pub async fn postgres() -> Option<TestDb<sqlx::Postgres>> {
    TestDb::postgres().await.expect("PostgreSQL test database")
}

/// A MySQL/MariaDB test database, or `None` when skipped by configuration.
pub async fn mysql() -> Option<TestDb<sqlx::MySql>> {
    TestDb::mysql().await.expect("MySQL test database")
}

/// A broker; starts are slow when several tests start one at once.
pub async fn broker() -> Broker {
    Broker::start_with(
        BrokerConfig::default()
            .with_max_heap_mb(384)
            .with_ready_timeout(Duration::from_secs(180)),
    )
    .await
    .expect("ActiveMQ test broker")
}

/// A client that waits at most 2 s for receipts, so a relay on it may hold
/// a lease of 5 s.
pub async fn client(broker: &Broker) -> Client {
    Client::connect(
        Config::parse(&broker.stomp_uri())
            .expect("broker URI")
            .with_receipt_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("connect to the test broker")
}

/// Event ids read from `destination` until nothing arrives for `idle`,
/// acking everything.
pub async fn drain(broker: &Broker, destination: &str, idle: Duration) -> Vec<String> {
    let client = client(broker).await;
    let mut sub = client
        .subscribe(
            Subscribe::new(destination)
                .ack(AckMode::ClientIndividual)
                .prefetch(1000)
                .buffer(1000),
        )
        .await
        .expect("subscribe");
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(idle, sub.next_message()).await {
        out.push(m.header("event-id").unwrap_or_default().to_owned());
        m.ack().await.expect("ack");
    }
    let _ = client.disconnect().await;
    out
}

/// How many times each id arrived.
pub fn tally(ids: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for id in ids {
        *counts.entry(id.clone()).or_insert(0) += 1;
    }
    counts
}

/// Waits until `check` holds, failing the test after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `?` placeholders rewritten as `$1, $2…` when `dollar` (PostgreSQL).
pub fn placeholders(sql: &str, dollar: bool) -> String {
    if !dollar {
        return sql.to_owned();
    }
    let mut out = String::new();
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}
