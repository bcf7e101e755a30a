use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(destination = "/queue/", event_type = "order.placed")]
async fn place_order(tx: &mut Transaction<'_, Sqlite>) -> Result<i64, outbox::core::Error> {
    let _ = tx;
    Ok(1)
}

fn main() {}
