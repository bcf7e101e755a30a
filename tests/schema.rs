//! Schema versions on SQLite, PostgreSQL and MySQL/MariaDB (modules `sqlite`,
//! `postgres`, `mysql`): a fresh table is created at the newest version (the
//! outbox at 2, the inbox at 3), a table left at version 1 is upgraded (the
//! retention indexes; on PostgreSQL and SQLite the inbox's partial indexes of
//! pending rows), also by two processes migrating at once, with its retry and
//! parked rows still found, and retention keeps deleting only old rows.

mod support;

use std::time::Duration;

use outbox::core::{Inbox, Outbox};

macro_rules! schema_suite {
    ($db:ty, $open:path, $count_index:literal) => {
        use super::*;

        type Db = $db;

        fn mysql() -> bool {
            <Db as outbox::core::Backend>::DIALECT.name == "MySQL"
        }

        /// The newest version of each table.
        const NEWEST: [(&str, i64); 2] = [("outbox_event", 2), ("inbox_event", 3)];

        /// Whether `table` has the index `{table}_{suffix}`; `$count_index`
        /// counts the indexes of a table (first bind) with a name (second bind).
        async fn index_exists(pool: &sqlx::Pool<Db>, table: &str, suffix: &str) -> bool {
            let n: i64 = sqlx::query_scalar($count_index)
                .bind(table)
                .bind(format!("{table}_{suffix}"))
                .fetch_one(pool)
                .await
                .unwrap();
            n == 1
        }

        /// The indexes a table has at its newest version, and those it no
        /// longer has.
        async fn assert_newest_indexes(pool: &sqlx::Pool<Db>) {
            assert!(index_exists(pool, "outbox_event", "retention").await);
            assert!(index_exists(pool, "inbox_event", "retention").await);
            // MySQL has no partial indexes and keeps the full ones of version 1.
            let (has, lacks) = if mysql() {
                (["process", "key"], ["pending", "pending_key"])
            } else {
                (["pending", "pending_key"], ["process", "key"])
            };
            for suffix in has {
                assert!(index_exists(pool, "inbox_event", suffix).await, "inbox_event_{suffix}");
            }
            for suffix in lacks {
                assert!(!index_exists(pool, "inbox_event", suffix).await, "inbox_event_{suffix}");
            }
        }

        async fn drop_index(pool: &sqlx::Pool<Db>, table: &str, suffix: &str) {
            let drop = if mysql() {
                format!("DROP INDEX {table}_{suffix} ON {table}")
            } else {
                format!("DROP INDEX {table}_{suffix}")
            };
            sqlx::raw_sql(&drop).execute(pool).await.unwrap();
        }

        async fn version(pool: &sqlx::Pool<Db>, table: &str) -> i64 {
            let sql = format!(
                "SELECT version FROM outbox_schema_version WHERE table_name = '{table}'"
            );
            sqlx::query_scalar(&sql)
                .fetch_one(pool)
                .await
                .unwrap()
        }

        /// Puts `table` back to version 1: without its retention index, and
        /// the inbox with the full indexes of pending rows instead of partial
        /// ones.
        async fn back_to_version_1(pool: &sqlx::Pool<Db>, table: &str) {
            drop_index(pool, table, "retention").await;
            if table == "inbox_event" && !mysql() {
                drop_index(pool, table, "pending").await;
                drop_index(pool, table, "pending_key").await;
                for sql in [
                    "CREATE INDEX inbox_event_process ON inbox_event (process, next_attempt_at)",
                    "CREATE INDEX inbox_event_key ON inbox_event (consumer, event_key, process)",
                ] {
                    sqlx::raw_sql(sql).execute(pool).await.unwrap();
                }
            }
            let sql = format!(
                "UPDATE outbox_schema_version SET version = 1 WHERE table_name = '{table}'"
            );
            sqlx::raw_sql(&sql).execute(pool).await.unwrap();
        }

        #[tokio::test]
        async fn fresh_tables_are_created_at_the_newest_version_with_its_indexes() {
            let Some(db) = $open().await else { return };
            let pool = db.pool().clone();
            Outbox::new(pool.clone()).migrate().await.unwrap();
            Inbox::new(pool.clone(), "points").unwrap().migrate().await.unwrap();
            for (table, newest) in NEWEST {
                assert_eq!(version(&pool, table).await, newest, "{table}");
            }
            assert_newest_indexes(&pool).await;
        }

        #[tokio::test]
        async fn tables_at_version_1_are_upgraded_even_by_two_processes_at_once() {
            let Some(db) = $open().await else { return };
            let pool = db.pool().clone();
            let outbox = Outbox::new(pool.clone());
            let inbox = Inbox::new(pool.clone(), "points").unwrap();
            outbox.migrate().await.unwrap();
            inbox.migrate().await.unwrap();
            for table in ["outbox_event", "inbox_event"] {
                back_to_version_1(&pool, table).await;
                assert!(!index_exists(&pool, table, "retention").await);
            }
            // Rows the indexes of pending rows must still find afterwards.
            for (event, process) in [("waiting", "RETRY"), ("parked", "FAILED"), ("done", "PROCESSED")] {
                let sql = format!(
                    "INSERT INTO inbox_event (consumer, event_id, event_key, process, attempts, \
                     next_attempt_at, create_time, update_time) \
                     VALUES ('points', '{event}', 'k', '{process}', 1, 0, 1, 1)"
                );
                sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
            }
            // Two pools stand for two processes starting together.
            let other = sqlx::pool::PoolOptions::<Db>::new()
                .max_connections(2)
                .connect(db.url())
                .await
                .unwrap();
            let (other_outbox, other_inbox) =
                (Outbox::new(other.clone()), Inbox::new(other.clone(), "points").unwrap());
            let (a, b, c, d) = tokio::join!(
                outbox.migrate(),
                other_outbox.migrate(),
                inbox.migrate(),
                other_inbox.migrate(),
            );
            for result in [a, b, c, d] {
                result.unwrap();
            }
            for (table, newest) in NEWEST {
                assert_eq!(version(&pool, table).await, newest, "{table}");
            }
            assert_newest_indexes(&pool).await;
            let parked: Vec<String> = inbox
                .parked(10)
                .await
                .unwrap()
                .into_iter()
                .map(|p| p.event_id)
                .collect();
            assert_eq!(parked, ["parked"]);
            assert_eq!(inbox.replay_all().await.unwrap(), 1);
            let counts = inbox.counts().await.unwrap();
            assert_eq!((counts.processed, counts.retry, counts.failed), (1, 2, 0));
            other.close().await;
        }

        #[tokio::test]
        async fn inbox_retention_deletes_only_old_processed_rows_of_its_consumer() {
            let Some(db) = $open().await else { return };
            let pool = db.pool().clone();
            let inbox = Inbox::new(pool.clone(), "points").unwrap();
            inbox.migrate().await.unwrap();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            let hour = 3_600_000;
            // (consumer, event, process, processed_time)
            let rows = [
                ("points", "old-1", "PROCESSED", Some(now - 48 * hour)),
                ("points", "old-2", "PROCESSED", Some(now - 30 * hour)),
                ("points", "new-1", "PROCESSED", Some(now - hour)),
                ("points", "parked", "FAILED", None),
                ("points", "waiting", "RETRY", None),
                ("audit", "old-3", "PROCESSED", Some(now - 48 * hour)),
            ];
            for (consumer, event, process, processed) in rows {
                let processed = processed.map_or("NULL".to_owned(), |t| t.to_string());
                let sql = format!(
                    "INSERT INTO inbox_event (consumer, event_id, process, attempts, \
                     create_time, update_time, processed_time) \
                     VALUES ('{consumer}', '{event}', '{process}', 1, {now}, {now}, {processed})"
                );
                sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
            }
            let day = Duration::from_secs(24 * 3600);
            assert_eq!(inbox.delete_processed(day, 1).await.unwrap(), 1);
            assert_eq!(inbox.delete_processed(day, 1000).await.unwrap(), 1);
            assert_eq!(inbox.delete_processed(day, 1000).await.unwrap(), 0);
            let left: Vec<(String, String)> =
                sqlx::query_as("SELECT consumer, event_id FROM inbox_event ORDER BY event_id")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            let left: Vec<(&str, &str)> =
                left.iter().map(|(c, e)| (c.as_str(), e.as_str())).collect();
            assert_eq!(
                left,
                vec![
                    ("points", "new-1"),
                    ("audit", "old-3"),
                    ("points", "parked"),
                    ("points", "waiting"),
                ]
            );
        }
    };
}

mod sqlite {
    schema_suite!(
        sqlx::Sqlite,
        support::sqlite,
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND name = ?"
    );
}

mod postgres {
    schema_suite!(
        sqlx::Postgres,
        support::postgres,
        "SELECT COUNT(*) FROM pg_indexes WHERE tablename = $1 AND indexname = $2"
    );
}

mod mysql {
    schema_suite!(
        sqlx::MySql,
        support::mysql,
        "SELECT COUNT(DISTINCT index_name) FROM information_schema.statistics \
         WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?"
    );
}
