use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(destination = "/queue/users", event_type = "user.created")]
async fn create_user(tx: &mut Transaction<'_, Sqlite>) {
    let _ = tx;
}

fn main() {}
