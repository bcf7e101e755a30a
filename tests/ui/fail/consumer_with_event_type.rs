use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(
    consumer = "points",
    destination = "/queue/users",
    event_type = "user.created"
)]
async fn award_points(tx: &mut Transaction<'_, Sqlite>, event: i64) -> Result<(), String> {
    let _ = (tx, event);
    Ok(())
}

fn main() {}
