use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

struct UserCreated {
    id: i64,
}

#[transactional_event(destination = "/queue/users", event_type = "user.created")]
async fn create_user(tx: &mut Transaction<'_, Sqlite>) -> Result<UserCreated, outbox::core::Error> {
    let _ = tx;
    Ok(UserCreated { id: 1 })
}

fn main() {}
