//! Schema versions on SQLite, PostgreSQL and MySQL/MariaDB (modules `sqlite`,
//! `postgres`, `mysql`): a fresh table is created at the newest version (the
//! outbox at 7, the inbox at 5), a table left at version 1 is upgraded (the
//! retention indexes; the outbox's key partitions, its index of unpublished
//! rows by key and, on PostgreSQL, of waiting rows, and the index of every
//! row by key gone; on PostgreSQL and SQLite the inbox's partial indexes of
//! pending rows; on MySQL the inbox's binary dedup columns and unpadded
//! event id), also by two
//! processes migrating at once, with its retry and parked rows still found,
//! and retention keeps deleting only old rows. On PostgreSQL and MySQL a
//! migration behind another session's table lock or another process's
//! migration lock gives up with a typed error, and one abandoned while it
//! holds the migration lock leaves no lock behind.
//!
//! The crash test re-runs this binary as a child process (the `#[ignore]`d
//! `child_migrate` test) that migrates with the failpoint
//! `schema.after_statement` armed, so it dies by SIGKILL after a chosen
//! statement of a step, before the step's version is recorded.

mod support;

use std::time::Duration;

use outbox::core::{Error, Inbox, Outbox};
use support::{child_var, run_child};

macro_rules! schema_suite {
    ($db:ty, $open:path, $count_index:literal) => {
        use super::*;

        type Db = $db;

        fn mysql() -> bool {
            <Db as outbox::core::Backend>::DIALECT.name == "MySQL"
        }

        fn postgres() -> bool {
            <Db as outbox::core::Backend>::DIALECT.name == "PostgreSQL"
        }

        /// The newest version of each table.
        const NEWEST: [(&str, i64); 2] = [("outbox_event", 7), ("inbox_event", 5)];

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
            assert!(index_exists(pool, "outbox_event", "open_key").await);
            // Version 7 dropped version 1's index of every row by key.
            assert!(!index_exists(pool, "outbox_event", "key").await);
            assert_eq!(index_exists(pool, "outbox_event", "waiting").await, postgres());
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
            // Versions 4 and 5: the dedup columns compare byte for byte on
            // MySQL, the event id without padding (`VARBINARY`).
            if mysql() {
                let columns: Vec<(String, String, Option<String>)> = sqlx::query_as(
                    "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(COLLATION_NAME AS CHAR) \
                     FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
                     AND TABLE_NAME = 'inbox_event' AND COLUMN_NAME IN ('consumer', 'event_id') \
                     ORDER BY COLUMN_NAME",
                )
                .fetch_all(pool)
                .await
                .unwrap();
                assert_eq!(
                    columns,
                    [
                        ("consumer".to_owned(), "varchar".to_owned(), Some("utf8mb4_bin".to_owned())),
                        ("event_id".to_owned(), "varbinary".to_owned(), None)
                    ]
                );
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
            if table == "outbox_event" {
                drop_index(pool, table, "open_key").await;
                if postgres() {
                    drop_index(pool, table, "waiting").await;
                }
                // Version 1's index of every row by key, which version 7 drops.
                sqlx::raw_sql("CREATE INDEX outbox_event_key ON outbox_event (event_key, id)")
                    .execute(pool)
                    .await
                    .unwrap();
                // Version 4's key partitions.
                sqlx::raw_sql("ALTER TABLE outbox_event DROP COLUMN partition_no")
                    .execute(pool)
                    .await
                    .unwrap();
            }
            if table == "inbox_event" && mysql() {
                // Version 1's dedup columns, in the table's default collation.
                sqlx::raw_sql(
                    "ALTER TABLE inbox_event MODIFY consumer VARCHAR(128) NOT NULL, \
                     MODIFY event_id VARCHAR(64) NOT NULL",
                )
                .execute(pool)
                .await
                .unwrap();
            }
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
            // The relay's statements that name an index (SQLite's `INDEXED
            // BY`, MySQL's `FORCE INDEX`) find it on the upgraded table.
            let now = i64::MAX / 2;
            sqlx::query(&outbox.due_probe_statement())
                .bind(now).bind(now).bind(0_i64).bind(64_i64)
                .fetch_all(&pool).await.unwrap();
            sqlx::query(&outbox.claim_statement())
                .bind(now).bind(now).bind(0_i64).bind(64_i64).bind(10_i64)
                .fetch_all(&pool).await.unwrap();
            sqlx::query(&outbox.key_order_statement(2))
                .bind(1000_i64).bind("k").bind("other")
                .fetch_all(&pool).await.unwrap();
            sqlx::query(&outbox.handoff_statement())
                .bind("relay").bind(now).bind(10_i64)
                .fetch_all(&pool).await.unwrap();
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

        /// A session that holds `inbox_event` in an open transaction, as an
        /// idle-in-transaction session of an application does: on PostgreSQL
        /// an exclusive table lock, on MySQL the shared metadata lock of a
        /// read, which DDL on the table waits for.
        async fn hold_inbox_table(url: &str) -> sqlx::Transaction<'static, Db> {
            let pool = sqlx::pool::PoolOptions::<Db>::new()
                .max_connections(1)
                .connect(url)
                .await
                .unwrap();
            let mut tx = pool.begin().await.unwrap();
            let hold = if postgres() {
                "LOCK TABLE inbox_event IN ACCESS EXCLUSIVE MODE"
            } else {
                "SELECT COUNT(*) FROM inbox_event"
            };
            sqlx::raw_sql(hold).execute(&mut *tx).await.unwrap();
            tx
        }

        #[tokio::test]
        async fn a_migration_behind_another_sessions_table_lock_gives_up_with_a_typed_error() {
            if !postgres() && !mysql() {
                return;
            }
            let Some(db) = $open().await else { return };
            let inbox = Inbox::new(db.pool().clone(), "points").unwrap();
            inbox.migrate().await.unwrap();
            back_to_version_1(db.pool(), "inbox_event").await;
            let blocker = hold_inbox_table(db.url()).await;
            let short = Duration::from_secs(2);
            let migrated = tokio::time::timeout(Duration::from_secs(60), inbox.migrate_with(short))
                .await
                .expect("migrate() must give up, not wait for ever");
            match migrated {
                Err(Error::MigrationTimeout { table, waiting_for, after }) => {
                    assert_eq!((table.as_str(), after), ("inbox_event", short));
                    assert!(waiting_for.contains("open transaction"), "{waiting_for}");
                }
                other => panic!("expected a migration timeout, got {other:?}"),
            }
            blocker.rollback().await.unwrap();
            inbox.migrate().await.unwrap();
            assert_eq!(version(db.pool(), "inbox_event").await, NEWEST[1].1);
        }

        #[tokio::test]
        async fn a_migration_behind_another_process_holding_the_migration_lock_gives_up_with_a_typed_error() {
            if !postgres() && !mysql() {
                return;
            }
            let Some(db) = $open().await else { return };
            let inbox = Inbox::new(db.pool().clone(), "points").unwrap();
            inbox.migrate().await.unwrap();
            // Another process migrating holds the lock in its own session.
            let mut holder = <<Db as sqlx::Database>::Connection as sqlx::Connection>::connect(db.url())
                .await
                .unwrap();
            // The migration above ends its session to release the lock, and the
            // server may finish that session a moment later: wait for the lock
            // rather than try it once, and check that it is held.
            let take = if postgres() {
                "SELECT CAST(1 AS BIGINT) FROM (SELECT pg_advisory_lock(7305093410471135041)) AS taken"
            } else {
                "SELECT CAST(GET_LOCK(CONCAT('outbox_migrate.', MD5(DATABASE())), 30) AS SIGNED)"
            };
            let held: i64 = sqlx::query_scalar(take).fetch_one(&mut holder).await.unwrap();
            assert_eq!(held, 1, "the test's session must hold the migration lock");
            let short = Duration::from_millis(500);
            let migrated = tokio::time::timeout(Duration::from_secs(60), inbox.migrate_with(short))
                .await
                .expect("migrate() must give up, not wait for ever");
            match migrated {
                Err(Error::MigrationTimeout { table, waiting_for, after }) => {
                    assert_eq!((table.as_str(), after), ("inbox_event", short));
                    assert!(waiting_for.contains("migration lock"), "{waiting_for}");
                }
                other => panic!("expected a migration timeout, got {other:?}"),
            }
            sqlx::Connection::close(holder).await.unwrap();
            inbox.migrate_with(short).await.unwrap();
        }

        #[tokio::test]
        async fn a_migration_abandoned_while_it_holds_the_migration_lock_leaves_no_lock_behind() {
            if !postgres() && !mysql() {
                return;
            }
            let Some(db) = $open().await else { return };
            let inbox = Inbox::new(db.pool().clone(), "points").unwrap();
            inbox.migrate().await.unwrap();
            back_to_version_1(db.pool(), "inbox_event").await;
            let blocker = hold_inbox_table(db.url()).await;
            // It takes the migration lock, then waits behind the blocker
            // until its caller gives up on it.
            let abandoned = tokio::time::timeout(Duration::from_secs(2), inbox.migrate()).await;
            assert!(abandoned.is_err(), "still waiting behind the blocker");
            blocker.rollback().await.unwrap();
            // Another process migrates: the lock is not held for ever by a
            // session parked in the first process's pool.
            let other = sqlx::pool::PoolOptions::<Db>::new()
                .max_connections(1)
                .connect(db.url())
                .await
                .unwrap();
            let migrated = tokio::time::timeout(
                Duration::from_secs(60),
                Inbox::new(other.clone(), "points").unwrap().migrate(),
            )
            .await
            .expect("the abandoned migration's lock was never given back");
            migrated.unwrap();
            assert_eq!(version(&other, "inbox_event").await, NEWEST[1].1);
            // The first process still works too.
            inbox.migrate().await.unwrap();
            other.close().await;
        }

        /// Migrates `table` (the outbox or the inbox of `points`) on `pool`.
        async fn migrate(pool: &sqlx::Pool<Db>, table: &str) -> Result<(), outbox::core::Error> {
            if table == "outbox_event" {
                Outbox::new(pool.clone()).migrate().await
            } else {
                Inbox::new(pool.clone(), "points")?.migrate().await
            }
        }

        /// Version 3 stores outbox headers as `[name, value]` pairs, as the
        /// inbox does; rows a version 2 producer wrote as an object are
        /// rewritten before the version is recorded.
        #[tokio::test]
        async fn headers_written_as_an_object_before_version_3_are_rewritten_as_pairs() {
            let Some(db) = $open().await else { return };
            let pool = db.pool().clone();
            let outbox = Outbox::new(pool.clone());
            outbox.migrate().await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            let mut ids = Vec::new();
            for n in 0..3 {
                let event = outbox::core::Event::json("t", "/queue/x", &n).unwrap().with_header("z", "last");
                ids.push(outbox.append(&mut tx, event).await.unwrap());
            }
            // More than one batch of the rewrite (500 rows) in the old shape.
            for n in 0..600 {
                let event = outbox::core::Event::json("t", "/queue/x", &n).unwrap();
                outbox.append(&mut tx, event).await.unwrap();
            }
            tx.commit().await.unwrap();
            let stored = |id: &uuid::Uuid| {
                let pool = pool.clone();
                let sql = format!("SELECT headers FROM outbox_event WHERE event_id = '{id}'");
                async move { sqlx::query_scalar::<_, String>(&sql).fetch_one(&pool).await.unwrap() }
            };
            assert_eq!(stored(&ids[2]).await, r#"[["z","last"]]"#, "new rows are pairs");
            // As a version 2 producer wrote them.
            let sql = format!(
                "UPDATE outbox_event SET headers = '{{\"a\":\"1\"}}' WHERE event_id NOT IN ('{}', '{}', '{}')",
                ids[0], ids[1], ids[2]
            );
            assert_eq!(sqlx::raw_sql(&sql).execute(&pool).await.unwrap().rows_affected(), 600);
            for (id, legacy) in [(&ids[0], r#"{"tenant":"acme","b":"2"}"#), (&ids[1], "{}")] {
                let sql = format!("UPDATE outbox_event SET headers = '{legacy}' WHERE event_id = '{id}'");
                sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
            }
            sqlx::raw_sql("UPDATE outbox_schema_version SET version = 2 WHERE table_name = 'outbox_event'")
                .execute(&pool)
                .await
                .unwrap();
            outbox.migrate().await.unwrap();
            assert_eq!(version(&pool, "outbox_event").await, 7);
            assert_eq!(stored(&ids[0]).await, r#"[["b","2"],["tenant","acme"]]"#);
            assert_eq!(stored(&ids[1]).await, "[]");
            assert_eq!(stored(&ids[2]).await, r#"[["z","last"]]"#, "left as it was");
            let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox_event WHERE headers LIKE '{%'")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(left, 0, "every batch rewritten");
        }

        #[tokio::test]
        async fn a_migration_killed_after_any_statement_of_a_step_is_finished_by_the_next() {
            let Some(db) = $open().await else { return };
            let pool = db.pool().clone();
            for (table, _) in NEWEST {
                migrate(&pool, table).await.unwrap();
            }
            let child = concat!(module_path!(), "::child_migrate");
            let child = child.split_once("::").map_or(child, |(_, rest)| rest);
            for (table, newest) in NEWEST {
                // Kill the child after its first statement, then its second…
                // until it has fewer statements to run and finishes.
                let mut at = 0;
                loop {
                    at += 1;
                    assert!(at <= 10, "{table}: the child was still killed at statement {at}");
                    back_to_version_1(&pool, table).await;
                    let env = [
                        ("OUTBOX_FAILPOINT", format!("schema.after_statement@{at}")),
                        ("OUTBOX_TEST_DB_URL", db.url().to_owned()),
                        ("OUTBOX_TEST_TABLE", table.to_owned()),
                    ];
                    let (killed, stderr) = run_child(child, &env, Duration::from_secs(60)).await;
                    if !killed {
                        assert!(at > 1, "{table}: the child was never killed: {stderr}");
                        assert_eq!(version(&pool, table).await, newest, "{table}: {stderr}");
                        break;
                    }
                    assert!(version(&pool, table).await < newest, "{table}, statement {at}");
                    if at == 1 {
                        // Version 2's index is built, the version not recorded:
                        // the next start runs the step again.
                        assert!(index_exists(&pool, table, "retention").await, "{table}");
                        assert_eq!(version(&pool, table).await, 1, "{table}");
                    }
                    if let Err(error) = migrate(&pool, table).await {
                        panic!("{table}: migrating after a kill at statement {at}: {error}");
                    }
                    assert_eq!(version(&pool, table).await, newest, "{table}, statement {at}");
                    assert_newest_indexes(&pool).await;
                }
            }
        }

        #[tokio::test]
        #[ignore = "child process of a_migration_killed_after_any_statement_of_a_step_is_finished_by_the_next"]
        async fn child_migrate() {
            let (Some(url), Some(table)) =
                (child_var("OUTBOX_TEST_DB_URL"), child_var("OUTBOX_TEST_TABLE"))
            else {
                return;
            };
            let pool = sqlx::Pool::<Db>::connect(&url).await.unwrap();
            migrate(&pool, &table).await.unwrap();
        }

        /// An inbox at version 4, with rows, upgraded to version 5: on MySQL
        /// the event id becomes `VARBINARY`, the rows keep their ids (read
        /// back as text, UTF-8 included), and an id differing from a
        /// recorded one only in trailing spaces is a new event, where
        /// version 4's padded collation took it for a duplicate.
        #[tokio::test]
        async fn inbox_rows_of_version_4_keep_their_ids_and_trailing_spaces_count_from_version_5() {
            let Some(db) = $open().await else { return };
            let pool = db.pool().clone();
            let inbox = Inbox::new(pool.clone(), "points").unwrap();
            inbox.migrate().await.unwrap();
            if mysql() {
                sqlx::raw_sql(
                    "ALTER TABLE inbox_event MODIFY event_id VARCHAR(64) \
                     CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL",
                )
                .execute(&pool)
                .await
                .unwrap();
            }
            sqlx::raw_sql("UPDATE outbox_schema_version SET version = 4 WHERE table_name = 'inbox_event'")
                .execute(&pool)
                .await
                .unwrap();
            let insert = |event: &str, process: &str| {
                format!(
                    "INSERT INTO inbox_event (consumer, event_id, process, attempts, last_error, \
                     content, create_time, update_time) \
                     VALUES ('points', '{event}', '{process}', 1, 'parked', NULL, 1, 1)"
                )
            };
            for (event, process) in [("abc", "PROCESSED"), ("naïve-é", "FAILED")] {
                sqlx::raw_sql(&insert(event, process)).execute(&pool).await.unwrap();
            }
            if mysql() {
                // Version 4 pads: `abc ` is taken for `abc`.
                let refused = sqlx::raw_sql(&insert("abc ", "PROCESSED")).execute(&pool).await;
                assert!(refused.is_err(), "version 4 took `abc ` for `abc`");
            }
            inbox.migrate().await.unwrap();
            assert_eq!(version(&pool, "inbox_event").await, NEWEST[1].1);
            if mysql() {
                let kind: String = sqlx::query_scalar(
                    "SELECT CAST(DATA_TYPE AS CHAR) FROM information_schema.COLUMNS \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'inbox_event' \
                     AND COLUMN_NAME = 'event_id'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                assert_eq!(kind, "varbinary");
            }
            let parked = inbox.parked(10).await.unwrap();
            assert_eq!(parked.len(), 1);
            assert_eq!(parked[0].event_id, "naïve-é");
            sqlx::raw_sql(&insert("abc ", "PROCESSED")).execute(&pool).await.unwrap();
            let duplicate = sqlx::raw_sql(&insert("abc", "PROCESSED")).execute(&pool).await;
            assert!(duplicate.is_err(), "`abc` is still recorded once");
            assert_eq!(inbox.counts().await.unwrap().processed, 2);
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
                // MySQL reports the binary-collated dedup columns as
                // VARBINARY, which sqlx decodes as bytes only.
                sqlx::query_as(if mysql() {
                    "SELECT CAST(consumer AS CHAR), CAST(event_id AS CHAR) FROM inbox_event ORDER BY event_id"
                } else {
                    "SELECT consumer, event_id FROM inbox_event ORDER BY event_id"
                })
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
