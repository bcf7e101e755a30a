//! The pool form: the function takes the pool and owns its transaction.
use outbox::transactional_event;
use serde::Serialize;
use sqlx::{MySql, Postgres, Sqlite, Transaction};

#[derive(Serialize)]
pub struct OrderPlaced {
    pub order_id: i64,
}

/// Places an order.
#[transactional_event(pool, destination = "/topic/VirtualTopic.order.placed", event_type = "order.placed", key = event.order_id)]
pub async fn place_order(
    tx: &mut Transaction<'_, Sqlite>,
    order_id: i64,
) -> Result<OrderPlaced, outbox::core::Error> {
    sqlx::query("INSERT INTO orders (id) VALUES (?)")
        .bind(order_id)
        .execute(&mut **tx)
        .await?;
    Ok(OrderPlaced { order_id })
}

#[transactional_event(
    pool,
    destination = "/queue/orders",
    event_type = "order.placed",
    table = "order_outbox"
)]
async fn place_orders(
    tx: &mut Transaction<'_, Postgres>,
    pool: Vec<i64>,
) -> Result<Vec<OrderPlaced>, Box<dyn std::error::Error + Send + Sync>> {
    let _ = tx;
    Ok(pool
        .into_iter()
        .map(|order_id| OrderPlaced { order_id })
        .collect())
}

#[transactional_event(pool, destination = "/queue/orders", event_type = "order.placed")]
async fn place_in_mysql(
    _tx: &mut Transaction<'_, MySql>,
) -> Result<OrderPlaced, outbox::core::Error> {
    Ok(OrderPlaced { order_id: 1 })
}

#[allow(dead_code)]
async fn callers(
    sqlite: sqlx::SqlitePool,
    pg: &sqlx::PgPool,
    my: sqlx::Pool<MySql>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let placed: OrderPlaced = place_order(&sqlite, 7).await?;
    assert_eq!(placed.order_id, 7);
    let _: Vec<OrderPlaced> = place_orders(pg, vec![1, 2]).await?;
    let _ = place_in_mysql(&my).await?;
    Ok(())
}

fn assert_send<T: Send>(_: T) {}

#[allow(dead_code)]
fn futures_are_send(pool: &'static sqlx::SqlitePool) {
    assert_send(place_order(pool, 1));
}

fn main() {}
