//! MySQL 8 and MariaDB 10.6+: `FOR UPDATE SKIP LOCKED` claims. The first
//! version's indexes are declared inside `CREATE TABLE`, because MySQL has no
//! `CREATE INDEX IF NOT EXISTS`; later ones are plain `CREATE INDEX`, run
//! under the migration lock, and one that finds its index already built (by a
//! migration that died before recording its version) counts as done. No
//! cross-process wake-up: a bounded poll.

use std::sync::Arc;

use sqlx::mysql::MySqlDatabaseError;
use sqlx::{MySql, Pool, Transaction};
use tokio::sync::Notify;

use super::{Backend, Dialect, Placeholders, query_binder, statement_plumbing};

static MYSQL: Dialect = Dialect {
    name: "MySQL",
    placeholders: Placeholders::Question,
    skip_locked: " FOR UPDATE SKIP LOCKED",
    clock: "SELECT CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
    outbox_ddl,
    inbox_ddl,
    meta_ddl,
    insert_ignore: ("INSERT IGNORE INTO", ""),
    notify: |_| None,
    // MySQL refuses LIMIT inside an IN subquery but takes it on DELETE.
    delete_limited: super::LimitedDelete::OrderLimit,
    create_index: |index, table, columns| format!("CREATE INDEX {index} ON {table} ({columns})"),
    add_column: |table, column| format!("ALTER TABLE {table} ADD COLUMN {column}"),
    // No partial indexes: the inbox keeps its full ones.
    inbox_pending_indexes: |_| Vec::new(),
    inbox_binary_ids,
    inbox_exact_ids,
    byte_length: |column| format!("CAST(OCTET_LENGTH({column}) AS SIGNED)"),
    outbox_open_key_index: |t| format!("CREATE INDEX {t}_open_key ON {t} (event_key, process, id)"),
    use_index: |table, name| format!("FORCE INDEX ({table}_{name})"),
    outbox_waiting_index: |_| Vec::new(),
    drop_index: |table, name| format!("DROP INDEX {table}_{name} ON {table}"),
    already_applied,
    // A named lock of the session, given back when the connection ends.
    // Names are server-wide: the database's name (as a digest, within the
    // 64 characters a name may have) keeps migrations of other databases on
    // the same server apart.
    migration_lock: Some(super::MigrationLock {
        try_take: "SELECT CAST(GET_LOCK(CONCAT('outbox_migrate.', MD5(COALESCE(DATABASE(), ''))), 0) AS SIGNED)",
        // Whole seconds, at least one: metadata locks (DDL) wait this long.
        lock_timeout: |timeout| {
            let seconds = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
            format!("SET SESSION lock_wait_timeout = {}", seconds.max(1))
        },
        // ER_LOCK_WAIT_TIMEOUT
        is_lock_timeout: |error| {
            matches!(error, sqlx::Error::Database(db)
                if db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .is_some_and(|my| my.number() == 1205))
        },
    }),
    relaxed_commit: None,
    single_writer: false,
    // After a deadlock (or a lock wait timeout with
    // `innodb_rollback_on_timeout`) the server has rolled the whole
    // transaction back; with autocommit off, what a handler that swallowed
    // the error writes next opens a new transaction, which the consumer's
    // rollback discards, instead of committing statement by statement.
    handler_session: Some(super::HandlerSession {
        enter: "SET autocommit = 0",
        commit: "COMMIT",
        rollback: "ROLLBACK",
        leave: "SET autocommit = 1",
    }),
    payload_bytes: "LENGTH(content) + LENGTH(headers)",
    // Named locks are server-wide: the database's name (a digest, within the
    // 64 characters a name may have) keeps relays of other databases apart.
    // NULL (an error in the server) counts as not taken.
    relay_lock: super::RelayLock::Session([
        "SELECT CAST(COALESCE(GET_LOCK(CONCAT('outbox_relay.', LEFT(MD5(COALESCE(DATABASE(), '')), 24), '.', ",
        "), 0), 0) AS SIGNED)",
    ]),
};

/// `ER_DUP_FIELDNAME`: `ADD COLUMN` of a column that exists.
const DUPLICATE_COLUMN: u16 = 1060;
/// `ER_DUP_KEYNAME`: `CREATE INDEX` (or `ADD INDEX`) of an index that exists.
const DUPLICATE_INDEX: u16 = 1061;
/// `ER_CANT_DROP_FIELD_OR_KEY`: `DROP INDEX` (or `DROP COLUMN`) of one that
/// is gone.
const ALREADY_DROPPED: u16 = 1091;

/// MySQL 8 has no `IF NOT EXISTS` for indexes and columns (MariaDB has, but
/// one text serves both); these errors say that a statement run again already
/// did its work. Decided by the server under the table's metadata lock, so
/// an index still being built by a dead client's session is waited for, not
/// missed.
fn already_applied(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<MySqlDatabaseError>())
        .is_some_and(|e| {
            matches!(
                e.number(),
                DUPLICATE_COLUMN | DUPLICATE_INDEX | ALREADY_DROPPED
            )
        })
}

fn outbox_ddl(t: &str) -> Vec<String> {
    vec![format!(
        "CREATE TABLE IF NOT EXISTS {t} (
            id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            event_id VARCHAR(64) NOT NULL,
            event_type VARCHAR(255) NOT NULL,
            destination VARCHAR(1024) NOT NULL,
            event_key VARCHAR(255),
            headers TEXT NOT NULL,
            content LONGBLOB NOT NULL,
            content_type VARCHAR(255) NOT NULL,
            process VARCHAR(16) NOT NULL DEFAULT 'NEW',
            attempts BIGINT NOT NULL DEFAULT 0,
            next_attempt_at BIGINT NOT NULL,
            last_error TEXT,
            claimed_by VARCHAR(64),
            claimed_until BIGINT,
            create_time BIGINT NOT NULL,
            update_time BIGINT NOT NULL,
            published_time BIGINT,
            UNIQUE KEY {t}_event_id (event_id),
            KEY {t}_process (process, id),
            KEY {t}_key (event_key, id),
            KEY {t}_claim (claimed_by)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
    )]
}

fn inbox_ddl(t: &str) -> Vec<String> {
    vec![format!(
        "CREATE TABLE IF NOT EXISTS {t} (
            id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            consumer VARCHAR(128) NOT NULL,
            event_id VARCHAR(64) NOT NULL,
            event_type VARCHAR(255),
            event_key VARCHAR(255),
            process VARCHAR(16) NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            next_attempt_at BIGINT,
            last_error TEXT,
            headers TEXT,
            content LONGBLOB,
            create_time BIGINT NOT NULL,
            update_time BIGINT NOT NULL,
            processed_time BIGINT,
            UNIQUE KEY {t}_consumer_event (consumer, event_id),
            KEY {t}_process (process, next_attempt_at),
            KEY {t}_key (consumer, event_key, process)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
    )]
}

/// The inbox's dedup columns in a binary collation: with the table's
/// default (`utf8mb4_general_ci` on MariaDB, `utf8mb4_0900_ai_ci` on MySQL 8)
/// the unique key took `abc` and `ABC` for one event and skipped the second
/// as a duplicate. `utf8mb4_bin` exists on both; it still pads with spaces, so
/// ids differing only in trailing spaces remained one until version 5
/// ([`inbox_exact_ids`]). `MODIFY` rebuilds the table, and running it again
/// changes nothing.
fn inbox_binary_ids(t: &str) -> Vec<String> {
    vec![format!(
        "ALTER TABLE {t} \
         MODIFY consumer VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, \
         MODIFY event_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"
    )]
}

/// The inbox's dedup id as bytes: `utf8mb4_bin` (version 4) is a PAD SPACE
/// collation, so the unique key still took `abc` and `abc ` for one event
/// and skipped the second as a duplicate. `VARBINARY` compares every byte,
/// trailing spaces included. The consumer writes ids of at most 64 bytes
/// (longer ones become a digest), so existing rows keep their bytes; no two
/// of them can become equal. `MODIFY` rebuilds the table, and running it
/// again changes nothing. The column now reads as bytes: sqlx's `String`
/// refuses it, so reads take the bytes as UTF-8 (`text_cell`), and SQL by
/// hand says `CONVERT(event_id USING utf8mb4)`.
fn inbox_exact_ids(t: &str) -> Vec<String> {
    vec![format!(
        "ALTER TABLE {t} MODIFY event_id VARBINARY(64) NOT NULL"
    )]
}

fn meta_ddl() -> Vec<String> {
    vec![
        "CREATE TABLE IF NOT EXISTS outbox_schema_version (
            table_name VARCHAR(64) NOT NULL PRIMARY KEY,
            version BIGINT NOT NULL,
            update_time BIGINT NOT NULL
        ) ENGINE=InnoDB"
            .to_owned(),
        "CREATE TABLE IF NOT EXISTS outbox_lease (
            name VARCHAR(128) NOT NULL PRIMARY KEY,
            holder VARCHAR(64),
            until_time BIGINT NOT NULL
        ) ENGINE=InnoDB"
            .to_owned(),
    ]
}

impl super::sealed::Sealed for MySql {}

query_binder!(MySql);

impl Backend for MySql {
    const DIALECT: &'static Dialect = &MYSQL;

    async fn begin_write(pool: &Pool<MySql>) -> Result<Transaction<'static, MySql>, sqlx::Error> {
        pool.begin().await
    }

    statement_plumbing!(MySql);

    fn listen(
        _pool: &Pool<MySql>,
        _table: &str,
        _wake: Arc<Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}
