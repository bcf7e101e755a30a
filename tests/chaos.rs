//! Seeded fault-schedule runs (`examples/chaos.rs`), one fixed seed per
//! database: each runs a producer with its relay and two consumers as
//! separate processes against a real ActiveMQ while faults strike for 30 s,
//! then checks from the recorded rows that every event was applied once per
//! consumer, refused at append or parked with its reason, in key order, with
//! bounded duplicates and memory.
//!
//! Every input class is in, clock skews ahead included. `scripts/chaos.sh`
//! runs longer and random seeds.

mod support;

use std::process::Stdio;
use std::time::Duration;

use outbox_test_harness::{SKIP_MYSQL_VAR, SKIP_POSTGRES_VAR};

/// Fault time of each run, in minutes.
const MINUTES: &str = "0.5";

/// Runs `chaos run` for `seed` on `db` and fails with its output unless
/// every invariant held.
async fn chaos_run(seed: u64, db: &str) {
    let binary = support::example_binary("chaos");
    let child = tokio::process::Command::new(binary)
        .args([
            "run",
            "--seed",
            &seed.to_string(),
            "--db",
            db,
            "--minutes",
            MINUTES,
        ])
        .args(["--stall-bound", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the chaos example");
    // A failure bound only: a run takes about a minute.
    let output = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("the chaos run should end within its bounds")
        .expect("chaos run output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "chaos run seed {seed} on {db} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("OK: every invariant held"), "{stdout}");
}

fn skipped(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

#[tokio::test]
async fn a_seeded_fault_schedule_on_sqlite_loses_and_doubles_nothing() {
    chaos_run(11, "sqlite").await;
}

#[tokio::test]
async fn a_seeded_fault_schedule_on_postgres_loses_and_doubles_nothing() {
    if skipped(SKIP_POSTGRES_VAR) {
        return;
    }
    chaos_run(11, "postgres").await;
}

#[tokio::test]
async fn a_seeded_fault_schedule_on_mysql_loses_and_doubles_nothing() {
    if skipped(SKIP_MYSQL_VAR) {
        return;
    }
    chaos_run(11, "mysql").await;
}
