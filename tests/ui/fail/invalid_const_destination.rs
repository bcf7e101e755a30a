use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

/// Missing its leading slash: refused when the constant is evaluated.
const ORDER_PLACED: &str = "topic/VirtualTopic.order.placed";
/// No prefix at all.
const SHIPPING: &str = "shipping";

#[transactional_event(destination = ORDER_PLACED, event_type = "order.placed")]
async fn place_order(tx: &mut Transaction<'_, Sqlite>) -> Result<i64, outbox::core::Error> {
    let _ = tx;
    Ok(1)
}

#[transactional_event(consumer = "shipping", destination = SHIPPING)]
async fn ship(tx: &mut Transaction<'_, Sqlite>, event: i64) -> Result<(), sqlx::Error> {
    let _ = (tx, event);
    Ok(())
}

fn main() {}
