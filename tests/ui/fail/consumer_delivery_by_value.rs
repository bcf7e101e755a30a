use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

use outbox::core::Delivery;

#[transactional_event(consumer = "points", destination = "/queue/users")]
async fn award_points(
    tx: &mut Transaction<'_, Sqlite>,
    event: i64,
    delivery: Delivery,
) -> Result<(), String> {
    let _ = (tx, event, delivery);
    Ok(())
}

fn main() {}
