use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

const USER_CREATED: &str = "user.created";

#[transactional_event(destination = "/queue/users", event_type = USER_CREATED)]
async fn create_user(tx: &mut Transaction<'_, Sqlite>) -> Result<i64, outbox::core::Error> {
    let _ = tx;
    Ok(1)
}

fn main() {
    let _ = USER_CREATED;
}
