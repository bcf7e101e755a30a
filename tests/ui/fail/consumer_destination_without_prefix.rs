use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(consumer = "shipping", destination = "Consumer.shipping.VirtualTopic.order.placed")]
async fn ship(tx: &mut Transaction<'_, Sqlite>, event: i64) -> Result<(), sqlx::Error> {
    let _ = (tx, event);
    Ok(())
}

fn main() {}
