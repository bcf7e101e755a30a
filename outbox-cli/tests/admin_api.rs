//! The library's admin calls the command is built on, on SQLite, PostgreSQL
//! and MySQL/MariaDB: parked outbox rows carry their payload,
//! `replay_many` replays only parked rows among the ids given (across more
//! than one statement), and `Inbox::consumers` lists the consumers of a table.

mod support;

use outbox_core::{Event, Inbox, Outbox};

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
