use outbox::transactional_event;
use sqlx::{Sqlite, Transaction};

#[transactional_event(destination = "/queue/users", event_type = "user.created")]
async fn create_user<E: serde::Serialize>(
    tx: &mut Transaction<'_, Sqlite>,
    event: E,
) -> Result<E, outbox::core::Error> {
    let _ = tx;
    Ok(event)
}

fn main() {}
