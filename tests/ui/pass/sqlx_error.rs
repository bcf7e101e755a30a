//! Producers whose error type is `sqlx::Error`, or an error that converts
//! only from `sqlx::Error`: the framework's own errors reach them through
//! `sqlx::Error`.
use outbox::transactional_event;
use serde::Serialize;
use sqlx::{Postgres, Sqlite, Transaction};

#[derive(Serialize)]
pub struct OrderPlaced {
    pub order_id: i64,
}

#[transactional_event(destination = "/queue/orders", event_type = "order.placed", key = event.order_id)]
pub async fn place_order(
    tx: &mut Transaction<'_, Sqlite>,
    order_id: i64,
) -> Result<OrderPlaced, sqlx::Error> {
    sqlx::query("INSERT INTO orders (id) VALUES (?)")
        .bind(order_id)
        .execute(&mut **tx)
        .await?;
    Ok(OrderPlaced { order_id })
}

#[transactional_event(pool, destination = "/queue/orders", event_type = "order.placed")]
pub async fn place_orders(
    tx: &mut Transaction<'_, Postgres>,
    orders: Vec<i64>,
) -> Result<Vec<OrderPlaced>, sqlx::Error> {
    let _ = tx;
    Ok(orders
        .into_iter()
        .map(|order_id| OrderPlaced { order_id })
        .collect())
}

/// An application error that knows nothing of the outbox.
#[derive(Debug)]
pub enum ShopError {
    Database(sqlx::Error),
    OutOfStock,
}

impl From<sqlx::Error> for ShopError {
    fn from(e: sqlx::Error) -> Self {
        ShopError::Database(e)
    }
}

pub type ShopResult<T> = Result<T, ShopError>;

#[transactional_event(destination = "/queue/orders", event_type = "order.placed")]
pub async fn place_if_in_stock(
    tx: &mut Transaction<'_, Sqlite>,
    order_id: i64,
    in_stock: bool,
) -> ShopResult<OrderPlaced> {
    let _ = tx;
    if !in_stock {
        return Err(ShopError::OutOfStock);
    }
    Ok(OrderPlaced { order_id })
}

fn main() {}
