//! A destination shared as a `const`, by producer and consumer alike.
use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

mod topics {
    pub const ORDER_PLACED: &str = "/topic/VirtualTopic.order.placed";
    pub const SHIPPING_QUEUE: &str = "/queue/Consumer.shipping.VirtualTopic.order.placed";
}

#[transactional_event(destination = topics::ORDER_PLACED, event_type = "order.placed")]
async fn place_order(tx: &mut Transaction<'_, Sqlite>) -> Result<i64, sqlx::Error> {
    let _ = tx;
    Ok(1)
}

#[transactional_event(consumer = "shipping", destination = topics::SHIPPING_QUEUE)]
async fn ship(tx: &mut Transaction<'_, Sqlite>, event: i64) -> Result<(), sqlx::Error> {
    let _ = (tx, event);
    Ok(())
}

fn main() {
    assert_eq!(Ship::DESTINATION, topics::SHIPPING_QUEUE);
    let _ = place_order;
}
