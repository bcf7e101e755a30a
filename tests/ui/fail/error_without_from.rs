use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[derive(Debug)]
struct MyError;

#[transactional_event(destination = "/queue/users", event_type = "user.created")]
async fn create_user(tx: &mut Transaction<'_, Sqlite>) -> Result<i64, MyError> {
    let _ = tx;
    Ok(1)
}

fn main() {}
