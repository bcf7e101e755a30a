//! The database harness against real servers: every test gets a fresh database
//! that it can query, and server databases are dropped afterwards.
//!
//! Test names start with the database (`sqlite_`, `postgres_`, `mysql_`) so one
//! server's tests can be run alone.

use outbox_test_harness::TestDb;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn sqlite_gives_a_fresh_file_that_can_be_queried() -> TestResult {
    let db = TestDb::sqlite().await?;
    assert!(db.url().starts_with("sqlite://"));
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(tables, 0);
    sqlx::query("CREATE TABLE greeting (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
        .execute(db.pool())
        .await?;
    sqlx::query("INSERT INTO greeting (text) VALUES (?)")
        .bind("hello")
        .execute(db.pool())
        .await?;
    let text: String = sqlx::query_scalar("SELECT text FROM greeting WHERE id = 1")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(text, "hello");
    Ok(())
}

#[tokio::test]
async fn postgres_gives_a_fresh_database_and_drops_it_afterwards() -> TestResult {
    let Some(db) = TestDb::postgres().await? else {
        return Ok(());
    };
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(db.pool())
        .await?;
    assert!(name.starts_with("outbox_test_"), "{name}");
    assert!(db.url().ends_with(&format!("/{name}")), "{}", db.url());
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(db.pool())
    .await?;
    assert_eq!(tables, 0);
    sqlx::query("CREATE TABLE greeting (id BIGSERIAL PRIMARY KEY, text TEXT NOT NULL)")
        .execute(db.pool())
        .await?;
    let id: i64 = sqlx::query_scalar("INSERT INTO greeting (text) VALUES ($1) RETURNING id")
        .bind("hello")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(id, 1);

    let observer = TestDb::postgres()
        .await?
        .ok_or("PostgreSQL was reachable a moment ago")?;
    drop(db);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(observer.pool())
        .await?;
    assert_eq!(left, 0, "{name} was not dropped");
    Ok(())
}

#[tokio::test]
async fn mysql_gives_a_fresh_database_and_drops_it_afterwards() -> TestResult {
    let Some(db) = TestDb::mysql().await? else {
        return Ok(());
    };
    let name: String = sqlx::query_scalar("SELECT DATABASE()")
        .fetch_one(db.pool())
        .await?;
    assert!(name.starts_with("outbox_test_"), "{name}");
    assert!(db.url().ends_with(&format!("/{name}")), "{}", db.url());
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = ?")
            .bind(&name)
            .fetch_one(db.pool())
            .await?;
    assert_eq!(tables, 0);
    sqlx::query("CREATE TABLE greeting (id BIGINT AUTO_INCREMENT PRIMARY KEY, text TEXT NOT NULL)")
        .execute(db.pool())
        .await?;
    let done = sqlx::query("INSERT INTO greeting (text) VALUES (?)")
        .bind("hello")
        .execute(db.pool())
        .await?;
    assert_eq!(done.last_insert_id(), 1);

    let observer = TestDb::mysql()
        .await?
        .ok_or("MySQL was reachable a moment ago")?;
    drop(db);
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name = ?",
    )
    .bind(&name)
    .fetch_one(observer.pool())
    .await?;
    assert_eq!(left, 0, "{name} was not dropped");
    Ok(())
}
