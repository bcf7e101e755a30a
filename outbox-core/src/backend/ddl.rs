//! The schema of each table, version by version: the DDL statements of
//! every migration step, built from the [`Dialect`]. They bind no values;
//! `schema.rs` runs them under its lock.

use super::Dialect;

/// The schema versions of outbox table `t`: the statements of each.
pub(crate) fn outbox_migrations(dialect: &Dialect, t: &str) -> Vec<Vec<String>> {
    vec![
        (dialect.outbox_ddl)(t),
        // Version 2: retention finds old published rows by index
        // instead of reading past every newer one.
        vec![(dialect.create_index)(
            &format!("{t}_retention"),
            t,
            "process, published_time",
        )],
        // Version 3: headers are stored as a JSON array of [name,
        // value] pairs, as in the inbox. The rows written before are
        // rewritten by `OutboxStore::migrate` before this version is
        // recorded; the step itself has no statement.
        Vec::new(),
        // Version 4: each row's key partition, so relays share a
        // table by leasing partitions instead of waiting for each
        // other's keys. Rows written before keep -1: anyone's.
        vec![(dialect.add_column)(
            t,
            "partition_no INTEGER NOT NULL DEFAULT -1",
        )],
        // Version 5: the per-key order check reads a key's unpublished
        // rows on an index of their own, not every published row of
        // the key below the batch (which grew with the table).
        vec![(dialect.outbox_open_key_index)(t)],
        // Version 6: on PostgreSQL, an index of the waiting rows the
        // claim takes whatever the statistics say.
        (dialect.outbox_waiting_index)(t),
        // Version 7: version 1's index of every row by key goes. No
        // statement reads it since version 5's index of the
        // unpublished rows by key, and each row entered it three
        // times (insert, lease, mark).
        vec![(dialect.drop_index)(t, "key")],
    ]
}

/// The schema versions of inbox table `t`: the statements of each.
pub(crate) fn inbox_migrations(dialect: &Dialect, t: &str) -> Vec<Vec<String>> {
    vec![
        (dialect.inbox_ddl)(t),
        // Version 2: retention finds old processed rows by index instead of
        // scanning the table.
        vec![(dialect.create_index)(
            &format!("{t}_retention"),
            t,
            "consumer, processed_time",
        )],
        // Version 3: only rows waiting for a retry or parked are in the
        // indexes that look for them.
        (dialect.inbox_pending_indexes)(t),
        // Version 4: event ids that differ only in case are two events (on
        // MySQL, whose default collation ignored case).
        (dialect.inbox_binary_ids)(t),
        // Version 5: event ids that differ only in trailing spaces are two
        // events (on MySQL, whose binary collation pads with spaces).
        (dialect.inbox_exact_ids)(t),
    ]
}

/// `CREATE INDEX IF NOT EXISTS`, where the database has it (PostgreSQL, SQLite).
pub(super) fn create_index_if_not_exists(index: &str, table: &str, columns: &str) -> String {
    format!("CREATE INDEX IF NOT EXISTS {index} ON {table} ({columns})")
}

/// A partial index of the unpublished rows by key (PostgreSQL, SQLite).
pub(super) fn partial_open_key_index(t: &str) -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS {t}_open_key ON {t} (event_key, id) \
         WHERE process <> 'PUBLISHED'"
    )
}

/// Inbox schema version 3 where partial indexes exist (PostgreSQL, SQLite):
/// the full indexes of version 1 on `(process, next_attempt_at)` and
/// `(consumer, event_key, process)` give way to indexes of the rows that are
/// not `PROCESSED`. Queries that use them repeat `process <> 'PROCESSED'` so
/// that SQLite, which matches a partial index's condition term by term, picks
/// them.
pub(super) fn partial_pending_indexes(t: &str) -> Vec<String> {
    vec![
        format!("DROP INDEX IF EXISTS {t}_process"),
        format!("DROP INDEX IF EXISTS {t}_key"),
        format!(
            "CREATE INDEX IF NOT EXISTS {t}_pending ON {t} (consumer, process, next_attempt_at) \
             WHERE process <> 'PROCESSED'"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS {t}_pending_key ON {t} (consumer, event_key) \
             WHERE process <> 'PROCESSED'"
        ),
    ]
}
