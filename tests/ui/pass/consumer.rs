//! The consumer form: the function stays as written and a handler type named
//! after it is generated.
use outbox::core::{ConsumerConfig, Delivery, Handler};
use outbox::transactional_event;
use serde::Deserialize;
use sqlx::{Sqlite, Transaction};

#[derive(Debug, Deserialize)]
pub struct UserCreated {
    pub user_id: i64,
}

/// Awards welcome points.
#[transactional_event(
    consumer = "points",
    destination = "/queue/Consumer.points.VirtualTopic.user.created"
)]
pub async fn award_points(
    tx: &mut Transaction<'_, Sqlite>,
    event: UserCreated,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO points (user_id, points) VALUES (?, 100)")
        .bind(event.user_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[transactional_event(
    consumer = "audit",
    destination = "/queue/audit",
    table = "audit_inbox"
)]
async fn audit(
    _tx: &mut Transaction<'static, sqlx::Postgres>,
    event: serde_json::Value,
    delivery: &Delivery,
) -> Result<(), String> {
    if delivery.event_type.is_none() {
        return Err(format!("untyped event {event}"));
    }
    Ok(())
}

mod nested {
    use super::*;

    #[transactional_event(consumer = "billing", destination = "/queue/billing")]
    pub(crate) async fn r#bill_user(
        _tx: &mut Transaction<'_, sqlx::MySql>,
        _event: UserCreated,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

fn handler<DB: outbox::core::Backend, H: Handler<DB>>(_: H) {}

#[allow(dead_code)]
fn consumers(
    sqlite: sqlx::SqlitePool,
    pg: sqlx::PgPool,
    my: sqlx::MySqlPool,
) -> Result<(), outbox::core::Error> {
    assert_eq!(AwardPoints::CONSUMER, "points");
    assert_eq!(
        AwardPoints::DESTINATION,
        "/queue/Consumer.points.VirtualTopic.user.created"
    );
    assert_eq!(AwardPoints::INBOX_TABLE, "inbox_event");
    assert_eq!(Audit::INBOX_TABLE, "audit_inbox");
    let _: outbox::core::Consumer<Sqlite, AwardPoints> = AwardPoints::consumer(sqlite.clone())?;
    let _: outbox::core::Inbox<Sqlite> = AwardPoints::inbox(sqlite)?;
    let _ = Audit::consumer_with(
        pg,
        ConsumerConfig::new(Audit::DESTINATION)
            .with_concurrency(1),
    )?;
    let _ = nested::BillUser::consumer(my)?;
    Ok(())
}

fn main() {
    handler::<Sqlite, _>(AwardPoints);
    handler::<sqlx::Postgres, _>(Audit);
    handler::<sqlx::MySql, _>(nested::BillUser);
    assert_eq!(AwardPoints::CONSUMER, "points");
}
