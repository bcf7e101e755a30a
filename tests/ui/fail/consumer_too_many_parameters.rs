use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

use outbox::core::Delivery;

#[transactional_event(consumer = "points", destination = "/queue/users")]
async fn award_points(
    tx: &mut Transaction<'_, Sqlite>,
    event: i64,
    delivery: &Delivery,
    points: i64,
) -> Result<(), String> {
    let _ = (tx, event, delivery, points);
    Ok(())
}

fn main() {}
