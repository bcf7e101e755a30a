//! SQLite: the embedded default. One writer at a time, so the relay's claim
//! takes the write lock at `BEGIN IMMEDIATE` and a lease column keeps other
//! relays off claimed rows; wake-ups across processes fall back to polling.

use std::sync::Arc;

use sqlx::{Pool, Sqlite, Transaction};
use tokio::sync::Notify;

use super::{Backend, Dialect, Placeholders, query_binder, statement_plumbing};

static SQLITE: Dialect = Dialect {
    name: "SQLite",
    placeholders: Placeholders::Question,
    skip_locked: "",
    clock: "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    outbox_ddl,
    inbox_ddl,
    meta_ddl,
    insert_ignore: ("INSERT OR IGNORE INTO", ""),
    notify: |_| None,
    delete_limited: super::LimitedDelete::IdSubquery,
    create_index: super::ddl::create_index_if_not_exists,
    add_column: |table, column| format!("ALTER TABLE {table} ADD COLUMN {column}"),
    inbox_pending_indexes: super::ddl::partial_pending_indexes,
    inbox_binary_ids: |_| Vec::new(),
    inbox_exact_ids: |_| Vec::new(),
    byte_length: |column| format!("LENGTH(CAST({column} AS BLOB))"),
    outbox_open_key_index: super::ddl::partial_open_key_index,
    outbox_waiting_index: |_| Vec::new(),
    drop_index: |table, name| format!("DROP INDEX IF EXISTS {table}_{name}"),
    use_index: |table, name| format!("INDEXED BY {table}_{name}"),
    // SQLite has no `ADD COLUMN IF NOT EXISTS`: a step run again says so.
    already_applied: |error| {
        error
            .as_database_error()
            .is_some_and(|e| e.message().contains("duplicate column name"))
    },
    migration_lock: None,
    relaxed_commit: None,
    single_writer: true,
    handler_session: None,
    // `length` of a BLOB column reads its size from the record, not its
    // overflow pages; the headers (text) are counted in bytes.
    payload_bytes: "length(content) + length(CAST(headers AS BLOB))",
    relay_lock: super::RelayLock::FileBeside(
        "SELECT file FROM pragma_database_list WHERE name = 'main'",
    ),
};

fn outbox_ddl(t: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                event_id TEXT NOT NULL,
                event_type TEXT NOT NULL,
                destination TEXT NOT NULL,
                event_key TEXT,
                headers TEXT NOT NULL,
                content BLOB NOT NULL,
                content_type TEXT NOT NULL,
                process TEXT NOT NULL DEFAULT 'NEW',
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at INTEGER NOT NULL,
                last_error TEXT,
                claimed_by TEXT,
                claimed_until INTEGER,
                create_time INTEGER NOT NULL,
                update_time INTEGER NOT NULL,
                published_time INTEGER
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
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                consumer TEXT NOT NULL,
                event_id TEXT NOT NULL,
                event_type TEXT,
                event_key TEXT,
                process TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at INTEGER,
                last_error TEXT,
                headers TEXT,
                content BLOB,
                create_time INTEGER NOT NULL,
                update_time INTEGER NOT NULL,
                processed_time INTEGER
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
            table_name TEXT PRIMARY KEY,
            version INTEGER NOT NULL,
            update_time INTEGER NOT NULL
        )"
        .to_owned(),
        "CREATE TABLE IF NOT EXISTS outbox_lease (
            name TEXT PRIMARY KEY,
            holder TEXT,
            until_time INTEGER NOT NULL
        )"
        .to_owned(),
    ]
}

impl super::sealed::Sealed for Sqlite {}

query_binder!(Sqlite);

impl Backend for Sqlite {
    const DIALECT: &'static Dialect = &SQLITE;

    async fn begin_write(pool: &Pool<Sqlite>) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        // A deferred transaction that reads first cannot always upgrade to a
        // writer later (SQLITE_BUSY without waiting); take the lock up front.
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    statement_plumbing!(Sqlite);

    fn listen(
        _pool: &Pool<Sqlite>,
        _table: &str,
        _wake: Arc<Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}
