use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[derive(serde::Serialize)]
struct UserCreated {
    ids: Vec<i64>,
}

#[transactional_event(destination = "/queue/users", event_type = "user.created", key = event.ids)]
async fn create_user(tx: &mut Transaction<'_, Sqlite>) -> Result<UserCreated, outbox::core::Error> {
    let _ = tx;
    Ok(UserCreated { ids: vec![1] })
}

fn main() {}
