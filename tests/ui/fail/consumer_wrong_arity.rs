use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(consumer = "points", destination = "/queue/users")]
async fn award_points(tx: &mut Transaction<'_, Sqlite>) -> Result<(), String> {
    let _ = tx;
    Ok(())
}

fn main() {}
