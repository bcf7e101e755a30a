//! The relay's memory is bounded in bytes where it reads: rows of 4 MiB,
//! claimed and handed off, with `max_batch_bytes` of 1 MiB. The relay runs
//! in a child process of this test binary, which measures its own peak
//! resident memory (`VmHWM`) against what it was before the relay started:
//! the other tests of this binary would otherwise count as its memory.
//! Against a real ActiveMQ, on SQLite, PostgreSQL and MySQL/MariaDB.

mod support;

use std::time::Duration;

use outbox::core::relay::StompPublisher;
use outbox::core::{Event, Outbox, RelayConfig};
use support::*;

/// Bytes of payload per row.
const ROW_BYTES: usize = 4 * 1024 * 1024;
/// Rows the relay claims, and rows handed off to it (by an earlier
/// incarnation of its `relay_id`).
const ROWS: usize = 32;
/// Nothing subscribes: the broker takes each message and drops it.
const DEST: &str = "/topic/test.bytes.unread";
const RELAY_ID: &str = "bytes";

/// A line of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Forgets the peak resident memory so far: `VmHWM` starts again from now.
fn reset_peak() {
    // Linux 4.0 and later; without it the peak includes the set-up.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

macro_rules! bytes_suite {
    ($db:ty, $open:path) => {
        use super::*;

        #[tokio::test]
        async fn rows_of_4_mib_are_read_no_more_than_the_byte_budget_allows() {
            let Some(db) = $open().await else { return };
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            let broker = broker().await;
            // One statement per row: MySQL takes 16 MiB per packet.
            for _ in 0..2 * ROWS {
                let mut tx = outbox.pool().begin().await.unwrap();
                let event = Event::raw("big", DEST, vec![b'x'; ROW_BYTES], "application/octet-stream");
                outbox.append(&mut tx, event).await.unwrap();
                outbox.commit(tx).await.unwrap();
            }
            // The first half waits for a claim; the second is handed off to
            // the relay's id, as a predecessor killed before it published
            // would have left it.
            let lease_end: i64 = sqlx::query_scalar(
                "SELECT MAX(create_time) + 600000 FROM outbox_event",
            )
            .fetch_one(outbox.pool())
            .await
            .unwrap();
            sqlx::query(&format!(
                "UPDATE outbox_event SET claimed_by = '{RELAY_ID}-h', claimed_until = {lease_end} \
                 WHERE id > (SELECT m FROM (SELECT MIN(id) + {} AS m FROM outbox_event) s)",
                ROWS - 1
            ))
            .execute(outbox.pool())
            .await
            .unwrap();
            let name = concat!(module_path!(), "::child_relay_of_big_rows");
            let name = name.split_once("::").map_or(name, |(_, rest)| rest);
            let mut child = child_command(
                name,
                &[
                    ("OUTBOX_TEST_DB_URL", db.url().to_owned()),
                    ("OUTBOX_TEST_BROKER", broker.stomp_uri()),
                ],
            );
            child.stderr(std::process::Stdio::inherit());
            let status = tokio::time::timeout(Duration::from_secs(300), child.status())
                .await
                .expect("the relay process ends")
                .unwrap();
            assert!(status.success(), "the relay process failed: {status}");
            assert_eq!(
                count(&outbox.counts().await.unwrap(), "PUBLISHED"),
                2 * ROWS as u64
            );
        }

        #[tokio::test]
        #[ignore = "run by rows_of_4_mib_are_read_no_more_than_the_byte_budget_allows"]
        async fn child_relay_of_big_rows() {
            let (Some(url), Some(broker)) = (
                child_var("OUTBOX_TEST_DB_URL"),
                child_var("OUTBOX_TEST_BROKER"),
            ) else {
                return;
            };
            let pool = sqlx::Pool::<$db>::connect(&url).await.unwrap();
            let outbox = Outbox::new(pool);
            let client = outbox::stomp::Client::connect(
                outbox::stomp::Config::parse(&broker)
                    .unwrap()
                    .with_receipt_timeout(Duration::from_secs(10)),
            )
            .await
            .unwrap();
            let config = RelayConfig::default()
                .with_relay_id(RELAY_ID.to_owned())
                .with_max_batch_bytes(1024 * 1024)
                .with_poll_interval(Duration::from_millis(50))
                .with_lease(Duration::from_secs(30));
            let relay = outbox.relay(StompPublisher::new(client), config).unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let before = status_kib("VmRSS:");
            reset_peak();
            let relay = relay.spawn();
            wait_published(&outbox, Duration::from_secs(240)).await;
            let peak = status_kib("VmHWM:");
            let metrics = relay.metrics().snapshot();
            relay.shutdown().await.unwrap();
            let grown_mib = peak.saturating_sub(before) / 1024;
            eprintln!(
                "{} rows of {} MiB, max_batch_bytes 1 MiB: RSS before {before} KiB, peak {peak} KiB \
                 (+{grown_mib} MiB); relay {metrics:?}",
                2 * ROWS,
                ROW_BYTES >> 20
            );
            // Reading either half at once, as a claim or a hand-off read of
            // up to `batch_size` rows did, holds ROWS rows (128 MiB) of
            // payload. Read by the byte budget, a batch is one row; one on
            // the wire and one read ahead, each with its copies (the
            // driver's buffer, the frame being written), stay far below,
            // however many rows wait.
            let bound_mib = (ROWS * ROW_BYTES >> 20) as u64;
            assert!(
                grown_mib < bound_mib,
                "the relay grew by {grown_mib} MiB reading rows of {} MiB (bound {bound_mib} MiB)",
                ROW_BYTES >> 20
            );
        }
    };
}

mod sqlite {
    bytes_suite!(sqlx::Sqlite, support::sqlite);
}

mod postgres {
    bytes_suite!(sqlx::Postgres, support::postgres);
}

mod mysql {
    bytes_suite!(sqlx::MySql, support::mysql);
}
