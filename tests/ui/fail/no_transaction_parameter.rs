use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(destination = "/queue/users", event_type = "user.created")]
async fn create_user() -> Result<i64, outbox::core::Error> {
    Ok(1)
}

fn main() {
    let _: Option<Transaction<'_, Sqlite>> = None;
}
