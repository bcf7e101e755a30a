//! PostgreSQL: `FOR UPDATE SKIP LOCKED` claims, and `NOTIFY` in the appending
//! transaction so relays in other processes wake up the moment it commits.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{Pool, Postgres, Transaction};
use tokio::sync::Notify;

use super::{Backend, Dialect, Placeholders, query_binder, statement_plumbing};

static POSTGRES: Dialect = Dialect {
    name: "PostgreSQL",
    placeholders: Placeholders::Dollar,
    skip_locked: " FOR UPDATE SKIP LOCKED",
    clock: "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    outbox_ddl,
    inbox_ddl,
    meta_ddl,
    insert_ignore: ("INSERT INTO", " ON CONFLICT DO NOTHING"),
    // The table name is a validated identifier, so it is a valid channel name.
    notify: |table| Some(format!("NOTIFY {table}")),
    delete_limited: super::LimitedDelete::IdSubquery,
    create_index: super::ddl::create_index_if_not_exists,
    add_column: |table, column| format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}"),
    inbox_pending_indexes: super::ddl::partial_pending_indexes,
    inbox_binary_ids: |_| Vec::new(),
    inbox_exact_ids: |_| Vec::new(),
    byte_length: |column| format!("CAST(OCTET_LENGTH({column}) AS BIGINT)"),
    outbox_open_key_index: super::ddl::partial_open_key_index,
    outbox_waiting_index: |t| {
        vec![format!(
            "CREATE INDEX IF NOT EXISTS {t}_waiting ON {t} (id) WHERE process = 'NEW'"
        )]
    },
    drop_index: |table, name| format!("DROP INDEX IF EXISTS {table}_{name}"),
    use_index: |_, _| String::new(),
    already_applied: |_| false,
    // A session lock, given back when the connection ends.
    migration_lock: Some(super::MigrationLock {
        try_take: "SELECT CASE WHEN pg_try_advisory_lock(7305093410471135041) \
                   THEN CAST(1 AS BIGINT) ELSE CAST(0 AS BIGINT) END",
        lock_timeout: |timeout| format!("SET lock_timeout = {}", timeout.as_millis().max(1)),
        // lock_not_available
        is_lock_timeout: |error| matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03")),
    }),
    relaxed_commit: Some("SET LOCAL synchronous_commit TO OFF"),
    single_writer: false,
    handler_session: None,
    // Lengths from the stored size, without reading (or decompressing) the
    // value; `octet_length` is a 32-bit integer.
    payload_bytes: "CAST(octet_length(content) + octet_length(headers) AS BIGINT)",
    // Advisory locks are per database: relays of other databases never meet.
    relay_lock: super::RelayLock::Session([
        "SELECT CASE WHEN pg_try_advisory_lock(",
        ") THEN CAST(1 AS BIGINT) ELSE CAST(0 AS BIGINT) END",
    ]),
};

fn outbox_ddl(t: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                id BIGSERIAL PRIMARY KEY,
                event_id VARCHAR(64) NOT NULL,
                event_type VARCHAR(255) NOT NULL,
                destination VARCHAR(1024) NOT NULL,
                event_key VARCHAR(255),
                headers TEXT NOT NULL,
                content BYTEA NOT NULL,
                content_type VARCHAR(255) NOT NULL,
                process VARCHAR(16) NOT NULL DEFAULT 'NEW',
                attempts BIGINT NOT NULL DEFAULT 0,
                next_attempt_at BIGINT NOT NULL,
                last_error TEXT,
                claimed_by VARCHAR(64),
                claimed_until BIGINT,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                published_time BIGINT
            )"
        ),
        format!("CREATE UNIQUE INDEX IF NOT EXISTS {t}_event_id ON {t} (event_id)"),
        format!("CREATE INDEX IF NOT EXISTS {t}_process ON {t} (process, id)"),
        format!("CREATE INDEX IF NOT EXISTS {t}_key ON {t} (event_key, id)"),
        format!("CREATE INDEX IF NOT EXISTS {t}_claim ON {t} (claimed_by)"),
    ]
}

fn inbox_ddl(t: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                id BIGSERIAL PRIMARY KEY,
                consumer VARCHAR(128) NOT NULL,
                event_id VARCHAR(64) NOT NULL,
                event_type VARCHAR(255),
                event_key VARCHAR(255),
                process VARCHAR(16) NOT NULL,
                attempts BIGINT NOT NULL DEFAULT 0,
                next_attempt_at BIGINT,
                last_error TEXT,
                headers TEXT,
                content BYTEA,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                processed_time BIGINT
            )"
        ),
        format!("CREATE UNIQUE INDEX IF NOT EXISTS {t}_consumer_event ON {t} (consumer, event_id)"),
        format!("CREATE INDEX IF NOT EXISTS {t}_process ON {t} (process, next_attempt_at)"),
        format!("CREATE INDEX IF NOT EXISTS {t}_key ON {t} (consumer, event_key, process)"),
    ]
}

fn meta_ddl() -> Vec<String> {
    vec![
        "CREATE TABLE IF NOT EXISTS outbox_schema_version (
            table_name VARCHAR(64) PRIMARY KEY,
            version BIGINT NOT NULL,
            update_time BIGINT NOT NULL
        )"
        .to_owned(),
        "CREATE TABLE IF NOT EXISTS outbox_lease (
            name VARCHAR(128) PRIMARY KEY,
            holder VARCHAR(64),
            until_time BIGINT NOT NULL
        )"
        .to_owned(),
    ]
}

impl super::sealed::Sealed for Postgres {}

query_binder!(Postgres);

impl Backend for Postgres {
    const DIALECT: &'static Dialect = &POSTGRES;

    async fn begin_write(
        pool: &Pool<Postgres>,
    ) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        pool.begin().await
    }

    statement_plumbing!(Postgres);

    fn listen(
        pool: &Pool<Postgres>,
        table: &str,
        wake: Arc<Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let pool = pool.clone();
        let channel = table.to_owned();
        Some(tokio::spawn(async move {
            loop {
                let listener = async {
                    let mut listener = PgListener::connect_with(&pool).await?;
                    listener.listen(&channel).await?;
                    // Anything committed while we were not listening is found now.
                    wake.notify_one();
                    loop {
                        // `None`: the connection was lost and is being made
                        // again; a commit in the gap sent no notification the
                        // listener saw, so the relay reads now.
                        listener.try_recv().await?;
                        wake.notify_one();
                    }
                };
                let result: Result<(), sqlx::Error> = listener.await;
                if let Err(error) = result {
                    tracing::debug!(%error, channel, "LISTEN connection failed; retrying");
                }
                wake.notify_one();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }))
    }
}
