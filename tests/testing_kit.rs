//! The test kit (`outbox::testing`, feature `testing`) on SQLite and
//! PostgreSQL, without a broker: what producers appended and that it rolls
//! back with their transaction; handlers run through the consumer on
//! scripted deliveries — duplicates, out of order, failing transactions,
//! parked events. Also producers whose error type is `sqlx::Error` or
//! converts only from it. Run one database's tests with e.g.
//! `cargo nextest run --all-features --test testing_kit postgres::`.

use outbox::core::testing::{self, Flaky, TestConsumer, appended};
use outbox::core::{Delivery, Outbox};
use outbox::transactional_event;
use serde::{Deserialize, Serialize};
use sqlx::Transaction;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: i64,
    customer: String,
}

/// An application error that knows `sqlx::Error` and nothing of the outbox.
#[derive(Debug)]
enum ShopError {
    Database(sqlx::Error),
    OutOfStock,
}

impl From<sqlx::Error> for ShopError {
    fn from(e: sqlx::Error) -> Self {
        ShopError::Database(e)
    }
}

macro_rules! kit_suite {
    ($db:ty, $open:expr, $insert_order:literal, $insert_shipment:literal) => {
        use super::*;

        type Db = $db;

        /// Places orders: one event per order, keyed by customer, with a header.
        #[transactional_event(
            destination = "/topic/VirtualTopic.order.placed",
            event_type = "order.placed",
            key = event.customer,
            headers(source = "shop")
        )]
        async fn place_orders(
            tx: &mut Transaction<'_, Db>,
            orders: Vec<(i64, &str)>,
        ) -> Result<Vec<OrderPlaced>, sqlx::Error> {
            let mut placed = Vec::new();
            for (order_id, customer) in orders {
                sqlx::query($insert_order)
                    .bind(order_id)
                    .execute(&mut **tx)
                    .await?;
                placed.push(OrderPlaced {
                    order_id,
                    customer: customer.to_owned(),
                });
            }
            Ok(placed)
        }

        /// The pool form with an error that converts only from `sqlx::Error`.
        #[transactional_event(
            pool,
            destination = "/topic/VirtualTopic.order.placed",
            event_type = "order.placed",
            key = event.customer
        )]
        async fn place_order(
            tx: &mut Transaction<'_, Db>,
            order_id: i64,
            customer: String,
        ) -> Result<OrderPlaced, ShopError> {
            if order_id < 0 {
                return Err(ShopError::OutOfStock);
            }
            sqlx::query($insert_order)
                .bind(order_id)
                .execute(&mut **tx)
                .await?;
            Ok(OrderPlaced { order_id, customer })
        }

        /// Ships each order once.
        #[transactional_event(
            consumer = "shipping",
            destination = "/queue/Consumer.shipping.VirtualTopic.order.placed"
        )]
        async fn ship(tx: &mut Transaction<'_, Db>, event: OrderPlaced) -> Result<(), sqlx::Error> {
            sqlx::query($insert_shipment)
                .bind(event.order_id)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }

        async fn setup() -> Option<(outbox_test_harness::TestDb<Db>, Outbox<Db>)> {
            let db = $open.await?;
            let pool = db.pool().clone();
            for ddl in [
                "CREATE TABLE orders (id BIGINT PRIMARY KEY)",
                "CREATE TABLE shipments (order_id BIGINT NOT NULL)",
            ] {
                sqlx::query(ddl).execute(&pool).await.expect("create table");
            }
            let outbox = Outbox::new(pool.clone());
            outbox.migrate().await.expect("outbox migrate");
            Ship::inbox(pool).expect("inbox").migrate().await.expect("inbox migrate");
            Some((db, outbox))
        }

        async fn shipments(pool: &sqlx::Pool<Db>) -> Vec<i64> {
            sqlx::query_scalar("SELECT order_id FROM shipments ORDER BY order_id")
                .fetch_all(pool)
                .await
                .expect("shipments")
        }

        #[tokio::test]
        async fn a_producers_events_are_read_in_order_and_roll_back_with_its_transaction() {
            let Some((db, outbox)) = setup().await else { return };
            let pool = db.pool();
            let mut tx = pool.begin().await.unwrap();
            place_orders(&mut tx, vec![(1, "ada"), (2, "bob")]).await.unwrap();
            place_orders(&mut tx, vec![(3, "ada")]).await.unwrap();
            let events = appended(&mut tx).await.unwrap();
            let orders: Vec<OrderPlaced> = events.iter().map(|e| e.json().unwrap()).collect();
            assert_eq!(
                orders.iter().map(|o| o.order_id).collect::<Vec<_>>(),
                [1, 2, 3],
                "in the order appended"
            );
            assert_eq!(orders[1].customer, "bob");
            let keys: Vec<Option<&str>> = events.iter().map(|e| e.key.as_deref()).collect();
            assert_eq!(keys, [Some("ada"), Some("bob"), Some("ada")]);
            for event in &events {
                assert_eq!(event.event_type, "order.placed");
                assert_eq!(event.destination, "/topic/VirtualTopic.order.placed");
                assert_eq!(event.header("source"), Some("shop"));
                assert_eq!(event.content_type, "application/json");
            }
            tx.rollback().await.unwrap();
            assert!(appended(pool).await.unwrap().is_empty(), "gone with the rollback");

            // Committed, they stay; the pool form commits by itself.
            let placed = place_order(pool, 4, "cy".into()).await.unwrap();
            assert_eq!(placed.order_id, 4);
            assert!(matches!(
                place_order(pool, -1, "cy".into()).await,
                Err(ShopError::OutOfStock)
            ));
            let events = appended(pool).await.unwrap();
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].key.as_deref(), Some("cy"));
            assert_eq!(outbox.backlog().await.unwrap().pending, 1);
        }

        #[tokio::test]
        async fn a_producer_returning_sqlx_error_gets_a_refused_event_as_an_encode_error() {
            let Some((db, _outbox)) = setup().await else { return };
            let pool = db.pool();
            let mut tx = pool.begin().await.unwrap();
            // A key longer than the outbox column is refused at append.
            let long = "k".repeat(300);
            let error = place_orders(&mut tx, vec![(1, long.as_str())])
                .await
                .expect_err("the key is too long");
            let sqlx::Error::Encode(source) = &error else {
                panic!("a refused event is an encode error: {error:?}");
            };
            assert!(
                matches!(
                    source.downcast_ref::<outbox::core::Error>(),
                    Some(outbox::core::Error::InvalidEvent(_))
                ),
                "{source:?}"
            );
            // A database error is the database's own.
            let error = place_orders(&mut tx, vec![(2, "ada"), (2, "ada")])
                .await
                .expect_err("a duplicate order id");
            assert!(
                error.as_database_error().is_some_and(|e| e.is_unique_violation()),
                "{error:?}"
            );
            drop(tx);
            let error = place_order(pool, 7, long.clone()).await.expect_err("too long");
            assert!(
                matches!(error, ShopError::Database(sqlx::Error::Encode(_))),
                "{error:?}"
            );
            assert!(appended(pool).await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn each_event_is_applied_once_whatever_the_order_and_the_duplicates() {
            let Some((db, _outbox)) = setup().await else { return };
            let pool = db.pool();
            let mut tx = pool.begin().await.unwrap();
            place_orders(&mut tx, vec![(1, "ada"), (2, "bob")]).await.unwrap();
            tx.commit().await.unwrap();
            let events = appended(pool).await.unwrap();
            let consumer = TestConsumer::start(Ship::inbox(pool.clone()).unwrap(), Ship).unwrap();
            // Out of order, each twice, and a hand-made one.
            consumer.deliver(&events[1]);
            consumer.deliver(&events[0]);
            consumer.deliver(&events[1]);
            consumer.deliver(&events[0]);
            let hand_made = OrderPlaced { order_id: 3, customer: "cy".into() };
            consumer.deliver(
                Delivery::json("order-3", &hand_made)
                    .unwrap()
                    .with_type("order.placed")
                    .with_key("cy"),
            );
            let counts = consumer.drain().await.unwrap();
            assert_eq!((counts.processed, counts.duplicates), (3, 2), "{counts:?}");
            assert_eq!(shipments(pool).await, [1, 2, 3]);
            let acked = consumer.acknowledged();
            assert_eq!(acked.len(), 5, "every delivery acknowledged: {acked:?}");
            assert_eq!(consumer.inbox().counts().await.unwrap().processed, 3);
            consumer.shutdown().await.unwrap();
        }

        #[tokio::test]
        async fn a_failing_transaction_is_retried_and_one_that_always_fails_is_parked() {
            let Some((db, _outbox)) = setup().await else { return };
            let pool = db.pool();
            let handler = Flaky::new(Ship).fail("late", 2).fail_always("poison");
            let config = testing::config()
                .with_max_attempts(3);
            let consumer =
                TestConsumer::start_with(Ship::inbox(pool.clone()).unwrap(), handler, config)
                    .unwrap();
            let order = |order_id| OrderPlaced { order_id, customer: "ada".into() };
            consumer.deliver(Delivery::json("late", &order(1)).unwrap());
            consumer.deliver(Delivery::json("poison", &order(2)).unwrap());
            consumer.deliver(Delivery::raw("garbled", "not json"));
            let counts = consumer.drain().await.unwrap();
            assert_eq!(counts.processed, 1, "applied at its third attempt: {counts:?}");
            assert_eq!(counts.failed, 2, "the poison and the garbled one: {counts:?}");
            // The failed attempts' writes rolled back with their transactions.
            assert_eq!(shipments(pool).await, [1]);
            let parked = consumer.parked().await.unwrap();
            let mut ids: Vec<&str> = parked.iter().map(|p| p.event_id.as_str()).collect();
            ids.sort_unstable();
            assert_eq!(ids, ["garbled", "poison"]);
            let poison = parked.iter().find(|p| p.event_id == "poison").unwrap();
            assert_eq!(poison.attempts, 3);
            assert!(
                poison.last_error.as_deref().is_some_and(|e| e.contains("injected failure")),
                "{poison:?}"
            );
            consumer.shutdown().await.unwrap();
        }

        #[tokio::test]
        async fn an_earlier_event_waiting_for_a_retry_holds_back_its_key_only() {
            let Some((db, _outbox)) = setup().await else { return };
            let pool = db.pool();
            let handler = Flaky::new(Ship).fail("ada-1", 2);
            let consumer =
                TestConsumer::start_with(Ship::inbox(pool.clone()).unwrap(), handler, testing::config())
                    .unwrap();
            let order = |order_id, customer: &str| OrderPlaced { order_id, customer: customer.into() };
            consumer.deliver(Delivery::json("ada-1", &order(1, "ada")).unwrap().with_key("ada"));
            consumer.deliver(Delivery::json("ada-2", &order(2, "ada")).unwrap().with_key("ada"));
            consumer.deliver(Delivery::json("bob-1", &order(3, "bob")).unwrap().with_key("bob"));
            let counts = consumer.drain().await.unwrap();
            assert_eq!(counts.processed, 3, "{counts:?}");
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT event_id FROM inbox_event WHERE consumer = 'shipping' ORDER BY processed_time, id",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            let ada: Vec<&str> = ids.iter().map(String::as_str).filter(|id| id.starts_with("ada")).collect();
            assert_eq!(ada, ["ada-1", "ada-2"], "per-key order is on by default: {ids:?}");
            consumer.shutdown().await.unwrap();
        }
    };
}

mod sqlite {
    kit_suite!(
        sqlx::Sqlite,
        async { Some(outbox_test_harness::TestDb::sqlite().await.expect("sqlite")) },
        "INSERT INTO orders (id) VALUES (?)",
        "INSERT INTO shipments (order_id) VALUES (?)"
    );
}

mod postgres {
    kit_suite!(
        sqlx::Postgres,
        async {
            outbox_test_harness::TestDb::postgres()
                .await
                .expect("postgres")
        },
        "INSERT INTO orders (id) VALUES ($1)",
        "INSERT INTO shipments (order_id) VALUES ($1)"
    );
}
