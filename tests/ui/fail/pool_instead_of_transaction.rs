use outbox::transactional_event;

#[transactional_event(destination = "/queue/users", event_type = "user.created")]
async fn create_user(pool: &sqlx::SqlitePool) -> Result<i64, outbox::core::Error> {
    let _ = pool;
    Ok(1)
}

fn main() {}
