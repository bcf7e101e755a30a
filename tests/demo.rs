//! The reference demo end to end (`examples/demo.rs`): the user service, the
//! points service and ActiveMQ as real processes, on SQLite, PostgreSQL and
//! MySQL/MariaDB, quietly and with crashes. Each test asserts that the demo
//! exits 0 and that its final check shows no user without a welcome-points
//! row and none with two.
//!
//! The demo runs the compiled service examples, so the tests build the
//! examples first ([`support::example_binary`]).

mod support;

use std::process::Stdio;
use std::time::Duration;

use outbox_test_harness::TestDb;
use support::{mysql, postgres};

const USERS: u64 = 200;

/// Runs the demo with its own broker and `args`; returns its output after
/// checking the exit status and the final table.
async fn run_demo(args: &[&str]) -> String {
    let demo = support::example_binary("demo");
    let users = USERS.to_string();
    let child = tokio::process::Command::new(&demo)
        .args(["--own-broker", "--users", &users, "--timeout", "150"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the demo");
    let output = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .expect("the demo should end within its own timeout")
        .expect("demo output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the demo failed ({}):\n{text}",
        output.status
    );
    assert_eq!(table_value(&text, "users in DB1"), Some(USERS), "{text}");
    assert_eq!(table_value(&text, "missing"), Some(0), "{text}");
    assert_eq!(table_value(&text, "duplicated"), Some(0), "{text}");
    text
}

/// The number in the final table's row that starts with `name`.
fn table_value(output: &str, name: &str) -> Option<u64> {
    output
        .lines()
        .find(|line| line.starts_with(&format!("| {name}")))?
        .trim_end()
        .trim_end_matches('|')
        .rsplit('|')
        .next()?
        .trim()
        .parse()
        .ok()
}

const QUIET: &[&str] = &["--rate", "500"];
const CRASH: &[&str] = &["--rate", "100", "--crash"];

/// Two fresh server databases as `--users-db` and `--points-db`, with the
/// test's own pools closed (the demo and the services open their own).
async fn server_args<DB: sqlx::Database>(db1: &TestDb<DB>, db2: &TestDb<DB>) -> Vec<String> {
    db1.pool().close().await;
    db2.pool().close().await;
    vec![
        "--users-db".into(),
        db1.url().to_owned(),
        "--points-db".into(),
        db2.url().to_owned(),
    ]
}

async fn run_on_postgres(mode: &[&str]) {
    let (Some(db1), Some(db2)) = (postgres().await, postgres().await) else {
        return;
    };
    let mut args = server_args(&db1, &db2).await;
    args.extend(mode.iter().map(|s| s.to_string()));
    run_demo(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
}

async fn run_on_mysql(mode: &[&str]) {
    let (Some(db1), Some(db2)) = (mysql().await, mysql().await) else {
        return;
    };
    let mut args = server_args(&db1, &db2).await;
    args.extend(mode.iter().map(|s| s.to_string()));
    run_demo(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
}

#[tokio::test]
async fn sqlite_demo_gives_every_user_exactly_one_welcome_points_row() {
    let out = run_demo(QUIET).await;
    assert!(out.contains("points service subscribed"), "{out}");
}

#[tokio::test]
async fn sqlite_crash_demo_loses_nothing_and_doubles_nothing() {
    let out = run_demo(CRASH).await;
    assert_eq!(table_value(&out, "broker restarts"), Some(1), "{out}");
    assert!(out.contains("SIGKILL user service"), "{out}");
    assert!(out.contains("SIGKILL points service"), "{out}");
}

#[tokio::test]
async fn postgres_demo_gives_every_user_exactly_one_welcome_points_row() {
    run_on_postgres(QUIET).await;
}

#[tokio::test]
async fn postgres_crash_demo_loses_nothing_and_doubles_nothing() {
    run_on_postgres(CRASH).await;
}

#[tokio::test]
async fn mysql_demo_gives_every_user_exactly_one_welcome_points_row() {
    run_on_mysql(QUIET).await;
}

#[tokio::test]
async fn mysql_crash_demo_loses_nothing_and_doubles_nothing() {
    run_on_mysql(CRASH).await;
}
