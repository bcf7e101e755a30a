//! The producer form in a caller's transaction: one event, several, none or
//! one, with a key, headers and a table.
use outbox::transactional_event;
use serde::Serialize;
use sqlx::{Sqlite, Transaction};

#[derive(Debug)]
pub enum AppError {
    Db(sqlx::Error),
    Outbox(outbox::core::Error),
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Db(e)
    }
}

impl From<outbox::core::Error> for AppError {
    fn from(e: outbox::core::Error) -> Self {
        AppError::Outbox(e)
    }
}

#[derive(Serialize)]
pub struct UserCreated {
    pub user_id: i64,
    pub name: String,
}

/// Creates a user.
#[transactional_event(
    destination = "/topic/VirtualTopic.user.created",
    event_type = "user.created",
    key = event.user_id,
    headers(tenant = "acme", "x-source" = event.name.to_uppercase()),
    table = "Outbox_Event",
)]
pub async fn create_user(
    tx: &mut Transaction<'_, Sqlite>,
    name: String,
) -> Result<UserCreated, AppError> {
    let user_id: i64 = sqlx::query_scalar("INSERT INTO users (name) VALUES (?) RETURNING id")
        .bind(&name)
        .fetch_one(&mut **tx)
        .await?;
    if user_id < 0 {
        return Err(AppError::Db(sqlx::Error::RowNotFound));
    }
    Ok(UserCreated { user_id, name })
}

#[transactional_event(destination = "/queue/users", event_type = "user.created")]
async fn create_many(
    mut tx: &mut Transaction<'_, Sqlite>,
    (first, count): (i64, i64),
) -> Result<Vec<UserCreated>, AppError> {
    let _ = &mut tx;
    Ok((first..first + count)
        .map(|user_id| UserCreated {
            user_id,
            name: format!("user{user_id}"),
        })
        .collect())
}

#[transactional_event(destination = "/queue/users", event_type = "user.maybe", key = "all")]
async fn maybe<'c>(
    _: &mut sqlx::Transaction<'c, Sqlite>,
    yes: bool,
) -> Result<Option<UserCreated>, AppError> {
    Ok(yes.then(|| UserCreated {
        user_id: 1,
        name: "ada".into(),
    }))
}

type Db = sqlx::Postgres;

#[transactional_event(destination = "/queue/users", event_type = "user.renamed")]
async fn in_postgres(
    tx: &mut sqlx::Transaction<'static, Db>,
) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>> {
    sqlx::query("UPDATE users SET name = 'x'")
        .execute(&mut **tx)
        .await?;
    Ok(serde_json::json!({ "renamed": true }))
}

struct Users;

impl Users {
    #[transactional_event(destination = "/queue/users", event_type = "user.deleted")]
    async fn delete(tx: &mut Transaction<'_, sqlx::MySql>, id: i64) -> Result<i64, AppError> {
        sqlx::query("DELETE FROM users WHERE id = ?")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(id)
    }
}

#[allow(dead_code)]
async fn callers(
    sqlite: &mut Transaction<'_, Sqlite>,
    pg: &mut Transaction<'static, Db>,
    my: &mut Transaction<'_, sqlx::MySql>,
) -> Result<(), AppError> {
    let _: UserCreated = create_user(sqlite, "ada".into()).await?;
    let _: Vec<UserCreated> = create_many(sqlite, (1, 3)).await?;
    let _: Option<UserCreated> = maybe(sqlite, true).await?;
    let _ = in_postgres(pg).await;
    let _: i64 = Users::delete(my, 1).await?;
    Ok(())
}

fn assert_send<T: Send>(_: T) {}

#[allow(dead_code)]
fn futures_are_send(tx: &'static mut Transaction<'static, Sqlite>) {
    assert_send(create_user(tx, String::new()));
}

fn main() {}
