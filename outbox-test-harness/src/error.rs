//! The harness's single error type.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while starting brokers, talking raw STOMP or
/// preparing test databases.
///
/// Messages include their underlying cause. `Debug` prints the same text as
/// `Display`, so a test that returns `Result<(), Box<dyn Error>>` shows a readable
/// message, with quoted broker log lines on lines of their own.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// A program or file the harness needs is not installed.
    #[error("{what} not found ({detail}); install it with `{install}` or run scripts/setup.sh")]
    Missing {
        /// What is missing, e.g. `java` or `the ActiveMQ jar`.
        what: &'static str,
        /// Where the harness looked.
        detail: String,
        /// The command that installs it on Debian.
        install: &'static str,
    },

    /// A file-system or process operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What the harness was doing.
        action: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An external command (such as `openssl`) exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line that was run.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },

    /// The broker process exited before it accepted a STOMP connection.
    #[error("ActiveMQ exited during start-up ({status}); last lines of {}:\n{log_tail}", log.display())]
    BrokerExited {
        /// The exit status of the JVM.
        status: String,
        /// The broker's log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },

    /// The broker did not answer a STOMP `CONNECT` with `CONNECTED` in time.
    #[error(
        "ActiveMQ was not ready within {timeout:?} (last attempt: {last_attempt}); last lines of {}:\n{log_tail}",
        log.display()
    )]
    BrokerNotReady {
        /// The overall start-up budget.
        timeout: Duration,
        /// What the last readiness probe saw.
        last_attempt: String,
        /// The broker's log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },

    /// The operation needs a running broker, but it is stopped.
    #[error("the broker is not running; call start_again() first")]
    NotRunning,

    /// The operation needs a stopped broker, but it is running.
    #[error("the broker is already running (pid {pid})")]
    AlreadyRunning {
        /// The JVM's process id.
        pid: u32,
    },

    /// Sending a signal to the broker process failed.
    #[error("sending {signal} to broker pid {pid}: {source}")]
    Signal {
        /// The signal's name, e.g. `SIGSTOP`.
        signal: &'static str,
        /// The JVM's process id.
        pid: u32,
        /// The error from `kill(2)`.
        #[source]
        source: std::io::Error,
    },

    /// A raw STOMP exchange broke the protocol or the connection closed.
    #[error("raw STOMP exchange: {0}")]
    Stomp(String),

    /// Waiting for something took longer than allowed.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What the harness was waiting for.
        what: String,
        /// How long it waited.
        after: Duration,
    },

    /// A database server is not reachable and its skip variable is not set.
    #[error(
        "{server} is not reachable at {url}: {source}. Start it with scripts/setup.sh, point {url_var} \
         at a running server, or set {skip_var}=1 to skip its tests"
    )]
    DatabaseUnreachable {
        /// `PostgreSQL` or `MySQL/MariaDB`.
        server: &'static str,
        /// The admin URL that was tried.
        url: String,
        /// The variable that overrides the URL.
        url_var: &'static str,
        /// The variable that skips the server's tests.
        skip_var: &'static str,
        /// The error from sqlx.
        #[source]
        source: sqlx::Error,
    },

    /// A database statement or connection failed.
    #[error("{action}: {source}")]
    Database {
        /// What the harness was doing.
        action: String,
        /// The error from sqlx.
        #[source]
        source: sqlx::Error,
    },
}

impl std::fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl HarnessError {
    pub(crate) fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            action: action.into(),
            source,
        }
    }
}
