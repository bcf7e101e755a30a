//! Versioned events through a real broker: a producer sends version 2 of
//! `user.created` (`version = 2`), older services still send version 1 (no
//! header), and a newer one already sends version 3. The consumer reads
//! version 2 and converts version 1 (`upcast(v1 = …)`); version 3 is parked
//! with its reason, unapplied, and can be replayed once a consumer reads it.

mod support;

use std::time::Duration;

use outbox::core::relay::StompPublisher;
use outbox::core::{Backoff, ConsumerConfig, Event, Outbox, RelayConfig};
use outbox::transactional_event;
use serde::{Deserialize, Serialize};
use sqlx::Transaction;
use support::*;

const TOPIC: &str = "/topic/VirtualTopic.versions.user.created";
const QUEUE: &str = "/queue/Consumer.points.VirtualTopic.versions.user.created";

/// Version 1: one `name`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserCreatedV1 {
    user_id: i64,
    name: String,
}

/// Version 2: `name` renamed `full_name`, and a new `email`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserCreated {
    user_id: i64,
    full_name: String,
    email: Option<String>,
}

impl From<UserCreatedV1> for UserCreated {
    fn from(v1: UserCreatedV1) -> Self {
        UserCreated {
            user_id: v1.user_id,
            full_name: v1.name,
            email: None,
        }
    }
}

fn fast_relay() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_millis(50))
        .with_lease(Duration::from_secs(5))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
}

macro_rules! versions_suite {
    ($db:ty, $open:path) => {
        use super::*;

        /// Today's producer: version 2.
        #[transactional_event(
            destination = "/topic/VirtualTopic.versions.user.created",
            event_type = "user.created",
            key = event.user_id,
            version = 2
        )]
        async fn create_user(
            tx: &mut Transaction<'_, $db>,
            user_id: i64,
            full_name: &str,
        ) -> Result<UserCreated, outbox::core::Error> {
            let _ = tx;
            Ok(UserCreated {
                user_id,
                full_name: full_name.to_owned(),
                email: Some(format!("{user_id}@example.com")),
            })
        }

        /// Applies version 2, and version 1 through `From<UserCreatedV1>`.
        #[transactional_event(
            consumer = "points",
            destination = "/queue/Consumer.points.VirtualTopic.versions.user.created",
            version = 2,
            upcast(v1 = UserCreatedV1)
        )]
        async fn welcome(
            tx: &mut Transaction<'_, $db>,
            event: UserCreated,
        ) -> Result<(), sqlx::Error> {
            sqlx::query(&format!(
                "INSERT INTO welcomed (user_id, full_name, email) VALUES ({}, '{}', '{}')",
                event.user_id,
                event.full_name,
                event.email.as_deref().unwrap_or("-"),
            ))
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        /// An event as an older or a newer service sends it.
        async fn send(outbox: &Outbox<$db>, pool: &sqlx::Pool<$db>, event: Event) {
            let mut tx = pool.begin().await.unwrap();
            outbox.append(&mut tx, event).await.unwrap();
            outbox.commit(tx).await.unwrap();
        }

        #[tokio::test]
        async fn versions_one_and_two_are_applied_through_the_conversion_and_three_is_parked() {
            let Some(db) = $open().await else { return };
            let pool = db.pool().clone();
            let outbox = Outbox::new(pool.clone());
            outbox.migrate().await.unwrap();
            let inbox = Welcome::inbox(pool.clone()).unwrap();
            inbox.migrate().await.unwrap();
            sqlx::query(
                "CREATE TABLE welcomed (user_id BIGINT NOT NULL, full_name VARCHAR(100) NOT NULL, \
                 email VARCHAR(100) NOT NULL)",
            )
            .execute(&pool)
            .await
            .unwrap();
            let broker = broker().await;
            let config = ConsumerConfig::new(QUEUE)
                .with_retry_poll(Duration::from_millis(50))
                .with_retry_backoff(Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_millis(200),
                ));
            let consumer = Welcome::consumer_with(pool.clone(), config)
                .unwrap()
                .spawn(client(&broker).await)
                .await
                .unwrap();
            let relay = outbox
                .relay(StompPublisher::new(client(&broker).await), fast_relay())
                .expect("valid settings")
                .spawn();

            // Version 1, as a service deployed before versions sends it: no header.
            let v1 = UserCreatedV1 { user_id: 1, name: "Ada Lovelace".into() };
            send(&outbox, &pool, Event::json("user.created", TOPIC, &v1).unwrap().with_key("1")).await;
            // Version 2, through the macro's producer.
            let mut tx = pool.begin().await.unwrap();
            create_user(&mut tx, 2, "Grace Hopper").await.unwrap();
            tx.commit().await.unwrap();
            outbox.wake();
            // Version 3, from a service newer than this consumer.
            let v3 = serde_json::json!({ "user_id": 3, "given": "Edsger", "family": "Dijkstra" });
            let v3 = Event::json("user.created", TOPIC, &v3).unwrap().with_key("3").with_version(3);
            let v3_id = v3.id().to_string();
            send(&outbox, &pool, v3).await;

            let settled = eventually(Duration::from_secs(60), || async {
                let counts = consumer.metrics().snapshot();
                counts.processed == 2 && counts.failed == 1
            })
            .await;
            assert!(settled, "not settled: {:?}", consumer.metrics().snapshot());

            let mut welcomed: Vec<(i64, String, String)> =
                sqlx::query_as("SELECT user_id, full_name, email FROM welcomed")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            welcomed.sort();
            assert_eq!(
                welcomed,
                [
                    (1, "Ada Lovelace".to_owned(), "-".to_owned()),
                    (2, "Grace Hopper".to_owned(), "2@example.com".to_owned()),
                ]
            );
            let parked = inbox.parked(10).await.unwrap();
            assert_eq!(parked.len(), 1, "{parked:?}");
            assert_eq!(parked[0].event_id, v3_id);
            let reason = parked[0].last_error.clone().unwrap_or_default();
            assert!(
                reason.contains("version 3 of event type user.created")
                    && reason.contains("versions 1, 2"),
                "{reason}"
            );
            // Parked with its bytes: a consumer that reads version 3 can replay it.
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&parked[0].content).unwrap()["family"],
                "Dijkstra"
            );

            relay.shutdown().await.unwrap();
            consumer.shutdown().await.unwrap();
        }
    };
}

mod sqlite {
    versions_suite!(sqlx::Sqlite, support::sqlite);
}

mod postgres {
    versions_suite!(sqlx::Postgres, support::postgres);
}

mod mysql {
    versions_suite!(sqlx::MySql, support::mysql);
}
