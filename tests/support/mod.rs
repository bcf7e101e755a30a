//! Shared pieces of the integration tests: databases, brokers, counting what
//! arrived, and child processes that crash at failpoints.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use outbox::stomp::{AckMode, Client, Config, Subscribe};
use outbox_test_harness::{Broker, BrokerConfig, TestDb};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

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

/// A broker with room for a few thousand persistent messages.
pub async fn broker() -> Broker {
    Broker::start_with(BrokerConfig::default().with_max_heap_mb(512))
        .await
        .expect("ActiveMQ test broker")
}

/// A client that reconnects quickly and waits at most 2 s for receipts, so
/// a relay on it may hold a lease of 5 s (longer than a publish can take).
/// It logs in with the broker's credentials, if it has any.
pub async fn client(broker: &Broker) -> Client {
    let mut config = Config::parse(&broker.stomp_uri())
        .expect("broker URI")
        .with_receipt_timeout(Duration::from_secs(2));
    if let Some(credentials) = broker.credentials() {
        config = config.with_credentials(credentials.login(), credentials.passcode());
    }
    Client::connect(config)
        .await
        .expect("connect to the test broker")
}

/// One received message, as the tests count it.
#[derive(Debug, Clone)]
pub struct Received {
    pub event_id: String,
    pub event_type: Option<String>,
    pub key: Option<String>,
    pub group: Option<String>,
    pub persistent: Option<String>,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Reads `destination` until nothing arrives for `idle`, acking everything.
pub async fn drain(broker: &Broker, destination: &str, idle: Duration) -> Vec<Received> {
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
        out.push(Received {
            event_id: m.header("event-id").unwrap_or_default().to_owned(),
            event_type: m.header("event-type").map(str::to_owned),
            key: m.header("event-key").map(str::to_owned),
            group: m.header("JMSXGroupID").map(str::to_owned),
            persistent: m.header("persistent").map(str::to_owned),
            content_type: m.header("content-type").map(str::to_owned),
            headers: m
                .headers()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            body: m.body().to_vec(),
        });
        m.ack().await.expect("ack");
    }
    let _ = client.disconnect().await;
    out
}

/// How many times each event id arrived.
pub fn tally(received: &[Received]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in received {
        *counts.entry(r.event_id.clone()).or_insert(0) += 1;
    }
    counts
}

/// Runs the `#[ignore]`d test `child` of this test binary in a child process
/// with `env`, and waits up to `limit` for it to end. Returns whether it was
/// killed by SIGKILL (a failpoint fired) and its stderr.
pub async fn run_child(child: &str, env: &[(&str, String)], limit: Duration) -> (bool, String) {
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = child_command(child, env);
    cmd.stderr(Stdio::piped());
    let child_proc = cmd.spawn().expect("spawn child test process");
    let output = tokio::time::timeout(limit, child_proc.wait_with_output())
        .await
        .expect("the child process should have reached its failpoint in time")
        .expect("child output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.signal() == Some(9), stderr)
}

/// The `#[ignore]`d test `child` of this test binary as a process to start,
/// with `env`, killed when dropped; its output goes nowhere.
pub fn child_command(child: &str, env: &[(&str, String)]) -> tokio::process::Command {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args([
        child,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// The value of a variable a child process needs.
pub fn child_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Waits until `outbox` has no row left to publish, failing the test after `limit`.
pub async fn wait_published<DB: outbox::core::Backend>(
    outbox: &outbox::core::Outbox<DB>,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let backlog = outbox.backlog().await.expect("backlog");
        if backlog.pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backlog still {backlog:?} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The count of rows in state `process` (`NEW`, `PUBLISHED`, `FAILED`) in
/// the result of `Outbox::counts`.
pub fn count(counts: &outbox::core::admin::OutboxCounts, process: &str) -> u64 {
    match process {
        "NEW" => counts.new,
        "PUBLISHED" => counts.published,
        "FAILED" => counts.failed,
        other => panic!("no outbox state {other}"),
    }
}

/// The compiled example `name`. Builds the examples once per test process
/// (`cargo build --examples --all-features`, a no-op when they are up to
/// date) into the target folder of this test binary.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let examples = BUILT.get_or_init(|| {
        // This test runs from <target>/<profile>/deps/; the examples go to
        // <target>/<profile>/examples/.
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("the test binary lives in <target>/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("<target> folder");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let output = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "--examples",
                "--all-features",
                "--profile",
                profile,
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo build --examples");
        assert!(
            output.status.success(),
            "cargo build --examples --all-features failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        profile_dir.join("examples")
    });
    examples.join(name)
}

/// Polls `condition` every 50 ms until it holds (`true`) or `limit` passes
/// (`false`).
pub async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}
