use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(destination = 42, event_type = "user.created")]
async fn create_user(tx: &mut Transaction<'_, Sqlite>) -> Result<i64, outbox::core::Error> {
    let _ = tx;
    Ok(1)
}

fn main() {}
