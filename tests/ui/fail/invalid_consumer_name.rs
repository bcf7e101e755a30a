use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(consumer = "points service", destination = "/queue/users")]
async fn award_points(tx: &mut Transaction<'_, Sqlite>, event: i64) -> Result<(), String> {
    let _ = (tx, event);
    Ok(())
}

fn main() {}
