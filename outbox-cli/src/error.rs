//! What can go wrong, and the exit code each failure means.

use std::process::ExitCode;

/// The exit codes of `outbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done.
    Ok = 0,
    /// 1: the operation failed (a database error, output that cannot be written).
    Failed = 1,
    /// 2: the command line is wrong (clap's code for usage errors).
    Usage = 2,
    /// 3: the database URL is not one `outbox` knows, or the database cannot be reached.
    Connect = 3,
    /// 4: a table the command needs does not exist.
    MissingTable = 4,
    /// 5: an id given is not a parked row.
    UnknownId = 5,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// A failure of a command, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is wrong in a way clap does not check.
    #[error("{0}")]
    Usage(String),
    /// The URL names no supported database.
    #[error(
        "unsupported database URL {url:?}: expected sqlite:PATH, postgres://…, postgresql://…, mysql://… or mariadb://…"
    )]
    BadUrl {
        /// The URL, password hidden.
        url: String,
    },
    /// The database could not be reached, or refused the connection.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL, password hidden.
        url: String,
        /// What sqlx reported.
        #[source]
        source: sqlx::Error,
    },
    /// A table does not exist.
    #[error("table {table} does not exist; run `outbox migrate`")]
    MissingTable {
        /// The table.
        table: String,
    },
    /// Ids that are not parked rows.
    #[error("{}", unknown_lines(what, ids))]
    UnknownIds {
        /// What was looked for, e.g. "parked event".
        what: String,
        /// The ids not found.
        ids: Vec<String>,
    },
    /// The library reported an error.
    #[error("{0}")]
    Outbox(#[from] outbox_core::Error),
    /// Output could not be written.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

fn unknown_lines(what: &str, ids: &[String]) -> String {
    ids.iter()
        .map(|id| format!("no {what} with id {id}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl CliError {
    /// The exit code this failure means.
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::Outbox(outbox_core::Error::InvalidName { .. }) => Exit::Usage,
            CliError::BadUrl { .. } | CliError::Connect { .. } => Exit::Connect,
            CliError::MissingTable { .. } => Exit::MissingTable,
            CliError::UnknownIds { .. } => Exit::UnknownId,
            CliError::Outbox(_) | CliError::Output(_) => Exit::Failed,
        }
    }

    /// `error` from an operation on `table`: "no such table" becomes
    /// [`CliError::MissingTable`].
    pub(crate) fn on_table(table: &str) -> impl FnOnce(outbox_core::Error) -> CliError + '_ {
        move |error| {
            if is_missing_table(&error) {
                CliError::MissingTable {
                    table: table.to_owned(),
                }
            } else {
                CliError::Outbox(error)
            }
        }
    }
}

/// `true` for "no such table" on any of the databases: PostgreSQL 42P01,
/// MySQL/MariaDB 42S02, SQLite's message.
pub(crate) fn is_missing_table(error: &outbox_core::Error) -> bool {
    let outbox_core::Error::Database {
        source: sqlx::Error::Database(db),
        ..
    } = error
    else {
        return false;
    };
    matches!(db.code().as_deref(), Some("42P01" | "42S02"))
        || db.message().contains("no such table")
}
