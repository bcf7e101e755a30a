//! Statements shared by all databases, built once per table from its
//! [`Dialect`](super::Dialect). Written with `?` placeholders and rewritten for
//! the database at construction.

use super::{Dialect, marks, placeholders};
use crate::names::TableName;
use crate::store::{InboxState, OutboxState};

/// The outbox states as stored: new, published, failed.
const STATES: (&str, &str, &str) = (
    OutboxState::New.as_sql(),
    OutboxState::Published.as_sql(),
    OutboxState::Failed.as_sql(),
);

/// Columns of a claimed outbox row, in the order [`OutboxSql::claim`] selects them.
pub(crate) const CLAIM_COLUMNS: &str = "id, event_id, event_type, destination, event_key, headers, content, content_type, attempts, \
     create_time";

/// The head of a waiting row, in the order the claim and the hand-off read
/// select it: its id, its key, the bytes of its payload and headers (see
/// [`Dialect::payload_bytes`](super::Dialect::payload_bytes)) and its lease.
/// A batch is sized on these before any payload is fetched.
fn head_columns(dialect: &Dialect) -> String {
    format!("id, event_key, {}, claimed_until", dialect.payload_bytes)
}

/// Columns written when an event is appended.
const INSERT_COLUMNS: &str = "event_id, event_type, destination, event_key, headers, content, \
     content_type, process, attempts, next_attempt_at, create_time, update_time, claimed_by, \
     claimed_until, partition_no";

/// Values per appended row (the columns of [`INSERT_COLUMNS`]).
pub(crate) const INSERT_VALUES: usize = 15;

/// Rows a relay may claim: keyless ones (`partition_no` -1, also every row
/// written before schema version 4) and those of its share of the key
/// partitions, `[?, ?)`.
const IN_SHARE: &str = "(partition_no < 0 OR (partition_no >= ? AND partition_no < ?))";

/// The claim of outbox table `t`: due rows not leased, in the share, in id
/// order; with `after`, only those past an id `?` and not of `after` keys
/// (bound after the share's bounds, before the limit).
fn claim_text(dialect: &Dialect, t: &str, after: Option<usize>) -> String {
    let (new, _, _) = STATES;
    let past = match after {
        None => String::new(),
        Some(0) => "AND id > ? ".to_owned(),
        Some(keys) => format!(
            "AND id > ? AND (event_key IS NULL OR event_key NOT IN ({})) ",
            marks(keys)
        ),
    };
    placeholders(
        dialect.placeholders,
        &format!(
            "SELECT {} FROM {t} {} WHERE process = '{new}' AND next_attempt_at <= ? \
             AND (claimed_until IS NULL OR claimed_until < ?) AND {IN_SHARE} {past}\
             ORDER BY id LIMIT ?{}",
            head_columns(dialect),
            (dialect.use_index)(t, "process"),
            dialect.skip_locked
        ),
    )
}

/// The statements of one outbox table.
#[derive(Debug)]
pub(crate) struct OutboxSql {
    pub(crate) table: TableName,
    dialect: &'static Dialect,
    /// Schema versions 1, 2, …: the statements of each.
    pub(crate) migrations: Vec<Vec<String>>,
    pub(crate) notify: Option<String>,
    pub(crate) claim: String,
    pub(crate) due_probe: String,
    pub(crate) handed_off: String,
    pub(crate) park_rejected: String,
    pub(crate) retry_rejected: String,
    pub(crate) park_undecodable: String,
    pub(crate) release: String,
    pub(crate) defer_destination: String,
    pub(crate) delete_published: String,
    pub(crate) backlog: String,
    pub(crate) parked_count: String,
    pub(crate) parked: String,
    pub(crate) replay_one: String,
    pub(crate) replay_all: String,
    pub(crate) count_by_process: String,
    pub(crate) legacy_headers: String,
    pub(crate) rewrite_headers: String,
}

impl OutboxSql {
    pub(crate) fn new(dialect: &'static Dialect, table: TableName) -> OutboxSql {
        let t = table.as_str();
        let (new, published, failed) = STATES;
        let p = |sql: String| placeholders(dialect.placeholders, &sql);
        OutboxSql {
            migrations: vec![
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
            ],
            legacy_headers: p(format!(
                "SELECT id, headers FROM {t} WHERE id > ? AND headers LIKE '{{%' ORDER BY id LIMIT ?"
            )),
            rewrite_headers: p(format!(
                "UPDATE {t} SET headers = ? WHERE id = ? AND headers = ?"
            )),
            notify: (dialect.notify)(t),
            // Both on the index of rows by state and id: with `ORDER BY id
            // LIMIT` and statistics from a table of waiting rows, SQLite
            // (and MySQL) would otherwise walk the table from its first row,
            // through every published one.
            claim: claim_text(dialect, t, None),
            due_probe: p(format!(
                "SELECT id FROM {t} {} WHERE process = '{new}' AND next_attempt_at <= ? \
                 AND (claimed_until IS NULL OR claimed_until < ?) AND {IN_SHARE} ORDER BY id LIMIT 1",
                (dialect.use_index)(t, "process"),
            )),
            // On the lease index: with statistics that saw only unleased
            // rows (all NULL), SQLite would otherwise scan the whole table.
            handed_off: p(format!(
                "SELECT {} FROM {t} {} WHERE claimed_by = ? AND process = '{new}' \
                 AND claimed_until > ? ORDER BY id LIMIT ?",
                head_columns(dialect),
                (dialect.use_index)(t, "claim")
            )),
            // `process` first: MySQL evaluates SET left to right with new values.
            // A rejection is one of two statements, each deciding in its WHERE
            // (which reads the row as it was before the SET):
            // the row is parked (its budget spent) or due again later; which
            // one changed the row says what happened, without a second read.
            park_rejected: p(format!(
                "UPDATE {t} SET process = '{failed}', attempts = attempts + 1, last_error = ?, \
                 next_attempt_at = ?, update_time = ?, claimed_by = NULL, claimed_until = NULL \
                 WHERE id = ? AND claimed_by = ? AND process = '{new}' AND attempts + 1 >= ?"
            )),
            retry_rejected: p(format!(
                "UPDATE {t} SET attempts = attempts + 1, last_error = ?, \
                 next_attempt_at = ?, update_time = ?, claimed_by = NULL, claimed_until = NULL \
                 WHERE id = ? AND claimed_by = ? AND process = '{new}' AND attempts + 1 < ?"
            )),
            // A row the relay cannot read as an event: parked at once, its
            // reason kept; per-key order then holds its key's later rows.
            park_undecodable: p(format!(
                "UPDATE {t} SET process = '{failed}', attempts = attempts + 1, last_error = ?, \
                 update_time = ?, claimed_by = NULL, claimed_until = NULL \
                 WHERE id = ? AND process = '{new}'"
            )),
            release: p(format!(
                "UPDATE {t} SET claimed_by = NULL, claimed_until = NULL, \
                 last_error = COALESCE(?, last_error), update_time = ? WHERE claimed_by = ?"
            )),
            // A destination the broker refuses to the relay's user: its
            // waiting rows, free or held by the refused claim, are due again
            // at `until` (unless due later already), with no attempt spent.
            // Rows other relays hold are theirs to settle.
            defer_destination: p(format!(
                "UPDATE {t} SET next_attempt_at = ?, last_error = ?, update_time = ?, \
                 claimed_by = NULL, claimed_until = NULL \
                 WHERE process = '{new}' AND destination = ? AND next_attempt_at < ? \
                 AND (claimed_until IS NULL OR claimed_until < ? OR claimed_by = ?)"
            )),
            delete_published: p((dialect.delete_limited)(
                t,
                &format!("process = '{published}' AND published_time < ?"),
                "published_time",
            )),
            // The oldest waiting row by id (the first one the relay takes),
            // read on the index instead of every waiting row's time.
            backlog: format!(
                "SELECT COUNT(*), (SELECT create_time FROM {t} WHERE process = '{new}' \
                 ORDER BY id LIMIT 1) FROM {t} WHERE process = '{new}'"
            ),
            parked_count: format!("SELECT COUNT(*) FROM {t} WHERE process = '{failed}'"),
            parked: p(format!(
                "SELECT event_id, event_type, destination, event_key, attempts, last_error, \
                 create_time, update_time FROM {t} WHERE process = '{failed}' ORDER BY id LIMIT ?"
            )),
            replay_one: p(format!(
                "UPDATE {t} SET process = '{new}', attempts = 0, next_attempt_at = ?, update_time = ?, \
                 claimed_by = NULL, claimed_until = NULL WHERE process = '{failed}' AND event_id = ?"
            )),
            replay_all: p(format!(
                "UPDATE {t} SET process = '{new}', attempts = 0, next_attempt_at = ?, update_time = ?, \
                 claimed_by = NULL, claimed_until = NULL WHERE process = '{failed}'"
            )),
            count_by_process: format!("SELECT process, COUNT(*) FROM {t} GROUP BY process"),
            dialect,
            table,
        }
    }

    /// `INSERT` of `rows` events at once.
    pub(crate) fn insert(&self, rows: usize) -> String {
        let one = format!("({})", marks(INSERT_VALUES));
        let values = vec![one; rows].join(", ");
        placeholders(
            self.dialect.placeholders,
            &format!(
                "INSERT INTO {} ({INSERT_COLUMNS}) VALUES {values}",
                self.table
            ),
        )
    }

    /// Unpublished rows of the given keys up to id `?`, to check per-key order.
    /// The state is named twice: `<>` matches the partial index of
    /// unpublished rows (PostgreSQL, SQLite), and the `IN` list of the other
    /// states keeps MySQL on ranges of its index: with `<>` alone and a
    /// hundred keys, MariaDB scans the whole index.
    pub(crate) fn key_rows(&self, keys: usize) -> String {
        let (new, published, failed) = STATES;
        placeholders(
            self.dialect.placeholders,
            &format!(
                "SELECT id, event_key FROM {} {} WHERE process <> '{published}' \
                 AND process IN ('{new}', '{failed}') AND id <= ? \
                 AND event_key IN ({}) ORDER BY id",
                self.table,
                (self.dialect.use_index)(self.table.as_str(), "open_key"),
                marks(keys)
            ),
        )
    }

    /// [`claim`](Self::claim) past a window of rows that per-key order held
    /// back: due rows after id `?`, skipping rows of `excluded` keys (the
    /// keys found waiting in the windows before). The values are those of
    /// the claim with the id and the keys before the limit: now, now, the
    /// share's bounds, the id, the keys, the limit.
    pub(crate) fn claim_after(&self, excluded: usize) -> String {
        claim_text(self.dialect, self.table.as_str(), Some(excluded))
    }

    /// Of `keys` keys, those with a parked row or a row waiting for its next
    /// attempt: keys that stay held for a while. The values are the time,
    /// then the keys.
    pub(crate) fn held_keys(&self, keys: usize) -> String {
        let (new, _, failed) = STATES;
        placeholders(
            self.dialect.placeholders,
            &format!(
                "SELECT DISTINCT event_key FROM {} WHERE process IN ('{new}', '{failed}') \
                 AND (process = '{failed}' OR next_attempt_at > ?) AND event_key IN ({})",
                self.table,
                marks(keys)
            ),
        )
    }

    /// Marks `ids` rows held by the lease `?` published: the values are the
    /// publish time, the update time, the token, then the ids.
    pub(crate) fn mark_published_ids(&self, ids: usize) -> String {
        let (new, published, _) = STATES;
        placeholders(
            self.dialect.placeholders,
            &format!(
                "UPDATE {} SET process = '{published}', published_time = ?, update_time = ?, \
                 claimed_by = NULL, claimed_until = NULL \
                 WHERE claimed_by = ? AND process = '{new}' AND id IN ({})",
                self.table,
                marks(ids)
            ),
        )
    }

    /// [`replay_one`](Self::replay_one) for `ids` event ids at once: the
    /// values are the next attempt time, the update time, then the ids.
    pub(crate) fn replay_ids(&self, ids: usize) -> String {
        let (new, _, failed) = STATES;
        placeholders(
            self.dialect.placeholders,
            &format!(
                "UPDATE {} SET process = '{new}', attempts = 0, next_attempt_at = ?, \
                 update_time = ?, claimed_by = NULL, claimed_until = NULL \
                 WHERE process = '{failed}' AND event_id IN ({})",
                self.table,
                marks(ids)
            ),
        )
    }

    /// Event id, state and last error of the rows among `ids` event ids (on
    /// the unique index of event ids): what [`Outbox::wait_published`]
    /// polls.
    ///
    /// [`Outbox::wait_published`]: crate::Outbox::wait_published
    pub(crate) fn states_of(&self, ids: usize) -> String {
        placeholders(
            self.dialect.placeholders,
            &format!(
                "SELECT event_id, process, last_error FROM {} WHERE event_id IN ({})",
                self.table,
                marks(ids)
            ),
        )
    }

    /// Deletes the parked rows among `ids` event ids: the values are the ids.
    pub(crate) fn discard_ids(&self, ids: usize) -> String {
        let (_, _, failed) = STATES;
        placeholders(
            self.dialect.placeholders,
            &format!(
                "DELETE FROM {} WHERE process = '{failed}' AND event_id IN ({})",
                self.table,
                marks(ids)
            ),
        )
    }

    /// Gives back the lease `?` on `ids` rows: the values are the error to keep
    /// (NULL keeps the old one), the update time, the token, then the ids.
    pub(crate) fn release_ids(&self, ids: usize) -> String {
        placeholders(
            self.dialect.placeholders,
            &format!(
                "UPDATE {} SET claimed_by = NULL, claimed_until = NULL, \
                 last_error = COALESCE(?, last_error), update_time = ? \
                 WHERE claimed_by = ? AND id IN ({})",
                self.table,
                marks(ids)
            ),
        )
    }

    /// The rows `ids` in full, in id order: the payloads of a batch already
    /// sized on its rows' heads.
    pub(crate) fn rows_by_id(&self, ids: usize) -> String {
        placeholders(
            self.dialect.placeholders,
            &format!(
                "SELECT {CLAIM_COLUMNS} FROM {} WHERE id IN ({}) ORDER BY id",
                self.table,
                marks(ids)
            ),
        )
    }

    /// Lengthens the lease `?` of `ids` rows whose lease still
    /// holds: the values are the new end, the token, the time, then the ids.
    pub(crate) fn renew_lease(&self, ids: usize) -> String {
        let (new, _, _) = STATES;
        placeholders(
            self.dialect.placeholders,
            &format!(
                "UPDATE {} SET claimed_until = ? WHERE claimed_by = ? AND process = '{new}' \
                 AND claimed_until > ? AND id IN ({})",
                self.table,
                marks(ids)
            ),
        )
    }

    /// Sets the claim on `ids` rows.
    pub(crate) fn claim_update(&self, ids: usize) -> String {
        placeholders(
            self.dialect.placeholders,
            &format!(
                "UPDATE {} SET claimed_by = ?, claimed_until = ? WHERE id IN ({})",
                self.table,
                marks(ids)
            ),
        )
    }
}

/// The statements of one inbox table.
#[derive(Debug)]
pub(crate) struct InboxSql {
    dialect: &'static Dialect,
    table: String,
    /// Schema versions 1, 2, …: the statements of each.
    pub(crate) migrations: Vec<Vec<String>>,
    pub(crate) insert: String,
    /// Due retry rows, oldest first: id and bytes held (payload and
    /// headers), for the retry pass to choose as many as its byte budget
    /// holds before it reads them.
    pub(crate) due: String,
    /// [`due`](Self::due) with per-key order.
    pub(crate) due_in_key_order: String,
    pub(crate) take_retry: String,
    pub(crate) fail_retry: String,
    pub(crate) counts: String,
    /// [`counts`](Self::counts) of the retrying and parked rows only: on the
    /// pending index, however many rows are processed.
    pub(crate) counts_unsettled: String,
    pub(crate) parked: String,
    pub(crate) replay_one: String,
    pub(crate) replay_all: String,
    pub(crate) delete_processed: String,
}

/// The schema versions of inbox table `t`: the statements of each.
fn inbox_migrations(dialect: &Dialect, t: &str) -> Vec<Vec<String>> {
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

/// Columns of a due retry row, in the order [`InboxSql::due_rows`] selects them.
pub(crate) const DUE_COLUMNS: &str =
    "i.id, i.event_id, i.event_type, i.event_key, i.headers, i.content, i.attempts";

impl InboxSql {
    pub(crate) fn new(dialect: &'static Dialect, table: &TableName) -> InboxSql {
        let t = table.as_str();
        let p = |sql: String| placeholders(dialect.placeholders, &sql);
        let (processed, retry, failed) = (
            InboxState::Processed.as_sql(),
            InboxState::Retry.as_sql(),
            InboxState::Failed.as_sql(),
        );
        // The queries of pending rows repeat `process <> 'PROCESSED'`, the
        // condition of version 3's partial indexes, so that SQLite uses them.
        let size = format!(
            "COALESCE({}, 0) + COALESCE({}, 0)",
            (dialect.byte_length)("i.content"),
            (dialect.byte_length)("i.headers")
        );
        let due = format!(
            "SELECT i.id, {size} FROM {t} i WHERE i.consumer = ? AND i.process = '{retry}' \
             AND i.process <> '{processed}' AND i.next_attempt_at <= ?"
        );
        InboxSql {
            dialect,
            table: t.to_owned(),
            migrations: inbox_migrations(dialect, t),
            insert: p(format!(
                "INSERT INTO {t} (consumer, event_id, event_type, event_key, process, attempts, \
                 next_attempt_at, last_error, headers, content, create_time, update_time, \
                 processed_time) VALUES ({})",
                marks(13)
            )),
            due: p(format!("{due} ORDER BY i.id LIMIT ?")),
            due_in_key_order: p(format!(
                "{due} AND (i.event_key IS NULL OR NOT EXISTS (SELECT 1 FROM {t} o \
                 WHERE o.consumer = i.consumer AND o.event_key = i.event_key \
                 AND o.process <> '{processed}' AND o.id < i.id)) ORDER BY i.id LIMIT ?"
            )),
            take_retry: p(format!(
                "UPDATE {t} SET process = '{processed}', attempts = attempts + 1, \
                 processed_time = ?, update_time = ?, content = NULL \
                 WHERE id = ? AND process = '{retry}'"
            )),
            // `process` first: MySQL evaluates SET left to right with new values.
            fail_retry: p(format!(
                "UPDATE {t} SET process = CASE WHEN attempts + 1 >= ? THEN '{failed}' ELSE '{retry}' END, \
                 attempts = attempts + 1, last_error = ?, next_attempt_at = ?, update_time = ? \
                 WHERE id = ? AND process = '{retry}'"
            )),
            counts: p(format!(
                "SELECT process, COUNT(*) FROM {t} WHERE consumer = ? GROUP BY process"
            )),
            counts_unsettled: p(format!(
                "SELECT process, COUNT(*) FROM {t} WHERE consumer = ? \
                 AND process IN ('{retry}', '{failed}') GROUP BY process"
            )),
            parked: p(format!(
                "SELECT event_id, event_type, event_key, attempts, last_error, create_time, \
                 update_time, content FROM {t} WHERE consumer = ? AND process = '{failed}' \
                 AND process <> '{processed}' ORDER BY id LIMIT ?"
            )),
            replay_one: p(format!(
                "UPDATE {t} SET process = '{retry}', attempts = 0, next_attempt_at = ?, \
                 update_time = ? WHERE consumer = ? AND process = '{failed}' AND event_id = ?"
            )),
            replay_all: p(format!(
                "UPDATE {t} SET process = '{retry}', attempts = 0, next_attempt_at = ?, \
                 update_time = ? WHERE consumer = ? AND process = '{failed}' \
                 AND process <> '{processed}'"
            )),
            delete_processed: p((dialect.delete_limited)(
                t,
                &format!("consumer = ? AND process = '{processed}' AND processed_time < ?"),
                "processed_time",
            )),
        }
    }
}

impl InboxSql {
    /// [`replay_one`](Self::replay_one) for `ids` event ids at once: the
    /// values are the next attempt time, the update time, the consumer, then
    /// the ids.
    pub(crate) fn replay_ids(&self, ids: usize) -> String {
        let (retry, failed) = (InboxState::Retry.as_sql(), InboxState::Failed.as_sql());
        placeholders(
            self.dialect.placeholders,
            &format!(
                "UPDATE {} SET process = '{retry}', attempts = 0, next_attempt_at = ?, \
                 update_time = ? WHERE consumer = ? AND process = '{failed}' \
                 AND event_id IN ({})",
                self.table,
                marks(ids)
            ),
        )
    }

    /// Deletes this consumer's parked rows among `ids` event ids: the values
    /// are the consumer, then the ids.
    pub(crate) fn discard_ids(&self, ids: usize) -> String {
        let (processed, failed) = (InboxState::Processed.as_sql(), InboxState::Failed.as_sql());
        placeholders(
            self.dialect.placeholders,
            &format!(
                "DELETE FROM {} WHERE consumer = ? AND process = '{failed}' \
                 AND process <> '{processed}' AND event_id IN ({})",
                self.table,
                marks(ids)
            ),
        )
    }

    /// The retry rows among `ids` ids (bound after nothing else), read whole
    /// for their retry, oldest first; rows no longer `RETRY` are left out.
    pub(crate) fn due_rows(&self, ids: usize) -> String {
        let retry = InboxState::Retry.as_sql();
        placeholders(
            self.dialect.placeholders,
            &format!(
                "SELECT {DUE_COLUMNS} FROM {} i WHERE i.id IN ({}) AND i.process = '{retry}' \
                 ORDER BY i.id",
                self.table,
                marks(ids)
            ),
        )
    }

    /// Rows of this consumer not processed yet whose key is one of `keys`
    /// keys (bound after the consumer).
    /// As in the outbox's key check, the state is named twice: `<>` for the
    /// partial index of pending rows (PostgreSQL, SQLite), the `IN` list so
    /// that MySQL keeps to ranges of its index with many keys.
    pub(crate) fn keys_pending(&self, keys: usize) -> String {
        debug_assert!(keys > 0, "a key check needs a key");
        let (processed, retry, failed) = (
            InboxState::Processed.as_sql(),
            InboxState::Retry.as_sql(),
            InboxState::Failed.as_sql(),
        );
        let list = vec!["?"; keys].join(", ");
        placeholders(
            self.dialect.placeholders,
            &format!(
                "SELECT COUNT(*) FROM {} WHERE consumer = ? AND event_key IN ({list}) \
                 AND process <> '{processed}' AND process IN ('{retry}', '{failed}')",
                self.table
            ),
        )
    }

    /// How many of `ids` event ids (bound after the consumer) have a
    /// `PROCESSED` row of this consumer: read inside a handler's
    /// transaction before it commits, to see that its inbox rows are still
    /// there.
    pub(crate) fn count_processed(&self, ids: usize) -> String {
        let processed = InboxState::Processed.as_sql();
        placeholders(
            self.dialect.placeholders,
            &format!(
                "SELECT COUNT(*) FROM {} WHERE consumer = ? AND process = '{processed}' \
                 AND event_id IN ({})",
                self.table,
                marks(ids)
            ),
        )
    }

    /// `INSERT` of `rows` processed rows at once: (consumer, event_id,
    /// event_type, event_key, time) each.
    pub(crate) fn insert_processed(&self, rows: usize) -> String {
        let processed = InboxState::Processed.as_sql();
        let one = format!("(?, ?, ?, ?, '{processed}', 1, NULL, NULL, NULL, NULL, ?, ?, ?)");
        let values = vec![one; rows].join(", ");
        placeholders(
            self.dialect.placeholders,
            &format!(
                "INSERT INTO {} (consumer, event_id, event_type, event_key, process, attempts, \
                 next_attempt_at, last_error, headers, content, create_time, update_time, \
                 processed_time) VALUES {values}",
                self.table
            ),
        )
    }
}

/// Statements of the shared schema-version and lease tables.
#[derive(Debug)]
pub(crate) struct MetaSql {
    pub(crate) ddl: Vec<String>,
    pub(crate) version: String,
    pub(crate) version_insert: String,
    pub(crate) version_update: String,
    pub(crate) lease_insert: String,
    pub(crate) lease_take: String,
    /// Names of the leases in `[?, ?)` that hold past `?`, in order.
    pub(crate) leases_in_range: String,
    /// Drops the lease named `?`.
    pub(crate) lease_drop: String,
    /// Drops the leases in `[?, ?)` that ran out before `?`.
    pub(crate) leases_purge: String,
}

impl MetaSql {
    pub(crate) fn new(dialect: &'static Dialect) -> MetaSql {
        let p = |sql: String| placeholders(dialect.placeholders, &sql);
        MetaSql {
            ddl: (dialect.meta_ddl)(),
            version: p("SELECT version FROM outbox_schema_version WHERE table_name = ?".into()),
            version_insert: p((dialect.insert_ignore)(
                "outbox_schema_version",
                "table_name, version, update_time",
                "?, 0, ?",
            )),
            version_update: p(
                "UPDATE outbox_schema_version SET version = ?, update_time = ? WHERE table_name = ?"
                    .into(),
            ),
            lease_insert: p((dialect.insert_ignore)(
                "outbox_lease",
                "name, holder, until_time",
                "?, NULL, 0",
            )),
            lease_take: p(
                "UPDATE outbox_lease SET holder = ?, until_time = ? \
                 WHERE name = ? AND (until_time < ? OR holder = ?)"
                    .into(),
            ),
            leases_in_range: p(
                "SELECT name FROM outbox_lease WHERE name >= ? AND name < ? AND until_time > ? \
                 ORDER BY name"
                    .into(),
            ),
            lease_drop: p("DELETE FROM outbox_lease WHERE name = ?".into()),
            leases_purge: p(
                "DELETE FROM outbox_lease WHERE name >= ? AND name < ? AND until_time < ?".into(),
            ),
        }
    }
}
