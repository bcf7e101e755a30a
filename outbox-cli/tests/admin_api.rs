//! The library's admin calls the command is built on, on SQLite, PostgreSQL
//! and MySQL/MariaDB: parked outbox rows carry their payload,
//! `replay_many` replays only parked rows among the ids given (across more
//! than one statement), `Inbox::consumers` lists the consumers of a table,
//! and both tables' parked rows answer one interface (`ParkedRows`).

mod support;

use outbox_core::admin::{Parked, ParkedRows};
use outbox_core::{Event, Inbox, Outbox};

/// What a tool written once for both tables sees of `side`: its parked
/// rows, then the same after discarding the first and replaying the rest.
async fn through_the_interface(side: &impl ParkedRows) -> (Vec<Parked>, u64, u64, u64, u64) {
    let rows = side.list_parked(10).await.unwrap();
    let ids = side.parked_ids().await.unwrap();
    assert_eq!(
        ids,
        rows.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>()
    );
    let discarded = side.discard_many(&ids[..1]).await.unwrap();
    let replayed = side.replay_many(&ids).await.unwrap();
    let again = u64::from(side.replay(&ids[0]).await.unwrap());
    (
        rows,
        discarded,
        replayed,
        again,
        side.count_parked().await.unwrap(),
    )
}

macro_rules! admin_suite {
    ($db:ty, $open:path, $dollar:expr) => {
        use super::*;
        use crate::support::placeholders;

        type Db = $db;

        async fn park_all(pool: &sqlx::Pool<Db>) {
            sqlx::query("UPDATE outbox_event SET process = 'FAILED', attempts = 3")
                .execute(pool)
                .await
                .unwrap();
        }

        #[tokio::test]
        async fn parked_events_carry_their_payload_and_replay_many_skips_other_ids() {
            let Some(db) = $open().await else { return };
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            let mut tx = db.pool().begin().await.unwrap();
            let mut events = vec![Event::raw(
                "blob",
                "/queue/a",
                vec![0u8, 1, 255],
                "application/octet-stream",
            )];
            // More than one statement's worth of ids (500 a statement).
            for i in 0..700 {
                events.push(Event::json("n", "/queue/a", &i).unwrap());
            }
            let ids: Vec<String> = outbox
                .append_all(&mut tx, &events)
                .await
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect();
            outbox.commit(tx).await.unwrap();
            park_all(db.pool()).await;

            let parked = outbox.parked(1000).await.unwrap();
            assert_eq!(parked.len(), 701);
            assert_eq!(parked[0].content, vec![0u8, 1, 255]);
            assert_eq!(parked[0].content_type, "application/octet-stream");
            assert_eq!(parked[1].content, b"0");
            assert_eq!(parked[700].content, b"699");
            assert_eq!(parked[700].content_type, "application/json");

            let mut wanted: Vec<&str> = ids[..600].iter().map(String::as_str).collect();
            wanted.push("no-such-id");
            assert_eq!(outbox.replay_many(&wanted).await.unwrap(), 600);
            assert_eq!(
                outbox.replay_many(&wanted).await.unwrap(),
                0,
                "no longer parked"
            );
            let backlog = outbox.backlog().await.unwrap();
            assert_eq!((backlog.pending, backlog.parked), (600, 101));
            assert_eq!(outbox.replay_many::<&str>(&[]).await.unwrap(), 0);
        }

        #[tokio::test]
        async fn inbox_consumers_are_listed_and_replay_many_is_per_consumer() {
            let Some(db) = $open().await else { return };
            let inbox = Inbox::new(db.pool().clone(), "points").unwrap();
            inbox.migrate().await.unwrap();
            assert!(
                Inbox::consumers(db.pool(), "inbox_event")
                    .await
                    .unwrap()
                    .is_empty()
            );
            for (consumer, id) in [
                ("points", "e-1"),
                ("points", "e-2"),
                ("audit", "e-1"),
                ("b.c-d", "e-9"),
            ] {
                sqlx::query(&placeholders(
                    "INSERT INTO inbox_event (consumer, event_id, process, attempts, content, \
                     create_time, update_time) VALUES (?, ?, 'FAILED', 5, ?, 1, 1)",
                    $dollar,
                ))
                .bind(consumer)
                .bind(id)
                .bind(b"{}".to_vec())
                .execute(db.pool())
                .await
                .unwrap();
            }
            assert_eq!(
                Inbox::consumers(db.pool(), "inbox_event").await.unwrap(),
                ["audit", "b.c-d", "points"]
            );
            assert!(matches!(
                Inbox::consumers(db.pool(), "inbox; --").await,
                Err(outbox_core::Error::InvalidName { .. })
            ));
            assert_eq!(inbox.replay_many(&["e-1", "e-2", "e-9"]).await.unwrap(), 2);
            let audit = Inbox::new(db.pool().clone(), "audit").unwrap();
            assert_eq!(
                audit.counts().await.unwrap().failed,
                1,
                "another consumer's rows stay"
            );
            assert_eq!(inbox.counts().await.unwrap().retry, 2);
        }

        #[tokio::test]
        async fn both_tables_parked_rows_answer_one_interface() {
            let Some(db) = $open().await else { return };
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            let mut tx = db.pool().begin().await.unwrap();
            let events = [
                Event::json("a", "/queue/a", &1).unwrap().with_key("k"),
                Event::json("b", "/queue/a", &2).unwrap(),
            ];
            outbox.append_all(&mut tx, &events).await.unwrap();
            outbox.commit(tx).await.unwrap();
            park_all(db.pool()).await;
            let (rows, discarded, replayed, again, left) = through_the_interface(&outbox).await;
            assert_eq!(rows.len(), 2);
            assert_eq!(rows[0].event_type.as_deref(), Some("a"));
            assert_eq!(rows[0].destination.as_deref(), Some("/queue/a"));
            assert_eq!(rows[0].key.as_deref(), Some("k"));
            assert_eq!(rows[0].content_type.as_deref(), Some("application/json"));
            assert_eq!(rows[0].content, b"1");
            assert_eq!((discarded, replayed, again, left), (1, 1, 0, 0));
            let counts = outbox.counts().await.unwrap();
            assert_eq!((counts.new, counts.failed, counts.total()), (1, 0, 1));

            let inbox = Inbox::new(db.pool().clone(), "points").unwrap();
            inbox.migrate().await.unwrap();
            for id in ["e-1", "e-2"] {
                sqlx::query(&placeholders(
                    "INSERT INTO inbox_event (consumer, event_id, event_type, process, attempts, \
                     content, create_time, update_time) VALUES ('points', ?, 't', 'FAILED', 5, ?, 1, 2)",
                    $dollar,
                ))
                .bind(id)
                .bind(b"{}".to_vec())
                .execute(db.pool())
                .await
                .unwrap();
            }
            let (rows, discarded, replayed, again, left) = through_the_interface(&inbox).await;
            assert_eq!(rows.len(), 2);
            assert_eq!(rows[0].event_id, "e-1");
            assert_eq!((rows[0].destination.as_ref(), rows[0].content_type.as_ref()), (None, None));
            assert_eq!((rows[0].attempts, rows[0].update_time), (5, 2));
            assert_eq!((discarded, replayed, again, left), (1, 1, 0, 0));
            let counts = inbox.counts().await.unwrap();
            assert_eq!((counts.retry, counts.failed), (1, 0));
        }
    };
}

mod sqlite {
    admin_suite!(sqlx::Sqlite, crate::support::sqlite, false);
}

mod postgres {
    admin_suite!(sqlx::Postgres, crate::support::postgres, true);
}

mod mysql {
    admin_suite!(sqlx::MySql, crate::support::mysql, false);
}
