use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(destination = "/queue/users", event_type = "user.created")]
async fn create_user(
    name: String,
    tx: &mut Transaction<'_, Sqlite>,
) -> Result<String, outbox::core::Error> {
    let _ = tx;
    Ok(name)
}

fn main() {}
