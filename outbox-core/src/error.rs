//! The one error type of `outbox-core`.

use std::fmt;

/// Everything that can go wrong in the outbox, the relay and the inbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database statement failed.
    #[error("database error while {action}: {source}")]
    Database {
        /// What the library was doing, e.g. "claiming a batch".
        action: &'static str,
        /// The error sqlx reported.
        #[source]
        source: sqlx::Error,
    },
    /// A configured identifier (table name, consumer name) is not acceptable.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// Which setting, e.g. "outbox table name".
        what: &'static str,
        /// The rejected value.
        value: String,
        /// Why, worded as the fix.
        reason: &'static str,
    },
    /// A relay or consumer setting is out of its range; the reason says the
    /// fix.
    #[error("invalid setting {setting}: {reason}")]
    InvalidConfig {
        /// The setting, e.g. "RelayConfig::lease".
        setting: &'static str,
        /// Why, worded as the fix.
        reason: String,
    },
    /// An event could not be turned into a message.
    #[error("event {event_type:?} could not be serialized: {source}")]
    Serialize {
        /// The event type being appended.
        event_type: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// An event's message would be larger than the broker accepts
    /// ([`Outbox::with_limits`](crate::Outbox::with_limits)); the broker would
    /// refuse it and close the connection.
    #[error("event {event_type:?} is too large for the broker: {source}")]
    EventTooLarge {
        /// The event type being appended.
        event_type: String,
        /// Which limit, by how much.
        #[source]
        source: outbox_stomp::FrameTooLarge,
    },
    /// An event field is not acceptable (empty destination, header with a newline…).
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// An event's destination is not one ActiveMQ's STOMP transport
    /// documents (`/queue/…`, `/topic/…`, `/temp-queue/…`, `/temp-topic/…`;
    /// see `outbox_rules::destination`): the broker would create a queue of
    /// that odd name that no consumer reads.
    #[error("invalid destination {destination:?}: {reason}")]
    InvalidDestination {
        /// The destination as given.
        destination: String,
        /// Why, worded as the fix.
        reason: &'static str,
    },
    /// The broker transport failed outside a publish (connect, subscribe).
    #[error("broker error: {0}")]
    Broker(#[from] outbox_stomp::Error),
    /// The broker connection ended for good (the broker refused the login, or
    /// the reconnect attempts ran out): the relay or consumer stopped.
    #[error("the broker connection ended for good: {0}")]
    BrokerGone(String),
    /// A relay's or consumer's task ended abnormally (it panicked or was
    /// cancelled).
    #[error("task failed: {0}")]
    TaskFailed(String),
    /// A row read from an outbox or inbox table lacks a value or holds one
    /// of the wrong kind (a table changed by hand, or a schema mismatch).
    #[error("table {table}, column {column}: {reason}")]
    Row {
        /// Which table ("outbox" or "inbox").
        table: &'static str,
        /// The column.
        column: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// [`Outbox::wait_published`](crate::Outbox::wait_published) gave up:
    /// these events were still waiting to be published (no relay running,
    /// the broker away, or a row the broker keeps refusing and has not
    /// parked yet). Also a test consumer's `drain` (feature `testing`) that
    /// gave up: the deliveries not acknowledged and the retries waiting.
    #[error("{} event(s) still waiting to be published after {after:?}: {}", waiting.len(), waiting.join(", "))]
    WaitTimeout {
        /// The ids still waiting (`NEW`), in the order they were given.
        waiting: Vec<String>,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// The schema in the database is newer than this library knows.
    #[error(
        "table {table} is at schema version {found}, newer than this library's {known}; upgrade the outbox crates"
    )]
    SchemaTooNew {
        /// The table.
        table: String,
        /// Version found in the database.
        found: i64,
        /// Highest version this build knows.
        known: i64,
    },
    /// A migration gave up waiting for a lock within its timeout
    /// ([`DEFAULT_MIGRATION_TIMEOUT`](crate::DEFAULT_MIGRATION_TIMEOUT), or
    /// the one given to `migrate_with`): the migration lock, which another
    /// process holds while it migrates, or a lock on the table, which another
    /// session holds in an open transaction. Nothing of the step in progress
    /// was recorded; migrating again once the lock is free finishes the job.
    #[error(
        "table {table}: gave up after {after:?} waiting for {waiting_for}; migrate again once it is free"
    )]
    MigrationTimeout {
        /// The table being migrated.
        table: String,
        /// What it waited for.
        waiting_for: String,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// The lock file that keeps two relays of one `relay_id` from running
    /// at once on a SQLite database (beside the database file) could not
    /// be opened or locked.
    #[error("relay {relay_id:?}: cannot lock {path}: {source}")]
    RelayLockFile {
        /// The relay's [`RelayConfig::relay_id`](crate::RelayConfig::relay_id).
        relay_id: String,
        /// The lock file.
        path: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn db(action: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| Error::Database { action, source }
    }

    /// `true` for a database error that trying again cannot cure: the data
    /// itself is refused (a value too long or of the wrong kind, an encoding
    /// the column cannot hold, a violated constraint). Connection trouble,
    /// deadlocks, serialization failures, lock and pool timeouts are
    /// transient (`false`), as is everything that is not a database error.
    /// The consumer parks a delivery after a bounded number of permanent
    /// errors instead of retrying it for ever.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Database { source, .. } => permanent_db_error(source),
            _ => false,
        }
    }
}

/// A database error of the application's own statements, e.g. with `?` in
/// a `#[transactional_event]` producer that returns this crate's error.
impl From<sqlx::Error> for Error {
    fn from(source: sqlx::Error) -> Error {
        Error::Database {
            action: "running a statement of the application",
            source,
        }
    }
}

/// For code whose error type is `sqlx::Error`, such as a
/// `#[transactional_event]` producer returning `Result<_, sqlx::Error>`. A
/// database error is handed back as the `sqlx::Error` it was, so its kind
/// (`as_database_error`, a unique violation, a pool timeout) reads as usual;
/// an event refused at append ([`Error::Serialize`], [`Error::InvalidEvent`],
/// [`Error::InvalidDestination`], [`Error::EventTooLarge`]) becomes [`sqlx::Error::Encode`] and an invalid
/// name or setting [`sqlx::Error::Configuration`], each holding this error as
/// its source (downcast it to read the details); anything else becomes
/// [`sqlx::Error::Io`] of kind `Other` holding this error.
impl From<Error> for sqlx::Error {
    fn from(error: Error) -> sqlx::Error {
        match error {
            Error::Database { source, .. } => source,
            Error::Serialize { .. }
            | Error::InvalidEvent(_)
            | Error::InvalidDestination { .. }
            | Error::EventTooLarge { .. } => sqlx::Error::Encode(Box::new(error)),
            Error::InvalidName { .. } | Error::InvalidConfig { .. } => {
                sqlx::Error::Configuration(Box::new(error))
            }
            other => sqlx::Error::Io(std::io::Error::other(other)),
        }
    }
}

/// See [`Error::is_permanent`].
fn permanent_db_error(error: &sqlx::Error) -> bool {
    use sqlx::error::ErrorKind;
    let db = match error {
        sqlx::Error::Database(db) => db,
        sqlx::Error::Encode(_) => return true,
        _ => return false,
    };
    if matches!(
        db.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
    ) {
        return true;
    }
    #[cfg(feature = "mysql")]
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        // Data too long, data truncated, incorrect string value (an
        // encoding the column cannot hold), value out of range.
        return matches!(my.number(), 1264 | 1265 | 1366 | 1406 | 3819)
            || sqlstate_permanent(my.code());
    }
    let Some(code) = db.code() else {
        return false;
    };
    if code.len() == 5 {
        // SQLSTATE (PostgreSQL, MySQL): class 22 data exception, 23
        // integrity constraint violation.
        return sqlstate_permanent(Some(&code));
    }
    // SQLite result codes, primary code in the low byte: TOOBIG,
    // CONSTRAINT, MISMATCH, RANGE.
    code.parse::<u32>()
        .is_ok_and(|c| matches!(c & 0xff, 18 | 19 | 20 | 25))
}

fn sqlstate_permanent(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
}

/// The error a consumer handler returns; its text is stored as `last_error`.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a publish attempt failed, as the relay needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishError {
    /// Whether the broker refused the messages or could not be reached.
    pub kind: PublishErrorKind,
    /// Human-readable detail, stored as the rows' `last_error`.
    pub message: String,
}

/// The two kinds of publish failure, which the relay treats differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// The broker answered with an error: the messages themselves may be at
    /// fault, so each row's attempt counts against its retry budget.
    Rejected,
    /// The broker was unreachable, the connection dropped or no receipt came in
    /// time: the rows are released without spending their budget and the relay
    /// backs off as a whole.
    Unavailable,
    /// The transport stopped for good (a refused login, reconnect attempts
    /// spent): the rows are released and the relay stops with
    /// [`Error::BrokerGone`].
    Closed,
    /// The broker refused the messages' destination to the relay's user (its
    /// authorisation map does not let it write there). Not the messages'
    /// fault, and it passes once the broker's authorisation allows it: the
    /// rows of that destination are deferred with backoff without spending
    /// their budget, while other destinations flow.
    Unauthorized,
}

impl PublishError {
    /// A rejection by the broker.
    pub fn rejected(message: impl Into<String>) -> PublishError {
        PublishError {
            kind: PublishErrorKind::Rejected,
            message: message.into(),
        }
    }

    /// The transport stopped for good.
    pub fn closed(message: impl Into<String>) -> PublishError {
        PublishError {
            kind: PublishErrorKind::Closed,
            message: message.into(),
        }
    }

    /// The broker refused the destination to the publisher's user.
    pub fn unauthorized(message: impl Into<String>) -> PublishError {
        PublishError {
            kind: PublishErrorKind::Unauthorized,
            message: message.into(),
        }
    }

    /// The broker could not be reached or did not confirm.
    pub fn unavailable(message: impl Into<String>) -> PublishError {
        PublishError {
            kind: PublishErrorKind::Unavailable,
            message: message.into(),
        }
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            PublishErrorKind::Rejected => "rejected by the broker",
            PublishErrorKind::Unavailable => "broker unavailable",
            PublishErrorKind::Closed => "broker connection ended for good",
            PublishErrorKind::Unauthorized => "destination refused to the relay's user",
        };
        write!(f, "{kind}: {}", self.message)
    }
}

impl std::error::Error for PublishError {}
