use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(destination = "/queue/users", event_type = "user.created")]
async fn create_user(tx: &mut Transaction<'_, Sqlite>) -> Result<(), outbox::core::Error> {
    let _ = tx;
    Ok(())
}

fn main() {}
